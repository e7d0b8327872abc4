"""predict.py: scores equal the clean protocol's, outputs, inputs, bad images."""
from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import datasets
import masking_generator
import predict
import protocols
import protoflow
import run_test
import utils


def _rows(out: Path) -> list[dict[str, str]]:
    with open(out / "predictions.csv", newline="") as f:
        return list(csv.DictReader(f))


def _clean_protocol_scores(world, class_name: str, *extra: str) -> dict[str, tuple]:
    """What run_test.py's clean protocol computes for each test image of the class:
    name -> (PMAD score, ProtoFlow score, PMAD map)."""
    args = run_test.get_args_parser().parse_args(world.model_argv() + list(extra))
    m = run_test.load_models(args)
    dataset = datasets.MVTecTestDataset(world.mvtec_root, class_name,
                                        token_size=m.tokenizer.image_size,
                                        img_size=m.img_size, mean=m.mean, std=m.std)
    data = protocols.collect_class(dataset, m.tokenizer, m.protoflow, class_name, 8, m.device)
    ratio = masking_generator.class_mask_ratio(class_name, args.mask_ratio,
                                               args.default_mask_ratio)
    s = protocols.clean_scores(m.model, data, ratio=ratio,
                              threshold=m.protoflow.threshold_for(class_name),
                              options=run_test.clean_options(args), sigma=args.sigma,
                              batch_size=8, device=m.device, amp=m.amp, seed=args.seed)
    return {n: (float(s.image_scores[i]), float(s.protoflow_scores[i]), s.maps[i])
            for i, n in enumerate(data.names)}


def test_predict_reproduces_the_clean_protocol(tiny_world, tmp_path, monkeypatch, capsys):
    """The demo's test images of a class, given together, score as in run_test.py's clean
    protocol; the CSV, one heatmap PNG per image and the raw maps are written (the
    decision named as ProtoFlow's: PMAD's score has no threshold). The
    baselines' maps, which predict.py does not report, are not computed (they held as
    much memory again as the images)."""
    monkeypatch.setattr(protocols, "baseline_maps", lambda *a: pytest.fail("baselines"))
    out = tmp_path / "pred"
    pattern = str(tiny_world.mvtec_root / "coins" / "test" / "*" / "*.png")
    assert predict.main([pattern, "--class_name", "coins", "--output_dir", str(out),
                         "--maps", "--save_npy", *tiny_world.model_argv()]) == 0
    said = capsys.readouterr().out
    rows = _rows(out)
    expected = _clean_protocol_scores(tiny_world, "coins")
    assert sorted(r["name"] for r in rows) == sorted(expected) and len(rows) == 8
    threshold = float(torch.load(tiny_world.protoflow, weights_only=True)[
        "image_score_threshold"])
    for r in rows:
        pmad, protoflow, score_map = expected[r["name"]]
        assert r["class"] == "coins" and Path(r["image"]).is_file()
        assert float(r["pmad_score"]) == pytest.approx(pmad, abs=1e-5)
        assert float(r["protoflow_score"]) == pytest.approx(protoflow, abs=1e-5)
        assert float(r["threshold"]) == pytest.approx(threshold)
        assert r["protoflow_decision"] == ("anomalous" if protoflow > threshold else
                                           "normal")
        assert r["scored_with"] == "8"  # the class's images scored together
        saved = np.load(out / "maps" / "coins" / f"{r['name']}.npy")
        assert saved.dtype == np.float32 and saved.shape == (224, 224)
        np.testing.assert_allclose(saved, score_map.numpy(), atol=1e-5)
        with Image.open(out / "heatmaps" / "coins" / f"{r['name']}.png") as png:
            assert png.width > 2 * 224 and png.height > 224  # image | overlay + bar, caption
    called = sum(r["protoflow_decision"] == "anomalous" for r in rows)  # ProtoFlow's call
    assert f"[predict] coins: 8 images, {called} anomalous by ProtoFlow's score at its " \
           "threshold\n" in said
    # the same rows for programs, with the run's flags, files and per-class summary
    record = json.loads((out / "predictions.json").read_text())
    assert record["classes"] == {"coins": {"images": 8, "threshold": pytest.approx(threshold),
                                           "protoflow_anomalous": called}}
    assert [(r["name"], r["pmad_score"], r["protoflow_decision"]) for r in record["images"]] \
        == [(r["name"], pytest.approx(float(r["pmad_score"])), r["protoflow_decision"])
            for r in rows]
    assert record["flags"]["class_name"] == "coins" and record["skipped_images"] == []
    assert record["files"]["ckpt"] == str(tiny_world.pmad_ckpt)
    assert f"predictions: {out / 'predictions.csv'}, {out / 'predictions.json'}" in said


def test_each_class_gets_its_own_threshold_and_table_6_mask_ratio(tiny_world, tmp_path,
                                                                capsys):
    """A class of the paper's Table 6 (wood: 0.46, no other class's) is masked at its
    ratio, another (coins) at --default_mask_ratio's, and --mask_ratio masks both at its
    own; each is called at the quantile of its own held-out normal scores, not at the
    file's quantile over every class (39.5)."""
    protos, inbox = tmp_path / "prototypes", tmp_path / "inbox"
    for cls, src in (("wood", "brick"), ("coins", "coins")):
        shutil.copytree(tiny_world.prototypes_dir / src, protos / cls)
        shutil.copytree(tiny_world.mvtec_root / src / "test" / "good", inbox / cls)
    pf = tiny_world.protoflow_with_class_scores(
        tmp_path / "pf.pt", {"wood": [1.0, 2.0, 3.0], "coins": [20.0, 30.0, 40.0]})

    def predictions(out: Path, *extra: str) -> dict[tuple[str, str], dict[str, str]]:
        assert predict.main([str(inbox), "--class_from_folder", "--output_dir", str(out),
                             *tiny_world.model_argv(), "--protoflow_weights", str(pf),
                             "--prototypes_dir", str(protos), *extra]) == 0
        return {(r["class"], r["name"]): r for r in _rows(out)}

    capsys.readouterr()
    rows = predictions(tmp_path / "own")
    assert {c: float(r["threshold"]) for (c, _), r in rows.items()} == pytest.approx(
        {"wood": 2.98, "coins": 39.8})
    # each class's summary counts the images ProtoFlow calls anomalous, not those with a
    # decision: here wood's are all above its threshold and coins' all below
    called = {c: sum(r["protoflow_decision"] == "anomalous" for (k, _), r in rows.items()
                     if k == c) for c in ("wood", "coins")}
    assert called == {"wood": 4, "coins": 0}
    said = capsys.readouterr().out
    for c in ("coins", "wood"):
        assert (f"[predict] {c}: 4 images, {called[c]} anomalous by ProtoFlow's score at "
                "its threshold\n") in said
    assert len(rows) == 8
    for ratio, unchanged in (("0.46", "wood"), ("0.3", "coins")):
        forced = predictions(tmp_path / f"at_{ratio}", "--mask_ratio", ratio)
        assert forced.keys() == rows.keys()
        for key, row in rows.items():
            same = float(forced[key]["pmad_score"]) == pytest.approx(
                float(row["pmad_score"]), abs=1e-6)
            assert same == (key[0] == unchanged), (ratio, key)


