"""bench/score_variants.py (docs/heldout.md's tables) by hand: its rows on the tiny
cases of test_protocols.py, whose answers are known by construction."""
from __future__ import annotations

import dataclasses
import json
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import masking_generator
import protocols
import run_test
from test_protocols import ConstantViT, _hand_data


@pytest.fixture
def score_variants(bench):
    import score_variants
    return score_variants


def test_bench_score_variants_rows_by_hand(score_variants) -> None:
    """bench/score_variants.py (docs/heldout.md's tables): its default row is the clean
    protocol's map and score, the CE-weight rows scale CE / ln V, and the image-only
    rows score each map by one rule."""
    data = _hand_data()
    kw = dict(sigma=0.0, batch_size=2, device=torch.device("cpu"), amp="none")
    rows = score_variants.variant_scores(ConstantViT(), data, 0.5, **kw)
    _, maps, scores = protocols.evaluate_clean(ConstantViT(), data, ratio=0.5, threshold=None,
                                               options=protocols.CleanOptions(), seed=0, **kw)
    assert torch.equal(rows["default"][1], maps["pmad"])
    assert torch.equal(rows["default"][0], scores["pmad"])
    ln4 = math.log(4)  # image 1's defect pixel: abnormality ln 4, CE1 = 2 ln 2 = 2 ln V
    assert protocols.CE_WEIGHT == 1.0
    for row, weight in (("default", 1.0), ("CE weight 0.25", 0.25), ("CE weight 0.5", 0.5),
                        ("CE weight 2", 2.0)):
        assert rows[row][1][1, 2, 2] == pytest.approx(ln4 * (1 + 2 * weight), abs=1e-6), row
    # every covering scores each patch once with the same constant ViT: the average is CE
    assert torch.allclose(rows["CE averaged over 5 coverings"][1], maps["pmad"])
    assert torch.equal(rows["protoflow_only"][0], maps["protoflow_only"].flatten(1).amax(1))
    assert rows["image: rank sum with ProtoFlow"][0].tolist() == [2.0, 4.0]
    assert rows["image: product with ProtoFlow"][0][1] == pytest.approx(3 * ln4 * ln4)
    auc = score_variants.aurocs(data, rows)
    assert auc["default"]["image_auroc"] == 1.0 and math.isnan(
        auc["image: top 1 % [pmad]"]["pixel_auroc"])
    assert auc["default"]["pixel_auroc"] == 1.0  # the defect pixel (1, 2, 2) is the highest


def test_bench_score_variants_ce_relative_to_the_image(score_variants) -> None:
    """Image 1 is twice as hard to predict everywhere: relative to its own median (2, the
    class's) its CE is image 0's; each image keeps its own contrast (the 4th patch)."""
    ce = torch.tensor([[1.0, 1.0, 1.0, 4.0], [2.0, 2.0, 2.0, 8.0]])
    assert score_variants.relative_to_image(ce).tolist() == [[2.0, 2.0, 2.0, 8.0],
                                                             [2.0, 2.0, 2.0, 8.0]]


def test_bench_score_variants_ce_relative_to_an_easily_predicted_image(score_variants) -> None:
    """The class's median (0.5, the lower middle) over an image's own, below 1 nat as well
    (image 0 keeps its CE); an image predicted perfectly almost everywhere (median 0)
    is divided by 1e-3, not by 0 (no inf or NaN)."""
    ce = torch.tensor([[0.5, 0.5, 0.5, 2.0], [0.0, 0.0, 0.0, 3.0]])
    assert torch.allclose(score_variants.relative_to_image(ce),
                          torch.tensor([[0.5, 0.5, 0.5, 2.0], [0.0, 0.0, 0.0, 1500.0]]))


def test_bench_score_variants_aurocs_by_hand(score_variants) -> None:
    """AUROC with ties counted half (metrics.py's, as run_test.py reports it); a class
    without masks (no ground_truth folder) keeps its image AUROC, its pixel AUROC is nan."""
    data = _hand_data()  # 2 images of 3 x 3 pixels, one defect pixel: (1, 2, 2)
    tied = torch.zeros(2, 3, 3)
    tied[1, 2, 2] = tied[0, 0, 0] = 1.0  # the defect ties 1 of the 17 normal pixels
    rows = {"tied": (torch.tensor([0.5, 0.5]), tied),
            "image only": (torch.tensor([0.7, 0.2]), None)}
    auc = score_variants.aurocs(data, rows)
    assert auc["tied"] == {"image_auroc": 0.5, "pixel_auroc": (16 + 0.5) / 17}
    assert auc["image only"]["image_auroc"] == 0.0 and math.isnan(
        auc["image only"]["pixel_auroc"])
    unmasked = score_variants.aurocs(dataclasses.replace(data, gt_masks=None), rows)
    assert unmasked["tied"]["image_auroc"] == 0.5 and math.isnan(
        unmasked["tied"]["pixel_auroc"])


