"""PyTorch: the reference runtime, on CUDA where there is one, else CPU.

Two ways to run the checkpoint's own weights:
- padded (CPU, float32, and the fallback on CUDA): the HF module itself on right-padded batches;
- packed (CUDA, half precision, the default there): the sequences of a batch back to back with no
  padding, one token axis of `sum(lengths)` rows, per-sequence positions, and variable-length
  attention over cumulative sequence lengths (`torch.nn.attention.varlen.varlen_attn`, Flash
  Attention). The BERT/RoBERTa layers are re-run here from the HF module's own tensors (fused
  Q/K/V), so any BertForTokenClassification / RobertaForTokenClassification checkpoint works.
  Batches are padded only up to a token-count bucket (a dummy sequence fills the rest) and each
  bucket's forward is a captured CUDA graph, so one short sentence costs its kernels and little
  else; the logits of the real tokens alone come back, in float32.

`packed=True` also works on CPU (attention then goes through a padded SDPA fallback); the tests use
that to check the packing against the HF module at float32 tolerance."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from ..checkpoint import Checkpoint
from ..config import Runtime, Settings
from ..engine_folder import EngineArtefact
from ..scores import TokenScores
from .base import Engine, pad_batch, per_sequence, scores_of_tensor

log = logging.getLogger(__name__)

_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
#: token-count buckets captured as CUDA graphs (a batch above the largest runs eagerly)
GRAPH_BUCKETS = (32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


def varlen_attention():
    """`torch.nn.attention.varlen.varlen_attn` where this torch has it, else None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except Exception:  # older torch
        return None
    return varlen_attn


