"""The grammar backends against each other and against the contract in braid/grammar/base.py,
on the default model's tokenizer (49,152 tokens, byte-level BPE): the same spec gives the same
masks on xgrammar and outlines along random walks, matchers roll back and terminate alike, and
bad regexes get the same named error whichever backend would compile them."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import random
import re

import pytest
import torch

from braid.errors import InvalidRequestError, UnknownNameError
from braid.grammar import GrammarError, GrammarSpec, allocate_bitmask, create_backend, fill_bitmasks
from braid.grammar.base import bitmask_words
from braid.grammar.regex_check import normalize_regex
from braid.grammar.vocab import token_bytes

BACKENDS = ["xgrammar", "outlines"] + (["llguidance"] if importlib.util.find_spec("llguidance") else [])
STOPS = [0, 2]  # <|endoftext|>, <|im_end|>


@pytest.fixture(scope="module")
def hf_tok(smollm2_hf_dir):
    from braid.runtime.tokenizer import Tokenizer

    return Tokenizer(smollm2_hf_dir).hf


@pytest.fixture(scope="module")
def backends(hf_tok):
    return {name: create_backend(name, hf_tok, len(hf_tok), STOPS) for name in BACKENDS}


def allowed(matcher, vocab: int) -> set[int]:
    mask = allocate_bitmask(1, vocab)
    mask.zero_()
    matcher.fill_bitmask(mask, 0)
    bits = (mask[0, :, None] >> torch.arange(32, dtype=torch.int32)) & 1
    return set(torch.nonzero(bits.reshape(-1)[:vocab]).flatten().tolist())


def test_token_bytes_spell_every_encoding(hf_tok):
    table = token_bytes(hf_tok, len(hf_tok))
    assert all(table[i] is None for i in hf_tok.all_special_ids)
    for text in ['{"a": [1, 2.5e-3]}', "naïve 日本語 🙂\n\tend", "  two  spaces"]:
        ids = hf_tok.encode(text, add_special_tokens=False)
        assert b"".join(table[i] for i in ids) == text.encode()


def test_token_bytes_of_a_sentencepiece_vocabulary():
    from tokenizers import SentencePieceBPETokenizer
    from transformers import PreTrainedTokenizerFast

    sp = SentencePieceBPETokenizer()
    sp.train_from_iterator(["hello world, the quick brown fox"] * 20, vocab_size=60, min_frequency=1)
    tok = PreTrainedTokenizerFast(tokenizer_object=sp)
    table = token_bytes(tok, len(tok))
    ids = tok.encode("hello quick fox", add_special_tokens=False)
    assert b"".join(table[i] for i in ids) == b" hello quick fox"  # the metaspace prefix is a space


@pytest.mark.parametrize("regex, problem", [
    ("(unclosed", "not a valid regular expression"),
    ("[z-a]", "bad character range"),
    ("a{3,1}", "not a valid regular expression"),
    ("(?=a)b", "lookaround at position 0"),
    ("x(?<!y)", "lookaround at position 1"),
    (r"(a)\1", "backreferences"),
    (r"\bword", "word boundaries"),
    ("a|^b", "anchor '^' at position 2"),
    ("", "non-empty"),
])  # fmt: skip
def test_bad_regexes_are_named_before_any_backend(backends, regex, problem):
    for backend in backends.values():
        with pytest.raises(GrammarError, match=re.escape(problem)) as info:
            backend.compile(GrammarSpec("regex", regex))
        assert info.value.field == "regex"


def test_redundant_anchors_are_dropped_and_shorthands_mean_ascii(backends, hf_tok):
    assert normalize_regex("^[0-9]+$") == "[0-9]+"
    assert normalize_regex(r"[$^]x\$") == r"[$^]x\$"  # in a class or escaped: literal characters
    assert normalize_regex(r"[^]a]+") == r"[^]a]+"
    assert normalize_regex(r"\d[\w.]\S") == r"[0-9][0-9A-Za-z_.][^ \t\n\r\f\v]"
    arabic_three = hf_tok.encode("٣", add_special_tokens=False)
    for backend in backends.values():
        m = backend.matcher(backend.compile(GrammarSpec("regex", r"\d{1,3}")))
        assert not m.accept_token(arabic_three[0])


SPECS = [
    GrammarSpec("regex", r"\d{3}-[a-z]{2,5}"),
    GrammarSpec("regex", r"[A-Z][a-z]{1,6} (is|was) [0-9]{1,2}\."),
    GrammarSpec("json_schema", json.dumps({
        "type": "object", "additionalProperties": False, "required": ["name", "tags", "ok"],
        "properties": {"name": {"type": "string", "maxLength": 5}, "ok": {"type": "boolean"},
                       "tags": {"type": "array", "items": {"enum": ["x", "yz"]}, "maxItems": 2}},
    })),
]  # fmt: skip


@pytest.mark.parametrize("spec", SPECS, ids=["digits", "sentence", "schema"])
def test_both_backends_give_the_same_masks_along_random_walks(backends, hf_tok, spec):
    """A mask is the set of tokens that keep the text a prefix of something the spec accepts:
    two correct backends agree on it exactly. For JSON strings they differ in known ways only:
    xgrammar lets raw C0 control characters in (invalid JSON: the engine bans those tokens) and
    DEL/C1 ones (valid JSON, refused by outlines-core's string pattern); outlines-core allows
    escapes that xgrammar refuses (tokens ending inside an escape, ``{\\``; escapes in a string
    under maxLength)."""
    vocab = len(hf_tok)
    table = token_bytes(hf_tok, vocab)
    rng = random.Random(0)
    for _walk in range(3):
        matchers = {name: backends[name].matcher(backends[name].compile(spec)) for name in ("xgrammar", "outlines")}
        for _step in range(40):
            masks = {name: allowed(m, vocab) for name, m in matchers.items()}
            only_x, only_o = masks["xgrammar"] - masks["outlines"], masks["outlines"] - masks["xgrammar"]
            if spec.kind == "json_schema":
                only_x = {t for t in only_x if not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F
                                                      for c in table[t].decode(errors="ignore"))}
                only_o = {t for t in only_o if b"\\" not in table[t]}
            assert not only_x and not only_o, ([hf_tok.decode([t]) for t in sorted(only_x)[:10]],
                                               [hf_tok.decode([t]) for t in sorted(only_o)[:10]])
            tok = rng.choice(sorted(masks["xgrammar"] & masks["outlines"]))
            assert all(m.accept_token(tok) for m in matchers.values())
            if tok in STOPS:
                assert all(m.is_terminated() for m in matchers.values())
                break


@pytest.mark.parametrize("name", BACKENDS)
def test_a_batch_fill_gives_the_masks_of_row_by_row_fills(backends, hf_tok, name):
    """``fill_bitmasks`` (a backend's ``fill_batch`` on its thread pool, where it has one) against
    one ``fill_bitmask`` per row, on matchers left at random points of random walks: mid-string,
    complete (only a stop token may follow) and terminated, into rows of a dirty bitmask."""
    backend = backends[name]
    vocab = len(hf_tok)
    compiled = backend.compile(SPECS[2])
    rng = random.Random(7)
    matchers = []
    for i in range(12):
        m = backend.matcher(compiled)
        for _ in range(rng.randrange(40) if i > 1 else 100):
            choices = sorted(allowed(m, vocab))
            if not choices:
                break
            tok = rng.choice([t for t in choices if t not in STOPS] or choices) if i else rng.choice(choices)
            assert m.accept_token(tok)
        matchers.append(m)
    assert any(m.is_terminated() for m in matchers) and not all(m.is_terminated() for m in matchers)
    batch = torch.randint(-(2**31), 2**31 - 1, (len(matchers), bitmask_words(vocab)), dtype=torch.int32)
    fill_bitmasks(matchers, batch)
    for j, m in enumerate(matchers):
        row = allocate_bitmask(1, vocab)
        m.fill_bitmask(row, 0)
        assert torch.equal(batch[j], row[0]), f"row {j} differs"


@pytest.mark.parametrize("name", BACKENDS)
def test_a_model_wider_than_its_tokenizer_gets_the_same_masks(backends, hf_tok, name):
    """Logits wider than the tokenizer (a padded embedding, or this repo's GPU benchmark model:
    128,256 logits over a 49,152-token tokenizer): the ids past the tokenizer are never allowed,
    and every other bit is what the exact-width backend gives, filled row by row or together."""
    vocab = len(hf_tok)
    wide = vocab + 1000 + 7  # not a multiple of 32
    narrow_backend, wide_backend = backends[name], create_backend(name, hf_tok, wide, STOPS)
    narrow_m = narrow_backend.matcher(narrow_backend.compile(SPECS[2]))
    wide_ms = [wide_backend.matcher(wide_backend.compile(SPECS[2])) for _ in range(2)]
    rng = random.Random(3)
    for _step in range(30):
        expect = allocate_bitmask(1, wide)
        expect.zero_()
        narrow_m.fill_bitmask(expect[:, : bitmask_words(vocab)], 0)
        rows = torch.randint(-(2**31), 2**31 - 1, (2, expect.shape[1]), dtype=torch.int32)
        wide_ms[0].fill_bitmask(rows, 0)
        fill_bitmasks(wide_ms[1:], rows[1:])
        assert torch.equal(rows[0], expect[0]) and torch.equal(rows[1], expect[0])
        batch_fill = getattr(type(wide_ms[0]), "fill_batch", None)
        if batch_fill is not None:  # rows apart, as when a fallback order mixes backends in one batch
            spread = torch.randint(-(2**31), 2**31 - 1, (3, expect.shape[1]), dtype=torch.int32)
            batch_fill(wide_ms, spread, [2, 0])
            assert torch.equal(spread[2], expect[0]) and torch.equal(spread[0], expect[0])
        choices = sorted(allowed(narrow_m, vocab))
        tok = rng.choice([t for t in choices if t not in STOPS] or choices)
        assert narrow_m.accept_token(tok) and all(m.accept_token(tok) for m in wide_ms)
        if tok in STOPS:
            break


@pytest.mark.parametrize("name", BACKENDS)
def test_matcher_contract(backends, hf_tok, name):
    backend = backends[name]
    m = backend.matcher(backend.compile(GrammarSpec("regex", "(ab|cd)[0-9]")))
    ab, five, x = (hf_tok.convert_tokens_to_ids(t) for t in ("ab", "5", "x"))
    assert not m.accept_token(x) and not m.accept_token(2)  # refused tokens leave the state alone
    assert m.accept_token(ab) and not m.is_terminated()
    assert allowed(m, len(hf_tok)) == {hf_tok.convert_tokens_to_ids(str(d)) for d in range(10)}
    assert m.accept_token(five) and allowed(m, len(hf_tok)) == set(STOPS)
    assert m.accept_token(2) and m.is_terminated() and allowed(m, len(hf_tok)) == set()
    m.rollback(2)
    assert not m.is_terminated() and m.accept_token(five) and m.accept_token(0) and m.is_terminated()


@pytest.mark.parametrize("name", BACKENDS)
def test_matchers_of_one_compiled_grammar_are_independent(backends, hf_tok, name):
    """Every request's matcher comes from the one compiled grammar in the cache (llguidance's are
    copies of a template matcher): advancing, terminating or rolling back one moves no other."""
    backend = backends[name]
    compiled = backend.compile(GrammarSpec("regex", "(ab|cd)[0-9]"))
    first, second = backend.matcher(compiled), backend.matcher(compiled)
    ab, five = hf_tok.convert_tokens_to_ids("ab"), hf_tok.convert_tokens_to_ids("5")
    start = allowed(first, len(hf_tok))
    assert first.accept_token(ab) and first.accept_token(five) and first.accept_token(2) and first.is_terminated()
    assert allowed(second, len(hf_tok)) == start and not second.is_terminated()
    assert allowed(backend.matcher(compiled), len(hf_tok)) == start  # the template did not move either
    assert second.accept_token(ab) and allowed(second, len(hf_tok)) != start
    first.rollback(3)
    assert allowed(first, len(hf_tok)) == start and allowed(second, len(hf_tok)) != start


@pytest.mark.parametrize("name", BACKENDS)
def test_forced_strings(backends, hf_tok, name):
    backend = backends[name]
    m = backend.matcher(backend.compile(SPECS[2]))
    assert m.forced_string() == '{"name":"'
    for tok in hf_tok.encode('{"name":"bo"', add_special_tokens=False):
        assert m.accept_token(tok)
    assert m.forced_string() == ',"ok":'  # the schema's property order
    m = backend.matcher(backend.compile(GrammarSpec("regex", "(ab|cd)[0-9]")))
    assert m.forced_string() == ""


@pytest.mark.parametrize("name", BACKENDS)
def test_free_whitespace_is_per_spec(backends, hf_tok, name):
    backend = backends[name]
    space, newline = hf_tok.convert_tokens_to_ids("Ġ"), hf_tok.convert_tokens_to_ids("Ċ")
    for free in (False, True):
        m = backend.matcher(backend.compile(SPECS[2]._replace(any_whitespace=free)))
        assert m.accept_token(hf_tok.convert_tokens_to_ids("{"))
        mask = allowed(m, len(hf_tok))
        assert (space in mask and newline in mask) is free


@pytest.mark.skipif("llguidance" not in BACKENDS, reason="llguidance is not installed")
def test_llguidance_reads_ebnf_and_ends_only_on_a_stop_token(backends, hf_tok):
    backend = backends["llguidance"]
    m = backend.matcher(backend.compile(GrammarSpec("ebnf", 'root ::= "red" | "green"')))
    assert all(m.accept_token(t) for t in hf_tok.encode("red", add_special_tokens=False))
    assert not m.is_terminated() and allowed(m, len(hf_tok)) == set(STOPS)  # complete: only a stop may follow
    assert m.accept_token(0) and m.is_terminated()


@pytest.mark.skipif("llguidance" not in BACKENDS, reason="llguidance is not installed")
def test_an_old_llguidance_is_refused_by_name(hf_tok, monkeypatch):
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "1.6.1" if name == "llguidance" else real(name))
    with pytest.raises(GrammarError, match=r"llguidance 1\.6\.1 is too old, braid needs >= 1\.9"):
        create_backend("llguidance", hf_tok, len(hf_tok), STOPS)


def test_outlines_cannot_do_ebnf_and_a_fallback_order_can(backends, hf_tok):
    ebnf = GrammarSpec("ebnf", 'root ::= "red" | "green"')
    with pytest.raises(GrammarError, match="outlines backend cannot compile 'ebnf'"):
        backends["outlines"].compile(ebnf)
    chain = create_backend("outlines, xgrammar", hf_tok, len(hf_tok), STOPS)
    m = chain.matcher(chain.compile(ebnf))
    assert all(m.accept_token(t) for t in hf_tok.encode("red", add_special_tokens=False))
    with pytest.raises(GrammarError, match="outlines: .*; xgrammar: ") as info:
        chain.compile(GrammarSpec("ebnf", "root ::= "))
    assert info.value.field == "ebnf"
    with pytest.raises(UnknownNameError, match="nope"):
        create_backend("xgrammar,nope", hf_tok, len(hf_tok), STOPS)
    with pytest.raises(InvalidRequestError, match="grammar_backend"):
        create_backend(" , ", hf_tok, len(hf_tok), STOPS)


def test_any_whitespace_needs_a_json_schema_and_min_new_tokens_no_grammar():
    from braid.runtime.sampling_params import SamplingParams

    with pytest.raises(InvalidRequestError, match="any_whitespace"):
        SamplingParams(any_whitespace=True, regex="a+")
    with pytest.raises(InvalidRequestError, match="min_new_tokens: cannot be combined with regex"):
        SamplingParams(min_new_tokens=3, regex="a+")
    assert SamplingParams(any_whitespace=True, json_schema={"type": "string"}).any_whitespace


@pytest.mark.parametrize("schema, good, bad", [
    ({"type": "string", "format": "uri"}, '"https://a.example/x"', '"not a uri"'),
    ({"type": "string", "format": "date-time"}, '"2026-11-21T10:00:00Z"', '"yesterday"'),
    ({"type": "string", "format": "email"}, '"a@b.example"', '"a.b"'),
])  # fmt: skip
def test_validation_checks_formats(schema, good, bad):
    from braid.grammar.validate import validate_json

    assert validate_json(good, json.dumps(schema)) == (True, None)
    ok, error = validate_json(bad, json.dumps(schema))
    assert not ok and schema["format"] in error


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("schema, good, bad", [
    ({"type": "string", "pattern": r"^[a-z]{1,3}(:[A-Z]{1,2})?$"}, ["ab", "ab:CD"], ["aB", "ab:"]),
    ({"type": "string", "format": "date"}, ["2026-11-30", "2024-12-31"], ["2026-11-31", "2026-13-01"]),
    ({"type": "string", "format": "date-time"}, ["2026-11-21T10:00:59Z"], ["2026-11-21T10:00:60Z"]),
    ({"type": "string", "format": "ipv4"}, ["10.0.255.1"], ["052.1.1.1", "256.1.1.1"]),
    ({"type": "string", "format": "email", "maxLength": 12}, ["ab@abc.org"], ["abcd@abcd.com"]),
    ({"$defs": {"a": {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}},
      "allOf": [{"$ref": "#/$defs/a"}, {"type": "object", "properties": {"y": {"type": "boolean"}}}],
      "properties": {"x": True, "y": True}, "additionalProperties": False},
     ['{"x":1}', '{"x":1,"y":true}'], ['"text"', '{"y":true}', '{"x":1,"z":0}']),
    ({"definitions": {"step": {"oneOf": [{"type": "string"}, {"properties": {"run": {"enum": [1, 2]}}}]}},
      "type": "object", "properties": {"r": {"$ref": "#/definitions/step/oneOf/1/properties/run"}},
      "required": ["r"], "additionalProperties": False}, ['{"r":2}'], ['{"r":3}', '{"r":"a"}']),
    ({"$schema": "http://json-schema.org/draft-07/schema#", "type": "array", "items": [{"type": "integer"}],
      "additionalItems": False, "minItems": 1}, ["[7]"], ["[]", "[7,8]", '["a"]']),
    ({"$schema": "http://json-schema.org/draft-04/schema#", "type": "integer", "minimum": 3,
      "exclusiveMinimum": True, "maximum": 5}, ["4", "5"], ["3", "6"]),
    ({"type": "string", "pattern": "^\\$\\{(.|[\r\n]){1,3}\\}$"}, ["${ab}", "${a\\nb}"], ["${}", "$ab"]),
    ({"type": "string", "pattern": "^(?<year>[0-9]{2})-(?<m>[0-9])$"}, ["26-1"], ["26-", "2-1"]),
    ({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"], "additionalProperties": False,
      "allOf": [{"if": {"properties": {"a": {"const": 1}}}, "then": {"required": ["a"]}}]},
     ['{"a":1}'], ["0", '{"b":1}']),
    ({"type": "array", "minItems": 1, "maxItems": 2}, ['[1]', '["a",{}]'], ["[]", "[1,2,3]"]),
    ({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "boolean"}},
      "additionalProperties": False, "anyOf": [{"required": ["a"]}, {"required": ["b"]}]},
     ['{"a":1}', '{"b":true}', '{"a":1,"b":false}'], ["251", "{}", '{"c":1}']),
    ({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "boolean"}},
      "additionalProperties": False, "oneOf": [{"required": ["a"]}, {"required": ["b"]}]},
     ['{"a":1}', '{"b":true}'], ["7", "{}"]),  # (both branches at once: oneOf is enforced as anyOf)
    ({"title": "T", "allOf": [{"type": "object", "properties": {"v": {"enum": [3]}}, "required": ["v"],
                               "additionalProperties": False}]}, ['{"v":3}'], ["0", '{"v":4}']),
])  # fmt: skip
def test_prepared_schemas_are_enforced(backends, hf_tok, name, schema, good, bad):
    """Each rewrite of braid/grammar/schema_prep.py, on both backends: what the schema (with
    formats checked) accepts passes, and what it refuses is refused by the grammar itself."""
    from braid.grammar.validate import validate_json

    if name == "outlines" and "allOf" in schema:
        pytest.skip("outlines-core cannot compile a property schema that is `true`")
    if name == "outlines" and schema.get("type") == "array" and "items" not in schema:
        pytest.skip("outlines-core takes minutes to index arrays of any JSON value")
    backend = backends[name]
    compiled = backend.compile(GrammarSpec("json_schema", json.dumps(schema)))
    for text in good + bad:
        text = text if text.startswith(("{", '"')) else json.dumps(text)
        m = backend.matcher(compiled)
        taken = all(m.accept_token(t) for t in hf_tok.encode(text, add_special_tokens=False)) and m.accept_token(2)
        assert taken is validate_json(text, json.dumps(schema))[0], text


def test_a_schema_that_cannot_be_checked_is_never_reported_valid():
    from braid.grammar.validate import validate_json

    ok, error = validate_json('{"a": 1}', json.dumps({"$ref": "https://example.invalid/s.json"}))
    assert not ok and "could not be checked" in error


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("schema, problem", [
    ({"type": "object", "properties": {"a": {"$ref": "https://example.com/a.json"}}}, "points outside the schema"),
    ({"$dynamicRef": "#meta"}, "$dynamicRef is not supported"),
])  # fmt: skip
def test_references_no_backend_can_follow_are_refused(backends, name, schema, problem):
    with pytest.raises(GrammarError, match=re.escape(problem)):
        backends[name].compile(GrammarSpec("json_schema", json.dumps(schema)))


@pytest.mark.skipif("llguidance" not in BACKENDS, reason="llguidance is not installed")
def test_llguidance_enforces_a_schema_with_unique_items_but_that_keyword(backends, hf_tok):
    schema = {"type": "array", "items": {"enum": ["a", "b"]}, "uniqueItems": True, "maxItems": 2}
    backend = backends["llguidance"]
    compiled = backend.compile(GrammarSpec("json_schema", json.dumps(schema)))
    for text, taken in (('["a","b"]', True), ('["a","a"]', True), ('["c"]', False)):
        m = backend.matcher(compiled)
        ok = all(m.accept_token(t) for t in hf_tok.encode(text, add_special_tokens=False)) and m.accept_token(2)
        assert ok is taken, text
