"""Plumbing shared by the commands: user errors and the argparse types of their flags,
atomic file writes, torchrun/DDP set-up, seeding, autocast, schedules, optimiser
parameter groups, atomic checkpoints with exact resume, metric and log writers.

Everything here takes plain arguments; the five entry points (run_pretraining.py,
run_test.py, run_protoflow.py, predict.py, setup_train_dataset.py) parse the command
line with these types.
"""
from __future__ import annotations

import argparse
import math
import contextlib
import datetime
import errno
import gc
import glob
import hashlib
import json
import os
import pickle
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
import uuid
import warnings
import zipfile
from collections import defaultdict, deque
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+|last)\.pth$")
NO_WEIGHT_DECAY = ("cls_token", "pos_embed")
# the temporary files and folders tmp_name names: .<name>.tmp-<writer's host>-<its pid> (a
# pid of at most 7 digits, as Linux and macOS give); older versions wrote no host
TMP_PATTERN = re.compile(r"^\..+\.tmp-(?:([A-Za-z0-9-]{1,40})-)?(\d{1,7})$")
# another machine's temporary file or folder untouched this long is a dead writer's (a
# restarted container gets a new host name), whose process this machine cannot ask about
OTHER_HOST_STALE_S = 24 * 3600
PROJECT_DIR = os.path.dirname(os.path.realpath(__file__))  # the repo root
# where our own modules and entry points lie (not a virtual environment inside the repo)
OWN_CODE_DIRS = (PROJECT_DIR, os.path.join(PROJECT_DIR, "bench"))


# ----------------------------------------------------------------------------- user errors
class UserError(Exception):
    """A user's mistake (a flag, a path, an input file): `cli` prints it as
    `error: <message>` and exits 2, without a traceback. The message names the flag or
    file and the fix."""


class LayoutError(UserError, FileNotFoundError):
    """A dataset folder is not laid out as expected (missing folders, no images)."""


class BadFileError(UserError, RuntimeError):
    """An image or mask file is missing, unreadable or inconsistent with its image."""


class MissingFileError(BadFileError, FileNotFoundError):
    """A file named by a flag (weights, checkpoint) does not exist."""


class FlagError(UserError, ValueError):
    """A flag's value is out of range or contradicts another flag."""


class CheckpointError(UserError, ValueError):
    """A checkpoint or weights file is unreadable, refused or of another model or run."""


class DiskFullError(UserError, OSError):
    """The disk filled up while writing; what was there before is intact."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, `timeout`, a cluster job's preemption or time limit, torchrun
    passing one on), raised where Ctrl-C raises KeyboardInterrupt: what a run keeps and
    says on Ctrl-C (the finished classes, how to continue) it keeps and says on it."""


def interruption(e: KeyboardInterrupt) -> str:
    """How a run was stopped, for its last line and results.json."""
    return "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted (Ctrl-C)"


def _ignore_signal(signum: int, frame: Any) -> None:
    """A Python handler that does nothing. Not SIG_DFL: a signal already received but not
    yet handled by Python then finds no Python handler, and CPython prints 'Signal N
    ignored due to race condition' with a traceback."""


def _terminate(signum: int, frame: Any) -> None:
    # a SIGTERM to the process group (`timeout`, a job's cancellation) kills the DataLoader
    # workers too; torch's SIGCHLD handler would then raise 'DataLoader worker ... killed
    # by signal' while the loader shuts down, a traceback under the line that says why
    if hasattr(signal, "SIGCHLD"):
        signal.signal(signal.SIGCHLD, _ignore_signal)
    raise Terminated


# how gloo says that the process at the other end of a collective is gone
PEER_GONE = ("Connection closed by peer", "Connection reset by peer")


def _peer_gone(e: BaseException) -> bool:
    """A collective failed because another process of the job stopped (its own error is
    what to read: this one's traceback, 40 lines per rank, buried it)."""
    return (isinstance(e, RuntimeError) and os.environ.get("WORLD_SIZE", "1") != "1"
            and any(words in str(e) for words in PEER_GONE))


def cli(main: Callable[[], Any], user_errors: tuple[type[BaseException], ...] = (),
        failures: tuple[type[BaseException], ...] = ()) -> int:
    """Run an entry point's `main` and return its exit status: `main`'s int result (0
    for anything else); 2 for a UserError (or one of `user_errors`) or a full disk,
    printed as one `error: <message>` line with no traceback; 1 for one of `failures`
    (a run that failed on its own, e.g. a non-finite loss: no flag was wrong, and its
    message says what was kept), printed so too, and for a collective whose peer process
    stopped (one line saying so, under torchrun); 130 for Ctrl-C, 143 for SIGTERM (see
    Terminated). Any other exception keeps its traceback."""
    python_format = warnings.formatwarning
    warnings.formatwarning = _warning_format(python_format)
    on_main_thread = threading.current_thread() is threading.main_thread()
    sigterm = signal.signal(signal.SIGTERM, _terminate) if on_main_thread else None
    try:
        result = main()
    except KeyboardInterrupt as e:
        _say(f"{_rank_prefix()}{interruption(e)}")
        return 143 if isinstance(e, Terminated) else 130
    except (UserError, *user_errors) as e:
        _say(f"{_rank_prefix()}error: {_user_message(e)}")
        return 2
    except failures as e:
        _say(f"{_rank_prefix()}error: {_user_message(e)}")
        return 1
    except RuntimeError as e:
        if not _peer_gone(e):
            raise
        _say(f"{_rank_prefix()}stopped: another process of this job stopped first (its "
             f"error, above or in its node's log, says why): {str(e).strip().splitlines()[0]}")
        return 1
    except OSError as e:
        if e.errno not in DISK_FULL_ERRNOS:
            raise
        _say(f"{_rank_prefix()}error: {disk_full_message(e)}")
        return 2
    finally:
        warnings.formatwarning = python_format
        if on_main_thread:
            signal.signal(signal.SIGTERM, sigterm)
    return result if isinstance(result, int) else 0


def _say(line: str) -> None:
    """`line` on stderr in one write: print's separate write of the newline lets the
    ranks' lines run together on one terminal. The progress bars an error or Ctrl-C left
    drawn are closed first, so the line starts a line of its own, not the bar's."""
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _rank_prefix() -> str:
    """'[rank N] ' when several processes print to one terminal, else ''."""
    several = os.environ.get("WORLD_SIZE", "1") != "1"
    return f"[rank {os.environ.get('RANK', 0)}] " if several else ""


def _warning_format(python_format: Callable[..., str]) -> Callable[..., str]:
    """Our own warnings (of a category defined in our code: a bad file left out, a metric
    undefined) as one `warning: <message>` line, as errors print: Python's file:line and
    the source line that warned tell a user nothing. A library's warning keeps Python's
    format and its location, even where its stacklevel names our file."""
    def format_warning(message: Warning | str, category: type[Warning], filename: str,
                       lineno: int, line: str | None = None) -> str:
        if _own_code(getattr(sys.modules.get(category.__module__), "__file__", None)):
            return f"{_rank_prefix()}warning: {message}\n"
        return python_format(message, category, filename, lineno, line)
    return format_warning


def _own_code(filename: str | None) -> bool:
    """Whether `filename` is one of our modules (not a library, nor one in a virtual
    environment inside the repo)."""
    return bool(filename) and os.path.isabs(filename) \
        and os.path.dirname(os.path.realpath(filename)) in OWN_CODE_DIRS


def _user_message(e: BaseException) -> str:
    """`e`'s message. torch re-raises an error from a DataLoader worker as "Caught X in
    DataLoader worker process N.", the worker's traceback, then the original
    "module.X: message"; of that, only the original message is for the user."""
    text = str(e)
    if not re.match(r"Caught \w+ in .*\.\nOriginal Traceback", text):
        return text
    kind = type(e)
    name = (kind.__qualname__ if kind.__module__ in ("__main__", "builtins")
            else f"{kind.__module__}.{kind.__qualname__}")  # as traceback writes it
    _, found, message = text.rpartition(f"\n{name}: ")
    return message.rstrip("\n") if found else text


