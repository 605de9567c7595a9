"""`nerserve tag` when things go wrong: rows that are not UTF-8, a target that is loading, overloaded,
slow or failing (retried, never a row's error; a rerun sends again what it failed), an output changed
since its state file, Parquet parts sized by rows, the API key from a file, and a full queue in process.

The target is a stub (`Stub`): a small HTTP server in a thread that answers `/info` and
`/predict_tokens` with the shapes and statuses of API.md, on a script each test sets, and records what
it was sent. The properties are the client's (its retries, reader and writer), so the model behind
the answers does not matter; the in-process test runs the real engine. The command runs as a user runs
it (`python -m nerserve tag`, test_tag's helpers)."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import orjson
import pytest
from test_tag import TEXTS, assert_same_rows, rows_of, tag, write_jsonl

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

#: what the stub's /info says (the keys tag/rows.py MODEL_KEYS reads)
INFO = {
    "model_id": "stub-model",
    "checkpoint_sha256": "0" * 64,
    "engine": "stub",
    "precision": "fp32",
    "window_stride": 128,
    "max_input_tokens": 512,
}
#: a script's step that answers nothing until the client has given up (run with --timeout 0.5)
SLOW = -1
ERROR_TYPES = {413: "Validation", 429: "Overloaded", 500: "Backend", 503: "Unhealthy", 504: "Timeout"}


def entities(text: str) -> list[dict]:
    """The stub's answer for one text: its first word as a PER entity, so each row shows its text."""
    word = text.split(" ")[0]
    return [{"token": word, "token_id": 0, "start": 0, "end": len(word), "results": {"PER": 0.5}}] if word else []


#: (the request's texts, how many times these texts were sent before) -> the status to answer (or SLOW)
Rule = Callable[[list[str], int], int]


class Stub:
    """The target: `rule` decides each /predict_tokens answer; /info answers 503 `info_failures`
    times first. `sent` logs each request's texts and status; `keys` the Authorization headers."""

    def __init__(self) -> None:
        stub = self
        self.reset()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path != "/info":
                    return self.reply(404, {"error": "no such route", "error_type": "NotFound"})
                stub.info_calls += 1
                if stub.info_calls <= stub.info_failures:
                    return self.reply(503, {"error": "loading", "error_type": "Unhealthy"}, {"Retry-After": "0"})
                self.reply(200, {**INFO, "labels": ["O", "B-PER"]})

            def do_POST(self) -> None:
                body = orjson.loads(self.rfile.read(int(self.headers["content-length"])))
                texts = body["inputs"]
                with stub.lock:
                    attempt = stub.attempts[tuple(texts)]
                    stub.attempts[tuple(texts)] += 1
                    stub.keys.append(self.headers.get("authorization"))
                status = stub.rule(texts, attempt)
                stub.sent.append((texts, status))
                if status == SLOW:
                    threading.Event().wait(1.0)
                    status = 200
                if status == 200:
                    return self.reply(200, [entities(text) for text in texts])
                headers = {"Retry-After": "0"} if status in (429, 503, 504) else {}
                self.reply(status, {"error": f"stub {status}", "error_type": ERROR_TYPES[status]}, headers)

            def reply(self, status: int, body: object, headers: dict[str, str] | None = None) -> None:
                data = orjson.dumps(body)
                try:
                    self.send_response(status)
                    for name, value in {"content-type": "application/json", **(headers or {})}.items():
                        self.send_header(name, value)
                    self.send_header("content-length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (SLOW)
                    pass

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def reset(self) -> None:
        self.rule: Rule = lambda texts, attempt: 200
        self.info_failures = self.info_calls = 0
        self.attempts: Counter[tuple[str, ...]] = Counter()
        self.sent: list[tuple[list[str], int]] = []
        self.keys: list[str | None] = []
        self.lock = threading.Lock()


@pytest.fixture(scope="module")
def module_stub() -> Iterator[Stub]:
    stub = Stub()
    yield stub
    stub.server.shutdown()


@pytest.fixture
def stub(module_stub: Stub) -> Stub:
    module_stub.reset()
    return module_stub


def texts(count: int) -> list[str]:
    return [f"Name{i} visited Paris on day {i}." for i in range(count)]


def corpus(folder: Path, count: int) -> Path:
    return write_jsonl(folder / "in.jsonl", [{"id": f"r{i}", "text": text} for i, text in enumerate(texts(count))])


def expected(count: int, start: int = 0) -> list[dict]:
    return [{"id": f"r{i}", "entities": entities(t), "error": None} for i, t in enumerate(texts(count))][start:]


def state_of(out: Path) -> dict:
    return orjson.loads(out.with_name(out.name + ".state.json").read_bytes())


def fail_from(first: int, status: int = 504) -> Rule:
    """Every request holding a text from row `first` on gets `status`, for ever."""
    failing = set(texts(100)[first:])
    return lambda batch, attempt: status if failing & set(batch) else 200


UNDECODABLE = {
    ".txt": b"Angela visited Paris\nbad \xff byte here\nParis again\n",
    ".jsonl": b'{"id": "a", "text": "Angela visited Paris"}\n{"id": "b", "text": "bad \xff byte"}\n'
    b'{"id": "c", "text": "Paris again"}\n',
    ".csv": b'id,text\na,Angela visited Paris\nb,"bad \xff byte"\nc,Paris again\n',
}


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".csv", ".parquet"])
def test_a_row_that_is_not_utf8_is_that_rows_error(stub, tmp_path, suffix) -> None:
    """One invalid UTF-8 row in a .txt, .jsonl, .csv (in the same Arrow block as good rows) or a Parquet
    string column: that row's error, kind not-utf8, every other row tagged, exit 0."""
    source = tmp_path / f"in{suffix}"
    if suffix == ".parquet":
        raw = pa.array([b"Angela visited Paris", b"bad \xff byte", b"Paris again"], pa.binary())
        pq.write_table(pa.table({"id": ["a", "b", "c"], "text": raw.view(pa.string())}), source)
    else:
        source.write_bytes(UNDECODABLE[suffix])
    out = tmp_path / "out.jsonl"
    result = tag(source, "-o", out, "--url", stub.url)
    assert result.returncode == 0, result.stderr
    rows = rows_of(out)
    assert [row["id"] for row in rows] == ([0, 1, 2] if suffix == ".txt" else ["a", "b", "c"])
    assert [row["entities"] for row in rows] == [entities("Angela"), None, entities("Paris")]
    assert rows[1]["error"].startswith("not-utf8: row 1: byte 0xff at ") and rows[1]["error"].endswith("not UTF-8")
    assert rows[0]["error"] is None and rows[2]["error"] is None
    assert "not-utf8 1" in result.stderr


