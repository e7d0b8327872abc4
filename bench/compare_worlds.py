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
A second table says how much of PMAD's image AUROC gap to each baseline is the test
images' luck: the gap with its 95 % paired bootstrap interval (the test images of each
class resampled, good and defective apart, the same draw for both methods), from the
per-image scores of run_test.py's results.json. With --same_test_images (runs of two
recipes, or two training runs, on one test set, e.g. the pooled tuning sets of
docs/heldout.md) a third table gives each run's PMAD image AUROC minus the first run's,
paired the same way.
Writes the same as JSON with --output.
Exit status 0 once the tables are made, whoever wins; 2 for a bad argument or a results
file it cannot compare (missing, unreadable, another protocol's, without the baseline
rows).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import numpy as np
from scipy.stats import rankdata

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from reporting import BASELINES, finite_or_null  # noqa: E402
from utils import MissingFileError, UserError, cli, read_json_object  # noqa: E402

METRICS = {"image_auroc": "image AUROC", "pixel_auroc": "pixel AUROC", "pixel_aupro": "AUPRO"}
ROWS = {"pmad": "PMAD", **BASELINES}  # row -> title; results.json keeps it as mean_<row>
COMPARED = ("protoflow_only", "patchcore")  # the baselines PMAD must hold up against
SATURATED, TOLERANCE = 0.995, 0.003
EPS = 1e-9  # means of per-class means carry float noise (0.9650000000000001)
DRAWS, SEED = 2000, 0  # the paired bootstrap's resamples of the test images, seeded


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


def load_results(path: str) -> tuple[str, dict]:
    """(file, contents) of the clean-protocol results.json a NAME=PATH argument means."""
    file = results_path(path)
    results = read_json_object(file, "evaluate the world again")
    if results.get("protocol") != "clean":
        raise UserError(f"{file} is not a clean-protocol results.json (protocol "
                        f"{results.get('protocol')!r}): evaluate with run_test.py --protocol "
                        "clean")
    if results.get("failed"):  # its means cover the classes finished only
        rest = results.get("not_evaluated") or []
        raise UserError(f"{file} is an evaluation that stopped (failed: "
                        f"{', '.join(results['failed'])}"
                        + (f"; not evaluated: {', '.join(rest)}" if rest else "")
                        + "): finish it with the same run_test.py command and --resume_eval, "
                        "then compare")
    return file, results


def options_note(loaded: dict[str, tuple[str, dict]]) -> str | None:
    """A line naming each world's clean-protocol options when they differ: the table
    then compares scoring choices as well as worlds."""
    options = {name: results.get("clean_options") for name, (_, results) in loaded.items()}
    if len({json.dumps(o, sort_keys=True) for o in options.values()}) < 2:
        return None
    return ("note: the worlds were scored with different clean-protocol options: "
            + "; ".join(f"{name}: {o}" for name, o in options.items()))


def world_record(file: str, results: dict) -> dict:
    """{row: {metric: mean, NaN where undefined}} of one world's results.json (a row the
    run did not score, e.g. CE alone under --unmasked zero, is all NaN), plus 'holds_up':
    {metric: True/False, None where neither PMAD nor the baselines define it (no
    ground-truth masks)} and 'file'."""
    record: dict = {row: _means(results, row, file) for row in ROWS}
    record["holds_up"] = {m: _holds_up_on(record, m, file) for m in METRICS}
    record["image_auroc_gap"] = image_auroc_gaps(results)
    record["file"] = file
    return record


