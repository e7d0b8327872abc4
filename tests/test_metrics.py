"""metrics.py against hand-computed cases, scikit-learn, and a slow reference AUPRO."""

import tracemalloc
import warnings

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

import metrics
from metrics import (METRIC_NAMES, UndefinedMetricWarning, compute_metrics,
                     f1_optimal_threshold, image_ap, image_auroc, image_f1_max, mean_metrics,
                     pixel_ap, pixel_aupro, pixel_auroc, pixel_f1_max)


# ---------------------------------------------------------------- reference implementations

def slow_aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float) -> float:
    """Straight from the definition: one (FPR, PRO) point per distinct score, regions
    8-connected per image, PRO the mean overlap over regions, trapezoid up to the limit
    with linear interpolation there, divided by the limit."""
    normal = maps[~masks]
    regions = []
    for mask, smap in zip(masks, maps):
        labels, n = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [smap[labels == k] for k in range(1, n + 1)]
    fprs, pros = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        fprs.append(np.mean(normal >= t))
        pros.append(np.mean([np.mean(region >= t) for region in regions]))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(zip(fprs, pros), zip(fprs[1:], pros[1:])):
        if x0 >= fpr_limit:
            break
        if x1 > fpr_limit:
            y1 = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            x1 = fpr_limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / fpr_limit


def sklearn_f1_max(labels, scores):
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    with np.errstate(invalid='ignore', divide='ignore'):
        f1 = np.nan_to_num(2 * precision * recall / (precision + recall))[:-1]
    return f1.max(), thresholds[np.argmax(f1)]


def random_masks(rng, n, h, w):
    """Blobs from thresholded smoothed noise: several irregular regions per image, some
    touching only diagonally; every other image is normal."""
    masks = ndimage.gaussian_filter(rng.random((n, h, w)), sigma=(0, 1.2, 1.2)) > 0.56
    masks[::2] = False
    return masks


# ---------------------------------------------------------------- hand-computed cases

def test_image_metrics_hand_computed():
    labels = [0, 0, 1, 1]
    scores = np.array([0.1, 0.4, 0.35, 0.8])
    # positives beat 2/2 and 1/2 negatives -> (1 + 0.5) / 2
    assert image_auroc(labels, scores) == 0.75
    # precision at 0.8: 1/1; at 0.35: 2/3
    assert image_ap(labels, scores) == pytest.approx((1 + 2 / 3) / 2, abs=1e-15)
    # F1 at 0.8: 2/(1+0+2); at 0.35: 4/(2+1+2) = 0.8
    assert image_f1_max(labels, scores) == pytest.approx(0.8, abs=1e-15)
    # F1-optimal call: score >= 0.35; next lower score 0.1 -> midpoint
    assert f1_optimal_threshold(labels, scores) == pytest.approx(0.225, abs=1e-15)


def test_ties_count_half():
    assert image_auroc([0, 1], [0.5, 0.5]) == 0.5
    assert image_ap([0, 1], [0.5, 0.5]) == 0.5
    # one positive above, one tied with the single negative
    assert image_auroc([1, 1, 0], [0.9, 0.2, 0.2]) == 0.75


@pytest.mark.parametrize('chunk', [1, 3, 1 << 16])
def test_f1_threshold_prefers_highest_recall_on_equal_f1(chunk, monkeypatch):
    monkeypatch.setattr(metrics, '_CHUNK', chunk)  # the tie may span chunks
    # F1 at 0.9: 2/(1+0+2) = 2/3; at 0.5: 4/(2+2+2) = 2/3
    labels = [1, 0, 0, 1]
    scores = [0.9, 0.7, 0.6, 0.5]
    assert image_f1_max(labels, scores) == pytest.approx(2 / 3, abs=1e-15)
    assert sklearn_f1_max(labels, scores)[1] == 0.5
    # call score >= 0.5 = everything: below the minimum, the next float down
    assert f1_optimal_threshold(labels, scores) == np.nextafter(0.5, 0)


@pytest.mark.parametrize('chunk', [1, 3, 1 << 16])
def test_f1_threshold_at_a_positive_in_a_later_chunk(chunk, monkeypatch):
    """The F1-optimal score is the highest positive's (F1 2/3 at 0.9 against 4/7 calling
    all five), which a small chunk puts in another chunk than the first: the threshold is
    that score's midpoint with the next lower score, 0.85, not a score of the first chunk."""
    monkeypatch.setattr(metrics, '_CHUNK', chunk)
    labels, scores = [1, 0, 0, 0, 1], [0.9, 0.8, 0.7, 0.6, 0.1]
    assert image_f1_max(labels, scores) == pytest.approx(2 / 3, abs=1e-15)
    assert f1_optimal_threshold(labels, scores) == pytest.approx(0.85, abs=1e-15)


