"""protocols.py by hand: PMAD's score map, the covering passes, the paper protocol's
ratio sweep, the anomalous call and the diagnostics, on tiny cases whose answers are
known by construction (not by re-running the product's own expressions)."""
from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from sklearn.metrics import roc_auc_score

import metrics
import protocols
import protoflow
import utils


def test_gaussian_blur_equals_scipy() -> None:
    """Every sigma above 0 smooths, as scipy does: a small one (0.5, radius 2) too, not
    only the usual 4 (a sigma <= 0.5 cut-off would return the maps unsmoothed), and one
    whose kernel is wider than the map."""
    maps = torch.rand(3, 40, 33, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for sigma in (0.5, 4.0):
        ours = protocols.gaussian_blur(maps, sigma).numpy()
        ref = np.stack([gaussian_filter(m, sigma=sigma) for m in maps.numpy()])
        np.testing.assert_allclose(ours, ref, atol=1e-12, err_msg=str(sigma))
        assert np.abs(ours - maps.numpy()).max() > 0.1, sigma
    assert protocols.gaussian_blur(maps[:0], 4.0).shape == (0, 40, 33)
    # a kernel wider than the map (radius 4 sigma >= its side) reflects again and again,
    # as scipy does: one reflection and a clamp to the edge differed by up to 5e-4
    for small, sigma in ((maps[:, :10, :7], 4.0), (maps, 60.0)):
        ours = protocols.gaussian_blur(small, sigma).numpy()
        ref = np.stack([gaussian_filter(m, sigma=sigma) for m in small.numpy()])
        np.testing.assert_allclose(ours, ref, atol=1e-12, err_msg=str(sigma))


# ----------------------------------------------------------------------------- by hand
class ConstantViT(torch.nn.Module):
    """A stand-in ViT whose prediction is the same for every masked patch: token 0 with
    probability 3/4, token 1 with 1/4. So a patch's masked-token score is known by
    construction: log(4/3) for token 0, log 4 for token 1."""

    def __init__(self, grid: tuple[int, int] = (2, 2)) -> None:
        super().__init__()
        self.patch_embed = type("PE", (), {"grid_size": grid,
                                           "num_patches": grid[0] * grid[1]})()
        self.lm_head = torch.nn.Linear(1, 2)  # V = 2 tokens
        self.logits = torch.log(torch.tensor([0.75, 0.25]))

    def forward(self, x: torch.Tensor, bool_masked_pos: torch.Tensor,
                masked_index: torch.Tensor | None = None) -> torch.Tensor:
        return self.logits.expand(int(bool_masked_pos.sum()), 2)


CE0, CE1 = math.log(4 / 3), math.log(4)


def _hand_data(size: int = 3) -> protocols.ClassData:
    """Two 2x2-patch images (S x S pixels). Image 0 is normal; image 1 has a defect in
    its bottom-right patch (3), whose token is the rare one and whose ProtoFlow
    log-likelihood is low."""
    logp = torch.zeros(2, 2, 2)
    logp[1, 1, 1] = -math.log(4.0)  # prob 1/4 relative to the set's maximum
    logp[0, 0, 0] = -math.log(2.0)  # a mildly unusual normal patch
    tokens = torch.zeros(2, 4, dtype=torch.long)
    tokens[1, 3] = 1
    gt = torch.zeros(2, size, size)
    gt[1, -1, -1] = 1
    return protocols.ClassData(torch.zeros(2, 3, size, size), tokens, logp, -logp,
                              np.array([0, 1]), gt, ["good_000", "bad_000"],
                              ["good", "crack"], ["sha-of-good_000", "sha-of-bad_000"])


PAPER_MAP = protocols.CleanOptions("proposal", "cover", "paper", "product")


def test_non_finite_token_scores_name_the_checkpoint() -> None:
    """A ViT whose weights hold NaN scores NaN: one clear error naming --ckpt and the
    first image, instead of NaN maps failing later in the metrics or the heat maps."""
    model = ConstantViT()
    model.logits = torch.tensor([float("nan"), 0.0])
    data = _hand_data()
    masks = torch.tensor([[False, False, False, False], [False, False, False, True]])
    with pytest.raises(utils.CheckpointError, match=(
            r"^the ViT gives non-finite token scores to 1 of 2 image\(s\) \(bad_000, ...\): "
            r"its weights \(--ckpt\) are damaged")):
        protocols.masked_token_scores(model, data, masks, 2, torch.device("cpu"), "none")
    model.logits = torch.log(torch.tensor([0.75, 0.25]))
    scores = protocols.masked_token_scores(model, data, masks, 2, torch.device("cpu"), "none")
    assert scores[1, 3].item() == pytest.approx(CE1) and scores.sum() == scores[1, 3]


def test_each_covering_pass_names_its_progress_bar(monkeypatch) -> None:
    """The ViT's progress bars say which covering pass they are (four bars all named
    'ViT' said nothing of how far the class was), and the passes' scores add up; the
    paper protocol's say which mask ratio."""
    names = []

    def named_progress(iterable, desc: str, **kwargs):
        names.append(desc)
        return iterable
    monkeypatch.setattr(protocols, "progress", named_progress)
    model = ConstantViT()
    model.logits = torch.log(torch.tensor([0.75, 0.25]))
    passes = [torch.tensor([[True, True, False, False]] * 2),
              torch.tensor([[False, False, True, True]] * 2)]
    scores = protocols.covered_token_scores(model, _hand_data(), passes, 2,
                                            torch.device("cpu"), "none")
    assert names == ["ViT, pass 1/2", "ViT, pass 2/2"]
    assert scores[1, 3].item() == pytest.approx(CE1) and scores[0, 3].item() == pytest.approx(
        CE0)
    names.clear()  # the paper protocol's: one bar per mask ratio, named by it
    data = _called_normal_data()
    proposals = protoflow.proposals_from_log_likelihood(data.log_likelihood, image_size=4,
                                                        grid=(2, 2))
    protocols.sweep_mask_ratios(model, data, proposals, torch.zeros(5, dtype=torch.bool),
                                (0.26, 0.5), sigma=0.0, batch_size=5,
                                device=torch.device("cpu"), amp="none", seed=0)
    assert names == ["ViT, mask ratio 0.26", "ViT, mask ratio 0.50"]


def _hand_maps() -> dict[str, torch.Tensor]:
    """The 2x2-patch case's unsmoothed 3x3 maps at ratio 0.5 with covering passes and the
    paper's product, by hand: every map is its 2x2 patch values resized bilinearly with
    aligned corners (corners kept, edge midpoints the mean of 2, the centre the mean of 4)."""
    # image 1: patch CEs [CE0, CE0; CE0, CE1]; image 0: every token is 0, so CE0 everywhere
    ce1 = torch.tensor([[CE0, CE0, CE0],
                        [CE0, (3 * CE0 + CE1) / 4, (CE0 + CE1) / 2],
                        [CE0, (CE0 + CE1) / 2, CE1]])
    # prob (relative to the set's max, 1): image 1 [1, 1; 1, 1/4], image 0 [1/2, 1; 1, 1]
    prob1 = torch.tensor([[1.0, 1.0, 1.0],
                          [1.0, (3 + 0.25) / 4, (1 + 0.25) / 2],
                          [1.0, (1 + 0.25) / 2, 0.25]])
    prob0 = torch.tensor([[0.5, 0.75, 1.0], [0.75, 0.875, 1.0], [1.0, 1.0, 1.0]])
    # PatchCore: the distances -logp, image 0 [ln 2, 0; 0, 0], image 1 [0, 0; 0, ln 4]
    ln2, ln4 = math.log(2), math.log(4)
    dist0 = torch.tensor([[ln2, ln2 / 2, 0.0], [ln2 / 2, ln2 / 4, 0.0], [0.0, 0.0, 0.0]])
    dist1 = torch.tensor([[0.0, 0.0, 0.0], [0.0, ln4 / 4, ln4 / 2], [0.0, ln4 / 2, ln4]])
    return {"pmad": torch.stack([CE0 * (1 - prob0), ce1 * (1 - prob1)]),
            "protoflow_only": torch.stack([1 - prob0, 1 - prob1]),
            "patchcore": torch.stack([dist0, dist1]),
            "ce_only": torch.stack([torch.full((3, 3), CE0), ce1])}


def test_pmad_map_of_a_2x2_patch_case_by_hand() -> None:
    """The paper's map: CE per patch, bilinear (aligned corners) to 3x3, times ProtoFlow's
    abnormality map (max(prob) - prob over the set, resized the same way); sigma 0: no
    smoothing."""
    data = _hand_data()
    record, maps, _ = protocols.evaluate_clean(
        ConstantViT(), data, ratio=0.5, threshold=None, options=PAPER_MAP,
        sigma=0.0, batch_size=2, device=torch.device("cpu"), amp="none", seed=0)
    hand = _hand_maps()
    assert torch.allclose(maps["pmad"], hand["pmad"], atol=1e-6)
    assert maps["pmad"][1, 2, 2] == pytest.approx(CE1 * 0.75, abs=1e-6)
    assert record["image_auroc"] == 1.0  # 0.75 log 4 > 0.5 log(4/3)
    # the baselines from the same pass: ProtoFlow's map alone, PatchCore's distances, CE
    for name in ("protoflow_only", "patchcore", "ce_only"):
        assert torch.allclose(maps[name], hand[name], atol=1e-6), name
    assert maps["patchcore"][1, 2, 2] == pytest.approx(math.log(4), abs=1e-6)
    # the diagnostics read the proposal pass (patches 3 and 1 of image 1: its defect), not
    # the last covering pass (the other two patches)
    assert record["diagnostics"]["masked_defect_fraction"] == 1.0


def _scipy_blur(maps: np.ndarray, sigma: float) -> np.ndarray:
    """scipy's Gaussian filter, image by image, as gaussian_blur documents it."""
    return np.stack([gaussian_filter(m, sigma=sigma, mode="reflect", truncate=4.0)
                     for m in maps])


def test_clean_maps_are_gaussian_smoothed_with_sigma() -> None:
    """sigma 1: PMAD's map and every baseline map are the by-hand unsmoothed maps smoothed
    by scipy's gaussian_filter (reflect, truncate 4), and the image score is the smoothed
    map's maximum."""
    _, maps, scores = protocols.evaluate_clean(
        ConstantViT(), _hand_data(), ratio=0.5, threshold=None, options=PAPER_MAP,
        sigma=1.0, batch_size=2, device=torch.device("cpu"), amp="none", seed=0)
    for name, sharp in _hand_maps().items():
        expected = _scipy_blur(sharp.double().numpy(), 1.0)
        assert np.abs(expected - sharp.numpy()).max() > 0.05, name  # smoothing shows
        np.testing.assert_allclose(maps[name].numpy(), expected, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(scores["pmad"].numpy(),
                               _scipy_blur(_hand_maps()["pmad"].double().numpy(), 1.0)
                               .reshape(2, -1).max(1), atol=1e-6)


def test_paper_protocol_smooths_twice_for_the_pixel_metrics() -> None:
    """The paper protocol at sigma 1: PMAD's map is the sigma-0 map smoothed once, and each
    ratio's pixel AUROC is taken on the map smoothed a second time (method.md: the
    original smooths again before the pixel metrics), and so are the baselines'. Image
    1's ground truth is a diagonal scratch, on which once- and twice-smoothed maps rank
    the pixels differently. Every ratio from 0.26 to 0.48 masks one patch, the same one
    (the maps are equal); below 0.25 none (all-zero maps: AUROC 0.5)."""
    data = _hand_data(size=4)
    data.gt_masks[1] = torch.eye(4)
    kw = dict(batch_size=2, device=torch.device("cpu"), amp="none", seed=0)
    _, sharp, _ = protocols.evaluate_paper(ConstantViT(), data, sigma=0.0, **kw)
    record, maps, scores = protocols.evaluate_paper(ConstantViT(), data, sigma=1.0, **kw)
    assert record["mask_ratio"] == 0.26
    once = _scipy_blur(sharp["pmad"].double().numpy(), 1.0)
    twice = _scipy_blur(once, 1.0)
    np.testing.assert_allclose(maps["pmad"].numpy(), once, atol=1e-6)
    gt = data.gt_masks.numpy().ravel() > 0
    auroc_twice = roc_auc_score(gt, twice.ravel())
    assert abs(auroc_twice - roc_auc_score(gt, once.ravel())) > 0.05  # the data tells them apart
    for r in protocols.PAPER_RATIOS:
        expected = 0.5 if r < 0.25 else auroc_twice
        assert record["per_ratio"][f"{r:.2f}"]["pixel_auroc"] == pytest.approx(
            expected, abs=1e-12), r
    for name in ("protoflow_only", "patchcore"):  # the baselines' rows alike
        once = maps[name].double().numpy()
        twice = _scipy_blur(once, 1.0)
        assert abs(roc_auc_score(gt, twice.ravel()) - roc_auc_score(gt, once.ravel())) > 0.01
        assert record[name]["pixel_auroc"] == pytest.approx(
            roc_auc_score(gt, twice.ravel()), abs=1e-12), name
        # but its image scores, as PMAD's, are the maxima of the maps smoothed once
        assert twice.max() < once.max() - 1e-3
        assert torch.equal(scores[name], maps[name].flatten(1).amax(1)), name


def test_weighted_log_map_of_a_2x2_patch_case_by_hand() -> None:
    """The clean protocol's default map: ProtoFlow's abnormality in log units,
    max(logp) - logp, times 1 + CE / ln V (V = 2 here); another CE weight scales CE's
    share, and weight 0 is ProtoFlow's map alone."""
    data = _hand_data()
    record, maps, scores = protocols.evaluate_clean(
        ConstantViT(), data, ratio=0.5, threshold=None, options=protocols.CleanOptions(),
        sigma=0.0, batch_size=2, device=torch.device("cpu"), amp="none", seed=0)
    ln4 = math.log(4)
    a1 = torch.tensor([[0, 0, 0], [0, ln4 / 4, ln4 / 2], [0, ln4 / 2, ln4]])  # image 1
    ce1 = torch.tensor([[CE0, CE0, CE0],
                        [CE0, (3 * CE0 + CE1) / 4, (CE0 + CE1) / 2],
                        [CE0, (CE0 + CE1) / 2, CE1]])
    assert torch.allclose(maps["pmad"][1], a1 * (1 + ce1 / math.log(2)), atol=1e-6)
    assert maps["pmad"][1, 2, 2] == pytest.approx(3 * ln4, abs=1e-6)  # CE1 = 2 ln 2
    assert maps["pmad"][0, 0, 0] == pytest.approx(math.log(2) * (1 + CE0 / math.log(2)))
    assert torch.allclose(maps["protoflow_only"][1], a1, atol=1e-6)  # the same map alone
    # the image scores returned (the heatmaps' captions): PMAD's map maximum, ProtoFlow's
    # max over patches of -logp
    assert scores["pmad"][1] == pytest.approx(3 * ln4, abs=1e-6)
    assert torch.equal(scores["pmad"], maps["pmad"].flatten(1).amax(1))
    assert torch.allclose(scores["protoflow_score"], torch.tensor([math.log(2), ln4]))
    assert record["clean_options"] == {"masks": "proposal", "unmasked": "cover",
                                       "abnormality": "log", "combine": "weighted",
                                       "image_score": "max", "ce_weight": 1.0}
    for weight, factor in ((2.0, 5.0), (0.0, 1.0)):  # at the defect pixel: 1 + w CE1 / ln 2
        record, maps, _ = protocols.evaluate_clean(
            ConstantViT(), data, ratio=0.5, threshold=None, sigma=0.0, batch_size=2,
            options=protocols.CleanOptions(ce_weight=weight), device=torch.device("cpu"),
            amp="none", seed=0)
        assert maps["pmad"][1, 2, 2] == pytest.approx(factor * ln4, abs=1e-6)
        assert record["clean_options"]["ce_weight"] == weight
    assert torch.allclose(maps["pmad"], maps["protoflow_only"])  # weight 0
    assert protocols.CleanOptions().ce_weight == protocols.CE_WEIGHT == 1.0
    assert protocols.CleanOptions(combine="product").ce_weight is None
    with pytest.raises(ValueError, match="combine='product' has no CE weight, got 2.0"):
        protocols.CleanOptions(combine="product", ce_weight=2.0)  # refused, not dropped
    ce, abn = torch.ones(1, 4), torch.ones(1, 2, 2)
    with pytest.raises(ValueError, match="needs a CE weight"):
        protocols.pmad_maps(ce, abn, (2, 2), 0.0, "weighted", vocab_size=4, ce_weight=None)
    assert torch.equal(protocols.pmad_maps(ce, abn, (2, 2), 0.0, "product", ce_weight=None),
                       abn)


def test_a_defect_left_unmasked_is_scored_by_the_covering_pass() -> None:
    """The stored threshold calls the defective image normal, so its mask is random and
    (with this seed) misses the defect patch. With visible patches at 0 ('zero', the
    paper) the defect scores 0, below the normal image's scores; the covering pass
    scores it, above every pixel of the normal image."""
    data = _hand_data()
    kw = dict(ratio=0.5, threshold=1e9, sigma=0.0, batch_size=2,
              device=torch.device("cpu"), amp="none")
    seed = next(s for s in range(100) if not protoflow.proposals_from_log_likelihood(
        data.log_likelihood, image_size=3, grid=(2, 2)).test_masks(
        0.5, torch.tensor([False, False]), protocols.mask_seeds(data.image_ids, s))[1, 3])
    zero, maps0, _ = protocols.evaluate_clean(
        ConstantViT(), data, options=protocols.CleanOptions("threshold", "zero", "paper",
                                                           "product"), seed=seed, **kw)
    cover, maps1, _ = protocols.evaluate_clean(
        ConstantViT(), data, options=protocols.CleanOptions("threshold", "cover", "paper",
                                                           "product"), seed=seed, **kw)
    weighted, maps2, _ = protocols.evaluate_clean(
        ConstantViT(), data, options=protocols.CleanOptions("threshold", "zero", "paper",
                                                           "weighted"), seed=seed, **kw)
    # weighted: a visible patch keeps ProtoFlow's score (factor 1), above the normal image
    assert maps2["pmad"][1, 2, 2] == pytest.approx(0.75, abs=1e-6)
    assert maps2["pmad"][1, 2, 2] > maps2["pmad"][0].max() and weighted["image_auroc"] == 1
    assert zero["called_anomalous"] == cover["called_anomalous"] == 0
    assert zero["diagnostics"]["masked_defect_fraction"] == 0.0
    assert maps0["pmad"][1, 2, 2] == 0.0 and maps0["pmad"][0].max() > 0
    assert maps1["pmad"][1, 2, 2] == pytest.approx(CE1 * 0.75, abs=1e-6)
    assert maps1["pmad"][1, 2, 2] > maps1["pmad"][0].max()
    assert cover["image_auroc"] == 1.0


def test_paper_protocol_per_ratio_values_and_best_ratio_by_hand() -> None:
    """The paper protocol on the 2x2-patch case: L = 4 patches, so ratios below 0.25 mask
    no patch (every map is 0: image AUROC 0.5) and ratios from 0.26 mask one. The
    F1-optimal threshold lies between the image scores ln 2 and ln 4, so only the
    defective image is called anomalous and gets its proposal, the defect patch: CE1 x
    0.75 at its corner, above anything the normal image's one random patch can score
    (at most CE0 x 0.5). So the best image AUROC, 1.0, comes first at 0.26."""
    data = _hand_data()
    record, maps, scores = protocols.evaluate_paper(ConstantViT(), data, sigma=0.0,
                                                    batch_size=2, device=torch.device("cpu"),
                                                    amp="none", seed=0)
    assert record["threshold"] == pytest.approx((math.log(2) + math.log(4)) / 2)
    assert record["called_anomalous"] == 1
    assert torch.equal(scores["pmad"], maps["pmad"].flatten(1).amax(1))  # at the best ratio
    assert torch.allclose(scores["protoflow_score"], torch.tensor([math.log(2), math.log(4)]))
    per_ratio = record["per_ratio"]
    assert list(per_ratio) == [f"{r:.2f}" for r in protocols.PAPER_RATIOS]
    for r in protocols.PAPER_RATIOS:
        expected = 0.5 if r < 0.25 else 1.0
        assert per_ratio[f"{r:.2f}"]["image_auroc"] == expected, r
        assert per_ratio[f"{r:.2f}"]["image_f1_max"] == pytest.approx(
            2 / 3 if r < 0.25 else 1.0), r  # all tied: everything called anomalous
    assert record["image_auroc"] == 1.0 and record["image_auroc_ratio"] == 0.26
    assert record["mask_ratio"] == 0.26
    assert maps["pmad"][1, 2, 2] == pytest.approx(CE1 * 0.75, abs=1e-6)
    assert maps["pmad"][0].max() <= CE0 * 0.5 + 1e-6
    assert record["diagnostics"]["masked_defect_fraction"] == 1.0


def test_paper_protocol_scores_by_the_maximum_and_counts_its_calls() -> None:
    """The paper's image score is the map's maximum (on 20 x 20 maps the top-1 % mean, of 4
    pixels, is lower), and called_anomalous counts ProtoFlow's anomalous calls: of three
    images (a second normal one added to the 2x2-patch case) only the defective one, not
    the two called normal."""
    hand = _hand_data(size=20)
    data = protocols.ClassData(
        torch.cat([hand.images, hand.images[:1]]), torch.cat([hand.tokens, hand.tokens[:1]]),
        torch.cat([hand.log_likelihood, hand.log_likelihood[:1]]),
        torch.cat([hand.prototype_distance, hand.prototype_distance[:1]]),
        np.array([0, 1, 0]), torch.cat([hand.gt_masks, hand.gt_masks[:1]]),
        hand.names + ["good_001"], hand.defect_types + ["good"],
        hand.image_ids + ["sha-of-good_001"])
    record, maps, scores = protocols.evaluate_paper(ConstantViT(), data, sigma=0.0,
                                                    batch_size=2, device=torch.device("cpu"),
                                                    amp="none", seed=0)
    assert record["called_anomalous"] == 1
    assert record["diagnostics"]["anomalous_with_proposal"] == 1
    assert scores["pmad"][1].item() == pytest.approx(CE1 * 0.75, abs=1e-6)
    assert torch.equal(scores["pmad"], maps["pmad"].flatten(1).amax(1))
    assert (protocols.image_scores(maps["pmad"], "topk") < scores["pmad"]).any()


def test_best_ratio_never_picks_nan() -> None:
    """A metric undefined at a ratio (NaN) never wins the best-ratio choice, wherever it
    lies; ties go to the first ratio."""
    nan = math.nan
    assert protocols._best_ratio({0.1: {"k": 0.7}, 0.2: {"k": nan}, 0.3: {"k": 0.9}}, "k") == 0.3
    assert protocols._best_ratio({0.1: {"k": nan}, 0.2: {"k": 0.5}, 0.3: {"k": 0.5}}, "k") == 0.2


def test_paper_ratios_are_the_papers_24() -> None:
    """The paper protocol sweeps 0.02 to 0.48 in steps of 0.02 (method.md 7): 0.48 is
    Table 6's ratio of metal_nut, pill and transistor."""
    assert protocols.PAPER_RATIOS == (
        0.02, 0.04, 0.06, 0.08, 0.1, 0.12, 0.14, 0.16, 0.18, 0.2, 0.22, 0.24,
        0.26, 0.28, 0.3, 0.32, 0.34, 0.36, 0.38, 0.4, 0.42, 0.44, 0.46, 0.48)


def test_paper_protocol_reports_maps_and_types_at_the_best_image_auroc_ratio(monkeypatch
                                                                              ) -> None:
    """Each metric is reported at its own best ratio; the maps, image scores, per-defect
    view and mask ratio are those of the best image AUROC's ratio (0.10 here), not of
    another metric's best (pixel AUROC's 0.40)."""
    data = _hand_data()
    shape = data.gt_masks.shape

    def sweep(model, data, proposals, anomalous, ratios, **_):
        per_ratio = {r: {**dict.fromkeys(metrics.METRIC_NAMES, 0.5),
                         "per_defect": {"crack": {"image_auroc": r, "pixel_auroc": r}}}
                     for r in ratios}
        per_ratio[0.1]["image_auroc"] = per_ratio[0.4]["pixel_auroc"] = 0.9
        return per_ratio, {r: torch.full(shape, r) for r in ratios}

    monkeypatch.setattr(protocols, "sweep_mask_ratios", sweep)
    record, maps, scores = protocols.evaluate_paper(ConstantViT(), data, sigma=0.0,
                                                    batch_size=2, device=torch.device("cpu"),
                                                    amp="none", seed=0)
    assert (record["image_auroc_ratio"], record["pixel_auroc_ratio"]) == (0.1, 0.4)
    assert record["image_auroc"] == record["pixel_auroc"] == 0.9
    assert record["mask_ratio"] == 0.1
    assert record["per_defect"] == {"crack": {"image_auroc": 0.1, "pixel_auroc": 0.1}}
    # the diagnostics' masks at 0.10 too: no patch of 4 (at 0.48 the defect's one)
    assert record["diagnostics"]["masked_defect_fraction"] == 0.0
    assert torch.equal(maps["pmad"], torch.full(shape, 0.1))
    assert torch.equal(scores["pmad"], torch.full((shape[0],), 0.1))


def test_mask_seeds_depend_on_the_seed_and_the_image_alone() -> None:
    """--seed reaches each image's random test mask: another seed gives other seeds and
    other masks, the same seed the same ones, and an image's seed does not depend on the
    other images of its set."""
    ids = [f"sha-{i}" for i in range(6)]
    s0, s0_again, s1 = (protocols.mask_seeds(ids, 0), protocols.mask_seeds(ids, 0),
                        protocols.mask_seeds(ids, 1))
    assert s0 == s0_again and len(set(s0)) == 6
    assert all(a != b for a, b in zip(s0, s1))
    assert all(0 <= s < 2 ** 63 for s in s0 + s1)  # valid torch.Generator seeds
    assert protocols.mask_seeds(ids[3:4], 0) == s0[3:4]
    # the masks they drive: every image called normal, 39 of 196 patches at random
    logp = torch.zeros(6, 14, 14)
    proposals = protoflow.proposals_from_log_likelihood(logp, image_size=14, grid=(14, 14))
    normal = torch.zeros(6, dtype=torch.bool)
    m0, m0_again, m1 = (proposals.test_masks(0.2, normal, s) for s in (s0, s0_again, s1))
    assert torch.equal(m0, m0_again) and m0.sum(1).tolist() == [39] * 6
    assert all(not torch.equal(a, b) for a, b in zip(m0, m1))


def test_a_score_equal_to_the_threshold_is_called_normal() -> None:
    """The clean protocol's threshold call is strict: the defective image's score (ln 4,
    its least likely patch) as the threshold calls it normal; the next float32 below
    calls it anomalous."""
    data = _hand_data()
    score = protoflow.proposals_from_log_likelihood(data.log_likelihood, image_size=3,
                                                   grid=(2, 2)).image_scores[1].item()
    assert score == pytest.approx(math.log(4))
    kw = dict(ratio=0.5, options=protocols.CleanOptions("threshold", "zero", "paper", "product"),
              sigma=0.0, batch_size=2, device=torch.device("cpu"), amp="none", seed=0)
    at, _, _ = protocols.evaluate_clean(ConstantViT(), data, threshold=score, **kw)
    lower = torch.nextafter(torch.tensor(score), torch.tensor(0.0)).item()  # float32
    below, maps, _ = protocols.evaluate_clean(ConstantViT(), data, threshold=lower, **kw)
    assert at["called_anomalous"] == 0 and at["threshold"] == score
    assert at["diagnostics"]["anomalous_with_proposal"] == 0
    assert below["called_anomalous"] == 1
    assert below["diagnostics"]["anomalous_with_proposal"] == 1
    assert maps["pmad"][1, 2, 2] == pytest.approx(CE1 * 0.75, abs=1e-6)  # defect masked


def test_mask_diagnostics_by_hand() -> None:
    data = _hand_data(size=4)  # 2x2 pixels per patch
    data.gt_masks[1] = 0
    data.gt_masks[1, 2:, 2:] = 1  # all of patch 3
    data.gt_masks[1, 0, 0] = 1  # one pixel of patch 0
    masks = torch.tensor([[True, False, False, False], [False, False, False, True]])
    d = protocols.mask_diagnostics(data, masks, torch.tensor([True, True]), (2, 2))
    assert d["masked_defect_fraction"] == pytest.approx(4 / 5)
    assert d["anomalous_with_proposal"] == 1 and d["anomalous_images"] == 1
    assert d["pixels_per_patch"] == 4
    d = protocols.mask_diagnostics(data, masks, torch.tensor([True, False]), (2, 2))
    assert d["anomalous_with_proposal"] == 0
    rows = torch.tensor([[True, False], [False, True]])  # a 2 x 1 grid: patches of 2 rows
    d = protocols.mask_diagnostics(data, rows, torch.tensor([True, True]), (2, 1))
    assert d["pixels_per_patch"] == 8 and d["masked_defect_fraction"] == pytest.approx(4 / 5)
    assert d["empty_defect_masks"] == 0 and protocols.empty_defect_masks(data) == []


def test_an_anomalous_image_with_no_defect_pixel_is_counted_and_named() -> None:
    """An anomalous image whose mask, as scored, is empty (an empty mask file, a defect
    the centre crop cut off) passed silently; its defect never reaches the pixel
    metrics. It is counted in the diagnostics and named; a normal image's empty mask is
    not; without masks there is no count."""
    data = _hand_data(size=4)
    data.gt_masks[1] = 0
    masks = torch.ones(2, 4, dtype=torch.bool)
    d = protocols.mask_diagnostics(data, masks, torch.tensor([True, True]), (2, 2))
    assert d["empty_defect_masks"] == 1
    assert protocols.empty_defect_masks(data) == ["bad_000"]
    data.gt_masks = None
    assert protocols.mask_diagnostics(data, masks, torch.tensor([True, True]),
                                      (2, 2))["empty_defect_masks"] is None
    assert protocols.empty_defect_masks(data) == []


def test_threshold_calls_count_false_alarms_and_found_defects() -> None:
    """ProtoFlow's calls at its threshold against the labels: 1 of 3 good images called
    anomalous, 1 of 2 anomalous ones (not the complements, nor the totals)."""
    called = torch.tensor([True, False, False, True, False])
    labels = np.array([0, 0, 0, 1, 1])
    assert protocols.threshold_calls(called, labels) == {
        "good_called_anomalous": 1, "good_images": 3, "anomalous_called_anomalous": 1,
        "anomalous_images": 2}


def test_a_mask_marking_most_of_its_image_is_named() -> None:
    """A mask marking more than half its image and its four corners (an inverted one) is
    named; one marking exactly half, a small defect, or a large one short of a corner (a
    flipped part) is not; without masks none is."""
    data = _hand_data(size=4)
    assert protocols.mostly_defect_masks(data) == []
    data.gt_masks[1] = 1 - data.gt_masks[1]  # inverted: 15 of 16 pixels, but one corner
    assert protocols.mostly_defect_masks(data) == []
    data.gt_masks[1, 1, 1] = 0  # the defect inside: 14 of 16, every corner
    data.gt_masks[1, -1, -1] = 1
    assert protocols.mostly_defect_masks(data) == ["bad_000"]
    data.gt_masks[1] = 0
    data.gt_masks[1, :2] = 1  # 8 of 16 pixels
    data.gt_masks[1, -1, [0, -1]] = 1  # 10 of 16, every corner
    assert protocols.mostly_defect_masks(data) == ["bad_000"]
    data.gt_masks[1, 1:] = 0
    data.gt_masks[1, -1, [0, -1]] = 1  # 6 of 16, every corner
    assert protocols.mostly_defect_masks(data) == []
    data.gt_masks[1] = 1
    data.gt_masks[1, 0, 0] = 0  # 15 of 16 but a corner: a large defect
    assert protocols.mostly_defect_masks(data) == []
    data.gt_masks = None
    assert protocols.mostly_defect_masks(data) == []


def test_a_mask_is_named_only_above_half_with_each_of_its_four_corners() -> None:
    """The rule's edges: a mask marking exactly half its image (rows 0 and 3 of 4, every
    corner) is not named, 'more than' half being the rule; and each of the four corners
    counts, the top-right and bottom-left as the top-left and bottom-right (a check of
    two corners only named a large defect short of one of the others)."""
    data = _hand_data(size=4)
    data.gt_masks[1] = 0
    data.gt_masks[1, [0, -1]] = 1  # 8 of 16, every corner
    assert protocols.mostly_defect_masks(data) == []
    data.gt_masks[1, 1, 1] = 1  # 9 of 16, every corner
    assert protocols.mostly_defect_masks(data) == ["bad_000"]
    for corner in ((0, -1), (-1, 0)):  # 14 of 16 with the other rows, short of one corner
        data.gt_masks[1] = 1
        data.gt_masks[1, 1, 2] = 0
        data.gt_masks[1][corner] = 0
        assert protocols.mostly_defect_masks(data) == [], corner


def test_clean_protocol_counts_the_images_that_got_the_proposal_mask() -> None:
    """With --clean_masks proposal every image gets its proposal mask, whatever ProtoFlow
    calls at the stored threshold (here only the defective image is above it): the record
    counts the images masked by their proposal (proposal_masks), 2, apart from ProtoFlow's
    calls (called_anomalous), 1; under 'threshold' both are 1. called_anomalous counted
    the proposals under the same name as the paper protocol's calls, so read 2 here."""
    data = _hand_data()
    threshold = (math.log(2) + math.log(4)) / 2
    for masks, proposed in (("proposal", 2), ("threshold", 1)):
        record, _, _ = protocols.evaluate_clean(
            ConstantViT(), data, ratio=0.5, threshold=threshold,
            options=protocols.CleanOptions(masks=masks), sigma=0.0, batch_size=2,
            device=torch.device("cpu"), amp="none", seed=0)
        assert record["called_anomalous"] == 1 and record["called_at"] == threshold, masks
        # scored against the labels: the good image is not called, the anomalous one is
        assert record["calls"] == {"good_called_anomalous": 0, "good_images": 1,
                                   "anomalous_called_anomalous": 1,
                                   "anomalous_images": 1}, masks
        assert record["proposal_masks"] == proposed, masks
        # the threshold is reported only where it chose the masks
        assert record["threshold"] == (threshold if masks == "threshold" else None), masks


def test_baselines_take_their_image_score_by_pmads_rule(monkeypatch) -> None:
    """With --image_score topk, the baseline rows' image scores are their maps' top-1 %
    means too (not their maxima), so the table compares like with like."""
    seen = []
    real = protocols.metrics.compute_metrics
    monkeypatch.setattr(protocols.metrics, "compute_metrics",
                        lambda labels, scores, *a: seen.append(scores) or real(labels, scores, *a))
    options = protocols.CleanOptions(image_score="topk")
    _, maps, _ = protocols.evaluate_clean(
        ConstantViT(), _hand_data(size=20), ratio=0.5, threshold=None, options=options,
        sigma=0.0, batch_size=2, device=torch.device("cpu"), amp="none", seed=0)
    names = ["pmad", "protoflow_only", "patchcore", "ce_only"]
    assert len(seen) == len(names)
    for name, scores in zip(names, seen):
        top4 = maps[name].flatten(1).topk(4, dim=1).values.mean(1)  # 1 % of 400 pixels
        assert np.allclose(scores, top4.numpy())
        assert (scores < maps[name].flatten(1).amax(1).numpy()).any()


def test_image_scores() -> None:
    maps = torch.zeros(2, 10, 10)
    maps[0, 0, 0] = 5.0  # one bright pixel
    maps[1, :1] = 1.0  # a bright row of 10 pixels
    assert protocols.image_scores(maps, "max").tolist() == [5.0, 1.0]
    assert protocols.image_scores(maps, "topk").tolist() == [5.0, 1.0]  # top 1 % = 1 pixel
    maps = torch.zeros(1, 20, 20)
    maps[0, 0, :4] = torch.tensor([4.0, 2.0, 1.0, 1.0])
    assert protocols.image_scores(maps, "topk").tolist() == [2.0]  # mean of the top 4
    # a map under 100 pixels (a 2x2-patch case's 3x3) still takes its top pixel, not none
    small = torch.arange(18.0).reshape(2, 3, 3)
    assert protocols.image_scores(small, "topk").tolist() == [8.0, 17.0]
    with pytest.raises(ValueError, match="unknown image score"):
        protocols.image_scores(maps, "median")


def _called_normal_data() -> protocols.ClassData:
    """Five images of 2x2 patches (4x4 pixels): a1 (image 1, score ln 8) and a2 (image 2,
    score ln 2, below the three normals' ln 4) are defective in patch 3; each normal's
    least likely patch is patch 0. The F1-optimal threshold calls a1 alone (F1 2/3
    against 4/7 for calling all five)."""
    n = 5
    logp = torch.zeros(n, 2, 2)
    logp[1, 1, 1] = -math.log(8.0)  # a1
    logp[2, 1, 1] = -math.log(2.0)  # a2: less anomalous than the normals' worst patch
    logp[[0, 3, 4], 0, 0] = -math.log(4.0)
    tokens = torch.zeros(n, 4, dtype=torch.long)
    tokens[1:3, 3] = 1
    gt = torch.zeros(n, 4, 4)
    gt[1:3, 2:, 2:] = 1  # all of patch 3
    return protocols.ClassData(torch.zeros(n, 3, 4, 4), tokens, logp, -logp,
                               np.array([0, 1, 1, 0, 0]), gt, [f"img_{i}" for i in range(n)],
                               ["good", "crack", "crack", "good", "good"],
                               [f"sha-{i}" for i in range(n)])


def _first_random_patch(data: protocols.ClassData, seed: int) -> list[int]:
    """Each image's patch of rank 0 in the random order of its seed (a1 called anomalous)."""
    ranks = protoflow.proposals_from_log_likelihood(
        data.log_likelihood, image_size=4, grid=(2, 2)).test_ranks(
        torch.tensor([False, True, False, False, False]),
        protocols.mask_seeds(data.image_ids, seed))
    return (ranks == 0).long().argmax(1).tolist()


def test_paper_sweep_masks_the_images_called_normal_at_random() -> None:
    """The paper protocol's per-ratio masks: ProtoFlow's proposal for the image it calls
    anomalous (a1: its defect patch), a random patch of its own seed for the others, not
    their proposals (a2's defect, a normal's patch 0). At 0.26 one patch of 4 is masked,
    so each map is CE x abnormality at that patch alone."""
    data = _called_normal_data()
    proposals = protoflow.proposals_from_log_likelihood(data.log_likelihood, image_size=4,
                                                        grid=(2, 2))
    called = torch.tensor([False, True, False, False, False])
    seed = next(s for s in range(200) if _first_random_patch(data, s)[2] != 3
                and _first_random_patch(data, s)[0] != 0)
    _, maps = protocols.sweep_mask_ratios(ConstantViT(), data, proposals, called, (0.26,),
                                          sigma=0.0, batch_size=5, device=torch.device("cpu"),
                                          amp="none", seed=seed)
    m = maps[0.26]
    assert m[1, 3, 3] == pytest.approx(CE1 * 0.875, abs=1e-6)  # a1: its proposal
    assert m[2, 3, 3] == 0.0  # a2's defect left visible (its proposal would give CE1 x 0.5)
    assert m[0, 0, 0] == 0.0  # the normal's patch 0 too (its proposal: CE0 x 0.75)
    assert m[2].max() > 0  # a2's random patch scores where its abnormality is not 0


def test_paper_diagnostics_read_the_masks_the_maps_were_scored_with() -> None:
    """A defective image ProtoFlow calls normal gets a random mask from its own seed;
    the paper protocol's diagnostics must count its defect as masked exactly when the
    mask its map was scored with covers it. In the five-image case a2 is called normal
    and masked at random: with this seed its one masked patch (ratios 0.26 to 0.48) is
    its defect, which another seed's mask misses."""
    data = _called_normal_data()

    def a2_masked(seed: int) -> bool:
        return _first_random_patch(data, seed)[2] == 3

    seed = next(s for s in range(1, 200) if a2_masked(s) and not a2_masked(s + 1)
                and not a2_masked(s - 1) and not a2_masked(0))
    record, maps, _ = protocols.evaluate_paper(ConstantViT(), data, sigma=0.0, batch_size=5,
                                               device=torch.device("cpu"), amp="none",
                                               seed=seed)
    assert record["called_anomalous"] == 1
    assert record["threshold"] == pytest.approx((math.log(4) + math.log(8)) / 2)
    assert record["mask_ratio"] == 0.26 and record["image_auroc"] == 1.0
    # a2's defect was masked in its map: CE1 x (1 - 1/2) at the defect's pixels
    assert maps["pmad"][2, 3, 3] == pytest.approx(CE1 * 0.5, abs=1e-6)
    d = record["diagnostics"]
    assert d["anomalous_images"] == 2 and d["anomalous_with_proposal"] == 1
    assert d["masked_defect_fraction"] == 1.0  # a1's by its proposal, a2's by its seed


def test_visible_patches_at_zero_give_no_ce_only_baseline() -> None:
    """--unmasked zero runs the test mask alone, so the ViT's cross-entropy is known at
    the masked patches only: no 'CE alone' baseline is scored (it would read 0 at every
    visible patch as a score), while 'cover' scores every patch and reports it."""
    kw = dict(ratio=0.5, threshold=None, sigma=0.0, batch_size=2,
              device=torch.device("cpu"), amp="none", seed=0)
    zero, maps, scores = protocols.evaluate_clean(
        ConstantViT(), _hand_data(), options=protocols.CleanOptions(unmasked="zero"), **kw)
    assert set(maps) == {"pmad", "protoflow_only", "patchcore"}
    assert "ce_only" not in zero and "ce_only" not in scores
    cover, maps, _ = protocols.evaluate_clean(
        ConstantViT(), _hand_data(), options=protocols.CleanOptions(unmasked="cover"), **kw)
    assert "ce_only" in cover
    assert torch.allclose(maps["ce_only"], _hand_maps()["ce_only"], atol=1e-6)


def test_a_set_normalised_otherwise_in_its_std_or_slightly_is_refused():
    """collect_class refuses a set whose mean or std is not the one ProtoFlow was told
    the images have (the models'): the std alone differing (a set built with the mean
    given and the std left at another value), or CLIP's values, a few hundredths from
    ImageNet's, scale every pixel otherwise and score plausibly wrong. The check runs
    before the set's first image is read."""
    from types import SimpleNamespace

    import datasets
    imagenet = (tuple(datasets.IMAGENET_DEFAULT_MEAN), tuple(datasets.IMAGENET_DEFAULT_STD))
    flow = SimpleNamespace(input_normalization=imagenet)
    clip = ((0.4815, 0.4578, 0.4082), (0.2686, 0.2613, 0.2758))
    class Unread(torch.utils.data.Dataset):
        def __init__(self, mean, std):
            self.mean, self.std = mean, std

        def __len__(self):
            pytest.fail(f"a set normalised with {self.mean}, {self.std} was read")

    for mean, std in ((imagenet[0], (0.5, 0.5, 0.5)), clip):
        with pytest.raises(ValueError, match=(
                f"^the images are normalised with mean {re.escape(str(mean))}, std "
                f"{re.escape(str(std))}, but the models were loaded for mean")):
            protocols.collect_class(Unread(mean, std), None, flow, "c", 2, torch.device("cpu"))
