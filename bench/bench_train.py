"""Training throughput (images/s) of run_pretraining's step, in one run:

  models tiny and base; CPU fp32 and bf16 (batch 4); CUDA, when present, fp32 and bf16
  at batch 4 and 64; each without the token cache (the tokenizer runs inside the step),
  with it (datasets.cache_tokens, as run_pretraining does), and with the images decoded
  once and kept in RAM (--cache_images ram) or, on CUDA, on the device
  (--cache_images device).

Per row: the end-to-end step rate (engine.train_one_epoch: loading, masks, forward,
backward, AdamW), the data loader's own rate (iterating the same loader, no model) and
the ratio to the row's baseline (fp32 without cache, same device/model/batch), all
measured in this run. On a GPU the step must not wait on data: the loader rate has to
stay above the step rate. Both rates are steady-state ones: the batches the loader's
workers prepared before the first was asked for (num_workers x PREFETCH) are not
timed, nor the warm-up, and a rate is the timed batches over their whole time. A median
step would hide a slow loader: its workers finish their batches together, so most steps
find one waiting.

The data are synthetic PNGs of MVTec size (--image_px, default 1024) with foreground
masks; the tokenizer is a random-weight DALL-E encoder of the released size, written in
OpenAI's format (or --tokenizer_weight_path for the real one).

  python bench/bench_train.py                       # everything this machine has
  python bench/bench_train.py --models tiny --steps 3 --image_px 256   # quick CPU look
  python bench/bench_train.py --devices cuda --models base    # the paper's ViT on a GPU

On a GPU a DataLoader row at batch 64 decodes (2 + 2 x workers + 30) x 64 PNGs: at the
108-135 img/s that 8 workers gave on an H200 machine (README, Speed), about half a
minute.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
import time
from typing import Callable, Iterable, Iterator, NamedTuple

import numpy as np
import timm
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import datasets  # noqa: E402
import engine  # noqa: E402
import modeling_pmad  # noqa: E402,F401  (registers the ViTs with timm)
import utils  # noqa: E402
from bench.timing import machine_line, sync  # noqa: E402
from masking_generator import MaskGenerator, MaskingPolicy  # noqa: E402
from modeling_discrete_vae import DalleEncoder, create_tokenizer, save_dalle_encoder  # noqa: E402

MODELS = {"tiny": "vit_tiny_patch16_224_8k_vocab", "base": "vit_base_patch16_224_8k_vocab"}
CLASSES = ("bottle", "carpet")
PREFETCH = 2  # batches each loader worker prepares ahead (DataLoader's default)
STEPS = {"cpu": 5, "cuda": 30}  # timed steps per row unless --steps


def make_data(root: str, num_images: int, px: int, seed: int = 0) -> None:
    """<root>/train/<class>/*.png and <root>/fg_mask/<class>/*.png, smooth random RGB."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(CLASSES):
        for sub in ("train", "fg_mask"):
            os.makedirs(os.path.join(root, sub, name), exist_ok=True)
        for i in range(num_images // len(CLASSES)):
            small = rng.integers(0, 256, (px // 32, px // 32, 3), dtype=np.uint8)
            Image.fromarray(small).resize((px, px), Image.BICUBIC).save(
                os.path.join(root, "train", name, f"{i:03d}.png"))
            mask = np.zeros((px, px), np.uint8)
            mask[px // 8:px - px // 8, px // 6:px - px // 6] = 255
            Image.fromarray(mask).save(os.path.join(root, "fg_mask", name, f"{i:03d}.png"))


def make_tokenizer_file(folder: str) -> str:
    torch.manual_seed(0)
    save_dalle_encoder(DalleEncoder(), os.path.join(folder, "encoder.pkl"))
    return folder


def loader_for(dataset, batch_size: int, num_batches: int, num_workers: int,
               device: torch.device) -> torch.utils.data.DataLoader:
    sampler = torch.utils.data.RandomSampler(dataset, replacement=True,
                                             num_samples=batch_size * num_batches)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler,
                                       num_workers=num_workers, drop_last=True,
                                       prefetch_factor=PREFETCH if num_workers else None,
                                       pin_memory=device.type == "cuda",
                                       persistent_workers=False)


def timed(loader: Iterable, stamps: list[float]) -> Iterator:
    """Yield the loader's batches, stamping each request: the engine asks for batch i+1
    right after step i, so consecutive stamps bound one whole step (data included)."""
    it = iter(loader)
    while True:
        stamps.append(time.perf_counter())
        try:
            batch = next(it)
        except StopIteration:
            return
        yield batch


def window_rate(stamps: list[float], skip: int, batch_size: int) -> float:
    """images/s over the batches after the first `skip`: stamps[i] is when batch i was
    asked for, the last stamp when the last batch was done."""
    timed_batches = len(stamps) - 1 - skip
    if timed_batches < 1:
        raise ValueError(f"{len(stamps)} stamps leave no batch to time after {skip}")
    return batch_size * timed_batches / (stamps[-1] - stamps[skip])


def epochs_of(cache: datasets.ImageCache, num_batches: int) -> Iterator[dict]:
    """`num_batches` batches of an ImageCache, epoch after epoch."""
    if len(cache) == 0:
        raise ValueError("--num_images is smaller than one batch")
    for epoch in itertools.count():
        cache.set_epoch(epoch)
        for batch in cache:
            if num_batches == 0:
                return
            num_batches -= 1
            yield batch


class Source(NamedTuple):
    """A data path: `make(n)` gives n batches; `ready` of them may have been prepared
    before the first was asked for (a DataLoader's workers' prefetch)."""
    make: Callable[[int], Iterable[dict]]
    ready: int


def sources(plain, cached, batch_size: int, num_workers: int, device: torch.device
            ) -> dict[str, Source]:
    """name -> Source for each data path."""
    ahead = num_workers * PREFETCH
    out = {"no cache": Source(lambda n: loader_for(plain, batch_size, n, num_workers, device),
                              ahead),
           "cache": Source(lambda n: loader_for(cached, batch_size, n, num_workers, device),
                           ahead)}
    for where in ("ram", "device") if device.type == "cuda" else ("ram",):
        cache = datasets.ImageCache(cached, batch_size, where=where, device=device,
                                    num_workers=num_workers)
        out[f"cache+{where}"] = Source(lambda n, c=cache: epochs_of(c, n), 0)
    return out


def loader_rate(source: Source, batch_size: int, steps: int, warmup: int,
                device: torch.device) -> float:
    """images/s of the loader alone, batches moved to the device, in the steady state."""
    stamps: list[float] = []
    skip = warmup + source.ready
    for batch in timed(source.make(skip + steps), stamps):
        batch["image"].to(device, non_blocking=True)
        sync(device)
    return window_rate(stamps, skip, batch_size)


def step_rate(model_name: str, source: Source, tokenizer, amp: str, batch_size: int,
              steps: int, warmup: int, device: torch.device) -> float:
    """images/s of engine.train_one_epoch (dynamic masking on: the most work per step)
    in the steady state, data loading included.

    No step waits for the device, but dynamic masking reads the statistics of two steps
    back, so the host runs at most two steps ahead of a GPU, and the last stamp is taken
    after the device is done."""
    torch.manual_seed(0)
    model = timm.create_model(model_name, drop_path_rate=0.1, init_values=0.1).to(device)
    optimizer = utils.build_optimizer(model, 1e-4, 0.05, device=device)
    skip = warmup + source.ready
    n = skip + steps
    schedule = np.full(n, 1e-4)
    stamps: list[float] = []
    engine.train_one_epoch(
        model, timed(source.make(n), stamps), optimizer, utils.make_grad_scaler(device, amp),
        make_policy(device),
        engine.TrainConfig(schedule, schedule * 500, n, clip_grad=3.0, amp=amp),
        epoch=0, progress=False, tokenizer=tokenizer)
    sync(device)
    stamps.append(time.perf_counter())
    return window_rate(stamps, skip, batch_size)


def make_policy(device: torch.device) -> MaskingPolicy:
    """Dynamic masking from the first step: the most work per step."""
    return MaskingPolicy(MaskGenerator(), list(CLASSES), dynamic_start=0, device=device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--steps", type=utils.int_at_least(1), default=None,
                   help=f"timed steps per row (default: {STEPS['cpu']} on CPU, "
                        f"{STEPS['cuda']} on CUDA)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--image_px", type=int, default=1024, help="MVTec images are 700-1024 px")
    p.add_argument("--num_images", type=int, default=32)
    p.add_argument("--num_workers", type=int, default=None,
                   help="loader workers (default: 0 on CPU, min(8, cores - 2) on CUDA)")
    p.add_argument("--tokenizer_weight_path", default=None,
                   help="a real DALL-E encoder.pkl folder (default: random weights)")
    p.add_argument("--devices", nargs="+", default=None, choices=list(STEPS),
                   help="default: cpu (+ cuda)")
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args()

    devices = args.devices or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    print(machine_line(), flush=True)
    steps_text = args.steps or " / ".join(f"{n} ({d})" for d, n in STEPS.items())
    print(f"models {', '.join(args.models)}, {args.image_px} px PNGs, {args.warmup} warm-up "
          f"+ {steps_text} timed steps per row", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "data")
        # an ImageCache serves whole epochs: at least two batches of the largest size
        make_data(data, max(args.num_images, 128 if "cuda" in devices else 8),
                  args.image_px)
        tok_path = args.tokenizer_weight_path or make_tokenizer_file(tmp)
        for dev_name in devices:
            device = torch.device(dev_name)
            workers = args.num_workers if args.num_workers is not None else (
                0 if device.type == "cpu" else min(8, max(1, (os.cpu_count() or 2) - 2)))
            amps = ["none"] + (["bf16"] if device.type == "cpu"
                               or utils.bf16_supported(device) else [])
            batches = [4] if device.type == "cpu" else [4, 64]
            steps = args.steps or STEPS[device.type]
            tokenizer = create_tokenizer("dall-e", tok_path, device, amp=utils.default_amp(device))
            freq = make_policy(device).frequency
            plain = datasets.PretrainDataset(data, CLASSES, tokenizer.image_size,
                                             freq_weights=freq)
            cached = datasets.PretrainDataset(data, CLASSES, tokenizer.image_size,
                                              freq_weights=freq)
            t0 = time.perf_counter()
            datasets.cache_tokens(cached, tokenizer, os.path.join(tmp, "cache", dev_name),
                                  device=device, num_workers=workers)
            fill = len(cached) / (time.perf_counter() - t0)
            print(f"[{dev_name}] token cache filled at {fill:.1f} images/s "
                  f"({len(cached)} images, {args.image_px} px, {workers} loader workers)",
                  flush=True)
            for batch in batches:
                paths = sources(plain, cached, batch, workers, device)
                load = {name: loader_rate(source, batch, steps, args.warmup, device)
                        for name, source in paths.items()}
                for key in args.models:
                    baseline = None
                    for amp in amps:
                        loader_path = None
                        for name, source in paths.items():
                            rate = step_rate(MODELS[key], source,
                                             tokenizer if name == "no cache" else None,
                                             amp, batch, steps, args.warmup, device)
                            baseline = baseline or rate
                            loader_path = rate if name == "cache" else loader_path
                            row = {"device": dev_name, "model": key, "amp": amp,
                                   "batch": batch, "data": name, "step_img_s": rate,
                                   "loader_img_s": load[name], "ratio": rate / baseline}
                            rows.append(row)
                            vs_loader = (f"  x{rate / loader_path:5.2f} vs DataLoader + "
                                         "token cache" if name.startswith("cache+") else "")
                            print(f"{dev_name:5s} {key:5s} {amp:5s} batch {batch:3d} "
                                  f"{name:12s} step {rate:8.2f} img/s  loader "
                                  f"{load[name]:8.1f} img/s  x{rate / baseline:5.2f} vs "
                                  "fp32 no cache" + vs_loader
                                  + ("  LOADER-BOUND" if load[name] < rate * 1.2 else ""),
                                  flush=True)
            del tokenizer
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
