"""The packed engine path (padding-free batches), checked on CPU against the HF module in float32.

On CUDA the same code runs in half precision with Flash varlen attention and CUDA graphs (checked
by bench/check_packed.py on the GPU machine); here attention takes the padded SDPA fallback, so
what is tested is the packing itself: positions, cumulative lengths, fused Q/K/V, the layer order."""

from __future__ import annotations

import numpy as np
import pytest

from nerserve.checkpoint import load_checkpoint
from nerserve.engines.torch_engine import TorchEngine, pack, supports_packing


def test_pack_positions_and_offsets():
    seqs = [np.array([5, 6, 7]), np.array([8]), np.array([9, 10])]
    ids, positions, cu, longest = pack(seqs)
    assert ids.tolist() == [5, 6, 7, 8, 9, 10]
    assert positions.tolist() == [0, 1, 2, 0, 0, 1]
    assert cu.tolist() == [0, 3, 4, 6] and cu.dtype == np.int32
    assert longest == 3
    _, positions, _, _ = pack(seqs, offset=2)  # RoBERTa: positions start after the padding index
    assert positions.tolist() == [2, 3, 4, 2, 2, 3]


@pytest.mark.parametrize("kind", ["wordpiece-uncased", "bpe"])
def test_packed_equals_padded_fp32(kind, tmp_path):
    import checkpoints

    path = tmp_path / kind
    checkpoints.build(kind, path)
    ck = load_checkpoint(str(path))
    padded = TorchEngine(ck, device="cpu")
    packed = TorchEngine(ck, device="cpu", packed=True)
    assert padded.padded and not packed.padded
    assert supports_packing(padded._model) is None
    rng = np.random.default_rng(7)
    vocab = len(ck.tokenizer)
    seqs = [rng.integers(5, vocab, size=n).astype(np.int64) for n in (2, 9, 1, 40, 17, 3)]
    for a, b, s in zip(padded.logits(seqs), packed.logits(seqs), seqs, strict=True):
        assert b.shape == (len(s), len(ck.labels)) and b.dtype == np.float32
        np.testing.assert_allclose(b, a, atol=1e-4, rtol=0)
    assert packed.logits([]) == []


def test_cpu_default_stays_padded_fp32(tmp_path):
    import checkpoints

    path = tmp_path / "wp"
    checkpoints.build("wordpiece-cased", path)
    engine = TorchEngine(load_checkpoint(str(path)), device="cpu")
    assert engine.padded and engine.precision == "fp32" and not engine.packed
