"""The conditional rewrites of braid/grammar/schema_logic.py (if/then/else, dependencies,
dependentRequired, dependentSchemas, not): the rewritten schema gives jsonschema's verdict of
the original on hand-written instances (or, where the rewrite only tightens, accepts a subset),
and random walks on llguidance's real masks finish only with outputs the original accepts."""

from __future__ import annotations

import importlib.util
import itertools
import json
import random
import re

import jsonschema
import pytest
import torch

from braid.grammar import GrammarSpec, allocate_bitmask, create_backend
from braid.grammar.schema_logic import not_strings_pattern, outside
from braid.grammar.schema_prep import prepare_schema

ITEM = {"type": "object", "properties": {"kind": {"enum": ["input", "dropdown", "markdown"]},
                                         "options": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
                                         "n": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["kind"], "additionalProperties": False}  # fmt: skip
OBJECTS = [{"kind": k, **o, **n} for k in ("input", "dropdown", "markdown", "other")
           for o in ({}, {"options": []}, {"options": ["a"]}) for n in ({}, {"n": 3}, {"n": 0})]
# (name, schema, instances, exact): exact rewrites must agree with the original on every instance
CASES = [
    ("if const then required else not required", {
        **ITEM, "if": {"properties": {"kind": {"const": "dropdown"}}},
        "then": {"required": ["options"]}, "else": {"not": {"required": ["options"]}}}, OBJECTS, True),
    ("if enum+required then", {
        **ITEM, "if": {"properties": {"kind": {"enum": ["input", "markdown"]}}, "required": ["kind"]},
        "then": {"properties": {"n": {"const": 0}}}}, OBJECTS, True),
    ("if inside allOf, two of them", {
        **ITEM, "allOf": [{"if": {"properties": {"kind": {"const": "input"}}}, "then": {"required": ["n"]}},
                          {"if": {"required": ["options"]}, "then": {"properties": {"kind": {"const": "dropdown"}}}}]},
     OBJECTS, True),
    ("conditionals on one discriminator", {
        **ITEM, "allOf": [{"if": {"properties": {"kind": {"const": k}}}, "then": t} for k, t in (
            ("input", {"required": ["kind", "n"]}), ("dropdown", {"required": ["options"]}),
            ("markdown", {"properties": {"n": {"const": 0}}}))]}, OBJECTS, True),
    ("conditionals on one discriminator, any type", {
        "allOf": [{"if": {"properties": {"k": {"const": k}}}, "then": t} for k, t in (
            (1, {"maxLength": 1}), (2, {"properties": {"n": {"const": 0}}}), ("s", {"required": ["n"]}))]},
     ["", "ab", 3, None, {}, {"n": 0}, {"k": 1}, {"k": 2, "n": 1}, {"k": 2, "n": 0}, {"k": "s"}, {"k": "s", "n": 5},
      {"k": "t"}, {"k": [1]}], True),
    ("if on a type, with else", {
        "type": ["string", "integer"], "if": {"type": "string"}, "then": {"maxLength": 2},
        "else": {"minimum": 5}}, ["", "ab", "abc", 4, 5, 17], True),
    ("if on a pattern (tightens)", {
        "type": "string", "if": {"pattern": "^x"}, "then": {"maxLength": 2}, "else": {"minLength": 1}},
     ["", "x", "xy", "xyz", "a", "abc"], False),
    ("if contains (tightens: the first item)", {
        "type": "array", "maxItems": 3, "items": {"type": "object", "properties": {"m": {"enum": ["uv", "pip"]}},
                                                  "required": ["m"], "additionalProperties": False},
        "if": {"contains": {"properties": {"m": {"const": "uv"}}}}, "then": {"maxItems": 1}},
     [[], [{"m": "uv"}], [{"m": "pip"}], [{"m": "pip"}, {"m": "pip"}], [{"m": "uv"}, {"m": "pip"}],
      [{"m": "pip"}, {"m": "uv"}]], False),
    ("if not contains, in a property (tightens)", {
        "type": "object", "properties": {"dyn": {"type": "array", "items": {"enum": ["v", "w"]}, "maxItems": 2},
                                         "v": {"type": "string", "maxLength": 3}},
        "additionalProperties": False,
        "if": {"not": {"properties": {"dyn": {"contains": {"const": "v"}}}, "required": ["dyn"]}},
        "then": {"required": ["v"]}},
     [{}, {"v": "1"}, {"dyn": []}, {"dyn": [], "v": ""}, {"dyn": ["v"]}, {"dyn": ["w", "v"]}, {"dyn": ["w"]}], False),
    ("dependencies: a list and a schema", {  # a draft-7 keyword (2019-09 split it in two)
        "$schema": "http://json-schema.org/draft-07/schema#", **ITEM,
        "dependencies": {"n": ["options"], "options": {"properties": {"kind": {"const": "dropdown"}}}}},
     OBJECTS, True),
    ("dependentRequired and dependentSchemas", {
        **ITEM, "dependentRequired": {"options": ["n"]},
        "dependentSchemas": {"n": {"properties": {"n": {"minimum": 3}}}}}, OBJECTS, True),
    ("not const and not enum of numbers", {
        "type": "object", "properties": {"s": {"type": "string", "not": {"const": "ab"}},
                                         "v": {"not": {"enum": [1, 2.5, True, None]}}},
        "additionalProperties": False},
     [{"s": s} for s in ("", "a", "ab", "abc", "b", "a\n")]
     + [{"v": v} for v in (0, 1, 1.0, 2, 2.5, 3, True, False, None, "1", [], {})], True),
    ("not anyOf of required", {
        **ITEM, "not": {"anyOf": [{"required": ["n"]}, {"required": ["options"]}], "$$note": "an annotation"}},
     OBJECTS, True),
    ("propertyNames: lengths, a pattern, an enum", {
        "type": "object", "additionalProperties": False, "properties": {
            "a": {"type": "object", "propertyNames": {"minLength": 1, "maxLength": 2},
                  "additionalProperties": {"type": "integer"}},
            "b": {"type": "object", "propertyNames": {"pattern": "^[a-z]+$"}, "properties": {"x": True}},
            "c": {"type": "object", "propertyNames": {"enum": ["k", "v"]}, "additionalProperties": {"enum": [1]}},
            "d": {"type": "object", "propertyNames": {"not": {"const": "ab"}}, "additionalProperties": {"const": 0}},
            "e": {"type": "object", "propertyNames": {"anyOf": [{"type": "string"}, {"const": "*"}]}},
            "f": {"type": "object", "propertyNames": {"maxLength": 1}, "properties": {"a": {}, "c": {}},
                  "additionalProperties": False},
            "g": {"type": "object", "propertyNames": {"maxLength": 2}, "patternProperties": {"^[a-z]+$": {}},
                  "additionalProperties": False},
            "h": {"type": "object", "propertyNames": {"format": "python-identifier"}}}},
     [{"a": {}}, {"a": {"": 1}}, {"a": {"x": 1, "yz": 2}}, {"a": {"xyz": 1}}, {"a": {"x": "1"}}, {"b": {"x": 1}},
      {"b": {"X": 1}}, {"b": {"x-y": []}}, {"c": {"k": 1}}, {"c": {"v": 1, "k": 2}}, {"c": {"z": 1}},
      {"d": {"a": 0, "abc": 0}}, {"d": {"ab": 0}}, {"d": {"": 0}}, {"e": {"": [], "*": 1}}, {"f": {"a": 1, "c": 2}},
      {"f": {"zz": 1}}, {"g": {"ab": 1, "c": 2}}, {"g": {"abc": 1}}, {"g": {"A": 1}}, {"h": {"-": 1}}], True),
]  # fmt: skip


def _validator(schema):
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


@pytest.mark.parametrize("name, schema, instances, exact", CASES, ids=[c[0] for c in CASES])
def test_rewrites_keep_the_verdict_or_tighten(name, schema, instances, exact):
    prepared = json.loads(prepare_schema(json.dumps(schema), for_llguidance=True))
    text = json.dumps(prepared)
    assert not any(f'"{k}"' in text for k in ("if", "dependencies", "dependentRequired", "dependentSchemas", "not",
                                              "propertyNames")), text
    before, after = _validator(schema), _validator(prepared)
    for value in instances:
        if exact:
            assert before.is_valid(value) is after.is_valid(value), value
        elif after.is_valid(value):
            assert before.is_valid(value), value
    assert any(after.is_valid(v) for v in instances)  # never an empty rewrite


FORMATS = {"type": "object", "additionalProperties": False, "properties": {
    "ref": {"type": "string", "format": "uri-reference"}, "iri": {"type": "string", "format": "iri-reference"},
    "mail": {"type": "string", "format": "idn-email"}, "re": {"type": "string", "format": "regex"},
    "ptr": {"type": "string", "format": "json-pointer"}, "arn": {"type": "string", "format": "AWS::IAM::Role.Arn"}}}


def test_formats_llguidance_refuses_become_patterns_or_annotations():
    """Checked formats become patterns whose matches pass jsonschema's check; one it does not
    check (an annotation) is dropped."""
    prepared = json.loads(prepare_schema(json.dumps(FORMATS), for_llguidance=True))["properties"]
    assert not any("format" in p for p in prepared.values()) and "pattern" not in prepared["arn"]
    check = jsonschema.Draft202012Validator(FORMATS, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    samples = {"ref": ["a", "a.b/c", "https://x.y/z~1", "_/-"], "iri": ["https://a0", "x/y"],
               "mail": ["a+b@c.d"], "re": ["", "ab c-", "__"], "ptr": ["", "/a/~0b~1", "/ x"]}
    for key, values in samples.items():
        for v in values:
            assert re.fullmatch(prepared[key]["pattern"], v), (key, v)
            assert check.is_valid({key: v}), (key, v)


def test_properties_named_like_keywords_are_no_keywords():
    schema = {"type": "object", "properties": {"if": {"type": "string"}, "then": {"type": "string"},
                                               "not": {"type": "integer"}, "pattern": {"type": "string"}}}
    for llg in (False, True):
        assert json.loads(prepare_schema(json.dumps(schema), for_llguidance=llg))["properties"] == schema["properties"]


def test_without_logic_the_schema_keeps_its_conditionals_for_xgrammar():
    schema = {**ITEM, "if": {"properties": {"kind": {"const": "input"}}}, "then": {"required": ["n"]}}
    assert "if" in json.loads(prepare_schema(json.dumps(schema)))


@pytest.mark.parametrize("strings", [["a"], ["ab", "a", "abc"], ["dropdown", "input", "drop"], ["", "x-y", "[^]"],
                                     ["\n", "é"]])  # fmt: skip
def test_the_pattern_of_every_other_string(strings):
    pattern = not_strings_pattern(strings)
    samples = {s[:i] + extra for s in strings for i in range(len(s) + 1) for extra in ("", "a", "z", "\n", "-")}
    for s in samples | set(strings):
        assert (re.fullmatch(pattern, s) is not None) is (s not in strings), (s, pattern)


def test_outside_is_exact_only_where_it_can_be():
    assert outside({"const": "a"}, {}).exact and outside({"required": ["a"], "type": "object"}, {}).exact
    assert not outside({"pattern": "^a"}, {}).exact and not outside({"type": "integer"}, {}).exact
    assert not outside({"const": {"a": 1}}, {}).exact
    assert outside({"contains": {"const": 1}, "minContains": 0}, {}) == ([], False)  # always holds: say nothing


LLGUIDANCE = importlib.util.find_spec("llguidance") is not None


@pytest.fixture(scope="module")
def tok(smollm2_hf_dir):
    from braid.runtime.tokenizer import Tokenizer

    return Tokenizer(smollm2_hf_dir)


def _walk(backend, compiled, vocab: int, stops: list[int], rng: random.Random, single: list[int],
          max_tokens: int = 120) -> list[int] | None:
    """Random tokens under the real mask, half of them single-byte, a stop taken with p=1/2."""
    m = backend.matcher(compiled)
    mask = allocate_bitmask(1, vocab)
    ids: list[int] = []
    for _ in range(max_tokens):
        m.fill_bitmask(mask, 0)
        bits = ((mask[0, :, None] >> torch.arange(32, dtype=torch.int32)) & 1).reshape(-1)[:vocab].bool()
        allowed = torch.nonzero(bits).flatten().tolist()
        stop = [t for t in stops if bits[t]]
        if stop and rng.random() < 0.5:
            return ids
        small = [t for t in allowed if t in single] if rng.random() < 0.5 else []
        t = rng.choice(small or allowed)
        assert m.accept_token(t)
        if t in stops:
            return ids
        ids.append(t)
    return None


@pytest.mark.skipif(not LLGUIDANCE, reason="llguidance is not installed")
def test_random_walks_on_llguidance_validate_under_the_original(tok):
    stops = sorted(tok.eos_token_ids)
    backend = create_backend("llguidance", tok.hf, len(tok), stops)
    single = {i for i in range(len(tok)) if len(tok.decode([i]).encode()) == 1}
    rng = random.Random(0)
    for name, schema, _, _ in [*CASES, ("formats", FORMATS, [], True)]:
        compiled = backend.compile(GrammarSpec("json_schema", json.dumps(schema)))
        check = _validator(schema)
        finished = []
        for _ in itertools.repeat(None, 6):
            ids = _walk(backend, compiled, len(tok), stops, rng, single)
            if ids is not None:
                finished.append(tok.decode(ids))
        assert finished, name
        for text in finished:
            assert check.is_valid(json.loads(text)), (name, text)
