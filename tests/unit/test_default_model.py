"""Smoke test on real text: the embedded default model (SmolLM2-135M-Instruct from its GGUF)
through the engine, as the quickstart uses it."""

from __future__ import annotations

from pathlib import Path

import pytest

import braid as bd
from tests.conftest import assert_at_rest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def default_engine(smollm2_hf_dir):
    cache_root = Path(smollm2_hf_dir).parent.parent  # <cache>/models/<name>
    mp = pytest.MonkeyPatch()
    mp.setenv("BRAID_CACHE", str(cache_root))
    try:
        with bd.Engine(cpu_threads=1) as eng:  # no model_path: resolves the default model
            yield eng
    finally:
        mp.undo()


def test_default_model_is_the_converted_gguf(default_engine, smollm2_hf_dir):
    assert Path(default_engine.model_folder) == Path(smollm2_hf_dir)


def test_answers_the_quickstart_question(default_engine):
    out = default_engine.chat([{"role": "user", "content": "What is the capital of France?"}],
                              sampling_params={"max_new_tokens": 32, "temperature": 0})
    assert "Paris" in out["text"]
    assert out["meta_info"]["finish_reason"]["type"] == "stop"
    assert_at_rest(default_engine)


def test_batch_stream_and_cache_on_real_text(default_engine):
    qs = ["Name a primary color.", "What is 2 + 2?", "Say hello in French."]
    convs = [[{"role": "user", "content": q}] for q in qs]
    params = {"max_new_tokens": 24, "temperature": 0}
    first = default_engine.chat(convs[0], sampling_params=params)  # caches the system prompt, whatever ran before
    outs = default_engine.chat(convs, sampling_params=params)
    assert all(o["text"].strip() for o in outs)
    assert outs[0]["text"] == first["text"]
    assert all(o["meta_info"]["cached_tokens"] > 0 for o in outs)  # the shared system prompt
    prompt = default_engine.tokenizer.apply_chat_template(convs[1])
    streamed = "".join(p["text"] for p in default_engine.generate(prompt=prompt, sampling_params=params, stream=True))
    assert streamed == outs[1]["text"]
    assert_at_rest(default_engine)


def test_json_schema_on_real_text(default_engine):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                               "country": {"type": "string", "maxLength": 20}},
              "required": ["city", "country"], "additionalProperties": False}
    outs = default_engine.chat(
        [[{"role": "user", "content": "Give the capital of France as JSON with keys city and country."}]] * 3,
        sampling_params=[{"max_new_tokens": 40, "temperature": t, "seed": 3, "json_schema": schema}
                         for t in (0.0, 1.0, 1.0)])
    for out in outs:
        assert out["meta_info"]["valid"] is True, out
        assert set(__import__("json").loads(out["text"])) == {"city", "country"}
    assert_at_rest(default_engine)
