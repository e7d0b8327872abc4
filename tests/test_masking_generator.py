"""Property tests of masking_generator over thousands of seeded masks."""
from __future__ import annotations

import itertools
import math
import os
import tempfile

import numpy as np
import pytest
import torch
import torch.distributed as dist
from scipy import stats

import masking_generator as mg
from conftest import run_ranks

L = 196
GRID = (14, 14)
ALPHA = 1e-3  # goodness-of-fit tests fail only when the law is clearly wrong


def _rect_union(rects, window_size=GRID) -> np.ndarray:
    """Independent reconstruction of the placed blocks from their coordinates."""
    grid = np.zeros(window_size, bool)
    for top, left, h, w in rects:
        assert 0 <= top and top + h <= window_size[0] and 0 <= left and left + w <= window_size[1]
        grid[top:top + h, left:left + w] = True
    return grid.ravel()


def _region(rng, kind: str, m: int) -> np.ndarray | None:
    if kind == "none":
        return None
    if kind == "box":  # 80 patches, enough for every m used below
        r = np.zeros(GRID, bool)
        r[2:12, 3:11] = True
        return r.ravel()
    if kind == "blob":  # irregular, ~60% of the grid
        return rng.random(L) < 0.6
    if kind == "small":  # fewer patches than m
        r = np.zeros(L, bool)
        r[rng.choice(L, m // 2, replace=False)] = True
        return r
    raise AssertionError(kind)


def _weights(rng, kind: str) -> np.ndarray | None:
    if kind == "none":
        return None
    w = rng.random(L)
    if kind == "zeros":  # min-max normalised weights have zeros; some have many
        w[rng.choice(L, 40, replace=False)] = 0.0
    return w


# --------------------------------------------------------------------------- counts

def test_class_ratios_and_num_masked():
    """The paper's Table 6 ratios, every one, and m = int(L r)."""
    assert mg.CLASS_MASK_RATIOS == {
        "carpet": 0.16, "grid": 0.16, "leather": 0.12, "tile": 0.38, "wood": 0.46,
        "bottle": 0.42, "cable": 0.28, "capsule": 0.16, "hazelnut": 0.36, "metal_nut": 0.48,
        "pill": 0.48, "screw": 0.04, "toothbrush": 0.22, "transistor": 0.48, "zipper": 0.20}
    assert mg.num_masked(0.48, 196) == 94 and mg.num_masked(0.16, 196) == 31
    assert mg.num_masked(0.04, 196) == 7 and mg.num_masked(0.3, 196) == 58
    assert mg.num_masked(0.5, 64) == 32
    # float products just under a whole number: 100 x 0.29 = 28.999999999999996
    assert [mg.num_masked(r, 100) for r in (0.29, 0.57, 0.58)] == [29, 57, 58]
    assert [mg.num_masked(r, 400) for r in (0.29, 0.57, 0.58)] == [116, 228, 232]
    # the paper's grid and ratios: exactly its int(196 * r)
    for r in [k / 100 for k in range(2, 49, 2)] + list(mg.CLASS_MASK_RATIOS.values()):
        assert mg.num_masked(r, 196) == int(196 * r)
    with pytest.raises(ValueError, match="outside"):
        mg.num_masked(1.5, 196)


@pytest.mark.parametrize("shape", ["block", "random"])
def test_generate_exact_count_region_and_region_first(shape):
    rng = np.random.default_rng(0)
    seen_topup = 0
    for region_kind, weight_kind, m in itertools.product(
            ["none", "box", "blob", "small"], ["none", "random", "zeros"],
            [0, 1, 3, 7, 31, 58, 94, 196]):
        for _ in range(12):
            region = _region(rng, region_kind, m)
            weights = _weights(rng, weight_kind)
            mask = mg._generate(m, region=region, weights=weights, shape=shape, rng=rng)
            assert mask.dtype == torch.bool and mask.shape == (L,)
            assert int(mask.sum()) == m
            if region is None:
                continue
            region_t = torch.from_numpy(region)
            if region.sum() >= m:
                assert not (mask & ~region_t).any(), "mask leaves a region big enough"
            else:
                assert mask[region_t].all(), "a too-small region must be masked first"
                seen_topup += 1
    assert seen_topup > 0


def test_generate_nonsquare_grid_and_torch_inputs():
    rng = torch.Generator().manual_seed(3)
    region = torch.zeros(7 * 9, dtype=torch.bool)
    region[:30] = True
    for shape in ("block", "random"):
        for m in (0, 5, 20, 30, 40, 63):
            mask = mg._generate(m, window_size=(7, 9), region=region,
                               weights=torch.rand(63, generator=rng), shape=shape, rng=rng)
            assert mask.shape == (63,) and int(mask.sum()) == m
            assert (mask[:30].all() if m >= 30 else not mask[30:].any())


def test_generate_batch_matches_rules_per_row():
    rng = np.random.default_rng(5)
    n = 3000
    m = rng.integers(0, 120, n)
    regions = rng.random((n, L)) < rng.random((n, 1))
    weights = rng.random((n, L)) * (rng.random((n, L)) < 0.9)
    block = rng.random(n) < 0.5
    masks = mg._generate_batch(m, regions=regions, weights=weights, block=block, rng=rng)
    assert masks.shape == (n, L)
    assert (masks.sum(1).numpy() == m).all()
    big = regions.sum(1) >= m
    outside = (masks.numpy() & ~regions).any(1)
    assert not outside[big].any()
    assert (masks.numpy() | ~regions).all(1)[~big].all()


def test_zero_weight_patches_come_last_in_random():
    rng = np.random.default_rng(6)
    w = rng.random(L) + 0.1
    zero = rng.choice(L, 10, replace=False)
    w[zero] = 0.0
    for _ in range(200):
        mask = mg._generate(186, weights=w, shape="random", rng=rng).numpy()
        assert mask[w > 0].all() and mask.sum() == 186
        mask = mg._generate(190, weights=w, shape="random", rng=rng).numpy()
        assert mask[w > 0].all() and mask[zero].sum() == 4
    all_zero = mg._generate(30, weights=np.zeros(L), shape="block", rng=rng)
    assert int(all_zero.sum()) == 30


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="num_masked"):
        mg._generate(197)
    with pytest.raises(ValueError, match="shape"):
        mg._generate(3, shape="blocks")
    with pytest.raises(ValueError, match=">= 0"):
        mg._generate(3, weights=-np.ones(L))
    with pytest.raises(ValueError, match="finite"):
        mg._generate(3, weights=np.full(L, np.nan))
    with pytest.raises(ValueError, match="shape"):
        mg._generate(3, region=np.ones(100, bool))
    with pytest.raises(TypeError, match="boolean"):
        mg._generate(3, region=np.ones(L))
    with pytest.raises(TypeError, match="rng"):
        mg._generate(3, rng=42)


# --------------------------------------------------------------------------- blocks

@pytest.mark.parametrize("region_kind,weight_kind", [
    ("none", "none"), ("none", "random"), ("box", "none"), ("blob", "random"),
    ("small", "zeros")])
def test_block_masks_are_unions_of_placed_rectangles(region_kind, weight_kind):
    rng = np.random.default_rng(7)
    topups = 0
    n = 300
    for i in range(n):
        m = [7, 31, 58, 94][i % 4]
        region = _region(rng, region_kind, m)
        weights = _weights(rng, weight_kind)
        seed = int(rng.integers(2 ** 31))
        placed, rects = mg._blocks_only(m, region=region, weights=weights,
                                        rng=np.random.default_rng(seed))
        placed = placed.numpy()
        union = _rect_union(rects)
        allowed = np.ones(L, bool) if region is None or region.sum() < m else region
        so_far = np.zeros(L, bool) if region is None or region.sum() >= m else region.copy()
        for rect in rects:  # the acceptance rule: each block adds 1..(m - masked) patches
            new = _rect_union([rect]) & allowed & ~so_far
            assert 1 <= new.sum() <= m - so_far.sum()
            so_far |= new
        if region is None:
            assert (placed == union).all()
        elif region.sum() >= m:  # blocks clipped to the region
            assert (placed == (union & region)).all()
            assert all(region[t * 14 + l] for t, l, _, _ in rects), "corner outside region"
        else:  # region first, then blocks anywhere
            assert (placed == (union | region)).all()
        assert placed.sum() <= m
        full = mg._generate(m, region=region, weights=weights, shape="block",
                           rng=np.random.default_rng(seed)).numpy()
        assert full.sum() == m and (full >= placed).all()  # same blocks, then top-up
        topups += placed.sum() < m
    assert topups <= 0.25 * n  # BEiT-style placement rarely falls short


def test_block_masks_are_blockier_than_random():
    """Structural check independent of the reported rectangles: block masks have far
    fewer masked/unmasked edges between 4-neighbours than random masks."""
    rng = np.random.default_rng(8)

    def boundary(masks):  # (N, L) -> mean number of masked/unmasked neighbour pairs
        g = masks.reshape(-1, 14, 14)
        vertical = (g[:, 1:] != g[:, :-1]).sum((1, 2))
        return (vertical + (g[:, :, 1:] != g[:, :, :-1]).sum((1, 2))).mean()

    blocks = mg._generate_batch(58, block=np.ones(500, bool), rng=rng).numpy()
    randoms = mg._generate_batch(58, block=np.zeros(500, bool), rng=rng).numpy()
    assert boundary(blocks) < 0.5 * boundary(randoms)


def test_block_corner_follows_weights_chi_square():
    """A 2x2 block placed first on a 4x4 grid: its corner ~ weights over the 3x3 corners
    where it fits (restricted to the region)."""
    rng = np.random.default_rng(9)
    w = rng.random(16) + 0.2
    region = np.ones(16, bool)
    region[[0, 5, 10]] = False  # corners (0,0), (1,1), (2,2) excluded
    counts = np.zeros((3, 3))
    for _ in range(3000):
        _, rects = mg._blocks_only(4, window_size=(4, 4), region=region, weights=w, rng=rng,
                                   max_block=4)
        top, left, h, ww = rects[0]
        if (h, ww) == (2, 2):
            counts[top, left] += 1
    p = (w.reshape(4, 4) * region.reshape(4, 4))[:3, :3]
    assert counts[p == 0].sum() == 0
    obs, exp = counts[p > 0], p[p > 0] / p.sum() * counts.sum()
    assert counts.sum() > 800
    assert stats.chisquare(obs, exp).pvalue > ALPHA


def test_block_corner_uniform_without_weights_chi_square():
    rng = np.random.default_rng(10)
    counts = np.zeros((3, 3))
    for _ in range(3000):
        _, rects = mg._blocks_only(4, window_size=(4, 4), rng=rng, max_block=4)
        top, left, h, w = rects[0]
        if (h, w) == (2, 2):
            counts[top, left] += 1
    assert stats.chisquare(counts.ravel()).pvalue > ALPHA


def test_block_corner_falls_back_to_uniform_when_fitting_corners_weigh_zero():
    """Weight only on the last row and column: no block taller and wider than 1 can have
    its corner there, so those blocks take a uniform corner; 1-wide/1-tall blocks keep
    following the weights (their corners on the weighted cells)."""
    rng = np.random.default_rng(19)
    w = np.zeros((6, 6))
    w[5, :] = 1.0
    w[:, 5] = 1.0
    fallback_corners, weighted_ok, n_thin = set(), True, 0
    for _ in range(400):
        placed, rects = mg._blocks_only(8, window_size=(6, 6), weights=w.ravel(), rng=rng)
        assert int(mg._generate(8, window_size=(6, 6), weights=w.ravel(), rng=rng).sum()) == 8
        for top, left, h, ww in rects:
            fits = w[:6 - h + 1, :6 - ww + 1]
            if fits.sum() > 0:
                weighted_ok &= w[top, left] > 0
                n_thin += 1
            else:
                fallback_corners.add((top, left))
    assert weighted_ok and n_thin > 20
    assert len(fallback_corners) > 10  # spread over the grid, not stuck


class _ConstantRng:
    """A numpy-like generator whose every uniform draw is `u`."""

    def __init__(self, u: float) -> None:
        self.u = u

    def random(self, shape) -> np.ndarray:
        return np.full(shape, self.u)


def test_block_aspect_ratio_spans_exactly_0_3_to_1_over_0_3():
    """A block try's aspect ratio is exp(U(ln 0.3, ln 1/0.3)) (BEiT): the extreme
    uniform draws give exactly 0.3 and 1/0.3 (as sqrt(ar)), and an area-20 block then
    has h = round(sqrt(20 * 0.3)) = 2, w = round(sqrt(20 / 0.3)) = 8 (and 8 x 2)."""
    low = mg._try_draws(_ConstantRng(0.0), 2)  # [sample][area, sqrt(ar), top, left][try]
    high = mg._try_draws(_ConstantRng(1.0), 2)
    assert np.allclose(low[0][1] + low[1][1], math.sqrt(0.3), rtol=1e-12, atol=0)
    assert np.allclose(high[0][1] + high[1][1], math.sqrt(1 / 0.3), rtol=1e-12, atol=0)
    assert mg._block_size(1.0, math.sqrt(0.3), 20, 4, 20) == (2, 8)
    assert mg._block_size(1.0, math.sqrt(1 / 0.3), 20, 4, 20) == (8, 2)


def test_block_log_aspect_is_uniform_on_ln_0_3_to_ln_1_over_0_3():
    """The log aspect ratios 2 ln sqrt(ar) of real draws stay in [ln 0.3, -ln 0.3] and
    follow the uniform law there (Kolmogorov-Smirnov)."""
    draws = mg._try_draws(np.random.default_rng(21), 100)  # 100 x 24 tries
    log_ar = 2 * np.log(np.array([sample[1] for sample in draws]).ravel())
    lo, hi = math.log(0.3), math.log(1 / 0.3)
    assert lo - 1e-12 <= log_ar.min() and log_ar.max() <= hi + 1e-12
    assert stats.kstest(log_ar, stats.uniform(loc=lo, scale=hi - lo).cdf).pvalue > ALPHA


# --------------------------------------------------------------------------- weights

def test_random_single_pick_follows_weights_chi_square():
    rng = np.random.default_rng(11)
    w = rng.random(L) + 0.5
    n = 20000
    masks = mg._generate_batch(1, weights=np.tile(w, (n, 1)), block=np.zeros(n, bool),
                              rng=rng).numpy()
    counts = masks.sum(0)
    assert counts.sum() == n
    assert stats.chisquare(counts, w / w.sum() * n).pvalue > ALPHA


def test_random_pairs_follow_sampling_without_replacement_chi_square():
    """k = 2 of 6 patches: unordered pairs must follow successive sampling in proportion
    to the weights, P{i, j} = w_i/W * w_j/(W - w_i) + w_j/W * w_i/(W - w_j)."""
    rng = np.random.default_rng(12)
    w = np.array([0.1, 0.2, 0.4, 0.8, 1.0, 2.0])
    n = 20000
    masks = mg._generate_batch(2, window_size=(2, 3), weights=np.tile(w, (n, 1)),
                              block=np.zeros(n, bool), rng=rng).numpy()
    total = w.sum()
    pairs = list(itertools.combinations(range(6), 2))
    exp = np.array([w[i] / total * w[j] / (total - w[i]) + w[j] / total * w[i] / (total - w[j])
                    for i, j in pairs]) * n
    index = {p: k for k, p in enumerate(pairs)}
    obs = np.zeros(len(pairs))
    for row in masks:
        obs[index[tuple(np.flatnonzero(row))]] += 1
    assert stats.chisquare(obs, exp).pvalue > ALPHA
    # with replacement (the original code's fault) would give singletons; none here
    assert (masks.sum(1) == 2).all()


def test_random_region_uniform_chi_square():
    rng = np.random.default_rng(13)
    region = rng.random(L) < 0.5
    n = 6000
    masks = mg._generate_batch(5, regions=np.tile(region, (n, 1)), block=np.zeros(n, bool),
                              rng=rng).numpy()
    counts = masks.sum(0)
    assert counts[~region].sum() == 0
    assert stats.chisquare(counts[region]).pvalue > ALPHA


def test_callers_inputs_are_not_modified():
    rng = np.random.default_rng(14)
    w_np = rng.random((8, L))
    w_np[:, :5] = 0.0
    w_t = torch.rand(8, L)
    fg = torch.rand(8, L) < 0.5
    copies = (w_np.copy(), w_t.clone(), fg.clone())
    gen = mg.MaskGenerator(p_weighting=(0.5, 0.5, 0.0))
    for _ in range(50):
        gen(["bottle"] * 8, fg, w_np, w_t, rng=rng)
        mg._generate(50, weights=w_t[0], region=fg[0], rng=rng)
        mg._generate(50, weights=w_np[0], shape="random", rng=rng)
    assert np.array_equal(w_np, copies[0])
    assert torch.equal(w_t, copies[1]) and torch.equal(fg, copies[2])


# --------------------------------------------------------------------------- frequency

def _patch_grid(pattern_per_patch, size=64, p=16) -> torch.Tensor:
    img = np.zeros((3, size, size), np.float32)
    g = size // p
    for i in range(g):
        for j in range(g):
            img[:, i * p:(i + 1) * p, j * p:(j + 1) * p] = pattern_per_patch(i, j)
    return torch.from_numpy(img)


def test_frequency_weights_patch_mode_scores_high_frequencies():
    yy, xx = np.mgrid[:16, :16]
    checker = ((yy + xx) % 2).astype(np.float32) * 2 - 1  # Nyquist
    mid = np.cos(2 * np.pi * 6 * xx / 16).astype(np.float32)  # 6/16 = .375 cycles/px
    low = np.cos(2 * np.pi * 1 * xx / 16).astype(np.float32)  # 1/16: below the cutoff

    def pattern(i, j):
        return {(0, 0): checker, (1, 2): mid, (2, 1): low, (3, 3): 0.5 * checker}.get(
            (i, j), np.float32(0.3))

    w = mg.frequency_weights(_patch_grid(pattern)[None]).reshape(4, 4)
    assert w[0, 0] == 1.0
    assert 0 < w[1, 2] < 1 and w[3, 3] == pytest.approx(0.25)  # energy is quadratic
    assert w[2, 1] < 1e-6 and w[1, 1] < 1e-6  # low frequency and flat: no energy


def test_frequency_weights_patch_mode_matches_numpy_reference():
    torch.manual_seed(0)
    images = torch.randn(3, 3, 48, 32)
    got = mg.frequency_weights(images, patch_size=16).numpy()
    f = np.fft.fftfreq(16)
    high = np.hypot(f[:, None], f[None, :]) > 0.25
    for n in range(3):
        def energy(c: int, i: int, j: int) -> float:  # of channel c's patch (i, j)
            patch = images[n, c, 16 * i:16 * i + 16, 16 * j:16 * j + 16].numpy()
            return (np.abs(np.fft.fft2(patch)) ** 2)[high].sum()

        e = np.array([[sum(energy(c, i, j) for c in range(3)) for j in range(2)]
                      for i in range(3)]).ravel()
        ref = (e - e.min()) / (e.max() - e.min())
        np.testing.assert_allclose(got[n], ref, atol=1e-5)
    assert got.shape == (3, 6) and got.min() == 0 and got.max() == 1
    single = mg.frequency_weights(images[1:2]).numpy()
    np.testing.assert_allclose(single[0], got[1], atol=1e-6)  # batch-independent


def test_frequency_weights_global_mode_matches_original_definition():
    torch.manual_seed(1)
    images = torch.randn(2, 3, 32, 48)
    got = mg.frequency_weights(images, mode="global").numpy()
    for n in range(2):
        mag = sum(np.abs(np.fft.fftshift(np.fft.fft2(images[n, c].numpy())))
                  for c in range(3))
        e = np.array([mag[16 * i:16 * i + 16, 16 * j:16 * j + 16].sum()
                      for i in range(2) for j in range(3)])
        np.testing.assert_allclose(got[n], (e - e.min()) / (e.max() - e.min()), atol=1e-5)


def test_frequency_weights_edge_cases():
    flat = torch.full((1, 3, 32, 32), 0.7)
    assert torch.equal(mg.frequency_weights(flat), torch.ones(1, 4))
    with pytest.raises(ValueError, match="multiple of patch_size"):
        mg.frequency_weights(torch.zeros(1, 3, 30, 32))
    with pytest.raises(ValueError, match="mode"):
        mg.frequency_weights(torch.zeros(1, 3, 32, 32), mode="local")
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        mg.frequency_weights(torch.zeros(3, 32, 32))


# --------------------------------------------------------------------------- rank weights

def test_rank_loss_weights_against_rankdata():
    g = torch.Generator().manual_seed(2)
    n = 400
    masks = torch.rand(n, L, generator=g) < torch.rand(n, 1, generator=g)
    masks[0] = False
    masks[1] = False
    masks[1, 17] = True  # a single masked patch
    weights = torch.randint(0, 30, (n, L), generator=g).float()  # many ties
    out = mg.rank_loss_weights(masks, weights)
    assert out.shape == (n, L) and out.dtype == torch.float32
    assert (out[~masks] == 0).all()
    assert ((out[masks] >= 1) & (out[masks] <= 4)).all()
    assert out[1, 17] == pytest.approx(2.25) and out[0].sum() == 0
    for i in range(2, n):
        idx = masks[i].nonzero().squeeze(1).numpy()
        if len(idx) < 2:
            continue
        r = stats.rankdata(weights[i, idx].numpy(), method="average") - 1
        ref = (1 + r / (len(idx) - 1)) ** 2
        np.testing.assert_allclose(out[i, idx].numpy(), ref, rtol=1e-6)
        wi, lw = weights[i, idx].numpy(), out[i, idx].numpy()
        order = np.argsort(wi, kind="stable")
        assert (np.diff(lw[order]) >= 0).all()  # monotone in weight
        if (wi == wi.min()).sum() == 1:  # a unique lowest weight gets q = 0
            assert lw.min() == pytest.approx(1.0)
        if (wi == wi.max()).sum() == 1:
            assert lw.max() == pytest.approx(4.0)


def test_rank_loss_weights_distinct_weights_span_one_to_four():
    masks = torch.zeros(1, 10, dtype=torch.bool)
    masks[0, [1, 4, 6, 9]] = True
    weights = torch.tensor([[0.0, 0.3, 9, 9, 0.1, 9, 0.2, 9, 9, 0.05]])
    out = mg.rank_loss_weights(masks, weights)[0]
    expected = torch.zeros(10)
    expected[[9, 4, 6, 1]] = torch.tensor([1.0, (4 / 3) ** 2, (5 / 3) ** 2, 4.0])
    np.testing.assert_allclose(out.numpy(), expected.numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match=r"\(N, L\)"):
        mg.rank_loss_weights(masks[0], weights[0])


# --------------------------------------------------------------------------- dynamic state

CLASSES = ["bottle", "carpet", "screw"]


def _stream(seed: int, n: int, num_patches: int = 12):
    g = torch.Generator().manual_seed(seed)
    class_idx = torch.randint(0, 2, (n,), generator=g)  # class 2 never appears
    masks = torch.rand(n, num_patches, generator=g) < 0.4
    losses = torch.rand(n, num_patches, generator=g) * 5
    losses[~masks] = float("nan")  # unmasked positions must never be read
    return class_idx, masks, losses


def _brute_means(class_idx, masks, losses, num_classes, num_patches):
    sums = np.zeros((num_classes, num_patches))
    counts = np.zeros((num_classes, num_patches), int)
    for c, mrow, lrow in zip(class_idx.tolist(), masks.tolist(), losses.tolist()):
        for p in range(num_patches):
            if mrow[p]:
                sums[c, p] += lrow[p]
                counts[c, p] += 1
    with np.errstate(invalid="ignore"):
        return sums / counts, counts


@pytest.mark.parametrize("batch_size", [1, 7])
def test_dynamic_state_update_matches_brute_force(batch_size):
    class_idx, masks, losses = _stream(0, 40)
    state = mg.DynamicMaskingState(CLASSES, 12)
    for s in range(0, 40, batch_size):
        state.update(class_idx[s:s + batch_size], masks[s:s + batch_size],
                     losses[s:s + batch_size])
    means, counts = _brute_means(class_idx, masks, losses, 3, 12)
    assert np.array_equal(state.counts.numpy(), counts)
    np.testing.assert_allclose(state.mean_losses().numpy(), means, rtol=1e-12, equal_nan=True)


def test_dynamic_state_update_adds_the_other_ranks_batch(two_rank_world):
    """A fake two-rank world whose other rank drew the same batch: the all-reduce doubles
    the batch's sums and counts, so every count doubles and the means stay."""
    calls = two_rank_world
    class_idx, masks, losses = _stream(3, 8)
    state = mg.DynamicMaskingState(CLASSES, 12)
    state.update(class_idx, masks, losses)
    means, counts = _brute_means(class_idx, masks, losses, 3, 12)
    assert calls == [dist.ReduceOp.SUM] and counts.sum() > 0
    assert np.array_equal(state.counts.numpy(), 2 * counts)
    np.testing.assert_allclose(state.mean_losses().numpy(), means, rtol=1e-12, equal_nan=True)


def test_dynamic_state_weights_min_max_fill_and_uniform():
    state = mg.DynamicMaskingState(CLASSES, 4)
    assert torch.equal(state.weights(torch.tensor([0, 2])), torch.ones(2, 4))
    masks = torch.tensor([[True, True, True, False], [True, False, False, False]])
    losses = torch.tensor([[1.0, 3.0, 5.0, 0.0], [3.0, 0.0, 0.0, 0.0]])
    state.update(torch.tensor([0, 0]), masks, losses)
    # means: pos0 = 2, pos1 = 3, pos2 = 5, pos3 unseen -> class mean (2 + 3 + 5) / 3
    w = state.weights(torch.tensor([0, 1, 0]))
    np.testing.assert_allclose(w[0].numpy(), [0.0, 1 / 3, 1.0, (10 / 3 - 2) / 3], rtol=1e-6)
    assert torch.equal(w[1], torch.ones(4)) and torch.equal(w[0], w[2])
    assert torch.equal(state.class_weights()[0], w[0])
    before = state.state_dict()
    state.update(torch.tensor([0]), masks[:1], torch.full((1, 4), float("nan")),
                 valid=torch.tensor(False))  # a dropped step adds nothing, NaN or not
    assert torch.equal(state.state_dict()["loss_sum"], before["loss_sum"])
    assert torch.equal(state.state_dict()["count"], before["count"])
    with pytest.raises((IndexError, RuntimeError)):
        state.update(torch.tensor([3]), masks[:1], losses[:1])
    with pytest.raises(ValueError, match="must be"):
        state.update(torch.tensor([0]), masks, losses)


def test_dynamic_state_dict_roundtrip_by_class_name(tmp_path):
    class_idx, masks, losses = _stream(1, 25)
    state = mg.DynamicMaskingState(CLASSES, 12)
    state.update(class_idx, masks, losses)
    path = tmp_path / "state.pth"
    torch.save(state.state_dict(), path)
    loaded = torch.load(path, weights_only=True)
    other = mg.DynamicMaskingState(["screw", "bottle", "carpet"], 12)  # other order
    other.load_state_dict(loaded)
    assert torch.equal(other.weights(torch.tensor([1, 2, 0])),
                       state.weights(torch.tensor([0, 1, 2])))
    assert torch.equal(other.counts[1], state.counts[0])
    with pytest.raises(ValueError, match="same class set"):
        mg.DynamicMaskingState(["bottle", "carpet", "wood"], 12).load_state_dict(loaded)
    with pytest.raises(ValueError, match="patches"):
        mg.DynamicMaskingState(CLASSES, 196).load_state_dict(loaded)
    with pytest.raises(KeyError, match="missing"):
        other.load_state_dict({"class_names": CLASSES})
    bad = dict(loaded, count=-loaded["count"] - 1)
    with pytest.raises(ValueError, match="corrupt"):
        other.load_state_dict(bad)


def _reduce_worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=2)
    try:
        class_idx, masks, losses = _stream(rank + 10, 20)
        state = mg.DynamicMaskingState(CLASSES, 12)
        state.update(class_idx[:10], masks[:10], losses[:10])
        state.update(class_idx[10:], masks[10:], losses[10:])
        torch.save(state.state_dict(), os.path.join(out_dir, f"rank{rank}.pth"))
    finally:
        dist.destroy_process_group()


