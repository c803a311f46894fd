"""Attention backends: the contract every backend meets, the registry, the torch reference and
the Triton backend.

A backend turns one layer's new-token q/k/v into attention outputs, reading the cached
prefix of each request from the KV pool. Backends are stateless between forwards except
for what they choose to precompute per batch; the model owns nothing of the KV memory.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from braid.errors import InvalidRequestError, MissingPackageError
from braid.registry import Registry
from braid.runtime import kernels
from braid.runtime.forward_batch import ForwardBatch, ForwardMode
from braid.runtime.kernels import attention as attention_kernels
from braid.runtime.kernels.kv_store import store_kv_triton
from braid.runtime.memory import to_device
from braid.runtime.memory import KVPool


class AttentionBackend:
    """Contract of ``forward(layer, q, k, v, batch, kv, scale, sliding_window)``:

    - ``q`` is ``(T, Hq, D)``, ``k`` and ``v`` are ``(T, Hkv, D)`` for the batch's T new tokens,
      packed request after request (``batch.extend_lens_cpu``); ``Hq % Hkv == 0`` (GQA: query
      head ``h`` reads KV head ``h // (Hq // Hkv)``).
    - It first writes ``k``/``v`` into ``kv`` at ``batch.out_slots`` for ``layer``; this is the
      only thing it mutates.
    - The caller has already written every token's slot into the request table:
      ``batch.req_to_token[req_rows[i], :seq_lens[i]]`` lists request ``i``'s KV slots for its
      cached prefix *and* its new tokens, in order.
    - Each new token attends causally to its request's sequence up to and including itself.
      With ``sliding_window = W``, a token at position ``p`` sees only keys at ``p - W < j <= p``.
    - Scores are multiplied by ``scale``. Returns ``(T, Hq, D)`` in ``q``'s dtype.

    ``uses_kernels(device)`` tells the model whether to run its norms, RoPE and activation
    through the Triton kernels (``braid.runtime.kernels``) in the same forward; the torch
    reference layers otherwise.
    """

    def uses_kernels(self, device: torch.device) -> bool:
        return False

    def forward(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        batch: ForwardBatch,
        kv: KVPool,
        scale: float,
        sliding_window: int | None,
    ) -> torch.Tensor:
        raise NotImplementedError


ATTENTION_BACKENDS: Registry[AttentionBackend] = Registry("attention backend")


def create_attention_backend(name: str, **kwargs) -> AttentionBackend:
    """Build the backend registered as ``name``; UnknownNameError lists the known ones.
    Backends with optional dependencies import them inside their factory."""
    return ATTENTION_BACKENDS.create(name, **kwargs)


def resolve_attention_backend(name: str, device: torch.device) -> str:
    """The backend ``name`` (a config value) stands for on ``device``: ``auto`` is ``triton`` on
    CUDA when triton imports, ``torch`` otherwise. ``triton`` where its kernels cannot run raises
    MissingPackageError (no triton) or InvalidRequestError (CPU without ``TRITON_INTERPRET=1``)."""
    if name == "auto":
        return "triton" if device.type == "cuda" and kernels.triton is not None else "torch"
    if name == "triton" and kernels.triton is None:
        raise MissingPackageError("attention_backend=triton", "pip install triton")
    if name == "triton" and not kernels.triton_runs_on(device):
        raise InvalidRequestError(
            "attention_backend", f"triton runs on CUDA, or on the CPU only under TRITON_INTERPRET=1; device is {device}"
        )
    return name


@ATTENTION_BACKENDS.register("torch")
class TorchAttention(AttentionBackend):
    """Reference backend on ``scaled_dot_product_attention``. Requests are padded into one
    ``(B, n_max)`` x ``(B, L_max)`` SDPA call per layer: the whole batch when that at most
    doubles the work (always in DECODE, where n_max = 1); otherwise requests of similar size
    are grouped into buckets that each pass that test, and a request alone takes its own call.
    (One call per request was the bottleneck of select and fork batches: hundreds of short
    extends over long cached prefixes, i.e. thousands of launches per layer.) A batch whose
    requests share a cached prefix (``batch.shared_lens``: decode, or extends of similar length
    such as select's choices) gathers the prefix's K/V once for all of them instead of once per
    request (:func:`_cascade_attention`)."""

    def forward(self, layer, q, k, v, batch, kv, scale, sliding_window):
        kv.store(layer, batch.out_slots, k, v)
        group = q.shape[1] // k.shape[1]
        if sliding_window is None and _cascade_pays(batch):
            if "cascade" not in batch.attn_memo:
                batch.attn_memo["cascade"] = _cascade_plan(batch, group)
            return _cascade_attention(layer, q, kv, scale, batch.attn_memo["cascade"])
        if batch.mode is ForwardMode.DECODE or _padding_pays(batch):
            key = ("padded", sliding_window, group)
            if key not in batch.attn_memo:
                batch.attn_memo[key] = _padded_plan(batch, sliding_window, group)
            return _padded_attention(layer, q, kv, scale, batch.attn_memo[key])
        key = ("buckets", sliding_window, group)
        if key not in batch.attn_memo:
            batch.attn_memo[key] = _bucket_plans(batch, sliding_window, group)
        singles, padded = batch.attn_memo[key]
        out = torch.empty_like(q)
        for plan, dest_rows in padded:
            out.index_copy_(0, dest_rows, _padded_attention(layer, q, kv, scale, plan))
        self._extend_loop(layer, q, kv, scale, singles, out)
        return out

    @staticmethod
    def _extend_loop(layer, q, kv, scale, plan, out) -> None:
        for start, n, slots, mask in plan:
            keys = kv.k[layer][slots].transpose(0, 1)  # (Hkv, L, D)
            values = kv.v[layer][slots].transpose(0, 1)
            query = q[start : start + n].transpose(0, 1)  # (Hq, n, D)
            o = F.scaled_dot_product_attention(
                query, keys.to(q.dtype), values.to(q.dtype), attn_mask=mask,
                is_causal=mask is None, scale=scale, enable_gqa=True,
            )  # fmt: skip
            out[start : start + n] = o.transpose(0, 1)


# the Triton extend cascade's float32 partials: tokens x query heads x (splits + 1) x head_dim
EXTEND_CASCADE_MAX_TOKENS = 4096


@ATTENTION_BACKENDS.register("triton")
class TritonAttention(AttentionBackend):
    """The Triton kernels of ``kernels/attention.py``: new K/V stored by the kv-store kernel, then
    the extend kernel (tiles of new tokens over their cached prefix) or, in DECODE, the split-K
    decode kernel; either runs with the cascade's prefix pass when the batch shares a prefix
    (``batch.shared_lens``; extends only where it pays, :meth:`_extend_plan`). Tiles and split
    counts are computed once per forward (``batch.attn_memo``) from the host-side lengths (under a
    CUDA graph, from ``batch.decode_max_keys``), so no layer syncs the device. Runs on CUDA, and on
    the CPU under ``TRITON_INTERPRET=1`` (tests); with it the model also runs its fused kernels.
    ``extend_block`` / ``decode_block`` are the kernels' key-block sizes (small ones for tests)."""

    def __init__(
        self, extend_block: int = attention_kernels.EXTEND_BLOCK, decode_block: int = attention_kernels.DECODE_BLOCK_N
    ) -> None:
        self.extend_block = extend_block
        self.decode_block = decode_block

    def uses_kernels(self, device: torch.device) -> bool:
        return kernels.triton_runs_on(device)

    def forward(self, layer, q, k, v, batch, kv, scale, sliding_window):
        k_cache, v_cache = kv.k[layer], kv.v[layer]
        store_kv_triton(k_cache, v_cache, batch.out_slots, k, v)
        if batch.mode is ForwardMode.DECODE:
            cascade = batch.shared_lens is not None and sliding_window is None
            key = ("triton-splits", sliding_window, cascade)
            if key not in batch.attn_memo:
                batch.attn_memo[key] = self._decode_splits(batch, q.shape[1] // k.shape[1], k.shape[1],
                                                           sliding_window, cascade, q.device)  # fmt: skip
            splits, prefix_splits = batch.attn_memo[key]
            return attention_kernels.decode_attention_triton(
                q, k_cache, v_cache, batch.req_to_token, batch.req_rows, batch.seq_lens, scale, sliding_window,
                num_splits=splits, block_n=self.decode_block, shared_lens=batch.shared_lens if cascade else None,
                prefix_splits=prefix_splits, block_m=self.extend_block,
            )  # fmt: skip
        cascade = batch.shared_lens_cpu is not None and sliding_window is None
        key = ("triton-tiles", cascade)
        if key not in batch.attn_memo:
            batch.attn_memo[key] = self._extend_plan(batch, q.shape[1] // k.shape[1], k.shape[1], cascade, q.device)
        plan, prefix_splits = batch.attn_memo[key]
        return attention_kernels.extend_attention_triton(
            q, k_cache, v_cache, batch.req_to_token, batch.req_rows, plan, scale, sliding_window, prefix_splits,
            self.extend_block,
        )

    def _extend_plan(self, batch, group, num_kv_heads, cascade, device) -> tuple[attention_kernels.ExtendPlan, int]:
        """(tiles, prefix-pass splits: 0 without cascade) for an EXTEND batch. Cascade is used only
        where the sharers' tiles would be at least half empty (short extends: select's choices, fork
        branches), the sharers hold at least half of the batch's tokens, and the batch has at most
        EXTEND_CASCADE_MAX_TOKENS: it reads the prefix once, but does the same score work as full
        tiles and gives every token of the batch a float32 partial per split and a reduce."""
        shared = batch.shared_lens_cpu if cascade else None
        if shared is not None:
            block = self.extend_block
            own = [n for n, s in zip(batch.extend_lens_cpu, shared) if s]
            half_empty = sum(-(-n // block) * block for n in own) >= 2 * sum(own)
            if not half_empty or 2 * sum(own) < batch.num_tokens or batch.num_tokens > EXTEND_CASCADE_MAX_TOKENS:
                shared = None
        plan = attention_kernels.plan_extend(batch.prefix_lens_cpu, batch.extend_lens_cpu, device,
                                             self.extend_block, shared)  # fmt: skip
        if plan.tok_req is None:
            return plan, 0
        sms = attention_kernels.num_sms(device)
        return plan, attention_kernels.prefix_splits(batch.num_tokens, group, num_kv_heads, max(shared), sms,
                                                     self.extend_block)  # fmt: skip

    def _decode_splits(self, batch, group, num_kv_heads, window, cascade, device) -> tuple[int, int]:
        """(decode splits, prefix-pass splits) for the batch's lengths on the host, or, under a
        CUDA graph, for sequences and shared prefixes up to ``decode_max_keys``."""
        sms = attention_kernels.num_sms(device)
        bound = batch.decode_max_keys
        if not cascade:
            longest = bound or max(batch.seq_lens_cpu)
            keys = min(longest, window or longest)
            return attention_kernels.decode_splits(batch.batch_size, num_kv_heads, keys, sms), 0
        shared = batch.shared_lens_cpu
        own = bound or max(n - s for n, s in zip(batch.seq_lens_cpu, shared))
        prefix = bound or max(shared)
        return (attention_kernels.decode_splits(batch.batch_size, num_kv_heads, own, sms),
                attention_kernels.prefix_splits(batch.batch_size, group, num_kv_heads, prefix, sms, self.extend_block))


def _padding_pays(batch: ForwardBatch) -> bool:
    """Pad an EXTEND batch into one call only when that at most doubles queries and keys."""
    bsz = batch.batch_size
    if bsz == 1:
        return False
    return (bsz * max(batch.extend_lens_cpu) <= 2 * batch.num_tokens
            and bsz * max(batch.seq_lens_cpu) <= 2 * sum(batch.seq_lens_cpu))


def _buckets(batch: ForwardBatch) -> list[list[int]]:
    """Requests with new tokens in groups (by extend length, then length) such that padding a
    group to its longest member at most doubles its attention work (queries x keys)."""
    ext, seq = batch.extend_lens_cpu, batch.seq_lens_cpu
    order = sorted((i for i in range(batch.batch_size) if ext[i]), key=lambda i: (ext[i], seq[i]))
    buckets: list[list[int]] = []
    work = max_seq = 0
    for i in order:  # ascending extend length: the newest member has the longest extend
        if buckets and (len(buckets[-1]) + 1) * ext[i] * max(max_seq, seq[i]) <= 2 * (work + ext[i] * seq[i]):
            buckets[-1].append(i)
            work, max_seq = work + ext[i] * seq[i], max(max_seq, seq[i])
        else:
            buckets.append([i])
            work, max_seq = ext[i] * seq[i], seq[i]
    return buckets


def _bucket_plans(batch: ForwardBatch, window: int | None, group: int):
    """(per-request plan of the requests alone in their bucket, [(padded plan, packed rows)])."""
    starts = batch.extend_starts_cpu
    singles, padded = [], []
    for bucket in _buckets(batch):
        if len(bucket) == 1:
            singles.append(bucket[0])
            continue
        rows = [starts[i] + j for i in bucket for j in range(batch.extend_lens_cpu[i])]
        dest = to_device(rows, torch.int64, batch.input_ids.device)
        padded.append((_padded_plan(batch, window, group, bucket), dest))
    return _extend_plan(batch, window, singles), padded


class PaddedPlan(NamedTuple):
    """Indices and mask shared by every layer of one forward for a padded SDPA call."""

    q_rows: torch.Tensor | None  # (B*n,) packed row of each padded query; None: identity (decode)
    out_rows: torch.Tensor | None  # (T,) padded row of each real query; None: identity (decode)
    kv_idx: torch.Tensor  # (B*L,) KV slot of each padded key; padding reads the zeroed slot 0
    mask: torch.Tensor  # (B, 1, G * n, L) bool, True = may attend; (B, 1, 1, L) in decode
    n_max: int
    l_max: int


def _padded_plan(batch: ForwardBatch, window: int | None, group: int, idx: list[int] | None = None) -> PaddedPlan:
    """The plan for requests ``idx`` of the batch (all of them when None), in that order."""
    dev = batch.input_ids.device
    t = lambda xs: to_device(xs, torch.int64, dev)  # noqa: E731
    sel = range(batch.batch_size) if idx is None else idx
    ext_l = [batch.extend_lens_cpu[i] for i in sel]
    seq_l = [batch.seq_lens_cpu[i] for i in sel]
    all_starts = batch.extend_starts_cpu
    n_max, l_max = max(ext_l), max(seq_l)
    ext, starts = t(ext_l), t([all_starts[i] for i in sel])
    pre = t([batch.prefix_lens_cpu[i] for i in sel])
    seq_lens = batch.seq_lens if idx is None else t(seq_l)
    req_rows = batch.req_rows if idx is None else batch.req_rows[t(idx)]
    i = torch.arange(n_max, device=dev)
    j = torch.arange(l_max, device=dev)
    q_valid = i[None, :] < ext[:, None]  # (B, n)
    q_rows = (starts[:, None] + i[None, :]).masked_fill(~q_valid, 0)
    q_pos = pre[:, None] + i[None, :]  # (B, n) position of each query
    k_valid = j[None, :] < seq_lens[:, None]  # (B, L)
    mask = (j[None, None, :] <= q_pos[:, :, None]) & k_valid[:, None, :]
    if window is not None:
        mask &= j[None, None, :] > q_pos[:, :, None] - window
    mask |= ~q_valid[:, :, None] & (j == 0)[None, None, :]  # padded queries see one key: no NaN
    kv_idx = batch.req_to_token[req_rows, :l_max].masked_fill(~k_valid, 0)
    bsz = mask.shape[0]
    if n_max == 1 and idx is None:  # decode: one query per request, nothing to gather or drop
        return PaddedPlan(None, None, kv_idx.reshape(-1), mask[:, None], n_max, l_max)
    # the G query heads of a KV head are G x n query positions (see _padded_attention)
    mask = mask[:, None, None].expand(bsz, 1, group, n_max, l_max).reshape(bsz, 1, group * n_max, l_max)
    # real rows computed on the host from the lengths: a boolean index would sync the device
    out_rows = t([b * n_max + i for b, n in enumerate(ext_l) for i in range(n)])
    return PaddedPlan(q_rows.reshape(-1), out_rows, kv_idx.reshape(-1), mask, n_max, l_max)


def _padded_attention(layer: int, q: torch.Tensor, kv: KVPool, scale: float, plan: PaddedPlan) -> torch.Tensor:
    bsz, n_max, l_max = plan.mask.shape[0], plan.n_max, plan.l_max
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = kv.k[layer].shape[1]
    group = num_q_heads // num_kv_heads
    keys = kv.k[layer].index_select(0, plan.kv_idx).view(bsz, l_max, num_kv_heads, head_dim)
    values = kv.v[layer].index_select(0, plan.kv_idx).view(bsz, l_max, num_kv_heads, head_dim)
    keys = keys.to(q.dtype).transpose(1, 2)  # (B, Hkv, L, D)
    values = values.to(q.dtype).transpose(1, 2)
    # The G query heads sharing a KV head become G x n "query positions" of that head, so GQA
    # needs no repeated K/V and any SDPA kernel that takes a mask can run it.
    query = q if plan.q_rows is None else q.index_select(0, plan.q_rows)
    query = query.view(bsz, n_max, num_kv_heads, group, head_dim)
    query = query.permute(0, 2, 3, 1, 4).reshape(bsz, num_kv_heads, group * n_max, head_dim)
    o = F.scaled_dot_product_attention(query, keys, values, attn_mask=plan.mask, scale=scale)
    o = o.view(bsz, num_kv_heads, group, n_max, head_dim).permute(0, 3, 1, 2, 4)  # (B, n, Hkv, G, D)
    o = o.reshape(bsz * n_max, num_q_heads, head_dim)
    return o if plan.out_rows is None else o.index_select(0, plan.out_rows)


# torch's CPU flash attention, which also returns the log-sum-exp that merging two key sets needs
# (a private op: where a torch build lacks it, the generic cascade runs).
_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


class CascadePlan(NamedTuple):
    """Gather indices and masks of a batch sharing a prefix (cascade), shared by every layer."""

    prefix_slots: torch.Tensor  # (P,) KV slots of the longest shared prefix
    prefix_mask: torch.Tensor  # (B, P) bool: request i sees the first shared_lens[i] of them
    own_idx: torch.Tensor  # (B * L,) KV slot of each request's own keys, padded with slot 0
    own_mask: torch.Tensor  # (B, n, L) bool: the own keys each (padded) new token may see
    q_rows: torch.Tensor | None  # (B * n,) packed row of each padded query; None: decode (n = 1)
    out_rows: torch.Tensor | None  # (T,) padded row of each real query; None: decode
    sharers: torch.Tensor | None  # requests that share all P keys, when every other shares none
    own_bias: torch.Tensor | None  # (B, 1, G * n, L) float own_mask for the fused CPU path; None: generic


def _cascade_pays(batch: ForwardBatch) -> bool:
    """Cascade (shared lengths given, full attention) where padding the new tokens to the
    longest extend at most doubles them, as the padded plan requires."""
    if batch.shared_lens is None or not max(batch.shared_lens_cpu):
        return False
    ext = batch.extend_lens_cpu
    return batch.mode is ForwardMode.DECODE or (min(ext) >= 1 and batch.batch_size * max(ext) <= 2 * batch.num_tokens)


def _cascade_plan(batch: ForwardBatch, group: int) -> CascadePlan:
    """The plan for a batch whose ``G = group`` query heads share each KV head."""
    shared, ext = batch.shared_lens_cpu, batch.extend_lens_cpu
    longest, n_max = max(shared), max(ext)
    dev = batch.input_ids.device
    t = lambda xs: to_device(xs, torch.int64, dev)  # noqa: E731
    prefix_slots = batch.req_to_token[batch.req_rows[shared.index(longest)], :longest]
    prefix_mask = torch.arange(longest, device=dev)[None, :] < batch.shared_lens[:, None]
    own_max = max(n - s for n, s in zip(batch.seq_lens_cpu, shared))
    cols = batch.shared_lens[:, None] + torch.arange(own_max, device=dev)[None, :]  # (B, L) key positions
    key_valid = cols < batch.seq_lens[:, None]
    own_idx = batch.req_to_token[batch.req_rows[:, None], cols.clamp(max=batch.req_to_token.shape[1] - 1)]
    own_idx = own_idx.masked_fill(~key_valid, 0).reshape(-1)
    # all-or-nothing sharing (what SharedPrefixes gives): the fused CPU path can skip the prefix mask
    sharers = t([i for i, s in enumerate(shared) if s]) if set(shared) <= {0, longest} else None
    if batch.mode is ForwardMode.DECODE:  # one query, the last position: it sees every valid key
        own_mask, q_rows, out_rows = key_valid[:, None, :], None, None
    else:
        q_pos = t(batch.prefix_lens_cpu)[:, None] + torch.arange(n_max, device=dev)[None, :]  # (B, n)
        own_mask = key_valid[:, None, :] & (cols[:, None, :] <= q_pos[:, :, None])  # causal among new tokens
        starts = batch.extend_starts_cpu
        q_rows = t([starts[b] + min(i, n - 1) for b, n in enumerate(ext) for i in range(n_max)])
        out_rows = t([b * n_max + i for b, n in enumerate(ext) for i in range(n)])
    own_bias = None
    if dev.type == "cpu" and _CPU_FLASH is not None and sharers is not None:  # once, not per layer
        bsz, n, own = own_mask.shape
        own_bias = torch.zeros(own_mask.shape).masked_fill_(~own_mask, float("-inf"))
        own_bias = own_bias[:, None, None].expand(bsz, 1, group, n, own).reshape(bsz, 1, group * n, own)
    return CascadePlan(prefix_slots, prefix_mask, own_idx, own_mask, q_rows, out_rows, sharers, own_bias)


def _cascade_attention(layer: int, q: torch.Tensor, kv: KVPool, scale: float, plan: CascadePlan) -> torch.Tensor:
    """The cascade: the fused CPU path where it applies, the generic one (its reference) elsewhere."""
    if plan.own_bias is not None:
        return _cascade_attention_cpu(layer, q, kv, scale, plan)
    return _cascade_attention_generic(layer, q, kv, scale, plan)


def _cascade_inputs(layer: int, q: torch.Tensor, kv: KVPool, plan: CascadePlan):
    """Both paths' operands, float32: the queries ``(B, Hkv, G * n, D)`` (the G query heads of a
    KV head and the n new tokens are its rows) and each request's own keys and values
    ``(B, Hkv, L, D)``."""
    bsz, n_own = plan.own_mask.shape[0], plan.own_mask.shape[2]
    num_kv_heads, head_dim = kv.k[layer].shape[1], q.shape[2]
    query = q if plan.q_rows is None else q.index_select(0, plan.q_rows)
    n = query.shape[0] // bsz
    query = query.float().view(bsz, n, num_kv_heads, -1, head_dim).permute(0, 2, 3, 1, 4)
    query = query.reshape(bsz, num_kv_heads, -1, head_dim)
    k_own, v_own = (pool[layer].index_select(0, plan.own_idx).view(bsz, n_own, num_kv_heads, head_dim).float()
                    .transpose(1, 2) for pool in (kv.k, kv.v))  # fmt: skip
    return query, k_own, v_own


def _cascade_output(out: torch.Tensor, q: torch.Tensor, plan: CascadePlan) -> torch.Tensor:
    """``(B, Hkv, G * n, D)`` back to the packed ``(T, Hq, D)`` of the real new tokens, q's dtype."""
    bsz, num_kv_heads, rows, head_dim = out.shape
    n = plan.own_mask.shape[1]
    out = out.view(bsz, num_kv_heads, rows // n, n, head_dim).permute(0, 3, 1, 2, 4)
    out = out.reshape(bsz * n, q.shape[1], head_dim).to(q.dtype)
    return out if plan.out_rows is None else out.index_select(0, plan.out_rows)


def _cascade_attention_cpu(layer: int, q: torch.Tensor, kv: KVPool, scale: float, plan: CascadePlan) -> torch.Tensor:
    """Two fused attention calls merged by log-sum-exp: every request's new tokens over its own
    keys (padded, masked), and the sharers' new tokens over the prefix as the rows of one call
    per KV head (no mask: each sharer sees all of it). Measured 1.5-1.8x faster than the
    generic path on one CPU core (benchmarks/cascade_cpu.py)."""
    query, k_own, v_own = _cascade_inputs(layer, q, kv, plan)
    num_kv_heads, rows_per_head, head_dim = query.shape[1:]
    out, lse = _CPU_FLASH(query, k_own, v_own, 0.0, False, attn_mask=plan.own_bias, scale=scale)
    sharers = plan.sharers
    if len(sharers):
        rows = query.index_select(0, sharers).transpose(0, 1).reshape(1, num_kv_heads, -1, head_dim)
        k_pre, v_pre = (pool[layer][plan.prefix_slots].float().transpose(0, 1)[None] for pool in (kv.k, kv.v))
        out_pre, lse_pre = _CPU_FLASH(rows, k_pre, v_pre, 0.0, False, scale=scale)
        out_pre = out_pre.view(num_kv_heads, len(sharers), rows_per_head, head_dim).transpose(0, 1)
        lse_pre = lse_pre.view(num_kv_heads, len(sharers), rows_per_head).transpose(0, 1)
        out_s, lse_s = out.index_select(0, sharers), lse.index_select(0, sharers)
        top = torch.maximum(lse_s, lse_pre)
        w_own, w_pre = (lse_s - top).exp_(), (lse_pre - top).exp_()
        merged = (out_s * w_own[..., None] + out_pre * w_pre[..., None]) / (w_own + w_pre)[..., None]
        out = out.index_copy(0, sharers, merged)
    return _cascade_output(out, q, plan)


def _cascade_attention_generic(
    layer: int, q: torch.Tensor, kv: KVPool, scale: float, plan: CascadePlan
) -> torch.Tensor:
    """Attention with the shared prefix's K/V gathered once: the scores of each request's new
    tokens over the prefix and over its own keys share one softmax (a common max and
    denominator), in float32. The reference semantics exactly, with ``P + B * L`` keys gathered,
    not ``B * (P + L)``. Scores are laid out as the matmuls give them and updated in place: the
    copies of a concatenated, permuted score tensor cost more than the matmuls (measured on the
    CPU). Every new token sees at least itself: no empty row."""
    query, k_own, v_own = _cascade_inputs(layer, q, kv, plan)
    query = query * scale
    bsz, num_kv_heads, rows_per_head, head_dim = query.shape
    n, n_own = plan.own_mask.shape[1], plan.own_mask.shape[2]
    k_pre, v_pre = (pool[layer][plan.prefix_slots].float().transpose(0, 1) for pool in (kv.k, kv.v))  # (Hkv, P, D)
    # prefix: one matmul per KV head over every request's rows, (Hkv, B, G * n, P)
    s_pre = torch.matmul(query.transpose(0, 1).reshape(num_kv_heads, -1, head_dim), k_pre.transpose(1, 2))
    s_pre = s_pre.view(num_kv_heads, bsz, rows_per_head, -1)
    s_pre.masked_fill_(~plan.prefix_mask[None, :, None, :], float("-inf"))
    s_own = torch.matmul(query, k_own.transpose(2, 3))  # (B, Hkv, G * n, L)
    s_own.view(bsz, num_kv_heads, -1, n, n_own).masked_fill_(~plan.own_mask[:, None, None], float("-inf"))
    top = torch.maximum(s_pre.amax(-1).transpose(0, 1), s_own.amax(-1))  # (B, Hkv, G * n), finite
    s_pre.sub_(top.transpose(0, 1)[..., None]).exp_()
    s_own.sub_(top[..., None]).exp_()
    total = s_pre.sum(-1).transpose(0, 1) + s_own.sum(-1)
    out = torch.matmul(s_pre.view(num_kv_heads, -1, s_pre.shape[-1]), v_pre)
    out = out.view(num_kv_heads, bsz, rows_per_head, head_dim)
    out = out.transpose(0, 1) + torch.matmul(s_own, v_own)
    return _cascade_output(out / total[..., None], q, plan)


def _extend_plan(batch, window: int | None, idx: list[int]) -> list[tuple[int, int, torch.Tensor, torch.Tensor | None]]:
    """Per request ``i`` in ``idx``: (first row, count, KV slots of its whole sequence, mask)."""
    plan = []
    rows = batch.req_rows.tolist() if idx else []
    starts = batch.extend_starts_cpu
    for i in idx:
        start, n, seq_len = starts[i], batch.extend_lens_cpu[i], batch.seq_lens_cpu[i]
        if n:
            slots = batch.req_to_token[rows[i], :seq_len]
            plan.append((start, n, slots, _extend_mask(seq_len - n, n, seq_len, window, batch.input_ids.device)))
    return plan


def _extend_mask(
    prefix_len: int, n: int, seq_len: int, window: int | None, device: torch.device
) -> torch.Tensor | None:
    """``(n, seq_len)`` bool mask (True = may attend) for n new tokens after a cached prefix,
    or None when plain top-left causal masking is exact (no prefix, no window)."""
    if prefix_len == 0 and (window is None or window >= seq_len):
        return None
    q_pos = torch.arange(prefix_len, seq_len, device=device).unsqueeze(1)  # (n, 1)
    k_pos = torch.arange(seq_len, device=device).unsqueeze(0)  # (1, L)
    mask = k_pos <= q_pos
    if window is not None:
        mask &= k_pos > q_pos - window
    return mask
