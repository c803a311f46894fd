"""The Triton kernels compiled on CUDA at real shapes against their torch references, decode
attention's bandwidth against the copy bandwidth, and the engine on the Triton backend against the
torch backend. Skipped without CUDA (the same comparisons run interpreted on the CPU in
tests/unit/test_kernels_*.py)."""

from __future__ import annotations

import pytest
import torch

import braid as bd
from braid.runtime.forward_batch import ForwardMode
from braid.runtime.kernels import activation, kv_store, norm, rotary
from braid.runtime.kernels import attention as ka
from braid.runtime.layers.rotary import RopeSpec, RotaryEmbedding
from tests.engine_helpers import make_engine_model, random_prompts
from tests.unit.test_kernels_attention import Case, make_case, stored_case

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or ka.triton is None, reason="needs CUDA and triton"),
]
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


@pytest.fixture(autouse=True)
def compiled(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def on_cuda(case: Case) -> Case:
    b = case.batch
    for buffers in (case.kv.k, case.kv.v):
        buffers[0] = buffers[0].cuda()
    b.req_to_token, b.req_rows, b.seq_lens = b.req_to_token.cuda(), b.req_rows.cuda(), b.seq_lens.cuda()
    return Case(case.q.cuda(), case.k_new.cuda(), case.v_new.cuda(), case.kv, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("hkv,group", [(8, 4), (4, 8), (32, 1)])
@pytest.mark.parametrize("window", [None, 256])
def test_extend_real_shapes(dtype, hkv, group, window):
    prefix, new = [0, 700, 1500, 33], [512, 64, 1, 300]
    case = on_cuda(stored_case(make_case(ForwardMode.EXTEND, prefix, new, hkv, group, 128, dtype, seed=1, width=2048)))
    b, k_cache, v_cache = case.batch, case.kv.k[0], case.kv.v[0]
    plan = ka.plan_extend(prefix, new, case.q.device)
    out = ka.extend_attention_triton(case.q, k_cache, v_cache, b.req_to_token, b.req_rows, plan, 128**-0.5, window)
    ref = ka.extend_attention_reference(case.q, k_cache, v_cache, b.req_to_token, b.req_rows, prefix, new,
                                        128**-0.5, window)  # fmt: skip
    torch.testing.assert_close(out, ref, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("window", [None, 1000])
def test_decode_real_shapes(dtype, head_dim, window):
    seq_lens = torch.randint(1, 8192, (8,), generator=torch.Generator().manual_seed(2)).tolist() + [1, 8192]
    case = make_case(ForwardMode.DECODE, [n - 1 for n in seq_lens], [1] * len(seq_lens), 8, 4, head_dim, dtype,
                     seed=2, width=8192)  # fmt: skip
    case = on_cuda(stored_case(case))
    b, k_cache, v_cache = case.batch, case.kv.k[0], case.kv.v[0]
    ref = ka.decode_attention_reference(case.q, k_cache, v_cache, b.req_to_token, b.req_rows, seq_lens, 0.1, window)
    policy = ka.decode_splits(len(seq_lens), 8, max(seq_lens), ka.num_sms(case.q.device))
    assert policy > 1, "a few long requests must be split"
    for splits in (1, policy):
        out = ka.decode_attention_triton(case.q, k_cache, v_cache, b.req_to_token, b.req_rows, b.seq_lens, 0.1,
                                         window, splits)  # fmt: skip
        torch.testing.assert_close(out, ref, **TOL[dtype])


def test_decode_bandwidth():
    """Reports decode attention's K/V read rate against a plain copy's (printed; run with -s)."""
    batch, seq, hkv, group, head_dim = 64, 4096, 8, 4, 128
    dev = torch.device("cuda")
    k_cache, v_cache = (torch.randn(batch * seq + 1, hkv, head_dim, device=dev, dtype=torch.bfloat16) for _ in "kv")
    table = (torch.randperm(batch * seq, device=dev) + 1).view(batch, seq)
    rows, seq_lens = torch.arange(batch, device=dev), torch.full((batch,), seq, device=dev)
    q = torch.randn(batch, hkv * group, head_dim, device=dev, dtype=torch.bfloat16)
    splits = ka.decode_splits(batch, hkv, seq, ka.num_sms(dev))
    run = lambda: ka.decode_attention_triton(q, k_cache, v_cache, table, rows, seq_lens, 0.1, None, splits)  # noqa: E731
    torch.testing.assert_close(run(), ka.decode_attention_reference(q, k_cache, v_cache, table, rows, [seq] * batch,
                                                                    0.1, None), **TOL[torch.bfloat16])  # fmt: skip
    kv_bytes = 2 * batch * seq * hkv * head_dim * 2
    copy_dst, copy_src = torch.empty(kv_bytes // 2, dtype=torch.bfloat16, device=dev), k_cache.new_empty(kv_bytes // 2)
    seconds = _cuda_seconds(run)
    copy_gbs = 2 * kv_bytes / _cuda_seconds(lambda: copy_dst.copy_(copy_src)) / 1e9
    print(f"\ndecode attention B={batch} L={seq}: {seconds * 1e6:.0f} us, {kv_bytes / seconds / 1e9:.0f} GB/s of "
          f"K/V ({splits} splits); a copy moves {copy_gbs:.0f} GB/s")  # fmt: skip


def _cuda_seconds(fn, repeats: int = 20) -> float:
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / repeats


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_kernels_real_shapes(dtype):
    gen = torch.Generator(device="cuda").manual_seed(4)
    rand = lambda *shape: torch.randn(*shape, generator=gen, device="cuda").to(dtype)  # noqa: E731
    x, residual, weight = rand(1000, 4096), rand(1000, 4096), 1 + 0.1 * rand(4096)
    got, want = (
        norm.add_rms_norm_triton(x, residual, weight, 1e-5),
        norm.add_rms_norm_reference(x, residual, weight, 1e-5),
    )
    torch.testing.assert_close(got.normed, want.normed, **TOL[dtype])
    assert torch.equal(got.summed, want.summed)
    emb = RotaryEmbedding(RopeSpec(500000.0, "llama3", 8.0, 1.0, 4.0, 8192), 128, 32768).cuda()
    emb.build()
    qkv = rand(1000, 48 * 128)
    q, k = qkv[:, : 32 * 128].view(1000, 32, 128), qkv[:, 32 * 128 : 40 * 128].view(1000, 8, 128)
    positions = torch.randint(0, 32768, (1000,), device="cuda")
    ref = rotary.apply_rotary_reference(q, k, emb.cos, emb.sin, positions)
    out = rotary.apply_rotary_triton(q, k, emb.cos, emb.sin, positions)
    torch.testing.assert_close(out.q, ref.q, **TOL[dtype])
    torch.testing.assert_close(out.k, ref.k, **TOL[dtype])
    gate_up = rand(1000, 2 * 14336)
    torch.testing.assert_close(activation.silu_and_mul_triton(gate_up), activation.silu_and_mul_reference(gate_up),
                               **TOL[dtype])  # fmt: skip
    caches = [rand(5001, 8, 128) for _ in range(2)]
    want_k, want_v = (c.clone() for c in caches)
    slots = torch.randperm(5000, device="cuda")[:1000] + 1
    kv_store.store_kv_reference(want_k, want_v, slots, k, k)
    kv_store.store_kv_triton(*caches, slots, k, k)
    assert torch.equal(caches[0], want_k) and torch.equal(caches[1], want_v)


@pytest.mark.parametrize("arch", ["llama3", "mistral", "qwen3"])
def test_engine_triton_backend_matches_torch_backend(arch, tmp_path):
    folder = make_engine_model(arch, tmp_path)
    prompts = random_prompts(8, 5, 200, 300, seed=13)  # + 12 new tokens within the 256 positions
    params = {"temperature": 0, "ignore_eos": True, "max_new_tokens": 12}
    outs = {}
    for backend in ("torch", "triton"):
        with bd.Engine(model_path=folder, device="cuda", dtype="float32", attention_backend=backend,
                       chunked_prefill_size=64) as eng:  # fmt: skip
            outs[backend] = eng.generate(input_ids=prompts, sampling_params=params, return_logprob=True)
            assert eng.get_stats()["at_rest_error"] is None
    for want, got in zip(outs["torch"], outs["triton"]):
        assert got["output_ids"] == want["output_ids"]
        diffs = [abs(a[0] - b[0]) for a, b in zip(got["meta_info"]["output_token_logprobs"],
                                                  want["meta_info"]["output_token_logprobs"])]  # fmt: skip
        assert max(diffs) < 1e-3


def test_engine_auto_backend_is_triton_on_cuda(tmp_path):
    folder = make_engine_model("llama", tmp_path)
    with bd.Engine(model_path=folder, device="cuda", dtype="bfloat16", max_total_tokens=2048) as eng:
        assert eng.runner.attention_backend == "triton"
        outs = eng.generate(input_ids=random_prompts(32, 10, 200, 512, seed=14),
                            sampling_params={"temperature": 0, "ignore_eos": True, "max_new_tokens": 16})  # fmt: skip
        assert all(len(o["output_ids"]) == 16 for o in outs)
        assert eng.get_stats()["at_rest_error"] is None
