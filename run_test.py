"""Evaluate PMAD on MVTec-format test sets, under the paper's protocol or a leak-free one.

The entry point: flags, the three files a test needs (`load_models`: scoring_models.py
from the flags), the class loop with its partial results. The scoring and both protocols
are in protocols.py, the tables and files in reporting.py. The ``clean`` protocol
(default) reads no test label before all scores exist; the ``paper`` protocol reproduces
the published numbers, which choose ProtoFlow's threshold and the mask ratio with the
test labels.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import timm
import torch
from tqdm import tqdm

import datasets
import modeling_pmad
import scoring_models
from heatmaps import save_heatmaps
from masking_generator import (DEFAULT_MASK_RATIO, class_mask_ratio, default_mask_ratio,
                               min_mask_ratio, num_masked)
from modeling_discrete_vae import available_tokenizers, kmeans_file_settings
from protocols import (ABNORMALITY, CE_WEIGHT, CLEAN_MASKS, COMBINE, IMAGE_SCORES,
                       MOSTLY_DEFECT, UNMASKED, CleanOptions, collect_class,
                       empty_defect_masks, evaluate_clean, evaluate_paper,
                       mostly_defect_masks)
from protoflow import prototypes_sha256
from reporting import (HEATMAPS, RECORD_FORMAT, RECORD_VERSION, TEST_DATA, PartialResults,
                       exit_status, learned_what, report)
from scoring_models import RELEASED_TOKENIZER, Models
from utils import (AMP_CHOICES, EVAL_LOCK, BadFileError, FlagError, RunLock, UniqueNames,
                   bullet_list, cli, file_sha256, float_at_least, int_at_least,
                   interruption, mask_ratio_arg, prepare_output_dir, progress, provenance,
                   resolve_amp, resolve_device, some_names)


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The flags naming the PMAD checkpoint, tokenizer and ProtoFlow files (run_test.py,
    predict.py)."""
    p.add_argument("--ckpt", "--model_path", dest="ckpt",
                   default="weights/vit_base_16_checkpoint_962_955.pth",
                   help="PMAD checkpoint (run_pretraining.py output or a released file; "
                        "--model_path is the original test scripts' name)")
    # Default None: taken from the checkpoint's training arguments, else the paper's
    # (modeling_pmad.PAPER_EVAL_CONFIG); a flag given explicitly wins.
    p.add_argument("--model", default=None, choices=sorted(modeling_pmad.PMAD_MODELS))
    p.add_argument("--input_size", type=int, default=None)
    p.add_argument("--layer_scale_init_value", type=float_at_least(0.0), default=None)
    p.add_argument("--imagenet_default_mean_and_std", action=argparse.BooleanOptionalAction,
                   default=None)
    p.add_argument("--tokenizer_model", default=None, choices=available_tokenizers())
    p.add_argument("--tokenizer_weight_path", default=None,
                   help=f"default: the file the checkpoint was trained with where it is on "
                        f"this machine, else {RELEASED_TOKENIZER} (the released tokenizers')")
    p.add_argument("--protoflow_weights", default="weights/protoflow",
                   help="a ProtoFlow file, or a folder holding exactly one .pt file "
                        "(default %(default)s)")
    p.add_argument("--prototypes_dir", default="weights/prototypes",
                   help="<prototypes_dir>/<class>/coreset.npy (default %(default)s)")
    p.add_argument("--encoder_weights", default=None,
                   help="local backbone weights for a ProtoFlow file without an encoder")


# The clean protocol's flags -> CleanOptions' fields. Their defaults are None ("not
# given"), so that the paper protocol, which has its own masks, ratios and scores, can
# refuse them instead of ignoring them (check_protocol_flags).
CLEAN_FLAGS = {"clean_masks": "masks", "unmasked": "unmasked", "abnormality": "abnormality",
               "combine": "combine", "ce_weight": "ce_weight", "image_score": "image_score"}


