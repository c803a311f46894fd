"""The bitmask kernel against its torch reference on fresh random masks, plus a known bit pattern.

How the kernel runs on the CPU: ``triton.jit`` decides at decoration time whether to compile or to
interpret, from ``TRITON_INTERPRET``. ``braid.runtime.kernels.bitmask`` therefore jits its kernel
on first use and caches it per mode, so the ``interpret`` fixture below only sets
``TRITON_INTERPRET=1`` (monkeypatch, undone after the test) and the next launch gets an interpreted
kernel, in this process, with no subprocess. ``test_interpreted_kernel_is_used`` checks that the
kernel really was interpreted. Shapes here are tiny (V <= 300, block 32..128) to keep the
interpreter fast; the CUDA test at the end runs a real shape, compiled.
"""

from __future__ import annotations

import zlib

import pytest
import torch

from braid.grammar.base import bitmask_words
from braid.runtime.kernels import bitmask as kb

needs_triton = pytest.mark.skipif(kb.triton is None, reason="needs triton")


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def random_words(shape: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
    """Uniform int32 words over the whole range, so about half are negative (bit 31 set)."""
    words = torch.randint(0, 2**32, shape, dtype=torch.int64, generator=gen) - 2**31
    return words.to(torch.int32)


def random_case(batch, vocab, dtype, rows_kind, pad, seed, extra_words=0):
    """Returns (logits buffer, logits view, bitmask, rows): the view is ``buffer[:, :vocab]``, so
    with ``pad`` > 0 its row stride is wider than ``vocab``."""
    gen = torch.Generator().manual_seed(seed)
    buffer = torch.randn(batch, vocab + pad, generator=gen).to(dtype)
    rows = None
    num_mask_rows = batch
    if rows_kind is not None:
        num_mask_rows = max(1, batch - 2)
        rows = torch.randperm(batch, generator=gen)[:num_mask_rows].to(rows_kind)
    bitmask = random_words((num_mask_rows, bitmask_words(vocab) + extra_words), gen)
    assert 0 < (bitmask < 0).sum() < bitmask.numel(), "want negative and non-negative words"
    return buffer, buffer[:, :vocab], bitmask, rows


def run_both(batch, vocab, dtype, rows_kind, pad, seed, block, extra_words=0):
    """Reference and kernel on copies of one random case; returns (original, reference, kernel)
    logits buffers, padding columns included."""
    buffer, _, bitmask, rows = random_case(batch, vocab, dtype, rows_kind, pad, seed, extra_words)
    ref, out = buffer.clone(), buffer.clone()
    kb.apply_bitmask_reference(ref[:, :vocab], bitmask, rows)
    kb.apply_bitmask_triton(out[:, :vocab], bitmask, rows, block=block)
    return buffer, ref, out, bitmask, rows


SHAPES = [  # (batch, vocab, block, extra mask words)
    (1, 300, 64, 0),  # V neither a multiple of 32 nor of block
    (5, 257, 128, 1),  # one token in the last word; a mask wider than needed
    (5, 64, 32, 0),  # V a multiple of both
]


@needs_triton
@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize("batch,vocab,block,extra", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows_kind", [None, torch.int32, torch.int64])
@pytest.mark.parametrize("pad", [0, 7])
def test_kernel_matches_reference(batch, vocab, block, extra, dtype, rows_kind, pad):
    seed = zlib.crc32(repr((batch, vocab, dtype, rows_kind, pad)).encode())  # fixed per case
    buffer, ref, out, bitmask, rows = run_both(batch, vocab, dtype, rows_kind, pad, seed, block, extra)
    assert torch.equal(out, ref)  # -inf == -inf; padding columns and free rows compared too
    banned = torch.isinf(ref[:, :vocab])
    assert 0 < banned.sum() < banned.numel(), "a mixed mask must ban some tokens and keep others"
    assert torch.equal(ref[:, vocab:], buffer[:, vocab:]), "padding columns must not be touched"
    if rows is not None:
        free = sorted(set(range(batch)) - set(rows.tolist()))
        assert torch.equal(ref[free], buffer[free]), "rows without a mask must not be touched"


@needs_triton
@pytest.mark.usefixtures("interpret")
def test_interpreted_kernel_is_used():
    from triton.runtime.interpreter import InterpretedFunction

    assert kb._interpreting()
    assert isinstance(kb._jitted(kb._interpreting()), InterpretedFunction)


def known_pattern(rows_first: bool):
    """vocab 70 (3 words): token 0 allowed, 31 allowed through a negative word, 33 banned."""
    word0 = (1 | (1 << 31)) - 2**32  # tokens 0 and 31, as a (negative) int32
    mask = torch.tensor([[word0, 0b101, -1]], dtype=torch.int32)  # word 1: tokens 32 and 34
    allowed = {0, 31, 32, 34, *range(64, 70)}
    logits = torch.arange(2 * 70, dtype=torch.float32).reshape(2, 70) + 1
    rows = torch.tensor([0 if rows_first else 1])
    return logits, mask, rows, allowed


def check_known_pattern(apply) -> None:
    for rows_first in (True, False):
        logits, mask, rows, allowed = known_pattern(rows_first)
        before = logits.clone()
        apply(logits, mask, rows)
        row = 0 if rows_first else 1
        kept = {t for t in range(70) if logits[row, t] != float("-inf")}
        assert kept == allowed
        assert logits[row, 33] == float("-inf") and logits[row, 31] == before[row, 31]
        assert torch.equal(logits[1 - row], before[1 - row])


def test_reference_known_pattern():
    check_known_pattern(kb.apply_bitmask_reference)


@needs_triton
@pytest.mark.usefixtures("interpret")
def test_kernel_known_pattern():
    check_known_pattern(lambda logits, mask, rows: kb.apply_bitmask_triton(logits, mask, rows, block=32))


def test_reference_row_named_twice_gets_both_bans():
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 64, generator=gen)
    mask = random_words((2, 2), gen)
    out = logits.clone()
    kb.apply_bitmask_reference(out, mask, torch.tensor([1, 1]))
    one, two = logits.clone(), logits.clone()
    kb.apply_bitmask_reference(one, mask[:1], torch.tensor([1]))
    kb.apply_bitmask_reference(two, mask[1:], torch.tensor([1]))
    assert torch.equal(out[1].isinf(), one[1].isinf() | two[1].isinf())
    assert torch.equal(out[0], logits[0])


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda x, m, r: (x.to(torch.int32), m, r), "logits dtype"),
        (lambda x, m, r: (x, m.to(torch.int64), r), "bitmask dtype"),
        (lambda x, m, r: (x, m[:, :-1], r), "bitmask too narrow"),
        (lambda x, m, r: (x.t().contiguous().t(), m, r), "last dim must be contiguous"),
        (lambda x, m, r: (x, m, r.float()), "rows dtype"),
        (lambda x, m, r: (x, m, r + 5), r"rows must lie in \[0, 5\)"),
        (lambda x, m, r: (x, m, r[:-1]), "rows for 3 mask rows"),
    ],
)
def test_wrapper_asserts_before_launch(change, message):
    _, logits, bitmask, rows = random_case(5, 100, torch.float32, torch.int64, 0, seed=7)
    with pytest.raises(AssertionError, match=message):
        kb.apply_bitmask_triton(*change(logits, bitmask, rows), block=32)


