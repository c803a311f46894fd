"""braid.runtime.tokenizer.Tokenizer on the converted SmolLM2 folder (and small variants of it)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from braid.errors import InvalidRequestError, ModelLoadError
from braid.runtime.model_source import default_gguf_path
from braid.runtime.tokenizer import Tokenizer

SAMPLES = [
    "Hello world!",
    "12345 apples cost $3.99",
    "héllo wörld 😀🎉 中文 日本語 Ελληνικά",
    "  leading spaces\n\n\ttabs and trailing  ",
    "<|im_start|>user\nhi<|im_end|>\n",
    "don't I'll we've\r\n",
]


@pytest.fixture(scope="module")
def tok(smollm2_hf_dir: str) -> Tokenizer:
    return Tokenizer(smollm2_hf_dir)


def _variant(src: str, dst, config: dict | None = None, tok_config: dict | None = None) -> str:
    """A copy of the folder's tokenizer files with config.json / tokenizer_config.json entries changed."""
    dst.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        shutil.copy(os.path.join(src, name), dst / name)
    for name, changes in (("config.json", config), ("tokenizer_config.json", tok_config)):
        data = json.loads((dst / name).read_text())
        for key, value in (changes or {}).items():
            if value is None:
                data.pop(key, None)
            else:
                data[key] = value
        (dst / name).write_text(json.dumps(data))
    return str(dst)


def test_known_ids_and_round_trip(tok: Tokenizer) -> None:
    assert tok.encode("Hello world!") == [19556, 905, 17]
    assert tok.encode("2024") == [34, 32, 34, 36]  # SmolLM splits digits one by one
    assert tok.encode("<|im_start|>user") == [1, 4093]  # special token text stays whole
    for text in SAMPLES:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert all(0 <= i < tok.vocab_size for i in ids)


# SmolLM2's vocabulary has no token for the bytes 0xF1/0xF2 (UTF-8 lead bytes of U+40000 and up)
# nor for a few control characters: the original tokenizer drops those too, so they are left out.
_ENCODABLE = st.characters(max_codepoint=0x3FFFF, blacklist_categories=("Cs",),
                           blacklist_characters="\x04\x06\x13\x14\x16\x1d")


@settings(max_examples=60, deadline=None)
@given(st.text(_ENCODABLE, max_size=40))
def test_round_trip_any_text(tok: Tokenizer, text: str) -> None:
    assert tok.decode(tok.encode(text)) == text


@settings(max_examples=50, deadline=None)
@given(st.text(_ENCODABLE, max_size=40))
def test_token_bytes_spell_the_text(tok: Tokenizer, text: str) -> None:
    assert b"".join(tok.token_bytes(t) for t in tok.encode(text)) == text.encode()


def test_matches_gguf_vocab_and_transformers_gguf_tokenizer(tok: Tokenizer) -> None:
    import gguf
    from transformers import AutoTokenizer

    path = default_gguf_path()
    tokens = gguf.GGUFReader(path).fields["tokenizer.ggml.tokens"].contents()
    assert tok.vocab_size == len(tokens) == 49152
    assert tok.convert_ids_to_tokens(range(len(tokens))) == tokens
    ref = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    for text in SAMPLES:
        assert tok.encode(text) == ref.encode(text, add_special_tokens=False), text


def test_special_ids_and_no_bos_by_default(tok: Tokenizer) -> None:
    assert tok.eos_token_ids == frozenset({0, 2})  # <|im_end|> from config, <|endoftext|> from generation_config
    assert {0, 1, 2} <= tok.all_special_ids
    assert tok.decode([1, 19556, 2], skip_special_tokens=True) == "Hello"
    assert tok.encode("Hello", add_special_tokens=True) == [19556]  # add_bos_token is false for SmolLM2


def test_bos_only_when_config_asks(tok: Tokenizer, smollm2_hf_dir: str, tmp_path) -> None:
    folder = _variant(smollm2_hf_dir, tmp_path / "bos", tok_config={"add_bos_token": True})
    bos = Tokenizer(folder)
    assert bos.encode("Hello", add_special_tokens=True) == [1, 19556]
    assert bos.encode("Hello") == [19556]


def test_eos_ids_from_int_list_and_generation_config(smollm2_hf_dir: str, tmp_path) -> None:
    folder = _variant(smollm2_hf_dir, tmp_path / "eos", config={"eos_token_id": [2, 5]})
    assert Tokenizer(folder).eos_token_ids == frozenset({2, 5})  # no generation_config.json copied
    with open(os.path.join(folder, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": 7}, f)
    assert Tokenizer(folder).eos_token_ids == frozenset({2, 5, 7})


def test_chat_template_renders_roles(tok: Tokenizer) -> None:
    assert tok.has_chat_template
    text = tok.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    no_prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=False)
    assert no_prompt.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert no_prompt.endswith("<|im_start|>user\nHi<|im_end|>\n")


def test_bad_messages_and_missing_template(tok: Tokenizer, smollm2_hf_dir: str, tmp_path) -> None:
    for bad in ([], "hi", [{"content": "x"}], [{"role": "user", "content": 3}]):
        with pytest.raises(InvalidRequestError) as e:
            tok.apply_chat_template(bad)
        assert e.value.field == "messages"
    plain = Tokenizer(_variant(smollm2_hf_dir, tmp_path / "plain", tok_config={"chat_template": None}))
    assert not plain.has_chat_template
    with pytest.raises(InvalidRequestError, match="no chat template") as e:
        plain.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert e.value.field == "messages"


def test_invalid_text_is_a_request_error(tok: Tokenizer) -> None:
    for bad in ("ok \ud800 lone surrogate", b"bytes"):
        with pytest.raises(InvalidRequestError) as e:
            tok.encode(bad)  # type: ignore[arg-type]
        assert e.value.field == "text"


def test_missing_folder_is_a_load_error(tmp_path) -> None:
    with pytest.raises(ModelLoadError, match="nowhere"):
        Tokenizer(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError):
        Tokenizer(str(tmp_path / "empty"))
