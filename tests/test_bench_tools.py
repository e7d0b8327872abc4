"""The non-timing logic of bench/bench_*.py: table rows, argument rules, rate arithmetic,
baselines, masks and ratio lists. Nothing here times anything: clocks are faked."""
from __future__ import annotations

import importlib
import json
import sys
import time
from types import ModuleType, SimpleNamespace

import numpy as np
import pytest
import torch


@pytest.fixture
def load(bench):
    """Import a bench script by name (bench/ is on the path through conftest's fixture)."""
    def _load(name: str) -> ModuleType:
        return importlib.import_module(name)
    return _load


# ----- bench_model -----------------------------------------------------------------------

def _model_row(**changes) -> dict:
    row = dict(device="cpu", precision="fp32", batch=8, step="train",
               seconds={"original": 2.0, "ours": 0.5}, layer_share=0.8)
    return {**row, **changes}


def test_bench_model_row_columns_and_ratios(load):
    """A row's columns follow the header's order and widths: img/s = batch / seconds,
    speed-up = original / ours (not its inverse), bound = 1 / layer share."""
    bm = load("bench_model")
    assert bm.format_header(False).split() == [
        "device", "prec", "batch", "step", "original", "img/s", "ours", "img/s", "speed-up",
        "layer", "share", "bound"]
    row = bm.format_row(_model_row())
    assert row.split() == ["cpu", "fp32", "8", "train", "4.00", "16.00", "4.00x", "80%",
                           "1.25x"]
    assert len(row) == len(bm.format_header(False))


def test_bench_model_row_with_compiled_column(load):
    """With --compile the compiled model's img/s and speed-up sit between ours and the
    layer share, in the header's order."""
    bm = load("bench_model")
    assert bm.format_header(True).split()[8:13] == ["speed-up", "compiled", "img/s",
                                                    "speed-up", "layer"]
    row = bm.format_row(_model_row(seconds={"original": 2.0, "ours": 0.5, "compiled": 0.25}))
    assert row.split()[4:] == ["4.00", "16.00", "4.00x", "32.00", "8.00x", "80%", "1.25x"]
    assert len(row) == len(bm.format_header(True))


@pytest.mark.parametrize("share", [0.0, float("nan")])
def test_bench_model_bound_without_layer_ops(load, share):
    """No profiled op matching LAYER_OPS (torch renamed them) gives a share of 0 (or nan
    with no events): the bound reads 'n/a' instead of a ZeroDivisionError that would end
    the run after all its timings."""
    bm = load("bench_model")
    row = bm.format_row(_model_row(layer_share=share))
    assert row.split()[-1] == "n/a"
    assert len(row) == len(bm.format_header(False))


def test_bench_model_bf16_summary_is_fp32_time_over_bf16_time(load):
    """The closing bf16 line is our model's fp32 seconds over its bf16 seconds per CPU
    step (> 1: bf16 faster), from the rows of this run; none without both precisions."""
    bm = load("bench_model")
    rows = [_model_row(precision=p, step=s, seconds={"original": 9.0, "ours": t})
            for p, s, t in (("fp32", "forward", 0.8), ("bf16", "forward", 0.5),
                            ("fp32", "train", 2.0), ("bf16", "train", 4.0))]
    rows.append(_model_row(device="cuda", precision="bf16", step="forward",
                           seconds={"original": 1.0, "ours": 0.01}))
    line = bm.bf16_summary(rows)
    assert "forward 1.60x" in line and "train 0.50x" in line
    assert bm.bf16_summary(rows[::2]) is None  # fp32 rows only (--precisions fp32)


@pytest.fixture
def model_main(load, monkeypatch):
    """bench_model.main() with a fake thread count (starting at 4), no benchmark run
    (bench_device records its device and clock) and CUDA's presence set by the test."""
    bm = load("bench_model")
    threads = {"n": 4}
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", lambda n: threads.update(n=n))
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads["n"])

    def bench_device(model, device, precisions, batches, reps, warmup, compile_, clock):
        calls.append((device.type, clock))
        return iter(())
    monkeypatch.setattr(bm, "bench_device", bench_device)
    monkeypatch.setattr(bm, "machine_line", lambda: "a machine")  # no GPU to name here

    def run(*argv: str, cuda: bool = False) -> list:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(sys, "argv", ["bench_model.py", *argv])
        bm.main()
        return calls
    return run