def add_clean_args(p: argparse.ArgumentParser) -> None:
    """The clean protocol's label-free choices, its mask ratios and the scoring settings
    (run_test.py, predict.py)."""
    p.add_argument("--clean_masks", default=None, choices=CLEAN_MASKS,
                   help="clean protocol: ProtoFlow's proposal mask for every image (default), "
                        "or only for images above the class's threshold from held-out normal "
                        "images stored in the ProtoFlow file (the others: random masks, each "
                        "seeded from the image file)")
    p.add_argument("--unmasked", default=None, choices=UNMASKED,
                   help="clean protocol: score every patch, each in the covering pass that "
                        "masks it (default), or leave visible patches at 0 (the paper)")
    p.add_argument("--abnormality", default=None, choices=ABNORMALITY,
                   help="clean protocol: ProtoFlow's abnormality map in log units, "
                        "max(logp) - logp (default), or the paper's 1 - exp(logp - "
                        "max(logp)), which saturates at 1 on clearly anomalous patches")
    p.add_argument("--combine", default=None, choices=COMBINE,
                   help="clean protocol: abnormality x (1 + W x CE / ln V) (default; W is "
                        "--ce_weight), or the paper's CE x abnormality")
    p.add_argument("--ce_weight", type=float_at_least(0), default=None,
                   help=f"clean protocol: W above, how far the ViT's cross-entropy raises "
                        f"ProtoFlow's map (default {CE_WEIGHT:g}, kept on the pooled "
                        f"tuning sets of docs/heldout.md; 0: ProtoFlow's map alone)")
    p.add_argument("--image_score", default=None, choices=IMAGE_SCORES,
                   help="clean protocol: the score map's maximum (default; the paper) or the "
                        "mean of its top 1%% of pixels")
    add_mask_ratio_args(p)
    add_scoring_args(p)
    p.add_argument("--skip_bad_images", action="store_true",
                   help="list unreadable images and leave them out (default: stop and name "
                        "the file)")


def add_mask_ratio_args(p: argparse.ArgumentParser) -> None:
    """The clean protocol's mask ratio of each class (masking_generator.class_mask_ratio)."""
    p.add_argument("--mask_ratio", type=mask_ratio_arg, default=None,
                   help="clean protocol: one ratio for every class (default: the "
                        "per-class ratios of the paper's Table 6, --default_mask_ratio for "
                        "other classes)")
    p.add_argument("--default_mask_ratio", type=mask_ratio_arg, default=None,
                   help=f"clean protocol: the ratio of a class without its own "
                        f"(default {DEFAULT_MASK_RATIO})")


def add_scoring_args(p: argparse.ArgumentParser) -> None:
    """How the maps are smoothed and computed, and the random masks' seed."""
    p.add_argument("--sigma", type=float_at_least(0), default=4.0,
                   help="std in pixels of the Gaussian that smooths every score map "
                        "(the paper: 4; 0: no smoothing)")
    p.add_argument("--batch_size", type=int_at_least(1), default=32,
                   help="images per batch (default %(default)s)")
    p.add_argument("--num_workers", type=int_at_least(0), default=2,
                   help="default %(default)s")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="default: cuda where a GPU is seen, else cpu (here %(default)s)")
    p.add_argument("--amp", default=None, choices=AMP_CHOICES,
                   help="autocast for the ViT (default: bf16 where supported)")
    p.add_argument("--seed", type=int_at_least(0), default=0,
                   help="mixed into each image's random-mask seed (--clean_masks threshold; "
                        "run_test.py's paper protocol)")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("PMAD evaluation", add_help=True)
    add_model_args(p)
    p.add_argument("--data_path", default="data/mvtec_anomaly_detection",
                   help="a folder in MVTec layout (MVTec AD, BTAD, MPDD, the demo set; "
                        "default %(default)s)")
    p.add_argument("--setting", default=None, choices=datasets.SETTINGS,
                   help="default multi_class (obj2tex with --from_obj_to_texture)")
    p.add_argument("--unseen_classes", nargs="*", default=None, action=UniqueNames)
    p.add_argument("--from_obj_to_texture", action="store_true",
                   help="the original's switch: same as --setting obj2tex")
    p.add_argument("--classes", nargs="*", default=None, action=UniqueNames,
                   help="evaluate exactly these")
    p.add_argument("--protocol", default="clean", choices=["clean", "paper"],
                   help="clean (default): no test label chooses anything; paper: the "
                        "published numbers' protocol (README 'The two protocols')")
    add_clean_args(p)
    p.add_argument("--output_dir", default="output_dir/test", help="default %(default)s")
    p.add_argument("--save_heatmaps", type=int_at_least(0), default=0, metavar="N",
                   help="per class, write heatmap PNGs of the N most and the N least "
                        "anomalous images of each defect type (and of the normal images)")
    p.add_argument("--resume_eval", action="store_true",
                   help="skip the classes already in <output_dir>/results.partial.jsonl "
                        "(written as each class finishes) from an earlier, stopped run")
    return p


