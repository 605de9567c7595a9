"""`nerserve tag INPUT -o OUTPUT`: the command line (the top-level `nerserve` command adds these
arguments to its `tag` subcommand and calls `main`).

Exit status: 0 when every row has an answer or an error (the last line counts both), 1 when the target
stayed unreachable (the output so far is kept: rerun the same command to go on), 2 for a usage error
(an unreadable input, another run's output, an output changed since its record, bad options), 130 on
Ctrl-C (output kept likewise).

The API key never travels on the command line, where `ps` shows it to every user of the machine: it
comes from a variable (`--api-key-env`) or a file (`--api-key-file`). Options are never abbreviated,
so `--api-key SECRET` is refused rather than read as `--api-key-env SECRET`."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import os
import sys
from pathlib import Path
from typing import Any

from ..schemas import STRATEGIES
from .formats import SpacyWriter
from .inputs import EXTENSIONS, Fields, InputError, count_rows, kind_of, read_rows
from .outputs import FORMATS, PART_ROWS, open_output
from .progress import Progress
from .resume import Damaged, Mismatch
from .rows import RequestOptions, Selection, Unreachable
from .run import ENGINE_PACKING, HTTP_PACKING, Packing, Target, tag

DEFAULT_KEY_VARIABLE = "BASETEN_API_KEY"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = "Tag a corpus: every row of INPUT through the model into OUTPUT, in order, resumable."
    parser.allow_abbrev = False  # read at parse time: no prefix of one option is taken for another
    parser.add_argument("input", type=Path, help=f"rows to tag ({', '.join(EXTENSIONS)})")
    parser.add_argument(
        "-o", "--output", type=Path, required=True, help="where to write (.jsonl, .parquet; .json, .conll, .spacy)"
    )
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default="rows",
        help="rows (id, entities, error), label-studio, redacted (id, text with each entity as [LABEL], error), "
        "conll (IOB2), spacy (DocBin), spans (JSONL)",
    )
    parser.add_argument(
        "--labels",
        type=_labels,
        help="keep only entities of these labels, comma-separated (PER,LOC; strategy none: B-PER is PER)",
    )
    parser.add_argument("--min-score", type=float, help="keep only entities scored at least this (every format)")
    parser.add_argument("--text-field", default="text", help="the text's field or column (default text)")
    parser.add_argument("--id-field", default="id", help="the id's field or column (default id, else the row index)")
    add_target_arguments(parser)
    parser.add_argument("--commit-every", type=float, default=1.0, help="seconds between durable commits")
    parser.add_argument(
        "--part-rows",
        type=int,
        default=PART_ROWS,
        help=f"Parquet output: rows per part file (default {PART_ROWS:,}; a kill costs at most these again)",
    )
    parser.add_argument("--overwrite", action="store_true", help="start again, replacing OUTPUT")


def add_target_arguments(parser: argparse.ArgumentParser) -> None:
    """The way to run the model and the request options, shared by `nerserve tag` and `nerserve eval`."""
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--url", help="a server root or a Baseten deployment's base URL (posts to URL/predict_tokens)")
    where.add_argument(
        "--ray",
        nargs="?",
        const="",
        metavar="ADDRESS",
        help="run on Ray (ray.init(ADDRESS); no ADDRESS: a local cluster)",
    )
    parser.add_argument("--checkpoint", help="in process and on Ray: the checkpoint (default: the configured one)")
    parser.add_argument("--engine", help="in process and on Ray: the engine (default: as the settings choose)")
    parser.add_argument("--concurrency", type=int, default=2, help="on Ray: actors, one engine each (default 2)")
    parser.add_argument("--num-gpus", type=float, default=0, help="on Ray: GPUs per actor (default 0)")
    key = parser.add_mutually_exclusive_group()
    key.add_argument(
        "--api-key-env",
        default=DEFAULT_KEY_VARIABLE,
        metavar="NAME",
        help=f"with --url: the variable holding the key for Authorization: Api-Key (default {DEFAULT_KEY_VARIABLE})",
    )
    key.add_argument(
        "--api-key-file",
        type=Path,
        metavar="PATH",
        help="with --url: a file holding the key (surrounding white space stripped)",
    )
    parser.add_argument("--aggregation-strategy", type=str.lower, choices=STRATEGIES, default="max")
    parser.add_argument("--truncate", action="store_true", help="cut texts to the model's length (default: read whole)")
    parser.add_argument("--truncation-direction", type=str.lower, choices=("right", "left"), default="right")
    parser.add_argument(
        "--batch-tokens",
        type=int,
        help=f"estimated tokens per request (default {HTTP_PACKING.tokens} with --url, else {ENGINE_PACKING.tokens})",
    )
    parser.add_argument(
        "--batch-rows",
        type=int,
        help=f"rows per request at most (default {HTTP_PACKING.rows} with --url, else {ENGINE_PACKING.rows})",
    )
    parser.add_argument("--max-concurrency", type=int, default=256, help="with --url: requests in flight at most")
    parser.add_argument("--max-retries", type=int, default=8, help="with --url: retries of a request before giving up")
    parser.add_argument("--timeout", type=float, default=120.0, help="with --url: seconds to wait for one answer")


def check_target_arguments(args: argparse.Namespace) -> None:
    """Raise ValueError for a count that must be positive and is not."""
    if min(args.batch_tokens or 1, args.batch_rows or 1, args.concurrency, args.max_concurrency) < 1:
        raise ValueError("--batch-tokens, --batch-rows, --concurrency and --max-concurrency must be positive")


def packing_of(args: argparse.Namespace) -> Packing:
    """Rows per request: --batch-tokens and --batch-rows over the preset of the way the model runs."""
    preset = HTTP_PACKING if args.url else ENGINE_PACKING
    return Packing(args.batch_tokens or preset.tokens, args.batch_rows or preset.rows)


def main(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_run(args))
    except (InputError, Mismatch, Damaged, ValueError, OSError) as error:
        print(f"nerserve tag: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("nerserve tag: interrupted; what was written is kept, rerun the same command to go on", file=sys.stderr)
        return 130


def _labels(value: str) -> frozenset[str]:
    labels = frozenset(label.strip() for label in value.split(",") if label.strip())
    if not labels:
        raise argparse.ArgumentTypeError("name at least one label, e.g. PER,LOC")
    return labels


def _selection(args: argparse.Namespace) -> Selection:
    if args.min_score is not None and not 0.0 <= args.min_score <= 1.0:
        raise ValueError(f"--min-score must be between 0 and 1 (a probability), not {args.min_score}")
    if args.format == "redacted" and args.aggregation_strategy == "none":
        raise ValueError(
            "--format redacted replaces entities: choose a grouped --aggregation-strategy (simple, first, "
            "average, max), not none (one item per token)"
        )
    return Selection(args.labels, args.min_score)


def _options(args: argparse.Namespace) -> RequestOptions:
    return RequestOptions(args.aggregation_strategy, args.truncate, args.truncation_direction)


def _target(args: argparse.Namespace) -> Target:
    """The way to run the model; only the in-process and Ray ways import the model stack."""
    options = _options(args)
    if args.url:
        from .http_target import HttpTarget, Limits

        key = _api_key(args)
        limits = Limits(ceiling=args.max_concurrency, max_retries=args.max_retries, timeout_s=args.timeout)
        return HttpTarget(args.url, options, key, limits)
    if args.ray is not None:
        from .ray_target import RayTarget

        return RayTarget(args.ray or None, args.concurrency, args.num_gpus, args.checkpoint, args.engine, options)
    from .local_target import LocalEngine, LocalTarget

    return LocalTarget(LocalEngine(args.checkpoint, args.engine, options))


def _api_key(args: argparse.Namespace) -> str | None:
    """The key from --api-key-file (stripped), else from the variable --api-key-env names (none when the
    default variable is unset: a server without a key)."""
    if args.api_key_file is not None:
        try:
            key = args.api_key_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as error:
            raise ValueError(f"--api-key-file {args.api_key_file}: cannot read it ({error})") from None
        if not key:
            raise ValueError(f"--api-key-file {args.api_key_file}: the file is empty")
        return key
    key = os.environ.get(args.api_key_env) or None
    if args.api_key_env != DEFAULT_KEY_VARIABLE and key is None:
        raise ValueError(f"--api-key-env {args.api_key_env}: that variable is not set")
    return key


def input_fingerprint(path: Path) -> dict[str, Any]:
    """The input's identity without reading it all: its path, size, and a hash of its first and last 64 KiB."""
    size = path.stat().st_size
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        digest.update(file.read(1 << 16))
        file.seek(max(0, size - (1 << 16)))
        digest.update(file.read(1 << 16))
    return {"path": str(path.resolve()), "size": size, "sha256_ends": digest.hexdigest()}


