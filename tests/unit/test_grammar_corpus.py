"""The schema and regex corpus (tests/data/grammar_corpus.json: nested objects, bounded arrays,
enums, const, anyOf/oneOf/allOf, $ref/$defs incl. recursive, patterns, formats, numeric bounds,
nullable and optional fields, additionalProperties false) through the grammar backends and the
engine, on a random-weight model and on the default model, at temperature 1 with several seeds.

The corpus's own examples are checked first, so a corpus mistake cannot pass for a backend bug.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest

from braid.grammar import GrammarSpec, create_backend
from braid.grammar.validate import validate_json
from tests.engine_helpers import make_engine_model

CORPUS = json.loads((Path(__file__).parent.parent / "data" / "grammar_corpus.json").read_text())
SCHEMAS = {s["name"]: s for s in CORPUS["schemas"]}
REGEXES = {r["name"]: r for r in CORPUS["regexes"]}
# small schemas whose outlines-core index builds in well under a second on the default tokenizer
OUTLINES_FAST = ["color_name_enum", "sentiment_classification", "geo_point", "feature_flags", "todo_list",
                 "api_error_response", "payment_method", "order_status_update", "tool_call_get_weather"]


def compact(value) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def test_the_corpus_examples_are_right():
    for s in CORPUS["schemas"]:
        cls = jsonschema.validators.validator_for(s["schema"])
        cls.check_schema(s["schema"])
        check = cls(s["schema"], format_checker=cls.FORMAT_CHECKER)
        assert all(check.is_valid(v) for v in s["valid"]), s["name"]
        assert not any(check.is_valid(v) for v in s["invalid"]), s["name"]
    for r in CORPUS["regexes"]:
        assert all(re.fullmatch(r["regex"], m) for m in r["match"]), r["name"]
        assert not any(re.fullmatch(r["regex"], m) for m in r["no_match"]), r["name"]


@pytest.fixture(scope="module")
def xgrammar(smollm2_hf_dir):
    from braid.runtime.tokenizer import Tokenizer

    tok = Tokenizer(smollm2_hf_dir)
    return tok, create_backend("xgrammar", tok.hf, len(tok), sorted(tok.eos_token_ids))


def accepts(backend, tok, compiled, text: str) -> bool:
    m = backend.matcher(compiled)
    ids = tok.encode(text)
    return all(m.accept_token(t) for t in ids) and m.accept_token(min(tok.eos_token_ids))


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_every_schema_compiles_takes_its_examples_and_refuses_the_rest(xgrammar, name):
    tok, backend = xgrammar
    s = SCHEMAS[name]
    compiled = backend.compile(GrammarSpec("json_schema", json.dumps(s["schema"])))
    for value in s["valid"]:
        assert accepts(backend, tok, compiled, compact(value)), compact(value)
    for value in s["invalid"]:
        assert not accepts(backend, tok, compiled, compact(value)), compact(value)


@pytest.mark.parametrize("name", sorted(REGEXES))
def test_every_regex_compiles_and_matches_as_python_does(xgrammar, name):
    tok, backend = xgrammar
    r = REGEXES[name]
    compiled = backend.compile(GrammarSpec("regex", r["regex"]))
    assert all(accepts(backend, tok, compiled, m) for m in r["match"])
    assert not any(accepts(backend, tok, compiled, m) for m in r["no_match"])


def check_output(name: str, out: dict, kind: str) -> bool:
    """Whether a finished output is right; also that meta_info's verdict is jsonschema's."""
    text = out["text"]
    if kind == "regex":
        assert re.fullmatch(REGEXES[name]["regex"], text), (name, text)
        return True
    ok, error = validate_json(text, json.dumps(SCHEMAS[name]["schema"]))
    assert out["meta_info"]["valid"] is ok and out["meta_info"]["validation_error"] == error
    # A random-weight model also spells strings with byte tokens that never complete a UTF-8
    # character; xgrammar counts them as they are, their decoded U+FFFD may exceed maxLength.
    return ok or ("is too long" in error and "\ufffd" in text)


@pytest.fixture(scope="module")
def random_model(tmp_path_factory):
    return make_engine_model("llama", tmp_path_factory.mktemp("corpus"), vocab_size=512)


def generate_corpus(eng, names: list[str], kind: str, seeds: int, max_new_tokens: int) -> list[tuple[str, dict]]:
    table = SCHEMAS if kind == "json_schema" else REGEXES
    key = "schema" if kind == "json_schema" else "regex"
    jobs = [(n, s) for n in names for s in range(seeds)]
    outs = eng.generate(prompt=[f"Write {n}:" for n, _ in jobs], sampling_params=[
        {"temperature": 1.0, "max_new_tokens": max_new_tokens, kind: table[n][key], "seed": s} for n, s in jobs])
    return [(n, o) for (n, _), o in zip(jobs, outs)]


@pytest.mark.parametrize("backend", ["xgrammar", "auto"])
@pytest.mark.parametrize("kind", ["json_schema", "regex"])
def test_random_model_outputs_are_valid(random_model, make_engine, kind, backend):
    """On xgrammar, and on the default order (llguidance first where installed, as in CI)."""
    eng = make_engine(random_model, max_total_tokens=65536, max_running_requests=128, grammar_backend=backend)
    names = sorted(SCHEMAS if kind == "json_schema" else REGEXES)
    results = generate_corpus(eng, names, kind, seeds=2, max_new_tokens=256)
    finished = [(n, o) for n, o in results if o["meta_info"]["finish_reason"]["type"] == "stop"]
    assert len(finished) >= 0.5 * len(results), f"only {len(finished)} of {len(results)} finished"
    bad = [(n, o["meta_info"].get("validation_error"), o["text"]) for n, o in finished if not check_output(n, o, kind)]
    assert not bad, bad


def test_random_model_outputs_on_outlines_parse_and_are_judged(random_model, make_engine):
    """outlines-core ignores numeric bounds and drops formats under length bounds (see the
    architecture doc): its outputs parse as JSON and braid's verdict on each is jsonschema's.
    A random model hits the bounds often: about half are valid."""
    eng = make_engine(random_model, grammar_backend="outlines", max_total_tokens=65536)
    results = generate_corpus(eng, OUTLINES_FAST, "json_schema", seeds=3, max_new_tokens=256)
    finished = [(n, o) for n, o in results if o["meta_info"]["finish_reason"]["type"] == "stop"]
    assert len(finished) >= 0.5 * len(results)
    for _, o in finished:
        json.loads(o["text"])
    valid = sum(check_output(n, o, "json_schema") for n, o in finished)
    assert valid >= 0.3 * len(finished), [(n, o["meta_info"]["validation_error"]) for n, o in finished]


DEFAULT_MODEL_SCHEMAS = ["sentiment_classification", "geo_point", "named_entities", "todo_list"]


def test_default_model_outputs_are_valid(smollm2_hf_dir, make_engine):
    eng = make_engine(smollm2_hf_dir, max_total_tokens=8192)  # the default grammar backend order
    results = generate_corpus(eng, DEFAULT_MODEL_SCHEMAS, "json_schema", seeds=2, max_new_tokens=160)
    finished = [(n, o) for n, o in results if o["meta_info"]["finish_reason"]["type"] == "stop"]
    assert len(finished) >= len(results) // 2, [o["text"][:80] for _, o in results]
    assert all(check_output(n, o, "json_schema") for n, o in finished), [o["text"] for _, o in finished]
