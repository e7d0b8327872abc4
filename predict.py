r"""Score new images with a trained PMAD: no ground truth, no MVTec layout.

    python predict.py path/to/images --class_name bottle \
        --ckpt output_dir/multi_class/checkpoint-last.pth \
        --tokenizer_weight_path weights/tokenizer \
        --protoflow_weights weights/protoflow/multi_class.pt --prototypes_dir weights/prototypes \
        --output_dir output_dir/predict --maps

Inputs are folders (searched recursively), image files or glob patterns. Each image is
scored exactly as run_test.py's clean protocol scores a test image (protocols.clean_scores,
the same flags and defaults): `predictions.csv` holds per image its PMAD score, its
ProtoFlow score, ProtoFlow's stored normal-data threshold for the class and ProtoFlow's
decision at it (PMAD's score has no threshold of its own); `predictions.json` the same
rows with the run's flags and files and a per-class summary. ProtoFlow's abnormality map,
and so PMAD's map and score, is normalised over the images of a class given together
(docs/method.md 6): they are one normalisation set, as a class's test set is in
run_test.py. ProtoFlow's score and the decision depend on the image alone.
"""
from __future__ import annotations

import argparse
import csv
import fnmatch
import glob
import hashlib
import json
import os
import shutil
import sys
import unicodedata
from pathlib import Path

import numpy as np

import datasets
import heatmaps
import protocols
import reporting
import run_test
import scoring_models
import utils
from masking_generator import class_mask_ratio

# the decision is ProtoFlow's, at its stored threshold: PMAD's score has no threshold
OUTPUT_COLUMNS = ("image", "class", "name", "pmad_score", "protoflow_score", "threshold",
                  "protoflow_decision", "scored_with")
# the columns of earlier versions' predictions.csv: their run folders are outputs too
EARLIER_COLUMNS = (("image", "class", "name", "pmad_score", "protoflow_score", "threshold",
                    "decision"),)
PREDICTIONS_FILE = "predictions.csv"  # put in place last: a whole run's outputs are there
# the same rows with the run's flags and files and a per-class summary, for programs
PREDICTIONS_JSON = "predictions.json"
SKIPPED_FILE = "skipped_images.txt"  # the images --skip_bad_images left out, if any
# one run's outputs, set aside in this order: predictions.csv last, as a crash between
# two moves must not leave heatmaps/ without it (check_output_dir would refuse them)
OUTPUTS = (SKIPPED_FILE, "heatmaps", "maps", PREDICTIONS_JSON, PREDICTIONS_FILE)
MAX_NAME_BYTES = 200  # an output name's limit, below the file systems' 255 with suffixes


class InputError(utils.UserError, ValueError):
    """A path or glob given to predict.py that names no usable image."""


def _is_image(path: str) -> bool:
    return datasets.is_image_name(os.path.basename(path))


def _glob_base(pattern: str) -> str:
    """The folder part of a glob pattern before its first wildcard."""
    parts = Path(pattern).parts
    fixed = []
    for part in parts:
        if glob.has_magic(part):
            break
        fixed.append(part)
    return str(Path(*fixed)) if fixed else "."


def _missed_by_case(pattern: str, found: list[str]) -> list[str]:
    """Images in the folders of `pattern` that its last part matches only case-folded
    (dir/IMG.PNG for 'dir/*.png'), sorted: named in a note, not taken. Glob patterns
    stay case-sensitive, as the shell's are: matching by case-folding would take more
    than was typed ('IMG_*' would take img_*), only what the pattern missed is new. A
    file is compared by identity (a case-insensitive file system returns a literal part
    as typed), and a folder that cannot be listed is passed over, as glob does."""
    folder, last = os.path.split(pattern)
    folders = glob.glob(folder, recursive=True) if glob.has_magic(folder) else [folder]
    taken = {_identity(f) for f in found}
    missed = []
    for d in folders:
        try:
            names = sorted(os.listdir(d or "."))
        except OSError:
            continue
        for name in names:
            path = os.path.join(d, name)
            if (_is_image(name) and fnmatch.fnmatchcase(name.lower(), last.lower())
                    and os.path.isfile(path) and _identity(path) not in taken):
                missed.append(path)
    return sorted(missed)


def _identity(path: str) -> tuple[int, int] | str:
    """Which file `path` is: (device, inode), so that two spellings of one file compare
    equal (a link, a hard link, another case on a case-insensitive file system); its
    real path where it cannot be read (a link to nothing)."""
    try:
        st = os.stat(path)
    except OSError:
        return os.path.realpath(path)
    return st.st_dev, st.st_ino


