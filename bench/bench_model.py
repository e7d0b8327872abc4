"""Speed of the reconstruction ViT against the original PMAD/BEiT network, in one run.

Baseline: bench/original_beit.py, the published code's computation (explicit softmax
attention with the fp32 relative bias, cat'ed q/v bias, timm-0.3 DropPath/Mlp), loaded
with our model's state dict; the script first checks that both give the same logits and
gradients. Steps: eval forward (masked-token logits under inference_mode) and train step
(forward + masked cross-entropy + backward + AdamW, one identical AdamW per model). CPU:
fp32 and bf16 autocast; CUDA (when present): bf16 at --cuda-batches. The variants are
timed interleaved, in alternating order, and each figure is a median.

The "layer share" column is the fraction of the baseline's time in the products of its
linear layers and patch embedding (torch.profiler, one extra call): any implementation of
this network computes the same products, so with the same kernels 1 / (layer share)
bounds its speed-up ("bound"). Attention's products are not counted: kernels differ there.

    python bench/bench_model.py [--model vit_tiny_patch16_224_8k_vocab] [--cpu-batch 8]
        [--reps 7] [--threads 1] [--compile] [--devices cpu cuda]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import timm  # noqa: E402

import modeling_pmad  # noqa: E402, F401  (registers the models with timm)
import utils  # noqa: E402
from bench.timing import machine_line, median_seconds  # noqa: E402
from bench.original_beit import OriginalViT  # noqa: E402

MASK_RATIO = 0.4
# Leaf ops of nn.Linear / F.linear and of the patch convolution, forward and backward
# (attention's products run as bmm: not listed).
LAYER_OPS = ("aten::mm", "aten::addmm", "aten::mkldnn_convolution",
             "aten::_slow_conv2d_forward", "aten::_slow_conv2d_backward",
             "aten::convolution_backward", "aten::cudnn_convolution")


def build_pair(model_name: str, device: torch.device) -> tuple[torch.nn.Module, OriginalViT]:
    """Our model with non-trivial weights and the baseline holding the same state dict."""
    torch.manual_seed(0)
    ours = timm.create_model(model_name, pretrained=False, drop_path_rate=0.1)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # biases, gammas and the bias table start constant
        for p in ours.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
    blk = ours.blocks[0]
    original = OriginalViT(img_size=ours.patch_embed.img_size[0],
                           patch_size=ours.patch_embed.patch_size[0],
                           vocab_size=ours.vocab_size, embed_dim=ours.embed_dim,
                           depth=len(ours.blocks), num_heads=blk.attn.num_heads,
                           mlp_ratio=blk.mlp.fc1.out_features / ours.embed_dim,
                           drop_path_rate=0.1, init_values=0.1)
    original.load_state_dict(ours.state_dict(), strict=True)
    return ours.to(device), original.to(device)


def make_batch(batch: int, num_patches: int, vocab: int, device: torch.device,
               gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    images = torch.randn(batch, 3, 224, 224, generator=gen).to(device)  # (N, 3, 224, 224)
    m = int(num_patches * MASK_RATIO)
    order = torch.rand(batch, num_patches, generator=gen).argsort(dim=1)
    mask = torch.zeros(batch, num_patches, dtype=torch.bool)
    mask.scatter_(1, order[:, :m], True)  # (N, L), m masked per image
    targets = torch.randint(vocab, (batch * m,), generator=gen)  # (M,)
    return images, mask.to(device), targets.to(device)


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def check_same_network(ours: torch.nn.Module, original: OriginalViT, device: torch.device
                       ) -> tuple[float, float]:
    """fp32, eval mode: max relative difference of the masked-token logits (with
    gradients and under inference_mode: our model runs different attention kernels) and
    of all parameter gradients. Raises when above 1e-4."""
    images, mask, targets = make_batch(2, ours.patch_embed.num_patches, ours.vocab_size,
                                       device, torch.Generator().manual_seed(1))
    results = []
    for model in (ours, original):
        model.eval().zero_grad(set_to_none=True)
        with torch.inference_mode():
            inference = model(images, mask)  # (M, V)
        logits = model(images, mask)
        F.cross_entropy(logits, targets).backward()
        results.append((inference, logits.detach(), dict(model.named_parameters())))
        model.train()
    (ours_inf, ours_logits, ours_params), (orig_inf, orig_logits, orig_params) = results
    logit_diff = max(max_rel_diff(ours_logits, orig_logits), max_rel_diff(ours_inf, orig_inf))
    grad_diff = max(max_rel_diff(p.grad, orig_params[name].grad)
                    for name, p in ours_params.items())
    ours.zero_grad(set_to_none=True)
    original.zero_grad(set_to_none=True)
    if logit_diff > 1e-4 or grad_diff > 1e-4:
        raise AssertionError(f"the baseline is not the same network: logits differ by "
                             f"{logit_diff:.2e}, gradients by {grad_diff:.2e} (relative)")
    return logit_diff, grad_diff


def layer_share(fn: Callable[[], None], device: torch.device) -> float:
    """Fraction of one call's time spent in LAYER_OPS (CUDA: their kernels' time)."""
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        fn()
    events = prof.key_averages()
    if cuda:
        total = sum(e.self_device_time_total for e in events)
        part = sum(e.device_time_total for e in events if e.key in LAYER_OPS)
    else:
        total = sum(e.self_cpu_time_total for e in events)
        part = sum(e.self_cpu_time_total for e in events if e.key in LAYER_OPS)
    return part / total if total else float("nan")


def bench_device(model_name: str, device: torch.device, precisions: list[str],
                 batches: list[int], reps: int, warmup: int, compile_: bool,
                 clock: Callable[[], float]) -> Iterator[dict]:
    """One result row per (precision, batch, step), as soon as it is measured."""
    ours, original = build_pair(model_name, device)
    logit_diff, grad_diff = check_same_network(ours, original, device)
    print(f"same network ({device.type}, fp32): logits within {logit_diff:.1e}, "
          f"gradients within {grad_diff:.1e} (max relative difference)", flush=True)
    models = {"original": original, "ours": ours}
    if compile_:
        models["compiled"] = torch.compile(ours)
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-4, weight_decay=0.05)
                  for name, m in models.items() if name != "compiled"}
    optimizers["compiled"] = optimizers["ours"]
    gen = torch.Generator().manual_seed(0)
    for precision in precisions:
        for batch in batches:
            images, mask, targets = make_batch(batch, ours.patch_embed.num_patches,
                                               ours.vocab_size, device, gen)

            def step_fn(name: str, train: bool) -> Callable[[], None]:
                model, optimizer = models[name], optimizers[name]

                def autocast() -> torch.autocast:
                    return torch.autocast(device.type, dtype=torch.bfloat16,
                                          enabled=precision == "bf16")

                def forward() -> None:
                    with torch.inference_mode(), autocast():
                        model(images, mask)  # (M, V)

                def train_step() -> None:
                    with autocast():
                        logits = model(images, mask)  # (M, V)
                    loss = F.cross_entropy(logits.float(), targets)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()

                return train_step if train else forward

            for step, train in (("forward", False), ("train", True)):
                for model in models.values():
                    model.train(train)
                fns = {name: step_fn(name, train) for name in models}
                seconds = median_seconds(fns, reps, warmup, device, clock)
                share = layer_share(fns["original"], device)
                yield dict(device=device.type, precision=precision, batch=batch, step=step,
                           seconds=seconds, layer_share=share)


def format_header(compile_: bool) -> str:
    head = (f"{'device':6} {'prec':4} {'batch':>5} {'step':7} {'original img/s':>14} "
            f"{'ours img/s':>10} {'speed-up':>8}")
    if compile_:
        head += f" {'compiled img/s':>14} {'speed-up':>8}"
    return head + f" {'layer share':>11} {'bound':>6}"


def format_row(r: dict) -> str:
    """One table row; the bound is 'n/a' when no profiled op matched LAYER_OPS (a layer
    share of 0 or nan: a torch that renamed the ops), rather than a ZeroDivisionError
    that would end the run after its timings."""
    s = r["seconds"]
    row = (f"{r['device']:6} {r['precision']:4} {r['batch']:>5} {r['step']:7} "
           f"{r['batch'] / s['original']:>14.2f} {r['batch'] / s['ours']:>10.2f} "
           f"{s['original'] / s['ours']:>7.2f}x")
    if "compiled" in s:
        row += (f" {r['batch'] / s['compiled']:>14.2f} "
                f"{s['original'] / s['compiled']:>7.2f}x")
    share = r["layer_share"]
    bound = f"{1 / share:>5.2f}x" if share > 0 else f"{'n/a':>6}"
    return row + f" {share:>11.0%} {bound}"


def bf16_summary(rows: list[dict]) -> str | None:
    """One line: our model's CPU speed with bf16 autocast against fp32, per step, from
    the rows measured in this run (> 1: bf16 is faster here); None without both."""
    cpu = {(r["precision"], r["step"]): r["seconds"]["ours"] for r in rows
           if r["device"] == "cpu"}
    steps = [s for s in ("forward", "train") if ("fp32", s) in cpu and ("bf16", s) in cpu]
    if not steps:
        return None
    return ("CPU bf16 autocast against fp32 (ours, measured here): "
            + ", ".join(f"{s} {cpu['fp32', s] / cpu['bf16', s]:.2f}x" for s in steps)
            + " (> 1: bf16 is faster on this CPU)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_base_patch16_224_8k_vocab")
    parser.add_argument("--reps", type=utils.int_at_least(1), default=7,
                        help="timed calls per variant")
    parser.add_argument("--warmup", type=utils.int_at_least(0), default=1)
    parser.add_argument("--threads", type=utils.int_at_least(1), default=None,
                        help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="cpu: this process's CPU time, steadier than wall time on a "
                             "machine shared with other jobs (CPU only, with --threads 1)")
    parser.add_argument("--compile", action="store_true",
                        help="also time torch.compile of our model")
    parser.add_argument("--devices", nargs="+", default=["cpu", "cuda"],
                        choices=["cpu", "cuda"], help="cuda is skipped when absent")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"],
                        choices=["fp32", "bf16"], help="CPU precisions")
    parser.add_argument("--cpu-batch", type=utils.int_at_least(1), default=4)
    parser.add_argument("--cuda-batches", type=utils.int_at_least(1), nargs="+",
                        default=[4, 32, 128])
    args = parser.parse_args()
    if not timm.is_model(args.model):
        parser.error(f"--model {args.model}: not a registered model (e.g. "
                     "vit_tiny_patch16_224_8k_vocab)")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu" and (torch.get_num_threads() != 1 or "cuda" in args.devices
                                and torch.cuda.is_available()):
        parser.error("--clock cpu measures one CPU thread: add --threads 1 and --devices cpu")
    clock = time.process_time if args.clock == "cpu" else time.perf_counter

    print(machine_line())
    cpu_amp = "bf16" if modeling_pmad.bf16_supported("cpu") else "none"
    print(f"{args.model}, median of {args.reps} interleaved calls after {args.warmup} "
          f"warm-up, {args.clock} clock, mask ratio {MASK_RATIO}; --amp default on this CPU: "
          f"{cpu_amp} (bf16 only with AMX tiles; the bf16 rows below measure it here)")
    runs = []
    if "cpu" in args.devices:
        runs.append((torch.device("cpu"), args.precisions, [args.cpu_batch]))
    if "cuda" in args.devices and torch.cuda.is_available():
        runs.append((torch.device("cuda"), ["bf16"], args.cuda_batches))
    elif "cuda" in args.devices:
        print("CUDA: not available, skipped")
    header = format_header(args.compile)
    measured = []
    for device, precisions, batches in runs:
        rows = bench_device(args.model, device, precisions, batches, args.reps,
                            args.warmup, args.compile, clock)
        for i, row in enumerate(rows):
            if i == 0:
                print(header, "-" * len(header), sep="\n")
            print(format_row(row), flush=True)
            measured.append(row)
    summary = bf16_summary(measured)
    if summary:
        print(summary)
    print("speed-up = original time / ours; bound = 1 / layer share: the most any "
          "implementation can gain that computes the linear layers with the same kernels")


if __name__ == "__main__":
    main()
