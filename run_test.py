"""Evaluate PMAD on MVTec-format test sets, under the paper's protocol or a leak-free one.

Per class, one pass computes every image's visual tokens and ProtoFlow maps; only the
ViT runs again for each mask ratio. The ``clean`` protocol (default) reads no test
label before all scores exist; the ``paper`` protocol reproduces the published numbers,
which choose ProtoFlow's threshold and the mask ratio with the test labels.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from tqdm import tqdm

import datasets
import heatmaps
import metrics
import modeling_pmad
from engine import patch_losses
from masking_generator import CLASS_MASK_RATIOS
from modeling_discrete_vae import create_tokenizer, file_sha256
from protoflow import (Proposals, ProtoFlow, covering_masks, image_score, is_anomalous,
                       proposals_from_log_likelihood)
from utils import (FlagError, MissingFileError, amp_autocast, cli, int_at_least, mask_ratio_arg,
                   prepare_output_dir, read_weights_file, resolve_amp)

PAPER_RATIOS = tuple(round(0.02 * i, 2) for i in range(1, 25))  # 0.02 ... 0.48
METRIC_KEYS = metrics.METRIC_NAMES
BASELINES = {"protoflow_only": "ProtoFlow map alone", "patchcore": "PatchCore",
             "ce_only": "ViT cross-entropy alone"}
CLEAN_MASKS = ("proposal", "threshold")
UNMASKED = ("cover", "zero")
ABNORMALITY = ("log", "paper")
COMBINE = ("weighted", "product")
IMAGE_SCORES = ("max", "topk")


@dataclass(frozen=True)
class CleanOptions:
    """The clean protocol's label-free choices (run_test.py --clean_masks, --unmasked,
    --abnormality, --combine, --image_score); see evaluate_clean. The paper's choices
    are 'threshold', 'zero', 'paper', 'product', 'max'."""
    masks: str = "proposal"
    unmasked: str = "cover"
    abnormality: str = "log"
    combine: str = "weighted"
    image_score: str = "max"

    def as_dict(self) -> dict[str, str]:
        return {"masks": self.masks, "unmasked": self.unmasked,
                "abnormality": self.abnormality, "combine": self.combine,
                "image_score": self.image_score}


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """scipy.ndimage.gaussian_filter(mode='reflect', truncate=4) on a batch, in torch."""
    if sigma <= 0:
        return maps
    radius = int(4.0 * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(maps.dtype)
    out = maps.unsqueeze(1)  # (N, 1, H, W)
    for dim in (2, 3):
        size = out.shape[dim]
        # scipy's 'reflect' repeats the edge sample (d c b a | a b c d | d c b a)
        idx = torch.arange(-radius, size + radius)
        idx = torch.where(idx < 0, -idx - 1, idx)
        idx = torch.where(idx >= size, 2 * size - idx - 1, idx)
        out = out.index_select(dim, idx.clamp(0, size - 1))
        shape = (1, 1, -1, 1) if dim == 2 else (1, 1, 1, -1)
        out = F.conv2d(out, kernel.view(shape))
    return out.squeeze(1)


@dataclass
class ClassData:
    """Everything a class's evaluation needs that does not depend on the mask ratio. The
    labels, masks and defect types are read only for metrics; unlabelled images
    (predict.py) have none."""
    images: torch.Tensor          # (N, 3, S, S) normalised
    tokens: torch.Tensor          # (N, L) visual token ids
    log_likelihood: torch.Tensor  # (N, h, w) ProtoFlow
    prototype_distance: torch.Tensor  # (N, h, w) nearest-prototype L2 (PatchCore)
    labels: np.ndarray | None     # (N,) 0 normal / 1 anomalous
    gt_masks: torch.Tensor | None  # (N, S, S) {0, 1}
    names: list[str] = field(default_factory=list)
    defect_types: list[str] = field(default_factory=list)
    image_ids: list[str] = field(default_factory=list)  # SHA-256 of each image file


@torch.inference_mode()
def collect_class(dataset: torch.utils.data.Dataset, tokenizer: torch.nn.Module,
                  protoflow: ProtoFlow, class_name: str, batch_size: int,
                  device: torch.device, num_workers: int = 0) -> ClassData:
    """One pass over a class: tokens, ProtoFlow log-likelihoods and prototype distances,
    computed once, and each image file's SHA-256 (it seeds the image's random test
    mask). `dataset` yields 'image', 'token_image', 'name', 'index' and, for a labelled
    test set, 'label', 'gt_mask', 'defect_type'; its `image_paths` are the files. A set
    whose `has_ground_truth` is False (a custom set) keeps no masks."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                         num_workers=num_workers)
    images, tokens, logps, dists, labels, gts, names, defects, ids = ([] for _ in range(9))
    for batch in tqdm(loader, desc=f"{class_name}: tokens + ProtoFlow", leave=False):
        x = batch["image"].to(device)
        tokens.append(tokenizer.get_codebook_indices(batch["token_image"].to(device)).cpu())
        logp, dist = protoflow.scores(x, class_name)
        logps.append(logp.float())
        dists.append(dist.float())
        images.append(batch["image"])
        names += list(batch["name"])
        ids += [file_sha256(dataset.image_paths[int(i)]) for i in batch["index"]]
        if "label" in batch:
            labels.append(batch["label"])
            defects += list(batch["defect_type"])
            if getattr(dataset, "has_ground_truth", True):
                gts.append(batch["gt_mask"][:, 0])
    return ClassData(torch.cat(images), torch.cat(tokens), torch.cat(logps), torch.cat(dists),
                     torch.cat(labels).numpy().astype(np.int64) if labels else None,
                     torch.cat(gts) if gts else None, names, defects, ids)


