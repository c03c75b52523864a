"""Rotary position embeddings (RoPE, Su et al. 2021, "RoFormer"), in the rotate-half convention.

A head vector x of even size hd is cut into halves (x1, x2) = (x[:hd/2], x[hd/2:]); pair i,
(x1[i], x2[i]), is rotated by the angle p * theta_i at position p, with
theta_i = base^(-2i / hd) (base 10,000):

    x1'[i] = x1[i] cos(p theta_i) - x2[i] sin(p theta_i)
    x2'[i] = x2[i] cos(p theta_i) + x1[i] sin(p theta_i)

A rotation keeps lengths, and R(a)^T R(b) = R(b - a), so the score of a rotated query at m and
a rotated key at n depends on the positions only through n - m.

- ``apply_rotary``: the fast path, ``x * cos + rotate_half(x) * sin`` with (T, hd) tables,
  computed in float32 (float64 for a float64 input) and returned in the input's dtype;
- ``apply_rotary_reference``: the same map as an explicit (hd x hd) block rotation matrix per
  position (one 2x2 rotation per pair), applied by a matrix product in float64.
"""

from __future__ import annotations

import torch

#: theta_i = ROTARY_BASE^(-2i / hd), as RoFormer and Llama.
ROTARY_BASE = 10000.0


def _check_head_dim(head_dim: int) -> None:
    if head_dim < 2 or head_dim % 2:
        raise ValueError(f"rotary embeddings need an even head dimension >= 2, got {head_dim}")


def rotary_angles(positions: torch.Tensor, head_dim: int, base: float = ROTARY_BASE,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Angles p * theta_i, (T,) positions -> (T, head_dim / 2), in ``dtype``."""
    _check_head_dim(head_dim)
    i = torch.arange(head_dim // 2, device=positions.device, dtype=dtype)
    inv_freq = base ** (-2.0 * i / head_dim)  # (hd/2,)
    return positions.to(dtype)[:, None] * inv_freq[None, :]  # (T, hd/2)


def rotary_tables(positions: torch.Tensor, head_dim: int, base: float = ROTARY_BASE,
                  dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables (T, head_dim), each half repeated (the rotate-half layout)."""
    angles = rotary_angles(positions, head_dim, base, dtype)  # (T, hd/2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, hd)
    return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: torch.Tensor, start_pos: int = 0, base: float = ROTARY_BASE
                 ) -> torch.Tensor:
    """Rotate x (..., T, hd) for the positions start_pos, ..., start_pos + T - 1.

    The tables and the rotation are computed in float32 (float64 for a float64 x): in bf16 the
    angles of late positions would lose their low bits."""
    T, hd = x.shape[-2], x.shape[-1]
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    positions = torch.arange(start_pos, start_pos + T, device=x.device)
    cos, sin = rotary_tables(positions, hd, base, dtype)  # (T, hd)
    xf = x.to(dtype)
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)  # (..., T, hd)


def rotation_matrices(positions: torch.Tensor, head_dim: int, base: float = ROTARY_BASE
                      ) -> torch.Tensor:
    """(T, hd, hd) float64: for each position, the block rotation that acts on the pairs
    (i, i + hd/2) as [[cos, -sin], [sin, cos]] of angle p * theta_i."""
    angles = rotary_angles(positions, head_dim, base, torch.float64)  # (T, hd/2)
    T, half = angles.shape
    R = torch.zeros(T, head_dim, head_dim, dtype=torch.float64, device=positions.device)
    i = torch.arange(half, device=positions.device)
    j = i + half
    R[:, i, i] = angles.cos()
    R[:, i, j] = -angles.sin()
    R[:, j, i] = angles.sin()
    R[:, j, j] = angles.cos()
    return R


def apply_rotary_reference(x: torch.Tensor, positions: torch.Tensor,
                           base: float = ROTARY_BASE) -> torch.Tensor:
    """The reference: x (..., T, hd) -> R_p x for each position p of ``positions`` (T,), as a
    float64 matrix-vector product."""
    R = rotation_matrices(positions, x.shape[-1], base)  # (T, hd, hd)
    return torch.einsum("tij,...tj->...ti", R, x.to(torch.float64))
