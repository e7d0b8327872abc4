"""Evaluate PMAD on MVTec-format test sets, under the paper's protocol or a leak-free one.

Per class, one pass computes every image's visual tokens and ProtoFlow maps; only the
ViT runs again for each mask ratio. The ``clean`` protocol (default) reads no test
label before all scores exist; the ``paper`` protocol reproduces the published numbers,
which choose ProtoFlow's threshold and the mask ratio with the test labels.
"""
from __future__ import annotations

import argparse
import csv
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
import metrics
import modeling_pmad
from engine import patch_losses
from masking_generator import CLASS_MASK_RATIOS, num_masked
from modeling_discrete_vae import create_tokenizer, file_sha256
from protoflow import ProtoFlow, proposals_from_log_likelihood
from utils import amp_autocast, read_weights_file, resolve_amp

PAPER_RATIOS = tuple(round(0.02 * i, 2) for i in range(1, 25))  # 0.02 ... 0.48
METRIC_KEYS = ("image_auroc", "pixel_auroc", "pixel_aupro", "image_ap", "pixel_ap",
               "image_f1_max")


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
    """Everything a class's evaluation needs that does not depend on the mask ratio."""
    images: torch.Tensor          # (N, 3, S, S) normalised
    tokens: torch.Tensor          # (N, L) visual token ids
    log_likelihood: torch.Tensor  # (N, h, w) ProtoFlow
    labels: np.ndarray            # (N,) 0 normal / 1 anomalous (read only for metrics)
    gt_masks: torch.Tensor        # (N, S, S) {0, 1}
    names: list[str] = field(default_factory=list)
    defect_types: list[str] = field(default_factory=list)


@torch.inference_mode()
def collect_class(dataset: torch.utils.data.Dataset, tokenizer: torch.nn.Module,
                  protoflow: ProtoFlow, class_name: str, batch_size: int,
                  device: torch.device, num_workers: int = 0) -> ClassData:
    """One pass over a class: tokens and ProtoFlow log-likelihoods, computed once."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                         num_workers=num_workers)
    images, tokens, logps, labels, gts, names, defects = [], [], [], [], [], [], []
    for batch in tqdm(loader, desc=f"{class_name}: tokens + ProtoFlow", leave=False):
        x = batch["image"].to(device)
        tokens.append(tokenizer.get_codebook_indices(batch["token_image"].to(device)).cpu())
        logps.append(protoflow.log_likelihood(x, class_name).float().cpu())
        images.append(batch["image"])
        labels.append(batch["label"])
        gts.append(batch["gt_mask"][:, 0])
        names += list(batch["name"])
        defects += list(batch["defect_type"])
    return ClassData(torch.cat(images), torch.cat(tokens), torch.cat(logps),
                     torch.cat(labels).numpy().astype(np.int64), torch.cat(gts),
                     names, defects)


def random_masks(n: int, num_patches: int, m: int, generator: torch.Generator) -> torch.Tensor:
    """m uniformly random patches per image, for images ProtoFlow calls normal."""
    order = torch.rand(n, num_patches, generator=generator).argsort(dim=1)  # (N, L)
    masks = torch.zeros(n, num_patches, dtype=torch.bool)
    masks.scatter_(1, order[:, :m], True)
    return masks


@torch.inference_mode()
def pmad_score_maps(model: torch.nn.Module, data: ClassData, masks: torch.Tensor,
                    abnormality_maps: torch.Tensor, sigma: float, batch_size: int,
                    device: torch.device, amp: str) -> torch.Tensor:
    """Masked-token cross-entropy, upsampled, times ProtoFlow's map, smoothed: (N, S, S)."""
    grid = model.patch_embed.grid_size
    size = data.images.shape[-1]
    out = []
    for i in range(0, len(data.images), batch_size):
        x = data.images[i:i + batch_size].to(device)
        with amp_autocast(device, amp):
            ce = patch_losses(model, x, data.tokens[i:i + batch_size].to(device),
                              masks[i:i + batch_size].to(device))
        ce = ce.float().view(-1, 1, *grid)  # (B, 1, 14, 14)
        up = F.interpolate(ce, size=(size, size), mode="bilinear", align_corners=True)
        out.append(up[:, 0].cpu() * abnormality_maps[i:i + batch_size])
    return gaussian_blur(torch.cat(out), sigma)


def evaluate_maps(data: ClassData, maps: torch.Tensor, pixel_maps: torch.Tensor | None = None
                  ) -> dict[str, float]:
    """The field's metric set for one class; image score = the map's maximum."""
    image_scores = maps.flatten(1).amax(dim=1)
    return metrics.compute_metrics(data.labels, image_scores.numpy(), data.gt_masks.numpy(),
                                   (maps if pixel_maps is None else pixel_maps).numpy())