def test_every_class_s_prototypes_are_checked_and_dropped_before_scoring(tiny_world, tmp_path,
                                                                          monkeypatch, capsys):
    """A class without prototypes fails before any image is scored, and the check leaves
    no class's prototypes held in memory (they load one class at a time as it is
    scored): ProtoFlow.check_prototypes, as run_test.py."""
    protos, inbox = tmp_path / "prototypes", tmp_path / "inbox"
    shutil.copytree(tiny_world.prototypes_dir / "coins", protos / "coins")
    for cls in ("coins", "zzz"):
        shutil.copytree(tiny_world.mvtec_root / "coins" / "test" / "good", inbox / cls)
    monkeypatch.setattr(predict, "_score_into", lambda *a: pytest.fail("scored"))
    argv = [str(inbox), "--class_from_folder", "--output_dir", str(tmp_path / "out"),
            *tiny_world.model_argv(), "--prototypes_dir", str(protos)]
    assert predict.main(argv) == 2
    assert capsys.readouterr().err.startswith("error: no prototypes for class 'zzz'")
    held = {}
    original = protoflow.ProtoFlow.check_prototypes

    def recording(self, classes):
        original(self, classes)
        held.update(checked=list(classes), kept=dict(self._prototypes))
        raise KeyboardInterrupt  # stop here: what was checked and kept is known

    monkeypatch.setattr(protoflow.ProtoFlow, "check_prototypes", recording)
    shutil.rmtree(inbox / "zzz")
    assert predict.main(argv) == 130  # as Ctrl-C
    assert held == {"checked": ["coins"], "kept": {}}


def test_a_class_name_typed_in_another_unicode_form_is_its_prototypes_folder(
        tiny_world, tmp_path, monkeypatch):
    """--class_name typed composed (NFC) scores with the prototypes of a folder stored
    decomposed (NFD, as macOS writes it): datasets.as_found, not 'no prototypes'."""
    import unicodedata
    nfd, nfc = (unicodedata.normalize(form, "s\u010drew") for form in ("NFD", "NFC"))
    protos = tmp_path / "prototypes"
    shutil.copytree(tiny_world.prototypes_dir / "coins", protos / nfd)
    checked = []
    monkeypatch.setattr(protoflow.ProtoFlow, "check_prototypes",
                        lambda self, classes: checked.extend(classes))
    monkeypatch.setattr(predict, "_score_into", lambda *a: pytest.fail("scored"))
    for typed in (nfc, nfc + "/"):  # and as a shell completes a folder's name
        with pytest.raises(pytest.fail.Exception, match="scored"):
            predict.predict(predict.get_args_parser().parse_args(
                [str(tiny_world.mvtec_root / "coins" / "test" / "good"), "--class_name",
                 typed, "--output_dir", str(tmp_path / "out"), *tiny_world.model_argv(),
                 "--prototypes_dir", str(protos)]))
    assert checked == [nfd, nfd]


def test_a_class_name_is_its_prototypes_folders_name(tmp_path, capsys):
    """The class's name picks its threshold, Table 6 mask ratio and CSV row, while a file
    system may find its prototypes by another spelling: 'bottle/' (a shell's completion)
    or 'Bottle' (macOS, Windows) scored with bottle's prototypes but the pooled threshold
    and the default ratio, unsaid. Now each is scored as 'bottle'; a path is refused."""
    assert predict.check_class_name("bottle/") == "bottle"
    with pytest.raises(utils.FlagError, match="^--class_name is empty"):
        predict.check_class_name("")
    for path in ("a/b", "/", "../bottle", ".", "..", "../"):
        with pytest.raises(utils.FlagError, match=f"^--class_name '{re.escape(path)}' is a "
                                                  "path: pass the class's name"):
            predict.check_class_name(path)
    protos = tmp_path / "prototypes"
    (protos / "bottle").mkdir(parents=True)
    (protos / "Screw").mkdir()
    groups = {"Bottle": [("x/1.png", "1")], "bottle": [("y/1.png", "1")],
              "screw": [("z/2.png", "2")], "zipper": [("w/3.png", "3")]}
    assert predict.as_prototyped(groups, str(protos)) == {
        "bottle": [("x/1.png", "1"), ("y/1.png", "1_2")],  # joined, names kept unique
        "Screw": [("z/2.png", "2")], "zipper": [("w/3.png", "3")]}  # no folder: as given
    err = capsys.readouterr().err
    assert (f"[predict] class 'Bottle': scored as 'bottle', the name of its prototypes "
            f"folder in {protos}\n") in err
    assert "class 'screw': scored as 'Screw'" in err and "zipper" not in err
    assert predict.as_prototyped(groups, str(tmp_path / "none")) == groups


