"""Small facts about this server's processes: how many front-end workers a machine gets, and the
bond between the supervisor and its children."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import math
import os
import signal
from pathlib import Path

_PR_SET_PDEATHSIG = 1
#: the end of the shutdown window left to the engine process, once the workers have drained
ENGINE_STOP_S = 1.0


def die_with_parent() -> None:
    """Have the kernel kill this process when its parent dies (Linux), so a supervisor that is killed
    outright (SIGKILL, out of memory) leaves no worker or engine process behind holding the port or GPU;
    and leave the terminal's process group, so Ctrl-C reaches only the supervisor, which drains them."""
    os.setpgrp()
    with contextlib.suppress(AttributeError, OSError):  # not Linux: the supervisor's shutdown still stops them
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def run_engine(*args: object) -> None:
    """The engine process's entry point; imports the model stack (torch, transformers) only there."""
    die_with_parent()
    from .engine_process import run

    run(*args)  # type: ignore[arg-type]


def run_worker(*args: object) -> None:
    """A front-end worker's entry point; it never imports torch or transformers. Its tokenizer runs on
    one thread: the workers are the parallelism (a thread pool per worker would fight the others)."""
    die_with_parent()
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from .worker import run

    run(*args)  # type: ignore[arg-type]


def nvidia_devices(dev: Path = Path("/dev")) -> list[str]:
    """The NVIDIA GPU device files of this machine (`/dev/nvidia0`, ...): what the container runtime
    passes in for each GPU, whatever the CUDA libraries make of them."""
    return sorted(path.name for path in dev.glob("nvidia[0-9]*"))


def default_workers(engine: str, cores: int, gpus: list[str]) -> int:
    """Front-end workers where the setting leaves it open: one per core when the engine runs on a GPU
    (the host's work is then the bound: about 420k tokens/s a core on sentences, `bench/host.py`), one
    when it runs on the CPU, where the model needs every core and the host's share is a few percent
    (on 2 cores ONNX Runtime served 7,260 tokens/s on sentences with one worker and 7,289 with two,
    bench/results/2026-11-27-AMD-EPYC-host.md: a second worker adds a process and buys nothing)."""
    on_gpu = bool(gpus) and engine != "onnxruntime"
    return cores if on_gpu else 1


def settle_memory() -> None:
    """Once a process has loaded what it keeps (tokenizer, vocabulary, the web framework), move it out of
    the cyclic garbage collector's sight and collect young objects less often: a request allocates
    thousands of small objects, and each full collection otherwise walks every long-lived one too."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


def usable_cores(cgroup: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """The cores this process may use: its CPU affinity, capped by a container's CPU quota (cgroup v2
    `cpu.max`, e.g. "400000 100000" for 4 cores; os.cpu_count() would count the host's)."""
    cores = len(os.sched_getaffinity(0))
    try:
        quota, period = cgroup.read_text().split()
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)
