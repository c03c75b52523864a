"""CPU kernels for the Mamba mixer, compiled with the system C++ compiler at first use.

- ``scan_forward`` / ``scan_backward``: the selective scan with the skip term D u and the gate
  silu(z) fused in (what mamba-ssm's CUDA kernel does);
- ``conv_forward`` / ``conv_backward``: silu(causal depthwise conv over time), reading its input
  in place from the in_proj output (a row-strided view).

Why a kernel: a pure-PyTorch scan has to materialise (B, T, d_inner, d_state) tensors (about
25k floats per token per layer at paper size) several times, forward and backward, and is
memory-bandwidth bound. This kernel keeps the state of 64 channels (d_state x 64 floats) in L1
and walks the sequence once; nothing of size (B, T, d_inner, d_state) ever exists. The conv
kernel replaces transpose + pad + conv1d + transpose + silu (and their backward) by one pass.

Why ctypes and not ``torch.utils.cpp_extension``: the kernels only need raw pointers, so they
are plain C++ with no torch headers and build in a couple of seconds (a torch extension takes
minutes on 2 cores and needs ninja). Threads are ``std::thread`` (as many as
``torch.get_num_threads()``) so that no second OpenMP runtime is loaded next to torch's.

The source is ``csrc/scan_kernel.cpp`` (package data). The build is cached under the project's
one cache root (``gam.data._files.default_cache_dir``: ``$GAM_CACHE_DIR``, else
``$XDG_CACHE_HOME/gam`` or ``~/.cache/gam``), keyed by a hash of the source, the flags, the
compiler and the CPU flags, so a different machine never loads a binary built for another
instruction set. A library is loaded only from a folder private to this user (owned by them,
writable by no one else, as is every folder above it but a sticky one like /tmp) and only if its
sha256 is the one recorded beside it when it was built; otherwise it is built in a fresh private
temporary folder for the process (with a warning saying why). Set
``GAM_SCAN_KERNEL=0`` to disable the kernels (the PyTorch paths are then used). If no compiler
is found or the build fails, ``load()`` returns None and warns once.

Recurrence (per batch row b, channel d, state n; a_t = exp(delta_t A), x_t = delta_t u_t B_t)::

    h_t = a_t * h_{t-1} + x_t,   y_t = sum_n C_t[n] h_t[n] + D u_t,   out_t = y_t silu(z_t)

Backward, with dh_t the total gradient reaching h_t and g_t = dout_t silu(z_t)::

    dh_t  = C_t g_t + a_{t+1} dh_{t+1}
    d(delta_t A) = dh_t h_{t-1} a_t      -> ddelta, dA
    dx_t  = dh_t                          -> du, ddelta, dB
    dC_t  = sum_d g_t h_t,  dD = sum g_t u_t,  dz_t = dout_t y_t silu'(z_t)

Only decays a <= 1 are multiplied (no exp(-cumsum) division), so large dt |A| cannot overflow.
The forward pass stores the state at the start of every chunk of ``chunk`` tokens
(B, T/chunk, d_state, d_inner: tiny); the backward pass recomputes one chunk of states and
decays at a time into a per-thread buffer (2 x chunk x d_state x 64 floats, in L2) and walks it
backwards, so memory stays O(inputs).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import warnings
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from gam.files import atomic_write_bytes, default_cache_dir

# The C++ source, shipped as package data (csrc/scan_kernel.cpp): compiled as is.
SOURCE = (resources.files("gam.models.ops") / "csrc" / "scan_kernel.cpp").read_text()

BASE_FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-pthread", "-fopenmp-simd",
              "-fno-math-errno", "-fno-trapping-math"]
# -march=native first; a compiler that does not know it still gets a portable build
ARCH_FLAGS = [["-march=native"], []]

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
_error: str | None = None


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_signature() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
        for line in text.splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.machine() + platform.processor()


LIBRARY = "libgam_scan.so"
DIGEST_SUFFIX = ".sha256"  # beside the library: the sha256 of the file that was built


def build_key(flags: list[str], compiler_version: str) -> str:
    """The cache key of a build: the source, the flags, the compiler and the CPU."""
    return hashlib.sha256("\n".join([SOURCE, " ".join(flags), compiler_version,
                                     _cpu_signature(), sys.platform]).encode()).hexdigest()[:16]


def cache_folders(key: str) -> list[Path]:
    """Where the build of ``key`` is cached, in order of preference: the cache root's
    ``scan_kernel/<key>``, then ``$TMPDIR/gam-<uid>/<key>`` (a read-only home)."""
    return [default_cache_dir() / "scan_kernel" / key,
            Path(tempfile.gettempdir()) / f"gam-{os.getuid()}" / key]


def not_private_reason(folder: Path) -> str | None:
    """Why a library in ``folder`` could have been put there by someone else (None if it
    cannot): the folder and its parent must be this user's and writable by no one else; every
    folder above must belong to this user or root and be writable by no one else unless it is
    sticky (as /tmp: others cannot rename what is in it)."""
    uid = os.getuid()
    try:
        path = folder.resolve(strict=True)  # what is checked is what is loaded
        chain = [path, *path.parents]
        for depth, part in enumerate(chain):
            st = part.stat()
            if depth < 2:  # the key folder and the one holding it are the cache's own
                if st.st_uid != uid:
                    return f"{part} belongs to uid {st.st_uid}, not to this user ({uid})"
                if st.st_mode & 0o022:
                    return f"{part} is writable by others (mode {st.st_mode & 0o777:o})"
            elif st.st_uid not in (uid, 0):
                return f"{part} belongs to uid {st.st_uid}, not to this user or root"
            elif st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
                return f"{part} is writable by others (mode {st.st_mode & 0o777:o})"
    except (OSError, RuntimeError) as exc:  # missing, unreadable, a symlink loop
        return f"{folder} cannot be checked ({exc})"
    return None


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def verified_library(folder: Path) -> Path | None:
    """``folder``'s library if it is the file that was built there (its sha256 is the one
    recorded beside it at build time), else None."""
    library, digest = folder / LIBRARY, folder / (LIBRARY + DIGEST_SUFFIX)
    try:
        if library.is_file() and digest.read_text().strip() == _sha256(library):
            return library
    except OSError:
        pass
    return None


def _private_folder(folder: Path) -> str | None:
    """Create ``folder`` (and the one holding it) private to this user where missing; why it
    cannot hold the library, or None."""
    try:
        folder.parent.parent.mkdir(parents=True, exist_ok=True)
        folder.parent.mkdir(mode=0o700, exist_ok=True)
        folder.mkdir(mode=0o700, exist_ok=True)
    except OSError as exc:
        return f"{folder} cannot be created ({exc.strerror or exc})"
    return not_private_reason(folder)


def _compile(cxx: str, flags: list[str], folder: Path) -> tuple[Path | None, str]:
    """Build the library into ``folder`` (through a temporary file, then its sha256 beside
    it); (the library, "") or (None, the compiler's errors)."""
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        src = Path(tmp) / "scan.cpp"
        src.write_text(SOURCE)
        out = Path(tmp) / LIBRARY
        proc = subprocess.run([cxx, *flags, str(src), "-o", str(out)], capture_output=True,
                              text=True, timeout=600)
        if proc.returncode != 0:
            return None, proc.stderr[-2000:]
        digest = _sha256(out)
        target = folder / LIBRARY
        os.replace(out, target)  # atomic: concurrent builders never see half a file
        atomic_write_bytes(folder / (LIBRARY + DIGEST_SUFFIX), (digest + "\n").encode())
        return target, ""


def _build(cxx: str) -> tuple[Path, Path | None]:
    """(the library to load, a folder to remove once it is loaded or None).

    A library is loaded only from a folder private to this user and only if it is the file
    built there (:func:`verified_library`); when no cache folder is private, it is built in a
    fresh private temporary folder (a warning names why)."""
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True,
                             timeout=60).stdout
    errors: list[str] = []
    refused: list[str] = []
    for arch in ARCH_FLAGS:
        flags = BASE_FLAGS + arch
        for folder in cache_folders(build_key(flags, version)):
            reason = _private_folder(folder)
            if reason is not None:
                refused.append(reason)
                continue
            library = verified_library(folder)
            if library is not None:
                return library, None
            try:
                library, error = _compile(cxx, flags, folder)
            except OSError as exc:  # e.g. a full or read-only cache: the next folder
                refused.append(f"{folder}: {exc}")
                continue
            if library is not None:
                return library, None
            errors.append(error)
            break  # the compiler failed: the next flags, not the next folder
        else:
            fresh = Path(tempfile.mkdtemp(prefix="gam-scan-"))  # 0700: this user's only
            warnings.warn(f"Mamba CPU scan kernel: no private cache folder ({refused[-1]}); "
                          f"building it in {fresh} for this process", RuntimeWarning,
                          stacklevel=3)
            library, error = _compile(cxx, flags, fresh)
            if library is not None:
                return library, fresh
            shutil.rmtree(fresh, ignore_errors=True)
            errors.append(error)
    raise RuntimeError("compiling the scan kernel failed:\n" + "\n".join(errors))


