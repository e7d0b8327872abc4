"""Small MVTec-format anomaly-detection sets made from real photographs, offline.

MVTec AD and the released weights sit behind gigabyte downloads; the demo and CI still
need real images with real defects. scikit-image ships a handful of photographs inside
its wheel, so every class here is built from those: textures are crops of a texture photo,
objects are a foreground segmented out of a photo and placed on a plain backdrop. Defects
are cut, drawn or blended into the image, and each ground-truth mask is the set of pixels
that really changed.

Two worlds, from disjoint photographs and defect kinds (`WORLDS`):

- ``main``, the set the demo's recipe was chosen on: textures brick, grass, gravel;
  objects coins (one ancient coin) and coffee (cup, saucer, spoon). Defects: foreign (a
  piece of another photo), scratch, stain, missing (a bite or hole; on textures a sunken
  smoothed patch or a dark hole), ~1% to ~10% of the image.
- ``heldout``, the set that only *reports*: it exists to catch recipes tuned to the main
  set. Textures cell (grey microscope noise), moon (grey crater field), tissue (a stained
  tissue section); objects retina (a fundus photograph on black) and logo (scikit-image's
  logo on a grey backdrop). Defects are smaller (~0.3% to ~3%), fainter, and of the kinds
  MVTec AD has that the main set lacks: colour (luminance kept, hue changed), crack,
  hole, contamination (specks) and thread (a loose fibre).

`setup_train_dataset.py --make_demo DIR [--demo_world heldout] [--demo_defect_area LO HI]`
calls `make_demo_dataset`; the last flag redraws a world's defects at other sizes.
"""
from __future__ import annotations

import json
import os
import shutil
import zlib
from dataclasses import dataclass, replace
from functools import lru_cache

import cv2
import numpy as np
from PIL import Image
from scipy import ndimage as ndi
from tqdm import tqdm

from utils import progress


@dataclass(frozen=True)
class DemoWorld:
    """One demo set: its classes, defect kinds and defect sizes."""
    textures: tuple[str, ...]
    objects: tuple[str, ...]
    defect_types: tuple[str, ...]
    area_range: tuple[float, float]  # defect area, fraction of the image: smallest, largest
    min_visible: float  # a defect that changed less of the image than this is redrawn

    @property
    def classes(self) -> list[str]:
        return sorted(self.textures + self.objects)


WORLDS = {
    "main": DemoWorld(("brick", "grass", "gravel"), ("coffee", "coins"),
                      ("foreign", "scratch", "stain", "missing"), (0.01, 0.10), 0.003),
    "heldout": DemoWorld(("cell", "moon", "tissue"), ("logo", "retina"),
                         ("colour", "crack", "hole", "contamination", "thread"),
                         (0.003, 0.03), 0.0015),
}
# The defect sizes `make_demo_dataset(defect_area=...)` accepts: smallest, largest. Near
# the lower end some kinds cannot be made visible on some classes (a ValueError names them).
DEFECT_AREA_BOUNDS = (0.001, 0.2)
DEMO_TEXTURES = list(WORLDS["main"].textures)
DEMO_OBJECTS = list(WORLDS["main"].objects)
DEMO_CLASSES = WORLDS["main"].classes
DEFECT_TYPES = WORLDS["main"].defect_types

# Photographs inside scikit-image's data folder; none needs a download.
_TEXTURE_PHOTOS = {"brick": "brick.png", "grass": "grass.png", "gravel": "gravel.png",
                   "cell": "cell.png", "moon": "moon.png", "tissue": "ihc.png"}
_FOREIGN_PHOTOS = ("chelsea.png", "astronaut.png", "ihc.png", "motorcycle_left.png",
                   "coffee.png")
# Objects: source photo, object extent as a fraction of the canvas, backdrop RGB.
# The coin backdrop is the median grey of the coins photo's own background.
_OBJECT_SPECS = {
    "coins": ("coins.png", 0.58, (0.24, 0.24, 0.24)),
    "coffee": ("coffee.png", 0.82, (0.80, 0.78, 0.74)),
    "retina": ("retina.jpg", 0.84, (0.02, 0.02, 0.02)),
    "logo": ("logo.png", 0.72, (0.55, 0.57, 0.60)),
}
_CHANGE_THRESHOLD = 10  # uint8 levels; a pixel whose change exceeds this is defective
MARKER = ".pmad_demo.json"


def _data_dir() -> str:
    import skimage.data
    return os.path.dirname(skimage.data.__file__)


@lru_cache(maxsize=None)
def _photo(filename: str) -> np.ndarray:
    """RGB float32 (H, W, 3) in [0, 1]; cached because every image reuses its photo."""
    path = os.path.join(_data_dir(), filename)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} not found: the demo set is made from the photographs shipped inside "
            "scikit-image; reinstall it with `python -m pip install --force-reinstall "
            "'scikit-image>=0.22'`")
    with Image.open(path) as im:
        photo = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    photo.setflags(write=False)  # shared by every call through the cache
    return photo


