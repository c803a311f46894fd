"""The language on SGLang-paper-shaped workloads: what the radix cache and program-aware
execution buy, on a random Llama-3.1-8B-shaped bf16 model (synthetic text of the same token
shapes; a random model's words are noise, its costs are real).

    python -m benchmarks.lang_workloads [--model DIR] [--workloads mmlu,hellaswag,tot,chat] [--dry-run]

Workloads (each a braid program run with run_batch):
  mmlu       5-shot questions sharing a few-shot prefix per subject; gen of 1 token
  hellaswag  select over 4 endings after a shared few-shot prefix and a context
  tot        tree of thought: fork(2) at each of 3 levels, a gen per branch
  chat       4-turn chat: user message, assistant gen, with the chat template
For each: braid with the radix cache and program-aware execution; the same engine with naive
one-call-at-a-time execution; braid with the radix cache disabled; for mmlu and hellaswag,
transformers scoring the same token sequences in padded batches (no cache, as a plain
transformers script does); and the floor: the FLOPs of the tokens that must be computed at the
matmul rate, plus the weight reads of the sequential decode steps at the copy bandwidth, both
measured in this run.
"""

from __future__ import annotations

import argparse
import gc
import random
import time
from dataclasses import dataclass

import torch

import braid as bd
from benchmarks.common import copy_bandwidth_gbs, matmul_tflops, param_bytes, sync
from benchmarks.make_random_llama import ensure_model


@dataclass(frozen=True)
class Shape:
    programs: int
    shot_tokens: int = 0  # few-shot prefix, shared by all programs of a group
    groups: int = 1  # distinct few-shot prefixes (subjects)
    own_tokens: int = 0  # each program's own prompt
    choice_tokens: int = 0  # hellaswag endings
    gen_tokens: int = 0  # tokens per gen
    turns: int = 0  # chat turns / tot depth


SHAPES = {
    "mmlu": Shape(programs=256, shot_tokens=600, groups=4, own_tokens=80, gen_tokens=1),
    "hellaswag": Shape(programs=128, shot_tokens=500, groups=2, own_tokens=60, choice_tokens=20),
    "tot": Shape(programs=16, own_tokens=300, gen_tokens=32, turns=3),
    "chat": Shape(programs=32, shot_tokens=100, own_tokens=64, gen_tokens=64, turns=4),
}


class Words:
    """Synthetic text with about the wanted number of tokens: words decoded from the vocabulary."""

    def __init__(self, tokenizer, seed: int = 0) -> None:
        vocab = tokenizer.hf.get_vocab()
        self.words = sorted(w[1:] for w in vocab if w.startswith("\u0120") and w[1:].isalpha() and len(w) > 3)
        assert self.words, "the tokenizer has no byte-level word tokens to build text from"
        self.rng = random.Random(seed)

    def text(self, n_tokens: int) -> str:
        return " " + " ".join(self.rng.choice(self.words) for _ in range(n_tokens))


# ---- programs ----------------------------------------------------------------------------------
@bd.program
def mmlu(s, shots, question):
    s += shots + question + "\nAnswer:" + bd.gen("answer", max_tokens=1)


@bd.program
def hellaswag(s, shots, context, endings):
    s += shots + context + bd.select("ending", choices=endings)


@bd.program
def tot(s, question, depth, gen_tokens):
    s += question
    level = [s]
    for d in range(depth):
        nxt = []
        for st in level:
            forks = st.fork(2)
            forks += f"\nStep {d + 1}:" + bd.gen("step", max_tokens=gen_tokens)
            nxt += list(forks)
        level = nxt
    s["leaves"] = [st.text()[-20:] for st in level]


@bd.program
def chat(s, system, messages, gen_tokens):
    s += bd.system(system)
    for i, m in enumerate(messages):
        s += bd.user(m)
        s += bd.assistant(bd.gen(f"reply{i}", max_tokens=gen_tokens))


