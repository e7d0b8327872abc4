"""protoflow.py and run_protoflow.py: released-file layout and strict loading, prototypes
(coreset, nearest search, hold-out), the flow's maths, training, proposals on a
real-feature planted defect, the one-pass ratio sweep, and the two commands end to end."""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from skimage import data as skdata
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

import backbones
import datasets
import protoflow as pf
import run_protoflow as rpf
import utils
from conftest import read_format
from utils import CheckpointError, FlagError, MissingFileError
from backbones import create_backbone, lite0_weights_path

LITE0_DIM = 40 + 112


def _layout(state_dict: dict[str, torch.Tensor]) -> list[tuple[str, tuple[int, ...], str]]:
    return [(k, tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in
            state_dict.items()]


def _normalise(gray: np.ndarray) -> torch.Tensor:
    """(N, H, W) grey in [0, 1] -> (N, 3, H, W) ImageNet-normalised."""
    t = torch.from_numpy(gray.astype(np.float32))[:, None].expand(-1, 3, -1, -1)
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_DEFAULT_STD)[:, None, None]
    return (t - mean) / std


def _crops(image: np.ndarray, n: int, rng: np.random.Generator, size: int = 224) -> np.ndarray:
    ys = rng.integers(0, image.shape[0] - size, n)
    xs = rng.integers(0, image.shape[1] - size, n)
    return np.stack([image[y:y + size, x:x + size] for y, x in zip(ys, xs)])


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def lite0() -> nn.Module:
    """The shipped ImageNet EfficientNet-Lite0: real features make the defect test mean
    something."""
    return create_backbone("efficientnet_lite0", (2, 3), weights=lite0_weights_path())


@pytest.fixture(scope="module")
def brick_set() -> dict[str, torch.Tensor]:
    """Brick crops (normal) and one crop with a grass patch on grid cells rows 6-9,
    cols 7-10 (16 of 196 patches)."""
    rng = np.random.default_rng(0)
    brick = skdata.brick().astype(np.float32) / 255  # (512, 512)
    grass = skdata.grass().astype(np.float32) / 255
    normal = _crops(brick, 12, rng)  # (12, 224, 224)
    defect = normal[8].copy()
    defect[96:160, 112:176] = grass[:64, :64]
    defect_cells = torch.zeros(14, 14, dtype=torch.bool)
    defect_cells[6:10, 7:11] = True
    return {"train": _normalise(normal[:6]), "holdout": _normalise(normal[6:8]),
            "test": _normalise(np.concatenate([defect[None], normal[9:]])),
            "defect_cells": defect_cells.flatten()}


