"""The Truss package: config.yaml as `truss push` validates it, the image Truss builds from this repo,
the container start script, and the Model class used in-process (`truss.load(".").predict`)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import truss
import yaml
from packaging.requirements import Requirement
from truss.base.truss_config import TrussConfig

REPO = Path(__file__).resolve().parent.parent
SEED = {
    "inputs": [["Apple is looking at buying U.K. startup for $1 billion"]],
    "truncate": True,
    "truncation_direction": "Right",
    "raw_scores": False,
    "aggregation_strategy": "max",
}
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
    "/packages/build_engine.py": "packages/build_engine.py",
    "/packages/nerserve/server.py": "packages/nerserve/server.py",
}


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
    for folder, into in (("model", "model"), ("packages", "packages"), ("build", "packages")):
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


# --- model/start.sh, run with a fake GPU ----------------------------------------------------------------


@pytest.fixture
def app(tmp_path) -> Path:
    """An /app-like folder (config.yaml, model/start.sh) plus a fake python: `-m nerserve.server` prints
    ENGINE_DIR instead of serving, build_engine writes a manifest and logs its arguments."""
    app = tmp_path / "app"
    (app / "model").mkdir(parents=True)
    shutil.copy(REPO / "config.yaml", app)
    shutil.copy(REPO / "model" / "start.sh", app / "model")
    fakes = tmp_path / "fakes"
    fakes.mkdir()
    (fakes / "build_engine.py").write_text(
        "import argparse, json, pathlib, sys\n"
        "p = argparse.ArgumentParser(); p.add_argument('--checkpoint'); p.add_argument('--revision')\n"
        "p.add_argument('--max-num-tokens'); p.add_argument('--precision'); p.add_argument('--out')\n"
        "a = p.parse_args()\n"
        f"open({str(tmp_path / 'builds.log')!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
        "(pathlib.Path(a.out) / 'manifest.json').write_text('{}')\n"
    )
    python = tmp_path / "python"
    python.write_text(
        '#!/bin/sh\nif [ "$1 $2" = "-m nerserve.server" ]; then\n'
        '  echo "ENGINE_DIR=${ENGINE_DIR:-}"; exit 0\nfi\n'
        f'exec {sys.executable} "$@"\n'
    )
    python.chmod(0o755)
    return app


GPU = {"gpu_name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "tensorrt_version": "10.16.1.11"}


def _with_gpu(fakes: Path) -> None:
    """Make torch see an H100 and `tensorrt` importable, for the start script's Python only."""
    (fakes / "tensorrt.py").write_text(f"__version__ = {GPU['tensorrt_version']!r}\n")
    (fakes / "sitecustomize.py").write_text(
        "import torch\ntorch.cuda.is_available = lambda: True\n"
        f"torch.cuda.get_device_name = lambda i=0: {GPU['gpu_name']!r}\n"
        "torch.cuda.get_device_capability = lambda i=0: (9, 0)\n"
    )


def _start(app: Path, **env: str) -> tuple[str, list[list[str]]]:
    """Run start.sh; return the ENGINE_DIR the server would get and the engine builds it ran."""
    root = app.parent
    inherited = {
        k: v for k, v in os.environ.items() if k not in ("NERSERVE_CONFIG", "ENGINE", "ENGINE_DIR", "CHECKPOINT")
    }
    environ = {
        **inherited,
        "PYTHON_EXECUTABLE": str(root / "python"),
        "ENGINE_CACHE_DIR": str(root / "cache"),
        "PYTHONPATH": f"{root / 'fakes'}:{REPO / 'packages'}",
        **env,
    }
    done = subprocess.run(
        ["sh", str(app / "model" / "start.sh")], env=environ, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    log = root / "builds.log"
    builds = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return done.stdout.strip().removeprefix("ENGINE_DIR="), builds


def test_start_builds_the_engine_once_into_the_cache(app):
    _with_gpu(app.parent / "fakes")
    engine_dir, builds = _start(app, CHECKPOINT="some/ner-model")
    assert Path(engine_dir).parent == app.parent / "cache" and (Path(engine_dir) / "manifest.json").is_file()
    assert len(builds) == 1 and builds[0][:2] == ["--checkpoint", "some/ner-model"]
    assert builds[0][builds[0].index("--max-num-tokens") + 1] == "16384"
    again, builds = _start(app, CHECKPOINT="some/ner-model")  # a restart finds the cached engine
    assert (again, len(builds)) == (engine_dir, 1)
    other, builds = _start(app, CHECKPOINT="other/ner-model")  # another checkpoint gets its own
    assert other != engine_dir and len(builds) == 2


def test_start_uses_a_fitting_engine_shipped_in_data(app):
    _with_gpu(app.parent / "fakes")
    (app / "data" / "engine").mkdir(parents=True)
    manifest = {
        "format": 1,
        "artefacts": {"tensorrt": {}},
        "gpu": GPU,
        "checkpoint": {"id": "dslim/bert-base-NER-uncased"},
    }
    (app / "data" / "engine" / "manifest.json").write_text(json.dumps(manifest))
    assert _start(app) == (str(app / "data" / "engine"), [])
    manifest["gpu"] = {**GPU, "tensorrt_version": "10.13.3.9"}  # built by another TensorRT: rebuild
    (app / "data" / "engine" / "manifest.json").write_text(json.dumps(manifest))
    engine_dir, builds = _start(app)
    assert Path(engine_dir).parent == app.parent / "cache" and len(builds) == 1


def test_start_builds_nothing_without_a_gpu_or_for_another_engine(app):
    assert _start(app) == ("", [])  # this machine: no CUDA GPU, no tensorrt
    _with_gpu(app.parent / "fakes")
    assert _start(app, ENGINE="torch") == ("", [])


# --- the Model class in-process --------------------------------------------------------------------------


def test_truss_load_predicts_in_process(tmp_path, monkeypatch):
    if not (REPO / "model" / "model.py").exists():
        pytest.skip("model/model.py (the Truss Model class) is not written yet")
    from checkpoints import build

    monkeypatch.setenv("CHECKPOINT", str(build("wordpiece-uncased", tmp_path / "ckpt")))
    monkeypatch.setenv("ENGINE", "torch")  # CPU here; auto would export ONNX first
    out = truss.load(str(REPO)).predict(SEED)
    text = SEED["inputs"][0][0]
    assert isinstance(out, list) and len(out) == 1 and isinstance(out[0], list)
    for item in out[0]:
        assert set(item) == {"token", "token_id", "start", "end", "results"}
        assert item["token"] == text[item["start"] : item["end"]] and item["token_id"] == 0
        assert item["results"] and all(isinstance(v, float) for v in item["results"].values())
