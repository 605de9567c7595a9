"""Gold readers, each streaming `Example`s in file order: a text to send, its tokens, and their gold tags.

- CoNLL (`conll`): the token in the first column, the tag in the last, sentences separated by blank
  lines, `-DOCSTART-` lines skipped; IOB1 (the CoNLL-2003 files) and IOB2 alike. A sentence's text is its
  tokens joined by single spaces, the way a CoNLL sentence is sent to a model that reads text.
- JSONL spans (`spans`): `{"text", "spans": [{"start", "end", "label"}], "id"?}` a line, offsets in code
  points; the tokens are the text's whitespace tokens (scheme.py), the spans' tags laid on them.
- Hugging Face datasets rows (`hf`), JSONL or Parquet: `tokens` and `ner_tags` (indices into the label
  names, or the names themselves), sent as the tokens joined by single spaces.

A row whose gold cannot be read (a line that is not JSON, a tag that is not IOB, a span outside its
text, an index past the names) is an Example with `error` (kind `bad-gold`): it is counted and named
in the report, never scored and never the job's end. A file that cannot be read at all raises
GoldError before any row."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson

from .scheme import Token, bad_tag, tags_from_spans, whitespace_tokens

FORMATS = ("conll", "spans", "hf")
BAD_GOLD = "bad-gold"
#: rows per Arrow batch read from a Parquet file
BATCH_ROWS = 4096


class GoldError(ValueError):
    """The gold file cannot be read at all (no such file, unknown layout, integer tags without names)."""


@dataclasses.dataclass(slots=True)
class Example:
    """One gold row: its position and id, the text sent, its tokens (offsets in the text) and their
    gold tags; or, for a row that cannot be read, `error` (`bad-gold: ...`) and no text."""

    index: int
    id: Any
    text: str | None
    tokens: list[Token] = dataclasses.field(default_factory=list)
    tags: list[str] = dataclasses.field(default_factory=list)
    error: str | None = None


def gold_format(path: Path, given: str | None = None) -> str:
    """The gold's layout: `given`, else Parquet -> hf, JSONL -> spans or hf by its first row's keys,
    anything else (eng.testa, .conll, .txt, .iob) -> conll."""
    if given:
        return given
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return "hf"
    if suffix == ".jsonl":
        with open(path, "rb") as file:
            for line in file:
                if line.strip():
                    try:
                        first = orjson.loads(line)
                    except orjson.JSONDecodeError:
                        break
                    if isinstance(first, dict) and "ner_tags" in first:
                        return "hf"
                    break
        return "spans"
    return "conll"


def read_gold(path: Path, fmt: str, label_names: Sequence[str] | None = None) -> Iterator[Example]:
    """The examples of `path` in layout `fmt` (gold_format); `label_names` names integer `ner_tags`."""
    if not path.is_file():
        raise GoldError(f"{path}: no such file")
    if fmt == "conll":
        return (_conll_example(index, words, tags) for index, (words, tags) in enumerate(_conll_blocks(path)))
    if fmt == "spans":
        return _jsonl(path, _spans_example)
    if fmt == "hf":
        names = tuple(label_names) if label_names else None
        if path.suffix.lower() == ".parquet":
            return _parquet(path, names)
        return _jsonl(path, lambda index, record: _hf_example(index, record, names))
    raise GoldError(f"unknown gold format {fmt!r}; use one of {', '.join(FORMATS)}")


def read_conll(path: Path, limit: int | None = None) -> list[tuple[list[str], list[str]]]:
    """(tokens, tags) per sentence of a CoNLL file (the tag in the last column), the first `limit`."""
    sentences: list[tuple[list[str], list[str]]] = []
    for sentence in _conll_blocks(path):
        if limit is not None and len(sentences) >= limit:
            break
        sentences.append(sentence)
    return sentences


def _conll_blocks(path: Path) -> Iterator[tuple[list[str], list[str]]]:
    words: list[str] = []
    tags: list[str] = []
    with open(path, encoding="utf-8", errors="replace") as file:
        for line in file:
            if not line.strip() or line.startswith("-DOCSTART-"):
                if words:
                    yield words, tags
                    words, tags = [], []
                continue
            columns = line.split()
            words.append(columns[0])
            tags.append(columns[-1] if len(columns) > 1 else "")
    if words:
        yield words, tags


def joined(words: Sequence[str]) -> tuple[str, list[Token]]:
    """The words joined by single spaces, and where each lies in that text."""
    tokens: list[Token] = []
    position = 0
    for word in words:
        tokens.append((position, position + len(word)))
        position += len(word) + 1
    return " ".join(words), tokens


def _bad(index: int, row_id: Any, message: str) -> Example:
    return Example(index, row_id, None, error=f"{BAD_GOLD}: row {index}: {message}")


def _conll_example(index: int, words: list[str], tags: list[str]) -> Example:
    wrong = next((tag for tag in tags if bad_tag(tag)), None)
    if wrong is not None:
        return _bad(index, index, f"tag {wrong!r} of {words[tags.index(wrong)]!r} is not O nor B-/I-/E-/S-TYPE")
    text, tokens = joined(words)
    return Example(index, index, text, tokens, tags)


def _jsonl(path: Path, make) -> Iterator[Example]:
    index = 0
    with open(path, "rb") as file:
        for line in file:
            if not line.strip():
                continue
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError as error:
                yield _bad(index, index, f"not JSON ({error})")
            else:
                if isinstance(record, dict):
                    yield make(index, record)
                else:
                    yield _bad(index, index, f"a JSON {type(record).__name__}, not an object")
            index += 1


def _spans_example(index: int, record: dict[str, Any]) -> Example:
    row_id = index if record.get("id") is None else record["id"]
    text, spans = record.get("text"), record.get("spans")
    if not isinstance(text, str):
        return _bad(index, row_id, f"'text' is {type(text).__name__}, not a string")
    if not isinstance(spans, list):
        return _bad(index, row_id, f"'spans' is {type(spans).__name__}, not a list")
    triples: list[tuple[int, int, str]] = []
    for span in spans:
        if not isinstance(span, dict):
            return _bad(index, row_id, f"a span is {type(span).__name__}, not an object")
        start, end, label = span.get("start"), span.get("end"), span.get("label")
        if not (
            isinstance(start, int) and isinstance(end, int) and isinstance(label, str) and label and "-" not in label
        ):
            return _bad(index, row_id, f"span {_short(span)} needs integer start and end and a label without '-'")
        if not 0 <= start < end <= len(text):
            return _bad(index, row_id, f"span {_short(span)} is not inside the text of {len(text)} characters")
        triples.append((start, end, label))
    tokens = whitespace_tokens(text)
    return Example(index, row_id, text, tokens, tags_from_spans(tokens, triples))


def _hf_example(index: int, record: dict[str, Any], names: tuple[str, ...] | None) -> Example:
    row_id = index if record.get("id") is None else record["id"]
    words, codes = record.get("tokens"), record.get("ner_tags")
    if not isinstance(words, list) or not isinstance(codes, list) or len(words) != len(codes):
        return _bad(index, row_id, "'tokens' and 'ner_tags' must be lists of one length")
    if not all(isinstance(word, str) and word and not any(c.isspace() for c in word) for word in words):
        return _bad(index, row_id, "every token must be a non-empty string without white space")
    tags: list[str] = []
    for code in codes:
        if isinstance(code, str):
            tag = code
        elif isinstance(code, int) and not isinstance(code, bool):
            if names is None:
                raise GoldError("integer ner_tags need label names: --label-names, or a model that lists its labels")
            if not 0 <= code < len(names):
                return _bad(index, row_id, f"ner_tag {code} is past the {len(names)} label names")
            tag = names[code]
        else:
            return _bad(index, row_id, f"ner_tag {_short(code)} is neither an index nor a tag")
        if bad_tag(tag):
            return _bad(index, row_id, f"tag {tag!r} is not O nor B-/I-/E-/S-TYPE")
        tags.append(tag)
    text, tokens = joined(words)
    return Example(index, row_id, text, tokens, tags)


def _parquet(path: Path, names: tuple[str, ...] | None) -> Iterator[Example]:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    columns = parquet.schema_arrow.names
    missing = [name for name in ("tokens", "ner_tags") if name not in columns]
    if missing:
        raise GoldError(f"{path}: no column {', '.join(missing)} (columns: {', '.join(columns)})")
    wanted = [name for name in ("id", "tokens", "ner_tags") if name in columns]
    index = 0
    for batch in parquet.iter_batches(BATCH_ROWS, columns=wanted):
        for record in batch.to_pylist():
            yield _hf_example(index, record, names)
            index += 1


def _short(value: Any) -> str:
    text = orjson.dumps(value, default=str).decode()
    return text if len(text) <= 120 else text[:117] + "..."
