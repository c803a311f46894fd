"""SiLU-and-mul, the gated MLP's activation: ``x = [gate, up]`` ``(N, 2I)`` -> ``silu(gate) * up`` ``(N, I)``.

Rounded as torch computes ``F.silu(gate) * up`` in x's dtype: SiLU in float32 rounded to x's dtype,
then the product rounded again. ``x`` may have any row stride (last dim contiguous); the output is
a new contiguous tensor.

Kernel: one program per (row, ``BLOCK`` = 1024 outputs); 4 warps, so each thread handles 8 elements.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from braid.runtime.kernels import interpreting, triton_runs_on

try:
    import triton
    import triton.language as tl
except ImportError:  # optional: without triton only the reference runs
    triton = tl = None

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BLOCK = 1024


def silu_and_mul_reference(x: torch.Tensor) -> torch.Tensor:
    """The semantics in torch (the gated MLP's own path)."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def silu_and_mul_triton(x: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """The kernel; asserts the contract before launch, raises RuntimeError without triton.
    ``block`` is a power of two (small ones for the interpreter)."""
    _check_args(x, block)
    rows, width = x.shape[0], x.shape[1] // 2
    out = torch.empty(rows, width, dtype=x.dtype, device=x.device)
    if rows == 0 or width == 0:
        return out
    _jitted(interpreting())[(rows, triton.cdiv(width, block))](x, out, x.stride(0), width, BLOCK=block, num_warps=4)
    return out


def _check_args(x: torch.Tensor, block: int) -> None:
    if triton is None:
        raise RuntimeError("the SiLU-and-mul kernel needs the triton package; the torch reference runs without it")
    assert triton_runs_on(x.device), f"Triton runs on CUDA, or on the CPU under TRITON_INTERPRET=1; got {x.device}"
    assert x.dim() == 2, f"x must be (N, 2I), got shape {tuple(x.shape)}"
    assert x.shape[1] % 2 == 0, f"x's last dim must be even (gate and up), got {x.shape[1]}"
    assert x.dtype in DTYPES, f"x dtype {x.dtype}, expected one of {DTYPES}"
    assert x.stride(1) == 1, f"x's last dim must be contiguous, strides {x.stride()}"
    assert block > 0 and block & (block - 1) == 0, f"block {block} must be a power of two"


@functools.cache
def _jitted(interpret: bool):
    # ``interpret`` is only the cache key: triton.jit reads the mode itself
    return triton.jit(_silu_and_mul_kernel)


def _silu_and_mul_kernel(
    x_ptr, out_ptr,  # x (N, 2I) row stride stride_x; out (N, I) contiguous
    stride_x, width,
    BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < width
    gate = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + width + offs, mask=mask, other=0.0).to(tl.float32)
    dtype = out_ptr.dtype.element_ty
    act = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)  # silu rounded, as F.silu returns it
    tl.store(out_ptr + row * width + offs, (act * up).to(dtype), mask=mask)
