"""KV memory: token-granular slots (page size 1).

``KVPool`` owns one K and one V buffer per layer, ``[num_slots + 1, num_kv_heads, head_dim]``.
Slot 0 is a padding slot that is never handed out: padded batch rows (CUDA graphs) write
there harmlessly. ``SlotAllocator`` hands out the other ``num_slots`` slots.
``ReqToTokenPool`` maps (request row, position) -> KV slot for every running request.

Ownership: the scheduler owns all three. A slot is either free (in the allocator), held by
a running request, or held by the radix cache; at rest, free + cached == num_slots.
"""

from __future__ import annotations

import torch


def to_device(values, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """``torch.as_tensor(values, dtype=dtype, device=device)`` (``values``: a list or a host
    tensor) without stalling the host on CUDA.

    A plain copy from pageable host memory makes the host wait until the stream has finished
    everything queued before it (the previous step's forward, with the overlap scheduler), so
    the GPU idles while the next step is launched. From pinned memory the copy is queued like a
    kernel; PyTorch's pinned-block cache keeps the block alive until the copy has run. A host
    tensor that is pinned already (the grammar masks) is not copied again.
    """
    host = torch.as_tensor(values, dtype=dtype)
    if torch.device(device).type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


class SlotAllocator:
    """Free list of KV slot indices 1..num_slots (slot 0 is the padding slot)."""

    def __init__(self, num_slots: int, device: torch.device | str) -> None:
        assert num_slots > 0, f"num_slots must be positive, got {num_slots}"
        self.num_slots = num_slots
        self.device = torch.device(device)
        self._free = torch.arange(1, num_slots + 1, dtype=torch.int64, device=self.device)
        self._free_chunks: list[torch.Tensor] = []  # freed slots, merged lazily
        self._chunked = 0  # slots in _free_chunks (num_free is asked every step: no sum over chunks)

    def _merge(self) -> None:
        if self._free_chunks:
            self._free = torch.cat([self._free, *self._free_chunks])
            self._free_chunks = []
            self._chunked = 0

    @property
    def num_free(self) -> int:
        return len(self._free) + self._chunked

    def can_allocate(self, n: int) -> bool:
        return n <= self.num_free

    def allocate(self, n: int) -> torch.Tensor:
        """Take ``n`` free slots (int64 tensor on the pool's device). Caller checks can_allocate."""
        assert self.can_allocate(n), f"asked for {n} KV slots, {self.num_free} free"
        if n > len(self._free):
            self._merge()
        out, self._free = self._free[:n], self._free[n:]
        return out

    def free(self, slots: torch.Tensor) -> None:
        if slots.numel():
            self._free_chunks.append(slots.to(self.device, torch.int64))
            self._chunked += len(slots)


class ReqToTokenPool:
    """``table[row, pos]`` = KV slot of token ``pos`` of the request in ``row``.

    The table has one row more than ``max_requests``: row ``padding_row`` is never handed out
    and stays all zeros (every position maps to the padding slot 0), for padded batch rows."""

    def __init__(self, max_requests: int, max_context_len: int, device: torch.device | str) -> None:
        self.max_requests = max_requests
        self.max_context_len = max_context_len
        self.padding_row = max_requests
        self.table = torch.zeros(max_requests + 1, max_context_len, dtype=torch.int64, device=device)
        self._free_rows = list(range(max_requests - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free_rows)

    def allocate(self) -> int:
        assert self._free_rows, "no free request rows"
        return self._free_rows.pop()

    def free(self, row: int) -> None:
        assert row not in self._free_rows, f"row {row} freed twice"
        self._free_rows.append(row)

    def write(self, row: int, start: int, slots: torch.Tensor) -> None:
        self.table[row, start : start + len(slots)] = slots


class KVPool:
    """Per-layer K and V buffers indexed by slot: ``[num_slots + 1, num_kv_heads, head_dim]``."""

    def __init__(
        self,
        num_slots: int,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        shape = (num_slots + 1, num_kv_heads, head_dim)
        self.num_slots = num_slots
        # Uninitialised (fast for large pools; the OS maps pages lazily): attention only reads
        # slots written by a forward, except the padding slot 0, which is zeroed so a masked
        # read of it can never inject NaN.
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        for buf in (*self.k, *self.v):
            buf[0].zero_()

    @staticmethod
    def bytes_per_slot(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * torch.empty(0, dtype=dtype).element_size()

    def store(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write new tokens' K/V ``(T, Hkv, D)`` into ``slots`` ``(T,)`` of ``layer``."""
        self.k[layer][slots] = k.to(self.k[layer].dtype)
        self.v[layer][slots] = v.to(self.v[layer].dtype)
