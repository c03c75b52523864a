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

The build is cached under ``$GAM_CACHE_DIR`` (default ``$XDG_CACHE_HOME/gam`` or
``~/.cache/gam``), keyed by a hash of the source, the flags, the compiler and the CPU flags, so a
different machine never loads a binary built for another instruction set. Set
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
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any

import torch

SOURCE = r"""
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <thread>
#include <vector>

namespace {

constexpr int64_t DB = 64;   // scan: channels per task, the vectorised inner loop
constexpr int64_t CB = 256;  // conv: channels per task

// exp for float that the compiler can vectorise (Cephes expf: 2^n * p(r), |r| <= ln2/2, about
// 1 ulp). Results below exp(-87.3) flush to 0, above exp(88.3) saturate to +inf.
static inline float vexp(float x) {
    const float lo = -87.3365f, hi = 88.3762f;
    // ternaries, not fmin/fmax: those have NaN rules that block vectorisation
    float xc = x < lo ? lo : x;
    xc = xc > hi ? hi : xc;
    float n = std::floor(xc * 1.44269504088896341f + 0.5f);
    float r = xc - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, sizeof(float));
    float out = p * scale;
    out = x < lo ? 0.0f : out;
    return x > hi ? std::numeric_limits<float>::infinity() : out;
}
static inline double vexp(double x) { return std::exp(x); }
template <typename T> static inline T sigmoid(T x) { return T(1) / (T(1) + vexp(-x)); }

template <typename F>
void run_tasks(int64_t n_tasks, int n_threads, int64_t scratch, F fn) {
    n_threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(n_threads, n_tasks)));
    std::atomic<int64_t> next{0};
    auto worker = [&]() {
        std::vector<char> buf(static_cast<size_t>(scratch) + 64);
        void* p = buf.data();
        size_t space = buf.size();
        void* aligned = std::align(64, static_cast<size_t>(scratch), p, space);
        for (;;) {
            int64_t i = next.fetch_add(1);
            if (i >= n_tasks) break;
            fn(i, aligned);
        }
    };
    std::vector<std::thread> pool;
    for (int w = 1; w < n_threads; ++w) pool.emplace_back(worker);
    worker();
    for (auto& th : pool) th.join();
}

// ----------------------------------------------------------------------------- selective scan
// u, delta, out: (Bsz, L, D) contiguous; At: (N, D) = A transposed; Bm, Cm: (Bsz, L, N) with row
// stride sbc; Dv: (D); z: (Bsz, L, D) with row stride sz, or null (no gate).
// out = (C.h + D u) * silu(z). h_last: (Bsz, N, D); ckpt: (Bsz, NC, N, D), the state before
// token c*K.
template <typename T>
void scan_fwd(const T* u, const T* delta, const T* At, const T* Bm, const T* Cm, int64_t sbc,
              const T* Dv, const T* z, int64_t sz, T* out, T* h_last, T* ckpt, int64_t Bsz,
              int64_t L, int64_t D, int64_t N, int64_t K, int n_threads) {
    const int64_t n_db = (D + DB - 1) / DB, NC = (L + K - 1) / K;
    run_tasks(Bsz * n_db, n_threads, (N + 3) * DB * static_cast<int64_t>(sizeof(T)),
              [=](int64_t task, void* scratch) {
        const int64_t b = task / n_db, d0 = (task % n_db) * DB, nd = std::min(DB, D - d0);
        T* h = static_cast<T*>(scratch);  // (N, DB)
        T* dt = h + N * DB;
        T* du = dt + DB;
        T* acc = du + DB;
        std::fill(h, h + N * DB, T(0));
        for (int64_t t = 0; t < L; ++t) {
            if (t % K == 0) {
                T* ck = ckpt + ((b * NC + t / K) * N) * D + d0;
                for (int64_t n = 0; n < N; ++n) std::memcpy(ck + n * D, h + n * DB, nd * sizeof(T));
            }
            const int64_t row = (b * L + t) * D + d0;
            const T* Bt = Bm + (b * L + t) * sbc;
            const T* Ct = Cm + (b * L + t) * sbc;
            for (int64_t d = 0; d < nd; ++d) {
                dt[d] = delta[row + d];
                du[d] = dt[d] * u[row + d];
                acc[d] = Dv[d0 + d] * u[row + d];
            }
            for (int64_t n = 0; n < N; ++n) {
                const T* a_row = At + n * D + d0;
                T* hn = h + n * DB;
                const T bn = Bt[n], cn = Ct[n];
#pragma omp simd
                for (int64_t d = 0; d < nd; ++d) {
                    T hv = vexp(dt[d] * a_row[d]) * hn[d] + du[d] * bn;
                    hn[d] = hv;
                    acc[d] += hv * cn;
                }
            }
            if (z) {
                const T* zt = z + (b * L + t) * sz + d0;
#pragma omp simd
                for (int64_t d = 0; d < nd; ++d) out[row + d] = acc[d] * zt[d] * sigmoid(zt[d]);
            } else {
                std::memcpy(out + row, acc, nd * sizeof(T));
            }
        }
        for (int64_t n = 0; n < N; ++n)
            std::memcpy(h_last + (b * N + n) * D + d0, h + n * DB, nd * sizeof(T));
    });
}

// dout: (Bsz, L, D); dh_last: (Bsz, N, D) or null. Outputs: du, ddelta (Bsz, L, D); dz (Bsz, L, D)
// if z; per-task partial sums dA_part (Bsz, N, D), dD_part (Bsz, D), dB_part and dC_part
// (Bsz, n_db, L, N).
template <typename T>
void scan_bwd(const T* u, const T* delta, const T* At, const T* Bm, const T* Cm, int64_t sbc,
              const T* Dv, const T* z, int64_t sz, const T* dout, const T* ckpt, const T* dh_last,
              T* du_out, T* ddelta_out, T* dz_out, T* dA_part, T* dB_part, T* dC_part,
              T* dD_part, int64_t Bsz, int64_t L, int64_t D, int64_t N, int64_t K,
              int n_threads) {
    const int64_t n_db = (D + DB - 1) / DB, NC = (L + K - 1) / K;
    const int64_t scratch = ((2 * K + 1) * N + 2 * N + 10) * DB * static_cast<int64_t>(sizeof(T));
    run_tasks(Bsz * n_db, n_threads, scratch, [=](int64_t task, void* mem) {
        const int64_t b = task / n_db, blk = task % n_db, d0 = blk * DB;
        const int64_t nd = std::min(DB, D - d0);
        T* hbuf = static_cast<T*>(mem);      // (K + 1, N, DB): state before/after each token
        T* abuf = hbuf + (K + 1) * N * DB;   // (K, N, DB): the decays exp(delta A)
        T* carry = abuf + K * N * DB;        // (N, DB): a_{t+1} dh_{t+1}
        T* dA = carry + N * DB;              // (N, DB)
        T* dt = dA + N * DB;
        T* uu = dt + DB;
        T* du = uu + DB;
        T* g = du + DB;
        T* s = g + DB;
        T* acc = s + DB;
        T* yv = acc + DB;
        T* go = yv + DB;
        T* sg = go + DB;
        T* dD = sg + DB;
        std::fill(dA, dA + N * DB, T(0));
        std::fill(dD, dD + DB, T(0));
        for (int64_t n = 0; n < N; ++n) {
            T* cn = carry + n * DB;
            if (dh_last) std::memcpy(cn, dh_last + (b * N + n) * D + d0, nd * sizeof(T));
            else std::fill(cn, cn + DB, T(0));
        }
        T* dBp = dB_part + (b * n_db + blk) * L * N;
        T* dCp = dC_part + (b * n_db + blk) * L * N;
        for (int64_t c = NC - 1; c >= 0; --c) {
            const int64_t t0 = c * K, len = std::min(K, L - t0);
            const T* ck = ckpt + ((b * NC + c) * N) * D + d0;
            for (int64_t n = 0; n < N; ++n) std::memcpy(hbuf + n * DB, ck + n * D, nd * sizeof(T));
            // recompute the chunk's states and decays
            for (int64_t j = 0; j < len; ++j) {
                const int64_t row = (b * L + t0 + j) * D + d0;
                const T* Bt = Bm + (b * L + t0 + j) * sbc;
                for (int64_t d = 0; d < nd; ++d) {
                    dt[d] = delta[row + d];
                    du[d] = dt[d] * u[row + d];
                }
                for (int64_t n = 0; n < N; ++n) {
                    const T* a_row = At + n * D + d0;
                    const T* hp = hbuf + (j * N + n) * DB;
                    T* hc = hbuf + ((j + 1) * N + n) * DB;
                    T* an = abuf + (j * N + n) * DB;
                    const T bn = Bt[n];
#pragma omp simd
                    for (int64_t d = 0; d < nd; ++d) {
                        const T a = vexp(dt[d] * a_row[d]);
                        an[d] = a;
                        hc[d] = a * hp[d] + du[d] * bn;
                    }
                }
            }
            // walk it backwards
            for (int64_t j = len - 1; j >= 0; --j) {
                const int64_t t = t0 + j, row = (b * L + t) * D + d0;
                const T* Bt = Bm + (b * L + t) * sbc;
                const T* Ct = Cm + (b * L + t) * sbc;
                for (int64_t d = 0; d < nd; ++d) {
                    dt[d] = delta[row + d];
                    uu[d] = u[row + d];
                    du[d] = dt[d] * uu[d];
                    go[d] = dout[row + d];
                    s[d] = T(0);
                    acc[d] = T(0);
                    yv[d] = Dv[d0 + d] * uu[d];
                }
                if (z) {  // out = y * silu(z): the gradient reaching y is dout * silu(z)
                    const T* zt = z + (b * L + t) * sz + d0;
#pragma omp simd
                    for (int64_t d = 0; d < nd; ++d) {
                        sg[d] = sigmoid(zt[d]);
                        g[d] = go[d] * zt[d] * sg[d];
                    }
                } else {
                    std::memcpy(g, go, nd * sizeof(T));
                }
                for (int64_t n = 0; n < N; ++n) {
                    const T* a_row = At + n * D + d0;
                    const T* hp = hbuf + (j * N + n) * DB;
                    const T* hc = hbuf + ((j + 1) * N + n) * DB;
                    const T* an = abuf + (j * N + n) * DB;
                    T* cr = carry + n * DB;
                    T* dAn = dA + n * DB;
                    const T bn = Bt[n], cn = Ct[n];
                    T sum_c = T(0), sum_b = T(0);
#pragma omp simd reduction(+ : sum_c, sum_b)
                    for (int64_t d = 0; d < nd; ++d) {
                        const T a = an[d];
                        const T dh = cr[d] + g[d] * cn;
                        sum_c += g[d] * hc[d];
                        sum_b += dh * du[d];
                        const T gda = dh * hp[d] * a;  // gradient of delta_t * A
                        acc[d] += gda * a_row[d];
                        dAn[d] += gda * dt[d];
                        s[d] += dh * bn;
                        yv[d] += hc[d] * cn;
                        cr[d] = a * dh;
                    }
                    dCp[t * N + n] = sum_c;
                    dBp[t * N + n] = sum_b;
                }
                for (int64_t d = 0; d < nd; ++d) {
                    du_out[row + d] = dt[d] * s[d] + Dv[d0 + d] * g[d];
                    ddelta_out[row + d] = acc[d] + uu[d] * s[d];
                    dD[d] += g[d] * uu[d];
                }
                if (z) {
                    const T* zt = z + (b * L + t) * sz + d0;
#pragma omp simd
                    for (int64_t d = 0; d < nd; ++d)
                        dz_out[row + d] = go[d] * yv[d] * sg[d] * (T(1) + zt[d] * (T(1) - sg[d]));
                }
            }
        }
        for (int64_t n = 0; n < N; ++n)
            std::memcpy(dA_part + (b * N + n) * D + d0, dA + n * DB, nd * sizeof(T));
        std::memcpy(dD_part + b * D + d0, dD, nd * sizeof(T));
    });
}

// ------------------------------------------------------------ causal depthwise conv (+ SiLU)
// x: (Bsz, L, E) with row stride sx; wt: (K, E) = weight transposed; out: (Bsz, L, E)
// out_t = act(bias + sum_k wt[k] x_{t-K+1+k}), zeros before the start.
template <typename T>
void conv_fwd(const T* x, int64_t sx, const T* wt, const T* bias, T* out, int64_t Bsz,
              int64_t L, int64_t E, int64_t K, int silu, int n_threads) {
    const int64_t n_cb = (E + CB - 1) / CB;
    run_tasks(Bsz * n_cb, n_threads, CB * static_cast<int64_t>(sizeof(T)),
              [=](int64_t task, void* scratch) {
        const int64_t b = task / n_cb, e0 = (task % n_cb) * CB, ne = std::min(CB, E - e0);
        T* acc = static_cast<T*>(scratch);
        for (int64_t t = 0; t < L; ++t) {
            std::memcpy(acc, bias + e0, ne * sizeof(T));
            for (int64_t k = std::max<int64_t>(0, K - 1 - t); k < K; ++k) {
                const T* xr = x + (b * L + t - K + 1 + k) * sx + e0;
                const T* wr = wt + k * E + e0;
#pragma omp simd
                for (int64_t e = 0; e < ne; ++e) acc[e] += wr[e] * xr[e];
            }
            T* o = out + (b * L + t) * E + e0;
            if (silu) {
#pragma omp simd
                for (int64_t e = 0; e < ne; ++e) o[e] = acc[e] * sigmoid(acc[e]);
            } else {
                std::memcpy(o, acc, ne * sizeof(T));
            }
        }
    });
}

// dx: (Bsz, L, E) contiguous; dw_part: (Bsz, K, E); db_part: (Bsz, E).
template <typename T>
void conv_bwd(const T* x, int64_t sx, const T* wt, const T* bias, const T* dout, T* dx,
              T* dw_part, T* db_part, int64_t Bsz, int64_t L, int64_t E, int64_t K, int silu,
              int n_threads) {
    const int64_t n_cb = (E + CB - 1) / CB;
    run_tasks(Bsz * n_cb, n_threads, (2 * K + 2) * CB * static_cast<int64_t>(sizeof(T)),
              [=](int64_t task, void* scratch) {
        const int64_t b = task / n_cb, e0 = (task % n_cb) * CB, ne = std::min(CB, E - e0);
        T* ring = static_cast<T*>(scratch);  // (K, CB): gradient of the pre-activation, t..t+K-1
        T* dw = ring + K * CB;               // (K, CB)
        T* db = dw + K * CB;
        T* acc = db + CB;
        std::fill(dw, dw + (K + 1) * CB, T(0));
        for (int64_t t = L - 1; t >= 0; --t) {
            std::memcpy(acc, bias + e0, ne * sizeof(T));
            for (int64_t k = std::max<int64_t>(0, K - 1 - t); k < K; ++k) {
                const T* xr = x + (b * L + t - K + 1 + k) * sx + e0;
                const T* wr = wt + k * E + e0;
#pragma omp simd
                for (int64_t e = 0; e < ne; ++e) acc[e] += wr[e] * xr[e];
            }
            T* dp = ring + (t % K) * CB;
            const T* go = dout + (b * L + t) * E + e0;
            if (silu) {
#pragma omp simd
                for (int64_t e = 0; e < ne; ++e) {
                    const T sgm = sigmoid(acc[e]);
                    dp[e] = go[e] * sgm * (T(1) + acc[e] * (T(1) - sgm));
                }
            } else {
                std::memcpy(dp, go, ne * sizeof(T));
            }
            for (int64_t e = 0; e < ne; ++e) db[e] += dp[e];
            for (int64_t k = std::max<int64_t>(0, K - 1 - t); k < K; ++k) {
                const T* xr = x + (b * L + t - K + 1 + k) * sx + e0;
                T* dwk = dw + k * CB;
#pragma omp simd
                for (int64_t e = 0; e < ne; ++e) dwk[e] += dp[e] * xr[e];
            }
            // dx_t = sum_k wt[k] dpre_{t+K-1-k}, all of which are in the ring by now
            T* o = dx + (b * L + t) * E + e0;
            std::fill(o, o + ne, T(0));
            for (int64_t k = 0; k < K; ++k) {
                const int64_t tt = t + K - 1 - k;
                if (tt >= L) continue;
                const T* dpk = ring + (tt % K) * CB;
                const T* wr = wt + k * E + e0;
#pragma omp simd
                for (int64_t e = 0; e < ne; ++e) o[e] += wr[e] * dpk[e];
            }
        }
        for (int64_t k = 0; k < K; ++k)
            std::memcpy(dw_part + (b * K + k) * E + e0, dw + k * CB, ne * sizeof(T));
        std::memcpy(db_part + b * E + e0, db, ne * sizeof(T));
    });
}

}  // namespace

extern "C" {
#define GAM_EXPORT(SUFFIX, T)                                                                    \
void gam_scan_fwd_##SUFFIX(const T* u, const T* delta, const T* At, const T* Bm, const T* Cm,   \
                           int64_t sbc, const T* Dv, const T* z, int64_t sz, T* out, T* h_last,  \
                           T* ckpt, int64_t Bsz, int64_t L, int64_t D, int64_t N, int64_t K,     \
                           int n_threads) {                                                      \
    scan_fwd<T>(u, delta, At, Bm, Cm, sbc, Dv, z, sz, out, h_last, ckpt, Bsz, L, D, N, K,       \
                n_threads);                                                                      \
}                                                                                                 \
void gam_scan_bwd_##SUFFIX(const T* u, const T* delta, const T* At, const T* Bm, const T* Cm,   \
                           int64_t sbc, const T* Dv, const T* z, int64_t sz, const T* dout,     \
                           const T* ckpt, const T* dh_last, T* du, T* ddelta, T* dz,            \
                           T* dA_part, T* dB_part, T* dC_part, T* dD_part, int64_t Bsz,         \
                           int64_t L, int64_t D, int64_t N, int64_t K, int n_threads) {         \
    scan_bwd<T>(u, delta, At, Bm, Cm, sbc, Dv, z, sz, dout, ckpt, dh_last, du, ddelta, dz,      \
                dA_part, dB_part, dC_part, dD_part, Bsz, L, D, N, K, n_threads);                \
}                                                                                                 \
void gam_conv_fwd_##SUFFIX(const T* x, int64_t sx, const T* wt, const T* bias, T* out,          \
                           int64_t Bsz, int64_t L, int64_t E, int64_t K, int silu,              \
                           int n_threads) {                                                      \
    conv_fwd<T>(x, sx, wt, bias, out, Bsz, L, E, K, silu, n_threads);                           \
}                                                                                                 \
void gam_conv_bwd_##SUFFIX(const T* x, int64_t sx, const T* wt, const T* bias, const T* dout,   \
                           T* dx, T* dw_part, T* db_part, int64_t Bsz, int64_t L, int64_t E,    \
                           int64_t K, int silu, int n_threads) {                                \
    conv_bwd<T>(x, sx, wt, bias, dout, dx, dw_part, db_part, Bsz, L, E, K, silu, n_threads);   \
}
GAM_EXPORT(f32, float)
GAM_EXPORT(f64, double)
int gam_scan_block() { return static_cast<int>(DB); }
}
"""

