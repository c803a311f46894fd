"""Role markers (the text before and after each message) read off a model's chat template.

Programs write a conversation piece by piece (``s += user(...)``, then a gen inside
``assistant``), so braid needs each role's begin and end text, not a whole rendered
conversation. They are found by rendering conversations whose contents are sentinel strings
with the model's own (HF jinja) template and cutting at the sentinels:

- the begin text of the conversation's first message comes from rendering that message alone,
  so it carries whatever the template puts first (BOS, a default system prompt);
- a user message after a system message: the text between the two contents, less the system
  message's end;
- the assistant's begin text is what ``add_generation_prompt`` adds;
- each role's end text is what follows its content at the end of a conversation.

A model without a chat template (a base model) gets plain ``Role: content`` lines.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from braid.errors import ProgramError

Render = Callable[[list[dict], bool], str]  # (messages, add_generation_prompt) -> text

_SENTINELS = ("\u27e6braid-0\u27e7", "\u27e6braid-1\u27e7", "\u27e6braid-2\u27e7")


@dataclass(frozen=True)
class RoleMarkers:
    first_begin: dict[str, str]  # role -> begin text when the role opens the conversation
    begin: dict[str, str]  # role -> begin text later in the conversation
    end: dict[str, str]  # role -> end text

    def begin_text(self, role: str, is_first: bool) -> str:
        return self.first_begin[role] if is_first else self.begin[role]


PLAIN = RoleMarkers(
    first_begin={"system": "System: ", "user": "User: ", "assistant": "Assistant: "},
    begin={"system": "System: ", "user": "User: ", "assistant": "Assistant: "},
    end={"system": "\n", "user": "\n", "assistant": "\n"},
)


def _cut(text: str, sentinel: str) -> tuple[str, str]:
    before, found, after = text.partition(sentinel)
    if not found:
        raise ValueError(f"the chat template dropped the message content {sentinel!r}")
    return before, after


def _render_one(render: Render, role: str) -> str | None:
    try:
        return render([{"role": role, "content": _SENTINELS[0]}], False)
    except Exception:  # a template may refuse a conversation that starts with this role
        return None


def markers_from_template(render: Render) -> RoleMarkers:
    """Derive role markers from ``render``; raises ValueError when the template is not a plain
    sequence of messages (a content that does not survive rendering, markers that move)."""
    s0, s1, s2 = _SENTINELS
    sys, usr, ast = ({"role": r, "content": s} for r, s in (("system", s0), ("user", s1), ("assistant", s2)))
    full = render([sys, usr, ast], False)
    first_sys, rest = _cut(full, s0)
    sys_to_user, rest = _cut(rest, s1)
    user_to_ast, end_ast = _cut(rest, s2)
    _, end_sys = _cut(render([sys], False), s0)
    _, end_user = _cut(render([sys, usr], False), s1)
    _, user_then_prompt = _cut(render([sys, usr], True), s1)
    if not (sys_to_user.startswith(end_sys) and user_then_prompt.startswith(end_user)
            and user_to_ast == user_then_prompt):
        raise ValueError("the chat template's role markers depend on the conversation around them")
    begin = {"system": first_sys, "user": sys_to_user[len(end_sys):], "assistant": user_then_prompt[len(end_user):]}
    first_begin = dict(begin)
    for role in ("user", "assistant"):
        alone = _render_one(render, role)
        if alone is not None:
            first_begin[role] = _cut(alone, s0)[0]
    return RoleMarkers(first_begin=first_begin, begin=begin,
                       end={"system": end_sys, "user": end_user, "assistant": end_ast})


def read_role_markers(has_template: bool, render: Render, source: str) -> RoleMarkers:
    """The markers of ``source``'s chat template, or plain ones where it has none; a template
    whose markers cannot be read raises ProgramError (write the markers as text instead)."""
    if not has_template:
        return PLAIN
    try:
        return markers_from_template(render)
    except ValueError as exc:
        raise ProgramError(f"roles: cannot read role markers from the {source}'s chat template ({exc}); write "
                           "the conversation's markers as text instead") from None
