"""The small fused kernels (RMSNorm with residual add, RoPE, SiLU-and-mul, KV store) against their
torch references on fresh random inputs, on the CPU under ``TRITON_INTERPRET=1`` (set per test, as
in test_kernels_bitmask.py), plus their wrappers' checks and a compile of every kernel for sm_90.

bfloat16 tolerances are a few ulps: the interpreter rounds float32 -> bfloat16 toward zero (triton
3.9) where torch rounds to nearest, at each of a kernel's roundings; float32 and float16 results are
(nearly) bit-equal.
"""

from __future__ import annotations

import inspect
import zlib

import pytest
import torch

from braid.runtime import kernels
from braid.runtime.kernels import activation, attention, kv_store, norm, rotary
from braid.runtime.layers.norm import RMSNorm
from braid.runtime.layers.rotary import RopeSpec, RotaryEmbedding

needs_triton = pytest.mark.skipif(kernels.triton is None, reason="needs triton")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def gen_for(*args) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(args).encode()))


def assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    # bfloat16: atol covers a sum that cancels to near zero after its terms were rounded (RoPE)
    tol = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-3, 1e-3), torch.bfloat16: (4e-2, 2.4e-2)}[want.dtype]
    torch.testing.assert_close(got, want, atol=tol[0], rtol=tol[1])


# ------------------------------------------------------------------------------------------ RMSNorm


@needs_triton
@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 64), (3, 100), (4, 3, 48)])  # (N, D), D not a power of 2, (T, H, D)
def test_rms_norm_matches_reference(dtype, shape):
    gen = gen_for(dtype, shape)
    # a strided view, as the q/k norms get from the fused qkv projection
    wide = torch.randn(*shape[:-1], shape[-1] + 6, generator=gen).to(dtype)
    x = wide[..., 3 : 3 + shape[-1]]
    weight = (1 + 0.3 * torch.randn(shape[-1], generator=gen)).to(dtype)
    assert_close(norm.rms_norm_triton(x, weight, 1e-6), norm.rms_norm_reference(x, weight, 1e-6))


@needs_triton
@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm_matches_reference(dtype):
    gen = gen_for("add", dtype)
    x, residual = (torch.randn(7, 80, generator=gen).to(dtype) for _ in range(2))
    weight = (1 + 0.3 * torch.randn(80, generator=gen)).to(dtype)
    got = norm.add_rms_norm_triton(x, residual, weight, 1e-5)
    want = norm.add_rms_norm_reference(x, residual, weight, 1e-5)
    assert_close(got.normed, want.normed)
    if dtype != torch.bfloat16:  # (the interpreter's bfloat16 rounding differs, see the module doc)
        assert torch.equal(got.summed, want.summed), "the residual sum is rounded once, as torch's add"
    assert_close(got.summed, want.summed)
    assert torch.equal(want.summed, x + residual)


@needs_triton
@pytest.mark.usefixtures("interpret")
def test_rms_norm_layer_routes_to_the_kernel(monkeypatch):
    layer = RMSNorm(32, 1e-6)
    with torch.no_grad():
        layer.weight.copy_(1 + 0.3 * torch.randn(32, generator=gen_for("layer")))
    x, r = torch.randn(4, 32, generator=gen_for("x")), torch.randn(4, 32, generator=gen_for("r"))
    calls = []
    monkeypatch.setattr("braid.runtime.layers.norm.rms_norm_triton", lambda *a: calls.append(a) or a[0])
    assert torch.equal(layer(x, fused=True), x) and len(calls) == 1
    torch.testing.assert_close(layer(x), norm.rms_norm_reference(x, layer.weight, 1e-6), atol=0, rtol=0)
    normed, summed = layer.add_forward(x, r)
    assert torch.equal(summed, x + r) and torch.equal(normed, layer(x + r))


# --------------------------------------------------------------------------------------------- RoPE

SPECS = {
    "default": RopeSpec(theta=10000.0),
    "linear": RopeSpec(theta=10000.0, rope_type="linear", factor=4.0),
    "llama3": RopeSpec(theta=500000.0, rope_type="llama3", factor=8.0, original_max_positions=64),
}


def qk_views(num_tokens, num_q_heads, num_kv_heads, head_dim, dtype, gen):
    """q and k as the views of one fused qkv output the model hands to RoPE."""
    q_size, kv_size = num_q_heads * head_dim, num_kv_heads * head_dim
    qkv = torch.randn(num_tokens, q_size + 2 * kv_size, generator=gen).to(dtype)
    q = qkv[:, :q_size].view(num_tokens, num_q_heads, head_dim)
    k = qkv[:, q_size : q_size + kv_size].view(num_tokens, num_kv_heads, head_dim)
    return qkv, q, k