# ----------------------------------------------------------------------------- flag checks
def int_at_least(low: int, zero_note: str = "") -> Callable[[str], int]:
    """argparse type: an integer >= low (`zero_note` says what 0 would mean)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            note = f" ({zero_note})" if value == 0 and zero_note else ""
            raise argparse.ArgumentTypeError(f"{value} is less than {low}{note}")
        return value
    return parse


def _float_in(text: str, low: float, high: float, problem: str) -> float:
    """`text` as a number strictly inside (low, high) (nan never is), else `problem`."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not low < value < high:
        raise argparse.ArgumentTypeError(f"{text} {problem}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    return _float_in(text, 0.0, math.inf, "is not a positive number")


def float_at_least(low: float) -> Callable[[str], float]:
    """argparse type: a finite number >= low."""
    return lambda text: _float_in(text, math.nextafter(low, -math.inf), math.inf,
                                  f"is not a finite number >= {low:g}")


def fraction_arg(include_one: bool = False) -> Callable[[str], float]:
    """argparse type: a fraction in (0, 1), or in (0, 1] with `include_one`."""
    high = math.nextafter(1.0, 2.0) if include_one else 1.0
    where = "(0, 1]" if include_one else "(0, 1)"
    return lambda text: _float_in(text, 0.0, high, f"is outside {where}")


def probability_arg(text: str) -> float:
    """argparse type: a number in [0, 1) (a drop probability, an Adam beta, a held-out
    fraction)."""
    return _float_in(text, math.nextafter(0.0, -1.0), 1.0, "is outside [0, 1)")


def mask_ratio_arg(text: str) -> float:
    """argparse type of a mask ratio: a fraction of the patches, strictly inside (0, 1)."""
    return _float_in(text, 0.0, 1.0, "is outside (0, 1): a mask ratio is the fraction of "
                     "patches masked, e.g. 0.3 (the paper's Table 6 ratios lie between "
                     "0.04 and 0.48)")


class UniqueNames(argparse.Action):
    """argparse action of a list of class names, each kept once in the order given:
    `--classes a a` would otherwise evaluate a class twice, or train on its images
    twice."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        setattr(namespace, self.dest, list(dict.fromkeys(values)))


def refuse_a_file(path: str | os.PathLike, flag: str) -> None:
    """A folder flag naming an existing file is refused up front, before the work whose
    output would go there; a missing folder is made when first written."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise FlagError(f"{flag} {os.fspath(path)} is a file, not a folder: pass a folder "
                        "(it is created if missing)")


def prepare_output_dir(path: str | os.PathLike, flag: str) -> str:
    """Create the output folder `path` (given as `flag`) and prove it writable, before
    any work whose results would go there."""
    path = os.fspath(path)
    refuse_a_file(path, flag)
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write-test-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise FlagError(f"{flag} {path} cannot be written ({e.strerror or e}): pass a "
                        "folder you can write to") from None
    return path


# ----------------------------------------------------------------------------- files
def write_atomic(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Fill `path` whole or not at all: `write(tmp)` writes the temporary file
    `tmp_name(path)` in the same folder, which then replaces `path` (os.replace). On
    failure the temporary file is removed and `path` keeps its old content; a writer
    killed mid-write leaves one that `remove_stale_tmp_files` recognises. A full disk
    (whose write errors name no file) raises its OSError with `path` as the file."""
    path = os.fspath(path)
    tmp = tmp_name(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        if e.errno not in DISK_FULL_ERRNOS or e.filename not in (None, tmp):
            raise
        raise OSError(e.errno, e.strerror, path) from None
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)


def tmp_name(path: str) -> str:
    """The temporary file `write_atomic` fills before the rename: .<name>.tmp-<host>-<pid>
    in the folder of `path` (hidden, named by the writer's machine and process for the
    cleaner, so that on a folder shared between machines it removes only its own)."""
    folder, name = os.path.split(path)
    return os.path.join(folder, f".{name}.tmp-{_host_label()}-{os.getpid()}")


def _host_label() -> str:
    """This machine's name as tmp_name writes it: letters, digits and '-', at most 40."""
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40] or "host"


def read_json_object(path: str | os.PathLike, fix: str,
                     error: type[UserError] = BadFileError) -> dict:
    """The JSON object (a dict) in `path`. A file that cannot be read, is not JSON or
    holds another JSON value raises `error` naming the file and `fix`, not a traceback."""
    try:
        with open(path) as f:
            obj = json.load(f)
    except (OSError, ValueError) as e:
        raise error(f"{path} is not a readable JSON file ({e}): {fix}") from e
    if not isinstance(obj, dict):
        raise error(f"{path} holds a JSON {type(obj).__name__}, not an object: {fix}")
    return obj


# the key, in a ViT checkpoint's training arguments, a ProtoFlow file and a class's
# coreset.json, that lists the content sha256s (sorted) of the images the model learned:
# run_test.py names a test image among them (a set re-split after training); the
# released files have none
TRAIN_IMAGE_HASHES = "train_image_hashes"


def file_sha256(path: str | os.PathLike) -> str:
    """A file's SHA-256 hex digest, read in 4 MiB chunks (any size, little memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def remove_stale_tmp_files(folder: str | os.PathLike) -> list[str]:
    """Remove the temporary files and folders (`tmp_name`: `.<name>.tmp-<host>-<pid>`)
    that writers killed mid-write left in `folder`: this machine's whose pid is no process
    here, and another machine's (a folder shared over NFS, a restarted container) once
    nothing in them changed for OTHER_HOST_STALE_S, as their writer may be alive. Returns
    their paths."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        return []
    removed = []
    for name in sorted(os.listdir(folder)):
        match = TMP_PATTERN.search(name)
        path = os.path.join(folder, name)
        if match is None:
            continue
        host, pid = match.group(1), match.group(2)
        if host in (None, _host_label()):
            if _alive(int(pid)):
                continue
            writer = f"process {pid} that ended mid-write"
        else:
            idle = time.time() - _last_change(path)
            if idle < OTHER_HOST_STALE_S:
                continue
            writer = f"process {pid} of {host}, untouched for {idle / 3600:.0f} h"
        if os.path.isdir(path) and not os.path.islink(path):  # e.g. predict.py's staging
            size = sum(os.lstat(os.path.join(d, f)).st_size
                       for d, _, files in os.walk(path) for f in files)
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.isfile(path):
            size = os.path.getsize(path)
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
        else:
            continue
        removed.append(path)
        print(f"[cleanup] removed {path} ({size / 2 ** 20:.1f} MiB), left by {writer}",
              flush=True)
    return removed


def _last_change(path: str) -> float:
    """The latest modification time of `path` and, for a folder, of all it holds."""
    times = [os.lstat(path).st_mtime]
    if os.path.isdir(path) and not os.path.islink(path):
        times += [os.lstat(os.path.join(d, n)).st_mtime
                  for d, dirs, files in os.walk(path) for n in dirs + files]
    return max(times)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