def test_bench_score_variants_protoflow_own_score_rows(score_variants) -> None:
    """ProtoFlow's own image score is the largest -log p of the image's patches, before
    any map or smoothing (the smoothed map's maximum differs), and its rank sum with PMAD
    adds the ranks of two scores that order the images differently here."""
    data = _hand_data()
    data.log_likelihood[0, 0, 0] = -math.log(8.0)  # image 0 now ProtoFlow's worst
    rows = score_variants.variant_scores(ConstantViT(), data, 0.5, sigma=1.0, batch_size=2,
                                         device=torch.device("cpu"), amp="none")
    own = rows["image: ProtoFlow's own score (max -log p)"][0]
    assert own.tolist() == pytest.approx([math.log(8), math.log(4)])
    assert rows["protoflow_only"][0][0] < own[0] - 0.5  # smoothing lowers the map's peak
    assert rows["default"][0][0] < rows["default"][0][1]  # PMAD orders them the other way
    assert rows["image: rank sum with ProtoFlow's own score"][0].tolist() == [3.0, 3.0]


def test_bench_score_variants_rank_sum_rows_by_hand(score_variants) -> None:
    """Each rank sum adds PMAD's ranks to the other score's own: ProtoFlow's smoothed map
    (which orders the images against PMAD) or its own score (a tie here, ranks 1.5), so
    neither row may reuse PMAD's ranks or the other ProtoFlow score."""
    data = _hand_data()
    data.log_likelihood[0, 0, :] = -math.log(4.0)  # two ln 4 patches: the brighter map
    rows = score_variants.variant_scores(ConstantViT(), data, 0.5, sigma=1.0, batch_size=2,
                                         device=torch.device("cpu"), amp="none")
    own = rows["image: ProtoFlow's own score (max -log p)"][0]
    assert own.tolist() == pytest.approx([math.log(4), math.log(4)])  # tied
    assert rows["protoflow_only"][0][0] > rows["protoflow_only"][0][1]
    assert rows["default"][0][0] < rows["default"][0][1]  # PMAD: ranks 1, 2
    assert rows["image: rank sum with ProtoFlow"][0].tolist() == [3.0, 3.0]  # + 2, 1
    assert rows["image: rank sum with ProtoFlow's own score"][0].tolist() == [2.5, 3.5]


def test_bench_score_variants_image_rules_by_hand(score_variants) -> None:
    """The image-only rows on 20 x 20 maps (400 pixels: the top 1 % is 4, not the
    maximum): 'max at sigma s' blurs each unsmoothed map by s alone, 'top 1 %' scores
    each smoothed map by its own top 1 %, and the baseline rows keep the maximum."""
    data = _hand_data(20)
    data.prototype_distance[0, 1, 1] = 3.0  # PatchCore's map unlike ProtoFlow's
    kw = dict(batch_size=2, device=torch.device("cpu"), amp="none")
    raw = score_variants.variant_scores(ConstantViT(), data, 0.5, sigma=0.0, **kw)
    rows = score_variants.variant_scores(ConstantViT(), data, 0.5, sigma=2.0, **kw)
    for name, row in (("pmad", "default"), ("protoflow_only", "protoflow_only"),
                      ("patchcore", "patchcore")):
        for s in (8, 16):
            blurred = protocols.gaussian_blur(raw[row][1], float(s))
            assert torch.equal(rows[f"image: max at sigma {s} [{name}]"][0],
                               protocols.image_scores(blurred)), (name, s)
        top = protocols.image_scores(rows[row][1], "topk")
        assert torch.equal(rows[f"image: top 1 % [{name}]"][0], top), name
        assert not torch.equal(top, protocols.image_scores(rows[row][1])), name
    for row in ("protoflow_only", "patchcore", "ce_only"):
        assert torch.equal(rows[row][0], rows[row][1].flatten(1).amax(1)), row
    assert not torch.equal(rows["image: top 1 % [protoflow_only]"][0],
                           rows["image: top 1 % [patchcore]"][0])
    assert not torch.equal(rows["image: max at sigma 8 [pmad]"][0], rows["default"][0])


