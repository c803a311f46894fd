"""Rotary position embedding (RoPE), "rotate half" layout as in HF Llama/Qwen/Mistral.

Supported ``rope_type``s: ``default``, ``linear`` and ``llama3`` (Llama 3.1 frequency scaling).
The cos/sin tables are precomputed in float32 up to ``max_positions`` and indexed by position.
The rotation itself (torch reference and Triton kernel) lives in ``kernels/rotary.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from braid.errors import ModelLoadError
from braid.runtime.kernels.rotary import apply_rotary_triton, rotate_half

ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class RopeSpec:
    theta: float  # base of the geometric frequency ladder
    rope_type: str = "default"  # one of ROPE_TYPES
    factor: float = 1.0  # linear / llama3: how much the context was stretched
    low_freq_factor: float = 1.0  # llama3: wavelengths above original_max / this are fully scaled
    high_freq_factor: float = 4.0  # llama3: wavelengths below original_max / this are untouched
    original_max_positions: int = 8192  # llama3: context length the model was pretrained on


def rope_spec_from_config(config: dict) -> RopeSpec:
    """Read RoPE settings from an HF config dict, old (``rope_theta`` + ``rope_scaling``)
    or new (``rope_parameters``) style. Raises ModelLoadError for unsupported kinds."""
    params = dict(config.get("rope_parameters") or {})
    scaling = config.get("rope_scaling") or {}
    params = {**scaling, **params}  # new-style keys win where both exist
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ModelLoadError(f"rope_type {rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ModelLoadError("partial_rotary_factor != 1 is not supported")
    return RopeSpec(
        theta=float(theta),
        rope_type=rope_type,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_positions=int(
            params.get("original_max_position_embeddings", config.get("max_position_embeddings", 8192))
        ),
    )


def inverse_frequencies(spec: RopeSpec, head_dim: int) -> torch.Tensor:
    """``(head_dim // 2,)`` float32 angular frequencies after the spec's scaling."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (spec.theta**exponents)
    if spec.rope_type == "linear":
        return inv_freq / spec.factor
    if spec.rope_type == "llama3":
        return _llama3_scale(inv_freq, spec)
    return inv_freq


def _llama3_scale(inv_freq: torch.Tensor, spec: RopeSpec) -> torch.Tensor:
    # Long wavelengths (low frequencies) are divided by `factor`, short ones kept, and the band
    # between is interpolated linearly in (original_max / wavelength).
    wavelen = 2 * math.pi / inv_freq
    long_limit = spec.original_max_positions / spec.low_freq_factor
    short_limit = spec.original_max_positions / spec.high_freq_factor
    scaled = torch.where(wavelen > long_limit, inv_freq / spec.factor, inv_freq)
    smooth = (spec.original_max_positions / wavelen - spec.low_freq_factor) / (
        spec.high_freq_factor - spec.low_freq_factor
    )
    blended = (1 - smooth) * scaled / spec.factor + smooth * scaled
    in_band = (wavelen >= short_limit) & (wavelen <= long_limit)
    return torch.where(in_band, blended, scaled)


class RopeRows(NamedTuple):
    """RoPE inputs of one forward (see ``RotaryEmbedding.lookup``)."""

    cos: torch.Tensor  # torch path: (T, 1, D/2) in the activations' dtype; kernel: (max_positions, D/2) f32
    sin: torch.Tensor
    positions: torch.Tensor | None  # (T,) for the kernel; None for the torch path (rows already gathered)


class RotaryEmbedding(nn.Module):
    """Applies RoPE to q and k ``(T, H, D)`` at ``positions`` ``(T,)``.

    The tables are plain (non-persistent) buffers; ``build`` (re)computes them, which the
    loader calls after materialising a model that was constructed on the meta device.
    """

    def __init__(self, spec: RopeSpec, head_dim: int, max_positions: int) -> None:
        super().__init__()
        assert head_dim % 2 == 0, f"head_dim must be even for RoPE, got {head_dim}"
        self.spec = spec
        self.head_dim = head_dim
        self.max_positions = max_positions
        self.register_buffer("cos", torch.empty(max_positions, head_dim // 2), persistent=False)
        self.register_buffer("sin", torch.empty(max_positions, head_dim // 2), persistent=False)
        if self.cos.device.type != "meta":
            self.build()

    def build(self) -> None:
        device = self.cos.device
        assert device.type != "meta", "build the rotary tables on a real device"
        inv_freq = inverse_frequencies(self.spec, self.head_dim).to(device)
        pos = torch.arange(self.max_positions, dtype=torch.int64, device=device).float()
        angles = torch.outer(pos, inv_freq)  # (max_positions, D/2) float32
        self.cos = angles.cos()
        self.sin = angles.sin()

    def lookup(self, positions: torch.Tensor, dtype: torch.dtype, fused: bool = False) -> RopeRows:
        """What ``apply`` needs for this forward's ``positions``, computed once and shared by all
        layers: the table rows in ``dtype`` for the torch path, the whole tables and the positions
        for the kernel (``fused``), which gathers the rows itself."""
        if fused:
            return RopeRows(self.cos, self.sin, positions)
        return RopeRows(self.cos[positions].to(dtype).unsqueeze(1), self.sin[positions].to(dtype).unsqueeze(1), None)

    @staticmethod
    def apply(q: torch.Tensor, k: torch.Tensor, rows: RopeRows) -> tuple[torch.Tensor, torch.Tensor]:
        """q ``(T, Hq, D)`` and k ``(T, Hkv, D)`` rotated; the kernel path rotates them in place."""
        if rows.positions is not None:
            return apply_rotary_triton(q, k, rows.cos, rows.sin, rows.positions)
        # one rotation over q and k stacked along heads: half the ops of rotating each
        qk = rotate_half(torch.cat((q, k), dim=1), rows.cos, rows.sin)
        return qk[:, : q.shape[1]], qk[:, q.shape[1] :]

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.apply(q, k, self.lookup(positions, q.dtype))
