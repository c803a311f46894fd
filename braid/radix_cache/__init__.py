"""Radix prefix cache: token ids -> KV slot indices, LRU eviction, lock refs.

Imports nothing else from braid.
"""

from __future__ import annotations

from .radix_cache import InsertResult, MatchResult, RadixCache, TreeNode

__all__ = ["InsertResult", "MatchResult", "RadixCache", "TreeNode"]
