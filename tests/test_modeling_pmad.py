"""The reconstruction ViT: released key layout, numerics, masking, checkpoint loading."""
from __future__ import annotations

import argparse
import logging
import math
import os
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.beit import Beit, gen_relative_position_index

import modeling_pmad
from conftest import read_format
from bench.original_beit import OriginalViT
from modeling_pmad import (Block, bf16_supported, load_checkpoint, relative_position_index,
                           scaled_dot_product, set_fused_attn, unwrap_state_dict)
import utils
from utils import CheckpointError

PMAD_KWARGS = dict(pretrained=False, drop_path_rate=0.1, use_shared_rel_pos_bias=True,
                   use_abs_pos_emb=False, init_values=0.1)
TINY = "vit_tiny_patch16_224_8k_vocab"


def build(name: str = TINY, **kwargs) -> torch.nn.Module:
    return timm.create_model(name, **{**PMAD_KWARGS, **kwargs})


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial values everywhere (biases, gammas and the bias table start constant)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model


def rows_of(state_dict: dict[str, torch.Tensor]) -> list[tuple[str, tuple[int, ...], str]]:
    return [(k, tuple(v.shape), str(v.dtype).removeprefix("torch."))
            for k, v in state_dict.items()]


# ------------------------------------------------------------------- layout and config

@pytest.mark.parametrize("name, fmt", [("vit_base_patch16_224_8k_vocab", "pmad_vit_base.txt"),
                                       ("vit_large_patch16_224_8k_vocab", "pmad_vit_large.txt")])
def test_state_dict_equals_released_format(name, fmt):
    with torch.device("meta"):  # keys and shapes only: no memory, no init time
        model = build(name)
    assert rows_of(model.state_dict()) == read_format(fmt)


def test_base_checkpoint_file_round_trip(tmp_path):
    """A random-weight file in the released layout, read back through load_checkpoint."""
    source = build("vit_base_patch16_224_8k_vocab")
    path = tmp_path / "beit_base_patch16_224_pt22k.pth"
    torch.save({"model": source.state_dict()}, path)
    assert rows_of(torch.load(path, weights_only=True, mmap=True)["model"]) == \
        read_format("pmad_vit_base.txt")
    target = build("vit_base_patch16_224_8k_vocab")
    assert load_checkpoint(target, path, strict=True) == {"missing": [], "unexpected": []}
    assert torch.equal(target.lm_head.weight, source.lm_head.weight)
    assert torch.equal(target.blocks[11].attn.qkv.weight, source.blocks[11].attn.qkv.weight)
    # and as run_pretraining.py's --init_ckpt (BEiT's pt22k file has exactly these keys)
    modeling_pmad.check_init_checkpoint("vit_base_patch16_224_8k_vocab", str(path), 224, None)
    fresh = build("vit_base_patch16_224_8k_vocab", depth=0)  # every key but the blocks'
    with pytest.raises(CheckpointError, match="180 unexpected: blocks.0.gamma_1"):
        modeling_pmad.load_init_checkpoint(fresh, str(path))
    with torch.no_grad():
        target.blocks[11].attn.qkv.weight.zero_()
    modeling_pmad.load_init_checkpoint(target, str(path))
    assert torch.equal(target.blocks[11].attn.qkv.weight, source.blocks[11].attn.qkv.weight)


def _file_of_format(path: Path, fmt: str) -> Path:
    """A file with exactly the keys, shapes and dtypes of a released file's key list,
    every tensor a zero-stride view of one element (a few bytes on disk)."""
    dtypes = {"float32": torch.float32, "int64": torch.int64}
    torch.save({"model": {k: torch.zeros((), dtype=dtypes[d]).expand(shape)
                          for k, shape, d in read_format(fmt)}}, path)
    return path


@pytest.mark.parametrize("name, fmt", [("vit_base_patch16_224_8k_vocab", "pmad_vit_base.txt"),
                                       ("vit_large_patch16_224_8k_vocab", "pmad_vit_large.txt")])
def test_init_ckpt_check_takes_beits_released_layout_and_refuses_another_size(tmp_path, name,
                                                                             fmt):
    """BEiT's pt22k files (the keys of tests/formats, as PMAD's released ones) pass
    run_pretraining.py's --init_ckpt check for their own model, before any image is read;
    for the other size the first differing shape and --model are named."""
    path = str(_file_of_format(tmp_path / "beit_pt22k.pth", fmt))
    modeling_pmad.check_init_checkpoint(name, path, 224, None)
    other = ("vit_large_patch16_224_8k_vocab" if "base" in name
             else "vit_base_patch16_224_8k_vocab")
    with pytest.raises(CheckpointError) as err:
        modeling_pmad.check_init_checkpoint(other, path, 224, None)
    width, other_width = (768, 1024) if "base" in name else (1024, 768)
    assert str(err.value).startswith(
        f"--init_ckpt {path} is of another model size or image size: 'cls_token' has shape "
        f"(1, 1, {width}) there, (1, 1, {other_width}) in this run's "
        "VisionTransformerForMaskedImageModeling")
    assert str(err.value).endswith(": pass the --model (and --input_size) it was trained "
                                   "with, or another --init_ckpt")