def _other_files(files: list[str]) -> list[str]:
    """The files among `files` that are not images nor a system's: named in a note, so
    that an image of another type (.webp) is not left out unseen."""
    return [f for f in files if not _is_image(f)
            and not datasets.is_junk_file(os.path.basename(f)) and os.path.isfile(f)]


def _walk_images(folder: str, keep_dangling: bool = False) -> tuple[list[str], list[str]]:
    """The image files below `folder`, sorted, and the other files (_other_files).
    Symlinked sub-folders that lead out of `folder` are followed (a class linked in must
    not vanish; glob patterns follow them too), each real folder once; a link to a folder
    inside `folder` is not, so that folder keeps its own name (and a link back up ends
    nothing); junk folders (hidden, __MACOSX) are skipped. `keep_dangling`: see
    _existing."""
    visited = {os.path.realpath(folder)}
    files, others = [], []
    for parent, dirs, names in os.walk(folder, followlinks=True):
        kept = []
        for d in sorted(dirs):
            path = os.path.join(parent, d)
            real = os.path.realpath(path)
            if os.path.islink(path) and _walked_anyway(real, folder):
                continue
            if not datasets.is_junk_dir(d) and real not in visited:
                visited.add(real)
                kept.append(d)
        dirs[:] = kept
        # a link to a missing folder (a class) is among `names` too: refused with them,
        # unless it is a hidden or junk name (an editor's lock file links nowhere)
        files += [str(Path(parent, n)) for n in names if _is_image(n) or (
            not datasets.is_junk_dir(n) and datasets.dangling_link(os.path.join(parent, n)))]
        others += _other_files([str(Path(parent, n)) for n in names])
    return _existing(sorted(files), keep_dangling), sorted(others)


def _existing(files: list[str], keep_dangling: bool = False) -> list[str]:
    """`files` (image names found by a walk or a glob) that are files; a link to a
    missing file or folder is an InputError naming it and its target, not an image or a
    class left out. With `keep_dangling` (--skip_bad_images) an image's link is kept, for
    the dataset to list in skipped_images.txt as it does an unreadable image, and any
    other link to nothing is named on stderr and left out."""
    kept = {f for f in files if keep_dangling and _is_image(f)}
    dangling = [link for f in files if f not in kept and (link := datasets.dangling_link(f))]
    if dangling:
        listed = utils.bullet_list(dangling)
        if not keep_dangling:
            raise InputError(f"{len(dangling)} link(s) lead nowhere:{listed}"
                             f"\nFix: {datasets.FIX_DANGLING}")
        print(f"[predict] left out {len(dangling)} link(s) to nothing:{listed}", file=sys.stderr)
    return [f for f in files if os.path.isfile(f) or f in kept]


def _walked_anyway(real: str, folder: str) -> bool:
    """Whether the walk of `folder` reaches the real folder `real` by its own name: it
    lies inside `folder`, under no junk folder (a link to .versions/coins_v3 is how
    that class is reached)."""
    if not utils.is_inside(real, folder):
        return False
    rel = Path(os.path.relpath(real, os.path.realpath(folder)))
    return not any(datasets.is_junk_dir(part) for part in rel.parts)


def _has_earlier_run(output_dir: str | os.PathLike) -> bool:
    """Whether an earlier run's outputs are in `output_dir`: its predictions.csv, which
    a run puts in place last, after its heatmaps/ and maps/."""
    return os.path.isfile(os.path.join(output_dir, PREDICTIONS_FILE))


def _is_run_folder(folder: str) -> bool:
    """Whether `folder` holds a predict.py run's outputs: a predictions.csv of our
    columns, or an earlier version's (a user's own file of that name is not ours)."""
    try:
        with open(os.path.join(folder, PREDICTIONS_FILE), encoding="utf-8",
                  errors="replace") as f:
            return f.readline().rstrip("\r\n") in {",".join(c) for c in (OUTPUT_COLUMNS,
                                                                          *EARLIER_COLUMNS)}
    except OSError:
        return False


