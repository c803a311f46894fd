"""Shared timing helpers for the benchmark scripts (not tests)."""

from __future__ import annotations

import time

import torch


def copy_bandwidth_gbs(device: torch.device, mbytes: int = 256, repeats: int = 10) -> float:
    """Measured device memory bandwidth: a large tensor copy, bytes read + written."""
    n = mbytes * 2**20 // 4
    src = torch.rand(n, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * n * 4 / sorted(times)[len(times) // 2] / 1e9


def matmul_tflops(device: torch.device, dtype: torch.dtype, n: int = 4096, repeats: int = 10) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / sorted(times)[len(times) // 2] / 1e12


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def param_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def linear_floor_s(model: torch.nn.Module, batch: int, device: torch.device, repeats: int = 5) -> float:
    """Seconds per decode step spent in the model's weight matmuls alone (every nn.Linear once,
    ``batch`` rows), measured here with the same threads: no engine can decode faster with these
    weights in this dtype."""
    import torch.nn.functional as F

    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    xs = [torch.randn(batch, m.in_features, device=device, dtype=m.weight.dtype) for m in linears]

    def run() -> None:
        for x, m in zip(xs, linears):
            F.linear(x, m.weight)

    with torch.inference_mode():
        run()
        sync(device)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            run()
            sync(device)
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]
