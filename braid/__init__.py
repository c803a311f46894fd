"""braid: a structured-generation programming framework for LLMs, and the runtime it runs on.

Public API only; see shared/API.md. Heavy modules (torch) load on first use of ``Engine`` or
``extract``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from braid import errors
from braid.backend import EngineBackend, OpenAI, RuntimeEndpoint
from braid.config import EngineConfig
from braid.lang import (
    ForkGroup,
    Program,
    ProgramState,
    assistant,
    gen,
    program,
    role,
    select,
    set_default_backend,
    system,
    user,
)

__version__ = "0.1.0"
__all__ = ["Engine", "EngineBackend", "EngineConfig", "ForkGroup", "OpenAI", "Program", "ProgramState",
           "RuntimeEndpoint",
           "__version__",
           "assistant", "errors", "extract", "gen", "program", "role", "select", "set_default_backend", "system",
           "user"]

if TYPE_CHECKING:
    from braid.jobs import extract
    from braid.runtime.engine import Engine


def __getattr__(name: str) -> Any:
    if name == "Engine":
        from braid.runtime.engine import Engine

        return Engine
    if name == "extract":
        from braid.jobs import extract

        return extract
    raise AttributeError(f"module 'braid' has no attribute {name!r}")
