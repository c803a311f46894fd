"""The batched sampler against plain per-row references written out below.

Inputs are fresh random logits every run; tolerances are chosen so that a correct sampler
fails with probability far below 1e-4."""

from __future__ import annotations

import math
import random

import pytest
import torch

from braid.runtime.sampler import SamplingInput, logprobs_of, make_generator, process_logits, sample
from braid.runtime.sampling_params import SamplingParams

NEG_INF = float("-inf")


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _inp(params: SamplingParams | dict | None = None, output_ids=(), prompt_ids=(), generator=None, banned=(), top=0):
    if not isinstance(params, SamplingParams):
        params = SamplingParams.from_dict(params)
    return SamplingInput(params, list(output_ids), list(prompt_ids), generator, list(banned), top)


# ---- the plain reference: one row, Python floats, the documented order --------------------------


def _softmax(x: list[float]) -> list[float]:
    m = max(x)
    e = [math.exp(v - m) if v != NEG_INF else 0.0 for v in x]
    s = sum(e)
    return [v / s for v in e]


def ref_process(row: list[float], inp: SamplingInput) -> list[float]:
    p, x = inp.params, list(row)
    if p.repetition_penalty != 1.0:
        for t in set(inp.prompt_ids) | set(inp.output_ids):
            x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
    for t in set(inp.output_ids):
        x[t] -= p.frequency_penalty * inp.output_ids.count(t) + p.presence_penalty
    for t in inp.banned_ids:
        x[t] = NEG_INF
    if p.is_greedy:
        return x
    x = [v / p.temperature for v in x]
    order = sorted(range(len(x)), key=lambda i: -x[i])
    if p.top_k > 0:
        for i in order[p.top_k :]:
            x[i] = NEG_INF
    if p.top_p < 1.0:
        probs, keep, acc = _softmax(x), set(), 0.0
        for i in order:  # the smallest most-likely-first set whose mass reaches top_p
            if x[i] == NEG_INF:
                break
            keep.add(i)
            acc += probs[i]
            if acc >= p.top_p:
                break
        x = [v if i in keep else NEG_INF for i, v in enumerate(x)]
    if p.min_p > 0.0:
        probs = _softmax(x)
        x = [v if probs[i] >= p.min_p * max(probs) else NEG_INF for i, v in enumerate(x)]
    return x


def _assert_rows_match(got: torch.Tensor, inputs: list[SamplingInput], logits: torch.Tensor) -> None:
    for b, inp in enumerate(inputs):
        want = ref_process(logits[b].double().tolist(), inp)
        row = got[b].tolist()
        assert [v == NEG_INF for v in row] == [v == NEG_INF for v in want], f"row {b}: kept sets differ ({inp.params})"
        finite = [(g, w) for g, w in zip(row, want) if w != NEG_INF]
        assert all(abs(g - w) <= 1e-4 * max(1.0, abs(w)) for g, w in finite), f"row {b}: values differ"


def _random_params(rng: random.Random, allow_top_p: bool) -> dict:
    d: dict = {"temperature": rng.choice([0.0, 0.5, 1.0, 1.7])}
    if rng.random() < 0.5:
        d["top_k"] = rng.randint(1, 60)
    if allow_top_p and rng.random() < 0.5:
        d["top_p"] = rng.uniform(0.05, 1.0)
    if rng.random() < 0.4:
        d["min_p"] = rng.uniform(0.0, 0.5)
    if rng.random() < 0.4:
        d["repetition_penalty"] = rng.uniform(0.5, 2.0)
    if rng.random() < 0.4:
        d["frequency_penalty"] = rng.uniform(-2, 2)
        d["presence_penalty"] = rng.uniform(-2, 2)
    return d


# ---- processing against the reference -----------------------------------------------------------


@pytest.mark.parametrize("allow_top_p", [True, False])  # False exercises the topk (no sort) path
def test_processing_matches_reference(allow_top_p):
    rng = random.Random()
    vocab = 50
    for _ in range(15):
        inputs = [
            _inp(
                _random_params(rng, allow_top_p),
                output_ids=[rng.randrange(vocab) for _ in range(rng.randint(0, 12))],
                prompt_ids=[rng.randrange(vocab) for _ in range(rng.randint(0, 12))],
                banned=rng.sample(range(vocab), rng.randint(0, 3)),
            )
            for _ in range(6)
        ]
        logits = torch.randn(len(inputs), vocab) * 3
        _assert_rows_match(process_logits(logits, inputs), inputs, logits)


def test_large_top_k_uses_sort_path_and_matches():
    logits = torch.randn(3, 2000)
    inputs = [_inp({"top_k": 1500}), _inp({"top_k": 1999, "temperature": 0.5}), _inp()]
    got = process_logits(logits, inputs)
    assert [int(torch.isfinite(r).sum()) for r in got] == [1500, 1999, 2000]
    _assert_rows_match(got, inputs, logits)


