"""The Truss package: config.yaml as `truss push` validates it, the image Truss builds from this repo,
the container start script, and the Model class used in-process (`truss.load(".").predict`)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import truss
import yaml
from packaging.requirements import Requirement
from truss.base.truss_config import TrussConfig

from conftest import SEED, free_port
from nerserve import engine_folder as manifest_lib
from nerserve.checkpoint import load_checkpoint
from nerserve.platform import Platform

REPO = Path(__file__).resolve().parent.parent
SETTINGS = (
    "checkpoint",
    "revision",
    "engine",
    "engine_dir",
    "precision",
    "max_num_tokens",
    "window_stride",
    "max_texts",
    "max_body_bytes",
    "queue_size",
    "batch_wait_ms",
    "request_timeout_s",
    "api_key",
    "port",
)
# What start.sh and the server need in the image (APP_HOME is /app, packages/ goes to /packages).
IMAGE_PATHS = {
    "/app/model/start.sh": "model/start.sh",
    "/app/config.yaml": "config.yaml",
    "/packages/nerserve/server.py": "packages/nerserve/server.py",
    "/packages/nerserve/__main__.py": "packages/nerserve/__main__.py",
}


@pytest.fixture(autouse=True, scope="module")
def _package_modules_restored():
    """truss.load imports the package anew (model/model.py puts packages/ on the path), replacing this
    process's `nerserve` modules; put them back after this file, so the files run after it on the same
    pytest-xdist worker keep one copy of each class (multiprocessing pickles a class by its name)."""
    saved = {name: module for name, module in sys.modules.items() if name.split(".")[0] == "nerserve"}
    yield
    for name in [name for name in sys.modules if name.split(".")[0] == "nerserve"]:
        del sys.modules[name]
    sys.modules.update(saved)


def _truss_cli() -> str:
    """The `truss` executable of the environment running the tests (make test: .venv)."""
    beside = Path(sys.executable).parent / "truss"
    return str(beside) if beside.exists() else shutil.which("truss") or pytest.fail("no truss CLI installed")


def _pins(lines: list[str]) -> dict[str, Requirement]:
    """name -> requirement for the package lines of a requirements list (option lines skipped)."""
    reqs = [Requirement(line) for line in lines if line.strip() and not line.lstrip().startswith(("-", "#"))]
    return {req.name.lower().replace("_", "-"): req for req in reqs}


# --- config.yaml, validated as `truss push` does --------------------------------------------------------


def test_config_passes_push_validation():
    # `truss push` loads the folder (TrussHandle validates it) and, before uploading, re-parses the
    # config with extra fields forbidden (BasetenRemote._prepare_push -> validate_forbid_extra).
    handle = truss.load(str(REPO))
    config = handle.spec.config
    config.validate_forbid_extra()

    server = config.docker_server
    assert (server.predict_endpoint, server.readiness_endpoint, server.liveness_endpoint) == (
        "/predict_tokens",
        "/health",
        "/health",
    )
    assert server.server_port == config.model_metadata["port"] != 8080  # 8080 is Baseten's proxy
    assert config.resources.accelerator.accelerator.value == "H100"
    assert "hf_access_token" in config.secrets
    assert set(SETTINGS) <= set(config.model_metadata)
    assert config.model_metadata["example_model_input"] == SEED


@pytest.mark.parametrize("extra", [{"not_a_truss_field": 1}, {"docker_server": {"unknown_key": 1}}])
def test_push_validation_rejects_unknown_fields(tmp_path, extra):
    data = yaml.safe_load((REPO / "config.yaml").read_text())
    for name, value in extra.items():
        data[name] = {**data[name], **value} if isinstance(value, dict) else value
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(data))
    config = TrussConfig.from_yaml(tmp_path / "config.yaml")  # the parse truss.load does: still lenient
    with pytest.raises(ValueError, match="Extra fields not allowed"):
        config.validate_forbid_extra()


def test_image_pins_match_runtime_pins():
    # requirements.txt is the local runtime; the image must install the very same versions.
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    image = _pins(config["requirements"])
    for command in config.get("build_commands", []):
        image.update(_pins([word for word in command.split() if "==" in word]))
    local = _pins((REPO / "requirements.txt").read_text().splitlines())
    assert {name: str(req) for name, req in local.items() if name != "torch"} == {
        name: str(image[name]) for name in local if name != "torch" and name in image
    }
    assert not set(local) - set(image), "pins of requirements.txt missing from config.yaml"


# --- the build context Truss generates (no Docker needed) -----------------------------------------------


@pytest.fixture(scope="module")
def context(tmp_path_factory) -> Path:
    """`truss image build-context` run on a copy of the repo holding a locally built engine folder, as
    after `make build-engine`: data/ is ignored by git, so a fresh clone may not have it at all."""
    root = tmp_path_factory.mktemp("truss")
    repo = root / "repo"
    shutil.copytree(REPO, repo, ignore=shutil.ignore_patterns(".git", ".venv", "__pycache__", ".pytest_cache"))
    (repo / "data" / "engine").mkdir(parents=True, exist_ok=True)
    (repo / "data" / "engine" / "manifest.json").write_text("{}")
    env = {**os.environ, "HOME": str(root / "home")}  # truss writes its gathered copy under ~/.truss
    subprocess.run(
        [_truss_cli(), "image", "build-context", str(root / "context"), "."],
        cwd=repo,
        env=env,
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return root / "context"


def test_context_copies_the_project_into_the_image(context):
    dockerfile = (context / "Dockerfile").read_text()
    assert "ENV APP_HOME=/app" in dockerfile
    for copy in (
        "./data ${APP_HOME}/data",
        "./model ${APP_HOME}/model",
        "./packages /packages",
        "./config.yaml ${APP_HOME}/config.yaml",
    ):
        assert f" {copy}\n" in dockerfile + "\n", f"Dockerfile lacks COPY {copy}"
    assert (context / "data" / "engine" / "manifest.json").is_file()
    # build/ is the toolchain's door for people; the image's start runs the same builder from packages/
    for folder, into in (("model", "model"), ("packages", "packages")):
        for path in (REPO / folder).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts:
                assert (context / into / path.relative_to(REPO / folder)).is_file(), f"{path} not in the image"


def test_start_command_finds_its_files(context):
    config = yaml.safe_load((context / "config.yaml").read_text())
    supervisord = (context / "supervisord.conf").read_text()
    assert f"command = {config['docker_server']['start_command']}\n" in supervisord
    assert config["docker_server"]["start_command"] == "sh /app/model/start.sh"
    env = config["environment_variables"]
    assert (env["PYTHONPATH"], env["NERSERVE_CONFIG"]) == ("/packages", "/app/config.yaml")
    for in_image, in_context in IMAGE_PATHS.items():
        assert (context / in_context).is_file(), f"{in_image} will not exist in the image"
    proxy = (context / "proxy.conf").read_text()
    assert "rewrite ^/v1/models/model:predict$ /predict_tokens break;" in proxy
    assert "proxy_pass http://127.0.0.1:8000;" in proxy


def test_requirements_install_under_truss_constraints(context):
    # Truss installs config.yaml's requirements with `-c constraints.txt` (its server's bounds).
    constraints = _pins((context / "constraints.txt").read_text().splitlines())
    for name, req in _pins((context / "requirements.txt").read_text().splitlines()).items():
        if name in constraints:
            pinned = next(iter(req.specifier)).version
            assert constraints[name].specifier.contains(pinned), f"{req} breaks Truss's constraint {constraints[name]}"


# --- the image's start command, run as the platform runs it ----------------------------------------------


@pytest.fixture
def image(context, tmp_path) -> Path:
    """The image's file system as Truss's Dockerfile lays it out, from the build context: /app (config.yaml,
    model/, data/) and /packages, under tmp_path instead of /."""
    root = tmp_path / "image"
    (root / "app").mkdir(parents=True)
    for name in ("config.yaml", "model", "data"):
        source = context / name
        (shutil.copytree if source.is_dir() else shutil.copy)(source, root / "app" / name)
    shutil.copytree(context / "packages", root / "packages")
    return root


def _platform_start(image: Path, tmp_path: Path, **settings: str) -> tuple[subprocess.Popen, int, socket.socket]:
    """Run docker_server.start_command as supervisord does, with what the platform adds: PORT (taken by
    its proxy: here a listener of ours) and HOSTNAME, the secrets mounted as files, config.yaml's
    environment_variables. Paths under / are moved under `image`. Returns (process, server port, proxy)."""
    config = yaml.safe_load((image / "app" / "config.yaml").read_text())

    def moved(value: str) -> str:
        return value.replace("/app", str(image / "app")).replace("/packages", str(image / "packages"))

    proxy = socket.socket()
    proxy.bind(("127.0.0.1", 0))
    proxy.listen()
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "hf_access_token").write_text("hf_platform_secret\n")
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("NERSERVE_", "HF_"))},
        "HF_HOME": os.environ["HF_HOME"],  # the run's fresh cache (conftest): not a token, not a setting
        **{name: moved(str(value)) for name, value in config["environment_variables"].items()},
        "PORT": str(proxy.getsockname()[1]),
        "HOSTNAME": "ner-predict-tokens-7d9f-abcde",
        "NERSERVE_SECRETS_DIR": str(secrets),
        "PYTHON_EXECUTABLE": sys.executable,  # the image's python3
        "NERSERVE_PORT": str(port),  # config.yaml's 8000 may be taken on a test machine
        **{f"NERSERVE_{name.upper()}": value for name, value in settings.items()},
    }
    command = moved(config["docker_server"]["start_command"]).split()
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return process, port, proxy


def test_start_command_serves_on_its_own_port_beside_the_platforms(image, tmp_path):
    from checkpoints import build

    checkpoint = build("wordpiece-cased", tmp_path / "ckpt")
    process, port, proxy = _platform_start(image, tmp_path, checkpoint=str(checkpoint), engine="onnxruntime")
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and process.poll() is None:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            time.sleep(0.3)
        assert process.poll() is None, process.stdout.read() if process.stdout else ""
        assert httpx.get(f"http://127.0.0.1:{port}/health").json() == {"status": "ok"}
        answer = httpx.post(f"http://127.0.0.1:{port}/predict_tokens", json=SEED, timeout=30)
        assert answer.status_code == 200 and len(answer.json()) == 1
        # start.sh exec'd the server (same pid), with the mounted secret as the hub token.
        environ = Path(f"/proc/{process.pid}/environ").read_bytes().split(b"\0")
        assert b"HF_TOKEN=hf_platform_secret" in environ
        assert proxy.fileno() != -1  # the platform's port is still its proxy's
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=30)
        proxy.close()
    assert process.returncode == 0 and "shutdown complete" in output, output[-2000:]


def test_start_command_with_a_checkpoint_that_cannot_load_exits_naming_why(image, tmp_path):
    started = time.monotonic()
    process, _, proxy = _platform_start(image, tmp_path, checkpoint="nerserve-tests/no-such-model")
    try:
        output, _ = process.communicate(timeout=60)
    finally:
        proxy.close()
    assert process.returncode != 0 and time.monotonic() - started < 60
    last = output.strip().splitlines()[-1]
    assert last.startswith("nerserve: cannot load the model: CheckpointUnavailable: cannot load checkpoint")
    assert "'nerserve-tests/no-such-model'" in last and "make serve CHECKPOINT=/path/to/folder" in last
    assert "Traceback" not in output


# --- model/start.sh's engine decision, with a simulated GPU ---------------------------------------------


GPU = Platform("NVIDIA H100 80GB HBM3", "9.0", "10.16.1.11")


@pytest.fixture
def app(tmp_path) -> Path:
    """An /app-like folder (config.yaml, model/start.sh) plus a fake `python`: `-m nerserve serve` prints
    the engine folder it would serve instead of serving; everything else runs for real, with torch seeing
    an H100 and `tensorrt` importable, and `-m nerserve build-engine` writing a stand-in plan and a real
    manifest."""
    app = tmp_path / "app"
    (app / "model").mkdir(parents=True)
    shutil.copy(REPO / "config.yaml", app)
    shutil.copy(REPO / "model" / "start.sh", app / "model")
    fakes = tmp_path / "fakes"
    fakes.mkdir()
    (fakes / "tensorrt.py").write_text(f"__version__ = {GPU.tensorrt_version!r}\n")
    (fakes / "sitecustomize.py").write_text(
        "import torch\ntorch.cuda.is_available = lambda: True\n"
        f"torch.cuda.get_device_name = lambda i=0: {GPU.gpu_name!r}\n"
        "torch.cuda.get_device_capability = lambda i=0: (9, 0)\n"
    )
    (fakes / "build_engine.py").write_text(_FAKE_BUILD.replace("BUILDS_LOG", repr(str(tmp_path / "builds.log"))))
    python = tmp_path / "python"
    python.write_text(
        '#!/bin/sh\nif [ "$1 $2 $3" = "-m nerserve serve" ]; then\n'
        '  echo "ENGINE_DIR=${NERSERVE_ENGINE_DIR:-}"; exit 0\nfi\n'
        'if [ "$1 $2 $3" = "-m nerserve build-engine" ]; then\n'
        f'  shift 3; exec {sys.executable} {fakes / "build_engine.py"} "$@"\nfi\n'
        f'exec {sys.executable} "$@"\n'
    )
    python.chmod(0o755)
    return app


# The fake build: logs its arguments, writes a stand-in plan and ONNX, and the manifest the real build writes.
_FAKE_BUILD = """
import argparse, json, pathlib, sys
from nerserve import engine_folder as manifest
from nerserve.checkpoint import load_checkpoint
from nerserve.platform import current_platform
p = argparse.ArgumentParser()
p.add_argument("--checkpoint"); p.add_argument("--precision")
p.add_argument("--max-num-tokens", type=int); p.add_argument("--out", type=pathlib.Path)
a = p.parse_args()
open(BUILDS_LOG, "a").write(json.dumps(sys.argv[1:]) + "\\n")
for name in ("model.plan", "model.ort.onnx"):
    (a.out / name).write_bytes(b"stand-in " + name.encode())
