"""The offline demo, fast: scripts/demo.sh on 2 classes with few images and epochs must
still detect the planted defects far above chance."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from backbones import lite0_weights_path
from conftest import arg, python_stub, run_command, stub_calls

ROOT = Path(__file__).resolve().parents[1]


def test_demo_script_detects_defects(tmp_path: Path, bench: None) -> None:
    """The demo's recipe end to end on a small main world (the held-out world runs the
    same function of demo.sh with its own arguments: the stubbed tests below check
    them, tests/test_demo_data.py its images)."""
    env = {**_knob_free_env(), "DEMO_DIR": str(tmp_path / "demo"),
           "DATA_DIR": str(tmp_path / "data"), "PYTHON": sys.executable,  # not PATH's
           "DEMO_CLASSES": "brick coins", "DEMO_TRAIN": "10", "DEMO_TEST_GOOD": "6",
           "DEMO_TEST_DEFECT": "8", "PF_EPOCHS": "1", "VIT_EPOCHS": "2", "DEVICE": "cpu",
           "KMEANS_VOCAB": "32"}
    run = run_command(["bash", "scripts/demo.sh"], cwd=ROOT, env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "| Brick |" in run.stdout and "] done" in run.stdout
    assert "### main world" in run.stdout and "heldout" not in run.stdout
    for name in ("brick", "coins"):  # ProtoFlow on the shipped ImageNet Lite0
        meta = json.loads((tmp_path / "demo" / "main" / "prototypes" / name
                           / "coreset.json").read_text())
        assert meta["encoder_weights"] == os.path.abspath(lite0_weights_path())
    results = json.loads((tmp_path / "demo" / "main" / "results" / "results.json").read_text())
    assert results["protocol"] == "clean" and list(results["classes"]) == ["brick", "coins"]
    for record in results["classes"].values():
        assert record["num_images"] == 14 and record["num_anomalous"] == 8
        assert record["diagnostics"]["anomalous_with_proposal"] == 8
    assert results["mean"]["image_auroc"] >= 0.8
    assert results["mean"]["pixel_auroc"] >= 0.8
    for baseline in ("protoflow_only", "patchcore", "ce_only"):
        assert results[f"mean_{baseline}"]["pixel_auroc"] >= 0.5, baseline
    heatmaps = list((tmp_path / "demo" / "main" / "results" / "heatmaps" / "coins").glob("*.png"))
    coins = results["classes"]["coins"]  # --save_heatmaps 2: 2 most + 2 least anomalous per type
    per_type = [m["count"] for m in coins["per_defect"].values()] + [
        coins["num_images"] - coins["num_anomalous"]]
    assert len(heatmaps) == sum(min(4, n) for n in per_type)
    import compare_worlds  # heldout_check.sh's table reads a world's folder
    record = compare_worlds.world_record(*compare_worlds.load_results(
        str(tmp_path / "demo" / "main")))
    assert record["pmad"]["pixel_aupro"] == results["mean"]["pixel_aupro"]
    assert record["patchcore"]["image_auroc"] == results["mean_patchcore"]["image_auroc"]
    for baseline, gap in record["image_auroc_gap"].items():  # from the per-image scores
        assert gap["gap"] == pytest.approx(results["mean"]["image_auroc"]
                                           - results[f"mean_{baseline}"]["image_auroc"])
        assert gap["low"] <= gap["gap"] + 1e-9 and gap["gap"] <= gap["high"] + 1e-9


def _knob_free_env() -> dict[str, str]:
    """The environment without demo.sh's knobs, so a user's exported DEMO_SEED or
    VIT_MODEL cannot change what a test runs."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("DEMO_", "HELDOUT_", "VIT_", "PF_", "KMEANS_"))
            and k not in ("AMP", "DEVICE")}


