"""One decoder-only transformer shared by Llama, Mistral, Qwen2 and Qwen3.

The families differ only in flags of :class:`DecoderConfig` (biases, q/k norm, head_dim,
sliding window, RoPE scaling). Module names mirror HF's (``model.layers.N.self_attn...``) so
checkpoint names map one to one, except the fused ``qkv_proj`` and ``gate_up_proj``, which
``load_weights`` fills from the separate HF projections.

Under tensor parallelism (``tp``, see docs/scale-out.md) a rank holds its share of the heads,
of the MLP width and of the vocabulary; the layers of ``layers/linear.py`` do the slicing and
the communication, so the blocks below read the same at any ``tp.size``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import torch
from torch import nn

from braid.errors import InvalidRequestError, ModelLoadError
from braid.runtime.distributed import SINGLE, TPGroup
from braid.runtime.forward_batch import ForwardBatch
from braid.runtime.kernels.activation import silu_and_mul_reference, silu_and_mul_triton
from braid.runtime.layers.attention import AttentionBackend
from braid.runtime.layers.linear import (
    SHARDED_LAYERS,
    ColumnParallelLinear,
    ParallelLMHead,
    RowParallelLinear,
    Shard,
    VocabParallelEmbedding,
    head_shard,
)
from braid.runtime.layers.norm import RMSNorm
from braid.runtime.layers.rotary import RopeRows, RotaryEmbedding
from braid.runtime.memory import KVPool
from braid.runtime.models.config import DecoderConfig


class _Step(NamedTuple):
    """What every layer needs from the current forward besides its hidden states."""

    batch: ForwardBatch
    kv: KVPool
    attn: AttentionBackend
    rope: RopeRows  # RotaryEmbedding.lookup at batch.positions
    fused: bool  # norms, RoPE and activation through the Triton kernels (the backend's choice)


class SelfAttention(nn.Module):
    """This rank's query heads and the KV heads they read (all of them on one rank)."""

    def __init__(self, cfg: DecoderConfig, layer_id: int, tp: TPGroup = SINGLE) -> None:
        super().__init__()
        self.layer_id = layer_id
        q_shard = head_shard(cfg.num_heads, cfg.head_dim, tp)
        kv_shard = head_shard(cfg.num_kv_heads, cfg.head_dim, tp)
        self.head_dim = cfg.head_dim
        self.q_size, self.kv_size = q_shard.size, kv_shard.size
        self.num_heads, self.num_kv_heads = self.q_size // cfg.head_dim, self.kv_size // cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        self.sliding_window = cfg.sliding_windows[layer_id]
        self.qkv_proj = ColumnParallelLinear(cfg.hidden_size, [q_shard, kv_shard, kv_shard], bias=cfg.qkv_bias)
        self.o_proj = RowParallelLinear(q_shard, cfg.hidden_size, bias=cfg.o_bias, tp=tp)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_eps)

    def forward(self, h: torch.Tensor, step: _Step) -> torch.Tensor:
        num_tokens = h.shape[0]
        q, k, v = self.qkv_proj(h).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q, step.fused), self.k_norm(k, step.fused)
        q, k = RotaryEmbedding.apply(q, k, step.rope)
        o = step.attn.forward(self.layer_id, q, k, v, step.batch, step.kv, self.scale, self.sliding_window)
        return self.o_proj(o.reshape(num_tokens, self.q_size))


class GatedMLP(nn.Module):
    def __init__(self, cfg: DecoderConfig, tp: TPGroup = SINGLE) -> None:
        super().__init__()
        width = Shard(cfg.intermediate_size, tp.size, tp.rank)
        self.gate_up_proj = ColumnParallelLinear(cfg.hidden_size, [width, width], bias=cfg.mlp_bias)
        self.down_proj = RowParallelLinear(width, cfg.hidden_size, bias=cfg.mlp_bias, tp=tp)

    def forward(self, h: torch.Tensor, fused: bool) -> torch.Tensor:
        gate_up = self.gate_up_proj(h)  # (T, 2I / tp): [gate, up] of this rank's columns
        act = silu_and_mul_triton(gate_up) if fused else silu_and_mul_reference(gate_up)
        return self.down_proj(act)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DecoderConfig, layer_id: int, tp: TPGroup = SINGLE) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.self_attn = SelfAttention(cfg, layer_id, tp)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.mlp = GatedMLP(cfg, tp)

    def forward(self, h: torch.Tensor, step: _Step) -> torch.Tensor:
        attn_out = self.self_attn(self.input_layernorm(h, step.fused), step)
        normed, h = self.post_attention_layernorm.add_forward(attn_out, h, step.fused)  # residual add fused in
        return h + self.mlp(normed, step.fused)


class DecoderStack(nn.Module):
    def __init__(self, cfg: DecoderConfig, tp: TPGroup = SINGLE) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, tp) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_eps)


