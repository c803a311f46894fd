"""Conditional JSON Schema keywords no grammar backend implements (``if``/``then``/``else``,
``dependencies``, ``dependentRequired``, ``dependentSchemas``, ``not``, ``propertyNames``), rewritten into
``anyOf``/``allOf`` of positive schemas, which llguidance enforces exactly. Measured on the
real-world set (docs/benchmarks.md): llguidance refused every schema that held one of them,
and xgrammar, which took those schemas over, ignored the keyword and let invalid outputs out.

The rewrites rest on :func:`outside`, the instances a schema rejects as a union of positive
schemas (``{"type": ...}``, ``const``, string patterns, numeric intervals, "property absent"
as ``"properties": {"p": false}``). Where only part of that set is expressible, the union is a
subset of it and the rewrite is stricter than the original, never looser:

- ``if: I, then: T, else: E`` is ``anyOf: [allOf [I, T], allOf [O, E] for O in outside(I)]``:
  exact when ``outside(I)`` is exact, else stricter (some instances on which ``I`` fails are
  refused although ``E`` holds). A ``contains: X`` in ``I`` is read there as "the first item
  is X" (stricter: llguidance has no ``contains``); outside it, as "no item is X" (exact).
- ``dependentRequired {a: [b]}`` (and ``dependencies`` with a list) is
  ``anyOf: [{properties: {a: false}}, {required: [a, b]}]``; ``dependentSchemas {a: S}`` (and
  ``dependencies`` with a schema) is ``anyOf: [{properties: {a: false}}, allOf [{required:
  [a]}, S]]``: both exact.
- ``not: X`` is ``anyOf: outside(X)`` when that is exact (a ``contains`` in it read as above:
  stricter); otherwise it is left for the backend.
- ``propertyNames`` (lengths, a pattern, an enum, ``not`` a few names, a format braid does not
  check) becomes ``patternProperties``/``properties`` with no other additional property, or
  bounds on ``^C+$`` pattern keys (CloudFormation's names): exact.

A draft-7 ``dependencies`` in a 2019-09 or later schema (where it is no keyword) is enforced
all the same: stricter there.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

JSON_TYPES = ("null", "boolean", "object", "array", "number", "string")
# formats jsonschema's format checker asserts (format-nongpl extras), so braid's validation checks them
CHECKED_FORMATS = {"date", "date-time", "duration", "email", "hostname", "idn-email", "idn-hostname", "ipv4", "ipv6",
                   "iri", "iri-reference", "json-pointer", "regex", "relative-json-pointer", "time", "uri",
                   "uri-reference", "uri-template", "uuid"}
ASSERTIONS = {  # the keywords that can reject an instance; any other key is an annotation
    "type", "enum", "const", "multipleOf", "maximum", "exclusiveMaximum", "minimum", "exclusiveMinimum", "maxLength",
    "minLength", "pattern", "format", "maxItems", "minItems", "uniqueItems", "maxContains", "minContains", "contains",
    "maxProperties", "minProperties", "required", "dependentRequired", "dependencies", "dependentSchemas", "items",
    "prefixItems", "additionalItems", "unevaluatedItems", "properties", "patternProperties", "additionalProperties",
    "unevaluatedProperties", "propertyNames", "allOf", "anyOf", "oneOf", "not", "if", "then", "else", "$ref",
    "$dynamicRef", "$recursiveRef", "contentMediaType", "contentEncoding", "contentSchema"}
_MAX_PATTERN = 4000  # characters of a complement pattern: beyond that the if is kept as a tightening
_MAX_BRANCHES = 64


class Outside(NamedTuple):
    """Positive schemas each of which rejects-only instances the schema rejects; ``exact``:
    together they hold every such instance."""

    branches: list[Any]
    exact: bool


def outside(schema: Any, root: Any, depth: int = 0) -> Outside:
    """The instances ``schema`` rejects, as positive schemas (see the module docstring)."""
    if schema is True or schema == {}:
        return Outside([], True)
    if schema is False:
        return Outside([{}], True)
    if not isinstance(schema, dict) or depth > 8:
        return Outside([], False)
    if isinstance(schema.get("$ref"), str) and len(set(schema) & ASSERTIONS) == 1:
        target = resolve_local_ref(schema["$ref"], root)
        return outside(target, root, depth + 1) if target is not None else Outside([], False)
    branches, exact = [], True
    for key, value in schema.items():
        if key not in ASSERTIONS or (key in ("additionalProperties", "items") and value in (True, {})):
            continue
        part = _outside_keyword(key, value, schema, root, depth)
        branches += part.branches
        exact &= part.exact
    if len(branches) > _MAX_BRANCHES:
        return Outside([], False)
    return Outside(branches, exact)


def _outside_keyword(key: str, value: Any, schema: dict, root: Any, depth: int) -> Outside:
    if key == "type":
        return _outside_type(value)
    if key == "const":
        return _outside_values([value])
    if key == "enum" and isinstance(value, list):
        return _outside_values(value)
    if key == "required" and isinstance(value, list):
        return Outside([{"type": "object", "properties": {name: False}} for name in value], True)
    if key == "properties" and isinstance(value, dict):
        branches, exact = [], True
        for name, sub in value.items():
            part = outside(sub, root, depth + 1)
            if part.branches:  # one branch per property keeps llguidance's grammar small
                branches.append({"type": "object", "required": [name], "properties": {name: _any_of(part.branches)}})
            exact &= part.exact
        return Outside(branches, exact)
    if key == "not":
        return Outside([value], True)
    if key == "contains" and not {"minContains", "maxContains"} & set(schema):  # no item passes it
        part = outside(value, root, depth + 1)
        return Outside([{"type": "array", "items": _any_of(part.branches)}], part.exact)
    if key == "anyOf" and isinstance(value, list):  # outside every branch at once
        parts = [outside(b, root, depth + 1) for b in value]
        if all(p.exact for p in parts):
            return Outside([_all_of([_any_of(p.branches) for p in parts])], True)
    return Outside([], False)


def _outside_type(value: Any) -> Outside:
    kinds = set(value) if isinstance(value, list) else {value}
    if "integer" in kinds and "number" not in kinds:  # "a number with a fraction" has no positive schema
        return Outside([{"type": t} for t in JSON_TYPES if t not in kinds | {"number"}], False)
    others = [t for t in JSON_TYPES if t not in kinds]
    return Outside([{"type": others[0]} if len(others) == 1 else {"type": others}] if others else [], True)


def _outside_values(values: list) -> Outside:
    """Every JSON value but ``values``."""
    kinds = {_kind(v) for v in values}
    others = [t for t in JSON_TYPES if t not in kinds]
    branches: list[Any] = [{"type": others[0] if len(others) == 1 else others}] if others else []
    exact = True
    strings = sorted({v for v in values if isinstance(v, str)})
    if strings:
        pattern = not_strings_pattern(strings)
        if pattern is None:
            exact = False
        else:
            branches.append({"type": "string", "pattern": pattern})
    bools = {v for v in values if isinstance(v, bool)}
    if len(bools) == 1:
        branches.append({"const": not bools.pop()})
    numbers = sorted({v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)})
    if numbers:
        branches.append({"type": "number", "exclusiveMaximum": numbers[0]})
        branches += [{"type": "number", "exclusiveMinimum": lo, "exclusiveMaximum": hi}
                     for lo, hi in zip(numbers, numbers[1:])]
        branches.append({"type": "number", "exclusiveMinimum": numbers[-1]})
    if kinds & {"object", "array"}:
        exact = False  # every other object or array: not expressible here
    return Outside(branches, exact)


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", list: "array", dict: "object"}[type(value)]


def not_strings_pattern(strings: list[str]) -> str | None:
    """A full-match regex (ECMA-262, as in ``pattern``) of every string not in ``strings``,
    read off their trie: at each node, the text may stop (unless a string ends there), go on
    with a character no string has next (then anything), or follow a child."""
    if sum(len(s) for s in strings) > _MAX_PATTERN // 4:
        return None
    trie: dict = {}
    for s in strings:
        node = trie
        for ch in s:
            node = node.setdefault(ch, {})
        node[""] = {}  # a string ends here

    def below(node: dict) -> str:
        children = {ch: sub for ch, sub in node.items() if ch}
        alts = [] if "" in node else [""]
        if children:
            alts.append("[^" + "".join(_class_char(ch) for ch in sorted(children)) + "][\\s\\S]*")
            alts += [_literal(ch) + below(sub) for ch, sub in sorted(children.items())]
        else:
            alts.append("[\\s\\S]+")
        return alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"

    pattern = f"^{below(trie)}$"
    return pattern if len(pattern) <= _MAX_PATTERN else None


def _literal(ch: str) -> str:
    return "\\" + ch if ch in "\\^$.|?*+()[]{}/-" else _escape_control(ch)


def _class_char(ch: str) -> str:
    return "\\" + ch if ch in "\\]^-[" else _escape_control(ch)


def _escape_control(ch: str) -> str:
    return f"\\u{ord(ch):04x}" if ord(ch) < 0x20 or ord(ch) == 0x7F else ch


def resolve_local_ref(ref: str, root: Any) -> Any:
    """The node a local ``$ref`` (``#`` or ``#/a/b``, JSON-pointer escapes) names in ``root``,
    or None when it names nothing there or is not local."""
    if not ref.startswith("#"):
        return None
    node = root
    for raw in ref[2:].split("/") if ref != "#" else []:
        key = raw.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and key in node:
            node = node[key]
        elif isinstance(node, list) and key.isdigit() and int(key) < len(node):
            node = node[int(key)]
        else:
            return None
    return node


def rewrite_logic(node: dict, root: Any) -> dict:
    """``node`` with its if/then/else, dependencies and ``not`` as ``allOf`` parts of positive
    ``anyOf``s (see the module docstring), or ``node`` itself when it holds none of them."""
    parts: list[Any] = []
    out = dict(node)
    if isinstance(out.get("allOf"), list):
        out["allOf"] = _discriminated(out["allOf"], out.get("type") == "object")
    if "if" in out:
        parts.append(_conditional(out.pop("if"), out.pop("then", True), out.pop("else", True), root))
    else:  # a then/else without an if has no effect
        out.pop("then", None)
        out.pop("else", None)
    for key in ("dependencies", "dependentRequired", "dependentSchemas"):
        if isinstance(out.get(key), dict):
            parts += [_dependency(name, need) for name, need in out.pop(key).items()]
    if "propertyNames" in out:
        out = _property_names(out)
    if "not" in out:
        negated = outside(out["not"], root)
        if negated.exact:
            del out["not"]
            parts.append(_any_of([_inside(b) for b in negated.branches]))
    parts = [p for p in parts if p is not True]
    if not parts:
        return out
    if isinstance(out.get("allOf"), list):
        parts = out["allOf"] + parts
    out["allOf"] = parts
    return out


def _property_names(node: dict) -> dict:
    """``propertyNames`` as ``patternProperties`` (exact): a name pattern ``P`` of the names
    schema and additional properties ``A`` give ``patternProperties {P: A}`` with no other
    additional property; names from an enum become properties. Only where no
    ``patternProperties`` exist and the declared properties are spared (each name passes, and
    either ``A`` allows anything or there are none). Else ``node`` unchanged."""
    names, extra = node["propertyNames"], node.get("additionalProperties", True)
    declared = node.get("properties", {})
    out = {k: v for k, v in node.items() if k != "propertyNames"}
    if _every_string(names):
        return out
    if not isinstance(declared, dict) or not isinstance(names, dict):
        return node
    if "patternProperties" in node:
        return _bounded_pattern_names(node, out, names)
    rule = {k: v for k, v in names.items() if k in ASSERTIONS and k != "type"}
    values = rule.get("enum", [rule["const"]] if "const" in rule else None)
    if names.get("type", "string") != "string":
        return node
    if values is not None and set(rule) <= {"enum", "const"} and all(isinstance(v, str) for v in values):
        if not set(declared) <= set(values):
            return node
        out["properties"] = {**declared, **{v: extra for v in values if v not in declared and extra is not False}}
        out["additionalProperties"] = False
        return out
    pattern = _names_pattern(rule)
    try:
        if pattern is None or not all(re.search(pattern, name) for name in declared):
            return node
    except re.error:
        return node
    if extra is False:  # only the declared names, all of which pass
        return out
    if declared and extra not in (True, {}):
        return node
    out["patternProperties"] = {pattern: extra}
    out["additionalProperties"] = False
    return out


_REPEATED_CLASS = re.compile(r"\^(\[(?:[^\]\\]|\\.)*\]|\\[dw]|\.)([+*])\$")


def _bounded_pattern_names(node: dict, out: dict, names: dict) -> dict:
    """Name lengths beside ``patternProperties`` whose keys all read ``^C+$``/``^C*$`` (C one
    character class) and no other additional property: the keys as ``^C{lo,hi}$`` (exact)."""
    rule = {k: v for k, v in names.items() if k in ASSERTIONS and k != "type"}
    if node.get("additionalProperties", True) is not False or not rule or not set(rule) <= {"minLength", "maxLength"}:
        return node
    low, high = rule.get("minLength", 0), rule.get("maxLength")
    if not all(len(name) >= low and (high is None or len(name) <= high) for name in node.get("properties", {})):
        return node
    keys = {}
    for key, schema in node["patternProperties"].items():
        m = _REPEATED_CLASS.fullmatch(key) if isinstance(key, str) else None
        if m is None:
            return node
        lo = max(low, 1 if m.group(2) == "+" else 0)
        keys[f"^{m.group(1)}{{{lo},{'' if high is None else high}}}$"] = schema
    out["patternProperties"] = keys
    return out


def _names_pattern(rule: dict) -> str | None:
    """A regex (a search, as ``patternProperties`` keys are) of the strings a names schema's
    assertions ``rule`` accept, or None."""
    if set(rule) == {"not"} and isinstance(rule["not"], dict) and set(rule["not"]) <= {"enum", "const"}:
        avoided = rule["not"].get("enum", [rule["not"].get("const")])
        return not_strings_pattern(avoided) if all(isinstance(v, str) for v in avoided) else None
    if set(rule) == {"pattern"} and isinstance(rule["pattern"], str):
        return rule["pattern"]
    if rule and set(rule) <= {"minLength", "maxLength"} and all(isinstance(v, int) for v in rule.values()):
        return f"^[\\s\\S]{{{rule.get('minLength', 0)},{rule.get('maxLength', '')}}}$"
    return None


def _every_string(schema: Any) -> bool:
    """Whether ``schema`` surely accepts every string (a names schema that says nothing)."""
    if schema is True or schema == {}:
        return True
    if not isinstance(schema, dict):
        return False
    rule = {k: v for k, v in schema.items() if k in ASSERTIONS and not (k == "format" and v not in CHECKED_FORMATS)}
    if rule.get("type", "string") == "string" and set(rule) <= {"type"}:
        return True
    return set(rule) == {"anyOf"} and isinstance(rule["anyOf"], list) and any(map(_every_string, rule["anyOf"]))


_PLAIN_IF = {"if", "then", "$comment", "description", "title"}


def _discriminated(parts: list, objects_only: bool) -> list:
    """allOf ``parts`` with the conditionals ``if: {properties: {p: {const: C_i}}}, then: T_i``
    on one property ``p`` (distinct ``C_i``, two or more, no ``else``) as one anyOf: ``p = C_i``
    and ``T_i``, or ``p`` another value, or (every ``if`` without ``required: [p]`` holds then)
    a non-object or ``p`` absent and those ``T_i``. Exact; one branch per value instead of the
    product of every conditional's two branches (llguidance refused GitHub issue forms' six as
    "schema too large")."""
    keyed: dict[str, list[tuple[int, Any, bool, Any]]] = {}
    for i, part in enumerate(parts):
        cond = part.get("if") if isinstance(part, dict) and set(part) <= _PLAIN_IF else None
        rule = {k: v for k, v in cond.items() if k in ASSERTIONS} if isinstance(cond, dict) else {}
        props = rule.get("properties")
        if not (isinstance(props, dict) and len(props) == 1 and set(rule) <= {"properties", "required"}):
            continue
        (name, sub), = props.items()
        if isinstance(sub, dict) and set(sub) & ASSERTIONS == {"const"} and rule.get("required", [name]) == [name]:
            keyed.setdefault(name, []).append((i, sub["const"], "required" in rule, part.get("then", True)))
    for name, group in keyed.items():
        values = [value for _, value, _, _ in group]
        if len(group) < 2 or len({repr(v) for v in values}) < len(values):
            continue
        branches = [_all_of([{"type": "object", "required": [name], "properties": {name: {"const": value}}}, then])
                    for _, value, _, then in group]
        others = outside({"enum": values}, None)
        if not others.exact:
            continue
        branches.append({"type": "object", "required": [name], "properties": {name: _any_of(others.branches)}})
        absent = [then for _, _, required, then in group if not required]
        if not (objects_only and any(isinstance(t, dict) and name in t.get("required", []) for t in absent)):
            missing = {"type": "object", "properties": {name: False}}
            branches.append(_all_of([missing if objects_only else {"anyOf": [
                missing, {"type": [t for t in JSON_TYPES if t != "object"]}]}, *absent]))
        dropped = {i for i, _, _, _ in group}
        parts = [p for i, p in enumerate(parts) if i not in dropped] + [_any_of(branches)]
        break  # one group per allOf; another waits for the generic rewrite
    return parts


def _conditional(cond: Any, then: Any, otherwise: Any, root: Any) -> Any:
    if then is True and otherwise is True:
        return True
    branches = [_all_of([_inside(cond), then])] + [_all_of([_inside(b), otherwise])
                                                   for b in outside(cond, root).branches]
    return _any_of(branches)


def _inside(cond: Any) -> Any:
    """``cond``, or a part of what it accepts in keywords llguidance implements: ``contains: X``
    (alone on the array, here or in a property) as "the first item is X" (stricter)."""
    if isinstance(cond, dict) and isinstance(cond.get("properties"), dict):
        cond = {**cond, "properties": {k: _inside(v) for k, v in cond["properties"].items()}}
    if not isinstance(cond, dict) or "contains" not in cond or {"prefixItems", "items", "minContains"} & set(cond):
        return cond
    rest = {k: v for k, v in cond.items() if k not in ("contains", "maxContains")}
    return {**rest, "type": "array", "prefixItems": [cond["contains"]], "minItems": max(1, rest.get("minItems", 1))}


def _dependency(name: str, need: Any) -> Any:
    absent = {"properties": {name: False}}
    if isinstance(need, list):
        return {"anyOf": [absent, {"required": [name, *[n for n in need if n != name]]}]}
    if need is True:
        return True
    return {"anyOf": [absent, _all_of([{"required": [name]}, need])]}


def _all_of(parts: list) -> Any:
    parts = [p for p in parts if p is not True and p != {}]
    if any(p is False for p in parts):
        return False
    if not parts:
        return True
    return parts[0] if len(parts) == 1 else {"allOf": parts}


def _any_of(branches: list) -> Any:
    branches = [b for b in branches if b is not False]
    if any(b is True or b == {} for b in branches):
        return True
    return {"anyOf": branches} if branches else False


