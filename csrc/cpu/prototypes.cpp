// C++ CPU backend of the prototype-assignment ops (docs/DESIGN.md "Ops contract"; method:
// /work/shared/docs/aahr-method.md 2.5 and the prototype loss of section 3, after SwAV,
// Caron et al. 2020).
//
// sinkhorn: SwAV's Sinkhorn-Knopp on Q = exp(S / eps)^T (K x N), in the log domain with dual
//   potentials. Each SwAV iteration first normalises every prototype's mass over the N samples to
//   1/K, then every sample's mass over the K prototypes to 1/N; finally Q * N. With
//   L = S / eps and log Q_bk = L_bk + u_k + v_b the iterations are
//     u_k = -log K - logsumexp_b(L_bk + v_b),   v_b = -log N - logsumexp_k(L_bk + u_k)
//   (the global normalisation and previous potentials cancel out; L is first shifted by its column
//   maxima, which the first column step absorbs), and the returned codes are
//   codes_bk = exp(L_bk + u_k + v_b + log N) = softmax_k(L_bk + u_k): rows sum to 1.
//   When every factor is within exp(-G) of 1 (scaling_range below; always so for cosine scores at
//   SwAV's eps), a step runs exp-free on P = exp(L) (computed once) and the scaling vectors
//   a_b = exp(v_b - max v), c_k = exp(u_k - max u): a matrix-vector product instead of one exp per
//   element, the same sums in exact arithmetic; otherwise the log-domain step runs.
//   With n_iters = 0 the codes are N * exp(L - logsumexp_all(L)). Only the first `rows_out`
//   rows are returned (queue rows take part in the normalisation but their codes are not needed).
//
// swapped-prediction loss: S_v = x_v C^T, S_t = x_t C^T (queued features append rows to the
//   Sinkhorn problem of their modality), q_v, q_t = codes (no gradient), p = softmax(S / tau),
//     loss = -w/B sum_b [ sum_k q_t,bk log p_v,bk + sum_k q_v,bk log p_t,bk ]
//   Its gradient w.r.t. the scores is closed form and is computed in the forward pass:
//     dS_v,b = w/(B tau) (p_v,b * sum_k q_t,bk - q_t,b)   (same for t with q_v)
//   so the backward is two GEMMs: dX = dS C, dC = dS_v^T x_v + dS_t^T x_t.

#include <torch/library.h>

#include <algorithm>
#include <array>
#include <vector>

#include "d2_common.h"

