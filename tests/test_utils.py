"""utils.py: schedules, parameter groups, atomic checkpoints, exact RNG resume, logs,
distributed helpers (one process and a 2-process gloo group)."""
from __future__ import annotations

import argparse
import ctypes
import datetime
import errno
import io
import json
import math
import os
import time
import random
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import datasets
import metrics
import utils
from conftest import read_jsonl, run_ranks
from masking_generator import MaskGenerator, MaskingPolicy


# ----------------------------------------------------------------------------- schedules
def test_cosine_scheduler_warmup_then_half_cosine():
    s = utils.cosine_scheduler(1.0, 0.1, epochs=5, niter_per_ep=4, warmup_epochs=2)
    assert s.shape == (20,)
    np.testing.assert_allclose(s[:8], np.linspace(0.0, 1.0, 8))
    rest = s[8:]
    # i-th cosine step: final + (base - final) / 2 * (1 + cos(pi * i / 12))
    expected = [0.1 + 0.45 * (1 + math.cos(math.pi * i / 12)) for i in range(12)]
    np.testing.assert_allclose(rest, expected)
    assert rest[0] == pytest.approx(1.0)
    assert np.all(np.diff(rest) < 0) and rest[-1] > 0.1


def test_cosine_scheduler_warmup_steps_override_and_constant():
    s = utils.cosine_scheduler(2.0, 0.0, epochs=2, niter_per_ep=5, warmup_epochs=1,
                               start_warmup_value=1.0, warmup_steps=3)
    np.testing.assert_allclose(s[:3], [1.0, 1.5, 2.0])
    assert len(s) == 10
    for unused in (0, -1):  # --warmup_steps <= 0: --warmup_epochs sets the warm-up
        s = utils.cosine_scheduler(2.0, 0.0, epochs=2, niter_per_ep=3, warmup_epochs=1,
                                   start_warmup_value=1.0, warmup_steps=unused)
        np.testing.assert_allclose(s[:3], [1.0, 1.5, 2.0])
    np.testing.assert_allclose(utils.cosine_scheduler(0.05, 0.05, 3, 7), 0.05)


# ----------------------------------------------------------------------------- parameter groups
class _Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 4))
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, 4))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 4))
        self.fc = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.gamma = nn.Parameter(torch.ones(4))
        self.frozen = nn.Parameter(torch.ones(4, 4), requires_grad=False)


def test_param_groups_skip_1d_bias_cls_pos_but_decay_mask_token():
    model = _Toy()
    no_decay, decay = utils.param_groups_weight_decay(model, 0.05)
    name = {id(p): n for n, p in model.named_parameters()}
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.05
    assert sorted(name[id(p)] for p in no_decay["params"]) == [
        "cls_token", "fc.bias", "gamma", "norm.bias", "norm.weight", "pos_embed"]
    assert sorted(name[id(p)] for p in decay["params"]) == ["fc.weight", "mask_token"]


def test_set_step_hyperparams_leaves_undecayed_group_at_zero():
    opt = torch.optim.AdamW(utils.param_groups_weight_decay(_Toy(), 0.05), lr=1.0)
    utils.set_step_hyperparams(opt, lr=0.3, weight_decay=0.02)
    assert [g["lr"] for g in opt.param_groups] == [0.3, 0.3]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 0.02]


def test_a_weight_decay_schedule_from_zero_reaches_the_decayed_group():
    """--weight_decay 0 --weight_decay_end 0.05: the decayed group follows the schedule up
    from 0, also after the optimizer state's round trip through a checkpoint; a group
    saved without its scale (an older checkpoint) keeps the old rule."""
    opt = torch.optim.AdamW(utils.param_groups_weight_decay(_Toy(), 0.0), lr=1.0)
    for wd in (0.0, 0.01, 0.05):
        utils.set_step_hyperparams(opt, lr=0.3, weight_decay=wd)
        assert [g["weight_decay"] for g in opt.param_groups] == [0.0, wd]
    fresh = torch.optim.AdamW(utils.param_groups_weight_decay(_Toy(), 0.0), lr=1.0)
    fresh.load_state_dict(opt.state_dict())
    utils.set_step_hyperparams(fresh, lr=0.3, weight_decay=0.02)
    assert [g["weight_decay"] for g in fresh.param_groups] == [0.0, 0.02]
    old = torch.optim.AdamW([{"params": [nn.Parameter(torch.ones(2))], "weight_decay": 0.0},
                             {"params": [nn.Parameter(torch.ones(2, 2))], "weight_decay": 0.05}])
    utils.set_step_hyperparams(old, lr=0.3, weight_decay=0.02)
    assert [g["weight_decay"] for g in old.param_groups] == [0.0, 0.02]


# ----------------------------------------------------------------------------- autocast
def test_amp_choices():
    assert utils.resolve_amp("none", "cpu") == "none"
    assert utils.resolve_amp(None, "cpu") == utils.default_amp("cpu")
    # a FlagError: the entry points print it as one `error:` line, exit 2
    with pytest.raises(utils.FlagError, match="fp16 needs a CUDA device .* not --device cpu"):
        utils.resolve_amp("fp16", "cpu")
    with pytest.raises(utils.FlagError, match="choose one of"):
        utils.resolve_amp("fp8", "cpu")
    a = torch.randn(4, 4)
    with utils.amp_autocast("cpu", "bf16"):
        assert (a @ a).dtype == torch.bfloat16
    with utils.amp_autocast("cpu", "none"):
        assert (a @ a).dtype == torch.float32
    assert not utils.make_grad_scaler("cpu", "bf16").is_enabled()


def test_a_device_torch_cannot_use_is_a_flag_error(monkeypatch):
    """--device is checked before any work: a name torch does not know, CUDA without a
    GPU, a GPU index past the last one; each a FlagError naming the flag and the fix."""
    assert utils.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(utils.FlagError, match="--device 'gpu' is not a device: pass cpu, "
                                              "cuda or cuda:<index>"):
        utils.resolve_device("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(utils.FlagError, match="--device cuda was asked for but torch sees no "
                                              "CUDA GPU: pass --device cpu"):
        utils.resolve_device("cuda")
    with pytest.raises(utils.FlagError, match="DEVICE cuda was asked for but torch sees no "
                                              "CUDA GPU: set DEVICE=cpu"):
        utils.resolve_device("cuda", "DEVICE")  # scripts/demo.sh's environment variable
    with pytest.raises(utils.FlagError, match="torch sees no CUDA GPU"):
        utils.init_distributed("cuda")  # the entry points' first step
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert utils.resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(utils.FlagError, match="--device cuda:2: torch sees 2 CUDA GPU.s., "
                                              "cuda:0 to cuda:1"):
        utils.resolve_device("cuda:2")


def test_deterministic_mode_is_strict_and_scoped(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = torch.are_deterministic_algorithms_enabled()
    with utils.deterministic_algorithms(True):
        assert torch.are_deterministic_algorithms_enabled()
        # strict: a kernel without a deterministic version raises, it does not just warn
        assert not torch.is_deterministic_algorithms_warn_only_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert torch.are_deterministic_algorithms_enabled() == before
    with utils.deterministic_algorithms(False):
        assert torch.are_deterministic_algorithms_enabled() == before


# ----------------------------------------------------------------------------- RNG
def _draws(policy: MaskingPolicy | None = None) -> tuple:
    masks = () if policy is None else tuple(policy.rng.integers(0, 1 << 30, 3).tolist())
    return (random.random(), float(np.random.rand()), float(np.random.randn()),
            torch.rand(3).tolist(), masks)


def test_rng_capture_restore_is_exact():
    utils.seed_everything(5)
    np.random.randn()  # leave a cached gaussian in numpy's legacy state
    state = utils.capture_rng_state()
    first = _draws()
    utils.seed_everything(99)
    utils.restore_rng_state(state)
    assert _draws() == first


def test_cpu_random_state_restores_no_cuda_stream_and_says_so():
    """A checkpoint written on the CPU holds no CUDA state: restoring it for a CUDA run
    reports False (the CPU streams are restored) instead of claiming success."""
    utils.seed_everything(5)
    state = utils.capture_rng_state()
    assert state["cuda"] is None or not torch.cuda.is_available()
    first = _draws()
    utils.seed_everything(99)
    assert utils.restore_rng_state(state, "cpu") is True
    assert _draws() == first
    if state["cuda"] is None:
        utils.seed_everything(99)
        assert utils.restore_rng_state(state, "cuda") is False
        assert _draws() == first


def test_seed_differs_per_rank():
    assert utils.seed_everything(3, rank=1) == 4
    a = torch.rand(2)
    utils.seed_everything(3, rank=0)
    assert not torch.equal(a, torch.rand(2))


# ----------------------------------------------------------------------------- checkpoints
def _policy(seed: int) -> MaskingPolicy:
    return MaskingPolicy(MaskGenerator(window_size=(2, 2)), ["a", "b"], dynamic_start=0,
                         seed=seed)


def _observed(policy: MaskingPolicy) -> MaskingPolicy:
    masks = torch.tensor([[True, False, True, False]])
    policy.observe(torch.tensor([1]), masks, torch.tensor([[3.5, 0.0, 1.5, 0.0]]))
    return policy


def _trained(seed: int):
    torch.manual_seed(seed)
    model = _Toy()
    opt = torch.optim.AdamW(utils.param_groups_weight_decay(model, 0.05), lr=0.1)
    model.fc(torch.randn(3, 4)).sum().backward()
    opt.step()
    return model, opt


def test_training_state_round_trip(tmp_path):
    model, opt = _trained(0)
    scaler = utils.make_grad_scaler("cpu", "none")
    policy = _observed(_policy(11))
    paths = utils.save_training_state(
        str(tmp_path), [4, "last"], epoch=4, model=model, optimizer=opt, scaler=scaler,
        args={"lr": 0.1, "opt_betas": [0.9, 0.999], "resume": None},
        masking=policy.state_dict())
    assert [os.path.basename(p) for p in paths] == ["checkpoint-4.pth", "checkpoint-last.pth"]
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-4.pth", "checkpoint-last.pth"]
    expected = _draws(policy)

    model2, opt2 = _trained(1)
    policy2 = _policy(0)
    info = utils.load_training_state(paths[1], model=model2, optimizer=opt2, scaler=scaler,
                                     masking=policy2)
    assert info["start_epoch"] == 5 and info["rng_restored"]
    assert info["args"]["opt_betas"] == [0.9, 0.999]
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)
    sa, sb = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k]["exp_avg"], sb[k]["exp_avg"]) for k in sa)
    torch.testing.assert_close(policy2.dynamic.mean_losses(), policy.dynamic.mean_losses(),
                               equal_nan=True, rtol=0, atol=0)
    assert int(policy2.dynamic.counts.sum()) == 2
    assert _draws(policy2) == expected


