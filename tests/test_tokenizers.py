"""Visual tokenizers: released file formats, safe loading, token semantics."""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import pickle
import pickletools
import re
import signal
import sys
import tarfile
import types
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from timm.models.beit import Beit

import conftest
import modeling_discrete_vae as dv
import utils
from backbones import lite0_weights_path
from modeling_discrete_vae import (DalleEncoder, VQKDTokenizer, create_tokenizer,
                                   fit_kmeans_tokenizer, register_tokenizer, save_dalle_encoder,
                                   spherical_kmeans)

SMALL_DALLE = dict(n_hid=16, vocab_size=64)  # same layout as OpenAI's, 1/16 of the width


def read_format(name: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """{key: (shape, dtype)} of a released file's key list."""
    return {key: (shape, dtype) for key, shape, dtype in conftest.read_format(name)}


def layout(state_dict: dict[str, torch.Tensor]) -> dict[str, tuple[tuple[int, ...], str]]:
    return {k: (tuple(v.shape), str(v.dtype).removeprefix("torch."))
            for k, v in state_dict.items()}


def token_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """Smooth synthetic RGB in [0, 1], (n, 3, size, size)."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 8, 8, generator=gen)
    return F.interpolate(coarse, size=size, mode="bilinear", align_corners=False).clamp(0, 1)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pickle_globals(path: Path) -> set[str]:
    """'module name' of every GLOBAL opcode in a torch file's object pickle(s)."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            streams = [z.read(n) for n in z.namelist() if n.endswith("data.pkl")]
        ops = [op for s in streams for op in pickletools.genops(s)]
    else:  # legacy: magic, protocol, sys_info, object, storage keys, raw storages
        with open(path, "rb") as f:
            ops = [op for _ in range(5) for op in pickletools.genops(f)]
    return {arg for op, arg, _ in ops if op.name == "GLOBAL"}


class _Hostile:
    """Unpickling this would run a shell command."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return os.system, (f"touch {self.sentinel}",)


# ---------------------------------------------------------------------------- registry

def test_registry(monkeypatch):
    assert dv.available_tokenizers() == ["dall-e", "kmeans", "vit_tokenizer"]
    monkeypatch.setattr(dv, "_TOKENIZERS", dict(dv._TOKENIZERS))
    with pytest.raises(utils.FlagError, match=r"\['dall-e', 'kmeans', 'vit_tokenizer'\]"):
        create_tokenizer("vqgan", "x")
    with pytest.raises(ValueError, match="already registered"):
        register_tokenizer("dall-e")(lambda path: None)

    class Identity(torch.nn.Module):
        image_size, vocab_size, fingerprint = 32, 4, "abc"

        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))

        def get_codebook_indices(self, images):
            return torch.zeros(images.shape[0], 4, dtype=torch.long)

    monkeypatch.setattr(dv, "_GRIDS", dict(dv._GRIDS))
    register_tokenizer("identity")(lambda path: Identity())
    assert "identity" in dv.available_tokenizers()
    tok = create_tokenizer("identity", "unused")
    assert not tok.training and not tok.w.requires_grad
    assert dv.token_grid("identity", "unused") is None  # no grid reader: not checked
    register_tokenizer("gridded", grid=lambda path: (2, f"from {path}"))(lambda path: None)
    assert dv.token_grid("gridded", "w.pth") == (2, "from w.pth")
    assert dv.token_grid("dall-e", "missing.pkl") == (  # DALL-E's grid needs no file
        14, "the dall-e tokenizer (112 px token images, stride 8)")
    register_tokenizer("incomplete")(lambda path: torch.nn.Identity())
    with pytest.raises(TypeError, match="image_size"):
        create_tokenizer("incomplete", "unused")


# ------------------------------------------------------------------------------ DALL-E

def dalle_reference(sd: dict[str, torch.Tensor], images: torch.Tensor) -> torch.Tensor:
    """docs/method.md 3 written out with functional ops, from the state dict alone."""
    def conv(x, name, pad):
        return F.conv2d(x, sd[f"{name}.w"], sd[f"{name}.b"], padding=pad)

    x = conv(0.8 * images + 0.1, "blocks.input", 3)
    for g in range(1, 5):
        for b in (1, 2):
            name = f"blocks.group_{g}.block_{b}"
            identity = conv(x, f"{name}.id_path", 0) if f"{name}.id_path.w" in sd else x
            h = x
            for c, pad in ((1, 1), (2, 1), (3, 1), (4, 0)):
                h = conv(F.relu(h), f"{name}.res_path.conv_{c}", pad)
            x = identity + h / 64  # post_gain 1 / n_layers^2, n_layers = 8
        if g < 4:
            x = F.max_pool2d(x, 2)
    return conv(F.relu(x), "blocks.output.conv", 0).argmax(1).flatten(1)


@pytest.fixture(scope="module")
def small_dalle(tmp_path_factory):
    torch.manual_seed(0)
    encoder = DalleEncoder(**SMALL_DALLE)
    folder = tmp_path_factory.mktemp("tokenizer")
    save_dalle_encoder(encoder, folder / "encoder.pkl")
    return encoder, folder


def test_dalle_released_format_full_size(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "encoder.pkl"
    save_dalle_encoder(DalleEncoder(), path)
    assert {"dall_e.encoder Encoder", "dall_e.encoder EncoderBlock",
            "dall_e.utils Conv2d"} <= pickle_globals(path)
    assert not any(g.startswith("modeling_discrete_vae") for g in pickle_globals(path))
    tok = create_tokenizer("dall-e", path)
    assert layout(tok.encoder.state_dict()) == read_format("dalle_encoder.txt")
    assert (tok.image_size, tok.vocab_size) == (112, 8192)
    tokens = tok.get_codebook_indices(token_images(1, 112))
    assert tokens.shape == (1, 196) and tokens.dtype == torch.long
    assert 0 <= tokens.min() and tokens.max() < 8192


@pytest.mark.parametrize("legacy", [False, True])
def test_dalle_both_serialization_formats(tmp_path, small_dalle, legacy):
    encoder, _ = small_dalle
    path = tmp_path / "encoder.pkl"
    save_dalle_encoder(encoder, path, legacy_format=legacy)
    assert zipfile.is_zipfile(path) != legacy
    assert "dall_e.encoder Encoder" in pickle_globals(path)
    tok = create_tokenizer("dall-e", path)
    for key, value in encoder.state_dict().items():
        assert torch.equal(tok.encoder.state_dict()[key], value), key
    assert tok.encoder.n_hid == 16 and tok.vocab_size == 64


def test_dalle_tokens(small_dalle):
    encoder, folder = small_dalle
    tok = create_tokenizer("dall-e", folder)  # the folder holding encoder.pkl
    images = token_images(3, 112)
    tokens = tok.get_codebook_indices(images)
    assert tokens.shape == (3, 196) and tokens.dtype == torch.long
    assert 0 <= tokens.min() and tokens.max() < 64 and len(tokens.unique()) > 3
    assert torch.equal(tokens, dalle_reference(encoder.state_dict(), images))
    assert torch.equal(tokens, create_tokenizer("dall-e", folder / "encoder.pkl")
                       .get_codebook_indices(images))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the caller's precision is ignored
        assert torch.equal(tok.get_codebook_indices(images), tokens)
    assert tok.fingerprint == sha256(folder / "encoder.pkl")
    assert not tok.training and not any(p.requires_grad for p in tok.parameters())


def test_dalle_input_checks(small_dalle):
    """Wrong size or range gives plausible but wrong tokens: refused. Out of [0, 1] on
    one side only is refused too (0-255 pixels, or a shift into [-1, 0])."""
    tok = create_tokenizer("dall-e", small_dalle[1])
    with pytest.raises(ValueError, match=r"\(N, 3, 112, 112\)"):
        tok.get_codebook_indices(token_images(1, 224))
    images = token_images(1, 112)
    for wrong in ((images - 0.45) / 0.225, images * 255, images - 1):
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            tok.get_codebook_indices(wrong)


@pytest.mark.parametrize("legacy", [False, True])
def test_dalle_hostile_pickle_is_refused(tmp_path, legacy):
    sentinel = tmp_path / "pwned"
    path = tmp_path / "encoder.pkl"
    torch.save(_Hostile(sentinel), path, _use_new_zipfile_serialization=not legacy)
    with pytest.raises(ValueError, match=r"encoder.pkl names the global '(posix|os)\.system'"):
        create_tokenizer("dall-e", path)
    assert not sentinel.exists()


def test_dalle_hostile_header_and_nested_payload_are_refused(tmp_path):
    sentinel = tmp_path / "pwned"
    bare = tmp_path / "bare.pkl"  # a plain pickle: torch reads it as the legacy header
    bare.write_bytes(pickle.dumps(_Hostile(sentinel), protocol=2))
    with pytest.raises(ValueError, match="system"):
        create_tokenizer("dall-e", bare)
    encoder = DalleEncoder(**SMALL_DALLE)
    encoder.blocks.input.payload = _Hostile(sentinel)  # inside a well-formed encoder
    nested = tmp_path / "nested.pkl"
    save_dalle_encoder(encoder, nested)
    with pytest.raises(ValueError, match="system"):
        create_tokenizer("dall-e", nested)
    assert not sentinel.exists()


@pytest.mark.parametrize("legacy", [False, True])
def test_dalle_truncated_file(tmp_path, small_dalle, legacy):
    path = tmp_path / "encoder.pkl"
    save_dalle_encoder(small_dalle[0], path, legacy_format=legacy)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="encoder.pkl is not a readable pickled DALL-E"):
        create_tokenizer("dall-e", path)


def test_dalle_wrong_contents(tmp_path):
    with pytest.raises(utils.MissingFileError, match="encoder.pkl"):
        create_tokenizer("dall-e", tmp_path)  # folder without encoder.pkl
    state = tmp_path / "state_dict.pkl"
    torch.save(DalleEncoder(**SMALL_DALLE).state_dict(), state)
    with pytest.raises(utils.CheckpointError, match="holds a OrderedDict, not DALL-E") as err:
        create_tokenizer("dall-e", state)
    assert str(err.value).endswith(  # as the ViT tokenizer's file would be
        "give encoder.pkl with --tokenizer_weight_path; for a checkpoint trained with the ViT "
        "tokenizer (vit_tokenizer.pth, a dict of weights) pass --tokenizer_model vit_tokenizer")
    kmeans = tmp_path / "kmeans.pth"  # a k-means file read as DALL-E's (the default)
    torch.save({"tokenizer": "kmeans", "codebook": torch.zeros(4, 2)}, kmeans)
    with pytest.raises(utils.CheckpointError, match=(
            f"^{re.escape(str(kmeans))} is a k-means tokenizer, and --tokenizer_model is "
            r"dall-e .*: pass --tokenizer_model kmeans \(from Python: scoring_models.load\(\.\.\., "
            r"config=\{'tokenizer_model': 'kmeans'\}\)\)$")):
        create_tokenizer("dall-e", kmeans)
    listed = tmp_path / "list.pkl"
    torch.save([1], listed)
    with pytest.raises(utils.CheckpointError) as err:
        create_tokenizer("dall-e", listed)
    assert str(err.value).endswith("holds a list, not DALL-E's pickled dall_e.encoder.Encoder: "
                                   "give encoder.pkl with --tokenizer_weight_path")
    encoder = DalleEncoder(**SMALL_DALLE)
    encoder.n_hid = 32  # attributes and tensors disagree
    odd = tmp_path / "odd.pkl"
    save_dalle_encoder(encoder, odd)
    with pytest.raises(ValueError, match=r"odd.pkl: encoder attributes .*'n_hid': 32.* are "
                       r"not those of its tensors .*'n_hid': 16"):
        create_tokenizer("dall-e", odd)


def test_dalle_encoder_given_to_a_weights_only_loader_names_the_dalle_flags(tmp_path):
    """OpenAI's encoder.pkl given where a weights file belongs (--tokenizer_model
    vit_tokenizer, --ckpt) is named as what it is, with the flags that load it (not "use
    the originally released file": it is that file); and those flags do load it."""
    path = tmp_path / "encoder.pkl"
    save_dalle_encoder(DalleEncoder(**SMALL_DALLE), path)
    expected = (f"{path} is OpenAI's DALL-E encoder (encoder.pkl: a pickled "
                "'dall_e.encoder.Encoder'), a tokenizer, not the weights file asked for here: "
                f"pass it as --tokenizer_model dall-e --tokenizer_weight_path {path} (the "
                "file, or its folder)")
    with pytest.raises(utils.CheckpointError) as err:
        create_tokenizer("vit_tokenizer", path)
    assert str(err.value) == expected
    with pytest.raises(utils.CheckpointError) as err:
        utils.load_checkpoint_file(str(path))  # as --ckpt / --resume read it
    assert str(err.value) == expected
    for given in (path, tmp_path):  # the advice works: the file, or its folder
        assert create_tokenizer("dall-e", given).vocab_size == SMALL_DALLE["vocab_size"]


def test_tokenizer_mistakes_are_one_error_line(tmp_path, capsys):
    """A missing or wrong tokenizer file, or an unknown name, is a user's mistake: through
    utils.cli (run_test.py, predict.py, run_pretraining.py) one `error:` line that names
    the path given and the fix, exit 2."""
    pmad = tmp_path / "checkpoint-last.pth"  # a PMAD checkpoint given as the tokenizer
    torch.save({"model": {"lm_head.weight": torch.zeros(8, 4)}, "epoch": 0}, pmad)
    pkl = tmp_path / "encoder.pkl"
    fresh = tmp_path / "clone" / "weights" / "tokenizer"  # the default folder, not made yet
    vqkd_url = "https://huggingface.co/xcyao00/PMAD/resolve/main/vit_tokenizer.pth"
    cases = [
        ("dall-e", tmp_path, f"DALL-E encoder {pkl} not found: download "
                             f"https://cdn.openai.com/dall-e/encoder.pkl to {pkl}, or give its "
                             "location with --tokenizer_weight_path"),
        ("dall-e", fresh, f"DALL-E encoder {fresh / 'encoder.pkl'} not found: download "
                          "https://cdn.openai.com/dall-e/encoder.pkl to "
                          f"{fresh / 'encoder.pkl'}, or give its location with "
                          "--tokenizer_weight_path"),
        ("vit_tokenizer", fresh, f"ViT tokenizer {fresh / 'vit_tokenizer.pth'} not found: "
                                 f"download {vqkd_url} to {fresh / 'vit_tokenizer.pth'}, or "
                                 "give its location with --tokenizer_weight_path"),
        ("vit_tokenizer", tmp_path, f"ViT tokenizer {tmp_path / 'vit_tokenizer.pth'} not "
                                    f"found: download {vqkd_url} to "
                                    f"{tmp_path / 'vit_tokenizer.pth'}, or give its location "
                                    "with --tokenizer_weight_path"),
        ("kmeans", pmad, f"{pmad} is not a k-means tokenizer file (needs 'tokenizer': "
                         "'kmeans' and"),
        ("kmeans", tmp_path / "km.pth",  # made by training, not downloaded
         f"k-means tokenizer {tmp_path / 'km.pth'} not found: training makes it (`python "
         "run_pretraining.py ... --tokenizer_model kmeans --tokenizer_weight_path "
         f"{tmp_path / 'km.pth'} --fit_kmeans_tokenizer`, as scripts/demo.sh does); pass the "
         "file that run wrote"),
        ("vit_tokenizer", pmad, f"{pmad} is not a VQ-KD tokenizer: no 'encoder.cls_token'"),
        ("vqgan", pmad, "unknown tokenizer 'vqgan' (--tokenizer_model): choose one of "
                        "['dall-e', 'kmeans', 'vit_tokenizer']"),
    ]
    for name, path, message in cases:
        assert utils.cli(lambda: create_tokenizer(name, path)) == 2, name
        err = capsys.readouterr().err
        assert err.startswith(f"error: {message}") and err.count("\n") == 1, err
        assert "Traceback" not in err and ("weights/tokenizer" not in err or path == fresh)
    with pytest.raises(utils.MissingFileError, match="vit_tokenizer.pth not found"):
        dv.token_grid("vit_tokenizer", fresh)  # read before any tokenizer is built
    assert not fresh.exists()


# ------------------------------------------------------------------------- ViT (VQ-KD)

RELEASED_VQKD = read_format("vit_tokenizer.txt")
IGNORED_KEYS = sorted(k for k in RELEASED_VQKD if VQKDTokenizer.IGNORED.match(k))
TINY_VQKD = dict(embed_dim=128, depth=2, num_heads=2, num_codes=64)


def write_vqkd(path: Path, tokenizer: VQKDTokenizer, wrapper: str = "model",
               edit=None) -> Path:
    """A VQ-KD file: the tokenizer's tensors plus the released keys it does not use."""
    gen = torch.Generator().manual_seed(1)
    state = dict(tokenizer.state_dict())
    state.update({k: torch.randn(RELEASED_VQKD[k][0], generator=gen) for k in IGNORED_KEYS})
    if edit is not None:
        edit(state)
    torch.save({wrapper: state}, path)
    return path


@pytest.fixture(scope="module")
def tiny_vqkd(tmp_path_factory):
    torch.manual_seed(0)
    tok = VQKDTokenizer(**TINY_VQKD)
    path = write_vqkd(tmp_path_factory.mktemp("vqkd") / "vit_tokenizer.pth", tok)
    return tok, path


def test_vqkd_released_format_full_size(tmp_path):
    torch.manual_seed(0)
    path = write_vqkd(tmp_path / "vit_tokenizer.pth", VQKDTokenizer())
    file_layout = layout(torch.load(path, weights_only=True)["model"])
    assert file_layout == RELEASED_VQKD
    tok = create_tokenizer("vit_tokenizer", path)
    assert sorted(tok.ignored_keys) == IGNORED_KEYS
    assert layout(tok.state_dict()) == {k: v for k, v in RELEASED_VQKD.items()
                                        if k not in IGNORED_KEYS}
    assert (tok.image_size, tok.vocab_size, len(tok.encoder.blocks)) == (224, 8192, 12)
    assert tok.encoder.blocks[0].attn.num_heads == 12
    tokens = tok.get_codebook_indices(token_images(1, 224))
    assert tokens.shape == (1, 196) and 0 <= tokens.min() and tokens.max() < 8192


def test_vqkd_tokens_are_nearest_raw_codebook_rows(tiny_vqkd, caplog):
    ref, path = tiny_vqkd
    with caplog.at_level(logging.INFO, logger="modeling_discrete_vae"):
        tok = create_tokenizer("vit_tokenizer", path)
    assert f"ignored {len(IGNORED_KEYS)} keys" in caplog.text
    images = token_images(3, 224)
    tokens = tok.get_codebook_indices(images)
    assert tokens.shape == (3, 196) and tokens.dtype == torch.long
    assert 0 <= tokens.min() and tokens.max() < 64 and len(tokens.unique()) > 3
    with torch.no_grad():
        z = F.normalize(ref.encode_task_layer(ref.encoder(images * 2 - 1)), dim=-1)
        codes = ref.quantize.embedding.weight  # random rows of unequal norm: used as stored
        expected = torch.cdist(z, codes.expand(3, -1, -1)).argmin(-1)
    assert torch.equal(tokens, expected)
    assert torch.equal(tok.get_codebook_indices(images), tokens)
    assert tok.fingerprint == sha256(path)


def test_vqkd_encoder_equals_timm_vit():
    """Independent reference: timm's BEiT/ViT with abs. position embedding, fc_norm."""
    tok = VQKDTokenizer(**TINY_VQKD)
    ref = Beit(img_size=224, embed_dim=128, depth=2, num_heads=2, use_abs_pos_emb=True,
               global_pool="avg", num_classes=0).eval()
    encoder_sd = {k.removeprefix("encoder."): v for k, v in tok.state_dict().items()
                  if k.startswith("encoder.")}
    with torch.no_grad():
        gen = torch.Generator().manual_seed(2)
        for key in ("blocks.0.attn.q_bias", "blocks.1.attn.v_bias"):
            encoder_sd[key] = torch.randn(128, generator=gen)  # biases start at zero
        assert ref.load_state_dict(encoder_sd, strict=True)
        tok.encoder.load_state_dict(encoder_sd)
        x = torch.randn(2, 3, 224, 224)
        expected = ref.fc_norm(ref.forward_features(x)[:, 1:])
        torch.testing.assert_close(tok.encoder(x), expected, rtol=1e-4, atol=1e-4)


def test_vqkd_state_dict_wrapper(tmp_path, tiny_vqkd):
    path = write_vqkd(tmp_path / "sd.pth", tiny_vqkd[0], wrapper="state_dict")
    images = token_images(1, 224)
    assert torch.equal(create_tokenizer("vit_tokenizer", path).get_codebook_indices(images),
                       create_tokenizer("vit_tokenizer", tiny_vqkd[1])
                       .get_codebook_indices(images))


def test_vqkd_from_its_folder(tiny_vqkd, tmp_path):
    """The original scripts' --tokenizer_weight_path weights/tokenizer: the folder's
    vit_tokenizer.pth, as DALL-E's folder gives its encoder.pkl."""
    folder = Path(tiny_vqkd[1]).parent
    images = token_images(2, 224)
    from_folder = create_tokenizer("vit_tokenizer", folder)
    assert from_folder.fingerprint == create_tokenizer("vit_tokenizer", tiny_vqkd[1]).fingerprint
    assert torch.equal(from_folder.get_codebook_indices(images),
                       tiny_vqkd[0].get_codebook_indices(images))
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'vit_tokenizer.pth'}"):
        create_tokenizer("vit_tokenizer", tmp_path)  # a folder without it