@pytest.mark.parametrize("argv, cuda", [
    (["--clock", "cpu", "--devices", "cpu"], False),                    # 4 threads
    (["--clock", "cpu", "--threads", "2", "--devices", "cpu"], False),
    (["--clock", "cpu", "--threads", "1", "--devices", "cpu", "cuda"], True),
    (["--clock", "cpu", "--threads", "1"], True),                       # cuda by default
])
def test_bench_model_refuses_cpu_clock_unless_one_thread_cpu_only(model_main, capsys,
                                                                   argv, cuda):
    """--clock cpu is this process's CPU time: it measures one CPU thread only, so more
    threads or a CUDA run (whose time is the GPU's) is refused before any benchmark."""
    with pytest.raises(SystemExit) as exc:
        model_main(*argv, cuda=cuda)
    assert exc.value.code == 2
    assert "--clock cpu measures one CPU thread" in capsys.readouterr().err


@pytest.mark.parametrize("argv, cuda, clock", [
    (["--clock", "cpu", "--threads", "1", "--devices", "cpu"], True, time.process_time),
    (["--clock", "cpu", "--threads", "1"], False, time.process_time),  # cuda skipped
    (["--threads", "2", "--devices", "cpu"], False, time.perf_counter),
])
def test_bench_model_clock_choice(model_main, argv, cuda, clock):
    """Allowed combinations run the CPU benchmark with the chosen clock: CPU time with
    one thread on the CPU only (also when CUDA is asked for but absent), else wall time."""
    assert model_main(*argv, cuda=cuda) == [("cpu", clock)]


@pytest.mark.parametrize("argv", [["--reps", "0"], ["--cpu-batch", "0"], ["--threads", "0"],
                                  ["--model", "nope"], ["--warmup", "-1"],
                                  ["--cuda-batches", "4", "0"]])
def test_bench_model_refuses_bad_arguments_before_building(model_main, capsys, argv):
    """--reps 0 ended in statistics' 'no median for empty data' after the models were
    built and checked, an unknown --model in timm's traceback: now an argparse error,
    exit 2, before any benchmark (--threads 0 was silently torch's default)."""
    with pytest.raises(SystemExit) as exc:
        model_main(*argv, "--devices", "cpu")
    assert exc.value.code == 2
    assert argv[0] in capsys.readouterr().err


# ----- bench_train -----------------------------------------------------------------------

def test_bench_train_window_rate_counts_the_whole_window(load):
    """images/s over the batches after the first `skip`, by the window's whole time. Three
    workers that finish together serve steps of 0, 0 and 3 s: 6 batches of 6 in 6 s is 6
    img/s, where a median step (0 s) would claim no wait at all. The skipped 10 s of
    warm-up do not count; without the skip they would."""
    bt = load("bench_train")
    bursts = [0.0, 0.0, 0.0, 3.0, 3.0, 3.0, 6.0]
    assert bt.window_rate(bursts, 0, 6) == pytest.approx(6.0)
    assert bt.window_rate([0.0, 10.0, 11.0, 13.0], 1, 4) == pytest.approx(8 / 3)
    assert bt.window_rate([0.0, 10.0, 11.0, 13.0], 0, 4) == pytest.approx(12 / 13)
    with pytest.raises(ValueError, match="no batch to time"):
        bt.window_rate([0.0, 1.0], 1, 4)


