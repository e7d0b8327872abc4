"""No host synchronisation in a training step (issue: the host must never wait for the
GPU between steps), checked on the CPU:

- HostSyncCounter (conftest) lists every aten call that would make the host wait on a
  GPU (item/bool, nonzero and boolean indexing, unique, blocking copies to the host);
- FakeTensorMode runs the step on tensors without data, where any such read raises;
- the host reads the device only at the planned points (every `sync_every` steps);
- a failed step stops the epoch with the weights of the step before it.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import timm
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import engine
import masking_generator as mg
import modeling_pmad  # noqa: F401  (registers the ViTs)
import protoflow
import utils
from conftest import HostSyncCounter, synthetic_batches

TINY = "vit_tiny_patch16_224_8k_vocab"
CLASSES = ["bottle", "carpet"]
VOCAB = 64


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(TINY, depth=2, drop_path_rate=0.0, vocab_size=VOCAB)


def _policy(dynamic_start: int = 0) -> mg.MaskingPolicy:
    return mg.MaskingPolicy(mg.MaskGenerator(), CLASSES, dynamic_start=dynamic_start,
                            seed=1)


def _config(num_steps: int, sync_every: int) -> engine.TrainConfig:
    lr = np.full(4 * num_steps, 1e-3)  # epochs 0-3
    return engine.TrainConfig(lr, lr * 50, num_steps, clip_grad=3.0,
                              sync_every=sync_every)


def test_train_one_epoch_reads_the_device_only_at_planned_points(monkeypatch):
    """Steps and statistics updates make no call that waits for the device; the host
    reads the metrics every `sync_every` steps and at the end (5 steps, every 3)."""
    model, policy = _model(), _policy()
    counter, reads = HostSyncCounter(), []
    real_step, real_observe, real_read = engine.train_step, policy.observe, engine._read_rows

    def counted(fn):
        def run(*a, **k):
            with counter:
                return fn(*a, **k)
        return run

    def read(history, start, stop):
        reads.append((start, stop))
        return real_read(history, start, stop)

    monkeypatch.setattr(engine, "train_step", counted(real_step))
    monkeypatch.setattr(policy, "observe", counted(real_observe))
    monkeypatch.setattr(engine, "_read_rows", read)
    stats = engine.train_one_epoch(model, synthetic_batches(5, 2, VOCAB),
                                   utils.build_optimizer(model, 1e-3, 0.05),
                                   utils.make_grad_scaler("cpu", "none"), policy,
                                   _config(5, 3), epoch=0, progress=False)
    assert counter.calls == []
    assert reads == [(0, 3), (3, 5)]
    assert math.isfinite(stats["loss"]) and stats["grad_norm"] > 0
    assert int(policy.dynamic.counts.sum()) > 0


def test_an_epoch_that_fails_closes_its_progress_bar():
    """An epoch stopped by an error left its bar open: in a log file (utils.progress) every
    later bar of the process then counted as nested and was not drawn."""
    from tqdm import tqdm
    model, policy = _model(), _policy()

    def failing():
        yield from synthetic_batches(1, 2, VOCAB)
        raise OSError("the disk went away")
    with pytest.raises(OSError, match="went away") as info:
        engine.train_one_epoch(model, failing(), utils.build_optimizer(model, 1e-3, 0.05),
                               utils.make_grad_scaler("cpu", "none"), policy, _config(3, 3),
                               epoch=0, progress=True)
    # while the error is kept (its traceback holds the epoch's frame, as a handler does)
    assert info.value.__traceback__ is not None
    assert not [bar for bar in tqdm._instances if not bar.disable]


class _Writer:
    """A TensorBoard writer that keeps its scalars: [(tag, value, step)]."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, float, int]] = []

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.calls.append((tag, value, step))


