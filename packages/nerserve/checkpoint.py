"""Checkpoint resolution: an HF repo id (downloaded once into the hub cache) or a local folder in HF
format, with what every later step needs from it: labels, the fast tokenizer, the max input length,
and a content hash that keys caches (exported ONNX) and engine manifests."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # transformers is imported where a checkpoint is loaded: the processes that import this
    # module only for its types (the supervisor, a worker) stay free of it and of torch
    from transformers import PretrainedConfig, PreTrainedTokenizerFast

log = logging.getLogger(__name__)

# Files whose bytes define the model's answers; their hash names a checkpoint.
_HASHED_SUFFIXES = (".json", ".txt", ".safetensors", ".bin", ".model")
# Models whose learned positions start after the padding index (RoBERTa family).
_OFFSET_POSITION_MODELS = {"roberta", "xlm-roberta", "camembert", "longformer", "bertweet"}


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A resolved checkpoint on local disk."""

    #: what people see (/info's model_id, manifests, logs): the hub id, or a local folder's name
    name: str
    path: Path
    config: PretrainedConfig
    tokenizer: PreTrainedTokenizerFast
    labels: tuple[str, ...]
    max_input_tokens: int
    sha256: str

    @property
    def pad_id(self) -> int:
        """The id padded batches are filled with (masked out, so any id works; the model's own is used)."""
        pad = self.tokenizer.pad_token_id
        return int(pad if pad is not None else getattr(self.config, "pad_token_id", None) or 0)

    @property
    def position_offset(self) -> int:
        """The first position id: RoBERTa-family models count positions from padding index + 1, BERT from 0."""
        return position_offset(self.config)

    def load_torch_model(self):
        """The PyTorch token classifier in eval mode (eager attention: it exports and runs everywhere)."""
        from transformers import AutoModelForTokenClassification

        model = AutoModelForTokenClassification.from_pretrained(self.path, attn_implementation="eager")
        return model.eval()

    @property
    def input_names(self) -> list[str]:
        """The model's inputs as engines feed them: token_type_ids only where there is more than one type."""
        names = ["input_ids", "attention_mask"]
        if getattr(self.config, "type_vocab_size", 0) > 1:
            names.append("token_type_ids")
        return names


#: the files of a hub repository the server reads (weights, config, tokenizer)
HUB_PATTERNS = ["*.json", "*.txt", "*.safetensors", "*.model", "tokenizer*", "vocab*", "merges*"]


class CheckpointUnavailable(RuntimeError):
    """The checkpoint cannot be had: the message names it, the cause, and what to do instead."""


def resolve_path(
    name: str, revision: str | None = None, token: str | None = None, mounts: Mapping[str, str] | None = None
) -> Path:
    """A local folder as is; the folder Truss mounted for this hub repository (config.yaml's `weights`:
    no hub traffic at a cold start); otherwise the hub snapshot, downloaded on first use."""
    local = Path(name).expanduser()
    if local.is_dir():
        return local.resolve()
    mount = (mounts or {}).get(f"{name}@{revision or 'main'}")
    if mount and Path(mount).is_dir() and any(Path(mount).iterdir()):
        log.info("checkpoint %s: the weights mounted at %s", name, mount)
        return Path(mount)
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(name, revision=revision, token=token, allow_patterns=HUB_PATTERNS))
        if not any(folder.glob("*.safetensors")):  # older repositories ship only pytorch_model.bin
            folder = Path(
                snapshot_download(name, revision=revision, token=token, allow_patterns=[*HUB_PATTERNS, "*.bin"])
            )
    except Exception as error:  # network, auth, missing repository or revision
        raise CheckpointUnavailable(_hub_failure(name, revision, error)) from error
    return folder


def _hub_failure(name: str, revision: str | None, error: Exception) -> str:
    """One line: which checkpoint, why the hub gave nothing, and how to serve without the hub."""
    from huggingface_hub import errors

    if isinstance(error, errors.LocalEntryNotFoundError):
        why = "the Hugging Face hub could not be reached and the checkpoint is not in the local hub cache"
    elif isinstance(error, errors.RevisionNotFoundError):
        why = f"the hub has no revision {revision!r} of it"
    elif isinstance(error, (errors.GatedRepoError, errors.RepositoryNotFoundError)):
        why = (
            "the hub has no such repository, or it is private or gated "
            "(give a token: HF_TOKEN, or the hf_access_token secret on Baseten)"
        )
    else:
        why = f"the hub download failed ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
    return (
        f"cannot load checkpoint {name!r} (revision {revision or 'main'}): {why}. To serve a local folder in HF "
        "format instead: make serve CHECKPOINT=/path/to/folder (NERSERVE_CHECKPOINT=/path/to/folder)"
    )


def checkpoint_sha256(path: Path) -> str:
    """Hash of the files that determine the model's answers, in name order."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.iterdir() if p.is_file() and p.suffix in _HASHED_SUFFIXES):
        digest.update(file.name.encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def position_offset(config: PretrainedConfig) -> int:
    """Position id of a sequence's first token: padding index + 1 for the RoBERTa family, else 0."""
    if config.model_type not in _OFFSET_POSITION_MODELS:
        return 0
    pad = getattr(config, "pad_token_id", None)
    return (1 if pad is None else int(pad)) + 1


def max_input_tokens(config: PretrainedConfig, tokenizer: PreTrainedTokenizerFast) -> int:
    """The longest sequence the model accepts: the tokenizer's limit, capped by the position table."""
    positions = (getattr(config, "max_position_embeddings", None) or 512) - position_offset(config)
    declared = tokenizer.model_max_length
    if not declared or declared > 1_000_000:  # "unset" is 1e30 in transformers
        return positions
    return min(declared, positions)


def load_checkpoint(
    name: str, revision: str | None = None, token: str | None = None, mounts: Mapping[str, str] | None = None
) -> Checkpoint:
    """Resolve, then load config and fast tokenizer; refuse what the server cannot serve."""
    from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerFast

    path = resolve_path(name, revision, token, mounts)
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
        name=path.name if Path(name).expanduser().is_dir() else name,
        path=path,
        config=config,
        tokenizer=tokenizer,
        labels=labels,
        max_input_tokens=max_input_tokens(config, tokenizer),
        sha256=checkpoint_sha256(path),
    )
