"""What the bench scripts share: the line that says what a run measured on (the machine,
its versions and how busy it was, so a figure can be told from one of another machine or
of a loaded one), and timing by medians of interleaved calls, so that a drift of the
machine hits the code and its baseline alike."""
from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Any, Callable

import timm
import torch


def cpu_model() -> str:
    """The CPU's marketing name (/proc/cpuinfo), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line() -> str:
    """Date, versions, CPU, threads, load and the GPU where there is one."""
    gpu = (f", GPU {torch.cuda.get_device_name()}, CUDA {torch.version.cuda}"
           if torch.cuda.is_available() else ", no GPU")
    load = (f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg")
            else "")
    return (f"{time.strftime('%Y-%m-%d')}, torch {torch.__version__}, timm {timm.__version__}, "
            f"CPU {cpu_model()} ({os.cpu_count()} cores, {torch.get_num_threads()} torch "
            f"threads, {torch.backends.cpu.get_cpu_capability()}{load}){gpu}")


def sync(device: torch.device) -> None:
    """Wait for the device, so that a clock read after it includes its queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """(seconds, result) of one call, the device's queued work included."""
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def median_seconds(fns: dict[Any, Callable[[], None]], reps: int, warmup: int,
                   device: torch.device, clock: Callable[[], float] | None = None
                   ) -> dict[Any, float]:
    """Median seconds per call of each function after `warmup` calls of each; the calls
    of a round are timed in turn, in alternating order from one round to the next."""
    clock = clock or time.perf_counter
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[Any, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for rep in range(reps):
        for name in names if rep % 2 == 0 else names[::-1]:
            sync(device)
            start = clock()
            fns[name]()
            sync(device)
            times[name].append(clock() - start)
    return {name: statistics.median(t) for name, t in times.items()}