def _aurocs(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(D, N) scores of D resamples, (D, N) bool labels -> (D,) image AUROCs, by the
    rank sum of the defective images (ties take their average rank, so count half):
    memory D x N, whatever the number of test images."""
    ranks = rankdata(scores, axis=1)
    n_pos = labels.sum(axis=1)
    n_neg = labels.shape[1] - n_pos
    return ((ranks * labels).sum(axis=1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def paired_auroc_gaps(classes: list[tuple[np.ndarray, dict[str, np.ndarray]]],
                      pairs: dict[str, tuple[str, str]], draws: int = DRAWS, seed: int = SEED
                      ) -> dict[str, dict[str, float]]:
    """{name: {'gap', 'low', 'high'}} for each name -> (a, b) of `pairs`: the mean over
    classes of a's image AUROC minus b's, and the 2.5 and 97.5 percentiles of that gap
    over `draws` paired bootstrap resamples (each class's good and defective test images
    resampled apart, one draw for every method). An interval holding 0 means another
    draw of test images could reverse the gap. `classes`: per class, (labels (N,) bool,
    True for defective, {method: image scores (N,)}), with good and defective images."""
    rng = np.random.default_rng(seed)
    gaps = {k: np.zeros(draws) for k in pairs}
    point = dict.fromkeys(pairs, 0.0)
    methods = sorted({m for pair in pairs.values() for m in pair})
    for labels, scores in classes:
        # each draw resamples the good and the defective images apart: (draws, N)
        picks = np.concatenate([rng.choice(np.flatnonzero(labels == v), (draws, n_v))
                                for v, n_v in ((False, (~labels).sum()), (True, labels.sum()))],
                               axis=1)
        once = {m: float(_aurocs(scores[m][None], labels[None])[0]) for m in methods}
        drawn = {m: _aurocs(scores[m][picks], labels[picks]) for m in methods}  # (draws,)
        for k, (a, b) in pairs.items():
            point[k] += once[a] - once[b]
            gaps[k] += drawn[a] - drawn[b]
    n = len(classes)
    return {k: {"gap": point[k] / n, "low": float(np.percentile(gaps[k] / n, 2.5)),
                "high": float(np.percentile(gaps[k] / n, 97.5))} for k in pairs}


def per_image_scores(results: dict, methods: tuple[str, ...]
                     ) -> list[tuple[str, list[tuple[str, str]], np.ndarray,
                                     dict[str, np.ndarray]]] | None:
    """Per class of a results.json: (class, (name, defect type) of each test image,
    labels (N,) bool, True for defective, {method: image scores (N,)}). None where a class
    has no per-image scores (a results.json of an earlier version) or lacks good or
    defective images, whose AUROC is undefined."""
    classes = []
    for cls, record in (results.get("classes") or {}).items():
        images = record.get("images")
        if not images:
            return None
        labels = np.array([i["defect_type"] != "good" for i in images])
        if labels.all() or not labels.any():
            return None
        classes.append((cls, [(i["name"], i["defect_type"]) for i in images], labels,
                        {m: np.array([i[m] for i in images]) for m in methods}))
    return classes or None


def image_auroc_gaps(results: dict, draws: int = DRAWS, seed: int = SEED
                     ) -> dict[str, dict[str, float]] | None:
    """{baseline: {'gap', 'low', 'high'}}: PMAD's mean image AUROC over classes minus the
    baseline's with its paired bootstrap interval (paired_auroc_gaps), from the per-image
    scores of a results.json; None where per_image_scores is."""
    classes = per_image_scores(results, ("pmad", *COMPARED))
    if classes is None:
        return None
    return paired_auroc_gaps([(labels, scores) for _, _, labels, scores in classes],
                             {b: ("pmad", b) for b in COMPARED}, draws, seed)


def gaps_to_first_run(loaded: dict[str, tuple[str, dict]], draws: int = DRAWS,
                      seed: int = SEED) -> dict[str, dict[str, float]] | None:
    """{run: {'gap', 'low', 'high'}} for every run but the first: its PMAD's mean image
    AUROC minus the first run's, paired over the test images both scored (two recipes,
    or two training runs, on one test set). None where a run has no per-image scores; a
    run that scored other classes or other test images is an error."""
    per_run = {name: per_image_scores(results, ("pmad",))
               for name, (_, results) in loaded.items()}
    if any(classes is None for classes in per_run.values()):
        return None
    (first, (first_file, _)), *_ = loaded.items()
    images = [(cls, names) for cls, names, _, _ in per_run[first]]
    for name, classes in per_run.items():
        if [(cls, names) for cls, names, _, _ in classes] != images:
            raise UserError(f"{loaded[name][0]} scores other classes or test images than "
                            f"{first_file}: --same_test_images compares runs on one test set")
    paired = [(labels, {name: per_run[name][k][3]["pmad"] for name in per_run})
              for k, (_, _, labels, _) in enumerate(per_run[first])]
    return paired_auroc_gaps(paired, {name: (name, first) for name in per_run if name != first},
                             draws, seed)


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
    falls short, with the baselines it falls short of (every one where PMAD's is
    undefined), to as many decimals as tell the figures apart (at least 4)."""
    found = record["holds_up"]
    short = [m for m, ok in found.items() if ok is False]
    if short:
        return "no: " + "; ".join(_shortfall(record, m) for m in short)
    undefined = [METRICS[m] for m, ok in found.items() if ok is None]
    if len(undefined) == len(found):
        return "n/a"
    return "yes" + (f" ({', '.join(undefined)} undefined)" if undefined else "")


