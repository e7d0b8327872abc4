"""Anomaly-detection metrics: image/pixel AUROC, pixel AUPRO, image/pixel AP, image/pixel F1-max.

Every metric here is exact (no binning, no threshold subsampling) and memory-bounded, so
that the whole MVTec AD test set (1,725 x 224 x 224 = 86.6M pixels) fits on a laptop.

How: the scores of the negatives (normal samples / pixels) and of the positives are each
copied once and sorted ascending, in their own floating dtype (float32 maps stay float32).
Every metric is then a sum over positives (or over the top normal pixels for AUPRO) of
counts found by binary search (`np.searchsorted`) in those sorted arrays, evaluated in
fixed-size chunks. No per-pixel index, label or ROC array over all pixels is built (as
scikit-learn's `roc_curve` does: tens of B/pixel, several GB here).

- AUROC = P(s_pos > s_neg) + 0.5 P(s_pos == s_neg): identical to the trapezoidal ROC
  area with ties (scikit-learn's `roc_auc_score`); counts are accumulated in int64, so
  it is exact up to one final float64 division.
- AP = mean over positives of the precision at their own score (scikit-learn's
  `average_precision_score`, step-wise, no interpolation); float64 accumulation.
- F1-max = max over thresholds t in the positive scores of 2 TP / (TP + FP + P), with
  the rule "anomalous iff score >= t" (scikit-learn's `precision_recall_curve`).
- AUPRO: see `pixel_aupro`.

Peak extra memory of the pixel metrics, for N pixels of which P are anomalous (itemsize
b = 4 for float32 maps): N bytes (inverted ground truth; N more if gt_masks are not bool)
+ b * (N - P) (sorted normal scores) + (2 b + 24) * P (anomalous scores, argsort indices,
region weights, their suffix sums; AUPRO only, otherwise b * P) + ~8 MB of chunk buffers.
For float32 maps and bool masks with a few per cent anomalous pixels that is ~5 B/pixel
(measured in tests/test_metrics.py): ~0.45 GB for all of MVTec AD at once.

Undefined metrics (no positives or no negatives where both are needed) are returned as
float('nan') with an `UndefinedMetricWarning`, never as a made-up number.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

METRIC_NAMES = ('image_auroc', 'pixel_auroc', 'pixel_aupro', 'image_ap', 'pixel_ap',
                'image_f1_max', 'pixel_f1_max')
PIXEL_METRICS = tuple(k for k in METRIC_NAMES if k.startswith('pixel_'))

# 8-connectivity, as the official MVTec AD evaluation (`compute_pro` labels ground-truth
# regions with scipy.ndimage.label(gt, np.ones((3, 3)))) and anomalib (OpenCV
# connectedComponents, default connectivity 8) do: diagonal neighbours are one region.
REGION_STRUCTURE = np.ones((3, 3), dtype=bool)

# Queries per binary-search chunk: bounds the int64/float64 temporaries to a few MB each.
_CHUNK = 1 << 16


class UndefinedMetricWarning(RuntimeWarning):
    """A metric needs both classes (or anomalous regions) and the data lacks one."""


@dataclass
class _Ranked:
    """Scores split by ground truth and sorted ascending, shared by all metrics of one set."""
    pos: np.ndarray  # (P,) scores of positives, ascending
    neg: np.ndarray  # (Nn,) scores of negatives, ascending
    # (P + 1,) region-overlap weight (1 / region size) of pos[k:], summed; AUPRO only
    pro_suffix: np.ndarray | None = None
    num_regions: int = 0


def _to_numpy(x: np.ndarray | torch.Tensor) -> np.ndarray:
    """torch tensors (any device, half precision widened) and array-likes -> numpy."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def _scores(x: np.ndarray | torch.Tensor, what: str) -> np.ndarray:
    """Scores as a float array, keeping float32/float64 so no ties are created."""
    x = _to_numpy(x)
    if x.dtype == np.float16:
        return x.astype(np.float32)
    if x.dtype.kind in 'iub':
        return x.astype(np.float64)
    if x.dtype.kind != 'f':
        raise TypeError(f'metrics.py: {what} must be numeric, got dtype {x.dtype}; pass '
                        f'the model scores as a float array or tensor')
    return x


