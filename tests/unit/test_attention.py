"""The torch attention backend against a dense causal reference on random q/k/v."""

from __future__ import annotations

import pytest
import torch

from braid.errors import UnknownNameError
from braid.runtime.forward_batch import ForwardBatch, ForwardMode
from braid.runtime.layers.attention import ATTENTION_BACKENDS, _buckets, create_attention_backend
from braid.runtime.memory import KVPool

HEAD_DIM = 8
NUM_KV_HEADS = 2


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def dense_reference(q, k, v, scale: float, window: int | None) -> torch.Tensor:
    """Causal attention of a whole sequence: q (L, Hq, D), k/v (L, Hkv, D) -> (L, Hq, D)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k.double()) * scale
    pos = torch.arange(q.shape[0])
    allowed = pos[None, :] <= pos[:, None]
    if window is not None:
        allowed &= pos[None, :] > pos[:, None] - window
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    return torch.einsum("hqk,khd->qhd", probs, v.double()).float()


def run_backend(mode, prefix_lens, new_lens, group, window, seed):
    """Random sequences per request; the prefix K/V are put in the pool at shuffled slots
    (garbage elsewhere), the new tokens go through the backend. Returns (out, expected, kv, slots)."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen)
    num_heads = NUM_KV_HEADS * group
    total = sum(prefix_lens) + sum(new_lens)
    kv = KVPool(total + 5, 1, NUM_KV_HEADS, HEAD_DIM, torch.float32, "cpu")
    kv.k[0].copy_(rand(*kv.k[0].shape))  # garbage a wrong read would pick up
    kv.v[0].copy_(rand(*kv.v[0].shape))
    order = (torch.randperm(total + 5, generator=gen) + 1)[:total]
    table = torch.zeros(len(prefix_lens), 128, dtype=torch.int64)
    qs, ks, vs, out_slots, expected, used = [], [], [], [], [], 0
    for i, (p, n) in enumerate(zip(prefix_lens, new_lens)):
        q, k, v = (
            rand(p + n, num_heads, HEAD_DIM),
            rand(p + n, NUM_KV_HEADS, HEAD_DIM),
            rand(p + n, NUM_KV_HEADS, HEAD_DIM),
        )
        slots = order[used : used + p + n]
        used += p + n
        table[i, : p + n] = slots
        kv.store(0, slots[:p], k[:p], v[:p])
        qs.append(q[p:]), ks.append(k[p:]), vs.append(v[p:]), out_slots.append(slots[p:])
        expected.append(dense_reference(q, k, v, 0.3, window)[p:])
    seq_lens = [p + n for p, n in zip(prefix_lens, new_lens)]
    batch = ForwardBatch(
        mode=mode, input_ids=torch.zeros(sum(new_lens), dtype=torch.int64), positions=torch.cat(
            [torch.arange(p, p + n) for p, n in zip(prefix_lens, new_lens)]),
        out_slots=torch.cat(out_slots), req_rows=torch.arange(len(prefix_lens)), seq_lens=torch.tensor(seq_lens),
        prefix_lens_cpu=list(prefix_lens), extend_lens_cpu=list(new_lens), seq_lens_cpu=seq_lens,
        logits_rows=torch.arange(len(prefix_lens)), req_to_token=table,
    )  # fmt: skip
    k_new, v_new = torch.cat(ks), torch.cat(vs)
    out = create_attention_backend("torch").forward(0, torch.cat(qs), k_new, v_new, batch, kv, 0.3, window)
    return out, torch.cat(expected), kv, batch.out_slots, k_new, v_new


@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("prefix_lens, new_lens", [
    ([0, 5, 11, 2], [7, 3, 1, 9]),  # similar sizes: one padded call for the batch
    ([0, 30, 1], [1, 25, 2]),  # skewed sizes: buckets, some of one request
    ([40, 38, 41, 0, 2, 30, 33, 1, 5, 20], [3, 2, 3, 20, 18, 1, 1, 2, 9, 30]),  # several buckets and singles
    ([4], [6]),  # a single request
])  # fmt: skip
def test_extend_matches_dense(group, window, prefix_lens, new_lens):
    # prefix 0 (plain prefill), odd lengths, a long cached prefix, and a 1-token extend
    out, expected, *_ = run_backend(ForwardMode.EXTEND, prefix_lens, new_lens, group, window, seed=group)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_buckets_partition_the_requests_and_bound_padding():
    gen = torch.Generator().manual_seed(3)
    for _ in range(50):
        b = int(torch.randint(2, 40, (1,), generator=gen))
        ext = torch.randint(0, 60, (b,), generator=gen).tolist()
        pre = torch.randint(0, 300, (b,), generator=gen).tolist()
        seq = [p + n for p, n in zip(pre, ext)]
        batch = ForwardBatch(
            mode=ForwardMode.EXTEND, input_ids=torch.zeros(sum(ext), dtype=torch.int64),
            positions=torch.zeros(sum(ext), dtype=torch.int64), out_slots=torch.zeros(sum(ext), dtype=torch.int64),
            req_rows=torch.arange(b), seq_lens=torch.tensor(seq), prefix_lens_cpu=pre, extend_lens_cpu=ext,
            seq_lens_cpu=seq, logits_rows=torch.arange(b), req_to_token=torch.zeros(b, 400, dtype=torch.int64),
        )  # fmt: skip
        buckets = _buckets(batch)
        assert sorted(i for bk in buckets for i in bk) == [i for i in range(b) if ext[i]]
        for bk in buckets:
            padded = len(bk) * max(ext[i] for i in bk) * max(seq[i] for i in bk)
            assert padded <= 2 * sum(ext[i] * seq[i] for i in bk) or len(bk) == 1


@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("window", [None, 4])
def test_decode_matches_dense(group, window):
    out, expected, *_ = run_backend(ForwardMode.DECODE, [0, 6, 13, 2], [1, 1, 1, 1], group, window, seed=10 + group)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", [ForwardMode.EXTEND, ForwardMode.DECODE])
def test_new_kv_is_stored_at_out_slots(mode):
    lens = [3, 2] if mode is ForwardMode.EXTEND else [1, 1]
    _, _, kv, slots, k_new, v_new = run_backend(mode, [4, 1], lens, 2, None, seed=7)
    torch.testing.assert_close(kv.k[0][slots], k_new, atol=0, rtol=0)
    torch.testing.assert_close(kv.v[0][slots], v_new, atol=0, rtol=0)


def test_unknown_backend_lists_known():
    with pytest.raises(UnknownNameError, match="torch"):
        create_attention_backend("no-such-backend")
    assert "torch" in ATTENTION_BACKENDS
