"""Batched next-token sampling on a ``(B, V)`` logits tensor, on any device.

Processing order, per row: repetition penalty (HF) -> frequency/presence penalties (OpenAI)
-> banned ids set to -inf -> [greedy rows: argmax here] -> temperature -> top_k -> top_p ->
min_p -> sample. Every step is a row-wise tensor op over the whole batch; there is no Python
loop over the vocabulary, only over requests where a request owns its data (its token lists,
its generator).

Sampling is a Gumbel-max race: ``argmax(logits + G)`` with ``G = -log(E)``, ``E ~ Exp(1)``
drawn for the full vocabulary from the row's own ``torch.Generator`` when it has one. So a
seeded request draws the same noise whatever batch it is in and whatever row it occupies, and
gets the same tokens.

Reported log-probabilities are those of the RAW logits (``log_softmax`` before any penalty,
temperature or filter): they describe the model, not the sampling procedure, and stay
comparable across requests with different sampling parameters.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from braid.runtime.memory import to_device
from braid.runtime.sampling_params import SamplingParams

# topk beats a full sort when the largest k is small; above this a sort is as cheap.
_TOPK_FAST_MAX_K = 1024


@dataclass
class SamplingInput:
    """What the sampler needs to know about one row of the batch."""

    params: SamplingParams
    output_ids: list[int]  # tokens generated so far: frequency/presence penalties
    prompt_ids: list[int]  # with output_ids: repetition penalty (HF semantics)
    generator: torch.Generator | None  # from make_generator(seed, device); None = the shared RNG
    banned_ids: list[int]  # never sampled this step (the engine bans EOS/stops below min_new_tokens)
    top_logprobs_num: int = 0  # how many of the most likely tokens to report, 0 = none
    return_logprob: bool = True  # report the chosen token's logprob (False skips a pass over V)


class SampleOutput(NamedTuple):
    """One entry per row. ``logprobs[i]`` is the raw log-probability of ``token_ids[i]`` (None
    when no row asked for logprobs); ``top_logprobs[i]`` holds ``(logprob, token_id)`` pairs,
    most likely first."""

    token_ids: list[int]
    logprobs: list[float | None]
    top_logprobs: list[list[tuple[float, int]]]


class LogprobsOutput(NamedTuple):
    """Log-probabilities of given tokens, one entry per logits row (see ``logprobs_of``)."""

    logprobs: list[float]
    top_logprobs: list[list[tuple[float, int]]]


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator | None:
    """A generator for one seeded request on ``device`` (where the logits live), or ``None``
    for an unseeded request. Any int seed is accepted (reduced modulo 2**64)."""
    if seed is None:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(seed % (1 << 64))
    return gen


def sample(logits: torch.Tensor, inputs: list[SamplingInput]) -> SampleOutput:
    """Pick one token per row of ``logits`` ``(B, V)`` according to ``inputs[row]``.

    ``logits`` is not modified. Each row must keep at least one token that is not banned.
    Seeded rows advance their own generator by ``V`` draws; unseeded sampled rows draw from the
    global RNG of ``logits.device``; greedy rows draw nothing.
    """
    logits = logits.float()
    token_ids = choose_tokens(logits, inputs)
    top_nums = [inp.top_logprobs_num for inp in inputs]
    if not any(inp.return_logprob for inp in inputs) and not any(top_nums):
        return SampleOutput(token_ids.tolist(), [None] * len(inputs), [[] for _ in inputs])
    return _report(logits, token_ids, top_nums)


def choose_tokens(logits: torch.Tensor, inputs: list[SamplingInput]) -> torch.Tensor:
    """The token ids ``(B,)`` that ``sample`` picks, left on the device (nothing waits for them)."""
    assert logits.dim() == 2, f"logits must be (B, V), got shape {tuple(logits.shape)}"
    assert logits.shape[0] == len(inputs), f"{logits.shape[0]} logits rows but {len(inputs)} inputs"
    logits = logits.float()
    plain_greedy = all(inp.params.is_greedy and not inp.params.has_penalties and not inp.banned_ids for inp in inputs)
    return logits.argmax(dim=-1) if plain_greedy else _choose(logits, inputs)


def logprobs_of(logits: torch.Tensor, token_ids: Sequence[int] | torch.Tensor, top_k: int) -> LogprobsOutput:
    """Raw log-probabilities (``log_softmax`` of ``logits`` ``(T, V)``, nothing else applied) of
    ``token_ids[t]`` under row ``t``, plus the ``top_k`` most likely tokens of every row.

    For prompt logprobs, row ``t`` is the logits after prompt token ``t`` and ``token_ids[t]``
    is prompt token ``t + 1``.
    """
    assert logits.dim() == 2, f"logits must be (T, V), got shape {tuple(logits.shape)}"
    logits = logits.float()
    ids = torch.as_tensor(token_ids, dtype=torch.long, device=logits.device)
    assert ids.shape == (logits.shape[0],), f"need one token id per row: {tuple(ids.shape)} vs {logits.shape[0]}"
    out = _report(logits, ids, [top_k] * logits.shape[0])
    return LogprobsOutput(out.logprobs, out.top_logprobs)


# ---- the processing pipeline ---------------------------------------------------------------


def process_logits(logits: torch.Tensor, inputs: list[SamplingInput]) -> torch.Tensor:
    """The logits ``(B, V)`` each row's choice is made from; ``logits`` is not modified.

    Every row gets its penalties and bans; rows that sample (not ``is_greedy``) also get
    temperature, top_k, top_p and min_p, so that their softmax is exactly the distribution
    ``sample`` draws from. Greedy rows take the argmax of their row. Removed tokens are -inf.
    """
    x = logits.float().clone(memory_format=torch.contiguous_format)  # flat views below
    _apply_penalties(x, inputs)
    _apply_bans(x, inputs)
    sampled = [i for i, inp in enumerate(inputs) if not inp.params.is_greedy]
    params = [inputs[i].params for i in sampled]
    if len(sampled) == len(inputs):
        x = _filter(x, params)
    elif sampled:
        rows = to_device(sampled, torch.int64, x.device)
        x[rows] = _filter(x.index_select(0, rows), params)  # (S, V)
    return x


def _choose(logits: torch.Tensor, inputs: list[SamplingInput]) -> torch.Tensor:
    """Token ids ``(B,)``: argmax for greedy rows, a Gumbel-max draw for the others."""
    x = process_logits(logits, inputs)
    sampled = [i for i, inp in enumerate(inputs) if not inp.params.is_greedy]
    generators = [inputs[i].generator for i in sampled]
    if len(sampled) == len(inputs):
        return (x + _gumbel_noise(x.shape, generators, x.device)).argmax(dim=-1)
    token_ids = x.argmax(dim=-1)
    if sampled:
        rows = to_device(sampled, torch.int64, x.device)
        sub = x.index_select(0, rows)
        token_ids[rows] = (sub + _gumbel_noise(sub.shape, generators, x.device)).argmax(dim=-1)
    return token_ids


def _filter(x: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Temperature, then top_k, top_p, min_p on rows that sample; filtered-out logits -> -inf."""
    temps = to_device([p.temperature for p in params], x.dtype, x.device)
    x = x.div_(temps[:, None])
    top_k = [p.top_k for p in params]
    top_p = [p.top_p for p in params]
    if any(p < 1.0 for p in top_p):
        x = _top_k_top_p_sorted(x, top_k, top_p)
    elif any(k > 0 for k in top_k):
        x = _top_k_only(x, top_k) if max(top_k) <= _TOPK_FAST_MAX_K else _top_k_top_p_sorted(x, top_k, top_p)
    min_p = [p.min_p for p in params]
    if any(m > 0.0 for m in min_p):
        _min_p(x, min_p)
    return x