def _finetuned_beit(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`model`'s weights as BEiT's fine-tuned classifiers store them: a relative position
    table per block instead of the shared one, fc_norm and a classification head instead
    of norm and lm_head, no mask token."""
    sd = {k: v for k, v in model.state_dict().items()
          if not k.startswith(("rel_pos_bias.", "norm.", "lm_head.", "mask_token"))}
    table = model.state_dict()["rel_pos_bias.relative_position_bias_table"]
    sd.update({f"blocks.{i}.attn.relative_position_bias_table": table
               for i in range(len(model.blocks))})
    dim = model.embed_dim
    sd.update({"fc_norm.weight": torch.ones(dim), "fc_norm.bias": torch.zeros(dim),
               "head.weight": torch.zeros(1000, dim), "head.bias": torch.zeros(1000)})
    return sd


def test_init_ckpt_refuses_a_partial_load(tmp_path):
    """A BEiT fine-tuned classifier, or a file missing half the blocks, would start
    training from a half-random ViT: refused, naming the file, the keys and the fix."""
    model = build(depth=2)
    finetuned = tmp_path / "beit_base_patch16_224_pt22k_ft22k.pth"
    torch.save({"model": _finetuned_beit(model)}, finetuned)
    target = build(depth=2)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        modeling_pmad.load_init_checkpoint(target, str(finetuned))
    assert str(err.value) == (
        f"--init_ckpt {finetuned} does not hold every weight of "
        "VisionTransformerForMaskedImageModeling and no other (6 missing: mask_token, "
        "rel_pos_bias.relative_position_bias_table, norm.weight, norm.bias, lm_head.weight, "
        "lm_head.bias; 6 unexpected: blocks.0.attn.relative_position_bias_table, "
        "blocks.1.attn.relative_position_bias_table, fc_norm.weight, fc_norm.bias, "
        "head.weight, head.bias): a fine-tuned classifier, not a masked-image-modelling "
        "checkpoint; starting from it would leave part of the ViT random. Fix: pass "
        "--init_ckpt BEiT's self-supervised ImageNet-22k checkpoint of this --model "
        "(beit_base_patch16_224_pt22k.pth for the base model; weights/README.md) or a PMAD "
        "training checkpoint, or --no_init to train from scratch")
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())
    half = tmp_path / "half.pth"
    torch.save({"model": {k: v for k, v in model.state_dict().items()
                          if not k.startswith("blocks.1.")}}, half)
    with pytest.raises(CheckpointError, match=r"\(15 missing: blocks.1.gamma_1, "
                                              r"blocks.1.gamma_2, .*, \.\.\. 9 more\)"):
        modeling_pmad.load_init_checkpoint(target, str(half))
    with pytest.raises(CheckpointError, match=f"--init_ckpt {half} does not hold"):
        modeling_pmad.check_init_checkpoint(TINY, str(half), 224, None)


def test_init_ckpt_lm_head_of_another_width_is_another_model_not_a_vocabulary(tmp_path):
    """The head is left out only when its rows (the vocabulary) differ; another width is
    another model, named as one (not "visual tokens")."""
    path = tmp_path / "small.pth"
    torch.save({"model": build("vit_small_patch16_224_8k_vocab", depth=1).state_dict()}, path)
    with pytest.raises(CheckpointError) as err:
        modeling_pmad.load_init_checkpoint(build(depth=1), str(path))
    assert "is of another model size or image size: 'cls_token' has shape (1, 1, 384) " \
        "there, (1, 1, 192)" in str(err.value) and "visual tokens" not in str(err.value)


def test_init_ckpt_check_builds_the_runs_image_size_and_layer_scale(tmp_path):
    """run_pretraining.py's early check of --init_ckpt fits the run's own model: another
    --input_size (another relative position table) and --layer_scale_init_value 0 (no
    gammas to load the file's into) are refused before any image is tokenized, as the
    load itself would refuse them later."""
    path = tmp_path / "beit.pth"
    torch.save({"model": build().state_dict()}, path)
    modeling_pmad.check_init_checkpoint(TINY, str(path), 224, 0.1)
    with pytest.raises(CheckpointError) as err:
        modeling_pmad.check_init_checkpoint(TINY, str(path), 112, None)
    assert ("is of another model size or image size: 'rel_pos_bias.relative_position_bias_"
            "table' has shape (732, 3) there, (172, 3) in this run's") in str(err.value)
    with pytest.raises(CheckpointError) as err:
        modeling_pmad.check_init_checkpoint(TINY, str(path), 224, 0.0)
    assert "(24 unexpected: blocks.0.gamma_1, blocks.0.gamma_2, blocks.1.gamma_1, " \
        "blocks.1.gamma_2, blocks.2.gamma_1, blocks.2.gamma_2, ... 18 more)" in str(err.value)


@pytest.mark.parametrize("name, dim, heads", [(TINY, 192, 3),
                                              ("vit_small_patch16_224_8k_vocab", 384, 6)])
def test_small_configs(name, dim, heads):
    with torch.device("meta"):
        model = build(name)
    assert (model.embed_dim, len(model.blocks), model.blocks[0].attn.num_heads) == (dim, 12, heads)
    assert model.vocab_size == model.lm_head.out_features == 8192
    assert model.patch_embed.grid_size == (14, 14) and model.patch_embed.num_patches == 196
    assert model.patch_embed.patch_size == (16, 16)
    assert model.pos_embed is None and model.rel_pos_bias is not None


def test_pretrained_download_refused():
    with pytest.raises(ValueError, match="load_checkpoint"):
        timm.create_model(TINY, pretrained=True)


@torch.no_grad()
def test_init():
    model = build(depth=4)
    assert torch.equal(model.blocks[0].gamma_1, torch.full((192,), 0.1))
    assert torch.equal(model.blocks[3].attn.q_bias, torch.zeros(192))
    assert torch.equal(model.rel_pos_bias.relative_position_bias_table, torch.zeros(732, 3))
    assert 0.015 < model.mask_token.std() < 0.025 and model.mask_token.abs().max() <= 0.04
    # block i (from 1) has its residual projections divided by sqrt(2 i)
    for layer in ("mlp.fc2", "attn.proj"):
        first, last = (model.blocks[i].get_submodule(layer).weight.std() for i in (0, 3))
        assert first / last == pytest.approx(math.sqrt(4), rel=0.05), layer
        # and the first block's by sqrt(2), against the undivided qkv weights of that block
        qkv = model.blocks[0].attn.qkv.weight.std()
        assert first / qkv == pytest.approx(1 / math.sqrt(2), rel=0.05), layer
    assert model.no_weight_decay() == {"pos_embed", "cls_token"}


def test_relative_position_index_formula():
    index = relative_position_index((14, 14))
    i = torch.arange(196)
    hi, wi = (i // 14)[:, None], (i % 14)[:, None]
    hj, wj = (i // 14)[None, :], (i % 14)[None, :]
    assert torch.equal(index[1:, 1:], (hi - hj + 13) * 27 + (wi - wj + 13))
    assert (index[0, 1:] == 729).all() and (index[1:, 0] == 730).all() and index[0, 0] == 731
    # a grid that is not square (a non-square input) indexes the table as timm's BEiT does
    assert torch.equal(relative_position_index((2, 3)), gen_relative_position_index((2, 3)))
    assert sorted(set(relative_position_index((2, 3))[1:, 1:].flatten().tolist())) == list(
        range(15))


def test_image_size_is_a_parameter():
    model = build(img_size=96, depth=2).eval()
    assert model.patch_embed.grid_size == (6, 6)
    assert model.rel_pos_bias.relative_position_bias_table.shape == (11 * 11 + 3, 3)
    assert model.rel_pos_bias.relative_position_index.shape == (37, 37)
    mask = torch.zeros(2, 36, dtype=torch.bool)
    mask[:, :5] = True
    assert model(torch.randn(2, 3, 96, 96), mask).shape == (10, 8192)
    with pytest.raises(ValueError, match="img_size=224"):
        model(torch.randn(1, 3, 224, 224), torch.zeros(1, 196, dtype=torch.bool))


def test_mask_must_be_bool_of_grid_shape():
    model = build(depth=1).eval()
    x = torch.randn(1, 3, 224, 224)
    with pytest.raises(ValueError, match="bool"):
        model(x, torch.zeros(1, 196, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(1, 196\)"):
        model(x, torch.zeros(1, 195, dtype=torch.bool))


# ------------------------------------------------------------------------------ numerics

@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return randomize_(build(depth=3)).eval()


def test_masked_logits_are_masked_rows_of_all_tokens(tiny):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 3, 224, 224, generator=gen)
    mask = torch.rand(3, 196, generator=gen) < torch.tensor([[0.1], [0.4], [0.7]])
    with torch.no_grad():
        masked = tiny(x, mask)
        full = tiny(x, mask, return_all_tokens=True)
    assert masked.shape == (int(mask.sum()), 8192) and full.shape == (3, 196, 8192)
    torch.testing.assert_close(masked, full[mask], rtol=0, atol=1e-5)


def test_masked_patch_content_is_hidden(tiny):
    """A masked patch's pixels reach no output; an unmasked patch's do."""
    x = torch.randn(1, 3, 224, 224)
    mask = torch.zeros(1, 196, dtype=torch.bool)
    mask[0, 20] = True  # patch (1, 6): rows 16-31, columns 96-111
    y = x.clone()
    y[..., 16:32, 96:112] += 3.0
    z = x.clone()
    z[..., 0:16, 0:16] += 3.0  # patch 0, visible
    with torch.no_grad():
        ref = tiny(x, mask, return_all_tokens=True)
        assert torch.equal(tiny(y, mask, return_all_tokens=True), ref)
        assert (tiny(z, mask, return_all_tokens=True) - ref).abs().max() > 1e-2


def attention_inputs(dtype: torch.dtype = torch.float32, requires_grad: bool = False):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 50, 16, generator=gen).to(dtype).requires_grad_(requires_grad)
               for _ in range(3))  # (N, H, T, hd)
    bias = torch.randn(4, 50, 50, generator=gen).requires_grad_(requires_grad)  # (H, T, T)
    return q, k, v, bias


def test_fused_attention_equals_explicit_softmax():
    """Without gradients the CPU runs SDPA's fused kernel; explicit=True the softmax form."""
    q, k, v, bias = attention_inputs()
    fused = scaled_dot_product(q, k, v, bias, 0.25)
    explicit = scaled_dot_product(q, k, v, bias, 0.25, explicit=True)
    reference = torch.softmax(q @ k.transpose(-2, -1) * 0.25 + bias, dim=-1) @ v
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(explicit, reference, rtol=1e-5, atol=1e-5)


def test_attention_gradients_equal_torch_sdpa():
    """With a bias that needs a gradient the CPU runs the explicit form; its gradients for
    q, k, v and the bias equal those of torch's own SDPA (its math path)."""
    grads = []
    for ours in (True, False):
        q, k, v, bias = attention_inputs(requires_grad=True)
        if ours:
            out = scaled_dot_product(q, k, v, bias, 0.25)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.unsqueeze(0),
                                                 scale=0.25)
        out.square().sum().backward()
        grads.append([t.grad for t in (q, k, v, bias)])
    for ours, reference in zip(*grads):
        torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("requires_grad", [False, True])
def test_bf16_attention_on_cpu(requires_grad):
    """bf16 inputs: computed in fp32 where bf16 matmuls do not pay on this CPU."""
    q, k, v, bias = attention_inputs(torch.bfloat16, requires_grad)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = scaled_dot_product(q, k, v, bias, 0.25)
    expected_dtype = torch.bfloat16 if bf16_supported("cpu") else torch.float32
    assert out.dtype == expected_dtype
    reference = torch.softmax(q.float() @ k.float().transpose(-2, -1) * 0.25 + bias.float(),
                              dim=-1) @ v.float()
    tol = 0.0 if expected_dtype == torch.float32 else 0.02
    assert (out.float() - reference).abs().max() <= tol + 1e-5


def test_model_sdpa_equals_explicit_softmax(tiny):
    x = torch.randn(2, 3, 224, 224)
    mask = torch.rand(2, 196) < 0.3
    with torch.no_grad():
        fused = tiny(x, mask, return_all_tokens=True)
        set_fused_attn(tiny, False)
        try:
            explicit = tiny(x, mask, return_all_tokens=True)
        finally:
            set_fused_attn(tiny, True)
    torch.testing.assert_close(fused, explicit, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("grad", [False, True])
def test_encoder_equals_timm_beit(tiny, grad):
    """Independent reference: timm's BEiT with the same weights gives the same tokens,
    with the fused attention kernel (no grad) and the explicit form (grad)."""
    ref = Beit(img_size=224, embed_dim=192, depth=3, num_heads=3, init_values=0.1,
               use_abs_pos_emb=False, use_shared_rel_pos_bias=True, global_pool="token",
               num_classes=0).eval()
    missing, unexpected = ref.load_state_dict(tiny.state_dict(), strict=False)
    assert missing == []
    assert sorted(unexpected) == ["lm_head.bias", "lm_head.weight", "mask_token",
                                  "rel_pos_bias.relative_position_index"]
    x = torch.randn(2, 3, 224, 224)
    with torch.set_grad_enabled(grad):
        ours = tiny.forward_features(x, torch.zeros(2, 196, dtype=torch.bool))
        torch.testing.assert_close(ours, ref.forward_features(x), rtol=1e-4, atol=1e-4)


def test_original_style_baseline_is_the_same_network():
    """bench/original_beit.py (the speed baseline) loads our state dict unchanged and
    gives the same masked-token logits and gradients."""
    ours = randomize_(build(depth=2)).eval()
    original = OriginalViT(embed_dim=192, depth=2, num_heads=3).eval()
    original.load_state_dict(ours.state_dict(), strict=True)
    gen = torch.Generator().manual_seed(2)
    x, mask = torch.randn(2, 3, 224, 224, generator=gen), torch.rand(2, 196, generator=gen) < 0.4
    outs = []
    for model in (ours, original):
        logits = model(x, mask)
        logits.square().mean().backward()
        outs.append((logits.detach(), {n: p.grad for n, p in model.named_parameters()}))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-4, atol=1e-5)
    assert outs[0][1].keys() == outs[1][1].keys()
    for name, grad in outs[0][1].items():
        torch.testing.assert_close(grad, outs[1][1][name], rtol=1e-3, atol=1e-6, msg=name)


def test_masked_only_path_equals_all_tokens_in_training():
    """The last block runs its projection and MLP on the masked rows only: same logits,
    stochastic depth (same draws) and gradients as taking those rows of all tokens."""
    model = randomize_(build(depth=2, drop_path_rate=0.5)).train()
    gen = torch.Generator().manual_seed(4)
    x, mask = torch.randn(4, 3, 224, 224, generator=gen), torch.rand(4, 196, generator=gen) < 0.4
    outs = []
    for all_tokens in (False, True):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(5)
        logits = model(x, mask, return_all_tokens=all_tokens)
        logits = logits[mask] if all_tokens else logits
        logits.square().mean().backward()
        outs.append((logits.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-5)
    for ours, reference in zip(outs[0][1], outs[1][1]):
        torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-6)


def test_drop_path_drops_whole_samples():
    """Stochastic depth: a sample's branch is dropped entirely or scaled by 1 / keep."""
    torch.manual_seed(0)
    block = Block(32, 4, drop_path=0.5, init_values=0.5)
    with torch.no_grad():
        block.mlp.fc2.weight.zero_()  # the MLP branch adds nothing: only attention's shows
        block.mlp.fc2.bias.zero_()
    x = torch.randn(16, 10, 32)
    with torch.no_grad():
        branch = block.eval()(x) - x  # gamma * attention, (16, 10, 32)
        torch.manual_seed(1)
        trained = block.train()(x) - x
    kept = trained.flatten(1).abs().amax(1) > 0  # (16,)
    assert 0 < kept.sum() < 16
    torch.testing.assert_close(trained[kept], 2 * branch[kept], rtol=1e-5, atol=1e-6)
    assert torch.equal(trained[~kept], torch.zeros_like(trained[~kept]))


def test_drop_path_rate_rises_linearly_over_the_blocks():
    """BEiT's stochastic-depth rule: block i of d drops its branches with probability
    drop_path_rate * i / (d - 1), none in the first block, the full rate in the last."""
    with torch.device("meta"):
        model = build(depth=4, drop_path_rate=0.3)
    assert [blk.drop_path for blk in model.blocks] == pytest.approx([0.0, 0.1, 0.2, 0.3])


def test_drop_path_only_in_train_mode():
    model = randomize_(build(depth=2, drop_path_rate=0.5))
    x, mask = torch.randn(2, 3, 224, 224), torch.zeros(2, 196, dtype=torch.bool)
    with torch.no_grad():
        model.train()
        torch.manual_seed(0)
        a = model(x, mask, return_all_tokens=True)
        torch.manual_seed(1)
        b = model(x, mask, return_all_tokens=True)
        model.eval()
        assert not torch.equal(a, b)
        assert torch.equal(model(x, mask, return_all_tokens=True),
                           model(x, mask, return_all_tokens=True))


def test_bf16_autocast_close_to_fp32(tiny):
    # Its own inputs: drawn from the global stream, they depended on the draws of the
    # tests before it, and about 1 input in 10 has near-tied logits whose argmax bf16
    # flips on more than a tenth of the patches (a stochastic-depth mutation that only
    # drew one more number in an earlier test failed this test, not its own).
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 224, 224, generator=gen)
    mask = torch.rand(2, 196, generator=gen) < 0.4
    with torch.no_grad():
        ref = tiny(x, mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = tiny(x, mask)
    assert low.dtype == torch.bfloat16
    assert (low.float() - ref).abs().max() < 0.1 * ref.std()
    assert (low.float().argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


# ------------------------------------------------------------------- checkpoint loading

@pytest.fixture(scope="module")
def source_model():
    return randomize_(build(depth=2), seed=3)


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("layout", ["model", "module", "bare", "ddp"])
def test_load_checkpoint_layouts(tmp_path, source_model, layout):
    """'ddp': saved from the DistributedDataParallel wrapper (`model.state_dict()`, not
    the wrapped module's), every key 'module.<key>': the same weights, not another
    model's."""
    sd = source_model.state_dict()
    path = tmp_path / "ckpt.pth"
    if layout == "ddp":
        sd = {f"module.{k}": v for k, v in sd.items()}
        assert "module.blocks.0.attn.qkv.weight" in sd
    torch.save(sd if layout == "bare" else {"module" if layout == "module" else "model": sd},
               path)
    target = build(depth=2)
    assert load_checkpoint(target, path, strict=True) == {"missing": [], "unexpected": []}
    assert_same_weights(target, source_model)
    if layout == "ddp":  # as --init_ckpt too
        loaded = build(depth=2)
        modeling_pmad.load_init_checkpoint(loaded, str(path))
        assert_same_weights(loaded, source_model)


def test_load_pmad_training_checkpoint(tmp_path, source_model):
    """PMAD saves model, optimizer, epoch, scaler and args (an argparse.Namespace)."""
    model = build(depth=2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()  # fills the optimizer state with tensors
    path = tmp_path / "checkpoint-19.pth"
    torch.save({"model": source_model.state_dict(), "optimizer": opt.state_dict(), "epoch": 19,
                "scaler": torch.amp.GradScaler("cpu").state_dict(),
                "args": argparse.Namespace(model="vit_base_patch16_224_8k_vocab", lr=1.5e-3,
                                           data_path="data/Mvtec-ImageNet", mask_ratio=0.3)},
               path)
    target = build(depth=2)
    assert load_checkpoint(target, path, strict=True) == {"missing": [], "unexpected": []}
    assert_same_weights(target, source_model)


def test_missing_and_unexpected_are_reported(tmp_path, source_model, caplog):
    sd = dict(source_model.state_dict())
    del sd["lm_head.weight"], sd["rel_pos_bias.relative_position_index"]
    sd["blocks.0.attn.relative_position_bias_table"] = torch.zeros(732, 3)
    path = tmp_path / "partial.pth"
    torch.save({"model": sd}, path)
    target = build(depth=2)
    with caplog.at_level(logging.WARNING, logger="modeling_pmad"):
        report = load_checkpoint(target, path)
    # the index buffer is rebuilt from the grid, so it is not missing
    assert report == {"missing": ["lm_head.weight"],
                      "unexpected": ["blocks.0.attn.relative_position_bias_table"]}
    assert "lm_head.weight" in caplog.text
    assert "blocks.0.attn.relative_position_bias_table" in caplog.text
    assert torch.equal(target.lm_head.bias, source_model.lm_head.bias)
    with pytest.raises(ValueError, match="lm_head.weight"):
        load_checkpoint(build(depth=2), path, strict=True)
    # every key plus one the model lacks: reported, and refused under strict
    extra = tmp_path / "extra.pth"
    torch.save({"model": {**source_model.state_dict(), "foo.weight": torch.zeros(2)}}, extra)
    assert load_checkpoint(build(depth=2), extra) == {"missing": [],
                                                      "unexpected": ["foo.weight"]}
    with pytest.raises(CheckpointError, match=r"missing \[\], unexpected \['foo.weight'\]"):
        load_checkpoint(build(depth=2), extra, strict=True)


def test_a_checkpoint_with_model_and_module_loads_model():
    """BEiT's checkpoints keep the weights under 'model'; one that holds a 'module' too
    (a DDP copy) loads 'model', as the original's loader reads it first."""
    a, b = {"w": torch.zeros(1)}, {"w": torch.ones(1)}
    assert unwrap_state_dict({"module": b, "model": a}, "ck.pth") is a


def test_shape_mismatch_names_key_and_shapes(tmp_path):
    path = tmp_path / "small.pth"
    torch.save({"model": build("vit_small_patch16_224_8k_vocab", depth=1).state_dict()}, path)
    with pytest.raises(ValueError) as err:
        load_checkpoint(build(depth=1), path)
    msg = str(err.value)
    assert str(path) in msg and "'cls_token'" in msg
    assert "(1, 1, 384)" in msg and "(1, 1, 192)" in msg
    assert msg.endswith("a checkpoint of a different model (size or image size); pass the "
                        "--model (and --input_size) it was trained with")


def test_checkpoint_of_another_model_is_an_error(tmp_path):
    path = tmp_path / "vit_tokenizer.pth"
    torch.save({"model": {"encoder.cls_token": torch.zeros(1, 1, 192),
                          "quantize.embedding.weight": torch.zeros(8, 32)}}, path)
    with pytest.raises(ValueError, match="shares no key"):
        load_checkpoint(build(depth=1), path)
    torch.save({"optimizer": {}, "epoch": 3}, path)
    with pytest.raises(ValueError, match="holds no state dict") as err:
        load_checkpoint(build(depth=1), path)
    assert "ProtoFlow" not in str(err.value)
    torch.save({"encoder_state_dict": {}, "decoder_state_dict": {}}, path)  # its layout
    with pytest.raises(ValueError) as err:
        load_checkpoint(build(depth=1), path)
    assert str(err.value).endswith("found ['decoder_state_dict', 'encoder_state_dict']; it is "
                                   "a ProtoFlow file (run_test.py and predict.py take it as "
                                   "--protoflow_weights)")


@pytest.mark.parametrize("legacy", [False, True])
def test_truncated_checkpoint_names_file(tmp_path, source_model, legacy):
    path = tmp_path / "truncated.pth"
    torch.save({"model": source_model.state_dict()}, path,
               _use_new_zipfile_serialization=not legacy)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated.pth.*Download it again"):
        load_checkpoint(build(depth=2), path)


def test_non_checkpoint_and_missing_file(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("not a checkpoint\n")
    with pytest.raises(ValueError, match="notes.pth"):
        load_checkpoint(build(depth=1), path)
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        load_checkpoint(build(depth=1), tmp_path / "absent.pth")


class _Hostile:
    """Unpickling this would run a shell command."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return os.system, (f"touch {self.sentinel}",)


def test_hostile_pickle_is_refused(tmp_path, source_model):
    sentinel = tmp_path / "pwned"
    path = tmp_path / "hostile.pth"
    torch.save({"model": source_model.state_dict(), "args": _Hostile(sentinel)}, path)
    with pytest.raises(ValueError, match=r"hostile.pth contains the Python object "
                                         r"'(posix|os)\.system'.*refusing"):
        load_checkpoint(build(depth=2), path)
    assert not sentinel.exists()


def test_only_namespace_is_allowed_besides_tensors(tmp_path, source_model):
    path = tmp_path / "odd_args.pth"
    torch.save({"model": source_model.state_dict(), "args": Path("x")}, path)
    with pytest.raises(ValueError, match="odd_args.pth contains the Python object 'pathlib"):
        load_checkpoint(build(depth=2), path)


# ------------------------------------------------------------ builder and eval settings
def test_build_pmad_is_the_paper_layout():
    from modeling_pmad import build_pmad
    model = build_pmad(TINY, vocab_size=40, img_size=112, init_values=0.05, drop_path_rate=0.1)
    assert model.patch_embed.num_patches == 49 and model.lm_head.out_features == 40
    assert model.pos_embed is None and model.rel_pos_bias is not None
    assert torch.all(model.blocks[3].gamma_2 == 0.05)
    assert model.blocks[-1].drop_path == pytest.approx(0.1)
    assert torch.all(build_pmad(TINY, vocab_size=8).blocks[0].gamma_1 == 0.1)  # its own
    assert build_pmad(TINY, vocab_size=8, init_values=0).blocks[0].gamma_1 is None
    with pytest.raises(utils.FlagError, match=r"unknown model 'vit_huge' \(--model\): "
                       "choose one of.*vit_base_patch16"):
        build_pmad("vit_huge", vocab_size=8)


def test_training_keeps_each_models_own_layer_scale(monkeypatch):
    """run_pretraining.py's default --layer_scale_init_value leaves each model its own
    layer scale: 0.1 up to base, 1e-5 for large (docs/method.md 2), not base's 0.1 for
    all; the large ViT is built as kwargs only, to skip its 300 M parameters."""
    import modeling_pmad
    import run_pretraining
    args = run_pretraining.get_args_parser().parse_args(["--data_path", "x"])
    assert args.layer_scale_init_value is None
    monkeypatch.setattr(modeling_pmad, "VisionTransformerForMaskedImageModeling", dict)
    built = {m: modeling_pmad.build_pmad(m, vocab_size=8, init_values=args.layer_scale_init_value)
             for m in modeling_pmad.PMAD_MODELS}
    assert {m: kw["init_values"] for m, kw in built.items()} == {
        TINY: 0.1, "vit_small_patch16_224_8k_vocab": 0.1, "vit_base_patch16_224_8k_vocab": 0.1,
        "vit_large_patch16_224_8k_vocab": 1e-5}
    # the layouts of ViT-Ti/S/B/L, patch 16 (run_pretraining reads the patch size here)
    assert {m: (kw["patch_size"], kw["embed_dim"], kw["depth"], kw["num_heads"])
            for m, kw in built.items()} == {
        TINY: (16, 192, 12, 3), "vit_small_patch16_224_8k_vocab": (16, 384, 12, 6),
        "vit_base_patch16_224_8k_vocab": (16, 768, 12, 12),
        "vit_large_patch16_224_8k_vocab": (16, 1024, 24, 16)}


def _eval_checkpoint(path: Path, args) -> Path:
    torch.save({"model": {"lm_head.weight": torch.zeros(40, 8)}, "epoch": 3,
                **({} if args is None else {"args": args})}, path)
    return path


@pytest.mark.parametrize("kind", ["ours", "original"])
def test_eval_config_from_checkpoint_args(tmp_path, kind):
    """Our checkpoints store args as a dict, the original's as an argparse.Namespace: both
    are read without unpickling anything else."""
    from modeling_pmad import checkpoint_vocab_size, resolve_eval_config
    from utils import read_weights_file
    saved = dict(model=TINY, input_size=112, layer_scale_init_value=0.05,
                 imagenet_default_mean_and_std=False, tokenizer_model="kmeans", lr=1e-3)
    args = saved if kind == "ours" else argparse.Namespace(**saved)
    path = _eval_checkpoint(tmp_path / "ckpt.pth", args)
    checkpoint = read_weights_file(path)
    none = dict(model=None, input_size=None, layer_scale_init_value=None,
                imagenet_default_mean_and_std=None, tokenizer_model=None, ckpt="x")
    config, notes = resolve_eval_config(none, checkpoint, path)
    assert config == {k: saved[k] for k in config} and len(config) == 5
    assert len(notes) == 1 and "stores its training arguments" in notes[0]
    assert checkpoint_vocab_size(checkpoint, path) == 40
    # explicit flags win; each one that differs is reported, on one line
    given = {**none, "input_size": 112, "imagenet_default_mean_and_std": True,
             "tokenizer_model": "dall-e"}
    config, notes = resolve_eval_config(given, checkpoint, path)
    assert config["imagenet_default_mean_and_std"] and config["tokenizer_model"] == "dall-e"
    assert config["input_size"] == 112 and config["model"] == TINY
    assert notes[0] == (f"{path} stores its training arguments; evaluating with {config} "
                        "(given flags, else the checkpoint's)")  # the settings used, flags in
    assert notes[1] == ("given flags override the checkpoint's training arguments: "
                        "--imagenet_default_mean_and_std True (checkpoint: False), "
                        "--tokenizer_model dall-e (checkpoint: kmeans)")
    # a given flag that is falsy (False, 0) still wins over the checkpoint's value
    falsy = {**none, "imagenet_default_mean_and_std": False, "layer_scale_init_value": 0.0}
    config, _ = resolve_eval_config(falsy, read_weights_file(_eval_checkpoint(
        tmp_path / "true.pth", {**saved, "imagenet_default_mean_and_std": True})), path)
    assert config["imagenet_default_mean_and_std"] is False
    assert config["layer_scale_init_value"] == 0.0


def test_a_model_name_the_checkpoint_stores_but_no_code_builds_names_it_and_model(tmp_path):
    """The name comes from the file, not from a flag: the error says which checkpoint
    stored it and to pass --model; a given --model wins over the stored name."""
    from modeling_pmad import PMAD_MODELS, resolve_eval_config
    from utils import read_weights_file
    path = _eval_checkpoint(tmp_path / "other.pth", {"model": "vit_huge_patch14_224_8k_vocab"})
    none = {"model": None, "input_size": None}
    with pytest.raises(CheckpointError) as err:
        resolve_eval_config(none, read_weights_file(path), path)
    assert str(err.value) == (
        f"{path} stores the model name 'vit_huge_patch14_224_8k_vocab' in its training "
        f"arguments, which this code does not build: pass --model (one of "
        f"{sorted(PMAD_MODELS)}) with the size it was trained at")
    config, _ = resolve_eval_config({**none, "model": TINY}, read_weights_file(path), path)
    assert config["model"] == TINY


def test_eval_config_of_a_released_file_is_the_papers(tmp_path):
    from modeling_pmad import PAPER_EVAL_CONFIG, resolve_eval_config
    from utils import read_weights_file
    path = _eval_checkpoint(tmp_path / "released.pth", None)
    config, notes = resolve_eval_config({"input_size": None}, read_weights_file(path), path)
    assert config == PAPER_EVAL_CONFIG == {
        "model": "vit_base_patch16_224_8k_vocab", "input_size": 224,
        "layer_scale_init_value": None, "imagenet_default_mean_and_std": True,
        "tokenizer_model": "dall-e"}
    assert notes == [f"{path} stores no training arguments; evaluating with {config} "
                     "(given flags, else the paper's)",
                     "the file does not say which tokenizer it was trained with: this uses "
                     "the paper's, --tokenizer_model dall-e. The authors' later scripts "
                     "train with vit_tokenizer; for such a file pass --tokenizer_model "
                     "vit_tokenizer (both have 8192 codes, so nothing else tells them apart)"]
    config, notes = resolve_eval_config({"model": TINY, "tokenizer_model": "vit_tokenizer"},
                                        read_weights_file(path), path)
    assert config["model"] == TINY and config["tokenizer_model"] == "vit_tokenizer"
    assert len(notes) == 1  # nothing to disagree with, the tokenizer given


def test_settings_an_original_checkpoints_arguments_lack_are_named_as_the_papers(tmp_path):
    """The original code's Namespace need not record our keys: the note said every setting
    came from the checkpoint, and the tokenizer warning was left out, though the file said
    nothing of its tokenizer."""
    from modeling_pmad import resolve_eval_config
    from utils import read_weights_file
    args = argparse.Namespace(model=TINY, input_size=112, imagenet_default_mean_and_std=False,
                              num_mask_patches=58, lr=1e-3)
    path = _eval_checkpoint(tmp_path / "original.pth", args)
    config, notes = resolve_eval_config({}, read_weights_file(path), path)
    assert config == {"model": TINY, "input_size": 112, "layer_scale_init_value": None,
                      "imagenet_default_mean_and_std": False, "tokenizer_model": "dall-e"}
    assert notes[0] == (f"{path} stores its training arguments; evaluating with {config} "
                        "(given flags, else the checkpoint's; the paper's for "
                        "layer_scale_init_value, tokenizer_model, which its arguments do not "
                        "record)")
    assert notes[1].startswith("the file does not say which tokenizer it was trained with")
    assert len(notes) == 2
    config, notes = resolve_eval_config({"tokenizer_model": "dall-e"},
                                        read_weights_file(path), path)
    assert notes == [f"{path} stores its training arguments; evaluating with {config} "
                     "(given flags, else the checkpoint's; the paper's for "
                     "layer_scale_init_value, which its arguments do not record)"]


@pytest.mark.parametrize("vae_type, recorded", [("dall-e", True), ("customized", False)])
def test_beits_discrete_vae_type_records_the_dall_e_tokenizer(tmp_path, vae_type, recorded):
    """The original code is BEiT's, whose arguments name the tokenizer kind
    `discrete_vae_type` ('dall-e', the paper's): a checkpoint recording it says which
    tokenizer it was trained with, with no note that it does not. BEiT's other kind,
    'customized', is none of ours: the paper's is assumed and said so."""
    from modeling_pmad import resolve_eval_config
    from utils import read_weights_file
    args = argparse.Namespace(model=TINY, input_size=224, layer_scale_init_value=0.1,
                              imagenet_default_mean_and_std=True, discrete_vae_type=vae_type,
                              discrete_vae_weight_path="weights/tokenizer")
    path = _eval_checkpoint(tmp_path / "beit_args.pth", args)
    config, notes = resolve_eval_config({}, read_weights_file(path), path)
    assert config == {"model": TINY, "input_size": 224, "layer_scale_init_value": 0.1,
                      "imagenet_default_mean_and_std": True, "tokenizer_model": "dall-e"}
    if recorded:
        assert notes == [f"{path} stores its training arguments; evaluating with {config} "
                         "(given flags, else the checkpoint's)"]
    else:
        assert len(notes) == 2 and "the paper's for tokenizer_model" in notes[0]
        assert notes[1].startswith("the file does not say which tokenizer it was trained")
    config, notes = resolve_eval_config({"tokenizer_model": "vit_tokenizer"},
                                        read_weights_file(path), path)
    assert config["tokenizer_model"] == "vit_tokenizer"
    assert notes[1:] == (["given flags override the checkpoint's training arguments: "
                          "--tokenizer_model vit_tokenizer (checkpoint: dall-e)"]
                         if recorded else [])
