"""Turn scheduled requests into a ForwardBatch (packed tokens, positions, slots, logits rows)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from braid.runtime.forward_batch import ForwardBatch, ForwardMode
from braid.runtime.memory import to_device
from braid.runtime.request import Req


@dataclass(frozen=True)
class PromptSpan:
    """Logits rows ``offset : offset + count`` give logprobs of prompt tokens ``first_token ...``."""

    req_index: int
    offset: int
    count: int
    first_token: int


@dataclass(frozen=True)
class ExtendPlan:
    sample_rows: list[int]  # logits row of each request that finished its prefill, in batch order
    prompt_spans: list[PromptSpan]


def _prompt_positions(req: Req) -> range:
    """Positions computed in this pass whose logits score a prompt token (position p scores p+1)."""
    if not req.wants_prompt_logprobs or len(req.input_logprobs) >= len(req.prompt_ids) - req.logprob_start_len:
        return range(0)
    lo = max(req.kv_len, req.logprob_start_len - 1, 0)
    hi = min(req.kv_len + req.extend_len, len(req.prompt_ids) - 1)
    return range(lo, max(lo, hi))


def build_extend_batch(reqs: list[Req], table: torch.Tensor, device: torch.device) -> tuple[ForwardBatch, ExtendPlan]:
    ids, positions, rows, sample_rows, spans = [], [], [], [], []
    prompt_rows: list[int] = []
    start = 0
    for i, req in enumerate(reqs):
        lo, n = req.kv_len, req.extend_len
        ids.extend(req.fill_ids[lo : lo + n])
        positions.extend(range(lo, lo + n))
        if lo + n == req.seq_len:
            sample_rows.append(start + n - 1)
        pos = _prompt_positions(req)
        if len(pos):
            spans.append(PromptSpan(i, len(prompt_rows), len(pos), pos.start + 1))
            prompt_rows.extend(start + p - lo for p in pos)
        rows.append(req.row)
        start += n
    num_sample = len(sample_rows)
    plan = ExtendPlan(
        sample_rows=list(range(num_sample)),
        prompt_spans=[PromptSpan(s.req_index, num_sample + s.offset, s.count, s.first_token) for s in spans],
    )
    fb = _make_extend_batch(reqs, ids, positions, rows, sample_rows + prompt_rows, table, device)
    return fb, plan


def decode_columns(reqs: list[Req]) -> list[list[int]]:
    """A decode step's inputs on the host: token ids, positions, request rows and sequence
    lengths after the step (what a CUDA graph replay copies in, in one block)."""
    return [[r.last_token for r in reqs], [r.kv_len for r in reqs], [r.row for r in reqs],
            [r.kv_len + 1 for r in reqs]]  # fmt: skip


def build_decode_batch(columns: list[list[int]], table: torch.Tensor, device: torch.device) -> ForwardBatch:
    """The eager ForwardBatch of a decode step given as :func:`decode_columns`."""
    ids, positions, rows, seq = columns
    t = lambda xs: to_device(xs, torch.int64, device)  # noqa: E731
    rows_t, pos_t = t(rows), t(positions)
    return ForwardBatch(
        mode=ForwardMode.DECODE, input_ids=t(ids), positions=pos_t, out_slots=table[rows_t, pos_t],
        req_rows=rows_t, seq_lens=t(seq), prefix_lens_cpu=list(positions), extend_lens_cpu=[1] * len(ids),
        seq_lens_cpu=list(seq), logits_rows=t(list(range(len(ids)))), req_to_token=table,
    )  # fmt: skip


def _make_extend_batch(reqs, ids, positions, rows, logits_rows, table, device) -> ForwardBatch:
    prefix = [r.kv_len for r in reqs]
    ext = [r.extend_len for r in reqs]
    seq = [p + e for p, e in zip(prefix, ext)]
    t = lambda xs: to_device(xs, torch.int64, device)  # noqa: E731
    rows_t, pos_t = t(rows), t(positions)
    # slots of the new tokens: already recorded in the request rows by KVManager.extend
    req_of_token = torch.repeat_interleave(rows_t, t(ext), output_size=sum(ext))  # no size sync
    return ForwardBatch(
        mode=ForwardMode.EXTEND, input_ids=t(ids), positions=pos_t, out_slots=table[req_of_token, pos_t],
        req_rows=rows_t, seq_lens=t(seq), prefix_lens_cpu=prefix, extend_lens_cpu=ext, seq_lens_cpu=seq,
        logits_rows=t(logits_rows), req_to_token=table,
    )
