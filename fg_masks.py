"""Foreground masks of the training images: which pixels are the object.

Combinational masking (masking_generator.py, docs/method.md 5) draws half of its masks
from the foreground patches only, so that the ViT learns to reconstruct the object
rather than the plain backdrop around it. The paper releases its masks for MVTec AD as
fg_mask.zip, unpacked here; where there are none (VisA, your own images) they are
estimated here. Both end up as <root>/fg_mask/<class>/<stem>.png, the file
`datasets.fg_mask_path` names.
"""
from __future__ import annotations

import io
import os
import stat
import zipfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import Sequence

import cv2
import numpy as np
from PIL import Image
from scipy import ndimage

from datasets import (TEXTURES, BadFileError, bad_fg_masks_error, check_fg_masks,
                      fg_mask_path, is_junk_dir, list_images, mask_problem, open_rgb)
from utils import bullet_list, download_mistake, progress, write_atomic

WORK_SIZE = 256  # mask estimation runs at this longest side, then is resized back
MIN_FG_FRACTION = 0.005  # an estimated mask smaller than this is treated as failed
MAX_MASK_BYTES = 64 * 2 ** 20  # a zip entry larger than this unpacked is no mask


# ----------------------------------------------------------------------------------------
# Released foreground masks
# ----------------------------------------------------------------------------------------
def _zip_unsafe(info: zipfile.ZipInfo) -> bool:
    name = info.filename.replace("\\", "/")
    parts = PurePosixPath(name).parts
    is_link = stat.S_ISLNK(info.external_attr >> 16)
    return (name.startswith("/") or ".." in parts or (bool(parts) and ":" in parts[0])
            or is_link)


def _zip_target(info: zipfile.ZipInfo) -> tuple[str, str] | None:
    """(class, file name) of a mask entry, with or without a top 'fg_mask/' folder (or any
    one top folder); None for entries that are not masks: a mask is a PNG (any case of
    '.png'), as the released ones and the masks training reads are."""
    parts = PurePosixPath(info.filename.replace("\\", "/")).parts
    if "fg_mask" in parts[:-1]:
        parts = parts[len(parts) - 1 - parts[::-1].index("fg_mask"):][1:]
    elif len(parts) == 3:
        parts = parts[1:]
    if len(parts) != 2 or not parts[1].lower().endswith(".png"):
        return None
    return parts[0], parts[1]


