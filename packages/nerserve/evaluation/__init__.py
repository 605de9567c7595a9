"""Entity-level evaluation: gold readers (CoNLL, JSONL spans, Hugging Face rows), the tag scheme (entities
read from tags as seqeval's default mode reads them, tags laid on tokens from character spans) and the
scores. It imports nothing of the package: `nerserve eval` (tag/evaluate.py), `nerserve tag --format
conll` and the int8 build's F1 check (export/) all score and read through it."""