def test_overload_loading_and_timeouts_are_retried_never_row_errors(stub, tmp_path) -> None:
    """/info answers 503 (loading) twice; each text then gets a timeout or 503, 429 and three 504s
    before its 200: the job retries them all and writes no row error for them. Only the text refused
    for itself (413) and the one the engine fails on (500, every time) get errors, and the summary names
    the failure. A packed request that gets 504 goes again in halves, not a text at a time."""
    rows = texts(10)
    refused, broken, slow = rows[3], rows[6], rows[8]

    def rule(batch: list[str], attempt: int) -> int:
        (text,) = batch
        if text == refused:
            return 413
        if text == broken:
            return 500
        if text == slow:
            return SLOW if attempt == 0 else 200
        return [503, 429, 504, 504, 504, 200][min(attempt, 5)]

    stub.rule, stub.info_failures = rule, 2
    out = tmp_path / "out.jsonl"
    result = tag(corpus(tmp_path, 10), "-o", out, "--url", stub.url, "--batch-rows", "1", "--timeout", "0.5")
    assert result.returncode == 0, result.stderr
    got = rows_of(out)
    want = expected(10)
    assert [row["error"] and row["error"].split(":")[0] for row in got] == [
        "refused" if i == 3 else "failed" if i == 6 else None for i in range(10)
    ]
    assert "HTTP 413" in got[3]["error"] and "HTTP 500" in got[6]["error"]
    for i in (3, 6):
        want[i] = got[i]
    assert_same_rows(got, want)
    for reason in ("503 x", "429 x", "504 x", "timeout x"):
        assert reason in result.stderr
    assert "note: 1 rows failed in the engine (HTTP 500" in result.stderr
    assert stub.info_calls == 3 and state_of(out)["fingerprint"]["model"] == INFO

    stub.reset()
    stub.rule = lambda batch, attempt: 504 if len(batch) > 2 else 200
    packed = tmp_path / "packed.jsonl"
    result = tag(corpus(tmp_path, 16), "-o", packed, "--url", stub.url, "--batch-rows", "8")
    assert result.returncode == 0, result.stderr
    assert_same_rows(rows_of(packed), expected(16))
    assert {len(batch) for batch, _ in stub.sent} == {8, 4, 2}


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_a_rerun_sends_again_what_the_target_failed(stub, tmp_path, suffix) -> None:
    """The target answers 504 for every row from row 12 on, past the retries: the job stops with exit 1,
    having written rows 0-11 and no error row. Once the target is well, the same command writes rows
    12-19 after them: every row once, in order, none with an error."""
    source, out = corpus(tmp_path, 20), tmp_path / f"out{suffix}"
    args = [source, "-o", out, "--url", stub.url, "--batch-rows", "1", "--max-retries", "2", "--part-rows", "5"]
    stub.rule = fail_from(12)
    stopped = tag(*args)
    assert stopped.returncode == 1, stopped.stderr
    assert "rerun the same command to go on" in stopped.stderr and "HTTP 504" in stopped.stderr
    assert state_of(out)["rows"] == 12
    written = rows_of(out) if suffix == ".jsonl" else pq.read_table(out.with_name(out.name + ".parts")).to_pylist()
    assert [(row["id"], row["error"]) for row in written] == [(f"r{i}", None) for i in range(12)]

    stub.rule = lambda batch, attempt: 200
    rerun = tag(*args)
    assert rerun.returncode == 0, rerun.stderr
    assert "+12 from an earlier run" in rerun.stderr
    assert_same_rows(rows_of(out), expected(20))


