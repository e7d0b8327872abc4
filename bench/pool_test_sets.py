"""One MVTec-format folder with the training images of one draw of a world and the test
images of several: the same distribution as one draw, with several times its test
images, so that a choice of recipe can rest on gaps that the test images' luck would not
make (docs/heldout.md: a tuning draw of 20 good and 20 defective
test images per class cannot tell 0.003 of image AUROC from noise).

    python bench/pool_test_sets.py data/pool_seed2-6 \\
        data/demo_main_seed2_area0.001-0.01_mvtec data/draw_seed3 data/draw_seed4 ...

The first folder is copied whole (its train/ is what a model of it was trained on); each
further folder's test/ and ground_truth/ images join it with their file names prefixed
by d<k>_ (k = 1, 2, ...), so a ground-truth mask still matches its image. Every folder
must hold the same classes; a folder given twice, or demo draws of one seed or of other
worlds, are refused (check_draws). Write the further draws with e.g. `setup_train_dataset.py
--make_demo DIR --root DIR_imagenet --seed 3 --demo_defect_area 0.001 0.01`.
Exit status 0 once written, 2 for a bad argument or folder (nothing is written then).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from datasets import TEST_LAYOUT, data_subdirs, list_images, list_test_classes  # noqa: E402
from demo_data import MARKER  # noqa: E402
from utils import LayoutError, UserError, cli, read_json_object  # noqa: E402

POOLED = ("test", "ground_truth")  # the sub-folders of a class whose images are pooled


def pooled_files(source: str, classes: list[str], prefix: str,
                 subs: tuple[str, ...] = POOLED) -> list[tuple[str, str]]:
    """(image in `source`, its path relative to the pooled folder) for each image of each
    class's <sub>/<defect type>/ folders, its name prefixed by `prefix`."""
    pairs = []
    for cls in classes:
        for sub in subs:
            top = os.path.join(source, cls, sub)
            for kind in data_subdirs(top) if os.path.isdir(top) else []:
                pairs += [(path, os.path.join(cls, sub, kind, prefix + os.path.basename(path)))
                          for path in list_images(os.path.join(top, kind))]
    return pairs


def check_draws(folders: list[str]) -> None:
    """Pooled draws must be other draws of one world: a folder given twice, or two demo
    draws of one seed, would count the same test images twice (and narrow every interval
    falsely); demo draws of other worlds, defect sizes or image sizes are not one
    distribution. A folder without demo_data.py's MARKER (your own) is checked by path."""
    seen: dict[str, str] = {}
    draws: dict[str, tuple[str, dict]] = {}  # seed -> (folder, its parameters)
    for folder in folders:
        real = os.path.realpath(folder)
        if real in seen:
            raise LayoutError(f"{folder} is given twice ({seen[real]}): pool other draws")
        seen[real] = folder
        marker = os.path.join(folder, MARKER)
        if not os.path.isfile(marker):
            continue
        params = read_json_object(marker, "write the draw again with setup_train_dataset.py "
                                  "--make_demo")
        if draws:  # all of one world: the first draw's
            other, other_params = next(iter(draws.values()))
            world, other_world = _world_of(params), _world_of(other_params)
            if world != other_world:
                raise LayoutError(f"{folder} and {other} are draws of other worlds ({MARKER}: "
                                  f"{world} against {other_world}): pool draws of one world")
        seed = str(params.get("seed"))
        if seed in draws:
            raise LayoutError(f"{folder} and {draws[seed][0]} are the same draw (seed {seed} "
                              f"in their {MARKER}): pool draws of other seeds")
        draws[seed] = (folder, params)


def _world_of(params: dict) -> dict:
    """A demo draw's parameters but its seed and image counts: those of its world."""
    return {k: v for k, v in params.items() if k != "seed" and not k.startswith("n_")}


def pool(output: str, first: str, others: list[str]) -> dict[str, int]:
    """Write the pooled folder (see the module docstring); returns test images per class.
    Checks every folder and name before it writes anything. The first draw's MARKER is
    not copied: the pool is no one draw, and --make_demo must not take it for its own."""
    if os.path.exists(output):
        raise UserError(f"{output} exists: give a new folder for the pooled set")
    check_draws([first, *others])
    classes = list_test_classes(first)
    if not classes:
        raise LayoutError(f"{first} holds no class with a test/ folder; expected {TEST_LAYOUT}")
    copies = []
    for k, other in enumerate(others, 1):
        found = list_test_classes(other)
        if found != classes:
            raise LayoutError(f"{other} holds the classes {found}, {first} holds {classes}: "
                              "pool draws of the same world")
        copies += pooled_files(other, classes, f"d{k}_")
    taken = {rel for _, rel in pooled_files(first, classes, "")}
    clash = sorted(rel for _, rel in copies if rel in taken)
    if clash:
        raise LayoutError(f"{first} already holds {clash[0]} (and {len(clash) - 1} more "
                          "such names): pool into folders whose file names do not start "
                          "with d<k>_")
    shutil.copytree(first, output, ignore=lambda folder, names: (
        [MARKER] if os.path.samefile(folder, first) else []))
    for src, rel in copies:
        dst = os.path.join(output, rel)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copyfile(src, dst)
    return {cls: len(pooled_files(output, [cls], "", ("test",))) for cls in classes}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("output", help="the pooled folder to write (must not exist)")
    p.add_argument("first", help="the draw whose training images the pooled folder keeps")
    p.add_argument("others", nargs="+", help="further draws whose test images join it")
    args = p.parse_args(argv)

    def run() -> int:
        counts = pool(args.output, args.first, args.others)
        for cls, n in counts.items():
            print(f"{cls}: {n} test images")
        print(f"pooled test set ready in {args.output}")
        return 0
    return cli(run)


if __name__ == "__main__":
    sys.exit(main())
