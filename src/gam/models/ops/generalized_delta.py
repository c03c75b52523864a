"""RWKV-7's generalised delta rule (Peng et al. 2025, arXiv 2503.14456), three ways.

Per head, with a state S of shape (d_v, d_k) (values along the rows, keys along the columns, the
paper's convention), a receptance (query) r_t, a per-channel decay w_t in (0, 1] given as its
log ``log_decay`` (<= 0), a key k_t, a value v_t, a unit-norm removal key kk_t and an in-context
learning rate a_t (all (d_k,) but v_t (d_v,))::

    S_t = S_{t-1} (diag(w_t) - kk_t (kk_t * a_t)^T) + v_t k_t^T
    y_t = S_t r_t

i.e. the memory first decays channel by channel, then loses the fraction a_t of what it held
under kk_t (``S kk_t`` is the value read under kk_t, removed along kk_t * a_t), then adds v_t
under k_t. With alpha_t = -kk_t and beta_t = kk_t * a_t this is the diagonal-plus-low-rank
transition ``S_t = S_{t-1} (D_t + alpha_t beta_t^T) + v_t k_t^T``, which is what the code
computes (a and b of flash-linear-attention's ``generalized_delta_rule``).

- ``rwkv7_recurrent``: the formula above token by token with the (d_k, d_k) transition matrix
  built explicitly: the specification the other two are tested against.
- ``rwkv7_step``: one token, for cached decoding (no d_k x d_k matrix).
- ``rwkv7_chunked``: the training path, no Python loop over tokens.

Chunked form (WY / UT transform with a per-channel decay). Inside a chunk of C tokens starting
from S_0, let g_t = log w_1 + ... + log w_t (per channel, inclusive; g_0 = 0) and p_t =
S_{t-1} alpha_t (the value the removal reads). Unrolling the recurrence::

    S_t = S_0 diag(e^{g_t}) + sum_{s<=t} (p_s beta_s^T + v_s k_s^T) diag(e^{g_t - g_s})
    p_t = S_0 (alpha_t e^{g_{t-1}}) + sum_{s<t} p_s <alpha_t, beta_s e^{g_{t-1} - g_s}>
                                        + v_s <alpha_t, k_s e^{g_{t-1} - g_s}>
    y_t = S_0 (r_t e^{g_t}) + sum_{s<=t} p_s <r_t, beta_s e^{g_t - g_s}>
                                        + v_s <r_t, k_s e^{g_t - g_s}>

With the (C, C) matrices A_ab[t, s] = <alpha_t, beta_s e^{g_{t-1} - g_s}> and A_ak likewise
(strictly lower, s < t), A_rb and A_rk with r_t and e^{g_t - g_s} (lower, s <= t), the rows
p_t^T form P (C, d_v) solving a unit-lower-triangular system::

    (I - A_ab) P = A_ak V + (alpha e^{g_-}) S_0^T      ->   P = U + W S_0^T,
    U = T A_ak V,  W = T (alpha e^{g_-}),  T = (I - A_ab)^{-1}
    Y   = (r e^{g}) S_0^T + A_rb P + A_rk V
    S_C = S_0 diag(e^{g_C}) + P^T (beta e^{g_C - g}) + V^T (k e^{g_C - g})

Everything but the state hand-off (P needs the chunk's S_0) is batched over all chunks; a
Python loop over chunks carries S. Stability: the pairwise factors e^{g_t - g_s} (t >= s) are
<= 1, but a matmul needs them split per channel, e^{g_t} e^{-g_s}, with g relative to the
chunk's start: e^{g_t} <= 1 and e^{-g_s} <= e^G for a chunk whose decays multiply to e^{-G}.
Every other exponent taken is <= 0. The factors stay finite while G stays under
``MAX_EXPONENT`` of the compute dtype (80 in float32, 700 in float64); past it
``rwkv7_chunked`` raises rather than overflowing (use a smaller chunk). RWKV-7's own decays are
>= exp(-e^{-1/2}) per token (log w >= -0.61), so a chunk of C tokens has G <= 0.61 C: C = 32
gives factors below e^20 in any dtype. (A reference point inside the chunk, e.g. its middle,
would halve the exponents but make early tokens' outputs depend, by rounding, on later tokens'
decays: the split is anchored at the chunk's start so the form is exactly causal.)

Layout: r, log_decay, k, removal_key, rate (B, T, H, d_k); v (B, T, H, d_v); state
(B, H, d_v, d_k). The math runs in float32 (float64 for float64 inputs) with autocast off;
outputs come back in v's dtype and the state in the compute dtype.
"""

