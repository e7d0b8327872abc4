"""heatmaps.py: the colour scale, the layout of a PNG, its caption, and which images
--save_heatmaps picks."""
from __future__ import annotations

from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch

import heatmaps
import protoflow
from heatmaps import Caption, ColourScale


def test_colour_scale_is_shared_and_clipped():
    scale = ColourScale.of(torch.tensor([[[0.0, 1.0]], [[3.0, 4.0]]]))
    assert scale.low == 0.0 and scale.high == pytest.approx(3.999)  # the 0.999 quantile
    below, lo, hi, above, mid = scale.colours(np.array([[-1.0, 0.0, 4.0, 9.0, 2.0]]))[0]
    assert (below == lo).all() and (above == hi).all()  # clipped to the class's range
    assert lo[2] > 100 and lo[0] < 50 and hi[0] > 100 and hi[2] < 50  # blue low, red high
    assert not (mid == lo).all() and not (mid == hi).all()
    # a range away from 0: its low is blue and its middle the middle's colour
    shifted = ColourScale(2.0, 6.0).colours(np.array([[2.0, 6.0, 4.0]]))[0]
    assert (shifted == np.stack([lo, hi, mid])).all()
    # the colour bar's labels: high at the top row, low at the bottom
    assert heatmaps._ticks(101, ColourScale(1.0, 5.0)) == [
        (0, 5.0), (25, 4.0), (50, 3.0), (75, 2.0), (100, 1.0)]
    # every map's range, the low end too, wherever the minimum lies
    assert ColourScale.of(torch.stack([torch.full((2, 2), 3.0), torch.full((2, 2), 1.0)])
                          ) == ColourScale(1.0, 3.0)
    with pytest.raises(ValueError, match="NaN or infinite"):
        ColourScale.of(torch.tensor([[[0.0, float("nan")]]]))


def _pmad(score: np.ndarray, scale: ColourScale) -> heatmaps.ScoreMap:
    return heatmaps.ScoreMap("PMAD score map", "PMAD", score, scale)


def test_colour_scale_is_not_taken_by_a_few_outlier_pixels():
    """Ten 224 px maps, five with a defect blob of 1.0 over 400 pixels, one with a single
    pixel at 50: the plain maximum (50) drew every blob the same dark blue; the scale now
    tops at the blobs, and the outlier pixel saturates red."""
    maps = torch.zeros(10, 224, 224)
    maps[:5, 100:120, 100:120] = 1.0
    maps[7, 3, 3] = 50.0
    scale = ColourScale.of(maps)
    assert scale.low == 0.0 and scale.high == pytest.approx(1.0)
    blob, background = scale.colours(np.array([[1.0, 0.0]]))[0]
    assert blob[0] > 100 and background[2] > 100  # red against blue


def test_caption_says_score_threshold_and_decision():
    above = Caption("crack_001", 2.5, 7.0, 6.0, truth="crack")
    assert above.decision == "anomalous"
    text = [line for line, _ in above.lines()]
    assert text[0] == "crack_001"
    assert "PMAD image score 2.5" in text[1]
    assert text[2] == "ProtoFlow score 7 > threshold 6: ANOMALOUS"
    assert text[3] == "ground truth: crack"
    at = Caption("good_000", 1.0, 6.0, 6.0)  # the threshold itself is normal
    assert at.decision == "normal" and "<= threshold 6: NORMAL" in at.lines()[2][0]
    none = Caption("x", 1.0, 6.0, None)
    assert none.decision is None and "no threshold for the class: no decision" in none.lines()[2][0]
    # a near tie gets the digits that tell the two apart, not "0.1235 > threshold 0.1235"
    near = Caption("x", 1.0, 0.123512, 0.123498)
    assert near.lines()[2][0] == "ProtoFlow score 0.12351 > threshold 0.1235: ANOMALOUS"
    # the call is the protocols' own (protoflow.is_anomalous on the float32 score): a
    # float32 score equal to the threshold's float32 is normal, as the evaluation counts it
    score, threshold = float(np.float32(6.0000003)), 6.0000003
    assert score > threshold and not protoflow.is_anomalous(torch.tensor([score]), threshold)
    assert Caption("edge", 1.0, score, threshold).decision == "normal"