def check_device_flags(args: argparse.Namespace) -> None:
    """--device and --amp, checked first (run_test.py, predict.py; scoring_models.load
    resolves them when the models load): a GPU torch cannot see, or fp16 off CUDA, is one
    `error:` line before any output folder or data is touched, not a traceback."""
    resolve_amp(args.amp, resolve_device(args.device))


def select_classes(args: argparse.Namespace, setting: str) -> list[str]:
    """The classes to evaluate, checked against the data (layout, masks) before any work.
    --classes is rewritten as the folders spell them (datasets.as_found), which the
    results' args and the resume key then record."""
    root = args.data_path
    available = datasets.find_test_classes(root)
    if args.classes:
        args.classes = datasets.as_found(args.classes, available)
        unknown = sorted(set(args.classes) - set(available))
        if unknown:
            raise FlagError(f"--classes: {unknown} have no {root}/<class>/test folder; "
                            f"available: {available}")
        classes = list(args.classes)
    else:
        classes = datasets.setting_classes(setting, args.unseen_classes,
                                           available=available)[1]
    datasets.check_test_classes(root, classes, args.skip_bad_images)
    return classes


def check_unseen(args: argparse.Namespace, setting: str, classes: list[str], m: Models
                 ) -> None:
    """A cross-class evaluation (obj2tex, tex2obj, leave_one_out) scores classes its
    models never saw: a ViT or a ProtoFlow flow trained on one of them would leak it
    into the scores. Our files record their classes; a released one does not. Classes
    scored as seen that are not (a multi-class evaluation of a leave-one-out ViT), or
    picked by --classes among a cross-class setting's training classes, are named: the
    table's mean would mix them in under the setting's name."""
    if setting == "multi_class":
        new = sorted(set(classes) - set(m.vit_classes)) if m.vit_classes else []
        if new:
            print(f"[run_test] note: the multi_class setting scores {', '.join(new)} as seen, "
                  f"but --ckpt {args.ckpt} trained on {', '.join(m.vit_classes)} only: pass "
                  "the --setting (and --unseen_classes) it was trained with to score "
                  f"{'it' if len(new) == 1 else 'them'} as unseen")
        return
    unseen = datasets.setting_classes(setting, args.unseen_classes,
                                      available=datasets.find_test_classes(args.data_path))[1]
    seen = sorted(set(classes) - set(unseen))
    if seen:
        mixed = len(seen) < len(classes)
        print(f"[run_test] note: --classes {', '.join(seen)}: the {setting} setting trains on "
              f"{'this class' if len(seen) == 1 else 'these'}, so the table scores "
              f"{'it' if len(seen) == 1 else 'them'} as seen"
              + (", and its mean mixes seen and unseen classes" if mixed else
                 ": it is not a cross-class result"))
    unseen = set(unseen) & set(classes)  # --classes may pick seen ones
    fixes = {"--ckpt": ("`python run_pretraining.py", m.vit_classes),
             "--protoflow_weights": ("`python run_protoflow.py train", m.protoflow.classes)}
    for flag, (command, trained) in fixes.items():
        leaked = sorted(set(trained or ()) & unseen)
        if leaked:
            raise FlagError(f"{flag} {getattr(args, flag[2:])} was trained on "
                            f"{', '.join(leaked)}, which the {setting} setting evaluates as "
                            f"unseen: train one on the seen classes ({command} --setting "
                            f"{setting} ...`) and pass it")
    for flag, (command, trained) in fixes.items():
        if trained is None and unseen:
            print(f"[run_test] {flag} {getattr(args, flag[2:])} does not record its training "
                  f"classes (a released file, or one of an earlier version of "
                  f"{command.split()[1]}): make sure it never saw "
                  f"{', '.join(sorted(unseen))}")
    if args.tokenizer_model == "kmeans" and unseen:  # fitted on images, as the ViT trained
        fitted = (kmeans_file_settings(args.tokenizer_weight_path) or {}).get("fit_classes")
        leaked = sorted(set(fitted or ()) & unseen)
        if leaked:
            raise FlagError(f"--tokenizer_weight_path {args.tokenizer_weight_path} was fitted "
                            f"on images of {', '.join(leaked)}, which the {setting} setting "
                            "evaluates as unseen, and so was the ViT trained with it: train "
                            "one with a tokenizer fitted on the seen classes (`python "
                            f"run_pretraining.py --setting {setting} --fit_kmeans_tokenizer "
                            "--tokenizer_weight_path NEW ...`) and pass both")
        if fitted is None:
            print(f"[run_test] --tokenizer_weight_path {args.tokenizer_weight_path} does not "
                  "record the classes it was fitted on (an earlier version's file): make sure "
                  f"it never saw {', '.join(sorted(unseen))}")


