"""One decoder-only transformer shared by Llama, Mistral, Qwen2 and Qwen3.

The families differ only in flags of :class:`DecoderConfig` (biases, q/k norm, head_dim,
sliding window, RoPE scaling). Module names mirror HF's (``model.layers.N.self_attn...``) so
checkpoint names map one to one, except the fused ``qkv_proj`` and ``gate_up_proj``, which
``load_weights`` fills from the separate HF projections.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import torch
from torch import nn

from braid.errors import ModelLoadError
from braid.runtime.forward_batch import ForwardBatch
from braid.runtime.kernels.activation import silu_and_mul_reference, silu_and_mul_triton
from braid.runtime.layers.attention import AttentionBackend
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
    def __init__(self, cfg: DecoderConfig, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        self.sliding_window = cfg.sliding_windows[layer_id]
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=cfg.o_bias)
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
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, h: torch.Tensor, fused: bool) -> torch.Tensor:
        gate_up = self.gate_up_proj(h)  # (T, 2I): [gate, up]
        act = silu_and_mul_triton(gate_up) if fused else silu_and_mul_reference(gate_up)
        return self.down_proj(act)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DecoderConfig, layer_id: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.self_attn = SelfAttention(cfg, layer_id)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.mlp = GatedMLP(cfg)

    def forward(self, h: torch.Tensor, step: _Step) -> torch.Tensor:
        attn_out = self.self_attn(self.input_layernorm(h, step.fused), step)
        normed, h = self.post_attention_layernorm.add_forward(attn_out, h, step.fused)  # residual add fused in
        return h + self.mlp(normed, step.fused)


class DecoderStack(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_eps)


# Fused parameter -> the HF projections stacked into it, in order along dim 0.
_FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
# Checkpoint tensors that carry no weights of ours (older exports save the RoPE frequencies).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class CausalLM(nn.Module):
    """Decoder + LM head. ``forward`` runs one ForwardBatch and returns float32 logits
    ``(len(batch.logits_rows), vocab)``; as a side effect each layer's K/V of the new tokens
    are written into ``kv`` at ``batch.out_slots`` (by the attention backend)."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = DecoderStack(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
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
            target = self._target(params, hf_name)
            if target.shape != tensor.shape:
                raise ModelLoadError(
                    f"tensor {hf_name} has shape {tuple(tensor.shape)}, expected {tuple(target.shape)}"
                )
            target.copy_(tensor)
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

    def _target(self, params: dict[str, nn.Parameter], hf_name: str) -> torch.Tensor:
        """The parameter, or the rows of a fused parameter, that ``hf_name`` fills."""
        for fused, parts in _FUSED.items():
            for i, part in enumerate(parts):
                if f".{part}." in hf_name:
                    param = params[hf_name.replace(part, fused)]
                    sizes = self._fused_sizes(fused)
                    return param.narrow(0, sum(sizes[:i]), sizes[i])
        return params[hf_name]

    def _fused_sizes(self, fused: str) -> list[int]:
        cfg = self.config
        if fused == "qkv_proj":
            kv = cfg.num_kv_heads * cfg.head_dim
            return [cfg.num_heads * cfg.head_dim, kv, kv]
        return [cfg.intermediate_size, cfg.intermediate_size]


def _short(names: list[str], limit: int = 8) -> str:
    if not names:
        return "none"
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
