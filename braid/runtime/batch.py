"""Turn scheduled requests into a ForwardBatch (packed tokens, positions, slots, logits rows)."""

from __future__ import annotations

from collections import Counter
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
    # logits rows 0 .. num_sampled - 1: the requests that finished their prefill, in batch order (a
    # slice of the logits, which no index copy has to reach the device for)
    num_sampled: int
    prompt_spans: list[PromptSpan]


def _prompt_positions(req: Req) -> range:
    """Positions computed in this pass whose logits score a prompt token (position p scores p+1)."""
    if not req.wants_prompt_logprobs or len(req.input_logprobs) >= len(req.prompt_ids) - req.logprob_start_len:
        return range(0)
    lo = max(req.kv_len, req.logprob_start_len - 1, 0)
    hi = min(req.kv_len + req.extend_len, len(req.prompt_ids) - 1)
    return range(lo, max(lo, hi))


def build_extend_batch(reqs: list[Req], table: torch.Tensor, device: torch.device,
                       shared: list[int] | None = None) -> tuple[ForwardBatch, ExtendPlan]:  # fmt: skip
    """The extend pass of ``reqs`` (``extend_len`` new tokens each, after ``kv_len``) and which
    logits rows feed what; ``shared``: the prefix the requests share (:class:`SharedPrefixes`)."""
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
        num_sampled=num_sample,
        prompt_spans=[PromptSpan(s.req_index, num_sample + s.offset, s.count, s.first_token) for s in spans],
    )
    fb = _make_extend_batch(reqs, ids, positions, rows, sample_rows + prompt_rows, table, device)
    if shared is not None and any(shared):
        fb.shared_lens, fb.shared_lens_cpu = to_device(shared, torch.int64, device), list(shared)
    return fb, plan


def decode_columns(reqs: list[Req], shared: list[int] | None = None) -> list[list[int]]:
    """A decode step's inputs on the host: token ids, positions, request rows, sequence lengths
    after the step, and the shared-prefix lengths of :class:`SharedPrefixes` (0s when None):
    what a CUDA graph replay copies in, in one block."""
    return [[r.last_token for r in reqs], [r.kv_len for r in reqs], [r.row for r in reqs],
            [r.kv_len + 1 for r in reqs], shared or [0] * len(reqs)]  # fmt: skip


def build_decode_batch(columns: list[list[int]], table: torch.Tensor, device: torch.device) -> ForwardBatch:
    """The eager ForwardBatch of a decode step given as :func:`decode_columns`."""
    ids, positions, rows, seq, shared = columns
    t = lambda xs: to_device(xs, torch.int64, device)  # noqa: E731
    rows_t, pos_t = t(rows), t(positions)
    cascade = any(shared)
    return ForwardBatch(
        mode=ForwardMode.DECODE, input_ids=t(ids), positions=pos_t, out_slots=table[rows_t, pos_t],
        req_rows=rows_t, seq_lens=t(seq), prefix_lens_cpu=list(positions), extend_lens_cpu=[1] * len(ids),
        seq_lens_cpu=list(seq), logits_rows=t(list(range(len(ids)))), req_to_token=table,
        shared_lens=t(shared) if cascade else None, shared_lens_cpu=list(shared) if cascade else None,
    )  # fmt: skip


class SharedPrefixes:
    """Finds the prefix a batch's requests share, for cascade attention (layers/attention.py).

    A request's first ``cached_len`` KV slots are the radix-cache path to its locked
    ``last_node``, so two requests share exactly the slots down to the deepest node both paths
    pass through; those are computed before any pass (``cached_len <= kv_len``), so decode and
    extend batches alike may read them as a prefix. The batch's prefix is the node that saves
    the most key reads: the most ``(requests through it - 1) * depth``. Requests through it get
    its depth, the others 0. A prefix saving fewer than ``min_saved`` key reads is not worth the
    extra pass: all 0s then.

    Decode batches keep their requests for many steps, so the answer for the last batch's
    ``last_node``s is kept (holding the nodes, so their ids cannot be reused meanwhile).
    """

    def __init__(self, min_saved: int) -> None:
        self.min_saved = min_saved
        self._last: tuple[tuple, list[int]] = ((), [])

    def __call__(self, reqs: list[Req]) -> list[int]:
        nodes = tuple(r.last_node for r in reqs)
        if nodes != self._last[0]:
            self._last = (nodes, self._find(nodes))
        return self._last[1]

    def _find(self, nodes: tuple) -> list[int]:
        through: Counter = Counter()  # node -> requests whose path passes through it
        for node, n in Counter(nodes).items():
            while node is not None and node.parent is not None:
                through[node] += n
                node = node.parent
        best, best_saved, best_depth = None, 0, 0
        for node, count in through.items():
            if count < 2:
                continue
            depth = _depth(node)
            if (count - 1) * depth > best_saved:
                best, best_saved, best_depth = node, (count - 1) * depth, depth
        if best is None or best_saved < self.min_saved:
            return [0] * len(nodes)
        return [best_depth if _passes(node, best) else 0 for node in nodes]


def _depth(node) -> int:
    """Tokens on the radix path from the root to ``node``."""
    depth = 0
    while node.parent is not None:
        depth += len(node.key)
        node = node.parent
    return depth


def _passes(node, ancestor) -> bool:
    while node is not None:
        if node is ancestor:
            return True
        node = node.parent
    return False


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