def load_models(args: argparse.Namespace, who: str = "run_test") -> Models:
    """scoring_models.load from the model flags, its notes tagged `[who]`. `args` takes
    the settings it resolved (the checkpoint's, the tokenizer and ProtoFlow files used),
    which results.json's args and the resume key record."""
    m = scoring_models.load(
        args.ckpt, config={k: getattr(args, k) for k in modeling_pmad.PAPER_EVAL_CONFIG},
        tokenizer_path=args.tokenizer_weight_path, protoflow_weights=args.protoflow_weights,
        prototypes_dir=args.prototypes_dir, encoder_weights=args.encoder_weights,
        device=args.device, amp=args.amp, say=lambda note: print(f"[{who}] {note}"))
    vars(args).update(m.config, tokenizer_weight_path=m.tokenizer_path,
                      protoflow_weights=m.protoflow_path)
    return m


def clean_options(args: argparse.Namespace) -> CleanOptions:
    """The clean protocol's choices: the flags given, CleanOptions' defaults otherwise.
    --ce_weight with --combine product, which has no weight, is refused."""
    if args.ce_weight is not None and args.combine == "product":
        raise FlagError("--ce_weight weighs the cross-entropy in --combine weighted; "
                        "--combine product multiplies it in unweighted: drop one of them")
    return CleanOptions(**{field: getattr(args, flag) for flag, field in CLEAN_FLAGS.items()
                           if getattr(args, flag) is not None})


def check_paper_classes(root: Path, classes: Sequence[str], skip_bad_images: bool = False
                        ) -> None:
    """--protocol paper picks each class's normal/anomalous threshold by F1 on its test
    labels: a class without an anomalous test image has none (nor any defined metric).
    Refused before any work, not a traceback after the classes before it. With
    --skip_bad_images so is a class whose every anomalous image it would leave out, by
    their headers (datasets.image_problem; one that fails only in decoding is refused
    when its class is reached)."""
    def anomalous_images(class_name: str) -> list[str]:
        test_dir = root / class_name / "test"
        return [p for d in datasets.data_subdirs(str(test_dir)) if d not in datasets.NORMAL_DIRS
                for p in datasets.list_images(str(test_dir / d), keep_dangling=True)]

    found = {c: anomalous_images(c) for c in classes}
    normal_only = [c for c in classes if not found[c]]
    if normal_only:
        raise FlagError(f"--protocol paper picks each class's threshold from its anomalous "
                        f"test images, and {', '.join(normal_only)} has none under "
                        f"{root}/<class>/test: evaluate it with --protocol clean, or leave it "
                        "out (--classes)")
    if not skip_bad_images:
        return  # a bad image stops the run by name (check_test_classes)
    for c in classes:
        problems = [datasets.image_problem(p) for p in found[c]]
        if all(problems):
            raise BadFileError(f"{c}: --skip_bad_images would leave out every anomalous test "
                               f"image, and --protocol paper picks the class's threshold from "
                               f"them:{bullet_list(problems)}\nReplace them, or evaluate {c} "
                               "with --protocol clean")


def check_protocol_flags(args: argparse.Namespace) -> None:
    """The paper protocol sweeps its 24 ratios with the paper's own masks and scores: a
    clean-protocol flag given with it would change nothing, so it is refused."""
    if args.protocol != "paper":
        return
    given = [f"--{flag}" for flag in (*CLEAN_FLAGS, "mask_ratio", "default_mask_ratio")
             if getattr(args, flag) is not None]
    if given:
        verb = "applies" if len(given) == 1 else "apply"
        raise FlagError(f"{', '.join(given)} {verb} only to --protocol clean; --protocol "
                        "paper sweeps the paper's 24 mask ratios with its own masks and "
                        "scores: drop them, or evaluate with --protocol clean")


