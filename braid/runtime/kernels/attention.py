"""Attention over the token-granular KV pool: extend (prefill) and split-K decode, with references.

Both kernels read every key and value through the request table: request ``i``'s token ``j`` lives
in KV slot ``req_to_token[req_rows[i], j]`` of ``k_cache`` / ``v_cache`` ``(num_slots + 1, Hkv, D)``.
The new tokens' K/V are already in the pool (the backend stores them first), so the new tokens
attend to themselves through the table like any cached token.

Semantics (the references below): query ``t`` of request ``i`` sits at position
``p = prefix_lens[i] + (t - extend_starts[i])`` and sees keys ``j <= p`` (and ``j > p - W`` with a
sliding window ``W``); query head ``h`` reads KV head ``h // (Hq // Hkv)`` (GQA); scores are
multiplied by ``scale``; softmax and the weighted sum run in float32; the result is in q's dtype.

Kernel design:

- Extend: one program per (tile of ``BLOCK_M`` new tokens of one request, query head). Tiles are
  listed on the host (:func:`plan_extend`), so a batch of short and long extends launches no empty
  programs; the tiles with the most keys go first. Each program streams ``BLOCK_N`` keys at a time from the
  first key any of its queries may see to its last query, with an online (flash) softmax.
- Decode: flash-decoding. One program per (request, KV head, split): the ``G`` query heads of a
  KV head are the rows of one ``BLOCK_H``-row dot, so each K/V block is loaded once for the
  group. The keys of a request (its window, with a sliding window) are cut into ``num_splits``
  chunks of whole ``BLOCK_N`` blocks; each split writes its normalized partial output and its
  log-sum-exp, and a reduce kernel combines the splits. With one split the first kernel writes
  the output directly. :func:`decode_splits` picks the split count (enough programs for about two
  waves of the GPU's SMs, at least ``MIN_SPLIT_TOKENS`` keys per split).
- Cascade (a prefix the batch shares in the KV pool): a prefix pass runs one program per (tile of
  (query token, query head) rows of one KV head, KV head, split of the prefix), so each shared
  key is read once per tile instead of once per request, and writes the first splits' partials
  and log-sum-exps; the decode or extend kernel then starts each request at its shared length
  and writes the last split; the reduce merges them.

Blocks: BLOCK_D is head_dim rounded up to a power of two (>= 16: ``tl.dot`` needs 16 on the GPU);
extend BLOCK_M = 64 new tokens per tile, BLOCK_N = 64 keys per step (32 for head_dim > 128);
decode BLOCK_N = 64, BLOCK_H = the group size rounded up to a power of two, at least 16. None of
these was tuned on hardware yet. float32 inputs (and every input under the interpreter, whose ``tl.dot`` mishandles
bfloat16) are multiplied in IEEE float32; bfloat16/float16 go to the tensor cores with float32
accumulation, probabilities rounded to the input dtype for the second product, as flash attention does.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import NamedTuple

import torch

from braid.runtime.kernels import MAX_COMBINE, SUM_COMBINE, interpreting, power_of_two_at_least, triton_runs_on
from braid.runtime.memory import to_device

try:
    import triton
    import triton.language as tl
except ImportError:  # optional: without triton only the references run
    triton = tl = None

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INDEX_DTYPES = (torch.int32, torch.int64)
EXTEND_BLOCK = 64  # new tokens per tile (BLOCK_M) and keys per step (BLOCK_N; 32 for head_dim > 128)
DECODE_BLOCK_N = 64
MIN_SPLIT_TOKENS = 256  # fewest keys per decode split (a heuristic, not tuned on hardware yet)
MAX_SPLITS = 32
LOG2E = 1.4426950408889634


class ExtendPlan(NamedTuple):
    """Host-built launch metadata for one extend batch, shared by every layer of a forward."""

    tile_req: torch.Tensor  # (num_tiles,) int32: batch index of each tile's request
    tile_start: torch.Tensor  # (num_tiles,) int32: first new token of the tile, within its request
    # (4, B) int32: prefix_lens, extend_lens, extend_starts, shared_lens (cascade; else zeros)
    req_meta: torch.Tensor
    block_m: int
    num_tokens: int
    # cascade: (T,) int32, the request of each new token; None: no cascade
    tok_req: torch.Tensor | None = None


def plan_extend(
    prefix_lens: list[int], extend_lens: list[int], device: torch.device, block_m: int = EXTEND_BLOCK,
    shared_lens: list[int] | None = None,
) -> ExtendPlan:  # fmt: skip
    """Tiles of ``block_m`` new tokens per request, the tiles with the most keys first.

    Cascade: with ``shared_lens``, request ``i``'s first ``shared_lens[i]`` keys (cached, so at
    most its prefix) are left to the prefix pass, which reads them once for every sharer, and
    its tiles start at that key."""
    n = len(extend_lens)
    shared = list(shared_lens) if shared_lens is not None and any(shared_lens) else [0] * n
    assert len(shared) == n and all(0 <= s <= p for s, p in zip(shared, prefix_lens)), (
        f"shared_lens {shared} must be within the cached prefixes {prefix_lens}"
    )
    starts = [0, *itertools.accumulate(extend_lens)][:n]
    tiles = [(i, m) for i, e in enumerate(extend_lens) for m in range(0, e, block_m)]
    tiles.sort(key=lambda t: -(prefix_lens[t[0]] - shared[t[0]] + min(t[1] + block_m, extend_lens[t[0]])))
    as_int32 = functools.partial(to_device, dtype=torch.int32, device=device)
    cascade = any(shared)
    return ExtendPlan(
        tile_req=as_int32([i for i, _ in tiles]),
        tile_start=as_int32([m for _, m in tiles]),
        req_meta=as_int32([list(prefix_lens), list(extend_lens), starts, shared]).reshape(4, n),
        block_m=block_m,
        num_tokens=sum(extend_lens),
        tok_req=as_int32([i for i, e in enumerate(extend_lens) for _ in range(e)]) if cascade else None,
    )


def decode_splits(batch_size: int, num_kv_heads: int, max_keys: int, num_sms: int) -> int:
    """Splits per request: enough (request, KV head, split) programs for about two waves over
    ``num_sms`` SMs, but at least MIN_SPLIT_TOKENS keys per split, and at most MAX_SPLITS."""
    wanted = -(-2 * num_sms // max(1, batch_size * num_kv_heads))
    by_length = -(-max_keys // MIN_SPLIT_TOKENS)
    return max(1, min(wanted, by_length, MAX_SPLITS))


def prefix_splits(batch_size: int, group: int, num_kv_heads: int, prefix_keys: int, num_sms: int,
                  block_m: int = EXTEND_BLOCK) -> int:  # fmt: skip
    """Splits of the cascade's prefix pass: its (row tile, KV head, split) programs fill about
    two waves over ``num_sms`` SMs, with at least MIN_SPLIT_TOKENS keys per split, at most MAX_SPLITS."""
    tiles = -(-batch_size * group // block_m)
    wanted = -(-2 * num_sms // max(1, tiles * num_kv_heads))
    return max(1, min(wanted, -(-prefix_keys // MIN_SPLIT_TOKENS), MAX_SPLITS))


@functools.cache
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 1 elsewhere (the interpreter runs programs one by one)."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


# ---------------------------------------------------------------------------------------- references


def extend_attention_reference(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, req_to_token: torch.Tensor,
    req_rows: torch.Tensor, prefix_lens: list[int], extend_lens: list[int], scale: float,
    sliding_window: int | None,
) -> torch.Tensor:  # fmt: skip
    """The semantics in plain torch, one request at a time, float32 inside: ``(T, Hq, D)`` in q's dtype."""
    group = q.shape[1] // k_cache.shape[1]
    out = torch.empty_like(q)
    start = 0
    for row, prefix, n in zip(req_rows.tolist(), prefix_lens, extend_lens):
        slots = req_to_token[row, : prefix + n]
        keys = k_cache[slots].float().repeat_interleave(group, dim=1)  # (L, Hq, D)
        values = v_cache[slots].float().repeat_interleave(group, dim=1)
        query = q[start : start + n].float()  # (n, Hq, D)
        scores = torch.einsum("qhd,khd->hqk", query, keys) * scale  # (Hq, n, L)
        q_pos = torch.arange(prefix, prefix + n, device=q.device)[:, None]
        k_pos = torch.arange(prefix + n, device=q.device)[None, :]
        allowed = k_pos <= q_pos
        if sliding_window is not None:
            allowed &= k_pos > q_pos - sliding_window
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        out[start : start + n] = torch.einsum("hqk,khd->qhd", probs, values).to(q.dtype)
        start += n
    return out


