"""The `nerserve` command (also `python -m nerserve`): `serve`, `build-engine`, `tag` and `eval`, as users of
`vllm serve` and `text-embeddings-router` expect. The parser reads each subcommand's arguments from
its own module (export/build.py, tag/cli.py); what a subcommand runs (the server's processes, the
model stack) is imported only when it runs.

`serve` takes every setting as a flag (`--max-num-tokens 2048`), generated from `Settings` itself: a flag
wins over `NERSERVE_*` variables, which win over config.yaml's model_metadata."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence

from . import __version__
from .config import ENV_PREFIX, Settings, load_settings

#: Settings fields that are not flags: the hub token and the API key are secrets, which a command line
#: shows to every user of the machine (`ps`): HF_TOKEN or Truss's secret, NERSERVE_API_KEY or config.yaml;
#: the mounts come from config.yaml's weights
_NOT_FLAGS = ("hf_token", "api_key", "mounts", "checkpoint")


def _setting_flags(parser: argparse.ArgumentParser) -> None:
    """A `--name` flag for each setting (module docstring)."""
    for field in dataclasses.fields(Settings):
        if field.name in _NOT_FLAGS:
            continue
        flag = "--" + field.name.replace("_", "-")
        parser.add_argument(flag, dest=field.name, default=None, help=f"(env {ENV_PREFIX}{field.name.upper()})")


def _serve(args: argparse.Namespace) -> int:
    from .engine.process import serve_engine
    from .http.worker import serve_worker
    from .logs import configure
    from .server import Supervisor

    overrides = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(Settings)}
    try:
        settings = load_settings(overrides)
    except ValueError as error:
        print(f"nerserve: cannot start: {error}", file=sys.stderr, flush=True)
        return 2
    configure(settings.log_level, "supervisor")
    return Supervisor(settings, serve_engine, serve_worker).serve()


def _build_engine(args: argparse.Namespace) -> int:
    from .export.build import build
    from .logs import configure

    try:
        settings = load_settings()
    except ValueError as error:
        print(f"nerserve: cannot start: {error}", file=sys.stderr, flush=True)
        return 2
    configure("WARNING", "build")
    return build(args, settings)


def _tag(args: argparse.Namespace) -> int:
    from .tag.cli import main

    return main(args)


def _eval(args: argparse.Namespace) -> int:
    from .tag.evaluate import main

    return main(args)


def parser() -> argparse.ArgumentParser:
    """The command's parser."""
    from .export.build import add_arguments as build_arguments
    from .tag.cli import add_arguments as tag_arguments
    from .tag.evaluate import add_arguments as eval_arguments

    top = argparse.ArgumentParser(prog="nerserve", description=__doc__.split("\n\n")[0] if __doc__ else None)
    top.add_argument("--version", action="version", version=f"nerserve {__version__}")
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="serve /predict_tokens over HTTP (the supervisor, workers, engine)")
    serve.add_argument(
        "checkpoint", nargs="?", default=None, help="HF repo id or local HF folder (env NERSERVE_CHECKPOINT)"
    )
    _setting_flags(serve)
    serve.set_defaults(run=_serve)

    build = commands.add_parser("build-engine", help="checkpoint -> checked ONNX -> TensorRT engine folder")
    build_arguments(build)
    build.set_defaults(run=_build_engine)

    tag = commands.add_parser(
        "tag", help="tag a corpus: files in, entities out, through a server, in process or on Ray"
    )
    tag_arguments(tag)
    tag.set_defaults(run=_tag)

    evaluate = commands.add_parser(
        "eval", help="score the model on a gold corpus: entity precision, recall and F1, as seqeval computes them"
    )
    eval_arguments(evaluate)
    evaluate.set_defaults(run=_eval)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return int(args.run(args))