def test_f1_threshold_between_adjacent_floats():
    v = 0.5
    lower = np.nextafter(v, 0)
    labels, scores = [1, 0, 1], [0.9, lower, v]
    assert f1_optimal_threshold(labels, scores) == lower  # '>' still exact


def test_f1_threshold_in_the_scores_precision():
    """float32 scores (ProtoFlow's) are compared with the threshold in float32: a float64
    threshold just below the lowest score would round back onto it and call that image
    normal. Here the F1-optimal call is every image anomalous (F1 8/9, not 3/4)."""
    scores = np.array([0.3, 0.5, 0.7, 0.9, 0.4], dtype=np.float32)
    labels = [1, 1, 0, 1, 1]
    t = f1_optimal_threshold(labels, scores)
    assert t == float(np.nextafter(np.float32(0.3), np.float32(0)))
    assert (scores > t).all() and (torch.from_numpy(scores) > t).all()
    # adjacent float32 values: the midpoint rounds onto one of them, so t is the lower
    v = np.float32(0.5)
    lower = np.nextafter(v, np.float32(0))
    scores = np.array([0.9, lower, v], dtype=np.float32)
    t = f1_optimal_threshold([1, 0, 1], scores)
    assert t == float(lower)
    assert (torch.from_numpy(scores) > t).tolist() == [True, False, True]


def test_pixel_aupro_interpolates_inside_a_tie_group():
    # one region of 2 pixels [0.9, 0.7]; normal pixels [0.7, 0.7, 0.1, 0.1]
    # curve (0, 0) -> (0, 0.5) -> (0.5, 1) -> (1, 1); at FPR 0.3 PRO = 0.8
    masks = np.array([[[1, 1, 0, 0, 0, 0]]])
    maps = np.array([[[0.9, 0.7, 0.7, 0.7, 0.1, 0.1]]])
    assert pixel_aupro(masks, maps) == pytest.approx(0.3 * (0.5 + 0.8) / 2 / 0.3, abs=1e-12)
    assert pixel_aupro(masks, maps, fpr_limit=1.0) == pytest.approx(
        (0.5 * (0.5 + 1) / 2 + 0.5) / 1.0, abs=1e-12)


def test_pixel_aupro_averages_regions_not_pixels():
    # a 3-pixel region fully found, a 1-pixel region missed: PRO 0.5 (pixel share 0.75)
    masks = np.zeros((1, 3, 5), dtype=bool)
    masks[0, 0, :3] = True
    masks[0, 2, 4] = True
    maps = np.full((1, 3, 5), 0.5)
    maps[0, 0, :3] = 0.9
    maps[0, 2, 4] = 0.1
    assert pixel_aupro(masks, maps) == pytest.approx(0.5, abs=1e-12)


def test_pixel_aupro_regions_are_8_connected():
    # (0,0) touches (1,1) diagonally and (1,1)-(1,2) share an edge: one region of 3 with
    # 8-connectivity (PRO 1/3 once (0,0) is found); 4-connectivity would give 2 regions
    masks = np.zeros((1, 4, 4), dtype=bool)
    masks[0, 0, 0] = masks[0, 1, 1] = masks[0, 1, 2] = True
    maps = np.full((1, 4, 4), 0.5)
    maps[0, 0, 0] = 0.9
    maps[0, 1, 1] = maps[0, 1, 2] = 0.1
    assert pixel_aupro(masks, maps) == pytest.approx(1 / 3, abs=1e-12)
    assert metrics.REGION_STRUCTURE.sum() == 9


def test_pixel_auroc_and_ap_hand_computed():
    masks = np.array([[[1, 0], [0, 0]], [[0, 0], [1, 0]]])
    maps = np.array([[[0.9, 0.2], [0.1, 0.3]], [[0.3, 0.0], [0.25, 0.0]]])
    # positives 0.9 (beats 6/6), 0.25 (beats 0.2, 0.1, 0.0, 0.0 -> 4/6)
    assert pixel_auroc(masks, maps) == pytest.approx((1 + 4 / 6) / 2, abs=1e-15)
    # precision at 0.9: 1/1; at 0.25: 2 / (2 + 2 normal pixels at 0.3)
    assert pixel_ap(masks, maps) == pytest.approx((1 + 0.5) / 2, abs=1e-15)
    # F1 at 0.9: 2 / (1 + 0 + 2); at 0.25: 4 / (2 + 2 + 2)
    assert pixel_f1_max(masks, maps) == pytest.approx(2 / 3, abs=1e-15)


