"""The TensorRT path's own logic, run without TensorRT or a GPU.

TensorRT's objects are replaced by fakes that behave as its headers and Python bindings document
(NvInfer.h, NvInferRuntime.h, pyCore.cpp at 10.16 and 11.1): the fakes stand for TensorRT's
callbacks and return values, never for the model, the tokenizer or an engine. What only a GPU with
TensorRT can show is in tests/test_build.py::test_tensorrt_engine_matches_onnx_runtime."""

from __future__ import annotations

import re
import threading
import types
from pathlib import Path

import pytest

from nerserve.engines.tensorrt_engine import check_io, set_batch_shape
from nerserve.export.tensorrt_build import (
    BuildProgress,
    attach_timing_cache,
    clear_precision_flags,
    tensorrt_progress_monitor,
    write_atomically,
)

# --- build progress (issue 15, point 2) ------------------------------------------------------------------


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_progress_prints_outer_phases_and_a_throttled_stack_of_the_inner_ones():
    """A build as TensorRT's sample shows it: outer phases get start/finish lines, the deep and
    frequent ones appear only in a stack line at most every `interval` seconds."""
    lines: list[str] = []
    clock = Clock()
    progress = BuildProgress(lines.append, interval=10.0, outer_depth=2, clock=clock)

    def at(time: float) -> BuildProgress:
        clock.now = time
        return progress

    at(0.0).phase_start("Building engine", None, 4)
    at(0.5).phase_start("Building engine from subgraph", "Building engine", 1)
    at(1.0).phase_start("Computing profile costs", "Building engine from subgraph", 9)
    at(2.0).phase_start("Timing graph nodes", "Computing profile costs", 15)
    for node in range(15):  # 15 nodes, one second each, each with many short inner phases
        time = 2.0 + node
        at(time).phase_start(f"Finding fastest tactic for node{node}", "Timing graph nodes", 40)
        for tactic in range(40):
            assert at(time + tactic / 50).step_complete(f"Finding fastest tactic for node{node}", tactic) is True
        at(time + 0.9).phase_finish(f"Finding fastest tactic for node{node}")
        assert at(time + 0.95).step_complete("Timing graph nodes", node) is True
    at(17.0).phase_finish("Timing graph nodes")
    at(17.5).step_complete("Computing profile costs", 8)
    at(18.0).phase_finish("Computing profile costs")
    at(30.0).phase_finish("Building engine from subgraph")
    at(30.5).step_complete("Building engine", 3)
    at(31.0).phase_finish("Building engine")

    assert lines == [
        "TensorRT: Building engine (4 steps)",
        "TensorRT: Building engine from subgraph (1 step)",
        # 10 s after the last line, inside node 8's tactic search (one line, not 600 or 2 x 15)
        "TensorRT: Building engine 0/4 > Building engine from subgraph 0/1 > Computing profile costs 0/9 > "
        "Timing graph nodes 8/15 > Finding fastest tactic for node8 26/40",
        "TensorRT: Building engine from subgraph done in 29.5 s",
        "TensorRT: Building engine done in 31.0 s",
    ]


def test_progress_never_raises_on_calls_it_cannot_place():
    """An exception in a callback makes TensorRT cancel the build (pyCore.cpp returns False), so odd
    calls are ignored: a step or finish of a phase never started, a parent that is not active."""
    lines: list[str] = []
    progress = BuildProgress(lines.append, interval=0.0)
    assert progress.step_complete("never started", 3) is True
    progress.phase_finish("never started")
    progress.phase_start("orphan", "no such parent", 2)  # placed at the top
    assert progress.step_complete("orphan", 0) is True
    progress.phase_finish("orphan")
    assert lines[0] == "TensorRT: orphan (2 steps)"
    assert lines[1] == "TensorRT: orphan 1/2"
    assert re.fullmatch(r"TensorRT: orphan done in \d+\.\d s", lines[2])


