"""Other data sets into the MVTec layout every PMAD tool reads (setup_train_dataset.py
--visa / --custom).

  VisA:    <visa>/split_csv/1cls.csv + <visa>/<class>/Data/{Images,Masks}/...
           -> <out>/<class>/{train/good, test/good, test/bad, ground_truth/bad}
  custom:  <src>/<class>/good/* and optionally <src>/<class>/<defect>/* (no masks)
           -> <out>/<class>/{train/good, test/good, test/<defect>}, no ground_truth/

Before anything is written, the layout (or split file), every file it names (VisA's
masks readable and of their image's aspect ratio) and every image's header (an empty
file, or one that is no image) are checked, and one error lists every problem. An image
cut short after its header, or of content datasets.open_rgb refuses (a 16-bit one of
8-bit values), is found only when it is read (at mask estimation or training).
A custom class's train/ and test/ folders in the output hold exactly its latest split: a
re-run removes what the new split no longer lists there, in the class folders it wrote
(CUSTOM_MARKER) only; a re-run of every class also removes the class folders it wrote
from the same source that the source no longer has.
"""
from __future__ import annotations

import csv
import os
import shutil
import sys
from collections import Counter
from pathlib import Path
from typing import Callable, Sequence

from PIL import Image, UnidentifiedImageError

from datasets import (MASK_FOLDER, NORMAL_DIRS, TEST_LAYOUT, VISA_CLASSES, LayoutError,
                      as_found, data_subdirs, hint_subdirs, is_image_name, is_junk_dir,
                      is_junk_file, list_images, loose_images, mask_problem, open_mask,
                      too_large)
from utils import some_names, write_atomic

VISA_SPLIT = os.path.join("split_csv", "1cls.csv")
VISA_COLUMNS = ["object", "split", "label", "image", "mask"]
VISA_LAYOUT = ("<visa>/split_csv/1cls.csv (columns object, split, label, image, mask) and "
               "the files it names, e.g. <visa>/candle/Data/Images/Normal/0000.JPG")
CUSTOM_LAYOUT = "<custom>/<class>/good/*.png and optionally <custom>/<class>/<defect>/*.png"
DEFAULT_TEST_FRACTION = 0.2
# Training images a class needs: run_protoflow.py holds out at least one of them (its
# --holdout 0.1, datasets.holdout_split) and refuses a class that keeps none.
MIN_TRAIN_IMAGES = 2
# In each class folder --custom writes: marks it as this tool's, whose train/ and test/
# files a re-run may replace and remove (never those of a class it did not write).
CUSTOM_MARKER = ".pmad_custom_split"
MARKER_TEXT = "written by setup_train_dataset.py --custom "  # + the source's absolute path

Sync = Callable[[list[tuple[str, str]], str], Counter]  # (pairs, progress text) -> counts


def _write_binary_mask(src: str, dst: str) -> None:
    """A VisA mask (a region id per defect pixel: 1, 2, ...) as a 0/255 PNG, read by
    datasets.open_mask as every mask here (EXIF orientation, a grey palette by its
    colours), with every non-zero id a defect, however many, as VisA's own split script
    binarises them."""
    mask = open_mask(src, "VisA mask", "replace the file from the VisA download",
                     label_map=True)
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    write_atomic(dst, lambda tmp: mask.save(tmp, format="PNG"))