@pytest.mark.parametrize('dtype', [np.float32, np.float64])
def test_perfect_and_inverted_maps(dtype):
    rng = np.random.default_rng(3)
    masks = random_masks(rng, 6, 20, 20)
    labels = masks.any(axis=(1, 2)).astype(int)
    perfect = masks.astype(dtype)
    got = compute_metrics(labels, labels.astype(float), masks, perfect)
    assert got == pytest.approx({k: 1.0 for k in METRIC_NAMES}, abs=1e-12)
    inverted = compute_metrics(labels, 1.0 - labels, masks, 1 - perfect)
    assert inverted['image_auroc'] == 0.0
    assert inverted['pixel_auroc'] == 0.0
    assert inverted['pixel_aupro'] == 0.0
    # all scored lowest: precision = fraction of positives
    assert inverted['pixel_ap'] == pytest.approx(masks.mean(), abs=1e-12)


# ---------------------------------------------------------------- against scikit-learn

@pytest.mark.parametrize('seed', range(5))
def test_image_metrics_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 300))
    labels = rng.integers(0, 2, n)
    labels[:2] = [0, 1]
    scores = rng.normal(size=n) + labels
    scores[: n // 2] = np.round(scores[: n // 2], 1)  # many ties
    assert image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores),
                                                        abs=1e-12)
    assert image_ap(labels, scores) == pytest.approx(
        average_precision_score(labels, scores), abs=1e-12)
    f1, threshold = sklearn_f1_max(labels, scores)
    assert image_f1_max(labels, scores) == pytest.approx(f1, abs=1e-12)
    t = f1_optimal_threshold(labels, scores)
    for called in (scores > t, scores >= t):  # the same call: scikit-learn's optimum
        assert np.array_equal(called, scores >= threshold)


@pytest.mark.parametrize('seed,dtype', [(0, np.float32), (1, np.float64), (2, np.float32)])
def test_pixel_metrics_match_sklearn(seed, dtype, monkeypatch):
    monkeypatch.setattr(metrics, '_CHUNK', 97)  # many chunks, uneven last one
    rng = np.random.default_rng(seed)
    masks = random_masks(rng, 8, 24, 24)
    maps = (rng.random(masks.shape) + 0.4 * masks).astype(dtype)
    maps[:3] = np.round(maps[:3], 1)  # ties across normal and anomalous pixels
    y, s = masks.ravel(), maps.ravel()
    assert pixel_auroc(masks, maps) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert pixel_ap(masks, maps) == pytest.approx(average_precision_score(y, s), abs=1e-12)
    assert pixel_f1_max(masks, maps) == pytest.approx(sklearn_f1_max(y, s)[0], abs=1e-12)


# ---------------------------------------------------------------- AUPRO against the definition

@pytest.mark.parametrize('seed,fpr_limit,ties', [(0, 0.3, False), (1, 0.3, True),
                                                  (2, 0.05, True), (3, 1.0, False),
                                                  (4, 0.3, True)])
def test_pixel_aupro_matches_slow_reference(seed, fpr_limit, ties, monkeypatch):
    monkeypatch.setattr(metrics, '_CHUNK', 61)
    rng = np.random.default_rng(seed)
    masks = random_masks(rng, 4, 14, 14)
    n_regions = sum(ndimage.label(m, structure=np.ones((3, 3)))[1] for m in masks)
    assert n_regions >= 3
    maps = rng.random(masks.shape) + 0.3 * masks
    if ties:
        maps = np.round(maps, 1)
    assert pixel_aupro(masks, maps, fpr_limit) == pytest.approx(
        slow_aupro(masks, maps, fpr_limit), abs=1e-12)


# ---------------------------------------------------------------- compute_metrics, inputs

