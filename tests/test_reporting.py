"""reporting.py from given records: results.json (strict JSON), results.md, results.csv,
the means and per-defect-type views of PMAD and its baselines, the partial results a
resumed evaluation reads, and the exit status."""
from __future__ import annotations

import csv
import json
import math
import re
import warnings

import numpy as np
import pytest

import metrics
import reporting
import utils
from conftest import strict_json
from metrics import METRIC_NAMES


DEFECT_TYPES = ["scratch", "crack", "hole", "stain", "bent", "fold", "cut", "glue"]


def _class_record(value: float, types: list[str]) -> dict:
    """One class's record as protocols.py makes it: PMAD's metrics, mask ratio and
    diagnostics, and each baseline's metrics, all with a per-defect-type view."""
    def method(v: float) -> dict:
        return {**dict.fromkeys(METRIC_NAMES, v),
                "per_defect": {t: {"image_auroc": v, "pixel_auroc": v, "count": 2}
                               for t in types}}
    return {**method(value), "mask_ratio": 0.3, "protoflow_only": method(value - 0.2),
            "patchcore": method(value - 0.4),
            "diagnostics": {"anomalous_with_proposal": 1, "anomalous_images": 2,
                            "masked_defect_fraction": 0.5}}


def test_results_json_writes_null_for_undefined_metrics(tmp_path):
    """JSON has no NaN: an undefined metric (a class without masks) is null in
    results.json, numpy floats included; results.md shows nan; the results in memory
    keep nan (exit_status reads them)."""
    record = {**dict.fromkeys(metrics.METRIC_NAMES, 0.9),
              **dict.fromkeys(metrics.PIXEL_METRICS, math.nan), "image_ap": np.float32(0.5),
              "pixel_ap": np.float32("nan"), "mask_ratio": 0.3, "ground_truth": False,
              "per_defect": {"crack": {"image_auroc": 0.8, "pixel_auroc": math.nan}},
              "diagnostics": {"anomalous_with_proposal": 2, "anomalous_images": 4,
                              "masked_defect_fraction": math.nan}}
    results = {"protocol": "clean", "clean_options": None, "classes": {"tiles": record},
               "seconds": math.inf}
    with pytest.warns(metrics.UndefinedMetricWarning):
        reporting.summarize(results)
    reporting.write_results(results, tmp_path, "clean")
    saved = strict_json(tmp_path / "results.json")
    tiles = saved["classes"]["tiles"]
    assert [tiles[k] for k in metrics.METRIC_NAMES] == [0.9, None, None, 0.5, None, 0.9, None]
    assert tiles["per_defect"] == {"crack": {"image_auroc": 0.8, "pixel_auroc": None}}
    assert tiles["diagnostics"]["masked_defect_fraction"] is None and saved["seconds"] is None
    assert saved["mean"]["pixel_aupro"] is None and saved["mean"]["image_auroc"] == 0.9
    assert saved["per_defect_mean"]["pmad"]["crack"] == {"image_auroc": 0.8,
                                                         "pixel_auroc": None}
    table = (tmp_path / "results.md").read_text()
    assert "| Tiles | 0.900/nan | nan | 0.500 | nan | 0.900 | nan | 0.30 |" in table
    assert math.isnan(results["classes"]["tiles"]["pixel_auroc"])


