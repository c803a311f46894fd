"""The braid language: IR nodes, ``@program``, program states, the interpreter."""

from braid.lang.ir import assistant, gen, role, select, system, user
from braid.lang.program import Program, program, set_default_backend
from braid.lang.state import ForkGroup, ProgramState

__all__ = ["ForkGroup", "Program", "ProgramState", "assistant", "gen", "program", "role", "select",
           "set_default_backend", "system", "user"]
