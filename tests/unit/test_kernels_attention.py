"""The attention kernels against their torch references, the Triton backend against the torch
backend, and a whole engine on the Triton backend against the torch one: all on the CPU under
``TRITON_INTERPRET=1``.

The ``interpret`` fixture only sets the variable (monkeypatch, undone after the test): the kernel
modules jit on first use and cache per mode, so the next launch is interpreted, in this process
(as in test_kernels_bitmask.py). Shapes are tiny and blocks small (16) so that a few dozen tokens
already span several tiles, key blocks and decode splits; the CUDA tests in tests/gpu run real
shapes, compiled.
"""

from __future__ import annotations

import zlib
from typing import NamedTuple

import pytest
import torch

import braid as bd
from braid.errors import InvalidRequestError
from braid.runtime.forward_batch import ForwardBatch, ForwardMode
from braid.runtime.kernels import attention as ka
from braid.runtime.layers import attention as layer_attention
from braid.runtime.layers.attention import create_attention_backend, resolve_attention_backend
from braid.runtime.memory import KVPool
from tests.conftest import assert_at_rest
from tests.engine_helpers import make_engine_model, random_prompts

needs_triton = pytest.mark.skipif(ka.triton is None, reason="needs triton")
BLOCK = 16  # the smallest block tl.dot takes on the GPU; many blocks per tiny sequence here
TABLE_WIDTH = 96


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


class Case(NamedTuple):
    q: torch.Tensor  # (T, Hq, D) the new tokens' queries, packed
    k_new: torch.Tensor  # (T, Hkv, D)
    v_new: torch.Tensor
    kv: KVPool  # prefix K/V (and, after store, the new ones) at shuffled slots; random garbage elsewhere
    batch: ForwardBatch


