"""Masks per second of masking_generator against a plain per-sample Python loop.

The baseline implements the same rules (docs/method.md 5) the straightforward way: one
sample at a time, a 2-D numpy mask per block try, numpy's choice for weighted draws.
Both run in this process on one thread. Usage: python bench/bench_masking.py [--seconds S]
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import masking_generator as mg  # noqa: E402
import utils  # noqa: E402
from bench.timing import machine_line  # noqa: E402


def baseline_mask(m: int, grid: tuple[int, int], region: np.ndarray | None,
                  weights: np.ndarray | None, block: bool, rng: np.random.Generator
                  ) -> np.ndarray:
    """Same rules as mg.generate, one sample, no vectorisation."""
    height, width = grid
    L = height * width
    mask = np.zeros((height, width), bool)
    allowed = np.ones((height, width), bool)
    if region is not None:
        reg = region.reshape(height, width)
        if reg.sum() >= m:
            allowed = reg.copy()
        else:
            mask |= reg
    w = np.ones((height, width)) if weights is None else weights.reshape(height, width)
    if block:
        while mask.sum() < m:
            rem = m - int(mask.sum())
            placed = False
            for _ in range(mg.MAX_TRIES):
                area = mg.MIN_BLOCK + (rem - mg.MIN_BLOCK) * rng.random()
                ar = math.exp(rng.uniform(*mg.LOG_ASPECT))
                h = int(round(math.sqrt(area * ar)))
                bw = int(round(math.sqrt(area / ar)))
                if not (0 < h <= height and 0 < bw <= width):
                    continue
                cw = (w * allowed)[:height - h + 1, :width - bw + 1]
                if weights is None and region is None:
                    top = int(rng.integers(0, height - h + 1))
                    left = int(rng.integers(0, width - bw + 1))
                else:
                    if cw.sum() <= 0:
                        cw = allowed[:height - h + 1, :width - bw + 1] * 1.0
                        if cw.sum() <= 0:
                            continue
                    k = int(rng.choice(cw.size, p=(cw / cw.sum()).ravel()))
                    top, left = divmod(k, cw.shape[1])
                new = 0
                for i in range(top, top + h):
                    for j in range(left, left + bw):
                        new += int(allowed[i, j] and not mask[i, j])
                if 0 < new <= rem:
                    mask[top:top + h, left:left + bw] |= allowed[top:top + h, left:left + bw]
                    placed = True
                    break
            if not placed:
                break
    flat, allowed_flat, w_flat = mask.ravel(), allowed.ravel(), w.ravel()
    rem = m - int(flat.sum())
    if rem > 0:
        in_region = region if region is not None else np.ones(L, bool)
        for pool in (np.flatnonzero(~flat & in_region & allowed_flat),
                     np.flatnonzero(~flat & ~in_region)):
            take = min(rem, len(pool))
            if take:
                p = w_flat[pool] + 1e-12
                flat[rng.choice(pool, take, replace=False, p=p / p.sum())] = True
                rem -= take
    return flat


def baseline_generator(names, fg, freq, dyn, rng, gen: mg.MaskGenerator, p_region: float,
                       p_weighting: tuple[float, float, float], p_block: float) -> np.ndarray:
    out = np.zeros((len(names), gen.num_patches), bool)
    for i, name in enumerate(names):
        m = mg.num_masked(gen.ratio_for(name), gen.num_patches)
        region = fg[i] if rng.random() < p_region else None
        k = rng.choice(3, p=p_weighting)
        weights = (freq[i], dyn[i], None)[k]
        out[i] = baseline_mask(m, gen.window_size, region, weights, rng.random() < p_block,
                               rng)
    return out


def make_inputs(n: int, rng: np.random.Generator, grid=(14, 14)):
    """Class names cycling over MVTec, disc-shaped foregrounds (objects) or all patches
    (textures), smooth min-max normalised weight maps."""
    names = [sorted(mg.CLASS_MASK_RATIOS)[i % 15] for i in range(n)]
    yy, xx = np.mgrid[:grid[0], :grid[1]]
    fg = np.ones((n, grid[0] * grid[1]), bool)
    for i, name in enumerate(names):
        if name not in ("carpet", "grid", "leather", "tile", "wood"):
            r = rng.uniform(3, 7)
            fg[i] = (((yy - 6.5) ** 2 + (xx - 6.5) ** 2) < r * r).ravel()

    def smooth():
        w = np.cos(rng.uniform(0.2, 1.0, (n, 1)) * xx.ravel() + rng.uniform(0, 6, (n, 1)))
        w += rng.random(w.shape) * 0.3
        w -= w.min(1, keepdims=True)
        return w / w.max(1, keepdims=True)
    return names, fg, smooth(), smooth()


def masks_per_second(fn, batch: int, seconds: float) -> tuple[float, float]:
    """(per CPU second of this process, per wall second). CPU time is the one-core
    figure even when other jobs share the machine; wall time is what a run sees."""
    fn()  # warm-up
    count, wall, cpu = 0, time.perf_counter(), time.process_time()
    while time.process_time() - cpu < seconds:
        fn()
        count += batch
    return count / (time.process_time() - cpu), count / (time.perf_counter() - wall)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=utils.positive_float, default=0.4,
                        help="CPU time per measurement (> 0)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    gen = mg.MaskGenerator()
    inputs = {b: make_inputs(b, rng) for b in (4, 64)}
    variants = [("combinational", 0.5, (1 / 3, 1 / 3, 1 / 3), 0.5)]
    for region in (0.0, 1.0):
        for k, weighting in enumerate(mg.WEIGHTINGS):
            for block in (1.0, 0.0):
                pw = tuple(float(i == k) for i in range(3))
                label = (f"{'fg' if region else 'all'}/{weighting}/"
                         f"{'block' if block else 'random'}")
                variants.append((label, region, pw, block))

    print(machine_line())
    print(f"masks per CPU-second, one thread, {gen.window_size[0]}x{gen.window_size[1]} "
          f"grid, MVTec class ratios; baseline = per-sample Python loop (same rules)")
    print(f"{'variant':26s} {'ours b=4':>10s} {'ours b=64':>10s} {'baseline':>10s} "
          f"{'x (b=4)':>8s} {'x (b=64)':>9s}")
    walls = {}
    for label, p_region, p_weighting, p_block in variants:
        g = mg.MaskGenerator(p_region=p_region, p_weighting=p_weighting, p_block=p_block)
        ours = {}
        for b, (names, fg, freq, dyn) in inputs.items():
            ours[b], walls[label, b] = masks_per_second(
                lambda: g(names, fg, freq, dyn, rng=rng), b, args.seconds)
        names, fg, freq, dyn = inputs[4]
        base, walls[label, 0] = masks_per_second(
            lambda: baseline_generator(names, fg, freq, dyn, rng, g, p_region, p_weighting,
                                       p_block), 4, args.seconds)
        print(f"{label:26s} {ours[4]:10.0f} {ours[64]:10.0f} {base:10.0f} "
              f"{ours[4] / base:8.1f} {ours[64] / base:9.1f}")
    single = {s: masks_per_second(lambda: mg._generate(58, shape=s, rng=rng), 1,
                                  args.seconds)[0] for s in ("block", "random")}
    print(f"_generate() one mask at a time, m=58: block {single['block']:.0f}/s, "
          f"random {single['random']:.0f}/s")
    print(f"combinational per wall-second (shared machine): ours b=4 "
          f"{walls['combinational', 4]:.0f}, b=64 {walls['combinational', 64]:.0f}, "
          f"baseline {walls['combinational', 0]:.0f}")
    print("target: >= 5,000 combinational masks/s on one core (published code: ~650/s)")


if __name__ == "__main__":
    main()
