"""The checks of bench/gpu_check.sh: one GPU path each, one line of output each.

  python bench/gpu_check.py CHECK [--peak_tflops T] [--workdir DIR]
  python bench/gpu_check.py --dry-run all     # every check's CPU part, for CI

A check prints 'PASS <name>: <figures>' and exits 0, or raises (exit 1). With
--dry-run a check runs what it can on the CPU with tiny sizes, or builds and parses its
command lines without running them, so that CI keeps this script working where no
GPU is.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
import engine  # noqa: E402
import metrics  # noqa: E402
import modeling_pmad  # noqa: E402,F401  (registers the ViTs)
import run_pretraining  # noqa: E402
import run_test  # noqa: E402
import utils  # noqa: E402
from masking_generator import MaskGenerator, MaskingPolicy  # noqa: E402

CHECKS = ("train_bf16", "fp16_scaler", "sync_free", "attention_grads", "dalle_tokens",
          "image_cache", "run_test", "torchrun")
# dense bf16 tensor-core peak (TFLOP/s, no sparsity) by a substring of the device name
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0,
                    "L40S": 362.0, "A10": 125.0, "4090": 165.0}
VIT_B = dict(depth=12, dim=768, patch=16, image=224)


def vit_forward_flops(depth: int, dim: int, patch: int, image: int) -> float:
    """Forward FLOPs (2 per multiply-add) of a ViT on one image: patch embedding, then
    per block qkv + projection + MLP (12 D^2 per token) and attention (2 T^2 D); the
    masked-token head is left out (its size depends on the mask). ViT-B/16: 35.1 G."""
    patches = (image // patch) ** 2
    tokens = patches + 1
    macs = patches * 3 * patch * patch * dim + depth * (12 * tokens * dim ** 2
                                                        + 2 * tokens ** 2 * dim)
    return 2.0 * macs


def peak_tflops(name: str, given: float | None) -> float | None:
    if given:
        return given
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    return None


def train(model_name: str, batch_size: int, steps: int, amp: str, device: torch.device,
          wrap=None, dry_run: bool = False) -> tuple[float, dict]:
    """(images/s of `steps` timed steps after 2 warm-up steps, the epoch's metrics);
    `wrap(policy)` runs between the warm-up and the timed epoch."""
    torch.manual_seed(0)
    small = dict(depth=2, vocab_size=64) if dry_run else {}  # the dry run's CPU speed
    model = timm.create_model(model_name, drop_path_rate=0.1, **small).to(device)
    vocab = model.lm_head.out_features
    optimizer = utils.build_optimizer(model, 1e-4, 0.05, device=device)
    scaler = utils.make_grad_scaler(device, amp)
    policy = MaskingPolicy(MaskGenerator(), ["a", "b"], dynamic_start=0, device=device)
    from conftest import synthetic_batches  # host batches, pinned as the loader's are
    batches = synthetic_batches(steps + 2, batch_size, vocab, pin=torch.cuda.is_available())
    lr = np.full(2 * steps + 2, 1e-4)  # epoch 0: 2 steps, epoch 1: `steps`
    config = engine.TrainConfig(lr, lr * 500, 2, clip_grad=3.0, amp=amp)
    engine.train_one_epoch(model, batches[:2], optimizer, scaler, policy, config, epoch=0,
                           progress=False)
    config.num_steps = steps
    if wrap is not None:
        wrap(policy)
    start = time.perf_counter()
    stats = engine.train_one_epoch(model, batches[2:], optimizer, scaler, policy, config,
                                   epoch=1, progress=False)  # ends with a read: synced
    return steps * batch_size / (time.perf_counter() - start), stats


def train_flops_per_image() -> float:
    """Training FLOPs of ViT-B on one image: the forward, and the backward at twice the
    forward's cost (the gradients of activations and of weights), i.e. 3 x forward."""
    return 3 * vit_forward_flops(**VIT_B)


def mfu_text(rate: float, peak: float | None) -> str:
    """Model FLOPs utilisation of training ViT-B at `rate` images/s on a GPU of `peak`
    dense TFLOP/s, as a percentage; 'n/a' when the peak is unknown."""
    return f"{rate * train_flops_per_image() / (peak * 1e12):.1%}" if peak else "n/a"


def check_train_bf16(args, device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = peak_tflops(name, args.peak_tflops)
    flops = train_flops_per_image()
    model, sizes, amp = ("vit_base_patch16_224_8k_vocab", (32, 128), "bf16")
    if args.dry_run:
        model, sizes, amp = ("vit_tiny_patch16_224_8k_vocab", (2,), "none")
    parts = []
    for batch_size in sizes:
        rate, stats = train(model, batch_size, 2 if args.dry_run else 10, amp, device,
                            dry_run=args.dry_run)
        if not math.isfinite(stats["loss"]):
            raise RuntimeError(f"non-finite loss {stats['loss']} at batch {batch_size}")
        mfu = "n/a" if args.dry_run else mfu_text(rate, peak)
        parts.append(f"batch {batch_size}: {rate:.0f} img/s, MFU {mfu}")
    peak_text = f"peak {peak:.0f} TFLOP/s" if peak else "peak unknown (--peak_tflops)"
    return (f"ViT-B {amp} on {name}, {peak_text}, 3 x {flops / 3e9:.1f} GFLOP/img: "
            + "; ".join(parts))


def check_fp16_scaler(args, device: torch.device) -> str:
    amp = "none" if args.dry_run else "fp16"
    model = "vit_tiny_patch16_224_8k_vocab" if args.dry_run else "vit_base_patch16_224_8k_vocab"
    steps = 2 if args.dry_run else 5
    _, stats = train(model, 2 if args.dry_run else 32, steps, amp, device,
                     dry_run=args.dry_run)
    if not math.isfinite(stats["loss"]):
        raise RuntimeError(f"non-finite loss {stats['loss']} with the loss scaler")
    return (f"{amp}, {steps} steps: loss {stats['loss']:.3f}, loss scale "
            f"{stats.get('loss_scale', float('nan')):.0f}")


def check_sync_free(args, device: torch.device) -> str:
    """torch.cuda.set_sync_debug_mode('error') inside every train_step, observe and
    draw of an epoch (but its first draw, which reads the statistics once), and not
    around the planned reads of the metrics."""
    counts: dict[str, int] = {}

    def strict(fn, after: int = 0):
        def run(*a, **k):
            counts[fn.__name__] = counts.get(fn.__name__, 0) + 1
            if device.type != "cuda" or counts[fn.__name__] <= after:
                return fn(*a, **k)
            torch.cuda.set_sync_debug_mode("error")
            try:
                return fn(*a, **k)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        return run

    real_step = engine.train_step

    def wrap(policy):
        policy.draw = strict(policy.draw, after=1)
        policy.observe = strict(policy.observe)
        engine.train_step = strict(real_step)

    try:
        steps, amp = (3, "none") if args.dry_run else (6, "bf16")
        _, stats = train("vit_tiny_patch16_224_8k_vocab", 2 if args.dry_run else 8, steps,
                         amp, device, wrap, dry_run=args.dry_run)
    finally:
        engine.train_step = real_step
    mode = "sync debug mode 'error'" if device.type == "cuda" else "CPU run (no sync mode)"
    return (f"{mode}: {counts['train_step']} train_step, {counts['observe']} observe, "
            f"{counts['draw'] - 1} of {counts['draw']} draws, loss {stats['loss']:.3f}")


def check_attention_grads(args, device: torch.device) -> str:
    """Gradients of q, k, v and the relative-position bias through each fused SDPA
    backend against the math backend, in bf16 with the bias cast to q's dtype, in the
    model's shapes (ViT-B: 12 heads, 197 tokens, bias broadcast over the batch)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(4, 12, 197, 64, device=device, dtype=dtype, generator=g)
               .requires_grad_() for _ in range(3))
    bias = torch.randn(1, 12, 197, 197, device=device, generator=g).requires_grad_()
    out_grad = torch.randn(4, 12, 197, 64, device=device, dtype=dtype, generator=g)

    def grads(backend) -> list[torch.Tensor]:
        for t in (q, k, v, bias):
            t.grad = None
        with sdpa_kernel([backend]):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        out.backward(out_grad)
        return [out.detach().float()] + [t.grad.float() for t in (q, k, v, bias)]

    reference = grads(SDPBackend.MATH)
    backends = ([SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                 SDPBackend.FLASH_ATTENTION] if device.type == "cuda" else [])
    parts, worst, ran = [], 0.0, 0
    for backend in backends:
        try:
            got = grads(backend)
        except RuntimeError as e:  # no kernel of this backend for these inputs
            parts.append(f"{backend.name}: not available ({str(e).splitlines()[0][:60]})")
            continue
        errors = [float((a - b).norm() / b.norm()) for a, b in zip(got, reference)]
        worst, ran = max(worst, *errors), ran + 1
        parts.append(f"{backend.name}: rel. error out/q/k/v/bias "
                     + "/".join(f"{e:.1e}" for e in errors))
    if device.type == "cuda" and ran == 0:
        raise RuntimeError("no fused attention backend ran: " + "; ".join(parts))
    if worst > 2e-2:
        raise RuntimeError("gradients differ from the math backend: " + "; ".join(parts))
    return "; ".join(parts) or "CPU: math backend only (reference computed)"


def check_dalle_tokens(args, device: torch.device) -> str:
    """A random-weight DALL-E encoder in the released layout (no download): tokens on
    the device (fp16 convolutions on CUDA) against the CPU in float32."""
    from modeling_discrete_vae import DalleEncoder, create_tokenizer, save_dalle_encoder
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        encoder = DalleEncoder(n_hid=16, n_blk_per_group=1) if args.dry_run else DalleEncoder()
        save_dalle_encoder(encoder, os.path.join(tmp, "encoder.pkl"))
        here = create_tokenizer("dall-e", tmp, device)
        cpu = create_tokenizer("dall-e", tmp, "cpu")
    g = torch.Generator().manual_seed(1)
    small = torch.rand(16, 3, 14, 14, generator=g)  # smooth images
    images = F.interpolate(small, size=here.image_size, mode="bicubic").clamp(0, 1)
    with torch.inference_mode():
        a = here.get_codebook_indices(images.to(device)).cpu()
        b = cpu.get_codebook_indices(images)
    agreement = float((a == b).float().mean())
    if agreement < 0.99:
        raise RuntimeError(f"tokens on {device} agree with the CPU's on {agreement:.2%} "
                           "of patches (< 99%)")
    return f"{device.type} vs CPU float32: {agreement:.2%} of {a.numel()} tokens agree"


def check_image_cache(args, device: torch.device) -> str:
    """--cache_images on the device: ImageCache's batches ('ram' and 'device', both
    normalised on the GPU) against the DataLoader's (normalised on the CPU), to the bit:
    images, tokens, masks, weights."""
    import datasets
    from bench_train import CLASSES, make_data
    from masking_generator import frequency_weights
    root = Path(args.workdir) / "cache_world"
    make_data(str(root), 8, 96)  # smooth random RGB, resized to 64 px below
    ds = datasets.PretrainDataset(str(root), list(CLASSES), token_size=32, img_size=64,
                                  freq_weights=lambda x: frequency_weights(x, patch_size=16))
    ds.attach_tokens(torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(0)))
    sampler = utils.build_sampler(ds, seed=5)
    sampler.set_epoch(1)
    want = list(torch.utils.data.DataLoader(ds, sampler=sampler, batch_size=4, drop_last=True))
    compared = 0
    for where in ("ram", "device"):
        cache = datasets.ImageCache(ds, 4, where=where, device=device, seed=5)
        cache.set_epoch(1)
        for got, ref in zip(cache, want, strict=True):
            for key, value in ref.items():
                if not torch.equal(got[key].cpu(), value):
                    raise RuntimeError(f"--cache_images {where}: {key} differs from the "
                                       "DataLoader's batch on the CPU")
                compared += 1
    return f"'ram' and 'device' equal the DataLoader's batches to the bit ({compared} tensors)"


def _tiny_world(workdir: Path):
    """conftest's demo-like tiny world (built once per workdir)."""
    from conftest import TinyWorld, build_tiny_world
    base = workdir / "tiny_world"
    if not (base / "protoflow.pt").exists():
        base.mkdir(parents=True, exist_ok=True)
        build_tiny_world(base)
    return TinyWorld(base / "mvtec", base / "imagenet", ["brick", "coins"],
                     base / "kmeans.pth", base / "pmad_tiny.pth", base / "protoflow.pt",
                     base / "prototypes")


def _metric_diff(a: float | None, b: float | None) -> float:
    """|a - b| of one metric on two devices; results.json writes an undefined metric as
    null, which must be undefined on both."""
    if a is None or b is None:
        return 0.0 if a is b else math.inf
    return abs(a - b)


RUN_TEST_TOLERANCE = 1e-3


def compare_results(cpu: dict, dev: dict, tol: float = RUN_TEST_TOLERANCE
                    ) -> tuple[float, list[str]]:
    """Two results.json 'classes' records (class -> metrics and 'protoflow_only'
    metrics) of one run on the CPU and on the device: (the largest difference of any
    metric, 'class/[protoflow_only/]metric: cpu vs device' per metric differing by more
    than `tol`). A pure function, so that the comparison is tested where no GPU is."""
    worst, mismatches = 0.0, []
    for name, record in cpu.items():
        other = dev[name]
        for part, a, b in (("", record, other),
                           ("protoflow_only/", record["protoflow_only"],
                            other["protoflow_only"])):
            for key in metrics.METRIC_NAMES:
                diff = _metric_diff(a[key], b[key])
                worst = max(worst, diff)
                if diff > tol:
                    mismatches.append(f"{name}/{part}{key}: {a[key]} vs {b[key]}")
    return worst, mismatches


def check_run_test(args, device: torch.device) -> str:
    """run_test.py (clean protocol) on the demo-like tiny set, on the device and on the
    CPU: every metric within 1e-3."""
    workdir = Path(args.workdir)
    if args.dry_run:
        from conftest import TinyWorld
        world = TinyWorld(*(workdir / n for n in ("mvtec", "imagenet")), ["brick"],
                          *(workdir / n for n in ("t.pth", "c.pth", "p.pt", "protos")))
        for dev in ("cuda", "cpu"):
            run_test.get_args_parser().parse_args(
                world.run_test_argv(workdir / dev, "--protocol", "clean", device=dev))
        return "command lines for cuda and cpu parse (not run)"
    world = _tiny_world(workdir)
    results = {}
    for dev in (device.type, "cpu"):
        out = workdir / f"run_test_{dev}"
        cmd = [sys.executable, str(REPO / "run_test.py"),
               *world.run_test_argv(out, "--protocol", "clean", device=dev)]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=150)
        if proc.returncode:
            raise RuntimeError(f"run_test.py --device {dev} failed: {proc.stderr[-800:]}")
        # run_test.py writes into --output_dir itself (an earlier run's, set aside, lies
        # in previous-*/ there)
        results[dev] = json.loads((out / "results.json").read_text())["classes"]
    worst, mismatches = compare_results(results["cpu"], results[device.type])
    if mismatches:
        raise RuntimeError(f"metrics on {device.type} and cpu differ by up to {worst:.2e}: "
                           + "; ".join(mismatches[:5]))
    return f"{device.type} vs cpu: {len(results['cpu'])} classes, max metric diff {worst:.1e}"


