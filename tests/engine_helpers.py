"""Engines on tiny random models: a byte-level tokenizer saved beside the weights, and a
transformers greedy reference to compare against."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.helpers import make_random_model

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France; Berlin is the capital of Germany.",
    "Tokens, caches and schedulers: continuous batching with chunked prefill.",
    "café, naïve, 日本語, emoji 🙂 and numbers 12345.",
]
EOS_TEXT = "<|endoftext|>"


def add_byte_tokenizer(folder: str, vocab_size: int) -> None:
    """Train a byte-level BPE of exactly ``vocab_size`` entries and save it as HF files."""
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(_CORPUS * 20, vocab_size=vocab_size, min_frequency=1, special_tokens=[EOS_TEXT])
    tok.save(str(Path(folder) / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS_TEXT, "bos_token": None,
           "model_max_length": 4096, "add_bos_token": False}
    (Path(folder) / "tokenizer_config.json").write_text(json.dumps(cfg))


def make_engine_model(arch: str, tmp_path, **overrides) -> str:
    """A tiny random checkpoint of ``arch`` with a matching tokenizer; EOS is token 0."""
    folder = make_random_model(arch, tmp_path, eos_token_id=0, bos_token_id=0, **overrides)
    vocab = json.loads((Path(folder) / "config.json").read_text())["vocab_size"]
    add_byte_tokenizer(folder, vocab)
    return folder


@torch.no_grad()
def hf_greedy(hf_model, prompt: list[int], steps: int) -> tuple[list[int], list[float]]:
    """transformers' greedy continuation with the logprob of each chosen token (full recompute)."""
    ids = list(prompt)
    out, lps = [], []
    for _ in range(steps):
        logits = hf_model(torch.tensor([ids])).logits[0, -1].float()
        lp = torch.log_softmax(logits, -1)
        tok = int(torch.argmax(logits))
        out.append(tok)
        lps.append(float(lp[tok]))
        ids.append(tok)
    return out, lps


def random_prompts(count: int, lo: int, hi: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi + 1, (count,), generator=g).tolist()
    return [torch.randint(1, vocab, (n,), generator=g).tolist() for n in lens]
