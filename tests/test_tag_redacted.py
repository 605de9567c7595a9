"""`nerserve tag --format redacted` and the entity filters of every format (`--labels`, `--min-score`),
against the shared real server process: each row's text with exactly the kept entities of the server's
own answer replaced by `[LABEL]`, JSONL and Parquet alike; the filters applied to the rows format too;
the usage errors; a rerun with other filters refused."""

from __future__ import annotations

import httpx
import pytest
from test_tag import rows_of, same_entities, tag, write_jsonl

import corpus

pq = pytest.importorskip("pyarrow.parquet")
TEXTS = corpus.texts(40)[:-4]
LABELS = {"PER", "LOC"}
MIN_SCORE = 0.3


@pytest.fixture(scope="module")
def answers(server) -> list[list[dict]]:
    """The server's own answers (strategy max) for TEXTS: what every output is made from."""
    response = httpx.post(server.url + "/predict_tokens", json={"inputs": TEXTS, "aggregation_strategy": "max"})
    assert response.status_code == 200, response.text
    return response.json()


def kept(entities: list[dict]) -> list[dict]:
    return [
        item
        for item in entities
        if next(iter(item["results"])) in LABELS and next(iter(item["results"].values())) >= MIN_SCORE
    ]


def redact(text: str, entities: list[dict]) -> str:
    """The oracle: spans replaced from the last one back, so earlier offsets stay valid."""
    for item in sorted(entities, key=lambda item: item["start"], reverse=True):
        text = text[: item["start"]] + f"[{next(iter(item['results']))}]" + text[item["end"] :]
    return text


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    folder = tmp_path_factory.mktemp("redact")
    records = [{"id": i, "text": text} for i, text in enumerate(TEXTS)] + [{"id": "no-text"}]
    return write_jsonl(folder / "in.jsonl", records)


def test_redacted_jsonl_and_parquet_with_filters(server, answers, source, tmp_path) -> None:
    filters = ["--labels", "PER,LOC", "--min-score", str(MIN_SCORE)]
    outputs = {}
    for suffix in ("jsonl", "parquet"):
        out = tmp_path / f"redacted.{suffix}"
        result = tag(source, "-o", out, "--url", server.url, "--format", "redacted", *filters)
        assert result.returncode == 0, result.stderr
        outputs[suffix] = pq.read_table(out).to_pylist() if suffix == "parquet" else rows_of(out)
    lines = outputs["jsonl"]
    assert outputs["parquet"] == [{**row, "id": str(row["id"])} for row in lines]
    assert lines[-1] == {"id": "no-text", "text": None, "error": f"missing-text: row {len(TEXTS)}: no 'text' field"}
    replaced = 0
    for row, text, entities in zip(lines, TEXTS, answers, strict=False):
        assert row == {"id": row["id"], "text": redact(text, kept(entities)), "error": None}
        replaced += len(kept(entities))
    assert replaced > 20 and any(len(kept(entities)) < len(entities) for entities in answers)

    rows = tmp_path / "rows.jsonl"  # the filters hold for every format
    assert tag(source, "-o", rows, "--url", server.url, *filters).returncode == 0
    for row, entities in zip(rows_of(rows), answers, strict=False):
        assert same_entities(row["entities"], kept(entities))

    other = tag(source, "-o", rows, "--url", server.url, "--labels", "PER")
    assert other.returncode == 2 and "labels" in other.stderr


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--format", "redacted", "--aggregation-strategy", "none"], "choose a grouped --aggregation-strategy"),
        (["--min-score", "1.5"], "--min-score must be between 0 and 1"),
        (["--labels", ","], "name at least one label"),
        (["--format", "redacted", "-o", "out.json"], "--format redacted writes .jsonl or .parquet"),
    ],
)
def test_usage_errors(server, source, tmp_path, args: list[str], words: str) -> None:
    args = [tmp_path / arg if arg.startswith("out.") else arg for arg in args]
    out = [] if "-o" in args else ["-o", tmp_path / "out.jsonl"]
    result = tag(source, *out, "--url", server.url, *args)
    assert result.returncode == 2 and words in result.stderr, result.stderr
