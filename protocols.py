"""PMAD's test-time scoring and the two protocols that turn it into metrics.

The masked-token score (each masked patch's token cross-entropy, `masked_token_scores`)
times ProtoFlow's abnormality map is PMAD's score map (`pmad_maps`, docs/method.md 7).
The paper protocol (`evaluate_paper`) picks ProtoFlow's threshold and the best of 24 mask
ratios (`sweep_mask_ratios`) with the test labels, to reproduce the published numbers;
the clean protocol (`clean_scores`, `evaluate_clean`) reads no label before every score
exists. Every table also scores the baselines PMAD must beat (`baseline_maps`): ProtoFlow's
map alone and PatchCore; the clean protocol's also the ViT's cross-entropy alone (the
paper protocol runs no covering passes, so it has no cross-entropy of every patch).

Per class, one pass computes every image's visual tokens and ProtoFlow maps
(`collect_class`); only the ViT runs again for each mask ratio.
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

import metrics
from engine import masked_token_ce, scatter_masked
from protoflow import (Proposals, ProtoFlow, covering_masks, is_anomalous,
                       proposals_from_log_likelihood, resize_maps)
from utils import CheckpointError, amp_autocast, file_sha256, progress

PAPER_RATIOS = tuple(round(0.02 * i, 2) for i in range(1, 25))  # 0.02 ... 0.48
CLEAN_MASKS = ("proposal", "threshold")
UNMASKED = ("cover", "zero")
ABNORMALITY = ("log", "paper")
COMBINE = ("weighted", "product")
IMAGE_SCORES = ("max", "topk")
# CE's weight in the clean protocol's map, abnormality x (1 + w CE / ln V). The pooled
# tuning sets of docs/heldout.md (three trained models) kept 1: 0.5 gained on two, not on
# the third
CE_WEIGHT = 1.0
# a ground-truth mask marking more of its image than this, and its four corners, is named
# (mostly_defect_masks): likely inverted
MOSTLY_DEFECT = 0.5


@dataclass(frozen=True)
class CleanOptions:
    """The clean protocol's label-free choices (run_test.py --clean_masks, --unmasked,
    --abnormality, --combine, --ce_weight, --image_score); see evaluate_clean. The
    paper's choices are 'threshold', 'zero', 'paper', 'product', 'max'. ce_weight
    defaults to CE_WEIGHT under 'weighted' and stays None under 'product', which
    multiplies CE in unweighted: a weight given with 'product' is refused, not dropped."""
    masks: str = "proposal"
    unmasked: str = "cover"
    abnormality: str = "log"
    combine: str = "weighted"
    image_score: str = "max"
    ce_weight: float | None = None

    def __post_init__(self) -> None:
        if self.combine == "product" and self.ce_weight is not None:
            raise ValueError(f"combine='product' has no CE weight, got {self.ce_weight}")
        if self.combine == "weighted" and self.ce_weight is None:
            object.__setattr__(self, "ce_weight", CE_WEIGHT)

    def as_dict(self) -> dict[str, str | float | None]:
        return asdict(self)


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """scipy.ndimage.gaussian_filter(mode='reflect', truncate=4) on a batch, in torch."""
    if sigma <= 0 or len(maps) == 0:
        return maps
    radius = int(4.0 * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(maps.dtype)
    n = maps.shape[0]
    # the maps as the channels of one image, each convolved on its own (groups=n): on a
    # CPU, 3-7x faster than n one-channel images through one shared filter
    out = maps.unsqueeze(0)  # (1, N, H, W)
    for dim in (2, 3):
        size = out.shape[dim]
        # scipy's 'reflect' repeats the edge sample (d c b a | a b c d | d c b a), as
        # often as a kernel wider than the map needs: period 2 * size
        idx = torch.arange(-radius, size + radius).remainder(2 * size)
        idx = torch.where(idx >= size, 2 * size - idx - 1, idx)
        out = out.index_select(dim, idx)
        shape = (n, 1, -1, 1) if dim == 2 else (n, 1, 1, -1)
        out = F.conv2d(out, kernel.view(shape[2:]).expand(shape), groups=n)
    return out.squeeze(0)


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


def _check_normalization(dataset: torch.utils.data.Dataset, protoflow: ProtoFlow) -> None:
    """The dataset's mean and std (datasets' image sets record them) against ProtoFlow's
    `input_normalization`, which the models were loaded with (scoring_models.load)."""
    mean, std = protoflow.input_normalization
    if not (np.allclose(dataset.mean, mean) and np.allclose(dataset.std, std)):
        raise ValueError(f"the images are normalised with mean {dataset.mean}, std "
                         f"{dataset.std}, but the models were loaded for mean {tuple(mean)}, "
                         f"std {tuple(std)}: build the set with the models' (Models.dataset, "
                         "or mean=m.mean, std=m.std)")


@torch.inference_mode()
def collect_class(dataset: torch.utils.data.Dataset, tokenizer: torch.nn.Module,
                  protoflow: ProtoFlow, class_name: str, batch_size: int,
                  device: torch.device, num_workers: int = 0) -> ClassData:
    """One pass over a class: tokens, ProtoFlow log-likelihoods and prototype distances,
    computed once, and each image file's SHA-256 (it seeds the image's random test
    mask). `dataset` yields 'image', 'token_image', 'name', 'index' and, for a labelled
    test set, 'label', 'gt_mask', 'defect_type'; its `image_paths` are the files. A set
    whose `has_ground_truth` is False (a custom set) keeps no masks. A set normalised
    otherwise than ProtoFlow is told the images are (the ViT's, scoring_models.Models'
    mean and std) is refused: every score would be off, with no error."""
    _check_normalization(dataset, protoflow)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                         num_workers=num_workers)
    images, tokens, logps, dists, labels, gts, names, defects, ids = ([] for _ in range(9))
    for batch in progress(loader, desc=f"{class_name}: tokens + ProtoFlow", leave=False):
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
def vit_batches(model: torch.nn.Module, data: ClassData, masks: torch.Tensor,
                batch_size: int, device: torch.device, amp: str, desc: str = "ViT"
                ) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The ViT over a class's images in batches, under autocast: per batch (its slice
    of the images, ce (M,) float32 and logits (M, V) of its masked patches in
    `x[masks]` order, and its masks (n, L) on the device). The one ViT loop of the
    scoring; bench/score_variants.py reads the logits too. `desc` names its progress
    bar (which pass, which ratio)."""
    for i in progress(range(0, len(data.images), batch_size), desc=desc, leave=False):
        rows = slice(i, i + batch_size)
        m = masks[rows].to(device)  # (n, L)
        with amp_autocast(device, amp):
            ce, logits = masked_token_ce(model, data.images[rows].to(device),
                                         data.tokens[rows].to(device), m)
        yield rows, ce, logits, m