def make_batch(name: str, shape: Shape, words: Words) -> list[dict]:
    shots = [words.text(shape.shot_tokens) for _ in range(shape.groups)]
    if name == "mmlu":
        return [{"shots": shots[i % shape.groups], "question": words.text(shape.own_tokens)}
                for i in range(shape.programs)]
    if name == "hellaswag":
        return [{"shots": shots[i % shape.groups], "context": words.text(shape.own_tokens),
                 "endings": [words.text(shape.choice_tokens) for _ in range(4)]} for i in range(shape.programs)]
    if name == "tot":
        return [{"question": words.text(shape.own_tokens), "depth": shape.turns, "gen_tokens": shape.gen_tokens}
                for _ in range(shape.programs)]
    return [{"system": shots[0], "messages": [words.text(shape.own_tokens) for _ in range(shape.turns)],
             "gen_tokens": shape.gen_tokens} for _ in range(shape.programs)]


PROGRAMS = {"mmlu": mmlu, "hellaswag": hellaswag, "tot": tot, "chat": chat}


# ---- runs --------------------------------------------------------------------------------------
@dataclass
class Result:
    seconds: float
    prompt_tokens: int
    cached_tokens: int
    generated: int

    @property
    def hit_rate(self) -> float:
        return self.cached_tokens / max(self.prompt_tokens, 1)


def run_braid(eng, backend, name: str, batch: list[dict]) -> Result:
    eng.flush_cache()
    before = eng.get_stats()
    t0 = time.perf_counter()
    states = PROGRAMS[name].run_batch(batch, backend=backend, temperature=0.0, ignore_eos=True)
    seconds = time.perf_counter() - t0
    failed = [st.error for st in states if st.error is not None]
    assert not failed, f"{len(failed)} programs failed, first: {failed[0]!r}"
    after = eng.get_stats()
    delta = {k: after[k] - before[k] for k in ("prompt_tokens", "cached_tokens", "generated_tokens")}
    return Result(seconds, delta["prompt_tokens"], delta["cached_tokens"], delta["generated_tokens"])


def hf_sequences(name: str, batch: list[dict], tok) -> list[list[int]]:
    """The token sequences a cache-less transformers script scores for the workload."""
    if name == "mmlu":
        return [tok.encode(b["shots"] + b["question"] + "\nAnswer:") for b in batch]
    return [tok.encode(b["shots"] + b["context"] + e) for b in batch for e in b["endings"]]


