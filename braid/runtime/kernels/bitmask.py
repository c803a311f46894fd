"""Grammar token bitmask applied to logits in place: disallowed tokens become -inf.

``logits`` ``(B, V)`` float, ``bitmask`` ``(R, >= ceil(V / 32))`` int32: bit ``t % 32`` of word
``t // 32`` set means token ``t`` is allowed. Mask row ``j`` applies to logits row ``rows[j]``
(``rows`` 1-D int32/int64 of length ``R``), or to logits row ``j`` when ``rows`` is None (then
``R == B``). Rows not named in ``rows`` are not touched; a row named twice keeps only the tokens
both masks allow.

The Triton kernel is jitted on first use, not at import, and cached per TRITON_INTERPRET mode
(see ``braid.runtime.kernels``), so a process can switch modes, as the CPU tests do.
"""

from __future__ import annotations

import functools

import torch

from braid.grammar.base import bitmask_words
from braid.runtime.kernels import interpreting as _interpreting

try:
    import triton
    import triton.language as tl
except ImportError:  # optional: without triton every call takes the torch reference
    triton = tl = None

LOGITS_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ROWS_DTYPES = (torch.int32, torch.int64)
# tokens per program and its warps: 4 tokens a thread. On an H200 (B=64, V=128256, triton 3.6)
# this ran 15-30 us for fp32 and bf16; 4096 tokens with 4 warps (32 a thread) took 34-39 us for bf16
BLOCK = 512
NUM_WARPS = 4


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor | None = None) -> None:
    """Set the logits of disallowed tokens to -inf, in place.

    Takes the Triton kernel on CUDA tensors (when triton imports) and on CPU tensors under
    ``TRITON_INTERPRET=1``; the torch reference otherwise.

    Parameters
    ----------
    logits : ``(B, V)`` float32/bfloat16/float16, modified in place.
    bitmask : ``(R, >= ceil(V / 32))`` int32, bit set = token allowed.
    rows : ``(R,)`` int32/int64 logits row of each mask row; None means mask row ``j`` -> row ``j``.
    """
    if triton is not None and (logits.is_cuda or (logits.device.type == "cpu" and _interpreting())):
        apply_bitmask_triton(logits, bitmask, rows)
    else:
        apply_bitmask_reference(logits, bitmask, rows)


def apply_bitmask_reference(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor | None = None) -> None:
    """The semantics in plain torch (any device; the CPU engine's path): the mask's bytes index a
    256-entry table of their 8 bits (int32 words are little-endian, so byte ``t // 8`` holds
    token ``t`` at bit ``t % 8``)."""
    num_rows, vocab = logits.shape
    assert bitmask.shape[1] >= bitmask_words(vocab), f"bitmask too narrow for vocab {vocab}"
    words = bitmask.to(logits.device)[:, : bitmask_words(vocab)].contiguous()
    allowed = _byte_bits(logits.device)[words.view(torch.uint8).long()].reshape(words.shape[0], -1)[:, :vocab]
    if rows is None:
        assert bitmask.shape[0] == num_rows, f"{bitmask.shape[0]} mask rows for {num_rows} logits rows"
        logits.masked_fill_(~allowed, float("-inf"))
        return
    index = rows.to(logits.device, torch.int64)
    if torch.unique(index).numel() == index.numel():
        sub = logits.index_select(0, index)
        sub.masked_fill_(~allowed, float("-inf"))
        logits.index_copy_(0, index, sub)
    else:  # a row named twice keeps only what every one of its masks allows
        for j, row in enumerate(index.tolist()):
            logits[row].masked_fill_(~allowed[j], float("-inf"))


@functools.cache
def _byte_bits(device: torch.device) -> torch.Tensor:
    """``(256, 8)`` bool: bit ``k`` of byte ``b``."""
    return ((torch.arange(256, device=device)[:, None] >> torch.arange(8, device=device)) & 1).bool()


