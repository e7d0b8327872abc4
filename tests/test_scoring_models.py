"""scoring_models.load: the three scoring files from plain arguments, as a notebook calls
it and as run_test.py and predict.py call it from their flags."""
from __future__ import annotations

import argparse
import csv
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import datasets
import modeling_discrete_vae
import modeling_pmad
import predict
import protocols
import run_test
import scoring_models
import utils
from conftest import KMEANS_VOCAB, ROOT


def test_load_takes_plain_arguments_and_gives_what_the_flags_give(tiny_world):
    """No argparse: the same files give the same models and settings as run_test.py's
    flags, the settings the checkpoint lacks from the paper's (told through `say`), and
    the paths used, which run_test.py records in results.json's args."""
    notes: list[str] = []
    m = scoring_models.load(str(tiny_world.pmad_ckpt),
                            config={"model": tiny_world.model, "tokenizer_model": "kmeans"},
                            tokenizer_path=str(tiny_world.tokenizer),
                            protoflow_weights=str(tiny_world.protoflow),
                            prototypes_dir=str(tiny_world.prototypes_dir), amp="none",
                            say=notes.append)
    assert m.config == {"model": tiny_world.model, "input_size": 224,
                        "layer_scale_init_value": None, "imagenet_default_mean_and_std": True,
                        "tokenizer_model": "kmeans"}
    assert notes[0].startswith(f"{tiny_world.pmad_ckpt} stores no training arguments; "
                               "evaluating with")
    assert (m.device, m.amp, m.img_size, m.vit_classes) == (torch.device("cpu"), "none",
                                                            224, None)
    assert (m.tokenizer_path, m.protoflow_path) == (str(tiny_world.tokenizer),
                                                    str(tiny_world.protoflow))
    assert m.tokenizer.vocab_size == m.model.lm_head.out_features
    assert not m.model.training

    args = run_test.get_args_parser().parse_args(tiny_world.model_argv())
    flags = run_test.load_models(args)
    assert m.config == {k: getattr(args, k) for k in modeling_pmad.PAPER_EVAL_CONFIG}
    assert (args.tokenizer_weight_path, args.protoflow_weights) == (m.tokenizer_path,
                                                                    m.protoflow_path)
    assert (m.mean, m.std) == (flags.mean, flags.std)
    with pytest.raises(ValueError, match=r"config keys \['input_sise'\] are not settings"):
        scoring_models.load(str(tiny_world.pmad_ckpt), config={"input_sise": 112})


def _readme_block(heading: str) -> str:
    """The first ```python block after `heading` in README.md."""
    text = (ROOT / "README.md").read_text()
    start = text.index(heading)
    return re.search(r"```python\n(.*?)```", text[start:], re.S).group(1)


def test_readmes_python_example_scores_as_predict_py(tiny_world, tmp_path, monkeypatch):
    """README's "From Python" block, run on the tiny world's files (its paths replaced),
    gives predict.py's scores of the same images with predict.py's defaults."""
    ckpt = tmp_path / "pmad.pth"  # as ours record: the settings the block does not pass
    torch.save({**torch.load(tiny_world.pmad_ckpt, weights_only=True),
                "args": {"model": tiny_world.model, "tokenizer_model": "kmeans",
                         "tokenizer_weight_path": str(tiny_world.tokenizer)}}, ckpt)
    images = tiny_world.mvtec_root / "coins" / "test" / "good"
    code = _readme_block("**From Python**")
    for theirs, ours in {"output_dir/multi_class/checkpoint-last.pth": ckpt,
                         "weights/protoflow/multi_class.pt": tiny_world.protoflow,
                         "weights/prototypes": tiny_world.prototypes_dir,
                         "my_images/*.png": images / "*.png", '"bottle"': '"coins"'}.items():
        assert theirs in code
        code = code.replace(theirs, str(ours))
    monkeypatch.chdir(tmp_path)
    names: dict = {}
    exec(compile(code, "README.md", "exec"), names)
    assert names["m"].tokenizer_path == str(tiny_world.tokenizer)  # the one recorded
    assert len(names["paths"]) == len(list(images.glob("*.png"))) > 1

    argv = [str(images), "--class_name", "coins", "--ckpt", str(ckpt),
            "--protoflow_weights", str(tiny_world.protoflow),
            "--prototypes_dir", str(tiny_world.prototypes_dir), "--output_dir",
            str(tmp_path / "predict")]
    assert predict.main(argv) == 0
    with open(tmp_path / "predict" / "predictions.csv", newline="") as f:
        rows = {r["image"]: float(r["pmad_score"]) for r in csv.DictReader(f)}
    ours = dict(zip(names["paths"], names["scores"].image_scores.tolist()))
    assert ours.keys() == rows.keys()
    for path, score in ours.items():
        assert score == pytest.approx(rows[path], rel=1e-5)