def make_case(mode, prefix_lens, new_lens, num_kv_heads, group, head_dim, dtype, seed, width=TABLE_WIDTH) -> Case:
    """Requests in shuffled table rows, their tokens at shuffled pool slots; the prefixes' K/V
    already in the pool, the new tokens' K/V not yet (the backend stores them). On the CPU."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen).to(dtype)  # noqa: E731
    total = sum(prefix_lens) + sum(new_lens)
    kv = KVPool(total + 9, 1, num_kv_heads, head_dim, dtype, "cpu")
    kv.k[0].copy_(rand(*kv.k[0].shape))  # garbage that a wrong gather would pick up
    kv.v[0].copy_(rand(*kv.v[0].shape))
    slots = (torch.randperm(total + 9, generator=gen) + 1)[:total]
    rows = torch.randperm(len(prefix_lens) + 3, generator=gen)[: len(prefix_lens)]
    table = torch.randint(0, total + 10, (len(prefix_lens) + 3, width), generator=gen)  # garbage past seq_len
    used, out_slots = 0, []
    for row, p, n in zip(rows.tolist(), prefix_lens, new_lens):
        table[row, : p + n] = slots[used : used + p + n]
        kv.store(0, slots[used : used + p], rand(p, num_kv_heads, head_dim), rand(p, num_kv_heads, head_dim))
        out_slots.append(slots[used + p : used + p + n])
        used += p + n
    num_new = sum(new_lens)
    seq_lens = [p + n for p, n in zip(prefix_lens, new_lens)]
    batch = ForwardBatch(
        mode=mode, input_ids=torch.zeros(num_new, dtype=torch.int64),
        positions=torch.cat([torch.arange(p, p + n) for p, n in zip(prefix_lens, new_lens)]),
        out_slots=torch.cat(out_slots), req_rows=rows, seq_lens=torch.tensor(seq_lens),
        prefix_lens_cpu=list(prefix_lens), extend_lens_cpu=list(new_lens), seq_lens_cpu=seq_lens,
        logits_rows=torch.arange(len(prefix_lens)), req_to_token=table,
    )  # fmt: skip
    q = rand(num_new, num_kv_heads * group, head_dim)
    return Case(q, rand(num_new, num_kv_heads, head_dim), rand(num_new, num_kv_heads, head_dim), kv, batch)


def seed_of(*args) -> int:
    return zlib.crc32(repr(args).encode())


def tolerance(dtype: torch.dtype) -> dict:
    # bfloat16: the interpreter rounds float32 -> bfloat16 toward zero (triton 3.9), one ulp off torch
    return {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float16: dict(atol=2e-3, rtol=2e-3),
            torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}[dtype]  # fmt: skip


def stored_case(case: Case) -> Case:
    case.kv.store(0, case.batch.out_slots, case.k_new, case.v_new)
    return case


EXTEND_SHAPES = [  # (prefix lens, new lens, Hkv, group, head_dim, dtype, window)
    ([0, 5, 21], [7, 3, 18], 2, 1, 64, torch.float32, None),  # plain prefill, odd lengths, 2 tiles
    ([0, 5, 21], [7, 3, 18], 2, 1, 64, torch.float32, 5),  # a window shorter than the tiles
    ([13, 0], [1, 35], 1, 2, 128, torch.float32, None),  # a 1-token extend; 3 tiles of one request
    ([3, 40], [17, 2], 2, 4, 64, torch.bfloat16, 9),  # long prefix, short extend
    ([2], [20], 1, 8, 128, torch.float16, None),
    ([6, 0, 11], [5, 9, 4], 1, 3, 24, torch.float32, 30),  # head_dim not a power of two, GQA 3 (SmolLM2)
    ([4, 0], [6, 3], 2, 2, 16, torch.bfloat16, None),  # the tiny test models' head_dim
]


@needs_triton
@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize("prefix_lens,new_lens,hkv,group,head_dim,dtype,window", EXTEND_SHAPES)
def test_extend_kernel_matches_reference(prefix_lens, new_lens, hkv, group, head_dim, dtype, window):
    seed = seed_of(prefix_lens, new_lens, group, head_dim, dtype)
    case = stored_case(make_case(ForwardMode.EXTEND, prefix_lens, new_lens, hkv, group, head_dim, dtype, seed))
    b, k_cache, v_cache = case.batch, case.kv.k[0], case.kv.v[0]
    plan = ka.plan_extend(b.prefix_lens_cpu, b.extend_lens_cpu, case.q.device, block_m=BLOCK)
    assert len(plan.tile_req) > len(new_lens) or max(new_lens) <= BLOCK, "want requests spanning several tiles"
    out = ka.extend_attention_triton(case.q, k_cache, v_cache, b.req_to_token, b.req_rows, plan, 0.3, window)
    ref = ka.extend_attention_reference(
        case.q, k_cache, v_cache, b.req_to_token, b.req_rows, b.prefix_lens_cpu, b.extend_lens_cpu, 0.3, window
    )
    assert out.dtype == dtype and out.shape == case.q.shape
    assert ref.float().std() > 0.05, "degenerate reference"
    torch.testing.assert_close(out, ref, **tolerance(dtype))


DECODE_SHAPES = [  # (sequence lengths, Hkv, group, head_dim, dtype, window, splits)
    ([1, 37, 20], 2, 1, 64, torch.float32, None, 1),  # a 1-token sequence; one split writes the output
    ([1, 37, 20], 2, 1, 64, torch.float32, None, 3),
    ([50, 9], 1, 4, 128, torch.bfloat16, 11, 2),  # window: only the last 11 keys, split in two
    ([33, 64, 5], 2, 8, 64, torch.float16, None, 8),  # more splits than blocks: empty splits
    ([23, 2], 1, 2, 16, torch.float32, None, 4),
    ([30, 17], 3, 3, 24, torch.bfloat16, 7, 2),  # head_dim not a power of two, GQA 3
]


@needs_triton
@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize("seq_lens,hkv,group,head_dim,dtype,window,splits", DECODE_SHAPES)
def test_decode_kernel_matches_reference(seq_lens, hkv, group, head_dim, dtype, window, splits):
    seed = seed_of(seq_lens, group, head_dim, dtype, splits)
    prefix = [n - 1 for n in seq_lens]
    case = stored_case(make_case(ForwardMode.DECODE, prefix, [1] * len(seq_lens), hkv, group, head_dim, dtype, seed))
    b, k_cache, v_cache = case.batch, case.kv.k[0], case.kv.v[0]
    out = ka.decode_attention_triton(
        case.q, k_cache, v_cache, b.req_to_token, b.req_rows, b.seq_lens, 0.3, window, splits, block_n=BLOCK
    )
    ref = ka.decode_attention_reference(case.q, k_cache, v_cache, b.req_to_token, b.req_rows, seq_lens, 0.3, window)
    assert ref.float().std() > 0.05, "degenerate reference"
    torch.testing.assert_close(out, ref, **tolerance(dtype))


def share_prefix(case: Case, shared: list[int], seed: int) -> torch.Tensor:
    """Give the requests with ``shared[i] > 0`` the same first ``shared[i]`` slots (those of the
    request sharing most, with fresh K/V there): a prefix a batch shares, as the radix cache makes."""
    b, gen = case.batch, torch.Generator().manual_seed(seed)
    rows = b.req_rows.tolist()
    ref = case.batch.req_to_token[rows[shared.index(max(shared))], : max(shared)].clone()
    hkv, dim = case.kv.k[0].shape[1:]
    case.kv.store(0, ref, *(torch.randn(len(ref), hkv, dim, generator=gen).to(case.q.dtype) for _ in range(2)))
    for row, n in zip(rows, shared):
        b.req_to_token[row, :n] = ref[:n]
    return torch.tensor(shared)


CASCADE_SHAPES = [  # (sequence lengths, shared lengths, Hkv, group, head_dim, dtype, decode splits, prefix splits)
    ([40, 37, 52], [35, 35, 35], 2, 1, 64, torch.float32, 1, 1),  # all share; one split each
    ([40, 37, 52, 9], [35, 35, 0, 0], 2, 4, 64, torch.float32, 2, 3),  # two do not share
    ([60, 61, 45, 70, 33], [44, 20, 44, 44, 0], 1, 3, 24, torch.bfloat16, 1, 2),  # one shares less; GQA 3
    ([50, 29, 31], [28, 28, 28], 2, 8, 128, torch.float16, 3, 8),  # more splits than key blocks
    ([20, 20], [0, 0], 1, 2, 16, torch.float32, 2, 4),  # nothing shared: the pass reads no key
]


@needs_triton
@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize("seq_lens,shared,hkv,group,head_dim,dtype,splits,prefix_splits", CASCADE_SHAPES)
def test_cascade_decode_matches_reference(seq_lens, shared, hkv, group, head_dim, dtype, splits, prefix_splits):
    """Cascade decode (the shared prefix attended once, by tiles of (request, head) rows, merged
    with each request's own keys) is the plain decode semantics: the reference, unchanged."""
    seed = seed_of(seq_lens, shared, group, head_dim, dtype)
    prefix = [n - 1 for n in seq_lens]
    case = stored_case(make_case(ForwardMode.DECODE, prefix, [1] * len(seq_lens), hkv, group, head_dim, dtype, seed))
    shared_lens = share_prefix(case, shared, seed) if max(shared) else torch.tensor(shared)
    b, k_cache, v_cache = case.batch, case.kv.k[0], case.kv.v[0]
    out = ka.decode_attention_triton(
        case.q, k_cache, v_cache, b.req_to_token, b.req_rows, b.seq_lens, 0.3, None, splits, block_n=BLOCK,
        shared_lens=shared_lens, prefix_splits=prefix_splits, block_m=BLOCK,
    )  # fmt: skip
    ref = ka.decode_attention_reference(case.q, k_cache, v_cache, b.req_to_token, b.req_rows, seq_lens, 0.3, None)
    assert ref.float().std() > 0.05, "degenerate reference"
    torch.testing.assert_close(out, ref, **tolerance(dtype))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("seq_lens,shared,hkv,group,head_dim,dtype,splits,prefix_splits", CASCADE_SHAPES[1:4])
def test_backends_with_a_shared_prefix_match_reference(monkeypatch, backend, seq_lens, shared, hkv, group, head_dim,
                                                       dtype, splits, prefix_splits):  # fmt: skip
    """Both backends given ``batch.shared_lens`` (the torch one gathers the prefix once and runs
    one softmax over it and each request's own keys): the decode semantics, unchanged."""
    if backend == "triton":
        if ka.triton is None:
            pytest.skip("needs triton")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    seed = seed_of("backend", seq_lens, shared, dtype)
    prefix = [n - 1 for n in seq_lens]
    case = make_case(ForwardMode.DECODE, prefix, [1] * len(seq_lens), hkv, group, head_dim, dtype, seed)
    case.batch.shared_lens, case.batch.shared_lens_cpu = share_prefix(case, shared, seed), list(shared)
    blocks = {"extend_block": BLOCK, "decode_block": BLOCK} if backend == "triton" else {}
    attn = create_attention_backend(backend, **blocks)
    out = attn.forward(0, case.q, case.k_new, case.v_new, case.batch, case.kv, 0.3, None)
    assert "cascade" in case.batch.attn_memo or ("triton-splits", None, True) in case.batch.attn_memo
    b = case.batch
    ref = ka.decode_attention_reference(case.q, case.kv.k[0], case.kv.v[0], b.req_to_token, b.req_rows, seq_lens, 0.3,
                                        None)  # fmt: skip
    torch.testing.assert_close(out, ref, **tolerance(dtype))


CASCADE_EXTENDS = [  # (prefix lens, new lens, shared lens, Hkv, group, head_dim)
    ([30, 30, 35, 30], [3, 5, 1, 4], [30, 30, 30, 30], 2, 2, 16),  # select's choices after one prompt
    ([30, 12, 40, 25], [4, 6, 2, 5], [25, 0, 25, 25], 1, 3, 24),  # one shares nothing, one caches more
    ([20, 20], [6, 6], [12, 20], 2, 4, 32),  # sharing less than the longest
]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("prefix_lens,new_lens,shared,hkv,group,head_dim", CASCADE_EXTENDS)
def test_cascade_extend_matches_reference(monkeypatch, backend, prefix_lens, new_lens, shared, hkv, group, head_dim):
    """Short extends over a shared cached prefix (select's choices, fork branches): the prefix
    read once for all sharers, the new tokens causal among themselves over the rest, merged
    (torch: one softmax; triton: the prefix pass and the extend kernel, merged by log-sum-exp);
    the extend semantics."""
    blocks = {}
    if backend == "triton":
        if ka.triton is None:
            pytest.skip("needs triton")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        blocks = {"extend_block": BLOCK, "decode_block": BLOCK}
    seed = seed_of("extend", prefix_lens, new_lens, shared)
    case = make_case(ForwardMode.EXTEND, prefix_lens, new_lens, hkv, group, head_dim, torch.float32, seed)
    case.batch.shared_lens, case.batch.shared_lens_cpu = share_prefix(case, shared, seed), list(shared)
    attn = create_attention_backend(backend, **blocks)
    out = attn.forward(0, case.q, case.k_new, case.v_new, case.batch, case.kv, 0.3, None)
    memo = case.batch.attn_memo
    assert "cascade" in memo if backend == "torch" else memo[("triton-tiles", True)][0].tok_req is not None
    b = case.batch
    ref = ka.extend_attention_reference(case.q, case.kv.k[0], case.kv.v[0], b.req_to_token, b.req_rows, prefix_lens,
                                        new_lens, 0.3, None)  # fmt: skip
    assert ref.std() > 0.05
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


CASCADE_EXTEND_KERNEL = [  # (prefix lens, new lens, shared lens, Hkv, group, head_dim, dtype, prefix splits)
    ([40, 40, 45, 40, 40], [3, 5, 1, 4, 20], [40, 40, 40, 40, 40], 2, 2, 64, torch.float32, 1),  # one tile longer
    ([40, 12, 50, 35], [4, 6, 2, 5], [35, 0, 35, 35], 1, 4, 32, torch.bfloat16, 3),  # a non-sharer; GQA 4
    ([30, 30, 30], [7, 2, 9], [18, 30, 30], 2, 3, 24, torch.float16, 8),  # one shares less; more splits than blocks
]


@needs_triton
@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize("prefix_lens,new_lens,shared,hkv,group,head_dim,dtype,prefix_splits", CASCADE_EXTEND_KERNEL)
def test_cascade_extend_kernel_matches_reference(prefix_lens, new_lens, shared, hkv, group, head_dim, dtype,
                                                 prefix_splits):  # fmt: skip
    seed = seed_of("extend kernel", prefix_lens, new_lens, shared, dtype)
    case = stored_case(make_case(ForwardMode.EXTEND, prefix_lens, new_lens, hkv, group, head_dim, dtype, seed))
    share_prefix(case, shared, seed)
    b, k_cache, v_cache = case.batch, case.kv.k[0], case.kv.v[0]
    plan = ka.plan_extend(prefix_lens, new_lens, case.q.device, block_m=BLOCK, shared_lens=shared)
    assert plan.tok_req.tolist() == [i for i, n in enumerate(new_lens) for _ in range(n)]
    out = ka.extend_attention_triton(case.q, k_cache, v_cache, b.req_to_token, b.req_rows, plan, 0.3, None,
                                     prefix_splits)  # fmt: skip
    ref = ka.extend_attention_reference(case.q, k_cache, v_cache, b.req_to_token, b.req_rows, prefix_lens, new_lens,
                                        0.3, None)  # fmt: skip
    assert ref.float().std() > 0.05, "degenerate reference"
    torch.testing.assert_close(out, ref, **tolerance(dtype))


@needs_triton
@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize("new_lens,shared,max_tokens,cascade", [
    ([BLOCK, BLOCK, BLOCK - 2], [24] * 3, 4096, False),  # full tiles: nothing to gain
    ([BLOCK, 3, 2], [24] * 3, 4096, True),  # tiles half empty
    ([2 * BLOCK, 3, 2], [0, 24, 24], 4096, False),  # the sharers hold too few of the tokens
    ([BLOCK, 3, 2], [24] * 3, 20, False),  # more tokens than the partials may take
])  # fmt: skip
def test_triton_extend_cascade_only_where_it_pays(monkeypatch, new_lens, shared, max_tokens, cascade):
    """Extends that fill their tiles gain nothing from cascade (same score work, plus partials),
    nor do batches mostly of non-sharers, and the partials are bounded: the backend plans those
    without it, and the output is the extend semantics either way."""
    monkeypatch.setattr(layer_attention, "EXTEND_CASCADE_MAX_TOKENS", max_tokens)
    attn = create_attention_backend("triton", extend_block=BLOCK, decode_block=BLOCK)
    case = make_case(ForwardMode.EXTEND, [24] * 3, new_lens, 1, 2, 16, torch.float32, seed=sum(new_lens))
    case.batch.shared_lens, case.batch.shared_lens_cpu = share_prefix(case, shared, 3), list(shared)
    out = attn.forward(0, case.q, case.k_new, case.v_new, case.batch, case.kv, 0.3, None)
    assert (case.batch.attn_memo[("triton-tiles", True)][0].tok_req is not None) == cascade
    b = case.batch
    ref = ka.extend_attention_reference(case.q, case.kv.k[0], case.kv.v[0], b.req_to_token, b.req_rows, [24] * 3,
                                        new_lens, 0.3, None)  # fmt: skip
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


@needs_triton
@pytest.mark.usefixtures("interpret")
def test_cascade_extend_wrapper_asserts_before_launch():
    case = stored_case(make_case(ForwardMode.EXTEND, [20, 20], [3, 2], 1, 2, 16, torch.float32, seed=5))
    share_prefix(case, [12, 12], seed=6)
    b = case.batch
    args = (case.q, case.kv.k[0], case.kv.v[0], b.req_to_token, b.req_rows)
    plan = ka.plan_extend([20, 20], [3, 2], case.q.device, block_m=BLOCK, shared_lens=[12, 12])
    with pytest.raises(AssertionError, match="prefix_splits"):
        ka.extend_attention_triton(*args, plan, 0.3, None)
    with pytest.raises(AssertionError, match="not a sliding window"):
        ka.extend_attention_triton(*args, plan, 0.3, 4, 2)
    unshared = ka.plan_extend([20, 20], [3, 2], case.q.device, block_m=BLOCK, shared_lens=[16, 16])
    with pytest.raises(AssertionError, match="does not share its first 16 slots"):
        ka.extend_attention_triton(*args, unshared, 0.3, None, 2)
    with pytest.raises(AssertionError, match="within the cached prefixes"):
        ka.plan_extend([20, 20], [3, 2], case.q.device, shared_lens=[21, 0])


@pytest.mark.skipif(layer_attention._CPU_FLASH is None, reason="this torch has no CPU flash attention op")
@pytest.mark.parametrize("mode,prefix_lens,new_lens,shared", [
    (ForwardMode.DECODE, [40, 33, 51, 35], [1, 1, 1, 1], [30, 30, 0, 30]),
    (ForwardMode.EXTEND, [30, 30, 35, 12], [3, 5, 1, 4], [30, 30, 30, 0]),
    (ForwardMode.EXTEND, [30, 30], [3, 5], [30, 30]),  # every request shares everything cached
])  # fmt: skip
def test_fused_cpu_cascade_matches_the_generic_one(mode, prefix_lens, new_lens, shared):
    """The fast path (two fused attention calls merged by log-sum-exp) against its reference
    (one explicit softmax over both key sets), on fresh random inputs."""
    seed = seed_of("fused", mode, prefix_lens, shared)
    case = stored_case(make_case(mode, prefix_lens, new_lens, 3, 3, 64, torch.float32, seed))
    case.batch.shared_lens, case.batch.shared_lens_cpu = share_prefix(case, shared, seed), list(shared)
    plan = layer_attention._cascade_plan(case.batch, group=3)
    assert plan.own_bias is not None  # the plan picks the fused path
    assert plan.sharers is not None and plan.sharers.tolist() == [i for i, s in enumerate(shared) if s]
    fast = layer_attention._cascade_attention_cpu(0, case.q, case.kv, 0.3, plan)
    slow = layer_attention._cascade_attention_generic(0, case.q, case.kv, 0.3, plan)
    assert slow.std() > 0.05
    torch.testing.assert_close(fast, slow, atol=2e-5, rtol=2e-5)


def test_torch_cascade_is_skipped_where_padding_would_not_pay():
    case = make_case(ForwardMode.EXTEND, [20, 20, 20], [40, 1, 1], 1, 2, 16, torch.float32, seed=11)
    case.batch.shared_lens, case.batch.shared_lens_cpu = share_prefix(case, [20, 20, 20], 12), [20, 20, 20]
    out = create_attention_backend("torch").forward(0, case.q, case.k_new, case.v_new, case.batch, case.kv, 0.3, None)
    assert "cascade" not in case.batch.attn_memo  # 3 x 40 padded queries for 42 real ones
    b = case.batch
    ref = ka.extend_attention_reference(case.q, case.kv.k[0], case.kv.v[0], b.req_to_token, b.req_rows, [20] * 3,
                                        [40, 1, 1], 0.3, None)  # fmt: skip
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


def _cascade_args(**change):
    case = stored_case(make_case(ForwardMode.DECODE, [8, 12, 6], [1, 1, 1], 2, 2, 16, torch.float32, seed=8))
    cascade = dict(num_splits=1, shared_lens=share_prefix(case, [5, 5, 0], seed=9), prefix_splits=2, block_m=BLOCK)
    return _wrapper_args(case, cascade, change)


@needs_triton
@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize(
    "change,message",
    [
        ({"sliding_window": lambda a: 4}, "not a sliding window"),
        ({"shared_lens": lambda a: a["shared_lens"][:2]}, "shared_lens shape"),
        ({"prefix_splits": lambda a: 0}, "prefix_splits"),
        ({"block_m": lambda a: 24}, "block_m"),
        ({"shared_lens": lambda a: a["seq_lens"]}, "shared_lens .* must be in 0 .. seq_lens - 1"),
        ({"shared_lens": lambda a: torch.tensor([5, 5, 3])}, "does not share its first 3 slots"),
    ],
)
def test_cascade_wrapper_asserts_before_launch(change, message):
    with pytest.raises(AssertionError, match=message):
        ka.decode_attention_triton(**_cascade_args(**change))


def test_prefix_split_policy():
    # 64 requests x GQA 4 in tiles of 64 rows, 8 KV heads on 132 SMs: 32 programs per split
    assert ka.prefix_splits(64, 4, 8, 2000, 132) == 8  # 2,000 keys: 8 splits of >= 250 (MIN_SPLIT_TOKENS)
    assert ka.prefix_splits(64, 4, 8, 1 << 20, 132) == 9  # about two waves
    assert ka.prefix_splits(1, 1, 1, 1 << 20, 132) == ka.MAX_SPLITS
    assert ka.prefix_splits(8, 4, 8, 0, 132) == 1


@pytest.mark.parametrize("mode", [ForwardMode.EXTEND, ForwardMode.DECODE])
@pytest.mark.parametrize("window", [None, 4])
def test_reference_matches_torch_backend(mode, window):
    """The kernels' reference and the torch backend are written independently: they must agree."""
    new = [6, 1, 9] if mode is ForwardMode.EXTEND else [1, 1, 1]
    case = make_case(mode, [0, 12, 5], new, 2, 2, 16, torch.float32, seed=seed_of(mode, window))
    b = case.batch
    out = create_attention_backend("torch").forward(0, case.q, case.k_new, case.v_new, b, case.kv, 0.3, window)
    ref = ka.extend_attention_reference(
        case.q, case.kv.k[0], case.kv.v[0], b.req_to_token, b.req_rows, b.prefix_lens_cpu, new, 0.3, window
    )
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


class Calls:
    """Counts calls of the wrapped functions (patched where the caller looks them up)."""

    def __init__(self, monkeypatch, *targets) -> None:
        self.counts: dict[str, int] = {}
        for module, name in targets:
            self._wrap(monkeypatch, module, name)

    def _wrap(self, monkeypatch, module, name) -> None:
        original = getattr(module, name)
        self.counts[name] = 0

        def counted(*args, **kwargs):
            self.counts[name] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)


