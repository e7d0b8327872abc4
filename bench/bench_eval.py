"""Evaluation speed: each protocol against the same work done the original code's way, all
in one run, interleaved.

    python bench/bench_eval.py                 # ViT-B, DALL-E, b6 ProtoFlow, 2 images
    python bench/bench_eval.py --images 8 --batch_size 8 --repeats 5

Rows (ours / baseline, median of --repeats interleaved rounds, after one clean-protocol
call of each side as a warm-up):
- paper protocol, 24 mask ratios: tokens and ProtoFlow once per image, batched ViT with
  fused attention, then maps and metrics (`protocols.evaluate_paper`), against the
  original's loop: for every ratio and image, tokens and ProtoFlow again, the ViT at
  batch 1 with explicit-softmax attention, each map smoothed by scipy, then the metrics.
- clean protocol, one ratio (its covering passes): `protocols.evaluate_clean` against the
  same loop over the passes.
  Ours also scores the baseline rows (ProtoFlow alone, PatchCore, CE alone) and smooths
  the paper protocol's maps a second time, which the baseline skips: the speed-ups of
  these two rows are lower bounds.
- map smoothing, `--maps` maps: `protocols.gaussian_blur` (one grouped convolution)
  against scipy.ndimage.gaussian_filter map by map.

Weights are random in the released formats (timing only); nothing is downloaded.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from typing import Callable

import numpy as np
import timm
import torch
from scipy import ndimage

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import metrics  # noqa: E402
import protoflow as pf  # noqa: E402
import protocols  # noqa: E402
import utils  # noqa: E402
from bench.timing import machine_line, median_seconds  # noqa: E402
from backbones import create_backbone  # noqa: E402
from engine import masked_token_ce, scatter_masked  # noqa: E402
from masking_generator import DEFAULT_MASK_RATIO, num_masked  # noqa: E402
from modeling_discrete_vae import DalleEncoder, create_tokenizer, save_dalle_encoder  # noqa: E402
from modeling_pmad import set_fused_attn  # noqa: E402

SIGMA = 4.0


def build(tmp: str, args: argparse.Namespace, amp: str) -> tuple:
    """A DALL-E tokenizer, the ViT and a ProtoFlow of class 'c', all random."""
    torch.manual_seed(0)
    save_dalle_encoder(DalleEncoder(), os.path.join(tmp, "encoder.pkl"))
    tokenizer = create_tokenizer("dall-e", tmp, device=args.device, amp=amp)
    model = timm.create_model(args.model, pretrained=False).to(args.device).eval()
    encoder = create_backbone(args.encoder, (2, 3))
    dim = sum(encoder.feature_info.channels())
    pf.save_protoflow(os.path.join(tmp, "pf.pt"), encoder, pf.build_flow(dim),
                      backbone=args.encoder, out_indices=(2, 3), classes=["c"],
                      normal_scores=torch.tensor([1.0, 2.0]))
    os.makedirs(os.path.join(tmp, "protos", "c"))
    np.save(os.path.join(tmp, "protos", "c", pf.CORESET_FILE),
            np.random.default_rng(0).random((1000, dim), dtype=np.float32))
    protoflow = pf.ProtoFlow(os.path.join(tmp, "pf.pt"), os.path.join(tmp, "protos"),
                             device=args.device)
    return tokenizer, model, protoflow


def scipy_blur(maps: torch.Tensor) -> torch.Tensor:
    """The original's smoothing: scipy's gaussian_filter, one map at a time."""
    return torch.from_numpy(np.stack([ndimage.gaussian_filter(m, SIGMA, mode="reflect",
                                                              truncate=4.0)
                                      for m in maps.numpy()]))


def median_times(rows: dict[str, tuple[Callable[[], None], Callable[[], None]]],
                 repeats: int, device: torch.device) -> dict[str, tuple[float, float]]:
    """Row -> (ours, baseline) median seconds over `repeats` interleaved rounds."""
    seconds = median_seconds({(name, side): fn for name, fns in rows.items()
                              for side, fn in enumerate(fns)}, repeats, 0, device)
    return {name: (seconds[name, 0], seconds[name, 1]) for name in rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vit_base_patch16_224_8k_vocab")
    p.add_argument("--encoder", default="tf_efficientnet_b6")
    p.add_argument("--images", type=utils.int_at_least(2), default=2)
    p.add_argument("--batch_size", type=utils.int_at_least(1), default=32)
    p.add_argument("--maps", type=utils.int_at_least(1), default=40,
                   help="maps of the smoothing row (a class's test set)")
    p.add_argument("--repeats", type=utils.int_at_least(1), default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", default=None, choices=utils.AMP_CHOICES)
    args = p.parse_args()
    for flag, name in (("--model", args.model), ("--encoder", args.encoder)):
        if not timm.is_model(name):
            p.error(f"{flag} {name}: not a registered timm model name")
    try:
        device = utils.resolve_device(args.device)
    except utils.FlagError as e:
        p.error(str(e))
    amp = utils.resolve_amp(args.amp, device)
    print(machine_line(), flush=True)  # before the run: its load average is not our own
    g = torch.Generator().manual_seed(0)
    images = torch.randn(args.images, 3, 224, 224, generator=g)
    token_images = torch.rand(args.images, 3, 112, 112, generator=g)
    labels = np.array([i % 2 for i in range(args.images)])
    gts = torch.zeros(args.images, 224, 224)
    gts[labels == 1, 100:140, 100:140] = 1
    maps = torch.rand(args.maps, 224, 224, generator=g)

    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        tokenizer, model, protoflow = build(tmp, args, amp)
        grid = tuple(model.patch_embed.grid_size)

        def ours(protocol: str) -> None:
            tokens = torch.cat([tokenizer.get_codebook_indices(t.to(device)).cpu()
                                for t in token_images.split(args.batch_size)])
            logp, dist = (torch.cat(t) for t in zip(*[protoflow.scores(x, "c")
                                                      for x in images.split(args.batch_size)]))
            data = protocols.ClassData(images, tokens, logp, dist, labels, gts,
                                       defect_types=["good" if y == 0 else "bad"
                                                     for y in labels],
                                       image_ids=[str(i) for i in range(args.images)])
            common = dict(sigma=SIGMA, batch_size=args.batch_size, device=device, amp=amp,
                          seed=0)
            if protocol == "paper":
                protocols.evaluate_paper(model, data, **common)
            else:
                protocols.evaluate_clean(model, data, ratio=DEFAULT_MASK_RATIO, threshold=None,
                                         options=protocols.CleanOptions(), **common)

        def original(protocol: str) -> None:
            """Per pass, per image: tokens and ProtoFlow again (the image's mask from its
            recomputed proposal), the ViT at batch 1 with explicit attention; the maps
            smoothed by scipy, then scored (the paper protocol: every ratio)."""
            paper = protocol == "paper"
            num_patches = model.patch_embed.num_patches
            n_passes = (len(protocols.PAPER_RATIOS) if paper else
                        -(-num_patches // num_masked(DEFAULT_MASK_RATIO, num_patches)))
            logp = torch.cat([protoflow.log_likelihood(images[i:i + 1], "c")
                              for i in range(args.images)])
            abnormality = pf.proposals_from_log_likelihood(logp, grid=grid).abnormality_maps
            abnormality = abnormality.cpu()  # (N, S, S), normalised over the set

            def image_mask(i: int, k: int) -> torch.Tensor:  # (1, L) pass k's mask
                prop = pf.proposals_from_log_likelihood(
                    protoflow.log_likelihood(images[i:i + 1], "c"), grid=grid)
                if paper:
                    return prop.test_masks(protocols.PAPER_RATIOS[k])
                return pf.covering_masks(prop.test_ranks(), DEFAULT_MASK_RATIO)[k]

            def score(ce: torch.Tensor) -> None:  # ce (N, L)
                m = scipy_blur(protocols.upsample(ce, grid, 224) * abnormality)
                metrics.compute_metrics(labels, m.flatten(1).amax(1).numpy(), gts.numpy(),
                                        m.numpy())

            set_fused_attn(model, False)
            total = torch.zeros(args.images, num_patches)
            for k in range(n_passes):
                ce = []
                for i in range(args.images):
                    tokens = tokenizer.get_codebook_indices(token_images[i:i + 1].to(device))
                    m = image_mask(i, k).to(device)  # (1, L)
                    with utils.amp_autocast(device, amp):
                        loss, _ = masked_token_ce(model, images[i:i + 1].to(device), tokens, m)
                    ce.append(scatter_masked(loss, m).cpu())
                if paper:
                    score(torch.cat(ce))
                else:
                    total += torch.cat(ce)
            if not paper:
                score(total)
            set_fused_attn(model, True)

        ours("clean")  # warm-up, each side: the first call of a code path pays its set-up
        original("clean")
        rows = {
            "paper protocol (24 ratios)": (lambda: ours("paper"), lambda: original("paper")),
            f"clean protocol (r={DEFAULT_MASK_RATIO})": (lambda: ours("clean"),
                                                         lambda: original("clean")),
            f"map smoothing ({args.maps} maps)": (
                lambda: protocols.gaussian_blur(maps, SIGMA), lambda: scipy_blur(maps)),
        }
        times = median_times(rows, args.repeats, device)
    print(f"{args.model} + DALL-E + {args.encoder} ProtoFlow, {args.images} images, "
          f"batch {args.batch_size}, {device}, amp {amp}, "
          f"{num_masked(DEFAULT_MASK_RATIO, model.patch_embed.num_patches)} masked patches at "
          f"r={DEFAULT_MASK_RATIO}, median of {args.repeats}")
    print(f"{'':30s} {'ours s':>9s} {'baseline s':>11s} {'speed-up':>9s}")
    for name, (t, base) in times.items():
        print(f"{name:30s} {t:9.3f} {base:11.3f} {base / t:8.2f}x")


if __name__ == "__main__":
    main()
