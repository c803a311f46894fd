"""Rotary position embedding ("rotate half" layout) applied to q and k, in place or out.

``q`` ``(T, Hq, D)`` and ``k`` ``(T, Hkv, D)`` (any token/head strides, last dim contiguous: views
of the fused qkv projection), ``cos_cache`` / ``sin_cache`` ``(max_positions, D / 2)`` float32 (the
tables ``layers.rotary.RotaryEmbedding`` builds, llama3 or linear scaling already folded into
them), ``positions`` ``(T,)`` int. With ``c, s`` the table rows at a token's position cast to x's
dtype, ``x = [x1, x2]`` becomes ``[x1 c - x2 s, x2 c + x1 s]``, every product and sum rounded to x's
dtype as torch (and HF) compute it, so the kernel matches the torch path bit for bit but for
fused multiply-adds in float32.

Kernel: one program per token rotates all its q and k heads (``BLOCK_H x BLOCK_HALF`` blocks), the
cos/sin rows loaded once for both.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from braid.runtime.kernels import interpreting, power_of_two_at_least, triton_runs_on

try:
    import triton
    import triton.language as tl
except ImportError:  # optional: without triton only the reference runs
    triton = tl = None

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
POSITION_DTYPES = (torch.int32, torch.int64)


class RotaryOutput(NamedTuple):
    q: torch.Tensor
    k: torch.Tensor


def rotate_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x`` ``(..., D)`` rotated by ``cos``/``sin`` ``(..., D / 2)`` (broadcast), in x's dtype."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def apply_rotary_reference(
    q: torch.Tensor, k: torch.Tensor, cos_cache: torch.Tensor, sin_cache: torch.Tensor, positions: torch.Tensor
) -> RotaryOutput:
    """The semantics in torch; returns new tensors."""
    cos = cos_cache[positions].to(q.dtype).unsqueeze(1)  # (T, 1, D/2)
    sin = sin_cache[positions].to(q.dtype).unsqueeze(1)
    return RotaryOutput(rotate_half(q, cos, sin), rotate_half(k, cos, sin))


def apply_rotary_triton(
    q: torch.Tensor, k: torch.Tensor, cos_cache: torch.Tensor, sin_cache: torch.Tensor, positions: torch.Tensor,
    inplace: bool = True,
) -> RotaryOutput:  # fmt: skip
    """The kernel: rotates ``q`` and ``k`` in place (returned as they are), or into new contiguous
    tensors with ``inplace=False``. Asserts the contract before launch; RuntimeError without triton."""
    _check_args(q, k, cos_cache, sin_cache, positions)
    out_q, out_k = (q, k) if inplace else (torch.empty(q.shape, dtype=q.dtype, device=q.device),
                                           torch.empty(k.shape, dtype=k.dtype, device=k.device))  # fmt: skip
    num_tokens, num_q_heads, head_dim = q.shape
    if num_tokens == 0:
        return RotaryOutput(out_q, out_k)
    half = head_dim // 2
    block_h = power_of_two_at_least(max(num_q_heads, k.shape[1]))
    block_half = power_of_two_at_least(half)
    _jitted(interpreting())[(num_tokens,)](
        q, k, out_q, out_k, cos_cache, sin_cache, positions,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), out_q.stride(0), out_q.stride(1),
        out_k.stride(0), out_k.stride(1), cos_cache.stride(0), num_q_heads, k.shape[1], half,
        BLOCK_H=block_h, BLOCK_HALF=block_half, num_warps=4 if block_h * block_half >= 1024 else 1,
    )  # fmt: skip
    return RotaryOutput(out_q, out_k)


def _check_args(q, k, cos_cache, sin_cache, positions) -> None:
    if triton is None:
        raise RuntimeError("the rotary kernel needs the triton package; the torch reference runs without it")
    assert triton_runs_on(q.device), f"Triton runs on CUDA, or on the CPU under TRITON_INTERPRET=1; got {q.device}"
    assert q.dim() == 3 and k.dim() == 3, f"q and k must be (T, H, D), got {tuple(q.shape)} and {tuple(k.shape)}"
    assert k.shape[0] == q.shape[0] and k.shape[2] == q.shape[2], f"k {tuple(k.shape)} does not fit q {tuple(q.shape)}"
    assert q.shape[2] % 2 == 0, f"head_dim must be even, got {q.shape[2]}"
    assert q.dtype in DTYPES and k.dtype == q.dtype, f"q/k dtypes {q.dtype}/{k.dtype}, expected one of {DTYPES}"
    assert q.stride(2) == 1 and k.stride(2) == 1, f"q/k last dim must be contiguous, strides {q.stride()} {k.stride()}"
    half = q.shape[2] // 2
    for name, table in (("cos_cache", cos_cache), ("sin_cache", sin_cache)):
        assert table.dim() == 2 and table.shape[1] == half, f"{name} must be (P, {half}), got {tuple(table.shape)}"
        assert table.dtype == torch.float32, f"{name} dtype {table.dtype}, expected torch.float32"
        assert table.is_contiguous(), f"{name} must be contiguous"
        assert table.device == q.device, f"{name} on {table.device}, q on {q.device}"
    assert sin_cache.shape == cos_cache.shape, f"sin_cache {tuple(sin_cache.shape)} != {tuple(cos_cache.shape)}"
    assert k.device == q.device and positions.device == q.device, "q, k and positions must share a device"
    assert positions.shape == (q.shape[0],), f"positions shape {tuple(positions.shape)}, expected ({q.shape[0]},)"
    assert positions.dtype in POSITION_DTYPES, f"positions dtype {positions.dtype}, expected one of {POSITION_DTYPES}"
    assert positions.is_contiguous(), "positions must be contiguous"
    if positions.device.type == "cpu" and positions.numel():  # on the GPU this would sync: the caller vouches
        low, high = (int(x) for x in torch.aminmax(positions))
        limit = cos_cache.shape[0]
        assert 0 <= low and high < limit, f"positions must lie in [0, {limit}), got {low}..{high}"


@functools.cache
def _jitted(interpret: bool):
    # ``interpret`` is only the cache key: triton.jit reads the mode itself
    return triton.jit(_rotary_kernel)


def _rotary_kernel(
    q_ptr, k_ptr, q_out_ptr, k_out_ptr, cos_ptr, sin_ptr, pos_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_oqt, stride_oqh, stride_okt, stride_okh, stride_table,
    num_q_heads, num_k_heads, half,
    BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):  # fmt: skip
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + token).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)[:, None]
    offs_d = tl.arange(0, BLOCK_HALF)[None, :]
    d_valid = offs_d < half
    dtype = q_ptr.dtype.element_ty
    # the table rows rounded to x's dtype first, as the torch path (and HF) do
    cos = tl.load(cos_ptr + pos * stride_table + offs_d, mask=d_valid, other=0.0).to(dtype).to(tl.float32)
    sin = tl.load(sin_ptr + pos * stride_table + offs_d, mask=d_valid, other=0.0).to(dtype).to(tl.float32)
    # both halves are loaded before either is stored: in place, the output overwrites them
    q_mask = (offs_h < num_q_heads) & d_valid
    q_src = q_ptr + token * stride_qt + offs_h * stride_qh + offs_d
    q1 = tl.load(q_src, mask=q_mask, other=0.0).to(tl.float32)
    q2 = tl.load(q_src + half, mask=q_mask, other=0.0).to(tl.float32)
    k_mask = (offs_h < num_k_heads) & d_valid
    k_src = k_ptr + token * stride_kt + offs_h * stride_kh + offs_d
    k1 = tl.load(k_src, mask=k_mask, other=0.0).to(tl.float32)
    k2 = tl.load(k_src + half, mask=k_mask, other=0.0).to(tl.float32)
    # each product rounded to x's dtype before the sum, as torch's elementwise ops round
    q_lo = (q1 * cos).to(dtype).to(tl.float32) - (q2 * sin).to(dtype).to(tl.float32)
    q_hi = (q2 * cos).to(dtype).to(tl.float32) + (q1 * sin).to(dtype).to(tl.float32)
    k_lo = (k1 * cos).to(dtype).to(tl.float32) - (k2 * sin).to(dtype).to(tl.float32)
    k_hi = (k2 * cos).to(dtype).to(tl.float32) + (k1 * sin).to(dtype).to(tl.float32)
    q_dst = q_out_ptr + token * stride_oqt + offs_h * stride_oqh + offs_d
    tl.store(q_dst, q_lo.to(dtype), mask=q_mask)
    tl.store(q_dst + half, q_hi.to(dtype), mask=q_mask)
    k_dst = k_out_ptr + token * stride_okt + offs_h * stride_okh + offs_d
    tl.store(k_dst, k_lo.to(dtype), mask=k_mask)
    tl.store(k_dst + half, k_hi.to(dtype), mask=k_mask)
