r"""Convert an MVTec-format dataset into the ImageNet layout PMAD trains on (docs/method.md 4).

  <data_path>/<class>/train/good/*   ->  <root>/train/<class>/*
  released fg_mask.zip               ->  <root>/fg_mask/<class>/<stem>.png  (--fg_mask_zip)
  estimated foreground masks         ->  <root>/fg_mask/<class>/<stem>.png  (--make_fg_masks)

The layout is checked before anything is written; re-running skips identical files
(and after --custom removes those its new split no longer lists).
`--make_demo DIR` first writes the offline demo set (demo_data.py) into DIR; `--visa DIR`
and `--custom DIR` first convert VisA or a folder of your own images into the MVTec
layout at --data_path (dataset_converters.py).

  python setup_train_dataset.py --data_path data/mvtec_anomaly_detection --fg_mask_zip fg_mask.zip
  python setup_train_dataset.py --visa data/VisA_20220922 --data_path data/visa_mvtec \
      --root data/VisA-ImageNet --make_fg_masks
  python setup_train_dataset.py --custom my_images --data_path data/my_mvtec \
      --root data/my-ImageNet --make_fg_masks --textures fabric
"""
from __future__ import annotations

import argparse
import errno
import filecmp
import os
import shutil
import sys
import zipfile
from collections import Counter
from typing import Callable, Sequence


from dataset_converters import (DEFAULT_TEST_FRACTION, convert_custom, convert_visa,
                                custom_classes, read_visa_split, remove_unlisted)
from datasets import (IMAGE_EXTENSIONS, MVTEC_CLASSES, NORMAL_DIRS, TEXTURES, BadFileError,
                      LayoutError, data_subdirs, fg_mask_path, is_image_name, list_images,
                      loose_images, resolve_train_root)
from demo_data import DEFECT_AREA_BOUNDS, WORLDS, make_demo_dataset
from fg_masks import REPLACE_IN_DATA_PATH, FgMaskZip, make_fg_masks, mask_coverage
from utils import (UniqueNames, cli, fraction_arg, int_at_least, prepare_output_dir,
                   progress, refuse_a_file, some_names, write_atomic)

DEFAULT_ROOT = "data/Mvtec-ImageNet"
DEMO_ROOT = "data/demo_imagenet"
SOURCE_LAYOUT = "<data_path>/<class>/train/good/*.png and <data_path>/<class>/test/good/*.png"


# ------------------------------------------------------------ copy / hard-link the images
def _normal_dir(class_dir: str, split: str) -> str | None:
    for name in NORMAL_DIRS:
        path = os.path.join(class_dir, split, name)
        if os.path.isdir(path):
            return path
    return None


def find_classes(data_path: str, classes: Sequence[str] | None) -> list[str]:
    """The classes to convert: those asked for, else every class folder in `data_path`
    (all 15 when it is MVTec AD, so that a half-extracted download is caught)."""
    if not os.path.isdir(data_path):
        raise LayoutError(f"{data_path} does not exist; expected {SOURCE_LAYOUT}. "
                          "Download MVTec AD and pass its folder as --data_path")
    if classes:
        return list(dict.fromkeys(classes))
    found = [d for d in data_subdirs(data_path)
             if os.path.isdir(os.path.join(data_path, d, "train"))]
    if not found:
        raise LayoutError(f"no class folders with a train/ folder in {data_path}; "
                          f"expected {SOURCE_LAYOUT}")
    missing = [c for c in MVTEC_CLASSES if c not in found]
    if set(found) <= set(MVTEC_CLASSES) and missing:  # a class of its own: not MVTec AD
        raise LayoutError(f"{data_path} looks like MVTec AD but lacks the class folders "
                          f"{', '.join(missing)}; extract the full download, or pass "
                          "--classes to convert a subset")
    return found


def plan_copies(data_path: str, root: str, classes: Sequence[str]
                ) -> dict[str, dict[str, list[tuple[str, str]]]]:
    """{class: {'train': [(source, destination)]}}: the normal training images, the only
    ones training reads; every missing folder, link to nothing and pair of images of one
    stem, of every class, is listed in one error before anything is written."""
    plan, problems = {}, []
    for name in classes:
        class_dir = os.path.join(data_path, name)
        if not os.path.isdir(class_dir):
            problems.append(f"{class_dir} (class folder missing)")
            continue
        plan[name] = {}
        src_dir = _normal_dir(class_dir, "train")
        try:
            files = list_images(src_dir) if src_dir else []
        except BadFileError as e:  # a link to nothing, images of one stem: listed with the rest
            problems.append(str(e).replace("\n", "\n  "))
            continue
        if src_dir is None:
            problems.append(_no_train_good_problem(os.path.join(class_dir, "train")))
        elif not files:
            problems.append(f"{src_dir} (no image files {'/'.join(IMAGE_EXTENSIONS)})")
        plan[name]["train"] = [(f, os.path.join(root, "train", name, os.path.basename(f)))
                               for f in files]
        if src_dir is not None:
            _note_not_trained(os.path.join(class_dir, "train"), src_dir)
    if problems:
        raise LayoutError(f"{data_path} is not a complete MVTec-format dataset:\n  "
                          + "\n  ".join(problems) + f"\nexpected {SOURCE_LAYOUT}")
    return plan