def load() -> ctypes.CDLL | None:
    """The compiled kernel library, building it on first use; None if unavailable."""
    global _lib, _tried, _error
    if _tried:
        return _lib
    with _lock:
        if _tried:
            return _lib
        try:
            if os.environ.get("GAM_SCAN_KERNEL", "1") == "0":
                raise RuntimeError("disabled by GAM_SCAN_KERNEL=0")
            cxx = _compiler()
            if cxx is None:
                raise RuntimeError("no C++ compiler found (set CXX)")
            path, temporary = _build(cxx)
            try:
                lib = ctypes.CDLL(str(path))
            finally:  # a loaded library stays mapped: its one-process folder can go
                if temporary is not None:
                    shutil.rmtree(temporary, ignore_errors=True)
            p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
            signatures = {
                "scan_fwd": [p] * 5 + [i64] + [p] * 2 + [i64] + [p] * 3 + [i64] * 5 + [i32],
                "scan_bwd": [p] * 5 + [i64] + [p] * 2 + [i64] + [p] * 10 + [i64] * 5 + [i32],
                "conv_fwd": [p, i64] + [p] * 3 + [i64] * 4 + [i32, i32],
                "conv_bwd": [p, i64] + [p] * 6 + [i64] * 4 + [i32, i32],
            }
            for suffix in ("f32", "f64"):
                for kind, argtypes in signatures.items():
                    fn = getattr(lib, f"gam_{kind}_{suffix}")
                    fn.argtypes = argtypes
                    fn.restype = None
            lib.gam_scan_block.restype = i32
            _lib = lib
        except Exception as exc:  # any failure means "use the PyTorch scan"
            _error = f"{type(exc).__name__}: {exc}"
            if os.environ.get("GAM_SCAN_KERNEL", "1") != "0":
                warnings.warn(f"Mamba CPU scan kernel unavailable, using the slower PyTorch scan "
                              f"({_error})", RuntimeWarning, stacklevel=2)
        _tried = True
        return _lib


