"""Every command-line flag of every entry point is exercised by a test of that entry
point: its option string appears, quoted, in one of the test files that run it (the tests
there assert its effect: a schedule value, a weight-decay group, a loaded head, a mask).

A new flag without a test fails here. The allow-list names the few flags that no test
on a CPU-only machine can pass with an effect to assert, each with the reason.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Callable

import pytest

import predict
import run_pretraining
import run_protoflow
import run_test
import setup_train_dataset

TESTS = Path(__file__).resolve().parent


class _Parsed(Exception):
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        super().__init__()
        self.parser = parser


def _parser_of(build_and_parse: Callable[[], object]) -> argparse.ArgumentParser:
    """The parser an entry point builds inside its main (caught as it parses)."""
    def grab(self, *args, **kwargs):
        raise _Parsed(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(argparse.ArgumentParser, "parse_args", grab)
        with pytest.raises(_Parsed) as caught:
            build_and_parse()
    return caught.value.parser


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
    "run_protoflow.py": (lambda: _parser_of(lambda: run_protoflow.main([])),
                         ["test_protoflow.py", "test_reliability.py"]),
    "setup_train_dataset.py": (lambda: _parser_of(lambda: setup_train_dataset.parse_args([])),
                               ["test_setup_train_dataset.py", "conftest.py",
                                "test_dataset_converters.py", "test_reliability.py"]),
    # predict.py's model and clean-protocol flags are run_test's (add_model_args,
    # add_clean_args): their effects are asserted in run_test's tests
    "predict.py": (predict.get_args_parser, ["test_predict.py", "test_run_test.py"]),
}

# flag -> why no test passes it
ALLOWED_UNTESTED: dict[str, str] = {}


@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
def test_every_flag_is_exercised_by_a_test(entry_point: str) -> None:
    build, files = ENTRY_POINTS[entry_point]
    text = "\n".join((TESTS / f).read_text() for f in files)
    flags = _flags(build())
    assert len(flags) > 8
    untested = [name for name, options in flags.items()
                if f"{entry_point} {name}" not in ALLOWED_UNTESTED
                and not any(re.search(rf"[\"']{re.escape(o)}[\"']", text) for o in options)]
    assert not untested, (f"{entry_point}: no test in {files} passes {untested}; add a test "
                          "that asserts the flag's effect")


def test_allow_list_names_existing_flags() -> None:
    names = {f"{ep} {name}" for ep, (build, _) in ENTRY_POINTS.items() for name in _flags(build())}
    assert set(ALLOWED_UNTESTED) <= names