def test_summary_means_each_method_and_defect_type_from_its_own_records(tmp_path):
    """Two classes: PMAD's mean and each baseline's come from that method's own records,
    and so does each method's per-defect-type view, in results.json, results.md and
    results.csv; the diagnostics say how many anomalous images got the proposal."""
    def record(value: float, crack: float, count: dict) -> dict:
        return {**dict.fromkeys(metrics.METRIC_NAMES, value),
                "per_defect": {"crack": {"image_auroc": crack, "pixel_auroc": crack / 2,
                                         **count}}}

    classes = {c: {**record(0.9 + k, 0.8 + k, {} if c == "b" else {"count": 4}),
                   "mask_ratio": 0.3,
                   "protoflow_only": record(0.7 + k, 0.6 + k, {}),
                   "patchcore": record(0.5 + k, 0.4 + k, {}),
                   "diagnostics": {"anomalous_with_proposal": 3, "anomalous_images": 4,
                                   "masked_defect_fraction": 0.5,
                                   **({"empty_defect_masks": 1} if c == "a" else
                                      {"empty_defect_masks": 0} if c == "c" else {})}}
               for k, c in ((0.0, "a"), (0.02, "b"), (0.01, "c"))}  # b: an earlier version's
    results = {"classes": classes, "protocol": "clean", "clean_options": None}
    reporting.summarize(results)
    table = reporting.write_results(results, tmp_path, "clean").splitlines()
    assert "| *ProtoFlow map alone (mean)* | 0.710/0.710 | 0.710 | 0.710 | 0.710 | 0.710 " \
           "| 0.710 |  |" in table
    assert "| *PatchCore (mean)* | 0.510/0.510 | 0.510 | 0.510 | 0.510 | 0.510 | 0.510 |  |" \
        in table
    # 3 classes have crack; b's record (an earlier version's) did not count its images
    assert "| crack | 3 / ? | 0.810/0.405 | 0.610/0.305 | 0.410/0.205 |" in table
    assert "| A | 3/4 | 0.50 | 1 |" in table and "| B | 3/4 | 0.50 |  |" in table
    assert "| C | 3/4 | 0.50 | 0 |" in table  # none counted is 0; blank: never counted
    # PMAD's lead over each baseline's mean, 4 decimals; each method per class
    assert "| ProtoFlow map alone | +0.2000 | +0.2000 | +0.2000 |" in table
    assert "| PatchCore | +0.4000 | +0.4000 | +0.4000 |" in table
    assert ("| B | 0.920/0.920/0.920 | 0.720/0.720/0.720 | 0.520/0.520/0.520 |") in table
    with open(tmp_path / "results.csv") as f:
        means = {row["method"]: float(row["image_auroc"]) for row in csv.DictReader(f)
                 if row["class"] == "mean"}
    assert means == pytest.approx({"pmad": 0.91, "protoflow_only": 0.71, "patchcore": 0.51})
    for key, value, crack in (("mean", 0.91, 0.81), ("mean_protoflow_only", 0.71, 0.61),
                              ("mean_patchcore", 0.51, 0.41)):
        assert results[key]["image_auroc"] == pytest.approx(value), key
        method = "pmad" if key == "mean" else key[len("mean_"):]
        assert results["per_defect_mean"][method]["crack"] == pytest.approx(
            {"image_auroc": crack, "pixel_auroc": crack / 2}), method


def test_a_lead_under_a_thousandth_shows_in_the_lead_table():
    """PMAD's pixel AUROC 0.98321 against ProtoFlow's map's 0.98305 both read 0.983 in
    the paper-shaped table; the lead table shows +0.0002, and a loss with its sign."""
    record = _class_record(0.9, ["crack"])
    record.update(pixel_auroc=0.98321, image_auroc=0.9740)
    record["protoflow_only"].update(pixel_auroc=0.98305, image_auroc=0.9796)
    results = {"protocol": "clean", "classes": {"a": record}}
    reporting.summarize(results)
    table = reporting.format_table(results, "clean").splitlines()
    assert "| *ProtoFlow map alone (mean)* | 0.980/0.983 | 0.700 | 0.700 | 0.700 | 0.700 " \
           "| 0.700 |  |" in table and table[5].startswith("| **Mean (PMAD)** | 0.974/0.983 |")
    assert "| ProtoFlow map alone | -0.0056 | +0.0002 | +0.2000 |" in table


def test_results_md_shows_protoflows_calls_at_its_threshold():
    """The operating point predict.py reports (ProtoFlow's call at its stored threshold)
    is evaluated per class: its threshold, the good images it calls anomalous and the
    anomalous ones it finds; a class without a threshold, or a record of an earlier
    version, has no row and is named with why; the paper protocol has no such table."""
    a, b = _class_record(0.9, ["crack"]), _class_record(0.8, ["crack"])
    a.update(called_at=4.0321, calls={"good_called_anomalous": 2, "good_images": 20,
                                      "anomalous_called_anomalous": 15,
                                      "anomalous_images": 20})
    results = {"protocol": "clean", "classes": {"a": a, "b": b}}
    reporting.summarize(results)
    b["calls"] = None  # no threshold for b
    table = reporting.format_table(results, "clean").splitlines()
    assert table[-5:] == ["| Category | threshold | good images called anomalous | "
                          "anomalous images called anomalous |", "|:--|:--:|:--:|:--:|",
                          "| A | 4.0321 | 2/20 | 15/20 |", "",
                          "None for: B (no threshold for it: a released ProtoFlow file, or "
                          "prototypes other than the file's)."]
    del a["calls"], b["calls"]
    assert reporting.format_table(results, "clean").splitlines()[-1] == (
        "None for: A (a record of an earlier version); B (a record of an earlier version).")
    assert "ProtoFlow's calls" not in reporting.format_table(results, "paper")


