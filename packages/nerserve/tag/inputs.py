"""Input readers, chosen by the file's extension, each streaming `Row`s in file order.

`.jsonl`: one JSON object a line, the text under `text_field`, the id under `id_field` (else the
row's index); blank lines are not rows. `.csv` and `.parquet`: columns of those names, read by Arrow
in blocks. `.txt`: every line is a text, its index the id. A row's own fault (a line that is not
JSON, a missing or non-string text, bytes that are not UTF-8) is that row's error; a file without the
text column at all is a usage error raised before any row, since every row would fail the same way.

Bytes are decoded per row, so one bad row is not the job's end: a .txt line at a time, a .jsonl line
told apart from bad JSON, and Arrow's text columns read as binary (Arrow's CSV reader fails the whole
block on one invalid UTF-8 value of a string column; a Parquet string column may hold invalid UTF-8
too, which Arrow reads but Python cannot), validated a batch at once and decoded one by one only
where the batch holds a bad value."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from .rows import MISSING_TEXT, NOT_A_STRING, NOT_JSON, NOT_UTF8, Row, row_error

EXTENSIONS = (".jsonl", ".csv", ".parquet", ".txt")
#: rows per Arrow batch read from CSV and Parquet: large enough to amortize Arrow's call, small
#: enough that memory stays far below what is in flight
ARROW_BATCH_ROWS = 4096


class InputError(ValueError):
    """The input cannot be read at all (unknown extension, no such column): the job does not start."""


@dataclasses.dataclass(frozen=True)
class Fields:
    """Where a row keeps its text and its id."""

    text: str = "text"
    id: str = "id"


def kind_of(path: Path) -> str:
    """The reader's name: the extension without its dot."""
    suffix = path.suffix.lower()
    if suffix not in EXTENSIONS:
        raise InputError(f"{path}: unknown input type {suffix!r}; use one of {', '.join(EXTENSIONS)}")
    return suffix[1:]


def read_rows(path: Path, fields: Fields, start: int = 0) -> Iterator[Row]:
    """The rows of `path` from row `start` on (the rows before it are skipped without being parsed
    where the format allows: a resumed job does not pay for what it already wrote)."""
    kind = kind_of(path)
    if kind == "jsonl":
        return _jsonl(path, fields, start)
    if kind == "txt":
        return _txt(path, start)
    return _arrow(path, kind, fields, start)


def count_rows(path: Path) -> int:
    """How many rows the input holds, for the progress bar's ETA: Parquet's metadata, else the file's
    lines counted in 1 MiB blocks (a CSV's header and a quoted newline make it approximate)."""
    kind = kind_of(path)
    if kind == "parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    lines, last = 0, b"\n"
    with open(path, "rb") as file:
        while block := file.read(1 << 20):
            lines += block.count(b"\n")
            last = block[-1:]
    lines += last != b"\n"
    return max(0, lines - 1) if kind == "csv" else lines


def _row(index: int, record: Any, fields: Fields) -> Row:
    """A parsed record as a row: its id, and its text or the reason it has none."""
    if not isinstance(record, dict):
        return Row(
            index, index, None, row_error(NOT_JSON, f"row {index}: a JSON {type(record).__name__}, not an object")
        )
    found = record.get(fields.id)
    row_id = index if found is None else found
    text = record.get(fields.text)
    if text is None:
        return Row(index, row_id, None, row_error(MISSING_TEXT, f"row {index}: no {fields.text!r} field"))
    if not isinstance(text, str):
        problem = f"row {index}: {fields.text!r} is {type(text).__name__}, not a string"
        return Row(index, row_id, None, row_error(NOT_A_STRING, problem))
    return Row(index, row_id, text)


def _not_utf8(index: int, error: UnicodeDecodeError) -> Row:
    byte = error.object[error.start]
    return Row(index, index, None, row_error(NOT_UTF8, f"row {index}: byte 0x{byte:02x} at {error.start} is not UTF-8"))


def _jsonl(path: Path, fields: Fields, start: int) -> Iterator[Row]:
    index = 0
    with open(path, "rb") as file:
        for line in file:
            if not line.strip():
                continue
            if index >= start:
                try:
                    record = orjson.loads(line)
                except orjson.JSONDecodeError as error:
                    try:  # only a line that does not parse pays for this check
                        line.decode("utf-8")
                    except UnicodeDecodeError as undecodable:
                        yield dataclasses.replace(_not_utf8(index, undecodable), id=_jsonl_id(line, index, fields))
                    else:
                        yield Row(index, index, None, row_error(NOT_JSON, f"row {index}: {error}"))
                else:
                    yield _row(index, record, fields)
            index += 1


