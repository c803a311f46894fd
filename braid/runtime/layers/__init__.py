"""Building blocks shared by the model families: attention backends, RoPE, RMSNorm."""

from __future__ import annotations

from braid.runtime.layers.attention import (
    ATTENTION_BACKENDS,
    AttentionBackend,
    TorchAttention,
    create_attention_backend,
)
from braid.runtime.layers.norm import RMSNorm
from braid.runtime.layers.rotary import RopeSpec, RotaryEmbedding, rope_spec_from_config

__all__ = [
    "ATTENTION_BACKENDS",
    "AttentionBackend",
    "RMSNorm",
    "RopeSpec",
    "RotaryEmbedding",
    "TorchAttention",
    "create_attention_backend",
    "rope_spec_from_config",
]
