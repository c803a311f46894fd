"""The outlines backend: regex and JSON schema through outlines-core's token index (a DFA over
the vocabulary, built once per spec). JSON schemas become a regex with outlines-core's
schema-to-regex builder. EBNF is not something it can do.

outlines-core's guide has one end-of-sequence token and no "terminated" state (a final state
simply allows EOS), so the matcher adds both: any of the request's stop tokens may end the
output in a final state, and taking one terminates the matcher.
"""

from __future__ import annotations

import json
import threading

import torch

from braid.grammar.base import GrammarError, GrammarSpec, set_token_bits, utf8_prefix
from braid.grammar.regex_check import normalize_regex
from braid.grammar.schema_prep import prepare_schema
from braid.grammar.vocab import token_bytes

FREE_WHITESPACE = r"[ \t\n\r]*"
MAX_FORCED_BYTES = 256  # a jump-forward string is cut here (the next step finds the rest)
MAX_FORCED_FRONTIER = 64  # positions followed at once while looking for forced bytes
MAX_CACHED_MASKS = 1024  # per grammar: 16 KiB each for a 128k vocabulary


class OutlinesGrammar:
    """A compiled spec: the token index, and what each of its states forces (filled lazily)."""

    def __init__(self, index, vocab: list[bytes | None]) -> None:
        self.index = index
        self.vocab = vocab
        self.finals = frozenset(index.get_final_states())
        self._forced: dict[int, bytes] = {}
        self._masks: dict[int, torch.Tensor] = {}  # state -> its mask words (a state's mask never changes)
        self._lock = threading.Lock()

    def mask_words(self, state: int, guide, words: int) -> torch.Tensor:
        """The state's allowed tokens as ``words`` int32 words (outlines' one EOS included)."""
        with self._lock:
            hit = self._masks.get(state)
        if hit is None or hit.numel() != words:
            hit = torch.zeros(words, dtype=torch.int32)
            guide.write_mask_into(hit.data_ptr(), words, 4)
            with self._lock:
                if len(self._masks) < MAX_CACHED_MASKS:
                    self._masks[state] = hit
        return hit

    def forced_bytes(self, state: int) -> bytes:
        with self._lock:
            hit = self._forced.get(state)
        if hit is None:
            hit = self._find_forced(state)
            with self._lock:
                self._forced[state] = hit
        return hit

    def _find_forced(self, state: int) -> bytes:
        """The bytes every path from ``state`` starts with. A position is (state, bytes of the
        current token not yet consumed); positions with nothing left expand into the tokens
        their state allows. A byte is forced while every position agrees on it."""
        out = bytearray()
        positions = {(state, b"")}
        while len(out) < MAX_FORCED_BYTES:
            expanded = set()
            for s, rest in positions:
                if rest:
                    expanded.add((s, rest))
                    continue
                if s in self.finals:  # the output may end here: nothing further is forced
                    return bytes(out)
                for tok in self.index.get_allowed_tokens(s) or ():
                    text = self.vocab[tok] if tok < len(self.vocab) else None
                    if not text:
                        return bytes(out)
                    expanded.add((self.index.get_next_state(s, tok), text))
                    if len(expanded) > MAX_FORCED_FRONTIER or len({p[1][0] for p in expanded}) > 1:
                        return bytes(out)
            firsts = {rest[0] for _, rest in expanded}
            if len(firsts) != 1:
                return bytes(out)
            out.append(firsts.pop())
            positions = {(s, rest[1:]) for s, rest in expanded}
        return bytes(out)


class OutlinesMatcher:
    def __init__(self, grammar: OutlinesGrammar, guide, eos_id: int, stop_ids: frozenset[int]) -> None:
        self._grammar = grammar
        self._guide = guide
        self._eos = eos_id
        self._stops = stop_ids
        self._history: list[bool] = []  # per accepted token: did it end the output
        self._terminated = False

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        words = bitmask[row]
        assert words.dtype == torch.int32 and words.is_contiguous() and words.device.type == "cpu"
        if self._terminated:
            words.zero_()
            return
        state = self._guide.get_state()
        words.copy_(self._grammar.mask_words(state, self._guide, words.numel()))
        if state in self._grammar.finals:  # every stop token, not just outlines' one EOS
            set_token_bits(words, self._stops, allowed=True)

    def accept_token(self, token_id: int) -> bool:
        if self._terminated:
            return False
        if token_id in self._stops:
            if self._guide.get_state() not in self._grammar.finals:
                return False
            self._terminated = True
            self._history.append(True)
            return True
        if not self._guide.accepts_tokens([token_id]):
            return False
        self._guide.advance(token_id, return_tokens=False)
        self._history.append(False)
        return True

    def rollback(self, num_tokens: int) -> None:
        assert 0 <= num_tokens <= len(self._history), f"cannot roll back {num_tokens} of {len(self._history)} tokens"
        undone = self._history[len(self._history) - num_tokens:]
        del self._history[len(self._history) - num_tokens:]
        advanced = sum(1 for ended in undone if not ended)
        if advanced:
            self._guide.rollback_state(advanced)
        self._terminated = bool(self._history) and self._history[-1]

    def is_terminated(self) -> bool:
        return self._terminated

    def forced_string(self) -> str:
        if self._terminated:
            return ""
        forced = self._grammar.forced_bytes(self._guide.get_state())
        return utf8_prefix(forced)


class OutlinesBackend:
    """Compiles for one HF tokenizer; ``vocab_size`` is the model's logits width."""

    name = "outlines"

    def __init__(self, hf_tokenizer, vocab_size: int, stop_token_ids: list[int]) -> None:
        try:
            import outlines_core
        except ImportError as e:
            raise GrammarError("grammar_backend",
                               f"outlines-core cannot be imported ({e}): pip install outlines-core") from e
        assert stop_token_ids, "the outlines backend needs at least one stop token"
        self._oc = outlines_core
        self._vocab = token_bytes(hf_tokenizer, vocab_size)
        self._stops = frozenset(stop_token_ids)
        self._eos = min(stop_token_ids)
        by_text: dict[bytes, list[int]] = {}
        for i, text in enumerate(self._vocab):
            if text and i not in self._stops:
                by_text.setdefault(text, []).append(i)
        self._vocabulary = outlines_core.Vocabulary(self._eos, by_text)

    def compile(self, spec: GrammarSpec) -> OutlinesGrammar:
        if spec.kind == "regex":
            regex = normalize_regex(spec.spec)
        elif spec.kind == "json_schema":
            try:
                schema = prepare_schema(spec.spec)
            except json.JSONDecodeError as e:
                raise GrammarError(spec.kind, f"not valid JSON: {e}") from e
            try:
                regex = self._oc.json_schema.build_regex_from_schema(
                    schema, whitespace_pattern=FREE_WHITESPACE if spec.any_whitespace else "")
            except (ValueError, TypeError, RuntimeError) as e:
                raise GrammarError(spec.kind, f"outlines-core cannot turn it into a regex: {_first_line(e)}") from e
        else:
            raise GrammarError(spec.kind, f"the outlines backend cannot compile {spec.kind!r}")
        try:
            return OutlinesGrammar(self._oc.Index(regex, self._vocabulary), self._vocab)
        except (ValueError, TypeError, RuntimeError) as e:
            raise GrammarError(spec.kind, f"outlines-core cannot build its index: {_first_line(e)}") from e

    def matcher(self, compiled: OutlinesGrammar) -> OutlinesMatcher:
        return OutlinesMatcher(compiled, self._oc.Guide(compiled.index, max_rollback=64), self._eos, self._stops)


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0][:500] if str(e).strip() else type(e).__name__