@needs_triton
@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize(
    "mode,prefix_lens,new_lens,window",
    [
        (ForwardMode.EXTEND, [0, 30, 1, 7], [20, 3, 2, 17], None),
        (ForwardMode.EXTEND, [0, 30, 1, 7], [20, 3, 2, 17], 6),
        (ForwardMode.DECODE, [40, 0, 18], [1, 1, 1], None),
        (ForwardMode.DECODE, [40, 0, 18], [1, 1, 1], 6),
    ],
)
def test_triton_backend_matches_torch_backend(monkeypatch, mode, prefix_lens, new_lens, window):
    calls = Calls(monkeypatch, (ka, "extend_attention_triton"), (ka, "decode_attention_triton"),
                  (layer_attention, "store_kv_triton"))  # fmt: skip
    args = (mode, prefix_lens, new_lens, 2, 4, 32, torch.float32, seed_of(mode, window))
    want_case, got_case = make_case(*args), make_case(*args)
    want = create_attention_backend("torch").forward(
        0, want_case.q, want_case.k_new, want_case.v_new, want_case.batch, want_case.kv, 0.3, window
    )
    triton_backend = create_attention_backend("triton", extend_block=BLOCK, decode_block=BLOCK)
    assert triton_backend.uses_kernels(torch.device("cpu"))
    got = triton_backend.forward(
        0, got_case.q, got_case.k_new, got_case.v_new, got_case.batch, got_case.kv, 0.3, window
    )
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(got_case.kv.k[0], want_case.kv.k[0], atol=0, rtol=0)  # new K/V stored alike
    torch.testing.assert_close(got_case.kv.v[0], want_case.kv.v[0], atol=0, rtol=0)
    kernel = "decode_attention_triton" if mode is ForwardMode.DECODE else "extend_attention_triton"
    assert calls.counts[kernel] == 1 and calls.counts["store_kv_triton"] == 1, calls.counts