def test_a_set_normalised_otherwise_than_the_models_is_refused(tiny_world):
    """ProtoFlow is told the images are normalised as the ViT was trained (Models' mean
    and std); a set built by hand with other values scored every image off, with no
    error. Models.dataset builds the set as the models read it."""
    m = scoring_models.load(str(tiny_world.pmad_ckpt),
                            config={"model": tiny_world.model, "tokenizer_model": "kmeans"},
                            tokenizer_path=str(tiny_world.tokenizer),
                            protoflow_weights=str(tiny_world.protoflow),
                            prototypes_dir=str(tiny_world.prototypes_dir), amp="none",
                            say=lambda note: None)
    paths = [str(p) for p in sorted((tiny_world.mvtec_root / "coins" / "test" / "good")
                                    .glob("*.png"))[:2]]
    ours = m.dataset(paths)
    assert (ours.mean, ours.std, ours.img_size, ours.token_size, ours.names) == (
        m.mean, m.std, 224, m.tokenizer.image_size, paths)
    assert m.dataset(paths, ["a", "b"]).names == ["a", "b"]
    tests = m.test_set(str(tiny_world.mvtec_root), "coins", skip_bad_images=True)
    assert (tests.mean, tests.std, tests.img_size, tests.token_size, tests.patch_size,
            len(tests)) == (m.mean, m.std, 224, m.tokenizer.image_size, 16, 8)
    other = datasets.ImageListDataset(paths, paths, token_size=m.tokenizer.image_size,
                                      mean=(0.5,) * 3, std=(0.5,) * 3)
    with pytest.raises(ValueError, match=(
            r"^the images are normalised with mean \(0.5, 0.5, 0.5\), std \(0.5, 0.5, "
            r"0.5\), but the models were loaded for mean \(0.485, 0.456, 0.406\)")):
        protocols.collect_class(other, m.tokenizer, m.protoflow, "coins", 2, m.device)
    data = protocols.collect_class(ours, m.tokenizer, m.protoflow, "coins", 2, m.device)
    assert data.images.shape == (2, 3, 224, 224)
    assert data.images.is_inference() and data.log_likelihood.is_inference()  # no autograd


def test_a_prototypes_folder_that_is_not_there_is_named_before_any_model_loads(
        tiny_world, tmp_path, monkeypatch, capsys):
    """A forgotten --prototypes_dir (the default weights/prototypes, not there) or a file
    given as it failed only at the first class's prototypes, after the models loaded, and
    advised making that class's prototypes in the wrong place."""
    monkeypatch.setattr(scoring_models, "read_weights_file", lambda *a: pytest.fail("read"))
    for where, what in ((tmp_path / "gone", "does not exist"),
                        (tiny_world.tokenizer, "is a file")):
        with pytest.raises(utils.MissingFileError, match=(
                f"^--prototypes_dir {re.escape(str(where))} {what}: pass the folder of "
                "per-class prototypes that `python run_protoflow.py prototypes")):
            scoring_models.load(str(tiny_world.pmad_ckpt), prototypes_dir=str(where))
    monkeypatch.chdir(tmp_path)  # no weights/ here: predict.py's default folder
    argv = [str(tiny_world.mvtec_root / "coins" / "test" / "good"), "--class_name", "coins",
            *[a for a in tiny_world.model_argv() if a != "--prototypes_dir"
              and a != str(tiny_world.prototypes_dir)]]
    assert predict.main(argv) == 2
    assert capsys.readouterr().err.startswith(
        "error: --prototypes_dir weights/prototypes does not exist")


def _world_files(world) -> dict:
    """load's arguments for the tiny world's tokenizer, ProtoFlow and prototypes."""
    return dict(tokenizer_path=str(world.tokenizer), protoflow_weights=str(world.protoflow),
                prototypes_dir=str(world.prototypes_dir), amp="none", say=lambda note: None)