def test_dynamic_state_update_sums_over_two_ranks_exactly():
    with tempfile.TemporaryDirectory() as tmp:
        assert run_ranks(_reduce_worker, (os.path.join(tmp, "init"), tmp)) == [0, 0]
        states = [torch.load(os.path.join(tmp, f"rank{r}.pth"), weights_only=True)
                  for r in range(2)]
    streams = [_stream(r + 10, 20) for r in range(2)]
    class_idx, masks, losses = (torch.cat(parts) for parts in zip(*streams))
    means, counts = _brute_means(class_idx, masks, losses, 3, 12)
    for s in states:
        assert np.array_equal(s["count"].numpy(), counts)
        with np.errstate(invalid="ignore"):
            got = s["loss_sum"].numpy() / s["count"].numpy()
        np.testing.assert_allclose(got, means, rtol=1e-12, equal_nan=True)


# --------------------------------------------------------------------------- MaskingPolicy

def _policy(dynamic_start: int = 0, device: str = "cpu", **generator) -> mg.MaskingPolicy:
    return mg.MaskingPolicy(mg.MaskGenerator(**generator), CLASSES,
                            dynamic_start=dynamic_start, seed=3, device=device)


def _batch(seed: int, n: int = 6):
    g = torch.Generator().manual_seed(seed)
    class_idx = torch.randint(0, 3, (n,), generator=g)
    fg = torch.rand(n, L, generator=g) < 0.6
    freq = torch.rand(n, L, generator=g)
    losses = torch.rand(n, L, generator=g) * 4
    return class_idx, fg, freq, losses


