"""PMAD data: class settings, the training set, MVTec-format test sets, a visual-token cache.

Layouts
  training (ImageNet layout, written by setup_train_dataset.py):
    <root>/train/<class>/<stem>.<ext>        normal training images
    <root>/fg_mask/<class>/<stem>.png        foreground masks (docs/method.md 4)
  test (MVTec layout: MVTec AD, BTAD, MPDD, the demo set):
    <root>/<class>/test/<defect>/<stem>.<ext>        'good' (or BTAD's 'ok') is normal
    <root>/<class>/ground_truth/<defect>/<stem>_mask.<ext>   (or <stem>.<ext>, BTAD)

Bad input is never replaced by another sample (docs/method.md 9.6): an unreadable or missing
file (a link to a missing file included) is an error naming it; with ``skip_bad_images=True``
every file is decoded once at construction and the bad ones are listed in a warning and left
out. Two images of one stem in a folder are refused; other files are named in a note.
"""
from __future__ import annotations

import io
import hashlib
import os
import re
import sys
import unicodedata
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision import transforms as T

from utils import (BadFileError, FlagError, LayoutError, all_gather_object, build_sampler,
                   bullet_list, file_sha256, get_rank, get_world_size, main_print, on_every_rank,
                   progress, save_on_master, some_names, to_device)

OBJECTS = ["bottle", "cable", "capsule", "hazelnut", "metal_nut", "pill", "screw",
           "toothbrush", "transistor", "zipper"]
TEXTURES = ["carpet", "grid", "leather", "tile", "wood"]
MVTEC_CLASSES = sorted(OBJECTS + TEXTURES)
# VisA (Zou et al., ECCV 2022): all objects; multi-class runs use the 12 together.
VISA_CLASSES = ["candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1",
                "macaroni2", "pcb1", "pcb2", "pcb3", "pcb4", "pipe_fryum"]
SETTINGS = ("multi_class", "obj2tex", "tex2obj", "leave_one_out")
IMAGE_CACHES = ("ram", "device")  # where ImageCache keeps the decoded images
CACHE_IMAGES = ("auto", "none", *IMAGE_CACHES)  # run_pretraining.py --cache_images
CACHE_SHARE = 0.5  # 'auto' caches in RAM what the node's processes keep in this share of
# its available memory
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
NORMAL_DIRS = ("good", "ok")  # normal-image folder: MVTec AD / MPDD, BTAD
# Folder names of ground-truth masks (case-insensitive): --custom would score one as a
# defect type, its masks as defective images; beside test/, one not named ground_truth
# is named (ground_truth_near_miss)
MASK_FOLDER = re.compile(r"ground[ _-]?truths?|gts?|masks?", re.IGNORECASE)
JUNK_DIRS = ("__MACOSX",)  # beside the hidden folders: never data (is_junk_dir)
JUNK_FILES = ("thumbs.db", "desktop.ini")  # beside the hidden files (is_junk_file)
EXIF_ORIENTATION = 0x0112  # the EXIF tag of how a camera image is turned for viewing
LABEL_MAP_VALUES = 16  # the largest id of a label map (mask_defects)

TRAIN_LAYOUT = ("<root>/train/<class>/<image>.png (from MVTec's <class>/train/good), "
                "<root>/fg_mask/<class>/<image stem>.png")
TEST_LAYOUT = ("<root>/<class>/test/<defect>/<image>.png ('good' = normal), "
               "<root>/<class>/ground_truth/<defect>/<image stem>_mask.png")
SKIP_HINT = "or pass --skip_bad_images to leave bad files out"  # struck from a listed skip
FIX_BAD_FILE = f"replace the file, {SKIP_HINT}"
FIX_DANGLING = "restore each link's target, or delete the link"
FIX_FG_MASK = ("unpack the released masks with `python setup_train_dataset.py --data_path "
               "<MVTec AD> --fg_mask_zip fg_mask.zip` (or estimate them with "
               "--make_fg_masks), or train with --no-fg_mask (every patch counts as foreground)")
FIX_BAD_FG_MASK = ("regenerate them with `python setup_train_dataset.py --data_path <MVTec AD> "
                   "--make_fg_masks` (it replaces unreadable and mis-shaped masks), or unpack "
                   "the released masks again with --fg_mask_zip fg_mask.zip")
# Preprocessing of the token image, from how open_rgb reads the file (turned by its
# header's EXIF orientation, 16-bit by its top 8 bits) on; stored in the token cache so
# that a change of it invalidates the cached tokens.
TOKEN_PREPROCESS = ("header-exif-turned+16-bit-top-8+resize-bicubic-antialias+center-crop"
                    "+to-tensor")
TOKEN_CACHE_FORMAT = 2  # 2: the compute key (device, precision)
_SAVE_EVERY_BATCHES = 50  # token cache: partial saves so a crash loses little work

_Item = TypeVar("_Item")


class DataWarning(UserWarning):
    """Data this run leaves out or rebuilds (bad files skipped, an unreadable token
    cache): entry points print it as one `warning:` line (utils.cli)."""


# ----------------------------------------------------------------------------------------
# Class settings
# ----------------------------------------------------------------------------------------
def resolve_setting(setting: str | None, from_obj_to_texture: bool = False) -> str:
    """--setting with the original's --from_obj_to_texture alias folded in."""
    if from_obj_to_texture:
        if setting not in (None, "obj2tex"):
            raise FlagError(f"--from_obj_to_texture means --setting obj2tex, but --setting "
                            f"{setting} was given: pass only one of them")
        return "obj2tex"
    return setting or "multi_class"