def decode_attention_reference(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, req_to_token: torch.Tensor,
    req_rows: torch.Tensor, seq_lens: list[int], scale: float, sliding_window: int | None,
) -> torch.Tensor:  # fmt: skip
    """One new token per request (the last of each sequence): the extend semantics with ``n = 1``."""
    prefix_lens = [n - 1 for n in seq_lens]
    return extend_attention_reference(
        q, k_cache, v_cache, req_to_token, req_rows, prefix_lens, [1] * len(seq_lens), scale, sliding_window
    )


# ------------------------------------------------------------------------------------------ wrappers


def extend_attention_triton(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, req_to_token: torch.Tensor,
    req_rows: torch.Tensor, plan: ExtendPlan, scale: float, sliding_window: int | None, prefix_splits: int = 0,
    prefix_block: int = EXTEND_BLOCK,
) -> torch.Tensor:  # fmt: skip
    """The extend kernel: ``(T, Hq, D)`` in q's dtype. Asserts the contract before launch.

    Cascade (a plan with ``shared_lens``): the prefix pass reads the shared keys over
    ``prefix_splits`` splits in tiles of ``prefix_block`` (token, query head) rows, the extend
    kernel the rest, and the reduce merges the two by log-sum-exp. The caller vouches that the
    sharers have the same first slots (checked on the CPU)."""
    _check_common(q, k_cache, v_cache, req_to_token, req_rows, scale, sliding_window)
    meta = plan.req_meta
    assert meta.shape == (4, req_rows.shape[0]), f"plan for {meta.shape[1]} requests, batch has {req_rows.shape[0]}"
    assert meta.device == q.device and plan.tile_req.device == q.device, "plan tensors must be on q's device"
    assert plan.num_tokens == q.shape[0], f"plan covers {plan.num_tokens} tokens, q has {q.shape[0]}"
    block_m = plan.block_m
    assert block_m >= 16 and block_m & (block_m - 1) == 0, f"block_m {block_m} must be a power of two >= 16"
    cascade = plan.tok_req is not None
    if cascade:
        assert sliding_window is None, "cascade attention is for full attention, not a sliding window"
        assert prefix_splits >= 1, f"prefix_splits {prefix_splits} must be >= 1 with a cascade plan"
        assert prefix_block >= 16 and prefix_block & (prefix_block - 1) == 0, (
            f"prefix_block {prefix_block} must be a power of two >= 16"
        )
    if q.device.type == "cpu":  # on the GPU this would sync the device: there the caller vouches for it
        seq_lens = (meta[0] + meta[1]).tolist()
        _check_slots(req_to_token, req_rows, seq_lens, k_cache.shape[0])
        if cascade:
            _check_shared(req_to_token, req_rows, meta[3].tolist(), seq_lens)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    num_tiles = plan.tile_req.shape[0]
    if num_tiles == 0:
        return out
    num_tokens, num_heads, head_dim = q.shape
    block_d = power_of_two_at_least(head_dim, 16)
    fp32_dot = _fp32_dot(q, k_cache)
    # exact float32 dots hold twice the registers: a 64-key block spilled to local memory on an H100
    block_n = min(block_m, EXTEND_BLOCK if block_d <= 128 and not fp32_dot else EXTEND_BLOCK // 2)
    kernels = _kernels(interpreting())
    target = lse_own = out  # without cascade the extend kernel writes the output (and no lse)
    if cascade:  # splits 0 .. prefix_splits - 1: the prefix pass; the last: the extend kernel
        total = prefix_splits + 1
        partial = torch.empty(num_tokens, num_heads, total, head_dim, dtype=torch.float32, device=q.device)
        lse = torch.empty(num_tokens, num_heads, total, dtype=torch.float32, device=q.device)
        _launch_prefix(kernels, q, k_cache, v_cache, partial, lse, req_to_token, req_rows, meta[3], plan.tok_req,
                       scale, prefix_splits, prefix_block, block_n, fp32_dot)  # fmt: skip
        target, lse_own = partial[:, :, prefix_splits], lse[:, :, prefix_splits]
    kernels.extend[(num_tiles, num_heads)](
        q, k_cache, v_cache, target, lse_own, req_to_token, req_rows, plan.tile_req, plan.tile_start, meta,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), req_to_token.stride(0),
        meta.stride(0), target.stride(0), target.stride(1), lse_own.stride(0), lse_own.stride(1),
        scale * LOG2E, sliding_window or 0, num_heads // k_cache.shape[1], head_dim,
        SLIDING=sliding_window is not None, CASCADE=cascade, FP32_DOT=fp32_dot, BLOCK_M=block_m,
        BLOCK_N=block_n, BLOCK_D=block_d, num_warps=4 if block_d <= 128 else 8, num_stages=1 if fp32_dot else 2,
    )  # fmt: skip
    if cascade:
        kernels.reduce[(num_tokens, num_heads)](
            partial, lse, out, out.stride(0), out.stride(1), head_dim, total,
            BLOCK_S=power_of_two_at_least(total), BLOCK_D=block_d, num_warps=4,
        )  # fmt: skip
    return out


