"""The language's IR: immutable nodes combined with ``+``.

A program appends nodes to its state (``s += node``); the interpreter executes them in order.
Nodes are validated when they are built, so a mistake is reported on the line that made it.
Sampling values the runtime owns (ranges of temperature, top_p, ...) are checked by the
backend when the node runs, with the gen's name in the message.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from braid.errors import InvalidRequestError

ROLES = ("system", "user", "assistant")

# gen keyword -> its type; every one also is a sampling field of the runtime (API.md), the
# first two under the runtime's longer names (see SAMPLING_NAMES)
GEN_SAMPLING_FIELDS: dict[str, type | tuple[type, ...]] = {
    "max_tokens": int,
    "min_tokens": int,
    "stop": (str, list, tuple),
    "stop_token_ids": (list, tuple),
    "temperature": (int, float),
    "top_p": (int, float),
    "top_k": int,
    "min_p": (int, float),
    "frequency_penalty": (int, float),
    "presence_penalty": (int, float),
    "repetition_penalty": (int, float),
    "seed": int,
    "ignore_eos": bool,
    "any_whitespace": bool,
}
SAMPLING_NAMES = {"max_tokens": "max_new_tokens", "min_tokens": "min_new_tokens"}
CONSTRAINT_FIELDS = ("regex", "json_schema", "ebnf", "choices")
DTYPES = {"int": int, "float": float, "bool": bool, "str": str}


class Node:
    """Base of every IR node. ``a + b`` (and ``"text" + node``) builds a :class:`Concat`."""

    def __add__(self, other: Any) -> Concat:
        return Concat((*flatten(self), *flatten(as_node(other, "+"))))

    def __radd__(self, other: Any) -> Concat:
        return Concat((*flatten(as_node(other, "+")), *flatten(self)))

    def describe(self) -> str:
        return type(self).__name__.lower()


@dataclass(frozen=True, eq=False)
class Text(Node):
    value: str

    def describe(self) -> str:
        return f"text {self.value[:30]!r}"


@dataclass(frozen=True, eq=False)
class Gen(Node):
    """Generate text into variable ``name`` (None: append only). ``sampling`` holds the
    user-given sampling fields under the gen's names (max_tokens, ...); ``constraint`` is at
    most one (kind, spec) pair; ``dtype`` converts the captured text."""

    name: str | None
    sampling: dict[str, Any] = field(default_factory=dict)
    constraint: tuple[str, Any] | None = None
    dtype: type | None = None
    return_logprob: bool = False
    top_logprobs_num: int = 0

    def describe(self) -> str:
        return f"gen {self.name!r}"


@dataclass(frozen=True, eq=False)
class Select(Node):
    """Pick one of ``choices`` by scoring each continuation's prompt log-probabilities."""

    name: str | None
    choices: tuple[str, ...]
    choices_method: str = "token_length_normalized"

    def describe(self) -> str:
        return f"select {self.name!r}"


@dataclass(frozen=True, eq=False)
class RoleBegin(Node):
    role: str

    def describe(self) -> str:
        return f"begin of role {self.role!r}"


@dataclass(frozen=True, eq=False)
class RoleEnd(Node):
    role: str

    def describe(self) -> str:
        return f"end of role {self.role!r}"


@dataclass(frozen=True, eq=False)
class SetVar(Node):
    """``s[name] = value``: ordered with the rest of the program's nodes."""

    name: str
    value: Any

    def describe(self) -> str:
        return f"set {self.name!r}"


@dataclass(frozen=True, eq=False)
class Concat(Node):
    parts: tuple[Node, ...]

    def describe(self) -> str:
        return " + ".join(p.describe() for p in self.parts)


def as_node(value: Any, where: str) -> Node:
    """A node, or a string as a :class:`Text` node; anything else is a user mistake."""
    if isinstance(value, Node):
        return value
    if isinstance(value, str):
        return Text(value)
    raise InvalidRequestError(where, f"expected a string or a braid expression (gen, select, role), "
                                     f"got {type(value).__name__}")


def flatten(node: Node) -> tuple[Node, ...]:
    """The leaf nodes of ``node`` in execution order."""
    return node.parts if isinstance(node, Concat) else (node,)


# ---- constructors (the public API) -------------------------------------------------------------
def _check_name(where: str, name: Any) -> None:
    if name is not None and (not isinstance(name, str) or not name):
        raise InvalidRequestError(f"{where}.name", f"expected a non-empty string or None, got {name!r}")


def _check_choices(where: str, choices: Any) -> tuple[str, ...]:
    if not isinstance(choices, (list, tuple)) or not choices:
        raise InvalidRequestError(where, f"expected a non-empty list of strings, got {choices!r}")
    for c in choices:
        if not isinstance(c, str) or not c:
            raise InvalidRequestError(where, f"every choice must be a non-empty string, got {c!r}")
    if len(set(choices)) != len(choices):
        raise InvalidRequestError(where, "choices must be distinct")
    return tuple(choices)


def _schema_text(where: str, schema: Any) -> str:
    """A JSON schema given as a JSON string, a dict or a Pydantic model class, as a JSON string
    (every backend, in-process or over HTTP, takes that)."""
    if isinstance(schema, str):
        return schema
    if isinstance(schema, dict):
        return json.dumps(schema)
    if isinstance(schema, type) and hasattr(schema, "model_json_schema"):
        return json.dumps(schema.model_json_schema())
    raise InvalidRequestError(where, f"expected a JSON string, a dict or a Pydantic model class, got "
                                     f"{type(schema).__name__}")


