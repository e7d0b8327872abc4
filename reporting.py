"""An evaluation's report, readable and kept: results.json, results.md (PMAD per class
beside the baselines' means, PMAD's lead over each baseline, each method per class, the
per-defect-type view, the mask diagnostics),
results.csv, image_scores.csv (each test image's scores), and results.partial.jsonl,
written as each class finishes so that a crash or Ctrl-C loses no finished class. The
exit status says whether every class was evaluated.
"""
from __future__ import annotations

import csv
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

import metrics
from utils import FlagError, UserError, complete_lines, set_aside, some_names, write_atomic

BASELINES = {"protoflow_only": "ProtoFlow map alone", "patchcore": "PatchCore",
             "ce_only": "ViT cross-entropy alone"}


# the metrics of the per-class comparison and of PMAD's lead over each baseline
LEADS = (("image_auroc", "Image AUROC"), ("pixel_auroc", "Pixel AUROC"),
         ("pixel_aupro", "AUPRO"))
LEGEND = ("AUC: the area under the ROC curve (AUROC); AUPRO: the area under the "
          "per-region-overlap curve up to a 30 % false positive rate, normalised; AP: the "
          "average precision; F1-max: the F1 score at the best threshold on the test set. "
          "Means are unweighted over the classes; the baselines (in italics) come from the "
          "same run. image_scores.csv has each test image's scores, higher as more "
          "anomalous: pmad, protoflow_score (ProtoFlow's own, which its threshold calls) and "
          "each baseline's by its map.")


def ratio_legend(results: dict, protocol: str) -> str:
    """What the Mask ratio column means under this run's protocol."""
    if protocol == "paper":
        return ("Mask ratio: the one of the 24 ratios the paper protocol tries that gives "
                "the best image AUROC, picked with the test labels; each other metric of "
                "PMAD's rows is at its own best ratio (the baselines are not picked).")
    if (results.get("clean_options") or {}).get("unmasked") == "zero":
        return "Mask ratio: the share of patches masked (one pass; the rest score 0)."
    return ("Mask ratio: the share of patches masked in each pass but the last, which masks "
            "the rest (every patch is masked once).")


def _methods(results: dict) -> list[tuple[str, str]]:
    """(key, label) of PMAD and of every baseline present in the results."""
    first = next(iter(results["classes"].values()))
    return [("pmad", "**PMAD**")] + [(k, label) for k, label in BASELINES.items() if k in first]


def summarize(results: dict) -> None:
    """Means over classes of PMAD and each baseline, and per defect type; the classes
    whose metrics are undefined, with why (`undefined`, where there are any)."""
    classes = results["classes"]
    results["mean"] = metrics.mean_metrics(classes)
    results.pop("undefined", None)
    undefined = undefined_classes(results)
    if undefined:
        results["undefined"] = undefined
    with warnings.catch_warnings():  # a baseline's metrics are undefined where PMAD's are,
        # for the same labels and masks (non-finite scores are refused): said once, above
        warnings.simplefilter("ignore", metrics.UndefinedMetricWarning)
        for key, _ in _methods(results)[1:]:
            results[f"mean_{key}"] = metrics.mean_metrics({c: r[key]
                                                           for c, r in classes.items()})
    per_defect: dict[str, dict[str, dict[str, float]]] = {}
    for key, _ in _methods(results):
        values: dict[str, dict[str, list[float]]] = {}
        for r in classes.values():
            for t, m in (r if key == "pmad" else r[key])["per_defect"].items():
                for metric in ("image_auroc", "pixel_auroc"):
                    values.setdefault(t, {}).setdefault(metric, []).append(m[metric])
        per_defect[key] = {t: {k: float(np.mean(v)) for k, v in ms.items()}
                           for t, ms in values.items()}
    results["per_defect_mean"] = per_defect


