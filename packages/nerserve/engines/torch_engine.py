"""PyTorch: the reference runtime, on CUDA where there is one, else CPU."""

from __future__ import annotations

import numpy as np

from ..checkpoint import Checkpoint
from ..onnx_export import load_torch_model, model_input_names
from .base import Engine, pad_batch, unpad

_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


class TorchEngine(Engine):
    """The checkpoint's own PyTorch module, padded batches, logits returned as float32."""

    name = "torch"
    padded = True

    def __init__(self, checkpoint: Checkpoint, device: str | None = None, precision: str | None = None) -> None:
        import torch

        self._torch = torch
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.precision = precision or ("fp16" if self.device.startswith("cuda") else "fp32")
        if self.precision not in _DTYPES:
            raise ValueError(f"the torch engine runs fp32, fp16 or bf16, not {self.precision}")
        dtype = getattr(torch, _DTYPES[self.precision])
        self._model = load_torch_model(checkpoint).to(device=self.device, dtype=dtype)
        self._names = model_input_names(checkpoint)
        self._pad_id = checkpoint.tokenizer.pad_token_id or 0

    def run(self, sequences: list[np.ndarray]) -> list[np.ndarray]:
        torch = self._torch
        ids, mask = pad_batch(sequences, self._pad_id)
        feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        with torch.inference_mode():
            tensors = {n: torch.from_numpy(feeds[n]).to(self.device, non_blocking=True) for n in self._names}
            logits = self._model(**tensors).logits.float().cpu().numpy()
        return unpad(logits, sequences)

    def close(self) -> None:
        del self._model
        if self.device.startswith("cuda"):
            self._torch.cuda.empty_cache()