@pytest.mark.parametrize("edit, message", [
    (lambda sd: sd.pop("encoder.blocks.1.attn.q_bias"), "missing.*encoder.blocks.1.attn.q_bias"),
    (lambda sd: sd.update({"encoder.norm.weight": torch.ones(128)}), "unexpected.*encoder.norm"),
    (lambda sd: sd.update({"encode_task_layer.2.bias": torch.zeros(16)}),
     r"'encode_task_layer.2.bias' has shape \(16,\) in the file but \(32,\)"),
])
def test_vqkd_file_must_match_exactly(tmp_path, tiny_vqkd, edit, message):
    path = write_vqkd(tmp_path / "bad.pth", tiny_vqkd[0], edit=edit)
    with pytest.raises(ValueError, match=f"bad.pth.*{message}"):
        create_tokenizer("vit_tokenizer", path)


def test_vqkd_wrong_model_and_truncated(tmp_path, tiny_vqkd):
    pmad = tmp_path / "checkpoint.pth"
    torch.save({"model": {"cls_token": torch.zeros(1, 1, 768),
                          "lm_head.weight": torch.zeros(8192, 768)}}, pmad)
    with pytest.raises(ValueError, match="checkpoint.pth is not a VQ-KD tokenizer"):
        create_tokenizer("vit_tokenizer", pmad)
    truncated = tmp_path / "truncated.pth"
    data = tiny_vqkd[1].read_bytes()
    truncated.write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match="truncated.pth is not a readable"):
        create_tokenizer("vit_tokenizer", truncated)