def unavailable_reason() -> str | None:
    """Why ``load()`` returned None (None if it has not been tried or succeeded)."""
    return _error


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _fn(kind: str, dtype: torch.dtype) -> Any:
    lib = load()
    if lib is None:
        raise RuntimeError(f"the scan kernel is unavailable: {_error}")
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"the scan kernel takes float32 or float64, got {dtype}")
    return getattr(lib, f"gam_{kind}_{'f32' if dtype == torch.float32 else 'f64'}")


def row_stride(t: torch.Tensor) -> int | None:
    """Stride between consecutive tokens of a (B, T, X) tensor whose rows are dense (last
    stride 1, batch stride T * row stride), e.g. one half of a chunked projection; else None."""
    if t.dim() != 3 or t.stride(2) != 1 or t.stride(0) != t.shape[1] * t.stride(1):
        return None
    return t.stride(1)


def _rows(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    stride = row_stride(t)
    if stride is None:
        t = t.contiguous()
        stride = t.shape[-1]
    return t, stride


def scan_forward(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                 C: torch.Tensor, D: torch.Tensor, z: torch.Tensor | None, chunk: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """out = (C.h + D u) * silu(z) (no gate if z is None) (B, T, D_in), the final state
    (B, D_in, N) and the chunk checkpoints. u, delta contiguous; B, C, z may be row-strided
    views; one dtype (float32 or float64)."""
    Bsz, T, Din = u.shape
    N = A.shape[1]
    At = A.t().contiguous()  # (N, D_in)
    B, sbc = _rows(B)
    C, sbc_c = _rows(C)
    if sbc_c != sbc:
        B, C, sbc = B.contiguous(), C.contiguous(), N
    z, sz = _rows(z) if z is not None else (None, 0)
    out = torch.empty_like(u)
    h_last = u.new_empty(Bsz, N, Din)
    ckpt = u.new_empty(Bsz, -(-T // chunk), N, Din)
    _fn("scan_fwd", u.dtype)(_ptr(u), _ptr(delta), _ptr(At), _ptr(B), _ptr(C), sbc, _ptr(D),
                             _ptr(z), sz, _ptr(out), _ptr(h_last), _ptr(ckpt), Bsz, T, Din, N,
                             chunk, torch.get_num_threads())
    return out, h_last.transpose(1, 2), ckpt


def scan_backward(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                  C: torch.Tensor, D: torch.Tensor, z: torch.Tensor | None, ckpt: torch.Tensor,
                  dout: torch.Tensor, dh_last: torch.Tensor | None, chunk: int
                  ) -> tuple[torch.Tensor | None, ...]:
    """Gradients (du, ddelta, dA, dB, dC, dD, dz) of ``scan_forward``; dh_last (B, D_in, N)
    or None; dz is None without a gate."""
    Bsz, T, Din = u.shape
    N = A.shape[1]
    n_db = -(-Din // int(load().gam_scan_block()))
    At = A.t().contiguous()
    B, sbc = _rows(B)
    C, sbc_c = _rows(C)
    if sbc_c != sbc:
        B, C, sbc = B.contiguous(), C.contiguous(), N
    z, sz = _rows(z) if z is not None else (None, 0)
    dh = None if dh_last is None else dh_last.transpose(1, 2).contiguous()  # (B, N, D_in)
    dout = dout.contiguous()  # keep references: the pointers must outlive the call
    du, ddelta = torch.empty_like(u), torch.empty_like(u)
    dz = torch.empty_like(u) if z is not None else None
    dA_part = u.new_empty(Bsz, N, Din)
    dB_part = u.new_empty(Bsz, n_db, T, N)
    dC_part = u.new_empty(Bsz, n_db, T, N)
    dD_part = u.new_empty(Bsz, Din)
    _fn("scan_bwd", u.dtype)(_ptr(u), _ptr(delta), _ptr(At), _ptr(B), _ptr(C), sbc, _ptr(D),
                             _ptr(z), sz, _ptr(dout), _ptr(ckpt), _ptr(dh), _ptr(du),
                             _ptr(ddelta), _ptr(dz), _ptr(dA_part), _ptr(dB_part),
                             _ptr(dC_part), _ptr(dD_part), Bsz, T, Din, N, chunk,
                             torch.get_num_threads())
    return (du, ddelta, dA_part.sum(0).t(), dB_part.sum(1), dC_part.sum(1), dD_part.sum(0), dz)


def conv_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, silu: bool
                 ) -> torch.Tensor:
    """Causal depthwise conv over time (+ SiLU): x (B, T, E), possibly a row-strided view;
    weight (E, 1, K); bias (E,). Returns (B, T, E) contiguous."""
    x, sx = _rows(x)
    Bsz, T, E = x.shape
    K = weight.shape[-1]
    wt = weight.reshape(E, K).t().contiguous()  # (K, E)
    bias = bias.contiguous()
    out = x.new_empty(Bsz, T, E)
    _fn("conv_fwd", x.dtype)(_ptr(x), sx, _ptr(wt), _ptr(bias), _ptr(out), Bsz, T, E, K,
                             int(silu), torch.get_num_threads())
    return out


def conv_backward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, dout: torch.Tensor,
                  silu: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dx, dweight, dbias) of ``conv_forward``."""
    x, sx = _rows(x)
    Bsz, T, E = x.shape
    K = weight.shape[-1]
    wt = weight.reshape(E, K).t().contiguous()
    bias = bias.contiguous()
    dout = dout.contiguous()
    dx = x.new_empty(Bsz, T, E)
    dw_part = x.new_empty(Bsz, K, E)
    db_part = x.new_empty(Bsz, E)
    _fn("conv_bwd", x.dtype)(_ptr(x), sx, _ptr(wt), _ptr(bias), _ptr(dout), _ptr(dx),
                             _ptr(dw_part), _ptr(db_part), Bsz, T, E, K, int(silu),
                             torch.get_num_threads())
    return dx, dw_part.sum(0).t().reshape(E, 1, K), db_part.sum(0)
