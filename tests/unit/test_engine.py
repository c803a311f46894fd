"""The engine end to end on tiny random models: fidelity to transformers through generate,
prefix caching, chunked prefill, KV pressure, seeds, stop strings, streaming, bad input."""

from __future__ import annotations

import pytest
import torch

import braid as bd
from braid.errors import InvalidRequestError, UnknownNameError
from tests.conftest import assert_at_rest
from tests.engine_helpers import hf_greedy, make_engine_model, random_prompts
from tests.helpers import load_hf

GREEDY = {"temperature": 0.0, "ignore_eos": True}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return make_engine_model("llama", tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def hf_llama(llama_dir):
    return load_hf(llama_dir)


@pytest.fixture(scope="module")
def eng(llama_dir):
    with bd.Engine(model_path=llama_dir, max_total_tokens=4096, cpu_threads=1) as e:
        yield e


@pytest.fixture(autouse=True)
def _invariant_after(request):
    yield
    if "eng" in request.fixturenames:
        assert_at_rest(request.getfixturevalue("eng"))


@pytest.mark.parametrize("arch", ["llama3", "mistral", "qwen2", "qwen3"])
def test_fidelity_batched_generate(arch, tmp_path, make_engine):
    folder = make_engine_model(arch, tmp_path)
    hf = load_hf(folder)
    prompts = random_prompts(3, 5, 40, hf.config.vocab_size, seed=1)
    outs = make_engine(folder).generate(
        input_ids=prompts, sampling_params={**GREEDY, "max_new_tokens": 8}, return_logprob=True
    )
    for prompt, out in zip(prompts, outs):
        ref_tokens, ref_lps = hf_greedy(hf, prompt, 8)
        assert out["output_ids"] == ref_tokens
        lps = [lp for lp, _, _ in out["meta_info"]["output_token_logprobs"]]
        assert max(abs(a - b) for a, b in zip(lps, ref_lps)) < 1e-3


def test_repeated_prompt_hits_cache(eng):
    prompt = random_prompts(1, 30, 30, 512, seed=2)[0]
    a = eng.generate(input_ids=prompt, sampling_params={**GREEDY, "max_new_tokens": 6})
    b = eng.generate(input_ids=prompt, sampling_params={**GREEDY, "max_new_tokens": 6})
    assert a["meta_info"]["cached_tokens"] == 0
    assert b["meta_info"]["cached_tokens"] == len(prompt) - 1
    assert a["output_ids"] == b["output_ids"]


def test_chunked_prefill_matches_unchunked(llama_dir, make_engine):
    prompts = random_prompts(4, 40, 90, 512, seed=3)
    params = {**GREEDY, "max_new_tokens": 6}
    chunked = make_engine(llama_dir, chunked_prefill_size=16).generate(
        input_ids=prompts, sampling_params=params, return_logprob=True
    )
    whole = make_engine(llama_dir, chunked_prefill_size=-1, disable_radix_cache=True).generate(
        input_ids=prompts, sampling_params=params, return_logprob=True
    )
    for c, w in zip(chunked, whole):
        assert c["output_ids"] == w["output_ids"]
        for (a, _, _), (b, _, _) in zip(
            c["meta_info"]["output_token_logprobs"], w["meta_info"]["output_token_logprobs"]
        ):
            assert abs(a - b) < 1e-4


def test_many_requests_under_small_pool(llama_dir, make_engine):
    prompts = random_prompts(64, 4, 60, 512, seed=4)
    lens = torch.randint(1, 24, (64,), generator=torch.Generator().manual_seed(4)).tolist()
    # greedy and seeded sampling alike must come out the same whether or not requests were retracted
    params = [{**GREEDY, "max_new_tokens": n} if i % 2 else {"temperature": 0.9, "seed": i, "max_new_tokens": n,
                                                              "ignore_eos": True} for i, n in enumerate(lens)]
    small = make_engine(llama_dir, max_total_tokens=256, chunked_prefill_size=64)
    got = small.generate(input_ids=prompts, sampling_params=params)
    assert small.get_stats()["retractions"] > 0, "the pool was meant to be too small for all requests at once"
    want = make_engine(llama_dir).generate(input_ids=prompts, sampling_params=params)
    assert [g["output_ids"] for g in got] == [w["output_ids"] for w in want]
    assert all(len(g["output_ids"]) == p["max_new_tokens"] for g, p in zip(got, params))


def test_seed_reproduces_whatever_the_batch(eng):
    prompt = random_prompts(1, 12, 12, 512, seed=5)[0]
    params = {"temperature": 1.0, "seed": 1234, "max_new_tokens": 12, "ignore_eos": True}
    alone = eng.generate(input_ids=prompt, sampling_params=params)
    others = random_prompts(5, 3, 30, 512, seed=6)
    batch = eng.generate(
        input_ids=others[:2] + [prompt] + others[2:],
        sampling_params=[{"temperature": 1.0, "max_new_tokens": 12}] * 2
        + [params]
        + [{"temperature": 0.7, "max_new_tokens": 5}] * 3,
    )
    assert batch[2]["output_ids"] == alone["output_ids"]
    other_seed = eng.generate(input_ids=prompt, sampling_params={**params, "seed": 99})
    assert other_seed["output_ids"] != alone["output_ids"]


def test_stop_string_across_token_boundary(eng):
    full = eng.generate(prompt="The quick brown", sampling_params={**GREEDY, "max_new_tokens": 24})
    ids, text = full["output_ids"], full["text"]
    # a stop string made of the end of token k and the start of token k+1
    pieces = [eng.tokenizer.decode([t]) for t in ids]
    k = next(
        i
        for i in range(1, len(pieces) - 1)
        if pieces[i] and pieces[i + 1] and pieces[i].isprintable() and pieces[i + 1].isprintable()
    )
    stop = pieces[k][-1] + pieces[k + 1][:1]
    cut = text.index(stop)
    out = eng.generate(prompt="The quick brown", sampling_params={**GREEDY, "max_new_tokens": 24, "stop": [stop]})
    assert out["text"] == text[:cut]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}


