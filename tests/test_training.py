"""Training end to end on CPU: tiny ViT, a generated ImageNet-layout set with foreground
masks, a random-weight DALL-E encoder written in OpenAI's pickled-module format.

Covers: two epochs + checkpoints + logs; loss falling on a repeated batch; exact resume
after a crash (loss, weights, optimiser, dynamic-masking state); a NaN stopping the run
with the previous checkpoint intact; each setting's class set; 2-process torchrun/gloo.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image

import datasets
import engine
import masking_generator
import modeling_pmad
import run_pretraining
import utils
from conftest import read_jsonl, run_command
from masking_generator import CLASS_MASK_RATIOS, MaskBatch, num_masked
from modeling_discrete_vae import DalleEncoder, save_dalle_encoder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "vit_tiny_patch16_224_8k_vocab"
TWO_CLASSES = ("bottle", "carpet")


def _write_class(root: str, name: str, n: int, rng: np.random.Generator) -> None:
    os.makedirs(os.path.join(root, "train", name))
    os.makedirs(os.path.join(root, "fg_mask", name))
    for i in range(n):
        img = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)  # upsampled: smooth texture
        Image.fromarray(img).resize((32, 32), Image.BILINEAR).save(
            os.path.join(root, "train", name, f"{i:03d}.png"))
        mask = np.zeros((32, 32), np.uint8)
        mask[8 + i % 4:24, 6:26] = 255
        Image.fromarray(mask).save(os.path.join(root, "fg_mask", name, f"{i:03d}.png"))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Data sets, tokenizer file and a shared token cache, made once for the module."""
    base = tmp_path_factory.mktemp("train")
    rng = np.random.default_rng(0)
    two = str(base / "two")
    for name in TWO_CLASSES:
        _write_class(two, name, 4, rng)
    every = str(base / "every")
    for name in datasets.MVTEC_CLASSES:
        _write_class(every, name, 1, rng)
    torch.manual_seed(0)
    tok_dir = base / "tokenizer"
    tok_dir.mkdir()
    save_dalle_encoder(DalleEncoder(n_hid=8, n_blk_per_group=1, use_mixed_precision=False),
                       tok_dir / "encoder.pkl")
    return {"two": two, "every": every, "tokenizer": str(tok_dir),
            "cache": str(base / "token_cache"), "base": base}


def _argv(env: dict, out: str, *extra: str, data: str | None = None) -> list[str]:
    return ["--model", TINY, "--tokenizer_model", "dall-e",
            "--tokenizer_weight_path", env["tokenizer"], "--data_path", data or env["two"],
            "--output_dir", out, "--token_cache_dir", env["cache"], "--batch_size", "2",
            "--epochs", "2", "--warmup_epochs", "0", "--lr", "1e-3",
            "--max_steps_per_epoch", "1", "--num_workers", "0", "--no_init", "--amp", "none",
            "--device", "cpu", "--dynamic_masking_start", "1", "--seed", "0",
            "--deterministic", *extra]


def _args(env: dict, out: str, *extra: str, data: str | None = None):
    return run_pretraining.get_args_parser().parse_args(_argv(env, out, *extra, data=data))


def _masked_total(class_names: list[str]) -> int:
    return sum(num_masked(CLASS_MASK_RATIOS[c], 196) for c in class_names)


@pytest.fixture(scope="module")
def reference(env):
    """An uninterrupted 2-epoch run (the baseline of the resume test)."""
    out = str(env["base"] / "reference")
    summary = run_pretraining.main(_args(env, out, "--log_dir", str(env["base"] / "tb")))
    return out, summary


def test_two_epochs_write_checkpoints_and_logs(env, reference):
    out, summary = reference
    assert summary["train_classes"] == list(TWO_CLASSES) and summary["num_images"] == 8
    assert sorted(os.listdir(out)) == ["checkpoint-1.pth", "checkpoint-last.pth", "log.txt"]
    log = read_jsonl(os.path.join(out, "log.txt"))
    assert [r["epoch"] for r in log] == [0, 1]
    for r in log:
        assert math.isfinite(r["train_loss"]) and 0 < r["train_loss"] < 20
        assert 0 <= r["train_mlm_acc"] <= 1 and r["train_grad_norm"] > 0
    assert log[0]["n_parameters"] > 5e6
    # per-step cosine over 2 steps: lr, then min_lr + (lr - min_lr) / 2
    assert log[0]["train_lr"] == pytest.approx(1e-3)
    assert log[1]["train_lr"] == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5))
    assert log[1]["train_loss"] < log[0]["train_loss"]

    ckpt = utils.load_checkpoint_file(os.path.join(out, "checkpoint-last.pth"))
    assert ckpt["epoch"] == 1 and ckpt["world_size"] == 1 and len(ckpt["rng"]) == 1
    assert ckpt["args"]["model"] == TINY and ckpt["args"]["setting"] == "multi_class"
    assert ckpt["args"]["train_classes"] == list(TWO_CLASSES)  # run_test.check_unseen's
    assert set(ckpt) >= {"model", "optimizer", "scaler", "masking"}
    # the last step's lr and weight decay (--weight_decay 0.05, constant) as the optimiser
    # applied them, not only as they were logged
    groups = ckpt["optimizer"]["param_groups"]
    assert sorted(g["weight_decay"] for g in groups) == pytest.approx([0.0, 0.05])
    assert all(g["lr"] == pytest.approx(log[1]["train_lr"]) for g in groups)
    dyn = ckpt["masking"]["dynamic_masking"]
    assert dyn["class_names"] == list(TWO_CLASSES)
    # 2 epochs x 1 step x 2 samples, each masked with exactly its class's m patches
    per_sample = [num_masked(CLASS_MASK_RATIOS[c], 196) for c in TWO_CLASSES]
    per_class = dyn["count"].sum(1).tolist()
    assert all(n % m == 0 for n, m in zip(per_class, per_sample))
    assert sum(n // m for n, m in zip(per_class, per_sample)) == 4
    # also usable as an initialisation / test checkpoint
    fresh = timm.create_model(TINY)
    assert modeling_pmad.load_checkpoint(fresh, os.path.join(out, "checkpoint-1.pth"),
                                         strict=True) == {"missing": [], "unexpected": []}
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(env["base"] / "tb"))


def _mask_batch(masks: torch.Tensor) -> MaskBatch:
    return MaskBatch(masks, masks.reshape(-1).nonzero().squeeze(1), None)


def test_loss_falls_on_a_repeated_batch():
    torch.manual_seed(0)
    model = timm.create_model(TINY, depth=2, drop_path_rate=0.0)  # 2 blocks: fast
    opt = utils.build_optimizer(model, 1e-3, 0.05)
    assert opt.param_groups[0]["fused"]
    scaler = utils.make_grad_scaler("cpu", "none")
    images = torch.randn(2, 3, 224, 224)
    tokens = torch.randint(0, 8192, (2, 196))
    masks = torch.rand(2, 196) < 0.3
    outs = [engine.train_step(model, images, tokens, _mask_batch(masks), opt, scaler,
                              clip_grad=3.0) for _ in range(6)]
    losses = [o.loss.item() for o in outs]
    assert all(math.isfinite(v) for v in losses) and not any(o.failed for o in outs)
    assert losses[0] == pytest.approx(math.log(8192), abs=1.0)  # near-uniform at init
    assert losses == sorted(losses, reverse=True) and losses[-1] < losses[0] - 1.0
    assert 0.0 <= outs[-1].mlm_acc <= 1.0 and outs[0].grad_norm > 0
    pl = outs[-1].patch_losses
    assert pl.shape == (2, 196) and (pl[~masks] == 0).all() and (pl[masks] > 0).all()


