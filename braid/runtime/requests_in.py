"""Validation and tokenization of ``Engine.generate`` arguments, before anything is queued:
a bad request raises InvalidRequestError naming the field and leaves the engine untouched."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from braid.errors import InvalidRequestError
from braid.runtime.messages import AddRequest, new_rid
from braid.runtime.sampling_params import SamplingParams


@dataclass(frozen=True)
class GenerateInput:
    items: list[AddRequest]  # one per (prompt, sample), prompt-major
    warmups: list[AddRequest]  # n > 1: one prefill-only request per prompt, run first
    is_batch: bool
    n: int


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise InvalidRequestError(name, f"expected true or false, got {value!r}")


def _check_int(name: str, value: Any, lo: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise InvalidRequestError(name, f"expected an integer >= {lo}, got {value!r}")


def _prompts_to_ids(engine, prompt: Any, input_ids: Any) -> tuple[list[list[int]], bool]:
    if (prompt is None) == (input_ids is None):
        raise InvalidRequestError("prompt", "give exactly one of prompt and input_ids")
    if prompt is not None:
        is_batch = isinstance(prompt, list)
        texts = prompt if is_batch else [prompt]
        if not texts:
            raise InvalidRequestError("prompt", "empty list")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise InvalidRequestError(
                    "prompt", f"expected a string or a list of strings, got {type(t).__name__} at {i}"
                )
            if not t:
                raise InvalidRequestError("prompt", "empty prompt")
        return [engine.tokenizer.encode(t) for t in texts], is_batch
    if not isinstance(input_ids, list) or not input_ids:
        raise InvalidRequestError("input_ids", "expected a non-empty list of token ids or a list of such lists")
    is_batch = isinstance(input_ids[0], list)
    seqs = input_ids if is_batch else [input_ids]
    vocab = engine.vocab_size
    for seq in seqs:
        if not isinstance(seq, list) or not seq:
            raise InvalidRequestError("input_ids", "empty token list")
        for t in seq:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
                raise InvalidRequestError("input_ids", f"token id {t!r} out of the vocabulary [0, {vocab})")
    return [list(s) for s in seqs], is_batch


def _params_list(sampling_params: Any, count: int) -> list[SamplingParams]:
    if isinstance(sampling_params, list):
        if len(sampling_params) != count:
            raise InvalidRequestError("sampling_params", f"{len(sampling_params)} given for {count} prompts")
        return [SamplingParams.from_dict(p) for p in sampling_params]
    if sampling_params is not None and not isinstance(sampling_params, dict):
        raise InvalidRequestError("sampling_params", f"expected a dict, got {type(sampling_params).__name__}")
    return [SamplingParams.from_dict(sampling_params)] * count


def _starts_list(logprob_start_len: Any, count: int) -> list[int]:
    """One int for every prompt, or a list with one per prompt (as SGLang's batch requests)."""
    if isinstance(logprob_start_len, list):
        if len(logprob_start_len) != count:
            raise InvalidRequestError("logprob_start_len", f"{len(logprob_start_len)} given for {count} prompts")
        for v in logprob_start_len:
            _check_int("logprob_start_len", v, -1)
        return list(logprob_start_len)
    _check_int("logprob_start_len", logprob_start_len, -1)
    return [logprob_start_len] * count


def normalize_generate_args(
    engine, prompt, sampling_params, input_ids, return_logprob, top_logprobs_num, logprob_start_len, stream
) -> GenerateInput:
    _check_bool("return_logprob", return_logprob)
    _check_bool("stream", stream)
    _check_int("top_logprobs_num", top_logprobs_num, 0)
    seqs, is_batch = _prompts_to_ids(engine, prompt, input_ids)
    starts = _starts_list(logprob_start_len, len(seqs))
    params = _params_list(sampling_params, len(seqs))
    ns = {p.n for p in params}
    if len(ns) > 1:
        raise InvalidRequestError("sampling_params.n", "must be the same for every prompt of a batch")
    n = ns.pop()
    if stream and (is_batch or n > 1):
        raise InvalidRequestError("stream", "streaming takes a single prompt with n == 1")
    for p in params:
        p.validate_token_ids(engine.vocab_size)
        engine.constraints.check(p)  # compiles now, on the caller's thread (cached)
    items, warmups = [], []
    for seq, p, start in zip(seqs, params, starts):
        if len(seq) >= engine.context_len:
            raise InvalidRequestError(
                "prompt", f"{len(seq)} tokens; the context length is {engine.context_len} (prompt + output)"
            )
        if start >= len(seq):
            raise InvalidRequestError("logprob_start_len", f"{start} is past the prompt's {len(seq)} tokens")
        common = dict(
            input_ids=seq,
            return_logprob=return_logprob,
            top_logprobs_num=top_logprobs_num,
            logprob_start_len=start if return_logprob else -1,
            stream=stream,
        )
        if n > 1:
            warm = replace(p, max_new_tokens=0, n=1)
            warmups.append(
                AddRequest(
                    rid=new_rid(),
                    sampling=warm.to_dict(),
                    **{**common, "return_logprob": False, "logprob_start_len": -1},
                )
            )
        for i in range(n):
            pi = replace(p, n=1, seed=None if p.seed is None else p.seed + i)
            items.append(AddRequest(rid=new_rid(), sampling=pi.to_dict(), **common))
    return GenerateInput(items=items, warmups=warmups, is_batch=is_batch, n=n)
