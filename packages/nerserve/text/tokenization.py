"""Texts -> model windows with character offsets, as the pipeline's fast tokenizer makes them.

The Rust `tokenizers` backend does the work (and spreads a batch over the cores). It holds its
truncation setting as mutable state, so each configuration the server needs gets its own copy
instead of being reconfigured per request: one that truncates on the right with overlapping
`stride` windows (its first window is exactly right-truncation, its overflow is the pipeline's
`stride` chunking), and one that truncates on the left.

With a token limit (`max_request_tokens`), a request's texts are tokenized in groups of about
GROUP_CHARS characters and refused (413) as soon as the running count passes the limit; a text long
enough that it might pass the limit alone is first counted in pieces of that size, without its windows,
so a 4 MB text past the limit costs the work of the pieces up to the limit, not of its windows (which
cost seconds and gigabytes: the windows overlap, and the tokenizer keeps every token's string)."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import numpy as np
from tokenizers import Encoding, Tokenizer

from ..errors import Cancelled, Invalid, PayloadTooLarge

if TYPE_CHECKING:  # a type only: front-end workers never import transformers (and torch with it)
    from transformers import PreTrainedTokenizerFast

#: the overlap of an over-long text's windows where the model's window is long enough for it
DEFAULT_WINDOW_STRIDE = 128
#: with a token limit: characters of texts tokenized together, and of the pieces a long text is counted in
GROUP_CHARS = 1 << 16
#: the last space of a piece's tail, where a long text is cut for counting: before it, as byte-level BPE
#: and SentencePiece tokenizers attach a space to the word after it (BERT's splits at it either way)
_LAST_SPACE = re.compile(r" (?=[^ ]*$)")
#: returns True once the request is given up (its timeout passed, its client went away)
GivenUp = Callable[[], bool]
#: tokenizer copies kept for overlaps other than the configured one (the HF route's `stride`): each is a
#: whole vocabulary, so a few, the most recently used
STRIDE_COPIES = 4


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
        #: right-truncating copies with overflow for a request's own overlap (`encode(stride=...)`), by overlap
        self._strided: dict[int, Tokenizer] = {}
        self._plain = Tokenizer.from_str(serialized)  # for counting: no truncation, no windows
        self._plain.no_padding()
        self._plain.no_truncation()
        self.max_length = max_length
        #: the special tokens each window gets ([CLS] and [SEP], <s> and </s>)
        self.specials = tokenizer.num_special_tokens_to_add()
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

    def window_tokens(self, content: int, truncate: bool, stride: int | None = None) -> int:
        """Model tokens (windows and their special tokens included) of a text of `content` tokens: what
        the tokenizer's overflow makes, windows of `max_length` moving on by `max_length - specials -
        stride` text tokens (`stride` None: the configured `window_stride`)."""
        stride = self.window_stride if stride is None else stride
        per = self.max_length - self.specials
        if truncate or content <= per:
            return min(content, per) + self.specials
        windows = 1 + -(-(content - per) // (per - stride))
        return content + stride * (windows - 1) + self.specials * windows

    def check_stride(self, stride: int) -> None:
        """Invalid unless `stride` can be a request's overlap: each window must move on by a token at
        least (the pipeline's own check, `stride < model_max_length`, lets through overlaps its tokenizer
        then fails on)."""
        text_tokens = self.max_length - self.specials
        if not 0 <= stride < text_tokens:
            raise Invalid(
                f"parameters.stride: must be at least 0 and less than {text_tokens}, the text tokens a window "
                f"of this model holds, not {stride}"
            )

    def decode(self, tokens: list[str]) -> str:
        """The tokenizer's string for token strings, as the pipeline's `convert_tokens_to_string` makes it
        (the backend's decoder, else the tokens joined by spaces)."""
        decoder = self._plain.decoder
        return decoder.decode(tokens) if decoder is not None else " ".join(tokens)

    def _strided_copy(self, stride: int) -> Tokenizer:
        """The right-truncating tokenizer whose overflow overlaps by `stride` tokens (made on first use)."""
        if stride == self.window_stride:
            return self._windows
        copy = self._strided.pop(stride, None)
        if copy is None:
            copy = self._configured(self._plain.to_str(), self.max_length, stride, "right")
            while len(self._strided) >= STRIDE_COPIES:
                del self._strided[next(iter(self._strided))]
        self._strided[stride] = copy  # the most recently used last
        return copy

    def encode(
        self,
        texts: list[str],
        truncate: bool,
        direction: str = "right",
        max_tokens: int | None = None,
        given_up: GivenUp | None = None,
        stride: int | None = None,
    ) -> list[list[Window]]:
        """Windows per text: one when it fits or `truncate` is set, else the overlapping windows, which
        overlap by `stride` tokens (None: the configured `window_stride`; else checked by `check_stride`).
        With `max_tokens`: PayloadTooLarge as soon as the texts' model tokens pass it, and Cancelled
        between groups once `given_up()` (module docstring)."""
        if not texts:
            return []
        if stride is not None:
            self.check_stride(stride)
        if truncate and direction == "left":
            backend = self._left
        else:
            backend = self._windows if stride is None else self._strided_copy(stride)
        if max_tokens is None:
            encodings = backend.encode_batch(texts, add_special_tokens=True)
            return [self._windows_of(encoding, truncate) for encoding in encodings]
        out: list[list[Window]] = []
        used = 0
        for group in _groups(texts):
            _check(given_up)
            # one model token per character at most, for nearly every text: a text that might pass the
            # limit is counted before its windows are made
            if self.window_tokens(max(map(len, group)), truncate, stride) > max_tokens - used:
                for text in group:
                    if self.window_tokens(len(text), truncate, stride) > max_tokens - used:
                        self._count_within(text, truncate, max_tokens, max_tokens - used, given_up, stride)
            windows = [self._windows_of(e, truncate) for e in backend.encode_batch(group, add_special_tokens=True)]
            used += sum(len(window.ids) for text_windows in windows for window in text_windows)
            if used > max_tokens:
                raise _over_limit(used, max_tokens)
            out.extend(windows)
        return out

    def _count_within(
        self, text: str, truncate: bool, limit: int, budget: int, given_up: GivenUp | None, stride: int | None
    ) -> None:
        """PayloadTooLarge once `text`'s model tokens, its text tokens counted in pieces cut at spaces (as the
        pre-tokenizers of BERT, RoBERTa and SentencePiece models cut words, so the pieces' tokens are the
        text's), its windows' from their number, pass `budget`."""
        counted = 0
        for piece in _pieces(text):
            _check(given_up)
            counted += len(self._plain.encode(piece, add_special_tokens=False))
            cost = self.window_tokens(counted, truncate, stride)
            if cost > budget:
                raise _over_limit(limit - budget + cost, limit)
            if truncate and cost == self.max_length:  # the rest is cut off: it costs nothing more
                return

    @staticmethod
    def _windows_of(encoding: Encoding, truncate: bool) -> list[Window]:
        parts = [encoding] if truncate else [encoding, *encoding.overflowing]
        return [_window(part) for part in parts]


def _groups(texts: list[str]) -> Iterator[list[str]]:
    """Consecutive texts of about GROUP_CHARS characters in all (a longer text alone)."""
    group: list[str] = []
    chars = 0
    for text in texts:
        if group and chars + len(text) > GROUP_CHARS:
            yield group
            group, chars = [], 0
        group.append(text)
        chars += len(text)
    yield group


def _pieces(text: str) -> Iterator[str]:
    """`text` in pieces of at most GROUP_CHARS characters, each cut before the last space of its last
    4 Ki characters (a piece without one is cut where it ends)."""
    start = 0
    while len(text) - start > GROUP_CHARS:
        end = start + GROUP_CHARS
        space = _LAST_SPACE.search(text, end - 4096, end)
        cut = space.start() if space and space.start() > start else end
        yield text[start:cut]
        start = cut
    yield text[start:]


def _check(given_up: GivenUp | None) -> None:
    if given_up is not None and given_up():
        raise Cancelled("the request was given up while it was tokenized")


def _over_limit(tokens: int, limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"inputs: {tokens} model tokens or more exceed the limit of {limit} tokens per request "
        f"(max_request_tokens; the windows of an over-long text are counted)"
    )


def _window(encoding: Encoding) -> Window:
    return Window(
        ids=np.asarray(encoding.ids, dtype=np.int64),
        offsets=np.asarray(encoding.offsets, dtype=np.int64).reshape(-1, 2),
        special=np.asarray(encoding.special_tokens_mask, dtype=bool),
    )
