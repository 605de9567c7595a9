"""The host half of a request, before and after the engine: validated request -> tokenization (offsets,
truncation or windows) -> [the engine's scores] -> aggregation -> response items.

The HTTP server's worker processes run it against the engine process; the in-process service runs it
around an engine core in the same process. It imports neither torch nor transformers (a worker stays small): the
tokenizer comes ready-made (`TextTokenizer`, built where the checkpoint is loaded)."""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable

import numpy as np

from ..errors import Invalid
from ..schemas import PredictRequest
from ..scores import TokenScores
from .aggregation import Aggregator
from .tokenization import TextTokenizer, Window

#: the request a process answers before it says it is ready (`average` takes the logits path too)
WARMUP = {"inputs": ["Apple is looking at buying U.K. startup for $1 billion"], "aggregation_strategy": "average"}
#: sequences and whether to keep their logits -> their scores, from wherever the engine is
Score = Callable[[list[np.ndarray], bool], Awaitable[TokenScores]]


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

    def prepare(self, request: PredictRequest) -> Prepared:
        """Tokenize the request's texts (422 for what the tokenizer refuses, e.g. lone surrogates)."""
        texts = request.texts()
        try:
            windows = self.tokenizer.encode(texts, request.truncate, request.truncation_direction)
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


async def warm_up(frontend: Frontend, score: Score) -> None:
    """The one warm-up: WARMUP through tokenization, `score` and aggregation, so the first real request
    pays for no lazy initialisation (a worker runs it through the engine process, the engine core on
    its own engine)."""
    prepared = frontend.prepare(PredictRequest.model_validate(WARMUP))
    frontend.answer(prepared, await score(prepared.sequences, prepared.keep_logits))