@pytest.mark.parametrize("scores, threshold, value", [
    ((1.0, 7.0), float("nan"), "good_000's ProtoFlow threshold is nan"),
    ((1.0, float("nan")), 6.0, "good_000's ProtoFlow score is nan"),
    ((float("inf"), 7.0), None, "good_000's PMAD image score is inf"),
], ids=["threshold", "protoflow", "pmad"])
def test_caption_refuses_a_non_finite_score_or_threshold(scores, threshold, value):
    """NaN compares false: 'score 7 <= threshold nan: NORMAL' would be drawn in green."""
    with pytest.raises(ValueError) as e:
        Caption("good_000", *scores, threshold)
    assert str(e.value) == f"heatmaps: {value}, not a finite number"


def test_render_layout():
    """image | ground truth | overlay, a colour bar from the class's high (top) to low
    (bottom), each panel's name below it, caption lines below; without ground truth one
    panel fewer."""
    h = w = 32
    image = np.full((h, w, 3), 128, np.uint8)
    score = np.zeros((h, w))
    score[:8, :8] = 10.0
    scale = ColourScale(0.0, 10.0)
    caption = Caption("crack_001", 10.0, 7.0, 6.0, truth="crack")
    gt = np.zeros((h, w))
    gt[:8, :8] = 1
    out = heatmaps.render(image, [_pmad(score, scale)], caption, gt)
    panel = w + heatmaps.GAP
    bar_x = 3 * panel
    names = heatmaps.LINE_HEIGHT + 2  # each panel named below it
    assert out.shape == (h + names + heatmaps.LINE_HEIGHT * 4 + 6,
                         bar_x + heatmaps.BAR_WIDTH + heatmaps.BAR_LABELS, 3)
    assert all((out[h:h + names, k * panel:k * panel + w] < 200).any() for k in range(3))
    assert (out[h:h + names, bar_x:] < 200).any()  # the colour bar named too
    assert (out[:h, :w] == 128).all()  # the image
    assert (out[:8, panel:panel + 8] == 255).all() and (out[9:h, panel + 9:panel + w] == 0).all()
    overlay = out[:h, 2 * panel:2 * panel + w].astype(int)
    hot, cold = overlay[2, 2], overlay[20, 20]
    assert hot[0] > cold[0] and hot[2] < cold[2]  # red where the score is high
    # off the diagonal: the overlay is the map as it lies (rows 0-7, columns 16-23), red
    # there and blue at the transposed place
    corner = np.zeros((h, w))
    corner[:8, 16:24] = 10.0
    flat = heatmaps.render(image, [_pmad(corner, scale)], caption, gt)[:h, 2 * panel:2 * panel + w]
    red, blue = flat[4, 20].astype(int), flat[20, 4].astype(int)
    assert red[0] - red[2] > 50 and blue[2] - blue[0] > 50
    bar = out[:h, bar_x + 2].astype(int)
    assert bar[0][0] > bar[0][2] and bar[-1][2] > bar[-1][0]  # high on top, low at the bottom
    assert (out[h:] < 200).any()  # caption text was drawn
    without = heatmaps.render(image, [_pmad(score, scale)], Caption("x", 1.0, 1.0, None))
    assert without.shape[1] == out.shape[1] - panel
    # a file name that is not UTF-8 (its byte as a surrogate; it crashed OpenCV) or not
    # ASCII: escaped, so two such names still read apart
    odd = heatmaps.render(image, [_pmad(score, scale)], Caption("caf\udce9", 1.0, 1.0, None))
    plain = heatmaps.render(image, [_pmad(score, scale)], Caption("caf\\udce9", 1.0, 1.0, None))
    assert (odd == plain).all()
    assert (heatmaps.render(image, [_pmad(score, scale)], Caption("café图", 1.0, 1.0, None))
            == heatmaps.render(image, [_pmad(score, scale)], Caption("caf\\xe9\\u56fe", 1.0, 1.0,
                                                            None))).all()
    # a name too long for the panel keeps its end (the escapes made the numbers of two
    # long Japanese names fall off the edge: their heatmaps were the same)
    long_name = "検査画像_ねじ_傷あり_正常品_0001"
    first, second = (heatmaps.render(image, [_pmad(score, scale)],
                                     Caption(n, 1.0, 1.0, None, note="good"))
                     for n in (long_name, long_name[:-1] + "2"))
    assert not (first == second).all()