# ----------------------------------------------------------------------------- k-means

def test_spherical_kmeans_recovers_clusters():
    gen = torch.Generator().manual_seed(0)
    centers = F.normalize(torch.randn(6, 16, generator=gen), dim=1)
    labels = torch.arange(600) % 6
    x = F.normalize(centers[labels] + 0.05 * torch.randn(600, 16, generator=gen), dim=1)
    found = spherical_kmeans(x, 6, iters=10, seed=0)
    assert torch.allclose(found.norm(dim=1), torch.ones(6))
    similarity = centers @ found.t()  # each true center has one found centroid next to it
    assert (similarity.max(dim=1).values > 0.99).all()
    assert sorted(similarity.argmax(dim=1).tolist()) == list(range(6))
    assert torch.equal(spherical_kmeans(x, 6, iters=10, seed=0), found)  # seeded
    with pytest.raises(ValueError, match="600 feature vectors cannot make 601"):
        spherical_kmeans(x, 601)


def test_kmeans_plus_plus_never_picks_a_chosen_point_again():
    """Each new seed is drawn by its distance to the *nearest* chosen one: with as many
    codewords as distinct points, every point becomes one codeword."""
    points = torch.eye(16)
    chosen = dv._kmeans_pp_init(points, 16, torch.Generator().manual_seed(0))
    assert sorted((chosen @ points.t()).argmax(dim=1).tolist()) == list(range(16))


