// C++ CPU backend of the message-passing ops of the instance graph (docs/DESIGN.md "Ops
// contract"; method: /work/shared/docs/aahr-method.md 2.6, GCN stage and GAT stage).
//
// gcn_layer:  out = LeakyReLU_s(A (X W) + b)   (no degree normalisation, no added self-loops)
//   The cheaper association is used: (X W) first when Dout <= Din, else (A X) first.
//   Forward: one GEMM + one addmm that adds the bias inside the BLAS call, then the activation
//   in place. Backward: one fused pass gives dZ = g * (Z > 0 ? 1 : s) and db = sum_rows dZ
//   (the activation mask is recovered from the output sign when s >= 0, so Z is not stored),
//   then the GEMMs of the chain rule.
//
// masked_attention:  P = softmax_j(q_i . k_j / sqrt(dh) + bias_ij),  out = P v  (per head)
//   bias (n, n) shared by the heads or (H, n, n); -inf marks "not connected"; a row with no
//   connection (all -inf) gets P = 0, out = 0 and zero gradients. Head by head (the head's (n, n)
//   block stays in cache): forward = GEMM for the logits, one fused pass per row (scale, bias,
//   max, exp, normalise, fully-masked rows) in place, GEMM for P v; the probabilities P are kept.
//   Backward: dP = dO v^T into one reused (n, n) buffer; a fused pass per row computes
//   dS = P * (dP - sum_j P dP), adds dS to d_bias and scales it by 1/sqrt(dh); then dq = dS k,
//   dk = dS^T q, dv = P^T dO.

#include <torch/library.h>

#include <array>

#include "d2_common.h"

