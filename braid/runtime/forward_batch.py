"""What one model forward needs to know about its batch."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch


class ForwardMode(enum.Enum):
    EXTEND = "extend"  # prefill of the uncached suffix (maybe one chunk of it), many tokens/request
    DECODE = "decode"  # one new token per request


@dataclass
class ForwardBatch:
    """A batch of requests for one forward pass. Tokens of all requests are packed: ``T`` is
    the sum of ``extend_lens``; request ``i`` owns rows ``extend_starts[i] : + extend_lens[i]``.

    Tensors live on the model's device; the ``*_cpu`` lists are the same numbers on the host,
    for code that loops over requests without a device sync.
    """

    mode: ForwardMode
    input_ids: torch.Tensor  # (T,) int64
    positions: torch.Tensor  # (T,) int64, position of each token in its sequence
    out_slots: torch.Tensor  # (T,) int64, KV slot each new token's K/V is written to
    req_rows: torch.Tensor  # (B,) int64, row of each request in ReqToTokenPool.table
    seq_lens: torch.Tensor  # (B,) int64, tokens in KV after this pass (prefix + new)
    prefix_lens_cpu: list[int]  # tokens already in KV before this pass
    extend_lens_cpu: list[int]  # new tokens this pass (1 in decode)
    seq_lens_cpu: list[int]
    logits_rows: torch.Tensor  # (N,) int64, rows of the packed hidden states to compute logits for
    req_to_token: torch.Tensor  # ReqToTokenPool.table, (max_requests, max_context_len) int64
    # Per-forward memo for the attention backend: metadata every layer shares (gather indices,
    # masks) is computed by the first layer and reused by the others. Lives as long as the batch.
    attn_memo: dict = field(default_factory=dict)
    # DECODE under a CUDA graph: size the attention launch for sequences up to this many keys
    # (the context length), not for the host lengths above, which change between replays.
    decode_max_keys: int | None = None
    # Cascade attention: request i's first shared_lens[i] keys are a cached prefix it shares with
    # the batch's other sharers, read once for all of them (decode on both backends, extend on
    # torch); None: nothing shared (or not looked for). shared_lens_cpu: the same on the host,
    # None under a CUDA graph.
    shared_lens: torch.Tensor | None = None
    shared_lens_cpu: list[int] | None = None

    @property
    def batch_size(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def extend_starts_cpu(self) -> list[int]:
        starts, acc = [], 0
        for n in self.extend_lens_cpu:
            starts.append(acc)
            acc += n
        return starts
