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
    # model
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
    # visual tokenizer
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
    # masking
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
    # optimisation
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
    # data
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
    # run
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
    return p


def load_init(model: torch.nn.Module, path: str) -> None:
    if not os.path.isfile(path):
        raise utils.MissingFileError(
            f"--init_ckpt {path} not found: download beit_base_patch16_224_pt22k.pth (links "
            "in README.md, 'Download Pretrained Weights'; see weights/README.md) into "
            "weights/, point --init_ckpt at it, or pass --no_init to train from scratch")
    state_dict = modeling_pmad.unwrap_state_dict(utils.read_weights_file(path), path)
    head, file_head = model.lm_head.weight.shape, state_dict.get("lm_head.weight")
    if file_head is not None and file_head.shape != head:
        # BEiT's pt22k head predicts DALL-E's 8,192 codes; another tokenizer needs its own
        utils.main_print(f"[init] {path}: its lm_head predicts {file_head.shape[0]} visual "
                         f"tokens, this run's tokenizer has {head[0]}: the head starts from "
                         "random weights, every other layer from the file")
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("lm_head.")}
    result = modeling_pmad.load_checkpoint(model, path, checkpoint=state_dict)
    utils.main_print(f"[init] {path}: missing {result['missing']}, "
                     f"unexpected {result['unexpected']}")


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


def resolve_resume(args: argparse.Namespace) -> str | None:
    """The checkpoint to resume from: --resume (a file, or the newest complete
    checkpoint in a folder), else with --auto_resume the newest in --output_dir."""
    if not args.resume:
        return utils.find_latest_checkpoint(args.output_dir) if args.auto_resume else None
    if os.path.isdir(args.resume):
        found = utils.find_latest_checkpoint(args.resume)
        if found is None:
            raise utils.CheckpointError(f"--resume {args.resume}: the folder holds no complete "
                                        "checkpoint-<epoch>.pth or checkpoint-last.pth; name a "
                                        "checkpoint file")
        return found
    if not os.path.isfile(args.resume):
        raise utils.MissingFileError(f"--resume {args.resume} not found: name a checkpoint "
                                     "file, or the --output_dir of the run to resume")
    return args.resume


def check_resume_args(saved: dict | None, args: dict, path: str, epoch: int | None = None,
                      explicit: bool = False) -> None:
    """A resumed run continues the saved one; a different schedule or class set would
    silently become another experiment. One exception: a finished run (its last epoch
    `epoch` saved) resumed with a larger --epochs is extended, and says so."""
    if not saved:
        return
    diff = {k: (saved.get(k), args.get(k)) for k in RESUME_MUST_MATCH
            if k in saved and saved.get(k) != args.get(k)}
    done = None if epoch is None else epoch + 1
    if "epochs" in diff and done is not None:
        old, new = diff["epochs"]
        if isinstance(old, int) and done >= old:  # finished: more epochs extend it
            del diff["epochs"]
            if new > done:
                utils.main_print(f"[resume] {path} finished its {old} epochs: extending the "
                                 f"run to {new} epochs (the learning-rate schedule is "
                                 f"recomputed for {new} epochs and continues at epoch {done})")
    if diff:
        fix = ("resume another checkpoint" if explicit else
               "another --output_dir, or --no_auto_resume to start afresh in this one")
        if "epochs" in diff:
            fix += (f"; to train longer, first finish its {diff['epochs'][0]} epochs, then "
                    "re-run with a larger --epochs")
        raise utils.CheckpointError(f"{path} was trained with other arguments: " + ", ".join(
            f"--{k} {a!r} (now {b!r})" for k, (a, b) in diff.items())
            + f"; use the same arguments or {fix}")


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
    resume = resolve_resume(args)
    header = utils.load_checkpoint_file(resume, mmap=True) if resume else None
    if header is not None and "optimizer" in header and "epoch" in header:
        check_resume_args(header.get("args"), vars(args), resume, header["epoch"],
                          explicit=bool(args.resume))
    return train_classes, resume, header


def main(args: argparse.Namespace) -> dict:
    """Train; returns a summary (classes, images, epochs run, last epoch's metrics)."""
    with utils.deterministic_algorithms(args.deterministic), \
            utils.distributed(args.device) as env:
        return _train(args, env)


