"""The build toolchain: `nerserve build-engine` (export/build.py), the ONNX exports, manifest checks, TensorRT profiles.

Every export is compared with PyTorch (never with itself), and one test corrupts an exported graph
to show that the comparison catches it. TensorRT tests skip, saying why, without tensorrt or a GPU."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

import checkpoints
import corpus
from nerserve import engine_folder as manifest_lib
from nerserve.checkpoint import Checkpoint, load_checkpoint
from nerserve.config import Runtime
from nerserve.engines.ort_engine import OnnxRuntimeEngine
from nerserve.engines.tensorrt_engine import pick_profile, profile_ladder
from nerserve.export import onnx_export
from nerserve.platform import Platform, current_platform

REPO = Path(__file__).resolve().parent.parent
CONLL = REPO.parent / "shared" / "data" / "conll2003" / "eng.testa"
MAX_NUM_TOKENS = 1024


@pytest.fixture(scope="session")
def build_checkpoints(tmp_path_factory) -> dict[str, Checkpoint]:
    """The three test checkpoints, loaded."""
    root = tmp_path_factory.mktemp("build-checkpoints")
    return {kind: load_checkpoint(str(checkpoints.build(kind, root / kind))) for kind in checkpoints.KINDS}


@pytest.fixture(scope="session")
def cli_builds(build_checkpoints, tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    """One build per kind, side by side (int8 with a short F1 for wordpiece-uncased): the BPE one through the
    build script `make build-engine` runs (build/build_engine.py), the others as `python -m nerserve
    build-engine`, the same builder by its two doors."""
    running = {}
    for kind, checkpoint in build_checkpoints.items():
        out = tmp_path_factory.mktemp("engine") / kind
        door = ["build/build_engine.py"] if kind == "bpe" else ["-m", "nerserve", "build-engine"]
        command = [
            sys.executable,
            *door,
            "--checkpoint",
            str(checkpoint.path),
            "--out",
            str(out),
            "--max-num-tokens",
            str(MAX_NUM_TOKENS),
        ]
        if kind == "wordpiece-uncased":  # random weights: F1 is near 0 either way, so no drop limit
            command += ["--precision", "int8", "--f1-sentences", "20", "--max-f1-drop", "100"]
        running[kind] = (
            subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
            command,
            out,
        )
    results = {}
    for kind, (process, command, out) in running.items():
        stdout, stderr = process.communicate(timeout=300)
        results[kind] = (subprocess.CompletedProcess(command, process.returncode, stdout, stderr), out)
    return results


def test_cli_with_a_checkpoint_it_cannot_have_ends_on_one_line_saying_why(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "nerserve", "build-engine", "--checkpoint", "nerserve-tests/no-such-model"]
        + ["--out", str(tmp_path / "engine")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith("nerserve: cannot build: cannot load checkpoint 'nerserve-tests/no-such-model'")
    assert "make serve CHECKPOINT=/path/to/folder" in lines[0]


def _no_tensorrt_here() -> str | None:
    platform = current_platform()
    if not platform.has_gpu:
        return "no CUDA GPU on this machine"
    if platform.tensorrt_version is None:
        return "the tensorrt package is not installed"
    return None


@pytest.mark.parametrize("kind", checkpoints.KINDS)
def test_cli_writes_a_checked_engine_dir(cli_builds, build_checkpoints, kind):
    result, out = cli_builds[kind]
    assert result.returncode == 0, result.stdout + result.stderr
    assert "pre-processing" not in result.stdout + result.stderr  # ONNX Runtime's quantization advice, filtered
    lines = result.stdout
    assert "[1/2] ONNX: exporting" in lines and "model.onnx vs PyTorch fp32" in lines and "FAILED" not in lines
    if _no_tensorrt_here():
        assert "[2/2] TensorRT: skipped:" in lines
    elif kind != "wordpiece-uncased":  # int8 builds no plan; the others show TensorRT's progress as it builds
        assert re.search(r"^      TensorRT: .+ \(\d+ steps?\)$", lines, re.MULTILINE), lines
    manifest = manifest_lib.verify(out, build_checkpoints[kind])
    assert manifest["labels"] == list(checkpoints.LABELS)
    assert manifest["max_input_tokens"] == checkpoints.MAX_LENGTH and manifest["max_num_tokens"] == MAX_NUM_TOKENS
    assert manifest["parity"]["onnx"]["max_abs_diff"] <= onnx_export.FP32_TOLERANCE
    assert "tokenizer.json" in manifest["tokenizer_files"]
    assert set(manifest["files"]) >= {onnx_export.ONNX_NAME, onnx_export.ORT_OPTIMIZED_NAME}
    if kind == "wordpiece-uncased":
        assert manifest["artefacts"]["onnxruntime"] == {"file": onnx_export.INT8_NAME, "precision": "int8"}
        served = manifest_lib.load_engine_dir(out, build_checkpoints[kind])
        assert served[:3] == (Runtime.ONNXRUNTIME, out / onnx_export.INT8_NAME, "int8")
        assert ("entity F1 on eng.testa (20 sentences" in lines) if CONLL.is_file() else ("not measured" in lines)
    graph = onnx.load(str(out / onnx_export.ONNX_NAME))
    assert graph.opset_import[0].version >= onnx_export.OPSET
    assert any(node.op_type == "LayerNormalization" for node in graph.graph.node)


def _sequences(checkpoint: Checkpoint, count: int = 40) -> list[np.ndarray]:
    encoded = checkpoint.tokenizer(corpus.texts(count), truncation=True, max_length=checkpoint.max_input_tokens)
    return [np.asarray(ids, dtype=np.int64) for ids in encoded["input_ids"]]


@pytest.mark.parametrize("kind", ["wordpiece-cased", "bpe"])
def test_served_onnx_answers_as_the_checkpoint(cli_builds, build_checkpoints, kind):
    """What load_engine_dir hands the server gives PyTorch's logits (1e-4) on the test corpus."""
    from nerserve.engines.torch_engine import TorchEngine

    checkpoint = build_checkpoints[kind]
    engine_kind, path, precision, _, _ = manifest_lib.load_engine_dir(cli_builds[kind][1], checkpoint, "onnxruntime")
    assert (engine_kind, path.name, precision) == (Runtime.ONNXRUNTIME, onnx_export.ORT_OPTIMIZED_NAME, "fp32")
    pad = checkpoint.tokenizer.pad_token_id
    sequences = _sequences(checkpoint)
    got = OnnxRuntimeEngine(path, pad).logits(sequences)
    want = TorchEngine(checkpoint, device="cpu", precision="fp32").logits(sequences)
    for served, reference in zip(got, want, strict=True):
        np.testing.assert_allclose(served, reference, atol=1e-4)


