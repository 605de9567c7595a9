"""TensorRT: the GPU engine built ahead of time from the checked ONNX (see build/build_engine.py).

Written to TensorRT's documented Python API as shared by 10.x (10.1 or newer) and 11.x: a strongly
typed network from the ONNX parser (precision comes from the ONNX: TensorRT 11 has no FP16 builder
flag), one optimization profile per rung of a ladder that covers every batch x sequence shape whose
tokens fit `max_num_tokens`, and at run time one execution context per profile sharing one block of
activation memory (batches run one at a time, so they never need it at once).

A build reports its progress through TensorRT's IProgressMonitor (throttled lines, see BuildProgress),
builds fp32 plans without TF32, and shares its timing cache between builds by atomic replacement.

`tensorrt` is imported lazily: this module imports, and `profile_ladder`, `BuildProgress` and the other
checks work, on machines without it."""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..checkpoint import Checkpoint
from ..manifest import EngineArtefact, read_manifest
from ..scores import TokenScores
from .base import FEEDS, Engine, pad_batch, per_sequence, scores_of_tensor

__all__ = [
    "PLAN_NAME",
    "BuildProgress",
    "TensorRTEngine",
    "build_engine",
    "pick_profile",
    "profile_ladder",
]

log = logging.getLogger(__name__)

PLAN_NAME = "model.plan"
#: (min_shape, opt_shape, max_shape), each (batch, sequence)
Profile = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]