def test_steps_the_fp16_loss_scaler_skips_have_no_grad_norm(monkeypatch):
    """A loss scale of 2**127 overflows the first steps, which the (enabled) scaler skips:
    their gradient norm is inf/NaN. The epoch's grad_norm averages the other steps' norms
    (it was NaN), TensorBoard gets none for the skipped steps, and the host still reads
    only every `sync_every` steps. When every step is skipped grad_norm is absent, never
    NaN (log.txt stays strict JSON)."""
    model, policy = _model(), _policy()
    norms, reads = [], []
    real_step, real_read = engine.train_step, engine._read_rows

    def step(*a, **k):
        out = real_step(*a, **k)
        norms.append(out.grad_norm.clone())
        return out

    def read(history, start, stop):
        reads.append((start, stop))
        return real_read(history, start, stop)

    monkeypatch.setattr(engine, "train_step", step)
    monkeypatch.setattr(engine, "_read_rows", read)
    writer = _Writer()
    stats = engine.train_one_epoch(model, synthetic_batches(4, 2, VOCAB),
                                   utils.build_optimizer(model, 1e-3, 0.05),
                                   torch.amp.GradScaler("cpu", init_scale=2.0 ** 127),
                                   policy, _config(4, 2), epoch=0, log_writer=writer,
                                   progress=False)
    values = [float(n) for n in norms]
    kept = [i for i, v in enumerate(values) if math.isfinite(v)]
    assert not math.isfinite(values[0]) and 0 < len(kept) < 4  # some skipped, some not
    assert stats["grad_norm"] == pytest.approx(sum(values[i] for i in kept) / len(kept))
    assert math.isfinite(stats["loss"]) and reads == [(0, 2), (2, 4)]
    assert [s for tag, _, s in writer.calls if tag == "train/grad_norm"] == kept
    assert [s for tag, _, s in writer.calls if tag == "train/loss"] == [0, 1, 2, 3]
    json.dumps(stats, allow_nan=False)

    norms.clear()
    every = engine.train_one_epoch(model, synthetic_batches(2, 2, VOCAB),
                                   utils.build_optimizer(model, 1e-3, 0.05),
                                   torch.amp.GradScaler("cpu", init_scale=2.0 ** 127,
                                                        backoff_factor=0.9),
                                   policy, _config(2, 2), epoch=1, progress=False)
    assert not any(math.isfinite(float(n)) for n in norms) and len(norms) == 2
    assert "grad_norm" not in every and math.isfinite(every["loss"])
    json.dumps(every, allow_nan=False)


def test_train_step_on_tensors_without_data():
    """FakeTensorMode: a read of any value (item, bool, tolist, nonzero) raises."""
    batch = synthetic_batches(1, 2, VOCAB)[0]
    policy = _policy()
    drawn = policy.draw(batch["class_idx"], batch["fg_mask"], batch["freq_weights"], 0)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        model = _model()
        optimizer = utils.build_optimizer(model, 1e-3, 0.05)
        stats = mg.MaskingPolicy(mg.MaskGenerator(), CLASSES, dynamic_start=0)
        fake = mg.MaskBatch(*(mode.from_tensor(t) for t in drawn))
        images, tokens = mode.from_tensor(batch["image"]), mode.from_tensor(batch["tokens"])
        failed = None
        for _ in range(2):
            out = engine.train_step(model, images, tokens, fake, optimizer,
                                    utils.make_grad_scaler("cpu", "none"), clip_grad=3.0,
                                    failed=failed)
            failed = out.failed
            stats.observe(batch["class_idx"], fake.masks, out.patch_losses, valid=~failed)
    # the step's outputs: scalars, the failure flag, the masked CE put back per patch
    for name in ("loss", "loss_all_ranks", "mlm_acc", "grad_norm"):
        value = getattr(out, name)
        assert (value.shape, value.dtype) == (torch.Size([]), torch.float32), name
    assert (out.failed.shape, out.failed.dtype) == (torch.Size([]), torch.bool)
    assert int(drawn.masks.sum()) == len(drawn.index) < 2 * 196  # some patches unmasked
    assert (out.patch_losses.shape, out.patch_losses.dtype) == ((2, 196), torch.float32)
    # AdamW stepped every parameter: moments of the parameter's shape
    params = [p for p in model.parameters() if p.requires_grad]
    assert len(params) > 30 and set(optimizer.state) == set(params)
    for p in params:
        state = optimizer.state[p]
        assert state["step"].shape == () and state["exp_avg"].shape == p.shape
        assert state["exp_avg_sq"].shape == p.shape
    assert stats.dynamic.counts.shape == (2, 196)


def test_forward_and_statistics_on_fake_cuda_tensors():
    """Every tensor of the loss and of the statistics update follows the device of its
    inputs: on fake CUDA tensors a stray CPU tensor raises (no GPU needed)."""
    batch = synthetic_batches(1, 2, VOCAB)[0]
    drawn = _policy().draw(batch["class_idx"], batch["fg_mask"], batch["freq_weights"], 0)
    with FakeTensorMode(allow_non_fake_inputs=True), torch.device("cuda"):
        model = _model()
        policy = mg.MaskingPolicy(mg.MaskGenerator(), CLASSES, dynamic_start=5,
                                  device="cuda")
        masks, index, weights = (t.to("cuda") for t in drawn)
        ce, _ = engine.masked_token_ce(model, batch["image"].to("cuda"),
                                       batch["tokens"].to("cuda"), masks, index)
        loss = engine.weighted_mean(ce, weights)
        losses = engine.scatter_masked(ce.detach(), masks, index)
        policy.observe(batch["class_idx"], masks, losses, valid=torch.isfinite(loss))
        assert loss.device.type == "cuda" and policy.dynamic.counts.device.type == "cuda"