def test_top_k_keeps_exactly_k_even_with_ties():
    logits = torch.randint(0, 3, (4, 40)).float()  # many ties
    for k in (2, 5, 17, 40):
        for top_p in (1.0, 0.999999):  # topk path and sort path
            got = process_logits(logits, [_inp({"top_k": k, "top_p": top_p, "temperature": 0.9})] * 4)
            if top_p == 1.0:
                assert (torch.isfinite(got).sum(dim=-1) == k).all()
            kept = torch.isfinite(got)
            # Whatever is kept is at least as likely as whatever is dropped.
            for r in range(4):
                if not kept[r].all():
                    assert logits[r][kept[r]].min() >= logits[r][~kept[r]].max()


def test_top_p_smallest_set_reaching_p():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    logits = probs.log()
    for top_p, kept in [(0.4, {1}), (0.75, {1, 3}), (0.85, {1, 2, 3}), (0.97, {0, 1, 2, 3})]:
        got = process_logits(logits, [_inp({"top_p": top_p})])
        assert set(torch.isfinite(got[0]).nonzero().flatten().tolist()) == kept, top_p


def test_min_p_example():
    logits = torch.tensor([[0.4, 0.3, 0.2, 0.06, 0.04]]).log()
    got = process_logits(logits, [_inp({"min_p": 0.2})])  # threshold 0.08
    assert torch.isfinite(got[0]).tolist() == [True, True, True, False, False]


def test_penalties_examples():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    rp = {"repetition_penalty": 2.0, "temperature": 0}
    rep = process_logits(logits, [_inp(rp, prompt_ids=[0], output_ids=[1, 1])])
    assert rep[0].tolist() == [1.0, -4.0, 1.0, 0.5]
    fp = {"frequency_penalty": 0.5, "presence_penalty": 0.25, "temperature": 0}
    freq = process_logits(logits, [_inp(fp, prompt_ids=[2], output_ids=[1, 1, 3])])
    assert freq[0].tolist() == pytest.approx([2.0, -3.25, 1.0, -0.25])


def test_input_logits_not_modified():
    logits = torch.randn(3, 30)
    before = logits.clone()
    inputs = [
        _inp({"top_p": 0.5, "repetition_penalty": 1.3}, output_ids=[1, 2], banned=[3]),
        _inp({"temperature": 0}),
        _inp({"min_p": 0.1}),
    ]
    sample(logits, inputs)
    assert torch.equal(logits, before)


# ---- choosing tokens ----------------------------------------------------------------------------


def test_greedy_is_argmax_and_logprobs_are_log_softmax():
    logits = torch.randn(7, 100) * 2
    out = sample(logits, [_inp({"temperature": 0}, top=5) for _ in range(7)])
    assert out.token_ids == logits.argmax(dim=-1).tolist()
    ref = torch.log_softmax(logits.double(), dim=-1)
    for b in range(7):
        assert out.logprobs[b] == pytest.approx(ref[b, out.token_ids[b]].item(), abs=1e-5)
        vals, ids = ref[b].topk(5)
        assert [t for _, t in out.top_logprobs[b]] == ids.tolist()
        assert [v for v, _ in out.top_logprobs[b]] == pytest.approx(vals.tolist(), abs=1e-5)


def test_greedy_takes_argmax_of_penalized_logits():
    logits = torch.randn(5, 40)
    best = logits.argmax(dim=-1).tolist()
    inputs = [_inp({"temperature": 0, "repetition_penalty": 1e3}, output_ids=[best[b]]) for b in range(5)]
    inputs[2] = _inp({"temperature": 0}, banned=[best[2]])
    out = sample(logits, inputs)
    ref = [max(range(40), key=lambda t: ref_process(logits[b].tolist(), inputs[b])[t]) for b in range(5)]
    assert out.token_ids == ref and all(t != b for t, b in zip(out.token_ids, best))


def test_logprobs_are_raw_even_when_processed():
    logits = torch.randn(4, 60)
    inputs = [_inp({"temperature": 0.3, "top_k": 3, "repetition_penalty": 1.5}, output_ids=[1, 2], top=4)] * 4
    out = sample(logits, inputs)
    ref = torch.log_softmax(logits, dim=-1)
    for b in range(4):
        assert out.logprobs[b] == pytest.approx(ref[b, out.token_ids[b]].item(), abs=1e-5)
        assert [t for _, t in out.top_logprobs[b]] == ref[b].topk(4).indices.tolist()


def test_top_logprobs_only_where_asked():
    out = sample(torch.randn(3, 20), [_inp(top=0), _inp(top=2), _inp({"temperature": 0}, top=50)])
    assert [len(t) for t in out.top_logprobs] == [0, 2, 20]


def test_logprobs_of_prompt_rows():
    logits = torch.randn(6, 30)
    targets = torch.randint(0, 30, (6,)).tolist()
    out = logprobs_of(logits, targets, top_k=3)
    ref = torch.log_softmax(logits, dim=-1)
    assert out.logprobs == pytest.approx([ref[t, tok].item() for t, tok in enumerate(targets)], abs=1e-5)
    assert [[t for _, t in row] for row in out.top_logprobs] == ref.topk(3).indices.tolist()
    assert logprobs_of(logits, targets, top_k=0).top_logprobs == [[]] * 6


