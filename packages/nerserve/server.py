"""The HTTP server (`nerserve serve`), as a supervisor over one engine process and N front-end worker
processes (the layout of vLLM's API servers in front of one engine core, and of
text-embeddings-inference's tokenizer workers in front of one backend).

- The supervisor is handed the settings and the two processes' entry points (cli.py hands it
  `engine.process.serve_engine` and `http.worker.serve_worker`; it imports neither the model stack nor
  the web framework itself). It binds the port, and starts the engine process (the model, the device,
  the one scheduler that batches every worker's requests) and the workers (HTTP, validation,
  tokenization, aggregation, encoding), who share the listening socket and reach the engine process
  over a Unix socket with shared memory beside it (transport.py).
- A model that cannot load ends the server within seconds with a non-zero status, its last line
  naming the cause (the traceback only at debug level): on Baseten the container stops and the
  platform shows why, rather than a server answering 503 for ever. A setting that cannot work ends it
  the same way before anything starts.
- A worker that dies is replaced. An engine process that dies makes every worker answer 503 and ends
  the server with a non-zero status (the platform restarts the container).
- SIGTERM or SIGINT drains: each worker answers 503 for `shutdown_grace_s` while accepted requests
  finish, then stops; then the engine process stops; all within `shutdown_timeout_s` (Truss's
  supervisord kills the server 10 s after its SIGTERM)."""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import ENGINE_STOP_S, Runtime, Settings
from .metrics import MULTIPROC_DIR, process_gone
from .platform import nvidia_devices, usable_cores

if TYPE_CHECKING:  # a type only: the supervisor imports nothing of the model stack
    from .engine.core import EngineLoader

log = logging.getLogger(__name__)
#: a spawned process's entry point: a module-level function, as the child imports it by name
Target = Callable[..., None]


def default_workers(engine: str, cores: int, gpus: list[str]) -> int:
    """Front-end workers where the setting leaves it open: one per core when the engine runs on a GPU
    (the host's work is then the bound), one when it runs on the CPU, where the model needs every core
    and a second worker adds a process and buys nothing (bench/results/2026-11-27-AMD-EPYC-host.md
    measures both)."""
    on_gpu = bool(gpus) and engine != Runtime.ONNXRUNTIME
    return cores if on_gpu else 1