def _note_not_trained(train_dir: str, normal_dir: str) -> None:
    """A note on stderr naming the images in <class>/train that are not in its normal
    folder: beside it (train/001.png) or in another folder (train/scratch/), neither of
    which is copied (training reads normal images only), so none is left out unseen."""
    loose = loose_images(train_dir)
    others = []
    for d in data_subdirs(train_dir):
        folder = os.path.join(train_dir, d)
        if folder != normal_dir:
            count = sum(is_image_name(n) for _, _, names in os.walk(folder) for n in names)
            if count:
                others.append(f"{d}/ ({count})")
    if loose or others:
        what = " and ".join(
            ([f"{len(loose)} image(s) beside {os.path.basename(normal_dir)}/ "
              f"({some_names(loose, 3)})"] if loose else [])
            + ([f"the images in {', '.join(others)}"] if others else []))
        print(f"note: {train_dir}: left out {what}: training reads only the normal images "
              f"in {normal_dir}; move any normal image there to train on it", file=sys.stderr)


def _no_train_good_problem(train_dir: str) -> str:
    """<class>/train/good is missing; where the training images lie directly in train/
    (a flat copy), how many and that they must move into train/good/."""
    good = os.path.join(train_dir, "good")
    loose = loose_images(train_dir) if os.path.isdir(train_dir) else []
    if not loose:
        return f"{good} (folder missing)"
    return (f"{good} (folder missing): {len(loose)} image(s) lie directly in {train_dir} "
            f"({some_names(loose, 3)}); move them into {good}/")


def _identical(src: str, dst: str, link: bool) -> bool:
    """Hard link; when copying also same size and mtime (copy2 keeps the mtime, as
    rsync's quick check assumes) or same bytes. With --link an earlier copy is replaced
    by a link."""
    if os.path.samefile(src, dst):
        return True
    if link:
        return False
    a, b = os.stat(src), os.stat(dst)
    if a.st_size != b.st_size:
        return False
    return a.st_mtime_ns == b.st_mtime_ns or filecmp.cmp(src, dst, shallow=False)


def _place(src: str, dst: str, link: bool) -> None:
    """Copy or hard-link through a temporary name (`write_atomic`), so that a crash
    leaves no half file."""
    write_atomic(dst, lambda tmp: _link(src, tmp) if link else shutil.copy2(src, tmp))


def _link(src: str, tmp: str) -> None:
    """Hard-link the file `src` names: os.link on Linux links a symbolic link itself, and
    a relative one then leads nowhere from its new folder. A symbolic link to another
    file system (a NAS) cannot be hard-linked: it becomes a symbolic link to that file."""
    target = os.path.realpath(src)
    try:
        os.link(target, tmp)
    except OSError as e:
        if e.errno == errno.EXDEV and os.path.islink(src):
            os.symlink(target, tmp)
            return
        raise OSError(f"--link: cannot hard-link {src} to {tmp} ({e}); data_path and root "
                      "must be on the same file system, or drop --link to copy") from e


def sync_files(pairs: list[tuple[str, str]], link: bool, desc: str,
               on_change: Callable[[str], None] | None = None) -> Counter:
    """Counter of 'new', 'unchanged', 'replaced' (a destination differing from its source,
    with --link a copy instead of a link, or a link to nothing). `on_change(dst)` is
    called before a destination whose content changes is replaced (what was made from
    the old file, its foreground mask, no longer applies)."""
    counts: Counter = Counter()
    for src, dst in progress(pairs, desc=desc, unit="file"):
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if os.path.lexists(dst):
            if os.path.exists(dst) and _identical(src, dst, link):
                counts["unchanged"] += 1
                continue
            counts["replaced"] += 1
            # _identical compared the bytes of a copy already; a copy replaced by a link
            # (--link) may hold the same ones
            if on_change is not None and not (link and os.path.exists(dst)
                                              and filecmp.cmp(src, dst, shallow=False)):
                on_change(dst)
        else:
            counts["new"] += 1
        _place(src, dst, link)
    return counts


