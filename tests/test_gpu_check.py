"""bench/gpu_check.sh: its CPU parts run (the dry run), its figures' formulas hold."""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "bench"))
import gpu_check  # noqa: E402


def test_dry_run_passes_every_check():
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run"], cwd=REPO,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "2"})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(("PASS", "FAIL"))]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert [ln.split()[0] for ln in lines] == ["PASS"] * len(gpu_check.CHECKS)
    assert [ln.split()[1] for ln in lines] == list(gpu_check.CHECKS)


def test_a_pass_line_of_a_check_that_then_fails_is_no_pass(tmp_path):
    """A check that printed its PASS line and then crashed (exit 139) or outlived its
    limit is reported as FAIL with its exit code; a check's own FAIL line is kept."""
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\n"
                    'if [ "$2" = run_test ]; then echo "FAIL run_test: maps differ"; exit 1; fi\n'
                    'echo "PASS $2 12 img/s"; echo "Segmentation fault" >&2; exit 139\n')
    fake.chmod(0o755)
    proc = subprocess.run(["bash", "bench/gpu_check.sh"], cwd=REPO, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PY": str(fake)})
    assert proc.returncode == 1
    lines = proc.stdout.splitlines()
    assert lines[0] == ("FAIL train_bf16: exit 139 after: PASS train_bf16 12 img/s: "
                        "Segmentation fault ")
    assert "FAIL run_test: maps differ" in lines
    assert not any(line.startswith("PASS") for line in lines)
    # the script runs every check of gpu_check.py, in its order
    assert [line.split()[1].rstrip(":") for line in lines] == list(gpu_check.CHECKS)


def test_no_gpu_is_said_once_and_stops_the_script(tmp_path):
    """Without CUDA every check would print the same FAIL line (8 lines, 40 s of imports
    on a 2-core machine): the script prints it once and exits 1."""
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\n"
                    'echo "FAIL no CUDA device (use --dry-run on a CPU machine)"; exit 1\n')
    fake.chmod(0o755)
    proc = subprocess.run(["bash", "bench/gpu_check.sh"], cwd=REPO, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PY": str(fake)})
    assert proc.returncode == 1
    assert proc.stdout == "FAIL no CUDA device (use --dry-run on a CPU machine)\n"


def test_vit_b_flops_and_peak_table():
    # ViT-B/16 at 224 px: 17.56 G multiply-adds in the encoder (the usual "17.6 GFLOPs")
    assert gpu_check.vit_forward_flops(**gpu_check.VIT_B) / 2 == pytest.approx(17.56e9,
                                                                               rel=2e-3)
    assert gpu_check.peak_tflops("NVIDIA H200", None) == 989.0
    assert gpu_check.peak_tflops("NVIDIA H100 PCIe", None) == 756.0
    assert gpu_check.peak_tflops("NVIDIA A100-SXM4-80GB", None) == 312.0
    assert gpu_check.peak_tflops("Some New GPU", None) is None
    assert gpu_check.peak_tflops("Some New GPU", 500.0) == 500.0


@pytest.mark.parametrize("value", ["-5", "0", "nan"])
def test_a_peak_that_is_no_positive_number_is_refused(monkeypatch, capsys, value):
    """--peak_tflops -5 was taken, and the MFU printed negative."""
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "all", "--peak_tflops", value])
    with pytest.raises(SystemExit) as e:
        gpu_check.main()
    assert e.value.code == 2
    assert "argument --peak_tflops" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU answer")
def test_a_check_without_a_gpu_fails_in_one_line(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "attention_grads"])
    assert gpu_check.main() == 1
    assert capsys.readouterr().out == "FAIL no CUDA device (use --dry-run on a CPU machine)\n"


def test_metric_diff_treats_undefined_metrics_as_a_pair():
    """results.json writes an undefined metric as null: null on both devices agrees, null
    on one only is the largest difference (a nan used to slip past max())."""
    diff = gpu_check._metric_diff
    assert diff(0.75, 0.7495) == pytest.approx(5e-4)
    assert diff(None, None) == 0.0
    assert diff(None, 0.5) == math.inf and diff(0.5, None) == math.inf


def test_a_failing_check_makes_main_exit_1(monkeypatch, capsys):
    """A check that raises prints 'FAIL <check>' and main() returns 1: gpu_check.sh's exit
    status is what CI and the GPU runner read, so a FAIL line must not exit 0."""
    def broken(args, device):
        raise RuntimeError("gradients differ")
    monkeypatch.setattr(gpu_check, "check_attention_grads", broken)
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "attention_grads", "--dry-run"])
    assert gpu_check.main() == 1
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith("FAIL attention_grads (")
    assert lines[0].endswith("RuntimeError: gradients differ")