def display_names(names: Sequence[str]) -> dict[str, str]:
    """{class: its name in the table}: as the paper prints MVTec AD's ('metal_nut' ->
    'Metal nut'), the first letter raised and underscores as spaces, the rest as typed
    ('bolt A', 'pcb1' -> 'Pcb1'); as typed where two names would then read alike
    ('metal_plate' and 'metal plate'). A '|' is escaped (cell)."""
    pretty = {n: (n[:1].upper() + n[1:]).replace("_", " ") for n in names}
    counts = Counter(pretty.values())
    return {n: cell(p if counts[p] == 1 else n) for n, p in pretty.items()}


def cell(text: str) -> str:
    """`text` in a Markdown table cell: a '|' would end the cell."""
    return text.replace("|", "\\|")


def format_table(results: dict, protocol: str) -> str:
    """Markdown: PMAD per class shaped like the paper's table (a class scored without
    the bad images or masks --skip_bad_images left out says how many), the baselines' means
    in the same table, what its columns mean, PMAD's mean minus each baseline's to 4
    decimals (a lead under 0.001 vanishes at 3), each method per class, then the
    per-defect-type view and the mask diagnostics."""
    head = ("| Category | Image/Pixel AUC | Pixel AUPRO | Image AP | Pixel AP | "
            "Image F1-max | Pixel F1-max | Mask ratio |\n|:--|" + ":--:|" * 7)
    rows = [f"Protocol: **{protocol}**"
            + (f" ({', '.join(f'{k} {v}' for k, v in results['clean_options'].items())})"
               if results.get("clean_options") else "")
            + (f"; setting: **{results['setting']}**" if results.get("setting") else ""), ""]
    if results.get("provenance"):
        rows += [made_by(results), ""]
    if results.get("failed"):
        rows += [incomplete_note(results), ""]
    if results.get("trained_test_images"):
        rows += ["**TRAINED ON TEST IMAGES**: " + "; ".join(
            f"{c}: {learned_what(by)}" for c, by in results["trained_test_images"].items())
            + ": their metrics read better than they are.", ""]
    if results.get("undefined"):
        rows += ["Undefined metrics (so are the means of those metrics): " + "; ".join(
            f"{c}: {why}" for c, why in results["undefined"].items()), ""]
    rows.append(head)

    def row(name: str, r: dict) -> str:
        ratio = r.get("mask_ratio")
        return (f"| {name} | {r['image_auroc']:.3f}/{r['pixel_auroc']:.3f} | "
                f"{r['pixel_aupro']:.3f} | {r['image_ap']:.3f} | {r['pixel_ap']:.3f} | "
                f"{r['image_f1_max']:.3f} | {r['pixel_f1_max']:.3f} | "
                f"{'' if ratio is None else f'{ratio:.2f}'} |")

    shown = display_names(list(results["classes"]))
    for name, r in results["classes"].items():
        skipped = len(r.get("skipped_images") or ())
        rows.append(row(shown[name] + (f" ({skipped} bad image(s) left out)" if skipped
                                       else ""), r))
    rows.append(row("**Mean (PMAD)**", results["mean"]))
    for key, label in _methods(results)[1:]:
        rows.append(row(f"*{label} (mean)*", results[f"mean_{key}"]))
    rows += ["", f"{LEGEND} {ratio_legend(results, protocol)}"]
    methods = _methods(results)
    rows += ["", "PMAD's mean minus each baseline's (4 decimals, as differences under 0.001 "
             "vanish above; negative: PMAD is behind):", "",
             "| Baseline | " + " | ".join(label for _, label in LEADS) + " |",
             "|:--|" + ":--:|" * len(LEADS)]
    for key, label in methods[1:]:
        leads = (results["mean"][k] - results[f"mean_{key}"][k] for k, _ in LEADS)
        rows.append(f"| {label} | " + " | ".join(
            f"{d:+.4f}" if math.isfinite(d) else "nan" for d in leads) + " |")
    rows += ["", "Image AUROC / pixel AUROC / AUPRO per class and method:", "",
             "| Category | " + " | ".join(label for _, label in methods) + " |",
             "|:--|" + ":--:|" * len(methods)]
    for name, r in results["classes"].items():
        rows.append(f"| {shown[name]} | " + " | ".join(
            "/".join(f"{(r if key == 'pmad' else r[key])[k]:.3f}" for k, _ in LEADS)
            for key, _ in methods) + " |")
    types = sorted({t for per in results["per_defect_mean"].values() for t in per})
    rows += ["", "Image/pixel AUROC per defect type (mean over the classes that have it; each "
             "type's images against the class's good ones):", "",
             "| Defect type | classes / defective images | "
             + " | ".join(label for _, label in methods) + " |",
             "|:--|:--:|" + ":--:|" * len(methods)]
    for t in types:
        cells = [defect_type_size(results, t)]
        for key, _ in methods:
            m = results["per_defect_mean"][key].get(t)
            cells.append("" if m is None else f"{m['image_auroc']:.3f}/{m['pixel_auroc']:.3f}")
        rows.append(f"| {cell(t)} | " + " | ".join(cells) + " |")
    rows += ["", "Why a map can miss a defect: the anomalous images masked by their proposal "
             "(not at random), the fraction of all anomalous images' defect pixels (pooled) "
             "in the first masking pass, and the anomalous images whose mask marks no "
             "pixel:", "",
             "| Category | anomalous images given the proposal mask | defect pixels "
             "masked | anomalous images with no defect pixel |", "|:--|:--:|:--:|:--:|"]
    for name, r in results["classes"].items():
        d = r["diagnostics"]
        empty = d.get("empty_defect_masks")  # absent from a record of an earlier version
        rows.append(f"| {shown[name]} | "
                    f"{d['anomalous_with_proposal']}/{d['anomalous_images']} | "
                    f"{d['masked_defect_fraction']:.2f} | {'' if empty is None else empty} |")
    if protocol == "clean":
        rows += calls_table(results, shown)
    return "\n".join(rows)


