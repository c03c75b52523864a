"""flash-linear-attention's ``chunk_gated_delta_rule`` as the CUDA fast path of
``delta_rule.delta_rule_chunked`` (dispatch: ``kernels.choose("delta_rule", ...)``).

Its contract, checked against fla's API: ``chunk_gated_delta_rule(q, k, v, g, beta, scale,
initial_state, output_final_state, ..., use_qk_l2norm_in_kernel)`` with q, k (B, T, H, K),
v (B, T, H, V) in one dtype, **bf16 or fp16 only** (it refuses float32), g the log decay
(B, T, H) (our ``log_decay``, 0 for no decay), beta (B, T, H), the state (B, H, K, V) kept in
float32, and the same recurrence S_t = a_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,
o_t = scale S_t^T q_t: our layout, so nothing is transposed. Its chunk size is its own (64);
the result does not depend on it. Keys are used as given (``use_qk_l2norm_in_kernel=False``:
normalising is the family's business, as in our path). It runs when the run asked for reduced
precision: bf16/fp16 inputs, or float32 inputs under bf16/fp16 autocast, which are cast to the
autocast dtype (our PyTorch path computes in float32 instead; fla accumulates in float32).
"""

from __future__ import annotations

import torch

from gam.models.ops import kernels
from gam.runtime import autocast_dtype


def compute_dtype(v: torch.Tensor) -> torch.dtype:
    """The dtype the fast kernel would compute in: autocast's when it is on, else v's."""
    return autocast_dtype(v)


def delta_rule_fla(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
                   log_decay: torch.Tensor | None, initial_state: torch.Tensor | None,
                   scale: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``delta_rule_chunked`` by fla's kernel when ``kernels.choose`` picks it, else None (the
    caller runs the PyTorch path). Returns o (B, T, H, d_v) in v's dtype and the final state
    (B, H, d_k, d_v) in float32."""
    dtype = compute_dtype(v)
    choice = kernels.choose("delta_rule", v.device.type, dtype, head_dim_k=q.shape[-1],
                            head_dim_v=v.shape[-1])
    if choice != "fla":
        return None
    return kernels.attempt("fla", lambda: _call(q, k, v, beta, log_decay, initial_state, scale,
                                                dtype))


def _call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
          log_decay: torch.Tensor | None, initial_state: torch.Tensor | None, scale: float,
          dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    fn = kernels.fast_kernel("fla").chunk_gated_delta_rule
    with torch.autocast(device_type=v.device.type, enabled=False):
        q_, k_, v_, b_ = (t.to(dtype).contiguous() for t in (q, k, v, beta))
        g = (torch.zeros(beta.shape, dtype=torch.float32, device=beta.device)
             if log_decay is None else log_decay.float().contiguous())
        state = None if initial_state is None else initial_state.float().contiguous()
        o, final = fn(q_, k_, v_, g, b_, scale=scale, initial_state=state,
                      output_final_state=True, use_qk_l2norm_in_kernel=False)
    return o.to(v.dtype), final.float()
