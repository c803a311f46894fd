"""Triton kernels, each with a torch reference beside it.

Every kernel's wrapper asserts shapes, dtypes, devices and strides before it launches; the
reference is the semantics (and the fallback where Triton cannot run). Triton is imported
guarded, so these modules import on machines without it.

Kernels are jitted on first use, not at import: ``triton.jit`` decides at decoration time whether
to compile or to interpret (``TRITON_INTERPRET``), so each module caches its jitted kernels per
mode (``functools.cache`` keyed on :func:`interpreting`) and a process can switch modes, as the
CPU tests do.

- ``bitmask``: grammar bitmask applied to logits in place.
- ``attention``: extend (prefill over a cached prefix) and split-K decode attention over the
  token-granular KV pool.
- ``kv_store``: new tokens' K/V written into the pool at their slots.
- ``norm``: RMSNorm, optionally fused with the residual add before it.
- ``rotary``: RoPE applied to q and k in place from the cos/sin tables and positions.
- ``activation``: SiLU(gate) * up.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # optional: without triton the torch references run
    triton = tl = None

# Triton's tl.max, tl.sum, tl.zeros and tl.cdiv are themselves @triton.jit functions, jitted when
# triton is imported: a kernel interpreted because TRITON_INTERPRET=1 was set *after* that import
# (how the tests switch modes) cannot call them (triton-lang/triton#5142). The kernels here call
# the builtins instead: tl.reduce with the combine functions tl.max / tl.sum use (which the
# interpreter maps to numpy), tl.full, and integer arithmetic.
MAX_COMBINE = None if tl is None else tl.standard._elementwise_max
SUM_COMBINE = None if tl is None else tl.standard._sum_combine


def interpreting() -> bool:
    """Whether ``triton.jit`` would interpret now: triton's own reading of TRITON_INTERPRET."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"  # triton < 3.4 reads it the same way


def triton_runs_on(device: torch.device) -> bool:
    """Whether the Triton kernels can run on tensors of ``device``: on CUDA (compiled), or on the
    CPU under ``TRITON_INTERPRET=1`` (interpreted, for tests); never without triton."""
    if triton is None:
        return False
    return device.type == "cuda" or (device.type == "cpu" and interpreting())


def power_of_two_at_least(n: int, floor: int = 1) -> int:
    """The smallest power of two >= max(n, floor): Triton block shapes must be powers of two."""
    return max(floor, 1 << max(0, n - 1).bit_length())
