"""CPU decode throughput on the embedded default model: braid vs transformers' generate.

    python benchmarks/cpu_default_model.py [--threads 1] [--new-tokens 64] [--shared-prefix TOKENS]

Prints, per batch size: braid's output tokens/s, transformers' on the same float32 weights in
the same process, and two floors measured in this run: the memory-bandwidth floor (weights read
once per decode step at the measured copy bandwidth) and the matmul floor (the model's own
weight matmuls alone, same threads, same batch). Greedy, fixed output length (ignore_eos).

``--shared-prefix N``: every prompt starts with the same system message of about N tokens (a
long system prompt, a few-shot block, fork branches). A braid column without cascade attention
(``disable_cascade_attention``, the prefix's K/V gathered once per request per step) is added,
and the bandwidth floor also reads the KV cache once per step: the prefix once, each request's
own keys once.
"""

from __future__ import annotations

import argparse
import time
from contextlib import nullcontext
from typing import NamedTuple

import torch

from benchmarks.common import copy_bandwidth_gbs, linear_floor_s, param_bytes

PROMPTS = [
    "What is the capital of France?",
    "Name three colors.",
    "Explain gravity in one sentence.",
    "Write a haiku about rain.",
    "What is 12 times 7?",
    "Give a synonym for happy.",
    "Who wrote Hamlet?",
    "List two prime numbers.",
]


def chat(tok, q: str, system: str | None = None) -> str:
    messages = [{"role": "system", "content": system}] if system else []
    return tok.apply_chat_template([*messages, {"role": "user", "content": q}])


def system_text(tok, tokens: int) -> str:
    """A system message of about ``tokens`` tokens (numbered rules, so no two lines are alike)."""
    lines, n = [], 0
    while n < tokens:
        lines.append(f"Rule {len(lines) + 1}: answer briefly, cite nothing, and keep to the question asked.")
        n = len(tok.encode("\n".join(lines)))
    return "\n".join(lines)


def kv_bytes_per_token(info) -> int:
    return info.num_layers * 2 * info.num_kv_heads * info.head_dim * torch.finfo(info.dtype).bits // 8


ROUNDS = 3  # braid, transformers and the floor are measured in alternating rounds; medians printed


class Rates(NamedTuple):
    end_to_end: float  # output tokens / time of the whole generate call (prefill included)
    decode: float  # tokens after the first / (whole call - a 1-token call): the decode-only rate


def _rates(run, batch: int, new_tokens: int) -> Rates:
    """``run(n)`` generates n tokens for every prompt from scratch and returns its seconds."""
    first = run(1)
    whole = run(new_tokens)
    return Rates(batch * new_tokens / whole, batch * (new_tokens - 1) / (whole - first))


def braid_runner(eng, prompts: list[str]):
    def run(n: int) -> float:
        eng.flush_cache()  # every call prefills from scratch
        t0 = time.perf_counter()
        eng.generate(prompt=prompts, sampling_params={"max_new_tokens": n, "temperature": 0, "ignore_eos": True})
        return time.perf_counter() - t0

    return run


def transformers_runner(model, hf_tok, prompts: list[str]):
    enc = hf_tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)

    def run(n: int) -> float:
        with torch.inference_mode():
            t0 = time.perf_counter()
            model.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=hf_tok.pad_token_id)
            return time.perf_counter() - t0

    return run


def load_transformers(folder: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(folder)
    hf_tok.padding_side = "left"
    if hf_tok.pad_token is None:
        hf_tok.pad_token = hf_tok.eos_token
    return model, hf_tok


def median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--shared-prefix", type=int, default=0, help="tokens of a system message every prompt shares")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import braid as bd

    cpu = torch.device("cpu")
    shared = args.shared_prefix > 0
    with (bd.Engine(cpu_threads=args.threads) as eng,
          bd.Engine(cpu_threads=args.threads, disable_cascade_attention=True) if shared else nullcontext() as plain):
        model, hf_tok = load_transformers(eng.model_folder)
        weights = param_bytes(eng.runner.model)
        bw = copy_bandwidth_gbs(cpu)
        system = system_text(eng.tokenizer, args.shared_prefix) if shared else None
        print(
            f"threads={args.threads} new_tokens={args.new_tokens} weights={weights / 1e6:.0f} MB "
            f"copy bandwidth={bw:.1f} GB/s   tok/s, median of {ROUNDS} alternating rounds: end to end | decode only"
        )
        print(
            f"{'batch':>5} {'braid':>15}" + (f" {'braid no cascade':>17}" if shared else "")
            + f" {'transformers':>15} {'bandwidth floor':>16} {'matmul floor':>13} {'braid decode/floor':>19}"
        )
        for bs in [int(b) for b in args.batches.split(",")]:
            prompts = [chat(eng.tokenizer, PROMPTS[i % len(PROMPTS)], system) for i in range(bs)]
            runners = [braid_runner(eng, prompts), transformers_runner(model, hf_tok, prompts)]
            if shared:
                runners.append(braid_runner(plain, prompts))
            for run in runners:
                run(4)  # warm-up
            rates: list[list[Rates]] = [[] for _ in runners]
            f = []
            for _ in range(ROUNDS):
                for run, out in zip(runners, rates):
                    out.append(_rates(run, bs, args.new_tokens))
                f.append(bs / linear_floor_s(eng.runner.model, bs, cpu))
            mm_floor = median(f)
            # bytes a decode step must read: the weights, and the KV cache with the prefix read once
            lengths = [len(eng.tokenizer.encode(p)) + args.new_tokens // 2 for p in prompts]
            prefix = len(eng.tokenizer.encode(chat(eng.tokenizer, "", system))) if shared else 0
            kv = (prefix + sum(n - prefix for n in lengths)) * kv_bytes_per_token(eng.runner.info) if shared else 0
            bw_floor = bs * bw * 1e9 / (weights + kv)
            (bd_e, bd_d), (hf_e, hf_d) = ((median([r.end_to_end for r in x]), median([r.decode for r in x]))
                                          for x in rates[:2])  # fmt: skip
            plain_cols = ""
            if shared:
                plain_e, plain_d = median([r.end_to_end for r in rates[2]]), median([r.decode for r in rates[2]])
                plain_cols = f" {plain_e:>9.1f} | {plain_d:>5.1f}"
            print(
                f"{bs:>5} {bd_e:>7.1f} | {bd_d:>5.1f}{plain_cols} {hf_e:>7.1f} | {hf_d:>5.1f} {bw_floor:>16.1f} "
                f"{mm_floor:>13.1f} {bd_d / min(bw_floor, mm_floor):>19.0%}"
            )


if __name__ == "__main__":
    main()
