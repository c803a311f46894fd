"""Load an HF model folder (config.json + safetensors) into a braid model.

The model is constructed on the meta device, so no random initialisation is spent on
parameters the checkpoint overwrites; it is then materialised on the target device in the
target dtype and filled tensor by tensor straight from the (possibly sharded) safetensors.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from braid.errors import InvalidRequestError, ModelLoadError
from braid.runtime.distributed import SINGLE, TPGroup
from braid.runtime.models import ARCHITECTURES, CausalLM, decoder_config_from_hf
from braid.runtime.models.decoder import check_tp_fits

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Spellings found in HF configs' torch_dtype / dtype fields.
_CONFIG_DTYPES = {**DTYPES, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "half": torch.float16}


@dataclass(frozen=True)
class ModelInfo:
    """What the runtime needs to size pools and batches for a loaded model."""

    architecture: str  # the config's architectures[0], e.g. "LlamaForCausalLM"
    num_layers: int
    num_heads: int  # query heads of this rank (all of them without tensor parallelism)
    num_kv_heads: int  # KV heads this rank holds, i.e. per KV pool slot (a shared one counts once)
    head_dim: int
    hidden_size: int
    vocab_size: int
    max_context_len: int  # max_position_embeddings
    dtype: torch.dtype  # of parameters and activations
    sliding_window: int | None  # window of the sliding layers, None when all attend fully
    has_full_attention: bool = True  # some layer attends to the whole sequence (not every layer slides)
    tp_size: int = 1  # tensor-parallel ranks the model is split over


def resolve_dtype(dtype: str, config: dict, device: torch.device | str) -> torch.dtype:
    """``"auto"`` is the config's ``torch_dtype``/``dtype`` on CUDA (bfloat16 if it names none)
    and float32 elsewhere, because reduced precision on the CPU is slow and changes greedy
    answers. Other accepted values: float32, bfloat16, float16 (InvalidRequestError otherwise)."""
    if dtype == "auto":
        if torch.device(device).type != "cuda":
            return torch.float32
        named = config.get("torch_dtype") or config.get("dtype") or "bfloat16"
        if named not in _CONFIG_DTYPES:
            raise ModelLoadError(f"config.json has dtype {named!r}; known: {', '.join(_CONFIG_DTYPES)}")
        return _CONFIG_DTYPES[named]
    if dtype not in DTYPES:
        raise InvalidRequestError("dtype", f"got {dtype!r}; allowed: auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def read_config(folder: str | Path) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ModelLoadError(f"{folder} has no config.json (expected an HF model folder)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path} is not valid JSON: {e}") from e


def load_model(
    folder: str, dtype: str = "auto", device: torch.device | str = "cpu", tp: TPGroup = SINGLE
) -> tuple[CausalLM, ModelInfo]:
    """Build the architecture named in ``folder/config.json`` and load its safetensors (this
    rank's slices of them under tensor parallelism).

    Raises UnknownNameError (architecture not registered; lists the known ones),
    InvalidRequestError (bad ``dtype``; a ``tp_size`` the model's heads do not divide by) or
    ModelLoadError (unreadable folder, missing, unexpected or misshapen tensors, unsupported
    settings)."""
    config = read_config(folder)
    names = config.get("architectures") or []
    if not names:
        raise ModelLoadError(f"{folder}/config.json has no 'architectures' entry")
    architecture = names[0]
    factory = ARCHITECTURES.get(architecture)
    torch_dtype = resolve_dtype(dtype, config, device)
    with torch.device("meta"):
        model = factory(config, tp)
    model = model.to(torch_dtype).to_empty(device=device)
    model.after_materialize()
    model.load_weights(iter_safetensors(folder))
    model.eval()
    cfg, attn = model.config, model.model.layers[0].self_attn
    info = ModelInfo(
        architecture=architecture,
        num_layers=cfg.num_layers,
        num_heads=attn.num_heads,
        num_kv_heads=attn.num_kv_heads,
        head_dim=cfg.head_dim,
        hidden_size=cfg.hidden_size,
        vocab_size=cfg.vocab_size,
        max_context_len=cfg.max_positions,
        dtype=torch_dtype,
        sliding_window=cfg.sliding_window,
        has_full_attention=any(w is None for w in cfg.sliding_windows),
        tp_size=tp.size,
    )
    return model, info


def check_tensor_parallel(folder: str, tp_size: int) -> None:
    """Fail before any process starts when the model in ``folder`` cannot be split ``tp_size``
    ways (InvalidRequestError naming ``tp_size`` and the model's head counts)."""
    if tp_size > 1:
        cfg = decoder_config_from_hf(read_config(folder), qkv_bias=False, o_bias=False, qk_norm=False)
        check_tp_fits(cfg, tp_size)


def safetensors_files(folder: str | Path) -> list[Path]:
    """The checkpoint files: the shards named by ``model.safetensors.index.json``, or the
    single ``model.safetensors``. Raises ModelLoadError when neither exists."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = [folder / name for name in sorted(set(weight_map.values()))]
        absent = [str(f.name) for f in files if not f.is_file()]
        if absent:
            raise ModelLoadError(f"{index} names missing shard files: {', '.join(absent)}")
        return files
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    raise ModelLoadError(f"{folder} has neither model.safetensors nor model.safetensors.index.json")


def iter_safetensors(folder: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) from every checkpoint file, one tensor in memory at a time."""
    for path in safetensors_files(folder):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118  (older safetensors' safe_open is not iterable)
                yield name, f.get_tensor(name)
