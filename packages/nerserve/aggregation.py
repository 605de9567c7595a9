"""Logits -> the response items, with the semantics of `transformers`' token-classification pipeline.

The pipeline's rules, reproduced exactly but on whole arrays instead of per-token Python:
- scores are a float32 softmax; special tokens are skipped (except by `none`, which keeps them as
  BEI-Bert does);
- a token continues a word when its token string's length differs from its span's length (tokenizers
  with a continuing-subword prefix such as "##"), else by the fallback heuristic: it starts after
  position 0 and neither it nor the character before it is a space; `[UNK]` always starts a word;
- `first` / `average` / `max` give each word one label (its first token's, the argmax of its mean
  probabilities, the label of its most confident token);
- adjacent words merge into an entity when their tags match and the later one is not `B-`; the
  entity's score is the mean of its words' scores; entities whose group is `O` are dropped;
- windows of an over-long text are merged as the pipeline merges `stride` chunks: sorted by start,
  an overlapping entity replaces the previous one when it is longer, or as long and more confident."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from .tokenization import TextTokenizer, Window

STRATEGIES = ("none", "simple", "first", "average", "max")
IGNORED_GROUPS = frozenset({"O"})  # the pipeline's default ignore_labels


@dataclasses.dataclass(frozen=True)
class LabelScheme:
    """Per-label facts for grouping, indexed by label id."""

    labels: tuple[str, ...]
    tags: np.ndarray  # int: ids of the tag after stripping B-/I- (pipeline's get_tag)
    begins: np.ndarray  # bool: label starts with B-
    groups: tuple[str, ...]  # entity_group name: label.split("-", 1)[-1]
    ignored: np.ndarray  # bool: group name is ignored

    @classmethod
    def from_labels(cls, labels: tuple[str, ...]) -> "LabelScheme":
        tag_names = [label[2:] if label[:2] in ("B-", "I-") else label for label in labels]
        tag_index = {name: i for i, name in enumerate(dict.fromkeys(tag_names))}
        groups = tuple(label.split("-", 1)[-1] for label in labels)
        return cls(
            labels=labels,
            tags=np.array([tag_index[name] for name in tag_names], dtype=np.int64),
            begins=np.array([label.startswith("B-") for label in labels], dtype=bool),
            groups=groups,
            ignored=np.array([group in IGNORED_GROUPS for group in groups], dtype=bool),
        )


def softmax(logits: np.ndarray) -> np.ndarray:
    """float32 softmax over the last axis, computed as the pipeline computes it."""
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


@dataclasses.dataclass(frozen=True)
class Entities:
    """Parallel arrays of entities (or words) in text order."""

    labels: np.ndarray
    scores: np.ndarray
    starts: np.ndarray
    ends: np.ndarray


class Aggregator:
    """Turns a text's windows and their logits into the response list for one strategy."""

    def __init__(self, tokenizer: TextTokenizer, labels: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.scheme = LabelScheme.from_labels(labels)

    # ---- grouped strategies -------------------------------------------------------------------

    def grouped(self, text: str, windows: list[Window], logits: list[np.ndarray], strategy: str) -> list[dict]:
        """Entities of `text`, one dict per entity, as the pipeline returns them (ignored groups dropped)."""
        parts = [self._window_entities(text, w, softmax(x), strategy) for w, x in zip(windows, logits)]
        starts = np.concatenate([p.starts for p in parts])
        ends = np.concatenate([p.ends for p in parts])
        labels = np.concatenate([p.labels for p in parts])
        scores = np.concatenate([p.scores for p in parts])
        if len(parts) > 1:
            keep = _merge_overlaps(starts, ends, scores)
            starts, ends, labels, scores = starts[keep], ends[keep], labels[keep], scores[keep]
        groups = self.scheme.groups
        return [
            {"token": text[s:e], "token_id": 0, "start": s, "end": e, "results": {groups[g]: v}}
            for s, e, g, v in zip(starts.tolist(), ends.tolist(), labels.tolist(), scores.tolist())
        ]

    def _window_entities(self, text: str, window: Window, probs: np.ndarray, strategy: str) -> Entities:
        content = ~window.special
        ids = window.ids[content]
        starts, ends = window.offsets[content, 0], window.offsets[content, 1]
        probs = probs[content]
        if strategy == "simple":
            labels = probs.argmax(axis=-1)
            words = Entities(labels, probs[np.arange(len(labels)), labels], starts, ends)
        else:
            words = self._words(text, ids, starts, ends, probs, strategy)
        return self._group(words)

    def _is_subword(self, text: str, ids: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
        if self.tokenizer.has_subword_prefix:
            subword = self.tokenizer.token_lengths[ids] != (ends - starts)
        else:
            codepoints = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
            space = np.append(codepoints == 32, False)  # text[start-1:start+1], clipped at the end
            subword = (starts > 0) & ~(space[np.maximum(starts - 1, 0)] | space[starts])
        return subword & (ids != self.tokenizer.unk_id)

    def _words(self, text: str, ids: np.ndarray, starts: np.ndarray, ends: np.ndarray, probs: np.ndarray,
               strategy: str) -> Entities:
        if len(ids) == 0:
            return Entities(np.zeros(0, np.int64), np.zeros(0, np.float32), starts, ends)
        begins = ~self._is_subword(text, ids, starts, ends)
        begins[0] = True
        first = np.flatnonzero(begins)
        last = np.append(first[1:], len(ids)) - 1
        if strategy == "first":
            chosen = probs[first]
        elif strategy == "max":
            token_max = probs.max(axis=-1)
            word_max = np.maximum.reduceat(token_max, first)
            word_of = np.cumsum(begins) - 1
            candidates = np.where(token_max == word_max[word_of], np.arange(len(ids)), len(ids))
            chosen = probs[np.minimum.reduceat(candidates, first)]
        elif strategy == "average":
            counts = np.diff(np.append(first, len(ids)))
            chosen = (np.add.reduceat(probs.astype(np.float64), first, axis=0) / counts[:, None]).astype(np.float32)
        else:
            raise ValueError(f"unknown aggregation strategy {strategy!r}")
        labels = chosen.argmax(axis=-1)
        return Entities(labels, chosen[np.arange(len(labels)), labels], starts[first], ends[last])

    def _group(self, words: Entities) -> Entities:
        """Merge adjacent words of one tag (unless B-), average their scores, drop ignored groups."""
        if len(words.labels) == 0:
            return words
        tags = self.scheme.tags[words.labels]
        new = np.ones(len(tags), dtype=bool)
        new[1:] = (tags[1:] != tags[:-1]) | self.scheme.begins[words.labels[1:]]
        first = np.flatnonzero(new)
        last = np.append(first[1:], len(tags)) - 1
        counts = last - first + 1
        scores = np.add.reduceat(words.scores.astype(np.float64), first) / counts
        labels = words.labels[first]
        keep = ~self.scheme.ignored[labels]
        return Entities(labels[keep], scores[keep], words.starts[first][keep], words.ends[last][keep])

    # ---- token level --------------------------------------------------------------------------

    def tokens(self, text: str, windows: list[Window], logits: list[np.ndarray], raw_scores: bool) -> list[dict]:
        """Every token once, special tokens included, with its top label's probability or all logits."""
        ids, offsets, special, values = _stitch(windows, logits, self.tokenizer.window_stride)
        vocab, labels = self.tokenizer.vocab, self.scheme.labels
        top = values.argmax(axis=-1)
        names = [vocab[i] if s else text[a:b]
                 for i, s, (a, b) in zip(ids.tolist(), special.tolist(), offsets.tolist())]
        if raw_scores:
            rows = values.tolist()
            results: list[Any] = [_raw(labels, t, row) for t, row in zip(top.tolist(), rows)]
        else:
            probs = softmax(values)
            best = probs[np.arange(len(top)), top].tolist()
            results = [{labels[t]: p} for t, p in zip(top.tolist(), best)]
        return [
            {"token": name, "token_id": i, "start": a, "end": b, "results": r}
            for name, i, (a, b), r in zip(names, ids.tolist(), offsets.tolist(), results)
        ]


def _raw(labels: tuple[str, ...], top: int, row: list[float]) -> dict[str, float]:
    """All logits, the top label first, then the others in id2label order."""
    out = {labels[top]: row[top]}
    out.update((label, value) for i, (label, value) in enumerate(zip(labels, row)) if i != top)
    return out


def _merge_overlaps(starts: np.ndarray, ends: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """The pipeline's aggregate_overlapping_entities: indices of the entities that survive, in order.

    One pass over entities (not tokens), so plain Python is the clearest form."""
    order = np.argsort(starts, kind="stable").tolist()
    s, e, v = starts.tolist(), ends.tolist(), scores.tolist()
    kept: list[int] = []
    previous = order[0]
    for current in order:
        if s[previous] <= s[current] < e[previous]:
            length, previous_length = e[current] - s[current], e[previous] - s[previous]
            if length > previous_length or (length == previous_length and v[current] > v[previous]):
                previous = current
        else:
            kept.append(previous)
            previous = current
    kept.append(previous)
    return np.array(kept, dtype=np.int64)


def _stitch(windows: list[Window], logits: list[np.ndarray], stride: int):
    """One token sequence from overlapping windows: each token taken from the window where it sits
    farthest from an edge (the earlier window on a tie); the leading special tokens of the first
    window and the trailing ones of the last. Window k's content starts `stride` tokens before
    window k-1's content ends, as the tokenizer's overflow makes them."""
    if len(windows) == 1:
        w = windows[0]
        return w.ids, w.offsets, w.special, logits[0]
    bases = np.cumsum([0] + [len(w.ids) for w in windows[:-1]])
    candidates = []  # rows: global position, -distance to an edge, flat index into the concatenation
    global_start = 0
    for base, window in zip(bases.tolist(), windows):
        content = np.flatnonzero(~window.special)
        local = np.arange(len(content))
        distance = np.minimum(local, len(content) - 1 - local)
        candidates.append(np.stack([global_start + local, -distance, base + content], axis=1))
        global_start += len(content) - stride
    table = np.concatenate(candidates)
    table = table[np.lexsort((table[:, 2], table[:, 1], table[:, 0]))]
    first_of_position = np.ones(len(table), dtype=bool)
    first_of_position[1:] = table[1:, 0] != table[:-1, 0]
    head = np.flatnonzero(np.cumprod(windows[0].special))  # specials before the first content token
    last_special = windows[-1].special
    tail = bases[-1] + len(last_special) - 1 - np.flatnonzero(np.cumprod(last_special[::-1]))[::-1]
    flat = np.concatenate([head, table[first_of_position, 2], tail])
    ids = np.concatenate([w.ids for w in windows])[flat]
    offsets = np.concatenate([w.offsets for w in windows])[flat]
    special = np.concatenate([w.special for w in windows])[flat]
    values = np.concatenate(logits)[flat]
    return ids, offsets, special, values
