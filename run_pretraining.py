"""Train PMAD's reconstruction ViT (masked visual-token prediction) on normal images.

One process:  python run_pretraining.py --data_path data/Mvtec-ImageNet ...
Several GPUs: torchrun --nproc_per_node 8 run_pretraining.py ...   (scripts/train_*.sh)

--setting (docs/method.md 4): multi_class, obj2tex, tex2obj or leave_one_out. --output_dir
gets checkpoint-last.pth (every epoch), checkpoint-<epoch>.pth (every --save_ckpt_freq
epochs and the last), log.txt (a JSON line per epoch) and the token cache. The same
command again resumes from the newest complete checkpoint (--auto_resume, as in BEiT;
after --resume of another folder, --output_dir's newer ones: utils.resolve_resume), with
the flags that define the run unchanged (RESUME_MUST_MATCH). A run that does not
continue the folder's checkpoints (--no_auto_resume, --resume of another folder) first
moves them, log.txt and TensorBoard events kept there to <output_dir>/previous-<UTC time>/.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections.abc import Sequence

import torch

import datasets
import engine
import modeling_discrete_vae
import modeling_pmad
import utils
from masking_generator import (CLASS_MASK_RATIOS, DEFAULT_MASK_RATIO, FREQ_MODES, MaskGenerator,
                               MaskingPolicy, min_mask_ratio, num_masked)

# Arguments that must match for a resumed run to continue the same training: the model
# and data, the optimiser and its per-step schedules (recomputed from these flags at every
# start, also when a finished run is extended with a larger --epochs: the remaining steps
# follow them, warm-up included, which sets where the cosine starts), the masking, and
# --seed (the images' order each epoch, and the random streams a checkpoint without them,
# the original code's, restarts from). A changed one would make a run that is neither the
# old experiment nor a new one, and be recorded as the whole run's in every later
# checkpoint. Only --epochs may grow, once a run is finished (utils.check_resume_args).
# The process count, the tokenizer and the training images are checked too
# (check_resume_world_size, check_same_tokenizer, check_same_data).
RESUME_MUST_MATCH = ("model", "setting", "unseen_classes", "epochs", "batch_size",
                     "input_size", "tokenizer_model", "imagenet_default_mean_and_std",
                     "drop_path", "max_steps_per_epoch",
                     "lr", "min_lr", "warmup_epochs", "warmup_steps", "weight_decay",
                     "weight_decay_end", "opt_betas", "opt_eps", "clip_grad",
                     "mask_ratio", "dynamic_masking_start", "freq_mode", "fg_mask", "amp",
                     "seed")
# ... and, on top of those, what every process of one run must share (nodes started with
# other flags would each train their own run under one DDP average, or wait at a
# collective the others never reach)
RANKS_MUST_AGREE = RESUME_MUST_MATCH + ("save_ckpt_freq", "skip_bad_images", "deterministic",
                                        "layer_scale_init_value", "no_init")


DEFAULT_INIT_CKPT = "weights/beit_base_patch16_224_pt22k.pth"


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("PMAD pre-training", add_help=True)
    for add in (_add_model_args, _add_masking_args, _add_optimisation_args, _add_data_args,
                _add_run_args):
        add(p)
    return p


def _add_model_args(p: argparse.ArgumentParser) -> None:
    """The ViT, its initialisation and its visual tokenizer."""
    p.add_argument("--model", default="vit_base_patch16_224_8k_vocab",
                   choices=sorted(modeling_pmad.PMAD_MODELS), help="default %(default)s")
    p.add_argument("--input_size", type=int, default=224, help="default %(default)s")
    p.add_argument("--drop_path", type=utils.probability_arg, default=0.1, metavar="P",
                   help="stochastic depth rate of the last block, in [0, 1) (default "
                        "%(default)s)")
    p.add_argument("--layer_scale_init_value", type=utils.float_at_least(0.0), default=None,
                   help="default: the model's own (0.1 for tiny to base, 1e-5 for large; "
                        "docs/method.md 2); 0: no layer scale")
    p.add_argument("--init_ckpt", default=DEFAULT_INIT_CKPT,
                   help="BEiT self-supervised ImageNet-22k checkpoint to start from "
                        "(default %(default)s)")
    p.add_argument("--no_init", action="store_true",
                   help="random weights, not --init_ckpt (refused with another --init_ckpt)")
    p.add_argument("--tokenizer_model", default="dall-e",
                   choices=modeling_discrete_vae.available_tokenizers(),
                   help="default %(default)s")
    p.add_argument("--tokenizer_weight_path", default="weights/tokenizer",
                   help="the tokenizer file, or its folder (dall-e: encoder.pkl; default "
                        "%(default)s)")
    p.add_argument("--fit_kmeans_tokenizer", action="store_true",
                   help="kmeans: fit the tokenizer on the training images first when "
                        "--tokenizer_weight_path does not exist (the offline demo)")
    p.add_argument("--kmeans_vocab_size", type=utils.int_at_least(2), default=1024,
                   help="kmeans: codebook size (default %(default)s)")
    p.add_argument("--kmeans_out_index", type=int, choices=(0, 1, 2, 3), default=1,
                   help="EfficientNet-Lite0 level the k-means codes cluster, pooled per "
                        "patch (0: stride 2; 1: stride 4; 2: stride 8; 3: stride 16; "
                        "default %(default)s)")
    p.add_argument("--token_cache_dir", default=None, help="default <output_dir>/token_cache")


def _add_masking_args(p: argparse.ArgumentParser) -> None:
    """Combinational and dynamic masking (docs/method.md 5)."""
    p.add_argument("--mask_ratio", type=utils.mask_ratio_arg, default=DEFAULT_MASK_RATIO,
                   help="mask ratio of classes without a ratio of their own in the "
                        "paper's Table 6 (default %(default)s)")
    p.add_argument("--dynamic_masking_start", type=utils.int_at_least(0), default=100,
                   help="first epoch of dynamic masking and rank-weighted loss (default "
                        "%(default)s)")
    p.add_argument("--freq_mode", default="patch", choices=FREQ_MODES,
                   help="frequency weights from each patch's spectrum (the paper's intent) "
                        "or, 'global', the original code's patchified image spectrum")
    p.add_argument("--fg_mask", action=argparse.BooleanOptionalAction, default=True,
                   help="read <data_path>/fg_mask (--no-fg_mask: foreground masking uses "
                        "every patch)")


def _add_optimisation_args(p: argparse.ArgumentParser) -> None:
    """AdamW, its cosine schedules, clipping and autocast (BEiT's flags and defaults)."""
    p.add_argument("--batch_size", type=utils.int_at_least(1), default=4,
                   help="per process (default %(default)s)")
    p.add_argument("--epochs", type=utils.int_at_least(1, "nothing to do"), default=300,
                   help="default %(default)s")
    p.add_argument("--lr", type=utils.positive_float, default=1.5e-3,
                   help="peak learning rate (default %(default)s)")
    p.add_argument("--min_lr", type=utils.float_at_least(0.0), default=1e-5,
                   help="where the cosine ends (at most --lr; default %(default)s)")
    p.add_argument("--warmup_epochs", type=utils.int_at_least(0), default=10,
                   help="default %(default)s")
    p.add_argument("--warmup_steps", type=int, default=-1, help="> 0: overrides warmup_epochs")
    p.add_argument("--weight_decay", type=utils.float_at_least(0.0), default=0.05,
                   help="default %(default)s")
    p.add_argument("--weight_decay_end", type=utils.float_at_least(0.0), default=None,
                   help="end of weight decay's cosine schedule (default: constant)")
    p.add_argument("--opt_betas", type=utils.probability_arg, nargs=2, default=[0.9, 0.999],
                   metavar="BETA", help="AdamW's betas (default 0.9 0.999)")
    p.add_argument("--opt_eps", type=utils.positive_float, default=1e-8,
                   help="default %(default)s")
    p.add_argument("--clip_grad", type=utils.float_at_least(0.0), default=3.0,
                   help="gradient norm clipping; 0: no clipping (default %(default)s)")
    p.add_argument("--amp", default=None, choices=utils.AMP_CHOICES,
                   help="autocast (default: bf16 where it pays, else none; fp16 CUDA only)")


def _add_data_args(p: argparse.ArgumentParser) -> None:
    """The training set (ImageNet layout), its classes and how it is read."""
    p.add_argument("--data_path", default="data/Mvtec-ImageNet",
                   help="<data_path>/train/<class>/*.png and <data_path>/fg_mask/<class>/"
                        "*.png (or <data_path>/train, as the original scripts pass it)")
    p.add_argument("--setting", default=None, choices=datasets.SETTINGS,
                   help="default multi_class (obj2tex with --from_obj_to_texture)")
    p.add_argument("--unseen_classes", nargs="*", default=None, action=utils.UniqueNames,
                   help="leave_one_out: the class left out of training")
    p.add_argument("--from_obj_to_texture", action="store_true",
                   help="the original's switch: same as --setting obj2tex")
    p.add_argument("--imagenet_default_mean_and_std", action=argparse.BooleanOptionalAction,
                   default=True, help="ImageNet mean/std (else 0.5/0.5, BEiT's alternative)")
    p.add_argument("--skip_bad_images", action="store_true",
                   help="leave out unreadable images (listed) instead of stopping")
    p.add_argument("--cache_images", default="auto", choices=datasets.CACHE_IMAGES,
                   help="decode every image once and keep it with its tokens in RAM or on "
                        "the device (MVTec AD: 0.55 GB at 224 px, in each DDP process); "
                        "auto (default): ram where the node's processes fit in half its "
                        "available memory, else none (decode each epoch)")
    p.add_argument("--num_workers", type=utils.int_at_least(0), default=10,
                   help="default %(default)s")
    p.add_argument("--pin_mem", action=argparse.BooleanOptionalAction, default=True,
                   help="page-locked batches for a faster copy to the GPU (default: on)")


def _add_run_args(p: argparse.ArgumentParser) -> None:
    """Outputs, device, seeding and resumption."""
    p.add_argument("--output_dir", default="output_dir", help="default %(default)s")
    p.add_argument("--log_dir", default=None, help="TensorBoard folder (none if unset)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="default: cuda where a GPU is seen, else cpu (here %(default)s)")
    p.add_argument("--seed", type=utils.int_at_least(0), default=0, help="default %(default)s")
    p.add_argument("--deterministic", action="store_true",
                   help="bitwise-reproducible kernels (slower): a resumed run then equals "
                        "an uninterrupted one exactly")
    p.add_argument("--resume", default="",
                   help="checkpoint, or a run's folder (its newest complete checkpoint); "
                        "a larger --epochs extends a finished run")
    p.add_argument("--auto_resume", action="store_true",
                   help="resume from --output_dir's newest checkpoint (the default; BEiT's flag)")
    p.add_argument("--no_auto_resume", action="store_false", dest="auto_resume",
                   help="start afresh even when --output_dir holds a checkpoint (that run's "
                        "checkpoints and log.txt move to <output_dir>/previous-<UTC time>/)")
    p.set_defaults(auto_resume=True)
    p.add_argument("--save_ckpt_freq", type=utils.int_at_least(1), default=20,
                   help="checkpoint-<epoch>.pth every this many epochs, and at the end "
                        "(default %(default)s)")
    p.add_argument("--max_steps_per_epoch", type=utils.int_at_least(1), default=None,
                   help="cap the steps of each epoch (tests, demos)")
    # `python -m torch.distributed.launch` (the original scripts' launcher) appends this;
    # torchrun sets LOCAL_RANK instead, which utils.distributed reads either way
    p.add_argument("--local-rank", "--local_rank", dest="local_rank", type=int, default=None,
                   help=argparse.SUPPRESS)


def check_inputs(args: argparse.Namespace
                 ) -> tuple[list[str], str | None, dict | None, str | None,
                            utils.RunLock | None]:
    """Everything checkable before a model or the data is loaded, on every rank at once
    (utils.on_every_rank): flags, output folder (locked by rank 0), the data's layout and
    masks, --batch_size against the image count, the checkpoint to resume, the ranks'
    agreement on it and on the flags, the checkpoint's arguments, else --init_ckpt.
    -> (train classes, resume path, its contents memory-mapped, the line saying a
    finished run is extended or None, the lock to close when the run ends)."""
    lock = []
    try:
        train_classes, resume, header = utils.on_every_rank(lambda: _check_local(args, lock))
        check_ranks_agree(resume, header, args)
        extended = utils.on_every_rank(lambda: _check_resume(args, resume, header,
                                                             train_classes))
    except BaseException:
        for f in lock:
            f.close()
        raise
    return train_classes, resume, header, extended, lock[0] if lock else None


def _check_local(args: argparse.Namespace, lock: list
                 ) -> tuple[list[str], str | None, dict | None]:
    """check_inputs' checks up to the checkpoint to resume, on this rank alone; rank 0's
    lock of --output_dir goes into `lock`."""
    if args.fit_kmeans_tokenizer and args.tokenizer_model != "kmeans":
        raise utils.FlagError(f"--fit_kmeans_tokenizer needs --tokenizer_model kmeans, not "
                              f"{args.tokenizer_model}")
    if args.no_init and args.init_ckpt != DEFAULT_INIT_CKPT:
        # --no_init would win and the named weights be ignored with no word: the advice to
        # start a new run from a checkpoint (--init_ckpt <file>) added to a command that
        # trains from scratch (scripts/demo.sh) must not silently train from random weights
        raise utils.FlagError(f"--no_init (random weights) and --init_ckpt {args.init_ckpt} "
                              "(weights to start from) contradict each other: drop --no_init "
                              "to start from that file, or drop --init_ckpt to start from "
                              "random weights")
    if args.min_lr > args.lr:
        raise utils.FlagError(f"--min_lr {args.min_lr:g} is above --lr {args.lr:g}: the "
                              "cosine schedule decays the learning rate from --lr down to "
                              "--min_lr; pass a --min_lr of at most --lr")
    grid = check_image_grid(args)
    if utils.is_main_process():
        utils.prepare_output_dir(args.output_dir, "--output_dir")
        lock.append(utils.RunLock(args.output_dir, "--output_dir", hint=utils.TORCHRUN_HINT))
        utils.refuse_a_file(args.token_cache_dir, "--token_cache_dir")
        if args.log_dir:
            utils.refuse_a_file(args.log_dir, "--log_dir")
        for folder in (args.output_dir, args.token_cache_dir):
            utils.remove_stale_tmp_files(folder)
    available = datasets.list_train_classes(args.data_path)
    train_classes, test_classes = datasets.setting_classes(args.setting, args.unseen_classes,
                                                           available)
    if args.tokenizer_model == "kmeans" and os.path.exists(args.tokenizer_weight_path):
        check_existing_kmeans(args, sorted(set(test_classes) - set(train_classes)))
    check_mask_counts(args, train_classes, grid)
    samples = datasets.check_train_classes(args.data_path, train_classes,
                                           args.fg_mask and not args.skip_bad_images)
    datasets.require_full_batch(len(samples), args.batch_size)
    resume = utils.resolve_resume(args.resume, args.auto_resume, args.output_dir)
    header = utils.load_checkpoint_file(resume, mmap=True) if resume else None
    return train_classes, resume, header


def _check_resume(args: argparse.Namespace, resume: str | None, header: dict | None,
                  train_classes: list[str]) -> str | None:
    """check_inputs' checks of the checkpoint's arguments, else of --init_ckpt, on this
    rank alone. -> the line saying a finished run is extended, or None."""
    extended = None
    if header is not None and "optimizer" in header and "epoch" in header:
        utils.check_resume_world_size(header, resume)
        saved, now = resume_views(header.get("args"), vars(args), train_classes)
        extended = utils.check_resume_args(saved, now, resume, RESUME_MUST_MATCH,
                                           header["epoch"], explicit=bool(args.resume))
    if resume is None and not args.no_init:  # restore() loads it after every image's tokens
        modeling_pmad.check_init_checkpoint(args.model, args.init_ckpt, args.input_size,
                                            args.layer_scale_init_value)
    return extended


def check_existing_kmeans(args: argparse.Namespace, unseen: Sequence[str]) -> None:
    """An existing k-means tokenizer file. One fitted on a class this setting keeps
    unseen would leak it into a cross-class run (its codes follow that class's normal
    images), as a ViT trained on it would: refused. With --fit_kmeans_tokenizer, which
    fits only a missing file (a resume finds the one its first start fitted), one fitted
    with another --kmeans_vocab_size or --kmeans_out_index is refused (it was used in
    their place, with no word), and one that fits them is used, said once."""
    path = args.tokenizer_weight_path
    have = modeling_discrete_vae.kmeans_file_settings(path)
    if have is None:  # another layout: building the tokenizer names the problem
        return
    leaked = sorted(set(have["fit_classes"] or ()) & set(unseen))
    if leaked:
        raise utils.FlagError(
            f"{path} was fitted on images of {', '.join(leaked)}, which the {args.setting} "
            "setting keeps unseen (its codes would carry them into training): pass another "
            "--tokenizer_weight_path with --fit_kmeans_tokenizer, to fit one on the training "
            "classes")
    if not args.fit_kmeans_tokenizer:
        return
    asked = {"vocab_size": args.kmeans_vocab_size, "out_index": args.kmeans_out_index}
    differ = [k for k, v in asked.items() if have[k] != v]
    if differ:
        raise utils.FlagError(
            f"--fit_kmeans_tokenizer fits a tokenizer only when --tokenizer_weight_path does "
            f"not exist, and {path} was fitted with "
            + ", ".join(f"--kmeans_{k} {have[k]}" for k in differ) + " (asked: "
            + ", ".join(f"--kmeans_{k} {asked[k]}" for k in differ) + "): delete it, or pass "
            "another --tokenizer_weight_path, to fit anew; or pass "
            + " ".join(f"--kmeans_{k} {have[k]}" for k in differ) + " to use it")
    utils.main_print(f"[tokenizer] {path} exists: used as it is (--fit_kmeans_tokenizer fits "
                     "only a missing file)")


def check_ranks_agree(resume: str | None, header: dict | None, args: argparse.Namespace
                      ) -> None:
    """Every process must resume the same checkpoint and run with the same flags
    (RANKS_MUST_AGREE). Processes that disagree (nodes whose --output_dir is not one
    shared folder, or that were started with other flags) would train from different
    epochs, states or schedules, which DDP does not notice (it averages their gradients
    and logs the mean of their learning rates), or wait for ever at a barrier only some
    of them reach."""
    flags = {k: v for k, v in schedule_view(vars(args)).items() if k in RANKS_MUST_AGREE}
    seen = utils.all_gather_object(
        (resume, None if header is None else header.get("epoch"), flags))
    if len({(p, e) for p, e, _ in seen}) > 1:
        raise utils.CheckpointError(
            "the processes do not see the same checkpoint to resume ("
            + "; ".join(f"rank {r}: {p or 'none'}" + ("" if e is None else f", epoch {e}")
                        for r, (p, e, _) in enumerate(seen))
            + "): --output_dir (and --resume) must be one folder that "
            "every node reads and writes, e.g. on a shared file system")
    differ = [k for k in RANKS_MUST_AGREE if len({repr(f[k]) for _, _, f in seen}) > 1]
    if differ:
        raise utils.FlagError(
            "the processes were started with other flags: " + "; ".join(
                f"--{k} " + ", ".join(f"{f[k]} on rank {r}" for r, (_, _, f) in enumerate(seen))
                for k in differ)
            + ": start every node with the same command (scripts/train_multi_class.sh)"
            + (f"; {utils.AMP_DEFAULT_NOTE}, so give every node one --amp" if "amp" in differ
               else ""))


def schedule_view(run_args: dict) -> dict:
    """The arguments as the schedules read them, so that spellings of the same run compare
    equal on resume: --weight_decay_end equal to --weight_decay is its default (None),
    --clip_grad <= 0 is no clipping and --warmup_steps <= 0 is unused
    (build_optimisation, utils.cosine_scheduler)."""
    view = dict(run_args)
    if view.get("weight_decay_end") == view.get("weight_decay"):
        view["weight_decay_end"] = None
    if view.get("clip_grad") is not None and view["clip_grad"] <= 0:
        view["clip_grad"] = None
    if view.get("warmup_steps") is not None and view["warmup_steps"] <= 0:
        view["warmup_steps"] = -1
    return view


def resume_views(saved: dict | None, now: dict, train_classes: Sequence[str]
                 ) -> tuple[dict | None, dict]:
    """The saved and the current arguments as the run reads them (`schedule_view`), with
    the flags it does not read on either side left out of the comparison: --warmup_epochs
    when both set --warmup_steps > 0, --mask_ratio when every training class has its own
    Table 6 ratio."""
    if not saved:
        return saved, schedule_view(now)
    views = schedule_view(saved), schedule_view(now)
    unread = []
    if all((v.get("warmup_steps") or -1) > 0 for v in views):
        unread.append("warmup_epochs")
    if all(c in CLASS_MASK_RATIOS for c in train_classes):
        unread.append("mask_ratio")
    for view in views:
        view.update(dict.fromkeys(unread))
    return views


def tokenizer_grid(args: argparse.Namespace) -> tuple[int, str] | None:
    """modeling_discrete_vae.token_grid of the run's tokenizer; None where the grid
    follows --input_size (a k-means tokenizer this run fits)."""
    path = args.tokenizer_weight_path
    if args.tokenizer_model == "kmeans" and args.fit_kmeans_tokenizer and not os.path.exists(path):
        return None
    return modeling_discrete_vae.token_grid(args.tokenizer_model, path)


def check_image_grid(args: argparse.Namespace) -> int:
    """--input_size against the model's patch size and the tokenizer's token grid (a
    mismatch would fail only after every image is tokenized, with a shape error).
    -> the side of the patch grid."""
    patch = modeling_pmad.MODEL_CONFIGS[args.model]["patch_size"]
    if args.input_size < patch or args.input_size % patch:
        low = max(patch, args.input_size // patch * patch)
        raise utils.FlagError(f"--input_size {args.input_size} is not a multiple of "
                              f"{args.model}'s patch size {patch}: pass e.g. {low} or "
                              f"{low + patch} (224 for the released tokenizers)")
    grid = args.input_size // patch
    found = tokenizer_grid(args)
    if found is not None and found[0] != grid:
        side, source = found
        refit = (f", or fit a tokenizer at {args.input_size} px (--fit_kmeans_tokenizer with "
                 "a new --tokenizer_weight_path)" if args.tokenizer_model == "kmeans" else "")
        raise utils.FlagError(f"--input_size {args.input_size} makes a {grid}x{grid} patch "
                              f"grid but {source} gives {side}x{side} tokens per image: pass "
                              f"--input_size {side * patch}{refit}")
    return grid


def mask_ratio_note(train_classes: Sequence[str], mask_ratio: float) -> str | None:
    """Which training classes take their own Table 6 ratio rather than --mask_ratio: a
    class is matched by name, so a user's 'tile' or 'screw' gets MVTec AD's ratio. None
    where no class has one of its own."""
    own = [c for c in train_classes if c in CLASS_MASK_RATIOS]
    if not own:
        return None
    rest = len(train_classes) - len(own)
    ratios = utils.some_names([f"{c} {CLASS_MASK_RATIOS[c]:g}" for c in own], 4)
    return (f"[masking] {len(own)} class(es) named as MVTec AD's take their ratio of the "
            f"paper's Table 6 ({ratios})"
            + (f"; --mask_ratio {mask_ratio:g} sets the other {rest} (rename a folder to "
               "give it --mask_ratio)" if rest else "; --mask_ratio is not used"))


def build_mask_generator(args: argparse.Namespace, grid: int) -> MaskGenerator:
    """The combinational mask generator: each class's ratio of the paper's Table 6,
    --mask_ratio for a class without one."""
    return MaskGenerator(window_size=(grid, grid), class_ratios=CLASS_MASK_RATIOS,
                         default_ratio=args.mask_ratio)


def check_mask_counts(args: argparse.Namespace, train_classes: list[str], grid: int) -> None:
    """Every training class masks at least one patch per image: a mask of int(L r) = 0
    patches leaves no token to predict, and the loss (a mean over none) is NaN."""
    generator = build_mask_generator(args, grid)
    L = generator.num_patches
    empty = [c for c in train_classes if generator.num_masked_for(c) < 1]
    if not empty:
        return
    problems = []
    defaulted = [c for c in empty if c not in CLASS_MASK_RATIOS]
    if defaulted:
        r = args.mask_ratio
        least = min_mask_ratio(L)
        problems.append(f"--mask_ratio {r:g} masks no patch of class(es) "
                        f"{', '.join(defaulted)}, which have no ratio of their own "
                        f"(int({L} x {r:g}) = 0 of the {L} patches at --input_size "
                        f"{args.input_size}): pass --mask_ratio {least:g} or more")
    own = [c for c in empty if c in CLASS_MASK_RATIOS]
    if own:
        side = grid
        while any(num_masked(CLASS_MASK_RATIOS[c], side * side) < 1 for c in own):
            side += 1
        shown = f"{CLASS_MASK_RATIOS[own[0]]:g}" if len(own) == 1 else "r"
        problems.append("the paper's Table 6 mask ratio of class(es) " + ", ".join(
            f"{c} ({CLASS_MASK_RATIOS[c]:g})" for c in own) + " masks no patch at "
            f"--input_size {args.input_size} (int({L} x {shown}) = 0 of the {L} patches): pass "
            f"--input_size {side * args.input_size // grid} or more, with a tokenizer of "
            "that grid (a k-means tokenizer fitted at that size)")
    raise utils.FlagError("; and ".join(problems))


def main(args: argparse.Namespace) -> dict:
    """Train; returns a summary (classes, images, epochs run, last epoch's metrics)."""
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    with utils.deterministic_algorithms(args.deterministic), \
            utils.distributed(args.device) as env:
        return _train(args, env)


def _train(args: argparse.Namespace, env: utils.DistEnv) -> dict:
    """Checks, then tokens, model, masking policy, data and optimiser, in the order that
    keeps the random streams of a resumed run equal to an uninterrupted one's."""
    args.setting = datasets.resolve_setting(args.setting, args.from_obj_to_texture)
    args.data_path = datasets.resolve_train_root(args.data_path)
    args.amp = utils.resolve_amp(args.amp, env.device)
    args.token_cache_dir = args.token_cache_dir or os.path.join(args.output_dir, "token_cache")
    train_classes, resume, header, extended, lock = check_inputs(args)
    try:
        return _train_checked(args, env, train_classes, resume, header, extended)
    finally:
        if lock is not None:
            lock.close()


def flags_dump(args: argparse.Namespace) -> str:
    """The run's flags as JSON, as they act: under --no_init, init_ckpt is null (the
    default path beside it read as if BEiT's weights had been loaded)."""
    return json.dumps({**vars(args), **({"init_ckpt": None} if args.no_init else {})},
                      indent=1)


def _train_checked(args: argparse.Namespace, env: utils.DistEnv, train_classes: list[str],
                   resume: str | None, header: dict | None, extended: str | None) -> dict:
    """_train once check_inputs has passed."""
    utils.main_print(flags_dump(args))
    note = mask_ratio_note(train_classes, args.mask_ratio)
    if note:
        utils.main_print(note)
    done = header.get("epoch") if header is not None and "optimizer" in header else None
    if isinstance(done, int) and _continues_output_dir(resume, args.output_dir):
        # a crash between a save's numbered file and checkpoint-last.pth: catch the latter up
        utils.relink_last_checkpoint(args.output_dir, resume, done)
    if isinstance(done, int) and done + 1 >= args.epochs:
        utils.main_print(f"[resume] nothing to do: {resume} has trained {done + 1} epoch(s), "
                         f"and --epochs is {args.epochs}; pass a larger --epochs to extend "
                         "the run")
        return {"train_classes": train_classes, "num_images": 0, "num_steps": 0,
                "start_epoch": done + 1, "stats": {}, "checkpoints": []}
    # rank 0 decides (the file may exist on one node only, or appear while a slow rank
    # looks) and fits; the others wait for the file (or rank 0's error) in on_every_rank
    if utils.all_gather_object(args.fit_kmeans_tokenizer
                               and not os.path.exists(args.tokenizer_weight_path))[0]:
        utils.on_every_rank(lambda: modeling_discrete_vae.fit_kmeans_on_folder(
            args.data_path, train_classes, args.tokenizer_weight_path,
            vocab_size=args.kmeans_vocab_size, seed=args.seed,
            out_index=args.kmeans_out_index, image_size=args.input_size,
            num_workers=args.num_workers, skip_bad_images=args.skip_bad_images)
            if utils.is_main_process() else None)
    utils.seed_everything(args.seed, env.rank)  # after the k-means fit, which draws too
    model, policy, dataset, identity = build_model_and_data(args, env, train_classes, resume,
                                                            header)
    del header
    if extended:
        utils.main_print(extended)
    cache = args.cache_images
    if cache == "auto":
        steps = datasets.images_per_rank(len(dataset), env.world_size) // args.batch_size
        cut = args.max_steps_per_epoch is not None and args.max_steps_per_epoch < steps
        read = min(len(dataset), args.max_steps_per_epoch * args.batch_size * env.world_size
                   ) if cut else None  # the images of the epoch's steps, at most all
        cache, said = datasets.auto_cache(
            datasets.cache_bytes(dataset), int(os.environ.get("LOCAL_WORLD_SIZE", 1)),
            utils.available_memory(), read=None if read is None else (read, len(dataset)))
        utils.main_print(f"[data] {said}")
    loader, sampler = datasets.build_train_loader(
        dataset, args.batch_size, cache_images=cache, device=env.device,
        seed=args.seed, num_workers=args.num_workers, pin_memory=args.pin_mem)
    num_steps = min(len(loader), args.max_steps_per_epoch or len(loader))
    optimizer, scaler, config = build_optimisation(args, model, num_steps, env.device)
    start_epoch = restore(args, model, optimizer, scaler, policy, resume, env.device)
    # a run continues --output_dir only from one of its training states (a weights-only
    # file there starts afresh at epoch 0); its --init_ckpt or --resume is loaded now
    if not (_continues_output_dir(resume, args.output_dir) and isinstance(done, int)):
        set_aside_previous_run(args)
    elif args.resume:  # maybe a roll-back to an older epoch
        set_aside_previous_run(args, rolled_back=(resume, done))
    try:
        stats, saved = engine.fit(
            model, loader, sampler, optimizer, scaler, policy, config, start_epoch=start_epoch,
            epochs=args.epochs, output_dir=args.output_dir, save_ckpt_freq=args.save_ckpt_freq,
            run_args={**vars(args), **identity}, log_dir=args.log_dir,
            distributed=env.distributed,
            sample_names=[os.path.relpath(p, args.data_path) for p, _ in dataset.samples])
    except KeyboardInterrupt:
        utils.main_print(f"[train] stopped: {how_to_continue(args)}", file=sys.stderr)
        raise
    return {"train_classes": train_classes, "num_images": len(dataset),
            "num_steps": num_steps, "start_epoch": start_epoch, "stats": stats,
            "checkpoints": saved}


def how_to_continue(args: argparse.Namespace) -> str:
    """What continues a run stopped by Ctrl-C: the same command (auto-resume) from the
    newest complete checkpoint of --output_dir, the epoch it stopped in done again; not
    with --no_auto_resume (a new run), nor with --resume of a file in --output_dir (a
    roll-back to it again, the epochs since set aside)."""
    last = utils.find_latest_checkpoint(args.output_dir)
    if last is None:
        return "no epoch of this run was saved; the same command starts it again"
    if args.resume and os.path.isfile(args.resume) \
            and _continues_output_dir(args.resume, args.output_dir):
        return (f"run the command without --resume to continue from {last} (with it, the "
                f"run goes back to {args.resume} again)")
    if not args.auto_resume:
        return (f"run the command without --no_auto_resume to continue from {last} (with "
                "it, a new run starts and this one moves to previous-<UTC time>/)")
    return f"the same command continues from {last}; the epoch it stopped in restarts"


def _continues_output_dir(resume: str | None, output_dir: str) -> bool:
    """Whether this run resumes a checkpoint of --output_dir itself (else it starts there
    afresh, or from another folder's checkpoint)."""
    return resume is not None and (os.path.realpath(os.path.dirname(os.path.abspath(resume)))
                                   == os.path.realpath(output_dir))


def set_aside_previous_run(args: argparse.Namespace,
                           rolled_back: tuple[str, int] | None = None) -> None:
    """Before a run that does not continue --output_dir's checkpoints writes there: an
    earlier run's checkpoints, log.txt and TensorBoard events inside --output_dir move to
    <output_dir>/previous-<UTC time>/ (utils.archive_previous_run), once, on rank 0,
    after every rank has looked for its checkpoint to resume.

    `rolled_back` = (the checkpoint resumed, its epoch): an explicit --resume of one of
    --output_dir's own checkpoints; those of later epochs, which this run abandons, move
    there instead (with a copy of log.txt), so that a later auto-resume continues this
    run and not the abandoned one. Nothing moves when none is newer."""
    utils.barrier()
    if utils.is_main_process() and rolled_back is not None:
        resume, epoch = rolled_back
        moved = utils.archive_previous_run(args.output_dir, newer_than=epoch)
        if moved is not None:
            folder, paths = moved
            checkpoints = [p for p in paths if utils.CHECKPOINT_PATTERN.match(p)]
            copied = ", with a copy of log.txt" if "log.txt" in paths else ""
            print(f"[resume] {resume} (epoch {epoch}) is older than {args.output_dir}'s "
                  f"newest checkpoint: moved {', '.join(checkpoints)}, of the later epochs "
                  f"this run abandons, to {folder}{copied}, so that a later auto-resume "
                  "continues this run (nothing deleted)", flush=True)
    elif utils.is_main_process():
        moved = utils.archive_previous_run(args.output_dir, args.log_dir)
        if moved is not None:
            folder, paths = moved
            checkpoints = [p for p in paths if utils.CHECKPOINT_PATTERN.match(p)]
            others = ["log.txt"] if "log.txt" in paths else []
            events = len(paths) - len(checkpoints) - len(others)
            others += [f"{events} TensorBoard event file(s)"] if events else []
            print(f"[output_dir] {args.output_dir} holds an earlier run that this one does "
                  f"not continue: moved its {len(checkpoints)} checkpoint(s)"
                  + "".join(f", {o}" for o in others) + f" to {folder} (nothing deleted)",
                  flush=True)
    utils.barrier()


def restore(args: argparse.Namespace, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
            scaler: torch.amp.GradScaler, policy: MaskingPolicy, resume: str | None,
            device: torch.device) -> int:
    """Resume (called last: the random states restored are then those at the save), or
    BEiT's initialisation unless --no_init. -> the first epoch to train."""
    if not resume:
        if not args.no_init:
            modeling_pmad.load_init_checkpoint(model, args.init_ckpt)
        return 0
    info = utils.load_training_state(resume, model=model, optimizer=optimizer, scaler=scaler,
                                     masking=policy, device=device)
    utils.main_print(f"[resume] {resume}: continuing at epoch {info['start_epoch']}")
    return info["start_epoch"]


def build_model_and_data(args: argparse.Namespace, env: utils.DistEnv, train_classes: list[str],
                         resume: str | None, header: dict | None
                         ) -> tuple[torch.nn.Module, MaskingPolicy, datasets.PretrainDataset,
                                    dict]:
    """The ViT on the device (its shapes checked against the checkpoint to resume before
    any data is read), the masking policy, the training set with every image's visual
    tokens cached (each rank tokenizes its share of the missing ones), and the run's
    `data_identity` (checked against the checkpoint's and across the ranks before any
    token is computed: the ranks share one token table)."""
    tokenizer, model, policy, dataset, identity = utils.on_every_rank(
        lambda: _build_local(args, env, train_classes, resume, header))
    check_ranks_read_same_data(identity, args.data_path,
                               [p for p, _ in dataset.samples]
                               + [m for m in dataset.mask_paths if m is not None])
    stats = datasets.cache_tokens(dataset, tokenizer, args.token_cache_dir, device=env.device,
                                  num_workers=args.num_workers)
    utils.main_print(f"[tokens] {stats['hits']} cached, {stats['misses']} computed in "
                     f"{args.token_cache_dir}")
    del tokenizer  # not needed again: every step reads cached tokens
    if env.device.type == "cuda":
        torch.cuda.empty_cache()
    utils.main_print(f"[data] setting {args.setting}: {len(dataset)} images of "
                     f"{len(train_classes)} classes {train_classes}")
    return model.to(env.device), policy, dataset, identity


def _build_local(args: argparse.Namespace, env: utils.DistEnv, train_classes: list[str],
                 resume: str | None, header: dict | None) -> tuple:
    """build_model_and_data's part on this rank alone: tokenizer, model, masking policy,
    training set and its data_identity, each checked against the checkpoint."""
    tokenizer = modeling_discrete_vae.create_tokenizer(
        args.tokenizer_model, args.tokenizer_weight_path, env.device, amp=args.amp)
    mean, std = datasets.normalization(args.imagenet_default_mean_and_std)
    model = modeling_pmad.build_pmad(args.model, vocab_size=tokenizer.vocab_size,
                                     img_size=args.input_size,
                                     init_values=args.layer_scale_init_value,
                                     drop_path_rate=args.drop_path)
    if header is not None:
        check_same_tokenizer(header, tokenizer.fingerprint, tokenizer.vocab_size, resume)
        modeling_pmad.load_checkpoint(model, resume, strict=True, checkpoint=header)
    patch_size = model.patch_embed.patch_size[0]
    policy = MaskingPolicy(
        build_mask_generator(args, model.patch_embed.grid_size[0]), train_classes,
        dynamic_start=args.dynamic_masking_start, freq_mode=args.freq_mode,
        patch_size=patch_size, seed=(args.seed, env.rank), device=env.device)
    dataset = datasets.PretrainDataset(
        args.data_path, train_classes, token_size=tokenizer.image_size,
        img_size=args.input_size, mean=mean, std=std, patch_size=patch_size,
        fg_mask=args.fg_mask, skip_bad_images=args.skip_bad_images,
        freq_weights=policy.frequency)
    identity = data_identity(tokenizer.fingerprint, dataset, args.data_path, train_classes)
    if header is not None:
        check_same_data(header.get("args"), identity, resume)
    return tokenizer, model, policy, dataset, identity


def check_ranks_read_same_data(identity: dict, data_path: str, paths: Sequence[str]) -> None:
    """Every rank must read the same training images and tokenizer: they share one token
    table, which rank 0 also caches under its own files' names, so nodes whose copies
    of the data differ would train on tokens of the other node's images (and leave a
    cache that a later run trusts), and the same foreground masks. Where they differ, the
    files that differ from rank 0's are named (`paths`: this rank's training images and
    masks, read again to say so)."""
    seen = utils.all_gather_object(identity)
    if all(s == seen[0] for s in seen):
        return
    first = seen[0]
    if any(s["tokenizer_fingerprint"] != first["tokenizer_fingerprint"] for s in seen):
        raise utils.FlagError(
            "the processes read other visual tokenizers (" + "; ".join(
                f"rank {r}: {s['tokenizer_fingerprint']}" for r, s in enumerate(seen))
            + "): every node's --tokenizer_weight_path must be the same file")
    files = utils.all_gather_object({os.path.relpath(p, data_path): utils.file_sha256(p)
                                     for p in paths})
    raise utils.LayoutError(
        "the processes read other training images or foreground masks (" + "; ".join(
            f"rank {r}: {s['train_images']} image(s){files_differ(files[0], files[r])}"
            for r, s in enumerate(seen))
        + f"): every node's --data_path ({data_path} on this one) must hold the same files, "
        "e.g. one shared folder or a copy by `rsync -a`")


def files_differ(first: dict[str, str], other: dict[str, str]) -> str:
    """How one rank's training images ({relative path: sha256}) differ from rank 0's:
    ', lacks a.png, has more b.png, other content: c.png' (a few of each), or ''."""
    kinds = {"lacks": sorted(set(first) - set(other)),
             "has more": sorted(set(other) - set(first)),
             "other content:": sorted(k for k in set(first) & set(other) if first[k] != other[k])}
    return "".join(f", {kind} {utils.some_names(names, 3)}" for kind, names in kinds.items()
                   if names)


FG_MASKS = "train_fg_masks_sha256"  # data_identity's digest of the foreground masks


def data_identity(tokenizer_fingerprint: str, dataset: datasets.PretrainDataset,
                  data_path: str, train_classes: Sequence[str]) -> dict:
    """What a run's targets and images are, saved with its arguments: the tokenizer's
    fingerprint (its file and compute precision), the training images' names, byte sizes
    and contents (an image replaced or edited under its name, even at the same size; not
    their mtimes, which a copy of the data to another node need not keep) and the classes
    (run_test.py refuses to score one of them as unseen). The contents cost one read of
    the training images per start; the sizes stay for checkpoints saved before the
    contents were. Each image's content hash is kept too (sorted, TRAIN_IMAGE_HASHES):
    run_test.py names a test image the ViT trained on (a re-split after training). With
    foreground masks, their contents too (FG_MASKS): masks remade or edited since change
    where the ViT masks."""
    paths = [p for p, _ in dataset.samples]
    names = "\n".join(os.path.relpath(p, data_path) for p in paths)
    sizes = ",".join(str(os.path.getsize(p)) for p in paths)
    hashes = [utils.file_sha256(p) for p in paths]
    masks = [m for m in dataset.mask_paths if m is not None]
    fg = ({FG_MASKS: hashlib.sha256(",".join(utils.file_sha256(m) for m in masks).encode())
           .hexdigest()} if masks else {})
    return {**fg, "tokenizer_fingerprint": tokenizer_fingerprint,
            "train_classes": list(train_classes),
            "train_images": len(dataset),
            "train_images_sha256": hashlib.sha256(names.encode("utf-8", "surrogateescape"))
            .hexdigest(),
            "train_image_sizes_sha256": hashlib.sha256(sizes.encode()).hexdigest(),
            "train_image_contents_sha256": hashlib.sha256(",".join(hashes).encode())
            .hexdigest(),
            utils.TRAIN_IMAGE_HASHES: sorted(set(hashes))}


def check_same_tokenizer(header: dict, fingerprint: str, vocab_size: int, path: str) -> None:
    """A resumed run must predict the same tokens: checked as soon as the tokenizer is
    built, before the checkpoint's weights meet the model, whose lm_head follows the
    tokenizer's vocabulary (another vocabulary would read as another --model). Another
    file of the same vocabulary passes every flag check and silently changes the
    targets; a checkpoint written before the fingerprint was saved is checked by its
    vocabulary only."""
    rows = modeling_pmad.checkpoint_vocab_size(header, path)
    saved = (header.get("args") or {}).get("tokenizer_fingerprint", fingerprint)
    if rows != vocab_size:
        problem = (f"a visual tokenizer of {vocab_size} codes (its lm_head predicts {rows}: "
                   "--tokenizer_model or --tokenizer_weight_path differs)")
    elif saved != fingerprint:
        problem = ("another visual tokenizer (its file --tokenizer_weight_path, or the "
                   "precision its tokens are computed in, differs), so other targets")
    else:
        return
    raise utils.CheckpointError(f"{path} was trained on other data; this run has {problem}. "
                                "Resume it with the tokenizer it was trained with, or start "
                                "a new run in another --output_dir")


def check_same_data(saved: dict | None, identity: dict, path: str) -> None:
    """A resumed run must read the same images (its tokenizer: `check_same_tokenizer`):
    another image set (--data_path, --skip_bad_images, a folder edited) of the same size
    and class names would pass every flag check and silently change the experiment.
    Checkpoints written before these were saved are not checked."""
    saved = saved or {}
    if saved.get("train_images_sha256", identity["train_images_sha256"]) \
            != identity["train_images_sha256"]:
        problem = (f"another set of training images ({saved.get('train_images')} then, "
                   f"{identity['train_images']} now: --data_path, the folders' files or "
                   "--skip_bad_images differ)")
    elif any(saved.get(key, identity[key]) != identity[key]
             for key in ("train_image_sizes_sha256", "train_image_contents_sha256")):
        problem = ("training images of the same names but other contents (an image was "
                   "replaced or edited since)")
    elif FG_MASKS in saved and FG_MASKS in identity and saved[FG_MASKS] != identity[FG_MASKS]:
        problem = ("other foreground masks (fg_mask/ remade, e.g. by --make_fg_masks, or "
                   "edited since), which change where the ViT masks")
    else:
        return
    raise utils.CheckpointError(f"{path} was trained on other data; this run has {problem}. "
                                "Resume it with the data it was trained on, or start a new "
                                "run in another --output_dir")


def build_optimisation(args: argparse.Namespace, model: torch.nn.Module, num_steps: int,
                       device: torch.device
                       ) -> tuple[torch.optim.Optimizer, torch.amp.GradScaler, engine.TrainConfig]:
    """AdamW (no decay on 1-d parameters, i.e. biases, norms and layer scales, nor on
    cls_token and pos_embed; the relative position bias tables are 2-d and decayed, as in
    BEiT and docs/method.md 2), the loss scaler, and the per-step cosine schedules of lr
    and weight decay."""
    optimizer = utils.build_optimizer(model, args.lr, args.weight_decay,
                                      tuple(args.opt_betas), args.opt_eps, device)
    lr_schedule = utils.cosine_scheduler(args.lr, args.min_lr, args.epochs, num_steps,
                                         warmup_epochs=args.warmup_epochs,
                                         warmup_steps=args.warmup_steps)
    wd_end = args.weight_decay if args.weight_decay_end is None else args.weight_decay_end
    wd_schedule = utils.cosine_scheduler(args.weight_decay, wd_end, args.epochs, num_steps)
    return (optimizer, utils.make_grad_scaler(device, args.amp),
            engine.TrainConfig(lr_schedule, wd_schedule, num_steps, clip_grad=args.clip_grad,
                               amp=args.amp))


def command_line(argv: list[str]) -> int:
    """main's exit status: a non-finite loss (the last good checkpoint named, nothing
    after it written) is its message and exit 1, on each rank."""
    return utils.cli(lambda: main(get_args_parser().parse_args(argv)),
                     failures=(engine.NonFiniteLossError,))


if __name__ == "__main__":
    sys.exit(command_line(sys.argv[1:]))