@needs_triton
@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize("window", [None, 6])
def test_decode_sized_for_the_context_matches_decode_sized_for_the_batch(monkeypatch, window):
    """A CUDA graph sizes decode attention for the context length (``decode_max_keys``), so most
    splits of a short sequence are empty: the output must equal the launch sized for the batch."""
    monkeypatch.setattr(ka, "num_sms", lambda device: 132)  # a GPU's worth of programs: many splits
    args = (ForwardMode.DECODE, [40, 0, 18], [1, 1, 1], 2, 4, 32, torch.float32, seed_of("graph", window))
    outs, splits = [], []
    for max_keys in (None, 4096):
        case = make_case(*args)
        case.batch.decode_max_keys = max_keys
        backend = create_attention_backend("triton", extend_block=BLOCK, decode_block=BLOCK)
        outs.append(backend.forward(0, case.q, case.k_new, case.v_new, case.batch, case.kv, 0.3, window))
        splits.append(case.batch.attn_memo[("triton-splits", window, False)][0])
    assert splits[0] < splits[1] if window is None else splits[0] == splits[1] == 1, splits  # a window caps keys
    torch.testing.assert_close(outs[1], outs[0], atol=2e-5, rtol=2e-5)


def test_extend_plan_covers_every_token_once_longest_first():
    prefix, ext = [0, 40, 3, 9], [35, 2, 0, 16]
    plan = ka.plan_extend(prefix, ext, torch.device("cpu"), block_m=16)
    tiles = list(zip(plan.tile_req.tolist(), plan.tile_start.tolist()))
    covered = sorted((i, m + j) for i, m in tiles for j in range(16) if m + j < ext[i])
    assert covered == [(i, t) for i in range(4) for t in range(ext[i])]
    keys = [prefix[i] + min(m + 16, ext[i]) for i, m in tiles]
    assert keys == sorted(keys, reverse=True)
    assert plan.req_meta.tolist() == [prefix, ext, [0, 35, 37, 37], [0] * 4] and plan.num_tokens == 53
    assert plan.tok_req is None
    shared = ka.plan_extend(prefix, ext, torch.device("cpu"), block_m=16, shared_lens=[0, 40, 0, 9])
    keys = [prefix[i] - [0, 40, 0, 9][i] + min(m + 16, ext[i]) for i, m in zip(shared.tile_req.tolist(),
                                                                            shared.tile_start.tolist())]  # fmt: skip
    assert keys == sorted(keys, reverse=True) and shared.req_meta[3].tolist() == [0, 40, 0, 9]


