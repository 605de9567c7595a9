"""`nerserve build-engine`: an engine folder from a checkpoint: checked ONNX (stage 1), then a TensorRT
plan (stage 2).

    nerserve build-engine --checkpoint dslim/bert-base-NER-uncased --out data/engine

Stage 1 runs anywhere: export to ONNX, check it against PyTorch on fresh random inputs (the build
fails past the stated tolerance), save the ORT-optimized graph the CPU engine serves and, for
--precision int8, a dynamically quantized graph whose entity F1 on CoNLL-2003 dev is measured beside
float32. Stage 2 needs a CUDA GPU and the `tensorrt` package; without them the build stops after
stage 1 with a message saying so (exit status 0: the folder is complete for ONNX Runtime).
Either way `manifest.json` records what was built, from what, for which GPU, with each file's sha256."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .. import engine_folder as manifest_lib
from ..checkpoint import Checkpoint, CheckpointUnavailable, load_checkpoint
from ..config import PRECISIONS, Runtime, Settings
from ..engines.tensorrt_engine import TensorRTEngine
from ..evaluation.gold import read_conll
from ..platform import Platform, current_platform
from . import onnx_export
from .word_f1 import conll_f1

#: the CoNLL-2003 dev set beside a checkout of this repository (its workspace's shared/), from its root
DEFAULT_CONLL = Path("../shared/data/conll2003/eng.testa")
#: the serving contract (API.md): int8 may move entity F1 on CoNLL dev by at most 1 point
MAX_INT8_F1_DROP = 1.0


def stage(message: str) -> None:
    """One progress line, flushed so it shows up live under make and CI."""
    print(message, flush=True)


# --- the stages ---------------------------------------------------------------------------------------


def parity_shapes(max_num_tokens: int, max_input_tokens: int) -> tuple[tuple[int, int], ...]:
    """Random-input shapes for the checks: short, odd, mid-length, and full length, all within the token budget."""
    mid = min(128, max_input_tokens)
    return (
        (1, min(7, max_input_tokens)),
        (min(3, max_num_tokens // 33 or 1), min(33, max_input_tokens)),
        (max(1, min(8, max_num_tokens // mid)), mid),
        (max(1, min(2, max_num_tokens // max_input_tokens)), 0),
    )


def checked(report: onnx_export.ParityReport, precision: str, what: str) -> dict:
    """Print `report` against its tolerance; exit with status 1 past it. Returns its manifest entry."""
    max_diff, min_agreement = onnx_export.TOLERANCES[precision]
    verdict = "OK" if report.within(precision) else "FAILED"
    limit = (
        "no random-input limit: int8 is judged by entity F1"
        if precision == "int8"
        else f"tolerance: diff <= {max_diff:g}, agreement >= {min_agreement:.1%}"
    )
    stage(f"      {what} vs PyTorch fp32: {report}  [{limit}] {verdict}")
    if verdict == "FAILED":
        sys.exit(f"build failed: {what} disagrees with PyTorch beyond the tolerance")
    return {
        "max_abs_diff": report.max_abs_diff,
        "argmax_agreement": report.argmax_agreement,
        "shapes": [list(s) for s in report.shapes],
    }


def clear_outputs(out: Path) -> None:
    """Remove an earlier build's manifest and artefacts so the new manifest hashes only this build's files."""
    for path in [out / manifest_lib.MANIFEST_NAME, *out.glob("model*.onnx"), *out.glob("model*.plan")]:
        path.unlink(missing_ok=True)


def stage_onnx(args: argparse.Namespace, checkpoint: Checkpoint, out: Path, shapes) -> tuple[dict, dict]:
    """Stage 1: export, check, optimize (and quantize + F1 for int8). Returns (artefacts, parity)."""
    started = time.perf_counter()
    stage(f"[1/2] ONNX: exporting {checkpoint.name} (opset {args.opset}, dynamic batch and sequence)")
    exported = onnx_export.export_onnx(checkpoint, out, opset=args.opset)
    parity = {
        "onnx": checked(
            onnx_export.check_against_torch(checkpoint, exported, shapes=shapes), "fp32", "ONNX Runtime on model.onnx"
        )
    }
    optimized = onnx_export.save_ort_optimized(exported, out / onnx_export.ORT_OPTIMIZED_NAME)
    parity["ort_optimized"] = checked(
        onnx_export.check_against_torch(checkpoint, optimized, shapes=shapes),
        "fp32",
        f"ONNX Runtime on {optimized.name}",
    )
    served = {"file": optimized.name, "precision": "fp32"}
    if args.precision == "int8":
        quantized = onnx_export.quantize_int8(exported, out / onnx_export.INT8_NAME)
        parity["int8"] = checked(
            onnx_export.check_against_torch(checkpoint, quantized, shapes=shapes),
            "int8",
            f"ONNX Runtime on {quantized.name}",
        )
        parity["int8"].update(int8_f1(args, checkpoint, optimized, quantized))
        served = {"file": quantized.name, "precision": "int8"}
    stage(f"[1/2] ONNX: done in {time.perf_counter() - started:.1f} s; ONNX Runtime will serve {served['file']}")
    return {Runtime.ONNXRUNTIME: served}, parity


def int8_f1(args: argparse.Namespace, checkpoint: Checkpoint, fp32_path: Path, int8_path: Path) -> dict:
    """Entity F1 of int8 vs fp32 ONNX Runtime on CoNLL dev; exits past the contract's 1-point drop."""
    if args.f1_sentences == 0 or not args.conll.is_file():
        reason = "--f1-sentences 0" if args.f1_sentences == 0 else f"{args.conll} not found"
        stage(f"      int8 entity F1: not measured ({reason})")
        return {}
    started = time.perf_counter()
    data = read_conll(args.conll, args.f1_sentences)
    f1_fp32 = conll_f1(fp32_path, checkpoint, data, "fp32")
    f1_int8 = conll_f1(int8_path, checkpoint, data, "int8")
    drop = 100 * (f1_fp32 - f1_int8)
    verdict = "OK" if drop <= args.max_f1_drop else "FAILED"
    stage(
        f"      entity F1 on {args.conll.name} ({len(data)} sentences, first sub-token per word, exact spans): "
        f"fp32 {f1_fp32:.4f}, int8 {f1_int8:.4f} (drop {drop:.2f} points, limit {args.max_f1_drop:g}) "
        f"{verdict} [{time.perf_counter() - started:.1f} s]"
    )
    if verdict == "FAILED":
        sys.exit("build failed: int8 quantization costs more entity F1 than allowed")
    return {"f1_fp32": f1_fp32, "f1_int8": f1_int8, "f1_sentences": len(data), "f1_data": args.conll.name}


