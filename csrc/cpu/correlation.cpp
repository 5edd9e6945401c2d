// C++ CPU backend of the instance-correlation ops (docs/DESIGN.md "Ops contract"; method:
// /work/shared/docs/aahr-method.md 2.6, paper Eq. (10) and HREM's connection/relevance graph).
//
//   intra relevance   A_ij = exp(-||x_i - x_j||_2 / sigma), A_ii = 1 exactly
//   connection        C_ij = j among the top-k scores of row i (ties -> lower index, NaN first)
//   block assembly    relevance  = [[A_vv, R_i2t], [R_t2i, A_tt]]          (2B x 2B)
//                     connection = [[top_k(S_vv), top_k(R_i2t)], [top_k(R_t2i), top_k(S_tt)]]
//                     attn_bias  = lam * relevance where connected, -inf elsewhere
//
// Distances come from the Gram matrix G = X X^T (one GEMM per modality):
// d_ij^2 = G_ii + G_jj - 2 G_ij, clamped at 0, computed from the upper triangle only so that the
// distance and relevance matrices are exactly symmetric. The whole 2B x 2B assembly (distances,
// exp, top-k, bias) is one parallel pass over the output rows.
//
// Backward of A w.r.t. X (a subgradient 0 where d_ij = 0, so the diagonal and duplicated rows
// give no NaN): with Gt the total upstream gradient on an intra block,
//   W_ij = -(Gt_ij + Gt_ji) * A_ij / (sigma * d_ij)   (0 where d_ij == 0)
//   dX   = diag(W 1) X - W X                          (one GEMM)
// Gt = grad_relevance + lam * connection * grad_attn_bias.

#include <torch/library.h>

#include <array>
#include <vector>

#include "d2_common.h"
#include "d2_topk.h"

