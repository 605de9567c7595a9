"""Output writers: `.jsonl` and `.parquet` rows (`id`, `entities`, `error`), `--format label-studio`
(tasks with pre-annotations, `.json` as one array or `.jsonl` one task a line), and `--format redacted`
(`.jsonl` and `.parquet` rows `id`, `text` with every entity replaced by `[LABEL]`, `error`). Parquet's
`id` column is text (an input may mix numeric and string ids); JSON keeps each id as it was.

Nothing written is lost or doubled. Line formats are only appended to: lines are buffered, and a
commit flushes and fsyncs them before the progress record (resume.py) moves past them, so a rerun
after a kill cuts the file back to the recorded length (dropping a half-written line) and goes on.
Parquet rows go to part files of `part_rows` rows (a part per commit would make thousands of tiny
ones), each written under a temporary name, synced and renamed, then recorded; the rows buffered
for the next part are written as a part when the job stops (done, the target unreachable, Ctrl-C),
and after a kill they are tagged again. At the end the parts are combined into the output, which is
renamed into place.

A rerun first checks that the output still holds what the record says (`check_intact`): an output
deleted, cut short or replaced since is refused, never taken as complete nor padded to its length."""

from __future__ import annotations

import functools
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any, Protocol

import orjson

from . import formats, resume
from .rows import Outcome, Row

FORMATS = ("rows", "label-studio", "redacted", "conll", "spacy", "spans")
#: the extensions of the formats of formats.py
SUFFIXES = {
    "conll": (".conll",),
    "spacy": (".spacy",),
    "spans": (".jsonl",),
}
#: the Arrow type of one text's entities: what /predict_tokens returns for it (`results`: label -> score)
ENTITY_FIELDS = (
    ("token", "string"),
    ("token_id", "int64"),
    ("start", "int64"),
    ("end", "int64"),
)
#: Parquet rows buffered before a part file is written, by default (bounded memory, few parts; a kill
#: costs at most this many rows tagged again)
PART_ROWS = 20_000


class Writer(Protocol):
    """Where answers go, in input order. `state.rows` input rows are durable once `commit` returns."""

    state: resume.State

    def add(self, rows: Sequence[Row], outcomes: Sequence[Outcome]) -> None: ...

    def pending(self) -> int:
        """Rows added since the last commit."""
        ...

    def commit(self, stopping: bool = False) -> None:
        """Make what was added durable and record it (Parquet: once a part's worth is buffered, or
        whatever is buffered when `stopping`, as the job ends here)."""
        ...

    def finish(self) -> None:
        """Commit, then make the output whole."""
        ...


def entities_type() -> Any:
    """The fixed Arrow type of the `entities` column (also what ray_target's batches carry)."""
    import pyarrow as pa

    fields = [pa.field(name, getattr(pa, kind)()) for name, kind in ENTITY_FIELDS]
    return pa.list_(pa.struct([*fields, pa.field("results", pa.map_(pa.string(), pa.float64()))]))


def arrow_schema() -> Any:
    import pyarrow as pa

    return pa.schema([("id", pa.string()), ("entities", entities_type()), ("error", pa.string())])


def redacted_schema() -> Any:
    import pyarrow as pa

    return pa.schema([("id", pa.string()), ("text", pa.string()), ("error", pa.string())])


def open_output(
    path: Path,
    fmt: str,
    fingerprint: dict[str, Any],
    overwrite: bool,
    model_version: str,
    part_rows: int = PART_ROWS,
) -> Writer | None:
    """The writer for `path`, continuing a previous run of the same fingerprint where one stopped; None
    when that run is already complete. Raises resume.Mismatch for another run's output, or for a file
    this tool did not write; resume.Damaged for an output that no longer holds what its record says."""
    suffix = path.suffix.lower()
    if fmt == "label-studio" and suffix not in (".json", ".jsonl"):
        raise ValueError(f"{path}: --format label-studio writes .json (one array) or .jsonl (a task a line)")
    if fmt in ("rows", "redacted") and suffix not in (".jsonl", ".parquet"):
        raise ValueError(f"{path}: --format {fmt} writes .jsonl or .parquet (--format label-studio: .json, .jsonl)")
    if fmt in SUFFIXES and suffix not in SUFFIXES[fmt]:
        raise ValueError(f"{path}: --format {fmt} writes {' or '.join(SUFFIXES[fmt])}")
    previous = None if overwrite else resume.load(path)
    if previous is not None:
        resume.check(path, previous, fingerprint)
        check_intact(path, previous)
    elif not overwrite and (path.exists() or _parts(path).exists()):
        raise resume.Mismatch(
            f"{path} exists and has no {resume.state_path(path).name} of this tool: "
            "rerun with --overwrite to replace it, or write to another file"
        )
    else:
        _remove(path)
    if previous is not None and previous.complete:
        shutil.rmtree(_parts(path), ignore_errors=True)  # a kill between the last record and this removal
        return None
    state = previous or resume.State(fingerprint)
    if fmt == "redacted":
        encode = _redacted_record
    elif fmt == "label-studio":
        encode = _label_studio_task(model_version)
    else:
        encode = _row_record
    if suffix == ".parquet":
        return ParquetWriter(path, state, part_rows, encode, PARQUET_SCHEMAS[fmt])
    if fmt == "spacy":
        return formats.SpacyWriter(path, state, part_rows)
    if fmt == "conll":
        strategy = fingerprint["options"]["aggregation_strategy"]
        block = functools.partial(formats.conll_block, strategy=strategy)
        return LineWriter(path, state, block, array=False, serialize=bytes)
    if fmt == "spans":
        return LineWriter(path, state, formats.spans_record, array=False)
    return LineWriter(path, state, encode, array=suffix == ".json")