def test_policy_draw_counts_index_and_loss_weights():
    policy = _policy(dynamic_start=1)
    class_idx, fg, freq, losses = _batch(0)
    m = [mg.num_masked(mg.CLASS_MASK_RATIOS[CLASSES[i]], L) for i in class_idx.tolist()]
    before = policy.draw(class_idx, fg, freq, epoch=0)
    assert before.masks.shape == (6, L) and before.masks.sum(1).tolist() == m
    assert torch.equal(before.index, before.masks.reshape(-1).nonzero().squeeze(1))
    assert before.loss_weights is None  # no rank weighting before dynamic masking
    policy.observe(class_idx, before.masks, losses)
    after = policy.draw(class_idx, fg, freq, epoch=1)
    dyn = policy.dynamic.weights(class_idx)  # what epoch 1 draws from
    ranked = mg.rank_loss_weights(after.masks, dyn).reshape(-1)[after.index]
    assert torch.equal(after.loss_weights, ranked) and after.loss_weights.shape == (sum(m),)
    with pytest.raises(ValueError, match="frequency weights"):
        policy.draw(class_idx, fg, None, epoch=1)
    with pytest.raises(ValueError, match="class indices"):
        policy.draw(torch.tensor([3]), None, torch.rand(1, L), epoch=1)


