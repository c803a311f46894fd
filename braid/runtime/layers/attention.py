"""Attention backends: the contract every backend meets, the registry, and the torch reference.

A backend turns one layer's new-token q/k/v into attention outputs, reading the cached
prefix of each request from the KV pool. Backends are stateless between forwards except
for what they choose to precompute per batch; the model owns nothing of the KV memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from braid.registry import Registry
from braid.runtime.forward_batch import ForwardBatch, ForwardMode
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
    """

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


@ATTENTION_BACKENDS.register("torch")
class TorchAttention(AttentionBackend):
    """Reference backend on ``scaled_dot_product_attention``: a loop over requests for
    EXTEND, one padded SDPA call for the whole batch in DECODE."""

    def forward(self, layer, q, k, v, batch, kv, scale, sliding_window):
        kv.store(layer, batch.out_slots, k, v)
        if batch.mode is ForwardMode.DECODE:
            return self._decode(layer, q, batch, kv, scale, sliding_window)
        return self._extend(layer, q, batch, kv, scale, sliding_window)

    def _extend(self, layer, q, batch, kv, scale, window):
        out = torch.empty_like(q)
        key = ("extend", window)
        if key not in batch.attn_memo:
            batch.attn_memo[key] = _extend_plan(batch, window)
        for start, n, slots, mask in batch.attn_memo[key]:
            keys = kv.k[layer][slots].transpose(0, 1)  # (Hkv, L, D)
            values = kv.v[layer][slots].transpose(0, 1)
            query = q[start : start + n].transpose(0, 1)  # (Hq, n, D)
            o = F.scaled_dot_product_attention(
                query, keys.to(q.dtype), values.to(q.dtype), attn_mask=mask,
                is_causal=mask is None, scale=scale, enable_gqa=True,
            )  # fmt: skip
            out[start : start + n] = o.transpose(0, 1)
        return out

    def _decode(self, layer, q, batch, kv, scale, window):
        bsz, num_q_heads, head_dim = q.shape
        num_kv_heads = kv.k[layer].shape[1]
        group = num_q_heads // num_kv_heads
        key = ("decode", window)
        if key not in batch.attn_memo:
            batch.attn_memo[key] = _decode_gather(batch, window)
        idx, valid = batch.attn_memo[key]
        max_len = valid.shape[1]
        keys = kv.k[layer].index_select(0, idx).view(bsz, max_len, num_kv_heads, head_dim)
        values = kv.v[layer].index_select(0, idx).view(bsz, max_len, num_kv_heads, head_dim)
        keys = keys.to(q.dtype).transpose(1, 2)  # (B, Hkv, L, D)
        values = values.to(q.dtype).transpose(1, 2)
        # The G query heads sharing a KV head become G "query positions" of that head, so
        # GQA needs no repeated K/V and one SDPA call covers the whole batch.
        query = q.view(bsz, num_kv_heads, group, head_dim)
        o = F.scaled_dot_product_attention(query, keys, values, attn_mask=valid[:, None, None, :], scale=scale)
        return o.reshape(bsz, num_q_heads, head_dim)


def _extend_plan(batch, window: int | None) -> list[tuple[int, int, torch.Tensor, torch.Tensor | None]]:
    """Per request with new tokens: (first row, count, KV slots of its whole sequence, mask)."""
    plan = []
    rows = batch.req_rows.tolist()
    for i, start in enumerate(batch.extend_starts_cpu):
        n, seq_len = batch.extend_lens_cpu[i], batch.seq_lens_cpu[i]
        if n:
            slots = batch.req_to_token[rows[i], :seq_len]
            plan.append((start, n, slots, _extend_mask(seq_len - n, n, seq_len, window, batch.input_ids.device)))
    return plan


def _decode_gather(batch, window: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat KV-slot indices ``(B * L,)`` and validity mask ``(B, L)`` for a decode batch, shared by
    every layer. Only up to the longest sequence is gathered; padded columns read the zeroed
    padding slot 0 and are masked."""
    max_len = max(batch.seq_lens_cpu)
    cols = torch.arange(max_len, device=batch.seq_lens.device)
    seq_lens = batch.seq_lens.unsqueeze(1)  # (B, 1)
    valid = cols.unsqueeze(0) < seq_lens  # (B, L)
    if window is not None:
        valid &= cols.unsqueeze(0) >= seq_lens - window
    idx = batch.req_to_token[batch.req_rows, :max_len].masked_fill(~valid, 0)
    return idx.reshape(-1), valid


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
