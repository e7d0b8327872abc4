"""The three files that score an image, loaded and checked against each other: the PMAD
ViT checkpoint, the tokenizer it was trained with, and ProtoFlow (its file and the
prototypes folder).

run_test.py, predict.py and bench/ turn their flags into `load`'s arguments; from Python
(a notebook scoring new images with protocols.clean_scores) call it directly:

    m = scoring_models.load("output_dir/multi_class/checkpoint-last.pth",
                            protoflow_weights="output_dir/protoflow.pt",
                            prototypes_dir="output_dir/prototypes")

Each check runs before any image is read: a tokenizer of another vocabulary, file or
token grid, or a ProtoFlow file of another image size, would give plausible wrong scores.
Errors name the command-line flag of each argument (--ckpt, --tokenizer_weight_path, ...).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

import datasets
import modeling_pmad
from modeling_discrete_vae import create_tokenizer, token_grid, weights_fingerprint
from protoflow import ProtoFlow
from utils import (TRAIN_IMAGE_HASHES, FlagError, MissingFileError, read_weights_file,
                   resolve_amp, resolve_device, resolve_weights_file)

RELEASED_TOKENIZER = "weights/tokenizer"  # where weights/README.md puts DALL-E's and VQ-KD's


@dataclass
class Models:
    """What scoring a class needs, and the settings it was loaded with."""
    model: torch.nn.Module
    tokenizer: torch.nn.Module
    protoflow: ProtoFlow
    device: torch.device
    amp: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    config: dict[str, Any]  # the ViT's settings as resolved: PAPER_EVAL_CONFIG's keys
    tokenizer_path: str  # the tokenizer file used (given, recorded, or the released one)
    protoflow_path: str  # the ProtoFlow file (a folder given resolved to its one .pt)
    vit_classes: list[str] | None = None  # what the ViT trained on, where its file says
    # the content sha256s of the ViT's training images, where its file lists them
    vit_train_images: frozenset[str] | None = None
    vit_epochs: int | None = None  # epochs the ViT trained, where its file says
    vit_training_args: dict[str, Any] | None = None  # its flags, where its file says

    @property
    def img_size(self) -> int:
        return self.model.patch_embed.img_size[0]

    def dataset(self, paths: Sequence[str], names: Sequence[str] | None = None,
                **options: Any) -> datasets.ImageListDataset:
        """Images to score (protocols.collect_class), read as these models read them: at
        the ViT's and the tokenizer's sizes, normalised as the ViT was trained (ProtoFlow
        converts them to its own). `names` (default: the paths) name the outputs;
        `options`: ImageListDataset's skip_bad_images and what."""
        return datasets.ImageListDataset(list(paths), list(paths if names is None else names),
                                         **self._reading(), **options)

    def test_set(self, root: str, class_name: str, **options: Any
                 ) -> datasets.MVTecTestDataset:
        """A class's MVTec-layout test set, read as `dataset` reads images; `options`:
        MVTecTestDataset's skip_bad_images."""
        return datasets.MVTecTestDataset(root, class_name, **self._reading(), **options)

    def _reading(self) -> dict[str, Any]:
        """How these models read an image: sizes and normalisation."""
        return dict(token_size=self.tokenizer.image_size, img_size=self.img_size,
                    mean=self.mean, std=self.std,
                    patch_size=self.model.patch_embed.patch_size[0])


# BEiT's released pretraining files (beit_base_patch16_224_pt22k.pth, ...): PMAD's init
BEIT_PRETRAINING_NAME = re.compile(r"beit_\w+_pt(22k|1k)\.pth")