def test_streaming_concatenates_to_final_text(eng):
    params = {**GREEDY, "max_new_tokens": 20}
    whole = eng.generate(prompt="café 日本語", sampling_params=params)
    pieces = list(eng.generate(prompt="café 日本語", sampling_params=params, stream=True))
    assert "".join(p["text"] for p in pieces) == whole["text"]
    assert all("\ufffd" not in p["text"] for p in pieces) or "\ufffd" in whole["text"]
    assert pieces[-1]["meta_info"]["finish_reason"] == {"type": "length", "length": 20}


def test_stream_closed_early_frees_kv(eng):
    it = eng.generate(prompt="hello there", sampling_params={**GREEDY, "max_new_tokens": 200}, stream=True)
    next(it)
    it.close()  # aborts the request; the autouse fixture checks the pool is whole again


def test_prompt_logprobs_match_transformers(eng, hf_llama):
    prompt = random_prompts(1, 20, 20, 512, seed=7)[0]
    eng.generate(input_ids=prompt, sampling_params={**GREEDY, "max_new_tokens": 1})  # cache it first
    out = eng.generate(
        input_ids=prompt,
        sampling_params={**GREEDY, "max_new_tokens": 0},
        return_logprob=True,
        logprob_start_len=5,
        top_logprobs_num=2,
    )
    got = out["meta_info"]["input_token_logprobs"]
    assert [t for _, t, _ in got] == prompt[5:]
    with torch.no_grad():
        ref = torch.log_softmax(hf_llama(torch.tensor([prompt])).logits[0].float(), -1)
    for j, (lp, tok, _) in enumerate(got):
        assert abs(lp - float(ref[4 + j, tok])) < 1e-3
    assert len(out["meta_info"]["input_top_logprobs"]) == len(got)
    assert out["output_ids"] == [] and out["meta_info"]["completion_tokens"] == 0


def test_prompt_logprob_starts_per_prompt(eng):
    prompts = random_prompts(3, 12, 18, 512, seed=9)
    starts = [2, 0, 7]
    outs = eng.generate(input_ids=prompts, sampling_params={"max_new_tokens": 0}, return_logprob=True,
                        logprob_start_len=starts)
    for prompt, start, out in zip(prompts, starts, outs):
        assert [t for _, t, _ in out["meta_info"]["input_token_logprobs"]] == prompt[start:]
    with pytest.raises(InvalidRequestError, match="logprob_start_len: 2 given for 3 prompts"):
        eng.generate(input_ids=prompts, return_logprob=True, logprob_start_len=[0, 1])
    with pytest.raises(InvalidRequestError, match="logprob_start_len"):
        eng.generate(input_ids=prompts, return_logprob=True, logprob_start_len=[0, 1, "2"])