def apply_bitmask_triton(
    logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor | None = None, block: int = BLOCK
) -> None:
    """The Triton kernel: one program per (mask row, ``block`` tokens); it writes only the -inf
    entries and never reads the logits. ``block`` is a power of two (small ones for the interpreter).

    Asserts the contract before launch; raises RuntimeError when triton is not installed.
    """
    _check_args(logits, bitmask, rows, block)
    if triton is None:
        raise RuntimeError("apply_bitmask_triton needs the triton package; apply_bitmask falls back to torch")
    num_mask_rows, vocab = bitmask.shape[0], logits.shape[1]
    if num_mask_rows == 0 or vocab == 0:
        return
    grid = (num_mask_rows, triton.cdiv(vocab, block))
    _jitted(_interpreting())[grid](
        logits,
        bitmask,
        bitmask if rows is None else rows,  # never read without rows
        vocab,
        logits.stride(0),
        bitmask.stride(0),
        HAS_ROWS=rows is not None,
        BLOCK=block,
        num_warps=NUM_WARPS,
    )


def _check_args(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor | None, block: int) -> None:
    assert logits.dim() == 2, f"logits must be (B, V), got shape {tuple(logits.shape)}"
    assert bitmask.dim() == 2, f"bitmask must be (R, ceil(V / 32)), got shape {tuple(bitmask.shape)}"
    assert logits.dtype in LOGITS_DTYPES, f"logits dtype {logits.dtype}, expected one of {LOGITS_DTYPES}"
    assert bitmask.dtype == torch.int32, f"bitmask dtype {bitmask.dtype}, expected torch.int32"
    assert bitmask.device == logits.device, f"bitmask on {bitmask.device}, logits on {logits.device}"
    assert logits.stride(1) == 1, f"logits last dim must be contiguous, strides {logits.stride()}"
    assert bitmask.stride(1) == 1, f"bitmask last dim must be contiguous, strides {bitmask.stride()}"
    num_rows, vocab = logits.shape
    need = bitmask_words(vocab)
    assert bitmask.shape[1] >= need, f"bitmask too narrow: {bitmask.shape[1]} words, vocab {vocab} needs {need}"
    assert block > 0 and block & (block - 1) == 0, f"block {block} must be a power of two"
    if rows is None:
        assert bitmask.shape[0] == num_rows, f"{bitmask.shape[0]} mask rows for {num_rows} logits rows (no rows)"
        return
    assert rows.dim() == 1, f"rows must be 1-D, got shape {tuple(rows.shape)}"
    assert rows.dtype in ROWS_DTYPES, f"rows dtype {rows.dtype}, expected one of {ROWS_DTYPES}"
    assert rows.device == logits.device, f"rows on {rows.device}, logits on {logits.device}"
    assert rows.is_contiguous(), f"rows must be contiguous, strides {rows.stride()}"
    assert rows.shape[0] == bitmask.shape[0], f"{rows.shape[0]} rows for {bitmask.shape[0]} mask rows"
    if rows.device.type == "cpu":  # on the GPU it would cost a sync: there the caller vouches for it
        assert _rows_in_range(rows, num_rows), f"rows must lie in [0, {num_rows}), got {rows.tolist()}"


def _rows_in_range(rows: torch.Tensor, num_rows: int) -> bool:
    if rows.numel() == 0:
        return True
    low, high = torch.stack(torch.aminmax(rows)).tolist()
    return 0 <= low and high < num_rows


@functools.cache
def _jitted(interpret: bool):
    # ``interpret`` is only the cache key: triton.jit reads the mode itself, so a kernel jitted
    # under one mode is never handed out under the other
    return triton.jit(_apply_bitmask_kernel)


def _apply_bitmask_kernel(
    logits_ptr,  # (B, V) float, row stride logits_row_stride, last dim contiguous
    bitmask_ptr,  # (R, W) int32, row stride bitmask_row_stride
    rows_ptr,  # (R,) int32/int64 logits row per mask row; read only when HAS_ROWS
    vocab_size,
    logits_row_stride,
    bitmask_row_stride,
    HAS_ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    mask_row = tl.program_id(0).to(tl.int64)
    if HAS_ROWS:
        logits_row = tl.load(rows_ptr + mask_row).to(tl.int64)
    else:
        logits_row = mask_row
    tokens = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,)
    in_vocab = tokens < vocab_size
    # each word is loaded by its 32 tokens; the repeats hit the cache
    words = tl.load(bitmask_ptr + mask_row * bitmask_row_stride + tokens // 32, mask=in_vocab, other=-1)
    banned = ((words >> (tokens % 32)) & 1) == 0  # arithmetic shift: bit 31 (negative words) works too
    tl.store(logits_ptr + logits_row * logits_row_stride + tokens, float("-inf"), mask=in_vocab & banned)