namespace aahr_fast {
namespace d2 {
namespace {

using at::Tensor;

// Row i of the intra-modal distance and relevance matrices from the Gram matrix `G` (B x B).
// Writes dist_row[0..B) and rel_row[0..B).
template <typename scalar_t>
inline void intra_row(const scalar_t* G, int64_t B, int64_t i, scalar_t neg_inv_sigma,
                      scalar_t* dist_row, scalar_t* rel_row) {
  const scalar_t gii = G[i * B + i];
  for (int64_t j = 0; j < B; ++j) {
    const int64_t lo = j < i ? j : i, hi = j < i ? i : j;
    const scalar_t d2 = gii + G[j * B + j] - scalar_t(2) * G[lo * B + hi];
    dist_row[j] = d2 < scalar_t(0) ? scalar_t(0) : std::sqrt(d2);  // NaN stays NaN
  }
  dist_row[i] = scalar_t(0);
  exp_affine(rel_row, dist_row, B, neg_inv_sigma, scalar_t(0));
  rel_row[i] = scalar_t(1);
}

Tensor gram(const Tensor& x) { return at::mm(x, x.t()); }

// ---------------------------------------------------------------------------------------------
// intra_relevance(x (B,D), sigma) -> (relevance (B,B), dist (B,B))
std::tuple<Tensor, Tensor> intra_relevance_fwd(const Tensor& x_in, double sigma) {
  check_cpu_float(x_in, "x", 2);
  TORCH_CHECK(sigma > 0, "sigma must be > 0, got ", sigma);
  const Tensor x = x_in.contiguous();
  const int64_t B = x.size(0);
  const Tensor G = gram(x);
  Tensor rel = at::empty({B, B}, x.options());
  Tensor dist = at::empty({B, B}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "intra_relevance_fwd", [&] {
    const scalar_t* g = G.data_ptr<scalar_t>();
    scalar_t* r = rel.data_ptr<scalar_t>();
    scalar_t* d = dist.data_ptr<scalar_t>();
    const scalar_t nis = scalar_t(-1.0 / sigma);
    at::parallel_for(0, B, kRowGrain, [&](int64_t b0, int64_t b1) {
      for (int64_t i = b0; i < b1; ++i) intra_row(g, B, i, nis, d + i * B, r + i * B);
    });
  });
  return {rel, dist};
}

// W (B x B) from the total upstream gradient `gt` of an intra block (row stride ld_gt), the
// relevance block (row stride ld_rel) and the distances; returns dX = diag(W 1) X - W X.
template <typename scalar_t>
Tensor intra_backward(const scalar_t* gt, int64_t ld_gt, const scalar_t* rel, int64_t ld_rel,
                      const scalar_t* dist, const Tensor& x, double sigma) {
  const int64_t B = x.size(0);
  Tensor W = at::empty({B, B}, x.options());
  Tensor rs = at::empty({B}, x.options());
  scalar_t* w = W.data_ptr<scalar_t>();
  scalar_t* r = rs.data_ptr<scalar_t>();
  const scalar_t inv_sigma = scalar_t(1.0 / sigma);
  at::parallel_for(0, B, kRowGrain, [&](int64_t b0, int64_t b1) {
    for (int64_t i = b0; i < b1; ++i) {
      scalar_t acc = 0;
      for (int64_t j = 0; j < B; ++j) {
        const scalar_t dij = dist[i * B + j];
        scalar_t val = 0;
        if (!(dij == scalar_t(0))) {  // NaN distances propagate
          val = -(gt[i * ld_gt + j] + gt[j * ld_gt + i]) * rel[i * ld_rel + j] * inv_sigma / dij;
        }
        w[i * B + j] = val;
        acc += val;
      }
      r[i] = acc;
    }
  });
  Tensor out = at::mm(W, x);  // W X
  scalar_t* o = out.data_ptr<scalar_t>();
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const int64_t D = x.size(1);
  at::parallel_for(0, B, kRowGrain, [&](int64_t b0, int64_t b1) {
    using Vec = at::vec::Vectorized<scalar_t>;
    for (int64_t i = b0; i < b1; ++i) {
      const Vec ri(r[i]);
      scalar_t* orow = o + i * D;
      const scalar_t* xrow = xp + i * D;
      int64_t k = 0;
      for (; k + Vec::size() <= D; k += Vec::size())
        at::vec::fmsub(ri, Vec::loadu(xrow + k), Vec::loadu(orow + k)).store(orow + k);
      for (; k < D; ++k) orow[k] = r[i] * xrow[k] - orow[k];
    }
  });
  return out;
}

Tensor intra_relevance_bwd(const Tensor& grad_in, const Tensor& x_in, const Tensor& rel,
                           const Tensor& dist, double sigma) {
  check_cpu_float(x_in, "x", 2);
  const Tensor x = x_in.contiguous();
  const Tensor grad = grad_in.contiguous().to(x.scalar_type());
  const int64_t B = x.size(0);
  TORCH_CHECK(grad.sizes() == at::IntArrayRef({B, B}), "grad must be (", B, ", ", B, "), got ",
              grad.sizes());
  Tensor out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "intra_relevance_bwd", [&] {
    out = intra_backward<scalar_t>(grad.data_ptr<scalar_t>(), B, rel.data_ptr<scalar_t>(), B,
                                   dist.data_ptr<scalar_t>(), x, sigma);
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// topk_connection(scores (R,C), k) -> bool (R,C)
Tensor topk_connection(const Tensor& s_in, int64_t k) {
  check_cpu_float(s_in, "scores", 2);
  const Tensor s = s_in.contiguous();
  const int64_t R = s.size(0), C = s.size(1);
  Tensor mask = at::empty({R, C}, s.options().dtype(at::kBool));
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "topk_connection", [&] {
    const scalar_t* sp = s.data_ptr<scalar_t>();
    bool* mp = mask.data_ptr<bool>();
    at::parallel_for(0, R, kRowGrain, [&](int64_t r0, int64_t r1) {
      std::vector<int64_t> idx;
      for (int64_t r = r0; r < r1; ++r) topk_row_mask(sp + r * C, C, k, mp + r * C, idx);
    });
  });
  return mask;
}

// ---------------------------------------------------------------------------------------------
// instance_correlation forward: one pass over the 2B output rows.
// rank_intra_by_gram: rank intra-modal neighbours by the Gram matrix (cosine for unit rows,
// HREM's rule) instead of by the relevance values.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> instance_fwd(
    const Tensor& v_in, const Tensor& t_in, const Tensor& i2t_in, const Tensor& t2i_in,
    double sigma, int64_t k_intra, int64_t k_inter, double lam, bool rank_intra_by_gram) {
  check_cpu_float(v_in, "v", 2);
  check_cpu_float(t_in, "t", 2);
  check_cpu_float(i2t_in, "rel_i2t", 2);
  check_cpu_float(t2i_in, "rel_t2i", 2);
  TORCH_CHECK(sigma > 0, "sigma must be > 0, got ", sigma);
  const Tensor v = v_in.contiguous(), t = t_in.contiguous();
  const auto st = v.scalar_type();
  TORCH_CHECK(t.scalar_type() == st && i2t_in.scalar_type() == st && t2i_in.scalar_type() == st,
              "v, t, rel_i2t, rel_t2i must share one dtype");
  const int64_t B = v.size(0);
  TORCH_CHECK(t.sizes() == v.sizes(), "t must have the shape of v ", v.sizes(), ", got ",
              t.sizes());
  TORCH_CHECK(i2t_in.sizes() == at::IntArrayRef({B, B}) && t2i_in.sizes() == i2t_in.sizes(),
              "rel_i2t and rel_t2i must be (", B, ", ", B, ")");
  const Tensor i2t = i2t_in.contiguous(), t2i = t2i_in.contiguous();
  const Tensor Gv = gram(v), Gt = gram(t);
  const int64_t N = 2 * B;
  Tensor rel = at::empty({N, N}, v.options());
  Tensor conn = at::empty({N, N}, v.options().dtype(at::kBool));
  Tensor bias = at::empty({N, N}, v.options());
  Tensor dist_v = at::empty({B, B}, v.options());
  Tensor dist_t = at::empty({B, B}, v.options());
  AT_DISPATCH_FLOATING_TYPES(st, "instance_correlation_fwd", [&] {
    const scalar_t* gv = Gv.data_ptr<scalar_t>();
    const scalar_t* gt = Gt.data_ptr<scalar_t>();
    const scalar_t* ri2t = i2t.data_ptr<scalar_t>();
    const scalar_t* rt2i = t2i.data_ptr<scalar_t>();
    scalar_t* rp = rel.data_ptr<scalar_t>();
    bool* cp = conn.data_ptr<bool>();
    scalar_t* bp = bias.data_ptr<scalar_t>();
    scalar_t* dv = dist_v.data_ptr<scalar_t>();
    scalar_t* dt = dist_t.data_ptr<scalar_t>();
    const scalar_t nis = scalar_t(-1.0 / sigma);
    const scalar_t lamc = scalar_t(lam);
    const scalar_t ninf = -std::numeric_limits<scalar_t>::infinity();
    at::parallel_for(0, N, kRowGrain, [&](int64_t r0, int64_t r1) {
      std::vector<int64_t> idx;
      for (int64_t r = r0; r < r1; ++r) {
        const bool img = r < B;
        const int64_t i = img ? r : r - B;
        const scalar_t* G = img ? gv : gt;
        scalar_t* drow = (img ? dv : dt) + i * B;
        scalar_t* row = rp + r * N;
        bool* crow = cp + r * N;
        const int64_t intra0 = img ? 0 : B, inter0 = img ? B : 0;
        intra_row(G, B, i, nis, drow, row + intra0);
        const scalar_t* inter_src = (img ? ri2t : rt2i) + i * B;
        std::copy(inter_src, inter_src + B, row + inter0);
        topk_row_mask(rank_intra_by_gram ? G + i * B : row + intra0, B, k_intra, crow + intra0,
                      idx);
        topk_row_mask(row + inter0, B, k_inter, crow + inter0, idx);
        scalar_t* brow = bp + r * N;
        for (int64_t j = 0; j < N; ++j) brow[j] = crow[j] ? lamc * row[j] : ninf;
      }
    });
  });
  return {rel, conn, bias, dist_v, dist_t};
}

// instance_correlation backward. grad_rel / grad_bias may be undefined (no upstream gradient).
// Returns (dv, dt, d_rel_i2t, d_rel_t2i); a gradient not asked for in `needs` is an empty tensor.
std::tuple<Tensor, Tensor, Tensor, Tensor> instance_bwd(
    const c10::optional<Tensor>& grad_rel_opt, const c10::optional<Tensor>& grad_bias_opt,
    const Tensor& v_in, const Tensor& t_in, const Tensor& rel, const Tensor& conn,
    const Tensor& dist_v, const Tensor& dist_t, double sigma, double lam,
    std::array<bool, 4> needs) {
  const Tensor v = v_in.contiguous(), t = t_in.contiguous();
  const int64_t B = v.size(0), N = 2 * B;
  const bool has_r = grad_rel_opt.has_value() && grad_rel_opt->defined();
  const bool has_b = grad_bias_opt.has_value() && grad_bias_opt->defined();
  const Tensor gr = has_r ? grad_rel_opt->contiguous().to(v.scalar_type()) : Tensor();
  const Tensor gb = has_b ? grad_bias_opt->contiguous().to(v.scalar_type()) : Tensor();
  Tensor total = at::empty({N, N}, v.options());  // grad_rel + lam * conn * grad_bias
  Tensor dv = at::empty({0}, v.options()), dt = at::empty({0}, v.options());
  Tensor di2t = at::empty({0}, v.options()), dt2i = at::empty({0}, v.options());
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "instance_correlation_bwd", [&] {
    const scalar_t* grp = has_r ? gr.data_ptr<scalar_t>() : nullptr;
    const scalar_t* gbp = has_b ? gb.data_ptr<scalar_t>() : nullptr;
    const bool* cp = conn.data_ptr<bool>();
    scalar_t* tp = total.data_ptr<scalar_t>();
    const scalar_t lamc = scalar_t(lam);
    at::parallel_for(0, N, kRowGrain, [&](int64_t r0, int64_t r1) {
      for (int64_t e = r0 * N; e < r1 * N; ++e) {
        scalar_t g = grp ? grp[e] : scalar_t(0);
        if (gbp && cp[e]) g += lamc * gbp[e];
        tp[e] = g;
      }
    });
    const scalar_t* relp = rel.data_ptr<scalar_t>();
    if (needs[0])
      dv = intra_backward<scalar_t>(tp, N, relp, N, dist_v.data_ptr<scalar_t>(), v, sigma);
    if (needs[1])
      dt = intra_backward<scalar_t>(tp + B * N + B, N, relp + B * N + B, N,
                                    dist_t.data_ptr<scalar_t>(), t, sigma);
  });
  using namespace at::indexing;
  if (needs[2]) di2t = total.index({Slice(0, B), Slice(B, N)}).contiguous();
  if (needs[3]) dt2i = total.index({Slice(B, N), Slice(0, B)}).contiguous();
  return {dv, dt, di2t, dt2i};
}

}  // namespace
}  // namespace d2
}  // namespace aahr_fast