def evaluate_class(model: torch.nn.Module, data: ClassData, class_name: str, *,
                   protocol: str, ratio: float | None, threshold: float | None,
                   sigma: float, batch_size: int, device: torch.device, amp: str,
                   seed: int) -> tuple[dict, dict[str, torch.Tensor]]:
    """Metrics of PMAD and of ProtoFlow's abnormality map alone for one class.

    Returns the result record and the final maps (for heatmaps).
    """
    num_patches = model.patch_embed.num_patches
    ratios = PAPER_RATIOS if protocol == "paper" else (ratio,)
    proposals = proposals_from_log_likelihood(
        data.log_likelihood, list(ratios), image_size=data.images.shape[-1],
        grid=tuple(model.patch_embed.grid_size))
    abnormality = proposals.abnormality_maps.float().cpu()  # (N, S, S)
    if protocol == "paper":
        # The published protocol: ProtoFlow's normal/anomalous call at the F1-optimal
        # threshold of the test labels.
        threshold = metrics.f1_optimal_threshold(data.labels, proposals.image_scores.numpy())
    if threshold is None:
        # A released ProtoFlow file stores no normal-data threshold: without test labels
        # the only label-free call is to give every image ProtoFlow's proposal mask.
        anomalous = torch.ones(len(data.labels), dtype=torch.bool)
    else:
        anomalous = torch.as_tensor(proposals.image_scores > threshold).cpu()  # (N,)
    generator = torch.Generator().manual_seed(seed)
    per_ratio, best_maps = {}, {}
    for r in ratios:
        m = num_masked(r, num_patches)
        masks = torch.where(anomalous[:, None], proposals.masks[r].cpu(),
                            random_masks(len(anomalous), num_patches, m, generator))
        maps = pmad_score_maps(model, data, masks, abnormality, sigma, batch_size, device,
                               amp)
        pixel_maps = gaussian_blur(maps, sigma) if protocol == "paper" else None
        per_ratio[r] = evaluate_maps(data, maps, pixel_maps)
        if protocol == "clean" or r == _best_ratio(per_ratio, "image_auroc"):
            best_maps["pmad"] = maps
    proto_maps = gaussian_blur(abnormality, sigma)
    record = {"num_images": len(data.labels), "num_anomalous": int(data.labels.sum()),
              "threshold": None if threshold is None else float(threshold),
              "called_anomalous": int(anomalous.sum()),
              "protoflow_only": evaluate_maps(data, proto_maps)}
    if protocol == "clean":
        record.update(per_ratio[ratio], mask_ratio=ratio)
    else:
        record["per_ratio"] = {f"{r:.2f}": v for r, v in per_ratio.items()}
        for key in METRIC_KEYS:
            best = _best_ratio(per_ratio, key)
            record[key] = per_ratio[best][key]
            record[f"{key}_ratio"] = best
        record["mask_ratio"] = record["image_auroc_ratio"]
    best_maps["protoflow"] = proto_maps
    return record, best_maps


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
        raise FileNotFoundError(f"{p} does not exist: see weights/README.md")
    found = sorted(p.glob(pattern))
    if len(found) != 1:
        raise FileNotFoundError(f"{p} holds {len(found)} files matching {pattern} "
                                f"({[f.name for f in found]}): name one with "
                                "--protoflow_weights")
    return str(found[0])


def format_table(results: dict, protocol: str) -> str:
    """A markdown table shaped like the README's, plus the field's other metrics."""
    head = ("| Category | Image/Pixel AUC | Pixel AUPRO | Image AP | Pixel AP | "
            "Image F1-max | Mask ratio |\n|:--|:--:|:--:|:--:|:--:|:--:|:--:|")
    rows = [f"Protocol: **{protocol}**", "", head]

    def row(name: str, r: dict) -> str:
        ratio = r.get("mask_ratio")
        return (f"| {name} | {r['image_auroc']:.3f}/{r['pixel_auroc']:.3f} | "
                f"{r['pixel_aupro']:.3f} | {r['image_ap']:.3f} | {r['pixel_ap']:.3f} | "
                f"{r['image_f1_max']:.3f} | {'' if ratio is None else f'{ratio:.2f}'} |")

    for name, r in results["classes"].items():
        rows.append(row(name.replace("_", " ").capitalize(), r))
    rows.append(row("**Mean**", results["mean"]))
    rows.append(row("*ProtoFlow map alone (mean)*", results["mean_protoflow_only"]))
    return "\n".join(rows)


