"""The tokenizer the engine front uses: a thin wrapper over a HF fast tokenizer in a model folder.

It pins down the few behaviours the runtime depends on, whatever the folder's tokenizer class:

- ``encode`` never adds special tokens by default; with ``add_special_tokens=True`` it prepends
  BOS only when the tokenizer config says ``add_bos_token`` (never EOS). Special tokens written
  in the text itself (``<|im_start|>`` from a chat template) are always recognised whole.
- ``eos_token_ids`` is the union of every id the folder calls end-of-sequence.
- ``decode`` never "cleans up" spaces, so decoding is the exact inverse of encoding.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

from braid.errors import InvalidRequestError, MissingPackageError, ModelLoadError


class Tokenizer:
    """Text <-> token ids for one model folder (loaded from local files only).

    Parameters
    ----------
    model_dir:
        An HF model folder with ``tokenizer.json`` (or files AutoTokenizer can read locally).

    Raises ``ModelLoadError`` when the folder has no readable tokenizer.
    """

    def __init__(self, model_dir: str) -> None:
        self.model_dir = model_dir
        self.hf = _load_hf_tokenizer(model_dir)
        tok_config = _read_json(os.path.join(model_dir, "tokenizer_config.json"))
        self.add_bos_token: bool = bool(tok_config.get("add_bos_token", False))
        self.bos_token_id: int | None = self.hf.bos_token_id
        self.eos_token_ids: frozenset[int] = _collect_eos_ids(model_dir, self.hf.eos_token_id)
        self.all_special_ids: frozenset[int] = frozenset(self.hf.all_special_ids)
        # len() counts added tokens; the model's embedding may still have more rows (padding).
        self.vocab_size: int = len(self.hf)
        self._bytes: list[bytes | None] | None = None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``; BOS first only if ``add_special_tokens`` and the model wants BOS.

        Raises ``InvalidRequestError("text", ...)`` for a non-string or text with lone surrogates.
        Characters whose bytes the vocabulary lacks are dropped, as by the original tokenizer.
        """
        if not isinstance(text, str):
            raise InvalidRequestError("text", f"must be a string, got {type(text).__name__}")
        try:
            ids = self.hf.encode(text, add_special_tokens=False)
        except TypeError:
            _check_unicode(text)  # lone surrogates (legal in JSON escapes) are a user error
            raise
        if add_special_tokens and self.add_bos_token and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        return list(ids)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; a prefix of a multi-byte character decodes to U+FFFD."""
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes token ``token_id`` stands for (a piece of a UTF-8 character for some byte
        tokens); a special token's are its text's."""
        if self._bytes is None:  # built on first use: only logprob responses need it
            from braid.grammar.vocab import token_bytes

            self._bytes = token_bytes(self.hf, self.vocab_size)
        raw = self._bytes[token_id] if 0 <= token_id < len(self._bytes) else None
        return raw if raw is not None else self.decode([token_id]).encode()

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        """The vocabulary strings (byte-level spelling for GPT-2 style vocabularies) of ``ids``."""
        return list(self.hf.convert_ids_to_tokens(list(ids)))

    @property
    def has_chat_template(self) -> bool:
        """True when the folder defines a chat template."""
        return bool(getattr(self.hf, "chat_template", None))

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render ``messages`` (dicts with string ``role`` and ``content``) with the model's template.

        Raises ``InvalidRequestError("messages", ...)`` for malformed messages, a model without
        a template, or a template that rejects the conversation (e.g. roles out of order).
        """
        _check_messages(messages)
        if not self.has_chat_template:
            raise InvalidRequestError("messages", "this model has no chat template; send a plain prompt instead")
        try:
            text = self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        except Exception as e:  # jinja's TemplateError and raise_exception() in templates
            raise InvalidRequestError("messages", f"the model's chat template rejected them: {e}") from e
        assert isinstance(text, str), f"apply_chat_template returned {type(text).__name__}"
        return text

    def __len__(self) -> int:
        return self.vocab_size


def _load_hf_tokenizer(model_dir: str) -> Any:
    """The folder's fast tokenizer.

    With a ``tokenizer.json`` the generic fast class reads it as written: AutoTokenizer would
    first load the model config, which imports torch's distributed stack (~4 s at every start),
    and a model-specific class may rebuild parts of the pipeline the file already defines.
    """
    try:
        from transformers import AutoTokenizer, PreTrainedTokenizerFast
    except ImportError as e:
        raise MissingPackageError("loading a tokenizer", "pip install transformers tokenizers") from e
    if not os.path.isdir(model_dir):
        raise ModelLoadError(f"tokenizer folder not found: {model_dir}")
    has_json = os.path.isfile(os.path.join(model_dir, "tokenizer.json"))
    loader = PreTrainedTokenizerFast if has_json else AutoTokenizer
    try:
        tok = loader.from_pretrained(model_dir, local_files_only=True)
    except Exception as e:  # transformers raises OSError/ValueError/KeyError for missing or odd files
        raise ModelLoadError(f"cannot load the tokenizer in {model_dir}: {e}") from e
    if not getattr(tok, "is_fast", False):
        raise ModelLoadError(f"the tokenizer in {model_dir} is not a fast (tokenizers) tokenizer")
    return tok


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read {path}: {e}") from e
    return data if isinstance(data, dict) else {}


def _as_ids(value: Any) -> set[int]:
    """config files write eos_token_id as an int, a list of ints, or null."""
    if value is None:
        return set()
    if isinstance(value, int):
        return {value}
    return {int(v) for v in value if v is not None}


def _collect_eos_ids(model_dir: str, tokenizer_eos: int | None) -> frozenset[int]:
    ids = _as_ids(_read_json(os.path.join(model_dir, "config.json")).get("eos_token_id"))
    ids |= _as_ids(_read_json(os.path.join(model_dir, "generation_config.json")).get("eos_token_id"))
    ids |= _as_ids(tokenizer_eos)
    return frozenset(ids)


def _check_unicode(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidRequestError("text", f"is not valid Unicode ({e.reason} at position {e.start})") from e


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("messages", "must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise InvalidRequestError("messages", f"item {i} must be a dict with a string 'role'")
        if not isinstance(m.get("content"), str):
            raise InvalidRequestError("messages", f"item {i} ({m['role']}) must have a string 'content'")