def test_without_triton_the_kernel_says_so_and_dispatch_falls_back(monkeypatch):
    monkeypatch.setattr(kb, "triton", None)
    _, logits, bitmask, _ = random_case(2, 70, torch.float32, None, 0, seed=9)
    with pytest.raises(RuntimeError, match="needs the triton package"):
        kb.apply_bitmask_triton(logits, bitmask)
    out, ref = logits.clone(), logits.clone()
    kb.apply_bitmask(out, bitmask)
    kb.apply_bitmask_reference(ref, bitmask)
    assert torch.equal(out, ref)


@needs_triton
@pytest.mark.parametrize("interpreted", [False, True])
def test_dispatch_on_cpu_follows_triton_interpret(monkeypatch, interpreted):
    calls = []
    monkeypatch.setattr(kb, "apply_bitmask_triton", lambda *args: calls.append("triton"))
    monkeypatch.setattr(kb, "apply_bitmask_reference", lambda *args: calls.append("reference"))
    if interpreted:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    _, logits, bitmask, _ = random_case(2, 70, torch.float32, None, 0, seed=11)
    kb.apply_bitmask(logits, bitmask)
    assert calls == ["triton" if interpreted else "reference"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or kb.triton is None, reason="needs CUDA and triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows_kind", [None, torch.int32])
def test_cuda_real_shape(monkeypatch, dtype, rows_kind):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # compiled, not interpreted
    batch, vocab = 64, 128256
    buffer, _, bitmask, rows = random_case(batch, vocab, dtype, rows_kind, 0, seed=13)
    buffer, bitmask = buffer.cuda(), bitmask.cuda()
    rows = None if rows is None else rows.cuda()
    ref, out = buffer.clone(), buffer.clone()
    kb.apply_bitmask_reference(ref, bitmask, rows)
    kb.apply_bitmask(out, bitmask, rows)
    assert torch.equal(out, ref)
    # a row stride wider than the vocab (a slice of a padded buffer)
    wide = torch.randn(batch, vocab + 64, device="cuda").to(dtype)
    ref, out = wide.clone(), wide.clone()
    kb.apply_bitmask_reference(ref[:, :vocab], bitmask, rows)
    kb.apply_bitmask(out[:, :vocab], bitmask, rows)
    assert torch.equal(out, ref)