def test_the_mask_ratio_column_is_explained_as_each_protocol_picks_it():
    """Clean, covering passes: every pass but the last masks the ratio (58/58/58/22 of
    196 at 0.3); clean, unmasked patches at 0: one pass; paper: the ratio of the best
    image AUROC, every other metric at its own. An undefined lead reads nan, not +nan."""
    record = _class_record(0.9, ["crack"])
    record["protoflow_only"]["pixel_aupro"] = math.nan
    results = {"protocol": "clean", "classes": {"a": record},
               "clean_options": {"unmasked": "cover"}}
    reporting.summarize(results)
    table = reporting.format_table(results, "clean")
    assert "Mask ratio: the share of patches masked in each pass but the last, which " \
           "masks the rest (every patch is masked once)." in table
    assert "| ProtoFlow map alone | +0.2000 | +0.2000 | nan |" in table
    # what the columns mean precedes the ratio's legend: AUPRO's 30 % limit, the means
    # unweighted over the classes, the baselines from the same run
    assert ("AUPRO: the area under the per-region-overlap curve up to a 30 % false "
            "positive rate, normalised;") in table
    assert ("Means are unweighted over the classes; the baselines (in italics) come from "
            "the same run. image_scores.csv has each test image's scores, higher as more "
            "anomalous: pmad, protoflow_score (ProtoFlow's own, which its threshold calls) "
            "and each baseline's by its map. Mask ratio: the share") in table
    results["clean_options"]["unmasked"] = "zero"
    assert "Mask ratio: the share of patches masked (one pass; the rest score 0)." in \
        reporting.format_table(results, "clean")
    assert "Mask ratio: the one of the 24 ratios the paper protocol tries that gives the " \
           "best image AUROC, picked with the test labels; each other metric of PMAD's " \
           "rows is at its own best ratio" in reporting.format_table(results, "paper")


def test_names_that_are_not_utf8_are_written_escaped(tmp_path):
    """A class folder or --ckpt path whose name is not UTF-8 (its byte a surrogate) was a
    UnicodeEncodeError after the whole evaluation, with results.md, results.csv and
    image_scores.csv unwritten: each is written, the name escaped."""
    record = {**_class_record(0.9, ["crack"]),
              "images": [{"name": "crack_\udce9", "defect_type": "crack", "pmad": 1.0}]}
    results = {"protocol": "clean", "classes": {"caf\udce9": record},
               "provenance": {"code": None}, "args": {"ckpt": "/data/\udce9.pth"}}
    reporting.summarize(results)
    reporting.write_results(results, tmp_path, "clean")
    md = (tmp_path / "results.md").read_text(encoding="utf-8")
    assert "| Caf\\udce9 |" in md and "Checkpoint /data/\\udce9.pth;" in md
    assert "caf\\udce9,pmad," in (tmp_path / "results.csv").read_text(encoding="utf-8")
    assert "crack_\\udce9" in (tmp_path / "image_scores.csv").read_text(encoding="utf-8")


def test_exit_status_is_non_zero_when_a_class_fails(capsys):
    ok = dict.fromkeys(metrics.METRIC_NAMES, 0.9)
    assert reporting.exit_status({"classes": {"bottle": ok, "cable": ok}}) == 0
    assert capsys.readouterr().err == ""
    nan = {**ok, "pixel_aupro": math.nan}
    assert reporting.exit_status({"classes": {"bottle": ok, "cable": nan}}) == 1
    assert capsys.readouterr().err == "[run_test] failed classes: cable (pixel_aupro undefined)\n"
    assert reporting.exit_status({"classes": {"bottle": ok},
                                 "failed": {"screw": "unreadable images:\n  a.png"}}) == 1
    assert capsys.readouterr().err == (
        "[run_test] failed classes: screw (unreadable images: ...)\n")