def check_intact(path: Path, state: resume.State) -> None:
    """Raise resume.Damaged unless the output holds at least what `state` records: the line formats'
    recorded bytes, Parquet's recorded parts (or, once complete, the whole file) with their rows."""
    record = resume.state_path(path).name
    again = "it cannot be continued: rerun with --overwrite to start again, or write to another file"
    if path.suffix.lower() == ".spacy":
        formats.check_spacy_intact(path, state, again)
        return
    if path.suffix.lower() != ".parquet":
        if not path.is_file():
            if state.offset or state.complete:
                written = f"{state.rows:,} rows ({state.offset:,} bytes) written"
                raise resume.Damaged(f"{path} is missing, but {record} records {written}; {again}")
            return
        size = path.stat().st_size
        if size < state.offset:
            raise resume.Damaged(
                f"{path} is {size:,} bytes, shorter than the {state.offset:,} bytes ({state.rows:,} rows) "
                f"that {record} records as written: it was cut or replaced since; {again}"
            )
        return
    files = [path] if state.complete else [_part(path, number) for number in range(state.parts)]
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = 0
    for file in files:
        if not file.is_file():
            raise resume.Damaged(f"{file} is missing, but {record} records {state.rows:,} rows written; {again}")
        try:
            rows += pq.read_metadata(file).num_rows
        except (OSError, pa.ArrowException):
            raise resume.Damaged(f"{file} is not a whole Parquet file (cut or replaced since); {again}") from None
    if rows != state.rows:
        held = f"{path} holds" if state.complete else f"the {len(files)} parts in {_parts(path)} hold"
        raise resume.Damaged(f"{held} {rows:,} rows, but {record} records {state.rows:,}; {again}")


#: the Arrow schema of each format written as Parquet
PARQUET_SCHEMAS: dict[str, Callable[[], Any]] = {"rows": arrow_schema, "redacted": redacted_schema}


def _remove(path: Path) -> None:
    for stale in (path, resume.state_path(path)):
        stale.unlink(missing_ok=True)
    shutil.rmtree(_parts(path), ignore_errors=True)


def _parts(path: Path) -> Path:
    return resume.parts_folder(path)


def _part(path: Path, number: int) -> Path:
    return _parts(path) / f"part-{number:06d}.parquet"


def _row_record(row: Row, outcome: Outcome) -> dict[str, Any]:
    if isinstance(outcome, str):
        return {"id": row.id, "entities": None, "error": outcome}
    return {"id": row.id, "entities": outcome, "error": None}


def _redacted_record(row: Row, outcome: Outcome) -> dict[str, Any]:
    """The row's text with each entity's span replaced by `[LABEL]`, the label as the model names it
    (the spans of one text's entities never overlap: the pipeline merges overlapping windows' ones)."""
    if isinstance(outcome, str):
        return {"id": row.id, "text": None, "error": outcome}
    text = row.text or ""
    pieces, end = [], 0
    for item in sorted(outcome, key=lambda item: item["start"]):
        pieces += [text[end : item["start"]], f"[{next(iter(item['results']))}]"]
        end = item["end"]
    pieces.append(text[end:])
    return {"id": row.id, "text": "".join(pieces), "error": None}


def _label_studio_task(model_version: str):
    """A Label Studio task: the text under `data`, the entities as one prediction's `labels` results
    (each with its score; the prediction's score is their mean). With strategy `none` the special tokens
    and `O` tokens are left out, as they are not spans to label. A row with an error has no prediction
    and keeps the error under `meta`."""

    def task(row: Row, outcome: Outcome) -> dict[str, Any]:
        data = {"text": row.text if row.text is not None else "", "id": row.id}
        if isinstance(outcome, str):
            return {"data": data, "predictions": [], "meta": {"error": outcome}}
        result: list[dict[str, Any]] = []
        for item in outcome:
            label, score = next(iter(item["results"].items()))
            if item["start"] == item["end"] or label == "O":
                continue
            value = {"start": item["start"], "end": item["end"], "text": item["token"], "labels": [label]}
            result.append(
                {
                    "id": f"{row.id}-{len(result)}",
                    "from_name": "label",
                    "to_name": "text",
                    "type": "labels",
                    "value": value,
                    "score": score,
                }
            )
        mean = sum(r["score"] for r in result) / len(result) if result else 0.0
        return {"data": data, "predictions": [{"model_version": model_version, "score": mean, "result": result}]}

    return task


