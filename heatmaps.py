"""Heatmap PNGs that explain themselves: the image, its ground truth when there is one,
each score map over the image with its named colour bar (run_test.py: PMAD's and
ProtoFlow's map alone, so one sees where the ViT changes ProtoFlow's evidence), and a
caption with the image's scores, the normal/anomalous threshold and the decision.

One colour scale per class and map (`ColourScale`, from all of the class's maps of that
kind): a normal image then looks cool and an anomalous one hot, and two images of a class
compare. Drawn with OpenCV only (no plotting library).
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np
import torch
from PIL import Image

from protoflow import is_anomalous


if TYPE_CHECKING:
    from protocols import ClassData

FONT = cv2.FONT_HERSHEY_SIMPLEX
FONT_SCALE = 0.42
LINE_HEIGHT = 16  # pixels per caption line at FONT_SCALE
BAR_WIDTH = 14
BAR_LABELS = 58  # room right of the colour bar for its tick labels
TOP_QUANTILE = 0.999  # of each map: its top 0.1 % (50 pixels at 224 px) may saturate
TICKS = 5
GAP = 4
WHITE, BLACK = (255, 255, 255), (0, 0, 0)
RED, GREEN, GREY = (200, 30, 30), (20, 140, 40), (90, 90, 90)


def _require_finite(value: float, what: str) -> None:
    """NaN compares false with everything: a NaN score or threshold would be called
    NORMAL, and a NaN score ranked least anomalous. Refuse it, naming `what`."""
    if not math.isfinite(value):
        raise ValueError(f"heatmaps: {what} is {value}, not a finite number")


@dataclass(frozen=True)
class ColourScale:
    """The score range [low, high] mapped onto the colour map, shared by a class's PNGs."""
    low: float
    high: float

    @classmethod
    def of(cls, maps: torch.Tensor | np.ndarray) -> "ColourScale":
        """From the lowest pixel of the class's maps (N, H, W) to the highest of the
        maps' TOP_QUANTILE quantiles (above it: red): a few outlier pixels of one map,
        which the plain maximum would take, would leave every defect the same blue."""
        arr = maps.detach().cpu().float().numpy() if isinstance(maps, torch.Tensor) else maps
        arr = np.asarray(arr, dtype=np.float32)
        if not np.isfinite(arr).all():
            raise ValueError("heatmaps: the score maps contain NaN or infinite values")
        low = float(arr.min())
        high = float(np.quantile(arr.reshape(len(arr), -1), TOP_QUANTILE, axis=1).max())
        return cls(low, high)

    def colours(self, values: np.ndarray) -> np.ndarray:
        """Scores (H, W) -> RGB uint8 (H, W, 3) on the jet colour map (blue low, red high)."""
        span = max(self.high - self.low, 1e-12)
        level = np.clip((values - self.low) / span, 0.0, 1.0)
        grey = np.round(level * 255).astype(np.uint8)
        return cv2.applyColorMap(grey, cv2.COLORMAP_JET)[..., ::-1]


@dataclass(frozen=True)
class ScoreMap:
    """One score-map panel: `title` names the overlay below it, `label` its colour bar
    (BAR_WIDTH + BAR_LABELS pixels: a word or two), `values` (H, W) drawn on `scale`."""
    title: str
    label: str
    values: np.ndarray
    scale: ColourScale


def _apart(a: float, b: float) -> tuple[str, str]:
    """`a` and `b` with 4 significant digits, or as many more as tell two different
    values apart: '0.1235 > 0.1235' would contradict itself."""
    for digits in range(4, 18):
        left, right = f"{a:.{digits}g}", f"{b:.{digits}g}"
        if left != right or a == b:
            return left, right
    return repr(a), repr(b)


@dataclass(frozen=True)
class Caption:
    """What the caption says about one image. `threshold` is ProtoFlow's normal/anomalous
    threshold on `protoflow_score` (None: the ProtoFlow file stores none, so no decision);
    `truth` is the test set's label ('good' or the defect type) when there is one."""
    name: str
    pmad_score: float
    protoflow_score: float
    threshold: float | None
    truth: str | None = None
    note: str | None = None

    def __post_init__(self) -> None:
        """A NaN would otherwise caption as NORMAL (see _require_finite)."""
        for what, value in (("PMAD image score", self.pmad_score),
                            ("ProtoFlow score", self.protoflow_score),
                            ("ProtoFlow threshold", self.threshold)):
            if value is not None:
                _require_finite(value, f"{self.name}'s {what}")

    @property
    def decision(self) -> str | None:
        """'anomalous' / 'normal': ProtoFlow's call, made as the protocols make it (on the
        float32 score), so a caption and the CSV never disagree with the evaluation."""
        if self.threshold is None:
            return None
        called = is_anomalous(torch.tensor([self.protoflow_score]), self.threshold)
        return "anomalous" if bool(called) else "normal"

    def lines(self, width: int | None = None) -> list[tuple[str, tuple[int, int, int]]]:
        """(text, RGB colour) per caption line; given the `width` in pixels, the name is
        cut to fit beside its note (fit_width)."""
        note = f"  [{self.note}]" if self.note else ""
        name = self.name if width is None else fit_width(
            ascii_caption(self.name), width - cv2.getTextSize(note, FONT, FONT_SCALE, 1)[0][0])
        out = [(name + note, BLACK),
               (f"PMAD image score {self.pmad_score:.4g}", BLACK)]
        if self.threshold is None:
            out.append((f"ProtoFlow score {self.protoflow_score:.4g}; no threshold for the "
                        "class: no decision", GREY))
        else:
            sign = ">" if self.decision == "anomalous" else "<="
            score, threshold = _apart(self.protoflow_score, self.threshold)
            out.append((f"ProtoFlow score {score} {sign} threshold {threshold}: "
                        f"{self.decision.upper()}",
                        RED if self.decision == "anomalous" else GREEN))
        if self.truth is not None:
            out.append((f"ground truth: {self.truth}", GREY))
        return out