def test_a_class_without_defective_or_good_test_images_fails_saying_which(capsys):
    """A custom class of good images only was 'failed classes: stars' with no reason: its
    test set, not the run, is what left the metrics undefined, and the fix is the user's."""
    undefined = dict.fromkeys(metrics.METRIC_NAMES, math.nan)
    only_good = {**undefined, "num_images": 4, "num_anomalous": 0, "ground_truth": False}
    only_defective = {**undefined, "image_ap": 1.0, "image_f1_max": 1.0, "pixel_auroc": 0.9,
                      "pixel_aupro": 0.8, "pixel_ap": 0.5, "pixel_f1_max": 0.5,
                      "num_images": 3, "num_anomalous": 3}
    assert reporting.exit_status({"classes": {"stars": only_good,
                                              "cat": only_defective}}) == 1
    assert capsys.readouterr().err == (
        "[run_test] failed classes: stars (no defective test image, so its metrics are "
        "undefined: add images to test/<defect>/, or score its images with predict.py); cat "
        "(no good test image, so its image AUROC is undefined (and its image AP and F1-max "
        "are 1 whatever the scores): add images to test/good/)\n")


def test_undefined_means_are_said_once_not_again_for_each_baseline():
    """The baselines' metrics are undefined for the same classes as PMAD's: one warning
    per set of classes, not one more from the baselines' means."""
    results = {"classes": {"a": _class_record(0.9, ["crack"]),
                           "b": _class_record(0.8, ["crack"])}, "protocol": "clean"}
    for key in ("image_auroc", "image_ap"):
        results["classes"]["b"][key] = math.nan
        results["classes"]["b"]["protoflow_only"][key] = math.nan
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reporting.summarize(results)
    assert [str(w.message) for w in caught] == [
        "mean image_auroc, image_ap are nan because they are undefined for ['b']"]
    assert math.isnan(results["mean_protoflow_only"]["image_auroc"])


def test_results_say_why_a_class_has_undefined_metrics(tmp_path):
    """A class without good test images showed nan/nan beside image AP and F1-max of
    1.000, and only stderr said why: results.json and results.md say it too."""
    only_defective = {**_class_record(0.9, ["crack"]), "num_images": 3, "num_anomalous": 3}
    for key in (only_defective, only_defective["protoflow_only"],
                only_defective["patchcore"]):
        key["image_auroc"] = math.nan
    results = {"classes": {"a": _class_record(0.8, ["crack"]), "cat": only_defective},
               "protocol": "clean"}
    with pytest.warns(metrics.UndefinedMetricWarning):
        reporting.summarize(results)
    why = ("no good test image, so its image AUROC is undefined (and its image AP and "
           "F1-max are 1 whatever the scores): add images to test/good/")
    reporting.write_results(results, tmp_path, "clean")
    assert strict_json(tmp_path / "results.json")["undefined"] == {"cat": why}
    table = (tmp_path / "results.md").read_text().splitlines()
    assert table[2] == f"Undefined metrics (so are the means of those metrics): cat: {why}"
    results["classes"].pop("cat")
    reporting.summarize(results)
    assert "undefined" not in results
    assert "Undefined" not in reporting.format_table(results, "clean")


def test_exit_status_fails_a_class_that_lacks_a_metric(capsys):
    """A record without some metric (ground truth implied) was not fully evaluated: it
    fails as a nan would, instead of counting as a success."""
    assert reporting.exit_status({"classes": {"a": {"image_auroc": 0.9}}}) == 1
    assert capsys.readouterr().err == (
        "[run_test] failed classes: a (pixel_auroc, pixel_aupro, image_ap, pixel_ap, "
        "image_f1_max, pixel_f1_max undefined)\n")
    image_only = {**dict.fromkeys(METRIC_NAMES, math.nan), "image_auroc": 0.9,
                  "image_ap": 0.8, "image_f1_max": 0.7, "ground_truth": False}
    assert reporting.exit_status({"classes": {"a": image_only}}) == 0


def test_results_csv_gives_the_mask_ratio_to_pmad_only(tmp_path):
    """results.csv: only PMAD masks, so only its class rows carry the mask ratio; a
    baseline's row with PMAD's ratio would read as if that baseline had been masked."""
    results = {"classes": {"a": _class_record(0.9, ["crack"]),
                           "b": _class_record(0.8, ["crack"])}, "protocol": "clean"}
    reporting.summarize(results)
    reporting.write_results(results, tmp_path, "clean")
    with open(tmp_path / "results.csv") as f:
        ratios = [(row["class"], row["method"], row["mask_ratio"]) for row in csv.DictReader(f)]
    assert ratios == [("a", "pmad", "0.3"), ("b", "pmad", "0.3"), ("mean", "pmad", "")] + [
        (c, m, "") for m in ("protoflow_only", "patchcore") for c in ("a", "b", "mean")]


