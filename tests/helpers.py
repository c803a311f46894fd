"""Shared test helpers: tiny random HF checkpoints and a scheduler-free forward harness.

``make_random_model`` writes a real transformers checkpoint (config.json + safetensors) of a
tiny model whose weights are scaled up so every layer moves the logits. ``bare_forward`` runs
a braid model through ForwardBatch/KVPool the way the scheduler would (chunked extend, then
batched greedy decode) so fidelity can be checked without an engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from braid.runtime.forward_batch import ForwardBatch, ForwardMode
from braid.runtime.layers.attention import AttentionBackend, create_attention_backend
from braid.runtime.memory import KVPool, ReqToTokenPool, SlotAllocator

_TINY = {
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 256, "rms_norm_eps": 1e-6,
}  # fmt: skip
_LLAMA3_ROPE = {
    "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
    "high_freq_factor": 4.0, "original_max_position_embeddings": 32,
}  # fmt: skip
# preset -> (transformers config class name, settings beyond _TINY)
PRESETS: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", {"num_hidden_layers": 3}),
    "llama3": ("LlamaConfig", {"rope_parameters": _LLAMA3_ROPE, "vocab_size": 300}),
    "llama_tied": ("LlamaConfig", {"tie_word_embeddings": True, "attention_bias": True}),
    "mistral": ("MistralConfig", {"sliding_window": 7, "num_attention_heads": 8}),
    "qwen2": ("Qwen2Config", {"num_key_value_heads": 1}),
    "qwen3": ("Qwen3Config", {"head_dim": 32, "num_hidden_layers": 3}),
}


def make_random_model(
    arch: str, tmp_path: str | Path, *, max_shard_size: str | None = None, seed: int = 0, **overrides
) -> str:
    """Save a tiny random HF model of preset ``arch`` (see PRESETS) under ``tmp_path`` and
    return its folder. ``overrides`` are config fields; ``max_shard_size`` (e.g. "100KB")
    makes a sharded checkpoint with ``model.safetensors.index.json``."""
    import transformers

    class_name, settings = PRESETS[arch]
    config = getattr(transformers, class_name)(**{**_TINY, **settings, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _scale_up_weights(model)
    folder = Path(tmp_path) / f"{arch}-{seed}{'-sharded' if max_shard_size else ''}"
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, safe_serialization=True, **kwargs)
    return str(folder)


@torch.no_grad()
def _scale_up_weights(model: torch.nn.Module) -> None:
    # The default init (std 0.02) leaves a tiny model's logits almost flat, which would let a
    # broken layer go unnoticed; larger weights and noisy norms make every part matter.
    for name, p in model.named_parameters():
        if "norm" in name:
            p.copy_(1.0 + 0.2 * torch.randn_like(p))
        elif name.endswith("bias"):
            p.normal_(0.0, 0.2)
        else:
            p.normal_(0.0, 0.15)


def load_hf(folder: str) -> torch.nn.Module:
    """The transformers reference of a saved folder, float32, eval mode."""
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@torch.no_grad()
def hf_logits(model: torch.nn.Module, tokens: list[int]) -> torch.Tensor:
    """``(len(tokens), vocab)`` float32 logits of the transformers model over one sequence."""
    return model(torch.tensor([tokens])).logits[0].float()


@dataclass
class BareRun:
    """Per-request results of :func:`bare_forward`."""

    prompt_logits: list[torch.Tensor]  # request i: (len(prompt_i), V), every prompt position
    decode_logits: list[torch.Tensor]  # request i: (steps, V), logits of decode step s
    tokens: list[list[int]] = field(default_factory=list)  # greedy tokens, steps + 1 each

    def sequence_logits(self, i: int) -> torch.Tensor:
        """Logits at every position of prompt + generated tokens (the last token excluded)."""
        return torch.cat([self.prompt_logits[i], self.decode_logits[i]])


class BarePools:
    """KV memory for a harness run, with slots handed out in a shuffled order so attention
    cannot pass by reading contiguous memory."""

    def __init__(self, info, num_slots: int, max_requests: int, device: str = "cpu", seed: int = 0) -> None:
        self.kv = KVPool(num_slots, info.num_layers, info.num_kv_heads, info.head_dim, info.dtype, device)
        self.table = ReqToTokenPool(max_requests, info.max_context_len, device)
        self.slots = SlotAllocator(num_slots, device)
        gen = torch.Generator().manual_seed(seed)
        self._order = self.slots.allocate(num_slots)[torch.randperm(num_slots, generator=gen)]
        self._next = 0

    def take(self, n: int) -> torch.Tensor:
        out = self._order[self._next : self._next + n]
        assert len(out) == n, "BarePools ran out of slots"
        self._next += n
        return out


def make_batch(
    mode: ForwardMode, pools: BarePools, rows: list[int], chunks: list[list[int]], prefix_lens: list[int],
    all_logits: bool,
) -> ForwardBatch:  # fmt: skip
    """Allocate slots for ``chunks[i]`` (new tokens of request in table row ``rows[i]`` after
    ``prefix_lens[i]`` cached ones), write them into the table and build the batch.
    ``all_logits``: logits for every new token, else only each request's last one."""
    device = pools.kv.k[0].device
    ids, positions, slots, logits_rows, acc = [], [], [], [], 0
    for row, chunk, prefix in zip(rows, chunks, prefix_lens):
        new = pools.take(len(chunk))
        pools.table.write(row, prefix, new)
        ids += chunk
        positions += range(prefix, prefix + len(chunk))
        slots.append(new)
        logits_rows += range(acc, acc + len(chunk)) if all_logits else [acc + len(chunk) - 1]
        acc += len(chunk)
    seq_lens = [p + len(c) for p, c in zip(prefix_lens, chunks)]
    as_tensor = lambda x: torch.tensor(x, dtype=torch.int64, device=device)
    return ForwardBatch(
        mode=mode, input_ids=as_tensor(ids), positions=as_tensor(positions), out_slots=torch.cat(slots),
        req_rows=as_tensor(rows), seq_lens=as_tensor(seq_lens), prefix_lens_cpu=list(prefix_lens),
        extend_lens_cpu=[len(c) for c in chunks], seq_lens_cpu=seq_lens, logits_rows=as_tensor(logits_rows),
        req_to_token=pools.table.table,
    )  # fmt: skip


