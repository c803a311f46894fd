"""Incremental detokenization for streaming, with stop strings.

A request's text is released in deltas as tokens arrive. Two things hold text back:

- an incomplete UTF-8 character at the end: byte-level tokenizers decode a partial character
  as U+FFFD, so the trailing run of U+FFFD is kept until a later token completes it (or
  ``flush`` releases it as it is);
- a tail that could be the beginning of a stop string: kept until it either completes the
  stop string (then it and everything after it are dropped) or can no longer do so.

Only a short window of recent tokens is decoded per step (the prefix-offset / read-offset
technique): ``prefix_offset`` marks where the window starts (a few tokens of context, so that
tokenizers which drop a leading space on the first token decode the window as they would the
whole text), ``read_offset`` marks where the text already accounted for ends.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Protocol

REPLACEMENT_CHAR = "\ufffd"


class Decoder(Protocol):
    """Any tokenizer with an HF-like ``decode``."""

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str: ...


class DecodeStep(NamedTuple):
    """What one pushed token released: ``delta`` (possibly empty) and, if this token completed
    a stop string, which one (the text is then final: ``delta`` ends right before the match)."""

    delta: str
    stop_matched: str | None


class IncrementalDecoder:
    """Turns one request's output tokens into text deltas.

    Contract: the concatenation of every ``push(...).delta`` plus ``flush()`` is the decoded
    output, cut right before the first stop string to complete (earliest start wins among those
    completed by the same token; at one start, the shortest). Released text never contains a
    stop string, and never ends in an incomplete character. After a stop matched, the request is
    over: ``push`` must not be called again and ``flush`` returns "".
    """

    def __init__(
        self,
        tokenizer: Decoder,
        stop: Sequence[str],
        skip_special_tokens: bool = True,
        prompt_tail_ids: Sequence[int] = (),
    ) -> None:
        assert all(stop), "stop strings must be non-empty"
        self._tokenizer = tokenizer
        self._stops = tuple(stop)
        self._skip = skip_special_tokens
        # Context tokens from the prompt (a few are enough) so the first output token decodes
        # with its leading space, as it does inside the full text.
        self._ids: list[int] = list(prompt_tail_ids)
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._prefix_text: str | None = None  # decode(ids[prefix_offset:read_offset]), cached
        self._window_released = 0  # chars of the window past prefix_text already taken
        self._pending = ""  # decoded, but held back as a possible stop-string start
        self._released: list[str] = []
        self._stop_matched: str | None = None

    @property
    def text(self) -> str:
        """All text released so far."""
        return "".join(self._released)

    @property
    def stop_matched(self) -> str | None:
        """The stop string that ended the text, or None."""
        return self._stop_matched

    def push(self, token_id: int) -> DecodeStep:
        """Add one output token; return the text it releases and whether a stop string matched."""
        assert self._stop_matched is None, "push after a stop string matched: the request is over"
        self._ids.append(token_id)
        return self._consume(self._decode_new(final=False), final=False)

    def flush(self) -> str:
        """At the end (length, EOS, stop token): release everything held back. A trailing
        incomplete character is released as U+FFFD, as a full decode would show it."""
        if self._stop_matched is not None:
            return ""
        return self._consume(self._decode_new(final=True), final=True).delta

    # ---- token window -> new complete text -----------------------------------------------------

    def _decode_new(self, final: bool) -> str:
        """Text of the window not yet taken, up to the last complete character (all of it when
        ``final``). Moves the window forward when the decode ends cleanly."""
        if self._prefix_text is None:
            self._prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        window = self._decode(self._ids[self._prefix_offset :])
        taken = len(self._prefix_text) + self._window_released
        clean = not window.endswith(REPLACEMENT_CHAR)
        # Characters before the trailing U+FFFD run are complete and final: later bytes can only
        # change how the trailing incomplete sequence decodes.
        stable = window if (clean or final) else window.rstrip(REPLACEMENT_CHAR)
        new = stable[taken:] if len(stable) > taken else ""
        if clean and len(window) > len(self._prefix_text):
            # Everything up to here is accounted for: start the next window at the old read point.
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            self._prefix_text = None
            self._window_released = 0
        else:
            self._window_released += len(new)
        return new

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip) if ids else ""

    # ---- new text -> released text, watching for stop strings --------------------------------

    def _consume(self, new: str, final: bool) -> DecodeStep:
        """Append ``new`` after the held-back tail; release what cannot start a stop string."""
        buf = self._pending + new
        match = self._earliest_stop(buf)
        if match is not None:
            start, stop = match
            self._pending = ""
            self._stop_matched = stop
            return DecodeStep(self._release(buf[:start]), stop)
        hold = 0 if final else self._partial_stop_len(buf)
        self._pending = buf[len(buf) - hold :]
        return DecodeStep(self._release(buf[: len(buf) - hold]), None)

    def _release(self, text: str) -> str:
        if text:
            self._released.append(text)
        return text

    def _earliest_stop(self, buf: str) -> tuple[int, str] | None:
        """(start, stop string) of the earliest match in ``buf``; shortest first at one start."""
        best: tuple[int, int, str] | None = None
        for stop in self._stops:
            at = buf.find(stop)
            if at >= 0 and (best is None or (at, len(stop)) < best[:2]):
                best = (at, len(stop), stop)
        return None if best is None else (best[0], best[2])

    def _partial_stop_len(self, buf: str) -> int:
        """Length of the longest suffix of ``buf`` that is a proper prefix of some stop string.
        Holding that suffix back is enough: a stop match never starts in released text."""
        longest = min(len(buf), max((len(s) - 1 for s in self._stops), default=0))
        for n in range(longest, 0, -1):
            tail = buf[-n:]
            if any(s.startswith(tail) for s in self._stops):
                return n
        return 0


def decode_output(tokenizer: Decoder, ids: Sequence[int], skip_special_tokens: bool = True,
                  prompt_tail_ids: Sequence[int] = ()) -> str:
    """The whole output text at once: what an IncrementalDecoder without stop strings releases
    over all pushes plus ``flush``, for requests that neither stream nor stop on strings (no
    per-token decoding needed)."""
    tail = list(prompt_tail_ids)
    head = tokenizer.decode(tail, skip_special_tokens=skip_special_tokens) if tail else ""
    full = tokenizer.decode(tail + list(ids), skip_special_tokens=skip_special_tokens)
    if not head.endswith(REPLACEMENT_CHAR) and full.startswith(head):
        return full[len(head):]
    # A character split between prompt and output: let the incremental decoder sort it out.
    dec = IncrementalDecoder(tokenizer, (), skip_special_tokens, tail)
    for t in ids:
        dec.push(t)
    dec.flush()
    return dec.text