def test_overlay_is_half_image_half_jet_colour_rounded_to_the_nearest_level():
    """The overlay panel is 0.5 image + 0.5 colour, so the part scored is seen beneath
    its score, and a score maps to the jet level nearest to it on the class's scale: at
    the middle of the range (127.5 of 255) level 128, whose green-blue mix differs from
    127's in two channels; a truncating map shifts every colour down a level."""
    scale = ColourScale(0.0, 1.0)
    jet = cv2.applyColorMap(np.arange(256, dtype=np.uint8)[None], cv2.COLORMAP_JET)[0, :, ::-1]
    assert (scale.colours(np.array([[0.5, 0.0, 1.0, 0.2]]))[0]
            == jet[[128, 0, 255, 51]]).all()
    image = np.zeros((8, 8, 3), np.uint8)
    image[..., 0], image[..., 1], image[..., 2] = 200, 101, 7
    score = np.full((8, 8), 0.5)
    out = heatmaps.render(image, [_pmad(score, scale)], Caption("x", 1.0, 1.0, None))
    overlay = out[:8, 8 + heatmaps.GAP:2 * 8 + heatmaps.GAP].astype(int)  # no ground truth
    want = ((0.5 * image.astype(np.float32) + 0.5 * jet[128].astype(np.float32))
            .astype(np.uint8))
    assert (overlay == want).all() and (want != jet[128]).any()


def test_ascii_caption_and_fit_width():
    assert heatmaps.ascii_caption("good_000.png: 1.5") == "good_000.png: 1.5"
    assert heatmaps.ascii_caption("café") == "caf\\xe9" != heatmaps.ascii_caption("cafe")
    assert heatmaps.ascii_caption("写真1") == "\\u5199\\u771f1"
    assert heatmaps.ascii_caption("caf\udce9") == "caf\\udce9"
    assert heatmaps.fit_width("short", 500) == "short"
    cut = heatmaps.fit_width("a" * 100 + "_0001", 200)
    head, tail = cut.split("...")
    assert len(head) == len(tail) > 3 and tail.endswith("_0001")
    assert cv2.getTextSize(cut, heatmaps.FONT, heatmaps.FONT_SCALE, 1)[0][0] <= 200
    longer = head + "a" + "..." + "a" + tail  # one more character at each end does not fit
    assert cv2.getTextSize(longer, heatmaps.FONT, heatmaps.FONT_SCALE, 1)[0][0] > 200
    caption = Caption("x" * 200 + "_7", 1.0, 1.0, None, note="good: most anomalous 1/4")
    line = caption.lines(300)[0][0]
    assert line.endswith("_7  [good: most anomalous 1/4]") and "..." in line
    assert caption.lines()[0][0].startswith("x" * 200)  # no width: the whole name


def test_extremes_per_type():
    scores = [0.1, 0.9, 0.5, 0.3, 0.7, 0.2, 0.8]
    types = ["good", "good", "good", "good", "crack", "crack", "hole"]
    picks = heatmaps.extremes_per_type(scores, types, 1)
    assert picks == [(4, "crack: most anomalous 1/2"), (5, "crack: least anomalous 1/2"),
                     (1, "good: most anomalous 1/4"), (0, "good: least anomalous 1/4"),
                     (6, "hole: most anomalous 1/1")]
    two = heatmaps.extremes_per_type(scores, types, 2)
    # each image once; the least anomalous counted from the bottom: 0 is 1/4, 3 is 2/4
    assert two == [(4, "crack: most anomalous 1/2"), (5, "crack: most anomalous 2/2"),
                   (1, "good: most anomalous 1/4"), (2, "good: most anomalous 2/4"),
                   (3, "good: least anomalous 2/4"), (0, "good: least anomalous 1/4"),
                   (6, "hole: most anomalous 1/1")]
    with pytest.raises(ValueError) as e:  # NaN sorts as the least anomalous
        heatmaps.extremes_per_type([0.1, 0.9, float("nan"), 0.3], ["good"] * 4, 1)
    assert str(e.value) == ("heatmaps: the image score of image 2 (good) is nan, not a "
                            "finite number")