def test_progress_is_safe_from_several_threads():
    """IProgressMonitor's contract: TensorRT may call it from several internal threads at once."""
    lines: list[str] = []
    progress = BuildProgress(lines.append, interval=0.0)

    def build(worker: int) -> None:
        for phase in range(50):
            name = f"worker {worker} phase {phase}"
            progress.phase_start(name, None, 3)
            progress.phase_start(f"{name} inner", name, 5)
            for step in range(5):
                progress.step_complete(f"{name} inner", step)
            progress.phase_finish(f"{name} inner")
            progress.phase_finish(name)

    threads = [threading.Thread(target=build, args=(worker,)) for worker in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for worker in range(8):
        for phase in range(50):
            name = f"worker {worker} phase {phase}"
            assert lines.count(f"TensorRT: {name} (3 steps)") == 1
            assert sum(1 for line in lines if line.startswith(f"TensorRT: {name} done in ")) == 1


def test_tensorrt_monitor_hands_every_callback_to_the_progress_lines():
    """The IProgressMonitor subclass forwards TensorRT's three callbacks (names and arguments as
    pyCore.cpp binds them) and step_complete's answer; a plain base class stands in for the binding."""

    class IProgressMonitor:
        def __init__(self) -> None:
            self.initialised = True

    lines: list[str] = []
    monitor = tensorrt_progress_monitor(
        types.SimpleNamespace(IProgressMonitor=IProgressMonitor), BuildProgress(lines.append)
    )
    assert isinstance(monitor, IProgressMonitor) and monitor.initialised
    monitor.phase_start(phase_name="Building engine", parent_phase=None, num_steps=1)
    assert monitor.step_complete(phase_name="Building engine", step=0) is True
    monitor.phase_finish(phase_name="Building engine")
    assert lines[0] == "TensorRT: Building engine (1 step)" and lines[1].startswith("TensorRT: Building engine done")


# --- builder flags: no TF32 in fp32 plans (point 3) ---------------------------------------------------------


class FlagConfig:
    """IBuilderConfig's flag calls, recorded."""

    def __init__(self) -> None:
        self.cleared: list[str] = []

    def clear_flag(self, flag: str) -> None:
        self.cleared.append(flag)


BUILDER_FLAG = types.SimpleNamespace(TF32="BuilderFlag.TF32")


def test_fp32_plans_clear_tf32():
    config = FlagConfig()
    assert clear_precision_flags(config, BUILDER_FLAG, "fp32") == ["TF32"]
    assert config.cleared == ["BuilderFlag.TF32"]


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_half_precision_plans_keep_the_default_flags(precision):
    config = FlagConfig()
    assert clear_precision_flags(config, BUILDER_FLAG, precision) == []
    assert config.cleared == []


def test_int8_is_no_tensorrt_precision():
    with pytest.raises(ValueError, match="fp32, fp16 or bf16, not 'int8'"):
        clear_precision_flags(FlagConfig(), BUILDER_FLAG, "int8")


# --- timing cache: fallback to empty, atomic replacement (point 4) ----------------------------------------


class CacheConfig:
    """IBuilderConfig's timing-cache calls: create_timing_cache returns None for bytes it cannot
    parse (a null ITimingCache* through the binding); set_timing_cache returns False for a cache
    from another device (NvInfer.h: "A failure will be reported if the CUDA device property in the
    provided cache is different from current environment")."""

    def __init__(self) -> None:
        self.attached: tuple[str, bytes] | None = None

    def create_timing_cache(self, blob: bytes):
        return None if blob.startswith(b"garbage") else ("cache", bytes(blob))

    def set_timing_cache(self, cache, ignore_mismatch: bool) -> bool:
        assert ignore_mismatch is False  # a mismatched cache is dropped, never used
        if cache[1].startswith(b"other gpu"):
            return False
        self.attached = cache
        return True


@pytest.mark.parametrize(
    "content,attached,said",
    [
        (None, b"", None),  # no cache yet: empty, silently
        (b"timings", b"timings", None),
        (b"garbage\x00\x01", b"", "is unusable"),
        (b"other gpu timings", b"", "is unusable"),
        ("a folder", b"", "is unreadable"),
    ],
)
def test_timing_cache_is_used_when_it_can_be_and_empty_otherwise(tmp_path, content, attached, said):
    path = tmp_path / "timing.cache"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content == "a folder":
        path.mkdir()
    lines: list[str] = []
    config = CacheConfig()
    attach_timing_cache(config, path, lines.append)
    assert config.attached == ("cache", attached)
    if said is None:
        assert lines == []
    else:
        assert len(lines) == 1 and str(path) in lines[0] and said in lines[0] and "empty" in lines[0]


def test_atomic_write_replaces_and_leaves_nothing_else(tmp_path):
    path = tmp_path / "cache" / "timing.cache"  # the folder is made when missing
    write_atomically(path, b"first")
    write_atomically(path, memoryview(b"second, longer"))
    assert path.read_bytes() == b"second, longer"
    assert [p.name for p in path.parent.iterdir()] == ["timing.cache"]


def test_failed_atomic_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "timing.cache"
    path.write_bytes(b"old")
    with pytest.raises(TypeError):
        write_atomically(path, "not bytes")  # fails inside the write, after the temporary file exists
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["timing.cache"]


def test_concurrent_writers_never_show_a_reader_part_of_a_file(tmp_path):
    """Two builds replacing one cache while a third reads it: every read is one whole version."""
    path = tmp_path / "timing.cache"
    versions = [bytes([n]) * (256 << 10) for n in (1, 2, 3)]
    path.write_bytes(versions[0])
    seen: set[bytes] = set()
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            seen.add(path.read_bytes())

    def write(version: bytes) -> None:
        for _ in range(15):
            write_atomically(path, version)

    reader = threading.Thread(target=read)
    writers = [threading.Thread(target=write, args=(v,)) for v in versions[1:]]
    reader.start()
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join()
    done.set()
    reader.join()
    assert seen <= set(versions) and seen
    assert [p.name for p in tmp_path.iterdir()] == ["timing.cache"]


# --- run-time checks: inputs written in full (point 5), refused shapes (point 6) ------------------------------


@pytest.mark.parametrize("inputs", [["input_ids", "attention_mask"], ["input_ids", "attention_mask", "token_type_ids"]])
def test_plans_whose_inputs_run_writes_are_accepted(inputs):
    check_io(Path("model.plan"), inputs, ["logits"])


@pytest.mark.parametrize(
    "inputs,outputs",
    [
        (["input_ids"], ["logits"]),  # no attention mask: run() reads it back to find the real tokens
        (["input_ids", "attention_mask", "position_ids"], ["logits"]),  # a buffer run() would never write
        (["input_ids", "attention_mask"], ["logits", "hidden_states"]),
    ],
)
def test_plans_with_inputs_run_would_leave_unwritten_are_refused(inputs, outputs):
    """The input buffers are allocated with torch.empty (no fill on another stream): that is sound
    only because run() writes every input it has, which this check guarantees."""
    with pytest.raises(ValueError, match=r"model\.plan: expected inputs .* found inputs"):
        check_io(Path("model.plan"), inputs, outputs)


class ShapeContext:
    """IExecutionContext.set_input_shape: False for a shape outside the context's profile (its documented
    return value: "True on success, false if [...] some other error occurred")."""

    def __init__(self, minimum: tuple[int, int], maximum: tuple[int, int]) -> None:
        self.minimum, self.maximum = minimum, maximum
        self.shapes: dict[str, tuple[int, int]] = {}

    def set_input_shape(self, name: str, shape: tuple[int, int]) -> bool:
        if not all(lo <= n <= hi for lo, n, hi in zip(self.minimum, shape, self.maximum, strict=True)):
            return False
        self.shapes[name] = shape
        return True


PROFILE = ((1, 1), (32, 16), (64, 16))


def test_batch_shape_is_set_on_every_input():
    context = ShapeContext(PROFILE[0], PROFILE[2])
    set_batch_shape(context, ["input_ids", "attention_mask"], (64, 9), 3, PROFILE)
    assert context.shapes == {"input_ids": (64, 9), "attention_mask": (64, 9)}


def test_refused_batch_shape_names_the_input_the_shape_and_the_profile():
    context = ShapeContext(PROFILE[0], PROFILE[2])
    message = (
        r"refused shape \(2, 17\) for input 'input_ids' on optimization profile 3 \(min \(1, 1\), max \(64, 16\)\)"
    )
    with pytest.raises(ValueError, match=message):
        set_batch_shape(context, ["input_ids", "attention_mask"], (2, 17), 3, PROFILE)
