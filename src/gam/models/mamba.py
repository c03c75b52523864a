"""Mamba (Gu & Dao, 2023) baseline: the Mamba-1 selective-SSM mixer inside the shared LM shell.

One mixer (parameter names and shapes as in mamba-ssm's ``Mamba``, so its checkpoints map)::

    x, z   = in_proj(h).chunk(2)                 # (B, T, E) each, E = expand * d_model
    x      = silu(causal_depthwise_conv1d(x))    # kernel d_conv
    dt, B, C = x_proj(x).split(dt_rank, N, N)
    dt     = softplus(dt_proj(dt))               # (B, T, E), one step size per channel
    y      = selective_scan(x, dt, A = -exp(A_log), B, C, D, z)   # includes * silu(z)
    out    = out_proj(y)

with the scan, per channel d and state n::

    h_t = exp(dt_t A) * h_{t-1} + dt_t B_t x_t,    y_t = C_t . h_t + D x_t

Two ways to stack mixers (``MambaConfig.stacking``):

- ``"residual"`` (default, the ``mamba`` model): pre-norm residual blocks
  ``x = x + mixer(LayerNorm(x))`` as in mamba-ssm's own LM (which uses RMSNorm; LayerNorm here
  to match the shell's final norm and the GAM/Transformer blocks). ``out_proj`` is scaled by
  1/sqrt(n_layers) at init, as mamba-ssm does for pre-norm residual stacks. No FFN and no dropout
  inside the block, as in mamba-ssm; the shell's embedding dropout still applies.
- ``"paper"`` (the ``mamba-paper`` model): the bare stack ``x = mixer(x)`` of the GAM paper's
  baseline, no residual and no norm. It is kept because it is what the paper describes and its
  20.5M parameter count (tested) is only reached without norms. Without norms each mixer
  shrinks its input at init (a test shows the collapse) and the gate y * silu(z) makes it
  superlinear once trained, so the stack is unstable both ways (measurements in
  docs/design.md, "Mamba").

The scan comes three ways: ``selective_scan_reference`` (a sequential loop, the specification),
``selective_scan`` (the training path) and ``selective_scan_step`` (one token, for decoding).
``selective_scan`` dispatches to

- mamba-ssm's fused CUDA ``selective_scan_fn`` for CUDA tensors when ``mamba_ssm`` imports;
- on CPU, a C++ kernel compiled at first use (``gam.models._scan_cpp``, about 2 s, cached): it
  walks the sequence once keeping the state of 64 channels in L1, fuses D u and the silu(z) gate,
  stores only chunk-boundary states and recomputes one chunk at a time in backward, so it never
  materialises (B, T, E, N). A second kernel does silu(causal conv) reading the in_proj output
  in place;
- otherwise (no compiler, ``GAM_SCAN_KERNEL=0``, other devices) a chunked parallel scan in
  PyTorch (Hillis-Steele inside chunks of ``chunk_size`` tokens, a Python loop over chunks)
  with a hand-written backward that recomputes a chunk at a time instead of storing.

All paths multiply only decays exp(dt A) <= 1 (dt > 0, A < 0); there is no exp(-cumsum)
division that could overflow when dt |A| is large (a test runs dt |A| up to 40 per step over
300 tokens). The scan runs in float32 even under bf16 autocast (inputs are cast up, autocast
is off inside), as mamba-ssm does; the decode state is float32.

Why a mixer of our own rather than a package: docs/design.md, "Mamba".
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from gam.models import _scan_cpp
from gam.models.gam import causal_depthwise_conv
from gam.models.lm import CausalLM, LMConfig

STACKINGS = ("residual", "paper")
BACKENDS = ("auto", "kernel", "torch", "mamba_ssm")


@dataclass
class MambaConfig(LMConfig):
    """Mamba hyper-parameters; with the shell's defaults and ``stacking="paper"`` this is the
    paper's 20,504,576-parameter baseline (d_inner 1536, dt_rank 32)."""

    d_state: int = 16
    d_conv: int = 4
    expand: int = 3
    dt_rank: int | None = None  # None -> ceil(d_model / 16), as mamba-ssm's "auto"
    stacking: str = "residual"
    chunk_size: int = 64  # scan chunk: checkpoint interval of the kernel, block of the torch scan

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("d_state", "d_conv", "expand", "chunk_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.dt_rank is not None and (isinstance(self.dt_rank, bool)
                                         or not isinstance(self.dt_rank, int) or self.dt_rank < 1):
            raise ValueError(f"dt_rank must be an integer >= 1 or None (auto), got "
                             f"{self.dt_rank!r}")
        if self.stacking not in STACKINGS:
            raise ValueError(f"unknown stacking {self.stacking!r}; expected one of {STACKINGS}")

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def dt_rank_value(self) -> int:
        """dt_rank with None resolved to ceil(d_model / 16)."""
        return self.dt_rank if self.dt_rank is not None else math.ceil(self.d_model / 16)