def test_decode_split_policy():
    # one long request on a 132-SM GPU: split up to the cap; a full batch: no split
    assert ka.decode_splits(1, 8, 32768, 132) == ka.MAX_SPLITS
    assert ka.decode_splits(256, 8, 32768, 132) == 1
    # short sequences are not split below MIN_SPLIT_TOKENS keys per split
    assert ka.decode_splits(1, 8, ka.MIN_SPLIT_TOKENS * 3, 132) == 3
    assert ka.decode_splits(4, 2, 100, 132) == 1
    assert ka.decode_splits(0, 8, 0, 132) == 1


@needs_triton
@pytest.mark.usefixtures("interpret")
def test_interpreted_kernels_are_used():
    from triton.runtime.interpreter import InterpretedFunction

    assert all(isinstance(k, InterpretedFunction) for k in ka._kernels(ka.interpreting()))


def _decode_args(**change):
    case = stored_case(make_case(ForwardMode.DECODE, [4, 9], [1, 1], 2, 2, 16, torch.float32, seed=3))
    return _wrapper_args(case, {"num_splits": 2}, change)


def _wrapper_args(case: Case, extra: dict, change: dict) -> dict:
    """decode_attention_triton's arguments for ``case`` (and ``extra``), then each ``change``
    applied: name -> function of the arguments so far."""
    b = case.batch
    args = dict(q=case.q, k_cache=case.kv.k[0], v_cache=case.kv.v[0], req_to_token=b.req_to_token,
                req_rows=b.req_rows, seq_lens=b.seq_lens, scale=0.3, sliding_window=None, **extra)  # fmt: skip
    args.update({name: fn(args) for name, fn in change.items()})
    return args


