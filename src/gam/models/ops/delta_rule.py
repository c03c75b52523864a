"""The gated delta rule: a fast-weight memory written by the sequence, three ways.

Per head, with a state S (d_k, d_v), unit-norm keys k_t, values v_t, a write strength
beta_t in (0, 1) and a decay a_t = exp(g_t) in (0, 1] (``log_decay`` g_t <= 0)::

    S_t = a_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T
    o_t = S_t^T q_t * scale                                     # scale = 1 / sqrt(d_k)

The delta rule (DeltaNet: Schlag et al. 2021; chunkwise-parallel form from Yang, Wang, Zhang,
Shen & Kim, "Parallelizing Linear Transformers with the Delta Rule over Sequence Length",
NeurIPS 2024) replaces the value stored under k_t by v_t instead of adding to it: the memory
S^T k_t moves a fraction beta_t of the way to v_t. The decay a_t is Gated DeltaNet's (Yang,
Kautz & Hatamizadeh, "Gated Delta Networks: Improving Mamba2 with Delta Rule", ICLR 2025): it
lets a head forget everything at once, which the delta rule alone can only do key by key.
Equivalently, per token: ``S <- a_t S; u_t = beta_t (v_t - S^T k_t); S <- S + k_t u_t^T``.

- ``delta_rule_recurrent``: the formula above token by token, written with the explicit
  (I - beta k k^T) matrix: the specification the other two are tested against.
- ``delta_rule_step``: one token in the u_t form, for cached decoding.
- ``delta_rule_chunked``: the training path. Inside a chunk of C tokens starting from state
  S_0, with gamma_i = g_1 + ... + g_i (cumulative log-decay) and Gamma_ij = exp(gamma_i -
  gamma_j), unrolling the u_t form gives a unit-lower-triangular system for the rows u_i of
  U (the WY / UT transform)::

      (I + tril(diag(beta) (K K^T * Gamma), -1)) U = diag(beta) V - diag(beta) (K * e^gamma) S_0

  so with T = (I + tril(...))^-1, U0 = T diag(beta) V and W = T diag(beta) (K * e^gamma),
  U = U0 - W S_0, and::

      O   = (Q * e^gamma) S_0 + (Q K^T * Gamma * causal) U        # causal includes i == j
      S_C = e^gamma_C S_0 + (K * e^(gamma_C - gamma))^T U

  Everything but the state hand-off is batched over all chunks at once (matmuls and one
  batched triangular solve); a Python loop over chunks carries S. Only exponents <= 0 are
  ever taken (Gamma is masked to i >= j before the exp), so nothing overflows however strong
  the decay; e^gamma may underflow to 0, which is the right limit.

Layout: q, k (B, T, H, d_k), v (B, T, H, d_v), beta and log_decay (B, T, H), state
(B, H, d_k, d_v). The math runs in float32 (float64 for float64 inputs) with autocast off;
outputs come back in v's dtype and the state in the compute dtype. One exception: under bf16
autocast, ``delta_rule_chunked`` runs its big matmuls (K K^T, Q K^T, the WY products T (b V)
and T (b K e^gamma), the state reads W S, Q S and the write K^T U, and (Q K^T) U) on bf16
operands (the matmul accumulates in float32; its result is rounded to bf16 and taken back to
float32), while the decays, the triangular solve, U = U0 - W S and the carried state S stay in
float32: the bf16 CPU matmul is ~2-3x faster than float32's and these products are most of the
rule's time. Float64 inputs never take that path.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from gam.models.ops.delta_rule_fla import delta_rule_fla


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _scale(q: torch.Tensor, scale: float | None) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def _low_precision_matmul_dtype(x: torch.Tensor) -> torch.dtype | None:
    """bf16 when bf16 autocast is on for x's device and x is not float64, else None."""
    device = x.device.type
    if x.dtype == torch.float64 or not torch.is_autocast_enabled(device):
        return None
    return torch.bfloat16 if torch.get_autocast_dtype(device) == torch.bfloat16 else None


def _initial_state(q: torch.Tensor, v: torch.Tensor, state: torch.Tensor | None,
                   dtype: torch.dtype) -> torch.Tensor:
    B, _, H, dk = q.shape
    if state is None:
        return q.new_zeros(B, H, dk, v.shape[-1], dtype=dtype)
    return state.to(dtype)