def _stubbed_demo(tmp_path: Path, **knobs: str
                  ) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
    """scripts/demo.sh with its Python entry points stubbed: the finished run and the
    argument lists each entry point got, in order (run_test.py's stub writes the
    results.md the script prints)."""
    stub, log = python_stub(tmp_path, on_script="""if [[ "$1" == run_test.py ]]; then
            while [[ $# -gt 0 && "$1" != --output_dir ]]; do shift; done
            mkdir -p "$2" && echo "| stub of $2 |" > "$2/results.md"
        fi""")
    env = _knob_free_env() | {"PYTHON": str(stub), "DEMO_DIR": str(tmp_path / "demo"),
                              "DATA_DIR": str(tmp_path / "data"), "DEVICE": "cpu", **knobs}
    run = run_command(["bash", "scripts/demo.sh"], cwd=ROOT, env=env)
    return run, stub_calls(log)


def _stubbed_demo_calls(tmp_path: Path, **knobs: str) -> list[list[str]]:
    run, calls = _stubbed_demo(tmp_path, **knobs)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return calls


def test_demo_summary_repeats_only_the_tables_scrolled_away(tmp_path: Path) -> None:
    """The closing summary printed every world's results.md, the last one's just after
    run_test.py had printed the same table: now the worlds before the last only."""
    run, _ = _stubbed_demo(tmp_path, DEMO_HELDOUT="1")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summary = run.stdout.rpartition("] done\n")[2]
    demo = tmp_path / "demo"
    assert summary.count("| stub of ") == 1 and f"| stub of {demo}/main/results |" in summary
    assert (f"### heldout world ({demo}/heldout/results/results.md; heatmaps in "
            f"{demo}/heldout/results/heatmaps/<class>/)\n(its table: the last one above, as "
            "its evaluation printed it)") in summary
    (tmp_path / "one").mkdir()
    run, _ = _stubbed_demo(tmp_path / "one")
    assert "| stub of " not in run.stdout.rpartition("] done\n")[2]


def test_demo_script_knobs_reach_the_entry_points(tmp_path: Path) -> None:
    """DEMO_SEED and DEMO_DEFECT_AREA (README's tuning draws) reach the main world's
    setup_train_dataset.py, each value its own argument, and name the draw's folders; the
    held-out world never gets them. VIT_MODEL reaches training and evaluation, VIT_INIT
    and KMEANS_OUT_INDEX training (random weights and stride-4 codes without them). This
    checks the script's wiring; the fast demo test above checks the recipe."""
    init = tmp_path / "my beit.pth"
    init.write_bytes(b"")
    calls = _stubbed_demo_calls(tmp_path, DEMO_HELDOUT="1", DEMO_SEED="1",
                                DEMO_DEFECT_AREA="0.001 0.01",
                                VIT_MODEL="vit_base_patch16_224_8k_vocab",
                                VIT_INIT=str(init), KMEANS_OUT_INDEX="2")
    setups = [c for c in calls if c[0] == "setup_train_dataset.py"]
    assert len(setups) == 2
    main, held = setups
    draw = "main_seed1_area0.001-0.01"
    assert arg(main, "--make_demo") == [str(tmp_path / "data" / f"demo_{draw}_mvtec")]
    assert arg(main, "--demo_world") == ["main"] and arg(main, "--seed") == ["1"]
    assert arg(main, "--demo_defect_area", 2) == ["0.001", "0.01"]
    assert arg(held, "--demo_world") == ["heldout"]
    assert "--seed" not in held and "--demo_defect_area" not in held
    vits = [c for c in calls if c[0] in ("run_pretraining.py", "run_test.py")]
    assert [c[0] for c in vits] == ["run_pretraining.py", "run_test.py"] * 2
    assert {arg(c, "--model")[0] for c in vits} == {"vit_base_patch16_224_8k_vocab"}
    for train in vits[::2]:  # BEiT's weights, not random ones
        assert arg(train, "--init_ckpt") == [str(init)] and "--no_init" not in train
        assert arg(train, "--kmeans_out_index") == ["2"]  # stride-8 codes
    assert arg(vits[1], "--output_dir") == [str(tmp_path / "demo" / draw / "results")]
    assert {arg(c, "--encoder_weights")[0] for c in calls if c[0] == "run_protoflow.py"} == {
        "/stub/lite0.pth"}
    # unset: the main world itself, seed 0, the world's defect sizes, the tiny ViT
    calls = _stubbed_demo_calls(tmp_path)
    main = calls[0]
    assert arg(main, "--make_demo") == [str(tmp_path / "data" / "demo_main_mvtec")]
    assert arg(main, "--seed") == ["0"] and "--demo_defect_area" not in main
    assert "heldout" not in str(calls)
    assert {arg(c, "--model")[0] for c in calls if c[0] == "run_test.py"} == {
        "vit_tiny_patch16_224_8k_vocab"}
    train = next(c for c in calls if c[0] == "run_pretraining.py")
    assert "--no_init" in train and "--init_ckpt" not in train
    assert arg(train, "--kmeans_out_index") == ["1"]  # stride-4 codes
    # a malformed size pair stops the script before it writes or deletes anything
    for bad in ("0.001", "0.001 0.01 0.1"):
        run, calls = _stubbed_demo(tmp_path, DEMO_DEFECT_AREA=bad)
        assert run.returncode == 2 and calls == []
        assert run.stderr.startswith(f"error: DEMO_DEFECT_AREA='{bad}': give two fractions "
                                     "of the image, SMALLEST LARGEST")
    # so does a VIT_INIT that names no file (training found it after three steps' work)
    run, calls = _stubbed_demo(tmp_path, VIT_INIT=str(tmp_path / "missing.pth"))
    assert run.returncode == 2 and calls == []
    assert run.stderr.startswith(f"error: VIT_INIT='{tmp_path / 'missing.pth'}': no such file; "
                                 "download BEiT's weights into weights/")