def write_results(results: dict, output_dir: Path, protocol: str) -> str:
    output_dir.mkdir(parents=True, exist_ok=True)
    table = format_table(results, protocol)
    (output_dir / "results.json").write_text(json.dumps(results, indent=2, default=float))
    (output_dir / "results.md").write_text(table + "\n")
    with open(output_dir / "results.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["protocol", "class", "method", *METRIC_KEYS, "mask_ratio"])
        for name, r in list(results["classes"].items()) + [("mean", results["mean"])]:
            writer.writerow([protocol, name, "pmad", *(r[k] for k in METRIC_KEYS),
                             r.get("mask_ratio", "")])
        for name, r in results["classes"].items():
            p = r["protoflow_only"]
            writer.writerow([protocol, name, "protoflow_only", *(p[k] for k in METRIC_KEYS), ""])
    return table


def save_heatmaps(data: ClassData, maps: torch.Tensor, out_dir: Path, count: int,
                  mean: tuple[float, ...], std: tuple[float, ...]) -> None:
    """image | ground truth | score-map overlay, anomalous images spread over the defect
    types, then normal ones; one colour scale per class, so normal images look cool."""
    from PIL import Image
    import cv2

    out_dir.mkdir(parents=True, exist_ok=True)
    anomalous, normal = np.flatnonzero(data.labels == 1), np.flatnonzero(data.labels == 0)
    n_anomalous = min(len(anomalous), max(count - len(normal), (count + 1) // 2))
    picks = [anomalous[int(j)] for j in np.linspace(0, len(anomalous) - 1, n_anomalous)
             ] if n_anomalous else []
    picks += list(normal[: count - len(picks)])
    lo, hi = float(maps.min()), float(maps.max())
    for i in picks:
        img = data.images[i] * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
        img = (img.clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        gt = np.repeat((data.gt_masks[i].numpy() * 255).astype(np.uint8)[..., None], 3, 2)
        heat = ((maps[i].numpy() - lo) / max(hi - lo, 1e-12) * 255).astype(np.uint8)
        heat = cv2.applyColorMap(heat, cv2.COLORMAP_JET)[..., ::-1]
        overlay = (0.5 * img + 0.5 * heat).astype(np.uint8)
        Image.fromarray(np.concatenate([img, gt, overlay], axis=1)).save(
            out_dir / f"{data.names[i]}.png")


def mask_ratio_arg(text: str) -> float:
    """argparse type of a mask ratio: a fraction of the patches, strictly inside (0, 1)."""
    try:
        ratio = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 < ratio < 1.0:  # also refuses nan
        raise argparse.ArgumentTypeError(
            f"{text} is outside (0, 1): a mask ratio is the fraction of patches masked, "
            "e.g. 0.3 (the paper's Table 6 ratios lie between 0.04 and 0.48)")
    return ratio


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("PMAD evaluation", add_help=True)
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
    p.add_argument("--data_path", default="data/mvtec_anomaly_detection",
                   help="a folder in MVTec layout (MVTec AD, BTAD, MPDD, the demo set)")
    p.add_argument("--setting", default=None,
                   choices=["multi_class", "obj2tex", "tex2obj", "leave_one_out"])
    p.add_argument("--unseen_classes", nargs="*", default=None)
    p.add_argument("--from_obj_to_texture", action="store_true",
                   help="the original's switch: same as --setting obj2tex")
    p.add_argument("--classes", nargs="*", default=None, help="evaluate exactly these")
    p.add_argument("--protocol", default="clean", choices=["clean", "paper"])
    p.add_argument("--mask_ratio", type=mask_ratio_arg, default=None,
                   help="clean protocol: one ratio for every class (default: the "
                        "per-class ratios of the paper's Table 6, 0.3 for other classes)")
    p.add_argument("--default_mask_ratio", type=mask_ratio_arg, default=0.3)
    p.add_argument("--sigma", type=float, default=4.0)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--num_workers", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", default=None, choices=["bf16", "fp16", "none"],
                   help="autocast for the ViT (default: bf16 where supported)")
    p.add_argument("--output_dir", default="output_dir/test")
    p.add_argument("--save_heatmaps", type=int, default=0, metavar="N",
                   help="write N heatmap PNGs per class")
    p.add_argument("--skip_bad_images", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    amp = resolve_amp(args.amp, device)
    checkpoint = read_weights_file(args.ckpt)
    config, notes = modeling_pmad.resolve_eval_config(vars(args), checkpoint, args.ckpt)
    print("\n".join(f"[run_test] {note}" for note in notes))
    vars(args).update(config)
    mean, std = datasets.normalization(args.imagenet_default_mean_and_std)
    setting = datasets.resolve_setting(args.setting, args.from_obj_to_texture)
    root = Path(args.data_path)
    available = datasets.list_test_classes(str(root))
    if args.classes:
        unknown = sorted(set(args.classes) - set(available))
        if unknown:
            raise ValueError(f"classes {unknown} have no {root}/<class>/test folder; "
                             f"available: {available}")
        classes = list(args.classes)
    else:
        classes = datasets.setting_classes(setting, args.unseen_classes,
                                           available=available)[1]

    tokenizer = create_tokenizer(args.tokenizer_model, args.tokenizer_weight_path,
                                 device=str(device), amp=amp)
    vocab_size = modeling_pmad.checkpoint_vocab_size(checkpoint, args.ckpt)
    if vocab_size != tokenizer.vocab_size:
        raise ValueError(f"{args.ckpt} predicts {vocab_size} visual tokens but the "
                         f"{args.tokenizer_model} tokenizer {args.tokenizer_weight_path} has "
                         f"{tokenizer.vocab_size}: evaluate with the tokenizer it was trained on")
    model = modeling_pmad.build_pmad(args.model, vocab_size=vocab_size,
                                     img_size=args.input_size,
                                     init_values=args.layer_scale_init_value)
    modeling_pmad.load_checkpoint(model, args.ckpt, strict=True, checkpoint=checkpoint)
    del checkpoint
    model.to(device).eval()
    args.protoflow_weights = resolve_weights_file(args.protoflow_weights)
    # ProtoFlow is given the ViT's images and converts them to its own normalisation.
    protoflow = ProtoFlow(args.protoflow_weights, args.prototypes_dir, device=str(device),
                          encoder_weights=args.encoder_weights, input_normalization=(mean, std))
    img_size = model.patch_embed.img_size[0]
    if args.protocol == "clean" and protoflow.threshold is None:
        print(f"[run_test] {args.protoflow_weights} stores no threshold from normal images "
              "(a released file): every image gets ProtoFlow's proposal mask. `python "
              "protoflow.py train ...` writes a file with one.")

    results = {"protocol": args.protocol, "setting": setting, "classes": {},
               "args": vars(args), "amp": amp,
               "checkpoints": {"pmad": file_sha256(args.ckpt),
                               "protoflow": file_sha256(args.protoflow_weights),
                               "tokenizer": tokenizer.fingerprint},
               "versions": {"python": platform.python_version(), "torch": torch.__version__,
                            "timm": timm.__version__, "numpy": np.__version__}}
    out_dir = Path(args.output_dir)
    start = time.time()
    for class_name in tqdm(classes, desc=f"evaluating ({args.protocol} protocol)"):
        dataset = datasets.MVTecTestDataset(root, class_name, token_size=tokenizer.image_size,
                                            img_size=img_size, mean=mean, std=std,
                                            skip_bad_images=args.skip_bad_images)
        data = collect_class(dataset, tokenizer, protoflow, class_name, args.batch_size,
                             device, args.num_workers)
        ratio = args.mask_ratio or CLASS_MASK_RATIOS.get(class_name, args.default_mask_ratio)
        record, maps = evaluate_class(model, data, class_name, protocol=args.protocol,
                                      ratio=ratio, threshold=protoflow.threshold,
                                      sigma=args.sigma, batch_size=args.batch_size,
                                      device=device, amp=amp, seed=args.seed)
        results["classes"][class_name] = record
        if args.save_heatmaps:
            save_heatmaps(data, maps["pmad"], out_dir / "heatmaps" / class_name,
                          args.save_heatmaps, mean, std)
    results["mean"] = metrics.mean_metrics(results["classes"])
    results["mean_protoflow_only"] = metrics.mean_metrics(
        {c: r["protoflow_only"] for c, r in results["classes"].items()})
    results["seconds"] = time.time() - start
    table = write_results(results, out_dir, args.protocol)
    print(table)
    print(f"results: {out_dir / 'results.json'}, {out_dir / 'results.md'}, "
          f"{out_dir / 'results.csv'}"
          + (f"; heatmaps: {out_dir / 'heatmaps'}" if args.save_heatmaps else ""))
    return results


def exit_status(results: dict) -> int:
    """0 when every class was evaluated, else 1 (listed on stderr): a class fails when it
    is in results['failed'] or any of its metrics is not finite."""
    failed = list(results.get("failed", {})) + [
        name for name, record in results["classes"].items()
        if not all(math.isfinite(record.get(k, math.nan)) for k in METRIC_KEYS)]
    if failed:
        print(f"[run_test] failed classes: {', '.join(dict.fromkeys(failed))}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(exit_status(main(get_args_parser().parse_args())))