def test_an_emptied_cluster_is_reseeded_with_the_worst_served_point(monkeypatch):
    """Seeds at e1, e2 and -e3: nothing is nearest to -e3, so that codeword is moved to
    the point its centroid serves worst, the outlier between the two clusters, which
    then keeps a codeword of its own."""
    near = torch.linspace(0, 0.1, 10)[:, None]
    x = F.normalize(torch.cat([torch.cat([torch.ones(10, 1), near, 0 * near], 1),
                               torch.cat([near, torch.ones(10, 1), 0 * near], 1),
                               torch.tensor([[1.0, 1.0, 0.2]])]), dim=1)  # (21, 3)
    seeds = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, -1.0]])
    monkeypatch.setattr(dv, "_kmeans_pp_init", lambda x, k, gen: seeds)
    found = spherical_kmeans(x, 3, iters=3)
    torch.testing.assert_close(found[2], x[-1])
    assert (found[:2] @ seeds[:2].t()).diagonal().min() > 0.99


@pytest.fixture(scope="module")
def kmeans_file(tmp_path_factory):
    batches = [token_images(4, 224, seed=s) for s in (0, 1)]
    path = tmp_path_factory.mktemp("kmeans") / "kmeans.pth"
    assert fit_kmeans_tokenizer(batches, path, vocab_size=16, iters=5) == str(path)
    return path, batches


