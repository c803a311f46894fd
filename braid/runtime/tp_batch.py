"""How rank 0 tells the other tensor-parallel ranks which forward to run.

Before each forward, rank 0 (the only rank with a scheduler) broadcasts the batch:

1. on the ``control`` group (gloo, host): a header ``[command, mode, T, B, N, R]``, where the
   command is FORWARD or STOP, T the new tokens, B the requests, N the logits rows and R the
   total KV-slot entries of the requests (``sum(seq_lens)``); then the prefix / extend / seq
   lengths (3B), which both sides hold on the host (no device copy or sync on rank 0);
2. one int64 payload on the device group: input_ids (T), positions (T), out_slots (T),
   logits_rows (N) and every request's KV slots ``req_to_token[row, :seq_len]``, ragged (R).
   Built on the device from the batch's tensors, so rank 0 never waits for the device.

A worker has no request table of its own: it rebuilds a dense one of the B requests (row ``i``
= request ``i``) from the ragged slots. Sending the slots of the whole sequence each forward
(rather than only the new ones) keeps the workers right when rank 0 rewrites a row between
forwards (a cached prefix at admission, duplicate slots swapped for the cache's). The cost is
8 bytes per token in KV per forward, beside which the forward itself dominates.

``lockstep`` is rank 0's side around one forward; if anything raises after the header went out,
the ranks may be out of step, so the channel is marked broken and every later forward raises.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist

from braid.runtime.distributed import TPGroup
from braid.runtime.forward_batch import ForwardBatch, ForwardMode

log = logging.getLogger("braid.tp_batch")

FORWARD, STOP = 1, 2
_MODES = list(ForwardMode)
HEADER_LEN = 6


class TensorParallelError(RuntimeError):
    """The tensor-parallel ranks are no longer in step (a rank failed or a forward broke off)."""


def _ragged_index(seq_lens: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For requests of ``seq_lens`` keys: (request index, position) of each of the ``total`` keys."""
    count = len(seq_lens)
    req = torch.repeat_interleave(torch.arange(count, device=seq_lens.device), seq_lens, output_size=total)
    starts = torch.cumsum(seq_lens, 0) - seq_lens
    pos = torch.arange(total, device=seq_lens.device) - torch.repeat_interleave(starts, seq_lens, output_size=total)
    return req, pos


class BatchChannel:
    """Rank 0 sends (``lockstep``, ``stop``); the other ranks receive (``recv``)."""

    def __init__(self, tp: TPGroup) -> None:
        assert tp.enabled, "a batch channel needs more than one rank"
        self.tp = tp
        self.broken: str | None = None
        # Set by whoever started this node's workers: checked before each forward, so a dead local
        # worker fails the forward at once (a dead peer can leave an NCCL collective waiting until
        # its timeout; gloo notices closed sockets by itself).
        self.peers_alive: Callable[[], bool] = lambda: True

    # ---- rank 0 ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def lockstep(self, batch: ForwardBatch) -> Iterator[None]:
        """Announce ``batch`` to the other ranks, then run the body (rank 0's own forward)."""
        if self.broken is None and not self.peers_alive():
            self.broken = "a tensor-parallel worker process exited"
        if self.broken is not None:
            raise TensorParallelError(f"tensor-parallel ranks out of step since: {self.broken}")
        try:
            self._send(batch)
            yield
        except BaseException as exc:
            self.broken = f"{type(exc).__name__}: {exc}"
            log.error("tensor-parallel forward failed; the engine cannot run further forwards", exc_info=True)
            raise

    def _send(self, batch: ForwardBatch) -> None:
        total = sum(batch.seq_lens_cpu)
        header = [FORWARD, _MODES.index(batch.mode), batch.num_tokens, batch.batch_size, len(batch.logits_rows), total]
        lens = batch.prefix_lens_cpu + batch.extend_lens_cpu + batch.seq_lens_cpu
        for host in (header, lens):
            dist.broadcast(torch.tensor(host, dtype=torch.int64), src=0, group=self.tp.control)
        req, pos = _ragged_index(batch.seq_lens, total)
        payload = torch.cat([
            batch.input_ids, batch.positions, batch.out_slots, batch.logits_rows,
            batch.req_to_token[batch.req_rows[req], pos],
        ])  # fmt: skip
        dist.broadcast(payload, src=0, group=self.tp.group)

    def stop(self) -> None:
        """Tell the other ranks to leave their loops (best effort: some may be gone already)."""
        if self.broken is not None:  # a rank failed or is mid-forward: the engine terminates them
            return
        try:
            dist.broadcast(torch.tensor([STOP] + [0] * (HEADER_LEN - 1), dtype=torch.int64), src=0,
                           group=self.tp.control)  # fmt: skip
        except Exception as exc:  # a dead worker: nothing to stop there
            log.warning("could not send stop to the tensor-parallel workers: %s", exc)

    # ---- ranks 1.. --------------------------------------------------------------------------------
    def recv(self, device: torch.device) -> ForwardBatch | None:
        """Wait (without limit) for rank 0's next batch; None when rank 0 sends STOP."""
        header = torch.empty(HEADER_LEN, dtype=torch.int64)
        dist.broadcast(header, src=0, group=self.tp.control)
        command, mode, tokens, count, num_logits, total = header.tolist()
        if command == STOP:
            return None
        assert command == FORWARD, f"unknown tensor-parallel command {command}"
        lens = torch.empty(3 * count, dtype=torch.int64)
        dist.broadcast(lens, src=0, group=self.tp.control)
        payload = torch.empty(3 * tokens + num_logits + total, dtype=torch.int64, device=device)
        dist.broadcast(payload, src=0, group=self.tp.group)
        ids, positions, out_slots, logits_rows, slots = payload.split([tokens, tokens, tokens, num_logits, total])
        lens_cpu = lens.tolist()
        prefix, extend, seq = lens_cpu[:count], lens_cpu[count : 2 * count], lens_cpu[2 * count :]
        seq_lens = torch.tensor(seq, dtype=torch.int64, device=device)
        table = torch.zeros(count, max(seq), dtype=torch.int64, device=device)
        table[_ragged_index(seq_lens, total)] = slots
        return ForwardBatch(
            mode=_MODES[mode], input_ids=ids, positions=positions, out_slots=out_slots,
            req_rows=torch.arange(count, dtype=torch.int64, device=device), seq_lens=seq_lens,
            prefix_lens_cpu=prefix, extend_lens_cpu=extend, seq_lens_cpu=seq, logits_rows=logits_rows,
            req_to_token=table,
        )  # fmt: skip
