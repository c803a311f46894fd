"""Radix prefix cache: unit tests plus a hypothesis state machine against a naive model.

The reference model maps every cached token prefix (a tuple) to the slot of its last
token; the tree must agree with it on matches, sizes, locks, LRU order and slot ownership.
"""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from braid.radix_cache import RadixCache


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)


def _fresh_slots(n: int, rng: random.Random) -> torch.Tensor:
    """Distinct random slot ids (never a plain arange, so a mix-up shows)."""
    return _t(rng.sample(range(1, 100_000), n))


# ---------------------------------------------------------------- unit tests


def test_empty_cache_matches_nothing():
    cache = RadixCache()
    res = cache.match_prefix([1, 2, 3])
    assert res.slots.dtype == torch.int64 and res.slots.numel() == 0
    assert res.node is cache.root
    assert cache.total_size == 0 and cache.evict(10).numel() == 0
    cache.check_integrity()


def test_insert_then_match_full_and_partial():
    rng = random.Random(1)
    cache = RadixCache()
    slots = _fresh_slots(5, rng)
    ins = cache.insert([7, 8, 9, 10, 11], slots)
    assert (ins.prefix_len, ins.num_taken) == (0, 5)
    assert torch.equal(cache.match_prefix([7, 8, 9, 10, 11, 12]).slots, slots)
    part = cache.match_prefix((7, 8, 9, 99))
    assert torch.equal(part.slots, slots[:3])
    assert part.node.key == (7, 8, 9)  # split: the node covers exactly the match
    assert cache.total_size == 5
    cache.check_integrity()


def test_split_keeps_old_node_as_lower_half():
    cache = RadixCache()
    ins = cache.insert([1, 2, 3, 4], _t([11, 12, 13, 14]))
    leaf = ins.node
    upper = cache.match_prefix([1, 2]).node
    assert leaf.parent is upper and leaf.key == (3, 4) and upper.key == (1, 2)
    assert torch.equal(leaf.value, _t([13, 14])) and torch.equal(upper.value, _t([11, 12]))
    cache.check_integrity()


def test_insert_overlapping_keys_reports_duplicates():
    cache = RadixCache()
    cache.insert([1, 2, 3, 4], _t([11, 12, 13, 14]))
    ins = cache.insert([1, 2, 5, 6], _t([21, 22, 25, 26]))
    assert (ins.prefix_len, ins.num_taken) == (2, 2)  # slots 21, 22 are duplicates
    assert torch.equal(cache.match_prefix([1, 2, 5, 6]).slots, _t([11, 12, 25, 26]))
    assert torch.equal(cache.match_prefix([1, 2, 3, 4]).slots, _t([11, 12, 13, 14]))
    # a strict prefix of an edge: fully duplicate, ends at a split node
    ins = cache.insert([1, 2, 3], _t([31, 32, 33]))
    assert (ins.prefix_len, ins.num_taken) == (3, 0) and ins.node.key == (3,)
    assert cache.total_size == 6
    cache.check_integrity()


def test_insert_copies_slots():
    cache = RadixCache()
    buf = _t([5, 6, 7])
    cache.insert([1, 2, 3], buf)
    buf[:] = 0  # the caller reuses its buffer
    assert torch.equal(cache.match_prefix([1, 2, 3]).slots, _t([5, 6, 7]))


def test_lock_prevents_eviction_and_moves_sizes():
    cache = RadixCache()
    cache.insert([1, 2, 3], _t([11, 12, 13]))
    cache.insert([1, 2, 4, 5], _t([11, 12, 14, 15]))
    node = cache.match_prefix([1, 2, 3]).node
    cache.lock(node)
    assert (cache.protected_size, cache.evictable_size) == (3, 2)
    freed = cache.evict(100)
    assert sorted(freed.tolist()) == [14, 15]
    assert cache.evict(100).numel() == 0
    assert torch.equal(cache.match_prefix([1, 2, 3]).slots, _t([11, 12, 13]))
    cache.unlock(node)
    assert (cache.protected_size, cache.evictable_size) == (0, 3)
    assert sorted(cache.evict(1).tolist()) == [13]  # leaf first, then its parent
    assert sorted(cache.evict(1).tolist()) == [11, 12]
    cache.check_integrity()