def test_fit_kmeans_tokenizer_uses_an_existing_file_only_if_it_fits_the_flags(kmeans_file,
                                                                              capsys):
    """--fit_kmeans_tokenizer fits only a missing file: one of 256 codes was trained with
    in place of the 512 asked for, with no word. Now one fitted otherwise is refused with
    both fixes, and one that fits is used, said once."""
    import argparse
    import run_pretraining
    path, _ = kmeans_file
    args = argparse.Namespace(tokenizer_weight_path=str(path), kmeans_vocab_size=16,
                              kmeans_out_index=1, fit_kmeans_tokenizer=True)
    run_pretraining.check_existing_kmeans(args, [])
    assert capsys.readouterr().out == (
        f"[tokenizer] {path} exists: used as it is (--fit_kmeans_tokenizer fits only a "
        "missing file)\n")
    args.kmeans_vocab_size, args.kmeans_out_index = 512, 2
    with pytest.raises(utils.FlagError) as info:
        run_pretraining.check_existing_kmeans(args, [])
    assert str(info.value) == (
        f"--fit_kmeans_tokenizer fits a tokenizer only when --tokenizer_weight_path does not "
        f"exist, and {path} was fitted with --kmeans_vocab_size 16, --kmeans_out_index 1 "
        "(asked: --kmeans_vocab_size 512, --kmeans_out_index 2): delete it, or pass another "
        "--tokenizer_weight_path, to fit anew; or pass --kmeans_vocab_size 16 "
        "--kmeans_out_index 1 to use it")
    assert dv.kmeans_file_settings(str(path)) == {"vocab_size": 16, "out_index": 1,
                                                  "image_size": 224, "fit_classes": None}
    args.fit_kmeans_tokenizer = False  # the file as given: its fit flags are not compared
    run_pretraining.check_existing_kmeans(args, [])
    assert capsys.readouterr().out == ""


def test_kmeans_file_format(kmeans_file):
    path, _ = kmeans_file
    obj = torch.load(path, weights_only=True)
    assert set(obj) == {"tokenizer", "backbone", "out_index", "backbone_state_dict",
                        "codebook", "image_size", "normalization"}
    assert (obj["tokenizer"], obj["backbone"], obj["out_index"], obj["image_size"]) == (
        "kmeans", "efficientnet_lite0", 1, 224)
    assert obj["normalization"] == {"mean": [0.485, 0.456, 0.406],
                                    "std": [0.229, 0.224, 0.225]}  # timm's, for this backbone
    assert obj["codebook"].shape == (16, 24)  # Lite0 stride-4 features: 24 channels
    assert torch.allclose(obj["codebook"].norm(dim=1), torch.ones(16))


def _expected_tokens(tok, images: torch.Tensor, pool: int,
                     mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)) -> torch.Tensor:
    """The nearest codeword to each patch's mean feature, written out by hand."""
    with torch.no_grad():
        normalised = (images - torch.tensor(mean).view(1, 3, 1, 1)) \
            / torch.tensor(std).view(1, 3, 1, 1)
        feats = tok.features.backbone(normalised)[0]  # (N, C, 224 / r, 224 / r)
        n, c = feats.shape[:2]
        feats = feats.view(n, c, 14, pool, 14, pool).mean(dim=(3, 5))  # (N, C, 14, 14)
        feats = F.normalize(feats.flatten(2).transpose(1, 2), dim=-1)
        return torch.cdist(feats, tok.codebook.expand(n, -1, -1)).argmin(-1)  # (N, 196)


def test_kmeans_tokens(kmeans_file):
    path, batches = kmeans_file
    tok = create_tokenizer("kmeans", path)
    assert (tok.image_size, tok.vocab_size, tok.fingerprint) == (224, 16, sha256(path))
    images = torch.cat(batches)
    tokens = tok.get_codebook_indices(images)
    assert tokens.shape == (8, 196) and tokens.dtype == torch.long
    assert 0 <= tokens.min() and tokens.max() < 16 and len(tokens.unique()) > 4
    assert torch.equal(tokens, _expected_tokens(tok, images, pool=4))


def test_kmeans_stride16_features_need_no_pooling(tmp_path):
    batches = [token_images(4, 224, seed=s) for s in (0, 1)]
    path = fit_kmeans_tokenizer(batches, tmp_path / "k16.pth", vocab_size=8, iters=3,
                                out_index=3)
    tok = create_tokenizer("kmeans", path)
    assert tok.codebook.shape == (8, 112) and tok.features.pool == 1
    images = torch.cat(batches)
    assert torch.equal(tok.get_codebook_indices(images), _expected_tokens(tok, images, 1))
    with pytest.raises(ValueError, match="output 4 has stride 32.*divides 16"):
        fit_kmeans_tokenizer(batches, tmp_path / "k32.pth", vocab_size=8, out_index=4)


