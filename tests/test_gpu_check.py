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


def test_vit_b_flops_and_peak_table():
    # ViT-B/16 at 224 px: 17.56 G multiply-adds in the encoder (the usual "17.6 GFLOPs")
    assert gpu_check.vit_forward_flops(**gpu_check.VIT_B) / 2 == pytest.approx(17.56e9,
                                                                               rel=2e-3)
    assert gpu_check.peak_tflops("NVIDIA H200", None) == 989.0
    assert gpu_check.peak_tflops("NVIDIA H100 PCIe", None) == 756.0
    assert gpu_check.peak_tflops("NVIDIA A100-SXM4-80GB", None) == 312.0
    assert gpu_check.peak_tflops("Some New GPU", None) is None
    assert gpu_check.peak_tflops("Some New GPU", 500.0) == 500.0


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