def learned_what(by: dict[str, list[str]]) -> str:
    """'--ckpt learned 2 test image(s) (a, b), ... by content': run_test.trained_test_images'
    finding of one class, {flag: paths}, for its warning and results.md."""
    return ", ".join(f"{flag} learned {len(paths)} test image(s) ({some_names(paths, 3)})"
                     for flag, paths in by.items()) + " by content"


def defect_type_size(results: dict, defect_type: str) -> str:
    """'classes / defective images' of a defect type, so that a mean over one class of
    3 images is not read as one over 15 of 300; the images unknown ('?') where a record
    of an earlier version did not count them."""
    per = [r["per_defect"][defect_type] for r in results["classes"].values()
           if defect_type in r["per_defect"]]
    counts = [p.get("count") for p in per]
    return f"{len(per)} / " + ("?" if None in counts else str(sum(counts)))


def calls_table(results: dict, shown: dict[str, str]) -> list[str]:
    """results.md's rows of ProtoFlow's calls at its stored threshold, per class, and the
    classes without them named with why (no threshold for the class; a record of an
    earlier version, reused by --resume_eval)."""
    calls = {name: r["calls"] for name, r in results["classes"].items() if r.get("calls")}
    missing = {name: ("no threshold for it: a released ProtoFlow file, or prototypes other "
                      "than the file's" if "calls" in r else "a record of an earlier version")
               for name, r in results["classes"].items() if not r.get("calls")}
    rows = ["", "ProtoFlow's calls at its stored threshold (predict.py's protoflow_decision; "
            "PMAD's score has no threshold):", ""]
    if calls:
        rows += ["| Category | threshold | good images called anomalous | anomalous images "
                 "called anomalous |", "|:--|:--:|:--:|:--:|"]
        rows += [f"| {shown[name]} | {results['classes'][name]['called_at']:.4f} | "
                 f"{c['good_called_anomalous']}/{c['good_images']} | "
                 f"{c['anomalous_called_anomalous']}/{c['anomalous_images']} |"
                 for name, c in calls.items()]
    if missing:
        rows += (["", "None for: "] if calls else ["None for: "])
        rows[-1] += "; ".join(f"{shown[n]} ({why})" for n, why in missing.items()) + "."
    return rows