def _as_dtype(where: str, dtype: Any) -> type | None:
    if dtype is None:
        return None
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    if dtype in DTYPES.values():
        return dtype
    raise InvalidRequestError(f"{where}.dtype", f"expected one of int, float, bool, str, got {dtype!r}")


def gen(
    name: str | None = None,
    max_tokens: int | None = None,
    stop: str | list[str] | None = None,
    stop_token_ids: list[int] | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    min_p: float | None = None,
    frequency_penalty: float | None = None,
    presence_penalty: float | None = None,
    ignore_eos: bool | None = None,
    regex: str | None = None,
    json_schema: Any = None,
    choices: list[str] | None = None,
    dtype: Any = None,
    return_logprob: bool = False,
    top_logprobs_num: int = 0,
    *,
    min_tokens: int | None = None,
    repetition_penalty: float | None = None,
    seed: int | None = None,
    ebnf: str | None = None,
    any_whitespace: bool | None = None,
) -> Gen:
    """Generate into variable ``name``. Parameters left None take the run's defaults, then the
    runtime's. At most one of ``regex``, ``json_schema`` (str, dict or Pydantic class), ``ebnf``,
    ``choices`` and a non-str ``dtype`` constrains the output; ``dtype`` also converts it."""
    where = f"gen({name!r})"
    _check_name("gen", name)
    given = dict(max_tokens=max_tokens, min_tokens=min_tokens, stop=stop, stop_token_ids=stop_token_ids,
                 temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                 frequency_penalty=frequency_penalty, presence_penalty=presence_penalty,
                 repetition_penalty=repetition_penalty, seed=seed, ignore_eos=ignore_eos,
                 any_whitespace=any_whitespace)
    sampling = {k: v for k, v in given.items() if v is not None}
    check_sampling_types(where, sampling)
    constraints = {k: v for k, v in dict(regex=regex, json_schema=json_schema, ebnf=ebnf, choices=choices).items()
                   if v is not None}
    typ = _as_dtype(where, dtype)
    if typ is not None and typ is not str:
        constraints["dtype"] = typ
    if len(constraints) > 1:
        raise InvalidRequestError(where, f"give at most one of regex, json_schema, ebnf, choices and a non-str "
                                         f"dtype; got {', '.join(constraints)}")
    constraint = None
    if constraints:
        kind, spec = next(iter(constraints.items()))
        if kind == "choices":
            spec = _check_choices(f"{where}.choices", spec)
        elif kind == "json_schema":
            spec = _schema_text(f"{where}.json_schema", spec)
        elif kind in ("regex", "ebnf") and (not isinstance(spec, str) or not spec):
            raise InvalidRequestError(f"{where}.{kind}", f"expected a non-empty string, got {spec!r}")
        constraint = None if kind == "dtype" else (kind, spec)
    if not isinstance(return_logprob, bool):
        raise InvalidRequestError(f"{where}.return_logprob", f"expected true or false, got {return_logprob!r}")
    if isinstance(top_logprobs_num, bool) or not isinstance(top_logprobs_num, int) or top_logprobs_num < 0:
        raise InvalidRequestError(f"{where}.top_logprobs_num", f"expected an integer >= 0, got {top_logprobs_num!r}")
    return Gen(name, sampling, constraint, typ, return_logprob, top_logprobs_num)


def check_sampling_types(where: str, sampling: dict[str, Any]) -> None:
    """Types of gen-named sampling fields (ranges are the runtime's to check)."""
    for key, value in sampling.items():
        if key not in GEN_SAMPLING_FIELDS:
            known = ", ".join(GEN_SAMPLING_FIELDS)
            raise InvalidRequestError(f"{where}.{key}", f"not a sampling parameter; known: {known}")
        want = GEN_SAMPLING_FIELDS[key]
        if (isinstance(value, bool) and want is not bool) or not isinstance(value, want):
            raise InvalidRequestError(f"{where}.{key}", f"wrong type {type(value).__name__}: {value!r}")


def select(name: str | None = None, choices: list[str] | None = None,
           choices_method: str = "token_length_normalized") -> Select:
    """Pick one of ``choices`` (scored together over the shared prefix; see lang/choices.py)."""
    from braid.lang.choices import CHOICES_METHODS

    _check_name("select", name)
    CHOICES_METHODS.get(choices_method)  # unknown names list the known ones
    return Select(name, _check_choices(f"select({name!r}).choices", choices), choices_method)


def role(name: str, content: Any = None) -> Node:
    """``content`` wrapped in role ``name``'s chat-template markers; no content: only the begin
    marker (end it with :func:`role_end`)."""
    if name not in ROLES:
        raise InvalidRequestError("role", f"expected one of {', '.join(ROLES)}, got {name!r}")
    if content is None:
        return RoleBegin(name)
    return RoleBegin(name) + as_node(content, name) + RoleEnd(name)


def role_end(name: str) -> RoleEnd:
    if name not in ROLES:
        raise InvalidRequestError("role", f"expected one of {', '.join(ROLES)}, got {name!r}")
    return RoleEnd(name)


def system(content: Any = None) -> Node:
    return role("system", content)


def user(content: Any = None) -> Node:
    return role("user", content)


def assistant(content: Any = None) -> Node:
    return role("assistant", content)