def test_a_class_name_is_renamed_only_to_the_one_folder_it_can_mean(tmp_path, capsys):
    """as_prototyped: a name that differs from a folder's in Unicode form alone is that
    folder, silently (README: a note where the case differs); one that differs in case
    and form both is that folder, with the note; one that two folders match but for case
    (a case-sensitive file system) is kept as given: picking either would score the class
    with an arbitrary folder's prototypes, threshold and mask ratio."""
    import unicodedata
    nfc, nfd = (unicodedata.normalize(form, "s\u010drew") for form in ("NFC", "NFD"))
    upper_nfc, upper_nfd = (unicodedata.normalize(form, "Gr\u00fcn") for form in ("NFC", "NFD"))
    protos = tmp_path / "prototypes"
    for folder in (nfd, upper_nfd, "Tile", "TILE"):
        (protos / folder).mkdir(parents=True)
    lower_nfc = upper_nfc.lower()
    groups = {nfc: [("a/1.png", "1")], lower_nfc: [("b/1.png", "1")],
              "tile": [("c/1.png", "1")]}
    assert predict.as_prototyped(groups, str(protos)) == {
        nfd: [("a/1.png", "1")], upper_nfd: [("b/1.png", "1")], "tile": [("c/1.png", "1")]}
    err = capsys.readouterr().err
    assert err == (f"[predict] class '{lower_nfc}': scored as '{upper_nfd}', the name of its "
                   f"prototypes folder in {protos}\n")


def test_default_mask_ratio_masks_a_class_outside_table_6(tiny_world, tmp_path):
    """predict.py's --default_mask_ratio is the ratio of a class the paper's Table 6 does
    not list (coins): its images score as at --mask_ratio of that value, not at the 0.3
    default's (the flag was accepted and could be lost on its way to the scoring)."""
    images = str(tiny_world.mvtec_root / "coins" / "test" / "good")

    def scores(out: str, *extra: str) -> dict[str, float]:
        assert predict.main([images, "--class_name", "coins", "--output_dir",
                             str(tmp_path / out), *tiny_world.model_argv(), *extra]) == 0
        return {r["name"]: float(r["pmad_score"]) for r in _rows(tmp_path / out)}

    given = scores("default", "--default_mask_ratio", "0.46")
    assert len(given) == 4
    assert given == pytest.approx(scores("forced", "--mask_ratio", "0.46"), abs=1e-6)
    assert given != pytest.approx(scores("own"), abs=1e-6)  # 0.46 is not 0.3's scores


def test_a_second_run_in_the_same_output_dir_is_refused(tiny_world, tmp_path, monkeypatch,
                                                       capsys):
    """Two runs in one --output_dir each set the other's outputs aside and put theirs in
    place: the second is refused naming the first (run_test.py's evaluation too, which
    shares the lock), before it reads the folder or loads a model."""
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setattr(run_test, "load_models", lambda *a: pytest.fail("loaded"))
    argv = [str(tiny_world.mvtec_root / "coins" / "test" / "good"), "--class_name", "coins",
            "--output_dir", str(out), *tiny_world.model_argv()]
    with utils.RunLock(str(out), "--output_dir", utils.EVAL_LOCK):
        (out / "heatmaps").mkdir()  # another run's outputs half in place: the lock first
        assert predict.main(argv) == 2
    assert capsys.readouterr().err.startswith(
        f"error: --output_dir {out} is in use by another run (pid ")
    assert [p.name for p in out.iterdir()] == ["heatmaps"]


def test_random_masks_follow_the_image_not_the_batch(tiny_world):
    """--clean_masks threshold with a threshold that calls every image normal: every image
    gets a random mask, seeded from its own bytes, so the same image gets the same mask
    in another order and another batch."""
    args = run_test.get_args_parser().parse_args(tiny_world.model_argv()
                                                 + ["--clean_masks", "threshold"])
    m = run_test.load_models(args)
    files = sorted((tiny_world.mvtec_root / "coins" / "test").glob("*/*.png"))[:3]

    def masks_of(paths: list[Path]) -> dict[str, torch.Tensor]:
        ds = datasets.ImageListDataset([str(p) for p in paths],
                                       [f"{p.parent.name}_{p.stem}" for p in paths],
                                       token_size=m.tokenizer.image_size, mean=m.mean,
                                       std=m.std)
        data = protocols.collect_class(ds, m.tokenizer, m.protoflow, "coins", 2, m.device)
        s = protocols.clean_scores(m.model, data, ratio=0.3, threshold=1e9,
                                  options=run_test.clean_options(args), sigma=4.0,
                                  batch_size=2, device=m.device, amp=m.amp, seed=0)
        assert not s.proposal.any() and not s.anomalous.any()
        return dict(zip(data.names, s.test_masks))

    forward, backward = masks_of(files), masks_of(files[::-1])
    assert forward.keys() == backward.keys()
    for name in forward:
        assert torch.equal(forward[name], backward[name])
    first, second = list(forward.values())[:2]
    assert not torch.equal(first, second)  # each image its own draw


