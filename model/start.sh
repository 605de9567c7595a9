#!/bin/sh
# Start command of the Truss image (config.yaml: docker_server.start_command).
#
# Truss lays the image out as /app/config.yaml, /app/model (this folder), /app/data and /packages
# (packages/, so `-m nerserve` is the nerserve command). `nerserve.export.startup`
# decides whether the server gets a TensorRT engine (engine auto or tensorrt, no engine_dir set, a GPU
# and TensorRT present): the folder shipped in data/engine or the cached one when it fits this
# checkpoint, GPU, TensorRT, precision and batch budget, else one built here into the engine cache
# (NERSERVE_ENGINE_CACHE_DIR, default b10cache's /cache/model/nerserve-engines). Then this execs the
# server, which answers /health 503 until its model is loaded and warm.
#
# The build runs before the server listens (minutes for a BERT-base; it prints its progress), so
# Baseten's startup probe waits on a closed port meanwhile (30 min by default; runtime.health_checks
# can raise it). A checkpoint that cannot be had ends this script at once with one line saying why:
# the container stops (supervisord runs this once) rather than answering 503 for ever.
set -eu

# config.yaml's environment_variables put /packages on PYTHONPATH and name /app/config.yaml.
cd "$(dirname "$0")/.."
export NERSERVE_CONFIG="${NERSERVE_CONFIG:-$PWD/config.yaml}"
PYTHON="${PYTHON_EXECUTABLE:-python3}"

# Baseten mounts secrets as files; huggingface_hub and nerserve read HF_TOKEN.
secret="${NERSERVE_SECRETS_DIR:-/secrets}/hf_access_token"
if [ -z "${HF_TOKEN:-}" ] && [ -s "$secret" ]; then
    HF_TOKEN=$(cat "$secret")
    export HF_TOKEN
fi

engine_dir="" build_dir="" checkpoint="" precision="" max_num_tokens=""
choice=$("$PYTHON" -m nerserve.export.startup)
eval "$choice"

if [ -n "$build_dir" ]; then
    # Build beside the target and rename into place, so no replica reads a half-built engine;
    # of concurrent builds of one key, the first to finish is kept.
    tmp=$(mktemp -d "$(dirname "$build_dir")/.build-XXXXXX")
    echo "start.sh: building a TensorRT engine into $build_dir" >&2
    if "$PYTHON" -m nerserve build-engine --checkpoint "$checkpoint" --max-num-tokens "$max_num_tokens" \
        ${precision:+--precision "$precision"} --out "$tmp"; then
        if [ -e "$build_dir" ]; then rm -rf "$tmp"; else mv "$tmp" "$build_dir"; fi
        engine_dir="$build_dir"
    else
        # Serve anyway: engine auto falls back to PyTorch on CUDA (engine tensorrt fails loudly).
        echo "start.sh: engine build failed; starting without it" >&2
        rm -rf "$tmp"
    fi
fi
if [ -n "$engine_dir" ]; then
    NERSERVE_ENGINE_DIR="$engine_dir"
    export NERSERVE_ENGINE_DIR
fi

exec "$PYTHON" -m nerserve serve
