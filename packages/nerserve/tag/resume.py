"""The record of a job's progress beside its output (`OUTPUT.state.json`): what run wrote it (a
fingerprint of the options, the model and the input), how many input rows are durably written and
where the output's durable bytes end. It is replaced atomically after every commit, so after a kill
the output holds at least what it says; a rerun cuts the output back to it and goes on from there (an
output that holds less than that was changed since, and is refused: outputs.check_intact)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import orjson


class Mismatch(Exception):
    """The output was written by another run (other options, model or input), or not by this tool."""


class Damaged(Exception):
    """The output no longer holds what its record says was written (deleted, cut short, replaced):
    continuing would pad it or call it complete, so the job does not start."""


@dataclasses.dataclass
class State:
    """`rows`: input rows durably written; `offset`: the output's durable length in bytes (line
    formats); `parts`: Parquet part files committed; `complete`: the output is whole."""

    fingerprint: dict[str, Any]
    rows: int = 0
    offset: int = 0
    parts: int = 0
    complete: bool = False


def state_path(output: Path) -> Path:
    return output.with_name(output.name + ".state.json")


def parts_folder(output: Path) -> Path:
    """Where the part files of a one-file output (Parquet, a spaCy DocBin) wait until the end."""
    return output.with_name(output.name + ".parts")


def load(output: Path) -> State | None:
    path = state_path(output)
    if not path.is_file():
        return None
    return State(**orjson.loads(path.read_bytes()))


def save(output: Path, state: State) -> None:
    """Replace the record atomically: a new file, synced, renamed over the old one, the folder synced."""
    path = state_path(output)
    replace_durably(path, orjson.dumps(dataclasses.asdict(state)))


def replace_durably(path: Path, data: bytes) -> None:
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)
    sync_folder(path.parent)


def sync_folder(folder: Path) -> None:
    """A rename is durable once its folder is synced."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def check(output: Path, previous: State, fingerprint: dict[str, Any]) -> None:
    """Refuse to continue another run's output, naming what differs."""
    if previous.fingerprint == fingerprint:
        return
    before, now = _flat(previous.fingerprint), _flat(fingerprint)
    differences = [
        f"{name} was {_short(before.get(name))}, now {_short(now.get(name))}"
        for name in sorted(set(before) | set(now))
        if before.get(name) != now.get(name)
    ]
    raise Mismatch(
        f"{output} holds the output of another run ({'; '.join(differences)}): nothing was written; "
        "rerun with --overwrite to start again, or write to another file"
    )


def _flat(fingerprint: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"options": {"truncate": true}}` as `{"options.truncate": true}`, so a refusal names the one setting."""
    flat: dict[str, Any] = {}
    for key, value in fingerprint.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def _short(value: Any) -> str:
    text = orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()
    return text if len(text) <= 200 else text[:197] + "..."