def test_save_one_writes_the_rendered_png(tmp_path):
    """save_one denormalises the image and writes exactly what render draws."""
    from PIL import Image
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)
    image = torch.zeros(3, 16, 16)  # normalised: the mean colour
    score = torch.zeros(16, 16)
    score[4:8, 4:8] = 3.0
    gt = (score > 0).float()
    scale, caption = ColourScale(0.0, 3.0), Caption("a", 3.0, 2.0, 1.0, truth="crack")
    panels = [heatmaps.pmad_panel(score, scale)]
    heatmaps.save_one(image, panels, caption, tmp_path / "c" / "a.png", mean, std, gt)
    written = np.asarray(Image.open(tmp_path / "c" / "a.png"))
    rgb = np.full((16, 16, 3), [128, 102, 76], np.uint8)
    assert (written[:16, :16] == rgb).all()
    assert (written == heatmaps.render(rgb, panels, caption, gt.numpy())).all()


def test_save_heatmaps_captions_each_image_with_its_own_scores_on_the_class_scale(
        monkeypatch, tmp_path):
    """Every PNG of a class shares one colour scale, the range of all its maps, draws its
    own map and is captioned with its own PMAD and ProtoFlow scores (never the one for the
    other); the most and least anomalous follow PMAD's ranking (ProtoFlow's is reversed)."""
    drawn = []
    monkeypatch.setattr(heatmaps, "save_one", lambda image, panels, caption, path,
                        *a, **k: drawn.append((panels, caption, path.name)))
    maps = torch.stack([torch.full((2, 2), float(v)) for v in (1, 5, 3)])  # (3, H, W)
    protoflow = torch.stack([torch.full((2, 2), float(v)) for v in (-7, 2, 4)])
    data = SimpleNamespace(names=["good_0", "crack_0", "crack_1"], images=torch.zeros(3, 3, 2, 2),
                           defect_types=["good", "crack", "crack"], gt_masks=None)
    heatmaps.save_heatmaps(data, maps, protoflow, torch.tensor([1.0, 5.0, 3.0]),
                           torch.tensor([10.0, 30.0, 50.0]), 20.0, tmp_path, 1,
                           (0.0,) * 3, (1.0,) * 3)
    # PMAD's map, then ProtoFlow's map alone, each on its own class-wide scale
    assert {tuple((p.title, p.label, p.scale.low, p.scale.high) for p in panels)
            for panels, _, _ in drawn} == {(("PMAD score map", "PMAD", 1.0, 5.0),
                                            ("ProtoFlow map alone", "ProtoFlow", -7.0, 4.0))}
    captions = {c.name: (c.pmad_score, c.protoflow_score, c.decision, c.note)
                for _, c, _ in drawn}
    assert captions == {
        "good_0": (1.0, 10.0, "normal", "good: most anomalous 1/1"),
        "crack_0": (5.0, 30.0, "anomalous", "crack: most anomalous 1/2"),
        "crack_1": (3.0, 50.0, "anomalous", "crack: least anomalous 1/2")}
    index = {"good_0": 0, "crack_0": 1, "crack_1": 2}
    for (pmad, proto), c, name in drawn:
        k = index[c.name]
        assert name == f"{c.name}.png", c.name
        assert (pmad.values == maps[k].numpy()).all(), c.name
        assert (proto.values == protoflow[k].numpy()).all(), c.name