def test_a_passing_check_makes_main_exit_0(monkeypatch, capsys):
    """The counterpart: a check that returns prints 'PASS <check> ...: <its line>' and
    main() returns 0."""
    monkeypatch.setattr(gpu_check, "check_attention_grads", lambda args, device: "fine")
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "attention_grads", "--dry-run"])
    assert gpu_check.main() == 0
    out = capsys.readouterr().out
    assert out.startswith("PASS attention_grads (") and out.endswith("s): fine\n")


def _results(**changes: float) -> dict:
    """A results.json 'classes' record of two classes; `changes` shifts metrics:
    'coins__pixel_ap' the main one, 'coins__pf__image_ap' its protoflow_only one."""
    names = gpu_check.metrics.METRIC_NAMES
    out = {c: {**{k: 0.5 for k in names}, "protoflow_only": {k: 0.25 for k in names}}
           for c in ("brick", "coins")}
    for where, delta in changes.items():
        parts = where.split("__")
        record = out[parts[0]]["protoflow_only"] if len(parts) == 3 else out[parts[0]]
        record[parts[-1]] += delta
    return out


def test_compare_results_tolerance_1e3():
    """check_run_test's CPU-vs-GPU comparison (it only runs on a GPU): a metric 2e-3 apart
    (or 1.2e-3) apart fails, 5e-4 apart passes, equal results pass with a zero difference."""
    assert gpu_check.compare_results(_results(), _results()) == (0.0, [])
    worst, bad = gpu_check.compare_results(_results(), _results(coins__pixel_ap=5e-4))
    assert worst == pytest.approx(5e-4) and bad == []
    worst, bad = gpu_check.compare_results(_results(), _results(coins__pixel_ap=2e-3))
    assert worst == pytest.approx(2e-3)
    assert bad == ["coins/pixel_ap: 0.5 vs 0.502"]
    _, bad = gpu_check.compare_results(_results(), _results(brick__image_f1_max=-1.2e-3))
    assert bad == ["brick/image_f1_max: 0.5 vs 0.4988"]


def test_compare_results_checks_protoflow_only_and_nulls():
    """The protoflow_only metrics are compared too (a difference only there fails), and a
    metric undefined (null) on one device only is a mismatch."""
    worst, bad = gpu_check.compare_results(_results(), _results(coins__pf__image_ap=2e-3))
    assert worst == pytest.approx(2e-3) and bad == ["coins/protoflow_only/image_ap: 0.25 vs 0.252"]
    dev = _results()
    dev["brick"]["image_auroc"] = None
    worst, bad = gpu_check.compare_results(_results(), dev)
    assert worst == math.inf and bad == ["brick/image_auroc: 0.5 vs None"]


def test_mfu_counts_training_as_three_forwards():
    """MFU of ViT-B training: 3 x the forward's 35.126 GFLOP per image (the backward costs
    twice the forward), so 1000 img/s on a 1000 TFLOP/s GPU is 10.5 %, not 7.0 %."""
    assert gpu_check.train_flops_per_image() == 3 * 35_126_120_448
    assert gpu_check.mfu_text(1000.0, 1000.0) == "10.5%"
    assert gpu_check.mfu_text(1000.0, None) == "n/a"


def test_train_bf16_line_gives_no_mfu_for_the_dry_run(monkeypatch):
    """check_train_bf16's line (training stubbed at 100 img/s): the MFU of ViT-B's
    FLOPs at the given peak on the real run, n/a on the dry run (a 2-block tiny ViT on
    the CPU, whose rate says nothing of ViT-B's) even with --peak_tflops; a non-finite
    loss fails the check."""
    import argparse
    runs = []

    def fake_train(model, batch_size, steps, amp, device, dry_run=False):
        runs.append((model, batch_size, steps, amp, dry_run))
        return 100.0, {"loss": 1.0}

    monkeypatch.setattr(gpu_check, "train", fake_train)
    cpu = torch.device("cpu")
    args = argparse.Namespace(dry_run=True, peak_tflops=500.0)
    assert gpu_check.check_train_bf16(args, cpu) == (
        "ViT-B none on cpu, peak 500 TFLOP/s, 3 x 35.1 GFLOP/img: batch 2: 100 img/s, MFU n/a")
    assert runs == [("vit_tiny_patch16_224_8k_vocab", 2, 2, "none", True)]
    args.dry_run = False
    assert gpu_check.check_train_bf16(args, cpu).endswith(
        ": batch 32: 100 img/s, MFU 2.1%; batch 128: 100 img/s, MFU 2.1%")
    monkeypatch.setattr(gpu_check, "train", lambda *a, **k: (1.0, {"loss": math.nan}))
    with pytest.raises(RuntimeError, match="non-finite loss nan at batch 32"):
        gpu_check.check_train_bf16(args, cpu)