def test_compute_metrics_equals_single_metrics_and_accepts_torch():
    rng = np.random.default_rng(7)
    masks = random_masks(rng, 10, 16, 16)
    labels = masks.any(axis=(1, 2)).astype(np.int64)
    maps = (rng.random(masks.shape) + 0.3 * masks).astype(np.float32)
    scores = maps.max(axis=(1, 2))
    maps_before = maps.copy()
    got = compute_metrics(labels, scores, masks, maps)
    assert np.array_equal(maps, maps_before)  # inputs are not sorted in place
    assert list(got) == list(METRIC_NAMES)
    assert got == {
        'image_auroc': image_auroc(labels, scores),
        'pixel_auroc': pixel_auroc(masks, maps),
        'pixel_aupro': pixel_aupro(masks, maps),
        'image_ap': image_ap(labels, scores),
        'pixel_ap': pixel_ap(masks, maps),
        'image_f1_max': image_f1_max(labels, scores),
        'pixel_f1_max': pixel_f1_max(masks, maps),
    }
    # torch, float {0, 1} masks with a channel axis as the test dataset yields them
    from_torch = compute_metrics(torch.from_numpy(labels), torch.from_numpy(scores),
                                 torch.from_numpy(masks).float()[:, None],
                                 torch.from_numpy(maps)[:, None])
    assert from_torch == got
    half = pixel_auroc(torch.from_numpy(masks), torch.from_numpy(maps).bfloat16())
    assert half == pytest.approx(got['pixel_auroc'], abs=0.02)
    # image labels only (a custom set): the image metrics, the pixel ones undefined
    no_gt = compute_metrics(labels, scores, None, maps)
    assert list(no_gt) == list(METRIC_NAMES)
    for k in METRIC_NAMES:
        assert np.isnan(no_gt[k]) if k.startswith('pixel_') else no_gt[k] == got[k]
    per_type = metrics.per_defect_metrics(labels, ['good' if y == 0 else 'cut' for y in labels],
                                          scores, None, maps)
    assert per_type['cut']['image_auroc'] == got['image_auroc']
    assert np.isnan(per_type['cut']['pixel_auroc'])


def test_only_normal_images_gives_nan_with_warnings():
    masks = np.zeros((4, 8, 8))
    maps = np.random.default_rng(0).random((4, 8, 8))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        got = compute_metrics(np.zeros(4), maps.max(axis=(1, 2)), masks, maps)
    assert all(np.isnan(v) for v in got.values())
    assert sorted(str(w.message).split()[0] for w in caught) == sorted(METRIC_NAMES)
    assert all(w.category is UndefinedMetricWarning for w in caught)
    with pytest.raises(ValueError, match='needs anomalous samples'):
        f1_optimal_threshold([0, 0], [0.1, 0.2])


