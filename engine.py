"""PMAD's masked-token training: the per-patch loss that scoring reuses, one step, one
epoch, and the run's epochs with their checkpoints (`fit`).

One step: the masking policy draws the batch's masks (combinational masking,
docs/method.md 5), the ViT predicts the visual tokens of the masked patches, the
cross-entropy (rank-weighted once dynamic masking has started) steps AdamW with the
scheduled lr / weight decay, and the per-patch losses go back to the policy.

A step never waits for the device: its metrics and its non-finite check stay there,
and the host reads them every `TrainConfig.sync_every` steps and at the epoch's end.
A failed step (non-finite loss, or gradient without fp16's loss scaler) makes that
step and every later one of the epoch skip the optimiser update on the device, on
every rank alike, and the next read raises NonFiniteLossError naming the first one.
"""
from __future__ import annotations

import inspect
import math
import os
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import utils
from masking_generator import MaskBatch, MaskingPolicy

# DDP's per-step buffer sync off (the one buffer, relative_position_index, is constant):
# newer torch names it forward_sync_buffers and warns on every rank at broadcast_buffers
NO_BUFFER_SYNC = ({"forward_sync_buffers": False} if "forward_sync_buffers"
                  in inspect.signature(nn.parallel.DistributedDataParallel).parameters
                  else {"broadcast_buffers": False})


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient norm is NaN/inf. The failed step and those after it
    left the weights as they were, and no checkpoint is written after it."""


def masked_tokens(tokens: torch.Tensor, masks: torch.Tensor,
                  index: torch.Tensor | None = None) -> torch.Tensor:
    """tokens (N, L) -> (M,) at the masked patches, in `x[masks]` order; `index` (M,)
    (MaskBatch.index) gives the same without counting the masks on the host."""
    return tokens[masks] if index is None else tokens.reshape(-1)[index]


def masked_token_ce(model: nn.Module, images: torch.Tensor, tokens: torch.Tensor,
                    masks: torch.Tensor, index: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of each masked patch's visual token, in `x[masks]` order.

    images (N, 3, H, W), tokens (N, L) long, masks (N, L) bool, index (M,) or None
    -> (ce (M,) float32, logits (M, V)); the CE is taken in float32 whatever autocast
    produced the logits.
    """
    logits = model(images, bool_masked_pos=masks, masked_index=index)  # (M, V)
    labels = masked_tokens(tokens, masks, index)  # (M,)
    ce = F.cross_entropy(logits.float(), labels, reduction="none")  # (M,)
    return ce, logits


def scatter_masked(values: torch.Tensor, masks: torch.Tensor,
                   index: torch.Tensor | None = None) -> torch.Tensor:
    """values (M,) in `x[masks]` order -> (N, L), 0 at unmasked patches."""
    out = values.new_zeros(masks.shape)
    if index is None:
        out[masks] = values
    else:
        out.view(-1).index_copy_(0, index, values)
    return out


