"""Messages between the engine front and the scheduler: msgspec Structs, one type per message.

Today the scheduler runs in a thread of the caller's process, so messages pass as objects
through queues; being Structs they can be encoded unchanged when the scheduler moves to its
own process.
"""

from __future__ import annotations

import itertools
import uuid

import msgspec

_rid_counter = itertools.count()


def new_rid() -> str:
    """A request id unique within the process (and, with the uuid part, across processes)."""
    return f"{uuid.uuid4().hex[:12]}-{next(_rid_counter)}"


class AddRequest(msgspec.Struct, frozen=True):
    rid: str
    input_ids: list[int]
    sampling: dict  # SamplingParams.to_dict(), already validated by the front
    return_logprob: bool = False
    top_logprobs_num: int = 0
    logprob_start_len: int = -1  # >= 0: also return prompt-token logprobs from this position
    stream: bool = False


class AddBatch(msgspec.Struct, frozen=True):
    """Requests that arrive together (a batch call, a fork group's gens, a select's choices):
    the scheduler sees all of them in the same step, so they are admitted over one prefix."""

    items: list[AddRequest]


class AbortRequest(msgspec.Struct, frozen=True):
    rid: str


class GetStats(msgspec.Struct, frozen=True):
    """Answered with a finished RequestOutput whose meta_info holds Scheduler.stats_snapshot()."""

    rid: str


class FlushCache(msgspec.Struct, frozen=True):
    pass


class Shutdown(msgspec.Struct, frozen=True):
    pass


class RequestOutput(msgspec.Struct):
    """Scheduler -> front. Streaming requests get one per step with new tokens; others only the last."""

    rid: str
    delta_text: str
    delta_ids: list[int]
    finished: bool
    meta_info: dict  # token counts, finish_reason, logprobs (see Engine.generate)
    error: str | None = None  # set when the request failed inside the scheduler
