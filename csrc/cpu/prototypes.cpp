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

// Row step: for rows [r0, r1) of L (N x K), m_b + log(sum_k exp(L_bk + u_k - m_b)).
// When `codes` is given, also writes softmax_k(L_bk + u_k) into codes row b.
template <typename scalar_t>
void row_step(const scalar_t* L, const scalar_t* u, int64_t K, int64_t r0, int64_t r1,
              scalar_t* lse_out, scalar_t* codes, scalar_t* tmp) {
  for (int64_t b = r0; b < r1; ++b) {
    const scalar_t* row = L + b * K;
    int64_t k = 0;
    for (; k + Vec<scalar_t>::size() <= K; k += Vec<scalar_t>::size())
      (Vec<scalar_t>::loadu(row + k) + Vec<scalar_t>::loadu(u + k)).store(tmp + k);
    for (; k < K; ++k) tmp[k] = row[k] + u[k];
    const scalar_t m = finite_or_zero(row_max(tmp, K));
    scalar_t* dst = codes ? codes + b * K : tmp;
    exp_affine(dst, tmp, K, scalar_t(1), -m);
    const scalar_t s = row_sum(dst, K);
    if (lse_out) lse_out[b] = m + std::log(s);
    if (codes) {
      const scalar_t inv = scalar_t(1) / s;
      for (k = 0; k < K; ++k) dst[k] *= inv;
    }
  }
}

// Column step: u_k = -log K - logsumexp_b(L_bk + v_b) for k in [k0, k1), all N rows.
template <typename scalar_t>
void col_step(const scalar_t* L, const scalar_t* v, int64_t N, int64_t K, int64_t k0, int64_t k1,
              scalar_t* u, scalar_t* m, scalar_t* s) {
  using V = Vec<scalar_t>;
  const scalar_t ninf = -std::numeric_limits<scalar_t>::infinity();
  std::fill(m + k0, m + k1, ninf);
  std::fill(s + k0, s + k1, scalar_t(0));
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
  for (int64_t k = k0; k < k1; ++k) m[k] = finite_or_zero(m[k]);
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

// Sinkhorn codes of the first `rows_out` rows of S (N x K, contiguous) into `codes`
// (rows_out x K, contiguous).
template <typename scalar_t>
void sinkhorn_impl(const scalar_t* S, int64_t N, int64_t K, double eps, int64_t n_iters,
                   int64_t rows_out, scalar_t* codes) {
  std::vector<scalar_t> Lbuf(N * K), u(K, scalar_t(0)), v(N, scalar_t(0)), cm(K), cs(K);
  scalar_t* L = Lbuf.data();
  const scalar_t e = scalar_t(eps);
  at::parallel_for(0, N * K, 1 << 14, [&](int64_t a, int64_t b) {
    for (int64_t i = a; i < b; ++i) L[i] = S[i] / e;
  });
  if (n_iters <= 0) {  // SwAV with no iteration: N * exp(L - logsumexp_all(L))
    const scalar_t m = finite_or_zero(row_max(L, N * K));
    std::vector<scalar_t> tmp(N * K);
    exp_affine(tmp.data(), L, N * K, scalar_t(1), -m);
    const scalar_t lse = m + std::log(row_sum(tmp.data(), N * K));
    const scalar_t shift = std::log(scalar_t(N)) - lse;
    exp_affine(codes, L, rows_out * K, scalar_t(1), shift);
    return;
  }
  const scalar_t logN = std::log(scalar_t(N));
  const int64_t col_grain = std::max<int64_t>(Vec<scalar_t>::size() * 8, 64);
  // Shift every column by its maximum (the first column step absorbs any per-column constant, so
  // the codes are unchanged): near-maximal entries are then exact (Sterbenz) and the potentials stay
  // O(log N + log K) instead of O(max |S| / eps), which keeps float32 accurate for huge S / eps.
  at::parallel_for(0, K, col_grain, [&](int64_t k0, int64_t k1) {
    using V = Vec<scalar_t>;
    scalar_t* m = cm.data();
    std::fill(m + k0, m + k1, -std::numeric_limits<scalar_t>::infinity());
    for (int64_t b = 0; b < N; ++b) {
      const scalar_t* row = L + b * K;
      int64_t k = k0;
      for (; k + V::size() <= k1; k += V::size())
        at::vec::maximum(V::loadu(m + k), V::loadu(row + k)).store(m + k);
      for (; k < k1; ++k) m[k] = (std::isnan(row[k]) || row[k] > m[k]) ? row[k] : m[k];
    }
    for (int64_t k = k0; k < k1; ++k) m[k] = std::isnan(m[k]) ? m[k] : finite_or_zero(m[k]);
    for (int64_t b = 0; b < N; ++b) {
      scalar_t* row = L + b * K;
      for (int64_t k = k0; k < k1; ++k) row[k] -= m[k];
    }
  });
  for (int64_t it = 0; it < n_iters; ++it) {
    at::parallel_for(0, K, col_grain, [&](int64_t k0, int64_t k1) {
      col_step(L, v.data(), N, K, k0, k1, u.data(), cm.data(), cs.data());
    });
    const bool last = it + 1 == n_iters;
    const int64_t rows = last ? rows_out : N;  // the last row step only matters for the output
    at::parallel_for(0, rows, kRowGrain, [&](int64_t r0, int64_t r1) {
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
  at::parallel_for(0, B, kRowGrain, [&](int64_t r0, int64_t r1) {
    std::vector<scalar_t> z(K);
    for (int64_t b = r0; b < r1; ++b) {
      const scalar_t* srow = S + b * K;
      const scalar_t* qrow = Q + b * K;
      scalar_t* drow = dS + b * K;
      for (int64_t k = 0; k < K; ++k) z[k] = srow[k] / tau;
      const scalar_t m = finite_or_zero(row_max(z.data(), K));
      exp_affine(drow, z.data(), K, scalar_t(1), -m);  // exp(z - m), normalised below
      const scalar_t se = row_sum(drow, K);
      const scalar_t lse = m + std::log(se);
      const scalar_t qsum = row_sum(qrow, K);
      const scalar_t qz = row_dot(qrow, z.data(), K);
      row_loss[b] = coef * (lse * qsum - qz);
      const scalar_t a = coef / tau * qsum / se, c = coef / tau;
      for (int64_t k = 0; k < K; ++k) drow[k] = a * drow[k] - c * qrow[k];
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