def decode_attention_triton(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, req_to_token: torch.Tensor,
    req_rows: torch.Tensor, seq_lens: torch.Tensor, scale: float, sliding_window: int | None,
    num_splits: int, block_n: int = DECODE_BLOCK_N, shared_lens: torch.Tensor | None = None,
    prefix_splits: int = 0, block_m: int = EXTEND_BLOCK,
) -> torch.Tensor:  # fmt: skip
    """The split-K decode kernel (+ the reduce over several splits): ``(B, Hq, D)`` in q's
    dtype, one query per request. Asserts the contract before launch.

    Cascade: with ``shared_lens`` ``(B,)``, request ``i``'s first ``shared_lens[i]`` keys are read
    by a prefix pass over ``prefix_splits`` splits, each key once for every request (tiles of
    ``block_m`` (request, query head) rows), and the decode kernel starts at ``shared_lens[i]``;
    the reduce merges both. The caller vouches that every request with ``shared_lens[i] > 0`` has
    the same first ``shared_lens[i]`` slots as the request with the largest value (checked on the CPU)."""
    _check_common(q, k_cache, v_cache, req_to_token, req_rows, scale, sliding_window)
    batch, num_heads, head_dim = q.shape
    assert seq_lens.shape == (batch,), f"seq_lens shape {tuple(seq_lens.shape)}, expected ({batch},)"
    assert seq_lens.dtype in INDEX_DTYPES, f"seq_lens dtype {seq_lens.dtype}, expected one of {INDEX_DTYPES}"
    assert seq_lens.device == q.device, f"seq_lens on {seq_lens.device}, q on {q.device}"
    assert num_splits >= 1, f"num_splits {num_splits} must be >= 1"
    assert block_n >= 16 and block_n & (block_n - 1) == 0, f"block_n {block_n} must be a power of two >= 16"
    cascade = shared_lens is not None
    if cascade:
        assert sliding_window is None, "cascade attention is for full attention, not a sliding window"
        assert shared_lens.shape == (batch,), f"shared_lens shape {tuple(shared_lens.shape)}, expected ({batch},)"
        assert shared_lens.dtype in INDEX_DTYPES and shared_lens.device == q.device, "shared_lens: int, on q's device"
        assert prefix_splits >= 1, f"prefix_splits {prefix_splits} must be >= 1 with shared_lens"
        assert block_m >= 16 and block_m & (block_m - 1) == 0, f"block_m {block_m} must be a power of two >= 16"
    if q.device.type == "cpu":
        lengths = seq_lens.tolist()
        assert min(lengths, default=1) >= 1, f"seq_lens must be >= 1, got {lengths}"
        _check_slots(req_to_token, req_rows, lengths, k_cache.shape[0])
        if cascade:
            _check_shared(req_to_token, req_rows, shared_lens.tolist(), lengths)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if batch == 0:
        return out
    group = num_heads // k_cache.shape[1]
    block_d = power_of_two_at_least(head_dim, 16)
    total = num_splits + (prefix_splits if cascade else 0)
    single = total == 1
    partial = out if single else torch.empty(batch, num_heads, total, head_dim, dtype=torch.float32,
                                             device=q.device)  # fmt: skip
    lse = torch.empty(batch, num_heads, total, dtype=torch.float32, device=q.device)
    fp32_dot = _fp32_dot(q, k_cache)
    kernels = _kernels(interpreting())
    common = (q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), req_to_token.stride(0),
              partial.stride(0), partial.stride(1), 0 if single else partial.stride(2), scale * LOG2E)  # fmt: skip
    if cascade:
        _launch_prefix(kernels, q, k_cache, v_cache, partial, lse, req_to_token, req_rows, shared_lens, None,
                       scale, prefix_splits, block_m, block_n, fp32_dot)  # fmt: skip
    kernels.decode[(batch, k_cache.shape[1], num_splits)](
        q, k_cache, v_cache, partial, lse, req_to_token, req_rows, seq_lens,
        shared_lens if cascade else seq_lens, *common, sliding_window or 0, group, head_dim, num_splits,
        total - num_splits, total, SLIDING=sliding_window is not None, CASCADE=cascade, FP32_DOT=fp32_dot,
        BLOCK_H=power_of_two_at_least(group, 16), BLOCK_N=block_n, BLOCK_D=block_d, num_warps=4,
        num_stages=1 if fp32_dot else 2,
    )  # fmt: skip
    if not single:
        kernels.reduce[(batch, num_heads)](
            partial, lse, out, out.stride(0), out.stride(1), head_dim, total,
            BLOCK_S=power_of_two_at_least(total), BLOCK_D=block_d, num_warps=4,
        )  # fmt: skip
    return out