def mask_seeds(image_ids: list[str], seed: int) -> list[int]:
    """One seed per image for its random test mask: a hash of the image file's SHA-256
    and --seed, so an image gets the same mask in run_test.py and predict.py, in any
    batch and any set."""
    return [int.from_bytes(hashlib.sha256(f"{seed}:{i}".encode()).digest()[:8], "little")
            >> 1 for i in image_ids]


# ----------------------------------------------------------------------------- scores
@torch.inference_mode()
def masked_token_scores(model: torch.nn.Module, data: ClassData, masks: torch.Tensor,
                        batch_size: int, device: torch.device, amp: str) -> torch.Tensor:
    """PMAD's masked-token score (method.md 7): each masked patch's token cross-entropy,
    0 at visible patches. masks (N, L) bool -> (N, L) float32 on the CPU."""
    out = []
    for i in tqdm(range(0, len(data.images), batch_size), desc="ViT", leave=False):
        x = data.images[i:i + batch_size].to(device)
        with amp_autocast(device, amp):
            ce = patch_losses(model, x, data.tokens[i:i + batch_size].to(device),
                              masks[i:i + batch_size].to(device))
        out.append(ce.float().cpu())
    return torch.cat(out)


def covered_token_scores(model: torch.nn.Module, data: ClassData, passes: list[torch.Tensor],
                         batch_size: int, device: torch.device, amp: str) -> torch.Tensor:
    """Masked-token scores of every patch: the passes (disjoint (N, L) masks covering
    the grid) are scored one after the other and their scores added. -> (N, L)."""
    return sum(masked_token_scores(model, data, m, batch_size, device, amp) for m in passes)


def upsample(patch_scores: torch.Tensor, grid: tuple[int, int], size: int) -> torch.Tensor:
    """(N, h * w) or (N, h, w) patch scores -> (N, S, S), bilinear with aligned corners
    (method.md 6-7: every map of the method is resized this way)."""
    x = patch_scores.float().reshape(-1, 1, *grid)
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=True)[:, 0]


def pmad_maps(token_scores: torch.Tensor, abnormality: torch.Tensor, grid: tuple[int, int],
              sigma: float, combine: str = "product", vocab_size: int | None = None
              ) -> torch.Tensor:
    """PMAD's score map: masked-token scores (N, L), upsampled, and ProtoFlow's
    abnormality map (N, S, S), combined, then Gaussian-smoothed. -> (N, S, S).

    'product' (the paper, docs/method.md 7): CE x abnormality. 'weighted': abnormality x
    (1 + CE / ln V), ProtoFlow's map raised where the ViT finds the token surprising (CE
    = ln V is as surprising as a uniform guess over the V tokens). A patch the ViT
    predicts well keeps ProtoFlow's score instead of dropping to ~0, so a ViT that
    has learned little cannot drown ProtoFlow's evidence in its noise.
    """
    ce = upsample(token_scores, grid, abnormality.shape[-1])  # (N, S, S)
    if combine == "product":
        return gaussian_blur(ce * abnormality, sigma)
    if combine == "weighted":
        if vocab_size is None or vocab_size < 2:
            raise ValueError(f"combine='weighted' needs the vocabulary size, got {vocab_size}")
        return gaussian_blur(abnormality * (1 + ce / math.log(vocab_size)), sigma)
    raise ValueError(f"unknown combination {combine!r}; choose from {COMBINE}")