def test_bench_train_rates_skip_prefetched_batches(load, monkeypatch):
    """loader_rate times only what follows the warm-up and the batches the workers had
    ready (`Source.ready`): 3 prefetched batches come at once, the rest every 2 s, so the
    steady state is batch / 2 s whatever was ready; it asks for exactly skip + steps
    batches."""
    bt = load("bench_train")
    now = [0.0]
    monkeypatch.setattr(bt, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    asked = []

    def make(n):
        asked.append(n)
        for i in range(n):
            if i >= 3:  # beyond the prefetch: the workers' pace
                now[0] += 2.0
            yield {"image": torch.zeros(1)}

    rate = bt.loader_rate(bt.Source(make, 3), 4, 5, 1, torch.device("cpu"))
    assert asked == [1 + 3 + 5]
    assert rate == pytest.approx(4 / 2.0)
    # without the skip the prefetched batches would inflate it: 9 batches in 12 s
    assert bt.window_rate([0.0] * 4 + [2.0 * k for k in range(1, 7)], 0, 4) == \
        pytest.approx(4 * 9 / 12)


def test_bench_train_step_rate_skips_prefetched_batches(load, monkeypatch):
    """step_rate trains warm-up + ready + steps batches and times the last `steps`, up to
    the end of the last step: 2 prefetched batches come at once, the others take 3 s to
    load, each step 1 s, so the steady state is batch / 4 s."""
    bt = load("bench_train")
    now = [0.0]
    monkeypatch.setattr(bt, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    trained = []

    def train_one_epoch(model, loader, *args, **kwargs):
        it = iter(loader)
        for _ in range(args[-1].num_steps):
            next(it)
            now[0] += 1.0  # the step
            trained.append(now[0])

    def make(n):
        for i in range(n):
            if i >= 2:
                now[0] += 3.0  # loading
            yield {}

    monkeypatch.setattr(bt, "timm", SimpleNamespace(
        create_model=lambda *a, **k: SimpleNamespace(to=lambda device: None)))
    monkeypatch.setattr(bt, "utils", SimpleNamespace(build_optimizer=lambda *a, **k: None,
                                                     make_grad_scaler=lambda *a: None))
    monkeypatch.setattr(bt, "make_policy", lambda device: None)
    monkeypatch.setattr(bt, "engine", SimpleNamespace(
        train_one_epoch=train_one_epoch,
        TrainConfig=lambda lr, wd, num_steps, **k: SimpleNamespace(num_steps=num_steps)))
    rate = bt.step_rate("m", bt.Source(make, 2), None, "none", 8, 4, 1, torch.device("cpu"))
    assert len(trained) == 1 + 2 + 4
    assert rate == pytest.approx(8 / 4.0)


def test_bench_train_timed_stamps_every_request(load, monkeypatch):
    """timed() stamps each request for a batch, the last (unanswered) one included: n
    batches give n + 1 stamps, each taken after the consumer's previous step, so that
    consecutive stamps span one whole step."""
    bt = load("bench_train")
    now = [0.0]
    monkeypatch.setattr(bt, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    stamps: list[float] = []
    seen = []
    for batch in bt.timed(["a", "b", "c"], stamps):
        seen.append(batch)
        now[0] += 2.5  # the step
    assert seen == ["a", "b", "c"]
    assert stamps == [0.0, 2.5, 5.0, 7.5]


class _FakeCache:
    """An ImageCache of `batches` batches per epoch; a batch is (epoch, index). Its
    tenth epoch fails the test: a loop that never yields would hang it."""

    def __init__(self, batches: int = 2) -> None:
        self.batches, self.epoch, self.epochs_set = batches, None, []

    def __len__(self) -> int:
        return self.batches

    def set_epoch(self, epoch: int) -> None:
        assert epoch < 10, "epochs_of loops over an empty cache"
        self.epoch = epoch
        self.epochs_set.append(epoch)

    def __iter__(self):
        return iter([(self.epoch, i) for i in range(self.batches)])


def test_bench_train_epochs_of(load):
    """epochs_of() serves exactly `num_batches` batches, moving the cache to the next epoch
    (its shuffle) whenever one runs out, and refuses an empty cache (it would loop
    forever)."""
    bt = load("bench_train")
    cache = _FakeCache()
    assert list(bt.epochs_of(cache, 5)) == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0)]
    assert cache.epochs_set == [0, 1, 2]
    assert list(bt.epochs_of(_FakeCache(), 0)) == []
    with pytest.raises(ValueError, match="smaller than one batch"):
        next(bt.epochs_of(_FakeCache(0), 3))


def test_bench_train_baseline_is_fp32_no_cache_per_model(load, monkeypatch, tmp_path,
                                                         capsys):
    """Each row's ratio is to the first row of its model: fp32 ('none') without cache,
    per device, batch and model (a model's ratios must not use another's baseline); the
    tokenizer runs in the step only without the token cache; a loader slower than 1.2 x
    the step is flagged; without --steps the CPU's rows time 5 steps."""
    bt = load("bench_train")
    rates = {("tiny", "none"): (10, 20, 40), ("tiny", "bf16"): (15, 25, 50),
             ("base", "none"): (2, 4, 8), ("base", "bf16"): (3, 5, 6)}
    paths = ("no cache", "cache", "cache+ram")
    tokenizer = SimpleNamespace(image_size=224)
    given_tokenizer = {}
    given_steps = set()

    def step_rate(model, make, tok, amp, batch, steps, warmup, device):
        key = "tiny" if model == bt.MODELS["tiny"] else "base"
        given_tokenizer[key, amp, make] = tok
        given_steps.add(steps)
        return float(rates[key, amp][paths.index(make)])

    monkeypatch.setattr(bt, "make_data", lambda *a: None)
    monkeypatch.setattr(bt, "make_tokenizer_file", lambda folder: folder)
    monkeypatch.setattr(bt, "create_tokenizer", lambda *a, **k: tokenizer)
    monkeypatch.setattr(bt, "make_policy", lambda device: SimpleNamespace(frequency=None))
    monkeypatch.setattr(bt, "datasets", SimpleNamespace(
        PretrainDataset=lambda *a, **k: [0] * 8, cache_tokens=lambda *a, **k: None))
    monkeypatch.setattr(bt, "sources", lambda *a: {p: p for p in paths})
    monkeypatch.setattr(bt, "loader_rate", lambda make, *a: {"no cache": 100.0,
                                                             "cache": 22.0,
                                                             "cache+ram": 5.0}[make])
    monkeypatch.setattr(bt, "step_rate", step_rate)
    out = tmp_path / "rows.json"
    monkeypatch.setattr(sys, "argv", ["bench_train.py", "--devices", "cpu", "--models", "tiny",
                                      "base", "--json", str(out)])
    bt.main()
    rows = json.loads(out.read_text())
    assert [(r["model"], r["amp"], r["data"], r["ratio"]) for r in rows] == [
        ("tiny", "none", "no cache", 1.0), ("tiny", "none", "cache", 2.0),
        ("tiny", "none", "cache+ram", 4.0), ("tiny", "bf16", "no cache", 1.5),
        ("tiny", "bf16", "cache", 2.5), ("tiny", "bf16", "cache+ram", 5.0),
        ("base", "none", "no cache", 1.0), ("base", "none", "cache", 2.0),
        ("base", "none", "cache+ram", 4.0), ("base", "bf16", "no cache", 1.5),
        ("base", "bf16", "cache", 2.5), ("base", "bf16", "cache+ram", 3.0)]
    assert [r["loader_img_s"] for r in rows[:3]] == [100.0, 22.0, 5.0]
    assert given_steps == {5}  # the CPU's default without --steps
    assert {k: v is tokenizer for k, v in given_tokenizer.items()} == {
        (m, a, p): p == "no cache" for m in ("tiny", "base") for a in ("none", "bf16")
        for p in paths}
    printed = capsys.readouterr().out.splitlines()
    # what was measured comes first: versions, the CPU, threads, the GPU or its absence
    assert f"torch {torch.__version__}" in printed[0] and "CPU " in printed[0]
    assert "torch threads" in printed[0] and "GPU" in printed[0]
    assert "5 (cpu) / 30 (cuda) timed steps" in printed[1]
    lines = [ln for ln in printed if " step " in ln]
    # loader < 1.2 x step: 22 < 1.2 x 20 and 25, not 4 and 5; 5 < 1.2 x 6 and up
    assert ["LOADER-BOUND" in ln for ln in lines] == [False, True, True] * 2 + [
        False, False, True] * 2
    assert "x 2.00 vs DataLoader + token cache" in lines[2]  # 40 / 20


# ----- bench_masking ---------------------------------------------------------------------

def _box(rows: slice, cols: slice) -> np.ndarray:
    """A rectangular foreground region on the 14 x 14 grid, flat (196,)."""
    region = np.zeros((14, 14), bool)
    region[rows, cols] = True
    return region.ravel()


@pytest.mark.parametrize("block", [True, False])
@pytest.mark.parametrize("weighted", [True, False])
def test_bench_masking_baseline_stays_in_a_large_region(load, block, weighted):
    """The baseline follows mg.generate's rules: with a foreground region of at least m
    patches, exactly m patches are masked, all inside the region (else the speed-up would
    compare different work)."""
    bmk = load("bench_masking")
    region = _box(slice(3, 11), slice(4, 12))  # 8 x 8 = 64 patches >= m = 58
    for seed in range(5):
        rng = np.random.default_rng(seed)
        weights = rng.random(196) if weighted else None
        mask = bmk.baseline_mask(58, (14, 14), region, weights, block, rng)
        assert mask.shape == (196,) and mask.dtype == bool
        assert mask.sum() == 58
        assert not (mask & ~region).any()


@pytest.mark.parametrize("block", [True, False])
def test_bench_masking_baseline_covers_a_small_region(load, block):
    """A region smaller than m is masked whole and the rest of the m patches come from
    outside it."""
    bmk = load("bench_masking")
    region = _box(slice(6, 9), slice(6, 10))  # 3 x 4 = 12 patches < m = 58
    for seed in range(5):
        rng = np.random.default_rng(seed)
        mask = bmk.baseline_mask(58, (14, 14), region, rng.random(196), block, rng)
        assert mask.sum() == 58 and mask[region].all()


@pytest.mark.parametrize("seconds", ["0", "-1", "nan"])
def test_bench_masking_refuses_a_non_positive_time(load, monkeypatch, capsys, seconds):
    """--seconds 0 timed no call and divided by a zero count (a ZeroDivisionError after
    the header): it is refused by argparse, exit 2, before any timing."""
    bmk = load("bench_masking")
    monkeypatch.setattr(sys, "argv", ["bench_masking.py", "--seconds", seconds])
    with pytest.raises(SystemExit) as exc:
        bmk.main()
    assert exc.value.code == 2
    assert "--seconds" in capsys.readouterr().err


# ----- bench_protoflow -------------------------------------------------------------------

def test_bench_protoflow_ratios_are_the_papers(load):
    """The proposal sweep times the paper protocol's 24 mask ratios, 0.02 ... 0.48."""
    bpf = load("bench_protoflow")
    import protocols
    assert tuple(bpf.RATIOS) == protocols.PAPER_RATIOS
    assert len(bpf.RATIOS) == 24 and bpf.RATIOS[0] == 0.02 and bpf.RATIOS[-1] == 0.48


@pytest.mark.parametrize("argv, message", [
    (["--features", "0"], "--features"),          # was a ValueError of greedy_coreset
    (["--images", "0"], "--images"),              # was an IndexError in the flow
    (["--coreset_ratio", "2"], "--coreset_ratio"),
    (["--projection_dims", "0"], "--projection_dims"),
    (["--backbone", "nope"], "--backbone nope"),  # was timm's RuntimeError
    (["--device", "cuda"], "torch sees no CUDA GPU"),     # was torch's 'Found no NVIDIA driver'
])
def test_bench_protoflow_refuses_bad_arguments(load, monkeypatch, capsys, argv, message):
    """A bad argument ends the script with one argparse error line, exit 2, before any
    timing, instead of a traceback from inside the benchmark."""
    bpf = load("bench_protoflow")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(bpf, "bench_coreset", lambda *a: pytest.fail("timed"))
    monkeypatch.setattr(bpf, "bench_proposals", lambda *a: pytest.fail("timed"))
    with pytest.raises(SystemExit) as exc:
        bpf.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


# ----- bench_eval ------------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--device", "cuda"], "torch sees no CUDA GPU"), (["--model", "nope"], "--model nope"),
    (["--encoder", "nope"], "--encoder nope")])