def _launch_prefix(
    kernels, q, k_cache, v_cache, partial, lse, req_to_token, req_rows, shared_lens, tok_req, scale, prefix_splits,
    block_m, block_n, fp32_dot,
) -> None:  # fmt: skip
    """The cascade's prefix pass into splits ``0 .. prefix_splits - 1`` of ``partial`` (T, Hq, S, D)
    and ``lse`` (T, Hq, S): q's T tokens over the keys they share, each key read once per KV head
    and split. Decode: token ``t`` is request ``t``; extend: ``tok_req`` (T,) names each token's request."""
    num_tokens, num_heads, head_dim = q.shape
    batch, group = req_rows.shape[0], num_heads // k_cache.shape[1]
    kernels.prefix[(-(-num_tokens * group // block_m), k_cache.shape[1], prefix_splits)](
        q, k_cache, v_cache, partial, lse, req_to_token, req_rows, shared_lens,
        shared_lens if tok_req is None else tok_req,  # not read in decode
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), req_to_token.stride(0),
        partial.stride(0), partial.stride(1), partial.stride(2), scale * LOG2E,
        batch, num_tokens, group, head_dim, prefix_splits, partial.shape[2],
        EXTEND=tok_req is not None, FP32_DOT=fp32_dot, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_D=power_of_two_at_least(head_dim, 16), BLOCK_B=power_of_two_at_least(batch),
        num_warps=4 if block_m <= 64 else 8, num_stages=1 if fp32_dot else 2,
    )  # fmt: skip


def _check_common(q, k_cache, v_cache, req_to_token, req_rows, scale, sliding_window) -> None:
    if triton is None:
        raise RuntimeError("the attention kernels need the triton package; the torch backend runs without it")
    assert triton_runs_on(q.device), f"Triton runs on CUDA, or on the CPU under TRITON_INTERPRET=1; got {q.device}"
    assert q.dim() == 3, f"q must be (T, Hq, D), got shape {tuple(q.shape)}"
    assert k_cache.dim() == 3, f"k_cache must be (slots, Hkv, D), got shape {tuple(k_cache.shape)}"
    assert q.dtype in DTYPES, f"q dtype {q.dtype}, expected one of {DTYPES}"
    assert k_cache.dtype in DTYPES, f"k_cache dtype {k_cache.dtype}, expected one of {DTYPES}"
    assert v_cache.shape == k_cache.shape, f"v_cache shape {tuple(v_cache.shape)} != k_cache {tuple(k_cache.shape)}"
    assert v_cache.dtype == k_cache.dtype, f"v_cache dtype {v_cache.dtype} != k_cache dtype {k_cache.dtype}"
    assert q.shape[2] == k_cache.shape[2], f"head_dim of q {q.shape[2]} != of the KV pool {k_cache.shape[2]}"
    assert q.shape[1] % k_cache.shape[1] == 0, f"{q.shape[1]} query heads not a multiple of {k_cache.shape[1]}"
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("req_to_token", req_to_token), ("req_rows", req_rows)):
        assert t.device == q.device, f"{name} on {t.device}, q on {q.device}"
    assert q.stride(2) == 1, f"q's last dim must be contiguous, strides {q.stride()}"
    assert k_cache.is_contiguous() and v_cache.is_contiguous(), "the KV pool buffers must be contiguous"
    assert req_to_token.dim() == 2 and req_to_token.stride(1) == 1, "req_to_token must be 2-D, rows contiguous"
    assert req_to_token.dtype in INDEX_DTYPES, f"req_to_token dtype {req_to_token.dtype}, expected {INDEX_DTYPES}"
    assert req_rows.dim() == 1 and req_rows.dtype in INDEX_DTYPES, f"req_rows must be 1-D int, got {req_rows.dtype}"
    assert math.isfinite(scale) and scale > 0, f"scale must be a positive number, got {scale}"
    assert sliding_window is None or sliding_window >= 1, f"sliding_window must be None or >= 1, got {sliding_window}"


