"""Bad input and faults through the entry points (issue 15): each is refused before any
work with exit code 2 and one `error:` line (no traceback), or works as a user would
expect, and no finished work is lost.

The machine is slow to import torch (seconds per process), so each group of cases runs
in ONE child process, forked from conftest's fork server with the modules imported:
`_run_cases` executes the entry points' own `__main__` blocks (runpy) one after the other,
with each case's stderr/stdout captured apart.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import runpy
import shutil
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch

import datasets
import run_pretraining
import utils
from backbones import lite0_weights_path
from conftest import HANG_GUARD_S, ROOT, run_ranks, truncate

TINY = "vit_tiny_patch16_224_8k_vocab"


def _harness(rank: int, spec: str, result: str) -> None:
    """The child process of `_run_cases` -> `result`: a JSON list of {'code', 'err',
    'out'}, or {'harness': its traceback} if the harness itself failed."""
    os.chdir(ROOT)
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    out: list[dict] = []
    try:
        _run_each(json.loads(Path(spec).read_text()), out)
    except BaseException:
        Path(result).write_text(json.dumps({"harness": traceback.format_exc()}))
        raise
    Path(result).write_text(json.dumps(out))


def _run_each(cases: list[dict], out: list[dict]) -> None:
    """Each case's `pre` code (in one namespace that the cases share), then its entry
    point's `__main__` block with its stderr and stdout captured, appended to `out`."""
    scope: dict = {}
    for case in cases:
        exec(case.get("pre", ""), scope)
        sys.argv = [case["script"], *case["argv"]]
        err, std = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(std):
            try:
                runpy.run_path(case["script"], run_name="__main__")
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except BaseException:
                traceback.print_exc()
                code = 1
        out.append({"code": code, "err": err.getvalue(), "out": std.getvalue()})
        if case.get("snapshot"):
            shutil.copytree(*case["snapshot"])


def _run_cases(tmp: Path, cases: dict[str, dict]) -> dict[str, dict]:
    """{name: {'script', 'argv', optional 'pre' (Python run first), 'snapshot' (copy
    folder [0] to [1] after the run)}} -> {name: {'code', 'err', 'out'}}, in order, in
    one child process."""
    spec, result = tmp / "cases.json", tmp / "results.json"
    spec.write_text(json.dumps(list(cases.values())))
    codes = run_ranks(_harness, (str(spec), str(result)), nprocs=1, timeout_s=HANG_GUARD_S)
    found = json.loads(result.read_text()) if result.exists() else None
    assert codes == [0], found
    return dict(zip(cases, found))


def _clear_error(result: dict, *words: str) -> str:
    """Exit code 2, no traceback, an `error:` line holding every word; returns stderr."""
    err = result["err"]
    assert result["code"] == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert "error:" in err
    for w in words:
        assert w in err, f"{w!r} not in:\n{err[-3000:]}"
    return err


def _train_argv(world, out, *extra: str, data: Path | None = None) -> list[str]:
    return ["--model", TINY, "--tokenizer_model", "kmeans",
            "--tokenizer_weight_path", str(world.tokenizer),
            "--data_path", str(data or world.imagenet_root), "--output_dir", str(out),
            "--epochs", "1", "--warmup_epochs", "0", "--batch_size", "2",
            "--max_steps_per_epoch", "1", "--num_workers", "0", "--no_init", "--amp", "none",
            "--device", "cpu", *extra]