# ---------------------------------------------------------------------------------- the scan
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
    dtype = torch.promote_types(h.dtype, torch.float32)
    with torch.autocast(device_type=u_t.device.type, enabled=False):
        u, dt = u_t.to(dtype), delta_t.to(dtype)
        h = torch.exp(dt[..., None] * A.to(dtype)) * h.to(dtype) \
            + (dt * u)[..., None] * B_t.to(dtype)[:, None, :]  # (B, D_in, N)
        y = torch.einsum("bdn,bn->bd", h, C_t.to(dtype)) + u * D.to(dtype)  # (B, D_in)
    return y.to(u_t.dtype), h


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


@torch.library.custom_op("gam::causal_conv_silu_fwd", mutates_args=(),
                         schema="(Tensor x, Tensor weight, Tensor bias) -> Tensor")
def _conv_fwd_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return _scan_cpp.conv_forward(x, weight, bias, silu=True)


@_conv_fwd_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape)


@torch.library.custom_op(
    "gam::causal_conv_silu_bwd", mutates_args=(),
    schema="(Tensor x, Tensor weight, Tensor bias, Tensor dout) -> (Tensor, Tensor, Tensor)")
def _conv_bwd_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, dout: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, dw, db = _scan_cpp.conv_backward(x, weight, bias, dout, silu=True)
    return dx, dw.contiguous(), db


@_conv_bwd_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, dout: torch.Tensor
      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return x.new_empty(x.shape), weight.new_empty(weight.shape), bias.new_empty(bias.shape)


def _conv_setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    ctx.save_for_backward(*inputs)  # x is kept, not the output: backward recomputes the conv