# ----------------------------------------------------------------------------- distributed
@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str | torch.device = "cpu", timeout_min: float = 60.0,
                     init_method: str = "env://") -> DistEnv:
    """Join the process group that torchrun describes in RANK/WORLD_SIZE/LOCAL_RANK.

    Without those variables (a plain `python run_pretraining.py`) this is one process and
    no group is created. nccl on CUDA, gloo on CPU. Each CUDA process takes the GPU of its
    LOCAL_RANK. The timeout bounds the longest wait at a collective (the token cache
    fill, a k-means fit on rank 0). `init_method` other than env:// (e.g. file://)
    needs no MASTER_ADDR/MASTER_PORT.
    """
    device = resolve_device(device)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if device.index is None or world_size > 1:
            device = resolve_device(f"cuda:{local_rank}", "this process's GPU (LOCAL_RANK)")
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        for var in ("MASTER_ADDR", "MASTER_PORT") if init_method == "env://" else ():
            if var not in os.environ:
                raise FlagError(f"WORLD_SIZE={world_size} but {var} is not set: start "
                                "several processes with torchrun (scripts/train_*.sh), or "
                                "unset WORLD_SIZE and RANK for one process")
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, init_method=init_method, rank=rank,
                                world_size=world_size,
                                timeout=datetime.timedelta(minutes=timeout_min),
                                device_id=device if device.type == "cuda" else None)
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def resolve_device(device: str | torch.device, flag: str = "--device") -> torch.device:
    """`device` as a torch.device, checked before any work: a name torch knows and, for
    CUDA, a GPU this process can see (otherwise torch fails later, with a traceback).
    `flag` names where the value came from: a flag, or an environment variable such as
    scripts/demo.sh's DEVICE."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise FlagError(f"{flag} {device!r} is not a device: pass cpu, cuda or "
                        "cuda:<index>") from None
    if resolved.type != "cuda":
        return resolved
    if not torch.cuda.is_available():
        cpu = f"pass {flag} cpu" if flag.startswith("--") else f"set {flag}=cpu"
        raise FlagError(f"{flag} {device} was asked for but torch sees no CUDA GPU: {cpu}, "
                        "or install a CUDA build of torch")
    count = torch.cuda.device_count()
    if resolved.index is not None and resolved.index >= count:
        raise FlagError(f"{flag} {device}: torch sees {count} CUDA GPU(s), cuda:0 to "
                        f"cuda:{count - 1}; pass one of them (with torchrun: at most "
                        f"--nproc_per_node {count})")
    return resolved


def cleanup_distributed() -> None:
    """Tear the group down once every rank is done with it (gloo aborts a process whose
    peer leaves while a collective is still in flight). The collection then frees gloo's
    finished work objects while the interpreter is whole: left to its shutdown, a
    finished rank sometimes died with SIGABRT ("terminate called without an active
    exception"; torch 2.14, about one run in ten of tests/test_utils.py's gloo pair)."""
    if is_dist_avail_and_initialized():
        dist.barrier()
        dist.destroy_process_group()
        gc.collect()


@contextlib.contextmanager
def distributed(device: str | torch.device = "cpu", timeout_min: float = 60.0,
                init_method: str = "env://") -> Iterator[DistEnv]:
    """init_distributed for the block; on success, a barrier and the group's end.

    On an exception the group ends at once, with no barrier, and the exception goes
    on: the other ranks may be waiting in DDP's gradient all-reduce, where a barrier
    would never meet them (a hang until the timeout). Their collective then fails, and
    torchrun ends the job with this rank's error.
    """
    env = init_distributed(device, timeout_min, init_method)
    try:
        yield env
    except BaseException:
        if is_dist_avail_and_initialized():
            dist.destroy_process_group()
        raise
    cleanup_distributed()


def is_dist_avail_and_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank() -> int:
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_dist_avail_and_initialized():
        dist.barrier()


def to_device(t: torch.Tensor, device: str | torch.device) -> torch.Tensor:
    """`t` on `device` without the host waiting: host tensors are pinned first for CUDA
    (a copy from pageable memory would wait)."""
    device = torch.device(device)
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu" and not t.is_pinned():
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks in place (a no-op in one process); returns the tensor."""
    if is_dist_avail_and_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's `obj`, indexed by rank."""
    if not is_dist_avail_and_initialized():
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def on_every_rank(check: Callable[[], Any]) -> Any:
    """`check()` on every rank, a UserError of any rank raised on all of them (the others
    say which rank found it): a mistake only one rank sees (a --data_path missing on one
    node, a read-only --output_dir that rank 0 prepares) would otherwise stop that rank
    alone, and the others would die at their next collective with a gloo traceback or
    wait for its timeout. `check` must call no collective. -> what `check` returned."""
    error: UserError | None = None
    result = None
    try:
        result = check()
    except UserError as e:
        error = e
    found = [(rank, found) for rank, found in enumerate(
        all_gather_object(None if error is None else (type(error), _user_message(error))))
        if found is not None]
    if error is not None:
        raise error
    if found:
        rank, (kind, message) = found[0]
        try:
            rebuilt = kind(f"rank {rank} found: {message}")
        except TypeError:  # a kind that takes more than its message
            rebuilt = UserError(f"rank {rank} found: {message}")
        raise rebuilt
    return result


LOG_INTERVAL = 30.0  # seconds between a progress bar's drawings in a log file


def progress(iterable: Iterable | None = None, **kwargs: Any) -> tqdm:
    """tqdm, drawn to suit where it writes. On a terminal, as asked. Redirected to a
    file (`> log`, a cluster job's log), a bar opened inside another is not drawn: two
    bars at once move the cursor with escape sequences, which a log keeps as garbage
    ('^[[A'); the outer bar is drawn every LOG_INTERVAL seconds, not ten times a second,
    and only by the loop: with tqdm's adaptive `miniters` its monitor thread redraws a
    quiet bar itself, with the count of its last redraw (a stale line in the log)."""
    try:
        terminal = bool((kwargs.get("file") or sys.stderr).isatty())
    except (AttributeError, ValueError):  # no stderr (pythonw), or a closed one
        terminal = False
    if not terminal:
        if any(not bar.disable for bar in list(getattr(tqdm, "_instances", ()))):
            kwargs["disable"] = True
        kwargs["mininterval"] = max(kwargs.get("mininterval", 0.1), LOG_INTERVAL)
        kwargs["miniters"] = 1
    return tqdm(iterable, **kwargs)


def main_print(*args: Any, **kwargs: Any) -> None:
    """print on rank 0 only, so that N processes do not repeat every line; on a line of
    its own while a progress bar is drawn (the bar is redrawn below it)."""
    if is_main_process():
        with tqdm.external_write_mode(file=kwargs.get("file")):
            print(*args, **kwargs, flush=True)


def seed_everything(seed: int, rank: int = 0) -> int:
    """Seed python, numpy and torch (all devices) with seed + rank; returns that seed.

    Different per rank so that drop-path and mask draws differ between processes, while
    the data order comes from the sampler's own seed (the same on every rank).
    """
    seed = seed + rank
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)
    return seed


def build_sampler(dataset: torch.utils.data.Dataset, seed: int, shuffle: bool = True
                  ) -> torch.utils.data.DistributedSampler:
    """A DistributedSampler even for one process: the order is then a pure function of
    (seed, epoch) via `set_epoch`, which is what makes resuming mid-run exact."""
    return torch.utils.data.DistributedSampler(dataset, num_replicas=get_world_size(),
                                               rank=get_rank(), shuffle=shuffle, seed=seed)


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool = True) -> Iterator[None]:
    """Bitwise-reproducible kernels inside the block (some are slower, mostly on GPU),
    then the previous mode again, so that a resumed run equals an uninterrupted one.

    Strict: an op without a deterministic kernel raises (naming it) instead of running,
    e.g. a non-deterministic CUDA attention backward. CUBLAS_WORKSPACE_CONFIG=:4096:8
    (unless set) makes cuBLAS deterministic; it must be set before CUDA's first matrix
    product, so enter this block before any. The CPU needs it too: without it the
    gradient of the shared relative-position bias table (an index lookup whose backward
    accumulates rows in a thread-dependent order, modeling_pmad.RelativePositionBias) may
    differ between runs; it also makes torch.empty fill its memory (NaN).
    """
    if not enabled:
        yield
        return
    previous = (torch.are_deterministic_algorithms_enabled(),
                torch.is_deterministic_algorithms_warn_only_enabled(),
                torch.backends.cudnn.benchmark)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it
    torch.use_deterministic_algorithms(True, warn_only=False)
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.backends.cudnn.benchmark = previous[2]


# ----------------------------------------------------------------------------- autocast
AMP_CHOICES = ("fp16", "bf16", "none")


def bf16_supported(device: str | torch.device) -> bool:
    """bf16 autocast that pays off: a bf16-capable GPU, or a CPU with AMX tiles.

    With AVX512-BF16 alone (no AMX) bf16 measured slower than fp32 on our 2-core CI
    machine: ViT-B fwd+bwd at batch 4 17.1 s vs 8.1 s, inference at batch 8 5.6 s vs
    3.5 s; so such CPUs default to fp32.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
    return False


# why a run started without --amp may record another --amp than the same command elsewhere
AMP_DEFAULT_NOTE = ("without --amp a run takes bf16 where the hardware runs it fast (a GPU with "
                    "bf16, a CPU with AMX tiles) and none elsewhere")


def default_amp(device: str | torch.device) -> str:
    """'bf16' where supported, else 'none' (fp16 is opt-in: it needs a loss scaler)."""
    return "bf16" if bf16_supported(device) else "none"


def resolve_amp(amp: str | None, device: str | torch.device) -> str:
    """Validate an --amp choice for this device (None -> default_amp); a FlagError (one
    `error:` line) for a choice the device cannot run."""
    device = torch.device(device)
    if amp is None:
        return default_amp(device)
    if amp not in AMP_CHOICES:
        raise FlagError(f"--amp {amp!r}: choose one of {AMP_CHOICES}")
    if amp == "fp16" and device.type != "cuda":
        raise FlagError(f"--amp fp16 needs a CUDA device (its loss scaler is CUDA-only "
                        f"here), not --device {device}: use --amp bf16 or --amp none there")
    return amp


def amp_dtype(amp: str) -> torch.dtype | None:
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "none": None}[amp]


def amp_autocast(device: str | torch.device, amp: str) -> contextlib.AbstractContextManager:
    """torch.autocast for 'fp16'/'bf16', a null context for 'none'."""
    dtype = amp_dtype(amp)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def make_grad_scaler(device: str | torch.device, amp: str) -> torch.amp.GradScaler:
    """A loss scaler that is active for fp16 only (a pass-through otherwise, so the
    training step and the checkpoint have one shape whatever --amp is)."""
    return torch.amp.GradScaler(torch.device(device).type, enabled=amp == "fp16")


# ----------------------------------------------------------------------------- optimisation
def cosine_scheduler(base_value: float, final_value: float, epochs: int, niter_per_ep: int,
                     warmup_epochs: int = 0, start_warmup_value: float = 0.0,
                     warmup_steps: int = -1) -> np.ndarray:
    """Per-step values (epochs * niter_per_ep,): linear warm-up from `start_warmup_value`
    to `base_value`, then a half cosine down to `final_value` (BEiT's schedule)."""
    total = epochs * niter_per_ep
    warmup_iters = warmup_steps if warmup_steps > 0 else warmup_epochs * niter_per_ep
    warmup_iters = min(warmup_iters, total)
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters)
    iters = np.arange(total - warmup_iters)
    cosine = final_value + 0.5 * (base_value - final_value) * (
        1 + np.cos(np.pi * iters / max(len(iters), 1)))
    schedule = np.concatenate((warmup, cosine))
    assert len(schedule) == total
    return schedule


