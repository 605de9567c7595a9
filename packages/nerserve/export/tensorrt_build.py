"""Building TensorRT plans from the checked ONNX (the build-engine command's stage 2, export/build.py).

Written to TensorRT's documented Python API as shared by 10.x (10.1 or newer) and 11.x: a strongly
typed network from the ONNX parser (precision comes from the ONNX: TensorRT 11 has no FP16 builder
flag), and one optimization profile per rung of the ladder (engines/tensorrt_engine.py's
`profile_ladder`, which the runtime also reads) covering every batch x sequence shape whose tokens fit
`max_num_tokens`.

A build reports its progress through TensorRT's IProgressMonitor (throttled lines, see BuildProgress),
builds fp32 plans without TF32, and shares its timing cache between builds by atomic replacement.

`tensorrt` is imported lazily: this module imports, and `BuildProgress` and the other checks work, on
machines without it."""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from ..engines.tensorrt_engine import PLAN_NAME, Profile

log = logging.getLogger(__name__)


# --- build progress --------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Phase:
    """An active TensorRT build phase."""

    depth: int
    steps: int
    started: float
    done: int = 0


class BuildProgress:
    """TensorRT's build progress as throttled lines, for a build that takes minutes.

    TensorRT reports nested phases ("Building engine" > ... > "Timing graph nodes" > "Finding fastest
    tactic for <layer>" > "Measuring tactic time"), the inner ones starting and finishing hundreds of
    times. So only phases less than `outer_depth` deep get a line when they start and finish; the rest
    shows as the stack of active phases with their steps done, at most once every `interval` seconds:
    enough for a log (the build's, or model/start.sh's on Baseten) to show the build moving, few
    enough to read. Phase names and nesting change between TensorRT versions; nothing here depends
    on them.

    TensorRT calls these methods from its own threads (the IProgressMonitor contract asks for thread
    safety), and the binding (pyCore.cpp) turns an exception in step_complete into a cancelled build,
    so they take a lock and ignore calls that do not fit what they have seen (a step or finish of a
    phase never started) instead of raising."""

    def __init__(
        self,
        report: Callable[[str], None],
        interval: float = 10.0,
        outer_depth: int = 2,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._report = report
        self._interval = interval
        self._outer_depth = outer_depth
        self._clock = clock
        self._lock = threading.Lock()
        #: active phases by name, in start order (so a phase comes after its parent)
        self._phases: dict[str, _Phase] = {}
        self._last_line = clock()

    def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
        """A phase began: a line when it is an outer one, else a chance for the throttled stack line."""
        with self._lock:
            now = self._clock()
            parent = self._phases.get(parent_phase) if parent_phase is not None else None
            depth = parent.depth + 1 if parent is not None else 0
            self._phases[phase_name] = _Phase(depth, num_steps, now)
            if depth < self._outer_depth:
                self._emit(f"TensorRT: {phase_name} ({num_steps} step{'s' if num_steps != 1 else ''})", now)
            else:
                self._maybe_emit_stack(now)

    def step_complete(self, phase_name: str, step: int) -> bool:
        """Step `step` (0-based) of `phase_name` is done; True lets the build go on."""
        with self._lock:
            now = self._clock()
            phase = self._phases.get(phase_name)
            if phase is not None:
                phase.done = step + 1
            self._maybe_emit_stack(now)
        return True

    def phase_finish(self, phase_name: str) -> None:
        """A phase ended (possibly before all its steps): a line with its time when it is an outer one."""
        with self._lock:
            now = self._clock()
            phase = self._phases.pop(phase_name, None)
            if phase is not None and phase.depth < self._outer_depth:
                self._emit(f"TensorRT: {phase_name} done in {now - phase.started:.1f} s", now)
            else:
                self._maybe_emit_stack(now)

    def _maybe_emit_stack(self, now: float) -> None:
        """The active phases with their steps, as one line, when `interval` has passed since the last line."""
        if self._phases and now - self._last_line >= self._interval:
            stack = " > ".join(f"{name} {phase.done}/{phase.steps}" for name, phase in self._phases.items())
            self._emit(f"TensorRT: {stack}", now)

    def _emit(self, line: str, now: float) -> None:
        self._report(line)
        self._last_line = now


def tensorrt_progress_monitor(trt, progress: BuildProgress):
    """A trt.IProgressMonitor handing TensorRT's callbacks (names as bound in TensorRT's pyCore.cpp) to `progress`."""

    class Monitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)  # the binding's trampoline needs its own __init__ called

        def phase_start(self, phase_name, parent_phase, num_steps):
            progress.phase_start(phase_name, parent_phase, num_steps)

        def step_complete(self, phase_name, step):
            return progress.step_complete(phase_name, step)

        def phase_finish(self, phase_name):
            progress.phase_finish(phase_name)

    return Monitor()