def check_mask_ratios(args: argparse.Namespace, classes: Sequence[str], num_patches: int
                      ) -> None:
    """Before any image is read: each class's clean-protocol ratio masks at least one of
    the model's patches (int(L r) >= 1; with none, nothing would be scored)."""
    ratios = {class_mask_ratio(c, args.mask_ratio, args.default_mask_ratio) for c in classes}
    empty = sorted(r for r in ratios if num_masked(r, num_patches) < 1)
    if empty:
        least = min_mask_ratio(num_patches)
        raise FlagError(f"mask ratio {', '.join(f'{r:g}' for r in empty)} masks no patch of "
                        f"the model's {num_patches} (int({num_patches} x r) = 0): pass "
                        f"--mask_ratio (or --default_mask_ratio) {least:g} or more")


def file_fingerprints(args: argparse.Namespace, m: Models) -> dict[str, str | None]:
    """The files behind every class's scores, by content (sha256; the tokenizer's
    fingerprint also says whether DALL-E computes in fp16)."""
    return {"pmad": file_sha256(args.ckpt), "protoflow": file_sha256(args.protoflow_weights),
            "tokenizer": m.tokenizer.fingerprint,
            "encoder": None if args.encoder_weights is None else file_sha256(args.encoder_weights)}


def trained_test_images(contents: dict[str, tuple[str, dict[str, str]]],
                        trained: dict[str, Callable[[str], frozenset[str] | None]], root: str
                        ) -> dict[str, dict[str, list[str]]]:
    """{class: {flag: its test images (relative to `root`) whose content the model of
    that flag learned}}, for the classes that have any, said on stderr: a custom set
    re-split after training scores images a model learned, and the metrics rise for it.
    `trained`: {flag: class -> the content sha256s of the images its file lists, or None
    (the released files list none: nothing to check)}."""
    seen = {}
    for c, (_, images) in contents.items():
        by = {flag: sorted(os.path.relpath(p, root) for p, sha in images.items()
                           if sha in (learned(c) or ())) for flag, learned in trained.items()}
        by = {flag: paths for flag, paths in by.items() if paths}
        if not by:
            continue
        seen[c] = by
        print(f"[run_test] warning: {c}: {learned_what(by)}: their scores count images "
              "the models learned, so the metrics read "
              "better than they are; evaluate on images they did not train on (a re-split "
              "set: train again on it)", file=sys.stderr)
    return seen


def resume_key(args: argparse.Namespace, results: dict) -> dict:
    """Every setting and file (by content) a class's record depends on but its
    prototypes: --resume_eval reuses a record only when all of it matches. Left out:
    the class selection, the output, and --device / --batch_size / --num_workers, which
    change the scores only by rounding."""
    return {"data_path": str(Path(args.data_path)), "setting": results["setting"],
            "protocol": args.protocol, "clean_options": results["clean_options"],
            "mask_ratio": args.mask_ratio,
            "default_mask_ratio": default_mask_ratio(args.default_mask_ratio),
            "sigma": args.sigma, "seed": args.seed, "skip_bad_images": args.skip_bad_images,
            **{k: getattr(args, k) for k in modeling_pmad.PAPER_EVAL_CONFIG},
            "amp": results["amp"], **results["checkpoints"], RECORD_FORMAT: RECORD_VERSION}


def main(args: argparse.Namespace) -> dict:
    """Evaluate each selected class under args.protocol, keeping each finished class in
    results.partial.jsonl; returns the results, which are also printed and written."""
    check_device_flags(args)
    check_protocol_flags(args)
    options = clean_options(args)
    out_dir = Path(prepare_output_dir(args.output_dir, "--output_dir"))
    with RunLock(str(out_dir), "--output_dir", EVAL_LOCK):  # one evaluation at a time
        return _evaluate(args, options, out_dir)


