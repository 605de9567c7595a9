"""`nerserve eval GOLD`: a gold-annotated corpus through the same targets as `nerserve tag` (a server or
deployment, in process, on Ray), scored at the entity level (evaluation/: seqeval's default mode).

The rows go through the corpus tool's runner (run.tag: the same packing, concurrency and order), into a
`Scorer` in place of an output file: each answer is laid on its row's tokens and tallied as it comes,
so memory stays bounded by what is in flight. A row the target refused (or failed on) and a row whose
gold cannot be read are counted and named in the report, never scored as an empty answer.

Exit status: 0, or 1 when micro F1 is below `--fail-under` (so a CI job can gate a deployment on it) or
the target stayed unreachable; 2 for a usage error (an unreadable gold file, bad options); 130 on Ctrl-C."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson

from ..evaluation.gold import FORMATS, Example, GoldError, gold_format, read_gold
from ..evaluation.scheme import answer_tags
from ..evaluation.scores import Tally
from . import resume
from .cli import _target, add_target_arguments, check_target_arguments, packing_of
from .progress import Progress
from .rows import MODEL_KEYS, Outcome, Row, Unreachable, error_kind
from .run import tag


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Score the model on a gold corpus: entity-level precision, recall and F1 (exact start, end and type) "
        "per type, micro and macro, as seqeval's default mode computes them."
    )
    parser.allow_abbrev = False
    parser.add_argument(
        "gold", type=Path, help="CoNLL (tag in the last column), JSONL spans, or HF rows (.jsonl, .parquet)"
    )
    parser.add_argument(
        "--gold-format",
        choices=FORMATS,
        help="conll, spans ({text, spans: [{start, end, label}]}) or hf (tokens, ner_tags); "
        "default: .parquet hf, .jsonl by its first row, else conll",
    )
    parser.add_argument(
        "--label-names",
        help="hf rows with integer ner_tags: the names, comma-separated, in index order (default: the model's labels)",
    )
    add_target_arguments(parser)
    parser.add_argument("--report", type=Path, help="write the report as JSON to this file")
    parser.add_argument(
        "--fail-under", type=float, metavar="F", help="exit 1 when micro F1 is below F (0 to 1), to gate a deployment"
    )


def main(args: argparse.Namespace) -> int:
    try:
        report = asyncio.run(_evaluate(args))
    except (GoldError, ValueError, OSError) as error:
        print(f"nerserve eval: {error}", file=sys.stderr)
        return 2
    except Unreachable as error:
        print(f"nerserve eval: {error}; nothing was scored", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("nerserve eval: interrupted; nothing was scored", file=sys.stderr)
        return 130
    print(table(report))
    if args.report is not None:
        resume.replace_durably(args.report, orjson.dumps(report, option=orjson.OPT_INDENT_2) + b"\n")
    micro = report["micro"]["f1"]
    if args.fail_under is not None and micro < args.fail_under:
        print(f"nerserve eval: micro F1 {micro:.4f} is below --fail-under {args.fail_under:g}", file=sys.stderr)
        return 1
    return 0


class Scorer:
    """The runner's writer for an evaluation: it keeps each example until its answer comes, then scores
    it (or records why it cannot be scored)."""

    def __init__(self, strategy: str) -> None:
        self.strategy = strategy
        self.state = resume.State({})  # the runner's Writer interface; nothing is written or resumed
        self.tally = Tally()
        self.waiting: dict[int, Example] = {}
        self.unscored: list[dict[str, Any]] = []

    def rows(self, examples: Iterable[Example]) -> Iterator[Row]:
        """The examples as the runner's rows (a bad gold row rides along as a row with its error)."""
        for example in examples:
            self.waiting[example.index] = example
            yield Row(example.index, example.id, example.text, example.error)

    def add(self, rows: Sequence[Row], outcomes: Sequence[Outcome]) -> None:
        for row, outcome in zip(rows, outcomes, strict=True):
            example = self.waiting.pop(row.index)
            if isinstance(outcome, str):
                self.unscored.append({"id": row.id, "error": outcome})
            else:
                self.tally.add(example.tags, answer_tags(example.tokens, outcome, self.strategy))
        self.state.rows += len(rows)

    def pending(self) -> int:
        return 0

    def commit(self, stopping: bool = False) -> None:
        """Nothing to make durable: an evaluation is scored whole or not at all."""

    def finish(self) -> None:
        """As commit."""


async def _evaluate(args: argparse.Namespace) -> dict[str, Any]:
    check_target_arguments(args)
    if args.fail_under is not None and not 0 <= args.fail_under <= 1:
        raise ValueError(f"--fail-under {args.fail_under:g}: F1 is between 0 and 1")
    if not args.gold.is_file():  # before the target, which may load a model
        raise GoldError(f"{args.gold}: no such file")
    fmt = gold_format(args.gold, args.gold_format)
    target = _target(args)
    try:
        info = await target.info() or {}
        names = [name.strip() for name in args.label_names.split(",")] if args.label_names else info.get("labels")
        examples = read_gold(args.gold, fmt, names)
        scorer = Scorer(args.aggregation_strategy)
        progress = Progress(None, 0, command="eval")
        await tag(scorer.rows(examples), target, scorer, progress, packing_of(args), commit_every_s=float("inf"))
        print("\n".join(progress.summary(target.retries, "the report")[:-1]), file=sys.stderr)
    finally:
        await target.close()
    kinds = Counter(error_kind(row["error"]) for row in scorer.unscored)
    return {
        **scorer.tally.report(),
        "texts": scorer.tally.sentences,
        "unscored": {"count": len(scorer.unscored), "by_kind": dict(sorted(kinds.items())), "rows": scorer.unscored},
        "strategy": args.aggregation_strategy,
        "target": _target_name(args),
        "model": {key: info[key] for key in MODEL_KEYS if key in info} or {"url": args.url},
        "gold": {"path": str(args.gold), "format": fmt},
    }


def _target_name(args: argparse.Namespace) -> str:
    if args.url:
        return args.url
    if args.ray is not None:
        return f"ray {args.ray or '(local cluster)'}"
    return "in process"


def table(report: dict[str, Any]) -> str:
    """The report for a terminal: a row per type, then micro and macro, then what was not scored."""
    lines = [f"{'type':<12}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>10}"]

    def row(name: str, figures: dict[str, Any]) -> str:
        return (
            f"{name:<12}{figures['precision']:>10.4f}{figures['recall']:>10.4f}{figures['f1']:>10.4f}"
            f"{figures['support']:>10,}"
        )

    lines += [row(kind, figures) for kind, figures in report["per_type"].items()]
    lines += ["", row("micro", report["micro"]), row("macro", report["macro"])]
    unscored = report["unscored"]
    kinds = ", ".join(f"{kind} {count}" for kind, count in unscored["by_kind"].items())
    lines.append(
        f"\n{report['texts']:,} texts scored ({report['strategy']}, {report['target']}); "
        f"{unscored['count']:,} rows not scored{f' ({kinds})' if kinds else ''}"
    )
    return "\n".join(lines)