def _train(args: argparse.Namespace, env: utils.DistEnv) -> dict:
    device = env.device
    args.setting = datasets.resolve_setting(args.setting, args.from_obj_to_texture)
    args.data_path = datasets.resolve_train_root(args.data_path)
    args.amp = utils.resolve_amp(args.amp, device)
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
    tokenizer = modeling_discrete_vae.create_tokenizer(
        args.tokenizer_model, args.tokenizer_weight_path, device, amp=args.amp)
    mean, std = datasets.normalization(args.imagenet_default_mean_and_std)
    model = modeling_pmad.build_pmad(args.model, vocab_size=tokenizer.vocab_size,
                                     img_size=args.input_size,
                                     init_values=args.layer_scale_init_value,
                                     drop_path_rate=args.drop_path)
    if header is not None:  # shapes and keys, before the data is read
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
        patch_size=patch_size, seed=(args.seed, env.rank), device=device)
    dataset = datasets.PretrainDataset(
        args.data_path, train_classes, token_size=tokenizer.image_size,
        img_size=args.input_size, mean=mean, std=std, patch_size=patch_size,
        fg_mask=args.fg_mask, skip_bad_images=args.skip_bad_images,
        freq_weights=policy.frequency)
    # Every rank tokenizes its share of the missing images (loader workers decode them).
    stats = datasets.cache_tokens(dataset, tokenizer, args.token_cache_dir, device=device,
                                  num_workers=args.num_workers)
    utils.main_print(f"[tokens] {stats['hits']} cached, {stats['misses']} computed in "
                     f"{args.token_cache_dir}")
    del tokenizer  # not needed again: every step reads cached tokens
    if device.type == "cuda":
        torch.cuda.empty_cache()
    utils.main_print(f"[data] setting {args.setting}: {len(dataset)} images of "
                     f"{len(train_classes)} classes {train_classes}")

    if args.cache_images == "none":
        sampler = utils.build_sampler(dataset, seed=args.seed)
        # its own generator: each epoch's iterator then leaves the global stream (drop
        # path) alone, as ImageCache does
        loader = torch.utils.data.DataLoader(
            dataset, sampler=sampler, batch_size=args.batch_size,
            num_workers=args.num_workers, pin_memory=args.pin_mem and device.type == "cuda",
            drop_last=True, persistent_workers=args.num_workers > 0,
            generator=torch.Generator().manual_seed(args.seed))
    else:  # the same batches, from memory; it orders them itself, like the sampler
        loader = sampler = datasets.ImageCache(
            dataset, args.batch_size, where=args.cache_images, device=device,
            seed=args.seed, num_workers=args.num_workers)
    num_steps = len(loader)
    if args.max_steps_per_epoch is not None:
        num_steps = min(num_steps, args.max_steps_per_epoch)
    if num_steps < 1:
        raise ValueError(f"{len(dataset)} training images make no full batch of "
                         f"--batch_size {args.batch_size} on each of {env.world_size} "
                         "process(es): lower --batch_size or use fewer processes")

    model.to(device)
    model_without_ddp = model
    optimizer = utils.build_optimizer(model_without_ddp, args.lr, args.weight_decay,
                                      tuple(args.opt_betas), args.opt_eps, device)
    scaler = utils.make_grad_scaler(device, args.amp)
    lr_schedule = utils.cosine_scheduler(args.lr, args.min_lr, args.epochs, num_steps,
                                         warmup_epochs=args.warmup_epochs,
                                         warmup_steps=args.warmup_steps)
    wd_end = args.weight_decay if args.weight_decay_end is None else args.weight_decay_end
    wd_schedule = utils.cosine_scheduler(args.weight_decay, wd_end, args.epochs, num_steps)
    config = engine.TrainConfig(lr_schedule, wd_schedule, num_steps,
                                clip_grad=args.clip_grad, amp=args.amp)

    start_epoch = 0
    del header
    if resume:
        # Last, so that the restored random states are exactly those at the save.
        info = utils.load_training_state(resume, model=model_without_ddp,
                                         optimizer=optimizer, scaler=scaler,
                                         masking=policy, device=device)
        start_epoch = info["start_epoch"]
        if info["sampler_seed"] is not None:
            sampler.seed = info["sampler_seed"]
        utils.main_print(f"[resume] {resume}: continuing at epoch {start_epoch}")
    elif not args.no_init:
        load_init(model_without_ddp, args.init_ckpt)
    if env.distributed:
        # the only buffer, relative_position_index, is a constant: nothing to broadcast
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=False)

    n_parameters = sum(p.numel() for p in model_without_ddp.parameters() if p.requires_grad)
    utils.main_print(f"[model] {args.model}: {n_parameters / 1e6:.1f} M parameters; "
                     f"{num_steps} steps/epoch x {args.batch_size} x {env.world_size} "
                     f"process(es); amp {args.amp}; device {device}")
    log = utils.JsonlLog(os.path.join(args.output_dir, "log.txt"), start_epoch)
    log_writer = utils.make_tensorboard_writer(args.log_dir, purge_step=start_epoch * num_steps)
    sample_names = [os.path.relpath(p, args.data_path) for p, _ in dataset.samples]
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
    return {"train_classes": train_classes, "num_images": len(dataset),
            "num_steps": num_steps, "start_epoch": start_epoch, "stats": stats,
            "checkpoints": saved}


def _cli_main() -> int:
    try:
        main(get_args_parser().parse_args())
    except engine.NonFiniteLossError as err:
        print(f"[rank {os.environ.get('RANK', 0)}] {err}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(utils.cli(_cli_main))