def clear_precision_flags(config, builder_flag, precision: str) -> list[str]:
    """Clear the builder flags that would make a `precision` plan compute less exactly; returns their names.

    Strongly typed networks take each tensor's type from the ONNX, so there is nothing to set. But
    NvInfer.h (10.16 and 11.1) documents BuilderFlag::kTF32 as "Allow (but not require) computations on
    tensors of type DataType::kFLOAT to use TF32 [...] Enabled by default": left on, an fp32 plan runs
    its matmuls with 10-bit mantissas and misses the 1e-3 parity check against PyTorch fp32. TF32 is a
    math mode, not a type, and clearing it is allowed on strongly typed networks: what NvInfer.h says
    they reject are per-layer types (ILayer::setPrecision, setOutputType, setComputePrecision), and the
    type flags kFP16/kINT8 are deprecated since 10.12 as "Superseded by strong typing", while 11.1, where
    every network is strongly typed, keeps kTF32; Polygraphy's CreateConfig clears it on every build
    unless asked for TF32. fp16/bf16 plans keep the default: their float32 islands are LayerNorms and
    the logits cast, no inner products. `builder_flag` is trt.BuilderFlag (passed in: this runs without
    TensorRT)."""
    if precision not in ("fp32", "fp16", "bf16"):
        raise ValueError(f"TensorRT plans are fp32, fp16 or bf16, not {precision!r}")
    cleared = ["TF32"] if precision == "fp32" else []
    for name in cleared:
        config.clear_flag(getattr(builder_flag, name))
    return cleared


def read_timing_cache(path: Path, report: Callable[[str], None]) -> bytes:
    """The serialized timing cache at `path`; b"" (an empty cache) when it is absent or cannot be read."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return b""
    except OSError as error:
        report(f"TensorRT: timing cache {path} is unreadable ({error}); starting from an empty one")
        return b""


def attach_timing_cache(config, path: Path, report: Callable[[str], None]) -> None:
    """Attach the timing cache at `path` to `config`, or an empty one when it cannot be used.

    A cache TensorRT cannot parse (create_timing_cache gives None) or refuses (set_timing_cache is
    False: another GPU or TensorRT version, or damaged) only costs time, so the build goes on from an
    empty cache, saying so. NvInfer.h: "The cache must not be destroyed until after the engine is
    built"; the binding's set_timing_cache makes the config hold it (keep_alive), so nothing else must."""
    blob = read_timing_cache(path, report)
    if blob:
        cache = config.create_timing_cache(blob)
        if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
            return
        report(
            f"TensorRT: timing cache {path} is unusable (damaged, or from another GPU or TensorRT version); "
            "starting from an empty one"
        )
    cache = config.create_timing_cache(b"")
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        raise RuntimeError("TensorRT refused an empty timing cache")


def write_atomically(path: Path, data) -> None:
    """Write `data` (bytes or a buffer) to `path` so a reader sees the old file or the new one, never a part.

    A temporary file in the same folder, then os.replace (an atomic rename on one filesystem): two
    builds sharing a timing cache (the test fixture runs them side by side) each leave a whole cache,
    the last one written winning, and a build killed mid-write leaves no half file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(temporary, "xb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def build_plan(
    onnx_path: Path,
    out_dir: Path,
    profiles: list[Profile],
    workspace: int,
    timing_cache_path: Path,
    *,
    precision: str,
    report: Callable[[str], None] = log.info,
) -> Path:
    """Build `out_dir/model.plan` from the ONNX: strongly typed, one profile per entry, workspace in bytes.

    `precision` is the ONNX's (the plan computes in the types it gives) and picks the builder flags to
    clear. The timing cache at `timing_cache_path` is read when usable and replaced after the build,
    so rebuilding on the same GPU and TensorRT version skips most kernel timing. Progress and the
    choices made go to `report` as lines (export/build.py passes its stage printer)."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # 10.x: strong typing is opt-in through this flag; 11.x: always on, the flag is accepted and ignored
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
    cleared = clear_precision_flags(config, trt.BuilderFlag, precision)
    if cleared:
        report(f"TensorRT: {precision} plan, builder flags cleared: {', '.join(cleared)}")
    inputs = [network.get_input(i).name for i in range(network.num_inputs)]
    for minimum, opt, maximum in profiles:
        profile = builder.create_optimization_profile()
        for name in inputs:
            profile.set_shape(name, minimum, opt, maximum)
        config.add_optimization_profile(profile)
    attach_timing_cache(config, timing_cache_path, report)
    # the monitor must outlive the build: the binding's setter makes the config hold it (keep_alive)
    config.progress_monitor = tensorrt_progress_monitor(trt, BuildProgress(report))
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see the log above)")
    write_atomically(timing_cache_path, memoryview(config.get_timing_cache().serialize()))
    path = out_dir / PLAN_NAME
    write_atomically(path, memoryview(plan))
    return path