def test_demo_script_checks_device_before_any_step(tmp_path: Path) -> None:
    """DEVICE=cuda where torch sees no GPU stops demo.sh before it writes anything, naming
    DEVICE; training found it only after the data, prototypes and ProtoFlow were made, and
    named --device. The real interpreter runs here, with every GPU hidden."""
    env = _knob_free_env() | {"DEMO_DIR": str(tmp_path / "demo"), "DEVICE": "cuda",
                              "PYTHON": sys.executable,
                              "DATA_DIR": str(tmp_path / "data"), "CUDA_VISIBLE_DEVICES": ""}
    run = run_command(["bash", "scripts/demo.sh"], cwd=ROOT, env=env)
    assert run.returncode == 2, run.stdout[-3000:] + run.stderr[-3000:]
    assert run.stderr.splitlines()[-1] == ("error: DEVICE cuda was asked for but torch sees "
                                           "no CUDA GPU: set DEVICE=cpu, or install a CUDA "
                                           "build of torch")
    assert list(tmp_path.iterdir()) == []
    run = run_command(["bash", "scripts/demo.sh"], cwd=ROOT, env=env | {"DEVICE": "gpu"})
    assert run.returncode == 2
    assert run.stderr.splitlines()[-1] == ("error: DEVICE 'gpu' is not a device: pass cpu, "
                                           "cuda or cuda:<index>")
    assert list(tmp_path.iterdir()) == []


