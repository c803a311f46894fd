"""The grammar contract: a spec is compiled once (cached) into a grammar; each constrained
request gets its own matcher, which says which tokens may come next and follows the tokens that
were chosen.

Ownership: compiled grammars are immutable and shared (the compile cache holds them); a matcher
belongs to one request and is touched only by the scheduler thread. Nothing here knows about KV
memory or batches.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch

KINDS = ("regex", "json_schema", "ebnf")


class GrammarError(ValueError):
    """A spec that cannot be compiled; ``field`` names the request field it came from."""

    def __init__(self, field: str, problem: str) -> None:
        self.field = field
        self.problem = problem
        super().__init__(f"{field}: {problem}")


class GrammarSpec(NamedTuple):
    kind: str  # one of KINDS
    spec: str  # the regex, the JSON schema text, or the EBNF grammar
    any_whitespace: bool = False  # JSON only: allow free whitespace runs (off: compact separators)


class Matcher(Protocol):
    """One request's position in its grammar."""

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into ``bitmask[row]`` (int32 words, bit set = allowed)."""

    def accept_token(self, token_id: int) -> bool:
        """Advance by one chosen token; False if the grammar forbids it (the state is unchanged)."""

    def rollback(self, num_tokens: int) -> None:
        """Undo the last ``num_tokens`` accepted tokens."""

    def is_terminated(self) -> bool:
        """The grammar accepted a stop token: nothing more may be generated."""

    def forced_string(self) -> str:
        """The text every continuation must start with ("" if the next step has a choice)."""


class GrammarBackend(Protocol):
    """Compiles specs for one tokenizer and makes matchers for them."""

    name: str

    def compile(self, spec: GrammarSpec) -> object:
        """A compiled grammar; raises GrammarError naming the field on a bad or unsupported spec."""

    def matcher(self, compiled: object) -> Matcher: ...


def bitmask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def set_token_bits(words: torch.Tensor, token_ids, allowed: bool) -> None:
    """Allow (or ban) ``token_ids`` in one mask row of int32 words, in place; ids past the row's
    width are ignored. Bit 31 of a word is its sign bit, hence the int32 arithmetic."""
    for t in token_ids:
        if t < words.numel() * 32:
            bit = (1 << (t % 32)) - (1 << 32 if t % 32 == 31 else 0)
            if allowed:
                words[t // 32] |= bit
            else:
                words[t // 32] &= ~bit


def utf8_prefix(b: bytes) -> str:
    """The longest prefix of ``b`` made of whole UTF-8 characters, decoded (a forced string may
    stop inside a character)."""
    for cut in range(len(b), max(-1, len(b) - 4), -1):
        try:
            return b[:cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
    return ""


def allocate_bitmask(rows: int, vocab_size: int, pin: bool = False) -> torch.Tensor:
    """``(rows, ceil(V / 32))`` int32, every token allowed; ``pin``: in pinned host memory, so
    that its copy to a CUDA device is queued without a host-side copy first."""
    return torch.full((rows, bitmask_words(vocab_size)), -1, dtype=torch.int32, pin_memory=pin)


def fill_bitmasks(matchers: list[Matcher], bitmask: torch.Tensor) -> None:
    """``bitmask[j]`` = the allowed tokens of ``matchers[j]``. Matchers of a class with a
    ``fill_batch(matchers, bitmask, rows)`` static method (xgrammar's fills rows on several
    threads) are filled together; the others one row at a time."""
    groups: dict[type, list[int]] = {}
    for j, m in enumerate(matchers):
        groups.setdefault(type(m), []).append(j)
    for cls, rows in groups.items():
        batch = getattr(cls, "fill_batch", None)
        if batch is not None:
            batch([matchers[j] for j in rows], bitmask, rows)
        else:
            for j in rows:
                matchers[j].fill_bitmask(bitmask, j)