def test_the_fp16_loss_scale_is_saved_and_restored(tmp_path):
    """An fp16 run resumes at its own loss scale and growth settings, not at a fresh
    scaler's 2**16 (which would overflow again and skip steps the run did not skip)."""
    model, opt = _trained(0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=7)
    path = utils.save_training_state(str(tmp_path), [1], epoch=1, model=model, optimizer=opt,
                                     scaler=scaler, args={}, masking=None)[0]
    restored = utils.make_grad_scaler("cpu", "fp16")
    assert restored.get_scale() == 2.0 ** 16
    model2, opt2 = _trained(1)
    utils.load_training_state(path, model=model2, optimizer=opt2, scaler=restored)
    assert restored.get_scale() == 2.0 ** 10 and restored.get_growth_interval() == 7


def test_each_rank_resumes_its_own_random_streams(tmp_path, monkeypatch):
    """A training state holds every rank's random streams; rank 1 of two restores its
    own, not rank 0's (every rank would then draw rank 0's drop-path and masks)."""
    model, opt = _trained(0)
    states = []
    for seed in (5, 6):
        utils.seed_everything(seed)
        states.append(utils.capture_rng_state())
    expected = _draws()  # rank 1's streams, from its saved state on
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 0,
                "world_size": 2, "rng": states}, tmp_path / "two.pth")
    model2 = _trained(1)[0]
    monkeypatch.setattr(utils, "get_rank", lambda: 1)
    monkeypatch.setattr(utils, "get_world_size", lambda: 2)
    utils.seed_everything(99)
    info = utils.load_training_state(str(tmp_path / "two.pth"), model=model2)
    assert info["rng_restored"] and _draws() == expected


def test_earlier_checkpoint_layout_restores_dynamic_masking_and_mask_stream(tmp_path):
    """Checkpoints written before MaskingPolicy: 'dynamic_masking' at the top and each
    rank's 'mask_rng' inside 'rng'."""
    model, opt = _trained(0)
    policy = _observed(_policy(11))
    state = policy.state_dict()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 2,
                "dynamic_masking": state["dynamic_masking"], "sampler_seed": 0,
                "rng": [dict(utils.capture_rng_state(), mask_rng=state["mask_rng"][0])]},
               tmp_path / "old.pth")
    expected = _draws(policy)
    policy2 = _policy(0)
    info = utils.load_training_state(str(tmp_path / "old.pth"), model=_trained(1)[0],
                                     masking=policy2)
    assert info["start_epoch"] == 3
    assert torch.equal(policy2.dynamic.counts, policy.dynamic.counts)
    assert _draws(policy2)[-1] == expected[-1]


def test_a_training_state_of_the_original_code_resumes_with_fresh_random_streams(tmp_path,
                                                                                capsys):
    """BEiT's and PMAD's code save no random states and no process count: the run
    resumes (it cannot be checked) and says that the streams restart from --seed."""
    model, opt = _trained(0)
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 5},
               tmp_path / "original.pth")
    model2, opt2 = _trained(1)
    info = utils.load_training_state(str(tmp_path / "original.pth"), model=model2,
                                     optimizer=opt2)
    assert info["start_epoch"] == 6 and not info["rng_restored"]
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 model2.state_dict().values()))
    assert "holds no random states (the original code's checkpoints do not): random " \
           "streams restart from --seed" in capsys.readouterr().out


def test_model_only_file_starts_at_epoch_zero(tmp_path):
    model, _ = _trained(0)
    torch.save({"model": model.state_dict()}, tmp_path / "released.pth")
    info = utils.load_training_state(str(tmp_path / "released.pth"), model=_Toy())
    assert info["start_epoch"] == 0 and not info["rng_restored"]


def test_original_namespace_args_load_as_dict(tmp_path):
    path = tmp_path / "orig.pth"
    torch.save({"model": {}, "epoch": 3,
                "args": argparse.Namespace(lr=1.5e-3, model="vit_base_patch16_224_8k_vocab")},
               path)
    ckpt = utils.load_checkpoint_file(str(path))
    assert ckpt["args"] == {"lr": 1.5e-3, "model": "vit_base_patch16_224_8k_vocab"}


def test_failed_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint-last.pth")
    utils.save_on_master({"epoch": 1, "w": torch.ones(3)}, path)

    real_save = torch.save

    def crash(obj, f, *a, **k):
        real_save({"epoch": 2, "w": torch.zeros(100)}, f)  # part of the bytes, then death
        f.truncate(40)
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        utils.save_on_master({"epoch": 2}, path)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["checkpoint-last.pth"]  # no temp file left behind
    ckpt = utils.load_checkpoint_file(path)
    assert ckpt["epoch"] == 1 and torch.equal(ckpt["w"], torch.ones(3))


def test_failed_write_atomic_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "mask.png"
    utils.write_atomic(path, lambda tmp: Path(tmp).write_bytes(b"old"))
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["mask.png"]

    def fail(tmp: str) -> None:
        Path(tmp).write_bytes(b"half")  # part of the bytes, then an error
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        utils.write_atomic(path, fail)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["mask.png"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_the_stale_tmp_cleaner_removes_what_a_killed_write_atomic_left(tmp_path):
    """A writer killed mid-write leaves tmp_name(path), named by its pid; once that
    process is gone, remove_stale_tmp_files removes it and only it."""
    names = ["coreset.npy", "mask.png", "checkpoint-last.pth", "log.txt"]
    for name in names:  # every kind of file the project writes through write_atomic
        tmp = os.path.basename(utils.tmp_name(str(tmp_path / name)))
        assert tmp == f".{name}.tmp-{utils._host_label()}-{os.getpid()}"
        match = utils.TMP_PATTERN.search(tmp)
        assert match.groups() == (utils._host_label(), str(os.getpid()))
    pid = os.fork()
    if pid == 0:  # the writer, killed after writing part of the file
        try:
            utils.write_atomic(tmp_path / "coreset.npy",
                               lambda tmp: (Path(tmp).write_bytes(b"half"), os._exit(0)))
        finally:
            os._exit(1)
    assert os.waitpid(pid, 0)[1] == 0
    (tmp_path / "mask.png").write_bytes(b"whole")
    live = Path(utils.tmp_name(str(tmp_path / "log.txt")))  # this process's write: kept
    live.write_bytes(b"x")
    left = tmp_path / f".coreset.npy.tmp-{utils._host_label()}-{pid}"
    assert sorted(os.listdir(tmp_path)) == sorted([left.name, "mask.png", live.name])
    assert utils.remove_stale_tmp_files(tmp_path) == [str(left)]
    assert sorted(os.listdir(tmp_path)) == sorted(["mask.png", live.name])


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_the_stale_cleaner_removes_a_dead_writers_staging_folder(tmp_path):
    """predict.py stages its outputs in a tmp_name folder: one a killed run left (its pid
    gone) is removed with what it holds; a live one, another machine's recent one and other
    folders stay. Another machine's untouched for a day is removed (a restarted container
    has a new host name). An older version's name, without a host, counts as this
    machine's."""
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)  # a pid that is no process now
    dead = tmp_path / f".predict.tmp-{utils._host_label()}-{pid}"
    legacy = tmp_path / f".log.txt.tmp-{pid}"  # an older version's name: of this machine
    legacy.write_bytes(b"x")
    (dead / "heatmaps").mkdir(parents=True)
    (dead / "heatmaps" / "a.png").write_bytes(b"x" * 10)
    (dead / "dangling").symlink_to(tmp_path / "nowhere")
    live = Path(utils.tmp_name(str(tmp_path / "predict")))
    live.mkdir()
    # a user's folder of a like name (no leading dot), and a pid no system gives: kept
    # and another machine's, whose writer may be alive (a folder shared over NFS): kept
    # while anything in it changed within OTHER_HOST_STALE_S
    keep = ["heatmaps", f"scans.tmp-{pid}", ".x.tmp-99999999999999999999",
            f".predict.tmp-other-host-{pid}"]
    for name in keep:
        (tmp_path / name).mkdir()
    day = utils.OTHER_HOST_STALE_S + 60
    recent = tmp_path / keep[-1] / "heatmaps" / "a.png"  # the one file written of late
    recent.parent.mkdir()
    recent.write_bytes(b"x")
    old = time.time() - day
    for path in (tmp_path / keep[-1], recent.parent):
        os.utime(path, (old, old))
    gone = tmp_path / f".ckpt.pth.tmp-old-host-{pid}"  # a dead container's, a day old
    gone.write_bytes(b"x" * 2 ** 20)
    os.utime(gone, (old, old))
    assert utils.remove_stale_tmp_files(tmp_path) == [str(gone), str(legacy), str(dead)]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, *keep])


def test_read_json_object_names_the_file_and_the_fix(tmp_path):
    """A JSON object comes back as a dict; a missing file, broken JSON or another JSON
    value is the given UserError kind with the file and the fix in its message."""
    good, broken, listed = tmp_path / "good.json", tmp_path / "broken.json", tmp_path / "l.json"
    good.write_text('{"a": [1, 2]}')
    broken.write_text('{"a": ')
    listed.write_text("[1]")
    assert utils.read_json_object(good, "fix it") == {"a": [1, 2]}
    with pytest.raises(utils.BadFileError, match=r"none.json is not a readable JSON file "
                       r"\(\[Errno 2\] No such file or directory: .*\): fix it$"):
        utils.read_json_object(tmp_path / "none.json", "fix it")
    with pytest.raises(utils.CheckpointError, match=r"broken.json is not a readable JSON file "
                       r"\(Expecting value: line 1 column 7 \(char 6\)\): fix it$"):
        utils.read_json_object(broken, "fix it", utils.CheckpointError)
    with pytest.raises(utils.BadFileError) as err:
        utils.read_json_object(listed, "fix it")
    assert str(err.value) == f"{listed} holds a JSON list, not an object: fix it"


