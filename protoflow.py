"""ProtoFlow: PMAD's proposal masks and abnormality maps (docs/method.md section 6).

Each patch feature of a frozen CNN, minus its nearest normal prototype of the image's
class, is scored by a conditional normalizing flow; a low likelihood marks an anomalous
patch. Subtracting the class's own prototypes makes the flow class-agnostic, which is why
it also works on classes it never saw in training.

This module is the model: features, prototypes (k-center coreset), the flow and its
training loop, proposals and abnormality maps, and the file format. `run_protoflow.py`
is the command that builds the prototypes and trains the flow.
"""
from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import FrEIA.framework as Ff
import FrEIA.modules as Fm
import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import special_ortho_group
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor, nn

from backbones import create_backbone, normalization_record, recorded_normalization
from masking_generator import Rng, as_numpy_rng, num_masked
from utils import progress as progress_bar  # `progress` is greedy_coreset's flag
from utils import (TRAIN_IMAGE_HASHES, CheckpointError, FlagError, MissingFileError,
                   cosine_scheduler, download_mistake, file_sha256, read_json_object,
                   read_weights_file, save_on_master, strip_ddp_prefix, write_atomic)

DEFAULT_BACKBONE = "tf_efficientnet_b6"  # architecture of a file that names none
# timm 0.3.2's `tf_efficientnet_b6` (the original's encoder) is the AutoAugment ImageNet
# checkpoint; timm >= 0.9 defaults to the Noisy-Student one, so the tag is explicit.
DEFAULT_ENCODER = "tf_efficientnet_b6.aa_in1k"
DEFAULT_OUT_INDICES = (2, 3)
DEFAULT_N_BLOCKS = 8
COND_DIM = 128
CORESET_FILE = "coreset.npy"
CORESET_META = "coreset.json"
CORESET_SHA256 = "npy_sha256"  # coreset.json's record of the coreset.npy it describes
DEFAULT_IMG_SIZE = 224  # the paper's: what a ProtoFlow file that records none was made at
THRESHOLD_QUANTILE = 0.99
SCORE_QUANTILES = (0.5, 0.9, 0.95, 0.99)


def image_score(logp: Tensor) -> Tensor:
    """ProtoFlow's image score: the largest patch anomaly, max over patches of -logp.

    logp (N, h, w) -> (N,). It depends on the image alone, not on the set it is in, so
    a threshold computed on held-out normal images applies to any test image.
    """
    return -logp.flatten(1).amin(dim=1)


def resize_maps(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """maps (N, h, w) -> (N, H, W) float32, bilinear with aligned corners: every map of
    the method is resized this way (docs/method.md 6-7), as the original code does."""
    return F.interpolate(maps.float()[:, None], size=size, mode="bilinear",
                         align_corners=True)[:, 0]


def is_anomalous(scores: Tensor, threshold: float) -> Tensor:
    """ProtoFlow's normal/anomalous call: strictly above the threshold (a score equal to
    the threshold, e.g. the held-out quantile itself, is normal)."""
    return scores > threshold


@dataclass
class Proposals:
    """ProtoFlow's output for one class's image set (docs/method.md 6)."""
    log_likelihood: Tensor        # (N, h, w) per-dim log-likelihood, unnormalised
    abnormality_maps: Tensor      # (N, H, W) max(prob) - prob over the set
    log_abnormality_maps: Tensor  # (N, H, W) max(logp) - logp over the set, unsaturated
    image_scores: Tensor          # (N,) max over patches of -logp (set-independent)
    rank: Tensor                  # (N, L) long: 0 = the patch ProtoFlow finds most anomalous

    def test_ranks(self, anomalous: Tensor | None = None,
                   seeds: Sequence[int] | None = None) -> Tensor:
        """The proposal rule (method.md 7), as the order in which a test image's patches
        are masked: (N, L) long, a patch of rank < m is in the image's m-patch mask.

        Images called anomalous are masked in proposal order (most anomalous first), so
        the defect is hidden from the context that predicts it; the others in a uniformly
        random order drawn from their own seed, `seeds[i]` (one per image, derived from
        the image itself: the same image gets the same random mask in any batch, set or
        order). `anomalous` None calls every image anomalous, the label-free default of
        the clean protocol: no call can then leave a defect out of the mask.
        """
        if anomalous is None:
            return self.rank
        n, num_patches = self.rank.shape
        if seeds is None or len(seeds) != n:
            raise ValueError(f"images called normal get random masks: pass one seed per image "
                             f"({n}), got {None if seeds is None else len(seeds)}")
        rand = torch.stack([torch.randperm(num_patches,
                                           generator=torch.Generator().manual_seed(int(s)))
                            for s in seeds])  # (N, L): a uniformly random rank per patch
        return torch.where(anomalous.to(self.rank.device)[:, None], self.rank,
                           rand.to(self.rank.device))

    def test_masks(self, ratio: float, anomalous: Tensor | None = None,
                   seeds: Sequence[int] | None = None) -> Tensor:
        """(N, L) bool: the `num_masked(ratio, L)` first patches of `test_ranks`."""
        return self.test_ranks(anomalous, seeds) < num_masked(ratio, self.rank.shape[1])


def covering_masks(ranks: Tensor, ratio: float) -> list[Tensor]:
    """Masks that together mask every patch exactly once, in the order `ranks` (N, L).

    Pass k masks ranks [k m, (k + 1) m), m = num_masked(ratio, L): pass 0 is the test
    mask, so the likeliest defect patches are predicted from a context without them, and
    later passes score the rest instead of leaving them at 0. -> ceil(L / m) masks (N, L)
    bool.
    """
    num_patches = ranks.shape[1]
    m = num_masked(ratio, num_patches)
    if m < 1:
        raise ValueError(f"mask ratio {ratio} masks no patch of {num_patches}")
    return [(ranks >= k) & (ranks < k + m) for k in range(0, num_patches, m)]


# ----------------------------------------------------------------------------- features
def extract_features(encoder: nn.Module, images: Tensor) -> Tensor:
    """Two-scale patch features: (N, 3, H, W) -> (N, C, H/8, W/8).

    Each map is smoothed by AvgPool2d(3, 1, 1) (neighbourhood context, as in PatchCore);
    the coarser maps are nearest-upsampled to the stride-8 grid and concatenated after it.
    """
    maps = [F.avg_pool2d(m, 3, 1, 1) for m in encoder(images)]  # [(N, C1, H/8, W/8), ...]
    size = maps[0].shape[-2:]
    return torch.cat([maps[0]] + [F.interpolate(m, size=size, mode="nearest")
                                  for m in maps[1:]], dim=1)


def patch_rows(features: Tensor) -> Tensor:
    """(N, C, h, w) -> (N * h * w, C), row-major over each image's grid."""
    return features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])


