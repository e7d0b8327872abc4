"""run_test.py: both protocols end to end through the entry point, the label-blind clean
protocol on real files, the checkpoint's own settings, flags and exit codes."""
from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import re
import shutil
import socket
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import tqdm
from PIL import Image

import datasets
import heatmaps
import masking_generator
import metrics
import modeling_pmad
import predict
import protocols
import protoflow
import run_pretraining
import run_test
import scoring_models
import utils
from conftest import KMEANS_VOCAB, strict_json


def _argv(world, tmp_path, protocol: str, *extra: str) -> list[str]:
    """run_test.py on the tiny world under --protocol, results in tmp_path/<protocol>."""
    return world.run_test_argv(tmp_path / protocol, "--protocol", protocol, *extra)


def _args(world, tmp_path, protocol: str, *extra: str):
    return run_test.get_args_parser().parse_args(_argv(world, tmp_path, protocol, *extra))


@pytest.fixture(scope="module")
def clean_run(tiny_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean")
    return run_test.main(_args(tiny_world, out, "clean", "--save_heatmaps", "1")), out


def test_clean_protocol_end_to_end(clean_run, tiny_world) -> None:
    results, out = clean_run
    assert results["protocol"] == "clean"
    assert list(results["classes"]) == tiny_world.classes
    saved = json.loads((out / "clean" / "results.json").read_text())
    assert saved["protocol"] == "clean" and len(saved["checkpoints"]["pmad"]) == 64
    for name, record in saved["classes"].items():
        assert record["num_images"] == 8 and record["num_anomalous"] == 4
        assert record["mask_ratio"] == masking_generator.CLASS_MASK_RATIOS.get(name, 0.3)
        for key in metrics.METRIC_NAMES:
            assert 0.0 <= record[key] <= 1.0
            assert 0.0 <= record["protoflow_only"][key] <= 1.0
    mean = np.mean([r["image_auroc"] for r in saved["classes"].values()])
    assert saved["mean"]["image_auroc"] == pytest.approx(mean)
    table = (out / "clean" / "results.md").read_text()
    assert "Protocol: **clean**" in table and "Brick" in table and "Mean" in table
    assert table.splitlines()[0].endswith("; setting: **multi_class**")
    csv_lines = (out / "clean" / "results.csv").read_text().splitlines()
    # header; PMAD and 3 baselines, each 2 classes + mean
    assert len(csv_lines) == 1 + 4 * 3
    assert {line.split(",")[2] for line in csv_lines[1:]} == {
        "pmad", "protoflow_only", "patchcore", "ce_only"}
    for key in ("mean_protoflow_only", "mean_patchcore", "mean_ce_only"):
        assert set(metrics.METRIC_NAMES) <= set(saved[key])
    assert "| PatchCore" in table and "Defect type" in table
    # each class's record is keyed to its own test set (--resume_eval reuses a record only
    # for the same images): with two classes, one's digest under the other's name would
    # let a changed test set of that other pass for the old one
    digests = {c: datasets.test_set_contents(str(tiny_world.mvtec_root), c)[0]
               for c in tiny_world.classes}
    assert len(set(digests.values())) == 2 and saved["test_data"] == digests
    lines = [json.loads(x) for x in
             (out / "clean" / "results.partial.jsonl").read_text().splitlines()]
    assert {x["class"]: x["key"]["test_data"] for x in lines} == digests
    # image_scores.csv: every test image once, its scores giving its class's image AUROCs
    with open(out / "clean" / "image_scores.csv") as f:
        images = list(csv.DictReader(f))
    assert list(images[0]) == ["class", "name", "defect_type", "pmad", "protoflow_score",
                               "protoflow_only", "patchcore", "ce_only"]
    for name, record in saved["classes"].items():
        rows = [r for r in images if r["class"] == name]
        assert [r["name"] for r in rows] == [i["name"] for i in record["images"]]
        test_dir = tiny_world.mvtec_root / name / "test"
        assert sorted(r["name"] for r in rows) == sorted(
            f"{p.parent.name}_{p.stem}" for p in test_dir.glob("*/*.png"))
        labels = np.array([r["defect_type"] != "good" for r in rows])
        assert labels.sum() == record["num_anomalous"]
        for method in ("pmad", "protoflow_only", "patchcore", "ce_only"):
            auroc = metrics.image_auroc(labels, np.array([float(r[method]) for r in rows]))
            want = record if method == "pmad" else record[method]
            assert auroc == pytest.approx(want["image_auroc"]), (name, method)
    # --save_heatmaps 1: the most and the least anomalous image of each defect type
    test_dir = tiny_world.mvtec_root / "coins" / "test"
    per_type = {d.name: len(list(d.glob("*.png"))) for d in test_dir.iterdir()}
    pngs = sorted((out / "clean" / "heatmaps" / "coins").glob("*.png"))
    assert len(pngs) == sum(min(2, n) for n in per_type.values())
    for t in per_type:
        assert any(p.name.startswith(f"{t}_") for p in pngs)
    with Image.open(pngs[0]) as png:  # image | ground truth | PMAD | bar | ProtoFlow | bar
        bar = heatmaps.BAR_WIDTH + heatmaps.BAR_LABELS
        assert png.width == 4 * 224 + 2 * bar + 5 * heatmaps.GAP
        # the panels' names below them, then the caption's 4 lines
        assert png.height == 224 + (heatmaps.LINE_HEIGHT + 2) + 4 * heatmaps.LINE_HEIGHT + 6


def test_paper_protocol_reports_best_ratio_per_metric(tiny_world, tmp_path) -> None:
    results = run_test.main(_args(tiny_world, tmp_path, "paper", "--classes", "coins"))
    record = results["classes"]["coins"]
    assert len(record["per_ratio"]) == 24
    for key in metrics.METRIC_NAMES:
        values = [v[key] for v in record["per_ratio"].values()]
        assert record[key] == max(v for v in values if not math.isnan(v))
        assert record["per_ratio"][f"{record[key + '_ratio']:.2f}"][key] == record[key]
    # each image's scores are those of the ratio of the best image AUROC, and the
    # baselines' their maps' maxima
    labels = np.array([i["defect_type"] != "good" for i in record["images"]])
    for method in ("pmad", "protoflow_only", "patchcore"):
        scores = np.array([i[method] for i in record["images"]])
        want = record if method == "pmad" else record[method]
        assert metrics.image_auroc(labels, scores) == pytest.approx(want["image_auroc"])
    assert "ce_only" not in record["images"][0]


def test_clean_protocol_score_maps_ignore_labels(tiny_world) -> None:
    """Shuffling the test labels (with their masks) changes the metrics, never the maps."""
    import timm

    import datasets
    from modeling_discrete_vae import create_tokenizer
    from protoflow import ProtoFlow

    model = timm.create_model(tiny_world.model, pretrained=False, vocab_size=KMEANS_VOCAB)
    modeling_pmad.load_checkpoint(model, str(tiny_world.pmad_ckpt))
    model.eval()
    tokenizer = create_tokenizer("kmeans", str(tiny_world.tokenizer))
    pf = ProtoFlow(str(tiny_world.protoflow), str(tiny_world.prototypes_dir))
    ds = datasets.MVTecTestDataset(tiny_world.mvtec_root, "brick", token_size=224)
    data = protocols.collect_class(ds, tokenizer, pf, "brick", 8, torch.device("cpu"))
    kwargs = dict(ratio=0.3, threshold=pf.threshold, options=protocols.CleanOptions(),
                  sigma=4.0, batch_size=8, device=torch.device("cpu"), amp="none", seed=0)
    _, maps, _ = protocols.evaluate_clean(model, data, **kwargs)
    perm = np.random.default_rng(0).permutation(len(data.labels))
    assert (data.labels[perm] != data.labels).any()
    data.labels, data.gt_masks = data.labels[perm], data.gt_masks[perm]
    data.defect_types = [data.defect_types[i] for i in perm]
    _, shuffled, _ = protocols.evaluate_clean(model, data, **kwargs)
    assert maps.keys() == shuffled.keys() == {"pmad", "protoflow_only", "patchcore", "ce_only"}
    for key in maps:
        assert torch.equal(maps[key], shuffled[key]), key


class ShownTqdm(tqdm.tqdm):
    """tqdm with its bar shown even where TQDM_DISABLE is set (tqdm reads it on import)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**kwargs, "disable": False})


def test_an_anomalous_image_with_an_empty_or_inverted_mask_is_named(tiny_world, tmp_path,
                                                                    capfd, monkeypatch):
    """An anomalous test image whose ground-truth mask marks no pixel was evaluated
    silently (its defect never reaches the pixel metrics): a note names it, and the
    class's diagnostics in results.json count it. So was an inverted mask (the defect
    black on white: the background scored as the defect): a note names it too."""
    monkeypatch.setattr(utils, "tqdm", ShownTqdm)
    data = tmp_path / "data"
    shutil.copytree(tiny_world.mvtec_root / "coins", data / "coins")
    mask, inverted = sorted((data / "coins" / "ground_truth").rglob("*.png"))[:2]
    Image.fromarray(np.zeros(np.asarray(Image.open(mask)).shape[:2], np.uint8)).save(mask)
    Image.fromarray(255 - np.asarray(Image.open(inverted).convert("L"))).save(inverted)

    def result_name(path: Path) -> str:
        return f"{path.parent.name}_{path.name.replace('_mask.png', '')}"
    name = result_name(mask)
    with pytest.warns(metrics.UndefinedMetricWarning, match="pixel_auroc is undefined: 0 "
                      "positive"):  # that image's defect type has no defect pixel left
        results = run_test.main(run_test.get_args_parser().parse_args(
            tiny_world.run_test_argv(tmp_path / "out", data=data)))
    err = capfd.readouterr().err
    assert (f"[run_test] note: coins: 1 anomalous image(s) have no defect pixel in their "
            f"ground-truth mask as scored ({name}): the pixel metrics never see their "
            "defects") in err
    assert (f"[run_test] note: coins: 1 ground-truth mask(s) mark more than 50% of their "
            f"image, its corners too, defective ({result_name(inverted)}): check that each "
            "marks its defect non-zero (white) on zero (black)") in err
    assert "\rreading the test sets:   0%|" in err  # the resume key's read: a progress bar
    assert results["classes"]["coins"]["diagnostics"]["empty_defect_masks"] == 1
    saved = strict_json(tmp_path / "out" / "results.json")
    assert saved["classes"]["coins"]["diagnostics"]["empty_defect_masks"] == 1
    # what made the numbers: in results.json, and its line in results.md
    made = saved["provenance"]
    assert (made["device"], made["argv"], made["code"]) == ("cpu", sys.argv,
                                                          utils.code_version())
    assert saved["test_data"] == {"coins": datasets.test_set_contents(str(data), "coins")[0]}
    record = saved["classes"]["coins"]  # ProtoFlow's calls at its threshold, by label
    called = [i["protoflow_score"] > record["called_at"] for i in record["images"]]
    good = [i["defect_type"] == "good" for i in record["images"]]
    assert record["calls"] == {
        "good_called_anomalous": sum(c and g for c, g in zip(called, good)),
        "good_images": sum(good),
        "anomalous_called_anomalous": sum(c and not g for c, g in zip(called, good)),
        "anomalous_images": len(good) - sum(good)}
    epoch = torch.load(tiny_world.pmad_ckpt, weights_only=True)["epoch"]  # 0-based
    assert saved["vit_epochs"] == epoch + 1
    assert saved["vit_training_args"] is None  # the world's checkpoint records no flags
    assert (tmp_path / "out" / "results.md").read_text().splitlines()[2] == (
        f"Checkpoint {tiny_world.pmad_ckpt} ({epoch + 1} epoch(s), sha256 "
        f"{_sha256(tiny_world.pmad_ckpt)[:12]}); "
        f"code {made['code'] or 'of no git checkout'}; started {made['started_utc']} on "
        f"{made['host']} (cpu), {saved['seconds']:.0f} s.")
    assert saved["classes"]["coins"]["per_defect"][mask.parent.name]["pixel_auroc"] is None


def test_test_images_a_model_trained_on_are_named(tiny_world, tmp_path, capsys):
    """A set re-split after training scores images a model learned: a test image whose
    content the ViT checkpoint, the ProtoFlow file or the class's coreset.json lists among
    its training images is named, with the file that learned it, on stderr, in
    results.json and at the top of results.md; files that list none of them, or no list at
    all (the released ones), add nothing."""
    good = sorted((tiny_world.mvtec_root / "coins" / "test" / "good").glob("*.png"))
    ckpt = torch.load(tiny_world.pmad_ckpt, weights_only=True)
    ckpt["args"] = {utils.TRAIN_IMAGE_HASHES: sorted([_sha256(good[0]), "0" * 64]),
                    "epochs": 7, "lr": 1e-3}
    vit = tmp_path / "resplit.pth"
    torch.save(ckpt, vit)
    pf = torch.load(tiny_world.protoflow, weights_only=True)
    pf[utils.TRAIN_IMAGE_HASHES] = [_sha256(good[1])]
    torch.save(pf, tmp_path / "pf.pt")
    protos = tmp_path / "prototypes"
    shutil.copytree(tiny_world.prototypes_dir, protos)
    meta = json.loads((protos / "coins" / "coreset.json").read_text())
    meta[utils.TRAIN_IMAGE_HASHES] = sorted([_sha256(good[1]), _sha256(good[2])])
    (protos / "coins" / "coreset.json").write_text(json.dumps(meta))
    argv = _argv(tiny_world, tmp_path / "out", "clean", "--classes", "coins")
    for flag, path in (("--ckpt", vit), ("--protoflow_weights", tmp_path / "pf.pt"),
                       ("--prototypes_dir", protos)):
        argv[argv.index(flag) + 1] = str(path)
    results = run_test.main(run_test.get_args_parser().parse_args(argv))
    rel = [str(p.relative_to(tiny_world.mvtec_root)) for p in good[:3]]
    found = {"coins": {"--ckpt": [rel[0]], "--protoflow_weights": [rel[1]],
                       "--prototypes_dir": rel[1:3]}}
    assert results["trained_test_images"] == found
    learned = (f"--ckpt learned 1 test image(s) ({rel[0]}), --protoflow_weights learned 1 "
               f"test image(s) ({rel[1]}), --prototypes_dir learned 2 test image(s) "
               f"({rel[1]}, {rel[2]}) by content")
    assert (f"[run_test] warning: coins: {learned}: their scores count images the models "
            "learned, so the metrics read better than they are") in capsys.readouterr().err
    saved = strict_json(tmp_path / "out" / "clean" / "results.json")
    assert saved["trained_test_images"] == found
    assert saved["vit_training_args"] == {"epochs": 7, "lr": 1e-3}  # its flags, no hashes
    assert (tmp_path / "out" / "clean" / "results.md").read_text().splitlines()[4] == (
        f"**TRAINED ON TEST IMAGES**: coins: {learned}: their metrics read better than they "
        "are.")
    contents = {"coins": datasets.test_set_contents(str(tiny_world.mvtec_root), "coins")}
    never = {"--ckpt": lambda c: frozenset({"0" * 64}), "--prototypes_dir": lambda c: None}
    assert run_test.trained_test_images(contents, never, "x") == {}


def test_missing_prototypes_of_a_later_class_are_refused_before_any_class(
        tiny_world, tmp_path, monkeypatch):
    """Each class's prototypes were read when the class was reached: one missing for the
    last class stopped the evaluation after every other class was scored (hours on MVTec
    AD). They are all checked before the first class."""
    monkeypatch.setattr(run_test, "evaluate_class", lambda *a: pytest.fail("scored"))
    first, last = tiny_world.classes[0], tiny_world.classes[-1]
    prototypes = tmp_path / "prototypes"
    shutil.copytree(tiny_world.prototypes_dir / first, prototypes / first)
    argv = tiny_world.run_test_argv(tmp_path / "out", "--prototypes_dir", str(prototypes))
    with pytest.raises(utils.MissingFileError, match=(
            f"^no prototypes for class '{last}': {prototypes / last / 'coreset.npy'} is "
            "missing")):
        run_test.main(run_test.get_args_parser().parse_args(argv))


def test_the_paper_protocol_refuses_a_class_without_anomalous_images(tiny_world, tmp_path,
                                                                       monkeypatch):
    """The paper protocol picks a class's threshold by F1 on its anomalous test images:
    a class with none ended the run in a traceback once reached, the classes after it
    unevaluated. It is refused (one error line, exit 2) before any class is scored."""
    monkeypatch.setattr(run_test, "evaluate_class", lambda *a: pytest.fail("scored"))
    data = tmp_path / "data"
    for c in tiny_world.classes:
        shutil.copytree(tiny_world.mvtec_root / c, data / c)
    last = tiny_world.classes[-1]
    for folder in (data / last / "test").iterdir():
        if folder.name != "good":
            shutil.rmtree(folder)
    argv = tiny_world.run_test_argv(tmp_path / "out", "--protocol", "paper", data=data)
    with pytest.raises(utils.FlagError, match=(
            f"^--protocol paper picks each class's threshold from its anomalous test images, "
            f"and {last} has none under {data}/<class>/test: evaluate it with --protocol "
            "clean")):
        run_test.main(run_test.get_args_parser().parse_args(argv))
    run_test.check_paper_classes(data, tiny_world.classes[:-1])  # the others have some
    # a link to a missing anomalous image counts: the dataset refuses it by name (or,
    # with --skip_bad_images, lists it), rather than a class "of none" or an early stop
    (data / last / "test" / "crack").mkdir()
    (data / last / "test" / "crack" / "000.png").symlink_to(tmp_path / "gone.png")
    run_test.check_paper_classes(data, [last])
    # with --skip_bad_images that class has no anomalous image left: refused by name
    # before any class is scored or any model loaded, not a traceback from the F1
    # threshold once the class is reached
    monkeypatch.setattr(run_test, "load_models", lambda *a: pytest.fail("loaded"))
    argv += ["--skip_bad_images"]
    with pytest.raises(utils.BadFileError, match=(
            f"^{last}: --skip_bad_images would leave out every anomalous test image, and "
            "--protocol paper picks the class's threshold from them:\n  "
            f"{re.escape(str(data / last / 'test' / 'crack' / '000.png'))} .*\nReplace "
            f"them, or evaluate {last} with --protocol clean$")):
        run_test.main(run_test.get_args_parser().parse_args(argv))
    # an image whose header reads but whose pixels do not is found when its class is
    # reached, and refused there by name
    (data / last / "test" / "crack" / "000.png").unlink()
    whole = (tiny_world.mvtec_root / last / "test" / "good" / "000.png").read_bytes()
    (data / last / "test" / "crack" / "000.png").write_bytes(whole[:len(whole) // 2])
    monkeypatch.undo()
    monkeypatch.setattr(run_test, "collect_class", lambda *a: pytest.fail("scored"))
    with pytest.warns(UserWarning, match=f"test images of {last}: left out 1 bad file"), \
            pytest.raises(utils.BadFileError, match=(
                f"^{last}: every anomalous test image was left out as a bad file \\(the "
                "warning above names them\\), and --protocol paper picks the class's "
                f"threshold from them: replace them, or evaluate {last} with --protocol "
                "clean$")):
        run_test.main(run_test.get_args_parser().parse_args(argv + ["--classes", last]))


def test_the_paper_protocol_keeps_a_class_with_an_anomalous_image_left(tiny_world, tmp_path):
    """With --skip_bad_images, --protocol paper refuses a class only where every anomalous
    test image would be left out: one bad file among readable ones costs that image (the
    dataset's warning names it), not the class's evaluation."""
    data = tmp_path / "data"
    last = tiny_world.classes[-1]
    shutil.copytree(tiny_world.mvtec_root / last, data / last)
    defects = sorted(d for d in (data / last / "test").iterdir() if d.name != "good")
    (defects[0] / "zzz.png").symlink_to(tmp_path / "gone.png")
    run_test.check_paper_classes(data, [last], skip_bad_images=True)
    for folder in defects:  # with no readable one left: refused
        for image in folder.iterdir():
            if image.name != "zzz.png":
                image.unlink()
    with pytest.raises(utils.BadFileError, match=f"^{last}: --skip_bad_images would leave"):
        run_test.check_paper_classes(data, [last], skip_bad_images=True)


def test_a_class_typed_in_another_unicode_form_is_the_folder_of_that_name(tiny_world,
                                                                           tmp_path):
    """--classes typed composed (NFC) selects a class folder stored decomposed (NFD, as
    macOS writes it): datasets.as_found, not 'no <class>/test folder'."""
    import unicodedata
    nfd, nfc = (unicodedata.normalize(form, "s\u010drew") for form in ("NFD", "NFC"))
    data = tmp_path / "data"
    shutil.copytree(tiny_world.mvtec_root / "coins", data / nfd)
    args = run_test.get_args_parser().parse_args(
        tiny_world.run_test_argv(tmp_path / "out", "--classes", nfc, data=data))
    assert run_test.select_classes(args, "multi_class") == [nfd] and args.classes == [nfd]


def test_missing_class_is_a_clear_error(tiny_world, tmp_path) -> None:
    with pytest.raises(ValueError, match="available"):
        run_test.main(_args(tiny_world, tmp_path, "clean", "--classes", "screw"))


def test_clean_protocol_without_a_stored_threshold_proposes_for_every_image(tiny_world,
                                                                            tmp_path):
    """A released ProtoFlow file has no threshold: the clean protocol still runs, label-free,
    with ProtoFlow's proposal for every image."""
    released = tmp_path / "released_protoflow.pt"
    obj = torch.load(tiny_world.protoflow, map_location="cpu", weights_only=True)
    torch.save({k: obj[k] for k in ("encoder_state_dict", "decoder_state_dict")}, released)
    args = _args(tiny_world, tmp_path, "clean", "--classes", "coins")
    args.protoflow_weights = str(released)
    args.encoder_weights = None
    with pytest.raises(ValueError, match="encoder_state_dict. does not fit"):
        run_test.main(args)  # no 'backbone' field: the default b6 does not fit lite0 files
    obj_named = {**{k: obj[k] for k in ("encoder_state_dict", "decoder_state_dict")},
                 "backbone": obj["backbone"], "out_indices": obj["out_indices"]}
    torch.save(obj_named, released)
    args.clean_masks = "threshold"
    record = run_test.main(args)["classes"]["coins"]
    assert record["threshold"] is None and record["called_anomalous"] is None  # no call
    assert record["proposal_masks"] == record["num_images"]


@pytest.fixture(scope="module")
def trained_112(tiny_world, tmp_path_factory):
    """A checkpoint of ours trained with non-default model settings: 112 px, layer scale
    0.05, 0.5/0.5 normalisation, its own 16-code k-means tokenizer at 112 px."""
    base = tmp_path_factory.mktemp("trained_112")
    tokenizer = str(base / "kmeans_112.pth")
    argv = ["--model", tiny_world.model, "--input_size", "112",
            "--layer_scale_init_value", "0.05", "--no-imagenet_default_mean_and_std",
            "--tokenizer_model", "kmeans", "--tokenizer_weight_path", tokenizer,
            "--fit_kmeans_tokenizer", "--kmeans_vocab_size", "16",
            "--data_path", str(tiny_world.imagenet_root), "--output_dir", str(base / "out"),
            "--epochs", "1", "--warmup_epochs", "0", "--batch_size", "2",
            "--max_steps_per_epoch", "1", "--num_workers", "0", "--no_init", "--amp", "none",
            "--device", "cpu"]
    run_pretraining.main(run_pretraining.get_args_parser().parse_args(argv))
    protoflow = base / "protoflow_112.pt"  # ProtoFlow refuses images of another size
    torch.save({**torch.load(tiny_world.protoflow, weights_only=True),
                "img_size": 112}, protoflow)
    return {"ckpt": str(base / "out" / "checkpoint-last.pth"), "tokenizer": tokenizer,
            "protoflow": str(protoflow)}


def _eval_argv(world, trained, out, *extra: str) -> list[str]:
    """No model flag repeated from training: the checkpoint's arguments decide them."""
    return ["--ckpt", trained["ckpt"], "--tokenizer_weight_path", trained["tokenizer"],
            "--protoflow_weights", trained["protoflow"],
            "--prototypes_dir", str(world.prototypes_dir), "--data_path", str(world.mvtec_root),
            "--classes", "coins", "--output_dir", str(out), "--batch_size", "8",
            "--num_workers", "0", "--device", "cpu", "--amp", "none", *extra]


def test_a_protoflow_file_of_another_image_size_is_refused_before_any_class(
        tiny_world, trained_112, tmp_path, monkeypatch):
    """The 112-px ViT with the tiny world's 224-px ProtoFlow file: its prototypes and
    threshold do not apply to 112-px images, so run_test.py refuses it up front (exit 2
    through cli), before a class is scored or an output written."""
    monkeypatch.setattr(run_test, "evaluate_class", lambda *a: pytest.fail("scored"))
    argv = _eval_argv(tiny_world, {**trained_112, "protoflow": str(tiny_world.protoflow)},
                      tmp_path / "out")
    with pytest.raises(utils.FlagError, match=(
            f"^{tiny_world.protoflow} was made at 224 px \\(prototypes, flow and threshold\\) "
            "but is given 112x112 px images")):
        run_test.main(run_test.get_args_parser().parse_args(argv))


def test_checkpoint_evaluates_with_its_own_settings(tiny_world, trained_112, tmp_path, capsys,
                                                    monkeypatch):
    log_likelihoods = []  # what ProtoFlow computes in each run

    def recording(self, *a, **k):
        out = original(self, *a, **k)
        log_likelihoods.append(out[0])
        return out

    original = protoflow.ProtoFlow.scores
    monkeypatch.setattr(protoflow.ProtoFlow, "scores", recording)
    argv = _eval_argv(tiny_world, trained_112, tmp_path)
    results = run_test.main(run_test.get_args_parser().parse_args(argv))
    out = capsys.readouterr().out
    assert f"[run_test] {trained_112['ckpt']} stores its training arguments" in out
    assert "override" not in out
    args = results["args"]
    assert (args["model"], args["input_size"], args["layer_scale_init_value"]) == (
        tiny_world.model, 112, 0.05)
    assert args["imagenet_default_mean_and_std"] is False and args["tokenizer_model"] == "kmeans"
    record = results["classes"]["coins"]
    assert record["num_images"] == 8 and 0 <= record["image_auroc"] <= 1
    # An explicit flag wins and is reported. ProtoFlow converts the ViT's normalisation
    # to its own (ImageNet's): its log-likelihoods do not depend on the flag.
    half = torch.cat(log_likelihoods)  # (8, 14, 14)
    log_likelihoods.clear()
    imagenet = run_test.main(run_test.get_args_parser().parse_args(
        argv + ["--imagenet_default_mean_and_std"]))
    assert ("given flags override the checkpoint's training arguments: "
            "--imagenet_default_mean_and_std True (checkpoint: False)") in capsys.readouterr().out
    assert imagenet["args"]["imagenet_default_mean_and_std"] is True
    assert half.shape == (8, 14, 14)
    torch.testing.assert_close(half, torch.cat(log_likelihoods), atol=1e-4, rtol=1e-5)
    # Here an explicit flag cannot fit the weights: a clear error.
    with pytest.raises(ValueError, match=r"rel_pos_bias.* has shape .*image size"):
        run_test.main(run_test.get_args_parser().parse_args(argv + ["--input_size", "224"]))
    assert "--input_size 224 (checkpoint: 112)" in capsys.readouterr().out


def test_a_protoflow_folder_is_recorded_as_the_file_it_holds(tiny_world, tmp_path):
    """--protoflow_weights may name a folder holding one .pt (the default,
    weights/protoflow): results.json's args record the file used, and the resume key
    fingerprints that file's content (a folder has no sha256)."""
    folder = tmp_path / "protoflow"
    folder.mkdir()
    shutil.copy(tiny_world.protoflow, folder / "multi_class.pt")
    argv = tiny_world.model_argv()
    argv[argv.index("--protoflow_weights") + 1] = str(folder)
    args = run_test.get_args_parser().parse_args(argv)
    m = run_test.load_models(args)
    assert args.protoflow_weights == m.protoflow_path == str(folder / "multi_class.pt")
    assert run_test.file_fingerprints(args, m)["protoflow"] == _sha256(tiny_world.protoflow)


def test_without_the_flag_the_tokenizer_is_the_one_the_checkpoint_was_trained_with(
        tiny_world, trained_112, tmp_path, capsys, monkeypatch):
    """Left out, --tokenizer_weight_path was weights/tokenizer, and a k-means checkpoint
    failed with "k-means tokenizer weights/tokenizer not found" without naming the file
    it records. Now that file is used where it is on this machine, and named where not."""
    monkeypatch.setattr(run_test, "evaluate_class", lambda *a: pytest.fail("scored"))
    monkeypatch.chdir(tmp_path)
    argv = _eval_argv(tiny_world, trained_112, tmp_path / "out")
    i = argv.index("--tokenizer_weight_path")
    args = run_test.get_args_parser().parse_args(argv[:i] + argv[i + 2:])
    assert args.tokenizer_weight_path is None
    m = run_test.load_models(args)
    assert args.tokenizer_weight_path == trained_112["tokenizer"]
    assert m.tokenizer.vocab_size == 16
    assert (f"[run_test] tokenizer: {trained_112['tokenizer']}, the path {trained_112['ckpt']} "
            "records it was trained with (--tokenizer_weight_path)\n") in capsys.readouterr().out
    ckpt = torch.load(trained_112["ckpt"], weights_only=True)
    ckpt["args"]["tokenizer_weight_path"] = str(tmp_path / "gone.pth")
    elsewhere = tmp_path / "elsewhere.pth"
    torch.save(ckpt, elsewhere)
    args = run_test.get_args_parser().parse_args(
        [*argv[:i], *argv[i + 2:], "--ckpt", str(elsewhere)])
    with pytest.raises(utils.MissingFileError) as info:
        run_test.load_models(args)
    assert str(info.value).endswith(
        f"pass the file that run wrote ({elsewhere} was trained with --tokenizer_weight_path "
        f"{tmp_path / 'gone.pth'}, which is not on this machine)")
    assert str(info.value).startswith("k-means tokenizer weights/tokenizer not found")
    args = run_test.get_args_parser().parse_args(
        [*argv, "--ckpt", str(elsewhere)])  # the flag given: that file, no word of another
    run_test.load_models(args)
    assert "tokenizer:" not in capsys.readouterr().out


def test_tokenizer_of_another_vocabulary_is_refused(tiny_world, trained_112, tmp_path):
    argv = _eval_argv(tiny_world, trained_112, tmp_path)
    argv[argv.index("--tokenizer_weight_path") + 1] = str(tiny_world.tokenizer)
    with pytest.raises(ValueError, match=f"predicts 16 visual tokens but the kmeans tokenizer "
                                         f"{tiny_world.tokenizer} has {KMEANS_VOCAB}"):
        run_test.main(run_test.get_args_parser().parse_args(argv))


def test_a_tokenizer_other_than_the_checkpoints_is_refused(tiny_world, trained_112, tmp_path,
                                                           monkeypatch):
    """Only the vocabulary was compared: a tokenizer file of the same kind and vocabulary
    (its codes in another order, another world's) gave other targets and scores that
    looked plausible. Our checkpoint records the tokenizer's sha256, compared without its
    'fp16-' prefix; a checkpoint that records none (a released one) still has its token
    grid checked against the ViT's patches, before any class is scored."""
    monkeypatch.setattr(run_test, "evaluate_class", lambda *a: pytest.fail("scored"))
    kmeans = torch.load(trained_112["tokenizer"], weights_only=True)
    kmeans["codebook"] = kmeans["codebook"].flip(0)  # the same codes, other ids
    other = tmp_path / "kmeans_other.pth"
    torch.save(kmeans, other)
    argv = _eval_argv(tiny_world, {**trained_112, "tokenizer": str(other)}, tmp_path / "a")
    with pytest.raises(utils.FlagError, match=(
            f"^{trained_112['ckpt']} was trained with another tokenizer than "
            f"--tokenizer_weight_path {other} \\(sha256 [0-9a-f]{{12}} then, [0-9a-f]{{12}} "
            "now\\)")):
        run_test.main(run_test.get_args_parser().parse_args(argv))
    sha = utils.file_sha256(trained_112["tokenizer"])
    trained = modeling_pmad.checkpoint_args(utils.load_checkpoint_file(trained_112["ckpt"]))
    assert trained["tokenizer_fingerprint"] == sha
    tokenizer = SimpleNamespace(fingerprint="fp16-" + sha)  # DALL-E in fp16 on a GPU
    files = dict(ckpt=trained_112["ckpt"], tokenizer_model="kmeans",
                 tokenizer_path=trained_112["tokenizer"], model_name=tiny_world.model,
                 input_size=112)
    scoring_models.check_tokenizer(tokenizer, sha, **files)
    with pytest.raises(utils.FlagError, match="another tokenizer"):
        scoring_models.check_tokenizer(SimpleNamespace(fingerprint="fp16-" + "0" * 64), sha,
                                       **files)
    # No fingerprint recorded: a 224-px ViT with a tokenizer fitted at 112 px
    kmeans = torch.load(tiny_world.tokenizer, weights_only=True)
    small = tmp_path / "kmeans_112.pth"
    torch.save({**kmeans, "image_size": 112}, small)
    argv = tiny_world.run_test_argv(tmp_path / "b", "--tokenizer_weight_path", str(small))
    with pytest.raises(utils.FlagError, match=(
            f"^the kmeans tokenizer {small} \\(fitted at 112 px\\) gives 7x7 tokens per "
            f"image but {tiny_world.pmad_ckpt} \\({tiny_world.model} at 224 px\\) predicts "
            "14x14")):
        run_test.main(run_test.get_args_parser().parse_args(argv))
    big = tmp_path / "kmeans_448.pth"  # more tokens than the ViT's patches: refused too
    torch.save({**kmeans, "image_size": 448}, big)
    with pytest.raises(utils.FlagError, match=(
            f"^the kmeans tokenizer {big} \\(fitted at 448 px\\) gives 28x28 tokens per "
            f"image but {tiny_world.pmad_ckpt} \\({tiny_world.model} at 224 px\\) predicts "
            "14x14")):
        scoring_models.check_tokenizer(
            SimpleNamespace(fingerprint="0" * 64), None, ckpt=tiny_world.pmad_ckpt,
            tokenizer_model="kmeans", tokenizer_path=str(big), model_name=tiny_world.model,
            input_size=224)


@pytest.mark.parametrize("value", ["0", "1", "-0.2", "1.5", "nan", "x"])
def test_mask_ratio_outside_0_1_is_refused(value, capsys):
    parse = run_test.get_args_parser().parse_args
    for flag in ("--mask_ratio", "--default_mask_ratio"):
        with pytest.raises(SystemExit) as exit_info:
            parse([flag, value])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert f"argument {flag}: " in err
        assert "outside (0, 1)" in err or "'x' is not a number" in err
    assert parse(["--mask_ratio", "0.04"]).mask_ratio == 0.04


def test_negative_sigma_is_refused(capsys):
    parse = run_test.get_args_parser().parse_args
    with pytest.raises(SystemExit) as exit_info:
        parse(["--sigma", "-1"])
    assert exit_info.value.code == 2
    assert "argument --sigma: -1 is not a finite number >= 0" in capsys.readouterr().err
    assert parse(["--sigma", "0"]).sigma == 0.0  # no smoothing


@pytest.mark.parametrize("value", ["-1", "nan"])
def test_a_negative_layer_scale_is_refused_as_in_training(value, capsys):
    """run_test.py's (and predict.py's) --layer_scale_init_value has training's range:
    README says every entry point checks it, and run_test.py took any float."""
    for parser, argv in ((run_test.get_args_parser(), []),
                         (predict.get_args_parser(), ["in", "--class_name", "c"])):
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args([*argv, "--layer_scale_init_value", value])
        assert exit_info.value.code == 2
        assert (f"argument --layer_scale_init_value: {value} is not a finite number >= 0"
                in capsys.readouterr().err)
    assert run_test.get_args_parser().parse_args(
        ["--layer_scale_init_value", "0"]).layer_scale_init_value == 0.0  # no layer scale


def test_default_mask_ratio_is_the_ratio_of_a_class_without_its_own():
    """--default_mask_ratio masks a class outside the paper's Table 6 (every demo class);
    a Table-6 class keeps its own ratio; --mask_ratio overrides both."""
    parse = run_test.get_args_parser().parse_args

    def ratio(args, class_name):
        return masking_generator.class_mask_ratio(class_name, args.mask_ratio,
                                                  args.default_mask_ratio)
    assert "coins" not in masking_generator.CLASS_MASK_RATIOS
    assert masking_generator.CLASS_MASK_RATIOS["bottle"] == 0.42
    assert ratio(parse([]), "coins") == 0.3 and ratio(parse([]), "bottle") == 0.42
    given = parse(["--default_mask_ratio", "0.2"])
    assert ratio(given, "coins") == 0.2 and ratio(given, "bottle") == 0.42
    both = parse(["--default_mask_ratio", "0.2", "--mask_ratio", "0.1"])
    assert ratio(both, "coins") == ratio(both, "bottle") == 0.1


def test_clean_options_are_the_flags_given_over_the_defaults():
    """Clean-protocol flags default to 'not given' (so the paper protocol can refuse
    them); the clean protocol then takes CleanOptions' defaults. --ce_weight is
    refused with --combine product, which has no weight, and under the paper protocol."""
    parse = run_test.get_args_parser().parse_args
    assert run_test.clean_options(parse([])) == protocols.CleanOptions(
        "proposal", "cover", "log", "weighted", "max", 1.0)
    assert run_test.clean_options(parse(["--combine", "product"])) == protocols.CleanOptions(
        combine="product")
    assert run_test.clean_options(parse(["--ce_weight", "0.25"])).ce_weight == 0.25
    assert run_test.clean_options(parse(["--ce_weight", "0"])).ce_weight == 0.0
    with pytest.raises(utils.FlagError, match="^--ce_weight weighs the cross-entropy in "
                                              "--combine weighted; --combine product"):
        run_test.clean_options(parse(["--ce_weight", "1", "--combine", "product"]))
    with pytest.raises(utils.FlagError, match="^--ce_weight applies only to"):
        run_test.check_protocol_flags(parse(["--protocol", "paper", "--ce_weight", "1"]))
    with pytest.raises(SystemExit):
        parse(["--ce_weight", "-0.5"])
    run_test.check_protocol_flags(parse(["--protocol", "paper", "--sigma", "2"]))
    with pytest.raises(utils.FlagError, match="^--default_mask_ratio applies only to"):
        run_test.check_protocol_flags(parse(["--protocol", "paper",
                                             "--default_mask_ratio", "0.3"]))


# ----------------------------------------------------------------------------- flags
def test_evaluation_flags_reach_their_consumers(tiny_world, tmp_path, monkeypatch):
    """One clean run with every clean-protocol flag away from its default, the test class
    chosen by --setting leave_one_out --unseen_classes, an unreadable test image left out
    (--skip_bad_images) and a ProtoFlow file without its encoder (--encoder_weights)."""
    import shutil

    from backbones import lite0_weights_path
    data = tmp_path / "mvtec"
    shutil.copytree(tiny_world.mvtec_root, data)
    bad = sorted((data / "coins" / "test" / "good").iterdir())[0]
    bad.write_bytes(b"not a png")
    no_encoder = tmp_path / "protoflow_no_encoder.pt"
    obj = torch.load(tiny_world.protoflow, map_location="cpu", weights_only=True)
    obj["classes"] = [c for c in obj["classes"] if c != "coins"]  # the flow never saw it
    torch.save({k: v for k, v in obj.items() if k != "encoder_state_dict"}, no_encoder)
    seen = []
    original = protocols.evaluate_clean

    def recording(model, data, **kwargs):
        seen.append(kwargs)
        return original(model, data, **kwargs)

    monkeypatch.setattr(run_test, "evaluate_clean", recording)
    argv = _argv(tiny_world, tmp_path, "clean", "--setting", "leave_one_out",
                      "--unseen_classes", "coins", "--clean_masks", "threshold",
                      "--unmasked", "zero", "--abnormality", "paper", "--combine", "product",
                      "--image_score", "topk", "--mask_ratio", "0.2", "--sigma", "2",
                      "--seed", "7", "--skip_bad_images", "--encoder_weights",
                      lite0_weights_path())
    argv[argv.index("--data_path") + 1] = str(data)
    argv[argv.index("--protoflow_weights") + 1] = str(no_encoder)
    with pytest.warns(UserWarning, match="(?s)left out 1 bad file.*000.png"):
        results = run_test.main(run_test.get_args_parser().parse_args(argv))
    assert list(results["classes"]) == ["coins"]  # the unseen class only
    record = results["classes"]["coins"]
    assert record["num_images"] == 7 and record["num_anomalous"] == 4
    (skipped,) = record["skipped_images"]  # said in results.json, for --resume_eval too
    assert skipped.startswith(f"cannot read image {bad}")
    table = (tmp_path / "clean" / "results.md").read_text()  # and in the table
    assert "\n| Coins (1 bad image(s) left out) | " in table
    from protoflow import THRESHOLD_QUANTILE  # of the world's normal scores [1, 2, 3]
    assert record["mask_ratio"] == 0.2
    assert record["threshold"] == pytest.approx(np.quantile([1.0, 2.0, 3.0], THRESHOLD_QUANTILE))
    assert record["clean_options"] == {"masks": "threshold", "unmasked": "zero",
                                       "abnormality": "paper", "combine": "product",
                                       "image_score": "topk", "ce_weight": None}
    assert "ce_only" not in record  # 'zero': no covering passes, no CE-alone row
    (kwargs,) = seen
    assert kwargs["sigma"] == 2.0 and kwargs["seed"] == 7 and kwargs["ratio"] == 0.2


def test_default_mask_ratio_reaches_the_clean_protocol(tiny_world, tmp_path, monkeypatch):
    """run_test.py's --default_mask_ratio masks a class the paper's Table 6 does not list
    (coins) in the clean protocol, and its record says so: the flag was checked and keyed
    for --resume_eval but could be lost on its way to the scoring."""
    ratios = []
    original = protocols.evaluate_clean

    def recording(model, data, **kwargs):
        ratios.append(kwargs["ratio"])
        return original(model, data, **kwargs)

    monkeypatch.setattr(run_test, "evaluate_clean", recording)
    results = run_test.main(_args(tiny_world, tmp_path, "clean", "--classes", "coins",
                                  "--default_mask_ratio", "0.2"))
    assert ratios == [0.2] and results["classes"]["coins"]["mask_ratio"] == 0.2


def test_a_mask_ratio_that_masks_no_patch_is_refused_before_any_class(tiny_world, tmp_path):
    """int(196 x 0.004) = 0: the clean protocol would have nothing to score. Refused
    before any image is read, with the least ratio that masks a patch; the paper
    protocol sweeps its own ratios and ignores the flag."""
    argv = _argv(tiny_world, tmp_path / "r", "clean", "--mask_ratio", "0.004")
    with pytest.raises(utils.FlagError, match=(
            r"^mask ratio 0.004 masks no patch of the model's 196 \(int\(196 x r\) = 0\): "
            r"pass --mask_ratio \(or --default_mask_ratio\) 0.0052 or more$")):
        run_test.main(run_test.get_args_parser().parse_args(argv))
    assert not (tmp_path / "r" / "clean" / "results.partial.jsonl").exists()
    args = SimpleNamespace(mask_ratio=None, default_mask_ratio=0.004)
    run_test.check_mask_ratios(args, ["screw"], 196)  # its Table 6 ratio, 0.04: 7 patches
    with pytest.raises(utils.FlagError, match="mask ratio 0.004 masks no patch"):
        run_test.check_mask_ratios(args, ["screw", "coins"], 196)
    run_test.check_mask_ratios(SimpleNamespace(mask_ratio=0.0052, default_mask_ratio=0.3),
                               ["coins"], 196)


def _models(vit_classes: list[str] | None, protoflow_classes: list[str] | None
            ) -> SimpleNamespace:
    """What check_unseen reads of scoring_models.Models: the classes each file trained on."""
    return SimpleNamespace(vit_classes=vit_classes,
                           protoflow=SimpleNamespace(classes=protoflow_classes))


def test_a_vit_or_protoflow_trained_on_an_unseen_class_is_refused(tiny_world, tmp_path,
                                                                  capsys):
    """A cross-class evaluation with a ViT checkpoint or a ProtoFlow that trained on the
    class it evaluates as unseen would leak it into the scores: refused, before any work,
    naming the file and the fix. A file that does not record its classes (a released
    one) is named as unchecked. The multi-class setting evaluates the classes it trained
    on, and --classes may pick a class the setting trains on."""
    argv = _argv(tiny_world, tmp_path / "loo", "clean", "--setting", "leave_one_out",
                      "--unseen_classes", "coins")
    with pytest.raises(utils.FlagError, match=(
            f"--protoflow_weights {tiny_world.protoflow} was trained on coins, which the "
            r"leave_one_out setting evaluates as unseen: train one on the seen classes \(`"
            "python run_protoflow.py train --setting leave_one_out")):
        run_test.main(run_test.get_args_parser().parse_args(argv))
    assert not (tmp_path / "loo" / "clean" / "results.partial.jsonl").exists()
    ckpt = torch.load(tiny_world.pmad_ckpt, weights_only=True)
    ckpt["args"] = {"setting": "multi_class", "train_classes": ["brick", "coins"]}
    vit = tmp_path / "multi_class.pth"
    torch.save(ckpt, vit)
    argv[argv.index("--ckpt") + 1] = str(vit)
    with pytest.raises(utils.FlagError, match=(
            f"--ckpt {vit} was trained on coins, which the leave_one_out setting evaluates "
            r"as unseen: train one on the seen classes \(`python run_pretraining.py "
            "--setting leave_one_out")):
        run_test.main(run_test.get_args_parser().parse_args(argv))
    args = SimpleNamespace(ckpt="x.pth", protoflow_weights="x.pt", unseen_classes=["coins"],
                           data_path=str(tiny_world.mvtec_root), tokenizer_model="dall-e")
    capsys.readouterr()
    run_test.check_unseen(args, "leave_one_out", ["coins"], _models(["brick"], ["brick"]))
    assert capsys.readouterr().out == ""
    vit_note = ("[run_test] --ckpt x.pth does not record its training classes (a released "
                "file, or one of an earlier version of run_pretraining.py): make sure it "
                "never saw coins\n")
    protoflow_note = ("[run_test] --protoflow_weights x.pt does not record its training "
                      "classes (a released file, or one of an earlier version of "
                      "run_protoflow.py): make sure it never saw coins\n")
    run_test.check_unseen(args, "leave_one_out", ["coins"], _models(None, ["brick"]))
    assert capsys.readouterr().out == vit_note
    run_test.check_unseen(args, "leave_one_out", ["coins"], _models(["brick"], None))
    assert capsys.readouterr().out == protoflow_note  # a released ProtoFlow file too
    run_test.check_unseen(args, "leave_one_out", ["coins"], _models(None, None))
    assert capsys.readouterr().out == vit_note + protoflow_note
    run_test.check_unseen(args, "multi_class", ["coins"], _models(["coins"], ["coins"]))
    assert capsys.readouterr().out == ""
    # --classes brick evaluates no unseen class: nothing of coins leaks, but the table is
    # not the setting's, and says so
    seen_note = ("[run_test] note: --classes brick: the leave_one_out setting trains on this "
                 "class, so the table scores it as seen: it is not a cross-class result\n")
    run_test.check_unseen(args, "leave_one_out", ["brick"], _models(["brick"], ["brick"]))
    assert capsys.readouterr().out == seen_note
    run_test.check_unseen(args, "leave_one_out", ["brick"], _models(["coins"], None))
    assert capsys.readouterr().out == seen_note
    run_test.check_unseen(args, "leave_one_out", ["brick", "coins"],
                          _models(["brick"], ["brick"]))
    assert capsys.readouterr().out == (
        "[run_test] note: --classes brick: the leave_one_out setting trains on this class, "
        "so the table scores it as seen, and its mean mixes seen and unseen classes\n")
    # a leave-one-out ViT scored in the multi-class setting: coins is scored as seen
    run_test.check_unseen(args, "multi_class", ["brick", "coins"], _models(["brick"], None))
    assert capsys.readouterr().out == (
        "[run_test] note: the multi_class setting scores coins as seen, but --ckpt x.pth "
        "trained on brick only: pass the --setting (and --unseen_classes) it was trained "
        "with to score it as unseen\n")
    run_test.check_unseen(args, "multi_class", ["brick", "coins"], _models(None, None))
    assert capsys.readouterr().out == ""  # a released file: nothing recorded to compare


def test_a_kmeans_tokenizer_fitted_on_an_unseen_class_is_refused(tiny_world, tmp_path,
                                                                  capsys):
    """A k-means tokenizer fitted on all classes carried the unseen one into a
    leave-one-out run with no word (its codes follow that class's normal images, and the
    ViT learnt them): its file records the classes it was fitted on, and one that holds
    an unseen class is refused; an earlier version's file, which does not say, is named."""
    import modeling_discrete_vae
    fitted = modeling_discrete_vae.fit_kmeans_on_folder(
        str(tiny_world.imagenet_root), ["brick"], str(tmp_path / "fitted.pth"), vocab_size=8)
    assert modeling_discrete_vae.kmeans_file_settings(fitted)["fit_classes"] == ["brick"]
    capsys.readouterr()
    obj = torch.load(tiny_world.tokenizer, weights_only=True)
    paths = {}
    for name, classes in (("all", ["brick", "coins"]), ("seen", ["brick"])):
        paths[name] = tmp_path / f"kmeans_{name}.pth"
        torch.save({**obj, "fit_classes": classes}, paths[name])
    args = SimpleNamespace(ckpt="x.pth", protoflow_weights="x.pt", unseen_classes=["coins"],
                           data_path=str(tiny_world.mvtec_root), tokenizer_model="kmeans",
                           tokenizer_weight_path=str(paths["all"]))
    with pytest.raises(utils.FlagError) as info:
        run_test.check_unseen(args, "leave_one_out", ["coins"], _models(["brick"], ["brick"]))
    assert str(info.value) == (
        f"--tokenizer_weight_path {paths['all']} was fitted on images of coins, which the "
        "leave_one_out setting evaluates as unseen, and so was the ViT trained with it: "
        "train one with a tokenizer fitted on the seen classes (`python run_pretraining.py "
        "--setting leave_one_out --fit_kmeans_tokenizer --tokenizer_weight_path NEW ...`) "
        "and pass both")
    args.tokenizer_weight_path = str(paths["seen"])
    run_test.check_unseen(args, "leave_one_out", ["coins"], _models(["brick"], ["brick"]))
    assert capsys.readouterr().out == ""
    args.tokenizer_weight_path = str(tiny_world.tokenizer)
    run_test.check_unseen(args, "leave_one_out", ["coins"], _models(["brick"], ["brick"]))
    assert capsys.readouterr().out == (
        f"[run_test] --tokenizer_weight_path {tiny_world.tokenizer} does not record the "
        "classes it was fitted on (an earlier version's file): make sure it never saw coins\n")
    # training refuses it too, before any image is read
    train_args = run_pretraining.get_args_parser().parse_args([
        "--data_path", str(tiny_world.imagenet_root), "--output_dir", str(tmp_path / "o"),
        "--setting", "leave_one_out", "--unseen_classes", "coins", "--tokenizer_model",
        "kmeans", "--tokenizer_weight_path", str(paths["all"]), "--batch_size", "2",
        "--token_cache_dir", str(tmp_path / "tokens")])
    with pytest.raises(utils.FlagError, match=(
            f"^{paths['all']} was fitted on images of coins, which the leave_one_out setting "
            "keeps unseen")):
        run_pretraining.check_inputs(train_args)
    # and, fitting, one fitted otherwise (the default --kmeans_vocab_size 1024)
    train_args.tokenizer_weight_path, train_args.fit_kmeans_tokenizer = str(paths["seen"]), True
    with pytest.raises(utils.FlagError, match=(
            f"fitted with --kmeans_vocab_size {KMEANS_VOCAB} \\(asked: --kmeans_vocab_size "
            "1024\\)")):
        run_pretraining.check_inputs(train_args)


@pytest.mark.parametrize("setting, leaked, seen", [("obj2tex", "carpet", "bottle"),
                                                   ("tex2obj", "screw", "wood")])
def test_object_texture_settings_refuse_a_file_trained_on_their_test_classes(
        tmp_path, setting, leaked, seen):
    """obj2tex evaluates MVTec AD's textures as unseen and tex2obj its objects: a flow or
    a ViT that trained on one of them is refused by name; one that trained on the
    setting's own training classes is what the setting needs."""
    for name in datasets.MVTEC_CLASSES:
        (tmp_path / name / "test" / "good").mkdir(parents=True)
    args = SimpleNamespace(ckpt="vit.pth", protoflow_weights="pf.pt", unseen_classes=None,
                           data_path=str(tmp_path), tokenizer_model="dall-e")
    test_classes = datasets.setting_classes(setting)[1]
    with pytest.raises(utils.FlagError, match=f"pf.pt was trained on {leaked}, which the "
                                              f"{setting} "):
        run_test.check_unseen(args, setting, test_classes, _models([seen], [seen, leaked]))
    with pytest.raises(utils.FlagError, match=f"vit.pth was trained on {leaked}, which the "
                                              f"{setting} "):
        run_test.check_unseen(args, setting, test_classes, _models([seen, leaked], [seen]))
    run_test.check_unseen(args, setting, test_classes, _models([seen], [seen]))


def test_from_obj_to_texture_selects_the_obj2tex_test_classes(tiny_world, tmp_path):
    """The original's switch is --setting obj2tex: MVTec AD's textures as test classes,
    which this two-class world does not have (a clear error naming the setting)."""
    with pytest.raises(ValueError, match="'obj2tex' splits MVTec AD"):
        run_test.main(_args(tiny_world, tmp_path, "clean", "--from_obj_to_texture"))
    with pytest.raises(ValueError, match="'tex2obj' splits MVTec AD"):
        run_test.main(_args(tiny_world, tmp_path, "clean", "--setting", "tex2obj"))


# ------------------------------------------------------------------- user errors, reports
def test_tokenizer_mistakes_are_one_error_line(tiny_world, tmp_path, capsys):
    """An unknown --tokenizer_model is an argparse error; a folder without encoder.pkl or
    a PMAD checkpoint given as the k-means tokenizer is one `error:` line naming the
    path, exit 2 (what run_test.py's __main__ runs)."""
    with pytest.raises(SystemExit) as exit_info:
        run_test.get_args_parser().parse_args(["--tokenizer_model", "foo"])
    assert exit_info.value.code == 2
    assert "argument --tokenizer_model: invalid choice: 'foo'" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    for model, path, message in (
            ("dall-e", empty, f"error: DALL-E encoder {empty / 'encoder.pkl'} not found"),
            ("kmeans", tiny_world.pmad_ckpt,
             f"error: {tiny_world.pmad_ckpt} is not a k-means tokenizer file")):
        args = _args(tiny_world, tmp_path, "clean", "--tokenizer_model", model,
                     "--tokenizer_weight_path", str(path))
        assert utils.cli(lambda: run_test.main(args)) == 2
        err = capsys.readouterr().err
        assert err.startswith(message) and err.count("\n") == 1 and "Traceback" not in err


def test_another_file_as_ckpt_is_named_not_the_tokenizer(tiny_world, tmp_path, capsys):
    """A ProtoFlow file given as --ckpt stores no training arguments, so the paper's
    tokenizer (DALL-E) was assumed and the error blamed the k-means tokenizer file: the
    checkpoint is now checked first, and the error names it."""
    args = _args(tiny_world, tmp_path, "clean", "--ckpt", str(tiny_world.protoflow))
    args.tokenizer_model = None  # as the command line leaves it: the checkpoint decides
    assert utils.cli(lambda: run_test.main(args)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tiny_world.protoflow} holds no state dict")
    assert "tokenizer" not in err


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_each_class_is_called_at_its_own_threshold(tiny_world, tmp_path, monkeypatch):
    """--clean_masks threshold calls each class at the quantile of its own held-out
    normal scores, not at the file's quantile over every class, and its heatmaps are
    captioned with the same threshold and each image's ProtoFlow score (image_scores.csv's
    protoflow_score), with the default proposal masks too."""
    pf = tiny_world.protoflow_with_class_scores(
        tmp_path / "pf.pt", {"brick": [1.0, 2.0, 3.0], "coins": [20.0, 30.0, 40.0]})
    assert torch.load(pf, weights_only=True)["image_score_threshold"] == pytest.approx(39.5)
    captioned = {}
    monkeypatch.setattr(run_test, "save_heatmaps", lambda data, maps, pf_maps, scores,
                        pf_scores, threshold, out_dir, *rest: captioned.update(
                            {out_dir.name: (threshold, pf_scores.tolist(), maps, pf_maps)}))
    results = run_test.main(_args(tiny_world, tmp_path, "clean", "--clean_masks", "threshold",
                                  "--save_heatmaps", "1", "--protoflow_weights", str(pf)))
    expected = {"brick": 2.98, "coins": 39.8}  # 0.99 quantiles of 1, 2, 3 and 20, 30, 40
    assert {c: r["threshold"] for c, r in results["classes"].items()} == pytest.approx(expected)
    assert {c: t for c, (t, *_) in captioned.items()} == pytest.approx(expected)
    for c, (_, pf_scores, maps, pf_maps) in captioned.items():
        images = results["classes"][c]["images"]
        assert pf_scores == [i["protoflow_score"] for i in images] != [i["pmad"] for i in images]
        # the panels: PMAD's maps and ProtoFlow's maps alone, whose image scores are the rows'
        assert protocols.image_scores(maps).tolist() == pytest.approx(
            [i["pmad"] for i in images])
        assert protocols.image_scores(pf_maps).tolist() == pytest.approx(
            [i["protoflow_only"] for i in images])
    captioned.clear()  # proposal masks: the record has no threshold, the captions still do
    results = run_test.main(_args(tiny_world, tmp_path / "proposal", "clean", "--save_heatmaps",
                                  "1", "--protoflow_weights", str(pf), "--classes", "coins"))
    assert results["classes"]["coins"]["threshold"] is None
    assert captioned["coins"][0] == pytest.approx(expected["coins"])


def test_the_resume_key_holds_every_setting_the_scores_depend_on():
    """--resume_eval reuses a class's record only when its key matches: --mask_ratio,
    --default_mask_ratio, --sigma, --seed, --skip_bad_images (which images a class has)
    and --protocol each change the scores, so each changes the key; --default_mask_ratio
    given at its default (0.3) and the batch, worker and device flags do not, and a
    finished class is not evaluated again for them."""
    parse = run_test.get_args_parser().parse_args
    results = {"setting": "multi_class", "clean_options": {"masks": "threshold"},
               "amp": "none", "checkpoints": {"pmad": "0" * 64}}

    def key(*flags: str) -> dict:
        return run_test.resume_key(parse(["--data_path", "data", *flags]), results)

    base = key()
    for flags in (["--mask_ratio", "0.2"], ["--default_mask_ratio", "0.2"], ["--sigma", "2"],
                  ["--seed", "1"], ["--skip_bad_images"], ["--protocol", "paper"]):
        assert key(*flags) != base, flags
    assert key("--default_mask_ratio", "0.3", "--batch_size", "3", "--num_workers", "1",
               "--device", "cpu") == base


@pytest.mark.filterwarnings("ignore::metrics.UndefinedMetricWarning")
def test_resume_eval_reuses_a_class_only_with_the_same_files_and_settings(tiny_world,
                                                                         tmp_path, capsys):
    """The resume key holds the model settings, --amp, the seed, the default mask ratio
    and every file by content (the class's prototypes too): copied prototypes are reused,
    other prototypes or another --amp, --seed or --default_mask_ratio are refused by
    name. The class has no ground_truth/ (pixel metrics nan; its masks lie in gt/, which
    is named), as a custom set: the records with nan are reused and results.json holds
    null. An evaluation afresh sets the last
    one's heatmaps aside (they mixed with its own); a resumed one keeps them, and says so
    where a reused class has none to keep."""
    data = tmp_path / "mvtec"
    shutil.copytree(tiny_world.mvtec_root / "coins", data / "coins")
    (data / "coins" / "ground_truth").rename(data / "coins" / "gt")  # never read
    argv = _argv(tiny_world, tmp_path, "clean", "--classes", "coins")
    argv[argv.index("--data_path") + 1] = str(data)
    parse = run_test.get_args_parser().parse_args
    out = tmp_path / "clean"
    pngs = out / "heatmaps" / "coins"
    pngs.mkdir(parents=True)
    (pngs / "stale.png").write_bytes(b"stale")
    first = run_test.main(parse(argv))["classes"]["coins"]
    (previous,) = out.glob("previous-*")
    assert [p.relative_to(previous).as_posix() for p in previous.rglob("*.*")] == [
        "heatmaps/coins/stale.png"]
    said = capsys.readouterr().out
    assert not pngs.exists() and "heatmaps moved to" in said
    assert (f"no {data}/coins/ground_truth folder: pixel metrics undefined ({data}/coins/gt "
            "is not read: rename it to ground_truth to score its masks)") in said
    pngs.mkdir(parents=True)
    (pngs / "kept.png").write_bytes(b"kept")
    (line,) = [json.loads(x) for x in (out / "results.partial.jsonl").read_text().splitlines()]
    coreset = tiny_world.prototypes_dir / "coins" / protoflow.CORESET_FILE
    assert line["key"]["prototypes"] == _sha256(coreset)
    assert (line["key"]["model"], line["key"]["input_size"], line["key"]["amp"]) == (
        tiny_world.model, 224, "none")
    assert line["key"]["tokenizer_model"] == "kmeans" and line["key"]["encoder"] is None
    assert line["key"]["pmad"] == _sha256(tiny_world.pmad_ckpt)
    assert line["key"]["tokenizer"] == _sha256(tiny_world.tokenizer)
    assert line["key"]["protoflow"] == _sha256(tiny_world.protoflow)
    assert math.isnan(first["pixel_auroc"]) and 0 <= first["image_auroc"] <= 1

    same = tmp_path / "same_prototypes"
    shutil.copytree(tiny_world.prototypes_dir, same)
    capsys.readouterr()
    again = run_test.main(parse(argv + ["--resume_eval", "--prototypes_dir", str(same)]))
    assert "coins: done in an earlier run" in capsys.readouterr().out
    assert again["classes"]["coins"]["image_auroc"] == first["image_auroc"]
    # results.md's provenance line says which records an earlier run made
    assert again["classes"]["coins"]["provenance"] == first["provenance"] != again[
        "provenance"]
    assert (out / "results.md").read_text().splitlines()[2].endswith(
        "; 1 class(es) reused from an earlier run (coins; each record's provenance is in "
        "results.json).")
    assert (pngs / "kept.png").read_bytes() == b"kept"
    shutil.rmtree(pngs)  # a reused class's heatmaps are not drawn again: said, not hidden
    run_test.main(parse(argv + ["--resume_eval", "--save_heatmaps", "1"]))
    assert ("coins: that run saved no heatmaps of it; evaluate it afresh (no --resume_eval) "
            "to draw them") in capsys.readouterr().out and not pngs.exists()
    run_test.main(parse(argv + ["--resume_eval"]))  # no heatmaps asked for: none missing
    assert "saved no heatmaps" not in capsys.readouterr().out
    saved = strict_json(out / "results.json")["classes"]["coins"]
    assert saved["pixel_auroc"] is None and saved["image_auroc"] == first["image_auroc"]

    other = tmp_path / "other_prototypes"
    shutil.copytree(tiny_world.prototypes_dir, other)
    np.save(other / "coins" / protoflow.CORESET_FILE, np.load(coreset)[:-1])
    meta = other / "coins" / protoflow.CORESET_META  # describes the new file, as a rebuild's
    meta.write_text(json.dumps({**json.loads(meta.read_text()), protoflow.CORESET_SHA256:
                                utils.file_sha256(other / "coins" / protoflow.CORESET_FILE)}))
    with pytest.raises(utils.FlagError, match=r"its record of coins differs in prototypes\)"):
        run_test.main(parse(argv + ["--resume_eval", "--prototypes_dir", str(other)]))
    for flag, value, key in (("--amp", "bf16", "amp"), ("--seed", "1", "seed"),
                             ("--default_mask_ratio", "0.25", "default_mask_ratio")):
        with pytest.raises(utils.FlagError, match=rf"differs in {key}\)"):
            run_test.main(parse(argv + ["--resume_eval", flag, value]))
    # the test set changed under its path: the record, of the old images, is not reused
    # (it kept their numbers and image_scores.csv rows); that class is evaluated again
    assert line["key"]["test_data"] == datasets.test_set_contents(str(data), "coins")[0]
    good = sorted((data / "coins" / "test" / "good").iterdir())
    defect = next(p for p in sorted((data / "coins" / "test").rglob("*.png"))
                  if p.parent.name != "good")
    shutil.copy(defect, good[0])
    capsys.readouterr()
    changed = run_test.main(parse(argv + ["--resume_eval"]))["classes"]["coins"]
    err = capsys.readouterr().err
    assert (f"[run_test] coins: its record in {out / 'results.partial.jsonl'} is of other "
            "test images or masks (or of an earlier version, which did not record them); "
            "evaluated again") in err
    name = "good_" + good[0].stem  # now a defective image: another ProtoFlow score
    assert ([r["protoflow_score"] for r in changed["images"] if r["name"] == name]
            != [r["protoflow_score"] for r in first["images"] if r["name"] == name])
    # each change counts: a file removed, a ground_truth folder made
    after_copy = datasets.test_set_contents(str(data), "coins")[0]
    good[1].unlink()
    after_removal = datasets.test_set_contents(str(data), "coins")[0]
    (data / "coins" / "ground_truth").mkdir()
    assert len({after_copy, after_removal,
                datasets.test_set_contents(str(data), "coins")[0]}) == 3
    (data / "coins" / "ground_truth").rmdir()
    good[2].chmod(0)  # unreadable (to a user who is not root): a marker, not a crash
    datasets.test_set_contents(str(data), "coins")[0]
    good[2].chmod(0o644)


def test_a_second_evaluation_in_the_same_output_dir_is_refused(tiny_world, tmp_path,
                                                               monkeypatch):
    """Two evaluations in one --output_dir mixed their records, heatmaps and tables (the
    second set the first's files aside while it ran): the second is refused naming the
    first, before anything there moves or any model loads; one that stops lets go."""
    out = tmp_path / "clean"
    out.mkdir()
    (out / "results.partial.jsonl").write_text("the first run's\n")
    monkeypatch.setattr(run_test, "load_models", lambda *a: pytest.fail("loaded"))
    with utils.RunLock(str(out), "--output_dir", utils.EVAL_LOCK):
        with pytest.raises(utils.UserError) as err:
            run_test.main(_args(tiny_world, tmp_path, "clean"))
    assert re.fullmatch(  # no word of torchrun: that is training's lock
        rf"--output_dir {re.escape(str(out))} is in use by another run \(pid {os.getpid()} "
        rf"on {re.escape(socket.gethostname())} since [\d: -]+ UTC\): wait for it to end or "
        r"stop it, or pass another --output_dir", str(err.value))
    assert os.listdir(out) == ["results.partial.jsonl"]

    def stop(*a):
        raise KeyError("stopped")

    monkeypatch.setattr(run_test, "load_models", stop)
    # the first stop let go of the folder: the same error again; a training's lock of
    # the folder (checkpoints, not results) does not stop an evaluation there
    with utils.RunLock(str(out), "--output_dir"):
        for _ in range(2):
            with pytest.raises(KeyError, match="stopped"):
                run_test.main(_args(tiny_world, tmp_path, "clean"))
    assert os.listdir(out) == ["results.partial.jsonl"]


def test_sigterm_in_a_class_keeps_the_classes_finished(tiny_world, tmp_path, monkeypatch):
    """SIGTERM (utils.Terminated: a cluster's preemption) stops an evaluation as Ctrl-C
    does: the classes finished are kept in the table and results.json, the class it
    stopped in is named with how it was stopped."""
    evaluate = run_test.evaluate_class

    def stopped_in_coins(args, m, options, root, out_dir, class_name):
        if class_name == "coins":
            raise utils.Terminated
        return evaluate(args, m, options, root, out_dir, class_name)
    monkeypatch.setattr(run_test, "evaluate_class", stopped_in_coins)
    results = run_test.main(_args(tiny_world, tmp_path, "clean"))
    assert list(results["classes"]) == ["brick"] and results["not_evaluated"] == []
    saved = strict_json(tmp_path / "clean" / "results.json")
    assert saved["failed"] == {"coins": "terminated (SIGTERM)"} and "brick" in saved["classes"]


def test_a_heatmap_that_cannot_be_written_costs_no_metrics(tiny_world, tmp_path,
                                                           monkeypatch, capsys):
    """A PNG name too long for the file system stopped the run after the class's metrics
    were computed, and they were lost: now the record is kept (partial file, results),
    the class is named as failed for its heatmaps, none of its heatmaps are left (some
    would pass for all), and --resume_eval reuses it and says it has none."""
    def fail(data, maps, pf_maps, scores, pf_scores, threshold, folder, *a):
        folder.mkdir(parents=True)
        (folder / "first.png").write_bytes(b"drawn")
        raise OSError(36, "File name too long")
    monkeypatch.setattr(run_test, "save_heatmaps", fail)
    argv = _argv(tiny_world, tmp_path, "clean", "--classes", "coins", "--save_heatmaps", "1")
    parse = run_test.get_args_parser().parse_args
    with pytest.raises(OSError, match="File name too long"):
        run_test.main(parse(argv))
    out = tmp_path / "clean"
    (line,) = [json.loads(x) for x in (out / "results.partial.jsonl").read_text().splitlines()]
    saved = strict_json(out / "results.json")
    assert line["class"] == "coins" and 0 <= saved["classes"]["coins"]["image_auroc"] <= 1
    assert saved["failed"] == {"coins": "its heatmaps: OSError: [Errno 36] File name too long"}
    assert saved["not_evaluated"] == []
    assert not (out / "heatmaps" / "coins").exists()  # none, not some: a resume says so
    capsys.readouterr()
    again = run_test.main(parse(argv + ["--resume_eval"]))
    assert ("coins: that run saved no heatmaps of it; evaluate it afresh (no --resume_eval) "
            "to draw them") in capsys.readouterr().out
    assert again["classes"]["coins"]["image_auroc"] == saved["classes"]["coins"]["image_auroc"]
    assert "failed" not in strict_json(out / "results.json")


def test_shell_scripts_build_the_run_test_commands(tmp_path):
    """scripts/test_multi_class.sh and test_cross_class.sh: one run_test.py call per
    protocol, each setting with its released checkpoint and ProtoFlow file (the folder
    weights/protoflow/ holds both released files, which run_test.py refused as
    ambiguous; textures -> objects has none, so PROTOFLOW_WEIGHTS is asked for up front),
    MODEL / TOKENIZER / TOKENIZER_WEIGHT_PATH passed only when set, extra arguments
    last."""
    from conftest import ROOT, arg, python_stub, run_command, stub_calls
    stub, log = python_stub(tmp_path)

    def calls(script: str, *extra: str, **env: str) -> list[list[str]]:
        log.unlink(missing_ok=True)
        clean_env = {k: v for k, v in os.environ.items() if k not in (
            "SETTING", "CKPT", "MODEL", "TOKENIZER", "PROTOCOLS", "FROM_OBJ_TO_TEXTURE",
            "OUTPUT_DIR", "DATA_PATH", "PROTOFLOW_WEIGHTS", "TOKENIZER_WEIGHT_PATH")}
        run = run_command(["bash", f"scripts/{script}", *extra, "--save_heatmaps", "4"],
                          cwd=ROOT, env={**clean_env, "PYTHON": str(stub), **env})
        assert run.returncode == 0, run.stderr
        return stub_calls(log)

    multi = calls("test_multi_class.sh")
    assert [c[0] for c in multi] == ["run_test.py"] * 2
    assert [arg(c, "--protocol")[0] for c in multi] == ["clean", "paper"]
    assert [arg(c, "--output_dir")[0] for c in multi] == [
        "output_dir/test_multi_class/clean", "output_dir/test_multi_class/paper"]
    for c in multi:
        assert arg(c, "--setting")[0] == "multi_class" and c[-2:] == ["--save_heatmaps", "4"]
        assert arg(c, "--ckpt")[0] == "weights/vit_base_16_checkpoint_962_955.pth"
        assert "--tokenizer_weight_path" not in c  # the checkpoint's, else weights/tokenizer
        assert arg(c, "--protoflow_weights")[0] == "weights/protoflow/weights_multi_class.pt"
        assert "--model" not in c and "--tokenizer_model" not in c  # the checkpoint's
    (vit,) = calls("test_multi_class.sh", TOKENIZER="vit_tokenizer", PROTOCOLS="paper",
                   TOKENIZER_WEIGHT_PATH="weights/tokenizer/vit_tokenizer.pth")
    assert arg(vit, "--tokenizer_model") == ["vit_tokenizer"]
    assert arg(vit, "--tokenizer_weight_path") == ["weights/tokenizer/vit_tokenizer.pth"]
    assert arg(vit, "--protocol") == ["paper"]
    tex2obj = calls("test_cross_class.sh", PROTOCOLS="clean", PROTOFLOW_WEIGHTS="pf.pt")[0]
    assert arg(tex2obj, "--setting")[0] == "tex2obj"
    assert arg(tex2obj, "--ckpt")[0] == "weights/checkpoint_844_894.pth"
    assert arg(tex2obj, "--protoflow_weights")[0] == "pf.pt"
    obj2tex = calls("test_cross_class.sh", PROTOCOLS="clean", FROM_OBJ_TO_TEXTURE="1")[0]
    assert arg(obj2tex, "--setting")[0] == "obj2tex"
    assert arg(obj2tex, "--ckpt")[0] == "weights/checkpoint_976_931.pth"
    assert arg(obj2tex, "--protoflow_weights")[0] == "weights/protoflow/weights_texture.pt"
    assert arg(obj2tex, "--output_dir")[0] == "output_dir/test_obj2tex/clean"
    # the original switch, as train_cross_class.sh takes it: the same run (it said
    # textures -> objects has no released ProtoFlow file)
    switch = calls("test_cross_class.sh", "--from_obj_to_texture", PROTOCOLS="clean")[0]
    assert {k: arg(switch, k) for k in ("--setting", "--ckpt", "--protoflow_weights")} == {
        "--setting": ["obj2tex"], "--ckpt": ["weights/checkpoint_976_931.pth"],
        "--protoflow_weights": ["weights/protoflow/weights_texture.pt"]}
    assert "--from_obj_to_texture" in switch
    parsed = run_test.get_args_parser().parse_args(switch[1:])
    assert datasets.resolve_setting(parsed.setting, parsed.from_obj_to_texture) == "obj2tex"
    run = run_command(["bash", "scripts/test_multi_class.sh", "--from_obj_to_texture"],
                      cwd=ROOT, env={**os.environ, "PYTHON": str(stub)})
    assert run.returncode == 2 and run.stderr.startswith(
        "error: --from_obj_to_texture selects objects -> textures, not SETTING=multi_class: "
        "run bash scripts/test_cross_class.sh --from_obj_to_texture")
    off = calls("test_cross_class.sh", PROTOCOLS="clean", FROM_OBJ_TO_TEXTURE="Off",
                PROTOFLOW_WEIGHTS="pf.pt")[0]
    assert arg(off, "--setting")[0] == "tex2obj"  # not any non-empty word: on
    log.unlink(missing_ok=True)
    run = run_command(["bash", "scripts/test_cross_class.sh"], cwd=ROOT,
                      env={**{k: v for k, v in os.environ.items() if k != "PROTOFLOW_WEIGHTS"},
                           "PYTHON": str(stub)})
    assert run.returncode == 2 and not log.exists()
    assert run.stderr.startswith("error: SETTING=tex2obj has no released ProtoFlow file")
    assert "pass PROTOFLOW_WEIGHTS=FILE" in run.stderr
    run = run_command(["bash", "scripts/test_cross_class.sh"], cwd=ROOT,
                      env={**os.environ, "PYTHON": str(stub), "FROM_OBJ_TO_TEXTURE": "2"})
    assert run.returncode == 2
    assert run.stderr.startswith("error: FROM_OBJ_TO_TEXTURE=2: give 1 (objects -> textures) "
                                 "or 0")


def test_the_original_test_scripts_checkpoint_flag():
    """The original test_multi_class.py names the checkpoint --model_path."""
    parse = run_test.get_args_parser().parse_args
    assert parse(["--model_path", "w/a.pth"]).ckpt == "w/a.pth"
    assert parse(["--ckpt", "w/b.pth"]).ckpt == "w/b.pth"
    assert parse([]).ckpt == "weights/vit_base_16_checkpoint_962_955.pth"