BASE_FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-pthread", "-fopenmp-simd",
              "-fno-math-errno", "-fno-trapping-math"]
# -march=native first; a compiler that does not know it still gets a portable build
ARCH_FLAGS = [["-march=native"], []]

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
_error: str | None = None


def cache_dir() -> Path:
    root = os.environ.get("GAM_CACHE_DIR")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "gam"


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


def _build(cxx: str) -> Path:
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True,
                             timeout=60).stdout
    errors = []
    for arch in ARCH_FLAGS:
        flags = BASE_FLAGS + arch
        key = hashlib.sha256("\n".join([SOURCE, " ".join(flags), version, _cpu_signature(),
                                        sys.platform]).encode()).hexdigest()[:16]
        target = cache_dir() / "scan_kernel" / key / "libgam_scan.so"
        if target.exists():
            return target
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError:  # read-only home: build in the temp dir instead
            target = Path(tempfile.gettempdir()) / f"gam-{os.getuid()}" / key / "libgam_scan.so"
            if target.exists():
                return target
            target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            src = Path(tmp) / "scan.cpp"
            src.write_text(SOURCE)
            out = Path(tmp) / "libgam_scan.so"
            proc = subprocess.run([cxx, *flags, str(src), "-o", str(out)], capture_output=True,
                                  text=True, timeout=600)
            if proc.returncode == 0:
                os.replace(out, target)  # atomic: concurrent builders never see half a file
                return target
            errors.append(proc.stderr[-2000:])
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
            lib = ctypes.CDLL(str(_build(cxx)))
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
