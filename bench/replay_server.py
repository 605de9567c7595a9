"""`python bench/replay_server.py`: `nerserve serve` whose engine process answers from logits recorded
before the run (replay_engine.py), so a bench measures the server's host capacity alone."""

from __future__ import annotations

import sys

import replay_engine

from nerserve.config import load_settings
from nerserve.engine.process import serve_engine
from nerserve.http.worker import serve_worker
from nerserve.logs import configure
from nerserve.server import Supervisor

if __name__ == "__main__":
    settings = load_settings()
    configure(settings.log_level, "supervisor")
    sys.exit(Supervisor(settings, serve_engine, serve_worker, engine_loader=replay_engine.load).serve())