def test_bench_eval_refuses_bad_arguments(load, monkeypatch, capsys, argv, message):
    """A bad model, encoder or an absent CUDA device is one argparse error, exit 2,
    before the models are built (was a traceback from timm or torch)."""
    be = load("bench_eval")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(be, "build", lambda *a: pytest.fail("built"))
    monkeypatch.setattr(sys, "argv", ["bench_eval.py", *argv])
    with pytest.raises(SystemExit) as exc:
        be.main()
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_bench_eval_median_times_per_row_and_side(load, monkeypatch):
    """median_times() calls every row's (ours, baseline) pair once per round, in turn
    and in alternating order, and reports each side's median seconds (a fake clock: each
    call advances it by a scripted time)."""
    be = load("bench_eval")
    from bench import timing
    now = [0.0]
    monkeypatch.setattr(timing, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    script = {"a0": iter([1.0, 9.0, 2.0]), "a1": iter([5.0, 4.0, 6.0]),
              "b0": iter([0.5, 0.5, 0.7]), "b1": iter([3.0, 1.0, 2.0])}
    order = []

    def fn(key: str):
        def call() -> None:
            order.append(key)
            now[0] += next(script[key])
        return call
    rows = {"a": (fn("a0"), fn("a1")), "b": (fn("b0"), fn("b1"))}
    times = be.median_times(rows, 3, torch.device("cpu"))
    assert times == {"a": (2.0, 5.0), "b": (0.5, 2.0)}
    assert order == ["a0", "a1", "b0", "b1", "b1", "b0", "a1", "a0", "a0", "a1", "b0", "b1"]


# ----- timing (shared by the bench scripts) ----------------------------------------------

def test_timing_median_seconds_warms_up_each_function_first():
    """Warm-up calls are not timed: each function's first `warmup` calls take 100 s on
    the fake clock and no median shows them."""
    from bench import timing
    now, calls = [0.0], {"x": 0, "y": 0}

    def fn(key: str, seconds: float):
        def call() -> None:
            calls[key] += 1
            now[0] += 100.0 if calls[key] <= 2 else seconds
        return call
    medians = timing.median_seconds({"x": fn("x", 1.0), "y": fn("y", 3.0)}, 5, 2,
                                    torch.device("cpu"), clock=lambda: now[0])
    assert medians == {"x": 1.0, "y": 3.0} and calls == {"x": 7, "y": 7}


def test_timing_machine_line_names_cpu_threads_load_and_versions(monkeypatch):
    """The first line of every bench script: a figure of a loaded machine must say so."""
    from bench import timing
    monkeypatch.setattr(timing.os, "getloadavg", lambda: (3.25, 1.0, 0.5))
    monkeypatch.setattr(timing, "cpu_model", lambda: "Test CPU 9000")
    line = timing.machine_line()
    assert f"torch {torch.__version__}" in line and "CPU Test CPU 9000" in line
    assert f"{torch.get_num_threads()} torch threads" in line
    assert "load average 3.2" in line  # 3.25 rounds half to even
    assert line.endswith("no GPU") or "GPU " in line


@pytest.mark.parametrize("script, first_work", [
    ("bench_eval", "build("), ("bench_masking", "masks_per_second("),
    ("bench_model", "bench_device("), ("bench_protoflow", "bench_coreset("),
    ("bench_train", "make_data(")])
def test_every_bench_script_prints_the_machine_line_first(load, script, first_work):
    """Each script's main() prints timing.machine_line() before any figure, and reads it
    before its first work: read after the run, the load average was the run's own."""
    import inspect
    source = inspect.getsource(load(script).main)
    assert source[source.index("print("):].startswith("print(machine_line()")
    assert source.index("machine_line()") < source.index(first_work)
