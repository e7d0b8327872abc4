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
wins; 2 for a bad argument or a results file it cannot compare (missing, unreadable,
another protocol's, without the baseline rows).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from reporting import BASELINES, finite_or_null  # noqa: E402
from utils import MissingFileError, UserError, cli, read_json_object  # noqa: E402

METRICS = {"image_auroc": "image AUROC", "pixel_auroc": "pixel AUROC", "pixel_aupro": "AUPRO"}
ROWS = {"pmad": "PMAD", **BASELINES}  # row -> title; results.json keeps it as mean_<row>
COMPARED = ("protoflow_only", "patchcore")  # the baselines PMAD must hold up against
SATURATED, TOLERANCE = 0.995, 0.003
EPS = 1e-9  # means of per-class means carry float noise (0.9650000000000001)


def holds_up(pmad: float, baseline: float) -> bool:
    """PMAD's mean at least the baseline's, or within TOLERANCE of a saturated baseline
    (a table of 1.000s cannot be beaten); float noise below EPS counts as equal."""
    return pmad >= baseline - EPS or (baseline >= SATURATED - EPS
                                      and pmad >= baseline - TOLERANCE - EPS)


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
    """{row: {metric: mean, NaN where undefined}} of one world's results.json (a row the
    run did not score, e.g. CE alone under --unmasked zero, is all NaN), plus 'holds_up':
    {metric: True/False, None where neither PMAD nor the baselines define it (no
    ground-truth masks)} and 'file'."""
    file = results_path(path)
    results = read_json_object(file, "evaluate the world again")
    if results.get("protocol") != "clean":
        raise UserError(f"{file} is not a clean-protocol results.json (protocol "
                        f"{results.get('protocol')!r}): evaluate with run_test.py --protocol "
                        "clean")
    record: dict = {row: _means(results, row, file) for row in ROWS}
    record["holds_up"] = {m: _holds_up_on(record, m, file) for m in METRICS}
    record["file"] = file
    return record


def _means(results: dict, row: str, file: str) -> dict[str, float]:
    key = "mean" if row == "pmad" else f"mean_{row}"
    means = results.get(key)
    if means is None and row not in (*COMPARED, "pmad"):
        return dict.fromkeys(METRICS, math.nan)
    bad = (f"{file}: '{key}' must map {list(METRICS)} to numbers (null where undefined), "
           f"got {means!r:.200}: evaluate the world again with this version of run_test.py")
    if not isinstance(means, dict) or any(m not in means for m in METRICS):
        raise UserError(bad)
    try:
        return {m: math.nan if means[m] is None else float(means[m]) for m in METRICS}
    except (TypeError, ValueError) as e:
        raise UserError(bad) from e


def _holds_up_on(record: dict, metric: str, file: str) -> bool | None:
    """None where no row defines `metric`; a PMAD without it fails; a baseline without
    it beside a defined PMAD is a broken file."""
    pmad = record["pmad"][metric]
    baselines = [record[b][metric] for b in COMPARED]
    if all(math.isnan(v) for v in (pmad, *baselines)):
        return None
    if math.isnan(pmad):
        return False
    if any(math.isnan(v) for v in baselines):
        raise UserError(f"{file} defines PMAD's {METRICS[metric]} but not every baseline's: "
                        "evaluate the world again")
    return all(holds_up(pmad, v) for v in baselines)


def verdict(record: dict) -> str:
    """'yes', 'n/a' when no metric is defined, or 'no: ' and each metric where PMAD
    falls short, with the figures."""
    found = record["holds_up"]
    short = [m for m, ok in found.items() if ok is False]
    if short:
        return "no: " + "; ".join(
            f"{METRICS[m]} {_figure(record['pmad'][m], 4)} against " + ", ".join(
                f"{ROWS[b]} {_figure(record[b][m], 4)}" for b in COMPARED) for m in short)
    undefined = [METRICS[m] for m, ok in found.items() if ok is None]
    if len(undefined) == len(found):
        return "n/a"
    return "yes" + (f" ({', '.join(undefined)} undefined)" if undefined else "")


def _figure(value: float, digits: int) -> str:
    return "n/a" if math.isnan(value) else f"{value:.{digits}f}"


def table(records: dict[str, dict]) -> str:
    """Markdown: one row per world, image AUROC / pixel AUROC / AUPRO per column."""
    head = ("| world | " + " | ".join(ROWS.values())
            + " | PMAD >= both baselines |")
    lines = [head, "|:--|" + ":--:|" * len(ROWS) + ":--|"]
    for name, rec in records.items():
        cells = ["/".join(_figure(rec[r][m], 3) for m in METRICS) for r in ROWS]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {verdict(rec)} |")
    return "\n".join(lines)


def parse_world(text: str) -> tuple[str, str]:
    """argparse type of a NAME=PATH argument."""
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
            try:
                with open(args.output, "w") as f:
                    json.dump(finite_or_null(records), f, indent=1, allow_nan=False)
            except OSError as e:
                raise UserError(f"--output {args.output}: {e.strerror or e}: give a path in "
                                "a writable folder") from e
            print(f"\n{args.output}")
        return 0
    return cli(run)


if __name__ == "__main__":
    sys.exit(main())
