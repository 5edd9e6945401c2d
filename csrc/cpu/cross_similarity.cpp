// Fused region-word cross similarity on CPU: forward and backward of
//   "relevance" (AAHR/SCAN: LeakyReLU cosine, L2 normalisation over words resp. regions, max, mean)
//   "hard_mean" / "hard_lse" (CHAN hard assignment: max over regions, mean / temperature log-sum-exp over words).
// Layout of the work and memory bound: see cross_similarity.h. The math follows the plain-PyTorch reference
// aahr_fast/ops/cross_similarity.py (aahr-method.md section 2.6); derivations of the backward are inline.
#include "cross_similarity.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "common.h"

namespace aahr_fast {
namespace cpu {
namespace {

enum class Mode { Relevance, HardMean, HardLse };

Mode parse_mode(c10::string_view mode) {
  if (mode == "relevance") return Mode::Relevance;
  if (mode == "hard_mean") return Mode::HardMean;
  if (mode == "hard_lse") return Mode::HardLse;
  TORCH_CHECK(false, "cross_similarity: mode must be 'relevance', 'hard_mean' or 'hard_lse', got '",
              std::string(mode.data(), mode.size()), "'");
}

// max that propagates NaN (like torch.max): once a NaN is seen it stays.
template <typename T>
inline T nan_max(T a, T b) {
  return (b > a || std::isnan(b)) ? b : a;
}

template <typename T>
inline T leaky(T c, T slope) {
  return c > T(0) ? c : slope * c;
}

// Row loops of the epilogue: f(r, count) on lanes [r, r + count) of a row of n elements, count = V for the
// full vectors and count = n mod V (> 0) once for the ragged tail, which goes through the same vector code
// with partial loads / stores (Vec::loadu(ptr, count) reads lanes [0, count) and zeroes the rest;
// vec.store(ptr, count) writes lanes [0, count) only). The tail's dead lanes must be neutralised where they
// enter a reduction: masked_or(fill, v, count) puts `fill` there (-inf for maxima, 0 for sums).
template <typename T, typename F>
C10_ALWAYS_INLINE void for_lanes(int64_t n, const F& f) {
  constexpr int64_t V = at::vec::Vectorized<T>::size();
  int64_t r = 0;
  for (; r + V <= n; r += V) f(r, V);
  if (r < n) f(r, n - r);
}

template <typename T>
C10_ALWAYS_INLINE at::vec::Vectorized<T> masked_or(const at::vec::Vectorized<T>& fill,
                                                   const at::vec::Vectorized<T>& v, int64_t count) {
  return count >= at::vec::Vectorized<T>::size() ? v : at::vec::Vectorized<T>::set(fill, v, count);
}

// op over the lanes of v in log2(V) halving steps in registers, no branches on the data: ATen's shuffle
// reduction for float; for double (where ATen's vec_reduce_all goes through memory) deinterleave2 steps.
template <typename T, typename Op>
inline T reduce_lanes(at::vec::Vectorized<T> v, const Op& op) {
  using Vec = at::vec::Vectorized<T>;
  if constexpr (std::is_same_v<T, float>) return at::vec::vec_reduce_all<float>(op, v);
  for (int64_t h = Vec::size(); h > 1; h /= 2) {
    const auto eo = at::vec::deinterleave2(v, v);
    v = op(eo.first, eo.second);
  }
  __at_align__ T out[Vec::size()];
  v.store(out);
  return out[0];
}

// Horizontal sum and NaN-propagating max / min of the lanes.
template <typename T>
inline T hsum(const at::vec::Vectorized<T>& v) {
  return reduce_lanes(v, [](const auto& x, const auto& y) { return x + y; });
}

template <typename T>
inline T hmax(const at::vec::Vectorized<T>& v) {
  return reduce_lanes(v, [](const auto& x, const auto& y) { return at::vec::maximum(x, y); });
}

template <typename T>
inline T hmin(const at::vec::Vectorized<T>& v) {
  return reduce_lanes(v, [](const auto& x, const auto& y) { return at::vec::minimum(x, y); });
}

// Lane-parallel first-argmax with the scalar loop's rule "replace iff u > best, or u is NaN and best is
// not" (ties -> lowest index, the first NaN wins over numbers). Lane k sees indices congruent to k mod V
// in increasing order; finish() combines the lanes: the smallest index among the NaN lanes if any lane
// holds a NaN, else the smallest index among the lanes equal to the maximum. Indices are carried as T
// (exact below 2^24 for float).
template <typename T>
struct LaneArgMax {
  using Vec = at::vec::Vectorized<T>;
  Vec best{-std::numeric_limits<T>::infinity()};
  Vec arg{T(0)};
  // u: candidates for indices idx (lanes of a ragged tail must hold -inf so they never win)
  C10_ALWAYS_INLINE void update(const Vec& u, const Vec& idx) {
    const Vec take = (u > best) | ((u != u) & (best == best));
    best = Vec::blendv(best, u, take);
    arg = Vec::blendv(arg, idx, take);
  }
  int64_t finish() const {
    const T m = hmax(best);
    const Vec cand = std::isnan(m) ? (best != best) : (best == Vec(m));
    const Vec idx = Vec::blendv(Vec(std::numeric_limits<T>::infinity()), arg, cand);
    return static_cast<int64_t>(hmin(idx));
  }
};

// Tiling of the (caption x image) grid. Tile = cap_per_block captions x img_per_block images, sized so
// that the score buffer is about rows x cols fragments (see make_geometry).
struct Geometry {
  int64_t bi = 0, bt = 0, d = 0;
  std::vector<int64_t> roff, woff;
  int64_t img_per_block = 1, cap_per_block = 1, n_iblk = 1, n_cblk = 1;
  int64_t max_n = 0, max_l = 0, max_rows = 0, max_cols = 0;

