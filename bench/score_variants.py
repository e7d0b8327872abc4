"""The clean protocol's score alternatives measured in docs/heldout.md (README's "On data
nobody tuned it for"): one trained world (a demo world's outputs, or yours), each
alternative beside the default and the baselines, every row from the same models and the
same pass.

    python bench/score_variants.py --model vit_tiny_patch16_224_8k_vocab \
        --ckpt output_dir/demo/heldout/pmad/checkpoint-last.pth --tokenizer_model kmeans \
        --tokenizer_weight_path output_dir/demo/heldout/kmeans_tokenizer.pth \
        --protoflow_weights output_dir/demo/heldout/protoflow.pt \
        --prototypes_dir output_dir/demo/heldout/prototypes \
        --data_path data/demo_heldout_mvtec --output_dir output_dir/variants_heldout

Takes run_test.py's model flags and those of its data and scoring flags the rows read (not
its protocol choices: each row fixes its own). The rows calibrated on normal images read
each class's <data_path>/<class>/train/good. Prints mean image AUROC / pixel AUROC per row
(pixel AUROC left out where a class has no ground_truth folder) and each row's image
AUROC minus the default's with its 95 % paired bootstrap interval over the test images
(as compare_worlds.py's), and writes <output_dir>/score_variants.json (per class) and
score_variant_gaps.json (the gaps). The sigma and top-1 % rows score every
map by the same rule, shown as PMAD (ProtoFlow, PatchCore); "ProtoFlow's own score" is
no map's: the largest -log p of the image's patches. Choose on one world, report another.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import numpy as np
import torch
from scipy.stats import rankdata

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import datasets  # noqa: E402
import metrics  # noqa: E402
import run_test  # noqa: E402
from compare_worlds import paired_auroc_gaps  # noqa: E402
from engine import scatter_masked  # noqa: E402
from masking_generator import class_mask_ratio  # noqa: E402
from protocols import (CE_WEIGHT, ClassData, baseline_maps, collect_class,  # noqa: E402
                       covered_token_scores, gaussian_blur, image_scores, pmad_maps,
                       vit_batches)
from protoflow import Proposals, covering_masks, proposals_from_log_likelihood  # noqa: E402
from utils import LayoutError, UniqueNames, cli  # noqa: E402

CE_WEIGHTS = (0.25, 0.5, 2.0)  # rows besides the default's protocols.CE_WEIGHT
RANDOM_COVERINGS = 4
GAPS_FILE = "score_variant_gaps.json"  # each row's image AUROC gap to the default row
IMAGE_SIGMAS = (8.0, 16.0)


@torch.inference_mode()
def covering_stats(model: torch.nn.Module, data: ClassData, passes: list[torch.Tensor],
                   batch_size: int, device: torch.device, amp: str,
                   codebook: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """From one ViT pass per covering mask, each (N, L): 'ce', each patch's masked-token
    CE (what protocols.covered_token_scores computes); 'entropy' of the predicted token
    distribution and 'top', the CE of the likeliest token (a texture the ViT cannot
    predict has a high CE everywhere: these say how much of it the ViT expected); with a
    k-means `codebook` (V, C) of unit rows, 'codeword': 1 - the cosine between the
    predicted distribution's expected codeword and the true one (a near miss in feature
    space costs little)."""
    stats = {k: torch.zeros(data.tokens.shape) for k in ("ce", "entropy", "top")}
    if codebook is not None:
        stats["codeword"] = torch.zeros(data.tokens.shape)
        code = codebook.to(device).float()  # (V, C)
    for masks in passes:
        for rows, ce, logits, m in vit_batches(model, data, masks, batch_size, device, amp):
            log_p = logits.float().log_softmax(-1)  # (M, V)
            found = {"ce": ce, "entropy": -(log_p.exp() * log_p).sum(-1), "top": -log_p.amax(-1)}
            if codebook is not None:
                expected = log_p.exp() @ code  # (M, C)
                found["codeword"] = 1 - (expected * code[data.tokens[rows].to(device)[m]]).sum(-1)
            for k, v in found.items():
                stats[k][rows] += scatter_masked(v, m).cpu()
    return stats


def ce_weight_row(weight: float) -> str:
    """The name of the row whose map weighs CE / ln V by `weight` (CE_WEIGHTS;
    protocols.CE_WEIGHT is the default row, 0 ProtoFlow's map alone)."""
    return {0.0: "protoflow_only", CE_WEIGHT: "default"}.get(weight, f"CE weight {weight:g}")


def relative_to_image(ce: torch.Tensor) -> torch.Tensor:
    """(N, L) CE scaled so that each image's median is the class's over these (test)
    images, labels unread: an image the ViT finds hard to predict everywhere (a busy
    normal texture) is not raised as a whole, only where it is harder than its own
    usual."""
    return ce * ce.median() / ce.median(1, keepdim=True).values.clamp(min=1e-3)


def token_means(scores: torch.Tensor, tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    """(V,) mean score of each token over (N, L) scores, 0 for a token never seen."""
    total = torch.zeros(vocab).index_add_(0, tokens.flatten(), scores.flatten())
    count = torch.zeros(vocab).index_add_(0, tokens.flatten(), torch.ones(scores.numel()))
    return torch.where(count > 0, total / count.clamp(min=1), torch.zeros(vocab))


def _default_covering(data: ClassData, ratio: float, grid: tuple[int, int]
                      ) -> tuple[Proposals, list[torch.Tensor]]:
    """The clean protocol's default: every image gets its proposal mask, and every patch
    is masked once across the covering passes."""
    proposals = proposals_from_log_likelihood(data.log_likelihood,
                                              image_size=data.images.shape[-1], grid=grid)
    return proposals, covering_masks(proposals.test_ranks(None, None), ratio)


def variant_scores(model: torch.nn.Module, data: ClassData, ratio: float, sigma: float,
                   batch_size: int, device: torch.device, amp: str, seed: int = 0,
                   train: ClassData | None = None, codebook: torch.Tensor | None = None
                   ) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """Row name -> (image scores (N,), pixel map (N, S, S) or None for image-only rows).
    `train`: the class's train/good images, for the rows calibrated on them; `codebook`:
    the k-means tokenizer's, for the codeword row."""
    grid = tuple(model.patch_embed.grid_size)
    proposals, passes = _default_covering(data, ratio, grid)
    stats = covering_stats(model, data, passes, batch_size, device, amp, codebook)
    ce, entropy, top = stats["ce"], stats["entropy"], stats["top"]  # (N, L) each
    g = torch.Generator().manual_seed(seed)
    ce_avg = ce.clone()
    for _ in range(RANDOM_COVERINGS):
        order = torch.rand(data.tokens.shape, generator=g).argsort(1).argsort(1)  # random ranks
        ce_avg += covered_token_scores(model, data, covering_masks(order, ratio), batch_size,
                                       device, amp)
    ce_avg /= 1 + RANDOM_COVERINGS
    abnormality = proposals.log_abnormality_maps.float().cpu()  # (N, S, S)
    vocab = model.lm_head.out_features
    ln_v = math.log(vocab)

    def weighted(token_scores: torch.Tensor, smooth: float = sigma,
                 weight: float = CE_WEIGHT) -> torch.Tensor:
        # the clean protocol's map, abnormality x (1 + w CE / ln V), of other token scores
        return pmad_maps(token_scores, abnormality, grid, smooth, "weighted", vocab, weight)

    base = baseline_maps(data, abnormality, ce, grid, sigma)
    pmad = weighted(ce)
    rows = {"default": (image_scores(pmad), pmad)}
    for w in CE_WEIGHTS:
        m = weighted(ce, weight=w)
        rows[ce_weight_row(w)] = (image_scores(m), m)
    m = weighted(ce_avg)
    rows[f"CE averaged over {1 + RANDOM_COVERINGS} coverings"] = (image_scores(m), m)
    calibrated = {  # (N, L) token scores in place of CE
        "CE - entropy (at least 0)": (ce - entropy).clamp(min=0),
        "CE x (1 - entropy / ln V)": ce * (1 - entropy / ln_v).clamp(min=0),
        "CE - CE of the likeliest token": ce - top,
        "CE - per-position median over the test set (at least 0)":
            (ce - ce.median(0).values).clamp(min=0),
        "CE x class median / the image's median": relative_to_image(ce)}
    if train is not None:
        train_ce = covered_token_scores(model, train, _default_covering(train, ratio, grid)[1],
                                        batch_size, device, amp)  # (N_train, L)
        mean, std = train_ce.mean(0), train_ce.std(0).clamp(min=1e-3)  # (L,) per position
        calibrated["CE - per-position mean on train/good (at least 0)"] = (ce - mean).clamp(min=0)
        calibrated["the same as a z-score, halved"] = ((ce - mean) / std).clamp(min=0) * 0.5
        calibrated["CE - mean CE of the same token on train/good (at least 0)"] = (
            ce - token_means(train_ce, train.tokens, vocab)[data.tokens]).clamp(min=0)
    if codebook is not None:  # in place of CE / ln V
        calibrated["1 - expected cosine to the true codeword"] = stats["codeword"] * ln_v
    for name, scores in calibrated.items():
        m = weighted(scores)
        rows[name] = (image_scores(m), m)
    pf_max, pmad_max = image_scores(base["protoflow_only"]), image_scores(pmad)
    rows["image: rank sum with ProtoFlow"] = (
        torch.tensor(rankdata(pmad_max) + rankdata(pf_max)), None)
    rows["image: product with ProtoFlow"] = (pmad_max * pf_max, None)
    pf_own = proposals.image_scores.float().cpu()  # (N,) max of -log p over the patches
    rows["image: ProtoFlow's own score (max -log p)"] = (pf_own, None)
    rows["image: rank sum with ProtoFlow's own score"] = (
        torch.tensor(rankdata(pmad_max) + rankdata(pf_own)), None)
    rows.update({k: (image_scores(m), m) for k, m in base.items()})
    raw = {"pmad": weighted(ce, 0.0)} | baseline_maps(data, abnormality, None, grid, 0.0)
    for s in IMAGE_SIGMAS:
        for name in ("pmad", "protoflow_only", "patchcore"):
            rows[f"image: max at sigma {s:g} [{name}]"] = (
                image_scores(gaussian_blur(raw[name], s)), None)
    for name, m in (("pmad", pmad), ("protoflow_only", base["protoflow_only"]),
                    ("patchcore", base["patchcore"])):
        rows[f"image: top 1 % [{name}]"] = (image_scores(m, "topk"), None)
    return rows


def aurocs(data: ClassData, rows: dict) -> dict[str, dict[str, float]]:
    """Each row's image AUROC and, for a map row of a class with masks, pixel AUROC (nan
    otherwise: run_test.py's rule for a class without a ground_truth folder), by
    metrics.py as run_test.py reports them."""
    return {k: {"image_auroc": metrics.image_auroc(data.labels, s),
                "pixel_auroc": (metrics.pixel_auroc(data.gt_masks, m)
                                if m is not None and data.gt_masks is not None else math.nan)}
            for k, (s, m) in rows.items()}


def default_gaps(classes: list[tuple[np.ndarray, dict[str, np.ndarray]]]
                 ) -> dict[str, dict[str, float]] | None:
    """Each row's mean image AUROC minus the default row's, with its 95 % paired bootstrap
    interval over the test images (compare_worlds.paired_auroc_gaps): whether a row's
    gain is more than another draw of test images could make. `classes`: per class,
    (labels (N,) bool, {row: image scores (N,)}). None where a class lacks good or
    defective images."""
    if any(labels.all() or not labels.any() for labels, _ in classes):
        return None
    rows = [k for k in classes[0][1] if k != "default"]
    return paired_auroc_gaps(classes, {k: (k, "default") for k in rows})


def train_good_images(data_path: str, cls: str) -> list[str]:
    """The class's normal training images, which the train/good calibration rows need;
    checked for every class before any is scored."""
    train_dir = os.path.join(data_path, cls, "train", "good")
    paths = datasets.list_images(train_dir) if os.path.isdir(train_dir) else []
    if not paths:
        raise LayoutError(f"{train_dir} holds no images: the train/good calibration rows "
                          "need the class's normal training images in the MVTec layout")
    return paths


def get_args_parser() -> argparse.ArgumentParser:
    """run_test.py's model flags and, with its names, types and defaults, the data and
    scoring flags the rows read; its protocol choices (--protocol, --clean_masks,
    --image_score, ...) are refused rather than ignored, as every row fixes its own."""
    p = argparse.ArgumentParser("PMAD score alternatives", add_help=True)
    run_test.add_model_args(p)
    p.add_argument("--data_path", default="data/mvtec_anomaly_detection",
                   help="a folder in MVTec layout whose classes have train/good images")
    p.add_argument("--classes", nargs="*", default=None, action=UniqueNames,
                   help="score exactly these (default: every class with a test folder)")
    p.add_argument("--output_dir", default="output_dir/test",
                   help="where score_variants.json is written")
    run_test.add_mask_ratio_args(p)
    run_test.add_scoring_args(p)  # --seed also seeds the covering-average row's orders
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    return cli(lambda: score_world(args))


def score_world(args: argparse.Namespace) -> None:
    """Every row for each class of `args.data_path`; prints the means, writes the JSON."""
    classes = args.classes or datasets.list_test_classes(args.data_path)
    train_images = {cls: train_good_images(args.data_path, cls) for cls in classes}
    m = run_test.load_models(args)
    os.makedirs(args.output_dir, exist_ok=True)
    results, no_masks, image_scores_of = {}, [], []
    for cls, paths in train_images.items():
        data = collect_class(m.test_set(args.data_path, cls), m.tokenizer, m.protoflow, cls,
                             args.batch_size, m.device, args.num_workers)
        if data.gt_masks is None:  # no ground_truth folder (a custom set)
            no_masks.append(cls)
        train = collect_class(m.dataset(paths, [os.path.basename(p) for p in paths]),
                              m.tokenizer, m.protoflow, cls, args.batch_size, m.device,
                              args.num_workers)
        ratio = class_mask_ratio(cls, args.mask_ratio, args.default_mask_ratio)
        rows = variant_scores(m.model, data, ratio, args.sigma, args.batch_size, m.device,
                              m.amp, args.seed, train, getattr(m.tokenizer, "codebook", None))
        results[cls] = aurocs(data, rows)
        image_scores_of.append((np.asarray(data.labels) == 1,
                                {k: np.asarray(s, dtype=float) for k, (s, _) in rows.items()}))
    path = os.path.join(args.output_dir, "score_variants.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    gaps = default_gaps(image_scores_of)
    if gaps is not None:
        with open(os.path.join(args.output_dir, GAPS_FILE), "w") as f:
            json.dump(gaps, f, indent=1)
    print(f"\nmean image AUROC / pixel AUROC over {len(classes)} classes ({args.data_path})")
    masked = [c for c in classes if c not in no_masks]
    if no_masks:
        print(f"  pixel AUROC over the {len(masked)} class(es) with a ground_truth folder; "
              f"none in {', '.join(no_masks)}")
    for row in results[classes[0]]:
        img = np.mean([results[c][row]["image_auroc"] for c in classes])
        pix = np.mean([results[c][row]["pixel_auroc"] for c in masked]) if masked else math.nan
        # image AUROC with 4 decimals: over a demo world's few hundred image pairs its
        # mean often ends in 5 at the 4th, which 3 would round up or down by float noise
        gap = "" if gaps is None or row not in gaps else (
            "   {gap:+.4f} [{low:+.4f}, {high:+.4f}]".format(**gaps[row]))
        print(f"  {row:58s} {img:.4f}" + ("" if math.isnan(pix) else f" / {pix:.3f}") + gap)
    if gaps is None:
        print("no image AUROC gaps: a class lacks good or defective test images")
    else:
        print(f"gaps: {GAPS_FILE}")
    print(f"per class: {path}")


if __name__ == "__main__":
    sys.exit(main())
