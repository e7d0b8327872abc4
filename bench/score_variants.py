"""The clean protocol's score alternatives measured for README's "On data nobody tuned it
for": one trained world (a demo world's outputs, or yours), each alternative beside the
default and the baselines, every row from the same models and the same pass.

    python bench/score_variants.py --model vit_tiny_patch16_224_8k_vocab \
        --ckpt output_dir/demo/heldout/pmad/checkpoint-last.pth --tokenizer_model kmeans \
        --tokenizer_weight_path output_dir/demo/heldout/kmeans_tokenizer.pth \
        --protoflow_weights output_dir/demo/heldout/protoflow.pt \
        --prototypes_dir output_dir/demo/heldout/prototypes \
        --data_path data/demo_heldout_mvtec --output_dir output_dir/variants_heldout

Takes run_test.py's flags. Prints mean image AUROC / pixel AUROC per row and writes
<output_dir>/score_variants.json (per class). Image-score rows score every map by the
same rule, shown as PMAD (ProtoFlow, PatchCore). Choose on one world, report another.
"""
from __future__ import annotations

import json
import math
import os
import sys

import numpy as np
import torch
from scipy.stats import rankdata
from sklearn.metrics import roc_auc_score
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import datasets  # noqa: E402
import run_test  # noqa: E402
from engine import masked_token_ce, scatter_masked  # noqa: E402
from protocols import (ClassData, baseline_maps, collect_class, covered_token_scores,  # noqa: E402
                       gaussian_blur, image_scores, upsample)
from protoflow import covering_masks, proposals_from_log_likelihood  # noqa: E402
from utils import amp_autocast  # noqa: E402

CE_WEIGHTS = (0.5, 0.25, 2.0)
RANDOM_COVERINGS = 4
IMAGE_SIGMAS = (8.0, 16.0)


