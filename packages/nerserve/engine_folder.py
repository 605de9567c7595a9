"""`manifest.json`: what an engine folder was built from and for, so a server never serves the wrong one.

An engine folder is built once and served many times, possibly on another machine. Its manifest
records the checkpoint it came from (content hash, labels, tokenizer files), the shapes it accepts,
the precision, the TensorRT profiles, the library versions and GPU it was built with, and the sha256
of every file in it. `verify` refuses, with the reason in the message, a folder whose checkpoint,
files, GPU or TensorRT version do not match; `load_engine_dir` is what the server calls."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import json
import time
from pathlib import Path
from typing import Any, NamedTuple

from .checkpoint import Checkpoint
from .config import AUTO, Runtime
from .platform import Platform, current_platform

MANIFEST_NAME = "manifest.json"
FORMAT = 1
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "merges.txt",
    "vocab.json",
    "sentencepiece.bpe.model",
    "spiece.model",
)


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in blocks (engine files run to hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def library_versions() -> dict[str, str | None]:
    """Versions of what produced the artefacts: a rebuild with other versions can give other numbers."""
    versions: dict[str, str | None] = {}
    for package in ("torch", "transformers", "onnx", "onnxruntime"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def write_manifest(
    out_dir: Path,
    checkpoint: Checkpoint,
    revision: str | None,
    *,
    precision: str,
    max_num_tokens: int,
    artefacts: dict[str, dict[str, str]],
    profiles: list[tuple[tuple[int, int], ...]] | None = None,
    platform: Platform | None = None,
    parity: dict[str, Any] | None = None,
) -> Path:
    """Write `out_dir/manifest.json` describing the files now in `out_dir`.

    `artefacts` maps an engine kind ("onnxruntime", "tensorrt") to {"file": name, "precision": p}:
    the file that kind serves. `platform` is recorded only when a TensorRT plan was built (the ONNX
    files run anywhere). Every other file in the folder is hashed so any change is detected."""
    tokenizer_files = {
        name: file_sha256(checkpoint.path / name) for name in _TOKENIZER_FILES if (checkpoint.path / name).is_file()
    }
    files = {
        p.name: file_sha256(p)
        for p in sorted(out_dir.iterdir())
        if p.is_file() and p.name != MANIFEST_NAME and not p.name.endswith(".cache")
    }
    for kind, artefact in artefacts.items():
        if artefact["file"] not in files:
            raise ValueError(f"artefact for {kind} ({artefact['file']}) is not in {out_dir}")
    built_for = dataclasses.asdict(platform) if platform and Runtime.TENSORRT in artefacts else None
    manifest = {
        "format": FORMAT,
        "checkpoint": {"id": checkpoint.name, "revision": revision, "sha256": checkpoint.sha256},
        "labels": list(checkpoint.labels),
        "tokenizer_files": tokenizer_files,
        "max_input_tokens": checkpoint.max_input_tokens,
        "max_num_tokens": max_num_tokens,
        "precision": precision,
        "profiles": [[list(shape) for shape in profile] for profile in profiles or []],
        "versions": {**library_versions(), "tensorrt": built_for["tensorrt_version"] if built_for else None},
        "gpu": built_for,
        "artefacts": artefacts,
        "parity": parity or {},
        "files": files,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    path = out_dir / MANIFEST_NAME
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def read_manifest(engine_dir: Path) -> dict[str, Any]:
    """The parsed manifest; ValueError when it is missing, unreadable or of another format."""
    path = Path(engine_dir) / MANIFEST_NAME
    if not path.is_file():
        raise ValueError(f"engine dir {engine_dir} has no {MANIFEST_NAME}: build it with `make build-engine`")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"engine dir {engine_dir}: {MANIFEST_NAME} is unreadable ({error})") from error
    if manifest.get("format") != FORMAT:
        raise ValueError(f"engine dir {engine_dir}: manifest format {manifest.get('format')!r}, expected {FORMAT}")
    return manifest


def verify_files(engine_dir: Path, manifest: dict[str, Any]) -> None:
    """Every file the manifest lists is present with its recorded sha256 (else ValueError naming it)."""
    for name, expected in manifest["files"].items():
        path = Path(engine_dir) / name
        if not path.is_file():
            raise ValueError(f"engine dir {engine_dir}: {name} listed in the manifest is missing")
        actual = file_sha256(path)
        if actual != expected:
            raise ValueError(
                f"engine dir {engine_dir}: {name} was modified after the build "
                f"(sha256 {actual[:12]}…, manifest says {expected[:12]}…); rebuild the engine"
            )


def verify_checkpoint(engine_dir: Path, manifest: dict[str, Any], checkpoint: Checkpoint) -> None:
    """The folder was built from this very checkpoint (content hash, labels): else ValueError saying how not."""
    built = manifest["checkpoint"]
    if built["sha256"] != checkpoint.sha256:
        raise ValueError(
            f"engine dir {engine_dir} was built from checkpoint {built['id']!r} "
            f"(revision {built['revision'] or 'main'}, sha256 {built['sha256'][:12]}…), "
            f"but the server loaded {checkpoint.name!r} (sha256 {checkpoint.sha256[:12]}…): "
            "the weights or tokenizer differ; rebuild the engine for this checkpoint"
        )
    if tuple(manifest["labels"]) != checkpoint.labels:
        raise ValueError(
            f"engine dir {engine_dir}: labels {manifest['labels']} differ from the checkpoint's "
            f"{list(checkpoint.labels)}"
        )


def verify_platform(engine_dir: Path, manifest: dict[str, Any], here: Platform) -> None:
    """A TensorRT plan runs only on the GPU model and TensorRT version it was built with: else ValueError."""
    built = manifest["gpu"] or {}
    if not here.has_gpu:
        raise ValueError(f"engine dir {engine_dir} holds a TensorRT plan but this machine has no CUDA GPU")
    if (built.get("gpu_name"), built.get("compute_capability")) != (here.gpu_name, here.compute_capability):
        raise ValueError(
            f"engine dir {engine_dir}: the TensorRT plan was built for {built.get('gpu_name')} (compute capability "
            f"{built.get('compute_capability')}), this machine has {here.gpu_name} (compute capability "
            f"{here.compute_capability}); rebuild the engine on this GPU"
        )
    if here.tensorrt_version is None:
        raise ValueError(f"engine dir {engine_dir} holds a TensorRT plan but the tensorrt package is not installed")
    if built.get("tensorrt_version") != here.tensorrt_version:
        raise ValueError(
            f"engine dir {engine_dir}: the TensorRT plan was built with TensorRT {built.get('tensorrt_version')}, "
            f"this machine has TensorRT {here.tensorrt_version}; plans only load in the version that built them"
        )


def verify(engine_dir: Path, checkpoint: Checkpoint, here: Platform | None = None) -> dict[str, Any]:
    """Check manifest, checkpoint and file hashes (and GPU/TensorRT when `here` is given); return the manifest.

    Raises ValueError whose message says why the folder is refused."""
    manifest = read_manifest(engine_dir)
    verify_checkpoint(engine_dir, manifest, checkpoint)
    verify_files(engine_dir, manifest)
    if here is not None and Runtime.TENSORRT in manifest["artefacts"]:
        verify_platform(engine_dir, manifest, here)
    return manifest


class EngineArtefact(NamedTuple):
    """What to serve from an engine folder, and with which batch budget."""

    kind: Runtime  # the runtime that serves it: TENSORRT (a plan) or ONNXRUNTIME (a graph)
    path: Path
    precision: str  # the artefact's: fp32, fp16, bf16, int8
    max_num_tokens: int | None  # the budget to serve with; None: no limit from the folder (ONNX is dynamic)
    note: str | None  # why the budget differs from the one asked for, to be logged


def load_engine_dir(
    engine_dir: str | Path,
    checkpoint: Checkpoint,
    engine: str = AUTO,
    here: Platform | None = None,
    precision: str | None = None,
    max_num_tokens: int | None = None,
) -> EngineArtefact:
    """Whether the folder fits this checkpoint, machine, engine, precision and batch budget, and what
    to serve from it: the one place that decides (the server and the container's start both call it).

    - Always checked first: the manifest exists, was built from this checkpoint's exact content
      (sha256 of weights, config and tokenizer files; same labels), and no file was changed since.
    - engine="auto": the TensorRT plan when the folder has one and this machine has a CUDA GPU and
      the tensorrt package; then its GPU model, compute capability and TensorRT version must equal
      the build's (a mismatch raises: serving a CPU graph on a GPU machine by surprise would hide a
      stale engine). Without a GPU or without tensorrt here: the ONNX file for ONNX Runtime.
    - engine="tensorrt": the plan, or ValueError when the folder has none or this machine cannot run it.
    - engine="onnxruntime": the ONNX file ORT serves (the optimized float32 graph, or the int8 graph
      when built with precision int8), whatever the GPU.
    - `precision`, when given, must be the chosen artefact's.
    - `max_num_tokens`: a TensorRT plan's profiles hold batches of the budget it was built for, so a
      larger budget is lowered to it (with a note saying so; never a batch the plan cannot run) and
      None takes it; ONNX graphs take any shape, so the budget asked for is kept.
    Every refusal is a ValueError whose message says why. `here` defaults to current_platform()."""
    engine_dir = Path(engine_dir)
    if engine not in (AUTO, Runtime.TENSORRT, Runtime.ONNXRUNTIME):
        raise ValueError(f"an engine dir serves tensorrt or onnxruntime, not {engine!r}")
    manifest = verify(engine_dir, checkpoint)
    artefacts = manifest["artefacts"]
    chosen: tuple[Runtime, dict[str, str]] | None = None
    if engine != Runtime.ONNXRUNTIME and Runtime.TENSORRT in artefacts:
        here = here or current_platform()
        if engine == Runtime.TENSORRT or (here.has_gpu and here.tensorrt_version is not None):
            verify_platform(engine_dir, manifest, here)
            chosen = (Runtime.TENSORRT, artefacts[Runtime.TENSORRT])
    if chosen is None and engine == Runtime.TENSORRT:
        raise ValueError(
            f"engine dir {engine_dir} has no TensorRT plan (built on a machine without GPU or "
            f"tensorrt, or with precision {manifest['precision']}); serve it with onnxruntime"
        )
    kind, artefact = chosen or (Runtime.ONNXRUNTIME, artefacts[Runtime.ONNXRUNTIME])
    if precision is not None and precision != artefact["precision"]:
        raise ValueError(
            f"engine dir {engine_dir} serves {artefact['precision']} ({artefact['file']}), but precision "
            f"{precision} was asked for: rebuild it with PRECISION={precision} or leave precision unset"
        )
    budget, note = max_num_tokens, None
    if kind == Runtime.TENSORRT:
        built = int(manifest["max_num_tokens"])
        budget = built if max_num_tokens is None else min(max_num_tokens, built)
        if max_num_tokens is not None and max_num_tokens > built:
            note = (
                f"engine dir {engine_dir} was built for max_num_tokens={built}: serving with {built} instead "
                f"of {max_num_tokens} (rebuild with MAX_NUM_TOKENS={max_num_tokens} for larger batches)"
            )
    return EngineArtefact(kind, engine_dir / artefact["file"], artefact["precision"], budget, note)
