"""The bench scripts behind docs/heldout.md's experiments besides score_variants.py:
synthetic_calibration.py (per-class CE weight on synthetic defects: the defects it
paints, the calibration set it writes, the weight it picks), mirror_copy.py (the
mirrored training set) and cnn_stem_vit.py (the ViT with a frozen Lite0 stem)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.ndimage import gaussian_filter

import datasets
import metrics
from utils import LayoutError, UserError


@pytest.fixture
def calib(bench):
    import synthetic_calibration
    return synthetic_calibration


def _noise_image(seed: int, size: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


@pytest.mark.parametrize("with_donor", [True, False])
def test_synthetic_defect_paints_only_its_blob(calib, with_donor: bool) -> None:
    """The mask covers 0.3-3 % of the image; pixels away from it are untouched, pixels in
    it changed; the same seed paints the same defect."""
    image, donor = _noise_image(0), _noise_image(1)
    out, mask = calib.synthetic_defect(image, donor if with_donor else None,
                                       np.random.default_rng(3))
    assert calib.AREA[0] <= mask.mean() <= calib.AREA[1] + 1 / mask.size
    near = np.zeros_like(mask)  # the mask grown by the 1-px soft edge's reach (4 sigma)
    for dy in range(-4, 5):
        for dx in range(-4, 5):
            near |= np.roll(mask, (dy, dx), (0, 1))
    assert np.array_equal(out[~near], image[~near])
    assert (out[mask] != image[mask]).any(axis=-1).mean() > 0.9
    again, mask2 = calib.synthetic_defect(image, donor if with_donor else None,
                                          np.random.default_rng(3))
    assert np.array_equal(again, out) and np.array_equal(mask2, mask)


def test_synthetic_defect_blends_a_shifted_donor_away_from_the_border(calib) -> None:
    """Over 30 seeds, a black image and a donor whose pixels spell their own coordinates
    (4y, 4x, 255): at the blob's peak the donor shows moved (CutPaste-like, never in
    place) by up to a third of the image, blended at 60-100 %; the blob's centre stays
    about an eighth of the image from the border, where the model sees it whole."""
    h = 64
    yy, xx = np.mgrid[:h, :h]
    image = np.zeros((h, h, 3), np.uint8)
    donor = np.stack([4 * yy, 4 * xx, np.full((h, h), 255)], -1).astype(np.uint8)
    alphas, shifts, margins = [], [], []
    for seed in range(30):
        out, mask = calib.synthetic_defect(image, donor, np.random.default_rng(seed))
        edge = gaussian_filter(mask.astype(np.float32), 1.0)  # the blend's soft edge
        y, x = np.unravel_index(edge.argmax(), edge.shape)
        soft = out[y, x, 2] / 255  # alpha * edge there, up to rounding
        alphas.append(soft / edge[y, x])
        source = np.round(out[y, x, :2] / soft / 4)  # the donor pixel shown at (y, x)
        shifts.append((np.array([y, x]) - source + h // 2) % h - h // 2)
        ys, xs = np.nonzero(mask)
        margins.append(min(ys.mean(), xs.mean(), h - 1 - ys.mean(), h - 1 - xs.mean()))
    assert 0.59 < min(alphas) < 0.62 and 0.98 < max(alphas) < 1.01
    assert all(s.any() for s in shifts) and np.abs(shifts).max() <= h // 3 + 1
    assert min(margins) > h / 8 - 2


def test_make_writes_a_set_the_test_loader_reads(calib, tmp_path: Path) -> None:
    """Each training image once as test/good and once, with a masked defect, as
    test/synth; train/good is the original folder; a second run into it is refused."""
    src = tmp_path / "src"
    for cls in ("a", "b"):
        (src / cls / "train" / "good").mkdir(parents=True)
        (src / cls / "test" / "good").mkdir(parents=True)
        for i in range(3):
            Image.fromarray(_noise_image(i)).save(src / cls / "train" / "good" / f"{i:03d}.png")
    out = tmp_path / "calib"
    out.mkdir()  # an existing empty folder is as good as a new one
    calib.make(str(src), str(out), seed=0)
    assert datasets.list_test_classes(str(out)) == ["a", "b"]
    assert os.path.realpath(out / "a" / "train" / "good") == str(src / "a" / "train" / "good")
    ds = datasets.MVTecTestDataset(str(out), "a", token_size=224, img_size=64, patch_size=16)
    assert sorted(zip(ds.labels, ds.defect_types)) == [(0, "good")] * 3 + [(1, "synth")] * 3
    for item in (ds[i] for i in range(len(ds))):
        covered = float(item["gt_mask"].float().mean())
        assert (covered == 0) if item["label"] == 0 else (0.002 < covered < 0.04)
    with pytest.raises(UserError, match="not empty"):
        calib.make(str(src), str(out), seed=0)


def test_make_checks_every_class_before_writing(calib, tmp_path: Path) -> None:
    """A class with one image, a class with images of two sizes and a class with two
    images of one stem (a.png and a.jpg would both write test/synth/a.png, one defect
    lost; datasets.list_images refuses them): all named in one error, and nothing
    written, so the run can be repeated into the same folder."""
    src = tmp_path / "src"
    for cls, sizes in (("one", [32]), ("mixed", [32, 48])):
        (src / cls / "train" / "good").mkdir(parents=True)
        (src / cls / "test").mkdir()
        for i, size in enumerate(sizes):
            Image.fromarray(_noise_image(i, size)).save(src / cls / "train" / "good" / f"{i}.png")
    twins = src / "twins" / "train" / "good"
    twins.mkdir(parents=True)
    (src / "twins" / "test").mkdir()
    for i, ext in enumerate(("png", "jpg")):
        Image.fromarray(_noise_image(i, 32)).save(twins / f"a.{ext}")
    out = tmp_path / "calib"
    with pytest.raises(UserError) as err:
        calib.make(str(src), str(out), seed=0)
    good = src / "mixed" / "train" / "good"
    assert str(err.value) == (
        "cannot make the calibration set:\n"
        f"  {good}/1.png is 48x48 but {good}/0.png is 32x32: a class's images must share "
        "one size\n"
        f"  {src}/one/train/good holds 1 image(s): a defect borrows another image of the "
        "class, so it needs at least 2\n"
        f"  {twins} holds 1 group(s) of images with one name and different extensions, "
        "which would share one mask and one result name:\n  a.jpg, a.png\nFix: rename all "
        "but one file of each group (and a test image's ground-truth mask with it)")
    assert not out.exists()


def test_make_lends_each_image_another_one_and_follows_the_seed(calib, tmp_path: Path,
                                                                monkeypatch) -> None:
    """Images 0, 2, ... of a class get another image of the class as donor (never
    themselves: that would paint the image onto itself, a faint defect), images 1, 3,
    ... a colour shift (no donor), so both kinds are calibrated on; --seed 0 and 1 give
    different defects (a second draw is a second calibration set)."""
    src, images = tmp_path / "src", {}
    for c, cls in enumerate("abcd"):
        folder = src / cls / "train" / "good"
        folder.mkdir(parents=True)
        (src / cls / "test").mkdir()
        for i in range(2 + c % 2):  # 2 or 3 images: a donor drawn from 1 or 2 others
            images[cls, i] = _noise_image(10 * c + i, 32)
            Image.fromarray(images[cls, i]).save(folder / f"{i}.png")
    calls, real = [], calib.synthetic_defect

    def spy(image: np.ndarray, donor: np.ndarray | None, rng: np.random.Generator):
        calls.append((image, donor))
        return real(image, donor, rng)
    monkeypatch.setattr(calib, "synthetic_defect", spy)
    synth = {}
    for seed in (0, 1):
        calib.make(str(src), str(tmp_path / f"seed{seed}"), seed=seed)
        synth[seed] = [np.asarray(Image.open(tmp_path / f"seed{seed}" / cls / "test" / "synth"
                                             / f"{i}.png")) for cls, i in images]
    assert not any(np.array_equal(a, b) for a, b in zip(synth[0], synth[1]))
    assert len(calls) == 2 * len(images)
    for (cls, i), (image, donor) in zip(list(images) * 2, calls):
        assert np.array_equal(image, images[cls, i])
        if i % 2:
            assert donor is None
        else:
            others = [j for c, j in images if c == cls and j != i]
            assert donor is not None and any(np.array_equal(donor, images[cls, j])
                                             for j in others), (cls, i)


def test_pick_weight_prefers_the_default_on_ties(calib) -> None:
    """The best calibration AUROC wins; a tie keeps the weight nearest the default 1 by
    factor, then the lighter, in any order of the weights."""
    assert calib.WEIGHT_ROWS == {0.0: "protoflow_only", 0.25: "CE weight 0.25",
                                 0.5: "CE weight 0.5", 1.0: "default", 2.0: "CE weight 2"}
    assert calib.pick_weight({0.0: 0.9, 0.25: 0.95, 0.5: 0.9, 1.0: 0.94, 2.0: 0.9}) == 0.25
    assert calib.pick_weight({0.0: 0.9, 0.25: 0.9, 0.5: 0.9, 1.0: 0.9, 2.0: 0.9}) == 1.0
    assert calib.pick_weight({0.0: 0.9, 0.25: 0.8, 0.5: 0.9, 1.0: 0.8, 2.0: 0.9}) == 0.5
    assert calib.pick_weight({2.0: 0.9, 1.0: 0.8, 0.5: 0.9, 0.25: 0.8, 0.0: 0.9}) == 0.5
    assert calib.pick_weight({0.0: 0.9, 0.25: 0.8, 0.5: 0.8, 1.0: 0.8, 2.0: 0.8}) == 0.0
    # 2 is one doubling from 1, 0.25 two halvings: 2 is nearer by factor (not by 1 - w)
    assert calib.pick_weight({0.0: 0.8, 0.25: 0.9, 0.5: 0.8, 1.0: 0.8, 2.0: 0.9}) == 2.0
    # 0 and 2 are both 1 from the default, but 0 is infinitely far by factor
    assert calib.pick_weight({0.0: 0.9, 0.25: 0.8, 0.5: 0.8, 1.0: 0.8, 2.0: 0.9}) == 2.0
    # float noise below 1e-9 is a tie, which the default wins
    assert calib.pick_weight({0.0: 0.9, 0.25: 0.9, 0.5: 0.9, 1.0: 0.9 - 1e-12, 2.0: 0.9}) == 1.0


def _weight_rows(calib, values: list[float]) -> dict:
    """score_variants.json rows of one class: image AUROC `values` of the CE weights
    0, 0.25, 0.5, 1, 2 in turn."""
    return {r: {"image_auroc": v} for r, v in zip(calib.WEIGHT_ROWS.values(), values)}


def test_pick_scores_each_class_at_its_weight(calib) -> None:
    """Each class's test AUROC at the weight its calibration rows pick, beside the
    default and ProtoFlow alone; a class or a row the files lack is a UserError naming
    the file, the class and the row (score_variants.json of another version), not a
    KeyError traceback."""
    calibration = {"a": _weight_rows(calib, [0.9, 0.8, 0.8, 0.8, 0.8]),
                   "b": _weight_rows(calib, [0.7] * 5)}
    test = {"a": _weight_rows(calib, [0.97, 0.96, 0.95, 0.94, 0.93]),
            "b": _weight_rows(calib, [0.5, 0.6, 0.7, 0.8, 0.9])}
    assert calib.pick(calibration, test) == {
        "a": {"weight": 0.0, "picked": 0.97, "default": 0.94, "protoflow_only": 0.97},
        "b": {"weight": 1.0, "picked": 0.8, "default": 0.8, "protoflow_only": 0.5}}
    with pytest.raises(UserError, match="class c is not in the calibration results"):
        calib.pick(calibration, {"c": _weight_rows(calib, [0.5] * 5)})
    fix = ": regenerate it with bench/score_variants.py"
    no_half = {"a": calibration["a"], "b": dict(calibration["b"])}
    del no_half["b"]["CE weight 0.5"]
    with pytest.raises(UserError) as err:
        calib.pick(no_half, test, "cal.json", "test.json")
    assert str(err.value) == "cal.json has no image AUROC of row 'CE weight 0.5' for class b" + fix
    for row in ("default", "protoflow_only"):
        lacking = {"a": test["a"], "b": {k: v for k, v in test["b"].items() if k != row}}
        with pytest.raises(UserError) as err:
            calib.pick(calibration, lacking, "cal.json", "test.json")
        assert str(err.value) == f"test.json has no image AUROC of row {row!r} for class b" + fix


def test_pick_step_prints_each_class_and_the_means(calib, tmp_path: Path, capsys) -> None:
    """`synthetic_calibration.py pick`, the line docs/heldout.md's figures come from: the mean of
    the picked, default and ProtoFlow image AUROCs over the classes."""
    calibration = {"a": _weight_rows(calib, [0.9, 0.8, 0.8, 0.8, 0.8]),
                   "b": _weight_rows(calib, [0.7] * 5)}
    test = {"a": _weight_rows(calib, [0.97, 0.9, 0.9, 0.94, 0.9]),
            "b": _weight_rows(calib, [0.5, 0.6, 0.7, 0.8, 0.9])}
    (tmp_path / "cal.json").write_text(json.dumps(calibration))
    (tmp_path / "test.json").write_text(json.dumps(test))
    assert calib.main(["pick", "--calibration", str(tmp_path / "cal.json"),
                       "--test", str(tmp_path / "test.json")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["a", "0", "0.970", "0.940", "0.970"]
    assert lines[2].split() == ["b", "1", "0.800", "0.800", "0.500"]
    assert lines[3].split() == ["mean", "0.8850", "0.8700", "0.7350"]
    (tmp_path / "old.json").write_text(json.dumps({c: {"default": {"image_auroc": 0.5}}
                                                   for c in test}))
    assert calib.main(["pick", "--calibration", str(tmp_path / "cal.json"),
                       "--test", str(tmp_path / "old.json")]) == 2
    assert capsys.readouterr().err == (
        f"error: {tmp_path / 'old.json'} has no image AUROC of row 'protoflow_only' for "
        "class a: regenerate it with bench/score_variants.py\n")
    (tmp_path / "list.json").write_text("[]")
    for flag, bad, words in (("--test", "none.json", "is not a readable JSON file"),
                             ("--calibration", "list.json", "holds a JSON list, not an object")):
        argv = {"--calibration": str(tmp_path / "cal.json"), "--test": str(tmp_path / "test.json"),
                flag: str(tmp_path / bad)}
        assert calib.main(["pick", *(x for kv in argv.items() for x in kv)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {tmp_path / bad} {words}") and err.endswith(
            ": give a score_variants.json written by bench/score_variants.py\n"), err


def test_pick_refuses_rows_of_another_shape(calib) -> None:
    """A class whose rows are a list, or a row without an image AUROC (pixel AUROC only),
    is a UserError naming the file, the row and the class, not a traceback."""
    test = {"a": _weight_rows(calib, [0.9] * 5)}
    fix = ": regenerate it with bench/score_variants.py"
    pixel_only = {"a": _weight_rows(calib, [0.9] * 5)}
    pixel_only["a"]["CE weight 0.25"] = {"pixel_auroc": 0.9}
    for calibration, row in (({"a": [0.9] * 5}, "protoflow_only"),
                             (pixel_only, "CE weight 0.25")):
        with pytest.raises(UserError) as err:
            calib.pick(calibration, test, "cal.json", "test.json")
        assert str(err.value) == f"cal.json has no image AUROC of row {row!r} for class a" + fix


def test_mirror_copy_adds_each_image_and_mask_mirrored(bench, tmp_path: Path, capsys) -> None:
    """Each training image and its foreground mask, as they were and mirrored (m<name>),
    a set training reads with its masks; an existing empty --output_dir is fine, a
    second run into it is refused."""
    import mirror_copy
    src = tmp_path / "src"
    for cls in ("a", "b"):
        (src / "train" / cls).mkdir(parents=True)
        (src / "fg_mask" / cls).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(_noise_image(i, 32)).save(src / "train" / cls / f"{i}.png")
            mask = np.zeros((32, 32), np.uint8)
            mask[:, :8] = 255  # a left band: its mirror is a right band
            Image.fromarray(mask).save(src / "fg_mask" / cls / f"{i}.png")
    out = tmp_path / "mirrored"
    out.mkdir()
    assert mirror_copy.mirror_copy(str(src), str(out)) == 16
    for sub in ("train", "fg_mask"):
        assert sorted(os.listdir(out / sub / "b")) == ["0.png", "1.png", "m0.png", "m1.png"]
        for name in ("0.png", "1.png"):
            original = np.asarray(Image.open(src / sub / "b" / name))
            assert np.array_equal(np.asarray(Image.open(out / sub / "b" / name)), original)
            assert np.array_equal(np.asarray(Image.open(out / sub / "b" / f"m{name}")),
                                  original[:, ::-1])
    assert len(datasets.check_train_classes(str(out), ["a", "b"])) == 8
    with pytest.raises(UserError, match="not empty"):
        mirror_copy.mirror_copy(str(src), str(out))
    capsys.readouterr()
    assert mirror_copy.main(["--data_path", str(src), "--output_dir", str(out)]) == 2
    assert capsys.readouterr().err == f"error: {out} is not empty: give a new --output_dir\n"
    # a set trained with --no-fg_mask has no masks: its images alone are mirrored
    for folder in (src / "fg_mask").iterdir():
        for f in folder.iterdir():
            f.unlink()
        folder.rmdir()
    assert mirror_copy.mirror_copy(str(src), str(tmp_path / "no_masks")) == 8
    assert not (tmp_path / "no_masks" / "fg_mask").exists()
    with pytest.raises(LayoutError, match="no_masks/train/train does not exist"):
        mirror_copy.mirror_copy(str(tmp_path / "no_masks" / "train"), str(tmp_path / "x"))
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(UserError, match="empty has no train/<class>/ folders"):
        mirror_copy.mirror_copy(str(tmp_path / "empty"), str(tmp_path / "x"))
    # a set mirrored already: m0.png would be a file and the mirror of 0.png (it was
    # overwritten, and the count said 4 files more than were there)
    with pytest.raises(UserError) as e:
        mirror_copy.mirror_copy(str(out), str(tmp_path / "twice"))
    assert str(e.value) == (
        f"{out / 'train' / 'a'}: m0.png is a file of it and would be the mirror of 0.png too "
        "(2 such name(s); a set mirrored already?): give the set as setup_train_dataset.py "
        "wrote it")
    assert not (tmp_path / "twice").exists()


# ------------------------------------------------------------------ compare_worlds.py
@pytest.fixture
def compare(bench):
    import compare_worlds
    return compare_worlds


def _results(folder: Path, pmad: tuple, protoflow: tuple, patchcore: tuple,
             protocol: str = "clean", ce_only: tuple | None = (0.7, 0.8, 0.5)) -> Path:
    """A results.json as run_test.py writes it (undefined metrics null; no ce_only row
    under --unmasked zero), in folder/results/; each tuple is (image AUROC, pixel AUROC,
    AUPRO)."""
    def row(values: tuple) -> dict:
        return dict(zip(("image_auroc", "pixel_auroc", "pixel_aupro"), values),
                    image_ap=0.5)
    (folder / "results").mkdir(parents=True)
    path = folder / "results" / "results.json"
    rows = {"mean": pmad, "mean_protoflow_only": protoflow, "mean_patchcore": patchcore,
            "mean_ce_only": ce_only}
    path.write_text(json.dumps({"protocol": protocol} | {
        k: row(v) for k, v in rows.items() if v is not None}))
    return path


def test_holds_up_allows_only_a_saturated_baseline_a_margin(compare) -> None:
    """At least the baseline, or within 0.003 (not more) of a saturated (>= 0.995) one;
    float noise of a mean of means counts as equal, at the margin's edge too."""
    assert compare.holds_up(0.974, 0.974) and compare.holds_up(0.975, 0.974)
    assert compare.holds_up(0.9649999999999999, 0.9650000000000001)  # float noise
    assert not compare.holds_up(0.9736, 0.9740)
    assert compare.holds_up(0.993, 0.996)  # within 0.003 of a saturated baseline
    assert compare.holds_up(0.992, 0.9949999999999999)  # 0.995 up to float noise
    assert not compare.holds_up(0.992, 0.996)
    assert not compare.holds_up(0.9929, 0.996)  # 0.0031 short: the margin is 0.003
    # exactly 0.003 short, as a mean over 6 classes gives it (0.9939999999999999)
    assert sum([0.994] * 6) / 6 < 0.997 - 0.003 and compare.holds_up(sum([0.994] * 6) / 6, 0.997)
    assert not compare.holds_up(0.992, 0.994)  # 0.994 is not saturated


