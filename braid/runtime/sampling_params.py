"""Sampling parameters of one request: SGLang's names, validated once at the edge.

``SamplingParams.from_dict`` is what the engine front and the server call on a user's dict; it
rejects unknown keys, wrong types and out-of-range values with ``InvalidRequestError`` (HTTP 400)
naming the field. Direct construction (``SamplingParams(temperature=0.0)``) runs the same checks.
"""

from __future__ import annotations

import difflib
import json
import math
import numbers
from dataclasses import dataclass, fields
from typing import Any, NamedTuple

from braid.errors import InvalidRequestError

CONSTRAINT_KEYS = ("json_schema", "regex", "ebnf", "choices")
PENALTY_RANGE = (-2.0, 2.0)


class Constraint(NamedTuple):
    """The one grammar constraint of a request: ``kind`` is a key of ``CONSTRAINT_KEYS``."""

    kind: str
    spec: str  # json_schema is always a JSON string here, whatever form the user gave; choices a JSON list


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the tokens of one completion. Immutable; every instance is valid.

    On construction, ``stop`` may be a ``str`` or a list and ``stop_token_ids`` a list (both are
    stored as tuples), ``json_schema`` may be a ``str``, a ``dict`` or a Pydantic model class
    (stored as a JSON string), and ints are accepted where floats are expected (stored as float).
    """

    max_new_tokens: int = 128  # generate at most this many tokens; 0 = only read the prompt
    min_new_tokens: int = 0  # EOS and stop_token_ids are banned until this many tokens exist
    temperature: float = 1.0  # 0 = greedy (argmax of the penalized logits)
    top_p: float = 1.0  # keep the smallest set of most likely tokens whose probability reaches top_p
    top_k: int = -1  # keep the k most likely tokens; -1 = off
    min_p: float = 0.0  # drop tokens less likely than min_p times the most likely token
    frequency_penalty: float = 0.0  # OpenAI: logit -= this * (count of the token in the output)
    presence_penalty: float = 0.0  # OpenAI: logit -= this if the token occurs in the output
    repetition_penalty: float = 1.0  # HF: prompt+output tokens' logits: positive / p, negative * p
    seed: int | None = None  # per-request RNG: same seed, same tokens, whatever else is in the batch
    stop: tuple[str, ...] = ()  # text ends before the first occurrence of any of these
    stop_token_ids: tuple[int, ...] = ()  # generation ends after any of these tokens
    ignore_eos: bool = False  # do not end at the model's EOS token
    n: int = 1  # completions per prompt
    skip_special_tokens: bool = True  # leave special tokens out of the returned text
    json_schema: str | None = None  # constraint: output is JSON valid under this schema
    regex: str | None = None  # constraint: output matches this regular expression
    ebnf: str | None = None  # constraint: output is derived from this EBNF grammar
    choices: tuple[str, ...] | None = None  # constraint: output is exactly one of these strings
    jump_forward: bool = True  # with a constraint: append text the grammar forces in one step
    any_whitespace: bool = False  # with json_schema: allow free whitespace runs (off: compact JSON)

    def __post_init__(self) -> None:
        # Normalizing inside construction (before anyone can see the object) keeps one
        # validation path for from_dict and direct construction; nothing mutates it afterwards.
        for name, value in self._normalized().items():
            object.__setattr__(self, name, value)
        self._check_ranges()

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> SamplingParams:
        """Build from a user's dict. ``None`` (or a missing key) means the default; a key whose
        value is ``None`` also takes the default, as JSON clients send ``null`` for "unset".

        Raises ``InvalidRequestError`` for a non-dict, an unknown key (the message lists the
        allowed keys), a wrong type or an out-of-range value.
        """
        if d is None:
            return cls()
        if not isinstance(d, dict):
            raise InvalidRequestError("sampling_params", f"expected a dict, got {type(d).__name__}")
        allowed = [f.name for f in fields(cls)]
        for key in d:
            if key not in allowed:
                close = difflib.get_close_matches(str(key), allowed, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise InvalidRequestError(
                    str(key), f"unknown sampling parameter{hint}; allowed keys: {', '.join(allowed)}"
                )
        return cls(**{k: v for k, v in d.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-compatible dict (tuples become lists); ``from_dict`` of it gives ``self``."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    # ---- derived ------------------------------------------------------------------------------

    @property
    def is_greedy(self) -> bool:
        """True when the choice is the argmax of the penalized logits: ``temperature == 0``, or
        ``top_k == 1`` (which keeps only the argmax whatever the temperature)."""
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        """True when any of the repetition / frequency / presence penalties is active."""
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0

    @property
    def constraint(self) -> Constraint | None:
        """The request's grammar constraint, or ``None``."""
        for kind in CONSTRAINT_KEYS:
            spec = getattr(self, kind)
            if spec is not None:
                return Constraint(kind, json.dumps(list(spec), ensure_ascii=False) if kind == "choices" else spec)
        return None

    def validate_token_ids(self, vocab_size: int) -> None:
        """Raise ``InvalidRequestError`` if a ``stop_token_ids`` entry is not below ``vocab_size``.
        The engine calls this, as only it knows the model's vocabulary."""
        for tid in self.stop_token_ids:
            if tid >= vocab_size:
                raise InvalidRequestError(
                    "stop_token_ids", f"token id {tid} is out of range: the vocabulary has {vocab_size} tokens"
                )

    # ---- checks -------------------------------------------------------------------------------

    def _normalized(self) -> dict[str, Any]:
        """Every field's value in its stored type; raises on a wrong type."""
        out: dict[str, Any] = {}
        for name in ("max_new_tokens", "min_new_tokens", "top_k", "n"):
            out[name] = _as_int(name, getattr(self, name))
        for name in ("temperature", "top_p", "min_p", "frequency_penalty", "presence_penalty", "repetition_penalty"):
            out[name] = _as_float(name, getattr(self, name))
        for name in ("ignore_eos", "skip_special_tokens", "jump_forward", "any_whitespace"):
            out[name] = _as_bool(name, getattr(self, name))
        out["seed"] = None if self.seed is None else _as_int("seed", self.seed)
        out["stop"] = _as_stop(self.stop)
        out["stop_token_ids"] = _as_token_ids(self.stop_token_ids)
        out["json_schema"] = _as_json_schema(self.json_schema)
        for name in ("regex", "ebnf"):
            out[name] = _as_text(name, getattr(self, name))
        out["choices"] = _as_choices(self.choices)
        return out

    def _check_ranges(self) -> None:
        _require(self.max_new_tokens >= 0, "max_new_tokens", f"must be >= 0, got {self.max_new_tokens}")
        _require(self.min_new_tokens >= 0, "min_new_tokens", f"must be >= 0, got {self.min_new_tokens}")
        _require(
            self.min_new_tokens <= self.max_new_tokens,
            "min_new_tokens",
            f"must be <= max_new_tokens ({self.max_new_tokens}), got {self.min_new_tokens}",
        )
        _require(self.temperature >= 0.0, "temperature", f"must be >= 0 (0 = greedy), got {self.temperature}")
        _require(0.0 < self.top_p <= 1.0, "top_p", f"must be in (0, 1], got {self.top_p}")
        _require(self.top_k == -1 or self.top_k >= 1, "top_k", f"must be -1 (off) or >= 1, got {self.top_k}")
        _require(0.0 <= self.min_p <= 1.0, "min_p", f"must be in [0, 1], got {self.min_p}")
        lo, hi = PENALTY_RANGE
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            _require(lo <= value <= hi, name, f"must be in [{lo:g}, {hi:g}], got {value}")
        _require(self.repetition_penalty > 0.0, "repetition_penalty", f"must be > 0, got {self.repetition_penalty}")
        _require(self.n >= 1, "n", f"must be >= 1, got {self.n}")
        given = [k for k in CONSTRAINT_KEYS if getattr(self, k) is not None]
        _require(not self.any_whitespace or self.json_schema is not None, "any_whitespace",
                 "applies only to json_schema output, and no json_schema was given")
        _require(not (given and self.min_new_tokens), "min_new_tokens",
                 f"cannot be combined with {given[0] if given else ''}: the grammar decides where the output ends")
        if len(given) > 1:
            raise InvalidRequestError(
                given[-1], f"at most one of {', '.join(CONSTRAINT_KEYS)} may be given, got {', '.join(given)}"
            )