def test_float_at_least_takes_the_bound_and_refuses_below_it():
    """run_test.py's and predict.py's --sigma: 0 (no smoothing) is allowed; a negative
    value, which would silently also mean no smoothing, is refused, as are inf and nan."""
    sigma = utils.float_at_least(0)
    assert sigma("0") == 0.0 and sigma("4") == 4.0 and sigma("0.5") == 0.5
    for bad in ("-0.5", "inf", "nan"):
        with pytest.raises(argparse.ArgumentTypeError) as err:
            sigma(bad)
        assert str(err.value) == f"{bad} is not a finite number >= 0"
    with pytest.raises(argparse.ArgumentTypeError, match="'x' is not a number"):
        sigma("x")
    parser = argparse.ArgumentParser()
    parser.add_argument("--sigma", type=sigma)
    with pytest.raises(SystemExit):
        parser.parse_args(["--sigma", "-1"])


def test_one_write_for_several_names_then_independent_files(tmp_path):
    d = str(tmp_path)
    numbered, last = utils.checkpoint_path(d, 19), utils.checkpoint_path(d, "last")
    utils.save_on_master({"epoch": 19}, [numbered, last])
    utils.save_on_master({"epoch": 20}, last)  # replaces 'last' only
    assert utils.load_checkpoint_file(numbered)["epoch"] == 19
    assert utils.load_checkpoint_file(last)["epoch"] == 20
    assert sorted(os.listdir(d)) == ["checkpoint-19.pth", "checkpoint-last.pth"]


class _Crash(Exception):
    """A process dying at a chosen point."""


def test_a_crash_between_the_numbered_checkpoint_and_last_loses_nothing(tmp_path,
                                                                         monkeypatch):
    """fit names 'last' first; checkpoint-1.pth is still written whole before
    checkpoint-last.pth links to it. A crash between the two (the link raising) keeps
    checkpoint-1.pth: auto-resume takes it (epoch 1 > 0), and relink_last_checkpoint
    then points checkpoint-last.pth at it, once."""
    d = str(tmp_path)
    model, opt = _trained(0)
    kw = dict(model=model, optimizer=opt, scaler=utils.make_grad_scaler("cpu", "none"),
              args={}, masking=None)
    utils.save_training_state(d, ["last"], epoch=0, **kw)

    def crash(src: str, dst: str) -> None:
        raise _Crash

    monkeypatch.setattr(utils, "_link_or_copy", crash)
    with pytest.raises(_Crash):
        utils.save_training_state(d, ["last", 1], epoch=1, **kw)
    monkeypatch.undo()
    numbered, last = utils.checkpoint_path(d, 1), utils.checkpoint_path(d, "last")
    assert sorted(os.listdir(d)) == ["checkpoint-1.pth", "checkpoint-last.pth"]
    assert utils.load_checkpoint_file(numbered)["epoch"] == 1
    assert utils.load_checkpoint_file(last)["epoch"] == 0
    assert utils.find_latest_checkpoint(d) == numbered
    assert utils.resolve_resume("", True, d) == numbered
    assert utils.relink_last_checkpoint(d, numbered, 1)
    assert utils.load_checkpoint_file(last)["epoch"] == 1 and os.path.samefile(last, numbered)
    assert not utils.relink_last_checkpoint(d, numbered, 1)  # caught up: left alone
    assert sorted(os.listdir(d)) == ["checkpoint-1.pth", "checkpoint-last.pth"]


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names an fd via /proc")
def test_the_copy_where_links_are_unsupported_is_fsynced_before_its_rename(tmp_path,
                                                                           monkeypatch):
    """On a file system without hard links checkpoint-last.pth is a copy of the numbered
    file; its data reaches the disk (fsync) before the rename publishes it."""
    d = str(tmp_path)
    numbered, last = utils.checkpoint_path(d, 3), utils.checkpoint_path(d, "last")
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def no_link(src: str, dst: str) -> None:
        raise OSError(errno.EPERM, "hard links unsupported")

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src: str, dst: str) -> None:
        events.append(("replace", src))
        real_replace(src, dst)

    monkeypatch.setattr(os, "link", no_link)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    utils.save_on_master({"epoch": 3, "w": torch.arange(5.0)}, [numbered, last])
    monkeypatch.undo()
    copy_tmp = os.path.realpath(utils.tmp_name(last))
    assert ("fsync", copy_tmp) in events and ("replace", copy_tmp) in events
    assert events.index(("fsync", copy_tmp)) < events.index(("replace", copy_tmp))
    assert not os.path.samefile(numbered, last)  # a copy, not a link
    with open(numbered, "rb") as a, open(last, "rb") as b:
        assert a.read() == b.read()
    assert torch.equal(utils.load_checkpoint_file(last)["w"], torch.arange(5.0))


def test_find_latest_checkpoint_skips_partial_and_temp_files(tmp_path):
    d = str(tmp_path)
    assert utils.find_latest_checkpoint(d) is None
    for epoch in (19, 39):
        utils.save_on_master({"epoch": epoch}, utils.checkpoint_path(d, epoch))
    utils.save_on_master({"epoch": 41}, utils.checkpoint_path(d, "last"))
    # a temp file of a newer write in flight, a truncated newer file, an unrelated name
    utils.save_on_master({"epoch": 60}, os.path.join(d, ".checkpoint-last.pth.tmp-1"))
    with open(utils.checkpoint_path(d, 59), "wb") as f:
        f.write(b"PK\x03\x04 truncated")
    utils.save_on_master({"epoch": 99}, os.path.join(d, "checkpoint-best.pth"))
    assert utils.find_latest_checkpoint(d) == utils.checkpoint_path(d, "last")
    os.remove(utils.checkpoint_path(d, "last"))
    assert utils.find_latest_checkpoint(d) == utils.checkpoint_path(d, 39)


def _cut_checkpoint(path: str, epoch: int) -> str:
    """A checkpoint of `epoch` cut short at 100,000 bytes (`head -c 100000`, as a full
    disk or a killed copy leaves it); -> the message its reading raises."""
    utils.save_on_master({"epoch": epoch, "w": torch.zeros(100_000)}, path)
    with open(path, "rb") as f:
        head = f.read(100_000)
    with open(path, "wb") as f:
        f.write(head)
    with pytest.raises(utils.CheckpointError) as err:
        utils.load_checkpoint_file(path)
    return str(err.value)


def test_auto_resume_refuses_a_folder_whose_checkpoints_are_all_unreadable(tmp_path, capsys):
    """A truncated checkpoint-last.pth, the folder's only checkpoint: auto-resume names
    it and the fix instead of starting over at epoch 0 (as --resume DIR does); an older
    readable one is resumed, and the line says which and why."""
    d = str(tmp_path)
    last = utils.checkpoint_path(d, "last")
    reason = _cut_checkpoint(last, 5)
    with pytest.raises(utils.CheckpointError) as err:
        utils.resolve_resume("", True, d)
    assert str(err.value) == (
        f"{d} holds checkpoint files but none is readable:\n  {reason}\nFix: delete it (or "
        "them), or pass --no_auto_resume to start afresh (the files first move to "
        "<output_dir>/previous-<UTC time>/)")
    with pytest.raises(utils.CheckpointError, match=f"none is readable:\n  {last} is not"):
        utils.resolve_resume(d, True, str(tmp_path / "elsewhere"))
    assert utils.resolve_resume("", False, d) is None  # --no_auto_resume: afresh
    older = utils.checkpoint_path(d, 3)
    utils.save_on_master({"epoch": 3}, older)
    capsys.readouterr()
    assert utils.resolve_resume("", True, d) == older
    assert capsys.readouterr().out == (
        f"[auto_resume] skipping 1 unreadable checkpoint(s); resuming {older} (epoch 3), "
        f"the newest readable one:\n  {reason}\n")


def _saved(path: Path, epoch: int, resume: str = "") -> str:
    utils.save_on_master({"epoch": epoch, "args": {"resume": resume}}, str(path))
    return str(path)


def test_the_same_resume_command_again_continues_its_output_dir(tmp_path, capsys):
    """`--resume a/... --output_dir b` re-run after a crash continues b's newer epochs of
    the run started there from it (said), not a's checkpoint again; --no_auto_resume
    starts over from it, and checkpoints of another origin or no newer epoch leave
    --resume as given, as does an explicit --resume of b's own older checkpoint (a
    roll-back)."""
    a, b = tmp_path / "a", tmp_path / "b"
    start = _saved(a / "checkpoint-last.pth", 1)
    for given in (start, str(a)):  # the file, or its folder, as the first command named it
        newest = _saved(b / "checkpoint-last.pth", 4, resume=given)
        _saved(b / "checkpoint-2.pth", 2, resume=given)
        capsys.readouterr()
        assert utils.resolve_resume(given, True, str(b)) == newest
        assert capsys.readouterr().out == (
            f"[resume] {b} already holds epoch 4 of the run started there from --resume "
            f"{given}: continuing {newest}, not {start} again (pass --no_auto_resume to "
            "start over from it)\n")
    assert utils.resolve_resume(str(a), False, str(b)) == start
    rollback = str(b / "checkpoint-2.pth")
    assert utils.resolve_resume(rollback, True, str(b)) == rollback
    _saved(b / "checkpoint-last.pth", 4, resume=rollback)  # b went on from its roll-back
    assert utils.resolve_resume(rollback, True, str(b)) == rollback  # rolled back again
    _saved(a / "checkpoint-last.pth", 4)  # a went on as far: b's are not newer
    assert utils.resolve_resume(str(a), True, str(b)) == start
    _saved(a / "checkpoint-last.pth", 1)
    _saved(b / "checkpoint-last.pth", 4, resume=str(tmp_path / "c"))  # another origin
    _saved(b / "checkpoint-2.pth", 2)
    assert utils.resolve_resume(str(a), True, str(b)) == start


def test_find_latest_checkpoint_looks_at_the_folder_itself_only(tmp_path):
    """An earlier run set aside in previous-<time>/ (or any subfolder) and a folder that
    happens to be named like a checkpoint are never resumed from."""
    d = str(tmp_path)
    utils.save_on_master({"epoch": 1}, utils.checkpoint_path(d, "last"))
    utils.save_on_master({"epoch": 9}, os.path.join(d, "previous-20240101T000000Z",
                                                    "checkpoint-9.pth"))
    os.makedirs(os.path.join(d, "checkpoint-20.pth"))
    assert utils.find_latest_checkpoint(d) == utils.checkpoint_path(d, "last")
    assert utils.checkpoint_files(d) == [utils.checkpoint_path(d, "last")]


