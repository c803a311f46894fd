"""The torch attention backend on a shared prefix, one layer on the CPU: cascade attention (the
prefix's K/V gathered once for the batch) against the padded plan it replaces (every request's
whole sequence gathered), at the embedded default model's heads (SmolLM2-135M: 9 query heads,
3 KV heads, head_dim 64, float32).

    python -m benchmarks.cascade_cpu [--threads 1]

Cases: decode of 8 and 64 requests under a shared prefix, and select's choices (75 short
extends of 12 tokens over one 1,070-token prompt, what a batch of 16 ``bd.select`` programs
with five choices sends). Beside braid's two paths: the peer, torch's
``scaled_dot_product_attention`` over dense per-request K/V already in place (transformers'
cache: no gather, the prefix stored once per request), and the floor measured in the same run:
the attention FLOPs at the float32 matmul rate, or the bytes that must be read (the prefix's
K/V once, each request's own once) at the copy bandwidth, whichever is larger. Outputs are
checked equal before timing.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from benchmarks.common import copy_bandwidth_gbs, matmul_tflops
from braid.runtime.forward_batch import ForwardBatch, ForwardMode
from braid.runtime.layers import attention as layer_attention
from braid.runtime.memory import KVPool

HQ, HKV, D = 9, 3, 64
SCALE = D**-0.5
CASES = [  # (name, requests, shared prefix, own keys before this pass, new tokens each)
    ("decode b8, 550 shared", 8, 550, 20, 1),
    ("decode b64, 2,000 shared", 64, 2000, 60, 1),
    ("select 75 x 12 over 1,070", 75, 1070, 10, 12),
]


def make_batch(requests: int, prefix: int, own: int, new: int) -> tuple[ForwardBatch, KVPool, torch.Tensor]:
    """A batch whose requests share ``prefix`` slots, then have ``own`` cached and ``new`` new keys
    each (already stored: only attention is timed)."""
    seq = prefix + own + new
    kv = KVPool(prefix + requests * (own + new) + 1, 1, HKV, D, torch.float32, "cpu")
    kv.k[0].normal_()
    kv.v[0].normal_()
    table = torch.zeros(requests, seq, dtype=torch.int64)
    table[:, :prefix] = torch.arange(1, prefix + 1)
    table[:, prefix:] = prefix + 1 + torch.arange(requests * (own + new)).view(requests, own + new)
    mode = ForwardMode.DECODE if new == 1 else ForwardMode.EXTEND
    batch = ForwardBatch(
        mode=mode, input_ids=torch.zeros(requests * new, dtype=torch.int64),
        positions=torch.arange(prefix + own, seq).repeat(requests), out_slots=table[:, prefix + own:].reshape(-1),
        req_rows=torch.arange(requests), seq_lens=torch.full((requests,), seq),
        prefix_lens_cpu=[prefix + own] * requests,
        extend_lens_cpu=[new] * requests, seq_lens_cpu=[seq] * requests, logits_rows=torch.arange(requests),
        req_to_token=table,
    )  # fmt: skip
    return batch, kv, torch.randn(requests * new, HQ, D)


def time_ms(fn) -> float:
    fn()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def run_case(name, requests, prefix, own, new, gflops: float, gbs: float) -> None:
    batch, kv, q = make_batch(requests, prefix, own, new)
    backend = layer_attention.create_attention_backend("torch")

    def forward(shared: bool) -> torch.Tensor:
        batch.attn_memo.clear()  # the plan is per forward: part of the cost
        batch.shared_lens = torch.full((requests,), prefix) if shared else None
        batch.shared_lens_cpu = [prefix] * requests if shared else None
        return backend.forward(0, q, q[:, :HKV], q[:, :HKV], batch, kv, SCALE, None)

    cascade = forward(True)  # stores the new tokens' K/V, which the dense copies below include
    assert "cascade" in batch.attn_memo, "the cascade path did not run"
    torch.testing.assert_close(forward(False), cascade, atol=1e-4, rtol=1e-4)
    seq = prefix + own + new
    keys, values = (pool[0][batch.req_to_token].transpose(1, 2).contiguous() for pool in (kv.k, kv.v))
    query = q.view(requests, new, HQ, D).transpose(1, 2)  # (B, Hq, n, D) against (B, Hkv, L, D)
    mask = torch.ones(new, seq, dtype=torch.bool).tril(prefix + own)

    def peer() -> torch.Tensor:
        out = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=SCALE, enable_gqa=True)
        return out.transpose(1, 2).reshape(requests * new, HQ, D)

    torch.testing.assert_close(peer(), cascade, atol=1e-4, rtol=1e-4)
    t_cascade, t_padded, t_peer = time_ms(lambda: forward(True)), time_ms(lambda: forward(False)), time_ms(peer)
    flops = 4 * HQ * D * requests * sum(prefix + own + i + 1 for i in range(new))
    bytes_once = (prefix + requests * (own + new)) * 2 * HKV * D * 4
    floor = max(flops / gflops / 1e6, bytes_once / gbs / 1e6)
    print(f"{name:<28} braid cascade {t_cascade:8.2f} ms   braid padded {t_padded:8.2f} ms   "
          f"sdpa on dense K/V {t_peer:8.2f} ms   floor {floor:7.2f} ms")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cpu = torch.device("cpu")
    gbs = copy_bandwidth_gbs(cpu)
    gflops = matmul_tflops(cpu, torch.float32, n=1024) * 1e3
    print(f"CPU, {a.threads} thread(s): copy {gbs:.1f} GB/s, float32 matmul {gflops:.0f} GFLOP/s; one layer")
    with torch.inference_mode():
        for case in CASES:
            run_case(*case, gflops, gbs)


if __name__ == "__main__":
    main()