def bare_forward(
    model, info, prompts: list[list[int]], steps: int, *, chunk_size: int | None = None,
    attn: AttentionBackend | str = "torch", device: str = "cpu",
) -> BareRun:  # fmt: skip
    """Prefill all ``prompts`` together (in EXTEND batches of at most ``chunk_size`` tokens per
    request, reusing the KV of earlier chunks), then run ``steps`` batched greedy DECODE steps."""
    backend = create_attention_backend(attn) if isinstance(attn, str) else attn
    pools = BarePools(info, sum(len(p) for p in prompts) + len(prompts) * steps, len(prompts), device)
    rows = [pools.table.allocate() for _ in prompts]
    chunk_size = chunk_size or max(len(p) for p in prompts)
    prompt_logits: list[list[torch.Tensor]] = [[] for _ in prompts]
    done = [0] * len(prompts)
    while any(d < len(p) for d, p in zip(done, prompts)):
        live = [i for i, p in enumerate(prompts) if done[i] < len(p)]
        chunks = [prompts[i][done[i] : done[i] + chunk_size] for i in live]
        batch = make_batch(ForwardMode.EXTEND, pools, [rows[i] for i in live], chunks, [done[i] for i in live], True)
        logits = model(batch, pools.kv, backend).cpu()
        for i, part in zip(live, logits.split([len(c) for c in chunks])):
            prompt_logits[i].append(part)
            done[i] += len(part)
    last = [torch.cat(parts) for parts in prompt_logits]
    tokens = [[int(x[-1].argmax())] for x in last]
    decode_logits: list[list[torch.Tensor]] = [[] for _ in prompts]
    for s in range(steps):
        lens = [len(p) + s for p in prompts]
        batch = make_batch(ForwardMode.DECODE, pools, rows, [[t[-1]] for t in tokens], lens, False)
        logits = model(batch, pools.kv, backend).cpu()
        for i, row_logits in enumerate(logits):
            decode_logits[i].append(row_logits)
            tokens[i].append(int(row_logits.argmax()))
    return BareRun(last, [torch.stack(d) if d else torch.empty(0) for d in decode_logits], tokens)
