"""Train PMAD's reconstruction ViT (masked visual-token prediction) on normal images.

One process:      python run_pretraining.py --data_path data/Mvtec-ImageNet ...
Several GPUs:     torchrun --nproc_per_node 8 run_pretraining.py ...   (scripts/train_*.sh)

Settings (docs/method.md 4): multi_class (every class of --data_path), obj2tex (the 10 MVTec
objects), tex2obj (the 5 textures), leave_one_out (all but --unseen_classes).
Outputs in --output_dir: checkpoint-last.pth (every epoch), checkpoint-<epoch>.pth (every
--save_ckpt_freq epochs and the last), log.txt (one JSON object per epoch), the token
cache; TensorBoard events in --log_dir. Re-running the same command resumes from the
newest complete checkpoint (--auto_resume, on by default as in BEiT).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Iterable

import torch

import datasets
import engine
import modeling_discrete_vae
import modeling_pmad
import utils
from masking_generator import CLASS_MASK_RATIOS, MaskGenerator, MaskingPolicy

# Arguments that must match for a resumed run to continue the same training.
RESUME_MUST_MATCH = ("model", "setting", "unseen_classes", "epochs", "batch_size",
                     "input_size", "tokenizer_model")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("PMAD pre-training", add_help=True)
    for add in (_add_model_args, _add_masking_args, _add_optimisation_args, _add_data_args,
                _add_run_args):
        add(p)
    return p


def _add_model_args(p: argparse.ArgumentParser) -> None:
    """The ViT, its initialisation and its visual tokenizer."""
    p.add_argument("--model", default="vit_base_patch16_224_8k_vocab",
                   choices=sorted(modeling_pmad.PMAD_MODELS))
    p.add_argument("--input_size", type=int, default=224)
    p.add_argument("--drop_path", type=float, default=0.1, metavar="PCT")
    p.add_argument("--layer_scale_init_value", type=float, default=0.1,
                   help="0.1 for base, 1e-5 for large (docs/method.md 2)")
    p.add_argument("--init_ckpt", default="weights/beit_base_patch16_224_pt22k.pth",
                   help="BEiT self-supervised ImageNet-22k checkpoint to start from")
    p.add_argument("--no_init", action="store_true",
                   help="start from random weights instead of --init_ckpt")
    p.add_argument("--tokenizer_model", default="dall-e",
                   choices=modeling_discrete_vae.available_tokenizers())
    p.add_argument("--tokenizer_weight_path", default="weights/tokenizer",
                   help="the tokenizer file, or the folder holding it (dall-e: encoder.pkl)")
    p.add_argument("--fit_kmeans_tokenizer", action="store_true",
                   help="kmeans only: when --tokenizer_weight_path does not exist, fit the "
                        "tokenizer on this run's training images first (the offline demo)")
    p.add_argument("--kmeans_vocab_size", type=int, default=1024,
                   help="codebook size for --fit_kmeans_tokenizer")
    p.add_argument("--kmeans_out_index", type=int, default=1,
                   help="for --fit_kmeans_tokenizer: the EfficientNet-Lite0 feature level the "
                        "codes cluster (1: stride 4, pooled per patch; 3: stride 16)")
    p.add_argument("--token_cache_dir", default=None,
                   help="where visual tokens are cached (default <output_dir>/token_cache)")


def _add_masking_args(p: argparse.ArgumentParser) -> None:
    """Combinational and dynamic masking (docs/method.md 5)."""
    p.add_argument("--mask_ratio", type=utils.mask_ratio_arg, default=0.3,
                   help="mask ratio of classes without a ratio of their own (docs/method.md 5)")
    p.add_argument("--dynamic_masking_start", type=int, default=100,
                   help="first epoch of dynamic masking and rank-weighted loss")
    p.add_argument("--freq_mode", default="patch", choices=["patch", "global"],
                   help="frequency-based masking weights: each patch's own spectrum (the "
                        "paper's intent), or 'global': the original code's patchified "
                        "whole-image spectrum")
    p.add_argument("--fg_mask", action=argparse.BooleanOptionalAction, default=True,
                   help="read foreground masks from <data_path>/fg_mask (--no-fg_mask: "
                        "data without them; foreground-limited masking then uses all patches)")


def _add_optimisation_args(p: argparse.ArgumentParser) -> None:
    """AdamW, its cosine schedules, clipping and autocast (BEiT's flags and defaults)."""
    p.add_argument("--batch_size", type=utils.int_at_least(1), default=4, help="per process")
    p.add_argument("--epochs", type=utils.int_at_least(1, "nothing to do"), default=300)
    p.add_argument("--lr", type=utils.positive_float, default=1.5e-3)
    p.add_argument("--min_lr", type=float, default=1e-5)
    p.add_argument("--warmup_epochs", type=int, default=10)
    p.add_argument("--warmup_steps", type=int, default=-1,
                   help="warm-up length in steps; overrides --warmup_epochs when > 0")
    p.add_argument("--weight_decay", type=float, default=0.05)
    p.add_argument("--weight_decay_end", type=float, default=None,
                   help="final weight decay of its cosine schedule (default: constant)")
    p.add_argument("--opt_betas", type=float, nargs=2, default=[0.9, 0.999], metavar="BETA")
    p.add_argument("--opt_eps", type=float, default=1e-8)
    p.add_argument("--clip_grad", type=float, default=3.0, help="0 or less: no clipping")
    p.add_argument("--amp", default=None, choices=utils.AMP_CHOICES,
                   help="autocast (default: bf16 where supported, else none; fp16 with a "
                        "loss scaler on CUDA only)")


def _add_data_args(p: argparse.ArgumentParser) -> None:
    """The training set (ImageNet layout), its classes and how it is read."""
    p.add_argument("--data_path", default="data/Mvtec-ImageNet",
                   help="ImageNet layout: <data_path>/train/<class>/*.png, "
                        "<data_path>/fg_mask/<class>/*.png (<data_path>/train, the "
                        "original scripts' form, is accepted too)")
    p.add_argument("--setting", default=None, choices=datasets.SETTINGS,
                   help="default multi_class (obj2tex with --from_obj_to_texture)")
    p.add_argument("--unseen_classes", nargs="*", default=None,
                   help="leave_one_out: the class left out of training")
    p.add_argument("--from_obj_to_texture", action="store_true",
                   help="the original's switch: same as --setting obj2tex")
    p.add_argument("--imagenet_default_mean_and_std", action=argparse.BooleanOptionalAction,
                   default=True, help="ImageNet mean/std (else 0.5/0.5, BEiT's alternative)")
    p.add_argument("--skip_bad_images", action="store_true",
                   help="leave out unreadable images (listed) instead of stopping")
    p.add_argument("--cache_images", default="none", choices=["none", "ram", "device"],
                   help="decode and resize every training image once and keep it (uint8, "
                        "with its tokens) in RAM or on the device: no PNG decoding per "
                        "epoch, for small sets such as MVTec AD (0.55 GB at 224 px); "
                        "with DDP each process keeps its share")
    p.add_argument("--num_workers", type=utils.int_at_least(0), default=10)
    p.add_argument("--pin_mem", action=argparse.BooleanOptionalAction, default=True)


def _add_run_args(p: argparse.ArgumentParser) -> None:
    """Outputs, device, seeding and resumption."""
    p.add_argument("--output_dir", default="output_dir")
    p.add_argument("--log_dir", default=None, help="TensorBoard folder (none if unset)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--deterministic", action="store_true",
                   help="bitwise-reproducible kernels (slower): a resumed run then equals "
                        "an uninterrupted one exactly, not just to rounding")
    p.add_argument("--resume", default="",
                   help="checkpoint to resume from, or a run's folder (its newest complete "
                        "checkpoint); a finished run resumed with a larger --epochs is "
                        "extended")
    p.add_argument("--auto_resume", action="store_true",
                   help="resume from the newest checkpoint in --output_dir (the default; the "
                        "flag is BEiT's, kept so that its command lines run unchanged)")
    p.add_argument("--no_auto_resume", action="store_false", dest="auto_resume",
                   help="start afresh even when --output_dir holds a checkpoint")
    p.set_defaults(auto_resume=True)
    p.add_argument("--save_ckpt_freq", type=utils.int_at_least(1), default=20)
    p.add_argument("--max_steps_per_epoch", type=utils.int_at_least(1), default=None,
                   help="cap the steps of each epoch (tests, demos)")


def fit_kmeans(args: argparse.Namespace, train_classes: list[str]) -> None:
    """Fit the demo's k-means tokenizer on the training images (rank 0; the others wait)
    unless the file exists already."""
    if args.tokenizer_model != "kmeans":
        raise utils.FlagError(f"--fit_kmeans_tokenizer needs --tokenizer_model kmeans, not "
                              f"{args.tokenizer_model}")
    if os.path.exists(args.tokenizer_weight_path):
        return
    if utils.is_main_process():
        images = datasets.TrainImageDataset(args.data_path, train_classes,
                                            datasets.build_token_transform(args.input_size))
        batches = (x for x, _ in torch.utils.data.DataLoader(
            images, batch_size=32, num_workers=args.num_workers))
        utils.main_print(f"[tokenizer] fitting {args.kmeans_vocab_size} k-means codes on "
                         f"{len(images)} images -> {args.tokenizer_weight_path}")
        modeling_discrete_vae.fit_kmeans_tokenizer(
            batches, args.tokenizer_weight_path, vocab_size=args.kmeans_vocab_size,
            seed=args.seed, out_index=args.kmeans_out_index, image_size=args.input_size)
    utils.barrier()


def check_inputs(args: argparse.Namespace) -> tuple[list[str], str | None, dict | None]:
    """Everything checkable before a model or the data is loaded: the output folder
    (created, writable; stale temporary files removed), the data's layout and masks,
    the checkpoint to resume and its arguments. -> (train classes, resume path, its
    contents memory-mapped)."""
    if utils.is_main_process():
        utils.prepare_output_dir(args.output_dir, "--output_dir")
        for folder in (args.output_dir, args.token_cache_dir):
            utils.remove_stale_tmp_files(folder)
    available = datasets.list_train_classes(args.data_path)
    train_classes, _ = datasets.setting_classes(args.setting, args.unseen_classes, available)
    datasets.check_train_classes(args.data_path, train_classes,
                                 args.fg_mask and not args.skip_bad_images)
    resume = utils.resolve_resume(args.resume, args.auto_resume, args.output_dir)
    header = utils.load_checkpoint_file(resume, mmap=True) if resume else None
    if header is not None and "optimizer" in header and "epoch" in header:
        utils.check_resume_args(header.get("args"), vars(args), resume, RESUME_MUST_MATCH,
                                header["epoch"], explicit=bool(args.resume))
    return train_classes, resume, header


def main(args: argparse.Namespace) -> dict:
    """Train; returns a summary (classes, images, epochs run, last epoch's metrics)."""
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
    train_classes, resume, header = check_inputs(args)
    utils.main_print(json.dumps(vars(args), indent=1))
    done = header.get("epoch") if header is not None and "optimizer" in header else None
    if isinstance(done, int) and done + 1 >= args.epochs:
        utils.main_print(f"[resume] nothing to do: {resume} has trained {done + 1} epoch(s) "
                         f"of --epochs {args.epochs}; pass a larger --epochs to extend the run")
        return {"train_classes": train_classes, "num_images": 0, "num_steps": 0,
                "start_epoch": done + 1, "stats": {}, "checkpoints": []}
    if args.fit_kmeans_tokenizer:
        fit_kmeans(args, train_classes)
    utils.seed_everything(args.seed, env.rank)  # after the k-means fit, which draws too
    model, policy, dataset = build_model_and_data(args, env, train_classes, resume, header)
    del header
    loader, sampler = datasets.build_train_loader(
        dataset, args.batch_size, cache_images=args.cache_images, device=env.device,
        seed=args.seed, num_workers=args.num_workers, pin_memory=args.pin_mem)
    num_steps = min(len(loader), args.max_steps_per_epoch or len(loader))
    if num_steps < 1:
        raise ValueError(f"{len(dataset)} training images make no full batch of "
                         f"--batch_size {args.batch_size} on each of {env.world_size} "
                         "process(es): lower --batch_size or use fewer processes")
    model.to(env.device)
    optimizer, scaler, config = build_optimisation(args, model, num_steps, env.device)
    start_epoch = 0
    if resume:
        # Last, so that the restored random states are exactly those at the save.
        info = utils.load_training_state(resume, model=model, optimizer=optimizer,
                                         scaler=scaler, masking=policy, device=env.device)
        start_epoch = info["start_epoch"]
        if info["sampler_seed"] is not None:
            sampler.seed = info["sampler_seed"]
        utils.main_print(f"[resume] {resume}: continuing at epoch {start_epoch}")
    elif not args.no_init:
        modeling_pmad.load_init_checkpoint(model, args.init_ckpt)
    names = [os.path.relpath(p, args.data_path) for p, _ in dataset.samples]
    stats, saved = fit(args, env, model, loader, sampler, optimizer, scaler, policy, config,
                       start_epoch, names)
    return {"train_classes": train_classes, "num_images": len(dataset),
            "num_steps": num_steps, "start_epoch": start_epoch, "stats": stats,
            "checkpoints": saved}


def build_model_and_data(args: argparse.Namespace, env: utils.DistEnv, train_classes: list[str],
                         resume: str | None, header: dict | None
                         ) -> tuple[torch.nn.Module, MaskingPolicy, datasets.PretrainDataset]:
    """The ViT (its shapes checked against the checkpoint to resume before any data is
    read), the masking policy, and the training set with every image's visual tokens
    cached (each rank tokenizes its share of the missing ones)."""
    tokenizer = modeling_discrete_vae.create_tokenizer(
        args.tokenizer_model, args.tokenizer_weight_path, env.device, amp=args.amp)
    mean, std = datasets.normalization(args.imagenet_default_mean_and_std)
    model = modeling_pmad.build_pmad(args.model, vocab_size=tokenizer.vocab_size,
                                     img_size=args.input_size,
                                     init_values=args.layer_scale_init_value,
                                     drop_path_rate=args.drop_path)
    if header is not None:
        try:
            modeling_pmad.load_checkpoint(model, resume, strict=True, checkpoint=header)
        except utils.CheckpointError as e:
            raise utils.CheckpointError(f"{e}; resume it with the --model and --input_size "
                                        "it was trained with") from None
    patch_size = model.patch_embed.patch_size[0]
    policy = MaskingPolicy(
        MaskGenerator(window_size=model.patch_embed.grid_size,
                      class_ratios=CLASS_MASK_RATIOS, default_ratio=args.mask_ratio),
        train_classes, dynamic_start=args.dynamic_masking_start, freq_mode=args.freq_mode,
        patch_size=patch_size, seed=(args.seed, env.rank), device=env.device)
    dataset = datasets.PretrainDataset(
        args.data_path, train_classes, token_size=tokenizer.image_size,
        img_size=args.input_size, mean=mean, std=std, patch_size=patch_size,
        fg_mask=args.fg_mask, skip_bad_images=args.skip_bad_images,
        freq_weights=policy.frequency)
    stats = datasets.cache_tokens(dataset, tokenizer, args.token_cache_dir, device=env.device,
                                  num_workers=args.num_workers)
    utils.main_print(f"[tokens] {stats['hits']} cached, {stats['misses']} computed in "
                     f"{args.token_cache_dir}")
    del tokenizer  # not needed again: every step reads cached tokens
    if env.device.type == "cuda":
        torch.cuda.empty_cache()
    utils.main_print(f"[data] setting {args.setting}: {len(dataset)} images of "
                     f"{len(train_classes)} classes {train_classes}")
    return model, policy, dataset


def build_optimisation(args: argparse.Namespace, model: torch.nn.Module, num_steps: int,
                       device: torch.device
                       ) -> tuple[torch.optim.Optimizer, torch.amp.GradScaler, engine.TrainConfig]:
    """AdamW (no decay on biases, norms and the relative position tables), the loss
    scaler, and the per-step cosine schedules of lr and weight decay."""
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


def fit(args: argparse.Namespace, env: utils.DistEnv, model: torch.nn.Module,
        loader: Iterable[dict], sampler: Any, optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler, policy: MaskingPolicy, config: engine.TrainConfig,
        start_epoch: int, sample_names: list[str]) -> tuple[dict[str, float], list[str]]:
    """The epochs from `start_epoch`: each ends with checkpoint-last.pth (and
    checkpoint-<epoch>.pth every --save_ckpt_freq epochs and at the last) and a log.txt
    line. A non-finite loss stops the run and names the last good checkpoint.
    -> (the last epoch's metrics, the checkpoints it wrote)."""
    model_without_ddp = model
    if env.distributed:
        # the only buffer, relative_position_index, is a constant: nothing to broadcast
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[env.device.index] if env.device.type == "cuda" else None,
            broadcast_buffers=False)
    n_parameters = sum(p.numel() for p in model_without_ddp.parameters() if p.requires_grad)
    utils.main_print(f"[model] {args.model}: {n_parameters / 1e6:.1f} M parameters; "
                     f"{config.num_steps} steps/epoch x {args.batch_size} x {env.world_size} "
                     f"process(es); amp {args.amp}; device {env.device}")
    log = utils.JsonlLog(os.path.join(args.output_dir, "log.txt"), start_epoch)
    log_writer = utils.make_tensorboard_writer(args.log_dir,
                                               purge_step=start_epoch * config.num_steps)
    stats: dict[str, float] = {}
    saved: list[str] = []
    try:
        for epoch in range(start_epoch, args.epochs):
            sampler.set_epoch(epoch)
            stats = engine.train_one_epoch(model, loader, optimizer, scaler, policy, config,
                                           epoch=epoch, sample_names=sample_names,
                                           log_writer=log_writer)
            names: list[int | str] = ["last"]
            if (epoch + 1) % args.save_ckpt_freq == 0 or epoch + 1 == args.epochs:
                names.append(epoch)
            saved = utils.save_training_state(
                args.output_dir, names, epoch=epoch, model=model_without_ddp,
                optimizer=optimizer, scaler=scaler, args=vars(args),
                masking=policy.state_dict(), sampler_seed=sampler.seed)
            log.write({**{f"train_{k}": v for k, v in stats.items()}, "epoch": epoch,
                       "n_parameters": n_parameters})
            utils.main_print(f"[epoch {epoch}] " + ", ".join(
                f"{k} {v:.4g}" for k, v in stats.items()) + f" -> {saved[-1]}")
    except engine.NonFiniteLossError as e:
        last = utils.find_latest_checkpoint(args.output_dir)
        raise engine.NonFiniteLossError(
            f"{e}. No checkpoint was written after it; the last good checkpoint "
            f"is {last or 'none (no epoch finished)'}. Fix the cause (lower --lr, "
            "--amp bf16/none instead of fp16, check the named images), then re-run to "
            "resume from it") from None
    finally:
        if log_writer is not None:
            log_writer.close()
    return stats, saved


def _cli_main() -> int:
    try:
        main(get_args_parser().parse_args())
    except engine.NonFiniteLossError as err:
        print(f"[rank {os.environ.get('RANK', 0)}] {err}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(utils.cli(_cli_main))
