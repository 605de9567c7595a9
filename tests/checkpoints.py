"""Checkpoints the tests build themselves (the model hub is out of reach): tiny token classifiers with
random weights and tokenizers trained on the spot, in HF format, so every code path that loads a
real checkpoint loads these.

- `wordpiece-uncased` / `wordpiece-cased`: BERT with a WordPiece vocabulary (continuing-subword-prefix
  path of the pipeline's word-boundary rule).
- `bpe`: RoBERTa with a byte-level BPE vocabulary (no subword prefix: the pipeline's fallback heuristic).

The vocabularies are small, so most words split into several pieces and many characters map to
[UNK]; the classifier is scaled so labels are decisive without saturating to exact 0/1 (which would
make `average` ties), and biased away from O so B-/I- runs and multi-piece entities are common."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    BertConfig,
    BertForTokenClassification,
    PreTrainedTokenizerFast,
    RobertaConfig,
    RobertaForTokenClassification,
)

from corpus import training_corpus

LABELS = ["O", "B-MISC", "I-MISC", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC"]
MAX_LENGTH = 512
KINDS = ("wordpiece-uncased", "wordpiece-cased", "bpe")


def _fast(tok: Tokenizer, roles: dict[str, str], max_length: int, **extra: object) -> PreTrainedTokenizerFast:
    """The trained `tok` as transformers loads it, its special tokens named by role (`pad_token`: "[PAD]")."""
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=max_length, **roles, **extra)


def _specials(roles: dict[str, str]) -> list[str]:
    """The special tokens a trainer reserves, in role order: their ids are their places (the pad id is one)."""
    return list(dict.fromkeys(roles.values()))


def _wordpiece_tokenizer(cased: bool, max_length: int) -> PreTrainedTokenizerFast:
    roles = dict(pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, lowercase=not cased)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=400, special_tokens=_specials(roles), continuing_subword_prefix="##")
    tok.train_from_iterator(training_corpus(), trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    tok.decoder = decoders.WordPiece(prefix="##")
    return _fast(tok, roles, max_length, do_lower_case=not cased)


def _bpe_tokenizer(max_length: int) -> PreTrainedTokenizerFast:
    roles = dict(bos_token="<s>", pad_token="<pad>", eos_token="</s>", unk_token="<unk>", mask_token="<mask>")
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=500, special_tokens=_specials(roles), initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(training_corpus(), trainer)
    tok.post_processor = processors.RobertaProcessing(
        ("</s>", tok.token_to_id("</s>")), ("<s>", tok.token_to_id("<s>")), trim_offsets=True, add_prefix_space=False
    )
    tok.decoder = decoders.ByteLevel()
    return _fast(tok, roles, max_length, cls_token="<s>", sep_token="</s>")


def _decisive(model: torch.nn.Module, seed: int) -> None:
    """Scale the classifier so argmaxes are clear (logit spread of a few units) and O is not dominant."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        weight = model.classifier.weight
        weight.copy_(torch.randn(weight.shape, generator=generator) * (4.0 / weight.shape[1] ** 0.5))
        model.classifier.bias.copy_(torch.tensor([-1.0] + [0.0] * (len(LABELS) - 1)))


def build(kind: str, out: Path, seed: int = 0, embedding_shortfall: int = 0, max_length: int = MAX_LENGTH) -> Path:
    """Write checkpoint `kind` into `out` (created) and return it.

    `embedding_shortfall` > 0 gives the model that many fewer embeddings than the tokenizer has ids:
    a real engine then fails on exactly the batches holding one of those tokens (fault tests).
    `max_length` is the model's window (positions and the tokenizer's limit): 128 for small NER models."""
    assert kind in KINDS, kind
    torch.manual_seed(seed)
    id2label = dict(enumerate(LABELS))
    label2id = {v: k for k, v in id2label.items()}
    small = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        id2label=id2label,
        label2id=label2id,
    )
    if kind == "bpe":
        tokenizer = _bpe_tokenizer(max_length)
        config = RobertaConfig(
            vocab_size=len(tokenizer),
            max_position_embeddings=max_length + 2,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
            type_vocab_size=1,
            **small,
        )
        model = RobertaForTokenClassification(config)
    else:
        tokenizer = _wordpiece_tokenizer(kind == "wordpiece-cased", max_length)
        config = BertConfig(
            vocab_size=len(tokenizer) - embedding_shortfall, max_position_embeddings=max_length, pad_token_id=0, **small
        )
        model = BertForTokenClassification(config)
    _decisive(model, seed)
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "README.md").write_text(json.dumps({"built_by": "tests/checkpoints.py", "kind": kind, "seed": seed}))
    return out