  int64_t i0(int64_t ib) const { return ib * img_per_block; }
  int64_t i1(int64_t ib) const { return std::min(bi, (ib + 1) * img_per_block); }
  int64_t j0(int64_t cb) const { return cb * cap_per_block; }
  int64_t j1(int64_t cb) const { return std::min(bt, (cb + 1) * cap_per_block); }
};

// Tile size target in fragments (rows = words, cols = regions). AAHR_XSIM_TILE="ROWSxCOLS" fixes it
// (tests, tuning); otherwise 1024x1024 on one thread (a 4 MiB float32 score buffer: 3% faster than
// 512x512 at B=128, N=36/49, D=1024, AVX-512 build) and 512x512 with more threads (1 MiB per thread:
// measured 89-94% of the fp32 torch.mm rate, vs 81-83% for 128x128; 1024-wide tiles leave two threads
// with unequal shares of a B=128 batch, 1.3x slower), halved while the grid is too coarse for the thread
// count (forward: >= 2 tiles per thread; backward rounds: >= 1 tile per thread per round).
bool tile_target_from_env(int64_t& rows, int64_t& cols) {
  if (const char* env = std::getenv("AAHR_XSIM_TILE")) {
    long r = 0, c = 0;
    if (std::sscanf(env, "%ldx%ld", &r, &c) == 2 && r > 0 && c > 0) {
      rows = r;
      cols = c;
      return true;
    }
  }
  return false;
}

void set_blocks(Geometry& g, int64_t target_rows, int64_t target_cols) {
  const double avg_n = double(g.roff.back()) / double(g.bi);
  const double avg_l = double(g.woff.back()) / double(g.bt);
  g.img_per_block = std::clamp<int64_t>(int64_t(std::lround(target_cols / avg_n)), 1, g.bi);
  g.cap_per_block = std::clamp<int64_t>(int64_t(std::lround(target_rows / avg_l)), 1, g.bt);
  g.n_iblk = ceil_div(g.bi, g.img_per_block);
  g.n_cblk = ceil_div(g.bt, g.cap_per_block);
}

Geometry make_geometry(const at::Tensor& region_lens, const at::Tensor& word_lens, int64_t d) {
  Geometry g;
  g.bi = region_lens.numel();
  g.bt = word_lens.numel();
  g.d = d;
  g.roff = offsets_of(region_lens);
  g.woff = offsets_of(word_lens);
  for (int64_t i = 0; i < g.bi; ++i) g.max_n = std::max(g.max_n, g.roff[i + 1] - g.roff[i]);
  for (int64_t j = 0; j < g.bt; ++j) g.max_l = std::max(g.max_l, g.woff[j + 1] - g.woff[j]);
  const int64_t nt = std::max<int64_t>(1, at::get_num_threads());
  int64_t target_rows = nt == 1 ? 1024 : 512, target_cols = target_rows;
  if (tile_target_from_env(target_rows, target_cols)) {
    set_blocks(g, target_rows, target_cols);
  } else {
    for (;;) {
      set_blocks(g, target_rows, target_cols);
      const bool enough = g.n_cblk * g.n_iblk >= 2 * nt && std::min(g.n_cblk, g.n_iblk) >= nt;
      const bool can_shrink = (g.cap_per_block > 1 || g.img_per_block > 1) && target_rows > 32;
      if (enough || !can_shrink) break;
      target_rows /= 2;
      target_cols /= 2;
    }
  }
  for (int64_t ib = 0; ib < g.n_iblk; ++ib) g.max_cols = std::max(g.max_cols, g.roff[g.i1(ib)] - g.roff[g.i0(ib)]);
  for (int64_t cb = 0; cb < g.n_cblk; ++cb) g.max_rows = std::max(g.max_rows, g.woff[g.j1(cb)] - g.woff[g.j0(cb)]);
  return g;
}

// Per-thread scratch of one pair block (N = regions of the image, L = words of the caption). The per-region
// arrays are padded to a whole number of vectors (np = ceil(N / V) * V) so that the row loops read and
// write them with full-width loads / stores, also in the ragged tail (a masked store followed by a masked
// load of the same address in the next row cannot be store-forwarded and stalls). Lanes >= N of these
// arrays are filled before use and masked out before every reduction, so they never reach a result.
template <typename T>
struct Scratch {
  static int64_t padded(int64_t n) {
    constexpr int64_t V = at::vec::Vectorized<T>::size();
    return ceil_div(n, V) * V;
  }
  std::vector<T> colss, colinv, coln, colmax, colaux, colc, colargf, colg;
  std::vector<T> rowinv, rown, rowaux, rowc;
  std::vector<int64_t> colarg, rowarg;
  Scratch(int64_t n, int64_t l)
      : colss(padded(n)), colinv(padded(n)), coln(padded(n)), colmax(padded(n)), colaux(padded(n)),
        colc(padded(n)), colargf(padded(n)), colg(padded(n)), rowinv(l), rown(l), rowaux(l), rowc(l), colarg(n),
        rowarg(l) {}
};

// One tile buffer of max_rows x max_cols scores per intra-op thread, allocated once by the calling thread
// from the torch allocator (so that the profiler-based memory measure, which sees only the calling
// thread's allocations, counts every thread's buffer); thread t uses data(at::get_thread_num()).
template <typename T>
struct TileBuffers {
  at::Tensor storage;
  int64_t stride;
  TileBuffers(const Geometry& g, const at::Tensor& like)
      : storage(at::empty({std::max<int64_t>(1, at::get_num_threads()), g.max_rows * g.max_cols}, like.options())),
        stride(g.max_rows * g.max_cols) {}
  T* data(int64_t thread) {
    TORCH_CHECK(thread >= 0 && thread < storage.size(0), "tile buffer for thread ", thread, " of ",
                storage.size(0));
    return storage.data_ptr<T>() + thread * stride;
  }
};

// One tile's raw scores: buf (rows x cols) = W[row0:row0+rows] @ R[col0:col0+cols]^T.
template <typename T>
at::Tensor tile_scores(T* buf, const at::Tensor& W, const at::Tensor& R, int64_t row0, int64_t rows, int64_t col0,
                       int64_t cols) {
  at::Tensor out = at::from_blob(buf, {rows, cols}, W.options());
  at::mm_out(out, W.narrow(0, row0, rows), R.narrow(0, col0, cols).t());
  return out;
}

// Pass 1 of the relevance epilogue on one pair block p (L x N, leading dimension ld), in place:
// p <- c = dot * iw * ir (the cosines), or s = LeakyReLU(c) when kStoreLeaky (the forward needs only s);
// row / column sums of s^2 -> rown / rowinv = 1 / (rown + eps), coln / colinv.
template <typename T, bool kStoreLeaky>
inline void relevance_pass1(T* p, int64_t ld, int64_t L, int64_t N, const T* iw, const T* ir, T slope, T eps,
                            Scratch<T>& sc) {
  using Vec = at::vec::Vectorized<T>;
  const Vec vslope(slope), vzero(T(0)), vone(T(1)), veps(eps);
  T* colss = sc.colss.data();
  std::fill(colss, colss + Scratch<T>::padded(N), T(0));
  for (int64_t w = 0; w < L; ++w) {
    T* row = p + w * ld;
    const Vec viw(iw[w]);
    Vec acc(T(0));
    for_lanes<T>(N, [&](int64_t r, int64_t n) C10_ALWAYS_INLINE_ATTRIBUTE {
      const Vec c = Vec::loadu(row + r, n) * viw * Vec::loadu(ir + r, n);
      const Vec s = Vec::blendv(c * vslope, c, c > vzero);
      (kStoreLeaky ? s : c).store(row + r, n);
      // dead lanes zeroed on the operand, not the product, so that body and tail lanes compile to the same
      // (possibly FMA-contracted) arithmetic: identical columns must get bitwise-identical norms, or a tie
      // between them would be broken by rounding instead of by the lowest index
      const Vec sm = masked_or(vzero, s, n);
      const Vec s2 = sm * sm;
      acc = acc + s2;
      (Vec::loadu(colss + r) + s2).store(colss + r);  // padded scratch: full width
    });
    sc.rown[w] = hsum(acc);  // sum of squares; the norm below
  }
  // norms and 1 / (norm + eps) of the rows and the columns (IEEE sqrt and division: as the scalar forms)
  const auto norms = [&](const T* ss, T* nrm_out, T* inv_out, int64_t n_all) {
    for_lanes<T>(n_all, [&](int64_t r, int64_t n) C10_ALWAYS_INLINE_ATTRIBUTE {
      const Vec nrm = Vec::loadu(ss + r, n).sqrt();
      nrm.store(nrm_out + r, n);
      (vone / (nrm + veps)).store(inv_out + r, n);
    });
  };
  norms(sc.rown.data(), sc.rown.data(), sc.rowinv.data(), L);
  norms(colss, sc.coln.data(), sc.colinv.data(), Scratch<T>::padded(N));
}

// Forward of one (caption, image) pair block, relevance mode.
//   t2i = mean_w max_r s[w,r] / (||s[:,r]|| + eps),  i2t = mean_r max_w s[w,r] / (||s[w,:]|| + eps).
template <typename T>
inline void relevance_pair_forward(T* p, int64_t ld, int64_t L, int64_t N, const T* iw, const T* ir, T slope, T eps,
                                   Scratch<T>& sc, T& t2i, T& i2t) {
  using Vec = at::vec::Vectorized<T>;
  relevance_pass1<T, true>(p, ld, L, N, iw, ir, slope, eps, sc);  // p <- s
  const T ninf = -std::numeric_limits<T>::infinity();
  const Vec vzero(T(0)), vninf(ninf);
  const T* colinv = sc.colinv.data();
  T* colmax = sc.colmax.data();
  std::fill(colmax, colmax + Scratch<T>::padded(N), ninf);
  T sum_t2i = 0;
  for (int64_t w = 0; w < L; ++w) {
    const T* row = p + w * ld;
    const Vec vri(sc.rowinv[w]);
    Vec vmax = vninf;
    for_lanes<T>(N, [&](int64_t r, int64_t n) C10_ALWAYS_INLINE_ATTRIBUTE {
      const Vec s = Vec::loadu(row + r, n);
      vmax = at::vec::maximum(vmax, masked_or(vninf, s * Vec::loadu(colinv + r), n));
      at::vec::maximum(Vec::loadu(colmax + r), s * vri).store(colmax + r);
    });
    sum_t2i += hmax(vmax);
  }
  Vec acc(T(0));
  for_lanes<T>(N, [&](int64_t r, int64_t n) C10_ALWAYS_INLINE_ATTRIBUTE {
    acc = acc + masked_or(vzero, Vec::loadu(colmax + r), n);
  });
  t2i = sum_t2i / T(L);
  i2t = hsum(acc) / T(N);
}

// Word maxima of the hard-assignment mode: m[w] = max_r c[w,r], c = p * iw * ir the cosines (NaN propagates).
template <typename T>
inline void hard_word_max(const T* p, int64_t ld, int64_t L, int64_t N, const T* iw, const T* ir, T* m) {
  using Vec = at::vec::Vectorized<T>;
  const Vec vninf(-std::numeric_limits<T>::infinity());
  for (int64_t w = 0; w < L; ++w) {
    const T* row = p + w * ld;
    const Vec viw(iw[w]);
    Vec vmax = vninf;
    for_lanes<T>(N, [&](int64_t r, int64_t n) C10_ALWAYS_INLINE_ATTRIBUTE {
      const Vec c = Vec::loadu(row + r, n) * viw * Vec::loadu(ir + r, n);
      vmax = at::vec::maximum(vmax, masked_or(vninf, c, n));
    });
    m[w] = hmax(vmax);
  }
}

// Aggregate word maxima m[0..L): mean, or temperature * log sum exp(m / temperature) (stable form).
template <typename T>
inline T hard_aggregate(const T* m, int64_t L, Mode mode, T temperature) {
  if (mode == Mode::HardMean) {
    T s = 0;
    for (int64_t w = 0; w < L; ++w) s += m[w];
    return s / T(L);
  }
  T mm = -std::numeric_limits<T>::infinity();
  for (int64_t w = 0; w < L; ++w) mm = nan_max(mm, m[w]);
  if (std::isnan(mm)) return mm;
  T s = 0;
  for (int64_t w = 0; w < L; ++w) s += std::exp((m[w] - mm) / temperature);
  return mm + temperature * std::log(s);
}

template <typename T>
void forward_impl(const at::Tensor& R, const at::Tensor& W, const Geometry& g, Mode mode, T slope, T eps,
                  T temperature, const T* ir, const T* iw, T* out_a, T* out_b) {
  const int64_t n_tiles = g.n_cblk * g.n_iblk;
  TileBuffers<T> bufs(g, R);
  at::parallel_for(0, n_tiles, 1, [&](int64_t begin, int64_t end) {
    at::NoGradGuard no_grad;  // grad mode is thread-local: worker threads must not record autograd
    T* const buf = bufs.data(at::get_thread_num());
    Scratch<T> sc(g.max_n, g.max_l);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t cb = t / g.n_iblk, ib = t % g.n_iblk;
      const int64_t j0 = g.j0(cb), j1 = g.j1(cb), i0 = g.i0(ib), i1 = g.i1(ib);
      const int64_t row0 = g.woff[j0], rows = g.woff[j1] - row0;
      const int64_t col0 = g.roff[i0], cols = g.roff[i1] - col0;
      tile_scores(buf, W, R, row0, rows, col0, cols);
      for (int64_t j = j0; j < j1; ++j) {
        const int64_t L = g.woff[j + 1] - g.woff[j];
        for (int64_t i = i0; i < i1; ++i) {
          const int64_t N = g.roff[i + 1] - g.roff[i];
          T* p = buf + (g.woff[j] - row0) * cols + (g.roff[i] - col0);
          if (mode == Mode::Relevance) {
            relevance_pair_forward(p, cols, L, N, iw + g.woff[j], ir + g.roff[i], slope, eps, sc,
                                   out_a[j * g.bi + i], out_b[i * g.bt + j]);
          } else {
            hard_word_max(p, cols, L, N, iw + g.woff[j], ir + g.roff[i], sc.rowaux.data());
            out_a[i * g.bt + j] = hard_aggregate(sc.rowaux.data(), L, mode, temperature);
          }
        }
      }
    }
  });
}

// Backward of one pair block, relevance mode. On entry p holds raw dot products; on exit
// p holds d(loss)/d(dot) and gw / gr have += sum over the block of dc * c per word / region (the
// gradient through the inverse feature norms is applied once at the end).
//
// t2i part (G1 = dL/dt2i / L): u[w,r] = s[w,r] / den[r], den[r] = n[r] + eps, n[r] = ||s[:,r]||;
//   du[w,r] = G1 if r == argmax_r' u[w,r'] else 0;
//   ds[w,r] = du[w,r] / den[r] - s[w,r] / n[r] * sum_w' du[w',r] s[w',r] / den[r]^2   (0 when n[r] = 0).
// i2t part (G2 = dL/di2t / N): the same with the roles of w and r swapped.
// dc = ds * (c > 0 ? 1 : slope); d(dot) = dc * iw[w] * ir[r].
template <typename T>
inline void relevance_pair_backward(T* p, int64_t ld, int64_t L, int64_t N, const T* iw, const T* ir, T slope, T eps,
                                    T G1, T G2, Scratch<T>& sc, T* gw, T* gr) {
  using Vec = at::vec::Vectorized<T>;
  relevance_pass1<T, false>(p, ld, L, N, iw, ir, slope, eps, sc);  // p <- c
  const T ninf = -std::numeric_limits<T>::infinity();
  const Vec vslope(slope), vzero(T(0)), vone(T(1)), vninf(ninf);
  const Vec lane = Vec::arange(T(0), T(1));
  const T* colinv = sc.colinv.data();
  T* colbest = sc.colmax.data();
  T* colargf = sc.colargf.data();  // column argmax (word index) as T, converted to colarg below
  int64_t* colarg = sc.colarg.data();
  const int64_t np = Scratch<T>::padded(N);
  std::fill(colbest, colbest + np, ninf);
  std::fill(colargf, colargf + np, T(0));
  T* a = sc.colaux.data();  // sum of s over the words whose best region is r
  T* b = sc.rowaux.data();  // sum of s over the regions whose best word is w
  std::fill(a, a + np, T(0));
  std::fill(b, b + L, T(0));
  // argmaxes: first maximal index wins (ties -> lowest index), NaN wins over numbers (LaneArgMax's rule,
  // the same per column over the words: replace iff v > best or v is NaN and best is not)
  for (int64_t w = 0; w < L; ++w) {
    const T* row = p + w * ld;
    const Vec vri(sc.rowinv[w]), vw(static_cast<T>(w));
    LaneArgMax<T> am;
    for_lanes<T>(N, [&](int64_t r, int64_t n) C10_ALWAYS_INLINE_ATTRIBUTE {
      const Vec c = Vec::loadu(row + r, n);
      const Vec s = Vec::blendv(c * vslope, c, c > vzero);
      am.update(masked_or(vninf, s * Vec::loadu(colinv + r), n), lane + Vec(static_cast<T>(r)));
      const Vec v = s * vri;
      const Vec cb = Vec::loadu(colbest + r);
      const Vec take = (v > cb) | ((v != v) & (cb == cb));
      Vec::blendv(cb, v, take).store(colbest + r);
      Vec::blendv(Vec::loadu(colargf + r), vw, take).store(colargf + r);
    });
    const int64_t arg = am.finish();
    sc.rowarg[w] = arg;
    sc.rowc[w] = row[arg];  // c at the word's best region
    a[arg] += leaky(row[arg], slope);
  }
  for (int64_t r = 0; r < N; ++r) {
    colarg[r] = static_cast<int64_t>(colargf[r]);
    const T c = p[colarg[r] * ld + r];
    sc.colc[r] = c;
    b[colarg[r]] += leaky(c, slope);
  }
  // dense coefficients: ds[w,r] = -s[w,r] * (ac[r] + bw[w]) + sparse terms
  for (int64_t r = 0; r < N; ++r)
    a[r] = sc.coln[r] > T(0) ? G1 * colinv[r] * colinv[r] * a[r] / sc.coln[r] : T(0);
  for (int64_t w = 0; w < L; ++w)
    b[w] = sc.rown[w] > T(0) ? G2 * sc.rowinv[w] * sc.rowinv[w] * b[w] / sc.rown[w] : T(0);
  T* g = sc.colg.data();  // the block's sum over the words of dc * c per region, added to gr below
  std::fill(g, g + np, T(0));
  for (int64_t w = 0; w < L; ++w) {
    T* row = p + w * ld;
    const Vec vb(b[w]), viw(iw[w]);
    Vec acc(T(0));
    for_lanes<T>(N, [&](int64_t r, int64_t n) C10_ALWAYS_INLINE_ATTRIBUTE {
      const Vec c = Vec::loadu(row + r, n);
      const Vec gate = Vec::blendv(vslope, vone, c > vzero);
      const Vec s = c * gate;
      const Vec dc = (vzero - s) * (Vec::loadu(a + r) + vb) * gate;
      const Vec gcc = masked_or(vzero, dc, n) * c;  // dead lanes zeroed on an operand (see relevance_pass1)
      acc = acc + gcc;
      (Vec::loadu(g + r) + gcc).store(g + r);
      (dc * viw * Vec::loadu(ir + r, n)).store(row + r, n);
    });
    gw[w] += hsum(acc);
  }
  for_lanes<T>(N, [&](int64_t r, int64_t n) C10_ALWAYS_INLINE_ATTRIBUTE {
    (Vec::loadu(gr + r, n) + Vec::loadu(g + r)).store(gr + r, n);
  });
  // sparse terms: du / den at the argmax of each word (t2i) and of each region (i2t)
  for (int64_t w = 0; w < L; ++w) {
    const int64_t r = sc.rowarg[w];
    const T c = sc.rowc[w];
    const T dc = G1 * colinv[r] * (c > T(0) ? T(1) : slope);
    p[w * ld + r] += dc * iw[w] * ir[r];
    gw[w] += dc * c;
    gr[r] += dc * c;
  }
  for (int64_t r = 0; r < N; ++r) {
    const int64_t w = colarg[r];
    const T c = sc.colc[r];
    const T dc = G2 * sc.rowinv[w] * (c > T(0) ? T(1) : slope);
    p[w * ld + r] += dc * iw[w] * ir[r];
    gw[w] += dc * c;
    gr[r] += dc * c;
  }
}

// Backward of one pair block, hard modes: d sim / d m[w] = 1/L (mean) or softmax_w(m / temperature)
// (lse); each word's gradient goes to its first best region only.
template <typename T>
inline void hard_pair_backward(T* p, int64_t ld, int64_t L, int64_t N, const T* iw, const T* ir, Mode mode,
                               T temperature, T G, Scratch<T>& sc, T* gw, T* gr) {
  using Vec = at::vec::Vectorized<T>;
  const Vec vninf(-std::numeric_limits<T>::infinity());
  const Vec lane = Vec::arange(T(0), T(1));
  T* m = sc.rowaux.data();
  for (int64_t w = 0; w < L; ++w) {
    T* row = p + w * ld;
    const Vec viw(iw[w]);
    LaneArgMax<T> am;  // first best region (ties -> lowest index, first NaN wins)
    for_lanes<T>(N, [&](int64_t r, int64_t n) C10_ALWAYS_INLINE_ATTRIBUTE {
      const Vec c = Vec::loadu(row + r, n) * viw * Vec::loadu(ir + r, n);
      am.update(masked_or(vninf, c, n), lane + Vec(static_cast<T>(r)));
    });
    const int64_t arg = am.finish();
    m[w] = row[arg] * iw[w] * ir[arg];
    sc.rowarg[w] = arg;
    std::fill(row, row + N, T(0));
  }
  T h = mode == Mode::HardLse ? hard_aggregate(m, L, mode, temperature) : T(0);
  for (int64_t w = 0; w < L; ++w) {
    const T dm = mode == Mode::HardMean ? G / T(L) : G * std::exp((m[w] - h) / temperature);
    const int64_t r = sc.rowarg[w];
    p[w * ld + r] = dm * iw[w] * ir[r];
    gw[w] += dm * m[w];
    gr[r] += dm * m[w];
  }
}

template <typename T>
void backward_impl(const at::Tensor& R, const at::Tensor& W, const Geometry& g, Mode mode, T slope, T eps,
                   T temperature, const T* ir, const T* iw, const T* grad_a, const T* grad_b, at::Tensor& dR,
                   at::Tensor& dW, T* gr, T* gw) {
  TileBuffers<T> bufs(g, R);
  for_each_tile_conflict_free(g.n_cblk, g.n_iblk, [&](int64_t cb, int64_t ib) {
    at::NoGradGuard no_grad;  // grad mode is thread-local: worker threads must not record autograd
    T* const buf = bufs.data(at::get_thread_num());
    Scratch<T> sc(g.max_n, g.max_l);
    const int64_t j0 = g.j0(cb), j1 = g.j1(cb), i0 = g.i0(ib), i1 = g.i1(ib);
    const int64_t row0 = g.woff[j0], rows = g.woff[j1] - row0;
    const int64_t col0 = g.roff[i0], cols = g.roff[i1] - col0;
    at::Tensor tile = tile_scores(buf, W, R, row0, rows, col0, cols);
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t L = g.woff[j + 1] - g.woff[j];
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t N = g.roff[i + 1] - g.roff[i];
        T* p = buf + (g.woff[j] - row0) * cols + (g.roff[i] - col0);
        const T* iwp = iw + g.woff[j];
        const T* irp = ir + g.roff[i];
        if (mode == Mode::Relevance) {
          const T G1 = grad_a[j * g.bi + i] / T(L);
          const T G2 = grad_b[i * g.bt + j] / T(N);
          relevance_pair_backward(p, cols, L, N, iwp, irp, slope, eps, G1, G2, sc, gw + g.woff[j], gr + g.roff[i]);
        } else {
          hard_pair_backward(p, cols, L, N, iwp, irp, mode, temperature, grad_a[i * g.bt + j], sc, gw + g.woff[j],
                             gr + g.roff[i]);
        }
      }
    }
    dW.narrow(0, row0, rows).addmm_(tile, R.narrow(0, col0, cols));
    dR.narrow(0, col0, cols).addmm_(tile.t(), W.narrow(0, row0, rows));
  });
}