def _check_slots(req_to_token: torch.Tensor, req_rows: torch.Tensor, seq_lens: list[int], num_slots: int) -> None:
    """Every table entry the kernels will read names a slot of the pool (CPU tensors only)."""
    rows = req_rows.tolist()
    width = req_to_token.shape[1]
    assert all(0 <= r < req_to_token.shape[0] for r in rows), f"req_rows {rows} outside the table's rows"
    for row, n in zip(rows, seq_lens):
        assert 0 <= n <= width, f"a sequence of {n} tokens does not fit the table's {width} columns"
        low, high = (int(x) for x in torch.aminmax(req_to_token[row, :n])) if n else (0, 0)
        assert 0 <= low and high < num_slots, f"row {row} names slots {low}..{high}, the pool has 0..{num_slots - 1}"


def _check_shared(req_to_token: torch.Tensor, req_rows: torch.Tensor, shared: list[int], seq_lens: list[int]) -> None:
    """The cascade's contract (CPU tensors only): each request shares its first ``shared[i]``
    slots with the request of the longest shared prefix, and has a key of its own left."""
    assert all(0 <= s < n for s, n in zip(shared, seq_lens)), f"shared_lens {shared} must be in 0 .. seq_lens - 1"
    if not shared or max(shared) == 0:
        return
    rows = req_rows.tolist()
    ref = req_to_token[rows[shared.index(max(shared))]]
    for row, s in zip(rows, shared):
        assert torch.equal(req_to_token[row, :s], ref[:s]), f"row {row} does not share its first {s} slots"