def test_compare_worlds_table_json_and_verdicts(compare, tmp_path: Path, capsys) -> None:
    """One row per world with PMAD's and every baseline's three means and the verdict;
    a metric no row defines (a set without masks) is n/a and null and decides nothing,
    one PMAD alone lacks fails (even where only the second baseline defines it); PMAD
    must beat both baselines, not one; a world without the CE-alone row (--unmasked
    zero) shows it as n/a; a verdict names only the baselines PMAD falls short of, with
    the decimals that tell the figures apart."""
    _results(tmp_path / "a", (0.98, 0.97, 0.90), (0.97, 0.96, 0.89), (0.975, 0.965, 0.88))
    _results(tmp_path / "b", (0.9736, 0.968, 0.857), (0.9796, 0.965, 0.852),
             (0.974, 0.961, 0.843))
    _results(tmp_path / "c", (1.0, None, None), (1.0, None, None), (1.0, None, None),
             ce_only=None)
    _results(tmp_path / "d", (None, None, None), (None, None, None), (None, None, None))
    _results(tmp_path / "f", (0.97, 0.97, 0.9), (0.96, 0.96, 0.8), (0.98, 0.96, 0.8))
    _results(tmp_path / "g", (0.9, None, 0.9), (0.9, None, 0.9), (0.9, 0.9, 0.9))
    _results(tmp_path / "h", (0.97396, 0.97, 0.9), (0.96, 0.96, 0.8), (0.974, 0.96, 0.8))
    _results(tmp_path / "e", (None, 0.97, 0.9), (0.9, 0.96, 0.8), (0.9, 0.96, 0.8))
    out = tmp_path / "summary.json"
    assert compare.main([f"tune={tmp_path / 'a'}",
                         f"held={tmp_path / 'b' / 'results'}",
                         f"nomasks={tmp_path / 'c' / 'results' / 'results.json'}",
                         f"onlyone={tmp_path / 'f'}", f"close={tmp_path / 'h'}",
                         f"lastpixel={tmp_path / 'g'}",
                         f"empty={tmp_path / 'd'}", f"noimage={tmp_path / 'e'}",
                         "--output", str(out)]) == 0
    out_lines = capsys.readouterr().out.splitlines()
    cut = next(i for i, ln in enumerate(out_lines) if ln.startswith("PMAD's image AUROC minus"))
    lines, gap_lines = out_lines[:cut], out_lines[cut:]
    assert "| held | n/a (no per-image scores: evaluate again) | n/a (no per-image scores: " \
           "evaluate again) |" in gap_lines
    assert ("| tune | 0.980/0.970/0.900 | 0.970/0.960/0.890 | 0.975/0.965/0.880 | "
            "0.700/0.800/0.500 | yes |") in lines
    assert ("| held | 0.974/0.968/0.857 | 0.980/0.965/0.852 | 0.974/0.961/0.843 | "
            "0.700/0.800/0.500 | no: image AUROC 0.9736 against ProtoFlow map alone "
            "0.9796, PatchCore 0.9740 |") in lines
    assert ("| nomasks | 1.000/n/a/n/a | 1.000/n/a/n/a | 1.000/n/a/n/a | n/a/n/a/n/a "
            "| yes (pixel AUROC, AUPRO undefined) |") in lines
    assert ("| onlyone | 0.970/0.970/0.900 | 0.960/0.960/0.800 | 0.980/0.960/0.800 | "
            "0.700/0.800/0.500 | no: image AUROC 0.9700 against PatchCore 0.9800 |") in lines
    assert ("| close | 0.974/0.970/0.900 | 0.960/0.960/0.800 | 0.974/0.960/0.800 | "
            "0.700/0.800/0.500 | no: image AUROC 0.97396 against PatchCore 0.97400 |") in lines
    assert ("| lastpixel | 0.900/n/a/0.900 | 0.900/n/a/0.900 | 0.900/0.900/0.900 | "
            "0.700/0.800/0.500 | no: pixel AUROC n/a against ProtoFlow map alone n/a, "
            "PatchCore 0.9000 |") in lines
    assert lines[-3].startswith("| empty |") and lines[-3].endswith("| n/a |")
    assert lines[-2].endswith("| no: image AUROC n/a against ProtoFlow map alone 0.9000, "
                              "PatchCore 0.9000 |")
    saved = json.loads(out.read_text())
    assert saved["held"]["holds_up"] == {"image_auroc": False, "pixel_auroc": True,
                                         "pixel_aupro": True}
    assert saved["nomasks"]["pmad"]["pixel_auroc"] is None
    assert saved["nomasks"]["holds_up"]["pixel_aupro"] is None
    assert saved["noimage"]["holds_up"]["image_auroc"] is False
    assert saved["onlyone"]["holds_up"] == {"image_auroc": False, "pixel_auroc": True,
                                            "pixel_aupro": True}
    assert saved["lastpixel"]["holds_up"] == {"image_auroc": True, "pixel_auroc": False,
                                              "pixel_aupro": True}