# ----------------------------------------------------------------------------- prototypes
def greedy_coreset(features: Tensor, n: int, projection_dim: int | None = None,
                   device: str | torch.device | None = None, rng: Rng = None,
                   progress: bool = True) -> Tensor:
    """Greedy k-center (minimax facility location) selection: indices (n,) in pick order.

    Each pick is the point farthest from all earlier picks, which keeps the covering
    radius (the farthest any point lies from its nearest pick) within twice the optimum
    for n centres (Gonzalez's 2-approximation). The start is drawn from `rng`
    (index 0 without one). `projection_dim` selects on a Gaussian random projection
    (Johnson-Lindenstrauss: distances kept up to a small factor) to save time; the
    returned indices address the original features. One pick costs one matrix-vector
    product over all points, on `device` (the GPU when given).
    """
    m, c = features.shape  # (M, C)
    if not 1 <= n <= m:
        raise ValueError(f"coreset size {n} must lie in [1, {m}] (the number of features)")
    device = torch.device(device) if device is not None else features.device
    x = features.to(device=device, dtype=torch.float32)  # (M, C)
    gen = as_numpy_rng(rng, default_seed=0)
    if projection_dim is not None and projection_dim < c:
        proj = torch.from_numpy(gen.standard_normal((c, projection_dim), dtype=np.float32))
        x = x @ (proj.to(device) / math.sqrt(projection_dim))  # (M, d)
    sq = (x * x).sum(1)  # (M,)
    start = int(gen.integers(m)) if rng is not None else 0
    picks = torch.empty(n, dtype=torch.long, device=device)
    picks[0] = start
    # squared distances |x|^2 - 2 x.c + |c|^2: one pass over x per pick (memory-bound)
    min_dist = torch.addmv(sq, x, x[start], alpha=-2).add_(sq[start])  # (M,)
    for i in progress_bar(range(1, n), desc="coreset", disable=not progress or n < 2,
                          mininterval=1.0, leave=False):
        j = torch.argmax(min_dist, dim=0, keepdim=True)  # (1,): stays on the device
        picks[i:i + 1] = j
        dist = torch.addmv(sq, x, x.index_select(0, j)[0], alpha=-2).add_(sq[j])  # (M,)
        torch.minimum(min_dist, dist, out=min_dist)
    return picks.cpu()


def nearest_prototype(features: Tensor, prototypes: Tensor, chunk: int = 4096
                      ) -> tuple[Tensor, Tensor]:
    """L2 distance (P,) and index (P,) of each feature's nearest prototype (M, C).

    Chunked so that the (chunk, M) distance block stays small whatever P is.
    """
    dists, idxs = [], []
    for part in features.split(chunk):  # (chunk, C)
        d, i = torch.cdist(part, prototypes).min(dim=1)  # (chunk,)
        dists.append(d)
        idxs.append(i)
    return torch.cat(dists), torch.cat(idxs)


@torch.inference_mode()
def build_prototypes(encoder: nn.Module, loader: Iterable, coreset_ratio: float = 0.01,
                     projection_dim: int | None = None, device: str | torch.device = "cpu",
                     rng: Rng = None) -> np.ndarray:
    """A class's prototypes: the coreset of all its patch features, float32 (M, C)."""
    feats = []
    for batch in progress_bar(loader, desc="features", leave=False):
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        feats.append(patch_rows(extract_features(encoder, images.to(device))).cpu())
    if not feats:
        raise ValueError("no images to build prototypes from")
    feats = torch.cat(feats)  # (n_images * h * w, C)
    n = max(1, int(len(feats) * coreset_ratio))
    idx = greedy_coreset(feats, n, projection_dim=projection_dim, device=device, rng=rng)
    return feats[idx].numpy().astype(np.float32)


def save_prototypes(prototypes_dir: str, class_name: str, prototypes: np.ndarray,
                    meta: dict) -> str:
    """Write <dir>/<class>/coreset.npy (float32 (M, C)) and coreset.json (how it was made)."""
    folder = os.path.join(prototypes_dir, class_name)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, CORESET_FILE)
    write_atomic(path, lambda tmp: _save_npy(tmp, prototypes.astype(np.float32)))
    # the .npy's digest pairs the two files: a kill between the writes leaves a JSON that
    # `read_prototype_meta` refuses instead of one describing other prototypes
    text = json.dumps({**meta, CORESET_SHA256: file_sha256(path)}, indent=1)
    write_atomic(os.path.join(folder, CORESET_META), lambda tmp: Path(tmp).write_text(text))
    return path