class ContextViT(ConstantViT):
    """Predicts token 0 with probability 0.9 when a patch's row neighbour (patch i ^ 1) is
    visible and 0.6 when it is masked too: a patch's CE depends on the covering."""

    def forward(self, x: torch.Tensor, bool_masked_pos: torch.Tensor,
                masked_index: torch.Tensor | None = None) -> torch.Tensor:
        img, patch = bool_masked_pos.nonzero().unbind(1)  # (M,) each, in x[masks] order
        p0 = torch.where(bool_masked_pos[img, patch ^ 1], 0.6, 0.9)
        return torch.stack([p0, 1 - p0], dim=1).log()


def test_bench_score_variants_seed_draws_the_coverings(score_variants) -> None:
    """--seed draws the covering-average row's random coverings: with a ViT whose CE
    depends on which patches are masked together, seeds 0 and 1 give different maps
    and the same seed the same map (the row is reproducible, and seeds can be compared)."""
    kw = dict(sigma=0.0, batch_size=2, device=torch.device("cpu"), amp="none")
    row = "CE averaged over 5 coverings"
    zero, one, again = (score_variants.variant_scores(ContextViT(), _hand_data(), 0.5,
                                                      seed=seed, **kw)[row][1]
                        for seed in (0, 1, 1))
    assert not torch.equal(zero, one)
    assert torch.equal(one, again)


def test_bench_score_variants_token_means_by_hand(score_variants) -> None:
    """token_means is each token's mean score (not its sum), 0 for a token never seen."""
    means = score_variants.token_means(torch.tensor([[1.0, 3.0]]), torch.tensor([[0, 0]]), 2)
    assert means.tolist() == [2.0, 0.0]
    means = score_variants.token_means(torch.tensor([[1.0, 3.0], [5.0, 4.0]]),
                                       torch.tensor([[0, 2], [0, 2]]), 3)
    assert means.tolist() == [3.0, 0.0, 3.5]


class PositionalViT(ConstantViT):
    """Predicts token 0 with a probability that depends on the patch: 0.6, 0.7, 0.9, 0.8
    for patches 0-3, so each patch's entropy and likeliest token differ."""
    P0 = torch.tensor([0.6, 0.7, 0.9, 0.8])

    def forward(self, x: torch.Tensor, bool_masked_pos: torch.Tensor,
                masked_index: torch.Tensor | None = None) -> torch.Tensor:
        p0 = self.P0[bool_masked_pos.nonzero()[:, 1]]  # (M,) in x[masks] order
        return torch.stack([p0, 1 - p0], dim=1).log()


def test_bench_score_variants_expectation_rows_by_hand(score_variants) -> None:
    """The rows that subtract what the ViT expected, patch by patch: the defect (image 1,
    patch 3, rare token 1) and image 0's mildly unusual patch 0 (token 0)."""
    rows = score_variants.variant_scores(PositionalViT(), _hand_data(), 0.5, sigma=0.0,
                                         batch_size=2, device=torch.device("cpu"), amp="none")

    def entropy(p: float) -> float:
        return -(p * math.log(p) + (1 - p) * math.log(1 - p))
    ln2 = math.log(2)  # ln V
    defect = dict(ce=-math.log(0.2), h=entropy(0.8), top=-math.log(0.8))  # patch 3, token 1
    normal = dict(ce=-math.log(0.6), h=entropy(0.6), top=-math.log(0.6))  # patch 0, token 0
    for (img, y, x), abnormality, s in (((1, 2, 2), math.log(4), defect),
                                        ((0, 0, 0), ln2, normal)):
        for row, score in (("CE - entropy (at least 0)", max(s["ce"] - s["h"], 0.0)),
                           ("CE x (1 - entropy / ln V)", s["ce"] * (1 - s["h"] / ln2)),
                           ("CE - CE of the likeliest token", s["ce"] - s["top"])):
            assert rows[row][1][img, y, x] == pytest.approx(  # CE weight 1, ln V = ln 2
                abnormality * (1 + score / ln2), abs=1e-6), (row, img)
    assert rows["CE - entropy (at least 0)"][1][0, 0, 0] == pytest.approx(ln2)  # clamped


