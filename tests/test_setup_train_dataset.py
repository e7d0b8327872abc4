"""setup_train_dataset.py end to end on generated MVTec-format trees: conversion,
idempotence, hard links, layout errors, the mask zip (and path traversal), estimated
masks and the --make_demo wiring."""
from __future__ import annotations

import errno
import io
import os
import shutil
import stat
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import setup_train_dataset
from conftest import truncate
from datasets import FIX_BAD_FG_MASK, PretrainDataset
from fg_masks import _largest_components, estimate_fg_mask
from setup_train_dataset import main


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _make_mvtec(root: Path, classes=("bottle", "carpet"), n_train: int = 3, n_good: int = 2,
                seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for name in classes:
        for i in range(n_train):
            _save(root / name / "train" / "good" / f"{i:03d}.png",
                  rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
        for i in range(n_good):
            _save(root / name / "test" / "good" / f"{i:03d}.png",
                  rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
        _save(root / name / "test" / "crack" / "000.png",
              rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    (root / "license.txt").write_text("not a class")
    return root


def _run(*argv: str) -> int:
    return main([str(a) for a in argv])


def _sources(data: Path) -> list[tuple[Path, Path]]:
    """(source, relative destination) of every image the conversion should write."""
    pairs = []
    for src in sorted(data.glob("*/train/good/*.png")):
        pairs.append((src, Path("train") / src.parts[-4] / src.name))
    return pairs


def test_convert_idempotent_and_replaces_changed(tmp_path, capsys):
    """A re-run copies nothing unchanged and replaces what differs from its source: new
    bytes, or a size that differs even where the mtime matches (a copy cut short whose
    mtime was set back must not pass the quick check)."""
    data, root = _make_mvtec(tmp_path / "mvtec"), tmp_path / "inet"
    assert _run("--data_path", data, "--root", root, "--classes", "bottle", "carpet") == 0
    out = capsys.readouterr().out
    pairs = _sources(data)
    assert len(pairs) == 6
    for src, rel in pairs:
        assert (root / rel).read_bytes() == src.read_bytes()
    assert sorted(p.relative_to(root) for p in root.rglob("*.png")) == sorted(r for _, r in pairs)
    assert "train: 6 new, 0 unchanged, 0 replaced" in out and "val:" not in out
    assert [line.split() for line in out.splitlines() if line.startswith("bottle")] == \
        [["bottle", "3", "0"]]
    assert "total" in out and "without a foreground mask: bottle (3 of 3)" in out

    mtimes = {rel: (root / rel).stat().st_mtime_ns for _, rel in pairs}
    assert _run("--data_path", data, "--root", root, "--classes", "bottle", "carpet") == 0
    out = capsys.readouterr().out
    assert "train: 0 new, 6 unchanged, 0 replaced" in out
    assert {rel: (root / rel).stat().st_mtime_ns for _, rel in pairs} == mtimes
    assert not list(root.rglob("*.tmp*"))

    # --root given as the existing set's train/ folder: the set itself, not <root>/train/train
    assert _run("--data_path", data, "--root", root / "train", "--classes", "bottle") == 0
    out = capsys.readouterr().out
    assert f"using {root} (its train/ and fg_mask/)" in out and "train: 0 new, 3 unchanged" in out
    assert not (root / "train" / "train").exists()

    _save(data / "carpet" / "train" / "good" / "001.png", np.zeros((32, 32, 3), np.uint8))
    assert _run("--data_path", data, "--root", root, "--classes", "bottle", "carpet") == 0
    assert "train: 0 new, 5 unchanged, 1 replaced" in capsys.readouterr().out
    assert (root / "train" / "carpet" / "001.png").read_bytes() == \
        (data / "carpet" / "train" / "good" / "001.png").read_bytes()

    src, dst = data / "bottle" / "train" / "good" / "000.png", root / "train" / "bottle" / "000.png"
    dst.write_bytes(src.read_bytes()[:100])
    os.utime(dst, ns=(src.stat().st_atime_ns, src.stat().st_mtime_ns))
    assert dst.stat().st_mtime_ns == src.stat().st_mtime_ns
    assert _run("--data_path", data, "--root", root, "--classes", "bottle", "carpet") == 0
    assert "train: 0 new, 5 unchanged, 1 replaced" in capsys.readouterr().out
    assert dst.read_bytes() == src.read_bytes()


def test_a_changed_training_image_loses_its_old_foreground_mask(tmp_path, capsys):
    """Re-shot photos under the old names: their copies are replaced, and so are their
    estimated masks (the old ones framed the old photos), which the report named as
    present. A copy replaced by a link to the same bytes keeps its mask; a destination
    that is a link to nothing is replaced, not an error about a missing file."""
    data, root = _make_mvtec(tmp_path / "mvtec", classes=("bottle",)), tmp_path / "inet"
    rng = np.random.default_rng(3)
    img, disk, _ = _planted(rng)
    _save(data / "bottle" / "train" / "good" / "000.png", img)
    assert _run("--data_path", data, "--root", root, "--make_fg_masks",
                "--classes", "bottle") == 0
    old = np.asarray(Image.open(root / "fg_mask" / "bottle" / "000.png")) > 0
    moved = np.ascontiguousarray(img[:, ::-1])  # the object now on the other side
    _save(data / "bottle" / "train" / "good" / "000.png", moved)
    capsys.readouterr()
    assert _run("--data_path", data, "--root", root, "--make_fg_masks",
                "--classes", "bottle") == 0
    out = capsys.readouterr().out
    assert "train: 0 new, 2 unchanged, 1 replaced" in out
    assert (f"fg_mask: removed 1 mask(s) of training images whose content changed (e.g. "
            f"{root}/fg_mask/bottle/000.png); --make_fg_masks estimates them again (a "
            "--fg_mask_zip unpacks its masks of those names, made for the released images)"
            ) in out
    new = np.asarray(Image.open(root / "fg_mask" / "bottle" / "000.png")) > 0
    only_old = disk & ~disk[:, ::-1]
    assert only_old.sum() > 500  # this draw: the object moved away from most of itself
    assert new[disk[:, ::-1]].all() and new[only_old].mean() < 0.1
    assert old[disk].all()
    assert _run("--data_path", data, "--root", root, "--classes", "bottle", "--link") == 0
    out = capsys.readouterr().out
    assert "train: 0 new, 0 unchanged, 3 replaced" in out and "fg_mask: removed" not in out
    _save(tmp_path / "reshot.png", img)  # re-shot again, a new file: the link is replaced
    os.replace(tmp_path / "reshot.png", data / "bottle" / "train" / "good" / "000.png")
    assert _run("--data_path", data, "--root", root, "--classes", "bottle", "--link") == 0
    out = capsys.readouterr().out
    assert "train: 0 new, 2 unchanged, 1 replaced" in out
    assert (f"fg_mask: removed 1 mask(s) of training images whose content changed (e.g. "
            f"{root}/fg_mask/bottle/000.png)") in out
    assert not (root / "fg_mask" / "bottle" / "000.png").exists()
    dst = root / "train" / "bottle" / "001.png"
    dst.unlink()
    dst.symlink_to(tmp_path / "gone.png")
    assert _run("--data_path", data, "--root", root, "--classes", "bottle") == 0
    assert "train: 0 new, 2 unchanged, 1 replaced" in capsys.readouterr().out
    assert dst.is_file() and not dst.is_symlink()


def test_a_copy_changed_in_place_to_the_same_size_is_replaced(tmp_path, capsys):
    """Same size is no proof of the same image (a raw BMP of a new photo, a copy edited
    in place): a copy whose size matches but whose mtime does not is compared byte by
    byte and replaced, not counted unchanged and trained on."""
    data, root = _make_mvtec(tmp_path / "mvtec", classes=("bottle",)), tmp_path / "inet"
    assert _run("--data_path", data, "--root", root, "--classes", "bottle") == 0
    src, dst = data / "bottle" / "train" / "good" / "001.png", root / "train" / "bottle" / "001.png"
    dst.write_bytes(bytes(reversed(src.read_bytes())))
    os.utime(dst, ns=(src.stat().st_atime_ns, src.stat().st_mtime_ns + 10**9))
    capsys.readouterr()
    assert _run("--data_path", data, "--root", root, "--classes", "bottle") == 0
    assert "train: 0 new, 2 unchanged, 1 replaced" in capsys.readouterr().out
    assert dst.read_bytes() == src.read_bytes()


def test_btad_training_images_in_train_ok_are_converted(tmp_path, capsys):
    """BTAD keeps its normal training images in <class>/train/ok (datasets.NORMAL_DIRS),
    MVTec AD in train/good: both are the class's training set."""
    data, root = tmp_path / "btad", tmp_path / "inet"
    for i in range(2):
        _save(data / "01" / "train" / "ok" / f"{i:04d}.bmp", np.full((16, 16, 3), i, np.uint8))
    _save(data / "01" / "test" / "ok" / "0000.bmp", np.zeros((16, 16, 3), np.uint8))
    assert _run("--data_path", data, "--root", root, "--classes", "01") == 0
    assert sorted(p.name for p in (root / "train" / "01").iterdir()) == ["0000.bmp", "0001.bmp"]
    assert "train: 2 new, 0 unchanged, 0 replaced" in capsys.readouterr().out


def test_link_makes_hard_links(tmp_path, capsys):
    data, root = _make_mvtec(tmp_path / "mvtec", classes=("bottle",)), tmp_path / "inet"
    assert _run("--data_path", data, "--root", root, "--classes", "bottle") == 0  # copies
    assert (root / "train" / "bottle" / "000.png").stat().st_nlink == 1
    assert _run("--data_path", data, "--root", root, "--classes", "bottle", "--link") == 0
    assert "train: 0 new, 0 unchanged, 3 replaced" in capsys.readouterr().out
    for src, rel in _sources(data):
        assert (root / rel).stat().st_ino == src.stat().st_ino
    assert _run("--data_path", data, "--root", root, "--classes", "bottle", "--link") == 0
    assert "train: 0 new, 3 unchanged, 0 replaced" in capsys.readouterr().out
    # a source that is a relative symbolic link: the file it names is linked (os.link
    # linked the symbolic link itself, which led nowhere from its new folder)
    image = data / "bottle" / "train" / "good" / "001.png"
    store = tmp_path / "mvtec" / ".store"
    store.mkdir()
    image.rename(store / "001.png")
    image.symlink_to(Path("..", "..", "..", ".store", "001.png"))
    fresh = tmp_path / "inet2"
    assert _run("--data_path", data, "--root", fresh, "--classes", "bottle", "--link") == 0
    assert "train: 3 new, 0 unchanged, 0 replaced" in capsys.readouterr().out
    linked = fresh / "train" / "bottle" / "001.png"
    assert not linked.is_symlink() and linked.stat().st_ino == (store / "001.png").stat().st_ino


def test_link_to_another_file_system_becomes_a_symbolic_link(tmp_path, capsys, monkeypatch):
    """A source that is a symbolic link to another file system (a NAS) cannot be
    hard-linked (EXDEV): it is linked symbolically, by its absolute target, where the run
    had failed naming --data_path and --root, which share one file system."""
    data = _make_mvtec(tmp_path / "mvtec", classes=("bottle",))
    nas = tmp_path / "nas"
    nas.mkdir()
    image = data / "bottle" / "train" / "good" / "001.png"
    image.rename(nas / "001.png")
    image.symlink_to(nas / "001.png")
    real_link = os.link

    def link(src, dst, **kwargs):
        if str(src).startswith(str(nas)):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real_link(src, dst, **kwargs)

    monkeypatch.setattr(os, "link", link)
    root = tmp_path / "inet"
    assert _run("--data_path", data, "--root", root, "--classes", "bottle", "--link") == 0
    assert "train: 3 new, 0 unchanged, 0 replaced" in capsys.readouterr().out
    placed = root / "train" / "bottle" / "001.png"
    assert os.readlink(placed) == str(nas / "001.png") and placed.read_bytes()
    assert (root / "train" / "bottle" / "000.png").stat().st_nlink == 2  # hard-linked
    assert _run("--data_path", data, "--root", root, "--classes", "bottle", "--link") == 0
    assert "train: 0 new, 3 unchanged, 0 replaced" in capsys.readouterr().out


def test_layout_errors_list_everything_before_writing(tmp_path, capsys):
    data, root = _make_mvtec(tmp_path / "mvtec"), tmp_path / "inet"
    for f in (data / "bottle" / "train" / "good").iterdir():
        f.unlink()
    (data / "carpet" / "train" / "good").rename(data / "carpet" / "train" / "normal")
    assert _run("--data_path", data, "--root", root, "--classes", "bottle", "carpet",
                "cable") == 2
    err = capsys.readouterr().err
    assert "bottle/train/good (no image files" in err
    assert "carpet/train/good (folder missing)" in err
    assert "cable (class folder missing)" in err and "expected <data_path>/<class>" in err
    assert not root.exists()
    assert _run("--data_path", tmp_path / "absent", "--root", root) == 2
    assert "absent does not exist" in capsys.readouterr().err


def test_images_directly_in_train_are_counted_with_where_they_go(tmp_path, capsys):
    """<class>/train/*.png without train/good/ was refused as '(folder missing)' alone."""
    data, root = _make_mvtec(tmp_path / "mvtec"), tmp_path / "inet"
    train = data / "bottle" / "train"
    for f in sorted((train / "good").iterdir()):
        f.rename(train / f.name)
    (train / "good").rmdir()
    assert _run("--data_path", data, "--root", root, "--classes", "bottle") == 2
    assert (f"  {train / 'good'} (folder missing): 3 image(s) lie directly in {train} "
            f"(000.png, 001.png, 002.png); move them into {train / 'good'}/\n"
            ) in capsys.readouterr().err
    assert not root.exists()


def test_images_in_train_beside_good_are_named_not_left_out_unseen(tmp_path, capsys):
    """<class>/train/001.png beside train/good/, and train/scratch/*.png, were left out
    with exit 0 and no word; now a note names them (only train/good is copied)."""
    data, root = _make_mvtec(tmp_path / "mvtec"), tmp_path / "inet"
    train = data / "bottle" / "train"
    rng = np.random.default_rng(1)
    for rel in ("loose.png", "scratch/000.png", "scratch/lot2/001.png"):
        _save(train / rel, rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    (train / "empty").mkdir()
    assert _run("--data_path", data, "--root", root, "--classes", "bottle", "carpet") == 0
    err = capsys.readouterr().err
    assert (f"note: {train}: left out 1 image(s) beside good/ (loose.png) and the images in "
            f"scratch/ (2): training reads only the normal images in {train / 'good'}; move "
            "any normal image there to train on it\n") in err
    assert err.count("left out") == 1  # carpet's train/ holds good/ alone
    assert sorted(p.name for p in (root / "train" / "bottle").iterdir()) == [
        "000.png", "001.png", "002.png"]


def test_a_class_without_a_train_folder_is_listed_not_a_crash(tmp_path, capsys):
    """A class folder of test images only (no train/ at all) is one more missing folder in
    the list of problems, exit status 2, not a FileNotFoundError from counting the images
    that lie in a train/ that is not there."""
    data, root = _make_mvtec(tmp_path / "mvtec"), tmp_path / "inet"
    shutil.rmtree(data / "carpet" / "train")
    assert _run("--data_path", data, "--root", root, "--classes", "bottle", "carpet") == 2
    assert f"  {data / 'carpet' / 'train' / 'good'} (folder missing)\n" in \
        capsys.readouterr().err
    assert not root.exists()


def test_a_link_to_nothing_and_images_of_one_stem_stop_the_copy_before_writing(tmp_path,
                                                                              capsys):
    """A training image linking nowhere was dropped by the listing: part of the class
    copied, exit 0. 000.png and 000.jpg would both get the foreground mask
    fg_mask/<class>/000.png. Now: exit 2, both classes' problems in one error (the link
    and its target, the pair), with a missing class's, and nothing written."""
    data, root = _make_mvtec(tmp_path / "mvtec"), tmp_path / "inet"
    link = data / "bottle" / "train" / "good" / "003.png"
    os.symlink(tmp_path / "elsewhere" / "003.png", link)
    _save(data / "carpet" / "train" / "good" / "000.jpg", np.zeros((32, 32, 3), np.uint8))
    assert _run("--data_path", data, "--root", root, "--classes", "bottle", "carpet",
                "cable") == 2
    assert capsys.readouterr().err.startswith(
        f"error: {data} is not a complete MVTec-format dataset:\n"
        f"  1 image link(s) in {link.parent} lead nowhere:\n    {link} is a link to "
        f"{tmp_path}/elsewhere/003.png, which does not exist\n"
        "  Fix: restore each link's target, or delete the link\n"
        f"  {data}/carpet/train/good holds 1 group(s) of images with one name and different "
        "extensions, which would share one mask and one result name:\n    000.jpg, 000.png\n"
        "  Fix: rename all but one file of each group (and a test image's ground-truth mask "
        f"with it)\n  {data}/cable (class folder missing)\nexpected ")
    assert not root.exists()


def test_default_classes_catch_partial_mvtec(tmp_path, capsys):
    data = _make_mvtec(tmp_path / "mvtec")
    assert _run("--data_path", data, "--root", tmp_path / "inet") == 2
    err = capsys.readouterr().err
    assert "lacks the class folders cable, capsule, grid" in err and "--classes" in err
    other = _make_mvtec(tmp_path / "other", classes=("gizmo", "widget"))
    for junk in ("__MACOSX", ".trash"):  # unzipped on macOS; a hidden folder
        (Path(other) / junk / "train").mkdir(parents=True)
    assert _run("--data_path", other, "--root", tmp_path / "inet2") == 0  # not MVTec: all found
    assert sorted(os.listdir(tmp_path / "inet2" / "train")) == ["gizmo", "widget"]
    # a set of one's own with an MVTec class name among others is no partial MVTec AD
    own = _make_mvtec(tmp_path / "own", classes=("screw", "washer"))
    assert _run("--data_path", own, "--root", tmp_path / "inet3") == 0
    assert sorted(os.listdir(tmp_path / "inet3" / "train")) == ["screw", "washer"]


def _mask_bytes(i: int) -> bytes:
    """PNG of a 32 x 32 mask with rows i..i+7, columns 4..19 set."""
    arr = np.zeros((32, 32), np.uint8)
    arr[i:i + 8, 4:20] = 255
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("prefix", ["fg_mask/", "", "Mvtec-ImageNet/fg_mask/", "masks/"])
def test_fg_mask_zip(tmp_path, capsys, prefix):
    """The masks unpack to fg_mask/<class>/ whatever the zip's top folder: fg_mask/, none,
    a deeper .../fg_mask/, or any one other folder (masks/, as a re-zipped copy has). A
    '.PNG' mask is a mask (it was said to name no training image); a '.bmp' or '.jpg' one
    is named as no mask, not as a mask of no image."""
    data, root = _make_mvtec(tmp_path / "mvtec"), tmp_path / "inet"
    zpath = tmp_path / "fg_mask.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        if prefix:
            zf.writestr(prefix, b"")  # directory entry
        for i in range(3):
            zf.writestr(f"{prefix}bottle/{i:03d}.{'PNG' if i == 2 else 'png'}", _mask_bytes(i))
        zf.writestr(f"{prefix}bottle/999.png", _mask_bytes(0))  # no such training image
        zf.writestr(f"{prefix}carpet/000.bmp", _mask_bytes(0))
        zf.writestr(f"{prefix}carpet/001.jpg", _mask_bytes(1))  # a mask is a PNG
        zf.writestr(f"{prefix}screw/000.png", _mask_bytes(0))
        zf.writestr("__MACOSX/._bottle", b"junk")
    argv = ["--data_path", data, "--root", root, "--classes", "bottle", "carpet",
            "--fg_mask_zip", zpath]
    assert _run(*argv) == 0
    out = capsys.readouterr().out
    for i in range(3):
        assert (root / "fg_mask" / "bottle" / f"{i:03d}.png").read_bytes() == _mask_bytes(i)
    assert "fg_mask.zip: 3 new" in out and "not unpacked (classes not converted): screw (1)" in out
    assert "without a foreground mask: carpet (3 of 3)" in out
    assert "1 masks name no training image of their class and were not unpacked" in out
    assert (f"2 entries are not <class>/<stem>.png masks and were not unpacked, e.g. "
            f"{prefix}carpet/000.bmp") in out
    assert not (root / "fg_mask" / "screw").exists()
    assert not (root / "fg_mask" / "bottle" / "999.png").exists()
    assert [line.split() for line in out.splitlines() if line.startswith("bottle")] == \
        [["bottle", "3", "3"]]
    ds = PretrainDataset(str(root), ["bottle"], token_size=16, img_size=32)
    assert ds[2]["fg_mask"].tolist() == [True, True, False, False]  # rows 2-9, cols 4-19
    assert _run(*argv) == 0
    assert "fg_mask.zip: 0 new, 3 unchanged" in capsys.readouterr().out


def _png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (width, height), 255).save(buf, format="PNG")
    return buf.getvalue()


def test_fg_mask_zip_with_bad_masks_is_refused_before_writing(tmp_path, capsys):
    """A 100x300 mask for a 32x32 image and an empty one are named with their images;
    nothing is written. Masks of no converted image (screw, bottle/999) are never read,
    so they are not checked."""
    data, root = _make_mvtec(tmp_path / "mvtec"), tmp_path / "inet"
    zpath = tmp_path / "fg_mask.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        zf.writestr("fg_mask/bottle/000.png", _png(100, 300))
        zf.writestr("fg_mask/bottle/001.png", b"")
        zf.writestr("fg_mask/bottle/002.png", _png(32, 32))
        zf.writestr("fg_mask/bottle/999.png", b"")
        zf.writestr("fg_mask/screw/000.png", b"")
    assert _run("--data_path", data, "--root", root, "--classes", "bottle",
                "--fg_mask_zip", zpath) == 2
    good = data / "bottle" / "train" / "good"
    assert capsys.readouterr().err == (
        "error: 2 foreground mask(s) unreadable or not of their image's aspect ratio:\n"
        f"  {zpath}:fg_mask/bottle/000.png is 100x300 but its image {good}/000.png is 32x32: "
        "they cannot be aligned\n"
        f"  {zpath}:fg_mask/bottle/001.png (mask of {good}/001.png) is unreadable: empty, cut "
        "short or not an image\n"
        "Fix: download the released fg_mask.zip again (see README), or leave out "
        "--fg_mask_zip and estimate the masks with --make_fg_masks (nothing was unpacked)\n")
    assert not root.exists()


def test_bad_masks_present_are_refused_not_reported_ready(tmp_path, capsys):
    """Masks already in <root>/fg_mask (an earlier run, a hand copy) are checked too:
    the set is not reported ready with masks training would refuse."""
    data, root = _make_mvtec(tmp_path / "mvtec", classes=("bottle",)), tmp_path / "inet"
    masks = root / "fg_mask" / "bottle"
    masks.mkdir(parents=True)
    (masks / "000.png").write_bytes(_png(32, 32))
    (masks / "001.png").write_bytes(_png(64, 32))
    _save(masks / "002.png", np.random.default_rng(0).integers(0, 256, (32, 32), np.uint8))
    truncate(masks / "002.png")  # cut short
    assert Image.open(masks / "002.png").size == (32, 32)  # its header still reads
    assert _run("--data_path", data, "--root", root, "--classes", "bottle") == 2
    captured = capsys.readouterr()
    images = root / "train" / "bottle"
    assert captured.err[captured.err.index("error:"):] == (  # after the progress bars
        "error: 2 foreground mask(s) unreadable or not of their image's aspect ratio:\n"
        f"  {masks}/001.png is 64x32 but its image {images}/001.png is 32x32: they cannot be "
        "aligned\n"
        f"  {masks}/002.png (mask of {images}/002.png) is unreadable: Truncated File Read\n"
        f"Fix: {FIX_BAD_FG_MASK}\n")
    assert "training set ready" not in captured.out


def test_fg_mask_zip_path_traversal_refused(tmp_path, capsys):
    """Every entry that could write outside <root>/fg_mask ('..', absolute, a drive, a
    symbolic link) is named and nothing is unpacked; so are oversized entries."""
    data, root = _make_mvtec(tmp_path / "mvtec"), tmp_path / "work" / "inet"
    zpath = tmp_path / "evil.zip"
    link = zipfile.ZipInfo("fg_mask/bottle/001.png")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16  # a symlink, as `zip --symlinks` stores
    with zipfile.ZipFile(zpath, "w") as zf:
        zf.writestr("fg_mask/bottle/000.png", _mask_bytes(0))
        zf.writestr("fg_mask/../../evil.png", b"x")
        zf.writestr("/abs.png", b"x")
        zf.writestr("C:/drive.png", b"x")
        zf.writestr(link, b"/etc/passwd")
    assert _run("--data_path", data, "--root", root, "--classes", "bottle",
                "--fg_mask_zip", zpath) == 2
    err = capsys.readouterr().err
    assert "refusing to unpack" in err
    assert err.endswith("(absolute, '..', drive or link): fg_mask/../../evil.png, /abs.png, "
                        "C:/drive.png, fg_mask/bottle/001.png\n")
    assert not root.exists() and not list(tmp_path.rglob("evil.png"))
    bomb = tmp_path / "bomb.zip"  # 65 MiB of zeros in a 64 KiB entry: never unpacked
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("fg_mask/bottle/000.png", _mask_bytes(0))
        zf.writestr("fg_mask/bottle/zz.png", bytes(65 * 2 ** 20))
    assert _run("--data_path", data, "--root", root, "--classes", "bottle",
                "--fg_mask_zip", bomb) == 2
    assert ("entries larger than 64 MiB unpacked: fg_mask/bottle/zz.png (65 MiB)"
            in capsys.readouterr().err)
    assert not root.exists()
    assert _run("--data_path", data, "--root", root, "--classes", "bottle",
                "--fg_mask_zip", tmp_path / "missing.zip") == 2
    assert "missing.zip does not exist" in capsys.readouterr().err


def _planted(rng: np.random.Generator, size: int = 128) -> tuple[np.ndarray, np.ndarray,
                                                                 np.ndarray]:
    """A red disk (the object, radius 24) on a uniform grey backdrop with sensor noise;
    also each pixel's distance from the disk's centre."""
    yy, xx = np.mgrid[:size, :size]
    cy, cx = rng.integers(40, size - 40, 2)
    radius = np.hypot(yy - cy, xx - cx)
    disk = radius <= 24
    img = np.full((size, size, 3), 120.0) + rng.normal(0, 3, (size, size, 3))
    img[disk] = (200, 40, 40)
    return img.clip(0, 255).astype(np.uint8), disk, radius


def test_estimate_fg_mask_finds_planted_object():
    rng = np.random.default_rng(1)
    img, disk, radius = _planted(rng, 300)
    img[10:13, 280:283] = (255, 255, 0)  # a speck, not the object
    fg = estimate_fg_mask(img)
    assert fg.shape == disk.shape and fg.dtype == bool
    assert fg[disk].all()  # covers the object
    assert not fg[radius > 24 + 0.04 * 300].any()  # within a margin of 4% of the image
    assert not estimate_fg_mask(np.full((64, 64, 3), 77, np.uint8)).any()


def test_estimate_fg_mask_keeps_a_margin_around_the_object():
    """The mask errs towards foreground: on a 128 x 128 image (worked on at full size, not
    upscaled) the one-pixel ring just outside the disk is foreground, within a margin."""
    img, _, radius = _planted(np.random.default_rng(3))
    fg = estimate_fg_mask(img)
    assert fg[radius <= 25].all() and not fg[radius > 24 + 0.04 * 128].any()


def test_estimate_fg_mask_keeps_every_part_of_the_object():
    """An object in two parts (disks of radius 24 and 14, a third of its area) keeps both:
    only components under a tenth of the largest are dropped as specks."""
    yy, xx = np.mgrid[:160, :160]
    big, small = np.hypot(yy - 50, xx - 50) <= 24, np.hypot(yy - 110, xx - 110) <= 14
    img = np.full((160, 160, 3), 120.0) + np.random.default_rng(4).normal(0, 3, (160, 160, 3))
    img[big | small] = (200, 40, 40)
    fg = estimate_fg_mask(img.clip(0, 255).astype(np.uint8))
    assert fg[big].all() and fg[small].all()
    assert not fg[(np.hypot(yy - 50, xx - 50) > 30) & (np.hypot(yy - 110, xx - 110) > 20)].any()


def test_estimate_fg_mask_ignores_an_uneven_backdrop():
    """A backdrop whose brightness varies by +-25 levels (uneven lighting) spreads the
    border's colours: the threshold stays above that spread, so the far background is not
    marked while the object still is."""
    img, disk, radius = _planted(np.random.default_rng(5))
    img = (img + np.linspace(-25, 25, 128)[:, None, None]).clip(0, 255).astype(np.uint8)
    fg = estimate_fg_mask(img)
    assert fg[disk].all() and not fg[radius > 24 + 0.04 * 128].any()


def test_estimate_fg_mask_fills_the_hole_of_a_ring_shaped_object():
    """An object whose middle shows the backdrop (a ring: a bottle seen from above, a
    washer) is foreground inside too: the hole is filled, so masking can pick its middle
    patches."""
    yy, xx = np.mgrid[:128, :128]
    radius = np.hypot(yy - 64, xx - 64)
    ring = (radius <= 40) & (radius >= 28)
    img = np.full((128, 128, 3), 120.0) + np.random.default_rng(6).normal(0, 3, (128, 128, 3))
    img[ring] = (200, 40, 40)
    fg = estimate_fg_mask(img.clip(0, 255).astype(np.uint8))
    assert fg[radius <= 40].all() and not fg[radius > 40 + 0.04 * 128].any()


def test_largest_components_drops_specks_only():
    """Components under `keep_fraction` of the largest one's area are dropped: a 20 x 20
    blob and an 8 x 8 one (16%) stay, a 2 x 2 speck (1%) goes."""
    fg = np.zeros((40, 40), bool)
    fg[2:22, 2:22] = fg[30:38, 30:38] = True
    kept = fg.copy()
    fg[30:32, 2:4] = True
    assert (_largest_components(fg, keep_fraction=0.1) == kept).all()
    assert (_largest_components(fg, keep_fraction=0.005) == fg).all()
    assert not _largest_components(np.zeros((8, 8), bool), keep_fraction=0.1).any()


def test_make_fg_masks(tmp_path, capsys):
    """Estimated, texture, kept and replaced masks are written and counted; an object
    image where nothing stands out (003, uniform) gets an all-foreground mask and is
    named as failed: the safe side, never an empty mask."""
    data, root = _make_mvtec(tmp_path / "mvtec"), tmp_path / "inet"
    rng = np.random.default_rng(2)
    disks = []
    for i in range(3):
        img, disk, _ = _planted(rng)
        _save(data / "bottle" / "train" / "good" / f"{i:03d}.png", img)
        disks.append(disk)
    _save(data / "bottle" / "train" / "good" / "003.png", np.full((64, 48, 3), 90, np.uint8))
    kept = np.zeros((128, 128), np.uint8)
    _save(root / "fg_mask" / "bottle" / "002.png", kept)  # e.g. a released mask
    (root / "fg_mask" / "bottle" / "001.png").write_bytes(b"")  # broken ones: regenerated
    _save(root / "fg_mask" / "carpet" / "000.png", np.zeros((32, 64), np.uint8))
    assert _run("--data_path", data, "--root", root, "--classes", "bottle", "carpet",
                "--make_fg_masks") == 0
    out = capsys.readouterr().out
    assert "fg masks: 2 estimated, 3 texture (all foreground), 1 already present" in out
    assert ("fg masks: replaced 2 unreadable or mis-shaped mask(s):\n"
            f"  {root}/fg_mask/bottle/001.png (mask of {root}/train/bottle/001.png) is "
            "unreadable: empty, cut short or not an image\n"
            f"  {root}/fg_mask/carpet/000.png is 64x32 but its image "
            f"{root}/train/carpet/000.png is 32x32: they cannot be aligned\n") in out
    assert "prefer the released fg_mask.zip" in out
    for i in range(2):
        fg = np.asarray(Image.open(root / "fg_mask" / "bottle" / f"{i:03d}.png")) > 0
        assert fg[disks[i]].all() and (fg & disks[i]).sum() / (fg | disks[i]).sum() > 0.6
    assert not np.asarray(Image.open(root / "fg_mask" / "bottle" / "002.png")).any()
    failed = np.asarray(Image.open(root / "fg_mask" / "bottle" / "003.png"))
    assert failed.shape == (64, 48) and failed.min() == 255
    assert ("fg masks: estimation found no object, wrote all-foreground masks for: "
            "bottle (1)\n") in out
    for i in range(3):
        assert np.asarray(Image.open(root / "fg_mask" / "carpet" / f"{i:03d}.png")).min() == 255
    assert "without a foreground mask" not in out


def test_make_demo_wiring(tmp_path, monkeypatch, capsys):
    calls = []

    def fake_make_demo_dataset(mvtec_root, imagenet_root, seed=0, classes=None, n_train=40,
                               n_test_good=20, n_test_defect=20, world="main",
                               defect_area=None):
        calls.append((mvtec_root, imagenet_root, seed, classes,
                      (n_train, n_test_good, n_test_defect), world, defect_area))
        _make_mvtec(Path(mvtec_root), classes=("gizmo",))
        for i in range(3):
            _save(Path(imagenet_root) / "fg_mask" / "gizmo" / f"{i:03d}.png",
                  np.full((32, 32), 255, np.uint8))
        return {"gizmo": {"train/good": 3}}

    monkeypatch.setattr(setup_train_dataset, "make_demo_dataset", fake_make_demo_dataset)
    monkeypatch.chdir(tmp_path)
    assert main(["--make_demo", "data/demo_mvtec"]) == 0
    assert calls == [("data/demo_mvtec", "data/demo_imagenet", 0, None, (40, 20, 20), "main",
                      None)]
    out = capsys.readouterr().out
    assert [line.split() for line in out.splitlines() if line.startswith("gizmo")] == \
        [["gizmo", "3", "3"]]
    assert sorted(os.listdir(tmp_path / "data" / "demo_imagenet" / "train" / "gizmo")) == \
        ["000.png", "001.png", "002.png"]
    assert main(["--make_demo", "d", "--root", "elsewhere", "--classes", "gizmo",
                 "--seed", "3", "--demo_counts", "5", "2", "3", "--demo_world", "heldout"]) == 0
    assert calls[-1] == ("d", "elsewhere", 3, ["gizmo"], (5, 2, 3), "heldout", None)
    assert main(["--make_demo", "d", "--demo_defect_area", "0.001", "0.01"]) == 0
    assert calls[-1][-1] == (0.001, 0.01)
    with pytest.raises(SystemExit):
        main(["--make_demo", "d", "--data_path", "other"])
    with pytest.raises(SystemExit):
        main(["--data_path", "d", "--demo_defect_area", "0.001", "0.01"])
    assert "add --make_demo" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--make_demo", "d", "--demo_defect_area", "0.01", "0.001"])
    assert "--demo_defect_area 0.01 0.001: give SMALLEST <= LARGEST within 0.001-0.2" in \
        capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--make_demo", "d", "--demo_defect_area", "0.1", "0.5"])
    assert "--demo_defect_area 0.1 0.5: give SMALLEST <= LARGEST within 0.001-0.2" in \
        capsys.readouterr().err
    assert len(calls) == 3  # nothing written


@pytest.mark.parametrize("given, error", [
    (["--seed", "0"], "--seed seeds the demo set: add --make_demo DIR"),
    (["--demo_world", "main"], "--demo_world picks the demo set's photographs and defect "
                               "kinds: add --make_demo DIR"),
    (["--demo_counts", "40", "20", "20"], "--demo_counts sets the demo set's images per "
                                          "class: add --make_demo DIR"),
    (["--custom_test_fraction", "0.2"], "--custom_test_fraction sets how many of --custom's "
                                        "normal images are held out to test/good: add "
                                        "--custom DIR")])
def test_source_options_without_their_source_are_refused(tmp_path, capsys, given, error):
    """A demo or custom option given without --make_demo / --custom would change nothing:
    refused like --demo_defect_area, even at its default value, before anything is
    written; left out, it takes its default."""
    mvtec, root = tmp_path / "mvtec", tmp_path / "root"
    _make_mvtec(mvtec)
    with pytest.raises(SystemExit) as exit_:
        main(["--data_path", str(mvtec), "--root", str(root), *given])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(f"error: {error}")
    assert not root.exists()
    args = setup_train_dataset.parse_args(["--data_path", str(mvtec)])
    assert (args.seed, args.demo_world, args.demo_counts, args.custom_test_fraction) == (
        0, "main", [40, 20, 20], 0.2)


def test_make_demo_real_one_class(tmp_path, capsys):
    """With demo_data.py's real generator: its masks land where PretrainDataset reads them."""
    demo, root = tmp_path / "demo_mvtec", tmp_path / "demo_inet"
    assert main(["--make_demo", str(demo), "--root", str(root), "--classes", "coins"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()
            if line.startswith("coins")]
    n_train = len(os.listdir(demo / "coins" / "train" / "good"))
    assert rows == [["coins", str(n_train), str(n_train)]]
    fg = PretrainDataset(str(root), ["coins"], token_size=112)[0]["fg_mask"]
    assert 0 < fg.sum() < fg.numel()  # an object with a real foreground


def test_make_demo_again_keeps_its_new_masks_and_only_its_new_images(tmp_path, capsys):
    """A second demo set into the same folders (another seed, fewer training images): the
    masks it has just written for its new images stay (the copy step took them for masks
    of changed images and deleted them), and the training copy holds exactly its images."""
    demo, root = tmp_path / "demo_mvtec", tmp_path / "demo_inet"
    base = ["--make_demo", str(demo), "--root", str(root), "--classes", "coins"]
    assert main([*base, "--demo_counts", "3", "1", "1"]) == 0
    capsys.readouterr()
    assert main([*base, "--demo_counts", "2", "1", "1", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert "train: 0 new, 0 unchanged, 2 replaced" in out and "fg_mask: removed" not in out
    assert "train: 1 file(s) the demo set does not train on removed" in out
    assert sorted(os.listdir(root / "train" / "coins")) == ["000.png", "001.png"]
    assert sorted(os.listdir(root / "fg_mask" / "coins")) == ["000.png", "001.png"]
    assert [line.split() for line in out.splitlines() if line.startswith("coins")] == [
        ["coins", "2", "2"]]
    foreign = tmp_path / "other_inet" / "train" / "coins"
    foreign.mkdir(parents=True)
    (foreign / "mine.png").write_bytes(b"not the demo's")
    assert main(["--make_demo", str(tmp_path / "other"), "--root", str(foreign.parents[1]),
                 "--classes", "coins", "--demo_counts", "2", "1", "1"]) == 2
    assert "was not written by demo_data.py" in capsys.readouterr().err
    assert (foreign / "mine.png").read_bytes() == b"not the demo's"


def test_a_refused_custom_image_is_named_by_its_original(tmp_path, capsys):
    """A readable image of refused content (16-bit holding 8-bit values) in a --custom
    set was named by its copy under --root, which the next run overwrites from the
    original: the original is the file to mend."""
    src = tmp_path / "mine"
    rng = np.random.default_rng(0)
    for folder, count in (("good", 4), ("scratch", 1)):
        (src / "gadget" / folder).mkdir(parents=True)
        for k in range(count):
            _save(src / "gadget" / folder / f"{k:03d}.png",
                  rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    eight_bit = rng.integers(1, 199, (16, 16), dtype=np.uint16)
    eight_bit[0, 0] = 199
    Image.fromarray(eight_bit).save(src / "gadget" / "good" / "000.png")  # a training image
    assert _run("--custom", str(src), "--data_path", str(tmp_path / "mvtec"),
                "--root", str(tmp_path / "inet"), "--make_fg_masks") == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith(f"error: {src / 'gadget' / 'good' / '000.png'} (copied to "
                          f"{tmp_path / 'inet' / 'train' / 'gadget' / '000.png'}) holds "
                          "I;16 values no larger than 199")
