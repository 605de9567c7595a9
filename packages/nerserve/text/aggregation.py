"""Engine scores -> the response items, with the semantics of `transformers`' token-classification pipeline.

The pipeline's rules, reproduced exactly but on whole arrays instead of per-token Python:
- scores are a float32 softmax (taken where the logits are: see scores.py; `average` needs whole rows,
  so it takes the logits and the same softmax here); special tokens are skipped (except by `none`,
  which keeps them as BEI-Bert does);
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

from ..scores import TokenScores, softmax
from .tokenization import TextTokenizer, Window

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
    def from_labels(cls, labels: tuple[str, ...]) -> LabelScheme:
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


@dataclasses.dataclass(frozen=True)
class TokenTable:
    """Every window of a request's texts, concatenated: one row per token, so each step below is a
    handful of numpy calls for the whole request instead of a loop over texts."""

    ids: np.ndarray  # int64 [n]
    starts: np.ndarray  # int64 [n]
    ends: np.ndarray  # int64 [n]
    special: np.ndarray  # bool [n]
    scores: TokenScores  # [n]
    window: np.ndarray  # int64 [n]: index of the token's window
    text_of_window: np.ndarray  # int64 [windows]

    @classmethod
    def of(cls, windows: list[list[Window]], scores: TokenScores) -> TokenTable:
        flat = [w for text_windows in windows for w in text_windows]
        offsets = np.concatenate([w.offsets for w in flat])
        lengths = np.fromiter((len(w.ids) for w in flat), dtype=np.int64, count=len(flat))
        return cls(
            ids=np.concatenate([w.ids for w in flat]),
            starts=offsets[:, 0],
            ends=offsets[:, 1],
            special=np.concatenate([w.special for w in flat]),
            scores=scores,
            window=np.repeat(np.arange(len(flat)), lengths),
            text_of_window=np.repeat(np.arange(len(windows)), [len(ws) for ws in windows]),
        )

    def take(self, rows: np.ndarray, window: np.ndarray, text_of_window: np.ndarray) -> TokenTable:
        """The given rows, regrouped into new windows."""
        return TokenTable(
            self.ids[rows],
            self.starts[rows],
            self.ends[rows],
            self.special[rows],
            self.scores.take(rows),
            window,
            text_of_window,
        )


@dataclasses.dataclass(frozen=True)
class TokenRows:
    """The tokens strategy `none` answers with, each text's once (over-long texts stitched), in answer
    order: text t's are rows `bounds[t]:bounds[t + 1]`."""

    texts: list[str]
    text_of_token: np.ndarray  # int64 [n]
    ids: np.ndarray  # int64 [n]
    starts: np.ndarray  # int64 [n]
    ends: np.ndarray  # int64 [n]
    special: np.ndarray  # bool [n]
    scores: TokenScores  # [n]
    bounds: list[int]  # [texts + 1]


@dataclasses.dataclass(frozen=True)
class Entities:
    """A request's entities (one row each, text by text) and the words and tokens they are made of,
    so each answer's shape (BEI-Bert's items, the pipeline's) is made from the one aggregation."""

    starts: np.ndarray  # int64 [entities]
    ends: np.ndarray  # int64 [entities]
    labels: np.ndarray  # int64 [entities]: the label id whose group names the entity
    scores: np.ndarray  # float64 [entities]: the mean of its words' scores
    kept: list[np.ndarray]  # per text: the rows that survive, in order (over-long texts' windows merged)
    entity_first_word: np.ndarray  # int64 [entities]: its first word (index into word_first)
    entity_last_word: np.ndarray  # int64 [entities]
    word_first: np.ndarray  # int64 [words]: each word's first content token (index into ids)
    word_last: np.ndarray  # int64 [words]
    ids: np.ndarray  # int64 [content tokens]: special tokens left out
    text_of_token: np.ndarray  # int64 [content tokens]
    token_starts: np.ndarray  # int64 [content tokens]
    token_ends: np.ndarray  # int64 [content tokens]

    def items(self, rows: np.ndarray) -> list[tuple[int, int, int, float]]:
        """(start, end, label id, score) of the given rows."""
        return list(
            zip(
                self.starts[rows].tolist(),
                self.ends[rows].tolist(),
                self.labels[rows].tolist(),
                self.scores[rows].tolist(),
                strict=True,
            )
        )