def test_parity_check_catches_a_wrong_export(cli_builds, build_checkpoints, tmp_path):
    """Shift the classifier bias inside the exported graph: the check against PyTorch must report it."""
    model = onnx.load(str(cli_builds["wordpiece-cased"][1] / onnx_export.ONNX_NAME))
    bias = next(t for t in model.graph.initializer if "classifier.bias" in t.name)
    values = onnx.numpy_helper.to_array(bias).copy()
    values[3] += 0.5
    bias.CopyFrom(onnx.numpy_helper.from_array(values, bias.name))
    broken = tmp_path / "broken.onnx"
    onnx.save(model, str(broken))
    report = onnx_export.check_against_torch(build_checkpoints["wordpiece-cased"], broken, shapes=((2, 9),))
    assert report.max_abs_diff == pytest.approx(0.5, abs=1e-3)
    assert not report.within("fp32")


def test_half_precision_export_keeps_layer_norm_in_float32(build_checkpoints, tmp_path):
    """The fp16 ONNX TensorRT builds from: half matmuls, float32 LayerNorm and logits, close to PyTorch."""
    checkpoint = build_checkpoints["bpe"]
    path = onnx_export.export_onnx(checkpoint, tmp_path, precision="fp16")
    assert path.name == "model.fp16.onnx"
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    types = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.value_info, *model.graph.output]}
    float32, float16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    norms = [n for n in model.graph.node if n.op_type == "LayerNormalization"]
    assert norms and all(types.get(n.output[0]) == float32 for n in norms)
    assert any(types.get(n.output[0]) == float16 for n in model.graph.node if n.op_type == "MatMul")
    assert types["logits"] == float32
    report = onnx_export.check_against_torch(checkpoint, path, shapes=((2, 40), (1, 0)))
    assert report.within("fp16"), report


