"""Checkpoint -> ONNX: the graph ONNX Runtime serves on CPU and TensorRT builds from.

Exported with torch.export (the dynamo exporter) at opset 18, dynamic batch and sequence axes,
LayerNorm kept as one LayerNormalization op, and the logits as the only output. The export is
checked against PyTorch on fresh random inputs before anything uses it.

Beside the float32 export this module derives the other artefacts an engine folder holds:
- the ORT-optimized graph (fusions done once at build time, so the CPU server starts faster);
- half-precision exports (fp16/bf16) for TensorRT's strongly typed networks, where the precision
  must come from the ONNX itself (TensorRT 11 has no FP16 builder flag);
- an int8 dynamically quantized graph for ONNX Runtime on CPU."""

from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..checkpoint import Checkpoint
from ..engines.base import pad_batch

log = logging.getLogger(__name__)

OPSET = 18
ONNX_NAME = "model.onnx"
ORT_OPTIMIZED_NAME = "model.ort.onnx"
INT8_NAME = "model.int8.onnx"
#: fp32 export vs PyTorch: the largest logit difference a correct export shows is ~1e-5
FP32_TOLERANCE = 1e-3
#: (largest |logit diff|, smallest argmax agreement) a correct artefact of each precision stays within,
#: measured against float32 PyTorch on random ids (harsher than text: random ids make near-ties common)
TOLERANCES: dict[str, tuple[float, float]] = {
    "fp32": (FP32_TOLERANCE, 0.999),
    "fp16": (0.1, 0.99),
    "bf16": (0.5, 0.98),
    "int8": (float("inf"), 0.0),  # judged by entity F1 on real text instead (export/build.py)
}
DEFAULT_SHAPES: tuple[tuple[int, int], ...] = ((1, 7), (3, 33), (8, 128), (2, 0))


def onnx_name(precision: str) -> str:
    """File name of the export in `precision`: the float32 one keeps the historical name."""
    return ONNX_NAME if precision == "fp32" else f"model.{precision}.onnx"


def _float32_layer_norms(model) -> None:
    """Keep every LayerNorm in float32 inside a half-precision model.

    Half-precision variance overflows/underflows on real activations; a strongly typed TensorRT
    network computes each op in the type the ONNX gives it, so the casts must be in the graph."""
    import torch

    class Float32LayerNorm(torch.nn.Module):
        def __init__(self, norm: torch.nn.LayerNorm) -> None:
            super().__init__()
            self.norm = norm.float()

        def forward(self, hidden: torch.Tensor) -> torch.Tensor:
            return self.norm(hidden.float()).to(hidden.dtype)

    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.LayerNorm):
                setattr(parent, child_name, Float32LayerNorm(child))


def export_onnx(checkpoint: Checkpoint, out_dir: Path, precision: str = "fp32", opset: int = OPSET) -> Path:
    """Export the checkpoint to `out_dir/<onnx_name(precision)>` (weights inline) and return its path.

    fp16/bf16 exports carry half-precision weights and matmuls, float32 LayerNorms, and float32 logits
    (a cast at the end), so every engine reads the same output type."""
    import torch

    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if precision not in dtypes:
        raise ValueError(f"ONNX export runs in fp32, fp16 or bf16, not {precision!r}")
    if opset < OPSET:
        raise ValueError(f"opset {opset} is too old: LayerNormalization as one op and the exporter need >= {OPSET}")
    model = checkpoint.load_torch_model().to(dtypes[precision])
    if precision != "fp32":
        _float32_layer_norms(model)
    names = checkpoint.input_names

    class LogitsOnly(torch.nn.Module):
        """Positional inputs in `names` order, float32 logits out: the signature every engine feeds."""

        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
            return self.model(**dict(zip(names, inputs, strict=True))).logits.float()

    wrapper = LogitsOnly().eval()
    example = torch.randint(5, 100, (2, 16), dtype=torch.int64)
    args = tuple(
        example
        if n == "input_ids"
        else torch.ones_like(example)
        if n == "attention_mask"
        else torch.zeros_like(example)
        for n in names
    )
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / onnx_name(precision)
    with torch.no_grad():
        program = torch.onnx.export(
            wrapper,
            args,
            input_names=names,
            output_names=["logits"],
            opset_version=opset,
            dynamo=True,
            # one entry per forward() parameter: the single *inputs tuple, one spec per tensor in it
            dynamic_shapes=(tuple({0: batch, 1: seq} for _ in names),),
            verbose=False,
        )
    if program is None:
        raise RuntimeError(f"torch.onnx.export returned no program for {checkpoint.name}")
    program.save(str(path), external_data=False)
    return path


def save_ort_optimized(onnx_path: Path, out_path: Path) -> Path:
    """Write the graph ONNX Runtime produces after its fusions, so the CPU server loads it ready-made.

    EXTENDED, not ALL: ORT documents ALL-level saved graphs as tied to the building machine's CPU,
    while EXTENDED fusions (attention, GELU, skip-LayerNorm) are portable; the server still applies
    the rest at load time."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(out_path)
    ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    return out_path


def quantize_int8(onnx_path: Path, out_path: Path) -> Path:
    """Dynamic int8 quantization of the MatMul weights (activations quantized per batch at run time).

    Only MatMul: the embedding tables (Gather) and LayerNorms stay float32, where quantization costs
    accuracy and saves no time. Per-channel scales keep the classifier's small heads accurate.

    ONNX Runtime's advice to run its pre-processing first (shape inference and graph optimization, for
    static quantization's calibration) is kept out of the build's output: this graph is exported with
    shapes, served ORT-optimized, and its accuracy is measured by the build's entity F1."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    advice = _DropMessage("Please consider to run pre-processing before quantization")
    root.addFilter(advice)
    try:
        quantize_dynamic(
            str(onnx_path),
            str(out_path),
            op_types_to_quantize=["MatMul"],
            per_channel=True,
            weight_type=QuantType.QInt8,
        )
    finally:
        root.removeFilter(advice)
    return out_path