@needs_triton
@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rope", sorted(SPECS))
@pytest.mark.parametrize("heads,head_dim", [((4, 2), 16), ((3, 1), 24), ((8, 1), 64)])
def test_rotary_matches_reference_in_place_and_out(dtype, rope, heads, head_dim):
    gen = gen_for(dtype, rope, heads, head_dim)
    emb = RotaryEmbedding(SPECS[rope], head_dim, max_positions=200)
    qkv, q, k = qk_views(9, *heads, head_dim, dtype, gen)
    positions = torch.randint(0, 200, (9,), generator=gen)
    want = rotary.apply_rotary_reference(q, k, emb.cos, emb.sin, positions)
    # the reference is the layer's torch path, bit for bit
    layer_q, layer_k = RotaryEmbedding.apply(q, k, emb.lookup(positions, dtype))
    assert torch.equal(layer_q, want.q) and torch.equal(layer_k, want.k)
    before = qkv.clone()
    out = rotary.apply_rotary_triton(q, k, emb.cos, emb.sin, positions, inplace=False)
    assert torch.equal(qkv, before), "out of place must not touch the inputs"
    assert_close(out.q, want.q)
    assert_close(out.k, want.k)
    got = rotary.apply_rotary_triton(q, k, emb.cos, emb.sin, positions)
    assert got.q.data_ptr() == q.data_ptr() and torch.equal(got.q, out.q) and torch.equal(got.k, out.k)
    v_part = slice(q.shape[1] * head_dim + k.shape[1] * head_dim, None)
    assert torch.equal(qkv[:, v_part], before[:, v_part]), "in place must leave v alone"


