"""Where a decode step's time goes: the model forward (device-synchronised) versus the
scheduler's own work (batch assembly, sampling, bookkeeping), driven step by step.

    python -m benchmarks.step_breakdown --model DIR [--batches 1,64] [--device cuda]
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import sync


def breakdown(eng, batch: int, n_in: int, steps: int) -> tuple[float, float]:
    from braid.runtime.messages import AddRequest
    from braid.runtime.sampling_params import SamplingParams

    sched = eng.scheduler
    params = SamplingParams.from_dict({"max_new_tokens": steps + 8, "temperature": 0, "ignore_eos": True}).to_dict()
    g = torch.Generator().manual_seed(batch)
    for i, ids in enumerate(torch.randint(1, eng.vocab_size, (batch, n_in), generator=g).tolist()):
        sched._add(AddRequest(rid=f"b{batch}-{i}", input_ids=ids, sampling=params))
    while sched.waiting or sched.chunked:
        sched.step()
    for _ in range(3):
        sched.step()
    real, spent = sched.runner.forward, [0.0]

    def timed(fb):
        sync(eng.runner.device)
        t0 = time.perf_counter()
        out = real(fb)
        sync(eng.runner.device)
        spent[0] += time.perf_counter() - t0
        return out

    sched.runner.forward = timed
    t0 = time.perf_counter()
    for _ in range(steps):
        sched.step()
    total = (time.perf_counter() - t0) / steps
    sched.runner.forward = real
    while sched.has_work:
        sched.step()
    return total, spent[0] / steps


def detach_scheduler(eng) -> None:
    """Stop the engine's scheduler thread, keeping the engine (its model stays on the device),
    so this thread can drive ``scheduler.step()`` itself."""
    from braid.runtime.messages import FlushCache

    eng.scheduler._stop = True
    eng.scheduler.inbox.put(FlushCache())  # wakes the loop, which then sees _stop
    eng._thread.join(timeout=30)
    assert not eng._thread.is_alive(), "the scheduler thread did not stop"
    eng.scheduler._stop = False


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--steps", type=int, default=32)
    a = ap.parse_args()
    import braid as bd

    eng = bd.Engine(model_path=a.model, device=a.device, dtype=a.dtype, context_len=4096)
    detach_scheduler(eng)
    print(f"{'batch':>5} {'step ms':>8} {'forward ms':>11} {'scheduler ms':>13} {'tok/s':>8}")
    for b in [int(x) for x in a.batches.split(",")]:
        total, fwd = breakdown(eng, b, 128, a.steps)
        print(f"{b:>5} {total * 1e3:>8.2f} {fwd * 1e3:>11.2f} {(total - fwd) * 1e3:>13.2f} {b / total:>8.1f}")


if __name__ == "__main__":
    main()
