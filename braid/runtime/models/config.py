"""The decoder's view of an HF ``config.json``: one frozen dataclass for every family."""

from __future__ import annotations

from dataclasses import dataclass

from braid.errors import ModelLoadError
from braid.runtime.layers.rotary import RopeSpec, rope_spec_from_config


@dataclass(frozen=True)
class DecoderConfig:
    hidden_size: int  # width of the residual stream
    num_layers: int  # decoder blocks
    num_heads: int  # query heads
    num_kv_heads: int  # key/value heads (GQA when fewer than num_heads)
    head_dim: int  # per-head width; may differ from hidden_size // num_heads (Qwen3)
    intermediate_size: int  # MLP width
    vocab_size: int  # rows of the embedding and of the LM head
    rms_eps: float  # RMSNorm epsilon
    max_positions: int  # max_position_embeddings: length of the rotary tables
    rope: RopeSpec  # rotary settings, scaling included
    tie_embeddings: bool  # LM head shares the embedding matrix
    qkv_bias: bool  # bias on the q/k/v projections (Qwen2, Llama attention_bias)
    o_bias: bool  # bias on the attention output projection (Llama attention_bias)
    mlp_bias: bool  # bias on the MLP projections (Llama mlp_bias)
    qk_norm: bool  # per-head RMSNorm on q and k before RoPE (Qwen3)
    sliding_windows: tuple[int | None, ...]  # per layer: attention window, None = full

    @property
    def sliding_window(self) -> int | None:
        """The window of the layers that use one (None when every layer attends fully)."""
        windows = {w for w in self.sliding_windows if w is not None}
        assert len(windows) <= 1, f"layers use different windows {windows}"
        return windows.pop() if windows else None


def _require(config: dict, key: str) -> int:
    if config.get(key) is None:
        raise ModelLoadError(f"config.json has no {key!r}")
    return int(config[key])


def _sliding_windows(config: dict, num_layers: int) -> tuple[int | None, ...]:
    window = config.get("sliding_window")
    layer_types = config.get("layer_types")
    if layer_types is not None:  # newer configs say per layer which ones slide
        if len(layer_types) != num_layers:
            raise ModelLoadError(f"layer_types has {len(layer_types)} entries for {num_layers} layers")
        return tuple(window if t == "sliding_attention" else None for t in layer_types)
    if config.get("use_sliding_window") is False:  # Qwen2 ships a window but disables it
        window = None
    return (window,) * num_layers


def decoder_config_from_hf(
    config: dict, *, qkv_bias: bool, o_bias: bool, qk_norm: bool, mlp_bias: bool = False
) -> DecoderConfig:
    """Parse an HF config dict; family flags come from the caller (the architecture entry).
    Raises ModelLoadError naming a missing key or an unsupported setting."""
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise ModelLoadError(f"hidden_act {act!r} is not supported; supported: silu")
    hidden = _require(config, "hidden_size")
    num_heads = _require(config, "num_attention_heads")
    num_layers = _require(config, "num_hidden_layers")
    num_kv_heads = int(config.get("num_key_value_heads") or num_heads)
    if num_heads % num_kv_heads:
        raise ModelLoadError(f"num_attention_heads {num_heads} is not a multiple of num_key_value_heads {num_kv_heads}")
    return DecoderConfig(
        hidden_size=hidden,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=int(config.get("head_dim") or hidden // num_heads),
        intermediate_size=_require(config, "intermediate_size"),
        vocab_size=_require(config, "vocab_size"),
        rms_eps=float(config.get("rms_norm_eps", 1e-6)),
        max_positions=_require(config, "max_position_embeddings"),
        rope=rope_spec_from_config(config),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        mlp_bias=mlp_bias,
        qk_norm=qk_norm,
        sliding_windows=_sliding_windows(config, num_layers),
    )
