// C++ CPU backend of the instance-correlation ops (docs/DESIGN.md "Ops contract"; method:
// /work/shared/docs/aahr-method.md 2.6, paper Eq. (10) and HREM's connection/relevance graph).
//
//   intra relevance   A_ij = exp(-||x_i - x_j||_2 / sigma), A_ii = 1 exactly
//   connection        C_ij = j among the top-k scores of row i (ties -> lower index, NaN first)
//   block assembly    relevance  = [[A_vv, R_i2t], [R_t2i, A_tt]]          (2B x 2B)
//                     connection = [[top_k(S_vv), top_k(R_i2t)], [top_k(R_t2i), top_k(S_tt)]]
//                     attn_bias  = lam * relevance where connected, -inf elsewhere
//
// Distances use exact differences, d_ij = sqrt(sum_k (x_ik - x_jk)^2) (no |a|^2 + |b|^2 - 2ab
// cancellation, like the reference's cdist without mm), in 4 x 2 register tiles over the upper
// triangle only, so the distance and relevance matrices are exactly symmetric. The ranking scores
// of the intra-modal connection (v v^T, t t^T) are passed in by the caller. The 2B x 2B assembly
// (exp, top-k, bias) is one parallel pass over the output rows.
//
// Backward of A w.r.t. X (a subgradient 0 where d_ij = 0, so the diagonal and duplicated rows
// give no NaN): with Gt the total upstream gradient on an intra block,
//   W_ij  = -(Gt_ij + Gt_ji) * A_ij / (sigma * d_ij)   (0 where d_ij == 0)
//   dX_i  = sum_j W_ij (x_i - x_j)  = (diag(W 1) X - W X)_i over far pairs (one GEMM)
//           + exact differences over near pairs (d_ij <= 0.25 max(|x_i|, |x_j|))
// Gt = grad_relevance + lam * connection * grad_attn_bias. rel_i2t / rel_t2i are constants of the
// op (the reference detaches them); their gradient is still available from the kernel.

#include <torch/library.h>

#include <array>
#include <utility>
#include <vector>

#include "d2_common.h"
#include "d2_topk.h"

