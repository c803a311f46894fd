"""A JSON schema rewritten, before any backend compiles it, into an equivalent one (or a
stricter one, never a looser one) that the backends enforce correctly. Each rule answers a
failure measured on the corpus (benchmarks/grammar_corpus.py, docs/benchmarks.md):

- ``pattern``: JSON Schema regexes are ECMA-262, where ``\\d``/``\\w``/``\\s`` are ASCII
  (outlines-core read them as Unicode); the pattern is matched whole (``^(?:...)$``: a search
  in JSON Schema, which llguidance enforced as such, letting "x: junk" through ``[a-z]{3}``); an
  optional group ``(...)?`` is written ``(...|)``, because xgrammar's schema-pattern path
  accepted text outside ``x(:[A-Z]{1,2})?`` (it took "xB"), while its ``(...|)`` is right.
- ``format``: date, time, date-time and ipv4 become patterns of what jsonschema's format
  checkers accept. xgrammar's formats let through second 60, November 31 and "052.1.1.1". Dates
  allow days 29-31 only in months that have them, and never February 29 (a regex cannot know
  leap years): stricter, never invalid.
- ``format`` email or uri with a ``maxLength``: a pattern whose matches all fit, because
  xgrammar drops maxLength on a string with a format (it produced 100-character emails).
- an array schema without ``items`` gets ``items: {}`` (xgrammar allowed only ``[]``, and
  refused such a schema with ``minItems``).
- draft-4 to 7 spellings xgrammar refuses: tuple ``items: [...]`` (as ``prefixItems``) and
  boolean ``exclusiveMinimum``/``exclusiveMaximum``; local ``$ref``s that reach into arrays
  (``#/definitions/step/oneOf/1``) point to a copy under ``$defs``.
- an object schema with ``anyOf``/``oneOf`` branches that merge with it exactly (often lists of
  ``required`` keys) carries its constraints into every branch: xgrammar let a branch without a
  type be any value (taskfile, Angular workspace, AsyncAPI).
- ``allOf`` of object schemas (directly or through local ``$ref``) is merged into one object
  schema, and a lone allOf part beside annotations replaces it: xgrammar ignored allOf and let
  any JSON value through. For xgrammar and outlines, if/then/else parts of an allOf are dropped
  (looser: neither enforces them; the validation reports their verdict).
- maps of names to schemas (``properties``, ``$defs``, ...) are walked as maps: a property
  named ``if``, ``not`` or ``pattern`` is no keyword (the metaschemas name properties so).

For llguidance (``for_llguidance``), which refuses keywords it does not implement, so that
such schemas no longer fall to xgrammar, which ignored them: if/then/else, dependencies,
dependentRequired, dependentSchemas, ``not`` and ``propertyNames`` become positive
anyOf/allOf/patternProperties (schema_logic.py; exact, or stricter where a condition's
negation is not expressible), and a format it does not know is dropped where braid's validation
does not check it (an annotation: exact) or becomes a pattern of a plain subset of it (stricter).

A ``$ref`` outside the schema (braid fetches nothing) and ``$dynamicRef``/``$recursiveRef`` are
refused with an error naming them: xgrammar compiled such schemas as if the reference allowed
any value. The user's own schema is still the one outputs are validated against.
"""

from __future__ import annotations

import json
from typing import Any

from braid.grammar.base import GrammarError
from braid.grammar.regex_check import normalize_regex, optional_groups_as_alternation
from braid.grammar.schema_logic import CHECKED_FORMATS, resolve_local_ref, rewrite_logic

_DATE = (r"[0-9]{4}-(?:(?:0[1-9]|1[0-2])-(?:0[1-9]|1[0-9]|2[0-8])|(?:0[13-9]|1[0-2])-(?:29|30)"
         r"|(?:0[13578]|1[02])-31)")