def param_groups_weight_decay(model: nn.Module, weight_decay: float,
                              skip_list: Iterable[str] | None = None) -> list[dict]:
    """Two AdamW groups: decayed weights, and undecayed 1-d parameters (LayerNorm,
    layer-scale gammas), biases and the names in `skip_list`.

    The default skip list is `model.no_weight_decay()` plus cls_token and pos_embed
    (docs/method.md 2, BEiT). The mask token (1, 1, D) is decayed, as in BEiT's pretraining.
    """
    if skip_list is None:
        skip_list = set(NO_WEIGHT_DECAY)
        if hasattr(model, "no_weight_decay"):
            skip_list |= set(model.no_weight_decay())
    skip = set(skip_list)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name.endswith(".bias") or name in skip:
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": no_decay, "weight_decay": 0.0, "weight_decay_scale": 0.0},
            {"params": decay, "weight_decay": weight_decay, "weight_decay_scale": 1.0}]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float,
                    betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                    device: str | torch.device = "cpu") -> torch.optim.AdamW:
    """AdamW over param_groups_weight_decay; fused (one kernel per step) on CUDA and
    CPU, which also lets engine.train_step skip a failed step without reading the
    device on the host."""
    fused = torch.device(device).type in ("cuda", "cpu")
    return torch.optim.AdamW(param_groups_weight_decay(model, weight_decay), lr=lr,
                             betas=tuple(betas), eps=eps, fused=fused or None)


def set_step_hyperparams(optimizer: torch.optim.Optimizer, lr: float,
                         weight_decay: float) -> None:
    """Per-step lr and weight decay for every group, scaled by its `lr_scale` and
    `weight_decay_scale` (0 for the undecayed group). The scale, not the group's current
    decay, says which group decays, so a schedule that starts at 0 still reaches the
    decayed group; a group from an optimizer state saved without the scale keeps the old
    rule."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
        scale = group.get("weight_decay_scale", float(group["weight_decay"] > 0))
        group["weight_decay"] = weight_decay * scale


# ----------------------------------------------------------------------------- RNG state
def capture_rng_state() -> dict:
    """The global random streams of this process, in types a weights_only load accepts
    (the masks' own stream is MaskingPolicy's)."""
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": random.getstate(),
        "numpy": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                  "pos": int(np_state["state"]["pos"]),
                  "has_gauss": int(np_state["has_gauss"]),
                  "gauss": float(np_state["gauss"])},
        "torch": torch.get_rng_state(),
        # this rank's own GPU only (each rank uses one; the others' states are not its own)
        "cuda": (torch.cuda.get_rng_state(torch.cuda.current_device())
                 if torch.cuda.is_available() and torch.cuda.is_initialized() else None),
    }
    return state


def restore_rng_state(state: dict, device: str | torch.device = "cpu") -> bool:
    """Restore capture_rng_state's streams; returns False when `device` is a GPU whose
    stream the state does not hold (written on the CPU): that stream restarts."""
    random.setstate(_as_tuple(state["python"]))
    np_state = state["numpy"]
    np.random.set_state({"bit_generator": "MT19937",
                         "state": {"key": np_state["key"].numpy().astype(np.uint32),
                                   "pos": np_state["pos"]},
                         "has_gauss": np_state["has_gauss"], "gauss": np_state["gauss"]})
    torch.set_rng_state(state["torch"])
    if torch.device(device).type != "cuda":
        return True
    cuda = state.get("cuda")
    if isinstance(cuda, (list, tuple)):  # earlier layout: every GPU's state
        index = torch.cuda.current_device()
        cuda = cuda[index] if index < len(cuda) else None
    if cuda is None:
        return False
    torch.cuda.set_rng_state(cuda, torch.cuda.current_device())
    return True


def _as_tuple(obj: Any) -> Any:
    """random.setstate needs tuples where a serialiser may have produced lists."""
    return tuple(_as_tuple(x) for x in obj) if isinstance(obj, (list, tuple)) else obj


# ----------------------------------------------------------------------------- checkpoints
def save_on_master(obj: dict, path: str | Sequence[str]) -> None:
    """Write `obj` atomically on rank 0 to one or more paths in the same folder.

    Serialised once (fsync'ed) to the first path through `write_atomic`; each further
    path then gets a hard link to it (an fsync'ed copy where links are unsupported), also
    through `write_atomic`. A crash at any point leaves every file whole, and the first
    path is on disk before any other changes: name first the file that must not be lost
    (a numbered checkpoint before checkpoint-last.pth, which is rewritten every epoch).
    """
    if not is_main_process():
        return
    paths = [path] if isinstance(path, str) else list(path)
    folder = os.path.dirname(os.path.abspath(paths[0]))
    os.makedirs(folder, exist_ok=True)
    write_atomic(paths[0], lambda tmp: _save_fsynced(obj, tmp, paths, folder))
    for p in paths[1:]:
        write_atomic(p, lambda tmp: _link_or_copy(paths[0], tmp))
    _fsync_folder(folder)


def _fsync_folder(folder: str) -> None:
    """Make the renames and links in `folder` durable (where the OS allows it)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)  # a full disk, a used-up quota (clusters)


def _save_fsynced(obj: dict, tmp: str, paths: Sequence[str], folder: str) -> None:
    """torch.save to `tmp`, fsync'ed; a full disk raises DiskFullError naming the
    checkpoint that is still intact."""
    with open(tmp, "wb") as raw:
        f = _CheckpointFile(raw)
        try:
            torch.save(obj, f)
            f.flush()
            os.fsync(raw.fileno())
        except (OSError, RuntimeError) as e:
            # torch reports a failed write as "unexpected pos": the errno is the writer's
            cause = f.error if isinstance(f.error, OSError) else e
            if getattr(cause, "errno", None) in DISK_FULL_ERRNOS:
                intact = [p for p in paths if os.path.exists(p)]
                raise _disk_full(folder, intact[0] if intact else None) from None
            raise


def _link_or_copy(src: str, dst: str) -> None:
    """`dst` as a hard link to `src` (no second copy on disk), or where the file system
    has no links a copy, fsync'ed: the rename that follows must never publish a name
    whose data a power loss could still take. A full disk raises DiskFullError naming
    `src`, which is whole."""
    try:
        os.link(src, dst)
        return
    except OSError:
        pass
    try:
        with open(src, "rb") as fin, open(dst, "wb") as fout:
            shutil.copyfileobj(fin, fout, 1 << 22)
            fout.flush()
            os.fsync(fout.fileno())
    except OSError as e:
        if e.errno in DISK_FULL_ERRNOS:
            raise _disk_full(os.path.dirname(os.path.abspath(dst)), src) from None
        raise


def disk_full_message(e: OSError) -> str:
    """A full disk or used-up quota met by a write that has no DiskFullError of its own
    (results, heatmaps, a converted data set): what and where, and the two fixes."""
    where = f" writing {e.filename}" if e.filename else ""
    return (f"no space left on the device{where} ({os.strerror(e.errno)}): free space and "
            "re-run, or choose another output folder")


def _disk_full(folder: str, intact: str | None) -> DiskFullError:
    """The error of a write that found `folder`'s disk full, naming the file there that is
    still whole. A training checkpoint also resumes from another --output_dir, but only
    when named with --resume: a new --output_dir alone holds none, so the run would start
    over at epoch 0."""
    if intact is None:
        return DiskFullError(f"no space left in {folder}; no earlier file was there: free "
                             "space and re-run, or choose another output folder")
    elsewhere = (f", or pass --resume {intact} with another --output_dir"
                 if CHECKPOINT_PATTERN.match(os.path.basename(intact)) else "")
    return DiskFullError(f"no space left in {folder}; {intact} is intact: free space and "
                         f"re-run{elsewhere}")


class _CheckpointFile:
    """The file torch.save writes to; keeps the OSError of a failed write (torch itself
    reports only "unexpected pos")."""

    def __init__(self, raw: Any) -> None:
        self.raw, self.error = raw, None

    def write(self, data: bytes) -> int:
        try:
            return self.raw.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        try:
            self.raw.flush()
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name: str) -> Any:  # tell, seek, ...: the file's own
        return getattr(self.raw, name)


def _torch_error_text(e: BaseException) -> str:
    """torch.load's error without its advice to retry with weights_only=False (the
    unsafe step that is refused here)."""
    text = str(e)
    inner = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\n|$)", text, re.S)
    if inner:
        return inner.group(1).strip().rstrip(".")
    sentences = re.split(r"(?<=\.)\s+", text.splitlines()[0] if text else "")
    advice = ("weights_only", "trusted source")
    return " ".join(s for s in sentences if not any(a in s for a in advice)
                    ).strip().rstrip(".")