def test_a_panel_name_too_wide_keeps_its_start():
    """A panel's name reads from its start ('ground t...'), where a file name keeps its
    end (fit_width: 'grou...ect)' said nothing); one that fits is kept whole."""
    cut = heatmaps._cut_end("ground truth (white: defect)", 60)
    assert cut.startswith("ground") and cut.endswith("...")
    assert cv2.getTextSize(cut, heatmaps.FONT, heatmaps.FONT_SCALE, 1)[0][0] <= 60
    assert heatmaps._cut_end("image", 60) == "image"


def test_a_title_that_fits_is_kept_whole_and_each_lies_under_its_panel():
    """A panel's name exactly as wide as its room is kept whole (cutting one that fits
    hid a word for nothing); each name starts inside its own panel, not in the white gap
    before it (placed by the panel's width alone, the second and third drifted left by a
    gap each): a map's title under its overlay, its label under its colour bar. Each
    overlay is drawn on its own map's scale."""
    wide = cv2.getTextSize("image", heatmaps.FONT, heatmaps.FONT_SCALE, 1)[0][0]
    assert heatmaps._cut_end("image", wide) == "image"
    assert heatmaps._cut_end("image", wide - 1).endswith("...")
    h = w = 64
    maps = [_pmad(np.zeros((h, w)), ColourScale(0.0, 1.0)),
            heatmaps.ScoreMap("ProtoFlow map alone", "ProtoFlow", np.full((h, w), 5.0),
                              ColourScale(0.0, 10.0))]
    out = heatmaps.render(np.full((h, w, 3), 128, np.uint8), maps,
                          Caption("x", 1.0, 1.0, None), np.zeros((h, w)))
    names = out[h:h + heatmaps.LINE_HEIGHT + 2]
    bar = heatmaps.BAR_WIDTH + heatmaps.BAR_LABELS
    widths = [w, w, w, bar, w, bar]  # image, truth, PMAD, its bar, ProtoFlow, its bar
    titles = ["image", "ground truth (white: defect)", "PMAD score map", "PMAD",
              "ProtoFlow map alone", "ProtoFlow"]
    assert out.shape[1] == sum(widths) + 5 * heatmaps.GAP
    x = 0
    for k, (width, title) in enumerate(zip(widths, titles)):
        assert (names[:, x:x + width] < 200).any(), k  # named
        assert (names[:, x + width:x + width + heatmaps.GAP] == 255).all(), k  # gap blank
        alone = np.full((heatmaps.LINE_HEIGHT + 2, width, 3), 255, np.uint8)
        cv2.putText(alone, heatmaps._cut_end(title, width - 4), (2, heatmaps.LINE_HEIGHT - 2),
                    heatmaps.FONT, heatmaps.FONT_SCALE, heatmaps.GREY, 1, cv2.LINE_AA)
        assert (names[:, x:x + width] == alone).all(), title  # that name, at its start
        x += width + heatmaps.GAP
    # ProtoFlow's 5.0 is the middle of its own 0-10 scale (jet level 128), where PMAD's
    # 0-1 scale would clip it to red
    jet = cv2.applyColorMap(np.array([[128]], np.uint8), cv2.COLORMAP_JET)[0, 0, ::-1]
    start = 3 * (w + heatmaps.GAP) + bar + heatmaps.GAP  # image, truth, PMAD, its bar
    want = (0.5 * np.float32(128) + 0.5 * jet.astype(np.float32)).astype(np.uint8)
    assert (out[:h, start:start + w] == want).all()


def test_render_refuses_no_map_and_a_map_of_another_size():
    image = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="no score map"):
        heatmaps.render(image, [], Caption("x", 1.0, 1.0, None))
    with pytest.raises(ValueError) as e:
        heatmaps.render(image, [_pmad(np.zeros((8, 9)), ColourScale(0.0, 1.0))],
                        Caption("x", 1.0, 1.0, None))
    assert str(e.value) == "heatmaps.render: the PMAD score map is (8, 9), the image (8, 8)"

