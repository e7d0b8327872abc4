"""Per-class CE weight chosen on synthetic defects, measured in docs/heldout.md
("Calibrating the cross-entropy"): a label-free way to let each class decide how much the ViT's
cross-entropy should count (0 = ProtoFlow's map alone), rejected there on the tuning draws.

Three steps around bench/score_variants.py, which scores the CE-weight rows:

    # 1. a calibration set from a world's training images only
    python bench/synthetic_calibration.py make --data_path data/demo_heldout_mvtec \
        --output_dir output_dir/calibration_heldout
    # 2. score_variants.py on it and on the real test set (same models, two output dirs)
    python bench/score_variants.py ... --data_path output_dir/calibration_heldout \
        --output_dir output_dir/variants_calibration_heldout
    # 3. each class's weight from the calibration set, scored on the test set
    python bench/synthetic_calibration.py pick \
        --calibration output_dir/variants_calibration_heldout/score_variants.json \
        --test output_dir/variants_heldout/score_variants.json

The calibration set is MVTec-shaped: each class's train/good images as test/good, and
each with one synthetic defect as test/synth (masks in ground_truth/synth), train/good
linked to the original. The defects are not demo_data.py's: an irregular blob of
0.3-3 % of the image, alternately filled with another training image of the class,
shifted (CutPaste-like), or with a colour shift of the image itself, blended at 60-100 %.
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import sys

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import datasets  # noqa: E402
from protocols import CE_WEIGHT  # noqa: E402
from score_variants import CE_WEIGHTS, ce_weight_row  # noqa: E402
from utils import UserError, cli, read_json_object  # noqa: E402

AREA = (0.003, 0.03)  # fraction of the image a defect covers
BLEND = (0.6, 1.0)
# score_variants.py's row of each CE weight; 0 is ProtoFlow's map alone, CE_WEIGHT the
# default
WEIGHT_ROWS = {w: ce_weight_row(w) for w in sorted({0.0, CE_WEIGHT, *CE_WEIGHTS})}


def blob_mask(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """(h, w) bool: an irregular blob (a random ellipse with a smooth-noise edge) of
    AREA of the image, away from the border."""
    area = rng.uniform(*AREA) * h * w
    noise = gaussian_filter(rng.standard_normal((h, w)), sigma=rng.uniform(3, 8))
    cy, cx = rng.integers(h // 8, h - h // 8), rng.integers(w // 8, w - w // 8)
    yy, xx = np.mgrid[:h, :w]
    dist = np.sqrt((yy - cy) ** 2 / rng.uniform(0.3, 1) + (xx - cx) ** 2 / rng.uniform(0.3, 1))
    field = -dist / math.sqrt(area / math.pi) + 0.4 * noise / noise.std()
    return field >= np.quantile(field, 1 - area / (h * w))


def synthetic_defect(image: np.ndarray, donor: np.ndarray | None, rng: np.random.Generator
                     ) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) uint8 -> (the image with one defect, its (H, W) bool mask). With a
    `donor` (another image of the class, same size) the blob shows the donor shifted;
    without, the image's own colours shifted."""
    x = image.astype(np.float32)
    h, w, _ = x.shape
    mask = blob_mask(h, w, rng)
    alpha = rng.uniform(*BLEND)
    if donor is not None:
        fill = np.roll(donor.astype(np.float32),
                       (rng.integers(-h // 3, h // 3), rng.integers(-w // 3, w // 3)), (0, 1))
    else:
        fill = np.clip(x * rng.uniform(0.75, 1.25, size=3) + rng.uniform(-20, 20), 0, 255)
    soft = gaussian_filter(mask.astype(np.float32), 1.0)[..., None] * alpha  # (H, W, 1)
    return (x * (1 - soft) + fill * soft).round().clip(0, 255).astype(np.uint8), mask


def class_images(data_path: str) -> dict[str, tuple[str, list[str]]]:
    """Class -> (its train/good folder, its images), every class checked before anything
    is written: at least 2 images (a defect borrows another one) of one size (the
    donor is pasted pixel for pixel), and what datasets.list_images refuses (images of
    one stem: a.png and a.jpg would write one test/synth/a.png). All in one error."""
    found, problems = {}, []
    for cls in datasets.find_test_classes(data_path):
        train = os.path.abspath(os.path.join(data_path, cls, "train", "good"))
        try:
            paths = datasets.list_images(train) if os.path.isdir(train) else []
        except datasets.BadFileError as e:  # a link to nothing, images of one stem
            problems.append(str(e))
            continue
        if len(paths) < 2:
            problems.append(f"{train} holds {len(paths)} image(s): a defect borrows another "
                            "image of the class, so it needs at least 2")
            continue
        sizes = {}
        for p in paths:
            with Image.open(p) as img:
                sizes.setdefault(img.size, p)
        if len(sizes) > 1:
            (a, pa), (b, pb) = list(sizes.items())[:2]
            problems.append(f"{pb} is {b[0]}x{b[1]} but {pa} is {a[0]}x{a[1]}: a class's "
                            "images must share one size")
            continue
        found[cls] = (train, paths)
    if problems:
        raise UserError("cannot make the calibration set:\n  " + "\n  ".join(problems))
    return found


def make(data_path: str, output_dir: str, seed: int) -> None:
    """The calibration set of every class of `data_path` (see the module docstring)."""
    if os.path.exists(output_dir) and os.listdir(output_dir):
        raise UserError(f"{output_dir} is not empty: give a new --output_dir")
    rng = np.random.default_rng(seed)
    for cls, (train, paths) in tqdm(class_images(data_path).items(), desc="classes"):
        out = os.path.join(output_dir, cls)
        for sub in ("test/good", "test/synth", "ground_truth/synth", "train"):
            os.makedirs(os.path.join(out, sub), exist_ok=True)
        os.symlink(train, os.path.join(out, "train", "good"))
        images = [np.asarray(datasets.open_rgb(p)) for p in paths]
        for i, path in enumerate(paths):
            shutil.copy(path, os.path.join(out, "test", "good"))
            donor = images[(i + 1 + int(rng.integers(len(paths) - 1))) % len(paths)]
            bad, mask = synthetic_defect(images[i], donor if i % 2 == 0 else None, rng)
            stem = os.path.splitext(os.path.basename(path))[0]
            Image.fromarray(bad).save(os.path.join(out, "test", "synth", stem + ".png"))
            Image.fromarray(mask.astype(np.uint8) * 255).save(
                os.path.join(out, "ground_truth", "synth", stem + "_mask.png"))
    print(f"calibration set: {output_dir}")


def pick_weight(aurocs: dict[float, float]) -> float:
    """The weight of the best calibration image AUROC; on a tie the one nearest the
    default CE_WEIGHT by factor (then the lighter), so that a calibration set that
    cannot tell keeps the default."""
    best = max(aurocs.values())
    return min((w for w, a in aurocs.items() if a >= best - 1e-9),
               key=lambda w: (abs(math.log2(w / CE_WEIGHT)) if w > 0 else math.inf, w))


def pick(calibration: dict, test: dict, calibration_file: str = "the calibration results",
         test_file: str = "the test results") -> dict[str, dict[str, float]]:
    """Per class of `test`: the weight picked on `calibration` (score_variants.json of
    the calibration set), and the test image AUROC at it, at the default and of
    ProtoFlow's map alone. The file names only word the errors."""
    out = {}
    for cls, rows in test.items():
        if cls not in calibration:
            raise UserError(f"class {cls} is not in the calibration results: score a "
                            "calibration set made from the same data set")
        w = pick_weight({w: _auroc(calibration, cls, r, calibration_file)
                         for w, r in WEIGHT_ROWS.items()})
        out[cls] = {"weight": w, "picked": _auroc(test, cls, WEIGHT_ROWS[w], test_file),
                    "default": _auroc(test, cls, "default", test_file),
                    "protoflow_only": _auroc(test, cls, "protoflow_only", test_file)}
    return out


def _auroc(results: dict, cls: str, row: str, file: str) -> float:
    """Image AUROC of `row` of class `cls` in the score_variants.json `file`: a row it
    lacks is an error naming the file and the row, not a KeyError traceback."""
    rows = results[cls]
    entry = rows.get(row) if isinstance(rows, dict) else None
    if not isinstance(entry, dict) or "image_auroc" not in entry:
        raise UserError(f"{file} has no image AUROC of row {row!r} for class {cls}: "
                        "regenerate it with bench/score_variants.py")
    return entry["image_auroc"]


def print_picks(result: dict[str, dict[str, float]]) -> None:
    """Each class's picked weight and its test image AUROC beside the default's and
    ProtoFlow's, then the means."""
    print(f"{'class':10s} {'weight':>6s} {'picked':>7s} {'default':>7s} {'ProtoFlow':>9s}")
    for cls, r in result.items():
        print(f"{cls:10s} {r['weight']:6g} {r['picked']:7.3f} {r['default']:7.3f} "
              f"{r['protoflow_only']:9.3f}")
    means = {k: np.mean([r[k] for r in result.values()])
             for k in ("picked", "default", "protoflow_only")}
    print(f"{'mean':10s} {'':6s} {means['picked']:7.4f} {means['default']:7.4f} "
          f"{means['protoflow_only']:9.4f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="step", required=True)
    p = sub.add_parser("make", help="write the calibration set")
    p.add_argument("--data_path", required=True, help="an MVTec-format set (its train/good)")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("pick", help="per-class weights from the calibration set, on the test set")
    p.add_argument("--calibration", required=True,
                   help="score_variants.json of the calibration set")
    p.add_argument("--test", required=True, help="score_variants.json of the test set")
    args = parser.parse_args(argv)

    def run() -> None:
        if args.step == "make":
            make(args.data_path, args.output_dir, args.seed)
        else:
            fix = "give a score_variants.json written by bench/score_variants.py"
            print_picks(pick(read_json_object(args.calibration, fix),
                             read_json_object(args.test, fix), args.calibration, args.test))
    return cli(run)


if __name__ == "__main__":
    sys.exit(main())
