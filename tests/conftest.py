"""Shared fixtures: the checkpoints the tests build, the shared real checkpoint, pipeline oracles,
a real server process, and a summary of the parity figures printed at the end of the run."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "packages"), str(ROOT / "tests")]
SHARED = ROOT.parent / "shared"
REAL_CHECKPOINT = SHARED / "models" / "minilm-l6-conll03-ner"
CONLL_DEV = SHARED / "data" / "conll2003" / "eng.testa"

warnings.filterwarnings("ignore", message="Tokenizer does not support real words")

import checkpoints  # noqa: E402

PARITY: list[str] = []  # lines for the terminal summary
#: the README's request (and Baseten's playground example, config.yaml's example_model_input)
SEED = {
    "inputs": [["Apple is looking at buying U.K. startup for $1 billion"]],
    "truncate": True,
    "truncation_direction": "Right",
    "raw_scores": False,
    "aggregation_strategy": "max",
}


def record(line: str) -> None:
    """Keep a parity figure for the summary printed after the tests."""
    PARITY.append(line)


def pytest_sessionfinish(session) -> None:
    """Under pytest-xdist (make test runs two workers): a worker hands its figures to the controller."""
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput["parity"] = list(PARITY)


def pytest_testnodedown(node, error) -> None:
    """The controller gathers each worker's figures (pytest-xdist's hook)."""
    PARITY.extend(getattr(node, "workeroutput", {}).get("parity", []))


def pytest_terminal_summary(terminalreporter) -> None:
    if PARITY:
        terminalreporter.section("parity figures")
        for line in PARITY:
            terminalreporter.write_line(line)


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "stress: long load/fault runs (make stress)")


def pytest_collection_modifyitems(config, items) -> None:
    if config.getoption("-m") != "stress":
        skip = pytest.mark.skip(reason="stress test: run with `make stress`")
        for item in items:
            if "stress" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory) -> None:
    """Exports land in a fresh cache per run, so every run really exports and checks: the derived-artefact
    cache defaults to HF_HOME/nerserve (Settings.cache_dir), and every server the tests start inherits it.
    pytest-xdist's workers share the run's one (beside their own temporary folders): a checkpoint is
    exported once per run, and two workers exporting it at once each rename a whole file into place."""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    home = shared / "hf-home"
    home.mkdir(exist_ok=True)
    os.environ["HF_HOME"] = str(home)


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    """kind -> folder of a checkpoint built by tests/checkpoints.py (built once per run)."""
    cache: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in cache:
            cache[kind] = checkpoints.build(kind, tmp_path_factory.mktemp(kind))
        return cache[kind]

    return get


def real_checkpoint() -> Path:
    if not REAL_CHECKPOINT.is_dir():
        pytest.skip(f"the shared real checkpoint is absent ({REAL_CHECKPOINT}); it lives in ../shared beside the repo")
    return REAL_CHECKPOINT


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """`python -m nerserve serve` as a real process on a free port. `settings` maps setting names
    (CHECKPOINT, ENGINE, ...) to values, given to the server as NERSERVE_<NAME>. The environment's
    PORT is set to another port, as a platform sets it for its own proxy: the server must not use it."""

    def __init__(
        self, settings: dict[str, str], cwd: Path = ROOT, args: list[str] | None = None, port: int | None = None
    ) -> None:
        """`args`: the command line after `serve`; `port`: where to listen (default a free one; a restarted
        server is given its predecessor's)."""
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        full_env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("NERSERVE_")},
            "PYTHONPATH": f"{ROOT / 'packages'}",
            "PORT": str(free_port()),
            "NERSERVE_PORT": str(self.port),
            "NERSERVE_CONFIG": str(ROOT / "config.yaml"),
            # no drain phase to wait out when a test stops its server: the tests of the drain set their own
            "NERSERVE_SHUTDOWN_GRACE_S": "0",
            **{f"NERSERVE_{name.upper()}": value for name, value in settings.items()},
        }
        self.log_path = Path(os.environ["HF_HOME"]) / f"server-{self.port}.log"
        with open(self.log_path, "w") as log:  # the server keeps its own copy of the descriptor
            self.process = subprocess.Popen(
                [sys.executable, "-m", "nerserve", "serve", *(args or [])],
                cwd=cwd,
                env=full_env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}: {self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not ready in {timeout}s: {self.output()}")

    def output(self, tail: int | None = 4000) -> str:
        """The server's log so far (its last `tail` characters; None: all of it)."""
        text = self.log_path.read_text(errors="replace")
        return text if tail is None else text[-tail:]

    def stop(self) -> bool:
        """SIGTERM, as an orchestrator stops it; True when it shut down gracefully (uvicorn re-raises the
        signal after its graceful shutdown, so the exit status is -SIGTERM)."""
        started = time.monotonic()
        self.process.terminate()
        code = self.process.wait(timeout=60)
        self.stop_seconds = time.monotonic() - started
        return code in (0, -signal.SIGTERM) and "shutdown complete" in self.output()


@pytest.fixture(scope="session")
def server(built):
    """A server on the cased WordPiece checkpoint with two workers, shared by the test modules that ask
    (a module may define its own `server` with other settings)."""
    process = ServerProcess({"CHECKPOINT": str(built("wordpiece-cased")), "ENGINE": "onnxruntime", "WORKERS": "2"})
    process.wait_ready()
    yield process
    process.stop()