def test_demo_amp_knob_reaches_training_and_evaluation(tmp_path: Path) -> None:
    """AMP (bf16 where bench_model.py shows it faster on a CPU without AMX, whose default
    is fp32) reaches run_pretraining.py and run_test.py; unset,
    neither gets --amp (their own default); a value the device cannot run stops the
    script before any step, naming AMP (the real interpreter, as for DEVICE)."""
    calls = _stubbed_demo_calls(tmp_path, AMP="bf16")
    vits = [c for c in calls if c[0] in ("run_pretraining.py", "run_test.py")]
    assert len(vits) == 2 and all(arg(c, "--amp") == ["bf16"] for c in vits)
    assert all("--amp" not in c for c in _stubbed_demo_calls(tmp_path))
    env = _knob_free_env() | {"DEMO_DIR": str(tmp_path / "d"), "DATA_DIR": str(tmp_path / "x"),
                              "PYTHON": sys.executable, "DEVICE": "cpu"}
    for amp, said in (("fp16", "fp16 needs a CUDA device"), ("fp8", "choose one of")):
        run = run_command(["bash", "scripts/demo.sh"], cwd=ROOT, env=env | {"AMP": amp})
        assert run.returncode == 2 and said in run.stderr.splitlines()[-1]
        assert run.stderr.splitlines()[-1].startswith("error: AMP: ")
    assert not (tmp_path / "d").exists() and not (tmp_path / "x").exists()


