"""The reconstruction ViT of PMAD: BEiT's masked-image-modelling transformer.

Same layout and key names as BEiT's pretraining model, so the released BEiT pt22k and
PMAD checkpoints load unchanged (docs/method.md section 2). The shared relative position bias
is gathered once per forward; attention (`scaled_dot_product`) takes SDPA's fused kernels
with it as the additive mask wherever they apply, the explicit softmax form elsewhere
(``Attention.fused_attn = False`` forces the latter). Residual branches are added with
layer scale and stochastic depth in one pass, and with masked-token logits only the
masked rows go through the last block's projection and MLP, the final norm and `lm_head`.
bench/bench_model.py measures this against the original code's computation.

``Block``, ``Attention`` and ``PatchEmbed`` are reused by the ViT visual tokenizer in
modeling_discrete_vae.py (no layer scale, absolute position embedding there).
"""
from __future__ import annotations

import argparse
import logging
import math
import os
from functools import partial
from typing import Any, Callable

import torch
import torch.nn.functional as F
from timm.layers import Mlp, to_2tuple, trunc_normal_
from timm.models import register_model
from torch import nn

from utils import (CheckpointError, FlagError, MissingFileError, bf16_supported, main_print,
                   read_weights_file, some_names, strip_ddp_prefix)

__all__ = [
    "PatchEmbed", "Attention", "Block", "RelativePositionBias",
    "VisionTransformerForMaskedImageModeling", "relative_position_index",
    "set_fused_attn", "build_pmad", "PMAD_MODELS", "MODEL_CONFIGS", "unwrap_state_dict",
    "load_state_dict_checked", "load_checkpoint", "checkpoint_args", "resolve_eval_config",
    "checkpoint_vocab_size", "PAPER_EVAL_CONFIG", "PMAD_LAYOUT", "check_init_checkpoint",
    "load_init_checkpoint",
]

_logger = logging.getLogger(__name__)

LayerNorm = partial(nn.LayerNorm, eps=1e-6)