class Aggregator:
    """Turns a request's windows and their scores into one response list per text."""

    def __init__(self, tokenizer: TextTokenizer, labels: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.scheme = LabelScheme.from_labels(labels)

    @staticmethod
    def needs_logits(strategy: str, raw_scores: bool) -> bool:
        """Whether the engine must hand back whole logit rows: `average` averages probability rows, and
        `raw_scores` shows them; every other answer reads only each token's top label and probability."""
        return raw_scores or strategy == "average"

    # ---- grouped strategies -------------------------------------------------------------------

    def grouped(
        self, texts: list[str], windows: list[list[Window]], scores: TokenScores, strategy: str
    ) -> list[list[dict]]:
        """Entities of each text, as the pipeline returns them (ignored groups dropped, windows merged),
        in BEI-Bert's items."""
        found = self._entities(texts, windows, scores, strategy, self.scheme.ignored)
        names = self.scheme.groups
        return [
            [
                {"token": texts[t][s:e], "token_id": 0, "start": s, "end": e, "results": {names[g]: v}}
                for s, e, g, v in found.items(kept)
            ]
            for t, kept in enumerate(found.kept)
        ]

    def hf_grouped(
        self,
        texts: list[str],
        windows: list[list[Window]],
        scores: TokenScores,
        strategy: str,
        ignore_labels: frozenset[str],
    ) -> list[list[dict]]:
        """The same entities in the pipeline's own items (`entity_group`, `score`, `word`, `start`, `end`),
        groups named in `ignore_labels` dropped. `word` is the tokenizer's string of the entity's tokens
        as the pipeline makes it: the token strings (an `[UNK]`'s text in its place) decoded per word,
        then the words decoded again (`simple`: the tokens decoded once)."""
        ignored = np.array([group in ignore_labels for group in self.scheme.groups], dtype=bool)
        found = self._entities(texts, windows, scores, strategy, ignored)
        names = self.scheme.groups
        vocab, unk = self.tokenizer.vocab, self.tokenizer.unk_id
        ids, text_of_token = found.ids.tolist(), found.text_of_token.tolist()
        token_starts, token_ends = found.token_starts.tolist(), found.token_ends.tolist()

        def strings(first: int, last: int) -> list[str]:
            """The token strings of content tokens first..last, an `[UNK]`'s text in its place."""
            return [
                vocab[ids[k]] if ids[k] != unk else texts[text_of_token[k]][token_starts[k] : token_ends[k]]
                for k in range(first, last + 1)
            ]

        decode = self.tokenizer.decode
        word_first, word_last = found.word_first.tolist(), found.word_last.tolist()

        def word(entity: int) -> str:
            words = range(int(found.entity_first_word[entity]), int(found.entity_last_word[entity]) + 1)
            if strategy == "simple":
                return decode(strings(words[0], words[-1]))
            return decode([decode(strings(word_first[w], word_last[w])) for w in words])

        return [
            [
                {"entity_group": names[g], "score": v, "word": word(i), "start": s, "end": e}
                for i, (s, e, g, v) in zip(kept.tolist(), found.items(kept), strict=True)
            ]
            for kept in found.kept
        ]

    def _entities(
        self, texts: list[str], windows: list[list[Window]], scores: TokenScores, strategy: str, ignored: np.ndarray
    ) -> Entities:
        """Every text's entities under `strategy`, groups whose label id `ignored` marks dropped.

        The pipeline aggregates each window on its own, so every window's first token starts a word
        and an entity; over-long texts then have their windows' entities merged."""
        table = TokenTable.of(windows, scores)
        content = ~table.special
        if not content.any():
            none = np.zeros(0, dtype=np.int64)
            return Entities(none, none, none, none.astype(np.float64), [none] * len(texts), *[none] * 8)
        ids, starts, ends = table.ids[content], table.starts[content], table.ends[content]
        window = table.window[content]
        text_of_token = table.text_of_window[window]
        tokens = table.scores.take(content)
        window_first = np.ones(len(ids), dtype=bool)
        window_first[1:] = window[1:] != window[:-1]
        if strategy == "simple":
            labels, values = tokens.labels, tokens.probs
            first = np.arange(len(ids))
            last = first
        else:
            begins = ~self._is_subword(texts, text_of_token, ids, starts, ends) | window_first
            first = np.flatnonzero(begins)
            last = np.append(first[1:], len(ids)) - 1
            labels, values = _word_labels(tokens, first, strategy)
        # Adjacent words merge into one entity unless a window starts, the tag changes, or B- begins one.
        tags = self.scheme.tags[labels]
        new = window_first[first].copy()
        new[1:] |= (tags[1:] != tags[:-1]) | self.scheme.begins[labels[1:]]
        group_first = np.flatnonzero(new)
        group_last = np.append(group_first[1:], len(first)) - 1
        counts = group_last - group_first + 1
        group_scores = np.add.reduceat(values.astype(np.float64), group_first) / counts
        group_labels = labels[group_first]
        keep = ~ignored[group_labels]
        entity_starts = starts[first][group_first][keep]
        entity_ends = ends[last][group_last][keep]
        entity_scores = group_scores[keep]
        entity_text = table.text_of_window[window[first][group_first][keep]]
        bounds = np.searchsorted(entity_text, np.arange(len(texts) + 1))
        kept = []
        for t, text_windows in enumerate(windows):
            lo, hi = int(bounds[t]), int(bounds[t + 1])
            if len(text_windows) > 1 and hi > lo:
                kept.append(lo + _merge_overlaps(entity_starts[lo:hi], entity_ends[lo:hi], entity_scores[lo:hi]))
            else:
                kept.append(np.arange(lo, hi))
        return Entities(
            starts=entity_starts,
            ends=entity_ends,
            labels=group_labels[keep],
            scores=entity_scores,
            kept=kept,
            entity_first_word=group_first[keep],
            entity_last_word=group_last[keep],
            word_first=first,
            word_last=last,
            ids=ids,
            text_of_token=text_of_token,
            token_starts=starts,
            token_ends=ends,
        )

    def _is_subword(
        self, texts: list[str], text_of_token: np.ndarray, ids: np.ndarray, starts: np.ndarray, ends: np.ndarray
    ) -> np.ndarray:
        if self.tokenizer.has_subword_prefix:
            subword = self.tokenizer.token_lengths[ids] != (ends - starts)
        else:
            # The fallback reads text[start-1:start+1]: all texts' code points side by side, each followed
            # by one non-space (the slice is clipped at the end of its text).
            spaces = [np.frombuffer(t.encode("utf-32-le", "surrogatepass"), dtype=np.uint32) == 32 for t in texts]
            base = np.cumsum([0] + [len(space) + 1 for space in spaces[:-1]])
            space = np.concatenate([np.append(space, False) for space in spaces])
            at = base[text_of_token] + starts
            subword = (starts > 0) & ~(space[np.maximum(at - 1, 0)] | space[at])
        return subword & (ids != self.tokenizer.unk_id)

    # ---- token level --------------------------------------------------------------------------

    def tokens(
        self, texts: list[str], windows: list[list[Window]], scores: TokenScores, raw_scores: bool
    ) -> list[list[dict]]:
        """Every token of each text once, special tokens included, with its top label's probability or
        all logits; an over-long text's windows are stitched into one sequence first."""
        rows = self.token_rows(texts, windows, scores)
        items = self.token_items(rows, 0, len(rows.ids), raw_scores)
        bounds = rows.bounds
        return [items[bounds[t] : bounds[t + 1]] for t in range(len(texts))]

    def hf_tokens(
        self, texts: list[str], windows: list[list[Window]], scores: TokenScores, ignore_labels: frozenset[str]
    ) -> list[list[dict]]:
        """Strategy `none` in the pipeline's items (`entity`, `score`, `index`, `word`, `start`, `end`) for
        texts of one window each (the pipeline takes no `stride` with `none`): special tokens and tokens
        whose label `ignore_labels` names left out; `index` the token's position in the model's input,
        `word` its token string (an `[UNK]`'s text in its place)."""
        if any(len(text_windows) != 1 for text_windows in windows):
            raise ValueError("the pipeline's strategy none reads one window per text")
        labels, vocab, unk = self.scheme.labels, self.tokenizer.vocab, self.tokenizer.unk_id
        out = []
        offset = 0
        for text, (window,) in zip(texts, windows, strict=True):
            n = len(window.ids)
            top = scores.labels[offset : offset + n].tolist()
            probs = scores.probs[offset : offset + n].tolist()
            offset += n
            out.append(
                [
                    {
                        "entity": labels[top[i]],
                        "score": probs[i],
                        "index": i,
                        "word": vocab[token] if token != unk else text[start:end],
                        "start": start,
                        "end": end,
                    }
                    for i, (token, (start, end), special) in enumerate(
                        zip(window.ids.tolist(), window.offsets.tolist(), window.special.tolist(), strict=True)
                    )
                    if not special and labels[top[i]] not in ignore_labels
                ]
            )
        return out

    def token_rows(self, texts: list[str], windows: list[list[Window]], scores: TokenScores) -> TokenRows:
        """The rows `tokens` answers with, before any item is made (numpy only)."""
        table = TokenTable.of(windows, scores)
        if any(len(text_windows) > 1 for text_windows in windows):
            table = self._stitched(windows, table)
        text_of_token = table.text_of_window[table.window]
        bounds = np.searchsorted(text_of_token, np.arange(len(texts) + 1)).tolist()
        return TokenRows(texts, text_of_token, table.ids, table.starts, table.ends, table.special, table.scores, bounds)

    def token_items(self, rows: TokenRows, lo: int, hi: int, raw_scores: bool) -> list[dict]:
        """The items of rows `lo:hi` (an answer too large to hold as items at once is made in ranges)."""
        texts, ids, starts, ends = (
            rows.texts,
            rows.ids[lo:hi].tolist(),
            rows.starts[lo:hi].tolist(),
            rows.ends[lo:hi].tolist(),
        )
        top = rows.scores.labels[lo:hi].tolist()
        vocab, labels = self.tokenizer.vocab, self.scheme.labels
        names = [
            vocab[i] if special else texts[t][a:b]
            for t, i, special, a, b in zip(
                rows.text_of_token[lo:hi].tolist(), ids, rows.special[lo:hi].tolist(), starts, ends, strict=True
            )
        ]
        results: list[Any]
        if raw_scores:
            if rows.scores.logits is None:
                raise ValueError("raw_scores needs the engine's logits")
            logits = rows.scores.logits[lo:hi].tolist()
            results = [_raw(labels, t, row) for t, row in zip(top, logits, strict=True)]
        else:
            results = [{labels[t]: p} for t, p in zip(top, rows.scores.probs[lo:hi].tolist(), strict=True)]
        return [
            {"token": name, "token_id": i, "start": a, "end": b, "results": r}
            for name, i, a, b, r in zip(names, ids, starts, ends, results, strict=True)
        ]

    def _stitched(self, windows: list[list[Window]], table: TokenTable) -> TokenTable:
        """The table with each over-long text's windows replaced by its stitched sequence (one window)."""
        rows_per_window = np.bincount(table.window, minlength=len(table.text_of_window))
        window_starts = np.concatenate([[0], np.cumsum(rows_per_window)])
        pieces, cursor = [], 0
        for text_windows in windows:
            count = len(text_windows)
            first_row = int(window_starts[cursor])
            if count == 1:
                pieces.append(np.arange(first_row, int(window_starts[cursor + 1])))
            else:
                pieces.append(first_row + _stitch(text_windows, self.tokenizer.window_stride))
            cursor += count
        rows = np.concatenate(pieces)
        window = np.repeat(np.arange(len(windows)), [len(piece) for piece in pieces])
        return table.take(rows, window, np.arange(len(windows)))


def _word_labels(tokens: TokenScores, first: np.ndarray, strategy: str) -> tuple[np.ndarray, np.ndarray]:
    """One (label, score) per word starting at `first`: its first token's (first), its most confident
    token's, the earliest on a tie (max), or the argmax of its mean probabilities (average)."""
    if strategy == "first":
        chosen = first
    elif strategy == "max":
        word_max = np.maximum.reduceat(tokens.probs, first)
        word_of = np.repeat(np.arange(len(first)), np.diff(np.append(first, len(tokens))))
        candidates = np.where(tokens.probs == word_max[word_of], np.arange(len(tokens)), len(tokens))
        chosen = np.minimum.reduceat(candidates, first)
    elif strategy == "average":
        if tokens.logits is None:
            raise ValueError("average needs the engine's logits")
        probs = softmax(tokens.logits)
        counts = np.diff(np.append(first, len(probs)))
        mean = (np.add.reduceat(probs.astype(np.float64), first, axis=0) / counts[:, None]).astype(np.float32)
        labels = mean.argmax(axis=-1)
        return labels, mean[np.arange(len(labels)), labels]
    else:
        raise ValueError(f"unknown aggregation strategy {strategy!r}")
    return tokens.labels[chosen], tokens.probs[chosen]


def _raw(labels: tuple[str, ...], top: int, row: list[float]) -> dict[str, float]:
    """All logits, the top label first, then the others in id2label order."""
    out = {labels[top]: row[top]}
    out.update((label, value) for i, (label, value) in enumerate(zip(labels, row, strict=True)) if i != top)
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


def _stitch(windows: list[Window], stride: int) -> np.ndarray:
    """Rows (into the windows' concatenation) of one token sequence made from overlapping windows:
    each token taken from the window where it sits farthest from an edge (the earlier window on a
    tie); the leading special tokens of the first window and the trailing ones of the last. Window k's
    content starts `stride` tokens before window k-1's content ends, as the tokenizer's overflow makes them."""
    bases = np.cumsum([0] + [len(w.ids) for w in windows[:-1]])
    candidates = []  # rows: global position, -distance to an edge, flat index into the concatenation
    global_start = 0
    for base, window in zip(bases.tolist(), windows, strict=True):
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
    return np.concatenate([head, table[first_of_position, 2], tail])