def _all_zero(path: str) -> bool:
    """Whether every byte of `path` is 0 (space reserved by a download or copy that
    never wrote its data); False for a file that cannot be read."""
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                if chunk != bytes(len(chunk)):
                    return False
    except OSError:
        return False
    return True


# How a download of a released file goes wrong in a way its bytes show: a Git LFS pointer
# (a clone of the release without git-lfs) or a web page (a Hugging Face `blob/` link,
# as the original README gives, is the page that shows the file; `resolve/` serves it).
LFS_POINTER = b"version https://git-lfs.github.com/spec/"
HTML_STARTS = (b"<!doctype html", b"<html")


def download_mistake(path: str | os.PathLike) -> str | None:
    """What `path` plainly is instead of the file asked for (a sentence naming it and the
    fix) when it is a Git LFS pointer or a web page; None otherwise (unreadable too)."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return None
    if head.startswith(LFS_POINTER):
        size = re.search(rb"\nsize (\d+)", head)
        return (f"{path} is a Git LFS pointer ({os.path.getsize(path)} bytes"
                + (f" standing for a file of {int(size.group(1)):,} bytes" if size else "")
                + "), not the file itself: the release was cloned without Git LFS. Run "
                "`git lfs pull` in that clone, or download the file itself (links in "
                "weights/README.md)")
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith(HTML_STARTS):
        # not every file is the release's (encoder.pkl is OpenAI's, BEiT's on Azure) nor
        # at its top level (prototypes/<class>/coreset.npy): the rule, not one guessed URL
        return (f"{path} is a web page (HTML), not the file itself: the link downloaded was "
                "a page that shows the file, as a Hugging Face .../blob/main/... link is "
                "(.../resolve/main/... serves the file). Download it from its link in "
                "weights/README.md")
    return None


def _unreadable_weights_error(path: str, e: Exception, fix: str) -> CheckpointError:
    """The error for a file torch.load refused: the object it refused to unpickle; or
    what the file plainly is (a web page or a Git LFS pointer: download_mistake; empty,
    all zero bytes, a tar archive, cut short) where torch's own message is empty or only
    its unsafe advice; else torch's reason."""
    refused = re.search(r"GLOBAL ([\w.]+)", str(e))
    if isinstance(e, pickle.UnpicklingError) and refused \
            and refused.group(1).startswith("dall_e."):
        return CheckpointError(f"{path} is OpenAI's DALL-E encoder (encoder.pkl: a pickled "
                               f"'{refused.group(1)}'), a tokenizer, not the weights file "
                               "asked for here: pass it as --tokenizer_model dall-e "
                               f"--tokenizer_weight_path {path} (the file, or its folder)")
    if isinstance(e, pickle.UnpicklingError) and refused:
        return CheckpointError(f"{path} contains the Python object '{refused.group(1)}', "
                               "which a weights file does not need: refusing to unpickle "
                               "it (unpickling can run code). Use the originally released "
                               "file.")
    size, text = os.path.getsize(path), _torch_error_text(e)
    mistake = download_mistake(path)
    if mistake:
        return CheckpointError(mistake)
    if size == 0 or _all_zero(path):
        return CheckpointError(f"{path} is not a PyTorch checkpoint ({size} bytes"
                               f"{', all zero' if size else ''}: an empty or interrupted "
                               f"download, copy or save?). {fix}")
    if not text and tarfile.is_tarfile(path):
        return CheckpointError(f"{path} is a tar archive, not a PyTorch checkpoint: unpack "
                               "it and name the checkpoint inside")
    if not text and isinstance(e, EOFError):
        return CheckpointError(f"{path} is not a complete PyTorch checkpoint ({size} bytes, "
                               f"ending early: an interrupted download, copy or save?). {fix}")
    kind = "" if isinstance(e, pickle.UnpicklingError) else type(e).__name__
    return CheckpointError(f"{path} is not a readable PyTorch weights file (truncated or "
                           f"not a checkpoint): {': '.join(filter(None, (kind, text)))}. "
                           f"{fix}")


DDP_PREFIX = "module."  # what (Distributed)DataParallel puts before every key it wraps


def strip_ddp_prefix(state_dict: dict) -> dict:
    """A state dict saved from a model wrapped in DistributedDataParallel or DataParallel
    (`model.state_dict()`, not the wrapped module's: every key 'module.<key>') as the
    wrapped model's; any other as it is."""
    if state_dict and all(isinstance(k, str) and k.startswith(DDP_PREFIX) for k in state_dict):
        return {k[len(DDP_PREFIX):]: v for k, v in state_dict.items()}
    return state_dict