def _trunc_normal_(tensor: torch.Tensor, std: float) -> torch.Tensor:
    # timm's inverse-CDF sampler: torch's rejection sampler is ~15x slower on CPU
    return trunc_normal_(tensor, std=std, a=-2 * std, b=2 * std)


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens; the grid follows from `img_size` / `patch_size`."""

    def __init__(self, img_size: int | tuple[int, int] = 224,
                 patch_size: int | tuple[int, int] = 16, in_chans: int = 3,
                 embed_dim: int = 768) -> None:
        super().__init__()
        self.img_size = to_2tuple(img_size)
        self.patch_size = to_2tuple(patch_size)
        if self.img_size[0] % self.patch_size[0] or self.img_size[1] % self.patch_size[1]:
            raise ValueError(f"image size {self.img_size} is not a multiple of the patch "
                             f"size {self.patch_size}")
        self.grid_size = (self.img_size[0] // self.patch_size[0],
                          self.img_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size,
                              stride=self.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(f"input is {tuple(x.shape[-2:])} pixels, the model was built for "
                             f"{self.img_size}: resize the images or build the model with "
                             f"img_size={x.shape[-1]}")
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, L, D)


def relative_position_index(grid_size: tuple[int, int]) -> torch.Tensor:
    """BEiT's (L+1, L+1) index into the relative position bias table.

    Patch pairs map to (dh + Gh - 1) * (2 Gw - 1) + (dw + Gw - 1); the last three table rows
    are cls->patch (row 0), patch->cls (column 0) and cls->cls ([0, 0]).
    """
    gh, gw = grid_size
    coords = torch.stack(torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij"))
    coords = coords.flatten(1)  # (2, L)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # (L, L, 2)
    num_distances = (2 * gh - 1) * (2 * gw - 1)
    index = torch.empty(gh * gw + 1, gh * gw + 1, dtype=torch.long)
    index[1:, 1:] = (rel[..., 0] + gh - 1) * (2 * gw - 1) + (rel[..., 1] + gw - 1)
    index[0, :] = num_distances
    index[:, 0] = num_distances + 1
    index[0, 0] = num_distances + 2
    return index


class RelativePositionBias(nn.Module):
    """One relative position bias shared by every block (BEiT `use_shared_rel_pos_bias`)."""

    def __init__(self, grid_size: tuple[int, int], num_heads: int) -> None:
        super().__init__()
        self.grid_size = tuple(grid_size)
        num_relative = (2 * grid_size[0] - 1) * (2 * grid_size[1] - 1) + 3
        self.relative_position_bias_table = nn.Parameter(torch.zeros(num_relative, num_heads))
        # Persistent: the released checkpoints carry it, so it stays in the state dict.
        self.register_buffer("relative_position_index", relative_position_index(grid_size))

    def forward(self) -> torch.Tensor:
        t = self.relative_position_index.shape[0]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(t, t, -1).permute(2, 0, 1).contiguous()  # (H, T, T)


class Attention(nn.Module):
    """Multi-head self-attention with BEiT's q/v biases (k has none).

    ``fused_attn`` True: the fastest exact formulation for the device (see
    `scaled_dot_product`); False: always the explicit softmax(q k^T * scale + bias) v.
    """

    fused_attn: bool = True

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
        else:
            self.q_bias = self.v_bias = None
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, rel_pos_bias: torch.Tensor | None = None,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """(N, T, D) -> (N, T, D); with `rows` (flat indices into the N x T tokens) only
        those tokens are projected: (len(rows), D)."""
        n, t, d = x.shape  # (N, T, D)
        qkv_bias = None
        if self.q_bias is not None:
            qkv_bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        qkv = F.linear(x, self.qkv.weight, qkv_bias)  # (N, T, 3D)
        # split, not unbind: its backward writes the three gradients into one (N, T, 3D)
        q, k, v = (part.view(n, t, self.num_heads, self.head_dim).transpose(1, 2)
                   for part in qkv.split(d, dim=-1))  # (N, H, T, hd) each
        x = scaled_dot_product(q, k, v, rel_pos_bias, self.scale,
                               self.attn_drop.p if self.training else 0.0,
                               explicit=not self.fused_attn)  # (N, H, T, hd)
        x = x.transpose(1, 2).reshape(n, t, d)  # (N, T, D)
        if rows is not None:
            x = x.view(n * t, d).index_select(0, rows)  # (M, D)
        return self.proj_drop(self.proj(x))


def scaled_dot_product(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       bias: torch.Tensor | None, scale: float, dropout_p: float = 0.0,
                       explicit: bool = False) -> torch.Tensor:
    """softmax(q k^T * scale + bias) v for (N, H, T, hd) q, k, v and an (H, T, T) bias.

    SDPA where it runs a fused kernel. On the CPU a bias that needs a gradient (training)
    sends SDPA to its unfused math path, which costs more than the explicit form (extra
    passes for the scaling and its -inf guard), so the explicit form runs there.
    On a CPU where bf16 matmuls do not pay (`utils.bf16_supported`; without AMX, torch's
    bf16 batched matmul is several times slower than its fp32 one) bf16/fp16 inputs are
    computed in fp32, as torch's own CPU math path does; the result is then fp32.
    """
    if q.device.type == "cpu" and q.dtype != torch.float32 and not bf16_supported("cpu"):
        with torch.autocast("cpu", enabled=False):
            return scaled_dot_product(q.float(), k.float(), v.float(), bias, scale,
                                      dropout_p, explicit)
    needs_bias_grad = bias is not None and bias.requires_grad and torch.is_grad_enabled()
    if not explicit and not (q.device.type == "cpu" and needs_bias_grad):
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=None if bias is None else bias.to(q.dtype).unsqueeze(0),
            dropout_p=dropout_p, scale=scale)  # (1, H, T, T) mask: the CPU flash kernel's shape
    attn = (q * scale) @ k.transpose(-2, -1)  # (N, H, T, T)
    if bias is not None:
        attn = attn.add_(bias.to(attn.dtype))  # in place: the product's backward needs q, k only
    attn = attn.softmax(dim=-1)
    if dropout_p:
        attn = F.dropout(attn, dropout_p)
    return attn @ v  # (N, H, T, hd)


class Block(nn.Module):
    """Pre-norm transformer block; layer scale (`gamma_1`, `gamma_2`) iff `init_values`.

    Each residual branch is added as ``x + drop_path(gamma * branch)`` in one `addcmul`:
    the per-sample stochastic-depth factor is folded into the (D,) layer scale.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, drop: float = 0.0, attn_drop: float = 0.0,
                 drop_path: float = 0.0, init_values: float | None = None,
                 norm_layer: Callable[[int], nn.Module] = LayerNorm) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop,
                              proj_drop=drop)
        self.drop_path = drop_path  # probability of skipping a branch, per sample
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=drop)
        if init_values:
            self.gamma_1 = nn.Parameter(init_values * torch.ones(dim))
            self.gamma_2 = nn.Parameter(init_values * torch.ones(dim))
        else:
            self.gamma_1 = self.gamma_2 = None

    def _branch_scale(self, gamma: torch.Tensor | None, n: int, x: torch.Tensor,
                      samples: torch.Tensor | None) -> torch.Tensor | None:
        """gamma times the per-sample stochastic-depth factor, broadcastable to the
        residual: (N, 1, 1|D) for (N, T, D) tokens, (M, 1|D) for rows of `samples`;
        gamma alone outside training; None = 1."""
        if not (self.training and self.drop_path > 0.0):
            return gamma
        keep = 1.0 - self.drop_path
        draw = x.new_empty(n, 1).bernoulli_(keep).div_(keep)  # (N, 1)
        draw = draw.unsqueeze(1) if samples is None else draw.index_select(0, samples)
        return draw if gamma is None else gamma * draw

    @staticmethod
    def _add(x: torch.Tensor, scale: torch.Tensor | None, branch: torch.Tensor) -> torch.Tensor:
        return x + branch if scale is None else torch.addcmul(x, scale, branch)

    def forward(self, x: torch.Tensor, rel_pos_bias: torch.Tensor | None = None,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """(N, T, D) -> (N, T, D); with `rows` (flat indices into the N x T tokens) every
        token still attends, but only those rows go on: (len(rows), D)."""
        n, t, d = x.shape
        samples = None if rows is None else torch.div(rows, t, rounding_mode="floor")
        branch = self.attn(self.norm1(x), rel_pos_bias, rows)  # (N, T, D) or (M, D)
        if rows is not None:
            x = x.reshape(n * t, d).index_select(0, rows)  # (M, D)
        x = self._add(x, self._branch_scale(self.gamma_1, n, x, samples), branch)
        branch = self.mlp(self.norm2(x))
        return self._add(x, self._branch_scale(self.gamma_2, n, x, samples), branch)


def set_fused_attn(model: nn.Module, enabled: bool) -> None:
    """Switch every Attention in `model` between SDPA (True) and explicit softmax (False)."""
    for module in model.modules():
        if isinstance(module, Attention):
            module.fused_attn = enabled


class VisionTransformerForMaskedImageModeling(nn.Module):
    """BEiT masked image modelling: predict the visual token of each masked patch."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3,
                 vocab_size: int = 8192, embed_dim: int = 768, depth: int = 12,
                 num_heads: int = 12, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, init_values: float | None = None,
                 use_abs_pos_emb: bool = True, use_shared_rel_pos_bias: bool = False,
                 init_std: float = 0.02) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.num_features = self.embed_dim = embed_dim
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = (nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
                          if use_abs_pos_emb else None)
        self.pos_drop = nn.Dropout(drop_rate)
        self.rel_pos_bias = (RelativePositionBias(self.patch_embed.grid_size, num_heads)
                             if use_shared_rel_pos_bias else None)
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # linear decay rule
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, drop=drop_rate,
                  attn_drop=attn_drop_rate, drop_path=dpr[i], init_values=init_values)
            for i in range(depth)])
        self.norm = LayerNorm(embed_dim)
        self.lm_head = nn.Linear(embed_dim, vocab_size)
        self.init_std = init_std
        self._init_weights()

    def _init_weights(self) -> None:
        std = self.init_std
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                _trunc_normal_(m.weight, std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for p in (self.cls_token, self.mask_token, self.pos_embed):
            if p is not None:
                _trunc_normal_(p, std)
        with torch.no_grad():  # depth-scaled residual projections (BEiT fix_init_weight)
            for layer_id, blk in enumerate(self.blocks, start=1):
                blk.attn.proj.weight.div_(math.sqrt(2.0 * layer_id))
                blk.mlp.fc2.weight.div_(math.sqrt(2.0 * layer_id))

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    def forward_features(self, x: torch.Tensor, bool_masked_pos: torch.Tensor,
                         masked_only: bool = False,
                         masked_index: torch.Tensor | None = None) -> torch.Tensor:
        """Final-normed tokens, cls first: (N, 1 + L, D). With `masked_only`, the masked
        patches' tokens alone, (M, D) in `x[bool_masked_pos]` order: the last block's
        row-wise part (projection, MLP) and the final norm then run on those rows only.
        masked_index (M,): as in `forward`."""
        x = self.patch_embed(x)  # (N, L, D)
        n, num_patches, _ = x.shape
        if bool_masked_pos.dtype != torch.bool or tuple(bool_masked_pos.shape) != (n, num_patches):
            raise ValueError(f"bool_masked_pos must be a bool tensor of shape {(n, num_patches)}, "
                             f"got {bool_masked_pos.dtype} {tuple(bool_masked_pos.shape)}")
        # Type promotion keeps the residual stream in the parameters' dtype under autocast.
        x = torch.where(bool_masked_pos.unsqueeze(-1), self.mask_token, x)
        x = torch.cat((self.cls_token.expand(n, -1, -1), x), dim=1)  # (N, T, D)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        x = self.pos_drop(x)
        rel_pos_bias = self.rel_pos_bias() if self.rel_pos_bias is not None else None  # (H, T, T)
        rows = None
        if masked_only:
            if masked_index is None:
                masked_index = bool_masked_pos.flatten().nonzero().squeeze(1)  # (M,)
            # into the N x T tokens: patch p of image b is row b * T + 1 + p (cls first)
            rows = masked_index + masked_index.div(num_patches, rounding_mode="floor") + 1
        for i, blk in enumerate(self.blocks, start=1):
            x = blk(x, rel_pos_bias, rows if i == len(self.blocks) else None)
        return self.norm(x)

    def forward(self, x: torch.Tensor, bool_masked_pos: torch.Tensor,
                return_all_tokens: bool = False,
                masked_index: torch.Tensor | None = None) -> torch.Tensor:
        """Token logits: (M, V) for the masked patches in `x[bool_masked_pos]` order
        (batch-major, then position), or (N, L, V) with `return_all_tokens`.

        masked_index (M,): those patches' row-major positions, when the caller knows
        them (MaskBatch.index); finding them from the boolean mask counts them on the
        host, which waits for the device.
        """
        if return_all_tokens:
            return self.lm_head(self.forward_features(x, bool_masked_pos)[:, 1:])  # (N, L, V)
        return self.lm_head(self.forward_features(x, bool_masked_pos, masked_only=True,
                                                  masked_index=masked_index))  # (M, V)


_TIMM_ONLY_KWARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")
# PMAD's layout (docs/method.md 2): shared relative bias, no absolute position embedding
PMAD_LAYOUT: dict[str, Any] = dict(use_shared_rel_pos_bias=True, use_abs_pos_emb=False)


def _create(pretrained: bool, config: dict[str, Any], **kwargs: Any
            ) -> VisionTransformerForMaskedImageModeling:
    for key in _TIMM_ONLY_KWARGS:
        kwargs.pop(key, None)
    if pretrained:
        raise ValueError("no weights are downloaded: build with pretrained=False and load a "
                         "local file with modeling_pmad.load_checkpoint(model, path)")
    return VisionTransformerForMaskedImageModeling(**{**PMAD_LAYOUT, **config, **kwargs})


# Each registered model's layout; its patch size also sets the image grid (run_pretraining).
MODEL_CONFIGS: dict[str, dict[str, Any]] = {
    "vit_tiny_patch16_224_8k_vocab": dict(patch_size=16, embed_dim=192, depth=12,
                                           num_heads=3, init_values=0.1),
    "vit_small_patch16_224_8k_vocab": dict(patch_size=16, embed_dim=384, depth=12,
                                           num_heads=6, init_values=0.1),
    "vit_base_patch16_224_8k_vocab": dict(patch_size=16, embed_dim=768, depth=12,
                                           num_heads=12, init_values=0.1),
    "vit_large_patch16_224_8k_vocab": dict(patch_size=16, embed_dim=1024, depth=24,
                                           num_heads=16, init_values=1e-5),
}


@register_model
def vit_tiny_patch16_224_8k_vocab(pretrained: bool = False, **kwargs: Any
                                  ) -> VisionTransformerForMaskedImageModeling:
    return _create(pretrained, MODEL_CONFIGS["vit_tiny_patch16_224_8k_vocab"], **kwargs)


@register_model
def vit_small_patch16_224_8k_vocab(pretrained: bool = False, **kwargs: Any
                                   ) -> VisionTransformerForMaskedImageModeling:
    return _create(pretrained, MODEL_CONFIGS["vit_small_patch16_224_8k_vocab"], **kwargs)


@register_model
def vit_base_patch16_224_8k_vocab(pretrained: bool = False, **kwargs: Any
                                  ) -> VisionTransformerForMaskedImageModeling:
    return _create(pretrained, MODEL_CONFIGS["vit_base_patch16_224_8k_vocab"], **kwargs)


@register_model
def vit_large_patch16_224_8k_vocab(pretrained: bool = False, **kwargs: Any
                                   ) -> VisionTransformerForMaskedImageModeling:
    return _create(pretrained, MODEL_CONFIGS["vit_large_patch16_224_8k_vocab"], **kwargs)


PMAD_MODELS = {f.__name__: f for f in (vit_tiny_patch16_224_8k_vocab,
                                        vit_small_patch16_224_8k_vocab,
                                        vit_base_patch16_224_8k_vocab,
                                        vit_large_patch16_224_8k_vocab)}


def build_pmad(model: str, *, vocab_size: int, img_size: int = 224,
               init_values: float | None = None, drop_path_rate: float = 0.0
               ) -> VisionTransformerForMaskedImageModeling:
    """PMAD's ViT in its paper layout (shared relative position bias, no absolute position
    embedding); `init_values` None keeps the model's own layer scale (base 0.1, large
    1e-5, docs/method.md 2). The one builder of run_pretraining.py and run_test.py."""
    if model not in PMAD_MODELS:
        raise FlagError(f"unknown model {model!r} (--model): choose one of "
                        f"{sorted(PMAD_MODELS)}")
    layer_scale = {} if init_values is None else {"init_values": init_values}
    return PMAD_MODELS[model](vocab_size=vocab_size, img_size=img_size,
                              drop_path_rate=drop_path_rate, **PMAD_LAYOUT, **layer_scale)


# ---------------------------------------------------------------- checkpoint loading

# Evaluation settings a checkpoint's training arguments decide, with the paper's values
# for a released file that stores none (docs/method.md 2; layer scale None: the model's own).
PAPER_EVAL_CONFIG: dict[str, Any] = {
    "model": "vit_base_patch16_224_8k_vocab", "input_size": 224,
    "layer_scale_init_value": None, "imagenet_default_mean_and_std": True,
    "tokenizer_model": "dall-e"}


def checkpoint_args(checkpoint: Any) -> dict[str, Any] | None:
    """A checkpoint's training arguments: ours store a dict, the original code's an
    argparse.Namespace (read by utils.read_weights_file's allow-list); None if absent."""
    args = checkpoint.get("args") if isinstance(checkpoint, dict) else None
    if isinstance(args, argparse.Namespace):
        args = vars(args)
    return args if isinstance(args, dict) else None


def resolve_eval_config(given: dict[str, Any], checkpoint: Any, path: str | os.PathLike
                        ) -> tuple[dict[str, Any], list[str]]:
    """The evaluation settings of PAPER_EVAL_CONFIG's keys: each from `given` when not
    None (a flag given explicitly), else from the checkpoint's training arguments, else
    the paper's. Returns (config, notes); the notes name the source and each given value
    that differs from the checkpoint's. A model name stored by the checkpoint that this
    code cannot build (another version's, a typo) is a CheckpointError naming the file
    and --model, not build_pmad's error about a flag that was never given."""
    saved = checkpoint_args(checkpoint) or {}
    if "tokenizer_model" not in saved and saved.get("discrete_vae_type") == "dall-e":
        # BEiT's name for it, recorded by BEiT-based code such as the original's (its
        # other value, 'customized', names a tokenizer of BEiT's that this code lacks)
        saved = {**saved, "tokenizer_model": "dall-e"}
    config, overridden = {}, []
    path = os.fspath(path)
    for key, paper in PAPER_EVAL_CONFIG.items():
        if given.get(key) is not None:
            config[key] = given[key]
            if key in saved and saved[key] != given[key]:
                overridden.append(f"--{key} {given[key]} (checkpoint: {saved[key]})")
        else:
            config[key] = saved.get(key, paper)
    if given.get("model") is None and config["model"] not in PMAD_MODELS:
        raise CheckpointError(f"{path} stores the model name {config['model']!r} in its "
                              "training arguments, which this code does not build: pass "
                              f"--model (one of {sorted(PMAD_MODELS)}) with the size it was "
                              "trained at")
    unrecorded = [k for k in PAPER_EVAL_CONFIG if given.get(k) is None and k not in saved]
    notes = [f"{path} stores {'its training arguments' if saved else 'no training arguments'}"
             f"; evaluating with {config} (given flags, else "
             + ("the checkpoint's)" if not unrecorded else "the paper's)" if not saved else
                f"the checkpoint's; the paper's for {', '.join(unrecorded)}, which its "
                "arguments do not record)")]
    if "tokenizer_model" in unrecorded:
        notes.append("the file does not say which tokenizer it was trained with: this uses "
                     "the paper's, --tokenizer_model dall-e. The authors' later scripts "
                     "train with vit_tokenizer; for such a file pass --tokenizer_model "
                     "vit_tokenizer (both have 8192 codes, so nothing else tells them apart)")
    if overridden:
        notes.append("given flags override the checkpoint's training arguments: "
                     + ", ".join(overridden))
    return config, notes


def checkpoint_vocab_size(checkpoint: Any, path: str | os.PathLike) -> int:
    """The number of visual tokens the checkpoint predicts (rows of `lm_head.weight`)."""
    weight = unwrap_state_dict(checkpoint, path).get("lm_head.weight")
    if weight is None or weight.ndim != 2:
        raise CheckpointError(f"{os.fspath(path)} has no 2-d lm_head.weight: not a PMAD / "
                              "BEiT masked-image-modelling checkpoint")
    return weight.shape[0]


def unwrap_state_dict(obj: Any, path: str | os.PathLike,
                      keys: tuple[str, ...] = ("model", "module")) -> dict[str, torch.Tensor]:
    """The state dict inside a checkpoint: under the first of `keys` present, or `obj`;
    one saved from a DDP-wrapped model ('module.' before every key) as the model's."""
    if isinstance(obj, dict):
        for key in keys:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
        if obj and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                       for k, v in obj.items()):
            return strip_ddp_prefix(obj)
    found = sorted(map(str, obj))[:8] if isinstance(obj, dict) else type(obj).__name__
    what = ("; it is a ProtoFlow file (run_test.py and predict.py take it as "
            "--protoflow_weights)"
            if isinstance(obj, dict) and "decoder_state_dict" in obj else "")
    raise CheckpointError(f"{os.fspath(path)} holds no state dict (expected a dict of "
                          f"tensors, bare or under {' / '.join(map(repr, keys))}); found {found}"
                          + what)


