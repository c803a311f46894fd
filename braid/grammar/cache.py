"""Compiled grammars, cached by (backend, kind, canonical spec) in a bounded LRU.

Shared by the engine front, which compiles on the caller's thread (so a bad spec fails there,
named, before anything is queued, and compiles never stall the scheduler loop), and the
scheduler, which finds the grammar already compiled. Thread-safe.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

from braid.grammar.base import GrammarBackend, GrammarError, GrammarSpec, Matcher


def canonical(spec: GrammarSpec) -> GrammarSpec:
    """Equal JSON schemas spaced differently share one cache entry. Key order is kept: the order
    of ``properties`` is the order of the output's keys."""
    if spec.kind == "json_schema":
        try:
            return spec._replace(spec=json.dumps(json.loads(spec.spec), separators=(",", ":")))
        except json.JSONDecodeError:
            return spec  # the backend reports it
    return spec


class GrammarCache:
    def __init__(self, backend: GrammarBackend, max_entries: int = 256, timeout_s: float = 10.0,
                 workers: int = 2) -> None:
        assert max_entries >= 1, "the cache must hold at least one grammar"
        self.backend = backend
        self.max_entries = max_entries
        self.timeout_s = timeout_s
        self._entries: OrderedDict[GrammarSpec, object] = OrderedDict()
        self._pending: dict[GrammarSpec, Future] = {}  # one compile per spec, however many ask
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="braid-grammar")
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def compiled(self, spec: GrammarSpec) -> object:
        """The compiled grammar for ``spec``, compiling on a miss in the worker pool.

        Raises GrammarError on a bad spec, or when the compile takes longer than ``timeout_s``
        (the compile goes on in the background and is cached if it ever finishes)."""
        key = canonical(spec)
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                self.hits += 1
                return self._entries[key]
            future = self._pending.get(key)
            if future is None:
                self.misses += 1
                future = self._pending[key] = self._pool.submit(self._compile, key)
        try:
            return future.result(timeout=self.timeout_s)
        except FutureTimeout:
            raise GrammarError(spec.kind, f"compiling took longer than {self.timeout_s:g} s") from None

    def _compile(self, key: GrammarSpec) -> object:
        try:
            grammar = self.backend.compile(key)
        finally:
            with self._lock:
                self._pending.pop(key, None)
        with self._lock:
            self._entries[key] = grammar
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return grammar

    def matcher(self, spec: GrammarSpec) -> Matcher:
        return self.backend.matcher(self.compiled(spec))
