"""The language on ``bd.RuntimeEndpoint`` (a real braid serve) gives what it gives in-process."""

from __future__ import annotations

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
