"""Entity-level precision, recall and F1 with support: per type, micro (over every entity) and macro
(the unweighted mean of the types' figures), exactly as seqeval's default mode computes them
(`classification_report(..., output_dict=True)`): an entity counts when its first token, its end and
its type all match; a type present only in predictions is a row of support 0 and counts in the macro
mean; a ratio over nothing is 0."""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Sequence
from typing import Any

from .scheme import entities


@dataclasses.dataclass
class Tally:
    """Counts of entities over the sentences added so far, by type."""

    hits: Counter[str] = dataclasses.field(default_factory=Counter)
    found: Counter[str] = dataclasses.field(default_factory=Counter)
    wanted: Counter[str] = dataclasses.field(default_factory=Counter)
    sentences: int = 0

    def add(self, gold: Sequence[str], predicted: Sequence[str]) -> None:
        """One sentence's gold and predicted tags (the same tokens)."""
        if len(gold) != len(predicted):
            raise ValueError(f"{len(gold)} gold tags against {len(predicted)} predicted")
        want, got = entities(gold), entities(predicted)
        self.hits.update(kind for _, _, kind in want & got)
        self.found.update(kind for _, _, kind in got)
        self.wanted.update(kind for _, _, kind in want)
        self.sentences += 1

    def report(self) -> dict[str, Any]:
        """`{"micro": figures, "macro": figures, "per_type": {type: figures}}`, each figures being
        precision, recall, f1 and support (gold entities)."""
        types = sorted(set(self.found) | set(self.wanted))
        per_type = {kind: _figures(self.hits[kind], self.found[kind], self.wanted[kind]) for kind in types}
        micro = _figures(sum(self.hits.values()), sum(self.found.values()), sum(self.wanted.values()))
        macro = {
            name: sum(row[name] for row in per_type.values()) / len(types) if types else 0.0
            for name in ("precision", "recall", "f1")
        }
        return {"micro": micro, "macro": {**macro, "support": micro["support"]}, "per_type": per_type}


def _figures(hits: int, found: int, wanted: int) -> dict[str, Any]:
    precision = hits / found if found else 0.0
    recall = hits / wanted if wanted else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "support": wanted}


def micro_f1(gold: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]]) -> float:
    """Micro entity F1 of whole corpora of tags (the int8 build's check)."""
    tally = Tally()
    for gold_tags, predicted_tags in zip(gold, predicted, strict=True):
        tally.add(gold_tags, predicted_tags)
    return float(tally.report()["micro"]["f1"])