namespace aahr_fast {
namespace d2 {
namespace {

using at::Tensor;

// Activation in place over n elements: z = z > 0 ? z : s * z.
template <typename scalar_t>
void leaky_inplace(scalar_t* z, int64_t n, scalar_t s) {
  at::parallel_for(0, n, 1 << 14, [&](int64_t a, int64_t b) {
    using Vec = at::vec::Vectorized<scalar_t>;
    const Vec zero(scalar_t(0)), vs(s);
    int64_t i = a;
    for (; i + Vec::size() <= b; i += Vec::size()) {
      Vec x = Vec::loadu(z + i);
      Vec::blendv(x * vs, x, x > zero).store(z + i);
    }
    for (; i < b; ++i) z[i] = z[i] > scalar_t(0) ? z[i] : s * z[i];
  });
}

// gcn_layer forward. Returns (out, mid, pre) where mid = X W (xw_first) or A X, and pre is the
// pre-activation (only kept when negative_slope < 0, else an empty tensor).
std::tuple<Tensor, Tensor, Tensor> gcn_fwd(const Tensor& adj_in, const Tensor& x_in,
                                           const Tensor& w_in,
                                           const c10::optional<Tensor>& b_opt,
                                           double slope) {
  check_cpu_float(adj_in, "adj", 2);
  check_cpu_float(x_in, "x", 2);
  check_cpu_float(w_in, "weight", 2);
  const auto st = x_in.scalar_type();
  TORCH_CHECK(adj_in.scalar_type() == st && w_in.scalar_type() == st,
              "adj, x, weight must share one dtype");
  const int64_t n = x_in.size(0), din = x_in.size(1), dout = w_in.size(1);
  TORCH_CHECK(adj_in.size(0) == n && adj_in.size(1) == n, "adj must be (", n, ", ", n,
              "), got ", adj_in.sizes());
  TORCH_CHECK(w_in.size(0) == din, "weight must be (", din, ", Dout), got ", w_in.sizes());
  const bool has_b = b_opt.has_value() && b_opt->defined();
  if (has_b) {
    TORCH_CHECK(b_opt->dim() == 1 && b_opt->size(0) == dout && b_opt->scalar_type() == st,
                "bias must be (", dout, ",) of dtype ", st);
  }
  const bool xw_first = dout <= din;
  Tensor mid, z;
  if (xw_first) {
    mid = at::mm(x_in, w_in);
    z = has_b ? at::addmm(*b_opt, adj_in, mid) : at::mm(adj_in, mid);
  } else {
    mid = at::mm(adj_in, x_in);
    z = has_b ? at::addmm(*b_opt, mid, w_in) : at::mm(mid, w_in);
  }
  z = z.contiguous();
  Tensor pre = slope < 0 ? z.clone() : at::empty({0}, z.options());
  AT_DISPATCH_FLOATING_TYPES(st, "gcn_fwd", [&] {
    leaky_inplace<scalar_t>(z.data_ptr<scalar_t>(), z.numel(), scalar_t(slope));
  });
  return {z, mid, pre};
}

// gcn_layer backward. `act` is the forward output (slope >= 0) or the pre-activation (slope < 0);
// the mask is act > 0 in both cases. needs = (adj, x, weight, bias).
std::tuple<Tensor, Tensor, Tensor, Tensor> gcn_bwd(const Tensor& g_in, const Tensor& adj,
                                                   const Tensor& x, const Tensor& w,
                                                   const Tensor& mid, const Tensor& act,
                                                   double slope, std::array<bool, 4> needs) {
  const Tensor g = g_in.contiguous().to(act.scalar_type());
  const int64_t n = act.size(0), dout = act.size(1);
  Tensor gz = at::empty({n, dout}, act.options());
  Tensor gb = at::empty({dout}, act.options());
  AT_DISPATCH_FLOATING_TYPES(act.scalar_type(), "gcn_bwd_mask", [&] {
    const scalar_t* gp = g.data_ptr<scalar_t>();
    const scalar_t* ap = act.data_ptr<scalar_t>();
    scalar_t* gzp = gz.data_ptr<scalar_t>();
    scalar_t* gbp = gb.data_ptr<scalar_t>();
    const scalar_t s = scalar_t(slope);
    // Column chunks: each task owns its bias-gradient entries, so no reduction across threads.
    at::parallel_for(0, dout, 128, [&](int64_t c0, int64_t c1) {
      using Vec = at::vec::Vectorized<scalar_t>;
      const Vec zero(scalar_t(0)), one(scalar_t(1)), vs(s);
      std::fill(gbp + c0, gbp + c1, scalar_t(0));
      for (int64_t r = 0; r < n; ++r) {
        const scalar_t* grow = gp + r * dout;
        const scalar_t* arow = ap + r * dout;
        scalar_t* zrow = gzp + r * dout;
        int64_t c = c0;
        for (; c + Vec::size() <= c1; c += Vec::size()) {
          const Vec a = Vec::loadu(arow + c);
          const Vec v = Vec::loadu(grow + c) * Vec::blendv(vs, one, a > zero);
          v.store(zrow + c);
          (Vec::loadu(gbp + c) + v).store(gbp + c);
        }
        for (; c < c1; ++c) {
          const scalar_t v = grow[c] * (arow[c] > scalar_t(0) ? scalar_t(1) : s);
          zrow[c] = v;
          gbp[c] += v;
        }
      }
    });
  });
  Tensor ga, gx, gw;
  const bool xw_first = w.size(1) <= w.size(0);
  if (xw_first) {  // mid = X W;  Z = A mid + b
    if (needs[0]) ga = at::mm(gz, mid.t());
    if (needs[1] || needs[2]) {
      const Tensor gmid = at::mm(adj.t(), gz);
      if (needs[1]) gx = at::mm(gmid, w.t());
      if (needs[2]) gw = at::mm(x.t(), gmid);
    }
  } else {  // mid = A X;  Z = mid W + b
    if (needs[2]) gw = at::mm(mid.t(), gz);
    if (needs[0] || needs[1]) {
      const Tensor gmid = at::mm(gz, w.t());
      if (needs[0]) ga = at::mm(gmid, x.t());
      if (needs[1]) gx = at::mm(adj.t(), gmid);
    }
  }
  const auto empty = at::empty({0}, act.options());
  return {needs[0] ? ga : empty, needs[1] ? gx : empty, needs[2] ? gw : empty,
          needs[3] ? gb : empty};
}

// ---------------------------------------------------------------------------------------------
// Softmax rows [r0, r1) of one head's logits in place: row = softmax(row * scale + bias_row); a row
// whose bias is -inf everywhere (no connection) becomes all zeros and is flagged in `masked` (decided from
// the bias alone, as in the reference, so a NaN / inf in q or k cannot turn a masked row into NaN).
template <typename scalar_t>
void softmax_rows(scalar_t* S, const scalar_t* bias, int64_t n, int64_t r0, int64_t r1,
                  scalar_t scale, char* masked) {
  using Vec = at::vec::Vectorized<scalar_t>;
  const Vec vsc(scale);
  const scalar_t ninf = -std::numeric_limits<scalar_t>::infinity();
  for (int64_t r = r0; r < r1; ++r) {
    scalar_t* row = S + r * n;
    masked[r] = row_max(bias + r * n, n) == ninf;  // NaN propagates: a NaN bias is "connected"
    if (masked[r]) {
      std::fill(row, row + n, scalar_t(0));
      continue;
    }
    at::vec::map2([vsc](Vec x, Vec b) { return at::vec::fmadd(x, vsc, b); }, row, row,
                  bias + r * n, n);
    const scalar_t m = row_max(row, n);
    exp_affine(row, row, n, scalar_t(1), -m);
    const Vec inv(scalar_t(1) / row_sum(row, n));
    at::vec::map([inv](Vec x) { return x * inv; }, row, row, n);
  }
}

// masked_attention forward. Returns (out (H,n,dv), P (H,n,n)). Head by head, so the (n, n) logits
// of a head stay in cache between the GEMM that writes them, the softmax pass and the GEMM P v.
std::tuple<Tensor, Tensor> attn_fwd(const Tensor& q, const Tensor& k, const Tensor& v,
                                    const Tensor& bias_in, double scale) {
  check_cpu_float(q, "q", 3);
  check_cpu_float(k, "k", 3);
  check_cpu_float(v, "v", 3);
  TORCH_CHECK(bias_in.dim() == 2 || bias_in.dim() == 3, "bias must be (n, n) or (H, n, n), got ",
              bias_in.sizes());
  const auto st = q.scalar_type();
  TORCH_CHECK(k.scalar_type() == st && v.scalar_type() == st && bias_in.scalar_type() == st,
              "q, k, v, bias must share one dtype");
  const int64_t H = q.size(0), n = q.size(1);
  TORCH_CHECK(k.sizes() == q.sizes(), "k must have the shape of q ", q.sizes(), ", got ",
              k.sizes());
  TORCH_CHECK(v.size(0) == H && v.size(1) == n, "v must be (", H, ", ", n, ", dv), got ",
              v.sizes());
  const bool per_head = bias_in.dim() == 3;
  TORCH_CHECK(per_head ? bias_in.sizes() == at::IntArrayRef({H, n, n})
                       : bias_in.sizes() == at::IntArrayRef({n, n}),
              "bias must be (", n, ", ", n, ") or (", H, ", ", n, ", ", n, "), got ", bias_in.sizes());
  const Tensor bias = bias_in.contiguous();
  Tensor P = at::empty({H, n, n}, q.options());
  Tensor out = at::empty({H, n, v.size(2)}, q.options());
  AT_DISPATCH_FLOATING_TYPES(st, "attn_fwd", [&] {
    const scalar_t* bp = bias.data_ptr<scalar_t>();
    std::vector<char> masked(n);
    for (int64_t h = 0; h < H; ++h) {
      Tensor Ph = P.select(0, h), Oh = out.select(0, h);
      at::mm_out(Ph, q.select(0, h), k.select(0, h).t());
      scalar_t* pp = Ph.data_ptr<scalar_t>();
      const scalar_t* bh = bp + (per_head ? h * n * n : 0);
      at::parallel_for(0, n, kRowGrain, [&](int64_t r0, int64_t r1) {
        softmax_rows(pp, bh, n, r0, r1, scalar_t(scale), masked.data());
      });
      at::mm_out(Oh, Ph, v.select(0, h));
      for (int64_t r = 0; r < n; ++r) {  // exactly 0, even where v holds NaN / inf (0 * inf)
        if (masked[r]) Oh.select(0, r).zero_();
      }
    }
  });
  return {out, P};
}

// masked_attention backward. needs = (q, k, v, bias). Returns (dq, dk, dv, dbias).
// Head by head with one reused (n, n) buffer (cache-resident): dP = dO v^T; one pass per row gives
// dS = P * (dP - sum_j P dP), adds it to d_bias (summed over heads in order: deterministic) and
// scales it by 1/sqrt(dh) in place; then dq = dS k, dk = dS^T q; dv = P^T dO.
std::tuple<Tensor, Tensor, Tensor, Tensor> attn_bwd(const Tensor& go_in, const Tensor& q,
                                                    const Tensor& k, const Tensor& v,
                                                    const Tensor& P, double scale,
                                                    bool per_head, std::array<bool, 4> needs) {
  const Tensor go = go_in.to(P.scalar_type());
  const int64_t H = P.size(0), n = P.size(1);
  const auto empty = at::empty({0}, P.options());
  Tensor dq = needs[0] ? at::empty(q.sizes(), P.options()) : empty;
  Tensor dk = needs[1] ? at::empty(k.sizes(), P.options()) : empty;
  Tensor dv = needs[2] ? at::empty(v.sizes(), P.options()) : empty;
  Tensor db = needs[3] ? at::zeros(per_head ? at::IntArrayRef({H, n, n}) : at::IntArrayRef({n, n}),
                                   P.options())
                       : empty;
  const bool need_ds = needs[0] || needs[1] || needs[3];
  Tensor dS = need_ds ? at::empty({n, n}, P.options()) : empty;
  AT_DISPATCH_FLOATING_TYPES(P.scalar_type(), "attn_bwd", [&] {
    const scalar_t sc = scalar_t(scale);
    for (int64_t h = 0; h < H; ++h) {
      const Tensor Ph = P.select(0, h), gh = go.select(0, h);
      if (needs[2]) {
        Tensor dvh = dv.select(0, h);
        at::mm_out(dvh, Ph.t(), gh);
      }
      if (!need_ds) continue;
      at::mm_out(dS, gh, v.select(0, h).t());  // dP
      scalar_t* dp = dS.data_ptr<scalar_t>();
      const scalar_t* pp = Ph.data_ptr<scalar_t>();
      scalar_t* dbh = needs[3] ? db.data_ptr<scalar_t>() + (per_head ? h * n * n : 0) : nullptr;
      at::parallel_for(0, n, kRowGrain, [&](int64_t r0, int64_t r1) {
        using Vec = at::vec::Vectorized<scalar_t>;
        const Vec vsc(sc);
        for (int64_t i = r0; i < r1; ++i) {
          scalar_t* drow = dp + i * n;
          const scalar_t* prow = pp + i * n;
          const scalar_t dl = row_dot(prow, drow, n);  // sum_j P_ij dP_ij
          const Vec delta(dl);
          scalar_t* dbrow = dbh ? dbh + i * n : nullptr;
          int64_t j = 0;
          for (; j + Vec::size() <= n; j += Vec::size()) {
            const Vec ds = Vec::loadu(prow + j) * (Vec::loadu(drow + j) - delta);
            if (dbrow) (Vec::loadu(dbrow + j) + ds).store(dbrow + j);
            (ds * vsc).store(drow + j);
          }
          for (; j < n; ++j) {
            const scalar_t ds = prow[j] * (drow[j] - dl);
            if (dbrow) dbrow[j] += ds;
            drow[j] = ds * sc;
          }
        }
      });
      if (needs[0]) {
        Tensor dqh = dq.select(0, h);
        at::mm_out(dqh, dS, k.select(0, h));
      }
      if (needs[1]) {
        Tensor dkh = dk.select(0, h);
        at::mm_out(dkh, dS.t(), q.select(0, h));
      }
    }
  });
  return {dq, dk, dv, db};
}

}  // namespace
}  // namespace d2
}  // namespace aahr_fast

TORCH_LIBRARY_FRAGMENT(aahr_fast, m) {
  m.def(
      "mp_gcn_fwd(Tensor adj, Tensor x, Tensor weight, Tensor? bias, float negative_slope) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "mp_gcn_bwd(Tensor grad, Tensor adj, Tensor x, Tensor weight, Tensor mid, Tensor act, "
      "float negative_slope, bool[4] needs) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "mp_attn_fwd(Tensor q, Tensor k, Tensor v, Tensor bias, float scale) -> (Tensor, Tensor)");
  m.def(
      "mp_attn_bwd(Tensor grad, Tensor q, Tensor k, Tensor v, Tensor probs, float scale, "
      "bool per_head_bias, bool[4] needs) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(aahr_fast, CPU, m) {
  m.impl("mp_gcn_fwd", &aahr_fast::d2::gcn_fwd);
  m.impl("mp_gcn_bwd", &aahr_fast::d2::gcn_bwd);
  m.impl("mp_attn_fwd", &aahr_fast::d2::attn_fwd);
  m.impl("mp_attn_bwd", &aahr_fast::d2::attn_bwd);
}
