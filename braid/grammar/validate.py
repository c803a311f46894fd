"""Validation of finished JSON against its schema (jsonschema, formats checked): the engine
reports it in ``meta_info``, and extraction jobs check every record with it."""

from __future__ import annotations

import functools
import json
import re

from braid.grammar.schema_prep import SCHEMA_VALUE_KEYS


@functools.lru_cache(maxsize=256)
def json_validator(schema_text: str):
    """The jsonschema validator of a schema (formats checked), built once per schema. The engine
    front builds it when the request arrives: importing jsonschema with its format checkers takes
    seconds, which must not stall the scheduler thread."""
    import jsonschema

    schema = _python_patterns(json.loads(schema_text))
    validator_cls = jsonschema.validators.validator_for(schema)
    return validator_cls(schema, format_checker=validator_cls.FORMAT_CHECKER)


_JS_NAMED_GROUP = re.compile(r"(?<!\\)\(\?<(?![=!])")


def _python_patterns(node):
    """The schema with ECMA-262 named groups ``(?<name>`` in Python's spelling ``(?P<name>``,
    since jsonschema matches patterns with Python's ``re``."""
    if isinstance(node, list):
        return [_python_patterns(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: v if k in SCHEMA_VALUE_KEYS else _python_patterns(v) for k, v in node.items()}
    if isinstance(out.get("pattern"), str):
        out["pattern"] = _JS_NAMED_GROUP.sub("(?P<", out["pattern"])
    if isinstance(out.get("patternProperties"), dict):
        out["patternProperties"] = {_JS_NAMED_GROUP.sub("(?P<", k): v for k, v in out["patternProperties"].items()}
    return out


def validate_json(text: str, schema_text: str) -> tuple[bool, str | None]:
    """Whether ``text`` is JSON valid under the schema (formats checked), and the first error."""
    import jsonschema

    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        return False, f"not JSON: {e}"
    try:
        error = jsonschema.exceptions.best_match(json_validator(schema_text).iter_errors(value))
    except Exception as e:  # a $ref that does not resolve, a pattern Python cannot read, ...
        # an output that could not be checked is never reported valid
        return False, f"the schema could not be checked: {type(e).__name__}: {str(e)[:300]}"
    return (True, None) if error is None else (False, error.message)
