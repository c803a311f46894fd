"""The overlap scheduler (a decode step launched before the host takes the previous step's
tokens) against the plain one: the same tokens and texts for greedy, seeded sampled, penalized,
stop-string, length-limited, constrained (with jump-forward) and logprob requests mixed in one
batch, requests arriving mid-decode and aborted mid-decode, and the KV invariant after. On CUDA
overlap is the default; here it is switched on by hand (the CPU's device work is synchronous, so
the steps run in the same order, one token behind)."""

from __future__ import annotations

import asyncio
import json

import pytest

from tests.conftest import assert_at_rest
from tests.engine_helpers import make_engine_model, random_prompts

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "maximum": 999}}, "required": ["name", "age"]}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_engine_model("llama", tmp_path_factory.mktemp("overlap"))


def mixed_params() -> list[dict]:
    greedy = {"temperature": 0, "ignore_eos": True}
    return [
        {**greedy, "max_new_tokens": 9},
        {**greedy, "max_new_tokens": 23},
        {"temperature": 1.0, "top_p": 0.9, "seed": 3, "max_new_tokens": 17, "ignore_eos": True},
        {"temperature": 0.8, "seed": 4, "frequency_penalty": 0.5, "max_new_tokens": 15, "ignore_eos": True},
        {**greedy, "max_new_tokens": 30, "stop": ["e", "a"]},
        {"temperature": 1.0, "seed": 5, "max_new_tokens": 60, "json_schema": json.dumps(SCHEMA)},
        {**greedy, "max_new_tokens": 6, "min_new_tokens": 4},
        {"temperature": 1.0, "seed": 6, "max_new_tokens": 12},  # may stop at EOS
    ]


def count_overlapped_steps(eng) -> list[int]:
    calls: list[int] = []
    original = eng.scheduler._run_decode_overlapped
    eng.scheduler._run_decode_overlapped = lambda: (calls.append(1), original())[1]
    return calls


def run(eng, overlap: bool, prompts, params, **kwargs):
    eng.scheduler.overlap = overlap
    return eng.generate(input_ids=prompts, sampling_params=params, **kwargs)


def strip(outs):
    return [(o["text"], o["output_ids"], o["meta_info"]["finish_reason"]) for o in outs]


def test_same_outputs_with_and_without_overlap(folder, make_engine):
    eng = make_engine(folder)
    prompts = random_prompts(8, 3, 40, 500, seed=8)
    params = mixed_params()
    plain = run(eng, False, prompts, params)
    eng.flush_cache()
    steps = count_overlapped_steps(eng)
    overlapped = run(eng, True, prompts, params)
    assert len(steps) > 20
    assert strip(overlapped) == strip(plain)
    constrained = overlapped[5]["meta_info"]
    assert constrained["valid"] is True or constrained["finish_reason"]["type"] == "length", constrained
    assert constrained["jump_forward_tokens"] > 0  # forced keys were appended in one step
    assert_at_rest(eng)


def test_logprob_requests_share_a_batch_with_overlap(folder, make_engine):
    eng = make_engine(folder)
    prompts = random_prompts(4, 5, 20, 500, seed=9)
    params = {"temperature": 0, "max_new_tokens": 10, "ignore_eos": True}
    wants = [True, False, True, False]  # logprob rows take the regular path, the others may overlap
    outs = {}
    for overlap in (False, True):
        eng.flush_cache()
        eng.scheduler.overlap = overlap

        async def together():  # one batch: the requests arrive together
            return await asyncio.gather(*[
                eng.async_generate(input_ids=p, sampling_params=params, return_logprob=w, top_logprobs_num=2 * w)
                for p, w in zip(prompts, wants)])

        outs[overlap] = asyncio.run(together())
    assert strip(outs[True]) == strip(outs[False])
    for a, b, w in zip(outs[True], outs[False], wants):
        if w:
            got, want = a["meta_info"]["output_token_logprobs"], b["meta_info"]["output_token_logprobs"]
            assert [t for _, t, _ in got] == [t for _, t, _ in want]
            assert max(abs(x[0] - y[0]) for x, y in zip(got, want)) < 1e-5
    assert_at_rest(eng)