def read_visa_split(visa_dir: str, classes: Sequence[str] | None = None
                    ) -> dict[str, list[dict[str, str]]]:
    """{class: rows of split_csv/1cls.csv}, every named file checked to exist and no
    two rows clashing (`_clash_problems`). Read as utf-8-sig: a split saved by Excel
    ("CSV UTF-8") starts with a byte-order mark that would join the first column's name."""
    path = os.path.join(visa_dir, VISA_SPLIT)
    if not os.path.isfile(path):
        nearest = _nearest_visa(visa_dir)
        raise LayoutError(f"{path} does not exist; --visa takes the extracted VisA folder: "
                          f"{VISA_LAYOUT}"
                          + (f"; did you mean --visa {nearest}?" if nearest else ""))
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames != VISA_COLUMNS:
            raise LayoutError(f"{path} has columns {reader.fieldnames}, expected "
                              f"{VISA_COLUMNS} (VisA's 1-class split)")
        rows = list(reader)
    wanted = set(classes) if classes else None
    by_class: dict[str, list[dict[str, str]]] = {}
    listed: list[tuple[int, dict[str, str]]] = []  # (line, row) of the rows read
    problems = []
    for k, row in enumerate(rows, start=2):
        if wanted is not None and row["object"] not in wanted:  # a row's first field
            continue
        fields = [row[c] for c in VISA_COLUMNS]  # csv: None for a field a row lacks
        if None in row or None in fields:  # its extra fields are under None
            count = sum(f is not None for f in fields) + len(row.get(None) or [])
            problems.append(f"line {k}: {count} fields, expected {len(VISA_COLUMNS)} "
                            f"({', '.join(VISA_COLUMNS)})")
            continue
        if not row["image"]:
            problems.append(f"line {k}: names no image")
            continue
        if row["split"] not in ("train", "test") or row["label"] not in ("normal", "anomaly"):
            problems.append(f"line {k}: split {row['split']!r} / label {row['label']!r} (expected "
                            "train/test and normal/anomaly)")
            continue
        if row["split"] == "train" and row["label"] == "anomaly":
            problems.append(f"line {k}: an anomalous training image (the 1-class split has none)")
        needed = [row["image"]] + ([row["mask"]] if row["label"] == "anomaly" else [])
        if row["label"] == "anomaly" and not row["mask"]:
            problems.append(f"line {k}: anomalous image {row['image']} names no mask")
        absent = [p for p in needed if p and not os.path.isfile(os.path.join(visa_dir, p))]
        problems += [f"{os.path.join(visa_dir, p)} (line {k}) missing" for p in absent]
        if row["label"] == "anomaly" and row["mask"] and not absent:  # headers only
            problem = mask_problem(os.path.join(visa_dir, row["mask"]),
                                   os.path.join(visa_dir, row["image"]), image_required=True)
            if problem:
                problems.append(f"{problem} (line {k})")
        elif row["label"] == "normal" and not absent:
            problem = header_problem(os.path.join(visa_dir, row["image"]),
                                     ": replace the file from the VisA download",
                                     f" (line {k})")
            if problem:
                problems.append(problem)
        by_class.setdefault(row["object"], []).append(row)
        listed.append((k, row))
    problems += _clash_problems(listed)
    if wanted is not None:
        problems += [f"class {c!r} has no row" for c in sorted(wanted - set(by_class))]
    else:
        missing = sorted(set(VISA_CLASSES) - set(by_class))
        if missing:
            problems.append(f"VisA's classes {missing} have no row (a partial split file? "
                            "pass --classes to convert a subset)")
    if problems:
        raise LayoutError(f"VisA at {visa_dir} cannot be converted:\n  "
                          + "\n  ".join(problems[:20])
                          + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20
                             else "") + f"\nexpected {VISA_LAYOUT}")
    return by_class


def _nearest_visa(visa_dir: str) -> str | None:
    """The folder holding split_csv/1cls.csv that --visa was likely meant to be, as
    find_test_classes names one: the split file's (or split_csv's) VisA folder, a class
    folder's parent, or a sub-folder; None where none is evident."""
    root = os.path.normpath(visa_dir)
    up = [os.path.normpath(os.path.join(root, os.pardir))]  # split_csv/ or <class>/ given
    if os.path.isfile(root):  # split_csv/1cls.csv given
        up.insert(0, os.path.normpath(os.path.join(root, os.pardir, os.pardir)))
    down = [os.path.join(root, d) for d in hint_subdirs(root)]
    return next((d for d in up + down if os.path.isfile(os.path.join(d, VISA_SPLIT))), None)


