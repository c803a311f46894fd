"""The xgrammar backend: regex, JSON schema and EBNF through xgrammar's compiler."""

from __future__ import annotations

import functools
import json

import torch

from braid.grammar.base import GrammarError, GrammarSpec, bitmask_words
from braid.grammar.regex_check import normalize_regex
from braid.grammar.schema_prep import prepare_schema


class XGrammarMatcher:
    """``words``: the mask width xgrammar fills (its vocabulary's), when the logits are wider
    (see XGrammarBackend); the words past it are zero, their ids never allowed."""

    def __init__(self, matcher, words: int | None = None, last_word_bits: int = 32) -> None:
        self._m = matcher
        self._words = words
        self._last_bits = last_word_bits

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        if self._m.is_terminated():  # xgrammar refuses to fill a mask then: nothing is allowed
            bitmask[row].zero_()
        elif self._words is None:
            self._m.fill_next_token_bitmask(bitmask, row)
        else:
            narrow = torch.empty((1, self._words), dtype=torch.int32)
            self._m.fill_next_token_bitmask(narrow, 0)
            self._widen(bitmask, [row], narrow)

    @staticmethod
    def fill_batch(matchers: list[XGrammarMatcher], bitmask: torch.Tensor, rows: list[int]) -> None:
        """Fill ``bitmask[rows[k]]`` for ``matchers[k]``, on xgrammar's thread pool."""
        live = []
        for m, r in zip(matchers, rows):
            if m._m.is_terminated():
                bitmask[r].zero_()
            else:
                live.append((m, r))
        if not live:
            return
        words = live[0][0]._words
        if words is None:
            _batch_filler().batch_fill_next_token_bitmask([m._m for m, _ in live], bitmask, [r for _, r in live])
            return
        narrow = torch.empty((len(live), words), dtype=torch.int32)
        _batch_filler().batch_fill_next_token_bitmask([m._m for m, _ in live], narrow)
        live[0][0]._widen(bitmask, [r for _, r in live], narrow)

    def _widen(self, bitmask: torch.Tensor, rows: list[int], narrow: torch.Tensor) -> None:
        """``narrow`` (one row per entry of ``rows``) into the first words of those rows of
        ``bitmask``; the ids past xgrammar's vocabulary cleared."""
        if self._last_bits < 32:
            narrow[:, -1] &= (1 << self._last_bits) - 1
        first, n = rows[0], len(rows)
        if rows == list(range(first, first + n)):  # the usual case: a slice, no index ops (20 us each)
            bitmask[first : first + n, : self._words] = narrow
            bitmask[first : first + n, self._words :] = 0
        else:
            index = torch.tensor(rows)
            bitmask[index, : self._words] = narrow
            bitmask[index, self._words :] = 0

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
        # Logits wider than the tokenizer: xgrammar gets the tokenizer's width and braid clears
        # the rest. Told the full width, it treats every id past the tokenizer as a special
        # token, which cost 106 us per mask and 17 us per accepted token at 128,256 logits over
        # SmolLM2's 49,152 tokens, against 6-10 us and 1 us (docs/benchmarks.md).
        tokens = min(vocab_size, len(hf_tokenizer))
        if any(t >= tokens for t in stop_token_ids):  # a stop id past the tokenizer: the full width
            tokens = vocab_size
        self._narrow = None if tokens == vocab_size else (bitmask_words(tokens), tokens % 32 or 32)
        info = xgr.TokenizerInfo.from_huggingface(hf_tokenizer, vocab_size=tokens, stop_token_ids=stop_token_ids)
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
        return XGrammarMatcher(self._xgr.GrammarMatcher(compiled), *(self._narrow or ()))
