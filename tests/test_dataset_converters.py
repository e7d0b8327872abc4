"""setup_train_dataset.py --visa / --custom / --textures (dataset_converters.py): a
VisA-shaped tree converts, trains one tiny epoch and evaluates; a custom set without
masks evaluates with pixel metrics undefined; its held-out fraction is honoured, a
re-run leaves exactly the new split, and misspelt classes, too-small classes and an
output overlapping the source are refused; --textures changes the foreground masks."""
from __future__ import annotations

import csv
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import dataset_converters
import datasets
import metrics
import reporting
import run_protoflow
import run_pretraining
import run_test
from backbones import lite0_weights_path
from setup_train_dataset import main as setup_main

VISA_NAMES = {"brick": "candle", "coins": "pcb1"}  # tiny-world class -> VisA class


def _visa_tree(world, base: Path) -> Path:
    """The tiny world's images in VisA's layout: JPEG images under
    <class>/Data/Images/{Normal,Anomaly}, masks holding region ids (1, 2) under
    <class>/Data/Masks/Anomaly, and split_csv/1cls.csv naming them."""
    visa = base / "VisA"
    rows = []
    for src_name, name in VISA_NAMES.items():
        src = world.mvtec_root / src_name
        images = visa / name / "Data" / "Images"
        (images / "Normal").mkdir(parents=True)
        (images / "Anomaly").mkdir(parents=True)
        (visa / name / "Data" / "Masks" / "Anomaly").mkdir(parents=True)
        k = 0
        for split, folder in (("train", "train/good"), ("test", "test/good")):
            for f in sorted((src / folder).glob("*.png")):
                rel = f"{name}/Data/Images/Normal/{k:04d}.JPG"
                Image.open(f).convert("RGB").save(visa / rel, format="JPEG", quality=95)
                rows.append([name, split, "normal", rel, ""])
                k += 1
        for j, f in enumerate(sorted(p for p in (src / "test").glob("*/*.png")
                                     if p.parent.name != "good")):
            rel = f"{name}/Data/Images/Anomaly/{j:03d}.JPG"
            Image.open(f).convert("RGB").save(visa / rel, format="JPEG", quality=95)
            gt = np.asarray(Image.open(src / "ground_truth" / f.parent.name
                                       / f"{f.stem}_mask.png")) > 0
            ids = (gt * (1 + j % 2)).astype(np.uint8)  # region id 1 or 2, not 255
            mask_rel = f"{name}/Data/Masks/Anomaly/{j:03d}.png"
            Image.fromarray(ids).save(visa / mask_rel)
            rows.append([name, "test", "anomaly", rel, mask_rel])
    (visa / "split_csv").mkdir()
    with open(visa / "split_csv" / "1cls.csv", "w", newline="") as f:
        csv.writer(f).writerows([dataset_converters.VISA_COLUMNS, *rows])
    return visa


def _eval_argv(world, ckpt: str, protoflow: str, protos: str, data: str, out: Path,
               classes: list[str]) -> list[str]:
    return ["--ckpt", ckpt, "--tokenizer_model", "kmeans",
            "--tokenizer_weight_path", str(world.tokenizer), "--protoflow_weights", protoflow,
            "--prototypes_dir", protos, "--data_path", data, "--classes", *classes,
            "--output_dir", str(out), "--batch_size", "8", "--num_workers", "0",
            "--device", "cpu", "--amp", "none"]


def test_visa_converts_trains_one_epoch_and_evaluates(tiny_world, tmp_path):
    visa = _visa_tree(tiny_world, tmp_path)
    mvtec, root = tmp_path / "visa_mvtec", tmp_path / "visa_imagenet"
    convert = ["--visa", str(visa), "--data_path", str(mvtec), "--root", str(root),
               "--classes", "candle", "pcb1"]
    assert setup_main([*convert, "--make_fg_masks", "--textures", "pcb2"]) == 2
    assert not mvtec.exists() and not root.exists()  # a class not converted: refused first
    assert setup_main(convert) == 0
    for name in VISA_NAMES.values():
        assert len(list((mvtec / name / "train" / "good").glob("*.JPG"))) == 6
        assert len(list((mvtec / name / "test" / "good").glob("*.JPG"))) == 4
        bad = sorted((mvtec / name / "test" / "bad").glob("*.JPG"))
        assert len(bad) == 4
        assert (mvtec / name / "test" / "bad" / "001.JPG").read_bytes() == (
            visa / name / "Data" / "Images" / "Anomaly" / "001.JPG").read_bytes()  # as is
        for j in range(4):  # region ids 1 and 2 both become 255
            source = np.asarray(Image.open(visa / name / "Data" / "Masks" / "Anomaly"
                                           / f"{j:03d}.png"))
            mask = np.asarray(Image.open(mvtec / name / "ground_truth" / "bad"
                                         / f"{j:03d}_mask.png"))
            assert set(np.unique(mask)) == {0, 255}
            np.testing.assert_array_equal(mask == 255, source != 0)
        assert len(list((root / "train" / name).glob("*.JPG"))) == 6

    # one tiny epoch of each model on the converted data, then the clean protocol
    common = ["--data_path", str(root), "--encoder", "efficientnet_lite0",
              "--encoder_weights", lite0_weights_path(), "--num_workers", "0",
              "--device", "cpu", "--batch_size", "8"]
    protos, flow = str(tmp_path / "prototypes"), str(tmp_path / "protoflow.pt")
    run_protoflow.main(["prototypes", *common, "--output_dir", protos, "--coreset_ratio",
                        "0.05"])
    run_protoflow.main(["train", *common, "--prototypes_dir", protos, "--epochs", "1",
                        "--warmup_epochs", "0", "--n_blocks", "1", "--output", flow])
    out = tmp_path / "vit"
    run_pretraining.main(run_pretraining.get_args_parser().parse_args([
        "--model", tiny_world.model, "--tokenizer_model", "kmeans",
        "--tokenizer_weight_path", str(tiny_world.tokenizer), "--data_path", str(root),
        "--no-fg_mask", "--output_dir", str(out), "--epochs", "1", "--warmup_epochs", "0",
        "--batch_size", "4", "--max_steps_per_epoch", "1", "--num_workers", "0",
        "--no_init", "--amp", "none", "--device", "cpu"]))
    results = run_test.main(run_test.get_args_parser().parse_args(_eval_argv(
        tiny_world, str(out / "checkpoint-last.pth"), flow, protos, str(mvtec),
        tmp_path / "eval", ["candle", "pcb1"])))
    assert reporting.exit_status(results) == 0
    for name in ("candle", "pcb1"):
        record = results["classes"][name]
        assert record["num_images"] == 8 and record["num_anomalous"] == 4
        assert record["ground_truth"] is True
        assert 0.0 <= record["pixel_f1_max"] <= 1.0 and 0.0 <= record["image_auroc"] <= 1.0


