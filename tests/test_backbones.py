"""backbones.py: the shipped ImageNet EfficientNet-Lite0 maps onto timm and really
classifies; bad files give clear errors."""
from __future__ import annotations

import types

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from skimage import data as skdata
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

import backbones
from backbones import (create_backbone, create_classifier, input_normalization,
                       lite0_weights_path, map_efficientnet_pytorch)
import utils
from utils import CheckpointError

IMAGENET_CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


def test_lite0_mapping_is_one_to_one_by_shape() -> None:
    shipped = torch.load(lite0_weights_path(), map_location="cpu", weights_only=True)
    reference = create_classifier("efficientnet_lite0").state_dict()
    mapped = map_efficientnet_pytorch(shipped, reference)
    assert list(mapped) == list(reference)
    assert all(mapped[k].shape == reference[k].shape for k in reference)
    assert torch.equal(mapped["conv_stem.weight"], shipped["_conv_stem.weight"])
    assert torch.equal(mapped["classifier.bias"], shipped["_fc.bias"])


def test_lite0_classifies_a_real_cat_photo() -> None:
    model = create_classifier("efficientnet_lite0", lite0_weights_path())
    img = torch.from_numpy(skdata.chelsea()).permute(2, 0, 1).float()[None] / 255
    img = F.interpolate(img, size=(224, 224), mode="bilinear", antialias=True)
    x = (img - torch.tensor(IMAGENET_DEFAULT_MEAN)[:, None, None]) / \
        torch.tensor(IMAGENET_DEFAULT_STD)[:, None, None]
    with torch.inference_mode():
        probs = model(x).softmax(-1)[0]
    assert probs.argmax().item() in IMAGENET_CATS
    assert probs[list(IMAGENET_CATS)].sum() > 0.8


def test_features_only_backbone_carries_the_weights() -> None:
    backbone = create_backbone("efficientnet_lite0", (2, 3), lite0_weights_path())
    full = create_classifier("efficientnet_lite0", lite0_weights_path())
    assert backbone.feature_info.channels() == [40, 112]
    assert torch.equal(backbone.conv_stem.weight, full.conv_stem.weight)
    assert not any(p.requires_grad for p in backbone.parameters())
    feats = backbone(torch.zeros(1, 3, 224, 224))
    assert [tuple(f.shape) for f in feats] == [(1, 40, 28, 28), (1, 112, 14, 14)]


