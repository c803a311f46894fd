"""Online serving: ``braid serve`` under Poisson arrivals, against the offline engine on the
same requests, on a random Llama-3.1-8B-shaped bf16 model.

    python -m benchmarks.serving [--model DIR] [--rates 4,16,inf] [--requests 128] [--dry-run]

Each request is random token ids (input length uniform in [--in-min, --in-max]) sent to
/generate with streaming, greedy, ``ignore_eos``, output length uniform in [--out-min,
--out-max]. Per rate: request throughput, output tokens/s, time to first token and inter-token
latency (p50 / p99). Then the same requests through an in-process Engine, all at once (the
offline figure: the most the server could reach), and the floor from the copy bandwidth and
matmul rate measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import subprocess
import sys
import time
from dataclasses import dataclass

import torch

from benchmarks.common import copy_bandwidth_gbs, matmul_tflops
from benchmarks.make_random_llama import ensure_model


@dataclass
class Sample:
    ttft: float
    itls: list[float]
    out_tokens: int
    latency: float


def make_requests(n: int, vocab: int, in_rng: tuple[int, int], out_rng: tuple[int, int], seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"input_ids": [rng.randrange(1, vocab) for _ in range(rng.randint(*in_rng))],
             "sampling_params": {"max_new_tokens": rng.randint(*out_rng), "temperature": 0.0, "ignore_eos": True}}
            for _ in range(n)]


async def one_request(client, url: str, body: dict) -> Sample:
    start = time.perf_counter()
    times, tokens = [], 0
    async with client.stream("POST", f"{url}/generate", json={**body, "stream": True}) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                event = json.loads(line[6:])
                if len(event["output_ids"]) > tokens:
                    times.append(time.perf_counter())
                    tokens = len(event["output_ids"])
    itls = [b - a for a, b in zip(times, times[1:])]
    return Sample(times[0] - start, itls, tokens, times[-1] - start)


async def run_rate(url: str, requests: list[dict], rate: float, seed: int) -> tuple[float, list[Sample]]:
    import httpx

    rng = random.Random(seed)
    async with httpx.AsyncClient(timeout=httpx.Timeout(1800.0), limits=httpx.Limits(max_connections=4096)) as client:
        tasks = []
        start = time.perf_counter()
        for body in requests:
            tasks.append(asyncio.ensure_future(one_request(client, url, body)))
            if rate != float("inf"):
                await asyncio.sleep(rng.expovariate(rate))
        samples = await asyncio.gather(*tasks)
    return time.perf_counter() - start, list(samples)


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def start_server(model: str, extra: list[str]) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "braid.cli", "serve", "--model-path", model, "--port", "0", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        m = re.search(r"ready at (http://\S+)", line)
        if m:
            return proc, m.group(1)
    raise RuntimeError("the server did not start")


def offline(model: str, requests: list[dict], settings: dict) -> float:
    import braid as bd

    with bd.Engine(model_path=model, **settings) as eng:
        eng.generate(input_ids=requests[0]["input_ids"], sampling_params={"max_new_tokens": 2})
        start = time.perf_counter()
        eng.generate(input_ids=[r["input_ids"] for r in requests], sampling_params=[r["sampling_params"]
                                                                                    for r in requests])
        return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="/tmp/llama31-8b-random")
    ap.add_argument("--rates", default="4,16,inf", help="requests per second; inf = all at once")
    ap.add_argument("--requests", type=int, default=128)
    ap.add_argument("--in-min", type=int, default=128)
    ap.add_argument("--in-max", type=int, default=1024)
    ap.add_argument("--out-min", type=int, default=32)
    ap.add_argument("--out-max", type=int, default=256)
    ap.add_argument("--dry-run", action="store_true", help="tiny model on the CPU: checks the script")
    a = ap.parse_args()
    dev = torch.device("cpu" if a.dry_run else "cuda")
    bw = copy_bandwidth_gbs(dev, mbytes=64 if a.dry_run else 2048)
    tflops = matmul_tflops(dev, torch.bfloat16, n=512 if a.dry_run else 8192)
    ensure_model(a.model, 2 if a.dry_run else 32, dev, a.dry_run, vocab_size=49152)
    cfg = json.load(open(os.path.join(a.model, "config.json")))
    n = 8 if a.dry_run else a.requests
    out_rng = (4, 16) if a.dry_run else (a.out_min, a.out_max)
    requests = make_requests(n, min(cfg["vocab_size"], 32000), (a.in_min // 4 if a.dry_run else a.in_min,
                                                                a.in_max // 4 if a.dry_run else a.in_max), out_rng, 0)
    settings = {"dtype": "bfloat16", "context_len": 4096, "device": dev.type, "max_running_requests": 256}
    if a.dry_run:
        settings["max_total_tokens"] = 60000
    extra = [f"--{k.replace('_', '-')}={v}" for k, v in settings.items()]
    proc, url = start_server(a.model, extra)
    rows = []
    try:
        asyncio.run(run_rate(url, requests[:4], float("inf"), 1))  # warm-up
        for rate_text in a.rates.split(","):
            rate = float(rate_text)
            seconds, samples = asyncio.run(run_rate(url, requests, rate, 2))
            out = sum(s.out_tokens for s in samples)
            itls = [x for s in samples for x in s.itls]
            rows.append((rate_text, len(samples) / seconds, out / seconds, pct([s.ttft for s in samples], 0.5),
                         pct([s.ttft for s in samples], 0.99), pct(itls, 0.5), pct(itls, 0.99)))
            print(f"rate {rate_text}: {rows[-1][1]:.2f} req/s, {rows[-1][2]:.0f} out tok/s", flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    offline_s = offline(a.model, requests, settings)
    out_total = sum(r["sampling_params"]["max_new_tokens"] for r in requests)
    in_total = sum(len(r["input_ids"]) for r in requests)
    weights = 2 * sum(v for k, v in _param_count(cfg).items())
    steps = max(r["sampling_params"]["max_new_tokens"] for r in requests)
    floor_s = ((in_total + out_total) * weights / (tflops * 1e12)) + steps * weights / (bw * 1e9)
    name = "CPU (dry run)" if a.dry_run else torch.cuda.get_device_name()
    print(f"{name}: copy {bw:.0f} GB/s, bf16 matmul {tflops:.0f} TFLOP/s, weights {weights / 1e9:.2f} GB; "
          f"{n} requests, {in_total} input and {out_total} output tokens")
    print(f"{'rate':>6} {'req/s':>7} {'out tok/s':>10} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} {'ITL p99':>8}")
    for rate, rps, tps, t50, t99, i50, i99 in rows:
        print(f"{rate:>6} {rps:>7.2f} {tps:>10.0f} {t50 * 1e3:>7.0f}ms {t99 * 1e3:>7.0f}ms {i50 * 1e3:>6.1f}ms "
              f"{i99 * 1e3:>6.1f}ms")
    print(f"offline engine, all at once: {n / offline_s:.2f} req/s, {out_total / offline_s:.0f} out tok/s; "
          f"floor {out_total / floor_s:.0f} out tok/s")


def _param_count(cfg: dict) -> dict[str, int]:
    h, f, v, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    d = cfg.get("head_dim", h // cfg["num_attention_heads"])
    q, kv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d
    return {"layers": layers * (h * q + 2 * h * kv + q * h + 3 * h * f), "embed": v * h, "head": v * h}


if __name__ == "__main__":
    main()