def test_visa_masks_read_by_the_project_mask_rule(tmp_path):
    """VisA masks go through datasets.open_mask: an ordinary one (0/255, or a label map of
    region ids, grey or on a colour palette) becomes every non-zero pixel as before; a
    grey palette is read by its colours, not its indices (index 0 white: the defect), a
    damaged file is a BadFileError naming it, and the EXIF orientation is applied."""
    ids = np.zeros((4, 6), np.uint8)  # (H, W)
    ids[1, 1], ids[2, 3:5], ids[3, 5] = 1, 2, 3

    def converted(img: Image.Image, **save) -> np.ndarray:
        src, dst = tmp_path / "src.png", tmp_path / "out" / "bad" / "000_mask.png"
        img.save(src, **save)
        dataset_converters._write_binary_mask(str(src), str(dst))
        return np.asarray(Image.open(dst))

    binary = (ids != 0).astype(np.uint8) * 255
    np.testing.assert_array_equal(converted(Image.fromarray(ids)), binary)  # label map
    np.testing.assert_array_equal(converted(Image.fromarray(binary)), binary)  # 0/255
    many = np.arange(24, dtype=np.uint8).reshape(4, 6)  # 23 regions: every id a defect
    np.testing.assert_array_equal(converted(Image.fromarray(many)), (many != 0) * 255)
    coloured = Image.fromarray(ids, mode="P")
    coloured.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255])  # VOC-style colours
    np.testing.assert_array_equal(converted(coloured), binary)
    inverted = Image.fromarray((ids == 0).astype(np.uint8), mode="P")  # defect: index 0
    inverted.putpalette([255, 255, 255, 0, 0, 0])  # index 0 white, index 1 black
    np.testing.assert_array_equal(converted(inverted), binary)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: shown turned 90 degrees clockwise
    np.testing.assert_array_equal(converted(Image.fromarray(ids), exif=exif),
                                  np.rot90(binary, -1))
    (tmp_path / "src.png").write_bytes(b"not a png")
    with pytest.raises(datasets.BadFileError, match=(
            rf"^cannot read VisA mask {tmp_path / 'src.png'}: .*; replace the file from "
            "the VisA download$")):
        dataset_converters._write_binary_mask(str(tmp_path / "src.png"), str(tmp_path / "x"))


def test_visa_split_is_checked_before_writing(tmp_path):
    with pytest.raises(dataset_converters.LayoutError, match="1cls.csv does not exist"):
        dataset_converters.read_visa_split(str(tmp_path))
    (tmp_path / "split_csv").mkdir()
    split = tmp_path / "split_csv" / "1cls.csv"
    split.write_text("object,split,label,image\n")
    with pytest.raises(dataset_converters.LayoutError, match="has columns"):
        dataset_converters.read_visa_split(str(tmp_path))
    text = _split_error(tmp_path, "candle,train,normal,candle/a.JPG,",
                        "candle,test,anomaly,candle/b.JPG,",
                        "candle,train,anomaly,candle/c.JPG,candle/c.png")
    assert f"{tmp_path / 'candle' / 'a.JPG'} (line 2) missing" in text
    assert "line 3: anomalous image candle/b.JPG names no mask" in text
    assert "line 4: an anomalous training image" in text
    with pytest.raises(dataset_converters.LayoutError, match=r"classes \['capsules'"):
        dataset_converters.read_visa_split(str(tmp_path))
    # a short row, a long one, one without an image: named, no traceback, nothing copied;
    # a row of a class not converted is not read
    assert ("line 2: 3 fields, expected 5 (object, split, label, image, mask)\n  "
            "line 3: 6 fields, expected 5 (object, split, label, image, mask)\n  "
            "line 4: names no image\n  class 'candle' has no row\nexpected ") in _split_error(
                tmp_path, "candle,train,normal", "candle,train,normal,candle/a.JPG,,x",
                "candle,train,normal,,", "pcb1,train")


def test_visa_folder_missing_its_split_names_the_nearest_visa_folder(tmp_path):
    """--visa given the split file, split_csv/, a class folder or the folder above VisA
    named only the missing path; the VisA folder meant is named, as --data_path's is (a
    link to nothing beside it raises no other error)."""
    visa = tmp_path / "downloads" / "VisA"
    (visa / "split_csv").mkdir(parents=True)
    (visa / "split_csv" / "1cls.csv").write_text("object,split,label,image,mask\n")
    (visa / "candle").mkdir()
    (tmp_path / "downloads" / "other").mkdir()
    (tmp_path / "downloads" / "gone").symlink_to(tmp_path / "nowhere")  # no other error
    for given in (visa / "split_csv" / "1cls.csv", visa / "split_csv", visa / "candle",
                  tmp_path / "downloads"):
        with pytest.raises(dataset_converters.LayoutError) as err:
            dataset_converters.read_visa_split(str(given))
        assert str(err.value).startswith(f"{given / 'split_csv' / '1cls.csv'} does not exist")
        assert str(err.value).endswith(f".JPG; did you mean --visa {visa}?")
    with pytest.raises(dataset_converters.LayoutError) as err:  # nothing evident: no hint
        dataset_converters.read_visa_split(str(tmp_path / "downloads" / "other"))
    assert str(err.value).endswith(dataset_converters.VISA_LAYOUT)


def test_visa_split_saved_with_a_byte_order_mark_is_read(tmp_path):
    """Excel's "CSV UTF-8" starts the file with a BOM: it was refused as a column named
    '\ufeffobject'."""
    (tmp_path / "candle").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "candle" / "a.JPG", format="JPEG")
    (tmp_path / "split_csv").mkdir()
    (tmp_path / "split_csv" / "1cls.csv").write_bytes(
        "\ufeffobject,split,label,image,mask\r\ncandle,train,normal,candle/a.JPG,\r\n"
        .encode("utf-8"))
    assert dataset_converters.read_visa_split(str(tmp_path), ["candle"]) == {"candle": [
        {"object": "candle", "split": "train", "label": "normal", "image": "candle/a.JPG",
         "mask": ""}]}


def _split_error(visa: Path, *rows: str) -> str:
    """The LayoutError text of reading a split file of `rows` for class candle."""
    (visa / "split_csv" / "1cls.csv").write_text(
        "".join(f"{row}\n" for row in ("object,split,label,image,mask", *rows)))
    with pytest.raises(dataset_converters.LayoutError) as err:
        dataset_converters.read_visa_split(str(visa), ["candle"])
    return str(err.value)