def masked_token_scores(model: torch.nn.Module, data: ClassData, masks: torch.Tensor,
                        batch_size: int, device: torch.device, amp: str, desc: str = "ViT"
                        ) -> torch.Tensor:
    """PMAD's masked-token score (method.md 7): each masked patch's token cross-entropy,
    0 at visible patches. masks (N, L) bool -> (N, L) float32 on the CPU."""
    scores = torch.cat([scatter_masked(ce, m).cpu()
                        for _, ce, _, m in vit_batches(model, data, masks, batch_size, device,
                                                       amp, desc)])  # (N, L)
    bad = ~torch.isfinite(scores).all(dim=1)  # (N,)
    if bad.any():
        named = f" ({data.names[int(bad.nonzero()[0])]}, ...)" if data.names else ""
        raise CheckpointError(f"the ViT gives non-finite token scores to {int(bad.sum())} of "
                              f"{len(bad)} image(s){named}: its weights (--ckpt) are damaged "
                              "or its training diverged; use another checkpoint (e.g. an "
                              "earlier checkpoint-<epoch>.pth) or download it again")
    return scores


def covered_token_scores(model: torch.nn.Module, data: ClassData, passes: list[torch.Tensor],
                         batch_size: int, device: torch.device, amp: str) -> torch.Tensor:
    """Masked-token scores of every patch: the passes (disjoint (N, L) masks covering
    the grid) are scored one after the other and their scores added. -> (N, L)."""
    return sum(masked_token_scores(model, data, m, batch_size, device, amp,
                                   f"ViT, pass {k + 1}/{len(passes)}")
               for k, m in enumerate(passes))