def test_bench_score_variants_relative_row_by_hand(score_variants) -> None:
    """The row "CE x class median / the image's median" maps relative_to_image's CE:
    image 0's CEs (-ln 0.6, 0.7, 0.9, 0.8 for patches 0-3) have median -ln 0.8, the
    class's (and image 1's) is -ln 0.7, so image 0's mildly unusual patch 0 scores
    -ln 0.6 x ln 0.7 / ln 0.8, and image 1's defect keeps its CE ln 5."""
    rows = score_variants.variant_scores(PositionalViT(), _hand_data(), 0.5, sigma=0.0,
                                         batch_size=2, device=torch.device("cpu"), amp="none")
    maps = rows["CE x class median / the image's median"][1]
    ln2, ln4 = math.log(2), math.log(4)  # ln V; the defect's abnormality
    relative = -math.log(0.6) * math.log(0.7) / math.log(0.8)
    assert maps[0, 0, 0] == pytest.approx(ln2 * (1 + relative / ln2), abs=1e-6)
    assert maps[1, 2, 2] == pytest.approx(ln4 * (1 + math.log(5) / ln2), abs=1e-6)


def test_bench_score_variants_calibration_rows_by_hand(score_variants) -> None:
    """The rows calibrated on train/good (here the two hand images themselves), on the test
    set, and the codeword row, at the defect pixel (image 1, patch 3: CE ln 5, abnormality
    ln 4); patch 3's CEs over the images are [-ln 0.8, ln 5]."""
    data = _hand_data()
    rows = score_variants.variant_scores(PositionalViT(), data, 0.5, sigma=0.0, batch_size=2,
                                         device=torch.device("cpu"), amp="none", train=data,
                                         codebook=torch.eye(2))
    ln2, ln4 = math.log(2), math.log(4)
    expected = {  # the token score at the defect patch, in place of CE
        "CE - per-position mean on train/good (at least 0)": ln2,  # ln 5 - ln 2.5
        "the same as a z-score, halved": 0.5 * ln2 / (ln4 / math.sqrt(2)),
        "CE - mean CE of the same token on train/good (at least 0)": 0.0,  # token 1: ln 5
        "CE - per-position median over the test set (at least 0)": ln4,  # the lower: -ln 0.8
        "1 - expected cosine to the true codeword": 0.8 * ln2}  # codeword (0.8, 0.2) vs (0, 1)
    for row, score in expected.items():
        assert rows[row][1][1, 2, 2] == pytest.approx(ln4 * (1 + score / ln2), abs=1e-6), row
    # docs/heldout.md's tables name these rows: a changed CE weight or sigma renames one
    maps = ["pmad", "protoflow_only", "patchcore"]
    assert set(rows) == set(expected) | {
        "default", "CE weight 0.25", "CE weight 0.5", "CE weight 2",
        "CE averaged over 5 coverings", "CE - entropy (at least 0)",
        "CE x (1 - entropy / ln V)", "CE - CE of the likeliest token",
        "CE x class median / the image's median", "image: rank sum with ProtoFlow",
        "image: product with ProtoFlow", "image: ProtoFlow's own score (max -log p)",
        "image: rank sum with ProtoFlow's own score", "protoflow_only", "patchcore", "ce_only",
        *(f"image: max at sigma {s} [{m}]" for s in (8, 16) for m in maps),
        *(f"image: top 1 % [{m}]" for m in maps)}
    # calibrated on the training images given, not the test set: with the normal image
    # (twice) as train/good, patch 3's mean CE is -ln 0.8, so the defect scores
    # ln 5 + ln 0.8
    twice = [0, 0]
    normal = protocols.ClassData(data.images[twice], data.tokens[twice],
                                 data.log_likelihood[twice], data.prototype_distance[twice],
                                 data.labels[twice], data.gt_masks[twice], ["a", "b"],
                                 ["good", "good"], ["sha-a", "sha-b"])
    rows = score_variants.variant_scores(PositionalViT(), data, 0.5, sigma=0.0, batch_size=2,
                                         device=torch.device("cpu"), amp="none", train=normal)
    row = "CE - per-position mean on train/good (at least 0)"
    assert rows[row][1][1, 2, 2] == pytest.approx(ln4 * (1 + ln4 / ln2), abs=1e-6)
    # the same image twice has no spread: the std is clamped to 1e-3, not 0 (inf / NaN)
    z = rows["the same as a z-score, halved"][1]
    assert torch.isfinite(z).all()
    assert z[1, 2, 2] == pytest.approx(ln4 * (1 + 0.5 * ln4 / 1e-3 / ln2), rel=1e-4)
    # token 1 never occurs in this train/good: its mean is 0, so the defect keeps CE ln 5
    # (indexed by the test set's tokens, token 1 would get patch 3's train CE, -ln 0.8)
    row = "CE - mean CE of the same token on train/good (at least 0)"
    assert rows[row][1][1, 2, 2] == pytest.approx(ln4 * (1 + math.log(5) / ln2), abs=1e-6)
    plain = score_variants.variant_scores(PositionalViT(), data, 0.5, sigma=0.0, batch_size=2,
                                          device=torch.device("cpu"), amp="none")
    needs_more = set(expected) - {"CE - per-position median over the test set (at least 0)"}
    assert needs_more.isdisjoint(plain)  # no train images, no codebook: those rows are not made