@needs_triton
@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize(
    "change,message",
    [
        ({"q": lambda a: a["q"].to(torch.int32)}, "q dtype"),
        ({"q": lambda a: a["q"][..., :8]}, "head_dim of q"),
        ({"q": lambda a: a["q"][:, :3]}, "not a multiple of"),
        ({"q": lambda a: a["q"].transpose(1, 2).contiguous().transpose(1, 2)}, "last dim must be contiguous"),
        ({"k_cache": lambda a: a["k_cache"].transpose(0, 1).contiguous().transpose(0, 1)}, "must be contiguous"),
        ({"v_cache": lambda a: a["v_cache"].half()}, "v_cache dtype"),
        ({"seq_lens": lambda a: a["seq_lens"] + TABLE_WIDTH}, "does not fit the table's 96 columns"),
        ({"seq_lens": lambda a: a["seq_lens"] - a["seq_lens"]}, "seq_lens must be >= 1"),
        ({"req_rows": lambda a: a["req_rows"] + 100}, "outside the table's rows"),
        ({"k_cache": lambda a: a["k_cache"][:3], "v_cache": lambda a: a["v_cache"][:3]}, "the pool has 0..2"),
        ({"seq_lens": lambda a: a["seq_lens"][:1]}, "seq_lens shape"),
        ({"scale": lambda a: -1.0}, "scale must be"),
        ({"sliding_window": lambda a: 0}, "sliding_window"),
        ({"num_splits": lambda a: 0}, "num_splits"),
    ],
)
def test_decode_wrapper_asserts_before_launch(change, message):
    with pytest.raises(AssertionError, match=message):
        ka.decode_attention_triton(**_decode_args(**change))