def test_visa_masks_are_checked_before_writing(tmp_path):
    """An unreadable mask stopped the run after every image was copied, naming only the
    first; a mask of another shape than its image was converted with exit 0. Both are
    named, all at once, before anything is written."""
    (tmp_path / "candle").mkdir()
    Image.new("RGB", (96, 64)).save(tmp_path / "candle" / "a.JPG")
    Image.new("RGB", (96, 64)).save(tmp_path / "candle" / "b.JPG")
    Image.new("L", (50, 100)).save(tmp_path / "candle" / "a.png")
    (tmp_path / "candle" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    (tmp_path / "split_csv").mkdir()
    (tmp_path / "split_csv" / "1cls.csv").write_text(
        "object,split,label,image,mask\n"
        "candle,test,anomaly,candle/a.JPG,candle/a.png\n"
        "candle,test,anomaly,candle/b.JPG,candle/b.png\n")
    out = tmp_path / "out"
    with pytest.raises(dataset_converters.LayoutError) as err:
        dataset_converters.convert_visa(str(tmp_path), str(out), lambda *a: pytest.fail(),
                                        ["candle"])
    text = str(err.value)
    assert (f"{tmp_path}/candle/a.png is 50x100 but its image {tmp_path}/candle/a.JPG is "
            "96x64: they cannot be aligned (line 2)") in text
    assert f"{tmp_path}/candle/b.png (mask of {tmp_path}/candle/b.JPG) is unreadable" in text
    assert not out.exists()


def test_custom_set_has_image_metrics_only(tiny_world, tmp_path):
    """good/ and defect/ folders without masks: every 5th normal image is held out, the
    defect images are a test defect type, and run_test reports pixel metrics as nan."""
    src = tmp_path / "mine" / "coins"
    good = sorted((tiny_world.mvtec_root / "coins").glob("t*/good/*.png"))
    for k, f in enumerate(good):
        (src / "good").mkdir(parents=True, exist_ok=True)
        shutil.copy(f, src / "good" / f"{k:03d}.png")
    for f in sorted((tiny_world.mvtec_root / "coins" / "test").glob("*/*.png")):
        if f.parent.name != "good":
            (src / "defect").mkdir(exist_ok=True)
            shutil.copy(f, src / "defect" / f"{f.parent.name}_{f.name}")
    mvtec = tmp_path / "mine_mvtec"
    assert setup_main(["--custom", str(tmp_path / "mine"), "--data_path", str(mvtec),
                       "--root", str(tmp_path / "mine_imagenet")]) == 0
    held = sorted(p.name for p in (mvtec / "coins" / "test" / "good").iterdir())
    assert held == [f"{k:03d}.png" for k in range(4, len(good), 5)]
    assert len(list((mvtec / "coins" / "train" / "good").iterdir())) == len(good) - len(held)
    assert len(list((mvtec / "coins" / "test" / "defect").iterdir())) == 4
    assert not (mvtec / "coins" / "ground_truth").exists()
    half = tmp_path / "half_mvtec"  # --custom_test_fraction 0.5: every 2nd normal image
    assert setup_main(["--custom", str(tmp_path / "mine"), "--data_path", str(half),
                       "--root", str(tmp_path / "half_imagenet"),
                       "--custom_test_fraction", "0.5"]) == 0
    assert sorted(p.name for p in (half / "coins" / "test" / "good").iterdir()) == \
        [f"{k:03d}.png" for k in range(1, len(good), 2)]

    with pytest.warns(metrics.UndefinedMetricWarning, match=(  # said in one line, not silent
            r"^mean pixel_auroc, pixel_aupro, pixel_ap, pixel_f1_max are nan because they "
            r"are undefined for \['coins'\]$")):
        results = run_test.main(run_test.get_args_parser().parse_args(
            ["--model", tiny_world.model] + _eval_argv(
                tiny_world, str(tiny_world.pmad_ckpt), str(tiny_world.protoflow),
                str(tiny_world.prototypes_dir), str(mvtec), tmp_path / "eval", ["coins"])))
    record = results["classes"]["coins"]
    assert record["ground_truth"] is False
    assert 0.0 <= record["image_auroc"] <= 1.0 and 0.0 <= record["image_f1_max"] <= 1.0
    assert all(math.isnan(record[k]) for k in ("pixel_auroc", "pixel_aupro", "pixel_f1_max"))
    assert math.isnan(record["per_defect"]["defect"]["pixel_auroc"])
    assert reporting.exit_status(results) == 0  # undefined pixel metrics are no failure
    with pytest.raises(dataset_converters.LayoutError, match="one folder of normal images"):
        dataset_converters.plan_custom(str(tmp_path / "mine_mvtec"), str(tmp_path / "x"))


def test_textures_change_the_foreground_masks(tiny_world, tmp_path, capsys):
    """coins is an object: its estimated masks leave background out; named a texture,
    every pixel is foreground."""
    masks = {}
    for run, extra in (("object", []), ("texture", ["--textures", "coins"])):
        root = tmp_path / run
        assert setup_main(["--data_path", str(tiny_world.mvtec_root), "--root", str(root),
                           "--classes", "coins", "--make_fg_masks", *extra]) == 0
        masks[run] = [np.asarray(Image.open(p)) > 0
                      for p in sorted((root / "fg_mask" / "coins").glob("*.png"))]
    assert len(masks["texture"]) == len(masks["object"]) == 6
    assert all(m.all() for m in masks["texture"])
    assert np.mean([m.mean() for m in masks["object"]]) < 0.9
    with pytest.raises(SystemExit):
        setup_main(["--data_path", str(tiny_world.mvtec_root), "--textures", "coins"])
    assert "add --make_fg_masks" in capsys.readouterr().err
    assert setup_main(["--data_path", str(tiny_world.mvtec_root), "--root",
                       str(tmp_path / "x"), "--classes", "coins", "--make_fg_masks",
                       "--textures", "tiles"]) == 2
    assert "--textures tiles: not among the classes" in capsys.readouterr().err


def _custom_set(base: Path, good: dict[str, int], seed: int = 0) -> Path:
    """<base>/<class>/good/000.png ... (16x16 noise, `good[class]` of them) and two
    <class>/scratch/ images per class."""
    rng = np.random.default_rng(seed)
    for name, n in good.items():
        for folder, count in (("good", n), ("scratch", 2)):
            (base / name / folder).mkdir(parents=True)
            for k in range(count):
                Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(
                    base / name / folder / f"{k:03d}.png")
    return base


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_held_out_honours_the_fraction():
    """round(n * fraction) evenly spread, at least 1 and at most n - 1; a fraction 1/s of
    a multiple of s is every s-th image, as before."""
    def held(n, f):
        return [k for k, test in enumerate(dataset_converters.held_out(n, f)) if test]
    assert held(10, 0.2) == [4, 9] and held(20, 0.2) == [4, 9, 14, 19]
    assert held(10, 0.5) == [1, 3, 5, 7, 9]
    assert held(10, 0.7) == [1, 2, 4, 5, 7, 8, 9]  # 7 of 10, not every 2nd
    assert held(12, 0.2) == [5, 11]  # round(2.4)
    assert held(3, 0.2) == [2]  # round(0.6): one, not none
    assert held(2, 0.1) == [1] and held(2, 0.9) == [1]  # one each side


def test_custom_rerun_leaves_exactly_the_new_split(tmp_path, capsys):
    """A second conversion with another fraction moves images instead of copying them
    into both train/ and test/, in the MVTec layout and in the training copy; what the
    conversion does not own (a ground_truth/ the user added) stays."""
    src = _custom_set(tmp_path / "mine", {"gadget": 10, "widget": 4})
    dst, root = tmp_path / "mvtec", tmp_path / "inet"
    argv = ["--custom", str(src), "--data_path", str(dst), "--root", str(root)]
    assert setup_main(argv) == 0
    assert _names(dst / "gadget" / "test" / "good") == ["004.png", "009.png"]
    assert _names(dst / "widget" / "test" / "good") == ["003.png"]  # 4 images: one held out
    assert setup_main(argv) == 0  # the same split again: nothing trained on is tested
    assert "warning" not in capsys.readouterr().err
    (dst / "notes.txt").write_text("mine")
    (dst / "other" / "train" / "good").mkdir(parents=True)
    (dst / "other" / "train" / "good" / "x.png").write_bytes(b"not converted here")
    (dst / "gadget" / "ground_truth" / "scratch").mkdir(parents=True)
    (dst / "gadget" / "ground_truth" / "scratch" / "000_mask.png").write_bytes(b"mine")
    capsys.readouterr()

    assert setup_main([*argv, "--custom_test_fraction", "0.5"]) == 0
    out, err = capsys.readouterr()
    warnings = [ln for ln in err.splitlines() if ln.startswith("warning")]
    assert warnings == [  # models of the earlier split have seen these test images
        f"warning: {name}: {n} image(s) the earlier split in {dst / name / 'train' / 'good'} "
        f"trained on now go to test/good ({names}): models trained on that split have seen "
        "them; train ProtoFlow (prototypes too) and the ViT again before evaluating"
        for name, n, names in (("gadget", 4, "001.png, 003.png, 005.png, ... 1 more"),
                               ("widget", 1, "001.png"))]
    gadget_test = [f"{k:03d}.png" for k in (1, 3, 5, 7, 9)]
    gadget_train = [f"{k:03d}.png" for k in (0, 2, 4, 6, 8)]
    assert _names(dst / "gadget" / "test" / "good") == gadget_test
    assert _names(dst / "gadget" / "train" / "good") == gadget_train
    assert _names(dst / "widget" / "test" / "good") == ["001.png", "003.png"]
    assert _names(dst / "widget" / "train" / "good") == ["000.png", "002.png"]
    assert _names(dst / "gadget") == [dataset_converters.CUSTOM_MARKER, "ground_truth", "test",
                                      "train"]  # the user's ground_truth/ stays
    assert (dst / "gadget" / "ground_truth" / "scratch" / "000_mask.png").read_bytes() == b"mine"
    marker = dataset_converters.CUSTOM_MARKER  # the training copy's folders are its own too
    assert _names(root / "train" / "gadget") == [marker, *gadget_train]
    assert _names(root / "train" / "widget") == [marker, "000.png", "002.png"]
    # gadget 1, 3, 5, 7 left train, 4 left test; widget 1 left train
    assert "6 file(s) this split does not list removed" in out
    assert "train: 5 file(s) the custom split does not train on removed" in out
    assert (dst / "notes.txt").read_text() == "mine"
    assert (dst / "other" / "train" / "good" / "x.png").exists()


def test_custom_class_without_defect_images_is_named_at_conversion(tmp_path, capsys):
    """Good images only is a valid class (it trains the model), but run_test.py cannot
    measure it: said when the set is converted, not first as a failed class."""
    src = _custom_set(tmp_path / "mine", {"gadget": 4, "stars": 4, "widget": 4})
    for name in ("stars", "widget"):
        for f in (src / name / "scratch").iterdir():
            f.unlink()
        (src / name / "scratch").rmdir()
    argv = ["--custom", str(src), "--data_path", str(tmp_path / "mvtec"),
            "--root", str(tmp_path / "inet")]
    assert setup_main(argv) == 0
    assert [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("note")] == [
        "note: stars, widget: no defective image, so run_test.py cannot measure these classes "
        "(their metrics are undefined: it lists them as failed); they train the model, and "
        "predict.py scores their images"]
    shutil.rmtree(tmp_path / "mvtec")
    shutil.rmtree(tmp_path / "inet")
    assert setup_main([*argv, "--classes", "gadget"]) == 0
    assert "no defective image" not in capsys.readouterr().err


def test_an_unreadable_custom_image_is_to_be_replaced_in_the_custom_folder(tmp_path, capsys):
    """The error said to replace it in --data_path, whose copy the next run rewrites from
    the --custom folder: the original is the one to replace, and the error names it."""
    src = _custom_set(tmp_path / "mine", {"gadget": 6})
    for k in (0, 1):  # training images cut short after the header; the first is named
        path = src / "gadget" / "good" / f"{k:03d}.png"
        path.write_bytes(path.read_bytes()[:100])
    argv = ["--custom", str(src), "--data_path", str(tmp_path / "mvtec"),
            "--root", str(tmp_path / "inet"), "--make_fg_masks"]
    assert setup_main(argv) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith(f"error: cannot read image {src / 'gadget' / 'good' / '000.png'} "
                          f"(copied to {tmp_path / 'inet' / 'train' / 'gadget' / '000.png'})")
    assert err.endswith(f"; replace that file in --custom {src} (the converted copy in "
                        "--data_path is rewritten from it) and re-run")


def test_a_class_name_typed_in_another_unicode_form_names_its_folder(tmp_path):
    """A folder macOS wrote as 'sčrew' decomposed (NFD) and --classes typed composed (NFC)
    look the same and differ as strings: the name is taken as the folder spells it, by
    --custom's conversion, run_protoflow.py and run_test.py alike (datasets.as_found)."""
    import unicodedata
    nfd, nfc = (unicodedata.normalize(form, "s\u010drew") for form in ("NFD", "NFC"))
    assert nfd != nfc
    src = _custom_set(tmp_path / "mine", {nfd: 4, "widget": 4})
    assert dataset_converters.custom_classes(str(src), [nfc]) == [nfd]
    assert datasets.as_found([nfc, "widget", "gadget"], [nfd, "widget"]) == [
        nfd, "widget", "gadget"]  # a name of no folder stays as typed, for its error
    assert datasets.as_found([nfc, nfd], [nfd]) == [nfd]  # both forms: the class once


def test_custom_classes_and_folders_checked_before_writing(tmp_path, capsys):
    src = _custom_set(tmp_path / "mine", {"gadget": 4, "widget": 4})
    dst = tmp_path / "mvtec"
    base = ["--custom", str(src), "--data_path", str(dst), "--root", str(tmp_path / "inet")]
    assert setup_main([*base, "--classes", "widgit"]) == 2
    err = capsys.readouterr().err
    assert (f"--classes widgit: no such class folder in {src}; its classes are gadget, widget"
            in err)
    assert not dst.exists()
    assert setup_main([*base, "--make_fg_masks", "--textures", "gadgte"]) == 2  # a typo
    assert ("--textures gadgte: not among the classes converted (gadget, widget)"
            in capsys.readouterr().err)
    assert not dst.exists() and not (tmp_path / "inet").exists()  # refused before writing
    assert setup_main([*base, "--classes", "widget"]) == 0
    assert _names(dst) == ["widget"]  # only the class asked for

    # 2 images: 1 to train on was converted, and run_protoflow.py then refused the class
    (src / "gadget" / "good" / "002.png").unlink()
    (src / "gadget" / "good" / "003.png").unlink()
    assert setup_main(base) == 2
    assert (f"{src / 'gadget' / 'good'}: 2 image(s); add normal images until it has at "
            "least 3 (2 to train on, as run_protoflow.py holds one out, and 1 held out to "
            "test/good by --custom_test_fraction 0.2), or remove the class folder"
            in capsys.readouterr().err)
    assert not (dst / "gadget").exists()
    with pytest.raises(dataset_converters.LayoutError, match=(  # 0.7: 3 of 4 held out
            r"widget/good: 4 image\(s\); add normal images until it has at least 6 \(2 to "
            r"train on, as run_protoflow.py holds one out, and 4 held out to test/good by "
            r"--custom_test_fraction 0.7\)")):
        dataset_converters.plan_custom(str(src), str(dst), 0.7, ["widget"])

    for fraction in ("0", "1"):  # nothing held out, or nothing to train on
        with pytest.raises(SystemExit) as exit_:
            setup_main([*base, "--custom_test_fraction", fraction])
        assert exit_.value.code == 2
        assert (f"argument --custom_test_fraction: {fraction} is outside (0, 1)"
                in capsys.readouterr().err)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    # the output in the source, or the source in the output: either way a clean-up or the
    # next run would reach the source images
    for inside in (src, src / "out", src.parent):
        assert setup_main(["--custom", str(src), "--data_path", str(inside)]) == 2
        assert (f"--data_path {inside} and --custom {src} overlap; write the MVTec layout "
                "to a folder outside") in capsys.readouterr().err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert _names(src) == ["gadget", "widget"]
    assert _names(src / "widget" / "good") == ["000.png", "001.png", "002.png", "003.png"]


def test_custom_never_touches_a_class_it_did_not_write(tmp_path, capsys):
    """--data_path holding a real MVTec bottle and a custom class 'bottle': every train/
    and test/ image of the real one was deleted. Now a class folder without --custom's
    marker is refused before anything is written; one with it is the tool's own."""
    src = _custom_set(tmp_path / "mine", {"bottle": 4})
    dst = tmp_path / "mvtec"
    real = dst / "bottle" / "test" / "broken_large" / "000.png"
    real.parent.mkdir(parents=True)
    real.write_bytes(b"MVTec's")
    argv = ["--custom", str(src), "--data_path", str(dst), "--root", str(tmp_path / "inet")]
    copy = tmp_path / "inet" / "train" / "bottle" / "000.png"  # MVTec's training copy
    copy.parent.mkdir(parents=True)
    copy.write_bytes(b"MVTec's copy")
    marker = dataset_converters.CUSTOM_MARKER
    assert setup_main(argv) == 2
    err = capsys.readouterr().err
    for folder in (dst / "bottle", copy.parent):
        assert (f"{folder} holds a class that --custom did not write (no {marker} in it), "
                "whose images the conversion would replace and remove: pass another "
                "--data_path or --root; if an earlier version's --custom wrote it, mark it "
                f"as its own with `touch {folder / marker}`") in err
    assert real.read_bytes() == b"MVTec's" and _names(dst / "bottle") == ["test"]
    assert copy.read_bytes() == b"MVTec's copy" and _names(copy.parent) == ["000.png"]
    real.unlink()  # an empty folder holds nothing to lose
    (copy.parent / marker).touch()  # as an earlier version's output is adopted
    assert setup_main(argv) == 0
    assert (dst / "bottle" / marker).is_file() and (copy.parent / marker).is_file()
    assert copy.read_bytes() != b"MVTec's copy"  # the custom set's 000.png
    assert setup_main(argv) == 0  # its own: converted again, the markers kept
    assert _names(dst / "bottle" / "test") == ["good", "scratch"]
    assert _names(copy.parent) == [marker, "000.png", "001.png", "002.png"]


def test_custom_refuses_images_in_sub_folders(tmp_path, capsys):
    """good/day2/*.png and scratch/lot1/*.png were left out with exit 0 (3 of 12 images
    converted, a defect type gone); now each such folder is named, nothing written."""
    src = _custom_set(tmp_path / "mine", {"widget": 3})
    for rel in ("good/day2/000.png", "scratch/lot1/000.png", "scratch/lot2/000.png"):
        (src / "widget" / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (16, 16)).save(src / "widget" / rel)
    dst = tmp_path / "mvtec"
    assert setup_main(["--custom", str(src), "--data_path", str(dst), "--root",
                       str(tmp_path / "inet")]) == 2
    err = capsys.readouterr().err
    assert (f"{src / 'widget' / 'good'}: holds sub-folder(s) day2, whose images would be "
            "left out: move them into it (or make each sub-folder of defective images a "
            "defect folder of the class)") in err
    assert f"{src / 'widget' / 'scratch'}: holds sub-folder(s) lot1, lot2, whose" in err
    assert not dst.exists()


def test_custom_refuses_mask_folders_and_images_beside_the_class_folders(tmp_path, capsys):
    """DIR/widget/masks/ was copied to test/masks/ and scored as a defect type, its masks
    as defective images, and DIR/widget/loose.png was left out, both with exit 0; the
    advice for a nested ground_truth/scratch/ led to the same. Now each is named, with
    how to evaluate with masks (the MVTec layout), and nothing is written."""
    src = _custom_set(tmp_path / "mine", {"widget": 3, "gadget": 3})
    for rel in ("widget/masks/s1_mask.png", "widget/GT/s1.png",
                "gadget/ground_truth/scratch/000_mask.png", "gadget/loose.png"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("L", (16, 16), 255).save(src / rel)
    dst = tmp_path / "mvtec"
    assert setup_main(["--custom", str(src), "--data_path", str(dst), "--root",
                       str(tmp_path / "inet")]) == 2
    err = capsys.readouterr().err
    for folder in ("widget/masks", "widget/GT", "gadget/ground_truth"):
        assert (f"{src / folder}: a folder of ground-truth masks? --custom takes none, and "
                "would score it as a defect type: to evaluate with masks, lay the set out in "
                f"the MVTec layout ({datasets.TEST_LAYOUT}; README, 'Custom data sets') and "
                "pass it as --data_path without --custom; else rename or remove the "
                "folder") in err
    assert "holds sub-folder(s)" not in err  # no advice to make scratch/ a defect folder
    assert (f"{src / 'gadget'}: holds image(s) beside its folders (loose.png), which would "
            "be left out: move each into good/ or a defect folder") in err
    assert not dst.exists()


def test_custom_class_of_images_without_a_good_folder_says_where_they_go(tmp_path):
    """A class folder of images and no good/ was refused as 'found []': the images lying
    in it are named, with the folders they belong in (as images beside a class's folders
    are). A class folder given as
    the set (--custom widget) is named as one, not told to hold good/good/."""
    widget = tmp_path / "mine" / "widget"
    widget.mkdir(parents=True)
    for k in range(5):
        Image.new("RGB", (16, 16)).save(widget / f"{k:03d}.png")
    with pytest.raises(dataset_converters.LayoutError) as err:
        dataset_converters.plan_custom(str(tmp_path / "mine"), str(tmp_path / "mvtec"))
    assert (f"{widget}: holds image(s) beside its folders (000.png, 001.png, 002.png, ... "
            "2 more), which would be left out: move each into good/ or a defect folder\n"
            ) in str(err.value)
    assert "needs one folder of normal images" not in str(err.value)
    assert not (tmp_path / "mvtec").exists()
    # one class's folder given as the set: its good/ is not a class to hold a good/ itself
    (widget / "good").mkdir()
    (widget / "crack").mkdir()
    with pytest.raises(dataset_converters.LayoutError) as err:
        dataset_converters.plan_custom(str(widget), str(tmp_path / "mvtec"))
    assert str(err.value).startswith(
        f"--custom {widget} holds good/: it is one class's folder; pass the folder of the "
        f"class folders, e.g. --custom {widget.parent} --classes widget; --custom expects ")
    assert "good/good" not in str(err.value)


def test_custom_class_with_two_normal_folders_is_not_told_it_has_none(tmp_path):
    """A class folder holding both good/ and ok/ (and an image beside them) needs one
    normal folder: it is told which it has, not only to move the image beside them into
    good/, which it already has."""
    widget = tmp_path / "mine" / "widget"
    for folder in ("good", "ok", "crack"):
        (widget / folder).mkdir(parents=True)
        Image.new("RGB", (16, 16)).save(widget / folder / "000.png")
    Image.new("RGB", (16, 16)).save(widget / "loose.png")
    with pytest.raises(dataset_converters.LayoutError) as err:
        dataset_converters.plan_custom(str(tmp_path / "mine"), str(tmp_path / "mvtec"))
    assert (f"{widget}: needs one folder of normal images named good or ok, found "
            "['crack', 'good', 'ok']") in str(err.value)
    assert "beside its folders" not in str(err.value)


def test_custom_defect_folders_only_named_like_masks_are_defect_types(tmp_path):
    """Only a folder named as a whole like ground-truth masks (masks, GT, ground_truth) is
    refused: defect types 'masking_tape' and 'gts_dent' are copied as any other."""
    src = _custom_set(tmp_path / "mine", {"gadget": 4})
    for defect in ("masking_tape", "gts_dent"):
        (src / "gadget" / defect).mkdir()
        Image.new("RGB", (16, 16), 255).save(src / "gadget" / defect / "000.png")
    assert not dataset_converters.MASK_FOLDER.fullmatch("masking_tape")
    out = tmp_path / "mvtec"
    plan = dataset_converters.plan_custom(str(src), str(out), test_fraction=0.5)
    assert sorted(Path(b).relative_to(out).as_posix() for _, b in plan["gadget"]) == [
        "gadget/test/good/001.png", "gadget/test/good/003.png", "gadget/test/gts_dent/000.png",
        "gadget/test/masking_tape/000.png", "gadget/test/scratch/000.png",
        "gadget/test/scratch/001.png", "gadget/train/good/000.png", "gadget/train/good/002.png"]


def test_custom_checks_root_and_mask_zip_before_converting(tmp_path, capsys):
    """A missing or broken --fg_mask_zip, or a --root that is a file, was found only
    after the whole set was written to --data_path; now before."""
    src = _custom_set(tmp_path / "mine", {"gadget": 2})
    dst, root = tmp_path / "mvtec", tmp_path / "inet"
    base = ["--custom", str(src), "--data_path", str(dst), "--root", str(root)]
    assert setup_main([*base, "--fg_mask_zip", str(tmp_path / "missing.zip")]) == 2
    assert f"--fg_mask_zip {tmp_path}/missing.zip does not exist" in capsys.readouterr().err
    (tmp_path / "broken.zip").write_bytes(b"not a zip")
    assert setup_main([*base, "--fg_mask_zip", str(tmp_path / "broken.zip")]) == 2
    assert (f"--fg_mask_zip {tmp_path}/broken.zip is not a readable zip file (File is not a "
            "zip file): download fg_mask.zip again") in capsys.readouterr().err
    root.write_text("a file")
    assert setup_main(base) == 2
    assert f"--root {root} is a file, not a folder" in capsys.readouterr().err
    assert not dst.exists()


def test_custom_set_skips_junk_folders(tmp_path):
    """A custom set unzipped on macOS has __MACOSX beside its classes, and a notebook
    leaves .ipynb_checkpoints in a class: neither is a class nor a defect type."""
    src = _custom_set(tmp_path / "mine", {"gadget": 4})
    for junk in ("__MACOSX/gadget/good/._000.png", ".git/x.png",
                 "gadget/.ipynb_checkpoints/000-checkpoint.png", "gadget/__MACOSX/._000.png"):
        (src / junk).parent.mkdir(parents=True, exist_ok=True)
        (src / junk).write_bytes(b"")
    out = tmp_path / "mvtec"
    plan = dataset_converters.plan_custom(str(src), str(out), test_fraction=0.5)
    assert {name: [(Path(a).relative_to(src).as_posix(), Path(b).relative_to(out).as_posix())
                   for a, b in pairs] for name, pairs in plan.items()} == {
        "gadget": [("gadget/good/000.png", "gadget/train/good/000.png"),
                   ("gadget/good/001.png", "gadget/test/good/001.png"),
                   ("gadget/good/002.png", "gadget/train/good/002.png"),
                   ("gadget/good/003.png", "gadget/test/good/003.png"),
                   ("gadget/scratch/000.png", "gadget/test/scratch/000.png"),
                   ("gadget/scratch/001.png", "gadget/test/scratch/001.png")]}
    assert datasets.is_junk_dir("__MACOSX") and datasets.is_junk_dir(".x")
    assert not datasets.is_junk_dir("good")


def test_custom_removes_the_classes_its_source_no_longer_has(tmp_path, capsys):
    """A class folder deleted from the --custom source stayed in --data_path and in
    --root's train/ (and its foreground masks), so training and evaluation still read it.
    A run of every class removes the folders it wrote from that source which the source
    no longer has (a system's junk in one, .DS_Store, does not keep it); a run of some
    --classes, and a class written from another source, leave theirs alone."""
    src = _custom_set(tmp_path / "mine", {"gadget": 3, "widget": 3})
    dst, root = tmp_path / "mvtec", tmp_path / "inet"
    argv = ["--custom", str(src), "--data_path", str(dst), "--root", str(root),
            "--make_fg_masks"]
    assert setup_main(argv) == 0
    assert _names(root / "fg_mask") == ["gadget", "widget"]
    other = _custom_set(tmp_path / "theirs", {"gizmo": 3})
    assert setup_main(["--custom", str(other), "--data_path", str(dst), "--root",
                       str(root)]) == 0
    shutil.rmtree(src / "widget")
    assert setup_main([*argv, "--classes", "gadget"]) == 0  # a subset: widget stays
    assert _names(dst) == _names(root / "train") == ["gadget", "gizmo", "widget"]
    for junk in (".DS_Store", "Thumbs.db", "desktop.ini", "__MACOSX/._x", ".ipynb/x"):
        (dst / "widget" / junk).parent.mkdir(exist_ok=True)  # a system's, not the user's
        (dst / "widget" / junk).write_bytes(b"")
    capsys.readouterr()

    assert setup_main(argv) == 0
    out, err = capsys.readouterr()
    assert "no longer in" not in err
    assert (f"custom set: removed 3 folder(s) of classes no longer in {src}: "
            f"{dst / 'widget'}, {root / 'train' / 'widget'}, {root / 'fg_mask' / 'widget'}"
            in out.splitlines())
    assert _names(dst) == _names(root / "train") == ["gadget", "gizmo"]  # gizmo: theirs
    assert _names(root / "fg_mask") == ["gadget"]
    assert datasets.list_train_classes(str(root)) == ["gadget", "gizmo"]
    assert datasets.list_test_classes(str(dst)) == ["gadget", "gizmo"]
    # a class whose converted folder holds the user's own masks: kept, with a note
    (dst / "gizmo" / "ground_truth").mkdir()
    shutil.rmtree(other / "gizmo")
    _custom_set(other, {"doohickey": 3})
    assert setup_main(["--custom", str(other), "--data_path", str(dst), "--root",
                       str(root)]) == 0
    assert (f"note: {dst / 'gizmo'}: its class is no longer in {other}, but it holds "
            "ground_truth, which --custom did not write: kept (and trained on) until you "
            "remove it by hand") in capsys.readouterr().err.splitlines()
    assert _names(dst) == _names(root / "train") == ["doohickey", "gadget", "gizmo"]


def test_custom_keeps_a_class_whose_marker_names_a_relative_source(tmp_path, monkeypatch,
                                                                    capsys):
    """An earlier version's marker recorded --custom as typed ('mine'): resolved against
    today's working directory it named the current source, and a class written from
    another 'mine' was deleted. Such a class stays, named in a note."""
    src = _custom_set(tmp_path / "mine", {"gadget": 3})
    dst, root = tmp_path / "mvtec", tmp_path / "inet"
    marker = dataset_converters.CUSTOM_MARKER
    for folder in (dst / "widget", root / "train" / "widget"):
        (folder / "train" / "good").mkdir(parents=True)
        (folder / "train" / "good" / "000.png").write_bytes(b"theirs")
        (folder / marker).write_text("written by setup_train_dataset.py --custom mine\n")
    monkeypatch.chdir(tmp_path)  # where 'mine' is this source
    assert setup_main(["--custom", str(src), "--data_path", str(dst), "--root",
                       str(root)]) == 0
    out, err = capsys.readouterr()
    assert _names(dst) == _names(root / "train") == ["gadget", "widget"]
    assert (dst / "widget" / "train" / "good" / "000.png").read_bytes() == b"theirs"
    assert "of classes no longer in" not in out
    assert [ln for ln in err.splitlines() if "relative path" in ln] == [
        f"note: {dst / 'widget'}, {root / 'train' / 'widget'}: not in {src}, but an earlier "
        "version's --custom marked it with a relative path, so its source is unknown and it "
        "was not removed: remove it by hand if this source no longer has it"]


def test_custom_keeps_a_class_renamed_only_in_case(tmp_path, capsys):
    """On a case-insensitive file system, a source folder renamed 'Brick' -> 'brick' is
    converted into the output's 'Brick', which is not among the source's classes but
    names the source: it was deleted, the fresh conversion with it. Simulated here with
    links 'brick' -> 'Brick', as such a file system resolves the name."""
    src = _custom_set(tmp_path / "mine", {"Brick": 3})
    dst, root = tmp_path / "mvtec", tmp_path / "inet"
    argv = ["--custom", str(src), "--data_path", str(dst), "--root", str(root)]
    assert setup_main(argv) == 0
    (src / "Brick").rename(src / "brick")
    for folder in (dst, root / "train"):
        (folder / "brick").symlink_to("Brick", target_is_directory=True)
    capsys.readouterr()
    assert setup_main(argv) == 0
    assert "of classes no longer in" not in capsys.readouterr().out
    assert _names(dst / "Brick" / "train" / "good") == ["000.png", "001.png"]
    assert _names(dst / "Brick" / "test") == ["good", "scratch"]
    assert _names(root / "train" / "Brick") == [dataset_converters.CUSTOM_MARKER, "000.png",
                                                "001.png"]


def test_visa_split_refuses_rows_that_clash_before_writing(tmp_path):
    """An edited split file with two images of one name bound for one folder (one
    overwrote the other), a repeated row, or an image in train and test (a test image
    trained on) converted with exit 0; now each is named by its lines, all in the one
    error of the split's other problems, and nothing is written."""
    images = tmp_path / "candle" / "Data" / "Images"
    for rel in ("Normal/0000.JPG", "Extra/0000.JPG", "Normal/0001.JPG", "Normal/0002.JPG",
                "Normal/0003.JPG"):
        (images / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (16, 16)).save(images / rel)
    (tmp_path / "split_csv").mkdir()
    (tmp_path / "split_csv" / "1cls.csv").write_text(
        "object,split,label,image,mask\n"
        "candle,train,normal,candle/Data/Images/Normal/0000.JPG,\n"
        "candle,train,normal,candle/Data/Images/Extra/0000.JPG,\n"
        "candle,train,normal,candle/Data/Images/Normal/0001.JPG,\n"
        "candle,train,normal,candle/Data/Images/Normal/0001.JPG,\n"
        "candle,train,normal,candle/Data/Images/Normal/0002.JPG,\n"
        "candle,test,normal,candle/Data/Images/Normal/0002.JPG,\n"
        "candle,test,normal,candle/Data/Images/Normal/0003.JPG,\n"
        "candle,train,normal,candle/Data/Images/Normal/missing.JPG,\n")
    out = tmp_path / "out"
    with pytest.raises(dataset_converters.LayoutError) as err:
        dataset_converters.convert_visa(str(tmp_path), str(out), lambda *a: pytest.fail(),
                                        ["candle"])
    assert str(err.value).splitlines()[1:-1] == [
        f"  {images / 'Normal' / 'missing.JPG'} (line 9) missing",
        "  lines 4, 5: candle/Data/Images/Normal/0001.JPG is listed 2 times as train normal: "
        "remove the repeated row(s)",
        "  lines 6, 7: candle/Data/Images/Normal/0002.JPG is listed as train normal and test "
        "normal (a test image would be trained on): keep only the row it belongs to",
        "  lines 2, 3: candle/Data/Images/Normal/0000.JPG and candle/Data/Images/Extra/0000.JPG "
        "would both be copied to candle/train/good/ as 0000 (one over the other, or sharing "
        "its mask): rename all but one image, and its row"]
    assert not out.exists()


def test_visa_split_names_one_image_however_its_path_is_spelt(tmp_path):
    """Rows naming one file by two spellings ('Normal/0000.JPG', './Normal/0000.JPG')
    list one image: in train and in test it would be trained on and tested, and both
    copies (train/good, test/good) go to different folders, so only the comparison of
    normalised paths catches it."""
    image = tmp_path / "candle" / "Data" / "Images" / "Normal" / "0000.JPG"
    image.parent.mkdir(parents=True)
    Image.new("RGB", (16, 16)).save(image)
    (tmp_path / "split_csv").mkdir()
    (tmp_path / "split_csv" / "1cls.csv").write_text(
        "object,split,label,image,mask\n"
        "candle,train,normal,candle/Data/Images/Normal/0000.JPG,\n"
        "candle,test,normal,candle/Data/Images/./Normal/0000.JPG,\n")
    with pytest.raises(dataset_converters.LayoutError, match=r"lines 2, 3: candle/Data/Images/"
                       r"Normal/0000\.JPG is listed as train normal and test normal \(a test "
                       r"image would be trained on\)"):
        dataset_converters.read_visa_split(str(tmp_path), ["candle"])


def test_custom_names_empty_defect_folders(tmp_path, capsys):
    """DIR/widget/dent/ without an image disappeared without a word (no test/dent, no
    defect type scored); now a note names it, as run_test.py does for the MVTec layout."""
    src = _custom_set(tmp_path / "mine", {"gadget": 3, "widget": 3})
    for defect in ("dent", "hole"):
        (src / "widget" / defect).mkdir()
    (src / "widget" / "hole" / "readme.txt").write_text("no images yet")
    dst = tmp_path / "mvtec"
    assert setup_main(["--custom", str(src), "--data_path", str(dst), "--root",
                       str(tmp_path / "inet")]) == 0
    notes = [ln for ln in capsys.readouterr().err.splitlines() if "empty folder" in ln]
    assert notes == [f"note: {src / 'widget'}: left out 2 empty folder(s) (dent, hole): no "
                     "image of that defect type is converted or scored"]
    assert _names(dst / "widget" / "test") == _names(dst / "gadget" / "test") == [
        "good", "scratch"]


def test_images_that_are_no_images_are_refused_before_writing(tmp_path, capsys):
    """--custom copied every image and only then failed on a corrupt one, at mask
    estimation, and an empty file passed altogether; a --visa normal image was checked to
    exist only. Now each file whose header is no image's is named in the one error of
    the other problems, before anything is written."""
    src = _custom_set(tmp_path / "mine", {"gadget": 4, "widget": 1})
    (src / "gadget" / "good" / "001.png").write_bytes(b"")
    (src / "gadget" / "scratch" / "000.png").write_bytes(b"not an image")
    dst, root = tmp_path / "mvtec", tmp_path / "inet"
    assert setup_main(["--custom", str(src), "--data_path", str(dst), "--root", str(root),
                       "--make_fg_masks"]) == 2
    assert capsys.readouterr().err.splitlines()[-4:-1] == [
        f"  {src / 'gadget' / path} is unreadable: empty, cut short or not an image; "
        "replace or remove the file" for path in ("good/001.png", "scratch/000.png")] + [
        f"  {src / 'widget' / 'good'}: 1 image(s); add normal images until it has at least "
        "3 (2 to train on, as run_protoflow.py holds one out, and 1 held out to test/good by "
        "--custom_test_fraction 0.2), or remove the class folder"]
    assert not dst.exists() and not root.exists()

    normal = tmp_path / "visa" / "candle" / "Data" / "Images" / "Normal"
    normal.mkdir(parents=True)
    Image.new("RGB", (16, 16)).save(normal / "0000.JPG")
    (normal / "0001.JPG").write_bytes(b"")
    (tmp_path / "visa" / "split_csv").mkdir()
    text = _split_error(tmp_path / "visa", *(f"candle,{split},normal,candle/Data/Images/"
                                             f"Normal/000{k}.JPG," for k, split in
                                             enumerate(("train", "test"))))
    assert text.splitlines()[1:-1] == [
        f"  {normal / '0001.JPG'} is unreadable: empty, cut short or not an image (line 3): "
        "replace the file from the VisA download"]


def test_an_image_over_the_pixel_limit_is_to_be_downscaled(tmp_path):
    """An image over Pillow's pixel limit was named 'unreadable ... could be decompression
    bomb DOS attack.; replace or remove the file' before a conversion, while
    datasets.open_rgb says to downscale it: both now say so, in its words."""
    src = _custom_set(tmp_path / "mine", {"gadget": 3})
    big = src / "gadget" / "good" / "001.png"
    Image.new("1", (20000, 10000)).save(big)  # a small file of 2e8 pixels
    with pytest.raises(dataset_converters.LayoutError) as err:
        dataset_converters.plan_custom(str(src), str(tmp_path / "mvtec"))
    limit = Image.MAX_IMAGE_PIXELS
    said = (f"{big} is too large to open (Image size (200000000 pixels) exceeds limit of "
            f"{2 * limit} pixels, could be decompression bomb DOS attack.): downscale it")
    assert str(err.value).splitlines()[1] == f"  {said}"
    with pytest.raises(datasets.BadFileError) as read:
        datasets.open_rgb(str(big))
    assert str(read.value).startswith(said)

    normal = tmp_path / "visa" / "candle" / "Data" / "Images" / "Normal"
    normal.mkdir(parents=True)
    Image.new("RGB", (16, 16)).save(normal / "0000.JPG")
    Image.new("1", (20000, 10000)).save(normal / "0001.JPG", format="PNG")
    (tmp_path / "visa" / "split_csv").mkdir()
    text = _split_error(tmp_path / "visa", *(f"candle,{split},normal,candle/Data/Images/"
                                             f"Normal/000{k}.JPG," for k, split in
                                             enumerate(("train", "test"))))
    assert text.splitlines()[1] == (
        f"  {normal / '0001.JPG'} is too large to open (Image size (200000000 pixels) exceeds "
        f"limit of {2 * limit} pixels, could be decompression bomb DOS attack.): downscale "
        "it (line 3)")


def test_visa_split_refuses_stems_that_differ_only_in_case(tmp_path):
    """'A.JPG' and 'a.JPG' bound for one folder passed the clash check, though on macOS'
    and Windows' file systems one is copied over the other: named like any clash."""
    images = tmp_path / "candle" / "Data" / "Images"
    for rel in ("Normal/A.JPG", "Extra/a.JPG", "Normal/0001.JPG"):
        (images / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (16, 16)).save(images / rel)
    (tmp_path / "split_csv").mkdir()
    text = _split_error(tmp_path, "candle,train,normal,candle/Data/Images/Normal/A.JPG,",
                        "candle,train,normal,candle/Data/Images/Extra/a.JPG,",
                        "candle,test,normal,candle/Data/Images/Normal/0001.JPG,")
    assert text.splitlines()[1:-1] == [
        "  lines 2, 3: candle/Data/Images/Normal/A.JPG and candle/Data/Images/Extra/a.JPG "
        "would both be copied to candle/train/good/ as A (one over the other, or sharing its "
        "mask): rename all but one image, and its row"]


def test_custom_refuses_images_outside_the_class_folders(tmp_path, capsys):
    """DIR/extra.png (beside the class folders) was left out with exit 0, unnamed, and
    DIR/*.png with no class folder at all got only 'no class folders'; now each such
    image is named, with where it belongs, and nothing is written."""
    src = _custom_set(tmp_path / "mine", {"widget": 3})
    Image.new("RGB", (16, 16)).save(src / "extra.png")
    (src / "notes.txt").write_text("not an image\n")
    dst = tmp_path / "mvtec"
    assert setup_main(["--custom", str(src), "--data_path", str(dst), "--root",
                       str(tmp_path / "inet")]) == 2
    err = capsys.readouterr().err
    assert (f"{src}: holds image(s) outside any class folder (extra.png), which would be "
            "left out: move each into <class>/good/ or <class>/<defect>/") in err
    assert not dst.exists()
    flat = tmp_path / "flat"
    flat.mkdir()
    for k in range(4):
        Image.new("RGB", (16, 16)).save(flat / f"{k:03d}.png")
    with pytest.raises(dataset_converters.LayoutError) as e:
        dataset_converters.plan_custom(str(flat), str(tmp_path / "mvtec2"))
    assert (f"{flat}: holds image(s) outside any class folder (000.png, 001.png, 002.png, "
            "... 1 more), which would be left out") in str(e.value)
    assert "no class folders" not in str(e.value)


def test_visa_rerun_with_an_edited_split_refuses_the_earlier_conversion_s_images(tmp_path,
                                                                                capsys):
    """A split edited to move 0003.JPG from train to test converted with exit 0 and left
    it in train/good/ and the training copy, so it was trained on and tested; now the
    re-run names both copies and the folders to remove, writing nothing, and converts
    once they are gone."""
    visa = tmp_path / "VisA"
    normal = visa / "candle" / "Data" / "Images" / "Normal"
    normal.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for k in range(5):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
            normal / f"{k:04d}.JPG", format="JPEG")
    (visa / "split_csv").mkdir()

    def split(test: set[int]) -> None:
        (visa / "split_csv" / "1cls.csv").write_text("object,split,label,image,mask\n" + "".join(
            f"candle,{'test' if k in test else 'train'},normal,"
            f"candle/Data/Images/Normal/{k:04d}.JPG,\n" for k in range(5)))

    mvtec, root = tmp_path / "visa_mvtec", tmp_path / "visa_inet"
    argv = ["--visa", str(visa), "--data_path", str(mvtec), "--root", str(root),
            "--classes", "candle"]
    split({4})
    assert setup_main(argv) == 0
    assert _names(mvtec / "candle" / "train" / "good") == [
        "0000.JPG", "0001.JPG", "0002.JPG", "0003.JPG"]
    capsys.readouterr()
    split({3, 4})
    assert setup_main(argv) == 2
    err = capsys.readouterr().err
    train_copy, train_good = root / "train" / "candle", mvtec / "candle" / "train" / "good"
    assert err == (
        f"error: 2 image(s) of an earlier conversion lie where the split "
        f"{dataset_converters.VISA_SPLIT} no longer puts them ({train_copy / '0003.JPG'}, "
        f"{train_good / '0003.JPG'}): one left in a training folder would be trained on, "
        f"while the split may now test it. Fix: remove {train_copy}, {train_good} and "
        "convert again (then train again: models trained on the earlier conversion may have "
        "seen the new split's test images)\n")
    assert not (mvtec / "candle" / "test" / "good" / "0003.JPG").exists()  # nothing written
    shutil.rmtree(train_copy)
    shutil.rmtree(train_good)
    assert setup_main(argv) == 0
    assert _names(train_good) == _names(train_copy) == ["0000.JPG", "0001.JPG", "0002.JPG"]
    assert _names(mvtec / "candle" / "test" / "good") == ["0003.JPG", "0004.JPG"]
    assert setup_main(argv) == 0  # the same split again: nothing is refused
