"""The base model's matmuls with the fastest kernel the device has.

On a CPU, torch's default fp32 `F.linear` (MKL's sgemm on an unpacked weight) is
far from what the cores do: oneDNN with the weight reordered once, at load time,
into its blocked layout runs this model family's decode and prefill matmuls 1.3x
to 2x faster (measured on a 2-core AMD EPYC, hidden 512, batch 1 to 512; the
reorder is what vLLM's CPU build does too). A packed weight is an opaque oneDNN
tensor, so it replaces the plain one (no second copy of the model's weights).

Elsewhere (CUDA, or a torch built without oneDNN, or LORAPOOL_ONEDNN=0) a Linear
is F.linear on the plain weight."""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F

log = logging.getLogger("lorapool.model")

# The batch size oneDNN's reorder is tuned for: decode batches of about this size
# and more run at full speed (measured: a hint of 1 is up to 1.5x slower at batch
# 64, hints of 64 and 512 are the same within noise at every batch from 1 to 512).
PACK_BATCH_HINT = 64


def onednn_wanted(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether weights on `device` in `dtype` are reordered for oneDNN."""
    if device.type != "cpu" or os.environ.get("LORAPOOL_ONEDNN", "1") == "0":
        return False
    if not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.float32:
        return True
    return dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()


class Linear:
    """y = x W^T (+ b), W [out, in] as a checkpoint stores it."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, pack: bool = False):
        self.out_features, self.in_features = weight.shape
        self.bias = bias
        self.packed = pack and self._pack(weight)
        if not self.packed:
            self.weight = weight

    def _pack(self, weight: torch.Tensor) -> bool:
        """Reorder the weight for oneDNN; False (and the plain weight kept) if this
        torch cannot, or the packed kernel disagrees with F.linear on a probe."""
        try:
            packed = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_BATCH_HINT)
            probe = torch.randn(3, weight.shape[1], dtype=weight.dtype)
            got = torch.ops.mkldnn._linear_pointwise(probe, packed, None, "none", [], "")
            want = F.linear(probe, weight)
        except RuntimeError as exc:
            log.warning("oneDNN linear unavailable, using F.linear: %s", exc)
            return False
        tol = 1e-3 if weight.dtype == torch.float32 else 5e-2
        if not torch.allclose(got, want, rtol=tol, atol=tol * float(want.abs().max() + 1)):
            log.warning("oneDNN linear disagrees with F.linear on a probe; using F.linear")
            return False
        self.weight = packed
        return True

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)