def _stale_mask_remover(root: str, plan: dict[str, dict[str, list[tuple[str, str]]]]
                        ) -> tuple[Callable[[str], None], list[str]]:
    """on_change for the training copies: the foreground mask of a training image whose
    content changes is deleted (a mask of the old photo would steer the masking to the
    wrong place), for --fg_mask_zip or --make_fg_masks to make again, or the report to
    name as missing. -> (the callback, the masks it removed)."""
    class_of = {dst: name for name, splits in plan.items() for _, dst in splits["train"]}
    removed: list[str] = []

    def drop(dst: str) -> None:
        mask = fg_mask_path(root, class_of[dst], dst)
        if os.path.lexists(mask):
            os.remove(mask)
            removed.append(mask)
    return drop, removed


def _extra_files(plan: dict[str, dict[str, list[tuple[str, str]]]]) -> list[str]:
    """Destination images that no source file maps to (kept, and they will be trained on)."""
    notes = []
    for pairs_by_split in plan.values():
        for pairs in pairs_by_split.values():
            folder = os.path.dirname(pairs[0][1])
            extra = set(list_images(folder)) - {dst for _, dst in pairs}
            if extra:
                notes.append(f"{folder}: {len(extra)} image(s) not in the source, left in "
                             f"place (e.g. {sorted(extra)[0]})")
    return notes


def _remove_untrained(plan: dict[str, dict[str, list[tuple[str, str]]]], root: str) -> int:
    """Delete the files in <root>/train/<class> the plan does not list: after --custom
    remade the split, an image it now holds out must not stay in the training copy; after
    --make_demo wrote fewer training images, the old ones must not be trained on."""
    return sum(remove_unlisted(os.path.join(root, "train", name),
                               {dst for _, dst in splits["train"]})
               for name, splits in plan.items())


# ------------------------------------------------------------------------------ entry point
def _counts(c: Counter) -> str:
    return ", ".join(f"{c[k]} {k}" for k in ("new", "unchanged", "replaced"))


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_path", help="MVTec-format dataset (e.g. data/mvtec_anomaly_detection)")
    p.add_argument("--root", help=f"output folder (default {DEFAULT_ROOT}; "
                                  f"{DEMO_ROOT} with --make_demo)")
    p.add_argument("--link", action="store_true",
                   help="hard-link instead of copying (same file system only)")
    p.add_argument("--classes", nargs="+", action=UniqueNames,
                   help="classes to convert (default: all found)")
    p.add_argument("--fg_mask_zip", help="released fg_mask.zip to unpack into <root>/fg_mask")
    p.add_argument("--make_fg_masks", action="store_true",
                   help="estimate foreground masks for training images that have none")
    p.add_argument("--textures", nargs="+", default=[], metavar="CLASS", action=UniqueNames,
                   help="--make_fg_masks: these classes are textures (foreground everywhere), "
                        f"besides MVTec AD's {', '.join(TEXTURES)}; other classes get an "
                        "estimated object mask")
    p.add_argument("--visa", metavar="DIR",
                   help="first convert VisA (DIR/split_csv/1cls.csv, its 1-class split) into "
                        "the MVTec layout at --data_path")
    p.add_argument("--custom", metavar="DIR",
                   help="first convert your own images, DIR/<class>/good/* and optionally "
                        "DIR/<class>/<defect>/* (no masks), into the MVTec layout at "
                        "--data_path")
    p.add_argument("--custom_test_fraction", type=fraction_arg(), default=DEFAULT_TEST_FRACTION,
                   help="--custom: fraction of each class's normal images held out to "
                        "test/good (rounded, evenly spread; at least 1, never all)")
    p.add_argument("--make_demo", metavar="DIR",
                   help="first write the offline demo set (MVTec format) into DIR and use it "
                        "as --data_path")
    p.add_argument("--demo_world", default="main", choices=tuple(WORLDS),
                   help="--make_demo: the main demo set, or the held-out one (other "
                        "photographs and defect kinds; demo_data.py)")
    p.add_argument("--seed", type=int_at_least(0), default=0,
                   help="seed of the demo set (--make_demo)")
    p.add_argument("--demo_counts", type=int_at_least(1), nargs=3, default=[40, 20, 20],
                   metavar=("TRAIN", "TEST_GOOD", "TEST_DEFECT"),
                   help="--make_demo: images per class: train, good test, defective test")
    p.add_argument("--demo_defect_area", type=float, nargs=2, metavar=("SMALLEST", "LARGEST"),
                   help="--make_demo: defect sizes as fractions of the image, instead of the "
                        "world's (demo_data.WORLDS), within 0.001-0.2 (near 0.001 some kinds "
                        "cannot be made visible: an error names them); README's tuning draws "
                        "are the main world with 0.001 0.01")
    return p


