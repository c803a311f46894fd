"""Scheduler behaviour through the engine: policies, shared prefixes computed once, failure
isolation, token-level stop rules and context limits."""

from __future__ import annotations

import pytest

from braid.errors import RequestFailedError
from braid.runtime.policy import POLICIES
from braid.runtime.request import Req
from braid.runtime.sampling_params import SamplingParams
from tests.engine_helpers import make_engine_model, random_prompts

GREEDY = {"temperature": 0.0, "ignore_eos": True}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_engine_model("llama", tmp_path_factory.mktemp("sched"))


def _req(arrival: int) -> Req:
    return Req(rid=str(arrival), prompt_ids=[1, 2], params=SamplingParams(), arrival=arrival)


def test_policies_order_without_dropping():
    reqs = [_req(i) for i in (3, 0, 2, 1)]
    cached = {"3": 5, "0": 0, "2": 9, "1": 5}
    lpm = POLICIES.get("lpm")(reqs, lambda r: cached[r.rid])
    assert [r.rid for r in lpm] == ["2", "1", "3", "0"]  # longest prefix first, arrival breaks ties
    fcfs = POLICIES.get("fcfs")(reqs, lambda r: cached[r.rid])
    assert [r.rid for r in fcfs] == ["0", "1", "2", "3"]


@pytest.mark.parametrize("policy", ["lpm", "fcfs"])
def test_shared_prefix_is_computed_once(folder, make_engine, policy):
    common = random_prompts(1, 100, 100, 512, seed=20)[0]
    prompts = [common + tail for tail in random_prompts(8, 10, 10, 512, seed=21)]
    eng = make_engine(folder, schedule_policy=policy)
    outs = eng.generate(input_ids=prompts, sampling_params={**GREEDY, "max_new_tokens": 4})
    hits = sorted(o["meta_info"]["cached_tokens"] for o in outs)
    assert hits[0] == 0 and all(h >= 100 for h in hits[1:]), hits
    alone = [make_engine(folder, disable_radix_cache=True).generate(
        input_ids=p, sampling_params={**GREEDY, "max_new_tokens": 4})["output_ids"] for p in prompts[:2]]
    assert [o["output_ids"] for o in outs[:2]] == alone


def test_failed_forward_fails_only_its_batch(folder, make_engine):
    eng = make_engine(folder)
    real = eng.runner.forward
    calls = {"n": 0}

    def flaky(batch):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("simulated device error")
        return real(batch)

    eng.runner.forward = flaky
    with pytest.raises(RequestFailedError, match="simulated device error"):
        eng.generate(input_ids=[5, 6, 7], sampling_params={**GREEDY, "max_new_tokens": 3})
    out = eng.generate(input_ids=[5, 6, 7], sampling_params={**GREEDY, "max_new_tokens": 3})
    assert len(out["output_ids"]) == 3


def test_stop_token_ids_and_min_new_tokens(folder, make_engine):
    eng = make_engine(folder)
    prompt = random_prompts(1, 12, 12, 512, seed=22)[0]
    first = eng.generate(input_ids=prompt, sampling_params={**GREEDY, "max_new_tokens": 1})["output_ids"][0]
    stopped = eng.generate(input_ids=prompt, sampling_params={**GREEDY, "max_new_tokens": 8, "stop_token_ids": [first]})
    assert stopped["output_ids"] == [first]
    assert stopped["meta_info"]["finish_reason"] == {"type": "stop", "matched": first}
    held = eng.generate(input_ids=prompt, sampling_params={**GREEDY, "max_new_tokens": 8, "min_new_tokens": 3,
                                                           "stop_token_ids": [first]})
    assert held["output_ids"][0] != first and len(held["output_ids"]) >= 3


def test_generation_stops_at_the_context_length(folder, make_engine):
    eng = make_engine(folder, context_len=40)
    out = eng.generate(input_ids=list(range(1, 31)), sampling_params={**GREEDY, "max_new_tokens": 100})
    assert len(out["output_ids"]) == 10
    assert out["meta_info"]["finish_reason"] == {"type": "length", "length": 10}


def test_eos_ends_generation_unless_ignored(folder, make_engine):
    eng = make_engine(folder)
    prompt = random_prompts(1, 12, 12, 512, seed=23)[0]
    first = eng.generate(input_ids=prompt, sampling_params={**GREEDY, "max_new_tokens": 1})["output_ids"][0]
    # make the first greedy token an EOS of this request through stop_token_ids' sibling: the tokenizer's EOS
    eng.scheduler.outputs.eos_ids = frozenset({first})
    try:
        out = eng.generate(input_ids=prompt, sampling_params={"temperature": 0.0, "max_new_tokens": 5})
        assert out["output_ids"] == [first] and out["meta_info"]["finish_reason"]["matched"] == first
        kept = eng.generate(input_ids=prompt, sampling_params={**GREEDY, "max_new_tokens": 5})
        assert len(kept["output_ids"]) == 5
    finally:
        eng.scheduler.outputs.eos_ids = frozenset(eng.tokenizer.eos_token_ids)


def test_in_batch_sharers_wait_one_step(folder, make_engine):
    """Driven step by step on a stopped scheduler: of 8 requests arriving together with a
    common 100-token prefix, one is prefilled first; the others follow and reuse its KV."""
    from braid.runtime.messages import AddRequest, Shutdown

    eng = make_engine(folder)
    # stop the scheduler thread but keep the weights and KV pool (shutdown() would release them)
    eng._closed = True
    eng.scheduler.inbox.put(Shutdown())
    eng._thread.join(timeout=30)
    sched = eng.scheduler
    common = random_prompts(1, 100, 100, 512, seed=24)[0]
    prompts = [common + tail for tail in random_prompts(8, 10, 10, 512, seed=25)]
    params = SamplingParams.from_dict({**GREEDY, "max_new_tokens": 2}).to_dict()
    for i, p in enumerate(prompts):
        sched._add(AddRequest(rid=f"r{i}", input_ids=p, sampling=params))
    sched.step()
    assert len(sched.running) == 1 and len(sched.waiting) == 7
    sched.step()
    assert len(sched.running) == 8 and not sched.waiting
    assert all(r.cached_tokens >= 100 for r in sched.running[1:])
    while sched.has_work:
        sched.step()
    sched.kv.check_at_rest()


def test_a_request_as_large_as_the_pool_still_runs(folder, make_engine):
    """Alone, a request is admitted even when its reserve for future tokens would not fit."""
    eng = make_engine(folder, max_total_tokens=64, chunked_prefill_size=16)
    assert eng.context_len == 64
    out = eng.generate(input_ids=list(range(1, 51)), sampling_params={**GREEDY, "max_new_tokens": 1000})
    assert len(out["output_ids"]) == 14 and out["meta_info"]["finish_reason"]["type"] == "length"
