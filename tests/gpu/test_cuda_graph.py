"""Decode under CUDA graphs against the eager forward (the reference): logits on fresh random
KV contents and request tables at captured and padded batch sizes, and whole greedy runs whose
batch shrinks through graph sizes and past the largest one; capture on reused (poisoned)
memory; and an overlapped decode step that never waits for the GPU. Skipped without CUDA."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch

import braid as bd
from braid.runtime.batch import build_decode_batch
from tests.engine_helpers import make_engine_model, random_prompts

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "maximum": 999}}, "required": ["name", "age"]}


@pytest.mark.parametrize("arch", ["llama3", "qwen3"])
def test_replay_matches_eager_on_random_state(arch, tmp_path):
    folder = make_engine_model(arch, tmp_path, max_position_embeddings=4096)  # sequences of 1,500 keys
    with bd.Engine(model_path=folder, device="cuda", dtype="float32", max_running_requests=24,
                   max_total_tokens=8192, context_len=2048) as eng:
        runner, table = eng.runner, eng.scheduler.kv.req_pool.table
        graphs = runner.graphs
        assert graphs is not None and graphs.max_batch == 24 and 13 not in graphs.sizes
        gen = torch.Generator(device="cuda").manual_seed(5)
        for buf in (*runner.kv.k, *runner.kv.v):  # fresh random K/V everywhere but the padding slot
            buf[1:].normal_(generator=gen)
        cpu = torch.Generator().manual_seed(6)
        vocab = runner.info.vocab_size
        assert graphs.cascade_sizes == [8, 16, 24]  # batches of 8+ that share a prefix replay these
        for bsz in (1, 3, 8, 13, 24):
            rows = torch.randperm(table.shape[0] - 1, generator=cpu)[:bsz].tolist()
            lens = torch.randint(700, 1500, (bsz,), generator=cpu).tolist()
            # all but the last request share a prefix of 600 slots (read once by the cascade graphs)
            shared = [600] * (bsz - 1) + [0] if bsz > 1 else [0]
            prefix = torch.randperm(runner.kv.num_slots, generator=cpu)[:600].cuda() + 1
            for row, n, s in zip(rows, lens, shared):  # scattered slots, as a long-running pool has them
                table[row, :n] = torch.randperm(runner.kv.num_slots, generator=cpu)[:n].cuda() + 1
                table[row, :s] = prefix[:s]
            columns = [torch.randint(0, vocab, (bsz,), generator=cpu).tolist(), [n - 1 for n in lens], rows, lens]
            replayed = graphs.replay(columns + [shared]).clone()
            eager = runner.forward(build_decode_batch(columns + [[0] * bsz], table, runner.device))
            assert replayed.shape == eager.shape == (bsz, vocab)
            torch.testing.assert_close(replayed, eager, atol=2e-4, rtol=1e-4)
        table.zero_()


def test_greedy_tokens_same_with_and_without_graphs(tmp_path):
    folder = make_engine_model("llama", tmp_path, max_position_embeddings=2048)
    system = random_prompts(1, 1000, 1000, 512, seed=20)[0]  # cascade: 1,000 shared tokens under 9 of 10
    prompts = [system + p for p in random_prompts(9, 5, 90, 512, seed=21)] + random_prompts(1, 5, 90, 512, seed=22)
    params = [{"temperature": 0, "ignore_eos": True, "max_new_tokens": 4 + 3 * i} for i in range(10)]
    results = {}
    for disabled in (False, True):
        # 10 requests, graphs up to 8: eager (cascade) until 2 finish, then the cascade graph of 8
        # at every size while two or more requests share the prefix, the plain graphs after that
        with bd.Engine(model_path=folder, device="cuda", dtype="float32", cuda_graph_max_bs=8,
                       disable_cuda_graph=disabled, disable_cascade_attention=disabled) as eng:
            graphs = eng.runner.graphs
            assert graphs is None if disabled else graphs.cascade_sizes == [8]
            results[disabled] = [o["output_ids"] for o in eng.generate(input_ids=prompts, sampling_params=params)]
            assert eng.get_stats()["at_rest_error"] is None
    assert results[False] == results[True]
    assert [len(t) for t in results[False]] == [4 + 3 * i for i in range(10)]


def test_capture_sees_its_padded_inputs_on_reused_memory(tmp_path):
    """Capture warms up on a side stream, which must wait for the padding copied into the input
    buffers on the main stream. A missed wait read whatever the allocator's block held before:
    fresh memory (zeros) hid it, and an engine made after another failed with an index out of
    bounds. Here freed small blocks full of huge ids wait for the next engine's buffers."""
    folder = make_engine_model("llama", tmp_path)
    prompts = random_prompts(3, 5, 40, 512, seed=23)
    params = {"temperature": 0, "ignore_eos": True, "max_new_tokens": 6}
    outs = []
    for _ in range(3):
        junk = [torch.full((32768,), 1 << 40, dtype=torch.int64, device="cuda") for _ in range(64)]
        del junk
        with bd.Engine(model_path=folder, device="cuda", dtype="float32", cuda_graph_max_bs=8) as eng:
            outs.append([o["output_ids"] for o in eng.generate(input_ids=prompts, sampling_params=params)])
            assert eng.get_stats()["at_rest_error"] is None
    assert outs[0] == outs[1] == outs[2]


