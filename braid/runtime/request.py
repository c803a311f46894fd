"""A request's state inside the scheduler."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import torch

from braid.runtime.sampling_params import SamplingParams


class FinishReason(enum.Enum):
    STOP_STR = "stop_str"
    STOP_TOKEN = "stop_token"
    EOS = "eos"
    LENGTH = "length"
    ABORT = "abort"


@dataclass(eq=False)  # identity semantics: two requests are never 'equal'
class Req:
    """One request. Token ids: ``prompt_ids`` then ``output_ids``; ``fill_ids`` is what must be in KV
    (or computed) before the next token can be sampled.

    Phases: a waiting (new or retracted) request is extended until ``kv_len == seq_len``, then
    samples a token; from then on it decodes with ``kv_len == seq_len - 1`` (the newest token has
    no K/V yet; the next decode pass writes it).

    KV bookkeeping (all positions refer to ``fill_ids``):
      ``row``          this request's row in ReqToTokenPool, or None while waiting;
      ``kv_len``       positions 0..kv_len-1 have K/V written (row holds their slots);
      ``cached_len``   positions 0..cached_len-1 are owned by the radix cache and locked through
                       ``last_node``; slots from cached_len to kv_len are owned by this request.
    """

    rid: str
    prompt_ids: list[int]
    params: SamplingParams
    return_logprob: bool = False
    top_logprobs_num: int = 0
    logprob_start_len: int = -1
    stream: bool = False
    max_new_tokens: int = 0  # params.max_new_tokens clipped to the context length
    output_ids: list[int] = field(default_factory=list)
    row: int | None = None
    kv_len: int = 0
    cached_len: int = 0
    last_node: Any = None
    extend_len: int = 0  # tokens computed in the current extend pass
    cached_tokens: int = 0  # prompt tokens served from the radix cache (reported)
    finish: FinishReason | None = None
    finish_matched: str | int | None = None
    decoder: Any = None  # IncrementalDecoder
    generator: torch.Generator | None = None
    matcher: Any = None  # grammar.Matcher of a constrained request
    jump_forward: bool = False  # append grammar-forced text in one extend (see OutputProcessor)
    jumped_tokens: int = 0
    output_logprobs: list[tuple[float, int, Any]] = field(default_factory=list)
    output_top_logprobs: list[list[tuple[float, int, Any]]] = field(default_factory=list)
    input_logprobs: list[tuple[float | None, int, Any]] = field(default_factory=list)
    input_top_logprobs: list[list[tuple[float, int, Any]] | None] = field(default_factory=list)
    sent_ids: int = 0  # output ids already sent to the front (streaming)
    pending_text: str = ""  # released text not yet sent to the front (streaming)
    retractions: int = 0
    arrival: int = 0  # admission order, for fcfs and tie breaks

    @property
    def fill_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def last_token(self) -> int:
        """``fill_ids[-1]`` without building ``fill_ids``."""
        return self.output_ids[-1] if self.output_ids else self.prompt_ids[-1]

    @property
    def seq_len(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def remaining_new_tokens(self) -> int:
        return max(0, self.max_new_tokens - len(self.output_ids))

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.return_logprob and self.logprob_start_len >= 0

    @property
    def finished(self) -> bool:
        return self.finish is not None

    def finish_reason_dict(self) -> dict | None:
        if self.finish is None:
            return None
        if self.finish == FinishReason.LENGTH:
            return {"type": "length", "length": len(self.output_ids)}
        if self.finish == FinishReason.ABORT:
            return {"type": "abort", "message": self.finish_matched}
        return {"type": "stop", "matched": self.finish_matched}