def test_the_fingerprint_does_not_depend_on_info_loading(stub, tmp_path) -> None:
    """A first run that met /info answering 503 (loading) three times and a rerun that did not have the
    same fingerprint: the rerun finds the job complete, not another run's output. /info loading past
    the retries ends the job before anything is written."""
    source, out = corpus(tmp_path, 5), tmp_path / "out.jsonl"
    stub.info_failures = 3
    first = tag(source, "-o", out, "--url", stub.url)
    assert first.returncode == 0, first.stderr
    assert state_of(out)["fingerprint"]["model"] == INFO
    stub.reset()
    again = tag(source, "-o", out, "--url", stub.url)
    assert again.returncode == 0 and "already complete" in again.stderr, again.stderr

    stub.info_failures = 100
    never = tmp_path / "never.jsonl"
    loading = tag(source, "-o", never, "--url", stub.url, "--max-retries", "2")
    assert loading.returncode == 1
    assert f"{stub.url}/info: HTTP 503" in loading.stderr and "after 2 retries" in loading.stderr
    assert not never.exists() and not never.with_name(never.name + ".state.json").exists()


def test_a_line_output_missing_or_cut_since_its_record_is_refused(stub, tmp_path) -> None:
    """A finished output deleted: exit 2 naming the file, not "already complete". A stopped run's output
    cut to half its recorded length: exit 2 with both sizes, the file left as it was (no NUL padding).
    --overwrite starts again."""
    source, out = corpus(tmp_path, 20), tmp_path / "out.jsonl"
    args = [source, "-o", out, "--url", stub.url, "--batch-rows", "1", "--max-retries", "1"]
    assert tag(*args).returncode == 0
    out.unlink()
    missing = tag(*args)
    assert missing.returncode == 2, missing.stderr
    assert f"{out} is missing, but out.jsonl.state.json records 20 rows" in missing.stderr
    assert "--overwrite" in missing.stderr and not out.exists()

    stub.rule = fail_from(12)
    assert tag(*args, "--overwrite").returncode == 1
    stub.rule = lambda batch, attempt: 200
    recorded = state_of(out)["offset"]
    cut = out.read_bytes()[: recorded // 2]
    out.write_bytes(cut)
    short = tag(*args)
    assert short.returncode == 2, short.stderr
    assert f"{out} is {len(cut):,} bytes, shorter than the {recorded:,} bytes (12 rows)" in short.stderr
    assert "--overwrite" in short.stderr and out.read_bytes() == cut
    again = tag(*args, "--overwrite")
    assert again.returncode == 0, again.stderr
    assert_same_rows(rows_of(out), expected(20))


def test_a_parquet_output_or_part_missing_since_its_record_is_refused(stub, tmp_path) -> None:
    """Parquet: a finished output deleted, or cut short, and a stopped run's part deleted: each exit 2
    naming the file."""
    source, out = corpus(tmp_path, 20), tmp_path / "out.parquet"
    args = [source, "-o", out, "--url", stub.url, "--batch-rows", "1", "--max-retries", "1", "--part-rows", "4"]
    assert tag(*args).returncode == 0
    whole = out.read_bytes()
    out.unlink()
    missing = tag(*args)
    assert missing.returncode == 2 and f"{out} is missing, but out.parquet.state.json records 20 rows" in missing.stderr
    out.write_bytes(whole[: len(whole) // 2])
    cut = tag(*args)
    assert cut.returncode == 2 and f"{out} is not a whole Parquet file" in cut.stderr, cut.stderr

    stub.rule = fail_from(12)
    assert tag(*args, "--overwrite").returncode == 1
    stub.rule = lambda batch, attempt: 200
    part = out.with_name("out.parquet.parts") / "part-000001.parquet"
    part.unlink()
    lost = tag(*args)
    assert lost.returncode == 2 and f"{part} is missing, but out.parquet.state.json records 12 rows" in lost.stderr
    again = tag(*args, "--overwrite")
    assert again.returncode == 0, again.stderr
    assert_same_rows(rows_of(out), expected(20))


def test_parquet_parts_are_sized_by_rows_not_by_commits(stub, tmp_path) -> None:
    """1,000 rows committed every 0.01 s, 10 rows a request: one part (so one row group in the output),
    not one per commit; with --part-rows 250, four of 250."""
    source, out = corpus(tmp_path, 1000), tmp_path / "out.parquet"
    args = [source, "-o", out, "--url", stub.url, "--batch-rows", "10", "--commit-every", "0.01"]
    result = tag(*args)
    assert result.returncode == 0, result.stderr
    assert pq.ParquetFile(out).metadata.num_row_groups == 1
    assert_same_rows(rows_of(out), expected(1000))
    result = tag(*args, "--part-rows", "250", "--overwrite")
    assert result.returncode == 0, result.stderr
    metadata = pq.ParquetFile(out).metadata
    assert [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)] == [250] * 4


def test_the_api_key_from_a_file_never_from_the_command_line(stub, tmp_path) -> None:
    """--api-key-file: the key stripped, sent as Authorization: Api-Key. No option takes the key itself
    (`--api-key KEY` is not read as an abbreviation of --api-key-env); an empty file, or both ways at
    once, is a usage error."""
    source, out = corpus(tmp_path, 3), tmp_path / "out.jsonl"
    key_file = tmp_path / "key"
    key_file.write_text("  s3cret-key\n")
    result = tag(source, "-o", out, "--url", stub.url, "--api-key-file", key_file)
    assert result.returncode == 0, result.stderr
    assert stub.keys and set(stub.keys) == {"Api-Key s3cret-key"}
    flag = tag(source, "-o", tmp_path / "flag.jsonl", "--url", stub.url, "--api-key", "s3cret-key")
    assert flag.returncode == 2 and "unrecognized arguments: --api-key" in flag.stderr
    key_file.write_text("\n")
    empty = tag(source, "-o", tmp_path / "empty.jsonl", "--url", stub.url, "--api-key-file", key_file)
    assert empty.returncode == 2 and "the file is empty" in empty.stderr
    both = tag(source, "-o", out, "--url", stub.url, "--api-key-file", key_file, "--api-key-env", "X")
    assert both.returncode == 2 and "not allowed with" in both.stderr


def test_in_process_a_full_queue_is_waited_out(built, tmp_path) -> None:
    """In process with a queue of one sequence, the second of the two requests in flight finds it full
    (429 in the server's terms): it waits and goes again; no row is "refused"."""
    source = write_jsonl(tmp_path / "in.jsonl", [{"text": text} for text in TEXTS])
    out = tmp_path / "out.jsonl"
    model = ["--checkpoint", built("wordpiece-cased"), "--engine", "onnxruntime", "--batch-rows", "4"]
    result = tag(source, "-o", out, *model, env={"NERSERVE_QUEUE_SIZE": "1"})
    assert result.returncode == 0, result.stderr
    rows = rows_of(out)
    assert len(rows) == len(TEXTS) and all(row["error"] is None for row in rows), Counter(row["error"] for row in rows)
    assert "queue full x" in result.stderr  # the test did meet a full queue