class FgMaskZip:
    """The released fg_mask.zip, checked on opening (before anything is written).

    `images`: {class: its training images} (the sources, before copying); every mask of
    one of them must be readable and of its aspect ratio."""

    @staticmethod
    def check_file(path: str) -> None:
        """That `path` is a zip file (BadZipFile if not), before anything is written."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--fg_mask_zip {path} does not exist; download "
                                    "fg_mask.zip (see README) or use --make_fg_masks")
        try:
            zipfile.ZipFile(path).close()
        except zipfile.BadZipFile as e:
            mistake = download_mistake(path)  # a web page, a Git LFS pointer
            raise zipfile.BadZipFile(f"--fg_mask_zip {mistake}" if mistake else
                                     f"--fg_mask_zip {path} is not a readable zip file ({e}): "
                                     "download fg_mask.zip again") from None

    def __init__(self, path: str, images: dict[str, Sequence[str]]) -> None:
        self.check_file(path)
        self.path = path
        with zipfile.ZipFile(path) as zf:
            infos = [i for i in zf.infolist() if not i.is_dir()]
        unsafe = [i.filename for i in infos if _zip_unsafe(i)]
        if unsafe:
            raise ValueError(f"{path}: refusing to unpack, entries point outside the target "
                             f"folder (absolute, '..', drive or link): {', '.join(unsafe)}")
        huge = [f"{i.filename} ({i.file_size / 2 ** 20:.0f} MiB)" for i in infos
                if i.file_size > MAX_MASK_BYTES]
        if huge:  # a mask is a few KB: these would fill the memory and the disk
            raise ValueError(f"{path}: refusing to unpack, entries larger than "
                             f"{MAX_MASK_BYTES // 2 ** 20} MiB unpacked: {', '.join(huge[:5])}; "
                             "download the released fg_mask.zip again")
        self.entries, self.ignored, self.other_classes = [], [], Counter()
        self.no_image = 0  # masks of a converted class naming no training image
        for info in infos:
            parts = PurePosixPath(info.filename).parts
            if is_junk_dir(parts[0]) or parts[-1].startswith("."):
                continue  # archiver metadata, not data
            target = _zip_target(info)
            if target is None:
                self.ignored.append(info.filename)
            elif target[0] in images:
                self.entries.append((info, *target))
            else:
                self.other_classes[target[0]] += 1
        self._check(images)

    def _check(self, images: dict[str, Sequence[str]]) -> None:
        """A bad mask refused here, naming the entry and its image, instead of unpacked
        and found by training. Masks of no training image are neither read nor unpacked
        (`skipped` counts them)."""
        image_of = {(name, os.path.basename(fg_mask_path("", name, p))): p
                    for name, paths in images.items() for p in paths}  # '<stem>.png'
        self.entries = [(info, name, filename[:-4] + ".png")  # 000.PNG masks 000.jpg too
                        for info, name, filename in self.entries]
        problems, matched = [], []
        with zipfile.ZipFile(self.path) as zf:
            for info, name, filename in self.entries:
                image = image_of.get((name, filename))
                if image is None:
                    self.no_image += 1
                    continue
                matched.append((info, name, filename))
                problem = mask_problem(io.BytesIO(zf.read(info)), image,
                                       f"{self.path}:{info.filename}")
                if problem:
                    problems.append(problem)
        self.entries = matched
        if problems:
            raise bad_fg_masks_error(problems, "download the released fg_mask.zip again (see "
                                     "README), or leave out --fg_mask_zip and estimate the "
                                     "masks with --make_fg_masks (nothing was unpacked)")

    def skipped(self) -> list[str]:
        """What the zip holds that is not unpacked, one line each: masks of classes not
        converted, entries that are not <class>/<mask> files."""
        notes = []
        if self.other_classes:
            notes.append("not unpacked (classes not converted): " + ", ".join(
                f"{k} ({v})" for k, v in sorted(self.other_classes.items())))
        if self.ignored:
            notes.append(f"{len(self.ignored)} entries are not <class>/<stem>.png masks and "
                         f"were not unpacked, e.g. {self.ignored[0]}")
        if self.no_image:
            notes.append(f"{self.no_image} masks name no training image of their class and "
                         "were not unpacked")
        return notes

    def unpack(self, root: str) -> Counter:
        """Write the entries to <root>/fg_mask/<class>/<file>; a Counter of 'new',
        'unchanged' and 'replaced', so that re-running rewrites nothing identical."""
        counts: Counter = Counter()
        with zipfile.ZipFile(self.path) as zf:
            for info, name, filename in progress(self.entries, desc="fg masks", unit="file"):
                dst = os.path.join(root, "fg_mask", name, filename)
                data = zf.read(info)
                if os.path.isfile(dst):
                    with open(dst, "rb") as f:
                        if f.read() == data:
                            counts["unchanged"] += 1
                            continue
                    counts["replaced"] += 1
                else:
                    counts["new"] += 1
                _write_bytes(dst, data)
        return counts


def _write_bytes(dst: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    write_atomic(dst, lambda tmp: Path(tmp).write_bytes(data))


# ----------------------------------------------------------------------------------------
# Estimated foreground masks
# ----------------------------------------------------------------------------------------
def _largest_components(fg: np.ndarray, keep_fraction: float) -> np.ndarray:
    """Components at least `keep_fraction` of the largest one's area (several-part
    objects survive, specks do not)."""
    n, labels, stats, _ = cv2.connectedComponentsWithStats(fg.astype(np.uint8), connectivity=8)
    if n <= 1:
        return fg.astype(bool)
    areas = stats[1:, cv2.CC_STAT_AREA]
    keep = 1 + np.flatnonzero(areas >= keep_fraction * areas.max())
    return np.isin(labels, keep)


def estimate_fg_mask(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W) bool foreground.

    MVTec AD's objects lie on a plain backdrop: pixels whose colour is far from the
    median colour of the image border are the object. The threshold is half of Otsu's
    on that distance (objects often have parts close to the backdrop, and a mask that
    errs towards foreground is the safe side) but above the border's own noise; closing,
    opening, hole filling and the largest components clean it up, and a slight dilation
    adds a margin.
    """
    h, w = image.shape[:2]
    scale = min(1.0, WORK_SIZE / max(h, w))
    sw, sh = max(1, round(w * scale)), max(1, round(h * scale))
    small = cv2.resize(image, (sw, sh), interpolation=cv2.INTER_AREA).astype(np.float32)
    small = cv2.GaussianBlur(small, (5, 5), 0)  # (sh, sw, 3)
    b = max(1, round(0.04 * min(sh, sw)))
    border = np.concatenate([small[:b].reshape(-1, 3), small[-b:].reshape(-1, 3),
                             small[:, :b].reshape(-1, 3), small[:, -b:].reshape(-1, 3)])
    background = np.median(border, axis=0)  # (3,)
    dist = np.linalg.norm(small - background, axis=-1)  # (sh, sw)
    noise = np.percentile(np.linalg.norm(border - background, axis=-1), 95)
    otsu, _ = cv2.threshold(np.clip(dist, 0, 255).astype(np.uint8), 0, 255,
                            cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    fg = (dist > max(otsu / 2, 2 * noise + 10)).astype(np.uint8)
    k = max(3, round(0.02 * min(sh, sw)) | 1)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
    fg = cv2.morphologyEx(fg, cv2.MORPH_CLOSE, kernel)
    fg = cv2.morphologyEx(fg, cv2.MORPH_OPEN, kernel)
    fg = _largest_components(ndimage.binary_fill_holes(fg), keep_fraction=0.1)
    fg = cv2.dilate(fg.astype(np.uint8), kernel)
    return cv2.resize(fg, (w, h), interpolation=cv2.INTER_NEAREST).astype(bool)


REPLACE_IN_DATA_PATH = "replace it in --data_path (e.g. extract MVTec AD again) and re-run"


def _write_mask(root: str, name: str, path: str, textures: Sequence[str],
                sources: dict[str, str] | None, fix: str) -> tuple[str, str | None]:
    """One training image's mask, unless it has a good one; its status ('existing',
    'texture', 'estimated' or 'failed') and what was wrong with the mask it replaced
    (unreadable or mis-shaped: training would refuse it)."""
    dst = fg_mask_path(root, name, path)
    exists = os.path.isfile(dst)
    replaced = mask_problem(dst, path) if exists else None
    if exists and replaced is None:
        return "existing", None
    try:
        image = np.asarray(open_rgb(path))  # (H, W, 3)
    except BadFileError as e:
        source = (sources or {}).get(path)
        if source is None:
            raise
        if e.__cause__ is None:  # readable, but of content refused ('<path> holds ...'):
            # the original is the file to mend, as the message's own fix says
            raise BadFileError(str(e).replace(path, f"{source} (copied to {path})", 1)
                               ) from None
        raise BadFileError(f"cannot read image {source} (copied to {path}): "
                           f"{e.__cause__}; {fix}") from None
    status = "texture"
    if name in textures:
        fg = np.ones(image.shape[:2], bool)
    else:
        fg = estimate_fg_mask(image)
        status = "estimated"
        if fg.mean() < MIN_FG_FRACTION:
            fg[:] = True
            status = "failed"
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    mask = Image.fromarray(fg.astype(np.uint8) * 255)
    write_atomic(dst, lambda tmp: mask.save(tmp, format="PNG"))
    return status, replaced


def make_fg_masks(root: str, classes: Sequence[str], textures: Sequence[str] = TEXTURES,
                  sources: dict[str, str] | None = None, fix: str = REPLACE_IN_DATA_PATH
                  ) -> None:
    """Estimate a mask for every training image that has none, or one training would
    refuse (unreadable or mis-shaped: listed as replaced; good 'existing' masks, e.g.
    released ones, are kept), and print how many of each kind. Textures are foreground
    everywhere; an object mask that comes out (nearly) empty is written all-foreground and
    counted as 'failed'. `sources`: each copied image's source, which an unreadable
    image's error names, with `fix` (where to replace it: --data_path's copy of a --custom
    or --visa set is itself a copy)."""
    jobs = [(name, path) for name in classes
            for path in list_images(os.path.join(root, "train", name))]

    def run(job: tuple[str, str]) -> str:
        return _write_mask(root, *job, textures, sources, fix)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:  # cv2 frees the GIL
        results = list(progress(pool.map(run, jobs), total=len(jobs),
                                desc="estimating fg masks", unit="image"))
    out = {name: Counter() for name in classes}
    for (name, _), (status, _) in zip(jobs, results):
        out[name][status] += 1
    total = sum(out.values(), Counter())
    print(f"fg masks: {total['estimated']} estimated, {total['texture']} texture "
          f"(all foreground), {total['existing']} already present")
    replaced = [problem for _, problem in results if problem]
    if replaced:
        print(f"fg masks: replaced {len(replaced)} unreadable or mis-shaped mask(s):"
              + bullet_list(replaced))
    failed = {k: v["failed"] for k, v in out.items() if v["failed"]}
    if failed:
        print("fg masks: estimation found no object, wrote all-foreground masks for: "
              + ", ".join(f"{k} ({v})" for k, v in failed.items()))
    print("note: estimated masks (border colour + threshold + morphology) approximate "
          "the released ones; prefer the released fg_mask.zip (--fg_mask_zip) to "
          "reproduce the paper")


def mask_coverage(root: str, classes: Sequence[str]) -> dict[str, tuple[int, int]]:
    """Per class (training images with a foreground mask, training images); a
    BadFileError lists the masks present that training would refuse (check_fg_masks),
    so that a set is never reported ready with them."""
    pairs = {name: [(p, fg_mask_path(root, name, p))
                    for p in list_images(os.path.join(root, "train", name))]
             for name in classes}
    check_fg_masks([pair for name in classes for pair in pairs[name]])
    return {name: (sum(os.path.isfile(m) for _, m in pairs[name]), len(pairs[name]))
            for name in classes}