@torch.no_grad()
def run_hf(model, seqs: list[list[int]], device, max_batch_tokens: int = 16384) -> float:
    """Seconds for transformers to run every sequence (right-padded batches, logits of all)."""
    t0 = time.perf_counter()
    seqs = sorted(seqs, key=len)
    i = 0
    while i < len(seqs):
        n = max(1, max_batch_tokens // len(seqs[i]))
        chunk = seqs[i : i + n]
        width = max(len(s) for s in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long, device=device)
        mask = torch.zeros_like(ids)
        for j, s in enumerate(chunk):
            ids[j, : len(s)] = torch.tensor(s)
            mask[j, : len(s)] = 1
        model(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)
        i += n
    sync(device)
    return time.perf_counter() - t0


def floor_seconds(res: Result, weights: int, bw: float, tflops: float, decode_steps: int) -> float:
    """Tokens that must be computed (prompt less cache hits, plus generated) at the matmul rate,
    plus one weight read per sequential decode step."""
    computed = res.prompt_tokens - res.cached_tokens + res.generated
    return computed * 2 * (weights / 2) / (tflops * 1e12) + decode_steps * weights / (bw * 1e9)


def decode_steps(name: str, shape: Shape) -> int:
    return {"mmlu": 0, "hellaswag": 0, "tot": shape.turns * shape.gen_tokens,
            "chat": shape.turns * shape.gen_tokens}[name]


# ---- main --------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="/tmp/llama31-8b-random")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--workloads", default="mmlu,hellaswag,tot,chat")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply the number of programs")
    ap.add_argument("--repeats", type=int, default=2, help="runs per configuration; the fastest is kept")
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--skip-nocache", action="store_true")
    ap.add_argument("--dry-run", action="store_true", help="tiny model and counts on the CPU: checks the script")
    a = ap.parse_args()
    dev = torch.device("cpu" if a.dry_run else "cuda")
    bw = copy_bandwidth_gbs(dev, mbytes=64 if a.dry_run else 2048)
    tflops = matmul_tflops(dev, torch.bfloat16, n=512 if a.dry_run else 8192)
    scale = 0.03 if a.dry_run else a.scale
    # the dry run keeps the tokenizer's vocabulary: the synthetic text is made of its words
    ensure_model(a.model, 2 if a.dry_run else a.layers, dev, a.dry_run, vocab_size=49152)
    names = a.workloads.split(",")
    shapes = {n: Shape(**{**SHAPES[n].__dict__, "programs": max(2, int(SHAPES[n].programs * scale))})
              for n in names}
    settings = dict(model_path=a.model, dtype="bfloat16", context_len=4096, device=dev.type,
                    max_running_requests=256, max_total_tokens=60000 if a.dry_run else None)
    rows: dict[str, dict[str, Result | float]] = {n: {} for n in names}
    with bd.Engine(**settings) as eng:
        weights = param_bytes(eng.runner.model)
        tok = eng.tokenizer
        words = Words(tok)
        batches = {n: make_batch(n, shapes[n], words) for n in names}
        naive = bd.EngineBackend(eng, program_aware=False)
        for n in names:
            run_braid(eng, eng, n, batches[n][:2])  # warm-up: first-call costs out of the figures
            for _ in range(a.repeats):  # alternated, best kept: neither pays for new shapes alone
                best(rows[n], "braid", progress(n, "braid", run_braid(eng, eng, n, batches[n])))
                best(rows[n], "naive", progress(n, "naive", run_braid(eng, naive, n, batches[n])))
    del eng, naive
    release(dev)  # the next engine sizes its KV pool from the free memory
    if not a.skip_nocache:
        with bd.Engine(**settings, disable_radix_cache=True) as eng:
            for n in names:
                run_braid(eng, eng, n, batches[n][:2])
                for _ in range(a.repeats):
                    best(rows[n], "nocache", progress(n, "no cache", run_braid(eng, eng, n, batches[n])))
        del eng
        release(dev)
    if not a.skip_transformers and {"mmlu", "hellaswag"} & set(names):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.bfloat16).to(dev).eval()
        for n in ("mmlu", "hellaswag"):
            if n in names:
                seqs = hf_sequences(n, batches[n], tok)
                run_hf(model, seqs[:4], dev)
                rows[n]["transformers"] = min(run_hf(model, seqs, dev) for _ in range(a.repeats))
                print(f"{n} transformers: {rows[n]['transformers']:.2f} s", flush=True)
    report(rows, shapes, weights, bw, tflops, "CPU (dry run)" if a.dry_run else torch.cuda.get_device_name())


def best(row: dict, key: str, res: Result) -> None:
    if key not in row or res.seconds < row[key].seconds:
        row[key] = res


def progress(name: str, how: str, res: Result) -> Result:
    print(f"{name} {how}: {res.seconds:.2f} s, {res.prompt_tokens} prompt tokens, hit rate {res.hit_rate:.1%}, "
          f"{res.generated} generated", flush=True)
    return res


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def report(rows, shapes, weights, bw, tflops, device_name: str) -> None:
    print(f"{device_name}: copy {bw:.0f} GB/s, bf16 matmul {tflops:.0f} TFLOP/s, weights {weights / 1e9:.2f} GB")
    head = (f"{'workload':>10} {'programs':>8} {'braid prog/s':>12} {'hit rate':>8} {'naive prog/s':>12} "
            f"{'no-cache prog/s':>15} {'transformers':>12} {'floor prog/s':>12} {'cache x':>7} {'aware x':>7} "
            f"{'braid/floor':>11}")
    print(head)
    for n, r in rows.items():
        p = shapes[n].programs
        braid, naive = r["braid"], r["naive"]
        floor = floor_seconds(braid, weights, bw, tflops, decode_steps(n, shapes[n]))
        nocache = r.get("nocache")
        hf = r.get("transformers")
        print(f"{n:>10} {p:>8} {p / braid.seconds:>12.2f} {braid.hit_rate:>8.1%} {p / naive.seconds:>12.2f} "
              f"{(f'{p / nocache.seconds:.2f}' if nocache else '-'):>15} {(f'{p / hf:.2f}' if hf else '-'):>12} "
              f"{p / floor:>12.2f} {(f'{nocache.seconds / braid.seconds:.2f}' if nocache else '-'):>7} "
              f"{naive.seconds / braid.seconds:>7.2f} {floor / braid.seconds:>11.1%}")


if __name__ == "__main__":
    main()
