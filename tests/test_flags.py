"""Every command-line flag of every entry point is mentioned by a test of that entry
point: one of its option strings appears, quoted, in one of the test files that run it.

This checks mentions only, not effects: a flag whose string is quoted in a test file
passes here whether or not that test asserts what the flag does. A new flag that no
test file names fails here.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

import predict
import run_pretraining
import run_protoflow
import run_test
import setup_train_dataset

TESTS = Path(__file__).resolve().parent


def _flags(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, tuple[str, ...]]:
    """'<subcommand> <first option string>' -> the action's option strings."""
    out = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out.update(_flags(sub, f"{prefix}{name} "))
        elif action.option_strings and not isinstance(action, argparse._HelpAction):
            out[prefix + action.option_strings[0]] = tuple(action.option_strings)
    return out


ENTRY_POINTS = {
    "run_pretraining.py": (run_pretraining.get_args_parser,
                           ["test_training.py", "test_run_test.py", "test_reliability.py"]),
    "run_test.py": (run_test.get_args_parser, ["test_run_test.py", "test_reliability.py"]),
    "run_protoflow.py": (run_protoflow.get_args_parser,
                         ["test_protoflow.py", "test_reliability.py"]),
    "setup_train_dataset.py": (setup_train_dataset.get_args_parser,
                               ["test_setup_train_dataset.py", "conftest.py",
                                "test_dataset_converters.py", "test_reliability.py"]),
    # predict.py's model and clean-protocol flags are run_test's (add_model_args,
    # add_clean_args): their effects are asserted in run_test's tests
    "predict.py": (predict.get_args_parser, ["test_predict.py", "test_run_test.py"]),
}


@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
def test_every_flag_is_mentioned_by_a_test(entry_point: str) -> None:
    build, files = ENTRY_POINTS[entry_point]
    text = "\n".join((TESTS / f).read_text() for f in files)
    flags = _flags(build())
    assert len(flags) > 8
    untested = [name for name, options in flags.items()
                if not any(re.search(rf"[\"']{re.escape(o)}[\"']", text) for o in options)]
    assert not untested, (f"{entry_point}: no test in {files} mentions {untested}; add a test "
                          "that asserts the flag's effect")


@pytest.mark.parametrize("parse, argv, dest", [
    (run_test.get_args_parser, ["--classes"], "classes"),
    (run_test.get_args_parser, ["--unseen_classes"], "unseen_classes"),
    (run_pretraining.get_args_parser, ["--data_path", "x", "--unseen_classes"],
     "unseen_classes"),
    (run_protoflow.get_args_parser, ["prototypes", "--data_path", "x", "--classes"], "classes"),
    (run_protoflow.get_args_parser, ["train", "--data_path", "x", "--output", "f.pt",
                                     "--classes"], "classes"),
    (run_protoflow.get_args_parser, ["train", "--data_path", "x", "--output", "f.pt",
                                     "--unseen_classes"], "unseen_classes"),
    (setup_train_dataset.get_args_parser, ["--classes"], "classes"),
    (setup_train_dataset.get_args_parser, ["--textures"], "textures"),
])
def test_a_class_named_twice_counts_once(parse, argv, dest) -> None:
    """`--classes screw bottle screw` would evaluate screw twice, or train on its images
    twice: each name is kept once, in the order given."""
    args = parse().parse_args([*argv, "screw", "bottle", "screw"])
    assert getattr(args, dest) == ["screw", "bottle"]


def test_a_class_without_a_table_6_ratio_is_masked_alike_in_training_and_testing() -> None:
    """One default ratio (0.3, masking_generator.DEFAULT_MASK_RATIO) for a class the paper's
    Table 6 does not list: training's --mask_ratio, the mask generator's and run_test.py's
    --default_mask_ratio were three constants that could drift apart."""
    import masking_generator
    assert masking_generator.DEFAULT_MASK_RATIO == 0.3
    trained = run_pretraining.get_args_parser().parse_args(["--data_path", "x"]).mask_ratio
    generator = masking_generator.MaskGenerator((14, 14)).ratio_for("widget")
    args = run_test.get_args_parser().parse_args([])
    tested = masking_generator.class_mask_ratio("widget", args.mask_ratio,
                                                args.default_mask_ratio)
    assert trained == generator == tested == 0.3
