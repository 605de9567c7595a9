"""Texts -> model windows with character offsets, as the pipeline's fast tokenizer makes them.

The Rust `tokenizers` backend does the work (and spreads a batch over the cores). It holds its
truncation setting as mutable state, so each configuration the server needs gets its own copy
instead of being reconfigured per request: one that truncates on the right with overlapping
`stride` windows (its first window is exactly right-truncation, its overflow is the pipeline's
`stride` chunking), and one that truncates on the left."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np
from tokenizers import Encoding, Tokenizer

if TYPE_CHECKING:  # a type only: front-end workers never import transformers (and torch with it)
    from transformers import PreTrainedTokenizerFast

#: the overlap of an over-long text's windows where the model's window is long enough for it
DEFAULT_WINDOW_STRIDE = 128


def window_stride_for(text_tokens: int, requested: int | None) -> int:
    """The overlap between consecutive windows of an over-long text, for a model whose window holds
    `text_tokens` tokens of text (its length less the special tokens).

    By default 128, the pipeline users' usual `stride`, where the window holds more than twice that;
    half the window where it does not (a 128-position model: 63), so every model whose window holds a
    few tokens reads long texts with the defaults. An explicit overlap must leave each window at least
    one new token: `requested < text_tokens`, else ValueError saying why."""
    if text_tokens < 1:
        raise ValueError(f"the model's window holds no text (text tokens per window: {text_tokens})")
    if requested is None:
        return DEFAULT_WINDOW_STRIDE if text_tokens > 2 * DEFAULT_WINDOW_STRIDE else text_tokens // 2
    if requested >= text_tokens:
        raise ValueError(
            f"window_stride {requested} must be less than the text tokens a window of this model holds "
            f"({text_tokens}): each window must move on by at least one token; leave window_stride unset "
            f"to get {window_stride_for(text_tokens, None)}"
        )
    return requested


@dataclasses.dataclass(frozen=True)
class Window:
    """One model input: a text's whole token sequence, or one window of an over-long text."""

    ids: np.ndarray  # int64 [n]
    offsets: np.ndarray  # int64 [n, 2], code-point indices into the text
    special: np.ndarray  # bool [n], tokens the tokenizer added ([CLS], [SEP], <s>, ...)


class TextTokenizer:
    """Encodes texts into windows and knows the per-vocabulary facts aggregation needs."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast, max_length: int, window_stride: int | None) -> None:
        window_stride = window_stride_for(max_length - tokenizer.num_special_tokens_to_add(), window_stride)
        backend: Tokenizer = tokenizer.backend_tokenizer
        serialized = backend.to_str()
        self._windows = self._configured(serialized, max_length, window_stride, "right")
        self._left = self._configured(serialized, max_length, 0, "left")
        self.max_length = max_length
        #: the overlap actually used (shown in /info)
        self.window_stride = window_stride
        self.unk_id = tokenizer.unk_token_id if tokenizer.unk_token_id is not None else -1
        size = max(backend.get_vocab_size(with_added_tokens=True), len(tokenizer))
        tokens = tokenizer.convert_ids_to_tokens(list(range(size)))
        #: the tokenizer's string for each id (special tokens are shown with it)
        self.vocab = np.array([t if t is not None else "" for t in tokens], dtype=object)
        #: len() of each id's token string: the pipeline compares it with the span length
        self.token_lengths = np.fromiter((len(t) for t in self.vocab), dtype=np.int64, count=size)
        #: the pipeline's word-boundary rule: a continuing-subword prefix ("##") when the model has one
        self.has_subword_prefix = bool(getattr(backend.model, "continuing_subword_prefix", None))

    @staticmethod
    def _configured(serialized: str, max_length: int, stride: int, direction: str) -> Tokenizer:
        copy = Tokenizer.from_str(serialized)
        copy.no_padding()
        copy.enable_truncation(max_length, stride=stride, strategy="longest_first", direction=direction)
        return copy

    def encode(self, texts: list[str], truncate: bool, direction: str = "right") -> list[list[Window]]:
        """Windows per text: one when it fits or `truncate` is set, else the overlapping windows."""
        if not texts:
            return []
        backend = self._left if truncate and direction == "left" else self._windows
        encodings = backend.encode_batch(texts, add_special_tokens=True)
        out = []
        for encoding in encodings:
            parts = [encoding] if truncate else [encoding, *encoding.overflowing]
            out.append([_window(part) for part in parts])
        return out


def _window(encoding: Encoding) -> Window:
    return Window(
        ids=np.asarray(encoding.ids, dtype=np.int64),
        offsets=np.asarray(encoding.offsets, dtype=np.int64).reshape(-1, 2),
        special=np.asarray(encoding.special_tokens_mask, dtype=bool),
    )