def load_state_dict_checked(model: nn.Module, state_dict: dict[str, torch.Tensor],
                            source: str | os.PathLike, assign: bool = False, fix: str = ""
                            ) -> tuple[list[str], list[str]]:
    """`model.load_state_dict(strict=False)` that raises on any shape mismatch (with the
    caller's `fix`, ': ...').

    Returns (missing, unexpected); the caller decides which of them are acceptable.
    `assign` adopts the file's tensors (for a model built on the meta device).
    """
    own = model.state_dict()
    for key, tensor in state_dict.items():
        if key in own and own[key].shape != tensor.shape:
            raise CheckpointError(f"{os.fspath(source)}: '{key}' has shape "
                                  f"{tuple(tensor.shape)} in the file but "
                                  f"{tuple(own[key].shape)} in {type(model).__name__}: a "
                                  "checkpoint of a different model (size or image size)" + fix)
    if assign:  # adopted tensors keep the model's dtypes
        state_dict = {k: v.to(own[k].dtype) if k in own else v for k, v in state_dict.items()}
    result = model.load_state_dict(state_dict, strict=False, assign=assign)
    return list(result.missing_keys), list(result.unexpected_keys)


# Buffers rebuilt from the patch grid at construction: a file without them lacks nothing.
_DERIVED_SUFFIXES = ("relative_position_index",)