def test_failed_step_keeps_the_weights_and_stops_at_the_next_read(monkeypatch):
    """Step 2 of 5 has a NaN loss; reads every 4 steps: steps 2 and 3 leave the weights
    and the optimiser bit for bit as step 1 left them, the read after step 3 raises
    naming step 2, and step 4 never runs. (Compared within one run: a second run may
    round differently when the BLAS picks another thread count.)"""
    batches = synthetic_batches(5, 2, VOCAB)
    batches[2]["image"][0, 0, 0, 0] = math.nan
    model, policy = _model(), _policy()
    optimizer = utils.build_optimizer(model, 1e-3, 0.05)
    after_step, real_step = [], engine.train_step

    def step_and_snapshot(*args, **kwargs):
        out = real_step(*args, **kwargs)
        after_step.append(({k: v.clone() for k, v in model.state_dict().items()},
                           optimizer.state_dict()["state"][0]["exp_avg"].clone()))
        return out

    after_observe, real_observe = [], policy.observe

    def observe_and_snapshot(*args, **kwargs):
        out = real_observe(*args, **kwargs)
        after_observe.append(policy.dynamic.counts.clone())
        return out

    monkeypatch.setattr(engine, "train_step", step_and_snapshot)
    monkeypatch.setattr(policy, "observe", observe_and_snapshot)
    seen = []
    with pytest.raises(engine.NonFiniteLossError) as info:
        engine.train_one_epoch(model, (seen.append(b) or b for b in batches), optimizer,
                               utils.make_grad_scaler("cpu", "none"), policy,
                               _config(5, 4), epoch=3, sample_names=[f"img{i}" for i in
                                                                      range(10)],
                               progress=False)
    msg = str(info.value)
    assert "non-finite loss" in msg and "at epoch 3, step 2 (global step 17)" in msg
    assert "img4, img5" in msg and len(seen) == 4 and len(after_step) == 4
    weights_1, exp_avg_1 = after_step[1]
    assert not torch.equal(after_step[0][1], exp_avg_1)  # step 1 did update
    for name, value in model.state_dict().items():
        assert torch.equal(value, weights_1[name]), name
    assert torch.equal(optimizer.state_dict()["state"][0]["exp_avg"], exp_avg_1)
    assert optimizer.state_dict()["state"][0]["step"].item() == 2
    # the failed steps added nothing to the dynamic statistics either
    assert len(after_observe) == 4 and after_observe[1].sum() > 0
    assert torch.equal(policy.dynamic.counts, after_observe[1])


def test_coreset_picks_stay_on_the_device():
    x = torch.randn(300, 8, generator=torch.Generator().manual_seed(0))
    with HostSyncCounter() as counter:
        picks = protoflow.greedy_coreset(x, 20, progress=False)
    assert counter.calls == []
    d = torch.cdist(x, x)
    assert picks[0] == 0 and int(picks[1]) == int(d[0].argmax())  # farthest from pick 0


def test_patch_log_likelihood_groups_classes_on_the_host():
    encoder = torch.nn.Conv2d(3, 4, 8, stride=8)
    flow = protoflow.build_flow(4, n_blocks=1)
    protos = [torch.randn(5, 4), torch.randn(7, 4)]
    images = torch.randn(3, 3, 32, 32)
    class_idx = torch.tensor([1, 0, 1])
    extract = protoflow.extract_features
    protoflow.extract_features = lambda enc, x: enc(x)
    try:
        with torch.no_grad(), HostSyncCounter() as counter:
            logp = protoflow.patch_log_likelihood(encoder, flow, images, protos, class_idx)
        with torch.no_grad():
            one = protoflow.patch_log_likelihood(encoder, flow, images[1:2], protos,
                                                 class_idx[1:2])
    finally:
        protoflow.extract_features = extract
    assert counter.calls == [] and logp.shape == (3, 4, 4)
    torch.testing.assert_close(logp[1:2], one)


def test_proposals_make_their_tensors_on_the_input_device():
    """Under a 'meta' default device, a tensor made without a device lands on meta and
    cannot mix with the CPU input."""
    logp = torch.randn(2, 28, 28)
    with torch.device("meta"):
        out = protoflow.proposals_from_log_likelihood(logp)
        masks = out.test_masks(0.3)
    assert out.rank.device.type == "cpu" and out.abnormality_maps.device.type == "cpu"
    assert masks.device.type == "cpu" and masks.sum(1).tolist() == [58, 58]


@pytest.mark.parametrize("sync_every, num_steps", [(0, 5), (3, 0)])
def test_train_config_rejects_empty_schedules(sync_every, num_steps):
    """A zero read interval or an epoch of no steps would never read the metrics."""
    lr = np.full(4, 1e-3)
    with pytest.raises(ValueError, match="must be at least 1"):
        engine.TrainConfig(lr, lr, num_steps, sync_every=sync_every)