def _fp32_dot(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    # the interpreter's tl.dot reads bfloat16 operands as integers (triton 3.9): upcast there
    return interpreting() or torch.float32 in (q.dtype, k_cache.dtype)


class _Kernels(NamedTuple):
    extend: object
    decode: object
    prefix: object
    reduce: object


@functools.cache
def _kernels(interpret: bool) -> _Kernels:
    # ``interpret`` is only the cache key: triton.jit reads the mode itself
    return _Kernels(*(triton.jit(k) for k in (_extend_kernel, _decode_kernel, _prefix_kernel, _reduce_kernel)))


# ------------------------------------------------------------------------------------------- kernels


def _extend_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr,  # q (T, Hq, D) any token/head strides; k/v (S, Hkv, D); out (T, Hq, D)
    table_ptr, rows_ptr, tile_req_ptr, tile_start_ptr, meta_ptr,
    stride_qt, stride_qh, stride_ks, stride_kh, stride_table, stride_meta, stride_ot, stride_oh, stride_lt, stride_lh,
    qk_scale, window, group, head_dim,
    SLIDING: tl.constexpr, CASCADE: tl.constexpr, FP32_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    # CASCADE: keys from the request's shared length on (the prefix pass read those); out is then
    # this split's float32 partial, and lse (T, Hq) its log-sum-exp, for the reduce
    tile, head = tl.program_id(0), tl.program_id(1)
    req = tl.load(tile_req_ptr + tile)
    m0 = tl.load(tile_start_ptr + tile)
    prefix = tl.load(meta_ptr + req)
    n_new = tl.load(meta_ptr + stride_meta + req)
    first_row = tl.load(meta_ptr + 2 * stride_meta + req)
    table_row = tl.load(rows_ptr + req).to(tl.int64) * stride_table
    kv_head = head // group

    offs_m = m0 + tl.arange(0, BLOCK_M)  # (M,) new-token index within the request
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < n_new
    d_valid = offs_d < head_dim
    q_pos = prefix + offs_m  # (M,) sequence position of each query
    q_off = (first_row + offs_m).to(tl.int64)[:, None] * stride_qt + head * stride_qh + offs_d[None, :]
    q = tl.load(q_ptr + q_off, mask=m_valid[:, None] & d_valid[None, :], other=0.0)  # (M, D)

    k_end = prefix + tl.minimum(m0 + BLOCK_M, n_new)  # one past the tile's last query position
    k_begin = 0
    if SLIDING:
        k_begin = tl.maximum(prefix + m0 - window + 1, 0)
    if CASCADE:
        k_begin = tl.load(meta_ptr + 3 * stride_meta + req)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.full((BLOCK_M,), 0.0, tl.float32)
    acc = tl.full((BLOCK_M, BLOCK_D), 0.0, tl.float32)
    for n0 in range(k_begin, k_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_valid = offs_n < k_end
        slots = tl.load(table_ptr + table_row + offs_n, mask=n_valid, other=0).to(tl.int64)
        kv_off = slots * stride_ks + kv_head * stride_kh
        kt = tl.load(k_ptr + kv_off[None, :] + offs_d[:, None], mask=n_valid[None, :] & d_valid[:, None], other=0.0)
        v = tl.load(v_ptr + kv_off[:, None] + offs_d[None, :], mask=n_valid[:, None] & d_valid[None, :], other=0.0)
        allowed = n_valid[None, :] & (offs_n[None, :] <= q_pos[:, None])
        if SLIDING:
            allowed &= offs_n[None, :] > q_pos[:, None] - window
        if FP32_DOT:
            scores = tl.dot(q.to(tl.float32), kt.to(tl.float32), input_precision="ieee")
        else:
            scores = tl.dot(q, kt.to(q.dtype))
        # online softmax in base 2; a row that has seen no allowed key keeps max -inf and adds nothing
        scores = tl.where(allowed, scores * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.reduce(scores, 1, MAX_COMBINE))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(scores - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.reduce(p, 1, SUM_COMBINE)
        if FP32_DOT:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype))
        m_i = m_new

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    rows = (first_row + offs_m).to(tl.int64)
    out_off = rows[:, None] * stride_ot + head * stride_oh
    tl.store(out_ptr + out_off + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=m_valid[:, None] & d_valid[None, :])  # fmt: skip
    if CASCADE:  # every query sees at least itself: l_i > 0 on valid rows
        tl.store(lse_ptr + rows * stride_lt + head * stride_lh, m_i + tl.log2(tl.where(l_i == 0.0, 1.0, l_i)),
                 mask=m_valid)  # fmt: skip


def _decode_kernel(
    q_ptr, k_ptr, v_ptr, part_ptr, lse_ptr,  # q (B, Hq, D); part (B, Hq, S, D) f32, or out when S == 1
    table_ptr, rows_ptr, seq_lens_ptr, shared_ptr,  # shared (B,): keys the cascade's prefix pass covers
    stride_qb, stride_qh, stride_ks, stride_kh, stride_table,
    stride_pb, stride_ph, stride_ps,
    qk_scale, window, group, head_dim, num_splits, split_base, total_splits,
    SLIDING: tl.constexpr, CASCADE: tl.constexpr, FP32_DOT: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    req, kv_head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + req).to(tl.int32)
    table_row = tl.load(rows_ptr + req).to(tl.int64) * stride_table
    k_begin = 0
    if SLIDING:
        k_begin = tl.maximum(seq_len - window, 0)
    if CASCADE:  # the prefix pass attended keys 0 .. shared - 1
        k_begin = tl.load(shared_ptr + req).to(tl.int32)
    per_split = ((seq_len - k_begin + num_splits - 1) // num_splits + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    lo = k_begin + split * per_split
    hi = tl.minimum(lo + per_split, seq_len)

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    heads = kv_head * group + offs_h  # (H,) the query heads of this KV head
    h_valid = offs_h < group
    d_valid = offs_d < head_dim
    q_off = req.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptr + q_off, mask=h_valid[:, None] & d_valid[None, :], other=0.0)  # (H, D)

    m_i = tl.full((BLOCK_H,), float("-inf"), tl.float32)
    l_i = tl.full((BLOCK_H,), 0.0, tl.float32)
    acc = tl.full((BLOCK_H, BLOCK_D), 0.0, tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_valid = offs_n < hi
        slots = tl.load(table_ptr + table_row + offs_n, mask=n_valid, other=0).to(tl.int64)
        kv_off = slots * stride_ks + kv_head * stride_kh
        kt = tl.load(k_ptr + kv_off[None, :] + offs_d[:, None], mask=n_valid[None, :] & d_valid[:, None], other=0.0)
        v = tl.load(v_ptr + kv_off[:, None] + offs_d[None, :], mask=n_valid[:, None] & d_valid[None, :], other=0.0)
        allowed = n_valid[None, :] & h_valid[:, None]
        if FP32_DOT:
            scores = tl.dot(q.to(tl.float32), kt.to(tl.float32), input_precision="ieee")
        else:
            scores = tl.dot(q, kt.to(q.dtype))
        # online softmax in base 2; a row that has seen no allowed key keeps max -inf and adds nothing
        scores = tl.where(allowed, scores * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.reduce(scores, 1, MAX_COMBINE))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(scores - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.reduce(p, 1, SUM_COMBINE)
        if FP32_DOT:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype))
        m_i = m_new

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    slot = split_base + split  # the prefix pass's splits come first
    part_off = req.to(tl.int64) * stride_pb + heads[:, None] * stride_ph + slot * stride_ps + offs_d[None, :]
    # an empty split of several writes only its lse (-inf): the reduce does not read its partial
    written = h_valid & (l_i > (-1.0 if total_splits == 1 else 0.0))
    tl.store(part_ptr + part_off, out.to(part_ptr.dtype.element_ty), mask=written[:, None] & d_valid[None, :])
    # base 2, as the scores; -inf for an empty split, which the reduce then weighs 0
    lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(tl.where(l_i == 0.0, 1.0, l_i)))
    lse_off = (req * tl.num_programs(1) * group + heads) * total_splits + slot
    tl.store(lse_ptr + lse_off, lse, mask=h_valid)