def read_weights_file(path: str | os.PathLike, fix: str = "Download it again.",
                      mmap: bool = False) -> Any:
    """torch.load(weights_only=True) with errors that name the file and say `fix`.

    `argparse.Namespace` is the one extra class allowed: PMAD's training checkpoints carry
    their arguments as one (docs/method.md 2).
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise MissingFileError(f"weights file {path} is a folder: name the file in it")
    if not os.path.isfile(path):
        raise MissingFileError(f"weights file {path} not found (see weights/README.md "
                               "for where each file goes)")
    mmap = mmap and zipfile.is_zipfile(path)  # a legacy (non-zip) file cannot be mapped
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # refused object, truncated zip, not a pickle, ...
        raise _unreadable_weights_error(path, e, fix) from None


def _capped(items: Sequence[str], limit: int) -> list[str]:
    """The first `limit` items, then how many more: a message naming thousands of files
    stays readable."""
    return list(items[:limit]) + ([f"... {len(items) - limit} more"]
                                  if len(items) > limit else [])


def some_names(names: Sequence[str], limit: int = 10) -> str:
    """The first `limit` names for a message, on one line, then how many more."""
    return ", ".join(_capped(names, limit))


def bullet_list(lines: Sequence[str], limit: int = 20) -> str:
    """The first `limit` lines for an error message, each on a new indented line."""
    return "".join(f"\n  {line}" for line in _capped(lines, limit))


def resolve_weights_file(path: str, flag: str, pattern: str = "*.pt") -> str:
    """A file, or a folder holding exactly one file matching `pattern` (the layout of
    weights/: one file per folder)."""
    folder = os.fspath(path)
    if os.path.isfile(folder):
        return folder
    if not os.path.isdir(folder):
        raise MissingFileError(f"{flag} {folder} does not exist: see weights/README.md")
    found = sorted(glob.glob(os.path.join(glob.escape(folder), pattern)))
    if not found:
        held = sorted(os.listdir(folder))
        if not held:
            raise MissingFileError(f"{flag} {folder} is empty: see weights/README.md")
        raise MissingFileError(f"{folder} holds no file matching {pattern} (it holds "
                               f"{some_names(held)}): name the file with {flag}")
    if len(found) > 1:
        raise MissingFileError(f"{folder} holds {len(found)} files matching {pattern} "
                               f"({some_names([os.path.basename(f) for f in found])}): name "
                               f"one with {flag}")
    return found[0]


def load_checkpoint_file(path: str, mmap: bool = False) -> dict:
    """torch.load(weights_only=True); argparse.Namespace (the original's 'args') allowed,
    and turned into a plain dict."""
    ckpt = read_weights_file(path, "Delete it or resume from an earlier checkpoint.", mmap)
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} holds a {type(ckpt).__name__}, not a checkpoint dict")
    if isinstance(ckpt.get("args"), argparse.Namespace):
        ckpt["args"] = vars(ckpt["args"])
    return ckpt


def checkpoint_path(output_dir: str, name: int | str) -> str:
    return os.path.join(output_dir, f"checkpoint-{name}.pth")


def find_latest_checkpoint(output_dir: str, none_readable_fix: str | None = None
                           ) -> str | None:
    """The complete checkpoint with the highest stored epoch, or None.

    Only `checkpoint-<n>.pth` and `checkpoint-last.pth` files directly in `output_dir`
    count (temporary files are dot-files with another suffix; an earlier run moved to a
    subfolder by `archive_previous_run` is not looked at); each is opened memory-mapped
    (cheap) to read its epoch, and one that cannot be read, e.g. truncated by a full
    disk, is skipped, and the checkpoint taken instead is named. When every one is
    unreadable, `none_readable_fix` makes that a CheckpointError naming them and the fix
    (a caller that resumes must not silently start over); without it, None.
    """
    best, best_epoch, unreadable = None, -1, []
    for path in checkpoint_files(output_dir):
        try:
            epoch = load_checkpoint_file(path, mmap=True).get("epoch")
        except CheckpointError as e:
            unreadable.append(str(e))
            continue
        if isinstance(epoch, int) and epoch > best_epoch:
            best, best_epoch = path, epoch
    if unreadable and best is not None:
        main_print(f"[auto_resume] skipping {len(unreadable)} unreadable checkpoint(s); "
                   f"resuming {best} (epoch {best_epoch}), the newest readable one:"
                   + bullet_list(unreadable))
    elif unreadable and none_readable_fix is not None:
        raise CheckpointError(f"{output_dir} holds checkpoint files but none is readable:"
                              + bullet_list(unreadable) + f"\nFix: {none_readable_fix}")
    return best


def _stored_epoch(path: str) -> int | None:
    """The epoch a checkpoint file stores (read memory-mapped, cheap); None for a file
    that is missing, unreadable or stores none."""
    if not os.path.isfile(path):
        return None
    try:
        epoch = load_checkpoint_file(path, mmap=True).get("epoch")
    except CheckpointError:
        return None
    return epoch if isinstance(epoch, int) else None


def relink_last_checkpoint(output_dir: str, newest: str, epoch: int) -> bool:
    """Point `output_dir`'s checkpoint-last.pth at `newest` (its checkpoint of `epoch`)
    when it holds an earlier epoch or none. A crash between `save_training_state`'s two
    steps leaves it an epoch behind the numbered file just written; auto-resume takes the
    numbered one, and a finished run re-run ("nothing to do") would otherwise keep a stale
    checkpoint-last.pth for good. Rank 0 only. -> whether it changed it."""
    last = checkpoint_path(output_dir, "last")
    if not is_main_process() or os.path.abspath(newest) == os.path.abspath(last):
        return False
    stored = _stored_epoch(last)
    if stored is not None and stored >= epoch:
        return False
    if stored is not None:
        was = (f"held epoch {stored} (the run stopped between writing "
               f"{os.path.basename(newest)} and it)")
    elif os.path.lexists(last):
        was = "was unreadable or stored no epoch"
    else:
        was = f"was missing (the run stopped before writing it after {os.path.basename(newest)})"
    write_atomic(last, lambda tmp: _link_or_copy(newest, tmp))
    _fsync_folder(os.path.dirname(os.path.abspath(last)))
    main_print(f"[resume] {last} {was}: it is now {os.path.basename(newest)}, epoch {epoch}")
    return True


def checkpoint_files(output_dir: str) -> list[str]:
    """The files `checkpoint-<n>.pth` / `checkpoint-last.pth` directly in `output_dir`
    (never in a subfolder), sorted by name."""
    if not os.path.isdir(output_dir):
        return []
    return [os.path.join(output_dir, name) for name in sorted(os.listdir(output_dir))
            if CHECKPOINT_PATTERN.match(name)
            and os.path.isfile(os.path.join(output_dir, name))]


PREVIOUS_RUN_PREFIX = "previous-"


def checkpoints_newer_than(output_dir: str, epoch: int) -> list[str]:
    """The checkpoint files directly in `output_dir` (`checkpoint_files`) of an epoch
    after `epoch`: `checkpoint-<n>.pth` with n > epoch, and `checkpoint-last.pth` when
    its stored epoch (read memory-mapped, cheap) is; an unreadable one is left out
    (auto-resume skips it too)."""
    newer = []
    for path in checkpoint_files(output_dir):
        name = CHECKPOINT_PATTERN.match(os.path.basename(path)).group(1)
        if name == "last":
            saved = _stored_epoch(path)
            if saved is not None and saved > epoch:
                newer.append(path)
        elif int(name) > epoch:
            newer.append(path)
    return newer


def archive_previous_run(output_dir: str, log_dir: str | None = None,
                         now: datetime.datetime | None = None,
                         newer_than: int | None = None) -> tuple[str, list[str]] | None:
    """Move an earlier run's checkpoints, its log.txt and, when `log_dir` lies inside
    `output_dir`, its TensorBoard event files into a new `<output_dir>/previous-<UTC
    time>/` (same relative paths), before a run that does not continue them starts
    there: otherwise --auto_resume would later pick the old run's newer epochs, and the
    new log.txt would overwrite the old one. Nothing is deleted. Call on rank 0 only.

    `newer_than`: a run rolled back to that epoch of `output_dir`'s own checkpoints
    (an explicit --resume of an older one): only the checkpoints of later epochs move
    (`checkpoints_newer_than`), log.txt is copied (the resumed run keeps it, dropping
    its later lines) and TensorBoard events stay.
    A fresh start sets a log.txt aside even without a checkpoint (the checkpoints were
    deleted, or the run stopped before its first): the new run would overwrite it.
    -> (the folder, the paths moved, or for log.txt with `newer_than` copied, relative
    to `output_dir`), or None when there is nothing to set aside."""
    log = os.path.isfile(os.path.join(output_dir, "log.txt"))
    if newer_than is None:
        checkpoints = checkpoint_files(output_dir)
        if not checkpoints and not log:
            return None
    else:
        checkpoints = checkpoints_newer_than(output_dir, newer_than)
        if not checkpoints:
            return None
    moving = [os.path.basename(p) for p in checkpoints]
    copying = []
    if log:
        (moving if newer_than is None else copying).append("log.txt")
    if newer_than is None and log_dir and is_inside(log_dir, output_dir) \
            and os.path.isdir(log_dir):
        rel = os.path.relpath(os.path.realpath(log_dir), os.path.realpath(output_dir))
        moving += [os.path.normpath(os.path.join(rel, name))
                   for name in sorted(os.listdir(log_dir))
                   if name.startswith("events.out.tfevents.")
                   and os.path.isfile(os.path.join(log_dir, name))]
    folder = set_aside(output_dir, moving, now)
    for rel in copying:
        shutil.copy2(os.path.join(output_dir, rel), os.path.join(folder, rel))
    return folder, moving + copying


def set_aside(output_dir: str | os.PathLike, paths: Iterable[str],
              now: datetime.datetime | None = None) -> str | None:
    """Move those of `paths` (files or folders, relative to `output_dir`) that exist into
    a new `<output_dir>/previous-<UTC time>/`, at the same relative paths, so that a new
    run's outputs never mix with an earlier run's; nothing is deleted. -> the folder, or
    None when none of them exists."""
    output_dir = os.fspath(output_dir)
    present = [rel for rel in paths if os.path.lexists(os.path.join(output_dir, rel))]
    if not present:
        return None
    stamp = (now or datetime.datetime.now(datetime.timezone.utc)).strftime("%Y%m%dT%H%M%SZ")
    base = folder = os.path.join(output_dir, f"{PREVIOUS_RUN_PREFIX}{stamp}")
    n = 1
    while True:  # two fresh starts within a second (two runs in one folder): -2, -3, ...
        try:
            os.makedirs(folder)
            break
        except FileExistsError:
            n += 1
            folder = f"{base}-{n}"
    for rel in present:
        target = os.path.join(folder, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.rename(os.path.join(output_dir, rel), target)  # same file system: atomic
    return folder


RUN_LOCK = ".run.lock"  # a training's, in its output folder (.<file>.run.lock beside a file)
EVAL_LOCK = ".eval.lock"  # an evaluation's (run_test.py, predict.py), in its output folder
TORCHRUN_HINT = " (a killed torchrun's ranks may run on: look for that pid)"


class RunLock:
    """An exclusive lock on what a run writes, held from construction to `close()` (or
    the end of a `with`): flock of a hidden lock file that names the holder, `lock` in an
    output folder, .<name>`lock` beside an output file (`is_file`). A second run writing
    the same (or ranks that outlived a killed torchrun) is refused by name rather than
    writing the same checkpoints, logs or results; runs of other kinds (an evaluation in
    a training's folder) take other locks, as their files differ. The kernel drops the
    lock when its process ends, however it ends; `close()` also removes the file (a
    killed holder leaves it, for the next run to take over). A file system without locks
    gets a note and no lock. `hint`: how to find the holder (TORCHRUN_HINT)."""

    def __init__(self, target: str, flag: str, lock: str = RUN_LOCK, is_file: bool = False,
                 hint: str = "") -> None:
        import fcntl  # POSIX only, as torchrun's launch is
        folder, name = os.path.split(target) if is_file else (target, "")
        self.path = os.path.join(folder, f".{name}{lock}" if name else lock)
        while True:
            try:
                f = open(self.path, "a+", encoding="utf-8")
            except OSError as e:  # another user's file, a folder of that name
                raise UserError(f"{flag} {target}: its lock file {self.path} cannot be opened "
                                f"({e.strerror}): remove it, or pass another {flag}") from None
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "a process that did not say which"
                f.close()
                raise UserError(f"{flag} {target} is in use by another run ({holder}): wait "
                                f"for it to end or stop it{hint}, or pass another "
                                f"{flag}") from None
            except OSError as e:
                f.close()
                with contextlib.suppress(OSError):  # no lock, so no file naming a holder
                    os.remove(self.path)
                self.file = None
                print(f"note: {flag} {target} cannot be locked ({e.strerror}): nothing stops a "
                      "second run from writing there at the same time", file=sys.stderr,
                      flush=True)
                return
            try:
                same = os.stat(self.path).st_ino == os.fstat(f.fileno()).st_ino
            except FileNotFoundError:
                same = False
            if same:  # else its holder removed it between our open and flock: again
                break
            f.close()
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()} since "
                f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M:%S} UTC\n")
        f.flush()
        self.file = f

    def close(self) -> None:
        """Remove the file while still holding it, then let go (a run that opened it
        meanwhile finds it removed and starts over)."""
        if self.file is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.path)
        self.file.close()
        self.file = None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def is_inside(path: str, folder: str) -> bool:
    """Whether `path` is `folder` or lies below it (real paths: links resolved)."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([path, folder]) == folder


def save_training_state(output_dir: str, names: Iterable[int | str], *, epoch: int,
                        model: nn.Module, optimizer: torch.optim.Optimizer,
                        scaler: torch.amp.GradScaler, args: dict,
                        masking: dict | None) -> list[str]:
    """Write checkpoint-<name>.pth for each name; call on EVERY rank (the RNG states of
    all ranks are gathered so that each can resume its own streams). ``masking`` is
    MaskingPolicy.state_dict() (itself gathered from every rank).

    The numbered files are written first and checkpoint-last.pth then links to them: a
    crash between the two keeps the numbered one, which auto-resume picks (the highest
    stored epoch) and `relink_last_checkpoint` points checkpoint-last.pth at; the other
    order would lose that epoch's numbered snapshot for good. -> the paths in that order.

    `model` is the unwrapped module (no DDP 'module.' prefix), so the file also loads as
    an initialisation or test checkpoint ({'model': state_dict, ...}).
    """
    rng = all_gather_object(capture_rng_state())
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "epoch": epoch,
        "args": args,
        "masking": masking,
        "world_size": get_world_size(),
        "rng": rng,
    }
    paths = [checkpoint_path(output_dir, n)
             for n in sorted(names, key=lambda n: n == "last")]  # stable: 'last' at the end
    # every rank waits for the files; a full disk on rank 0 is then an error on each
    on_every_rank(lambda: save_on_master(state, paths))
    return paths


def load_training_state(path: str, *, model: nn.Module,
                        optimizer: torch.optim.Optimizer | None = None,
                        scaler: torch.amp.GradScaler | None = None,
                        masking: Any | None = None,
                        device: str | torch.device = "cpu") -> dict:
    """Restore what save_training_state wrote; returns {'start_epoch', 'rng_restored',
    'args'}. A file holding only 'model' (a released checkpoint) loads the weights and
    starts at epoch 0. ``masking``: a MaskingPolicy; checkpoints of the earlier layout
    (top-level 'dynamic_masking', each rank's 'mask_rng' in 'rng') load too."""
    ckpt = load_checkpoint_file(path)
    if "model" not in ckpt:
        raise CheckpointError(f"{path} has no 'model' entry (keys {sorted(ckpt)[:8]})")
    model.load_state_dict(ckpt["model"], strict=True)
    info = {"start_epoch": 0, "rng_restored": False, "args": ckpt.get("args")}
    if "epoch" not in ckpt or "optimizer" not in ckpt:
        return info
    if optimizer is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    rng = ckpt.get("rng") or []
    masking_state = masking_state_of(ckpt)
    if masking is not None and masking_state is not None:
        masking.load_state_dict(masking_state)
    info["start_epoch"] = int(ckpt["epoch"]) + 1
    check_resume_world_size(ckpt, path)
    if not rng:
        main_print(f"[resume] {path} holds no random states (the original code's "
                   "checkpoints do not): random streams restart from --seed; the weights, "
                   "optimiser and all else it holds are restored exactly")
        return info
    info["rng_restored"] = restore_rng_state(rng[get_rank()], device)
    if not info["rng_restored"]:
        main_print(f"[resume] {path} holds no CUDA random state (written on the CPU): "
                   "the CUDA stream (drop-path) restarts from --seed; weights, "
                   "optimiser, masking and the CPU streams are restored exactly")
    return info


def check_resume_world_size(ckpt: dict, path: str) -> None:
    """A training state resumes only with as many processes as wrote it: each process
    draws its own --batch_size images a step, so another count would change the steps per
    epoch, the learning-rate schedule and which images share a step, and leave the saved
    random streams without their processes. A file with neither (the original code's)
    cannot tell, and resumes with fresh random streams."""
    rng = ckpt.get("rng") or []
    saved = ckpt.get("world_size", len(rng))  # older files: one random state per process
    now = get_world_size()
    if (saved or rng) and (saved != now or len(rng) != now):
        raise CheckpointError(
            f"{path} was trained by {saved} process(es) and holds the random states of "
            f"{len(rng)}; this run has {now}. Resume it with {saved} (torchrun's --nnodes x "
            "--nproc_per_node), or start a new run from its weights: --init_ckpt "
            f"{path} with another --output_dir")


def resolve_resume(resume: str, auto_resume: bool, output_dir: str) -> str | None:
    """The checkpoint to resume from: --resume (a file, or the newest complete
    checkpoint in a folder), else with --auto_resume the newest in --output_dir. A
    --output_dir whose checkpoint files are all unreadable is refused, not started over.

    The same command again continues its run: --resume of another folder's checkpoint,
    re-run after --output_dir saved newer epochs of the run started from it, continues
    those (`_continued_in`), unless --no_auto_resume asks to start over from it."""
    if not resume:
        if not auto_resume:
            return None
        return find_latest_checkpoint(output_dir, "delete it (or them), or pass "
                                      "--no_auto_resume to start afresh (the files first "
                                      f"move to <output_dir>/{PREVIOUS_RUN_PREFIX}<UTC time>/)")
    if os.path.isdir(resume):
        found = find_latest_checkpoint(resume, f"--resume {resume}: name a readable "
                                               "checkpoint file")
        if found is None:
            raise CheckpointError(f"--resume {resume}: the folder holds no complete "
                                  "checkpoint-<epoch>.pth or checkpoint-last.pth; name a "
                                  "checkpoint file")
    elif not os.path.isfile(resume):
        raise MissingFileError(f"--resume {resume} not found: name a checkpoint "
                               "file, or the --output_dir of the run to resume")
    else:
        found = resume
    return _continued_in(output_dir, resume, found) if auto_resume else found


def _continued_in(output_dir: str, resume: str, found: str) -> str:
    """`output_dir`'s newest checkpoint when it continues a run started there from
    --resume `resume` (the checkpoint `found`, outside `output_dir`), of a later epoch;
    else `found`. Resuming `found` again would redo those epochs and move them aside."""
    if os.path.realpath(os.path.dirname(os.path.abspath(found))) == \
            os.path.realpath(output_dir):
        return found  # the folder's own: a roll-back is what --resume asks for
    newest = find_latest_checkpoint(output_dir)
    if newest is None:
        return found
    ckpt = load_checkpoint_file(newest, mmap=True)
    origin = (ckpt.get("args") or {}).get("resume")
    started = _stored_epoch(found)
    if not origin or os.path.realpath(origin) not in {os.path.realpath(resume),
                                                      os.path.realpath(found)} \
            or not isinstance(ckpt.get("epoch"), int) \
            or ckpt["epoch"] <= (-1 if started is None else started):
        return found
    main_print(f"[resume] {output_dir} already holds epoch {ckpt['epoch']} of the run started "
               f"there from --resume {resume}: continuing {newest}, not {found} again (pass "
               "--no_auto_resume to start over from it)")
    return newest


def check_resume_args(saved: dict | None, args: dict, path: str, must_match: Sequence[str],
                      epoch: int | None = None, explicit: bool = False) -> str | None:
    """A resumed run continues the saved one; a different schedule or class set would
    silently become another experiment. One exception: a finished run (its last epoch
    `epoch` saved) resumed with a larger --epochs is extended. `must_match`: the argument
    names that define the experiment. -> the line that says the run is extended, for the
    caller to print once its other checks have passed (else None)."""
    if not saved:
        return None
    diff = {k: (saved.get(k), args.get(k)) for k in must_match
            if k in saved and saved.get(k) != args.get(k)}
    done = None if epoch is None else epoch + 1
    note = None
    if "epochs" in diff and done is not None:
        old, new = diff["epochs"]
        if isinstance(old, int) and done >= old:  # finished: more epochs extend it
            del diff["epochs"]
            if new > done:
                note = (f"[resume] {path} finished its {old} epochs: extending the run to "
                        f"{new} epochs (the learning-rate schedule is recomputed for {new} "
                        f"epochs and continues at epoch {done})")
    if diff:
        fix = ("resume another checkpoint" if explicit else
               "start a new run: another --output_dir, or --no_auto_resume in this one "
               f"(which moves this run's checkpoints and log.txt to {PREVIOUS_RUN_PREFIX}"
               "<UTC time>/ first)")
        if "epochs" in diff:
            fix += (f"; to train longer, first finish its {diff['epochs'][0]} epochs, then "
                    "re-run with a larger --epochs")
        if "amp" in diff:
            saved_amp = diff["amp"][0]
            fix += (f". {AMP_DEFAULT_NOTE[0].upper()}{AMP_DEFAULT_NOTE[1:]}: pass --amp "
                    f"{saved_amp} to resume it"
                    + (" on a CUDA device" if saved_amp == "fp16" else " on this machine"))
        raise CheckpointError(f"{path} was trained with other arguments: {flag_changes(diff)}"
                              f"; resume it with the same flags, or {fix}")
    return note


def flag_changes(diff: dict[str, tuple[Any, Any]]) -> str:
    """{name: (saved, now)} as '--name saved (now now), ...', for a refused resume."""
    return ", ".join(f"--{k} {a!r} (now {b!r})" for k, (a, b) in diff.items())


def masking_state_of(ckpt: dict) -> dict | None:
    """The checkpoint's MaskingPolicy state; the earlier layout (top-level
    'dynamic_masking', each rank's 'mask_rng' inside 'rng') converted."""
    if ckpt.get("masking") is not None:
        return ckpt["masking"]
    if ckpt.get("dynamic_masking") is None:
        return None
    return {"dynamic_masking": ckpt["dynamic_masking"],
            "mask_rng": [r.get("mask_rng") for r in ckpt.get("rng") or []]}


# ----------------------------------------------------------------------------- memory
MEMINFO, PROC_CGROUP, CGROUP_ROOT = "/proc/meminfo", "/proc/self/cgroup", "/sys/fs/cgroup"


def available_memory() -> int | None:
    """This machine's available memory in bytes (Linux: MemAvailable), or less where a
    memory cgroup limits this process (a container, a cluster job: MemAvailable is the
    whole machine's, and --cache_images auto would cache by it and the job be killed);
    None where the system does not tell."""
    machine = None
    try:
        with open(MEMINFO) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    machine = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    limited = _cgroup_headroom()
    if machine is None or limited is None:
        return machine if limited is None else limited
    return min(machine, limited)


def _cgroup_headroom() -> int | None:
    """What this process's memory cgroups (v1 or v2, each up to its root) may still take:
    limit - usage + the reclaimable page cache (inactive files); None without a limit."""
    def read(folder: str, name: str) -> str:
        with open(os.path.join(folder, name)) as f:
            return f.read()
    try:
        with open(PROC_CGROUP) as f:
            entries = [line.rstrip("\n").split(":", 2) for line in f]
    except OSError:
        return None
    room = None
    for entry in entries:
        if len(entry) != 3:
            continue
        v2 = entry[1] == ""
        if not v2 and "memory" not in entry[1].split(","):
            continue
        base = CGROUP_ROOT if v2 else os.path.join(CGROUP_ROOT, "memory")
        limit_file, usage_file, cache = (("memory.max", "memory.current", "inactive_file")
                                         if v2 else ("memory.limit_in_bytes",
                                                     "memory.usage_in_bytes",
                                                     "total_inactive_file"))
        parts = [p for p in entry[2].split("/") if p]
        for k in range(len(parts), -1, -1):
            folder = os.path.join(base, *parts[:k])
            try:
                limit = read(folder, limit_file).strip()
                if limit == "max" or int(limit) >= 2 ** 60:  # no limit here
                    continue
                stat = dict(line.split() for line in read(folder, "memory.stat").splitlines())
                free = (int(limit) - int(read(folder, usage_file)) + int(stat.get(cache, 0)))
            except (OSError, ValueError):
                continue
            room = max(free, 0) if room is None else min(room, max(free, 0))
    return room


# ----------------------------------------------------------------------------- provenance
def code_version() -> str | None:
    """This code's git commit (`git describe --always --dirty`: '-dirty' where tracked
    files differ from it), so that a result names the code that made it; 'unknown (why)'
    where git cannot tell (not installed, a checkout another user owns); None where the
    code is no git checkout of its own (an unpacked archive, even inside another
    repository, whose commit would not be this code's)."""
    git_dir = os.path.join(PROJECT_DIR, ".git")
    if not os.path.exists(git_dir):
        return None
    try:
        done = subprocess.run(["git", f"--git-dir={git_dir}", f"--work-tree={PROJECT_DIR}",
                               "describe", "--always", "--dirty", "--abbrev=12"],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        return f"unknown ({type(e).__name__}: {e})"
    if done.returncode != 0 or not done.stdout.strip():
        why = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[0]
        return f"unknown (git: {why})"
    return done.stdout.strip()


def provenance(device: str | torch.device) -> dict[str, Any]:
    """Where, when and by what a result was made: the code's version, the process's
    command line (a notebook's or pytest's where called from Python), the UTC start
    time, the host and the device, and a random id that tells two runs apart."""
    return {"run_id": uuid.uuid4().hex, "code": code_version(), "argv": list(sys.argv),
            "started_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds"),
            "host": socket.gethostname(), "device": str(device)}


# ----------------------------------------------------------------------------- logging
class SmoothedValue:
    """A series' windowed average (progress bar) and its global average (logs)."""

    def __init__(self, window_size: int = 20) -> None:
        self.deque: deque[float] = deque(maxlen=window_size)
        self.total = 0.0
        self.count = 0

    def update(self, value: float, n: int = 1) -> None:
        self.deque.append(value)
        self.count += n
        self.total += value * n

    def synchronize_between_processes(self, device: torch.device | str = "cpu") -> None:
        """Make `global_avg` the average over all ranks (the window stays local)."""
        t = torch.tensor([self.count, self.total], dtype=torch.float64, device=device)
        all_reduce_sum(t)
        self.count, self.total = int(t[0].item()), float(t[1].item())

    @property
    def avg(self) -> float:
        return float(np.mean(self.deque)) if self.deque else float("nan")

    @property
    def global_avg(self) -> float:
        return self.total / self.count if self.count else float("nan")


class MetricLogger:
    """Named SmoothedValues; `summary()` gives the epoch's global averages."""

    def __init__(self, window_size: int = 20) -> None:
        self.meters: dict[str, SmoothedValue] = defaultdict(lambda: SmoothedValue(window_size))

    def update(self, **values: float) -> None:
        for name, value in values.items():
            if value is not None:
                self.meters[name].update(float(value))

    def synchronize_between_processes(self, device: torch.device | str = "cpu") -> None:
        for name in sorted(self.meters):  # same order on every rank
            self.meters[name].synchronize_between_processes(device)

    def postfix(self) -> dict[str, str]:
        return {k: f"{m.avg:.4g}" for k, m in self.meters.items()}

    def summary(self) -> dict[str, float]:
        return {k: m.global_avg for k, m in self.meters.items()}


class JsonlLog:
    """One JSON object per line, flushed at once (rank 0 only).

    On resume, lines of epochs >= `start_epoch` (written after the checkpoint that is
    being resumed, or before a checkpoint that was never written: engine.fit writes an
    epoch's line first) are dropped, so each epoch appears exactly once.
    """

    def __init__(self, path: str, start_epoch: int = 0) -> None:
        self.path = path
        if not is_main_process():
            return
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if os.path.exists(path):
            lines, cut = complete_lines(path)
            if cut:
                print(f"[log] {path}: its last line was cut short (the run stopped while "
                      "writing it) and is dropped", file=sys.stderr, flush=True)
            lines = [ln for ln in lines if ln.strip()]
            kept = [ln for ln in lines if _line_epoch(ln) < start_epoch]
            if cut or len(kept) != len(lines):
                write_atomic(path, lambda tmp: _write_lines(tmp, kept))

    def write(self, record: dict) -> None:
        if not is_main_process():
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def complete_lines(path: str | os.PathLike) -> tuple[list[str], str]:
    """A JSON-lines file's whole lines (without their newline) and its last line if that
    was cut short ('' if the file ends with a newline). A writer stopped mid-line leaves
    such a tail; a reader that keeps it would glue the next record onto it."""
    with open(path) as f:
        *whole, tail = f.read().split("\n")
    return whole, tail


def _write_lines(path: str, lines: list[str]) -> None:
    with open(path, "w") as f:
        f.writelines(line + "\n" for line in lines)


def _line_epoch(line: str) -> float:
    try:
        return float(json.loads(line).get("epoch", -1))
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
        return -1.0


def make_tensorboard_writer(log_dir: str | None, purge_step: int | None = None
                            ) -> Any | None:
    """A SummaryWriter on rank 0 (None elsewhere or without a log_dir); `purge_step`
    drops events of steps about to be redone after a resume."""
    if not log_dir or not is_main_process():
        return None
    from torch.utils.tensorboard import SummaryWriter
    os.makedirs(log_dir, exist_ok=True)
    return SummaryWriter(log_dir=log_dir, purge_step=purge_step)