def to_uint8_image(image: torch.Tensor, mean: Sequence[float], std: Sequence[float]
                   ) -> np.ndarray:
    """A normalised image (3, H, W) -> RGB uint8 (H, W, 3)."""
    x = image.float().cpu() * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
    return (x.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def _colour_bar(height: int, scale: ColourScale) -> np.ndarray:
    """The colour bar (high at the top) with TICKS labelled values: (H, W, 3) uint8."""
    panel = np.full((height, BAR_WIDTH + BAR_LABELS, 3), 255, np.uint8)
    values = np.linspace(scale.high, scale.low, height)[:, None].repeat(BAR_WIDTH, 1)
    panel[:, :BAR_WIDTH] = scale.colours(values)
    for y, value in _ticks(height, scale):
        cv2.line(panel, (BAR_WIDTH, y), (BAR_WIDTH + 3, y), BLACK, 1)
        baseline = min(max(y + 4, 9), height - 2)
        cv2.putText(panel, f"{value:.3g}", (BAR_WIDTH + 5, baseline), FONT, 0.36, BLACK, 1,
                    cv2.LINE_AA)
    return panel


def _ticks(height: int, scale: ColourScale) -> list[tuple[int, float]]:
    """(row, value) of the colour bar's TICKS labels: the class's high at the top row, its
    low at the bottom, evenly between."""
    return [(round(k * (height - 1) / (TICKS - 1)),
             scale.high - k * (scale.high - scale.low) / (TICKS - 1)) for k in range(TICKS)]


def ascii_caption(line: str) -> str:
    """OpenCV's fonts draw ASCII only, and a file name that is not UTF-8 (a stray
    surrogate) crashes it: every other character is written as its escape ('café' ->
    'caf\\xe9', '图' -> '\\u56fe', a stray byte '\\udce9'), so two names that differ
    still read apart (as '?' for both, or 'cafe' for 'café', would not)."""
    return line.encode("ascii", "backslashreplace").decode("ascii")


def fit_width(text: str, width: int) -> str:
    """`text`, or, when wider than `width` pixels in the caption's font, its start and
    end around '...': the end of a file name (its number) is what tells two apart."""
    def fits(t: str) -> bool:
        return cv2.getTextSize(t, FONT, FONT_SCALE, 1)[0][0] <= width

    if fits(text):
        return text
    low, high = 0, len(text) // 2  # the most characters kept at each end that fit
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(text[:mid] + "..." + text[-mid:]) else (low, mid - 1)
    return text[:low] + "..." + text[len(text) - low:]


def _cut_end(text: str, width: int) -> str:
    """`text`, or as much of its start as fits `width` pixels with '...' (a panel's name
    reads from its start; a file name keeps its end: fit_width)."""
    def wide(t: str) -> int:
        return cv2.getTextSize(t, FONT, FONT_SCALE, 1)[0][0]
    if wide(text) <= width:
        return text
    while text and wide(text + "...") > width:
        text = text[:-1]
    return text + "..."


def render(image: np.ndarray, maps: Sequence[ScoreMap], caption: Caption,
           gt_mask: np.ndarray | None = None) -> np.ndarray:
    """image (H, W, 3) uint8, maps (each (H, W)), gt_mask (H, W) {0, 1} or None -> RGB
    uint8: [image | ground truth | each map's overlay and its colour bar], each panel and
    bar named below it, above the caption."""
    if not maps:
        raise ValueError("heatmaps.render: no score map to draw")
    h, w = image.shape[:2]
    gap = np.full((h, GAP, 3), 255, np.uint8)
    panels = [(image, "image")]  # (pixels, the name below them), left to right
    if gt_mask is not None:
        truth = (np.asarray(gt_mask) > 0).astype(np.uint8)[..., None] * 255
        panels.append((np.repeat(truth, 3, axis=2), "ground truth (white: defect)"))
    for m in maps:
        if m.values.shape != (h, w):
            raise ValueError(f"heatmaps.render: the {m.title} is {tuple(m.values.shape)}, "
                             f"the image {(h, w)}")
        overlay = 0.5 * image.astype(np.float32) + 0.5 * m.scale.colours(m.values)
        panels += [(overlay.astype(np.uint8), m.title), (_colour_bar(h, m.scale), m.label)]
    panels = [p for panel in panels for p in (panel, (gap, ""))][:-1]
    top = np.concatenate([pixels for pixels, _ in panels], axis=1)
    under = np.full((LINE_HEIGHT + 2, top.shape[1], 3), 255, np.uint8)
    x = 0
    for pixels, name in panels:
        if name:
            cv2.putText(under, _cut_end(name, pixels.shape[1] - 4), (x + 2, LINE_HEIGHT - 2),
                        FONT, FONT_SCALE, GREY, 1, cv2.LINE_AA)
        x += pixels.shape[1]
    top = np.concatenate([top, under], axis=0)
    lines = caption.lines(top.shape[1] - 8)
    text = np.full((LINE_HEIGHT * len(lines) + 6, top.shape[1], 3), 255, np.uint8)
    for k, (line, colour) in enumerate(lines):
        cv2.putText(text, ascii_caption(line), (4, LINE_HEIGHT * (k + 1)), FONT, FONT_SCALE,
                    colour, 1, cv2.LINE_AA)
    return np.concatenate([top, text], axis=0)


def save_png(array: np.ndarray, path: str | os.PathLike) -> None:
    os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
    Image.fromarray(array).save(path)


def extremes_per_type(scores: Sequence[float], types: Sequence[str], count: int
                      ) -> list[tuple[int, str]]:
    """The `count` highest- and `count` lowest-scored images of every type (defect type,
    or 'good'): [(index, 'most anomalous k/n' | 'least anomalous k/n')], each image once,
    types in sorted order, most anomalous first. Ties keep the data set's order."""
    picks: list[tuple[int, str]] = []
    scores = np.asarray(scores, dtype=np.float64)
    types = list(types)
    for i, score in enumerate(scores.tolist()):
        _require_finite(score, f"the image score of image {i} ({types[i]})")
    for t in sorted(set(types)):
        idx = np.array([i for i, u in enumerate(types) if u == t])
        order = idx[np.argsort(-scores[idx], kind="stable")]  # most anomalous first
        n = len(order)
        chosen: dict[int, str] = {}
        for k, i in enumerate(order[:count]):
            chosen[int(i)] = f"{t}: most anomalous {k + 1}/{n}"
        for k, i in enumerate(order[::-1][:count]):
            chosen.setdefault(int(i), f"{t}: least anomalous {k + 1}/{n}")
        rank = {int(i): r for r, i in enumerate(order)}
        picks += sorted(chosen.items(), key=lambda item: rank[item[0]])
    return picks


def save_one(image: torch.Tensor, maps: Sequence[ScoreMap], caption: Caption,
             path: str | os.PathLike, mean: Sequence[float], std: Sequence[float],
             gt_mask: torch.Tensor | None = None) -> None:
    """One image's PNG: normalised image (3, H, W), its maps, its ground truth (H, W) or
    None; run_test.py's and predict.py's."""
    save_png(render(to_uint8_image(image, mean, std), maps, caption,
                    None if gt_mask is None else gt_mask.numpy()), path)


def pmad_panel(values: torch.Tensor, scale: ColourScale) -> ScoreMap:
    """PMAD's map (H, W) as a panel."""
    return ScoreMap("PMAD score map", "PMAD", values.numpy(), scale)


def save_heatmaps(data: ClassData, pmad_maps: torch.Tensor, protoflow_maps: torch.Tensor,
                  scores: torch.Tensor, protoflow_scores: torch.Tensor,
                  threshold: float | None, out_dir: Path, count: int,
                  mean: tuple[float, ...], std: tuple[float, ...]) -> None:
    """run_test.py --save_heatmaps N: the N most and the N least anomalous images (PMAD's
    image score `scores`, (N,)) of each defect type and of the normal images, each as
    image | ground truth | PMAD's map (N, H, W) | ProtoFlow's map alone (N, H, W), each
    map on one scale per class with its colour bar, captioned with the scores
    (ProtoFlow's too, (N,)), ProtoFlow's `threshold` and the decision."""
    pmad_scale, protoflow_scale = ColourScale.of(pmad_maps), ColourScale.of(protoflow_maps)
    for i, note in extremes_per_type(scores.tolist(), data.defect_types, count):
        caption = Caption(data.names[i], float(scores[i]), float(protoflow_scores[i]),
                          threshold, truth=data.defect_types[i], note=note)
        panels = [pmad_panel(pmad_maps[i], pmad_scale),
                  ScoreMap("ProtoFlow map alone", "ProtoFlow", protoflow_maps[i].numpy(),
                           protoflow_scale)]
        save_one(data.images[i], panels, caption, out_dir / f"{data.names[i]}.png", mean,
                 std, None if data.gt_masks is None else data.gt_masks[i])
