"""The selective scan of Mamba-1 (Gu & Dao, 2023), per channel d and state n::

    h_t = exp(dt_t A) * h_{t-1} + dt_t B_t x_t,    y_t = C_t . h_t + D x_t

``selective_scan_reference`` (a sequential loop, the specification), ``selective_scan`` (the
training path, dispatching by device: mamba-ssm's CUDA kernel, the compiled CPU kernel of
``_scan_cpp``, or a chunked parallel scan in PyTorch) and ``selective_scan_step`` (one token,
for decoding). The paths are described in ``gam.models.mamba``'s docstring.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from gam.models.ops import _scan_cpp, kernels

BACKENDS = ("auto", "kernel", "torch", "mamba_ssm")


def selective_scan_reference(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor,
                             B: torch.Tensor, C: torch.Tensor, D: torch.Tensor,
                             z: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The selective scan as a sequential loop over time: the specification the fast paths are
    tested against. u, delta (B, T, D_in); A (D_in, N); B, C (B, T, N); D (D_in,); optional
    gate z (B, T, D_in). Returns y (B, T, D_in), times silu(z) if given, and the final state
    h (B, D_in, N), in the inputs' dtype."""
    dA = torch.exp(delta[..., None] * A)  # (B, T, D_in, N)
    dBu = (delta * u)[..., None] * B[:, :, None, :]  # (B, T, D_in, N)
    h = u.new_zeros(u.shape[0], u.shape[2], A.shape[1])  # (B, D_in, N)
    ys = []
    for t in range(u.shape[1]):
        h = dA[:, t] * h + dBu[:, t]
        ys.append(torch.einsum("bdn,bn->bd", h, C[:, t]))  # (B, D_in)
    y = torch.stack(ys, dim=1) + u * D  # (B, T, D_in)
    if z is not None:
        y = y * F.silu(z)
    return y, h


