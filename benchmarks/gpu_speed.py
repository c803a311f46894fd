"""The GPU-speed issue's three workloads: braid beside transformers and the hardware floor, all
measured in one run on a random Llama-3.1-8B-shaped bf16 model.

    python -m benchmarks.gpu_speed [--workloads decode,offline,prefix] [--configs default,eager]
                                   [--skip-transformers] [--dry-run] [--set KEY=VALUE ...]
                                   [--profile WORKLOAD]

- decode: one request, 128 random prompt tokens, 256 greedy output tokens; output tok/s
  (median of 3). Floor: the weights read once per token at the copy bandwidth measured here.
- offline: 256 requests of 512 prompt / 128 output tokens submitted at once; output tok/s.
  Floor: the step FLOPs of every token (2 x linear weights per token, the LM head only for the
  sampled rows) at the bf16 matmul rate measured here. Also printed: the time of the prefill
  phase (the same prompts with 1 output token) and of the rest (decode), and a roofline that
  adds each decode step's memory bound (weights plus every row's KV at the copy bandwidth).
- prefix: 64 requests sharing a 2,000-token prefix, each with 64 own tokens and 64 output
  tokens, from a cold cache; seconds. Beside it: the same 64 suffixes alone (no shared
  prefix), and the floor (prefix once + suffixes at the matmul rate, plus 64 decode steps at
  the copy bandwidth).

``--configs`` picks the braid columns: ``default`` (CUDA graphs and the overlap scheduler on),
``no-graphs``, ``no-overlap`` (neither decode steps nor extends overlapped), ``eager`` (both off),
``no-cascade`` (a shared prefix read once per request, as before cascade attention), or ``none``
(transformers alone, so that a long run can be split in two calls; the floors then come from its
model). transformers runs ``generate`` for decode and prefix and ``generate_batch`` (its
continuous batching) for offline.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

from benchmarks.common import copy_bandwidth_gbs, matmul_tflops, param_bytes, sync
from benchmarks.make_random_llama import ensure_model

REPEATS = 3
CONFIGS = {  # braid column -> engine flags
    "default": {},
    "no-graphs": {"disable_cuda_graph": True},
    "no-overlap": {"disable_overlap_schedule": True},
    "eager": {"disable_cuda_graph": True, "disable_overlap_schedule": True},
    "no-cascade": {"disable_cascade_attention": True},
}


def random_ids(count: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (count, length), generator=g).tolist()


class Shapes:
    def __init__(self, dry: bool) -> None:
        scale = 8 if dry else 1
        self.decode = (128 // scale, 256 // scale)
        self.offline = (256 // scale, 512 // scale, 128 // scale)
        self.prefix = (64 // scale, 2000 // scale, 64 // scale, 64 // scale)  # requests, shared, own, out


def timed(fn, repeats: int = REPEATS) -> float:
    """Median seconds of ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ------------------------------------------------------------------------------------ braid
def braid_calls(eng, shapes: Shapes, vocab: int) -> dict[str, Callable[[], object]]:
    """One run of each braid workload (and of its companions), from a cold cache."""
    greedy = {"temperature": 0, "ignore_eos": True}

    def cold(prompts: list[list[int]], n_out: int) -> Callable[[], object]:
        def run():
            eng.flush_cache()
            return eng.generate(input_ids=prompts, sampling_params={**greedy, "max_new_tokens": n_out})
        return run

    n_in, n_out = shapes.decode
    count, o_in, o_out = shapes.offline
    offline = random_ids(count, o_in, vocab, 2)
    p_count, shared, own, p_out = shapes.prefix
    prefix = random_ids(1, shared, vocab, 3)[0]
    suffixes = random_ids(p_count, own, vocab, 4)
    return {
        "decode": cold(random_ids(1, n_in, vocab, 1), n_out),
        "offline": cold(offline, o_out),
        "offline prefill": cold(offline, 1),  # every prompt's prefill and first token: the rest is decode
        "prefix": cold([prefix + s for s in suffixes], p_out),
        "suffixes alone": cold(suffixes, p_out),
    }


def braid_runs(eng, shapes: Shapes, workloads: list[str], vocab: int) -> dict[str, float]:
    warm = {"temperature": 0, "ignore_eos": True, "max_new_tokens": 8}
    eng.generate(input_ids=random_ids(8, 64, vocab, 0), sampling_params=warm)  # compiles the kernels
    calls = braid_calls(eng, shapes, vocab)
    out: dict[str, float] = {}
    if "decode" in workloads:
        out["decode"] = shapes.decode[1] / timed(calls["decode"])
    if "offline" in workloads:
        count, _, n_out = shapes.offline
        total = timed(calls["offline"], repeats=1 if count > 64 else REPEATS)
        out["offline"] = count * n_out / total
        prefill = timed(calls["offline prefill"], repeats=1)
        out["offline prefill s"], out["offline decode s"] = prefill, total - prefill
    if "prefix" in workloads:
        out["prefix"] = timed(calls["prefix"])
        out["suffixes alone"] = timed(calls["suffixes alone"])
    return out