def _same(a: dict, b: dict) -> bool:
    """Equal records (NaN, an undefined metric, equals NaN here)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True, timeout=600)
    return int(proc.stdout)


# ----------------------------------------------------------------------------- fast refusals
@pytest.fixture(scope="module")
def refused(tiny_world, tmp_path_factory):
    """Every case that must be refused before any work, run in one child process."""
    tmp = tmp_path_factory.mktemp("refused")
    w = tiny_world
    a_file = tmp / "a_file"
    a_file.write_text("not a folder")
    garbage = tmp / "garbage.pth"
    garbage.write_bytes(b"\x80\x02 this is not a checkpoint" * 50)
    # a wrong-aspect ground-truth mask in the LAST class to be evaluated
    aspect = tmp / "aspect"
    shutil.copytree(w.mvtec_root, aspect)
    gt = sorted((aspect / "coins" / "ground_truth").rglob("*.png"))[0]
    from PIL import Image
    Image.new("L", (40, 20), 255).save(gt)
    # training data without foreground masks
    no_fg = tmp / "no_fg"
    shutil.copytree(w.imagenet_root / "train", no_fg / "train")
    # setup_train_dataset on an MVTec tree holding one truncated training image
    bad_src = tmp / "bad_src"
    shutil.copytree(w.mvtec_root, bad_src)
    bad_png = sorted((bad_src / "coins" / "train" / "good").glob("*.png"))[0]
    truncate(bad_png)
    # --resume: a checkpoint of a smaller model (the tiny one against a small model),
    # and the same file in torch's legacy (non-zip) format
    legacy = tmp / "legacy.pth"
    torch.save(torch.load(w.pmad_ckpt, weights_only=True), legacy,
               _use_new_zipfile_serialization=False)
    small = ["--model", "vit_small_patch16_224_8k_vocab"]
    protos = ["prototypes", "--data_path", str(w.imagenet_root), "--encoder",
              "efficientnet_lite0", "--output_dir", str(tmp / "protos")]
    rt, rp, rf, st = "run_test.py", "run_pretraining.py", "run_protoflow.py", \
        "setup_train_dataset.py"
    cases = {
        "F1_imagenet": (rt, w.run_test_argv(tmp / "o1", data=w.imagenet_root)),
        "F1_class": (rt, w.run_test_argv(tmp / "o2", data=w.mvtec_root / "coins")),
        "F3_smaller": (rp, _train_argv(w, tmp / "t1", "--resume", str(w.pmad_ckpt),
                                       "--no_auto_resume") + small),
        "F3_legacy": (rp, _train_argv(w, tmp / "t2", "--resume", str(legacy)) + small),
        "F3_no_ckpt_dir": (rp, _train_argv(w, tmp / "t3", "--resume", str(tmp))),
        "F4_file": (rt, w.run_test_argv(a_file)),
        "F4_train_file": (rp, _train_argv(w, a_file)),
        "F6": (rp, _train_argv(w, tmp / "t4", "--mask_ratio", "0")),
        "F6_test": (rt, w.run_test_argv(tmp / "o7", "--mask_ratio", "0")),
        "unknown_class": (rt, w.run_test_argv(tmp / "o8", "--classes", "screw")),
        "F7_epochs_neg": (rp, _train_argv(w, tmp / "t5", "--epochs", "-1")),
        "F7_epochs_0": (rp, _train_argv(w, tmp / "t5", "--epochs", "0")),
        "F7_batch_train": (rp, _train_argv(w, tmp / "t5", "--batch_size", "0")),
        "F7_batch_test": (rt, w.run_test_argv(tmp / "o3", "--batch_size", "0")),
        "F7_lr": (rp, _train_argv(w, tmp / "t5", "--lr", "-1")),
        "F7_model": (rp, _train_argv(w, tmp / "t5", "--model", "vit_foo")),
        "F7_steps": (rp, _train_argv(w, tmp / "t5", "--max_steps_per_epoch", "0")),
        "F7_codes": (rp, _train_argv(w, tmp / "t5", "--kmeans_vocab_size", "1")),
        "F7_stage": (rp, _train_argv(w, tmp / "t5", "--kmeans_out_index", "4")),
        "F7_warmup": (rp, _train_argv(w, tmp / "t5", "--warmup_epochs", "-1")),
        "F7_dynamic": (rp, _train_argv(w, tmp / "t5", "--dynamic_masking_start", "-1")),
        "F7_demo_counts": (st, ["--make_demo", str(tmp / "demo"), "--demo_counts", "30", "0",
                                "5"]),
        "F7_coreset_0": (rf, protos + ["--coreset_ratio", "0"]),
        "F7_coreset_2": (rf, protos + ["--coreset_ratio", "2"]),
        "F7_quantile": (rf, ["train", "--data_path", str(w.imagenet_root), "--output",
                             str(tmp / "pf.pt"), "--threshold_quantile", "1"]),
        "F7_holdout": (rf, protos + ["--holdout", "1"]),
        "F8": (rt, w.run_test_argv(tmp / "o4", "--save_heatmaps", "-3")),
        "pf_classes_setting": (rf, ["train", "--data_path", str(w.imagenet_root), "--output",
                                    str(tmp / "pf2.pt"), "--classes", "coins", "--setting",
                                    "multi_class"]),
        "paper_clean_flags": (rt, w.run_test_argv(tmp / "o11", "--protocol", "paper",
                                                  "--combine", "product", "--mask_ratio", "0.2")),
        "F7_seed_test": (rt, w.run_test_argv(tmp / "o9", "--seed", "-1")),
        "F7_seed_protoflow": (rf, protos + ["--seed", "-1"]),
        "F7_seed_setup": (st, ["--make_demo", str(tmp / "demo"), "--seed", "-1"]),
        "out_indices": (rf, protos + ["--out_indices", "2", "9", "--encoder_weights",
                                      lite0_weights_path()]),
        "not_protoflow": (rt, w.run_test_argv(tmp / "o10", "--protoflow_weights",
                                              str(w.pmad_ckpt))),
        "F9_zero": (rf, protos + ["--num_shots", "0"]),
        "F9_neg": (rf, protos + ["--num_shots", "-2"]),
        "F11": (st, ["--data_path", str(bad_src), "--root", str(tmp / "converted"),
                     "--classes", *w.classes, "--make_fg_masks"]),
        "fg_mask_fix": (rp, _train_argv(w, tmp / "t6", data=no_fg)),
        "weights_advice": (rt, w.run_test_argv(tmp / "o5") + ["--ckpt", str(garbage)]),
        "aspect": (rt, w.run_test_argv(tmp / "o6", data=aspect)),
    }
    results = _run_cases(tmp, {k: {"script": s, "argv": a} for k, (s, a) in cases.items()})
    return results, {"tmp": tmp, "a_file": a_file, "bad_png": bad_png, "legacy": legacy}


def test_F1_a_set_of_another_layout_names_the_layout_and_the_nearest_path(refused,
                                                                          tiny_world):
    results, _ = refused
    err = _clear_error(results["F1_imagenet"], f"--data_path {tiny_world.imagenet_root} "
                       "holds no <class>/test folder", "expected <root>/<class>/test/",
                       "ImageNet-layout training set")
    assert "no available classes" not in err
    _clear_error(results["F1_class"], "is one class's folder: pass its parent, --data_path "
                 f"{tiny_world.mvtec_root} --classes coins")


def test_F3_resume_of_another_model_is_one_line(refused):
    results, paths = refused
    err = _clear_error(results["F3_smaller"], "has shape", "in the file but",
                       "; pass the --model (and --input_size) it was trained with")
    assert err.count("--input_size") == 1  # the advice once (it was given twice)
    assert "size mismatch" not in err
    # the legacy (non-zip) format is read (no mmap error) and checked the same way
    err = _clear_error(results["F3_legacy"], str(paths["legacy"]), "has shape")
    assert "mmap" not in err
    _clear_error(results["F3_no_ckpt_dir"], f"--resume {paths['tmp']}: the folder holds no "
                 "complete checkpoint")


def test_F4_an_output_dir_that_is_a_file_is_refused_before_work(refused):
    results, paths = refused
    for case in ("F4_file", "F4_train_file"):
        _clear_error(results[case], f"--output_dir {paths['a_file']} is a file, not a folder")
    assert "tokens + ProtoFlow" not in results["F4_file"]["err"]  # nothing evaluated
    assert paths["a_file"].read_text() == "not a folder"


def test_F6_mask_ratio_0_is_refused(refused):
    for case in ("F6", "F6_test"):  # training and evaluation
        _clear_error(refused[0][case], "argument --mask_ratio: 0 is outside (0, 1)")


def test_an_unknown_test_class_is_refused(refused, tiny_world):
    _clear_error(refused[0]["unknown_class"], "--classes: ['screw'] have no "
                 f"{tiny_world.mvtec_root}/<class>/test folder; available: ['brick', 'coins']")


@pytest.mark.parametrize("case, words", [
    ("F7_epochs_neg", "argument --epochs: -1 is less than 1"),
    ("F7_epochs_0", "argument --epochs: 0 is less than 1 (nothing to do)"),
    ("F7_batch_train", "argument --batch_size: 0 is less than 1"),
    ("F7_batch_test", "argument --batch_size: 0 is less than 1"),
    ("F7_lr", "argument --lr: -1 is not a positive number"),
    ("F7_model", "argument --model: invalid choice: 'vit_foo' (choose from "
                 "'vit_base_patch16_224_8k_vocab'"),
    ("F7_steps", "argument --max_steps_per_epoch: 0 is less than 1"),
    ("F7_codes", "argument --kmeans_vocab_size: 1 is less than 2"),
    ("F7_stage", "argument --kmeans_out_index: invalid choice: 4 (choose from 0, 1, 2, 3)"),
    ("F7_warmup", "argument --warmup_epochs: -1 is less than 0"),
    ("F7_dynamic", "argument --dynamic_masking_start: -1 is less than 0"),
    ("F7_demo_counts", "argument --demo_counts: 0 is less than 1"),
    ("F7_coreset_0", "argument --coreset_ratio: 0 is outside (0, 1]"),
    ("F7_coreset_2", "argument --coreset_ratio: 2 is outside (0, 1]"),
    ("F7_quantile", "argument --threshold_quantile: 1 is outside (0, 1)"),
    ("F7_holdout", "argument --holdout: 1 is outside [0, 1)"),  # was found after the load
    ("F7_seed_test", "argument --seed: -1 is less than 0"),
    ("F7_seed_protoflow", "argument --seed: -1 is less than 0"),
    ("F7_seed_setup", "argument --seed: -1 is less than 0"),
    ("out_indices", "--out_indices 2 9: efficientnet_lite0 has feature levels 0 to 4"),
])
def test_F7_flags_out_of_range_are_refused(refused, case, words):
    _clear_error(refused[0][case], words)


def test_a_file_of_another_model_as_protoflow_weights_is_one_line(refused, tiny_world):
    _clear_error(refused[0]["not_protoflow"], f"{tiny_world.pmad_ckpt} has no "
                 "'decoder_state_dict'", "it is not a ProtoFlow file: pass the ProtoFlow weights")


def test_clean_protocol_flags_are_refused_by_the_paper_protocol(refused):
    """The paper protocol would ignore them: its own masks, 24 ratios and scores."""
    _clear_error(refused[0]["paper_clean_flags"], "--combine, --mask_ratio apply only to "
                 "--protocol clean; --protocol paper sweeps the paper's 24 mask ratios")
    assert not (refused[1]["tmp"] / "o11").exists()


def test_protoflow_classes_with_a_setting_is_refused(refused):
    """--classes names the classes itself: a --setting beside it used to be dropped."""
    _clear_error(refused[0]["pf_classes_setting"], "--classes names the classes itself: "
                 "drop --setting, --unseen_classes and --from_obj_to_texture, or --classes")


def test_F8_negative_heatmap_count_is_refused_before_work(refused):
    _clear_error(refused[0]["F8"], "argument --save_heatmaps: -3 is less than 0")
    assert not (refused[1]["tmp"] / "o4").exists()


def test_F9_num_shots_below_1_is_refused(refused):
    _clear_error(refused[0]["F9_zero"], "argument --num_shots: 0 is less than 1")
    _clear_error(refused[0]["F9_neg"], "argument --num_shots: -2 is less than 1")


def test_F11_setup_names_the_source_file_and_no_foreign_flag(refused):
    err = _clear_error(refused[0]["F11"], f"cannot read image {refused[1]['bad_png']}",
                       "copied to", "replace it in --data_path")
    assert "--skip_bad_images" not in err and "skip_bad_images=True" not in err


def test_missing_fg_masks_name_the_real_flag(refused):
    err = _clear_error(refused[0]["fg_mask_fix"], "foreground mask(s) missing", "--no-fg_mask")
    assert "fg_mask=False" not in err


def test_unreadable_weights_do_not_advise_weights_only_false(refused):
    err = _clear_error(refused[0]["weights_advice"], "is not a readable PyTorch weights file")
    assert "weights_only" not in err


def test_every_mask_size_is_checked_before_the_first_class(refused):
    result = refused[0]["aspect"]
    _clear_error(result, "is 40x20 but its image", "coins/ground_truth")
    assert "brick" not in result["out"] and "tokens + ProtoFlow" not in result["err"]
    assert not (refused[1]["tmp"] / "o6" / "results.partial.jsonl").exists()


def test_legacy_checkpoint_reads_memory_mapped(refused):
    ckpt = utils.load_checkpoint_file(str(refused[1]["legacy"]), mmap=True)
    assert set(ckpt) == {"model", "epoch"}


def test_device_and_amp_mistakes_are_one_line_in_every_entry_point(tiny_world, tmp_path):
    """--amp fp16 off CUDA, a GPU torch cannot see (torch here sees none), a name that
    is no device: one `error:` line, exit 2, before any output, through each entry
    point's __main__ (run_test.py, predict.py and run_protoflow.py included)."""
    w = tiny_world
    no_gpu = "import torch\ntorch.cuda.is_available = lambda: False\n"
    image = str(w.mvtec_root / "coins" / "test" / "good" / "000.png")
    cases = {
        "train_fp16": ("run_pretraining.py", _train_argv(w, tmp_path / "t1", "--amp", "fp16")),
        "train_cuda": ("run_pretraining.py", _train_argv(w, tmp_path / "t2", "--device",
                                                         "cuda")),
        "train_448": ("run_pretraining.py", _train_argv(w, tmp_path / "t3", "--input_size",
                                                        "448")),
        "test_fp16": ("run_test.py", w.run_test_argv(tmp_path / "o1", "--amp", "fp16")),
        "test_cuda": ("run_test.py", w.run_test_argv(tmp_path / "o2", "--device", "cuda")),
        "test_name": ("run_test.py", w.run_test_argv(tmp_path / "o3", "--device", "gpu")),
        "predict_fp16": ("predict.py", [image, "--class_name", "coins", "--output_dir",
                                        str(tmp_path / "p1"), *w.model_argv(), "--amp", "fp16"]),
        "predict_cuda": ("predict.py", [image, "--class_name", "coins", "--output_dir",
                                        str(tmp_path / "p2"), *w.model_argv("cuda")]),
        "protoflow_cuda": ("run_protoflow.py", [
            "prototypes", "--data_path", str(w.imagenet_root), "--encoder",
            "efficientnet_lite0", "--output_dir", str(tmp_path / "f1"), "--device", "cuda"]),
    }
    results = _run_cases(tmp_path, {k: {"script": script, "argv": argv, "pre": no_gpu}
                                    for k, (script, argv) in cases.items()})
    fp16 = "--amp fp16 needs a CUDA device (its loss scaler is CUDA-only here), not --device cpu"
    no_cuda = "--device cuda was asked for but torch sees no CUDA GPU: pass --device cpu"
    for case in ("train_fp16", "test_fp16", "predict_fp16"):
        _clear_error(results[case], fp16)
    for case in ("train_cuda", "test_cuda", "predict_cuda", "protoflow_cuda"):
        _clear_error(results[case], no_cuda)
    _clear_error(results["test_name"], "--device 'gpu' is not a device")
    _clear_error(results["train_448"], "--input_size 448 makes a 28x28 patch grid but the "
                 f"kmeans tokenizer {w.tokenizer} (fitted at 224 px) gives 14x14 tokens")
    for folder in ("t1", "t2", "t3", "o1", "o2", "o3", "p1", "p2", "f1"):
        assert not (tmp_path / folder).exists(), folder  # refused before any output


