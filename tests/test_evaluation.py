"""The evaluator and `nerserve eval`, and `nerserve tag --format conll | spacy | spans` read back.

Scores are compared with the real seqeval package (default mode) on the same tags; answers come from a
real server and the real in-process engine on a checkpoint the tests build; the formats are read back
with spaCy's DocBin (`spacy.blank("xx")`, nothing downloaded) and the evaluator's CoNLL reader."""

from __future__ import annotations

import random
from pathlib import Path

import orjson
import pytest
from test_tag import write_jsonl

import checkpoints
import corpus
from nerserve.cli import main
from nerserve.evaluation.gold import GoldError, gold_format, read_conll, read_gold
from nerserve.evaluation.scheme import entities, tags_from_spans, whitespace_tokens
from nerserve.evaluation.scores import Tally
from nerserve.tag import resume
from nerserve.tag.outputs import open_output
from nerserve.tag.rows import Row

seqeval_metrics = pytest.importorskip("seqeval.metrics")
spacy = pytest.importorskip("spacy")
pq = pytest.importorskip("pyarrow.parquet")
pa = pytest.importorskip("pyarrow")

TYPES = ("PER", "ORG", "LOC", "MISC")


def seqeval_report(gold: list[list[str]], predicted: list[list[str]]) -> dict:
    """seqeval's default-mode figures in the evaluator's shape."""
    report = seqeval_metrics.classification_report(gold, predicted, output_dict=True, zero_division=0)
    rename = {"f1-score": "f1"}
    shaped = {name: {rename.get(k, k): v for k, v in row.items()} for name, row in report.items()}
    return {
        "micro": shaped.pop("micro avg"),
        "macro": shaped.pop("macro avg"),
        "per_type": {name: row for name, row in shaped.items() if name != "weighted avg"},
    }


def assert_same_figures(ours: dict, theirs: dict) -> None:
    assert set(ours["per_type"]) == set(theirs["per_type"])
    for name in ("micro", "macro", *(f"per_type.{kind}" for kind in ours["per_type"])):
        a = ours[name] if "." not in name else ours["per_type"][name.split(".")[1]]
        b = theirs[name] if "." not in name else theirs["per_type"][name.split(".")[1]]
        assert a["support"] == b["support"], name
        for figure in ("precision", "recall", "f1"):
            assert a[figure] == pytest.approx(b[figure], abs=1e-12), (name, figure)


def random_tags(rng: random.Random, length: int) -> list[str]:
    """Tags as gold files and models write them: IOB1, IOB2, IOBES and ill-formed runs mixed."""
    return [rng.choice(["O", "O", "O", *(f"{p}-{t}" for p in "BIES" for t in TYPES[:3])]) for _ in range(length)]


# --- the scheme and the scores ---------------------------------------------------------------------------


def test_scores_equal_seqeval_default_mode_on_random_tags() -> None:
    rng = random.Random(26)
    gold = [random_tags(rng, rng.randint(0, 30)) for _ in range(400)]
    predicted = [
        [tag if rng.random() < 0.7 else rng.choice(["O", "B-PER", "I-ORG", "E-LOC"]) for tag in s] for s in gold
    ]
    tally = Tally()
    for want, got in zip(gold, predicted, strict=True):
        tally.add(want, got)
    assert tally.report()["micro"]["support"] > 500
    assert_same_figures(tally.report(), seqeval_report(gold, predicted))
    for tags in gold[:50]:  # the entities themselves, as seqeval's get_entities finds them
        assert entities(tags) == {(s, e + 1, t) for t, s, e in seqeval_metrics.sequence_labeling.get_entities(tags)}


def test_iob1_gold_and_iob2_predictions_read_alike() -> None:
    iob1 = ["I-PER", "I-PER", "B-PER", "O", "I-LOC", "I-ORG"]
    iob2 = ["B-PER", "I-PER", "B-PER", "O", "B-LOC", "B-ORG"]
    assert entities(iob1) == entities(iob2) == {(0, 2, "PER"), (2, 3, "PER"), (4, 5, "LOC"), (5, 6, "ORG")}