def _clash_problems(listed: list[tuple[int, dict[str, str]]]) -> list[str]:
    """The (line, row)s that would write one file twice or train on a test image: an
    image in more than one row (repeated, or in train and test), and images of one stem
    (compared case-folded, as macOS' and Windows' file systems do) bound for one folder
    (one would overwrite the other, or share its mask and result name)."""
    rows_of: dict[tuple[str, str], list[tuple[int, dict[str, str]]]] = {}
    for k, row in listed:
        rows_of.setdefault((row["object"], os.path.normpath(row["image"])), []).append((k, row))
    problems = []
    bound_for: dict[tuple[str, str], list[tuple[int, str]]] = {}  # (folder, stem): images
    for (name, image), rows in rows_of.items():
        lines = ", ".join(str(k) for k, _ in rows)
        kinds = list(dict.fromkeys(f"{row['split']} {row['label']}" for _, row in rows))
        if len(kinds) > 1:
            leak = (" (a test image would be trained on)"
                    if {row["split"] for _, row in rows} == {"train", "test"} else "")
            problems.append(f"lines {lines}: {image} is listed as {' and '.join(kinds)}"
                            f"{leak}: keep only the row it belongs to")
        elif len(rows) > 1:
            problems.append(f"lines {lines}: {image} is listed {len(rows)} times as "
                            f"{kinds[0]}: remove the repeated row(s)")
        k, row = rows[0]
        folder = f"{name}/{row['split']}/{'good' if row['label'] == 'normal' else 'bad'}/"
        stem = os.path.splitext(os.path.basename(image))[0]
        bound_for.setdefault((folder, stem.casefold()), []).append((k, image))
    for (folder, _), images in bound_for.items():
        if len(images) > 1:
            stem = os.path.splitext(os.path.basename(images[0][1]))[0]
            problems.append(f"lines {', '.join(str(k) for k, _ in images)}: "
                            f"{' and '.join(p for _, p in images)} would both be copied "
                            f"to {folder} as {stem} (one over the other, or sharing its "
                            "mask): rename all but one image, and its row")
    return problems


def _refuse_unlisted_visa(out: str, train_copy: str | None, classes: Sequence[str],
                         pairs: list[tuple[str, str]]) -> None:
    """An earlier conversion's images in the classes' train/ and test/ folders (and in the
    training copy `train_copy`/<class>) that the split no longer puts there: after an
    edited split (an image moved from train to test, a row removed) one would stay in
    train/ and be trained on while it is also tested. Refused before anything is written,
    naming them; nothing is deleted (the folders need not be this tool's alone)."""
    listed = {os.path.normpath(dst) for _, dst in pairs}
    stale: list[str] = []
    folders = [os.path.join(out, name, split) for name in classes for split in ("train", "test")]
    if train_copy is not None:
        trained = {name: {os.path.basename(dst) for _, dst in pairs
                          if Path(dst).parts[-3:-1] == ("train", "good")
                          and Path(dst).parts[-4] == name} for name in classes}
        for name in classes:
            folder = os.path.join(train_copy, name)
            if os.path.isdir(folder):
                stale += [os.path.join(folder, f) for f in sorted(os.listdir(folder))
                          if is_image_name(f) and f not in trained[name]]
    for folder in folders:
        for parent, dirs, files in os.walk(folder):
            dirs[:] = sorted(d for d in dirs if not is_junk_dir(d))
            stale += [path for f in sorted(files) if is_image_name(f)
                      and (path := os.path.normpath(os.path.join(parent, f))) not in listed]
    if stale:
        places = sorted({os.path.dirname(p) for p in stale})
        raise LayoutError(
            f"{len(stale)} image(s) of an earlier conversion lie where the split "
            f"{VISA_SPLIT} no longer puts them ({some_names(stale, 3)}): one left in a "
            "training folder would be trained on, while the split may now test it. Fix: "
            f"remove {', '.join(places)} and convert again (then train again: models "
            "trained on the earlier conversion may have seen the new split's test images)")