def test_each_method_reports_its_own_numbers_per_class_and_their_mean(tmp_path):
    """Three classes of uneven scores (a median would differ from the mean): the per-defect
    view is the mean over the classes that have the type, results.md's 'Mean (PMAD)' row is
    PMAD's mean (not a baseline's), and results.csv's class rows of each baseline are that
    baseline's own metrics, not PMAD's (a plot from the CSV would show them all equal)."""
    results = {"classes": {c: _class_record(v, ["crack"])
                           for c, v in (("a", 0.9), ("b", 0.6), ("c", 0.8))},
               "protocol": "clean"}
    reporting.summarize(results)
    assert results["per_defect_mean"]["pmad"]["crack"] == pytest.approx(
        {"image_auroc": 2.3 / 3, "pixel_auroc": 2.3 / 3})
    assert results["per_defect_mean"]["patchcore"]["crack"]["image_auroc"] == pytest.approx(
        1.1 / 3)
    table = reporting.write_results(results, tmp_path, "clean").splitlines()
    assert "| **Mean (PMAD)** | 0.767/0.767 | 0.767 | 0.767 | 0.767 | 0.767 | 0.767 |  |" \
        in table
    assert "| crack | 3 / 6 | 0.767/0.767 | 0.567/0.567 | 0.367/0.367 |" in table
    with open(tmp_path / "results.csv") as f:
        rows = {(row["class"], row["method"]): [float(row[k]) for k in METRIC_NAMES]
                for row in csv.DictReader(f)}
    for method, offset in (("pmad", 0.0), ("protoflow_only", 0.2), ("patchcore", 0.4)):
        for c, v in (("a", 0.9), ("b", 0.6), ("c", 0.8), ("mean", 2.3 / 3)):
            assert rows[c, method] == pytest.approx([v - offset] * len(METRIC_NAMES)), (
                c, method)


def test_results_md_lists_defect_types_in_sorted_order(tmp_path):
    """The per-defect-type rows of results.md come sorted by name, whatever the order of
    the classes and of their records (a set's order would change from run to run)."""
    results = {"classes": {"a": _class_record(0.9, DEFECT_TYPES[:5]),
                           "b": _class_record(0.8, DEFECT_TYPES[3:])}, "protocol": "clean"}
    reporting.summarize(results)
    table = reporting.write_results(results, tmp_path, "clean").splitlines()
    start = table.index("| Defect type | classes / defective images | **PMAD** | ProtoFlow "
                        "map alone | PatchCore |") + 2
    rows = table[start:start + len(DEFECT_TYPES)]
    assert [row.split(" | ")[0] for row in rows] == [f"| {t}" for t in sorted(DEFECT_TYPES)]
    assert rows[0] == "| bent | 2 / 4 | 0.850/0.850 | 0.650/0.650 | 0.450/0.450 |"  # a, b
    assert rows[1] == "| crack | 1 / 2 | 0.900/0.900 | 0.700/0.700 | 0.500/0.500 |"  # a
    assert rows[3] == "| fold | 1 / 2 | 0.800/0.800 | 0.600/0.600 | 0.400/0.400 |"  # b