def test_images_are_normalised_as_the_vit_was_trained(tiny_world):
    """A ViT trained without --imagenet_default_mean_and_std (BEiT's 0.5/0.5) is given
    images normalised so, and ProtoFlow is told so (it converts them to its own). With
    ImageNet's values the ViT read every image off its training distribution and scored
    it plausibly wrong, with no error: ProtoFlow's scores alone do not show it."""
    half = (0.5, 0.5, 0.5)
    m = scoring_models.load(str(tiny_world.pmad_ckpt),
                            config={"model": tiny_world.model, "tokenizer_model": "kmeans",
                                    "imagenet_default_mean_and_std": False},
                            **_world_files(tiny_world))
    assert (m.mean, m.std) == (half, half)
    assert tuple(tuple(v) for v in m.protoflow.input_normalization) == (half, half)
    path = str(sorted((tiny_world.mvtec_root / "coins" / "test" / "good").glob("*.png"))[0])
    ours = m.dataset([path])
    assert (ours.mean, ours.std) == (half, half)
    image = ours[0]["image"]  # pixels in [0, 1] -> [-1, 1]
    assert image.min() >= -1 - 1e-6 and image.max() <= 1 + 1e-6 and image.min() < -0.5


def test_a_checkpoint_loads_only_into_the_layer_scale_it_was_trained_with(tiny_world,
                                                                           tmp_path):
    """--layer_scale_init_value 0 trains a ViT without layer scale (no gamma weights): it
    loads as trained, from its stored arguments, every weight the file's. Read as a
    model with layer scale (the paper's, given explicitly) its gammas are missing: refused
    by name, where a partial load would leave them at their initial values and score
    plausibly wrong."""
    torch.manual_seed(0)
    vit = modeling_pmad.build_pmad(tiny_world.model, vocab_size=KMEANS_VOCAB, init_values=0.0)
    assert not any("gamma" in k for k in vit.state_dict())
    ckpt = tmp_path / "no_layer_scale.pth"
    torch.save({"model": vit.state_dict(),
                "args": {"model": tiny_world.model, "input_size": 224,
                         "layer_scale_init_value": 0.0, "imagenet_default_mean_and_std": True,
                         "tokenizer_model": "kmeans"}}, ckpt)
    m = scoring_models.load(str(ckpt), **_world_files(tiny_world))
    assert m.config["layer_scale_init_value"] == 0.0
    torch.testing.assert_close(m.model.state_dict(), vit.state_dict())
    with pytest.raises(utils.CheckpointError, match=(
            f"^{re.escape(str(ckpt))} does not match .*: missing \\[[^]]*'blocks.0.gamma_1'")):
        scoring_models.load(str(ckpt), config={"layer_scale_init_value": 0.1},
                            **_world_files(tiny_world))


def test_the_device_is_a_gpu_where_torch_sees_one_unless_one_is_given(tiny_world,
                                                                     monkeypatch):
    """load(device=None) asks for CUDA where torch sees a GPU (as the scripts' --device
    default), and run_test.py's / predict.py's --device cpu is kept on a machine with a
    GPU. On the tests' CPU-only machines both resolve to the CPU either way, which hid a
    flag dropped (or a default lost) on the way to the models."""
    asked: list = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(scoring_models, "resolve_device",
                        lambda device: asked.append(device) or torch.device("cpu"))
    scoring_models.load(str(tiny_world.pmad_ckpt),
                        config={"model": tiny_world.model, "tokenizer_model": "kmeans"},
                        **_world_files(tiny_world))
    args = run_test.get_args_parser().parse_args(tiny_world.model_argv(device="cpu"))
    assert run_test.load_models(args).device == torch.device("cpu")
    assert asked == ["cuda", "cpu"]


def test_a_missing_tokenizer_is_named_without_a_false_note(tiny_world, tmp_path):
    """'(... was trained with --tokenizer_weight_path X, which is not on this machine)'
    is said only where the recorded file was not found and the released one was tried
    in its stead. A tokenizer the caller names that is missing, or the recorded one found
    but unusable (a folder), is named without it: the note would send the user after a
    file that is there, or away from the one they typed."""
    def checkpoint(recorded: str) -> str:
        path = tmp_path / f"pmad_{len(list(tmp_path.glob('pmad_*')))}.pth"
        torch.save({**torch.load(tiny_world.pmad_ckpt, weights_only=True),
                    "args": {"model": tiny_world.model, "tokenizer_model": "kmeans",
                             "tokenizer_weight_path": recorded}}, path)
        return str(path)

    files = {**_world_files(tiny_world), "tokenizer_path": None}
    gone = tmp_path / "gone.pth"
    with pytest.raises(utils.MissingFileError, match=f"^k-means tokenizer {gone} not found") \
            as info:
        scoring_models.load(checkpoint(str(tiny_world.tokenizer)),
                            **{**files, "tokenizer_path": str(gone)})
    assert "not on this machine" not in str(info.value)
    folder = tmp_path / "tokenizer"
    folder.mkdir()
    with pytest.raises(utils.MissingFileError, match=f"^weights file {folder} is a folder") \
            as info:
        scoring_models.load(checkpoint(str(folder)), **files)
    assert "not on this machine" not in str(info.value)
    with pytest.raises(utils.MissingFileError, match=(  # the note where it holds
            f"\\(.* was trained with --tokenizer_weight_path {gone}, which is not on this "
            "machine\\)$")):
        scoring_models.load(checkpoint(str(gone)), **files)