def _save_npy(path: str, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object: np.save would append .npy to a name
        np.save(f, array)


def prototypes_sha256(prototypes_dir: str, class_name: str) -> str | None:
    """A class's prototypes by content (what a resumed run or evaluation must match);
    None when missing (loading them names the file and the fix)."""
    path = os.path.join(prototypes_dir, class_name, CORESET_FILE)
    return file_sha256(path) if os.path.isfile(path) else None


def read_prototype_meta(prototypes_dir: str, class_name: str, fix: str) -> dict | None:
    """<dir>/<class>/coreset.json (how the prototypes were made), None when missing (the
    authors' release has none). One recording another coreset.npy's sha256 (a rebuild
    killed between the two writes) describes other prototypes, so it is refused; one
    without the field (an older version's) is not checked. `fix`: the rebuild advice."""
    folder = os.path.join(prototypes_dir, class_name)
    meta_path, npy_path = os.path.join(folder, CORESET_META), os.path.join(folder, CORESET_FILE)
    if not os.path.isfile(meta_path):
        return None
    meta = read_json_object(meta_path, fix, CheckpointError)
    recorded = meta.get(CORESET_SHA256)
    if recorded is not None and os.path.isfile(npy_path) and file_sha256(npy_path) != recorded:
        raise CheckpointError(f"{meta_path} describes another {CORESET_FILE} than {npy_path} "
                              "(its recorded sha256 differs: a rebuild was interrupted between "
                              f"the two files), so how the prototypes were made is unknown; "
                              f"{fix}")
    return meta


def prototype_classes(prototypes_dir: str) -> list[str]:
    """The classes with prototypes in `prototypes_dir` (<class>/coreset.npy), sorted: what
    a class name that has none is checked against (a typo, another folder)."""
    if not os.path.isdir(prototypes_dir):
        return []
    return sorted(c for c in os.listdir(prototypes_dir)
                  if os.path.isfile(os.path.join(prototypes_dir, c, CORESET_FILE)))


def load_prototypes(prototypes_dir: str, class_name: str, feature_dim: int,
                    backbone: str | None = None, out_indices: Sequence[int] | None = None,
                    flags: dict | None = None,
                    normalization: tuple[Sequence[float], Sequence[float]] | None = None,
                    rebuild: dict | None = None) -> Tensor:
    """<dir>/<class>/coreset.npy as float32 (M, C), checked against the flow's encoder.

    `flags`: the run's flags it shares with the `prototypes` command (run_protoflow.py
    train passes them; ProtoFlow its file's). The image size (img_size, required) and the
    encoder weights (encoder_weights, compared when given) that coreset.json records must
    then be these, since other ones give other features; the rebuild command in the
    errors repeats the flags. So must the input `normalization` (mean, std), when given
    and recorded. `rebuild`: flags only that command adds (ProtoFlow's: where its encoder
    came from, which a released file's untagged backbone name does not say).
    """
    path = os.path.join(prototypes_dir, class_name, CORESET_FILE)
    make = "python run_protoflow.py prototypes " + _command_flags({
        "data_path": "<ImageNet-layout root>", "classes": class_name,
        "output_dir": prototypes_dir, "encoder": backbone or DEFAULT_ENCODER,
        "out_indices": out_indices, **(flags or {}), **(rebuild or {})})
    if not os.path.isfile(path):
        have = prototype_classes(prototypes_dir)
        raise MissingFileError(f"no prototypes for class '{class_name}': {path} is missing ("
                               + (f"classes with prototypes there: {', '.join(have)}"
                                  if have else "none there") + "); if the class is "
                               f"new, make them with `{make}`")
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as e:
        raise CheckpointError(download_mistake(path) or f"{path} is not a readable .npy "
                              f"array ({e}); rebuild it with `{make}`") from None
    if arr.dtype.kind != "f":  # strings fail astype; complex would drop its imaginary part
        raise CheckpointError(f"{path} holds {arr.dtype} values, not float features; "
                              f"rebuild it with `{make}`")
    if arr.ndim != 2 or arr.shape[1] != feature_dim or len(arr) == 0:
        raise CheckpointError(f"{path} holds shape {arr.shape}, the ProtoFlow encoder gives "
                              f"(M, {feature_dim}) features; rebuild it with `{make}`")
    meta = read_prototype_meta(prototypes_dir, class_name,
                               f"rebuild the prototypes with `{make}`")
    if backbone is not None and meta is not None:
        made = (_architecture(meta.get("backbone", "")), list(meta.get("out_indices", [])))
        want = (_architecture(backbone), list(out_indices or DEFAULT_OUT_INDICES))
        if made != want:
            raise CheckpointError(f"{path} was made with encoder {made}, the ProtoFlow file "
                                  f"uses {want}; rebuild it with `{make}`")
        if flags is not None:
            weights = (meta.get("encoder_weights"), flags.get("encoder_weights"))
            made_with = {"encoder weights": _weights_source(meta.get("backbone"), weights[0])
                         if "encoder_weights" in meta and "encoder_weights" in flags
                         and all(w is None or os.path.isfile(w) for w in weights) else None,
                         "--img_size": meta.get("img_size")}
            this_run = {"encoder weights": _weights_source(backbone,
                                                           flags.get("encoder_weights")),
                        "--img_size": flags["img_size"]}
            # a field an older coreset.json does not record is not checked, as a file
            # without coreset.json is not; nor a weights path that names no file here
            # (another machine's): it says nothing of the weights
            differ = [f"{k} {v} (this run: {this_run[k]})" for k, v in made_with.items()
                      if v is not None and _resolved(v) != _resolved(this_run[k])]
            if differ:
                raise CheckpointError(f"{path} was made with {', '.join(differ)}, which give "
                                      f"other features; rebuild it with `{make}`")
    if normalization is not None and meta is not None:  # unrecorded: ImageNet's, as made
        made_norm = recorded_normalization(meta, os.path.join(prototypes_dir, class_name,
                                                              CORESET_META),
                                           f"rebuild the prototypes with `{make}`")
        want_norm = tuple(tuple(float(v) for v in x) for x in normalization)
        if made_norm != want_norm:
            raise CheckpointError(f"{path} was made from images normalised with mean "
                                  f"{list(made_norm[0])}, std {list(made_norm[1])}; this "
                                  f"ProtoFlow normalises them with mean {list(want_norm[0])}, "
                                  f"std {list(want_norm[1])}, which gives other features; "
                                  f"rebuild it with `{make}` (or, if the ProtoFlow file is the "
                                  "older of the two, train it again: `python run_protoflow.py "
                                  "train ...`)")
    if not np.isfinite(arr).all():
        raise CheckpointError(f"{path} contains non-finite values; rebuild it with `{make}`")
    return torch.from_numpy(arr.astype(np.float32))


def _weights_source(backbone: str | None, encoder_weights: str | None) -> str:
    """Where an encoder's weights come from, as coreset.json records it: the local
    --encoder_weights file, else timm's pretrained ones of the tagged --encoder name."""
    return encoder_weights if encoder_weights is not None else f"timm's pretrained {backbone}"


def _resolved(value: object) -> object:
    """A weights file by its real path (a relative and an absolute name of one file
    agree); any other recorded value as it is."""
    return os.path.realpath(value) if isinstance(value, str) and os.path.isfile(value) \
        else value


def _command_flags(flags: dict) -> str:
    """'--name value' per flag: a list's items in turn, a True switch alone, None and
    False left out."""
    parts = []
    for name, value in flags.items():
        if value is None or value is False:
            continue
        if isinstance(value, (list, tuple)):
            value = " ".join(map(str, value))
        parts.append(f"--{name}" if value is True else f"--{name} {value}")
    return " ".join(parts)


def _architecture(name: str) -> str:
    """timm model name without its pretrained tag ('tf_efficientnet_b6.aa_in1k' -> ...b6)."""
    return name.split(".")[0]


# ----------------------------------------------------------------------------- flow
def positional_encoding_2d(channels: int, h: int, w: int) -> Tensor:
    """Sinusoidal position code (channels, h, w): first half the column, second the row.

    Frequencies exp(-ln(1e4) * 2k / (channels / 2)); sin on even, cos on odd channels.
    """
    if channels % 4:
        raise ValueError(f"positional encoding needs a multiple of 4 channels, got {channels}")
    half = channels // 2
    freq = torch.exp(torch.arange(0, half, 2, dtype=torch.float32) * -(math.log(1e4) / half))
    col = torch.arange(w, dtype=torch.float32)[:, None] * freq  # (w, half/2)
    row = torch.arange(h, dtype=torch.float32)[:, None] * freq  # (h, half/2)
    pe = torch.zeros(channels, h, w)
    pe[0:half:2] = col.sin().T[:, None, :].expand(-1, h, -1)
    pe[1:half:2] = col.cos().T[:, None, :].expand(-1, h, -1)
    pe[half::2] = row.sin().T[:, :, None].expand(-1, -1, w)
    pe[half + 1::2] = row.cos().T[:, :, None].expand(-1, -1, w)
    return pe


def _subnet(c_in: int, c_out: int) -> nn.Module:
    return nn.Sequential(nn.Linear(c_in, 2 * c_in), nn.ReLU(), nn.Linear(2 * c_in, c_out))


def build_flow(dim: int, n_blocks: int = DEFAULT_N_BLOCKS, cond_dim: int = COND_DIM,
               rng: Rng = None) -> Ff.SequenceINN:
    """FrEIA SequenceINN(dim) of conditional AllInOneBlocks (docs/method.md 6).

    FrEIA draws each block's fixed rotation from numpy's global generator; with `rng`
    they are redrawn from it, so that a seed fixes the whole flow.
    """
    flow = Ff.SequenceINN(dim)
    for _ in range(n_blocks):
        flow.append(Fm.AllInOneBlock, cond=0, cond_shape=(cond_dim,),
                    subnet_constructor=_subnet, affine_clamping=1.9,
                    global_affine_type="SOFTPLUS", permute_soft=True)
    if rng is not None:
        gen = as_numpy_rng(rng, default_seed=0)
        with torch.no_grad():
            for block in flow.module_list:
                w = torch.from_numpy(special_ortho_group.rvs(dim, random_state=gen)).float()
                block.w_perm.copy_(w)
                block.w_perm_inv.copy_(w.T)
    return flow


def flow_log_likelihood(flow: Ff.SequenceINN, x: Tensor, cond: Tensor) -> Tensor:
    """Per-dim log-likelihood (P,) of rows x (P, C) under the flow with condition (P, D):
    (C * -0.5 ln(2 pi) - 0.5 |z|^2 + log|det J|) / C."""
    z, log_jac_det = flow(x, c=[cond])  # (P, C), (P,)
    c = x.shape[1]
    return (c * -0.5 * math.log(2 * math.pi) - 0.5 * z.pow(2).sum(1) + log_jac_det) / c


def flow_loss(logp: Tensor) -> Tensor:
    """mean(-log sigmoid(logp)); logsigmoid keeps it finite for very negative logp."""
    return -F.logsigmoid(logp).mean()


def patch_log_likelihood(encoder: nn.Module, flow: Ff.SequenceINN, images: Tensor,
                         prototypes: Sequence[Tensor], class_idx: Tensor,
                         return_distance: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Per-patch log-likelihood (N, h, w) of images (N, 3, H, W) of classes class_idx (N,),
    each scored against its own class's prototypes[class_idx] (M_k, C).

    With `return_distance`, also each patch's L2 distance to its nearest prototype
    (N, h, w): PatchCore's patch score on the same memory bank, for free.
    """
    features = extract_features(encoder, images)  # (N, C, h, w)
    n, c, h, w = features.shape
    rows = features.permute(0, 2, 3, 1).reshape(n, h * w, c)  # (N, h*w, C)
    residual = torch.empty_like(rows)
    distance = rows.new_empty(n, h * w)
    classes = class_idx.cpu().numpy()  # grouped on the host: no wait when passed on the CPU
    for k in np.unique(classes).tolist():
        sel = torch.from_numpy(np.flatnonzero(classes == k)).to(rows.device, non_blocking=True)
        part = rows.index_select(0, sel).reshape(-1, c)  # (n_k * h*w, C)
        dist, idx = nearest_prototype(part, prototypes[k])
        residual.index_copy_(0, sel, (part - prototypes[k][idx]).reshape(-1, h * w, c))
        distance.index_copy_(0, sel, dist.reshape(-1, h * w))
    cond_dim = flow.module_list[0].condition_channels
    pos = positional_encoding_2d(cond_dim, h, w).to(rows)  # (D, h, w)
    cond = pos.permute(1, 2, 0).reshape(1, h * w, cond_dim).expand(n, -1, -1)  # (N, h*w, D)
    logp = flow_log_likelihood(flow, residual.reshape(-1, c), cond.reshape(-1, cond_dim))
    if return_distance:
        return logp.reshape(n, h, w), distance.reshape(n, h, w)
    return logp.reshape(n, h, w)


def train_flow(encoder: nn.Module, flow: Ff.SequenceINN, loader: Iterable,
               prototypes: Sequence[Tensor], epochs: int, lr: float = 2e-4,
               warmup_epochs: int = 2, device: str | torch.device = "cpu",
               optimizer: torch.optim.Optimizer | None = None, start_epoch: int = 0,
               epoch_end: Callable[[int, float, torch.optim.Optimizer], None] | None = None
               ) -> list[float]:
    """Train the flow on (images, class_idx) batches; returns each epoch's mean loss.

    Adam; per-step lr: linear warm-up from lr/10 over `warmup_epochs`, then cosine to
    lr * 1e-3 (docs/method.md 6). The encoder stays frozen. A non-finite loss, or non-finite
    weights at an epoch's end (the last step's damage, which no loss shows), stops training
    with FloatingPointError before `epoch_end(epoch, loss, optimizer)`, which runs after
    each epoch (checkpoints), so that no diverged flow is saved.
    """
    steps = len(loader)
    schedule = cosine_scheduler(lr, lr * 1e-3, epochs, steps, warmup_epochs=warmup_epochs,
                                start_warmup_value=lr / 10)
    params = [p for p in flow.parameters() if p.requires_grad]
    optimizer = optimizer or torch.optim.Adam(params, lr=lr)
    protos = [p.to(device) for p in prototypes]
    encoder.eval()
    flow.train()
    losses = []
    for epoch in range(start_epoch, epochs):
        if hasattr(getattr(loader, "sampler", None), "set_epoch"):
            loader.sampler.set_epoch(epoch)  # the order is a function of (seed, epoch)
        total, count = 0.0, 0
        bar = progress_bar(loader, desc=f"flow epoch {epoch + 1}/{epochs}", leave=False)
        for step, (images, class_idx) in enumerate(bar):
            for group in optimizer.param_groups:
                group["lr"] = float(schedule[epoch * steps + step])
            images = images.to(device, non_blocking=True)
            logp = patch_log_likelihood(encoder, flow, images, protos, class_idx)  # (N, h, w)
            loss = flow_loss(logp)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite flow loss at epoch {epoch + 1}, step "
                                         f"{step + 1}: check the images and prototypes for "
                                         f"NaN/inf, or lower --lr (now {lr})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(images)
            count += len(images)
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if not all(bool(torch.isfinite(p).all()) for p in params):
            raise FloatingPointError(f"non-finite flow weights at the end of epoch {epoch + 1}: "
                                     f"the training diverged; lower --lr (now {lr})")
        losses.append(total / max(count, 1))
        if epoch_end is not None:
            epoch_end(epoch, losses[-1], optimizer)
    flow.eval()
    return losses


# ----------------------------------------------------------------------------- proposals
def proposals_from_log_likelihood(logp: Tensor, image_size: int | tuple[int, int] = 224,
                                  grid: tuple[int, int] = (14, 14)) -> Proposals:
    """Proposal ranks and abnormality maps of a whole set of logp maps (N, h, w); the
    masks of a ratio are `Proposals.test_masks`.

    The normalisation (subtract the set's maximum, exp, max(prob) - prob) runs over the
    whole given set, as in docs/method.md 6, so pass a class's full test set at once. The
    per-image ranking and the image scores do not depend on the set. Besides the
    paper's abnormality map, its unsaturated log form max(logp) - logp (the clean
    protocol's default, see run_test.py --abnormality).
    """
    if logp.ndim != 3 or len(logp) == 0:
        raise ValueError(f"logp must be a non-empty (N, h, w) tensor, got {tuple(logp.shape)}")
    if not torch.isfinite(logp).all():
        raise CheckpointError(f"ProtoFlow gives non-finite log-likelihoods to "
                              f"{int((~torch.isfinite(logp)).flatten(1).any(1).sum())} of "
                              f"{len(logp)} image(s): its weights (--protoflow_weights) are "
                              "damaged or its flow diverged; retrain it (run_protoflow.py "
                              "train) or download the released file again")
    logp = logp.float()
    prob = torch.exp(logp - logp.max())  # (N, h, w)
    coarse = resize_maps(prob.max() - prob, tuple(grid)).flatten(1)  # (N, L)
    num_patches = coarse.shape[1]
    order = coarse.argsort(dim=1, descending=True, stable=True)  # (N, L)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(num_patches, device=order.device).expand_as(order)
                  .contiguous())
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    fine = resize_maps(prob, size)
    abnormality = fine.max() - fine  # (N, H, W)
    # The same map in log units: prob = exp(logp - max) saturates, so 1 - prob is ~1 on
    # every clearly anomalous patch and no longer ranks them; -log(prob) does.
    log_abnormality = resize_maps(logp.max() - logp, size)  # (N, H, W)
    return Proposals(logp, abnormality, log_abnormality, image_score(logp), rank)


# ----------------------------------------------------------------------------- files
def check_state_dict(module: nn.Module, state_dict: dict[str, Tensor], path: str,
                     field: str, limit: int = 50) -> None:
    """Load strictly, or raise naming every key that differs (missing, unexpected, shape)."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    shapes = [f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in expected if k in state_dict
              and tuple(state_dict[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or shapes:
        parts = [f"{name} ({len(keys)}): {keys[:limit]}" + (" ..." if len(keys) > limit else "")
                 for name, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                    ("shape mismatches", shapes)) if keys]
        raise CheckpointError(f"{path}: '{field}' does not fit the model built for it; "
                              + "; ".join(parts) + ". The file was made for another backbone "
                              "or flow size, or by a library version with other key names: "
                              "pass a ProtoFlow file of this code's layout "
                              "(--protoflow_weights), or train one with `python "
                              "run_protoflow.py train ...`")
    module.load_state_dict(state_dict, strict=True)


def flow_shape(decoder_state_dict: dict[str, Tensor], path: str) -> tuple[int, int]:
    """(feature_dim, n_blocks) read from a flow state dict's keys and shapes."""
    blocks = {int(k.split(".")[1]) for k in decoder_state_dict if k.startswith("module_list.")}
    scale = decoder_state_dict.get("module_list.0.global_scale")
    if not blocks or scale is None:
        raise CheckpointError(f"{path}: 'decoder_state_dict' has no "
                              "module_list.<i>.global_scale keys; it is not a ProtoFlow flow: "
                              "pass the ProtoFlow weights (released, or written by `python "
                              "run_protoflow.py train`)")
    return int(scale.shape[-1]), len(blocks)


def score_quantile(scores: Tensor, quantile: float) -> float:
    """The `quantile` of normal images' scores (N,), in float64: the image-score
    threshold over all classes and per class (ProtoFlow.threshold_for) alike."""
    return float(torch.quantile(scores.double(), quantile))


def class_threshold(scores: Tensor, class_idx: Tensor, index: int, quantile: float
                    ) -> float | None:
    """Class `index`'s own image-score threshold: the `quantile` of its held-out normal
    images' scores (N,) (class_idx (N,)); None where it has none, and the threshold over
    all classes serves it (ProtoFlow.threshold_for; run_protoflow.py train prints each)."""
    own = scores[class_idx == index]
    return score_quantile(own, quantile) if len(own) else None


def save_protoflow(path: str, encoder: nn.Module, flow: Ff.SequenceINN, *, backbone: str,
                   out_indices: Sequence[int], classes: Sequence[str],
                   normal_scores: Tensor | None = None, normal_classes: Tensor | None = None,
                   threshold_quantile: float = THRESHOLD_QUANTILE,
                   mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                   std: Sequence[float] = IMAGENET_DEFAULT_STD,
                   img_size: int = DEFAULT_IMG_SIZE, extra: dict | None = None) -> dict:
    """The released layout {'encoder_state_dict', 'decoder_state_dict'} plus our fields.

    The image-score threshold is the `threshold_quantile` of held-out normal images'
    scores (with fewer than 100 images the 0.99 quantile lies between the two largest).
    `mean`, `std`: the input normalisation the encoder and flow were trained with;
    `img_size`: the image size (prototypes, flow, threshold), which `ProtoFlow` enforces.
    Everything is a tensor or a plain type, so torch.load(weights_only=True) reads it.
    """
    stats, threshold = None, None
    if normal_scores is not None and len(normal_scores):
        s = normal_scores.double().cpu()
        threshold = score_quantile(s, threshold_quantile)
        stats = {"scores": s.float(), "count": len(s), "mean": float(s.mean()),
                 "std": float(s.std()) if len(s) > 1 else 0.0, "min": float(s.min()),
                 "max": float(s.max()),
                 "quantiles": {f"q{q:g}": score_quantile(s, q) for q in SCORE_QUANTILES}}
        if normal_classes is not None:
            stats["class_idx"] = normal_classes.long().cpu()
    feature_dim, n_blocks = flow_shape(flow.state_dict(), path)
    obj = {"encoder_state_dict": encoder.state_dict(), "decoder_state_dict": flow.state_dict(),
           "backbone": backbone, "out_indices": list(out_indices), "n_blocks": n_blocks,
           "feature_dim": feature_dim, "image_score_threshold": threshold,
           "threshold_quantile": threshold_quantile if threshold is not None else None,
           "normal_image_scores": stats, "classes": list(classes),
           "normalization": normalization_record(mean, std),
           "img_size": int(img_size), **(extra or {})}
    save_on_master(obj, path)
    return obj


def file_img_size(obj: dict, path: str) -> int:
    """The image size a ProtoFlow file's prototypes, flow and threshold were made at:
    its 'img_size', or in a file of an earlier version its train_args' --img_size; a
    released file records none and was made at the paper's 224 px (docs/method.md 6)."""
    size = obj.get("img_size", (obj.get("train_args") or {}).get("img_size", DEFAULT_IMG_SIZE))
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise CheckpointError(f"{path}: 'img_size' {size!r} is not a positive int; the file "
                              "is damaged: download it again or train it again (`python "
                              "run_protoflow.py train ...`)")
    return size


def load_protoflow_file(path: str) -> dict:
    """A ProtoFlow file (weights_only), with errors that name it and the fix."""
    if not os.path.isfile(path):
        raise MissingFileError(f"ProtoFlow weights {path} not found: download the released "
                               "file or train one with `python run_protoflow.py train ...`")
    obj = read_weights_file(path, "Download it again, or train one with `python "
                                  "run_protoflow.py train ...`.")
    if not isinstance(obj, dict) or "decoder_state_dict" not in obj:
        keys = sorted(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"{path} has no 'decoder_state_dict' ({keys}); it is not a "
                              "ProtoFlow file: pass the ProtoFlow weights (released, or "
                              "written by `python run_protoflow.py train`)")
    for field in ("encoder_state_dict", "decoder_state_dict"):  # saved from a DDP wrapper
        if isinstance(obj.get(field), dict):
            obj[field] = strip_ddp_prefix(obj[field])
    return obj


class ProtoFlow:
    """A trained ProtoFlow: encoder + flow from one file, prototypes from a folder.

    A file carrying 'encoder_state_dict' (the released files and ours) is self-contained:
    the backbone is built without pretrained weights and loaded strictly from it. For a
    file without one, `encoder_weights` (a local file) or timm's download supplies it.
    `input_normalization` (mean, std) is how the images given to `log_likelihood` are
    normalised (default: as the file was trained); they are converted to the file's own.
    Images must have the file's `img_size` (224 for a released file): at another size
    its prototypes and threshold do not apply, so they are refused, not scored wrongly.
    """

    def __init__(self, weights_path: str, prototypes_dir: str, device: str = "cpu",
                 encoder_weights: str | None = None,
                 input_normalization: tuple[Sequence[float], Sequence[float]] | None = None
                 ) -> None:
        ckpt = load_protoflow_file(weights_path)
        self.normalization = recorded_normalization(
            ckpt, weights_path, "download it again or train it again (`python "
            "run_protoflow.py train ...`)")
        self.img_size = file_img_size(ckpt, weights_path)
        # what the prototypes must have been made with (coreset.json records both; the
        # weights are compared only where both paths name files here)
        train_args = ckpt.get("train_args") or {}
        self._prototype_flags = {**({"encoder_weights": train_args["encoder_weights"]}
                                    if "encoder_weights" in train_args else {}),
                                 "img_size": self.img_size}
        # {class: coreset.npy sha256} of the prototypes the flow and threshold were made
        # with (run_protoflow.py train records them; a released file, none)
        self._trained_prototypes: dict = train_args.get("prototypes") or {}
        self.input_normalization = input_normalization or self.normalization
        self.weights_path = weights_path
        self.prototypes_dir = prototypes_dir
        self.device = torch.device(device)
        self.backbone = ckpt.get("backbone", DEFAULT_BACKBONE)
        self.out_indices = tuple(ckpt.get("out_indices", DEFAULT_OUT_INDICES))
        self.feature_dim, self.n_blocks = flow_shape(ckpt["decoder_state_dict"], weights_path)
        for key, have in (("feature_dim", self.feature_dim), ("n_blocks", self.n_blocks)):
            if key in ckpt and ckpt[key] != have:
                raise CheckpointError(f"{weights_path}: '{key}' says {ckpt[key]}, the "
                                      f"flow's weights have {have}; the file is damaged: "
                                      "download it again or train it again (`python "
                                      "run_protoflow.py train ...`)")
        self.threshold: float | None = ckpt.get("image_score_threshold")
        self.threshold_quantile: float | None = ckpt.get("threshold_quantile")
        self.normal_image_scores: dict | None = ckpt.get("normal_image_scores")
        scores = None if self.normal_image_scores is None else \
            self.normal_image_scores.get("scores")
        if (self.threshold is not None and not math.isfinite(self.threshold)) or (
                scores is not None and not torch.isfinite(torch.as_tensor(scores)).all()):
            # written by a diverged flow before training checked for one
            raise CheckpointError(f"{weights_path} stores a non-finite image-score threshold "
                                  f"({self.threshold}) or held-out scores: its flow diverged. "
                                  "Train it again (`python run_protoflow.py train ...`, with a "
                                  "lower --lr)")
        self.classes: list[str] | None = ckpt.get("classes")
        hashes = ckpt.get(TRAIN_IMAGE_HASHES)
        # the content sha256s of the images the flow learned (ours; a released file: None)
        self.train_images = None if hashes is None else frozenset(hashes)

        if "encoder_state_dict" in ckpt:
            if encoder_weights is not None:
                raise FlagError(f"{weights_path} carries its own encoder weights, which the "
                                "flow was trained with; drop --encoder_weights "
                                f"({encoder_weights})")
            encoder = create_backbone(self.backbone, self.out_indices)
            check_state_dict(encoder, ckpt["encoder_state_dict"], weights_path,
                             "encoder_state_dict")
        else:  # a download needs the original's weights tag when the file names none
            encoder = create_backbone(ckpt.get("backbone", DEFAULT_ENCODER), self.out_indices,
                                      weights=encoder_weights,
                                      pretrained=encoder_weights is None)
        # prototypes of a new class must come from this encoder: the weights our file
        # records (_prototype_flags) where that file is here, else a file's own (a
        # released one; one whose recorded file is another machine's, which the check
        # then does not compare), or the file given; and the tagged name (timm gives the
        # untagged B6 name the Noisy-Student weights)
        recorded = train_args.get("encoder_weights")
        self._rebuild_flags = (
            {"encoder_weights": weights_path}
            if "encoder_state_dict" in ckpt and ("encoder_weights" not in train_args or (
                recorded is not None and not os.path.isfile(recorded)))
            else {"encoder": ckpt.get("backbone", DEFAULT_ENCODER),
                  **({"encoder_weights": encoder_weights} if encoder_weights is not None
                     else {})})
        channels = sum(encoder.feature_info.channels())
        if channels != self.feature_dim:
            raise CheckpointError(f"{weights_path}: the flow takes {self.feature_dim}-dim "
                                  f"features but {self.backbone} out_indices "
                                  f"{self.out_indices} gives {channels}: the file's backbone "
                                  "and flow do not fit together; pass a ProtoFlow file whose "
                                  "flow was trained on that backbone (or, for a file without "
                                  "its encoder, the --encoder_weights it was trained with)")
        flow = build_flow(self.feature_dim, self.n_blocks)
        check_state_dict(flow, ckpt["decoder_state_dict"], weights_path, "decoder_state_dict")
        self.encoder = encoder.to(self.device).eval()
        self.flow = flow.to(self.device).eval()
        self._prototypes: dict[str, Tensor] = {}
        self._same: dict[str, bool] = {}  # same_prototypes, per class

    def threshold_for(self, class_name: str) -> float | None:
        """The image-score threshold for one class: the stored quantile of the class's
        own held-out normal images when the file has them, else the file's threshold over
        all classes (None for a released file, which stores none, and for a class whose
        prototypes are not those it was computed with: same_prototypes)."""
        if not self.same_prototypes(class_name):
            return None
        stats = self.normal_image_scores
        if (stats is None or self.classes is None or class_name not in self.classes
                or "class_idx" not in stats):
            return self.threshold
        own = class_threshold(stats["scores"], stats["class_idx"],
                              self.classes.index(class_name),
                              self.threshold_quantile or THRESHOLD_QUANTILE)
        return self.threshold if own is None else own

    def prototypes(self, class_name: str) -> Tensor:
        """The class's prototypes (M, C) on the device, loaded once; those coreset.json
        says were made at another image size, with other encoder weights or from otherwise
        normalised images are refused."""
        if class_name not in self._prototypes:
            self._prototypes[class_name] = self._load_prototypes(class_name).to(self.device)
        return self._prototypes[class_name]

    def prototype_train_images(self, class_name: str) -> frozenset[str] | None:
        """The content sha256s of the images a class's prototypes were made from, as its
        coreset.json lists them (ours; None for the authors' release or an older file)."""
        meta = read_prototype_meta(self.prototypes_dir, class_name, "rebuild the prototypes "
                                   "with `python run_protoflow.py prototypes`")
        hashes = None if meta is None else meta.get(TRAIN_IMAGE_HASHES)
        return None if hashes is None else frozenset(hashes)

    def check_prototypes(self, classes: Sequence[str]) -> None:
        """Every class's prototypes load (present, of this encoder, made as this file's
        images) before the first class is scored: a missing one in the last class would
        otherwise stop an evaluation of hours at its end. Each is read and dropped, so
        memory holds one class's at a time."""
        for class_name in classes:
            if class_name not in self._prototypes:
                self._load_prototypes(class_name)

    def _load_prototypes(self, class_name: str) -> Tensor:
        protos = load_prototypes(self.prototypes_dir, class_name, self.feature_dim,
                                 self.backbone, self.out_indices, self._prototype_flags,
                                 self.normalization, self._rebuild_flags)
        self.same_prototypes(class_name)  # said once, before the class is scored
        return protos

    def same_prototypes(self, class_name: str) -> bool:
        """Whether the class's prototypes are those the flow was trained with (the file
        records their sha256; True where it records none: a released file, a class it did
        not train on, unseen, new or few-shot). Rebuilt ones (more images, another device)
        move a normal image's score across the stored threshold, which fits the old ones
        only: said once, on stderr, and threshold_for gives the class none."""
        if class_name not in self._same:
            trained = self._trained_prototypes.get(class_name)
            now = prototypes_sha256(self.prototypes_dir, class_name) if trained else None
            self._same[class_name] = now is None or now == trained
            if not self._same[class_name] and self.threshold is not None:  # one to withhold
                path = os.path.join(self.prototypes_dir, class_name, CORESET_FILE)
                print(f"[protoflow] note: {path} is not the prototypes {self.weights_path} was "
                      "trained with (its sha256 differs from the one the file records: "
                      f"rebuilt since?): the stored threshold of '{class_name}' fits those, so "
                      "it is not used (predict.py makes no decision, --clean_masks threshold "
                      "gives every image its proposal mask); the scores use these. For a "
                      "threshold that fits them, train ProtoFlow again (`python "
                      f"run_protoflow.py train --prototypes_dir {self.prototypes_dir} ...`)",
                      file=sys.stderr, flush=True)
        return self._same[class_name]

    def check_image_size(self, h: int, w: int) -> None:
        """Refuse h x w images unless they are the file's size: at another size its
        prototypes, flow and threshold do not apply, and every score would be wrong."""
        if (h, w) != (self.img_size, self.img_size):
            raise FlagError(f"{self.weights_path} was made at {self.img_size} px (prototypes, "
                            f"flow and threshold) but is given {h}x{w} px images, whose scores "
                            f"it would get wrong: evaluate at {self.img_size} px (a ViT of "
                            f"--input_size {self.img_size}), or make ProtoFlow at this size "
                            f"(`python run_protoflow.py prototypes ... --img_size {h}`, then "
                            f"`train ... --img_size {h}`)")

    @torch.inference_mode()
    def scores(self, images: Tensor, class_name: str,
               normalization: tuple[Sequence[float], Sequence[float]] | None = None
               ) -> tuple[Tensor, Tensor]:
        """Per-patch log-likelihood and nearest-prototype distance, each (N, H/8, W/8) on
        the CPU, for normalised images (N, 3, H, W) of one class: one encoder pass gives
        ProtoFlow's scores and the PatchCore baseline's. `normalization` (mean, std) is
        the images' (default `input_normalization`), converted to the one ProtoFlow was
        trained with."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (N, 3, H, W), got {tuple(images.shape)}")
        self.check_image_size(*images.shape[2:])
        protos = self.prototypes(class_name)
        x = self._renormalize(images.to(self.device, torch.float32),
                              normalization or self.input_normalization)
        class_idx = torch.zeros(len(x), dtype=torch.long)  # on the host, where it is grouped
        logp, dist = patch_log_likelihood(self.encoder, self.flow, x, [protos], class_idx,
                                          return_distance=True)
        return logp.cpu(), dist.cpu()

    def log_likelihood(self, images: Tensor, class_name: str,
                       normalization: tuple[Sequence[float], Sequence[float]] | None = None
                       ) -> Tensor:
        """Per-patch log-likelihood (N, H/8, W/8) on the CPU (see `scores`)."""
        return self.scores(images, class_name, normalization)[0]

    def _renormalize(self, x: Tensor, normalization: tuple[Sequence[float], Sequence[float]]
                     ) -> Tensor:
        """(N, 3, H, W) normalised by `normalization` -> normalised by ProtoFlow's own."""
        given = tuple(tuple(float(v) for v in t) for t in normalization)
        if given == self.normalization:
            return x
        (mean_in, std_in), (mean, std) = (
            (torch.tensor(t, device=x.device).view(1, 3, 1, 1) for t in pair)
            for pair in (given, self.normalization))
        return (x * std_in + mean_in - mean) / std
