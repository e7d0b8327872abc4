"""The published PMAD/BEiT reconstruction ViT as it computes, for speed baselines only.

Written from the facts in method.md section 2, in the style of the original code and
timm 0.3: the q/v biases are `cat`ed into one qkv bias in every call, q is scaled before
`q @ k^T`, the shared relative bias (fp32, (H, T, T)) is added to the logits, then an
explicit softmax and `@ v`; timm-0.3 DropPath (a floored uniform draw per sample), Mlp
(fc1, exact GELU, dropout, fc2, dropout), LayerNorm eps 1e-6; masked patches blended as
`x * (1 - w) + mask_token * w`. Same module tree and parameter names as
modeling_pmad.VisionTransformerForMaskedImageModeling, so `load_state_dict` of our model's
state dict works with strict=True. No initialisation beyond PyTorch's defaults: load
weights into it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["OriginalViT"]


class DropPath(nn.Module):
    def __init__(self, drop_prob: float) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1 - self.drop_prob
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        draw = (keep + torch.rand(shape, dtype=x.dtype, device=x.device)).floor_()
        return x.div(keep) * draw


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, attn_drop: float, proj_drop: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, rel_pos_bias: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape  # (N, T, D)
        bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias, requires_grad=False),
                          self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias)  # (N, T, 3D)
        qkv = qkv.reshape(n, t, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (N, H, T, hd) each
        q = q * self.scale
        attn = q @ k.transpose(-2, -1)  # (N, H, T, T)
        attn = attn + rel_pos_bias
        attn = self.attn_drop(attn.softmax(dim=-1))
        x = (attn @ v).transpose(1, 2).reshape(n, t, -1)  # (N, T, D)
        return self.proj_drop(self.proj(x))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop: float,
                 attn_drop: float, drop_path: float, init_values: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, attn_drop, drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        self.gamma_1 = nn.Parameter(init_values * torch.ones(dim))
        self.gamma_2 = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x: torch.Tensor, rel_pos_bias: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.gamma_1 * self.attn(self.norm1(x), rel_pos_bias))
        return x + self.drop_path(self.gamma_2 * self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, L, D)


class RelativePositionBias(nn.Module):
    def __init__(self, grid: int, num_heads: int) -> None:
        super().__init__()
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * grid - 1) ** 2 + 3, num_heads))
        t = grid * grid + 1
        self.register_buffer("relative_position_index", torch.zeros(t, t, dtype=torch.long))

    def forward(self) -> torch.Tensor:
        t = self.relative_position_index.shape[0]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(t, t, -1).permute(2, 0, 1).contiguous()  # (H, T, T)


class OriginalViT(nn.Module):
    """BEiT masked image modelling with a shared relative bias and no absolute positions."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, vocab_size: int = 8192,
                 embed_dim: int = 768, depth: int = 12, num_heads: int = 12,
                 mlp_ratio: float = 4.0, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.1, init_values: float = 0.1) -> None:
        super().__init__()
        grid = img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        self.rel_pos_bias = RelativePositionBias(grid, num_heads)
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, depth)]
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, drop_rate, attn_drop_rate, dpr[i],
                  init_values) for i in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.lm_head = nn.Linear(embed_dim, vocab_size)

    def forward_features(self, x: torch.Tensor, bool_masked_pos: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)  # (N, L, D)
        n, num_patches, _ = x.shape
        cls_tokens = self.cls_token.expand(n, -1, -1)
        mask_token = self.mask_token.expand(n, num_patches, -1)
        w = bool_masked_pos.unsqueeze(-1).type_as(mask_token)  # (N, L, 1)
        x = x * (1 - w) + mask_token * w
        x = self.pos_drop(torch.cat((cls_tokens, x), dim=1))  # (N, T, D)
        rel_pos_bias = self.rel_pos_bias()  # (H, T, T)
        for blk in self.blocks:
            x = blk(x, rel_pos_bias)
        return self.norm(x)

    def forward(self, x: torch.Tensor, bool_masked_pos: torch.Tensor,
                return_all_tokens: bool = False) -> torch.Tensor:
        x = self.forward_features(x, bool_masked_pos)[:, 1:]  # (N, L, D)
        if return_all_tokens:
            return self.lm_head(x)  # (N, L, V)
        return self.lm_head(x[bool_masked_pos])  # (M, V)