def test_partial_results_survive_a_cut_short_line_and_a_fresh_run_sets_the_last_aside(
        tmp_path, capsys):
    """A run killed while appending leaves half a line: --resume_eval keeps the whole
    records, drops the half one (its class runs again) and rewrites the file, so the
    next record is a line of its own; a broken line before the last is refused. A run
    afresh moves the last evaluation's results.* and heatmaps aside together, so that a
    rerun that finishes no class leaves no table that looks current and loses none."""
    path = tmp_path / "results.partial.jsonl"
    keys = {c: {"prototypes": c} for c in ("a", "b")}
    first = reporting.PartialResults(path, {"protocol": "clean"}, keys, resume=False)
    first.add("a", {"image_auroc": 0.75})
    path.write_text(path.read_text() + '{"class": "b", "key": {"proto')
    resumed = reporting.PartialResults(path, {"protocol": "clean"}, keys, resume=True)
    assert resumed.done == {"a": {"image_auroc": 0.75}}
    assert "its last line was cut short" in capsys.readouterr().err
    resumed.add("b", {"image_auroc": 0.5})
    assert [json.loads(x)["class"] for x in path.read_text().splitlines()] == ["a", "b"]
    path.write_text(path.read_text().replace("\n", "\n\n", 1))  # a blank line is no record
    assert list(reporting.PartialResults(path, {"protocol": "clean"}, keys, True).done) == [
        "a", "b"]
    path.write_text('{"class": "a"\n' + path.read_text())
    with pytest.raises(utils.UserError, match=f"line 1 of {path} is not a record"):
        reporting.PartialResults(path, {"protocol": "clean"}, keys, resume=True)
    assert set(reporting.RESULT_FILES) == {"results.json", "results.md", "results.csv",
                                           "image_scores.csv"}  # each set aside below
    for name in reporting.RESULT_FILES:
        (tmp_path / name).write_text("the last run's")
    (tmp_path / "heatmaps" / "a").mkdir(parents=True)
    (tmp_path / "heatmaps" / "a" / "x.png").write_text("the last run's")
    before = {p.relative_to(tmp_path): p.read_text() for p in tmp_path.rglob("*") if p.is_file()}
    afresh = reporting.PartialResults(path, {"protocol": "clean"}, keys, resume=False)
    (previous,) = tmp_path.iterdir()  # all of it set aside together, nothing deleted
    assert previous.name.startswith("previous-") and afresh.set_aside_to == str(previous)
    assert {p.relative_to(previous): p.read_text() for p in previous.rglob("*")
            if p.is_file()} == before and len(before) == len(reporting.RESULT_FILES) + 2
    assert reporting.PartialResults(path, {"protocol": "clean"}, keys,
                                    resume=False).set_aside_to is None  # nothing to move


def test_resume_eval_reuses_a_record_that_left_out_no_image_under_either_skip_flag(
        tmp_path, capsys):
    """After a bad image, run_test.py says to re-run with --resume_eval or with
    --skip_bad_images; both together were refused (the key differed in skip_bad_images).
    A record that left out no image is the same under either flag and is reused; one
    that left out images (or, of an earlier version, does not say) is evaluated again
    without --skip_bad_images, and said so. Any other difference is still refused."""
    path = tmp_path / "results.partial.jsonl"
    classes = ("plain", "skipped_none", "skipped_one", "old", "old_plain")
    keys = {c: {"prototypes": c} for c in classes}
    written = {"plain": (False, {"skipped_images": []}),
               "skipped_none": (True, {"skipped_images": []}),
               "skipped_one": (True, {"skipped_images": ["cannot read image x.png"]}),
               "old": (True, {}),
               "old_plain": (False, {})}  # an earlier version's, without the flag: all read
    for c, (skip, record) in written.items():
        run = reporting.PartialResults(path, {"skip_bad_images": skip, "seed": 0},
                                       {c: keys[c]}, resume=True)
        run.add(c, {"image_auroc": 0.5, **record})
    with_skip = reporting.PartialResults(path, {"skip_bad_images": True, "seed": 0}, keys,
                                         resume=True)
    assert sorted(with_skip.done) == sorted(classes)
    without = reporting.PartialResults(path, {"skip_bad_images": False, "seed": 0}, keys,
                                       resume=True)
    assert sorted(without.done) == ["old_plain", "plain", "skipped_none"]
    err = capsys.readouterr().err
    for c in ("skipped_one", "old"):
        assert (f"[run_test] {c}: its record in {path} left out bad images "
                "(--skip_bad_images); evaluated again without") in err
    with pytest.raises(utils.FlagError, match=r"\(its record of \w+ differs in seed\)"):
        reporting.PartialResults(path, {"skip_bad_images": False, "seed": 1}, keys, True)
    # another seed is refused even for a record that left out images
    one = {"skipped_one": keys["skipped_one"]}
    with pytest.raises(utils.FlagError,
                       match=r"\(its record of skipped_one differs in seed, skip_bad_images\)"):
        reporting.PartialResults(path, {"skip_bad_images": False, "seed": 1}, one, True)