def load_checkpoint(model: nn.Module, path: str | os.PathLike, strict: bool = False,
                    checkpoint: Any = None) -> dict[str, list[str]]:
    """Load a BEiT pt22k or PMAD checkpoint ({'model'|'module': sd} or a bare state dict).

    Returns dict(missing=[...], unexpected=[...]), both also logged as warnings. Missing
    derived buffers (relative_position_index) are not counted. A file sharing no key
    with the model, or any shape mismatch, is an error; `strict` makes any missing or
    unexpected key an error too (use it when evaluating released weights).
    `checkpoint`: the file's contents when the caller has read them already.
    """
    if checkpoint is None:
        checkpoint = read_weights_file(path)
    state_dict = unwrap_state_dict(checkpoint, path)
    own_keys = set(model.state_dict())
    if not own_keys & set(state_dict):
        raise CheckpointError(f"{os.fspath(path)} shares no key with {type(model).__name__} "
                              f"(its keys start {sorted(state_dict)[:4]}): a checkpoint of "
                              "another model")
    fix = "; pass the --model (and --input_size) it was trained with"
    missing, unexpected = load_state_dict_checked(model, state_dict, path, fix=fix)
    missing = [k for k in missing if not k.endswith(_DERIVED_SUFFIXES)]
    if strict and (missing or unexpected):
        raise CheckpointError(f"{os.fspath(path)} does not match {type(model).__name__}: "
                              f"missing {missing}, unexpected {unexpected}" + fix)
    if missing:
        _logger.warning("%s: %d model keys not in the file keep their initial values: %s",
                        path, len(missing), missing)
    if unexpected:
        _logger.warning("%s: %d keys in the file are not used by the model: %s",
                        path, len(unexpected), unexpected)
    _logger.info("loaded %s (%d tensors)", path, len(state_dict) - len(unexpected))
    return {"missing": missing, "unexpected": unexpected}