manifest.write_manifest(a.out, load_checkpoint(a.checkpoint), None, precision=a.precision or "fp16",
    max_num_tokens=a.max_num_tokens, platform=current_platform(),
    artefacts={"onnxruntime": {"file": "model.ort.onnx", "precision": "fp32"},
               "tensorrt": {"file": "model.plan", "precision": a.precision or "fp16"}})
"""


def _start(app: Path, gpu: bool = True, **settings: str) -> tuple[str, list[list[str]]]:
    """Run start.sh; return the engine folder the server would get and the engine builds it ran."""
    root = app.parent
    environ = {
        **{k: v for k, v in os.environ.items() if not k.startswith("NERSERVE_")},
        "PYTHON_EXECUTABLE": str(root / "python"),
        "NERSERVE_ENGINE_CACHE_DIR": str(root / "cache"),
        "PYTHONPATH": os.pathsep.join([*([str(root / "fakes")] if gpu else []), str(REPO / "packages")]),
        **{f"NERSERVE_{name.upper()}": value for name, value in settings.items()},
    }
    done = subprocess.run(
        ["sh", str(app / "model" / "start.sh")], env=environ, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    log = root / "builds.log"
    builds = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return done.stdout.strip().removeprefix("ENGINE_DIR="), builds


def test_start_builds_the_engine_once_into_the_cache(app, built):
    checkpoint = str(built("wordpiece-cased"))
    engine_dir, builds = _start(app, checkpoint=checkpoint)
    assert Path(engine_dir).parent == app.parent / "cache" and (Path(engine_dir) / "manifest.json").is_file()
    assert len(builds) == 1 and builds[0][builds[0].index("--max-num-tokens") + 1] == "16384"
    again, builds = _start(app, checkpoint=checkpoint)  # a restart finds the cached engine
    assert (again, len(builds)) == (engine_dir, 1)
    other, builds = _start(app, checkpoint=str(built("wordpiece-uncased")))  # another checkpoint: its own
    assert other != engine_dir and len(builds) == 2
    bigger, builds = _start(app, checkpoint=checkpoint, max_num_tokens="32768")  # another budget: its own
    assert bigger not in (engine_dir, other) and len(builds) == 3


def test_start_uses_a_fitting_engine_shipped_in_data(app, built, tmp_path):
    checkpoint = built("wordpiece-cased")
    shipped = app / "data" / "engine"

    def ship(platform: Platform, max_num_tokens: int = 16384, precision: str = "fp16") -> None:
        shutil.rmtree(shipped, ignore_errors=True)
        shipped.mkdir(parents=True)
        for name in ("model.plan", "model.ort.onnx"):
            (shipped / name).write_bytes(b"stand-in")
        manifest_lib.write_manifest(
            shipped,
            load_checkpoint(str(checkpoint)),
            None,
            precision=precision,
            max_num_tokens=max_num_tokens,
            platform=platform,
            artefacts={
                "onnxruntime": {"file": "model.ort.onnx", "precision": "fp32"},
                "tensorrt": {"file": "model.plan", "precision": precision},
            },
        )

    ship(GPU)
    assert _start(app, checkpoint=str(checkpoint)) == (str(shipped), [])
    ship(GPU, max_num_tokens=8192)  # built for a smaller budget: served, the server lowering its budget to it
    assert _start(app, checkpoint=str(checkpoint)) == (str(shipped), [])
    ship(dataclasses.replace(GPU, tensorrt_version="10.13.3.9"))  # built by another TensorRT: rebuild
    engine_dir, builds = _start(app, checkpoint=str(checkpoint))
    assert Path(engine_dir).parent == app.parent / "cache" and len(builds) == 1
    ship(GPU, precision="bf16")  # another precision than asked for: a build of the one asked for
    fp16_dir, builds = _start(app, checkpoint=str(checkpoint), precision="fp16")
    assert Path(fp16_dir).parent == app.parent / "cache" and builds[-1][-4:-2] == ["--precision", "fp16"]


def test_start_builds_nothing_without_a_gpu_or_for_another_engine(app, built):
    checkpoint = str(built("wordpiece-cased"))
    assert _start(app, gpu=False, checkpoint=checkpoint) == ("", [])  # this machine: no CUDA GPU, no tensorrt
    assert _start(app, checkpoint=checkpoint, engine="torch") == ("", [])


# --- the Model class in-process --------------------------------------------------------------------------


def test_truss_load_predicts_in_process(tmp_path, monkeypatch):
    if not (REPO / "model" / "model.py").exists():
        pytest.skip("model/model.py (the Truss Model class) is not written yet")
    from checkpoints import build

    monkeypatch.setenv("NERSERVE_CHECKPOINT", str(build("wordpiece-uncased", tmp_path / "ckpt")))
    monkeypatch.setenv("NERSERVE_ENGINE", "torch")  # CPU here; auto would export ONNX first
    out = truss.load(str(REPO)).predict(SEED)
    text = SEED["inputs"][0][0]
    assert isinstance(out, list) and len(out) == 1 and isinstance(out[0], list)
    for item in out[0]:
        assert set(item) == {"token", "token_id", "start", "end", "results"}
        assert item["token"] == text[item["start"] : item["end"]] and item["token_id"] == 0
        assert item["results"] and all(isinstance(v, float) for v in item["results"].values())