def test_kmeans_features_follow_the_backbones_normalisation(tmp_path, kmeans_file):
    """A TF-ported backbone was trained on inputs in [-1, 1] (timm: mean = std = 0.5); its
    tokenizer records that and tokenizes so. A file from before normalisation was recorded
    was fitted on ImageNet-normalised inputs, and is read so, whatever its backbone."""
    batches = [token_images(4, 224, seed=s) for s in (0, 1)]
    path = fit_kmeans_tokenizer(batches, tmp_path / "tf.pth", vocab_size=8, iters=3,
                                backbone="tf_efficientnet_lite0",
                                backbone_weights=lite0_weights_path())
    assert torch.load(path, weights_only=True)["normalization"] == {"mean": [0.5] * 3,
                                                                    "std": [0.5] * 3}
    tok, images = create_tokenizer("kmeans", path), torch.cat(batches)
    half = _expected_tokens(tok, images, 4, mean=(0.5,) * 3, std=(0.5,) * 3)
    assert torch.equal(tok.get_codebook_indices(images), half)
    assert not torch.equal(half, _expected_tokens(tok, images, 4))  # the choice matters
    obj = torch.load(kmeans_file[0], weights_only=True)
    del obj["normalization"]
    torch.save(obj, tmp_path / "older.pth")
    older = create_tokenizer("kmeans", tmp_path / "older.pth")
    assert torch.equal(older.get_codebook_indices(images), _expected_tokens(older, images, 4))
    tf_obj = torch.load(path, weights_only=True)  # the TF backbone's file, from before too
    del tf_obj["normalization"]
    torch.save(tf_obj, tmp_path / "tf_older.pth")
    tf_older = create_tokenizer("kmeans", tmp_path / "tf_older.pth")
    assert torch.equal(tf_older.get_codebook_indices(images),
                       _expected_tokens(tf_older, images, 4))  # ImageNet's, as fitted then
    torch.save(dict(obj, normalization={"mean": [0.5] * 3}), tmp_path / "bad.pth")
    with pytest.raises(utils.CheckpointError, match=r"bad.pth: 'normalization' .*damaged: "
                       "fit the tokenizer again"):
        create_tokenizer("kmeans", tmp_path / "bad.pth")


def test_kmeans_fit_on_a_folder_takes_a_vocabulary_of_at_most_its_patches(tmp_path):
    """Two 32 px images give 2 * 2 * 2 = 8 patches (one feature each): a vocabulary of
    8 codes is fitted, one of 9 is refused before any feature is computed."""
    folder = tmp_path / "train" / "a"
    folder.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    for i in range(2):
        pixels = (torch.rand(32, 32, 3, generator=gen) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i}.png")
    root = str(tmp_path)  # holding train/<class>/
    path = dv.fit_kmeans_on_folder(root, ["a"], str(tmp_path / "k8.pth"), vocab_size=8,
                                   image_size=32)
    assert torch.load(path, weights_only=True)["codebook"].shape == (8, 24)
    with pytest.raises(utils.FlagError) as err:
        dv.fit_kmeans_on_folder(root, ["a"], str(tmp_path / "k9.pth"), vocab_size=9,
                                image_size=32)
    assert str(err.value).startswith(
        "--kmeans_vocab_size 9 (demo.sh: KMEANS_VOCAB) needs at least as many training "
        f"patches; 2 images of {root} give 8: pass a smaller vocabulary")
    assert not (tmp_path / "k9.pth").exists()


def test_kmeans_rejects_other_files(tmp_path, tiny_vqkd, kmeans_file):
    """A file without the k-means fields, or whose 'tokenizer' tag names another kind
    though its fields are all there, is not a k-means tokenizer file."""
    with pytest.raises(ValueError, match="vit_tokenizer.pth is not a k-means tokenizer"):
        create_tokenizer("kmeans", tiny_vqkd[1])
    obj = torch.load(kmeans_file[0], weights_only=True)
    torch.save(dict(obj, tokenizer="other"), tmp_path / "other.pth")
    with pytest.raises(utils.CheckpointError, match="other.pth is not a k-means tokenizer"):
        create_tokenizer("kmeans", tmp_path / "other.pth")
    with pytest.raises(ValueError, match="needs backbone_weights"):
        fit_kmeans_tokenizer([], tmp_path / "x.pth", backbone="resnet18")


# ------------------------------------------------- DALL-E as OpenAI's own code pickles it

# Stand-ins for OpenAI's `dall_e.utils` and `dall_e.encoder`, declared as OpenAI declares
# them: attrs classes whose fields are `attr.ib`s, except Encoder.group_count, a plain
# class attribute that a pickled instance does not store. The forward methods follow
# docs/method.md 3 (fp16 convolutions on CUDA only), independently of modeling_discrete_vae.
OPENAI_UTILS = '''
import math
import attr
import torch
import torch.nn.functional as F
from torch import nn


@attr.s(eq=False)
class Conv2d(nn.Module):
    n_in: int = attr.ib()
    n_out: int = attr.ib()
    kw: int = attr.ib()
    use_float16: bool = attr.ib(default=True)
    device: torch.device = attr.ib(default=torch.device("cpu"))
    requires_grad: bool = attr.ib(default=False)

    def __attrs_post_init__(self):
        super().__init__()
        w = torch.randn(self.n_out, self.n_in, self.kw, self.kw)
        w = w / math.sqrt(self.n_in * self.kw ** 2)
        self.w, self.b = nn.Parameter(w), nn.Parameter(0.1 * torch.randn(self.n_out))

    def forward(self, x):
        if self.use_float16 and self.w.is_cuda:
            x, w, b = x.half(), self.w.half(), self.b.half()
        else:
            x, w, b = x.float(), self.w, self.b
        return F.conv2d(x, w, b, padding=(self.kw - 1) // 2)
'''

