"""How ``select`` turns each choice's token log-probabilities into a score, and picks one.

A backend returns, for every choice, the log-probabilities of the choice's tokens after the
prompt (``ChoiceLogprobs.conditional``) and, when the method asks for it, after only a start
token (``unconditional``). Methods are pure functions, registered by name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from braid.registry import Registry


@dataclass(frozen=True)
class ChoiceLogprobs:
    conditional: list[float]  # log p(choice token i | prompt, choice tokens < i)
    unconditional: list[float] | None = None  # the same after a start token only, when asked


@dataclass(frozen=True)
class Decision:
    index: int  # the chosen choice
    scores: list[float]  # one per choice; higher is better


ChoicesMethod = Callable[[list[ChoiceLogprobs]], Decision]
CHOICES_METHODS: Registry[ChoicesMethod] = Registry("choices method")
NEEDS_UNCONDITIONAL = {"unconditional_likelihood_normalized"}


def _argmax(scores: list) -> int:
    # first best wins ties, so the result does not depend on dict or set order
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


@CHOICES_METHODS.register("token_length_normalized")
def token_length_normalized(choices: list[ChoiceLogprobs]) -> Decision:
    """Mean log-probability per token: long choices are not punished for their length."""
    scores = [_mean(c.conditional) for c in choices]
    return Decision(_argmax(scores), scores)


@CHOICES_METHODS.register("greedy_token_selection")
def greedy_token_selection(choices: list[ChoiceLogprobs]) -> Decision:
    """What greedy decoding would pick: the most likely first token, then the next token among
    choices that tie, and so on. The score is the first token's log-probability."""
    keys = [tuple(c.conditional) for c in choices]
    return Decision(_argmax(keys), [c.conditional[0] for c in choices])


@CHOICES_METHODS.register("unconditional_likelihood_normalized")
def unconditional_likelihood_normalized(choices: list[ChoiceLogprobs]) -> Decision:
    """Mean per-token log-probability after the prompt minus the same without the prompt: choices
    that are likely anywhere (short common words) do not win by being common. (The two means are
    taken separately: a choice can split into different tokens after the prompt and alone.)"""
    for c in choices:
        assert c.unconditional, "the backend did not score the choice without the prompt"
    scores = [_mean(c.conditional) - _mean(c.unconditional) for c in choices]
    return Decision(_argmax(scores), scores)
