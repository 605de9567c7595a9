"""What every child process of the supervisor does: die with its parent, and once it has loaded what it
keeps, take that out of the garbage collector's sight."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import signal

_PR_SET_PDEATHSIG = 1


def become_child() -> None:
    """Have the kernel kill this process when its parent dies (Linux), so a supervisor that is killed
    outright (SIGKILL, out of memory) leaves no worker or engine process behind holding the port or GPU;
    and leave the terminal's process group, so Ctrl-C reaches only the supervisor, which drains them."""
    os.setpgrp()
    with contextlib.suppress(AttributeError, OSError):  # not Linux: the supervisor's shutdown still stops them
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def settle_memory() -> None:
    """Once a process has loaded what it keeps (tokenizer, vocabulary, the web framework), move it out of
    the cyclic garbage collector's sight and collect young objects less often: a request allocates
    thousands of small objects, and each full collection otherwise walks every long-lived one too."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