class EarlierRuns:
    """Which files an earlier predict.py run wrote into the inputs (its --output_dir was
    inside an input folder, perhaps not this run's): its predictions.csv and skipped-images
    list, and what lies in its heatmaps/ and maps/. Such a run's heatmaps are no input;
    each folder is looked at once."""

    def __init__(self) -> None:
        self._run: dict[str, bool] = {}
        self._inside: dict[str, str | None] = {}

    def _is_run(self, folder: str) -> bool:
        if folder not in self._run:
            self._run[folder] = _is_run_folder(folder)
        return self._run[folder]

    def _outputs_of(self, folder: str) -> str | None:
        """The run whose heatmaps/ or maps/ `folder` is, or lies in; else None."""
        if folder not in self._inside:
            parent = os.path.dirname(folder)
            self._inside[folder] = None if parent == folder else (
                parent if os.path.basename(folder) in ("heatmaps", "maps")
                and self._is_run(parent) else self._outputs_of(parent))
        return self._inside[folder]

    def run_of(self, path: str) -> str | None:
        """The earlier run's folder that wrote `path`, or None."""
        folder = os.path.dirname(os.path.abspath(path))
        run = self._outputs_of(folder)
        if run is None and os.path.basename(path) in OUTPUTS and self._is_run(folder):
            run = folder
        return run


def _is_own_output(path: str, output_dir: str) -> bool:
    """Whether `path` lies in what predict.py wrote in `output_dir` (previous-*/, and
    heatmaps/ and maps/ beside an earlier run's predictions.csv): an earlier run's
    heatmaps are no input, whatever the folders given; a user's own maps/ is."""
    if not utils.is_inside(path, output_dir):
        return False
    top = Path(os.path.relpath(os.path.realpath(path), os.path.realpath(output_dir))).parts[0]
    return (top.startswith(utils.PREVIOUS_RUN_PREFIX)
            or top in OUTPUTS and _has_earlier_run(output_dir))


def check_output_dir(output_dir: Path) -> None:
    """A heatmaps/, maps/ or skipped-images list in `output_dir` without an earlier run's
    predictions.csv is not predict.py's: refuse, rather than mix our files into it or
    set it aside as if it were ours."""
    if _has_earlier_run(output_dir):
        return
    foreign = [name for name in OUTPUTS
               if name != PREDICTIONS_FILE and os.path.lexists(output_dir / name)]
    if foreign:
        raise InputError(f"{output_dir / foreign[0]} is not an earlier predict.py run's output "
                         f"(no {PREDICTIONS_FILE} beside it): give another --output_dir, or move "
                         "it away")


def _expand(spec: str, keep_dangling: bool = False
            ) -> tuple[str, list[str], bool, list[str]]:
    """(base folder, image files, is_folder, other files) of one input: a folder
    (recursive), an image file or a glob pattern. `keep_dangling`: see _existing."""
    if os.path.isdir(spec):
        files, others = _walk_images(spec, keep_dangling)
        return spec, files, True, others
    if os.path.isfile(spec):
        if not _is_image(spec):
            raise InputError(f"{spec} is not an image file ({'/'.join(datasets.IMAGE_EXTENSIONS)})")
        return os.path.dirname(spec) or ".", [spec], False, []
    if glob.has_magic(spec):
        found = sorted(glob.glob(spec, recursive=True))
        files = _existing([f for f in found if _is_image(f)], keep_dangling)
        missed = _missed_by_case(spec, found)
        if missed:
            names = [os.path.relpath(f, _glob_base(spec)) for f in missed]
            print(f"[predict] {spec}: left out {len(missed)} image(s) that match it but for "
                  f"case ({utils.some_names(names, 3)}): a glob pattern is case-sensitive; "
                  "match both cases, e.g. '*.[pP][nN][gG]'", file=sys.stderr)
        return _glob_base(spec), files, False, _other_files(found)
    raise InputError(f"{spec} does not exist: give a folder, an image file or a glob pattern "
                     "(quote it, e.g. 'images/*.png')")