TORCH_LIBRARY_FRAGMENT(aahr_fast, m) {
  m.def("corr_intra_relevance_fwd(Tensor x, float sigma) -> (Tensor, Tensor)");
  m.def(
      "corr_intra_relevance_bwd(Tensor grad, Tensor x, Tensor rel, Tensor dist, float sigma) "
      "-> Tensor");
  m.def("corr_topk_connection(Tensor scores, int k) -> Tensor");
  m.def(
      "corr_instance_fwd(Tensor v, Tensor t, Tensor rel_i2t, Tensor rel_t2i, float sigma, "
      "int k_intra, int k_inter, float lam, bool rank_intra_by_gram) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "corr_instance_bwd(Tensor? grad_rel, Tensor? grad_bias, Tensor v, Tensor t, "
      "Tensor relevance, Tensor connection, Tensor dist_v, Tensor dist_t, float sigma, "
      "float lam, bool[4] needs) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(aahr_fast, CPU, m) {
  m.impl("corr_intra_relevance_fwd", &aahr_fast::d2::intra_relevance_fwd);
  m.impl("corr_intra_relevance_bwd", &aahr_fast::d2::intra_relevance_bwd);
  m.impl("corr_topk_connection", &aahr_fast::d2::topk_connection);
  m.impl("corr_instance_fwd", &aahr_fast::d2::instance_fwd);
  m.impl("corr_instance_bwd", &aahr_fast::d2::instance_bwd);
}
