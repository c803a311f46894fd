"""Compiled grammars, cached by (backend, kind, canonical spec) in a bounded LRU.

Shared by the engine front, which compiles on the caller's thread (so a bad spec fails there,
named, before anything is queued, and compiles never stall the scheduler loop), and the
scheduler, which finds the grammar already compiled. Thread-safe.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict

from braid.grammar.base import GrammarBackend, GrammarSpec, Matcher


def canonical(spec: GrammarSpec) -> GrammarSpec:
    """Equal JSON schemas written differently share one cache entry."""
    if spec.kind == "json_schema":
        try:
            return spec._replace(spec=json.dumps(json.loads(spec.spec), sort_keys=True, separators=(",", ":")))
        except json.JSONDecodeError:
            return spec  # the backend reports it
    return spec


class GrammarCache:
    def __init__(self, backend: GrammarBackend, max_entries: int = 256) -> None:
        assert max_entries >= 1, "the cache must hold at least one grammar"
        self.backend = backend
        self.max_entries = max_entries
        self._entries: OrderedDict[GrammarSpec, object] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def compiled(self, spec: GrammarSpec) -> object:
        """The compiled grammar for ``spec``, compiling on a miss (GrammarError on a bad spec)."""
        key = canonical(spec)
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                self.hits += 1
                return self._entries[key]
        grammar = self.backend.compile(key)  # outside the lock: compiles may take a while
        with self._lock:
            self.misses += 1
            self._entries[key] = grammar
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return grammar

    def matcher(self, spec: GrammarSpec) -> Matcher:
        return self.backend.matcher(self.compiled(spec))