def strictly(fn, before=lambda: None):
    """``fn`` run under CUDA's sync-debug mode set to error: any wait for the GPU inside raises.
    ``before()`` runs first, outside the check."""

    def checked(*args):
        before()
        torch.cuda.set_sync_debug_mode("error")
        try:
            return fn(*args)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    return checked


@contextlib.contextmanager
def taking_tokens_may_wait():
    """Let ``InFlight.token_list``, the one wait that belongs in an overlapped pass, through the
    check (it is also called outside checked passes: the mode is restored, not forced)."""
    from braid.runtime import scheduler as sched

    take = sched.InFlight.token_list

    def allowed_take(self):
        mode = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("default")
        try:
            return take(self)
        finally:
            torch.cuda.set_sync_debug_mode(mode)

    sched.InFlight.token_list = allowed_take
    try:
        yield
    finally:
        sched.InFlight.token_list = take


@pytest.mark.parametrize("disable_cuda_graph", [False, True])
def test_an_overlapped_decode_step_never_waits_for_the_gpu(disable_cuda_graph, tmp_path):
    """Launching step k+1 (KV slots, inputs, the forward, sampling) must not wait for step k: a
    copy from pageable memory, ``.item()`` or ``.tolist()`` there would leave the GPU idle while
    the host launches. CUDA's sync debug mode turns any such wait into an error; the one wait
    that belongs there (taking step k's tokens, after step k+1 is queued) is let through. One
    request is JSON-constrained: its grammar mask goes to the device in the step too."""
    folder = make_engine_model("llama", tmp_path)
    prompts = random_prompts(5, 5, 60, 512, seed=22)
    params = [{"temperature": 0, "ignore_eos": True, "max_new_tokens": 24},
              {"temperature": 0.8, "top_p": 0.9, "top_k": 20, "seed": 1, "ignore_eos": True, "max_new_tokens": 24},
              {"temperature": 1.0, "min_p": 0.05, "frequency_penalty": 0.5, "ignore_eos": True, "max_new_tokens": 24},
              {"temperature": 0, "repetition_penalty": 1.2, "ignore_eos": True, "max_new_tokens": 24},
              {"temperature": 1.0, "seed": 2, "max_new_tokens": 40, "json_schema": json.dumps(SCHEMA)}]
    with bd.Engine(model_path=folder, device="cuda", dtype="float32", disable_cuda_graph=disable_cuda_graph) as eng:
        eng.generate(input_ids=prompts[:1], sampling_params=params[0])  # capture and compile outside the check
        s = eng.scheduler
        assert s.overlap
        checked = []
        s._run_decode_overlapped = strictly(s._run_decode_overlapped, lambda: checked.append(1))
        with taking_tokens_may_wait():
            outs = eng.generate(input_ids=prompts, sampling_params=params)
        assert len(checked) > 15
        assert [len(o["output_ids"]) for o in outs[:4]] == [24] * 4
        assert outs[4]["meta_info"]["valid"] or outs[4]["meta_info"]["finish_reason"]["type"] == "length"
        assert eng.get_stats()["at_rest_error"] is None


def test_an_overlapped_extend_never_waits_for_the_gpu(tmp_path):
    """Chunked prefills with the previous extend's first tokens in flight: scheduling and
    launching extend k+1 must not wait for extend k (sync debug mode, as for decode above); the
    one wait that belongs there (taking extend k's first tokens, after extend k+1 is queued) is
    let through. The outputs equal those of the scheduler without overlap."""
    folder = make_engine_model("llama", tmp_path)
    prompts = random_prompts(6, 60, 120, 512, seed=23)
    params = {"temperature": 0, "ignore_eos": True, "max_new_tokens": 8}
    outs = {}
    for overlap in (False, True):
        with bd.Engine(model_path=folder, device="cuda", dtype="float32", chunked_prefill_size=96,
                       disable_overlap_schedule=not overlap) as eng:  # fmt: skip
            eng.generate(input_ids=prompts[:1], sampling_params=params)  # capture and compile outside the check
            eng.flush_cache()
            s, checked = eng.scheduler, []
            if overlap:  # each extend checked; noted: whether it started with first tokens in flight
                s._run_extend = strictly(s._run_extend, lambda s=s, c=checked: c.append(s.joining is not None))
            with taking_tokens_may_wait():
                outs[overlap] = [o["output_ids"] for o in eng.generate(input_ids=prompts, sampling_params=params)]
            if overlap:
                assert sum(checked) >= 3, checked  # extends launched with first tokens in flight
            assert eng.get_stats()["at_rest_error"] is None
    assert outs[True] == outs[False]