def test_class_from_folder_and_bad_images(tiny_world, tmp_path, capsys):
    inbox = tmp_path / "inbox"
    for cls in ("brick", "coins"):
        for src in sorted((tiny_world.mvtec_root / cls / "test" / "good").glob("*.png"))[:2]:
            (inbox / cls).mkdir(parents=True, exist_ok=True)
            shutil.copy(src, inbox / cls / src.name)
    (inbox / "coins" / "+broken.png").write_bytes(b"not a png")  # first of its class
    out = tmp_path / "out"
    argv = [str(inbox), "--class_from_folder", "--output_dir", str(out),
            *tiny_world.model_argv()]
    assert predict.main(argv) == 2
    assert f"cannot read image {inbox / 'coins' / '+broken.png'}" in capsys.readouterr().err
    with pytest.warns(UserWarning, match="left out 1 bad file"):
        assert predict.main(argv + ["--skip_bad_images"]) == 0
    rows = _rows(out)
    assert sorted((r["class"], r["name"]) for r in rows) == [
        ("brick", "000"), ("brick", "001"), ("coins", "000"), ("coins", "001")]
    # each row names its own image, the bad file before it left out
    assert [r["image"] for r in rows] == [str(inbox / r["class"] / f"{r['name']}.png")
                                          for r in rows]
    assert "broken.png" in (out / "skipped_images.txt").read_text()
    assert (f"[predict] left out 1 image(s) it could not score, each listed with its reason "
            f"in {out / 'skipped_images.txt'}\n") in capsys.readouterr().out
    # an image's link to nothing: refused by name, or with --skip_bad_images listed
    gone = inbox / "brick" / "+gone.png"
    gone.symlink_to(tmp_path / "gone.png")
    linked = argv[:argv.index(str(out))] + [str(tmp_path / "linked")] \
        + argv[argv.index(str(out)) + 1:]
    assert predict.main(linked) == 2
    assert f"{gone} is a link to {tmp_path / 'gone.png'}" in capsys.readouterr().err
    with pytest.warns(UserWarning, match="left out 1 bad file") as caught:
        assert predict.main(linked + ["--skip_bad_images"]) == 0
    assert len(caught) == 2 and len(_rows(tmp_path / "linked")) == 4  # one per class
    skipped = (tmp_path / "linked" / "skipped_images.txt").read_text()
    assert f"{gone} is a link to {tmp_path / 'gone.png'}" in skipped and "broken.png" in skipped
    gone.unlink()
    (inbox / "stray.png").write_bytes(b"")
    assert predict.main(argv) == 2
    assert "lies directly in" in capsys.readouterr().err
    # fixed: a clean run leaves no list of the earlier run's skipped images behind; a
    # staging folder a dead run of this same pid left (containers reuse pids) is replaced
    (inbox / "stray.png").unlink()
    (inbox / "coins" / "+broken.png").unlink()
    stale = Path(utils.tmp_name(str(out / "predict")))
    (stale / "heatmaps").mkdir(parents=True)
    assert predict.main(argv) == 0
    assert not stale.exists()
    assert not (out / "skipped_images.txt").exists() and len(_rows(out)) == 4
    # the earlier run's list and predictions are set aside, not deleted nor mixed in
    (previous,) = out.glob("previous-*")
    assert "broken.png" in (previous / "skipped_images.txt").read_text()
    assert "no decision" not in capsys.readouterr().out
    # a run that fails leaves the last good outputs where they were, and no staging
    good = (out / "predictions.csv").read_text()
    (inbox / "coins" / "zz_broken.png").write_bytes(b"not a png")
    assert predict.main(argv) == 2
    assert (out / "predictions.csv").read_text() == good
    assert sorted(p.name for p in out.iterdir()) == ["predictions.csv", "predictions.json",
                                                     previous.name]


def test_a_class_of_no_readable_image_is_left_out_and_the_others_kept(tiny_world, tmp_path,
                                                                      capsys):
    """--class_from_folder --skip_bad_images with one class of no readable image scored
    brick, then stopped (`none of the 1 images is readable`, exit 2, no output). Now that
    class is named on stderr and its files listed in skipped_images.txt, the others are
    kept (exit 0, as for any skipped image); without the flag the error names the class
    and the file."""
    inbox = tmp_path / "inbox"
    (inbox / "brick").mkdir(parents=True)
    for src in sorted((tiny_world.mvtec_root / "brick" / "test" / "good").glob("*.png"))[:2]:
        shutil.copy(src, inbox / "brick" / src.name)
    (inbox / "coins").mkdir()
    bad = inbox / "coins" / "000.png"
    bad.write_bytes(b"not a png")
    out = tmp_path / "out"
    argv = [str(inbox), "--class_from_folder", "--output_dir", str(out),
            *tiny_world.model_argv()]
    assert predict.main(argv) == 2
    assert f"error: images of class 'coins': cannot read image {bad}: " in capsys.readouterr().err
    with pytest.warns(UserWarning, match="images of class 'coins': left out 1 bad file"):
        assert predict.main(argv + ["--skip_bad_images"]) == 0
    assert sorted((r["class"], r["name"]) for r in _rows(out)) == [("brick", "000"),
                                                                   ("brick", "001")]
    assert f"cannot read image {bad}" in (out / "skipped_images.txt").read_text()
    captured = capsys.readouterr()
    assert ("[predict] coins: none of its 1 image(s) is readable: class left out (its files "
            "are named in the warning above)\n") in captured.err
    assert "[predict] brick: 2 images" in captured.out and "coins:" not in captured.out
    # load_models' notes carry predict's tag, not run_test's
    assert "[run_test]" not in captured.out
    assert f"[predict] {tiny_world.pmad_ckpt} stores no training arguments" in captured.out
    shutil.rmtree(inbox / "brick")
    with pytest.warns(UserWarning):
        assert predict.main(argv + ["--skip_bad_images"]) == 2
    assert "error: no class has a readable image (coins; " in capsys.readouterr().err