def profile_ladder(max_num_tokens: int, max_input_tokens: int) -> list[Profile]:
    """Optimization profiles covering every shape (b, s) with b * s <= max_num_tokens and s <= max_input_tokens.

    Sequence caps double (2, 4, 8, ... up to max_input_tokens); the rung with cap c takes sequences
    longer than the previous cap p, so its batch may reach max_num_tokens // (p + 1). Its largest
    shape therefore holds at most 2 x max_num_tokens tokens: activation memory stays within twice
    the budget, with a handful of profiles (9 for 512 positions) instead of one per batch size.
    Every rung starts at (1, 1), so each also serves shorter batches; its opt shape is a full budget
    of sequences at the cap, the shape a loaded server's batch planner produces."""
    if max_input_tokens < 1:
        raise ValueError(f"max_input_tokens must be positive, not {max_input_tokens}")
    if max_num_tokens < max_input_tokens:
        raise ValueError(
            f"max_num_tokens ({max_num_tokens}) is below the max input length ({max_input_tokens}): "
            "one full-length text would not fit a batch"
        )
    caps, cap = [], 2
    while cap < max_input_tokens:
        caps.append(cap)
        cap *= 2
    caps.append(max_input_tokens)
    ladder, previous = [], 0
    for cap in caps:
        max_batch = max_num_tokens // (previous + 1)
        ladder.append(((1, 1), (max(1, max_num_tokens // cap), cap), (max_batch, cap)))
        previous = cap
    return ladder


def pick_profile(profiles: list[Profile], batch: int, sequence: int) -> int:
    """Index of the profile with the shortest sequence cap whose range holds (batch, sequence).

    The shortest cap is the tightest fit: its kernels were tuned nearest this batch's length."""
    fitting = [
        (maximum[1], index)
        for index, (minimum, _, maximum) in enumerate(profiles)
        if minimum[0] <= batch <= maximum[0] and minimum[1] <= sequence <= maximum[1]
    ]
    if not fitting:
        raise ValueError(
            f"no optimization profile holds a batch of {batch} x {sequence} tokens "
            f"(profiles: {[p[2] for p in profiles]}); the batch planner must stay within max_num_tokens"
        )
    return min(fitting)[1]


# --- building a plan --------------------------------------------------------------------------------------


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


def build_engine(
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
    choices made go to `report` as lines (build/build_engine.py passes its stage printer)."""
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


# --- serving a plan ------------------------------------------------------------------------------------


def check_io(plan_path: Path, inputs: list[str], outputs: list[str]) -> None:
    """Refuse a plan whose inputs run() would not write in full, or whose outputs it would not read.

    run() overwrites each input buffer's [:batch x longest] before every batch, which is why the
    buffers are allocated without a fill; an input outside FEEDS would be read unwritten."""
    if outputs != ["logits"] or not {"input_ids", "attention_mask"} <= set(inputs) <= set(FEEDS):
        raise ValueError(
            f"{plan_path}: expected inputs input_ids/attention_mask[/token_type_ids] and output "
            f"logits, found inputs {inputs} and outputs {outputs}"
        )


def set_batch_shape(context, inputs: list[str], shape: tuple[int, int], index: int, profile: Profile) -> None:
    """Set every input of `context` (on profile `index`) to `shape`; a refusal raises, naming both.

    set_input_shape returns False for a shape outside the context's profile; unchecked, that
    surfaces later as a failed execute_async_v3 that says nothing about shapes."""
    for name in inputs:
        if not context.set_input_shape(name, shape):
            minimum, _, maximum = profile
            raise ValueError(
                f"TensorRT refused shape {shape} for input {name!r} on optimization profile {index} "
                f"(min {minimum}, max {maximum})"
            )


def _shape(dims) -> tuple[int, int]:
    """A (batch, sequence) shape from TensorRT's Dims."""
    batch, sequence = (int(d) for d in dims)
    return batch, sequence


def _torch_dtype(trt_dtype):
    """The torch dtype with the same layout as a TensorRT I/O tensor type."""
    import tensorrt as trt
    import torch

    table = {
        trt.DataType.FLOAT: torch.float32,
        trt.DataType.HALF: torch.float16,
        trt.DataType.BF16: torch.bfloat16,
        trt.DataType.INT32: torch.int32,
        trt.DataType.INT64: torch.int64,
    }
    if trt_dtype not in table:
        raise ValueError(f"unsupported TensorRT I/O type {trt_dtype}")
    return table[trt_dtype]


class TensorRTEngine(Engine):
    """A deserialized plan: pads each batch, picks the tightest profile, runs on its own CUDA stream.

    Device buffers for inputs and logits are allocated once, sized for the largest profile, and
    bound to every context up front; a batch only sets its shapes. Only the real tokens' logits are
    gathered on the GPU and copied back. `precision` defaults to the one in the manifest beside the plan."""

    name = "tensorrt"
    padded = True

    def __init__(self, plan_path: Path, pad_id: int, precision: str | None = None, device: int = 0) -> None:
        import tensorrt as trt
        import torch

        self._torch = torch
        self.precision = precision or read_manifest(Path(plan_path).parent)["artefacts"]["tensorrt"]["precision"]
        self._pad_id = pad_id
        self._device = torch.device("cuda", device)
        torch.cuda.set_device(self._device)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(Path(plan_path).read_bytes())
        if self._engine is None:
            raise RuntimeError(f"TensorRT could not deserialize {plan_path} (built for another GPU or version?)")
        engine = self._engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self._inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        check_io(Path(plan_path), self._inputs, outputs)
        self._profiles: list[Profile] = []
        for i in range(engine.num_optimization_profiles):
            minimum, opt, maximum = (_shape(s) for s in engine.get_tensor_profile_shape("input_ids", i))
            self._profiles.append((minimum, opt, maximum))
        self._labels = int(engine.get_tensor_shape("logits")[-1])
        capacity = max(maximum[0] * maximum[1] for _, _, maximum in self._profiles)
        # A pooled stream does not synchronize with the default stream, so nothing used on it is
        # filled elsewhere: the engine's stream first waits for what the caller queued before, then
        # its memory is allocated on it (the caching allocator then hands out only blocks this
        # stream freed) with torch.empty, which queues no kernel; check_io guarantees run() writes
        # every input it reads.
        self._stream = torch.cuda.Stream(self._device)
        self._stream.wait_stream(torch.cuda.current_stream(self._device))
        with torch.cuda.stream(self._stream):
            self._buffers = {
                n: torch.empty(capacity, dtype=_torch_dtype(engine.get_tensor_dtype(n)), device=self._device)
                for n in self._inputs
            }
            self._logits = torch.empty(
                capacity * self._labels, dtype=_torch_dtype(engine.get_tensor_dtype("logits")), device=self._device
            )
            self._memory = torch.empty(engine.device_memory_size_v2, dtype=torch.uint8, device=self._device)
        self._contexts = [self._context(i) for i in range(engine.num_optimization_profiles)]
        self._lock = threading.Lock()

    @classmethod
    def load(cls, checkpoint: Checkpoint, precision: str | None, artefact: EngineArtefact | None) -> TensorRTEngine:
        """The folder's plan: TensorRT serves only what `make build-engine` built on this GPU."""
        if artefact is None or artefact.kind != "tensorrt":
            raise ValueError("engine tensorrt needs engine_dir: a folder made by `make build-engine` on this GPU")
        return cls(artefact.path, pad_id=checkpoint.pad_id, precision=artefact.precision)

    def _context(self, profile: int):
        """An execution context on `profile`, bound to the shared buffers and activation memory."""
        import tensorrt as trt

        context = self._engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        context.set_device_memory(self._memory.data_ptr(), self._memory.numel())
        if not context.set_optimization_profile_async(profile, self._stream.cuda_stream):
            raise RuntimeError(f"TensorRT refused optimization profile {profile}")
        for name, buffer in self._buffers.items():
            context.set_tensor_address(name, buffer.data_ptr())
        context.set_tensor_address("logits", self._logits.data_ptr())
        return context

    def run(self, sequences: list[np.ndarray]) -> list[np.ndarray]:
        if not sequences:
            return []
        with self._lock, self._torch.cuda.stream(self._stream):
            real = self._forward(sequences).float().cpu().numpy()  # .cpu() waits for this stream
        return per_sequence(real, sequences)

    def classify(self, sequences: list[np.ndarray], keep_logits: bool) -> TokenScores:
        """Softmax and argmax on the GPU: the host gets labels and probabilities."""
        with self._lock, self._torch.cuda.stream(self._stream):
            return scores_of_tensor(self._forward(sequences), keep_logits)

    def _forward(self, sequences: list[np.ndarray]):
        """The real tokens' logits [sum of lengths, labels] on the GPU, in order (on the engine's stream)."""
        torch = self._torch
        host = pad_batch(sequences, self._pad_id)
        batch, longest = host["input_ids"].shape
        index = pick_profile(self._profiles, batch, longest)
        context = self._contexts[index]
        set_batch_shape(context, self._inputs, (batch, longest), index, self._profiles[index])
        for name, buffer in self._buffers.items():
            view = buffer[: batch * longest]
            view.copy_(torch.from_numpy(host[name]).reshape(-1).to(buffer.dtype), non_blocking=True)
        if not context.execute_async_v3(self._stream.cuda_stream):
            raise RuntimeError(f"TensorRT failed to run a batch of {batch} x {longest}")
        logits = self._logits[: batch * longest * self._labels].view(batch, longest, self._labels)
        real_mask = self._buffers["attention_mask"][: batch * longest].view(batch, longest).bool()
        return logits[real_mask]

    def close(self) -> None:
        """Drop contexts before the engine and the memory they point into."""
        self._contexts.clear()
        del self._engine, self._memory, self._buffers, self._logits
        self._torch.cuda.empty_cache()
