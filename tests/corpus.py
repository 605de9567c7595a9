"""Texts for the differential tests: deterministic, varied, and hostile where tokenizers break.

Every category the pipeline has edge cases for is here: accents (composed and decomposed), CJK,
emoji and other astral characters, punctuation runs, abbreviations, numbers and currency, tabs and
newlines, leading/trailing spaces, the empty string, and texts far over the model's length."""

from __future__ import annotations

import random

NAMES = [
    "Apple",
    "Google",
    "Angela Merkel",
    "U.K.",
    "U.S.A.",
    "New York",
    "São Paulo",
    "Zürich",
    "Jean-Baptiste",
    "Björk",
    "Müller",
    "Renée",
    "O'Neill",
    "McDonald's",
    "Microsoft",
    "Baseten",
    "Nvidia",
    "Łódź",
    "Ærøskøbing",
]
WORDS = [
    "is",
    "looking",
    "at",
    "buying",
    "startup",
    "for",
    "billion",
    "the",
    "company",
    "announced",
    "that",
    "its",
    "profits",
    "rose",
    "in",
    "and",
    "visited",
    "yesterday",
    "with",
    "president",
    "minister",
    "of",
    "bank",
    "football",
    "club",
    "won",
    "against",
    "on",
    "Tuesday",
    "unbelievably",
    "counterintuitive",
    "internationalization",
    "re-elected",
    "self-driving",
    "e-mail",
    "naïve",
    "café",
    "résumé",
    "coöperate",
]
SPECIAL = [
    "$1 billion",
    "€3,50",
    "£100",
    "¥2000",
    "3.14159",
    "1,000,000",
    "42%",
    "10:30",
    "2026-11-26",
    "#hashtag",
    "@user",
    "https://example.com/a?b=c",
    "C++",
    "a.k.a.",
    "e.g.",
    "Dr.",
    "Mr. Smith",
    "i.e.",
    "--",
    "...",
    "?!?!",
    "!!!",
    "((()))",
    '"quoted"',
    "'single'",
    "—",
    "–",
    "…",
]
CJK = ["東京", "北京大学", "李明", "日本語のテキスト", "서울", "한국어", "中文分词", "ｆｕｌｌｗｉｄｔｈ"]
ASTRAL = ["😀", "🇬🇧", "👩‍💻", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "🎉🎉", "𠜎", "🤖 robot", "🏳️‍🌈"]
ODD_SPACE = ["\t", "\n", "  ", "\u00a0", "\u3000", "\r\n", " \t \n "]
DECOMPOSED = ["Cafe\u0301", "nai\u0308ve", "Zu\u0308rich", "Ame\u0301lie"]


def _sentence(rng: random.Random) -> str:
    parts: list[str] = []
    for _ in range(rng.randint(3, 18)):
        pool = rng.choices([NAMES, WORDS, SPECIAL, CJK, ASTRAL, DECOMPOSED], weights=[5, 8, 2, 1, 1, 1])[0]
        parts.append(rng.choice(pool))
    text = ""
    for part in parts:
        text += part + rng.choices([" ", rng.choice(ODD_SPACE), "", ", ", ". "], weights=[20, 2, 1, 2, 1])[0]
    return text.strip() if rng.random() < 0.8 else text


def long_text(rng: random.Random, words: int) -> str:
    """A text of about `words` words: far over 512 tokens for words >= 600."""
    return " ".join(rng.choice(NAMES + WORDS + SPECIAL) for _ in range(words)) + "."


FIXED = [
    "Apple is looking at buying U.K. startup for $1 billion",
    "My name is Wolfgang and I live in Berlin",
    "",
    " ",
    "   leading and trailing   ",
    "\t\ttabs\tand\nnewlines\n",
    "!!!???...;;;:::",
    "U.K. U.S. E.U. U.N.",
    "Angela Merkel met Emmanuel Macron in Paris on Monday.",
    "São Paulo, Zürich, Łódź and Ærøskøbing",
    "東京で李明さんに会いました。",
    "😀😀😀 emoji 🇬🇧 flags 👩‍💻 zwj",
    "Cafe\u0301 with decomposed accents",
    "$1,000,000.00 €3,50 £100 ¥2000",
    "a",
    "A.",
    "...",
    "internationalization counterintuitive unbelievably",
    "\u00a0non-breaking\u00a0spaces\u3000ideographic",
    "MiXeD CaSe NaMeS LiKe ApPlE",
]


def texts(count: int = 320, seed: int = 1234) -> list[str]:
    """FIXED first, then seeded random sentences, with a few long texts (over 512 tokens) among them."""
    rng = random.Random(seed)
    out = list(FIXED)
    while len(out) < count - 4:
        out.append(_sentence(rng))
    out += [long_text(rng, 700), long_text(rng, 1500), long_text(rng, 420), long_text(rng, 2600)]
    return out


def training_corpus() -> list[str]:
    """What the test tokenizers are trained on: the same vocabulary, so most words split into a few pieces."""
    rng = random.Random(7)
    pool = NAMES + WORDS + SPECIAL + CJK[:4] + ["Paris", "Berlin", "Wolfgang", "Macron", "Emmanuel", "Monday"]
    return [" ".join(rng.choice(pool) for _ in range(12)) for _ in range(400)]
