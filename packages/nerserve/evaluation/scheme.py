"""Tags and entities: entities read from a tag sequence exactly as seqeval's default mode reads them
(conlleval's chunk rules, so IOB1, IOB2 and IOBES are all read), and tags laid on whitespace tokens from
character spans (what a model's answer is scored and written as CoNLL on).

Scoring on tokens rather than characters is what makes the figures seqeval's: a gold CoNLL file has
tokens, and a text without them (JSONL spans) is read as its whitespace tokens, the tokens `nerserve
tag --format conll` writes. An entity's tags go on every token it overlaps, so an entity the model
split inside a token ("U" and "K" of "U.K.", as the pipeline's `max` answers) counts as the token's."""

from __future__ import annotations

import re
from bisect import bisect_right
from collections.abc import Iterable, Sequence
from typing import Any

#: an entity: (first token, token past its end, type)
Entity = tuple[int, int, str]
#: where a token lies in its text: [start, end) in code points
Token = tuple[int, int]
#: a character span of a type: (start, end, type)
Span = tuple[int, int, str]

PREFIXES = ("B", "I", "E", "S")
_TOKEN = re.compile(r"\S+")


def split_tag(tag: str) -> tuple[str, str]:
    """(prefix, type) as seqeval's default mode splits a tag: `O` -> ("O", "_"), `B-PER` -> ("B", "PER")."""
    return tag[0], tag[1:].split("-", maxsplit=1)[-1] or "_"


def bad_tag(tag: str) -> bool:
    """Whether `tag` is neither `O` nor a prefix (B, I, E, S), a dash and a type."""
    return tag != "O" and (len(tag) < 3 or tag[0] not in PREFIXES or tag[1] != "-")


def _ends(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    """seqeval's end_of_chunk: a chunk ended between the previous tag and this one."""
    return (
        prev_tag in ("E", "S")
        or (prev_tag in ("B", "I") and tag in ("B", "S", "O"))
        or (prev_tag not in ("O", ".") and prev_type != type_)
    )


def _starts(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    """seqeval's start_of_chunk: a chunk starts at this tag."""
    return (
        tag in ("B", "S")
        or (prev_tag in ("E", "S", "O") and tag in ("E", "I"))
        or (tag not in ("O", ".") and prev_type != type_)
    )


def entities(tags: Sequence[str]) -> set[Entity]:
    """The entities of one sentence's tags, as seqeval's default (non-strict) mode finds them: an entity
    starts at B-X, S-X, or an I-X or E-X after O, after another type or after a closed chunk, so the
    CoNLL gold's IOB1 and a model's IOB2 are read alike and compared as entities, never tag by tag."""
    found: set[Entity] = set()
    prev_tag, prev_type, begin = "O", "", 0
    for index, tag in enumerate([*tags, "O"]):
        prefix, type_ = split_tag(tag)
        if _ends(prev_tag, prefix, prev_type, type_):
            found.add((begin, index, prev_type))
        if _starts(prev_tag, prefix, prev_type, type_):
            begin = index
        prev_tag, prev_type = prefix, type_
    return found


def whitespace_tokens(text: str) -> list[Token]:
    """The text's tokens: its runs of non-space characters, as (start, end)."""
    return [match.span() for match in _TOKEN.finditer(text)]


def tags_from_spans(tokens: Sequence[Token], spans: Iterable[Span]) -> list[str]:
    """IOB2 tags of `tokens` for character `spans`: B-X on the first token a span overlaps, I-X on the
    rest. Spans are laid in order of their start, and a token keeps the first span's tag: spans that
    meet inside a token are one entity on the tokens when of one type ("P" and ". Simmons" of "P.
    Simmons", as the pipeline answers it, are PER over both tokens), else the later one starts after it."""
    tags = ["O"] * len(tokens)
    starts = [start for start, _ in tokens]
    for start, end, label in sorted(spans):
        index = max(0, bisect_right(starts, start) - 1)
        inside = False  # whether the token before this one is already this span's (or of its type, shared)
        while index < len(tokens) and tokens[index][0] < end:
            if tokens[index][1] > start:
                if tags[index] == "O":
                    tags[index] = f"{'I' if inside else 'B'}-{label}"
                    inside = True
                else:
                    inside = split_tag(tags[index])[1] == label
            index += 1
    return tags


def tags_from_token_labels(tokens: Sequence[Token], items: Iterable[tuple[int, int, str]]) -> list[str]:
    """Tags of `tokens` from a model's per-token labels (strategy `none`: (start, end, IOB label) per
    sub-token): each token takes the label of the first sub-token that starts inside it, as the
    pipeline's `first` strategy and Hugging Face's run_ner read words; special tokens (start == end) and
    sub-tokens starting in white space are left out."""
    tags = ["O"] * len(tokens)
    taken = [False] * len(tokens)
    starts = [start for start, _ in tokens]
    for start, end, label in items:
        if start == end:
            continue
        index = bisect_right(starts, start) - 1
        if index >= 0 and start < tokens[index][1] and not taken[index]:
            taken[index] = True
            tags[index] = label
    return tags


def answer_tags(tokens: Sequence[Token], items: Iterable[dict[str, Any]], strategy: str) -> list[str]:
    """The tags of `tokens` from one text's answer (`/predict_tokens` items, top label first in
    `results`): entity spans for the grouped strategies, first-sub-token labels for `none`."""
    labelled = ((item["start"], item["end"], next(iter(item["results"]))) for item in items)
    return tags_from_token_labels(tokens, labelled) if strategy == "none" else tags_from_spans(tokens, labelled)