def test_dynamic_weights_change_the_masks_from_dynamic_start():
    """Known by construction: once class 0's first m positions have the highest observed
    loss and every other position 0, a dynamic-weighted random mask from `dynamic_start`
    on is exactly those m patches (zero-weight patches come last); before, it is uniform."""
    policy = _policy(dynamic_start=1, p_region=0.0, p_weighting=(0, 1, 0), p_block=0.0)
    m = mg.num_masked(mg.CLASS_MASK_RATIOS[CLASSES[0]], L)
    class_idx = torch.zeros(4, dtype=torch.long)
    planted = torch.zeros(L, dtype=torch.bool)
    planted[:m] = True
    freq = torch.rand(4, L, generator=torch.Generator().manual_seed(0))  # never drawn
    before = policy.draw(class_idx, None, freq, epoch=0)
    policy.observe(class_idx, torch.ones(4, L, dtype=torch.bool), planted.double().expand(4, L))
    after = policy.draw(class_idx, None, freq, epoch=1)
    assert before.masks.sum(1).tolist() == after.masks.sum(1).tolist() == [m] * 4
    assert not (before.masks == planted).all(1).any()
    assert (after.masks == planted).all()


def test_policy_draw_k_uses_the_statistics_after_step_k_minus_2():
    """The host never waits for the step in flight: within an epoch, draw k takes the
    dynamic weights as they were after observe k - 2 (the epoch's start for k < 2)."""
    policy = _policy(p_weighting=(0, 1, 0))
    seen = []
    generate = policy.generator

    def spy(names, fg, freq, dyn, rng):
        seen.append(dyn.copy())
        return generate(names, fg, freq, dyn, rng=rng)

    policy.generator = spy
    after = []  # the class weights after each observe
    for epoch in (0, 1):
        for k in range(4):
            class_idx, fg, freq, losses = _batch(10 * epoch + k)
            drawn = policy.draw(class_idx, fg, freq, epoch)
            policy.observe(class_idx, drawn.masks, losses)
            after.append((class_idx, policy.dynamic.class_weights().numpy()))
    start = [np.ones((3, L), np.float32), after[3][1]]  # each epoch's starting weights
    for step, dyn in enumerate(seen):
        epoch, k = divmod(step, 4)
        table = start[epoch] if k < 2 else after[4 * epoch + k - 2][1]
        class_idx = _batch(10 * epoch + k)[0].numpy()
        np.testing.assert_array_equal(dyn, table[class_idx])


