"""datasets.py on small generated trees: settings, the training and test sets, bad files,
wrong layouts, the foreground patch mask and the visual-token cache."""
from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import struct
import zlib
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, ImageOps, TiffImagePlugin
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import DataLoader
from torchvision import transforms as T

import datasets
import utils
from conftest import run_ranks, truncate
from datasets import (MVTEC_CLASSES, OBJECTS, TEXTURES, BadFileError, LayoutError,
                      MVTecTestDataset, PretrainDataset, TrainImageDataset, cache_tokens,
                      list_train_classes,
                      normalization, patch_any, resolve_train_root, setting_classes,
                      token_cache_path, token_compute_key)

MEAN = torch.tensor(IMAGENET_DEFAULT_MEAN)[:, None, None]
STD = torch.tensor(IMAGENET_DEFAULT_STD)[:, None, None]
# bottle: RGB 96 x 64 (W x H), uniform colour per image; carpet: grey 128 x 128
BOTTLE_COLOURS = [(200, 30, 90), (20, 140, 250), (90, 220, 10)]
CARPET_GREYS = [40, 130, 230]
FG_PIXEL = (20, 56)  # (y, x) in the 96-wide bottle image -> (20, 40) after the centre crop


def _save(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


@pytest.fixture
def train_root(tmp_path: Path) -> Path:
    """ImageNet layout under a path that itself contains 'train' (docs/method.md 9.8)."""
    root = tmp_path / "train_data" / "inet"
    for i, colour in enumerate(BOTTLE_COLOURS):
        _save(root / "train" / "bottle" / f"{i:03d}.png", np.full((64, 96, 3), colour, np.uint8))
        mask = np.zeros((64, 96), np.uint8)
        mask[FG_PIXEL] = 255
        _save(root / "fg_mask" / "bottle" / f"{i:03d}.png", mask)
    for i, grey in enumerate(CARPET_GREYS):
        _save(root / "train" / "carpet" / f"{i:03d}.png", np.full((128, 128), grey, np.uint8))
        _save(root / "fg_mask" / "carpet" / f"{i:03d}.png", np.full((128, 128), 255, np.uint8))
    return root


def _pretrain(root: Path, **kw) -> PretrainDataset:
    return PretrainDataset(str(root), ["bottle", "carpet"], token_size=32, img_size=64, **kw)


# ----------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------
def test_auto_cache_decides_by_the_nodes_available_memory():
    """'ram' where every process of the node fits in CACHE_SHARE of the available memory,
    'none' beyond it or where the system does not say; each with its line. MVTec AD's
    3,629 training images at 224 px take 0.56 GB (README)."""
    class MVTecAD:  # what cache_bytes reads of a PretrainDataset
        img_size, num_patches = 224, 196

        def __len__(self) -> int:
            return 3629
    per_image = 3 * 224 ** 2 + 196 * (8 + 1 + 4) + 16  # image, tokens, mask, weights
    assert datasets.cache_bytes(MVTecAD()) == 3629 * per_image
    assert round(3629 * per_image / 1e9, 2) == 0.56
    need = 10 ** 9
    assert datasets.auto_cache(need, 8, 16 * 10 ** 9) == (
        "ram", "--cache_images auto: ram (the decoded images take 1.00 GB per process, x8 on "
        "this node; 16.0 GB available)")
    assert datasets.auto_cache(need, 8, 15 * 10 ** 9) == (
        "none", "--cache_images auto: none (the decoded images take 1.00 GB per process, x8 "
        "on this node; 15.0 GB available, over the 50% it may take)")
    assert datasets.auto_cache(need, 1, 10 ** 12, read=(64, 3629))[0] == "none"
    assert datasets.auto_cache(need, 1, 10 ** 12, read=(3629, 3629))[0] == "ram"
    assert datasets.auto_cache(need, 1, None)[0] == "none"
    assert "does not tell its free memory" in datasets.auto_cache(need, 1, None)[1]
    if os.path.exists("/proc/meminfo"):
        assert utils.available_memory() > 0


def test_available_memory_is_the_memory_cgroups_where_one_limits_the_process(tmp_path,
                                                                               monkeypatch):
    """In a container or a cluster job MemAvailable is the whole machine's: a job limited to
    16 GB on a 500 GB node would cache by it and be killed. The headroom of the process's memory
    cgroups (limit - usage + reclaimable page cache; v2, or v1's memory controller; the
    tightest up to the root) bounds it; an unlimited cgroup ('max') does not."""
    gb = 10 ** 9
    (tmp_path / "meminfo").write_text(f"MemTotal: 1 kB\nMemAvailable: {500 * gb // 1024} kB\n")
    monkeypatch.setattr(utils, "MEMINFO", str(tmp_path / "meminfo"))
    monkeypatch.setattr(utils, "CGROUP_ROOT", str(tmp_path / "cg"))
    monkeypatch.setattr(utils, "PROC_CGROUP", str(tmp_path / "self_cgroup"))

    def cgroup(folder: Path, limit: str, usage: int, stat: str) -> None:
        folder.mkdir(parents=True)
        for name, text in (("memory.max", limit), ("memory.current", str(usage)),
                           ("memory.stat", stat)):
            (folder / name).write_text(text + "\n")
    job = tmp_path / "cg" / "slurm" / "job_7"
    cgroup(tmp_path / "cg" / "slurm", str(64 * gb), 40 * gb, "anon 1\ninactive_file 0")
    cgroup(job, str(16 * gb), 10 * gb, f"anon 1\ninactive_file {2 * gb}")
    (tmp_path / "self_cgroup").write_text("0::/slurm/job_7\n")
    assert utils.available_memory() == 8 * gb  # 16 - 10 + 2, under the parent's 24
    (job / "memory.max").write_text("max\n")
    assert utils.available_memory() == 24 * gb  # the parent's limit
    (tmp_path / "self_cgroup").write_text("4:memory:/docker/c1\n0::/\n")  # cgroup v1
    v1 = tmp_path / "cg" / "memory" / "docker" / "c1"
    v1.mkdir(parents=True)
    for name, text in (("memory.limit_in_bytes", str(4 * gb)),
                       ("memory.usage_in_bytes", str(3 * gb)),
                       ("memory.stat", f"cache 5\ntotal_inactive_file {gb}")):
        (v1 / name).write_text(text + "\n")
    assert utils.available_memory() == 2 * gb
    (v1 / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1's no limit
    assert utils.available_memory() == 500 * gb // 1024 * 1024
    (tmp_path / "meminfo").unlink()
    (v1 / "memory.limit_in_bytes").write_text(str(4 * gb))
    assert utils.available_memory() == 2 * gb  # no MemAvailable: the cgroup's still


def test_available_memory_in_a_container_of_its_own_cgroup_namespace(tmp_path, monkeypatch):
    """Docker's default on cgroup v2: /proc/self/cgroup says '0::/' and the container's
    limit is the root's own memory.max, which bounds it. A usage over the limit (reclaim
    lags) leaves no room, not a negative one; v1 lines of other controllers are not
    memory's (their folders are not read); v1's 'no limit' with no MemAvailable tells
    nothing."""
    gb = 10 ** 9
    (tmp_path / "meminfo").write_text(f"MemAvailable: {500 * gb // 1024} kB\n")
    monkeypatch.setattr(utils, "MEMINFO", str(tmp_path / "meminfo"))
    root = tmp_path / "cg"
    monkeypatch.setattr(utils, "CGROUP_ROOT", str(root))
    monkeypatch.setattr(utils, "PROC_CGROUP", str(tmp_path / "self_cgroup"))
    root.mkdir()
    for name, text in (("memory.max", str(4 * gb)), ("memory.current", str(gb)),
                       ("memory.stat", "anon 1\ninactive_file 0")):
        (root / name).write_text(text + "\n")
    (tmp_path / "self_cgroup").write_text("0::/\n")
    assert utils.available_memory() == 3 * gb
    (root / "memory.current").write_text(str(5 * gb))
    assert utils.available_memory() == 0
    (tmp_path / "self_cgroup").write_text("3:cpu,cpuacct:/other\n4:memory:/docker/c1\n")
    for folder, limit in (("other", gb), ("docker/c1", 2 ** 63 - 4096)):
        v1 = root / "memory" / folder
        v1.mkdir(parents=True)
        for name, text in (("memory.limit_in_bytes", str(limit)),
                           ("memory.usage_in_bytes", str(gb // 2)),
                           ("memory.stat", "total_inactive_file 0")):
            (v1 / name).write_text(text + "\n")
    assert utils.available_memory() == 500 * gb // 1024 * 1024  # cpu's folder not read
    (tmp_path / "meminfo").unlink()
    assert utils.available_memory() is None


def test_an_unseen_class_typed_in_another_unicode_form_is_its_folder():
    """--unseen_classes typed composed (NFC) names the class folder stored decomposed
    (NFD, as macOS writes it), in training and evaluation alike (datasets.as_found)."""
    import unicodedata
    nfd, nfc = (unicodedata.normalize(form, "s\u010drew") for form in ("NFD", "NFC"))
    assert setting_classes("leave_one_out", [nfc], available=[nfd, "widget"]) == (
        ["widget"], [nfd])
    assert setting_classes("leave_one_out", [nfc, nfd], available=[nfd, "widget"]) == (
        ["widget"], [nfd])  # both forms: one class


def test_setting_classes_presets():
    assert setting_classes("multi_class") == (MVTEC_CLASSES, MVTEC_CLASSES)
    assert len(MVTEC_CLASSES) == 15 and MVTEC_CLASSES == sorted(OBJECTS + TEXTURES)
    assert setting_classes("obj2tex") == (OBJECTS, TEXTURES)
    assert setting_classes("tex2obj") == (TEXTURES, OBJECTS)
    train, test = setting_classes("leave_one_out", "screw")
    assert test == ["screw"] and len(train) == 14 and "screw" not in train
    assert setting_classes("leave_one_out", ["wood"])[1] == ["wood"]


def test_setting_classes_other_class_sets():
    demo = ["gravel", "brick", "coins"]
    assert setting_classes("multi_class", available=demo) == (sorted(demo), sorted(demo))
    assert setting_classes("leave_one_out", "coins", available=demo) == (["brick", "gravel"],
                                                                         ["coins"])
    with pytest.raises(ValueError, match="needs all 15 classes.*bottle"):
        setting_classes("obj2tex", available=demo)
    with pytest.raises(ValueError, match="unknown class 'screw'; valid classes: brick, coins"):
        setting_classes("leave_one_out", "screw", available=demo)


@pytest.mark.parametrize("args, message", [
    (("leave_one_out",), "^--setting leave_one_out needs exactly one unseen class, got none: "
                         "pass --unseen_classes CLASS, one of bottle, cable"),
    (("leave_one_out", ["screw", "wood"]), "exactly one unseen class, got screw wood:"),
    (("leave_one_out", "srew"), "^--unseen_classes: unknown class 'srew'; valid classes: "
                                "bottle, cable"),
    (("obj2tex", "wood"), "^--unseen_classes wood applies only to --setting leave_one_out; "
                          "--setting obj2tex fixes its test classes: add --setting "
                          "leave_one_out, or drop --unseen_classes"),
    (("cross_class",), "valid settings: multi_class, obj2tex, tex2obj, leave_one_out"),
])
def test_setting_classes_errors(args, message):
    with pytest.raises(ValueError, match=message):
        setting_classes(*args)


# ----------------------------------------------------------------------------------------
# Training set
# ----------------------------------------------------------------------------------------
def test_pretrain_sample_values(train_root):
    ds = _pretrain(train_root)
    assert len(ds) == 6 and ds.classes == ["bottle", "carpet"]
    assert ds.samples[0] == (str(train_root / "train" / "bottle" / "000.png"), 0)
    assert ds.mask_paths[0] == str(train_root / "fg_mask" / "bottle" / "000.png")
    item = ds[1]
    assert set(item) == {"image", "token_image", "fg_mask", "class_idx", "index"}
    colour = torch.tensor(BOTTLE_COLOURS[1], dtype=torch.float32)[:, None, None] / 255
    assert item["image"].shape == (3, 64, 64)
    torch.testing.assert_close(item["image"], ((colour - MEAN) / STD).expand(3, 64, 64))
    assert item["token_image"].shape == (3, 32, 32)
    torch.testing.assert_close(item["token_image"], colour.expand(3, 32, 32))
    assert item["class_idx"] == 0 and item["index"] == 1


def test_grey_image_becomes_rgb(train_root):
    item = _pretrain(train_root)[4]  # carpet 001, grey 130, 128 px -> 64 px
    grey = torch.full((3, 1, 1), CARPET_GREYS[1] / 255)
    assert item["class_idx"] == 1
    torch.testing.assert_close(item["image"], ((grey - MEAN) / STD).expand(3, 64, 64),
                               atol=1.5 / 255 / 0.225, rtol=0)
    torch.testing.assert_close(item["token_image"], grey.expand(3, 32, 32), atol=1.5 / 255,
                               rtol=0)
    assert item["fg_mask"].all()


def test_fg_patch_mask_single_pixel(train_root):
    fg = _pretrain(train_root)[0]["fg_mask"]
    assert fg.dtype == torch.bool and fg.shape == (16,)  # (64 / 16) ** 2
    assert fg.nonzero().flatten().tolist() == [1 * 4 + 2]  # pixel (20, 40) after the crop


def test_patch_any_batched():
    mask = torch.zeros(2, 64, 64, dtype=torch.bool)
    mask[0, 17, 33] = True  # patch (1, 2)
    mask[1, 63, 0] = True  # patch (3, 0)
    mask[1, 0, 15] = True  # patch (0, 0)
    out = patch_any(mask, 16)
    assert out.shape == (2, 16)
    assert out[0].nonzero().flatten().tolist() == [6]
    assert out[1].nonzero().flatten().tolist() == [0, 12]


def test_every_input_is_a_bicubic_resize_of_the_short_side_and_a_centre_crop(tmp_path):
    """docs/method.md 4 and 7: the ViT's and ProtoFlow's input (test set, training set and
    its uint8 image cache) and the token image are Resize(short side, bicubic) + CenterCrop,
    in the image's own orientation, then mean/std. A bilinear resize, or an image turned
    on its side, changes every pixel the models and the tokenizer see, which images of
    one colour (the other tests') cannot show. Reference: PIL's bicubic resize itself."""
    pixels = np.random.default_rng(0).integers(0, 256, (96, 128, 3), np.uint8)  # H x W
    img = Image.fromarray(pixels)
    # short side 96 -> 64: 128 -> int(64 * 128 / 96) = 85 wide, centre columns 10-73
    want_u8 = np.array(img.resize((85, 64), Image.BICUBIC).crop((10, 0, 74, 64)))
    want01 = torch.from_numpy(want_u8).permute(2, 0, 1).float() / 255  # (3, 64, 64)
    want = (want01 - MEAN) / STD
    torch.testing.assert_close(datasets.build_transforms(64)(img), want)
    torch.testing.assert_close(datasets.build_token_transform(64)(img), want01)
    root = tmp_path / "inet"
    _save(root / "train" / "wood" / "000.png", pixels)
    ds = PretrainDataset(str(root), ["wood"], token_size=64, img_size=64, fg_mask=False)
    torch.testing.assert_close(ds[0]["image"], want)
    torch.testing.assert_close(ds[0]["token_image"], want01)
    assert torch.equal(ds.item(0, uint8=True)["image_u8"], torch.from_numpy(want_u8).permute(
        2, 0, 1))


def test_flow_training_augmentation_is_the_papers():
    """docs/method.md 6: ProtoFlow trains on RandomResizedCrop(scale 0.2-1, bicubic) and
    horizontal flips of images normalised as its encoder was trained; a flow trained on
    unnormalised or differently augmented images scores test images (normalised, not
    augmented) off its training distribution. No test of a training run shows it."""
    tf = datasets.flow_train_transform(32, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    crop = [t for t in tf.transforms if isinstance(t, T.RandomResizedCrop)]
    flip = [t for t in tf.transforms if isinstance(t, T.RandomHorizontalFlip)]
    assert len(crop) == 1 and len(flip) == 1 and flip[0].p == 0.5
    assert crop[0].size == (32, 32) and crop[0].scale == (0.2, 1.0)
    assert crop[0].interpolation == T.InterpolationMode.BICUBIC
    colour = torch.tensor([200, 30, 90], dtype=torch.float32)[:, None, None] / 255
    torch.manual_seed(0)
    for _ in range(3):  # one colour: the same whatever the crop and the flip
        out = tf(Image.new("RGB", (48, 40), (200, 30, 90)))
        torch.testing.assert_close(out, ((colour - MEAN) / STD).expand(3, 32, 32))


def test_bad_files_left_out_are_listed_by_rank_0_only(train_root, monkeypatch, recwarn):
    """Under torchrun every rank reads the same files (run_pretraining checks it), so the
    list of files left out is rank 0's warning alone, not one per rank."""
    os.remove(train_root / "fg_mask" / "bottle" / "002.png")
    monkeypatch.setattr(datasets, "get_rank", lambda: 1)
    ds = _pretrain(train_root, skip_bad_images=True)
    assert len(ds) == 5 and len(ds.bad_files) == 1
    assert not [w for w in recwarn if "left out" in str(w.message)]


def test_fg_mask_off_and_missing(train_root):
    os.remove(train_root / "fg_mask" / "bottle" / "002.png")
    with pytest.raises(BadFileError, match=r"bottle/002\.png(.|\n)*--fg_mask_zip"):
        _pretrain(train_root)
    with pytest.warns(UserWarning, match=r"left out 1 bad file(.|\n)*bottle/002\.png"):
        ds = _pretrain(train_root, skip_bad_images=True)
    assert len(ds) == 5 and not any(p.endswith("bottle/002.png") for p in ds.image_paths)
    assert len(ds.bad_files) == 1
    os.rename(train_root / "fg_mask", train_root / "masks_elsewhere")
    with pytest.raises(BadFileError, match=r"fg_mask/carpet/ \(no masks for any of its 3"):
        _pretrain(train_root)
    ds = _pretrain(train_root, fg_mask=False)
    assert len(ds) == 6 and ds[0]["fg_mask"].all() and ds[0]["fg_mask"].shape == (16,)


def test_corrupt_image_is_an_error_or_left_out(train_root):
    bad = train_root / "train" / "bottle" / "001.png"
    truncate(bad)
    ds = _pretrain(train_root)
    with pytest.raises(BadFileError, match=f"cannot read image {bad}"):
        ds[1]
    assert ds[2]["index"] == 2
    with pytest.warns(UserWarning, match=str(bad)):
        ds = _pretrain(train_root, skip_bad_images=True)
    assert len(ds) == 5 and str(bad) not in ds.image_paths
    # no substitution: the kept samples are exactly the readable files, in order
    assert [os.path.basename(p) for p in ds.image_paths] == ["000.png", "002.png", "000.png",
                                                             "001.png", "002.png"]
    torch.testing.assert_close(ds[1]["token_image"][:, 0, 0],
                               torch.tensor(BOTTLE_COLOURS[2]) / 255.0)


def test_mask_of_other_aspect_ratio_is_bad(train_root):
    _save(train_root / "fg_mask" / "bottle" / "000.png", np.zeros((64, 64), np.uint8))
    with pytest.raises(BadFileError, match="is 64x64 but its image .* is 96x64"):
        _pretrain(train_root)[0]


def test_a_mask_a_few_percent_off_its_images_aspect_ratio_is_bad():
    """Image and mask are resized and cropped apart, so they align only if their aspect
    ratios agree to 1 % (a mask saved at a rounded size passes, 699x700 for 1024x1024);
    5 % off (100x105 for a square image) moves the mask by ~5 px at 224 px and is refused."""
    assert datasets._aspect_problem((699, 700), "m.png", (1024, 1024), "i.png") is None
    assert datasets._aspect_problem((200, 100), "m.png", (100, 50), "i.png") is None
    for size in ((100, 105), (105, 100), (100, 95)):
        assert datasets._aspect_problem(size, "m.png", (1024, 1024), "i.png") == (
            f"m.png is {size[0]}x{size[1]} but its image i.png is 1024x1024: they cannot "
            "be aligned")


def test_holdout_split_holds_out_the_rounded_fraction_of_each_class():
    """--holdout 0.1 holds out round(0.1 n) images of a class, at least one: 15 images
    -> 2 (not 1, as truncation gives), 14 -> 1, 25 -> 2 (2.5 rounds to even), 3 -> 1."""
    counts = [15, 14, 25, 3]
    labels = [k for k, n in enumerate(counts) for _ in range(n)]
    kept, held = datasets.holdout_split(labels, ["a", "b", "c", "d"], 0.1)
    assert [sum(labels[i] == k for i in held) for k in range(4)] == [2, 1, 2, 1]
    assert sorted(kept + held) == list(range(len(labels)))


def test_check_train_classes_refuses_unreadable_or_misshaped_masks(train_root):
    """Before any work, from headers: an empty mask, one of another aspect ratio and a
    truncated one whose size still reads are named with their images; a mask within
    1 % of its image's aspect ratio (192x127 for 96x64) passes."""
    fg, train = train_root / "fg_mask", train_root / "train"
    assert len(datasets.check_train_classes(str(train_root), ["bottle", "carpet"])) == 6
    (fg / "bottle" / "000.png").write_bytes(b"")
    _save(fg / "bottle" / "001.png", np.zeros((300, 100), np.uint8))
    _save(fg / "bottle" / "002.png", np.zeros((127, 192), np.uint8))
    truncate(fg / "carpet" / "001.png")
    assert Image.open(fg / "carpet" / "001.png").size == (128, 128)  # the header survives
    with pytest.raises(BadFileError) as err:
        datasets.check_train_classes(str(train_root), ["bottle", "carpet"])
    assert str(err.value) == (
        "3 foreground mask(s) unreadable or not of their image's aspect ratio:\n"
        f"  {fg}/bottle/000.png (mask of {train}/bottle/000.png) is unreadable: empty, cut "
        "short or not an image\n"
        f"  {fg}/bottle/001.png is 100x300 but its image {train}/bottle/001.png is 96x64: "
        "they cannot be aligned\n"
        f"  {fg}/carpet/001.png (mask of {train}/carpet/001.png) is unreadable: Truncated "
        "File Read\n"
        f"Fix: {datasets.FIX_BAD_FG_MASK}")
    assert len(datasets.check_train_classes(str(train_root), ["bottle", "carpet"],
                                            fg_mask=False)) == 6
    # an unreadable image with a good mask is the image's problem, which its loader names
    # with its own fix (--skip_bad_images), not a mask problem
    (train / "carpet" / "000.png").write_bytes(b"")
    assert datasets.mask_problem(str(fg / "carpet" / "000.png"),
                                 str(train / "carpet" / "000.png")) is None


def test_train_image_dataset(train_root):
    ds = TrainImageDataset(str(train_root), ["carpet", "bottle"], transform=T.ToTensor())
    assert len(ds) == 6
    image, class_idx = ds[0]
    assert class_idx == 0 and image.shape == (3, 128, 128)  # grey carpet -> RGB
    torch.testing.assert_close(image, torch.full((3, 128, 128), CARPET_GREYS[0] / 255))
    assert ds[3][1] == 1 and ds[3][0].shape == (3, 64, 96)
    truncate(train_root / "train" / "carpet" / "002.png")
    with pytest.warns(UserWarning, match="carpet/002.png"):
        assert len(TrainImageDataset(str(train_root), ["carpet"], skip_bad_images=True)) == 2


def test_training_layout_errors(train_root, tmp_path):
    with pytest.raises(LayoutError, match=r"train does not exist(.|\n)*setup_train_dataset"):
        _pretrain(tmp_path / "nowhere")
    with pytest.raises(LayoutError) as err:
        PretrainDataset(str(train_root), ["bottle", "cable", "pill"], token_size=32)
    msg = str(err.value)
    assert "train/cable (class folder missing)" in msg and "train/pill (class folder" in msg
    assert "classes present: bottle, carpet" in msg and "<root>/train/<class>" in msg
    (train_root / "train" / "wood").mkdir()
    with pytest.raises(LayoutError, match="train/wood \\(no image files"):
        PretrainDataset(str(train_root), ["wood"], token_size=32, fg_mask=False)
    with pytest.raises(ValueError, match="listed twice: bottle"):
        _pretrain(train_root).__class__(str(train_root), ["bottle", "bottle"], 32)


def test_train_root_or_its_train_folder(train_root, tmp_path, capsys):
    """--data_path as the root, or as <root>/train (the original scripts' form)."""
    root = str(train_root)
    assert resolve_train_root(root) == root and capsys.readouterr().out == ""
    assert resolve_train_root(root + "/train/") == root
    assert capsys.readouterr().out.strip() == (
        f"[data] {root}/train is the train/ folder of an ImageNet-layout set: using {root} "
        "(its train/ and fg_mask/)")
    assert list_train_classes(resolve_train_root(root + "/train")) == ["bottle", "carpet"]
    (tmp_path / "masks_only" / "fg_mask").mkdir(parents=True)  # classes not made yet
    (tmp_path / "masks_only" / "train").mkdir()
    assert resolve_train_root(str(tmp_path / "masks_only" / "train")) == str(
        tmp_path / "masks_only")
    # Not an ImageNet train folder: left as given (the dataset then names what is missing).
    assert resolve_train_root(str(train_root / "fg_mask")) == str(train_root / "fg_mask")
    assert resolve_train_root(str(tmp_path / "nowhere")) == str(tmp_path / "nowhere")
    empty = tmp_path / "empty" / "train"
    empty.mkdir(parents=True)
    assert resolve_train_root(str(empty)) == str(empty)
    with pytest.raises(LayoutError) as err:
        list_train_classes(str(empty))
    msg = str(err.value)  # advice names the root, never <root>/train
    assert f"{empty}/train does not exist" in msg and "folder holding train/ and fg_mask/" in msg
    assert msg.endswith(f"--root {tmp_path / 'empty'}`")
    # an MVTec-layout set given for training: convert it into a folder of its own
    mvtec = tmp_path / "my_set"
    (mvtec / "widget" / "test" / "good").mkdir(parents=True)
    (mvtec / "widget" / "train" / "good").mkdir(parents=True)
    with pytest.raises(LayoutError) as err:
        list_train_classes(str(mvtec))
    msg = str(err.value)
    assert f"{mvtec} is a set in MVTec layout" in msg
    assert msg.endswith(f"`python setup_train_dataset.py --data_path {mvtec} --root "
                        "data/my_set-ImageNet` and pass --data_path data/my_set-ImageNet")
    # one class of the MVTec-layout set, or its train/good: convert the set, that class
    for given in (mvtec / "widget", mvtec / "widget" / "train" / "good"):
        with pytest.raises(LayoutError) as err:
            list_train_classes(str(given))
        assert str(err.value).endswith(
            f"make that copy with `python setup_train_dataset.py --data_path {mvtec} --root "
            "data/my_set-ImageNet` and pass --data_path data/my_set-ImageNet --classes widget")
    # one class's folder of a training set: the set and the class
    with pytest.raises(LayoutError) as err:
        list_train_classes(str(train_root / "train" / "bottle"))
    assert str(err.value).endswith(
        f"Fix: {train_root / 'train' / 'bottle'} is one class's folder of a training set: "
        f"pass --data_path {train_root} --classes bottle")
    # your own images, not yet converted: setup_train_dataset.py --custom
    own = tmp_path / "my_images"
    (own / "cat" / "good").mkdir(parents=True)
    with pytest.raises(LayoutError) as err:
        list_train_classes(str(own))
    assert str(err.value).endswith(
        f"Fix: {own} holds your own images (<class>/good): convert them with `python "
        f"setup_train_dataset.py --custom {own} --data_path data/my_images_mvtec --root "
        "data/my_images-ImageNet --make_fg_masks` and pass --data_path data/my_images-ImageNet")


def test_evaluation_given_your_own_images_says_how_to_convert_them(tmp_path):
    """run_test.py --data_path my_images (setup_train_dataset.py --custom's input, not yet
    converted) was told only to 'pass the folder of an MVTec-format set', while training
    named the conversion; now evaluation names it too, and the MVTec copy to pass."""
    own = tmp_path / "my_images"
    (own / "cat" / "good").mkdir(parents=True)
    (own / "cat" / "scratch").mkdir()
    with pytest.raises(LayoutError) as err:
        datasets.find_test_classes(str(own))
    assert str(err.value) == (
        f"--data_path {own} holds no <class>/test folder; expected {datasets.TEST_LAYOUT}. "
        f"{own} holds your own images (<class>/good): convert them with `python "
        f"setup_train_dataset.py --custom {own} --data_path data/my_images_mvtec --root "
        "data/my_images-ImageNet --make_fg_masks` and pass --data_path data/my_images_mvtec")
    # a folder of neither layout keeps the general advice
    (own / "cat" / "good").rename(own / "cat" / "normal")
    with pytest.raises(LayoutError) as err:
        datasets.find_test_classes(str(own))
    assert str(err.value).endswith("pass the folder of an MVTec-format set (MVTec AD, BTAD, "
                                   "MPDD, the demo set)")


def test_dataloader_batches(train_root):
    batch = next(iter(DataLoader(_pretrain(train_root), batch_size=4)))
    assert batch["image"].shape == (4, 3, 64, 64) and batch["token_image"].shape == (4, 3, 32, 32)
    assert batch["fg_mask"].shape == (4, 16) and batch["class_idx"].tolist() == [0, 0, 0, 1]


# ----------------------------------------------------------------------------------------
# Test set (MVTec layout)
# ----------------------------------------------------------------------------------------
@pytest.fixture
def mvtec_root(tmp_path: Path) -> Path:
    root = tmp_path / "mvtec"
    rng = np.random.default_rng(0)
    for i in range(2):
        _save(root / "bottle" / "test" / "good" / f"{i:03d}.png",
              rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
        _save(root / "bottle" / "test" / "broken" / f"{i:03d}.png",
              rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    square = np.zeros((128, 128), np.uint8)
    square[32:64, 64:96] = 255  # 32 x 32 at full size -> 16 x 16 = 256 pixels at 64 px
    _save(root / "bottle" / "ground_truth" / "broken" / "000_mask.png", square)
    _save(root / "bottle" / "ground_truth" / "broken" / "001_mask.png", square // 255)  # 0/1
    # BTAD naming: ok / ko, masks without the _mask suffix, grey .bmp images
    _save(root / "01" / "test" / "ok" / "0000.bmp", np.full((64, 64), 90, np.uint8))
    _save(root / "01" / "test" / "ko" / "0000.bmp", np.full((64, 64), 90, np.uint8))
    _save(root / "01" / "ground_truth" / "ko" / "0000.png", square[::2, ::2])
    return root


def test_mvtec_test_dataset(mvtec_root):
    ds = MVTecTestDataset(str(mvtec_root), "bottle", token_size=32, img_size=64)
    assert ds.labels == [1, 1, 0, 0] and ds.defect_types == ["broken"] * 2 + ["good"] * 2
    for i in range(2):
        item = ds[i]
        assert item["index"] == i  # collect_class hashes image_paths[index]
        assert item["label"] == 1 and item["defect_type"] == "broken"
        assert item["name"] == f"broken_{i:03d}"
        gt = item["gt_mask"]
        assert gt.shape == (1, 64, 64) and gt.dtype == torch.float32
        assert set(gt.unique().tolist()) == {0.0, 1.0} and gt.sum() == 256
        assert gt[0, 16:32, 32:48].all()
    item = ds[2]
    assert item["label"] == 0 and item["gt_mask"].sum() == 0 and item["name"] == "good_000"
    assert item["index"] == 2
    assert item["image"].shape == (3, 64, 64) and item["token_image"].shape == (3, 32, 32)


def test_wide_test_image_is_cropped_not_squashed_and_its_mask_stays_aligned(mvtec_root):
    """As in training (docs/method.md 4, 7), a non-square test image is resized by its
    short side and centre-cropped, as its ground-truth mask is: squashing the image
    alone would keep the outer bands and move the defect away from its mask."""
    image = np.zeros((64, 128, 3), np.uint8)  # H x W: dark outer quarters, bright centre
    image[:, 32:96] = 200
    image[16:32, 48:64] = 50  # the defect, at columns 16-32 of the crop
    mask = np.zeros((64, 128), np.uint8)
    mask[16:32, 48:64] = 255
    _save(mvtec_root / "wide" / "test" / "cut" / "000.png", image)
    _save(mvtec_root / "wide" / "ground_truth" / "cut" / "000_mask.png", mask)
    item = MVTecTestDataset(str(mvtec_root), "wide", token_size=32, img_size=64)[0]
    pixels = (item["image"] * STD + MEAN) * 255
    gt = item["gt_mask"][0].bool()
    assert gt.sum() == 256 and gt[16:32, 16:32].all()
    torch.testing.assert_close(pixels[:, gt], torch.full((3, 256), 50.0), atol=1, rtol=0)
    torch.testing.assert_close(pixels[:, ~gt], torch.full((3, 64 * 64 - 256), 200.0),
                               atol=1, rtol=0)


def test_btad_layout(mvtec_root):
    ds = MVTecTestDataset(str(mvtec_root), "01", token_size=32, img_size=64)
    assert ds.labels == [1, 0] and ds.mask_paths[1] is None
    assert ds.mask_paths[0].endswith("ground_truth/ko/0000.png") and ds[0]["gt_mask"].sum() == 256
    assert ds[1]["image"].shape == (3, 64, 64)


def test_missing_or_corrupt_gt_mask(mvtec_root, capsys):
    os.remove(mvtec_root / "bottle" / "ground_truth" / "broken" / "001_mask.png")
    with pytest.raises(BadFileError, match=r"1 file\(s\) missing:\n  ground-truth mask .*001_mask"):
        MVTecTestDataset(str(mvtec_root), "bottle", token_size=32, img_size=64)
    with pytest.raises(BadFileError) as err:  # run_test.py's check, before any class
        datasets.check_test_classes(str(mvtec_root), ["bottle"])
    gt, test = mvtec_root / "bottle" / "ground_truth" / "broken", mvtec_root / "bottle" / "test"
    assert (f"  missing: ground-truth mask {gt / '001'}_mask.png (or 001.png) for "
            f"{test / 'broken' / '001.png'}\n") in str(err.value)
    (test / "scratch").mkdir()  # an empty defect folder: named, not dropped unseen
    datasets.MVTecTestDataset._list(str(mvtec_root), "bottle", True)
    assert (f"[data] note: {test}: left out 1 empty folder(s) (scratch): no image of that "
            "type is scored") in capsys.readouterr().err
    truncate(mvtec_root / "bottle" / "ground_truth" / "broken" / "000_mask.png")
    with pytest.warns(UserWarning, match=r"left out 2 bad file(.|\n)*000_mask(.|\n)*001_mask"):
        ds = MVTecTestDataset(str(mvtec_root), "bottle", token_size=32, img_size=64,
                              skip_bad_images=True)
    assert ds.labels == [0, 0] and len(ds.bad_files) == 2


def test_a_mask_named_near_the_rule_is_named_with_its_fix(mvtec_root):
    """A missing mask's line names what lies near: a file of the image's stem named
    otherwise ('001_gt.png': rename it; '001-GT.bmp' keeps its type), or the defect's mask
    folder in another case (ground_truth/Broken for test/broken); none where no file or
    folder is near (0010 is not 001's, nor 001_1_mask.png where 001_1 is an image), and a
    link to nothing in ground_truth/ adds no error."""
    gt, test = mvtec_root / "bottle" / "ground_truth", mvtec_root / "bottle" / "test"
    (gt / "broken" / "001_mask.png").rename(gt / "broken" / "001_gt.png")
    with pytest.raises(BadFileError) as err:
        datasets.check_test_classes(str(mvtec_root), ["bottle"])
    assert (f"ground-truth mask {gt / 'broken' / '001'}_mask.png (or 001.png) for "
            f"{test / 'broken' / '001.png'}: found 001_gt.png, rename it to 001_mask.png\n"
            ) in str(err.value)
    (gt / "broken" / "001_gt.png").rename(gt / "broken" / "001-GT.bmp")  # its own type
    with pytest.raises(BadFileError) as err:
        datasets.check_test_classes(str(mvtec_root), ["bottle"])
    assert ": found 001-GT.bmp, rename it to 001_mask.bmp\n" in str(err.value)
    (gt / "broken" / "001-GT.bmp").rename(gt / "broken" / "0010_mask.png")
    with pytest.raises(BadFileError) as err:
        datasets.check_test_classes(str(mvtec_root), ["bottle"])
    assert f"for {test / 'broken' / '001.png'}\n" in str(err.value)
    # 001_1's mask is not 001's, where 001_1 is a test image of the folder
    (gt / "broken" / "0010_mask.png").rename(gt / "broken" / "001_1_mask.png")
    shutil.copy(test / "broken" / "001.png", test / "broken" / "001_1.png")
    with pytest.raises(BadFileError) as err:
        datasets.check_test_classes(str(mvtec_root), ["bottle"])
    assert f"for {test / 'broken' / '001.png'}\n" in str(err.value)
    assert "001_1.png" not in str(err.value)  # its mask is found
    os.remove(test / "broken" / "001_1.png")
    (gt / "broken").rename(gt / "Broken")
    with pytest.raises(BadFileError) as err:
        datasets.check_test_classes(str(mvtec_root), ["bottle"])
    assert (f"for {test / 'broken' / '000.png'}: {gt / 'Broken'} differs from the test "
            "folder broken only by case; rename one\n") in str(err.value)
    (gt / "Broken").rename(gt / "other")
    (gt / "gone").symlink_to(gt / "nowhere")  # a link to nothing: no hint, no other error
    with pytest.raises(BadFileError) as err:
        datasets.check_test_classes(str(mvtec_root), ["bottle"])
    assert f"for {test / 'broken' / '000.png'}: no folder {gt / 'broken'}\n" in str(err.value)


def test_a_normal_folder_in_another_case_is_refused(mvtec_root):
    """test/Good (and BTAD's test/OK) was scored as a defect type, its normal images as
    defective ones: it is refused, before any image is read, with the rename; beside
    good/, with the move."""
    for name, normal, cased in (("bottle", "good", "Good"), ("01", "ok", "OK")):
        test = mvtec_root / name / "test"
        (test / normal).rename(test / cased)
        with pytest.raises(LayoutError, match=re.escape(
                f"{test / cased}: the normal test images' folder is named good or ok, in "
                f"lower case; rename it to {normal}")):
            datasets.check_test_classes(str(mvtec_root), [name])
    test = mvtec_root / "bottle" / "test"
    (test / "good").mkdir()  # beside good/: its images go there
    shutil.copy(test / "Good" / "000.png", test / "good" / "002.png")
    with pytest.raises(LayoutError, match=re.escape(
            f"{test / 'Good'}: the normal test images' folder is named good or ok, in lower "
            "case; move its images into good/")):
        datasets.check_test_classes(str(mvtec_root), ["bottle"])


def test_an_empty_mask_folder_is_not_named_as_a_case_mismatch(mvtec_root):
    """ground_truth/broken exists but holds no mask: each missing mask's line stops at the
    mask's path. The case hint is for a folder that differs from test/broken by case; the
    folder itself matches its own name case-insensitively, and naming it as 'differs from
    the test folder broken only by case' would send the user to rename a folder that is
    named right."""
    gt, test = mvtec_root / "bottle" / "ground_truth", mvtec_root / "bottle" / "test"
    for mask in (gt / "broken").iterdir():
        mask.unlink()
    with pytest.raises(BadFileError) as err:
        datasets.check_test_classes(str(mvtec_root), ["bottle"])
    assert (f"ground-truth mask {gt / 'broken' / '000'}_mask.png (or 000.png) for "
            f"{test / 'broken' / '000.png'}\n") in str(err.value)
    assert "only by case" not in str(err.value)


def test_a_mask_folder_not_named_ground_truth_is_found(mvtec_root):
    """A class whose masks lie in gt/ (or masks/, Ground_Truth/) is scored on image labels
    only: the folder is found, for run_test.py's note; a class without one has none, and a
    link to nothing beside test/ stops nothing (the note is made after the scoring)."""
    bottle = mvtec_root / "bottle"
    (bottle / "backup").symlink_to(bottle / "nowhere")  # a link to nothing: not an error
    assert datasets.ground_truth_near_miss(str(mvtec_root), "bottle") is None
    previous = bottle / "ground_truth"
    for name in ("gt", "masks", "Ground_Truth"):
        previous.rename(bottle / name)
        previous = bottle / name
        assert datasets.ground_truth_near_miss(str(mvtec_root), "bottle") == str(previous)
    assert datasets.ground_truth_near_miss(str(mvtec_root), "01") is None


def test_only_a_folder_is_named_as_a_mask_folder_near_ground_truth(mvtec_root):
    """The folders beside test/ are the sub-folders only: a file named masks, or a link
    named gt to a folder that is not there (an unmounted share), holds no masks to be
    scored, and naming either as 'not read: rename it to ground_truth' would send the
    user to rename what is no folder of masks; nor is a file named Broken in
    ground_truth/ the defect's folder in another case."""
    bottle = mvtec_root / "01"
    (bottle / "masks").write_bytes(b"")
    (bottle / "gt").symlink_to(bottle / "nowhere")
    assert datasets.ground_truth_near_miss(str(mvtec_root), "01") is None
    gt, test = mvtec_root / "bottle" / "ground_truth", mvtec_root / "bottle" / "test"
    (gt / "broken").rename(gt / "other")
    (gt / "Broken").write_bytes(b"")
    with pytest.raises(BadFileError) as err:
        datasets.check_test_classes(str(mvtec_root), ["bottle"])
    assert f"for {test / 'broken' / '000.png'}: no folder {gt / 'broken'}\n" in str(err.value)


def test_check_test_classes_finds_a_cut_short_ground_truth_mask(mvtec_root):
    """run_test.py's check before any class runs: a ground-truth mask cut short whose
    header still reads is named up front, not when its class is reached."""
    mask = mvtec_root / "bottle" / "ground_truth" / "broken" / "000_mask.png"
    datasets.check_test_classes(str(mvtec_root), ["bottle"])  # the set as made: fine
    truncate(mask)
    with Image.open(mask) as cut:
        assert cut.size == (128, 128)  # the header survives
    with pytest.raises(BadFileError) as err:
        datasets.check_test_classes(str(mvtec_root), ["bottle"])
    assert str(err.value).startswith(
        f"1 test file problem(s):\n  {mask} (mask of "
        f"{mvtec_root}/bottle/test/broken/000.png) is unreadable: Truncated File Read\nFix: ")
    datasets.check_test_classes(str(mvtec_root), ["bottle"], skip_bad_images=True)


def test_check_test_classes_finds_empty_test_images(mvtec_root):
    """Test images that are not images at all, with a ground-truth mask or without one
    (a good image), are named up front, not when their class is reached (a training
    image's is left to its loader: see
    test_check_train_classes_refuses_unreadable_or_misshaped_masks)."""
    bad = mvtec_root / "bottle" / "test" / "broken" / "000.png"
    good = mvtec_root / "bottle" / "test" / "good" / "001.png"
    bad.write_bytes(b"")
    good.write_bytes(b"")
    with pytest.raises(BadFileError) as err:
        datasets.check_test_classes(str(mvtec_root), ["bottle"])
    assert str(err.value).startswith(
        f"2 test file problem(s):\n  {bad} is unreadable: empty, cut short or not an "
        f"image\n  {good} is unreadable: empty, cut short or not an image\nFix: ")
    datasets.check_test_classes(str(mvtec_root), ["bottle"], skip_bad_images=True)


def test_mvtec_layout_errors(mvtec_root):
    with pytest.raises(LayoutError,
                       match=r"class folder missing(.|\n)*classes present.*01, bottle"):
        MVTecTestDataset(str(mvtec_root), "cable", token_size=32)
    (mvtec_root / "screw").mkdir()
    with pytest.raises(LayoutError, match="screw/test does not exist \\(test folder missing\\)"):
        MVTecTestDataset(str(mvtec_root), "screw", token_size=32)


# ----------------------------------------------------------------------------------------
# Token cache
# ----------------------------------------------------------------------------------------
class FakeTokenizer:
    """Deterministic stand-in: the code of a cell is its quantised mean intensity."""

    def __init__(self, weight_file: Path, image_size: int = 32, grid: int = 4) -> None:
        self.image_size, self.grid, self.vocab_size = image_size, grid, 64
        self.fingerprint = hashlib.sha256(weight_file.read_bytes()).hexdigest()
        self.calls = self.images = 0

    def get_codebook_indices(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.images += len(images)
        cells = F.adaptive_avg_pool2d(images, self.grid).mean(1)  # (N, g, g)
        return (cells * 63.99).long().flatten(1)  # (N, g * g)


def test_token_cache_hits_and_invalidation(train_root, tmp_path):
    weights = tmp_path / "tokenizer.pth"
    weights.write_bytes(b"weights v1")
    cache_dir = tmp_path / "cache"
    tok = FakeTokenizer(weights)
    ds = _pretrain(train_root)
    expected = tok.get_codebook_indices(torch.stack([ds.load_token_image(i) for i in range(6)]))
    tok.calls = tok.images = 0

    assert cache_tokens(ds, tok, str(cache_dir), batch_size=4) == {"hits": 0, "misses": 6}
    assert (tok.calls, tok.images) == (2, 6)
    item = ds[3]
    assert "token_image" not in item and item["tokens"].dtype == torch.long
    assert torch.equal(item["tokens"], expected[3])
    assert os.listdir(cache_dir) == [os.path.basename(token_cache_path(
        str(cache_dir), tok.fingerprint, token_compute_key(tok, "cpu")))]

    # second epoch / next run: a fresh dataset, everything from the cache, tokenizer idle
    ds2 = _pretrain(train_root)
    assert cache_tokens(ds2, tok, str(cache_dir)) == {"hits": 6, "misses": 0}
    assert tok.calls == 2
    batch = next(iter(DataLoader(ds2, batch_size=6)))
    assert torch.equal(batch["tokens"], expected) and "token_image" not in batch

    # an image rewritten -> only that one recomputed
    path = train_root / "train" / "carpet" / "000.png"
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert cache_tokens(_pretrain(train_root), tok, str(cache_dir)) == {"hits": 5, "misses": 1}
    assert tok.images == 7

    # new tokenizer weights -> new fingerprint -> everything recomputed, in a new file
    weights.write_bytes(b"weights v2")
    tok2 = FakeTokenizer(weights)
    assert cache_tokens(_pretrain(train_root), tok2, str(cache_dir)) == {"hits": 0, "misses": 6}
    assert tok2.images == 6 and len(os.listdir(cache_dir)) == 2


def test_token_cache_is_kept_per_device_and_precision(train_root, tmp_path, monkeypatch):
    """Codes made on a GPU (DALL-E in fp16, TF32 convolutions) are not those of the CPU:
    a cache filled under one compute key is never read under another."""
    from modeling_discrete_vae import DalleEncoder
    dalle = DalleEncoder(n_hid=4, n_blk_per_group=1)  # use_mixed_precision: fp16 on CUDA
    assert token_compute_key(dalle, "cpu") == f"cpu-mm-{torch.get_float32_matmul_precision()}"
    cuda = token_compute_key(dalle, "cuda")
    assert cuda.startswith("cuda-") and "fp16" in cuda.split("-")
    assert ("tf32conv" in cuda) == torch.backends.cudnn.allow_tf32
    assert "fp16" not in token_compute_key(
        DalleEncoder(n_hid=4, n_blk_per_group=1, use_mixed_precision=False), "cuda")
    weights = tmp_path / "tokenizer.pth"
    weights.write_bytes(b"w")
    tok = FakeTokenizer(weights)
    cache_dir = str(tmp_path / "cache")
    assert cache_tokens(_pretrain(train_root), tok, cache_dir) == {"hits": 0, "misses": 6}
    monkeypatch.setattr(datasets, "token_compute_key", lambda t, d: cuda)
    assert cache_tokens(_pretrain(train_root), tok, cache_dir) == {"hits": 0, "misses": 6}
    assert cache_tokens(_pretrain(train_root), tok, cache_dir) == {"hits": 6, "misses": 0}
    assert len(os.listdir(cache_dir)) == 2


def _fill_worker(rank: int, init_file: str, root: str, weights: str, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    with utils.distributed("cpu", timeout_min=2, init_method=f"file://{init_file}"):
        tok = FakeTokenizer(Path(weights))
        ds = _pretrain(Path(root))
        stats = cache_tokens(ds, tok, os.path.join(out_dir, "cache"), batch_size=2)
        torch.save({"stats": stats, "images": tok.images, "tokens": ds.tokens},
                   os.path.join(out_dir, f"rank{rank}.pt"))


def test_token_cache_fill_is_shared_by_the_ranks(train_root, tmp_path):
    """Each of 2 ranks tokenizes half of the missing images; both end with all tokens,
    and the file rank 0 writes holds all of them."""
    weights = tmp_path / "tokenizer.pth"
    weights.write_bytes(b"w")
    out = tmp_path / "out"
    out.mkdir()
    assert run_ranks(_fill_worker, (str(tmp_path / "init"), str(train_root), str(weights),
                                    str(out))) == [0, 0]
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert [r["images"] for r in ranks] == [3, 3]
    assert all(r["stats"] == {"hits": 0, "misses": 6} for r in ranks)
    tok = FakeTokenizer(weights)
    ds = _pretrain(train_root)
    expected = tok.get_codebook_indices(torch.stack([ds.load_token_image(i) for i in range(6)]))
    assert all(torch.equal(r["tokens"].long(), expected) for r in ranks)
    assert cache_tokens(ds, tok, str(out / "cache")) == {"hits": 6, "misses": 0}


def _bad_share_worker(rank: int, init_file: str, root: str, weights: str,
                      out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    with utils.distributed("cpu", timeout_min=2, init_method=f"file://{init_file}"):
        try:
            cache_tokens(_pretrain(Path(root)), FakeTokenizer(Path(weights)),
                         os.path.join(out_dir, "cache"), batch_size=1)
            found = None
        except utils.UserError as e:
            found = f"{type(e).__name__}: {e}"
        Path(out_dir, f"rank{rank}.txt").write_text(str(found))


def test_token_cache_fill_an_image_one_rank_cannot_read_stops_every_rank(train_root,
                                                                         tmp_path):
    """The second image is rank 1's to tokenize (misses[1::2]); unreadable, it is rank 1's
    error and rank 0's, naming rank 1 and the file, not rank 1's alone and a gloo
    traceback ("Connection closed by peer") on rank 0 at the gather."""
    weights = tmp_path / "tokenizer.pth"
    weights.write_bytes(b"w")
    bad = _pretrain(train_root).image_paths[1]
    Path(bad).write_bytes(Path(bad).read_bytes()[:40])  # truncated
    out = tmp_path / "out"
    out.mkdir()
    assert run_ranks(_bad_share_worker, (str(tmp_path / "init"), str(train_root),
                                         str(weights), str(out))) == [0, 0]
    rank0, rank1 = ((out / f"rank{r}.txt").read_text() for r in range(2))
    assert rank1.startswith(f"BadFileError: cannot read image {bad}: ")
    assert rank0 == rank1.replace("BadFileError: ", "BadFileError: rank 1 found: ", 1)
    assert not (out / "cache").exists() or not os.listdir(out / "cache")


def _split_view_worker(rank: int, init_file: str, root: str, weights: str,
                       out_dir: str) -> None:
    """Two fills in which rank 1 reads another folder than rank 0's: first one holding
    the 3 bottles only (as a partial save of rank 0 would), then an empty one (another
    node's local folder) while rank 0's is full. Rank 0 saves after every batch."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    datasets._SAVE_EVERY_BATCHES = 1
    with utils.distributed("cpu", timeout_min=2, init_method=f"file://{init_file}"):
        tok = FakeTokenizer(Path(weights))
        fills = []
        for folders in (("shared", "bottles"), ("shared", "empty")):
            ds = _pretrain(Path(root))
            stats = cache_tokens(ds, tok, os.path.join(out_dir, folders[rank]), batch_size=1)
            fills.append({"stats": stats, "images": tok.images, "tokens": ds.tokens})
            tok.images = 0
        torch.save(fills, os.path.join(out_dir, f"rank{rank}.pt"))


def test_token_cache_ranks_split_rank_0s_misses(train_root, tmp_path):
    """Every rank splits the misses rank 0 finds, whatever its own view of the folder:
    a rank that read a partial save (or another node's folder) split a shorter list, so
    some images were tokenized by nobody and every rank failed (KeyError)."""
    weights = tmp_path / "tokenizer.pth"
    weights.write_bytes(b"w")
    out = tmp_path / "out"
    bottles = PretrainDataset(str(train_root), ["bottle"], token_size=32, img_size=64)
    assert cache_tokens(bottles, FakeTokenizer(weights), str(out / "bottles")) == {
        "hits": 0, "misses": 3}
    assert run_ranks(_split_view_worker, (str(tmp_path / "init"), str(train_root),
                                          str(weights), str(out))) == [0, 0]
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]
    tok = FakeTokenizer(weights)
    ds = _pretrain(train_root)
    expected = tok.get_codebook_indices(torch.stack([ds.load_token_image(i) for i in range(6)]))
    for fill, want in enumerate(({"hits": 0, "misses": 6}, {"hits": 6, "misses": 0})):
        assert [r[fill]["stats"] for r in ranks] == [want, want]
        assert [r[fill]["images"] for r in ranks] == [want["misses"] // 2] * 2
        assert all(torch.equal(r[fill]["tokens"].long(), expected) for r in ranks)
    # rank 0's file holds all 6; rank 1 wrote nothing
    assert cache_tokens(ds, tok, str(out / "shared")) == {"hits": 6, "misses": 0}
    assert sorted(os.listdir(out)) == ["bottles", "rank0.pt", "rank1.pt", "shared"]
    assert cache_tokens(_pretrain(train_root), tok, str(out / "bottles")) == {
        "hits": 3, "misses": 3}


def test_image_cache_serves_the_dataloader_batches_exactly(train_root):
    """--cache_images: decoded once, the same batches as the DataLoader path to the bit
    (no augmentation to replay), in RAM and 'on the device' (here the CPU), filled in
    the process or by loader workers."""
    from masking_generator import frequency_weights
    freq = lambda x: frequency_weights(x, patch_size=16)  # noqa: E731
    ds = _pretrain(train_root, freq_weights=freq)
    ds.attach_tokens(torch.randint(0, 64, (6, 16), generator=torch.Generator().manual_seed(0)))
    image = datasets.build_transforms(64)(Image.open(ds.image_paths[1]).convert("RGB"))
    assert torch.equal(ds[1]["image"], image)  # the normalisation is build_transforms'
    sampler = utils.build_sampler(ds, seed=5)
    for batch_size, steps in ((2, 3), (4, 1)):  # 6 images: the last 2 are no full batch
        loader = DataLoader(ds, sampler=sampler, batch_size=batch_size, drop_last=True)
        caches = [datasets.ImageCache(ds, batch_size, where=w, device="cpu", seed=5,
                                      num_workers=workers)
                  for w in ("ram", "device") for workers in (0, 2)]
        for epoch in (0, 1):
            sampler.set_epoch(epoch)
            want = list(loader)
            for cache in caches:
                cache.set_epoch(epoch)
                got = list(cache)
                assert len(got) == len(cache) == len(want) == steps
                for a, b in zip(got, want):
                    assert a.keys() == b.keys()
                    assert all(torch.equal(a[k], b[k]) for k in a)
    assert caches[0].store["image_u8"].dtype == torch.uint8
    with pytest.raises(ValueError, match="cache_tokens"):
        datasets.ImageCache(_pretrain(train_root), 2, where="ram", device="cpu")


def test_normalize_uint8_is_totensor_and_normalize_to_the_bit():
    """Every 8-bit value in each channel, normalised by the ImageNet mean and std as
    ImageCache does (normalize_uint8), equals torchvision's ToTensor + Normalize."""
    values = torch.arange(256, dtype=torch.uint8).repeat(3, 1)[:, :, None]  # (3, 256, 1)
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)
    pil = Image.fromarray(values.permute(1, 2, 0).numpy())
    want = T.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)(T.ToTensor()(pil))
    assert torch.equal(datasets.normalize_uint8(values, mean, std), want)


def test_train_loader_refuses_a_set_without_one_full_batch(train_root):
    """6 images make 3 batches of 2 and 1 of 6; a batch of 7 would never step, so
    build_train_loader says so (with and without the image cache) instead of training
    nothing."""
    ds = _pretrain(train_root)
    ds.attach_tokens(torch.zeros(6, 16, dtype=torch.long))
    kw = dict(device=torch.device("cpu"), seed=0, num_workers=0, pin_memory=False)
    for cache in ("none", "ram"):
        assert len(datasets.build_train_loader(ds, 2, cache_images=cache, **kw)[0]) == 3
        assert len(datasets.build_train_loader(ds, 6, cache_images=cache, **kw)[0]) == 1
        with pytest.raises(utils.FlagError) as err:
            datasets.build_train_loader(ds, 7, cache_images=cache, **kw)
        assert str(err.value) == ("--batch_size 7 makes no full batch: there are 6 training "
                                  "images. Fix: pass --batch_size 6 or less")


def test_image_cache_under_ddp_is_the_distributed_sampler_order(train_root, monkeypatch,
                                                                 two_rank_world):
    """2 ranks, 9 images: each epoch one permutation of all 9 from (seed, epoch), padded
    to 10 by repeating its start, every 2nd to each rank (DistributedSampler's order), so
    every image trains every epoch, and each rank's batches are its DataLoader's to the
    bit. A fixed shard of floor(9/2) per rank never trained image 8's share."""
    for i, grey in enumerate((70, 160, 250), start=3):
        _save(train_root / "train" / "carpet" / f"{i:03d}.png", np.full((128, 128), grey,
                                                                       np.uint8))
        _save(train_root / "fg_mask" / "carpet" / f"{i:03d}.png", np.full((128, 128), 255,
                                                                         np.uint8))
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)  # the listing's notes
    ds = _pretrain(train_root)
    ds.attach_tokens(torch.randint(0, 64, (9, 16), generator=torch.Generator().manual_seed(0)))
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    seen: dict[tuple[int, int], list[int]] = {}
    for rank in (0, 1):
        monkeypatch.setattr(dist, "get_rank", lambda group=None, rank=rank: rank)
        sampler = utils.build_sampler(ds, seed=5)
        loader = DataLoader(ds, sampler=sampler, batch_size=1, drop_last=True)
        cache = datasets.ImageCache(ds, 1, where="ram", device="cpu", seed=5)
        assert len(cache) == len(loader) == 5
        for epoch in (0, 1, 2):
            sampler.set_epoch(epoch)
            cache.set_epoch(epoch)
            got, want = list(cache), list(loader)
            assert len(got) == len(want) == 5
            for a, b in zip(got, want):
                assert a.keys() == b.keys()
                assert all(torch.equal(a[k], b[k]) for k in a)
            seen[rank, epoch] = [int(b["index"]) for b in got]
    for epoch in (0, 1, 2):
        order = torch.randperm(9, generator=torch.Generator().manual_seed(5 + epoch)).tolist()
        order += order[:1]  # (10,): padded to a multiple of the 2 ranks
        assert [seen[r, epoch] for r in (0, 1)] == [order[0::2], order[1::2]]
        assert sorted(set(seen[0, epoch] + seen[1, epoch])) == list(range(9))
    assert seen[0, 0] != seen[0, 1]  # a rank trains other images each epoch


def test_full_batch_rule_per_rank_matches_the_sampler_and_the_cache(train_root, monkeypatch):
    """4 ranks, 6 images: DistributedSampler pads each rank to ceil(6/4) = 2 samples, and
    ImageCache follows it; require_full_batch allows exactly the batch sizes whose loaders
    have a step."""
    monkeypatch.setattr(utils, "get_world_size", lambda: 4)  # build_sampler's
    monkeypatch.setattr(datasets, "get_world_size", lambda: 4)
    ds = _pretrain(train_root)
    ds.attach_tokens(torch.zeros(6, 16, dtype=torch.long))
    kw = dict(device=torch.device("cpu"), seed=0, num_workers=0, pin_memory=False)
    for cache in ("none", "ram"):
        assert len(datasets.build_train_loader(ds, 2, cache_images=cache, **kw)[0]) == 1
        with pytest.raises(utils.FlagError) as err:
            datasets.build_train_loader(ds, 3, cache_images=cache, **kw)
        assert str(err.value) == (
            "--batch_size 3 makes no full batch: each of 4 processes gets 2 of the 6 "
            "training images. Fix: pass --batch_size 2 or less, or use fewer processes")
    datasets.require_full_batch(3, 1)  # 3 images, 4 ranks: 1 each, one a repeat


def test_token_cache_checks(train_root, mvtec_root, tmp_path):
    weights = tmp_path / "tok.pth"
    weights.write_bytes(b"w")
    with pytest.raises(ValueError, match="token_size=16"):
        cache_tokens(_pretrain(train_root), FakeTokenizer(weights, image_size=16), str(tmp_path))
    with pytest.raises(ValueError, match=r"expected integer codes \(4, 16\)"):
        cache_tokens(_pretrain(train_root), FakeTokenizer(weights, grid=2), str(tmp_path),
                     batch_size=4)
    # a damaged cache file is rebuilt, with a warning
    tok = FakeTokenizer(weights)
    Path(token_cache_path(str(tmp_path), tok.fingerprint, token_compute_key(tok, "cpu"))
         ).write_bytes(b"not a torch file")
    test_set = MVTecTestDataset(str(mvtec_root), "bottle", token_size=32, img_size=64)
    with pytest.warns(UserWarning, match="unreadable"):
        assert cache_tokens(test_set, tok, str(tmp_path)) == {"hits": 0, "misses": 4}
    assert test_set[0]["tokens"].shape == (16,) and "token_image" not in test_set[0]
    assert cache_tokens(test_set, tok, str(tmp_path)) == {"hits": 4, "misses": 0}
    # the right keys holding the wrong types: rebuilt too, not an AttributeError
    path = token_cache_path(str(tmp_path), tok.fingerprint, token_compute_key(tok, "cpu"))
    payload = torch.load(path, weights_only=True)
    torch.save({**payload, "stamps": [[1, 2]] * 4}, path)
    with pytest.warns(UserWarning, match="unreadable"):
        assert cache_tokens(test_set, tok, str(tmp_path)) == {"hits": 0, "misses": 4}


def test_normalization_follows_the_flag():
    assert normalization(True) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert normalization(False) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


# ----------------------------------------------------------------------------------------
# Reading image and mask files
# ----------------------------------------------------------------------------------------
def test_a_sliver_or_an_oversized_image_is_refused_naming_the_fix(tmp_path, monkeypatch):
    """A 6000 x 1 image took 2 GB to resize (its short side goes to 224 px): more than
    MAX_ASPECT times longer than wide is refused, at MAX_ASPECT it reads. An image over
    Pillow's pixel limit said 'replace the file' as if it were damaged; now it says to
    downscale it."""
    Image.new("RGB", (20 * datasets.MAX_ASPECT + 1, 20)).save(tmp_path / "sliver.png")
    with pytest.raises(datasets.BadFileError, match=(
            rf"sliver.png is {20 * datasets.MAX_ASPECT + 1}x20 pixels, more than "
            rf"{datasets.MAX_ASPECT} times longer than wide: crop it")):
        datasets.open_rgb(str(tmp_path / "sliver.png"))
    with pytest.warns(UserWarning, match="left out 1 bad file"):  # as --skip_bad_images lists it
        kept, bad = datasets._drop_bad_files([str(tmp_path / "sliver.png")], datasets.open_rgb,
                                             "images")
    assert kept == [] and bad[0].endswith("crop it to the part to score")
    Image.new("RGB", (20, 20 * datasets.MAX_ASPECT)).save(tmp_path / "tall.png")
    assert datasets.open_rgb(str(tmp_path / "tall.png")).size == (20, 20 * datasets.MAX_ASPECT)
    Image.new("RGB", (20, 20)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 400 px is over twice the limit
    with pytest.raises(datasets.BadFileError) as err:
        datasets.open_rgb(str(tmp_path / "big.png"))
    assert "big.png is too large to open (Image size (400 pixels) exceeds limit" in str(err.value)
    assert str(err.value).endswith("downscale it (or pass --skip_bad_images to leave bad "
                                   "files out)")


def test_16_bit_grey_reads_by_its_bit_depth_not_its_maximum(tmp_path):
    """Every 16-bit image keeps its top 8 bits (as OpenCV reads it), whatever its own
    maximum: images of one camera scale alike. PIL before 10.3 opens 16-bit PNGs as 32-bit
    'I', read the same way; float pixels and 32-bit values beyond 16 bits are refused."""
    ramp = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16  # 0 ... 65520
    for top in (256, 4095, 65520):
        path = tmp_path / f"top{top}.png"
        Image.fromarray((ramp.astype(np.int64) * top // 65520).astype(np.uint16)).save(path)
        with Image.open(path) as img:
            assert img.mode == "I;16"
        got = np.asarray(datasets.open_rgb(str(path)))
        assert got.shape == (64, 64, 3) and got.max() == top >> 8
    path = tmp_path / "wide.tif"
    Image.fromarray(ramp.astype(np.int32)).save(path)
    with Image.open(path) as img:
        assert img.mode == "I"
    np.testing.assert_array_equal(np.asarray(datasets.open_rgb(str(path)))[..., 0], ramp >> 8)
    Image.fromarray(ramp.astype(np.int32) * 2).save(path)
    with pytest.raises(BadFileError, match=r"wide.tif holds I values from 0 to 131040, "
                       "outside 16 bits: save it as an 8- or 16-bit image"):
        datasets.open_rgb(str(path))
    Image.fromarray(ramp.astype(np.float32) / 65520).save(tmp_path / "float.tif")
    with pytest.raises(BadFileError, match="float.tif holds 32-bit float pixels"):
        datasets.open_rgb(str(tmp_path / "float.tif"))
    # both found up front too (check_test_classes' header check decodes such images)
    assert datasets.image_problem(str(tmp_path / "float.tif")) == (
        f"{tmp_path / 'float.tif'} holds 32-bit float pixels, whose range the file does not "
        "give: save it as an 8- or 16-bit image")
    assert datasets.image_problem(str(path)) == (
        f"{path} holds I values from 0 to 131040, outside 16 bits: save it as an 8- or "
        "16-bit image")


def test_8_bit_values_in_a_16_or_32_bit_file_are_refused_not_read_black(tmp_path):
    """cv2.imwrite of 0-255 values as uint16 (and a 32-bit TIFF of them) read all black,
    as their top 8 bits are 0: refused, naming the file, its maximum and the fix. An
    all-black 16-bit image is black indeed, and one reaching 256 keeps its top 8 bits."""
    ramp = (np.arange(64 * 64).reshape(64, 64) % 256).astype(np.uint16)  # 0 ... 255
    fix = "save it as an 8-bit image, or scale it to the 16-bit range"
    Image.fromarray(ramp).save(tmp_path / "cv2.png")
    with pytest.raises(BadFileError, match=rf"cv2.png holds I;16 values no larger than 255: "
                       rf"read by its top 8 bits, as every 16-bit image is, it would be all "
                       rf"black; {fix}"):
        datasets.open_rgb(str(tmp_path / "cv2.png"))
    # found up front too (check_test_classes), for a normal image and a defective one,
    # not when its class is reached: such images alone are decoded by the check
    assert datasets.image_problem(str(tmp_path / "cv2.png")).endswith(f"all black; {fix} (x 257)")
    _save(tmp_path / "cv2_mask.png", np.zeros((64, 64), np.uint8))
    assert "values no larger than 255" in datasets.mask_problem(
        str(tmp_path / "cv2_mask.png"), str(tmp_path / "cv2.png"), image_required=True)
    Image.fromarray((ramp // 2).astype(np.int32)).save(tmp_path / "i32.tif")
    with pytest.raises(BadFileError, match=r"i32.tif holds I values no larger than 127: "):
        datasets.open_rgb(str(tmp_path / "i32.tif"))
    Image.fromarray(np.zeros((8, 8), np.uint16)).save(tmp_path / "black.png")
    assert np.asarray(datasets.open_rgb(str(tmp_path / "black.png"))).max() == 0
    assert datasets.image_problem(str(tmp_path / "black.png")) is None
    ramp[0, 0] = 256
    Image.fromarray(ramp).save(tmp_path / "top256.png")
    got = np.asarray(datasets.open_rgb(str(tmp_path / "top256.png")))
    assert got.max() == 1 and np.count_nonzero(got[..., 0]) == 1


@pytest.mark.parametrize("mode, tile, wide", [
    ("RGB", ("zip", (0, 0, 4, 4), 0, "RGB;16B"), True),  # PNG
    ("RGBA", ("libtiff", (0, 0, 4, 4), 0, ("RGBA;16N", False, 706)), True),  # TIFF
    ("RGB", ("raw", (0, 0, 4, 4), 0, ("BGR;16", 0, 1)), False),  # BMP's packed 5-6-5
    ("RGB", ("jpeg", (0, 0, 4, 4), 0, ("RGB", "")), False),
    ("I;16", ("zip", (0, 0, 4, 4), 0, "I;16B"), False),  # grey: _eight_bit reads it
])
def test_sixteen_bit_colour_from_pillows_tiles(mode, tile, wide):
    """Tiles as plain tuples (Pillow 10; Pillow 11's named tuples index alike): 16 bits a
    channel in PNG's and TIFF's raw modes, not in BMP's packed 16-bit colour."""
    img = SimpleNamespace(mode=mode, tile=[tile])
    assert datasets._sixteen_bit_colour(img) is wide


@pytest.mark.parametrize("ext", ["png", "tif"])
def test_8_bit_values_in_a_16_bit_colour_file_are_refused_not_read_black(tmp_path, ext):
    """A colour image of 16 bits a channel (cv2.imwrite of 0-255 values as uint16, RGB
    or RGBA) is read by Pillow by its top 8 bits, all 0: refused as a grey one is, up
    front too, by its colour alone (a full 16-bit alpha does not save it). All black
    indeed, it reads black; with its values scaled to 16 bits, it keeps its top 8."""
    ramp = (np.arange(48 * 64 * 3).reshape(48, 64, 3) % 256).astype(np.uint16)  # 0 ... 255
    opaque = np.full((48, 64, 1), 65535, np.uint16)
    for name, pixels in (("rgb", ramp), ("rgba", np.concatenate([ramp, opaque], -1))):
        path = str(tmp_path / f"{name}.{ext}")
        cv2.imwrite(path, pixels)
        with Image.open(path) as img:
            assert img.mode == name.upper()  # read by Pillow as 8-bit colour
        expected = (f"{path} holds 16-bit {name.upper()} values no larger than 255: read by "
                    "its top 8 bits, as every 16-bit image is, it would be all black; save it "
                    "as an 8-bit image, or scale it to the 16-bit range (x 257)")
        with pytest.raises(BadFileError) as err:
            datasets.open_rgb(path)
        assert str(err.value) == expected
        assert datasets.image_problem(path) == expected
    black = str(tmp_path / f"black.{ext}")
    cv2.imwrite(black, np.concatenate([np.zeros_like(ramp), opaque], -1))
    assert datasets.image_problem(black) is None
    assert np.asarray(datasets.open_rgb(black)).max() == 0
    scaled = str(tmp_path / f"scaled.{ext}")
    cv2.imwrite(scaled, ramp * 257)
    assert datasets.image_problem(scaled) is None
    np.testing.assert_array_equal(np.asarray(datasets.open_rgb(scaled)), ramp[..., ::-1])


@pytest.mark.parametrize("name, values, expected", [
    ("binary 0/1", {1: 1}, {1}),
    ("binary 0/255", {1: 255}, {1}),
    ("label ids 1 and 3", {1: 1, 2: 3}, {1, 2}),
    ("blurred edge", {1: 255, 2: 100, 3: 140, **{4 + i: 10 + i for i in range(20)}}, {1, 3}),
    ("few-valued edge", {1: 255, 2: 40, 3: 200, 4: 3}, {1, 3}),
    ("label ids up to 16", {1: 1, 2: 8, 3: 16}, {1, 2, 3}),
    ("compressed, peak 200", {1: 200, 2: 120, 3: 100, 4: 30}, {1, 2}),  # half: normal
])
def test_mask_defects_reads_binary_masks_label_maps_and_blurred_edges(name, values, expected):
    """Two values: the larger is the defect; a label map (ids up to 16): every non-zero
    id, half the maximum would drop id 1; a binary mask blurred or compressed (its
    maximum far above 16, however few its values): above half the maximum."""
    regions = np.repeat(np.arange(24), 4)[None].repeat(4, 0)  # (4, 96): 24 regions
    arr = np.zeros(regions.shape, np.uint8)
    for region, value in values.items():
        arr[regions == region] = value
    defects = datasets.mask_defects(arr)
    assert set(np.unique(regions[defects]).tolist()) == expected, name
    assert not datasets.mask_defects(np.zeros((4, 4), np.uint8)).any()


def test_a_two_valued_mask_marks_its_larger_value():
    """Neither value 0: a grey background (128) above half the maximum was all defect."""
    grey = np.full((4, 96), 128, np.uint8)
    grey[:, :8] = 255
    assert datasets.mask_defects(grey).nonzero()[1].tolist() == [*range(8)] * 4
    assert datasets.mask_defects(grey.astype(np.float32) / 255).sum() == 32


def test_palette_and_colour_masks_read_by_index_and_strongest_channel(tmp_path):
    """A palette mask of colours by its indices (0 the background, even when it is
    white), one of greys by its colours; a colour mask by its strongest channel, so a
    red defect beside a yellow one counts (its luminance would not); alpha never
    counts."""
    ids = np.zeros((8, 8), np.uint8)
    ids[:2], ids[2:4] = 1, 2
    palette = Image.fromarray(ids, mode="P")
    palette.putpalette([255, 255, 255, 255, 0, 0, 0, 0, 90] + [0] * 759)  # white, red, blue
    palette.save(tmp_path / "p.png")
    got = np.asarray(datasets.open_mask(str(tmp_path / "p.png"))) > 0
    np.testing.assert_array_equal(got, ids > 0)
    colour = np.zeros((8, 8, 3), np.uint8)
    colour[:2] = (200, 0, 0)  # luminance 60, below half the yellow's 222
    colour[2:4] = (250, 250, 0)
    Image.fromarray(colour).save(tmp_path / "rgb.png")
    got = np.asarray(datasets.open_mask(str(tmp_path / "rgb.png"))) > 0
    np.testing.assert_array_equal(got, ids > 0)
    # a palette of greys that lists white (the defect) first reads by its colours
    grey = Image.fromarray((ids == 0).astype(np.uint8), mode="P")  # defect rows: index 0
    grey.putpalette([255, 255, 255, 0, 0, 0] + [0] * 762)
    grey.save(tmp_path / "grey_p.png")
    got = np.asarray(datasets.open_mask(str(tmp_path / "grey_p.png"))) > 0
    np.testing.assert_array_equal(got, ids > 0)
    # grey with alpha (as image editors export a layer): the alpha is no defect
    Image.fromarray((ids > 0).astype(np.uint8) * 255).convert("LA").save(tmp_path / "la.png")
    got = np.asarray(datasets.open_mask(str(tmp_path / "la.png"))) > 0
    np.testing.assert_array_equal(got, ids > 0)
    premultiplied = Image.fromarray((ids > 0).astype(np.uint8) * 255).convert("LA").convert("La")
    np.testing.assert_array_equal(datasets.mask_values(premultiplied) > 0, ids > 0)


def test_palette_ids_are_categories_and_a_quantized_palette_reads_by_colour(tmp_path):
    """A VOC mask (ids 0 and 1, 255 on the boundary) read only its 255 boundary (half
    the maximum of the ids); every non-zero id is a defect now. Pillow's quantize() of
    red on black lists red first, which read as the background: a palette whose index 0
    is a colour while black is used reads by its colours."""
    ids = np.zeros((40, 40), np.uint8)
    ids[10:30, 10:30] = 255
    ids[12:28, 12:28] = 1
    voc = Image.fromarray(ids, mode="P")
    voc.putpalette([0, 0, 0, 128, 0, 0] + [0] * 759 + [224, 224, 192])
    voc.save(tmp_path / "voc.png")
    got = np.asarray(datasets.open_mask(str(tmp_path / "voc.png"))) > 0
    np.testing.assert_array_equal(got, ids > 0)
    assert got.sum() == 400
    colour = np.zeros((40, 40, 3), np.uint8)
    colour[:30] = (255, 0, 0)
    quantized = Image.fromarray(colour).quantize(2)
    assert quantized.getpalette()[:6] == [255, 0, 0, 0, 0, 0]  # red is index 0
    quantized.save(tmp_path / "quantized.png")
    got = np.asarray(datasets.open_mask(str(tmp_path / "quantized.png"))) > 0
    assert got[:30].all() and not got[30:].any()


def test_a_float_mask_reads_by_its_values_and_nan_or_negatives_are_refused(tmp_path):
    """A mode-F mask was converted to RGB, which truncates 0.9 to 0: an empty mask. Now
    its values count, with the masks' rule (two values: the larger; soft values: above
    half the maximum); NaN, infinite and negative values are refused, naming the file."""
    values = np.zeros((8, 8), np.float32)
    values[:2] = 0.9
    Image.fromarray(values).save(tmp_path / "binary.tif")
    got = np.asarray(datasets.open_mask(str(tmp_path / "binary.tif"))) > 0
    assert got[:2].all() and not got[2:].any()
    values[2:4] = 0.3  # soft: 0.3 lies under half of 0.9
    values[4, :3] = (0.5, 1.0, 2.0)  # few small whole values are no label map when soft
    Image.fromarray(values).save(tmp_path / "soft.tif")
    got = np.asarray(datasets.open_mask(str(tmp_path / "soft.tif"))) > 0
    np.testing.assert_array_equal(got, values > 1.0)
    values[0, 0] = np.nan
    values[1, 1] = -1
    Image.fromarray(values).save(tmp_path / "nan.tif")
    with pytest.raises(BadFileError, match=r"cannot read mask .*nan.tif: it holds NaN and "
                       r"negative float values, where a mask's are 0 \(background\) or "
                       r"more: save it as an 8-bit mask"):
        datasets.open_mask(str(tmp_path / "nan.tif"))
    values[0, 0], values[1, 1] = np.inf, 0.9
    Image.fromarray(values).save(tmp_path / "inf.tif")
    with pytest.raises(BadFileError, match=r"inf.tif: it holds infinite float values, where "):
        datasets.open_mask(str(tmp_path / "inf.tif"))


def _exif_turned(path: Path, stored: np.ndarray, orientation: int) -> Path:
    """`stored` saved as a JPEG (or PNG) whose EXIF says how to turn it for viewing."""
    exif = Image.Exif()
    exif[datasets.EXIF_ORIENTATION] = orientation
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(stored).save(path, exif=exif, **({"quality": 100} if path.suffix == ".jpg"
                                                     else {}))
    return path


def test_exif_orientation_is_applied_to_images_masks_and_their_sizes(tmp_path):
    """A phone photo stored 80x40 with orientation 6 (a quarter turn clockwise) is read
    40x80 as every viewer shows it; a mask drawn on what the user sees aligns with it,
    both in the header-only check and in the decoded pixels."""
    stored = np.zeros((40, 80, 3), np.uint8)
    stored[:, :10] = 255  # the stored left band: the top band once turned clockwise
    photo = _exif_turned(tmp_path / "img.jpg", stored, 6)
    shown = np.asarray(datasets.open_rgb(str(photo)))
    assert shown.shape == (80, 40, 3)
    assert shown[:10].mean() > 250 and shown[12:].mean() < 5
    mask = np.zeros((80, 40), np.uint8)
    mask[:10] = 255
    _save(tmp_path / "mask.png", mask)
    assert datasets.mask_problem(str(tmp_path / "mask.png"), str(photo)) is None
    turned_mask = _exif_turned(tmp_path / "turned_mask.png", mask.T.copy()[:, ::-1].copy(), 8)
    np.testing.assert_array_equal(np.asarray(datasets.open_mask(str(turned_mask))), mask)
    _save(tmp_path / "stored_way.png", np.zeros((40, 80), np.uint8))
    # a mask drawn on the stored pixels (a tool that ignores EXIF): the message says why
    # the sizes disagree, which the files' own sizes (both 80x40) do not
    assert datasets.mask_problem(str(tmp_path / "stored_way.png"), str(photo)) == (
        f"{tmp_path / 'stored_way.png'} is 80x40 but its image {photo} is 40x80: they cannot "
        "be aligned (it is stored 80x40, turned by its EXIF orientation as a viewer shows it: "
        "the mask was drawn on the stored pixels; save the mask turned the same way, or the "
        "image upright without the tag)")
    _save(tmp_path / "other.png", np.zeros((40, 100), np.uint8))  # fits neither: no hint
    assert "EXIF" not in datasets.mask_problem(str(tmp_path / "other.png"), str(photo))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_turns_images_masks_and_sizes_as_a_viewer_does(tmp_path,
                                                                             orientation):
    """Each of the eight EXIF orientations (mirrors and turns alike) as Pillow's
    exif_transpose shows it: the decoded image, the mask and the header-only size."""
    stored = (np.arange(6 * 10).reshape(6, 10) * 4).astype(np.uint8)  # no two pixels alike
    photo = _exif_turned(tmp_path / "img.png", stored, orientation)
    with Image.open(photo) as img:
        shown = np.asarray(ImageOps.exif_transpose(img))
        assert datasets.oriented_size(img) == (shown.shape[1], shown.shape[0])
    np.testing.assert_array_equal(np.asarray(datasets.open_rgb(str(photo)))[..., 0], shown)
    drawn = np.zeros((6, 10), np.uint8)
    drawn[0, :3] = drawn[:2, 0] = 255  # an L in the stored top-left corner
    mask = _exif_turned(tmp_path / "mask.png", drawn, orientation)
    with Image.open(mask) as img:
        expected = np.asarray(ImageOps.exif_transpose(img)) > 0
    np.testing.assert_array_equal(np.asarray(datasets.open_mask(str(mask))) > 0, expected)


def _late_exif_png(path: Path, stored: np.ndarray, orientation: int) -> Path:
    """`stored` as a PNG whose eXIf chunk (`orientation`) comes after the pixel data."""
    exif = Image.Exif()
    exif[datasets.EXIF_ORIENTATION] = orientation
    payload = exif.tobytes()
    payload = payload[6:] if payload.startswith(b"Exif\x00\x00") else payload
    chunk = (struct.pack(">I", len(payload)) + b"eXIf" + payload
             + struct.pack(">I", zlib.crc32(b"eXIf" + payload)))
    buf = io.BytesIO()
    Image.fromarray(stored).save(buf, "PNG")
    data = buf.getvalue()
    end = data.rindex(b"IEND") - 4
    path.write_bytes(data[:end] + chunk + data[end:])
    return path


def test_an_exif_chunk_after_the_pixels_is_ignored_by_sizes_and_pixels_alike(tmp_path):
    """The header-only size check saw no orientation in a PNG whose eXIf chunk follows
    the pixels, but the decode filled it in and open_rgb turned the image: masks made
    from the decoded image (--make_fg_masks) were then refused by that same check. The
    header is now the one source: such a chunk is ignored everywhere."""
    stored = np.zeros((40, 80, 3), np.uint8)
    stored[:, :10] = 255  # the left band
    photo = _late_exif_png(tmp_path / "late.png", stored, 6)
    with Image.open(photo) as img:
        assert datasets.oriented_size(img) == (80, 40)
    shown = np.asarray(datasets.open_rgb(str(photo)))
    np.testing.assert_array_equal(shown, stored)
    mask = np.zeros((40, 80), np.uint8)
    mask[:, :10] = 255
    turned_mask = _late_exif_png(tmp_path / "late_mask.png", mask, 6)
    np.testing.assert_array_equal(np.asarray(datasets.open_mask(str(turned_mask))), mask)
    _save(tmp_path / "mask.png", mask)
    assert datasets.mask_problem(str(tmp_path / "mask.png"), str(photo)) is None
    assert datasets.mask_problem(str(turned_mask), str(photo)) is None


def test_a_turned_tiff_is_refused_not_turned_twice(tmp_path):
    """Pillow 13 turns a TIFF of orientation 5-8 while decoding and reports the turned
    size, which oriented_size swapped again (scrambled pixels); older Pillows do not
    turn it. Refused up front and when read, naming the file and the fix; an upright
    TIFF reads as stored."""
    stored = np.zeros((40, 80), np.uint8)
    stored[:, :10] = 255
    fix = "which Pillow versions read differently: save it upright"
    for orientation in (3, 6):
        tags = TiffImagePlugin.ImageFileDirectory_v2()
        tags[datasets.EXIF_ORIENTATION] = orientation
        path = tmp_path / f"turned{orientation}.tif"
        Image.fromarray(stored).save(path, tiffinfo=tags)
        problem = (f"{path} is stored turned or mirrored (TIFF orientation {orientation}), "
                   f"{fix} (the turn applied, orientation 1)")
        assert datasets.image_problem(str(path)) == f"{path} is unreadable: {problem}"
        with pytest.raises(BadFileError) as err:
            datasets.open_rgb(str(path))
        assert str(err.value) == problem
        with pytest.raises(BadFileError) as err:
            datasets.open_mask(str(path))
        assert str(err.value).startswith(f"cannot read mask {path}: {problem}; ")
    Image.fromarray(stored).save(tmp_path / "upright.tif")
    np.testing.assert_array_equal(
        np.asarray(datasets.open_rgb(str(tmp_path / "upright.tif")))[..., 0], stored)


def test_an_mvtec_set_unzipped_on_macos_reads_as_its_classes(mvtec_root):
    """__MACOSX (with its own <class>/test/ trees of '._' files) is no class, and a
    hidden folder in test/ is no defect type."""
    (mvtec_root / "__MACOSX" / "bottle" / "test" / "good").mkdir(parents=True)
    (mvtec_root / "bottle" / "test" / ".ipynb_checkpoints").mkdir()
    assert datasets.list_test_classes(str(mvtec_root)) == ["01", "bottle"]
    ds = MVTecTestDataset(str(mvtec_root), "bottle", token_size=32, img_size=64)
    assert ds.defect_types == ["broken"] * 2 + ["good"] * 2


def test_a_ground_truth_mask_is_found_whatever_the_case_of_its_extension(mvtec_root):
    gt = mvtec_root / "bottle" / "ground_truth" / "broken"
    os.rename(gt / "000_mask.png", gt / "000_mask.PNG")
    ds = MVTecTestDataset(str(mvtec_root), "bottle", token_size=32, img_size=64)
    assert ds.mask_paths[0] == str(gt / "000_mask.PNG") and ds[0]["gt_mask"].sum() == 256


def test_a_lower_case_mask_extension_wins_when_both_cases_exist(mvtec_root):
    """000_mask.png and 000_mask.PNG side by side (a set copied over on a case-sensitive
    disk): the lower-case one, as the layout names it, is the mask, whatever the order
    in which the folder lists them."""
    gt = mvtec_root / "bottle" / "ground_truth" / "broken"
    if (gt / "000_mask.PNG").exists():  # macOS's and Windows' default disks ignore case
        pytest.skip("this file system ignores case: one file holds both names")
    _save(gt / "000_mask.PNG", np.zeros((128, 128), np.uint8))
    ds = MVTecTestDataset(str(mvtec_root), "bottle", token_size=32, img_size=64)
    assert ds.mask_paths[0] == str(gt / "000_mask.png") and ds[0]["gt_mask"].sum() == 256


def test_a_stem_mask_beside_the_image_named_one_is_not_taken_for_it(mvtec_root):
    """MVTec's mask of 000.png is 000_mask.png; a file named 000.png in the ground-truth
    folder too (a stray copy of the image, or BTAD's naming beside MVTec's) does not
    replace it: '<stem>_mask' is looked up first."""
    gt = mvtec_root / "bottle" / "ground_truth" / "broken"
    _save(gt / "000.png", np.zeros((128, 128), np.uint8))
    ds = MVTecTestDataset(str(mvtec_root), "bottle", token_size=32, img_size=64)
    assert ds.mask_paths[0] == str(gt / "000_mask.png") and ds[0]["gt_mask"].sum() == 256


def test_a_foreground_mask_is_a_png_named_by_its_images_stem():
    """docs/method.md 4: <root>/fg_mask/<class>/<stem>.png whatever the image's format
    (VisA's .JPG, BTAD's .bmp): the released fg_mask.zip and --make_fg_masks write PNGs
    (lossless), which a name taken from the image would not find."""
    for image in ("/d/train/candle/0000.JPG", "/d/train/candle/0000.png",
                  "/d/train/candle/0000.bmp"):
        assert datasets.fg_mask_path("/d", "candle", image) == os.path.join(
            "/d", "fg_mask", "candle", "0000.png")


# ----------------------------------------------------------------------------------------
# Links to missing files, images of one stem, files of other types
# ----------------------------------------------------------------------------------------
def _dangle(link: Path) -> Path:
    """`link` made a symbolic link to a file that does not exist; -> its target."""
    target = link.parent / f"gone_{link.name}"
    os.symlink(target, link)
    assert os.path.lexists(link) and not link.exists()
    return target


def test_a_training_image_linking_nowhere_is_refused_or_left_out_as_a_bad_file(train_root):
    """Not dropped by the listing: an error naming the link and its target before any
    work, or with skip_bad_images listed in the warning and left out, as an unreadable
    image is."""
    link = train_root / "train" / "bottle" / "003.png"
    target = _dangle(link)
    problem = f"{link} is a link to {target}, which does not exist"
    for make in (_pretrain, lambda root: TrainImageDataset(str(root), ["bottle", "carpet"])):
        with pytest.raises(BadFileError) as err:
            make(train_root)
        assert str(err.value) == (f"1 file(s) missing:\n  {problem}\n"
                                  f"Fix: {datasets.FIX_BAD_FILE}")
    with pytest.warns(UserWarning, match=r"left out 1 bad file\(s\) of 7"):
        ds = _pretrain(train_root, skip_bad_images=True)
    assert ds.bad_files == [f"image {problem}; replace the file"]  # no "pass --skip_bad..."
    assert len(ds) == 6 and str(link) not in ds.image_paths
    with pytest.warns(UserWarning, match=str(link)):
        ds = TrainImageDataset(str(train_root), ["bottle"], skip_bad_images=True)
    assert [os.path.basename(p) for p, _ in ds.samples] == ["000.png", "001.png", "002.png"]


def test_a_foreground_mask_linking_nowhere_is_named_with_its_lost_target(train_root):
    """A missing mask that is a link to nothing says so (the file is there, its target is
    not), rather than a bare path that `ls` lists."""
    mask = train_root / "fg_mask" / "bottle" / "001.png"
    mask.unlink()
    target = _dangle(mask)
    with pytest.raises(BadFileError) as err:
        _pretrain(train_root)
    assert str(err.value) == (
        f"1 foreground mask(s) missing:\n  {mask} is a link to {target}, which does not "
        f"exist\nFix: {datasets.FIX_FG_MASK}")


def test_foreground_masks_one_folder_too_deep_are_found_and_named(train_root):
    """fg_mask.zip holds fg_mask/<class>/; unzipped by hand inside fg_mask/ its masks lie
    in fg_mask/fg_mask/<class>/, and the error said only that the class had none."""
    masks = train_root / "fg_mask" / "bottle"
    deep = train_root / "fg_mask" / "fg_mask"
    deep.mkdir()
    masks.rename(deep / "bottle")
    with pytest.raises(BadFileError) as err:
        _pretrain(train_root)
    head, fix = str(err.value).split("\nFix: ")
    assert head == (f"3 foreground mask(s) missing:\n  {masks}/ (no masks for any of its 3 "
                    "images)")
    assert fix == (f"the masks of bottle are one folder too deep, in {deep}/ (the zip "
                   f"unpacked inside fg_mask/): move its class folders up into "
                   f"{train_root / 'fg_mask'}/, or {datasets.FIX_FG_MASK}")


def test_a_test_image_or_mask_linking_nowhere_is_refused_or_left_out(mvtec_root):
    image = mvtec_root / "bottle" / "test" / "good" / "002.png"
    image_target = _dangle(image)
    gt = mvtec_root / "bottle" / "ground_truth" / "broken" / "001_mask.png"
    os.remove(gt)
    mask_target = _dangle(gt)
    image_problem = f"{image} is a link to {image_target}, which does not exist"
    mask_problem = f"{gt} is a link to {mask_target}, which does not exist"
    with pytest.raises(BadFileError) as err:
        datasets.check_test_classes(str(mvtec_root), ["bottle"])
    assert str(err.value) == (
        f"2 test file problem(s):\n  {mask_problem} (mask of "
        f"{mvtec_root}/bottle/test/broken/001.png)\n  {image_problem}\n"
        f"Fix: {datasets.FIX_BAD_FILE}")
    with pytest.raises(BadFileError) as err:
        MVTecTestDataset(str(mvtec_root), "bottle", token_size=32, img_size=64)
    assert str(err.value) == (f"2 file(s) missing:\n  {mask_problem}\n  {image_problem}\n"
                              f"Fix: {datasets.FIX_BAD_FILE}")
    with pytest.warns(UserWarning, match=r"left out 2 bad file\(s\) of 5"):
        ds = MVTecTestDataset(str(mvtec_root), "bottle", token_size=32, img_size=64,
                              skip_bad_images=True)
    assert ds.bad_files == [f"ground-truth mask {mask_problem}; replace the file",
                            f"image {image_problem}; replace the file"]
    assert [os.path.basename(p) for p in ds.image_paths] == ["000.png", "000.png", "001.png"]
    assert ds.labels == [1, 0, 0] and ds[0]["gt_mask"].sum() == 256


def test_a_class_folder_linking_nowhere_is_an_error_not_a_class_less(mvtec_root, train_root):
    link = mvtec_root / "cable"
    target = _dangle(link)
    for listing in (datasets.list_test_classes, datasets.find_test_classes):
        with pytest.raises(LayoutError) as err:
            listing(str(mvtec_root))
        assert str(err.value) == (
            f"1 link(s) in {mvtec_root} lead nowhere:\n  {link} is a link to {target}, "
            f"which does not exist\nFix: {datasets.FIX_DANGLING}")
    target = _dangle(train_root / "train" / "wood")
    with pytest.raises(LayoutError, match=f"train/wood is a link to {target}, which does"):
        list_train_classes(str(train_root))


def test_list_images_refuses_links_to_missing_files_unless_asked_to_keep_them(tmp_path):
    """Tools that have no --skip_bad_images (setup_train_dataset.py, the converters)
    get the error from the listing itself."""
    folder = tmp_path / "good"
    _save(folder / "000.png", np.zeros((4, 4), np.uint8))
    t1, t2 = _dangle(folder / "001.png"), _dangle(folder / "002.JPG")
    with pytest.raises(BadFileError) as err:
        datasets.list_images(str(folder))
    assert str(err.value) == (
        f"2 image link(s) in {folder} lead nowhere:\n"
        f"  {folder}/001.png is a link to {t1}, which does not exist\n"
        f"  {folder}/002.JPG is a link to {t2}, which does not exist\n"
        f"Fix: {datasets.FIX_DANGLING}")
    assert datasets.list_images(str(folder), keep_dangling=True) == [
        str(folder / n) for n in ("000.png", "001.png", "002.JPG")]


def test_links_to_files_and_folders_that_exist_are_read_as_the_data_they_lead_to(tmp_path):
    """Only a link to nothing is refused: an image or a class folder linked in from
    elsewhere (another disk, a shared set) is listed and checked as the file itself."""
    shared = _save(tmp_path / "shared" / "a.png", np.full((4, 4), 9, np.uint8))
    folder = tmp_path / "data" / "bottle" / "good"
    _save(folder / "000.png", np.zeros((4, 4), np.uint8))
    os.symlink(shared, folder / "001.png")
    os.symlink(shared.parent, tmp_path / "data" / "cable")
    assert datasets.dangling_link(str(folder / "001.png")) is None
    assert datasets.list_images(str(folder)) == [str(folder / "000.png"),
                                                 str(folder / "001.png")]
    assert datasets.image_problem(str(folder / "001.png")) is None
    assert datasets.data_subdirs(str(tmp_path / "data")) == ["bottle", "cable"]


def test_images_of_one_stem_are_refused_in_training_and_test_sets(train_root, mvtec_root):
    """000.png and 000.jpg would share 000_mask.png, the result name 'broken_000' and
    fg_mask/<class>/000.png: refused, naming both, before any work."""
    broken = mvtec_root / "bottle" / "test" / "broken"
    _save(broken / "000.jpg", np.zeros((64, 64, 3), np.uint8))
    _save(broken / "001.JPEG", np.zeros((64, 64, 3), np.uint8))
    expected = (f"{broken} holds 2 group(s) of images with one name and different "
                "extensions, which would share one mask and one result name:\n"
                "  000.jpg, 000.png\n  001.JPEG, 001.png\n"
                "Fix: rename all but one file of each group (and a test image's "
                "ground-truth mask with it)")
    for make in (lambda: MVTecTestDataset(str(mvtec_root), "bottle", token_size=32),
                 lambda: MVTecTestDataset(str(mvtec_root), "bottle", token_size=32,
                                          skip_bad_images=True),
                 lambda: datasets.check_test_classes(str(mvtec_root), ["bottle"])):
        with pytest.raises(BadFileError) as err:
            make()
        assert str(err.value) == expected
    bottle = train_root / "train" / "bottle"
    _save(bottle / "002.bmp", np.zeros((64, 96, 3), np.uint8))
    with pytest.raises(BadFileError, match=r"bottle holds 1 group(.|\n)*  002.bmp, 002.png\n"):
        _pretrain(train_root, skip_bad_images=True)
    with pytest.raises(BadFileError, match=r"002.bmp, 002.png"):
        datasets.check_train_classes(str(train_root), ["bottle"])


def test_test_images_of_one_result_name_are_refused(mvtec_root):
    """broken/x_000.png and broken_x/000.png are both 'broken_x_000': one heatmap would
    overwrite the other and image_scores.csv would hold two rows of one name."""
    test = mvtec_root / "bottle" / "test"
    _save(test / "broken" / "x_000.png", np.zeros((64, 64, 3), np.uint8))
    _save(test / "broken_x" / "000.png", np.zeros((64, 64, 3), np.uint8))
    expected = (f"{test} holds 1 group(s) of test images with one result name ('<defect "
                "folder>_<file stem>'), whose heatmaps and image_scores.csv rows would "
                "collide:\n  broken_x_000: broken/x_000.png, broken_x/000.png\nFix: rename "
                "one file (and its ground-truth mask) of each group")
    for make in (lambda: MVTecTestDataset(str(mvtec_root), "bottle", token_size=32),
                 lambda: datasets.check_test_classes(str(mvtec_root), ["bottle"])):
        with pytest.raises(BadFileError) as err:
            make()
        assert str(err.value) == expected
    (test / "broken_x" / "000.png").rename(test / "broken_x" / "001.png")
    gt = mvtec_root / "bottle" / "ground_truth"
    _save(gt / "broken" / "x_000_mask.png", np.zeros((64, 64), np.uint8))
    _save(gt / "broken_x" / "001_mask.png", np.zeros((64, 64), np.uint8))
    names = {item["name"] for item in MVTecTestDataset(str(mvtec_root), "bottle",
                                                      token_size=32)}
    assert names == {"broken_000", "broken_001", "broken_x_000", "broken_x_001", "good_000",
                     "good_001"}


def test_files_of_other_types_are_named_in_a_note_once_per_folder(mvtec_root, capsys):
    """An unmasked .webp defect image is not taken, and not unseen: one note on stderr
    per folder, with the count and some names; hidden files are no images, noted or not."""
    broken = mvtec_root / "bottle" / "test" / "broken"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(broken / "002.webp")
    for name in ("notes.txt", "003.heic", "004.avif", ".DS_Store", "._000.png", "Thumbs.db",
                 "desktop.ini"):  # the last four are a system's: not noted
        (broken / name).write_bytes(b"x")
    (broken / "sub").mkdir()  # a folder is no file left out
    datasets.check_test_classes(str(mvtec_root), ["bottle"])
    ds = MVTecTestDataset(str(mvtec_root), "bottle", token_size=32, img_size=64)
    assert [os.path.basename(p) for p in ds.image_paths] == ["000.png", "001.png"] * 2
    captured = capsys.readouterr()
    assert captured.err == (
        f"[data] note: {broken}: left out 4 file(s) not of an image type "
        ".png/.jpg/.jpeg/.bmp/.tif/.tiff (002.webp, 003.heic, 004.avif, ... 1 more); convert any "
        "image among them to PNG to use it\n")
    assert captured.out == ""


def test_images_at_other_folder_depths_are_named_in_a_note(mvtec_root, train_root, capsys):
    """A test image beside the defect folders (<class>/test/002.png), one in a sub-folder
    of a defect folder (test/good/day2/) or of a training class (train/<class>/sub/) was
    left out with no word: each folder now says so once; junk folders stay silent."""
    test = mvtec_root / "bottle" / "test"
    for rel in ("002.png", "good/day2/001.png", "good/.ipynb_checkpoints/000.png",
                "good/__MACOSX/000.png", "broken/lot1/__MACOSX/000.png"):
        _save(test / rel, np.zeros((64, 64, 3), np.uint8))
    datasets.check_test_classes(str(mvtec_root), ["bottle"])
    ds = MVTecTestDataset(str(mvtec_root), "bottle", token_size=32, img_size=64)
    assert len(ds) == 4
    assert capsys.readouterr().err == (
        f"[data] note: {test / 'good'}: left out 1 image(s) in sub-folders (day2/001.png): "
        "only the images directly in it are read; move them into it to use them\n"
        f"[data] note: {test}: left out 1 image(s) beside its defect folders (002.png): a "
        "test image lies in test/<defect>/ ('good' for normal ones); move each into one to "
        "score it\n")
    carpet = train_root / "train" / "carpet"
    for k in range(4):
        _save(carpet / "sub" / f"{k:03d}.png", np.zeros((128, 128), np.uint8))
    for _ in range(2):
        assert len(TrainImageDataset(str(train_root), ["carpet"])) == 3
    assert capsys.readouterr().err == (
        f"[data] note: {carpet}: left out 4 image(s) in sub-folders (sub/000.png, "
        "sub/001.png, sub/002.png, ... 1 more): only the images directly in it are read; "
        "move them "
        "into it to use them\n")


def test_images_of_a_class_outside_its_splits_are_named_in_a_note(mvtec_root, capsys):
    """<class>/extra.png and <class>/validation/good/*.png (MVTec LOCO's validation
    split) were left out by run_test.py with no word: a note names them once per class;
    a mask folder (gt/, its own note), junk folders and ground_truth/ stay silent."""
    bottle = mvtec_root / "bottle"
    for rel in ("extra.png", "validation/good/000.png", "validation/good/001.png",
                "gt/broken/000_mask.png", ".ipynb_checkpoints/000.png",
                "__MACOSX/validation/000.png"):
        _save(bottle / rel, np.zeros((64, 64, 3), np.uint8))
    capsys.readouterr()
    datasets.check_test_classes(str(mvtec_root), ["bottle"])
    ds = MVTecTestDataset(str(mvtec_root), "bottle", token_size=32, img_size=64)
    assert len(ds) == 4
    assert capsys.readouterr().err == (
        f"[data] note: {bottle}: left out 3 image(s) outside its train/, test/ and "
        "ground_truth/ (extra.png, validation/good/000.png, validation/good/001.png), which "
        "no tool reads: a test image lies in test/<defect>/ ('good' for normal ones), its "
        "mask in ground_truth/<defect>/\n")
    MVTecTestDataset(str(mvtec_root), "01", token_size=32, img_size=64)
    assert "outside its" not in capsys.readouterr().err  # test/ and ground_truth/ only


def test_macos_companions_beside_or_below_the_folders_are_no_images_left_out(mvtec_root,
                                                                             capsys):
    """A macOS '._002.png' companion beside the defect folders or in a sub-folder of one
    is a system's file, and a README.txt there no image: no note names them."""
    test = mvtec_root / "bottle" / "test"
    (test / "._002.png").write_bytes(b"x")
    (test / "README.txt").write_text("bottles, lot 3")
    (test / "good" / "day2").mkdir()
    (test / "good" / "day2" / "._001.png").write_bytes(b"x")
    assert not datasets.is_image_name("._002.png") and datasets.is_image_name("002.PNG")
    assert datasets.loose_images(str(test)) == []
    ds = MVTecTestDataset(str(mvtec_root), "bottle", token_size=32, img_size=64)
    assert [os.path.basename(p) for p in ds.image_paths] == ["000.png", "001.png"] * 2
    assert capsys.readouterr().err == ""


def test_a_folder_with_two_kinds_of_left_out_files_gets_both_notes_once(tmp_path, capsys):
    """One folder, two notes (a file of another type, an image in a sub-folder): each is
    said once however often the folder is listed, and neither silences the other."""
    folder = tmp_path / "good"
    _save(folder / "000.png", np.zeros((4, 4), np.uint8))
    (folder / "notes.txt").write_text("lot 3")
    _save(folder / "day2" / "001.png", np.zeros((4, 4), np.uint8))
    for _ in range(2):
        assert datasets.list_images(str(folder)) == [str(folder / "000.png")]
    assert capsys.readouterr().err == (
        f"[data] note: {folder}: left out 1 file(s) not of an image type "
        ".png/.jpg/.jpeg/.bmp/.tif/.tiff (notes.txt); convert any image among them to PNG "
        "to use it\n"
        f"[data] note: {folder}: left out 1 image(s) in sub-folders (day2/001.png): only the "
        "images directly in it are read; move them into it to use them\n")


def test_non_square_images_are_named_in_a_note_once_per_class_folder(mvtec_root,
                                                                     train_root, capsys):
    """Resize + centre crop (as the paper's) scores the middle of a non-square image: a
    defect at its ends is never seen. Said once per class folder, from the headers;
    square images (carpet's) are not named, and their pixels do not change."""
    for _ in range(2):
        ds = _pretrain(train_root)
    crop = ("the centre crop (as the paper's) scores the middle {} % of each (drops up to "
            "{} % of the area). A benchmark (VisA, BTAD) is scored so as published; to score "
            "all of your own images, crop or pad them to square beforehand")
    assert capsys.readouterr().err == (
        f"[data] note: {train_root / 'train' / 'bottle'}: 3 of 3 images are not square; "
        + crop.format(67, 33) + "\n")
    carpet = ds[3]["image"] * STD + MEAN
    torch.testing.assert_close(carpet, torch.full_like(carpet, CARPET_GREYS[0] / 255))
    _save(mvtec_root / "bottle" / "test" / "broken" / "002.png", np.zeros((64, 128, 3),
                                                                          np.uint8))
    _save(mvtec_root / "bottle" / "test" / "good" / "002.png", np.zeros((64, 80, 3), np.uint8))
    # out of the set (in the class folder, its masks would be named as left out)
    (mvtec_root / "bottle" / "ground_truth").rename(mvtec_root.parent / "gt_elsewhere")
    MVTecTestDataset(str(mvtec_root), "bottle", token_size=32, img_size=64)
    assert capsys.readouterr().err == (
        f"[data] note: {mvtec_root / 'bottle' / 'test'}: 2 of 6 images are not square; "
        + crop.format("50-80", 50) + "\n")


def test_the_centre_crop_note_counts_images_that_drop_1_percent_or_more(tmp_path, capsys):
    """99 % of the long side kept is square enough; 98 % is named, with its share."""
    folder = tmp_path / "cls"
    images = [str(_save(folder / f"{k}.png", np.zeros((h, 100), np.uint8)))
              for k, h in enumerate((100, 99, 98))]
    datasets.note_resize(str(folder), images)
    assert capsys.readouterr().err == (
        f"[data] note: {folder}: 1 of 3 images are not square; the centre crop (as the "
        "paper's) scores the middle 98 % of each (drops up to 2 % of the area). A benchmark "
        "(VisA, BTAD) is scored so as published; to score all of your own images, crop or "
        "pad them to square beforehand\n")


def test_images_enlarged_more_than_2x_to_the_models_input_are_named(tmp_path, capsys):
    """A thumbnail is scored after a blurring enlargement (a 16 px image got a confident
    score with no word): said once per folder, with the smallest side. Half the input
    exactly, or no input size known (the training listing), says nothing."""
    folder = tmp_path / "cls"
    images = [str(_save(folder / f"{k}.png", np.zeros((side, side), np.uint8)))
              for k, side in enumerate((16, 111, 112, 300))]
    datasets.note_resize(str(folder), images)
    assert capsys.readouterr().err == ""
    datasets.note_resize(str(folder), images, 224)
    assert capsys.readouterr().err == (
        f"[data] note: {folder}: 2 of 4 images are under 112 px on their short side (down to "
        "16 px): each is enlarged more than 2x to the model's 224 px, so a defect a few "
        "pixels wide blurs; score images at the resolution they were taken\n")
    datasets.ImageListDataset(images[2:], ["a", "b"], token_size=112, img_size=224)
    assert capsys.readouterr().err == ""
    datasets.ImageListDataset(images[1:], ["a", "b", "c"], token_size=112, img_size=224)
    assert "1 of 3 images are under 112 px on their short side (down to 111 px)" in \
        capsys.readouterr().err


# ----------------------------------------------------------------------------------------
# Masks drawn in the alpha channel
# ----------------------------------------------------------------------------------------
def _layer(colour: tuple[int, ...], alpha: np.ndarray) -> np.ndarray:
    """(H, W, len(colour) + 1): one colour everywhere, `alpha` (H, W) as its opacity."""
    out = np.empty((*alpha.shape, len(colour) + 1), np.uint8)
    out[..., :-1] = colour
    out[..., -1] = alpha
    return out


@pytest.mark.parametrize("mode, colour", [("RGBA", (0, 0, 0)), ("RGBA", (255, 255, 255)),
                                          ("RGBA", (255, 0, 0)), ("LA", (0,)),
                                          ("LA", (255,))])
def test_a_mask_painted_on_a_transparent_layer_reads_by_its_alpha(tmp_path, mode, colour):
    """Black paint on a transparent layer is no longer 0 defect pixels, nor white paint
    the whole image: where one colour covers the image, the alpha draws the mask, with
    the masks' threshold (an anti-aliased edge: above half)."""
    alpha = np.zeros((8, 8), np.uint8)
    alpha[2:5, 3:6] = 255
    alpha[5, 3:6] = (200, 100, 60)  # a soft edge: 200 is in, 100 and 60 are out
    path = tmp_path / f"mask_{mode}.png"
    Image.fromarray(_layer(colour, alpha), mode=mode).save(path)
    got = np.asarray(datasets.open_mask(str(path))) > 0
    np.testing.assert_array_equal(got, alpha > 127)
    assert got.sum() == 10


def test_a_palette_mask_with_a_transparent_index_reads_by_its_alpha(tmp_path):
    ids = np.zeros((8, 8), np.uint8)
    ids[:3] = 1
    img = Image.fromarray(ids, mode="P")
    img.putpalette([0, 0, 0, 0, 0, 0] + [0] * 762)  # both indices black
    img.save(tmp_path / "p.png", transparency=0)  # index 0 transparent
    got = np.asarray(datasets.open_mask(str(tmp_path / "p.png"))) > 0
    np.testing.assert_array_equal(got, ids > 0)


def test_a_grey_mask_with_a_transparent_colour_key_reads_by_its_alpha(tmp_path):
    """A grey PNG whose white is its transparent colour (tRNS) with black paint: the
    paint is the defect, not the white it is drawn on."""
    grey = np.full((8, 8), 255, np.uint8)
    grey[2:4, 2:6] = 0
    Image.fromarray(grey).save(tmp_path / "key.png", transparency=255)
    with Image.open(tmp_path / "key.png") as img:
        assert img.mode == "L" and img.info["transparency"] == 255
    got = np.asarray(datasets.open_mask(str(tmp_path / "key.png"))) > 0
    np.testing.assert_array_equal(got, grey == 0)
    assert got.sum() == 8


def test_opaque_or_coloured_rgba_masks_still_read_by_their_colours(tmp_path):
    """Alpha counts only where colour is one over the image and alpha varies: an opaque
    RGBA mask (alpha 255 everywhere), a white-on-black one whose transparent background
    is stored black, and an opaque mask of one colour (an empty or a full one saved as
    RGBA / LA), read by their colours as before."""
    ids = np.zeros((8, 8), np.uint8)
    ids[:2], ids[2:4] = 1, 2
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[ids == 1, :3] = (200, 0, 0)
    rgba[ids == 2, :3] = (250, 250, 0)
    rgba[..., 3] = 255
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "opaque.png")
    np.testing.assert_array_equal(datasets.mask_values(Image.open(tmp_path / "opaque.png")),
                                  rgba[..., :3].max(-1))
    rgba[..., 3] = np.where(ids > 0, 255, 0)  # the background transparent and black
    rgba[ids == 1, 3] = 30  # a faint alpha: still a defect by its colour
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "faint.png")
    got = np.asarray(datasets.open_mask(str(tmp_path / "faint.png"))) > 0
    np.testing.assert_array_equal(got, ids > 0)
    for mode, channels in (("RGBA", 4), ("LA", 2)):  # one colour, alpha 255 everywhere
        for value, defect in ((0, False), (255, True)):  # an empty mask, a full one
            flat = np.full((8, 8, channels), value, np.uint8)
            flat[..., -1] = 255
            Image.fromarray(flat, mode=mode).save(tmp_path / "flat.png")
            assert (np.asarray(datasets.open_mask(str(tmp_path / "flat.png"))) > 0
                    ).tolist() == np.full((8, 8), defect).tolist(), (mode, value)


def test_a_transparent_background_stored_white_is_background_whatever_its_colour(tmp_path):
    """An RGBA mask whose transparent background is stored white, with red (or black)
    opaque paint, read as all defect (red) or as the background alone (black): its
    colours vary, so alpha was ignored. Fully transparent pixels are background now."""
    for paint in ((255, 0, 0), (0, 0, 0)):
        rgba = np.full((40, 40, 4), 255, np.uint8)
        rgba[..., 3] = 0
        rgba[10:20, 10:20] = (*paint, 255)
        Image.fromarray(rgba, "RGBA").save(tmp_path / "white_bg.png")
        got = np.asarray(datasets.open_mask(str(tmp_path / "white_bg.png"))) > 0
        assert got[10:20, 10:20].all() and got.sum() == 100, paint
    rgba = np.zeros((64, 64, 4), np.uint8)  # opaque black with a white defect ...
    rgba[..., 3] = 255
    rgba[20:30, 20:30, :3] = 255
    rgba[:8, :, 3] = 0  # ... and a transparent margin: the colours draw the mask
    Image.fromarray(rgba, "RGBA").save(tmp_path / "margin.png")
    got = np.asarray(datasets.open_mask(str(tmp_path / "margin.png"))) > 0
    assert got[20:30, 20:30].all() and got.sum() == 100