class LineWriter:
    """One JSON value a line, or (`array`) one JSON array whose closing bracket is written by `finish`;
    with another `serialize`, `encode`'s bytes a row (CoNLL's block)."""

    def __init__(self, path: Path, state: resume.State, encode, array: bool, serialize=orjson.dumps) -> None:
        self.path, self.state, self.encode, self.array = path, state, encode, array
        self.serialize = serialize
        # the file stays open across commits (finish closes it); created when this is the first run
        self.file: IO[bytes] = os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT, 0o644), "r+b")
        self.file.truncate(state.offset)  # drops whatever a killed run wrote past its last commit
        self.file.seek(state.offset)
        if array and state.offset == 0:
            self.file.write(b"[\n")
        self.added = 0

    def add(self, rows: Sequence[Row], outcomes: Sequence[Outcome]) -> None:
        dumps, encode = self.serialize, self.encode
        lines = [dumps(encode(row, outcome)) for row, outcome in zip(rows, outcomes, strict=True)]
        if self.array:
            first = self.state.rows + self.added == 0
            self.file.write((b"" if first else b",\n") + b",\n".join(lines))
        else:
            lines.append(b"")
            self.file.write(b"\n".join(lines))
        self.added += len(rows)

    def pending(self) -> int:
        return self.added

    def commit(self, stopping: bool = False) -> None:
        if not self.added and self.state.offset:
            return
        self.file.flush()
        os.fsync(self.file.fileno())
        self.state.rows += self.added
        self.state.offset = self.file.tell()
        self.added = 0
        resume.save(self.path, self.state)

    def finish(self) -> None:
        self.commit()
        if self.array:
            self.file.write(b"\n]\n")
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        self.state.complete = True
        resume.save(self.path, self.state)


class ParquetWriter:
    """Rows buffered into part files of `part_rows` (or a few more: whole chunks are added), combined
    into the output at the end; each row the record `encode` makes of it, in `schema`'s columns (the id
    as text)."""

    def __init__(
        self,
        path: Path,
        state: resume.State,
        part_rows: int,
        encode: Callable[[Row, Outcome], dict[str, Any]],
        schema: Callable[[], Any],
    ) -> None:
        self.path, self.state, self.part_rows = path, state, part_rows
        self.encode, self.schema = encode, schema
        self.folder = _parts(path)
        self.folder.mkdir(exist_ok=True)
        for part in self.folder.iterdir():  # what a killed run wrote past its last record
            if part.suffix != ".parquet" or int(part.stem.split("-")[1]) >= state.parts:
                part.unlink()
        self.columns: dict[str, list[Any]] = {name: [] for name in schema().names}

    def add(self, rows: Sequence[Row], outcomes: Sequence[Outcome]) -> None:
        for row, outcome in zip(rows, outcomes, strict=True):
            record = self.encode(row, outcome)
            record["id"] = row.id if isinstance(row.id, str) else str(row.id)
            for name, values in self.columns.items():
                values.append(record[name])
        self.commit()

    def pending(self) -> int:
        return len(self.columns["id"])

    def commit(self, stopping: bool = False) -> None:
        """Write the buffered rows as the next part (temporary name, synced, renamed), then record it;
        only once `part_rows` are buffered, unless `stopping`."""
        buffered = self.pending()
        if not buffered or (buffered < self.part_rows and not stopping):
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = self.schema()
        table = pa.table([pa.array(self.columns[field.name], field.type) for field in schema], schema=schema)
        part = _part(self.path, self.state.parts)
        temporary = part.with_suffix(".tmp")
        pq.write_table(table, temporary)
        with open(temporary, "rb") as file:
            os.fsync(file.fileno())
        os.replace(temporary, part)
        resume.sync_folder(self.folder)
        self.state.parts += 1
        self.state.rows += buffered
        self.columns = {name: [] for name in self.columns}
        resume.save(self.path, self.state)

    def finish(self) -> None:
        """Combine the parts, one at a time, into the output under a temporary name, then rename it."""
        import pyarrow.parquet as pq

        self.commit(stopping=True)
        temporary = self.path.with_name(self.path.name + ".tmp")
        with pq.ParquetWriter(temporary, self.schema()) as combined:
            for number in range(self.state.parts):
                combined.write_table(pq.read_table(_part(self.path, number)))
        with open(temporary, "rb") as file:
            os.fsync(file.fileno())
        os.replace(temporary, self.path)
        resume.sync_folder(self.path.parent)
        self.state.complete = True
        resume.save(self.path, self.state)
        shutil.rmtree(self.folder)