def test_policy_state_dict_resumes_identical_draws():
    a = _policy()
    for k in range(3):
        class_idx, fg, freq, losses = _batch(k)
        a.observe(class_idx, a.draw(class_idx, fg, freq, epoch=0).masks, losses)
    b = _policy()
    b.load_state_dict(a.state_dict())
    for k in range(3):
        class_idx, fg, freq, losses = _batch(100 + k)
        da, db = (p.draw(class_idx, fg, freq, epoch=1) for p in (a, b))
        assert torch.equal(da.masks, db.masks)
        assert torch.equal(da.loss_weights, db.loss_weights)
        for p, d in ((a, da), (b, db)):
            p.observe(class_idx, d.masks, losses)
    assert torch.equal(a.dynamic.counts, b.dynamic.counts)


def test_policy_statistics_live_on_its_device():
    """Host inputs, statistics and masks on the policy's device ('meta' has no data, so
    any read of the device on the host would fail here)."""
    policy = _policy(dynamic_start=5, device="meta")
    class_idx, fg, freq, losses = _batch(0)
    drawn = policy.draw(class_idx, fg, freq, epoch=0)
    assert drawn.masks.device.type == drawn.index.device.type == "meta"
    valid = torch.ones((), dtype=torch.bool, device="meta")
    policy.observe(class_idx, drawn.masks, losses.to("meta"), valid=valid)
    assert policy.dynamic.counts.device.type == "meta"
    assert policy.dynamic.mean_losses().device.type == "meta"