def test_spans_laid_on_tokens() -> None:
    text = "P. Simmons of the U.K. met Ann-Lee"
    tokens = whitespace_tokens(text)
    # the pipeline's answers: "P" and ". Simmons" (one token shared: one entity), "U" and "K" inside one
    # token, and two types meeting inside "Ann-Lee" (the first keeps it)
    spans = [(0, 1, "PER"), (1, 10, "PER"), (18, 19, "LOC"), (20, 21, "LOC"), (27, 30, "PER"), (31, 34, "ORG")]
    assert tags_from_spans(tokens, spans) == ["B-PER", "I-PER", "O", "O", "B-LOC", "O", "B-PER"]
    assert tags_from_spans(tokens, [(3, 17, "ORG")]) == ["O", "B-ORG", "I-ORG", "I-ORG", "O", "O", "O"]


# --- gold readers -------------------------------------------------------------------------------------------


GOLD = [
    (["EU", "rejects", "German", "call"], ["I-ORG", "O", "I-MISC", "O"]),
    (["Peter", "Blackburn", "Paris", "Lyon"], ["I-PER", "I-PER", "I-LOC", "B-LOC"]),
]


def write_conll(path: Path, sentences: list[tuple[list[str], list[str]]]) -> Path:
    lines = ["-DOCSTART- -X- -X- O", ""]
    for words, tags in sentences:
        lines += [f"{word} NNP I-NP {tag}" for word, tag in zip(words, tags, strict=True)]
        lines += ["", ""]
    path.write_text("\n".join(lines))
    return path


def test_every_gold_format_reads_the_same_entities(tmp_path) -> None:
    names = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]
    conll = write_conll(tmp_path / "gold.conll", [*GOLD, (["Bad", "tag"], ["O", "X-PER"])])
    spans = write_jsonl(
        tmp_path / "spans.jsonl",
        [
            {
                "id": "a",
                "text": "EU rejects German call",
                "spans": [{"start": 0, "end": 2, "label": "ORG"}, {"start": 11, "end": 17, "label": "MISC"}],
            },
            {
                "text": "Peter Blackburn Paris Lyon",
                "spans": [
                    {"start": 0, "end": 15, "label": "PER"},
                    {"start": 16, "end": 21, "label": "LOC"},
                    {"start": 22, "end": 26, "label": "LOC"},
                ],
            },
            {"text": "short", "spans": [{"start": 0, "end": 9, "label": "PER"}]},
        ],
    )
    iob2 = [["B-ORG", "O", "B-MISC", "O"], ["B-PER", "I-PER", "B-LOC", "B-LOC"]]
    hf_rows = [
        {"tokens": words, "ner_tags": [names.index(t) for t in tags]}
        for (words, _), tags in zip(GOLD, iob2, strict=True)
    ]
    hf_jsonl = write_jsonl(tmp_path / "hf.jsonl", [*hf_rows, {"tokens": ["x"], "ner_tags": [99]}])
    hf_parquet = tmp_path / "hf.parquet"
    pq.write_table(pa.Table.from_pylist(hf_rows), hf_parquet)
    read = {
        "conll": list(read_gold(conll, "conll")),
        "spans": list(read_gold(spans, "spans")),
        "hf": list(read_gold(hf_jsonl, "hf", names)),
        "parquet": list(read_gold(hf_parquet, "hf", names)),
    }
    for name, examples in read.items():
        good = [example for example in examples if example.error is None]
        assert [example.text for example in good] == [" ".join(words) for words, _ in GOLD], name
        assert [entities(example.tags) for example in good] == [entities(tags) for tags in iob2], name
    assert read["spans"][0].id == "a"
    assert [e.error.split(":")[0] for e in read["conll"] + read["spans"] + read["hf"] if e.error] == ["bad-gold"] * 3
    assert [gold_format(p) for p in (conll, spans, hf_jsonl, hf_parquet)] == ["conll", "spans", "hf", "hf"]
    with pytest.raises(GoldError, match="label names"):
        list(read_gold(hf_jsonl, "hf"))
    assert read_conll(conll) == [*GOLD, (["Bad", "tag"], ["O", "X-PER"])]


# --- nerserve eval and the formats, on real engines -----------------------------------------------------------
# The commands run in this process (`nerserve.cli.main`, as the console script calls it), against the
# session's shared server (conftest: the cased WordPiece checkpoint, ONNX Runtime) and in process.