namespace aahr_fast {
namespace d2 {
namespace {

using at::Tensor;

// Squared Euclidean distance of two rows of D elements, exact differences (no Gram cancellation).
template <typename scalar_t>
inline scalar_t sqdist(const scalar_t* a, const scalar_t* b, int64_t D) {
  using Vec = at::vec::Vectorized<scalar_t>;
  Vec acc(scalar_t(0));
  int64_t k = 0;
  for (; k + Vec::size() <= D; k += Vec::size()) {
    const Vec d = Vec::loadu(a + k) - Vec::loadu(b + k);
    acc = at::vec::fmadd(d, d, acc);
  }
  scalar_t buf[Vec::size()];
  acc.store(buf);
  scalar_t s = 0;
  for (int64_t j = 0; j < Vec::size(); ++j) s += buf[j];
  for (; k < D; ++k) s += (a[k] - b[k]) * (a[k] - b[k]);
  return s;
}

// 4 x 2 register tile of squared distances: rows i0..i0+3 against rows j0, j0+1.
template <typename scalar_t>
inline void sqdist_tile_4x2(const scalar_t* x, int64_t D, int64_t i0, int64_t j0,
                            scalar_t out[4][2]) {
  using Vec = at::vec::Vectorized<scalar_t>;
  Vec acc[4][2];
  for (int r = 0; r < 4; ++r) acc[r][0] = acc[r][1] = Vec(scalar_t(0));
  const scalar_t* xj0 = x + j0 * D;
  const scalar_t* xj1 = xj0 + D;
  int64_t k = 0;
  for (; k + Vec::size() <= D; k += Vec::size()) {
    const Vec b0 = Vec::loadu(xj0 + k), b1 = Vec::loadu(xj1 + k);
    for (int r = 0; r < 4; ++r) {
      const Vec a = Vec::loadu(x + (i0 + r) * D + k);
      const Vec d0 = a - b0, d1 = a - b1;
      acc[r][0] = at::vec::fmadd(d0, d0, acc[r][0]);
      acc[r][1] = at::vec::fmadd(d1, d1, acc[r][1]);
    }
  }
  scalar_t buf[Vec::size()];
  for (int r = 0; r < 4; ++r) {
    for (int c = 0; c < 2; ++c) {
      acc[r][c].store(buf);
      scalar_t s = 0;
      for (int64_t j = 0; j < Vec::size(); ++j) s += buf[j];
      const scalar_t* a = x + (i0 + r) * D;
      const scalar_t* b = x + (j0 + c) * D;
      for (int64_t kk = k; kk < D; ++kk) s += (a[kk] - b[kk]) * (a[kk] - b[kk]);
      out[r][c] = s;
    }
  }
}

// Pairwise Euclidean distances of the rows of x (B x D, contiguous) into dist (B x B): computed
// once per unordered pair (so exactly symmetric), diagonal exactly 0, NaN propagates.
// Row tiles of 4 are processed in pairs (t, last - t) so the triangle splits evenly over threads.
template <typename scalar_t>
void pairwise_dist(const scalar_t* x, int64_t B, int64_t D, scalar_t* dist) {
  const int64_t nt = (B + 3) / 4;
  auto put = [&](int64_t i, int64_t j, scalar_t d2) {
    const scalar_t d = d2 < scalar_t(0) ? scalar_t(0) : std::sqrt(d2);
    dist[i * B + j] = d;
    dist[j * B + i] = d;
  };
  auto do_tile = [&](int64_t t) {
    const int64_t i0 = 4 * t;
    if (i0 + 4 <= B) {
      // pairs inside the tile and to its right; columns j >= i0
      int64_t j = i0;
      scalar_t out[4][2];
      for (; j + 2 <= B; j += 2) {
        sqdist_tile_4x2(x, D, i0, j, out);
        for (int r = 0; r < 4; ++r)
          for (int c = 0; c < 2; ++c)
            if (j + c > i0 + r) put(i0 + r, j + c, out[r][c]);
      }
      for (; j < B; ++j)
        for (int r = 0; r < 4; ++r)
          if (j > i0 + r) put(i0 + r, j, sqdist(x + (i0 + r) * D, x + j * D, D));
    } else {
      for (int64_t i = i0; i < B; ++i)
        for (int64_t j = i + 1; j < B; ++j) put(i, j, sqdist(x + i * D, x + j * D, D));
    }
    for (int64_t i = i0; i < std::min(B, i0 + 4); ++i) dist[i * B + i] = scalar_t(0);
  };
  at::parallel_for(0, (nt + 1) / 2, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      do_tile(p);
      if (nt - 1 - p != p) do_tile(nt - 1 - p);
    }
  });
}

// rel_row[j] = exp(-dist_row[j] / sigma) over B entries, rel_row[i] = 1.
template <typename scalar_t>
inline void relevance_row(const scalar_t* dist_row, int64_t B, int64_t i, scalar_t sigma,
                          scalar_t* rel_row) {
  using Vec = at::vec::Vectorized<scalar_t>;
  const Vec vs(sigma);
  at::vec::map([vs](Vec d) { return d.neg() / vs; }, rel_row, dist_row, B);
  exp_affine(rel_row, rel_row, B, scalar_t(1), scalar_t(0));
  rel_row[i] = scalar_t(1);
}

// ---------------------------------------------------------------------------------------------
// intra_relevance(x (B,D), sigma) -> (relevance (B,B), dist (B,B))
std::tuple<Tensor, Tensor> intra_relevance_fwd(const Tensor& x_in, double sigma) {
  check_cpu_float(x_in, "x", 2);
  TORCH_CHECK(sigma > 0, "sigma must be > 0, got ", sigma);
  const Tensor x = x_in.contiguous();
  const int64_t B = x.size(0), D = x.size(1);
  Tensor rel = at::empty({B, B}, x.options());
  Tensor dist = at::empty({B, B}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "intra_relevance_fwd", [&] {
    scalar_t* r = rel.data_ptr<scalar_t>();
    scalar_t* d = dist.data_ptr<scalar_t>();
    pairwise_dist(x.data_ptr<scalar_t>(), B, D, d);
    at::parallel_for(0, B, kRowGrain, [&](int64_t b0, int64_t b1) {
      for (int64_t i = b0; i < b1; ++i) relevance_row(d + i * B, B, i, scalar_t(sigma), r + i * B);
    });
  });
  return {rel, dist};
}

// Pairs closer than this fraction of the larger row norm take the exact-difference path in the
// backward; the others go through one GEMM, where writing W_ij (x_i - x_j) as W_ij x_i - W_ij x_j
// amplifies rounding by at most |x| / d_ij <= 1 / kNearPair.
constexpr double kNearPair = 0.25;

// dX_i = sum_j W_ij (x_i - x_j) with W_ij = -(gt_ij + gt_ji) rel_ij / (sigma d_ij) (0 where
// d_ij == 0), from the total upstream gradient `gt` of an intra block (row stride ld_gt), the
// relevance block (row stride ld_rel) and the distances.
// Far pairs: dX = diag(W_far 1) X - W_far X (one GEMM). Near pairs (d_ij <= kNearPair *
// max(|x_i|, |x_j|), e.g. near-duplicate rows, where W_ij ~ 1 / d_ij is large and the GEMM form
// would cancel catastrophically): added with exact differences, like the reference's cdist backward.
template <typename scalar_t>
Tensor intra_backward(const scalar_t* gt, int64_t ld_gt, const scalar_t* rel, int64_t ld_rel,
                      const scalar_t* dist, const Tensor& x, double sigma) {
  const int64_t B = x.size(0), D = x.size(1);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  std::vector<scalar_t> norms(B), rsum(B);
  for (int64_t i = 0; i < B; ++i) norms[i] = std::sqrt(row_dot(xp + i * D, xp + i * D, D));
  Tensor Wfar = at::empty({B, B}, x.options());
  scalar_t* w = Wfar.data_ptr<scalar_t>();
  std::vector<std::vector<std::pair<int64_t, scalar_t>>> near(B);
  const scalar_t sg = scalar_t(sigma), cnear = scalar_t(kNearPair);
  at::parallel_for(0, B, kRowGrain, [&](int64_t b0, int64_t b1) {
    for (int64_t i = b0; i < b1; ++i) {
      scalar_t acc = 0;
      for (int64_t j = 0; j < B; ++j) {
        const scalar_t dij = dist[i * B + j];
        scalar_t val = 0;
        if (!(dij == scalar_t(0))) {  // diagonal / duplicates: subgradient 0 (NaN propagates)
          val = -(gt[i * ld_gt + j] + gt[j * ld_gt + i]) * rel[i * ld_rel + j] / (sg * dij);
          if (dij <= cnear * std::max(norms[i], norms[j])) {
            near[i].emplace_back(j, val);
            val = 0;
          }
        }
        w[i * B + j] = val;
        acc += val;
      }
      rsum[i] = acc;
    }
  });
  Tensor out = at::mm(Wfar, x);  // W_far X
  scalar_t* o = out.data_ptr<scalar_t>();
  at::parallel_for(0, B, kRowGrain, [&](int64_t b0, int64_t b1) {
    using Vec = at::vec::Vectorized<scalar_t>;
    for (int64_t i = b0; i < b1; ++i) {
      scalar_t* orow = o + i * D;
      const scalar_t* xi = xp + i * D;
      const Vec ri(rsum[i]);
      int64_t k = 0;
      for (; k + Vec::size() <= D; k += Vec::size())
        at::vec::fmsub(ri, Vec::loadu(xi + k), Vec::loadu(orow + k)).store(orow + k);
      for (; k < D; ++k) orow[k] = rsum[i] * xi[k] - orow[k];
      for (const auto& [j, wij] : near[i]) {  // exact differences for near pairs
        const scalar_t* xj = xp + j * D;
        const Vec vw(wij);
        k = 0;
        for (; k + Vec::size() <= D; k += Vec::size())
          at::vec::fmadd(vw, Vec::loadu(xi + k) - Vec::loadu(xj + k), Vec::loadu(orow + k))
              .store(orow + k);
        for (; k < D; ++k) orow[k] += wij * (xi[k] - xj[k]);
      }
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
      std::vector<typename TopkKey<scalar_t>::type> idx;
      for (int64_t r = r0; r < r1; ++r) topk_row_mask(sp + r * C, C, k, mp + r * C, idx);
    });
  });
  return mask;
}