# --- manifest: what is refused, and why ---------------------------------------------------------------


@pytest.fixture()
def engine_copy(cli_builds, tmp_path) -> Path:
    """A private copy of a built folder, free to tamper with."""
    return Path(shutil.copytree(cli_builds["wordpiece-cased"][1], tmp_path / "engine"))


def test_unchanged_dir_is_served(engine_copy, build_checkpoints):
    served = manifest_lib.load_engine_dir(
        engine_copy, build_checkpoints["wordpiece-cased"], here=Platform(None, None, None)
    )
    assert served == (Runtime.ONNXRUNTIME, engine_copy / onnx_export.ORT_OPTIMIZED_NAME, "fp32", None, None)


def test_changed_byte_is_refused(engine_copy, build_checkpoints):
    target = engine_copy / onnx_export.ORT_OPTIMIZED_NAME
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"model\.ort\.onnx was modified after the build"):
        manifest_lib.load_engine_dir(engine_copy, build_checkpoints["wordpiece-cased"])


def test_other_checkpoint_is_refused(engine_copy, build_checkpoints):
    with pytest.raises(ValueError, match="was built from checkpoint .* but the server loaded"):
        manifest_lib.load_engine_dir(engine_copy, build_checkpoints["wordpiece-uncased"])


def test_missing_manifest_or_file_is_refused(engine_copy, build_checkpoints):
    (engine_copy / onnx_export.ONNX_NAME).unlink()
    with pytest.raises(ValueError, match="model.onnx listed in the manifest is missing"):
        manifest_lib.verify(engine_copy, build_checkpoints["wordpiece-cased"])
    (engine_copy / manifest_lib.MANIFEST_NAME).unlink()
    with pytest.raises(ValueError, match="has no manifest.json"):
        manifest_lib.verify(engine_copy, build_checkpoints["wordpiece-cased"])


