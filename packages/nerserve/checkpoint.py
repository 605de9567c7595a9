"""Checkpoint resolution: an HF repo id (downloaded once into the hub cache) or a local folder in HF
format, with what every later step needs from it: labels, the fast tokenizer, the max input length,
and a content hash that keys caches (exported ONNX) and engine manifests."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path

from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerFast

# Files whose bytes define the model's answers; their hash names a checkpoint.
_HASHED_SUFFIXES = (".json", ".txt", ".safetensors", ".bin", ".model")
# Models whose learned positions start after the padding index (RoBERTa family): two fewer usable.
_OFFSET_POSITION_MODELS = {"roberta", "xlm-roberta", "camembert", "longformer", "bertweet"}


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A resolved checkpoint on local disk."""

    name: str
    path: Path
    config: PretrainedConfig
    tokenizer: PreTrainedTokenizerFast
    labels: tuple[str, ...]
    max_input_tokens: int
    sha256: str


def resolve_path(name: str, revision: str | None = None, token: str | None = None) -> Path:
    """A local folder as is; otherwise the hub snapshot (downloaded on first use)."""
    local = Path(name).expanduser()
    if local.is_dir():
        return local.resolve()
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.txt", "*.safetensors", "*.model", "tokenizer*", "vocab*", "merges*"]
    try:
        folder = snapshot_download(name, revision=revision, token=token, allow_patterns=patterns)
    except Exception as error:  # network, auth, missing repo: say which checkpoint failed
        raise RuntimeError(f"cannot fetch checkpoint {name!r} (revision {revision or 'main'}): {error}") from error
    folder_path = Path(folder)
    if not any(folder_path.glob("*.safetensors")):
        # Older repos ship only pytorch_model.bin.
        folder = snapshot_download(name, revision=revision, token=token, allow_patterns=patterns + ["*.bin"])
        folder_path = Path(folder)
    return folder_path


def checkpoint_sha256(path: Path) -> str:
    """Hash of the files that determine the model's answers, in name order."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.iterdir() if p.is_file() and p.suffix in _HASHED_SUFFIXES):
        digest.update(file.name.encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def max_input_tokens(config: PretrainedConfig, tokenizer: PreTrainedTokenizerFast) -> int:
    """The longest sequence the model accepts: the tokenizer's limit, capped by the position table."""
    positions = getattr(config, "max_position_embeddings", None) or 512
    if config.model_type in _OFFSET_POSITION_MODELS:
        positions -= 2
    declared = tokenizer.model_max_length
    if not declared or declared > 1_000_000:  # "unset" is 1e30 in transformers
        return positions
    return min(declared, positions)


def load_checkpoint(name: str, revision: str | None = None, token: str | None = None) -> Checkpoint:
    """Resolve, then load config and fast tokenizer; refuse what the server cannot serve."""
    path = resolve_path(name, revision, token)
    config = AutoConfig.from_pretrained(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, use_fast=True)
    except Exception as error:  # a slow-only tokenizer that cannot be converted lands here
        raise ValueError(f"checkpoint {name!r}: cannot load a fast tokenizer ({error})") from error
    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        raise ValueError(
            f"checkpoint {name!r} has only a slow (Python) tokenizer; the server needs a fast tokenizer "
            "(tokenizer.json) for character offsets. Convert it with "
            "AutoTokenizer.from_pretrained(path).save_pretrained(path) on a machine with `tokenizers`."
        )
    id2label = getattr(config, "id2label", None) or {}
    labels = tuple(str(id2label[i]) for i in sorted(int(k) for k in id2label))
    if not labels:
        raise ValueError(f"checkpoint {name!r} has no id2label in config.json: not a token classifier")
    return Checkpoint(
        name=name,
        path=path,
        config=config,
        tokenizer=tokenizer,
        labels=labels,
        max_input_tokens=max_input_tokens(config, tokenizer),
        sha256=checkpoint_sha256(path),
    )


def cache_root() -> Path:
    """Where derived artefacts (exported ONNX) live: beside the hub cache."""
    base = os.environ.get("NERSERVE_CACHE") or os.path.join(
        os.environ.get("HF_HOME", os.path.join(Path.home(), ".cache", "huggingface")), "nerserve"
    )
    return Path(base)
