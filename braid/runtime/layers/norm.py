"""RMSNorm with the same rounding as the HF reference implementations."""

from __future__ import annotations

import torch
from torch import nn

from braid.runtime.kernels.norm import (
    AddNormOutput,
    add_rms_norm_reference,
    add_rms_norm_triton,
    rms_norm_reference,
    rms_norm_triton,
)


class RMSNorm(nn.Module):
    """``weight * x / rms(x)`` over the last dimension.

    The reduction runs in float32 and the result is cast back to the input dtype *before*
    the weight multiply, as Llama/Qwen/Mistral do in HF: matching that order keeps bf16
    outputs bit-compatible with the checkpoints' reference.

    ``fused=True`` runs the Triton kernel (``kernels/norm.py``, same rounding) instead of torch;
    the model passes it when its attention backend says the kernels run on this device.
    """

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, fused: bool = False) -> torch.Tensor:
        if fused:
            return rms_norm_triton(x, self.weight, self.eps)
        return rms_norm_reference(x, self.weight, self.eps)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor, fused: bool = False) -> AddNormOutput:
        """``(norm(x + residual), x + residual)``: the residual add before a norm, fused when ``fused``."""
        if fused:
            return add_rms_norm_triton(x, residual, self.weight, self.eps)
        return add_rms_norm_reference(x, residual, self.weight, self.eps)
