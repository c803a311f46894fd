"""Model architectures by HF ``config["architectures"]`` name.

Every entry is a factory ``(hf_config: dict) -> CausalLM``: a family is only the flags it
sets on the shared decoder. Register a new family with ``@ARCHITECTURES.register("Name")``.
"""

from __future__ import annotations

from braid.registry import Registry
from braid.runtime.models.config import DecoderConfig, decoder_config_from_hf
from braid.runtime.models.decoder import CausalLM

ARCHITECTURES: Registry[CausalLM] = Registry("model architecture")


@ARCHITECTURES.register("LlamaForCausalLM")
def llama(config: dict) -> CausalLM:
    bias = bool(config.get("attention_bias", False))
    return CausalLM(
        decoder_config_from_hf(
            config, qkv_bias=bias, o_bias=bias, qk_norm=False, mlp_bias=bool(config.get("mlp_bias", False))
        )
    )


@ARCHITECTURES.register("MistralForCausalLM")
def mistral(config: dict) -> CausalLM:
    return CausalLM(decoder_config_from_hf(config, qkv_bias=False, o_bias=False, qk_norm=False))


@ARCHITECTURES.register("Qwen2ForCausalLM")
def qwen2(config: dict) -> CausalLM:
    return CausalLM(decoder_config_from_hf(config, qkv_bias=True, o_bias=False, qk_norm=False))


@ARCHITECTURES.register("Qwen3ForCausalLM")
def qwen3(config: dict) -> CausalLM:
    bias = bool(config.get("attention_bias", False))
    return CausalLM(decoder_config_from_hf(config, qkv_bias=bias, o_bias=bias, qk_norm=True))


__all__ = ["ARCHITECTURES", "CausalLM", "DecoderConfig", "decoder_config_from_hf"]