def made_by(results: dict) -> str:
    """The line that says what made the numbers: the checkpoint (path, the epochs it
    trained where its file says, the start of its sha256), the code's version, when,
    where and how long (results.json has all of it, the command line too), and the
    classes whose records an earlier run made (--resume_eval), which the code and time
    above did not."""
    p, args = results["provenance"], results.get("args") or {}
    sha = (results.get("checkpoints") or {}).get("pmad")
    seconds = results.get("seconds")
    earlier = [c for c, r in results["classes"].items() if r.get("provenance") != p]
    epochs = results.get("vit_epochs")
    about = ", ".join(([f"{epochs} epoch(s)"] if epochs is not None else [])
                      + ([f"sha256 {sha[:12]}"] if sha else []))
    return (f"Checkpoint {args.get('ckpt')}" + (f" ({about})" if about else "")
            + f"; code {p.get('code') or 'of no git checkout'}; started {p.get('started_utc')}"
            f" on {p.get('host')} ({p.get('device')})"
            + (f", {seconds:.0f} s" if seconds is not None else "")
            + (f"; {len(earlier)} class(es) reused from an earlier run ({some_names(earlier, 3)}"
               "; each record's provenance is in results.json)" if earlier else "") + ".")


def incomplete_note(results: dict) -> str:
    """The line that marks the table of a run that stopped: its means cover only the
    classes evaluated, which must not pass for the benchmark's."""
    failed = "; ".join(f"{c} ({why})" for c, why in results["failed"].items())
    rest = results.get("not_evaluated") or []
    return (f"**INCOMPLETE**: the means are over the {len(results['classes'])} class(es) "
            f"evaluated only. Failed: {failed}."
            + (f" Not evaluated: {', '.join(rest)}." if rest else "")
            + " Re-run with --resume_eval to finish.")


# how a name that is not UTF-8 (a file name's byte as a surrogate) is written in the text
# results: escaped, '\udce9', not a crash after the whole evaluation
UNDECODABLE = "backslashreplace"
RESULT_FILES = ("results.json", "results.md", "results.csv", "image_scores.csv")
HEATMAPS = "heatmaps"  # the folder of run_test.py --save_heatmaps


def write_results(results: dict, output_dir: Path, protocol: str) -> str:
    """results.json (everything), results.md (the table, returned) and results.csv (one
    row per class and method, for plotting) in `output_dir`, each written whole or not at
    all."""
    output_dir.mkdir(parents=True, exist_ok=True)
    table = format_table(results, protocol)
    text = json.dumps(finite_or_null(results), indent=2, default=float, allow_nan=False)
    write_atomic(output_dir / "results.json", lambda tmp: Path(tmp).write_text(text))
    write_atomic(output_dir / "results.md", lambda tmp: Path(tmp).write_text(
        table + "\n", encoding="utf-8", errors=UNDECODABLE))

    def write_csv(tmp: str) -> None:
        with open(tmp, "w", newline="", encoding="utf-8", errors=UNDECODABLE) as f:
            writer = csv.writer(f)
            writer.writerow(["protocol", "class", "method", *metrics.METRIC_NAMES,
                             "mask_ratio"])
            for key, _ in _methods(results):
                for name, r in results["classes"].items():
                    m = r if key == "pmad" else r[key]
                    writer.writerow([protocol, name, key,
                                     *(m[k] for k in metrics.METRIC_NAMES),
                                     r.get("mask_ratio", "") if key == "pmad" else ""])
                mean = results["mean" if key == "pmad" else f"mean_{key}"]
                writer.writerow([protocol, "mean", key,
                                 *(mean[k] for k in metrics.METRIC_NAMES), ""])
    write_atomic(output_dir / "results.csv", write_csv)
    write_image_scores(results, output_dir / "image_scores.csv")
    return table


