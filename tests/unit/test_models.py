"""braid's models and loader against transformers on tiny random checkpoints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from braid.errors import InvalidRequestError, ModelLoadError, UnknownNameError
from braid.runtime.loader import load_model, resolve_dtype
from tests.helpers import PRESETS, bare_forward, hf_logits, load_hf, make_random_model

ARCHS = sorted(PRESETS)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, str]:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("models")
    return {arch: make_random_model(arch, root) for arch in ARCHS}


@pytest.fixture(scope="module")
def loaded(folders):
    return {arch: load_model(folder) for arch, folder in folders.items()}


def random_prompts(vocab: int, lengths: list[int], seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]


def max_logprob_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.log_softmax(-1) - b.log_softmax(-1)).abs().max())


@pytest.mark.parametrize("arch", ARCHS)
def test_prefill_and_decode_match_transformers(arch, folders, loaded):
    model, info = loaded[arch]
    steps = 10
    [prompt] = random_prompts(info.vocab_size, [13], seed=len(arch))
    run = bare_forward(model, info, [prompt], steps)
    tokens = run.tokens[0]
    expected = hf_logits(load_hf(folders[arch]), prompt + tokens[:steps])  # (13 + steps, V)
    got = run.sequence_logits(0)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert max_logprob_diff(got, expected) < 1e-3
    assert expected[len(prompt) - 1 :].argmax(-1).tolist() == tokens  # greedy path identical
    assert len(set(tokens)) > 1, "degenerate model: greedy output is one repeated token"


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_and_chunked_equal_unbatched(arch, loaded):
    model, info = loaded[arch]
    prompts = random_prompts(info.vocab_size, [5, 12, 9], seed=100 + len(arch))
    alone = [bare_forward(model, info, [p], 6) for p in prompts]
    batched = bare_forward(model, info, prompts, 6)  # one extend batch, then batched decode
    chunked = bare_forward(model, info, prompts, 6, chunk_size=4)  # extends over cached prefixes
    for i, ref in enumerate(alone):
        for run in (batched, chunked):
            assert run.tokens[i] == ref.tokens[0]
            assert max_logprob_diff(run.sequence_logits(i), ref.sequence_logits(0)) < 1e-4


def test_model_info(loaded):
    info = loaded["qwen3"][1]
    assert (info.architecture, info.head_dim, info.num_heads, info.num_kv_heads, info.hidden_size) == (
        "Qwen3ForCausalLM", 32, 4, 2, 64,
    )  # fmt: skip
    assert info.dtype == torch.float32 and info.max_context_len == 256 and info.sliding_window is None
    assert loaded["mistral"][1].sliding_window == 7
    assert loaded["llama"][1].num_layers == 3


def test_tied_embeddings_share_one_matrix(loaded):
    model, _ = loaded["llama_tied"]
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_sharded_checkpoint_loads_the_same(tmp_path, loaded):
    folder = make_random_model("qwen2", tmp_path, max_shard_size="40KB")
    assert (Path(folder) / "model.safetensors.index.json").is_file()
    sharded, _ = load_model(folder)
    single, _ = loaded["qwen2"]
    for (name, a), (_, b) in zip(sharded.state_dict().items(), single.state_dict().items()):
        assert torch.equal(a, b), name


def _copy_with(folder: str, tmp_path: Path, edit_config=None, edit_tensors=None) -> str:
    out = tmp_path / "edited"
    shutil.copytree(folder, out)
    if edit_config:
        cfg = json.loads((out / "config.json").read_text())
        edit_config(cfg)
        (out / "config.json").write_text(json.dumps(cfg))
    if edit_tensors:
        tensors = load_file(out / "model.safetensors")
        edit_tensors(tensors)
        save_file(tensors, out / "model.safetensors")
    return str(out)


def test_unknown_architecture_lists_known(tmp_path, folders):
    folder = _copy_with(folders["llama"], tmp_path, edit_config=lambda c: c.update(architectures=["FooForCausalLM"]))
    with pytest.raises(UnknownNameError) as e:
        load_model(folder)
    for known in ("FooForCausalLM", "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        assert known in str(e.value)


def test_missing_and_unexpected_tensors_are_named(tmp_path, folders):
    def edit(t):
        del t["model.layers.1.mlp.up_proj.weight"]
        t["model.layers.1.extra.weight"] = torch.ones(2)

    folder = _copy_with(folders["llama"], tmp_path, edit_tensors=edit)
    with pytest.raises(ModelLoadError, match="model.layers.1.mlp.up_proj.weight") as e:
        load_model(folder)
    assert "model.layers.1.extra.weight" in str(e.value)


def test_misshapen_tensor_is_named(tmp_path, folders):
    def edit(t):
        t["model.layers.0.self_attn.k_proj.weight"] = torch.randn(3, 64)

    with pytest.raises(ModelLoadError, match="k_proj.weight"):
        load_model(_copy_with(folders["qwen3"], tmp_path, edit_tensors=edit))


def test_unsupported_rope_type_is_rejected(tmp_path, folders):
    def edit(cfg):
        cfg["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0}

    with pytest.raises(ModelLoadError, match="yarn"):
        load_model(_copy_with(folders["llama"], tmp_path, edit_config=edit))


def test_dtype_resolution():
    with pytest.raises(InvalidRequestError, match="bfloat16") as e:
        resolve_dtype("int8", {}, "cpu")
    assert e.value.field == "dtype" and "float32" in str(e.value)
    assert resolve_dtype("auto", {"torch_dtype": "bfloat16"}, "cpu") == torch.float32
    assert resolve_dtype("auto", {"torch_dtype": "float16"}, "cuda") == torch.float16
    assert resolve_dtype("auto", {"dtype": "bfloat16"}, torch.device("cuda", 0)) == torch.bfloat16
    assert resolve_dtype("bfloat16", {}, "cpu") == torch.bfloat16


def test_bfloat16_load_keeps_float32_logits(folders):
    model, info = load_model(folders["qwen3"], dtype="bfloat16")
    assert info.dtype == torch.bfloat16 and model.lm_head.weight.dtype == torch.bfloat16
    [prompt] = random_prompts(info.vocab_size, [6], seed=3)
    run = bare_forward(model, info, [prompt], 2)
    assert run.prompt_logits[0].dtype == torch.float32 and torch.isfinite(run.prompt_logits[0]).all()
