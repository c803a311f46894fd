"""Tensor parallelism on GPUs (NCCL, one process per GPU): TP=2 against TP=1 through the Engine.
Skipped with fewer than two GPUs. (The CPU tier, tests/unit/test_tensor_parallel.py, covers every
architecture over gloo.)"""

from __future__ import annotations

import pytest
import torch

import braid as bd
from tests.engine_helpers import make_engine_model, random_prompts

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")

GREEDY = {"max_new_tokens": 16, "temperature": 0.0, "ignore_eos": True}


def _run(folder: str, prompts: list[list[int]], **kwargs) -> list[dict]:
    with bd.Engine(model_path=folder, device="cuda", max_total_tokens=8192, **kwargs) as eng:
        return eng.generate(input_ids=prompts, sampling_params=GREEDY, return_logprob=True)


@pytest.mark.parametrize("arch", ["llama_tied", "qwen2", "qwen3"])  # o_proj bias; 1 KV head (replicated); q/k norm
def test_tp2_matches_tp1_float32(arch, tmp_path):
    folder = make_engine_model(arch, tmp_path)
    prompts = random_prompts(6, 3, 40, 500, seed=1)
    ref = _run(folder, prompts, dtype="float32")
    got = _run(folder, prompts, dtype="float32", tp_size=2)
    for a, b in zip(got, ref):
        assert a["output_ids"] == b["output_ids"]
        lp_a = torch.tensor([x[0] for x in a["meta_info"]["output_token_logprobs"]])
        lp_b = torch.tensor([x[0] for x in b["meta_info"]["output_token_logprobs"]])
        torch.testing.assert_close(lp_a, lp_b, atol=1e-3, rtol=1e-3)


def test_tp2_runs_in_bfloat16_and_twice(tmp_path):
    folder = make_engine_model("llama", tmp_path)
    prompts = random_prompts(4, 3, 40, 500, seed=2)
    first = _run(folder, prompts, dtype="bfloat16", tp_size=2)
    second = _run(folder, prompts, dtype="bfloat16", tp_size=2)  # a second group in the same process
    assert [o["output_ids"] for o in first] == [o["output_ids"] for o in second]
    assert all(len(o["output_ids"]) == GREEDY["max_new_tokens"] for o in first)