def test_policy_non_finite_statistics_stop_the_next_draw():
    policy = _policy()
    class_idx, fg, freq, losses = _batch(0)
    drawn = policy.draw(class_idx, fg, freq, epoch=0)
    policy.observe(class_idx, drawn.masks, torch.full_like(losses, float("inf")))
    with pytest.raises(ValueError, match="finite"):
        policy.draw(class_idx, fg, freq, epoch=1)


def test_policy_frequency_weights_follow_freq_mode():
    """Each of FREQ_MODES gives the loader's frequency function that mode's weights; any
    other value (None included: there is no run without frequency weights) is refused."""
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for mode in mg.FREQ_MODES:
        policy = mg.MaskingPolicy(mg.MaskGenerator(window_size=(2, 2)), CLASSES,
                                  dynamic_start=0, freq_mode=mode)
        assert torch.equal(policy.frequency(images), mg.frequency_weights(images, 16, mode))
    assert not torch.equal(mg.frequency_weights(images, 16, "patch"),
                           mg.frequency_weights(images, 16, "global"))
    for bad in (None, "local"):
        with pytest.raises(ValueError, match=r"freq_mode must be one of \('patch', "
                                             r"'global'\)"):
            mg.MaskingPolicy(mg.MaskGenerator(), CLASSES, dynamic_start=0, freq_mode=bad)