namespace aahr_fast {
namespace d2 {
namespace {

using at::Tensor;

template <typename scalar_t>
using Vec = at::vec::Vectorized<scalar_t>;

// logsumexp guard as in torch.logsumexp: an all -inf set gives -inf, not NaN.
template <typename scalar_t>
inline scalar_t finite_or_zero(scalar_t m) {
  return std::isinf(m) ? scalar_t(0) : m;
}

// Row step for rows [r0, r1) of L (N x K): lse_b = logsumexp_k(L_bk + u_k). When `codes` is given,
// writes softmax_k(L_bk + u_k) into codes row b instead. `tmp` holds K scratch values.
template <typename scalar_t>
void row_step(const scalar_t* L, const scalar_t* u, int64_t K, int64_t r0, int64_t r1,
              scalar_t* lse_out, scalar_t* codes, scalar_t* tmp) {
  using V = Vec<scalar_t>;
  for (int64_t b = r0; b < r1; ++b) {
    const scalar_t* row = L + b * K;
    at::vec::map2([](V a, V c) { return a + c; }, tmp, row, u, K);
    const scalar_t m = finite_or_zero(row_max(tmp, K));
    scalar_t* dst = codes ? codes + b * K : tmp;
    exp_affine(dst, tmp, K, scalar_t(1), -m);
    const scalar_t s = row_sum(dst, K);
    if (lse_out) lse_out[b] = m + std::log(s);
    if (codes) {
      const V inv(scalar_t(1) / s);
      at::vec::map([inv](V x) { return x * inv; }, dst, dst, K);
    }
  }
}

// Column step: u_k = -log K - logsumexp_b(L_bk + v_b) for k in [k0, k1), all N rows.
// With a finite `shift` (an upper bound of L_bk + v_b whose gap to every column's true maximum is
// small enough that exp cannot underflow to 0) one pass suffices; otherwise (shift = NaN) the
// exact two-pass max-then-sum is used.
template <typename scalar_t>
void col_step(const scalar_t* L, const scalar_t* v, int64_t N, int64_t K, int64_t k0, int64_t k1,
              scalar_t shift, scalar_t* u, scalar_t* m, scalar_t* s) {
  using V = Vec<scalar_t>;
  const scalar_t ninf = -std::numeric_limits<scalar_t>::infinity();
  const bool one_pass = !std::isnan(shift);
  if (one_pass) {
    std::fill(m + k0, m + k1, shift);
  } else {
    std::fill(m + k0, m + k1, ninf);
    for (int64_t b = 0; b < N; ++b) {  // column maxima (NaN propagates)
      const scalar_t* row = L + b * K;
      const V vb(v[b]);
      int64_t k = k0;
      for (; k + V::size() <= k1; k += V::size())
        at::vec::maximum(V::loadu(m + k), V::loadu(row + k) + vb).store(m + k);
      for (; k < k1; ++k) {
        const scalar_t x = row[k] + v[b];
        m[k] = (std::isnan(x) || x > m[k]) ? x : m[k];
      }
    }
    for (int64_t k = k0; k < k1; ++k) m[k] = std::isnan(m[k]) ? m[k] : finite_or_zero(m[k]);
  }
  std::fill(s + k0, s + k1, scalar_t(0));
  for (int64_t b = 0; b < N; ++b) {  // sums of exp
    const scalar_t* row = L + b * K;
    const V vb(v[b]);
    int64_t k = k0;
    for (; k + V::size() <= k1; k += V::size())
      (V::loadu(s + k) + (V::loadu(row + k) + vb - V::loadu(m + k)).exp()).store(s + k);
    for (; k < k1; ++k) s[k] += std::exp(row[k] + v[b] - m[k]);
  }
  const scalar_t logK = std::log(scalar_t(K));
  for (int64_t k = k0; k < k1; ++k) u[k] = -logK - (m[k] + std::log(s[k]));
}

// Largest gap (in log units) between a one-pass shift and a column's true maximum that still keeps
// exp() of the column's largest term far above the underflow threshold (exp(-87) for float).
template <typename scalar_t>
constexpr scalar_t max_shift_gap() {
  return sizeof(scalar_t) == 4 ? scalar_t(60) : scalar_t(600);
}

// Largest log-range for the scaling (exp-free) steps below: every factor (P_bk = exp(L_bk), a_b =
// exp(v_b - max v), c_k = exp(u_k - max u)) is >= exp(-G), so every product term is >= exp(-2G) and
// stays a normal number (float: exp(-80) > FLT_MIN = exp(-87.3); double: exp(-600) > exp(-708)).
// Within these ranges the scaling steps compute the same sums as the log-domain ones without one
// exp per element; outside them (or with NaN / inf anywhere) the log-domain steps run.
template <typename scalar_t>
constexpr scalar_t scaling_range() {
  return sizeof(scalar_t) == 4 ? scalar_t(40) : scalar_t(300);
}

// (max, max - min) of x[0, n); range = NaN when any entry is NaN or infinite.
template <typename scalar_t>
std::pair<scalar_t, scalar_t> max_and_range(const scalar_t* x, int64_t n) {
  scalar_t hi = -std::numeric_limits<scalar_t>::infinity(), lo = -hi;
  for (int64_t i = 0; i < n; ++i) {
    if (!std::isfinite(x[i])) return {x[i], std::numeric_limits<scalar_t>::quiet_NaN()};
    hi = x[i] > hi ? x[i] : hi;
    lo = x[i] < lo ? x[i] : lo;
  }
  return {hi, hi - lo};
}

// Scaling column step for k in [k0, k1): u_k = -log K - vmax - log sum_b P_bk a_b, with
// a_b = exp(v_b - vmax) precomputed (the log-domain col_step without exponentials).
template <typename scalar_t>
void col_step_scaled(const scalar_t* P, const scalar_t* a, scalar_t vmax, int64_t N, int64_t K,
                     int64_t k0, int64_t k1, scalar_t* u, scalar_t* s) {
  using V = Vec<scalar_t>;
  std::fill(s + k0, s + k1, scalar_t(0));
  for (int64_t b = 0; b < N; ++b) {
    const scalar_t* row = P + b * K;
    const V ab(a[b]);
    int64_t k = k0;
    for (; k + V::size() <= k1; k += V::size())
      at::vec::fmadd(V::loadu(row + k), ab, V::loadu(s + k)).store(s + k);
    for (; k < k1; ++k) s[k] += row[k] * a[b];
  }
  const scalar_t logK = std::log(scalar_t(K));
  for (int64_t k = k0; k < k1; ++k) u[k] = -logK - vmax - std::log(s[k]);
}

// Scaling row step for rows [r0, r1), c_k = exp(u_k - umax) precomputed: either
// v_b = -log N - umax - log sum_k P_bk c_k, or (codes given) codes_b = P_b * c / sum_k P_bk c_k,
// which is softmax_k(L_bk + u_k).
template <typename scalar_t>
void row_step_scaled(const scalar_t* P, const scalar_t* c, scalar_t umax, int64_t K, int64_t N,
                     int64_t r0, int64_t r1, scalar_t* v, scalar_t* codes) {
  using V = Vec<scalar_t>;
  const scalar_t logN = std::log(scalar_t(N));
  for (int64_t b = r0; b < r1; ++b) {
    const scalar_t* row = P + b * K;
    if (codes) {
      scalar_t* dst = codes + b * K;
      at::vec::map2([](V x, V y) { return x * y; }, dst, row, c, K);
      const V inv(scalar_t(1) / row_sum(dst, K));
      at::vec::map([inv](V x) { return x * inv; }, dst, dst, K);
    } else {
      v[b] = -logN - umax - std::log(row_dot(row, c, K));
    }
  }
}

// Wide-range path (some (S - max_col S) / eps below -G, so some entry of P = exp(L) would be 0 or subnormal):
// the reference's iterations on materialised log-codes W (N x K, the caller's scratch), in its order of
// operations: W = S / eps - logsumexp_all(S / eps); per iteration each prototype column of W minus its
// logsumexp and log K, then each sample row minus its logsumexp and log N; codes = exp(W + log N) (written
// as the row softmax). Dual potentials would cancel numbers of size |S| / eps here (scores ~1e4 at
// eps = 0.1: up to ~1e-4 relative error in the codes, ~1e-3 in the loss gradients); on W the entries
// that matter stay O(1). All of S / eps is finite when this runs.
template <typename scalar_t>
void sinkhorn_logcodes(const scalar_t* S, int64_t N, int64_t K, scalar_t e, int64_t n_iters, int64_t rows_out,
                       scalar_t* codes, scalar_t* W, int64_t col_grain, int64_t row_grain) {
  using V = Vec<scalar_t>;
  at::vec::map([e](V x) { return x / V(e); }, W, S, N * K);
  const scalar_t m = row_max(W, N * K);
  scalar_t total = 0;
  {
    std::vector<scalar_t> ex(K);
    for (int64_t b = 0; b < N; ++b) {
      exp_affine(ex.data(), W + b * K, K, scalar_t(1), -m);
      total += row_sum(ex.data(), K);
    }
  }
  const scalar_t g = m + std::log(total);
  at::vec::map([g](V x) { return x - V(g); }, W, W, N * K);
  const scalar_t logN = std::log(scalar_t(N)), logK = std::log(scalar_t(K));
  std::vector<scalar_t> c(K), cs(K);
  for (int64_t it = 0; it < n_iters; ++it) {
    // c_k = logsumexp_b W_bk (two passes: column maxima, then sums of exp). c_k is kept apart from log K:
    // a dominated column has c_k ~ -|S| / eps, and (W - c_k) is exact near its maximum while W + (-log K - c_k)
    // would round -log K - c_k at that magnitude (measured: 4e-5 code error at scores 1e4).
    at::parallel_for(0, K, col_grain, [&](int64_t k0, int64_t k1) {
      scalar_t* m = c.data();
      scalar_t* s = cs.data();
      std::fill(m + k0, m + k1, -std::numeric_limits<scalar_t>::infinity());
      std::fill(s + k0, s + k1, scalar_t(0));
      for (int64_t b = 0; b < N; ++b) {
        const scalar_t* row = W + b * K;
        int64_t k = k0;
        for (; k + V::size() <= k1; k += V::size()) at::vec::maximum(V::loadu(m + k), V::loadu(row + k)).store(m + k);
        for (; k < k1; ++k) m[k] = row[k] > m[k] ? row[k] : m[k];
      }
      for (int64_t b = 0; b < N; ++b) {
        const scalar_t* row = W + b * K;
        int64_t k = k0;
        for (; k + V::size() <= k1; k += V::size())
          (V::loadu(s + k) + (V::loadu(row + k) - V::loadu(m + k)).exp()).store(s + k);
        for (; k < k1; ++k) s[k] += std::exp(row[k] - m[k]);
      }
      for (int64_t k = k0; k < k1; ++k) m[k] = m[k] + std::log(s[k]);
    });
    const bool last = it + 1 == n_iters;
    at::parallel_for(0, last ? rows_out : N, row_grain, [&](int64_t r0, int64_t r1) {
      std::vector<scalar_t> z(K), ex(K);
      const V vlk(logK);
      for (int64_t b = r0; b < r1; ++b) {
        scalar_t* row = W + b * K;
        at::vec::map2([vlk](V a, V cc) { return (a - cc) - vlk; }, z.data(), row, c.data(), K);
        const scalar_t zm = row_max(z.data(), K);
        exp_affine(ex.data(), z.data(), K, scalar_t(1), -zm);
        const scalar_t se = row_sum(ex.data(), K);
        if (last) {  // codes = exp(W' + log N) = softmax_k(z): rows sum to 1
          const V inv(scalar_t(1) / se);
          at::vec::map([inv](V x) { return x * inv; }, codes + b * K, ex.data(), K);
        } else {
          const V r(zm + std::log(se)), vln(logN);
          at::vec::map([r, vln](V x) { return (x - r) - vln; }, row, z.data(), K);
        }
      }
    });
  }
}

// Sinkhorn codes of the first `rows_out` rows of S (N x K, contiguous) into `codes`
// (rows_out x K, contiguous).
//
// Pass 1: column maxima M_k of S. Pass 2: L = (S - M_k) / eps (near-maximal entries exact by
// Sterbenz, so huge S / eps stays accurate in float32; the first column step absorbs the shift)
// together with the first column step (max_b L_bk = 0 exactly, so one pass). Later column steps
// use the one-pass bound shift = max_b v_b (L <= 0) while max v - min v is moderate.
template <typename scalar_t>
void sinkhorn_impl(const scalar_t* S, int64_t N, int64_t K, double eps, int64_t n_iters,
                   int64_t rows_out, scalar_t* codes) {
  using V = Vec<scalar_t>;
  // The two (N, K) scratch buffers (L, and P = exp(L) below) come from the torch allocator, not
  // std::vector, so the profiler-based peak-memory measure (aahr_fast.utils.memory) counts them.
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<scalar_t>::value);
  Tensor Lbuf = at::empty({N * K}, opts);
  std::vector<scalar_t> u(K, scalar_t(0)), v(N, scalar_t(0)), cm(K), cs(K);
  scalar_t* L = Lbuf.data_ptr<scalar_t>();
  std::vector<scalar_t> lmin, scale;  // what the scaling steps need besides P
  const scalar_t e = scalar_t(eps);
  const scalar_t ninf = -std::numeric_limits<scalar_t>::infinity();
  if (n_iters <= 0) {  // SwAV with no iteration: N * exp(S / eps - logsumexp_all(S / eps))
    at::vec::map([e](V x) { return x / V(e); }, L, S, N * K);
    const scalar_t m = finite_or_zero(row_max(L, N * K));
    Tensor tmp = at::empty({N * K}, opts);
    scalar_t* tp = tmp.data_ptr<scalar_t>();
    exp_affine(tp, L, N * K, scalar_t(1), -m);
    const scalar_t lse = m + std::log(row_sum(tp, N * K));
    const scalar_t shift = std::log(scalar_t(N)) - lse;
    exp_affine(codes, L, rows_out * K, scalar_t(1), shift);
    return;
  }
  const scalar_t logN = std::log(scalar_t(N)), logK = std::log(scalar_t(K));
  // Below kSerialElems scores one thread does every step: at B = 128, K = 384 (49K scores) two threads
  // measured no faster than one (0.06 ms) and up to 1.8x slower in a noisy run; 835K scores (2,048 queued
  // rows) gain 1.2-1.3x from two threads.
  constexpr int64_t kSerialElems = int64_t(1) << 18;
  const bool serial = N * K < kSerialElems;
  const int64_t col_grain = serial ? K : std::max<int64_t>(V::size() * 8, 64);
  const int64_t row_grain = serial ? N : kRowGrain;
  Tensor Pbuf = at::empty({N * K}, opts);
  lmin.assign(K, scalar_t(0));
  scale.resize(std::max(N, K));
  scalar_t* P = Pbuf.data_ptr<scalar_t>();
  // Non-finite input contract (shared with the reference, Triton and CUDA): if any S / eps is NaN or +-inf
  // (finite S that overflows included), every code is NaN. Detected from the column maxima and minima of S.
  std::vector<scalar_t> cmin(K);
  std::vector<char> col_bad(K, 0);
  at::parallel_for(0, K, col_grain, [&](int64_t k0, int64_t k1) {
    scalar_t* m = cm.data();
    scalar_t* mn = cmin.data();
    scalar_t* s = cs.data();
    scalar_t* lm = lmin.data();
    std::fill(m + k0, m + k1, ninf);
    std::fill(mn + k0, mn + k1, -ninf);
    for (int64_t b = 0; b < N; ++b) {  // pass 1: column maxima and minima of S (NaN propagates)
      const scalar_t* row = S + b * K;
      int64_t k = k0;
      for (; k + V::size() <= k1; k += V::size()) {
        const V x = V::loadu(row + k);
        at::vec::maximum(V::loadu(m + k), x).store(m + k);
        at::vec::minimum(V::loadu(mn + k), x).store(mn + k);
      }
      for (; k < k1; ++k) {
        m[k] = (std::isnan(row[k]) || row[k] > m[k]) ? row[k] : m[k];
        mn[k] = (std::isnan(row[k]) || row[k] < mn[k]) ? row[k] : mn[k];
      }
    }
    for (int64_t k = k0; k < k1; ++k) {
      col_bad[k] = !(std::isfinite(m[k] / e) && std::isfinite(mn[k] / e));
      m[k] = std::isnan(m[k]) ? m[k] : finite_or_zero(m[k]);
    }
    std::fill(s + k0, s + k1, scalar_t(0));
    const V ve(e);
    for (int64_t b = 0; b < N; ++b) {  // pass 2: L = (S - M) / eps, P = exp(L), first column sums
      const scalar_t* srow = S + b * K;
      scalar_t* lrow = L + b * K;
      scalar_t* prow = P + b * K;
      int64_t k = k0;
      for (; k + V::size() <= k1; k += V::size()) {
        const V x = (V::loadu(srow + k) - V::loadu(m + k)) / ve;
        x.store(lrow + k);
        at::vec::minimum(V::loadu(lm + k), x).store(lm + k);  // NaN propagates
        const V px = x.exp();
        px.store(prow + k);
        (V::loadu(s + k) + px).store(s + k);
      }
      for (; k < k1; ++k) {
        lrow[k] = (srow[k] - m[k]) / e;
        lm[k] = (std::isnan(lrow[k]) || lrow[k] < lm[k]) ? lrow[k] : lm[k];
        prow[k] = std::exp(lrow[k]);
        s[k] += prow[k];
      }
    }
    for (int64_t k = k0; k < k1; ++k) u[k] = -logK - std::log(s[k]);
  });
  if (std::any_of(col_bad.begin(), col_bad.end(), [](char x) { return x != 0; })) {
    std::fill(codes, codes + rows_out * K, std::numeric_limits<scalar_t>::quiet_NaN());
    return;
  }
  // P can stand in for L when no entry of L is below -G (then no P_bk is 0 or subnormal)
  const scalar_t G = scaling_range<scalar_t>();
  const auto lrange = max_and_range(lmin.data(), K);  // max of lmin <= 0: range >= -min L
  const bool p_ok = !std::isnan(lrange.second) && lrange.first - lrange.second >= -G;
  if (!p_ok) {  // wide score range: iterate on the log-codes (L is free scratch from here on)
    sinkhorn_logcodes<scalar_t>(S, N, K, e, n_iters, rows_out, codes, L, col_grain, row_grain);
    return;
  }
  for (int64_t it = 0; it < n_iters; ++it) {
    if (it > 0) {
      const auto vr = max_and_range(v.data(), N);
      if (p_ok && vr.second <= G) {  // exp-free column step
        for (int64_t b = 0; b < N; ++b) scale[b] = std::exp(v[b] - vr.first);
        at::parallel_for(0, K, col_grain, [&](int64_t k0, int64_t k1) {
          col_step_scaled(P, scale.data(), vr.first, N, K, k0, k1, u.data(), cs.data());
        });
      } else {  // one-pass log-domain step with shift max v while the range allows (NaN range: two-pass)
        const bool ok = vr.second <= max_shift_gap<scalar_t>();
        const scalar_t shift = ok ? vr.first : std::numeric_limits<scalar_t>::quiet_NaN();
        at::parallel_for(0, K, col_grain, [&](int64_t k0, int64_t k1) {
          col_step(L, v.data(), N, K, k0, k1, shift, u.data(), cm.data(), cs.data());
        });
      }
    }
    const bool last = it + 1 == n_iters;
    const int64_t rows = last ? rows_out : N;  // the last row step only matters for the output
    const auto ur = max_and_range(u.data(), K);
    if (p_ok && ur.second <= G) {  // exp-free row step
      for (int64_t k = 0; k < K; ++k) scale[k] = std::exp(u[k] - ur.first);
      at::parallel_for(0, rows, row_grain, [&](int64_t r0, int64_t r1) {
        row_step_scaled(P, scale.data(), ur.first, K, N, r0, r1, v.data(),
                        last ? codes : static_cast<scalar_t*>(nullptr));
      });
      continue;
    }
    at::parallel_for(0, rows, row_grain, [&](int64_t r0, int64_t r1) {
      std::vector<scalar_t> tmp(K);
      if (last) {
        row_step(L, u.data(), K, r0, r1, static_cast<scalar_t*>(nullptr), codes, tmp.data());
      } else {
        row_step(L, u.data(), K, r0, r1, v.data(), static_cast<scalar_t*>(nullptr), tmp.data());
        for (int64_t b = r0; b < r1; ++b) v[b] = -logN - v[b];
      }
    });
  }
}

Tensor sinkhorn(const Tensor& s_in, double eps, int64_t n_iters) {
  check_cpu_float(s_in, "scores", 2);
  TORCH_CHECK(eps > 0, "eps must be > 0, got ", eps);
  const Tensor s = s_in.contiguous();
  const int64_t N = s.size(0), K = s.size(1);
  Tensor codes = at::empty({N, K}, s.options());
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "sinkhorn", [&] {
    sinkhorn_impl<scalar_t>(s.data_ptr<scalar_t>(), N, K, eps, n_iters, N,
                            codes.data_ptr<scalar_t>());
  });
  return codes;
}

// Loss rows b in [0, B) of one direction: scores S (B rows of the predicting modality), codes Q
// of the other modality. Writes dS rows and per-row loss terms.
template <typename scalar_t>
void swap_rows(const scalar_t* S, const scalar_t* Q, int64_t B, int64_t K, scalar_t tau,
               scalar_t coef, scalar_t* dS, scalar_t* row_loss) {
  using V = Vec<scalar_t>;
  at::parallel_for(0, B, kRowGrain, [&](int64_t r0, int64_t r1) {
    std::vector<scalar_t> z(K);
    for (int64_t b = r0; b < r1; ++b) {
      const scalar_t* srow = S + b * K;
      const scalar_t* qrow = Q + b * K;
      scalar_t* drow = dS + b * K;
      at::vec::map([tau](V x) { return x / V(tau); }, z.data(), srow, K);
      const scalar_t m = finite_or_zero(row_max(z.data(), K));
      exp_affine(drow, z.data(), K, scalar_t(1), -m);  // exp(z - m), turned into dS below
      const scalar_t se = row_sum(drow, K);
      const scalar_t lse = m + std::log(se);
      const scalar_t qsum = row_sum(qrow, K);
      const scalar_t qz = row_dot(qrow, z.data(), K);
      row_loss[b] = coef * (lse * qsum - qz);
      const V a(coef / tau * qsum / se), c(coef / tau);
      at::vec::map2([a, c](V p, V q) { return a * p - c * q; }, drow, drow, qrow, K);
    }
  });
}

// swapped_prediction_loss forward: returns (loss (), dS (2B, K)) where dS = d loss / d [S_v; S_t].
std::tuple<Tensor, Tensor> swap_fwd(const Tensor& xv, const Tensor& xt, const Tensor& C,
                                    const c10::optional<Tensor>& qv_opt,
                                    const c10::optional<Tensor>& qt_opt, double eps,
                                    int64_t n_iters, double tau, double weight) {
  check_cpu_float(xv, "x_v", 2);
  check_cpu_float(xt, "x_t", 2);
  check_cpu_float(C, "prototypes", 2);
  TORCH_CHECK(eps > 0 && tau > 0, "eps and tau must be > 0, got ", eps, ", ", tau);
  const auto st = xv.scalar_type();
  const int64_t B = xv.size(0), D = xv.size(1), K = C.size(0);
  TORCH_CHECK(xt.sizes() == xv.sizes() && xt.scalar_type() == st,
              "x_t must have the shape and dtype of x_v");
  TORCH_CHECK(C.size(1) == D && C.scalar_type() == st, "prototypes must be (K, ", D, ") of ",
              st, ", got ", C.sizes());
  const bool hv = qv_opt.has_value() && qv_opt->defined();
  const bool ht = qt_opt.has_value() && qt_opt->defined();
  const int64_t Mv = hv ? qv_opt->size(0) : 0, Mt = ht ? qt_opt->size(0) : 0;
  for (const auto* q : {hv ? &*qv_opt : nullptr, ht ? &*qt_opt : nullptr}) {
    if (q) {
      TORCH_CHECK(q->dim() == 2 && q->size(1) == D && q->scalar_type() == st,
                  "queues must be (M, ", D, ") of ", st, ", got ", q->sizes());
    }
  }
  const int64_t Nv = B + Mv, Nt = B + Mt;
  Tensor S = at::empty({Nv + Nt, K}, xv.options());
  const Tensor Ct = C.t();
  {  // each GEMM writes straight into its row block of S (row blocks are contiguous)
    Tensor s_xv = S.narrow(0, 0, B), s_xt = S.narrow(0, Nv, B);
    at::mm_out(s_xv, xv, Ct);
    at::mm_out(s_xt, xt, Ct);
    if (hv) {
      Tensor s_qv = S.narrow(0, B, Mv);
      at::mm_out(s_qv, *qv_opt, Ct);
    }
    if (ht) {
      Tensor s_qt = S.narrow(0, Nv + B, Mt);
      at::mm_out(s_qt, *qt_opt, Ct);
    }
  }
  Tensor codes = at::empty({2 * B, K}, xv.options());  // [q_v; q_t]
  Tensor dS = at::empty({2 * B, K}, xv.options());
  Tensor row_loss = at::empty({2 * B}, xv.options());
  Tensor loss = at::empty({}, xv.options());
  AT_DISPATCH_FLOATING_TYPES(st, "swapped_prediction_fwd", [&] {
    const scalar_t* sp = S.data_ptr<scalar_t>();
    scalar_t* cp = codes.data_ptr<scalar_t>();
    sinkhorn_impl<scalar_t>(sp, Nv, K, eps, n_iters, B, cp);
    sinkhorn_impl<scalar_t>(sp + Nv * K, Nt, K, eps, n_iters, B, cp + B * K);
    scalar_t* dp = dS.data_ptr<scalar_t>();
    scalar_t* lp = row_loss.data_ptr<scalar_t>();
    const scalar_t coef = scalar_t(weight / double(B));
    // image scores predict the text codes, text scores predict the image codes
    swap_rows<scalar_t>(sp, cp + B * K, B, K, scalar_t(tau), coef, dp, lp);
    swap_rows<scalar_t>(sp + Nv * K, cp, B, K, scalar_t(tau), coef, dp + B * K, lp + B);
    scalar_t total = 0;
    for (int64_t b = 0; b < 2 * B; ++b) total += lp[b];
    *loss.data_ptr<scalar_t>() = total;
  });
  return {loss, dS};
}

// swapped_prediction_loss backward: needs = (x_v, x_t, prototypes).
std::tuple<Tensor, Tensor, Tensor> swap_bwd(const Tensor& grad, const Tensor& dS_in,
                                            const Tensor& xv, const Tensor& xt, const Tensor& C,
                                            std::array<bool, 3> needs) {
  const int64_t B = xv.size(0);
  const Tensor dS = dS_in * grad.to(dS_in.scalar_type());
  const auto empty = at::empty({0}, dS.options());
  Tensor gxv = empty, gxt = empty, gC = empty;
  if (needs[0] || needs[1]) {
    const Tensor gx = at::mm(dS, C);  // (2B, D)
    if (needs[0]) gxv = gx.narrow(0, 0, B);
    if (needs[1]) gxt = gx.narrow(0, B, B);
  }
  if (needs[2]) {
    gC = at::mm(dS.narrow(0, 0, B).t(), xv);
    gC.addmm_(dS.narrow(0, B, B).t(), xt);
  }
  return {gxv, gxt, gC};
}

}  // namespace
}  // namespace d2
}  // namespace aahr_fast

TORCH_LIBRARY_FRAGMENT(aahr_fast, m) {
  m.def("proto_sinkhorn(Tensor scores, float eps, int n_iters) -> Tensor");
  m.def(
      "proto_swap_fwd(Tensor x_v, Tensor x_t, Tensor prototypes, Tensor? queue_v, "
      "Tensor? queue_t, float eps, int n_iters, float tau, float weight) -> (Tensor, Tensor)");
  m.def(
      "proto_swap_bwd(Tensor grad, Tensor dscores, Tensor x_v, Tensor x_t, Tensor prototypes, "
      "bool[3] needs) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(aahr_fast, CPU, m) {
  m.impl("proto_sinkhorn", &aahr_fast::d2::sinkhorn);
  m.impl("proto_swap_fwd", &aahr_fast::d2::swap_fwd);
  m.impl("proto_swap_bwd", &aahr_fast::d2::swap_bwd);
}