def _prefix_kernel(
    q_ptr, k_ptr, v_ptr, part_ptr, lse_ptr,  # q (T, Hq, D); part (T, Hq, S, D) f32; lse (T, Hq, S) f32
    table_ptr, rows_ptr, shared_ptr,  # shared (B,): keys of each request this pass attends, 0 = none
    tok_req_ptr,  # EXTEND: (T,) the request of each query token; decode: token t is request t (T == B)
    stride_qb, stride_qh, stride_ks, stride_kh, stride_table,
    stride_pb, stride_ph, stride_ps,
    qk_scale, batch, num_tokens, group, head_dim, num_splits, total_splits,
    EXTEND: tl.constexpr, FP32_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_B: tl.constexpr,
):  # fmt: skip
    # rows are (query token, query head of this KV head) pairs, token-major: row r is token
    # r // group, query head kv_head * group + r % group; every row reads the same keys (all of
    # them precede every new token, so no causal mask applies here)
    tile, kv_head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_b = tl.arange(0, BLOCK_B)
    shared_all = tl.load(shared_ptr + offs_b, mask=offs_b < batch, other=0).to(tl.int32)
    prefix = tl.reduce(shared_all, 0, MAX_COMBINE)
    # the keys are read through the row of a request sharing the longest prefix (the others share it)
    ref = tl.reduce(tl.where((shared_all == prefix) & (offs_b < batch), offs_b, 0), 0, MAX_COMBINE)
    table_row = tl.load(rows_ptr + ref).to(tl.int64) * stride_table
    per_split = ((prefix + num_splits - 1) // num_splits + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    lo = split * per_split

    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < num_tokens * group
    d_valid = offs_d < head_dim
    tok = offs_m // group
    if EXTEND:
        req = tl.load(tok_req_ptr + tok, mask=m_valid, other=0)
    else:
        req = tok
    heads = kv_head * group + offs_m % group
    mine = tl.load(shared_ptr + req, mask=m_valid, other=0).to(tl.int32)  # (M,) keys each row may see
    # a tile of non-sharers reads nothing
    hi = tl.minimum(tl.minimum(lo + per_split, prefix), tl.reduce(mine, 0, MAX_COMBINE))
    q_off = tok.to(tl.int64)[:, None] * stride_qb + heads[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptr + q_off, mask=m_valid[:, None] & d_valid[None, :], other=0.0)  # (M, D)

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.full((BLOCK_M,), 0.0, tl.float32)
    acc = tl.full((BLOCK_M, BLOCK_D), 0.0, tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_valid = offs_n < hi
        slots = tl.load(table_ptr + table_row + offs_n, mask=n_valid, other=0).to(tl.int64)
        kv_off = slots * stride_ks + kv_head * stride_kh
        kt = tl.load(k_ptr + kv_off[None, :] + offs_d[:, None], mask=n_valid[None, :] & d_valid[:, None], other=0.0)
        v = tl.load(v_ptr + kv_off[:, None] + offs_d[None, :], mask=n_valid[:, None] & d_valid[None, :], other=0.0)
        allowed = n_valid[None, :] & (offs_n[None, :] < mine[:, None])
        if FP32_DOT:
            scores = tl.dot(q.to(tl.float32), kt.to(tl.float32), input_precision="ieee")
        else:
            scores = tl.dot(q, kt.to(q.dtype))
        scores = tl.where(allowed, scores * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.reduce(scores, 1, MAX_COMBINE))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(scores - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.reduce(p, 1, SUM_COMBINE)
        if FP32_DOT:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype))
        m_i = m_new

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    part_off = tok.to(tl.int64)[:, None] * stride_pb + heads[:, None] * stride_ph + split * stride_ps + offs_d[None, :]
    tl.store(part_ptr + part_off, out, mask=(m_valid & (l_i > 0.0))[:, None] & d_valid[None, :])
    lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(tl.where(l_i == 0.0, 1.0, l_i)))
    lse_off = (tok.to(tl.int64) * tl.num_programs(1) * group + heads) * total_splits + split
    tl.store(lse_ptr + lse_off, lse, mask=m_valid)