# ----------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def finished_run(tiny_world, tmp_path_factory):
    """A finished 1-epoch run (made in this process: it is the starting point)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    run_pretraining.main(run_pretraining.get_args_parser().parse_args(
        _train_argv(tiny_world, out)))
    assert utils.load_checkpoint_file(str(out / "checkpoint-last.pth"))["epoch"] == 0
    return out


def test_F10_F4b_resume_extend_folder_disk_full_and_stale_files(finished_run, tiny_world,
                                                                tmp_path):
    w = tiny_world
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    full = tmp_path / "full"
    shutil.copytree(finished_run, full)
    stale = run / f".checkpoint-last.pth.tmp-{utils._host_label()}-{_dead_pid()}"
    stale.write_bytes(b"x" * 1000)
    live = Path(utils.tmp_name(str(run / "checkpoint-last.pth")))  # a live writer's: kept
    live.write_bytes(b"x")
    before = (full / "checkpoint-last.pth").read_bytes()
    enospc = ("import utils\n"
              "def _full(self, data):\n"
              "    self.error = OSError(28, 'No space left on device')\n"
              "    raise self.error\n"
              "utils._CheckpointFile.write = _full\n")
    results = _run_cases(tmp_path, {
        "F10": {"script": "run_pretraining.py", "argv": _train_argv(
            w, run, "--resume", str(run / "checkpoint-last.pth"), "--no_auto_resume",
            "--epochs", "2")},
        "folder": {"script": "run_pretraining.py", "argv": _train_argv(
            w, tmp_path / "elsewhere", "--resume", str(run), "--epochs", "2")},
        "F4b": {"script": "run_pretraining.py", "pre": enospc,
                "argv": _train_argv(w, full, "--epochs", "2")},
    })
    f10 = results["F10"]
    assert f10["code"] == 0, f10["err"][-3000:]
    assert "finished its 1 epochs: extending the run to 2 epochs" in f10["out"]
    assert "--no_auto_resume" not in f10["out"] + f10["err"]
    assert utils.load_checkpoint_file(str(run / "checkpoint-last.pth"))["epoch"] == 1
    assert (run / "checkpoint-1.pth").is_file()
    assert f"[cleanup] removed {stale}" in f10["out"]
    assert not stale.exists() and live.exists()
    # --resume <folder>: its newest checkpoint; all epochs done: said, not silent
    folder = results["folder"]
    assert folder["code"] == 0, folder["err"][-3000:]
    assert (f"[resume] nothing to do: {run / 'checkpoint-1.pth'} has trained 2 epoch(s), "
            "and --epochs is 2; pass a larger --epochs") in folder["out"]
    assert not (tmp_path / "elsewhere" / "token_cache").exists()  # said before any work
    # disk full while writing epoch 1's checkpoint: one line, the old one intact
    _clear_error(results["F4b"], f"no space left in {full}; {full / 'checkpoint-last.pth'} "
                 "is intact: free space and re-run, or pass --resume "
                 f"{full / 'checkpoint-last.pth'} with another --output_dir")
    assert "unexpected pos" not in results["F4b"]["err"]
    assert (full / "checkpoint-last.pth").read_bytes() == before
    assert not [p for p in os.listdir(full) if ".tmp-" in p]


def test_a_resume_on_other_processes_tokens_or_images_is_refused(finished_run, tiny_world,
                                                                 tmp_path):
    """Another process count, tokenizer file or image set passes every flag check but
    trains another experiment: each is refused in one line before any token is computed.
    A tokenizer of another vocabulary is named as the tokenizer (not as another --model,
    as the lm_head's shape alone would say). None says it extends the run first."""
    w = tiny_world
    runs = {}
    for name in ("procs", "tokenizer", "vocabulary", "images"):
        runs[name] = tmp_path / name
        shutil.copytree(finished_run, runs[name])
    for path in runs["procs"].glob("checkpoint-*.pth"):  # as two processes would save it
        ckpt = utils.load_checkpoint_file(str(path))
        ckpt.update(world_size=2, rng=ckpt["rng"] * 2)
        torch.save(ckpt, path)
    kmeans = torch.load(w.tokenizer, weights_only=True)
    w_vocab = kmeans["codebook"].shape[0]
    kmeans["codebook"] = kmeans["codebook"] + 1e-3  # the same vocabulary, other codes
    torch.save(kmeans, tmp_path / "kmeans_other.pth")
    kmeans["codebook"] = kmeans["codebook"][:16]  # half the vocabulary
    torch.save(kmeans, tmp_path / "kmeans_16.pth")
    tokenizers = {"tokenizer": "kmeans_other.pth", "vocabulary": "kmeans_16.pth"}
    data = tmp_path / "data"
    shutil.copytree(w.imagenet_root, data)
    images = [p for p in sorted(data.rglob("*.png")) if "fg_mask" not in p.parts]
    renamed = images[0].with_name("renamed.png")  # as many images, one of another name
    images[0].rename(renamed)
    fg_mask = Path(datasets.fg_mask_path(str(data), renamed.parent.name, str(images[0])))
    fg_mask.rename(fg_mask.with_name("renamed.png"))
    count = len(images)
    results = _run_cases(tmp_path, {
        name: {"script": "run_pretraining.py", "argv": _train_argv(
            w, runs[name], "--epochs", "2", **({"data": data} if name == "images" else {}))
            + (["--tokenizer_weight_path", str(tmp_path / tokenizers[name])]
               if name in tokenizers else [])}
        for name in runs})
    _clear_error(results["procs"], "was trained by 2 process(es) and holds the random "
                 "states of 2; this run has 1. Resume it with 2", "--init_ckpt")
    _clear_error(results["tokenizer"], "was trained on other data; this run has another "
                 "visual tokenizer")
    err = _clear_error(results["vocabulary"], "was trained on other data; this run has a "
                       f"visual tokenizer of 16 codes (its lm_head predicts {w_vocab}: "
                       "--tokenizer_model or --tokenizer_weight_path differs). Resume it with "
                       "the tokenizer it was trained with")
    assert "--model" not in err
    assert not any("extending the run" in r["out"] for r in results.values())
    _clear_error(results["images"], "another set of training images "
                 f"({count} then, {count} now")
    for run in runs.values():
        assert utils.load_checkpoint_file(str(run / "checkpoint-last.pth"))["epoch"] == 0
        assert not (run / "checkpoint-1.pth").exists()


def test_a_checkpoint_saved_before_the_data_identity_resumes_unchecked():
    """A checkpoint's arguments without the tokenizer's fingerprint or the images' digest
    (written before they were saved) pass; each one saved is checked on its own, and the
    vocabulary (the lm_head's rows) always."""
    now = {"tokenizer_fingerprint": "kmeans:1", "train_images": 5, "train_images_sha256": "a",
           "train_image_sizes_sha256": "s", "train_image_contents_sha256": "c"}
    for saved in (None, {"epochs": 3}, {"tokenizer_fingerprint": "kmeans:1"},
                  {"train_images": 5, "train_images_sha256": "a"}):
        run_pretraining.check_same_data(saved, now, "ck.pth")
    with pytest.raises(utils.CheckpointError, match="ck.pth was trained on other data; this "
                                                    "run has another set of training images "
                                                    r"\(4 then, 5 now"):
        run_pretraining.check_same_data({"train_images": 4, "train_images_sha256": "b"}, now,
                                        "ck.pth")
    head = {"lm_head.weight": torch.zeros(32, 8)}
    for saved in (None, {"epochs": 3}, {"tokenizer_fingerprint": "kmeans:1"}):
        run_pretraining.check_same_tokenizer({"model": head, "args": saved}, "kmeans:1", 32,
                                             "ck.pth")
    with pytest.raises(utils.CheckpointError, match="another visual tokenizer"):
        run_pretraining.check_same_tokenizer(
            {"model": head, "args": {"tokenizer_fingerprint": "kmeans:2"}}, "kmeans:1", 32,
            "ck.pth")
    with pytest.raises(utils.CheckpointError, match="a visual tokenizer of 16 codes"):
        run_pretraining.check_same_tokenizer({"model": head}, "kmeans:1", 16, "ck.pth")


def test_a_resume_on_an_image_replaced_under_its_name_is_refused(tmp_path):
    """The images' names alone let a resumed run train on an image replaced or edited
    since; their byte sizes and contents are saved too (not their mtimes, which a copy to
    another node need not keep). A checkpoint saved before the contents were is checked by
    the sizes; one without either resumes unchecked."""
    root = tmp_path / "train"
    (root / "a").mkdir(parents=True)
    for name in ("0.png", "1.png"):
        (root / "a" / name).write_bytes(b"x" * 10)

    class Images(list):  # what data_identity reads of a PretrainDataset
        samples = [(str(p), 0) for p in sorted((root / "a").iterdir())]
        mask_paths = [None, None]  # --no-fg_mask

    def identity() -> dict:
        return run_pretraining.data_identity("kmeans:1", Images([0, 1]), str(root), ["a"])

    def refused(saved: dict, now: dict) -> None:
        with pytest.raises(utils.CheckpointError, match="ck.pth was trained on other data; "
                           "this run has training images of the same names but other "
                           "contents"):
            run_pretraining.check_same_data(saved, now, "ck.pth")

    saved = identity()
    os.utime(root / "a" / "1.png", (0, 0))  # a copy that did not keep the mtime
    assert identity() == saved
    x10 = hashlib.sha256(b"x" * 10).hexdigest()  # both images' content, listed once
    assert saved[utils.TRAIN_IMAGE_HASHES] == [x10]
    (root / "a" / "1.png").write_bytes(b"x" * 9 + b"y")  # the same name and size, edited
    now = identity()
    assert now[utils.TRAIN_IMAGE_HASHES] == sorted(
        [x10, hashlib.sha256(b"x" * 9 + b"y").hexdigest()])
    assert now["train_images_sha256"] == saved["train_images_sha256"]
    assert now["train_image_sizes_sha256"] == saved["train_image_sizes_sha256"]
    refused(saved, now)
    older = {k: v for k, v in saved.items() if k != "train_image_contents_sha256"}
    run_pretraining.check_same_data(older, now, "ck.pth")  # sizes alone cannot tell
    (root / "a" / "1.png").write_bytes(b"y" * 11)  # another size
    now = identity()
    refused(saved, now)
    refused(older, now)
    del older["train_image_sizes_sha256"]
    run_pretraining.check_same_data(older, now, "ck.pth")
    assert run_pretraining.FG_MASKS not in now  # no masks read


def test_a_resume_on_remade_foreground_masks_is_refused(tmp_path):
    """Foreground masks decide where the ViT masks: masks remade (--make_fg_masks) or
    edited since the checkpoint change the run as an edited image does, and are refused;
    a checkpoint saved before masks were recorded resumes unchecked."""
    root = tmp_path / "train"
    (root / "a").mkdir(parents=True)
    (root / "fg").mkdir()
    for name in ("0.png", "1.png"):
        (root / "a" / name).write_bytes(b"x" * 10)
        (root / "fg" / name).write_bytes(b"m" * 10)

    class Images(list):
        samples = [(str(root / "a" / n), 0) for n in ("0.png", "1.png")]
        mask_paths = [str(root / "fg" / n) for n in ("0.png", "1.png")]

    def identity() -> dict:
        return run_pretraining.data_identity("kmeans:1", Images([0, 1]), str(root), ["a"])
    saved = identity()
    assert saved[run_pretraining.FG_MASKS] == hashlib.sha256(
        ",".join([hashlib.sha256(b"m" * 10).hexdigest()] * 2).encode()).hexdigest()
    (root / "fg" / "1.png").write_bytes(b"n" * 10)
    now = identity()
    with pytest.raises(utils.CheckpointError) as info:
        run_pretraining.check_same_data(saved, now, "ck.pth")
    assert str(info.value) == (
        "ck.pth was trained on other data; this run has other foreground masks (fg_mask/ "
        "remade, e.g. by --make_fg_masks, or edited since), which change where the ViT "
        "masks. Resume it with the data it was trained on, or start a new run in another "
        "--output_dir")
    older = {k: v for k, v in saved.items() if k != run_pretraining.FG_MASKS}
    run_pretraining.check_same_data(older, now, "ck.pth")


def test_every_rank_must_resume_the_same_checkpoint_with_the_same_flags(monkeypatch):
    """Nodes whose --output_dir is not one shared folder see different checkpoints, and
    nodes started with other flags would each train their own schedule under one DDP
    average: one error on every rank, naming each rank's value, not ranks training from
    different epochs or a barrier hang. Flags a node may set for itself pass."""
    args = run_pretraining.get_args_parser().parse_args(["--data_path", "d"])
    flags = {k: v for k, v in run_pretraining.schedule_view(vars(args)).items()
             if k in run_pretraining.RANKS_MUST_AGREE}
    seen = [("out/checkpoint-last.pth", 3, flags), (None, None, flags)]
    monkeypatch.setattr(utils, "all_gather_object", lambda obj: seen)
    with pytest.raises(utils.CheckpointError) as info:
        run_pretraining.check_ranks_agree("out/checkpoint-last.pth", {"epoch": 3}, args)
    assert str(info.value).startswith(
        "the processes do not see the same checkpoint to resume (rank 0: "
        "out/checkpoint-last.pth, epoch 3; rank 1: none): --output_dir")
    seen[1] = seen[0]
    run_pretraining.check_ranks_agree("out/checkpoint-last.pth", {"epoch": 3}, args)
    seen[1] = (*seen[0][:2], {**flags, "lr": 5e-3, "epochs": 4, "save_ckpt_freq": 1})
    with pytest.raises(utils.FlagError) as info:
        run_pretraining.check_ranks_agree("out/checkpoint-last.pth", {"epoch": 3}, args)
    assert str(info.value) == (
        f"the processes were started with other flags: --epochs {args.epochs} on rank 0, 4 "
        f"on rank 1; --lr {args.lr} on rank 0, 0.005 on rank 1; --save_ckpt_freq "
        f"{args.save_ckpt_freq} on rank 0, 1 on rank 1: start every node with the same "
        "command (scripts/train_multi_class.sh)")
    seen[1] = (*seen[0][:2], {**flags, "amp": "none" if flags["amp"] == "bf16" else "bf16"})
    with pytest.raises(utils.FlagError) as info:
        run_pretraining.check_ranks_agree("out/checkpoint-last.pth", {"epoch": 3}, args)
    assert str(info.value).endswith(
        "(scripts/train_multi_class.sh); without --amp a run takes bf16 where the hardware "
        "runs it fast (a GPU with bf16, a CPU with AMX tiles) and none elsewhere, so give "
        "every node one --amp")
    assert {"data_path", "output_dir", "num_workers", "cache_images", "token_cache_dir",
            "log_dir", "pin_mem", "local_rank"}.isdisjoint(run_pretraining.RANKS_MUST_AGREE)


def test_every_rank_must_read_the_same_training_images_and_tokenizer(monkeypatch, tmp_path):
    """The ranks share one token table, cached by rank 0 under its files' names: nodes
    whose copies of the data differ (in count, or in content under the same names) are
    refused on every rank before any token is computed, naming the files that differ
    from rank 0's (the digests it named before told nothing of which)."""
    base = {"tokenizer_fingerprint": "kmeans:1", "train_classes": ["a"], "train_images": 3,
            "train_images_sha256": "n" * 64, "train_image_sizes_sha256": "s" * 64,
            "train_image_contents_sha256": "c" * 64}
    root = tmp_path / "train"
    (root / "a").mkdir(parents=True)
    for name in ("0.png", "1.png", "2.png"):
        (root / "a" / name).write_bytes(name.encode())
    paths = sorted(str(p) for p in (root / "a").iterdir())
    seen = [base, dict(base)]
    mine = {f"a/{n}": utils.file_sha256(root / "a" / n) for n in ("0.png", "1.png", "2.png")}
    theirs = {"a/0.png": mine["a/0.png"], "a/1.png": "e" * 64, "a/3.png": "f" * 64}
    gathered = []

    def all_gather(obj):
        gathered.append(obj)
        return seen if len(gathered) == 1 else [obj, theirs]
    monkeypatch.setattr(utils, "all_gather_object", all_gather)
    run_pretraining.check_ranks_read_same_data(base, str(root), paths)
    assert len(gathered) == 1  # the same images: no second read of the files
    gathered.clear()
    seen[1] = {**base, "train_image_contents_sha256": "d" * 64}
    with pytest.raises(utils.LayoutError) as info:
        run_pretraining.check_ranks_read_same_data(base, str(root), paths)
    assert gathered[1] == mine
    assert str(info.value) == (
        "the processes read other training images or foreground masks (rank 0: 3 image(s); "
        "rank 1: 3 image(s), lacks a/2.png, has more a/3.png, other content: a/1.png): every "
        f"node's --data_path ({root} on this one) must hold the same files, e.g. one shared "
        "folder or a copy by `rsync -a`")
    gathered.clear()
    seen[1] = {**base, "tokenizer_fingerprint": "kmeans:2"}
    with pytest.raises(utils.FlagError, match=r"^the processes read other visual tokenizers "
                       r"\(rank 0: kmeans:1; rank 1: kmeans:2\): every node's "
                       "--tokenizer_weight_path must be the same file"):
        run_pretraining.check_ranks_read_same_data(base, str(root), paths)


def test_an_older_checkpoint_tells_its_process_count_by_its_random_states():
    """Files written before 'world_size' was saved hold one random state per process."""
    utils.check_resume_world_size({"rng": [{}]}, "c.pth")
    with pytest.raises(utils.CheckpointError, match=r"^c.pth was trained by 2 process\(es\)"):
        utils.check_resume_world_size({"rng": [{}, {}]}, "c.pth")


def test_F10_unfinished_run_with_other_epochs_names_the_way_to_extend():
    with pytest.raises(utils.CheckpointError) as info:
        utils.check_resume_args({"epochs": 3}, {"epochs": 5}, "c.pth",
                                run_pretraining.RESUME_MUST_MATCH, epoch=0, explicit=True)
    msg = str(info.value)
    assert "--epochs 3 (now 5)" in msg and "first finish its 3 epochs" in msg
    assert "--no_auto_resume" not in msg
    with pytest.raises(utils.CheckpointError, match="--no_auto_resume"):
        utils.check_resume_args({"epochs": 3}, {"epochs": 5}, "c.pth",
                                run_pretraining.RESUME_MUST_MATCH, epoch=0)


def test_a_resume_on_hardware_with_another_default_amp_names_the_flag_to_pass():
    """A run started without --amp on a bf16 GPU records bf16; the same command on a CPU
    without AMX defaults to none, which the resume refuses: the error says why and which
    --amp continues the run (fp16 only on a CUDA device, resolve_amp refuses it elsewhere)."""
    for saved, where in (("bf16", "on this machine"), ("fp16", "on a CUDA device")):
        with pytest.raises(utils.CheckpointError) as info:
            utils.check_resume_args({"amp": saved}, {"amp": "none"}, "c.pth",
                                    run_pretraining.RESUME_MUST_MATCH, epoch=0)
        assert str(info.value).startswith(f"c.pth was trained with other arguments: --amp "
                                          f"'{saved}' (now 'none'); resume it with the same")
        assert str(info.value).endswith(
            "first). Without --amp a run takes bf16 where the hardware runs it fast (a GPU "
            f"with bf16, a CPU with AMX tiles) and none elsewhere: pass --amp {saved} to "
            f"resume it {where}")
    with pytest.raises(utils.CheckpointError) as info:
        utils.check_resume_args({"lr": 1.0}, {"lr": 2.0}, "c.pth",
                                run_pretraining.RESUME_MUST_MATCH, epoch=0)
    assert "--amp" not in str(info.value)


def test_disk_full_in_save_on_master(tmp_path, monkeypatch):
    target = tmp_path / "checkpoint-last.pth"
    utils.save_on_master({"epoch": 0}, str(target))
    other = tmp_path / "protoflow" / "prototypes.pt"  # a file that is no checkpoint
    other.parent.mkdir()
    utils.save_on_master({"k": 0}, str(other))

    def full(self, data: bytes) -> int:
        self.error = OSError(errno.ENOSPC, "No space left on device")
        raise self.error

    monkeypatch.setattr(utils._CheckpointFile, "write", full)
    with pytest.raises(utils.DiskFullError) as err:
        utils.save_on_master({"epoch": 1}, str(target))
    # a new --output_dir alone holds no checkpoint (the run would start over): --resume
    assert str(err.value) == (f"no space left in {tmp_path}; {target} is intact: free space "
                              f"and re-run, or pass --resume {target} with another "
                              "--output_dir")
    assert torch.load(target, weights_only=True) == {"epoch": 0}
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-last.pth", "protoflow"]
    with pytest.raises(utils.DiskFullError) as err:  # not a checkpoint: nothing to resume
        utils.save_on_master({"epoch": 1}, str(tmp_path / "tokens.pt"))
    assert str(err.value) == (f"no space left in {tmp_path}; no earlier file was there: "
                              "free space and re-run, or choose another output folder")
    with pytest.raises(utils.DiskFullError) as err:  # intact, but no run resumes from it
        utils.save_on_master({"k": 1}, str(other))
    assert str(err.value) == (f"no space left in {other.parent}; {other} is intact: free "
                              "space and re-run")
    assert torch.load(other, weights_only=True) == {"k": 0}
    assert os.listdir(other.parent) == ["prototypes.pt"]


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_disk_full_while_copying_checkpoint_last(tmp_path, monkeypatch, code):
    """Where links are unsupported, checkpoint-last.pth is a copy of the numbered file
    just written; a full disk (or a used-up quota) then names that file as the one to
    --resume elsewhere."""
    numbered, last = tmp_path / "checkpoint-4.pth", tmp_path / "checkpoint-last.pth"
    utils.save_on_master({"epoch": 4}, str(numbered))

    def no_link(*_):
        raise OSError(errno.EPERM, "links unsupported")

    def full(*_):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "link", no_link)
    monkeypatch.setattr(shutil, "copyfileobj", full)
    with pytest.raises(utils.DiskFullError) as err:
        utils.save_on_master({"epoch": 4}, [str(numbered), str(last)])
    assert str(err.value) == (f"no space left in {tmp_path}; {numbered} is intact: free "
                              f"space and re-run, or pass --resume {numbered} with another "
                              "--output_dir")
    assert not last.exists()