def selective_scan_step(u_t: torch.Tensor, delta_t: torch.Tensor, A: torch.Tensor,
                        B_t: torch.Tensor, C_t: torch.Tensor, D: torch.Tensor, h: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of the recurrence: u_t, delta_t (B, D_in); B_t, C_t (B, N); h (B, D_in, N).
    Returns y_t (B, D_in) in u_t's dtype and the new state, computed in at least float32."""
    if kernels.choose("selective_scan_step", u_t.device.type, u_t.dtype) == "mamba_ssm":
        out = kernels.attempt("mamba_ssm_step",
                              lambda: _mamba_ssm_step(u_t, delta_t, A, B_t, C_t, D, h))
        if out is not None:
            return out
    dtype = torch.promote_types(h.dtype, torch.float32)
    with torch.autocast(device_type=u_t.device.type, enabled=False):
        u, dt = u_t.to(dtype), delta_t.to(dtype)
        h = torch.exp(dt[..., None] * A.to(dtype)) * h.to(dtype) \
            + (dt * u)[..., None] * B_t.to(dtype)[:, None, :]  # (B, D_in, N)
        y = torch.einsum("bdn,bn->bd", h, C_t.to(dtype)) + u * D.to(dtype)  # (B, D_in)
    return y.to(u_t.dtype), h


def _mamba_ssm_step(u_t: torch.Tensor, delta_t: torch.Tensor, A: torch.Tensor,
                    B_t: torch.Tensor, C_t: torch.Tensor, D: torch.Tensor, h: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """mamba-ssm's ``selective_state_update``: same layout as ours (state (B, D_in, N), x, dt
    (B, D_in), B, C (B, N)); it updates the state in place (so it gets a float32 copy: ours is
    functional) and computes in float32, returning y in x's dtype."""
    fn = kernels.fast_kernel("mamba_ssm_step").selective_state_update
    state = h.to(torch.promote_types(h.dtype, torch.float32), copy=True).contiguous()
    y = fn(state, u_t.contiguous(), delta_t.contiguous(), A.float().contiguous(),
           B_t.contiguous(), C_t.contiguous(), D=D.float().contiguous())
    return y.to(u_t.dtype), state


def _linear_scan(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inclusive scan along dim 1 of h_t = a_t h_{t-1} + b_t (h_{-1} = 0), Hillis-Steele:
    log2(L) rounds of (a, b) o (a', b') = (a a', a b' + b). Returns (prod_{s<=t} a_s, h).
    Only products of the a's (decays <= 1) appear: nothing can overflow."""
    L = a.shape[1]
    offset = 1
    while offset < L:
        b = torch.cat([b[:, :offset], torch.addcmul(b[:, offset:], a[:, offset:],
                                                    b[:, :-offset])], dim=1)
        a = torch.cat([a[:, :offset], a[:, offset:] * a[:, :-offset]], dim=1)
        offset *= 2
    return a, b


# Elements of one (B, chunk, D_in, N) tensor the PyTorch scan may build on an accelerator
# (2**26 floats = 256 MiB; the chunk's forward keeps a few such tensors alive at once).
TORCH_SCAN_GPU_ELEMENTS = 2**26


def torch_scan_chunk(device_type: str, batch: int, T: int, state_size: int, chunk_size: int
                     ) -> int:
    """Tokens per chunk of the PyTorch scan. On the CPU ``chunk_size`` (cache-sized blocks).
    On an accelerator the Python loop over chunks is what costs (a few dozen kernel launches
    per chunk, forward and backward, for a few microseconds of work each): the largest power
    of two up to T whose (B, chunk, D_in, N) tensors stay within ``TORCH_SCAN_GPU_ELEMENTS``,
    never below ``chunk_size``. ``state_size`` = D_in * N. The result does not depend on it."""
    if device_type == "cpu":
        return chunk_size
    fit = max(1, TORCH_SCAN_GPU_ELEMENTS // max(1, batch * state_size))
    chunk = chunk_size
    while chunk * 2 <= min(T, fit):
        chunk *= 2
    return chunk


class _TorchChunkedScan(torch.autograd.Function):
    """Chunked parallel scan in PyTorch (any device, float32/float64): a Python loop over
    chunks of ``chunk`` tokens carrying the state, a Hillis-Steele scan inside each chunk. Only
    the chunk-boundary states are saved; backward recomputes a chunk at a time, so memory is
    O(B * chunk * D_in * N) instead of log2(chunk) stored copies of (B, T, D_in, N)."""

    @staticmethod
    def forward(ctx: Any, u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor,
                B: torch.Tensor, C: torch.Tensor, chunk: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
        Bsz, T, Din = u.shape
        h0 = u.new_zeros(Bsz, Din, A.shape[1])  # (B, D_in, N)
        y = torch.empty_like(u)
        starts = []
        for t0 in range(0, T, chunk):
            sl = slice(t0, t0 + chunk)
            starts.append(h0)
            h = _TorchChunkedScan._states(u[:, sl], delta[:, sl], A, B[:, sl], h0)[1]
            y[:, sl] = torch.einsum("bldn,bln->bld", h, C[:, sl])  # (B, L, D_in)
            h0 = h[:, -1]
        ctx.chunk = chunk
        ctx.save_for_backward(u, delta, A, B, C, torch.stack(starts, dim=1))
        return y, h0

    @staticmethod
    def _states(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                h0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = torch.exp(delta[..., None] * A)  # (B, L, D_in, N), in (0, 1]
        b = (delta * u)[..., None] * B[:, :, None, :]  # (B, L, D_in, N)
        prod, h = _linear_scan(a, b)
        return a, torch.addcmul(h, prod, h0[:, None])  # h_t including the carried-in state

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor, dh_last: torch.Tensor | None
                 ) -> tuple[torch.Tensor | None, ...]:
        u, delta, A, B, C, starts = ctx.saved_tensors
        chunk, T = ctx.chunk, u.shape[1]
        du, ddelta = torch.empty_like(u), torch.empty_like(u)
        dB, dC, dA = torch.empty_like(B), torch.empty_like(C), torch.zeros_like(A)
        # gradient flowing into the last state of the current chunk from everything after it
        carry = dh_last if dh_last is not None else torch.zeros_like(starts[:, 0])
        for c in reversed(range(starts.shape[1])):
            sl = slice(c * chunk, min(T, (c + 1) * chunk))
            h0, d_c, u_c, dy_c = starts[:, c], delta[:, sl], u[:, sl], dy[:, sl]
            a, h = _TorchChunkedScan._states(u_c, d_c, A, B[:, sl], h0)
            # dh_t = C_t dy_t + a_{t+1} dh_{t+1}: a reversed scan with decays a shifted by one
            g = dy_c[..., None] * C[:, sl, None, :]  # (B, L, D_in, N)
            g[:, -1] += carry
            a_next = torch.cat([a[:, 1:], torch.zeros_like(a[:, :1])], dim=1)
            dh = _linear_scan(a_next.flip(1), g.flip(1))[1].flip(1)  # (B, L, D_in, N)
            h_prev = torch.cat([h0[:, None], h[:, :-1]], dim=1)
            gda = dh * h_prev * a  # gradient of delta_t * A
            s = torch.einsum("bldn,bln->bld", dh, B[:, sl])  # (B, L, D_in)
            du[:, sl] = d_c * s
            ddelta[:, sl] = torch.einsum("bldn,dn->bld", gda, A) + u_c * s
            dA += torch.einsum("bldn,bld->dn", gda, d_c)
            dB[:, sl] = torch.einsum("bldn,bld->bln", dh, d_c * u_c)
            dC[:, sl] = torch.einsum("bld,bldn->bln", dy_c, h)
            carry = a[:, 0] * dh[:, 0]
        return du, ddelta, dA, dB, dC, None


# The compiled CPU kernels as torch custom ops (opaque to torch.compile, with fake
# implementations for tracing), differentiated by their hand-written backward kernels.
@torch.library.custom_op(
    "gam::mamba_scan_fwd", mutates_args=(),
    schema="(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor D, Tensor? z, "
           "int chunk) -> (Tensor, Tensor, Tensor)")
def _scan_fwd_op(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                 C: torch.Tensor, D: torch.Tensor, z: torch.Tensor | None, chunk: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    kernels.require_cpu("the scan kernel", u, delta, A, B, C, D, z)
    y, h, ckpt = _scan_cpp.scan_forward(u, delta, A, B, C, D, z, chunk)
    return y, h.contiguous(), ckpt


@_scan_fwd_op.register_fake
def _(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
      D: torch.Tensor, z: torch.Tensor | None, chunk: int
      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    Bsz, T, Din = u.shape
    N = A.shape[1]
    return (torch.empty_like(u, memory_format=torch.contiguous_format),
            u.new_empty(Bsz, Din, N), u.new_empty(Bsz, -(-T // chunk), N, Din))


@torch.library.custom_op(
    "gam::mamba_scan_bwd", mutates_args=(),
    schema="(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor D, Tensor? z, "
           "Tensor ckpt, Tensor dout, Tensor? dh_last, int chunk) "
           "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")
def _scan_bwd_op(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                 C: torch.Tensor, D: torch.Tensor, z: torch.Tensor | None, ckpt: torch.Tensor,
                 dout: torch.Tensor, dh_last: torch.Tensor | None, chunk: int
                 ) -> tuple[torch.Tensor, ...]:
    kernels.require_cpu("the scan kernel", u, delta, A, B, C, D, z, ckpt, dout, dh_last)
    grads = _scan_cpp.scan_backward(u, delta, A, B, C, D, z, ckpt, dout, dh_last, chunk)
    dz = grads[-1] if grads[-1] is not None else u.new_empty(0)  # no gate: an empty stand-in
    return (*(g.contiguous() for g in grads[:-1]), dz)


@_scan_bwd_op.register_fake
def _(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
      D: torch.Tensor, z: torch.Tensor | None, ckpt: torch.Tensor, dout: torch.Tensor,
      dh_last: torch.Tensor | None, chunk: int) -> tuple[torch.Tensor, ...]:
    like = lambda t: torch.empty_like(t, memory_format=torch.contiguous_format)
    return (like(u), like(u), like(A), B.new_empty(B.shape), C.new_empty(C.shape), like(D),
            like(u) if z is not None else u.new_empty(0))


def _scan_setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    u, delta, A, B, C, D, z, chunk = inputs
    ctx.chunk = chunk
    ctx.save_for_backward(u, delta, A, B, C, D, z, output[2])


def _scan_backward(ctx: Any, dy: torch.Tensor, dh_last: torch.Tensor | None, _: Any
                   ) -> tuple[torch.Tensor | None, ...]:
    u, delta, A, B, C, D, z, ckpt = ctx.saved_tensors
    du, ddelta, dA, dB, dC, dD, dz = _scan_bwd_op(u, delta, A, B, C, D, z, ckpt, dy, dh_last,
                                                  ctx.chunk)
    return du, ddelta, dA, dB, dC, dD, (dz if z is not None else None), None


_scan_fwd_op.register_autograd(_scan_backward, setup_context=_scan_setup_context)


def pick_backend(device_type: str, dtype: torch.dtype) -> str:
    """Which scan ``selective_scan(backend="auto")`` runs for inputs on this device/dtype
    (``kernels.choose``; the compiled CPU kernel is called "kernel" here)."""
    choice = kernels.choose("selective_scan", device_type, dtype)
    return "kernel" if choice == "cpp" else choice


def _mamba_ssm_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                    C: torch.Tensor, D: torch.Tensor, z: torch.Tensor | None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """mamba-ssm's fused CUDA scan. Its layout is channels first: u, delta, z (B, D_in, T);
    B, C (B, N, T). It wants delta, B, C, z in u's dtype (it computes in float32 inside) and
    A, D in float32; it returns the last state in float32."""
    fn = kernels.fast_kernel("mamba_ssm").selective_scan_fn
    cl = lambda t: t.to(u.dtype).transpose(1, 2)
    y, h = fn(cl(u), cl(delta), A.float(), cl(B), cl(C), D.float(),
              z=None if z is None else cl(z), delta_bias=None, delta_softplus=False,
              return_last_state=True)
    return y.transpose(1, 2), h


def selective_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                   C: torch.Tensor, D: torch.Tensor, z: torch.Tensor | None = None,
                   chunk_size: int = 64, backend: str = "auto"
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The training-path selective scan; same contract as ``selective_scan_reference``:
    y (B, T, D_in) in u's dtype (gated by silu(z) if z is given) and the final state
    (B, D_in, N) in float32 (float64 if the inputs are). ``backend``: "auto" (see
    ``pick_backend``), "kernel", "torch" or "mamba_ssm".
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown scan backend {backend!r}; expected one of {BACKENDS}")
    auto = backend == "auto"
    if auto:
        backend = pick_backend(u.device.type, u.dtype)
    if backend == "mamba_ssm":
        if u.dtype not in kernels.HALF_OR_FLOAT:
            raise ValueError(f"backend='mamba_ssm' takes float32, bf16 or fp16 inputs, got "
                             f"{u.dtype}")
        if kernels.fast_kernel("mamba_ssm") is None:
            raise RuntimeError("backend='mamba_ssm' needs the mamba_ssm package (with its "
                               "CUDA build)")
        if not auto:
            return _mamba_ssm_scan(u, delta, A, B, C, D, z)
        out = kernels.attempt("mamba_ssm", lambda: _mamba_ssm_scan(u, delta, A, B, C, D, z))
        if out is not None:
            return out
        backend = "torch"
    if backend == "kernel":
        kernels.require_cpu("backend='kernel'", u, delta, A, B, C, D, z)
    dtype = torch.promote_types(u.dtype, torch.float32)
    with torch.autocast(device_type=u.device.type, enabled=False):
        u_, delta_, A_, D_ = (t.to(dtype) for t in (u, delta, A, D))
        B_, C_ = B.to(dtype), C.to(dtype)
        if backend == "kernel":
            # B, C and z may stay row-strided views: the kernel takes a row stride
            y, h, _ = _scan_fwd_op(u_.contiguous(), delta_.contiguous(), A_, B_, C_, D_,
                                   None if z is None else z.to(dtype), chunk_size)
        else:
            chunk = torch_scan_chunk(u.device.type, u.shape[0], u.shape[1], A.numel(),
                                     chunk_size)
            y, h = _TorchChunkedScan.apply(u_.contiguous(), delta_.contiguous(), A_,
                                           B_.contiguous(), C_.contiguous(), chunk)
            y = torch.addcmul(y, u_, D_)  # the skip connection D * u
            if z is not None:
                y = y * F.silu(z.to(dtype))
    return y.to(u.dtype), h
