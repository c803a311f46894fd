"""The attention kernels alone, at the shapes of the GPU issue's workloads (Llama-3.1-8B heads:
32 query heads, 8 KV heads, head_dim 128, bf16), one layer's worth of work per call.

    python -m benchmarks.attention_kernels [--splits 1,2,4,8] [--dry-run]

Each case prints braid's Triton kernel time, torch's ``scaled_dot_product_attention`` on the
same problem as dense per-request tensors (what transformers' sdpa attention runs), and the
floor measured in the same run: for decode, the KV bytes the kernel must read at the copy
bandwidth; for extend, its FLOPs at the bf16 matmul rate. Every call is timed as a CUDA graph
replay (GPU time, without the host's launch gaps), and L2 is flushed before each (a decode
step's weights flush it between layers too). Runs before 2026-12-08 timed eager calls.

The shared-prefix decode case answers one question directly: when 64 requests share 2,000
tokens of KV slots, does the kernel pay for 64 reads of the prefix (time near the "distinct"
case) or about one (L2 serves the repeats)? The floor column gives both byte counts. The
"cascade" lines run the same decode with cascade attention (the shared prefix read once per KV
head, then each request's own keys, merged): on the shared case with the engine's split counts,
and on the unshared cases as a CUDA graph runs it when nothing is shared (an empty prefix pass
sized for 4,096-token prefixes, plus the reduce), which is its cost to batches that share nothing.
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

from braid.runtime.kernels import attention as attn
from benchmarks.common import copy_bandwidth_gbs, matmul_tflops

HQ, HKV, D = 32, 8, 128
REPEATS = 20
KV_TOKEN_BYTES = 2 * HKV * D * 2  # K and V of one token, one layer, bf16


def time_us(fn, flush: torch.Tensor) -> float:
    """Median GPU microseconds of ``fn`` over REPEATS calls, L2 flushed before each. The call is
    captured once in a CUDA graph and replayed, as the engine runs decode: timed eagerly, a call
    of several kernels (cascade: prefix pass, decode, reduce) would also count the host's Python
    launch time between them (about 20 us a kernel)."""
    fn()
    if flush.device.type != "cuda":  # dry run: one untimed call checks the script
        return float("nan")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up off the capture stream, as capture requires
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
        run = graph.replay
    except RuntimeError as exc:  # said, not hidden: this line's figure then includes launch gaps
        print(f"  (this call could not be captured, so it is timed eagerly: {exc})")
        run = fn
    times = []
    for _ in range(REPEATS):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def check(name: str, ours: torch.Tensor, peer: torch.Tensor) -> None:
    """braid's kernel and sdpa agree to bf16 rounding, so the timings compare the same work."""
    err = (ours.float() - peer.float()).abs().max().item()
    assert err < 2e-2, f"{name}: braid and sdpa differ by {err}"


