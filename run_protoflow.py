"""Build ProtoFlow from normal training images: prototypes, then the flow.

Two commands (ImageNet layout, ``<root>/train/<class>/*``; ``--data_path`` also takes
``<root>/train``):

    python run_protoflow.py prototypes --data_path data/Mvtec-ImageNet \
        --classes bottle cable --output_dir weights/prototypes
    python run_protoflow.py train --data_path data/Mvtec-ImageNet --setting multi_class \
        --prototypes_dir weights/prototypes --output weights/protoflow/multi_class.pt

Both hold out the same seeded 10 % of each class's images (``--holdout``, ``--seed``),
so that the image-score threshold stored with the flow comes from normal images that
neither the prototypes nor the flow have seen. The model and its training loop are in
protoflow.py, the held-out split and the flow's augmentation in datasets.py.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import sys
import zlib
from collections import Counter
from collections.abc import Iterable, Sequence

import FrEIA.framework as Ff
import numpy as np
import timm
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

import datasets
from backbones import create_backbone, input_normalization, lite0_hint, normalization_record
from protoflow import (CORESET_META, DEFAULT_ENCODER, DEFAULT_N_BLOCKS, DEFAULT_OUT_INDICES,
                       THRESHOLD_QUANTILE, build_flow, build_prototypes, class_threshold,
                       image_score, load_prototypes, patch_log_likelihood, prototypes_sha256,
                       read_prototype_meta, save_protoflow, save_prototypes, train_flow)
from utils import (TRAIN_IMAGE_HASHES, CheckpointError, FlagError, JsonlLog, MissingFileError,
                   RunLock, UniqueNames, build_sampler, capture_rng_state, cli, file_sha256,
                   flag_changes, fraction_arg, int_at_least, load_checkpoint_file, positive_float,
                   prepare_output_dir, probability_arg, progress, remove_stale_tmp_files,
                   resolve_device, restore_rng_state, save_on_master, seed_everything, set_aside)


@torch.inference_mode()
def held_out_scores(encoder: nn.Module, flow: Ff.SequenceINN, loader: Iterable,
                    prototypes: Sequence[Tensor], device: str | torch.device = "cpu"
                    ) -> tuple[Tensor, Tensor]:
    """ProtoFlow's image scores (N,) of the held-out normal images, which calibrate the
    stored threshold (set-independent: max over patches of -logp), and their class
    indices (N,)."""
    protos = [p.to(device) for p in prototypes]
    flow.eval()
    scores, classes = [], []
    for images, class_idx in progress(loader, desc="held-out scores", leave=False):
        logp = patch_log_likelihood(encoder, flow, images.to(device), protos, class_idx)
        scores.append(image_score(logp).cpu())
        classes.append(class_idx.cpu())
    return torch.cat(scores), torch.cat(classes)


# ----------------------------------------------------------------------------- commands
# Training arguments that must not change when a run is resumed (and the prototypes'
# content, run_args["prototypes"]: a changed --prototypes_dir or rebuilt prototypes).
RESUME_KEYS = ("data_path", "classes", "encoder", "out_indices", "encoder_weights", "holdout",
               "seed", "batch_size", "img_size", "epochs", "lr", "warmup_epochs", "n_blocks",
               "skip_bad_images", "num_workers")
# Recorded only since a later version: a .resume file without one is still resumed (with a
# note), as it holds everything else the run needs.
RECORDED_LATER = ("num_workers",)
LOG_SUFFIX = ".log.jsonl"  # <output>.log.jsonl: each epoch's loss and learning rate
# The flags `train` shares with `prototypes`: the prototypes' rebuild command repeats them.
PROTOTYPE_FLAGS = ("data_path", "encoder_weights", "img_size", "holdout", "seed",
                   "skip_bad_images")


def _encoder_from_args(args: argparse.Namespace) -> nn.Module:
    """The --encoder; offline without its weights, the error also names the demo's
    backbone, which is installed (these commands have --encoder; run_test.py has not)."""
    try:
        encoder = create_backbone(args.encoder, tuple(args.out_indices),
                                  weights=args.encoder_weights,
                                  pretrained=args.encoder_weights is None)
    except MissingFileError as e:
        if args.encoder_weights is not None:
            raise
        raise MissingFileError(f"{e}. Offline with no such file, the demo's backbone (a "
                               "smaller one than the paper's B6) is installed: --encoder "
                               f"efficientnet_lite0 --encoder_weights {lite0_hint()}") from None
    return encoder.to(args.device)


def _loader(dataset: Dataset, indices: list[int], args: argparse.Namespace,
            train: bool = False) -> DataLoader:
    subset = Subset(dataset, indices)
    return DataLoader(subset, batch_size=args.batch_size, num_workers=args.num_workers,
                      sampler=build_sampler(subset, args.seed) if train else None,
                      pin_memory=torch.device(args.device).type == "cuda")


def run_prototypes(args: argparse.Namespace) -> list[str]:
    """`prototypes` command: <output_dir>/<class>/coreset.npy for each class."""
    classes = args.classes or datasets.list_train_classes(args.data_path)
    mean, std = input_normalization(args.encoder)
    transform = datasets.build_transforms(args.img_size, mean, std)
    datasets.list_train_samples(args.data_path, classes)  # every empty folder, one error
    # every class's images (less those --skip_bad_images leaves out) and split before the
    # encoder loads: a class too small for --holdout or --num_shots stops the run now, not
    # once the classes before it are built
    splits = {}
    for name in classes:
        dataset = datasets.TrainImageDataset(args.data_path, [name], transform,
                                             skip_bad_images=args.skip_bad_images)
        splits[name] = dataset, *_usable_split(args, name, [c for _, c in dataset.samples])
    encoder = _encoder_from_args(args)
    paths = []
    for name, (dataset, kept, held) in splits.items():
        protos = build_prototypes(encoder, _loader(dataset, kept, args), args.coreset_ratio,
                                  args.projection_dim, args.device,
                                  rng=np.random.default_rng([args.seed, zlib.crc32(name.encode())]))
        meta = {"backbone": args.encoder, "out_indices": list(args.out_indices),
                "encoder_weights": None if args.encoder_weights is None  # from any folder
                else os.path.abspath(args.encoder_weights), "num_images": len(kept),
                "num_shots": args.num_shots, "holdout": args.holdout, "seed": args.seed,
                "held_out": [os.path.basename(dataset.samples[i][0]) for i in held],
                "coreset_ratio": args.coreset_ratio, "projection_dim": args.projection_dim,
                "img_size": args.img_size, "shape": list(protos.shape),
                "normalization": normalization_record(mean, std),
                "skip_bad_images": args.skip_bad_images,
                TRAIN_IMAGE_HASHES: sorted({file_sha256(dataset.samples[i][0]) for i in kept})}
        paths.append(save_prototypes(args.output_dir, name, protos, meta))
        print(f"{name}: {len(kept)} images ({len(held)} held out) -> {len(protos)} "
              f"prototypes -> {paths[-1]}", flush=True)
    return paths


def _usable_split(args: argparse.Namespace, name: str, labels: list[int]
                  ) -> tuple[list[int], list[int]]:
    """(kept, held out) indices of one class's images (`labels`: all 0): --holdout's
    split, the kept cut to the first --num_shots in file-name order; a FlagError when
    the class has too few images for either."""
    kept, held = datasets.holdout_split(labels, [name], args.holdout, args.seed)
    if args.num_shots is None:
        return kept, held
    if args.num_shots > len(kept):
        raise FlagError(f"--num_shots {args.num_shots}: class '{name}' has "
                        f"{len(kept)} usable images ({len(held)} held out)")
    return kept[:args.num_shots], held


def _split_by_class(dataset: Dataset, classes: list[str], kept: list[int], held: list[int]
                    ) -> tuple[dict[str, list[str]], dict[str, int]]:
    """({class: its held-out file names}, {class: its number of kept images})."""
    held_names: dict[str, list[str]] = {c: [] for c in classes}
    for i in held:
        path, k = dataset.samples[i]
        held_names[classes[k]].append(os.path.basename(path))
    counts = Counter(classes[dataset.samples[i][1]] for i in kept)
    return held_names, {c: counts[c] for c in classes}


def _check_prototype_images(prototypes_dir: str, held_out: dict[str, list[str]],
                            kept: dict[str, int], skip_bad_images: bool) -> None:
    """The prototypes must come from the training set the flow trains on, per class: one
    of as many images (`kept` plus `held_out`; images added or removed since, or a custom
    set split anew, give other prototypes than the flow's data), and, when images are
    held out for the threshold, none of those (their coreset.json lists the same
    held-out files), or the threshold is low. A few-shot class's prototypes
    (--num_shots) are compared by held-out files only. Counts that differ because one
    command left out bad images (--skip_bad_images) and the other did not say so."""
    fix = "rebuild the prototypes with `python run_protoflow.py prototypes`"
    for name, count in kept.items():
        meta_path = os.path.join(prototypes_dir, name, CORESET_META)
        meta = read_prototype_meta(prototypes_dir, name, fix)
        if meta is None:
            if held_out[name]:
                print(f"[protoflow] {meta_path} missing (released prototypes?): the held-out "
                      f"images of '{name}' may be among the prototypes' images, which would "
                      "make the stored threshold too low", flush=True)
            continue
        made = meta.get("num_images")
        if made is not None and meta.get("num_shots") is None:  # kept + held out, each time
            made, now = made + len(meta.get("held_out", [])), count + len(held_out[name])
            skipped = meta.get("skip_bad_images")  # absent from an earlier version's file
            if made != now and skipped is not None and skipped != skip_bad_images:
                raise FlagError(f"{meta_path}: the prototypes were made from {made} images "
                                f"of '{name}' {'with' if skipped else 'without'} "
                                f"--skip_bad_images, this training has {now} "
                                f"{'with' if skip_bad_images else 'without'} it: pass the "
                                "same --skip_bad_images to both commands")
            if made != now:
                raise FlagError(f"{meta_path}: the prototypes were made from a training set "
                                f"of {made} images of '{name}', this one has {now} (images "
                                "added or removed since, or the set split anew); " + fix
                                + " on them")
        if held_out[name] and sorted(meta.get("held_out", [])) != sorted(held_out[name]):
            raise FlagError(f"{meta_path}: the prototypes were made with other held-out "
                            f"images (--holdout {meta.get('holdout')} --seed "
                            f"{meta.get('seed')}) than this training holds out; use the "
                            "same --holdout, --seed and --skip_bad_images for both commands, "
                            "or rebuild the prototypes, so that held-out images stay unseen")


def _flow_data(args: argparse.Namespace, classes: list[str],
               normalization: tuple[tuple[float, ...], tuple[float, ...]]
               ) -> tuple[Dataset, Dataset, list[int], list[int]]:
    """The training images (flow augmentation), the same images with the test transform,
    both `normalization` (mean, std), and the (kept, held-out) split."""
    mean, std = normalization
    train_set = datasets.TrainImageDataset(args.data_path, classes,
                                           datasets.flow_train_transform(args.img_size, mean,
                                                                         std),
                                           skip_bad_images=args.skip_bad_images)
    eval_set = copy.copy(train_set)  # the same images, the test transform
    eval_set.transform = datasets.build_transforms(args.img_size, mean, std)
    kept, held = datasets.holdout_split([c for _, c in train_set.samples], classes,
                                        args.holdout, args.seed)
    return train_set, eval_set, kept, held


def training_files(dataset: Dataset, kept: list[int], held: list[int], root: str
                   ) -> dict[str, dict[str, list]]:
    """The kept and held-out training images as {relative path: [size, SHA-256]}: an
    image added, removed or rewritten after a crash changes it, which a resume must not
    continue on (same --data_path, other data), while a copy of the same files elsewhere
    (another node, mtimes not kept) does not. Each file is read once per start (MVTec
    AD's training images: seconds), a small part of decoding them every epoch."""
    def fingerprint(indices: list[int]) -> dict[str, list]:
        out = {}
        for i in indices:
            path = dataset.samples[i][0]
            out[os.path.relpath(path, root)] = [os.path.getsize(path), file_sha256(path)]
        return out
    return {"kept": fingerprint(kept), "held_out": fingerprint(held)}


def _sizes_only(files: dict[str, dict[str, list]]) -> dict[str, dict[str, list]]:
    """`training_files` cut to the sizes, for a file an older run_protoflow.py wrote,
    which recorded [size, mtime_ns]."""
    return {split: {name: value[:1] for name, value in entries.items()}
            for split, entries in files.items()}


def _files_changed(saved: dict[str, dict], now: dict[str, dict]) -> str:
    """How two `training_files` differ, per split: counts, then a few names of each kind."""
    def some(names: list[str]) -> str:
        return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    parts = []
    for split, label in (("kept", "training"), ("held_out", "held-out")):
        before, after = saved.get(split, {}), now[split]
        kinds = {"added": sorted(set(after) - set(before)),
                 "removed": sorted(set(before) - set(after)),
                 "rewritten": sorted(k for k in set(before) & set(after)
                                     if list(before[k]) != list(after[k]))}
        if any(kinds.values()):
            parts.append(f"{len(before)} -> {len(after)} {label} images ("
                         + "; ".join(f"{kind} {some(names)}" for kind, names in kinds.items()
                                     if names) + ")")
    return "; ".join(parts)


def _resume(args: argparse.Namespace, resume_path: str, flow: Ff.SequenceINN,
            optimizer: torch.optim.Optimizer, run_args: dict,
            data_files: dict[str, dict[str, list]]) -> int:
    """The epoch to start at: 0, or the one after the last saved in `resume_path`
    (<output>.resume), whose flow, optimizer and RNG state are restored (only with
    --resume, unchanged `run_args` and the same training images, `data_files`, so that a
    resumed run is the run it continues). A file that records only some of `run_args` (an
    older version's) is refused: it cannot be shown to continue this run; one without
    `data_files` (recorded since a later version) resumes with a note, as does one whose
    `data_files` hold [size, mtime_ns] (before the contents were): compared by size."""
    if not os.path.exists(resume_path):
        if args.resume:
            raise FlagError(f"--resume: {resume_path} does not exist, so --output "
                            f"{args.output} has no unfinished run to continue; drop --resume "
                            "to start afresh")
        return 0
    if not args.resume:
        raise FlagError(f"{resume_path} holds an unfinished run: pass --resume to "
                        "continue it, or delete the file to start over")
    state = load_checkpoint_file(resume_path)
    saved = state["args"]
    for key in RECORDED_LATER:
        if key not in saved:
            saved[key] = run_args[key]
            print(f"[protoflow] {resume_path} records no --{key} (an older run_protoflow.py "
                  f"wrote it): resumed; the run continues exactly only with the --{key} it "
                  "was started with", flush=True)
    unrecorded = [k for k in run_args if k not in saved]
    if unrecorded:
        raise CheckpointError(f"{resume_path} records no {unrecorded} (an older "
                              "run_protoflow.py wrote it), so it cannot be checked against "
                              "this run; delete it to start over")
    changed = {k: (saved[k], v) for k, v in run_args.items()
               if k != "prototypes" and saved[k] != v}
    protos = [c for c, digest in run_args["prototypes"].items()
              if saved["prototypes"].get(c) != digest]
    differ = [f"arguments: {flag_changes(changed)}"] if changed else []
    if protos:
        differ.append(f"prototypes for {protos} than --prototypes_dir {args.prototypes_dir} "
                      "holds")
    if differ:
        raise CheckpointError(f"{resume_path} was made with other {'; other '.join(differ)}; "
                              "use the same ones or delete it to start over")
    if "data_files" not in state:
        print(f"[protoflow] {resume_path} records no fingerprint of the training images (an "
              "older run_protoflow.py wrote it): resumed unchecked; the run continues exactly "
              "only on the images it was started with", flush=True)
        saved_files = None
    elif any(isinstance(value[1], int) for entries in state["data_files"].values()
             for value in entries.values()):
        print(f"[protoflow] {resume_path} records the training images' sizes and times, not "
              "their contents (an older run_protoflow.py wrote it): compared by size only",
              flush=True)
        saved_files, data_files = _sizes_only(state["data_files"]), _sizes_only(data_files)
    else:
        saved_files = state["data_files"]
    if saved_files is not None and saved_files != data_files:
        raise CheckpointError(f"{resume_path} was made on other images than --data_path "
                              f"{args.data_path} holds now: "
                              f"{_files_changed(saved_files, data_files)}; resume on "
                              f"the same images, or delete {resume_path} to start over")
    flow.load_state_dict(state["flow"])
    optimizer.load_state_dict(state["optimizer"])
    restore_rng_state(state["rng"])
    start_epoch = state["epoch"] + 1
    print(f"[protoflow] resuming {resume_path} at epoch {start_epoch + 1}", flush=True)
    return start_epoch


def _set_aside_earlier_run(output: str) -> None:
    """A fresh run writes `output` and its log anew: an earlier run's move first to
    previous-<UTC time>/ in their folder, as run_pretraining.py's checkpoints do, so that
    no finished flow is overwritten."""
    folder, name = os.path.split(os.path.abspath(output))
    present = [n for n in (name, name + LOG_SUFFIX) if os.path.lexists(os.path.join(folder, n))]
    moved = set_aside(folder, present)
    if moved:
        print(f"[protoflow] an earlier run's {' and '.join(present)} moved to {moved}/",
              flush=True)


def run_train(args: argparse.Namespace) -> dict:
    """`train` command: the flow on the seen classes' images, last epoch kept (no model
    selection with test labels), threshold from held-out normal images."""
    if args.classes and (args.setting is not None or args.unseen_classes is not None
                         or args.from_obj_to_texture):
        raise FlagError("--classes names the classes itself: drop --setting, "
                        "--unseen_classes and --from_obj_to_texture, or --classes")
    args.setting = datasets.resolve_setting(args.setting, args.from_obj_to_texture)
    classes = args.classes or datasets.setting_classes(
        args.setting, args.unseen_classes,
        available=datasets.list_train_classes(args.data_path))[0]
    args.classes = list(classes)
    seed_everything(args.seed)
    encoder = _encoder_from_args(args)
    feature_dim = sum(encoder.feature_info.channels())
    flags = {k: getattr(args, k) for k in PROTOTYPE_FLAGS}
    mean, std = input_normalization(args.encoder)
    prototypes = [load_prototypes(args.prototypes_dir, c, feature_dim, args.encoder,
                                  args.out_indices, flags, (mean, std)).to(args.device)
                  for c in classes]
    train_set, eval_set, kept, held = _flow_data(args, classes, (mean, std))
    flow = build_flow(feature_dim, args.n_blocks,
                      rng=np.random.default_rng(args.seed)).to(args.device)
    optimizer = torch.optim.Adam([p for p in flow.parameters() if p.requires_grad], lr=args.lr)
    resume_path = args.output + ".resume"
    run_args = {k: getattr(args, k) for k in RESUME_KEYS}
    run_args["prototypes"] = {c: prototypes_sha256(args.prototypes_dir, c) for c in classes}
    data_files = training_files(train_set, kept, held, args.data_path)
    start_epoch = _resume(args, resume_path, flow, optimizer, run_args, data_files)
    # after _resume: a resumed run's changed images are named by its own check
    _check_prototype_images(args.prototypes_dir,
                            *_split_by_class(train_set, classes, kept, held),
                            args.skip_bad_images)
    if start_epoch == 0:
        _set_aside_earlier_run(args.output)
    log = JsonlLog(args.output + LOG_SUFFIX, start_epoch)

    def epoch_end(epoch: int, loss: float, opt: torch.optim.Optimizer) -> None:
        log.write({"epoch": epoch, "loss": loss, "lr": opt.param_groups[0]["lr"]})
        print(f"[protoflow] epoch {epoch + 1}/{args.epochs} loss {loss:.5f}", flush=True)
        save_on_master({"flow": flow.state_dict(), "optimizer": opt.state_dict(),
                        "epoch": epoch, "args": run_args, "data_files": data_files,
                        "rng": capture_rng_state()},
                       resume_path)

    print(f"[protoflow] {len(classes)} classes, {len(kept)} training images, {len(held)} "
          f"held out; {args.epochs} epochs on {args.device}", flush=True)
    train_flow(encoder, flow, _loader(train_set, kept, args, train=True), prototypes,
               args.epochs, args.lr, args.warmup_epochs, args.device, optimizer=optimizer,
               start_epoch=start_epoch, epoch_end=epoch_end)
    scores, score_classes = (held_out_scores(encoder, flow, _loader(eval_set, held, args),
                                             prototypes, args.device)
                             if held else (None, None))
    if scores is not None and not torch.isfinite(scores).all():  # then the threshold is too
        raise FloatingPointError(
            f"the flow after epoch {args.epochs} gives non-finite scores to "
            f"{int((~torch.isfinite(scores)).sum())} of {len(scores)} held-out images: the "
            f"training diverged; lower --lr (now {args.lr}) and start afresh (delete "
            f"{resume_path}, which holds this run)")
    obj = save_protoflow(args.output, encoder, flow, backbone=args.encoder,
                         out_indices=args.out_indices, classes=classes, normal_scores=scores,
                         normal_classes=score_classes, threshold_quantile=args.threshold_quantile,
                         mean=mean, std=std, img_size=args.img_size,
                         extra={"train_args": run_args, TRAIN_IMAGE_HASHES: sorted(
                             {sha for _, sha in data_files["kept"].values()})})
    if os.path.exists(resume_path):
        os.remove(resume_path)
    threshold = obj["image_score_threshold"]
    print(f"[protoflow] wrote {args.output}; image-score threshold "
          + (f"{threshold:.4f} over all classes (q{args.threshold_quantile:g} of {len(held)} "
             "held-out images; each class has its own, from its held-out images)"
             if threshold is not None else "none (--holdout 0)"), flush=True)
    if score_classes is not None:  # the thresholds run_test.py and predict.py call at
        own = {c: class_threshold(scores, score_classes, i, args.threshold_quantile)
               for i, c in enumerate(classes)}
        print("[protoflow] each class's threshold: " + ", ".join(
            f"{c} {t:.4f}" for c, t in own.items() if t is not None), flush=True)
        note_few_held_out(classes, torch.bincount(score_classes, minlength=len(classes)))
    return obj


MIN_HELD_OUT = 3  # a class's threshold from fewer held-out normal images is one or two scores


def note_few_held_out(classes: Sequence[str], counts: Tensor) -> None:
    """Name the classes whose threshold rests on fewer than MIN_HELD_OUT held-out normal
    images (10 % of a custom class of a dozen is one): its 0.99 quantile is about their
    largest score, and predict.py's decisions rest on it."""
    few = [f"{c} ({int(n)})" for c, n in zip(classes, counts) if n < MIN_HELD_OUT]
    if few:
        print(f"[protoflow] note: {', '.join(few)}: fewer than {MIN_HELD_OUT} held-out normal "
              "images, so the class's threshold (about their largest score) is a rough "
              "guess, and so are predict.py's decisions and run_test.py --clean_masks "
              "threshold's calls: add normal images (a larger --holdout, for `prototypes` "
              "and `train` alike, holds out more of them)", flush=True)


def _add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data_path", required=True,
                   help="training images in ImageNet layout: <root>/train/<class>/* (the "
                        "root, or its train/ folder)")
    p.add_argument("--encoder", default=DEFAULT_ENCODER,
                   help="timm backbone name (a tag selects timm's pretrained weights; "
                        "default %(default)s)")
    p.add_argument("--out_indices", type=int, nargs="+", default=list(DEFAULT_OUT_INDICES),
                   help="the encoder's feature levels (default 2 3: strides 8 and 16)")
    p.add_argument("--encoder_weights", default=None,
                   help="local backbone weights (a timm or efficientnet-pytorch file, or "
                        "a ProtoFlow file: its encoder); without it timm downloads the "
                        "pretrained weights")
    p.add_argument("--holdout", type=probability_arg, default=0.1,
                   help="fraction of each class's images held out (threshold "
                        "calibration; default %(default)s)")
    p.add_argument("--seed", type=int_at_least(0), default=0,
                   help="seeds the held-out split, the coreset and the flow's training (default "
                        "%(default)s)")
    p.add_argument("--batch_size", type=int_at_least(1), default=32, help="default %(default)s")
    p.add_argument("--num_workers", type=int_at_least(0), default=min(4, os.cpu_count() or 1),
                   help="default: 4, or the CPU count if fewer (here %(default)s)")
    p.add_argument("--img_size", type=int_at_least(1), default=224, help="default %(default)s")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="default: cuda where a GPU is seen, else cpu (here %(default)s)")
    p.add_argument("--skip_bad_images", action="store_true",
                   help="leave unreadable images out (listed) instead of stopping")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("run_protoflow.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    pp = sub.add_parser("prototypes", help="build <output_dir>/<class>/coreset.npy")
    _add_common_args(pp)
    pp.add_argument("--classes", nargs="+", default=None, action=UniqueNames,
                    help="default: every class folder")
    pp.add_argument("--output_dir", default="weights/prototypes", help="default %(default)s")
    pp.add_argument("--coreset_ratio", type=fraction_arg(include_one=True), default=0.01,
                    help="fraction of the patch features kept as prototypes (default "
                         "%(default)s)")
    pp.add_argument("--projection_dim", type=int_at_least(1), default=None,
                    help="select the coreset on a random projection to this many dims")
    pp.add_argument("--num_shots", type=int_at_least(1), default=None,
                    help="use only the first K (file-name order) non-held-out images")
    tp = sub.add_parser("train", help="train the flow, write the ProtoFlow file")
    _add_common_args(tp)
    tp.add_argument("--classes", nargs="+", default=None, action=UniqueNames,
                    help="exactly these classes, in place of --setting")
    tp.add_argument("--setting", default=None, choices=datasets.SETTINGS,
                    help="the classes of a setting (default multi_class: all)")
    tp.add_argument("--unseen_classes", nargs="*", default=None, action=UniqueNames)
    tp.add_argument("--from_obj_to_texture", action="store_true",
                    help="as in run_pretraining.py and run_test.py: --setting obj2tex")
    tp.add_argument("--prototypes_dir", default="weights/prototypes", help="default %(default)s")
    tp.add_argument("--output", required=True, help="e.g. weights/protoflow/multi_class.pt")
    tp.add_argument("--epochs", type=int_at_least(1, "nothing to do"), default=200,
                    help="default %(default)s")
    tp.add_argument("--lr", type=positive_float, default=2e-4,
                    help="Adam's peak learning rate (default %(default)s)")
    tp.add_argument("--warmup_epochs", type=int_at_least(0), default=2,
                    help="linear warm-up from lr / 10 (default %(default)s)")
    tp.add_argument("--n_blocks", type=int_at_least(1), default=DEFAULT_N_BLOCKS,
                    help="the flow's coupling blocks (default %(default)s)")
    tp.add_argument("--threshold_quantile", type=fraction_arg(), default=THRESHOLD_QUANTILE,
                    help="each class's threshold: this quantile of its held-out images' "
                         "scores (default %(default)s)")
    tp.add_argument("--resume", action="store_true",
                    help="continue the unfinished run saved in <output>.resume")
    return parser


def main(argv: Sequence[str] | None = None) -> list[str] | dict:
    """Run the `prototypes` or `train` command: its written paths, or the ProtoFlow file's
    content."""
    args = get_args_parser().parse_args(argv)
    args.data_path = datasets.resolve_train_root(args.data_path)
    with check_inputs(args):
        return run_prototypes(args) if args.command == "prototypes" else run_train(args)


def check_inputs(args: argparse.Namespace) -> contextlib.AbstractContextManager:
    """Before the encoder or any image is loaded: first --device (a GPU torch cannot see
    is one `error:` line, not a traceback), then the backbone name, the data's layout and
    classes (--classes rewritten as the folders spell them, datasets.as_found), the output
    folder (created, writable; stale temporary files removed). -> for `train`, the lock
    of --output (RunLock) to hold while training: a second run of the same --output (its
    .resume file, log and threshold) is refused by the holder's pid; `prototypes` writes
    each class's file whole, so runs of other classes may share a folder."""
    resolve_device(args.device)
    if not timm.is_model(args.encoder):
        raise FlagError(f"--encoder {args.encoder} is not a timm model name, e.g. "
                        f"{DEFAULT_ENCODER} (timm.list_models() lists them)")
    available = datasets.list_train_classes(args.data_path)
    args.classes = args.classes and datasets.as_found(args.classes, available)
    unknown = sorted(set(args.classes or []) - set(available))
    if unknown:
        raise FlagError(f"--classes: {unknown} have no {args.data_path}/train/<class> folder; "
                        f"available: {available}")
    if args.command == "prototypes":
        prepare_output_dir(args.output_dir, "--output_dir")
        return contextlib.nullcontext()
    if os.path.isdir(args.output):
        raise FlagError(f"--output {args.output} is a folder: name the file to write, e.g. "
                        f"{os.path.join(args.output, 'multi_class.pt')}")
    folder = prepare_output_dir(os.path.dirname(args.output) or ".", "--output's folder")
    remove_stale_tmp_files(folder)  # only dead writers' files: a live run's stay
    return RunLock(args.output, "--output", is_file=True)


def command_line(argv: Sequence[str]) -> int:
    """main's exit status: a diverged flow (FloatingPointError: nothing was written) is
    its message and exit 1, as run_pretraining.py's non-finite loss."""
    return cli(lambda: main(argv), failures=(FloatingPointError,))


if __name__ == "__main__":
    sys.exit(command_line(sys.argv[1:]))