# --------------------------------------------------------------------------- MaskGenerator

def test_mask_generator_per_class_ratio_by_name():
    gen = mg.MaskGenerator(default_ratio=0.3)
    names = sorted(mg.CLASS_MASK_RATIOS) + ["my_new_class"]
    rng = np.random.default_rng(15)
    fg = torch.from_numpy(rng.random((len(names), L)) < 0.5)
    freq, dyn = torch.rand(len(names), L), torch.rand(len(names), L)
    for _ in range(200):
        perm = rng.permutation(len(names))
        batch = [names[i] for i in perm]
        masks = gen(batch, fg[perm], freq[perm], dyn[perm], rng=rng)
        expected = [int(L * mg.CLASS_MASK_RATIOS.get(c, 0.3)) for c in batch]
        assert masks.sum(1).tolist() == expected
    assert gen.ratio_for("metal_nut") == 0.48 and gen.ratio_for("my_new_class") == 0.3
    assert mg.MaskGenerator(window_size=(8, 8)).num_masked_for("wood") == int(64 * 0.46)


def test_mask_generator_variant_probabilities_chi_square():
    gen = mg.MaskGenerator()
    rng = np.random.default_rng(16)
    n = 12000
    fg = rng.random((n, L)) < 0.7
    _, v = gen.sample(["tile"] * n, fg, rng.random((n, L)), rng.random((n, L)), rng=rng)
    cell = v.region.astype(int) * 6 + v.weighting * 2 + v.block.astype(int)
    assert stats.chisquare(np.bincount(cell, minlength=12)).pvalue > ALPHA