def kv_pool(num_slots: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    k = torch.randn(num_slots + 1, HKV, D, device=device, dtype=torch.bfloat16)
    return k, torch.randn_like(k)


def table(lengths: list[int], shared: int, device) -> torch.Tensor:
    """req_to_token rows: the first ``shared`` positions of every row name the same slots (a
    radix-cache hit), the rest are each request's own slots."""
    width = max(lengths)
    rows = torch.zeros(len(lengths), width, dtype=torch.int32)
    prefix = torch.arange(1, shared + 1, dtype=torch.int32)
    nxt = shared + 1
    for i, n in enumerate(lengths):
        rows[i, :shared] = prefix
        rows[i, shared:n] = torch.arange(nxt, nxt + n - shared, dtype=torch.int32)
        nxt += n - shared
    return rows.to(device)


def dense_kv(k_cache, v_cache, rows: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, Hkv, L, D) copies of each request's keys and values, for the sdpa peer."""
    slots = rows[:, :length].long()
    return k_cache[slots].transpose(1, 2).contiguous(), v_cache[slots].transpose(1, 2).contiguous()


def decode_case(name, batch, length, shared, splits, device, bw, flush, prefix_blocks=()) -> None:
    lengths = [length] * batch
    rows = table(lengths, shared, device)
    k_cache, v_cache = kv_pool(int(rows.max()), device)
    q = torch.randn(batch, HQ, D, device=device, dtype=torch.bfloat16)
    req_rows = torch.arange(batch, device=device, dtype=torch.int32)
    seq_lens = torch.tensor(lengths, device=device, dtype=torch.int32)
    scale = D**-0.5
    auto = attn.decode_splits(batch, HKV, length, attn.num_sms(device))
    kd, vd = dense_kv(k_cache, v_cache, rows, length)
    def sdpa() -> torch.Tensor:
        return F.scaled_dot_product_attention(q[:, :, None], kd, vd, scale=scale, enable_gqa=True)[:, :, 0]

    peer = time_us(sdpa, flush)
    ours = attn.decode_attention_triton(q, k_cache, v_cache, rows, req_rows, seq_lens, scale, None, num_splits=auto)
    check(name, ours, sdpa())
    all_bytes = batch * length * KV_TOKEN_BYTES
    unique_bytes = (shared + batch * (length - shared)) * KV_TOKEN_BYTES
    floor_all, floor_unique = all_bytes / bw / 1e3, unique_bytes / bw / 1e3
    for s in sorted({auto, *splits}):
        us = time_us(lambda: attn.decode_attention_triton(
            q, k_cache, v_cache, rows, req_rows, seq_lens, scale, None, num_splits=s), flush)  # fmt: skip
        floors = f"{floor_all:8.1f}" + (f" / {floor_unique:.1f} unique" if shared else "")
        mark = " (auto)" if s == auto else ""
        print(f"{name:<34} splits {s:>2}{mark:<7} braid {us:8.1f} us   sdpa {peer:8.1f} us   "
              f"floor {floors} us   braid reads {all_bytes / us / 1e3:7.0f} GB/s")  # fmt: skip
    # cascade: the engine's split counts for this batch (eager), or a graph's when nothing is shared
    shared_lens = torch.full((batch,), shared, device=device, dtype=torch.int32)
    sms = attn.num_sms(device)
    own = attn.decode_splits(batch, HKV, length - shared if shared else 4096, sms)
    block_m = 16 if device.type == "cpu" else attn.EXTEND_BLOCK  # the dry run's tiny batches
    pre = attn.prefix_splits(batch, HQ // HKV, HKV, shared or 4096, sms, block_m=block_m)

    def cascade() -> torch.Tensor:
        return attn.decode_attention_triton(q, k_cache, v_cache, rows, req_rows, seq_lens, scale, None,
                                            num_splits=own, shared_lens=shared_lens, prefix_splits=pre,
                                            block_m=block_m)  # fmt: skip

    check(name + " cascade", cascade(), ours)
    us = time_us(cascade, flush)
    floor = floor_unique if shared else floor_all
    print(f"{name:<34} cascade {own:>2}+{pre:<2}    braid {us:8.1f} us   floor {floor:8.1f} us"
          f"{' unique' if shared else ''}   braid reads {(unique_bytes if shared else all_bytes) / us / 1e3:7.0f} GB/s")
    if not shared:
        return
    # the prefix pass's tile height and split count, beside the engine's choice above
    for bm in prefix_blocks:
        auto_pre = attn.prefix_splits(batch, HQ // HKV, HKV, shared, sms, block_m=bm)
        for p in sorted({max(1, auto_pre // 2), auto_pre, 2 * auto_pre}):
            def run(bm=bm, p=p) -> torch.Tensor:
                return attn.decode_attention_triton(q, k_cache, v_cache, rows, req_rows, seq_lens, scale, None,
                                                    num_splits=own, shared_lens=shared_lens, prefix_splits=p,
                                                    block_m=bm)  # fmt: skip

            check(f"{name} cascade block_m {bm}", run(), ours)
            mark = " (auto)" if p == auto_pre else ""
            print(f"{name:<34} cascade block_m {bm:>3} splits {own}+{p}{mark}  braid {time_us(run, flush):8.1f} us")


def extend_case(name, extend_lens, prefix, device, rate, flush, prefix_blocks=()) -> None:
    lengths = [prefix + n for n in extend_lens]
    rows = table(lengths, prefix, device)
    k_cache, v_cache = kv_pool(int(rows.max()), device)
    total = sum(extend_lens)
    q = torch.randn(total, HQ, D, device=device, dtype=torch.bfloat16)
    req_rows = torch.arange(len(extend_lens), device=device, dtype=torch.int32)
    plan = attn.plan_extend([prefix] * len(extend_lens), extend_lens, device)
    scale = D**-0.5
    us = time_us(lambda: attn.extend_attention_triton(q, k_cache, v_cache, rows, req_rows, plan, scale, None), flush)
    # the sdpa peer: each request's queries over its keys, causal within the new tokens
    kd = [dense_kv(k_cache, v_cache, rows[i : i + 1], n) for i, n in enumerate(lengths)]
    qs = list(q.split(extend_lens))
    masks = [torch.ones(n, prefix + n, dtype=torch.bool, device=device).tril(prefix) for n in extend_lens]

    def peer() -> torch.Tensor:
        return torch.cat([F.scaled_dot_product_attention(qi.transpose(0, 1)[None], ki, vi, attn_mask=m, scale=scale,
                                                         enable_gqa=True)[0].transpose(0, 1)
                          for qi, (ki, vi), m in zip(qs, kd, masks)])  # fmt: skip

    peer_us = time_us(peer, flush)
    check(name, attn.extend_attention_triton(q, k_cache, v_cache, rows, req_rows, plan, scale, None), peer())
    flops = sum(4 * HQ * D * (n * prefix + n * (n + 1) // 2) for n in extend_lens)
    floor = flops / rate / 1e6
    print(f"{name:<34} braid {us:9.1f} us ({flops / us / 1e6:5.0f} TFLOP/s)   sdpa {peer_us:9.1f} us   "
          f"floor {floor:8.1f} us")  # fmt: skip
    if not prefix:
        return
    # cascade: every request shares the cached prefix, read once per KV head and split
    sms = attn.num_sms(device)
    cascade_plan = attn.plan_extend([prefix] * len(extend_lens), extend_lens, device,
                                    shared_lens=[prefix] * len(lengths))  # fmt: skip
    prefix_blocks = [16] if device.type == "cpu" else prefix_blocks  # the dry run's tiny batches
    for bm in sorted({attn.EXTEND_BLOCK, *prefix_blocks}):
        pre = attn.prefix_splits(total, HQ // HKV, HKV, prefix, sms, block_m=bm)

        def run(bm=bm, pre=pre) -> torch.Tensor:
            return attn.extend_attention_triton(q, k_cache, v_cache, rows, req_rows, cascade_plan, scale, None, pre, bm)

        check(f"{name} cascade block_m {bm}", run(), peer())
        print(f"{name:<34} cascade block_m {bm:>3} prefix splits {pre:<2}  braid {time_us(run, flush):9.1f} us")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--splits", default="1,2,4,8", help="decode split counts to try beside the automatic one")
    ap.add_argument("--prefix-blocks", default="",
                    help="cascade prefix-pass tile heights (block_m) to sweep on the shared-prefix cases: 32,64,128")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU (TRITON_INTERPRET=1): checks the script only")
    args = ap.parse_args()
    device = torch.device("cpu" if args.dry_run else "cuda")
    splits = [int(s) for s in args.splits.split(",") if s]
    prefix_blocks = [int(b) for b in args.prefix_blocks.split(",") if b]
    bw = copy_bandwidth_gbs(device, mbytes=16 if args.dry_run else 256)
    rate = matmul_tflops(device, torch.bfloat16, n=256 if args.dry_run else 4096)
    name = "CPU (dry run)" if args.dry_run else torch.cuda.get_device_name(device)
    print(f"{name}: copy {bw:.0f} GB/s, bf16 matmul {rate:.0f} TFLOP/s, {attn.num_sms(device)} SMs")
    flush = torch.empty(16 if args.dry_run else 256 * 2**20, dtype=torch.uint8, device=device)
    k = 16 if args.dry_run else 1  # the dry run divides lengths and batches
    with torch.inference_mode():
        decode_case("decode b1 x 384 (batch-1 workload)", 1, 384 // k, 0, splits, device, bw, flush)
        decode_case("decode b256 x 576 (offline)", 256 // k, 576 // k, 0, splits, device, bw, flush)
        decode_case("decode b64 x 2100, 2000 shared", 64 // k, 2100 // k, 2000 // k, splits, device, bw, flush,
                    prefix_blocks)
        decode_case("decode b64 x 2100, distinct", 64 // k, 2100 // k, 0, splits, device, bw, flush)
        decode_case("decode b64 x 100 (suffixes alone)", 64 // k, 100 // k, 0, splits, device, bw, flush)
        extend_case("extend 4 x 512 (offline chunk)", [512 // k] * 4, 0, device, rate, flush)
        extend_case("extend 16 x 512 (8,192-token chunk)", [512 // k] * (16 // k), 0, device, rate, flush)
        extend_case("extend 32 x 64 over 2,000 shared", [64 // k] * (32 // k), 2000 // k, device, rate, flush,
                    prefix_blocks)
        extend_case("extend 75 x 12 over 1,070 shared (select)", [max(1, 12 // k)] * (75 // k), 1070 // k, device,
                    rate, flush, prefix_blocks)
        extend_case("extend 1 x 2,048 (the prefix)", [2048 // k], 0, device, rate, flush)


if __name__ == "__main__":
    main()
