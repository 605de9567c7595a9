"""TensorRT at run time: a plan built ahead of time (export/tensorrt_build.py, by the build-engine
command), deserialized, with one execution context per optimization profile sharing one block of
activation memory (batches run one at a time, so they never need it at once).

The profile ladder lives here because both sides read it: the builder makes a plan's profiles from it,
and the runtime picks the tightest profile for each batch. `tensorrt` is imported lazily: this module
imports, and `profile_ladder` and the I/O checks work, on machines without it."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np

from ..checkpoint import Checkpoint
from ..config import Runtime, Settings
from ..engine_folder import EngineArtefact, read_manifest
from ..scores import TokenScores
from .base import FEEDS, Engine, pad_batch, per_sequence, scores_of_tensor

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

    name = Runtime.TENSORRT
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
    def load(cls, checkpoint: Checkpoint, settings: Settings, artefact: EngineArtefact | None) -> TensorRTEngine:
        """The folder's plan: TensorRT serves only what `make build-engine` built on this GPU."""
        if artefact is None or artefact.kind != Runtime.TENSORRT:
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

    def logits(self, sequences: list[np.ndarray]) -> list[np.ndarray]:
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
