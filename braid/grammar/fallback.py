"""A fallback order of backends, such as ``"xgrammar,outlines"``: a spec the first backend
cannot compile is tried on the next. Each compiled grammar
remembers which backend made it, so its matchers come from the same one."""

from __future__ import annotations

from typing import NamedTuple

from braid.grammar.base import GrammarBackend, GrammarError, GrammarSpec, Matcher


class _Compiled(NamedTuple):
    backend: GrammarBackend
    grammar: object


class FallbackBackend:
    def __init__(self, backends: list[GrammarBackend]) -> None:
        assert len(backends) >= 2, "a fallback order needs two backends or more"
        self.backends = backends
        self.name = ",".join(b.name for b in backends)

    def compile(self, spec: GrammarSpec) -> _Compiled:
        problems = []
        for backend in self.backends:
            try:
                return _Compiled(backend, backend.compile(spec))
            except GrammarError as e:
                problems.append(f"{backend.name}: {e.problem}")
        raise GrammarError(spec.kind, "; ".join(problems))

    def matcher(self, compiled: _Compiled) -> Matcher:
        return compiled.backend.matcher(compiled.grammar)


def split_names(names: str) -> list[str]:
    return [n.strip() for n in names.split(",") if n.strip()]