class _ScaledLogits(torch.nn.Module):
    """A stand-in ViT: the same logits `scale * w` for every masked patch, V = 4. With
    w = 0 and every token 0, the loss is ln 4 and its gradient w.r.t. w is
    scale * (softmax - onehot) = scale * [-3/4, 1/4, 1/4, 1/4], of norm scale * sqrt(3/4):
    known by construction."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(4))
        self.scale = scale

    def forward(self, x: torch.Tensor, bool_masked_pos: torch.Tensor,
                masked_index: torch.Tensor | None = None) -> torch.Tensor:
        return (self.scale * self.w).expand(int(bool_masked_pos.sum()), 4)


def _sgd_step(scale: float, clip_grad: float | None, scaler: torch.amp.GradScaler | None = None
              ) -> tuple[engine.StepOutput, torch.Tensor]:
    """One train_step with plain SGD at lr 1: the update is minus the clipped gradient."""
    model = _ScaledLogits(scale)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    masks = torch.zeros(2, 4, dtype=torch.bool)
    masks[0, 1] = masks[1, 2] = masks[1, 3] = True
    out = engine.train_step(model, torch.zeros(2, 3, 2, 2), torch.zeros(2, 4, dtype=torch.long),
                            _mask_batch(masks), opt,
                            scaler or utils.make_grad_scaler("cpu", "none"), clip_grad=clip_grad)
    return out, model.w.detach().clone()  # the update, since w started at 0


def test_a_huge_gradient_is_clipped_to_clip_grad():
    grad = torch.tensor([-0.75, 0.25, 0.25, 0.25])
    out, update = _sgd_step(1e4, clip_grad=0.5)
    assert out.loss.item() == pytest.approx(math.log(4))
    assert out.grad_norm.item() == pytest.approx(1e4 * math.sqrt(0.75), rel=1e-6)  # before
    assert update.norm().item() == pytest.approx(0.5, rel=1e-6)  # after: --clip_grad
    torch.testing.assert_close(update, -0.5 * grad / grad.norm())  # same direction
    for off in (None, 0.0, -1.0):  # --clip_grad None or <= 0: no clipping
        _, unclipped = _sgd_step(1e4, clip_grad=off)
        torch.testing.assert_close(unclipped, -1e4 * grad)
    _, small = _sgd_step(1.0, clip_grad=3.0)  # below the limit: left as it is
    torch.testing.assert_close(small, -grad)


def test_a_loss_scaler_overflow_to_inf_is_a_skipped_step():
    """fp16's scaler skips a step whose scaled gradient overflowed; here to -inf, not NaN
    (2**127 times w[0]'s gradient 4 * -0.75 is beyond float32): a skipped step (its
    grad_norm inf, left out of the epoch's average), not a failed one, and the weights
    stay as they were. A step that did not overflow is not skipped."""
    out, update = _sgd_step(4.0, clip_grad=3.0,
                            scaler=torch.amp.GradScaler("cpu", init_scale=2.0 ** 127))
    assert out.grad_norm.item() == math.inf
    assert bool(out.skipped) and not bool(out.failed)
    assert torch.equal(update, torch.zeros(4))
    out, update = _sgd_step(1.0, clip_grad=3.0,
                            scaler=torch.amp.GradScaler("cpu", init_scale=2.0 ** 16))
    assert not bool(out.skipped) and not bool(out.failed)
    assert out.grad_norm.item() == pytest.approx(math.sqrt(0.75), rel=1e-6)
    torch.testing.assert_close(update, -torch.tensor([-0.75, 0.25, 0.25, 0.25]))


def test_loss_all_ranks_is_the_sum_over_ranks(two_rank_world):
    """A fake two-rank world whose other rank has the same loss: all_reduce doubles it."""
    import torch.distributed as dist
    calls = two_rank_world
    out, _ = _sgd_step(1.0, clip_grad=3.0)
    assert calls == [dist.ReduceOp.SUM]
    assert out.loss.item() == pytest.approx(math.log(4))
    assert out.loss_all_ranks.item() == pytest.approx(2 * math.log(4))


def test_masked_token_scores_match_full_logits():
    """The masked-token score (engine.masked_token_ce, scattered in place): each masked
    patch's token cross-entropy from the logits of all tokens, 0 at visible patches."""
    torch.manual_seed(1)
    model = timm.create_model(TINY, depth=2).eval()
    images = torch.randn(2, 3, 224, 224)
    tokens = torch.randint(0, 8192, (2, 196))
    masks = torch.rand(2, 196) < 0.25
    with torch.no_grad():
        ce, _ = engine.masked_token_ce(model, images, tokens, masks)
        got = engine.scatter_masked(ce, masks)
        logits = model(images, masks, return_all_tokens=True)  # (2, 196, V)
    want = F.cross_entropy(logits.flatten(0, 1), tokens.flatten(), reduction="none")
    want = want.view(2, 196) * masks
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_weighted_mean_keeps_the_loss_scale():
    v = torch.tensor([1.0, 2.0, 6.0])
    assert engine.weighted_mean(v, None).item() == 3.0
    assert engine.weighted_mean(v, torch.full((3,), 2.25)).item() == 3.0
    assert engine.weighted_mean(v, torch.tensor([1.0, 1.0, 4.0])).item() == 27.0 / 6.0


class _Crash(Exception):
    pass


def _crash_at_epoch(monkeypatch, crash_epoch: int):
    """engine.train_one_epoch (as patched now) raising _Crash when it starts
    `crash_epoch`; returns the one it wraps, to put back for a re-run."""
    record = engine.train_one_epoch

    def stop(*a, epoch, **k):
        if epoch == crash_epoch:
            raise _Crash
        return record(*a, epoch=epoch, **k)

    monkeypatch.setattr(engine, "train_one_epoch", stop)
    return record


def _crash_at(epoch_to_crash: int, monkeypatch, action=None):
    real = engine.train_one_epoch

    def wrapped(model, *a, epoch, **k):
        if epoch == epoch_to_crash:
            if action is None:
                raise _Crash
            action(model)
        return real(model, *a, epoch=epoch, **k)

    monkeypatch.setattr(engine, "train_one_epoch", wrapped)


def test_resume_after_crash_equals_uninterrupted_run(env, reference, monkeypatch):
    ref_out, _ = reference
    out = str(env["base"] / "resumed")
    _crash_at(1, monkeypatch)
    with pytest.raises(_Crash):
        run_pretraining.main(_args(env, out))
    assert utils.load_checkpoint_file(os.path.join(out, "checkpoint-last.pth"))["epoch"] == 0
    monkeypatch.undo()
    summary = run_pretraining.main(_args(env, out))  # --auto_resume is the default
    assert summary["start_epoch"] == 1

    ref_log = read_jsonl(os.path.join(ref_out, "log.txt"))
    log = read_jsonl(os.path.join(out, "log.txt"))
    assert [r["epoch"] for r in log] == [0, 1]
    assert log[1]["train_loss"] == ref_log[1]["train_loss"]
    assert log[1]["train_grad_norm"] == ref_log[1]["train_grad_norm"]
    a = utils.load_checkpoint_file(os.path.join(ref_out, "checkpoint-last.pth"))
    b = utils.load_checkpoint_file(os.path.join(out, "checkpoint-last.pth"))
    for key in ("loss_sum", "count"):
        assert torch.equal(a["masking"]["dynamic_masking"][key],
                           b["masking"]["dynamic_masking"][key])
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["masking"]["mask_rng"] == b["masking"]["mask_rng"]


def test_each_epoch_draws_the_images_in_its_own_order(env, tmp_path, monkeypatch):
    """The sampler is set to each epoch: epoch e sees the permutation a DistributedSampler
    of --seed gives at epoch e, another one each epoch, and the same after a resume (the
    DataLoader's; ImageCache serves the same batches: test_cached_images_train_exactly_...)."""
    orders, real = [], engine.train_one_epoch

    def record(model, data_loader, *args, epoch, **kwargs):
        orders.append(list(data_loader.sampler))
        if epoch == 1 and len(orders) == 2:  # the first run crashes as epoch 1 starts
            raise _Crash
        return real(model, data_loader, *args, epoch=epoch, **kwargs)

    monkeypatch.setattr(engine, "train_one_epoch", record)
    argv = ["--seed", "3", "--cache_images", "none"]
    with pytest.raises(_Crash):
        run_pretraining.main(_args(env, str(tmp_path), *argv))
    assert run_pretraining.main(_args(env, str(tmp_path), *argv))["start_epoch"] == 1
    expected = []
    for epoch in (0, 1):
        sampler = torch.utils.data.DistributedSampler(range(8), num_replicas=1, rank=0, seed=3)
        sampler.set_epoch(epoch)
        expected.append(list(sampler))
    assert orders == [*expected, expected[1]] and expected[0] != expected[1]


def test_cached_images_train_exactly_like_the_dataloader(env, reference, tmp_path):
    """--cache_images serves the DataLoader's batches to the bit: the same run. The
    reference ran with the default, auto, which does not cache here (its epochs of one
    step read 2 of the 8 images: test_auto_cache_caches_what_fits)."""
    ref_out, _ = reference
    run_pretraining.main(_args(env, str(tmp_path), "--cache_images", "device"))
    ref_log = read_jsonl(os.path.join(ref_out, "log.txt"))
    log = read_jsonl(os.path.join(tmp_path, "log.txt"))
    assert [r["train_loss"] for r in log] == [r["train_loss"] for r in ref_log]
    a = utils.load_checkpoint_file(os.path.join(ref_out, "checkpoint-last.pth"))["model"]
    b = utils.load_checkpoint_file(os.path.join(tmp_path, "checkpoint-last.pth"))["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_auto_cache_caches_what_fits(env, tmp_path, monkeypatch, capsys):
    """--cache_images auto (the default) keeps the decoded images in RAM when the node's
    processes fit in half its available memory, and says so; else it decodes every
    epoch, as it does when --max_steps_per_epoch cuts the epoch short (decoding every
    image first would cost more than the epoch reads)."""
    chosen = []

    def loader(dataset, batch_size, *, cache_images, **kw):
        chosen.append(cache_images)
        raise KeyboardInterrupt  # enough: the choice is made
    monkeypatch.setattr(datasets, "build_train_loader", loader)
    whole = ["--max_steps_per_epoch", "4"]  # 8 images, batch 2: every image each epoch
    for available, want in ((10 ** 12, "ram"), (10 ** 6, "none")):
        monkeypatch.setattr(utils, "available_memory", lambda: available)
        with pytest.raises(KeyboardInterrupt):
            run_pretraining.main(_args(env, str(tmp_path / want), *whole))
        assert chosen.pop() == want
        assert f"[data] --cache_images auto: {want} (the decoded images take 0.00 GB per " \
               "process, x1 on this node; " in capsys.readouterr().out
    monkeypatch.setattr(utils, "available_memory", lambda: 10 ** 12)
    with pytest.raises(KeyboardInterrupt):
        run_pretraining.main(_args(env, str(tmp_path / "cut")))  # 1 step of 2 images
    assert chosen.pop() == "none"
    assert ("[data] --cache_images auto: none (--max_steps_per_epoch reads 2 of the 8 images "
            "per epoch; decoding them all first would cost more)") in capsys.readouterr().out


def test_auto_cache_counts_the_ranks_of_the_job_and_of_the_node(env, tmp_path, monkeypatch,
                                                                capsys):
    """Under torchrun an epoch's step reads --batch_size images on each rank: 2 ranks of
    batch 2 read the 8 images in 2 steps, so --max_steps_per_epoch 2 reads them all (ram)
    and 1 half of them (none). The node keeps one copy per process on it
    (LOCAL_WORLD_SIZE), not per process of the job."""
    chosen = []

    def loader(dataset, batch_size, *, cache_images, **kw):
        chosen.append(cache_images)
        raise KeyboardInterrupt
    monkeypatch.setattr(datasets, "build_train_loader", loader)
    monkeypatch.setattr(utils, "available_memory", lambda: 10 ** 12)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("WORLD_SIZE", "4")  # two nodes of two
    for steps, want in (("2", "ram"), ("1", "none")):
        args = _args(env, str(tmp_path / steps), "--max_steps_per_epoch", steps)
        with pytest.raises(KeyboardInterrupt):  # _train: the job's world without a group
            run_pretraining._train(args, utils.DistEnv(world_size=2))
        assert chosen.pop() == want
        said = capsys.readouterr().out
        assert ("[data] --cache_images auto: ram (the decoded images take 0.00 GB per "
                "process, x2 on this node; ") in said if want == "ram" else (
            "[data] --cache_images auto: none (--max_steps_per_epoch reads 4 of the 8 "
            "images per epoch; decoding them all first would cost more)") in said
    # 3 ranks of batch 1: each reads ceil(8 / 3) = 3 images, in 3 steps (not 8 // 3 = 2),
    # so 2 steps cut the epoch short
    args = _args(env, str(tmp_path / "three"), "--max_steps_per_epoch", "2",
                 "--batch_size", "1")
    with pytest.raises(KeyboardInterrupt):
        run_pretraining._train(args, utils.DistEnv(world_size=3))
    assert chosen.pop() == "none"
    assert ("--max_steps_per_epoch reads 6 of the 8 images per epoch"
            in capsys.readouterr().out)


def test_resume_refuses_other_arguments(env, reference):
    out, _ = reference
    with pytest.raises(ValueError, match="--batch_size 2 .now 1.(.|\n)*--no_auto_resume"):
        run_pretraining.main(_args(env, out, "--batch_size", "1"))


@pytest.mark.parametrize("flags, named", [
    (("--lr", "5e-4"), "--lr 0.001 (now 0.0005)"),
    (("--min_lr", "1e-6"), "--min_lr 1e-05 (now 1e-06)"),
    (("--warmup_epochs", "1"), "--warmup_epochs 0 (now 1)"),
    (("--warmup_steps", "3"), "--warmup_steps -1 (now 3)"),
    (("--weight_decay", "0.1"), "--weight_decay 0.05 (now 0.1)"),
    (("--weight_decay_end", "0.01"), "--weight_decay_end None (now 0.01)"),
    (("--opt_betas", "0.8", "0.9"), "--opt_betas [0.9, 0.999] (now [0.8, 0.9])"),
    (("--opt_eps", "1e-6"), "--opt_eps 1e-08 (now 1e-06)"),
    (("--clip_grad", "1"), "--clip_grad 3.0 (now 1.0)"),
    (("--seed", "1"), "--seed 0 (now 1)"),
    (("--drop_path", "0.2"), "--drop_path 0.1 (now 0.2)"),
    (("--max_steps_per_epoch", "2"), "--max_steps_per_epoch 1 (now 2)"),
    (("--no-imagenet_default_mean_and_std",),
     "--imagenet_default_mean_and_std True (now False)"),
    (("--dynamic_masking_start", "5"), "--dynamic_masking_start 1 (now 5)"),
    (("--freq_mode", "global"), "--freq_mode 'patch' (now 'global')"),
    (("--no-fg_mask",), "--fg_mask True (now False)"),
    (("--lr", "5e-4", "--clip_grad", "1"), "--lr 0.001 (now 0.0005), --clip_grad 3.0 (now 1.0)"),
    # a finished run extended: its remaining steps follow the schedule flags (warm-up
    # included: it sets where the cosine starts), so they must match too
    (("--epochs", "3", "--warmup_epochs", "1"), "--warmup_epochs 0 (now 1)"),
])
def test_resume_refuses_a_changed_schedule_or_masking(env, reference, flags, named):
    """A flag that defines the experiment, changed on resume, is named with both values
    and the two ways on, before any work (nothing is trained or written)."""
    out, _ = reference
    before = os.path.getmtime(os.path.join(out, "checkpoint-last.pth"))
    with pytest.raises(utils.CheckpointError) as info:
        run_pretraining.main(_args(env, out, *flags))
    assert str(info.value) == (
        f"{out}/checkpoint-1.pth was trained with other arguments: {named}; resume it with "
        "the same flags, or start a new run: another --output_dir, or --no_auto_resume in "
        "this one (which moves this run's checkpoints and log.txt to previous-<UTC time>/ "
        "first)")
    assert os.path.getmtime(os.path.join(out, "checkpoint-last.pth")) == before


def test_resume_accepts_other_spellings_of_the_same_schedule(env, reference):
    """--weight_decay_end equal to --weight_decay is its default (None) spelt out, and
    --mask_ratio is unread when every class has its own ratio: the same run, so the
    finished reference says "nothing to do" instead of refusing."""
    out, _ = reference
    summary = run_pretraining.main(_args(env, out, "--weight_decay_end", "0.05"))
    assert summary["start_epoch"] == 2 and summary["num_steps"] == 0
    # every class of the reference has its own Table 6 ratio: --mask_ratio is not read
    summary = run_pretraining.main(_args(env, out, "--mask_ratio", "0.25"))
    assert summary["start_epoch"] == 2 and summary["num_steps"] == 0


@pytest.mark.parametrize("a, b, same", [
    ({"weight_decay": 0.05, "weight_decay_end": None},
     {"weight_decay": 0.05, "weight_decay_end": 0.05}, True),
    ({"weight_decay": 0.05, "weight_decay_end": None},
     {"weight_decay": 0.05, "weight_decay_end": 0.01}, False),
    ({"clip_grad": 0.0}, {"clip_grad": -1.0}, True),
    ({"clip_grad": None}, {"clip_grad": 0.0}, True),
    ({"clip_grad": 3.0}, {"clip_grad": 0.0}, False),
    ({"warmup_steps": 0}, {"warmup_steps": -1}, True),
    ({"warmup_steps": 0}, {"warmup_steps": 5}, False),
])
def test_schedule_view_makes_spellings_of_one_schedule_equal(a, b, same):
    assert (run_pretraining.schedule_view(a) == run_pretraining.schedule_view(b)) is same


def test_resume_leaves_out_the_flags_the_run_does_not_read():
    """--warmup_epochs when both runs warm up by --warmup_steps; --mask_ratio when every
    training class has its own Table 6 ratio. Otherwise both are compared."""
    saved = {"warmup_steps": 5, "warmup_epochs": 0, "mask_ratio": 0.3}
    now = {"warmup_steps": 5, "warmup_epochs": 2, "mask_ratio": 0.25}
    a, b = run_pretraining.resume_views(saved, now, ["bottle", "carpet"])
    assert a == b
    a, b = run_pretraining.resume_views(saved, now, ["bottle", "widget"])
    assert (a["mask_ratio"], b["mask_ratio"]) == (0.3, 0.25) and a["warmup_epochs"] is None
    a, b = run_pretraining.resume_views(saved, {**now, "warmup_steps": -1}, ["bottle"])
    assert (a["warmup_epochs"], b["warmup_epochs"]) == (0, 2) and a["mask_ratio"] is None
    assert run_pretraining.resume_views(None, now, ["bottle"])[0] is None


def test_a_fresh_start_sets_the_earlier_runs_files_aside(env, tmp_path, monkeypatch, capsys):
    """Run A (4 epochs, numbered checkpoints at epochs 1 and 3), then run B afresh in the
    same folder (--no_auto_resume, another --lr), stopped in its epoch 2: re-running B
    resumes B's epoch 1, not A's newer checkpoint-3.pth. A's checkpoints, log.txt and
    TensorBoard events (its --log_dir is inside --output_dir) are in previous-<time>/."""
    out, tb = tmp_path / "out", tmp_path / "out" / "tb"
    common = ("--epochs", "4", "--save_ckpt_freq", "2", "--log_dir", str(tb))
    _record_epochs(monkeypatch)
    capsys.readouterr()
    run_pretraining.main(_args(env, str(out), *common))  # A
    # each epoch's line names its numbered checkpoint where one was written, and that
    # checkpoint-last.pth (which evaluation reads) is the same epoch's
    assert [line.rsplit(" -> ", 1)[1] for line in capsys.readouterr().out.splitlines()
            if line.startswith("[epoch ")] == [
        str(out / "checkpoint-last.pth"), f"{out / 'checkpoint-1.pth'} (also "
        "checkpoint-last.pth)", str(out / "checkpoint-last.pth"),
        f"{out / 'checkpoint-3.pth'} (also checkpoint-last.pth)"]
    record = _crash_at_epoch(monkeypatch, 2)
    b = ("--lr", "5e-4", *common)
    with pytest.raises(_Crash):
        run_pretraining.main(_args(env, str(out), *b, "--no_auto_resume"))
    previous = [p for p in os.listdir(out) if p.startswith("previous-")]
    assert len(previous) == 1
    kept = out / previous[0]
    assert (f"[output_dir] {out} holds an earlier run that this one does not continue: "
            f"moved its 3 checkpoint(s), log.txt, 1 TensorBoard event file(s) to {kept} "
            "(nothing deleted)\n") in capsys.readouterr().out
    assert sorted(os.listdir(kept)) == ["checkpoint-1.pth", "checkpoint-3.pth",
                                        "checkpoint-last.pth", "log.txt", "tb"]
    assert [r["epoch"] for r in read_jsonl(kept / "log.txt")] == [0, 1, 2, 3]
    for name, epoch in (("checkpoint-3.pth", 3), ("checkpoint-last.pth", 3)):
        a = utils.load_checkpoint_file(str(kept / name))
        assert a["epoch"] == epoch and a["args"]["lr"] == 1e-3
    assert len(os.listdir(kept / "tb")) == 1
    monkeypatch.setattr(engine, "train_one_epoch", record)
    summary = run_pretraining.main(_args(env, str(out), *b))  # B again, as a user re-runs it
    assert summary["start_epoch"] == 2
    assert [p for p in os.listdir(out) if p.startswith("previous-")] == previous
    b_last = utils.load_checkpoint_file(str(out / "checkpoint-last.pth"))
    assert b_last["epoch"] == 3 and b_last["args"]["lr"] == 5e-4
    assert [r["epoch"] for r in read_jsonl(out / "log.txt")] == [0, 1, 2, 3]


def test_resuming_an_older_checkpoint_of_the_folder_sets_the_newer_ones_aside(
        env, tmp_path, monkeypatch, capsys):
    """Run A (4 epochs, checkpoints 1, 3 and last of epoch 3), then rolled back with
    --resume <out>/checkpoint-1.pth and stopped in its epoch 3, before it saves it:
    re-running without --resume continues the rolled-back run (its checkpoint-last of
    epoch 2), not A's abandoned checkpoint-3.pth, which moved to previous-<time>/ with
    A's checkpoint-last and a copy of log.txt."""
    out = tmp_path / "out"
    common = ("--epochs", "4", "--save_ckpt_freq", "2")
    _record_epochs(monkeypatch)
    run_pretraining.main(_args(env, str(out), *common))  # A
    record = _crash_at_epoch(monkeypatch, 3)
    capsys.readouterr()
    first = str(out / "checkpoint-1.pth")
    with pytest.raises(_Crash):
        run_pretraining.main(_args(env, str(out), *common, "--resume", first))
    previous = [p for p in os.listdir(out) if p.startswith("previous-")]
    assert len(previous) == 1
    kept = out / previous[0]
    assert (f"[resume] {first} (epoch 1) is older than {out}'s newest checkpoint: moved "
            f"checkpoint-3.pth, checkpoint-last.pth, of the later epochs this run abandons, "
            f"to {kept}, with a copy of log.txt, so that a later auto-resume continues this "
            "run (nothing deleted)\n") in capsys.readouterr().out
    assert sorted(os.listdir(kept)) == ["checkpoint-3.pth", "checkpoint-last.pth", "log.txt"]
    assert [r["epoch"] for r in read_jsonl(kept / "log.txt")] == [0, 1, 2, 3]
    for name in ("checkpoint-3.pth", "checkpoint-last.pth"):
        assert utils.load_checkpoint_file(str(kept / name))["epoch"] == 3
    assert sorted(os.listdir(out)) == ["checkpoint-1.pth", "checkpoint-last.pth", "log.txt",
                                       previous[0]]
    assert utils.load_checkpoint_file(str(out / "checkpoint-last.pth"))["epoch"] == 2
    monkeypatch.setattr(engine, "train_one_epoch", record)
    summary = run_pretraining.main(_args(env, str(out), *common))  # re-run, auto-resume
    assert summary["start_epoch"] == 3
    assert [p for p in os.listdir(out) if p.startswith("previous-")] == previous
    assert utils.load_checkpoint_file(str(out / "checkpoint-last.pth"))["epoch"] == 3
    assert [r["epoch"] for r in read_jsonl(out / "log.txt")] == [0, 1, 2, 3]


def test_resuming_a_weights_only_file_of_the_folder_starts_afresh(env, tmp_path, monkeypatch):
    """--resume of a file in --output_dir that holds weights but no training state
    starts at epoch 0, so the earlier run's checkpoints move to previous-<time>/ (else
    a later auto-resume would continue the earlier run's newer epoch)."""
    out = tmp_path / "out"
    _record_epochs(monkeypatch)
    run_pretraining.main(_args(env, str(out), "--epochs", "2", "--save_ckpt_freq", "1"))
    weights = out / "weights.pth"
    torch.save({"model": utils.load_checkpoint_file(str(out / "checkpoint-1.pth"))["model"]},
               weights)
    summary = run_pretraining.main(_args(env, str(out), "--epochs", "1", "--resume",
                                         str(weights)))
    assert summary["start_epoch"] == 0
    (previous,) = [p for p in os.listdir(out) if p.startswith("previous-")]
    assert sorted(os.listdir(out / previous)) == ["checkpoint-0.pth", "checkpoint-1.pth",
                                                  "checkpoint-last.pth", "log.txt"]
    assert utils.load_checkpoint_file(str(out / "checkpoint-last.pth"))["epoch"] == 0


def test_resuming_the_folders_newest_checkpoint_sets_nothing_aside(env, tmp_path, monkeypatch,
                                                                    capsys):
    """--resume naming --output_dir's newest checkpoint (numbered, or checkpoint-last.pth)
    abandons nothing: no file moves, between the same barriers, on rank 0."""
    out = tmp_path / "out"
    out.mkdir()
    for name, epoch in (("checkpoint-1.pth", 1), ("checkpoint-3.pth", 3),
                        ("checkpoint-last.pth", 3)):
        torch.save({"epoch": epoch}, out / name)
    (out / "log.txt").write_text("{}\n")
    events: list[str] = []
    monkeypatch.setattr(utils, "barrier", lambda: events.append("barrier"))
    args = _args(env, str(out))
    for name in ("checkpoint-3.pth", "checkpoint-last.pth"):
        run_pretraining.set_aside_previous_run(args, rolled_back=(str(out / name), 3))
    assert events == ["barrier"] * 4 and "[resume]" not in capsys.readouterr().out
    assert sorted(os.listdir(out)) == ["checkpoint-1.pth", "checkpoint-3.pth",
                                       "checkpoint-last.pth", "log.txt"]


def test_the_same_resume_command_after_a_crash_continues_its_output_dir(env, tmp_path,
                                                                        monkeypatch, capsys):
    """`--resume a --output_dir b` crashed after saving b's epoch 1; the same command again
    continues b at epoch 2 and says so, instead of resuming a's epoch 0 again and moving
    b's newer checkpoint aside (the module docstring's promise)."""
    a, b = tmp_path / "a", tmp_path / "b"
    calls = _record_epochs(monkeypatch)
    record = _crash_at_epoch(monkeypatch, 1)
    with pytest.raises(_Crash):
        run_pretraining.main(_args(env, str(a), "--epochs", "3"))
    command = ("--epochs", "3", "--resume", str(a))
    monkeypatch.setattr(engine, "train_one_epoch", record)
    _crash_at_epoch(monkeypatch, 2)
    with pytest.raises(_Crash):
        run_pretraining.main(_args(env, str(b), *command))
    monkeypatch.setattr(engine, "train_one_epoch", record)
    calls.clear()
    capsys.readouterr()
    assert run_pretraining.main(_args(env, str(b), *command))["start_epoch"] == 2
    assert [c["epoch"] for c in calls] == [2]
    assert (f"[resume] {b} already holds epoch 1 of the run started there from --resume {a}: "
            f"continuing {b / 'checkpoint-last.pth'}, not {a / 'checkpoint-last.pth'} again"
            ) in capsys.readouterr().out
    assert sorted(os.listdir(b)) == ["checkpoint-2.pth", "checkpoint-last.pth", "log.txt"]
    assert utils.load_checkpoint_file(str(b / "checkpoint-last.pth"))["epoch"] == 2


def test_the_earlier_run_is_set_aside_by_rank_0_between_barriers(env, tmp_path, monkeypatch):
    """Every rank has looked for its checkpoint before rank 0 moves the files (barrier),
    and none starts writing before they are moved (barrier); other ranks move nothing."""
    events: list[str] = []
    monkeypatch.setattr(utils, "barrier", lambda: events.append("barrier"))
    monkeypatch.setattr(utils, "archive_previous_run", lambda *a, **k: events.append("move"))
    args = _args(env, str(tmp_path))
    for main_rank in (True, False):
        monkeypatch.setattr(utils, "is_main_process", lambda: main_rank)
        run_pretraining.set_aside_previous_run(args)
    assert events == ["barrier", "move", "barrier", "barrier", "barrier"]


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_crash_at_the_checkpoint_keeps_each_epochs_log_line_once(env, tmp_path, monkeypatch,
                                                                   when):
    """A crash while epoch 1's checkpoint is written (before it is on disk, or just
    after) leaves epoch 1's line in log.txt; the re-run's log.txt has each epoch once."""
    _record_epochs(monkeypatch)
    real = utils.save_training_state

    def crash(output_dir, names, *, epoch, **k):
        if epoch == 1 and when == "before":
            raise _Crash
        paths = real(output_dir, names, epoch=epoch, **k)
        if epoch == 1:
            raise _Crash
        return paths

    monkeypatch.setattr(utils, "save_training_state", crash)
    out = tmp_path / "out"
    with pytest.raises(_Crash):
        run_pretraining.main(_args(env, str(out)))
    assert [r["epoch"] for r in read_jsonl(out / "log.txt")] == [0, 1]
    monkeypatch.setattr(utils, "save_training_state", real)
    summary = run_pretraining.main(_args(env, str(out)))
    assert summary["start_epoch"] == (1 if when == "before" else 2)
    assert [r["epoch"] for r in read_jsonl(out / "log.txt")] == [0, 1]


def test_a_crash_between_the_numbered_checkpoint_and_last_loses_nothing(env, tmp_path,
                                                                         monkeypatch, capsys):
    """The last epoch's save writes checkpoint-1.pth whole, then points
    checkpoint-last.pth at it. A crash between the two keeps checkpoint-1.pth (it used to
    be the step lost, for good): the re-run finds the run finished from it, redoes
    nothing, and catches checkpoint-last.pth up."""
    real = utils._link_or_copy

    def crash(src: str, dst: str) -> None:
        raise _Crash

    monkeypatch.setattr(utils, "_link_or_copy", crash)
    out = tmp_path / "out"
    with pytest.raises(_Crash):
        run_pretraining.main(_args(env, str(out)))
    numbered, last = out / "checkpoint-1.pth", out / "checkpoint-last.pth"
    assert utils.load_checkpoint_file(str(numbered))["epoch"] == 1
    assert utils.load_checkpoint_file(str(last))["epoch"] == 0
    monkeypatch.setattr(utils, "_link_or_copy", real)
    capsys.readouterr()
    summary = run_pretraining.main(_args(env, str(out)))
    assert summary["start_epoch"] == 2 and summary["checkpoints"] == []
    assert f"[resume] {last} held epoch 0" in capsys.readouterr().out
    assert sorted(os.listdir(out)) == ["checkpoint-1.pth", "checkpoint-last.pth", "log.txt"]
    assert utils.load_checkpoint_file(str(last))["epoch"] == 1 and last.samefile(numbered)
    assert [r["epoch"] for r in read_jsonl(out / "log.txt")] == [0, 1]


def test_a_non_finite_loss_is_its_message_and_exit_1_on_the_command_line(monkeypatch,
                                                                         capsys):
    """No flag was wrong and the last good checkpoint is kept: the message alone as an
    `error:` line (no traceback), exit 1, as run_protoflow.py's diverged flow; a user's
    mistake stays exit 2."""
    def diverged(args):
        raise engine.NonFiniteLossError("non-finite loss nan at epoch 1, step 0")

    monkeypatch.setattr(run_pretraining, "main", diverged)
    assert run_pretraining.command_line(["--data_path", "x"]) == 1
    assert capsys.readouterr().err == "error: non-finite loss nan at epoch 1, step 0\n"
    monkeypatch.setattr(run_pretraining, "main", lambda args: (_ for _ in ()).throw(
        utils.FlagError("--lr")))
    assert run_pretraining.command_line(["--data_path", "x"]) == 2


def test_nan_stops_the_run_and_keeps_the_last_checkpoint(env, monkeypatch):
    """The run stops with the step and images named, the last good checkpoint intact;
    the advice works as said: its fixes (--amp, --lr, the images) change what a resume
    must keep, so a new run starts from the checkpoint's weights in another folder."""
    out = str(env["base"] / "nan")
    _crash_at(1, monkeypatch, action=lambda m: m.lm_head.weight.data.fill_(math.nan))
    with pytest.raises(engine.NonFiniteLossError) as info:
        run_pretraining.main(_args(env, out))
    msg = str(info.value)
    assert "non-finite loss" in msg and "at epoch 1, step 0" in msg
    assert any(os.path.join("train", c, "") in msg for c in TWO_CLASSES)
    last = os.path.join(out, "checkpoint-last.pth")
    assert msg.endswith(
        f". No checkpoint was written after it; the last good checkpoint is {last}. Fix the "
        "cause (--amp bf16 or none instead of fp16, a lower --lr, the named images left out "
        "or replaced) in a new run from its weights, as a resume refuses each change: "
        f"--init_ckpt {last} with another --output_dir")
    assert sorted(os.listdir(out)) == ["checkpoint-last.pth", "log.txt"]
    ckpt = utils.load_checkpoint_file(last)
    assert ckpt["epoch"] == 0
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values())
    assert [r["epoch"] for r in read_jsonl(os.path.join(out, "log.txt"))] == [0]
    calls = _record_epochs(monkeypatch)
    with pytest.raises(utils.CheckpointError, match=r"--amp 'none' \(now 'bf16'\)"):
        run_pretraining.main(_args(env, out, "--amp", "bf16"))
    argv = [a for a in _argv(env, str(env["base"] / "nan_new"), "--amp", "bf16")
            if a != "--no_init"]
    new = run_pretraining.main(run_pretraining.get_args_parser().parse_args(
        argv + ["--init_ckpt", last]))
    assert new["start_epoch"] == 0 and calls[0]["config"].amp == "bf16"
    loaded = calls[0]["model"].state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in ckpt["model"].items())