def write_image_scores(results: dict, path: Path) -> None:
    """image_scores.csv: one row per test image of every class (class, name, defect type,
    then the image scores of its record's 'images'). A class whose record has none (a
    record of an earlier version, reused by --resume_eval) is named, not left out
    silently."""
    rows = [{"class": name, **image} for name, r in results["classes"].items()
            for image in r.get("images", [])]
    missing = [name for name, r in results["classes"].items() if "images" not in r]
    if missing:
        print(f"[run_test] {path.name} lacks {', '.join(missing)}: their records come from "
              "an earlier version's run; evaluate them afresh (no --resume_eval) to add "
              "them", file=sys.stderr)
    if not rows:
        return

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="", encoding="utf-8", errors=UNDECODABLE) as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    write_atomic(path, write)


def finite_or_null(value: Any) -> Any:
    """`value` with every nan or infinite float as None: JSON has no NaN (JavaScript's
    JSON.parse and jq refuse Python's bare `NaN`), so an undefined metric is null."""
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


SKIP_FLAG = "skip_bad_images"  # a key field a record may differ in, see PartialResults
TEST_DATA = "test_data"  # the class's test images and masks (datasets.test_set_contents)
# The layout of a class's record, in the resume key: a record of another is evaluated again
# (2: clean records' called_anomalous is ProtoFlow's calls, proposal_masks and called_at)
RECORD_FORMAT, RECORD_VERSION = "record_format", 2


def _left_out_images(entry: dict) -> bool:
    """Whether a partial record left out bad images: its run passed --skip_bad_images and
    the record lists some, or (a record of an earlier version) lists none at all. A
    record that left out nothing is the same under either flag, so it is reused."""
    return bool(entry["key"].get(SKIP_FLAG)) and entry["record"].get("skipped_images") != []


class PartialResults:
    """Each finished class's record, one JSON line as soon as it is done, so that an
    error or Ctrl-C in class N loses none of classes 1 ... N-1; `key` (what the records
    depend on) and the class's part of it in `class_keys` (its own files) must match
    for a resumed run to reuse a record, but for --skip_bad_images where the record left
    out no image (the hint after a bad image is to resume with it). A record of other
    test images (TEST_DATA; a replaced bad image, or none recorded) is evaluated again,
    with a note, not the whole resume refused. Only the classes of `class_keys` are
    read."""

    def __init__(self, path: Path, key: dict, class_keys: dict[str, dict], resume: bool
                 ) -> None:
        self.path = path
        self.keys = {c: json.loads(json.dumps({**key, **k}, default=str))
                     for c, k in class_keys.items()}
        self.done: dict[str, dict] = {}
        self.set_aside_to: str | None = None
        if not resume:  # afresh: no output of the last evaluation may look current, and
            # none is deleted (a rerun that crashes must not cost the last one's results)
            self.set_aside_to = set_aside(path.parent, [path.name, *RESULT_FILES, HEATMAPS])
            return
        for entry in self._read_entries():
            want = self.keys.get(entry["class"])
            if want is None:
                continue
            changed = sorted(k for k in want.keys() | entry["key"].keys()
                             if entry["key"].get(k) != want.get(k))
            if changed == [SKIP_FLAG] and _left_out_images(entry):
                print(f"[run_test] {entry['class']}: its record in {path} left out bad "
                      f"images (--{SKIP_FLAG}); evaluated again without", file=sys.stderr)
                continue
            if RECORD_FORMAT in changed and set(changed) <= {TEST_DATA, SKIP_FLAG,
                                                              RECORD_FORMAT}:
                print(f"[run_test] {entry['class']}: its record in {path} is of an earlier "
                      "version, with other fields; evaluated again", file=sys.stderr)
                continue
            if TEST_DATA in changed and set(changed) <= {TEST_DATA, SKIP_FLAG}:
                print(f"[run_test] {entry['class']}: its record in {path} is of other test "
                      "images or masks (or of an earlier version, which did not record "
                      "them); evaluated again", file=sys.stderr)
                continue
            if changed and changed != [SKIP_FLAG]:
                raise FlagError(f"--resume_eval: {path} holds results of another evaluation "
                                f"(its record of {entry['class']} differs in "
                                f"{', '.join(changed)}): pass that run's flags and files, or "
                                "drop --resume_eval to start afresh")
            self.done[entry["class"]] = entry["record"]

    def _read_entries(self) -> list[dict]:
        """The file's records. A last line cut short (the run stopped while writing it)
        is dropped, and the file rewritten without it, so that the next record starts a
        line of its own; its class is evaluated again."""
        whole, tail = complete_lines(self.path) if self.path.is_file() else ([], "")
        entries = []
        for n, line in enumerate(whole, 1):
            if not line.strip():
                continue
            try:
                entries.append(json.loads(line))
            except ValueError as e:
                raise UserError(f"--resume_eval: line {n} of {self.path} is not a record "
                                f"({e}): drop --resume_eval to evaluate afresh") from e
        if tail.strip():
            print(f"[run_test] {self.path}: its last line was cut short (the run stopped "
                  "while writing it); that class is evaluated again", file=sys.stderr)
            write_atomic(self.path, lambda tmp: Path(tmp).write_text(
                "".join(line + "\n" for line in whole)))
        return entries

    def add(self, class_name: str, record: dict) -> None:
        """Append one class's record as one line, on disk before the next class starts."""
        with open(self.path, "a") as f:
            f.write(json.dumps({"class": class_name, "key": self.keys[class_name],
                                "record": record}, default=float) + "\n")
            f.flush()
            os.fsync(f.fileno())