@needs_triton
@pytest.mark.usefixtures("interpret")
def test_extend_wrapper_asserts_plan_fits_batch():
    case = stored_case(make_case(ForwardMode.EXTEND, [0, 3], [4, 2], 1, 2, 16, torch.float32, seed=4))
    b = case.batch
    bad_plan = ka.plan_extend([0, 3], [4, 3], case.q.device)
    with pytest.raises(AssertionError, match="plan covers 7 tokens, q has 6"):
        ka.extend_attention_triton(case.q, case.kv.k[0], case.kv.v[0], b.req_to_token, b.req_rows, bad_plan, 0.3, None)
    long_plan = ka.plan_extend([0, TABLE_WIDTH], [4, 2], case.q.device)
    with pytest.raises(AssertionError, match="does not fit the table"):
        ka.extend_attention_triton(case.q, case.kv.k[0], case.kv.v[0], b.req_to_token, b.req_rows, long_plan, 0.3, None)


@needs_triton
def test_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(AssertionError, match="TRITON_INTERPRET=1"):
        ka.decode_attention_triton(**_decode_args())
    with pytest.raises(InvalidRequestError, match="attention_backend"):
        resolve_attention_backend("triton", torch.device("cpu"))
    assert resolve_attention_backend("auto", torch.device("cpu")) == "torch"
    assert resolve_attention_backend("auto", torch.device("cuda")) == "triton"
    assert not create_attention_backend("triton").uses_kernels(torch.device("cpu"))
    assert not create_attention_backend("torch").uses_kernels(torch.device("cuda"))


# ------------------------------------------------------------------------------------ whole engine


@needs_triton
@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize("arch", ["qwen3", "mistral"])  # q/k norms, head_dim 32; sliding window 7, GQA 4
def test_engine_on_triton_backend_matches_torch_backend(monkeypatch, tmp_path, arch):
    import braid.runtime.layers.norm as layer_norm
    import braid.runtime.layers.rotary as layer_rotary
    import braid.runtime.models.decoder as decoder

    folder = make_engine_model(arch, tmp_path, num_hidden_layers=2)
    prompts = random_prompts(3, 5, 21, 512, seed=21)
    params = {"temperature": 0.0, "ignore_eos": True, "max_new_tokens": 5}
    outputs = {}
    for backend in ("torch", "triton"):
        calls = Calls(monkeypatch, (ka, "extend_attention_triton"), (ka, "decode_attention_triton"),
                      (layer_attention, "store_kv_triton"), (layer_norm, "rms_norm_triton"),
                      (layer_norm, "add_rms_norm_triton"), (layer_rotary, "apply_rotary_triton"),
                      (decoder, "silu_and_mul_triton"))  # fmt: skip
        # chunks of 8 tokens: extends over a cached prefix, not just plain prefills
        with bd.Engine(model_path=folder, device="cpu", attention_backend=backend, max_total_tokens=512,
                       cpu_threads=1, chunked_prefill_size=8) as eng:  # fmt: skip
            assert eng.runner.attention_backend == backend
            outputs[backend] = eng.generate(input_ids=prompts, sampling_params=params, return_logprob=True)
            assert_at_rest(eng)
        used = {name for name, n in calls.counts.items() if n}
        assert used == (set(calls.counts) if backend == "triton" else set()), calls.counts
    for want, got in zip(outputs["torch"], outputs["triton"]):
        assert got["output_ids"] == want["output_ids"]
        lps = [(a[0], b[0]) for a, b in zip(got["meta_info"]["output_token_logprobs"],
                                            want["meta_info"]["output_token_logprobs"])]  # fmt: skip
        assert max(abs(a - b) for a, b in lps) < 1e-4
    assert len({t for o in outputs["torch"] for t in o["output_ids"]}) > 2, "degenerate model output"


