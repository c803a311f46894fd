"""The language on ``bd.RuntimeEndpoint`` (a real braid serve) gives what it gives in-process; on
``bd.OpenAI`` pointed at the same server, chat programs run and what a chat API cannot do is refused."""

from __future__ import annotations

import json

import httpx
import pytest

import braid as bd
from tests.integration.conftest import API_KEY


@pytest.fixture(scope="module")
def engine(chat_model_dir):
    with bd.Engine(model_path=chat_model_dir, cpu_threads=1, max_total_tokens=8192) as eng:
        yield eng


@pytest.fixture(scope="module")
def endpoint(server):
    return bd.RuntimeEndpoint(server.url, api_key=API_KEY)


@bd.program
def chat(s, question):
    s += bd.system("Be brief.")
    s += bd.user(question)
    s += bd.assistant(bd.gen("answer", max_tokens=8))
    s += bd.user("Sure?")
    s += bd.assistant(bd.select("sure", choices=["yes", "no", "maybe so"]))
    forks = s.fork(2)
    forks[1] += " Really,"
    forks += bd.gen("idea", max_tokens=5, ignore_eos=True)
    s["ideas"] = [f["idea"] for f in forks]
    s += " n=" + bd.gen("n", dtype=int, max_tokens=4)


def test_programs_give_the_same_results_on_the_endpoint_and_the_engine(engine, endpoint):
    questions = [{"question": q} for q in ("The quick", "Paris is", "café")]
    local = chat.run_batch(questions, backend=engine, temperature=0)
    remote = chat.run_batch(questions, backend=endpoint, temperature=0)
    for a, b in zip(local, remote):
        assert a.error is None and b.error is None, (a.error, b.error)
        assert b.text() == a.text() and b.messages() == a.messages()
        assert (b["answer"], b["sure"], b["ideas"], b["n"]) == (a["answer"], a["sure"], a["ideas"], a["n"])
        assert b.get_meta_info("sure")["scores"] == pytest.approx(a.get_meta_info("sure")["scores"], abs=1e-4)


def test_streaming_and_cache_on_the_endpoint(endpoint):
    st = chat.run(question="The quick brown", backend=endpoint, temperature=0, stream=True)
    pieces = list(st.text_iter())
    assert "".join(pieces) == st.text() and len(pieces) > 8
    again = chat.run(question="The quick brown", backend=endpoint, temperature=0)
    assert again.get_meta_info("answer")["cached_tokens"] > 0 and again["answer"] == st["answer"]


def test_errors_come_back_as_the_engines_errors(endpoint, server):
    @bd.program
    def bad(s):
        s += "x" + bd.gen("g", temperature=-1.0)

    with pytest.raises(bd.errors.InvalidRequestError, match="gen 'g': temperature"):
        bad.run(backend=endpoint)
    with pytest.raises(bd.errors.InvalidRequestError, match="API key"):
        bad.run(backend=bd.RuntimeEndpoint(server.url, api_key="wrong"))
    with pytest.raises(bd.errors.EngineClosedError):
        bad.run(backend=bd.RuntimeEndpoint("http://127.0.0.1:9"))


# ---- bd.OpenAI, pointed at braid serve's OpenAI API ---------------------------------------------
@pytest.fixture(scope="module")
def openai_backend(server):
    model = httpx.get(f"{server.url}/v1/models", headers=server.headers).json()["data"][0]["id"]
    return bd.OpenAI(model, base_url=f"{server.url}/v1", api_key=API_KEY)


@bd.program
def turns(s, question):
    s += bd.system("Be brief.")
    s += bd.user(question)
    s += bd.assistant(bd.gen("answer", max_tokens=8))
    s += bd.user("Sure?")
    s += bd.assistant(bd.select("sure", choices=["yes", "no", "maybe so"]))
    s += bd.user("As JSON.")
    s += bd.assistant(bd.gen("data", json_schema=SCHEMA, max_tokens=30))


SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
          "additionalProperties": False}


def test_chat_programs_on_the_openai_backend(engine, openai_backend):
    for q in ("The quick", "Paris is"):
        local = turns.run(question=q, backend=engine, temperature=0)
        remote = turns.run(question=q, backend=openai_backend, temperature=0)
        assert remote["answer"] == local["answer"]  # the same chat prompt, greedy
        assert remote["sure"] in ("yes", "no", "maybe so")
        assert json.loads(remote["data"])["ok"] in (True, False)
        assert [m["role"] for m in remote.messages()] == [m["role"] for m in local.messages()]
    streamed = turns.run(question="The quick", backend=openai_backend, temperature=0, stream=True)
    assert "".join(streamed.text_iter()) == streamed.text()


def test_what_a_chat_api_cannot_do_is_refused_by_name(openai_backend):
    @bd.program
    def raw(s):
        s += "Once upon a time" + bd.gen("g", max_tokens=4)

    with pytest.raises(bd.errors.UnsupportedFeatureError, match="assistant turn"):
        raw.run(backend=openai_backend)

    @bd.program
    def uncond(s):
        s += bd.user("pick")
        s += bd.assistant(bd.select("c", choices=["a", "b"], choices_method="unconditional_likelihood_normalized"))

    with pytest.raises(bd.errors.UnsupportedFeatureError, match="unconditional"):
        uncond.run(backend=openai_backend)
