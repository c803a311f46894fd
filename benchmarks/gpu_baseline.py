"""GPU decode baseline: braid (torch attention path) vs transformers on a random
Llama-3.1-8B-shaped bf16 model, with the hardware floor measured in the same run.

    python -m benchmarks.gpu_baseline [--model DIR] [--layers 32] [--batches 1,64]

Each row: the median of 3 runs of output tokens/s for `batch` requests of `in` random prompt tokens and `out` generated
tokens (greedy, ignore_eos); the floor is batch / (time to read the weights once at the measured
copy bandwidth, or to do the step's matmul FLOPs at the measured bf16 rate, whichever is larger).
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import copy_bandwidth_gbs, matmul_tflops, param_bytes, sync
from benchmarks.make_random_llama import ensure_model

REPEATS = 3  # timed runs per figure; the median is printed


def braid_tps(eng, batch: int, n_in: int, n_out: int, vocab: int) -> float:
    g = torch.Generator().manual_seed(batch)
    prompts = torch.randint(1, vocab, (batch, n_in), generator=g).tolist()
    params = {"max_new_tokens": n_out, "temperature": 0, "ignore_eos": True}
    eng.generate(input_ids=prompts, sampling_params={**params, "max_new_tokens": 4})
    rates = []
    for _ in range(REPEATS):
        eng.flush_cache()  # every run prefills from scratch
        t0 = time.perf_counter()
        outs = eng.generate(input_ids=prompts, sampling_params=params)
        dt = time.perf_counter() - t0
        rates.append(sum(o["meta_info"]["completion_tokens"] for o in outs) / dt)
    return sorted(rates)[len(rates) // 2]


def hf_tps(model, batch: int, n_in: int, n_out: int, vocab: int) -> float:
    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(1, vocab, (batch, n_in), generator=g).to(model.device)
    kw = dict(do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids))
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, **kw)
        sync(ids.device)
        rates = []
        for _ in range(REPEATS):
            t0 = time.perf_counter()
            model.generate(ids, max_new_tokens=n_out, min_new_tokens=n_out, **kw)
            sync(ids.device)
            rates.append(batch * n_out / (time.perf_counter() - t0))
    return sorted(rates)[len(rates) // 2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="/tmp/llama31-8b-random")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--in-tokens", type=int, default=128)
    ap.add_argument("--out-tokens", type=int, default=128)
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--attention-backends", default="auto", help="comma list: one braid column each (torch,triton)")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU: checks the script only")
    a = ap.parse_args()
    dev = torch.device("cpu" if a.dry_run else "cuda")
    bw = copy_bandwidth_gbs(dev, mbytes=64 if a.dry_run else 2048)
    tflops = matmul_tflops(dev, torch.bfloat16, n=512 if a.dry_run else 8192)
    ensure_model(a.model, a.layers, dev, a.dry_run, vocab_size=1000)
    import braid as bd

    batches = [int(b) for b in a.batches.split(",")]
    backends = a.attention_backends.split(",")
    rows: dict[int, dict[str, float]] = {b: {} for b in batches}
    for backend in backends:
        with bd.Engine(model_path=a.model, dtype="bfloat16", context_len=4096, max_running_requests=max(batches),
                       device=dev.type, max_total_tokens=20000 if a.dry_run else None,
                       attention_backend=backend) as eng:
            weights = param_bytes(eng.runner.model)
            vocab = eng.vocab_size
            for b in batches:
                rows[b][backend] = braid_tps(eng, b, a.in_tokens, a.out_tokens, vocab)
                print(f"batch {b} braid ({eng.runner.attention_backend}): {rows[b][backend]:.1f} tok/s", flush=True)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    if not a.skip_transformers:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.bfloat16).to(dev).eval()
        for b in batches:
            rows[b]["transformers"] = hf_tps(model, b, a.in_tokens, a.out_tokens, vocab)
    name = "CPU (dry run)" if a.dry_run else torch.cuda.get_device_name()
    print(f"{name}: copy {bw:.0f} GB/s, bf16 matmul {tflops:.0f} TFLOP/s, "
          f"weights {weights / 1e9:.2f} GB, {a.in_tokens} in / {a.out_tokens} out")
    cols = "".join(f" {'braid ' + k + ' tok/s':>20}" for k in backends)
    print(f"{'batch':>5}{cols} {'transformers tok/s':>19} {'floor tok/s':>12} {'best braid/floor':>16}")
    for b, vals in rows.items():
        step_s = max(weights / (bw * 1e9), 2 * (weights / 2) * b / (tflops * 1e12))
        floor = b / step_s
        hf = f"{vals['transformers']:.1f}" if "transformers" in vals else "-"
        best = max(vals[k] for k in backends)
        print(f"{b:>5}" + "".join(f" {vals[k]:>20.1f}" for k in backends)
              + f" {hf:>19} {floor:>12.1f} {best / floor:>16.1%}")


if __name__ == "__main__":
    main()