def test_banned_ids_never_sampled():
    vocab = 12
    logits = torch.randn(4000, vocab)
    logits[:, :3] += 8.0  # the banned ids are by far the most likely
    hot = SamplingParams(temperature=2.0)
    inputs = [_inp(hot, banned=[0, 1, 2]) for _ in range(4000)]
    ids = sample(logits, inputs).token_ids
    assert min(ids) >= 3 and len(set(ids)) > 5


def _chi_square(counts: list[int], probs: list[float]) -> float:
    n = sum(counts)
    return sum((c - n * p) ** 2 / (n * p) for c, p in zip(counts, probs) if p > 0)


@pytest.mark.parametrize("seeded", [False, True])
def test_sampled_frequencies_match_processed_distribution(seeded):
    draws, vocab = 20000, 8
    row = (torch.randn(vocab) * 1.5).tolist()
    params = {
        "temperature": 0.8,
        "top_k": 6,
        "top_p": 0.95,
        "min_p": 0.02,
        "repetition_penalty": 1.2,
        "frequency_penalty": 0.3,
    }
    base, shared = random.randrange(10**6), SamplingParams.from_dict(params)
    inputs = [
        _inp(
            shared,
            output_ids=[0, 0, 5],
            prompt_ids=[3],
            banned=[7],
            generator=make_generator(base + i, "cpu") if seeded else None,
        )
        for i in range(draws)
    ]
    probs = _softmax(ref_process(row, inputs[0]))
    ids = sample(torch.tensor([row] * draws), inputs).token_ids
    counts = [ids.count(t) for t in range(vocab)]
    assert all(c == 0 for c, p in zip(counts, probs) if p == 0.0), (counts, probs)
    # 6 kept tokens at most -> 5 degrees of freedom; P(chi2_5 > 40) ~ 1e-7.
    assert _chi_square(counts, probs) < 40, (counts, probs)


def test_same_seed_same_tokens_whatever_the_batch():
    vocab, steps, seed = 64, 20, random.randrange(2**40)
    own = torch.randn(steps, vocab)
    params = {"temperature": 1.3, "top_p": 0.9, "top_k": 40}

    def run(batch_size: int, row: int, companion_seed: int | None) -> list[int]:
        gen = make_generator(seed, "cpu")
        other = make_generator(companion_seed, "cpu")
        picked = []
        for step in range(steps):
            logits = torch.randn(batch_size, vocab) * 2  # different companions every time
            logits[row] = own[step]
            inputs = [
                _inp(
                    random.choice([{}, {"temperature": 0}, {"min_p": 0.2}, {"top_p": 0.5}]),
                    output_ids=[1, 2],
                    generator=other if b % 2 else None,
                )
                for b in range(batch_size)
            ]
            inputs[row] = _inp(params, output_ids=picked, generator=gen)
            picked.append(sample(logits, inputs).token_ids[row])
        return picked

    first = run(1, 0, None)
    assert len(set(first)) > 3  # actually random, not stuck
    assert run(5, 3, 7) == first
    assert run(8, 0, None) == first
    assert run(3, 2, seed) == first  # a companion with the same seed does not share its stream
    other_seed = make_generator(seed + 1, "cpu")
    again = [sample(own[s : s + 1], [_inp(params, generator=other_seed)]).token_ids[0] for s in range(steps)]
    assert again != first


def test_make_generator():
    assert make_generator(None, "cpu") is None
    a, b = make_generator(-3, "cpu"), make_generator(-3, "cpu")
    assert torch.equal(torch.rand(5, generator=a), torch.rand(5, generator=b))
    assert make_generator(2**70, "cpu") is not None


def test_all_greedy_with_some_sampled_rows_mixed():
    logits = torch.randn(6, 25)
    inputs = [_inp({"temperature": 0}) if b % 2 else _inp({"top_k": 1, "temperature": 1.5}) for b in range(6)]
    assert sample(logits, inputs).token_ids == logits.argmax(dim=-1).tolist()
    inputs[0] = _inp({"temperature": 1.0, "top_k": 2})
    ids = sample(logits, inputs).token_ids
    assert ids[1:] == logits.argmax(dim=-1).tolist()[1:]
    assert ids[0] in logits[0].topk(2).indices.tolist()


def test_logprobs_are_skipped_only_when_no_row_asks():
    from braid.runtime.sampler import SamplingInput, sample
    from braid.runtime.sampling_params import SamplingParams

    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    greedy = SamplingParams.from_dict({"temperature": 0})
    rows = [SamplingInput(greedy, [], [1], None, [], return_logprob=False) for _ in range(3)]
    quiet = sample(logits, rows)
    assert quiet.logprobs == [None, None, None]
    rows[1].return_logprob = True
    loud = sample(logits, rows)
    assert quiet.token_ids == loud.token_ids == logits.argmax(-1).tolist()
    assert abs(loud.logprobs[1] - torch.log_softmax(logits[1], -1).max().item()) < 1e-6