@torch.inference_mode()
def covering_stats(model: torch.nn.Module, data: ClassData, passes: list[torch.Tensor],
                   batch_size: int, device: torch.device, amp: str
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From one ViT pass per covering mask: each patch's masked-token CE (what
    protocols.covered_token_scores computes), the entropy of the predicted token
    distribution, and the CE of the likeliest token; each (N, L). A texture the ViT cannot
    predict has a high CE everywhere: the last two say how much of it the ViT expected."""
    ce, entropy, top = (torch.zeros(data.tokens.shape) for _ in range(3))
    for masks in passes:
        for i in tqdm(range(0, len(data.images), batch_size), desc="ViT", leave=False):
            m = masks[i:i + batch_size].to(device)
            with amp_autocast(device, amp):
                token_ce, logits = masked_token_ce(model, data.images[i:i + batch_size].to(device),
                                                   data.tokens[i:i + batch_size].to(device), m)
            log_p = logits.float().log_softmax(-1)  # (M, V)
            ce[i:i + batch_size] += scatter_masked(token_ce, m).cpu()
            entropy[i:i + batch_size] += scatter_masked(-(log_p.exp() * log_p).sum(-1), m).cpu()
            top[i:i + batch_size] += scatter_masked(-log_p.amax(-1), m).cpu()
    return ce, entropy, top


def variant_scores(model: torch.nn.Module, data: ClassData, ratio: float, sigma: float,
                   batch_size: int, device: torch.device, amp: str, seed: int = 0
                   ) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """Row name -> (image scores (N,), pixel map (N, S, S) or None for image-only rows)."""
    grid = tuple(model.patch_embed.grid_size)
    size = data.images.shape[-1]
    proposals = proposals_from_log_likelihood(data.log_likelihood, [ratio], image_size=size,
                                              grid=grid)
    ranks = proposals.test_ranks(None, None)  # (N, L) every image gets its proposal mask
    ce, entropy, top = covering_stats(model, data, covering_masks(ranks, ratio), batch_size,
                                      device, amp)  # (N, L) each: the default covering
    g = torch.Generator().manual_seed(seed)
    ce_avg = ce.clone()
    for _ in range(RANDOM_COVERINGS):
        order = torch.rand(ranks.shape, generator=g).argsort(1).argsort(1)  # random ranks
        ce_avg += covered_token_scores(model, data, covering_masks(order, ratio), batch_size,
                                       device, amp)
    ce_avg /= 1 + RANDOM_COVERINGS
    abnormality = proposals.log_abnormality_maps.float().cpu()  # (N, S, S)
    ln_v = math.log(model.lm_head.out_features)

    def weighted(token_scores: torch.Tensor, weight: float, smooth: float) -> torch.Tensor:
        # the clean protocol's 'weighted' map (protocols.pmad_maps) with CE's weight scaled
        return gaussian_blur(abnormality * (1 + weight * upsample(token_scores, grid, size)
                                            / ln_v), smooth)

    base = baseline_maps(data, abnormality, ce, grid, sigma)
    pmad = weighted(ce, 1.0, sigma)
    rows = {"default": (image_scores(pmad), pmad)}
    for w in CE_WEIGHTS:
        m = weighted(ce, w, sigma)
        rows[f"CE weight x{w:g}"] = (image_scores(m), m)
    m = weighted(ce_avg, 1.0, sigma)
    rows[f"CE averaged over {1 + RANDOM_COVERINGS} coverings"] = (image_scores(m), m)
    for name, scores in (("CE - entropy (at least 0)", (ce - entropy).clamp(min=0)),
                         ("CE x (1 - entropy / ln V)", ce * (1 - entropy / ln_v).clamp(min=0)),
                         ("CE - CE of the likeliest token", ce - top)):
        m = weighted(scores, 1.0, sigma)
        rows[name] = (image_scores(m), m)
    pf_max, pmad_max = image_scores(base["protoflow_only"]), image_scores(pmad)
    rows["image: rank sum with ProtoFlow"] = (
        torch.tensor(rankdata(pmad_max) + rankdata(pf_max)), None)
    rows["image: product with ProtoFlow"] = (pmad_max * pf_max, None)
    rows.update({k: (image_scores(m), m) for k, m in base.items()})
    patchcore_raw = upsample(data.prototype_distance, tuple(data.prototype_distance.shape[1:]),
                             size)
    for s in IMAGE_SIGMAS:
        for name, raw in (("pmad", weighted(ce, 1.0, 0.0)), ("protoflow_only", abnormality),
                          ("patchcore", patchcore_raw)):
            rows[f"image: max at sigma {s:g} [{name}]"] = (image_scores(gaussian_blur(raw, s)),
                                                         None)
    for name, m in (("pmad", pmad), ("protoflow_only", base["protoflow_only"]),
                    ("patchcore", base["patchcore"])):
        rows[f"image: top 1 % [{name}]"] = (image_scores(m, "topk"), None)
    return rows


def aurocs(data: ClassData, rows: dict) -> dict[str, dict[str, float]]:
    gt = data.gt_masks.flatten().numpy()
    return {k: {"image_auroc": float(roc_auc_score(data.labels, s.numpy())),
                "pixel_auroc": (float(roc_auc_score(gt, m.flatten().numpy()))
                                if m is not None else math.nan)}
            for k, (s, m) in rows.items()}


def main(argv: list[str] | None = None) -> int:
    args = run_test.get_args_parser().parse_args(argv)
    m = run_test.load_models(args)
    os.makedirs(args.output_dir, exist_ok=True)
    classes = args.classes or datasets.list_test_classes(args.data_path)
    results = {}
    for cls in classes:
        ds = datasets.MVTecTestDataset(args.data_path, cls, token_size=m.tokenizer.image_size,
                                       img_size=m.img_size, mean=m.mean, std=m.std)
        data = collect_class(ds, m.tokenizer, m.protoflow, cls, args.batch_size, m.device)
        rows = variant_scores(m.model, data, run_test.class_mask_ratio(args, cls), args.sigma,
                              args.batch_size, m.device, m.amp, args.seed)
        results[cls] = aurocs(data, rows)
    path = os.path.join(args.output_dir, "score_variants.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    print(f"\nmean image AUROC / pixel AUROC over {len(classes)} classes ({args.data_path})")
    for row in results[classes[0]]:
        img = np.mean([results[c][row]["image_auroc"] for c in classes])
        pix = np.mean([results[c][row]["pixel_auroc"] for c in classes])
        # 4 decimals: over a demo world's few hundred image pairs a mean often ends in
        # 5 at the 4th, and 3 decimals would round it up or down by float noise
        print(f"  {row:42s} {img:.4f}" + ("" if math.isnan(pix) else f" / {pix:.4f}"))
    print(f"per class: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