def _binary(x: np.ndarray | torch.Tensor, what: str) -> np.ndarray:
    """Ground truth as bool; anything but {0, 1} is a caller bug (e.g. an unthresholded,
    interpolated mask) and is refused rather than silently thresholded."""
    x = _to_numpy(x)
    if x.dtype == np.bool_:
        return x
    binary = x.astype(bool)
    if not np.array_equal(binary, x):
        bad = np.unique(x[(x != 0) & (x != 1)])[:5]
        raise ValueError(f'metrics.py: {what} must contain only 0 and 1, found e.g. '
                         f'{bad.tolist()}; resize masks with nearest-neighbour '
                         f'interpolation or threshold them (mask > 0.5) first')
    return binary


def _pixel_arrays(gt_masks: np.ndarray | torch.Tensor, score_maps: np.ndarray | torch.Tensor
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(N, H, W) or (N, 1, H, W) inputs -> bool masks (N, H, W), score maps (N, H, W)."""
    masks = _to_numpy(gt_masks)
    maps = _scores(score_maps, 'score_maps')
    given = (masks.shape, maps.shape)
    if masks.ndim == 4 and masks.shape[1] == 1:
        masks = masks[:, 0]
    if maps.ndim == 4 and maps.shape[1] == 1:
        maps = maps[:, 0]
    if masks.ndim != 3 or masks.shape != maps.shape:
        raise ValueError(f'metrics.py: gt_masks {given[0]} and score_maps {given[1]} must '
                         f'both be (N, H, W) (or (N, 1, H, W)) with the same shape; resize '
                         f'the score maps to the mask size')
    if masks.dtype == np.bool_:
        return masks, maps
    binary = np.empty(masks.shape, dtype=bool)  # (N, H, W)
    for i, mask in enumerate(masks):  # per image: float temporaries of one image only
        binary[i] = _binary(mask, 'gt_masks')
    return binary, maps


def _check_finite(x: np.ndarray, what: str) -> np.ndarray:
    """x sorted ascending: NaN sorts last and +-inf to the ends, so checking the two ends
    finds any non-finite score without an (N,) temporary."""
    if x.size and not (np.isfinite(x[0]) and np.isfinite(x[-1])):
        raise ValueError(f'metrics.py: {what} contain NaN or infinite values; fix the '
                         f'model output (e.g. a log of 0) before computing metrics')
    return x


def _rank(positive: np.ndarray, scores: np.ndarray, what: str,
          region_weights: np.ndarray | None = None, num_regions: int = 0) -> _Ranked:
    """Split scores by a bool ground truth of the same shape and sort each side.

    region_weights (P,) are the AUPRO weights of the positives in `scores[positive]`
    order; they are carried through the sort as a suffix sum (P + 1,).
    """
    neg = scores[~positive]  # (Nn,) a copy, sorted in place
    neg.sort()
    pos = scores[positive]  # (P,)
    if region_weights is None:
        pos.sort()
        return _Ranked(_check_finite(pos, what), _check_finite(neg, what))
    order = np.argsort(pos)  # (P,) int64; order within ties is irrelevant
    pos = _check_finite(pos[order], what)
    _check_finite(neg, what)
    suffix = np.zeros(pos.size + 1)  # (P + 1,) float64
    suffix[:-1] = region_weights[order][::-1].cumsum()[::-1]
    return _Ranked(pos, neg, suffix, num_regions)


def _region_weights(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """Per anomalous pixel 1 / (size of its connected region), in masks[masks] order.

    masks: (N, H, W) bool. Regions are found per image with 8-connectivity.
    """
    parts = []
    num_regions = 0
    for mask in masks:
        if not mask.any():
            continue
        labels, n = ndimage.label(mask, structure=REGION_STRUCTURE)  # (H, W) int32
        sizes = np.bincount(labels.ravel())  # (n + 1,)
        parts.append(1.0 / sizes[labels[mask]])
        num_regions += n
    weights = np.concatenate(parts) if parts else np.zeros(0)
    return weights, num_regions


def _undefined(name: str, reason: str) -> float:
    warnings.warn(f'{name} is undefined: {reason}; returning nan', UndefinedMetricWarning,
                  stacklevel=4)  # the caller of the public metric function
    return float('nan')


def _search(a: np.ndarray, q: np.ndarray, side: str) -> np.ndarray:
    """np.searchsorted(a, q, side) for ascending q, searching only the slice of a that
    spans q's values: a chunk of neighbouring queries then stays in cache (~2x faster on
    MVTec-sized arrays than searching all of a)."""
    lo = int(np.searchsorted(a, q[0], 'left'))
    hi = int(np.searchsorted(a, q[-1], 'right'))
    return lo + np.searchsorted(a[lo:hi], q, side)


def _chunks(n: int):
    for start in range(0, n, _CHUNK):
        yield start, min(start + _CHUNK, n)


def _auroc(r: _Ranked, name: str) -> float:
    if r.pos.size == 0 or r.neg.size == 0:
        return _undefined(name, f'{r.pos.size} positive and {r.neg.size} negative samples')
    # Sum over positives of 2 * (#neg < s) + (#neg == s) = left + right, in int64.
    twice_wins = 0
    for a, b in _chunks(r.pos.size):
        q = r.pos[a:b]
        twice_wins += int(_search(r.neg, q, 'left').sum())
        twice_wins += int(_search(r.neg, q, 'right').sum())
    return twice_wins / (2 * r.pos.size * r.neg.size)


def _tp_fp(r: _Ranked, a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
    """TP and FP counts (b - a,) at thresholds t = pos[a:b] with the rule score >= t."""
    q = r.pos[a:b]
    tp = r.pos.size - _search(r.pos, q, 'left')
    fp = r.neg.size - _search(r.neg, q, 'left')
    return tp, fp


def _ap(r: _Ranked, name: str) -> float:
    if r.pos.size == 0:
        return _undefined(name, f'no positive samples among {r.neg.size}')
    total = 0.0
    for a, b in _chunks(r.pos.size):
        tp, fp = _tp_fp(r, a, b)
        total += float((tp / (tp + fp)).sum())
    return total / r.pos.size


def _f1_max(r: _Ranked, name: str) -> tuple[float, float]:
    """(F1-max, its threshold); among equal F1 the lowest threshold (highest recall)."""
    if r.pos.size == 0:
        return _undefined(name, f'no positive samples among {r.neg.size}'), float('nan')
    best, threshold = -1.0, float('nan')
    for a, b in _chunks(r.pos.size):
        tp, fp = _tp_fp(r, a, b)
        f1 = 2 * tp / (tp + fp + r.pos.size)
        k = int(np.argmax(f1))
        if f1[k] > best:
            best, threshold = float(f1[k]), float(r.pos[a + k])
    return best, threshold


def _check_fpr_limit(fpr_limit: float) -> None:
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f'metrics.py: fpr_limit must be in (0, 1], got {fpr_limit}')


def _aupro(r: _Ranked, fpr_limit: float, name: str) -> float:
    """Exact area under the (FPR, PRO) curve of the official MVTec AD evaluation.

    The curve has one point per distinct score t: FPR(t) = #normal >= t / Nn and
    PRO(t) = mean over regions of (#region pixels >= t) / region size, joined linearly
    from (0, 0). Ordering normal pixels by score descending (rank k = 1..Nn, count axis
    x = k), the segment of a tie group of normal pixels with value v runs linearly from
    (#normal > v, PRO(> v)) to (#normal >= v, PRO(>= v)); each normal pixel owns the unit
    slice [k - 1, k] of it, and the slices past x = fpr_limit * Nn are cut there (the
    official linear interpolation at the limit). Summing the per-pixel trapezoids of the
    top ceil(fpr_limit * Nn) normal pixels gives the area exactly.
    """
    if r.num_regions == 0 or r.neg.size == 0:
        return _undefined(name, f'{r.num_regions} anomalous regions and {r.neg.size} normal '
                                f'pixels')
    nn = r.neg.size
    limit = fpr_limit * nn  # in normal-pixel counts
    start = nn - min(nn, math.ceil(limit))
    area = 0.0
    for a, b in _chunks(nn - start):
        v = r.neg[start + a:start + b]  # (c,) ascending
        rank = (nn - (start + np.arange(a, b))).astype(np.float64)  # k of each pixel
        above = nn - _search(r.neg, v, 'right')  # #normal > v
        at_or_above = nn - _search(r.neg, v, 'left')  # #normal >= v
        y_above = r.pro_suffix[_search(r.pos, v, 'right')]  # PRO(> v) * R
        y_at = r.pro_suffix[_search(r.pos, v, 'left')]  # PRO(>= v) * R
        slope = (y_at - y_above) / (at_or_above - above)
        x0 = rank - 1.0
        x1 = np.minimum(rank, limit)
        area += float(((x1 - x0) * (y_above + slope * (0.5 * (x0 + x1) - above))).sum())
    return area / (nn * r.num_regions * fpr_limit)


def _image_arrays(labels: np.ndarray | torch.Tensor, scores: np.ndarray | torch.Tensor
                  ) -> tuple[np.ndarray, np.ndarray]:
    """-> labels (N,) bool, scores (N,) float."""
    y = _binary(labels, 'labels')
    s = _scores(scores, 'image scores')
    if y.ndim != 1 or y.shape != s.shape:
        raise ValueError(f'metrics.py: labels {tuple(y.shape)} and scores {tuple(s.shape)} '
                         f'must both be (N,)')
    return y, s


def _image_ranked(labels: np.ndarray | torch.Tensor, scores: np.ndarray | torch.Tensor
                  ) -> _Ranked:
    return _rank(*_image_arrays(labels, scores), 'image scores')


def _pixel_ranked(gt_masks: np.ndarray | torch.Tensor, score_maps: np.ndarray | torch.Tensor,
                  regions: bool) -> _Ranked:
    masks, maps = _pixel_arrays(gt_masks, score_maps)
    if regions:
        return _rank(masks, maps, 'score maps', *_region_weights(masks))
    return _rank(masks, maps, 'score maps')


def image_auroc(labels: np.ndarray | torch.Tensor, scores: np.ndarray | torch.Tensor) -> float:
    """labels (N,) {0, 1}, scores (N,) -> ROC AUC (nan if one class is absent)."""
    return _auroc(_image_ranked(labels, scores), 'image_auroc')


def image_ap(labels: np.ndarray | torch.Tensor, scores: np.ndarray | torch.Tensor) -> float:
    """labels (N,) {0, 1}, scores (N,) -> average precision (nan without anomalies)."""
    return _ap(_image_ranked(labels, scores), 'image_ap')


def image_f1_max(labels: np.ndarray | torch.Tensor, scores: np.ndarray | torch.Tensor
                 ) -> float:
    """labels (N,) {0, 1}, scores (N,) -> best F1 over thresholds (nan without anomalies)."""
    return _f1_max(_image_ranked(labels, scores), 'image_f1_max')[0]


def f1_optimal_threshold(labels: np.ndarray | torch.Tensor, scores: np.ndarray | torch.Tensor
                         ) -> float:
    """Threshold t whose call "anomalous iff score > t" maximises F1.

    The paper protocol picks ProtoFlow's normal/anomalous threshold this way (docs/method.md 7)
    and the project calls with `>` (protoflow.is_anomalous). The F1-optimal call
    is "score >= v" for an anomalous score v (among equal F1 the lowest v, highest recall,
    as `thresholds[argmax(f1)]` over scikit-learn's precision_recall_curve); t is the
    midpoint between v and the next lower score, so `score >= t` makes the same call too,
    unless v and that score are adjacent floats (then t is the lower score and only `>`
    is exact). t is computed in the scores' own precision: torch and numpy compare a
    float32 score with a float64 threshold by rounding the threshold to float32, which
    would turn a float64 t just below v back into v. A decision threshold cannot be nan:
    a set without anomalies raises.
    """
    r = _image_ranked(labels, scores)
    if r.pos.size == 0:
        raise ValueError(f'metrics.py: f1_optimal_threshold needs anomalous samples, got '
                         f'{r.neg.size} normal and none anomalous; use a threshold from '
                         f'normal data (the clean protocol) instead')
    real = r.pos.dtype.type  # the scores' precision
    v = real(_f1_max(r, 'f1_optimal_threshold')[1])
    below = [side[i - 1] for side in (r.pos, r.neg)
             if (i := int(np.searchsorted(side, v, 'left'))) > 0]
    if not below:
        return float(np.nextafter(v, real(-np.inf)))
    lower = real(max(below))
    t = real((float(lower) + float(v)) / 2)
    return float(t if lower < t < v else lower)


def pixel_auroc(gt_masks: np.ndarray | torch.Tensor, score_maps: np.ndarray | torch.Tensor
                ) -> float:
    """gt_masks (N, H, W) {0, 1}, score_maps (N, H, W) -> pixel-level ROC AUC."""
    return _auroc(_pixel_ranked(gt_masks, score_maps, regions=False), 'pixel_auroc')


def pixel_ap(gt_masks: np.ndarray | torch.Tensor, score_maps: np.ndarray | torch.Tensor
             ) -> float:
    """gt_masks (N, H, W) {0, 1}, score_maps (N, H, W) -> pixel-level average precision."""
    return _ap(_pixel_ranked(gt_masks, score_maps, regions=False), 'pixel_ap')


def pixel_f1_max(gt_masks: np.ndarray | torch.Tensor, score_maps: np.ndarray | torch.Tensor
                 ) -> float:
    """gt_masks (N, H, W) {0, 1}, score_maps (N, H, W) -> best pixel-level F1 over all
    thresholds (ADer's benchmark reports it beside AUPRO and AP). Exact: every anomalous
    pixel's score is tried as the threshold, by binary search in the sorted scores."""
    return _f1_max(_pixel_ranked(gt_masks, score_maps, regions=False), 'pixel_f1_max')[0]


def pixel_aupro(gt_masks: np.ndarray | torch.Tensor, score_maps: np.ndarray | torch.Tensor,
                fpr_limit: float = 0.3) -> float:
    """Normalised area under the per-region-overlap curve up to FPR `fpr_limit`.

    As the MVTec AD benchmark defines it: ground-truth regions are the 8-connected
    components of each image's mask; at every threshold PRO is the mean overlap over all
    regions of all images and FPR is over all normal pixels (of normal and anomalous
    images); the area up to `fpr_limit` (linear interpolation at the limit) is divided by
    `fpr_limit`, so a perfect map scores 1. Exact: no threshold subsampling; float64 sums
    (relative error ~1e-12; the official script's float32 FPRs differ by ~1e-7).
    Extra memory: ~N bytes + b * (N - P) + (2 b + 24) * P for N pixels, P anomalous.
    """
    _check_fpr_limit(fpr_limit)
    return _aupro(_pixel_ranked(gt_masks, score_maps, regions=True), fpr_limit, 'pixel_aupro')


def compute_metrics(labels: np.ndarray | torch.Tensor, image_scores: np.ndarray | torch.Tensor,
                    gt_masks: np.ndarray | torch.Tensor | None,
                    score_maps: np.ndarray | torch.Tensor,
                    fpr_limit: float = 0.3) -> dict[str, float]:
    """All METRIC_NAMES for one class; each set is sorted once and shared by its metrics.

    labels (N,) {0, 1}; image_scores (N,); gt_masks (N, H, W) {0, 1}; score_maps (N, H, W)
    (torch or numpy; (N, 1, H, W) accepted). A normal-labelled image with anomalous pixels
    is refused: it means labels and masks are misaligned. gt_masks None (a set with image
    labels only, e.g. a custom set): the pixel metrics are undefined (nan).
    """
    _check_fpr_limit(fpr_limit)
    y, s = _image_arrays(labels, image_scores)
    image = _rank(y, s, 'image scores')
    if gt_masks is None:
        known = {'image_auroc': _auroc(image, 'image_auroc'), 'image_ap': _ap(image, 'image_ap'),
                 'image_f1_max': _f1_max(image, 'image_f1_max')[0]}
        return {k: known.get(k, float('nan')) for k in METRIC_NAMES}
    masks, maps = _pixel_arrays(gt_masks, score_maps)
    if masks.shape[0] != y.shape[0]:
        raise ValueError(f'metrics.py: {y.shape[0]} labels but {masks.shape[0]} masks; pass '
                         f'one label, score, mask and map per image')
    mislabelled = np.flatnonzero(~y & masks.any(axis=(1, 2)))
    if mislabelled.size:
        raise ValueError(f'metrics.py: images {mislabelled[:10].tolist()} are labelled '
                         f'normal (0) but their gt_masks have anomalous pixels; check that '
                         f'labels and masks come from the same images in the same order')
    pixel = _rank(masks, maps, 'score maps', *_region_weights(masks))
    return {
        'image_auroc': _auroc(image, 'image_auroc'),
        'pixel_auroc': _auroc(pixel, 'pixel_auroc'),
        'pixel_aupro': _aupro(pixel, fpr_limit, 'pixel_aupro'),
        'image_ap': _ap(image, 'image_ap'),
        'pixel_ap': _ap(pixel, 'pixel_ap'),
        'image_f1_max': _f1_max(image, 'image_f1_max')[0],
        'pixel_f1_max': _f1_max(pixel, 'pixel_f1_max')[0],
    }


def per_defect_metrics(labels: np.ndarray | torch.Tensor, defect_types: Sequence[str],
                       image_scores: np.ndarray | torch.Tensor,
                       gt_masks: np.ndarray | torch.Tensor | None,
                       score_maps: np.ndarray | torch.Tensor
                       ) -> dict[str, dict[str, float]]:
    """Where a method wins and loses: per defect type, image AUROC of that type's images
    against the normal ones, and pixel AUROC over the normal images plus that type's.

    labels (N,), defect_types N names ('good' for normal images), image_scores (N,),
    gt_masks and score_maps (N, H, W); gt_masks None: pixel AUROC nan.
    -> {type: {'image_auroc', 'pixel_auroc', 'count'}}.
    """
    y = _to_numpy(labels).reshape(-1).astype(bool)
    types = np.asarray(list(defect_types))
    if types.shape != y.shape:
        raise ValueError(f'metrics.py: {types.size} defect types for {y.size} labels')
    scores, maps = _to_numpy(image_scores), _to_numpy(score_maps)
    masks = None if gt_masks is None else _to_numpy(gt_masks)
    normal = ~y
    out = {}
    for t in sorted(set(types[y].tolist())):
        sel = normal | (types == t)
        out[t] = {'image_auroc': image_auroc(y[sel], scores[sel]),
                  'pixel_auroc': (float('nan') if masks is None
                                  else pixel_auroc(masks[sel], maps[sel])),
                  'count': int((types == t).sum())}
    return out


def mean_metrics(per_class: dict[str, dict]) -> dict[str, float]:
    """Unweighted mean over classes of each metric in METRIC_NAMES (as the field reports).

    Keys outside METRIC_NAMES (e.g. a chosen mask ratio) are ignored. Every class must
    report the same metrics; a nan in any class makes that mean nan (with a warning
    naming the classes) rather than a mean over fewer classes.
    """
    if not per_class:
        raise ValueError('metrics.py: mean_metrics needs at least one class')
    present = {c: [k for k in METRIC_NAMES if k in m] for c, m in per_class.items()}
    first_class, keys = next(iter(present.items()))
    for c, ks in present.items():
        if ks != keys:
            raise ValueError(f'metrics.py: class {c!r} reports metrics {ks} but class '
                             f'{first_class!r} reports {keys}; compute the same metrics '
                             f'for every class')
    means, undefined = {}, {}
    for k in keys:
        values = np.array([float(per_class[c][k]) for c in per_class])
        nan_classes = tuple(c for c, v in zip(per_class, values) if math.isnan(v))
        if nan_classes:
            undefined.setdefault(nan_classes, []).append(k)
        means[k] = float(values.mean())
    for nan_classes, names in undefined.items():  # one line per set of classes, not per metric
        one = len(names) == 1
        warnings.warn(f"mean {', '.join(names)} {'is' if one else 'are'} nan because "
                      f"{'it is' if one else 'they are'} undefined for {list(nan_classes)}",
                      UndefinedMetricWarning, stacklevel=2)
    return means
