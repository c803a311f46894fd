"""Tensor-parallel layers: each rank holds a slice of a weight and loads only that slice.

- :class:`ColumnParallelLinear`: output features split (qkv_proj, gate_up_proj). A fused layer
  is a list of parts, each split on its own, so a rank's qkv holds its own q, k and v heads.
- :class:`RowParallelLinear`: input features split; partial outputs summed by an all-reduce,
  the bias added once after it (o_proj, down_proj).
- :class:`VocabParallelEmbedding` / :class:`ParallelLMHead`: vocabulary rows split; a lookup
  masks the ids of other shards and all-reduces; the head all-gathers its logits columns.

With one rank (``SINGLE``) every layer is a plain linear / embedding with the full weight and
no communication. ``load(attr, part, tensor)`` takes the full checkpoint tensor of one part of
a parameter and copies this rank's slice; a tensor of the wrong shape raises ModelLoadError.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from braid.errors import ModelLoadError
from braid.runtime.distributed import SINGLE, TPGroup


@dataclass(frozen=True)
class Shard:
    """Piece ``index`` of ``count`` equal pieces of a dimension of length ``full``."""

    full: int
    count: int = 1
    index: int = 0

    @property
    def size(self) -> int:
        return self.full // self.count

    def take(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        return t.narrow(dim, self.index * self.size, self.size)


def head_shard(num_heads: int, head_dim: int, tp: TPGroup) -> Shard:
    """This rank's heads of ``num_heads``: ``num_heads / tp.size`` of them, or, when there are
    fewer heads than ranks (KV heads), the one head shared by ``tp.size / num_heads`` ranks."""
    if num_heads >= tp.size:
        assert num_heads % tp.size == 0, f"{num_heads} heads on {tp.size} ranks"
        return Shard(num_heads * head_dim, tp.size, tp.rank)
    assert tp.size % num_heads == 0, f"{num_heads} heads on {tp.size} ranks"
    return Shard(num_heads * head_dim, num_heads, tp.rank // (tp.size // num_heads))


def _check_shape(name: str, tensor: torch.Tensor, expected: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != expected:
        raise ModelLoadError(f"tensor {name} has shape {tuple(tensor.shape)}, expected {expected}")


class ColumnParallelLinear(nn.Linear):
    """``y = x W^T + b`` for this rank's output features: the concatenation, part after part,
    of ``shards[i]``'s slice of part ``i``. No communication: the output stays split."""

    def __init__(self, in_features: int, shards: list[Shard], bias: bool) -> None:
        super().__init__(in_features, sum(s.size for s in shards), bias=bias)
        self.shards = shards

    def load(self, attr: str, part: int, tensor: torch.Tensor, name: str) -> None:
        shard = self.shards[part]
        _check_shape(name, tensor, (shard.full, self.in_features) if attr == "weight" else (shard.full,))
        offset = sum(s.size for s in self.shards[:part])
        getattr(self, attr).narrow(0, offset, shard.size).copy_(shard.take(tensor, 0))


class RowParallelLinear(nn.Linear):
    """``y = sum over ranks (x_r W_r^T) + b``: the input features are split (``x`` arrives split,
    as a column-parallel layer leaves it); the bias is added once, after the all-reduce."""

    def __init__(self, in_shard: Shard, out_features: int, bias: bool, tp: TPGroup = SINGLE) -> None:
        super().__init__(in_shard.size, out_features, bias=bias)
        self.in_shard, self.tp = in_shard, tp

    def load(self, attr: str, part: int, tensor: torch.Tensor, name: str) -> None:
        full = (self.out_features, self.in_shard.full) if attr == "weight" else (self.out_features,)
        _check_shape(name, tensor, full)
        getattr(self, attr).copy_(self.in_shard.take(tensor, 1) if attr == "weight" else tensor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.tp.enabled:
            return F.linear(x, self.weight, self.bias)
        y = self.tp.all_reduce(F.linear(x, self.weight))
        return y if self.bias is None else y + self.bias


class _VocabShard(nn.Module):
    """Rows ``start .. start + rows`` of a ``(vocab, hidden)`` matrix; a shard is padded to
    ``ceil(vocab / tp.size)`` rows (zeros past the vocabulary) so all ranks hold equal shapes."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: TPGroup) -> None:
        super().__init__()
        self.vocab_size, self.tp = vocab_size, tp
        rows = -(-vocab_size // tp.size)
        self.start = tp.rank * rows
        self.end = min(self.start + rows, vocab_size)  # rows past it are padding
        self.weight = nn.Parameter(torch.empty(rows, hidden_size))

    def load(self, attr: str, part: int, tensor: torch.Tensor, name: str) -> None:
        _check_shape(name, tensor, (self.vocab_size, self.weight.shape[1]))
        own = self.end - self.start
        self.weight[:own].copy_(tensor[self.start : self.end])
        self.weight[own:].zero_()


class VocabParallelEmbedding(_VocabShard):
    """Token embeddings; each rank looks up the ids in its rows, zeros elsewhere, then all-reduce."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if not self.tp.enabled:
            return F.embedding(ids, self.weight)
        mine = (ids >= self.start) & (ids < self.end)
        h = F.embedding((ids - self.start) * mine, self.weight)  # (T, hidden); others' ids read row 0
        return self.tp.all_reduce(h * mine.unsqueeze(-1).to(h.dtype))


class ParallelLMHead(_VocabShard):
    """Logits over the vocabulary: each rank's rows, all-gathered (every rank gets the full
    ``(N, vocab)``), the padding columns cut off."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        logits = F.linear(h, self.weight)
        if not self.tp.enabled:
            return logits
        logits = self.tp.all_gather_last(logits)
        return logits if logits.shape[-1] == self.vocab_size else logits[:, : self.vocab_size].contiguous()


# Layers whose parameters load through ``load`` (a slice of the checkpoint tensor) rather than whole.
SHARDED_LAYERS = (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, ParallelLMHead)