#: a word longer than the server's default body limit (4 MiB): the row holding it is refused (413)
HUGE_WORD = "x" * (4 * 1024 * 1024 + 16)


def nerserve(capsys, *args: object) -> tuple[int, str, str]:
    """`nerserve ARGS`: exit status, standard output, standard error."""
    capsys.readouterr()
    status = main([str(arg) for arg in args])
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture(scope="module")
def gold(tmp_path_factory) -> tuple[Path, Path, list[list[str]]]:
    """A CoNLL gold file (IOB1, random tags on corpus words; one sentence over the server's body limit,
    one with a tag that is not IOB), the same texts as tag's JSONL input, and the readable rows' tags."""
    rng = random.Random(5)
    folder = tmp_path_factory.mktemp("eval-gold")
    sentences = []
    for text in corpus.texts(60)[:40]:
        words = text.split()[:25] or ["empty"]
        sentences.append((words, [rng.choice(["O", "O", "I-PER", "I-ORG", "B-ORG", "I-LOC", "I-MISC"]) for _ in words]))
    sentences.append((["Huge", HUGE_WORD], ["I-PER", "O"]))
    path = write_conll(folder / "gold.conll", [*sentences, (["not", "iob"], ["O", "PER"])])
    texts = write_jsonl(folder / "texts.jsonl", [{"text": " ".join(words)} for words, _ in sentences])
    return path, texts, [tags for _, tags in sentences]


def test_eval_over_http_equals_seqeval_on_the_same_predictions(server, gold, tmp_path, capsys) -> None:
    """The report's figures are seqeval's on the answers `nerserve tag --format conll` writes for the same
    texts; the refused row (413) and the unreadable gold row are counted and named, not scored; micro F1
    below --fail-under exits 1."""
    path, texts, gold_tags = gold
    predicted = tmp_path / "predicted.conll"
    status, _, err = nerserve(capsys, "tag", texts, "-o", predicted, "--format", "conll", "--url", server.url)
    assert status == 0 and "refused 1" in err, err
    report_path = tmp_path / "report.json"
    status, out, err = nerserve(
        capsys, "eval", path, "--url", server.url, "--report", report_path, "--fail-under", "0.99"
    )
    assert status == 1 and "below --fail-under 0.99" in err, err
    report = orjson.loads(report_path.read_bytes())
    assert report["micro"]["f1"] < 0.99 and report["micro"]["support"] > 20
    assert report["strategy"] == "max" and report["target"] == server.url and report["texts"] == 40
    assert report["unscored"]["count"] == 2 and report["unscored"]["by_kind"] == {"bad-gold": 1, "refused": 1}
    assert {row["id"] for row in report["unscored"]["rows"]} == {40, 41}
    assert "micro" in out and "2 rows not scored (bad-gold 1, refused 1)" in out
    blocks = read_conll(predicted)
    assert len(blocks) == 40  # the refused row has no block
    assert_same_figures(report, seqeval_report(gold_tags[:40], [tags for _, tags in blocks]))