from __future__ import annotations

import torch

# the delta rule's helpers: float32 or more, and a zero (B, H, rows, cols) state whose rows
# follow the first tensor's last dimension (here v: S is (d_v, d_k))
from gam.models.ops.delta_rule import _compute_dtype, _initial_state

#: Largest exponent taken in the chunked form, per compute dtype (e^80 ~ 5.5e34 < float32's
#: 3.4e38, leaving room for the values the factors multiply).
MAX_EXPONENT = {torch.float32: 80.0, torch.float64: 700.0}


def rwkv7_step(r_t: torch.Tensor, log_decay_t: torch.Tensor, k_t: torch.Tensor,
               v_t: torch.Tensor, removal_key_t: torch.Tensor, rate_t: torch.Tensor,
               state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One token: r_t, log_decay_t, k_t, removal_key_t, rate_t (B, H, d_k), v_t (B, H, d_v),
    state (B, H, d_v, d_k). Returns y_t (B, H, d_v) in v_t's dtype and the new state."""
    dtype = torch.promote_types(_compute_dtype(v_t), state.dtype)
    with torch.autocast(device_type=v_t.device.type, enabled=False):
        r, w, k, v, kk, a = (t.to(dtype) for t in (r_t, log_decay_t, k_t, v_t, removal_key_t,
                                                   rate_t))
        S = state.to(dtype)
        removed = torch.einsum("bhvk,bhk->bhv", S, kk)  # S kk: the value held under kk
        S = (S * torch.exp(w)[..., None, :] - removed[..., :, None] * (kk * a)[..., None, :]
             + v[..., :, None] * k[..., None, :])  # (B, H, d_v, d_k)
        y = torch.einsum("bhvk,bhk->bhv", S, r)  # (B, H, d_v)
    return y.to(v_t.dtype), S


def rwkv7_recurrent(r: torch.Tensor, log_decay: torch.Tensor, k: torch.Tensor,
                    v: torch.Tensor, removal_key: torch.Tensor, rate: torch.Tensor,
                    initial_state: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence token by token with the transition diag(w_t) - kk_t (kk_t a_t)^T built as
    a (d_k, d_k) matrix (the reference; O(T d_k^2 d_v)). Returns y (B, T, H, d_v) in v's dtype
    and the final state (B, H, d_v, d_k)."""
    dtype = _compute_dtype(v)
    with torch.autocast(device_type=v.device.type, enabled=False):
        r_, w_, k_, v_, kk_, a_ = (t.to(dtype) for t in (r, log_decay, k, v, removal_key, rate))
        S = _initial_state(v, k, initial_state, dtype)
        outs = []
        for t in range(r.shape[1]):
            kk = kk_[:, t]  # (B, H, d_k)
            transition = (torch.diag_embed(torch.exp(w_[:, t]))
                          - kk[..., :, None] * (kk * a_[:, t])[..., None, :])  # (B, H, dk, dk)
            S = S @ transition + v_[:, t, :, :, None] * k_[:, t, :, None, :]
            outs.append(torch.einsum("bhvk,bhk->bhv", S, r_[:, t]))
        y = torch.stack(outs, dim=1) if outs else v_.new_zeros(v.shape)
    return y.to(v.dtype), S


def rwkv7_chunked(r: torch.Tensor, log_decay: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  removal_key: torch.Tensor, rate: torch.Tensor,
                  initial_state: torch.Tensor | None = None, chunk_size: int = 32
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunkwise-parallel form (see the module docstring); same contract as
    ``rwkv7_recurrent``. T is padded up to a multiple of the chunk (chunk = T when T <
    chunk_size) with tokens that change nothing (decay 1, zero key, value and removal key).
    Plain autograd: memory O(T C + T/C d_k d_v) per head. Raises ValueError when a chunk's
    cumulative decay is too strong for the compute dtype (see ``MAX_EXPONENT``)."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    B, T, H, dk = k.shape
    dv = v.shape[-1]
    dtype = _compute_dtype(v)
    with torch.autocast(device_type=v.device.type, enabled=False):
        S = _initial_state(v, k, initial_state, dtype)
        C = min(chunk_size, T)
        N = -(-T // C)
        pad = N * C - T

        def chunks(t: torch.Tensor) -> torch.Tensor:
            # (B, T, H, d) -> (B, H, N, C, d), head-major so every matmul is a batched one
            t = t.to(dtype).transpose(1, 2)
            if pad:
                t = torch.nn.functional.pad(t, (0, 0, 0, pad))
            return t.reshape(B, H, N, C, t.shape[-1])

        r_, w_, k_, v_, kk_, a_ = (chunks(t) for t in (r, log_decay, k, v, removal_key, rate))
        alpha, beta = -kk_, kk_ * a_
        g = w_.cumsum(dim=-2)  # (B, H, N, C, d_k): inclusive, <= 0, decreasing in t
        g_prev = g - w_  # exclusive: g_{t-1}
        _check_exponents(g, dtype, C)
        r_in = r_ * torch.exp(g)  # query side of e^{g_t - g_s}, <= 1
        alpha_in = alpha * torch.exp(g_prev)  # removal side of e^{g_{t-1} - g_s}, <= 1
        grow = torch.exp(-g)  # key side, <= e^G
        beta_out, k_out = beta * grow, k_ * grow
        strict = torch.ones(C, C, dtype=torch.bool, device=v.device).tril(-1)
        causal = torch.ones(C, C, dtype=torch.bool, device=v.device).tril()
        zero = torch.zeros((), dtype=dtype, device=v.device)
        A_ab = torch.where(strict, alpha_in @ beta_out.transpose(-1, -2), zero)  # (..., C, C)
        A_ak = torch.where(strict, alpha_in @ k_out.transpose(-1, -2), zero)
        A_rb = torch.where(causal, r_in @ beta_out.transpose(-1, -2), zero)
        A_rk = torch.where(causal, r_in @ k_out.transpose(-1, -2), zero)
        eye = torch.eye(C, dtype=dtype, device=v.device).expand_as(A_ab)
        # T = (I - A_ab)^-1 (unit lower triangular); the solve reads only the strict part
        T_ = torch.linalg.solve_triangular(-A_ab, eye, upper=False, unitriangular=True)
        U = T_ @ (A_ak @ v_)  # (B, H, N, C, d_v)
        W = T_ @ alpha_in  # (B, H, N, C, d_k), reads S_0
        to_end = torch.exp(g[..., -1:, :] - g)  # (B, H, N, C, d_k), <= 1
        beta_end, k_end = beta * to_end, k_ * to_end
        chunk_decay = torch.exp(g[..., -1, :])[..., None, :]  # (B, H, N, 1, d_k)
        written = v_.transpose(-1, -2) @ k_end  # (B, H, N, d_v, d_k): V^T (k e^{g_C - g})
        # unbind, not indexing: the backward of N slices would write N full-size zero
        # gradients; unbind's is one stack
        starts, ps = [], []
        for U_n, W_n, b_n, d_n, kv_n in zip(U.unbind(2), W.unbind(2), beta_end.unbind(2),
                                            chunk_decay.unbind(2), written.unbind(2),
                                            strict=True):
            starts.append(S)
            p = U_n + W_n @ S.transpose(-1, -2)  # (B, H, C, d_v): p_t given the chunk's S_0
            ps.append(p)
            S = S * d_n + p.transpose(-1, -2) @ b_n + kv_n  # (B, H, d_v, d_k)
        P = torch.stack(ps, dim=2)  # (B, H, N, C, d_v)
        S0 = torch.stack(starts, dim=2)  # (B, H, N, d_v, d_k)
        y = r_in @ S0.transpose(-1, -2) + A_rb @ P + A_rk @ v_
        y = y.reshape(B, H, N * C, dv)[:, :, :T]  # (B, H, T, d_v)
    return y.transpose(1, 2).to(v.dtype), S


def _check_exponents(g: torch.Tensor, dtype: torch.dtype, C: int) -> None:
    if torch.compiler.is_compiling():
        return
    worst = float(-g.detach().amin()) if g.numel() else 0.0  # the strongest chunk's G
    if worst > MAX_EXPONENT[dtype]:
        raise ValueError(f"rwkv7_chunked: the decays inside a chunk of {C} tokens need factors "
                         f"up to e^{worst:.0f}, beyond e^{MAX_EXPONENT[dtype]:.0f} in {dtype}; "
                         f"use a smaller chunk_size or rwkv7_recurrent")
