"""`python bench/replay_server.py`: `python -m nerserve serve` whose engine process answers from logits
recorded before the run (replay_engine.py), so a bench measures the server's host capacity alone."""

from __future__ import annotations

import logging
import sys

import replay_engine

from nerserve.config import Settings, config_path, read_config
from nerserve.server import Supervisor

if __name__ == "__main__":
    settings = Settings.from_config(read_config(config_path()))
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(name)s %(message)s")
    sys.exit(Supervisor(settings, engine_loader=replay_engine.load).run())