def test_formats_read_back_and_their_own_answers_score_one(server, built, tmp_path, capsys) -> None:
    """--format spans, conll and spacy on the same rows (an error row among them) read back with the
    readers people use; the answers, as HF rows with integer tags named by the model's labels, score F1
    1.0 in process on the same checkpoint and pass --fail-under 1."""
    rows = [{"id": f"r{i}", "text": text} for i, text in enumerate(corpus.texts(40)[:30])]
    source = write_jsonl(tmp_path / "in.jsonl", [*rows[:5], {"id": "bad", "text": 7}, *rows[5:]])
    outputs = {fmt: tmp_path / f"out.{fmt}" for fmt in ("conll", "spacy")}
    outputs["spans"] = tmp_path / "out.spans.jsonl"
    summaries = {}
    for fmt, out in outputs.items():
        status, _, summaries[fmt] = nerserve(
            capsys, "tag", source, "-o", out, "--format", fmt, "--url", server.url, "--part-rows", "7"
        )
        assert status == 0, summaries[fmt]
    spans = [orjson.loads(line) for line in outputs["spans"].read_bytes().splitlines()]
    assert [s["id"] for s in spans] == [*(r["id"] for r in rows[:5]), "bad", *(r["id"] for r in rows[5:])]
    assert spans[5]["error"].startswith("not-a-string") and spans[5]["spans"] is None
    answered = [s for s in spans if s["error"] is None]
    assert sum(len(s["spans"]) for s in answered) > 10
    for line in answered:
        assert all(0 <= s["start"] < s["end"] <= len(line["text"]) and 0 < s["score"] <= 1 for s in line["spans"])

    blocks = iter(read_conll(outputs["conll"]))  # a block per answered row with a token
    hf_rows = []
    for line in answered:
        tokens = whitespace_tokens(line["text"])
        if tokens:
            words, tags = next(blocks)
            assert words == [line["text"][s:e] for s, e in tokens]
            laid = tags_from_spans(tokens, [(s["start"], s["end"], s["label"]) for s in line["spans"]])
            assert tags == laid
            hf_rows.append({"id": line["id"], "tokens": words, "ner_tags": tags})
    assert next(blocks, None) is None

    from spacy.tokens import DocBin

    nlp = spacy.blank("xx")
    docs = list(DocBin().from_disk(outputs["spacy"]).get_docs(nlp.vocab))
    assert [doc.user_data["id"] for doc in docs] == [s["id"] for s in spans]
    assert docs[5].user_data["error"].startswith("not-a-string") and not docs[5].ents
    adjusted = 0
    for doc, line in zip(docs, spans, strict=True):
        if line["error"]:
            continue
        assert doc.text == line["text"]
        for ent in doc.ents:  # each entity is a span of the answer widened to the tokens it touches
            assert any(
                ent.start_char <= s["start"] and s["end"] <= ent.end_char and s["label"] == ent.label_
                for s in line["spans"]
            )
        adjusted += doc.user_data["adjusted"]
    assert f"spacy: {adjusted:,} entity spans adjusted" in summaries["spacy"]
    assert not (tmp_path / "out.spacy.parts").exists()

    labels = list(checkpoints.LABELS)
    hf = tmp_path / "gold.parquet"  # Hugging Face datasets rows: integer tags, named by the model's labels
    pq.write_table(
        pa.Table.from_pylist([{**r, "ner_tags": [labels.index(t) for t in r["ner_tags"]]} for r in hf_rows]), hf
    )
    report_path = tmp_path / "report.json"
    checkpoint = built("wordpiece-cased")
    status, _, err = nerserve(
        capsys,
        "eval",
        hf,
        "--checkpoint",
        checkpoint,
        "--engine",
        "onnxruntime",
        "--report",
        report_path,
        "--fail-under",
        "1",
    )
    assert status == 0, err
    report = orjson.loads(report_path.read_bytes())
    assert report["micro"]["f1"] == 1.0 and report["target"] == "in process" and report["texts"] == len(hf_rows)


def test_a_spacy_output_resumes_from_its_parts(tmp_path) -> None:
    """A run that stops after some parts is continued: the rerun's docs follow the recorded ones, and the
    merged DocBin holds every row once, in order."""
    out = tmp_path / "out.spacy"
    fingerprint = {"options": {"aggregation_strategy": "max"}}
    answer = [{"token": "Ann", "token_id": 0, "start": 0, "end": 3, "results": {"PER": 0.9}}]
    rows = [Row(i, f"r{i}", f"Ann went home {i}") for i in range(10)]
    writer = open_output(out, "spacy", fingerprint, False, "m", part_rows=3)
    assert writer is not None
    writer.add(rows[:4], [answer] * 4)
    writer.commit(stopping=True)  # the job stopped here (Ctrl-C, the target unreachable)
    assert resume.load(out).rows == 4
    writer = open_output(out, "spacy", fingerprint, False, "m", part_rows=3)
    assert writer is not None and writer.state.rows == 4
    writer.add(rows[4:], [answer] * 6)
    writer.finish()
    from spacy.tokens import DocBin

    docs = list(DocBin().from_disk(out).get_docs(spacy.blank("xx").vocab))
    assert [doc.user_data["id"] for doc in docs] == [row.id for row in rows]
    assert all([(e.text, e.label_) for e in doc.ents] == [("Ann", "PER")] for doc in docs)
    assert open_output(out, "spacy", fingerprint, False, "m", part_rows=3) is None  # complete
