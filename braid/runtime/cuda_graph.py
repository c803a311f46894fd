"""CUDA graphs for decode: one captured forward per batch-size bucket, replayed with new inputs.

A decode step of a large model is hundreds of small kernel launches; at small batch sizes the
CPU cannot launch them as fast as the GPU runs them. Capturing the whole decode forward once
per batch size and replaying it costs one launch per step.

What makes a decode forward capturable (and what this module relies on):

- Inputs live in static buffers (:class:`DecodeInputs`): token ids, positions, request rows,
  sequence lengths and shared-prefix lengths are copied in before each replay, one
  host-to-device copy for all five. The new tokens' KV slots are gathered inside the graph from
  the request table.
- A batch of ``b`` requests replays the graph of the smallest captured size ``>= b``; the
  padding rows point at the table's padding row (all zeros: position 0 is KV slot 0, the pool's
  padding slot), so they write their K/V to slot 0 and read only it. Their logits are dropped.
- The decode attention kernel sizes its launch for the longest sequence the graph may ever
  see (``ForwardBatch.decode_max_keys`` = the context length); each split finds its key range
  from the sequence length on the device, so the same launch is right for every replay.
- Cascade attention: a second set of graphs, at the power-of-two sizes from
  ``cascade_min_batch`` up (and the largest size; :func:`cascade_sizes`), is captured with the
  prefix pass, sized like the decode launch for prefixes up to the context length. A batch that
  shares a prefix replays the smallest of them that fits it (padding rows cost little in
  decode); a batch that shares nothing replays the plain graphs, so it pays no empty pass and
  no extra reduce. Fewer sizes keep the extra logits buffers and capture time small.
- Only the triton attention backend qualifies: the torch reference pads to host-known lengths.

Graphs share one memory pool and are captured largest first, so the smaller ones reuse its
blocks. The logits of a replay are a view of the graph's output: valid until the next replay.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Callable

import torch

from braid.runtime.forward_batch import ForwardBatch, ForwardMode

log = logging.getLogger("braid.cuda_graph")

# Batch sizes captured by default, cut at the configured maximum. Dense where most decode
# batches are, spaced by 16 above 64 (padding at most 16 rows there).
DEFAULT_SIZES = (1, 2, 4, 8, 12, 16, 24, 32, 40, 48, 56, 64, *range(80, 513, 16))


def capture_sizes(max_batch: int) -> list[int]:
    """The captured batch sizes: the defaults up to ``max_batch``, and ``max_batch`` itself."""
    sizes = [s for s in DEFAULT_SIZES if s < max_batch]
    return [*sizes, max_batch]


def cascade_sizes(sizes: list[int], min_batch: int | None) -> list[int]:
    """The captured sizes that also get a cascade-attention graph: powers of two from
    ``min_batch`` up, and the largest size (None: none)."""
    if min_batch is None:
        return []
    picked = [s for s in sizes if s >= min_batch and s & (s - 1) == 0]
    return picked + [sizes[-1]] if sizes[-1] >= min_batch and sizes[-1] not in picked else picked


def stage_columns(stage: torch.Tensor, columns: list[list[int]], padding_row: int) -> None:
    """Write one decode batch's host columns into ``stage`` ``(5, padded)``; the rows past the
    batch become padding rows: token 0 at position 0 of the padding row, one key, none shared."""
    bsz = len(columns[0])
    stage[:, :bsz] = torch.tensor(columns, dtype=torch.int64)
    if stage.shape[1] > bsz:
        stage[:, bsz:] = torch.tensor([[0], [0], [padding_row], [1], [0]], dtype=torch.int64)


def static_decode_batch(block: torch.Tensor, logits_rows: torch.Tensor, table: torch.Tensor, size: int,
                        max_keys: int, cascade: bool = False) -> ForwardBatch:  # fmt: skip
    """The ForwardBatch a graph of ``size`` rows runs: views of the input ``block`` (token ids,
    positions, rows, lengths, shared lengths), the new tokens' KV slots gathered from the
    request ``table``, and attention sized for ``max_keys`` keys; with ``cascade``, the prefix
    pass of cascade attention reads the shared lengths."""
    ids, positions, rows, seq_lens, shared = (block[c, :size] for c in range(DecodeInputs.COLUMNS))
    return ForwardBatch(
        mode=ForwardMode.DECODE, input_ids=ids, positions=positions, out_slots=table[rows, positions],
        req_rows=rows, seq_lens=seq_lens, prefix_lens_cpu=[0] * size, extend_lens_cpu=[1] * size,
        seq_lens_cpu=[1] * size, logits_rows=logits_rows[:size], req_to_token=table, decode_max_keys=max_keys,
        shared_lens=shared if cascade else None,
    )  # fmt: skip


class DecodeInputs:
    """Static device buffers a captured decode reads, and a pinned host staging block."""

    COLUMNS = 5  # token ids, positions, request rows, sequence lengths, shared-prefix lengths

    def __init__(self, max_batch: int, device: torch.device) -> None:
        self.block = torch.zeros(self.COLUMNS, max_batch, dtype=torch.int64, device=device)
        # Two staging blocks, used in turn: with the overlap scheduler the next step is loaded
        # before this step's copy is known to have run, so a block is rewritten only after the
        # copy that read it (its event) is done.
        self.staging = [torch.zeros(self.COLUMNS, max_batch, dtype=torch.int64, pin_memory=True) for _ in range(2)]
        self.copied: list[torch.cuda.Event | None] = [None, None]
        self.turn = 0
        self.logits_rows = torch.arange(max_batch, dtype=torch.int64, device=device)

    def load(self, columns: list[list[int]], padded: int, padding_row: int, input_ids: torch.Tensor | None) -> None:
        """Copy one decode batch's host columns into the buffers, padded to ``padded`` rows;
        ``input_ids`` (on the device) replaces the token-id column when given."""
        bsz = len(columns[0])
        self.turn ^= 1
        if self.copied[self.turn] is not None:
            self.copied[self.turn].synchronize()
        stage = self.staging[self.turn][:, :padded]
        stage_columns(stage, columns, padding_row)
        self.block[:, :padded].copy_(stage, non_blocking=True)  # ordered before the replay (same stream)
        self.copied[self.turn] = torch.cuda.Event()
        self.copied[self.turn].record()
        if input_ids is not None:
            self.block[0, :bsz].copy_(input_ids)


class DecodeGraphs:
    """Captured decode forwards for the sizes of :func:`capture_sizes`, and with cascade
    attention's prefix pass for the sizes of :func:`cascade_sizes`.

    ``forward(batch)`` is the model's eager forward; it must only launch device work (no host
    sync) for a DECODE batch. ``table`` is the request table every replay reads; ``max_keys``
    is the longest sequence a request may reach (the context length). ``cascade_min_batch``:
    the smallest cascade graph (None: no cascade graphs)."""

    def __init__(
        self,
        forward: Callable[[ForwardBatch], torch.Tensor],
        table: torch.Tensor,
        padding_row: int,
        max_keys: int,
        max_batch: int,
        device: torch.device,
        cascade_min_batch: int | None = None,
    ) -> None:
        self.forward = forward
        self.table = table
        self.padding_row = padding_row
        self.max_keys = max_keys
        self.sizes = capture_sizes(max_batch)
        self.cascade_sizes = cascade_sizes(self.sizes, cascade_min_batch)
        self.inputs = DecodeInputs(self.sizes[-1], device)
        self.graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph] = {}  # (size, cascade) -> graph
        self.outputs: dict[tuple[int, bool], torch.Tensor] = {}
        self.capture_seconds = 0.0
        self._capture_all(device)

    @property
    def max_batch(self) -> int:
        return self.sizes[-1]

    def fits(self, batch_size: int) -> bool:
        return 1 <= batch_size <= self.max_batch

    def graph_for(self, batch_size: int, shares_prefix: bool) -> tuple[int, bool]:
        """The (size, cascade) graph a batch replays: a cascade one when the batch shares a
        prefix and one is big enough (at least ``cascade_min_batch`` rows), else a plain one."""
        if shares_prefix and self.cascade_sizes and batch_size <= self.cascade_sizes[-1]:
            return self.cascade_sizes[bisect.bisect_left(self.cascade_sizes, batch_size)], True
        return self.sizes[bisect.bisect_left(self.sizes, batch_size)], False

    def static_batch(self, size: int, cascade: bool) -> ForwardBatch:
        """The ForwardBatch a graph of ``size`` rows is captured with: views of the buffers."""
        return static_decode_batch(self.inputs.block, self.inputs.logits_rows, self.table, size, self.max_keys,
                                   cascade)  # fmt: skip

    def _capture_all(self, device: torch.device) -> None:
        start = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(device)
        # padding rows only while capturing: every row reads the padding row's one key
        self.inputs.load([[] for _ in range(DecodeInputs.COLUMNS)], self.max_batch, self.padding_row, None)
        # the side stream must see that copy (and the tables' and weights' writes) first: without
        # this wait the warm-up read the buffers before the padding landed, i.e. whatever the
        # allocator's block held before (index out of bounds once a previous engine had used it)
        stream.wait_stream(torch.cuda.current_stream(device))
        keys = sorted([(s, False) for s in self.sizes] + [(s, True) for s in self.cascade_sizes], reverse=True)
        for key in keys:  # largest first: the smaller graphs reuse its memory
            with torch.cuda.stream(stream):
                for _ in range(2):  # compile the kernels and let allocators settle outside capture
                    self.forward(self.static_batch(*key))
            stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                self.outputs[key] = self.forward(self.static_batch(*key))
            self.graphs[key] = graph
        torch.cuda.synchronize(device)
        self.capture_seconds = time.perf_counter() - start
        log.info("captured decode CUDA graphs for batch sizes %s (cascade attention: %s) in %.1f s",
                 self.sizes, self.cascade_sizes, self.capture_seconds)  # fmt: skip

    def replay(self, columns: list[list[int]], input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``(B, vocab)`` for one decode batch given as host columns (token ids,
        positions, request rows, sequence lengths after this step, shared-prefix lengths),
        B <= max_batch; the token ids come from ``input_ids`` on the device instead when given."""
        bsz = len(columns[0])
        key = self.graph_for(bsz, any(columns[4]))
        self.inputs.load(columns, key[0], self.padding_row, input_ids)
        self.graphs[key].replay()
        return self.outputs[key][:bsz]