def _earlier_run(folder: Path) -> dict[str, bytes]:
    """A finished run's files in `folder`: checkpoints, log.txt, TensorBoard events in
    tb/, the token cache and a file of the user's. -> {relative path: content}."""
    files = {"checkpoint-1.pth": b"c1", "checkpoint-3.pth": b"c3",
             "checkpoint-last.pth": b"cl", "log.txt": b'{"epoch": 0}\n',
             "tb/events.out.tfevents.1.host": b"ev"}
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    (folder / "token_cache").mkdir()
    (folder / "token_cache" / "t.npy").write_bytes(b"t")
    (folder / "notes.md").write_bytes(b"mine")
    return files


def test_archive_previous_run_moves_the_runs_files_and_deletes_nothing(tmp_path):
    import datetime
    now = datetime.datetime(2024, 5, 6, 7, 8, 9, tzinfo=datetime.timezone.utc)
    out = tmp_path / "out"
    out.mkdir()
    assert utils.archive_previous_run(str(out), now=now) is None  # nothing there
    files = _earlier_run(out)
    folder, moved = utils.archive_previous_run(str(out), str(out / "tb"), now=now)
    assert folder == str(out / "previous-20240506T070809Z")
    assert sorted(moved) == sorted(files)
    for rel, data in files.items():
        assert (Path(folder) / rel).read_bytes() == data and not (out / rel).exists()
    # the token cache (reusable) and files that are not the run's stay; tb/ itself too
    assert sorted(os.listdir(out)) == ["notes.md", "previous-20240506T070809Z", "tb",
                                       "token_cache"]
    # a second fresh start in the same second gets its own folder; a --log_dir outside
    # --output_dir is left alone
    _earlier_run(tmp_path / "again")
    elsewhere = tmp_path / "tb_elsewhere"
    elsewhere.mkdir()
    (elsewhere / "events.out.tfevents.2.host").write_bytes(b"ev")
    (tmp_path / "again" / "previous-20240506T070809Z").mkdir()
    folder, moved = utils.archive_previous_run(str(tmp_path / "again"), str(elsewhere),
                                               now=now)
    assert folder == str(tmp_path / "again" / "previous-20240506T070809Z-2")
    assert "log.txt" in moved and not any(m.startswith("tb") for m in moved)
    assert (elsewhere / "events.out.tfevents.2.host").exists()
    # a log.txt whose checkpoints are gone is set aside too (the new run would rewrite it)
    alone = tmp_path / "log_only"
    alone.mkdir()
    (alone / "log.txt").write_text('{"epoch": 0}\n')
    folder, moved = utils.archive_previous_run(str(alone), now=now)
    assert moved == ["log.txt"] and (Path(folder) / "log.txt").read_text() == '{"epoch": 0}\n'
    assert os.listdir(alone) == ["previous-20240506T070809Z"]


def test_archive_previous_run_newer_than_moves_only_later_checkpoints(tmp_path):
    """A roll-back (newer_than): the checkpoints of later epochs move, log.txt is copied,
    TensorBoard events stay; nothing moves when the resumed epoch is the newest."""
    import datetime
    now = datetime.datetime(2024, 5, 6, 7, 8, 9, tzinfo=datetime.timezone.utc)
    out = tmp_path / "out"
    (out / "tb").mkdir(parents=True)
    for name, epoch in (("checkpoint-1.pth", 1), ("checkpoint-3.pth", 3),
                        ("checkpoint-last.pth", 3)):
        torch.save({"epoch": epoch}, out / name)
    (out / "log.txt").write_text("a\nb\n")
    (out / "tb" / "events.out.tfevents.1.host").write_bytes(b"ev")
    for epoch in (3, 4):  # the newest (checkpoint-3 or checkpoint-last), or later
        assert utils.archive_previous_run(str(out), str(out / "tb"), now=now,
                                          newer_than=epoch) is None
    assert sorted(os.listdir(out)) == ["checkpoint-1.pth", "checkpoint-3.pth",
                                       "checkpoint-last.pth", "log.txt", "tb"]
    folder, moved = utils.archive_previous_run(str(out), str(out / "tb"), now=now,
                                               newer_than=1)
    assert folder == str(out / "previous-20240506T070809Z")
    assert moved == ["checkpoint-3.pth", "checkpoint-last.pth", "log.txt"]
    assert sorted(os.listdir(folder)) == ["checkpoint-3.pth", "checkpoint-last.pth",
                                          "log.txt"]
    assert (Path(folder) / "log.txt").read_text() == (out / "log.txt").read_text()
    assert sorted(os.listdir(out)) == ["checkpoint-1.pth", "log.txt",
                                       "previous-20240506T070809Z", "tb"]
    assert os.listdir(out / "tb") == ["events.out.tfevents.1.host"]
    # checkpoint-last of the resumed epoch (or older) stays; an unreadable one too
    torch.save({"epoch": 1}, out / "checkpoint-last.pth")
    assert utils.archive_previous_run(str(out), now=now, newer_than=1) is None
    (out / "checkpoint-last.pth").write_bytes(b"torn")
    assert utils.archive_previous_run(str(out), now=now, newer_than=1) is None


def test_a_checkpoint_last_whose_epoch_is_no_int_stores_no_epoch(tmp_path):
    """checkpoint-last.pth storing epoch 5.0 (no int, as find_latest_checkpoint reads
    it): no later checkpoint to move aside on a roll-back, and relinked to the newest."""
    out = tmp_path / "out"
    out.mkdir()
    torch.save({"epoch": 2}, out / "checkpoint-2.pth")
    torch.save({"epoch": 5.0}, out / "checkpoint-last.pth")
    assert utils.checkpoints_newer_than(str(out), 1) == [str(out / "checkpoint-2.pth")]
    assert utils.relink_last_checkpoint(str(out), str(out / "checkpoint-2.pth"), 2)
    assert torch.load(out / "checkpoint-last.pth", weights_only=True) == {"epoch": 2}


def test_relinking_checkpoint_last_says_what_it_held(tmp_path, capsys):
    """An epoch behind (a crash between the two writes), cut short (a full disk, a
    truncate: not a crash between writes) or missing: each said as it is."""
    torch.save({"epoch": 2}, tmp_path / "checkpoint-2.pth")
    newest, last = str(tmp_path / "checkpoint-2.pth"), tmp_path / "checkpoint-last.pth"
    for make, said in ((lambda: torch.save({"epoch": 1}, last),
                        "held epoch 1 (the run stopped between writing checkpoint-2.pth and it)"),
                       (lambda: last.write_bytes(b"torn"), "was unreadable or stored no epoch"),
                       (lambda: None, "was missing (the run stopped before writing it after "
                                      "checkpoint-2.pth)")):
        last.unlink(missing_ok=True)
        make()
        capsys.readouterr()
        assert utils.relink_last_checkpoint(str(tmp_path), newest, 2)
        assert capsys.readouterr().out == (f"[resume] {last} {said}: it is now "
                                           "checkpoint-2.pth, epoch 2\n")
        assert os.path.samefile(last, newest)


def test_unreadable_checkpoint_error_names_file(tmp_path):
    bad = tmp_path / "checkpoint-3.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="checkpoint-3.pth is not a readable"):
        utils.load_checkpoint_file(str(bad))
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        utils.load_checkpoint_file(str(tmp_path / "missing.pth"))
    # a weights-only file that is no dict (a list): a clear error, and no resume from it
    torch.save([1, 2], tmp_path / "checkpoint-9.pth")
    with pytest.raises(utils.CheckpointError, match="checkpoint-9.pth holds a list, not a "
                                                    "checkpoint dict"):
        utils.load_checkpoint_file(str(tmp_path / "checkpoint-9.pth"))
    utils.save_on_master({"epoch": 1}, utils.checkpoint_path(str(tmp_path), 1))
    assert utils.find_latest_checkpoint(str(tmp_path)) == utils.checkpoint_path(
        str(tmp_path), 1)


def test_set_aside_within_one_second_takes_the_next_free_folder(tmp_path):
    """Three runs set aside in the same second each get a folder of their own (-2, -3):
    nothing of an earlier run is overwritten or mixed with another's."""
    now = datetime.datetime(2026, 12, 2, 10, 0, 0, tzinfo=datetime.timezone.utc)
    folders = []
    for run in range(3):
        (tmp_path / "predictions.csv").write_text(f"run {run}\n")
        folders.append(utils.set_aside(tmp_path, ["predictions.csv", "maps"], now=now))
    base = str(tmp_path / "previous-20261202T100000Z")
    assert folders == [base, f"{base}-2", f"{base}-3"]
    assert [(Path(f) / "predictions.csv").read_text() for f in folders] == [
        "run 0\n", "run 1\n", "run 2\n"]
    assert utils.set_aside(tmp_path, ["predictions.csv", "maps"], now=now) is None


def test_set_aside_takes_the_next_folder_when_another_run_makes_its_first(tmp_path,
                                                                          monkeypatch):
    """Two runs in one folder (ProtoFlow files trained alongside) setting aside in the
    same second: the folder free when looked at is made by the other run first; this run
    takes the next (-2) instead of stopping on FileExistsError."""
    now = datetime.datetime(2026, 12, 2, 10, 0, 0, tzinfo=datetime.timezone.utc)
    base = str(tmp_path / "previous-20261202T100000Z")
    real = os.makedirs

    def the_other_run_first(path, *a, **k):
        if path == base and not os.path.exists(base):
            real(base)  # made by the other run in between
        return real(path, *a, **k)

    monkeypatch.setattr(utils.os, "makedirs", the_other_run_first)
    (tmp_path / "pf.pt").write_text("earlier")
    assert utils.set_aside(tmp_path, ["pf.pt"], now=now) == f"{base}-2"
    assert (Path(f"{base}-2") / "pf.pt").read_text() == "earlier"


def _tar_of(path: Path, data: bytes) -> None:
    """A tar archive at `path` holding one file of `data`."""
    (path.parent / "inside.pt").write_bytes(data)
    with tarfile.open(path, "w") as tar:
        tar.add(path.parent / "inside.pt", "inside.pt")


