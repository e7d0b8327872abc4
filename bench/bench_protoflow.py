"""ProtoFlow timings: coreset selection, proposals per second, and the mask-ratio sweep.

    python bench/bench_protoflow.py                    # 100k x 272 coreset, b6 + 8 blocks
    python bench/bench_protoflow.py --features 20000 --images 4   # a quick run

Ratios are against baselines measured in the same run: the coreset with a random
projection against the exact one, and a 24-ratio sweep from one pass against 24 passes.
Weights are random (timing only); nothing is downloaded.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np
import timm
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import protoflow as pf  # noqa: E402
import utils  # noqa: E402
from bench.timing import machine_line, timed  # noqa: E402
from backbones import create_backbone  # noqa: E402

RATIOS = [round(0.02 * i, 2) for i in range(1, 25)]


def bench_coreset(args, device: torch.device) -> None:
    g = torch.Generator().manual_seed(0)
    # clustered, non-negative like pooled CNN activations
    centers = torch.rand(500, args.dim, generator=g) * 4
    feats = (centers[torch.randint(0, 500, (args.features,), generator=g)]
             + torch.rand(args.features, args.dim, generator=g)).to(device)
    n = max(1, int(args.features * args.coreset_ratio))
    print(f"coreset: {args.features} x {args.dim} features -> {n} prototypes on {device}")
    base, idx = timed(lambda: pf.greedy_coreset(feats, n, device=device, progress=False), device)
    radius = pf.nearest_prototype(feats, feats[idx])[0].max().item()
    print(f"  exact            {base:8.2f} s  ({n / base:8.1f} picks/s)  covering radius "
          f"{radius:.3f}")
    for d in args.projection_dims:
        t, pidx = timed(lambda: pf.greedy_coreset(feats, n, projection_dim=d, device=device,
                                                  progress=False), device)
        r = pf.nearest_prototype(feats, feats[pidx])[0].max().item()
        print(f"  projection {d:4d}  {t:8.2f} s  speed-up x{base / t:5.2f}  covering radius "
              f"{r:.3f} (x{r / radius:.2f} the exact one's)")
    rand = torch.randperm(args.features, generator=g)[:n].to(device)
    r = pf.nearest_prototype(feats, feats[rand])[0].max().item()
    print(f"  random subset    covering radius {r:.3f} (x{r / radius:.2f})")


def make_model(args, folder: str, device: torch.device) -> pf.ProtoFlow:
    encoder = create_backbone(args.backbone, (2, 3))
    dim = sum(encoder.feature_info.channels())
    flow = pf.build_flow(dim, args.n_blocks, rng=np.random.default_rng(0))
    path = os.path.join(folder, "protoflow.pt")
    pf.save_protoflow(path, encoder, flow, backbone=args.backbone, out_indices=(2, 3),
                      classes=["bench"])
    protos = np.random.default_rng(0).standard_normal((args.prototypes, dim), np.float32)
    pf.save_prototypes(folder, "bench", np.abs(protos),
                       {"backbone": args.backbone, "out_indices": [2, 3]})
    return pf.ProtoFlow(path, folder, device=str(device))


def bench_proposals(args, device: torch.device) -> None:
    with tempfile.TemporaryDirectory() as folder:
        model = make_model(args, folder, device)
        images = torch.randn(args.images, 3, 224, 224, generator=torch.Generator().manual_seed(0))
        print(f"proposals: {args.backbone} + {args.n_blocks}-block flow, {args.images} images, "
              f"batch {args.batch_size}, {args.prototypes} prototypes, {device}")
        def masks(logp: torch.Tensor, ratios: list[float]) -> list[torch.Tensor]:
            proposals = pf.proposals_from_log_likelihood(logp)
            return [proposals.test_masks(r) for r in ratios]

        def propose(ratios: list[float]) -> list[torch.Tensor]:
            return masks(torch.cat([model.log_likelihood(b, "bench")
                                    for b in images.split(args.batch_size)]), ratios)

        propose(RATIOS[:1])  # warm-up
        one, _ = timed(lambda: propose(RATIOS), device)
        print(f"  one pass, 24 ratios   {one:8.2f} s  ({args.images / one:7.2f} images/s)")
        sweep, _ = timed(lambda: [propose([r]) for r in RATIOS], device)
        print(f"  24 passes, 1 ratio    {sweep:8.2f} s  -> one pass is x{sweep / one:5.1f} "
              "faster")
        logp = torch.randn(args.class_images, 28, 28)
        t, _ = timed(lambda: masks(logp, RATIOS), device)
        print(f"  masks + maps only ({args.class_images} precomputed logp maps, 24 ratios) "
              f"{t:6.3f} s")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser("bench_protoflow", description=__doc__.split("\n\n")[0])
    positive = utils.int_at_least(1)
    p.add_argument("--features", type=positive, default=100_000)
    p.add_argument("--dim", type=positive, default=272)
    p.add_argument("--coreset_ratio", type=utils.positive_float, default=0.01,
                   help="prototypes per feature, > 0 and at most 1")
    p.add_argument("--projection_dims", type=positive, nargs="*", default=[128, 64])
    p.add_argument("--backbone", default="tf_efficientnet_b6")
    p.add_argument("--n_blocks", type=positive, default=pf.DEFAULT_N_BLOCKS)
    p.add_argument("--prototypes", type=positive, default=1600)
    p.add_argument("--images", type=positive, default=8)
    p.add_argument("--batch_size", type=positive, default=8)
    p.add_argument("--class_images", type=positive, default=400,
                   help="set size for the masks-and-maps step alone")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--skip", nargs="*", default=[], choices=["coreset", "proposals"])
    args = p.parse_args(argv)
    if args.coreset_ratio > 1:
        p.error(f"--coreset_ratio {args.coreset_ratio}: at most 1 (every feature a prototype)")
    if "proposals" not in args.skip and not timm.is_model(args.backbone):
        p.error(f"--backbone {args.backbone}: not a timm model name (e.g. tf_efficientnet_b6)")
    try:
        device = utils.resolve_device(args.device)
    except utils.FlagError as e:
        p.error(str(e))
    print(machine_line())
    if "coreset" not in args.skip:
        bench_coreset(args, device)
    if "proposals" not in args.skip:
        bench_proposals(args, device)


if __name__ == "__main__":
    main()
