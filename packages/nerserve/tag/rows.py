"""What flows through a tagging job: an input row, its answer, the request options, and the kinds of
row error (each a fixed word, so the summary counts them and a reader can filter on them)."""

from __future__ import annotations

import dataclasses
from typing import Any

#: a row's own problems (inputs.py) and the model's refusals of one text (the targets)
MISSING_TEXT = "missing-text"  # the text field is absent or null
NOT_A_STRING = "not-a-string"  # the text field holds a number, a list, ...
NOT_JSON = "not-json"  # a .jsonl line that does not parse, or is not an object
NOT_UTF8 = "not-utf8"  # the row's bytes (a .txt or .jsonl line, a CSV or Parquet text) are not UTF-8
REFUSED = "refused"  # the server answered this one text with a 4xx (e.g. 413 over its byte limit)
FAILED = "failed"  # the engine failed on this one text alone, after retries (HTTP 500)
#: what the target's state causes (overload, loading, timeouts, a lost connection) is never a row's error:
#: it is retried, and past the retries the job stops (Unreachable) with nothing of it written, so a rerun
#: sends those rows again


#: what identifies the model in a run's fingerprint: the keys of /info that change answers; in process and
#: on Ray the same keys come from the service, so a job may be resumed by another way of running it
MODEL_KEYS = ("model_id", "checkpoint_sha256", "engine", "precision", "window_stride", "max_input_tokens")


class Unreachable(Exception):
    """The target cannot take the job (down past the retries, a refused key, no such route, an actor
    lost): the job ends, its output so far kept for the rerun."""


def row_error(kind: str, message: str) -> str:
    """The `error` column's text: the kind first, so `error.split(":")[0]` is the kind."""
    return f"{kind}: {message}"


def error_kind(error: str) -> str:
    return error.split(":", 1)[0]


@dataclasses.dataclass(slots=True)
class Row:
    """One input row: its position, its id (the id field, else the position), and its text or what is
    wrong with it (`error`, already in row_error's form)."""

    index: int
    id: Any
    text: str | None
    error: str | None = None


#: one text's answer: the entities as /predict_tokens returns them, or a row error
Outcome = list[dict[str, Any]] | str


@dataclasses.dataclass(frozen=True)
class RequestOptions:
    """The request fields of API.md that a job sets (`raw_scores` is not offered: a corpus tool keeps
    the top label)."""

    aggregation_strategy: str = "max"
    truncate: bool = False
    truncation_direction: str = "right"

    def payload(self, texts: list[str]) -> dict[str, Any]:
        """The /predict_tokens body for these texts."""
        return {
            "inputs": texts,
            "aggregation_strategy": self.aggregation_strategy,
            "truncate": self.truncate,
            "truncation_direction": self.truncation_direction,
        }


@dataclasses.dataclass(frozen=True)
class Selection:
    """Which entities a job keeps, whatever its output format (`--labels`, `--min-score`): those whose
    label (strategy none: the label's type, `B-PER` -> `PER`) is among `labels`, and whose score is at
    least `min_score`. None keeps all."""

    labels: frozenset[str] | None = None
    min_score: float | None = None

    def __call__(self, outcome: Outcome) -> Outcome:
        if isinstance(outcome, str) or (self.labels is None and self.min_score is None):
            return outcome
        return [item for item in outcome if self._keeps(*next(iter(item["results"].items())))]

    def _keeps(self, label: str, score: float) -> bool:
        if self.labels is not None and label.split("-", 1)[-1] not in self.labels:
            return False
        return self.min_score is None or score >= self.min_score

    def fingerprint(self) -> dict[str, Any]:
        """What a rerun must share (only what is set: a run without filters keeps its old fingerprint)."""
        out: dict[str, Any] = {}
        if self.labels is not None:
            out["labels"] = sorted(self.labels)
        if self.min_score is not None:
            out["min_score"] = self.min_score
        return out


def estimated_tokens(text: str) -> int:
    """Model tokens of a text, estimated without a tokenizer (the HTTP client has none): about four
    characters per WordPiece token on English prose, plus [CLS] and [SEP]. Used to pack requests and
    to show a rate; never to cut a text."""
    return len(text) // 4 + 2
