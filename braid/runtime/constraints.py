"""The engine's side of constrained decoding: which requests carry a grammar, compiling specs
(on the caller's thread, through the shared cache), per-request matchers and the batch bitmask
(finished JSON is validated by ``braid.grammar.validate``)."""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from braid.errors import InvalidRequestError
from braid.grammar import (
    GrammarCache,
    GrammarError,
    GrammarSpec,
    Matcher,
    check_backend_names,
    create_backend,
    fill_bitmasks,
)
from braid.grammar.base import allocate_bitmask, set_token_bits
from braid.grammar.validate import json_validator
from braid.runtime.kernels.bitmask import apply_bitmask
from braid.runtime.memory import to_device
from braid.runtime.sampling_params import SamplingParams


def spec_of(params: SamplingParams) -> GrammarSpec | None:
    c = params.constraint
    if c is None:
        return None
    if c.kind == "choices":  # a regex every backend can compile: one literal alternative per choice
        return GrammarSpec("regex", choices_regex(params.choices))
    return GrammarSpec(c.kind, c.spec, any_whitespace=params.any_whitespace)


def choices_regex(choices: tuple[str, ...]) -> str:
    """Longest choices first: outlines-core's index keeps only the first alternative that matches
    (``ab|abc`` never yields ``abc``), so a choice that is a prefix of another must come after it."""
    ordered = sorted(set(choices), key=lambda x: (-len(x), x))
    return "(?:" + "|".join("".join("\\" + ch if ch in _REGEX_META else ch for ch in x) for x in ordered) + ")"


_REGEX_META = frozenset("\\.^$|?*+()[]{}")


class Constraints:
    """Owned by the Engine; the backend (and its tokenizer tables) is built on first use."""

    def __init__(self, backend_name: str, tokenizer, vocab_size: int, compile_timeout_s: float = 10.0,
                 pin_masks: bool = False) -> None:
        """``pin_masks`` (logits on CUDA): the step's masks are built in pinned memory, on the
        mask thread, so the main thread's copy to the device is queued at once."""
        check_backend_names(backend_name)  # unknown names fail at engine start
        self.pin_masks = pin_masks
        self.backend_name = backend_name
        self.compile_timeout_s = compile_timeout_s
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._cache: GrammarCache | None = None
        self._control_ids: tuple[list[int], list[int]] | None = None
        self._ban_words: dict[tuple, torch.Tensor] = {}
        self._mask_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="braid-mask")
        self._lock = threading.Lock()
        eos = set(tokenizer.eos_token_ids)
        # special tokens never appear inside constrained text, whatever a backend's mask says
        self.special_ids = sorted(i for i in tokenizer.all_special_ids if i not in eos and i < vocab_size)

    @property
    def cache(self) -> GrammarCache:
        with self._lock:
            if self._cache is None:
                backend = create_backend(self.backend_name, self.tokenizer.hf, self.vocab_size,
                                         sorted(self.tokenizer.eos_token_ids))
                self._cache = GrammarCache(backend, timeout_s=self.compile_timeout_s)
            return self._cache

    def check(self, params: SamplingParams) -> None:
        """Compile the request's grammar now (cached); a bad spec raises InvalidRequestError."""
        spec = spec_of(params)
        if spec is None:
            return
        try:
            self.cache.compiled(spec)
        except GrammarError as e:
            raise InvalidRequestError(f"sampling_params.{params.constraint.kind}", e.problem) from None
        if params.json_schema is not None:
            try:
                json_validator(params.json_schema)
            except Exception:  # reported on the output: validate_json says why
                pass

    def matcher(self, params: SamplingParams) -> Matcher | None:
        spec = spec_of(params)
        return None if spec is None else self.cache.matcher(spec)

    def prepare_masks(self, reqs: list) -> Future | None:
        """Start building the masks of ``reqs`` (rows as ``mask_logits`` will get them) on the
        mask thread, so that the filling overlaps the forward pass; ``None`` if none is
        constrained. The caller must not touch the matchers until ``mask_logits`` has run."""
        if not any(r.matcher is not None for r in reqs):
            return None
        return self._mask_pool.submit(self._build_masks, list(reqs))

    def mask_logits(self, logits: torch.Tensor, reqs: list, prepared: Future | None = None) -> None:
        """Mask each constrained request's row of ``logits`` (``reqs[i]`` owns row ``i``) to its
        grammar and its bans, in place (the Triton kernel on CUDA); unconstrained rows are
        neither read nor written and cost nothing. ``prepared``: from ``prepare_masks(reqs)``."""
        if prepared is None:
            if not any(r.matcher is not None for r in reqs):
                return
            built = self._build_masks(reqs)
        else:
            built = prepared.result()
            assert built[0] == [id(r) for r in reqs], "masks were prepared for other requests"
        _, rows, bitmask = built
        index = None if len(rows) == logits.shape[0] else to_device(rows, torch.int32, logits.device)
        apply_bitmask(logits, to_device(bitmask, torch.int32, logits.device), index)

    def _build_masks(self, reqs: list) -> tuple[list[int], list[int], torch.Tensor]:
        rows = [i for i, r in enumerate(reqs) if r.matcher is not None]
        bitmask = allocate_bitmask(len(rows), self.vocab_size, pin=self.pin_masks)
        fill_bitmasks([reqs[i].matcher for i in rows], bitmask)
        bans = [self.ban_words(reqs[i].params) for i in rows]
        bitmask &= bans[0] if all(b is bans[0] for b in bans) else torch.stack(bans)
        return [id(r) for r in reqs], rows, bitmask

    def banned_ids(self, params: SamplingParams) -> list[int]:
        """Tokens a constrained request may not produce whatever its grammar's mask says:
        special tokens (its own stop tokens excepted) and, for JSON, every token with a control
        character (for free-whitespace JSON: but tokens that are only whitespace). JSON allows
        control characters neither raw inside strings nor as separators; xgrammar's mask was seen
        letting them into strings."""
        banned = [i for i in self.special_ids if i not in params.stop_token_ids]
        if params.json_schema is not None:
            banned += self.control_ids[1] if params.any_whitespace else self.control_ids[0]
        return banned

    def ban_words(self, params: SamplingParams) -> torch.Tensor:
        """``banned_ids(params)`` as bitmask words (bit clear = banned), built once per kind of
        request and ANDed into the grammar's mask, so bans cost the sampler nothing."""
        key = (tuple(i for i in self.special_ids if i in params.stop_token_ids),
               params.json_schema is not None, params.any_whitespace)
        words = self._ban_words.get(key)
        if words is None:
            words = allocate_bitmask(1, self.vocab_size)[0]
            set_token_bits(words, self.banned_ids(params), allowed=False)
            with self._lock:
                words = self._ban_words.setdefault(key, words)
        return words

    @property
    def control_ids(self) -> tuple[list[int], list[int]]:
        """Tokens whose text holds a character below U+0020, and those of them that are not only
        JSON whitespace (decoded once, on first use)."""
        with self._lock:
            if self._control_ids is None:
                n = min(self.vocab_size, len(self.tokenizer))
                texts = self.tokenizer.hf.batch_decode([[i] for i in range(n)])
                control = [i for i, t in enumerate(texts)
                           if any(ord(c) < 0x20 for c in t) and i not in self.tokenizer.eos_token_ids]
                self._control_ids = (control, [i for i in control if texts[i].strip(" \t\n\r")])
            return self._control_ids
