"""Convert a llama.cpp GGUF file into a Hugging Face model folder that braid's loader reads.

The folder holds ``config.json``, ``generation_config.json``, ``model.safetensors`` (every tensor
dequantized to one dtype), ``tokenizer.json``, ``tokenizer_config.json`` (with the GGUF's chat
template) and a marker, ``braid_conversion.json``, written last. The folder is built in a temp
folder beside ``out_dir`` and renamed into place, so a crash never leaves a half folder that a
later start would trust: a folder without a marker that matches :func:`conversion_fingerprint`
is incomplete.

Supported GGUF architectures: ``llama`` (SmolLM2, Llama, Mistral-style) and ``qwen2``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from typing import Any

import numpy as np

from braid.errors import MissingPackageError, ModelLoadError

# Bump when the output of a conversion changes, so cached folders from older braids are rebuilt.
CONVERTER_VERSION = 1
MARKER_FILE = "braid_conversion.json"
SUPPORTED_ARCHITECTURES = ("llama", "qwen2")
SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")

_HF_ARCHITECTURE = {"llama": ("LlamaForCausalLM", "llama"), "qwen2": ("Qwen2ForCausalLM", "qwen2")}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_LAYER_NAME = re.compile(r"^blk\.(\d+)\.(.+)$")


def conversion_fingerprint(gguf_path: str, dtype: str = "float32") -> dict[str, Any]:
    """What a converted folder must have been built from; cheap (a ``stat``, no file read)."""
    st = os.stat(gguf_path)
    return {
        "converter_version": CONVERTER_VERSION,
        "source_name": os.path.basename(gguf_path),
        "source_size": st.st_size,
        "source_mtime_ns": st.st_mtime_ns,
        "dtype": dtype,
    }


def is_converted(out_dir: str, gguf_path: str, dtype: str = "float32") -> bool:
    """True when ``out_dir`` is a complete conversion of ``gguf_path`` at ``dtype``.

    Complete means: the marker exists, its fingerprint matches the source file as it is now,
    and every file the marker lists exists with the size it had when written.
    """
    try:
        with open(os.path.join(out_dir, MARKER_FILE), encoding="utf-8") as f:
            marker = json.load(f)
        if marker.get("fingerprint") != conversion_fingerprint(gguf_path, dtype):
            return False
        files = marker.get("files") or {}
        return bool(files) and all(
            os.path.getsize(os.path.join(out_dir, name)) == size for name, size in files.items()
        )
    except (OSError, ValueError, AttributeError):
        return False


def convert_gguf(gguf_path: str, out_dir: str, dtype: str = "float32") -> str:
    """Convert ``gguf_path`` into an HF folder at ``out_dir`` (replaced if present); return ``out_dir``.

    ``dtype`` is one of ``SUPPORTED_DTYPES``; every tensor is dequantized to it. Raises
    ``ModelLoadError`` for an unknown dtype, an unreadable file, or an architecture, tokenizer,
    tensor or quantization this converter does not support; ``MissingPackageError`` without ``gguf``.
    """
    if dtype not in SUPPORTED_DTYPES:
        raise ModelLoadError(f"dtype {dtype!r} is not supported; use one of {', '.join(SUPPORTED_DTYPES)}")
    if not os.path.isfile(gguf_path):
        raise ModelLoadError(f"GGUF file not found: {gguf_path}")
    reader = _open_reader(gguf_path)
    meta = _Metadata(reader)
    arch = meta.architecture()
    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the final folder is an ordinary cache folder
    try:
        _write_tokenizer(gguf_path, meta, tmp)  # first: an unsupported vocabulary fails before the slow part
        tensors = _convert_tensors(reader, meta, arch, dtype)
        config = _hf_config(meta, arch, tensors, dtype)
        _write_weights(tensors, tmp)
        del tensors
        _write_json(os.path.join(tmp, "config.json"), config)
        _write_json(os.path.join(tmp, "generation_config.json"), _generation_config(meta, config))
        _write_marker(tmp, gguf_path, dtype)
        _swap_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _open_reader(gguf_path: str) -> Any:
    try:
        import gguf
    except ImportError as e:
        raise MissingPackageError("reading a GGUF file", "pip install gguf") from e
    try:
        return gguf.GGUFReader(gguf_path)
    except Exception as e:  # the reader raises bare ValueError/struct errors on bad files
        raise ModelLoadError(f"cannot read GGUF file {gguf_path}: {e}") from e


class _Metadata:
    """Typed access to a GGUF's key/value metadata; missing required keys are ModelLoadErrors."""

    def __init__(self, reader: Any) -> None:
        self._fields = reader.fields

    def get(self, key: str, default: Any = None) -> Any:
        field = self._fields.get(key)
        return default if field is None else field.contents()

    def require(self, key: str) -> Any:
        if key not in self._fields:
            raise ModelLoadError(f"GGUF metadata has no {key!r}")
        return self.get(key)

    def architecture(self) -> str:
        arch = self.require("general.architecture")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ModelLoadError(
                f"GGUF architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        return arch


def _hf_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    m = _LAYER_NAME.match(gguf_name)
    if m and m.group(2) in _LAYER_TENSORS:
        return f"model.layers.{m.group(1)}.{_LAYER_TENSORS[m.group(2)]}"
    # rope_freqs (Llama 3 rope scaling) and other extras change the math: refuse, never drop.
    raise ModelLoadError(f"GGUF tensor {gguf_name!r} is not supported by braid's converter")


def _unpermute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation.

    llama.cpp rotates adjacent pairs (x[2i], x[2i+1]); HF's ``rotate_half`` pairs x[i] with
    x[i + d/2]. The GGUF converter therefore interleaved each head's two halves; this puts
    them back. Works for weights (rows, cols) and biases (rows,).
    """
    rows = w.shape[0]
    assert rows % (2 * n_head) == 0, f"{rows} rows do not split into {n_head} heads of even size"
    half = rows // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _convert_tensors(reader: Any, meta: _Metadata, arch: str, dtype: str) -> dict[str, Any]:
    """Dequantize every tensor, rename it to HF, un-permute llama q/k; returns torch tensors."""
    import torch
    from gguf.quants import dequantize

    torch_dtype = getattr(torch, dtype)
    n_head = int(meta.require(f"{arch}.attention.head_count"))
    n_kv = int(meta.get(f"{arch}.attention.head_count_kv", n_head))
    out: dict[str, Any] = {}
    for t in reader.tensors:
        name = _hf_name(t.name)
        try:
            # GGUF lists dims fastest-first; dequantize returns the numpy (rows, cols) order HF uses.
            w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        except NotImplementedError as e:
            raise ModelLoadError(f"GGUF tensor {t.name!r}: quantization {t.tensor_type.name} unsupported") from e
        # Only llama was permuted by llama.cpp's converter; qwen2 uses NeoX-style rope already.
        if arch == "llama" and ".q_proj." in name:
            w = _unpermute_rotary(w, n_head)
        elif arch == "llama" and ".k_proj." in name:
            w = _unpermute_rotary(w, n_kv)
        # F32 tensors are read-only views of the memory-mapped file: copy before handing to torch.
        out[name] = torch.from_numpy(np.require(w, requirements=["C", "W"])).to(torch_dtype)
    for needed in ("model.embed_tokens.weight", "model.norm.weight"):
        if needed not in out:
            raise ModelLoadError(f"GGUF file has no tensor for {needed}")
    return out


def _hf_config(meta: _Metadata, arch: str, tensors: dict[str, Any], dtype: str) -> dict[str, Any]:
    """A ``config.json`` dict for LlamaForCausalLM / Qwen2ForCausalLM from GGUF metadata."""
    hidden = int(meta.require(f"{arch}.embedding_length"))
    n_head = int(meta.require(f"{arch}.attention.head_count"))
    head_dim = int(meta.get(f"{arch}.attention.key_length", hidden // n_head))
    rope_dim = int(meta.get(f"{arch}.rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise ModelLoadError(f"partial rotary (rope dim {rope_dim} < head dim {head_dim}) is not supported")
    vocab_size = int(tensors["model.embed_tokens.weight"].shape[0])
    class_name, model_type = _HF_ARCHITECTURE[arch]
    config: dict[str, Any] = {
        "architectures": [class_name],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": int(meta.require(f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(meta.require(f"{arch}.block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": int(meta.get(f"{arch}.attention.head_count_kv", n_head)),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": float(meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        "rope_scaling": _rope_scaling(meta, arch),
        "max_position_embeddings": int(meta.get(f"{arch}.context_length", 2048)),
        "vocab_size": vocab_size,
        "tie_word_embeddings": "lm_head.weight" not in tensors,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "torch_dtype": dtype,
        "dtype": dtype,
        "initializer_range": 0.02,
        "use_cache": True,
    }
    if arch == "llama":
        config.update(attention_bias="model.layers.0.self_attn.q_proj.bias" in tensors, mlp_bias=False)
    else:
        config.update(use_sliding_window=False, sliding_window=None)
    return config


def _rope_scaling(meta: _Metadata, arch: str) -> dict[str, Any] | None:
    kind = meta.get(f"{arch}.rope.scaling.type")
    if kind in (None, "none"):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(meta.require(f"{arch}.rope.scaling.factor"))}
    raise ModelLoadError(f"GGUF rope scaling {kind!r} is not supported; supported: none, linear")


# Tokens llama.cpp also treats as end-of-generation; a chat model may emit any of them.
_END_OF_TURN_TEXTS = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|end_of_text|>")


def _generation_config(meta: _Metadata, config: dict[str, Any]) -> dict[str, Any]:
    eos = {config["eos_token_id"]} if config["eos_token_id"] is not None else set()
    for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        if meta.get(key) is not None:
            eos.add(int(meta.get(key)))
    tokens = meta.get("tokenizer.ggml.tokens") or []
    types = meta.get("tokenizer.ggml.token_type") or []
    eos.update(i for i, (t, ty) in enumerate(zip(tokens, types)) if ty == 3 and t in _END_OF_TURN_TEXTS)
    return {"bos_token_id": config["bos_token_id"], "eos_token_id": sorted(eos), "do_sample": False}


def _write_weights(tensors: dict[str, Any], out: str) -> None:
    from safetensors.torch import save_file

    save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})


def _write_json(path: str, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def _write_tokenizer(gguf_path: str, meta: _Metadata, out: str) -> None:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` (chat template, special tokens)."""
    tokens = meta.require("tokenizer.ggml.tokens")
    kind = meta.require("tokenizer.ggml.model")
    backend = _byte_level_bpe(meta) if kind == "gpt2" else _transformers_gguf_tokenizer(gguf_path)
    backend.save(os.path.join(out, "tokenizer.json"))
    # sentencepiece ("llama") vocabularies expect BOS unless the file says otherwise, as llama.cpp does.
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama"))
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(meta.get(f"{meta.require('general.architecture')}.context_length", 2048)),
    }
    for name, key in (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"), ("pad_token", "padding")):
        token_id = meta.get(f"tokenizer.ggml.{key}_token_id")
        if token_id is not None and 0 <= token_id < len(tokens):
            config[name] = tokens[token_id]
    template = meta.get("tokenizer.chat_template")
    if template:
        config["chat_template"] = template
    _write_json(os.path.join(out, "tokenizer_config.json"), config)


# llama.cpp pre-tokenizer names (tokenizer.ggml.pre) -> how the original HF tokenizer split text.
_DIGIT_SPLIT_PRE = frozenset({"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"})
_GPT2_PRE = frozenset({"gpt2", "mpt", "olmo", "jais"})
_IGNORE_MERGES_PRE = frozenset({"llama3", "llama-v3", "llama-bpe"})


def _byte_level_bpe(meta: _Metadata) -> Any:
    """A ``tokenizers`` byte-level BPE (GPT-2 style) from the GGUF vocab, merges and token types.

    GGUF stores byte-level tokens already spelled in GPT-2's byte alphabet, so they go in as-is.
    Control tokens (type 3) become special added tokens and user-defined ones (type 4) plain
    added tokens, so that both match whole in text, as in llama.cpp.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    tokens = meta.require("tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in meta.require("tokenizer.ggml.merges")]
    pre = meta.get("tokenizer.ggml.pre", "gpt2")
    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False,
                     byte_fallback=False, ignore_merges=pre in _IGNORE_MERGES_PRE)
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = _pre_tokenizer(pre)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    types = list(meta.get("tokenizer.ggml.token_type") or [])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == 3])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == 4])
    return tok


def _pre_tokenizer(pre: str) -> Any:
    from tokenizers import Regex, pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _GPT2_PRE:
        return byte_level
    if pre in _DIGIT_SPLIT_PRE:  # every digit is its own piece, then GPT-2's split
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    splits: dict[str, str] = {}
    try:  # transformers knows the split regex of many newer vocabularies (qwen2, llama3...)
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS as splits
    except ImportError:
        pass
    if pre not in splits:
        known = sorted(_GPT2_PRE | _DIGIT_SPLIT_PRE | set(splits))
        raise ModelLoadError(f"GGUF pre-tokenizer {pre!r} is not supported; supported: {', '.join(known)}")
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(splits[pre]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def _transformers_gguf_tokenizer(gguf_path: str) -> Any:
    """Non-byte-level vocabularies (sentencepiece...): let transformers' GGUF support build them."""
    try:
        from transformers import AutoTokenizer
    except ImportError as e:
        raise MissingPackageError("converting a GGUF tokenizer", "pip install transformers") from e
    path = os.path.abspath(gguf_path)
    try:
        hf = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                           local_files_only=True)
    except Exception as e:  # transformers raises ValueError/KeyError/OSError for odd files
        raise ModelLoadError(f"cannot build the tokenizer of {gguf_path}: {e}") from e
    return hf.backend_tokenizer


def _write_marker(out: str, gguf_path: str, dtype: str) -> None:
    files = {name: os.path.getsize(os.path.join(out, name)) for name in sorted(os.listdir(out))}
    marker = {"fingerprint": conversion_fingerprint(gguf_path, dtype), "source_path": os.path.abspath(gguf_path),
              "files": files}
    _write_json(os.path.join(out, MARKER_FILE), marker)


def _swap_into_place(tmp: str, out_dir: str) -> None:
    """Rename the finished ``tmp`` to ``out_dir``, moving an old ``out_dir`` aside first."""
    old = None
    if os.path.lexists(out_dir):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=os.path.dirname(out_dir))
        os.replace(out_dir, os.path.join(old, "x"))
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
