"""CPU decode throughput on the embedded default model: braid vs transformers' generate.

    python benchmarks/cpu_default_model.py [--threads 1] [--new-tokens 64]

Prints, per batch size: braid's output tokens/s, transformers' on the same float32 weights in
the same process, and two floors measured in this run: the memory-bandwidth floor (weights read
once per decode step at the measured copy bandwidth) and the matmul floor (the model's own
weight matmuls alone, same threads, same batch). Greedy, fixed output length (ignore_eos).
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import copy_bandwidth_gbs, linear_floor_s, param_bytes

PROMPTS = [
    "What is the capital of France?", "Name three colors.", "Explain gravity in one sentence.",
    "Write a haiku about rain.", "What is 12 times 7?", "Give a synonym for happy.",
    "Who wrote Hamlet?", "List two prime numbers.",
]


def chat(tok, q: str) -> str:
    return tok.apply_chat_template([{"role": "user", "content": q}])


def bench_braid(eng, prompts: list[str], new_tokens: int) -> float:
    params = {"max_new_tokens": new_tokens, "temperature": 0, "ignore_eos": True}
    eng.generate(prompt=prompts, sampling_params={**params, "max_new_tokens": 4})  # warm-up
    eng.flush_cache()
    t0 = time.perf_counter()
    outs = eng.generate(prompt=prompts, sampling_params=params)
    dt = time.perf_counter() - t0
    return sum(o["meta_info"]["completion_tokens"] for o in outs) / dt


def bench_transformers(folder: str, tok, prompts: list[str], new_tokens: int) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(folder)
    hf_tok.padding_side = "left"
    if hf_tok.pad_token is None:
        hf_tok.pad_token = hf_tok.eos_token
    enc = hf_tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=hf_tok.pad_token_id)
    with torch.inference_mode():
        model.generate(**enc, **{**kw, "max_new_tokens": 4, "min_new_tokens": 4})
        t0 = time.perf_counter()
        model.generate(**enc, **kw)
        dt = time.perf_counter() - t0
    return len(prompts) * new_tokens / dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batches", default="1,8")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import braid as bd

    with bd.Engine(cpu_threads=args.threads) as eng:
        folder, tok = eng.model_folder, eng.tokenizer
        weights = param_bytes(eng.runner.model)
        bw = copy_bandwidth_gbs(torch.device("cpu"))
        rows = []
        for bs in [int(b) for b in args.batches.split(",")]:
            prompts = [chat(tok, PROMPTS[i % len(PROMPTS)]) for i in range(bs)]
            braid_tps = bench_braid(eng, prompts, args.new_tokens)
            mm_floor = bs / linear_floor_s(eng.runner.model, bs, torch.device("cpu"))
            rows.append((bs, braid_tps, prompts, mm_floor))
    print(f"threads={args.threads} new_tokens={args.new_tokens} weights={weights / 1e6:.0f} MB "
          f"copy bandwidth={bw:.1f} GB/s")
    print(f"{'batch':>5} {'braid tok/s':>12} {'transformers tok/s':>19} {'bandwidth floor':>16} "
          f"{'matmul floor':>13} {'braid/floor':>12}")
    for bs, braid_tps, prompts, mm_floor in rows:
        hf_tps = bench_transformers(folder, tok, prompts, args.new_tokens)
        bw_floor = bs * bw * 1e9 / weights
        floor = min(bw_floor, mm_floor)
        print(f"{bs:>5} {braid_tps:>12.1f} {hf_tps:>19.1f} {bw_floor:>16.1f} {mm_floor:>13.1f} "
              f"{braid_tps / floor:>12.0%}")


if __name__ == "__main__":
    main()