def test_inputs_are_checked(tmp_path, capsys):
    with pytest.raises(predict.InputError, match="does not exist"):
        predict.find_images([str(tmp_path / "nothing")], "x", False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(predict.InputError, match="no images"):
        predict.find_images([str(tmp_path / "empty")], "x", False)
    for rel in ("a/1.png", "b/1.png", "b/c/2.JPG"):
        (tmp_path / "imgs" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "imgs" / rel).write_bytes(b"")
    groups = predict.find_images([str(tmp_path / "imgs"), str(tmp_path / "imgs" / "a" / "1.png")],
                                 "x", False)
    assert [n for _, n in groups["x"]] == ["a_1", "b_1", "b_c_2"]  # the file given twice: once
    assert capsys.readouterr().err == (
        "[predict] 1 image(s) reached a second time (a link or hard link, or inputs that "
        f"overlap) are scored once in their class:\n  {tmp_path / 'imgs' / 'a' / '1.png'}\n")
    groups = predict.find_images([str(tmp_path / "imgs" / "*" / "1.png"),
                                  str(tmp_path / "imgs" / "b" / "1.png")], "x", False)
    assert [n for _, n in groups["x"]] == ["a_1", "b_1"]
    assert "scored once" in capsys.readouterr().err
    # a hard link is the same file (as another case of its name on macOS): scored once
    (tmp_path / "imgs" / "b" / "c" / "3.png").hardlink_to(tmp_path / "imgs" / "a" / "1.png")
    groups = predict.find_images([str(tmp_path / "imgs")], "x", False)
    assert [n for _, n in groups["x"]] == ["a_1", "b_1", "b_c_2"]
    assert f"scored once in their class:\n  {tmp_path / 'imgs' / 'b' / 'c' / '3.png'}\n" \
        in capsys.readouterr().err


def test_a_file_linked_into_two_class_folders_is_scored_in_both(tmp_path, capsys):
    """It was scored in the first class the walk reached only: the other class lost the
    image (and, holding no other, vanished from predictions.csv) with no word."""
    _touch(tmp_path, "in/coins/1.png", "in/brick/2.png")
    (tmp_path / "in" / "brick" / "1.png").symlink_to(tmp_path / "in" / "coins" / "1.png")
    (tmp_path / "in" / "tiles").mkdir()
    (tmp_path / "in" / "tiles" / "1.png").symlink_to(tmp_path / "in" / "coins" / "1.png")
    groups = predict.find_images([str(tmp_path / "in")], None, True)
    assert groups == {
        "brick": [(str(tmp_path / "in" / "brick" / "1.png"), "1"),
                  (str(tmp_path / "in" / "brick" / "2.png"), "2")],
        "coins": [(str(tmp_path / "in" / "coins" / "1.png"), "1")],
        "tiles": [(str(tmp_path / "in" / "tiles" / "1.png"), "1")]}
    assert capsys.readouterr().err == ""
    assert predict._glob_base("data/x/*/y/*.png") == str(Path("data/x"))


def _touch(base: Path, *rels: str) -> None:
    for rel in rels:
        (base / rel).parent.mkdir(parents=True, exist_ok=True)
        (base / rel).write_bytes(b"")


def test_folder_walk_follows_symlinked_folders(tmp_path):
    """A class folder linked into a folder input is scored (Path.rglob skipped it on
    Python 3.11, dropping the class with exit 0), and a link back up ends the walk."""
    _touch(tmp_path, "store/coins/1.png", "store/coins/2.png", "byclass/brick/a.png")
    byclass = tmp_path / "byclass"
    (byclass / "coins").symlink_to(tmp_path / "store" / "coins", target_is_directory=True)
    (byclass / "brick" / "loop").symlink_to(byclass, target_is_directory=True)
    # a link to a folder of the input itself: the folder keeps its own name; a link to
    # a hidden one (not walked) is how that class is reached
    (byclass / "a_latest").symlink_to(byclass / "brick", target_is_directory=True)
    _touch(byclass, ".versions/tiles_v3/t.png")
    (byclass / "tiles").symlink_to(byclass / ".versions" / "tiles_v3",
                                   target_is_directory=True)
    assert predict.find_images([str(byclass)], None, True) == {
        "brick": [(str(byclass / "brick" / "a.png"), "a")],
        "coins": [(str(byclass / "coins" / "1.png"), "1"),
                  (str(byclass / "coins" / "2.png"), "2")],
        "tiles": [(str(byclass / "tiles" / "t.png"), "t")]}


def test_an_image_link_to_a_missing_file_is_an_error_in_a_folder_or_a_glob(tmp_path, capsys):
    """os.walk lists a link whose target is gone among the files, but isfile is False
    for it: the image (or a whole class folder linked in) was dropped with exit 0. Now an
    InputError names the link and its target, from a folder input and from a glob alike;
    a hidden one (an editor's lock file) is no input, and with --skip_bad_images one that
    is no image is named on stderr and left out."""
    _touch(tmp_path, "imgs/a/1.png")
    link = tmp_path / "imgs" / "a" / "2.png"
    link.symlink_to(tmp_path / "gone" / "2.png")
    expected = (f"1 link(s) lead nowhere:\n  {link} is a link to {tmp_path}/gone/2.png, "
                "which does not exist\nFix: restore each link's target, or delete the link")
    for spec in (str(tmp_path / "imgs"), str(tmp_path / "imgs" / "a" / "*.png")):
        with pytest.raises(predict.InputError) as err:
            predict.find_images([spec], "x", False)
        assert str(err.value) == expected
    link.unlink()
    assert predict.find_images([str(tmp_path / "imgs")], "x", False) == {
        "x": [(str(tmp_path / "imgs" / "a" / "1.png"), "a_1")]}
    (tmp_path / "imgs" / "a" / ".#notes.txt").symlink_to("user@host.1234")  # an editor's lock
    assert predict.find_images([str(tmp_path / "imgs")], "x", False) == {
        "x": [(str(tmp_path / "imgs" / "a" / "1.png"), "a_1")]}
    (tmp_path / "imgs" / "brick").symlink_to(tmp_path / "gone_class")  # a class linked in
    with pytest.raises(predict.InputError, match=(
            f"^1 link\\(s\\) lead nowhere:\n  {tmp_path}/imgs/brick is a link to "
            f"{tmp_path}/gone_class, which")):
        predict.find_images([str(tmp_path / "imgs")], None, True)
    capsys.readouterr()  # --skip_bad_images: no image to list, so named and left out
    assert predict.find_images([str(tmp_path / "imgs")], None, True, keep_dangling=True) == {
        "a": [(str(tmp_path / "imgs" / "a" / "1.png"), "1")]}
    assert capsys.readouterr().err == (
        f"[predict] left out 1 link(s) to nothing:\n  {tmp_path}/imgs/brick is a link to "
        f"{tmp_path}/gone_class, which does not exist\n")


def test_a_glob_names_the_images_it_misses_only_by_case(tmp_path, capsys):
    """'dir/*.png' (predict.py expands a quoted glob itself) silently missed dir/IMG.PNG,
    which every loader reads: those images are counted and named on stderr."""
    _touch(tmp_path, "in/a/1.png", "in/a/B.PNG", "in/a/c.Png", "in/a/d.jpg", "in/b/E.PNG",
           "in/a/.F.PNG")
    spec = str(tmp_path / "in" / "a" / "*.png")
    assert predict.find_images([spec], "x", False) == {
        "x": [(str(tmp_path / "in" / "a" / "1.png"), "1")]}
    assert capsys.readouterr().err == (
        f"[predict] {spec}: left out 2 image(s) that match it but for case (B.PNG, c.Png): "
        "a glob pattern is case-sensitive; match both cases, e.g. '*.[pP][nN][gG]'\n")
    spec = str(tmp_path / "in" / "*" / "*.png")  # relative to the glob's folder
    predict.find_images([spec], "x", False)
    assert capsys.readouterr().err.startswith(
        f"[predict] {spec}: left out 3 image(s) that match it but for case (a/B.PNG, "
        "a/c.Png, b/E.PNG): ")
    predict.find_images([str(tmp_path / "in" / "a" / "*.[pP][nN][gG]")], "x", False)
    assert capsys.readouterr().err == ""
    # a file the pattern took under another spelling is not named (a case-insensitive
    # file system returns a literal part as typed: 'in/*/one.png' finds ONE.PNG as
    # in/c/one.png, and the folder lists ONE.PNG); a hard link stands in for it here
    _touch(tmp_path, "in/c/ONE.PNG")
    (tmp_path / "in" / "c" / "one.png").hardlink_to(tmp_path / "in" / "c" / "ONE.PNG")
    predict.find_images([str(tmp_path / "in" / "*" / "one.png")], "x", False)
    assert capsys.readouterr().err == ""


def test_a_folder_named_like_an_image_is_not_named_as_missed_by_case(tmp_path, capsys):
    """'dir/*.png' names the images it missed only by case; a sub-folder named IMG.PNG
    is no image the pattern missed (no loader reads a folder as one), so the note names
    only the file."""
    _touch(tmp_path, "in/a/1.png", "in/a/B.PNG", "in/a/D.PNG/x.txt")
    spec = str(tmp_path / "in" / "a" / "*.png")
    predict.find_images([spec], "x", False)
    assert capsys.readouterr().err == (
        f"[predict] {spec}: left out 1 image(s) that match it but for case (B.PNG): "
        "a glob pattern is case-sensitive; match both cases, e.g. '*.[pP][nN][gG]'\n")


def test_files_of_other_types_are_named_in_a_note(tmp_path, capsys):
    """A .webp photo among the images is not scored, so it is named on stderr, from a
    folder input and from a glob alike; hidden files, Windows' Thumbs.db and desktop.ini
    and predict.py's own outputs in an --output_dir inside the folder are not."""
    _touch(tmp_path, "in/a/1.png", "in/a/2.webp", "in/b/notes.txt", "in/a/.DS_Store",
           "in/a/Thumbs.db", "in/b/desktop.ini", "in/pred/predictions.csv")
    found = predict.find_images([str(tmp_path / "in")], "x", False, str(tmp_path / "in/pred"))
    assert [name for _, name in found["x"]] == ["a_1"]
    assert capsys.readouterr().err == (
        f"[data] note: {tmp_path}/in: left out 2 file(s) not of an image type "
        f"{'/'.join(predict.datasets.IMAGE_EXTENSIONS)} (a/2.webp, b/notes.txt); convert any "
        "image among them to PNG to use it\n")
    predict.find_images([str(tmp_path / "in" / "a" / "*")], "x", False)
    assert capsys.readouterr().err.startswith(
        f"[data] note: {tmp_path}/in/a/*: left out 1 file(s) not of an image type "
        f"{'/'.join(predict.datasets.IMAGE_EXTENSIONS)} (2.webp); ")
    predict.find_images([str(tmp_path / "in" / "a" / "*.png")], "x", False)
    assert capsys.readouterr().err == ""


def test_folder_walk_skips_junk_folders(tmp_path):
    """Jupyter's checkpoint copies, other hidden folders and macOS's __MACOSX hold no
    images to score."""
    _touch(tmp_path, "imgs/a/1.png", "imgs/.ipynb_checkpoints/1-checkpoint.png",
           "imgs/a/.cache/3.png", "imgs/__MACOSX/a/2.png")
    assert predict.find_images([str(tmp_path / "imgs")], "x", False) == {
        "x": [(str(tmp_path / "imgs" / "a" / "1.png"), "a_1")]}


def test_class_of_a_bare_relative_file_is_its_folder(tmp_path, monkeypatch):
    """'top.png' given from inside coins/ is class coins, not '' (its Path parent)."""
    _touch(tmp_path, "coins/top.png", "coins/tip.png")
    monkeypatch.chdir(tmp_path / "coins")
    assert predict.find_images(["top.png", "ti*.png"], None, True) == {
        "coins": [("top.png", "top"), ("tip.png", "tip")]}


def test_outputs_inside_an_input_folder_and_deep_names(tmp_path):
    """What predict.py wrote in an --output_dir inside the input folder (an earlier run's
    heatmaps, maps, previous-*) is no input, and an --output_dir that is the input
    folder or above it drops nothing else; a name too long for a file (deep folders) is
    cut and keeps a hash, so two names sharing their first 150 bytes still differ."""
    deep = "d" * 120
    _touch(tmp_path, "in/a.png", "in/pred/heatmaps/x/a.png", "in/pred/maps/x/a.png",
           "in/pred/predictions.csv", "in/pred/previous-20261202T000000Z/heatmaps/x/a.png",
           f"in/{deep}/{deep}/1.png", f"in/{deep}/{deep}/2.png")
    for out in (tmp_path / "in", tmp_path):
        (found,) = predict.find_images([str(tmp_path / "in" / "a.png")], "x", False,
                                       str(out)).values()
        assert found == [(str(tmp_path / "in" / "a.png"), "a")]
    (items,) = predict.find_images([str(tmp_path / "in")], "x", False,
                                   str(tmp_path / "in" / "pred")).values()
    names = [n for _, n in items]
    assert [Path(f).name for f, _ in items] == ["a.png", "1.png", "2.png"]
    assert names[0] == "a" and names[1] != names[2]
    for name in names[1:]:
        assert len(name.encode()) == 150 + 1 + 16 and name.startswith(deep + "_" + deep[:29])


def test_an_earlier_runs_outputs_in_an_input_folder_are_no_input(tmp_path, capsys):
    """An earlier run's --output_dir inside an input folder, other than this run's: its
    heatmaps were scored as images (all 'anomalous') and its predictions.csv named as a
    left-out file. A folder is a run's by a predictions.csv of predict.py's columns; a
    user's own predictions.csv beside a maps/ folder leaves those images inputs."""
    header = ",".join(predict.OUTPUT_COLUMNS) + "\n"
    _touch(tmp_path, "in/a.png", "in/b.png", "in/run1/heatmaps/coins/a.png",
           "in/run1/maps/coins/a.npy", "in/run1/skipped_images.txt",
           "in/run1/previous-20261202T000000Z/heatmaps/coins/b.png",
           "in/mine/maps/c.png")
    (tmp_path / "in/run1/predictions.csv").write_text(header + "x.png,coins,a,1,1,,\n")
    # an earlier version's run (its decision column was named 'decision') is a run too
    (tmp_path / "in/run1/previous-20261202T000000Z/predictions.csv").write_text(
        ",".join(predict.EARLIER_COLUMNS[0]) + "\n")
    (tmp_path / "in/mine/predictions.csv").write_text("image,label\n")
    want = [str(tmp_path / "in" / f) for f in ("a.png", "b.png", "mine/maps/c.png")]
    for inputs in ([str(tmp_path / "in")], [str(tmp_path / "in" / "**" / "*.png")]):
        (found,) = predict.find_images(inputs, "coins", False,
                                       str(tmp_path / "in" / "run2")).values()
        assert sorted(f for f, _ in found) == want
    err = capsys.readouterr().err.splitlines()
    runs = f"{tmp_path / 'in' / 'run1'}, {tmp_path / 'in' / 'run1' / 'previous-20261202T000000Z'}"
    for spec in (tmp_path / "in", tmp_path / "in" / "**" / "*.png"):
        assert (f"[predict] {spec}: left out what earlier predict.py run(s) wrote there (their "
                f"heatmaps, maps and predictions.csv): {runs}") in err
    left_out = [line for line in err if "not of an image type" in line]
    assert left_out and all("run1" not in line for line in left_out)  # ours are no others
    assert any("mine/predictions.csv" in line for line in left_out)
    heatmap = str(tmp_path / "in" / "run1" / "heatmaps" / "coins" / "a.png")
    with pytest.raises(predict.InputError) as err:  # nothing else given: said so
        predict.find_images([heatmap], "coins", False, None)
    assert str(err.value).endswith(f"in {heatmap} but what earlier predict.py run(s) wrote: "
                                   "give the folder of the images to score")


def test_a_users_own_maps_folder_is_an_input_and_is_never_moved(tiny_world, tmp_path,
                                                                 capsys, monkeypatch):
    """heatmaps/ and maps/ in --output_dir are an earlier run's only beside its
    predictions.csv. Without it they are the user's: images in them are inputs (they
    were dropped silently), and predict.py refuses to write there (it moved them to
    previous-*/) before any scoring, leaving them as they were."""
    _touch(tmp_path, "in/a.png", "in/maps/b.png", "in/heatmaps/c.png")
    (found,) = predict.find_images([str(tmp_path / "in")], "x", False,
                                   str(tmp_path / "in")).values()
    assert [n for _, n in found] == ["a", "heatmaps_c", "maps_b"]
    out = tmp_path / "out"
    _touch(out, "maps/mine.npy")
    image = str(tiny_world.mvtec_root / "coins" / "test" / "good" / "000.png")
    argv = [image, "--class_name", "coins", "--output_dir", str(out), *tiny_world.model_argv()]
    monkeypatch.setattr(run_test, "load_models", lambda args: pytest.fail("scored"))
    assert predict.main(argv) == 2
    assert capsys.readouterr().err == (
        f"error: {out / 'maps'} is not an earlier predict.py run's output (no predictions.csv "
        "beside it): give another --output_dir, or move it away\n")
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == [
        "maps", "maps/mine.npy"]
    linked = tmp_path / "linked"  # a link of the user's, to nothing: theirs all the same
    linked.mkdir()
    (linked / "heatmaps").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.raises(predict.InputError, match=(
            f"^{linked / 'heatmaps'} is not an earlier predict.py run's output")):
        predict.check_output_dir(linked)
    _touch(tmp_path, "own/predictions.json")  # a file of the user's named like ours
    with pytest.raises(predict.InputError, match=(
            f"^{tmp_path / 'own' / 'predictions.json'} is not an earlier predict.py run's")):
        predict.check_output_dir(tmp_path / "own")


def test_a_crash_while_setting_aside_keeps_the_earlier_run_recognisable(tmp_path,
                                                                      monkeypatch):
    """The earlier run's predictions.csv moves last: a crash after its heatmaps/ moved
    leaves predictions.csv beside the rest, which the next run still takes for an
    earlier run's (moving predictions.csv first left heatmaps/ that it refused)."""
    out = tmp_path / "out"
    _touch(out, "predictions.csv", "heatmaps/x/a.png", "maps/x/a.npy")
    rename, calls = utils.os.rename, []

    def crash_on_second(src, dst):
        calls.append(Path(src).name)
        if len(calls) == 2:
            raise OSError("killed")
        rename(src, dst)
    monkeypatch.setattr(utils.os, "rename", crash_on_second)
    with pytest.raises(OSError, match="killed"):
        utils.set_aside(out, predict.OUTPUTS)
    assert calls == ["heatmaps", "maps"]
    predict.check_output_dir(out)
    monkeypatch.setattr(utils.os, "rename", rename)
    utils.set_aside(out, predict.OUTPUTS)
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith("previous-")) == []


