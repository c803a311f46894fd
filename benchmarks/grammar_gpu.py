"""Constrained decoding on the GPU: the per-step cost of grammar masking, and what jump-forward
buys, on a random Llama-3.1-8B-shaped bf16 model (SmolLM2's tokenizer, so the grammars are real).

    python -m benchmarks.grammar_gpu [--model DIR] [--batches 1,16,64] [--backends xgrammar,outlines] [--profile-host]
                                     [--fill-only]

(1) Masking cost: `batch` requests decode `out` tokens greedily, unconstrained (ignore_eos) and
    under a JSON schema whose one string field outlasts `out` (jump-forward off, so every step
    is a masked decode step), alternating the two 7 times. Reported: the median seconds per
    decode step for each and the overhead.
(2) Jump-forward: one request under a schema with long fixed keys, greedy, end-to-end latency
    with jump-forward on and off (median of 3), beside transformers' `generate` with xgrammar's
    logits processor on the same model and schema (the usual peer setup).
(3) Standalone fill (``--fill-only`` runs only this): 64 matchers of the masking schema walk 64
    random steps inside the string, outside any engine; the median time to fill all 64 rows.
    Beside the engine's profile this tells the host CPU's own speed from what the engine adds.
The floor is the time to read the weights once at the copy bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import json
import os
import pstats
import statistics
import time

import torch

from benchmarks.common import copy_bandwidth_gbs, param_bytes, sync
from benchmarks.make_random_llama import LLAMA31_8B
from benchmarks.make_random_llama import ensure_model

REPEATS = 3
MASK_ROUNDS = 7  # free / masked pairs per batch size
LONG_STRING = {"type": "object", "properties": {"text": {"type": "string"}},
               "required": ["text"], "additionalProperties": False}  # fmt: skip
_KEYS = ["customer_billing_address_first_line", "customer_billing_address_postal_code",
         "shipment_requested_delivery_window", "invoice_payment_terms_and_conditions",
         "purchase_order_reference_identifier", "warehouse_dispatch_confirmation_flag"]  # fmt: skip
FIXED_KEYS = {
    "type": "object", "additionalProperties": False, "required": _KEYS,
    "properties": {k: ({"type": "boolean"} if k.endswith("flag") else {"enum": ["standard", "express", "none"]})
                   for k in _KEYS},
}  # fmt: skip


def timed(fn) -> tuple[float, object]:
    times, out = [], None
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


class HostClock:
    """Scheduler-thread time per decode step that is not spent waiting for the GPU: the time
    inside ``Scheduler.step`` minus the waits for in-flight tokens. When it reaches the step
    time, the host, not the GPU, sets the pace, and any host work (mask fills) adds to it."""

    def __init__(self, eng) -> None:
        from braid.runtime import scheduler

        self.busy = self.waits = 0.0
        self.profile: cProfile.Profile | None = None  # set: the steps run under it
        sched, in_flight = eng.scheduler, scheduler.InFlight
        step, token_list = sched.step, in_flight.token_list

        def timed_step():
            t0 = time.perf_counter()
            prof = self.profile
            if prof is not None:
                prof.enable()  # on the scheduler thread, which cProfile follows only from here
            try:
                step()
            finally:
                if prof is not None:
                    prof.disable()
                self.busy += time.perf_counter() - t0

        def timed_tokens(flight):
            t0 = time.perf_counter()
            try:
                return token_list(flight)
            finally:
                self.waits += time.perf_counter() - t0

        sched.step, in_flight.token_list = timed_step, timed_tokens
        self._undo = lambda: (delattr(sched, "step"), setattr(in_flight, "token_list", token_list))

    def take(self) -> float:
        """Busy seconds since the last take."""
        busy, self.busy, self.waits = self.busy - self.waits, 0.0, 0.0
        return busy

    def close(self) -> None:
        self._undo()


def masking_rows(eng, batch: int, n_out: int, vocab: int, profile: bool = False) -> tuple[float, float, float, float]:
    """Seconds per step unconstrained and constrained for ``batch`` rows, then the scheduler
    thread's busy seconds per step for each (HostClock). ``profile``: then print the scheduler
    thread's functions in one more masked run, most time first."""
    g = torch.Generator().manual_seed(batch)
    prompts = torch.randint(1, vocab, (batch, 32), generator=g).tolist()
    free = {"max_new_tokens": n_out, "temperature": 0, "ignore_eos": True}
    tied = {"max_new_tokens": n_out, "temperature": 0, "json_schema": LONG_STRING, "jump_forward": False}
    eng.generate(input_ids=prompts, sampling_params={**tied, "max_new_tokens": 4})  # compile + warm up

    def run(params):
        eng.flush_cache()
        outs = eng.generate(input_ids=prompts, sampling_params=params)
        return max(o["meta_info"]["completion_tokens"] for o in outs)

    per_step = {"free": [], "tied": []}
    host = {"free": [], "tied": []}
    clock = HostClock(eng)
    try:
        for _ in range(MASK_ROUNDS):  # interleaved: the host's launch speed drifts over seconds
            for label, params in (("free", free), ("tied", tied)):
                clock.take()
                t0 = time.perf_counter()
                steps = run(params)
                per_step[label].append((time.perf_counter() - t0) / steps)
                host[label].append(clock.take() / steps)
        if profile:
            clock.profile = cProfile.Profile()
            run(tied)
            print(f"scheduler thread, one masked run at batch {batch}:")
            pstats.Stats(clock.profile).sort_stats("tottime").print_stats(25)
    finally:
        clock.close()
    return (statistics.median(per_step["free"]), statistics.median(per_step["tied"]),
            statistics.median(host["free"]), statistics.median(host["tied"]))


