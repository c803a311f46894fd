"""SamplingParams: defaults, normalization, and one rejection per rule with a message that
names the field."""

from __future__ import annotations

import json

import pytest

from braid.errors import InvalidRequestError
from braid.runtime.sampling_params import Constraint, SamplingParams


def test_defaults_match_the_api():
    p = SamplingParams.from_dict(None)
    assert p == SamplingParams.from_dict({})
    assert (p.max_new_tokens, p.min_new_tokens, p.temperature, p.top_p, p.top_k, p.min_p) == (128, 0, 1.0, 1.0, -1, 0.0)
    assert (p.frequency_penalty, p.presence_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert (p.seed, p.stop, p.stop_token_ids, p.ignore_eos) == (None, (), (), False)
    assert (p.n, p.skip_special_tokens) == (1, True)
    assert p.constraint is None and not p.is_greedy and not p.has_penalties


def test_normalization_and_round_trip():
    p = SamplingParams.from_dict(
        {"stop": "\n", "stop_token_ids": [2, 7], "temperature": 0, "top_p": 1, "seed": 42, "max_new_tokens": 5}
    )
    assert p.stop == ("\n",) and p.stop_token_ids == (2, 7)
    assert isinstance(p.temperature, float) and isinstance(p.top_p, float)
    assert p.is_greedy
    d = p.to_dict()
    assert d["stop"] == ["\n"] and d["stop_token_ids"] == [2, 7]
    json.dumps(d)  # plain JSON types only
    assert SamplingParams.from_dict(d) == p
    assert hash(p) == hash(SamplingParams.from_dict(d))  # frozen and hashable


def test_null_values_take_defaults_and_duplicate_stops_collapse():
    p = SamplingParams.from_dict({"temperature": None, "stop": ["a", "b", "a"]})
    assert p.temperature == 1.0 and p.stop == ("a", "b")


def test_top_k_one_is_greedy_and_penalties_flag():
    assert SamplingParams(top_k=1, temperature=0.7).is_greedy
    assert SamplingParams(repetition_penalty=1.1).has_penalties
    assert SamplingParams(presence_penalty=-0.5).has_penalties


def test_frozen():
    p = SamplingParams()
    with pytest.raises(AttributeError):
        p.temperature = 0.5  # type: ignore[misc]


def test_unknown_key_names_it_and_lists_allowed():
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams.from_dict({"temprature": 0.5})
    assert e.value.field == "temprature"
    msg = str(e.value)
    assert "temperature" in msg and "max_new_tokens" in msg and "did you mean" in msg


def test_non_dict_rejected():
    with pytest.raises(InvalidRequestError, match="sampling_params"):
        SamplingParams.from_dict([("temperature", 1.0)])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("temperature", "hot", "number"),
        ("temperature", True, "number"),
        ("max_new_tokens", 1.5, "int"),
        ("max_new_tokens", True, "int"),
        ("max_new_tokens", "10", "int"),
        ("top_k", 2.0, "int"),
        ("n", False, "int"),
        ("seed", 1.0, "int"),
        ("seed", "7", "int"),
        ("ignore_eos", 1, "bool"),
        ("skip_special_tokens", "yes", "bool"),
        ("stop", 3, "str"),
        ("stop", ["ok", 3], "str"),
        ("stop_token_ids", 5, "list"),
        ("stop_token_ids", [1, "2"], "int"),
        ("stop_token_ids", [True], "int"),
        ("regex", 5, "str"),
        ("ebnf", ["root"], "str"),
        ("json_schema", 12, "json_schema"),
    ],
)
def test_wrong_types(key, value, expected):
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams.from_dict({key: value})
    assert e.value.field == key
    assert expected in str(e.value)


@pytest.mark.parametrize(
    "key, value",
    [
        ("max_new_tokens", -1),
        ("min_new_tokens", -1),
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("temperature", float("inf")),
        ("top_p", 0.0),
        ("top_p", 1.01),
        ("top_k", 0),
        ("top_k", -2),
        ("min_p", -0.01),
        ("min_p", 1.5),
        ("frequency_penalty", 2.5),
        ("frequency_penalty", -2.01),
        ("presence_penalty", 3),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("n", 0),
        ("stop_token_ids", [3, -1]),
        ("stop", ""),
        ("stop", ["a", ""]),
        ("regex", ""),
        ("json_schema", "{not json"),
        ("json_schema", "[1, 2]"),
    ],
)
def test_out_of_range(key, value):
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams.from_dict({key: value})
    assert e.value.field == key


@pytest.mark.parametrize(
    "key, value",
    [
        ("top_p", 1.0),
        ("top_p", 1e-6),
        ("top_k", -1),
        ("top_k", 1),
        ("min_p", 1.0),
        ("frequency_penalty", -2.0),
        ("presence_penalty", 2),
        ("repetition_penalty", 1e-3),
        ("max_new_tokens", 0),
        ("seed", -5),
        ("seed", 2**70),
    ],
)
def test_boundaries_accepted(key, value):
    assert getattr(SamplingParams.from_dict({key: value}), key) == value


def test_min_new_tokens_not_above_max():
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams.from_dict({"min_new_tokens": 10, "max_new_tokens": 5})
    assert e.value.field == "min_new_tokens"
    assert SamplingParams.from_dict({"min_new_tokens": 5, "max_new_tokens": 5}).min_new_tokens == 5


def test_direct_construction_is_validated():
    with pytest.raises(InvalidRequestError, match="top_p"):
        SamplingParams(top_p=2.0)
    assert SamplingParams(stop="x").stop == ("x",)


def test_constraints_exclusive_and_carried():
    with pytest.raises(InvalidRequestError, match="at most one"):
        SamplingParams.from_dict({"regex": r"\d+", "ebnf": 'root ::= "a"'})
    assert SamplingParams(regex=r"\d+").constraint == Constraint("regex", r"\d+")
    assert SamplingParams(ebnf='root ::= "a"').constraint == Constraint("ebnf", 'root ::= "a"')


def test_json_schema_forms_normalize_to_str():
    schema = {"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "string"}}}
    from_dict = SamplingParams(json_schema=schema)
    assert isinstance(from_dict.json_schema, str) and json.loads(from_dict.json_schema) == schema
    assert list(json.loads(from_dict.json_schema)["properties"]) == ["b", "a"]  # order kept
    text = json.dumps(schema)
    assert SamplingParams(json_schema=text).json_schema == text
    assert SamplingParams(json_schema="true").constraint == Constraint("json_schema", "true")
    with pytest.raises(InvalidRequestError, match="JSON-serializable"):
        SamplingParams(json_schema={"type": object})


def test_json_schema_from_pydantic_class():
    pydantic = pytest.importorskip("pydantic")

    class Person(pydantic.BaseModel):
        name: str
        age: int

    p = SamplingParams.from_dict({"json_schema": Person})
    parsed = json.loads(p.json_schema)
    assert parsed["properties"]["age"]["type"] == "integer" and set(parsed["required"]) == {"name", "age"}
    with pytest.raises(InvalidRequestError):  # an instance is not a schema
        SamplingParams(json_schema=Person(name="a", age=1))


def test_validate_token_ids():
    p = SamplingParams(stop_token_ids=[0, 99])
    p.validate_token_ids(100)
    with pytest.raises(InvalidRequestError) as e:
        p.validate_token_ids(99)
    assert e.value.field == "stop_token_ids" and "99" in str(e.value)