def exit_status(results: dict) -> int:
    """0 when every class was evaluated, else 1: a class fails when it is in
    results['failed'] or any of its metrics is not finite (a pixel metric only where it
    has ground truth). Each failed class is listed on stderr with why."""
    failed = results.get("failed", {})
    why = {**failed, **{c: w for c, w in undefined_classes(results).items()
                        if c not in failed}}
    if why:
        print("[run_test] failed classes: " + "; ".join(f"{c} ({_first_line(w)})"
                                                        for c, w in why.items()),
              file=sys.stderr)
    return 1 if why else 0


def undefined_classes(results: dict) -> dict[str, str]:
    """{class: why} of the classes evaluated whose metrics are not all finite (a pixel
    metric only where the class has ground truth): such a class fails the run, and
    results.json and results.md say why beside its nan."""
    why = {}
    for name, record in results["classes"].items():
        undefined = [k for k in metrics.METRIC_NAMES
                     if (record.get("ground_truth", True) or k not in metrics.PIXEL_METRICS)
                     and not math.isfinite(record.get(k, math.nan))]
        if undefined:
            why[name] = _why_undefined(record, undefined)
    return why


def _first_line(text: str) -> str:
    """A reason's first line: a list below it was printed with the error itself."""
    lines = text.splitlines() or [""]
    return lines[0] + (" ..." if len(lines) > 1 else "")


def _why_undefined(record: dict, undefined: list[str]) -> str:
    """Why a class's metrics are not finite: a test set that lacks defective or good
    images (a custom class of good images only) leaves the image metrics undefined."""
    images, anomalous = record.get("num_images"), record.get("num_anomalous")
    if anomalous == 0:
        return ("no defective test image, so its metrics are undefined: add images to "
                "test/<defect>/, or score its images with predict.py")
    if anomalous is not None and anomalous == images:
        return ("no good test image, so its image AUROC is undefined (and its image AP "
                "and F1-max are 1 whatever the scores): add images to test/good/")
    return f"{', '.join(undefined)} undefined"


def report(results: dict, out_dir: Path, protocol: str, start: float, heatmaps: bool
           ) -> None:
    """The table of the classes finished (all, or those before a failure), printed and
    written."""
    if not results["classes"]:
        print("[run_test] no class finished: no table written", file=sys.stderr)
        return
    summarize(results)
    results["seconds"] = time.time() - start
    table = write_results(results, out_dir, protocol)
    print(table)
    print(f"results: {out_dir / 'results.json'}, {out_dir / 'results.md'}, "
          f"{out_dir / 'results.csv'}, {out_dir / 'image_scores.csv'}"
          + (f"; heatmaps: {out_dir / HEATMAPS}" if heatmaps else ""))