def test_backbone_features_of_an_image_do_not_depend_on_its_batch() -> None:
    """The frozen backbone normalises with ImageNet's BatchNorm statistics (eval mode):
    an image's features, and so its prototypes and scores, are the same alone and
    beside other images, and scoring leaves the statistics as they were."""
    backbone = create_backbone("efficientnet_lite0", (2, 3), lite0_weights_path())
    bn = next(m for m in backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = bn.running_mean.clone()
    cat = torch.from_numpy(skdata.chelsea()[:224, :224]).permute(2, 0, 1).float()[None] / 255
    with torch.inference_mode():
        alone = backbone(cat)
        others = torch.rand(3, 3, 224, 224, generator=torch.Generator().manual_seed(0))
        beside = backbone(torch.cat([cat, others]))
    for a, b in zip(alone, beside):
        torch.testing.assert_close(a[0], b[0], atol=1e-4, rtol=1e-4)
    assert torch.equal(bn.running_mean, before)


def test_bad_weight_files_are_clear_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.pth not found"):
        create_classifier("efficientnet_lite0", str(tmp_path / "missing.pth"))
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(open(lite0_weights_path(), "rb").read()[:5000])
    with pytest.raises(ValueError, match=r"truncated.pth is not a complete PyTorch checkpoint "
                                         r"\(5000 bytes, ending early"):
        create_classifier("efficientnet_lite0", str(truncated))
    other = tmp_path / "b0.pth"
    torch.save(create_classifier("efficientnet_b0").state_dict(), other)
    with pytest.raises(CheckpointError, match="b0.pth"):
        create_classifier("efficientnet_lite0", str(other))
    short = create_classifier("efficientnet_lite0").state_dict()
    del short["classifier.bias"]  # a file lacking a tensor must not leave it random
    torch.save(short, tmp_path / "short.pth")
    with pytest.raises(CheckpointError, match=r"short.pth does not fit EfficientNet: missing "
                       r"\['classifier.bias'\], unexpected \[\]; pass a checkpoint of this"):
        create_classifier("efficientnet_lite0", str(tmp_path / "short.pth"))
    shipped = torch.load(lite0_weights_path(), map_location="cpu", weights_only=True)
    shipped["_conv_stem.weight"] = shipped["_conv_stem.weight"][:8]
    with pytest.raises(CheckpointError, match="'_conv_stem.weight' has shape .* not the same "
                       "EfficientNet variant"):
        map_efficientnet_pytorch(shipped, create_classifier("efficientnet_lite0").state_dict())


def test_backbone_refuses_weights_that_leave_its_layers_random(monkeypatch, tmp_path) -> None:
    """A classifier whose weights lack some of the backbone's tensors (another model's
    file) is a CheckpointError naming them, not a backbone with random layers."""
    full = create_classifier("efficientnet_lite0").state_dict()
    del full["conv_stem.weight"]
    other = tmp_path / "other.pth"
    torch.save(full, other)
    monkeypatch.setattr(backbones, "create_classifier",
                        lambda *a: types.SimpleNamespace(state_dict=lambda: full))
    with pytest.raises(backbones.CheckpointError, match=r"other.pth: backbone keys without "
                                                        r"weights \['conv_stem.weight'\]"):
        create_backbone("efficientnet_lite0", (2, 3), str(other))


def test_a_protoflow_files_encoder_loads_as_the_backbone(tmp_path) -> None:
    """--encoder_weights named ProtoFlow files (their encoder_state_dict) but loaded every
    file into the whole classifier, which a features-only encoder never fits: prototypes
    for a new class with the released flow's encoder needed a download. It loads straight
    into the backbone of its levels; one of other shapes is refused by name."""
    made = create_backbone("efficientnet_lite0", (2, 3), lite0_weights_path())
    encoder = {k: v + 1 for k, v in made.state_dict().items()}  # not the shipped weights
    released = tmp_path / "weights_multi_class.pt"  # the released file's two fields
    torch.save({"encoder_state_dict": encoder, "decoder_state_dict": {}}, released)
    loaded = create_backbone("efficientnet_lite0", (2, 3), str(released)).state_dict()
    assert loaded.keys() == encoder.keys()
    assert all(torch.equal(loaded[k], encoder[k]) for k in encoder)
    encoder["conv_stem.weight"] = encoder["conv_stem.weight"][:8]
    torch.save({"encoder_state_dict": encoder}, released)
    with pytest.raises(backbones.CheckpointError, match=(
            r"weights_multi_class.pt: 'conv_stem.weight' \(8, 3, 3, 3\) \(needs \(32, 3, 3, "
            r"3\)\): not the weights of efficientnet_lite0")):
        create_backbone("efficientnet_lite0", (2, 3), str(released))


def test_input_normalization_is_the_one_timm_records_for_the_weights() -> None:
    """The default encoders keep ImageNet's statistics (their numbers are unchanged); a
    TF-ported Lite model and CLIP have their own; a name timm does not know, ImageNet's."""
    imagenet = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert input_normalization("tf_efficientnet_b6.aa_in1k") == imagenet
    assert input_normalization("efficientnet_lite0") == imagenet
    assert input_normalization("tf_efficientnet_lite0") == ((0.5,) * 3, (0.5,) * 3)
    assert input_normalization("vit_base_patch16_clip_224.openai")[1] == pytest.approx(
        (0.2686, 0.2613, 0.2758), abs=1e-4)
    assert input_normalization("no_such_model") == imagenet


def test_a_normalisation_record_reads_back_exactly_and_a_damaged_one_is_refused() -> None:
    """A file's 'normalization' record is plain floats that read back as written (numpy
    values too: torch.load(weights_only=True) would refuse them); one without 3 means or
    3 positive stds (a zero std divides by zero) is a CheckpointError naming the file."""
    record = backbones.normalization_record(np.full(3, 0.5, np.float32), (0.25, 0.5, 1))
    assert record == {"mean": [0.5] * 3, "std": [0.25, 0.5, 1.0]}
    assert {type(v) for v in record["mean"] + record["std"]} == {float}
    assert backbones.recorded_normalization({"normalization": record}, "f.pt", "fix") == (
        (0.5,) * 3, (0.25, 0.5, 1.0))
    assert backbones.recorded_normalization({}, "f.pt", "fix") == (
        tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD))  # unrecorded: ImageNet's
    for damaged in ({"mean": [0.5] * 4, "std": [0.5] * 3}, {"mean": [0.5] * 3, "std": [0.5] * 2},
                    {"mean": [0.5] * 3, "std": [0.5, 0.0, 0.5]}, {"mean": [0.5] * 3}):
        with pytest.raises(CheckpointError, match=r"^f.pt: 'normalization' .* the file is "
                                                  r"damaged: fix$"):
            backbones.recorded_normalization({"normalization": damaged}, "f.pt", "fix")


def test_an_offline_fetch_of_imagenet_weights_is_one_clear_error(monkeypatch) -> None:
    """Without --encoder_weights timm fetches the backbone's weights; offline that was
    the hub's traceback. It is a MissingFileError naming the backbone and the flag; an
    OSError when nothing is fetched is not hidden."""
    real = timm.create_model

    def offline(name: str, pretrained: bool = False, **kwargs):
        if pretrained:
            raise FileNotFoundError("Cannot find the requested files in the local cache")
        return real(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(utils.MissingFileError) as err:
        backbones.create_backbone("efficientnet_lite0", pretrained=True)
    assert str(err.value) == (
        "timm could not fetch efficientnet_lite0's ImageNet weights (Cannot find the "
        "requested files in the local cache): connect to the internet once (timm caches "
        "them), or pass --encoder_weights FILE: a timm or efficientnet-pytorch checkpoint "
        "of it, or a ProtoFlow file such as the released "
        "weights/protoflow/weights_multi_class.pt")
    assert backbones.create_backbone("efficientnet_lite0").feature_info.channels() == [40, 112]
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: (_ for _ in ()).throw(
        PermissionError("cache not writable")))
    with pytest.raises(PermissionError):
        backbones.create_backbone("efficientnet_lite0")