# ----------------------------------------------------------------------------- evaluation
def test_F14_finished_classes_survive_an_error_and_ctrl_c_and_resume(tiny_world, tmp_path):
    w = tiny_world
    data = tmp_path / "mvtec"
    shutil.copytree(w.mvtec_root, data)
    bad = sorted((data / "coins" / "test").rglob("*.png"))[0]
    original = truncate(bad)
    out = tmp_path / "out"
    interrupt = ("import datasets\n"
                 "_real = datasets.MVTecTestDataset\n"
                 "class _Interrupted(_real):\n"
                 "    def __init__(self, root, name, *a, **k):\n"
                 "        if name == 'coins':\n"
                 "            raise KeyboardInterrupt\n"
                 "        super().__init__(root, name, *a, **k)\n"
                 "datasets.MVTecTestDataset = _Interrupted\n")
    restore = (f"open({str(bad)!r}, 'wb').write(bytes.fromhex({original.hex()!r}))\n"
               "datasets.MVTecTestDataset = _real\n")
    argv = w.run_test_argv(out, "--classes", "brick", "coins", data=data)
    results = _run_cases(tmp_path, {
        "error": {"script": "run_test.py", "argv": argv,
                  "snapshot": [str(out), str(tmp_path / "after_error")]},
        "ctrl_c": {"script": "run_test.py", "argv": argv + ["--resume_eval"], "pre": interrupt,
                   "snapshot": [str(out), str(tmp_path / "after_ctrl_c")]},
        "resume": {"script": "run_test.py", "argv": argv + ["--resume_eval"], "pre": restore},
    })
    # a bad file in the 2nd class: one error line; the 1st class is written
    _clear_error(results["error"], f"cannot read image {bad}")
    after = tmp_path / "after_error"
    lines = [json.loads(x) for x in (after / "results.partial.jsonl").read_text().splitlines()]
    assert [x["class"] for x in lines] == ["brick"]
    assert 0 <= lines[0]["record"]["image_auroc"] <= 1
    saved = json.loads((after / "results.json").read_text())
    assert list(saved["classes"]) == ["brick"] and list(saved["failed"]) == ["coins"]
    assert "| Brick |" in (after / "results.md").read_text()
    assert "**INCOMPLETE**: the means are over the 1 class(es) evaluated only. Failed: " \
        "coins (" in (after / "results.md").read_text()
    assert "| Brick |" in results["error"]["out"]
    # Ctrl-C in the 2nd class of a resumed run: brick reused (not recomputed), kept
    ctrl_c = results["ctrl_c"]
    assert ctrl_c["code"] == 1 and "Traceback" not in ctrl_c["err"]
    assert "brick: done in an earlier run" in ctrl_c["out"] + ctrl_c["err"]
    assert "interrupted in class coins" in ctrl_c["err"]
    saved = json.loads((tmp_path / "after_ctrl_c" / "results.json").read_text())
    assert saved["failed"] == {"coins": "interrupted (Ctrl-C)"}
    assert _same(saved["classes"]["brick"], lines[0]["record"])
    # fixed, resumed: only coins is evaluated; the table has both
    resume = results["resume"]
    assert resume["code"] == 0, resume["err"][-3000:]
    saved = json.loads((out / "results.json").read_text())
    assert list(saved["classes"]) == ["brick", "coins"] and "failed" not in saved
    assert "INCOMPLETE" not in (out / "results.md").read_text()
    assert _same(saved["classes"]["brick"], lines[0]["record"])
    partial = [json.loads(x)["class"]
               for x in (out / "results.partial.jsonl").read_text().splitlines()]
    assert partial == ["brick", "coins"]


def test_cli_prints_user_errors_as_one_line_and_keeps_other_tracebacks(capsys):
    def bad_flag() -> None:
        raise utils.FlagError("--x 0: give at least 1")

    assert utils.cli(bad_flag) == 2
    assert capsys.readouterr().err == "error: --x 0: give at least 1\n"
    assert utils.cli(lambda: 1) == 1 and utils.cli(lambda: {"a": 1}) == 0
    with pytest.raises(ZeroDivisionError):  # a bug: its traceback is kept
        utils.cli(lambda: 1 / 0)
    assert utils.cli(lambda: open("/nonexistent/x"), user_errors=(OSError,)) == 2
    assert "error: [Errno 2]" in capsys.readouterr().err
