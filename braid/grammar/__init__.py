"""Constrained decoding: regex / JSON schema / EBNF -> token masks.

Depends on no other part of braid except the shared name registry.
"""

from __future__ import annotations

from braid.grammar.base import (
    KINDS,
    GrammarBackend,
    GrammarError,
    GrammarSpec,
    Matcher,
    allocate_bitmask,
    apply_bitmask,
)
from braid.grammar.cache import GrammarCache
from braid.registry import Registry

GRAMMAR_BACKENDS: Registry[GrammarBackend] = Registry("grammar backend")


@GRAMMAR_BACKENDS.register("xgrammar")
def _xgrammar(hf_tokenizer, vocab_size: int, stop_token_ids: list[int]) -> GrammarBackend:
    from braid.grammar.xgrammar_backend import XGrammarBackend

    return XGrammarBackend(hf_tokenizer, vocab_size, stop_token_ids)


__all__ = [
    "GRAMMAR_BACKENDS", "KINDS", "GrammarBackend", "GrammarCache", "GrammarError", "GrammarSpec", "Matcher",
    "allocate_bitmask", "apply_bitmask",
]  # fmt: skip