def _evaluate(args: argparse.Namespace, options: CleanOptions, out_dir: Path) -> dict:
    """main, once the flags are checked and --output_dir is ours."""
    setting = datasets.resolve_setting(args.setting, args.from_obj_to_texture)
    classes = select_classes(args, setting)
    root = Path(args.data_path)
    if args.protocol == "paper":
        check_paper_classes(root, classes, args.skip_bad_images)
    m = load_models(args)
    check_unseen(args, setting, classes, m)
    m.protoflow.check_prototypes(classes)
    if args.protocol == "clean":
        check_mask_ratios(args, classes, m.model.patch_embed.num_patches)
    if (args.protocol == "clean" and options.masks == "threshold"
            and m.protoflow.threshold is None):
        print(f"[run_test] {args.protoflow_weights} stores no threshold from normal images "
              "(a released file): every image gets ProtoFlow's proposal mask. `python "
              "run_protoflow.py train ...` writes a file with one.")

    results = {"protocol": args.protocol, "setting": setting, "classes": {},
               "clean_options": options.as_dict() if args.protocol == "clean" else None,
               "args": vars(args), "amp": m.amp, "checkpoints": file_fingerprints(args, m),
               "vit_epochs": m.vit_epochs, "vit_training_args": m.vit_training_args,
               "prototypes": {c: prototypes_sha256(args.prototypes_dir, c) for c in classes},
               "versions": {"python": platform.python_version(), "torch": torch.__version__,
                            "timm": timm.__version__, "numpy": np.__version__},
               "provenance": provenance(m.device)}
    start = time.time()
    contents = {c: datasets.test_set_contents(args.data_path, c) for c in progress(
        classes, desc="reading the test sets", leave=False)}  # its images and masks
    results["test_data"] = {c: digest for c, (digest, _) in contents.items()}
    seen = trained_test_images(contents, {
        "--ckpt": lambda c: m.vit_train_images,
        "--protoflow_weights": lambda c: m.protoflow.train_images,
        "--prototypes_dir": m.protoflow.prototype_train_images}, args.data_path)
    if seen:
        results["trained_test_images"] = seen
    partial = PartialResults(out_dir / "results.partial.jsonl", resume_key(args, results),
                             {c: {"prototypes": results["prototypes"][c],
                                  TEST_DATA: results["test_data"][c]} for c in classes},
                             args.resume_eval)
    if partial.set_aside_to:
        print(f"[run_test] the earlier evaluation's results and heatmaps moved to "
              f"{partial.set_aside_to}")
    class_name = None
    try:
        for class_name in progress(classes, desc=f"evaluating ({args.protocol} protocol)"):
            if class_name in partial.done:
                results["classes"][class_name] = partial.done[class_name]
                tqdm.write(f"[run_test] {class_name}: done in an earlier run ({partial.path})")
                if args.save_heatmaps and not (out_dir / HEATMAPS / class_name).is_dir():
                    tqdm.write(f"[run_test] {class_name}: that run saved no heatmaps of it; "
                               "evaluate it afresh (no --resume_eval) to draw them")
                continue
            record, draw_heatmaps = evaluate_class(args, m, options, root, out_dir,
                                                   class_name)
            record["provenance"] = results["provenance"]  # a resumed run reuses it as is
            results["classes"][class_name] = record
            partial.add(class_name, record)  # kept, whatever drawing its heatmaps does
            draw_heatmaps()
    except (Exception, KeyboardInterrupt) as e:
        interrupted = isinstance(e, KeyboardInterrupt)
        results["failed"] = {class_name: interruption(e) if interrupted
                             else f"{type(e).__name__}: {e}"}
        if class_name in results["classes"]:  # its metrics are in; a heatmap failed
            results["failed"][class_name] = f"its heatmaps: {results['failed'][class_name]}"
        results["not_evaluated"] = (classes[classes.index(class_name) + 1:]
                                    if class_name in classes else list(classes))
        finished = len(results["classes"])
        kept = (f"; the {finished} class(es) finished are kept in {partial.path} and the "
                "table below; re-run with --resume_eval to skip them" if finished else "")
        print(f"[run_test] {'interrupted' if interrupted else 'stopped'} in class "
              f"{class_name}{kept}", file=sys.stderr, flush=True)
        report(results, out_dir, args.protocol, start, bool(args.save_heatmaps))
        if interrupted:
            return results
        raise
    report(results, out_dir, args.protocol, start, bool(args.save_heatmaps))
    return results


