"""Radix tree over token ids -> KV slot indices (token-granular, page size 1).

The tree maps every cached token prefix to the KV slot holding that token's K/V, so a
request whose prompt shares a prefix with an earlier one reuses those slots instead of
recomputing them. Eviction frees unlocked leaves in least-recently-used order.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Sequence
from typing import NamedTuple

import torch

Key = tuple[int, ...]


class TreeNode:
    """One edge of the tree: a run of tokens and the KV slots that hold them.

    ``key`` is the token run on the edge from ``parent`` to this node, ``value`` the int64
    slots of those tokens (same length). ``lock_ref`` counts live locks on this node or on
    any descendant, because a lock walks up to the root. ``last_access`` is the cache's
    logical clock at the last match/insert that covered this node. The root has an empty key
    and no parent; an evicted node has ``evicted`` set and no parent.
    """

    __slots__ = ("children", "evicted", "key", "last_access", "lock_ref", "node_id", "parent", "value")

    def __init__(self, node_id: int, key: Key, value: torch.Tensor, parent: TreeNode | None, last_access: int) -> None:
        self.node_id = node_id
        self.key = key
        self.value = value
        self.parent = parent
        self.children: dict[int, TreeNode] = {}  # first token of the child's key -> child
        self.lock_ref = 0
        self.last_access = last_access
        self.evicted = False

    @property
    def is_leaf(self) -> bool:
        return not self.children

    def __repr__(self) -> str:
        return (
            f"TreeNode(id={self.node_id}, key={self.key!r}, lock_ref={self.lock_ref}, "
            f"last_access={self.last_access}, evicted={self.evicted})"
        )


class MatchResult(NamedTuple):
    """The longest cached prefix of a key."""

    slots: torch.Tensor  # (L,) int64 KV slots of the matched prefix (L may be 0), cache's device
    node: TreeNode  # deepest node covering exactly the match (root if L == 0)


class InsertResult(NamedTuple):
    """What ``insert`` kept. Always ``prefix_len + num_taken == len(key)``."""

    prefix_len: int  # leading slots the cache did NOT take: they stay the caller's to free
    node: TreeNode  # node ending at the end of the key (root when disabled or key is empty)
    num_taken: int  # trailing slots, ``slots[prefix_len:]``, now owned by the cache


class RadixCache:
    """Prefix cache: a radix tree from token ids to KV slot indices.

    Contract
    --------
    Slot ownership. A slot is owned by exactly one party: the caller's allocator, a running
    request, or this cache. ``insert(key, slots)`` walks the tree along ``key``; the first
    ``prefix_len`` tokens were already cached, so ``slots[:prefix_len]`` are *duplicates* of
    slots the cache already holds and the cache does not take them. The cache takes (and
    copies) ``slots[prefix_len:]``. A caller that got ``cached_len`` slots from an earlier
    ``match_prefix`` (and so passes the cache's own slots as ``slots[:cached_len]``) must
    therefore free exactly ``slots[cached_len:prefix_len]``: those are slots it computed
    itself for tokens that another request cached meanwhile. Slots the cache owns come back
    to the caller only through ``evict`` or ``reset``, each exactly once.

    Locks. ``lock(node)`` protects ``node`` and all its ancestors, i.e. the whole prefix
    ending at ``node``: locked tokens are never evicted, so slots from ``match_prefix`` stay
    valid while their node is locked. Locks nest (a count per node); ``unlock`` undoes one
    ``lock`` on the same node. A later split of a locked node keeps the prefix protected:
    the new upper node inherits the lock count. ``reset`` requires that nothing is locked.
    A node handed out but not locked may be evicted at any later ``evict`` call; it must then
    not be locked (asserted).

    Mutation. ``match_prefix`` changes no ownership but updates LRU times along the path and
    splits the edge where a match ends mid-edge (so the returned node covers exactly the
    match). ``insert`` may split one edge and add one leaf. ``lock``/``unlock`` only move
    tokens between ``evictable_size`` and ``protected_size``. ``evict`` and ``reset`` remove
    nodes and hand their slots back.

    LRU. ``last_access`` is a logical clock bumped once per ``match_prefix``/``insert``
    (deterministic, unlike wall time). A parent is never older than its children, so
    evicting the oldest unlocked leaf first, and promoting a parent when its last child
    goes, is LRU over whole cached suffixes. Candidate leaves sit in a heap with lazy
    deletion: an entry is skipped if its node has since changed (time, lock, children).

    Disabled (``disable=True``). Nothing is ever cached: ``match_prefix`` returns an empty
    match at the root, ``insert`` takes no slot and returns ``prefix_len == len(key)``,
    ``num_taken == 0``, so the caller's usual ``free(slots[cached_len:prefix_len])`` (with
    ``cached_len == 0``) frees every slot it passed in. ``evict``/``reset`` return nothing.

    Keys are sequences of ints (list, tuple or 1-D tensor). Mismatched lengths, non-1-D slots
    or use of evicted nodes are internal bugs of the caller and fail asserts.
    """

    def __init__(self, device: torch.device | str = "cpu", disable: bool = False) -> None:
        self.device = torch.device(device)
        self.disable = disable
        self._ids = itertools.count()
        self._clock = 0
        self._empty = torch.empty(0, dtype=torch.int64, device=self.device)
        self._clear()

    def _clear(self) -> None:
        self.root = TreeNode(next(self._ids), (), self._empty, None, 0)
        self._heap: list[tuple[int, int, TreeNode]] = []  # (last_access, node_id, leaf)
        self._num_nodes = 0  # non-root nodes in the tree
        self._evictable = 0
        self._protected = 0

    # ------------------------------------------------------------------ sizes

    @property
    def evictable_size(self) -> int:
        """Tokens in unlocked nodes (all of them can be evicted, leaves first)."""
        return self._evictable

    @property
    def protected_size(self) -> int:
        """Tokens in locked nodes."""
        return self._protected

    @property
    def total_size(self) -> int:
        """Tokens (and so slots) held by the cache."""
        return self._evictable + self._protected

    # ------------------------------------------------------------ match/insert

    def match_prefix(self, key: Sequence[int]) -> MatchResult:
        """Longest cached prefix of ``key``: its slots (a fresh tensor) and its node.

        Updates LRU times along the path and splits the last edge if the match ends inside
        it. The slots stay valid only while ``node`` is locked (or until the next ``evict``).
        """
        if self.disable:
            return MatchResult(self._empty, self.root)
        node, _ = self._walk(_as_key(key), self._tick())
        self._offer(node)
        return MatchResult(self._path_slots(node), node)

    def insert(self, key: Sequence[int], slots: torch.Tensor) -> InsertResult:
        """Cache ``key`` with ``slots[i]`` holding token ``key[i]``; see the class contract.

        The cache takes a copy of ``slots[prefix_len:]``; ``slots[:prefix_len]`` are left to
        the caller. Any integer dtype and device is accepted; values are stored as int64 on
        the cache's device.
        """
        key = _as_key(key)
        assert slots.dim() == 1, f"slots must be 1-D, got shape {tuple(slots.shape)}"
        assert len(slots) == len(key), f"{len(key)} tokens but {len(slots)} slots"
        if self.disable:
            return InsertResult(len(key), self.root, 0)
        now = self._tick()
        node, prefix_len = self._walk(key, now)
        if prefix_len < len(key):
            # copy: callers often pass views into buffers they later reuse
            value = slots[prefix_len:].to(device=self.device, dtype=torch.int64, copy=True)
            leaf = TreeNode(next(self._ids), key[prefix_len:], value, node, now)
            node.children[leaf.key[0]] = leaf
            self._num_nodes += 1
            self._evictable += len(leaf.key)
            node = leaf
        self._offer(node)
        return InsertResult(prefix_len, node, len(key) - prefix_len)

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def _walk(self, key: Key, now: int) -> tuple[TreeNode, int]:
        """Follow ``key`` from the root, touching each node; split where it ends mid-edge."""
        node, pos = self.root, 0
        while pos < len(key):
            child = node.children.get(key[pos])
            if child is None:
                break
            edge_len = len(child.key)
            n = _common_prefix_len(child.key, key, pos)
            if n < edge_len:
                child = self._split(child, n)
            child.last_access = now
            node, pos = child, pos + n
            if n < edge_len:
                break
        return node, pos

    def _split(self, node: TreeNode, pos: int) -> TreeNode:
        """Cut ``node``'s edge after ``pos`` tokens; return the new upper node.

        ``node`` keeps its identity as the lower part, so handles (and locks) held on it
        still mean the same prefix; the upper part inherits its lock count and time.
        """
        assert 0 < pos < len(node.key), f"split at {pos} of an edge of {len(node.key)}"
        parent = node.parent
        assert parent is not None, "cannot split the root"
        upper = TreeNode(next(self._ids), node.key[:pos], node.value[:pos], parent, node.last_access)
        upper.lock_ref = node.lock_ref
        parent.children[upper.key[0]] = upper
        node.key, node.value, node.parent = node.key[pos:], node.value[pos:], upper
        upper.children[node.key[0]] = node
        self._num_nodes += 1
        return upper

    def _path_slots(self, node: TreeNode) -> torch.Tensor:
        parts = []
        while node.parent is not None:
            parts.append(node.value)
            node = node.parent
        if not parts:
            return self._empty
        parts.reverse()
        return torch.cat(parts)

    # ------------------------------------------------------------------ locks

    def lock(self, node: TreeNode) -> None:
        """Protect the prefix ending at ``node`` from eviction (one count per call)."""
        assert not node.evicted, f"lock on an evicted node {node!r}"
        while node.parent is not None:
            if node.lock_ref == 0:
                self._evictable -= len(node.key)
                self._protected += len(node.key)
            node.lock_ref += 1
            node = node.parent

    def unlock(self, node: TreeNode) -> None:
        """Undo one ``lock(node)``."""
        assert not node.evicted, f"unlock on an evicted node {node!r}"
        while node.parent is not None:
            assert node.lock_ref > 0, f"unlock without a matching lock on {node!r}"
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self._protected -= len(node.key)
                self._evictable += len(node.key)
                self._offer(node)
            node = node.parent

    # --------------------------------------------------------------- eviction

    def evict(self, num_tokens: int) -> torch.Tensor:
        """Evict unlocked leaves, oldest first, until ``num_tokens`` are freed or none is left.

        Whole nodes are evicted, so more than ``num_tokens`` may be freed; fewer only when
        nothing evictable remains. Returns the freed slots (int64, cache's device), which the
        caller must give back to its allocator; the cache forgets them.
        """
        freed: list[torch.Tensor] = []
        count = 0
        while count < num_tokens and self._heap:
            stamp, _, node = heapq.heappop(self._heap)
            if not self._is_candidate(node, stamp):
                continue  # stale entry: the node was touched, locked, extended or evicted
            parent = node.parent
            assert parent is not None
            del parent.children[node.key[0]]
            node.parent, node.evicted = None, True
            freed.append(node.value)
            count += len(node.key)
            self._evictable -= len(node.key)
            self._num_nodes -= 1
            self._offer(parent)
        return torch.cat(freed) if freed else self._empty

    def reset(self) -> torch.Tensor:
        """Drop every node and return all slots held. Asserts that nothing is locked."""
        assert self._protected == 0, f"reset with {self._protected} locked tokens"
        freed = []
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            freed.append(node.value)
            stack.extend(node.children.values())
            node.parent, node.evicted = None, True
        self._clear()
        return torch.cat(freed) if freed else self._empty

    def _is_candidate(self, node: TreeNode, stamp: int) -> bool:
        """Whether a heap entry still describes an evictable leaf."""
        return node.parent is not None and not node.children and node.lock_ref == 0 and node.last_access == stamp

    def _offer(self, node: TreeNode) -> None:
        """Push ``node`` as an eviction candidate if it is an unlocked non-root leaf."""
        if not self._is_candidate(node, node.last_access):
            return
        heapq.heappush(self._heap, (node.last_access, node.node_id, node))
        # lazy deletion leaves stale entries behind; drop them once they dominate
        if len(self._heap) > 2 * self._num_nodes + 64:
            self._heap = [e for e in self._heap if self._is_candidate(e[2], e[0])]
            heapq.heapify(self._heap)

    # -------------------------------------------------------------- integrity

    def check_integrity(self) -> None:
        """Assert the internal invariants (O(tree size); for tests and debugging)."""
        assert self.root.key == () and self.root.lock_ref == 0 and self.root.parent is None
        live = {e[2].node_id for e in self._heap if self._is_candidate(e[2], e[0])}
        evictable = protected = num_nodes = 0
        values = []
        stack = [self.root]
        while stack:
            node = stack.pop()
            # the root is never counted: it cannot be evicted anyway
            assert node is self.root or node.lock_ref >= sum(c.lock_ref for c in node.children.values()), (
                f"lock_ref below its children's on {node!r}"
            )
            for first, child in node.children.items():
                assert child.parent is node and child.key[:1] == (first,), f"bad link {child!r}"
                assert node is self.root or node.last_access >= child.last_access, f"child newer than parent: {child!r}"
                stack.append(child)
            if node is self.root:
                continue
            assert not node.evicted and len(node.key) > 0, f"bad node {node!r}"
            assert node.value.shape == (len(node.key),), f"key/value length mismatch {node!r}"
            assert node.value.dtype == torch.int64 and node.value.device == self.device
            assert node.lock_ref >= 0
            if node.lock_ref:
                protected += len(node.key)
            else:
                evictable += len(node.key)
                assert node.children or node.node_id in live, f"evictable leaf not in heap {node!r}"
            num_nodes += 1
            values.append(node.value)
        assert (evictable, protected) == (self._evictable, self._protected), (
            f"sizes: counted {(evictable, protected)}, tracked {(self._evictable, self._protected)}"
        )
        assert num_nodes == self._num_nodes, f"{num_nodes} nodes, tracked {self._num_nodes}"
        if values:
            slots = torch.cat(values)
            assert slots.unique().numel() == slots.numel(), "a slot is held twice"


def _as_key(key: Sequence[int]) -> Key:
    if isinstance(key, tuple):
        return key
    if isinstance(key, torch.Tensor):
        return tuple(key.tolist())
    return tuple(key)


def _common_prefix_len(edge: Key, key: Key, start: int) -> int:
    """Length of the common prefix of ``edge`` and ``key[start:]``."""
    n = min(len(edge), len(key) - start)
    if key[start : start + n] == edge[:n]:  # fast path: one C-level compare
        return n
    for i in range(n):
        if edge[i] != key[start + i]:
            return i
    return n
