"""What CUDA-graph decode relies on that the CPU can check: the captured sizes, the padding row,
and the decode inputs as host columns. Replays themselves are compared with the eager forward in
tests/gpu/test_cuda_graph.py."""

from __future__ import annotations

import bisect

import pytest
import torch

from braid.config import EngineConfig
from braid.errors import InvalidRequestError
from braid.runtime.batch import build_decode_batch
from braid.runtime import kernels as triton_kernels
from braid.runtime.cuda_graph import DecodeGraphs, capture_sizes, cascade_sizes, stage_columns, static_decode_batch
from braid.runtime.kernels import attention as attention_kernels
from braid.runtime.forward_batch import ForwardMode
from braid.runtime.memory import ReqToTokenPool
from tests.engine_helpers import make_engine_model


@pytest.mark.parametrize("max_batch", [1, 3, 64, 100, 256])
def test_capture_sizes_cover_every_batch_with_bounded_padding(max_batch):
    sizes = capture_sizes(max_batch)
    assert sizes == sorted(set(sizes)) and sizes[0] == 1 and sizes[-1] == max_batch
    for bsz in range(1, max_batch + 1):
        padded = sizes[bisect.bisect_left(sizes, bsz)]
        assert bsz <= padded <= max(bsz + 16, 2 * bsz)


@pytest.mark.parametrize("max_batch", [4, 8, 24, 100, 256])
def test_batches_sharing_a_prefix_replay_cascade_graphs_the_others_plain_ones(max_batch):
    graphs = object.__new__(DecodeGraphs)  # the choice alone: capturing needs CUDA
    graphs.sizes, graphs.cascade_sizes = capture_sizes(max_batch), cascade_sizes(capture_sizes(max_batch), 8)
    assert graphs.cascade_sizes == sorted({s for s in (8, 16, 32, 64, 128, max_batch) if 8 <= s <= max_batch})
    assert cascade_sizes(graphs.sizes, None) == []
    for bsz in range(1, max_batch + 1):
        size, cascade = graphs.graph_for(bsz, shares_prefix=True)
        assert cascade == (bsz <= max_batch and max_batch >= 8) and size >= bsz
        assert size in (graphs.cascade_sizes if cascade else graphs.sizes)
        assert graphs.graph_for(bsz, shares_prefix=False) == (graphs.sizes[bisect.bisect_left(graphs.sizes, bsz)],
                                                               False)  # fmt: skip


def test_padding_row_is_never_handed_out_and_maps_to_the_padding_slot():
    pool = ReqToTokenPool(4, 32, "cpu")
    rows = [pool.allocate() for _ in range(4)]
    assert pool.padding_row not in rows and pool.table.shape == (5, 32)
    for row in rows:
        pool.write(row, 0, torch.arange(1, 33))
    assert pool.table[pool.padding_row].eq(0).all()


def test_decode_batch_from_columns():
    table = torch.arange(3 * 10, dtype=torch.int64).view(3, 10)
    batch = build_decode_batch([[7, 8], [4, 0], [2, 1], [5, 1], [0, 0]], table, torch.device("cpu"))
    assert batch.mode is ForwardMode.DECODE and batch.batch_size == 2
    assert batch.out_slots.tolist() == [24, 10]  # table[row, position]
    assert batch.seq_lens_cpu == [5, 1] and batch.prefix_lens_cpu == [4, 0] and batch.extend_lens_cpu == [1, 1]
    assert batch.logits_rows.tolist() == [0, 1] and batch.decode_max_keys is None
    assert batch.shared_lens is None and batch.shared_lens_cpu is None  # nothing shared: no cascade
    shared = build_decode_batch([[7, 8], [4, 3], [2, 1], [5, 4], [3, 3]], table, torch.device("cpu"))
    assert shared.shared_lens.tolist() == shared.shared_lens_cpu == [3, 3]


def test_config_flags():
    assert EngineConfig().disable_cuda_graph is False
    with pytest.raises(InvalidRequestError, match="cuda_graph_max_bs"):
        EngineConfig(cuda_graph_max_bs=0)


def test_no_graphs_on_cpu(tmp_path):
    import braid as bd

    folder = make_engine_model("llama", tmp_path)
    with bd.Engine(model_path=folder, max_total_tokens=512, cpu_threads=1) as eng:
        assert eng.runner.graphs is None
        out = eng.generate(input_ids=[[5, 6, 7], [9, 10]], sampling_params={"max_new_tokens": 3, "ignore_eos": True})
        assert [len(o["output_ids"]) for o in out] == [3, 3]


@pytest.mark.skipif(triton_kernels.triton is None, reason="needs triton")
@pytest.mark.parametrize("arch", ["llama3", "qwen3"])
def test_the_batch_a_graph_runs_matches_the_eager_decode_batch(monkeypatch, tmp_path, arch):
    """What a graph replay computes, run eagerly through the Triton kernels (interpreted): the
    static batch with padding rows, attention sized for the whole context and cascade
    attention's prefix pass, against the eager decode batch without cascade, on random KV
    contents and scattered request tables where all but one request share a prefix."""
    import braid as bd

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(attention_kernels, "num_sms", lambda device: 132)  # a GPU's worth of splits
    folder = make_engine_model(arch, tmp_path, num_hidden_layers=2, max_position_embeddings=1024)
    with bd.Engine(model_path=folder, device="cpu", attention_backend="triton", dtype="float32",
                   max_total_tokens=2048, max_running_requests=8, cpu_threads=1) as eng:
        runner, pool = eng.runner, eng.scheduler.kv.req_pool
        gen = torch.Generator().manual_seed(5)
        for buf in (*runner.kv.k, *runner.kv.v):
            buf[1:].normal_(generator=gen)
        block = torch.zeros(5, 8, dtype=torch.int64)
        for bsz in (1, 3, 5):
            size = capture_sizes(8)[bisect.bisect_left(capture_sizes(8), bsz)]
            rows = torch.randperm(pool.max_requests, generator=gen)[:bsz].tolist()
            lens = torch.randint(40, 300, (bsz,), generator=gen).tolist()
            prefix = torch.randperm(runner.kv.num_slots, generator=gen)[:39] + 1
            shared = [39] * (bsz - 1) + [0] if bsz > 1 else [0]
            for row, n, s in zip(rows, lens, shared):
                pool.table[row, :n] = torch.randperm(runner.kv.num_slots, generator=gen)[:n] + 1
                pool.table[row, :s] = prefix[:s]
            columns = [torch.randint(0, runner.info.vocab_size, (bsz,), generator=gen).tolist(),
                       [n - 1 for n in lens], rows, lens, shared]
            stage_columns(block[:, :size], columns, pool.padding_row)
            static = runner.forward(static_decode_batch(block, torch.arange(8), pool.table, size, 1024, cascade=True))
            eager = runner.forward(build_decode_batch(columns[:4] + [[0] * bsz], pool.table, runner.device))
            assert static.shape == (size, runner.info.vocab_size)
            assert size > bsz or bsz == 1  # padding rows ran beside the real ones
            torch.testing.assert_close(static[:bsz], eager, atol=2e-5, rtol=2e-5)
        pool.table.zero_()