def evaluate_class(args: argparse.Namespace, m: Models, options: CleanOptions, root: Path,
                   out_dir: Path, class_name: str) -> tuple[dict, Callable[[], None]]:
    """One class under args.protocol: its record (and its diagnostics line), and what
    draws its heatmaps, called once the record is kept (a heatmap that cannot be written
    must not cost the class's metrics)."""
    dataset = m.test_set(root, class_name, skip_bad_images=args.skip_bad_images)
    if args.protocol == "paper" and not any(dataset.labels):
        raise BadFileError(f"{class_name}: every anomalous test image was left out as a bad "
                           "file (the warning above names them), and --protocol paper picks "
                           "the class's threshold from them: replace them, or evaluate "
                           f"{class_name} with --protocol clean")
    data = collect_class(dataset, m.tokenizer, m.protoflow, class_name, args.batch_size,
                         m.device, args.num_workers)
    kwargs = dict(sigma=args.sigma, batch_size=args.batch_size, device=m.device, amp=m.amp,
                  seed=args.seed)
    if args.protocol == "paper":
        record, maps, scores = evaluate_paper(m.model, data, **kwargs)
    else:
        record, maps, scores = evaluate_clean(
            m.model, data, ratio=class_mask_ratio(class_name, args.mask_ratio,
                                   args.default_mask_ratio),
            threshold=m.protoflow.threshold_for(class_name), options=options, **kwargs)
    record.update(num_images=len(data.labels), num_anomalous=int(data.labels.sum()),
                  ground_truth=data.gt_masks is not None, skipped_images=dataset.bad_files,
                  images=image_records(data.names, data.defect_types, scores))
    d = record["diagnostics"]
    near = None if data.gt_masks is not None else datasets.ground_truth_near_miss(root,
                                                                                  class_name)
    tqdm.write(f"[run_test] {class_name}: {d['anomalous_with_proposal']} of "
               f"{d['anomalous_images']} anomalous images got the proposal mask; "
               + (f"{d['masked_defect_fraction']:.0%} of defect pixels masked"
                  if data.gt_masks is not None else
                  f"no {root}/{class_name}/ground_truth folder: pixel metrics undefined"
                  + (f" ({near} is not read: rename it to ground_truth to score its masks)"
                     if near else "")))
    empty = empty_defect_masks(data)
    if empty:
        tqdm.write(f"[run_test] note: {class_name}: {len(empty)} anomalous image(s) have no "
                   f"defect pixel in their ground-truth mask as scored ({some_names(empty, 3)}"
                   "): the pixel metrics never see their "
                   "defects. Check the masks, or the images' shape: the centre crop (as the "
                   "paper's) drops the sides of a non-square image", file=sys.stderr)
    mostly = mostly_defect_masks(data)
    if mostly:
        tqdm.write(f"[run_test] note: {class_name}: {len(mostly)} ground-truth mask(s) mark "
                   f"more than {MOSTLY_DEFECT:.0%} of their image, its corners too, "
                   f"defective ({some_names(mostly, 3)}): check that each marks its defect "
                   "non-zero (white) on zero (black); an inverted mask, or a colour mask on a "
                   "white background, scores the pixel metrics on the background",
                   file=sys.stderr)

    def draw_heatmaps() -> None:
        """All the class's heatmaps or none: a folder cut short would pass, on
        --resume_eval, for a class whose heatmaps were drawn."""
        if not args.save_heatmaps:
            return
        threshold = (record["threshold"] if args.protocol == "paper"
                     else m.protoflow.threshold_for(class_name))
        folder = out_dir / HEATMAPS / class_name
        try:
            save_heatmaps(data, maps["pmad"], maps["protoflow_only"], scores["pmad"],
                          scores["protoflow_score"], threshold, folder, args.save_heatmaps,
                          m.mean, m.std)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
    return record, draw_heatmaps


def image_records(names: list[str], defect_types: list[str], scores: dict[str, torch.Tensor]
                  ) -> list[dict]:
    """Each test image's scores, for image_scores.csv: its name and defect type and, by
    `scores`' names, PMAD's and each baseline's image score and ProtoFlow's own, so a
    user can set thresholds or compare methods per image."""
    columns = {k: v.tolist() for k, v in scores.items()}
    return [{"name": name, "defect_type": defect,
             **{k: values[i] for k, values in columns.items()}}
            for i, (name, defect) in enumerate(zip(names, defect_types))]


if __name__ == "__main__":
    sys.exit(cli(lambda: exit_status(main(get_args_parser().parse_args()))))