OPENAI_ENCODER = '''
from collections import OrderedDict
import attr
import torch
from torch import nn
from dall_e.utils import Conv2d


@attr.s(eq=False, repr=False)
class EncoderBlock(nn.Module):
    n_in: int = attr.ib()
    n_out: int = attr.ib()
    n_layers: int = attr.ib()
    device: torch.device = attr.ib(default=None)
    requires_grad: bool = attr.ib(default=False)

    def __attrs_post_init__(self):
        super().__init__()
        self.n_hid = self.n_out // 4
        self.post_gain = 1 / (self.n_layers ** 2)
        conv = lambda i, o, k: Conv2d(i, o, k, device=self.device, requires_grad=self.requires_grad)
        self.id_path = conv(self.n_in, self.n_out, 1) if self.n_in != self.n_out else nn.Identity()
        self.res_path = nn.Sequential(OrderedDict([
            ("relu_1", nn.ReLU()), ("conv_1", conv(self.n_in, self.n_hid, 3)),
            ("relu_2", nn.ReLU()), ("conv_2", conv(self.n_hid, self.n_hid, 3)),
            ("relu_3", nn.ReLU()), ("conv_3", conv(self.n_hid, self.n_hid, 3)),
            ("relu_4", nn.ReLU()), ("conv_4", conv(self.n_hid, self.n_out, 1))]))

    def forward(self, x):
        return self.id_path(x) + self.post_gain * self.res_path(x)


@attr.s(eq=False, repr=False)
class Encoder(nn.Module):
    group_count: int = 4
    n_hid: int = attr.ib(default=256)
    n_blk_per_group: int = attr.ib(default=2)
    input_channels: int = attr.ib(default=3)
    vocab_size: int = attr.ib(default=8192)
    device: torch.device = attr.ib(default=torch.device("cpu"))
    requires_grad: bool = attr.ib(default=False)
    use_mixed_precision: bool = attr.ib(default=True)

    def __attrs_post_init__(self):
        super().__init__()
        n_layers = self.group_count * self.n_blk_per_group
        conv = lambda i, o, k, **kw: Conv2d(i, o, k, device=self.device,
                                            requires_grad=self.requires_grad, **kw)
        block = lambda i, o: EncoderBlock(i, o, n_layers, device=self.device,
                                          requires_grad=self.requires_grad)
        widths = [self.n_hid * 2 ** g for g in range(self.group_count)]
        groups = [("input", conv(self.input_channels, self.n_hid, 7))]
        n_in = self.n_hid
        for g, width in enumerate(widths, start=1):
            layers = [(f"block_{i + 1}", block(n_in if i == 0 else width, width))
                      for i in range(self.n_blk_per_group)]
            if g < self.group_count:
                layers.append(("pool", nn.MaxPool2d(kernel_size=2)))
            groups.append((f"group_{g}", nn.Sequential(OrderedDict(layers))))
            n_in = width
        groups.append(("output", nn.Sequential(OrderedDict([
            ("relu", nn.ReLU()), ("conv", conv(n_in, self.vocab_size, 1, use_float16=False))]))))
        self.blocks = nn.Sequential(OrderedDict(groups))

    def forward(self, x):
        return self.blocks(x)
'''


def _attr_standin() -> types.ModuleType:
    """What of `attr` the stand-ins use, for machines without attrs: `attr.ib` fields
    become __init__ arguments set on the instance, anything else stays on the class."""
    attr = types.ModuleType("attr")

    class _Field:
        def __init__(self, default=None, required=True):
            self.default, self.required = default, required

    def ib(default=_Field):
        return _Field() if default is _Field else _Field(default, required=False)

    def s(**_options):
        def decorate(cls):
            fields = [(k, v) for k, v in vars(cls).items() if isinstance(v, _Field)]
            for k, _ in fields:
                delattr(cls, k)

            def __init__(self, *args, **kwargs):
                values = dict(zip([k for k, _ in fields], args), **kwargs)
                for k, f in fields:
                    if k not in values and f.required:
                        raise TypeError(f"missing argument {k}")
                    setattr(self, k, values.get(k, f.default))
                self.__attrs_post_init__()

            cls.__init__ = __init__
            return cls
        return decorate

    attr.ib, attr.s = ib, s
    return attr


@contextlib.contextmanager
def openai_dall_e_modules(use_attrs: bool):
    """`dall_e`, `dall_e.utils`, `dall_e.encoder` in sys.modules, removed on exit."""
    names = ("attr", "dall_e", "dall_e.utils", "dall_e.encoder")
    saved = {n: sys.modules[n] for n in names if n in sys.modules}
    try:
        if not use_attrs:
            sys.modules["attr"] = _attr_standin()
        package = types.ModuleType("dall_e")
        package.__path__ = []
        sys.modules["dall_e"] = package
        for name, source in (("utils", OPENAI_UTILS), ("encoder", OPENAI_ENCODER)):
            module = types.ModuleType(f"dall_e.{name}")
            sys.modules[module.__name__] = module
            setattr(package, name, module)
            exec(compile(source, f"<dall_e/{name}.py>", "exec"), vars(module))
        yield sys.modules["dall_e.encoder"]
    finally:
        for n in names:
            sys.modules.pop(n, None)
        sys.modules.update(saved)


ATTRS_BACKENDS = [pytest.param(True, id="attrs", marks=pytest.mark.skipif(
                      importlib.util.find_spec("attr") is None, reason="attrs not installed")),
                  pytest.param(False, id="attrs-standin")]