def pack(sequences: list[np.ndarray], offset: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Concatenate id sequences: (ids int64 [T], positions int64 [T], cu_seqlens int32 [N+1], longest).

    Positions restart at `offset` for every sequence (2 for RoBERTa, whose positions start after
    the padding index; 0 for BERT), exactly what the padded model computes for a right-padded row."""
    lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))
    cu = np.zeros(len(sequences) + 1, dtype=np.int32)
    np.cumsum(lengths, out=cu[1:])
    total = int(cu[-1])
    ids = np.concatenate(sequences).astype(np.int64, copy=False) if total else np.empty(0, np.int64)
    starts = np.repeat(cu[:-1].astype(np.int64), lengths)
    positions = np.arange(total, dtype=np.int64) - starts + offset
    return ids, positions, cu, int(lengths.max()) if len(sequences) else 0


def supports_packing(model) -> str | None:
    """None when `model` is a BERT-style encoder the packed path reproduces, else why not."""
    base = getattr(model, "base_model", None)
    config = getattr(model, "config", None)
    if base is None or config is None or not hasattr(model, "classifier"):
        return "not a *ForTokenClassification with a classifier"
    if getattr(config, "position_embedding_type", "absolute") not in (None, "absolute"):
        return f"position_embedding_type {config.position_embedding_type}"
    if getattr(config, "is_decoder", False):
        return "decoder"
    if config.hidden_act not in ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "gelu_python"):
        return f"hidden_act {config.hidden_act}"
    embeddings = getattr(base, "embeddings", None)
    encoder = getattr(base, "encoder", None)
    if embeddings is None or encoder is None or not hasattr(encoder, "layer"):
        return "no embeddings/encoder.layer"
    layer = encoder.layer[0]
    for path in (
        "attention.self.query",
        "attention.self.key",
        "attention.self.value",
        "attention.output.dense",
        "attention.output.LayerNorm",
        "intermediate.dense",
        "output.dense",
        "output.LayerNorm",
    ):
        node = layer
        for part in path.split("."):
            node = getattr(node, part, None)
            if node is None:
                return f"layer has no {path}"
    return None


class PackedEncoder:
    """The HF token classifier's forward on a packed token axis, from the module's own tensors."""

    def __init__(self, model, position_offset: int, torch_module, dtype, device: str) -> None:
        torch = torch_module
        self.torch = torch
        F = torch.nn.functional
        self.F = F
        config = model.config
        base = model.base_model
        emb = base.embeddings
        self.heads = config.num_attention_heads
        self.hidden = config.hidden_size
        self.head_dim = self.hidden // self.heads
        self.eps = config.layer_norm_eps
        self.num_labels = model.classifier.out_features
        self.position_offset = position_offset
        act = config.hidden_act
        if act in ("gelu", "gelu_python"):
            self.act = lambda x: F.gelu(x)
        elif act == "relu":
            self.act = F.relu
        else:
            self.act = lambda x: F.gelu(x, approximate="tanh")

        def t(x):
            return x.detach().to(device=device, dtype=dtype).contiguous()

        self.word = t(emb.word_embeddings.weight)
        self.pos = t(emb.position_embeddings.weight)
        types = getattr(emb, "token_type_embeddings", None)
        self.type0 = t(types.weight[0]) if types is not None else None  # token_type_ids are all 0
        self.emb_ln = (t(emb.LayerNorm.weight), t(emb.LayerNorm.bias))
        self.layers = []
        for layer in base.encoder.layer:
            a = layer.attention
            qkv_w = torch.cat([a.self.query.weight, a.self.key.weight, a.self.value.weight], 0)
            qkv_b = torch.cat([a.self.query.bias, a.self.key.bias, a.self.value.bias], 0)
            self.layers.append(
                (
                    t(qkv_w),
                    t(qkv_b),
                    t(a.output.dense.weight),
                    t(a.output.dense.bias),
                    t(a.output.LayerNorm.weight),
                    t(a.output.LayerNorm.bias),
                    t(layer.intermediate.dense.weight),
                    t(layer.intermediate.dense.bias),
                    t(layer.output.dense.weight),
                    t(layer.output.dense.bias),
                    t(layer.output.LayerNorm.weight),
                    t(layer.output.LayerNorm.bias),
                )
            )
        self.cls_w, self.cls_b = t(model.classifier.weight), t(model.classifier.bias)
        self.scale = self.head_dim**-0.5
        self.varlen = varlen_attention() if device.startswith("cuda") and dtype != torch.float32 else None

    def _attend(self, q, k, v, cu, max_len: int, lengths):
        torch = self.torch
        if self.varlen is not None:
            return self.varlen(q, k, v, cu, cu, max_len, max_len, scale=self.scale)
        # Fallback (CPU, float32): scatter to a padded [N, L] grid, masked SDPA, gather back.
        n = len(lengths)
        total = q.shape[0]
        rows = torch.repeat_interleave(torch.arange(n, device=q.device), lengths)
        cols = torch.arange(total, device=q.device) - torch.repeat_interleave(cu[:-1].long(), lengths)
        grid = q.new_zeros(3, n, max_len, self.heads, self.head_dim)
        grid[0, rows, cols], grid[1, rows, cols], grid[2, rows, cols] = q, k, v
        mask = torch.arange(max_len, device=q.device)[None, :] < lengths[:, None]
        out = self.F.scaled_dot_product_attention(
            grid[0].transpose(1, 2),
            grid[1].transpose(1, 2),
            grid[2].transpose(1, 2),
            attn_mask=mask[:, None, None, :],
            scale=self.scale,
        )
        return out.transpose(1, 2)[rows, cols]

    def forward(self, ids, positions, cu, max_len: int, lengths=None):
        """Logits float32 [T, labels] for packed `ids` (int64 [T]) with `positions` and `cu` (int32 [N+1])."""
        F = self.F
        h = self.word[ids] + self.pos[positions]
        if self.type0 is not None:
            h = h + self.type0
        h = F.layer_norm(h, (self.hidden,), *self.emb_ln, self.eps)
        total = h.shape[0]
        for qkv_w, qkv_b, o_w, o_b, ln1_w, ln1_b, i_w, i_b, d_w, d_b, ln2_w, ln2_b in self.layers:
            qkv = F.linear(h, qkv_w, qkv_b).view(total, 3, self.heads, self.head_dim)
            ctx = self._attend(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu, max_len, lengths)
            h = F.layer_norm(
                F.linear(ctx.reshape(total, self.hidden), o_w, o_b) + h, (self.hidden,), ln1_w, ln1_b, self.eps
            )
            inner = self.act(F.linear(h, i_w, i_b))
            h = F.layer_norm(F.linear(inner, d_w, d_b) + h, (self.hidden,), ln2_w, ln2_b, self.eps)
        return F.linear(h, self.cls_w, self.cls_b).float()


class _Graph:
    """One captured forward for `bucket` tokens and up to `slots` sequences (static buffers)."""

    def __init__(self, encoder: PackedEncoder, bucket: int, slots: int, max_len: int, device: str, pool) -> None:
        torch = encoder.torch
        self.bucket, self.slots, self.max_len = bucket, slots, max_len
        self.ids = torch.zeros(bucket, dtype=torch.int64, device=device)
        self.positions = torch.zeros(bucket, dtype=torch.int64, device=device)
        self.cu = (torch.arange(slots + 1, device=device) * max_len).clamp_(max=bucket).to(torch.int32)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up outside the capture (cuBLAS handles, workspaces)
            for _ in range(2):
                encoder.forward(self.ids, self.positions, self.cu, max_len)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.logits = encoder.forward(self.ids, self.positions, self.cu, max_len)

    def pool(self):
        return self.graph.pool()


class TorchEngine(Engine):
    """The checkpoint's own PyTorch module: padded batches on CPU, packed CUDA-graph batches on CUDA."""

    name = Runtime.TORCH
    padded = True

    def __init__(
        self,
        checkpoint: Checkpoint,
        device: str | None = None,
        precision: str | None = None,
        packed: bool | None = None,
        graphs: bool = True,
        max_graph_tokens: int | None = None,
    ) -> None:
        import torch

        self._torch = torch
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        cuda = self.device.startswith("cuda")
        self.precision = precision or ("fp16" if cuda else "fp32")
        if self.precision not in _DTYPES:
            raise ValueError(f"the torch engine runs fp32, fp16 or bf16, not {self.precision}")
        dtype = getattr(torch, _DTYPES[self.precision])
        self._dtype = dtype
        model = checkpoint.load_torch_model()
        self._model: Any = None  # the HF module, on the padded path only
        self._names = checkpoint.input_names
        self._pad_id = checkpoint.pad_id
        self._max_len = checkpoint.max_input_tokens
        self._encoder: PackedEncoder | None = None
        self._graphs: list[_Graph] = []
        if packed is None:  # auto: packed on CUDA in half precision where Flash varlen attention exists
            packed = cuda and self.precision != "fp32" and varlen_attention() is not None
        why_not = supports_packing(model) if packed else None
        if packed and why_not:
            log.warning("torch engine: packed path off (%s); padded batches", why_not)
            packed = False
        if packed:
            with torch.inference_mode():
                self._encoder = PackedEncoder(model, checkpoint.position_offset, torch, dtype, self.device)
                try:  # one tiny packed batch first: a torch whose varlen kernel refuses falls back to padded
                    self.logits([np.array([self._pad_id] * 3, np.int64), np.array([self._pad_id] * 5, np.int64)])
                except Exception as error:
                    log.warning(
                        "torch engine: packed path failed its smoke test (%s: %s); padded batches",
                        type(error).__name__,
                        error,
                    )
                    self._encoder = None
                    packed = False
        if packed:
            self.padded = False
            self._model = None
            del model
            if graphs and cuda and self._packed.varlen is not None:
                try:
                    self._capture(max_graph_tokens or GRAPH_BUCKETS[-1])
                except Exception as error:  # a torch whose varlen attention cannot be captured: run eagerly
                    log.warning(
                        "torch engine: CUDA graph capture failed (%s: %s); packed batches run eagerly",
                        type(error).__name__,
                        error,
                    )
                    self._graphs.clear()
                    torch.cuda.synchronize()
        else:
            self._model = model.to(device=self.device, dtype=dtype)
        log.info(
            "torch engine: %s %s, %s%s",
            self.device,
            self.precision,
            "packed" if packed else "padded",
            f", {len(self._graphs)} CUDA graphs" if self._graphs else "",
        )

    @classmethod
    def load(cls, checkpoint: Checkpoint, settings: Settings, artefact: EngineArtefact | None) -> TorchEngine:
        """The checkpoint's own module (an engine folder holds nothing PyTorch serves)."""
        return cls(checkpoint, precision=settings.precision, packed=settings.packed, graphs=settings.cuda_graphs)

    @property
    def packed(self) -> bool:
        return self._encoder is not None

    @property
    def _packed(self) -> PackedEncoder:
        """The packed encoder; only called on the packed path."""
        if self._encoder is None:
            raise RuntimeError("the torch engine is not on its packed path")
        return self._encoder

    def _capture(self, max_tokens: int) -> None:
        """Graphs per token bucket, in two shapes: many short sequences (up to 128 tokens each), and
        fewer long ones (up to the max input length). Flash attention launches blocks per sequence
        slot and per 128 query rows of the longest, so each graph has only as many slots and as long
        a `max_len` as its batches need; a batch that fits none (e.g. hundreds of 2-token texts) runs
        eagerly with its exact shape."""
        torch = self._torch
        pool = None
        shapes = []
        for bucket in (b for b in GRAPH_BUCKETS if b <= max_tokens):
            short, long = min(128, self._max_len, bucket), min(self._max_len, bucket)
            shapes.append((bucket, bucket // 16 + bucket // short + 2, short))
            if long > short:
                shapes.append((bucket, bucket // 128 + bucket // long + 2, long))
        with torch.inference_mode():
            for bucket, slots, max_len in sorted(shapes, reverse=True):  # largest first: the rest reuse its pool
                graph = _Graph(self._packed, bucket, slots, max_len, self.device, pool)
                pool = graph.pool()
                self._graphs.append(graph)
        self._graphs.sort(key=lambda g: (g.bucket, g.slots, g.max_len))
        torch.cuda.synchronize()

    def _pick_graph(self, total: int, count: int, longest: int):
        for graph in self._graphs:
            if graph.bucket >= total and graph.max_len >= longest:
                fillers = -(-(graph.bucket - total) // graph.max_len)
                if graph.slots >= count + fillers:
                    return graph
        return None

    def logits(self, sequences: list[np.ndarray]) -> list[np.ndarray]:
        if not sequences:
            return []
        with self._torch.inference_mode():
            return per_sequence(self._forward(sequences).cpu().numpy(), sequences)

    def classify(self, sequences: list[np.ndarray], keep_logits: bool) -> TokenScores:
        """Softmax and argmax on the engine's device: the host gets labels and probabilities."""
        with self._torch.inference_mode():
            return scores_of_tensor(self._forward(sequences), keep_logits)

    def _forward(self, sequences: list[np.ndarray]):
        """float32 logits [sum of lengths, labels] on the device, the real tokens of `sequences` in order."""
        if self._encoder is not None:
            return self._forward_packed(sequences)
        torch = self._torch
        feeds = pad_batch(sequences, self._pad_id)
        tensors = {n: torch.from_numpy(feeds[n]).to(self.device, non_blocking=True) for n in self._names}
        logits = self._model(**tensors).logits.float()
        return logits[tensors["attention_mask"].bool()]

    def _forward_packed(self, sequences: list[np.ndarray]):
        torch, encoder = self._torch, self._packed
        ids, positions, cu, longest = pack(sequences, encoder.position_offset)
        total = int(cu[-1])
        graph = self._pick_graph(total, len(sequences), longest)
        if graph is None:
            dev_ids = torch.from_numpy(ids).to(self.device, non_blocking=True)
            dev_pos = torch.from_numpy(positions).to(self.device, non_blocking=True)
            dev_cu = torch.from_numpy(cu).to(self.device, non_blocking=True)
            lengths = None
            if encoder.varlen is None:
                lengths = torch.from_numpy(np.diff(cu).astype(np.int64)).to(self.device)
            return encoder.forward(dev_ids, dev_pos, dev_cu, longest, lengths)
        fill = graph.bucket - total
        ids_full = np.full(graph.bucket, self._pad_id, dtype=np.int64)
        ids_full[:total] = ids
        pos_full = np.full(graph.bucket, encoder.position_offset, dtype=np.int64)
        pos_full[:total] = positions
        if fill:  # the filler runs as sequences of at most max_len tokens, ignored after
            pos_full[total:] = np.arange(fill) % graph.max_len + encoder.position_offset
        cu_full = np.full(graph.slots + 1, graph.bucket, dtype=np.int32)
        cu_full[: len(cu)] = cu
        cuts = np.arange(total, graph.bucket, graph.max_len, dtype=np.int32)[1:]
        cu_full[len(cu) : len(cu) + len(cuts)] = cuts
        host = torch.from_numpy(np.concatenate([ids_full, pos_full, cu_full.astype(np.int64)]))
        dev = host.to(self.device)
        graph.ids.copy_(dev[: graph.bucket])
        graph.positions.copy_(dev[graph.bucket : 2 * graph.bucket])
        graph.cu.copy_(dev[2 * graph.bucket :])
        graph.graph.replay()
        return graph.logits[:total]  # the graph's static output: read before the next replay

    def close(self) -> None:
        self._graphs.clear()
        self._encoder = None
        self._model = None
        if self.device.startswith("cuda"):
            self._torch.cuda.empty_cache()