def convert_visa(visa_dir: str, out: str, sync: Sync, classes: Sequence[str] | None = None,
                 train_copy: str | None = None) -> dict[str, Counter]:
    """VisA's 1-class split into the MVTec layout under `out`: normal training images in
    train/good, test images in test/good and test/bad, each anomalous image's mask
    binarised to ground_truth/bad/<stem>_mask.png. Images are copied as they are, as
    VisA's split script does (every loader here resizes). An earlier conversion's image
    the split no longer puts where it lies, in `out` or the training copy `train_copy`
    (<root>/train), is refused (_refuse_unlisted_visa). -> {class: image counts}."""
    by_class = read_visa_split(visa_dir, classes)
    pairs: list[tuple[str, str]] = []
    masks: list[tuple[str, str]] = []
    counts: dict[str, Counter] = {}
    for name, rows in sorted(by_class.items()):
        counts[name] = Counter()
        for row in rows:
            folder = "good" if row["label"] == "normal" else "bad"
            image = os.path.join(visa_dir, row["image"])
            pairs.append((image, os.path.join(out, name, row["split"], folder,
                                              os.path.basename(image))))
            counts[name][f"{row['split']}/{folder}"] += 1
            if folder == "bad":
                stem = os.path.splitext(os.path.basename(image))[0]
                masks.append((os.path.join(visa_dir, row["mask"]),
                              os.path.join(out, name, "ground_truth", "bad",
                                           f"{stem}_mask.png")))
    _refuse_unlisted_visa(out, train_copy, sorted(by_class), pairs)
    counts_all = sync(pairs, "VisA images")
    for src, dst in masks:
        _write_binary_mask(src, dst)
    print(f"VisA -> {out}: images {', '.join(f'{v} {k}' for k, v in counts_all.items())}; "
          f"{len(masks)} masks binarised")
    return counts