# Fused parameter -> the HF projections stacked into it, in order along dim 0.
_FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
# Checkpoint tensors that carry no weights of ours (older exports save the RoPE frequencies).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class CausalLM(nn.Module):
    """Decoder + LM head. ``forward`` runs one ForwardBatch and returns float32 logits
    ``(len(batch.logits_rows), vocab)``; as a side effect each layer's K/V of the new tokens
    are written into ``kv`` at ``batch.out_slots`` (by the attention backend)."""

    def __init__(self, cfg: DecoderConfig, tp: TPGroup = SINGLE) -> None:
        super().__init__()
        check_tp_fits(cfg, tp.size)
        self.config, self.tp = cfg, tp
        self.model = DecoderStack(cfg, tp)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, tp)
        self.rotary = RotaryEmbedding(cfg.rope, cfg.head_dim, cfg.max_positions)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def after_materialize(self) -> None:
        """Call after ``to_empty`` on a model built on the meta device: re-ties the LM head
        (``to_empty`` replaces each parameter separately) and computes the RoPE tables."""
        self.tie_weights()
        self.rotary.build()

    @torch.no_grad()
    def forward(self, batch: ForwardBatch, kv: KVPool, attn: AttentionBackend) -> torch.Tensor:
        h = self.model.embed_tokens(batch.input_ids)  # (T, hidden)
        fused = attn.uses_kernels(h.device)
        step = _Step(batch, kv, attn, self.rotary.lookup(batch.positions, h.dtype, fused), fused)
        for layer in self.model.layers:
            h = layer(h, step)
        # Norm and head only for the rows whose logits are wanted (last token of each prompt).
        h = self.model.norm(h[batch.logits_rows], fused)  # (N, hidden)
        return self.lm_head(h).float()  # (N, vocab)

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named tensors into the parameters (casting dtype, moving device).
        Raises ModelLoadError naming unexpected, missing or wrongly shaped tensors."""
        params = dict(self.named_parameters())
        expected = {hf for name in params for hf in self._hf_names(name)}
        seen: set[str] = set()
        unexpected: list[str] = []
        for hf_name, tensor in weights:
            if hf_name.endswith(_IGNORED_SUFFIXES) or (self.config.tie_embeddings and hf_name == "lm_head.weight"):
                continue
            if hf_name not in expected:
                unexpected.append(hf_name)
                continue
            self._load(params, hf_name, tensor)
            seen.add(hf_name)
        missing = sorted(expected - seen)
        if missing or unexpected:
            raise ModelLoadError(
                f"checkpoint does not match the model: missing {_short(missing)}; unexpected {_short(unexpected)}"
            )

    def _hf_names(self, name: str) -> list[str]:
        """The checkpoint tensors that make up our parameter ``name``."""
        for fused, parts in _FUSED.items():
            if f".{fused}." in name:
                return [name.replace(fused, part) for part in parts]
        return [name]

    def _load(self, params: dict[str, nn.Parameter], hf_name: str, tensor: torch.Tensor) -> None:
        """Copy checkpoint tensor ``hf_name`` (whole) into its parameter: the parallel layers
        take this rank's slice (of part ``i`` of a fused parameter); others take it all."""
        name, part = hf_name, 0
        for fused, parts in _FUSED.items():
            for i, hf_part in enumerate(parts):
                if f".{hf_part}." in hf_name:
                    name, part = hf_name.replace(hf_part, fused), i
        module_name, _, attr = name.rpartition(".")
        module = self.get_submodule(module_name)
        if isinstance(module, SHARDED_LAYERS):
            module.load(attr, part, tensor, hf_name)
            return
        target = params[name]
        if target.shape != tensor.shape:
            raise ModelLoadError(f"tensor {hf_name} has shape {tuple(tensor.shape)}, expected {tuple(target.shape)}")
        target.copy_(tensor)


def check_tp_fits(cfg: DecoderConfig, tp_size: int) -> None:
    """Raise InvalidRequestError (field ``tp_size``) when the model cannot be split ``tp_size`` ways:
    heads and MLP width must divide evenly; KV heads must divide, or be divided by, ``tp_size``."""
    problems = []
    if cfg.num_heads % tp_size:
        problems.append(f"the model's {cfg.num_heads} attention heads")
    if cfg.num_kv_heads % tp_size and tp_size % cfg.num_kv_heads:
        problems.append(f"its {cfg.num_kv_heads} KV heads (a multiple of them is fine too)")
    if cfg.intermediate_size % tp_size:
        problems.append(f"its MLP width {cfg.intermediate_size}")
    if problems:
        raise InvalidRequestError("tp_size", f"got {tp_size}, which does not divide {', '.join(problems)}")


def _short(names: list[str], limit: int = 8) -> str:
    if not names:
        return "none"
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