@needs_triton
@pytest.mark.usefixtures("interpret")
def test_rotary_layer_routes_to_the_kernel():
    gen = gen_for("route")
    emb = RotaryEmbedding(SPECS["llama3"], 16, max_positions=64)
    _, q, k = qk_views(5, 4, 2, 16, torch.float32, gen)
    positions = torch.randint(0, 64, (5,), generator=gen)
    want = RotaryEmbedding.apply(q, k, emb.lookup(positions, torch.float32))
    rows = emb.lookup(positions, torch.float32, fused=True)
    assert rows.positions is positions and rows.cos is emb.cos
    got = RotaryEmbedding.apply(q, k, rows)
    assert got[0].data_ptr() == q.data_ptr(), "the kernel path rotates in place"
    torch.testing.assert_close(got[0], want[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got[1], want[1], atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------------------------------- activation


@needs_triton
@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,width,pad", [(1, 16, 0), (5, 40, 3), (3, 100, 0)])
def test_silu_and_mul_matches_reference(dtype, rows, width, pad):
    gen = gen_for(dtype, rows, width, pad)
    x = (2 * torch.randn(rows, 2 * width + pad, generator=gen)).to(dtype)[:, : 2 * width]  # row stride > 2I
    assert_close(activation.silu_and_mul_triton(x, block=16), activation.silu_and_mul_reference(x))


# ----------------------------------------------------------------------------------------- KV store


@needs_triton
@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize(
    "dtype,pool_dtype",
    [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32),
     (torch.float32, torch.bfloat16)],
)  # fmt: skip
@pytest.mark.parametrize("heads,head_dim", [(2, 16), (3, 24), (1, 128)])
def test_store_kv_matches_reference(dtype, pool_dtype, heads, head_dim):
    gen = gen_for(dtype, pool_dtype, heads, head_dim)
    _, _, k = qk_views(7, 2, heads, head_dim, dtype, gen)  # strided, as from the qkv projection
    v = torch.randn(7, heads, head_dim + 2, generator=gen).to(dtype)[..., :head_dim]
    slots = torch.cat([torch.randperm(30, generator=gen)[:5] + 1, torch.zeros(2, dtype=torch.int64)])  # 0: padding
    caches = [torch.randn(31, heads, head_dim, generator=gen).to(pool_dtype) for _ in range(2)]
    want_k, want_v = (c.clone() for c in caches)
    kv_store.store_kv_reference(want_k, want_v, slots, k, v)
    got_k, got_v = (c.clone() for c in caches)
    kv_store.store_kv_triton(got_k, got_v, slots, k, v)
    # slot 0 is named twice: which row lands there is unspecified, as in torch
    if pool_dtype == dtype or pool_dtype == torch.float32:  # a widening copy is exact
        assert torch.equal(got_k[1:], want_k[1:]) and torch.equal(got_v[1:], want_v[1:])
    assert_close(got_k[1:], want_k[1:])
    assert_close(got_v[1:], want_v[1:])
    assert not torch.equal(want_k[1:], caches[0][1:]), "the store must change the pool"


# ---------------------------------------------------------------------------------- wrapper checks

X = torch.randn(4, 32, generator=torch.Generator().manual_seed(0))
W = torch.ones(32)
CACHE = torch.zeros(10, 2, 16)
K16 = torch.randn(3, 2, 16, generator=torch.Generator().manual_seed(1))
TABLE = torch.zeros(20, 8)


@needs_triton
@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: norm.rms_norm_triton(X.to(torch.int32), W, 1e-6), "x dtype"),
        (lambda: norm.rms_norm_triton(X, W[:16], 1e-6), r"weight shape \(16,\), expected \(32,\)"),
        (lambda: norm.rms_norm_triton(X, W.half(), 1e-6), "weight dtype"),
        (lambda: norm.rms_norm_triton(X.t(), W[:4], 1e-6), "last dim must be contiguous"),
        (lambda: norm.add_rms_norm_triton(X, X[:2], W, 1e-6), "residual shape"),
        (lambda: norm.rms_norm_triton(X, W, 0.0), "eps must be positive"),
        (lambda: rotary.apply_rotary_triton(K16, K16, TABLE.double(), TABLE, torch.tensor([0, 1, 2])),
         "cos_cache dtype"),
        (lambda: rotary.apply_rotary_triton(K16, K16, TABLE[:, :4], TABLE[:, :4], torch.tensor([0, 1, 2])),
         r"must be \(P, 8\)"),
        (lambda: rotary.apply_rotary_triton(K16, K16, TABLE, TABLE, torch.tensor([0, 1, 20])),
         r"positions must lie in \[0, 20\)"),
        (lambda: rotary.apply_rotary_triton(K16, K16.half(), TABLE, TABLE, torch.tensor([0, 1, 2])),
         "q/k dtypes"),
        (lambda: activation.silu_and_mul_triton(X[:, :31]), "must be even"),
        (lambda: activation.silu_and_mul_triton(X.view(4, 2, 16)), r"must be \(N, 2I\)"),
        (lambda: kv_store.store_kv_triton(CACHE, CACHE, torch.tensor([1, 2, 10]), K16, K16),
         r"slots must lie in \[0, 10\)"),
        (lambda: kv_store.store_kv_triton(CACHE, CACHE, torch.tensor([1.0, 2.0, 3.0]), K16, K16), "slots dtype"),
        (lambda: kv_store.store_kv_triton(CACHE, CACHE[:, :1], torch.tensor([1, 2, 3]), K16, K16), "must both be"),
        (lambda: kv_store.store_kv_triton(CACHE, CACHE, torch.tensor([1, 2, 3]), K16[..., :8], K16[..., :8]),
         "k rows"),
    ],
)  # fmt: skip
def test_wrappers_assert_before_launch(call, message):
    with pytest.raises(AssertionError, match=message):
        call()


@pytest.mark.parametrize("module,call", [
    (norm, lambda: norm.rms_norm_triton(X, W, 1e-6)),
    (activation, lambda: activation.silu_and_mul_triton(X)),
    (kv_store, lambda: kv_store.store_kv_triton(CACHE, CACHE, torch.tensor([1, 2, 3]), K16, K16)),
    (rotary, lambda: rotary.apply_rotary_triton(K16, K16, TABLE, TABLE, torch.tensor([0, 1, 2]))),
])  # fmt: skip
def test_without_triton_the_wrappers_say_so(monkeypatch, module, call):
    monkeypatch.setattr(module, "triton", None)
    with pytest.raises(RuntimeError, match="needs the triton package"):
        call()


@needs_triton
@pytest.mark.usefixtures("interpret")
def test_interpreted_kernels_are_used():
    from triton.runtime.interpreter import InterpretedFunction

    mode = kernels.interpreting()
    assert mode
    for module in (norm, rotary, activation, kv_store):
        assert isinstance(module._jitted(mode), InterpretedFunction), module.__name__


# ------------------------------------------------------------------------- compiled for the GPU (CPU)