def test_only_anomalous_images():
    rng = np.random.default_rng(1)
    masks = np.zeros((3, 8, 8), dtype=bool)
    masks[:, 2:4, 2:5] = True
    maps = rng.random(masks.shape) + masks
    with pytest.warns(UndefinedMetricWarning, match='image_auroc is undefined'):
        got = compute_metrics(np.ones(3), maps.max(axis=(1, 2)), masks, maps)
    assert np.isnan(got['image_auroc'])
    assert got['image_ap'] == 1.0 and got['image_f1_max'] == 1.0  # nothing to mistake
    assert got['pixel_auroc'] == 1.0
    assert got['pixel_aupro'] == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize('call,match', [
    (lambda: pixel_auroc(np.full((1, 2, 2), 0.5), np.zeros((1, 2, 2))), 'only 0 and 1'),
    (lambda: image_auroc([0, 1], [0.1, np.nan]), 'NaN or infinite'),
    (lambda: image_auroc([0, 0, 1], [-np.inf, 0.2, 0.5]), 'NaN or infinite'),  # the low end
    (lambda: pixel_aupro(np.eye(3)[None], np.full((1, 3, 3), np.inf)), 'NaN or infinite'),
    (lambda: pixel_ap(np.zeros((2, 4, 4)), np.zeros((2, 4, 5))), 'same shape'),
    (lambda: image_ap([0, 1, 1], [0.1, 0.2]), r'must both be \(N,\)'),
    (lambda: pixel_aupro(np.eye(3)[None], np.eye(3)[None], fpr_limit=0.0), 'fpr_limit'),
    (lambda: compute_metrics([0], [0.3], np.eye(3)[None], np.eye(3)[None]),
     'labelled normal'),
    (lambda: compute_metrics([0, 1], [0.3, 0.4], np.eye(3)[None], np.eye(3)[None]),
     '2 labels but 1 masks'),
    (lambda: image_auroc([0, 1], ['a', 'b']), 'must be numeric'),
])
def test_bad_input_raises(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def test_mean_metrics():
    per_class = {
        'bottle': {'image_auroc': 1.0, 'pixel_auroc': 0.9, 'mask_ratio': 0.1},
        'grid': {'image_auroc': 0.5, 'pixel_auroc': 0.8, 'mask_ratio': 0.3},
    }
    assert mean_metrics(per_class) == pytest.approx({'image_auroc': 0.75,
                                                     'pixel_auroc': 0.85}, abs=1e-15)
    per_class['grid']['image_auroc'] = float('nan')
    with pytest.warns(UndefinedMetricWarning, match=r"\['grid'\]"):
        means = mean_metrics(per_class)
    assert np.isnan(means['image_auroc']) and means['pixel_auroc'] == pytest.approx(0.85)
    # every metric undefined for the same classes (a set without masks): one warning
    per_class['bottle']['pixel_auroc'] = per_class['grid']['pixel_auroc'] = float('nan')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        mean_metrics(per_class)
    assert [str(w.message) for w in caught] == [
        "mean image_auroc is nan because it is undefined for ['grid']",
        "mean pixel_auroc is nan because it is undefined for ['bottle', 'grid']"]
    per_class['bottle']['image_auroc'] = float('nan')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        mean_metrics(per_class)
    assert [str(w.message) for w in caught] == [
        "mean image_auroc, pixel_auroc are nan because they are undefined for "
        "['bottle', 'grid']"]
    del per_class['grid']['pixel_auroc']
    with pytest.raises(ValueError, match="class 'grid' reports"):
        mean_metrics(per_class)
    with pytest.raises(ValueError, match='at least one class'):
        mean_metrics({})


# ---------------------------------------------------------------- memory bound

def test_large_input_memory_is_bounded():
    # 200 x 224 x 224 = 10M pixels of float32 (40 MB); scikit-learn's roc_curve alone
    # would allocate > 300 MB here. Normal pixels ~ U(0, 1), anomalous ~ U(0.5, 1.5):
    # AUROC = 1 - P(X < Y) = 0.875; PRO(FPR f) = 0.5 + f -> AUPRO(0.3) = 0.65.
    rng = np.random.default_rng(0)
    n, size = 200, 224
    masks = np.zeros((n, size, size), dtype=bool)
    for i, (r, c) in enumerate(rng.integers(0, size - 40, (n // 2, 2))):
        masks[i, r:r + 30, c:c + 40] = True
        masks[i, r + 35:r + 40, c:c + 10] = True
    maps = rng.random(masks.shape, dtype=np.float32)
    maps[masks] += 0.5
    labels = masks.any(axis=(1, 2))
    scores = maps.max(axis=(1, 2))
    tracemalloc.start()
    try:
        got = compute_metrics(labels, scores, masks, maps)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 6 * maps.size  # bytes: ~5.05 B/pixel measured
    assert got['pixel_auroc'] == pytest.approx(0.875, abs=0.003)
    assert got['pixel_aupro'] == pytest.approx(0.65, abs=0.005)


def test_per_defect_metrics_hand_computed():
    # 3 normal images, 2 'crack' and 1 'hole'; 1x2-pixel maps, the right pixel defective
    labels = np.array([0, 0, 0, 1, 1, 1])
    types = ["good", "good", "good", "crack", "crack", "hole"]
    scores = np.array([0.1, 0.5, 0.3, 0.4, 0.9, 0.2])
    gts = np.zeros((6, 1, 2))
    gts[3:, 0, 1] = 1
    maps = np.zeros((6, 1, 2))
    maps[:, 0, 1] = [0.0, 0.2, 0.0, 0.5, 0.1, 0.3]
    out = metrics.per_defect_metrics(labels, types, scores, gts, maps)
    assert sorted(out) == ["crack", "hole"]
    # crack vs good: 0.4 beats 0.1, 0.3 (not 0.5); 0.9 beats all -> 5 of 6 pairs
    assert out["crack"]["image_auroc"] == pytest.approx(5 / 6)
    assert out["hole"]["image_auroc"] == pytest.approx(1 / 3)  # 0.2 beats only 0.1
    assert out["crack"]["count"] == 2 and out["hole"]["count"] == 1
    # crack pixels 0.5, 0.1 against the 8 normal pixels of good + crack images
    normal = [0, 0, 0, 0.2, 0, 0, 0, 0]  # left pixels of crack images are 0 too
    expected = roc_auc_score([0] * 8 + [1, 1], normal + [0.5, 0.1])
    assert out["crack"]["pixel_auroc"] == pytest.approx(expected)
    with pytest.raises(ValueError, match="defect types"):
        metrics.per_defect_metrics(labels, types[:5], scores, gts, maps)