def _jsonl_id(line: bytes, index: int, fields: Fields) -> Any:
    """The id of a line that is not UTF-8, read with its bad bytes replaced (else the row's index), so
    its error row still names the record."""
    try:
        record = orjson.loads(line.decode("utf-8", "replace"))
    except orjson.JSONDecodeError:
        return index
    found = record.get(fields.id) if isinstance(record, dict) else None
    return index if found is None else found


def _txt(path: Path, start: int) -> Iterator[Row]:
    with open(path, "rb") as file:  # lines end at b"\n" only, as count_rows counts them
        for index, line in enumerate(file):
            if index >= start:
                try:
                    yield Row(index, index, line.removesuffix(b"\n").decode("utf-8"))
                except UnicodeDecodeError as error:
                    yield _not_utf8(index, error)


def _arrow(path: Path, kind: str, fields: Fields, start: int) -> Iterator[Row]:
    """CSV and Parquet, in Arrow batches; only the text and id columns are read (a CSV's as binary, as
    CSV holds nothing but text: a numeric-looking id stays the string it was)."""
    import pyarrow as pa

    if kind == "parquet":
        import pyarrow.parquet as pq

        parquet = pq.ParquetFile(path)
        names = parquet.schema_arrow.names
        _require(path, fields.text, names)
        columns = [name for name in (fields.text, fields.id) if name in names]
        batches: Iterator[pa.RecordBatch] = parquet.iter_batches(ARROW_BATCH_ROWS, columns=columns)
    else:
        import pyarrow.csv as pcsv

        parse = pcsv.ParseOptions(newlines_in_values=True)  # a quoted text may hold line breaks
        head = pcsv.ReadOptions(block_size=1 << 16)
        header = pcsv.open_csv(path, read_options=head, parse_options=parse).schema.names
        _require(path, fields.text, header)
        columns = [name for name in (fields.text, fields.id) if name in header]
        as_bytes = {fields.text: pa.binary(), fields.id: pa.binary()}
        convert = pcsv.ConvertOptions(include_columns=columns, column_types=as_bytes, strings_can_be_null=False)
        batches = iter(pcsv.open_csv(path, parse_options=parse, convert_options=convert))
    index = 0
    for batch in batches:
        if index + batch.num_rows <= start:
            index += batch.num_rows
            continue
        texts = _values(batch.column(fields.text))
        ids = _values(batch.column(fields.id)) if fields.id in batch.schema.names else [None] * len(texts)
        for text, found in zip(texts, ids, strict=True):
            if index >= start:
                if isinstance(found, bytes):  # an id that is not UTF-8 still names its row
                    found = found.decode("utf-8", "backslashreplace")
                row_id = index if found is None else found
                if isinstance(text, str):
                    yield Row(index, row_id, text)
                elif isinstance(text, bytes):
                    try:
                        yield Row(index, row_id, text.decode("utf-8"))
                    except UnicodeDecodeError as error:
                        yield dataclasses.replace(_not_utf8(index, error), id=row_id)
                else:
                    yield _row(index, {fields.id: row_id, fields.text: text}, fields)
            index += 1


def _values(column: Any) -> list[Any]:
    """An Arrow column's values: text as `str` where the whole batch is UTF-8 (one check in Arrow),
    else as `bytes`, for the caller to decode row by row; other types as Arrow gives them."""
    import pyarrow as pa

    kind = column.type
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        text = pa.large_string() if pa.types.is_large_binary(kind) else pa.string()
        try:
            return column.cast(text).to_pylist()
        except pa.ArrowInvalid:
            return column.to_pylist()
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        try:
            column.validate(full=True)
        except pa.ArrowInvalid:
            return column.view(pa.large_binary() if pa.types.is_large_string(kind) else pa.binary()).to_pylist()
    return column.to_pylist()


def _require(path: Path, column: str, names: list[str]) -> None:
    if column not in names:
        raise InputError(f"{path}: no column {column!r} (columns: {', '.join(names)}); set --text-field")