def test_bench_score_variants_default_gaps(score_variants) -> None:
    """Each row against the default row, class by class (compare_worlds'
    paired_auroc_gaps); none where a class lacks defective (or good) test images, whose
    AUROC is undefined."""
    labels = np.array([False, False, True, True])
    rows = {"default": np.array([0.1, 0.2, 0.3, 0.4]), "worse": np.array([0.1, 0.35, 0.3, 0.4]),
            "same": np.array([0.0, 0.1, 0.5, 0.6])}
    gaps = score_variants.default_gaps([(labels, rows), (labels, rows)])
    assert set(gaps) == {"worse", "same"}
    assert gaps["worse"]["gap"] == pytest.approx(-0.25) and gaps["worse"]["high"] <= 0
    assert gaps["same"] == {"gap": 0.0, "low": 0.0, "high": 0.0}
    assert score_variants.default_gaps([(labels, rows), (labels | True, rows)]) is None
    assert score_variants.default_gaps([(labels & False, rows)]) is None


def test_bench_score_variants_gaps_take_label_1_as_defective(score_variants, tmp_path,
                                                             monkeypatch, capsys) -> None:
    """score_world's gap of each row to the default, with the models, the passes over the
    images and the AUROCs stubbed: a row that separates the two defective images (label
    1) from the two good ones (AUROC 1) where the default ranks one good image above one
    defective (0.75) gains +0.25, in score_variant_gaps.json and on the row's line."""
    from types import SimpleNamespace
    data = tmp_path / "mvtec"
    (data / "a" / "test").mkdir(parents=True)
    (data / "a" / "train" / "good").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(data / "a" / "train" / "good" / "0.png")
    models = SimpleNamespace(tokenizer=SimpleNamespace(image_size=8), img_size=8, mean=None,
                             std=None, protoflow=None, model=None, device=None, amp="none",
                             dataset=lambda *a, **k: None, test_set=lambda *a, **k: None)
    monkeypatch.setattr(score_variants.run_test, "load_models", lambda args: models)
    monkeypatch.setattr(score_variants, "collect_class", lambda *a: SimpleNamespace(
        labels=np.array([0, 0, 1, 1]), gt_masks=None))
    rows = {"default": torch.tensor([0.1, 0.3, 0.2, 0.4]),
            "better": torch.tensor([0.1, 0.2, 0.3, 0.4])}
    monkeypatch.setattr(score_variants, "variant_scores",
                        lambda *a: {k: (s, None) for k, s in rows.items()})
    monkeypatch.setattr(score_variants, "aurocs", lambda data, found: {
        "default": {"image_auroc": 0.75, "pixel_auroc": math.nan},
        "better": {"image_auroc": 1.0, "pixel_auroc": math.nan}})
    out = tmp_path / "out"
    assert score_variants.main(["--data_path", str(data), "--output_dir", str(out)]) == 0
    gaps = json.loads((out / score_variants.GAPS_FILE).read_text())
    assert list(gaps) == ["better"] and gaps["better"]["gap"] == 0.25
    assert 0.0 <= gaps["better"]["low"] <= 0.25 <= gaps["better"]["high"] <= 1.0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if "better" in ln)
    assert line.split()[1:3] == ["1.0000", "+0.2500"]