def standalone_fill(tokenizer_dir: str, backend: str, width: int = 0, rows: int = 64, steps: int = 64,
                    pooled: bool = False) -> float:  # fmt: skip
    """Median seconds to fill ``rows`` masks, matchers walking random tokens inside the string of
    LONG_STRING (never the closing quote while another token is allowed), outside any engine.
    ``width``: the logits' width (0: the tokenizer's), as a model wider than its tokenizer has.
    ``pooled`` (llguidance): every row in one call on llguidance's thread pool, not row by row."""
    import random

    from transformers import AutoTokenizer

    from braid.grammar import GrammarSpec, allocate_bitmask, create_backend, fill_bitmasks

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    vocab, stops = len(tok), [tok.eos_token_id]
    grammar = create_backend(backend, tok, max(width, vocab), stops)
    compiled = grammar.compile(GrammarSpec("json_schema", json.dumps(LONG_STRING)))
    matchers = [grammar.matcher(compiled) for _ in range(rows)]
    quotes = [tok.decode([i]).count('"') + (i in stops) * 9 for i in range(vocab)]  # what closes the string
    rng, bitmask, times = random.Random(0), allocate_bitmask(rows, max(width, vocab)), []
    shifts = torch.arange(32, dtype=torch.int32)
    fill = functools.partial(fill_bitmasks, matchers, bitmask)
    if pooled:  # no matcher stops inside the string: every row is llguidance's to fill
        import llguidance

        executor, pairs = llguidance.LLExecutor(), [(m._m, j) for j, m in enumerate(matchers)]
        fill = functools.partial(executor.unsafe_compute_mask_ptr, pairs, bitmask.data_ptr(), bitmask.shape[1] * 4,
                                 rows)  # fmt: skip
    for _ in range(steps):
        t0 = time.perf_counter()
        fill()
        times.append(time.perf_counter() - t0)
        for row, m in zip(bitmask, matchers):
            ids = torch.nonzero(((row[:, None] >> shifts) & 1).reshape(-1)[:vocab]).flatten().tolist()
            fewest = min(quotes[t] for t in ids)
            assert m.accept_token(rng.choice([t for t in ids if quotes[t] == fewest]))
    return statistics.median(times)


def cpu_quota() -> str:
    """The cgroup's CPU limit ("max" = none), which ``sched_getaffinity`` does not show."""
    for path in ("/sys/fs/cgroup/cpu.max", "/sys/fs/cgroup/cpu/cpu.cfs_quota_us"):
        try:
            with open(path) as f:
                return f.read().strip()
        except OSError:
            continue
    return "unknown"


def jump_rows(eng, n_out: int) -> dict[str, tuple[float, int, int]]:
    """label -> (seconds, completion tokens, jumped tokens) for one greedy request."""
    out = {}
    for label, jump in (("jump-forward on", True), ("jump-forward off", False)):
        params = {"max_new_tokens": n_out, "temperature": 0, "json_schema": FIXED_KEYS, "jump_forward": jump}
        eng.generate(prompt="Extract the order:", sampling_params=params)
        t, o = timed(lambda p=params: eng.generate(prompt="Extract the order:", sampling_params=p))
        out[label] = (t, o["meta_info"]["completion_tokens"], o["meta_info"]["jump_forward_tokens"])
        assert o["meta_info"]["valid"], o
    return out