# What --init_ckpt should be, for its errors.
INIT_CKPT_FIX = ("pass --init_ckpt BEiT's self-supervised ImageNet-22k checkpoint of this "
                 "--model (beit_base_patch16_224_pt22k.pth for the base model; "
                 "weights/README.md) or a PMAD training checkpoint, or --no_init to train "
                 "from scratch")


def init_state_dict(model: nn.Module, path: str, checkpoint: Any
                    ) -> tuple[dict[str, torch.Tensor], int | None]:
    """The tensors of --init_ckpt `path` (contents `checkpoint`) that `model` loads: all
    of its keys (a derived relative_position_index may be absent) and no other, of its
    shapes. A partial load would silently train a half-random ViT, e.g. from a BEiT
    fine-tuned classifier (per-block relative position tables, fc_norm, head). The one
    exception: an lm_head of another vocabulary size (a tokenizer of another vocabulary),
    left out. -> (the tensors, the file's vocabulary size when its head is left out, else
    None). `model` may live on the meta device (shapes only)."""
    state_dict = unwrap_state_dict(checkpoint, path)
    own, name = model.state_dict(), type(model).__name__
    file_head, head = state_dict.get("lm_head.weight"), own["lm_head.weight"]
    other_vocab = None
    if file_head is not None and file_head.ndim == 2 and file_head.shape[1] == head.shape[1] \
            and file_head.shape[0] != head.shape[0]:
        other_vocab = file_head.shape[0]
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("lm_head.")}
    wrong = [k for k, v in state_dict.items() if k in own and v.shape != own[k].shape]
    if wrong:
        k = wrong[0]
        raise CheckpointError(
            f"--init_ckpt {path} is of another model size or image size: '{k}' has shape "
            f"{tuple(state_dict[k].shape)} there, {tuple(own[k].shape)} in this run's {name}"
            + (f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else "")
            + ": pass the --model (and --input_size) it was trained with, or another "
            "--init_ckpt")
    missing = [k for k in own if k not in state_dict and not k.endswith(_DERIVED_SUFFIXES)
               and not (other_vocab and k.startswith("lm_head."))]
    unexpected = [k for k in state_dict if k not in own]
    if missing or unexpected:
        finetuned = any(k.startswith(("fc_norm.", "head.")) for k in unexpected)
        raise CheckpointError(
            f"--init_ckpt {path} does not hold every weight of {name} and no other ("
            + "; ".join(f"{len(keys)} {what}: {some_names(keys, 6)}"
                        for what, keys in (("missing", missing), ("unexpected", unexpected))
                        if keys)
            + ")" + (": a fine-tuned classifier, not a masked-image-modelling checkpoint"
                     if finetuned else "")
            + f"; starting from it would leave part of the ViT random. Fix: {INIT_CKPT_FIX}")
    return state_dict, other_vocab


