
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
