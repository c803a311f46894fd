"""Tensor parallelism: one rank's place among the ranks, its process groups, and the collectives
the parallel layers call (see docs/scale-out.md, "Tensor parallelism").

``tp_size`` ranks run one process each; node ``i`` of ``nnodes`` holds the consecutive ranks
``i * per_node .. (i + 1) * per_node - 1`` and its rank ``r`` runs on ``cuda:(r - i * per_node)``
(its local rank) when the engine runs on CUDA. Each rank joins two groups:

- ``group``: NCCL on CUDA, gloo on the CPU. The model's all-reduces and all-gathers and the batch
  tensors rank 0 broadcasts before each forward. Its timeout bounds how long a forward waits for
  a rank that stopped answering.
- ``control``: gloo, on the host, without a practical timeout. The small header by which rank 0
  announces the next forward (or the stop), and the agreement on the KV pool size after loading.
  A worker waits there while the engine is idle, for as long as it is idle, which an NCCL
  collective could not do (its watchdog would abort the process). A rank whose process dies
  closes its sockets, so the peers' gloo calls fail at once rather than at the timeout.

``SINGLE`` (rank 0 of 1) is the group of an engine without tensor parallelism: every collective
is then a no-op, and no process group exists.
"""

from __future__ import annotations

import logging
from datetime import timedelta

import torch
import torch.distributed as dist

from braid.config import EngineConfig

log = logging.getLogger("braid.distributed")

# A forward's collectives: a peer silent this long fails the forward (gloo raises; NCCL's
# watchdog aborts the process).
COLLECTIVE_TIMEOUT = timedelta(minutes=5)
# The control group's receive is where a worker idles between forwards: no practical limit.
IDLE_TIMEOUT = timedelta(days=365)


def ranks_per_node(config: EngineConfig) -> int:
    return config.tp_size // config.nnodes


def node_ranks(config: EngineConfig) -> range:
    """The global ranks that run on this node (``config.node_rank``)."""
    per = ranks_per_node(config)
    return range(config.node_rank * per, (config.node_rank + 1) * per)


def rank_device(base: torch.device, rank: int, config: EngineConfig) -> torch.device:
    """Rank ``rank``'s device: ``cuda:<local rank>`` when the engine runs on CUDA, else ``base``."""
    return torch.device("cuda", rank % ranks_per_node(config)) if base.type == "cuda" else base


class TPGroup:
    """One rank's view of the tensor-parallel group. Owns the process groups once ``init`` made
    them; ``destroy`` tears them down (idempotent). Collectives mutate their argument in place
    where torch does (``all_reduce``) and block until every rank has called them."""

    def __init__(self, rank: int = 0, size: int = 1, device: torch.device | None = None) -> None:
        self.rank, self.size = rank, size
        self.device = device or torch.device("cpu")
        self.group: dist.ProcessGroup | None = None
        self.control: dist.ProcessGroup | None = None

    @property
    def enabled(self) -> bool:
        return self.size > 1

    @classmethod
    def init(cls, config: EngineConfig, rank: int, device: torch.device, init_addr: str) -> TPGroup:
        """Join the group of ``config.tp_size`` ranks that meets at ``init_addr`` (HOST:PORT; rank
        0 listens there). Blocks until every rank has joined, at most COLLECTIVE_TIMEOUT."""
        if dist.is_initialized():
            raise RuntimeError("a tensor-parallel group already exists in this process: shut its engine down first")
        tp = cls(rank, config.tp_size, device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(
            backend, init_method=f"tcp://{init_addr}", world_size=tp.size, rank=rank, timeout=COLLECTIVE_TIMEOUT,
            device_id=device if device.type == "cuda" else None,
        )  # fmt: skip
        tp.group = dist.group.WORLD
        tp.control = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
        log.info("tensor-parallel rank %d of %d on %s (%s)", rank, tp.size, device, backend)
        return tp

    # ---- collectives (no-ops on one rank) ------------------------------------------------------
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the ranks, in place; returns ``x``."""
        if self.enabled:
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's ``x`` concatenated along the last dimension, rank order."""
        if not self.enabled:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x, group=self.group)
        return torch.cat(parts, dim=-1)

    def agree_min(self, values: list[int]) -> list[int]:
        """The element-wise minimum of ``values`` over the ranks (e.g. KV pool sizes). On the
        control group: the ranks may reach it minutes apart (loading), and a rank that died
        while loading fails it at once."""
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.control)
        return [int(v) for v in t.tolist()]

    def destroy(self) -> None:
        """Leave and tear down the process groups (idempotent; safe after a failed peer)."""
        if self.group is None:
            return
        self.group = self.control = None
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # a dead peer can make teardown fail; the groups are gone either way
                log.warning("tensor-parallel group teardown failed", exc_info=True)


SINGLE = TPGroup()