def tensorrt_unavailable(precision: str, platform: Platform) -> str | None:
    """Why stage 2 cannot run here, or None when it can."""
    if precision == "int8":
        return "int8 is the ONNX Runtime (CPU) precision; TensorRT needs fp16, bf16 or fp32"
    if not platform.has_gpu:
        return "no CUDA GPU on this machine (torch.cuda.is_available() is False)"
    if platform.tensorrt_version is None:
        return "the `tensorrt` Python package is not installed (pip install tensorrt on a GPU machine)"
    return None


def stage_tensorrt(
    args: argparse.Namespace, checkpoint: Checkpoint, out: Path, platform: Platform, shapes, cache: Path
) -> tuple[dict, dict, list]:
    """Stage 2: half-precision ONNX (when asked), plan over the profile ladder, parity of the plan."""
    from ..engines.tensorrt_engine import profile_ladder
    from .tensorrt_build import build_plan

    started = time.perf_counter()
    source = out / onnx_export.ONNX_NAME
    if args.precision != "fp32":
        source = onnx_export.export_onnx(checkpoint, out, precision=args.precision, opset=args.opset)
    profiles = profile_ladder(args.max_num_tokens, checkpoint.max_input_tokens)
    slug = "".join(c if c.isalnum() else "-" for c in f"{platform.gpu_name}-trt{platform.tensorrt_version}")
    timing_cache = args.timing_cache or cache / "tensorrt" / f"timing-{slug}.cache"
    stage(
        f"[2/2] TensorRT {platform.tensorrt_version}: building {args.precision} plan for {platform.gpu_name} "
        f"(compute capability {platform.compute_capability}) from {source.name}, {len(profiles)} profiles, "
        f"workspace {args.workspace_gb:g} GiB, timing cache {timing_cache}"
    )
    plan = build_plan(
        source,
        out,
        profiles,
        int(args.workspace_gb * (1 << 30)),
        timing_cache,
        precision=args.precision,
        report=lambda line: stage(f"      {line}"),  # TensorRT's progress, indented like the checks' lines
    )
    engine = TensorRTEngine(plan, checkpoint.pad_id, precision=args.precision)
    try:
        parity = checked(
            onnx_export.check_engine_against_torch(checkpoint, engine, shapes=shapes),
            args.precision,
            f"TensorRT {plan.name}",
        )
    finally:
        engine.close()
    stage(f"[2/2] TensorRT: done in {time.perf_counter() - started:.1f} s")
    return {"file": plan.name, "precision": args.precision}, parity, profiles


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The build's arguments. Those left out take what the server would serve (`defaults_from`), so
    `make build-engine` builds for what `make serve` will serve."""
    parser.add_argument(
        "--checkpoint",
        default=None,
        help="HF repo id (fetched once into the hub cache) or a local folder in HF format (default: the server's)",
    )
    parser.add_argument(
        "--revision", default=None, help="branch, tag or commit of a hub checkpoint (default: the server's, main)"
    )
    parser.add_argument(
        "--max-num-tokens",
        type=int,
        default=None,
        help="token budget of one padded batch (batch x longest); sizes the TensorRT profiles; "
        "must be at least the model's max input length (default: the server's)",
    )
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=None,
        help="fp16 (default with a CUDA GPU) or bf16 (GPUs with bf16, compute capability >= 8.0): "
        "the TensorRT plan's precision, taken from a half-precision ONNX; fp32 (default on CPU); "
        "int8: ONNX Runtime dynamic quantization for CPU, F1 measured against fp32",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("data/engine"), help="engine folder to write (default data/engine)"
    )
    parser.add_argument(
        "--workspace-gb", type=float, default=4.0, help="TensorRT builder workspace limit in GiB (default 4)"
    )
    parser.add_argument(
        "--opset",
        type=int,
        default=onnx_export.OPSET,
        help=f"ONNX opset, {onnx_export.OPSET} or newer (LayerNormalization as one op; default {onnx_export.OPSET})",
    )
    parser.add_argument(
        "--timing-cache",
        type=Path,
        default=None,
        help="TensorRT timing cache file, reused across builds "
        "(default: one per GPU and TensorRT version under the nerserve cache)",
    )
    parser.add_argument(
        "--conll",
        type=Path,
        default=DEFAULT_CONLL,
        help="CoNLL-2003 file for the int8 entity-F1 check, skipped with a message when absent "
        "(default ../shared/data/conll2003/eng.testa beside the repo)",
    )
    parser.add_argument(
        "--f1-sentences",
        type=int,
        default=None,
        help="use only the first N sentences for the int8 F1 (default: all; 0 skips it)",
    )
    parser.add_argument(
        "--max-f1-drop",
        type=float,
        default=MAX_INT8_F1_DROP,
        help="fail the int8 build when its entity F1 is more than this many points below fp32 "
        f"(default {MAX_INT8_F1_DROP:g}, the serving contract's limit)",
    )


def defaults_from(args: argparse.Namespace, settings: Settings) -> None:
    """Fill the arguments left out with the server's settings (config.yaml under NERSERVE_* variables)."""
    args.checkpoint = args.checkpoint or settings.checkpoint
    args.revision = args.revision or settings.revision
    args.max_num_tokens = args.max_num_tokens or TensorRTEngine.budget(settings.max_num_tokens)
    args.precision = args.precision or settings.precision


