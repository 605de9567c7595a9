"""The engine process: owns the model and the device, and batches every front-end worker's requests.

It listens on a Unix socket before it loads anything, so workers can connect at once; it then loads
the checkpoint and engine (downloading, exporting ONNX where needed), answers one warm-up request, and
reports to the supervisor: ("ready", info) or ("failed", one line saying why). Each worker that
connects hands over its arena (transport.py) and gets what it needs to tokenize and aggregate on its
own: the tokenizer, the labels and /info. From then on, one thread per worker reads its SUBMIT and
CANCEL messages and feeds the one scheduler; the scheduler's thread runs the engine and answers DONE.

A worker that goes away has its requests cancelled; the engine process lives on for the others (the
supervisor starts a new worker). SIGTERM stops it after the scheduler has finished what is queued."""

from __future__ import annotations

import collections
import logging
import mmap
import os
import signal
import sys
import threading
import time
from multiprocessing import reduction
from multiprocessing.connection import Connection, Listener

from ..config import Settings
from ..errors import ApiError
from ..lifecycle import become_child, settle_memory
from ..logs import configure
from ..metrics import Metrics
from ..transport import CANCEL, SUBMIT, Block, Hello, Setup, Submit, decode, decode_handshake, encode_done
from .core import EngineCore, EngineLoader
from .scheduler import Job

log = logging.getLogger(__name__)


class WorkerLink:
    """One connected worker: its socket, its arena as mapped here, its jobs in flight, and its answers
    waiting to be sent. Answers go out from a thread of this worker's own: the scheduler's thread only
    appends to the outbox, so a worker that stops reading fills its own socket and stalls itself, never
    the scheduler (a blocking send there would stop every worker's batches, and a worker blocked sending
    a SUBMIT to a reader that waits on the same lock would never be read again)."""

    def __init__(self, connection: Connection, arena: mmap.mmap, pid: int) -> None:
        self.connection = connection
        self.arena = arena
        self.pid = pid
        self.jobs: dict[int, Job] = {}
        self.outbox: collections.deque[bytes] = collections.deque()
        self._wake = threading.Condition()
        self.alive = True
        threading.Thread(target=self._send_loop, name=f"nerserve-send-{pid}", daemon=True).start()

    def send(self, message: bytes) -> None:
        """Queue an answer, from any thread, without waiting; a worker that went away is not an error here."""
        with self._wake:
            if self.alive:
                self.outbox.append(message)
                self._wake.notify()

    def close(self) -> None:
        """The worker went away: later answers to it are dropped, and its sending thread ends."""
        with self._wake:
            self.alive = False
            self.outbox.clear()
            self._wake.notify()

    def _send_loop(self) -> None:
        while True:
            with self._wake:
                while self.alive and not self.outbox:
                    self._wake.wait()
                if not self.alive:
                    return
                message = self.outbox.popleft()
            try:
                self.connection.send_bytes(message)
            except OSError:
                self.close()
                return


class EngineHost:
    """The engine core, fed from worker connections."""

    def __init__(self, core: EngineCore, metrics: Metrics) -> None:
        self.core = core
        self.metrics = metrics
        self.num_labels = len(core.labels)
        self.setup = Setup(core.tokenizer, core.labels, core.info()).encode()

    def serve(self, connection: Connection) -> None:
        """Handshake with one worker, then read its messages until it goes away (runs in its own thread)."""
        try:
            pid = decode_handshake(connection.recv_bytes(), Hello).pid
            fd = reduction.recv_handle(connection)
            arena = mmap.mmap(fd, 0)
            os.close(fd)
            connection.send_bytes(self.setup)
        except (EOFError, OSError, ValueError) as error:
            log.warning("a worker left during its handshake: %s", error)
            return
        link = WorkerLink(connection, arena, pid)
        log.info("worker %d connected", pid)
        try:
            while True:
                kind, payload = decode(connection.recv_bytes())
                if kind == SUBMIT:
                    assert isinstance(payload, Submit)
                    self._submit(link, payload)
                elif kind == CANCEL:
                    job = link.jobs.get(int(payload))  # type: ignore[call-overload]
                    if job is not None:
                        self.core.cancel(job)
        except (EOFError, OSError):
            pass
        link.close()
        for job in list(link.jobs.values()):
            self.core.cancel(job)
        log.info("worker %d disconnected; its %d requests in flight were cancelled", pid, len(link.jobs))

    def _submit(self, link: WorkerLink, submit: Submit) -> None:
        block = Block.at(
            link.arena, submit.offset, submit.sequences, submit.tokens, self.num_labels, submit.keep_logits
        )

        def done(error: ApiError | None) -> None:
            link.jobs.pop(submit.job_id, None)
            link.send(encode_done(submit.job_id, error))

        job = Job(block.sequences(), block.scores, done)
        link.jobs[submit.job_id] = job
        try:
            self.core.submit(job)
        except ApiError as refused:  # queue full or closing: refused whole, at once
            job.settle(refused)
        self.metrics.queue_depth.set(self.core.depth)


def serve_engine(
    settings: Settings, address: str, authkey: bytes, status: Connection, engine_loader: EngineLoader | None
) -> None:
    """Entry point of the engine process (spawned by the supervisor, which imports this module but none
    of the model stack: transformers and torch are imported when the core loads the checkpoint)."""
    become_child()
    configure(settings.log_level, "engine")
    listener = Listener(address, family="AF_UNIX", authkey=authkey)
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides when the engine stops
    metrics = Metrics()
    try:
        core = EngineCore(settings, metrics.observe_batch, metrics.observe_queue, engine_loader)
        core.warm_up()
    except Exception as error:  # one line for the supervisor; the traceback only at debug level
        log.debug("model failed to load", exc_info=True)
        status.send(("failed", f"{type(error).__name__}: {error}"))
        sys.exit(1)
    host = EngineHost(core, metrics)
    settle_memory()
    status.send(("ready", core.info()))
    threading.Thread(target=_accept, args=(listener, host), name="nerserve-accept", daemon=True).start()
    while not stopping.wait(0.5):
        metrics.queue_depth.set(core.depth)
    core.close()  # finishes what is queued
    log.info("engine stopped")


def _accept(listener: Listener, host: EngineHost) -> None:
    while True:
        try:
            connection = listener.accept()
        except (OSError, EOFError) as error:  # a client that failed authentication, or the listener closing
            log.warning("refused a connection: %s", error)
            time.sleep(0.01)
            continue
        threading.Thread(target=host.serve, args=(connection,), name="nerserve-worker-link", daemon=True).start()