def load(ckpt: str, *, config: dict[str, Any] | None = None,
         tokenizer_path: str | None = None, protoflow_weights: str = "weights/protoflow",
         prototypes_dir: str = "weights/prototypes", encoder_weights: str | None = None,
         device: str | torch.device | None = None, amp: str | None = None,
         say: Callable[[str], None] = print) -> Models:
    """The ViT as the checkpoint was trained: each of PAPER_EVAL_CONFIG's settings from
    `config` where not None, else the checkpoint's training arguments, else the paper's
    (each told through `say`). Its tokenizer: `tokenizer_path`, else the file the
    checkpoint records where it is on this machine, else RELEASED_TOKENIZER; checked
    against the ViT's vocabulary, recorded tokenizer and patch grid. ProtoFlow
    (`protoflow_weights`: a file, or a folder of exactly one .pt) is given the ViT's
    images and converts them to its own normalisation. `device` None: CUDA where torch
    sees a GPU; `amp` None: bf16 where supported (both as the scripts' flags)."""
    unknown = sorted(set(config or ()) - set(modeling_pmad.PAPER_EVAL_CONFIG))
    if unknown:  # a typo would otherwise leave the checkpoint's value in place, unsaid
        raise ValueError(f"scoring_models.load: config keys {unknown} are not settings of "
                         f"the ViT; the settings are {list(modeling_pmad.PAPER_EVAL_CONFIG)}")
    if not os.path.isdir(prototypes_dir):  # before any model loads; else a missing class
        raise MissingFileError(  # would name a file in it and advise making one there
            f"--prototypes_dir {prototypes_dir} "
            + ("is a file" if os.path.exists(prototypes_dir) else "does not exist")
            + ": pass the folder of per-class prototypes that `python run_protoflow.py "
            "prototypes --output_dir DIR` wrote (the released ones: weights/README.md)")
    device = resolve_device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    amp = resolve_amp(amp, device)
    checkpoint = read_weights_file(ckpt)
    # first: another file given as the checkpoint (a ProtoFlow file) is named as the
    # problem, not the tokenizer that the settings it lacks would choose
    vocab_size = modeling_pmad.checkpoint_vocab_size(checkpoint, ckpt)
    config, notes = modeling_pmad.resolve_eval_config(config or {}, checkpoint, ckpt)
    for note in notes:
        say(note)
    if BEIT_PRETRAINING_NAME.fullmatch(os.path.basename(ckpt)):
        say(f"warning: {ckpt} is named as BEiT's ImageNet pretraining checkpoint (the "
            "ViT's --init_ckpt), whose layout a PMAD checkpoint shares: scored as one, its "
            "ViT never learned these classes' normal images. Pass a PMAD checkpoint: "
            "released (weights/README.md) or run_pretraining.py's checkpoint-last.pth")
    mean, std = datasets.normalization(config["imagenet_default_mean_and_std"])
    trained = modeling_pmad.checkpoint_args(checkpoint) or {}
    epoch = checkpoint.get("epoch") if isinstance(checkpoint, dict) else None  # 0-based
    tokenizer, tokenizer_path = _tokenizer(ckpt, config["tokenizer_model"], tokenizer_path,
                                           trained, device, amp, say)
    if vocab_size != tokenizer.vocab_size:
        raise FlagError(f"{ckpt} predicts {vocab_size} visual tokens but the "
                        f"{config['tokenizer_model']} tokenizer {tokenizer_path} has "
                        f"{tokenizer.vocab_size}: evaluate with the tokenizer it was trained "
                        "on (--tokenizer_weight_path)")
    model = modeling_pmad.build_pmad(config["model"], vocab_size=vocab_size,
                                     img_size=config["input_size"],
                                     init_values=config["layer_scale_init_value"])
    modeling_pmad.load_checkpoint(model, ckpt, strict=True, checkpoint=checkpoint)
    check_tokenizer(tokenizer, trained.get("tokenizer_fingerprint"), ckpt=ckpt,
                    tokenizer_model=config["tokenizer_model"], tokenizer_path=tokenizer_path,
                    model_name=config["model"], input_size=config["input_size"])
    del checkpoint
    model.to(device).eval()
    protoflow_path = resolve_weights_file(protoflow_weights, "--protoflow_weights")
    protoflow = ProtoFlow(protoflow_path, prototypes_dir, device=str(device),
                          encoder_weights=encoder_weights, input_normalization=(mean, std))
    protoflow.check_image_size(*model.patch_embed.img_size)  # before any class is scored
    hashes = trained.get(TRAIN_IMAGE_HASHES)
    return Models(model, tokenizer, protoflow, device, amp, mean, std, config, tokenizer_path,
                  protoflow_path, trained.get("train_classes"),
                  None if hashes is None else frozenset(hashes),
                  int(epoch) + 1 if isinstance(epoch, int) else None,
                  recorded_flags(trained) if trained else None)


