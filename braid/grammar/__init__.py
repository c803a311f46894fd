"""Constrained decoding: regex / JSON schema / EBNF -> token masks.

Depends on no other part of braid except the shared name registry.
"""

from __future__ import annotations

import importlib.util

from braid.errors import InvalidRequestError
from braid.grammar.base import (
    KINDS,
    GrammarBackend,
    GrammarError,
    GrammarSpec,
    Matcher,
    allocate_bitmask,
    fill_bitmasks,
)
from braid.grammar.cache import GrammarCache
from braid.grammar.fallback import FallbackBackend, split_names
from braid.registry import Registry

GRAMMAR_BACKENDS: Registry[GrammarBackend] = Registry("grammar backend")


@GRAMMAR_BACKENDS.register("xgrammar")
def _xgrammar(hf_tokenizer, vocab_size: int, stop_token_ids: list[int]) -> GrammarBackend:
    from braid.grammar.xgrammar_backend import XGrammarBackend

    return XGrammarBackend(hf_tokenizer, vocab_size, stop_token_ids)


@GRAMMAR_BACKENDS.register("llguidance")
def _llguidance(hf_tokenizer, vocab_size: int, stop_token_ids: list[int]) -> GrammarBackend:
    from braid.grammar.llguidance_backend import LLGuidanceBackend

    return LLGuidanceBackend(hf_tokenizer, vocab_size, stop_token_ids)


@GRAMMAR_BACKENDS.register("outlines")
def _outlines(hf_tokenizer, vocab_size: int, stop_token_ids: list[int]) -> GrammarBackend:
    from braid.grammar.outlines_backend import OutlinesBackend

    return OutlinesBackend(hf_tokenizer, vocab_size, stop_token_ids)


__all__ = [
    "GRAMMAR_BACKENDS", "KINDS", "GrammarBackend", "GrammarCache", "GrammarError", "GrammarSpec", "Matcher",
    "allocate_bitmask", "check_backend_names", "fill_bitmasks", "create_backend",
]  # fmt: skip


def resolve_backend_names(names: str) -> str:
    """``"auto"``: llguidance then xgrammar where llguidance is installed (the ``llguidance``
    extra), else xgrammar alone; the measurements behind it are in docs/benchmarks.md."""
    if names.strip() != "auto":
        return names
    return "llguidance,xgrammar" if importlib.util.find_spec("llguidance") else "xgrammar"


def check_backend_names(names: str) -> None:
    """``names`` is ``auto``, one backend or a comma-separated fallback order; raises
    UnknownNameError (listing the known names) for an unknown one."""
    parts = split_names(resolve_backend_names(names))
    if not parts:
        raise InvalidRequestError("grammar_backend", "names no backend")
    for name in parts:
        GRAMMAR_BACKENDS.get(name)


def create_backend(names: str, hf_tokenizer, vocab_size: int, stop_token_ids: list[int]) -> GrammarBackend:
    check_backend_names(names)
    backends = [GRAMMAR_BACKENDS.create(n, hf_tokenizer, vocab_size, stop_token_ids)
                for n in split_names(resolve_backend_names(names))]
    return backends[0] if len(backends) == 1 else FallbackBackend(backends)
