"""The engine on CUDA: same greedy tokens as transformers on the same random weights, batched
and chunked, in float32 and bfloat16. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

import braid as bd
from tests.engine_helpers import hf_greedy, make_engine_model, random_prompts
from tests.helpers import load_hf

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("arch", ["llama3", "qwen3"])
def test_cuda_float32_matches_transformers(arch, tmp_path):
    folder = make_engine_model(arch, tmp_path)
    hf = load_hf(folder)
    prompts = random_prompts(6, 5, 120, hf.config.vocab_size, seed=11)
    with bd.Engine(model_path=folder, device="cuda", dtype="float32", chunked_prefill_size=64) as eng:
        outs = eng.generate(input_ids=prompts, sampling_params={"temperature": 0, "ignore_eos": True,
                                                                "max_new_tokens": 10}, return_logprob=True)
        stats = eng.get_stats()
    assert stats["at_rest_error"] is None
    for p, o in zip(prompts, outs):
        ref, ref_lp = hf_greedy(hf, p, 10)
        assert o["output_ids"] == ref
        assert max(abs(a[0] - b) for a, b in zip(o["meta_info"]["output_token_logprobs"], ref_lp)) < 1e-3


def test_cuda_bfloat16_runs_many_requests(tmp_path):
    folder = make_engine_model("llama", tmp_path)
    prompts = random_prompts(64, 10, 200, 512, seed=12)
    with bd.Engine(model_path=folder, device="cuda", dtype="bfloat16", max_total_tokens=2048) as eng:
        outs = eng.generate(input_ids=prompts, sampling_params={"temperature": 0, "ignore_eos": True,
                                                                "max_new_tokens": 16})
        stats = eng.get_stats()
    assert all(len(o["output_ids"]) == 16 for o in outs)
    assert stats["at_rest_error"] is None and stats["retractions"] > 0