def weighted_mean(values: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """sum(w * v) / sum(w): the rank weights (1 + q)^2 reshape the loss over a sample's
    masked patches without changing its scale (equal weights give the plain mean)."""
    if weights is None:
        return values.mean()
    weights = weights.to(values)
    return (values * weights).sum() / weights.sum()


@dataclass
class StepOutput:
    """One step's results, all on the device (reading one on the host waits for it)."""
    loss: torch.Tensor  # () this rank's loss
    loss_all_ranks: torch.Tensor  # () the loss summed over ranks
    mlm_acc: torch.Tensor  # () fraction of masked patches whose token is predicted exactly
    grad_norm: torch.Tensor  # () before clipping
    skipped: torch.Tensor  # () bool: fp16's loss scaler skipped the update (an overflow)
    patch_losses: torch.Tensor  # (N, L) detached, 0 at unmasked patches
    failed: torch.Tensor  # () bool: this step, or an earlier one it was told of, failed


def train_step(model: nn.Module, images: torch.Tensor, tokens: torch.Tensor,
               batch: MaskBatch, optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler, *, clip_grad: float | None = None,
               amp: str = "none", failed: torch.Tensor | None = None) -> StepOutput:
    """Forward, backward, clip, optimiser step, with no read of the device on the host.

    images (N, 3, H, W), tokens (N, L), batch from MaskingPolicy.draw. The step fails
    when the loss summed over ranks is not finite, or, without fp16's loss scaler
    (which skips such steps by design and lowers its scale), when the gradient norm is
    not finite; with `failed` (an earlier step failed) it fails too. A failed step
    leaves the weights and the optimiser as they were, identically on every rank
    (the loss is all-reduced, the gradients are DDP's), and the caller raises
    NonFiniteLossError when it next reads `failed`.
    """
    with utils.amp_autocast(images.device, amp):
        ce, logits = masked_token_ce(model, images, tokens, batch.masks, batch.index)
    loss = weighted_mean(ce, batch.loss_weights)
    total = utils.all_reduce_sum(loss.detach().float().reshape(1).clone())[0]
    fail = ~torch.isfinite(total)
    if failed is not None:
        fail = fail | failed
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    params = [p for group in optimizer.param_groups for p in group["params"]
              if p.grad is not None]
    _poison_grad_if(params, fail)  # every non-finite check below now skips the update
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(
        params, clip_grad if clip_grad and clip_grad > 0 else math.inf)
    # fp16's scaler skips a step whose gradient overflowed (its norm is then not finite)
    skipped = ~torch.isfinite(grad_norm) if scaler.is_enabled() \
        else torch.zeros((), dtype=torch.bool, device=grad_norm.device)
    if not scaler.is_enabled():
        fail = ~torch.isfinite(grad_norm)
    _step_unless(optimizer, scaler, fail)
    scaler.update()
    with torch.no_grad():
        acc = (logits.argmax(-1) == masked_tokens(tokens, batch.masks, batch.index)
               ).float().mean()
    return StepOutput(loss=loss.detach(), loss_all_ranks=total, mlm_acc=acc,
                      grad_norm=grad_norm.detach(), skipped=skipped,
                      patch_losses=scatter_masked(ce.detach(), batch.masks, batch.index),
                      failed=fail)


def _poison_grad_if(params: list[torch.Tensor], fail: torch.Tensor) -> None:
    """Make one gradient element NaN where `fail`, on the device: the loss scaler's and
    the gradient norm's non-finite checks then skip the update."""
    if params:
        first = params[0].grad.view(-1)[:1]
        first.copy_(torch.where(fail, torch.nan, first))


def _step_unless(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                 skip: torch.Tensor) -> None:
    """optimizer.step() unless `skip` (() bool on the device).

    Fused AdamW skips on the device, from a found_inf flag (the protocol GradScaler
    uses with it); fp16's scaler finds the poisoned gradient itself. An optimiser
    without a fused kernel makes this read `skip` on the host.
    """
    if scaler.is_enabled():
        scaler.step(optimizer)
    elif all(group.get("fused") for group in optimizer.param_groups):
        optimizer.found_inf = skip.float()
        optimizer.grad_scale = None
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf, optimizer.grad_scale
    elif not bool(skip):
        optimizer.step()


def _tokens_of(batch: dict, tokenizer: nn.Module | None, device: torch.device) -> torch.Tensor:
    """Cached tokens (L,) per sample, or the tokenizer on the token images when the
    dataset has no cache attached (benchmarks; run_pretraining always caches)."""
    if "tokens" in batch:
        return batch["tokens"].to(device, non_blocking=True)
    if tokenizer is None:
        raise ValueError("the batch holds token images but no tokenizer was given: call "
                         "datasets.cache_tokens(dataset, tokenizer, ...) first, or pass "
                         "tokenizer= to train_one_epoch")
    return tokenizer.get_codebook_indices(batch["token_image"].to(device, non_blocking=True))


@dataclass
class TrainConfig:
    """Settings shared by every step of a run."""
    lr_schedule: np.ndarray  # (epochs * num_steps,) per-step learning rate
    wd_schedule: np.ndarray  # (epochs * num_steps,) per-step weight decay
    num_steps: int  # steps per epoch
    clip_grad: float | None = None  # max gradient norm; None or <= 0: no clipping
    amp: str = "none"  # utils.AMP_CHOICES
    sync_every: int = 20  # steps between the host's reads of the metrics (and the stop)

    def __post_init__(self) -> None:
        if self.sync_every < 1 or self.num_steps < 1:
            raise ValueError(f"TrainConfig: sync_every ({self.sync_every}) and num_steps "
                             f"({self.num_steps}) must be at least 1")


# per-step metrics kept on the device until the next read
_COLUMNS = ("loss", "loss_all_ranks", "mlm_acc", "grad_norm", "loss_scale", "failed",
            "skipped")


def train_one_epoch(model: nn.Module, data_loader: Iterable[dict],
                    optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                    policy: MaskingPolicy, config: TrainConfig, *, epoch: int,
                    tokenizer: nn.Module | None = None,
                    sample_names: Sequence[str] | None = None,
                    log_writer: Any | None = None, progress: bool = True
                    ) -> dict[str, float]:
    """Train `config.num_steps` batches of `data_loader` on `policy.device`; returns the
    epoch's metrics averaged over steps and ranks (loss, mlm_acc, lr, weight_decay,
    grad_norm[, loss_scale]). grad_norm leaves out the steps fp16's loss scaler skipped
    (an overflow: no finite norm), and is absent when it skipped every step.

    Step i of the epoch uses lr_schedule[epoch * num_steps + i] (same for weight decay).
    The policy draws each batch's masks (and, once dynamic masking has started, the
    rank weights of its loss) and takes back the per-patch losses.
    """
    model.train()
    device, num_steps = policy.device, config.num_steps
    metrics = utils.MetricLogger()
    history = torch.zeros(num_steps, len(_COLUMNS), device=device)  # (steps, columns)
    failed = torch.zeros((), dtype=torch.bool, device=device)
    hyper: list[tuple[float, float]] = []  # (lr, weight decay) per step, host
    indices: list[list[int]] = []  # each step's sample indices on this rank, host
    # closed on an exception too: a bar left open would keep every later one in a log file
    # from being drawn (utils.progress)
    with utils.progress(total=num_steps, desc=f"epoch {epoch}", dynamic_ncols=True,
                        leave=False, disable=not (progress and utils.is_main_process())) as bar:
        it = iter(data_loader)
        for step in range(num_steps):
            batch = next(it)
            global_step = epoch * num_steps + step
            hyper.append((float(config.lr_schedule[global_step]),
                          float(config.wd_schedule[global_step])))
            utils.set_step_hyperparams(optimizer, *hyper[-1])
            indices.append(batch["index"].tolist() if "index" in batch else [])

            images = batch["image"].to(device, non_blocking=True)  # (N, 3, H, W)
            tokens = _tokens_of(batch, tokenizer, device)  # (N, L)
            drawn = policy.draw(batch["class_idx"], batch.get("fg_mask"),
                                batch.get("freq_weights"), epoch)
            out = train_step(model, images, tokens, drawn, optimizer, scaler,
                             clip_grad=config.clip_grad, amp=config.amp, failed=failed)
            policy.observe(batch["class_idx"], drawn.masks, out.patch_losses, valid=~out.failed)
            failed = out.failed
            scale = scaler._get_scale_async() if scaler.is_enabled() else None
            history[step] = torch.stack([
                out.loss.float(), out.loss_all_ranks, out.mlm_acc, out.grad_norm.float(),
                torch.full((), math.nan, device=device) if scale is None else scale.float(),
                failed.float(), out.skipped.float()])
            bar.update()
            if (step + 1) % config.sync_every == 0 or step + 1 == num_steps:
                first = step + 1 - (step % config.sync_every + 1)
                rows = _read_rows(history, first, step + 1)
                _log_rows(rows, first, hyper, metrics, log_writer, epoch * num_steps)
                _raise_if_failed(rows, first, epoch, num_steps, indices, sample_names)
                bar.set_postfix(metrics.postfix(), refresh=False)
    metrics.synchronize_between_processes(device)
    return metrics.summary()


def fit(model: nn.Module, data_loader: Iterable[dict], sampler: Any,
        optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, policy: MaskingPolicy,
        config: TrainConfig, *, start_epoch: int, epochs: int, output_dir: str,
        save_ckpt_freq: int, run_args: dict, log_dir: str | None = None,
        distributed: bool = False, sample_names: Sequence[str] | None = None
        ) -> tuple[dict[str, float], list[str]]:
    """The epochs [start_epoch, epochs) of a run, the model wrapped in DDP when
    `distributed` (its one buffer, relative_position_index, is constant). Each ends
    with checkpoint-last.pth (and checkpoint-<epoch>.pth every `save_ckpt_freq` epochs
    and at the last: weights, optimiser, scaler, masking policy and `run_args`), after a
    line of <output_dir>/log.txt. A non-finite loss stops the run and names the last good
    checkpoint. -> (the last epoch's metrics, the checkpoints it wrote).
    """
    unwrapped, device = model, policy.device
    if distributed:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            **NO_BUFFER_SYNC)
    n_parameters = sum(p.numel() for p in unwrapped.parameters() if p.requires_grad)
    utils.main_print(f"[model] {n_parameters / 1e6:.1f} M trainable parameters; "
                     f"{config.num_steps} steps/epoch on each of {utils.get_world_size()} "
                     f"process(es); amp {config.amp}; device {device}")
    log = utils.JsonlLog(os.path.join(output_dir, "log.txt"), start_epoch)
    log_writer = utils.make_tensorboard_writer(log_dir, purge_step=start_epoch * config.num_steps)
    stats: dict[str, float] = {}
    saved: list[str] = []
    try:
        for epoch in range(start_epoch, epochs):
            sampler.set_epoch(epoch)
            stats = train_one_epoch(model, data_loader, optimizer, scaler, policy, config,
                                    epoch=epoch, sample_names=sample_names,
                                    log_writer=log_writer)
            # the log line first: a process crash before the checkpoint is written makes
            # the resumed run redo this epoch, and JsonlLog drops its line then; the other
            # order would lose the line of an epoch saved just before a crash for good
            # (the line is not fsync'ed: a power loss may still take it)
            log.write({**{f"train_{k}": v for k, v in stats.items()}, "epoch": epoch,
                       "n_parameters": n_parameters})
            names: list[int | str] = ["last"]
            if (epoch + 1) % save_ckpt_freq == 0 or epoch + 1 == epochs:
                names.append(epoch)
            saved = utils.save_training_state(
                output_dir, names, epoch=epoch, model=unwrapped, optimizer=optimizer,
                scaler=scaler, args=run_args, masking=policy.state_dict())
            utils.main_print(f"[epoch {epoch}] " + ", ".join(  # saved[0]: the numbered file
                f"{k} {v:.4g}" for k, v in stats.items()) + f" -> {saved[0]}"
                + "".join(f" (also {os.path.basename(p)})" for p in saved[1:]))
    except NonFiniteLossError as e:
        raise NonFiniteLossError(f"{e}. {non_finite_advice(output_dir)}") from None
    finally:
        if log_writer is not None:
            log_writer.close()
    return stats, saved