def check_torchrun(args, device: torch.device) -> str:
    """2 ranks of run_pretraining under torchrun: NCCL with 2 GPUs, else gloo on CPU."""
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    dev, backend = ("cuda", "nccl") if gpus >= 2 else ("cpu", "gloo")
    workdir = Path(args.workdir)
    world = None if args.dry_run else _tiny_world(workdir)
    data = world.imagenet_root if world else workdir / "imagenet"
    tok = world.tokenizer if world else workdir / "kmeans.pth"
    out = workdir / "torchrun"
    argv = ["--model", "vit_tiny_patch16_224_8k_vocab", "--tokenizer_model", "kmeans",
            "--tokenizer_weight_path", str(tok), "--data_path", str(data),
            "--output_dir", str(out), "--batch_size", "2", "--epochs", "1",
            "--max_steps_per_epoch", "2", "--num_workers", "0", "--no_init",
            "--device", dev, "--dynamic_masking_start", "0"]
    run_pretraining.get_args_parser().parse_args(argv)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc_per_node", "2", str(REPO / "run_pretraining.py"), *argv]
    if args.dry_run:
        return f"{backend}: command line parses (not run): {' '.join(cmd[2:6])} ..."
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=150,
                          env={**os.environ, "OMP_NUM_THREADS": "2"})
    if proc.returncode:
        raise RuntimeError(f"torchrun failed: {proc.stderr[-800:]}")
    ckpt = utils.load_checkpoint_file(str(out / "checkpoint-last.pth"))
    if ckpt["world_size"] != 2:
        raise RuntimeError(f"checkpoint says world_size {ckpt['world_size']}")
    return f"{backend}, 2 ranks on {dev}: 1 epoch, checkpoint of world size 2"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("check", choices=CHECKS + ("all",))
    p.add_argument("--dry-run", dest="dry_run", action="store_true",
                   help="the CPU parts only, tiny sizes; command lines built, not run")
    p.add_argument("--peak_tflops", type=utils.positive_float, default=None,
                   help="the GPU's dense bf16 peak when its name is not in the table")
    p.add_argument("--workdir", default=None, help="scratch folder (default: a temporary one)")
    args = p.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        print("FAIL no CUDA device (use --dry-run on a CPU machine)", flush=True)
        return 1
    device = torch.device("cpu" if args.dry_run else "cuda")
    with tempfile.TemporaryDirectory() as tmp:
        args.workdir = args.workdir or tmp
        failed = 0
        for name in CHECKS if args.check == "all" else (args.check,):
            start = time.perf_counter()
            try:
                line = globals()[f"check_{name}"](args, device)
                print(f"PASS {name} ({time.perf_counter() - start:.0f} s): {line}", flush=True)
            except Exception as e:  # one line per check; the next check still runs
                print(f"FAIL {name} ({time.perf_counter() - start:.0f} s): "
                      f"{type(e).__name__}: {str(e)[:400]}", flush=True)
                failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