def find_images(inputs: list[str], class_name: str | None, class_from_folder: bool,
                output_dir: str | None = None, keep_dangling: bool = False
                ) -> dict[str, list[tuple[str, str]]]:
    """{class: [(image path, name)]}. The name is the image's path below its input's
    folder, separators as '_' and without extension (MVTec test trees give run_test.py's
    '<defect>_<stem>'); it names the heatmap and .npy files.

    With `class_from_folder` the class is the first folder below a folder input, or the
    image's parent folder for files and glob patterns. What predict.py wrote in
    `output_dir`, or in any earlier run's output folder inside an input (EarlierRuns), is
    never an input. An image's link to a missing file is an InputError, or with `keep_dangling`
    (--skip_bad_images) an image the dataset leaves out and lists. A file reached twice
    in one class (a link or hard link to it, inputs that overlap; `_identity`) is scored
    once there and named on stderr; in another class it is that class's image too."""
    groups: dict[str, list[tuple[str, str]]] = {}
    seen: set[tuple[str | None, object]] = set()  # (class, _identity): a file once a class
    again: list[str] = []
    earlier = EarlierRuns()
    for spec in inputs:
        base, files, is_folder, others = _expand(spec, keep_dangling)
        runs = {f: earlier.run_of(f) for f in files + others}
        own = {f for f in files + others if runs[f] is None and output_dir is not None
               and _is_own_output(f, output_dir)}
        found = {runs[f] for f in files + others if runs[f] is not None}
        files = [f for f in files if runs[f] is None and f not in own]
        others = [f for f in others if runs[f] is None and f not in own]
        if found:
            print(f"[predict] {spec}: left out what earlier predict.py run(s) wrote there "
                  f"(their heatmaps, maps and predictions.csv): {', '.join(sorted(found))}",
                  file=sys.stderr)
        datasets.note_left_out(spec, [os.path.relpath(f, base) for f in others])
        if not files:
            raise InputError(f"no images ({'/'.join(datasets.IMAGE_EXTENSIONS)}) in {spec}"
                             + (" but what earlier predict.py run(s) wrote: give the folder "
                                "of the images to score" if found else ""))
        for f in files:
            rel = Path(os.path.relpath(f, base))
            if class_from_folder:
                if is_folder:
                    if len(rel.parts) < 2:
                        raise InputError(f"{f} lies directly in {spec}; with "
                                         f"--class_from_folder put images in {spec}/<class>/")
                    cls, rel = rel.parts[0], Path(*rel.parts[1:])
                else:
                    cls = Path(os.path.abspath(f)).parent.name  # 'top.png' has parent ''
            else:
                cls = class_name
            if (cls, _identity(f)) in seen:
                again.append(f)
                continue
            seen.add((cls, _identity(f)))
            groups.setdefault(cls, []).append((f, _file_stem(rel)))
    if again:
        print(f"[predict] {len(again)} image(s) reached a second time (a link or hard link, "
              f"or inputs that overlap) are scored once in their class:"
              f"{utils.bullet_list(again)}",
              file=sys.stderr)
    return _unique_per_class(groups)


def _unique_per_class(groups: dict[str, list[tuple[str, str]]]
                      ) -> dict[str, list[tuple[str, str]]]:
    """The names name a class's output files: made unique within each class."""
    return {cls: list(zip([f for f, _ in items], unique_names([n for _, n in items])))
            for cls, items in groups.items()}


def check_class_name(name: str) -> str:
    """--class_name without the separator a shell's completion of a folder leaves
    ('bottle/'); a path is refused: the class is a folder's name."""
    stripped = name.rstrip("/" + os.sep)
    if not name:
        raise utils.FlagError("--class_name is empty: pass the class's name, its folder's "
                              "under --prototypes_dir (e.g. bottle)")
    if stripped in ("", ".", "..") or "/" in stripped or os.sep in stripped:
        raise utils.FlagError(f"--class_name {name!r} is a path: pass the class's name, "
                              "its folder's under --prototypes_dir (e.g. bottle)")
    return stripped


def as_prototyped(groups: dict[str, list[tuple[str, str]]], prototypes_dir: str
                  ) -> dict[str, list[tuple[str, str]]]:
    """`groups` with each class named as its prototypes folder is. The name picks the
    class's threshold, its Table 6 mask ratio and its row in predictions.csv, while a
    macOS or Windows file system finds the folder by a name in another case ('Bottle'),
    and macOS stores names decomposed (NFD) where a shell types them composed (NFC,
    datasets.as_found): such a class was scored with the prototypes of 'bottle' but
    another threshold and ratio. A name matching a folder only so is said; classes of
    one folder are joined."""
    found = os.listdir(prototypes_dir) if os.path.isdir(prototypes_dir) else []
    folded: dict[str, list[str]] = {}
    for f in found:
        folded.setdefault(unicodedata.normalize("NFC", f).casefold(), []).append(f)
    out: dict[str, list[tuple[str, str]]] = {}
    for cls, items in groups.items():
        name = datasets.as_found([cls], found)[0]
        same = folded.get(unicodedata.normalize("NFC", name).casefold(), [])
        if name not in found and len(same) == 1:
            print(f"[predict] class '{cls}': scored as '{same[0]}', the name of its "
                  f"prototypes folder in {prototypes_dir}", file=sys.stderr)
            name = same[0]
        out.setdefault(name, []).extend(items)
    return _unique_per_class(out)


