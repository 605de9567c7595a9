"""The one logging set-up: each process calls `configure` once at its start, and every module logs under
its own name (`logging.getLogger(__name__)`, all below `nerserve`), so a line says which process and
which part of it wrote it."""

from __future__ import annotations

import logging
import sys


def configure(level: str | int, role: str) -> None:
    """Log to standard error at `level`, each line stamped with the time and the process's `role`
    (supervisor, engine, worker, build, start)."""
    logging.basicConfig(
        level=level, format=f"%(asctime)s {role} %(name)s %(levelname)s %(message)s", stream=sys.stderr, force=True
    )