@pytest.mark.parametrize("name, write, reason", [
    ("empty.pth", lambda p: p.write_bytes(b""),
     "is not a PyTorch checkpoint (0 bytes: an empty or interrupted download, copy or "
     "save?). Download it again."),
    ("zeros.pth", lambda p: p.write_bytes(bytes(100_000)),
     "is not a PyTorch checkpoint (100000 bytes, all zero: an empty or interrupted "
     "download, copy or save?). Download it again."),
    ("cut.pth", lambda p: (torch.save({"w": torch.zeros(9)}, p,
                                      _use_new_zipfile_serialization=False),
                           p.write_bytes(p.read_bytes()[:20])),
     "is not a complete PyTorch checkpoint (20 bytes, ending early: an interrupted "
     "download, copy or save?). Download it again."),
    ("archive.pth", lambda p: _tar_of(p, b"x" * 600),
     "is a tar archive, not a PyTorch checkpoint: unpack it and name the checkpoint inside"),
], ids=["empty", "zeros", "cut-short", "tar"])
def test_files_torch_says_nothing_about_are_described(tmp_path, name, write, reason):
    """torch's own text for these is empty ("EOFError: .") or only its advice to unpickle
    unsafely ("Do it only if you got the file from a trusted source.")."""
    write(tmp_path / name)
    with pytest.raises(utils.CheckpointError) as e:
        utils.read_weights_file(tmp_path / name)
    assert str(e.value) == f"{tmp_path / name} {reason}"


# What `wget` of the original README's links gives (a Hugging Face .../blob/main/ link is
# the page that shows the file), and what a clone of the release without git-lfs holds.
HF_PAGE = (b"\n<!doctype html>\n<html class=\"\">\n<head><title>vit_tokenizer.pth \xc2\xb7 "
           b"xcyao00/PMAD at main</title></head><body></body></html>\n")
LFS_FILE = (b"version https://git-lfs.github.com/spec/v1\n"
            b"oid sha256:4d7a214614ab2935c943f9e0904d5ec8a6f6e1b2d3c4b5a69788796a5b4c3d2e\n"
            b"size 349634560\n")


def _download_mistakes(path: Path) -> dict[str, str]:
    return {
        "page": (f"{path} is a web page (HTML), not the file itself: the link downloaded was "
                 "a page that shows the file, as a Hugging Face .../blob/main/... link is "
                 "(.../resolve/main/... serves the file). Download it from its link in "
                 "weights/README.md"),
        "lfs": (f"{path} is a Git LFS pointer (134 bytes standing for a file of 349,634,560 "
                "bytes), not the file itself: the release was cloned without Git LFS. Run "
                "`git lfs pull` in that clone, or download the file itself (links in "
                "weights/README.md)")}


@pytest.mark.parametrize("kind", ["page", "lfs"])
def test_a_web_page_or_lfs_pointer_is_named_with_its_fix(tmp_path, kind):
    """"Download it again" repeats the mistake: the error says what was downloaded and
    which link serves the file, for every released file's loader."""
    import fg_masks
    import modeling_discrete_vae
    import protoflow
    data = {"page": HF_PAGE, "lfs": LFS_FILE}[kind]
    assert kind != "lfs" or len(data) == 134
    ckpt = tmp_path / "vit_base_16_checkpoint_962_955.pth"
    ckpt.write_bytes(data)
    with pytest.raises(utils.CheckpointError) as e:
        utils.read_weights_file(ckpt)
    assert str(e.value) == _download_mistakes(ckpt)[kind]
    pkl = tmp_path / "encoder.pkl"
    pkl.write_bytes(data)
    with pytest.raises(utils.CheckpointError) as e:
        modeling_discrete_vae.load_dalle_encoder(pkl)
    assert str(e.value) == _download_mistakes(pkl)[kind]
    assert "resolve/main/encoder.pkl" not in str(e.value)  # OpenAI's file, not the release's
    npy = tmp_path / "prototypes" / "bottle" / "coreset.npy"
    npy.parent.mkdir(parents=True)
    npy.write_bytes(data)
    with pytest.raises(utils.CheckpointError) as e:
        protoflow.load_prototypes(str(tmp_path / "prototypes"), "bottle", 272)
    assert str(e.value) == _download_mistakes(npy)[kind]
    zipped = tmp_path / "fg_mask.zip"
    zipped.write_bytes(data)
    with pytest.raises(zipfile.BadZipFile) as e:
        fg_masks.FgMaskZip.check_file(str(zipped))
    assert str(e.value) == "--fg_mask_zip " + _download_mistakes(zipped)[kind]
    # told by the first bytes alone; a checkpoint is neither
    other = tmp_path / "other.pth"
    other.write_bytes(b"<html" + bytes(10))
    assert utils.download_mistake(other) == _download_mistakes(other)["page"]
    torch.save({"w": torch.zeros(2)}, other)
    assert utils.download_mistake(other) is None


# ----------------------------------------------------------------------------- logs
def test_metric_logger_averages():
    ml = utils.MetricLogger(window_size=2)
    for v in (1.0, 2.0, 6.0):
        ml.update(loss=v, lr=None)
    assert ml.meters["loss"].avg == 4.0 and ml.summary() == {"loss": 3.0}


def test_jsonl_log_drops_epochs_being_redone(tmp_path):
    path = str(tmp_path / "log.txt")
    log = utils.JsonlLog(path)
    for e in range(4):
        log.write({"epoch": e, "train_loss": float(e)})
    utils.JsonlLog(path, start_epoch=2).write({"epoch": 2, "train_loss": 9.0})
    assert [(r["epoch"], r["train_loss"]) for r in read_jsonl(path)] == [
        (0, 0.0), (1, 1.0), (2, 9.0)]


def test_jsonl_log_drops_a_last_line_cut_short(tmp_path, capsys):
    """A run killed while writing epoch 1's line: the resumed run's line for epoch 1 gets a
    line of its own, not glued onto the cut one; a whole line without epoch stays."""
    path = tmp_path / "log.txt"
    path.write_text('{"note": "kept"}\n{"epoch": 0, "train_loss": 0.5}\n{"epoch": 1, "tra')
    utils.JsonlLog(str(path), start_epoch=1).write({"epoch": 1, "train_loss": 2.0})
    assert path.read_text() == ('{"note": "kept"}\n{"epoch": 0, "train_loss": 0.5}\n'
                                '{"epoch": 1, "train_loss": 2.0}\n')
    assert "log.txt: its last line was cut short" in capsys.readouterr().err


def test_tensorboard_writer_on_rank0(tmp_path):
    assert utils.make_tensorboard_writer(None) is None
    w = utils.make_tensorboard_writer(str(tmp_path / "tb"))
    w.add_scalar("train/loss", 1.5, 0)
    w.close()
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tb"))


# ----------------------------------------------------------------------------- cli
class _UnreadableImages(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int):
        raise utils.BadFileError(f"cannot read image data/x_{i}.png (0 bytes): replace it")


def test_cli_prints_an_error_from_a_dataloader_worker_as_its_one_line(capsys):
    """torch re-raises it as "Caught BadFileError in DataLoader worker process 0." and the
    worker's traceback; the user sees the original message only."""
    loader = torch.utils.data.DataLoader(_UnreadableImages(), num_workers=1,
                                         multiprocessing_context="fork")
    assert utils.cli(lambda: next(iter(loader))) == 2
    assert capsys.readouterr().err == ("error: cannot read image data/x_0.png (0 bytes): "
                                       "replace it\n")


def test_cli_prints_a_full_disk_as_one_line_and_keeps_other_os_errors_traceback(capsys):
    """A results file, heatmap or converted image that meets a full disk (or a used-up
    quota) was a traceback with exit 1 after all the work was done: now one `error:`
    line naming the file and the fixes, exit 2. Other OSErrors are not the user's to
    read as one line: they keep their traceback."""
    def fails(*err):
        def main():
            raise OSError(*err)
        return main
    assert utils.cli(fails(errno.ENOSPC, "No space left on device", "out/heatmaps/a.png")) == 2
    assert capsys.readouterr().err == (
        "error: no space left on the device writing out/heatmaps/a.png (No space left on "
        "device): free space and re-run, or choose another output folder\n")
    assert utils.cli(fails(errno.EDQUOT, "Disk quota exceeded")) == 2
    assert capsys.readouterr().err == (
        f"error: no space left on the device ({os.strerror(errno.EDQUOT)}): free space and "
        "re-run, or choose another output folder\n")
    with pytest.raises(PermissionError):
        utils.cli(fails(errno.EACCES, "Permission denied", "out"))


def test_a_full_disk_in_write_atomic_names_the_file(tmp_path, capsys):
    """A write or flush that meets a full disk names no file (only open does): the
    results file write_atomic was filling is named, and nothing is left behind."""
    def full(tmp: str) -> None:
        Path(tmp).write_text("part")
        raise OSError(errno.ENOSPC, "No space left on device")
    target = tmp_path / "results.json"
    assert utils.cli(lambda: utils.write_atomic(target, full)) == 2
    assert capsys.readouterr().err == (
        f"error: no space left on the device writing {target} (No space left on device): "
        "free space and re-run, or choose another output folder\n")
    assert os.listdir(tmp_path) == []
    with pytest.raises(OSError) as info:  # another file's error keeps its name
        utils.write_atomic(target, lambda tmp: (_ for _ in ()).throw(
            OSError(errno.ENOSPC, "No space left on device", "/elsewhere")))
    assert info.value.filename == "/elsewhere"


def test_cli_prints_our_warnings_as_one_line_and_a_librarys_with_its_location(monkeypatch):
    """A warning of our own category (a bad file left out, an undefined metric) reads
    `warning: <message>` (with the rank when several print), not our file:line and source
    line; a library's warning keeps Python's format, also where its stacklevel names our
    file (torch's DDP deprecation, raised for engine.py's call); Python's format is back
    once the entry point returns."""
    python_format = warnings.formatwarning
    ours = (os.path.join(utils.PROJECT_DIR, "metrics.py"), 481, "warnings.warn(...)")
    library = ("/usr/lib/python3/site-packages/torch/x.py", 3, "warn(...)")
    seen = []

    def main() -> None:
        seen.append(warnings.formatwarning("mean AUPRO is nan", metrics.UndefinedMetricWarning,
                                           *ours))
        seen.append(warnings.formatwarning("left out 1 bad file", datasets.DataWarning,
                                           *library))
        seen.append(warnings.formatwarning("deprecated", FutureWarning, *library))
        seen.append(warnings.formatwarning("broadcast_buffers is deprecated", UserWarning,
                                           os.path.join(utils.PROJECT_DIR, "engine.py"), 9))
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", "1")
        seen.append(warnings.formatwarning("mean AUPRO is nan", metrics.UndefinedMetricWarning,
                                           *ours))

    assert utils.cli(main) == 0
    assert seen[0] == "warning: mean AUPRO is nan\n"
    assert seen[1] == "warning: left out 1 bad file\n"
    assert seen[2] == python_format("deprecated", FutureWarning, *library)
    assert seen[2].startswith("/usr/lib/python3/site-packages/torch/x.py:3: FutureWarning: ")
    assert seen[3].startswith(f"{utils.PROJECT_DIR}/engine.py:9: UserWarning: broadcast_")
    assert seen[4] == "[rank 1] warning: mean AUPRO is nan\n"
    assert warnings.formatwarning is python_format
    assert utils._own_code(os.path.join(utils.PROJECT_DIR, "bench", "x.py"))
    for other in (os.path.join(utils.PROJECT_DIR, ".venv", "lib", "site-packages", "x.py"),
                  "<string>", None):
        assert not utils._own_code(other)


