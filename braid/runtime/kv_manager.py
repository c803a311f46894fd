"""KV bookkeeping for requests: slots, rows and the radix cache, behind check-then-act verbs.

Owns the SlotAllocator, the ReqToTokenPool and the RadixCache. A KV slot is at any time in
exactly one of: the allocator's free list, the radix cache (evictable or locked), or a running
request's private tail (positions ``cached_len..kv_len`` of its row). ``check_at_rest`` asserts
the resulting invariant when no request holds anything: free + cached == pool size.
"""

from __future__ import annotations

import torch

from braid.radix_cache import RadixCache
from braid.runtime.memory import ReqToTokenPool, SlotAllocator, to_device
from braid.runtime.request import Req


class KVManager:
    def __init__(self, num_slots: int, max_requests: int, context_len: int, device: torch.device,
                 disable_radix_cache: bool = False) -> None:
        self.num_slots = num_slots
        self.allocator = SlotAllocator(num_slots, device)
        self.req_pool = ReqToTokenPool(max_requests, context_len, device)
        self.cache_enabled = not disable_radix_cache
        self.tree = RadixCache(device=device, disable=disable_radix_cache)

    # ---- capacity -------------------------------------------------------------------------
    @property
    def available(self) -> int:
        """Slots obtainable now: free ones plus what eviction could release."""
        return self.allocator.num_free + self.tree.evictable_size

    def can_allocate(self, n: int) -> bool:
        return n <= self.available

    def allocate(self, n: int) -> torch.Tensor:
        """Take ``n`` slots, evicting unlocked cache leaves (LRU) when the free list is short."""
        short = n - self.allocator.num_free
        if short > 0:
            self.allocator.free(self.tree.evict(short))
        return self.allocator.allocate(n)

    # ---- request lifecycle ----------------------------------------------------------------
    def match(self, ids: list[int]) -> int:
        """Cached-prefix length of ``ids`` (no side effect beyond LRU touch)."""
        if not self.cache_enabled or not ids:
            return 0
        return len(self.tree.match_prefix(ids).slots)

    def admit(self, req: Req, match_limit: int) -> None:
        """Give a waiting request a row, seeded with its cached prefix (locked)."""
        assert req.row is None, f"request {req.rid} already holds row {req.row}"
        req.row = self.req_pool.allocate()
        req.kv_len = req.cached_len = 0
        req.last_node = None
        if self.cache_enabled and match_limit > 0:
            m = self.tree.match_prefix(req.fill_ids[:match_limit])
            self.tree.lock(m.node)
            req.last_node = m.node
            n = len(m.slots)
            self.req_pool.write(req.row, 0, m.slots)
            req.kv_len = req.cached_len = n

    def extend(self, req: Req, n: int) -> torch.Tensor:
        """Allocate slots for the next ``n`` positions of ``req`` and record them in its row."""
        slots = self.allocate(n)
        self.req_pool.write(req.row, req.kv_len, slots)
        return slots

    def extend_decode(self, reqs: list[Req]) -> None:
        """``extend(req, 1)`` for every request of a decode step, with one allocation and one
        table write for the whole batch (per-request writes were a device launch each)."""
        slots = self.allocate(len(reqs))
        rows, positions = to_device([[r.row for r in reqs], [r.kv_len for r in reqs]], torch.int64, slots.device)
        self.req_pool.table[rows, positions] = slots

    def discard(self, req: Req, n: int) -> None:
        """Free the ``n`` slots allocated past ``kv_len`` by a pass that failed before writing."""
        self.allocator.free(self.req_pool.table[req.row, req.kv_len : req.kv_len + n].clone())

    def row_slots(self, req: Req, end: int | None = None) -> torch.Tensor:
        return self.req_pool.table[req.row, : req.kv_len if end is None else end]

    def cache_prefix(self, req: Req) -> None:
        """Hand the request's computed tokens to the radix cache (others can share them now) and
        re-lock the longer prefix. Slots duplicating ones the cache already had are freed."""
        if not self.cache_enabled or req.kv_len == req.cached_len:
            return
        ids = req.fill_ids[: req.kv_len]
        slots = self.row_slots(req).clone()
        res = self.tree.insert(ids, slots)
        self._free_duplicates(req, slots, res.prefix_len)
        m = self.tree.match_prefix(ids)
        assert len(m.slots) == req.kv_len, f"cached {len(m.slots)} of {req.kv_len} just inserted"
        self.tree.lock(m.node)
        if req.last_node is not None:
            self.tree.unlock(req.last_node)
        req.last_node = m.node
        self.req_pool.write(req.row, 0, m.slots)
        req.cached_len = req.kv_len

    def release(self, req: Req) -> None:
        """Give back everything ``req`` holds; its computed tokens stay cached (unlocked)."""
        if req.row is None:
            return
        if self.cache_enabled:
            self.cache_prefix(req)
            if req.last_node is not None:
                self.tree.unlock(req.last_node)
        else:
            self.allocator.free(self.row_slots(req).clone())
        self.req_pool.free(req.row)
        req.row, req.last_node = None, None
        req.kv_len = req.cached_len = 0

    def _free_duplicates(self, req: Req, slots: torch.Tensor, prefix_len: int) -> None:
        # positions cached_len..prefix_len were computed by this request while another request
        # inserted the same tokens: the cache keeps its own slots, ours go back to the free list.
        if prefix_len > req.cached_len:
            self.allocator.free(slots[req.cached_len : prefix_len])

    def flush(self) -> bool:
        """Drop the whole cache; refused (False) while any cached node is locked."""
        if self.tree.protected_size:
            return False
        self.allocator.free(self.tree.reset())
        return True

    # ---- invariants -------------------------------------------------------------------------
    def check_at_rest(self) -> None:
        """With no request running: every slot is free or evictable from the cache."""
        free, evictable = self.allocator.num_free, self.tree.evictable_size
        assert self.tree.protected_size == 0, f"{self.tree.protected_size} cached tokens still locked at rest"
        assert free + evictable == self.num_slots, (
            f"KV leak: free {free} + evictable {evictable} != pool {self.num_slots}")
        assert self.req_pool.num_free == self.req_pool.max_requests, "request rows leaked"
