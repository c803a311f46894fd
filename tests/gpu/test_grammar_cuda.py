"""Constrained decoding on CUDA: masks applied to device logits, jump-forward extends, many
constrained and unconstrained rows in one batch. Skipped without CUDA."""

from __future__ import annotations

import json
import re

import pytest
import torch

import braid as bd
from braid.runtime.sampling_params import SamplingParams
from tests.engine_helpers import make_engine_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

SCHEMA = {"type": "object", "properties": {"a": {"enum": ["x", "y"]}, "b": {"type": "integer", "minimum": 0,
                                                                               "maximum": 9}},
          "required": ["a", "b"], "additionalProperties": False}


def test_cuda_constrained_batch(tmp_path):
    folder = make_engine_model("llama", tmp_path)
    regex = r"[a-c]{2}-\d{2}"
    params = ([{"temperature": 1.0, "seed": s, "max_new_tokens": 40, "regex": regex} for s in range(16)]
              + [{"temperature": 1.0, "seed": s, "max_new_tokens": 40, "json_schema": SCHEMA} for s in range(16)]
              + [{"temperature": 1.0, "seed": s, "max_new_tokens": 8, "ignore_eos": True} for s in range(16)])
    with bd.Engine(model_path=folder, device="cuda", dtype="bfloat16") as eng:
        outs = eng.generate(prompt=["The quick brown"] * len(params), sampling_params=params)
        stats = eng.get_stats()
    assert stats["at_rest_error"] is None
    for o in outs[:16]:
        assert re.fullmatch(regex, o["text"]), o["text"]
    for o in outs[16:32]:
        assert o["meta_info"]["valid"], o
        assert set(json.loads(o["text"])) == {"a", "b"}
    assert all(len(o["output_ids"]) == 8 for o in outs[32:])


def test_masks_are_built_in_pinned_memory(tmp_path):
    """The step's bitmask is filled in pinned memory on the mask thread, so the main thread
    queues its copy without first copying it on the host (memory.to_device)."""
    folder = make_engine_model("llama", tmp_path)
    with bd.Engine(model_path=folder, device="cuda", dtype="bfloat16") as eng:
        params = {"temperature": 0, "max_new_tokens": 40, "json_schema": SCHEMA}
        assert eng.generate(prompt="x", sampling_params=params)["meta_info"]["valid"]
        constraints = eng.constraints
        parsed = SamplingParams.from_dict(params)
        req = type("Req", (), {"matcher": constraints.matcher(parsed), "params": parsed})()
        _, rows, bitmask = constraints._build_masks([req])
    assert constraints.pin_masks and rows == [0]
    assert bitmask.is_pinned()