def test_lock_survives_split_of_locked_node():
    cache = RadixCache()
    leaf = cache.insert([1, 2, 3, 4], _t([11, 12, 13, 14])).node
    cache.lock(leaf)
    cache.match_prefix([1, 2, 9])  # splits the locked edge
    cache.check_integrity()
    assert cache.protected_size == 4 and cache.evict(100).numel() == 0
    cache.unlock(leaf)
    assert cache.evictable_size == 4 and cache.protected_size == 0
    cache.check_integrity()


def test_unlock_below_zero_asserts():
    cache = RadixCache()
    node = cache.insert([1], _t([3])).node
    with pytest.raises(AssertionError):
        cache.unlock(node)


def test_lock_of_evicted_node_asserts():
    cache = RadixCache()
    node = cache.insert([1], _t([3])).node
    cache.evict(1)
    with pytest.raises(AssertionError):
        cache.lock(node)


def test_lru_order():
    cache = RadixCache()
    cache.insert([1, 1], _t([11, 12]))
    cache.insert([2, 2], _t([21, 22]))
    cache.insert([3, 3], _t([31, 32]))
    cache.match_prefix([1, 1])  # 1 is now the newest, 2 the oldest
    assert sorted(cache.evict(1).tolist()) == [21, 22]
    assert sorted(cache.evict(2).tolist()) == [31, 32]
    assert sorted(cache.evict(2).tolist()) == [11, 12]
    cache.check_integrity()


def test_partial_match_touches_only_the_matched_part():
    cache = RadixCache()
    cache.insert([1, 2, 3, 4], _t([11, 12, 13, 14]))
    cache.insert([5], _t([15]))
    cache.match_prefix([1, 2])  # (1, 2) is newer than (5,); (3, 4) is the oldest
    assert sorted(cache.evict(1).tolist()) == [13, 14]
    assert sorted(cache.evict(1).tolist()) == [15]
    assert sorted(cache.evict(1).tolist()) == [11, 12]


def test_evict_frees_at_least_requested_in_whole_nodes():
    cache = RadixCache()
    cache.insert([1, 2, 3], _t([11, 12, 13]))
    cache.insert([4, 5, 6], _t([14, 15, 16]))
    freed = cache.evict(2)
    assert sorted(freed.tolist()) == [11, 12, 13]
    assert cache.total_size == 3
    cache.check_integrity()


def test_reset_returns_everything_and_refuses_when_locked():
    cache = RadixCache()
    cache.insert([1, 2], _t([11, 12]))
    node = cache.insert([1, 3], _t([11, 13])).node
    cache.lock(node)
    with pytest.raises(AssertionError):
        cache.reset()
    cache.unlock(node)
    assert sorted(cache.reset().tolist()) == [11, 12, 13]
    assert cache.total_size == 0 and cache.match_prefix([1, 2]).slots.numel() == 0
    cache.check_integrity()


def test_tensor_keys_and_int32_slots():
    cache = RadixCache()
    cache.insert(torch.tensor([4, 5, 6]), torch.tensor([7, 8, 9], dtype=torch.int32))
    res = cache.match_prefix(torch.tensor([4, 5]))
    assert res.slots.dtype == torch.int64 and res.slots.tolist() == [7, 8]


def test_disabled_cache_takes_nothing():
    cache = RadixCache(disable=True)
    slots = _t([4, 5, 6])
    ins = cache.insert([1, 2, 3], slots)
    assert (ins.prefix_len, ins.num_taken) == (3, 0) and ins.node is cache.root
    res = cache.match_prefix([1, 2, 3])
    assert res.slots.numel() == 0 and res.node is cache.root
    cache.lock(res.node)
    cache.unlock(res.node)
    assert cache.total_size == 0 and cache.evict(5).numel() == 0 and cache.reset().numel() == 0
    # the scheduler's usual free(slots[cached_len:prefix_len]) frees them all
    assert torch.equal(slots[0 : ins.prefix_len], slots)
    cache.check_integrity()


def test_heap_stays_bounded_under_repeated_touches():
    cache = RadixCache()
    cache.insert([1, 2], _t([11, 12]))
    for _ in range(1000):
        cache.match_prefix([1, 2])
    assert len(cache._heap) < 200
    cache.check_integrity()


# ------------------------------------------------------- property tests