def test_arrivals_and_aborts_during_overlapped_decode(folder, make_engine):
    eng = make_engine(folder)
    eng.scheduler.overlap = True
    prompts = random_prompts(6, 4, 30, 500, seed=10)
    greedy = {"temperature": 0, "ignore_eos": True, "max_new_tokens": 40}
    reference = [eng.generate(input_ids=p, sampling_params=greedy)["output_ids"] for p in prompts]
    eng.flush_cache()
    steps = count_overlapped_steps(eng)
    streams = [eng.generate(input_ids=p, sampling_params=greedy, stream=True) for p in prompts[:3]]
    first = [next(s) for s in streams]  # the three decode together, overlapped
    late = eng.generate(input_ids=prompts[3:], sampling_params=greedy)  # arrive mid-decode
    got = [f["output_ids"] + [t for chunk in s for t in chunk["output_ids"]] for f, s in zip(first[:2], streams[:2])]
    streams[2].close()  # aborts a request whose token may be in flight
    assert got == reference[:2]
    assert [o["output_ids"] for o in late] == reference[3:]
    assert len(steps) > 20
    assert_at_rest(eng)


def record_extends(eng) -> tuple[list[bool], list[int]]:
    """Per extend pass: whether the previous extend's first tokens were still in flight; per
    step: the requests decoding or about to (running + joining)."""
    sched, overlapped, live = eng.scheduler, [], []
    run_extend, step = sched._run_extend, sched.step
    sched._run_extend = lambda reqs: (overlapped.append(sched.joining is not None), run_extend(reqs))[1]
    sched.step = lambda: (step(), live.append(len(sched.running) + len(sched._joining_reqs)))[0]
    return overlapped, live


def test_extends_overlap_and_admission_counts_the_requests_in_flight(folder, make_engine):
    """Prefill in small chunks: each extend's first tokens stay on the device while the next
    extend is launched. The outputs equal the plain scheduler's, at most max_running_requests
    requests are ever decoding or joining, and the pool is at rest after."""
    prompts = random_prompts(9, 20, 60, 500, seed=11)
    params = [{**p, "max_new_tokens": min(p["max_new_tokens"], 12)} for p in mixed_params()] + [
        {"temperature": 0, "max_new_tokens": 1}]  # finishes at its first token, taken late
    outs = {}
    for overlap in (False, True):
        eng = make_engine(folder, chunked_prefill_size=48, max_running_requests=4)
        overlapped, live = record_extends(eng)
        outs[overlap] = strip(run(eng, overlap, prompts, params))
        assert max(live) <= 4, live
        assert any(overlapped) == overlap, overlapped
        assert_at_rest(eng)
    assert outs[True] == outs[False]


def test_abort_while_first_tokens_are_in_flight(folder, make_engine):
    """A request aborted while its first token is in flight ends as aborted (nothing of it is
    lost or left running)."""
    eng = make_engine(folder, chunked_prefill_size=48)
    eng.scheduler.overlap = True
    sched = eng.scheduler
    greedy = {"temperature": 0, "ignore_eos": True, "max_new_tokens": 30}
    prompts = random_prompts(3, 40, 45, 500, seed=12)
    aborted: list[str] = []
    run_extend = sched._run_extend

    def abort_joiners(reqs):  # the scheduler thread, between passes: as an abort arriving then
        run_extend(reqs)
        for req in sched._joining_reqs:
            if not aborted:
                aborted.append(req.rid)
                sched._abort(req.rid)

    sched._run_extend = abort_joiners
    outs = asyncio.run(_gather(eng, prompts, greedy))
    assert aborted
    by_rid = {o["meta_info"]["id"]: o for o in outs if not isinstance(o, Exception)}
    errors = [o for o in outs if isinstance(o, Exception)]
    assert (len(by_rid), len(errors)) in ((3, 0), (2, 1)), outs
    for rid, out in by_rid.items():
        want = "abort" if rid == aborted[0] else "length"
        assert out["meta_info"]["finish_reason"]["type"] == want, out["meta_info"]
    assert_at_rest(eng)


