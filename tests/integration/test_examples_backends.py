"""The examples' programs, unchanged, on the three backends of the default model: the in-process
Engine, bd.RuntimeEndpoint and bd.OpenAI pointed at a braid serve. The endpoint gives the Engine's
text; on the chat API, a program either gives the Engine's text or is refused by name."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import httpx
import pytest

import braid as bd
from tests.integration.conftest import API_KEY, start_server, stop_server

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"braid_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # pydantic looks its models' module up here
    spec.loader.exec_module(module)
    return module


def _cases():
    """(example, program, list of argument dicts, run keywords), as the example's main() runs them."""
    quick, few, fork, extract, chat, react = (_load(n) for n in (
        "quickstart", "few_shot_qa", "fork_select_best", "extract_pydantic", "multi_turn_chat", "react_tools"))
    greedy = {"temperature": 0}
    return [
        ("quickstart.agent", quick.agent, [{"question": "What is the capital of France?"}], greedy),
        ("quickstart.story", quick.story, [{"topic": "the sea"}], {"temperature": 0.8, "seed": 42}),
        ("quickstart.trivia", quick.trivia, [{}], greedy),
        ("few_shot_qa", few.qa, [{"question": q} for q in few.QUESTIONS[:3]], greedy),
        ("fork_select_best", fork.best_of, [{"task": "Give one tip for sleeping better, in one sentence."}], {}),
        ("extract_pydantic", extract.extract, [{"text": t} for t in extract.TEXTS[:2]], greedy),
        ("multi_turn_chat", chat.chat, [{"questions": chat.QUESTIONS}], greedy),
        ("react_tools", react.react, [{"question": "What is 12 * 7?"}], greedy),
    ]


@pytest.fixture(scope="module")
def backends(smollm2_hf_dir):
    srv = start_server(smollm2_hf_dir, "--max-total-tokens", "16384")
    try:
        with bd.Engine(model_path=smollm2_hf_dir, cpu_threads=1, max_total_tokens=16384) as eng:
            model = httpx.get(f"{srv.url}/v1/models", headers=srv.headers).json()["data"][0]["id"]
            yield eng, bd.RuntimeEndpoint(srv.url, api_key=API_KEY), bd.OpenAI(model, base_url=f"{srv.url}/v1",
                                                                                api_key=API_KEY)
    finally:
        stop_server(srv)


@pytest.mark.parametrize("case", range(8))
def test_example_programs_on_every_backend(backends, case):
    name, program, batch, kwargs = _cases()[case]
    engine, endpoint, chat_api = backends
    local = program.run_batch(batch, backend=engine, **kwargs)
    remote = program.run_batch(batch, backend=endpoint, **kwargs)
    for a, b in zip(local, remote):
        assert a.error is None and b.error is None, (name, a.error, b.error)
        assert b.text() == a.text(), name
    for a, c in zip(local, program.run_batch(batch, backend=chat_api, **kwargs)):
        if c.error is None:
            assert c.variables() == a.variables(), name
        else:  # what a chat API cannot do is refused, and named
            assert isinstance(c.error, bd.errors.UnsupportedFeatureError), (name, c.error)
            assert "openai" in str(c.error)