def test_bench_score_variants_flags(score_variants, capsys) -> None:
    """The script takes run_test.py's flags that its rows read, with run_test.py's
    defaults and checks, and refuses run_test.py's others (the protocol choices, the
    class selection by setting, heatmaps, resuming) instead of ignoring them."""
    parse = score_variants.get_args_parser().parse_args
    ours, theirs = parse([]), run_test.get_args_parser().parse_args([])
    assert set(vars(ours)) == {
        "ckpt", "model", "input_size", "layer_scale_init_value",
        "imagenet_default_mean_and_std", "tokenizer_model", "tokenizer_weight_path",
        "protoflow_weights", "prototypes_dir", "encoder_weights", "data_path", "classes",
        "output_dir", "mask_ratio", "default_mask_ratio", "sigma", "batch_size", "num_workers",
        "device", "amp", "seed"}
    assert vars(ours) == {k: getattr(theirs, k) for k in vars(ours)}
    assert masking_generator.class_mask_ratio(
        "gizmo", ours.mask_ratio, ours.default_mask_ratio) == masking_generator.class_mask_ratio(
        "gizmo", theirs.mask_ratio, theirs.default_mask_ratio) == 0.3
    given = parse(["--mask_ratio", "0.2", "--default_mask_ratio", "0.4", "--sigma", "0",
                   "--batch_size", "3", "--num_workers", "1", "--seed", "5", "--amp", "fp16"])
    assert (given.mask_ratio, given.default_mask_ratio, given.sigma, given.batch_size,
            given.num_workers, given.seed, given.amp) == (0.2, 0.4, 0.0, 3, 1, 5, "fp16")
    assert parse(["--classes", "b", "a", "b"]).classes == ["b", "a"]  # each once
    for argv, message in ((["--sigma", "-1"], "argument --sigma: -1 is not a finite number"),
                          (["--batch_size", "0"], "argument --batch_size: 0 is less than 1"),
                          (["--mask_ratio", "1.5"], "argument --mask_ratio: 1.5 is outside")):
        with pytest.raises(SystemExit) as exit_:
            parse(argv)
        assert exit_.value.code == 2 and message in capsys.readouterr().err
    for argv in (["--protocol", "paper"], ["--clean_masks", "threshold"],
                 ["--unmasked", "zero"], ["--abnormality", "paper"], ["--combine", "product"],
                 ["--image_score", "topk"], ["--skip_bad_images"],
                 ["--save_heatmaps", "2"], ["--resume_eval"], ["--setting", "obj2tex"],
                 ["--unseen_classes", "coins"], ["--from_obj_to_texture"]):
        run_test.get_args_parser().parse_args(argv)  # a real run_test.py flag
        with pytest.raises(SystemExit) as exit_:
            parse(argv)
        assert exit_.value.code == 2
        assert f"unrecognized arguments: {' '.join(argv)}" in capsys.readouterr().err