def profile_run(call: Callable[[], object], dev: torch.device, rows: int = 20) -> None:
    """The GPU kernels of one run, most time first: where a workload's time goes. CUPTI records
    kernels from every thread; CPU ops run on the engine's scheduler thread, which the
    profiler does not follow, so a CPU dry run prints an empty table."""
    from torch.profiler import ProfilerActivity, profile

    cuda = dev.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        call()
        sync(dev)
    print(prof.key_averages().table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total",
                                    row_limit=rows, max_name_column_width=70))


# ----------------------------------------------------------------------------- transformers
def hf_runs(model, shapes: Shapes, workloads: list[str], vocab: int) -> dict[str, float | str]:
    dev = model.device
    out: dict[str, float | str] = {}

    def generate(prompts: list[list[int]], n_out: int) -> None:
        ids = torch.tensor(prompts, device=dev)
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_out, min_new_tokens=n_out,
                       do_sample=False, pad_token_id=0)
        sync(dev)

    with torch.inference_mode():
        generate(random_ids(1, 16, vocab, 0), 4)
        if "decode" in workloads:
            n_in, n_out = shapes.decode
            prompt = random_ids(1, n_in, vocab, 1)
            out["decode"] = n_out / timed(lambda: generate(prompt, n_out))
        if "offline" in workloads:
            out["offline"], out["offline how"] = hf_offline(model, shapes, vocab)
        if "prefix" in workloads:
            count, shared, own, n_out = shapes.prefix
            prefix = random_ids(1, shared, vocab, 3)[0]
            prompts = [prefix + s for s in random_ids(count, own, vocab, 4)]
            out["prefix"] = timed(lambda: generate(prompts, n_out), repeats=1)
    return out


def hf_offline(model, shapes: Shapes, vocab: int) -> tuple[float, str]:
    """Output tok/s of transformers' continuous batching; padded ``generate`` in batches of 64
    where this transformers has no ``generate_batch``."""
    from transformers import GenerationConfig

    count, n_in, n_out = shapes.offline
    prompts = random_ids(count, n_in, vocab, 2)
    if hasattr(model, "generate_batch"):
        cfg = GenerationConfig(max_new_tokens=n_out, min_new_tokens=n_out, do_sample=False, eos_token_id=-1,
                               pad_token_id=0)
        t0 = time.perf_counter()
        results = model.generate_batch(inputs=prompts, generation_config=cfg, progress_bar=False)
        sync(model.device)
        tokens = sum(len(r.generated_tokens) for r in results.values())
        return tokens / (time.perf_counter() - t0), "generate_batch"
    t0 = time.perf_counter()
    for i in range(0, count, 64):
        ids = torch.tensor(prompts[i : i + 64], device=model.device)
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_out, min_new_tokens=n_out,
                       do_sample=False, pad_token_id=0)
    sync(model.device)
    return count * n_out / (time.perf_counter() - t0), "generate, batches of 64"