_TIME = r"(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\.[0-9]{1,6}|)(?:[Zz]|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])"
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9][0-9]|[0-9])"
FORMAT_PATTERNS = {
    "date": _DATE,
    "time": _TIME,
    "date-time": f"{_DATE}[Tt]{_TIME}",
    "ipv4": rf"{_OCTET}\.{_OCTET}\.{_OCTET}\.{_OCTET}",
}
LLGUIDANCE_FORMATS = {"date", "date-time", "duration", "email", "hostname", "ipv4", "ipv6", "time", "uri", "uuid"}
_HOST = r"[a-z0-9]{1,20}(?:\.[a-z0-9]{1,20}){0,3}"
_SEGMENTS = r"(?:/[A-Za-z0-9._~-]{1,30}){0,6}"
STRICTER_FORMAT_PATTERNS = {  # a plain subset of each format, for llguidance (which refuses these)
    "uri-reference": rf"https://{_HOST}{_SEGMENTS}|[A-Za-z0-9_~-][A-Za-z0-9._~-]{{0,29}}{_SEGMENTS}",
    "iri": rf"https://{_HOST}{_SEGMENTS}",
    "iri-reference": rf"https://{_HOST}{_SEGMENTS}|[A-Za-z0-9_~-][A-Za-z0-9._~-]{{0,29}}{_SEGMENTS}",
    "idn-email": rf"[A-Za-z0-9_+-]{{1,30}}@{_HOST}",
    "idn-hostname": _HOST,
    "json-pointer": r"(?:/(?:[A-Za-z0-9._ -]|~[01]){0,30}){0,6}",
    "regex": r"[A-Za-z0-9_ -]{0,40}",
}
SCHEMA_MAP_KEYS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas", "dependencies")
SCHEMA_VALUE_KEYS = ("enum", "const", "default", "examples")  # values, not schemas
_MERGEABLE = {"type", "properties", "required", "title", "description"}


