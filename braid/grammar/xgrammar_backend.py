"""The xgrammar backend: regex, JSON schema and EBNF through xgrammar's compiler."""

from __future__ import annotations

import functools
import json

import torch

from braid.grammar.base import GrammarError, GrammarSpec
from braid.grammar.regex_check import normalize_regex
from braid.grammar.schema_prep import prepare_schema


class XGrammarMatcher:
    def __init__(self, matcher) -> None:
        self._m = matcher

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        if self._m.is_terminated():  # xgrammar refuses to fill a mask then: nothing is allowed
            bitmask[row].zero_()
        else:
            self._m.fill_next_token_bitmask(bitmask, row)

    @staticmethod
    def fill_batch(matchers: list[XGrammarMatcher], bitmask: torch.Tensor, rows: list[int]) -> None:
        """Fill ``bitmask[rows[k]]`` for ``matchers[k]``, on xgrammar's thread pool."""
        live = [(m._m, r) for m, r in zip(matchers, rows) if not m._m.is_terminated()]
        for m, r in zip(matchers, rows):
            if m._m.is_terminated():
                bitmask[r].zero_()
        if live:
            _batch_filler().batch_fill_next_token_bitmask([m for m, _ in live], bitmask, [r for _, r in live])

    def accept_token(self, token_id: int) -> bool:
        return bool(self._m.accept_token(token_id))

    def rollback(self, num_tokens: int) -> None:
        self._m.rollback(num_tokens)

    def is_terminated(self) -> bool:
        return bool(self._m.is_terminated())

    def forced_string(self) -> str:
        try:
            return self._m.find_jump_forward_string()
        except UnicodeDecodeError:  # the forced bytes start inside a character: no jump this step
            return ""


@functools.cache
def _batch_filler():
    import xgrammar as xgr

    return xgr.BatchGrammarMatcher(max_threads="auto")  # half the hardware threads


class XGrammarBackend:
    """Compiles for one HF tokenizer; ``vocab_size`` is the model's logits width."""

    name = "xgrammar"

    def __init__(self, hf_tokenizer, vocab_size: int, stop_token_ids: list[int]) -> None:
        try:
            import xgrammar as xgr
        except ImportError as e:  # a declared dependency; say what is missing and how to install it
            raise GrammarError("grammar_backend", f"xgrammar cannot be imported ({e}): pip install xgrammar") from e
        self._xgr = xgr
        info = xgr.TokenizerInfo.from_huggingface(hf_tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids)
        self._compiler = xgr.GrammarCompiler(info, max_threads=1)

    def compile(self, spec: GrammarSpec):
        try:
            if spec.kind == "regex":
                return self._compiler.compile_regex(normalize_regex(spec.spec))
            if spec.kind == "json_schema":
                schema = prepare_schema(spec.spec)
                return self._compiler.compile_json_schema(
                    schema, any_whitespace=spec.any_whitespace,
                    separators=None if spec.any_whitespace else (",", ":"))
            if spec.kind == "ebnf":
                return self._compiler.compile_grammar(spec.spec)
        except GrammarError:
            raise
        except json.JSONDecodeError as e:
            raise GrammarError(spec.kind, f"not valid JSON: {e}") from e
        except (RuntimeError, ValueError, TypeError) as e:
            raise GrammarError(spec.kind, f"xgrammar cannot compile it: {str(e).strip()[:500]}") from e
        raise GrammarError(spec.kind, f"the xgrammar backend cannot compile {spec.kind!r}")

    def matcher(self, compiled) -> XGrammarMatcher:
        return XGrammarMatcher(self._xgr.GrammarMatcher(compiled))