def _shortfall(record: dict, metric: str) -> str:
    pmad = record["pmad"][metric]
    below = [b for b in COMPARED if math.isnan(pmad) or not holds_up(pmad, record[b][metric])]
    digits = max(_digits_apart(pmad, record[b][metric]) for b in below)
    return f"{METRICS[metric]} {_figure(pmad, digits)} against " + ", ".join(
        f"{ROWS[b]} {_figure(record[b][metric], digits)}" for b in below)


def _digits_apart(a: float, b: float, least: int = 4, most: int = 8) -> int:
    """The fewest decimals, from `least`, at which `a` and `b` print apart (0.97395 and
    0.97400 both read 0.9740 with 4); `least` where either is undefined."""
    if math.isnan(a) or math.isnan(b):
        return least
    for digits in range(least, most):
        if f"{a:.{digits}f}" != f"{b:.{digits}f}":
            return digits
    return most


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


def gap_table(records: dict[str, dict]) -> str:
    """Markdown: per world, PMAD's image AUROC minus each baseline's, [95 % interval]."""
    lines = ["| world | " + " | ".join(f"vs {ROWS[b]}" for b in COMPARED) + " |",
             "|:--|" + ":--:|" * len(COMPARED)]
    for name, rec in records.items():
        gaps = rec["image_auroc_gap"]
        cells = ["n/a (no per-image scores: evaluate again)" if gaps is None else
                 f"{gaps[b]['gap']:+.4f} [{gaps[b]['low']:+.4f}, {gaps[b]['high']:+.4f}]"
                 for b in COMPARED]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_gap_table(records: dict[str, dict], gaps: dict[str, dict[str, float]] | None) -> str:
    """Markdown: per run after the first, its PMAD image AUROC and the gap to the first
    run's, [95 % interval]."""
    lines = ["| run | PMAD image AUROC | minus the first run's |", "|:--|:--:|:--:|"]
    for name, rec in list(records.items())[1:]:
        cell = ("n/a (no per-image scores: evaluate again)" if gaps is None else
                "{gap:+.4f} [{low:+.4f}, {high:+.4f}]".format(**gaps[name]))
        lines.append(f"| {name} | {_figure(rec['pmad']['image_auroc'], 4)} | {cell} |")
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
    p.add_argument("--same_test_images", action="store_true",
                   help="the worlds are runs on one test set (two recipes, or two training "
                        "runs): also print each run's PMAD image AUROC minus the first run's")
    args = p.parse_args(argv)
    names = [name for name, _ in args.worlds]
    if len(set(names)) != len(names):
        p.error(f"each world needs its own NAME, got {names}")

    def run() -> int:
        loaded = {name: load_results(path) for name, path in args.worlds}
        records = {name: world_record(*contents) for name, contents in loaded.items()}
        note = options_note(loaded)
        if note:
            print(note + "\n")
        print("mean image AUROC / pixel AUROC / AUPRO (clean protocol)\n")
        print(table(records))
        print(f"\nPMAD's image AUROC minus each baseline's [95 % interval, {DRAWS} paired "
              "bootstrap draws of the test images]\n")
        print(gap_table(records))
        if args.same_test_images:
            gaps = gaps_to_first_run(loaded)
            print(f"\neach run's PMAD image AUROC minus {names[0]}'s (the same test images)\n")
            print(run_gap_table(records, gaps))
            for name, rec in records.items():
                rec["pmad_image_auroc_gap_to_first"] = None if gaps is None else gaps.get(name)
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