def test_cli_writes_each_ranks_line_whole_with_its_rank(monkeypatch):
    """Ctrl-C reaches every rank: each says so with its rank, in one write, so that two
    ranks' lines do not run together on one terminal (print writes the newline apart)."""
    writes = []

    class Stderr:
        def write(self, text: str) -> None:
            writes.append(text)

        def flush(self) -> None:
            pass

    def interrupted() -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(sys, "stderr", Stderr())
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert utils.cli(interrupted) == 130
    assert utils.cli(lambda: (_ for _ in ()).throw(utils.FlagError("--lr"))) == 2
    monkeypatch.delenv("WORLD_SIZE")
    assert utils.cli(interrupted) == 130
    assert writes == ["[rank 1] interrupted (Ctrl-C)\n", "[rank 1] error: --lr\n",
                      "interrupted (Ctrl-C)\n"]


def test_sigterm_stops_a_run_as_ctrl_c_does_and_says_so(tmp_path):
    """`kill`, `timeout` or a cluster's preemption (SIGTERM) ended a run with no word, so
    a training run did not say how to continue nor an evaluation keep its table: cli turns
    it into Terminated, a KeyboardInterrupt (the Ctrl-C path), says so on one line and
    exits 143; the handler it replaced is back afterwards."""
    script = tmp_path / "sleeper.py"
    script.write_text("import sys, time\nsys.path.insert(0, sys.argv[1])\nimport utils\n"
                      "def main():\n    print('ready', flush=True)\n    time.sleep(60)\n"
                      "sys.exit(utils.cli(main))\n")
    proc = subprocess.Popen([sys.executable, str(script), str(Path(utils.__file__).parent)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "ready\n"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 143 and err == "terminated (SIGTERM)\n"
    before = signal.getsignal(signal.SIGTERM)
    seen = []
    assert utils.cli(lambda: seen.append(signal.getsignal(signal.SIGTERM))) == 0
    assert seen == [utils._terminate] and signal.getsignal(signal.SIGTERM) is before
    assert utils.interruption(utils.Terminated()) == "terminated (SIGTERM)"
    assert utils.interruption(KeyboardInterrupt()) == "interrupted (Ctrl-C)"


def test_cli_runs_a_main_on_another_thread_without_a_sigterm_handler():
    """Python sets signal handlers on the main thread only (signal.signal raises
    ValueError elsewhere): an entry point run on another thread (a notebook's worker, a
    GUI) still runs, exits as it would, and leaves the process's SIGTERM handler alone."""
    import threading
    before = signal.getsignal(signal.SIGTERM)
    seen, results = [], []

    def run() -> None:
        results.append(utils.cli(lambda: seen.append(signal.getsignal(signal.SIGTERM)) or 3))
    thread = threading.Thread(target=run)
    thread.start()
    thread.join(timeout=30)
    assert results == [3] and seen == [before]
    assert signal.getsignal(signal.SIGTERM) is before


def test_sigterm_to_the_process_group_stops_loader_workers_without_a_traceback(tmp_path):
    """`timeout`, a job's cancellation or a terminal's hang-up send SIGTERM to the whole
    process group: the DataLoader's workers die of it (torch's worker handler re-raises a
    SIGTERM that does not come from its parent), and torch's SIGCHLD handler raised
    'DataLoader worker (pid N) is killed by signal: Terminated' in the main process, a
    15-line traceback under the one line that says the run was terminated."""
    script = tmp_path / "loader.py"
    script.write_text(
        "import sys, time\nsys.path.insert(0, sys.argv[1])\nimport torch, utils\n"
        "from torch.utils.data import DataLoader\n"
        "class Slow(torch.utils.data.Dataset):\n"
        "    def __len__(self):\n        return 10 ** 6\n"
        "    def __getitem__(self, i):\n        time.sleep(0.01)\n        return i\n"
        "def main():\n    for k, _ in enumerate(DataLoader(Slow(), num_workers=2)):\n"
        "        if k == 5:\n            print('ready', flush=True)\n"
        "sys.exit(utils.cli(main))\n")
    proc = subprocess.Popen([sys.executable, str(script), str(Path(utils.__file__).parent)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        assert proc.stdout.readline() == "ready\n"
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert (proc.returncode, err) == (143, "terminated (SIGTERM)\n")


@pytest.mark.skipif(not hasattr(signal, "SIGCHLD"), reason="no SIGCHLD on this system")
def test_sigterm_leaves_a_python_handler_that_ignores_sigchld():
    """SIGTERM replaces torch's SIGCHLD handler (it raised about the killed workers) by a
    Python one that does nothing, not by SIG_DFL: a worker's SIGCHLD received just before,
    and not yet handled by Python, then found no Python handler, and CPython printed
    'Signal 17 ignored due to race condition' with a traceback (seen once in a full run
    of the test above)."""
    before = signal.getsignal(signal.SIGCHLD)
    try:
        with pytest.raises(utils.Terminated):
            utils._terminate(signal.SIGTERM, None)
        handler = signal.getsignal(signal.SIGCHLD)
        assert callable(handler) and handler not in (signal.SIG_DFL, signal.SIG_IGN)
        assert handler(signal.SIGCHLD, None) is None
    finally:
        signal.signal(signal.SIGCHLD, before)


def test_a_collective_whose_peer_stopped_is_one_line_not_a_traceback(monkeypatch, capsys):
    """One rank's error ended the job, and every other rank printed a 40-line gloo
    traceback after it ('Connection closed by peer'), burying the error that mattered:
    under torchrun that is one line saying another process stopped first, exit 1. The same
    error in a single process, or another RuntimeError, keeps its traceback."""
    gloo = RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:561] "
                        "Connection closed by peer [127.0.0.1]:24300. This is typically "
                        "caused by a remote worker crashing.")

    def failing(e: Exception):
        def main() -> None:
            raise e
        return main
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert utils.cli(failing(gloo)) == 1
    assert capsys.readouterr().err == (
        "[rank 0] stopped: another process of this job stopped first (its error, above or "
        f"in its node's log, says why): {gloo}\n")
    other = RuntimeError("CUDA error: an illegal memory access was encountered")
    with pytest.raises(RuntimeError, match="illegal memory access"):
        utils.cli(failing(other))
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(RuntimeError, match="Connection closed by peer"):
        utils.cli(failing(gloo))
    # gloo's other wording of it; a message of several lines is said by its first
    monkeypatch.setenv("WORLD_SIZE", "2")
    reset = RuntimeError("[../gloo/transport/tcp/unbound_buffer.cc:81] Read error "
                         "[10.0.0.2]:4711: Connection reset by peer\nException raised from "
                         "recvFromRank at ../torch/csrc/distributed/c10d/ProcessGroupGloo.cpp")
    assert utils.cli(failing(reset)) == 1
    assert capsys.readouterr().err == (
        "[rank 0] stopped: another process of this job stopped first (its error, above or "
        "in its node's log, says why): [../gloo/transport/tcp/unbound_buffer.cc:81] Read "
        "error [10.0.0.2]:4711: Connection reset by peer\n")


def test_lines_said_while_a_progress_bar_is_drawn_start_lines_of_their_own(capsys):
    """A note during a loop and the error or Ctrl-C that ends it were written after the
    bar's last drawing, on its line ('epoch 2: 60%|...| 6/10 [...]interrupted (Ctrl-C)'):
    a note clears the bar and is redrawn below it, the last line closes the bar first."""
    from tqdm import tqdm
    bar = tqdm(total=10, desc="epoch 2", disable=False, mininterval=0, ncols=80)  # not TQDM_*
    bar.update(3)
    utils.main_print("[data] note: a folder", file=sys.stderr)
    bar.update(3)

    def interrupted() -> None:
        raise KeyboardInterrupt

    assert utils.cli(interrupted) == 130
    lines = capsys.readouterr().err.split("\n")
    note = next(line for line in lines if "[data] note" in line)
    assert note.rpartition("\r")[2].lstrip() == "[data] note: a folder"
    assert lines[-2:] == ["interrupted (Ctrl-C)", ""]
    assert "6/10" in lines[-3] and bar.disable  # closed: drawn once more, then a newline


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("terminal", [False, True])
def test_progress_bars_in_a_log_file_are_not_nested(terminal):
    """Redirected to a file, two bars at once wrote cursor moves ('\x1b[A') into the log:
    there a bar inside another is not drawn and the outer one is drawn every LOG_INTERVAL
    seconds; on a terminal both are drawn as asked."""
    stream = _Terminal() if terminal else io.StringIO()
    outer = utils.progress(range(2), desc="classes", file=stream, disable=False)
    for _ in outer:
        inner = utils.progress(range(3), desc="batches", file=stream, disable=False,
                               leave=False)
        assert inner.disable is not terminal
        list(inner)
    assert outer.mininterval == (0.1 if terminal else utils.LOG_INTERVAL)
    log = stream.getvalue()
    assert "classes: 100%" in log
    assert ("batches" in log) is terminal and ("\x1b[A" in log) is terminal
    alone = utils.progress(range(2), desc="alone", file=io.StringIO(), disable=False)
    assert not alone.disable  # the outer bar closed: the next one is drawn
    alone.close()


def test_a_bar_in_a_log_file_is_redrawn_by_its_loop_only(monkeypatch):
    """tqdm's monitor thread redraws a bar whose adaptive miniters grew above 1 once
    maxinterval passes without a redraw, showing the count of the last redraw (the loop
    keeps the live count to itself): in a log, a stale line. In a log the loop draws.
    tqdm's clock is a fake one (1 ms a reading), so that the adaptive miniters a terminal
    keeps grows the same on any machine, however busy."""
    import itertools

    import tqdm.std
    monkeypatch.setattr(utils, "LOG_INTERVAL", 0.01)
    bars = {}
    for name, stream in (("log", io.StringIO()), ("terminal", _Terminal())):
        clock = itertools.count(0.0, 0.001)
        monkeypatch.setattr(tqdm.std, "time", lambda: next(clock))
        bar = utils.progress(range(2000), file=stream, disable=False, mininterval=0.01)
        assert sum(1 for _ in bar) == 2000
        bars[name] = bar
    assert bars["log"].miniters == 1  # what the monitor reads: 'miniters > 1' to redraw
    assert bars["terminal"].miniters > 1  # tqdm's adaptive default, kept on a terminal


def test_progress_in_a_log_file_draws_every_30_seconds_whatever_it_is_asked():
    """In a log file a bar draws every 30 s (LOG_INTERVAL), also one that asks for more
    often (greedy_coreset's 1 s would write a line a second into the log); a bar that is
    open but not drawn (disable=True: a short check's) does not count as an outer bar;
    without a stderr (pythonw) a bar is one for a log file."""
    assert utils.LOG_INTERVAL == 30.0
    fast = utils.progress(range(2), desc="coreset", file=io.StringIO(), disable=False,
                          mininterval=1.0)
    assert fast.mininterval == 30.0
    fast.close()
    slow = utils.progress(range(2), file=io.StringIO(), disable=False, mininterval=60.0)
    assert slow.mininterval == 60.0  # slower than asked is kept
    slow.close()
    hidden = utils.progress(range(2), desc="checking", file=io.StringIO(), disable=True)
    drawn = utils.progress(range(2), desc="epoch 0", file=io.StringIO(), disable=False)
    assert not drawn.disable
    drawn.close()
    hidden.close()


class _Writer:
    """A stream with no isatty (a logging adapter put in place of sys.stderr)."""
    def write(self, text: str) -> None:
        pass

    def flush(self) -> None:
        pass


def test_progress_on_a_stderr_that_cannot_say_it_is_a_terminal_is_for_a_log(monkeypatch):
    """A closed stderr (isatty raises ValueError) or one without isatty (AttributeError)
    is taken as a log file, not as a terminal."""
    closed = io.StringIO()
    closed.close()
    for stderr in (closed, _Writer()):
        monkeypatch.setattr(sys, "stderr", stderr)
        bar = utils.progress(range(2), disable=False)
        assert bar.mininterval == utils.LOG_INTERVAL, stderr
        bar.close()


# ----------------------------------------------------------------------------- distributed
def test_single_process_without_torchrun(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    env = utils.init_distributed("cpu")
    assert (env.rank, env.world_size, env.distributed) == (0, 1, False)
    assert not utils.is_dist_avail_and_initialized()
    assert utils.get_world_size() == 1 and utils.is_main_process()
    assert utils.all_gather_object({"a": 1}) == [{"a": 1}]
    assert utils.all_reduce_sum(torch.tensor([2.0])).item() == 2.0
    sampler = utils.build_sampler(list(range(7)), seed=0)
    sampler.set_epoch(1)
    order1 = list(sampler)
    assert sorted(order1) == list(range(7))
    sampler.set_epoch(1)
    assert list(sampler) == order1


def test_world_size_without_master_addr_is_a_clear_error(monkeypatch, capsys):
    """`WORLD_SIZE=2 RANK=0 python run_pretraining.py`: one `error:` line, exit 2."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    assert utils.cli(lambda: utils.init_distributed("cpu")) == 2
    assert capsys.readouterr().err == (
        "[rank 0] error: WORLD_SIZE=2 but MASTER_ADDR is not set: start several processes "
        "with torchrun (scripts/train_*.sh), or unset WORLD_SIZE and RANK for one process\n")


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    with utils.distributed("cpu", timeout_min=2, init_method=f"file://{init_file}") as env:
        sampler = utils.build_sampler(list(range(10)), seed=3)
        sampler.set_epoch(0)
        ml = utils.MetricLogger()
        ml.update(loss=float(rank + 1))  # ranks: 1 and 2 -> global average 1.5
        ml.synchronize_between_processes()
        utils.save_training_state(out_dir, ["last"], epoch=0, model=_Toy(),
                                  optimizer=torch.optim.SGD(_Toy().parameters(), lr=1),
                                  scaler=utils.make_grad_scaler("cpu", "none"), args={},
                                  masking=_policy(rank).state_dict())
        result = {"rank": env.rank, "world": utils.get_world_size(),
                  "indices": list(sampler), "loss": ml.summary()["loss"],
                  "gathered": utils.all_gather_object(env.rank * 10)}
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)


def test_two_process_gloo_group(tmp_path):
    init = tmp_path.parent / f"{tmp_path.name}-init"
    assert run_ranks(_worker, (str(init), str(tmp_path))) == [0, 0]
    r = [json.load(open(tmp_path / f"rank{i}.json")) for i in range(2)]
    assert [x["world"] for x in r] == [2, 2]
    assert set(r[0]["indices"]).isdisjoint(r[1]["indices"])
    assert sorted(r[0]["indices"] + r[1]["indices"]) == list(range(10))
    assert r[0]["loss"] == r[1]["loss"] == 1.5
    assert r[0]["gathered"] == [0, 10]
    ckpt = utils.load_checkpoint_file(str(tmp_path / "checkpoint-last.pth"))
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
    assert ckpt["masking"]["mask_rng"] == [np.random.default_rng(r).bit_generator.state
                                           for r in range(2)]
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-last.pth", "rank0.json", "rank1.json"]


def _where_am_i(rank: int, out_dir: str) -> None:
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(
        [os.environ.get("PMAD_TEST_MARK"), os.getcwd(), np.random.rand()]))


def test_ranks_run_in_the_callers_environment_and_folder(tmp_path, monkeypatch):
    """The fork server keeps the environment of the call that started it; each child
    still gets its caller's, its folder, and a numpy global random state of its own, as
    a spawned process would."""
    monkeypatch.delenv("PMAD_TEST_MARK", raising=False)
    assert run_ranks(_where_am_i, (str(tmp_path),)) == [0, 0]  # the server is up
    monkeypatch.setenv("PMAD_TEST_MARK", "set after")
    monkeypatch.chdir(tmp_path)
    assert run_ranks(_where_am_i, (str(tmp_path),)) == [0, 0]
    found = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert [f[:2] for f in found] == [["set after", str(tmp_path)]] * 2
    assert found[0][2] != found[1][2]


def _hang_with_a_child(rank: int, pid_file: str) -> None:
    """A rank that starts a process of its own (as a DataLoader worker) and then hangs."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    Path(pid_file).write_text(str(child.pid))
    time.sleep(600)


def test_a_hung_rank_is_killed_with_the_processes_it_started(tmp_path):
    """On a hang run_ranks fails the test and kills the rank's whole process group: a
    process it started (a DataLoader worker) does not outlive the test."""
    pid_file = tmp_path / "child.pid"
    assert run_ranks(_where_am_i, (str(tmp_path),), nprocs=1) == [0]  # the server is up
    with pytest.raises(pytest.fail.Exception, match=r"rank\(s\) \[0\] still running after 4 s"):
        run_ranks(_hang_with_a_child, (str(pid_file),), nprocs=1, timeout_s=4)
    pid = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:  # SIGKILL lands at once; reaping
        time.sleep(0.05)
    assert not _alive(pid)


def _death_signal(rank: int, out_file: str) -> None:
    """The signal this process gets when its parent dies (prctl PR_GET_PDEATHSIG)."""
    value = ctypes.c_int(-1)
    ctypes.CDLL(None).prctl(2, ctypes.byref(value))  # PR_GET_PDEATHSIG
    Path(out_file).write_text(str(value.value))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux's")
def test_a_rank_dies_with_the_fork_server(tmp_path):
    """Each rank leads its own process group, out of pytest's: a pytest killed as a group
    (CI's timeout) kills the fork server, and each rank is set to die with it."""
    out = tmp_path / "signal.txt"
    assert run_ranks(_death_signal, (str(out),), nprocs=1) == [0]
    assert int(out.read_text()) == signal.SIGKILL


def _alive(pid: int) -> bool:
    """utils._alive, but a zombie (killed, not yet reaped: a container's init may never
    reap it) does not count."""
    if not utils._alive(pid):
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:  # no /proc (macOS), or reaped since
        return True


def _failing_rank(rank: int, init_file: str, out_dir: str) -> None:
    """Rank 1 raises (a bad image, an OOM) while rank 0 waits in an all-reduce, as in
    DDP's gradient all-reduce."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        with utils.distributed("cpu", timeout_min=10, init_method=f"file://{init_file}"):
            if rank == 1:
                raise RuntimeError("rank 1 could not read an image")
            utils.all_reduce_sum(torch.ones(1))
    except BaseException as e:
        Path(out_dir, f"rank{rank}.txt").write_text(f"{type(e).__name__}: {e}")
        raise


def test_a_failing_rank_ends_every_rank(tmp_path):
    """No barrier after an exception: the failing rank leaves the group at once, the
    waiting rank's collective fails, and both exit with an error long before the
    group's 10-minute timeout (a hang fails run_ranks after 300 s)."""
    init = tmp_path.parent / f"{tmp_path.name}-init"
    assert run_ranks(_failing_rank, (str(init), str(tmp_path)), timeout_s=300) == [1, 1]
    assert "could not read an image" in (tmp_path / "rank1.txt").read_text()
    assert (tmp_path / "rank0.txt").read_text()  # its all-reduce failed


def _one_rank_refuses(rank: int, init_file: str, out_dir: str) -> None:
    """Rank 1 alone finds a mistake (its node lacks the data); then a check both pass."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    with utils.distributed("cpu", timeout_min=10, init_method=f"file://{init_file}"):
        def check() -> str:
            if rank == 1:
                raise utils.LayoutError("data/train does not exist")
            return "fine"
        try:
            utils.on_every_rank(check)
        except utils.UserError as e:
            Path(out_dir, f"rank{rank}.txt").write_text(f"{type(e).__name__}: {e}")
        Path(out_dir, f"ok{rank}.txt").write_text(utils.on_every_rank(lambda: f"r{rank}"))


def test_a_mistake_one_rank_finds_is_an_error_on_every_rank(tmp_path):
    """on_every_rank: the rank that found it raises its own error, the others the same
    kind naming that rank (not a gloo traceback at their next collective); a check every
    rank passes returns each rank's own result."""
    init = tmp_path.parent / f"{tmp_path.name}-init"
    assert run_ranks(_one_rank_refuses, (str(init), str(tmp_path)), timeout_s=300) == [0, 0]
    assert (tmp_path / "rank1.txt").read_text() == "LayoutError: data/train does not exist"
    assert (tmp_path / "rank0.txt").read_text() == (
        "LayoutError: rank 1 found: data/train does not exist")
    assert [(tmp_path / f"ok{r}.txt").read_text() for r in (0, 1)] == ["r0", "r1"]
    with pytest.raises(utils.FlagError, match="^x$"):  # one process: the error itself
        utils.on_every_rank(lambda: (_ for _ in ()).throw(utils.FlagError("x")))
    assert utils.on_every_rank(lambda: 3) == 3


def test_the_other_ranks_get_the_users_message_of_a_worker_error(monkeypatch):
    """An error from a DataLoader worker (the k-means fit's) travels as its one-line
    message, not torch's 'Caught ... Original Traceback'; an error kind that takes more
    than a message arrives as a UserError."""
    sent = []
    worker = utils.BadFileError("Caught BadFileError in DataLoader worker process 0.\n"
                                "Original Traceback (most recent call last):\n  File x\n"
                                "utils.BadFileError: cannot read image x.png: bad\n")

    def gather(obj):
        sent.append(obj)
        return [obj]

    monkeypatch.setattr(utils, "all_gather_object", gather)
    with pytest.raises(utils.BadFileError):
        utils.on_every_rank(lambda: (_ for _ in ()).throw(worker))
    assert sent == [(utils.BadFileError, "cannot read image x.png: bad")]

    class TwoArgs(utils.UserError):
        def __init__(self, message: str, bad_files: list) -> None:
            super().__init__(message)

    monkeypatch.setattr(utils, "all_gather_object", lambda obj: [(TwoArgs, "m"), obj])
    with pytest.raises(utils.UserError, match="^rank 0 found: m$") as err:
        utils.on_every_rank(lambda: None)
    assert type(err.value) is utils.UserError


def test_a_lock_file_that_cannot_be_opened_or_locked(tmp_path, monkeypatch, capsys):
    """A .run.lock of another user or a folder of that name: one error naming it; a file
    system without locks: a note, and no lock file left behind."""
    (tmp_path / utils.RUN_LOCK).mkdir()
    with pytest.raises(utils.UserError) as err:
        utils.RunLock(str(tmp_path), "--output_dir")
    assert str(err.value).startswith(f"--output_dir {tmp_path}: its lock file "
                                     f"{tmp_path / utils.RUN_LOCK} cannot be opened (")
    assert str(err.value).endswith("): remove it, or pass another --output_dir")
    (tmp_path / utils.RUN_LOCK).rmdir()
    import fcntl

    def no_locks(*_):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    utils.RunLock(str(tmp_path), "--output_dir").close()
    assert capsys.readouterr().err == (f"note: --output_dir {tmp_path} cannot be locked (No "
                                       "locks available): nothing stops a second run from "
                                       "writing there at the same time\n")
    assert os.listdir(tmp_path) == []


def test_an_output_folder_is_locked_by_one_run_at_a_time(tmp_path):
    """A second run in a folder (or a killed torchrun's ranks still running there) is
    refused naming the holder; the lock goes when the holder closes it (its file with it)
    or dies (its file then left for the next run to take over)."""
    held = utils.RunLock(str(tmp_path), "--output_dir")
    holder = (tmp_path / utils.RUN_LOCK).read_text().strip()
    assert re.fullmatch(rf"pid {os.getpid()} on \S+ since \d{{4}}-\d\d-\d\d "
                        r"\d\d:\d\d:\d\d UTC", holder)
    with pytest.raises(utils.UserError) as err:
        utils.RunLock(str(tmp_path), "--output_dir", hint=utils.TORCHRUN_HINT)
    assert str(err.value) == (
        f"--output_dir {tmp_path} is in use by another run ({holder}): wait for it to end or "
        "stop it (a killed torchrun's ranks may run on: look for that pid), or pass another "
        "--output_dir")
    # another kind of run (an evaluation) takes its own lock: its files are others
    utils.RunLock(str(tmp_path), "--output_dir", utils.EVAL_LOCK).close()
    held.close()
    assert not (tmp_path / utils.RUN_LOCK).exists()  # no file left in the folder
    utils.RunLock(str(tmp_path), "--output_dir").close()
    code = ("import sys, time, utils; held = utils.RunLock(sys.argv[1], '--output_dir'); "
            "print('locked', flush=True); time.sleep(60)")
    other = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=utils.PROJECT_DIR,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline() == "locked\n"
        with pytest.raises(utils.UserError, match=f"pid {other.pid} on "):
            utils.RunLock(str(tmp_path), "--output_dir")
    finally:
        other.kill()  # SIGKILL: no clean-up runs, and the kernel frees the lock
        other.wait()
    assert f"pid {other.pid} on " in (tmp_path / utils.RUN_LOCK).read_text()  # left behind
    taken = utils.RunLock(str(tmp_path), "--output_dir")  # and taken over
    assert f"pid {os.getpid()} on " in (tmp_path / utils.RUN_LOCK).read_text()
    taken.close()
    assert os.listdir(tmp_path) == []


def test_resolve_weights_file_takes_a_file_or_a_folder_of_one(tmp_path) -> None:
    (tmp_path / "a.pt").write_bytes(b"x")
    assert utils.resolve_weights_file(str(tmp_path), "--w") == str(tmp_path / "a.pt")
    assert utils.resolve_weights_file(str(tmp_path / "a.pt"), "--w") == str(tmp_path / "a.pt")
    (tmp_path / "b.pt").write_bytes(b"x")
    with pytest.raises(FileNotFoundError,
                       match=r"holds 2 files matching \*\.pt \(a\.pt, b\.pt\): name one with "
                             r"--w"):
        utils.resolve_weights_file(str(tmp_path), "--w")
    with pytest.raises(FileNotFoundError,
                       match="--w .*missing does not exist: see weights/README.md"):
        utils.resolve_weights_file(str(tmp_path / "missing"), "--w")
    # none matches: the error shows what the folder does hold (a hidden or misnamed file)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / ".protoflow.pt").write_bytes(b"x")
    (tmp_path / "other" / "protoflow.pth").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match=r"holds no file matching \*\.pt \(it holds "
                       r"\.protoflow\.pt, protoflow\.pth\): name the file with --w"):
        utils.resolve_weights_file(str(tmp_path / "other"), "--w")
    for i in range(12):
        (tmp_path / "other" / f"x{i:02d}.txt").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"protoflow\.pth, x00\.txt, .*x07\.txt, "
                       r"\.\.\. 4 more\)"):
        utils.resolve_weights_file(str(tmp_path / "other"), "--w")
    for i in range(12):
        (tmp_path / "other" / f"w{i:02d}.pt").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"holds 12 files matching \*\.pt \(w00\.pt, "
                       r".*w09\.pt, \.\.\. 2 more\): name one"):
        utils.resolve_weights_file(str(tmp_path / "other"), "--w")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="--w .*empty is empty: see weights/README.md"):
        utils.resolve_weights_file(str(tmp_path / "empty"), "--w")