# folders inside a class's folder: a class taken from one was taken a level too low
CLASS_INNER_FOLDERS = (*datasets.NORMAL_DIRS, "train", "test", "ground_truth")


def check_folder_classes(groups: dict[str, list[tuple[str, str]]], prototypes_dir: str
                         ) -> None:
    """--class_from_folder classes named as a folder inside a class's folder (good/ or
    ok/ of normal images, the MVTec layout's train/ and test/) that have no prototypes:
    the input was one class's folder (DIR/<class>/ with good/ and defect folders) or a
    glob or files in its good/, so the class was taken a level too low. Refused before
    the models load, saying so, rather than told to make prototypes for a class 'good'."""
    if not os.path.isdir(prototypes_dir):
        return  # named when the models load
    found = set(os.listdir(prototypes_dir))
    missing = [c for c in groups if c not in found]
    inner = next((c for c in missing if c.casefold() in CLASS_INNER_FOLDERS), None)
    if inner is None:
        return  # a class of its own: the models' check names the prototypes to make
    parts = Path(os.path.abspath(groups[inner][0][0])).parts
    below = [k for k, part in enumerate(parts[:-1]) if part.casefold() == inner.casefold()]
    up = below[-1] - 1 if below else -1
    while up >= 0 and parts[up].casefold() in CLASS_INNER_FOLDERS:  # <class>/test/good/
        up -= 1
    example = parts[up] if up >= 0 else "CLASS"
    raise InputError(
        f"--class_from_folder took {', '.join(repr(c) for c in missing)} as class(es), "
        f"which have no prototypes in {prototypes_dir} (its classes: "
        f"{', '.join(sorted(found)) or 'none'}): the class is the first folder below a "
        "folder input, or an image's parent folder for files and glob patterns, and "
        f"'{inner}' is a folder inside a class's folder. Give the folder holding the class "
        f"folders, or --class_name for one class (e.g. --class_name {example})")


def _file_stem(rel: Path) -> str:
    """The output name of the image at `rel` below its input: its folders and stem joined
    by '_'; one too long for a file name (deep folders) keeps its first 150 bytes and a
    hash of the whole, which keeps it unique."""
    name = "_".join(rel.with_suffix("").parts)
    raw = name.encode("utf-8", "surrogateescape")
    if len(raw) <= MAX_NAME_BYTES:
        return name
    return (raw[:150].decode("utf-8", "ignore") + "_"
            + hashlib.sha256(raw).hexdigest()[:16])


def unique_names(names: list[str]) -> list[str]:
    """`names` made unique, as they name a class's output files: a repeated name gets
    the first `_<k>` suffix (k = 2, 3, ...) that no other name has or gets, so 'a/b.png',
    'a_b.png', 'a_b_2.png' give a_b, a_b_3, a_b_2 and no file overwrites another. Names
    are compared case-folded: on macOS' and Windows' file systems 'A.png' and 'a.png' are
    one file."""
    taken, seen, unique = {n.casefold() for n in names}, set(), []
    for name in names:
        new, k = name, 1
        while name.casefold() in seen and new.casefold() in taken:
            k += 1
            new = f"{name}_{k}"
        taken.add(new.casefold())
        seen.add(name.casefold())
        unique.append(new)
    return unique


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("PMAD prediction on new images", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="IMAGES",
                   help="folders (searched recursively), image files or glob patterns")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--class_name", help="the class of every image (its prototypes are "
                                            "<prototypes_dir>/<class>/coreset.npy)")
    which.add_argument("--class_from_folder", action="store_true",
                       help="the class is the first folder below each input folder (the "
                            "parent folder for files and glob patterns)")
    run_test.add_model_args(p)
    run_test.add_clean_args(p)
    p.add_argument("--output_dir", default="output_dir/predict", help="default %(default)s")
    p.add_argument("--maps", action="store_true",
                   help="write one heatmap PNG per image: image | score map with colour "
                        "bar, one scale per class, caption with scores and decision")
    p.add_argument("--save_npy", action="store_true",
                   help="write each image's PMAD score map as float32 .npy (S x S)")
    return p


