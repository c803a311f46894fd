"""RMSNorm over the last dimension, optionally fused with the residual add before it.

``rms_norm(x, weight, eps)`` is ``weight * x / rms(x)`` with the HF rounding order: the reduction
and the normalization run in float32, the result is cast to x's dtype *before* the weight multiply
(in x's dtype). With ``residual``, ``x + residual`` is computed first (rounded to x's dtype, as
torch's add is) and returned beside the normalized sum: ``h = h + attn(h)`` followed by
``norm(h)`` becomes one kernel reading both tensors once.

``x`` is ``(N, D)`` or ``(A, B, D)`` (q/k norms over heads), any strides but a contiguous last dim;
outputs are new contiguous tensors. ``weight`` ``(D,)`` is in x's dtype (the model is cast whole).

Kernel: one program per row, the whole row in one ``BLOCK_D`` block (D rounded up to a power of
two; hidden sizes up to 16384 fit), 8 warps from 2048 elements up, fewer below.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F

from braid.runtime.kernels import SUM_COMBINE, interpreting, power_of_two_at_least, triton_runs_on

try:
    import triton
    import triton.language as tl
except ImportError:  # optional: without triton only the reference runs
    triton = tl = None

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_DIM = 16384


class AddNormOutput(NamedTuple):
    normed: torch.Tensor  # rms_norm(x + residual)
    summed: torch.Tensor  # x + residual, the next residual stream


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The semantics in torch (the RMSNorm layer's own path)."""
    if x.dtype == torch.float32:  # one fused op; the rounding-order subtlety only exists below fp32
        return F.rms_norm(x, weight.shape, weight, eps)
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def add_rms_norm_reference(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> AddNormOutput:
    summed = x + residual
    return AddNormOutput(rms_norm_reference(summed, weight, eps), summed)


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The kernel; asserts the contract before launch, raises RuntimeError without triton."""
    return _launch(x, None, weight, eps).normed


def add_rms_norm_triton(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> AddNormOutput:
    """The kernel with the residual add fused in: ``(rms_norm(x + residual), x + residual)``."""
    return _launch(x, residual, weight, eps)


def _launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float) -> AddNormOutput:
    _check_args(x, residual, weight, eps)
    x3 = x if x.dim() == 3 else x.unsqueeze(1)  # (A, B, D): rows are (a, b) pairs
    r3 = x3 if residual is None else (residual if residual.dim() == 3 else residual.unsqueeze(1))
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    summed = out if residual is None else torch.empty(x.shape, dtype=x.dtype, device=x.device)
    num_rows, dim = x3.shape[0] * x3.shape[1], x.shape[-1]
    if num_rows == 0:
        return AddNormOutput(out, summed)
    block = power_of_two_at_least(dim)
    _jitted(interpreting())[(num_rows,)](
        x3, r3, weight, out, summed, x3.shape[1], x3.stride(0), x3.stride(1), r3.stride(0), r3.stride(1),
        dim, eps, HAS_RESIDUAL=residual is not None, ROUND_BEFORE_WEIGHT=x.dtype != torch.float32,
        BLOCK_D=block, num_warps=min(8, max(1, block // 256)),
    )  # fmt: skip
    return AddNormOutput(out, summed)


def _check_args(x, residual, weight, eps) -> None:
    if triton is None:
        raise RuntimeError("the RMSNorm kernel needs the triton package; the torch reference runs without it")
    assert triton_runs_on(x.device), f"Triton runs on CUDA, or on the CPU under TRITON_INTERPRET=1; got {x.device}"
    assert x.dim() in (2, 3), f"x must be (N, D) or (A, B, D), got shape {tuple(x.shape)}"
    assert x.dtype in DTYPES, f"x dtype {x.dtype}, expected one of {DTYPES}"
    assert x.stride(-1) == 1, f"x's last dim must be contiguous, strides {x.stride()}"
    assert 0 < x.shape[-1] <= MAX_DIM, f"last dim {x.shape[-1]} must be in 1..{MAX_DIM}"
    assert weight.shape == (x.shape[-1],), f"weight shape {tuple(weight.shape)}, expected ({x.shape[-1]},)"
    assert weight.dtype == x.dtype, f"weight dtype {weight.dtype} != x dtype {x.dtype}"
    assert weight.device == x.device, f"weight on {weight.device}, x on {x.device}"
    assert weight.is_contiguous(), "weight must be contiguous"
    assert eps > 0, f"eps must be positive, got {eps}"
    if residual is not None:
        assert residual.shape == x.shape, f"residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}"
        assert residual.dtype == x.dtype, f"residual dtype {residual.dtype} != x dtype {x.dtype}"
        assert residual.device == x.device, f"residual on {residual.device}, x on {x.device}"
        assert residual.stride(-1) == 1, f"residual's last dim must be contiguous, strides {residual.stride()}"


@functools.cache
def _jitted(interpret: bool):
    # ``interpret`` is only the cache key: triton.jit reads the mode itself
    return triton.jit(_rms_norm_kernel)


def _rms_norm_kernel(
    x_ptr, r_ptr, w_ptr, out_ptr, sum_ptr,  # x, r (A, B, D) strided; w (D,); out, sum contiguous
    inner, stride_xa, stride_xb, stride_ra, stride_rb, dim, eps,
    HAS_RESIDUAL: tl.constexpr, ROUND_BEFORE_WEIGHT: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    a, b = row // inner, row % inner
    offs = tl.arange(0, BLOCK_D)
    mask = offs < dim
    x = tl.load(x_ptr + a * stride_xa + b * stride_xb + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + a * stride_ra + b * stride_rb + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)  # rounded like torch's add
        tl.store(sum_ptr + row * dim + offs, x, mask=mask)
    x32 = x.to(tl.float32)
    rstd = tl.rsqrt(tl.reduce(x32 * x32, 0, SUM_COMBINE) / dim + eps)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = x32 * rstd
    if ROUND_BEFORE_WEIGHT:
        y = y.to(x.dtype).to(tl.float32)
    tl.store(out_ptr + row * dim + offs, (y * w).to(out_ptr.dtype.element_ty), mask=mask)