@pytest.fixture(scope="module")
def trained(lite0, brick_set, tmp_path_factory) -> dict:
    """Lite0 prototypes of the brick crops, a 1-block flow trained a few steps, saved in
    our layout (encoder included) with a threshold from two held-out normal crops."""
    train = brick_set["train"]
    with torch.inference_mode():
        feats = pf.patch_rows(pf.extract_features(lite0, train))  # (6 * 784, 152)
    protos = feats[pf.greedy_coreset(feats, len(feats) // 10, progress=False)]
    flow = pf.build_flow(LITE0_DIM, 1, rng=np.random.default_rng(0))
    zeros = torch.zeros(3, dtype=torch.long)
    loader = [(train[:3], zeros), (train[3:], zeros)]
    with torch.no_grad():
        before = pf.flow_loss(pf.patch_log_likelihood(lite0, flow, train, [protos],
                                                      torch.zeros(6, dtype=torch.long)))
    lrs = []
    losses = pf.train_flow(lite0, flow, loader, [protos], epochs=4, lr=1e-3, warmup_epochs=2,
                          epoch_end=lambda e, loss, opt: lrs.append(opt.param_groups[0]["lr"]))
    with torch.no_grad():
        after = pf.flow_loss(pf.patch_log_likelihood(lite0, flow, train, [protos],
                                                     torch.zeros(6, dtype=torch.long)))
    scores, classes = rpf.held_out_scores(lite0, flow, [(brick_set["holdout"], zeros[:2])],
                                          [protos])
    root = tmp_path_factory.mktemp("trained")
    proto_dir = root / "prototypes"
    pf.save_prototypes(str(proto_dir), "brick", protos.numpy(),
                       {"backbone": "efficientnet_lite0", "out_indices": [2, 3]})
    path = str(root / "protoflow.pt")
    pf.save_protoflow(path, lite0, flow, backbone="efficientnet_lite0", out_indices=(2, 3),
                      classes=["brick"], normal_scores=scores, normal_classes=classes)
    return {"flow": flow, "protos": protos, "losses": losses, "lrs": lrs, "before": before,
            "after": after, "path": path, "proto_dir": str(proto_dir), "scores": scores}


@pytest.fixture(scope="module")
def b6_state() -> dict[str, torch.Tensor]:
    return create_backbone("tf_efficientnet_b6", (2, 3)).state_dict()


@pytest.fixture(scope="module")
def flow272() -> nn.Module:
    """The released flow's shape: 272 channels, 8 blocks."""
    return pf.build_flow(272, 8, rng=np.random.default_rng(1))


# ----------------------------------------------------------------------------- features
class _FixedMaps(nn.Module):
    def __init__(self, maps: list[torch.Tensor]) -> None:
        super().__init__()
        self.maps = maps

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.maps


def test_extract_features_pools_upsamples_and_concatenates():
    g = torch.Generator().manual_seed(0)
    fine, coarse = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 5, 2, 2, generator=g)
    out = pf.extract_features(_FixedMaps([fine, coarse]), torch.zeros(2, 3, 32, 32))
    assert out.shape == (2, 8, 4, 4)
    # AvgPool2d(3, 1, 1) counts the zero padding: a corner averages 4 values over 9
    assert torch.allclose(out[0, 0, 0, 0], fine[0, 0, :2, :2].sum() / 9)
    assert torch.allclose(out[1, 2, 1, 2], fine[1, 2, 0:3, 1:4].mean())
    pooled = F.avg_pool2d(coarse, 3, 1, 1)
    for i in range(4):  # nearest x2: coarse cell (i // 2, j // 2)
        for j in range(4):
            assert torch.equal(out[:, 3:, i, j], pooled[:, :, i // 2, j // 2])


def test_lite0_features_shape(lite0):
    with torch.inference_mode():
        out = pf.extract_features(lite0, torch.zeros(1, 3, 224, 224))
    assert out.shape == (1, LITE0_DIM, 28, 28)


# ----------------------------------------------------------------------------- formats
def test_decoder_keys_match_released_format(flow272):
    expected = []
    for i in range(8):
        p = f"module_list.{i}."
        expected += [(p + "global_scale", (1, 272), "float32"),
                     (p + "global_offset", (1, 272), "float32"),
                     (p + "w_perm", (272, 272), "float32"),
                     (p + "w_perm_inv", (272, 272), "float32"),
                     (p + "subnet.0.weight", (528, 264), "float32"),
                     (p + "subnet.0.bias", (528,), "float32"),
                     (p + "subnet.2.weight", (272, 528), "float32"),
                     (p + "subnet.2.bias", (272,), "float32")]
    assert _layout(flow272.state_dict()) == expected
    assert read_format("protoflow_decoder.txt") == expected


def test_flow_blocks_compute_as_the_released_file_was_trained():
    """The released weights hold only under the block settings they were trained with
    (docs/method.md 6), which their key layout does not show: affine clamping 1.9, the
    SOFTPLUS global affine (FrEIA's 0.1 * softplus(a) of beta 0.5), and rotations whose
    stored inverse undoes them (the flow inverts exactly)."""
    flow = pf.build_flow(8, 2, cond_dim=4, rng=np.random.default_rng(0)).eval()
    a = torch.linspace(-3.0, 3.0, 7)
    for block in flow.module_list:
        assert block.clamp == 1.9 and not block.GIN
        torch.testing.assert_close(block.global_scale_activation(a),
                                   0.1 * F.softplus(a, beta=0.5))
    gen = torch.Generator().manual_seed(0)
    x, cond = torch.randn(5, 8, generator=gen), torch.randn(5, 4, generator=gen)
    with torch.no_grad():
        z, _ = flow(x, c=[cond])
        back, _ = flow(z, c=[cond], rev=True)
    torch.testing.assert_close(back, x, rtol=1e-4, atol=1e-5)


def test_released_layout_file_loads_strictly_with_defaults(b6_state, flow272, tmp_path):
    assert _layout(b6_state) == read_format("protoflow_encoder.txt")
    torch.save({"encoder_state_dict": b6_state, "decoder_state_dict": flow272.state_dict()},
               tmp_path / "released.pt")
    protos = torch.randn(40, 272, generator=torch.Generator().manual_seed(0))
    np.save(tmp_path / "proto.npy", protos.numpy())
    (tmp_path / "p" / "bottle").mkdir(parents=True)
    os.replace(tmp_path / "proto.npy", tmp_path / "p" / "bottle" / pf.CORESET_FILE)

    model = pf.ProtoFlow(str(tmp_path / "released.pt"), str(tmp_path / "p"))
    assert (model.backbone, model.out_indices, model.n_blocks, model.feature_dim) == (
        "tf_efficientnet_b6", (2, 3), 8, 272)
    assert model.threshold is None
    # the release lists no training images (and has no coreset.json): nothing to check
    assert model.train_images is None and model.prototype_train_images("bottle") is None
    for k, v in b6_state.items():
        assert torch.equal(model.encoder.state_dict()[k], v), k
    for k, v in flow272.state_dict().items():
        assert torch.equal(model.flow.state_dict()[k], v), k
    assert model.img_size == 224  # a released file records none: the paper's
    with pytest.raises(FlagError) as err:  # its threshold and prototypes are for 224 px
        model.log_likelihood(torch.zeros(1, 3, 64, 64), "bottle")
    assert str(err.value) == (
        f"{tmp_path / 'released.pt'} was made at 224 px (prototypes, flow and threshold) but "
        "is given 64x64 px images, whose scores it would get wrong: evaluate at 224 px (a ViT "
        "of --input_size 224), or make ProtoFlow at this size (`python run_protoflow.py "
        "prototypes ... --img_size 64`, then `train ... --img_size 64`)")
    logp = model.log_likelihood(torch.zeros(1, 3, 224, 224), "bottle")
    assert logp.shape == (1, 28, 28) and torch.isfinite(logp).all()


def test_a_file_saved_from_ddp_wrappers_loads(trained, tmp_path):
    """Encoder and flow saved from (Distributed)DataParallel wrappers, every key
    'module.<key>': the same weights, for ProtoFlow and as --encoder_weights alike."""
    plain = torch.load(trained["path"], weights_only=True)
    wrapped = tmp_path / "wrapped.pt"
    torch.save({**plain, **{field: {f"module.{k}": v for k, v in plain[field].items()}
                            for field in ("encoder_state_dict", "decoder_state_dict")}},
               wrapped)
    model = pf.ProtoFlow(str(wrapped), trained["proto_dir"])
    for field, module in (("encoder_state_dict", model.encoder),
                          ("decoder_state_dict", model.flow)):
        loaded = module.state_dict()
        assert loaded.keys() == plain[field].keys()
        for k, v in plain[field].items():
            assert torch.equal(loaded[k], v), k
    encoder = create_backbone("efficientnet_lite0", (2, 3), weights=str(wrapped))
    key = "blocks.2.0.conv_pw.weight"
    assert torch.equal(encoder.state_dict()[key], plain["encoder_state_dict"][key])


def test_a_new_class_is_told_to_make_prototypes_with_the_flows_own_encoder(
        b6_state, flow272, trained, tmp_path):
    """The command for a missing class's prototypes named the released file's untagged
    'tf_efficientnet_b6', for which timm fetches the Noisy-Student weights: prototypes of
    another encoder than the flow's, and no error later. It names the file's own encoder
    weights, or a file without them its tagged name and the --encoder_weights given."""
    released = tmp_path / "released.pt"
    torch.save({"encoder_state_dict": b6_state, "decoder_state_dict": flow272.state_dict()},
               released)
    (tmp_path / "p" / "bottle").mkdir(parents=True)
    np.save(tmp_path / "p" / "bottle" / pf.CORESET_FILE, np.zeros((5, 272), np.float32))
    with pytest.raises(MissingFileError) as err:
        pf.ProtoFlow(str(released), str(tmp_path / "p")).check_prototypes(["cable"])
    assert str(err.value).endswith(
        f"make them with `python run_protoflow.py prototypes --data_path <ImageNet-layout "
        f"root> --classes cable --output_dir {tmp_path / 'p'} --encoder tf_efficientnet_b6 "
        f"--out_indices 2 3 --img_size 224 --encoder_weights {released}`")
    obj = torch.load(trained["path"], map_location="cpu", weights_only=True)
    bare = tmp_path / "bare.pt"  # our file without its encoder, as when trained with a download
    torch.save({k: v for k, v in obj.items() if k != "encoder_state_dict"}, bare)
    with pytest.raises(MissingFileError) as err:
        pf.ProtoFlow(str(bare), trained["proto_dir"], encoder_weights=lite0_weights_path()
                     ).check_prototypes(["cable"])
    assert "--encoder efficientnet_lite0 --out_indices 2 3 " in str(err.value)
    assert str(err.value).endswith(f" --encoder_weights {lite0_weights_path()}`")
    moved = tmp_path / "moved.pt"  # trained on another machine, with its encoder inside
    torch.save({**obj, "train_args": {**obj.get("train_args", {}),
                                      "encoder_weights": "/elsewhere/lite0.pth"}}, moved)
    with pytest.raises(MissingFileError) as err:
        pf.ProtoFlow(str(moved), trained["proto_dir"]).check_prototypes(["cable"])
    assert str(err.value).endswith(f"--out_indices 2 3 --encoder_weights {moved} --img_size "
                                   "224`")  # the path it recorded is not on this machine


def test_wrong_encoder_keys_are_named(b6_state, flow272, tmp_path):
    state = dict(b6_state)
    state["blocks.0.0.conv_dw.weights"] = state.pop("blocks.0.0.conv_dw.weight")
    state["conv_head.weight"] = torch.zeros(1)
    torch.save({"encoder_state_dict": state, "decoder_state_dict": flow272.state_dict()},
               tmp_path / "bad.pt")
    with pytest.raises(CheckpointError) as err:  # one `error:` line through the CLIs
        pf.ProtoFlow(str(tmp_path / "bad.pt"), str(tmp_path))
    msg = str(err.value)
    for key in ("blocks.0.0.conv_dw.weight", "blocks.0.0.conv_dw.weights", "conv_head.weight",
                "bad.pt", "missing keys (1)", "unexpected keys (2)",
                "(--protoflow_weights), or train one with `python run_protoflow.py train"):
        assert key in msg


def test_file_with_encoder_refuses_encoder_weights(trained):
    with pytest.raises(FlagError, match="carries its own encoder weights, which the flow "
                       r"was trained with; drop --encoder_weights \(x.pth\)"):
        pf.ProtoFlow(trained["path"], trained["proto_dir"], encoder_weights="x.pth")


def test_an_inconsistent_protoflow_file_is_a_checkpoint_error(trained, tmp_path):
    """A file whose flow, recorded size or backbone levels disagree names itself and
    the fix (a CheckpointError: one `error:` line, exit 2, through the entry points)."""
    with pytest.raises(CheckpointError, match="x.pt: 'decoder_state_dict' has no "
                       "module_list.<i>.global_scale keys; it is not a ProtoFlow flow: pass"):
        pf.flow_shape({"a.weight": torch.zeros(1)}, "x.pt")
    obj = torch.load(trained["path"], map_location="cpu", weights_only=True)
    path = tmp_path / "odd.pt"
    torch.save({**obj, "feature_dim": 999}, path)
    with pytest.raises(CheckpointError, match=f"odd.pt: 'feature_dim' says 999, the flow's "
                       f"weights have {LITE0_DIM}; the file is damaged: download it again"):
        pf.ProtoFlow(str(path), trained["proto_dir"])
    torch.save({**obj, "out_indices": [1, 3]}, path)  # 24 + 112 channels, the flow takes 152
    with pytest.raises(CheckpointError, match=f"odd.pt: the flow takes {LITE0_DIM}-dim "
                       r"features but efficientnet_lite0 out_indices \(1, 3\) gives 136"):
        pf.ProtoFlow(str(path), trained["proto_dir"])
    for size in (True, 0, 224.0):  # True is an int to Python, not an image size
        torch.save({**obj, "img_size": size}, path)
        with pytest.raises(CheckpointError, match=f"odd.pt: 'img_size' {size!r} is not a "
                           "positive int; the file is damaged"):
            pf.ProtoFlow(str(path), trained["proto_dir"])


def test_saved_file_is_weights_only_with_our_fields(trained):
    obj = torch.load(trained["path"], map_location="cpu", weights_only=True)
    scores = trained["scores"].double()
    assert obj["backbone"] == "efficientnet_lite0" and obj["out_indices"] == [2, 3]
    assert (obj["n_blocks"], obj["feature_dim"], obj["classes"]) == (1, LITE0_DIM, ["brick"])
    assert obj["image_score_threshold"] == pytest.approx(float(torch.quantile(scores, 0.99)))
    stats = obj["normal_image_scores"]
    assert stats["count"] == 2 and stats["max"] == pytest.approx(float(scores.max()))
    assert torch.equal(stats["class_idx"], torch.zeros(2, dtype=torch.long))
    assert obj["normalization"] == {"mean": list(IMAGENET_DEFAULT_MEAN),
                                    "std": list(IMAGENET_DEFAULT_STD)}


HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # BEiT's alternative (--no-imagenet_default_...)


def test_log_likelihood_converts_the_images_normalisation(trained, brick_set, tmp_path):
    """Images normalised for the ViT with 0.5/0.5 score as the ImageNet-normalised ones
    ProtoFlow was trained on."""
    imagenet = brick_set["test"][:3]
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
    half = (imagenet * std + mean - 0.5) / 0.5
    model = pf.ProtoFlow(trained["path"], trained["proto_dir"])
    assert model.normalization == (tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD))
    expected = model.log_likelihood(imagenet, "brick")  # (3, 28, 28)
    torch.testing.assert_close(model.log_likelihood(half, "brick", normalization=HALF),
                               expected, atol=1e-4, rtol=1e-5)
    vit_side = pf.ProtoFlow(trained["path"], trained["proto_dir"], input_normalization=HALF)
    torch.testing.assert_close(vit_side.log_likelihood(half, "brick"), expected,
                               atol=1e-4, rtol=1e-5)
    assert (model.log_likelihood(half, "brick") - expected).abs().max() > 0.1  # unconverted
    # a released file records no normalisation: ImageNet's; a damaged record is an error
    obj = torch.load(trained["path"], map_location="cpu", weights_only=True)
    released = tmp_path / "released.pt"
    torch.save({k: v for k, v in obj.items() if k != "normalization"}, released)
    assert pf.ProtoFlow(str(released), trained["proto_dir"]).normalization == model.normalization
    torch.save({**obj, "normalization": {"mean": [0.5, 0.5], "std": [1, 1, 1]}}, released)
    with pytest.raises(CheckpointError, match="released.pt: 'normalization'.*damaged: "
                       "download it again"):
        pf.ProtoFlow(str(released), trained["proto_dir"])


# ----------------------------------------------------------------------------- prototypes
def test_nearest_prototype_equals_brute_force():
    g = torch.Generator().manual_seed(0)
    feats, protos = torch.randn(1000, 32, generator=g), torch.randn(77, 32, generator=g)
    dist, idx = pf.nearest_prototype(feats, protos, chunk=128)
    brute = (feats[:, None] - protos[None]).pow(2).sum(-1).sqrt()  # (1000, 77)
    assert torch.equal(idx, brute.argmin(1))
    assert torch.allclose(dist, brute.min(1).values, atol=1e-4)


class _PoolEncoder(nn.Module):
    """A stand-in encoder: one feature map, the image average-pooled over 8x8 cells."""

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [F.avg_pool2d(x, 8)]


def test_mixed_batch_scores_each_image_against_its_own_class():
    """A batch of a class-0 and a class-1 image: each image's log-likelihood and
    nearest-prototype distances equal those of the image scored alone against its own
    class's prototypes alone; the class-1 image's distances are torch.cdist's to the
    nearest of prototypes[1]."""
    torch.manual_seed(0)
    flow = pf.build_flow(4, 2, cond_dim=8, rng=np.random.default_rng(0)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # away from the identity-like initialisation
        for p in flow.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    images = torch.randn(2, 4, 16, 16, generator=g)  # 2x2 patches of 4 features each
    protos = [torch.randn(5, 4, generator=g), torch.randn(7, 4, generator=g) + 3.0]
    encoder = _PoolEncoder()
    with torch.no_grad():
        logp, dist = pf.patch_log_likelihood(encoder, flow, images, protos,
                                             torch.tensor([0, 1]), return_distance=True)
        assert logp.shape == dist.shape == (2, 2, 2)
        for i in (0, 1):
            alone = pf.patch_log_likelihood(encoder, flow, images[i:i + 1], [protos[i]],
                                            torch.tensor([0]), return_distance=True)
            torch.testing.assert_close(logp[i:i + 1], alone[0])
            torch.testing.assert_close(dist[i:i + 1], alone[1])
        wrong = pf.patch_log_likelihood(encoder, flow, images[1:], [protos[0]],
                                        torch.tensor([0]))
    assert (wrong - logp[1:]).abs().max() > 0.1  # the class's bank matters here
    feats = F.avg_pool2d(F.avg_pool2d(images[1:], 8), 3, 1, 1)  # (1, 4, 2, 2)
    rows = feats.permute(0, 2, 3, 1).reshape(4, 4)  # row-major patches
    expected = torch.cdist(rows, protos[1]).min(dim=1).values.reshape(1, 2, 2)
    torch.testing.assert_close(dist[1:], expected)


def _min_dist(points: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    return (points[:, None] - centers[None]).pow(2).sum(-1).min(1).values  # (M,)


def test_coreset_greedy_order_and_covering_radius():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(20, 16, generator=g) * 5
    feats = (centers[torch.randint(0, 20, (2000,), generator=g)]
             + torch.randn(2000, 16, generator=g)).double()
    n = 40
    idx = pf.greedy_coreset(feats, n, rng=np.random.default_rng(3), progress=False)
    assert idx.shape == (n,) and len(set(idx.tolist())) == n
    for i in range(1, n):  # each pick is the farthest point from the earlier picks
        d = _min_dist(feats, feats[idx[:i]])
        assert d[idx[i]] == pytest.approx(float(d.max()), rel=1e-6)
    radius = _min_dist(feats, feats[idx]).max().sqrt()
    for seed in range(5):
        rand = torch.randperm(2000, generator=torch.Generator().manual_seed(seed))[:n]
        assert radius <= _min_dist(feats, feats[rand]).max().sqrt()
    projected = pf.greedy_coreset(feats, n, projection_dim=8, rng=np.random.default_rng(3),
                                  progress=False)
    assert len(set(projected.tolist())) == n
    assert _min_dist(feats, feats[projected]).max().sqrt() < 2 * radius
    # the first pick is the rng's draw (the original's random start), else index 0
    assert idx[0] == np.random.default_rng(3).integers(2000) != 0
    assert pf.greedy_coreset(feats, n, progress=False)[0] == 0


def test_holdout_split_is_per_class_and_independent_of_other_classes():
    labels = [0] * 20 + [1] * 9
    kept, held = datasets.holdout_split(labels, ["a", "b"], 0.1, seed=0)
    assert sorted(kept + held) == list(range(29))
    assert sum(i < 20 for i in held) == 2 and sum(i >= 20 for i in held) == 1
    alone_kept, alone_held = datasets.holdout_split([0] * 9, ["b"], 0.1, seed=0)
    assert [i - 20 for i in held if i >= 20] == alone_held
    assert datasets.holdout_split(labels, ["a", "b"], 0.1, seed=1)[1] != held
    assert datasets.holdout_split(labels, ["a", "b"], 0.0)[1] == []
    # seeded by the class name: two classes of the same size hold out other positions
    held = datasets.holdout_split([0] * 20 + [1] * 20, ["a", "b"], 0.2, seed=0)[1]
    assert [i for i in held if i < 20] != [i - 20 for i in held if i >= 20]
    with pytest.raises(ValueError, match="too few"):
        datasets.holdout_split([0], ["a"], 0.1)


def test_missing_or_mismatched_prototypes_error(tmp_path, monkeypatch):
    """Each refusal is a CheckpointError (`error:` line, exit 2) naming the file and the
    command that rebuilds it, with the run's flags when it gives them."""
    path = str(tmp_path / "bottle" / "coreset.npy")
    make = (f"python run_protoflow.py prototypes --data_path <ImageNet-layout root> --classes "
            f"bottle --output_dir {tmp_path} --encoder")
    with pytest.raises(MissingFileError) as err:
        pf.load_prototypes(str(tmp_path), "bottle", 272)
    assert str(err.value) == (f"no prototypes for class 'bottle': {path} is missing (none "
                              "there); if the class is new, make them with "
                              f"`{make} tf_efficientnet_b6.aa_in1k`")
    (tmp_path / "bottle").mkdir()
    np.save(path, np.zeros((5, 152), np.float32))
    (tmp_path / "cable").mkdir()
    np.save(tmp_path / "cable" / "coreset.npy", np.zeros((5, 152), np.float32))
    (tmp_path / "empty").mkdir()  # a folder without prototypes is not a class of them
    with pytest.raises(MissingFileError) as err:  # a typo: the classes there are named
        pf.load_prototypes(str(tmp_path), "botle", 272)
    assert ("coreset.npy is missing (classes with prototypes there: bottle, cable); if the "
            "class is new, make them with `") in str(err.value)
    with pytest.raises(CheckpointError) as err:
        pf.load_prototypes(str(tmp_path), "bottle", 272)
    assert str(err.value) == (f"{path} holds shape (5, 152), the ProtoFlow encoder gives "
                              "(M, 272) features; rebuild it with "
                              f"`{make} tf_efficientnet_b6.aa_in1k`")
    for values in (np.full((5, 272), "x"), np.ones((5, 272), np.complex64),
                   np.ones((5, 272), np.int64)):  # a bare TypeError; imaginary parts dropped
        np.save(path, values)
        with pytest.raises(CheckpointError) as err:
            pf.load_prototypes(str(tmp_path), "bottle", 272)
        assert str(err.value) == (f"{path} holds {values.dtype} values, not float features; "
                                  f"rebuild it with `{make} tf_efficientnet_b6.aa_in1k`")
    np.save(path, np.zeros((5, 152), np.float32))
    meta = tmp_path / "bottle" / "coreset.json"
    meta.write_text(json.dumps({"backbone": "resnet18", "out_indices": [2, 3]}))
    with pytest.raises(CheckpointError) as err:
        pf.load_prototypes(str(tmp_path), "bottle", 152, "efficientnet_lite0", (2, 3))
    assert str(err.value) == (
        f"{path} was made with encoder ('resnet18', [2, 3]), the ProtoFlow file uses "
        f"('efficientnet_lite0', [2, 3]); rebuild it with `{make} efficientnet_lite0 "
        "--out_indices 2 3`")
    assert pf.load_prototypes(str(tmp_path), "bottle", 152).shape == (5, 152)
    meta.write_text('{"backbone": ')  # a write cut short
    with pytest.raises(CheckpointError) as err:
        pf.load_prototypes(str(tmp_path), "bottle", 152, "efficientnet_lite0", (2, 3))
    assert str(err.value).startswith(f"{meta} is not a readable JSON file (") and str(
        err.value).endswith(f"): rebuild the prototypes with `{make} efficientnet_lite0 "
                            "--out_indices 2 3`")
    # a training run's flags: its encoder weights and image size must be the prototypes'
    # (weights files that exist here; a path naming no file here is not compared)
    monkeypatch.chdir(tmp_path)
    for name in ("a.pth", "b.pth"):
        (tmp_path / name).write_bytes(name.encode())
    flags = {"data_path": "/data", "encoder_weights": "b.pth", "img_size": 64,
             "holdout": 0.1, "seed": 0, "skip_bad_images": True}
    rebuild = (f"rebuild it with `python run_protoflow.py prototypes --data_path /data --classes "
               f"bottle --output_dir {tmp_path} --encoder efficientnet_lite0 --out_indices 2 3 "
               "--encoder_weights b.pth --img_size 64 --holdout 0.1 --seed 0 --skip_bad_images`")
    for made, differ in (
            ({"encoder_weights": "a.pth", "img_size": 224},
             "encoder weights a.pth (this run: b.pth), --img_size 224 (this run: 64)"),
            ({"encoder_weights": "b.pth", "img_size": 224}, "--img_size 224 (this run: 64)"),
            ({"img_size": 224}, "--img_size 224 (this run: 64)")):  # weights unrecorded
        meta.write_text(json.dumps({"backbone": "efficientnet_lite0", "out_indices": [2, 3],
                                    **made}))
        with pytest.raises(CheckpointError) as err:
            pf.load_prototypes(str(tmp_path), "bottle", 152, "efficientnet_lite0", (2, 3), flags)
        assert str(err.value) == f"{path} was made with {differ}, which give other features; " \
                                 + rebuild
    meta.write_text(json.dumps({"backbone": "efficientnet_lite0", "out_indices": [2, 3]}))
    assert pf.load_prototypes(str(tmp_path), "bottle", 152, "efficientnet_lite0", (2, 3),
                              flags).shape == (5, 152)  # an older coreset.json: not checked
    meta.write_text(json.dumps({"backbone": "efficientnet_lite0", "out_indices": [2, 3],
                                "encoder_weights": "/elsewhere/a.pth", "img_size": 64}))
    assert pf.load_prototypes(str(tmp_path), "bottle", 152, "efficientnet_lite0", (2, 3),
                              flags).shape == (5, 152)  # another machine's path: not compared
    meta.write_text(json.dumps({"backbone": "efficientnet_lite0.ra_in1k", "out_indices": [2, 3],
                                "encoder_weights": "b.pth", "img_size": 64}))
    assert pf.load_prototypes(str(tmp_path), "bottle", 152, "efficientnet_lite0", (2, 3),
                              flags).shape == (5, 152)  # a local file: the tag is not used
    # without a local file the tagged name is the weights: timm's other checkpoint differs
    meta.write_text(json.dumps({"backbone": "efficientnet_lite0.ra_in1k", "out_indices": [2, 3],
                                "encoder_weights": None, "img_size": 64}))
    with pytest.raises(CheckpointError, match=r"made with encoder weights timm's pretrained "
                       r"efficientnet_lite0\.ra_in1k \(this run: timm's pretrained "
                       r"efficientnet_lite0\), which"):
        pf.load_prototypes(str(tmp_path), "bottle", 152, "efficientnet_lite0", (2, 3),
                           {**flags, "encoder_weights": None})
    meta.unlink()  # the authors' release: coreset.npy alone, nothing recorded to compare
    assert pf.load_prototypes(str(tmp_path), "bottle", 152, "efficientnet_lite0", (2, 3),
                              flags).shape == (5, 152)
    np.save(path, np.full((5, 152), np.nan, np.float32))
    with pytest.raises(CheckpointError) as err:
        pf.load_prototypes(str(tmp_path), "bottle", 152)
    assert str(err.value) == (f"{path} contains non-finite values; rebuild it with "
                              f"`{make} tf_efficientnet_b6.aa_in1k`")


def test_coreset_json_is_atomic_and_tied_to_its_npy(monkeypatch, tmp_path):
    """coreset.json records coreset.npy's sha256 and is replaced whole: a rebuild killed
    after the new .npy but mid-JSON leaves the old JSON, which both readers then refuse
    (it names other held-out images than the prototypes saw); an older JSON without the
    field is not checked."""
    folder = tmp_path / "bottle"
    npy, meta_path = str(folder / "coreset.npy"), str(folder / "coreset.json")
    old = np.zeros((5, 152), np.float32)
    pf.save_prototypes(str(tmp_path), "bottle", old, {"seed": 0, "held_out": ["002.png"]})
    meta = json.loads(open(meta_path).read())
    assert meta == {"seed": 0, "held_out": ["002.png"], "npy_sha256": utils.file_sha256(npy)}
    assert pf.load_prototypes(str(tmp_path), "bottle", 152).shape == (5, 152)
    rpf._check_prototype_images(str(tmp_path), {"bottle": ["002.png"]}, {"bottle": 4},
                                False)

    def killed_mid_write(path, text):
        open(path, "w").write(text[:20])
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(pf.Path, "write_text", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        pf.save_prototypes(str(tmp_path), "bottle", np.ones((5, 152), np.float32),
                           {"seed": 1, "held_out": ["003.png"]})
    monkeypatch.undo()
    assert np.load(npy)[0, 0] == 1 and json.loads(open(meta_path).read()) == meta
    assert sorted(os.listdir(folder)) == ["coreset.json", "coreset.npy"]  # no temporary file
    make = (f"python run_protoflow.py prototypes --data_path <ImageNet-layout root> --classes "
            f"bottle --output_dir {tmp_path} --encoder tf_efficientnet_b6.aa_in1k")
    stale = (f"{meta_path} describes another coreset.npy than {npy} (its recorded sha256 "
             "differs: a rebuild was interrupted between the two files), so how the "
             "prototypes were made is unknown; rebuild the prototypes with ")
    with pytest.raises(CheckpointError) as err:
        pf.load_prototypes(str(tmp_path), "bottle", 152)
    assert str(err.value) == stale + f"`{make}`"
    with pytest.raises(CheckpointError) as err:  # it would trust held_out ["002.png"]
        rpf._check_prototype_images(str(tmp_path), {"bottle": ["002.png"]}, {"bottle": 4},
                                False)
    assert str(err.value) == stale + "`python run_protoflow.py prototypes`"
    del meta["npy_sha256"]  # an older version's coreset.json: nothing to compare
    open(meta_path, "w").write(json.dumps(meta))
    assert pf.load_prototypes(str(tmp_path), "bottle", 152)[0, 0] == 1


# ----------------------------------------------------------------------------- flow maths
def test_positional_encoding_values():
    pe = pf.positional_encoding_2d(128, 28, 28)
    assert pe.shape == (128, 28, 28)
    r, c = 5, 11
    for k in range(32):
        freq = math.exp(-math.log(1e4) * 2 * k / 64)
        assert pe[2 * k, r, c] == pytest.approx(math.sin(c * freq), abs=1e-5)
        assert pe[2 * k + 1, r, c] == pytest.approx(math.cos(c * freq), abs=1e-5)
        assert pe[64 + 2 * k, r, c] == pytest.approx(math.sin(r * freq), abs=1e-5)
        assert pe[64 + 2 * k + 1, r, c] == pytest.approx(math.cos(r * freq), abs=1e-5)
    assert torch.equal(pe[:64, 0], pe[:64, 27]) and torch.equal(pe[64:, :, 0], pe[64:, :, 27])


def test_each_patch_is_conditioned_on_its_own_position(monkeypatch):
    """Patch (r, c) of the row-major grid gets the position code of row r, column c, as
    the released flow was trained (a transposed code still trains, but not to its weights)."""
    seen = {}

    def spy(flow, x, cond):
        seen["cond"] = cond
        return x.sum(1)

    monkeypatch.setattr(pf, "flow_log_likelihood", spy)
    flow = pf.build_flow(8, 1, cond_dim=8)
    maps = [torch.randn(1, 8, 4, 4)]  # a square grid: a transpose keeps the shapes
    pf.patch_log_likelihood(_FixedMaps(maps), flow, torch.zeros(1, 3, 32, 32),
                            [torch.zeros(1, 8)], torch.zeros(1, dtype=torch.long))
    pe = pf.positional_encoding_2d(8, 4, 4)
    for r in range(4):
        for c in range(4):
            assert torch.equal(seen["cond"][4 * r + c], pe[:, r, c])


def test_log_likelihood_is_change_of_variables():
    torch.manual_seed(0)
    dim, cond_dim = 6, 4
    flow = pf.build_flow(dim, 2, cond_dim=cond_dim, rng=np.random.default_rng(0)).double()
    with torch.no_grad():  # move away from the identity-like initialisation
        for p in flow.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    x, cond = torch.randn(5, dim).double(), torch.randn(5, cond_dim).double()
    logp = pf.flow_log_likelihood(flow, x, cond)
    normal = torch.distributions.Normal(0.0, 1.0)
    for i in range(5):
        jac = torch.autograd.functional.jacobian(
            lambda v: flow(v[None], c=[cond[i:i + 1]])[0][0], x[i])  # (dim, dim)
        z = flow(x[i:i + 1], c=[cond[i:i + 1]])[0][0]
        expected = (normal.log_prob(z).sum() + torch.linalg.slogdet(jac)[1]) / dim
        # 1e-6: the rotations are stored in float32, orthogonal (|det| = 1) to ~1e-7
        assert logp[i].item() == pytest.approx(expected.item(), abs=1e-6)


def test_flow_loss_is_minus_log_sigmoid_and_finite():
    logp = torch.tensor([-2000.0, -1.0, 0.0, 3.0])
    assert torch.isfinite(pf.flow_loss(logp))
    small = logp[1:]
    assert pf.flow_loss(small).item() == pytest.approx(
        (-torch.log(torch.sigmoid(small))).mean().item(), rel=1e-6)


def test_training_lowers_loss_with_warmup_then_cosine(trained):
    assert trained["after"] < trained["before"] - 1e-3
    assert trained["losses"][-1] < trained["losses"][0]
    lr = 1e-3  # 2 steps/epoch, warm-up 2 epochs from lr/10; lr at each epoch's last step
    expected = [lr / 10 + (lr - lr / 10) / 3, lr,
                lr * 1e-3 + 0.5 * (lr - lr * 1e-3) * (1 + math.cos(math.pi / 4)),
                lr * 1e-3 + 0.5 * (lr - lr * 1e-3) * (1 + math.cos(3 * math.pi / 4))]
    assert trained["lrs"] == pytest.approx(expected)


def test_non_finite_loss_stops_training(lite0, brick_set):
    flow = pf.build_flow(LITE0_DIM, 1)
    loader = [(brick_set["train"][:1] * float("nan"), torch.zeros(1, dtype=torch.long))]
    with pytest.raises(FloatingPointError, match="non-finite flow loss"):
        pf.train_flow(lite0, flow, loader, [torch.zeros(3, LITE0_DIM)], epochs=1)


def test_weights_diverged_by_an_epochs_last_step_stop_training(lite0, brick_set):
    """The last step's damage shows in no loss (here a NaN gradient under a finite loss,
    as a backward overflow gives): the weights are checked at the epoch's end, before
    `epoch_end` would checkpoint them."""
    flow = pf.build_flow(LITE0_DIM, 1)
    flow.module_list[0].global_scale.register_hook(lambda g: torch.full_like(g, float("nan")))
    loader = [(brick_set["train"][:1], torch.zeros(1, dtype=torch.long))]
    ends = []
    with pytest.raises(FloatingPointError) as err:
        pf.train_flow(lite0, flow, loader, [torch.zeros(3, LITE0_DIM)], epochs=1, lr=1e-3,
                      warmup_epochs=0, epoch_end=lambda *a: ends.append(a))
    assert str(err.value) == ("non-finite flow weights at the end of epoch 1: the training "
                              "diverged; lower --lr (now 0.001)")
    assert ends == []


class _MapsAreImages(nn.Module):
    """An encoder whose one feature map is its input."""

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [x]


def test_each_step_follows_its_own_batchs_gradient():
    """Each step updates the flow by its own batch's gradient alone (the earlier steps'
    are cleared first): two steps of plain SGD equal two made by hand, in float64 (a
    first gradient left in the second step moves the weights by ~1e-4 relative)."""
    torch.manual_seed(0)
    batches = [(torch.randn(2, 8, 4, 4).double(), torch.zeros(2, dtype=torch.long))
               for _ in range(2)]
    protos = [torch.randn(3, 8).double()]
    flow = pf.build_flow(8, 1, cond_dim=8, rng=np.random.default_rng(0)).double()
    ref = pf.build_flow(8, 1, cond_dim=8, rng=np.random.default_rng(0)).double()
    ref.load_state_dict(flow.state_dict())
    params = [p for p in flow.parameters() if p.requires_grad]
    pf.train_flow(_MapsAreImages(), flow, batches, protos, epochs=1, lr=0.1, warmup_epochs=0,
                  optimizer=torch.optim.SGD(params, lr=0.1))
    ref_params = [p for p in ref.parameters() if p.requires_grad]
    ref.train()
    for (images, class_idx), lr in zip(batches, [0.1, (0.1 + 1e-4) / 2]):  # cosine, 2 steps
        loss = pf.flow_loss(pf.patch_log_likelihood(_MapsAreImages(), ref, images, protos,
                                                    class_idx))
        grads = torch.autograd.grad(loss, ref_params)
        with torch.no_grad():
            for p, g in zip(ref_params, grads):
                p.sub_(lr * g)
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------- proposals
def test_tied_patches_rank_in_patch_order():
    """Patches ProtoFlow finds equally anomalous (a flat map) rank in patch order, on
    every platform: the proposal mask of a ratio is then reproducible."""
    rank = pf.proposals_from_log_likelihood(torch.zeros(2, 28, 28)).rank
    assert torch.equal(rank, torch.arange(196).expand(2, 196))


def test_proposals_normalise_over_the_whole_set():
    g = torch.Generator().manual_seed(0)
    logp = torch.randn(3, 28, 28, generator=g) - 3
    logp[1, 3, 3] = 3.0  # the set's maximum lies in another image than the first
    ratios = [0.1, 0.25]
    out = pf.proposals_from_log_likelihood(logp)
    prob = torch.exp(logp - logp.max())[:, None]
    fine = F.interpolate(prob, size=(224, 224), mode="bilinear", align_corners=True)[:, 0]
    assert torch.allclose(out.abnormality_maps, fine.max() - fine)
    log_fine = F.interpolate((logp.max() - logp)[:, None], size=(224, 224), mode="bilinear",
                             align_corners=True)[:, 0]  # the log map: over the set too
    assert torch.allclose(out.log_abnormality_maps, log_fine)
    alone = pf.proposals_from_log_likelihood(logp[:1])
    assert not torch.allclose(alone.abnormality_maps, out.abnormality_maps[:1])
    assert not torch.allclose(alone.log_abnormality_maps, out.log_abnormality_maps[:1])
    coarse = F.interpolate(prob.max() - prob, size=(14, 14), mode="bilinear",
                           align_corners=True).flatten(1)  # (3, 196)
    for r in ratios:
        k = int(196 * r)
        masks = out.test_masks(r)
        assert masks.shape == (3, 196) and masks.dtype == torch.bool
        assert masks.sum(1).tolist() == [k] * 3
        for i in range(3):  # the k most anomalous cells
            top = set(coarse[i].topk(k).indices.tolist())
            assert set(masks[i].nonzero().flatten().tolist()) == top
        assert torch.equal(alone.test_masks(r)[0], masks[0])
    scores = -logp.flatten(1).min(1).values
    assert torch.equal(out.image_scores, scores) and torch.equal(alone.image_scores, scores[:1])
    nan = torch.zeros(3, 4, 4)
    nan[1, 2, 2] = float("nan")
    with pytest.raises(CheckpointError, match=(
            r"^ProtoFlow gives non-finite log-likelihoods to 1 of 3 image\(s\): its weights "
            r"\(--protoflow_weights\) are damaged or its flow diverged")):
        pf.proposals_from_log_likelihood(nan)
    with pytest.raises(ValueError, match=r"ratio 1.5 is outside \[0, 1\]"):
        out.test_masks(1.5)


def _planted(n: int = 3) -> torch.Tensor:
    """logp (n, 14, 14) whose anomaly order is known: image i's patch p is the (p+1)-th
    most likely for even i, the reverse for odd i; one patch of image 0 is very unlikely."""
    base = torch.arange(196, dtype=torch.float32).reshape(14, 14) / 196
    logp = torch.stack([base if i % 2 == 0 else base.flip(0, 1) for i in range(n)])
    logp[0, 5, 7] = -50.0
    return logp


def test_test_ranks_follow_the_planted_anomaly():
    out = pf.proposals_from_log_likelihood(_planted(), image_size=14, grid=(14, 14))
    # the least likely patch is ranked first; then the rest from least to most likely
    assert int(out.rank[0, 5 * 14 + 7]) == 0
    assert out.rank[0, 0] == 1 and out.rank[0, 195] == 195
    assert out.rank[1, 195] == 0 and out.rank[1, 0] == 195  # the flipped image
    masks = out.test_masks(0.1)  # every image anomalous: pure proposals
    assert masks.sum(1).tolist() == [19, 19, 19]
    assert set(masks[0].nonzero().flatten().tolist()) == {5 * 14 + 7, *range(18)}
    assert set(masks[1].nonzero().flatten().tolist()) == set(range(196 - 19, 196))


def test_test_masks_random_for_images_called_normal():
    out = pf.proposals_from_log_likelihood(_planted(4), image_size=14, grid=(14, 14))
    called = torch.tensor([True, False, True, False])
    a = out.test_masks(0.2, called, [11, 12, 13, 14])
    b = out.test_masks(0.2, called, [11, 12, 13, 14])
    c = out.test_masks(0.2, called, [11, 99, 13, 14])
    assert torch.equal(a, b) and not torch.equal(a[1], c[1]) and torch.equal(a[3], c[3])
    assert a.sum(1).tolist() == [39] * 4
    assert torch.equal(a[called], out.test_masks(0.2)[called])  # proposals kept
    assert not torch.equal(a[1], out.test_masks(0.2)[1])  # a random draw instead
    # an image's random mask comes from its own seed, not from its place in the batch
    swapped = out.test_masks(0.2, called.flip(0), [14, 13, 12, 11])
    assert torch.equal(swapped[0], a[3]) and torch.equal(swapped[2], a[1])
    with pytest.raises(ValueError, match="one seed per image"):
        out.test_masks(0.2, called)


def test_covering_masks_score_every_patch_once():
    out = pf.proposals_from_log_likelihood(_planted(), image_size=14, grid=(14, 14))
    passes = pf.covering_masks(out.test_ranks(), 0.3)
    assert len(passes) == 4  # m = 58: 58 + 58 + 58 + 22 = 196
    assert torch.equal(passes[0], out.test_masks(0.3))
    assert [int(p[0].sum()) for p in passes] == [58, 58, 58, 22]
    total = torch.stack(passes).long().sum(0)  # (N, L): how often each patch is masked
    assert (total == 1).all()
    with pytest.raises(ValueError, match="masks no patch"):
        pf.covering_masks(out.test_ranks(), 0.001)


def test_anomalous_call_is_strict_at_the_threshold():
    scores = torch.tensor([0.5, 1.0, 1.0 + 1e-6, 2.0])
    assert pf.is_anomalous(scores, 1.0).tolist() == [False, False, True, True]
    logp = torch.tensor([[[-1.0, 0.5]], [[-3.0, 0.0]]])  # (2, 1, 2)
    assert pf.image_score(logp).tolist() == [1.0, 3.0]


def test_planted_defect_is_proposed(trained, brick_set):
    model = pf.ProtoFlow(trained["path"], trained["proto_dir"])  # encoder from the file
    ratios = [16 / 196 + 1e-9, 0.2, 0.3]
    out = pf.proposals_from_log_likelihood(model.log_likelihood(brick_set["test"], "brick"))
    cells = brick_set["defect_cells"]  # 16 of 196 patches
    # chance overlaps: 16 * 16 / 196 = 1.3, 16 * 39 / 196 = 3.2, 16 * 58 / 196 = 4.7 cells
    assert out.test_masks(ratios[0])[0][cells].sum() >= 9
    assert out.test_masks(ratios[1])[0][cells].sum() >= 14
    assert out.test_masks(ratios[2])[0][cells].all()
    row, col = divmod(int(out.abnormality_maps[0].argmax()), 224)
    assert 96 - 8 <= row < 160 + 8 and 112 - 8 <= col < 176 + 8
    assert out.image_scores[0] > 2 * out.image_scores[1:].max()
    # two held-out crops are a thin calibration set: only the defect's call is certain
    called = pf.is_anomalous(out.image_scores, model.threshold)
    assert model.threshold < out.image_scores[0] / 2 and called[0]


def test_prototypes_other_than_those_the_flow_trained_with_lose_the_stored_threshold(
        trained, lite0, tmp_path, capsys):
    """Prototypes rebuilt after training (more images, another coreset ratio) moved a
    normal image's score from 5.5 to 3.9 and its decision across the stored threshold,
    with no word. The file records each training class's coreset.npy sha256: a class
    whose prototypes differ is scored with them but gets no threshold, said once; a class
    it did not train on (unseen, new) keeps the threshold over all classes, and a released
    file (none recorded) is not checked."""
    protos = tmp_path / "p"
    shutil.copytree(trained["proto_dir"], protos)
    shutil.copytree(protos / "brick", protos / "tiles")
    path = str(tmp_path / "pf.pt")
    pf.save_protoflow(path, lite0, trained["flow"], backbone="efficientnet_lite0",
                      out_indices=(2, 3), classes=["brick"], normal_scores=trained["scores"],
                      normal_classes=torch.zeros(len(trained["scores"]), dtype=torch.long),
                      extra={"train_args": {"prototypes": {
                          "brick": pf.prototypes_sha256(str(protos), "brick")}}})
    same = pf.ProtoFlow(path, str(protos))
    same.check_prototypes(["brick", "tiles"])
    stored = same.threshold_for("brick")
    assert stored is not None and same.threshold_for("tiles") == same.threshold
    assert capsys.readouterr().err == ""
    rebuilt = trained["protos"][: len(trained["protos"]) // 2].numpy()
    for name in ("brick", "tiles"):
        pf.save_prototypes(str(protos), name, rebuilt,
                           {"backbone": "efficientnet_lite0", "out_indices": [2, 3]})
    model = pf.ProtoFlow(path, str(protos))
    model.check_prototypes(["brick", "tiles"])
    assert capsys.readouterr().err == (
        f"[protoflow] note: {protos / 'brick' / 'coreset.npy'} is not the prototypes {path} "
        "was trained with (its sha256 differs from the one the file records: rebuilt "
        "since?): the stored threshold of 'brick' fits those, so it is not used (predict.py "
        "makes no decision, --clean_masks threshold gives every image its proposal mask); "
        "the scores use these. For a threshold that fits them, train ProtoFlow again "
        f"(`python run_protoflow.py train --prototypes_dir {protos} ...`)\n")
    assert model.threshold_for("brick") is None
    assert model.threshold_for("tiles") == model.threshold is not None
    assert torch.equal(model.prototypes("brick").cpu(), torch.from_numpy(rebuilt))
    assert capsys.readouterr().err == ""  # once
    released = pf.ProtoFlow(trained["path"], str(protos))
    assert released.threshold_for("brick") is not None and released.same_prototypes("brick")


def test_prototype_distance_is_patchcore_score(trained, brick_set):
    """ProtoFlow.scores gives, from the same pass, each patch's L2 distance to its
    nearest prototype: PatchCore's score on the same memory bank."""
    model = pf.ProtoFlow(trained["path"], trained["proto_dir"])
    images = brick_set["test"][:2]
    logp, dist = model.scores(images, "brick")
    assert torch.equal(logp, model.log_likelihood(images, "brick"))
    feats = pf.patch_rows(pf.extract_features(model.encoder, images))  # (2 * 28 * 28, C)
    expected = torch.cdist(feats, model.prototypes("brick")).min(dim=1).values
    assert dist.shape == logp.shape == (2, 28, 28)
    torch.testing.assert_close(dist.flatten(), expected, rtol=1e-4, atol=1e-4)
    assert dist[0].max() > 2 * dist[1].max()  # the planted defect is far from every prototype


def test_ratio_sweep_is_one_pass(trained, brick_set):
    model = pf.ProtoFlow(trained["path"], trained["proto_dir"])
    calls = []
    model.encoder.register_forward_hook(lambda *_: calls.append(1))
    ratios = [round(0.02 * i, 2) for i in range(1, 25)]
    images = brick_set["test"]  # 4 images: one encoder call
    out = pf.proposals_from_log_likelihood(model.log_likelihood(images, "brick"))
    assert len(calls) == 1
    masks = {r: out.test_masks(r) for r in ratios}
    for r in ratios:
        assert masks[r].sum(1).tolist() == [int(196 * r)] * len(images)
    for a, b in zip(ratios, ratios[1:]):  # nested: a larger ratio adds patches
        assert (masks[a] <= masks[b]).all()
    assert torch.allclose(out.log_likelihood, model.log_likelihood(images, "brick"))


# ----------------------------------------------------------------------------- commands
@pytest.fixture(scope="module")
def cli(tmp_path_factory) -> dict:
    """Two texture classes of five 96 px photos each, and their prototypes."""
    root = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(1)
    for name, source in (("brick", skdata.brick()), ("gravel", skdata.gravel())):
        folder = root / "data" / "train" / name
        folder.mkdir(parents=True)
        for i, crop in enumerate(_crops(source, 5, rng, size=96)):
            Image.fromarray(crop).convert("RGB").save(folder / f"{i:03d}.png")
    common = ["--data_path", str(root / "data"), "--encoder", "efficientnet_lite0",
              "--encoder_weights", lite0_weights_path(), "--num_workers", "0",
              "--device", "cpu", "--batch_size", "4"]
    protos = str(root / "prototypes")
    paths = rpf.main(["prototypes", *common, "--output_dir", protos, "--coreset_ratio", "0.05",
                     "--projection_dim", "64"])
    train = ["train", *common, "--prototypes_dir", protos, "--epochs", "2", "--n_blocks", "1"]
    out = str(root / "flow" / "pf.pt")
    return {"root": root, "common": common, "protos": protos, "paths": paths, "train": train,
            "out": out, "trained": rpf.main(train + ["--output", out])}


def test_prototypes_command(cli):
    protos = cli["protos"]
    assert [os.path.relpath(p, protos) for p in cli["paths"]] == ["brick/coreset.npy",
                                                                 "gravel/coreset.npy"]
    meta = json.loads(open(os.path.join(protos, "brick", "coreset.json")).read())
    assert meta["num_images"] == 4 and len(meta["held_out"]) == 1  # 5 images, 10 % held out
    assert meta["encoder_weights"] == os.path.abspath(lite0_weights_path())  # any folder's
    assert np.load(cli["paths"][0]).shape == (int(4 * 784 * 0.05), LITE0_DIM)
    shot = rpf.main(["prototypes", *cli["common"], "--output_dir", str(cli["root"] / "shot"),
                    "--classes", "gravel", "--num_shots", "1"])
    assert np.load(shot[0]).shape == (int(784 * 0.01), LITE0_DIM)
    with pytest.raises(ValueError, match="--num_shots 9"):
        rpf.main(["prototypes", *cli["common"], "--output_dir", str(cli["root"] / "shot"),
                 "--classes", "gravel", "--num_shots", "9"])


def test_prototypes_and_flow_list_the_images_they_learned(cli):
    """run_test.py names a test image a model learned (a set re-split after training):
    coreset.json lists its class's prototype images and the ProtoFlow file the flow's, by
    content, the held-out images (the threshold's, never learned) in neither; and
    ProtoFlow reads both lists back."""
    folder = cli["root"] / "data" / "train"

    def learned(name: str, held_out: list[str]) -> list[str]:
        return sorted(utils.file_sha256(p) for p in (folder / name).glob("*.png")
                      if p.name not in held_out)
    metas = {name: json.loads(open(os.path.join(cli["protos"], name, "coreset.json")).read())
             for name in ("brick", "gravel")}
    for name, meta in metas.items():
        assert meta[utils.TRAIN_IMAGE_HASHES] == learned(name, meta["held_out"])
        assert len(meta[utils.TRAIN_IMAGE_HASHES]) == 4
    saved = torch.load(cli["out"], weights_only=True)
    flow = sorted(learned("brick", metas["brick"]["held_out"])
                  + learned("gravel", metas["gravel"]["held_out"]))
    assert saved[utils.TRAIN_IMAGE_HASHES] == flow
    model = pf.ProtoFlow(cli["out"], cli["protos"])
    assert model.train_images == frozenset(flow)
    assert model.prototype_train_images("gravel") == frozenset(
        learned("gravel", metas["gravel"]["held_out"]))


def test_a_class_typed_in_another_unicode_form_trains_its_folder(cli, tmp_path,
                                                                 monkeypatch):
    """--classes typed composed (NFC) names a class folder stored decomposed (NFD, as
    macOS writes it), not 'no train/<class> folder' (datasets.as_found)."""
    import unicodedata
    nfd, nfc = (unicodedata.normalize(form, "s\u010drew") for form in ("NFD", "NFC"))
    shutil.copytree(os.path.join(cli["root"], "data", "train", "brick"),
                    tmp_path / "data" / "train" / nfd)
    seen = []
    monkeypatch.setattr(rpf, "_encoder_from_args",
                        lambda args: seen.append(args.classes) or pytest.fail("reached"))
    common = list(cli["common"])
    common[common.index("--data_path") + 1] = str(tmp_path / "data")
    with pytest.raises(pytest.fail.Exception, match="reached"):
        rpf.main(["prototypes", *common, "--output_dir", str(tmp_path / "p"), "--classes", nfc])
    assert seen == [[nfd]]


def test_a_class_too_small_for_its_split_is_refused_before_any_class_is_built(
        cli, tmp_path, monkeypatch):
    """A class with too few images for --holdout or --num_shots was found when reached,
    after every class before it was built (hours with B6 on MVTec AD): each class's
    count, less the images --skip_bad_images leaves out, is checked before the encoder
    loads."""
    data = tmp_path / "data" / "train"
    shutil.copytree(os.path.join(cli["root"], "data", "train", "brick"), data / "brick")
    (data / "solo").mkdir()
    shutil.copy(data / "brick" / "000.png", data / "solo" / "000.png")
    monkeypatch.setattr(rpf, "_encoder_from_args", lambda args: pytest.fail("loaded"))
    common = list(cli["common"])
    common[common.index("--data_path") + 1] = str(tmp_path / "data")
    out = ["--output_dir", str(tmp_path / "protos")]
    with pytest.raises(FlagError, match=r"^class 'solo' has 1 training image\(s\): too few "
                       r"to hold out 1 \(--holdout 0.1\)"):
        rpf.main(["prototypes", *common, *out, "--classes", "brick", "solo"])
    with pytest.raises(FlagError, match=r"^--num_shots 2: class 'solo' has 1 usable images "
                       r"\(0 held out\)"):
        rpf.main(["prototypes", *common, *out, "--classes", "brick", "solo", "--holdout", "0",
                  "--num_shots", "2"])
    # counted after --skip_bad_images leaves out an unreadable image, not from the folder
    (data / "pair").mkdir()
    shutil.copy(data / "brick" / "000.png", data / "pair" / "000.png")
    (data / "pair" / "001.png").write_bytes(b"not an image")
    with pytest.raises(FlagError, match=r"^class 'pair' has 1 training image\(s\)"), \
            pytest.warns(datasets.DataWarning, match="left out 1 bad file"):
        rpf.main(["prototypes", *common, *out, "--classes", "brick", "pair",
                  "--skip_bad_images"])
    assert not any((tmp_path / "protos").iterdir())
    # every class folder without images in one error, not the first one alone
    for empty in ("e1", "e2"):
        (data / empty).mkdir()
    with pytest.raises(datasets.LayoutError, match="training set is incomplete") as info:
        rpf.main(["prototypes", *common, *out, "--classes", "brick", "e1", "e2"])
    for empty in ("e1", "e2"):
        assert f"{data / empty} (no image files" in str(info.value)


def test_commands_normalise_images_as_the_encoder_was_trained(cli, tmp_path, monkeypatch):
    """tf_efficientnet_lite0 was trained on inputs in [-1, 1] (timm: mean = std = 0.5):
    its prototypes, flow training and held-out scores see images normalised so, and
    coreset.json and the ProtoFlow file record it. Prototypes recorded (or, in an older
    coreset.json, unrecorded, so ImageNet-) normalised otherwise are refused, by the
    ProtoFlow file and by a flow's training."""
    half = ((0.5,) * 3, (0.5,) * 3)
    seen = []
    for name in ("build_transforms", "flow_train_transform"):
        real = getattr(datasets, name)
        monkeypatch.setattr(datasets, name, lambda size, mean, std, _real=real: (
            seen.append((tuple(mean), tuple(std))) or _real(size, mean, std)))
    common = list(cli["common"])
    common[common.index("--encoder") + 1] = "tf_efficientnet_lite0"
    protos, out = tmp_path / "protos", str(tmp_path / "pf.pt")
    rpf.main(["prototypes", *common, "--output_dir", str(protos), "--coreset_ratio", "0.05",
              "--projection_dim", "64"])
    meta = json.loads((protos / "brick" / "coreset.json").read_text())
    assert meta["normalization"] == {"mean": [0.5] * 3, "std": [0.5] * 3}
    obj = rpf.main(["train", *common, "--prototypes_dir", str(protos), "--epochs", "1",
                    "--n_blocks", "1", "--output", out])
    assert obj["normalization"] == {"mean": [0.5] * 3, "std": [0.5] * 3}
    assert seen == [half] * 3  # prototypes; flow training and held-out scoring
    assert pf.ProtoFlow(out, str(protos)).normalization == half
    del meta["normalization"]
    (protos / "brick" / "coreset.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"brick/coreset.npy was made from images "
                       r"normalised with mean \[0.485, 0.456, 0.406\], std \[0.229, 0.224, "
                       r"0.225\]; this ProtoFlow normalises them with mean \[0.5, 0.5, 0.5\]"
                       r".*rebuild it with `python run_protoflow.py prototypes "):
        pf.ProtoFlow(out, str(protos)).prototypes("brick")
    with pytest.raises(CheckpointError, match=r"brick/coreset.npy was made from images "
                       r"normalised with mean \[0.485, 0.456, 0.406\], std \[0.229, 0.224, "
                       r"0.225\]; this ProtoFlow normalises them with mean \[0.5, 0.5, 0.5\]"):
        rpf.main(["train", *common, "--prototypes_dir", str(protos), "--epochs", "1",
                  "--n_blocks", "1", "--output", str(tmp_path / "again.pt")])  # nor trains


def test_a_second_training_of_the_same_output_is_refused(cli, tmp_path, monkeypatch):
    """Two trainings of one --output wrote the same .resume file, log and ProtoFlow file
    (the .resume file's message even said to start the second with --resume): the second
    is refused naming the first, before the encoder loads. Another --output in the same
    folder trains alongside (the three settings' files are made at once on 3 GPUs)."""
    def reached(args):
        raise KeyError(f"{args.output} started")

    monkeypatch.setattr(rpf, "_encoder_from_args", reached)
    out = tmp_path / "pf.pt"
    resume = tmp_path / "pf.pt.resume"
    resume.write_bytes(b"the first run's")
    with utils.RunLock(str(out), "--output", is_file=True):
        assert (tmp_path / ".pf.pt.run.lock").is_file()
        for extra in ([], ["--resume"]):
            with pytest.raises(utils.UserError) as err:
                rpf.main(cli["train"] + ["--output", str(out), *extra])
            assert str(err.value).startswith(f"--output {out} is in use by another run (pid "
                                             f"{os.getpid()} on ")
        with pytest.raises(KeyError, match="other.pt started"):
            rpf.main(cli["train"] + ["--output", str(tmp_path / "other.pt")])
    assert resume.read_bytes() == b"the first run's"
    with pytest.raises(KeyError, match="pf.pt started"):  # the first let go
        rpf.main(cli["train"] + ["--output", str(out), "--resume"])
    assert sorted(os.listdir(tmp_path)) == ["pf.pt.resume"]


def test_commands_take_the_train_folder_as_data_path(cli, capsys):
    """--data_path <root>/train (the original scripts' form) reads the same images."""
    common = list(cli["common"])
    root = common[common.index("--data_path") + 1]
    runs = {}
    for form, data in (("root", root), ("train", os.path.join(root, "train"))):
        common[common.index("--data_path") + 1] = data
        runs[form] = rpf.main(["prototypes", *common, "--output_dir",
                              str(cli["root"] / f"form_{form}"), "--classes", "brick",
                              "--num_shots", "1"])
    assert f"using {root} (its train/ and fg_mask/)" in capsys.readouterr().out
    np.testing.assert_array_equal(np.load(runs["root"][0]), np.load(runs["train"][0]))


def test_train_command_writes_a_loadable_file(cli, tmp_path):
    out, obj = cli["out"], cli["trained"]
    with pytest.raises(ValueError, match="other held-out"):
        rpf.main(cli["train"] + ["--output", str(cli["root"] / "x.pt"), "--holdout", "0.4"])
    protos = tmp_path / "prototypes"
    shutil.copytree(cli["protos"], protos)
    (protos / "gravel" / "coreset.json").write_text("[]")
    train = list(cli["train"])
    train[train.index("--prototypes_dir") + 1] = str(protos)
    with pytest.raises(CheckpointError, match="gravel/coreset.json holds a JSON list, not an "
                       "object: rebuild the prototypes with `python run_protoflow.py prototypes "
                       "--data_path "):
        rpf.main(train + ["--output", str(tmp_path / "x.pt")])
    assert obj["classes"] == ["brick", "gravel"] and obj["normal_image_scores"]["count"] == 2
    assert obj["normalization"]["mean"] == list(IMAGENET_DEFAULT_MEAN)
    assert not os.path.exists(out + ".resume")
    assert [r["epoch"] for r in map(json.loads, open(out + ".log.jsonl"))] == [0, 1]
    model = pf.ProtoFlow(out, cli["protos"])
    assert model.threshold == pytest.approx(obj["image_score_threshold"])
    assert model.backbone == "efficientnet_lite0" and model.n_blocks == 1
    # one held-out image per class, each recorded with its class: its own threshold
    held = obj["normal_image_scores"]
    assert held["class_idx"].tolist() == [0, 1]
    assert [model.threshold_for(c) for c in ("brick", "gravel")] == pytest.approx(
        held["scores"].tolist())
    open(out + ".resume", "wb").close()
    with pytest.raises(FlagError, match="--resume"):
        rpf.main(cli["train"] + ["--output", out])


def _crash_in_epoch_two(cli: dict, monkeypatch, output: str,
                        train: list[str] | None = None) -> None:
    """The `cli` training run (or `train`) to --output `output`, crashed in its second
    epoch: its <output>.resume holds the first."""
    calls, original = [], pf.patch_log_likelihood

    def crash_in_epoch_two(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # 8 images, batch 4: the first step of the second epoch
            raise RuntimeError("simulated crash")
        return original(*args, **kwargs)

    monkeypatch.setattr(pf, "patch_log_likelihood", crash_in_epoch_two)
    with pytest.raises(RuntimeError, match="simulated crash"):
        rpf.main((train or cli["train"]) + ["--output", output])
    monkeypatch.setattr(pf, "patch_log_likelihood", original)
    assert os.path.exists(output + ".resume")


def test_train_resumes_exactly_after_a_crash(cli, monkeypatch):
    straight = cli["trained"]
    crashed = str(cli["root"] / "b.pt")
    _crash_in_epoch_two(cli, monkeypatch, crashed)
    before = set(os.listdir(cli["root"]))
    resumed = rpf.main(cli["train"] + ["--output", crashed, "--resume"])
    for key, value in straight["decoder_state_dict"].items():
        assert torch.equal(resumed["decoder_state_dict"][key], value), key
    assert resumed["image_score_threshold"] == straight["image_score_threshold"]
    # the resumed run goes on with its own log (epoch 1's line after the crashed run's
    # epoch 0), not set aside as an earlier run's: no previous-<time>/ folder
    log = Path(crashed + ".log.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in log] == [0, 1]
    assert set(os.listdir(cli["root"])) - before == {"b.pt"}


def test_resume_refuses_training_images_changed_after_the_crash(cli, monkeypatch, tmp_path):
    """Same --data_path, other files: a rewritten image, then an added one, then a
    held-out one rewritten to the same size, are refused by name and count. The very same
    files copied anew (later mtimes, as a copy to another node without -p leaves them)
    resume exactly."""
    data = tmp_path / "data"
    shutil.copytree(os.path.join(cli["root"], "data"), data)
    train = list(cli["train"])
    train[train.index("--data_path") + 1] = str(data)
    crashed = str(tmp_path / "e.pt")
    resume = crashed + ".resume"
    _crash_in_epoch_two(cli, monkeypatch, crashed, train)
    argv = train + ["--output", crashed, "--resume"]
    held = json.loads(open(os.path.join(cli["protos"], "brick", "coreset.json")).read())
    kept = sorted(f for f in os.listdir(data / "train" / "brick")
                  if f not in held["held_out"])[0]
    image = data / "train" / "brick" / kept
    original = image.read_bytes()
    Image.fromarray(255 - np.asarray(Image.open(image))).save(image)
    with pytest.raises(CheckpointError) as err:
        rpf.main(argv)
    assert str(err.value) == (f"{resume} was made on other images than --data_path {data} "
                              f"holds now: 8 -> 8 training images (rewritten "
                              f"train/brick/{kept}); resume on the same images, or delete "
                              f"{resume} to start over")
    shutil.copy(data / "train" / "brick" / "004.png", data / "train" / "brick" / "005.png")
    with pytest.raises(CheckpointError) as err:
        rpf.main(argv)
    assert (f"holds now: 8 -> 9 training images (added train/brick/005.png; rewritten "
            f"train/brick/{kept}); resume on") in str(err.value)
    (data / "train" / "brick" / "005.png").unlink()
    image.write_bytes(original)
    held_image = data / "train" / "brick" / held["held_out"][0]  # the threshold's images
    held_bytes = held_image.read_bytes()
    held_image.write_bytes(held_bytes[:-1] + bytes([held_bytes[-1] ^ 1]))  # same size
    with pytest.raises(CheckpointError) as err:
        rpf.main(argv)
    assert (f"holds now: 2 -> 2 held-out images (rewritten train/brick/{held_image.name}); "
            "resume on") in str(err.value)
    held_image.write_bytes(held_bytes)
    later = time.time_ns() + 10 ** 9
    for path in (data / "train").rglob("*.png"):  # what a copy that keeps no mtimes leaves
        os.utime(path, ns=(later, later))
    resumed = rpf.main(argv)
    for key, value in cli["trained"]["decoder_state_dict"].items():
        assert torch.equal(resumed["decoder_state_dict"][key], value), key


def test_training_files_tell_each_change_of_each_split(tmp_path):
    """The resume fingerprint: per split, each image's path under the root (classes may
    share file names), size and SHA-256, so that a rewrite of the same size counts and a
    new mtime alone does not; the difference names what was added, removed or rewritten,
    a few names of each."""
    folder = tmp_path / "train" / "brick"
    folder.mkdir(parents=True)
    for name in ("0.png", "1.png"):
        (folder / name).write_bytes(b"x" * 10)
    (tmp_path / "train" / "gravel").mkdir()
    (tmp_path / "train" / "gravel" / "0.png").write_bytes(b"x" * 12)

    class Images:  # what training_files reads of a TrainImageDataset
        samples = [(str(p), 0) for p in sorted((tmp_path / "train").rglob("*.png"))]

    def files(kept: list[int], held: list[int]) -> dict:
        return rpf.training_files(Images, kept, held, str(tmp_path))

    before = files([0, 2], [1])
    x10, x12 = hashlib.sha256(b"x" * 10).hexdigest(), hashlib.sha256(b"x" * 12).hexdigest()
    assert before == {"kept": {"train/brick/0.png": [10, x10], "train/gravel/0.png": [12, x12]},
                      "held_out": {"train/brick/1.png": [10, x10]}}
    os.utime(folder / "0.png", ns=(0, 10 ** 9))  # the same bytes, another mtime
    assert files([0, 2], [1]) == before
    (folder / "1.png").write_bytes(b"y" * 10)  # the same size, other bytes
    after = files([0, 2], [1])
    assert after["kept"] == before["kept"]
    assert rpf._files_changed(before, after) == (
        "1 -> 1 held-out images (rewritten train/brick/1.png)")
    assert rpf._files_changed(before, files([0], [1])) == (
        "2 -> 1 training images (removed train/gravel/0.png); 1 -> 1 held-out images "
        "(rewritten train/brick/1.png)")
    many = {"kept": {f"train/brick/{i}.png": [1, "a"] for i in range(4)}, "held_out": {}}
    assert rpf._files_changed({"kept": {}, "held_out": {}}, many) == (
        "0 -> 4 training images (added train/brick/0.png, train/brick/1.png, "
        "train/brick/2.png and 1 more)")


def test_resume_compares_an_older_files_fingerprint_by_size(cli, monkeypatch, capsys):
    """A .resume file from before the contents were fingerprinted records [size,
    mtime_ns]: its sizes are compared (another size is refused by name), its mtimes are
    not (they need not survive a copy), with a note that the contents go unchecked; the
    resumed run records the full fingerprint again."""
    crashed = str(cli["root"] / "old_fingerprint.pt")
    resume = crashed + ".resume"
    _crash_in_epoch_two(cli, monkeypatch, crashed)
    argv = cli["train"] + ["--output", crashed, "--resume"]
    state = utils.load_checkpoint_file(resume)
    older = {split: {name: [size, 1] for name, (size, _) in files.items()}
             for split, files in state["data_files"].items()}
    name = sorted(older["held_out"])[0]
    torch.save({**state, "data_files": {**older, "held_out": {
        **older["held_out"], name: [older["held_out"][name][0] + 1, 1]}}}, resume)
    capsys.readouterr()
    with pytest.raises(CheckpointError) as err:
        rpf.main(argv)
    assert f"held-out images (rewritten {name}); resume on" in str(err.value)
    note = (f"{resume} records the training images' sizes and times, not their contents (an "
            "older run_protoflow.py wrote it): compared by size only")
    assert note in capsys.readouterr().out
    torch.save({**state, "data_files": older}, resume)
    saved = []  # what the resumed run writes to its .resume file: the full fingerprint
    monkeypatch.setattr(rpf, "save_on_master", lambda obj, path: saved.append(obj["data_files"]))
    resumed = rpf.main(argv)
    assert note in capsys.readouterr().out
    assert saved and all(files == state["data_files"] for files in saved)
    for key, value in cli["trained"]["decoder_state_dict"].items():
        assert torch.equal(resumed["decoder_state_dict"][key], value), key


def test_resume_refuses_other_prototypes_or_skip_bad_images_or_an_older_file(
        cli, monkeypatch, tmp_path, capsys):
    """The prototypes are compared by content: rebuilt ones in another --prototypes_dir are
    refused, the same files copied elsewhere resume. A .resume file from before these
    checks records neither and is refused; one from before --num_workers or the training
    images' fingerprint were recorded resumes, with a note."""
    crashed = str(cli["root"] / "c.pt")
    resume = crashed + ".resume"
    _crash_in_epoch_two(cli, monkeypatch, crashed)
    argv = cli["train"] + ["--output", crashed, "--resume"]
    copy, other = tmp_path / "copy", tmp_path / "other"
    shutil.copytree(cli["protos"], copy)
    shutil.copytree(cli["protos"], other)
    pf.save_prototypes(str(other), "gravel", np.load(other / "gravel" / "coreset.npy") * 1.01,
                       json.loads((other / "gravel" / "coreset.json").read_text()))  # rebuilt
    with pytest.raises(CheckpointError) as err:
        rpf.main(argv + ["--prototypes_dir", str(other)])
    assert str(err.value) == (f"{resume} was made with other prototypes for ['gravel'] than "
                              f"--prototypes_dir {other} holds; use the same ones or delete it "
                              "to start over")
    with pytest.raises(CheckpointError) as err:
        rpf.main(argv + ["--skip_bad_images"])
    assert str(err.value) == (f"{resume} was made with other arguments: --skip_bad_images "
                              "False (now True); use the same ones or delete it to start over")
    state = utils.load_checkpoint_file(resume)
    older = {**state, "args": {k: v for k, v in state["args"].items()
                               if k not in ("skip_bad_images", "prototypes")}}
    torch.save(older, resume)
    with pytest.raises(CheckpointError) as err:
        rpf.main(argv)
    assert str(err.value) == (f"{resume} records no ['skip_bad_images', 'prototypes'] (an older "
                              "run_protoflow.py wrote it), so it cannot be checked against "
                              "this run; delete it to start over")
    assert sorted(state["data_files"]) == ["held_out", "kept"]
    torch.save({**{k: v for k, v in state.items() if k != "data_files"},
                "args": {k: v for k, v in state["args"].items() if k != "num_workers"}}, resume)
    capsys.readouterr()
    resumed = rpf.main(argv + ["--prototypes_dir", str(copy)])
    out = capsys.readouterr().out
    assert f"{resume} records no --num_workers (an older run_protoflow.py wrote it): " \
           "resumed" in out
    assert (f"{resume} records no fingerprint of the training images (an older "
            "run_protoflow.py wrote it): resumed unchecked" in out)
    for key, value in cli["trained"]["decoder_state_dict"].items():
        assert torch.equal(resumed["decoder_state_dict"][key], value), key


def test_a_fresh_run_sets_an_earlier_flow_and_its_log_aside(cli, tmp_path, capsys):
    """A finished flow and its log are not overwritten by a fresh run to the same --output:
    they move to previous-<UTC time>/ beside it, byte for byte, with a note."""
    out = tmp_path / "flow" / "pf.pt"
    out.parent.mkdir()
    shutil.copy2(cli["out"], out)
    shutil.copy2(cli["out"] + ".log.jsonl", str(out) + ".log.jsonl")
    earlier = {name: (out.parent / name).read_bytes() for name in ("pf.pt", "pf.pt.log.jsonl")}
    capsys.readouterr()
    rpf.main(cli["train"] + ["--output", str(out), "--epochs", "1", "--classes", "brick"])
    previous = [p for p in out.parent.iterdir() if p.name.startswith("previous-")]
    assert len(previous) == 1 and re.fullmatch(r"previous-\d{8}T\d{6}Z", previous[0].name)
    assert {p.name: p.read_bytes() for p in previous[0].iterdir()} == earlier
    assert len((out.parent / "pf.pt.log.jsonl").read_text().splitlines()) == 1  # the new run's
    assert torch.load(out, weights_only=True)["classes"] == ["brick"]
    assert (f"[protoflow] an earlier run's pf.pt and pf.pt.log.jsonl moved to {previous[0]}/"
            in capsys.readouterr().out)


def test_setting_aside_an_earlier_log_alone_names_the_log_alone(tmp_path, capsys):
    """A run that crashed before writing its flow left only its log: the note names what
    moved, not a flow that was never there."""
    (tmp_path / "pf.pt.log.jsonl").write_text("{}\n")
    rpf._set_aside_earlier_run(str(tmp_path / "pf.pt"))
    (previous,) = [p for p in tmp_path.iterdir() if p.name.startswith("previous-")]
    assert [p.name for p in previous.iterdir()] == ["pf.pt.log.jsonl"]
    assert capsys.readouterr().out == (f"[protoflow] an earlier run's pf.pt.log.jsonl moved to "
                                       f"{previous}/\n")
    rpf._set_aside_earlier_run(str(tmp_path / "pf.pt"))  # nothing left to move: no note
    assert capsys.readouterr().out == ""


def test_train_refuses_prototypes_made_from_other_images(cli, tmp_path):
    """Prototypes made before images were added to (or removed from) a class, as a custom
    set split anew leaves them, are refused by train with the count of each; few-shot
    prototypes (--num_shots) are not counted."""
    data = tmp_path / "data"
    shutil.copytree(os.path.join(cli["root"], "data"), data)
    train = list(cli["train"])
    train[train.index("--data_path") + 1] = str(data)
    for k in (5, 6, 7, 8, 9):  # brick: 5 -> 10 images, 4 -> 9 kept, 1 held out still
        shutil.copy(data / "train" / "brick" / "000.png", data / "train" / "brick" / f"{k:03d}.png")
    meta = os.path.join(cli["protos"], "brick", "coreset.json")
    with pytest.raises(FlagError) as err:
        rpf.main(train + ["--output", str(tmp_path / "x.pt"), "--classes", "brick",
                          "--holdout", "0"])
    assert str(err.value) == (f"{meta}: the prototypes were made from a training set of 5 "
                              "images of 'brick', this one has 10 (images added or removed "
                              "since, or the set split anew); rebuild the prototypes with "
                              "`python run_protoflow.py prototypes` on them")
    shots = str(tmp_path / "shots")
    common = list(cli["common"])
    common[common.index("--data_path") + 1] = str(data)
    rpf.main(["prototypes", *common, "--output_dir", shots, "--classes", "brick",
              "--num_shots", "2"])
    train[train.index("--prototypes_dir") + 1] = shots
    obj = rpf.main(train + ["--output", str(tmp_path / "y.pt"), "--classes", "brick",
                            "--epochs", "1"])
    assert obj["classes"] == ["brick"]
    # a bad image left out by one command and not the other: said so, not 'added or
    # removed since' (a rebuild would not help)
    (data / "train" / "brick" / "009.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    skipping = str(tmp_path / "skipping")
    with pytest.warns(datasets.DataWarning):
        rpf.main(["prototypes", *common, "--output_dir", skipping, "--classes", "brick",
                  "--skip_bad_images"])
    train[train.index("--prototypes_dir") + 1] = skipping
    with pytest.raises(FlagError) as err:
        rpf.main(train + ["--output", str(tmp_path / "z.pt"), "--classes", "brick"])
    assert str(err.value) == (f"{skipping}/brick/coreset.json: the prototypes were made from "
                              "9 images of 'brick' with --skip_bad_images, this training has "
                              "10 without it: pass the same --skip_bad_images to both "
                              "commands")


def test_resume_without_a_resume_file_is_refused(cli):
    out = str(cli["root"] / "fresh.pt")
    with pytest.raises(FlagError) as err:
        rpf.main(cli["train"] + ["--output", out, "--resume"])
    assert str(err.value) == (f"--resume: {out}.resume does not exist, so --output {out} has "
                              "no unfinished run to continue; drop --resume to start afresh")
    assert not os.path.exists(out) and not os.path.exists(out + ".log.jsonl")


def test_an_offline_fetch_failure_names_the_installed_lite0(monkeypatch):
    """run_protoflow's commands, which have --encoder, add the demo's backbone to the
    fetch error (a user following README offline could not find it); with
    --encoder_weights given, its own error stands. Without the package, the hint is the
    command that prints the weights' path."""
    def offline(*a, **k):
        raise MissingFileError("timm could not fetch tf_efficientnet_b6's weights")
    monkeypatch.setattr(rpf, "create_backbone", offline)
    args = argparse.Namespace(encoder="tf_efficientnet_b6", out_indices=[2, 3],
                              encoder_weights=None, device="cpu")
    with pytest.raises(MissingFileError) as info:
        rpf._encoder_from_args(args)
    assert str(info.value) == (
        "timm could not fetch tf_efficientnet_b6's weights. Offline with no such file, the "
        "demo's backbone (a smaller one than the paper's B6) is installed: --encoder "
        f"efficientnet_lite0 --encoder_weights {lite0_weights_path()}")
    args.encoder_weights = "b6.pth"
    with pytest.raises(MissingFileError, match="weights$"):
        rpf._encoder_from_args(args)
    monkeypatch.setattr(backbones, "lite0_weights_path", lambda: (_ for _ in ()).throw(
        FileNotFoundError("no package")))
    assert backbones.lite0_hint() == (
        "$(python -c 'from backbones import lite0_weights_path; print(lite0_weights_path())')")


def test_train_takes_the_original_obj2tex_switch_as_the_other_commands_do(tmp_path):
    """run_pretraining.py and run_test.py take --from_obj_to_texture; `train` said
    'unrecognized arguments'. It means --setting obj2tex (which needs MVTec AD's 15
    classes), and is refused beside --classes or another --setting."""
    (tmp_path / "train" / "brick").mkdir(parents=True)
    base = ["train", "--data_path", str(tmp_path), "--output", str(tmp_path / "pf.pt")]
    with pytest.raises(FlagError, match="^'obj2tex' splits MVTec AD"):
        rpf.main(base + ["--from_obj_to_texture"])
    with pytest.raises(FlagError, match="^--from_obj_to_texture means --setting obj2tex"):
        rpf.main(base + ["--from_obj_to_texture", "--setting", "tex2obj"])
    with pytest.raises(FlagError, match="^--classes names the classes itself"):
        rpf.main(base + ["--from_obj_to_texture", "--classes", "brick"])


def test_a_threshold_from_few_held_out_images_is_named(capsys):
    """10 % of a custom class of a dozen images is one image, whose score is the class's
    threshold: a note names each such class and the fix; none is said for 3 or more (the
    demo's 4 per class, MVTec AD's toothbrush's 6)."""
    rpf.note_few_held_out(["cat", "stars", "tiles"], torch.tensor([1, 3, 2]))
    assert capsys.readouterr().out == (
        "[protoflow] note: cat (1), tiles (2): fewer than 3 held-out normal images, so the "
        "class's threshold (about their largest score) is a rough guess, and so are "
        "predict.py's decisions and run_test.py --clean_masks threshold's calls: add normal "
        "images (a larger --holdout, for `prototypes` and `train` alike, holds out more of "
        "them)\n")
    rpf.note_few_held_out(["stars"], torch.tensor([3]))
    assert capsys.readouterr().out == ""


def test_the_training_line_gives_each_class_its_own_threshold(cli, tmp_path, capsys):
    """With two classes, the line of per-class thresholds gives each class the quantile of
    its own held-out scores (what run_test.py and predict.py call at, threshold_for), not
    the file's quantile over every class, which a one-class run cannot tell apart."""
    out = str(tmp_path / "pf.pt")
    obj = rpf.main(cli["train"] + ["--output", out, "--epochs", "1"])
    said = capsys.readouterr().out
    flow = pf.ProtoFlow(out, cli["protos"])
    own = {c: flow.threshold_for(c) for c in ("brick", "gravel")}
    assert own["brick"] != own["gravel"] and obj["image_score_threshold"] not in own.values()
    assert (f"[protoflow] each class's threshold: brick {own['brick']:.4f}, gravel "
            f"{own['gravel']:.4f}\n") in said


def test_protoflow_file_keeps_its_image_size_and_refuses_others(cli, tmp_path, capsys):
    """A ProtoFlow made at 64 px records it (a file of an earlier version, in its
    train_args): 224-px images (the ViT's) are refused, not scored against 64-px
    prototypes and threshold; so are prototypes made at 224 px or with other encoder
    weights, by the rebuild command with the file's own flags. A weights path that names
    no file here (another machine's) says nothing of the weights: not compared."""
    common = [*cli["common"], "--img_size", "64"]
    protos = str(tmp_path / "protos64")
    rpf.main(["prototypes", *common, "--output_dir", protos, "--coreset_ratio", "0.05",
              "--classes", "brick"])
    out = str(tmp_path / "pf64.pt")
    obj = rpf.main(["train", *common, "--prototypes_dir", protos, "--classes", "brick",
                    "--epochs", "1", "--n_blocks", "1", "--output", out])
    said = capsys.readouterr().out
    held = len(obj["normal_image_scores"]["scores"])
    assert (f"image-score threshold {obj['image_score_threshold']:.4f} over all classes (q0.99 "
            f"of {held} held-out images; each class has its own, from its held-out images)"
            in said)
    own = pf.ProtoFlow(out, protos).threshold_for("brick")  # what run_test.py calls at
    assert f"[protoflow] each class's threshold: brick {own:.4f}\n" in said
    assert ("[protoflow] note:" in said) == (held < 3)
    weights = os.path.abspath(lite0_weights_path())
    assert obj["img_size"] == 64 and obj["train_args"]["img_size"] == 64
    model = pf.ProtoFlow(out, protos)
    assert model.img_size == 64
    older = str(tmp_path / "pf64_older.pt")  # before img_size was a field of its own
    torch.save({k: v for k, v in torch.load(out, weights_only=True).items() if k != "img_size"},
               older)
    assert pf.ProtoFlow(older, protos).img_size == 64
    image = torch.zeros(1, 3, 64, 64)
    assert model.log_likelihood(image, "brick").shape == (1, 8, 8)
    with pytest.raises(FlagError, match=re.escape(
            f"{out} was made at 64 px (prototypes, flow and threshold) but is given 224x224 "
            "px images")):
        model.log_likelihood(torch.zeros(1, 3, 224, 224), "brick")
    with pytest.raises(FlagError, match=re.escape(f"{out} was made at 64 px (prototypes, "
                                                  "flow and threshold) but is given 64x96")):
        model.check_image_size(64, 96)  # the height alone is not the size
    rebuild = (f"rebuild it with `python run_protoflow.py prototypes --data_path <ImageNet-layout "
               f"root> --classes brick --output_dir {cli['protos']} --encoder "
               f"efficientnet_lite0 --out_indices 2 3 --encoder_weights {weights} --img_size "
               "64`")
    with pytest.raises(CheckpointError) as err:  # the `cli` prototypes: made at 224 px
        pf.ProtoFlow(out, cli["protos"]).log_likelihood(image, "brick")
    assert str(err.value) == (f"{os.path.join(cli['protos'], 'brick', 'coreset.npy')} was "
                              "made with --img_size 224 (this run: 64), which give other "
                              f"features; {rebuild}")
    meta = json.loads(open(os.path.join(protos, "brick", "coreset.json")).read())
    pf.save_prototypes(protos, "brick", np.load(os.path.join(protos, "brick", "coreset.npy")),
                       {**meta, "encoder_weights": "/elsewhere/other.pth"})
    assert pf.ProtoFlow(out, protos).log_likelihood(image, "brick").shape == (1, 8, 8)
    other = tmp_path / "other.pth"
    shutil.copy(weights, other)  # a file here: compared by path, as training compares them
    pf.save_prototypes(protos, "brick", np.load(os.path.join(protos, "brick", "coreset.npy")),
                       {**meta, "encoder_weights": str(other)})
    with pytest.raises(CheckpointError, match=re.escape(
            f"was made with encoder weights {other} (this run: {weights}), which give other "
            "features")):
        pf.ProtoFlow(out, protos).log_likelihood(image, "brick")


def test_train_refuses_prototypes_of_another_image_size(cli, capsys):
    """One `error:` line and exit 2, naming the file and the command that rebuilds it."""
    argv = cli["train"] + ["--output", str(cli["root"] / "size.pt"), "--img_size", "64"]
    assert utils.cli(lambda: rpf.main(argv)) == 2
    data = os.path.normpath(cli["common"][cli["common"].index("--data_path") + 1])
    weights = cli["common"][cli["common"].index("--encoder_weights") + 1]
    assert capsys.readouterr().err == (
        f"error: {os.path.join(cli['protos'], 'brick', 'coreset.npy')} was made with --img_size "
        "224 (this run: 64), which give other features; rebuild it with `python "
        f"run_protoflow.py prototypes --data_path {data} --classes brick --output_dir "
        f"{cli['protos']} --encoder efficientnet_lite0 --out_indices 2 3 --encoder_weights "
        f"{weights} --img_size 64 --holdout 0.1 --seed 0`\n")
    assert not os.path.exists(cli["root"] / "size.pt")


def test_a_diverged_flow_is_its_message_and_exit_1_on_the_command_line(monkeypatch, capsys):
    """Nothing was written and it is no mistake of a flag: like run_pretraining.py's
    non-finite loss, the message alone (no traceback) and exit 1."""
    def diverged(argv):
        raise FloatingPointError("the flow after epoch 1 gives non-finite scores")

    monkeypatch.setattr(rpf, "main", diverged)
    assert rpf.command_line(["train"]) == 1
    assert capsys.readouterr().err == "error: the flow after epoch 1 gives non-finite scores\n"


def test_train_refuses_a_flow_diverged_in_its_last_step(cli):
    """The loss before the one step was finite; the step left a flow whose held-out scores
    are inf: no file, and the error says to lower --lr."""
    out = str(cli["root"] / "diverged.pt")
    with pytest.raises(FloatingPointError) as err:
        rpf.main(cli["train"] + ["--output", out, "--epochs", "1", "--warmup_epochs", "0",
                                 "--lr", "1e3", "--batch_size", "10"])
    assert str(err.value) == (
        "the flow after epoch 1 gives non-finite scores to 2 of 2 held-out images: the "
        f"training diverged; lower --lr (now 1000.0) and start afresh (delete {out}.resume, "
        "which holds this run)")
    assert not os.path.exists(out)


def test_train_refuses_a_flow_that_gives_one_held_out_image_an_infinite_score(cli,
                                                                             monkeypatch):
    """One non-finite held-out score makes the threshold (a quantile over them) wrong as
    surely as all of them: no file."""
    monkeypatch.setattr(rpf, "held_out_scores", lambda *args: (torch.tensor([1.0, math.inf]),
                                                               torch.tensor([0, 1])))
    out = str(cli["root"] / "one_inf.pt")
    with pytest.raises(FloatingPointError, match="gives non-finite scores to 1 of 2 held-out "
                                                 "images"):
        rpf.main(cli["train"] + ["--output", out, "--epochs", "1"])
    assert not os.path.exists(out)


def test_resume_refuses_every_other_training_argument(cli, monkeypatch):
    """A crashed run resumes only with the arguments it was started with: each changed
    one is refused by name (fewer --classes too, whose prototypes all still match)."""
    crashed = str(cli["root"] / "d.pt")
    _crash_in_epoch_two(cli, monkeypatch, crashed)
    argv = cli["train"] + ["--output", crashed, "--resume"]
    for flag, value, saved_now in (
            ("--classes", ["brick"], "['brick', 'gravel'] (now ['brick'])"),
            ("--lr", ["1e-3"], "0.0002 (now 0.001)"), ("--epochs", ["3"], "2 (now 3)"),
            ("--warmup_epochs", ["0"], "2 (now 0)"), ("--batch_size", ["2"], "4 (now 2)"),
            ("--n_blocks", ["2"], "1 (now 2)"), ("--num_workers", ["1"], "0 (now 1)")):
        with pytest.raises(CheckpointError, match=re.escape(
                f"was made with other arguments: {flag} {saved_now}; use the same")):
            rpf.main(argv + [flag, *value])


def test_threshold_per_class_from_held_out_images(lite0, tmp_path):
    """The clean protocol's --clean_masks threshold calls each class with the quantile of
    its own held-out normal images; a class without any uses the file's threshold."""
    path = str(tmp_path / "pf.pt")
    scores = torch.tensor([1.0, 2.0, 3.0, 10.0, 20.0])
    pf.save_protoflow(path, lite0, pf.build_flow(LITE0_DIM, 1), backbone="efficientnet_lite0",
                      out_indices=(2, 3), classes=["a", "b", "c"], normal_scores=scores,
                      normal_classes=torch.tensor([0, 0, 0, 1, 1]), threshold_quantile=0.5)
    model = pf.ProtoFlow(path, str(tmp_path))
    assert model.threshold == 3.0  # median of all five
    assert model.threshold_for("a") == 2.0 and model.threshold_for("b") == 15.0
    assert model.threshold_for("c") == 3.0 and model.threshold_for("unseen") == 3.0
    released = str(tmp_path / "released.pt")
    obj = torch.load(path, weights_only=True)
    torch.save({k: obj[k] for k in ("encoder_state_dict", "decoder_state_dict", "backbone",
                                    "out_indices")}, released)
    assert pf.ProtoFlow(released, str(tmp_path)).threshold_for("a") is None
    # a file a diverged flow wrote before training checked for one: refused at load
    diverged = str(tmp_path / "diverged.pt")
    pf.save_protoflow(diverged, lite0, pf.build_flow(LITE0_DIM, 1),
                      backbone="efficientnet_lite0", out_indices=(2, 3), classes=["a"],
                      normal_scores=torch.tensor([1.0, float("inf")]))
    with pytest.raises(CheckpointError, match=(
            f"{diverged} stores a non-finite image-score threshold \\(nan\\) or held-out "
            "scores: its flow diverged")):
        pf.ProtoFlow(diverged, str(tmp_path))


def test_command_flags_reach_their_consumers(cli, tmp_path):
    """Both commands with the shared flags away from their defaults (stride-16 features
    only, 64 px images, another seed, an unreadable image left out) and the train
    command's class selection, schedule and threshold quantile."""
    import shutil
    data = tmp_path / "data"
    shutil.copytree(cli["root"] / "data", data)
    (data / "train" / "brick" / "bad.png").write_bytes(b"not a png")
    common = list(cli["common"])
    common[common.index("--data_path") + 1] = str(data)
    shared = [*common, "--out_indices", "3", "--img_size", "64", "--seed", "1",
              "--holdout", "0.4", "--skip_bad_images"]
    protos = str(tmp_path / "prototypes")
    with pytest.warns(UserWarning, match="(?s)left out 1 bad file.*bad.png"):
        (path,) = rpf.main(["prototypes", *shared, "--output_dir", protos, "--classes",
                            "brick", "--coreset_ratio", "0.1"])
    meta = json.loads(open(os.path.join(protos, "brick", "coreset.json")).read())
    assert meta["out_indices"] == [3] and meta["img_size"] == 64 and meta["seed"] == 1
    # 5 readable images (of 6 files), 40 % held out
    assert meta["num_images"] == 3 and len(meta["held_out"]) == 2
    assert "bad.png" not in meta["held_out"]
    # 3 images x (64 / 16)^2 patches x 0.1; stride-16 features only: 112 channels
    assert np.load(path).shape == (int(3 * 16 * 0.1), 112)
    out = str(tmp_path / "pf.pt")
    with pytest.warns(UserWarning, match="(?s)left out 1 bad file.*bad.png"):
        obj = rpf.main(["train", *shared, "--setting", "leave_one_out", "--unseen_classes",
                        "gravel", "--prototypes_dir", protos, "--output", out, "--epochs", "2",
                        "--n_blocks", "1", "--lr", "1e-3", "--warmup_epochs", "1",
                        "--threshold_quantile", "0.5"])
    assert obj["classes"] == ["brick"] and obj["feature_dim"] == 112
    assert obj["out_indices"] == [3]
    # one step per epoch: warm-up from lr / 10, then lr (the cosine's first value)
    lrs = [r["lr"] for r in map(json.loads, open(out + ".log.jsonl"))]
    assert lrs == pytest.approx([1e-4, 1e-3])
    scores = obj["normal_image_scores"]["scores"].double()
    assert len(scores) == 2 and obj["threshold_quantile"] == 0.5
    assert obj["image_score_threshold"] == pytest.approx(float(scores.mean()))  # the median


def test_a_class_threshold_is_the_quantile_of_its_own_held_out_scores():
    """Class 1's threshold is the quantile of its scores alone (not of class 0's, nor of
    all); a class with no held-out score has none, and the one over all classes serves
    it (ProtoFlow.threshold_for)."""
    scores = torch.tensor([1.0, 2.0, 10.0, 20.0, 30.0])
    class_idx = torch.tensor([0, 0, 1, 1, 1])
    assert pf.class_threshold(scores, class_idx, 1, 0.5) == pytest.approx(20.0)
    assert pf.class_threshold(scores, class_idx, 0, 1.0) == pytest.approx(2.0)
    assert pf.class_threshold(scores, class_idx, 2, 0.5) is None
