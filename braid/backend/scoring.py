"""Select's scoring requests, shared by every backend that has prompt log-probabilities.

A select becomes prompt-logprob requests (``max_new_tokens`` 0): for each prompt, the token ids
of ``prompt + choice`` for every choice, scored from where the choices' tokens start; and, for
methods that need it, each choice after only a start token. The text is tokenized whole (as
generation would see it); the choices start after the longest token prefix they all share with
the prompt alone.
"""

from __future__ import annotations

from collections.abc import Callable

from braid.lang.choices import ChoiceLogprobs

Tokenize = Callable[[list[str]], list[list[int]]]  # texts -> token ids, no special tokens added


def choice_requests(tokenize: Tokenize, prompts: list[str], choices: tuple[str, ...], unconditional: bool,
                    start_token: int) -> tuple[list[list[int]], list[int]]:
    """(token ids of every request, position of each one's first choice token), prompt-major,
    then the unconditional requests (one per choice) when asked."""
    texts = [p for p in prompts if p] + [p + c for p in prompts for c in choices]
    if unconditional:
        texts += list(choices)
    ids = iter(tokenize(texts))
    prompt_ids = {p: next(ids) for p in prompts if p}
    seqs: list[list[int]] = []
    starts: list[int] = []
    for p in prompts:
        full = [next(ids) for _ in choices]
        start = min(min(_common_prefix(prompt_ids.get(p, []), s), len(s) - 1) for s in full)
        if start == 0:  # nothing before the choices to condition on: a start token
            full, start = [[start_token, *s] for s in full], 1
        seqs += full
        starts += [start] * len(full)
    if unconditional:
        for choice_ids in ids:
            seqs.append([start_token, *choice_ids])
            starts.append(1)
    return seqs, starts


def choice_logprobs(logprobs: list[list[float]], n_prompts: int, n_choices: int, unconditional: bool
                    ) -> list[list[ChoiceLogprobs]]:
    """Per prompt, per choice: the requests' logprobs (in ``choice_requests`` order) regrouped."""
    k = n_choices
    uncond = logprobs[n_prompts * k :] if unconditional else [None] * k
    return [[ChoiceLogprobs(logprobs[i * k + j], uncond[j]) for j in range(k)] for i in range(n_prompts)]


def start_token_of(bos: int | None, eos_ids) -> int:
    """What choices are conditioned on when nothing comes before them: BOS, else EOS (GPT-style
    models start documents after it), else token 0."""
    return bos if bos is not None else min(eos_ids, default=0)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