def prepare_schema(schema_text: str, *, for_llguidance: bool = False) -> str:
    """The schema as backends should compile it; raises GrammarError for a bad ``pattern``.
    ``for_llguidance``: if/then/else, dependencies and ``not`` become positive anyOf/allOf
    parts (schema_logic.py), which llguidance enforces, and formats it does not know are
    dropped or made patterns; else (xgrammar: it reads allOf wrongly, and ignores the rest)
    if/then/else parts of an allOf are dropped."""
    root = json.loads(schema_text)
    if isinstance(root, dict):
        root = _hoist_deep_refs(root)
    out = _walk(root, root, for_llguidance)
    if isinstance(out, dict) and "$schema" in out:  # the rewrites speak 2020-12 (prefixItems, $defs, ...)
        out["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return json.dumps(out, ensure_ascii=False)


def _hoist_deep_refs(root: dict) -> dict:
    """Local ``$ref``s to anything but ``#/$defs/NAME`` / ``#/definitions/NAME`` (such as
    ``#/definitions/step/oneOf/1``, which xgrammar cannot follow) point to a copy of their
    target under ``$defs``."""
    hoisted: dict[str, str] = {}
    defs: dict[str, Any] = {}

    def visit(node: Any) -> Any:
        if isinstance(node, list):
            return [visit(x) for x in node]
        if not isinstance(node, dict):
            return node
        out = {k: v if k in SCHEMA_VALUE_KEYS else visit(v) for k, v in node.items()}
        ref = out.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/") and not _is_plain_def(ref):
            if ref not in hoisted:
                target = resolve_local_ref(ref, root)
                if target is None:
                    raise GrammarError("json_schema", f"$ref {ref!r} points at nothing in the schema")
                hoisted[ref] = name = f"braid_ref_{len(hoisted)}"
                defs[name] = visit(target)
            out["$ref"] = f"#/$defs/{hoisted[ref]}"
        return out

    out = visit(root)
    if defs:
        out["$defs"] = {**out.get("$defs", {}), **defs}
    return out


def _is_plain_def(ref: str) -> bool:
    parts = ref[2:].split("/")
    return len(parts) == 2 and parts[0] in ("$defs", "definitions")


def _walk(node: Any, root: Any, llg: bool) -> Any:
    if isinstance(node, list):
        return [_walk(x, root, llg) for x in node]
    if not isinstance(node, dict):
        return node
    ref = node.get("$ref")
    if isinstance(ref, str) and not ref.startswith("#"):
        raise GrammarError("json_schema", f"$ref {ref!r} points outside the schema, and braid fetches nothing: "
                                          "put that schema under $defs and refer to it as #/$defs/NAME")
    for key in ("$dynamicRef", "$recursiveRef"):
        if key in node:
            raise GrammarError("json_schema", f"{key} is not supported by any grammar backend: use $ref")
    if llg:
        node = rewrite_logic(node, root)
    if isinstance(node.get("allOf"), list):
        node = _merge_all_of(node, root, keep_conditionals=llg)
    for key in ("anyOf", "oneOf"):
        if isinstance(node.get(key), list) and not ({"anyOf", "oneOf"} - {key}) & set(node):
            node = _distribute(node, root, key)
    out = {k: v if k in SCHEMA_VALUE_KEYS else _walk_map(v, root, llg) if k in SCHEMA_MAP_KEYS else _walk(v, root, llg)
           for k, v in node.items()}
    if isinstance(out.get("items"), list):  # drafts 4-7 tuples, in the 2020-12 spelling
        out["prefixItems"] = out.pop("items")
        out["items"] = out.pop("additionalItems", {})  # absent: more items allowed (xgrammar: refused)
    kinds = out.get("type") if isinstance(out.get("type"), list) else [out.get("type")]
    if "array" in kinds and "items" not in out and "prefixItems" not in out:
        out["items"] = {}  # any items (xgrammar read a missing "items" as no items at all)
    for bound, limit in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if isinstance(out.get(bound), bool):  # draft 4: a flag on minimum/maximum
            if out.pop(bound) and limit in out:
                out[bound] = out.pop(limit)
    if isinstance(out.get("pattern"), str):
        out["pattern"] = _pattern(out["pattern"])
    fmt = out.get("format")
    if isinstance(fmt, str) and "pattern" not in out:
        pattern = FORMAT_PATTERNS.get(fmt) or _bounded_format(fmt, out.get("minLength", 0), out.get("maxLength"))
        if pattern is not None:
            del out["format"]
            out["pattern"] = f"^(?:{pattern})$"
    if llg and isinstance(out.get("format"), str) and out["format"] not in LLGUIDANCE_FORMATS:
        _llguidance_format(out)
    return out


def _walk_map(names: Any, root: Any, llg: bool) -> Any:
    """A map of names to schemas: a property named ``if`` or ``not`` is no keyword."""
    if not isinstance(names, dict):
        return _walk(names, root, llg)
    return {name: _walk(sub, root, llg) for name, sub in names.items()}


def _llguidance_format(out: dict) -> None:
    """A format llguidance refuses ("Unknown format"): dropped where braid's validation does
    not check it (an annotation since draft 2019-09: exact), else a pattern whose matches all
    pass the check (stricter), unless the schema has its own pattern."""
    fmt = out["format"]
    if fmt not in CHECKED_FORMATS:
        del out["format"]
    elif fmt in STRICTER_FORMAT_PATTERNS and "pattern" not in out:
        del out["format"]
        out["pattern"] = f"^(?:{STRICTER_FORMAT_PATTERNS[fmt]})$"


def _bounded_format(fmt: str, min_length: object, max_length: object) -> str | None:
    """An email or URI pattern none of whose matches is longer than ``max_length`` (xgrammar
    drops maxLength on a string with a format), or None where no such rewrite is safe."""
    if not isinstance(max_length, int) or not isinstance(min_length, int) or min_length > 6:
        return None
    if fmt == "email" and max_length >= 8:  # local@label.rest, lengths summing to max_length
        local = label = (max_length - 2) // 3
        rest = max_length - 2 - local - label
        return f"[A-Za-z0-9._+-]{{1,{local}}}@[A-Za-z0-9-]{{1,{label}}}\\.[A-Za-z0-9.-]{{1,{rest}}}"
    if fmt == "uri" and max_length >= 16:  # https://label.rest or https://label.rest/path
        label = rest = (max_length - 10) // 3
        path = max_length - 10 - label - rest
        return f"https://[a-z0-9-]{{1,{label}}}\\.[a-z0-9.-]{{1,{rest}}}(?:/[A-Za-z0-9._~/-]{{1,{path}}}|)"
    return None


def _pattern(pattern: str) -> str:
    """Anchored at both ends: a JSON Schema pattern is a search, which backends that read it as
    a full match (xgrammar) enforce more strictly and ones that read it as a search
    (llguidance) enforce as loosely; the full match is valid either way."""
    try:
        return f"^(?:{optional_groups_as_alternation(normalize_regex(pattern))})$"
    except GrammarError as e:
        raise GrammarError("json_schema", f"pattern {pattern!r}: {e.problem}") from None


def _resolve(node: Any, root: Any) -> Any:
    ref = node.get("$ref") if isinstance(node, dict) else None
    if not isinstance(ref, str):
        return node
    for prefix in ("#/$defs/", "#/definitions/"):
        if ref.startswith(prefix) and isinstance(root, dict):
            target = root.get(prefix[2:-1], {}).get(ref[len(prefix):])
            if isinstance(target, dict) and len(node) == 1:
                return _resolve(target, root)
    return node


_ANNOTATIONS = {"$schema", "$id", "$comment", "title", "description", "definitions", "$defs", "examples"}
_CONDITIONAL = {"if", "then", "else", "$comment", "description", "title"}


def _merge_all_of(node: dict, root: Any, keep_conditionals: bool = False) -> dict:
    """``node`` with its allOf merged in, when every part is a plain object schema and the merge
    is exactly equivalent, or a lone part beside annotations only; else ``node`` unchanged.
    if/then/else parts are dropped first: no backend enforces them (xgrammar ignored the whole
    schema around them), and the output's validation reports what they decide."""
    kept = [p for p in node["allOf"]
            if keep_conditionals or not (isinstance(p, dict) and "if" in p and set(p) <= _CONDITIONAL)]
    if len(kept) != len(node["allOf"]):
        node = {k: v for k, v in node.items() if k != "allOf"} | ({"allOf": kept} if kept else {})
        if not kept:
            return node
    if len(kept) == 1 and set(node) - {"allOf"} <= _ANNOTATIONS and isinstance(_resolve(kept[0], root), dict):
        return {k: v for k, v in node.items() if k != "allOf"} | _resolve(kept[0], root)
    parts = [_resolve(p, root) for p in node["allOf"]]
    if not all(isinstance(p, dict) and set(p) <= _MERGEABLE and p.get("type", "object") == "object"
               for p in parts):
        return node
    merged = {k: v for k, v in node.items() if k != "allOf"}
    if merged.get("type", "object") != "object":
        return node
    props = dict(merged.get("properties", {}))
    for part in parts:
        for name, schema in part.get("properties", {}).items():
            if props.get(name, True) is True:
                props[name] = schema
            elif schema is not True and props[name] != schema:
                return node  # two different schemas for one property: leave it to the backend
    if merged.get("additionalProperties") is False and any(
            name not in merged.get("properties", {}) for part in parts for name in part.get("properties", {})):
        return node  # the parent forbids what the parts declare: not a plain union
    merged["type"] = "object"
    merged["properties"] = props
    required = list(merged.get("required", []))
    for part in parts:
        required += [r for r in part.get("required", []) if r not in required]
    if required:
        merged["required"] = required
    return merged


def _distribute(node: dict, root: Any, key: str) -> dict:
    """An object schema with ``anyOf``/``oneOf`` branches (often just ``required`` lists) as
    branches that each carry the parent's constraints: the same set of instances, since each
    branch is merged with the parent exactly (or ``node`` is returned unchanged). xgrammar let a
    branch without a type be any value, ignoring the parent's type and properties."""
    parent = {k: v for k, v in node.items() if k != key and k not in _ANNOTATIONS}
    if not parent or "allOf" in parent:
        return node
    branches = []
    for branch in node[key]:
        target = _resolve(branch, root)
        if not isinstance(target, dict):
            return node
        merged = _merge_all_of({**parent, "allOf": [target]}, root)
        if "allOf" in merged:
            return node
        branches.append(merged)
    return {k: v for k, v in node.items() if k in _ANNOTATIONS} | {key: branches}
