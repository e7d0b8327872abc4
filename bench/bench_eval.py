"""Evaluation speed: the clean protocol and the paper's 24-ratio sweep, against a baseline
that recomputes tokens and ProtoFlow for every ratio at batch 1 with explicit-softmax
attention (as the original code does), all in one run.

    python bench/bench_eval.py                 # ViT-B, DALL-E, b6 ProtoFlow, 2 images
    python bench/bench_eval.py --images 8 --batch_size 8

Weights are random in the released formats (timing only); nothing is downloaded.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import timm
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import protoflow as pf  # noqa: E402
import protocols  # noqa: E402
import utils  # noqa: E402
from backbones import create_backbone  # noqa: E402
from engine import patch_losses  # noqa: E402
from masking_generator import num_masked  # noqa: E402
from modeling_discrete_vae import DalleEncoder, create_tokenizer, save_dalle_encoder  # noqa: E402
from modeling_pmad import set_fused_attn  # noqa: E402


def build(tmp: str, args, amp: str) -> tuple:
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vit_base_patch16_224_8k_vocab")
    p.add_argument("--encoder", default="tf_efficientnet_b6")
    p.add_argument("--images", type=int, default=2)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", default=None, choices=utils.AMP_CHOICES)
    args = p.parse_args()
    device = torch.device(args.device)
    amp = utils.resolve_amp(args.amp, device)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(args.images, 3, 224, 224, generator=g)
    token_images = torch.rand(args.images, 3, 112, 112, generator=g)
    labels = np.array([i % 2 for i in range(args.images)])
    gts = torch.zeros(args.images, 224, 224)
    gts[labels == 1, 100:140, 100:140] = 1

    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        tokenizer, model, protoflow = build(tmp, args, amp)
        num_patches = model.patch_embed.num_patches

        def ours(protocol: str) -> None:
            tokens = torch.cat([tokenizer.get_codebook_indices(t.to(device)).cpu()
                                for t in token_images.split(args.batch_size)])
            logp, dist = (torch.cat(t) for t in zip(*[protoflow.scores(x, "c")
                                                      for x in images.split(args.batch_size)]))
            data = protocols.ClassData(images, tokens, logp, dist, labels, gts,
                                      defect_types=["good" if y == 0 else "bad" for y in labels])
            common = dict(sigma=4.0, batch_size=args.batch_size, device=device, amp=amp,
                          seed=0)
            if protocol == "paper":
                protocols.evaluate_paper(model, data, **common)
            else:
                protocols.evaluate_clean(model, data, ratio=0.3, threshold=protoflow.threshold,
                                        options=protocols.CleanOptions(), **common)

        def baseline() -> None:
            set_fused_attn(model, False)
            for r in protocols.PAPER_RATIOS:
                for i in range(args.images):
                    tokens = tokenizer.get_codebook_indices(token_images[i:i + 1].to(device))
                    logp = protoflow.log_likelihood(images[i:i + 1], "c")
                    prop = pf.proposals_from_log_likelihood(logp)
                    with utils.amp_autocast(device, amp):
                        patch_losses(model, images[i:i + 1].to(device), tokens,
                                     prop.test_masks(r).to(device))
            set_fused_attn(model, True)

        ours("clean")  # warm-up
        rows = []
        for name, fn in (("clean protocol (1 ratio)", lambda: ours("clean")),
                         ("paper sweep (24 ratios), ours", lambda: ours("paper")),
                         ("paper sweep, recomputing baseline", baseline)):
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            rows.append((name, time.perf_counter() - start))
    base = rows[-1][1]
    print(f"{args.model} + DALL-E + {args.encoder} ProtoFlow, {args.images} images, "
          f"batch {args.batch_size}, {device}, amp {amp}, {torch.get_num_threads()} threads, "
          f"{num_masked(0.3, num_patches)} masked patches at r=0.3")
    print(f"{'':36s} {'s/image':>9s} {'images/s':>9s} {'vs baseline':>12s}")
    for name, t in rows:
        print(f"{name:36s} {t / args.images:9.2f} {args.images / t:9.3f} {base / t:11.2f}x")


if __name__ == "__main__":
    main()