def _conv_backward(ctx: Any, dout: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return _conv_bwd_op(*ctx.saved_tensors, dout)


_conv_fwd_op.register_autograd(_conv_backward, setup_context=_conv_setup_context)


def causal_conv_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """silu(causal depthwise conv1d over time): x (B, T, E), weight (E, 1, K), bias (E,).
    On CPU the compiled kernel (computing in float32, returning x's dtype), elsewhere
    PyTorch's conv1d."""
    if x.device.type == "cpu" and _scan_cpp.load() is not None:
        dtype = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(device_type="cpu", enabled=False):
            out = _conv_fwd_op(x.to(dtype), weight.to(dtype), bias.to(dtype))
        return out.to(x.dtype)
    return F.silu(causal_depthwise_conv(x, weight, bias))


@functools.cache
def _mamba_ssm_scan_fn() -> Any:
    """mamba-ssm's fused CUDA ``selective_scan_fn``, or None when it is not installed."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except ImportError:  # also covers a broken install missing its CUDA extension
        return None
    return selective_scan_fn


def pick_backend(device_type: str, dtype: torch.dtype) -> str:
    """Which scan ``selective_scan(backend="auto")`` runs for inputs on this device/dtype."""
    if device_type == "cuda" and _mamba_ssm_scan_fn() is not None:
        return "mamba_ssm"
    compute = torch.promote_types(dtype, torch.float32)
    if device_type == "cpu" and compute in (torch.float32, torch.float64) \
            and _scan_cpp.load() is not None:
        return "kernel"
    return "torch"


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
    if backend == "auto":
        backend = pick_backend(u.device.type, u.dtype)
    if backend == "mamba_ssm":
        fn = _mamba_ssm_scan_fn()
        if fn is None:
            raise RuntimeError("backend='mamba_ssm' needs the mamba_ssm package")
        # mamba-ssm's layout is channels first: u, delta, z (B, D_in, T); B, C (B, N, T). Its
        # kernel wants delta, B, C, z in u's dtype (it computes in float32 inside) and A, D
        # in float32.
        cl = lambda t: t.to(u.dtype).transpose(1, 2)
        y, h = fn(cl(u), cl(delta), A.float(), cl(B), cl(C), D.float(),
                  z=None if z is None else cl(z), delta_bias=None, delta_softplus=False,
                  return_last_state=True)
        return y.transpose(1, 2), h
    dtype = torch.promote_types(u.dtype, torch.float32)
    with torch.autocast(device_type=u.device.type, enabled=False):
        u_, delta_, A_, D_ = (t.to(dtype) for t in (u, delta, A, D))
        B_, C_ = B.to(dtype), C.to(dtype)
        if backend == "kernel":
            # B, C and z may stay row-strided views: the kernel takes a row stride
            y, h, _ = _scan_fwd_op(u_.contiguous(), delta_.contiguous(), A_, B_, C_, D_,
                                   None if z is None else z.to(dtype), chunk_size)
        else:
            y, h = _TorchChunkedScan.apply(u_.contiguous(), delta_.contiguous(), A_,
                                           B_.contiguous(), C_.contiguous(), chunk_size)
            y = torch.addcmul(y, u_, D_)  # the skip connection D * u
            if z is not None:
                y = y * F.silu(z.to(dtype))
    return y.to(u.dtype), h


# ---------------------------------------------------------------------------------- modules
class MambaState(NamedTuple):
    """Decode state of one mixer: ``conv`` (B, d_inner, d_conv - 1), the last d_conv - 1
    pre-convolution inputs, oldest first (zeros before the start); ``ssm`` (B, d_inner, d_state),
    the recurrent state in float32. O(1) in the context length."""

    conv: torch.Tensor
    ssm: torch.Tensor


def _s4d_real_log_a(d_inner: int, d_state: int) -> torch.Tensor:
    """log(1..N) for every channel: A = -exp(A_log) = -(1..N), S4D-real. (E, N)."""
    return torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(d_inner, 1)


SCAN_FLOPS_PER_STATE = 9


class MambaMixer(nn.Module):
    """The Mamba-1 selective-SSM mixer with mamba-ssm's parameter names, shapes and init
    (paper size: 2,542,080 parameters)."""

    def __init__(self, config: MambaConfig) -> None:
        super().__init__()
        c = config
        self.config = c
        d, e, n, r = c.d_model, c.d_inner, c.d_state, c.dt_rank_value
        self.in_proj = nn.Linear(d, 2 * e, bias=False)
        # padding is applied by hand (left only), so the convolution stays causal
        self.conv1d = nn.Conv1d(e, e, c.d_conv, groups=e, bias=True)
        self.x_proj = nn.Linear(e, r + 2 * n, bias=False)
        self.dt_proj = nn.Linear(r, e, bias=True)
        self._init_dt_proj()
        # S4D-real init A = -(1..N) for every channel, stored as log so A stays negative
        self.A_log = nn.Parameter(_s4d_real_log_a(e, n))  # (E, N)
        self.D = nn.Parameter(torch.ones(e))
        self.A_log._no_weight_decay = True
        self.D._no_weight_decay = True
        self.out_proj = nn.Linear(e, d, bias=False)

    @torch.no_grad()
    def _init_dt_proj(self) -> None:
        # mamba-ssm's dt init: weight uniform +-r^-0.5; bias = softplus^-1(dt) for dt
        # log-uniform in [1e-3, 1e-1], so softplus(dt_proj(.)) starts in that range.
        r, e = self.config.dt_rank_value, self.config.d_inner
        nn.init.uniform_(self.dt_proj.weight, -r ** -0.5, r ** -0.5)
        dt = torch.exp(torch.rand(e) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        dt = dt.clamp(min=1e-4)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    @torch.no_grad()
    def reset_family_parameters(self) -> None:
        """dt_proj, A_log and D back to mamba-ssm's init (the construction's)."""
        self._init_dt_proj()
        self.A_log.copy_(_s4d_real_log_a(*self.A_log.shape))
        self.D.fill_(1.0)

    def _ssm_inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x (..., E) -> delta (..., E), B (..., N), C (..., N), A (E, N)."""
        r, n = self.config.dt_rank_value, self.config.d_state
        dt, B, C = self.x_proj(x).split([r, n, n], dim=-1)
        # softplus in float32 (as mamba-ssm's kernel does): bf16 would round small steps
        delta = F.softplus(self.dt_proj(dt).float())  # (..., E), > 0
        return delta, B, C, -torch.exp(self.A_log.float())

    def _mix(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        xi, z = self.in_proj(h).chunk(2, dim=-1)  # (B, T, E) each, views of one projection
        x = causal_conv_silu(xi, self.conv1d.weight, self.conv1d.bias)  # (B, T, E)
        delta, B, C, A = self._ssm_inputs(x)
        y, ssm = selective_scan(x, delta, A, B, C, self.D, z, self.config.chunk_size)
        return self.out_proj(y), xi, ssm  # (B, T, C)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self._mix(h)[0]  # (B, T, C)

    def prefill(self, h: torch.Tensor) -> tuple[torch.Tensor, MambaState]:
        out, xi, ssm = self._mix(h)
        k = self.config.d_conv - 1
        conv = xi.transpose(1, 2)[:, :, max(0, xi.shape[1] - k):]  # (B, E, <= k)
        conv = F.pad(conv, (k - conv.shape[-1], 0))  # zeros stand for positions before 0
        return out, MambaState(conv.contiguous(), ssm)

    def step(self, h: torch.Tensor, state: MambaState) -> tuple[torch.Tensor, MambaState]:
        xi, z = self.in_proj(h).chunk(2, dim=-1)  # (B, E) each
        window = torch.cat([state.conv, xi[:, :, None]], dim=-1)  # (B, E, d_conv)
        x = (window * self.conv1d.weight[:, 0, :]).sum(-1) + self.conv1d.bias  # (B, E)
        x = F.silu(x)
        delta, B, C, A = self._ssm_inputs(x)
        y, ssm = selective_scan_step(x, delta, A, B, C, self.D, state.ssm)  # (B, E)
        return self.out_proj(y * F.silu(z)), MambaState(window[:, :, 1:], ssm)  # (B, C)


class MambaBlock(nn.Module):
    """``x + mixer(norm(x))`` (stacking "residual") or ``mixer(x)`` (stacking "paper")."""

    def __init__(self, config: MambaConfig) -> None:
        super().__init__()
        self.residual = config.stacking == "residual"
        self.norm = nn.LayerNorm(config.d_model) if self.residual else None
        self.mixer = MambaMixer(config)
        self.n_layers = config.n_layers
        self._rescale_out_proj()

    @torch.no_grad()
    def _rescale_out_proj(self) -> None:
        if self.residual:  # mamba-ssm's rescale_prenorm_residual
            self.mixer.out_proj.weight.div_(math.sqrt(self.n_layers))

    def residual_projections(self) -> list[nn.Linear]:
        return [self.mixer.out_proj] if self.residual else []

    def mixing_flops(self, seq_len: int, causal_halved: bool = False) -> dict[str, float]:
        """The selective scan: ``SCAN_FLOPS_PER_STATE * d_inner * d_state`` per token (the
        convention of mamba-ssm's FLOP counter: discretisation, input, state update, output)."""
        d_inner, d_state = self.mixer.A_log.shape
        return {"scan": float(SCAN_FLOPS_PER_STATE * d_inner * d_state)}

    def reset_family_parameters(self) -> None:
        """The mixer's SSM parameters, and out_proj's 1/sqrt(n_layers) on top of its Linear
        init (``init_weights`` has just reset it; gpt2 then replaces it as a residual
        projection)."""
        self.mixer.reset_family_parameters()
        self._rescale_out_proj()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.residual:
            return x + self.mixer(self.norm(x))  # (B, T, C)
        return self.mixer(x)  # (B, T, C)

    def prefill(self, x: torch.Tensor) -> tuple[torch.Tensor, MambaState]:
        if self.residual:
            y, state = self.mixer.prefill(self.norm(x))
            return x + y, state
        return self.mixer.prefill(x)

    # Decode state: a MambaState (conv inputs and SSM state), see MambaState.
    def step(self, x: torch.Tensor, state: MambaState) -> tuple[torch.Tensor, MambaState]:
        if self.residual:
            y, state = self.mixer.step(self.norm(x), state)
            return x + y, state  # (B, C)
        return self.mixer.step(x, state)


class MambaLM(CausalLM):
    """The Mamba baseline: MambaBlocks in the shared shell (learned positions, tied head)."""

    config: MambaConfig

    def make_block(self, layer_idx: int) -> nn.Module:
        return MambaBlock(self.config)