def test_a_record_of_other_test_images_is_evaluated_again_not_the_resume_refused(
        tmp_path, capsys):
    """A class's test images changed (a bad one replaced), or an earlier version's record
    that does not say which it scored: that class is evaluated again, with a note; the
    other classes' records are reused. Another flag still refuses the resume."""
    path = tmp_path / "results.partial.jsonl"
    old = reporting.PartialResults(path, {"seed": 0}, {"a": {}, "b": {"test_data": "x"}},
                                   resume=True)
    old.add("a", {"image_auroc": 0.5})  # an earlier version's: no test_data
    old.add("b", {"image_auroc": 0.6})
    now = reporting.PartialResults(path, {"seed": 0}, {"a": {"test_data": "y"},
                                                       "b": {"test_data": "x"}}, resume=True)
    assert list(now.done) == ["b"]
    assert capsys.readouterr().err == (
        f"[run_test] a: its record in {path} is of other test images or masks (or of an "
        "earlier version, which did not record them); evaluated again\n")
    with pytest.raises(utils.FlagError, match="its record of a differs in seed, test_data"):
        reporting.PartialResults(path, {"seed": 1}, {"a": {"test_data": "y"}}, resume=True)


def test_a_record_of_an_earlier_record_format_is_evaluated_again(tmp_path, capsys):
    """A record made before its fields changed meaning (clean records' called_anomalous,
    before proposal_masks) is evaluated again with a note, not reused beside new ones nor
    the resume refused as 'another evaluation'; another flag still refuses it."""
    path = tmp_path / "results.partial.jsonl"
    old = reporting.PartialResults(path, {"seed": 0}, {"a": {}, "b": {}}, resume=True)
    old.add("a", {"image_auroc": 0.5})  # before the record format was in the key
    now_key = {"seed": 0, reporting.RECORD_FORMAT: reporting.RECORD_VERSION}
    reporting.PartialResults(path, now_key, {"b": {}}, resume=True).add(
        "b", {"image_auroc": 0.6})
    now = reporting.PartialResults(path, now_key, {"a": {}, "b": {}}, resume=True)
    assert list(now.done) == ["b"]
    assert capsys.readouterr().err == (
        f"[run_test] a: its record in {path} is of an earlier version, with other fields; "
        "evaluated again\n")
    with pytest.raises(utils.FlagError, match="its record of a differs in record_format, seed"):
        reporting.PartialResults(path, {**now_key, "seed": 1}, {"a": {}}, resume=True)


def test_image_scores_csv_has_every_image_and_names_a_class_without_them(tmp_path, capsys):
    """image_scores.csv: one row per image of each class, in the record's order, with the
    record's columns; a class whose record has no 'images' (an earlier version's, reused
    by --resume_eval) is named on stderr instead of being left out silently."""
    images = [{"name": "good_000", "defect_type": "good", "pmad": 0.25, "protoflow_score": 3.0},
              {"name": "crack_001", "defect_type": "crack", "pmad": 0.75,
               "protoflow_score": 5.5}]
    results = {"classes": {"a": {**_class_record(0.9, ["crack"]), "images": images},
                           "b": _class_record(0.8, ["crack"])}, "protocol": "clean"}
    reporting.summarize(results)
    reporting.write_results(results, tmp_path, "clean")
    assert (tmp_path / "image_scores.csv").read_text().splitlines() == [
        "class,name,defect_type,pmad,protoflow_score", "a,good_000,good,0.25,3.0",
        "a,crack_001,crack,0.75,5.5"]
    assert "image_scores.csv lacks b: their records come from an earlier version's run" \
        in capsys.readouterr().err


