"""New tokens' K/V written into the KV pool at their slots (``KVPool.store`` as a kernel).

``k`` and ``v`` ``(T, Hkv, D)`` (any token and head strides, last dim contiguous: they are views
of the fused qkv projection) go to rows ``slots`` ``(T,)`` of ``k_cache`` / ``v_cache``
``(num_slots + 1, Hkv, D)``, cast to the pool's dtype. A slot named twice gets one of its rows
(as in torch's indexed assignment); the padding slot 0 may be named any number of times.

Kernel: one program per token copies its ``Hkv x D`` K and V values (a ``BLOCK_H x BLOCK_D``
block, both rounded up to powers of two).
"""

from __future__ import annotations

import functools

import torch

from braid.runtime.kernels import interpreting, power_of_two_at_least, triton_runs_on

try:
    import triton
    import triton.language as tl
except ImportError:  # optional: without triton only the reference runs
    triton = tl = None

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SLOT_DTYPES = (torch.int32, torch.int64)


def store_kv_reference(
    k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> None:
    """The semantics: ``KVPool.store`` on one layer's buffers."""
    k_cache[slots] = k.to(k_cache.dtype)
    v_cache[slots] = v.to(v_cache.dtype)


def store_kv_triton(
    k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> None:
    """The kernel; asserts the contract before launch, raises RuntimeError without triton."""
    _check_args(k_cache, v_cache, slots, k, v)
    num_tokens, num_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    block_h, block_d = power_of_two_at_least(num_heads), power_of_two_at_least(head_dim)
    _jitted(interpreting())[(num_tokens,)](
        k, v, k_cache, v_cache, slots, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), num_heads, head_dim, BLOCK_H=block_h, BLOCK_D=block_d,
        num_warps=4 if block_h * block_d >= 1024 else 1,
    )  # fmt: skip


def _check_args(k_cache, v_cache, slots, k, v) -> None:
    if triton is None:
        raise RuntimeError("store_kv_triton needs the triton package; KVPool.store runs without it")
    assert triton_runs_on(k.device), f"Triton runs on CUDA, or on the CPU under TRITON_INTERPRET=1; got {k.device}"
    assert k.dim() == 3, f"k must be (T, Hkv, D), got shape {tuple(k.shape)}"
    assert v.shape == k.shape, f"v shape {tuple(v.shape)} != k shape {tuple(k.shape)}"
    assert k_cache.dim() == 3 and v_cache.shape == k_cache.shape, (
        f"k_cache/v_cache must both be (slots, Hkv, D), got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
    )
    assert k.shape[1:] == k_cache.shape[1:], f"k rows {tuple(k.shape[1:])} != pool rows {tuple(k_cache.shape[1:])}"
    for name, t in (("k", k), ("v", v), ("k_cache", k_cache), ("v_cache", v_cache)):
        assert t.dtype in DTYPES, f"{name} dtype {t.dtype}, expected one of {DTYPES}"
    for name, t in (("v", v), ("k_cache", k_cache), ("v_cache", v_cache), ("slots", slots)):
        assert t.device == k.device, f"{name} on {t.device}, k on {k.device}"
    assert k.stride(2) == 1 and v.stride(2) == 1, f"k/v last dim must be contiguous, strides {k.stride()} {v.stride()}"
    assert k_cache.is_contiguous() and v_cache.is_contiguous(), "k_cache and v_cache must be contiguous"
    assert slots.shape == (k.shape[0],), f"slots shape {tuple(slots.shape)}, expected ({k.shape[0]},)"
    assert slots.dtype in SLOT_DTYPES, f"slots dtype {slots.dtype}, expected one of {SLOT_DTYPES}"
    assert slots.is_contiguous(), f"slots must be contiguous, strides {slots.stride()}"
    if slots.device.type == "cpu" and slots.numel():  # on the GPU this would sync: the caller vouches
        low, high = (int(x) for x in torch.aminmax(slots))
        assert 0 <= low and high < k_cache.shape[0], f"slots must lie in [0, {k_cache.shape[0]}), got {low}..{high}"


@functools.cache
def _jitted(interpret: bool):
    # ``interpret`` is only the cache key: triton.jit reads the mode itself
    return triton.jit(_store_kv_kernel)


def _store_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slots_ptr,  # k/v (T, H, D) strided; caches (S, H, D) contiguous
    stride_kt, stride_kh, stride_vt, stride_vh, stride_cache, num_heads, head_dim,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slots_ptr + token).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)[:, None]
    offs_d = tl.arange(0, BLOCK_D)[None, :]
    mask = (offs_h < num_heads) & (offs_d < head_dim)
    dest = slot * stride_cache + offs_h * head_dim + offs_d
    k = tl.load(k_ptr + token * stride_kt + offs_h * stride_kh + offs_d, mask=mask)
    tl.store(k_cache_ptr + dest, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    v = tl.load(v_ptr + token * stride_vt + offs_h * stride_vh + offs_d, mask=mask)
    tl.store(v_cache_ptr + dest, v.to(v_cache_ptr.dtype.element_ty), mask=mask)
