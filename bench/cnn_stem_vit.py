"""The ViT of the CNN-stem figures of docs/heldout.md ("The ViT"): the demo's ViT-tiny
with its linear patch embedding replaced by ImageNet-trained EfficientNet-Lite0, frozen, up
to stride 16 (a hybrid ViT), then a trained 1 x 1 projection to the embedding width. The
demo's ViT starts from random weights; this one sees each visible patch through features
that already know natural images, to test whether a ViT that predicts its tokens better
makes PMAD better. The CNN sees the image with the masked patches' pixels set to 0 (the
normalised mean colour), so no visible patch's feature carries a masked patch's content
through the CNN's receptive field.

Registers the model as `vit_tiny_lite0_stem` and runs run_pretraining.py, run_test.py or
bench/score_variants.py with the arguments that follow, e.g. scripts/demo.sh's steps 4 and
5 on a tuning draw (its k-means tokenizer already fitted):

    w=main_seed0_area0.001-0.01 d=output_dir/demo/$w
    python bench/cnn_stem_vit.py run_pretraining.py --model vit_tiny_lite0_stem --no_init \
        --data_path data/demo_${w}_imagenet --tokenizer_model kmeans \
        --tokenizer_weight_path $d/kmeans_tokenizer.pth --output_dir output_dir/stem/$w \
        --epochs 30 --warmup_epochs 2 --batch_size 16 --lr 1.5e-3 \
        --dynamic_masking_start 15 --save_ckpt_freq 30 --num_workers 2 --no_auto_resume
    python bench/cnn_stem_vit.py run_test.py --model vit_tiny_lite0_stem \
        --ckpt output_dir/stem/$w/checkpoint-last.pth --tokenizer_model kmeans \
        --tokenizer_weight_path $d/kmeans_tokenizer.pth --protoflow_weights $d/protoflow.pt \
        --prototypes_dir $d/prototypes --data_path data/demo_${w}_mvtec --protocol clean \
        --output_dir output_dir/stem/$w/results

and, on a pooled tuning set scored by both ViTs (docs/heldout.md), their image AUROC gap:
`python bench/compare_worlds.py --same_test_images tiny=RESULTS_DIR stem=RESULTS_DIR`.
"""
from __future__ import annotations

import os
import runpy
import sys
from typing import Any

import torch
from torch import nn

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path.insert(0, ROOT)

import backbones  # noqa: E402
import modeling_pmad  # noqa: E402
from utils import UserError, cli  # noqa: E402

MODEL = "vit_tiny_lite0_stem"
BASE = "vit_tiny_patch16_224_8k_vocab"  # the demo's ViT, whose layout the stem's keeps
STEM_INDEX = 3  # Lite0's stride-16 stage: one feature vector per 16 x 16 patch
SCRIPTS = ("run_pretraining.py", "run_test.py", os.path.join("bench", "score_variants.py"))


class Lite0Stem(nn.Module):
    """Patch embedding (N, 3, H, W) -> (N, L, D) by frozen Lite0 on the masked image."""

    def __init__(self, embed_dim: int, img_size: int = 224, patch_size: int = 16) -> None:
        super().__init__()
        self.backbone = backbones.create_backbone("efficientnet_lite0", (STEM_INDEX,),
                                                  weights=backbones.lite0_weights_path())
        if self.backbone.feature_info.reduction()[0] != patch_size:
            raise ValueError(f"Lite0 stage {STEM_INDEX} does not have stride {patch_size}")
        self.img_size = (img_size, img_size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(self.backbone.feature_info.channels()[0], embed_dim, 1)
        self.bool_masked_pos: torch.Tensor | None = None  # set by CNNStemViT per forward

    def train(self, mode: bool = True) -> Lite0Stem:
        super().train(mode)
        self.backbone.eval()  # frozen: its batch-norm statistics are ImageNet's
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, p = x.shape[0], self.patch_size[0]
        masked = self.bool_masked_pos.view(n, 1, *self.grid_size)  # (N, 1, h, w)
        masked = masked.repeat_interleave(p, 2).repeat_interleave(p, 3)  # (N, 1, H, W)
        with torch.no_grad():
            features = self.backbone(x.masked_fill(masked, 0.0))[0]  # (N, C, h, w)
        return self.proj(features).flatten(2).transpose(1, 2)  # (N, L, D)


class CNNStemViT(modeling_pmad.VisionTransformerForMaskedImageModeling):
    """PMAD's ViT with Lite0Stem as its patch embedding; the mask reaches the stem first."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.patch_embed = Lite0Stem(self.embed_dim, kwargs.get("img_size", 224),
                                     kwargs.get("patch_size", 16))
        nn.init.trunc_normal_(self.patch_embed.proj.weight, std=self.init_std)
        nn.init.zeros_(self.patch_embed.proj.bias)

    def forward_features(self, x: torch.Tensor, bool_masked_pos: torch.Tensor,
                         masked_only: bool = False,
                         masked_index: torch.Tensor | None = None) -> torch.Tensor:
        self.patch_embed.bool_masked_pos = bool_masked_pos
        try:
            return super().forward_features(x, bool_masked_pos, masked_only, masked_index)
        finally:
            self.patch_embed.bool_masked_pos = None


def vit_tiny_lite0_stem(**kwargs: Any) -> CNNStemViT:
    """The demo's ViT-tiny in PMAD's layout, with the stem (what build_pmad calls)."""
    return CNNStemViT(**{**modeling_pmad.PMAD_LAYOUT, **modeling_pmad.MODEL_CONFIGS[BASE],
                         **kwargs})


def register() -> None:
    """Make `MODEL` a choice of every entry point's --model (they read PMAD_MODELS)."""
    modeling_pmad.MODEL_CONFIGS[MODEL] = modeling_pmad.MODEL_CONFIGS[BASE]
    modeling_pmad.PMAD_MODELS[MODEL] = vit_tiny_lite0_stem


def main(argv: list[str]) -> None:
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__)
        return
    if not argv or os.path.normpath(argv[0]) not in SCRIPTS:
        raise UserError(f"usage: python bench/cnn_stem_vit.py {{{','.join(SCRIPTS)}}} "
                        "[its arguments]")
    register()
    sys.path.insert(0, BENCH)
    sys.argv = [os.path.join(ROOT, argv[0]), *argv[1:]]
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    sys.exit(cli(lambda: main(sys.argv[1:])))