def test_tensorrt_plan_is_matched_to_gpu_and_version(engine_copy, build_checkpoints):
    """A (stand-in) plan is served only on the GPU and TensorRT version it was built with."""
    checkpoint = build_checkpoints["wordpiece-cased"]
    built_on = Platform("NVIDIA H100 80GB HBM3", "9.0", "10.13.0")
    (engine_copy / "model.plan").write_bytes(b"stand-in plan")
    manifest_lib.write_manifest(
        engine_copy,
        checkpoint,
        None,
        precision="fp16",
        max_num_tokens=MAX_NUM_TOKENS,
        platform=built_on,
        artefacts={
            "onnxruntime": {"file": onnx_export.ORT_OPTIMIZED_NAME, "precision": "fp32"},
            "tensorrt": {"file": "model.plan", "precision": "fp16"},
        },
        profiles=profile_ladder(MAX_NUM_TOKENS, checkpoint.max_input_tokens),
    )
    saved = json.loads((engine_copy / manifest_lib.MANIFEST_NAME).read_text())
    assert saved["gpu"]["gpu_name"] == built_on.gpu_name and saved["versions"]["tensorrt"] == "10.13.0"
    assert len(saved["profiles"]) == len(profile_ladder(MAX_NUM_TOKENS, checkpoint.max_input_tokens))

    def serve(here: Platform, engine: str = "auto", **asked):
        return manifest_lib.load_engine_dir(engine_copy, checkpoint, engine, here=here, **asked)

    assert serve(built_on) == ("tensorrt", engine_copy / "model.plan", "fp16", MAX_NUM_TOKENS, None)
    assert serve(Platform(None, None, None)).kind == Runtime.ONNXRUNTIME
    assert serve(built_on, "onnxruntime").kind == Runtime.ONNXRUNTIME
    with pytest.raises(ValueError, match="built for NVIDIA H100 80GB HBM3 .*this machine has NVIDIA L4"):
        serve(dataclasses.replace(built_on, gpu_name="NVIDIA L4", compute_capability="8.9"))
    with pytest.raises(ValueError, match="built with TensorRT 10.13.0, this machine has TensorRT 11.0.0"):
        serve(dataclasses.replace(built_on, tensorrt_version="11.0.0"))
    with pytest.raises(ValueError, match="no CUDA GPU"):
        serve(Platform(None, None, None), "tensorrt")
    # The batch budget: a plan's profiles hold the budget it was built for, never more (no batch the plan
    # cannot run: the server's batches would fail with 500s); less is served as asked.
    lowered = serve(built_on, max_num_tokens=4 * MAX_NUM_TOKENS)
    assert lowered.max_num_tokens == MAX_NUM_TOKENS and f"built for max_num_tokens={MAX_NUM_TOKENS}" in lowered.note
    assert serve(built_on, max_num_tokens=MAX_NUM_TOKENS // 2)[3:] == (MAX_NUM_TOKENS // 2, None)
    assert serve(Platform(None, None, None), max_num_tokens=4 * MAX_NUM_TOKENS).max_num_tokens == (
        4 * MAX_NUM_TOKENS  # the ONNX graph has dynamic shapes: any budget
    )
    # The precision: the artefact chosen must be the one asked for.
    assert serve(built_on, precision="fp16").kind == Runtime.TENSORRT
    with pytest.raises(ValueError, match="serves fp16 .* but precision fp32 was asked for"):
        serve(built_on, precision="fp32")
    with pytest.raises(ValueError, match="serves fp32 .* but precision int8 was asked for"):
        serve(Platform(None, None, None), precision="int8")


# --- TensorRT profiles ----------------------------------------------------------------------------------


@pytest.mark.parametrize("max_num_tokens,max_len", [(16384, 512), (1024, 512), (512, 512), (100, 37), (64, 1), (7, 5)])
def test_profile_ladder_covers_every_shape_in_budget(max_num_tokens, max_len):
    ladder = profile_ladder(max_num_tokens, max_len)
    for minimum, opt, maximum in ladder:
        assert all(lo <= mid <= hi for lo, mid, hi in zip(minimum, opt, maximum, strict=True))
        assert maximum[1] <= max_len and maximum[0] * maximum[1] <= 2 * max_num_tokens  # memory stays bounded
    for sequence in range(1, max_len + 1):
        for batch in range(1, max_num_tokens // sequence + 1):
            chosen = pick_profile(ladder, batch, sequence)
            (min_b, min_s), _, (max_b, max_s) = ladder[chosen]
            assert min_b <= batch <= max_b and min_s <= sequence <= max_s
            fitting_caps = [p[2][1] for p in ladder if p[0][0] <= batch <= p[2][0] and p[0][1] <= sequence <= p[2][1]]
            assert max_s == min(fitting_caps)  # the tightest profile that holds the batch
    with pytest.raises(ValueError, match="no optimization profile"):
        pick_profile(ladder, max_num_tokens + 1, 1)


def test_documented_profile_count_is_the_ladders():
    """profile_ladder's docstring and docs/build.md say how many profiles 512 positions take (16384 tokens)."""
    count = len(profile_ladder(16384, 512))
    assert count == 9  # caps 2, 4, ..., 256, then 512
    docstring = " ".join((profile_ladder.__doc__ or "").split())
    assert re.search(r"\((\d+) for 512 positions\)", docstring).group(1) == str(count)
    docs = " ".join((REPO / "docs" / "build.md").read_text().split())
    assert re.findall(r"\((\d+) profiles for 512 positions", docs) == [str(count)]


def test_profile_ladder_refuses_a_budget_below_one_text():
    with pytest.raises(ValueError, match="below the max input length"):
        profile_ladder(256, 512)


# --- TensorRT (GPU machines with the tensorrt package) -----------------------------------------------------


@pytest.mark.skipif(
    _no_tensorrt_here() is not None, reason=f"needs a CUDA GPU and the tensorrt package: {_no_tensorrt_here()}"
)
@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_tensorrt_engine_matches_onnx_runtime(cli_builds, build_checkpoints, tmp_path, precision):
    """A plan built here answers as ONNX Runtime and PyTorch do, within its precision's tolerance
    (fp32: 1e-3, which holds only with TF32 cleared), showing its progress and leaving a whole timing cache."""
    from nerserve.engines.tensorrt_engine import TensorRTEngine
    from nerserve.export.tensorrt_build import build_plan

    checkpoint = build_checkpoints["bpe"]
    source = onnx_export.export_onnx(checkpoint, tmp_path, precision=precision)
    ladder = profile_ladder(MAX_NUM_TOKENS, checkpoint.max_input_tokens)
    cache = tmp_path / "cache" / "timing.cache"
    lines: list[str] = []
    plan = build_plan(source, tmp_path, ladder, 1 << 30, cache, precision=precision, report=lines.append)
    assert cache.stat().st_size > 0 and [p.name for p in cache.parent.iterdir()] == ["timing.cache"]
    assert any(re.fullmatch(r"TensorRT: .+ \(\d+ steps?\)", line) for line in lines), lines
    assert ("TensorRT: fp32 plan, builder flags cleared: TF32" in lines) == (precision == "fp32")
    pad = checkpoint.tokenizer.pad_token_id
    engine = TensorRTEngine(plan, pad, precision=precision)
    try:
        sequences = _sequences(checkpoint)[:16]
        reference = OnnxRuntimeEngine(cli_builds["bpe"][1] / onnx_export.ORT_OPTIMIZED_NAME, pad)
        got, want = [], []
        for begin in range(0, len(sequences), 2):  # two texts of up to 512 tokens: within MAX_NUM_TOKENS
            got += engine.logits(sequences[begin : begin + 2])
            want += reference.logits(sequences[begin : begin + 2])
        tokens = sum(len(s) for s in sequences)
        agree = sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in zip(got, want, strict=True))
        assert agree / tokens >= 0.99
        max_diff = max(float(np.abs(a - b).max()) for a, b in zip(got, want, strict=True))
        assert max_diff < onnx_export.TOLERANCES[precision][0]
        assert onnx_export.check_engine_against_torch(checkpoint, engine, shapes=((4, 200), (1, 0))).within(precision)
    finally:
        engine.close()


def test_server_answers_from_the_built_folder_as_from_the_checkpoint(cli_builds, build_checkpoints) -> None:
    """ENGINE_DIR=<built folder> gives the same response lists as the checkpoint's own export."""
    from nerserve.config import Settings
    from nerserve.schemas import parse_request
    from nerserve.service import InProcessService

    checkpoint = build_checkpoints["wordpiece-cased"]
    folder = str(cli_builds["wordpiece-cased"][1])
    texts = corpus.texts()[:120]
    # ONNX Runtime on both sides, named: with a GPU and TensorRT the folder also holds an fp16 plan,
    # which engine "auto" serves (plans are compared in test_tensorrt_engine_matches_onnx_runtime)
    from_dir = InProcessService(Settings(checkpoint=str(checkpoint.path), engine_dir=folder, engine="onnxruntime"))
    direct = InProcessService(Settings(checkpoint=str(checkpoint.path), engine="onnxruntime"))
    assert from_dir.core.engine.name == "onnxruntime"
    for strategy in ("none", "simple", "average"):
        request = parse_request({"inputs": texts, "aggregation_strategy": strategy, "truncate": True}, 1000)
        got, want = from_dir.predict(request), direct.predict(request)
        for text_got, text_want in zip(got, want, strict=True):
            assert [(g["start"], g["end"], list(g["results"])) for g in text_got] == [
                (w["start"], w["end"], list(w["results"])) for w in text_want
            ]
            for g, w in zip(text_got, text_want, strict=True):
                assert abs(next(iter(g["results"].values())) - next(iter(w["results"].values()))) < 1e-4
    from_dir.close()
    direct.close()
    if _no_tensorrt_here() is None:
        auto = InProcessService(Settings(checkpoint=str(checkpoint.path), engine_dir=folder))
        assert auto.core.engine.name == "tensorrt"  # why the comparison above names its engine
        auto.close()
    other = build_checkpoints["wordpiece-uncased"]
    with pytest.raises(ValueError, match="checkpoint"):
        InProcessService(Settings(checkpoint=str(other.path), engine_dir=folder))