def test_n_samples_share_the_prompt(eng):
    prompt = random_prompts(1, 25, 25, 512, seed=8)[0]
    outs = eng.generate(
        input_ids=prompt,
        sampling_params={"n": 3, "temperature": 1.0, "seed": 7, "max_new_tokens": 5, "ignore_eos": True},
    )
    assert len(outs) == 3
    assert all(o["meta_info"]["cached_tokens"] == len(prompt) - 1 for o in outs)
    assert len({tuple(o["output_ids"]) for o in outs}) > 1


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(prompt=""), "prompt"),
        (dict(prompt="hi", sampling_params={"max_new_tokens": -1}), "max_new_tokens"),
        (dict(prompt="hi", sampling_params={"temprature": 0.5}), "temprature"),
        (dict(prompt="hi", sampling_params={"temperature": "hot"}), "temperature"),
        (dict(input_ids=[1, 2, 10**6]), "input_ids"),
        (dict(prompt=123), "prompt"),
        (dict(prompt="x " * 400), "prompt"),
        (dict(prompt="hi", sampling_params={"stop_token_ids": [10**6]}), "stop_token_ids"),
        (dict(prompt=["a", "b"], stream=True), "stream"),
    ],
)
def test_bad_input_names_the_field(eng, kwargs, field):
    with pytest.raises(InvalidRequestError) as info:
        eng.generate(**kwargs)
    assert field in str(info.value)
    assert eng.generate(prompt="still fine", sampling_params={**GREEDY, "max_new_tokens": 2})["text"] is not None


def test_async_generate(eng):
    import asyncio

    async def main():
        a, b = await asyncio.gather(
            eng.async_generate(prompt="one", sampling_params={**GREEDY, "max_new_tokens": 4}),
            eng.async_generate(prompt="two", sampling_params={**GREEDY, "max_new_tokens": 4}),
        )
        pieces = [
            p["text"]
            async for p in await eng.async_generate(
                prompt="one", sampling_params={**GREEDY, "max_new_tokens": 4}, stream=True
            )
        ]
        return a, b, "".join(pieces)

    a, b, streamed = asyncio.run(main())
    assert a["text"] == streamed and len(b["output_ids"]) == 4


def test_unknown_names_are_listed(llama_dir, make_engine):
    with pytest.raises(UnknownNameError, match="fcfs"):
        make_engine(llama_dir, schedule_policy="nope")
    with pytest.raises(InvalidRequestError, match="max_total_tokens"):
        make_engine(llama_dir, bogus_setting=1)


def test_engine_runs_a_gguf_file_and_caches_its_conversion(tmp_path, make_engine):
    from tests.unit.test_gguf_convert import write_tiny_gguf

    path = str(tmp_path / "tiny.gguf")
    write_tiny_gguf(path, seed=3)
    first = make_engine(path, cache_dir=str(tmp_path / "cache"))
    out = first.generate(prompt="the", sampling_params={**GREEDY, "max_new_tokens": 5})
    assert len(out["output_ids"]) == 5
    second = make_engine(path, cache_dir=str(tmp_path / "cache"))
    assert second.model_folder == first.model_folder  # converted once
    again = second.generate(prompt="the", sampling_params={**GREEDY, "max_new_tokens": 5})
    assert again["output_ids"] == out["output_ids"]


def test_cancelled_async_request_is_aborted(eng):
    import asyncio

    before = eng.get_stats()["generated_tokens"]

    async def main():
        task = asyncio.ensure_future(
            eng.async_generate(prompt="long", sampling_params={**GREEDY, "max_new_tokens": 240}))
        while eng.get_stats()["generated_tokens"] == before:  # let it start decoding
            await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    while eng.get_stats()["running"]:  # the abort is processed by the scheduler thread
        pass
    assert eng.get_stats()["generated_tokens"] - before < 240  # stopped early, not run to the end
    # the autouse fixture then checks that the pool is whole again