def test_output_names_are_unique_even_against_suffixed_names(tmp_path):
    """'a/b.png' and 'a_b.png' both map to a_b; the repeat must not take a_b_2, the
    name of 'a_b_2.png', or one image's heatmap and .npy would overwrite another's."""
    for rel in ("a/b.png", "a_b.png", "a_b_2.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    (items,) = predict.find_images([str(tmp_path)], "x", False).values()
    assert {Path(f).relative_to(tmp_path).as_posix(): n for f, n in items} == {
        "a/b.png": "a_b", "a_b.png": "a_b_3", "a_b_2.png": "a_b_2"}
    assert predict.unique_names(["x", "x_2", "x", "x_2", "x"]) == [
        "x", "x_2", "x_3", "x_2_2", "x_4"]
    # one file on a case-insensitive file system (macOS, Windows): kept apart
    assert predict.unique_names(["A", "a", "a_2", "Cut_B", "cut_b"]) == [
        "A", "a_3", "a_2", "Cut_B", "cut_b_2"]


def test_tokenizer_mistakes_are_one_error_line(tiny_world, tmp_path, capsys):
    """--tokenizer_model takes only a registered tokenizer; a PMAD checkpoint given as
    the k-means tokenizer is one `error:` line naming it, exit 2."""
    image = str(tiny_world.mvtec_root / "coins" / "test" / "good" / "000.png")
    with pytest.raises(SystemExit) as exit_info:
        predict.get_args_parser().parse_args([image, "--class_name", "coins",
                                              "--tokenizer_model", "foo"])
    assert exit_info.value.code == 2
    assert "argument --tokenizer_model: invalid choice: 'foo'" in capsys.readouterr().err
    argv = [image, "--class_name", "coins", "--output_dir", str(tmp_path / "out"),
            *tiny_world.model_argv(), "--tokenizer_weight_path", str(tiny_world.pmad_ckpt)]
    assert predict.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tiny_world.pmad_ckpt} is not a k-means tokenizer file")
    assert err.count("\n") == 1 and "Traceback" not in err