class _DropMessage(logging.Filter):
    """Drops the records whose message starts with `prefix`."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


@dataclasses.dataclass(frozen=True)
class ParityReport:
    """An engine or ONNX graph vs float32 PyTorch on random inputs."""

    max_abs_diff: float
    argmax_agreement: float
    shapes: tuple[tuple[int, int], ...]

    def __str__(self) -> str:
        return (
            f"max |logit diff| {self.max_abs_diff:.2e}, argmax agreement {self.argmax_agreement:.4%} "
            f"over shapes {list(self.shapes)}"
        )

    def within(self, precision: str) -> bool:
        """True when the figures are inside TOLERANCES[precision]."""
        max_diff, min_agreement = TOLERANCES[precision]
        return self.max_abs_diff <= max_diff and self.argmax_agreement >= min_agreement


#: feeds (input name -> int64 [batch, longest], right-padded) -> float32 logits [batch, longest, labels]
Runner = Callable[[dict[str, np.ndarray]], np.ndarray]


def compare_with_torch(
    checkpoint: Checkpoint, run: Runner, seed: int = 0, shapes: tuple[tuple[int, int], ...] = DEFAULT_SHAPES
) -> ParityReport:
    """Run `run` and float32 PyTorch on the same fresh random batches (with padding); compare real tokens.

    A (b, 0) shape means "the model's maximum length"."""
    import torch

    model = checkpoint.load_torch_model()
    names = checkpoint.input_names
    rng = np.random.default_rng(seed)
    vocab = checkpoint.config.vocab_size
    worst, agree, total, used = 0.0, 0, 0, []
    for batch, length in shapes:
        length = length or checkpoint.max_input_tokens
        ids = rng.integers(5, vocab, size=(batch, length), dtype=np.int64)
        lengths = rng.integers(1, length + 1, size=batch)
        lengths[0] = length
        padded = pad_batch([row[:n] for row, n in zip(ids, lengths, strict=True)], checkpoint.pad_id)
        feeds = {n: padded[n] for n in names}
        got = run(feeds)
        with torch.no_grad():
            want = model(**{n: torch.from_numpy(v) for n, v in feeds.items()}).logits.float().numpy()
        real = padded["attention_mask"].astype(bool)
        worst = max(worst, float(np.abs(got - want)[real].max()))
        agree += int((got.argmax(-1) == want.argmax(-1))[real].sum())
        total += int(real.sum())
        used.append((batch, length))
    return ParityReport(worst, agree / total, tuple(used))


def check_against_torch(
    checkpoint: Checkpoint, onnx_path: Path, seed: int = 0, shapes: tuple[tuple[int, int], ...] = DEFAULT_SHAPES
) -> ParityReport:
    """ONNX Runtime (CPU) on `onnx_path` vs PyTorch: see compare_with_torch."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    inputs = [i.name for i in session.get_inputs()]
    return compare_with_torch(
        checkpoint, lambda feeds: session.run(["logits"], {n: feeds[n] for n in inputs})[0], seed, shapes
    )


def check_engine_against_torch(
    checkpoint: Checkpoint, engine, seed: int = 0, shapes: tuple[tuple[int, int], ...] = DEFAULT_SHAPES
) -> ParityReport:
    """Any `Engine` (list of id sequences in, per-sequence logits out) vs PyTorch: see compare_with_torch."""

    def run(feeds: dict[str, np.ndarray]) -> np.ndarray:
        ids, lengths = feeds["input_ids"], feeds["attention_mask"].sum(axis=1)
        outputs = engine.logits([row[:n] for row, n in zip(ids, lengths, strict=True)])
        padded = np.zeros(ids.shape + (len(checkpoint.labels),), dtype=np.float32)
        for row, logits in enumerate(outputs):
            padded[row, : len(logits)] = logits
        return padded

    return compare_with_torch(checkpoint, run, seed, shapes)


def cached_onnx(checkpoint: Checkpoint, cache: Path) -> Path:
    """The checked fp32 export for this checkpoint, made once and cached in `cache` (Settings.cache_dir)
    under its content hash."""
    folder = cache / "onnx" / checkpoint.sha256[:16]
    path = folder / ONNX_NAME
    if path.exists():
        return path
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        exported = export_onnx(checkpoint, Path(tmp))
        report = check_against_torch(checkpoint, exported)
        log.info("exported %s to ONNX: %s", checkpoint.name, report)
        if not report.within("fp32"):
            raise RuntimeError(f"ONNX export of {checkpoint.name} disagrees with PyTorch: {report}")
        folder.mkdir(parents=True, exist_ok=True)
        shutil.move(str(exported), path)  # same filesystem: an atomic rename, so readers never see half a file
    return path