def test_the_table_of_a_run_that_stopped_says_its_means_are_partial(tmp_path):
    """A run stopped in class 2 of 4: results.md's means are over class 1 only, and the
    table says so before them, naming the failed class and those never reached; a run
    that finished has no such line."""
    results = {"protocol": "clean", "clean_options": None,
               "classes": {"bottle": _class_record(0.9, ["crack"])},
               "failed": {"cable": "RuntimeError: CUDA out of memory"},
               "not_evaluated": ["capsule", "carpet"]}
    reporting.summarize(results)
    table = reporting.write_results(results, tmp_path, "clean").splitlines()
    note = ("**INCOMPLETE**: the means are over the 1 class(es) evaluated only. Failed: cable "
            "(RuntimeError: CUDA out of memory). Not evaluated: capsule, carpet. Re-run with "
            "--resume_eval to finish.")
    assert table[2] == note and table.index(note) < table.index("| Bottle | 0.900/0.900 | "
                                                               "0.900 | 0.900 | 0.900 | 0.900 "
                                                               "| 0.900 | 0.30 |")
    assert (tmp_path / "results.md").read_text().splitlines()[2] == note
    assert strict_json(tmp_path / "results.json")["not_evaluated"] == ["capsule", "carpet"]
    del results["failed"], results["not_evaluated"]
    assert "INCOMPLETE" not in reporting.format_table(results, "clean")
    # the last class's heatmaps failed (its metrics kept): none left unevaluated, the
    # note still stands, and it counts the classes of the means, not the failed ones
    results = {"protocol": "clean", "clean_options": None,
               "classes": {c: _class_record(0.9, ["crack"]) for c in ("a", "b")},
               "failed": {"b": "its heatmaps: OSError: [Errno 28] No space left"},
               "not_evaluated": []}
    reporting.summarize(results)
    assert reporting.format_table(results, "clean").splitlines()[2] == (
        "**INCOMPLETE**: the means are over the 2 class(es) evaluated only. Failed: b (its "
        "heatmaps: OSError: [Errno 28] No space left). Re-run with --resume_eval to finish.")


def test_the_table_names_each_class_as_typed_but_for_its_first_letter():
    """MVTec AD's names read as in the paper ('metal_nut' -> 'Metal nut'); a user's keep
    their own case ('bolt A' was 'Bolt a', 'pcb1' stays 'Pcb1'); two names that would read
    alike ('metal_plate', 'metal plate') stay as typed, so their rows differ; a '|' in a
    name does not end its cell."""
    names = ["metal_nut", "bolt A", "pcb1", "a|b"]
    results = {"protocol": "clean", "classes": {n: _class_record(0.9, ["crack"])
                                                for n in names}}
    reporting.summarize(results)
    first_cells = [line.split(" | ")[0] for line in
                   reporting.format_table(results, "clean").splitlines()[4:8]]
    assert first_cells == ["| Metal nut", "| Bolt A", "| Pcb1", "| A\\|b"]
    assert reporting.display_names(["metal_plate", "metal plate", "x"]) == {
        "metal_plate": "metal_plate", "metal plate": "metal plate", "x": "X"}
    # a '|' in a class or defect-type name ends no cell of any table
    results = {"protocol": "clean", "classes": {"a|b": _class_record(0.9, ["x|y"])}}
    reporting.summarize(results)
    tables = "\n".join(line if line.startswith("|") else "" for line in
                       reporting.format_table(results, "clean").splitlines()).split("\n\n")
    tables = [t.splitlines() for t in tables if t.strip()]
    assert len(tables) == 5 and any("x\\|y" in row for row in tables[3])
    for table in tables:  # as many cells in every row as in the header
        assert {len(re.findall(r"(?<!\\)\|", row)) for row in table} == {
            len(re.findall(r"(?<!\\)\|", table[0]))}, table


def test_results_md_diagnostics_rows_by_class(tmp_path):
    """results.md's mask diagnostics, one row per class: anomalous images given the
    proposal mask of all anomalous ones, the fraction of defect pixels masked (not its
    complement), the count of anomalous images with no defect pixel (blank for a record
    of an earlier version, which has none)."""
    a, b = _class_record(0.9, ["crack"]), _class_record(0.8, ["crack"])
    a["diagnostics"] = {"anomalous_with_proposal": 3, "anomalous_images": 7,
                        "masked_defect_fraction": 0.25, "empty_defect_masks": 1}
    b["diagnostics"] = {"anomalous_with_proposal": 0, "anomalous_images": 4,
                        "masked_defect_fraction": 0.875}
    results = {"classes": {"a": a, "b": b}, "protocol": "clean"}
    reporting.summarize(results)
    table = reporting.write_results(results, tmp_path, "clean").splitlines()
    head = table.index("| Category | anomalous images given the proposal mask | defect "
                       "pixels masked | anomalous images with no defect pixel |")
    assert table[head + 2:head + 4] == ["| A | 3/7 | 0.25 | 1 |", "| B | 0/4 | 0.88 |  |"]
    # the records hold no ProtoFlow calls (an earlier version's): named, not left out
    assert table[-1] == "None for: A (a record of an earlier version); B (a record of an " \
                        "earlier version)."