def predict(args: argparse.Namespace) -> list[dict[str, object]]:
    """Each class's images scored as the clean protocol does: rows of predictions.csv.
    The outputs are written to a hidden staging folder and put in place only when every
    class is done, the earlier run's then set aside: a run that fails leaves the folder
    as it was."""
    run_test.check_device_flags(args)
    options = run_test.clean_options(args)
    if args.class_name is not None:
        args.class_name = check_class_name(args.class_name)
    groups = as_prototyped(find_images(args.inputs, args.class_name, args.class_from_folder,
                                       args.output_dir, keep_dangling=args.skip_bad_images),
                           args.prototypes_dir)
    if args.class_from_folder:
        check_folder_classes(groups, args.prototypes_dir)
    out_dir = Path(utils.prepare_output_dir(args.output_dir, "--output_dir"))
    # one evaluation there at a time (run_test.py's too), locked before what it finds is
    # read: a run putting its outputs in place leaves them half-moved for a moment
    with utils.RunLock(str(out_dir), "--output_dir", utils.EVAL_LOCK):
        check_output_dir(out_dir)
        return _predict_into(out_dir, args, options, groups)


def _predict_into(out_dir: Path, args: argparse.Namespace, options: protocols.CleanOptions,
                  groups: dict[str, list[tuple[str, str]]]) -> list[dict[str, object]]:
    """predict, once the inputs are found and --output_dir is ours."""
    utils.remove_stale_tmp_files(out_dir)  # a staging folder of a run that was killed
    m = run_test.load_models(args, "predict")
    m.protoflow.check_prototypes(list(groups))  # a missing class fails before any scoring
    run_test.check_mask_ratios(args, list(groups), m.model.patch_embed.num_patches)
    stage = Path(utils.tmp_name(str(out_dir / "predict")))
    shutil.rmtree(stage, ignore_errors=True)  # a dead run's of this same pid (containers)
    stage.mkdir()
    try:
        rows, skipped = _score_into(stage, args, m, groups, options)
        earlier = utils.set_aside(out_dir, OUTPUTS)  # no heatmap of another run beside ours
        # predictions.csv last: where it is, the run's outputs are complete
        for name in sorted(os.listdir(stage), key=lambda n: n == PREDICTIONS_FILE):
            os.replace(stage / name, out_dir / name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    if earlier:
        print(f"[predict] the earlier run's outputs in {out_dir} moved to {earlier}")
    if skipped:
        # not all unreadable: an image of an extreme shape is refused too
        print(f"[predict] left out {len(skipped)} image(s) it could not score, each listed "
              f"with its reason in {out_dir / SKIPPED_FILE}")
    for cls in sorted({str(r["class"]) for r in rows}):  # a class left out is named above
        mine = [r for r in rows if r["class"] == cls]
        called = sum(r["protoflow_decision"] == "anomalous" for r in mine)
        decided = any(r["protoflow_decision"] for r in mine)
        print(f"[predict] {cls}: {len(mine)} images, "
              + (f"{called} anomalous by ProtoFlow's score at its threshold" if decided
                 else "no decision (no threshold)"))
    print(f"predictions: {out_dir / PREDICTIONS_FILE}, {out_dir / PREDICTIONS_JSON}"
          + (f"; heatmaps: {out_dir / 'heatmaps'}" if args.maps else "")
          + (f"; maps: {out_dir / 'maps'}" if args.save_npy else ""))
    return rows


def _score_into(out: Path, args: argparse.Namespace, m: scoring_models.Models,
                groups: dict[str, list[tuple[str, str]]], options: protocols.CleanOptions
                ) -> tuple[list[dict[str, object]], list[str]]:
    """Score every class, writing predictions.csv (and the skipped list, heatmaps and
    maps) under `out`. -> (the CSV's rows, the images left out). With --skip_bad_images a
    class of no readable image is left out, named on stderr, its files in the skipped
    list; the other classes are scored."""
    rows: list[dict[str, object]] = []
    skipped: list[str] = []
    unreadable: list[str] = []  # the classes of no readable image
    for cls in utils.progress(sorted(groups), desc="classes", disable=len(groups) < 2):
        paths, names = zip(*groups[cls])
        try:
            dataset = m.dataset(paths, names, skip_bad_images=args.skip_bad_images,
                                what=f"images of class '{cls}'")
        except datasets.NoReadableImageError as e:
            skipped += e.bad_files
            unreadable.append(cls)
            print(f"[predict] {cls}: none of its {len(paths)} image(s) is readable: class "
                  "left out (its files are named in the warning above)", file=sys.stderr)
            continue
        skipped += dataset.bad_files
        data = protocols.collect_class(dataset, m.tokenizer, m.protoflow, cls, args.batch_size,
                                      m.device, args.num_workers)
        threshold = m.protoflow.threshold_for(cls)
        ratio = class_mask_ratio(cls, args.mask_ratio, args.default_mask_ratio)
        scores = protocols.clean_scores(m.model, data, ratio=ratio, threshold=threshold,
                                       options=options, sigma=args.sigma,
                                       batch_size=args.batch_size, device=m.device, amp=m.amp,
                                       seed=args.seed)
        scale = heatmaps.ColourScale.of(scores.maps) if args.maps else None
        for i, name in enumerate(data.names):
            caption = heatmaps.Caption(name, float(scores.image_scores[i]),
                                       float(scores.protoflow_scores[i]), threshold)
            rows.append({"image": dataset.image_paths[i], "class": cls, "name": name,
                         "pmad_score": caption.pmad_score,
                         "protoflow_score": caption.protoflow_score,
                         "threshold": "" if threshold is None else threshold,
                         "protoflow_decision": caption.decision or "",
                         # the class's images scored together: PMAD's score depends on them
                         "scored_with": len(data.names)})
            if scale is not None:
                heatmaps.save_one(data.images[i], [heatmaps.pmad_panel(scores.maps[i], scale)],
                                  caption, out / "heatmaps" / cls / f"{name}.png", m.mean,
                                  m.std)
            if args.save_npy:
                path = out / "maps" / cls / f"{name}.npy"
                path.parent.mkdir(parents=True, exist_ok=True)
                np.save(path, scores.maps[i].numpy().astype(np.float32))
        if threshold is None and m.protoflow.threshold is None:  # else withheld, said above
            print(f"[predict] {args.protoflow_weights} stores no normal-data threshold for "
                  f"'{cls}' (a released file): scores only, no decision")
    if not rows:
        raise datasets.BadFileError(f"no class has a readable image ({', '.join(unreadable)}; "
                                    "the files are named in the warnings above)")
    # a file name that is not UTF-8 is written as its bytes, so the path still opens
    with open(out / PREDICTIONS_FILE, "w", newline="", encoding="utf-8",
              errors="surrogateescape") as f:
        writer = csv.DictWriter(f, fieldnames=OUTPUT_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    if skipped:
        (out / SKIPPED_FILE).write_text("\n".join(skipped) + "\n", encoding="utf-8",
                                        errors="surrogateescape")
    (out / PREDICTIONS_JSON).write_text(predictions_json(args, m, rows, skipped))
    return rows, skipped


def predictions_json(args: argparse.Namespace, m: scoring_models.Models,
                     rows: list[dict[str, object]], skipped: list[str]) -> str:
    """predictions.json: the run's flags and scoring files, each class's image count,
    threshold and ProtoFlow's anomalous calls, and the CSV's rows, with null for no
    threshold or decision (the CSV's empty cells). A name that is not UTF-8 is written
    escaped ('\\udce9'), as JSON holds text only."""
    images = [{k: (None if v == "" else v) for k, v in r.items()} for r in rows]
    classes = {}
    for cls in sorted({str(r["class"]) for r in images}):
        mine = [r for r in images if r["class"] == cls]
        decided = mine[0]["protoflow_decision"] is not None
        classes[cls] = {"images": len(mine), "threshold": mine[0]["threshold"],
                        "protoflow_anomalous": sum(r["protoflow_decision"] == "anomalous"
                                                   for r in mine) if decided else None}
    record = {"flags": vars(args), "files": {"ckpt": args.ckpt,
                                             "protoflow_weights": m.protoflow_path,
                                             "prototypes_dir": args.prototypes_dir},
              "device": str(m.device), "amp": m.amp, "classes": classes,
              "skipped_images": skipped, "images": images}
    return json.dumps(reporting.finite_or_null(record), indent=1, allow_nan=False,
                      default=str)  # a flag's value of another type, as its text


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    return utils.cli(lambda: predict(args))  # 0, 2 for a user's mistake, 130 for Ctrl-C


if __name__ == "__main__":
    sys.exit(main())