def test_a_non_finite_loss_before_any_checkpoint_advises_a_fixed_re_run(tmp_path):
    """No epoch finished, so no checkpoint to start from (not `--init_ckpt None`): the
    fixes and a re-run, which has nothing to resume."""
    assert engine.non_finite_advice(str(tmp_path)) == (
        f"No checkpoint was written in {tmp_path} yet. Fix the cause (--amp bf16 or none "
        "instead of fp16, a lower --lr, the named images left out or replaced) and re-run")


def _refused_before_tokenizing(args, monkeypatch, capsys) -> str:
    """Run through the command line's error handling with a tokenizer that must not be
    built; -> the `error:` line(s) it printed, having exited 2."""
    def no_tokenizer(*_, **__):
        raise AssertionError("the tokenizer was built before the inputs were refused")

    monkeypatch.setattr(run_pretraining.modeling_discrete_vae, "create_tokenizer", no_tokenizer)
    assert utils.cli(lambda: run_pretraining.main(args)) == 2
    return capsys.readouterr().err


def test_a_missing_or_bad_init_ckpt_is_refused_before_tokenizing(env, tmp_path, monkeypatch,
                                                                 capsys):
    """The default --init_ckpt is missing on a fresh clone: that, a file cut short and a
    file of another model are refused at the checks, before any image is tokenized (or a
    k-means tokenizer fitted), not after."""
    argv = [a for a in _argv(env, str(tmp_path / "out")) if a != "--no_init"]

    def refused(path: Path) -> str:
        args = run_pretraining.get_args_parser().parse_args(argv + ["--init_ckpt", str(path)])
        return _refused_before_tokenizing(args, monkeypatch, capsys)

    missing = tmp_path / "beit.pth"
    assert refused(missing) == (
        f"error: --init_ckpt {missing} not found: download beit_base_patch16_224_pt22k.pth "
        "(its link is in weights/README.md) into weights/, point --init_ckpt at it, or pass "
        "--no_init to train from scratch\n")
    _, path = _beit_like_file(tmp_path)
    data = path.read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(data[:len(data) // 2])
    assert refused(cut).startswith(f"error: {cut} is not a readable PyTorch weights file")
    small = tmp_path / "small.pth"
    torch.save({"model": timm.create_model("vit_small_patch16_224_8k_vocab", depth=1)
                .state_dict()}, small)
    assert refused(small).startswith(f"error: --init_ckpt {small} is of another model size")


def test_ctrl_c_in_training_says_how_to_continue(env, tmp_path, monkeypatch, capsys):
    """Ctrl-C printed only 'interrupted (Ctrl-C)': it now also says what continues the run
    (the same command, from the newest complete checkpoint; without --no_auto_resume,
    which would start over; or nothing saved yet), before that line."""
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(engine, "fit", interrupted)
    out = tmp_path / "out"
    assert utils.cli(lambda: run_pretraining.main(_args(env, str(out)))) == 130
    assert capsys.readouterr().err.endswith(
        "[train] stopped: no epoch of this run was saved; the same command starts it again\n"
        "interrupted (Ctrl-C)\n")

    def terminated(*a, **k):  # SIGTERM (a cluster's preemption): the same advice
        raise utils.Terminated
    monkeypatch.setattr(engine, "fit", terminated)
    assert utils.cli(lambda: run_pretraining.main(_args(env, str(out)))) == 143
    assert capsys.readouterr().err.endswith(
        "[train] stopped: no epoch of this run was saved; the same command starts it again\n"
        "terminated (SIGTERM)\n")
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    scaler = utils.make_grad_scaler("cpu", "none")
    utils.save_training_state(str(out), [0], epoch=0, model=model, optimizer=opt,
                              scaler=scaler, args={}, masking=None)
    utils.save_training_state(str(out), [1, "last"], epoch=1, model=model, optimizer=opt,
                              scaler=scaler, args={}, masking=None)
    newest = utils.find_latest_checkpoint(str(out))
    assert run_pretraining.how_to_continue(_args(env, str(out))) == (
        f"the same command continues from {newest}; the epoch it stopped in restarts")
    assert run_pretraining.how_to_continue(_args(env, str(out), "--no_auto_resume")) == (
        f"run the command without --no_auto_resume to continue from {newest} (with it, a "
        "new run starts and this one moves to previous-<UTC time>/)")
    first = str(out / "checkpoint-0.pth")  # a roll-back: the same command rolls back again
    assert run_pretraining.how_to_continue(_args(env, str(out), "--resume", first)) == (
        f"run the command without --resume to continue from {newest} (with it, the run "
        f"goes back to {first} again)")
    assert run_pretraining.how_to_continue(_args(env, str(out), "--resume", str(out))) == (
        f"the same command continues from {newest}; the epoch it stopped in restarts")


def test_a_second_run_in_the_same_output_dir_is_refused_before_tokenizing(env, tmp_path,
                                                                         monkeypatch, capsys):
    """A run holds --output_dir until it ends: another run there (a second launch, or
    ranks of a killed torchrun still training) is refused naming the holder, and a run
    that stops on an error lets go of it."""
    out = tmp_path / "out"
    out.mkdir()
    held = utils.RunLock(str(out), "--output_dir")
    try:
        err = _refused_before_tokenizing(_args(env, str(out)), monkeypatch, capsys)
    finally:
        held.close()
    assert err.startswith(f"error: --output_dir {out} is in use by another run (pid "
                          f"{os.getpid()} on ")
    for _ in range(2):  # the first run's error released its lock: the same error again
        assert _refused_before_tokenizing(_args(env, str(out), "--batch_size", "9"),
                                          monkeypatch, capsys).startswith(
            "error: --batch_size 9 makes no full batch")


def test_batch_size_above_the_image_count_is_refused_before_tokenizing(env, tmp_path,
                                                                        monkeypatch, capsys):
    """8 images make no batch of 9 (or of 5 per rank on 2 ranks): a FlagError naming both
    numbers, before the tokenizer is built."""
    args = _args(env, str(tmp_path), "--batch_size", "9")
    assert _refused_before_tokenizing(args, monkeypatch, capsys) == (
        "error: --batch_size 9 makes no full batch: there are 8 training images. Fix: pass "
        "--batch_size 8 or less\n")
    monkeypatch.setattr(datasets, "get_world_size", lambda: 2)
    args = _args(env, str(tmp_path), "--batch_size", "5")
    assert _refused_before_tokenizing(args, monkeypatch, capsys) == (
        "error: --batch_size 5 makes no full batch: each of 2 processes gets 4 of the 8 "
        "training images. Fix: pass --batch_size 4 or less, or use fewer processes\n")


def test_bad_fg_masks_are_refused_before_tokenizing(env, tmp_path, monkeypatch, capsys):
    """A mask of another aspect ratio and an empty one stop the run at its checks, each
    named with its image and the fix, not at the first batch that reads them."""
    import shutil
    data = tmp_path / "data"
    shutil.copytree(env["two"], data)
    Image.fromarray(np.zeros((300, 100), np.uint8)).save(data / "fg_mask" / "bottle" / "001.png")
    (data / "fg_mask" / "carpet" / "003.png").write_bytes(b"")
    args = _args(env, str(tmp_path / "out"), data=str(data))
    assert _refused_before_tokenizing(args, monkeypatch, capsys) == (
        "error: 2 foreground mask(s) unreadable or not of their image's aspect ratio:\n"
        f"  {data}/fg_mask/bottle/001.png is 100x300 but its image {data}/train/bottle/001.png"
        " is 32x32: they cannot be aligned\n"
        f"  {data}/fg_mask/carpet/003.png (mask of {data}/train/carpet/003.png) is "
        "unreadable: empty, cut short or not an image\n"
        f"Fix: {datasets.FIX_BAD_FG_MASK}\n")


def _one_class_data(tmp_path: Path, name: str) -> str:
    """A training set of one class, 2 images with foreground masks."""
    root = str(tmp_path / f"data_{name}")
    _write_class(root, name, 2, np.random.default_rng(0))
    return root


def test_a_mask_ratio_that_masks_no_patch_is_refused_before_tokenizing(env, tmp_path,
                                                                      monkeypatch, capsys):
    """int(L r) = 0 would leave nothing to predict and stop the run with a NaN loss that
    advises a lower --lr: a class without a ratio of its own under --mask_ratio 0.004
    (196 patches), and screw's own 0.04 at --input_size 64 (16 patches; a k-means
    tokenizer fitted by the run, so the token grid follows --input_size)."""
    widget = _one_class_data(tmp_path, "widget")
    args = _args(env, str(tmp_path / "a"), "--mask_ratio", "0.004", data=widget)
    assert _refused_before_tokenizing(args, monkeypatch, capsys) == (
        "error: --mask_ratio 0.004 masks no patch of class(es) widget, which have no ratio "
        "of their own (int(196 x 0.004) = 0 of the 196 patches at --input_size 224): pass "
        "--mask_ratio 0.0052 or more\n")
    assert num_masked(0.0052, 196) == 1
    screw = _one_class_data(tmp_path, "screw")
    args = _args(env, str(tmp_path / "b"), "--input_size", "64", "--tokenizer_model", "kmeans",
                 "--fit_kmeans_tokenizer", "--tokenizer_weight_path", str(tmp_path / "k.pth"),
                 data=screw)
    assert _refused_before_tokenizing(args, monkeypatch, capsys) == (
        "error: the paper's Table 6 mask ratio of class(es) screw (0.04) masks no patch at "
        "--input_size 64 (int(16 x 0.04) = 0 of the 16 patches): pass --input_size 80 or "
        "more, with a tokenizer of that grid (a k-means tokenizer fitted at that size)\n")
    assert num_masked(0.04, 5 * 5) == 1 and not (tmp_path / "k.pth").exists()  # not fitted


def test_a_mask_ratio_only_classes_without_their_own_use_is_not_checked(env, tmp_path,
                                                                       monkeypatch, capsys):
    """bottle and carpet have their own ratios: --mask_ratio 0.004 is not theirs, and the
    run says so (a user's class is matched by name: a 'tile' of theirs gets MVTec AD's
    ratio, said beside the classes --mask_ratio sets)."""
    calls = _record_epochs(monkeypatch)
    run_pretraining.main(_args(env, str(tmp_path), "--mask_ratio", "0.004", "--epochs", "1"))
    assert len(calls) == 1
    assert ("[masking] 2 class(es) named as MVTec AD's take their ratio of the paper's "
            "Table 6 (bottle 0.42, carpet 0.16); --mask_ratio is not used\n"
            ) in capsys.readouterr().out
    assert run_pretraining.mask_ratio_note(["tile", "bolt A", "pcb1"], 0.5) == (
        "[masking] 1 class(es) named as MVTec AD's take their ratio of the paper's Table 6 "
        "(tile 0.38); --mask_ratio 0.5 sets the other 2 (rename a folder to give it "
        "--mask_ratio)")
    assert run_pretraining.mask_ratio_note(["bolt A"], 0.5) is None


def test_the_flags_dump_says_no_initial_checkpoint_under_no_init():
    parse = run_pretraining.get_args_parser().parse_args
    dumped = json.loads(run_pretraining.flags_dump(parse(["--no_init", "--epochs", "3"])))
    assert dumped["init_ckpt"] is None and dumped["no_init"] is True and dumped["epochs"] == 3
    given = json.loads(run_pretraining.flags_dump(parse(["--init_ckpt", "w/beit.pth"])))
    assert given["init_ckpt"] == "w/beit.pth" and given["no_init"] is False


def test_the_mask_ratio_note_matches_a_class_by_its_exact_name():
    """A class takes its Table 6 ratio by its exact name (masking_generator's rule): a
    user's 'Tile' or 'BOTTLE' is masked at --mask_ratio, so the note must not say it
    takes MVTec AD's ratio (matched case-folded, the note also crashed looking up the
    ratio of 'Tile')."""
    assert masking_generator.class_mask_ratio("Tile", None, 0.5) == 0.5
    assert run_pretraining.mask_ratio_note(["Tile", "BOTTLE"], 0.5) is None
    assert run_pretraining.mask_ratio_note(["Tile", "tile"], 0.5) == (
        "[masking] 1 class(es) named as MVTec AD's take their ratio of the paper's Table 6 "
        "(tile 0.38); --mask_ratio 0.5 sets the other 1 (rename a folder to give it "
        "--mask_ratio)")


def _fake_tokenizer_file(path: Path, obj: dict) -> str:
    torch.save(obj, path)
    return str(path)


def test_device_amp_and_input_size_mistakes_are_refused_before_tokenizing(env, tmp_path,
                                                                         monkeypatch, capsys):
    """Each is one `error:` line, exit 2, before the tokenizer is built: --amp fp16 off
    CUDA, a GPU torch cannot see, an --input_size that is no multiple of the patch size
    or whose patch grid is not the tokenizer's token grid (DALL-E's and the released
    ViT tokenizer's 14 x 14, a k-means tokenizer's from its file)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = str(tmp_path / "out")

    def refused(*flags: str) -> str:
        return _refused_before_tokenizing(_args(env, out, *flags), monkeypatch, capsys)

    assert refused("--amp", "fp16") == (
        "error: --amp fp16 needs a CUDA device (its loss scaler is CUDA-only here), not "
        "--device cpu: use --amp bf16 or --amp none there\n")
    assert refused("--device", "cuda") == (
        "error: --device cuda was asked for but torch sees no CUDA GPU: pass --device cpu, "
        "or install a CUDA build of torch\n")
    assert refused("--device", "gpu") == (
        "error: --device 'gpu' is not a device: pass cpu, cuda or cuda:<index>\n")
    assert refused("--input_size", "100") == (
        f"error: --input_size 100 is not a multiple of {TINY}'s patch size 16: pass e.g. 96 "
        "or 112 (224 for the released tokenizers)\n")
    assert refused("--input_size", "448") == (
        "error: --input_size 448 makes a 28x28 patch grid but the dall-e tokenizer (112 px "
        "token images, stride 8) gives 14x14 tokens per image: pass --input_size 224\n")
    vit = _fake_tokenizer_file(tmp_path / "vit_tokenizer.pth",
                               {"model": {"encoder.pos_embed": torch.zeros(1, 197, 8)}})
    assert refused("--input_size", "448", "--tokenizer_model", "vit_tokenizer",
                   "--tokenizer_weight_path", str(tmp_path)) == (
        f"error: --input_size 448 makes a 28x28 patch grid but the vit_tokenizer {vit} (224 "
        "px token images, patch 16) gives 14x14 tokens per image: pass --input_size 224\n")
    kmeans = _fake_tokenizer_file(tmp_path / "kmeans.pth",
                                  {"tokenizer": "kmeans", "image_size": 224})
    assert refused("--input_size", "448", "--tokenizer_model", "kmeans",
                   "--tokenizer_weight_path", kmeans) == (
        f"error: --input_size 448 makes a 28x28 patch grid but the kmeans tokenizer {kmeans} "
        "(fitted at 224 px) gives 14x14 tokens per image: pass --input_size 224, or fit a "
        "tokenizer at 448 px (--fit_kmeans_tokenizer with a new --tokenizer_weight_path)\n")
    assert not os.path.exists(out)  # refused before the output folder is made


@pytest.mark.parametrize("flag, value, words", [
    ("--opt_betas", ["1.5", "0.999"], "1.5 is outside [0, 1)"),
    ("--opt_eps", ["-1"], "-1 is not a positive number"),
    ("--drop_path", ["1.5"], "1.5 is outside [0, 1)"),
    ("--weight_decay", ["-1"], "-1 is not a finite number >= 0"),
    ("--weight_decay_end", ["-0.1"], "-0.1 is not a finite number >= 0"),
    ("--seed", ["-1"], "-1 is less than 0"),
    ("--min_lr", ["-0.01"], "-0.01 is not a finite number >= 0"),
    ("--min_lr", ["nan"], "nan is not a finite number >= 0"),
    ("--clip_grad", ["nan"], "nan is not a finite number >= 0"),
    ("--clip_grad", ["-1"], "-1 is not a finite number >= 0"),
    ("--layer_scale_init_value", ["inf"], "inf is not a finite number >= 0"),
    ("--layer_scale_init_value", ["-0.1"], "-0.1 is not a finite number >= 0"),
])
def test_impossible_optimiser_and_seed_values_are_refused(flag, value, words, capsys):
    """What torch (AdamW's beta and eps, drop path's probability), numpy (a negative
    seed) or nothing (a negative weight decay or min_lr, silently trained with; a NaN
    min_lr blamed on the images as a non-finite loss; a NaN clip_grad, no clipping)
    would take up only after tokenizing: argparse's one error line, exit 2."""
    with pytest.raises(SystemExit) as e:
        run_pretraining.get_args_parser().parse_args(["--data_path", "x", flag, *value])
    assert e.value.code == 2 and f"argument {flag}: {words}" in capsys.readouterr().err


def test_a_min_lr_above_lr_is_refused_before_tokenizing(env, tmp_path, monkeypatch, capsys):
    """The cosine decays --lr to --min_lr: a --min_lr above it would make the rate rise."""
    args = _args(env, str(tmp_path), "--min_lr", "0.01")
    assert _refused_before_tokenizing(args, monkeypatch, capsys) == (
        "error: --min_lr 0.01 is above --lr 0.001: the cosine schedule decays the learning "
        "rate from --lr down to --min_lr; pass a --min_lr of at most --lr\n")


def test_a_min_lr_equal_to_lr_passes_the_checks(env, tmp_path, monkeypatch):
    """--min_lr may be --lr itself (a constant rate after the warm-up, "at most --lr"):
    the checks pass it on to the tokenizer."""
    def reached(*_, **__):
        raise _Crash

    monkeypatch.setattr(run_pretraining.modeling_discrete_vae, "create_tokenizer", reached)
    args = _args(env, str(tmp_path / "out"), "--min_lr", "1e-3")
    assert args.min_lr == args.lr == 1e-3
    with pytest.raises(_Crash):
        run_pretraining.main(args)


def test_a_file_as_log_or_token_cache_folder_is_refused_before_tokenizing(env, tmp_path,
                                                                          monkeypatch, capsys):
    afile = tmp_path / "a_file"
    afile.write_text("")
    out = str(tmp_path / "out")
    for flag in ("--log_dir", "--token_cache_dir"):
        assert _refused_before_tokenizing(_args(env, out, flag, str(afile)), monkeypatch,
                                          capsys) == (
            f"error: {flag} {afile} is a file, not a folder: pass a folder (it is created if "
            "missing)\n")


@pytest.mark.parametrize("setting, extra, expected", [
    ("multi_class", [], datasets.MVTEC_CLASSES),
    ("obj2tex", [], datasets.OBJECTS),
    ("tex2obj", [], datasets.TEXTURES),
    ("leave_one_out", ["--unseen_classes", "screw"],
     [c for c in datasets.MVTEC_CLASSES if c != "screw"]),
])
def test_each_setting_trains_on_exactly_its_classes(env, tmp_path, monkeypatch, setting,
                                                     extra, expected):
    """The epoch is replaced by a pass over its batches (training itself is covered
    above): what reaches the training step is exactly the setting's classes, and the
    checkpoint's arguments record them."""
    seen: list[str] = []

    def one_pass(model, data_loader, optimizer, scaler, policy, config, **k):
        for batch in _first_batches(data_loader, config.num_steps):
            seen.extend(policy.class_names[i] for i in batch["class_idx"].tolist())
        return {"loss": 0.0}

    monkeypatch.setattr(engine, "train_one_epoch", one_pass)
    args = _args(env, str(tmp_path), "--setting", setting, *extra, "--epochs", "1",
                 "--batch_size", "1", "--max_steps_per_epoch", "100", data=env["every"])
    summary = run_pretraining.main(args)
    assert summary["train_classes"] == sorted(expected) and summary["num_steps"] == len(expected)
    assert sorted(seen) == sorted(expected)  # one image per class, each seen once
    ckpt = utils.load_checkpoint_file(os.path.join(tmp_path, "checkpoint-last.pth"))
    assert ckpt["masking"]["dynamic_masking"]["class_names"] == sorted(expected)
    # run_test.py refuses to score one of these as an unseen class
    assert ckpt["args"].get("train_classes") == sorted(expected)


def _first_batches(loader, n: int):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def test_kmeans_tokenizer_fitted_once_and_vocab_follows_it(env, tmp_path):
    tok = str(tmp_path / "kmeans.pth")
    argv = _argv(env, str(tmp_path / "out"), "--epochs", "1", "--tokenizer_model", "kmeans",
                 "--tokenizer_weight_path", tok, "--fit_kmeans_tokenizer",
                 "--kmeans_vocab_size", "16", "--kmeans_out_index", "2",
                 "--token_cache_dir", str(tmp_path / "cache"))
    run_pretraining.main(run_pretraining.get_args_parser().parse_args(argv))
    stamp = os.stat(tok).st_mtime_ns
    saved = torch.load(tok, weights_only=True)
    assert saved["out_index"] == 2 and saved["codebook"].shape == (16, 40)  # stride 8
    ckpt = utils.load_checkpoint_file(str(tmp_path / "out" / "checkpoint-last.pth"))
    assert ckpt["model"]["lm_head.weight"].shape == (16, 192)  # the tokenizer's 16 codes
    argv[argv.index("--output_dir") + 1] = str(tmp_path / "out2")
    run_pretraining.main(run_pretraining.get_args_parser().parse_args(argv))
    assert os.stat(tok).st_mtime_ns == stamp  # an existing tokenizer is never refitted


@pytest.mark.filterwarnings("ignore:training images. left out")  # asserted where it counts
def test_kmeans_fit_skips_what_training_skips_and_refuses_a_vocabulary_too_large(
        env, tmp_path, capsys):
    """--skip_bad_images leaves an unreadable image out of the k-means fit too (the fit
    refused it, telling the user to pass the flag already given); a vocabulary larger
    than the training patches is a FlagError naming the flag, before any feature."""
    data = tmp_path / "data"
    shutil.copytree(env["two"], data)
    (data / "train" / TWO_CLASSES[0] / "000.png").write_bytes(b"not a png")
    tok = tmp_path / "kmeans.pth"
    argv = _argv(env, str(tmp_path / "out"), "--epochs", "1", "--tokenizer_model", "kmeans",
                 "--tokenizer_weight_path", str(tok), "--fit_kmeans_tokenizer",
                 "--kmeans_vocab_size", "16", "--token_cache_dir", str(tmp_path / "cache"),
                 "--skip_bad_images", data=str(data))
    with pytest.warns(UserWarning, match=r"training images: left out 1 bad file\(s\) of 8") \
            as caught:
        run_pretraining.main(run_pretraining.get_args_parser().parse_args(argv))
    assert len(caught) == 2  # the k-means fit's and training's, each naming the file
    assert all("bottle/000.png: cannot identify" in str(w.message) for w in caught)
    assert f"fitting 16 k-means codes on 7 images -> {tok}" in capsys.readouterr().out
    assert torch.load(tok, weights_only=True)["codebook"].shape[0] == 16
    big = tmp_path / "big.pth"
    argv[argv.index(str(tok))] = str(big)
    argv[argv.index("16")] = "2048"
    argv[argv.index("--output_dir") + 1] = str(tmp_path / "out_big")
    with pytest.raises(utils.FlagError, match=(
            r"^--kmeans_vocab_size 2048 \(demo.sh: KMEANS_VOCAB\) needs at least as many "
            f"training patches; 7 images of {data} give 1372: pass a smaller vocabulary")):
        run_pretraining.main(run_pretraining.get_args_parser().parse_args(argv))
    assert not big.exists()


def test_the_original_launchers_local_rank_flag(monkeypatch):
    """`python -m torch.distributed.launch` (the original scripts) appends --local-rank=N
    (--local_rank N before torch 2.0); it reaches utils.distributed as LOCAL_RANK unless
    the launcher set that itself."""
    parse = run_pretraining.get_args_parser().parse_args
    assert parse(["--local-rank=1"]).local_rank == 1
    assert parse(["--local_rank", "2"]).local_rank == 2
    assert parse([]).local_rank is None
    ranks = []
    monkeypatch.setattr(run_pretraining, "_train", lambda args, env: ranks.append(
        (os.environ["LOCAL_RANK"], env.local_rank)))
    monkeypatch.setenv("LOCAL_RANK", "0")  # recorded, so that the test leaves none behind
    monkeypatch.delenv("LOCAL_RANK")
    run_pretraining.main(parse(["--local-rank=1", "--device", "cpu"]))
    monkeypatch.setenv("LOCAL_RANK", "0")  # torchrun's variable wins
    run_pretraining.main(parse(["--local-rank=1", "--device", "cpu"]))
    assert ranks == [("1", 1), ("0", 0)]


def test_imagenet_normalisation_is_the_default_the_original_scripts_ask_for():
    """The original parser's --imagenet_default_mean_and_std is off unless given, and its
    scripts give it: here it is on by default (docs/method.md 4), the same meaning for
    its command lines; BEiT's 0.5/0.5 takes --no-imagenet_default_mean_and_std."""
    parse = run_pretraining.get_args_parser().parse_args
    assert parse([]).imagenet_default_mean_and_std is True
    assert parse(["--imagenet_default_mean_and_std"]).imagenet_default_mean_and_std is True
    off = parse(["--no-imagenet_default_mean_and_std"]).imagenet_default_mean_and_std
    assert datasets.normalization(off) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert datasets.normalization(True) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def test_from_obj_to_texture_alias():
    parse = run_pretraining.get_args_parser().parse_args
    assert parse(["--from_obj_to_texture"]).from_obj_to_texture
    assert datasets.resolve_setting(None, True) == "obj2tex"
    assert datasets.resolve_setting("obj2tex", True) == "obj2tex"
    assert datasets.resolve_setting(None) == "multi_class"
    with pytest.raises(ValueError, match="only one"):
        datasets.resolve_setting("tex2obj", True)


def test_original_command_line_trains(env, tmp_path, capsys):
    """The original scripts' form: --data_path <root>/train and their flags."""
    out = tmp_path / "out"
    argv = _argv(env, str(out), "--epochs", "1", "--mask_ratio", "0.25", "--clip_grad", "2.0",
                 "--drop_path", "0.05", "--layer_scale_init_value", "0.2",
                 "--imagenet_default_mean_and_std", "--from_obj_to_texture",
                 data=os.path.join(env["every"], "train"))
    summary = run_pretraining.main(run_pretraining.get_args_parser().parse_args(argv))
    assert f"{env['every']}/train is the train/ folder" in capsys.readouterr().out
    assert summary["train_classes"] == datasets.OBJECTS and summary["num_images"] == 10
    assert math.isfinite(summary["stats"]["loss"])
    ckpt = utils.load_checkpoint_file(str(out / "checkpoint-last.pth"))
    args = ckpt["args"]
    assert args["data_path"] == env["every"] and args["setting"] == "obj2tex"
    assert (args["mask_ratio"], args["clip_grad"], args["drop_path"]) == (0.25, 2.0, 0.05)
    assert args["imagenet_default_mean_and_std"] and args["tokenizer_weight_path"] == env[
        "tokenizer"]
    # layer scale starts at 0.2 and moved by one AdamW step of lr 1e-3 at most
    gamma = ckpt["model"]["blocks.0.gamma_1"]
    assert (gamma - 0.2).abs().max() < 2e-3 and not torch.all(gamma == 0.2)


_RECORDER = """
import json, os, sys
sys.path.insert(0, {repo!r})
import engine, run_pretraining
real, seen, ddp = engine.train_one_epoch, [], {{}}
def recording(model, data_loader, *a, **k):
    ddp["sync_buffers"] = getattr(model, "forward_sync_buffers", model.broadcast_buffers)
    def batches():
        for batch in data_loader:
            seen.extend(batch["index"].tolist())
            yield batch
    return real(model, batches(), *a, **k)
engine.train_one_epoch = recording
run_pretraining.main(run_pretraining.get_args_parser().parse_args())
with open(os.path.join({out!r}, "seen%s.json" % os.environ["RANK"]), "w") as f:
    json.dump(dict(ddp, seen=seen), f)
"""


def test_torchrun_two_processes_on_gloo(env, tmp_path):
    out, rec = str(tmp_path / "out"), tmp_path / "seen"
    rec.mkdir()
    # an earlier run's files, set aside once (rank 0) by this fresh start
    utils.save_on_master({"epoch": 5}, utils.checkpoint_path(out, 5))
    Path(out, "log.txt").write_text('{"epoch": 5}\n')
    script = tmp_path / "recorder.py"
    script.write_text(_RECORDER.format(repo=REPO, out=str(rec)))
    argv = _argv(env, out, "--epochs", "1", "--max_steps_per_epoch", "2", "--no_auto_resume")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc_per_node", "2", str(script), *argv]
    proc = run_command(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = [json.loads((rec / f"seen{r}.json").read_text()) for r in range(2)]
    assert not any(r["sync_buffers"] for r in records)  # a constant index only
    assert "broadcast_buffers" not in proc.stderr  # no deprecation warning from each rank
    seen = [r["seen"] for r in records]
    assert len(seen[0]) == len(seen[1]) == 4  # 2 steps x batch 2 on each rank
    assert set(seen[0]).isdisjoint(seen[1]) and sorted(seen[0] + seen[1]) == list(range(8))
    *files, previous = sorted(os.listdir(out))
    assert files == ["checkpoint-0.pth", "checkpoint-last.pth", "log.txt"]
    assert previous.startswith("previous-")
    assert sorted(os.listdir(os.path.join(out, previous))) == ["checkpoint-5.pth", "log.txt"]
    ckpt = utils.load_checkpoint_file(os.path.join(out, "checkpoint-last.pth"))
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
    rngs = ckpt["masking"]["mask_rng"]
    assert len(rngs) == 2 and rngs[0] != rngs[1]
    # statistics of both ranks' batches, all-reduced: every image's masked patches
    count = ckpt["masking"]["dynamic_masking"]["count"]
    assert int(count.sum()) == _masked_total(["bottle", "carpet"] * 4)
    assert [r["epoch"] for r in read_jsonl(os.path.join(out, "log.txt"))] == [0]


def test_shell_scripts_build_the_torchrun_command(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "torchrun").write_text("#!/usr/bin/env bash\necho \"$@\"\n")
    (fake / "torchrun").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "NPROC": "3"}
    def run(script: str, **e: str) -> list[str]:
        proc = run_command(["bash", f"scripts/{script}", "--epochs", "7"], cwd=REPO,
                           env={**env, **e})
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.split()
    multi = run("train_multi_class.sh")
    assert multi[multi.index("--nproc_per_node") + 1] == "3"
    assert "run_pretraining.py" in multi and multi[-2:] == ["--epochs", "7"]
    assert multi[multi.index("--setting") + 1] == "multi_class"
    assert multi[multi.index("--data_path") + 1] == "data/Mvtec-ImageNet"
    tex2obj = run("train_cross_class.sh")
    assert tex2obj[tex2obj.index("--setting") + 1] == "tex2obj"
    assert "--from_obj_to_texture" not in tex2obj
    obj2tex = run("train_cross_class.sh", FROM_OBJ_TO_TEXTURE="1", DATA_PATH="/d")
    assert "--from_obj_to_texture" in obj2tex
    assert obj2tex[obj2tex.index("--setting") + 1] == "obj2tex"
    assert obj2tex[obj2tex.index("--output_dir") + 1] == "output_dir/obj2tex"
    for off in ("0", "off", "False", "NO"):
        again = run("train_cross_class.sh", FROM_OBJ_TO_TEXTURE=off)
        assert again[again.index("--setting") + 1] == "tex2obj", off
    yes = run("train_cross_class.sh", FROM_OBJ_TO_TEXTURE="Yes")
    assert yes[yes.index("--setting") + 1] == "obj2tex"
    proc = run_command(["bash", "scripts/train_cross_class.sh"], cwd=REPO,
                       env={**env, "FROM_OBJ_TO_TEXTURE": "objects"})
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: FROM_OBJ_TO_TEXTURE=objects: give 1 (objects -> "
                                  "textures) or 0")
    assert obj2tex[obj2tex.index("--data_path") + 1] == "/d"
    # the original switch given to the multi-class script: said so (it was run_pretraining's
    # '--setting multi_class was given', a flag the user never typed)
    proc = run_command(["bash", "scripts/train_multi_class.sh", "--from_obj_to_texture"],
                       cwd=REPO, env=env)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == ("error: --from_obj_to_texture selects objects -> textures, not "
                           "SETTING=multi_class: run bash scripts/train_cross_class.sh "
                           "--from_obj_to_texture (its checkpoint and output folder)\n")
    # one process: the interpreter itself, so a mistake's exit code 2 reaches the caller
    (fake / "py").write_text("#!/usr/bin/env bash\necho python \"$@\"\nexit 2\n")
    (fake / "py").chmod(0o755)
    proc = run_command(["bash", "scripts/train_multi_class.sh"], cwd=REPO,
                       env={**env, "NPROC": "1", "PYTHON": str(fake / "py")})
    assert proc.returncode == 2
    single = proc.stdout.split()
    assert single[:2] == ["python", "run_pretraining.py"] and "--nproc_per_node" not in single
    assert "--layer_scale_init_value" not in single  # each model's own (ViT-L: 1e-5)


@pytest.mark.parametrize("mode", ["patch", "global"])
def test_freq_mode_reaches_the_frequency_weights(env, tmp_path, monkeypatch, mode):
    """--freq_mode global keeps the original code's whole-image spectrum on request."""
    modes: list[str] = []
    real = masking_generator.frequency_weights

    def spy(images, patch_size=16, mode="patch"):
        modes.append(mode)
        return real(images, patch_size=patch_size, mode=mode)

    monkeypatch.setattr(masking_generator, "frequency_weights", spy)
    run_pretraining.main(_args(env, str(tmp_path), "--epochs", "1", "--freq_mode", mode))
    assert modes and set(modes) == {mode}


# ----------------------------------------------------------------------------- flags
def _record_epochs(monkeypatch) -> list[dict]:
    """engine.train_one_epoch replaced by a record of what reaches it, with each epoch's
    first batch (training itself is covered above)."""
    calls: list[dict] = []

    def record(model, data_loader, optimizer, scaler, policy, config, *, epoch, **k):
        calls.append(dict(model=model, loader=data_loader, optimizer=optimizer, scaler=scaler,
                          policy=policy, config=config, epoch=epoch,
                          batch=next(iter(data_loader))))
        return {"loss": 0.0}

    monkeypatch.setattr(engine, "train_one_epoch", record)
    return calls


FLAGGED = ("--lr", "0.01", "--min_lr", "0.001", "--warmup_steps", "2",
           "--max_steps_per_epoch", "2", "--weight_decay", "0.2", "--weight_decay_end", "0.02",
           "--opt_betas", "0.8", "0.95", "--opt_eps", "1e-6", "--clip_grad", "1.5",
           "--amp", "bf16", "--dynamic_masking_start", "5", "--save_ckpt_freq", "1",
           "--mask_ratio", "0.25")


@pytest.fixture(scope="module")
def flagged(env, tmp_path_factory):
    """One run with every optimiser, schedule and output flag away from its default."""
    out = tmp_path_factory.mktemp("flagged")
    with pytest.MonkeyPatch.context() as mp:
        calls = _record_epochs(mp)
        summary = run_pretraining.main(_args(env, str(out), *FLAGGED))
    return {"out": out, "calls": calls, "summary": summary}


def test_optimiser_and_schedule_flags_reach_their_consumers(flagged):
    calls = flagged["calls"]
    assert [c["epoch"] for c in calls] == [0, 1]
    config = calls[0]["config"]
    assert config.num_steps == 2  # --max_steps_per_epoch 2: 4 steps in all
    # --warmup_steps 2 (over --warmup_epochs 0): 0, lr; then a half cosine to --min_lr
    np.testing.assert_allclose(config.lr_schedule, [0.0, 0.01, 0.01, 0.001 + 0.0045])
    # weight decay: a cosine from --weight_decay to --weight_decay_end, no warm-up
    c = math.cos(math.pi / 4)
    np.testing.assert_allclose(config.wd_schedule, [0.2, 0.02 + 0.09 * (1 + c), 0.11,
                                                    0.02 + 0.09 * (1 - c)])
    assert config.clip_grad == 1.5 and config.amp == "bf16"
    groups = calls[0]["optimizer"].param_groups
    assert sorted(g["weight_decay"] for g in groups) == [0.0, 0.2]
    assert all(g["betas"] == (0.8, 0.95) and g["eps"] == 1e-6 for g in groups)
    assert calls[0]["policy"].dynamic_start == 5
    # --mask_ratio is the ratio of a class without one of its own (the paper's Table 6)
    generator = calls[0]["policy"].generator
    n = generator.num_patches
    assert generator.num_masked_for("widget") == int(n * 0.25)
    assert generator.num_masked_for("bottle") == int(n * 0.42)
    assert int(generator(["widget", "widget"]).sum()) == 2 * int(n * 0.25)
    # --save_ckpt_freq 1: a numbered checkpoint every epoch (default 20: the last only)
    # (the resume tests of this module's folder add previous-<time>/ folders beside them)
    assert sorted(p for p in os.listdir(flagged["out"]) if not p.startswith("previous-")) == [
        "checkpoint-0.pth", "checkpoint-1.pth", "checkpoint-last.pth", "log.txt"]


def test_amp_bf16_runs_the_vit_in_bfloat16(flagged):
    """--amp bf16 reaches the step's autocast (on a one-block ViT of the same kind, for
    speed): the logits are bfloat16, the loss (float32 cross-entropy) and the gradient
    norm finite."""
    run = flagged["calls"][0]
    batch, config = run["batch"], run["config"]
    torch.manual_seed(0)
    model = timm.create_model(TINY, depth=1, vocab_size=16)
    dtypes = []
    model.lm_head.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    drawn = run["policy"].draw(batch["class_idx"], batch.get("fg_mask"),
                               batch.get("freq_weights"), 0)
    out = engine.train_step(model, batch["image"], batch["tokens"] % 16, drawn,
                            utils.build_optimizer(model, 1e-3, 0.05), run["scaler"],
                            clip_grad=config.clip_grad, amp=config.amp)
    assert dtypes == [torch.bfloat16]
    assert out.loss.dtype == torch.float32 and math.isfinite(out.loss.item())
    assert math.isfinite(out.grad_norm.item()) and not out.failed


def test_resume_flags_choose_the_start_epoch(env, flagged, monkeypatch):
    out = str(flagged["out"])
    args = FLAGGED  # a resume with other flags is refused
    calls = _record_epochs(monkeypatch)
    assert run_pretraining.main(_args(env, out, *args))["start_epoch"] == 2  # auto: done
    # --auto_resume (BEiT's flag, the default) after --no_auto_resume: the last one wins
    again = run_pretraining.main(_args(env, out, *args, "--no_auto_resume", "--auto_resume"))
    assert again["start_epoch"] == 2 and calls == []
    first = os.path.join(out, "checkpoint-0.pth")
    resumed = run_pretraining.main(_args(env, out, *args, "--resume", first))
    assert resumed["start_epoch"] == 1 and [c["epoch"] for c in calls] == [1]
    calls.clear()
    fresh = run_pretraining.main(_args(env, out, *args, "--no_auto_resume"))
    assert fresh["start_epoch"] == 0 and [c["epoch"] for c in calls] == [0, 1]


def test_weight_decay_has_no_warm_up():
    """Only the learning rate warms up (--warmup_epochs, BEiT's schedule): the weight
    decay starts at --weight_decay and follows its cosine to --weight_decay_end."""
    args = run_pretraining.get_args_parser().parse_args(
        ["--data_path", "x", "--epochs", "3", "--warmup_epochs", "1", "--weight_decay", "0.2",
         "--weight_decay_end", "0.02"])
    _, _, config = run_pretraining.build_optimisation(args, torch.nn.Linear(2, 2), 2,
                                                      torch.device("cpu"))
    assert config.lr_schedule[0] == 0.0
    np.testing.assert_allclose(config.wd_schedule, utils.cosine_scheduler(0.2, 0.02, 3, 2))
    assert config.wd_schedule[0] == pytest.approx(0.2)


def test_restore_resumes_weights_optimiser_loss_scale_and_masking(tmp_path):
    """run_pretraining.restore hands each part of the training state to what uses it:
    the weights, AdamW's moments, fp16's loss scale and the masking policy's statistics
    and stream (a part left out restarts silently, and the resumed run is another)."""
    def parts(seed: int):
        torch.manual_seed(seed)
        model = torch.nn.Linear(4, 4)
        opt = utils.build_optimizer(model, 0.1, 0.05)
        model(torch.randn(2, 4)).square().sum().backward()
        opt.step()
        policy = masking_generator.MaskingPolicy(masking_generator.MaskGenerator((2, 2)),
                                                 ["a", "b"], dynamic_start=0, seed=seed)
        return model, opt, policy

    model, opt, policy = parts(0)
    policy.observe(torch.tensor([1]), torch.tensor([[True, False, True, False]]),
                   torch.tensor([[3.5, 0.0, 1.5, 0.0]]))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    path = utils.save_training_state(str(tmp_path), [3], epoch=3, model=model, optimizer=opt,
                                     scaler=scaler, args={}, masking=policy.state_dict())[0]
    draws = policy.rng.integers(0, 1 << 30, 4).tolist()
    model2, opt2, policy2 = parts(1)
    scaler2 = utils.make_grad_scaler("cpu", "fp16")
    args = run_pretraining.get_args_parser().parse_args(["--data_path", "x", "--no_init"])
    assert run_pretraining.restore(args, model2, opt2, scaler2, policy2, path,
                                   torch.device("cpu")) == 4
    assert torch.equal(model2.weight, model.weight)
    assert torch.equal(opt2.state[model2.weight]["exp_avg"], opt.state[model.weight]["exp_avg"])
    assert scaler2.get_scale() == 2.0 ** 10
    assert torch.equal(policy2.dynamic.counts, policy.dynamic.counts)
    assert policy2.rng.integers(0, 1 << 30, 4).tolist() == draws


def test_pin_mem_is_asked_of_the_loader_by_default_and_not_with_no_pin_mem(env, tmp_path,
                                                                            monkeypatch):
    """What run_pretraining asks of datasets.build_train_loader (which pins on CUDA only,
    so a CPU loader never shows it)."""
    asked = []

    class _Built(Exception):
        pass

    def record(*a, pin_memory, **k):
        asked.append(pin_memory)
        raise _Built  # the loader's request is all this test reads

    monkeypatch.setattr(datasets, "build_train_loader", record)
    for i, flags in enumerate([(), ("--pin_mem",), ("--no-pin_mem",)]):
        with pytest.raises(_Built):
            run_pretraining.main(_args(env, str(tmp_path / str(i)), *flags))
    assert asked == [True, True, False]


def test_fg_mask_flag_limits_masking_to_the_foreground_or_not(env, flagged, tmp_path,
                                                              monkeypatch):
    """The training images' foreground masks reach the batches (patches outside the
    object are False); --no-fg_mask counts every patch as foreground."""
    with_masks = flagged["calls"][0]["batch"]["fg_mask"]  # (N, L)
    assert with_masks.shape == (2, 196) and not with_masks.all() and with_masks.any()
    calls = _record_epochs(monkeypatch)
    run_pretraining.main(_args(env, str(tmp_path), "--no-fg_mask", "--epochs", "1"))
    assert calls[0]["batch"]["fg_mask"].all()


def test_skip_bad_images_leaves_an_unreadable_image_out(env, tmp_path, monkeypatch):
    import shutil
    data = tmp_path / "data"
    shutil.copytree(env["two"], data)
    bad = data / "train" / "carpet" / "002.png"
    bad.write_bytes(b"not a png")
    _record_epochs(monkeypatch)
    with pytest.raises(datasets.BadFileError, match="002.png"):
        run_pretraining.main(_args(env, str(tmp_path / "a"), "--epochs", "1", data=str(data)))
    with pytest.warns(UserWarning, match="(?s)left out 1 bad file.*002.png"):
        summary = run_pretraining.main(_args(env, str(tmp_path / "b"), "--epochs", "1",
                                             "--skip_bad_images", data=str(data)))
    assert summary["num_images"] == 7


def _beit_like_file(tmp_path, **kwargs) -> tuple[torch.nn.Module, Path]:
    """A tiny BEiT-layout model with random (not initial) weights, saved as BEiT saves:
    {'model': state_dict}."""
    source = timm.create_model(TINY, pretrained=False, use_shared_rel_pos_bias=True,
                               use_abs_pos_emb=False, init_values=0.1, **kwargs)
    torch.manual_seed(3)
    with torch.no_grad():
        for p in source.parameters():
            p.normal_()
    path = tmp_path / "beit.pth"
    torch.save({"model": source.state_dict()}, path)
    return source, path


def test_init_ckpt_loads_a_beit_checkpoint(env, tmp_path, monkeypatch):
    """The success path of --init_ckpt (without --no_init): every weight of the file."""
    source, path = _beit_like_file(tmp_path)
    calls = _record_epochs(monkeypatch)
    argv = [a for a in _argv(env, str(tmp_path / "out"), "--epochs", "1") if a != "--no_init"]
    run_pretraining.main(run_pretraining.get_args_parser().parse_args(
        argv + ["--init_ckpt", str(path)]))
    loaded = calls[0]["model"].state_dict()
    for key, value in source.state_dict().items():
        assert torch.equal(loaded[key], value), key


def test_the_ranks_compare_their_foreground_masks_file_by_file_too(env, tmp_path,
                                                                   monkeypatch):
    """Masks decide where the ViT masks: ranks whose masks differ are refused naming the
    files, so the files compared are this rank's training images and its masks."""
    compared = []

    def check(identity, data_path, paths):
        compared.append((identity, data_path, list(paths)))
        raise KeyboardInterrupt  # enough: the files are named
    monkeypatch.setattr(run_pretraining, "check_ranks_read_same_data", check)
    with pytest.raises(KeyboardInterrupt):
        run_pretraining.main(_args(env, str(tmp_path / "out")))
    [(identity, data_path, paths)] = compared
    rel = sorted(os.path.relpath(p, data_path) for p in paths)
    assert rel == sorted(f"{sub}/{c}/{i:03d}.png" for sub in ("train", "fg_mask")
                         for c in TWO_CLASSES for i in range(4))
    assert run_pretraining.FG_MASKS in identity


def test_no_init_with_another_init_ckpt_is_refused_not_silently_random(env, tmp_path, capsys):
    """The advice after a refused resume or a non-finite loss (--init_ckpt <checkpoint>
    with another --output_dir), added to a command that trains from scratch (--no_init,
    as scripts/demo.sh's), must not train from random weights with no word: refused
    before anything is written. The default --init_ckpt with --no_init (what
    scripts/train_multi_class.sh passes with a user's --no_init) still trains."""
    _, path = _beit_like_file(tmp_path)
    out = tmp_path / "out"
    argv = _argv(env, str(out), "--epochs", "1", "--init_ckpt", str(path))
    assert run_pretraining.command_line(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --no_init (random weights) and --init_ckpt {path} "), err
    assert "drop --no_init" in err and not out.exists()
    default = _argv(env, str(out), "--epochs", "1", "--init_ckpt",
                    run_pretraining.DEFAULT_INIT_CKPT)
    assert run_pretraining.command_line(default) == 0


def test_a_resume_goes_on_without_the_init_ckpt_it_started_from(env, tmp_path, monkeypatch):
    """--init_ckpt is read by a run's first start only: a resume (its weights are the
    checkpoint's) is not refused when the file is gone since, e.g. on another node."""
    calls = _record_epochs(monkeypatch)
    _, path = _beit_like_file(tmp_path)
    argv = [a for a in _argv(env, str(tmp_path / "out"), "--epochs", "1") if a != "--no_init"]
    argv += ["--init_ckpt", str(path)]
    run_pretraining.main(run_pretraining.get_args_parser().parse_args(argv))
    path.unlink()
    again = run_pretraining.main(run_pretraining.get_args_parser().parse_args(argv))
    assert again["start_epoch"] == 1 and [c["epoch"] for c in calls] == [0]  # nothing to do


def test_init_ckpt_in_the_output_dir_is_loaded_before_the_run_is_set_aside(env, tmp_path,
                                                                           monkeypatch):
    """A new run (--no_auto_resume, another --lr) in the folder of the run it starts
    from (--init_ckpt its checkpoint-last.pth): the file is loaded first, then moved to
    previous-<time>/ with the earlier run's other files."""
    out = tmp_path / "out"
    calls = _record_epochs(monkeypatch)
    run_pretraining.main(_args(env, str(out), "--epochs", "1"))
    start = utils.load_checkpoint_file(str(out / "checkpoint-last.pth"))["model"]
    # seed 1: a model that did not load the file would start from other weights
    argv = [a for a in _argv(env, str(out), "--epochs", "1", "--lr", "5e-4",
                             "--no_auto_resume", "--seed", "1") if a != "--no_init"]
    run_pretraining.main(run_pretraining.get_args_parser().parse_args(
        argv + ["--init_ckpt", str(out / "checkpoint-last.pth")]))
    loaded = calls[-1]["model"].state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in start.items())
    torch.manual_seed(1)
    fresh = timm.create_model(TINY, pretrained=False).state_dict()
    assert not all(torch.equal(fresh[k], v) for k, v in start.items())
    (previous,) = [p for p in os.listdir(out) if p.startswith("previous-")]
    assert "checkpoint-last.pth" in os.listdir(out / previous)


def test_init_ckpt_of_another_vocabulary_keeps_all_but_the_head(tmp_path, capsys):
    """BEiT's pt22k file (an 8,192-code head) into a model of a 32-code tokenizer: every
    layer but lm_head comes from the file, the head keeps its initial weights, and the
    log says so."""
    source, path = _beit_like_file(tmp_path, vocab_size=8192)
    target = timm.create_model(TINY, pretrained=False, use_shared_rel_pos_bias=True,
                               use_abs_pos_emb=False, init_values=0.1, vocab_size=32)
    head = {k: v.clone() for k, v in target.state_dict().items() if k.startswith("lm_head.")}
    modeling_pmad.load_init_checkpoint(target, str(path))
    loaded = target.state_dict()
    for key, value in source.state_dict().items():
        if key.startswith("lm_head."):
            assert torch.equal(loaded[key], head[key]) and loaded[key].shape[0] == 32, key
        else:
            assert torch.equal(loaded[key], value), key
    assert "its lm_head predicts 8192 visual tokens, this run's tokenizer has 32" in \
        capsys.readouterr().out
