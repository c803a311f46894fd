"""Owns the model on its device, the KV pool and the attention backend; runs one forward."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from braid.config import EngineConfig
from braid.runtime.batch import build_decode_batch
from braid.runtime.cuda_graph import DecodeGraphs
from braid.runtime.distributed import SINGLE, TPGroup
from braid.runtime.forward_batch import ForwardBatch
from braid.runtime.layers.attention import create_attention_backend, resolve_attention_backend
from braid.runtime.loader import ModelInfo, load_model
from braid.runtime.memory import KVPool
from braid.runtime.tp_batch import BatchChannel

CPU_DEFAULT_TOTAL_TOKENS = 16384
# cuDNN's SDPA failed on an H200 for some masked extend shapes ("mha_graph.execute ... is_good()",
# torch 2.11) and builds a graph per new shape; the other kernels take every shape braid sends.
SDPA_KERNELS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
# Cascade attention (a decode batch's shared prefix read once): used where the prefix saves at
# least CASCADE_MIN_SAVED key reads a step; CUDA graphs with it are captured from
# CASCADE_MIN_BATCH rows up (cuda_graph.cascade_sizes). Heuristics, not tuned on hardware yet:
# the prefix pass costs about one small launch per layer, i.e. a few MB of KV reads on an H100.
CASCADE_MIN_SAVED = 2048
CASCADE_MIN_BATCH = 8


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass(frozen=True)
class MemoryPlan:
    num_slots: int  # KV pool size in tokens
    context_len: int  # max tokens per request


def plan_memory(config: EngineConfig, info: ModelInfo, device: torch.device) -> MemoryPlan:
    """KV pool size: a token count on CPU; on GPU a fraction of the memory left after the weights."""
    per_slot = KVPool.bytes_per_slot(info.num_layers, info.num_kv_heads, info.head_dim, info.dtype)
    if config.max_total_tokens is not None:
        num_slots = config.max_total_tokens
    elif device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        num_slots = int(free * config.mem_fraction_static) // per_slot
    else:
        num_slots = CPU_DEFAULT_TOTAL_TOKENS
    context_len = min(info.max_context_len, config.context_len or info.max_context_len, num_slots)
    return MemoryPlan(num_slots=num_slots, context_len=context_len)


class ModelRunner:
    """Loads the weights, allocates the KV pool, and turns a ForwardBatch into float32 logits."""

    def __init__(self, config: EngineConfig, model_folder: str, tp: TPGroup = SINGLE) -> None:
        self.config = config
        self.tp = tp  # tensor parallelism: this rank's shard of the model and of the KV pool
        self.device = tp.device if tp.enabled else resolve_device(config.device)
        if self.device.type == "cpu":
            torch.set_num_threads(config.resolved_cpu_threads)
        # before the weights load: a backend that cannot run here fails fast
        self.attention_backend = resolve_attention_backend(config.attention_backend, self.device)
        self.attn = create_attention_backend(self.attention_backend)
        self.model, self.info = load_model(model_folder, config.dtype, self.device, tp)
        self.memory = plan_memory(config, self.info, self.device)
        if tp.enabled:  # every rank's pool must have the same slots: the smallest plan wins
            self.memory = MemoryPlan(*tp.agree_min([self.memory.num_slots, self.memory.context_len]))
        # rank 0 announces each forward to the other ranks (docs/scale-out.md)
        self.tp_channel = BatchChannel(tp) if tp.enabled and tp.rank == 0 else None
        self.kv = KVPool(self.memory.num_slots, self.info.num_layers, self.info.num_kv_heads,
                         self.info.head_dim, self.info.dtype, self.device)
        self.graphs: DecodeGraphs | None = None  # captured by capture_decode_graphs

    def capture_decode_graphs(self, table: torch.Tensor, padding_row: int) -> None:
        """Capture the decode forward as CUDA graphs reading the request ``table`` (call once,
        before the first request), where the config and the device allow it: CUDA, the triton
        attention backend (the torch one sizes its launches from host lengths), not disabled."""
        cfg = self.config
        if cfg.disable_cuda_graph or self.device.type != "cuda" or self.attention_backend != "triton":
            return
        if self.tp.enabled:  # rank 0 announces each forward to the other ranks; a replay would not
            return
        max_batch = min(cfg.cuda_graph_max_bs, cfg.max_running_requests)
        cascade = CASCADE_MIN_BATCH if self.uses_cascade else None
        self.graphs = DecodeGraphs(self.forward, table, padding_row, self.memory.context_len, max_batch, self.device,
                                   cascade)  # fmt: skip

    @property
    def uses_cascade(self) -> bool:
        """Whether decode batches should look for a shared prefix (both backends read it once):
        not under tensor parallelism (the batch the other ranks receive carries no prefix), nor
        for a model whose every layer slides (cascade is for full attention)."""
        return not self.config.disable_cascade_attention and not self.tp.enabled and self.info.has_full_attention

    def release(self) -> None:
        """Drop the weights and the KV pool (the engine has shut down), and return the memory."""
        self.kv.k = self.kv.v = []
        self.model = self.graphs = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """Logits ``(len(batch.logits_rows), vocab)`` float32; writes the new tokens' K/V."""
        with sdpa_kernel(SDPA_KERNELS):
            if self.tp_channel is not None:  # the other ranks run the same forward
                with self.tp_channel.lockstep(batch):
                    return self.model(batch, self.kv, self.attn)
            return self.model(batch, self.kv, self.attn)

    @torch.inference_mode()
    def decode(self, columns: list[list[int]], table: torch.Tensor, input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``(B, vocab)`` of one decode step given as ``batch.decode_columns``: a CUDA
        graph replay when one was captured for the batch size (the logits are then valid until
        the next step), else the eager forward. ``input_ids``: the step's tokens already on the
        device (the overlap scheduler's previous samples), instead of the first column."""
        if self.graphs is not None and self.graphs.fits(len(columns[0])):
            return self.graphs.replay(columns, input_ids)
        batch = build_decode_batch(columns, table, self.device)
        if input_ids is not None:
            batch.input_ids = input_ids
        return self.forward(batch)