void check_inputs(const char* fn, const at::Tensor& regions, const at::Tensor& region_lens, const at::Tensor& words,
                  const at::Tensor& word_lens) {
  TORCH_CHECK(regions.device().is_cpu() && words.device().is_cpu(), fn, ": CPU tensors expected");
  TORCH_CHECK(regions.dim() == 2 && words.dim() == 2, fn, ": packed (rows, D) regions and words expected, got ",
              regions.sizes(), " and ", words.sizes());
  TORCH_CHECK(regions.size(1) == words.size(1), fn, ": feature sizes differ: ", regions.size(1), " vs ",
              words.size(1));
  TORCH_CHECK(regions.scalar_type() == words.scalar_type(), fn, ": regions and words must have one dtype");
  TORCH_CHECK(regions.scalar_type() == at::kFloat || regions.scalar_type() == at::kDouble, fn,
              ": float32 or float64 expected, got ", regions.scalar_type());
  TORCH_CHECK(region_lens.numel() >= 1 && word_lens.numel() >= 1, fn, ": empty batch");
  TORCH_CHECK(region_lens.sum().item<int64_t>() == regions.size(0), fn, ": sum(region_lens) != regions rows");
  TORCH_CHECK(word_lens.sum().item<int64_t>() == words.size(0), fn, ": sum(word_lens) != words rows");
}

