"""`nerserve tag`: every input and output format, order and exactly-once across a SIGKILL and a rerun,
a server killed and restarted mid-run, each kind of bad row, 429 back-off, an API key, in process vs
HTTP vs Ray, Label Studio output read back, and a rerun with other options refused.

Real servers (conftest's ServerProcess), real engines (ONNX Runtime on a checkpoint the tests build),
and a real local Ray cluster; the command runs as `python -m nerserve tag`, as a user runs it."""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import orjson
import pytest

import corpus
from conftest import ROOT, ServerProcess, free_port

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
KEY = "tag-test-key"
#: the main server's body limit: one row of the bad-rows file is over it (413), every packed request under
BODY_LIMIT = 20_000


def _texts() -> list[str]:
    """Varied texts (accents, CJK, emoji, odd spaces, the empty text) and one over the model's length."""
    texts = corpus.texts(150)[:-4]
    return [*texts, corpus.long_text(random.Random(7), 700)]


TEXTS = _texts()


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(record) + b"\n" for record in records))
    return path


def tag(*args: object, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python -m nerserve tag ARGS`, as a user runs it (its settings from config.yaml, none of ours)."""
    return subprocess.run([*tag_command(*args)], env=tag_env(env), capture_output=True, text=True, timeout=timeout)


def tag_command(*args: object) -> list[str]:
    return [sys.executable, "-m", "nerserve", "tag", *map(str, args)]


def tag_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NERSERVE_")}
    return {**env, "PYTHONPATH": str(ROOT / "packages"), **(extra or {})}


def rows_of(path: Path) -> list[dict]:
    """The output's rows as dicts (Parquet's `results` map read back as a dict)."""
    if path.suffix == ".parquet":
        rows = pq.read_table(path).to_pylist()
        for row in rows:
            for item in row["entities"] or []:
                item["results"] = dict(item["results"])
        return rows
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def same_entities(got: list[dict] | None, want: list[dict] | None) -> bool:
    """Spans, tokens and labels equal; scores to 1e-5 (batches of other shapes round differently)."""
    if got is None or want is None:
        return got is want
    return len(got) == len(want) and all(
        {k: v for k, v in a.items() if k != "results"} == {k: v for k, v in b.items() if k != "results"}
        and list(a["results"]) == list(b["results"])
        and all(abs(a["results"][k] - b["results"][k]) < 1e-5 for k in a["results"])
        for a, b in zip(got, want, strict=True)
    )


def assert_same_rows(got: list[dict], want: list[dict]) -> None:
    assert [row["id"] for row in got] == [row["id"] for row in want]
    assert [row["error"] for row in got] == [row["error"] for row in want]
    for a, b in zip(got, want, strict=True):
        assert same_entities(a["entities"], b["entities"]), (a, b)


def last_line(result: subprocess.CompletedProcess) -> str:
    return result.stderr.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def checkpoint(built) -> Path:
    return built("wordpiece-cased")


@pytest.fixture(scope="module")
def main_server(checkpoint):
    process = ServerProcess(
        {"CHECKPOINT": str(checkpoint), "ENGINE": "onnxruntime", "WORKERS": "1", "MAX_BODY_BYTES": str(BODY_LIMIT)}
    )
    process.wait_ready()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def expected(main_server) -> list[list[dict]]:
    """The server's own answers for TEXTS (strategy max), one request per text."""
    with httpx.Client(base_url=main_server.url, timeout=60) as client:
        return [
            client.post("/predict_tokens", json={"inputs": [text], "aggregation_strategy": "max"}).json()[0]
            for text in TEXTS
        ]


@pytest.fixture(scope="module")
def corpus_jsonl(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tag-input")
    return write_jsonl(folder / "corpus.jsonl", [{"id": f"doc-{i}", "text": text} for i, text in enumerate(TEXTS)])


@pytest.fixture(scope="module")
def reference(main_server, corpus_jsonl, tmp_path_factory) -> list[dict]:
    """One uninterrupted run over HTTP: what every other run must equal."""
    out = tmp_path_factory.mktemp("tag-reference") / "out.jsonl"
    result = tag(corpus_jsonl, "-o", out, "--url", main_server.url)
    assert result.returncode == 0, result.stderr
    return rows_of(out)


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray cluster for the module (2 CPUs, no dashboard); its address for the command."""
    ray = pytest.importorskip("ray")
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(ROOT / "packages")}},
    )
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def test_http_rows_equal_the_servers_answers(reference, expected) -> None:
    assert [row["id"] for row in reference] == [f"doc-{i}" for i in range(len(TEXTS))]
    assert all(row["error"] is None for row in reference)
    for row, want in zip(reference, expected, strict=True):
        assert same_entities(row["entities"], want), row["id"]
    assert sum(len(row["entities"]) for row in reference) > 50  # the random checkpoint does tag entities


def test_every_input_format(main_server, reference, tmp_path) -> None:
    """The same texts as .jsonl (other field names), .csv, .parquet and .txt give the same entities."""
    ids = [f"doc-{i}" for i in range(len(TEXTS))]
    renamed = write_jsonl(tmp_path / "renamed.jsonl", [{"key": i, "body": t} for i, t in zip(ids, TEXTS, strict=True)])
    with open(tmp_path / "in.csv", "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["id", "text"])
        writer.writerows(zip(ids, TEXTS, strict=True))
    pq.write_table(pa.table({"id": ids, "text": TEXTS}), tmp_path / "in.parquet")
    for path, extra in (
        (renamed, ["--text-field", "body", "--id-field", "key"]),
        (tmp_path / "in.csv", []),
        (tmp_path / "in.parquet", []),
    ):
        out = tmp_path / f"{path.stem}-{path.suffix[1:]}.jsonl"
        result = tag(path, "-o", out, "--url", main_server.url, *extra)
        assert result.returncode == 0, result.stderr
        assert_same_rows(rows_of(out), reference)
    # .txt: one text a line, so only texts without line breaks; the ids are the line numbers
    lines = [i for i, text in enumerate(TEXTS) if not any(c in text for c in "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028")]
    (tmp_path / "in.txt").write_text("".join(TEXTS[i] + "\n" for i in lines), encoding="utf-8")
    result = tag(tmp_path / "in.txt", "-o", tmp_path / "txt.jsonl", "--url", main_server.url)
    assert result.returncode == 0, result.stderr
    rows = rows_of(tmp_path / "txt.jsonl")
    assert [row["id"] for row in rows] == list(range(len(lines)))
    for row, i in zip(rows, lines, strict=True):
        assert same_entities(row["entities"], reference[i]["entities"])


def test_parquet_output(main_server, corpus_jsonl, reference, tmp_path) -> None:
    out = tmp_path / "out.parquet"
    result = tag(corpus_jsonl, "-o", out, "--url", main_server.url)
    assert result.returncode == 0, result.stderr
    table = pq.read_table(out)
    assert table.schema.names == ["id", "entities", "error"]
    assert_same_rows(rows_of(out), reference)
    assert not (tmp_path / "out.parquet.parts").exists()


def test_label_studio_output_parsed_back(main_server, corpus_jsonl, reference, tmp_path) -> None:
    """Tasks as Label Studio imports them: data.text, and predictions[].result[] with value.start, end,
    text, labels and a score, one per entity."""
    out = tmp_path / "tasks.json"
    result = tag(corpus_jsonl, "-o", out, "--url", main_server.url, "--format", "label-studio")
    assert result.returncode == 0, result.stderr
    tasks = json.loads(out.read_text(encoding="utf-8"))
    assert len(tasks) == len(TEXTS)
    for task, text, row in zip(tasks, TEXTS, reference, strict=True):
        assert task["data"] == {"text": text, "id": row["id"]}
        (prediction,) = task["predictions"]
        results = prediction["result"]
        assert len(results) == len(row["entities"])
        for item, entity in zip(results, row["entities"], strict=True):
            value = item["value"]
            assert (item["from_name"], item["to_name"], item["type"]) == ("label", "text", "labels")
            assert (value["start"], value["end"]) == (entity["start"], entity["end"])
            assert value["text"] == text[value["start"] : value["end"]] == entity["token"]
            assert value["labels"] == list(entity["results"])
            assert abs(item["score"] - next(iter(entity["results"].values()))) < 1e-5
        if results:
            assert abs(prediction["score"] - sum(r["score"] for r in results) / len(results)) < 1e-9


def test_each_bad_row_is_a_row(main_server, tmp_path) -> None:
    """A line that is not JSON, a missing and a non-string text, a text the server refuses (413, over its
    body limit): each gets its error, every other row its answer, and the job exits 0."""
    good = {"id": "good", "text": "Angela Merkel visited Paris."}
    lines = [
        orjson.dumps(good),
        b"{not json",
        orjson.dumps({"id": "no-text"}),
        orjson.dumps({"id": "number", "text": 42}),
        orjson.dumps({"id": "huge", "text": "word " * BODY_LIMIT}),
        b"[1, 2]",
        orjson.dumps({**good, "id": "good-again"}),
    ]
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "out.jsonl"
    result = tag(path, "-o", out, "--url", main_server.url)
    assert result.returncode == 0, result.stderr
    rows = rows_of(out)
    assert [row["id"] for row in rows] == ["good", 1, "no-text", "number", "huge", 5, "good-again"]
    kinds = [row["error"] and row["error"].split(":")[0] for row in rows]
    assert kinds == [None, "not-json", "missing-text", "not-a-string", "refused", "not-json", None]
    assert "HTTP 413" in rows[4]["error"]
    assert rows[0]["entities"] == rows[6]["entities"]
    assert last_line(result).startswith("done: 2 rows answered, 5 rows with an error")
    assert "refused 1" in result.stderr and "not-json 2" in result.stderr


def test_a_file_without_the_text_column_does_not_start(main_server, tmp_path) -> None:
    pq.write_table(pa.table({"body": ["a"]}), tmp_path / "in.parquet")
    result = tag(tmp_path / "in.parquet", "-o", tmp_path / "out.jsonl", "--url", main_server.url)
    assert result.returncode == 2
    assert "no column 'text'" in result.stderr and "--text-field" in result.stderr


def _kill_mid_run(command: list[str], out: Path, total: int) -> int:
    """Start the command, SIGKILL it once its progress record shows some rows but not all; the rows then."""
    state = out.with_name(out.name + ".state.json")
    process = subprocess.Popen(command, env=tag_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            if state.exists():
                rows = orjson.loads(state.read_bytes())["rows"]
                if 0 < rows < total:
                    process.send_signal(signal.SIGKILL)
                    process.wait()
                    return rows
            time.sleep(0.01)
    finally:
        process.kill()
        process.wait()
    raise AssertionError("the run ended before it could be killed half way")


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet", ".json"])
def test_sigkill_and_rerun_equal_an_uninterrupted_run(main_server, corpus_jsonl, reference, tmp_path, suffix) -> None:
    """Killed half way (a torn last line added, as a kill inside a write leaves one), then rerun: the same
    ids in the same order with the same entities as an uninterrupted run, each row once (`.json`: Label
    Studio's array, whole again after the rerun)."""
    out = tmp_path / f"out{suffix}"
    args = [corpus_jsonl, "-o", out, "--url", main_server.url, "--max-concurrency", "1", "--batch-rows", "2"]
    if suffix == ".json":
        args += ["--format", "label-studio"]
    if suffix == ".parquet":
        args += ["--part-rows", "2"]  # a part a request, so the kill falls between recorded parts
    written = _kill_mid_run([*tag_command(*args, "--commit-every", "0")], out, len(TEXTS))
    if suffix != ".parquet":
        with open(out, "ab") as file:
            file.write(b'{"id":"doc-torn","entities":[{"tok')
    result = tag(*args)
    assert result.returncode == 0, result.stderr
    assert f"+{written:,} from an earlier run" in result.stderr
    if suffix == ".json":
        tasks = json.loads(out.read_text(encoding="utf-8"))
        assert [task["data"]["id"] for task in tasks] == [row["id"] for row in reference]
        assert [len(task["predictions"][0]["result"]) for task in tasks] == [len(row["entities"]) for row in reference]
    else:
        assert_same_rows(rows_of(out), reference)


class Restartable:
    """A server that a test may kill and start again on the same port (`server` is the one running)."""

    def __init__(self, settings: dict[str, str]) -> None:
        self.settings = settings
        self.server = ServerProcess(settings)
        self.server.wait_ready()

    def kill_and_restart(self) -> None:
        self.server.process.send_signal(signal.SIGKILL)
        self.server.process.wait()
        self.server = ServerProcess(self.settings, port=self.server.port)
        self.server.wait_ready()


@pytest.fixture(scope="module")
def busy_server(checkpoint):
    """A server with an API key whose queue holds 2 sequences (a third concurrent request gets 429)."""
    restartable = Restartable(
        {"CHECKPOINT": str(checkpoint), "ENGINE": "onnxruntime", "WORKERS": "1", "QUEUE_SIZE": "2", "API_KEY": KEY}
    )
    yield restartable
    restartable.server.stop()


def test_429_back_off_and_api_key(busy_server, reference, tmp_path) -> None:
    """16 concurrent one-text requests against a queue of 2: most get 429 with Retry-After; the job backs
    off and finishes with every row. The key goes as Authorization: Api-Key; a job with a wrong one stops
    at once, saying so."""
    first = [{"id": row["id"], "text": text} for row, text in zip(reference[:40], TEXTS, strict=False)]
    source = write_jsonl(tmp_path / "in.jsonl", first)
    out = tmp_path / "out.jsonl"
    args = [source, "-o", out, "--url", busy_server.server.url, "--batch-rows", "1", "--api-key-env", "TAG_TEST_KEY"]
    result = tag(*args, "--max-concurrency", "16", env={"TAG_TEST_KEY": KEY})
    assert result.returncode == 0, result.stderr
    assert "429 x" in result.stderr
    assert_same_rows(rows_of(out), reference[:40])
    refused = tag(*args, "--overwrite", env={"TAG_TEST_KEY": "wrong"})
    assert refused.returncode == 1
    assert "API key was refused" in refused.stderr and "HTTP 401" in refused.stderr


def test_server_killed_and_restarted_mid_run(busy_server, corpus_jsonl, reference, tmp_path) -> None:
    """The server dies (SIGKILL) while the job runs and comes back on its port: the job waits, retries,
    and finishes with every row once (the key from BASETEN_API_KEY, the default variable)."""
    out = tmp_path / "out.jsonl"
    state = out.with_name(out.name + ".state.json")
    args = [corpus_jsonl, "-o", out, "--url", busy_server.server.url, "--max-concurrency", "1", "--batch-rows", "2"]
    job = subprocess.Popen(
        tag_command(*args, "--commit-every", "0"),
        env=tag_env({"BASETEN_API_KEY": KEY}),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        while not (state.exists() and orjson.loads(state.read_bytes())["rows"] > 0):
            assert job.poll() is None, job.communicate()
            time.sleep(0.01)
        busy_server.kill_and_restart()
        _, stderr = job.communicate(timeout=120)
    finally:
        job.kill()
    assert job.returncode == 0, stderr
    assert "connection x" in stderr  # it did retry
    assert_same_rows(rows_of(out), reference)


def test_unreachable_target_ends_the_job_clearly(corpus_jsonl, tmp_path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = tag(corpus_jsonl, "-o", tmp_path / "out.jsonl", "--url", url, "--max-retries", "2")
    assert result.returncode == 1
    assert f"{url}/info" in result.stderr and "after 2 retries" in result.stderr


def test_rerun_with_other_options_refuses_to_mix(main_server, corpus_jsonl, tmp_path) -> None:
    out = tmp_path / "out.jsonl"
    assert tag(corpus_jsonl, "-o", out, "--url", main_server.url).returncode == 0
    before = out.read_bytes()
    again = tag(corpus_jsonl, "-o", out, "--url", main_server.url)
    assert again.returncode == 0 and "already complete" in again.stderr
    other = tag(corpus_jsonl, "-o", out, "--url", main_server.url, "--aggregation-strategy", "simple")
    assert other.returncode == 2
    assert 'options.aggregation_strategy was "max", now "simple"' in other.stderr and "--overwrite" in other.stderr
    assert out.read_bytes() == before
    other_input = write_jsonl(tmp_path / "other.jsonl", [{"text": "Paris"}])
    refused = tag(other_input, "-o", out, "--url", main_server.url)
    assert refused.returncode == 2 and "input.path was" in refused.stderr
    overwritten = tag(
        corpus_jsonl, "-o", out, "--url", main_server.url, "--aggregation-strategy", "simple", "--overwrite"
    )
    assert overwritten.returncode == 0, overwritten.stderr
    assert out.read_bytes() != before and len(rows_of(out)) == len(TEXTS)
    (tmp_path / "mine.jsonl").write_text("not the tool's\n")
    foreign = tag(corpus_jsonl, "-o", tmp_path / "mine.jsonl", "--url", main_server.url)
    assert foreign.returncode == 2 and "--overwrite" in foreign.stderr
    assert (tmp_path / "mine.jsonl").read_text() == "not the tool's\n"


def test_http_path_does_not_import_the_model_stack(main_server, tmp_path) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", [{"text": "Angela Merkel visited Paris."}])
    probe = (
        "import sys, argparse\n"
        "from nerserve.tag import cli\n"
        "parser = argparse.ArgumentParser(); cli.add_arguments(parser)\n"
        f"code = cli.main(parser.parse_args([{str(source)!r}, '-o', {str(tmp_path / 'out.jsonl')!r}, "
        f"'--url', {main_server.url!r}]))\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'onnxruntime', 'ray') if m in sys.modules)\n"
        "print(code, heavy)\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], env=tag_env(), capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "0 []", result.stderr


def test_in_process_http_and_ray_are_equal(checkpoint, corpus_jsonl, reference, ray_cluster, tmp_path) -> None:
    """The same file in process (the engine here) and on Ray (2 actors on the module's cluster): the
    rows of the HTTP run."""
    model = ["--checkpoint", checkpoint, "--engine", "onnxruntime"]
    local = tag(corpus_jsonl, "-o", tmp_path / "local.jsonl", *model)
    assert local.returncode == 0, local.stderr
    assert_same_rows(rows_of(tmp_path / "local.jsonl"), reference)
    on_ray = tag(corpus_jsonl, "-o", tmp_path / "ray.jsonl", "--ray", ray_cluster, "--concurrency", "2", *model)
    assert on_ray.returncode == 0, on_ray.stderr
    assert_same_rows(rows_of(tmp_path / "ray.jsonl"), reference)


@pytest.mark.stress  # Ray Data's own pipeline on the cluster: make stress (the Ray path runs in make test above)
def test_ray_data_map_batches(checkpoint, reference, ray_cluster) -> None:
    """The Python API: `ds.map_batches(NerTagger, ...)` adds entities and error columns of a fixed Arrow
    type; a bad row is a row."""
    import ray

    from nerserve.tag.outputs import entities_type
    from nerserve.tag.ray_target import NerTagger

    items = [{"id": row["id"], "text": text} for row, text in zip(reference, TEXTS, strict=True)]
    items.append({"id": "none", "text": None})
    tagged = ray.data.from_items(items).map_batches(
        NerTagger,
        fn_constructor_kwargs={"checkpoint": str(checkpoint), "engine": "onnxruntime"},
        batch_format="pyarrow",
        batch_size=32,
        concurrency=1,
    )
    table = pa.concat_tables(ray.get(list(tagged.to_arrow_refs())))
    assert table.schema.field("entities").type == entities_type()
    assert table.schema.field("error").type == pa.string()
    got = {row["id"]: row for row in table.to_pylist()}
    assert got["none"]["entities"] is None and got["none"]["error"].startswith("missing-text")
    for row in reference:
        entities = got[row["id"]]["entities"]
        for item in entities:
            item["results"] = dict(item["results"])
        assert got[row["id"]]["error"] is None
        assert same_entities(entities, row["entities"]), row["id"]


def test_concurrency_climbs_to_the_targets_capacity_and_no_further() -> None:
    """Against a target that answers at most 8 requests' worth at once, the limit doubles while that
    pays, stops near 8 (not at the ceiling of 256), and an overload halves it."""
    import asyncio

    from nerserve.tag.concurrency import AdaptiveLimit

    now = [0.0]
    limit = AdaptiveLimit(start=1, ceiling=256, clock=lambda: now[0])

    async def answers(count: int) -> None:
        for _ in range(count):
            await limit.acquire()
            now[0] += 1.0 / (10 * min(limit.limit, 8))  # 10 answers/s per request in flight, up to 8
            await limit.release(1)

    asyncio.run(answers(3000))
    assert 8 <= limit.limit <= 16
    before = limit.limit
    limit.cut()
    assert limit.limit == before // 2