def test_mask_generator_variants_masks_and_fallbacks():
    rng = np.random.default_rng(17)
    n = 2000
    fg = rng.random((n, L)) < 0.6
    freq = rng.random((n, L))
    gen = mg.MaskGenerator()
    masks, v = gen.sample(["bottle"] * n, fg, freq, None, rng=rng)
    masks = masks.numpy()
    assert (masks.sum(1) == 82).all()
    assert not (masks[v.region] & ~fg[v.region]).any()
    assert set(np.unique(v.weighting)) == {0, 2}  # dynamic drawn -> uniform before epoch 100
    _, v2 = gen.sample(["bottle"] * n, None, None, None, rng=rng)
    assert not v2.region.any() and (v2.weighting == 2).all()
    assert 0.45 < v2.block.mean() < 0.55
    with pytest.raises(ValueError, match="fg_masks"):
        gen(["bottle"] * 3, fg[:2], None, None, rng=rng)
    with pytest.raises(ValueError, match="dynamic weights"):  # checked even if not drawn
        mg.MaskGenerator(p_weighting=(0, 0, 1))(["bottle"] * 3, None, None, freq[:2], rng=rng)
    with pytest.raises(TypeError, match="list of names"):
        gen("bottle", None, None, None)
    with pytest.raises(ValueError, match="p_weighting"):
        mg.MaskGenerator(p_weighting=(0.5, 0.5, 0.5))


def test_mask_generator_p_region_extremes_decide_the_region():
    """p_region is the chance of the foreground region: at 1 every sample is region-limited
    and its mask lies inside its foreground (60 patches >= m = 31); at 0 none is and masks
    take patches from the whole grid, so a mask that never leaves the foreground (or a
    flipped comparison) would show."""
    rng = np.random.default_rng(22)
    n, m = 50, mg.num_masked(mg.CLASS_MASK_RATIOS["capsule"], L)
    fg = np.zeros((n, L), bool)
    for row in fg:
        row[rng.choice(L, 60, replace=False)] = True
    for p_region in (1.0, 0.0):
        masks, v = mg.MaskGenerator(p_region=p_region).sample(["capsule"] * n, fg, rng=rng)
        masks = masks.numpy()
        assert m == 31 and (masks.sum(1) == m).all()
        outside = (masks & ~fg).any(1)
        if p_region:
            assert v.region.all() and not outside.any()
        else:
            assert not v.region.any() and outside.all()


def test_mask_generator_weighting_reaches_the_masks():
    """Frequency-weighted random masks prefer high-weight patches; uniform ones do not."""
    rng = np.random.default_rng(18)
    n = 1000
    freq = np.tile(np.linspace(0, 1, L), (n, 1))
    only_freq_random = mg.MaskGenerator(p_region=0, p_weighting=(1, 0, 0), p_block=0)
    masks = only_freq_random(["pill"] * n, None, freq, None, rng=rng).numpy()
    high, low = masks[:, L // 2:].sum(), masks[:, :L // 2].sum()
    assert high > 2.0 * low  # uniform: 1.0
    uniform = mg.MaskGenerator(p_region=0, p_weighting=(0, 0, 1), p_block=0)
    masks = uniform(["pill"] * n, None, freq, None, rng=rng).numpy()
    assert abs(masks[:, L // 2:].sum() / masks[:, :L // 2].sum() - 1) < 0.05


def test_reproducible_with_same_seed():
    fg = torch.rand(16, L, generator=torch.Generator().manual_seed(0)) < 0.5
    freq = torch.rand(16, L)
    dyn = torch.rand(16, L)
    names = [sorted(mg.CLASS_MASK_RATIOS)[i % 15] for i in range(16)]
    gen = mg.MaskGenerator()
    for make in (np.random.default_rng, lambda s: torch.Generator().manual_seed(s)):
        a = gen(names, fg, freq, dyn, rng=make(123))
        b = gen(names, fg, freq, dyn, rng=make(123))
        c = gen(names, fg, freq, dyn, rng=make(124))
        assert torch.equal(a, b) and not torch.equal(a, c)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(mg._generate(40, rng=g1), mg._generate(40, rng=g2))
    assert torch.equal(mg._generate(40, rng=g1), mg._generate(40, rng=g2))  # stream advances