def upsample(patch_scores: torch.Tensor, grid: tuple[int, int], size: int) -> torch.Tensor:
    """(N, h * w) or (N, h, w) patch scores -> (N, S, S), by protoflow.resize_maps."""
    return resize_maps(patch_scores.reshape(-1, *grid), (size, size))


def pmad_maps(token_scores: torch.Tensor, abnormality: torch.Tensor, grid: tuple[int, int],
              sigma: float, combine: str = "product", vocab_size: int | None = None,
              ce_weight: float | None = CE_WEIGHT) -> torch.Tensor:
    """PMAD's score map: masked-token scores (N, L), upsampled, and ProtoFlow's
    abnormality map (N, S, S), combined, then Gaussian-smoothed. -> (N, S, S).

    'product' (the paper, docs/method.md 7): CE x abnormality. 'weighted': abnormality x
    (1 + ce_weight x CE / ln V), ProtoFlow's map raised where the ViT finds the token
    surprising (CE = ln V is as surprising as a uniform guess over the V tokens). A patch
    the ViT predicts well keeps ProtoFlow's score instead of dropping to ~0, so a ViT
    that has learned little cannot drown ProtoFlow's evidence in its noise; ce_weight
    says how far the ViT may raise it (0: ProtoFlow's map alone; 'product' ignores it).
    """
    ce = upsample(token_scores, grid, abnormality.shape[-1])  # (N, S, S)
    if combine == "product":
        return gaussian_blur(ce * abnormality, sigma)
    if combine == "weighted":
        if vocab_size is None or vocab_size < 2:
            raise ValueError(f"combine='weighted' needs the vocabulary size, got {vocab_size}")
        if ce_weight is None:
            raise ValueError("combine='weighted' needs a CE weight, got None")
        return gaussian_blur(abnormality * (1 + ce_weight * ce / math.log(vocab_size)), sigma)
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
    scores = image_scores(maps, "max") if scores is None else scores
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
    alone. Each is upsampled and smoothed as PMAD's map is; the callers take each one's
    image score by PMAD's rule (`image_scores`; the paper protocol: the maximum)."""
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
    defect hidden from the context; nan without ground-truth masks). Also how many
    anomalous images have no defect pixel in the scored square (empty_defect_masks): an
    empty mask file, or a defect the centre crop cut off; the pixel metrics then never
    see that defect (None without ground-truth masks)."""
    size = data.images.shape[-1]
    bad = torch.as_tensor(data.labels == 1)
    fraction, empty = math.nan, None
    if data.gt_masks is not None:
        per_patch = F.adaptive_avg_pool2d(data.gt_masks[:, None].float(), grid).flatten(1)  # (N, L)
        total = per_patch[bad].sum()
        covered = (per_patch * masks.float())[bad].sum()
        fraction = float(covered / total) if total > 0 else math.nan
        empty = len(empty_defect_masks(data))
    return {"anomalous_with_proposal": int((anomalous & bad).sum()),
            "anomalous_images": int(bad.sum()),
            "masked_defect_fraction": fraction,
            "empty_defect_masks": empty,
            "pixels_per_patch": (size // grid[0]) * (size // grid[1])}


def empty_defect_masks(data: ClassData) -> list[str]:
    """The anomalous images whose ground-truth mask, as scored (resized and cropped), has
    no defect pixel; [] without ground-truth masks."""
    if data.gt_masks is None:
        return []
    empty = (data.labels == 1) & ~data.gt_masks.flatten(1).any(dim=1).numpy()  # (N,)
    return [data.names[i] for i in np.flatnonzero(empty)]


def threshold_calls(anomalous: torch.Tensor, labels: np.ndarray) -> dict[str, int]:
    """How ProtoFlow's calls at its stored threshold (predict.py's decision) fare: of the
    good images, how many it calls anomalous (false alarms), and of the anomalous ones,
    how many (found). `anomalous` (N,) bool, `labels` (N,) 1 = anomalous."""
    called = anomalous.cpu().numpy().astype(bool)  # (N,)
    bad = np.asarray(labels) == 1  # (N,)
    return {"good_called_anomalous": int((called & ~bad).sum()), "good_images": int((~bad).sum()),
            "anomalous_called_anomalous": int((called & bad).sum()),
            "anomalous_images": int(bad.sum())}


def mostly_defect_masks(data: ClassData, above: float = MOSTLY_DEFECT) -> list[str]:
    """The images whose ground-truth mask, as scored, marks more than `above` of the
    image and its four corners defective: an inverted mask (the defect black on white)
    or a colour mask on a white background (read by its strongest channel) gives no
    error, only pixel metrics of the background; a large defect (a flipped part) seldom
    reaches every corner. [] without ground-truth masks."""
    if data.gt_masks is None:
        return []
    masks = data.gt_masks.bool()  # (N, S, S)
    fraction = masks.flatten(1).float().mean(dim=1)  # (N,)
    corners = masks[:, [0, 0, -1, -1], [0, -1, 0, -1]].all(dim=1)  # (N,)
    return [data.names[i] for i in np.flatnonzero(((fraction > above) & corners).numpy())]


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
    baseline_maps: dict[str, torch.Tensor]  # name -> (N, S, S) (baseline_maps), if asked


def clean_scores(model: torch.nn.Module, data: ClassData, *, ratio: float,
                 threshold: float | None, options: CleanOptions, sigma: float,
                 batch_size: int, device: torch.device, amp: str, seed: int,
                 baselines: bool = False) -> CleanScores:
    """Every score of the clean protocol, from images alone (no label is read): the one
    computation behind run_test.py's clean protocol and predict.py.

    ProtoFlow's abnormality map is normalised over the whole set given (docs/method.md
    6), so a set's scores equal run_test.py's when it is the class's test set. Masks:
    ProtoFlow's proposal for every image ('proposal'), or for those its stored
    normal-data threshold calls anomalous ('threshold': the others get random masks,
    each seeded from the image file's bytes, `mask_seeds`). Visible patches score 0
    ('zero', as the paper) or are scored too, each in the covering pass that masks it
    ('cover'). Image score: options.image_score. With `baselines`, also the baselines'
    maps (run_test.py's rows; as much memory again as the images, so predict.py, which
    reports PMAD's scores only, leaves them out).
    """
    grid = tuple(model.patch_embed.grid_size)
    proposals = proposals_from_log_likelihood(data.log_likelihood,
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
                     model.lm_head.out_features, options.ce_weight)
    proposal = torch.ones(len(maps), dtype=torch.bool) if call is None else call
    others = (baseline_maps(data, abnormality,
                            token_scores if options.unmasked == "cover" else None, grid,
                            sigma) if baselines else {})
    return CleanScores(maps, image_scores(maps, options.image_score),
                       proposals.image_scores.float().cpu(), anomalous, proposal, passes[0],
                       others)


def evaluate_clean(model: torch.nn.Module, data: ClassData, *, ratio: float,
                   threshold: float | None, options: CleanOptions, sigma: float,
                   batch_size: int, device: torch.device, amp: str, seed: int
                   ) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The clean protocol: `clean_scores` (no test label is read before every score
    exists), then the metrics of PMAD and of each baseline. -> (record, maps: 'pmad' and
    each baseline's (N, S, S), image scores (N,): 'pmad', 'protoflow_score' (ProtoFlow's
    own score, which its threshold calls) and each baseline's, by the map's rule)."""
    scores = clean_scores(model, data, ratio=ratio, threshold=threshold, options=options,
                          sigma=sigma, batch_size=batch_size, device=device, amp=amp,
                          seed=seed, baselines=True)
    record = evaluate_maps(data, scores.maps, scores=scores.image_scores)
    base_scores = {name: image_scores(m, options.image_score)
                   for name, m in scores.baseline_maps.items()}
    record.update({name: evaluate_maps(data, m, scores=base_scores[name])
                   for name, m in scores.baseline_maps.items()})
    record.update(mask_ratio=ratio,
                  threshold=threshold if options.masks == "threshold" else None,
                  # ProtoFlow's calls at the stored threshold (None without one), and
                  # the images masked by their proposal: all of them under 'proposal'
                  called_anomalous=(None if scores.anomalous is None
                                    else int(scores.anomalous.sum())),
                  called_at=threshold,
                  calls=(None if scores.anomalous is None
                         else threshold_calls(scores.anomalous, data.labels)),
                  proposal_masks=int(scores.proposal.sum()),
                  clean_options=options.as_dict(),
                  diagnostics=mask_diagnostics(data, scores.test_masks, scores.proposal,
                                               tuple(model.patch_embed.grid_size)))
    return (record, {"pmad": scores.maps, **scores.baseline_maps},
            {"pmad": scores.image_scores, "protoflow_score": scores.protoflow_scores,
             **base_scores})


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
        scores = masked_token_scores(model, data, masks, batch_size, device, amp,
                                     f"ViT, mask ratio {r:.2f}")
        maps[r] = pmad_maps(scores, abnormality, grid, sigma)
        per_ratio[r] = evaluate_maps(data, maps[r], gaussian_blur(maps[r], sigma))
    return per_ratio, maps


def evaluate_paper(model: torch.nn.Module, data: ClassData, *, sigma: float, batch_size: int,
                   device: torch.device, amp: str, seed: int
                   ) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The paper protocol (method.md 7), which reads the test labels twice: ProtoFlow's
    call at the F1-optimal threshold of the test scores, and the best of 24 mask ratios
    per metric. It reproduces the published numbers; it is not a deployable score.
    Returns as `evaluate_clean` does; PMAD's maps and image scores at the ratio of the
    best image AUROC."""
    grid = tuple(model.patch_embed.grid_size)
    proposals = proposals_from_log_likelihood(data.log_likelihood,
                                              image_size=data.images.shape[-1], grid=grid)
    threshold = metrics.f1_optimal_threshold(data.labels, proposals.image_scores.numpy())
    anomalous = is_anomalous(proposals.image_scores, threshold).cpu()
    per_ratio, maps = sweep_mask_ratios(model, data, proposals, anomalous, PAPER_RATIOS,
                                        sigma=sigma, batch_size=batch_size, device=device,
                                        amp=amp, seed=seed)
    record = {"per_ratio": {f"{r:.2f}": {k: v for k, v in rec.items() if k != "per_defect"}
                            for r, rec in per_ratio.items()}}
    for key in metrics.METRIC_NAMES:
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
    base_scores = {name: image_scores(m) for name, m in base_maps.items()}
    # the baselines' pixel metrics on maps smoothed twice too, like PMAD's
    record.update({name: evaluate_maps(data, m, gaussian_blur(m, sigma), base_scores[name])
                   for name, m in base_maps.items()})
    return (record, {"pmad": maps[best], **base_maps},
            {"pmad": image_scores(maps[best]),
             "protoflow_score": proposals.image_scores.float().cpu(),
             **base_scores})


def _best_ratio(per_ratio: dict[float, dict], key: str) -> float:
    """The ratio with the highest value of `key` (first on ties; NaN never wins)."""
    return max(per_ratio, key=lambda r: -math.inf if math.isnan(per_ratio[r][key])
               else per_ratio[r][key])