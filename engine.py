"""PMAD's masked-token training epoch, and the per-patch loss that scoring reuses.

One step: draw the batch's masks in this process (combinational masking, method.md 5),
predict the visual tokens of the masked patches, take the cross-entropy (rank-weighted
once dynamic masking has started), step AdamW with the scheduled lr / weight decay, and
feed the per-patch losses back into the dynamic-masking statistics.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import utils
from masking_generator import MaskingPolicy


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient norm is NaN/inf; raised before the optimiser steps, so
    the weights and the last checkpoint stay as they were."""


def masked_token_ce(model: nn.Module, images: torch.Tensor, tokens: torch.Tensor,
                    masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of each masked patch's visual token, in `x[masks]` order.

    images (N, 3, H, W), tokens (N, L) long, masks (N, L) bool
    -> (ce (M,) float32, logits (M, V)); the CE is taken in float32 whatever autocast
    produced the logits.
    """
    logits = model(images, bool_masked_pos=masks)  # (M, V)
    labels = tokens[masks]  # (M,)
    ce = F.cross_entropy(logits.float(), labels, reduction="none")  # (M,)
    return ce, logits


def scatter_masked(values: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """values (M,) in `x[masks]` order -> (N, L), 0 at unmasked patches."""
    out = values.new_zeros(masks.shape)
    out[masks] = values
    return out


def patch_losses(model: nn.Module, images: torch.Tensor, tokens: torch.Tensor,
                 masks: torch.Tensor) -> torch.Tensor:
    """(N, L) float: each masked patch's token cross-entropy in place, 0 elsewhere.

    The PMAD anomaly score of a patch (method.md 7); the caller chooses no_grad/autocast.
    """
    ce, _ = masked_token_ce(model, images, tokens, masks)
    return scatter_masked(ce, masks)


def weighted_mean(values: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """sum(w * v) / sum(w): the rank weights (1 + q)^2 reshape the loss over a sample's
    masked patches without changing its scale (equal weights give the plain mean)."""
    if weights is None:
        return values.mean()
    weights = weights.to(values)
    return (values * weights).sum() / weights.sum()


@dataclass
class StepOutput:
    loss: float  # this rank's loss
    mlm_acc: float  # fraction of masked patches whose token is predicted exactly
    grad_norm: float  # before clipping
    patch_losses: torch.Tensor  # (N, L) detached, 0 at unmasked patches
    loss_scale: float | None  # fp16 only


def train_step(model: nn.Module, images: torch.Tensor, tokens: torch.Tensor,
               masks: torch.Tensor, optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler, *, loss_weights: torch.Tensor | None = None,
               clip_grad: float | None = None, amp: str = "none") -> StepOutput:
    """Forward, non-finite check, backward, clip, step.

    images (N, 3, H, W), tokens (N, L), masks (N, L) bool, loss_weights (M,) or None.
    The loss is summed over ranks before the check, so a NaN on any rank stops every
    rank at the same step (instead of the others hanging in the gradient all-reduce).
    Raises NonFiniteLossError before the optimiser is touched.
    """
    with utils.amp_autocast(images.device, amp):
        ce, logits = masked_token_ce(model, images, tokens, masks)  # (M,), (M, V)
    loss = weighted_mean(ce, loss_weights)
    total = utils.all_reduce_sum(loss.detach().float().reshape(1).clone())
    if not math.isfinite(total.item()):
        raise NonFiniteLossError(f"non-finite loss (this rank {loss.item()}, summed over "
                                 f"ranks {total.item()})")
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(
        params, clip_grad if clip_grad and clip_grad > 0 else math.inf)
    with torch.no_grad():
        acc = (logits.argmax(-1) == tokens[masks]).float().mean()
    # one device sync for the metrics and the gradient check
    loss_value, acc_value, norm_value = torch.stack(
        [loss.detach().float(), acc, grad_norm.float()]).tolist()
    if not scaler.is_enabled() and not math.isfinite(norm_value):
        # fp16's scaler skips such steps by design; without it the weights would be lost
        raise NonFiniteLossError(f"non-finite gradient norm {norm_value} with a finite "
                                 f"loss {loss_value}")
    scaler.step(optimizer)
    scaler.update()
    return StepOutput(loss=loss_value, mlm_acc=acc_value, grad_norm=norm_value,
                      patch_losses=scatter_masked(ce.detach(), masks),
                      loss_scale=scaler.get_scale() if scaler.is_enabled() else None)


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


def train_one_epoch(model: nn.Module, data_loader: Iterable[dict],
                    optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                    policy: MaskingPolicy, config: TrainConfig, *, epoch: int,
                    tokenizer: nn.Module | None = None,
                    sample_names: Sequence[str] | None = None,
                    log_writer: Any | None = None, progress: bool = True
                    ) -> dict[str, float]:
    """Train `config.num_steps` batches of `data_loader` on `policy.device`; returns the
    epoch's metrics averaged over steps and ranks (loss, mlm_acc, lr, weight_decay,
    grad_norm[, loss_scale]).

    Step i of the epoch uses lr_schedule[epoch * num_steps + i] (same for weight decay).
    The policy draws each batch's masks (and, once dynamic masking has started, the
    rank weights of its loss) and takes back the per-patch losses.
    """
    model.train()
    device = policy.device
    metrics = utils.MetricLogger()
    num_steps = config.num_steps
    bar = tqdm(total=num_steps, desc=f"epoch {epoch}", dynamic_ncols=True, leave=False,
               disable=not (progress and utils.is_main_process()))
    it = iter(data_loader)
    for step in range(num_steps):
        batch = next(it)
        global_step = epoch * num_steps + step
        lr = float(config.lr_schedule[global_step])
        wd = float(config.wd_schedule[global_step])
        utils.set_step_hyperparams(optimizer, lr, wd)

        images = batch["image"].to(device, non_blocking=True)  # (N, 3, H, W)
        tokens = _tokens_of(batch, tokenizer, device)  # (N, L)
        drawn = policy.draw(batch["class_idx"], batch.get("fg_mask"),
                            batch.get("freq_weights"), epoch)
        try:
            out = train_step(model, images, tokens, drawn.masks, optimizer, scaler,
                             loss_weights=drawn.loss_weights, clip_grad=config.clip_grad,
                             amp=config.amp)
        except NonFiniteLossError as e:
            where = f"at epoch {epoch}, step {step} (global step {global_step})"
            if sample_names is not None:
                where += "; this rank's samples: " + ", ".join(
                    sample_names[i] for i in batch["index"].tolist())
            raise NonFiniteLossError(f"{e} {where}") from None
        policy.observe(batch["class_idx"], drawn.masks, out.patch_losses)

        values = {"loss": out.loss, "mlm_acc": out.mlm_acc, "lr": lr, "weight_decay": wd,
                  "grad_norm": out.grad_norm, "loss_scale": out.loss_scale}
        metrics.update(**values)
        if log_writer is not None:
            for key, value in values.items():
                if value is not None:
                    log_writer.add_scalar(f"train/{key}", value, global_step)
        bar.set_postfix(metrics.postfix(), refresh=False)
        bar.update()
    bar.close()
    metrics.synchronize_between_processes(device)
    return metrics.summary()