@needs_triton
@pytest.mark.usefixtures("interpret")
def test_engine_with_cascade_attention_matches_torch_backend(monkeypatch, tmp_path):
    """Requests prefilled and decoding under one cached prefix: the scheduler finds it in the radix
    cache and the Triton backend reads it once per pass (cascade, in the extend and in decode);
    tokens and logprobs match the torch backend."""
    import braid.runtime.scheduler as scheduler

    monkeypatch.setattr(scheduler, "CASCADE_MIN_SAVED", 1)  # tiny prompts: any sharing counts
    seen: list[list[int] | None] = []
    extends: list[list[int]] = []
    decode, extend = ka.decode_attention_triton, ka.extend_attention_triton

    def recording(*args, **kwargs):
        shared = kwargs.get("shared_lens")
        seen.append(None if shared is None else shared.tolist())
        return decode(*args, **kwargs)

    def recording_extend(q, k_cache, v_cache, req_to_token, req_rows, plan, *rest):
        if plan.tok_req is not None:
            extends.append(plan.req_meta[3].tolist())
        return extend(q, k_cache, v_cache, req_to_token, req_rows, plan, *rest)

    monkeypatch.setattr(ka, "decode_attention_triton", recording)
    monkeypatch.setattr(ka, "extend_attention_triton", recording_extend)
    folder = make_engine_model("llama3", tmp_path, num_hidden_layers=2)
    system = random_prompts(1, 40, 40, 300, seed=3)[0]
    prompts = [system + own for own in random_prompts(4, 3, 9, 300, seed=4)]
    params = {"temperature": 0.0, "ignore_eos": True, "max_new_tokens": 4}
    outputs = {}
    for backend in ("torch", "triton"):  # the reference: torch without cascade
        with bd.Engine(model_path=folder, device="cpu", attention_backend=backend, max_total_tokens=512,
                       cpu_threads=1, disable_cascade_attention=backend == "torch") as eng:  # fmt: skip
            eng.generate(input_ids=[system], sampling_params={"max_new_tokens": 1})  # cache the prefix
            outputs[backend] = eng.generate(input_ids=prompts, sampling_params=params, return_logprob=True)
            assert_at_rest(eng)
    # every layer of at least one decode step, and of the prompts' prefill, attended the 40 shared
    # tokens once for 4 requests
    assert [40, 40, 40, 40] in seen, seen
    assert [40, 40, 40, 40] in extends, extends
    for want, got in zip(outputs["torch"], outputs["triton"]):
        assert got["output_ids"] == want["output_ids"]
        lps = [(a[0], b[0]) for a, b in zip(got["meta_info"]["output_token_logprobs"],
                                            want["meta_info"]["output_token_logprobs"])]  # fmt: skip
        assert max(abs(a - b) for a, b in lps) < 1e-4


def test_engine_on_torch_backend_with_cascade_matches_without(monkeypatch, tmp_path):
    """The torch backend's cascade (the CPU default): same greedy tokens and logprobs as with
    --disable-cascade-attention, and the shared prefix was found and used in decode and extend."""
    import braid.runtime.scheduler as scheduler

    monkeypatch.setattr(scheduler, "CASCADE_MIN_SAVED", 1)
    folder = make_engine_model("qwen3", tmp_path, num_hidden_layers=2)  # GQA 2, q/k norms
    system = random_prompts(1, 60, 60, 300, seed=5)[0]
    prompts = [system + own for own in random_prompts(5, 2, 12, 300, seed=6)] + random_prompts(1, 9, 9, 300, seed=7)
    params = {"temperature": 0.0, "ignore_eos": True, "max_new_tokens": 6}
    outputs, plans = {}, []
    original = layer_attention._cascade_plan
    monkeypatch.setattr(layer_attention, "_cascade_plan", lambda batch, group: plans.append(
        (batch.mode, sorted(batch.shared_lens_cpu))) or original(batch, group))  # fmt: skip
    for disabled in (False, True):
        with bd.Engine(model_path=folder, device="cpu", max_total_tokens=512, cpu_threads=1,
                       disable_cascade_attention=disabled) as eng:  # fmt: skip
            outputs[disabled] = eng.generate(input_ids=prompts, sampling_params=params, return_logprob=True)
            assert_at_rest(eng)
        if not disabled:  # five share 60 tokens, one nothing; the four after the first extend over them
            assert (ForwardMode.DECODE, [0] + [60] * 5) in plans, plans
            assert any(mode is ForwardMode.EXTEND for mode, _ in plans), plans
            plans.clear()
    assert not plans
    for want, got in zip(outputs[True], outputs[False]):
        assert got["output_ids"] == want["output_ids"]
        lps = [(a[0], b[0]) for a, b in zip(got["meta_info"]["output_token_logprobs"],
                                            want["meta_info"]["output_token_logprobs"])]  # fmt: skip
        assert max(abs(a - b) for a, b in lps) < 1e-4