# ---------------------------------------------------------------------------------- floors
def floors(model, kv_token_bytes: int, shapes: Shapes, bw_gbs: float, tflops: float) -> dict[str, float]:
    """The best any engine could do with these weights on this GPU, per workload
    (``kv_token_bytes``: the K and V of one token over all layers)."""
    head = model.lm_head.weight.numel()
    body = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear)) - head
    weights_s = param_bytes(model) / (bw_gbs * 1e9)  # one read of every weight

    def compute_s(tokens: int, sampled: int) -> float:
        return 2 * (body * tokens + head * sampled) / (tflops * 1e12)

    def decode_step_s(batch: int, context: int) -> float:
        """One decode step: its matmuls, or reading the weights and every row's KV, whichever is longer."""
        return max(compute_s(batch, batch), weights_s + batch * context * kv_token_bytes / (bw_gbs * 1e9))

    count, n_in, n_out = shapes.offline
    pcount, shared, own, p_out = shapes.prefix
    prefix_s = compute_s(shared + pcount * own, pcount) + p_out * max(weights_s, compute_s(pcount, pcount))
    prefill_s = compute_s(count * n_in, count)
    return {
        "decode": 1 / weights_s,
        "offline": count * n_out / compute_s(count * (n_in + n_out), count * n_out),
        # prefill at the matmul rate, then each decode step at its own bound (weights + KV read)
        "offline roofline": count * n_out / (prefill_s + sum(decode_step_s(count, n_in + i) for i in range(1, n_out))),
        "offline prefill s": prefill_s,
        "offline decode s": sum(decode_step_s(count, n_in + i) for i in range(1, n_out)),
        "prefix": prefix_s,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="/tmp/llama31-8b-random")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--workloads", default="decode,offline,prefix")
    ap.add_argument("--configs", default="default", help=f"braid columns, comma list of {', '.join(CONFIGS)}")
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU: checks the script only")
    ap.add_argument("--profile", choices=["decode", "offline", "offline prefill", "prefix", "suffixes alone"],
                    help="after the timings, profile one run of this workload on the first braid column")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="an engine option for every braid column, e.g. --set chunked_prefill_size=8192")
    a = ap.parse_args()
    extra = {}
    for item in a.set:
        key, sep, value = item.partition("=")
        if not sep:
            ap.error(f"--set wants KEY=VALUE, got {item!r}")
        extra[key] = json.loads(value) if value[:1] in "-0123456789tfn[{" else value
    workloads = a.workloads.split(",")
    dev = torch.device("cpu" if a.dry_run else "cuda")
    shapes = Shapes(a.dry_run)
    bw = copy_bandwidth_gbs(dev, mbytes=64 if a.dry_run else 2048)
    tflops = matmul_tflops(dev, torch.bfloat16, n=512 if a.dry_run else 8192)
    ensure_model(a.model, a.layers, dev, a.dry_run, vocab_size=1000)
    import braid as bd

    columns: dict[str, dict[str, float]] = {}
    configs = [] if a.configs == "none" else a.configs.split(",")
    if not configs and a.skip_transformers:
        ap.error("--configs none --skip-transformers leaves nothing to run")
    for config in configs:
        with bd.Engine(model_path=a.model, dtype="bfloat16", context_len=4096, device=dev.type,
                       max_total_tokens=40000 if a.dry_run else None, **{**CONFIGS[config], **extra}) as eng:
            graphs = eng.runner.graphs
            label = f"braid {config}" + "".join(f" {k}={v}" for k, v in extra.items())
            if graphs is not None:
                print(f"captured {len(graphs.sizes)} decode graphs in {graphs.capture_seconds:.1f} s", flush=True)
            vocab = eng.vocab_size
            columns[label] = braid_runs(eng, shapes, workloads, vocab)
            if a.profile and config == configs[0]:
                print(f"profile of one '{a.profile}' run, {label}:", flush=True)
                profile_run(braid_calls(eng, shapes, vocab)[a.profile], dev)
            kv = eng.runner.kv
            floor = floors(eng.runner.model, sum(t[0].nbytes for t in (*kv.k, *kv.v)), shapes, bw, tflops)
            print(label, columns[label], flush=True)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    if not a.skip_transformers:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.bfloat16).to(dev).eval()
        cfg = model.config
        if not configs:  # transformers alone (--configs none): the floors from its model
            head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
            kv_bytes = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * 2  # K and V, bf16
            floor = floors(model, kv_bytes, shapes, bw, tflops)
            vocab = cfg.vocab_size
        columns["transformers"] = hf_runs(model, shapes, workloads, vocab)
        print("transformers", columns["transformers"], flush=True)
    name = "CPU (dry run)" if a.dry_run else torch.cuda.get_device_name()
    print(f"\n{name}: copy {bw:.0f} GB/s, bf16 matmul {tflops:.0f} TFLOP/s")
    units = {"decode": "out tok/s", "offline": "out tok/s", "prefix": "seconds"}
    names = list(columns)
    print(f"{'workload':>10} {'unit':>10}" + "".join(f" {n:>14}" for n in names) + f" {'floor':>10} {'best/floor':>10}")
    for w in workloads:
        vals = [columns[n].get(w) for n in names]
        braid_vals = [columns[n][w] for n in names if n.startswith("braid")] or [columns["transformers"][w]]
        best = min(braid_vals) if w == "prefix" else max(braid_vals)
        frac = floor[w] / best if w == "prefix" else best / floor[w]
        cells = "".join(f" {v:>14.1f}" if v is not None else f" {'-':>14}" for v in vals)
        print(f"{w:>10} {units[w]:>10}{cells} {floor[w]:>10.1f} {frac:>10.1%}")
    if "prefix" in workloads:
        alone = [columns[n]["suffixes alone"] for n in names if n.startswith("braid")]
        if alone:
            print(f"prefix: the 64 suffixes alone took {min(alone):.2f} s in braid (no shared prefix)")
    if "offline" in workloads:
        for n in names:
            if n.startswith("braid"):
                c = columns[n]
                print(f"offline phases, {n}: prefill (1 token out) {c['offline prefill s']:.2f} s, decode "
                      f"{c['offline decode s']:.2f} s; floors {floor['offline prefill s']:.2f} s (matmul rate) and "
                      f"{floor['offline decode s']:.2f} s (weights + KV at the copy bandwidth, or matmuls)")
        print(f"offline roofline (prefill compute + decode memory or compute): {floor['offline roofline']:.0f} tok/s")
    if "offline how" in columns.get("transformers", {}):
        print(f"transformers offline: {columns['transformers']['offline how']}")


if __name__ == "__main__":
    main()
