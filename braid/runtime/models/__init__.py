"""Model architectures by HF ``config["architectures"]`` name.

Every entry is a factory ``(hf_config: dict, tp: TPGroup = SINGLE) -> CausalLM``: a family is
only the flags it sets on the shared decoder; ``tp`` is the rank's tensor-parallel group.
Register a new family with ``@ARCHITECTURES.register("Name")``.
"""

from __future__ import annotations

from braid.registry import Registry
from braid.runtime.distributed import SINGLE, TPGroup
from braid.runtime.models.config import DecoderConfig, decoder_config_from_hf
from braid.runtime.models.decoder import CausalLM

ARCHITECTURES: Registry[CausalLM] = Registry("model architecture")


@ARCHITECTURES.register("LlamaForCausalLM")
def llama(config: dict, tp: TPGroup = SINGLE) -> CausalLM:
    bias = bool(config.get("attention_bias", False))
    return CausalLM(
        decoder_config_from_hf(
            config, qkv_bias=bias, o_bias=bias, qk_norm=False, mlp_bias=bool(config.get("mlp_bias", False))
        ),
        tp,
    )


@ARCHITECTURES.register("MistralForCausalLM")
def mistral(config: dict, tp: TPGroup = SINGLE) -> CausalLM:
    return CausalLM(decoder_config_from_hf(config, qkv_bias=False, o_bias=False, qk_norm=False), tp)


@ARCHITECTURES.register("Qwen2ForCausalLM")
def qwen2(config: dict, tp: TPGroup = SINGLE) -> CausalLM:
    return CausalLM(decoder_config_from_hf(config, qkv_bias=True, o_bias=False, qk_norm=False), tp)


@ARCHITECTURES.register("Qwen3ForCausalLM")
def qwen3(config: dict, tp: TPGroup = SINGLE) -> CausalLM:
    bias = bool(config.get("attention_bias", False))
    return CausalLM(decoder_config_from_hf(config, qkv_bias=bias, o_bias=bias, qk_norm=True), tp)


__all__ = ["ARCHITECTURES", "CausalLM", "DecoderConfig", "decoder_config_from_hf"]