def delta_rule_step(q_t: torch.Tensor, k_t: torch.Tensor, v_t: torch.Tensor,
                    beta_t: torch.Tensor, log_decay_t: torch.Tensor | None, state: torch.Tensor,
                    scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One token: q_t, k_t (B, H, d_k), v_t (B, H, d_v), beta_t, log_decay_t (B, H) (None: no
    decay), state (B, H, d_k, d_v). Returns o_t (B, H, d_v) in v_t's dtype and the new state."""
    dtype = torch.promote_types(_compute_dtype(v_t), state.dtype)
    s = _scale(q_t, scale)
    with torch.autocast(device_type=v_t.device.type, enabled=False):
        q, k, v, b = (t.to(dtype) for t in (q_t, k_t, v_t, beta_t))
        S = state.to(dtype)
        if log_decay_t is not None:
            S = S * torch.exp(log_decay_t.to(dtype))[..., None, None]
        u = b[..., None] * (v - torch.einsum("bhkv,bhk->bhv", S, k))  # (B, H, d_v)
        S = S + k[..., :, None] * u[..., None, :]  # (B, H, d_k, d_v)
        o = torch.einsum("bhkv,bhk->bhv", S, q) * s  # (B, H, d_v)
    return o.to(v_t.dtype), S


def delta_rule_recurrent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
                         log_decay: torch.Tensor | None = None,
                         initial_state: torch.Tensor | None = None, scale: float | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """The gated delta rule token by token, S_t = a_t (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T
    with the projection matrix built explicitly (the reference; O(T d_k^2 d_v)).
    Returns o (B, T, H, d_v) in v's dtype and the final state (B, H, d_k, d_v)."""
    dtype = _compute_dtype(v)
    s = _scale(q, scale)
    with torch.autocast(device_type=v.device.type, enabled=False):
        q_, k_, v_, b_ = (t.to(dtype) for t in (q, k, v, beta))
        S = _initial_state(q, v, initial_state, dtype)
        eye = torch.eye(q.shape[-1], dtype=dtype, device=q.device)
        outs = []
        for t in range(q.shape[1]):
            kt, bt = k_[:, t], b_[:, t, :, None, None]  # (B, H, d_k), (B, H, 1, 1)
            proj = eye - bt * kt[..., :, None] * kt[..., None, :]  # (B, H, d_k, d_k)
            S = proj @ S
            if log_decay is not None:  # a_t scales the old memory only, not the new write
                S = torch.exp(log_decay[:, t].to(dtype))[..., None, None] * S
            S = S + bt * kt[..., :, None] * v_[:, t, :, None, :]
            outs.append(torch.einsum("bhkv,bhk->bhv", S, q_[:, t]) * s)
        o = torch.stack(outs, dim=1) if outs else v_.new_zeros(v.shape)
    return o.to(v.dtype), S


def delta_rule_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
                       log_decay: torch.Tensor | None = None,
                       initial_state: torch.Tensor | None = None, chunk_size: int = 64,
                       scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunkwise-parallel gated delta rule (see the module docstring); same contract as
    ``delta_rule_recurrent``. No loop over tokens: per chunk of ``chunk_size`` tokens, batched
    matmuls and one unit-lower-triangular solve, then a loop over chunks for the state. T is
    padded up to a multiple of the chunk (chunk = T when T < chunk_size) with tokens that
    neither write (beta 0) nor decay (log_decay 0). Plain autograd: memory O(T C + T/C d_k d_v)
    per head."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size!r}")
    fast = delta_rule_fla(q, k, v, beta, log_decay, initial_state, _scale(q, scale))
    if fast is not None:  # CUDA + flash-linear-attention + bf16/fp16 (ops.kernels)
        return fast
    B, T, H, dk = q.shape
    dv = v.shape[-1]
    dtype = _compute_dtype(v)
    s = _scale(q, scale)
    low = _low_precision_matmul_dtype(v)

    def lo(x: torch.Tensor) -> torch.Tensor:  # a matmul operand
        return x if low is None else x.to(low)

    def hi(x: torch.Tensor) -> torch.Tensor:  # a matmul result, back to the compute dtype
        return x.to(dtype)

    with torch.autocast(device_type=v.device.type, enabled=False):
        S = _initial_state(q, v, initial_state, dtype)
        # (B, H, T, d) head-major so that every matmul below is a plain batched one
        q_, k_, v_ = (t.to(dtype).transpose(1, 2) for t in (q, k, v))
        b_ = beta.to(dtype).transpose(1, 2)  # (B, H, T)
        g_ = (torch.zeros_like(b_) if log_decay is None
              else log_decay.to(dtype).transpose(1, 2))  # (B, H, T)
        C = min(chunk_size, T)
        N = -(-T // C)
        pad = N * C - T
        if pad:
            q_, k_, v_ = (F.pad(t, (0, 0, 0, pad)) for t in (q_, k_, v_))
            b_, g_ = F.pad(b_, (0, pad)), F.pad(g_, (0, pad))
        q_ = q_.reshape(B, H, N, C, dk) * s
        k_ = k_.reshape(B, H, N, C, dk)
        v_ = v_.reshape(B, H, N, C, dv)
        b_ = b_.reshape(B, H, N, C, 1)
        gamma = g_.reshape(B, H, N, C).cumsum(-1)  # (B, H, N, C), <= 0 and decreasing
        causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
        # Gamma_ij = exp(gamma_i - gamma_j) for j <= i, 0 above: mask before the exp, where the
        # exponent is positive and could overflow
        decay = torch.exp((gamma[..., :, None] - gamma[..., None, :])
                          .masked_fill(~causal, float("-inf")))  # (B, H, N, C, C)
        # strictly lower part of diag(beta) (K K^T * Gamma); the solve takes the unit diagonal
        # as given (unitriangular) and never reads this one
        k_lo = lo(k_)
        A = hi(k_lo @ k_lo.transpose(-1, -2)) * decay * b_  # (B, H, N, C, C)
        e_gamma = torch.exp(gamma)[..., None]  # (B, H, N, C, 1)
        eye = torch.eye(C, dtype=dtype, device=q.device).expand_as(A)
        # T = (I + A)^-1 itself (C right-hand sides, not d_v + d_k), then two matmuls
        T_ = torch.linalg.solve_triangular(A.tril(-1), eye, upper=False, unitriangular=True)
        T_lo = lo(T_)
        U = hi(T_lo @ lo(v_ * b_))  # T diag(b) V
        W = lo(T_lo @ lo(k_ * (b_ * e_gamma)))  # T diag(b) (K e^gamma), only a matmul operand
        # (B, H, N, C, C), causal incl. diagonal
        attn = (lo(q_) @ k_lo.transpose(-1, -2)) * lo(decay)
        q_decayed = lo(q_ * e_gamma)  # reads S_0 through the decay accumulated so far
        k_decayed = lo(k_ * torch.exp(gamma[..., -1:] - gamma)[..., None])  # to chunk end
        chunk_decay = torch.exp(gamma[..., -1])[..., None, None]  # (B, H, N, 1, 1)
        # unbind, not U[:, :, n]: the backward of N slices would write N full-size zero
        # gradients (quadratic in N); unbind's is one stack
        starts, us = [], []
        for U_n, W_n, k_n, a_n in zip(U.unbind(2), W.unbind(2), k_decayed.unbind(2),
                                      chunk_decay.unbind(2), strict=True):
            S_lo = lo(S)
            starts.append(S_lo)
            u = U_n - hi(W_n @ S_lo)  # (B, H, C, d_v), the chunk's u_t given the state before
            u_lo = lo(u)
            us.append(u_lo)
            S = a_n * S + hi(k_n.transpose(-1, -2) @ u_lo)  # (B, H, d_k, d_v)
        u = torch.stack(us, dim=2)  # (B, H, N, C, d_v)
        o = hi(q_decayed @ torch.stack(starts, dim=2)) + hi(attn @ u)  # (B, H, N, C, d_v)
        o = o.reshape(B, H, N * C, dv)[:, :, :T]  # (B, H, T, d_v)
    return o.transpose(1, 2).to(v.dtype), S
