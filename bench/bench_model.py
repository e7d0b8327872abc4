"""Speed of the reconstruction ViT: SDPA attention against the explicit-softmax baseline.

Both variants run in this one process on the same model (`Attention.fused_attn`), so the
ratio compares like with like. Forward = eval-mode masked-token logits; train step =
forward + masked cross-entropy + backward + AdamW. CPU: batch 4 in fp32 and bf16
autocast. CUDA (when present): bf16 autocast at batches 4, 32, 128.

    python bench/bench_model.py [--iters 10] [--warmup 2] [--devices cpu cuda]
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import time
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import timm  # noqa: E402

from modeling_pmad import set_fused_attn  # noqa: E402  (registers the models with timm)

MASK_RATIO = 0.4


def make_batch(batch: int, num_patches: int, vocab: int, device: torch.device,
               gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    images = torch.randn(batch, 3, 224, 224, generator=gen).to(device)  # (N, 3, 224, 224)
    m = int(num_patches * MASK_RATIO)
    order = torch.rand(batch, num_patches, generator=gen).argsort(dim=1)
    mask = torch.zeros(batch, num_patches, dtype=torch.bool)
    mask.scatter_(1, order[:, :m], True)  # (N, L), m masked per image
    targets = torch.randint(vocab, (batch * m,), generator=gen)  # (M,)
    return images, mask.to(device), targets.to(device)


def timed(fn: Callable[[], None], iters: int, warmup: int, device: torch.device
          ) -> tuple[float, float | None]:
    """Seconds per call, and peak CUDA memory in GiB over the timed calls (None on CPU)."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - start) / iters
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
    return seconds, peak


def bench_device(model_name: str, device: torch.device, precisions: list[str],
                 batches: list[int], iters: int, warmup: int) -> Iterator[dict]:
    """One result row per (precision, batch, step), as soon as it is measured."""
    model = timm.create_model(model_name, pretrained=False, drop_path_rate=0.1,
                              use_shared_rel_pos_bias=True, use_abs_pos_emb=False,
                              init_values=0.1).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1.5e-3, weight_decay=0.05)
    gen = torch.Generator().manual_seed(0)
    for precision in precisions:
        autocast = torch.autocast(device.type, dtype=torch.bfloat16,
                                  enabled=precision == "bf16")
        for batch in batches:
            images, mask, targets = make_batch(batch, model.patch_embed.num_patches,
                                               model.vocab_size, device, gen)

            @torch.no_grad()
            def forward() -> None:
                with autocast:
                    model(images, mask)  # (M, V)

            def train_step() -> None:
                with autocast:
                    logits = model(images, mask)  # (M, V)
                loss = F.cross_entropy(logits.float(), targets)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()

            for step, fn, train in (("forward", forward, False), ("train", train_step, True)):
                model.train(train)
                result = {}
                for attention in ("sdpa", "explicit"):
                    set_fused_attn(model, attention == "sdpa")
                    try:
                        result[attention] = timed(fn, iters, warmup, device)
                    except torch.OutOfMemoryError:  # the explicit baseline may not fit
                        optimizer.zero_grad(set_to_none=True)
                        torch.cuda.empty_cache()
                        result[attention] = None
                set_fused_attn(model, True)
                yield dict(device=device.type, precision=precision, batch=batch, step=step,
                           result=result,
                           max_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                           / 2 ** 20)


HEADER = (f"{'device':6} {'prec':4} {'batch':>5} {'step':8} {'sdpa img/s':>11} "
          f"{'explicit img/s':>15} {'speed-up':>9} {'peak GiB sdpa/expl':>19} "
          f"{'max RSS GiB':>11}")


def format_row(r: dict) -> str:
    """Out-of-memory variants show as 'OOM'."""
    sdpa, expl = r["result"]["sdpa"], r["result"]["explicit"]
    speed = [f"{r['batch'] / res[0]:.2f}" if res else "OOM" for res in (sdpa, expl)]
    ratio = f"{expl[0] / sdpa[0]:.2f}x" if sdpa and expl else "n/a"
    memory = "n/a" if r["device"] == "cpu" else "/".join(
        f"{res[1]:.2f}" if res else "OOM" for res in (sdpa, expl))
    return (f"{r['device']:6} {r['precision']:4} {r['batch']:>5} {r['step']:8} "
            f"{speed[0]:>11} {speed[1]:>15} {ratio:>9} {memory:>19} "
            f"{r['max_rss_gib']:>11.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_base_patch16_224_8k_vocab")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--devices", nargs="+", default=["cpu", "cuda"],
                        choices=["cpu", "cuda"], help="cuda is skipped when absent")
    parser.add_argument("--cpu-batch", type=int, default=4)
    parser.add_argument("--cuda-batches", type=int, nargs="+", default=[4, 32, 128])
    args = parser.parse_args()

    print(f"torch {torch.__version__}, timm {timm.__version__}, {args.model}, "
          f"{args.iters} timed iterations after {args.warmup} warm-up, mask ratio {MASK_RATIO}")
    print(f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"{torch.get_num_threads()} torch threads")
    runs = []
    if "cpu" in args.devices:
        runs.append((torch.device("cpu"), ["fp32", "bf16"], [args.cpu_batch]))
    if "cuda" in args.devices and torch.cuda.is_available():
        print(f"GPU: {torch.cuda.get_device_name()}")
        runs.append((torch.device("cuda"), ["bf16"], args.cuda_batches))
    elif "cuda" in args.devices:
        print("CUDA: not available, skipped")
    print(HEADER, "-" * len(HEADER), sep="\n", flush=True)
    for device, precisions, batches in runs:
        for row in bench_device(args.model, device, precisions, batches, args.iters,
                                args.warmup):
            print(format_row(row), flush=True)
    print("speed-up = explicit-softmax time / SDPA time; peak GiB: CUDA allocator peak per "
          "variant; max RSS: this process's high-water mark so far (CPU)")


if __name__ == "__main__":
    main()