async def _gather(eng, prompts, params):
    return await asyncio.gather(*[eng.async_generate(input_ids=p, sampling_params=params) for p in prompts],
                                return_exceptions=True)


def test_shutdown_while_first_tokens_are_in_flight(folder, make_engine):
    """Driven step by step on a stopped scheduler: a shutdown that finds first tokens in flight
    fails those requests too, and their KV goes back to the pool."""
    from braid.runtime.messages import Shutdown

    sched = stopped_scheduler(make_engine(folder, chunked_prefill_size=48))
    for i, p in enumerate(random_prompts(3, 30, 40, 500, seed=13)):
        add(sched, f"r{i}", p, {"temperature": 0, "max_new_tokens": 8})
    reqs = list(sched.waiting)
    while sched.joining is None:
        sched.step()
    joiners = sched._joining_reqs
    assert joiners and not any(r.finished for r in joiners)
    sched.inbox.put(Shutdown())
    sched._receive(block=False)
    assert all(r.finished for r in reqs) and not sched.has_work
    sched.kv.check_at_rest()


def stopped_scheduler(eng):
    """The engine's scheduler with its thread stopped (weights and KV pool kept), overlap on: a
    test drives it step by step."""
    from braid.runtime.messages import Shutdown

    eng._closed = True
    eng.scheduler.inbox.put(Shutdown())
    eng._thread.join(timeout=30)
    sched = eng.scheduler
    sched._stop, sched.overlap = False, True
    return sched


def add(sched, rid: str, prompt: list[int], params: dict) -> None:
    from braid.runtime.messages import AddRequest
    from braid.runtime.sampling_params import SamplingParams

    sched._add(AddRequest(rid=rid, input_ids=prompt, sampling=SamplingParams.from_dict(params).to_dict()))


@pytest.mark.parametrize("fail_at", [2, 4])  # the forward calls: the long prompt's second chunk; the first decode
def test_a_failed_pass_spares_the_requests_of_passes_that_succeeded(folder, make_engine, fail_at):
    """Driven step by step: the first extend prefills a short prompt whole and a long one's
    first chunk, and the short one's first token is in flight when the next pass runs. When
    that pass (the long one's second chunk) fails, the short request still completes: only the
    long one ends with the error. When the first decode (both requests, overlapped) fails, both
    end with it. Either way the pool is at rest after: the failed decode's slots are freed."""
    sched = stopped_scheduler(make_engine(folder, chunked_prefill_size=48))
    runner, calls = sched.runner, []
    forward = runner.forward

    def failing(fb):
        calls.append(1)
        if len(calls) == fail_at:
            raise RuntimeError("injected failure")
        return forward(fb)

    runner.forward = failing
    greedy = {"temperature": 0, "ignore_eos": True, "max_new_tokens": 5}
    add(sched, "short", random_prompts(1, 30, 30, 500, seed=14)[0], greedy)
    add(sched, "long", random_prompts(1, 90, 90, 500, seed=15)[0], greedy)
    short, long = list(sched.waiting)
    sched.step()
    assert sched._joining_reqs == [short] and sched.chunked is long
    while sched.has_work:
        sched.step()
    runner.forward = forward
    assert short.finished and long.finished
    failed = {r.rid for r in (short, long) if r.finish_matched and "injected failure" in str(r.finish_matched)}
    assert failed == ({"long"} if fail_at == 2 else {"short", "long"}), failed
    assert fail_at != 2 or len(short.output_ids) == 5
    sched.kv.check_at_rest()