def test_compare_worlds_names_differing_scoring_options(compare, tmp_path: Path,
                                                        capsys) -> None:
    """Worlds scored with other clean-protocol options (CE weight 0.5 against 1) are
    compared with a note that names each world's options first; alike, no note."""
    for name, weight in (("a", 1.0), ("b", 0.5), ("c", 1.0)):
        path = _results(tmp_path / name, (0.9, 0.9, 0.9), (0.9, 0.9, 0.9), (0.9, 0.9, 0.9))
        path.write_text(json.dumps(json.loads(path.read_text())
                                   | {"clean_options": {"ce_weight": weight}}))
    assert compare.main([f"a={tmp_path / 'a'}", f"b={tmp_path / 'b'}"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == (
        "note: the worlds were scored with different clean-protocol options: a: "
        "{'ce_weight': 1.0}; b: {'ce_weight': 0.5}")
    assert compare.main([f"a={tmp_path / 'a'}", f"c={tmp_path / 'c'}"]) == 0
    assert "note:" not in capsys.readouterr().out


def _image(name: str, pmad: float, protoflow: float, patchcore: float) -> dict:
    """One image of a results.json's per-class 'images', as run_test.py writes it."""
    return {"name": name, "defect_type": name.split("_")[0], "pmad": pmad,
            "protoflow_score": 0.0, "protoflow_only": protoflow, "patchcore": patchcore}


def test_image_auroc_gap_is_a_paired_bootstrap_over_test_images(compare, tmp_path: Path,
                                                                capsys) -> None:
    """The gap is PMAD's mean image AUROC minus each baseline's; its interval comes from
    resampling each class's good and defective images apart, one draw for both methods.
    Class a: PMAD separates its images (1.0), ProtoFlow's map ranks one good image above
    a defective one (0.75), PatchCore as PMAD; class b: all three alike. So the gap to
    ProtoFlow is 0.125: 0 in draws taking good_0 twice (1 in 4) and 0.5 in draws of
    only good_1 and crack_0 (1 in 16), which both lie beyond 2.5 %; to PatchCore 0."""
    path = _results(tmp_path / "w", (1.0, 0.9, 0.9), (0.875, 0.9, 0.9), (1.0, 0.9, 0.9))
    results = json.loads(path.read_text())
    results["classes"] = {
        "a": {"images": [_image("good_0", 0.1, 0.1, 0.1), _image("good_1", 0.2, 0.35, 0.2),
                         _image("crack_0", 0.3, 0.3, 0.3), _image("crack_1", 0.4, 0.4, 0.4)]},
        "b": {"images": [_image("good_0", 0.1, 0.1, 0.1), _image("hole_0", 0.9, 0.9, 0.9)]}}
    path.write_text(json.dumps(results))
    assert compare.image_auroc_gaps(results) == {
        "protoflow_only": {"gap": 0.125, "low": 0.0, "high": 0.5},
        "patchcore": {"gap": 0.0, "low": 0.0, "high": 0.0}}
    assert compare.main([f"w={path}"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        "| w | +0.1250 [+0.0000, +0.5000] | +0.0000 [+0.0000, +0.0000] |")
    # ties count half: good 0.5, 0.5 against defective 0.5, 0.9
    assert compare._aurocs(np.array([[0.5, 0.5, 0.5, 0.9]]),
                           np.array([[False, False, True, True]])).tolist() == [0.75]
    rng = np.random.default_rng(0)  # with many ties, as metrics.py computes it
    scores, labels = rng.integers(0, 5, (4, 30)).astype(float), rng.random((4, 30)) < 0.4
    assert compare._aurocs(scores, labels) == pytest.approx(
        [metrics.image_auroc(y, x) for x, y in zip(scores, labels)])
    del results["classes"]["b"]["images"]
    assert compare.image_auroc_gaps(results) is None  # an earlier version's record
    results["classes"]["b"]["images"] = [_image("good_0", 0.1, 0.1, 0.1)]
    assert compare.image_auroc_gaps(results) is None  # no defective image: undefined


def test_same_test_images_pairs_each_run_with_the_first(compare, tmp_path: Path,
                                                        capsys) -> None:
    """--same_test_images: each later run's PMAD image AUROC minus the first run's, over
    the same resamples of the test images. Run 'worse' ranks one good image of class a
    above a defective one (0.75 against 1.0, class b equal): gap -0.125, as
    image_auroc_gaps finds PMAD vs a baseline with those scores; a run of itself has gap
    0. Runs of other test images are refused (exit 2); a run without per-image scores
    gives n/a."""
    def run(name: str, good_1: float, images=("crack_0", "crack_1")) -> Path:
        """A results.json with per-image scores; class a's good_1 scores `good_1`."""
        path = _results(tmp_path / name, (1.0, 0.9, 0.9), (1.0, 0.9, 0.9), (1.0, 0.9, 0.9))
        results = json.loads(path.read_text())
        results["classes"] = {
            "a": {"images": [_image("good_0", 0.1, 0.1, 0.1), _image("good_1", good_1, 0, 0),
                             _image(images[0], 0.3, 0, 0), _image(images[1], 0.4, 0, 0)]},
            "b": {"images": [_image("good_0", 0.1, 0.1, 0.1), _image("hole_0", 0.9, 0, 0)]}}
        path.write_text(json.dumps(results))
        return path

    first, worse, again = run("first", 0.2), run("worse", 0.35), run("again", 0.2)
    out = tmp_path / "runs.json"
    assert compare.main([f"first={first}", f"worse={worse}", f"again={again}",
                         "--same_test_images", "--output", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    title = "each run's PMAD image AUROC minus first's (the same test images)"
    assert printed[printed.index(title):] == [
        title, "",
        "| run | PMAD image AUROC | minus the first run's |", "|:--|:--:|:--:|",
        "| worse | 1.0000 | -0.1250 [-0.5000, +0.0000] |",
        "| again | 1.0000 | +0.0000 [+0.0000, +0.0000] |", "", str(out)]
    saved = json.loads(out.read_text())
    assert saved["worse"]["pmad_image_auroc_gap_to_first"] == {
        "gap": -0.125, "low": -0.5, "high": 0.0}
    assert saved["first"]["pmad_image_auroc_gap_to_first"] is None
    # the same pairing as PMAD against a baseline: first's PMAD against worse's as one
    results, worse_images = json.loads(first.read_text()), json.loads(worse.read_text())
    for cls, record in results["classes"].items():
        for image, other in zip(record["images"], worse_images["classes"][cls]["images"]):
            image["protoflow_only"] = other["pmad"]
    assert compare.image_auroc_gaps(results)["protoflow_only"] == {
        "gap": 0.125, "low": 0.0, "high": 0.5}

    other = run("other", 0.2, images=("crack_0", "crack_9"))
    assert compare.main([f"first={first}", f"other={other}", "--same_test_images"]) == 2
    assert capsys.readouterr().err.startswith(
        f"error: {other} scores other classes or test images than {first}: "
        "--same_test_images compares runs on one test set")
    bare = _results(tmp_path / "bare", (1.0, 0.9, 0.9), (1.0, 0.9, 0.9), (1.0, 0.9, 0.9))
    assert compare.main([f"first={first}", f"bare={bare}", "--same_test_images"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        "| bare | 1.0000 | n/a (no per-image scores: evaluate again) |")


def test_compare_worlds_refuses_what_it_cannot_compare(compare, tmp_path: Path,
                                                       capsys) -> None:
    """Exit 2 and one line naming the file and the fix: no results.json, one of the
    paper protocol (its best-of-24 numbers are not comparable), one of an evaluation that
    stopped (its means cover some classes only), unreadable JSON, JSON of
    another shape, a baseline row missing, a metric missing or not a number, a baseline
    undefined where PMAD is defined, an --output it cannot write; a repeated NAME, a
    bare PATH, an empty NAME or an empty PATH is an argparse error."""
    paper = _results(tmp_path / "p", (1, 1, 1), (1, 1, 1), (1, 1, 1), protocol="paper")
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    a_list = tmp_path / "list.json"
    a_list.write_text("[1]")
    no_patchcore = _results(tmp_path / "q", (1, 1, 1), (1, 1, 1), (1, 1, 1))
    data = json.loads(no_patchcore.read_text())
    no_patchcore.write_text(json.dumps({k: v for k, v in data.items()
                                        if k != "mean_patchcore"}))
    no_metric = _results(tmp_path / "r", (1, 1, 1), (1, 1, 1), (1, 1, 1))
    data = json.loads(no_metric.read_text())
    del data["mean"]["pixel_aupro"]
    no_metric.write_text(json.dumps(data))
    text = _results(tmp_path / "s", (1, 1, 1), (1, 1, 1), (1, 1, 1))
    text.write_text(text.read_text().replace('"image_auroc": 1', '"image_auroc": "high"', 1))
    half = _results(tmp_path / "t", (0.9, 0.9, 0.9), (0.9, None, 0.9), (0.9, 0.9, 0.9))
    stopped = _results(tmp_path / "v", (1, 1, 1), (1, 1, 1), (1, 1, 1))
    data = json.loads(stopped.read_text())  # run_test.py's record of a run that stopped
    stopped.write_text(json.dumps(data | {"failed": {"retina": "RuntimeError: x"},
                                          "not_evaluated": ["tissue"]}))
    cases = {str(tmp_path / "none"): "holds no results.json (nor results/results.json)",
             str(paper): "is not a clean-protocol results.json (protocol 'paper')",
             str(broken): "broken.json is not a readable JSON file (",
             str(a_list): "list.json holds a JSON list, not an object: evaluate the world again",
             str(no_patchcore): "'mean_patchcore' must map",
             str(no_metric): "'mean' must map",
             str(text): "'mean' must map",
             str(half): "defines PMAD's pixel AUROC but not every baseline's",
             str(stopped): "results.json is an evaluation that stopped (failed: retina; not "
                           "evaluated: tissue): finish it with the same run_test.py command "
                           "and --resume_eval, then compare"}
    for path, words in cases.items():
        assert compare.main([f"w={path}"]) == 2, path
        err = capsys.readouterr().err
        assert err.startswith("error: ") and words in err and "Traceback" not in err, err
    good = _results(tmp_path / "u", (1, 1, 1), (1, 1, 1), (1, 1, 1))
    assert compare.main([f"w={good}", "--output", str(tmp_path / "no" / "x.json")]) == 2
    assert "give a path in a writable folder" in capsys.readouterr().err
    for argv in (["a=x", "a=y"], ["x"], ["=x"], ["a="]):
        with pytest.raises(SystemExit) as e:
            compare.main(argv)
        assert e.value.code == 2, argv
    err = capsys.readouterr().err
    assert "each world needs its own NAME" in err
    for bad in ("'x'", "'=x'", "'a='"):
        assert f"{bad}: give NAME=PATH, e.g. heldout=output_dir/demo/heldout" in err


def test_paired_auroc_gaps_of_any_pairs_share_each_draw(compare) -> None:
    """Each pair's gap is a - b, averaged over classes; both methods of a pair see the
    same resamples (a method paired with itself has gap 0 in every draw); a pair's
    interval does not depend on the other pairs asked for (the resamples depend only on
    the seed and the labels)."""
    labels = np.array([False, False, False, True, True, True])
    scores = {"a": np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6]),    # AUROC 1
              "b": np.array([0.1, 0.2, 0.45, 0.4, 0.5, 0.6]),   # 8 of 9 pairs
              "c": np.array([0.6, 0.2, 0.45, 0.4, 0.5, 0.1])}   # 3 of 9 pairs
    classes = [(labels, scores), (labels, {k: -v for k, v in scores.items()})]
    gaps = compare.paired_auroc_gaps(classes, {"ab": ("a", "b"), "bc": ("b", "c"),
                                               "ac": ("a", "c"), "aa": ("a", "a")})
    # class 1: a 1, b 8/9, c 3/9; class 2 (scores negated): a 0, b 1/9, c 6/9
    assert gaps["ab"]["gap"] == pytest.approx(((1 - 8 / 9) + (0 - 1 / 9)) / 2)
    assert gaps["bc"]["gap"] == pytest.approx(((8 / 9 - 3 / 9) + (1 / 9 - 6 / 9)) / 2)
    assert gaps["ac"]["gap"] == pytest.approx(((1 - 3 / 9) + (0 - 6 / 9)) / 2)
    assert gaps["aa"] == {"gap": 0.0, "low": 0.0, "high": 0.0}
    one = [(labels, scores)]
    alone = compare.paired_auroc_gaps(one, {"ab": ("a", "b"), "ac": ("a", "c")}, draws=500)
    assert alone["ab"]["gap"] == pytest.approx(1 / 9)
    assert alone["ac"]["gap"] == pytest.approx(6 / 9)
    assert 0 <= alone["ab"]["low"] <= alone["ab"]["gap"] <= alone["ab"]["high"] <= 1
    assert alone["ab"]["low"] < alone["ab"]["high"]
    assert compare.paired_auroc_gaps(one, {"ab": ("a", "b")}, draws=500) == {"ab": alone["ab"]}


def test_paired_auroc_gaps_do_not_depend_on_the_images_order(compare) -> None:
    """A class's test images come in any order (MVTec's defect types sort around "good"):
    class a of the gap test above, its good and defective images interleaved (each
    group's order kept), gives the same gap and interval, each draw's labels following
    the images it resampled."""
    labels = np.array([False, False, True, True])
    scores = {"pmad": np.array([0.1, 0.2, 0.3, 0.4]),
              "protoflow_only": np.array([0.1, 0.35, 0.3, 0.4])}
    pairs = {"pf": ("pmad", "protoflow_only")}
    grouped = compare.paired_auroc_gaps([(labels, scores)], pairs, draws=500)["pf"]
    order = [2, 0, 3, 1]  # crack_0, good_0, crack_1, good_1
    mixed = compare.paired_auroc_gaps([(labels[order], {k: v[order] for k, v in scores.items()})],
                                      pairs, draws=500)["pf"]
    assert mixed == grouped
    assert grouped["gap"] == 0.25 and grouped["low"] == 0.0 and grouped["high"] == 1.0


def test_paired_auroc_gaps_interval_is_the_middle_95_percent(compare) -> None:
    """The interval is the 2.5 and 97.5 percentiles of the drawn gaps, the good and the
    defective images resampled each by its own count. One good image and 400 defective
    ones, half above it for method a, all for b: a draw's gap is K / 400 - 1 with K
    binomial (400, 1/2), so the interval is its 2.5 and 97.5 % quantiles (-0.55, -0.45),
    up to the draws' noise; 5 and 95 % would give -0.54 and -0.46. The draws are seeded."""
    from scipy.stats import binom
    labels = np.array([False] + [True] * 400)
    scores = {"a": np.array([0.5] + [1.0, 0.0] * 200), "b": np.array([0.5] + [1.0] * 400)}
    gaps = compare.paired_auroc_gaps([(labels, scores)], {"ab": ("a", "b")})["ab"]
    low, high = binom.ppf([0.025, 0.975], 400, 0.5) / 400 - 1
    assert (low, high) == pytest.approx((-0.55, -0.45))
    assert gaps["gap"] == -0.5
    assert gaps["low"] == pytest.approx(low, abs=1.5 / 400)
    assert gaps["high"] == pytest.approx(high, abs=1.5 / 400)
    # seeded (SEED): a report is made again exactly; another seed draws other images
    rng = np.random.default_rng(5)
    labels = np.arange(40) >= 20
    scores = {"a": rng.normal(size=40) + labels, "b": rng.normal(size=40) + labels}
    once, again, other = (compare.paired_auroc_gaps([(labels, scores)], {"ab": ("a", "b")},
                                                    seed=seed)["ab"] for seed in (0, 0, 1))
    assert once == again and once == compare.paired_auroc_gaps(
        [(labels, scores)], {"ab": ("a", "b")})["ab"]
    assert (other["low"], other["high"]) != (once["low"], once["high"])


def test_compare_worlds_refuses_a_run_stopped_at_its_last_class(compare, tmp_path: Path,
                                                                capsys) -> None:
    """A run whose last class failed has no class left unevaluated: it is still refused
    (its means lack the failed class), naming the failed classes only."""
    path = _results(tmp_path / "w", (1, 1, 1), (1, 1, 1), (1, 1, 1))
    path.write_text(json.dumps(json.loads(path.read_text())
                               | {"failed": {"retina": "RuntimeError: x"}, "not_evaluated": []}))
    assert compare.main([f"w={path}"]) == 2
    assert capsys.readouterr().err == (
        f"error: {path} is an evaluation that stopped (failed: retina): finish it with the "
        "same run_test.py command and --resume_eval, then compare\n")


def test_image_auroc_gap_is_undefined_for_a_class_of_defective_images_only(compare) -> None:
    """A class whose test images are all defective has no image AUROC: no gaps (None, shown
    as n/a), not a gap of NaN, as for a class without defective images."""
    good = {"a": {"images": [_image("good_0", 0.1, 0.1, 0.1), _image("crack_0", 0.3, 0.2, 0.3)]}}
    assert compare.image_auroc_gaps({"classes": good})["protoflow_only"]["gap"] == 0.0
    only_defective = {"images": [_image("crack_0", 0.3, 0.3, 0.3), _image("hole_0", 0.9, 0, 0)]}
    assert compare.image_auroc_gaps({"classes": good | {"b": only_defective}}) is None


def test_pool_test_sets_joins_other_draws_test_images(bench, tmp_path: Path, capsys) -> None:
    """The first draw is copied whole; each further draw's test and ground-truth images
    join with d<k>_ names, so each mask still matches its image (the test loader reads
    the pooled set with its masks); draws of other classes, a name clash and an existing
    output are refused before anything is written (exit 2)."""
    import pool_test_sets

    def draw(root: Path, seed: int, classes=("a", "b")) -> Path:
        for cls in classes:
            for sub in ("train/good", "test/good", "test/crack", "ground_truth/crack"):
                (root / cls / sub).mkdir(parents=True)
            Image.fromarray(_noise_image(seed, 32)).save(root / cls / "train/good/000.png")
            for i in range(2):
                Image.fromarray(_noise_image(seed + i, 32)).save(
                    root / cls / f"test/good/00{i}.png")
                Image.fromarray(_noise_image(seed + 10 + i, 32)).save(
                    root / cls / f"test/crack/00{i}.png")
                mask = np.zeros((32, 32), np.uint8)
                mask[i: i + 4 + seed] = 255  # a band that tells draws and images apart
                Image.fromarray(mask).save(root / cls / f"ground_truth/crack/00{i}_mask.png")
            (root / cls / "test/.ipynb_checkpoints").mkdir()  # junk: not a defect type
        return root

    first, second, third = (draw(tmp_path / f"s{s}", s) for s in (1, 2, 3))
    out = tmp_path / "pooled"
    assert pool_test_sets.main([str(out), str(first), str(second), str(third)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "a: 12 test images", "b: 12 test images", f"pooled test set ready in {out}"]
    assert sorted(os.listdir(out / "b/test/crack")) == [
        "000.png", "001.png", "d1_000.png", "d1_001.png", "d2_000.png", "d2_001.png"]
    assert os.listdir(out / "b/train/good") == ["000.png"]  # the first draw's training set
    assert np.array_equal(np.asarray(Image.open(out / "b/test/crack/d2_001.png")),
                          np.asarray(Image.open(third / "b/test/crack/001.png")))
    ds = datasets.MVTecTestDataset(str(out), "b", token_size=32, img_size=32,
                                   mean=(0.5,) * 3, std=(0.5,) * 3)
    assert len(ds) == 12
    masks = {os.path.basename(p): int(ds[i]["gt_mask"].sum())
             for i, p in enumerate(ds.image_paths) if "crack" in p}
    assert masks == {"000.png": 5 * 32, "001.png": 5 * 32, "d1_000.png": 6 * 32,
                     "d1_001.png": 6 * 32, "d2_000.png": 7 * 32, "d2_001.png": 7 * 32}

    other = draw(tmp_path / "other", 4, classes=("a", "c"))
    clash = draw(tmp_path / "clash", 5)
    (clash / "a/test/good/000.png").rename(clash / "a/test/good/d1_000.png")
    for argv, words in (([out, first, second], f"{out} exists"),
                        ([tmp_path / "x", first, other], f"{other} holds the classes"),
                        ([tmp_path / "x", clash, second], f"{clash} already holds "
                         "a/test/good/d1_000.png"),
                        ([tmp_path / "x", tmp_path / "nothing", second], "does not exist"),
                        ([tmp_path / "x", first, second, f"{second}/."],
                         f"{tmp_path}/s2/. is given twice ({second})")):
        assert pool_test_sets.main([str(a) for a in argv]) == 2
        assert words in capsys.readouterr().err
        assert not (tmp_path / "x").exists()


def test_pool_test_sets_refuses_one_demo_draw_twice_and_drops_its_marker(
        bench, tmp_path: Path, capsys) -> None:
    """Two folders of one demo seed hold the same test images (pooled, each counted
    twice); draws of other worlds are no one distribution. The pool keeps no demo marker
    of the first draw: it is no one draw, and --make_demo must not write over it."""
    import demo_data
    import pool_test_sets
    made = {}
    for name, seed, area in (("s2", 2, None), ("s3", 3, None), ("again", 2, None),
                             ("big", 4, (0.05, 0.1))):
        made[name] = tmp_path / name
        demo_data.make_demo_dataset(str(made[name]), str(tmp_path / f"{name}_inet"),
                                    seed=seed, classes=["coins"], n_train=1, n_test_good=1,
                                    n_test_defect=1, size=128, defect_area=area)
    assert pool_test_sets.main([str(tmp_path / "x"), str(made["s2"]), str(made["again"])]) == 2
    assert (f"{made['again']} and {made['s2']} are the same draw (seed 2 in their "
            f"{demo_data.MARKER}): pool draws of other seeds") in capsys.readouterr().err
    assert pool_test_sets.main([str(tmp_path / "x"), str(made["s2"]), str(made["big"])]) == 2
    assert "are draws of other worlds" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert pool_test_sets.main([str(tmp_path / "x"), str(made["s2"]), str(made["s3"])]) == 0
    assert not (tmp_path / "x" / demo_data.MARKER).exists()
    assert (made["s2"] / demo_data.MARKER).exists()


def test_pool_test_sets_checks_the_world_not_the_counts_nor_more_classes(
        bench, tmp_path: Path, capsys) -> None:
    """Demo draws of one world with other image counts (a larger test draw) pool; a draw
    that holds a class the first lacks is refused (its images would be left out unseen),
    and so is a first folder with no class: exit 2, nothing written."""
    import demo_data
    import pool_test_sets

    def draw(name: str, seed: int, classes=("a",), n_test: int = 1,
             marker: bool = True) -> Path:
        root = tmp_path / name
        for cls in classes:
            (root / cls / "test" / "good").mkdir(parents=True)
            Image.fromarray(_noise_image(seed, 32)).save(root / cls / "test/good/000.png")
        if not marker:  # a folder of your own
            return root
        (root / demo_data.MARKER).write_text(json.dumps(
            {"world": "main", "seed": seed, "classes": list(classes), "n_train": 2,
             "n_test_good": n_test, "n_test_defect": n_test, "size": 32,
             "defect_area": [0.001, 0.01]}))
        return root

    first, bigger = draw("s1", 1), draw("s2", 2, n_test=5)
    assert pool_test_sets.main([str(tmp_path / "pooled"), str(first), str(bigger)]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "a: 2 test images"
    more = draw("s3", 3, classes=("a", "b"), marker=False)
    (tmp_path / "empty").mkdir()
    for argv, words in (([first, more], f"{more} holds the classes ['a', 'b'], {first} "
                                        "holds ['a']: pool draws of the same world"),
                        ([tmp_path / "empty", first], "empty holds no class with a test/ "
                                                      "folder; expected")):
        assert pool_test_sets.main([str(tmp_path / "x"), *map(str, argv)]) == 2
        assert words in capsys.readouterr().err
        assert not (tmp_path / "x").exists()


@pytest.fixture
def stem(bench):
    import cnn_stem_vit
    return cnn_stem_vit


def _stem_vit(stem, seed: int = 0):
    torch.manual_seed(seed)
    return stem.vit_tiny_lite0_stem(vocab_size=32, img_size=64, depth=2)  # a 4 x 4 grid


def test_cnn_stem_sees_no_masked_pixel(stem) -> None:
    """The masked patches' pixels change no logit (the CNN's receptive field spans
    several patches: they are blanked before it); a visible patch's pixels do."""
    model = _stem_vit(stem).eval()
    x = torch.randn(2, 3, 64, 64)
    masked = torch.zeros(2, 16, dtype=torch.bool)
    masked[:, [5, 6, 10]] = True  # patches (1, 1), (1, 2), (2, 2)
    changed = x.clone()
    changed[:, :, 16:32, 16:48] = torch.randn(2, 3, 16, 32)  # patches 5 and 6
    changed[:, :, 32:48, 32:48] = 5.0  # patch 10
    with torch.no_grad():
        logits = model(x, masked, return_all_tokens=True)  # (N, L, V)
        assert torch.equal(logits, model(changed, masked, return_all_tokens=True))
        visible = x.clone()
        visible[:, :, 0:16, 0:16] += 1.0  # patch 0, not masked
        moved = (model(visible, masked, return_all_tokens=True) - logits).abs()
    assert moved[:, 5].max() > 1e-4  # a masked patch's prediction reads its neighbour
    assert model.patch_embed.bool_masked_pos is None  # nothing kept between calls


def test_cnn_stem_stays_frozen_in_training(stem) -> None:
    """train() keeps Lite0 in eval mode (ImageNet's batch-norm statistics) and a step
    trains only the projection and the transformer."""
    model = _stem_vit(stem).train()
    backbone = model.patch_embed.backbone
    running = {k: v.clone() for k, v in backbone.state_dict().items()}
    assert not backbone.training and model.patch_embed.proj.training and model.blocks.training
    masked = torch.rand(2, 16) < 0.5
    masked[:, 0] = True
    model(torch.randn(2, 3, 64, 64), masked).logsumexp(-1).mean().backward()
    assert all(p.grad is None and not p.requires_grad for p in backbone.parameters())
    assert model.patch_embed.proj.weight.grad.abs().sum() > 0
    assert all(torch.equal(v, backbone.state_dict()[k]) for k, v in running.items())


def test_cnn_stem_checkpoint_loads_exactly(stem, tmp_path: Path) -> None:
    """A saved stem ViT, Lite0 included, loads into a fresh one with no key left over."""
    import modeling_pmad
    model = _stem_vit(stem, seed=0).eval()
    torch.save({"model": model.state_dict()}, tmp_path / "ckpt.pth")
    fresh = _stem_vit(stem, seed=1).eval()
    assert modeling_pmad.load_checkpoint(fresh, tmp_path / "ckpt.pth", strict=True) == {
        "missing": [], "unexpected": []}
    x, masked = torch.randn(1, 3, 64, 64), torch.rand(1, 16) < 0.3
    with torch.no_grad():
        assert torch.equal(model(x, masked, True), fresh(x, masked, True))


def test_cnn_stem_runs_an_entry_point_with_its_model(stem, monkeypatch: pytest.MonkeyPatch,
                                                     capsys) -> None:
    """The wrapper makes vit_tiny_lite0_stem a --model choice of the script it runs
    (run_test.py, and bench/score_variants.py, which imports a bench module, --help) in
    PMAD's layout, and refuses any other script; its own --help is its docstring."""
    import modeling_pmad
    monkeypatch.setattr(modeling_pmad, "PMAD_MODELS", dict(modeling_pmad.PMAD_MODELS))
    monkeypatch.setattr(modeling_pmad, "MODEL_CONFIGS", dict(modeling_pmad.MODEL_CONFIGS))
    monkeypatch.setattr("sys.argv", ["x"])
    monkeypatch.setattr("sys.path", list(sys.path))
    for script in ("run_test.py", "bench/score_variants.py"):
        with pytest.raises(SystemExit) as done:
            stem.main([script, "--help"])
        assert done.value.code == 0 and stem.MODEL in capsys.readouterr().out, script
    model = modeling_pmad.build_pmad(stem.MODEL, vocab_size=8, img_size=32)
    assert isinstance(model.patch_embed, stem.Lite0Stem) and model.pos_embed is None
    assert model.rel_pos_bias is not None  # shared relative position bias
    with pytest.raises(UserError, match=r"usage: python bench/cnn_stem_vit.py"):
        stem.main(["engine.py"])
    for flag in ("-h", "--help"):  # its own help: the docstring, with the commands
        stem.main([flag])
        assert capsys.readouterr().out == stem.__doc__ + "\n"


def test_cnn_stem_projection_starts_as_the_vits_own_init(stem) -> None:
    """The trained 1 x 1 projection starts at the ViT's init_std (normal, as the ViT's
    other weights), with zero bias: not Conv2d's default uniform init."""
    model = _stem_vit(stem)
    proj = model.patch_embed.proj
    assert model.init_std == 0.02 and proj.weight.shape[0] == model.embed_dim
    assert proj.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert torch.equal(proj.bias, torch.zeros_like(proj.bias))


def test_cnn_stem_refuses_a_patch_size_other_than_lite0_stride(stem) -> None:
    """Lite0's stage 3 has stride 16: a stem of 8-pixel patches would give one feature per
    4 patches, so it is refused."""
    with pytest.raises(ValueError, match="Lite0 stage 3 does not have stride 8"):
        stem.Lite0Stem(192, img_size=64, patch_size=8)


def test_cnn_stem_takes_a_script_path_as_typed(stem, monkeypatch: pytest.MonkeyPatch,
                                                capsys) -> None:
    """./run_test.py (as a shell completes it) names the same script as run_test.py."""
    import modeling_pmad
    monkeypatch.setattr(modeling_pmad, "PMAD_MODELS", dict(modeling_pmad.PMAD_MODELS))
    monkeypatch.setattr(modeling_pmad, "MODEL_CONFIGS", dict(modeling_pmad.MODEL_CONFIGS))
    monkeypatch.setattr("sys.argv", ["x"])
    monkeypatch.setattr("sys.path", list(sys.path))
    with pytest.raises(SystemExit) as done:
        stem.main(["./run_test.py", "--help"])
    assert done.value.code == 0 and stem.MODEL in capsys.readouterr().out


def test_cnn_stem_keeps_the_callers_sizes_and_registers_its_patch_size(
        stem, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The caller's depth, vocabulary and layer scale (build_pmad's init_values) win over
    the base ViT's; once registered, the entry points' checks read its patch size (16:
    a 224 px input is a 14 x 14 grid, 200 px is refused)."""
    import argparse

    import modeling_pmad
    import run_pretraining
    from utils import FlagError
    model = _stem_vit(stem)
    assert len(model.blocks) == 2 and model.lm_head.out_features == 32
    monkeypatch.setattr(modeling_pmad, "PMAD_MODELS", dict(modeling_pmad.PMAD_MODELS))
    monkeypatch.setattr(modeling_pmad, "MODEL_CONFIGS", dict(modeling_pmad.MODEL_CONFIGS))
    stem.register()
    built = modeling_pmad.build_pmad(stem.MODEL, vocab_size=8, img_size=32, init_values=1e-5)
    assert torch.equal(built.blocks[0].gamma_1, torch.full((192,), 1e-5))
    args = argparse.Namespace(model=stem.MODEL, input_size=224, tokenizer_model="kmeans",
                              fit_kmeans_tokenizer=True,
                              tokenizer_weight_path=str(tmp_path / "to_fit.pth"))
    assert run_pretraining.check_image_grid(args) == 14
    args.input_size = 200
    with pytest.raises(FlagError, match="vit_tiny_lite0_stem's patch size 16"):
        run_pretraining.check_image_grid(args)