def recorded_flags(trained: dict[str, Any]) -> dict[str, Any]:
    """The flags a ViT checkpoint records it trained with, for results.json (which run
    made the model): all but its training images' hashes (one per image); a value JSON
    cannot hold (an authors' Namespace may hold any object, a float NaN) as its repr."""
    def plain(value: Any) -> Any:
        try:
            json.dumps(value, allow_nan=False)
            return value
        except (TypeError, ValueError):
            return repr(value)
    return {str(k): plain(v) for k, v in trained.items()
            if k != TRAIN_IMAGE_HASHES}


def _tokenizer(ckpt: str, name: str, path: str | None, trained: dict, device: torch.device,
               amp: str, say: Callable[[str], None]) -> tuple[torch.nn.Module, str]:
    """The tokenizer of `path`; without it, of the file the checkpoint records it was
    trained with (a k-means tokenizer has no standard place) where that is on this
    machine, else RELEASED_TOKENIZER, and a missing file then names the recorded one.
    A missing file given (README's weights/tokenizer for a k-means ViT) names the
    recorded one where it is on this machine: leaving the flag out would use it.
    -> (tokenizer, the path used)."""
    recorded = trained.get("tokenizer_weight_path")
    recorded = recorded if isinstance(recorded, str) else None
    given = path is not None
    if not given:
        here = recorded is not None and os.path.exists(recorded)
        path = recorded if here else RELEASED_TOKENIZER
        if here:
            say(f"tokenizer: {recorded}, the path {ckpt} records it was trained with "
                "(--tokenizer_weight_path)")
    try:
        return create_tokenizer(name, path, device=str(device), amp=amp), path
    except MissingFileError as e:
        if given and recorded not in (None, path) and os.path.exists(recorded):
            raise MissingFileError(
                f"{e} ({ckpt} records the tokenizer it was trained with, {recorded}, which "
                "is on this machine: leave out --tokenizer_weight_path to use it, or pass "
                f"--tokenizer_weight_path {recorded})") from None
        if given or recorded is None or recorded == path:
            raise
        raise MissingFileError(f"{e} ({ckpt} was trained with --tokenizer_weight_path "
                               f"{recorded}, which is not on this machine)") from None


def check_tokenizer(tokenizer: torch.nn.Module, trained_on: str | None, *, ckpt: str,
                    tokenizer_model: str, tokenizer_path: str, model_name: str,
                    input_size: int) -> None:
    """The tokenizer must be the ViT's: another file of the same kind and vocabulary (a
    k-means tokenizer of another world) gives other targets and plausible wrong scores.
    Our checkpoints record the tokenizer's fingerprint (`trained_on`; compared by its
    weights alone, weights_fingerprint: a model trained with DALL-E in fp16 on a GPU is
    evaluated on the CPU too); a released one does not. Its token grid must be the ViT's
    patch grid."""
    then = weights_fingerprint(trained_on) if trained_on else None
    now = weights_fingerprint(tokenizer.fingerprint)
    if then and then != now:
        raise FlagError(f"{ckpt} was trained with another tokenizer than "
                        f"--tokenizer_weight_path {tokenizer_path} (sha256 "
                        f"{then[:12]} then, {now[:12]} now): its targets would differ and "
                        "every score would be wrong; pass the tokenizer file it was "
                        "trained with")
    found = token_grid(tokenizer_model, tokenizer_path)
    side = input_size // modeling_pmad.MODEL_CONFIGS[model_name]["patch_size"]
    if found is not None and found[0] != side:
        raise FlagError(f"{found[1]} gives {found[0]}x{found[0]} tokens per image but "
                        f"{ckpt} ({model_name} at {input_size} px) predicts "
                        f"{side}x{side}: pass the tokenizer it was trained with "
                        "(--tokenizer_weight_path)")