at::Tensor inverse_norms(const at::Tensor& x, double eps) {
  return at::linalg_vector_norm(x, 2, {1}, false, c10::nullopt).clamp_min(eps).reciprocal();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> cross_similarity_forward(const at::Tensor& regions_in,
                                                            const at::Tensor& region_lens_in,
                                                            const at::Tensor& words_in, const at::Tensor& word_lens_in,
                                                            c10::string_view mode_str, double negative_slope,
                                                            double eps, double temperature) {
  const Mode mode = parse_mode(mode_str);
  at::NoGradGuard no_grad;
  check_inputs("cross_similarity_forward", regions_in, region_lens_in, words_in, word_lens_in);
  const at::Tensor R = regions_in.contiguous(), W = words_in.contiguous();
  const at::Tensor rl = region_lens_in.to(at::kLong).contiguous(), wl = word_lens_in.to(at::kLong).contiguous();
  const Geometry g = make_geometry(rl, wl, R.size(1));
  const at::Tensor ir = inverse_norms(R, eps), iw = inverse_norms(W, eps);
  at::Tensor out_a, out_b;
  if (mode == Mode::Relevance) {
    out_a = at::empty({g.bt, g.bi}, R.options());
    out_b = at::empty({g.bi, g.bt}, R.options());
  } else {
    out_a = at::empty({g.bi, g.bt}, R.options());
    out_b = at::empty({0}, R.options());
  }
  AT_DISPATCH_FLOATING_TYPES(R.scalar_type(), "cross_similarity_forward", [&] {
    forward_impl<scalar_t>(R, W, g, mode, scalar_t(negative_slope), scalar_t(eps), scalar_t(temperature),
                           ir.data_ptr<scalar_t>(), iw.data_ptr<scalar_t>(), out_a.data_ptr<scalar_t>(),
                           mode == Mode::Relevance ? out_b.data_ptr<scalar_t>() : nullptr);
  });
  return {out_a, out_b};
}

std::tuple<at::Tensor, at::Tensor> cross_similarity_backward(const at::Tensor& grad_a_in, const at::Tensor& grad_b_in,
                                                             const at::Tensor& regions_in,
                                                             const at::Tensor& region_lens_in,
                                                             const at::Tensor& words_in,
                                                             const at::Tensor& word_lens_in, c10::string_view mode_str,
                                                             double negative_slope, double eps, double temperature) {
  const Mode mode = parse_mode(mode_str);
  at::NoGradGuard no_grad;
  check_inputs("cross_similarity_backward", regions_in, region_lens_in, words_in, word_lens_in);
  const at::Tensor R = regions_in.contiguous(), W = words_in.contiguous();
  const at::Tensor rl = region_lens_in.to(at::kLong).contiguous(), wl = word_lens_in.to(at::kLong).contiguous();
  const Geometry g = make_geometry(rl, wl, R.size(1));
  const at::Tensor grad_a = grad_a_in.to(R.scalar_type()).contiguous();
  at::Tensor grad_b;
  if (mode == Mode::Relevance) {
    TORCH_CHECK(grad_a.numel() == g.bt * g.bi && grad_b_in.numel() == g.bi * g.bt,
                "cross_similarity_backward: gradients must have shapes (Bt, Bi) and (Bi, Bt)");
    grad_b = grad_b_in.to(R.scalar_type()).contiguous();
  } else {
    TORCH_CHECK(grad_a.numel() == g.bi * g.bt, "cross_similarity_backward: gradient must have shape (Bi, Bt)");
  }
  const at::Tensor rnorm = at::linalg_vector_norm(R, 2, {1}, false, c10::nullopt);
  const at::Tensor wnorm = at::linalg_vector_norm(W, 2, {1}, false, c10::nullopt);
  const at::Tensor ir = rnorm.clamp_min(eps).reciprocal(), iw = wnorm.clamp_min(eps).reciprocal();
  at::Tensor dR = at::zeros_like(R), dW = at::zeros_like(W);
  at::Tensor gr = at::zeros({R.size(0)}, R.options()), gw = at::zeros({W.size(0)}, W.options());
  AT_DISPATCH_FLOATING_TYPES(R.scalar_type(), "cross_similarity_backward", [&] {
    backward_impl<scalar_t>(R, W, g, mode, scalar_t(negative_slope), scalar_t(eps), scalar_t(temperature),
                            ir.data_ptr<scalar_t>(), iw.data_ptr<scalar_t>(), grad_a.data_ptr<scalar_t>(),
                            mode == Mode::Relevance ? grad_b.data_ptr<scalar_t>() : nullptr, dR, dW,
                            gr.data_ptr<scalar_t>(), gw.data_ptr<scalar_t>());
  });
  // through the inverse norms: d c / d x = iw ir y - c x / ||x||^2 (only where ||x|| > eps; clamped otherwise)
  dR.addcmul_(R, (gr * ir * ir * rnorm.gt(eps).to(R.scalar_type())).unsqueeze(1), -1);
  dW.addcmul_(W, (gw * iw * iw * wnorm.gt(eps).to(W.scalar_type())).unsqueeze(1), -1);
  return {dR, dW};
}

}  // namespace cpu
}  // namespace aahr_fast

TORCH_LIBRARY_IMPL(aahr_fast, CPU, m) {
  m.impl("cross_similarity_forward", &aahr_fast::cpu::cross_similarity_forward);
  m.impl("cross_similarity_backward", &aahr_fast::cpu::cross_similarity_backward);
}
