"""The language on real engines: a tiny random Llama (byte-level tokenizer, no chat template)
checked against transformers, and the embedded default model for chat programs."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

import braid as bd
from braid.backend.engine_backend import EngineBackend
from braid.backend.scoring import choice_requests
from tests.conftest import assert_at_rest
from tests.engine_helpers import make_engine_model
from tests.helpers import hf_logits, load_hf

GREEDY = {"temperature": 0.0}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return make_engine_model("llama", tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def eng(llama_dir):
    with bd.Engine(model_path=llama_dir, max_total_tokens=4096, cpu_threads=1) as e:
        yield e


@pytest.fixture(autouse=True)
def _invariant_after(request):
    yield
    if "eng" in request.fixturenames:
        assert_at_rest(request.getfixturevalue("eng"))


@bd.program
def pick(s, prompt, choices, method="token_length_normalized"):
    s += prompt + bd.select("c", choices=choices, choices_method=method)


@pytest.mark.parametrize("method", ["token_length_normalized", "greedy_token_selection",
                                    "unconditional_likelihood_normalized"])
def test_select_scores_match_transformers(eng, llama_dir, method):
    hf = load_hf(llama_dir)
    prompt, choices = "The quick brown", [" fox", " dog jumps", "café"]
    st = pick.run(prompt=prompt, choices=choices, method=method, backend=eng)
    meta = st.get_meta_info("c")
    seqs, starts = choice_requests(lambda texts: [eng.tokenizer.encode(t) for t in texts], [prompt], tuple(choices),
                                   False, 0)
    for got, ids, start in zip(meta["choice_token_logprobs"], seqs, starts):
        lp = torch.log_softmax(hf_logits(hf, ids), -1)
        want = [float(lp[i - 1, ids[i]]) for i in range(start, len(ids))]
        assert got == pytest.approx(want, abs=2e-4)
    assert len(meta["scores"]) == 3 and st["c"] == choices[max(range(3), key=lambda i: (meta["scores"][i], -i))]
    naive = pick.run(prompt=prompt, choices=choices, method=method, backend=EngineBackend(eng, program_aware=False))
    assert naive["c"] == st["c"]
    assert naive.get_meta_info("c")["scores"] == pytest.approx(meta["scores"], abs=2e-4)


def test_fork_group_gens_equal_the_same_gens_run_alone(eng):
    @bd.program
    def tree(s, tails):
        s += "Paris is the capital"
        forks = s.fork(len(tails))
        for f, tail in zip(forks, tails):
            f += tail
        forks += bd.gen("g", max_tokens=6, ignore_eos=True, **GREEDY)
        s["texts"] = [f.text() for f in forks]

    @bd.program
    def alone(s, text):
        s += text + bd.gen("g", max_tokens=6, ignore_eos=True, **GREEDY)

    tails = [" of", " of France", "; Berlin"]
    st = tree.run(tails=tails, backend=eng)
    for tail, text in zip(tails, st["texts"]):
        parent = "Paris is the capital" + tail
        assert text.startswith(parent)
        assert text == alone.run(text=parent, backend=eng).text()


def test_program_run_twice_is_served_from_the_cache(eng):
    @bd.program
    def p(s):
        s += "Tokens, caches and schedulers: continuous batching with chunked prefill. " * 3
        s += bd.gen("g", max_tokens=4, **GREEDY)

    first = p.run(backend=eng).get_meta_info("g")
    second = p.run(backend=eng).get_meta_info("g")
    assert second["cached_tokens"] > 0 and second["cached_tokens"] >= first["cached_tokens"]


SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}


def test_constrained_gens_are_valid_on_a_random_model(eng):
    @bd.program
    def p(s):
        s += "code: " + bd.gen("code", regex=r"[a-z]{3}[0-9]", max_tokens=16)
        s += " n=" + bd.gen("n", dtype=int, max_tokens=6)
        s += " ok=" + bd.gen("ok", dtype=bool)
        s += " json=" + bd.gen("j", json_schema=SCHEMA, max_tokens=64)
        s += " pick=" + bd.gen("pick", choices=["red", "green"])

    for seed in range(3):
        st = p.run(backend=eng, seed=seed, temperature=1.0)
        assert len(st["code"]) == 4 and st["code"][:3].isalpha() and st["code"][3].isdigit()
        assert isinstance(st["n"], int) and isinstance(st["ok"], bool) and st["pick"] in ("red", "green")
        if st.get_meta_info("j")["finish_reason"]["type"] != "length":
            jsonschema.validate(json.loads(st["j"]), SCHEMA)
            assert st.get_meta_info("j")["valid"] is True


def test_stop_strings_never_appear_in_captures(eng):
    @bd.program
    def p(s, i):
        s += f"{i} The quick brown fox" + bd.gen("g", max_tokens=24, stop=["e", "o"], seed=i)

    for st in p.run_batch([{"i": i} for i in range(6)], backend=eng):
        assert "e" not in st["g"] and "o" not in st["g"]


def test_run_batch_on_the_engine_keeps_order(eng):
    @bd.program
    def p(s, text):
        s += text + bd.gen("g", max_tokens=5, ignore_eos=True, **GREEDY)

    texts = ["The quick", "Paris is", "Tokens, caches", "café, naïve", "numbers 12345"]
    states = p.run_batch([{"text": t} for t in texts], backend=eng, progress_bar=True)
    assert [st.text() for st in states] == [p.run(text=t, backend=eng).text() for t in texts]


def test_streaming_on_the_engine(eng):
    @bd.program
    def p(s):
        s += "The quick" + bd.gen("g", max_tokens=12, ignore_eos=True, **GREEDY) + "."

    st = p.run(backend=eng, stream=True)
    pieces = list(st.text_iter())
    assert "".join(pieces) == st.text() and len(pieces) >= 4
    assert st.text() == p.run(backend=eng).text()


def test_bad_sampling_values_name_the_gen(eng):
    @bd.program
    def p(s, **kw):
        s += "x" + bd.gen("g", **kw)

    with pytest.raises(bd.errors.InvalidRequestError, match="gen 'g': temperature: must be >= 0"):
        p.run(backend=eng, temperature=-1.0)
    with pytest.raises(bd.errors.InvalidRequestError, match="gen 'g': max_tokens"):
        p.run(backend=eng, max_tokens=-2)


def test_running_programs_does_not_keep_the_engine_alive(llama_dir):
    import gc
    import weakref

    @bd.program
    def p(s):
        s += "x" + bd.gen("g", max_tokens=2)

    eng = bd.Engine(model_path=llama_dir, max_total_tokens=1024, cpu_threads=1)
    p.run(backend=eng)
    ref = weakref.ref(eng)
    eng.shutdown()
    del eng
    gc.collect()
    assert ref() is None  # its KV pool is freed, so a next engine (or model) gets the memory


@pytest.mark.slow
def test_chat_program_on_the_default_model(smollm2_hf_dir, make_engine):
    eng = make_engine(smollm2_hf_dir)

    @bd.program
    def qa(s, question):
        s += bd.system("You are terse.")
        s += bd.user(question)
        s += bd.assistant(bd.gen("answer", max_tokens=24, stop="\n"))
        s += bd.user("Is that right? Answer yes or no.")
        s += bd.assistant(bd.select("sure", choices=["yes", "no"]))
        s += bd.user("Give the person as JSON.")
        s += bd.assistant(bd.gen("person", json_schema=SCHEMA, max_tokens=48))

    st = qa.run(question="Who wrote Hamlet?", backend=eng, temperature=0)
    assert [m["role"] for m in st.messages()] == ["system", "user", "assistant", "user", "assistant", "user",
                                                  "assistant"]
    assert st.text().startswith("<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nWho wrote Hamlet?")
    assert st["answer"] and "\n" not in st["answer"]
    assert st["sure"] in ("yes", "no") and len(st.get_meta_info("sure")["scores"]) == 2
    jsonschema.validate(json.loads(st["person"]), SCHEMA)
    again = qa.run(question="Who wrote Hamlet?", backend=eng, temperature=0)
    assert again.get_meta_info("answer")["cached_tokens"] > 0 and again["answer"] == st["answer"]


def test_gen_logprobs_and_sampling_fields_reach_the_engine(eng):
    @bd.program
    def p(s, **kw):
        s += "The quick brown" + bd.gen("g", max_tokens=5, ignore_eos=True, **kw)

    @bd.program
    def q(s):
        s += "The quick brown" + bd.gen("g", max_tokens=5, ignore_eos=True, return_logprob=True,
                                        top_logprobs_num=2, temperature=1.0, top_k=1)
        s += " / " + bd.gen("h", max_tokens=5, ignore_eos=True, temperature=0, frequency_penalty=1.5,
                            presence_penalty=0.5, min_p=0.1, top_p=0.9, seed=3)

    st = q.run(backend=eng)
    meta = st.get_meta_info("g")
    assert len(meta["output_token_logprobs"]) == 5 and len(meta["output_top_logprobs"][0]) == 2
    greedy = p.run(backend=eng, temperature=0)["g"]
    assert st["g"] == greedy  # top_k=1 is greedy whatever the temperature
    assert st.get_meta_info("h")["completion_tokens"] == 5
