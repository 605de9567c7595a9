"""The small pure pieces: batch planning, settings, request validation, the scheduler's bookkeeping,
and load-time refusals (checkpoint and settings that cannot be served)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import ROOT
from nerserve.config import Settings
from nerserve.engines.batching import budget_batches
from nerserve.errors import Empty, Invalid, PayloadTooLarge
from nerserve.schemas import parse_request
from nerserve.service import InProcessService


@pytest.mark.parametrize("padded", [True, False])
def test_budget_batches_respects_budget_and_covers_everything(padded: bool) -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        lengths = rng.integers(1, 512, size=rng.integers(1, 300))
        budget = int(rng.integers(512, 20000))
        min_fill = float(rng.choice([0.0, 0.5, 0.9]))
        batches = budget_batches(lengths, budget, padded, min_fill)
        seen = np.concatenate(batches)
        assert sorted(seen.tolist()) == list(range(len(lengths)))
        for batch in batches:
            cost = len(batch) * lengths[batch].max() if padded else lengths[batch].sum()
            assert cost <= budget
            if padded:  # bounded padding: every member is long enough
                assert lengths[batch].min() >= min_fill * lengths[batch].max()
        if padded:
            firsts = [lengths[b].max() for b in batches]
            assert firsts == sorted(firsts, reverse=True)  # longest first: little padding
        else:
            assert seen.tolist() == list(range(len(lengths)))  # packed: in order, so requests finish in order


def test_budget_batches_fills_the_budget() -> None:
    batches = budget_batches(np.array([100] * 10 + [50] * 10), 400, padded=True)
    assert [len(b) for b in batches] == [4, 4, 4, 8]  # a batch of 2x100 + 2x50 costs 4x100
    bounded = budget_batches(np.array([100] * 10 + [50] * 10), 400, padded=True, min_fill=0.8)
    assert [len(b) for b in bounded] == [4, 4, 2, 8, 2]  # 50 < 0.8 x 100: no 100s padded with 50s
    with pytest.raises(ValueError, match="exceeds max_num_tokens"):
        budget_batches(np.array([600]), 512, padded=True)


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


def test_secrets_are_not_serve_flags(capsys) -> None:
    """A flag is on the command line, which `ps` shows every user: the API key and the hub token come from
    the environment or config.yaml only; the connection limits are flags like every other setting."""
    from nerserve.cli import parser

    for secret in ("--api-key", "--hf-token"):
        with pytest.raises(SystemExit) as refused:
            parser().parse_args(["serve", secret, "s3cret"])
        assert refused.value.code == 2 and f"unrecognized arguments: {secret}" in capsys.readouterr().err
    args = parser().parse_args(["serve", "--max-connections", "64", "--header-timeout-s", "2.5"])
    assert (args.max_connections, args.header_timeout_s) == ("64", "2.5")


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
        InProcessService(Settings(checkpoint=str(built("wordpiece-uncased")), engine="onnxruntime", max_num_tokens=100))


def test_checkpoint_without_labels_or_fast_tokenizer_is_refused(built, tmp_path) -> None:
    import shutil

    source = built("wordpiece-uncased")
    no_fast = tmp_path / "no-fast"
    shutil.copytree(source, no_fast)
    (no_fast / "tokenizer.json").unlink()
    (no_fast / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "NoSuchSlowTokenizer"}))
    with pytest.raises(ValueError, match="fast tokenizer"):
        InProcessService(Settings(checkpoint=str(no_fast), engine="onnxruntime"))
    no_labels = tmp_path / "no-labels"
    shutil.copytree(source, no_labels)
    config = json.loads((no_labels / "config.json").read_text())
    config.pop("id2label")
    config.pop("label2id")
    config["num_labels"] = 0
    (no_labels / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="id2label"):
        InProcessService(Settings(checkpoint=str(no_labels), engine="onnxruntime"))


def test_window_stride_fits_the_model() -> None:
    from nerserve.text.tokenization import window_stride_for

    assert window_stride_for(510, None) == 128  # BERT's 512 positions
    assert window_stride_for(126, None) == 63  # a 128-position model: half its window
    assert window_stride_for(6, None) == 3  # an 8-token window still reads long texts
    assert window_stride_for(126, 100) == 100
    with pytest.raises(ValueError, match=r"window_stride 128 must be less than .* \(126\).*unset to get 63"):
        window_stride_for(126, 128)


def test_a_gpu_that_pytorch_cannot_use_is_named() -> None:
    from nerserve.platform import cuda_unusable_reason, nvidia_devices

    assert cuda_unusable_reason([], False, "2.13.0+cpu", None, None) is None  # no GPU: the CPU, by design
    assert cuda_unusable_reason(["nvidia0"], True, "2.13.0", "12.8", "NVRM 570.86") is None
    reason = cuda_unusable_reason(["nvidia0"], False, "2.13.0", "13.0", "NVRM version: 535.104.05")
    assert reason and "/dev/nvidia0" in reason and "535.104.05" in reason and "CUDA 13.0" in reason
    assert "engine to onnxruntime" in reason
    assert nvidia_devices() == []  # this machine has none


def test_weights_mounted_by_truss_are_read_instead_of_the_hub(built, tmp_path) -> None:
    from nerserve.checkpoint import CheckpointUnavailable, load_checkpoint
    from nerserve.config import mounted_weights

    config = {
        "weights": [
            {"source": "hf://acme/ner@main", "mount_location": str(built("wordpiece-cased"))},
            {"source": "s3://bucket/other", "mount_location": "/other"},
        ]
    }
    mounts = mounted_weights(config)
    assert mounts == {"acme/ner@main": str(built("wordpiece-cased"))}
    assert load_checkpoint("acme/ner", mounts=mounts).path == built("wordpiece-cased")
    with pytest.raises(CheckpointUnavailable, match="'acme/ner' .revision v2.: the Hugging Face hub could not be"):
        load_checkpoint("acme/ner", revision="v2", mounts=mounts)  # another revision: not the mounted one


def test_config_yaml_mounts_the_checkpoint_it_serves() -> None:
    """The image reads the checkpoint from its weights mount only if the two name the same repository."""
    from nerserve.config import Settings, read_config

    config = read_config(ROOT / "config.yaml")
    settings = Settings.from_config(config, environ={})
    assert f"{settings.checkpoint}@{settings.revision or 'main'}" in settings.mounts


def test_arena_allocates_reuses_and_coalesces() -> None:
    from nerserve.transport import ALIGN, Arena

    arena = Arena(size=64 * ALIGN)
    a, b, c = (arena.allocate(10 * ALIGN) for _ in range(3))
    assert (a, b, c) == (0, 10 * ALIGN, 20 * ALIGN)
    assert arena.allocate(40 * ALIGN) is None  # 34 left
    arena.release(b, 10 * ALIGN)
    assert arena.allocate(5 * ALIGN) == b  # first fit, in the hole
    arena.release(b, 5 * ALIGN)
    arena.release(a, 10 * ALIGN)
    arena.release(c, 10 * ALIGN)
    assert arena._free == [(0, 64 * ALIGN)]  # back to one run


def test_transport_messages_and_blocks_round_trip() -> None:
    import mmap

    from nerserve.errors import Overloaded
    from nerserve.http.responses import error_response
    from nerserve.transport import (
        CANCEL,
        DONE,
        SUBMIT,
        Block,
        Hello,
        Setup,
        Submit,
        decode,
        decode_handshake,
        encode_cancel,
        encode_done,
    )

    submit = Submit(7, 3, 12, 4096, True)
    assert decode(submit.encode()) == (SUBMIT, submit) and len(submit.encode()) == 26
    assert decode(encode_cancel(7)) == (CANCEL, 7)
    assert decode(encode_done(7, None)) == (DONE, (7, None)) and len(encode_done(7, None)) == 10
    kind, (job, error) = decode(encode_done(8, Overloaded("queue full")))
    assert (kind, job, type(error), error.message) == (DONE, 8, Overloaded, "queue full")
    response = error_response(error)  # the kind crosses processes; HTTP's status and headers are the worker's
    assert (response.status_code, response.headers["retry-after"]) == (429, "1")
    assert decode_handshake(Hello(41).encode(), Hello) == Hello(41)
    with pytest.raises(ValueError, match="expected a Setup"):
        decode_handshake(Hello(41).encode(), Setup)
    buffer = mmap.mmap(-1, 1 << 16)
    written = Block.at(buffer, 128, 3, 12, 9, True)
    written.lengths[:] = [5, 4, 3]
    written.ids[:] = np.arange(12)
    read = Block.at(buffer, 128, 3, 12, 9, True)  # the other side's views of the same bytes
    assert [s.tolist() for s in read.sequences()] == [[0, 1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11]]
    assert read.scores.logits is not None and read.scores.logits.shape == (12, 9)
    assert Block.size(3, 12, 9, True) <= 1 << 16


def test_water_fill_gives_small_needs_all_and_splits_the_rest() -> None:
    from nerserve.engine.scheduler import water_fill

    assert water_fill([10, 5000, 5000], 4096) == [10, 2043, 2043]
    assert water_fill([100, 200], 4096) == [100, 200]
    assert sum(water_fill([3000] * 7, 4096)) <= 4096


def test_workers_default_to_the_cores_only_beside_a_gpu(tmp_path) -> None:
    from nerserve.server import default_workers

    assert default_workers("auto", 16, ["nvidia0"]) == 16  # the host is the bound
    assert default_workers("auto", 16, []) == 1  # the CPU engine needs every core
    assert default_workers("onnxruntime", 16, ["nvidia0"]) == 1


def test_usable_cores_follow_the_container_quota(tmp_path) -> None:
    import os

    from nerserve.platform import usable_cores

    quota = tmp_path / "cpu.max"
    quota.write_text("150000 100000\n")
    assert usable_cores(quota) == min(2, len(os.sched_getaffinity(0)))
    quota.write_text("max 100000\n")
    assert usable_cores(quota) == len(os.sched_getaffinity(0))