# ---- type coercion helpers (each raises InvalidRequestError naming the field) ----------------


def _require(ok: bool, field: str, problem: str) -> None:
    if not ok:
        raise InvalidRequestError(field, problem)


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def _as_int(name: str, value: Any) -> int:
    # bool is an int subclass in Python, but `max_new_tokens=True` is always a mistake.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidRequestError(name, f"expected an int, got {_describe(value)}")
    return int(value)


def _as_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidRequestError(name, f"expected a number (int or float), got {_describe(value)}")
    value = float(value)
    if not math.isfinite(value):
        raise InvalidRequestError(name, f"must be a finite number, got {value}")
    return value


def _as_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise InvalidRequestError(name, f"expected a bool, got {_describe(value)}")
    return value


def _as_stop(value: Any) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise InvalidRequestError("stop", f"expected a str or a list of str, got {_describe(value)}")
    out: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise InvalidRequestError("stop", f"expected a str or a list of str, got an item {_describe(item)}")
        if not item:
            raise InvalidRequestError("stop", "stop strings must be non-empty")
        if item not in out:
            out.append(item)
    return tuple(out)


def _as_token_ids(value: Any) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)):
        raise InvalidRequestError("stop_token_ids", f"expected a list of int, got {_describe(value)}")
    out = tuple(_as_int("stop_token_ids", item) for item in value)
    for tid in out:
        _require(tid >= 0, "stop_token_ids", f"token ids must be >= 0, got {tid}")
    return out


def _as_text(name: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidRequestError(name, f"expected a str, got {_describe(value)}")
    _require(bool(value), name, "must be a non-empty string")
    return value


def _as_choices(value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    _require(isinstance(value, (list, tuple)), "choices", f"expected a list of strings, got {_describe(value)}")
    _require(len(value) > 0, "choices", "must hold at least one string")
    for c in value:
        _require(isinstance(c, str) and c != "", "choices", f"every choice must be a non-empty string, got {c!r}")
    _require(len(set(value)) == len(value), "choices", "choices must be distinct")
    return tuple(value)


def _as_json_schema(value: Any) -> str | None:
    """A JSON string, a dict, or a Pydantic model class -> the schema as a JSON string."""
    if value is None:
        return None
    if isinstance(value, type) and callable(getattr(value, "model_json_schema", None)):
        return json.dumps(value.model_json_schema())
    if isinstance(value, dict):
        try:
            return json.dumps(value)
        except (TypeError, ValueError) as e:
            raise InvalidRequestError("json_schema", f"the dict is not JSON-serializable: {e}") from None
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError as e:
            raise InvalidRequestError("json_schema", f"not valid JSON: {e}") from None
        # A JSON Schema is an object, or the boolean schemas true/false.
        _require(isinstance(parsed, (dict, bool)), "json_schema", "must be a JSON object (or true/false)")
        return value
    raise InvalidRequestError(
        "json_schema", f"expected a JSON str, a dict or a Pydantic model class, got {_describe(value)}"
    )
