"""The llguidance backend (optional: ``pip install llguidance``): regex, JSON schema and EBNF
(GBNF, converted to its Lark dialect) through llguidance's Earley parser with a lexer, which
computes masks on the fly instead of precompiling them.

Not part of the design card; it is here because the measurements in docs/benchmarks.md asked
for a comparison. braid's schema preparation and regex normalization apply to it as to the
other backends.
"""

from __future__ import annotations

import importlib.metadata
import json
import re

import torch

from braid.grammar.base import GrammarError, GrammarSpec, set_token_bits, utf8_prefix
from braid.grammar.regex_check import normalize_regex
from braid.grammar.schema_prep import SCHEMA_VALUE_KEYS, prepare_schema

MIN_VERSION = (1, 9)  # also in pyproject.toml's llguidance extra


class LLGuidanceMatcher:
    """llguidance stops by itself once nothing but EOS can follow; braid's contract ends a
    matcher only when a stop token is taken, so that step is tracked here.

    Rows are filled one at a time: llguidance's own thread pool (``LLExecutor``) was tried for a
    step's rows and measured slower on the H100 host (4.7 ms a step at batch 64, docs/benchmarks.md)."""

    def __init__(self, matcher, stop_ids: frozenset[int]) -> None:
        self._m = matcher
        self._stops = stop_ids
        self._history: list[tuple[bool, bool]] = []  # per accepted token: (a stop token, consumed by llguidance)

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        words = bitmask[row]
        assert words.dtype == torch.int32 and words.is_contiguous() and words.device.type == "cpu"
        if self.is_terminated():
            words.zero_()
        elif self._m.is_stopped():  # complete: only a stop token may follow
            words.zero_()
            set_token_bits(words, self._stops, allowed=True)
        else:
            self._m.unsafe_compute_mask_ptr(words.data_ptr(), words.numel() * 4)

    def accept_token(self, token_id: int) -> bool:
        if self.is_terminated():
            return False
        if token_id in self._stops and self._m.is_stopped():  # llguidance takes nothing more
            self._history.append((True, False))
            return True
        if self._m.validate_tokens([token_id]) != 1 or not self._m.consume_token(token_id):
            return False
        self._history.append((token_id in self._stops, True))
        return True

    def rollback(self, num_tokens: int) -> None:
        assert 0 <= num_tokens <= len(self._history), f"cannot roll back {num_tokens} of {len(self._history)}"
        undone = self._history[len(self._history) - num_tokens:]
        del self._history[len(self._history) - num_tokens:]
        consumed = sum(1 for _, by_llguidance in undone if by_llguidance)
        assert self._m.rollback(consumed), f"llguidance cannot roll back {consumed} tokens"

    def is_terminated(self) -> bool:
        return bool(self._history) and self._history[-1][0]

    def forced_string(self) -> str:
        return "" if self._m.is_stopped() else utf8_prefix(self._m.compute_ff_bytes())


class LLGuidanceBackend:
    name = "llguidance"

    def __init__(self, hf_tokenizer, vocab_size: int, stop_token_ids: list[int]) -> None:
        try:
            import llguidance
            import llguidance.hf
        except ImportError as e:
            raise GrammarError("grammar_backend",
                               f"llguidance cannot be imported ({e}): pip install llguidance") from e
        version = importlib.metadata.version("llguidance")
        if tuple(int(x) for x in re.findall(r"\d+", version)[:2]) < MIN_VERSION:
            # 1.6 takes one EOS id only, 1.7 walks some schemas differently: both were seen failing
            raise GrammarError("grammar_backend", f"llguidance {version} is too old, braid needs >= "
                               f"{'.'.join(map(str, MIN_VERSION))}: pip install -U llguidance")
        self._llg = llguidance
        self._tokenizer = llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=vocab_size, eos_token=stop_token_ids)
        self._stops = frozenset(stop_token_ids)

    def compile(self, spec: GrammarSpec):
        """A matcher at the grammar's start, never advanced: each request's matcher is a copy of
        it. Building an LLMatcher from the grammar text took 220-250 us (it parses the grammar
        again), copying one about 1 us; at admission that is on the scheduler thread."""
        template = self._llg.LLMatcher(self._tokenizer, self._grammar(spec), log_level=0)
        if template.is_error():
            raise GrammarError(spec.kind, f"llguidance cannot start it: {template.get_error().strip()[:500]}")
        return template

    def matcher(self, compiled) -> LLGuidanceMatcher:
        return LLGuidanceMatcher(compiled.deep_copy(), self._stops)

    def _grammar(self, spec: GrammarSpec) -> str:
        llg = self._llg
        if spec.kind == "regex":
            grammar = llg.LLMatcher.grammar_from_regex(normalize_regex(spec.spec))
        elif spec.kind == "json_schema":
            try:
                schema = _without_unique_items(json.loads(prepare_schema(spec.spec, for_llguidance=True)))
            except json.JSONDecodeError as e:
                raise GrammarError(spec.kind, f"not valid JSON: {e}") from e
            ws = {"whitespace_flexible": True} if spec.any_whitespace else {
                "whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
            # oneOf as anyOf: real-world schemas rarely mean the exclusivity (measured: it refused them)
            grammar = llg.LLMatcher.grammar_from_json_schema(schema, defaults={**ws, "coerce_one_of": True})
        elif spec.kind == "ebnf":
            try:
                from llguidance.gbnf_to_lark import gbnf_to_lark

                grammar = llg.LLMatcher.grammar_from_lark(gbnf_to_lark(spec.spec))
            except Exception as e:  # its converter raises plain exceptions on bad input
                raise GrammarError(spec.kind, f"llguidance cannot read it: {str(e).strip()[:300]}") from e
        else:
            raise GrammarError(spec.kind, f"the llguidance backend cannot compile {spec.kind!r}")
        error = llg.LLMatcher.validate_grammar(grammar, self._tokenizer)
        if error:
            raise GrammarError(spec.kind, f"llguidance cannot compile it: {error.strip()[:500]}")
        return grammar


def _without_unique_items(node):
    """The schema without ``uniqueItems``, which llguidance refuses outright (no grammar can
    enforce it) and which real-world schemas use a lot: everything else stays enforced by
    llguidance rather than falling to a looser backend, and the output's validation reports any
    duplicate."""
    if isinstance(node, list):
        return [_without_unique_items(x) for x in node]
    if not isinstance(node, dict):
        return node
    return {k: v if k in SCHEMA_VALUE_KEYS else _without_unique_items(v)
            for k, v in node.items() if not (k == "uniqueItems" and isinstance(v, bool))}  # not a property named so