def _coin_mask(gray: np.ndarray) -> np.ndarray:
    """Largest coin of skimage's coins photo (watershed on the Sobel edge map)."""
    from skimage import filters, segmentation
    markers = np.zeros(gray.shape, np.int32)
    markers[gray < 30 / 255] = 1
    markers[gray > 150 / 255] = 2
    coins = ndi.binary_fill_holes(segmentation.watershed(filters.sobel(gray), markers) == 2)
    labels, n = ndi.label(coins)
    areas = ndi.sum(coins, labels, range(1, n + 1))
    return labels == 1 + int(np.argmax(areas))


def _coffee_mask(rgb: np.ndarray) -> np.ndarray:
    """Cup, saucer and spoon of skimage's coffee photo (random walker in Lab).

    Seeds: the photo border is table, two ellipses on the cup and the saucer are the
    object. Solved at half resolution (where the wood grain does not leak) and upsampled.
    """
    from skimage import color, segmentation
    h, w = rgb.shape[:2]
    small = cv2.resize(rgb, (w // 2, h // 2), interpolation=cv2.INTER_AREA)
    hs, ws = small.shape[:2]
    markers = np.zeros((hs, ws), np.int32)
    b = max(2, hs // 40)
    markers[:b], markers[-b:], markers[:, :b], markers[:, -b:] = 1, 1, 1, 1
    yy, xx = np.mgrid[:hs, :ws] / np.array([hs, ws], np.float32)[:, None, None]
    markers[((yy - 0.475) / 0.2) ** 2 + ((xx - 0.5) / 0.2) ** 2 < 1] = 2
    markers[((yy - 0.55) / 0.05) ** 2 + ((xx - 0.2) / 0.033) ** 2 < 1] = 2
    labels = segmentation.random_walker(color.rgb2lab(small), markers, beta=30, mode="bf",
                                        channel_axis=-1)
    fg = ndi.binary_fill_holes(labels == 2).astype(np.float32)
    fg = cv2.resize(fg, (w, h), interpolation=cv2.INTER_LINEAR) > 0.5
    labels, n = ndi.label(fg)
    return labels == 1 + int(np.argmax(ndi.sum(fg, labels, range(1, n + 1))))


def _disc_mask(rgb: np.ndarray) -> np.ndarray:
    """The bright fundus disc of skimage's retina photo on its black surround."""
    disc = ndi.binary_fill_holes(ndi.binary_opening(rgb.max(-1) > 0.12, iterations=2))
    labels, n = ndi.label(disc)
    return labels == 1 + int(np.argmax(ndi.sum(disc, labels, range(1, n + 1))))


def _alpha_mask(filename: str) -> np.ndarray:
    """The opaque pixels of a photo with an alpha channel (skimage's logo)."""
    with Image.open(os.path.join(_data_dir(), filename)) as im:
        return np.asarray(im.convert("RGBA"))[..., 3] > 127


def _object_mask(class_name: str, rgb: np.ndarray) -> np.ndarray:
    if class_name == "coins":
        return _coin_mask(rgb[..., 0])
    if class_name == "coffee":
        return _coffee_mask(rgb)
    if class_name == "retina":
        return _disc_mask(rgb)
    return _alpha_mask(_OBJECT_SPECS[class_name][0])


@lru_cache(maxsize=None)
def _cutout(class_name: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The object's pixels and soft alpha, cropped and resized to its nominal canvas size."""
    filename, extent, _ = _OBJECT_SPECS[class_name]
    rgb = _photo(filename)
    mask = _object_mask(class_name, rgb)
    ys, xs = np.nonzero(mask)
    m = 4
    y0, y1 = max(ys.min() - m, 0), min(ys.max() + m + 1, mask.shape[0])
    x0, x1 = max(xs.min() - m, 0), min(xs.max() + m + 1, mask.shape[1])
    rgb, alpha = rgb[y0:y1, x0:x1], mask[y0:y1, x0:x1].astype(np.float32)
    scale = extent * size / max(rgb.shape[:2])
    dsize = (round(rgb.shape[1] * scale), round(rgb.shape[0] * scale))
    interp = cv2.INTER_CUBIC if scale > 1 else cv2.INTER_AREA
    rgb = np.clip(cv2.resize(rgb, dsize, interpolation=interp), 0, 1)
    alpha = np.clip(cv2.resize(alpha, dsize, interpolation=cv2.INTER_LINEAR), 0, 1)
    rgb.setflags(write=False)
    alpha.setflags(write=False)
    return rgb, alpha


@dataclass
class _Light:
    """Lighting change of one shot: applied identically to clean and defective versions."""
    gains: np.ndarray  # (3,) slight colour cast
    contrast: float
    brightness: float
    gamma: float

    @classmethod
    def sample(cls, rng: np.random.Generator) -> _Light:
        return cls(rng.uniform(0.98, 1.02, 3).astype(np.float32), rng.uniform(0.9, 1.1),
                   rng.uniform(-0.05, 0.05), rng.uniform(0.9, 1.1))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        # Fixed pivot (not the image mean) so a local change stays local.
        x = (x * self.gains - 0.5) * self.contrast + 0.5 + self.brightness
        return np.clip(x, 0, 1) ** self.gamma


@dataclass
class _Scene:
    """One shot before lighting: an object layer over a backdrop (textures: no backdrop)."""
    photo: str               # source photograph, never used for a foreign patch
    layer: np.ndarray        # (S, S, 3) float
    alpha: np.ndarray        # (S, S) float object coverage; ones for textures
    background: np.ndarray   # (S, S, 3) float
    light: _Light

    def render(self, alpha: np.ndarray | None = None) -> np.ndarray:
        a = (self.alpha if alpha is None else alpha)[..., None]
        return self.light(self.layer * a + self.background * (1 - a))

    @property
    def foreground(self) -> np.ndarray:
        return self.alpha > 0.5


def _texture_scene(class_name: str, rng: np.random.Generator, size: int) -> _Scene:
    """A rotated, rescaled crop from a random position of the texture photo."""
    photo = _photo(_TEXTURE_PHOTOS[class_name])
    h, w = photo.shape[:2]
    angle = rng.uniform(-10, 10)
    crop = min(h, w) / 2 * rng.uniform(0.9, 1.1)  # source pixels per side
    t = np.deg2rad(angle)
    half = crop / 2 * (abs(np.cos(t)) + abs(np.sin(t)))  # rotated crop stays inside
    cx, cy = rng.uniform(half, w - half), rng.uniform(half, h - half)
    m = cv2.getRotationMatrix2D((cx, cy), angle, size / crop)
    m[:, 2] += (size / 2 - cx, size / 2 - cy)
    layer = cv2.warpAffine(photo, m, (size, size), flags=cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_REFLECT_101)
    ones = np.ones((size, size), np.float32)
    return _Scene(_TEXTURE_PHOTOS[class_name], layer, ones, np.zeros_like(layer),
                  _Light.sample(rng))


def _object_scene(class_name: str, rng: np.random.Generator, size: int) -> _Scene:
    """The segmented object, slightly shifted, rotated and scaled, on a plain backdrop."""
    rgb, alpha = _cutout(class_name, size)
    ch, cw = alpha.shape
    m = cv2.getRotationMatrix2D((cw / 2, ch / 2), rng.uniform(-10, 10),
                                rng.uniform(0.95, 1.05))
    m[:, 2] += (size / 2 - cw / 2 + rng.uniform(-0.05, 0.05) * size,
                size / 2 - ch / 2 + rng.uniform(-0.05, 0.05) * size)
    layer = cv2.warpAffine(rgb, m, (size, size), flags=cv2.INTER_LINEAR)
    alpha = cv2.warpAffine(alpha, m, (size, size), flags=cv2.INTER_LINEAR)
    # Backdrop: plain colour, a gentle illumination gradient and fine sensor grain.
    yy, xx = np.mgrid[:size, :size].astype(np.float32) / size - 0.5
    phi = rng.uniform(0, 2 * np.pi)
    shade = 1 + rng.uniform(-0.08, 0.08) * (xx * np.cos(phi) + yy * np.sin(phi))
    grain = rng.normal(0, 0.006, (size, size)).astype(np.float32)
    background = np.asarray(_OBJECT_SPECS[class_name][2], np.float32) * shade[..., None]
    background = np.clip(background + grain[..., None], 0, 1)
    return _Scene(_OBJECT_SPECS[class_name][0], layer, alpha, background, _Light.sample(rng))


def world_of(class_name: str) -> DemoWorld:
    """The demo world a class belongs to (the worlds share no class)."""
    for world in WORLDS.values():
        if class_name in world.classes:
            return world
    raise ValueError(f"unknown demo class '{class_name}'; choose from "
                     + "; ".join(f"{k}: {w.classes}" for k, w in WORLDS.items()))


def _scene(class_name: str, rng: np.random.Generator, size: int) -> _Scene:
    world_of(class_name)
    if class_name in _TEXTURE_PHOTOS:
        return _texture_scene(class_name, rng, size)
    return _object_scene(class_name, rng, size)


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(x, 0, 1) * 255).astype(np.uint8)


def render_normal(class_name: str, rng: np.random.Generator,
                  size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """A defect-free image (S, S, 3) uint8 and its foreground mask (S, S) bool."""
    scene = _scene(class_name, rng, size)
    return _to_uint8(scene.render()), scene.foreground


@dataclass
class DefectSample:
    """A defective image with the same shot left clean, so masks can be checked."""
    clean: np.ndarray       # (S, S, 3) uint8
    defective: np.ndarray   # (S, S, 3) uint8
    mask: np.ndarray        # (S, S) bool: where the defect changed the image
    foreground: np.ndarray  # (S, S) bool
    applied: np.ndarray     # (S, S) bool: the region the defect was allowed to touch
    defect_type: str


def _pick(rng: np.random.Generator, region: np.ndarray) -> tuple[float, float]:
    """A random (y, x) among the True pixels of region."""
    idx = np.flatnonzero(region)
    y, x = np.unravel_index(idx[rng.integers(len(idx))], region.shape)
    return float(y), float(x)


def _blob(rng: np.random.Generator, size: int, center: tuple[float, float],
          area: float) -> np.ndarray:
    """Irregular closed shape of about `area` pixels: an ellipse with a wavy outline."""
    k = np.arange(2, 5)
    amp = rng.uniform(-0.15, 0.15, 3)
    phase = rng.uniform(0, 2 * np.pi, 3)
    aspect = rng.uniform(0.55, 1.0)
    rot = rng.uniform(0, np.pi)
    radius = np.sqrt(area / (np.pi * aspect * (1 + (amp ** 2).sum() / 2)))
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    dy, dx = yy - center[0], xx - center[1]
    u = dx * np.cos(rot) + dy * np.sin(rot)
    v = (-dx * np.sin(rot) + dy * np.cos(rot)) / aspect
    theta = np.arctan2(v, u)[..., None]
    outline = radius * (1 + (amp * np.cos(k * theta + phase)).sum(-1))
    inside = (np.hypot(u, v) < outline).astype(np.float32)
    return cv2.GaussianBlur(inside, (0, 0), 0.6)  # anti-aliased edge


def _centre_region(scene: _Scene, radius: float) -> np.ndarray:
    """Where a defect of this radius may be centred: on the object, away from borders."""
    size = scene.alpha.shape[0]
    margin = int(min(radius, size / 4))
    region = np.zeros((size, size), bool)
    region[margin:size - margin, margin:size - margin] = True
    fg = scene.foreground
    if fg.all():
        return region
    inner = ndi.distance_transform_edt(fg) > max(1.0, radius / 2)
    return inner if inner.any() else fg


def _foreign(rng: np.random.Generator, img: np.ndarray, scene: _Scene,
             area: float) -> tuple[np.ndarray, np.ndarray]:
    """Paste a piece of another photograph (the most different of a few candidates)."""
    size = img.shape[0]
    alpha = _blob(rng, size, _pick(rng, _centre_region(scene, np.sqrt(area / np.pi))), area)
    alpha *= scene.foreground
    ys, xs = np.nonzero(alpha > 0)  # never empty: the blob contains its centre
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    pool = [f for f in _FOREIGN_PHOTOS if f != scene.photo]
    best, best_diff = None, -1.0
    for _ in range(4):
        photo = _photo(pool[rng.integers(len(pool))])
        ph, pw = photo.shape[:2]
        scale = rng.uniform(0.6, 1.5)
        sh, sw = min(ph, int((y1 - y0) * scale) + 1), min(pw, int((x1 - x0) * scale) + 1)
        py, px = rng.integers(0, ph - sh + 1), rng.integers(0, pw - sw + 1)
        patch = cv2.resize(photo[py:py + sh, px:px + sw], (x1 - x0, y1 - y0),
                           interpolation=cv2.INTER_AREA)
        if rng.random() < 0.5:
            patch = patch[:, ::-1]
        a = alpha[y0:y1, x0:x1, None]
        diff = float((np.abs(patch - img[y0:y1, x0:x1]) * a).sum() / max(a.sum(), 1))
        if diff > best_diff:
            best, best_diff = patch, diff
    out = img.copy()
    a = alpha[y0:y1, x0:x1, None]
    out[y0:y1, x0:x1] = img[y0:y1, x0:x1] * (1 - a) + best * a
    return alpha, out


def _scratch(rng: np.random.Generator, img: np.ndarray, scene: _Scene,
             area: float) -> tuple[np.ndarray, np.ndarray]:
    """A thin bright or dark polyline a few pixels wide."""
    size = img.shape[0]
    width = max(2, int(round(rng.uniform(3, 6.5) * size / 256)))
    length = float(np.clip(area / width, 0.3 * size, 0.9 * size))
    fg = scene.foreground
    if not fg.all():  # keep the scratch to the object's extent
        length = min(length, 0.9 * np.sqrt(fg.sum()))
    pts = _jagged(rng, length, int(rng.integers(2, 5)), 0.45, rng.uniform(0, 2 * np.pi))
    pts = _place_path(pts, _pick(rng, _centre_region(scene, length / 2)), size)
    alpha = _draw_paths([pts], size, width) * rng.uniform(0.85, 1.0) * fg
    local = float(img[alpha > 0.5].mean()) if (alpha > 0.5).any() else 0.5
    tone = rng.uniform(0.9, 1.0) if local < 0.5 else rng.uniform(0.0, 0.1)
    colour = np.clip(tone + rng.uniform(-0.04, 0.04, 3), 0, 1).astype(np.float32)
    a = alpha[..., None]
    return alpha, img * (1 - a) + colour * a


# Rust, verdigris, yellow, red, blue, green: saturated so a stain is a colour change.
_STAIN_COLOURS = np.array([[0.60, 0.25, 0.05], [0.10, 0.50, 0.42], [0.85, 0.70, 0.10],
                           [0.75, 0.10, 0.10], [0.15, 0.25, 0.70], [0.25, 0.55, 0.10]],
                          np.float32)


def _far_colour(rng: np.random.Generator, img: np.ndarray, region: np.ndarray) -> np.ndarray:
    """One of _STAIN_COLOURS far from the region's mean colour (no red stain on a red
    saucer)."""
    mean = img[region].mean(0) if region.any() else img.reshape(-1, 3).mean(0)
    distance = np.abs(_STAIN_COLOURS - mean).sum(1)
    far = np.flatnonzero(distance >= 0.5 * distance.max())
    return _STAIN_COLOURS[far[rng.integers(len(far))]]


def _stain(rng: np.random.Generator, img: np.ndarray, scene: _Scene,
           area: float) -> tuple[np.ndarray, np.ndarray]:
    """A soft-edged colour blob that keeps the structure underneath (liquid, rust)."""
    size = img.shape[0]
    blob = _blob(rng, size, _pick(rng, _centre_region(scene, np.sqrt(area / np.pi))), area)
    sigma = rng.uniform(1.5, 4.0)
    alpha = cv2.GaussianBlur(blob, (0, 0), sigma) * rng.uniform(0.65, 0.9) * scene.foreground
    alpha[alpha < 0.01] = 0
    colour = _far_colour(rng, img, blob > 0.5)
    lum = img.mean(-1, keepdims=True)
    tinted = np.clip(colour * (0.55 + 0.9 * lum), 0, 1)
    a = alpha[..., None]
    return alpha, img * (1 - a) + tinted * a


def _missing(rng: np.random.Generator, img: np.ndarray, scene: _Scene,
             area: float) -> tuple[np.ndarray, np.ndarray]:
    """Material gone: objects show the backdrop through a bite or hole; textures get a
    sunken smoothed-over patch (blurred and shadowed) or a dark hole."""
    size = img.shape[0]
    fg = scene.foreground
    if fg.all():
        blob = _blob(rng, size, _pick(rng, _centre_region(scene, np.sqrt(area / np.pi))),
                     area)
        if rng.random() < 0.5:
            fill = cv2.GaussianBlur(img, (0, 0), rng.uniform(8, 14)) * rng.uniform(0.55, 0.75)
        else:
            dark = rng.uniform(0.03, 0.15)
            fill = np.clip(dark + rng.normal(0, 0.01, img.shape), 0, 1).astype(np.float32)
        a = blob[..., None]
        return blob, img * (1 - a) + fill * a
    edge = fg & ~ndi.binary_erosion(fg, iterations=2)
    bite = rng.random() < 0.6  # else a hole inside the object
    centre = edge if bite else _centre_region(scene, np.sqrt(area / np.pi))
    blob = _blob(rng, size, _pick(rng, centre), area)
    # The removed coverage, including the object's anti-aliased rim inside the bite.
    removed = scene.alpha * blob
    return removed, scene.render(scene.alpha - removed)


def _place_path(points: np.ndarray, centre: tuple[float, float], size: int) -> np.ndarray:
    """Points (k, 2) as x, y, centred on `centre` (y, x), then moved inside the frame."""
    pts = points + np.array([centre[1], centre[0]]) - (points.min(0) + points.max(0)) / 2
    lo, hi = pts.min(0), pts.max(0)
    return pts + np.clip(4 - lo, 0, None) - np.clip(hi - (size - 5), 0, None)


def _draw_paths(paths: list[np.ndarray], size: int, width: int) -> np.ndarray:
    """Anti-aliased polylines (x, y points) -> float coverage (S, S) in [0, 1]."""
    canvas = np.zeros((size, size), np.uint8)
    cv2.polylines(canvas, [np.rint(p * 4).astype(np.int32) for p in paths], False, 255,
                  thickness=width, lineType=cv2.LINE_AA, shift=2)
    return canvas.astype(np.float32) / 255


def _jagged(rng: np.random.Generator, length: float, n_seg: int, turn: float,
            heading: float) -> np.ndarray:
    """A random walk of n_seg equal steps whose heading turns by up to +-turn per step."""
    headings = heading + np.cumsum(rng.uniform(-turn, turn, n_seg))
    steps = np.stack([np.cos(headings), np.sin(headings)], 1) * length / n_seg
    return np.concatenate([np.zeros((1, 2)), np.cumsum(steps, 0)])  # (n_seg + 1, 2)


def _local_tone(rng: np.random.Generator, img: np.ndarray, where: np.ndarray,
                offset: tuple[float, float]) -> float:
    """A grey level that differs from the image under `where` by U(offset): darker on
    light surfaces, lighter on dark ones."""
    local = float(img[where].mean()) if where.any() else 0.5
    step = rng.uniform(*offset)
    return local - step if local > 0.5 else local + step


def _crack(rng: np.random.Generator, img: np.ndarray, scene: _Scene,
           area: float) -> tuple[np.ndarray, np.ndarray]:
    """A hairline fracture: a jagged line with one or two branches that darkens, by a
    fraction, whatever lies under it."""
    size = img.shape[0]
    width = max(1, int(round(rng.uniform(1.0, 2.5) * size / 256)))
    length = float(np.clip(area / width, 0.12 * size, 0.6 * size))
    if not scene.foreground.all():
        length = min(length, 0.7 * np.sqrt(scene.foreground.sum()))
    trunk = _jagged(rng, length, int(rng.integers(6, 12)), 0.6, rng.uniform(0, 2 * np.pi))
    trunk = _place_path(trunk, _pick(rng, _centre_region(scene, length / 2)), size)
    paths = [trunk]
    for _ in range(int(rng.integers(1, 3))):
        start = trunk[rng.integers(1, len(trunk) - 1)]
        branch = _jagged(rng, length * rng.uniform(0.2, 0.4), 4, 0.5,
                         rng.uniform(0, 2 * np.pi))
        paths.append(np.clip(branch + start, 2, size - 3))
    alpha = _draw_paths(paths, size, width) * scene.foreground
    depth = rng.uniform(0.4, 0.65)
    return alpha, img * (1 - depth * alpha[..., None])


def _colour(rng: np.random.Generator, img: np.ndarray, scene: _Scene,
            area: float) -> tuple[np.ndarray, np.ndarray]:
    """A discoloured region: brightness kept, hue moved part of the way to a colour far
    from the surface's own (a faint relative of the stain)."""
    size = img.shape[0]
    blob = _blob(rng, size, _pick(rng, _centre_region(scene, np.sqrt(area / np.pi))), area)
    alpha = cv2.GaussianBlur(blob, (0, 0), rng.uniform(1.0, 2.5)) * scene.foreground
    alpha[alpha < 0.01] = 0
    colour = _far_colour(rng, img, blob > 0.5)
    lum = img.mean(-1, keepdims=True)
    tinted = np.clip(lum * colour / colour.mean(), 0, 1)
    a = alpha[..., None] * rng.uniform(0.3, 0.5)
    return alpha, img * (1 - a) + tinted * a


def _hole(rng: np.random.Generator, img: np.ndarray, scene: _Scene,
          area: float) -> tuple[np.ndarray, np.ndarray]:
    """A small round pit: a dark hollow with a lit crescent on the side facing the light."""
    size = img.shape[0]
    pit = _blob(rng, size, _pick(rng, _centre_region(scene, np.sqrt(area / np.pi))), area)
    pit *= scene.foreground
    phi = rng.uniform(0, 2 * np.pi)
    shift = max(1.0, 0.25 * np.sqrt(area / np.pi))
    move = np.float32([[1, 0, shift * np.cos(phi)], [0, 1, shift * np.sin(phi)]])
    crescent = np.clip(cv2.warpAffine(pit, move, (size, size)) - pit, 0, 1) * scene.foreground
    fill = np.clip(rng.uniform(0.05, 0.2) + rng.normal(0, 0.01, img.shape), 0, 1)
    out = img * (1 - pit[..., None]) + fill.astype(np.float32) * pit[..., None]
    out = np.clip(out + crescent[..., None] * rng.uniform(0.12, 0.25), 0, 1)
    return np.maximum(pit, crescent), out


def _contamination(rng: np.random.Generator, img: np.ndarray, scene: _Scene,
                   area: float) -> tuple[np.ndarray, np.ndarray]:
    """Specks of foreign material (chips, dust) scattered around one spot."""
    size = img.shape[0]
    n = int(rng.integers(3, 9))
    spread = 2.5 * np.sqrt(area / np.pi)
    centre = np.array(_pick(rng, _centre_region(scene, spread)))
    alpha = np.zeros((size, size), np.float32)
    for _ in range(n):
        at = np.clip(centre + rng.normal(0, spread / 2, 2), 3, size - 4)
        alpha = np.maximum(alpha, _blob(rng, size, (float(at[0]), float(at[1])),
                                        max(area / n, 6.0)))
    alpha *= scene.foreground * rng.uniform(0.75, 0.95)
    tone = _local_tone(rng, img, alpha > 0.5, (0.3, 0.5))
    colour = np.clip(tone + rng.uniform(-0.05, 0.05, 3), 0, 1).astype(np.float32)
    a = alpha[..., None]
    return alpha, img * (1 - a) + colour * a


def _thread(rng: np.random.Generator, img: np.ndarray, scene: _Scene,
            area: float) -> tuple[np.ndarray, np.ndarray]:
    """A loose fibre lying on the surface: a thin, faint, gently curved line."""
    size = img.shape[0]
    width = max(1, int(round(rng.uniform(1.0, 2.0) * size / 256)))
    length = float(np.clip(area / width, 0.15 * size, 0.5 * size))
    if not scene.foreground.all():
        length = min(length, 0.7 * np.sqrt(scene.foreground.sum()))
    heading = rng.uniform(0, 2 * np.pi)
    along = np.array([np.cos(heading), np.sin(heading)])
    bend = np.array([-along[1], along[0]]) * rng.uniform(-0.4, 0.4) * length
    t = np.linspace(0, 1, 32)[:, None]  # a quadratic Bezier curve
    p0, p2 = -along * length / 2, along * length / 2
    curve = (1 - t) ** 2 * p0 + 2 * t * (1 - t) * bend + t ** 2 * p2
    curve = _place_path(curve, _pick(rng, _centre_region(scene, length / 2)), size)
    alpha = _draw_paths([curve], size, width) * scene.foreground * rng.uniform(0.6, 0.85)
    tone = _local_tone(rng, img, alpha > 0.3, (0.15, 0.3))
    colour = np.clip(tone + rng.uniform(-0.03, 0.03, 3), 0, 1).astype(np.float32)
    a = alpha[..., None]
    return alpha, img * (1 - a) + colour * a


_DEFECTS = {"foreign": _foreign, "scratch": _scratch, "stain": _stain, "missing": _missing,
            "colour": _colour, "crack": _crack, "hole": _hole,
            "contamination": _contamination, "thread": _thread}


def render_defect(class_name: str, defect_type: str, rng: np.random.Generator,
                  area_fraction: float = 0.04, size: int = 256,
                  min_visible: float | None = None) -> DefectSample:
    """One shot with and without a defect of about `area_fraction` of the image.

    The mask is taken from the actual pixel change (then holes inside the changed blob are
    closed, never beyond the region the defect touched or off the object), so it is
    neither a loose box nor missing the faint rim of a soft stain. Shots whose defect came
    out too faint (changed less than `min_visible` of the image; default: the world's) are
    redrawn from the same generator, so the result stays deterministic.
    """
    world = world_of(class_name)
    if min_visible is None:
        min_visible = world.min_visible
    if defect_type not in world.defect_types:
        raise ValueError(f"unknown defect type '{defect_type}' for '{class_name}'; choose "
                         f"from {world.defect_types}")
    target = area_fraction * size * size
    for _ in range(20):
        scene = _scene(class_name, rng, size)
        fg = scene.foreground
        area = min(target, 0.3 * fg.sum())
        img = scene.render()
        alpha, out = _DEFECTS[defect_type](rng, img, scene, area)
        clean, defective = _to_uint8(img), _to_uint8(out)
        applied = alpha > 0
        changed = np.abs(clean.astype(np.int16) - defective).max(-1) > _CHANGE_THRESHOLD
        closed = ndi.binary_fill_holes(ndi.binary_closing(changed, iterations=3))
        mask = changed | (closed & applied & fg)
        if mask.sum() >= max(0.5 * applied.sum(), min_visible * size * size):
            return DefectSample(clean, defective, mask, fg, applied, defect_type)
    raise RuntimeError(f"could not place a visible '{defect_type}' defect of {area_fraction:g} "
                       f"of the image on '{class_name}' in 20 tries (a defect must visibly "
                       f"change at least half the pixels it touched and {min_visible:g} of "
                       "the image)")


def _rng(seed: int, class_name: str, split: int, index: int) -> np.random.Generator:
    """Independent stream per image, so a subset of classes, or fewer training and good
    test images, gives the same images as the full set (a defect image's size also
    depends on the number of defect images: _defect_sizes spreads them over the range)."""
    return np.random.default_rng([seed, zlib.crc32(class_name.encode()), split, index])


def _save_png(array: np.ndarray, path: str) -> None:
    # zlib level 1: a few times faster than the default and no larger on these photos.
    Image.fromarray(array).save(path, format="PNG", compress_level=1)


def _check_overwrite(root: str, sub: str) -> None:
    """Refuse to delete a folder this module did not write."""
    path = os.path.join(root, sub)
    if (os.path.isdir(path) and os.listdir(path)
            and not os.path.isfile(os.path.join(root, MARKER))):
        raise FileExistsError(
            f"{path} exists and was not written by demo_data.py (no {MARKER} in {root}): "
            f"choose an empty folder for the demo set or delete {path}")


def _fresh_dir(root: str, sub: str) -> str:
    path = os.path.join(root, sub)
    if os.path.isdir(path):
        shutil.rmtree(path)
    os.makedirs(path)
    return path


def _defect_sizes(n: int, world: DemoWorld = WORLDS["main"]) -> list[tuple[str, int, float]]:
    """(defect type, index within type, area fraction): types in turn, each type's sizes
    spread over the world's area range (main: ~1% to ~10% of the image)."""
    types = world.defect_types
    lo, hi = world.area_range
    counts = {t: len(range(i, n, len(types))) for i, t in enumerate(types)}
    out = []
    for j in range(n):
        t = types[j % len(types)]
        k = j // len(types)
        out.append((t, k, lo + (hi - lo) * (k + 0.5) / counts[t]))
    return out


def _write_class(cls: str, mvtec_root: str, imagenet_root: str, spec: DemoWorld, seed: int,
                 size: int, n_train: int, n_test_good: int, n_test_defect: int,
                 bar: tqdm) -> dict[str, int]:
    """One class's folders, written afresh: train/good with a foreground mask per image,
    test/good, and each defect type's test images with their ground truth; image counts
    per folder."""
    base = _fresh_dir(mvtec_root, cls)
    fg_dir = _fresh_dir(imagenet_root, os.path.join("fg_mask", cls))
    c: dict[str, int] = {}
    train_dir = os.path.join(base, "train", "good")
    os.makedirs(train_dir)
    for i in range(n_train):
        img, fg = render_normal(cls, _rng(seed, cls, 0, i), size)
        _save_png(img, os.path.join(train_dir, f"{i:03d}.png"))
        _save_png(fg.astype(np.uint8) * 255, os.path.join(fg_dir, f"{i:03d}.png"))
        bar.update()
    c["train/good"] = n_train
    good_dir = os.path.join(base, "test", "good")
    os.makedirs(good_dir)
    for i in range(n_test_good):
        img, _ = render_normal(cls, _rng(seed, cls, 1, i), size)
        _save_png(img, os.path.join(good_dir, f"{i:03d}.png"))
        bar.update()
    c["test/good"] = n_test_good
    for j, (dtype, k, area) in enumerate(_defect_sizes(n_test_defect, spec)):
        img_dir = os.path.join(base, "test", dtype)
        gt_dir = os.path.join(base, "ground_truth", dtype)
        os.makedirs(img_dir, exist_ok=True)
        os.makedirs(gt_dir, exist_ok=True)
        s = render_defect(cls, dtype, _rng(seed, cls, 2, j), area, size, spec.min_visible)
        _save_png(s.defective, os.path.join(img_dir, f"{k:03d}.png"))
        _save_png(s.mask.astype(np.uint8) * 255, os.path.join(gt_dir, f"{k:03d}_mask.png"))
        c[f"test/{dtype}"] = c.get(f"test/{dtype}", 0) + 1
        bar.update()
    return c


def make_demo_dataset(mvtec_root: str, imagenet_root: str, seed: int = 0,
                      classes: list[str] | None = None, n_train: int = 40,
                      n_test_good: int = 20, n_test_defect: int = 20,
                      size: int = 256, world: str = "main",
                      defect_area: tuple[float, float] | None = None
                      ) -> dict[str, dict[str, int]]:
    """Write a demo set (`WORLDS[world]`) in MVTec layout plus foreground masks of the
    train images.

    `defect_area` (smallest, largest fraction of the image, within DEFECT_AREA_BOUNDS)
    replaces the world's defect sizes, so one world can be drawn again with other defects
    (README's tuning draws: the main world with 0.1-1 % defects); a defect that changed
    less than half the smallest area (or the world's minimum, if lower) is then redrawn.

    mvtec_root/<class>/{train/good, test/good, test/<defect>, ground_truth/<defect>} and
    imagenet_root/fg_mask/<class>/<stem>.png (0/255; stems of train/good). Returns image
    counts per class and folder, e.g. {'brick': {'train/good': 40, 'test/scratch': 5}}.
    """
    if world not in WORLDS:
        raise ValueError(f"unknown demo world '{world}'; choose from {sorted(WORLDS)}")
    spec = WORLDS[world]
    classes = list(spec.classes if classes is None else classes)
    unknown = sorted(set(classes) - set(spec.classes))
    if unknown:
        raise ValueError(f"unknown classes {unknown} for demo world '{world}'; choose from "
                         f"{spec.classes}")
    if n_train < 1 or n_test_good < 1 or n_test_defect < 1:
        raise ValueError("make_demo_dataset needs n_train, n_test_good and n_test_defect "
                         f">= 1 (got {n_train}, {n_test_good}, {n_test_defect})")
    if size < 64:
        raise ValueError(f"size={size} is too small for visible defects; use >= 64")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer (got {seed!r})")
    if defect_area is not None:
        lo, hi = defect_area
        if not DEFECT_AREA_BOUNDS[0] <= lo <= hi <= DEFECT_AREA_BOUNDS[1]:
            raise ValueError(f"defect_area must be (smallest, largest) with "
                             f"{DEFECT_AREA_BOUNDS[0]} <= smallest <= largest <= "
                             f"{DEFECT_AREA_BOUNDS[1]} of the image (got {tuple(defect_area)})")
        # thin defects change fewer pixels than their area: never stricter than the world
        spec = replace(spec, area_range=(lo, hi), min_visible=min(spec.min_visible, lo / 2))
    params = dict(world=world, seed=seed, classes=classes, n_train=n_train,
                  n_test_good=n_test_good, n_test_defect=n_test_defect, size=size,
                  defect_area=list(spec.area_range))
    counts: dict[str, dict[str, int]] = {}
    for cls in classes:
        _check_overwrite(mvtec_root, cls)
        _check_overwrite(imagenet_root, os.path.join("fg_mask", cls))
        _check_overwrite(imagenet_root, os.path.join("train", cls))  # setup_train_dataset's
    for root in (mvtec_root, imagenet_root):  # from here on, these folders are ours
        os.makedirs(root, exist_ok=True)
        with open(os.path.join(root, MARKER), "w") as f:
            json.dump(params, f, indent=1)
    with progress(total=len(classes) * (n_train + n_test_good + n_test_defect), unit="img",
                  desc="demo set") as bar:
        for cls in classes:
            bar.set_postfix_str(cls)
            try:
                counts[cls] = _write_class(cls, mvtec_root, imagenet_root, spec, seed, size,
                                           n_train, n_test_good, n_test_defect, bar)
            except RuntimeError as err:
                if defect_area is None:
                    raise
                raise ValueError(f"defect_area {tuple(defect_area)}: {err}; choose sizes "
                                 f"nearer the world's {WORLDS[world].area_range}") from err
    return counts
