"""EngineConfig: validated once at the edge; CLI flags generated from its fields."""

from __future__ import annotations

import argparse

import pytest

from braid.config import EngineConfig, add_cli_args, from_cli_args
from braid.errors import InvalidRequestError


@pytest.mark.parametrize("kwargs, field", [
    ({"max_total_tokens": "lots"}, "max_total_tokens"),
    ({"disable_radix_cache": 1}, "disable_radix_cache"),
    ({"cpu_threads": True}, "cpu_threads"),
    ({"chunked_prefill_size": 0}, "chunked_prefill_size"),
    ({"mem_fraction_static": 1.5}, "mem_fraction_static"),
    ({"context_len": 1}, "context_len"),
])  # fmt: skip
def test_bad_settings_name_the_field(kwargs, field):
    with pytest.raises(InvalidRequestError) as info:
        EngineConfig(**kwargs)
    assert info.value.field == field


def test_config_is_frozen():
    cfg = EngineConfig()
    with pytest.raises(AttributeError):
        cfg.dtype = "float16"


def test_cli_flags_come_from_the_fields():
    parser = argparse.ArgumentParser()
    add_cli_args(parser, EngineConfig)
    args = parser.parse_args(["--max-total-tokens", "512", "--disable-radix-cache", "--mem-fraction-static", "0.5",
                              "--schedule-policy", "fcfs"])
    cfg = from_cli_args(args, EngineConfig)
    assert cfg == EngineConfig(max_total_tokens=512, disable_radix_cache=True, mem_fraction_static=0.5,
                               schedule_policy="fcfs")
    assert from_cli_args(parser.parse_args([]), EngineConfig) == EngineConfig()