def test_bench_score_variants_end_to_end(score_variants, tiny_world, tmp_path, capsys,
                                        monkeypatch) -> None:
    """The script on the tiny world: every row per class in score_variants.json (the
    train/good and codebook rows too), each class scored at its --mask_ratio and --seed,
    the default row's image AUROC printed as the mean over all classes (two that differ);
    a class without a ground_truth folder is scored with pixel AUROC nan and left out of
    the printed means, saying why (run_test.py's rule), its passes over the images with
    --num_workers; a class without train/good images is exit 2 naming the folder, as
    run_test.py reports a user's mistake."""
    out = tmp_path / "out"
    assert score_variants.main(tiny_world.run_test_argv(out, "--classes", "coins")) == 0
    results = json.loads((out / "score_variants.json").read_text())
    assert list(results) == ["coins"]
    assert results["coins"].keys() >= {
        "default", "protoflow_only", "patchcore", "CE weight 0.5",
        "image: ProtoFlow's own score (max -log p)",
        # the train/good calibration rows and the k-means codebook's row are scored
        "CE - per-position mean on train/good (at least 0)", "the same as a z-score, halved",
        "CE - mean CE of the same token on train/good (at least 0)",
        "1 - expected cosine to the true codeword"}
    printed = capsys.readouterr().out.splitlines()
    default_line = next(line for line in printed if line.split()[:1] == ["default"])
    assert default_line.split()[1:] == [f"{results['coins']['default']['image_auroc']:.4f}",
                                        "/", f"{results['coins']['default']['pixel_auroc']:.3f}"]
    # every other row: its image AUROC minus the default's, with the bootstrap interval
    gaps = json.loads((out / score_variants.GAPS_FILE).read_text())
    assert set(gaps) == set(results["coins"]) - {"default"}
    for row in ("protoflow_only", "CE weight 0.5"):
        found = gaps[row]
        assert found["gap"] == pytest.approx(results["coins"][row]["image_auroc"]
                                             - results["coins"]["default"]["image_auroc"])
        assert found["low"] <= found["gap"] <= found["high"]
        line = next(line for line in printed if line.startswith(f"  {row} "))
        assert line.endswith("   {gap:+.4f} [{low:+.4f}, {high:+.4f}]".format(**found))

    data = tmp_path / "mvtec"
    shutil.copytree(tiny_world.mvtec_root, data, symlinks=True)
    other = next(c for c in tiny_world.classes if c != "coins")
    shutil.rmtree(data / other / "ground_truth")  # image labels only, as a custom set
    workers = []
    collect_class = score_variants.collect_class

    def spy(*args, **kwargs):
        workers.append(args[6])  # num_workers
        return collect_class(*args, **kwargs)

    monkeypatch.setattr(score_variants, "collect_class", spy)
    calls = []
    variant_scores = score_variants.variant_scores

    def spy_rows(model, data, ratio, sigma, batch_size, device, amp, seed, train, codebook):
        calls.append((ratio, seed))
        return variant_scores(model, data, ratio, sigma, batch_size, device, amp, seed, train,
                              codebook)

    monkeypatch.setattr(score_variants, "variant_scores", spy_rows)
    # the two tiny-world classes score alike: give them distinct default image AUROCs,
    # 0.5 and 1.0, so that the printed mean, 0.7500, covers both
    image_aurocs, aurocs = iter([0.5, 1.0]), score_variants.aurocs

    def distinct(data, rows):
        found = aurocs(data, rows)
        found["default"]["image_auroc"] = next(image_aurocs)
        return found

    monkeypatch.setattr(score_variants, "aurocs", distinct)
    argv = tiny_world.run_test_argv(tmp_path / "o1", "--classes", "coins", other,
                                    "--num_workers", "1", "--mask_ratio", "0.4", "--seed", "3",
                                    data=data)
    assert score_variants.main(argv) == 0
    assert workers == [1] * 4  # per class, the test images' pass and train/good's
    args = score_variants.get_args_parser().parse_args(argv)
    assert calls == [(masking_generator.class_mask_ratio(c, args.mask_ratio,
                                                         args.default_mask_ratio), 3)
                     for c in ("coins", other)]
    assert calls[0][0] == 0.4  # --mask_ratio, not the default 0.3
    both = json.loads((tmp_path / "o1" / "score_variants.json").read_text())
    unmasked = both[other]
    assert unmasked.keys() == results["coins"].keys()
    assert all(math.isnan(r["pixel_auroc"]) for r in unmasked.values())
    printed = capsys.readouterr().out.splitlines()
    assert (f"  pixel AUROC over the 1 class(es) with a ground_truth folder; none in {other}"
            in printed)
    default_line = next(line for line in printed if line.split()[:1] == ["default"])
    image = (both["coins"]["default"]["image_auroc"] + unmasked["default"]["image_auroc"]) / 2
    assert image == 0.75 and default_line.split()[1:] == [
        "0.7500", "/", f"{both['coins']['default']['pixel_auroc']:.3f}"]

    shutil.rmtree(data / "coins" / "train" / "good")

    def no_models(args):
        raise AssertionError("models were loaded before the layout was checked")

    monkeypatch.setattr(score_variants.run_test, "load_models", no_models)
    assert score_variants.main(tiny_world.run_test_argv(tmp_path / "o2", data=data)) == 2
    err = capsys.readouterr().err
    assert err == f"error: {data / 'coins' / 'train' / 'good'} holds no images: the " \
        "train/good calibration rows need the class's normal training images in the MVTec " \
        "layout\n"  # before any model is loaded or class scored