def hf_xgrammar_latency(model_dir: str, n_out: int, device: torch.device) -> tuple[float, int]:
    import xgrammar as xgr
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).to(device).eval()
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=model.config.vocab_size)
    grammar = xgr.GrammarCompiler(info).compile_json_schema(json.dumps(FIXED_KEYS), any_whitespace=False)
    ids = tok("Extract the order:", return_tensors="pt").input_ids.to(device)

    def run():
        proc = xgr.contrib.hf.LogitsProcessor(grammar)
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=n_out, do_sample=False, logits_processor=[proc],
                                 pad_token_id=0, eos_token_id=tok.eos_token_id,
                                 attention_mask=torch.ones_like(ids))
        sync(device)
        return out.shape[1] - ids.shape[1]

    run()
    return timed(run)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="/tmp/llama31-8b-random")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--backends", default="xgrammar,outlines")
    ap.add_argument("--out-tokens", type=int, default=64)
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--skip-jump", action="store_true", help="masking cost only")
    ap.add_argument("--profile-host", action="store_true",
                    help="profile the scheduler thread in a masked run at the largest batch")
    ap.add_argument("--fill-only", action="store_true", help="only the standalone fill (3): no engine, no GPU")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU: checks the script only")
    a = ap.parse_args()
    dev = torch.device("cpu" if a.dry_run else "cuda")
    if not a.fill_only:
        ensure_model(a.model, a.layers, dev, a.dry_run)
    # the model's tokenizer; --fill-only needs no model: $BRAID_TOKENIZER_DIR, which the model gets
    tokenizer_dir = os.environ.get("BRAID_TOKENIZER_DIR", a.model) if a.fill_only else a.model
    print(f"CPUs usable: {len(os.sched_getaffinity(0))} of {os.cpu_count()}, cgroup quota: {cpu_quota()}", flush=True)
    for backend in a.backends.split(","):
        for width in (0, LLAMA31_8B["vocab_size"]):  # the tokenizer's width, and the benchmark model's logits
            t = standalone_fill(tokenizer_dir, backend, width)
            print(f"standalone fill, {backend}, {width or 'tokenizer'} wide: 64 rows in {t * 1e3:.2f} ms "
                  f"({t / 64 * 1e6:.1f} us a row)", flush=True)  # fmt: skip
        if backend == "llguidance":
            t = standalone_fill(tokenizer_dir, backend, LLAMA31_8B["vocab_size"], pooled=True)
            print(f"standalone fill, llguidance on its thread pool, {LLAMA31_8B['vocab_size']} wide: 64 rows in "
                  f"{t * 1e3:.2f} ms ({t / 64 * 1e6:.1f} us a row)", flush=True)  # fmt: skip
    if a.fill_only:
        return
    bw = copy_bandwidth_gbs(dev, mbytes=64 if a.dry_run else 2048)
    import braid as bd

    batches = [int(b) for b in a.batches.split(",")]
    mask, jumps = {}, {}
    for backend in a.backends.split(","):
        with bd.Engine(model_path=a.model, dtype="bfloat16", device=dev.type, context_len=4096,
                       max_running_requests=max(batches), grammar_backend=backend,
                       max_total_tokens=20000 if a.dry_run else None) as eng:
            weights = param_bytes(eng.runner.model)
            for b in batches:
                mask[backend, b] = masking_rows(eng, b, a.out_tokens, eng.vocab_size,
                                                profile=a.profile_host and b == max(batches))
            if not a.skip_jump:
                jumps[backend] = jump_rows(eng, 160)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    hf = None if a.skip_transformers else hf_xgrammar_latency(a.model, 160, dev)
    floor_step = weights / (bw * 1e9)
    name = "CPU (dry run)" if a.dry_run else torch.cuda.get_device_name()
    print(f"{name}: copy {bw:.0f} GB/s, weights {weights / 1e9:.2f} GB, floor {floor_step * 1e3:.2f} ms/step")
    print(f"{'backend':>9} {'batch':>5} {'free ms/step':>13} {'masked ms/step':>15} {'overhead':>9} {'free/floor':>11}"
          f" {'host busy ms/step free / masked':>32}")  # fmt: skip
    for (backend, b), (free, tied, host_free, host_tied) in mask.items():
        print(f"{backend:>9} {b:>5} {free * 1e3:>13.2f} {tied * 1e3:>15.2f} {tied / free - 1:>9.1%} "
              f"{floor_step / free:>11.1%} {host_free * 1e3:>16.2f} / {host_tied * 1e3:.2f}")
    if jumps:
        print(f"\njump-forward, batch 1, schema with {len(_KEYS)} long fixed keys, greedy:")
    for backend, rows in jumps.items():
        for label, (t, n, jumped) in rows.items():
            print(f"{backend:>9} {label:<17} {t * 1e3:9.1f} ms  {n} tokens ({jumped} jumped)")
        on, off = rows["jump-forward on"][0], rows["jump-forward off"][0]
        print(f"{backend:>9} speed-up {off / on:.2f}x")
    if hf is not None:
        print(f"transformers generate + xgrammar logits processor: {hf[0] * 1e3:9.1f} ms  {hf[1]} tokens")


if __name__ == "__main__":
    main()