async def _run(args: argparse.Namespace) -> int:
    kind_of(args.input)
    if not args.input.is_file():
        raise InputError(f"{args.input}: no such file")
    check_target_arguments(args)
    if args.part_rows < 1:
        raise ValueError("--part-rows must be positive")
    fields = Fields(args.text_field, args.id_field)
    selection = _selection(args)
    target = _target(args)
    try:
        model = await target.model()
        fingerprint = {
            "input": input_fingerprint(args.input),
            "options": {
                **dataclasses.asdict(_options(args)),
                "text_field": fields.text,
                "id_field": fields.id,
                **selection.fingerprint(),
            },
            "format": args.format,
            "model": model,
        }
        version = str(model.get("model_id") or model.get("url"))
        writer = open_output(args.output, args.format, fingerprint, args.overwrite, version, args.part_rows)
        if writer is None:
            print(f"nerserve tag: {args.output} is already complete; --overwrite starts again", file=sys.stderr)
            return 0
        progress = Progress(count_rows(args.input), writer.state.rows)
        rows = read_rows(args.input, fields, start=writer.state.rows)
        try:
            await tag(rows, target, writer, progress, packing_of(args), args.commit_every, selection)
        except Unreachable as error:
            print("\n".join(progress.summary(target.retries, str(args.output))), file=sys.stderr)
            print(f"nerserve tag: {error}; the rows written are kept: rerun the same command to go on", file=sys.stderr)
            return 1
        writer.finish()
        summary = progress.summary(target.retries, str(args.output))
        if isinstance(writer, SpacyWriter):
            summary.insert(-1, writer.note())
        print("\n".join(summary), file=sys.stderr)
        return 0
    except Unreachable as error:
        print(f"nerserve tag: {error}", file=sys.stderr)
        return 1
    finally:
        await target.close()
