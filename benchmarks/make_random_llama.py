"""Write a random-weight Llama-3.1-8B-shaped checkpoint (config.json + safetensors + tokenizer),
generated on the GPU, so benchmarks load it through braid's own loader like a real model.

    python -m benchmarks.make_random_llama OUT_DIR [--layers 32] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from safetensors.torch import save_file

LLAMA31_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256, "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192},
    "bos_token_id": 0, "eos_token_id": 0, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
}  # fmt: skip


def layer_tensors(cfg: dict, i: int, dtype: torch.dtype, device: str) -> dict[str, torch.Tensor]:
    h, f, d = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d
    shapes = {
        "self_attn.q_proj": (q, h),
        "self_attn.k_proj": (kv, h),
        "self_attn.v_proj": (kv, h),
        "self_attn.o_proj": (h, q),
        "mlp.gate_proj": (f, h),
        "mlp.up_proj": (f, h),
        "mlp.down_proj": (h, f),
    }
    out = {
        f"model.layers.{i}.{k}.weight": torch.randn(s, device=device, dtype=dtype) * s[1] ** -0.5
        for k, s in shapes.items()
    }
    for norm in ("input_layernorm", "post_attention_layernorm"):
        out[f"model.layers.{i}.{norm}.weight"] = 1 + 0.1 * torch.randn(h, device=device, dtype=dtype)
    return out


def write(
    out_dir: str,
    layers: int,
    dtype: torch.dtype,
    device: str,
    tokenizer_from: str | None,
    overrides: dict | None = None,
) -> str:
    cfg = {
        **LLAMA31_8B,
        **(overrides or {}),
        "num_hidden_layers": layers,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    os.makedirs(out_dir, exist_ok=True)
    h, v = cfg["hidden_size"], cfg["vocab_size"]
    files = {}
    for i in range(layers):
        name = f"model-layer{i:03d}.safetensors"
        tensors = layer_tensors(cfg, i, dtype, device)
        save_file({k: t.cpu() for k, t in tensors.items()}, os.path.join(out_dir, name))
        files.update({k: name for k in tensors})
    top = {
        "model.embed_tokens.weight": torch.randn(v, h, device=device, dtype=dtype),
        "lm_head.weight": torch.randn(v, h, device=device, dtype=dtype) * h**-0.5,
        "model.norm.weight": torch.ones(h, device=device, dtype=dtype),
    }
    save_file({k: t.cpu() for k, t in top.items()}, os.path.join(out_dir, "model-top.safetensors"))
    files.update({k: "model-top.safetensors" for k in top})
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {}, "weight_map": files}, fh)
    with open(os.path.join(out_dir, "config.json"), "w") as fh:
        json.dump(cfg, fh)
    if tokenizer_from:  # any tokenizer decodes the ids it knows; benchmarks use input_ids
        import shutil

        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(os.path.join(tokenizer_from, f), out_dir)
    return out_dir


# a model small enough for a CPU dry run of a benchmark script
DRY_RUN_SHAPE = {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2,
                 "head_dim": 64}


def ensure_model(out_dir: str, layers: int, device: torch.device, dry_run: bool, **dry_overrides) -> str:
    """The benchmark model at ``out_dir``, written first if it is not there: the Llama-3.1-8B shape,
    or, for ``dry_run``, a tiny one (``dry_overrides`` on top, e.g. ``vocab_size``). The tokenizer
    comes from ``$BRAID_TOKENIZER_DIR`` when set."""
    if not os.path.exists(os.path.join(out_dir, "config.json")):
        shape = {**DRY_RUN_SHAPE, **dry_overrides} if dry_run else {}
        write(out_dir, layers, torch.bfloat16, device.type, os.environ.get("BRAID_TOKENIZER_DIR"), shape)
    return out_dir


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out_dir")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--tokenizer-from", default=None)
    a = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    write(a.out_dir, a.layers, getattr(torch, a.dtype), device, a.tokenizer_from)


if __name__ == "__main__":
    main()