@pytest.mark.parametrize("use_attrs", ATTRS_BACKENDS)
def test_dalle_pickled_by_openais_classes(tmp_path, use_attrs):
    images = token_images(3, 112)
    with openai_dall_e_modules(use_attrs) as openai:
        torch.manual_seed(0)
        original = openai.Encoder(n_hid=16, vocab_size=64)
        original.blocks.group_3.block_2.res_path.conv_2.use_float16 = False  # kept per conv
        state = vars(original)
        assert "group_count" not in state and original.group_count == 4
        assert {"n_hid", "n_blk_per_group", "input_channels", "vocab_size", "device",
                "requires_grad", "use_mixed_precision", "training", "_modules"} <= set(state)
        conv_state = vars(original.blocks.group_2.block_1.id_path)
        assert {"n_in", "n_out", "kw", "use_float16", "device", "requires_grad"} <= set(
            conv_state) and set(conv_state["_parameters"]) == {"w", "b"}
        with torch.no_grad():
            expected = original(0.8 * images + 0.1).argmax(1).flatten(1)  # (3, 196)
        paths = {"zip": tmp_path / "zip.pkl", "legacy": tmp_path / "legacy.pkl"}
        with warnings.catch_warnings():  # legacy format: no source file for the classes
            warnings.simplefilter("ignore", UserWarning)
            torch.save(original, paths["zip"])
            torch.save(original, paths["legacy"], _use_new_zipfile_serialization=False)
    assert "dall_e.encoder" not in sys.modules  # a user has no dall_e package
    assert len(expected.unique()) > 5
    for fmt, path in paths.items():
        assert zipfile.is_zipfile(path) == (fmt == "zip")
        assert {"dall_e.encoder Encoder", "dall_e.encoder EncoderBlock",
                "dall_e.utils Conv2d"} <= pickle_globals(path)
        tok = create_tokenizer("dall-e", path)
        assert tok.encoder.group_count == 4 and tok.encoder.n_hid == 16, fmt
        flags = {n: m.use_float16 for n, m in tok.encoder.named_modules()
                 if isinstance(m, dv.DalleConv2d)}
        assert flags.pop("blocks.output.conv") is False, fmt
        assert flags.pop("blocks.group_3.block_2.res_path.conv_2") is False, fmt
        assert flags and all(flags.values()), fmt  # every other convolution
        assert torch.equal(tok.get_codebook_indices(images), expected), fmt


def test_dalle_missing_instance_field_is_refused(tmp_path):
    """Instance fields (attr.ib) are always in OpenAI's pickle: a file without one, or
    with a convolution's use_float16 missing or not a bool, is not encoder.pkl."""
    encoder = DalleEncoder(**SMALL_DALLE)
    del encoder.n_blk_per_group
    path = tmp_path / "encoder.pkl"
    save_dalle_encoder(encoder, path)
    with pytest.raises(ValueError, match=r"'n_blk_per_group': None.*are not those of its "
                       r"tensors .*'n_blk_per_group': 2"):
        create_tokenizer("dall-e", path)
    for flag, shown in ((None, "None"), (1, "1")):
        encoder = DalleEncoder(**SMALL_DALLE)
        conv = encoder.blocks.group_2.block_1.res_path.conv_3
        if flag is None:
            del conv.use_float16
        else:
            conv.use_float16 = flag
        save_dalle_encoder(encoder, path)
        with pytest.raises(utils.CheckpointError, match=r"encoder.pkl: convolution "
                           rf"blocks.group_2.block_1.res_path.conv_3 has use_float16 {shown}, "
                           "not a bool"):
            create_tokenizer("dall-e", path)


def test_dalle_files_that_would_build_without_bound_are_refused_at_once(tmp_path):
    """Three crafted files that hung the loader while filling memory: a pickle that calls
    DALL-E's Encoder(...) itself with a billion blocks per group (torch.save's never
    calls a constructor), a pickled encoder whose attribute asks for a billion blocks its
    tensors do not have, and a tar archive (torch's oldest format) whose storages entry
    is a named pipe, which torch's unpacking would wait on for ever."""
    reduce = tmp_path / "reduce.pkl"
    reduce.write_bytes(b"\x80\x02cdall_e.encoder\nEncoder\n"
                       + pickle.dumps((1, 4, 10 ** 9, 3, 8, False), protocol=2)[2:-1] + b"R.")
    with pytest.raises(utils.CheckpointError,
                       match=r"the file calls DalleEncoder\(...\) with sizes of its own"):
        dv.load_dalle_encoder(reduce)
    bomb = dv.DalleEncoder(group_count=1, n_hid=4, n_blk_per_group=1, vocab_size=8)
    bomb.n_blk_per_group = 10 ** 9
    dv.save_dalle_encoder(bomb, tmp_path / "bomb.pkl")
    with pytest.raises(utils.CheckpointError, match=r"'n_blk_per_group': 1000000000.* are not "
                       r"those of its tensors .*'n_blk_per_group': 1"):
        dv.load_dalle_encoder(tmp_path / "bomb.pkl")
    with tarfile.open(tmp_path / "fifo.tar", "w", format=tarfile.PAX_FORMAT) as tf:
        entry = tarfile.TarInfo("storages")
        entry.type = tarfile.FIFOTYPE
        tf.addfile(entry)
    def hung(*_):
        raise TimeoutError("the loader waits on the named pipe")

    previous = signal.signal(signal.SIGALRM, hung)  # a regression fails, not hangs
    signal.alarm(60)
    try:
        with pytest.raises(utils.CheckpointError, match="fifo.tar is a tar archive"):
            dv.load_dalle_encoder(tmp_path / "fifo.tar")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_dalle_precision_follows_amp_on_cuda_only(small_dalle):
    encoder, folder = small_dalle
    images = token_images(3, 112)
    fp32 = create_tokenizer("dall-e", folder)
    amp = create_tokenizer("dall-e", folder, amp="bf16")
    assert not amp.computes_fp16  # on the CPU: fp32 whatever --amp is
    # On CUDA, any --amp (bf16 too) gives fp16 convolutions, as OpenAI's encoder runs.
    assert (fp32.fp16_on_cuda, amp.fp16_on_cuda) == (False, True)
    assert amp.fingerprint == fp32.fingerprint == sha256(folder / "encoder.pkl")
    assert torch.equal(amp.get_codebook_indices(images), fp32.get_codebook_indices(images))
    # The fp16 path (taken on CUDA): fp16 convolutions, the output convolution in fp32.
    dtypes = {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: dtypes.__setitem__(n, o.dtype))
             for n, m in amp.encoder.named_modules() if isinstance(m, dv.DalleConv2d)]
    with torch.no_grad():
        logits = amp.encoder((0.8 * images + 0.1).half())
    for h in hooks:
        h.remove()
    assert dtypes.pop("blocks.output.conv") == torch.float32 == logits.dtype
    assert set(dtypes.values()) == {torch.float16}
    agree = (logits.argmax(1).flatten(1) == fp32.get_codebook_indices(images)).float().mean()
    assert agree > 0.9