# The flags that only tune one data source: given without it, each is refused (what it
# does: the source's flag to add), not ignored. Their defaults apply once checked.
SOURCE_OPTIONS = {
    "seed": ("seeds the demo set", "make_demo"),
    "demo_world": ("picks the demo set's photographs and defect kinds", "make_demo"),
    "demo_counts": ("sets the demo set's images per class", "make_demo"),
    "custom_test_fraction": ("sets how many of --custom's normal images are held out to "
                             "test/good", "custom"),
}
_NOT_GIVEN = object()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The flags, checked together (one data source; the options each needs)."""
    p = get_args_parser()
    # preset attributes keep argparse from filling in their defaults: what stays
    # _NOT_GIVEN was not on the command line
    args = p.parse_args(argv, argparse.Namespace(**dict.fromkeys(SOURCE_OPTIONS, _NOT_GIVEN)))
    for flag, (what, source) in SOURCE_OPTIONS.items():
        if getattr(args, flag) is _NOT_GIVEN:
            setattr(args, flag, p.get_default(flag))
        elif not getattr(args, source):
            p.error(f"--{flag} {what}: add --{source} DIR")
    sources = [f for f in ("make_demo", "visa", "custom") if getattr(args, f)]
    if len(sources) > 1:
        p.error(f"--{' and --'.join(sources)} each write the data set: pass one")
    if (args.visa or args.custom) and not args.data_path:
        p.error(f"--{sources[0]} needs --data_path: the folder the MVTec-layout copy is "
                "written to (e.g. data/visa_mvtec)")
    if args.textures and not args.make_fg_masks:
        p.error("--textures decides how foreground masks are estimated: add --make_fg_masks")
    if args.make_demo:
        if args.data_path and os.path.abspath(args.data_path) != os.path.abspath(args.make_demo):
            p.error("--make_demo DIR is the data path; do not also pass a different --data_path")
        args.data_path = args.make_demo
    elif not args.data_path:
        p.error("--data_path is required (or --make_demo DIR)")
    if args.demo_defect_area:
        if not args.make_demo:
            p.error("--demo_defect_area sets the sizes of the demo set's defects: add "
                    "--make_demo DIR")
        lo, hi = args.demo_defect_area
        if not DEFECT_AREA_BOUNDS[0] <= lo <= hi <= DEFECT_AREA_BOUNDS[1]:
            p.error(f"--demo_defect_area {lo:g} {hi:g}: give SMALLEST <= LARGEST within "
                    f"{DEFECT_AREA_BOUNDS[0]:g}-{DEFECT_AREA_BOUNDS[1]:g} (fractions of the "
                    "image)")
    args.root = resolve_train_root(args.root or (DEMO_ROOT if args.make_demo else DEFAULT_ROOT))
    return args


def _make_demo(args: argparse.Namespace) -> None:
    """--make_demo: the offline demo set, written as the MVTec-format --data_path with its
    foreground masks already under --root."""
    n_train, n_test_good, n_test_defect = args.demo_counts
    written = make_demo_dataset(args.make_demo, args.root, seed=args.seed,
                                classes=args.classes, n_train=n_train,
                                n_test_good=n_test_good, n_test_defect=n_test_defect,
                                world=args.demo_world,
                                defect_area=args.demo_defect_area and tuple(args.demo_defect_area))
    print(f"demo set: {len(written)} classes written to {args.make_demo} "
          f"(foreground masks in {os.path.join(args.root, 'fg_mask')})")


def _source_classes(args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    """The classes to convert, once --visa or --custom has written the MVTec layout at
    --data_path; --textures must name some of them. Also {copy in --data_path: the
    --visa or --custom file it was copied from}, so that an error names the original."""
    origins: dict[str, str] = {}

    def sync(pairs: list[tuple[str, str]], desc: str) -> Counter:
        origins.update((os.path.normpath(dst), src) for src, dst in pairs)
        return sync_files(pairs, args.link, desc)

    classes = args.classes
    if args.visa:
        if args.textures:  # before writing (the split file's classes: a read of it more)
            _refuse_unknown_textures(args.textures, list(read_visa_split(args.visa,
                                                                         args.classes)))
        classes = list(convert_visa(args.visa, args.data_path, sync, args.classes,
                                    train_copy=os.path.join(args.root, "train")))
    elif args.custom:
        _refuse_unknown_textures(args.textures, custom_classes(args.custom, args.classes))
        classes = convert_custom(args.custom, args.data_path, sync, args.custom_test_fraction,
                                 args.classes, also_writes=[os.path.join(args.root, "train")],
                                 fg_masks=os.path.join(args.root, "fg_mask"))
    classes = find_classes(args.data_path, classes)
    _refuse_unknown_textures(args.textures, classes)
    return classes, origins


def _refuse_unknown_textures(textures: Sequence[str], classes: Sequence[str]) -> None:
    """--textures must name classes to be converted (a typo would estimate that class's
    foreground masks as an object's)."""
    unknown = sorted(set(textures) - set(classes))
    if unknown:
        raise ValueError(f"--textures {' '.join(unknown)}: not among the classes converted "
                         f"({', '.join(sorted(classes))})")


def _report(root: str, classes: Sequence[str]) -> None:
    """Per class the training images and how many have a foreground mask; the classes
    with uncovered images are named, since training would stop on them, and masks it
    would refuse (unreadable, mis-shaped) are an error (mask_coverage)."""
    coverage = mask_coverage(root, classes)  # {class: (with mask, images)}
    rows = [("class", "train", "fg_mask"),
            *((name, str(n), str(m)) for name, (m, n) in coverage.items()),
            ("total", str(sum(n for _, n in coverage.values())),
             str(sum(m for m, _ in coverage.values())))]
    width = max(len(r[0]) for r in rows)
    print()
    print("\n".join(f"{r[0]:<{width}}  {r[1]:>6}  {r[2]:>7}" for r in rows))
    uncovered = [f"{name} ({n - m} of {n})" for name, (m, n) in coverage.items() if m < n]
    if uncovered:
        print("training images without a foreground mask: " + ", ".join(uncovered)
              + "; use --fg_mask_zip fg_mask.zip or --make_fg_masks (or train with "
              "foreground masks off)")
    print(f"training set ready in {root}")


def _replace_advice(args: argparse.Namespace) -> str:
    """Where to replace an unreadable training image (the error names the original):
    --data_path's copy of a --custom or --visa set is rewritten from it at the next run."""
    for flag in ("custom", "visa"):
        if getattr(args, flag):
            return (f"replace that file in --{flag} {getattr(args, flag)} (the converted "
                    "copy in --data_path is rewritten from it) and re-run")
    return REPLACE_IN_DATA_PATH


def run(args: argparse.Namespace) -> None:
    """Check everything (layout, mask zip, --root) before writing anything; then the
    images, the foreground masks (released, then estimated) and the report."""
    refuse_a_file(args.root, "--root")  # before --visa / --custom write --data_path
    if args.fg_mask_zip:
        FgMaskZip.check_file(args.fg_mask_zip)
    if args.make_demo:
        _make_demo(args)
    classes, origins = _source_classes(args)
    plan = plan_copies(args.data_path, args.root, classes)
    masks = FgMaskZip(args.fg_mask_zip, {name: [src for src, _ in plan[name]["train"]]
                                         for name in classes}) if args.fg_mask_zip else None
    prepare_output_dir(args.root, "--root")

    verb = "hard-linking" if args.link else "copying"
    pairs = [pair for name in classes for pair in plan[name]["train"]]
    # --make_demo has just written every demo class's masks for its new images
    drop_stale_mask, stale = _stale_mask_remover(args.root, plan)
    counts = sync_files(pairs, args.link, f"{verb} train",
                        None if args.make_demo else drop_stale_mask)
    print(f"train: {_counts(counts)}")
    if stale:
        print(f"fg_mask: removed {len(stale)} mask(s) of training images whose content "
              f"changed (e.g. {stale[0]}); --make_fg_masks estimates them again (a "
              "--fg_mask_zip unpacks its masks of those names, made for the released images)")
    if args.custom or args.make_demo:  # the training copy holds exactly the new set
        print(f"train: {_remove_untrained(plan, args.root)} file(s) the "
              f"{'custom split' if args.custom else 'demo set'} does not train on removed")
    for note in _extra_files(plan):
        print(f"note: {note}")
    if masks is not None:
        print(f"fg_mask.zip: {_counts(masks.unpack(args.root))}")
        for note in masks.skipped():
            print(f"fg_mask.zip: {note}")
    if args.make_fg_masks:
        make_fg_masks(args.root, classes, textures=[*TEXTURES, *args.textures],
                      sources={dst: origins.get(os.path.normpath(src), src)
                               for src, dst in pairs}, fix=_replace_advice(args))
    _report(args.root, classes)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return cli(lambda: run(args), user_errors=(OSError, ValueError, zipfile.BadZipFile))


if __name__ == "__main__":
    sys.exit(main())