def non_finite_advice(output_dir: str) -> str:
    """What to do after a non-finite loss. Each fix (--amp, --lr, the images) changes a
    flag or the data that a resume must keep (run_pretraining.RESUME_MUST_MATCH,
    check_same_data), so it is a new run from the last good weights, not a resume; the
    same command again would resume the same steps."""
    last = utils.find_latest_checkpoint(output_dir)
    fixes = ("--amp bf16 or none instead of fp16, a lower --lr, the named images left out "
             "or replaced")
    if last is None:
        return (f"No checkpoint was written in {output_dir} yet. Fix the cause ({fixes}) "
                "and re-run")
    return (f"No checkpoint was written after it; the last good checkpoint is {last}. "
            f"Fix the cause ({fixes}) in a new run from its weights, as a resume refuses "
            f"each change: --init_ckpt {last} with another --output_dir")


def _read_rows(history: torch.Tensor, start: int, stop: int) -> list[dict[str, float]]:
    """The host's one read of the device per `sync_every` steps: rows [start, stop)."""
    return [dict(zip(_COLUMNS, row)) for row in history[start:stop].tolist()]


def _log_rows(rows: list[dict[str, float]], first: int, hyper: list[tuple[float, float]],
              metrics: utils.MetricLogger, log_writer: Any | None, step0: int) -> None:
    """Each read row into the epoch's averages and TensorBoard; a step the loss scaler
    skipped has no grad_norm (its inf/NaN would make the epoch's average NaN, and log.txt
    invalid JSON). The skip is the same on every rank (DDP's gradients are all-reduced),
    so the ranks keep the same meters."""
    for i, row in enumerate(rows, start=first):
        lr, wd = hyper[i]
        values = {"loss": row["loss"], "mlm_acc": row["mlm_acc"], "lr": lr,
                  "weight_decay": wd,
                  "grad_norm": None if row["skipped"] else row["grad_norm"],
                  "loss_scale": None if math.isnan(row["loss_scale"]) else row["loss_scale"]}
        metrics.update(**values)
        if log_writer is not None:
            for key, value in values.items():
                if value is not None:
                    log_writer.add_scalar(f"train/{key}", value, step0 + i)


def _raise_if_failed(rows: list[dict[str, float]], first: int, epoch: int, num_steps: int,
                     indices: list[list[int]], sample_names: Sequence[str] | None) -> None:
    """NonFiniteLossError naming the first failed step of `rows`, if any (every rank
    reads the same flags at the same step, so all raise together)."""
    bad = [i for i, row in enumerate(rows, start=first) if row["failed"]]
    if not bad:
        return
    step, row = bad[0], rows[bad[0] - first]
    if math.isfinite(row["loss_all_ranks"]):
        what = (f"non-finite gradient norm {row['grad_norm']} with a finite loss "
                f"{row['loss']}")
    else:
        what = (f"non-finite loss (this rank {row['loss']}, summed over ranks "
                f"{row['loss_all_ranks']})")
    where = f"at epoch {epoch}, step {step} (global step {epoch * num_steps + step})"
    if sample_names is not None and indices[step]:
        where += "; this rank's samples: " + ", ".join(sample_names[i] for i in indices[step])
    raise NonFiniteLossError(f"{what} {where}; the weights are those before this step")