// ---------------------------------------------------------------------------------------------
// instance_correlation forward. score_v / score_t (B x B) rank the intra-modal neighbours (the
// caller passes v v^T and t t^T, computed exactly as the reference does so that ties agree);
// rel_i2t / rel_t2i rank the inter-modal ones. Distances first (tiled), then one pass over the 2B
// output rows: relevance, both connection blocks, attention bias.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> instance_fwd(
    const Tensor& v_in, const Tensor& t_in, const Tensor& sv_in, const Tensor& st_in,
    const Tensor& i2t_in, const Tensor& t2i_in, double sigma, int64_t k_intra, int64_t k_inter,
    double lam) {
  check_cpu_float(v_in, "v", 2);
  check_cpu_float(t_in, "t", 2);
  check_cpu_float(sv_in, "score_v", 2);
  check_cpu_float(st_in, "score_t", 2);
  check_cpu_float(i2t_in, "rel_i2t", 2);
  check_cpu_float(t2i_in, "rel_t2i", 2);
  TORCH_CHECK(sigma > 0, "sigma must be > 0, got ", sigma);
  const Tensor v = v_in.contiguous(), t = t_in.contiguous();
  const auto st = v.scalar_type();
  for (const Tensor* x : {&t_in, &sv_in, &st_in, &i2t_in, &t2i_in})
    TORCH_CHECK(x->scalar_type() == st, "v, t, scores, rel_i2t, rel_t2i must share one dtype");
  const int64_t B = v.size(0), D = v.size(1);
  TORCH_CHECK(t.sizes() == v.sizes(), "t must have the shape of v ", v.sizes(), ", got ",
              t.sizes());
  for (const Tensor* x : {&sv_in, &st_in, &i2t_in, &t2i_in})
    TORCH_CHECK(x->sizes() == at::IntArrayRef({B, B}), "scores and relevances must be (", B,
                ", ", B, "), got ", x->sizes());
  const Tensor sv = sv_in.contiguous(), stt = st_in.contiguous();
  const Tensor i2t = i2t_in.contiguous(), t2i = t2i_in.contiguous();
  const int64_t N = 2 * B;
  Tensor rel = at::empty({N, N}, v.options());
  Tensor conn = at::empty({N, N}, v.options().dtype(at::kBool));
  Tensor bias = at::empty({N, N}, v.options());
  Tensor dist_v = at::empty({B, B}, v.options());
  Tensor dist_t = at::empty({B, B}, v.options());
  AT_DISPATCH_FLOATING_TYPES(st, "instance_correlation_fwd", [&] {
    scalar_t* dv = dist_v.data_ptr<scalar_t>();
    scalar_t* dt = dist_t.data_ptr<scalar_t>();
    pairwise_dist(v.data_ptr<scalar_t>(), B, D, dv);
    pairwise_dist(t.data_ptr<scalar_t>(), B, D, dt);
    const scalar_t* svp = sv.data_ptr<scalar_t>();
    const scalar_t* stp = stt.data_ptr<scalar_t>();
    const scalar_t* ri2t = i2t.data_ptr<scalar_t>();
    const scalar_t* rt2i = t2i.data_ptr<scalar_t>();
    scalar_t* rp = rel.data_ptr<scalar_t>();
    bool* cp = conn.data_ptr<bool>();
    scalar_t* bp = bias.data_ptr<scalar_t>();
    const scalar_t sg = scalar_t(sigma);
    const scalar_t lamc = scalar_t(lam);
    const scalar_t ninf = -std::numeric_limits<scalar_t>::infinity();
    at::parallel_for(0, N, kRowGrain, [&](int64_t r0, int64_t r1) {
      std::vector<typename TopkKey<scalar_t>::type> idx;
      for (int64_t r = r0; r < r1; ++r) {
        const bool img = r < B;
        const int64_t i = img ? r : r - B;
        scalar_t* row = rp + r * N;
        bool* crow = cp + r * N;
        const int64_t intra0 = img ? 0 : B, inter0 = img ? B : 0;
        relevance_row((img ? dv : dt) + i * B, B, i, sg, row + intra0);
        const scalar_t* inter_src = (img ? ri2t : rt2i) + i * B;
        std::copy(inter_src, inter_src + B, row + inter0);
        topk_row_mask((img ? svp : stp) + i * B, B, k_intra, crow + intra0, idx);
        topk_row_mask(inter_src, B, k_inter, crow + inter0, idx);
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
      "corr_instance_fwd(Tensor v, Tensor t, Tensor score_v, Tensor score_t, Tensor rel_i2t, "
      "Tensor rel_t2i, float sigma, int k_intra, int k_inter, float lam) "
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
