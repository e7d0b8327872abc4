"""Masks for PMAD's masked-token pre-training (docs/method.md section 5).

The file has two parts. Part 1 states the paper's rules and is meant to be read: per
sample m = num_masked(r, L) (the paper's int(L * r)) patches with the class's ratio r; a
region (foreground-limited or all patches), a weighting (frequency, dynamic or uniform)
and a shape (block-wise or random) drawn independently; the block-wise try and its
acceptance; the frequency and dynamic weights and the rank-weighted loss. Part 2 draws
masks that follow exactly those rules, fast, and is private.

Everything is exact where the original code was not (docs/method.md section 9, items 2, 5,
7, 9, 10): exactly ``num_masked`` patches always, sampling without replacement, caller's
weights never written to, ratios keyed by class name, grid sizes as arguments, and
dynamic-masking statistics that live in the training process, update from any batch
size, reduce across ranks and go into checkpoints.
"""
from __future__ import annotations

import functools
import math
from bisect import bisect_right
from collections import deque
from typing import NamedTuple, Sequence

import numpy as np
import torch
import torch.distributed as dist

from utils import to_device

Rng = np.random.Generator | torch.Generator | None
Rect = tuple[int, int, int, int]  # (top, left, height, width) in patches
Array = torch.Tensor | np.ndarray  # per-sample masks or weights, on the host


# =====================================================================================
# Part 1: the paper's rules (docs/method.md 5)
# =====================================================================================
CLASS_MASK_RATIOS: dict[str, float] = {
    "carpet": 0.16, "grid": 0.16, "leather": 0.12, "tile": 0.38, "wood": 0.46,
    "bottle": 0.42, "cable": 0.28, "capsule": 0.16, "hazelnut": 0.36, "metal_nut": 0.48,
    "pill": 0.48, "screw": 0.04, "toothbrush": 0.22, "transistor": 0.48, "zipper": 0.20,
}
DEFAULT_MASK_RATIO = 0.3  # a class without a Table 6 ratio (training and test alike)
WEIGHTINGS = ("frequency", "dynamic", "uniform")
FREQ_MODES = ("patch", "global")  # frequency_weights' spectra: per patch, whole image
MIN_BLOCK = 4  # patches; BEiT's and the paper's lower bound of a block's area
MAX_TRIES = 10  # tries per block before block placement gives up and tops up
LOG_ASPECT = (math.log(0.3), math.log(1 / 0.3))