def _sm90_compile(fn, pointers: dict[str, str], constexprs: dict) -> None:
    """Compile ``fn`` for sm_90 without a GPU: triton's front end, LLVM and ptxas all run on the host."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    floats = {"qk_scale", "eps"}
    signature = {
        name: "constexpr" if name in constexprs else pointers.get(name) or ("fp32" if name in floats else "i32")
        for name in inspect.signature(fn).parameters
    }
    kernels.triton.compile(
        ASTSource(fn=kernels.triton.jit(fn), signature=signature, constexprs=constexprs),
        target=GPUTarget("cuda", 90, 32),
        options={"num_warps": 4},
    )


def _pointers(fn, dtype: str, special: dict[str, str]) -> dict[str, str]:
    return {name: special.get(name, f"*{dtype}") for name in inspect.signature(fn).parameters if name.endswith("_ptr")}


INDEX_PTRS = {"table_ptr": "*i64", "rows_ptr": "*i64", "tile_req_ptr": "*i32", "tile_start_ptr": "*i32",
              "meta_ptr": "*i32", "seq_lens_ptr": "*i64", "shared_ptr": "*i64", "tok_req_ptr": "*i32",
              "slots_ptr": "*i64", "pos_ptr": "*i64", "cos_ptr": "*fp32", "sin_ptr": "*fp32", "part_ptr": "*fp32",
              "lse_ptr": "*fp32"}  # fmt: skip
CASCADE_PARTIAL = {"out_ptr": "*fp32"}  # the cascade extend writes its float32 split, not the output
EXTEND_SHARED = {"shared_ptr": "*i32"}  # an extend's shared lengths: the plan's int32 row
COMPILED = [  # (kernel, constexprs, pointer types as launched): bf16 (tensor-core dots), float32 (IEEE dots)
    (attention._extend_kernel, dict(SLIDING=True, CASCADE=False, FP32_DOT=False, BLOCK_M=64, BLOCK_N=64,
                                    BLOCK_D=128), {}),
    (attention._extend_kernel, dict(SLIDING=False, CASCADE=True, FP32_DOT=False, BLOCK_M=64, BLOCK_N=64,
                                    BLOCK_D=128), CASCADE_PARTIAL),
    (attention._decode_kernel, dict(SLIDING=True, CASCADE=False, FP32_DOT=False, BLOCK_H=16, BLOCK_N=64,
                                    BLOCK_D=128), {}),
    (attention._decode_kernel, dict(SLIDING=False, CASCADE=True, FP32_DOT=False, BLOCK_H=16, BLOCK_N=64,
                                    BLOCK_D=128), {}),
    (attention._decode_kernel, dict(SLIDING=False, CASCADE=False, FP32_DOT=True, BLOCK_H=16, BLOCK_N=64,
                                    BLOCK_D=64), {}),
    (attention._prefix_kernel, dict(EXTEND=False, FP32_DOT=False, BLOCK_M=64, BLOCK_N=64, BLOCK_D=128, BLOCK_B=64), {}),
    (attention._prefix_kernel, dict(EXTEND=True, FP32_DOT=False, BLOCK_M=128, BLOCK_N=64, BLOCK_D=128, BLOCK_B=64),
     EXTEND_SHARED),
    (attention._prefix_kernel, dict(EXTEND=False, FP32_DOT=True, BLOCK_M=64, BLOCK_N=32, BLOCK_D=64, BLOCK_B=256), {}),
    (attention._reduce_kernel, dict(BLOCK_S=8, BLOCK_D=128), {}),
    (norm._rms_norm_kernel, dict(HAS_RESIDUAL=True, ROUND_BEFORE_WEIGHT=True, BLOCK_D=2048), {}),
    (rotary._rotary_kernel, dict(BLOCK_H=32, BLOCK_HALF=64), {}),
    (activation._silu_and_mul_kernel, dict(BLOCK=1024), {}),
    (kv_store._store_kv_kernel, dict(BLOCK_H=8, BLOCK_D=128), {}),
]  # fmt: skip


@needs_triton
@pytest.mark.parametrize("fn,constexprs,pointers", COMPILED, ids=lambda x: getattr(x, "__name__", ""))
def test_kernel_compiles_for_sm90(fn, constexprs, pointers, monkeypatch):
    """The interpreter runs the kernels' Python; this checks they are also valid Triton for a GPU
    (types, tl.dot shapes, shared memory), which CPU-only CI could not otherwise see."""
    pytest.importorskip("triton.backends.nvidia")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    _sm90_compile(fn, _pointers(fn, "bf16", {**INDEX_PTRS, **pointers}), constexprs)
