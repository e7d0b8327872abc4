"""The training set of the mirror-augmentation figures of docs/heldout.md ("The ViT"): a
copy of an ImageNet-layout training root (train/<class>/, fg_mask/<class>/, as
setup_train_dataset.py writes it) in which each image and its foreground mask also
appear mirrored left-right, as m<name>.

    python bench/mirror_copy.py --data_path data/demo_main_seed0_area0.001-0.01_imagenet \
        --output_dir data/mirrored_imagenet

then scripts/demo.sh's step 4 on it with 15 epochs instead of 30 (the same number of
steps): run_pretraining.py with demo.sh's flags, --data_path data/mirrored_imagenet
--epochs 15 --dynamic_masking_start 7 --save_ckpt_freq 15, and its step 5 on the
result.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys

from PIL import Image, ImageOps
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import datasets  # noqa: E402
from utils import UserError, cli  # noqa: E402


def mirror_copy(data_path: str, output_dir: str) -> int:
    """Copy train/ and fg_mask/ of `data_path` with each file's mirror beside it; returns
    the number of files written."""
    if os.path.exists(output_dir) and os.listdir(output_dir):
        raise UserError(f"{output_dir} is not empty: give a new --output_dir")
    classes = datasets.list_train_classes(data_path)
    if not classes:
        raise UserError(f"{data_path} has no train/<class>/ folders (an ImageNet-layout "
                        "root written by setup_train_dataset.py)")
    for sub in ("train", "fg_mask"):  # before any file is written
        for cls in classes:
            src = os.path.join(data_path, sub, cls)
            names = ({os.path.basename(p) for p in datasets.list_images(src)}
                     if os.path.isdir(src) else set())
            clash = sorted(n for n in names if "m" + n in names)
            if clash:
                raise UserError(f"{src}: m{clash[0]} is a file of it and would be the mirror "
                                f"of {clash[0]} too ({len(clash)} such name(s); a set mirrored "
                                "already?): give the set as setup_train_dataset.py wrote it")
    written = 0
    for sub in ("train", "fg_mask"):
        for cls in tqdm(classes, desc=sub):
            src = os.path.join(data_path, sub, cls)
            if not os.path.isdir(src):
                continue  # training with --no-fg_mask has no masks to mirror
            dst = os.path.join(output_dir, sub, cls)
            os.makedirs(dst)
            for path in datasets.list_images(src):
                name = os.path.basename(path)
                shutil.copy(path, os.path.join(dst, name))
                with Image.open(path) as image:
                    ImageOps.mirror(image).save(os.path.join(dst, "m" + name))
                written += 2
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_path", required=True, help="an ImageNet-layout training root")
    parser.add_argument("--output_dir", required=True)
    args = parser.parse_args(argv)

    def run() -> None:
        n = mirror_copy(args.data_path, args.output_dir)
        print(f"{n} files in {args.output_dir}")
    return cli(run)


if __name__ == "__main__":
    sys.exit(main())