def num_masked(ratio: float, num_patches: int) -> int:
    """m = floor(L * r), as the paper (int(196 * r)), of L * r rounded to 9 decimals
    first: in floats 100 * 0.29 is 28.999999999999996, and 0.29 of 100 patches is 29.
    For L = 196 and the paper's ratios this is int(196 * r) exactly."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"masking_generator.num_masked: ratio {ratio} is outside [0, 1]; "
                         "pass a mask ratio between 0 and 1")
    return math.floor(round(num_patches * ratio, 9))


def min_mask_ratio(num_patches: int) -> float:
    """The least ratio with 4 decimals that masks a patch (num_masked >= 1), for the
    errors that refuse one masking none."""
    ratio = math.ceil(1e4 / num_patches) / 1e4
    while num_masked(ratio, num_patches) < 1:  # float rounding of L x r
        ratio += 1e-4
    return ratio


def class_mask_ratio(class_name: str, mask_ratio: float | None = None,
                     default_ratio: float | None = None) -> float:
    """A class's test-time mask ratio (the clean protocol, predict.py): `mask_ratio` for
    every class where given, else the class's ratio of the paper's Table 6, else
    `default_ratio` (DEFAULT_MASK_RATIO where None: training's default --mask_ratio; a
    checkpoint trained at another --mask_ratio does not change it)."""
    if mask_ratio is not None:
        return mask_ratio
    return CLASS_MASK_RATIOS.get(class_name, default_mask_ratio(default_ratio))


def default_mask_ratio(default_ratio: float | None = None) -> float:
    """The test-time ratio of a class without a Table 6 ratio of its own: `default_ratio`
    (--default_mask_ratio), DEFAULT_MASK_RATIO where None."""
    return DEFAULT_MASK_RATIO if default_ratio is None else default_ratio


def _block_size(u_area: float, sqrt_aspect: float, remaining: int, min_block: int,
                max_block: int) -> tuple[int, int]:
    """(h, w) of one block try: area ~ U(min_block, min(remaining, max_block)) (BEiT's
    order when that bound is below min_block), aspect ratio ar = exp(U(ln 0.3, ln 1/0.3))
    given as sqrt(ar), h = round(sqrt(area * ar)), w = round(sqrt(area / ar))."""
    side = math.sqrt(min_block + (min(remaining, max_block) - min_block) * u_area)
    return round(side * sqrt_aspect), round(side / sqrt_aspect)


def _accepts(new: int, remaining: int) -> bool:
    """A block is kept when it adds between 1 and the remaining number of patches."""
    return 0 < new <= remaining


class Variants(NamedTuple):
    """The variant each sample used, after fallbacks (numpy arrays of shape (N,))."""
    region: np.ndarray  # bool: foreground-limited
    weighting: np.ndarray  # int: index into WEIGHTINGS
    block: np.ndarray  # bool: block-wise (else random)


class MaskGenerator:
    """Combinational masking (docs/method.md 5): per sample a region, a weighting and a
    shape are drawn independently, and m = num_masked(ratio of the sample's class, L).

    One mask holds exactly m patches:
    - region: when the region holds at least m patches the mask lies inside it;
      otherwise the whole region is masked first and the rest comes from outside;
    - weights (>= 0) bias the choice: 'random' draws patches without replacement in
      proportion to them (weight-0 patches only once no positive one is left); 'block'
      draws each block's top-left corner in proportion to them among the corners where
      the block fits and that lie in the region (uniformly over those corners when they
      all weigh 0);
    - 'block' (BEiT's block masking): repeat block tries (_block_size, _accepts), up to
      MAX_TRIES per block; region-limited blocks are clipped to the region. max_block
      None means m (BEiT's default: one block may take all m patches). When a block
      fails MAX_TRIES tries the placement stops (as BEiT) and the missing patches are
      topped up as in 'random' (weighted, region first), so the count is always exact.

    Fallbacks, by design: a sample that draws frequency or dynamic weighting while those
    weights are None (dynamic masking starts at epoch 100; frequency weights may be
    disabled) is masked with uniform weights; one that draws the foreground region while
    fg_masks is None (datasets without foreground masks) uses all patches. ``sample``
    returns the variants actually used, for logging.
    """

    def __init__(self, window_size: tuple[int, int] = (14, 14),
                 class_ratios: dict[str, float] = CLASS_MASK_RATIOS,
                 default_ratio: float = DEFAULT_MASK_RATIO, p_region: float = 0.5,
                 p_weighting: tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3),
                 p_block: float = 0.5, min_block: int = MIN_BLOCK,
                 max_block: int | None = None):
        self.window_size = (int(window_size[0]), int(window_size[1]))
        self.num_patches = self.window_size[0] * self.window_size[1]
        self.class_ratios = dict(class_ratios)
        self.default_ratio = float(default_ratio)
        for name, r in [*self.class_ratios.items(), ("default_ratio", default_ratio)]:
            num_masked(r, self.num_patches)  # validates the ratio
        pw = np.asarray(p_weighting, dtype=np.float64)
        if pw.shape != (3,) or (pw < 0).any() or not math.isclose(pw.sum(), 1.0):
            raise ValueError(f"MaskGenerator: p_weighting {tuple(p_weighting)} must be 3 "
                             f"probabilities {WEIGHTINGS} summing to 1")
        for name, p in (("p_region", p_region), ("p_block", p_block)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"MaskGenerator: {name} = {p} must lie in [0, 1]")
        self.p_region, self.p_block = float(p_region), float(p_block)
        self._cum_weighting = np.cumsum(pw)[:2]
        self.min_block, self.max_block = min_block, max_block
        self._m_cache: dict[str, int] = {}

    def ratio_for(self, class_name: str) -> float:
        return self.class_ratios.get(class_name, self.default_ratio)

    def num_masked_for(self, class_name: str) -> int:
        m = self._m_cache.get(class_name)
        if m is None:
            m = self._m_cache[class_name] = num_masked(self.ratio_for(class_name),
                                                       self.num_patches)
        return m

    def __call__(self, class_names: Sequence[str], fg_masks: Array | None = None,
                 freq_weights: Array | None = None, dyn_weights: Array | None = None,
                 rng: Rng = None) -> torch.Tensor:
        """class_names N names; fg_masks (N, L) bool; *_weights (N, L) -> (N, L) bool."""
        return self.sample(class_names, fg_masks, freq_weights, dyn_weights, rng)[0]

    def sample(self, class_names: Sequence[str], fg_masks: Array | None = None,
               freq_weights: Array | None = None, dyn_weights: Array | None = None,
               rng: Rng = None) -> tuple[torch.Tensor, Variants]:
        """As __call__, also returning the variants used per sample."""
        if isinstance(class_names, str):
            raise TypeError("MaskGenerator: class_names must be a list of names, one per "
                            "sample, not a single string")
        n, L = len(class_names), self.num_patches
        rng = as_numpy_rng(rng)
        m = np.fromiter((self.num_masked_for(c) for c in class_names), np.int64, n)
        u = rng.random((n, 3))
        region = u[:, 0] < self.p_region
        weighting = np.searchsorted(self._cum_weighting, u[:, 1], side="right")
        block = u[:, 2] < self.p_block
        if fg_masks is None:
            region[:] = False
            regions = None
        else:
            fg = _to_numpy(fg_masks, bool, "fg_masks", (n, L))
            regions = np.where(region[:, None], fg, True)
        sources = [None if src is None else
                   _to_numpy(src, float, f"{WEIGHTINGS[i]} weights", (n, L))
                   for i, src in enumerate((freq_weights, dyn_weights))]
        for i, src in enumerate(sources):
            if src is None:
                weighting[weighting == i] = 2
        weights = None
        if (weighting < 2).any():
            weights = np.ones((n, L))  # (N, L)
            for i, src in enumerate(sources):
                rows = weighting == i
                if rows.any():
                    weights[rows] = src[rows]
        out = _draw_masks(m, self.window_size, regions, weights, block, rng,
                          self.min_block, self.max_block)
        return torch.from_numpy(out), Variants(region, weighting, block)


def frequency_weights(images: torch.Tensor, patch_size: int = 16, mode: str = "patch",
                      cutoff: float = 0.25) -> torch.Tensor:
    """Per-patch high-frequency weights in [0, 1], min-max normalised per image.

    images (N, C, H, W) -> (N, L). 'patch' (the paper's intent): FFT of each patch on its
    own; the weight is the spectral energy |F|^2, summed over channels, of the bins whose
    radial frequency sqrt(fy^2 + fx^2) exceeds ``cutoff`` cycles/pixel (0.25 = half the
    Nyquist frequency; DC and the lowest bands excluded). 'global' reproduces the
    original code: one FFT of the whole image (per channel, centred with fftshift), the
    magnitudes |F| summed over the bins that fall in each patch-sized cell of the
    spectrum. An image whose patches all score the same gets weight 1 everywhere.
    """
    if images.ndim != 4:
        raise ValueError(f"masking_generator.frequency_weights: images must be "
                         f"(N, C, H, W), got shape {tuple(images.shape)}")
    n, c, height, width = images.shape
    p = patch_size
    if height % p or width % p:
        raise ValueError(f"masking_generator.frequency_weights: image size {height}x"
                         f"{width} is not a multiple of patch_size {p}; resize the images")
    gh, gw = height // p, width // p
    x = images.detach().float()
    if mode == "patch":
        patches = x.reshape(n, c, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5)  # (N,gh,gw,C,p,p)
        spec = torch.fft.fft2(patches)
        power = spec.real ** 2 + spec.imag ** 2
        f = torch.fft.fftfreq(p, device=x.device)
        high = (f[:, None] ** 2 + f[None, :] ** 2) > cutoff ** 2  # (p, p)
        energy = (power * high).sum((-3, -2, -1))  # (N, gh, gw)
    elif mode == "global":
        spec = torch.fft.fftshift(torch.fft.fft2(x), dim=(-2, -1)).abs()  # (N, C, H, W)
        energy = spec.sum(1).reshape(n, gh, p, gw, p).sum((2, 4))  # (N, gh, gw)
    else:
        raise ValueError(f"masking_generator.frequency_weights: mode must be one of "
                         f"{FREQ_MODES}, got {mode!r}")
    return _min_max(energy.reshape(n, gh * gw).double()).float()


def _min_max(x: torch.Tensor) -> torch.Tensor:
    """Row-wise min-max to [0, 1]; a constant row becomes all ones (uniform)."""
    lo = x.min(1, keepdim=True).values
    span = x.max(1, keepdim=True).values - lo
    flat = span <= 0
    return torch.where(flat, torch.ones_like(x), (x - lo) / torch.where(flat, 1.0, span))


def rank_loss_weights(masks: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Loss weight (1 + q)^2 per masked patch, q its rank in [0, 1] by weight.

    masks (N, L) bool, weights (N, L) -> (N, L) float32, 0 at unmasked positions. Among
    one sample's k masked patches, the lowest weight gets q = 0 and the highest q = 1
    (q = rank / (k - 1)); tied weights share their average rank, so equal weights give
    equal loss weights. A lone masked patch gets q = 0.5 (weight 2.25), the mean of q
    for k > 1, so its sample is weighted like any other on average.
    """
    if masks.shape != weights.shape or masks.ndim != 2:
        raise ValueError(f"masking_generator.rank_loss_weights: masks {tuple(masks.shape)}"
                         f" and weights {tuple(weights.shape)} must both be (N, L)")
    masks = masks.bool()
    n, L = masks.shape
    w = weights.detach().double()
    if not torch.isfinite(w[masks]).all():
        raise ValueError("masking_generator.rank_loss_weights: weights of masked patches "
                         "must be finite")
    vals, order = torch.where(masks, w, math.inf).sort(dim=1)  # masked first, (N, L)
    new_group = torch.ones_like(masks)
    new_group[:, 1:] = vals[:, 1:] != vals[:, :-1]
    group = new_group.reshape(-1).cumsum(0) - 1  # ties within a row share a group
    pos = torch.arange(L, dtype=torch.float64, device=w.device).repeat(n)
    n_groups = int(group[-1]) + 1 if group.numel() else 0
    pos_sum = torch.zeros(n_groups, dtype=torch.float64, device=w.device).index_add_(
        0, group, pos)
    size = torch.zeros_like(pos_sum).index_add_(0, group, torch.ones_like(pos))
    avg_rank = (pos_sum / size)[group].reshape(n, L)  # (N, L) in sorted order
    k = masks.sum(1, keepdim=True).double()  # (N, 1)
    q = torch.where(k > 1, avg_rank / (k - 1).clamp(min=1), 0.5)
    sorted_w = torch.where(torch.arange(L, device=w.device)[None, :] < k, (1 + q) ** 2, 0.0)
    return torch.zeros_like(sorted_w).scatter_(1, order, sorted_w).float()  # (N, L)


class DynamicMaskingState:
    """Running mean of the masked patches' losses per class and patch position.

    Lives in the training process (never in DataLoader workers, whose copies go stale:
    docs/method.md 9.2), on the training device. Sums and counts are kept, not means, so that
    batches of any size and sums across ranks combine exactly. Distributed: ``update``
    all-reduces each batch's sums and counts before adding them, so every rank holds,
    and every checkpoint saves, the same global statistics.
    """

    def __init__(self, class_names: Sequence[str], num_patches: int,
                 device: torch.device | str = "cpu"):
        names = list(class_names)
        if not names or len(set(names)) != len(names):
            raise ValueError(f"DynamicMaskingState: class_names must be non-empty and "
                             f"unique, got {names}")
        self.class_names = names
        self.num_patches = int(num_patches)
        self.device = torch.device(device)
        shape = (len(names), self.num_patches)
        self._sum = torch.zeros(shape, dtype=torch.float64, device=self.device)
        self._count = torch.zeros(shape, dtype=torch.int64, device=self.device)

    @property
    def counts(self) -> torch.Tensor:
        """(C, L) int64: how often each class's patch position was masked."""
        return self._count.clone()

    def mean_losses(self) -> torch.Tensor:
        """(C, L) float64 running means; NaN where a position was never masked."""
        return torch.where(self._count > 0, self._sum / self._count.clamp(min=1), math.nan)

    def update(self, class_idx: torch.Tensor, masks: torch.Tensor,
               patch_losses: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Add one batch: class_idx (N,) in [0, C), masks (N, L) bool, patch_losses (N, L);
        ``valid`` (0-d bool) False adds nothing (a step whose loss was not finite).

        Losses are read at masked positions only. Runs on the statistics' device without
        reading it on the host (no boolean indexing, no checks of values); inputs on
        another device are copied without waiting. A non-finite loss at a masked
        position makes the statistics non-finite, which the next draw reports.
        """
        L = self.num_patches
        class_idx = to_device(torch.as_tensor(class_idx), self.device).long().reshape(-1)
        n = class_idx.numel()
        if tuple(masks.shape) != (n, L) or tuple(patch_losses.shape) != (n, L):
            raise ValueError(f"DynamicMaskingState.update: masks {tuple(masks.shape)} and "
                             f"patch_losses {tuple(patch_losses.shape)} must be ({n}, {L})")
        keep = to_device(torch.as_tensor(masks), self.device).bool()  # (N, L)
        if valid is not None:
            keep = keep & valid.to(self.device, non_blocking=True)
        losses = to_device(patch_losses.detach(), self.device).double()
        flat = (class_idx[:, None] * L + torch.arange(L, device=self.device)).reshape(-1)
        batch = torch.zeros(2, self._sum.numel(), dtype=torch.float64, device=self.device)
        batch[0].index_add_(0, flat, torch.where(keep, losses, 0.0).reshape(-1))
        batch[1].index_add_(0, flat, keep.reshape(-1).double())
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch, op=dist.ReduceOp.SUM)  # (2, C * L)
        self._sum += batch[0].view_as(self._sum)
        self._count += batch[1].view_as(self._count).long()  # integers, exact in float64

    def class_weights(self) -> torch.Tensor:
        """(C, L) float32 in [0, 1], min-max normalised per class.

        Positions of a class that were never masked take the mean of its seen positions
        (neutral: neither favoured nor avoided); a class without statistics is uniform.
        """
        mean = self.mean_losses()  # (C, L)
        seen = self._count > 0
        n_seen = seen.sum(1, keepdim=True)
        class_mean = torch.where(seen, mean, 0.0).sum(1, keepdim=True) / n_seen.clamp(min=1)
        return _min_max(torch.where(seen, mean, class_mean)).float()  # (C, L)

    def weights(self, class_idx: torch.Tensor) -> torch.Tensor:
        """class_idx (N,) -> (N, L) float32: each sample's class's row of class_weights."""
        idx = to_device(torch.as_tensor(class_idx), self.device).long().reshape(-1)
        return self.class_weights()[idx]

    def state_dict(self) -> dict:
        return {"class_names": list(self.class_names), "num_patches": self.num_patches,
                "loss_sum": self._sum.cpu().clone(), "count": self._count.cpu().clone()}

    def load_state_dict(self, state: dict) -> None:
        """Load statistics saved by state_dict(); classes are matched by name."""
        missing = {"class_names", "num_patches", "loss_sum", "count"} - set(state)
        if missing:
            raise KeyError(f"DynamicMaskingState.load_state_dict: keys {sorted(missing)} "
                           "missing; the checkpoint was not written by "
                           "DynamicMaskingState.state_dict()")
        names = list(state["class_names"])
        if int(state["num_patches"]) != self.num_patches:
            raise ValueError(f"DynamicMaskingState.load_state_dict: checkpoint has "
                             f"{state['num_patches']} patches per image, this run "
                             f"{self.num_patches}; use the same image and patch size")
        if sorted(names) != sorted(self.class_names):
            raise ValueError(
                f"DynamicMaskingState.load_state_dict: checkpoint classes {names} differ "
                f"from this run's {self.class_names}; resume with the same class set")
        shape = (len(names), self.num_patches)
        loss_sum, count = state["loss_sum"], state["count"]
        if tuple(loss_sum.shape) != shape or tuple(count.shape) != shape:
            raise ValueError(f"DynamicMaskingState.load_state_dict: tensors must be "
                             f"{shape}, got {tuple(loss_sum.shape)} and "
                             f"{tuple(count.shape)}; the checkpoint is corrupt")
        if not torch.isfinite(loss_sum).all() or (count < 0).any():
            raise ValueError("DynamicMaskingState.load_state_dict: non-finite sums or "
                             "negative counts; the checkpoint is corrupt")
        perm = torch.tensor([names.index(c) for c in self.class_names])
        self._sum = loss_sum[perm].to(self.device, torch.float64).clone()
        self._count = count[perm].to(self.device, torch.int64).clone()


class MaskBatch(NamedTuple):
    """One batch's masks on the training device, as the training step takes them."""
    masks: torch.Tensor  # (N, L) bool
    index: torch.Tensor  # (M,) int64: row-major positions of the masked patches
    loss_weights: torch.Tensor | None  # (M,) float32 (1 + q)^2; None before dynamic masking


_DYNAMIC_LAG = 2  # draw k of an epoch uses the statistics after step k - 2 (see draw)


class MaskingPolicy:
    """How each training sample is masked and its loss weighted, over a whole run
    (docs/method.md 5): owns the combinational generator, the dynamic-masking statistics and
    the epoch from which they are used, the frequency weights' mode, the random stream
    and the training device.

    Masks are drawn on the host from host-resident inputs (the loader's class indices,
    foreground masks and frequency weights, which ``frequency`` computes per image in
    the loader's workers): the block placement's tries depend on each other, so a
    device version would either run a data-dependent loop (a host sync per try) or a
    fixed number of tries (not the rules). The masks go to the device without waiting.
    The dynamic statistics stay on the device; each draw uses a host copy of their
    weights taken ``_DYNAMIC_LAG`` steps earlier (at an epoch's first two draws: the
    statistics at the epoch's start, read once per epoch), so the host never waits for
    the step in flight and the choice of statistics is the same on every device.
    """

    def __init__(self, generator: MaskGenerator, class_names: Sequence[str], *,
                 dynamic_start: int, freq_mode: str = "patch", patch_size: int = 16,
                 seed: int | Sequence[int] = 0, device: torch.device | str = "cpu"):
        if freq_mode not in FREQ_MODES:
            raise ValueError(f"MaskingPolicy: freq_mode must be one of {FREQ_MODES} (how "
                             f"frequency_weights takes the spectrum), got {freq_mode!r}")
        self.generator = generator
        self.class_names = list(class_names)
        self.dynamic_start = int(dynamic_start)
        self.device = torch.device(device)
        self.dynamic = DynamicMaskingState(self.class_names, generator.num_patches,
                                           self.device)
        self.rng = np.random.default_rng(seed)
        # (1, C, H, W) -> (1, L), picklable: the dataset calls it in the loader's workers
        self.frequency = functools.partial(frequency_weights, patch_size=patch_size,
                                           mode=freq_mode)
        self._epoch: int | None = None
        self._host_weights: np.ndarray | None = None  # (C, L) the draws use now
        self._pending: deque[_HostCopy] = deque()  # later copies, oldest first

    def draw(self, class_idx: torch.Tensor, fg_masks: torch.Tensor | None,
             freq_weights: torch.Tensor | None, epoch: int) -> MaskBatch:
        """Masks of one batch: class_idx (N,), fg_masks (N, L) bool or None (all
        patches), freq_weights (N, L) from ``frequency`` (required), all on the host ->
        MaskBatch on the device.

        From ``dynamic_start`` on, samples may draw dynamic weights and the loss is
        rank-weighted by them (rank_loss_weights).
        """
        if epoch != self._epoch:
            self._epoch, self._host_weights = epoch, None
            self._pending.clear()
        idx = np.asarray(torch.as_tensor(class_idx).numpy(), dtype=np.int64).reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= len(self.class_names)):
            raise ValueError(f"MaskingPolicy.draw: class indices must lie in "
                             f"[0, {len(self.class_names)}), got {idx.tolist()}")
        if freq_weights is None:
            raise ValueError("MaskingPolicy.draw: the batch has no frequency weights; build "
                             "the dataset with freq_weights=policy.frequency")
        dyn = self._dynamic_weights()[idx] if epoch >= self.dynamic_start else None
        masks = self.generator([self.class_names[i] for i in idx], fg_masks,
                               freq_weights, dyn, rng=self.rng)  # (N, L) bool, host
        index = masks.reshape(-1).nonzero().squeeze(1)  # (M,), host
        loss_weights = None
        if dyn is not None:
            ranked = rank_loss_weights(masks, torch.from_numpy(dyn))  # (N, L)
            loss_weights = to_device(ranked.reshape(-1)[index], self.device)
        return MaskBatch(to_device(masks, self.device), to_device(index, self.device),
                         loss_weights)

    def observe(self, class_idx: torch.Tensor, masks: torch.Tensor,
                patch_losses: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Feed one step's per-patch losses (N, L) back into the dynamic statistics, on
        the device; ``valid`` (0-d bool) False drops the step. Call once per draw."""
        self.dynamic.update(class_idx, masks, patch_losses, valid)
        if self._epoch is not None and self._epoch >= self.dynamic_start:
            self._pending.append(_HostCopy(self.dynamic.class_weights()))

    def _dynamic_weights(self) -> np.ndarray:
        """(C, L) host copy of the dynamic weights, _DYNAMIC_LAG steps old."""
        while len(self._pending) >= _DYNAMIC_LAG:
            self._host_weights = self._pending.popleft().numpy()
        if self._host_weights is None:  # an epoch's first draw: read the device once
            self._host_weights = self.dynamic.class_weights().cpu().numpy()
        return self._host_weights

    def state_dict(self) -> dict:
        """The statistics and every rank's random state; call on every rank (it gathers
        the ranks' states)."""
        state = self.rng.bit_generator.state
        if dist.is_available() and dist.is_initialized():
            states: list = [None] * dist.get_world_size()
            dist.all_gather_object(states, state)
        else:
            states = [state]
        return {"dynamic_masking": self.dynamic.state_dict(), "mask_rng": states}

    def load_state_dict(self, state: dict) -> bool:
        """Load what state_dict saved; returns whether this rank's random state was
        restored (not when the checkpoint holds another number of ranks)."""
        self.dynamic.load_state_dict(state["dynamic_masking"])
        self._epoch, self._host_weights = None, None
        self._pending.clear()
        states = state.get("mask_rng") or []
        rank, world = ((dist.get_rank(), dist.get_world_size())
                       if dist.is_available() and dist.is_initialized() else (0, 1))
        if len(states) != world or states[rank] is None:
            return False
        self.rng.bit_generator.state = states[rank]
        return True


# =====================================================================================
# Part 2: exact and fast drawing (private)
# =====================================================================================
# Random masks of a whole batch come from one sort of exponential race keys; block
# placement runs per sample over Python integers used as bitsets of the patch grid (a
# block is one precomputed pattern shifted to its corner), so a try costs a few integer
# operations instead of numpy calls.
_CHUNK_TRIES = 24  # block tries drawn at once per sample (a mask needs ~8)


class _HostCopy:
    """A device tensor's copy in host memory, started without waiting; ``numpy()``
    waits for that copy only (not for later work on the device)."""

    def __init__(self, t: torch.Tensor):
        self._event = None
        if t.device.type == "cuda":
            self._host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            self._host.copy_(t, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = t.to("cpu", copy=True)

    def numpy(self) -> np.ndarray:
        if self._event is not None:
            self._event.synchronize()
        return self._host.numpy()


def as_numpy_rng(rng: Rng, default_seed: int | None = None) -> np.random.Generator:
    """One numpy Generator for all draws; a torch.Generator seeds it with one draw, None
    gives one seeded with `default_seed` (None: from the OS)."""
    if rng is None:
        return np.random.default_rng(default_seed)
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, torch.Generator):
        seed = int(torch.randint(0, 2 ** 62, (1,), generator=rng).item())
        return np.random.default_rng(seed)
    raise TypeError(f"masking_generator: rng must be a numpy.random.Generator, a "
                    f"torch.Generator or None, got {type(rng).__name__}")


def _to_numpy(x, dtype, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """Read-only view/copy of a tensor or array; the caller's data is never written."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.shape != shape:
        raise ValueError(f"masking_generator: {name} has shape {tuple(arr.shape)}, "
                         f"expected {shape}")
    if dtype is bool:
        if arr.dtype != np.bool_:
            raise TypeError(f"masking_generator: {name} must be boolean (True = patch in "
                            f"the region), got dtype {arr.dtype}")
        return arr
    arr = arr.astype(np.float64, copy=False)
    if not np.isfinite(arr).all() or (arr < 0).any():
        raise ValueError(f"masking_generator: {name} must be finite and >= 0")
    return arr


@functools.lru_cache(maxsize=16)
def _block_patterns(height: int, width: int) -> tuple[tuple[int, ...], ...]:
    """patterns[h][w]: bitset of an h x w block at the top-left corner of the grid.

    Bit i is patch i (row-major), so the block at (top, left) is the pattern shifted left
    by top * width + left.
    """
    rows = [0] + [(1 << w) - 1 for w in range(1, width + 1)]
    out = []
    for h in range(height + 1):
        out.append(tuple(sum(rows[w] << (width * i) for i in range(h))
                         for w in range(width + 1)))
    return tuple(out)


def _bits_from_bool(rows: np.ndarray) -> list[int]:
    """(n, L) bool -> n Python ints, bit i = column i."""
    packed = np.packbits(rows, axis=1, bitorder="little")  # (n, ceil(L / 8))
    buf, size = packed.tobytes(), packed.shape[1]
    return [int.from_bytes(buf[i * size:(i + 1) * size], "little")
            for i in range(len(packed))]


def _bool_from_bits(bits: Sequence[int], num_patches: int) -> np.ndarray:
    """n Python ints -> (n, L) bool."""
    nbytes = (num_patches + 7) // 8
    buf = b"".join(b.to_bytes(nbytes, "little") for b in bits)
    packed = np.frombuffer(buf, np.uint8).reshape(len(bits), nbytes)
    return np.unpackbits(packed, axis=1, bitorder="little")[:, :num_patches].view(bool)


class _CornerTable:
    """Cumulative corner weights of one sample: draws a block's top-left corner in
    proportion to the weights among the corners where an h x w block fits.

    rows[r][c] = sum of weights[r, :c+1]; cols[c][r] = sum of rows[:r+1][c]. A corner
    for a block whose corner must lie in [0, rmax] x [0, cmax] is two bisections.
    """
    __slots__ = ("rows", "cols")

    def __init__(self, rows: list[list[float]], cols: list[list[float]]):
        self.rows, self.cols = rows, cols

    @staticmethod
    def build(weights: np.ndarray) -> list[_CornerTable]:
        """weights (k, H, W) -> k tables, with one cumsum and one tolist for all."""
        rows = np.cumsum(weights, axis=2)  # (k, H, W)
        cols = np.cumsum(rows, axis=1).transpose(0, 2, 1)  # (k, W, H)
        return [_CornerTable(r, c) for r, c in zip(rows.tolist(), cols.tolist())]

    def draw(self, u: float, rmax: int, cmax: int) -> tuple[int, int] | None:
        col = self.cols[cmax]
        total = col[rmax]
        if total <= 0.0:
            return None
        x = u * total
        r = bisect_right(col, x, 0, rmax)
        base = col[r - 1] if r else 0.0
        return r, bisect_right(self.rows[r], x - base, 0, cmax)


def _try_draws(rng: np.random.Generator, n: int) -> list[list[list[float]]]:
    """Per sample 4 flat lists of _CHUNK_TRIES per-try draws: u for the area, sqrt of
    the aspect ratio, u for the top and u for the left of the corner (flat lists: small
    nested lists cost more to build than the tries themselves)."""
    u = rng.random((n, 4, _CHUNK_TRIES))
    u[:, 1] = np.exp(0.5 * (LOG_ASPECT[0] + (LOG_ASPECT[1] - LOG_ASPECT[0]) * u[:, 1]))
    return u.tolist()


def _place_blocks_bitset(m: int, masked: int, free: int, height: int, width: int,
                         table: _CornerTable | None, allowed: np.ndarray | None,
                         draws: list, rng: np.random.Generator,
                         min_block: int, max_block: int) -> tuple[int, list[Rect]]:
    """Block-wise placement of one sample (_block_size, _accepts); may stop short of m.

    m: patches wanted; masked: bitset already masked (region-first); free: bitset of
    patches a block may still add. ``table`` None draws corners uniformly over the grid;
    else by its weights, and uniformly over ``allowed`` (H, W) when all corners where a
    block of the drawn size fits weigh zero. ``draws`` from _try_draws, refilled from
    rng when used up. Returns (masked bitset, blocks placed). Gives up after MAX_TRIES
    failed tries of one block (as BEiT); the caller tops up.
    """
    patterns = _block_patterns(height, width)
    rects: list[Rect] = []
    rem = m - masked.bit_count()
    areas, aspects, tops, lefts = draws
    i = 0  # next unused try
    fallback = None
    while rem > 0:
        for _ in range(MAX_TRIES):
            if i == _CHUNK_TRIES:
                (areas, aspects, tops, lefts), i = _try_draws(rng, 1)[0], 0
            u_area, sqrt_ar, u_top, u_left = areas[i], aspects[i], tops[i], lefts[i]
            i += 1
            h, w = _block_size(u_area, sqrt_ar, rem, min_block, max_block)
            if not (0 < h <= height and 0 < w <= width):
                continue
            if table is None:
                top, left = int(u_top * (height - h + 1)), int(u_left * (width - w + 1))
            else:
                corner = table.draw(u_top, height - h, width - w)
                if corner is None:  # all fitting corners weigh 0: uniform over allowed
                    if fallback is None:
                        fallback = _CornerTable.build(allowed[None] * 1.0)[0]
                    corner = fallback.draw(u_top, height - h, width - w)
                    if corner is None:
                        continue
                top, left = corner
            rect = patterns[h][w] << (top * width + left)
            new = (rect & free).bit_count()
            if _accepts(new, rem):
                masked |= rect & free
                free &= ~rect
                rem -= new
                rects.append((top, left, h, w))
                break
        else:
            break
    return masked, rects


def _fill(pre: np.ndarray, m: np.ndarray, region: np.ndarray, weights: np.ndarray,
          rng: np.random.Generator) -> np.ndarray:
    """Complete each row to exactly m[i] patches, keeping ``pre``; region first.

    pre/region (n, L) bool, weights (n, L) >= 0, m (n,). Order of preference: already
    masked; region patches with weight > 0 in an exponential race (the k smallest E / w,
    E ~ Exp(1), are a draw of k without replacement in proportion to w); region patches
    of weight 0 (uniform, only once the positive ones are used up); then the same two
    tiers outside the region. One sort: key = log E - log w + tier * 4096 (|log E - log
    w| < 1500 for any float64 weight, so tiers never mix).
    """
    n, L = pre.shape
    e = rng.standard_exponential((n, L))
    pos = weights > 0
    key = np.log(np.maximum(e, 1e-300))
    key -= np.log(np.where(pos, weights, 1.0))
    key += 4096.0 * np.where(pre, 0, np.where(region, 1, 3) + ~pos)
    order = np.argsort(key, axis=1)  # (n, L)
    take = np.arange(L)[None, :] < m[:, None]  # (n, L)
    out = np.zeros((n, L), dtype=bool)
    out[np.repeat(np.arange(n), m), order[take]] = True
    return out


def _draw_masks(m: np.ndarray, window_size: tuple[int, int], regions: np.ndarray | None,
                weights: np.ndarray | None, block: np.ndarray, rng: np.random.Generator,
                min_block: int, max_block: int | None,
                rects_out: list[list[Rect]] | None = None,
                blocks_only: bool = False) -> np.ndarray:
    """Masks (N, L) bool of validated arrays: blocks where ``block``, then the top-up."""
    height, width = window_size
    n, L = len(m), height * width
    region = np.ones((n, L), bool) if regions is None else regions  # (n, L)
    w = np.ones((n, L)) if weights is None else weights  # (n, L)
    pre = np.zeros((n, L), bool)
    bidx = np.flatnonzero(block)
    if len(bidx):
        reg_b, w_b, m_b = region[bidx], w[bidx], m[bidx]
        big = reg_b.sum(1) >= m_b  # region holds all m patches
        allowed = np.where(big[:, None], reg_b, True)  # (nb, L)
        first = np.where(big[:, None], False, reg_b)  # region-first pre-mask
        uniform = allowed.all(1) & (w_b == w_b[:, :1]).all(1)
        tables: list[_CornerTable | None] = [None] * len(bidx)
        weighted = np.flatnonzero(~uniform)
        if len(weighted):
            cw = (w_b[weighted] * allowed[weighted]).reshape(-1, height, width)  # (k, H, W)
            for j, t in zip(weighted.tolist(), _CornerTable.build(cw)):
                tables[j] = t
        masked_bits = _bits_from_bool(first)
        free_bits = _bits_from_bool(allowed & ~first)
        draws = _try_draws(rng, len(bidx))
        allowed_hw = allowed.reshape(-1, height, width)
        placed = []
        for j, table in enumerate(tables):
            mj = int(m_b[j])
            bits, rects = _place_blocks_bitset(
                mj, masked_bits[j], free_bits[j], height, width, table, allowed_hw[j],
                draws[j], rng, min_block, mj if max_block is None else max_block)
            placed.append(bits)
            if rects_out is not None:
                rects_out.append(rects)
        pre[bidx] = _bool_from_bits(placed, L)
    if blocks_only:
        return pre
    return _fill(pre, m, region, w, rng)


def _validate_batch(num_masked, n: int | None, window_size: tuple[int, int], regions,
                    weights, block) -> tuple[np.ndarray, np.ndarray | None,
                                              np.ndarray | None, np.ndarray]:
    height, width = (int(s) for s in window_size)
    if height < 1 or width < 1:
        raise ValueError(f"masking_generator: window_size {window_size} must be positive")
    L = height * width
    m = np.atleast_1d(np.asarray(num_masked, dtype=np.int64))
    if n is not None and len(m) == 1:
        m = np.repeat(m, n)
    n = len(m)
    if (m < 0).any() or (m > L).any():
        raise ValueError(f"masking_generator: num_masked {m.tolist()} must lie in "
                         f"[0, {L}] for a {height}x{width} grid")
    regions = None if regions is None else _to_numpy(regions, bool, "region", (n, L))
    weights = None if weights is None else _to_numpy(weights, float, "weights", (n, L))
    block = np.broadcast_to(np.asarray(block, dtype=bool), (n,))
    return m, regions, weights, block


def _generate_batch(num_masked: int | Sequence[int] | np.ndarray, *,
                    window_size: tuple[int, int] = (14, 14),
                    regions: torch.Tensor | np.ndarray | None = None,
                    weights: torch.Tensor | np.ndarray | None = None,
                    block: bool | Sequence[bool] | np.ndarray = True,
                    rng: Rng = None, min_block: int = MIN_BLOCK,
                    max_block: int | None = None) -> torch.Tensor:
    """Masks of a batch in one pass, by MaskGenerator's rules for one mask (tests and
    bench/ call it with a chosen variant).

    num_masked int or (N,), regions (N, L) bool, weights (N, L) >= 0, block bool or (N,)
    -> BoolTensor (N, L). With scalars only, N is taken from regions/weights (else 1).
    """
    n = None
    for arr in (regions, weights):
        if arr is not None:
            n = len(arr)
    if np.ndim(block) == 1:
        n = len(block)
    m, regions, weights, block = _validate_batch(num_masked, n, window_size, regions,
                                                 weights, block)
    out = _draw_masks(m, tuple(window_size), regions, weights, block, as_numpy_rng(rng),
                      min_block, max_block)
    return torch.from_numpy(out)


def _generate(num_masked: int, *, window_size: tuple[int, int] = (14, 14),
              region: torch.Tensor | np.ndarray | None = None,
              weights: torch.Tensor | np.ndarray | None = None, shape: str = "block",
              rng: Rng = None, min_block: int = MIN_BLOCK,
              max_block: int | None = None) -> torch.Tensor:
    """One mask of exactly ``num_masked`` patches -> BoolTensor (H*W,), region (L,)
    bool, weights (L,) >= 0, shape 'block' or 'random' (MaskGenerator's rules)."""
    if shape not in ("block", "random"):
        raise ValueError(f"masking_generator: shape must be 'block' or 'random', got "
                         f"{shape!r}")
    regions = None if region is None else _as_row(region)
    weights = None if weights is None else _as_row(weights)
    return _generate_batch([num_masked], window_size=window_size, regions=regions,
                           weights=weights, block=[shape == "block"], rng=rng,
                           min_block=min_block, max_block=max_block)[0]


def _blocks_only(num_masked: int, *, window_size: tuple[int, int] = (14, 14),
                 region: torch.Tensor | np.ndarray | None = None,
                 weights: torch.Tensor | np.ndarray | None = None, rng: Rng = None,
                 min_block: int = MIN_BLOCK, max_block: int | None = None
                 ) -> tuple[torch.Tensor, list[Rect]]:
    """The block part of ``_generate(shape='block')``, before its top-up.

    Returns (BoolTensor (L,), blocks as (top, left, h, w)); with the same seed, _generate
    draws exactly these blocks and then adds num_masked - mask.sum() patches. Lets tests
    check that block-wise masks are unions of the returned rectangles (clipped to the
    region; plus the whole region when it is smaller than num_masked).
    """
    regions = None if region is None else _as_row(region)
    weights = None if weights is None else _as_row(weights)
    m, regions, weights, block = _validate_batch([num_masked], None, window_size, regions,
                                                 weights, [True])
    rects: list[list[Rect]] = []
    out = _draw_masks(m, tuple(window_size), regions, weights, block, as_numpy_rng(rng),
                      min_block, max_block, rects_out=rects, blocks_only=True)
    return torch.from_numpy(out[0]), rects[0]


def _as_row(x) -> torch.Tensor | np.ndarray:
    return x[None] if isinstance(x, (torch.Tensor, np.ndarray)) else np.asarray(x)[None]
