"""Backends the language runs on. Importing this package registers the adapter that turns a
``bd.Engine`` given as ``backend=`` into an :class:`EngineBackend` (one per engine)."""

from __future__ import annotations

import sys
import weakref
from typing import Any

from braid.backend.endpoint import RuntimeEndpoint
from braid.backend.engine_backend import EngineBackend
from braid.backend.openai_backend import OpenAI
from braid.lang.program import BACKEND_ADAPTERS

__all__ = ["EngineBackend", "OpenAI", "RuntimeEndpoint"]

_per_engine: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _adapt_engine(obj: Any) -> EngineBackend | None:
    engine_module = sys.modules.get("braid.runtime.engine")  # not loaded: obj cannot be an Engine
    if engine_module is None or not isinstance(obj, engine_module.Engine):
        return None
    if obj not in _per_engine:  # the backend holds a proxy: a cached backend must not keep its engine alive
        _per_engine[obj] = EngineBackend(weakref.proxy(obj))
    return _per_engine[obj]


BACKEND_ADAPTERS.append(_adapt_engine)