def _reduce_kernel(
    part_ptr, lse_ptr, out_ptr,  # part (B, Hq, S, D) f32 contiguous, lse (B, Hq, S) f32, out (B, Hq, D)
    stride_ob, stride_oh, head_dim, num_splits,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    req, head = tl.program_id(0), tl.program_id(1)
    row = req.to(tl.int64) * tl.num_programs(1) + head
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_valid = offs_s < num_splits
    d_valid = offs_d < head_dim
    lse = tl.load(lse_ptr + row * num_splits + offs_s, mask=s_valid, other=float("-inf"))
    top = tl.reduce(lse, 0, MAX_COMBINE)
    weights = tl.exp2(lse - tl.where(top == float("-inf"), 0.0, top))  # (S,), 0 for empty splits
    part_off = (row * num_splits + offs_s[:, None]) * head_dim + offs_d[None, :]
    # empty splits (lse -inf, weight 0) wrote no partial: not read
    filled = s_valid & (lse > float("-inf"))
    part = tl.load(part_ptr + part_off, mask=filled[:, None] & d_valid[None, :], other=0.0)  # (S, D)
    total = tl.reduce(weights, 0, SUM_COMBINE)
    out = tl.reduce(part * weights[:, None], 0, SUM_COMBINE) / tl.where(total == 0.0, 1.0, total)
    out_off = req.to(tl.int64) * stride_ob + head * stride_oh + offs_d
    tl.store(out_ptr + out_off, out.to(out_ptr.dtype.element_ty), mask=d_valid)
