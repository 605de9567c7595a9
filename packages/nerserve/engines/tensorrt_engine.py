"""TensorRT: the GPU engine built ahead of time from the checked ONNX (see build/build_engine.py).

Written to TensorRT's documented Python API as shared by 10.x (10.1 or newer) and 11.x: a strongly
typed network from the ONNX parser (precision comes from the ONNX: TensorRT 11 has no FP16 builder
flag), one optimization profile per rung of a ladder that covers every batch x sequence shape whose
tokens fit `max_num_tokens`, and at run time one execution context per profile sharing one block of
activation memory (batches run one at a time, so they never need it at once).

`tensorrt` is imported lazily: this module imports, and `profile_ladder` works, on machines without it.
`load_engine_dir` (defined with the manifest checks it runs) is importable from here, where the
server's engine selection looks for it."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from ..manifest import load_engine_dir, read_manifest
from .base import Engine, pad_batch

__all__ = ["PLAN_NAME", "TensorRTEngine", "build_engine", "load_engine_dir", "pick_profile", "profile_ladder"]

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


def build_engine(
    onnx_path: Path, out_dir: Path, profiles: list[Profile], workspace: int, timing_cache_path: Path
) -> Path:
    """Build `out_dir/model.plan` from the ONNX: strongly typed, one profile per entry, workspace in bytes.

    The timing cache at `timing_cache_path` is read when present and written back after the build,
    so rebuilding on the same GPU and TensorRT version skips most kernel timing."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
    inputs = [network.get_input(i).name for i in range(network.num_inputs)]
    for minimum, opt, maximum in profiles:
        profile = builder.create_optimization_profile()
        for name in inputs:
            profile.set_shape(name, minimum, opt, maximum)
        config.add_optimization_profile(profile)
    cache = config.create_timing_cache(timing_cache_path.read_bytes() if timing_cache_path.is_file() else b"")
    if not config.set_timing_cache(cache, ignore_mismatch=False):  # a cache from another GPU/version: start afresh
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see the log above)")
    timing_cache_path.parent.mkdir(parents=True, exist_ok=True)
    timing_cache_path.write_bytes(memoryview(config.get_timing_cache().serialize()))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / PLAN_NAME
    path.write_bytes(memoryview(plan))
    return path


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
        if outputs != ["logits"] or "input_ids" not in self._inputs:
            raise ValueError(
                f"{plan_path}: expected inputs input_ids/attention_mask[/token_type_ids] and output "
                f"logits, found inputs {self._inputs} and outputs {outputs}"
            )
        self._profiles: list[Profile] = []
        for i in range(engine.num_optimization_profiles):
            minimum, opt, maximum = (_shape(s) for s in engine.get_tensor_profile_shape("input_ids", i))
            self._profiles.append((minimum, opt, maximum))
        self._labels = int(engine.get_tensor_shape("logits")[-1])
        capacity = max(maximum[0] * maximum[1] for _, _, maximum in self._profiles)
        self._stream = torch.cuda.Stream(self._device)
        self._buffers = {
            n: torch.zeros(capacity, dtype=_torch_dtype(engine.get_tensor_dtype(n)), device=self._device)
            for n in self._inputs
        }
        self._logits = torch.empty(
            capacity * self._labels, dtype=_torch_dtype(engine.get_tensor_dtype("logits")), device=self._device
        )
        self._memory = torch.empty(engine.device_memory_size_v2, dtype=torch.uint8, device=self._device)
        self._contexts = [self._context(i) for i in range(engine.num_optimization_profiles)]
        self._lock = threading.Lock()

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
        torch = self._torch
        if not sequences:
            return []
        ids, mask = pad_batch(sequences, self._pad_id)
        batch, longest = ids.shape
        context = self._contexts[pick_profile(self._profiles, batch, longest)]
        host = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        with self._lock, torch.cuda.stream(self._stream):
            for name, buffer in self._buffers.items():
                view = buffer[: batch * longest]
                view.copy_(torch.from_numpy(host[name]).reshape(-1).to(buffer.dtype), non_blocking=True)
                context.set_input_shape(name, (batch, longest))
            if not context.execute_async_v3(self._stream.cuda_stream):
                raise RuntimeError(f"TensorRT failed to run a batch of {batch} x {longest}")
            logits = self._logits[: batch * longest * self._labels].view(batch, longest, self._labels)
            real_mask = self._buffers["attention_mask"][: batch * longest].view(batch, longest).bool()
            real = logits[real_mask].float().cpu().numpy()  # .cpu() waits for this stream
        bounds = np.cumsum([len(s) for s in sequences])[:-1]
        return [np.ascontiguousarray(part) for part in np.split(real, bounds)]

    def close(self) -> None:
        """Drop contexts before the engine and the memory they point into."""
        self._contexts.clear()
        del self._engine, self._memory, self._buffers, self._logits
        self._torch.cuda.empty_cache()