def test_heldout_check_runs_both_tuning_draws_then_the_heldout_world(tmp_path: Path) -> None:
    """scripts/heldout_check.sh: the main world's draws of seeds 0 and 1 with defects of
    0.1-1 %, the held-out world once, then one compare_worlds.py table of the three
    folders; its own seed, sizes and held-out switch win over a user's, the recipe's
    knobs pass through."""
    stub, log = python_stub(tmp_path, on_script="""if [[ "$1" == run_test.py ]]; then
            while [[ $# -gt 0 && "$1" != --output_dir ]]; do shift; done
            mkdir -p "$2" && echo "| stub |" > "$2/results.md"
        fi""")
    demo = tmp_path / "demo"
    env = _knob_free_env() | {"PYTHON": str(stub), "DEMO_DIR": str(demo),
                              "DATA_DIR": str(tmp_path / "data"), "DEVICE": "cpu",
                              "DEMO_SEED": "7", "DEMO_DEFECT_AREA": "0.05 0.1",
                              "DEMO_HELDOUT": "0", "VIT_EPOCHS": "4"}
    run = run_command(["bash", "scripts/heldout_check.sh"], cwd=ROOT, env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    calls = stub_calls(log)
    setups = [c for c in calls if c[0] == "setup_train_dataset.py"]
    assert [(arg(c, "--demo_world")[0], "--seed" in c and arg(c, "--seed")[0]) for c in setups] == [
        ("main", "0"), ("main", "1"), ("heldout", False)]
    for main in setups[:2]:
        assert arg(main, "--demo_defect_area", 2) == ["0.001", "0.01"]
    assert {arg(c, "--epochs")[0] for c in calls if c[0] == "run_pretraining.py"} == {"4"}
    worlds = [str(Path(arg(c, "--output_dir")[0]).parent) for c in calls
              if c[0] == "run_test.py"]  # the folders demo.sh evaluated
    assert worlds == [str(demo / w) for w in
                      ("main_seed0_area0.001-0.01", "main_seed1_area0.001-0.01", "heldout")]
    compare = calls[-1]
    assert compare[0] == "bench/compare_worlds.py"
    assert compare[1:] == ["--output", str(demo / "heldout_check.json"),
                           f"tuning_seed0={worlds[0]}", f"tuning_seed1={worlds[1]}",
                           f"heldout={worlds[2]}"]


def test_requirements_are_installed_when_one_is_missing_or_out_of_range(tmp_path: Path) -> None:
    """scripts/ensure_requirements.sh checked only that each package was there: numpy 1.x
    under 'numpy>=99' passed and nothing was installed. Now a version outside its range is
    installed too (into $PYTHON, here a stub that logs pip's call), and only the lines
    that need it. opencv-python-headless is met by another OpenCV build in range (here a
    fake opencv-python 100.0 on PYTHONPATH, then a contrib one), however the line spells
    its name: installing the headless one beside it made two packages own cv2. A
    pre-release in range (NVIDIA's containers' torch 2.x.0a0) meets its line."""
    stub = tmp_path / "python"
    stub.write_text(f'#!/bin/sh\nif [ "$1" = -m ]; then echo "$@" >> {tmp_path}/pip.log; '
                    f'exit 0; fi\nexec {sys.executable} "$@"\n')
    stub.chmod(0o755)
    fake = tmp_path / "site"
    (fake / "opencv_python-100.0.dist-info").mkdir(parents=True)
    (fake / "opencv_python-100.0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: opencv-python\nVersion: 100.0\n")
    # a pre-release build (as NVIDIA's containers' torch 2.x.0a0) is in its range too
    (fake / "prerelease_pkg-100.0rc1.dist-info").mkdir()
    (fake / "prerelease_pkg-100.0rc1.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: prerelease-pkg\nVersion: 100.0rc1\n")
    cases = {"numpy>=1.0  # comment\n\ntqdm\n": None,
             "numpy>=99\ntqdm\n": "numpy>=99",
             "tqdm\nno-such-package-here>=1 \n": "no-such-package-here>=1",
             "opencv-python-headless>=99\n": None,
             "OpenCV-Python-Headless>=99\n": None,  # names are case-insensitive
             "prerelease-pkg>=1\n": None,
             "prerelease-pkg>=101\n": "prerelease-pkg>=101",
             "opencv-python-headless>=101\nnumpy>=99\n": "opencv-python-headless>=101 numpy>=99"}
    for requirements, installed in cases.items():
        (tmp_path / "requirements.txt").write_text(requirements)
        (tmp_path / "pip.log").unlink(missing_ok=True)
        run = subprocess.run(["bash", "-c",
                              f"set -euo pipefail; source {ROOT}/scripts/ensure_requirements.sh"],
                             cwd=tmp_path, env={**os.environ, "PYTHON": str(stub),
                                                "PYTHONPATH": str(fake)},
                             capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stderr
        logged = (tmp_path / "pip.log").read_text() if installed else None
        assert logged == (f"-m pip install -q {installed}\n" if installed else None), (
            requirements)
        assert (tmp_path / "pip.log").exists() == bool(installed)
    # the contrib build alone meets it too
    contrib = tmp_path / "site_contrib" / "opencv_contrib_python-100.0.dist-info"
    contrib.mkdir(parents=True)
    (contrib / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: opencv-contrib-python\nVersion: 100.0\n")
    # and so does the pre-release where packaging is missing (pip's own copy, whose
    # specifiers leave pre-releases out unless told)
    (tmp_path / "no_packaging" / "packaging").mkdir(parents=True)
    (tmp_path / "no_packaging" / "packaging" / "__init__.py").write_text("raise ImportError\n")
    for requirement, path in (("opencv-python-headless>=99", contrib.parent),
                              ("prerelease-pkg>=1", f"{tmp_path / 'no_packaging'}:{fake}")):
        (tmp_path / "requirements.txt").write_text(requirement + "\n")
        (tmp_path / "pip.log").unlink(missing_ok=True)
        run = subprocess.run(["bash", "-c", f"set -euo pipefail; source "
                              f"{ROOT}/scripts/ensure_requirements.sh"],
                             cwd=tmp_path, env={**os.environ, "PYTHON": str(stub),
                                                "PYTHONPATH": str(path)},
                             capture_output=True, text=True, timeout=60)
        assert run.returncode == 0 and not (tmp_path / "pip.log").exists(), run.stderr
    # a check that cannot run stops: installing every line would bring the headless
    # OpenCV beside another one again
    (tmp_path / "requirements.txt").write_text("numpy>=>1\n")
    (tmp_path / "pip.log").unlink(missing_ok=True)
    run = subprocess.run(["bash", "-c", f"set -euo pipefail; source "
                          f"{ROOT}/scripts/ensure_requirements.sh; echo went on"],
                         cwd=tmp_path, env={**os.environ, "PYTHON": str(stub)},
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 1 and "went on" not in run.stdout
    assert "could not check requirements.txt" in run.stderr
    assert not (tmp_path / "pip.log").exists()
