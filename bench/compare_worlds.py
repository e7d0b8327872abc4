"""PMAD beside its baselines on several evaluated worlds, one row each: the held-out
discipline's table. scripts/heldout_check.sh makes README's worlds (two tuning draws of
the main world, then the held-out world) with any recipe of scripts/demo.sh and calls this.

    python bench/compare_worlds.py tuning_seed0=output_dir/demo/main_seed0_area0.001-0.01 \
        tuning_seed1=output_dir/demo/main_seed1_area0.001-0.01 heldout=output_dir/demo/heldout

Each NAME=PATH is a clean-protocol results.json of run_test.py, its output folder, or a
demo world's folder (its results/results.json). Prints, per world, mean image AUROC /
pixel AUROC / AUPRO of PMAD, ProtoFlow's map alone, PatchCore and the ViT's
cross-entropy alone, and whether PMAD holds up against both baselines: at least each of
them on each of the three metrics, or within 0.003 of a baseline that is already
saturated (>= 0.995). Choose a recipe by the tuning rows; the held-out row only reports.
Writes the same as JSON with --output. Exit status 0 once the table is made, whoever
wins; 2 for a missing or unreadable results file.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from reporting import finite_or_null  # noqa: E402
from utils import MissingFileError, UserError, cli  # noqa: E402

METRICS = {"image_auroc": "image AUROC", "pixel_auroc": "pixel AUROC", "pixel_aupro": "AUPRO"}
ROWS = {"pmad": "mean", "protoflow_only": "mean_protoflow_only",
        "patchcore": "mean_patchcore", "ce_only": "mean_ce_only"}  # row -> results.json key
BASELINES = ("protoflow_only", "patchcore")
TITLES = {"pmad": "PMAD", "protoflow_only": "ProtoFlow map alone", "patchcore": "PatchCore",
          "ce_only": "ViT cross-entropy alone"}
SATURATED, TOLERANCE = 0.995, 0.003


def holds_up(pmad: float, baseline: float) -> bool:
    """PMAD's mean at least the baseline's, or within TOLERANCE of a saturated baseline
    (a table of 1.000s cannot be beaten). A float-noise margin of 1e-9 counts as equal."""
    return pmad >= baseline - 1e-9 or (baseline >= SATURATED and pmad >= baseline - TOLERANCE)


def results_path(path: str) -> str:
    """The results.json a NAME=PATH argument means (the file, or the one in the folder or
    in its results/ folder)."""
    for candidate in (path, os.path.join(path, "results.json"),
                      os.path.join(path, "results", "results.json")):
        if os.path.isfile(candidate):
            return candidate
    raise MissingFileError(f"{path} holds no results.json (nor results/results.json): "
                           "evaluate the world first (scripts/demo.sh, or run_test.py "
                           "--protocol clean)")


def world_record(path: str) -> dict:
    """{row: {metric: mean}} of one world's results.json, plus 'holds_up': {metric:
    True/False, or None where a metric is undefined (no ground-truth masks)} and
    'file'."""
    file = results_path(path)
    try:
        with open(file) as f:
            results = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{file} is not a readable results.json ({e}): evaluate the world "
                        "again") from e
    missing = [key for key in ROWS.values() if key not in results]
    if missing or results.get("protocol") != "clean":
        raise UserError(f"{file} is not a clean-protocol results.json with the baseline rows "
                        f"(protocol {results.get('protocol')!r}, missing {missing}): evaluate "
                        "with run_test.py --protocol clean")
    record: dict = {row: {m: _number(results[key].get(m)) for m in METRICS}
                    for row, key in ROWS.items()}
    record["holds_up"] = {
        m: None if any(math.isnan(record[r][m]) for r in ("pmad", *BASELINES))
        else all(holds_up(record["pmad"][m], record[b][m]) for b in BASELINES)
        for m in METRICS}
    record["file"] = file
    return record


def _number(value: object) -> float:
    return math.nan if value is None else float(value)


def verdict(record: dict) -> str:
    """'yes', or 'no: ' and each metric where PMAD falls short, with the figures."""
    short = [m for m, ok in record["holds_up"].items() if ok is False]
    if not short:
        undefined = [m for m, ok in record["holds_up"].items() if ok is None]
        return "yes" + (f" ({', '.join(METRICS[m] for m in undefined)} undefined)"
                        if undefined else "")
    return "no: " + "; ".join(
        f"{METRICS[m]} {record['pmad'][m]:.4f} against ProtoFlow "
        f"{record['protoflow_only'][m]:.4f}, PatchCore {record['patchcore'][m]:.4f}"
        for m in short)


def table(records: dict[str, dict]) -> str:
    """Markdown: one row per world, image AUROC / pixel AUROC / AUPRO per column."""
    head = ("| world | " + " | ".join(TITLES[r] for r in ROWS)
            + " | PMAD >= both baselines |")
    lines = [head, "|:--|" + ":--:|" * len(ROWS) + ":--|"]
    for name, rec in records.items():
        cells = ["/".join("n/a" if math.isnan(v := rec[r][m]) else f"{v:.3f}" for m in METRICS)
                 for r in ROWS]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {verdict(rec)} |")
    return "\n".join(lines)


def parse_world(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"{text!r}: give NAME=PATH, e.g. "
                                         "heldout=output_dir/demo/heldout")
    return name, path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("worlds", nargs="+", type=parse_world, metavar="NAME=PATH")
    p.add_argument("--output", default=None, help="also write the records as JSON here")
    args = p.parse_args(argv)
    names = [name for name, _ in args.worlds]
    if len(set(names)) != len(names):
        p.error(f"each world needs its own NAME, got {names}")

    def run() -> int:
        records = {name: world_record(path) for name, path in args.worlds}
        print("mean image AUROC / pixel AUROC / AUPRO (clean protocol)\n")
        print(table(records))
        if args.output:
            with open(args.output, "w") as f:
                json.dump(finite_or_null(records), f, indent=1, allow_nan=False)
            print(f"\n{args.output}")
        return 0
    return cli(run)


if __name__ == "__main__":
    sys.exit(main())