class Supervisor:
    """Starts, watches and stops the engine process and the workers."""

    def __init__(
        self,
        settings: Settings,
        engine_target: Target,
        worker_target: Target,
        engine_loader: EngineLoader | None = None,
    ) -> None:
        """`engine_target(settings, address, authkey, status, engine_loader)` and
        `worker_target(settings, socket, address, authkey)` are the processes' entry points;
        `engine_loader`, where given, is how the engine process makes its engine (module-level, as
        the targets); None: the runtime the settings choose."""
        self.settings = settings
        self.engine_target, self.worker_target = engine_target, worker_target
        self.engine_loader = engine_loader
        self.workers_wanted = settings.workers or default_workers(settings.engine, usable_cores(), nvidia_devices())
        self.spawn = multiprocessing.get_context("spawn")
        self.folder = Path(tempfile.mkdtemp(prefix="nerserve-"))
        self.address = str(self.folder / "engine.sock")
        self.authkey = os.urandom(32)
        self.workers: dict[int, BaseProcess] = {}  # sentinel -> process
        self._wake_read, self._wake_write = os.pipe()

    def serve(self) -> int:
        """Serve until a signal (0) or a failure (1); the last line written says which."""
        (self.folder / "metrics").mkdir()
        os.environ[MULTIPROC_DIR] = str(self.folder / "metrics")  # the children inherit it
        try:
            listening = self._listen()
        except OSError as error:
            return self._fail(f"cannot listen on {self.settings.host}:{self.settings.port}: {error.strerror}")
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)
        status_read, status_write = self.spawn.Pipe(duplex=False)
        engine = self.spawn.Process(
            target=self.engine_target,
            args=(self.settings, self.address, self.authkey, status_write, self.engine_loader),
            name="nerserve-engine",
        )
        engine.start()
        status_write.close()
        for _ in range(self.workers_wanted):
            self._start_worker(listening)
        log.info(
            "listening on %s:%d: %d workers, engine process %d loading %s",
            self.settings.host,
            self.settings.port,
            self.workers_wanted,
            engine.pid,
            self.settings.checkpoint,
        )
        try:
            return self._watch(engine, status_read, listening)
        finally:
            listening.close()
            shutil.rmtree(self.folder, ignore_errors=True)

    def _listen(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.settings.host else socket.AF_INET
        listening = socket.socket(family, socket.SOCK_STREAM)
        listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listening.bind((self.settings.host, self.settings.port))
        listening.listen(2048)
        return listening

    def _start_worker(self, listening: socket.socket) -> None:
        process = self.spawn.Process(
            target=self.worker_target,
            args=(self.settings, listening, self.address, self.authkey),
            name="nerserve-worker",
        )
        process.start()
        self.workers[process.sentinel] = process

    def _on_signal(self, signum: int, frame: Any) -> None:
        os.write(self._wake_write, b"x")

    def _watch(self, engine: BaseProcess, status: Connection, listening: socket.socket) -> int:
        reports = [status]  # the engine process's one status message; closed after it
        while True:
            ready = wait([*reports, engine.sentinel, self._wake_read, *self.workers])
            if self._wake_read in ready:
                os.read(self._wake_read, 64)
                return self._shutdown(engine)
            if status in ready:
                try:
                    kind, detail = status.recv()
                except EOFError:  # it exited without a word: its sentinel says so
                    reports.clear()
                    continue
                if kind == "failed":
                    self._stop(engine, drain=False)
                    return self._fail(f"cannot load the model: {detail}")
                log.info(
                    "engine ready: %s %s, max_num_tokens %d, model %s",
                    detail["engine"],
                    detail["precision"],
                    detail["max_num_tokens"],
                    detail["model_id"],
                )
            if engine.sentinel in ready:
                engine.join()
                log.error("the engine process exited (status %s): the workers answer 503, then stop", engine.exitcode)
                self._stop(engine, drain=True)
                return self._fail(f"the engine process exited (status {engine.exitcode})")
            for sentinel in [s for s in ready if s in self.workers]:
                gone = self.workers.pop(sentinel)
                gone.join()
                process_gone(gone.pid or 0)
                log.warning("worker %d exited (status %s); starting another", gone.pid, gone.exitcode)
                self._start_worker(listening)

    def _shutdown(self, engine: BaseProcess) -> int:
        log.info("draining: %d workers finish what they accepted, then the engine stops", len(self.workers))
        self._stop(engine, drain=True)
        log.info("shutdown complete: every accepted request answered")
        return 0

    def _stop(self, engine: BaseProcess, drain: bool) -> None:
        """Stop the workers, then the engine process, killing what outlives the shutdown window. With
        `drain`, the workers get SIGTERM: 503 to new requests for `shutdown_grace_s`, then they finish what
        they accepted; without (a model that never loaded: nothing was accepted) they are killed at once."""
        deadline = time.monotonic() + self.settings.workers_stop_s
        for process in self.workers.values():
            _signal(process, signal.SIGTERM if drain else signal.SIGKILL)
        for process in self.workers.values():
            process.join(max(deadline - time.monotonic(), 0.1))
            if process.is_alive():
                log.warning("worker %d still running at the end of the shutdown window: killed", process.pid)
                _signal(process, signal.SIGKILL)
                process.join()
        _signal(engine, signal.SIGTERM)
        engine.join(ENGINE_STOP_S)
        if engine.is_alive():
            _signal(engine, signal.SIGKILL)
            engine.join()

    def _fail(self, line: str) -> int:
        """The last line of the server's output, then status 1."""
        logging.shutdown()
        print(f"nerserve: {line}", file=sys.stderr, flush=True)
        return 1


def _signal(process: BaseProcess, signum: int) -> None:
    if process.pid is not None and process.is_alive():
        os.kill(process.pid, signum)
