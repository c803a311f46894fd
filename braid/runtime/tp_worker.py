"""Tensor-parallel ranks other than 0: their processes, and the loop each one runs.

Rank 0 is the engine's own process (scheduler, sampler, front). Every other rank is a process
started here with ``torch.multiprocessing`` (spawn): the engine starts the other ranks of its
node; ``braid serve --node-rank i`` (i > 0) starts all the ranks of node ``i`` and waits for them.
A worker loads its shard of the model and of the KV pool, then repeats: receive a batch from
rank 0 (``tp_batch.BatchChannel``), run the same forward (its collectives pair with rank 0's),
until rank 0 says stop or goes away. A worker that raises exits; rank 0's next collective with it
then fails (see ``distributed.py`` for the timeouts).
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing.connection
import signal
import sys
from typing import Any

import torch.multiprocessing as mp

from braid.config import EngineConfig
from braid.errors import InvalidRequestError
from braid.net import free_port
from braid.runtime.distributed import TPGroup, node_ranks, rank_device
from braid.runtime.loader import check_tensor_parallel
from braid.runtime.model_runner import ModelRunner, resolve_device
from braid.runtime.tp_batch import BatchChannel

log = logging.getLogger("braid.tp_worker")

STOP_TIMEOUT = 30.0  # seconds a worker may take to leave after the stop, before it is terminated


def worker_main(fields: dict[str, Any], folder: str, rank: int, init_addr: str) -> None:
    """A worker process's entry point (picklable arguments: the config as a dict)."""
    # Ctrl-C reaches the whole process group: rank 0 (or run_node) handles it and stops the workers
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.WARNING, format=f"[tp rank {rank}] %(levelname)s %(name)s: %(message)s")
    config = EngineConfig(**fields)
    tp = TPGroup.init(config, rank, rank_device(resolve_device(config.device), rank, config), init_addr)
    try:
        runner = ModelRunner(config, folder, tp)
        channel = BatchChannel(tp)
        while (batch := channel.recv(runner.device)) is not None:
            runner.forward(batch)
        log.info("stopped by rank 0")
    finally:
        tp.destroy()


class WorkerProcesses:
    """The worker processes of some ranks. ``stop`` waits for them to leave (after rank 0's stop
    message), terminating those that do not within ``timeout``."""

    def __init__(self, config: EngineConfig, folder: str, ranks: range | list[int], init_addr: str) -> None:
        ctx = mp.get_context("spawn")
        fields = dataclasses.asdict(config)
        self.procs = [
            ctx.Process(target=worker_main, args=(fields, folder, r, init_addr), name=f"braid-tp-{r}", daemon=True)
            for r in ranks
        ]
        for p in self.procs:
            p.start()

    def all_alive(self) -> bool:
        return all(p.is_alive() for p in self.procs)

    def wait(self) -> int:
        """Block until every worker has exited; when one fails, terminate the others at once.
        Returns the failed worker's exit code, or 0 when every worker exited cleanly."""
        pending = list(self.procs)
        while pending:
            multiprocessing.connection.wait([p.sentinel for p in pending])
            for p in [p for p in pending if not p.is_alive()]:
                pending.remove(p)
                if p.exitcode:
                    log.error("%s exited with code %s", p.name, p.exitcode)
                    self.stop(timeout=0)
                    return p.exitcode
        return 0

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        for p in self.procs:
            p.join(timeout)
            if p.is_alive():
                log.warning("%s did not stop; terminating it", p.name)
                p.terminate()
                p.join(5)
            if p.is_alive():
                p.kill()
                p.join(5)


def start_tensor_parallel(config: EngineConfig, folder: str) -> tuple[ModelRunner, WorkerProcesses]:
    """Rank 0's side: start this node's other ranks, join the group, load rank 0's shard.
    On any failure the workers are stopped and the group torn down before the error propagates."""
    if config.node_rank != 0:
        raise InvalidRequestError(
            "node_rank", f"got {config.node_rank}: nodes other than 0 run only workers (braid serve --node-rank)"
        )
    check_tensor_parallel(folder, config.tp_size)
    init_addr = config.dist_init_addr or f"127.0.0.1:{free_port()}"
    workers = WorkerProcesses(config, folder, node_ranks(config)[1:], init_addr)
    tp: TPGroup | None = None
    try:
        tp = TPGroup.init(config, 0, rank_device(resolve_device(config.device), 0, config), init_addr)
        runner = ModelRunner(config, folder, tp)
        runner.tp_channel.peers_alive = workers.all_alive
        return runner, workers
    except BaseException:
        if tp is not None:
            tp.destroy()
        workers.stop(timeout=0)
        raise


def stop_tensor_parallel(runner: ModelRunner, workers: WorkerProcesses, scheduler_done: bool) -> None:
    """Rank 0's teardown: the stop message when the ranks are in step (no forward in flight, none
    broken), the workers joined, or terminated at once when they cannot have heard it; then the
    process groups."""
    channel = runner.tp_channel
    in_step = scheduler_done and channel is not None and channel.broken is None
    if in_step:
        channel.stop()
    workers.stop(timeout=STOP_TIMEOUT if in_step else 0)
    runner.tp.destroy()


def run_node(config: EngineConfig) -> int:
    """``braid serve --node-rank i`` for i > 0: run this node's ranks until rank 0 stops them.
    Returns the process exit code (nonzero when a rank failed)."""
    from braid.runtime.model_source import resolve_model_path

    assert config.node_rank > 0, "node 0 runs the engine, not run_node"
    folder = resolve_model_path(config.model_path, config.resolved_cache_dir)
    workers = WorkerProcesses(config, folder, node_ranks(config), config.dist_init_addr or "")
    log.info("node %d: ranks %s joining %s", config.node_rank, list(node_ranks(config)), config.dist_init_addr)
    try:
        return workers.wait()
    except KeyboardInterrupt:
        workers.stop(timeout=0)
        return 130
    finally:
        sys.stdout.flush()
