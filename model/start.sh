#!/bin/sh
# Start command of the Truss image (config.yaml: docker_server.start_command).
#
# Truss lays the image out as /app/config.yaml, /app/model (this folder), /app/data and /packages
# (packages/ plus build/'s files, so `-m build_engine` is build/build_engine.py). With engine auto
# or tensorrt, no engine_dir set, and a GPU and TensorRT present, the server gets a TensorRT engine
# for this checkpoint, GPU and TensorRT version: data/engine when its manifest says it fits, else
# one from the engine cache, built there first when missing. Then this execs the server.
#
# The build runs before the server starts (minutes for a BERT-base), so during it the port is
# closed and Baseten's startup probe (30 min by default, runtime.health_checks can raise it) waits;
# /health answers 503 from the moment the server listens until its model is loaded and warm.
# Building inside the server would make /health say 503 during the build too, at the cost of
# engine-building code in the server process.
#
# Engine cache: $ENGINE_CACHE_DIR, default /cache/model/nerserve-engines: Baseten's b10cache
# deployment scope, which survives restarts and is shared by the deployment's replicas. Where
# b10cache is off, /cache is not writable and the cache falls back to ~/.cache/nerserve-engines,
# which lives as long as the container: every start then builds again.
set -eu

cd "$(dirname "$0")/.."
export NERSERVE_CONFIG="${NERSERVE_CONFIG:-$PWD/config.yaml}"
export PYTHONPATH="/packages${PYTHONPATH:+:$PYTHONPATH}"
PYTHON="${PYTHON_EXECUTABLE:-python3}"

# Baseten mounts secrets as files; huggingface_hub and nerserve read HF_TOKEN.
if [ -z "${HF_TOKEN:-}" ] && [ -s /secrets/hf_access_token ]; then
    HF_TOKEN=$(cat /secrets/hf_access_token)
    export HF_TOKEN
fi

# The settings (config.yaml + environment) and this machine's GPU and TensorRT, as shell
# assignments; `key` names the engine to use and stays empty where none should be built.
plan=$("$PYTHON" - <<'PY'
import dataclasses, hashlib, os, shlex
import yaml
from nerserve.config import Settings
from nerserve.manifest import current_platform, read_manifest

with open(os.environ["NERSERVE_CONFIG"]) as f:
    s = Settings.load((yaml.safe_load(f) or {}).get("model_metadata"))
here = current_platform()
key = ""
if s.engine in ("auto", "tensorrt") and not s.engine_dir and here.has_gpu and here.tensorrt_version:
    what = [s.checkpoint, s.revision or "", s.precision or "", str(s.max_num_tokens),
            *map(str, dataclasses.astuple(here))]
    key = hashlib.sha256("\n".join(what).encode()).hexdigest()[:16]


def fits(engine_dir):
    # The cheap half of the server's check (it verifies hashes at load): a plan for this GPU.
    try:
        manifest = read_manifest(engine_dir)
    except ValueError:
        return False
    return ("tensorrt" in manifest["artefacts"] and manifest["gpu"] == dataclasses.asdict(here)
            and manifest["checkpoint"]["id"] == s.checkpoint)


baked = "data/engine" if key and fits("data/engine") else ""
for name, value in dict(key=key, baked=baked, checkpoint=s.checkpoint, revision=s.revision or "",
                        precision=s.precision or "", max_num_tokens=s.max_num_tokens).items():
    print(f"{name}={shlex.quote(str(value))}")
PY
)
eval "$plan"

if [ -n "$baked" ]; then
    ENGINE_DIR="$PWD/$baked"
    export ENGINE_DIR
elif [ -n "$key" ]; then
    cache="${ENGINE_CACHE_DIR:-/cache/model/nerserve-engines}"
    mkdir -p "$cache" 2>/dev/null || cache="${HOME:-/tmp}/.cache/nerserve-engines"
    mkdir -p "$cache"
    if [ ! -f "$cache/$key/manifest.json" ]; then
        # Build beside the target and rename into place, so no replica reads a half-built engine;
        # of concurrent builds of one key, the first to finish is kept.
        tmp=$(mktemp -d "$cache/.build-$key-XXXXXX")
        echo "start.sh: building a TensorRT engine into $cache/$key" >&2
        if "$PYTHON" -m build_engine --checkpoint "$checkpoint" \
            ${revision:+--revision "$revision"} --max-num-tokens "$max_num_tokens" \
            ${precision:+--precision "$precision"} --out "$tmp"; then
            if [ -e "$cache/$key" ]; then rm -rf "$tmp"; else mv "$tmp" "$cache/$key"; fi
        else
            # Serve anyway: engine auto falls back to PyTorch on CUDA (tensorrt fails loudly).
            echo "start.sh: engine build failed; starting without it" >&2
            rm -rf "$tmp"
        fi
    fi
    if [ -f "$cache/$key/manifest.json" ]; then
        ENGINE_DIR="$cache/$key"
        export ENGINE_DIR
    fi
fi

exec "$PYTHON" -m nerserve.server
