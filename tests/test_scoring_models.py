"""scoring_models.load: the three scoring files from plain arguments, as a notebook calls
it and as run_test.py and predict.py call it from their flags."""
from __future__ import annotations

import csv
import re

import pytest
import torch

import datasets
import modeling_pmad
import predict
import protocols
import run_test
import scoring_models
import utils
from conftest import ROOT


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