def _top_k_top_p_sorted(x: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """Keep each row's ``top_k`` best (exactly k, ties broken by sort order), then the
    smallest set of the survivors, most likely first, whose renormalized mass reaches top_p."""
    n_rows, vocab = x.shape
    k = to_device([kk if kk > 0 else vocab for kk in top_k], torch.int64, x.device)
    p = to_device(top_p, x.dtype, x.device)
    sorted_x, order = x.sort(dim=-1, descending=True)  # (S, V) each
    drop = torch.arange(vocab, device=x.device)[None, :] >= k[:, None]
    probs = sorted_x.masked_fill(drop, float("-inf")).softmax(dim=-1)
    # A token stays while the mass of the tokens before it is below p; the first always stays.
    mass_before = probs.cumsum(dim=-1) - probs
    drop |= (mass_before >= p[:, None]) & (p[:, None] < 1.0)
    drop_unsorted = torch.empty_like(drop).scatter_(1, order, drop)
    return x.masked_fill_(drop_unsorted, float("-inf"))


def _top_k_only(x: torch.Tensor, top_k: list[int]) -> torch.Tensor:
    """Top-k without a full sort: ``topk`` of the largest k, then each row keeps its own k."""
    kmax = min(max(top_k), x.shape[1])
    k = to_device(top_k, torch.int64, x.device)
    _, best = x.topk(kmax, dim=-1)  # (S, kmax), best first
    beyond_k = torch.arange(kmax, device=x.device)[None, :] >= k[:, None]
    drop = torch.ones_like(x, dtype=torch.bool).scatter_(1, best, beyond_k)
    drop &= (k > 0)[:, None]  # rows with top_k off keep everything
    return x.masked_fill_(drop, float("-inf"))


def _min_p(x: torch.Tensor, min_p: list[float]) -> None:
    """Drop tokens with prob < min_p * max prob, i.e. logit < max logit + log(min_p), in place."""
    log_min_p = to_device(min_p, x.dtype, x.device).log()  # log(0) = -inf keeps all
    best = x.max(dim=-1, keepdim=True).values
    x.masked_fill_(x < best + log_min_p[:, None], float("-inf"))


def _gumbel_noise(shape: torch.Size, generators: list[torch.Generator | None], device: torch.device) -> torch.Tensor:
    """Gumbel(0, 1) noise ``(S, V)``; row ``j`` comes from ``generators[j]`` when it is set."""
    noise = torch.empty(shape, dtype=torch.float32, device=device)
    shared = [j for j, g in enumerate(generators) if g is None]
    if len(shared) == len(generators):
        noise.exponential_()
    else:
        for j, gen in enumerate(generators):
            if gen is not None:
                assert gen.device.type == device.type, f"generator on {gen.device}, logits on {device}"
                noise[j].exponential_(generator=gen)  # the full row: independent of the batch
        if shared:
            rows = to_device(shared, torch.int64, device)
            noise[rows] = torch.empty((len(shared), shape[1]), device=device).exponential_()
    # Clamp: an exact 0 draw would give +inf noise, and +inf + -inf (a filtered token) is NaN.
    return noise.clamp_min_(torch.finfo(torch.float32).tiny).log_().neg_()


# ---- penalties and bans ----------------------------------------------------------------------


def _apply_penalties(x: torch.Tensor, inputs: list[SamplingInput]) -> None:
    """Repetition penalty (HF: over prompt + output tokens, each token once), then frequency
    and presence penalties (OpenAI: over output tokens), in place on ``x`` ``(B, V)``."""
    rep_rows = [i for i, inp in enumerate(inputs) if inp.params.repetition_penalty != 1.0]
    if rep_rows:
        seen = torch.zeros_like(x, dtype=torch.bool)
        flat = _flat_index([(i, inputs[i].prompt_ids + inputs[i].output_ids) for i in rep_rows], x.shape[1], x.device)
        seen.view(-1).index_fill_(0, flat, True)
        pen = to_device([inp.params.repetition_penalty for inp in inputs], x.dtype, x.device)
        penalized = torch.where(x > 0, x / pen[:, None], x * pen[:, None])
        x.copy_(torch.where(seen, penalized, x))
    freq_rows = [
        i for i, inp in enumerate(inputs) if inp.params.frequency_penalty != 0.0 or inp.params.presence_penalty != 0.0
    ]
    if freq_rows:
        counts = torch.zeros_like(x)
        flat = _flat_index([(i, inputs[i].output_ids) for i in freq_rows], x.shape[1], x.device)
        counts.view(-1).index_add_(0, flat, torch.ones_like(flat, dtype=x.dtype))
        freq = to_device([inp.params.frequency_penalty for inp in inputs], x.dtype, x.device)
        pres = to_device([inp.params.presence_penalty for inp in inputs], x.dtype, x.device)
        x -= freq[:, None] * counts + pres[:, None] * (counts > 0).to(x.dtype)


def _apply_bans(x: torch.Tensor, inputs: list[SamplingInput]) -> None:
    banned = [(i, inp.banned_ids) for i, inp in enumerate(inputs) if inp.banned_ids]
    if banned:
        x.view(-1).index_fill_(0, _flat_index(banned, x.shape[1], x.device), float("-inf"))


def _flat_index(row_ids: list[tuple[int, list[int]]], width: int, device: torch.device) -> torch.Tensor:
    """Positions ``row * width + token`` in the flattened ``(B, width)`` logits, built on the host
    in one transfer. ``index_fill_``/``index_add_`` on them never wait for the GPU, where
    ``x[rows, cols] = value`` copies the value from the host and waits."""
    for _, ids in row_ids:  # a flat position past its row would land silently in the next row
        assert not ids or (min(ids) >= 0 and max(ids) < width), f"token ids must lie in [0, {width})"
    return to_device([i * width + t for i, ids in row_ids for t in ids], torch.long, device)


# ---- reporting -------------------------------------------------------------------------------


def _report(logits: torch.Tensor, token_ids: torch.Tensor, top_nums: list[int]) -> SampleOutput:
    """Raw logprobs of the chosen tokens and each row's top ``top_nums[row]`` tokens."""
    lse = logits.logsumexp(dim=-1)  # (B,)
    chosen = logits.gather(1, token_ids[:, None]).squeeze(1) - lse
    top: list[list[tuple[float, int]]] = [[] for _ in top_nums]
    wanted = [i for i, n in enumerate(top_nums) if n > 0]
    if wanted:
        rows = to_device(wanted, torch.int64, logits.device)
        kmax = min(max(top_nums), logits.shape[1])
        vals, ids = logits.index_select(0, rows).topk(kmax, dim=-1)
        vals = (vals - lse[rows][:, None]).tolist()
        ids = ids.tolist()
        for j, i in enumerate(wanted):
            n = min(top_nums[i], kmax)
            top[i] = list(zip(vals[j][:n], ids[j][:n]))
    return SampleOutput(token_ids.tolist(), chosen.tolist(), top)
