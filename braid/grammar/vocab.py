"""The bytes each token id stands for, read from an HF fast tokenizer.

Grammar engines match bytes, not the tokenizer's display strings: a byte-level BPE vocabulary
(GPT-2, Llama 3, Qwen, SmolLM) spells byte ``b`` as a printable stand-in character, and a
SentencePiece vocabulary spells space as ``▁`` and raw bytes as ``<0xNN>``.
"""

from __future__ import annotations

import json


def _byte_level_alphabet() -> dict[str, int]:
    """Stand-in character -> byte, as byte-level BPE defines it: printable Latin-1 bytes stand
    for themselves; the other bytes, in order, take the code points from U+0100 up."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            table[chr(0x100 + extra)] = b
            extra += 1
    return table


def _decoder_kind(hf_tokenizer) -> str:
    try:
        decoder = json.loads(hf_tokenizer.backend_tokenizer.to_str()).get("decoder") or {}
    except AttributeError:  # not a fast tokenizer
        return "text"
    kinds = {decoder.get("type")} | {d.get("type") for d in decoder.get("decoders", [])}
    if "ByteLevel" in kinds:
        return "byte_level"
    if "ByteFallback" in kinds or "Metaspace" in kinds or "Replace" in kinds:
        return "sentencepiece"
    return "text"


def token_bytes(hf_tokenizer, vocab_size: int) -> list[bytes | None]:
    """``result[i]``: the bytes token ``i`` decodes to, or ``None`` for special tokens and ids the
    tokenizer does not define (rows of a padded embedding)."""
    kind = _decoder_kind(hf_tokenizer)
    alphabet = _byte_level_alphabet() if kind == "byte_level" else {}
    special = set(hf_tokenizer.all_special_ids)
    added = {t.content for t in getattr(hf_tokenizer, "added_tokens_decoder", {}).values() if t.special}
    out: list[bytes | None] = [None] * vocab_size
    for text, i in hf_tokenizer.get_vocab().items():
        if i >= vocab_size or i in special or text in added:
            continue
        if kind == "byte_level":
            try:
                out[i] = bytes(alphabet[c] for c in text)
            except KeyError:  # an added plain-text token written as itself
                out[i] = text.encode()
        elif kind == "sentencepiece":
            if len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
                out[i] = bytes([int(text[3:5], 16)])
            else:
                out[i] = text.replace("\u2581", " ").encode()
        else:
            out[i] = text.encode()
    return out