def image_scores(maps: torch.Tensor, how: str = "max") -> torch.Tensor:
    """(N, S, S) -> (N,): the map's maximum (the paper), or the mean of its top 1 %
    of pixels ('topk': less swayed by one bright spot)."""
    flat = maps.flatten(1)
    if how == "max":
        return flat.amax(dim=1)
    if how == "topk":
        return flat.topk(max(1, flat.shape[1] // 100), dim=1).values.mean(dim=1)
    raise ValueError(f"unknown image score {how!r}; choose from {IMAGE_SCORES}")


def evaluate_maps(data: ClassData, maps: torch.Tensor, pixel_maps: torch.Tensor | None = None,
                  scores: torch.Tensor | None = None) -> dict[str, float]:
    """The field's metric set for one class (image score: the map's maximum unless given),
    plus the per-defect-type breakdown."""
    scores = maps.flatten(1).amax(dim=1) if scores is None else scores
    pixel = maps if pixel_maps is None else pixel_maps
    gt = None if data.gt_masks is None else data.gt_masks.numpy()
    record = metrics.compute_metrics(data.labels, scores.numpy(), gt, pixel.numpy())
    record["per_defect"] = metrics.per_defect_metrics(data.labels, data.defect_types,
                                                      scores.numpy(), gt, pixel.numpy())
    return record


def baseline_maps(data: ClassData, abnormality: torch.Tensor, token_scores: torch.Tensor | None,
                  grid: tuple[int, int], sigma: float) -> dict[str, torch.Tensor]:
    """The maps every table scores beside PMAD's, from what the class's pass computed:
    ProtoFlow's abnormality map alone (the one PMAD's map uses, (N, S, S)), PatchCore
    (each patch's distance to its nearest prototype: the prototypes are a PatchCore
    memory bank) and, given the covering passes' token scores, the ViT's cross-entropy
    alone. Each is upsampled and smoothed as PMAD's map is; image score = the map's
    maximum."""
    size = data.images.shape[-1]
    maps = {"protoflow_only": gaussian_blur(abnormality, sigma),
            "patchcore": gaussian_blur(upsample(data.prototype_distance,
                                                tuple(data.prototype_distance.shape[1:]),
                                                size), sigma)}
    if token_scores is not None:
        maps["ce_only"] = gaussian_blur(upsample(token_scores, grid, size), sigma)
    return maps


def mask_diagnostics(data: ClassData, masks: torch.Tensor, anomalous: torch.Tensor,
                     grid: tuple[int, int]) -> dict[str, float | int]:
    """Why a PMAD map can miss a defect: how many anomalous images got the proposal mask,
    and what fraction of their defect pixels lay in masked patches (scored with the
    defect hidden from the context; nan without ground-truth masks)."""
    size = data.images.shape[-1]
    bad = torch.as_tensor(data.labels == 1)
    fraction = math.nan
    if data.gt_masks is not None:
        per_patch = F.adaptive_avg_pool2d(data.gt_masks[:, None].float(), grid).flatten(1)  # (N, L)
        total = per_patch[bad].sum()
        covered = (per_patch * masks.float())[bad].sum()
        fraction = float(covered / total) if total > 0 else math.nan
    return {"anomalous_with_proposal": int((anomalous & bad).sum()),
            "anomalous_images": int(bad.sum()),
            "masked_defect_fraction": fraction,
            "pixels_per_patch": (size // grid[0]) * (size // grid[1])}


# ----------------------------------------------------------------------------- protocols
@dataclass
class CleanScores:
    """The clean protocol's label-free scores of one set of a class's images."""
    maps: torch.Tensor              # (N, S, S) PMAD's score maps
    image_scores: torch.Tensor      # (N,) PMAD's image scores
    protoflow_scores: torch.Tensor  # (N,) ProtoFlow's image scores (set-independent)
    anomalous: torch.Tensor | None  # (N,) bool ProtoFlow's call at the threshold, if any
    proposal: torch.Tensor          # (N,) bool: the image got ProtoFlow's proposal mask
    test_masks: torch.Tensor        # (N, L) bool the first (test) mask of each image
    baseline_maps: dict[str, torch.Tensor]  # name -> (N, S, S), see baseline_maps


def clean_scores(model: torch.nn.Module, data: ClassData, *, ratio: float,
                 threshold: float | None, options: CleanOptions, sigma: float,
                 batch_size: int, device: torch.device, amp: str, seed: int) -> CleanScores:
    """Every score of the clean protocol, from images alone (no label is read): the one
    computation behind run_test.py's clean protocol and predict.py.

    ProtoFlow's abnormality map is normalised over the whole set given (docs/method.md
    6), so a set's scores equal run_test.py's when it is the class's test set. Masks:
    ProtoFlow's proposal for every image ('proposal'), or for those its stored
    normal-data threshold calls anomalous ('threshold': the others get random masks,
    each seeded from the image file's bytes, `mask_seeds`). Visible patches score 0
    ('zero', as the paper) or are scored too, each in the covering pass that masks it
    ('cover'). Image score: options.image_score.
    """
    grid = tuple(model.patch_embed.grid_size)
    proposals = proposals_from_log_likelihood(data.log_likelihood, [ratio],
                                              image_size=data.images.shape[-1], grid=grid)
    anomalous = (is_anomalous(proposals.image_scores, threshold).cpu()
                 if threshold is not None else None)
    call = anomalous if options.masks == "threshold" else None
    seeds = mask_seeds(data.image_ids, seed) if call is not None else None
    ranks = proposals.test_ranks(call, seeds)
    passes = covering_masks(ranks, ratio)
    if options.unmasked == "zero":
        passes = passes[:1]
    token_scores = covered_token_scores(model, data, passes, batch_size, device, amp)
    abnormality = (proposals.abnormality_maps if options.abnormality == "paper"
                   else proposals.log_abnormality_maps).float().cpu()
    maps = pmad_maps(token_scores, abnormality, grid, sigma, options.combine,
                     model.lm_head.out_features)
    proposal = torch.ones(len(maps), dtype=torch.bool) if call is None else call
    return CleanScores(maps, image_scores(maps, options.image_score),
                       proposals.image_scores.float().cpu(), anomalous, proposal, passes[0],
                       baseline_maps(data, abnormality,
                                     token_scores if options.unmasked == "cover" else None,
                                     grid, sigma))


def evaluate_clean(model: torch.nn.Module, data: ClassData, *, ratio: float,
                   threshold: float | None, options: CleanOptions, sigma: float,
                   batch_size: int, device: torch.device, amp: str, seed: int
                   ) -> tuple[dict, dict[str, torch.Tensor]]:
    """The clean protocol: `clean_scores` (no test label is read before every score
    exists), then the metrics of PMAD and of each baseline."""
    scores = clean_scores(model, data, ratio=ratio, threshold=threshold, options=options,
                          sigma=sigma, batch_size=batch_size, device=device, amp=amp,
                          seed=seed)
    record = evaluate_maps(data, scores.maps, scores=scores.image_scores)
    record.update({name: evaluate_maps(data, m) for name, m in scores.baseline_maps.items()})
    record.update(mask_ratio=ratio,
                  threshold=threshold if options.masks == "threshold" else None,
                  called_anomalous=int(scores.proposal.sum()),
                  clean_options=options.as_dict(),
                  diagnostics=mask_diagnostics(data, scores.test_masks, scores.proposal,
                                               tuple(model.patch_embed.grid_size)))
    return record, {"pmad": scores.maps, **scores.baseline_maps}


def sweep_mask_ratios(model: torch.nn.Module, data: ClassData, proposals: Proposals,
                      anomalous: torch.Tensor, ratios: tuple[float, ...], *, sigma: float,
                      batch_size: int, device: torch.device, amp: str, seed: int
                      ) -> tuple[dict[float, dict], dict[float, torch.Tensor]]:
    """PMAD's metrics at every mask ratio from one set of tokens and ProtoFlow maps: only
    the ViT runs again per ratio. Pixel metrics on maps smoothed a second time, as the
    original does. Images called normal get random masks, each in its own order (seeded
    from the image file, `mask_seeds`) at every ratio. -> per-ratio records and maps."""
    grid = tuple(model.patch_embed.grid_size)
    abnormality = proposals.abnormality_maps.float().cpu()
    seeds = mask_seeds(data.image_ids, seed)
    per_ratio, maps = {}, {}
    for r in ratios:
        masks = proposals.test_masks(r, anomalous, seeds)
        scores = masked_token_scores(model, data, masks, batch_size, device, amp)
        maps[r] = pmad_maps(scores, abnormality, grid, sigma)
        per_ratio[r] = evaluate_maps(data, maps[r], gaussian_blur(maps[r], sigma))
    return per_ratio, maps


def evaluate_paper(model: torch.nn.Module, data: ClassData, *, sigma: float, batch_size: int,
                   device: torch.device, amp: str, seed: int
                   ) -> tuple[dict, dict[str, torch.Tensor]]:
    """The paper protocol (method.md 7), which reads the test labels twice: ProtoFlow's
    call at the F1-optimal threshold of the test scores, and the best of 24 mask ratios
    per metric. It reproduces the published numbers; it is not a deployable score."""
    grid = tuple(model.patch_embed.grid_size)
    proposals = proposals_from_log_likelihood(data.log_likelihood, list(PAPER_RATIOS),
                                              image_size=data.images.shape[-1], grid=grid)
    threshold = metrics.f1_optimal_threshold(data.labels, proposals.image_scores.numpy())
    anomalous = is_anomalous(proposals.image_scores, threshold).cpu()
    per_ratio, maps = sweep_mask_ratios(model, data, proposals, anomalous, PAPER_RATIOS,
                                        sigma=sigma, batch_size=batch_size, device=device,
                                        amp=amp, seed=seed)
    record = {"per_ratio": {f"{r:.2f}": {k: v for k, v in rec.items() if k != "per_defect"}
                            for r, rec in per_ratio.items()}}
    for key in METRIC_KEYS:
        best = _best_ratio(per_ratio, key)
        record[key] = per_ratio[best][key]
        record[f"{key}_ratio"] = best
    best = record["image_auroc_ratio"]
    record.update(mask_ratio=best, per_defect=per_ratio[best]["per_defect"],
                  threshold=float(threshold), called_anomalous=int(anomalous.sum()),
                  diagnostics=mask_diagnostics(data, proposals.test_masks(
                      best, anomalous, mask_seeds(data.image_ids, seed)), anomalous, grid))
    base_maps = baseline_maps(data, proposals.abnormality_maps.float().cpu(), None, grid,
                              sigma)
    record.update({name: evaluate_maps(data, m) for name, m in base_maps.items()})
    return record, {"pmad": maps[best], **base_maps}


def _best_ratio(per_ratio: dict[float, dict], key: str) -> float:
    """The ratio with the highest value of `key` (first on ties; NaN never wins)."""
    return max(per_ratio, key=lambda r: -math.inf if math.isnan(per_ratio[r][key])
               else per_ratio[r][key])


def resolve_weights_file(path: str, pattern: str = "*.pt") -> str:
    """A file, or a folder holding exactly one file matching `pattern`."""
    p = Path(path)
    if p.is_file():
        return str(p)
    if not p.is_dir():
        raise MissingFileError(f"{p} does not exist: see weights/README.md")
    found = sorted(p.glob(pattern))
    if len(found) != 1:
        raise MissingFileError(f"{p} holds {len(found)} files matching {pattern} "
                                f"({[f.name for f in found]}): name one with "
                                "--protoflow_weights")
    return str(found[0])


def _methods(results: dict) -> list[tuple[str, str]]:
    """(key, label) of PMAD and of every baseline present in the results."""
    first = next(iter(results["classes"].values()))
    return [("pmad", "**PMAD**")] + [(k, label) for k, label in BASELINES.items() if k in first]


def summarize(results: dict) -> None:
    """Means over classes of PMAD and each baseline, and per defect type."""
    classes = results["classes"]
    results["mean"] = metrics.mean_metrics(classes)
    for key, _ in _methods(results)[1:]:
        results[f"mean_{key}"] = metrics.mean_metrics({c: r[key] for c, r in classes.items()})
    per_defect: dict[str, dict[str, dict[str, float]]] = {}
    for key, _ in _methods(results):
        values: dict[str, dict[str, list[float]]] = {}
        for r in classes.values():
            for t, m in (r if key == "pmad" else r[key])["per_defect"].items():
                for metric in ("image_auroc", "pixel_auroc"):
                    values.setdefault(t, {}).setdefault(metric, []).append(m[metric])
        per_defect[key] = {t: {k: float(np.mean(v)) for k, v in ms.items()}
                           for t, ms in values.items()}
    results["per_defect_mean"] = per_defect


def format_table(results: dict, protocol: str) -> str:
    """Markdown: PMAD per class shaped like the paper's table, the baselines' means in
    the same table, then the per-defect-type view and the mask diagnostics."""
    head = ("| Category | Image/Pixel AUC | Pixel AUPRO | Image AP | Pixel AP | "
            "Image F1-max | Pixel F1-max | Mask ratio |\n|:--|" + ":--:|" * 7)
    rows = [f"Protocol: **{protocol}**"
            + (f" ({', '.join(f'{k} {v}' for k, v in results['clean_options'].items())})"
               if results.get("clean_options") else ""), "", head]

    def row(name: str, r: dict) -> str:
        ratio = r.get("mask_ratio")
        return (f"| {name} | {r['image_auroc']:.3f}/{r['pixel_auroc']:.3f} | "
                f"{r['pixel_aupro']:.3f} | {r['image_ap']:.3f} | {r['pixel_ap']:.3f} | "
                f"{r['image_f1_max']:.3f} | {r['pixel_f1_max']:.3f} | "
                f"{'' if ratio is None else f'{ratio:.2f}'} |")

    for name, r in results["classes"].items():
        rows.append(row(name.replace("_", " ").capitalize(), r))
    rows.append(row("**Mean (PMAD)**", results["mean"]))
    for key, label in _methods(results)[1:]:
        rows.append(row(f"*{label} (mean)*", results[f"mean_{key}"]))
    methods = _methods(results)
    types = sorted({t for per in results["per_defect_mean"].values() for t in per})
    rows += ["", "Image/pixel AUROC per defect type (mean over the classes that have it):",
             "", "| Defect type | " + " | ".join(label for _, label in methods) + " |",
             "|:--|" + ":--:|" * len(methods)]
    for t in types:
        cells = []
        for key, _ in methods:
            m = results["per_defect_mean"][key].get(t)
            cells.append("" if m is None else f"{m['image_auroc']:.3f}/{m['pixel_auroc']:.3f}")
        rows.append(f"| {t} | " + " | ".join(cells) + " |")
    rows += ["", "| Category | anomalous images given the proposal mask | defect pixels "
                 "masked |", "|:--|:--:|:--:|"]
    for name, r in results["classes"].items():
        d = r["diagnostics"]
        rows.append(f"| {name} | {d['anomalous_with_proposal']}/{d['anomalous_images']} | "
                    f"{d['masked_defect_fraction']:.2f} |")
    return "\n".join(rows)


def write_results(results: dict, output_dir: Path, protocol: str) -> str:
    output_dir.mkdir(parents=True, exist_ok=True)
    table = format_table(results, protocol)
    (output_dir / "results.json").write_text(json.dumps(results, indent=2, default=float))
    (output_dir / "results.md").write_text(table + "\n")
    with open(output_dir / "results.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["protocol", "class", "method", *METRIC_KEYS, "mask_ratio"])
        for key, _ in _methods(results):
            for name, r in results["classes"].items():
                m = r if key == "pmad" else r[key]
                writer.writerow([protocol, name, key, *(m[k] for k in METRIC_KEYS),
                                 r.get("mask_ratio", "") if key == "pmad" else ""])
            mean = results["mean" if key == "pmad" else f"mean_{key}"]
            writer.writerow([protocol, "mean", key, *(mean[k] for k in METRIC_KEYS), ""])
    return table


def save_heatmaps(data: ClassData, maps: torch.Tensor, scores: torch.Tensor,
                  threshold: float | None, out_dir: Path, count: int,
                  mean: tuple[float, ...], std: tuple[float, ...]) -> None:
    """--save_heatmaps N: the N most and the N least anomalous images (PMAD's image score
    `scores`, (N,)) of each defect type and of the normal images, each as image | ground
    truth | overlay with a colour bar on one scale per class, captioned with its scores,
    ProtoFlow's `threshold` and the decision (heatmaps.py)."""
    scale = heatmaps.ColourScale.of(maps)
    protoflow_scores = image_score(data.log_likelihood)
    for i, note in heatmaps.extremes_per_type(scores.tolist(), data.defect_types, count):
        caption = heatmaps.Caption(data.names[i], float(scores[i]), float(protoflow_scores[i]),
                                   threshold, truth=data.defect_types[i], note=note)
        gt = None if data.gt_masks is None else data.gt_masks[i].numpy()
        heatmaps.save_png(heatmaps.render(heatmaps.to_uint8_image(data.images[i], mean, std),
                                          maps[i].numpy(), scale, caption, gt),
                          out_dir / f"{data.names[i]}.png")


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The flags naming the PMAD checkpoint, tokenizer and ProtoFlow files (run_test.py,
    predict.py)."""
    p.add_argument("--ckpt", default="weights/vit_base_16_checkpoint_962_955.pth",
                   help="PMAD checkpoint (run_pretraining.py output or a released file)")
    # Default None: taken from the checkpoint's training arguments, else the paper's
    # (modeling_pmad.PAPER_EVAL_CONFIG); a flag given explicitly wins.
    p.add_argument("--model", default=None, choices=sorted(modeling_pmad.PMAD_MODELS))
    p.add_argument("--input_size", type=int, default=None)
    p.add_argument("--layer_scale_init_value", type=float, default=None)
    p.add_argument("--imagenet_default_mean_and_std", action=argparse.BooleanOptionalAction,
                   default=None)
    p.add_argument("--tokenizer_model", default=None)
    p.add_argument("--tokenizer_weight_path", default="weights/tokenizer")
    p.add_argument("--protoflow_weights", default="weights/protoflow",
                   help="a ProtoFlow file, or a folder holding exactly one .pt file")
    p.add_argument("--prototypes_dir", default="weights/prototypes")
    p.add_argument("--encoder_weights", default=None,
                   help="local backbone weights for a ProtoFlow file without an encoder")


def add_clean_args(p: argparse.ArgumentParser) -> None:
    """The clean protocol's label-free choices and the run's settings (run_test.py,
    predict.py)."""
    p.add_argument("--clean_masks", default=CleanOptions.masks, choices=CLEAN_MASKS,
                   help="clean protocol: ProtoFlow's proposal mask for every image, or only "
                        "for images above the class's threshold from held-out normal images "
                        "stored in the ProtoFlow file (the others: random masks, each seeded "
                        "from the image file)")
    p.add_argument("--unmasked", default=CleanOptions.unmasked, choices=UNMASKED,
                   help="clean protocol: score every patch, each in the covering pass that "
                        "masks it, or leave visible patches at 0 (the paper)")
    p.add_argument("--abnormality", default=CleanOptions.abnormality, choices=ABNORMALITY,
                   help="clean protocol: ProtoFlow's abnormality map in log units, "
                        "max(logp) - logp, or the paper's 1 - exp(logp - max(logp)), which "
                        "saturates at 1 on clearly anomalous patches")
    p.add_argument("--combine", default=CleanOptions.combine, choices=COMBINE,
                   help="clean protocol: abnormality x (1 + CE / ln V), or the paper's "
                        "CE x abnormality")
    p.add_argument("--image_score", default=CleanOptions.image_score, choices=IMAGE_SCORES,
                   help="clean protocol: the score map's maximum (the paper) or the mean of "
                        "its top 1%% of pixels")
    p.add_argument("--mask_ratio", type=mask_ratio_arg, default=None,
                   help="clean protocol: one ratio for every class (default: the "
                        "per-class ratios of the paper's Table 6, 0.3 for other classes)")
    p.add_argument("--default_mask_ratio", type=mask_ratio_arg, default=0.3)
    p.add_argument("--sigma", type=float, default=4.0)
    p.add_argument("--batch_size", type=int_at_least(1), default=32)
    p.add_argument("--num_workers", type=int_at_least(0), default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", default=None, choices=["bf16", "fp16", "none"],
                   help="autocast for the ViT (default: bf16 where supported)")
    p.add_argument("--skip_bad_images", action="store_true",
                   help="list unreadable images and leave them out (default: stop and name "
                        "the file)")
    p.add_argument("--seed", type=int, default=0,
                   help="mixed into each image's random-mask seed (--clean_masks threshold, "
                        "the paper protocol)")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("PMAD evaluation", add_help=True)
    add_model_args(p)
    p.add_argument("--data_path", default="data/mvtec_anomaly_detection",
                   help="a folder in MVTec layout (MVTec AD, BTAD, MPDD, the demo set)")
    p.add_argument("--setting", default=None,
                   choices=["multi_class", "obj2tex", "tex2obj", "leave_one_out"])
    p.add_argument("--unseen_classes", nargs="*", default=None)
    p.add_argument("--from_obj_to_texture", action="store_true",
                   help="the original's switch: same as --setting obj2tex")
    p.add_argument("--classes", nargs="*", default=None, help="evaluate exactly these")
    p.add_argument("--protocol", default="clean", choices=["clean", "paper"])
    add_clean_args(p)
    p.add_argument("--output_dir", default="output_dir/test")
    p.add_argument("--save_heatmaps", type=int_at_least(0), default=0, metavar="N",
                   help="per class, write heatmap PNGs of the N most and the N least "
                        "anomalous images of each defect type (and of the normal images)")
    p.add_argument("--resume_eval", action="store_true",
                   help="skip the classes already in <output_dir>/results.partial.jsonl "
                        "(written as each class finishes) from an earlier, stopped run")
    return p


def select_classes(args: argparse.Namespace, setting: str) -> list[str]:
    """The classes to evaluate, checked against the data (layout, masks) before any work."""
    root = args.data_path
    available = datasets.find_test_classes(root)
    if args.classes:
        unknown = sorted(set(args.classes) - set(available))
        if unknown:
            raise FlagError(f"--classes: {unknown} have no {root}/<class>/test folder; "
                            f"available: {available}")
        classes = list(args.classes)
    else:
        classes = datasets.setting_classes(setting, args.unseen_classes,
                                           available=available)[1]
    datasets.check_test_classes(root, classes, args.skip_bad_images)
    return classes


@dataclass
class Models:
    """What scoring a class needs, built from run_test.py's / predict.py's flags."""
    model: torch.nn.Module
    tokenizer: torch.nn.Module
    protoflow: ProtoFlow
    device: torch.device
    amp: str
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def img_size(self) -> int:
        return self.model.patch_embed.img_size[0]


def load_models(args: argparse.Namespace) -> Models:
    """The ViT as the checkpoint was trained (its stored settings, explicit flags win and
    are reported; `args` is updated with them), its tokenizer (vocabulary checked) and
    ProtoFlow, which is given the ViT's images and converts them to its own
    normalisation."""
    device = torch.device(args.device)
    amp = resolve_amp(args.amp, device)
    checkpoint = read_weights_file(args.ckpt)
    config, notes = modeling_pmad.resolve_eval_config(vars(args), checkpoint, args.ckpt)
    print("\n".join(f"[run_test] {note}" for note in notes))
    vars(args).update(config)
    mean, std = datasets.normalization(args.imagenet_default_mean_and_std)
    tokenizer = create_tokenizer(args.tokenizer_model, args.tokenizer_weight_path,
                                 device=str(device), amp=amp)
    vocab_size = modeling_pmad.checkpoint_vocab_size(checkpoint, args.ckpt)
    if vocab_size != tokenizer.vocab_size:
        raise FlagError(f"{args.ckpt} predicts {vocab_size} visual tokens but the "
                        f"{args.tokenizer_model} tokenizer {args.tokenizer_weight_path} has "
                        f"{tokenizer.vocab_size}: evaluate with the tokenizer it was trained "
                        "on (--tokenizer_weight_path)")
    model = modeling_pmad.build_pmad(args.model, vocab_size=vocab_size,
                                     img_size=args.input_size,
                                     init_values=args.layer_scale_init_value)
    modeling_pmad.load_checkpoint(model, args.ckpt, strict=True, checkpoint=checkpoint)
    del checkpoint
    model.to(device).eval()
    args.protoflow_weights = resolve_weights_file(args.protoflow_weights)
    protoflow = ProtoFlow(args.protoflow_weights, args.prototypes_dir, device=str(device),
                          encoder_weights=args.encoder_weights, input_normalization=(mean, std))
    return Models(model, tokenizer, protoflow, device, amp, mean, std)


def clean_options(args: argparse.Namespace) -> CleanOptions:
    return CleanOptions(args.clean_masks, args.unmasked, args.abnormality, args.combine,
                        args.image_score)


def class_mask_ratio(args: argparse.Namespace, class_name: str) -> float:
    """--mask_ratio, else the paper's Table 6 ratio of the class, else --default_mask_ratio."""
    if args.mask_ratio is not None:
        return args.mask_ratio
    return CLASS_MASK_RATIOS.get(class_name, args.default_mask_ratio)


def main(args: argparse.Namespace) -> dict:
    out_dir = Path(prepare_output_dir(args.output_dir, "--output_dir"))
    setting = datasets.resolve_setting(args.setting, args.from_obj_to_texture)
    classes = select_classes(args, setting)
    root = Path(args.data_path)
    m = load_models(args)
    options = clean_options(args)
    if (args.protocol == "clean" and options.masks == "threshold"
            and m.protoflow.threshold is None):
        print(f"[run_test] {args.protoflow_weights} stores no threshold from normal images "
              "(a released file): every image gets ProtoFlow's proposal mask. `python "
              "run_protoflow.py train ...` writes a file with one.")

    results = {"protocol": args.protocol, "setting": setting, "classes": {},
               "clean_options": options.as_dict() if args.protocol == "clean" else None,
               "args": vars(args), "amp": m.amp,
               "checkpoints": {"pmad": file_sha256(args.ckpt),
                               "protoflow": file_sha256(args.protoflow_weights),
                               "tokenizer": m.tokenizer.fingerprint},
               "versions": {"python": platform.python_version(), "torch": torch.__version__,
                            "timm": timm.__version__, "numpy": np.__version__}}
    start = time.time()
    partial = PartialResults(out_dir / "results.partial.jsonl", {
        "data_path": str(root), "setting": setting, "protocol": args.protocol,
        "clean_options": results["clean_options"], "mask_ratio": args.mask_ratio,
        "default_mask_ratio": args.default_mask_ratio, "sigma": args.sigma,
        "seed": args.seed, "skip_bad_images": args.skip_bad_images,
        "checkpoints": results["checkpoints"]}, args.resume_eval)
    class_name = None
    try:
        for class_name in tqdm(classes, desc=f"evaluating ({args.protocol} protocol)"):
            if class_name in partial.done:
                results["classes"][class_name] = partial.done[class_name]
                tqdm.write(f"[run_test] {class_name}: done in an earlier run ({partial.path})")
                continue
            results["classes"][class_name] = evaluate_class(args, m, options, root, out_dir,
                                                            class_name)
            partial.add(class_name, results["classes"][class_name])
    except (Exception, KeyboardInterrupt) as e:
        interrupted = isinstance(e, KeyboardInterrupt)
        results["failed"] = {class_name: "interrupted (Ctrl-C)" if interrupted
                             else f"{type(e).__name__}: {e}"}
        print(f"[run_test] {'interrupted' if interrupted else 'stopped'} in class "
              f"{class_name}; the {len(results['classes'])} class(es) finished are kept in "
              f"{partial.path} and the table below; re-run with --resume_eval to skip them",
              file=sys.stderr, flush=True)
        _report(results, out_dir, args, start)
        if interrupted:
            return results
        raise
    _report(results, out_dir, args, start)
    return results


def evaluate_class(args: argparse.Namespace, m: "Models", options: CleanOptions, root: Path,
                   out_dir: Path, class_name: str) -> dict:
    """One class under args.protocol: its record, its diagnostics line, its heatmaps."""
    dataset = datasets.MVTecTestDataset(root, class_name, token_size=m.tokenizer.image_size,
                                        img_size=m.img_size, mean=m.mean, std=m.std,
                                        skip_bad_images=args.skip_bad_images)
    data = collect_class(dataset, m.tokenizer, m.protoflow, class_name, args.batch_size,
                         m.device, args.num_workers)
    kwargs = dict(sigma=args.sigma, batch_size=args.batch_size, device=m.device, amp=m.amp,
                  seed=args.seed)
    if args.protocol == "paper":
        record, maps = evaluate_paper(m.model, data, **kwargs)
    else:
        record, maps = evaluate_clean(m.model, data, ratio=class_mask_ratio(args, class_name),
                                      threshold=m.protoflow.threshold_for(class_name),
                                      options=options, **kwargs)
    record.update(num_images=len(data.labels), num_anomalous=int(data.labels.sum()),
                  ground_truth=data.gt_masks is not None)
    d = record["diagnostics"]
    tqdm.write(f"[run_test] {class_name}: {d['anomalous_with_proposal']} of "
               f"{d['anomalous_images']} anomalous images got the proposal mask; "
               + (f"{d['masked_defect_fraction']:.0%} of defect pixels masked"
                  if data.gt_masks is not None else
                  f"no {root}/{class_name}/ground_truth folder: pixel metrics undefined"))
    if args.save_heatmaps:
        scores = (image_scores(maps["pmad"], options.image_score)
                  if args.protocol == "clean" else image_scores(maps["pmad"]))
        threshold = (record["threshold"] if args.protocol == "paper"
                     else m.protoflow.threshold_for(class_name))
        save_heatmaps(data, maps["pmad"], scores, threshold,
                      out_dir / "heatmaps" / class_name, args.save_heatmaps, m.mean, m.std)
    return record


class PartialResults:
    """Each finished class's record, one JSON line as soon as it is done, so that an
    error or Ctrl-C in class N loses none of classes 1 ... N-1; `key` (what the records
    depend on) must match for a resumed run to reuse them."""

    def __init__(self, path: Path, key: dict, resume: bool) -> None:
        self.path, self.key = path, json.loads(json.dumps(key, default=str))
        self.done: dict[str, dict] = {}
        if not resume:
            path.unlink(missing_ok=True)
            return
        lines = path.read_text().splitlines() if path.is_file() else []
        for line in filter(str.strip, lines):
            entry = json.loads(line)
            if entry["key"] != self.key:
                changed = sorted(k for k in self.key if entry["key"].get(k) != self.key[k])
                raise FlagError(f"--resume_eval: {path} holds results of another evaluation "
                                f"(it differs in {', '.join(changed)}): pass that run's "
                                "flags, or drop --resume_eval to start afresh")
            self.done[entry["class"]] = entry["record"]

    def add(self, class_name: str, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"class": class_name, "key": self.key, "record": record},
                               default=float) + "\n")


def _report(results: dict, out_dir: Path, args: argparse.Namespace, start: float) -> None:
    """The table of the classes finished (all, or those before a failure), printed and
    written."""
    if not results["classes"]:
        print("[run_test] no class finished: no table written", file=sys.stderr)
        return
    summarize(results)
    results["seconds"] = time.time() - start
    table = write_results(results, out_dir, args.protocol)
    print(table)
    print(f"results: {out_dir / 'results.json'}, {out_dir / 'results.md'}, "
          f"{out_dir / 'results.csv'}"
          + (f"; heatmaps: {out_dir / 'heatmaps'}" if args.save_heatmaps else ""))


def exit_status(results: dict) -> int:
    """0 when every class was evaluated, else 1 (listed on stderr): a class fails when it
    is in results['failed'] or any of its metrics is not finite."""
    failed = list(results.get("failed", {})) + [
        name for name, record in results["classes"].items()
        if not all(math.isfinite(record.get(k, math.nan)) for k in METRIC_KEYS
                   if record.get("ground_truth", True) or k not in metrics.PIXEL_METRICS)]
    if failed:
        print(f"[run_test] failed classes: {', '.join(dict.fromkeys(failed))}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(cli(lambda: exit_status(main(get_args_parser().parse_args()))))