def test_a_missing_tokenizer_given_names_the_one_the_checkpoint_records(tiny_world,
                                                                        tmp_path):
    """README's --tokenizer_weight_path weights/tokenizer (the released DALL-E tokenizer)
    on a k-means ViT said only that file was not found; the file the checkpoint records
    is on this machine, and leaving the flag out would use it: that is said."""
    ckpt = tmp_path / "pmad.pth"
    torch.save({**torch.load(tiny_world.pmad_ckpt, weights_only=True),
                "args": {"model": tiny_world.model, "tokenizer_model": "kmeans",
                         "tokenizer_weight_path": str(tiny_world.tokenizer)}}, ckpt)
    with pytest.raises(utils.MissingFileError) as info:
        scoring_models.load(str(ckpt), **{**_world_files(tiny_world),
                                          "tokenizer_path": "weights/tokenizer"})
    assert str(info.value).startswith("k-means tokenizer weights/tokenizer not found")
    assert str(info.value).endswith(
        f"pass the file that run wrote ({ckpt} records the tokenizer it was trained with, "
        f"{tiny_world.tokenizer}, which is on this machine: leave out "
        f"--tokenizer_weight_path to use it, or pass --tokenizer_weight_path "
        f"{tiny_world.tokenizer})")


def test_a_missing_tokenizer_given_points_only_to_a_recorded_file_that_is_there(
        tiny_world, tmp_path):
    """The hint 'leave out --tokenizer_weight_path to use it' is given only where the
    checkpoint's recorded tokenizer is on this machine and is not the file typed: a
    recorded file that is gone too, or the typed path itself (here a folder, which
    exists but is no tokenizer), would send the user to a file that cannot be used."""
    def checkpoint(name: str, recorded: str) -> str:
        path = tmp_path / name
        torch.save({**torch.load(tiny_world.pmad_ckpt, weights_only=True),
                    "args": {"model": tiny_world.model, "tokenizer_model": "kmeans",
                             "tokenizer_weight_path": recorded}}, path)
        return str(path)

    gone, also_gone = tmp_path / "gone.pth", tmp_path / "also_gone.pth"
    with pytest.raises(utils.MissingFileError) as info:
        scoring_models.load(checkpoint("a.pth", str(also_gone)),
                            **{**_world_files(tiny_world), "tokenizer_path": str(gone)})
    assert str(info.value).startswith(f"k-means tokenizer {gone} not found")
    assert "leave out --tokenizer_weight_path" not in str(info.value)
    assert str(also_gone) not in str(info.value)
    folder = tmp_path / "tokenizer"
    folder.mkdir()
    with pytest.raises(utils.MissingFileError) as info:
        scoring_models.load(checkpoint("b.pth", str(folder)),
                            **{**_world_files(tiny_world), "tokenizer_path": str(folder)})
    assert str(info.value).startswith(f"weights file {folder} is a folder")
    assert "leave out --tokenizer_weight_path" not in str(info.value)


def test_a_tokenizer_fingerprinted_in_fp16_is_the_same_file_on_the_cpu(tiny_world):
    """A ViT trained with DALL-E tokenizing in fp16 on a GPU records the tokenizer's
    fingerprint with its compute prefix ('fp16-<sha256>'); evaluated on the CPU the same
    file has none, and the other way round. Compared by weights alone it is accepted in
    both directions; other weights are refused either way."""
    sha, fp16 = "a" * 64, modeling_discrete_vae.FP16_PREFIX
    files = dict(ckpt=str(tiny_world.pmad_ckpt), tokenizer_model="kmeans",
                 tokenizer_path=str(tiny_world.tokenizer), model_name=tiny_world.model,
                 input_size=224)
    for then, now in ((fp16 + sha, sha), (sha, fp16 + sha), (fp16 + sha, fp16 + sha)):
        scoring_models.check_tokenizer(SimpleNamespace(fingerprint=now), then, **files)
    for then in (sha, fp16 + sha):
        with pytest.raises(utils.FlagError, match="was trained with another tokenizer"):
            scoring_models.check_tokenizer(SimpleNamespace(fingerprint="b" * 64), then,
                                           **files)


