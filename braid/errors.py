"""Exceptions a user of braid can see.

Every user mistake raises a subclass of :class:`BraidError` whose message names the argument
and, where there is a closed set, the allowed values. The server maps ``http_status`` onto the
HTTP response. Internal invariants are ``assert`` statements, never these classes.
"""

from __future__ import annotations


class BraidError(Exception):
    """Base class of every error braid raises on purpose."""

    http_status = 500


class InvalidRequestError(BraidError, ValueError):
    """A request's field is missing, of the wrong type or out of range."""

    http_status = 400

    def __init__(self, field: str, problem: str) -> None:
        self.field = field
        self.problem = problem
        super().__init__(f"{field}: {problem}")


class UnknownNameError(BraidError, ValueError):
    """A name looked up in a registry (architecture, policy, backend...) is not known."""

    http_status = 400

    def __init__(self, kind: str, name: str, known: list[str]) -> None:
        self.kind = kind
        self.name = name
        self.known = known
        super().__init__(f"unknown {kind} {name!r}; known: {', '.join(sorted(known))}")


class ModelLoadError(BraidError):
    """A model folder or file cannot be read, or its contents are not supported."""

    http_status = 500


class MissingPackageError(BraidError, ImportError):
    """An optional package is needed; the message holds the exact pip command."""

    http_status = 500

    def __init__(self, what: str, pip_command: str) -> None:
        self.pip_command = pip_command
        super().__init__(f"{what} needs a package that is not installed; install it with:\n    {pip_command}")


class EngineClosedError(BraidError, RuntimeError):
    """The engine was shut down, or its scheduler thread died."""

    http_status = 503


class RequestFailedError(BraidError, RuntimeError):
    """A request failed inside the engine (an internal error); other requests are unaffected."""

    http_status = 500


class UnsupportedFeatureError(BraidError, NotImplementedError):
    """A program asked a backend for something it cannot do (e.g. ``select`` on an API without
    prompt log-probabilities); the message names the feature and the backend."""

    http_status = 400

    def __init__(self, feature: str, backend: str) -> None:
        self.feature = feature
        self.backend = backend
        super().__init__(f"{feature} is not supported by the {backend} backend")


class ProgramError(BraidError, RuntimeError):
    """A program could not go on: a node failed (the message names it), or a value it needs came
    from a node that failed. The original exception is the ``__cause__``."""

    http_status = 500
