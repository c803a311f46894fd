"""Tensor parallelism on the CPU: gloo, one process per rank, all on 127.0.0.1.

TP=2 (TP=3 for the default model, whose 9 heads do not split in two) against TP=1: logits equal
up to float32 rounding (the row-parallel layers sum their partial products in another order) and
identical greedy tokens, for every architecture preset; through the Engine; and with the ranks
launched as two "nodes" (``braid serve --nnodes 2 --node-rank 1`` in a subprocess).
Every process and wait is bounded by a timeout.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from braid.config import EngineConfig, add_cli_args, from_cli_args
from braid.errors import InvalidRequestError, RequestFailedError
from braid.runtime import kernels
from braid.net import free_port
from braid.runtime.distributed import SINGLE, TPGroup
from braid.runtime.layers.linear import Shard, head_shard
from braid.runtime.loader import load_model
from tests.conftest import assert_at_rest
from tests.engine_helpers import make_engine_model
from tests.helpers import PRESETS, bare_forward, make_random_model

JOIN_TIMEOUT = 120  # seconds any spawned rank or subprocess may take
# Model-level cases: every preset, plus a vocabulary that does not split evenly (padded shards)
# with tied embeddings. qwen2 has one KV head: replicated on both ranks.
CASES = {arch: (arch, {}) for arch in sorted(PRESETS)} | {"tied_odd_vocab": ("llama_tied", {"vocab_size": 301})}
PROMPTS = [[3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46], [26, 43, 38, 32, 79], [50, 28, 84, 19, 71, 69, 39]]
STEPS = 6
GREEDY = {"max_new_tokens": 8, "temperature": 0.0, "ignore_eos": True}


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, str]:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("tp_models")
    return {name: make_random_model(arch, root / name, **over) for name, (arch, over) in CASES.items()}


def _runs(folders: dict[str, str], tp: TPGroup = SINGLE) -> dict:
    """The scheduler-free harness (chunked extend, batched decode) on every model with the torch
    attention, and on qwen3 with the Triton kernels too (interpreted: fewer tokens)."""
    runs = {}
    for name, folder in folders.items():
        model, info = load_model(folder, "float32", "cpu", tp)
        runs[name] = bare_forward(model, info, PROMPTS, STEPS, chunk_size=4)
        if name == "qwen3" and kernels.triton is not None:
            runs["qwen3/triton"] = bare_forward(model, info, PROMPTS[2:], 1, chunk_size=4, attn="triton")
    return runs


def _rank_main(rank: int, size: int, init_addr: str, folders: dict[str, str], out: str) -> None:
    """One rank of the model-level comparison, in lockstep with the others."""
    torch.set_num_threads(1)
    tp = TPGroup.init(EngineConfig(tp_size=size), rank, torch.device("cpu"), init_addr)
    try:
        runs = _runs(folders, tp)
        if rank == 0:
            torch.save(runs, out)
    finally:
        tp.destroy()


def _spawn_ranks(size: int, folders: dict[str, str], out: str) -> None:
    ctx = mp.get_context("spawn")
    addr = f"127.0.0.1:{free_port()}"
    procs = [ctx.Process(target=_rank_main, args=(r, size, addr, folders, out), daemon=True) for r in range(size)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + JOIN_TIMEOUT
    for p in procs:
        p.join(max(1.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0] * size, "a rank failed (its traceback is in the captured stderr)"


def test_every_architecture_tp2_matches_tp1(folders, tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # read at each launch; the ranks inherit it
    out = str(tmp_path / "tp2.pt")
    _spawn_ranks(2, folders, out)
    tp2 = torch.load(out, weights_only=False)
    refs = _runs(folders)
    assert tp2.keys() == refs.keys()
    for name, ref in refs.items():
        got = tp2[name]
        assert got.tokens == ref.tokens, name
        for i in range(len(ref.tokens)):
            torch.testing.assert_close(got.sequence_logits(i), ref.sequence_logits(i), rtol=1e-4, atol=1e-4,
                                       msg=lambda m, name=name: f"{name}: {m}")  # fmt: skip
        assert len(set(ref.tokens[0])) > 1, f"{name}: degenerate model"


def _assert_same_outputs(got: list[dict], ref: list[dict]) -> None:
    for a, b in zip(got, ref):
        assert a["output_ids"] == b["output_ids"]
        lp_a = torch.tensor([x[0] for x in a["meta_info"]["output_token_logprobs"]])
        lp_b = torch.tensor([x[0] for x in b["meta_info"]["output_token_logprobs"]])
        torch.testing.assert_close(lp_a, lp_b, rtol=1e-4, atol=1e-4)


def _generate(model_path: str, prompts: list[list[int]], **kwargs) -> list[dict]:
    """Greedy outputs with logprobs; with TP, also checks that shutdown stopped the workers cleanly."""
    import braid as bd

    with bd.Engine(model_path=model_path, cpu_threads=1, max_total_tokens=2048, **kwargs) as eng:
        out = eng.generate(input_ids=prompts, sampling_params=GREEDY, return_logprob=True)
        assert_at_rest(eng)
        workers = eng._tp_workers.procs if eng._tp_workers else []
    assert [p.exitcode for p in workers] == [0] * len(workers)
    assert not dist.is_initialized()
    return out


@pytest.fixture(scope="module")
def engine_model(tmp_path_factory) -> str:
    torch.set_num_threads(1)
    return make_engine_model("llama_tied", tmp_path_factory.mktemp("tp_engine"))


def test_engine_tp2_matches_tp1_then_a_dead_worker_fails_requests(engine_model):
    import braid as bd

    ref = _generate(engine_model, PROMPTS)
    eng = bd.Engine(model_path=engine_model, tp_size=2, cpu_threads=1, max_total_tokens=2048)
    try:
        _assert_same_outputs(eng.generate(input_ids=PROMPTS, sampling_params=GREEDY, return_logprob=True), ref)
        # a second round finds the prompts in the radix cache: rows rewritten by rank 0 reach rank 1
        _assert_same_outputs(eng.generate(input_ids=PROMPTS, sampling_params=GREEDY, return_logprob=True), ref)
        assert_at_rest(eng)
        [worker] = eng._tp_workers.procs
        os.kill(worker.pid, signal.SIGKILL)
        worker.join(10)
        assert not eng.is_alive
        start = time.monotonic()
        with pytest.raises(RequestFailedError):
            eng.generate(input_ids=[1, 2, 3], sampling_params=GREEDY)
        assert time.monotonic() - start < 30, "rank 0 waited on a dead worker"
    finally:
        start = time.monotonic()
        eng.shutdown()
        assert time.monotonic() - start < 30


@pytest.mark.slow
def test_default_model_tp3_matches_tp1_and_tp2_names_the_heads(smollm2_hf_dir):
    import braid as bd

    prompts = [[1, 504, 3458, 282, 4649, 314, 216], [1, 9690, 198, 2683, 359]]
    ref = _generate(smollm2_hf_dir, prompts)
    _assert_same_outputs(_generate(smollm2_hf_dir, prompts, tp_size=3), ref)  # 2 workers, stopped cleanly
    with pytest.raises(InvalidRequestError, match="9 attention heads") as e:
        bd.Engine(model_path=smollm2_hf_dir, tp_size=2, cpu_threads=1)
    assert e.value.field == "tp_size"


def test_two_nodes_on_loopback(engine_model):
    import braid as bd

    ref = _generate(engine_model, PROMPTS)
    addr = f"127.0.0.1:{free_port()}"
    node1 = subprocess.Popen(
        [sys.executable, "-m", "braid.cli", "serve", "--model-path", engine_model, "--tp", "2", "--nnodes", "2",
         "--node-rank", "1", "--dist-init-addr", addr, "--cpu-threads", "1", "--max-total-tokens", "2048"],
        cwd=Path(__file__).resolve().parents[2], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        with bd.Engine(model_path=engine_model, tp_size=2, nnodes=2, node_rank=0, dist_init_addr=addr,
                       cpu_threads=1, max_total_tokens=2048) as eng:  # fmt: skip
            assert eng._tp_workers.procs == []  # this node holds rank 0 only
            _assert_same_outputs(eng.generate(input_ids=PROMPTS, sampling_params=GREEDY, return_logprob=True), ref)
        log, _ = node1.communicate(timeout=JOIN_TIMEOUT)
        assert node1.returncode == 0, log
    finally:
        if node1.poll() is None:
            node1.kill()
            node1.wait(10)


# ---- pieces without processes ----------------------------------------------------------------------
def test_config_validation():
    bad = [
        ({"tp_size": 0}, "tp_size"), ({"nnodes": 0}, "nnodes"), ({"tp_size": 3, "nnodes": 2, "dist_init_addr": "h:1"},
        "tp_size"), ({"node_rank": 1}, "node_rank"), ({"tp_size": 2, "nnodes": 2}, "dist_init_addr"),
        ({"dist_init_addr": "no-port"}, "dist_init_addr"),
    ]  # fmt: skip
    for kwargs, field in bad:
        with pytest.raises(InvalidRequestError) as e:
            EngineConfig(**kwargs)
        assert e.value.field == field, kwargs
    EngineConfig(tp_size=4, nnodes=2, node_rank=1, dist_init_addr="10.0.0.1:5000")


def test_cli_flags():
    parser = argparse.ArgumentParser()
    add_cli_args(parser, EngineConfig)
    args = parser.parse_args(["--tp", "2", "--nnodes", "2", "--node-rank", "1", "--dist-init-addr", "h:9"])
    config = from_cli_args(args, EngineConfig)
    assert (config.tp_size, config.nnodes, config.node_rank, config.dist_init_addr) == (2, 2, 1, "h:9")
    assert from_cli_args(parser.parse_args(["--tp-size", "4"]), EngineConfig).tp_size == 4


def test_heads_per_rank():
    four = [TPGroup(r, 4) for r in range(4)]
    assert [head_shard(8, 2, tp) for tp in four] == [Shard(16, 4, r) for r in range(4)]  # 2 heads each
    assert [head_shard(2, 2, tp).index for tp in four] == [0, 0, 1, 1]  # KV heads replicated in pairs
    assert head_shard(3, 5, SINGLE) == Shard(15)


def test_tp_size_that_does_not_divide_the_model_is_named(folders):
    tp = TPGroup(0, 3)  # no process group is needed to fail at construction
    with pytest.raises(InvalidRequestError, match="4 attention heads") as e:
        load_model(folders["llama"], "float32", "cpu", tp)
    assert e.value.field == "tp_size"