def check_init_checkpoint(model: str, path: str, img_size: int,
                          init_values: float | None) -> None:
    """run_pretraining.py's check of --init_ckpt before any image is read or tokenized
    (the default path is missing on a fresh clone): the file exists, reads, and fits
    `model` (`init_state_dict`, on a meta-device model: shapes only). Its tensors are
    memory-mapped, not read."""
    _require_init_file(path)
    with torch.device("meta"):
        target = build_pmad(model, vocab_size=1, img_size=img_size, init_values=init_values)
    init_state_dict(target, path, read_weights_file(path, mmap=True))


def _require_init_file(path: str) -> None:
    if not os.path.isfile(path):
        raise MissingFileError(
            f"--init_ckpt {path} not found: download beit_base_patch16_224_pt22k.pth (its "
            "link is in weights/README.md) into weights/, point --init_ckpt at it, or pass "
            "--no_init to train from scratch")


def load_init_checkpoint(model: nn.Module, path: str) -> None:
    """run_pretraining.py --init_ckpt: start from BEiT's self-supervised weights, every
    one of them (`init_state_dict`). Its head predicts DALL-E's 8,192 codes; with a
    tokenizer of another vocabulary size the head keeps its initial weights."""
    _require_init_file(path)
    state_dict, other_vocab = init_state_dict(model, path, read_weights_file(path))
    if other_vocab is not None:
        main_print(f"[init] {path}: its lm_head predicts {other_vocab} visual tokens, this "
                   f"run's tokenizer has {model.lm_head.weight.shape[0]}: the head starts "
                   "from random weights, every other layer from the file")
    load_state_dict_checked(model, state_dict, path)
    main_print(f"[init] {path}: loaded {len(state_dict)} tensors")
