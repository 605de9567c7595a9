"""The output formats beside `rows` and `label-studio` (outputs.py), one class or function each:

- `conll` (`.conll`): CoNLL IOB2, a block per row (a token and its tag a line, a blank line after), its
  tokens the row's text split on white space, an entity's tags on the tokens it covers (the evaluator's
  reading, evaluation/scheme.py, so `nerserve eval` reads the file back as gold). A row with an error, or
  a text without a token, has no block: count its blocks against the summary's rows, not the input's.
- `spans` (`.jsonl`): `{"id", "text", "spans": [{"start", "end", "label", "score"}], "error"}` a line,
  the shape `nerserve eval` reads as gold (with strategy `none`, each token's label but O, as the model
  names it, B-/I- included).
- `spacy` (`.spacy`): a spaCy DocBin, a doc per row: the row's text (tokenized by `spacy.blank("xx")`),
  the entities as spans widened to token boundaries (`alignment_mode="expand"`; where two then overlap,
  spaCy's filter_spans keeps the longer), `user_data` holding the row's `id`, its `error`, and how many
  of its entities were `adjusted` (widened) or `dropped` (overlapping once widened).

Resume: `conll` and `spans` are line formats, only appended to (outputs.LineWriter). A DocBin is one
file, so `spacy` writes part files as Parquet does (`OUTPUT.parts/part-NNNNNN.spacy`, `part_rows` docs
each, a temporary name synced and renamed, then recorded), merges them into the output under a
temporary name at the end and renames it into place; after a kill the rows past the last part are
tagged again."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..evaluation.scheme import answer_tags, whitespace_tokens
from . import resume
from .rows import Outcome, Row

#: a model's entities as spans: (start, end, label, score)
Entity = tuple[int, int, str, float]


def entities_of(outcome: list[dict[str, Any]]) -> list[Entity]:
    """An answer's entities; for strategy `none`, its tokens but O and the special tokens."""
    found: list[Entity] = []
    for item in outcome:
        label, score = next(iter(item["results"].items()))
        if item["start"] < item["end"] and label != "O":
            found.append((item["start"], item["end"], label, score))
    return found


def spans_record(row: Row, outcome: Outcome) -> dict[str, Any]:
    """The `spans` line of a row."""
    if isinstance(outcome, str):
        return {"id": row.id, "text": row.text, "spans": None, "error": outcome}
    spans = [{"start": s, "end": e, "label": label, "score": score} for s, e, label, score in entities_of(outcome)]
    return {"id": row.id, "text": row.text, "spans": spans, "error": None}


def conll_block(row: Row, outcome: Outcome, strategy: str) -> bytes:
    """A row's CoNLL block, its last line's end included (the writer adds the blank line after it; a
    row with an error or without a token is just that blank line, which a CoNLL reader skips)."""
    if isinstance(outcome, str) or row.text is None:
        return b""
    tokens = whitespace_tokens(row.text)
    if not tokens:
        return b""
    tags = answer_tags(tokens, outcome, strategy)
    lines = [f"{row.text[start:end]} {tag}\n" for (start, end), tag in zip(tokens, tags, strict=True)]
    return "".join(lines).encode("utf-8", "surrogatepass")


def spacy_part(path: Path, number: int) -> Path:
    return resume.parts_folder(path) / f"part-{number:06d}.spacy"


def spacy_docs(file: Path) -> int:
    """Docs in a DocBin file; raises resume.Damaged for a file that is not one."""
    from spacy.tokens import DocBin

    try:
        return len(DocBin().from_disk(file))
    except (OSError, ValueError) as error:
        raise resume.Damaged(f"{file} is not a whole spaCy DocBin ({error})") from None


class SpacyWriter:
    """Docs buffered into DocBin parts of `part_rows` (or a few more: whole chunks are added), merged
    into the output at the end (module docstring)."""

    def __init__(self, path: Path, state: resume.State, part_rows: int) -> None:
        import spacy

        self.path, self.state, self.part_rows = path, state, part_rows
        self.nlp = spacy.blank("xx")
        self.folder = resume.parts_folder(path)
        self.folder.mkdir(exist_ok=True)
        for part in self.folder.iterdir():  # what a killed run wrote past its last record
            if part.suffix != ".spacy" or int(part.stem.split("-")[1]) >= state.parts:
                part.unlink()
        self.docs: list[Any] = []
        self.adjusted = self.dropped = 0

    def add(self, rows: Sequence[Row], outcomes: Sequence[Outcome]) -> None:
        for row, outcome in zip(rows, outcomes, strict=True):
            self.docs.append(self._doc(row, outcome))
        self.commit()

    def _doc(self, row: Row, outcome: Outcome) -> Any:
        from spacy.util import filter_spans

        doc = self.nlp.make_doc(row.text or "")
        doc.user_data.update({"id": row.id, "error": outcome if isinstance(outcome, str) else None})
        if isinstance(outcome, str):
            return doc
        spans, adjusted, dropped = [], 0, 0
        for start, end, label, _ in entities_of(outcome):
            span = doc.char_span(start, end, label=label, alignment_mode="expand")
            if span is None:  # nothing but white space: no token to widen to
                dropped += 1
                continue
            adjusted += (span.start_char, span.end_char) != (start, end)
            spans.append(span)
        kept = filter_spans(spans)
        doc.ents = kept
        dropped += len(spans) - len(kept)
        doc.user_data.update({"adjusted": adjusted, "dropped": dropped})
        self.adjusted += adjusted
        self.dropped += dropped
        return doc

    def pending(self) -> int:
        return len(self.docs)

    def commit(self, stopping: bool = False) -> None:
        """Write the buffered docs as the next part (temporary name, synced, renamed), then record it;
        only once `part_rows` are buffered, unless `stopping`."""
        if not self.docs or (len(self.docs) < self.part_rows and not stopping):
            return
        from spacy.tokens import DocBin

        part = spacy_part(self.path, self.state.parts)
        resume.replace_durably(part, DocBin(docs=self.docs, store_user_data=True).to_bytes())
        self.state.parts += 1
        self.state.rows += len(self.docs)
        self.docs = []
        resume.save(self.path, self.state)

    def finish(self) -> None:
        """Merge the parts into the output under a temporary name, then rename it."""
        from spacy.tokens import DocBin

        self.commit(stopping=True)
        merged = DocBin(store_user_data=True)
        for number in range(self.state.parts):
            merged.merge(DocBin(store_user_data=True).from_disk(spacy_part(self.path, number)))
        resume.replace_durably(self.path, merged.to_bytes())
        self.state.complete = True
        resume.save(self.path, self.state)
        shutil.rmtree(self.folder)

    def note(self) -> str:
        """The summary's line: how many entities were widened to token boundaries or dropped."""
        return (
            f"spacy: {self.adjusted:,} entity spans adjusted to token boundaries (alignment_mode=expand), "
            f"{self.dropped:,} dropped as overlapping once widened (this run's rows; each doc's user_data has its own)"
        )


def check_spacy_intact(path: Path, state: resume.State, again: str) -> None:
    """Raise resume.Damaged unless the recorded parts (or, once complete, the output) hold the recorded docs."""
    record = resume.state_path(path).name
    files = [path] if state.complete else [spacy_part(path, number) for number in range(state.parts)]
    docs = 0
    for file in files:
        if not file.is_file():
            raise resume.Damaged(f"{file} is missing, but {record} records {state.rows:,} rows written; {again}")
        docs += spacy_docs(file)
    if docs != state.rows:
        raise resume.Damaged(
            f"{', '.join(map(str, files))} hold {docs:,} docs, but {record} records {state.rows:,}; {again}"
        )