class RadixMachine(RuleBasedStateMachine):
    """Random insert / match / lock / unlock / evict / reset against a naive model.

    ``ref`` maps each cached prefix (tuple) to the slot of its last token, ``touched`` each
    cached prefix to the last op covering it. ``handed`` records every slot given to the
    cache and ``returned`` every slot that came back (duplicate, evicted or reset): at the
    end they must be equal, with no slot returned twice and none still in the cache.
    """

    keys = st.lists(st.integers(0, 3), min_size=0, max_size=8).map(tuple)

    def __init__(self) -> None:
        super().__init__()
        self.cache = RadixCache()
        self.ref: dict[tuple, int] = {}
        self.touched: dict[tuple, int] = {}
        self.op = 0
        self.locks: list[tuple[object, tuple]] = []  # (node, prefix it covers)
        self.next_slot = 1000
        self.handed: set[int] = set()
        self.returned: list[int] = []

    # -- reference helpers

    def _fresh(self, n: int) -> torch.Tensor:
        out = list(range(self.next_slot, self.next_slot + n))
        self.next_slot += n
        self.handed.update(out)
        return _t(out)

    def _ref_match(self, key: tuple) -> int:
        n = 0
        while n < len(key) and key[: n + 1] in self.ref:
            n += 1
        return n

    def _touch(self, key: tuple, n: int) -> None:
        self.op += 1
        for i in range(1, n + 1):
            self.touched[key[:i]] = self.op

    def _locked_prefixes(self) -> set[tuple]:
        return {key[:i] for _, key in self.locks for i in range(1, len(key) + 1)}

    def _give_back(self, slots: torch.Tensor) -> None:
        values = slots.tolist()
        assert len(set(values)) == len(values), "a slot came back twice in one call"
        self.returned.extend(values)

    def _insert(self, key: tuple, slots: torch.Tensor, owned: int) -> object:
        """Insert as the scheduler does: the caller already owns slots[:owned] via a match."""
        expected = self._ref_match(key)
        res = self.cache.insert(key, slots)
        assert res.prefix_len == expected and res.num_taken == len(key) - expected
        self._give_back(slots[owned : res.prefix_len])
        for i in range(expected, len(key)):
            self.ref[key[: i + 1]] = int(slots[i])
        self._touch(key, len(key))
        return res.node

    # -- rules

    @rule(key=keys, lock=st.booleans())
    def match(self, key: tuple, lock: bool) -> None:
        res = self.cache.match_prefix(key)
        n = self._ref_match(key)
        assert res.slots.tolist() == [self.ref[key[: i + 1]] for i in range(n)]
        self._touch(key, n)
        if lock:
            self.cache.lock(res.node)
            self.locks.append((res.node, key[:n]))

    @rule(key=keys, lock=st.booleans())
    def insert_fresh(self, key: tuple, lock: bool) -> None:
        node = self._insert(key, self._fresh(len(key)), owned=0)
        if lock:
            self.cache.lock(node)
            self.locks.append((node, key))

    @rule(key=keys)
    def extend_like_scheduler(self, key: tuple) -> None:
        """match + lock, compute the rest, insert, lock the new node, unlock the old one."""
        hit = self.cache.match_prefix(key)
        cached = len(hit.slots)
        self._touch(key, cached)
        self.cache.lock(hit.node)
        slots = torch.cat([hit.slots, self._fresh(len(key) - cached)])
        node = self._insert(key, slots, owned=cached)
        self.cache.lock(node)
        self.cache.unlock(hit.node)
        self.locks.append((node, key))

    @precondition(lambda self: self.locks)
    @rule(idx=st.integers(0, 1000))
    def unlock(self, idx: int) -> None:
        node, _ = self.locks.pop(idx % len(self.locks))
        self.cache.unlock(node)

    @rule(num=st.integers(0, 12))
    def evict(self, num: int) -> None:
        before = self.cache.evictable_size
        freed = self.cache.evict(num).tolist()
        self._give_back(torch.tensor(freed, dtype=torch.int64))
        assert len(freed) >= num or self.cache.evictable_size == 0
        assert len(freed) == before - self.cache.evictable_size
        gone = {p for p, s in self.ref.items() if s in set(freed)}
        assert len(gone) == len(freed), "evict returned a slot the cache did not hold"
        assert not gone & self._locked_prefixes(), "evicted a locked token"
        for p in gone:
            del self.ref[p]
        # only whole suffixes go: what remains is still closed under taking prefixes
        assert all(p[:-1] in self.ref for p in self.ref if len(p) > 1)
        self._check_lru(gone)

    def _check_lru(self, gone: set[tuple]) -> None:
        """Nothing evicted is newer than a remaining unlocked leaf of the reference."""
        if not gone:
            return
        locked = self._locked_prefixes()
        children = {p[:-1] for p in self.ref}
        leaves = [p for p in self.ref if p not in children and p not in locked]
        if leaves:
            newest_gone = max(self.touched[p] for p in gone)
            assert newest_gone <= min(self.touched[p] for p in leaves), "evicted out of LRU order"

    @rule()
    def reset(self) -> None:
        for node, _ in self.locks:
            self.cache.unlock(node)
        self.locks.clear()
        slots = self.cache.reset()
        assert sorted(slots.tolist()) == sorted(self.ref.values())
        self._give_back(slots)
        self.ref.clear()

    # -- invariants

    @invariant()
    def sizes_and_integrity(self) -> None:
        self.cache.check_integrity()
        locked = self._locked_prefixes()
        assert locked <= self.ref.keys(), "a locked prefix is missing from the cache"
        assert self.cache.total_size == len(self.ref)
        assert self.cache.protected_size == len(locked)
        assert self.cache.evictable_size == len(self.ref) - len(locked)

    @invariant()
    def ownership(self) -> None:
        returned = set(self.returned)
        assert len(returned) == len(self.returned), "a slot was returned twice"
        held = set(self.ref.values())
        assert len(held) == len(self.ref), "a slot is cached twice"
        assert not held & returned, "a slot is both cached and returned"
        assert held | returned == self.handed, "a slot leaked"

    def teardown(self) -> None:
        self.reset()
        assert sorted(self.returned) == sorted(self.handed)


RadixMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestRadixMachine = RadixMachine.TestCase


def test_disabled_cache_random_ops_never_take_slots():
    rng = random.Random(7)
    cache = RadixCache(disable=True)
    for _ in range(200):
        key = [rng.randrange(4) for _ in range(rng.randrange(6))]
        slots = _fresh_slots(len(key), rng)
        ins = cache.insert(key, slots)
        assert ins.prefix_len == len(key) and ins.num_taken == 0
        assert cache.match_prefix(key).slots.numel() == 0
    assert cache.total_size == 0
    cache.check_integrity()


def test_shared_prefixes_pick_the_prefix_that_saves_most_reads():
    """Cascade attention's planner: the radix node through which the most requests pass, weighed
    by its depth; requests through it get its depth, the others 0; below ``min_saved``: all 0."""
    from braid.runtime.batch import SharedPrefixes

    tree = RadixCache()
    system, longer = list(range(100, 150)), list(range(100, 180))  # 50 tokens; 80 that begin with them
    prompts = [system + [1, 2], system + [3], longer + [4], longer + [5, 6], [7, 8, 9]]
    for p in prompts:
        tree.insert(p, torch.arange(1, len(p) + 1))  # the slots do not matter here, the paths do
    nodes = [tree.match_prefix(p).node for p in prompts]

    class R:  # what SharedPrefixes reads of a request
        def __init__(self, node):
            self.last_node = node

    reqs = [R(n) for n in nodes] + [R(None)]  # a request without a cached prefix
    # 4 requests through the 50-token node save 3 x 50; 2 through the 80-token one, 1 x 80
    assert SharedPrefixes(min_saved=1)(reqs) == [50, 50, 50, 50, 0, 0]
    assert SharedPrefixes(min_saved=1)(reqs[2:4] + reqs[4:]) == [80, 80, 0, 0]
    assert SharedPrefixes(min_saved=151)(reqs) == [0] * 6
    assert SharedPrefixes(min_saved=1)(reqs[4:]) == [0, 0]  # nobody shares
    planner = SharedPrefixes(min_saved=1)
    assert planner(reqs[:2]) == [50, 50] and planner(reqs[:2]) == [50, 50]  # the kept answer
    assert planner(reqs[:1] + reqs[2:3]) == [50, 50]
    assert planner(reqs) == [50, 50, 50, 50, 0, 0]
    tree.match_prefix(system[:20])  # a split above the shared node: the kept answer stays true
    assert planner(reqs) == [50, 50, 50, 50, 0, 0] == SharedPrefixes(min_saved=1)(reqs)