def build(args: argparse.Namespace, settings: Settings) -> int:
    """Run the build the arguments describe; 1 with one line saying why when the checkpoint cannot be had."""
    started = time.perf_counter()
    defaults_from(args, settings)
    try:
        checkpoint = load_checkpoint(args.checkpoint, args.revision, settings.hf_token, settings.mounts)
    except CheckpointUnavailable as error:
        print(f"nerserve: cannot build: {error}", file=sys.stderr, flush=True)
        return 1
    if args.max_num_tokens < checkpoint.max_input_tokens:
        sys.exit(
            f"--max-num-tokens {args.max_num_tokens} is below the model's max input length "
            f"{checkpoint.max_input_tokens}: one full-length text would not fit a batch"
        )
    platform = current_platform()
    args.precision = args.precision or ("fp16" if platform.has_gpu else "fp32")
    capability = tuple(map(int, platform.compute_capability.split("."))) if platform.compute_capability else None
    if args.precision == "bf16" and capability is not None and capability < (8, 0):
        sys.exit(
            f"--precision bf16 needs compute capability 8.0 or newer; {platform.gpu_name} "
            f"has {platform.compute_capability}"
        )
    stage(
        f"building {args.checkpoint} ({len(checkpoint.labels)} labels, max input {checkpoint.max_input_tokens} "
        f"tokens, sha256 {checkpoint.sha256[:12]}…) -> {args.out}, precision {args.precision}, "
        f"max_num_tokens {args.max_num_tokens}"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    clear_outputs(args.out)
    shapes = parity_shapes(args.max_num_tokens, checkpoint.max_input_tokens)
    artefacts, parity = stage_onnx(args, checkpoint, args.out, shapes)
    profiles: list = []
    reason = tensorrt_unavailable(args.precision, platform)
    if reason:
        stage(f"[2/2] TensorRT: skipped: {reason}. Stage 1 is complete: {args.out} serves with ONNX Runtime.")
    else:
        artefacts[Runtime.TENSORRT], parity[Runtime.TENSORRT], profiles = stage_tensorrt(
            args, checkpoint, args.out, platform, shapes, settings.cache_dir
        )
    path = manifest_lib.write_manifest(
        args.out,
        checkpoint,
        args.revision,
        precision=args.precision,
        max_num_tokens=args.max_num_tokens,
        artefacts=artefacts,
        profiles=profiles,
        platform=platform,
        parity=parity,
    )
    served = ", ".join(f"{kind}: {artefact['file']}" for kind, artefact in artefacts.items())
    stage(f"manifest: {path} ({served}); total {time.perf_counter() - started:.1f} s")
    return 0