def held_out(n: int, test_fraction: float) -> list[bool]:
    """Which of `n` sorted normal images go to test/good: round(n * test_fraction),
    evenly spread, at least 1 (a class without normal test images has no image AUROC)
    and at most n - 1 (one to train on). When n * test_fraction is whole, a fraction 1/s
    holds out every s-th image."""
    m = min(n - 1, max(1, round(n * test_fraction)))
    return [(k + 1) * m // n > k * m // n for k in range(n)]


def min_normal_images(test_fraction: float) -> int:
    """The fewest normal images of a class that leave MIN_TRAIN_IMAGES to train on once
    `held_out` has taken its share (the count it leaves never falls as images are added)."""
    n = MIN_TRAIN_IMAGES + 1
    while n - sum(held_out(n, test_fraction)) < MIN_TRAIN_IMAGES:
        n += 1
    return n


def _check_apart(src: str, out: str) -> None:
    """The conversion deletes files in <out>/<class> that its split does not list: the
    source must not lie there (nor the output in the source, where it would be read as a
    class on the next run)."""
    a, b = os.path.realpath(src), os.path.realpath(out)
    if os.path.commonpath([a, b]) in (a, b):
        raise LayoutError(f"--data_path {out} and --custom {src} overlap; write the MVTec "
                          "layout to a folder outside the custom set (and vice versa)")


def custom_classes(src: str, classes: Sequence[str] | None) -> list[str]:
    """The class folders of `src` to convert: all, or those named, each of which must
    exist (a misspelt name would otherwise match nothing)."""
    if not os.path.isdir(src):
        raise LayoutError(f"{src} does not exist; --custom expects {CUSTOM_LAYOUT}")
    found = data_subdirs(src)
    normal = [d for d in found if d in NORMAL_DIRS]
    if normal:  # one class's folder: its good/ would be a class, told to hold good/ itself
        src = os.path.normpath(src)
        raise LayoutError(f"--custom {src} holds {normal[0]}/: it is one class's folder; "
                          f"pass the folder of the class folders, e.g. --custom "
                          f"{os.path.dirname(src) or '.'} --classes {os.path.basename(src)}; "
                          f"--custom expects {CUSTOM_LAYOUT}")
    if not classes:
        return found
    classes = as_found(classes, found)  # each name once
    unknown = [c for c in classes if c not in found]
    if unknown:
        raise LayoutError(f"--classes {' '.join(unknown)}: no such class folder in {src}; "
                          f"its classes are {', '.join(found) or '(none)'}")
    return sorted(set(classes))


def plan_custom(src: str, out: str, test_fraction: float = DEFAULT_TEST_FRACTION,
                classes: Sequence[str] | None = None, also_writes: Sequence[str] = ()
                ) -> dict[str, list[tuple[str, str]]]:
    """{class: [(source, destination)]} of a custom set (every class folder, or those in
    `classes`). `held_out` picks the normal images (sorted by name) that go to test/good,
    the rest train; each other folder of a class is a defect type, copied to
    test/<defect> (an empty one is named in a note on stderr). No ground_truth/ is
    written: run_test.py then reports the pixel metrics as undefined. A class folder in
    `out`, or in a folder of `also_writes` (the training copy's <root>/train), that holds
    files but no CUSTOM_MARKER is refused."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"--custom_test_fraction {test_fraction} is outside (0, 1)")
    names = custom_classes(src, classes)
    _check_apart(src, out)
    least = min_normal_images(test_fraction)
    plan: dict[str, list[tuple[str, str]]] = {}
    problems, notes = [], []
    loose = loose_images(src)  # in no class: left out unseen by every run
    if loose:
        problems.append(f"{src}: holds image(s) outside any class folder "
                        f"({some_names(loose, 3)}), which would be left out: move each into "
                        "<class>/good/ or <class>/<defect>/")
    for name in names:
        folders = data_subdirs(os.path.join(src, name))
        normal = [d for d in folders if d in NORMAL_DIRS]
        if len(normal) != 1:  # none beside loose images: where those go (_loose_problem)
            problems += (not normal and _loose_problem(os.path.join(src, name))) or [
                f"{os.path.join(src, name)}: needs one folder of normal images named "
                f"{' or '.join(NORMAL_DIRS)}, found {folders}"]
            continue
        masks = [d for d in folders if MASK_FOLDER.fullmatch(d)]
        problems += [_masks_problem(os.path.join(src, name, d)) for d in masks]
        problems += [_nested_problem(os.path.join(src, name, d)) for d in folders
                     if d not in masks and data_subdirs(os.path.join(src, name, d))]
        problems += _loose_problem(os.path.join(src, name))
        problems += [p for d in (out, *also_writes)
                     if (p := _foreign_class_problem(os.path.join(d, name)))]
        good = list_images(os.path.join(src, name, normal[0]))
        if len(good) < least:
            problems.append(f"{os.path.join(src, name, normal[0])}: {len(good)} image(s); add "
                            f"normal images until it has at least {least} ({MIN_TRAIN_IMAGES} "
                            "to train on, as run_protoflow.py holds one out, and "
                            f"{least - MIN_TRAIN_IMAGES} held out to test/good by "
                            f"--custom_test_fraction {test_fraction:g}), or remove the class "
                            "folder")
            continue
        pairs = [(f, os.path.join(out, name, "test" if test else "train", "good",
                                  os.path.basename(f)))
                 for f, test in zip(good, held_out(len(good), test_fraction))]
        empty = []
        for defect in folders:
            if defect not in NORMAL_DIRS:
                images = list_images(os.path.join(src, name, defect))
                if not images:
                    empty.append(defect)
                pairs += [(f, os.path.join(out, name, "test", defect, os.path.basename(f)))
                          for f in images]
        if empty:
            notes.append(f"note: {os.path.join(src, name)}: left out {len(empty)} empty "
                         f"folder(s) ({some_names(empty, 3)}): no image of that defect type "
                         "is converted or scored")
        problems += _image_problems([f for f, _ in pairs])
        plan[name] = pairs
    if not plan and not problems:
        problems.append(f"no class folders in {src}")
    if problems:
        raise LayoutError("the custom set cannot be converted:\n  " + "\n  ".join(problems)
                          + f"\nexpected {CUSTOM_LAYOUT}")
    for note in notes:  # said, not dropped unseen (as run_test.py says of MVTec's)
        print(note, file=sys.stderr)
    return plan


def header_problem(path: str, fix: str, where: str = "") -> str | None:
    """Why `path` is no image Pillow can open, from its header alone (no decode: cheap
    beside the copy; a file cut short after it, or of refused content, is found when read), with
    what to do: `fix` (with its separator) for a file that is no image, downscaling for
    one over Pillow's pixel limit, as datasets.open_rgb says (not to replace it: it is
    an image). `where` (' (line 3)') follows the reason."""
    try:
        with Image.open(path):
            return None
    except Image.DecompressionBombError as e:
        return f"{too_large(path, e)}{where}"
    except UnidentifiedImageError:  # its text names the path again
        reason = "empty, cut short or not an image"
    except Exception as e:
        reason = f"{e or type(e).__name__}"
    return f"{path} is unreadable: {reason}{where}{fix}"


def _image_problems(images: Sequence[str]) -> list[str]:
    """Each image whose header is no image's (`header_problem`): named before anything is
    copied, not at mask estimation after the copy, or not at all (an empty file)."""
    return [problem for f in images
            if (problem := header_problem(f, "; replace or remove the file"))]


def _nested_problem(folder: str) -> str:
    return (f"{folder}: holds sub-folder(s) {', '.join(data_subdirs(folder))}, whose images "
            "would be left out: move them into it (or make each sub-folder of defective "
            "images a defect folder of the class)")


def _masks_problem(folder: str) -> str:
    return (f"{folder}: a folder of ground-truth masks? --custom takes none, and would score "
            "it as a defect type: to evaluate with masks, lay the set out in the MVTec "
            f"layout ({TEST_LAYOUT}; README, 'Custom data sets') and pass it as --data_path "
            "without --custom; else rename or remove the folder")


def _loose_problem(class_dir: str) -> list[str]:
    """Images directly in a class folder belong to no folder (normal or defect): named,
    not left out unseen."""
    loose = loose_images(class_dir)
    if not loose:
        return []
    return [f"{class_dir}: holds image(s) beside its folders ({some_names(loose, 3)}), which "
            "would be left out: move each into good/ or a defect folder"]


def _foreign_class_problem(folder: str) -> str | None:
    """Why --custom must not write the class folder `folder`: it holds files of a class
    it did not write (a real MVTec 'bottle'), which it would replace and remove."""
    if not any(files for _, _, files in os.walk(folder)) or os.path.isfile(
            os.path.join(folder, CUSTOM_MARKER)):
        return None
    return (f"{folder} holds a class that --custom did not write (no {CUSTOM_MARKER} in "
            "it), whose images the conversion would replace and remove: pass another "
            "--data_path or --root; if an earlier version's --custom wrote it, mark it as "
            f"its own with `touch {os.path.join(folder, CUSTOM_MARKER)}`")


def remove_unlisted(folder: str, keep: set[str]) -> int:
    """Delete every file under `folder` not in `keep`, and the folders left empty, so
    that a re-run with another split leaves no image where the new split does not put it
    (a test image left in train/ would be trained on). -> files removed."""
    keep = {os.path.normpath(p) for p in keep}
    removed = 0
    for parent, _, files in os.walk(folder, topdown=False):
        for f in files:
            path = os.path.normpath(os.path.join(parent, f))
            if path not in keep and f != CUSTOM_MARKER:
                os.remove(path)
                removed += 1
        if parent != folder and not os.listdir(parent):
            os.rmdir(parent)
    return removed


def _warn_trained_now_tested(out: str, plan: dict[str, list[tuple[str, str]]]) -> None:
    """A re-run with another split moves images an earlier split trained on to test/good:
    a model trained on that split has seen them and would score them as unseen (inflated
    results), so each such class is named, on stderr, with the fix."""
    for name, pairs in sorted(plan.items()):
        trained = os.path.join(out, name, "train", "good")
        if not os.path.isdir(trained):
            continue
        was, tested = set(os.listdir(trained)), os.path.join(out, name, "test", "good")
        moved = sorted(os.path.basename(dst) for _, dst in pairs
                       if os.path.dirname(dst) == tested and os.path.basename(dst) in was)
        if moved:
            print(f"warning: {name}: {len(moved)} image(s) the earlier split in {trained} "
                  f"trained on now go to test/good ({some_names(moved, 3)}): models trained on "
                  "that split have seen them; train ProtoFlow (prototypes too) and the ViT "
                  "again before evaluating", file=sys.stderr, flush=True)


def convert_custom(src: str, out: str, sync: Sync,
                   test_fraction: float = DEFAULT_TEST_FRACTION,
                   classes: Sequence[str] | None = None, also_writes: Sequence[str] = (),
                   fg_masks: str | None = None) -> list[str]:
    """`plan_custom`, then copy, then remove what an earlier run left in the converted
    classes' train/ and test/ folders that this plan does not list (a ground_truth/ the
    user added stays), and, converting every class, the classes it wrote from `src` that
    `src` no longer has (`_remove_dropped_classes`; `fg_masks`: the training copy's
    fg_mask/ folder); -> the classes written. Their folders in `out` and `also_writes`
    are marked as this tool's (CUSTOM_MARKER, naming `src`) before any copy, so that a
    re-run after a crash finds them its own."""
    plan = plan_custom(src, out, test_fraction, classes, also_writes)
    _warn_trained_now_tested(out, plan)
    for name in plan:
        for folder in (out, *also_writes):
            marker = os.path.join(folder, name, CUSTOM_MARKER)
            os.makedirs(os.path.dirname(marker), exist_ok=True)
            write_atomic(marker, lambda tmp: Path(tmp).write_text(
                f"{MARKER_TEXT}{os.path.abspath(src)}\n"))
    counts = sync([p for pairs in plan.values() for p in pairs], "custom images")
    removed = sum(remove_unlisted(os.path.join(out, name, split), {dst for _, dst in pairs})
                  for name, pairs in plan.items() for split in ("train", "test"))
    print(f"custom set -> {out}: {len(plan)} classes; images "
          f"{', '.join(f'{v} {k}' for k, v in counts.items())}; {removed} file(s) this split "
          "does not list removed; no ground-truth masks: pixel metrics are undefined")
    if not classes:  # every class of the source: one it no longer has is gone
        _remove_dropped_classes(src, set(plan), out, also_writes, fg_masks)
    _note_good_only(out, plan)
    return sorted(plan)


def _marker_source(folder: str) -> str | None:
    """The source path the CUSTOM_MARKER in the class folder `folder` records, or None
    (no marker, or not --custom's)."""
    try:
        text = Path(folder, CUSTOM_MARKER).read_text()
    except OSError:
        return None
    return text[len(MARKER_TEXT):].rstrip("\n") if text.startswith(MARKER_TEXT) else None


def _written_from(folder: str, src: str) -> bool:
    """Whether the class folder `folder` holds a CUSTOM_MARKER naming `src`, compared as
    real paths. A relative path (an earlier version wrote --custom as typed) never
    matches: resolved against today's working directory it may name another source."""
    recorded = _marker_source(folder)
    return (recorded is not None and os.path.isabs(recorded)
            and os.path.realpath(recorded) == os.path.realpath(src))


def _alias_of_kept(folder: str, name: str, kept: set[str]) -> bool:
    """Whether `folder`/`name` is the folder of a kept class under another name: on a
    case-insensitive or Unicode-normalising file system a source folder renamed 'Brick'
    -> 'brick' is converted into the output's 'Brick', which is not dropped."""
    path = os.path.join(folder, name)
    return any(os.path.exists(other := os.path.join(folder, k))
               and os.path.samefile(path, other) for k in kept if k != name)


def _users_files(class_dir: str) -> list[str]:
    """The names in the class folder `class_dir` that --custom did not write and that are
    the user's: a system's junk (.DS_Store, Thumbs.db, __MACOSX, hidden names; datasets'
    is_junk_file / is_junk_dir) would otherwise keep a dropped class, trained on."""
    def junk(name: str) -> bool:
        path = os.path.join(class_dir, name)
        return is_junk_dir(name) if os.path.isdir(path) else is_junk_file(name)
    return sorted(n for n in set(os.listdir(class_dir)) - {"train", "test", CUSTOM_MARKER}
                  if not junk(n))


def _remove_dropped_classes(src: str, kept: set[str], out: str, also_writes: Sequence[str],
                            fg_masks: str | None) -> None:
    """Delete the class folders in `out` and `also_writes` that --custom wrote from `src`
    but `src` no longer has (training and evaluation would still read them), with the
    foreground masks (`fg_masks`/<class>) of a training copy removed; named in one line.
    A folder written from another source, or not by --custom, stays; so does a class
    whose converted folder holds what --custom did not write (a ground_truth/ the user
    drew), with its training copy, and a note; and one whose marker an earlier version
    wrote with a relative path (its source is unknown), with a note."""
    removed, held, unknown = [], set(), []
    dropped = [name for name in data_subdirs(out) if name not in kept
               and _written_from(os.path.join(out, name), src)
               and not _alias_of_kept(out, name, kept)] if os.path.isdir(out) else []
    for name in dropped:
        extra = _users_files(os.path.join(out, name))
        if extra:
            held.add(name)
            print(f"note: {os.path.join(out, name)}: its class is no longer in {src}, but it "
                  f"holds {', '.join(extra)}, which --custom did not write: kept (and "
                  "trained on) until you remove it by hand", file=sys.stderr)
    for folder in (out, *also_writes):
        if not os.path.isdir(folder):
            continue
        for name in data_subdirs(folder):
            path = os.path.join(folder, name)
            if name in kept or name in held or _alias_of_kept(folder, name, kept):
                continue
            recorded = _marker_source(path)
            if recorded is not None and not os.path.isabs(recorded):
                unknown.append(path)
            if not _written_from(path, src):
                continue
            shutil.rmtree(path)
            removed.append(path)
            masks = os.path.join(fg_masks, name) if fg_masks else None
            if folder != out and masks and os.path.isdir(masks):
                shutil.rmtree(masks)
                removed.append(masks)
    if removed:
        print(f"custom set: removed {len(removed)} folder(s) of classes no longer in {src}: "
              f"{', '.join(removed)}")
    if unknown:
        print(f"note: {', '.join(unknown)}: not in {src}, but an earlier version's --custom "
              "marked it with a relative path, so its source is unknown and it was not "
              "removed: remove it by hand if this source no longer has it", file=sys.stderr)


def _note_good_only(out: str, plan: dict[str, list[tuple[str, str]]]) -> None:
    """A class without a defective image trains the model, but no detection metric is
    defined on its test images: said now, not first as a failed class of run_test.py."""
    def defective(name: str, dst: str) -> bool:
        folder = Path(dst).parent
        return folder.parent == Path(out, name, "test") and folder.name not in NORMAL_DIRS
    good_only = [name for name, pairs in sorted(plan.items())
                 if not any(defective(name, dst) for _, dst in pairs)]
    if good_only:
        print(f"note: {', '.join(good_only)}: no defective image, so run_test.py cannot measure "
              "these classes (their metrics are undefined: it lists them as failed); they "
              "train the model, and predict.py scores their images", file=sys.stderr)