def test_a_checkpoint_laid_out_as_the_authors_code_writes_it_gives_epochs_and_no_hashes(
        tiny_world, tmp_path):
    """The original training code saves {'model', 'optimizer', 'epoch', 'scaler', 'args'}
    with args an argparse.Namespace (docs/method.md 2), and lists no training images:
    load reads its epoch (0-based: 299 is 300 epochs) and finds no hashes, so no test
    image is named as trained on; our checkpoints' list is read as a set."""
    ours = torch.load(tiny_world.pmad_ckpt, weights_only=True)
    theirs = {"model": ours["model"], "optimizer": {}, "epoch": 299, "scaler": {},
              "args": argparse.Namespace(model=tiny_world.model, input_size=224,
                                         discrete_vae_type="kmeans", lr=1.5e-3)}
    path = tmp_path / "authors_layout.pth"
    torch.save(theirs, path)
    kwargs = dict(config={"tokenizer_model": "kmeans"},
                  tokenizer_path=str(tiny_world.tokenizer),
                  protoflow_weights=str(tiny_world.protoflow),
                  prototypes_dir=str(tiny_world.prototypes_dir), amp="none",
                  say=lambda note: None)
    m = scoring_models.load(str(path), **kwargs)
    assert (m.vit_epochs, m.vit_train_images) == (300, None)
    assert m.vit_training_args == {"model": tiny_world.model, "input_size": 224,
                                   "discrete_vae_type": "kmeans", "lr": 1.5e-3}
    torch.save({**ours, "epoch": 4, "args": {
        "model": tiny_world.model, utils.TRAIN_IMAGE_HASHES: ["b" * 64, "a" * 64]}},
        path)
    m = scoring_models.load(str(path), **kwargs)
    assert (m.vit_epochs, m.vit_train_images) == (5, frozenset({"a" * 64, "b" * 64}))
    assert m.vit_training_args == {"model": tiny_world.model}  # not the image list


def test_beits_pretraining_checkpoint_given_as_the_vit_is_said_to_be_one(tiny_world,
                                                                        tmp_path):
    """BEiT's pt22k file (the ViT's --init_ckpt) has a PMAD checkpoint's layout, so it
    loads and scores: plausibly, and meaninglessly. Its name is said; a PMAD
    checkpoint's name is not."""
    named = scoring_models.BEIT_PRETRAINING_NAME.fullmatch
    assert named("beit_large_patch16_224_pt22k.pth") and named("beit_base_patch16_224_pt1k.pth")
    assert not named("my_beit_base_pt22k_run.pth") and not named("checkpoint-299.pth")
    state = torch.load(tiny_world.pmad_ckpt, weights_only=True)
    kwargs = dict(config={"tokenizer_model": "kmeans", "model": tiny_world.model},
                  tokenizer_path=str(tiny_world.tokenizer),
                  protoflow_weights=str(tiny_world.protoflow),
                  prototypes_dir=str(tiny_world.prototypes_dir), amp="none")
    said: dict[str, list[str]] = {}
    for name in ("beit_base_patch16_224_pt22k.pth", "checkpoint-last.pth"):
        path = tmp_path / name
        torch.save({"model": state["model"]}, path)
        scoring_models.load(str(path), say=said.setdefault(name, []).append, **kwargs)
    path = tmp_path / "beit_base_patch16_224_pt22k.pth"
    assert said["beit_base_patch16_224_pt22k.pth"][-1] == (
        f"warning: {path} is named as BEiT's ImageNet pretraining checkpoint (the ViT's "
        "--init_ckpt), whose layout a PMAD checkpoint shares: scored as one, its ViT never "
        "learned these classes' normal images. Pass a PMAD checkpoint: released "
        "(weights/README.md) or run_pretraining.py's checkpoint-last.pth")
    notes = said["checkpoint-last.pth"]
    assert len(notes) == len(said["beit_base_patch16_224_pt22k.pth"]) - 1
    assert notes and not any(n.startswith("warning:") for n in notes)


def test_recorded_flags_are_what_json_can_hold():
    """results.json (written strictly: no NaN) takes a checkpoint's flags as they are,
    but a value JSON cannot hold as its repr, and never the training images' hashes."""
    flags = scoring_models.recorded_flags({
        "lr": 1e-3, "betas": [0.9, 0.98], "output_dir": Path("out"), "clip_grad": None,
        "min_lr": float("nan"), 3: "x", utils.TRAIN_IMAGE_HASHES: ["a" * 64]})
    assert flags == {"lr": 1e-3, "betas": [0.9, 0.98], "output_dir": repr(Path("out")),
                     "clip_grad": None, "min_lr": "nan", "3": "x"}