def normalization(imagenet_default_mean_and_std: bool = True
                  ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std): ImageNet's, or BEiT's 0.5/0.5 (--no-imagenet_default_mean_and_std)."""
    if imagenet_default_mean_and_std:
        return tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD)
    return (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


def setting_classes(setting: str, unseen_classes: str | Sequence[str] | None = None,
                    available: Iterable[str] | None = None) -> tuple[list[str], list[str]]:
    """(train classes, test classes) of a PMAD setting (docs/method.md 4).

    `available` are the class folders of the data at hand (default: MVTec AD's 15); it
    makes 'multi_class' and 'leave_one_out' work for any class set. 'obj2tex' and
    'tex2obj' split MVTec AD's objects and textures and need all 15 classes.
    """
    pool = MVTEC_CLASSES if available is None else sorted(set(available))
    if not pool:
        raise FlagError("setting_classes: no available classes")
    if setting not in SETTINGS:
        raise FlagError(f"unknown setting {setting!r}; valid settings: {', '.join(SETTINGS)}")
    unseen = [unseen_classes] if isinstance(unseen_classes, str) else list(unseen_classes or [])
    if setting != "leave_one_out":
        if unseen:
            raise FlagError(f"--unseen_classes {' '.join(unseen)} applies only to --setting "
                            f"leave_one_out; --setting {setting} fixes its test classes: add "
                            "--setting leave_one_out, or drop --unseen_classes")
        if setting == "multi_class":
            return list(pool), list(pool)
        missing = [c for c in MVTEC_CLASSES if c not in pool]
        if missing:
            raise FlagError(f"{setting!r} splits MVTec AD into objects and textures and "
                            f"needs all 15 classes; missing: {', '.join(missing)} "
                            f"(available: {', '.join(pool)}). For other class sets use "
                            "'multi_class' or 'leave_one_out'")
        if setting == "obj2tex":
            return list(OBJECTS), list(TEXTURES)
        return list(TEXTURES), list(OBJECTS)
    unseen = as_found(unseen, pool)  # typed NFC, a folder stored NFD: that folder
    if len(unseen) != 1:
        raise FlagError(f"--setting leave_one_out needs exactly one unseen class, got "
                        f"{' '.join(unseen) or 'none'}: pass --unseen_classes CLASS, one of "
                        f"{', '.join(pool)}")
    if unseen[0] not in pool:
        raise FlagError(f"--unseen_classes: unknown class {unseen[0]!r}; valid classes: "
                        f"{', '.join(pool)}")
    return [c for c in pool if c != unseen[0]], [unseen[0]]


def dangling_link(path: str) -> str | None:
    """'<path> is a link to <target>, which does not exist' for a symbolic link whose
    target is gone, else None: os.path.isfile and isdir are False for such a link, so a
    listing by them would drop it unseen."""
    if not os.path.islink(path) or os.path.exists(path):
        return None
    target = os.path.normpath(os.path.join(os.path.dirname(path), os.readlink(path)))
    return f"{path} is a link to {target}, which does not exist"


def list_images(folder: str, keep_dangling: bool = False) -> list[str]:
    """Image files (IMAGE_EXTENSIONS) directly in `folder`, sorted by name (a fixed order
    keeps runs reproducible). Hidden files (e.g. macOS '._000.png' companions) are not
    images; any other file not taken is named in a note on stderr (note_left_out), so
    that an image of another type (.webp) is not left out unseen, and so are images in
    sub-folders (good/day2/001.png), which no layout reads.

    A link to a missing file is a BadFileError, or with `keep_dangling` listed, for the
    caller to refuse or, with --skip_bad_images, leave out as it does an unreadable file.
    Two images of one stem (000.png, 000.jpg) are a BadFileError: they would share one
    mask and one result name."""
    images, dangling, other, nested = [], [], [], []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if is_junk_file(name) or os.path.isdir(path):
            if not is_junk_dir(name) and os.path.isdir(path):
                nested += _images_below(path, folder)
            continue
        link = dangling_link(path)
        if not is_image_name(name) or not (os.path.isfile(path) or link):
            other.append(name)
        elif link and not keep_dangling:
            dangling.append(link)
        else:
            images.append(path)
    if dangling:
        raise BadFileError(f"{len(dangling)} image link(s) in {folder} lead nowhere:"
                           f"{bullet_list(dangling)}\nFix: {FIX_DANGLING}")
    _refuse_stem_collisions(folder, images)
    note_left_out(folder, other)
    if nested:
        _note_once(folder, f"left out {len(nested)} image(s) in sub-folders "
                           f"({some_names(nested, 3)}): only the images directly in it are "
                           "read; move them into it to use them")
    return images


def is_image_name(name: str) -> bool:
    """Whether a file named `name` is taken as an image: one of IMAGE_EXTENSIONS, not a
    system's file (is_junk_file: macOS's '._000.png' companions)."""
    return name.lower().endswith(IMAGE_EXTENSIONS) and not is_junk_file(name)


def loose_images(folder: str) -> list[str]:
    """The names of the image files directly in `folder`, sorted: images beside the
    folders that a layout reads (<class>/test/002.png), which it leaves out."""
    return [n for n in sorted(os.listdir(folder))
            if is_image_name(n) and os.path.isfile(os.path.join(folder, n))]


def _images_below(folder: str, start: str) -> list[str]:
    """The image files under `folder` at any depth (junk folders pruned), sorted, as paths
    relative to `start`: what a listing of one folder level leaves out."""
    found = []
    for parent, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not is_junk_dir(d))
        found += [os.path.relpath(os.path.join(parent, n), start) for n in sorted(names)
                  if is_image_name(n)]
    return found


def note_resize(folder: str, images: Sequence[str], img_size: int | None = None) -> None:
    """What the test transform's resize of the short side and centre crop (as the paper's,
    docs/method.md 4) does to these images, said once per folder from the headers (~0.1 ms
    an image): the crop scores only the middle of a non-square image, so a defect near its
    ends is never seen (images that drop under 1 % count as square; the share kept does
    not depend on the EXIF orientation); and, given the model's `img_size`, an image under
    half of it on its short side is enlarged more than 2x, so fine defects blur."""
    kept, small = [], []  # short side / long side of each non-square image; short sides
    for path in images:
        try:
            with Image.open(path) as img:
                share = min(img.size) / max(1, max(img.size))
                side = min(img.size)
        except Exception:  # an unreadable image is named where it is read
            continue
        if share < 0.99:
            kept.append(round(100 * share))
        if img_size is not None and 2 * side < img_size:
            small.append(side)
    if kept:
        low, high = min(kept), max(kept)
        middle = f"{low}" if low == high else f"{low}-{high}"
        _note_once(folder, f"{len(kept)} of {len(images)} images are not square; the centre "
                           f"crop (as the paper's) scores the middle {middle} % of each (drops "
                           f"up to {100 - low} % of the area). A benchmark (VisA, BTAD) is "
                           "scored so as published; to score all of your own images, crop or "
                           "pad them to square beforehand")
    if small:
        _note_once(folder, f"{len(small)} of {len(images)} images are under {img_size // 2} px "
                           f"on their short side (down to {min(small)} px): each is enlarged "
                           f"more than 2x to the model's {img_size} px, so a defect a few "
                           "pixels wide blurs; score images at the resolution they were taken")


def _shared_keys(pairs: Iterable[tuple[str, str]]) -> dict[str, list[str]]:
    """{key: its labels} of the keys that more than one (key, label) pair has."""
    by_key: dict[str, list[str]] = {}
    for key, label in pairs:
        by_key.setdefault(key, []).append(label)
    return {key: labels for key, labels in by_key.items() if len(labels) > 1}


def _refuse_stem_collisions(folder: str, images: Sequence[str]) -> None:
    """Masks (<stem>_mask.png, fg_mask/<class>/<stem>.png) and result names
    ('<defect>_<stem>') go by the stem: two images of one stem would share them."""
    names = [os.path.basename(path) for path in images]
    groups = [", ".join(labels) for labels in
              _shared_keys((os.path.splitext(n)[0], n) for n in names).values()]
    if groups:
        raise BadFileError(
            f"{folder} holds {len(groups)} group(s) of images with one name and different "
            f"extensions, which would share one mask and one result name:"
            f"{bullet_list(groups)}\nFix: rename all but one file of each group (and a test "
            "image's ground-truth mask with it)")


_NOTED: set[tuple[str, str]] = set()  # (folder, text) already noted


def _note_once(folder: str, text: str) -> None:
    """'[data] note: <folder>: <text>' on stderr (rank 0), once per process, since a run
    lists a folder several times (checks, dataset)."""
    key = (os.path.abspath(folder), text)
    if key in _NOTED:
        return
    _NOTED.add(key)
    main_print(f"[data] note: {folder}: {text}", file=sys.stderr)


def note_left_out(folder: str, names: Sequence[str]) -> None:
    """One stderr line per folder for the files of other types that a listing
    (list_images, predict.py's) does not take (_note_once)."""
    if names:
        _note_once(folder, f"left out {len(names)} file(s) not of an image type "
                           f"{'/'.join(IMAGE_EXTENSIONS)} ({some_names(names, 3)}); convert "
                           "any image among them to PNG to use it")


def is_junk_file(name: str) -> bool:
    """Whether a file named `name` is a system's, never the user's data: hidden files
    (macOS '._000.png', '.DS_Store') and Windows' Thumbs.db and desktop.ini, which a note
    would otherwise ask to convert to PNG."""
    return name.startswith(".") or name.lower() in JUNK_FILES


def is_junk_dir(name: str) -> bool:
    """Whether a folder named `name` holds none of the user's data: hidden folders
    ('.ipynb_checkpoints', '.git') and the __MACOSX a zip made on macOS carries, which
    would otherwise be read as classes, defect types or images to score."""
    return name.startswith(".") or name in JUNK_DIRS


def as_found(names: Sequence[str], found: Sequence[str]) -> list[str]:
    """`names` (as a user typed them) spelt as the folders in `found` are where the two
    differ only in Unicode normalisation: macOS stores a folder 'screw' with a hacek
    decomposed (NFD), a shell passes the name composed (NFC); one name to a reader,
    another string to Python, so '--classes' would name no folder."""
    by_form = {unicodedata.normalize("NFC", f): f for f in found}
    return list(dict.fromkeys(  # a name given in both forms is one class
        n if n in found else by_form.get(unicodedata.normalize("NFC", n), n) for n in names))


def data_subdirs(folder: str) -> list[str]:
    """The sub-folders of `folder` that may hold data (not is_junk_dir), sorted. A link
    to a missing folder is a LayoutError, not a class or defect type dropped unseen."""
    names = [d for d in sorted(os.listdir(folder)) if not is_junk_dir(d)]
    dangling = [p for p in (dangling_link(os.path.join(folder, d)) for d in names) if p]
    if dangling:
        raise LayoutError(f"{len(dangling)} link(s) in {folder} lead nowhere:"
                          f"{bullet_list(dangling)}\nFix: {FIX_DANGLING}")
    return [d for d in names if os.path.isdir(os.path.join(folder, d))]


def resolve_train_root(path: str) -> str:
    """The ImageNet-layout root for a --data_path given either as the root or as its
    `train/` folder (the original scripts pass `data/Mvtec-ImageNet/train`).

    `path` is taken for the train folder when it is named `train`, has no `train/` of its
    own, and holds class folders or has `fg_mask/` beside it. Says so in one line (rank 0).
    """
    path = os.path.normpath(path)
    if (os.path.basename(path) != "train" or not os.path.isdir(path)
            or os.path.isdir(os.path.join(path, "train"))):
        return path
    parent = os.path.dirname(path) or "."
    if not (data_subdirs(path) or os.path.isdir(os.path.join(parent, "fg_mask"))):
        return path
    main_print(f"[data] {path} is the train/ folder of an ImageNet-layout set: using {parent} "
               "(its train/ and fg_mask/)")
    return parent


def list_train_classes(root: str) -> list[str]:
    """Class folders of a training set in ImageNet layout (<root>/train/<class>)."""
    train_dir = os.path.join(root, "train")
    mvtec_class = all(os.path.isdir(os.path.join(root, *d)) for d in (  # MVTec's <class>/
        ("test",), ("train", "good"))) and not os.path.isdir(os.path.join(root, "fg_mask"))
    if not os.path.isdir(train_dir) or mvtec_class:
        if os.path.isdir(root) and list_test_classes(root):  # an MVTec-layout set
            raise LayoutError(f"{root} is a set in MVTec layout ({TEST_LAYOUT}); training "
                              f"reads {TRAIN_LAYOUT}. Fix: " + _conversion(root))
        if mvtec_class:
            raise LayoutError(f"{root} is one class of a set in MVTec layout; training reads "
                              f"{TRAIN_LAYOUT}. Fix: " + _conversion(os.path.dirname(
                                  os.path.normpath(root)) or ".", os.path.basename(root)))
        raise LayoutError(f"{train_dir} does not exist; expected {TRAIN_LAYOUT}. Fix: "
                          + _train_layout_fix(os.path.normpath(root)))
    return data_subdirs(train_dir)


def _conversion(mvtec_root: str, class_name: str | None = None) -> str:
    """How to make the training copy of a set in MVTec layout, and pass it."""
    name = os.path.basename(os.path.abspath(mvtec_root))
    return (f"make that copy with `python setup_train_dataset.py --data_path {mvtec_root} "
            f"--root data/{name}-ImageNet` and pass --data_path data/{name}-ImageNet"
            + (f" --classes {class_name}" if class_name else ""))


def _train_layout_fix(root: str) -> str:
    """The fix for a --data_path with no train/ folder, by what it holds instead: one
    class's folder of a training set, or its train/good in MVTec layout, your own images
    (<class>/good, setup_train_dataset.py --custom's input), or nothing recognisable."""
    parent = os.path.dirname(root) or "."
    if os.path.basename(parent) == "train" and os.path.isdir(root):
        grandparent = os.path.dirname(parent) or "."
        if os.path.isdir(os.path.join(grandparent, "test")):  # <set>/<class>/train/good
            return (f"{root} holds the training images of one class of a set in MVTec "
                    "layout: " + _conversion(os.path.dirname(grandparent) or ".",
                                             os.path.basename(grandparent)))
        return (f"{root} is one class's folder of a training set: pass --data_path "
                f"{grandparent} --classes {os.path.basename(root)}")
    if _holds_custom_set(root):
        return _custom_conversion(root, "-ImageNet")
    target = parent if os.path.basename(root) == "train" else root
    return ("pass the folder holding train/ and fg_mask/ as --data_path, or make it with "
            f"`python setup_train_dataset.py --data_path <MVTec AD> --root {target}`")


def _holds_custom_set(root: str) -> bool:
    """Whether `root` holds your own images as setup_train_dataset.py --custom takes
    them: <class>/good (or ok)."""
    return os.path.isdir(root) and any(os.path.isdir(os.path.join(root, c, d))
                                       for c in data_subdirs(root) for d in NORMAL_DIRS)


def _custom_conversion(root: str, use: str) -> str:
    """How to convert your own images at `root` (setup_train_dataset.py --custom), and
    which of its outputs to pass: `use` '-ImageNet' (training) or '_mvtec' (evaluation)."""
    name = os.path.basename(os.path.abspath(root))
    return (f"{root} holds your own images (<class>/good): convert them with `python "
            f"setup_train_dataset.py --custom {root} --data_path data/{name}_mvtec "
            f"--root data/{name}-ImageNet --make_fg_masks` and pass --data_path "
            f"data/{name}{use}")


def list_test_classes(root: str) -> list[str]:
    """Class folders of a set in MVTec layout (those holding a test/ folder)."""
    if not os.path.isdir(root):
        raise LayoutError(f"{root} does not exist; expected {TEST_LAYOUT}")
    return [c for c in data_subdirs(root) if os.path.isdir(os.path.join(root, c, "test"))]


def find_test_classes(root: str) -> list[str]:
    """list_test_classes, or a LayoutError with the expected layout and the nearest
    folder that has it (a class folder's parent, a sub-folder holding the set)."""
    available = list_test_classes(root)
    if available:
        return available
    root = os.path.normpath(root)
    parent = os.path.dirname(root) or "."
    if os.path.isdir(os.path.join(root, "test")):
        hint = (f"{root} is one class's folder: pass its parent, --data_path {parent} "
                f"--classes {os.path.basename(root)}")
    elif os.path.isdir(os.path.join(root, "train")):
        hint = (f"{root} looks like an ImageNet-layout training set (train/<class>): "
                "evaluation reads the MVTec-format set it was made from (the --data_path "
                "given to setup_train_dataset.py)")
    elif _holds_custom_set(root):
        hint = _custom_conversion(root, "_mvtec")
    else:
        nearest = [os.path.join(root, d) for d in data_subdirs(root)
                   if list_test_classes(os.path.join(root, d))]
        hint = (f"did you mean --data_path {nearest[0]}?" if nearest else
                "pass the folder of an MVTec-format set (MVTec AD, BTAD, MPDD, the demo set)")
    raise LayoutError(f"--data_path {root} holds no <class>/test folder; expected "
                      f"{TEST_LAYOUT}. {hint}")


def check_test_classes(root: str, classes: Sequence[str], skip_bad_images: bool = False
                       ) -> None:
    """Every class's layout, and (unless bad files are skipped) every test image's header
    and every ground-truth mask's presence, integrity and size against its image, from
    file headers and the mask's chunks: all problems of all classes in one error before
    any work, not when class N is reached."""
    problems = []
    for name in classes:
        items, missing = MVTecTestDataset._list(
            root, name, os.path.isdir(os.path.join(root, name, "ground_truth")))
        if skip_bad_images:
            continue
        problems += [f"missing: {m}" for m in missing]
        problems += [p for p in (mask_problem(mask, image, image_required=True)
                                 if mask is not None and os.path.lexists(mask)
                                 else image_problem(image)
                                 for image, _, _, mask in items) if p]
    if problems:
        raise BadFileError(f"{len(problems)} test file problem(s):{bullet_list(problems)}"
                           f"\nFix: {FIX_BAD_FILE}")


def fg_mask_path(root: str, class_name: str, image_path: str) -> str:
    """Foreground-mask file of a training image, from the folder structure (not by
    replacing the text 'train' in the path, docs/method.md 9.8)."""
    stem = os.path.splitext(os.path.basename(image_path))[0]
    return os.path.join(root, "fg_mask", class_name, stem + ".png")


def _check_classes(classes: Sequence[str]) -> list[str]:
    classes = [classes] if isinstance(classes, str) else list(classes)
    if not classes:
        raise ValueError("no classes given")
    dupes = sorted({c for c in classes if classes.count(c) > 1})
    if dupes:
        raise ValueError(f"classes listed twice: {', '.join(dupes)}")
    return classes


def list_train_samples(root: str, classes: Sequence[str]) -> list[tuple[str, int]]:
    """(image path, class index) over <root>/train/<class>/*, class index = position in
    `classes`; every missing folder is listed in one error. Links to missing files are
    listed: the datasets refuse them or, with --skip_bad_images, leave them out."""
    available = list_train_classes(root)
    samples, problems = [], []
    for idx, name in enumerate(classes):
        folder = os.path.join(root, "train", name)
        files = list_images(folder, keep_dangling=True) if os.path.isdir(folder) else None
        if files is None:
            problems.append(f"{folder} (class folder missing)")
        elif not files:
            problems.append(f"{folder} (no image files {'/'.join(IMAGE_EXTENSIONS)})")
        else:
            note_resize(folder, files)
            samples += [(f, idx) for f in files]
    if problems:
        raise LayoutError("training set is incomplete:\n  " + "\n  ".join(problems)
                          + f"\nexpected {TRAIN_LAYOUT}; classes present: "
                          f"{', '.join(available) or 'none'}")
    return samples


def check_train_classes(root: str, classes: Sequence[str], fg_mask: bool = True
                        ) -> list[tuple[str, int]]:
    """The training set's class folders and (with `fg_mask`) every image's foreground
    mask: present, readable and of its image's aspect ratio, from file headers before
    any work. -> the training samples (list_train_samples)."""
    samples = list_train_samples(root, classes)
    if fg_mask:
        items = [(p, c, fg_mask_path(root, classes[c], p)) for p, c in samples]
        _require_masks(items, root, list(classes))
        check_fg_masks([(p, m) for p, _, m in items])
    return samples


def mask_problem(mask: str | io.BytesIO, image_path: str, mask_name: str | None = None, *,
                 image_required: bool = False) -> str | None:
    """Why the mask `mask` (a file, or the bytes of a zip entry named `mask_name`) cannot
    serve its image: unreadable, or of another aspect ratio; None if it can. An unreadable
    image is a problem only if `image_required` (test images, checked up front with their
    ground-truth masks); a training image's own loader names it with its own fix
    (--skip_bad_images). No pixel is decoded: PIL reads the sizes from the headers and
    verify() walks the mask's chunks and checksums, which catches an empty or truncated
    file (the size alone does not) at ~0.1 ms per 1024 px mask, where a full decode takes
    ~5 ms."""
    name = mask_name or mask
    if isinstance(mask, str) and (link := dangling_link(mask)):
        return f"{link} (mask of {image_path})"
    try:
        with Image.open(mask) as img:
            mask_size = oriented_size(img)  # reads chunks, which verify() must precede
        if isinstance(mask, io.BytesIO):
            mask.seek(0)
        with Image.open(mask) as img:
            img.verify()
    except Exception as e:  # any failure means training could not read it
        return f"{name} (mask of {image_path}) is unreadable: {_unreadable(e)}"
    try:
        with Image.open(image_path) as img:
            image_size, stored = oriented_size(img), img.size
            depth = _depth_problem(img, image_path) if image_required else None
    except Exception:
        return image_problem(image_path) if image_required else None
    if depth:
        return depth
    problem = _aspect_problem(mask_size, name, image_size, image_path)
    if problem and image_size != stored and _aspect_problem(mask_size, name, stored,
                                                            image_path) is None:
        problem += (f" (it is stored {stored[0]}x{stored[1]}, turned by its EXIF orientation "
                    "as a viewer shows it: the mask was drawn on the stored pixels; save the "
                    "mask turned the same way, or the image upright without the tag)")
    return problem


def image_problem(image_path: str) -> str | None:
    """Why `image_path` is not an image, from its header alone (~0.1 ms; a 16-bit or float
    one decoded, _depth_problem); None if it is."""
    if link := dangling_link(image_path):
        return link
    try:
        with Image.open(image_path) as img:
            _orientation(img)  # a turned TIFF is refused (open_rgb)
            return _depth_problem(img, image_path)
    except Exception as e:
        return f"{image_path} is unreadable: {_unreadable(e)}"


def _depth_problem(img: Image.Image, path: str) -> str | None:
    """What open_rgb refuses of a 16-bit image (8-bit values in a 16-bit file, grey or
    colour), a 32-bit or a float one, found up front: such images alone are decoded here
    (the header says which), every other image stays a header read."""
    colour16 = _sixteen_bit_colour(img)
    if not (colour16 or img.mode.startswith(("I", "F"))):
        return None
    img.load()
    try:
        if colour16:
            _check_sixteen_bit_colour(img, path)
        else:
            _eight_bit(img, path)
    except BadFileError as e:
        return str(e)
    return None


def _unreadable(e: Exception) -> str:
    if isinstance(e, UnidentifiedImageError):  # its text names a path or a BytesIO object
        return "empty, cut short or not an image"
    return str(e) or type(e).__name__


def check_fg_masks(pairs: Iterable[tuple[str, str]]) -> None:
    """Every present mask of the (image, mask) pairs readable and of its image's aspect
    ratio (mask_problem); all problems in one error, so that training does not stop
    on one of them after tokenizing every image."""
    problems = [p for p in (mask_problem(m, i) for i, m in pairs if os.path.isfile(m)) if p]
    if problems:
        raise bad_fg_masks_error(problems, FIX_BAD_FG_MASK)


def bad_fg_masks_error(problems: Sequence[str], fix: str) -> BadFileError:
    """One error for the masks on disk and those in a zip, with the fix that applies."""
    return BadFileError(f"{len(problems)} foreground mask(s) unreadable or not of their "
                        f"image's aspect ratio:{bullet_list(problems)}\nFix: {fix}")


def images_per_rank(num_images: int, world_size: int) -> int:
    """What each of W ranks reads per epoch: DistributedSampler (drop_last=False) gives
    each ceil(N / W), padding by repeats, and so does ImageCache, which follows it."""
    return -(-num_images // world_size)


def require_full_batch(num_images: int, batch_size: int) -> None:
    """Training steps on full batches only (every rank steps as often), so each rank
    needs at least `batch_size` samples (images_per_rank). Checked before tokenizing,
    from the image count."""
    world = get_world_size()
    per_rank = images_per_rank(num_images, world)
    if per_rank >= batch_size:
        return
    share = (f"each of {world} processes gets {per_rank} of the {num_images} training images"
             if world > 1 else f"there are {num_images} training images")
    fixes = [f"pass --batch_size {per_rank} or less"] + (
        ["use fewer processes"] if world > 1 else [])
    raise FlagError(f"--batch_size {batch_size} makes no full batch: {share}. Fix: "
                    + ", or ".join(fixes))


def holdout_split(labels: Sequence[int], class_names: Sequence[str], fraction: float,
                  seed: int = 0) -> tuple[list[int], list[int]]:
    """(kept, held_out) sample indices: per class a seeded round(fraction * n) (at least
    one when fraction > 0).

    The draw is seeded by the class *name* and uses the class's samples in dataset
    order, so the same images are held out whether the class is alone (prototypes) or
    among others (flow training).
    """
    if not 0.0 <= fraction < 1.0:
        raise FlagError(f"holdout fraction {fraction} must lie in [0, 1)")
    labels = np.asarray(labels)
    kept, held = [], []
    for k, name in enumerate(class_names):
        idx = np.flatnonzero(labels == k)
        n_hold = 0 if fraction == 0 or len(idx) == 0 else max(1, round(fraction * len(idx)))
        if n_hold >= len(idx) > 0:
            raise FlagError(f"class '{name}' has {len(idx)} training image(s): too few to "
                            f"hold out {n_hold} (--holdout {fraction}); add images or "
                            "pass --holdout 0")
        gen = np.random.default_rng([seed, zlib.crc32(name.encode())])
        mask = np.zeros(len(idx), dtype=bool)
        mask[gen.choice(len(idx), n_hold, replace=False)] = True
        kept += idx[~mask].tolist()
        held += idx[mask].tolist()
    return sorted(kept), sorted(held)


# ----------------------------------------------------------------------------------------
# Decoding and transforms
# ----------------------------------------------------------------------------------------
def _resize_crop(size: int) -> list:
    return [T.Resize(size, interpolation=T.InterpolationMode.BICUBIC, antialias=True),
            T.CenterCrop(size), T.ToTensor()]


def build_transforms(img_size: int = 224, mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                     std: Sequence[float] = IMAGENET_DEFAULT_STD) -> T.Compose:
    """ViT / ProtoFlow input: Resize(bicubic, antialias) + CenterCrop + mean/std
    (docs/method.md 4, 7)."""
    return T.Compose(_resize_crop(img_size) + [T.Normalize(mean, std)])


def flow_train_transform(img_size: int = 224, mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                         std: Sequence[float] = IMAGENET_DEFAULT_STD) -> T.Compose:
    """Flow-training augmentation (docs/method.md 6): RandomResizedCrop(scale 0.2-1, bicubic)
    + horizontal flip. Prototypes and held-out scores use the test transform instead
    (build_transforms), so that they match the features seen at test time."""
    return T.Compose([T.RandomResizedCrop(img_size, scale=(0.2, 1.0),
                                          interpolation=T.InterpolationMode.BICUBIC),
                      T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])


def to_uint8(image: Image.Image) -> torch.Tensor:
    """RGB image -> (3, H, W) uint8, the values ToTensor divides by 255."""
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def normalize_uint8(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor
                    ) -> torch.Tensor:
    """(..., 3, H, W) uint8 -> float32 (x / 255 - mean) / std, mean/std (3, 1, 1): the
    arithmetic of ToTensor + Normalize, so the result is the same to the bit. 255 is a
    tensor on the images' device: given a Python number, CUDA multiplies by its
    reciprocal instead, one bit off for about half the pixel values."""
    return images.float().div(torch.full((), 255.0, device=images.device)).sub(mean).div(std)


def build_token_transform(token_size: int) -> T.Compose:
    """Tokenizer input: the same resize and crop at the tokenizer's size, RGB in [0, 1]."""
    return T.Compose(_resize_crop(token_size))


def mask_to_tensor(mask: Image.Image, size: int) -> torch.Tensor:
    """Binary mask image -> BoolTensor (size, size): Resize(nearest) + CenterCrop, aligned
    with the image."""
    mask = T.functional.resize(mask, size, interpolation=T.InterpolationMode.NEAREST)
    mask = T.functional.center_crop(mask, size)
    return torch.from_numpy(np.asarray(mask) > 0)


def patch_any(mask: torch.Tensor, patch_size: int = 16) -> torch.Tensor:
    """(..., H, W) bool -> (..., L) bool, row-major: a patch is set if any of its pixels is."""
    h, w = mask.shape[-2:]
    grid = mask.reshape(*mask.shape[:-2], h // patch_size, patch_size, w // patch_size,
                        patch_size)
    return grid.any(-1).any(-2).flatten(-2)  # (..., h/p, w/p) -> (..., L)


def _missing(path: str, kind: str, fix: str) -> BadFileError:
    return BadFileError(f"{kind} {dangling_link(path) or path + ' does not exist'}; {fix}")


# How a viewer turns an image of each EXIF orientation (as ImageOps.exif_transpose does)
_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
              4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
              6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation (1 = as stored), from the header, before any pixel is decoded:
    the one source of it for the size checks and the pixels alike. A PNG's eXIf chunk
    counts only where it comes before the pixels, where the PNG specification puts it
    (PIL would decode the whole file to look further; one after them, which the decode
    fills in, is ignored everywhere). A turned TIFF is refused: Pillow 13 turns it while
    decoding (and reports the turned size), older versions do not."""
    if img.format == "PNG" and "exif" not in img.info:
        return 1
    orientation = img.getexif().get(EXIF_ORIENTATION, 1)
    if img.format == "TIFF" and orientation != 1:
        raise BadFileError(f"{img.filename or 'a TIFF file'} is stored turned or mirrored "
                           f"(TIFF orientation {orientation}), which Pillow versions read "
                           "differently: save it upright (the turn applied, orientation 1)")
    return orientation


def oriented_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) as the image is shown: a camera's EXIF orientation 5-8 (a quarter
    turn) swaps the stored sizes. From the header alone; open_rgb and open_mask apply the
    same orientation to the pixels."""
    w, h = img.size
    return (h, w) if _orientation(img) in (5, 6, 7, 8) else (w, h)


def _turned(img: Image.Image, orientation: int) -> Image.Image:
    """The decoded image turned as a viewer shows it, by the `orientation` read from its
    header (_orientation), so that a mask drawn on what the user sees aligns with what
    the model sees."""
    transpose = _TRANSPOSE.get(orientation)
    return img if transpose is None else img.transpose(transpose)


def _eight_bit(img: Image.Image, path: str) -> Image.Image:
    """16-bit grey (and 32-bit integer grey holding 16-bit values, as PIL opens some
    16-bit files) by its top 8 bits, by the file's bit depth as OpenCV reads it, never by
    the image's own maximum: every image of a set scales alike. Refused: float images
    (their range is not given) and one holding 8-bit values only, whose top 8 bits are
    all 0 (cv2.imwrite of 0-255 values as uint16): it would read black."""
    if img.mode == "F":
        raise BadFileError(f"{path} holds 32-bit float pixels, whose range the file does "
                           "not give: save it as an 8- or 16-bit image")
    arr = np.asarray(img).astype(np.int64)
    if arr.size and (arr.min() < 0 or arr.max() > 65535):
        raise BadFileError(f"{path} holds {img.mode} values from {arr.min()} to {arr.max()}, "
                           "outside 16 bits: save it as an 8- or 16-bit image")
    _refuse_eight_bit_values(path, img.mode, int(arr.max(initial=0)))
    return Image.fromarray((arr >> 8).astype(np.uint8))


def _refuse_eight_bit_values(path: str, kind: str, top: int) -> None:
    """A 16-bit image whose largest value `top` is under 256 would read all black by its
    top 8 bits: refused (an all-0 image is black either way)."""
    if 0 < top < 256:
        raise BadFileError(f"{path} holds {kind} values no larger than {top}: read by "
                           "its top 8 bits, as every 16-bit image is, it would be all black; "
                           "save it as an 8-bit image, or scale it to the 16-bit range "
                           "(x 257)")


# Pillow's raw modes of 16 bits a channel (big-endian, little-endian, native): not BMP's
# packed 5-6-5 'BGR;16'
SIXTEEN_BIT_RAWMODE = re.compile(r";16[BLN]$")


def _sixteen_bit_colour(img: Image.Image) -> bool:
    """Whether an opened, not yet loaded image stores 16 bits a colour channel (PNG's
    RGB;16B, TIFF's RGB;16N, ...), which Pillow decodes to 8 by the top byte."""
    if img.mode.startswith(("I", "F")):
        return False  # 16-bit grey: _eight_bit reads its values
    for tile in img.tile:  # (codec, extents, offset, args): a tuple before Pillow 11
        args = tile[3] if len(tile) > 3 else None
        raw = args[0] if isinstance(args, tuple) and args else args
        if isinstance(raw, str) and SIXTEEN_BIT_RAWMODE.search(raw):
            return True
    return False


def _check_sixteen_bit_colour(img: Image.Image, path: str) -> None:
    """The refusal _eight_bit makes of a grey image, for a 16-bit colour one (or grey
    with alpha): Pillow keeps only its top 8 bits, so a decode whose colour is all black
    is checked against the file's own 16-bit values (OpenCV's read; a decode with any
    colour has a value of 256 or more). Alpha is left out: it does not light a pixel."""
    if _colour_channels(np.asarray(img)).any():
        return
    import cv2  # only here: a rare file, and every command would pay its import
    arr = cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise BadFileError(f"{path} stores 16-bit colour that decodes all black, and OpenCV "
                           "cannot read its 16-bit values to tell why: save it as an 8-bit "
                           "image")
    _refuse_eight_bit_values(path, f"16-bit {img.mode}",
                             int(_colour_channels(arr).max(initial=0)))


def _colour_channels(arr: np.ndarray) -> np.ndarray:
    """(H, W[, C]) pixels without their alpha channel: grey+alpha (C = 2) and RGBA or
    BGRA (C = 4) lose their last channel."""
    return arr[..., :-1] if arr.ndim == 3 and arr.shape[-1] in (2, 4) else arr


MAX_ASPECT = 16  # an image's long side over its short side; see open_rgb


def too_large(path: str, error: Exception) -> str:
    """Why an image over Pillow's pixel limit (its guard against decompression bombs) is
    refused, with the fix: said alike when it is read (open_rgb) and when a conversion
    checks its header (dataset_converters.header_problem)."""
    return f"{path} is too large to open ({error}): downscale it"


def open_rgb(path: str) -> Image.Image:
    """Fully decoded RGB image as a viewer shows it (EXIF orientation applied); grey,
    16-bit grey (its top 8 bits) and palette images are converted. Refused: an image
    longer than MAX_ASPECT times its width (the resize of its short side to 224 px would
    take gigabytes, and the centre crop would keep a sliver of it), one over Pillow's
    pixel limit (a guard against decompression bombs) and a 16-bit one of 8-bit values
    (it would read black), each naming the fix."""
    if not os.path.isfile(path):
        raise _missing(path, "image", FIX_BAD_FILE)
    try:
        with Image.open(path) as img:
            if max(img.size) > MAX_ASPECT * max(1, min(img.size)):
                raise BadFileError(f"{path} is {img.size[0]}x{img.size[1]} pixels, more than "
                                   f"{MAX_ASPECT} times longer than wide: crop it to the part "
                                   f"to score ({SKIP_HINT})")
            orientation = _orientation(img)  # from the header: load() may read more
            colour16 = _sixteen_bit_colour(img)  # from the tiles, which load() clears
            img.load()
            if colour16:
                _check_sixteen_bit_colour(img, path)
            img = _turned(img, orientation)
            if img.mode.startswith(("I", "F")):
                img = _eight_bit(img, path)
            return img.convert("RGB")
    except BadFileError:
        raise
    except Image.DecompressionBombError as e:
        raise BadFileError(f"{too_large(path, e)} ({SKIP_HINT})") from None
    except Exception as e:  # any decoder failure means the file is bad
        raise BadFileError(f"cannot read image {path}: {e}; {FIX_BAD_FILE}") from e


def mask_defects(arr: np.ndarray) -> np.ndarray:
    """(H, W) values of a mask -> (H, W) bool defect pixels.

    A label map (more than two values, all whole and none above LABEL_MAP_VALUES: an id
    per defect kind, as VisA's): every non-zero pixel, as VisA's converter reads them;
    half the maximum would drop the lower ids. Two values: the larger one (a grey
    background, 128/255, is no defect). Anything else (a blurred, resized or
    JPEG-compressed binary mask, a float mask of 0-1): above half the maximum."""
    top = arr.max(initial=0)
    if top <= 0:
        return np.zeros(arr.shape, bool)
    defects = arr == top
    if np.count_nonzero(defects) + np.count_nonzero(arr == 0) == arr.size:
        return defects  # 0 and one value, the common case: no sort of the pixels
    values = np.unique(arr)
    if len(values) == 2:
        return defects
    if values[-1] <= LABEL_MAP_VALUES and (values % 1 == 0).all():
        return arr != 0
    return arr > values[-1] / 2


def _colour_and_alpha(img: Image.Image) -> tuple[np.ndarray, np.ndarray] | None:
    """((H, W, C) colour, (H, W) alpha) of a mask with transparency (an alpha channel, or
    a palette's or colour key's 'transparency'), else None."""
    if img.mode in ("LA", "La", "RGBA", "RGBa"):
        arr = np.asarray(img)
        return arr[..., :-1], arr[..., -1]
    if img.mode == "PA" or (img.mode in ("P", "L", "RGB") and "transparency" in img.info):
        arr = np.asarray(img.convert("RGBA"))
        return arr[..., :3], arr[..., 3]
    return None


def mask_values(img: Image.Image) -> np.ndarray:
    """(H, W) values of a decoded mask, for mask_defects.

    Alpha, where it varies: with one colour over the pixels not fully transparent, it
    alone draws the mask (black or white paint on a transparent layer, which its colours
    would read as all normal or all defect, whatever colour the transparent pixels
    store); with colours that vary there too, the colours draw it and fully transparent
    pixels are background (a transparent background stored white; an opaque mask with a
    transparent margin). Otherwise alpha is dropped (an opaque layer).
    A palette's ids are categories: every non-zero id is a defect (VOC's 255 boundary and
    its class 1 alike; index 0 the background, as in VisA's and VOC's masks). But a
    palette of greys is read by its colours, as a grey mask, and so is one whose index 0
    is a colour while black is among those used (Pillow's quantize() may list red first),
    black the background. A float mask by its values (finite, >= 0); a colour mask by
    its strongest channel, so that no colour reads darker than the background."""
    layers = _colour_and_alpha(img)
    if layers is not None:
        colour, alpha = layers
        if alpha.size and alpha.min() != alpha.max():
            drawn = colour[alpha > 0]  # (K, C): the pixels not fully transparent
            if (drawn == drawn[:1]).all():
                return alpha
            if alpha.min() == 0:
                return np.where(alpha == 0, 0, colour.max(axis=-1))  # (H, W)
    if img.mode in ("LA", "La"):
        img = img.getchannel(0)
    elif img.mode == "PA":
        img = img.convert("P")
    if img.mode == "P":
        ids = np.asarray(img)
        palette = np.zeros(768, np.int64)
        colours = img.getpalette() or []
        palette[:len(colours)] = colours[:768]
        rgb = palette.reshape(256, 3)
        used = rgb[np.unique(ids)]  # (K, 3)
        if (used == used[:, :1]).all():
            return np.asarray(img.convert("L"))
        if rgb[0].any() and not used.any(axis=1).all():  # index 0 a colour, black used
            return np.asarray(img.convert("RGB")).max(axis=-1)
        return (ids != 0).astype(np.uint8)
    if img.mode == "F":
        return _float_mask(np.asarray(img))
    if img.mode in ("1", "L") or img.mode.startswith("I"):
        return np.asarray(img)
    return np.asarray(img.convert("RGB")).max(axis=-1)


def _float_mask(values: np.ndarray) -> np.ndarray:
    """A float mask's values, refused when NaN, infinite or negative: 0 is the
    background and half the maximum the threshold (mask_defects), which they break."""
    bad = [word for word, hit in (("NaN", np.isnan(values).any()),
                                  ("infinite", np.isinf(values).any()),
                                  ("negative", (values < 0).any())) if hit]
    if bad:
        raise BadFileError(f"it holds {' and '.join(bad)} float values, where a mask's are "
                           "0 (background) or more: save it as an 8-bit mask (0 background, "
                           "255 defect)")
    return values


def open_mask(path: str, kind: str = "mask", fix: str = FIX_BAD_FILE,
              label_map: bool = False) -> Image.Image:
    """Binary 'L' image (0/255) of a mask file (mask_values, mask_defects), oriented as
    its image. `label_map`: the file is known to hold an id per defect pixel (VisA's),
    so every non-zero value is a defect, however many ids it has."""
    if not os.path.isfile(path):
        raise _missing(path, kind, fix)
    try:
        with Image.open(path) as img:
            orientation = _orientation(img)  # from the header: load() may read more
            img.load()
            values = mask_values(_turned(img, orientation))  # (H, W)
    except Exception as e:
        raise BadFileError(f"cannot read {kind} {path}: {e}; {fix}") from e
    defects = values != 0 if label_map else mask_defects(values)  # (H, W) bool
    return Image.fromarray(defects.astype(np.uint8) * 255)


def _aspect_problem(mask_size: tuple[int, int], mask_path: str, image_size: tuple[int, int],
                    image_path: str) -> str | None:
    """Image and mask are resized and cropped separately: they align iff their aspect
    ratios agree (sizes may differ)."""
    (mw, mh), (iw, ih) = mask_size, image_size
    # 1 % relative: a mask saved at a rounded size of a rescaled image (1024 -> 699x700)
    # passes; after Resize + CenterCrop to 224 px it is off by at most ~2 px, well
    # inside a 16 px patch. Anything further off (100x300 for 256x256) is another image.
    if abs(mw * ih - iw * mh) > 0.01 * iw * mh:
        return (f"{mask_path} is {mw}x{mh} but its image {image_path} is {iw}x{ih}: they "
                "cannot be aligned")
    return None


def _check_aspect(mask: Image.Image, mask_path: str, image: Image.Image, image_path: str,
                  fix: str) -> None:
    problem = _aspect_problem(mask.size, mask_path, image.size, image_path)
    if problem:
        raise BadFileError(f"{problem}; {fix}")


def _drop_bad_files(items: list[_Item], check: Callable[[_Item], object],
                    what: str) -> tuple[list[_Item], list[str]]:
    """Decode every item once (threads: PIL releases the GIL while decoding); return the
    good items and one message per bad one, and warn listing all bad ones (rank 0). The messages
    lose their advice to pass --skip_bad_images, which the run already does."""
    def run(item: _Item) -> str | None:
        try:
            check(item)
        except BadFileError as e:
            return str(e).replace(f", {SKIP_HINT}", "").replace(f" ({SKIP_HINT})", "")
        return None

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        results = list(progress(pool.map(run, items), total=len(items),
                                desc=f"checking {what}", disable=len(items) < 100))
    bad = [r for r in results if r is not None]
    if bad and get_rank() == 0:  # every rank reads the same files (checked): one list
        warnings.warn(f"{what}: left out {len(bad)} bad file(s) of {len(items)}:\n  "
                      + "\n  ".join(bad), DataWarning, stacklevel=3)
    return [it for it, r in zip(items, results) if r is None], bad


# ----------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------
class TrainImageDataset(Dataset):
    """Normal training images as (transform(RGB image), class index), for ProtoFlow and
    its prototypes (which bring their own augmentation)."""

    def __init__(self, root: str, classes: Sequence[str],
                 transform: Callable[[Image.Image], object] | None = None,
                 skip_bad_images: bool = False) -> None:
        self.root, self.classes, self.transform = root, _check_classes(classes), transform
        self.samples = list_train_samples(root, self.classes)
        self.bad_files: list[str] = []
        if skip_bad_images:
            self.samples, self.bad_files = _drop_bad_files(
                self.samples, lambda s: open_rgb(s[0]), "training images")
            _require_each_class(self.samples, self.classes, root)
        else:
            _refuse_missing(p for p, _ in self.samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[object, int]:
        path, class_idx = self.samples[index]
        image = open_rgb(path)
        return (self.transform(image) if self.transform else image), class_idx


def _refuse_missing(paths: Iterable[str | None], missing: Sequence[str] = ()) -> None:
    """Without --skip_bad_images: `missing` (files not found) and links to missing files
    among `paths`, all in one error before any work (a stat each); a file that is there
    but unreadable is found when decoded."""
    problems = list(missing) + [p for p in map(dangling_link, filter(None, paths)) if p]
    if problems:
        raise BadFileError(f"{len(problems)} file(s) missing:{bullet_list(problems)}"
                           f"\nFix: {FIX_BAD_FILE}")


def _require_each_class(samples: list[tuple], classes: list[str], root: str) -> None:
    left = {s[1] for s in samples}
    empty = [c for i, c in enumerate(classes) if i not in left]
    if empty:
        raise BadFileError(f"no usable images left for class(es) {', '.join(empty)} in "
                           f"{root} after leaving out bad files (see the warning above)")


class _TokenImageDataset(Dataset):
    """Image + token image (or cached tokens) for a list of image files; shared by the
    training and the test sets, and the interface `cache_tokens` works on."""
    image_paths: list[str]

    def __init__(self, token_size: int, img_size: int, mean: Sequence[float],
                 std: Sequence[float], patch_size: int) -> None:
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.token_size, self.img_size, self.patch_size = token_size, img_size, patch_size
        self.mean, self.std = tuple(mean), tuple(std)  # the images' normalisation
        self.num_patches = (img_size // patch_size) ** 2
        self.transform = build_transforms(img_size, mean, std)
        self.token_transform = build_token_transform(token_size)
        self.tokens: torch.Tensor | None = None  # (N, L) once cached

    def __len__(self) -> int:
        return len(self.image_paths)

    def load_token_image(self, index: int) -> torch.Tensor:
        """(3, S, S) in [0, 1] at the tokenizer's size."""
        return self.token_transform(open_rgb(self.image_paths[index]))

    def attach_tokens(self, tokens: torch.Tensor) -> None:
        """Serve precomputed tokens (N, L) instead of token images from now on."""
        if tokens.shape != (len(self), self.num_patches) or tokens.is_floating_point():
            raise ValueError(f"tokens must be an integer tensor ({len(self)}, "
                             f"{self.num_patches}), got {tuple(tokens.shape)} {tokens.dtype}")
        self.tokens = tokens

    def _encode(self, index: int, image: Image.Image) -> dict[str, torch.Tensor]:
        out = {"image": self.transform(image)}  # (3, img_size, img_size)
        if self.tokens is None:
            out["token_image"] = self.token_transform(image)  # (3, S, S)
        else:
            out["tokens"] = self.tokens[index].long()  # (L,)
        return out


class PretrainDataset(_TokenImageDataset):
    """Training set of the reconstruction ViT (docs/method.md 4): per sample the normalised
    image, the token image (or cached tokens), the foreground patch mask and the class.

    fg_mask=False needs no mask files and marks every patch as foreground, so that
    foreground-limited masking degenerates to masking anywhere. ``freq_weights``
    (MaskingPolicy.frequency: (1, 3, H, W) -> (1, L)) adds each image's frequency
    weights, computed here, in the loader's workers, so that masks are drawn from
    host-resident inputs.
    """

    def __init__(self, root: str, classes: Sequence[str], token_size: int,
                 img_size: int = 224, mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                 std: Sequence[float] = IMAGENET_DEFAULT_STD, patch_size: int = 16,
                 fg_mask: bool = True, skip_bad_images: bool = False,
                 freq_weights: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        super().__init__(token_size, img_size, mean, std, patch_size)
        self.root, self.classes = root, _check_classes(classes)
        self.freq_weights = freq_weights
        self.resize = T.Compose(_resize_crop(img_size)[:2])  # build_transforms' PIL steps
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        items = [(p, c, fg_mask_path(root, self.classes[c], p) if fg_mask else None)
                 for p, c in list_train_samples(root, self.classes)]
        self.bad_files: list[str] = []
        if skip_bad_images:
            items, self.bad_files = _drop_bad_files(items, self._load, "training images")
            _require_each_class(items, self.classes, root)
        else:
            _refuse_missing(p for p, _, _ in items)
            if fg_mask:
                _require_masks(items, root, self.classes)
        self.samples = [(p, c) for p, c, _ in items]  # (image path, class index)
        self.image_paths = [p for p, _, _ in items]
        self.mask_paths = [m for _, _, m in items]  # None entries when fg_mask=False

    def _load(self, item: tuple[str, int, str | None]) -> tuple[Image.Image, Image.Image | None]:
        path, _, mask_path = item
        image = open_rgb(path)
        if mask_path is None:
            return image, None
        mask = open_mask(mask_path, "foreground mask", FIX_FG_MASK)
        _check_aspect(mask, mask_path, image, path, FIX_FG_MASK)
        return image, mask

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | int]:
        return self.item(index)

    def item(self, index: int, uint8: bool = False) -> dict[str, torch.Tensor | int]:
        """Sample `index`: 'image' (3, S, S) normalised (or 'image_u8' (3, S, S) uint8,
        resized and cropped, with `uint8`: what ImageCache keeps), 'fg_mask' (L,),
        'freq_weights' (L,) when set, 'tokens' (L,) once cached (else 'token_image'),
        'class_idx', 'index'."""
        path, class_idx = self.samples[index]
        image, mask = self._load((path, class_idx, self.mask_paths[index]))
        pixels = to_uint8(self.resize(image))  # (3, S, S)
        normalized = normalize_uint8(pixels, self.mean, self.std)
        out: dict[str, torch.Tensor | int] = (
            {"image_u8": pixels} if uint8 else {"image": normalized})
        if self.tokens is None:
            out["token_image"] = self.token_transform(image)  # (3, S_tok, S_tok)
        else:
            out["tokens"] = self.tokens[index].long()  # (L,)
        if mask is None:
            out["fg_mask"] = torch.ones(self.num_patches, dtype=torch.bool)
        else:
            fg = mask_to_tensor(mask, self.img_size)  # (img_size, img_size)
            out["fg_mask"] = patch_any(fg, self.patch_size)  # (L,)
        if self.freq_weights is not None:
            out["freq_weights"] = self.freq_weights(normalized[None])[0]  # (L,)
        out["class_idx"], out["index"] = class_idx, index
        return out


class _Decoded(Dataset):
    """A PretrainDataset's samples with uint8 images, for ImageCache's fill."""

    def __init__(self, dataset: PretrainDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | int]:
        return self.dataset.item(index, uint8=True)


class ImageCache:
    """A small training set decoded and resized once (--cache_images), then served in
    batches like DataLoader(dataset, DistributedSampler(seed), drop_last=True): the
    same batches, to the bit, in one process and under DDP.

    Kept: the uint8 images and the visual tokens in host memory ('ram'; each batch is
    gathered, then pinned on its way to a GPU by utils.to_device, so pinning the whole
    store would only lock memory) or on `device` ('device'); the foreground patch masks,
    frequency weights and class indices on the host, where MaskingPolicy draws the
    masks. Each batch's images are normalised on `device`. PretrainDataset has no random
    augmentation, so nothing else is left to do per step. With DDP each rank keeps all N
    images: the sampler's order (one permutation of all N per epoch, padded by repeats
    to a multiple of the world size, then every world_size-th) gives a rank other images
    every epoch, and every image is seen in every epoch. Iterate after set_epoch(epoch),
    as a DistributedSampler; the order depends only on (seed, epoch, rank, world size).
    """

    def __init__(self, dataset: PretrainDataset, batch_size: int, *, where: str,
                 device: str | torch.device, seed: int = 0, num_workers: int = 0) -> None:
        if where not in IMAGE_CACHES:
            raise ValueError(f"--cache_images {where!r}: choose 'ram' or 'device'")
        if dataset.tokens is None:
            raise ValueError("ImageCache needs the visual tokens: call cache_tokens first")
        self.dataset, self.device, self.batch_size = dataset, torch.device(device), batch_size
        self.seed, self.epoch = seed, 0
        keep = self.device if where == "device" else torch.device("cpu")
        store: dict[str, torch.Tensor] = {}  # key -> (N, ...), row = index
        loader = DataLoader(_Decoded(dataset), batch_size=64, num_workers=num_workers,
                            generator=torch.Generator())  # the global stream untouched
        start = 0
        for batch in progress(loader, desc="decoding images once", disable=len(dataset) < 256):
            rows = slice(start, start + len(batch["index"]))
            for key, value in batch.items():
                if key not in store:  # filled in place, batch by batch: one copy of the
                    # set at any time, and the workers' shared memory holds only theirs
                    kept = key in ("image_u8", "tokens")  # (N, 3, S, S) uint8, (N, L) int64
                    store[key] = torch.empty((len(dataset), *value.shape[1:]),
                                             dtype=value.dtype, device=keep if kept else "cpu")
                store[key][rows] = value
            start = rows.stop
        self.store = store
        self.mean, self.std = dataset.mean.to(self.device), dataset.std.to(self.device)
        self.num_steps = len(self._sampler()) // batch_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_steps

    def _sampler(self) -> DistributedSampler:
        """The DataLoader path's sampler at this seed and epoch."""
        sampler = build_sampler(self.dataset, seed=self.seed)
        sampler.set_epoch(self.epoch)
        return sampler

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        order = torch.tensor(list(self._sampler()))  # (ceil(N / W),) this rank's, host
        kept = self.store["image_u8"].device
        order_kept = order.to(kept)  # one copy per epoch when the images are on the device
        for step in range(self.num_steps):
            rows = slice(step * self.batch_size, (step + 1) * self.batch_size)
            sel, sel_kept = order[rows], order_kept[rows]
            images = self.store["image_u8"].index_select(0, sel_kept)  # (B, 3, S, S) uint8
            batch = {key: self.store[key].index_select(0, sel)
                     for key in ("fg_mask", "freq_weights", "class_idx", "index")
                     if key in self.store}
            batch["image"] = normalize_uint8(to_device(images, self.device), self.mean,
                                             self.std)  # (B, 3, S, S) float32
            batch["tokens"] = to_device(self.store["tokens"].index_select(0, sel_kept),
                                        self.device)
            yield batch


def cache_bytes(dataset: PretrainDataset) -> int:
    """What ImageCache keeps of `dataset` per process: (3, S, S) uint8 images, (L,) int64
    tokens, bool patch masks, float32 frequency weights and the indices."""
    per_image = 3 * dataset.img_size ** 2 + dataset.num_patches * (8 + 1 + 4) + 16
    return len(dataset) * per_image


def auto_cache(needed: int, processes: int, available: int | None,
               read: tuple[int, int] | None = None) -> tuple[str, str]:
    """--cache_images auto: 'ram' where the node's `processes`, each keeping `needed`
    bytes, fit in CACHE_SHARE of its `available` memory, else 'none'; and the line that
    says so. Decoding once trained as fast as the DataLoader's PNG decoding within noise
    where the step is the bottleneck, and 10-14x as fast on a GPU at batch 64 (README
    'Speed'). `read` (images an epoch reads, of all): an epoch cut short by
    --max_steps_per_epoch reads fewer than all, and decoding every one first (each start)
    would cost more than it saves: 'none'."""
    gb = 1e9
    if read is not None and read[0] < read[1]:
        return "none", (f"--cache_images auto: none (--max_steps_per_epoch reads {read[0]} of "
                        f"the {read[1]} images per epoch; decoding them all first would cost "
                        "more)")
    if available is None:
        return "none", ("--cache_images auto: none (this system does not tell its free "
                        "memory; --cache_images ram keeps the decoded images, "
                        f"{needed / gb:.2f} GB per process)")
    fits = needed * processes <= CACHE_SHARE * available
    return ("ram" if fits else "none"), (
        f"--cache_images auto: {'ram' if fits else 'none'} (the decoded images take "
        f"{needed / gb:.2f} GB per process, x{processes} on this node; {available / gb:.1f} "
        f"GB available{'' if fits else f', over the {CACHE_SHARE:.0%} it may take'})")


def build_train_loader(dataset: PretrainDataset, batch_size: int, *, cache_images: str,
                       device: torch.device, seed: int, num_workers: int, pin_memory: bool
                       ) -> tuple[Iterable[dict], DistributedSampler | ImageCache]:
    """The training batches (run_pretraining.py --cache_images) and what orders them
    (call its `set_epoch(epoch)` before each epoch): a DataLoader over a
    DistributedSampler, or the same batches from an ImageCache, which orders them itself.
    Full batches only, so that every rank steps as often; none is an error."""
    require_full_batch(len(dataset), batch_size)
    if cache_images != "none":
        loader = sampler = ImageCache(dataset, batch_size, where=cache_images, device=device,
                                      seed=seed, num_workers=num_workers)
    else:
        sampler = build_sampler(dataset, seed=seed)
        # its own generator: each epoch's iterator then leaves the global stream (drop
        # path) alone, as ImageCache does
        loader = DataLoader(dataset, sampler=sampler, batch_size=batch_size,
                            num_workers=num_workers,
                            pin_memory=pin_memory and device.type == "cuda", drop_last=True,
                            persistent_workers=num_workers > 0,
                            generator=torch.Generator().manual_seed(seed))
    return loader, sampler


def _require_masks(items: list[tuple[str, int, str]], root: str, classes: list[str]) -> None:
    """Checked up front (a stat per file) so that a missing mask stops training at the
    start, not hours into it."""
    missing = [(c, m) for _, c, m in items if not os.path.isfile(m)]
    if not missing:
        return
    lines, nested = [], []
    for idx, name in enumerate(classes):
        files = [m for c, m in missing if c == idx]
        total = sum(1 for _, c, _ in items if c == idx)
        if files and len(files) == total:
            folder = os.path.join(root, "fg_mask", name)
            lines.append(f"{folder}/ (no masks for any of its {total} images)")
            # fg_mask.zip holds fg_mask/<class>/: unzipped inside fg_mask/ by hand
            if os.path.isdir(os.path.join(root, "fg_mask", "fg_mask", name)):
                nested.append(name)
        else:
            lines += [dangling_link(m) or m for m in files]
    fix = FIX_FG_MASK
    if nested:
        deep = os.path.join(root, "fg_mask", "fg_mask")
        fix = (f"the masks of {', '.join(nested)} are one folder too deep, in {deep}/ (the "
               f"zip unpacked inside fg_mask/): move its class folders up into "
               f"{os.path.join(root, 'fg_mask')}/, or {FIX_FG_MASK}")
    raise BadFileError(f"{len(missing)} foreground mask(s) missing:{bullet_list(lines)}"
                       f"\nFix: {fix}")


def _mask_listing(gt_dir: str) -> dict[tuple[str, str], str]:
    """{(stem, lower-case extension): file name} of the masks in `gt_dir`, so that a mask
    is found whatever the case of its extension, as images are (000_mask.PNG)."""
    listing: dict[tuple[str, str], str] = {}
    for name in sorted(os.listdir(gt_dir)):
        stem, ext = os.path.splitext(name)
        key = (stem, ext.lower())
        if ext.lower() in IMAGE_EXTENSIONS and (key not in listing or ext == ext.lower()):
            listing[key] = name  # 000_mask.png before 000_mask.PNG when both exist
    return listing


def _mask_near_miss(gt_dir: str, stem: str, listing: dict[tuple[str, str], str],
                    stems: set[str]) -> str:
    """Why an image's mask was not found, where a near miss shows it: a file of the
    image's stem named otherwise (000_gt.png, 000-mask.png; not 000_1_mask.png, the mask
    of 000_1, one of `stems`, the folder's image stems), or the defect's folder named in
    another case (ground_truth/Crack for test/crack). '' where none does."""
    if listing:
        near = [(name, ext) for (other, ext), name in listing.items()
                if other.startswith(stem) and not other[len(stem):len(stem) + 1].isalnum()
                and other not in stems and other.removesuffix("_mask") not in stems]
        return (f": found {some_names([n for n, _ in near], 3)}, rename it to "
                f"{stem}_mask{near[0][1]}" if near else "")
    parent, defect = os.path.split(gt_dir)
    if os.path.isdir(gt_dir):
        return ""
    cased = [d for d in hint_subdirs(parent) if d.lower() == defect.lower()]
    return (f": {os.path.join(parent, cased[0])} differs from the test folder {defect} "
            "only by case; rename one" if cased else f": no folder {gt_dir}")


def hint_subdirs(folder: str) -> list[str]:
    """The sub-folders of `folder`, sorted, for a hint in a message: [] where it cannot
    be listed, and a link to nothing skipped (data_subdirs refuses one, as data)."""
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return []
    return [d for d in names if not is_junk_dir(d) and os.path.isdir(os.path.join(folder, d))]


def ground_truth_near_miss(root: str, class_name: str) -> str | None:
    """A class's folder beside test/ named like one of masks but not ground_truth (gt/,
    masks/, Ground_Truth/), which is never read: the class is then evaluated on image
    labels only. None where there is none."""
    folder = os.path.join(root, class_name)
    near = [d for d in hint_subdirs(folder)
            if d != "ground_truth" and MASK_FOLDER.fullmatch(d)]
    return os.path.join(folder, near[0]) if near else None


def _note_outside_splits(class_dir: str) -> None:
    """A note naming the images of a class of a set in MVTec layout that lie outside its
    train/, test/ and ground_truth/ (<class>/extra.png, <class>/validation/good/): no tool
    reads them, so none is left out unseen. A folder named like one of masks (gt/) has
    its own note (ground_truth_near_miss)."""
    found = loose_images(class_dir)
    for d in hint_subdirs(class_dir):
        if d not in ("train", "test", "ground_truth") and not MASK_FOLDER.fullmatch(d):
            found += _images_below(os.path.join(class_dir, d), class_dir)
    if found:
        _note_once(class_dir, f"left out {len(found)} image(s) outside its train/, test/ "
                              f"and ground_truth/ ({some_names(found, 3)}), which no tool "
                              "reads: a test image lies in test/<defect>/ ('good' for "
                              "normal ones), its mask in ground_truth/<defect>/")


def _refuse_normal_case(test_dir: str, defects: Sequence[str]) -> None:
    """test/Good would be scored as a defect type (its images as defective ones, with
    masks looked for): the normal folder's name is matched exactly, as MVTec AD's."""
    cased = [d for d in defects if d.lower() in NORMAL_DIRS and d not in NORMAL_DIRS]
    if cased:
        fix = (f"move its images into {cased[0].lower()}/" if cased[0].lower() in defects
               else f"rename it to {cased[0].lower()}")
        raise LayoutError(f"{os.path.join(test_dir, cased[0])}: the normal test images' "
                          f"folder is named {' or '.join(NORMAL_DIRS)}, in lower case; {fix}")


def _find_gt_mask(gt_dir: str, listing: dict[tuple[str, str], str], stem: str) -> str | None:
    for key in [(stem + "_mask", ext) for ext in IMAGE_EXTENSIONS] + \
               [(stem, ext) for ext in IMAGE_EXTENSIONS]:
        if key in listing:
            return os.path.join(gt_dir, listing[key])
    return None


class MVTecTestDataset(_TokenImageDataset):
    """One class of a set in MVTec layout (docs/method.md 7): image, token image, label
    (0 = normal), ground-truth mask, name ('<defect>_<stem>', unique within the class),
    defect type.

    A class without a ground_truth/ folder (a custom set, setup_train_dataset.py --custom)
    has image labels only: `has_ground_truth` is False and every gt_mask is zeros."""

    def __init__(self, root: str, class_name: str, token_size: int, img_size: int = 224,
                 mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                 std: Sequence[float] = IMAGENET_DEFAULT_STD, patch_size: int = 16,
                 skip_bad_images: bool = False) -> None:
        super().__init__(token_size, img_size, mean, std, patch_size)
        self.root, self.class_name = root, class_name
        self.has_ground_truth = os.path.isdir(os.path.join(root, class_name, "ground_truth"))
        items, missing = self._list(root, class_name, self.has_ground_truth)
        note_resize(os.path.join(root, class_name, "test"), [s[0] for s in items], img_size)
        if not skip_bad_images:
            _refuse_missing([p for s in items for p in (s[0], s[3])], missing)
        self.bad_files: list[str] = []
        if skip_bad_images:
            items, self.bad_files = _drop_bad_files(items, self._load,
                                                    f"test images of {class_name}")
            if not items:
                raise BadFileError(f"no usable test images left in {root}/{class_name}")
        # (image path, label, defect type, gt-mask path or None)
        self.samples = items
        self.image_paths = [s[0] for s in items]
        self.labels = [s[1] for s in items]
        self.defect_types = [s[2] for s in items]
        self.mask_paths = [s[3] for s in items]

    @staticmethod
    def _list(root: str, class_name: str, has_ground_truth: bool
              ) -> tuple[list[tuple], list[str]]:
        test_dir = os.path.join(root, class_name, "test")
        if not os.path.isdir(test_dir):
            what = "class folder" if not os.path.isdir(os.path.join(root, class_name)) \
                else "test folder"
            found = list_test_classes(root)
            raise LayoutError(f"{test_dir} does not exist ({what} missing); expected "
                              f"{TEST_LAYOUT}; classes present in {root}: "
                              f"{', '.join(found) or 'none'}")
        items, missing, empty = [], [], []
        defects = data_subdirs(test_dir)
        _refuse_normal_case(test_dir, defects)
        for defect in defects:
            files = list_images(os.path.join(test_dir, defect), keep_dangling=True)
            if not files:
                empty.append(os.path.join(test_dir, defect))
            label = 0 if defect in NORMAL_DIRS else 1
            pixel_labels = label and has_ground_truth
            gt_dir = os.path.join(root, class_name, "ground_truth", defect)
            listing = _mask_listing(gt_dir) if pixel_labels and os.path.isdir(gt_dir) else {}
            stems = {os.path.splitext(os.path.basename(f))[0] for f in files}
            for f in files:
                stem = os.path.splitext(os.path.basename(f))[0]
                mask = _find_gt_mask(gt_dir, listing, stem) if pixel_labels else None
                if pixel_labels and mask is None:
                    missing.append(f"ground-truth mask {os.path.join(gt_dir, stem)}_mask.png "
                                   f"(or {stem}.png) for {f}"
                                   + _mask_near_miss(gt_dir, stem, listing, stems))
                    # BadFileError at load time names the file if it is kept
                    mask = os.path.join(gt_dir, stem + "_mask.png")
                items.append((f, label, defect, mask))
        if not items:
            raise LayoutError(f"no test images under {test_dir} (empty folders: "
                              f"{', '.join(empty) or 'no defect folders'}); expected "
                              f"{TEST_LAYOUT}")
        if empty:
            _note_once(test_dir, f"left out {len(empty)} empty folder(s) "
                                 f"({some_names([os.path.basename(e) for e in empty], 3)}): "
                                 "no image of that type is scored")
        _refuse_shared_result_names(test_dir, items)
        loose = loose_images(test_dir)
        if loose:
            _note_once(test_dir, f"left out {len(loose)} image(s) beside its defect "
                                 f"folders ({some_names(loose, 3)}): a test image lies in "
                                 "test/<defect>/ ('good' for normal ones); move each into "
                                 "one to score it")
        _note_outside_splits(os.path.join(root, class_name))
        return items, missing

    def _load(self, item: tuple) -> tuple[Image.Image, Image.Image | None]:
        path, _, _, mask_path = item
        image = open_rgb(path)
        if mask_path is None:
            return image, None
        mask = open_mask(mask_path, "ground-truth mask")
        _check_aspect(mask, mask_path, image, path, FIX_BAD_FILE)
        return image, mask

    def __getitem__(self, index: int) -> dict[str, object]:
        item = self.samples[index]
        image, mask = self._load(item)
        out: dict[str, object] = dict(self._encode(index, image))
        if mask is None:
            gt = torch.zeros(1, self.img_size, self.img_size)
        else:
            gt = mask_to_tensor(mask, self.img_size).float()[None]  # (1, S, S) in {0, 1}
        out.update(label=item[1], gt_mask=gt, name=_result_name(item[2], item[0]),
                   defect_type=item[2], index=index)
        return out


def _result_name(defect: str, path: str) -> str:
    """A test image's name in results, heatmaps and image_scores.csv: '<defect>_<stem>'
    (MVTec's '<defect>/000.png' gives 'scratch_000')."""
    return f"{defect}_{os.path.splitext(os.path.basename(path))[0]}"


def test_set_contents(root: str, class_name: str) -> tuple[str, dict[str, str]]:
    """A class's test images and ground-truth masks by name and content, in one read of
    its test files: (the set's sha256, {test image path: its content's sha256}). A resumed
    evaluation reuses the class's record only for the same set, as an image replaced,
    added or removed changes every metric; the images' own hashes find those a model
    trained on (run_test.trained_test_images). A ground_truth folder counts, and so do
    files that are missing (a mask not made yet) or unreadable."""
    has_ground_truth = os.path.isdir(os.path.join(root, class_name, "ground_truth"))
    items, _ = MVTecTestDataset._list(root, class_name, has_ground_truth)
    digest = hashlib.sha256(b"ground_truth\n" if has_ground_truth else b"")
    images = {}
    for image, _, _, mask in items:
        for path in (image, mask):
            if path is None:
                continue
            try:  # an unreadable file (--skip_bad_images leaves it out) counts as such
                content = file_sha256(path) if os.path.isfile(path) else "missing"
            except OSError as e:
                content = f"unreadable:{e.errno}"
            name = os.path.relpath(path, root).encode("utf-8", "surrogateescape")
            digest.update(name + b"\0" + content.encode() + b"\n")
            if path == image:
                images[image] = content
    return digest.hexdigest(), images


def _refuse_shared_result_names(test_dir: str, items: Sequence[tuple]) -> None:
    """Two test images of one result name (scratch/head_001.png, scratch_head/001.png)
    would write one heatmap over the other and share a row name in image_scores.csv."""
    shared = _shared_keys((_result_name(defect, path), os.path.relpath(path, test_dir))
                          for path, _, defect, _ in items)
    groups = [f"{name}: {', '.join(paths)}" for name, paths in shared.items()]
    if groups:
        raise BadFileError(f"{test_dir} holds {len(groups)} group(s) of test images with one "
                           f"result name ('<defect folder>_<file stem>'), whose heatmaps and "
                           f"image_scores.csv rows would collide:{bullet_list(groups)}\nFix: "
                           "rename one file (and its ground-truth mask) of each group")


class NoReadableImageError(BadFileError):
    """An ImageListDataset with --skip_bad_images of which no image is readable; its
    `bad_files` say why, for a caller that goes on without it (predict.py's class)."""

    def __init__(self, message: str, bad_files: list[str]) -> None:
        super().__init__(message)
        self.bad_files = bad_files


class ImageListDataset(_TokenImageDataset):
    """Unlabelled images to score (predict.py): image, token image, name, index; the
    same transforms as the test set, so an image scores as it would in run_test.py.
    `what` names them in messages (predict.py: "images of class 'brick'"), and a bad
    image's error by it."""

    def __init__(self, image_paths: Sequence[str], names: Sequence[str], token_size: int,
                 img_size: int = 224, mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                 std: Sequence[float] = IMAGENET_DEFAULT_STD, patch_size: int = 16,
                 skip_bad_images: bool = False, what: str | None = None) -> None:
        super().__init__(token_size, img_size, mean, std, patch_size)
        if len(image_paths) != len(names) or not image_paths:
            raise ValueError(f"ImageListDataset needs one name per image and at least one "
                             f"image, got {len(image_paths)} images, {len(names)} names")
        self.what = what
        items = list(zip(image_paths, names))
        self.bad_files: list[str] = []
        if skip_bad_images:
            label = what or "images"
            items, self.bad_files = _drop_bad_files(items, lambda it: open_rgb(it[0]), label)
            if not items:
                raise NoReadableImageError(f"none of the {len(image_paths)} {label} is "
                                           "readable (see the warning above)", self.bad_files)
        self.image_paths = [p for p, _ in items]
        self.names = [n for _, n in items]
        folder = os.path.commonpath([os.path.dirname(os.path.abspath(p))
                                     for p in self.image_paths])
        note_resize(folder, self.image_paths, img_size)

    def __getitem__(self, index: int) -> dict[str, object]:
        try:
            image = open_rgb(self.image_paths[index])
        except BadFileError as e:
            if self.what is None:
                raise
            raise BadFileError(f"{self.what}: {e}") from None
        out: dict[str, object] = dict(self._encode(index, image))
        out.update(name=self.names[index], index=index)
        return out


# ----------------------------------------------------------------------------------------
# Visual-token cache
# ----------------------------------------------------------------------------------------
class _TokenImages(Dataset):
    def __init__(self, dataset: _TokenImageDataset, indices: list[int]) -> None:
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int) -> tuple[int, torch.Tensor]:
        return self.indices[j], self.dataset.load_token_image(self.indices[j])


def token_cache_path(cache_dir: str, fingerprint: str, compute: str = "cpu") -> str:
    return os.path.join(cache_dir, f"tokens_{fingerprint[:32]}_{compute}.pt")


def token_compute_key(tokenizer: torch.nn.Module, device: str | torch.device) -> str:
    """What a tokenizer's codes depend on besides its weights and the preprocessing:
    the device type and its arithmetic. On CUDA, DALL-E's convolutions run in fp16 and
    cuDNN convolutions (and matmuls, when allowed) in TF32, so codes made there can
    differ from the CPU's float32 ones: each gets its own cache."""
    device = torch.device(device)
    parts = [device.type, f"mm-{torch.get_float32_matmul_precision()}"]
    if device.type == "cuda":
        modules = tokenizer.modules() if isinstance(tokenizer, torch.nn.Module) else ()
        if any(getattr(m, "use_float16", False) for m in modules):
            parts.append("fp16")
        if torch.backends.cudnn.allow_tf32:
            parts.append("tf32conv")
        if torch.backends.cuda.matmul.allow_tf32:
            parts.append("tf32mm")
    return "-".join(parts)


def _stamp(path: str) -> tuple[str, int, int]:
    try:
        st = os.stat(path)
    except OSError as e:
        raise BadFileError(f"image {path} is not accessible: {e}; {FIX_BAD_FILE}") from e
    return os.path.realpath(path), st.st_size, st.st_mtime_ns


def _load_token_store(path: str, fingerprint: str, preprocess: str, compute: str
                      ) -> dict[str, tuple[tuple[int, int], torch.Tensor]]:
    if not os.path.isfile(path):
        return {}
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if not (payload["format"] == TOKEN_CACHE_FORMAT
                and payload["fingerprint"] == fingerprint
                and payload["preprocess"] == preprocess and payload["compute"] == compute):
            return {}
        stamps, tokens = payload["stamps"].tolist(), payload["tokens"]
        return {p: (tuple(s), tokens[i])
                for i, (p, s) in enumerate(zip(payload["paths"], stamps))}
    except Exception as e:  # a cache can always be rebuilt; say so and do it
        warnings.warn(f"token cache {path} is unreadable ({e}); recomputing it", DataWarning,
                      stacklevel=3)
        return {}


def _save_token_store(path: str, fingerprint: str, preprocess: str, compute: str,
                      store: dict[str, tuple[tuple[int, int], torch.Tensor]]) -> None:
    """Atomic: a crash or a concurrent reader never sees half a file."""
    paths = sorted(store)
    payload = {"format": TOKEN_CACHE_FORMAT, "fingerprint": fingerprint,
               "preprocess": preprocess, "compute": compute, "paths": paths,
               "stamps": torch.tensor([store[p][0] for p in paths], dtype=torch.long),  # (N, 2)
               "tokens": torch.stack([store[p][1] for p in paths])}  # (N, L) int32
    save_on_master(payload, path)


def cache_tokens(dataset: _TokenImageDataset, tokenizer: torch.nn.Module, cache_dir: str,
                 batch_size: int = 32, device: str | torch.device = "cpu",
                 num_workers: int = 0) -> dict[str, int]:
    """Tokenize every image of `dataset` once and make the dataset serve 'tokens' (L,)
    instead of 'token_image', so that a training step runs no tokenizer.

    Valid because the token image is never augmented and the tokenizer is frozen.
    Cache file: one per tokenizer fingerprint (sha256 of its weights) and compute key
    (token_compute_key: device type and precision) in `cache_dir`, also tagged with the
    token preprocessing. Entry key: the image's real path, size and mtime_ns; a stat
    per file costs microseconds where hashing MVTec AD's gigabytes would take a minute
    per start, and rewriting an image changes its mtime. Only misses are computed;
    entries of other datasets sharing the file are kept. Distributed: call on every
    rank; rank 0 alone reads the file and sends every rank its misses and cached codes,
    each rank tokenizes its share of those misses, the shares are gathered, rank 0
    writes the file. So the shares always cover the misses, whatever another rank would
    see in `cache_dir` (a partial save of rank 0, another node's local folder).
    """
    if tokenizer.image_size != dataset.token_size:
        raise ValueError(f"the dataset makes {dataset.token_size} px token images but the "
                         f"tokenizer takes {tokenizer.image_size} px: build the dataset with "
                         f"token_size={tokenizer.image_size}")
    fingerprint = str(tokenizer.fingerprint)
    preprocess = f"{TOKEN_PREPROCESS}-{dataset.token_size}"
    compute = token_compute_key(tokenizer, device)
    path = token_cache_path(cache_dir, fingerprint, compute)
    rank, world = get_rank(), get_world_size()
    store: dict[str, tuple[tuple[int, int], torch.Tensor]] = {}
    stamps: list[tuple[str, int, int]] = []
    view: tuple[list[int], torch.Tensor] | None = None
    if rank == 0:
        store = _load_token_store(path, fingerprint, preprocess, compute)
        stamps = [_stamp(p) for p in dataset.image_paths]
        tokens = torch.zeros(len(stamps), dataset.num_patches, dtype=torch.int32)  # (N, L)
        misses = []
        for i, (real, *stat) in enumerate(stamps):
            if real in store and store[real][0] == tuple(stat):
                tokens[i] = store[real][1]
            else:
                misses.append(i)
        view = misses, tokens
    misses, tokens = all_gather_object(view)[0]  # rank 0's, on every rank
    vocab = getattr(tokenizer, "vocab_size", None)
    mine = misses[rank::world]

    def tokenize_share() -> dict[int, torch.Tensor]:
        """This rank's share of the misses: dataset index -> (L,) int32."""
        loader = DataLoader(_TokenImages(dataset, mine), batch_size=batch_size,
                            num_workers=num_workers, shuffle=False)
        computed: dict[int, torch.Tensor] = {}
        for step, (indices, images) in enumerate(progress(loader, desc="visual tokens",
                                                          disable=not mine)):
            with torch.inference_mode():
                codes = tokenizer.get_codebook_indices(images.to(device))  # (B, L)
            if codes.shape != (len(indices), dataset.num_patches) or codes.is_floating_point():
                raise ValueError(f"tokenizer returned {tuple(codes.shape)} {codes.dtype} for "
                                 f"{len(indices)} images; expected integer codes "
                                 f"({len(indices)}, {dataset.num_patches}) for the dataset's "
                                 f"{dataset.img_size // dataset.patch_size}^2 patch grid")
            codes = codes.to("cpu", torch.int32, copy=True)  # outside inference mode
            if vocab is not None and (codes.min() < 0 or codes.max() >= vocab):
                raise ValueError(f"tokenizer returned codes outside [0, {vocab})")
            computed.update(zip(indices.tolist(), codes))
            if rank == 0 and (step + 1) % _SAVE_EVERY_BATCHES == 0:
                _save_token_store(path, fingerprint, preprocess, compute,
                                  _with_codes(store, stamps, computed))
        return computed

    # an image only this rank reads (unreadable, a link to nothing) is every rank's error,
    # not a gloo traceback on the others at the gather below
    computed = on_every_rank(tokenize_share)
    gathered = {i: row for part in all_gather_object(computed) for i, row in part.items()}
    for i, row in gathered.items():
        tokens[i] = row
    if rank == 0 and misses:
        _save_token_store(path, fingerprint, preprocess, compute,
                          _with_codes(store, stamps, gathered))
    dataset.attach_tokens(tokens)  # (N, L)
    return {"hits": len(tokens) - len(misses), "misses": len(misses)}


def _with_codes(store: dict[str, tuple[tuple[int, int], torch.Tensor]],
                stamps: list[tuple[str, int, int]], codes: dict[int, torch.Tensor]
                ) -> dict[str, tuple[tuple[int, int], torch.Tensor]]:
    """`store` updated with `codes` {dataset index: (L,) int32}, each under its image's
    path and stamp (rank 0's: another rank's paths may differ)."""
    for i, row in codes.items():
        real, *stat = stamps[i]
        store[real] = (tuple(stat), row)
    return store