def test_bullet_list_caps_long_listings():
    """An error naming many files lists the first ones, one per indented line, then how
    many more (the same cap as the one-line listings above)."""
    assert utils.bullet_list(["a", "b"]) == "\n  a\n  b"
    assert utils.bullet_list([f"f{i}" for i in range(5)], limit=3) == (
        "\n  f0\n  f1\n  f2\n  ... 2 more")
    assert utils.bullet_list([]) == ""


def test_provenance_names_the_device_given_and_tells_two_runs_apart(monkeypatch):
    """results.json's provenance says which device made the numbers (a GPU run said 'cpu'
    would hide it; the tests run on the CPU, which hid a constant), and each run gets its
    own id: two runs of the same command in the same second, on the same host, differ
    only by it, and results.md names a record of the earlier one as reused by it."""
    monkeypatch.setattr(utils, "code_version", lambda: "abc")
    first, second = utils.provenance(torch.device("cuda", 1)), utils.provenance("cpu")
    assert (first["device"], second["device"], first["code"]) == ("cuda:1", "cpu", "abc")
    assert re.fullmatch(r"[0-9a-f]{32}", first["run_id"])
    assert first["run_id"] != second["run_id"]
    assert first["argv"] == sys.argv
    started = datetime.datetime.fromisoformat(first["started_utc"])
    assert started.utcoffset() == datetime.timedelta(0)


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git to make a checkout")
def test_code_version_names_the_commit_and_a_change_beside_it(tmp_path, monkeypatch):
    """A result names the code that made it: the checkout's commit, '-dirty' where a
    tracked file differs from it; None where the code is no checkout of its own (an
    archive unpacked inside another repository: that one's commit is not this code's);
    'unknown (why)' where git cannot tell (here: no git on the PATH)."""
    repo = tmp_path / "repo"
    repo.mkdir()

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *args], check=True, text=True,
                              capture_output=True).stdout.strip()
    git("init", "-q")
    (repo / "a.py").write_text("x = 1\n")
    git("add", "a.py")
    git("-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false", "commit",
        "-q", "-m", "one")
    monkeypatch.setattr(utils, "PROJECT_DIR", str(repo))
    head = git("rev-parse", "--short=12", "HEAD")
    assert utils.code_version() == head
    (repo / "a.py").write_text("x = 2\n")
    assert utils.code_version() == f"{head}-dirty"
    (repo / "unpacked").mkdir()  # an archive of the code inside another repository
    monkeypatch.setattr(utils, "PROJECT_DIR", str(repo / "unpacked"))
    assert utils.code_version() is None
    monkeypatch.setattr(utils, "PROJECT_DIR", str(repo))
    monkeypatch.setenv("PATH", str(tmp_path / "no_bin"))  # no git at all
    assert utils.code_version().startswith("unknown (FileNotFoundError: ")