def test_files_the_loaders_refuse_are_one_error_line_and_exit_2(tiny_world, tmp_path,
                                                                capsys):
    """A ProtoFlow file whose encoder keys differ from the model's (as a file saved by
    another timm version's names), and a PMAD checkpoint storing a model name this code
    does not build, are each one `error:` line naming the file and the fix, exit 2 (they
    were tracebacks)."""
    image = str(tiny_world.mvtec_root / "coins" / "test" / "good" / "000.png")
    base = [image, "--class_name", "coins", "--output_dir", str(tmp_path / "out")]
    obj = torch.load(tiny_world.protoflow, map_location="cpu", weights_only=True)
    enc = obj["encoder_state_dict"]
    enc["conv_stem.weights"] = enc.pop("conv_stem.weight")
    renamed = tmp_path / "renamed.pt"
    torch.save(obj, renamed)
    assert predict.main(base + tiny_world.model_argv()
                        + ["--protoflow_weights", str(renamed)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {renamed}: 'encoder_state_dict' does not fit the model "
                          "built for it; missing keys (1): ['conv_stem.weight']; unexpected "
                          "keys (1): ['conv_stem.weights']")
    assert err.rstrip("\n").endswith("(--protoflow_weights), or train one with `python "
                                      "run_protoflow.py train ...`")
    assert err.count("\n") == 1 and "Traceback" not in err

    ckpt = torch.load(tiny_world.pmad_ckpt, map_location="cpu", weights_only=True)
    other = tmp_path / "other_model.pth"
    torch.save({**ckpt, "args": {"model": "vit_huge_patch14_224_8k_vocab"}}, other)
    argv = tiny_world.model_argv()
    del argv[argv.index("--model"):argv.index("--model") + 2]  # the name comes from the file
    assert predict.main(base + argv + ["--ckpt", str(other)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {other} stores the model name "
                          "'vit_huge_patch14_224_8k_vocab' in its training arguments, which "
                          "this code does not build: pass --model (one of ")
    assert err.count("\n") == 1 and "Traceback" not in err


def test_a_missing_input_is_one_error_line_and_exit_2(tmp_path, capsys):
    """A user's mistake: `error: <message>` naming the path, no traceback, status 2."""
    missing = tmp_path / "no_such_folder"
    assert predict.main([str(missing), "--class_name", "coins",
                         "--output_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(missing) in err and "Traceback" not in err


def test_contradictory_clean_flags_fail_before_anything_is_read(tmp_path, capsys,
                                                                 monkeypatch):
    """--ce_weight with --combine product (which has no weight) is one error line and
    exit 2, before the inputs are walked or a model is loaded."""
    monkeypatch.setattr(predict, "find_images", lambda *a: pytest.fail("inputs walked"))
    monkeypatch.setattr(run_test, "load_models", lambda args: pytest.fail("models loaded"))
    assert predict.main([str(tmp_path / "no_such_folder"), "--class_name", "coins",
                         "--output_dir", str(tmp_path / "out"), "--ce_weight", "2",
                         "--combine", "product"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --ce_weight weighs the cross-entropy in --combine weighted")
    assert not (tmp_path / "out").exists()


def test_class_from_folder_on_one_class_s_folder_says_so_before_loading(tiny_world, tmp_path,
                                                                         monkeypatch, capsys):
    """--class_from_folder given one class's folder (DIR/coins/ with good/ and a defect
    folder), or a glob of its good/ images, took 'good' and 'scratch' as classes and,
    after the models loaded, advised making prototypes for a class 'scratch'; now it is
    refused up front, naming the classes taken, the reason and --class_name coins."""
    monkeypatch.setattr(run_test, "load_models", lambda *a: pytest.fail("models loaded"))
    coins = tmp_path / "mine" / "coins"
    for folder in ("good", "scratch"):
        shutil.copytree(tiny_world.mvtec_root / "coins" / "test" / folder, coins / folder)
    argv = ["--class_from_folder", "--output_dir", str(tmp_path / "out"),
            *tiny_world.model_argv()]
    assert predict.main([str(coins), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        "error: --class_from_folder took 'good', 'scratch' as class(es), which have no "
        f"prototypes in {tiny_world.prototypes_dir} (its classes: ")
    assert err.rstrip().endswith(
        "'good' is a folder inside a class's folder. Give the folder holding the class "
        "folders, or --class_name for one class (e.g. --class_name coins)")
    assert predict.main([str(coins / "good" / "*.png"), *argv]) == 2
    assert "took 'good' as class(es)" in capsys.readouterr().err
    # one class of a set in MVTec layout: its test/ (and train/) taken as classes
    assert predict.main([str(tiny_world.mvtec_root / "coins"), *argv]) == 2
    err = capsys.readouterr().err
    assert "'test'" in err and "(e.g. --class_name coins)" in err
    assert not (tmp_path / "out").exists()


def test_class_from_folder_names_the_class_above_every_inner_folder(tmp_path):
    """One class's test/ folder (or its test/*/*.png) takes 'good' and the defect types as
    classes: the class to name with --class_name is the one above test/, not 'test'."""
    protos = tmp_path / "prototypes"
    (protos / "bottle").mkdir(parents=True)
    test = tmp_path / "mvtec" / "bottle" / "test"
    groups = {"good": [(str(test / "good" / "000.png"), "good/000.png")],
              "broken_large": [(str(test / "broken_large" / "000.png"), "000.png")]}
    with pytest.raises(predict.InputError) as e:
        predict.check_folder_classes(groups, str(protos))
    assert str(e.value).endswith("(e.g. --class_name bottle)"), e.value
    # the class taken from the class's own folder: test/ below it, the class above
    groups = {"test": [(str(test / "broken_large" / "000.png"), "000.png")]}
    with pytest.raises(predict.InputError) as e:
        predict.check_folder_classes(groups, str(protos))
    assert str(e.value).endswith("(e.g. --class_name bottle)"), e.value
    predict.check_folder_classes({"bottle": groups["test"]}, str(protos))  # has prototypes
