"""What the interpreter needs from a backend: one method per kind of work a node asks for.

``braid/backend/`` implements it (in-process Engine today; HTTP and OpenAI-compatible APIs
later). Every call takes a list of prompts: a fork group's children, or a select's choices,
reach the runtime together (program-aware execution). A backend that cannot do a feature
raises :class:`braid.errors.UnsupportedFeatureError` naming the feature and itself.

Threading: program states call a backend from many threads at once; implementations must be
thread-safe.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from braid.lang.chat_template import RoleMarkers
from braid.lang.choices import ChoiceLogprobs


@dataclass(frozen=True)
class Conversation:
    """The state's chat structure at a call, for backends that speak in messages (chat APIs)."""

    messages: tuple[dict[str, str], ...]  # the finished messages
    open_role: str | None  # the role begun and not yet ended, if any
    open_content: str  # the text of that role so far


@dataclass(frozen=True)
class GenCall:
    """One generation (or one select's context): the prompt text so far, the runtime's sampling
    dict (API.md names), and the conversation behind the text."""

    prompt: str
    sampling: dict[str, Any]
    return_logprob: bool = False
    top_logprobs_num: int = 0
    conversation: Conversation | None = None


@dataclass(frozen=True)
class GenResult:
    text: str
    meta_info: dict[str, Any]


def by_logprob_flags(calls: list[GenCall], run: Callable[[list[GenCall]], list[GenResult]]) -> list[GenResult]:
    """``run`` once per group of calls sharing their logprob flags (engine calls and /generate
    bodies take one setting each), results back in the calls' order."""
    groups: dict[tuple[bool, int], list[int]] = {}
    for i, c in enumerate(calls):
        groups.setdefault((c.return_logprob, c.top_logprobs_num), []).append(i)
    results: list[GenResult | None] = [None] * len(calls)
    for idx in groups.values():
        for i, result in zip(idx, run([calls[i] for i in idx])):
            results[i] = result
    return results  # type: ignore[return-value]


class Backend(Protocol):
    name: str  # for error messages ("engine", "endpoint http://...", "openai gpt-4o")

    def role_markers(self) -> RoleMarkers:
        """The model's chat-template role markers (plain ones for base models)."""
        ...

    def generate(self, calls: list[GenCall]) -> list[GenResult]:
        """Run every call (together, where the backend can) and return results in order."""
        ...

    def generate_stream(self, call: GenCall, on_text: Callable[[str], None]) -> GenResult:
        """Run one call, passing text pieces to ``on_text`` as they are generated."""
        ...

    def score_choices(self, calls: list[GenCall], choices: tuple[str, ...], unconditional: bool
                      ) -> list[list[ChoiceLogprobs]]:
        """For each call's prompt, each choice's token log-probabilities after it (and after a
        start token only, when ``unconditional``)."""
        ...

    def cache_prefix(self, prompt: str) -> None:
        """Make ``prompt``'s KV cached before a fork's children run (no-op where meaningless)."""
        ...
