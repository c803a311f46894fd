"""Schedule policies: the order in which waiting requests are considered for admission."""

from __future__ import annotations

from collections.abc import Callable

from braid.registry import Registry
from braid.runtime.request import Req

# A policy takes the waiting list and a function giving each request's cached-prefix length,
# and returns the list in admission order. Policies never drop or duplicate requests.
SchedulePolicy = Callable[[list[Req], Callable[[Req], int]], list[Req]]

POLICIES: Registry[SchedulePolicy] = Registry("schedule policy")

# Matching every waiting request against the tree costs O(queue * prompt); past this queue
# length lpm orders by arrival, as SGLang does, to bound the scheduler's CPU time per step.
LPM_MAX_QUEUE = 128


@POLICIES.register("fcfs")
def fcfs(waiting: list[Req], cached_len: Callable[[Req], int]) -> list[Req]:
    """First come, first served."""
    return sorted(waiting, key=lambda r: r.arrival)


@POLICIES.register("lpm")
def lpm(waiting: list[Req], cached_len: Callable[[Req], int]) -> list[Req]:
    """Longest cached prefix first (SGLang's cache-aware policy); arrival breaks ties."""
    if len(waiting) > LPM_MAX_QUEUE:
        return fcfs(waiting, cached_len)
    return sorted(waiting, key=lambda r: (-cached_len(r), r.arrival))
