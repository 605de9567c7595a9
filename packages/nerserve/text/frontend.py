"""The host half of a request, before and after the engine: validated request -> tokenization (offsets,
truncation or windows) -> [the engine's scores] -> aggregation -> response items.

The HTTP server's worker processes run it against the engine process; the in-process service runs it
around an engine core in the same process. It imports neither torch nor transformers (a worker stays small): the
tokenizer comes ready-made (`TextTokenizer`, built where the checkpoint is loaded).

A large answer is encoded by `encode`: made and serialized CHUNK_TOKENS tokens at a time, so its
memory is the JSON and one chunk's items (not a dict per token of the whole request at once), and a
request given up stops within one chunk."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Awaitable, Callable

import numpy as np
import orjson

from ..errors import ApiError, Cancelled, Invalid
from ..schemas import PredictRequest
from ..scores import TokenScores
from .aggregation import Aggregator
from .tokenization import GivenUp, TextTokenizer, Window

#: the request a process answers before it says it is ready (`average` takes the logits path too)
WARMUP = {"inputs": ["Apple is looking at buying U.K. startup for $1 billion"], "aggregation_strategy": "average"}
#: sequences and whether to keep their logits -> their scores, from wherever the engine is
Score = Callable[[list[np.ndarray], bool], Awaitable[TokenScores]]
#: tokens of an answer made into items and serialized at a time by `encode`
CHUNK_TOKENS = 8192


@dataclasses.dataclass(frozen=True)
class Encoded:
    """An answer as JSON, with the seconds spent making its items and serializing them (/metrics' stages)."""

    body: bytes
    aggregation_s: float
    encoding_s: float


@dataclasses.dataclass
class Prepared:
    """A tokenized request: its texts, their windows, and what the engine must hand back."""

    request: PredictRequest
    texts: list[str]
    windows: list[list[Window]]
    keep_logits: bool

    @property
    def sequences(self) -> list[np.ndarray]:
        """Every window's token ids, text by text: the rows of the engine's answer follow this order."""
        return [window.ids for text_windows in self.windows for window in text_windows]

    @property
    def tokens(self) -> int:
        return sum(len(window.ids) for text_windows in self.windows for window in text_windows)


class Frontend:
    """The host half of a request: tokenization before the engine, aggregation after it."""

    def __init__(self, tokenizer: TextTokenizer, labels: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.labels = labels
        self.aggregator = Aggregator(tokenizer, labels)

    def prepare(
        self,
        request: PredictRequest,
        max_tokens: int | None = None,
        given_up: GivenUp | None = None,
        stride: int | None = None,
    ) -> Prepared:
        """Tokenize the request's texts (422 for what the tokenizer refuses, e.g. lone surrogates, or an
        overlap `stride` it cannot take; 413 past `max_tokens` model tokens; Cancelled once `given_up()`).
        `stride`: an over-long text's windows overlap by it rather than by the configured window_stride."""
        texts = request.texts()
        try:
            windows = self.tokenizer.encode(
                texts, request.truncate, request.truncation_direction, max_tokens, given_up, stride
            )
        except ApiError:
            raise
        except Exception as error:
            raise Invalid(f"inputs: cannot tokenize: {error}") from None
        keep_logits = Aggregator.needs_logits(request.aggregation_strategy, request.raw_scores)
        return Prepared(request, texts, windows, keep_logits)

    def answer(self, prepared: Prepared, scores: TokenScores) -> list[list[dict]]:
        """One response list per text from the engine's scores of the request's windows."""
        request = prepared.request
        if not prepared.texts:
            return []
        if request.aggregation_strategy == "none":
            return self.aggregator.tokens(prepared.texts, prepared.windows, scores, request.raw_scores)
        return self.aggregator.grouped(prepared.texts, prepared.windows, scores, request.aggregation_strategy)

    def hf_answer(self, prepared: Prepared, ignore_labels: frozenset[str], scores: TokenScores) -> list[list[dict]]:
        """One list per text in `transformers.pipeline("token-classification")`'s own items (the
        Hugging Face route), from the same aggregation as `answer`."""
        request = prepared.request
        if not prepared.texts:
            return []
        if request.aggregation_strategy == "none":
            return self.aggregator.hf_tokens(prepared.texts, prepared.windows, scores, ignore_labels)
        return self.aggregator.hf_grouped(
            prepared.texts, prepared.windows, scores, request.aggregation_strategy, ignore_labels
        )

    def encode(self, prepared: Prepared, scores: TokenScores, given_up: GivenUp) -> Encoded:
        """`answer` as JSON, for answers too large to hold as items at once: token items (strategy
        none) are made and serialized CHUNK_TOKENS at a time, `given_up()` read before each chunk
        (Cancelled once it says so); entities (far fewer) are made at once."""
        request = prepared.request
        started = time.perf_counter()
        if request.aggregation_strategy != "none":
            entities = self.answer(prepared, scores)
            made = time.perf_counter()
            if given_up():
                raise Cancelled("the request was given up while its answer was made")
            return Encoded(orjson.dumps(entities), made - started, time.perf_counter() - made)
        rows = self.aggregator.token_rows(prepared.texts, prepared.windows, scores)
        timings = [time.perf_counter() - started, 0.0]

        def items(lo: int, hi: int) -> list[dict]:
            if given_up():
                raise Cancelled("the request was given up while its answer was made")
            begun = time.perf_counter()
            made = self.aggregator.token_items(rows, lo, hi, request.raw_scores)
            timings[0] += time.perf_counter() - begun
            return made

        def dumps(value: object) -> bytes:
            begun = time.perf_counter()
            encoded = orjson.dumps(value)
            timings[1] += time.perf_counter() - begun
            return encoded

        body = _chunked_json(rows.bounds, items, dumps)
        return Encoded(body, *timings)


def _chunked_json(
    bounds: list[int], items: Callable[[int, int], list[dict]], dumps: Callable[[object], bytes]
) -> bytes:
    """The JSON of `[[items of text t] for t]`, where text t's items are rows `bounds[t]:bounds[t + 1]`
    and `items(lo, hi)` makes those of rows lo:hi: consecutive whole texts of up to CHUNK_TOKENS rows
    together, a longer text in pieces of CHUNK_TOKENS rows."""
    segments = []  # the JSON of one or more whole texts, without the outer brackets
    t, n = 0, len(bounds) - 1
    while t < n:
        lo = bounds[t]
        u = t + 1
        while u < n and bounds[u + 1] - lo <= CHUNK_TOKENS:
            u += 1
        hi = bounds[u]
        if hi - lo > CHUNK_TOKENS:  # one text, in pieces
            pieces = [dumps(items(a, min(a + CHUNK_TOKENS, hi)))[1:-1] for a in range(lo, hi, CHUNK_TOKENS)]
            segments.append(b"[" + b",".join(pieces) + b"]")
        else:
            made = items(lo, hi)
            segments.append(dumps([made[bounds[k] - lo : bounds[k + 1] - lo] for k in range(t, u)])[1:-1])
        t = u
    return b"[" + b",".join(segments) + b"]"


async def warm_up(frontend: Frontend, score: Score) -> None:
    """The one warm-up: WARMUP through tokenization, `score` and aggregation, so the first real request
    pays for no lazy initialisation (a worker runs it through the engine process, the engine core on
    its own engine)."""
    prepared = frontend.prepare(PredictRequest.model_validate(WARMUP))
    frontend.answer(prepared, await score(prepared.sequences, prepared.keep_logits))
