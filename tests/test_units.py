"""The small pure pieces: batch planning, settings, request validation, the scheduler's bookkeeping,
and load-time refusals (checkpoint and settings that cannot be served)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from nerserve.batching import plan_batches
from nerserve.config import Settings
from nerserve.errors import Empty, Invalid, PayloadTooLarge
from nerserve.schemas import parse_request
from nerserve.service import NerService


@pytest.mark.parametrize("padded", [True, False])
def test_plan_batches_respects_budget_and_covers_everything(padded: bool) -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        lengths = rng.integers(1, 512, size=rng.integers(1, 300))
        budget = int(rng.integers(512, 20000))
        min_fill = float(rng.choice([0.0, 0.5, 0.9]))
        batches = plan_batches(lengths, budget, padded, min_fill)
        seen = np.concatenate(batches)
        assert sorted(seen.tolist()) == list(range(len(lengths)))
        for batch in batches:
            cost = len(batch) * lengths[batch].max() if padded else lengths[batch].sum()
            assert cost <= budget
            if padded:  # bounded padding: every member is long enough
                assert lengths[batch].min() >= min_fill * lengths[batch].max()
        firsts = [lengths[b].max() for b in batches]
        assert firsts == sorted(firsts, reverse=True)  # longest first: little padding


def test_plan_batches_fills_the_budget() -> None:
    batches = plan_batches(np.array([100] * 10 + [50] * 10), 400, padded=True)
    assert [len(b) for b in batches] == [4, 4, 4, 8]  # a batch of 2x100 + 2x50 costs 4x100
    bounded = plan_batches(np.array([100] * 10 + [50] * 10), 400, padded=True, min_fill=0.8)
    assert [len(b) for b in bounded] == [4, 4, 2, 8, 2]  # 50 < 0.8 x 100: no 100s padded with 50s
    with pytest.raises(ValueError, match="exceeds max_num_tokens"):
        plan_batches(np.array([600]), 512, padded=True)


def test_settings_environment_overrides_metadata() -> None:
    settings = Settings.load(
        {"checkpoint": "a/b", "max_num_tokens": 4096, "batch_wait_ms": 1},
        environ={"NERSERVE_MAX_NUM_TOKENS": "8192", "NERSERVE_ENGINE": "torch", "HF_TOKEN": "t", "PORT": "8080"},
    )
    assert (settings.checkpoint, settings.max_num_tokens, settings.engine, settings.hf_token) == (
        "a/b",
        8192,
        "torch",
        "t",
    )
    assert settings.port == 8000  # the platform's PORT (its proxy's) is never a setting
    with pytest.raises(ValueError, match="engine"):
        Settings.load({"engine": "tensorflow"}, environ={})
    with pytest.raises(ValueError, match="max_num_tokens must be int, not 'lots'"):
        Settings.load({}, environ={"NERSERVE_MAX_NUM_TOKENS": "lots"})
    with pytest.raises(ValueError, match="shutdown_grace_s"):
        Settings.load({"shutdown_grace_s": 9, "shutdown_timeout_s": 8}, environ={})


def test_parse_request_normalizes_and_refuses() -> None:
    request = parse_request(
        {"inputs": ["a", ["b", "c"]], "aggregation_strategy": "MAX", "truncation_direction": "LEFT"}, max_texts=10
    )
    assert request.texts() == ["a", "b", "c"]
    assert (request.aggregation_strategy, request.truncation_direction) == ("max", "left")
    with pytest.raises(Empty):
        parse_request({"inputs": []}, 10)
    with pytest.raises(PayloadTooLarge, match="11 texts"):
        parse_request({"inputs": ["a"] * 11}, 10)
    with pytest.raises(Invalid, match=r"inputs\[1\]"):
        parse_request({"inputs": ["a", []]}, 10)
    long_value = "x" * 10_000
    with pytest.raises(Invalid) as error:
        parse_request({"inputs": "a", "aggregation_strategy": long_value}, 10)
    assert len(str(error.value)) < 300  # a hostile value is not echoed whole


def test_max_num_tokens_below_max_input_length_is_refused(built) -> None:
    with pytest.raises(ValueError, match="max_num_tokens=100 is below"):
        NerService(Settings(checkpoint=str(built("wordpiece-uncased")), engine="onnxruntime", max_num_tokens=100))


def test_checkpoint_without_labels_or_fast_tokenizer_is_refused(built, tmp_path) -> None:
    import shutil

    source = built("wordpiece-uncased")
    no_fast = tmp_path / "no-fast"
    shutil.copytree(source, no_fast)
    (no_fast / "tokenizer.json").unlink()
    (no_fast / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "NoSuchSlowTokenizer"}))
    with pytest.raises(ValueError, match="fast tokenizer"):
        NerService(Settings(checkpoint=str(no_fast), engine="onnxruntime"))
    no_labels = tmp_path / "no-labels"
    shutil.copytree(source, no_labels)
    config = json.loads((no_labels / "config.json").read_text())
    config.pop("id2label")
    config.pop("label2id")
    config["num_labels"] = 0
    (no_labels / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="id2label"):
        NerService(Settings(checkpoint=str(no_labels), engine="onnxruntime"))
