// Small helpers shared by the C++ CPU backends of the correlation, message-passing and prototype
// ops (csrc/cpu/correlation.cpp, message_passing.cpp, prototypes.cpp).
//
// Everything here is header-only and uses ATen's portable SIMD type at::vec::Vectorized, which
// compiles to AVX2/AVX-512 code when the extension is built with the matching CPU_CAPABILITY flags
// and to plain scalar loops otherwise, so the results never depend on the build flags beyond
// rounding of exp().
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <limits>

namespace aahr_fast {
namespace d2 {

// Grain sizes for at::parallel_for: one "unit" of work is a row of a few hundred elements, so
// about 16 rows per task keeps the scheduling overhead below a few percent.
constexpr int64_t kRowGrain = 16;

// Checks shared by every entry point: CPU, floating dtype, expected rank.
inline void check_cpu_float(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, name,
              " must be float32 or float64, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == dim, name, " must have ", dim, " dimensions, got shape ", t.sizes());
}

// out[i] = exp(scale * in[i] + shift) over n elements, vectorised. The tail goes through the same
// vector exp (partial load/store), so an element's value never depends on its position.
template <typename scalar_t>
inline void exp_affine(scalar_t* out, const scalar_t* in, int64_t n, scalar_t scale,
                       scalar_t shift) {
  using Vec = at::vec::Vectorized<scalar_t>;
  const Vec vs(scale), vb(shift);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    Vec x = Vec::loadu(in + i);
    at::vec::fmadd(x, vs, vb).exp().store(out + i);
  }
  if (i < n) {
    const int rest = static_cast<int>(n - i);
    at::vec::fmadd(Vec::loadu(in + i, rest), vs, vb).exp().store(out + i, rest);
  }
}

// Maximum of n elements (n >= 1; -inf for n == 0); NaN propagates like torch.max. Vectorised.
template <typename scalar_t>
inline scalar_t row_max(const scalar_t* x, int64_t n) {
  using Vec = at::vec::Vectorized<scalar_t>;
  const scalar_t ninf = -std::numeric_limits<scalar_t>::infinity();
  Vec acc(ninf);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) acc = at::vec::maximum(acc, Vec::loadu(x + i));
  if (i < n) {
    const int rest = static_cast<int>(n - i);
    acc = at::vec::maximum(acc, Vec::set(Vec(ninf), Vec::loadu(x + i, rest), rest));
  }
  scalar_t buf[Vec::size()];
  acc.store(buf);
  scalar_t m = ninf;
  for (int64_t j = 0; j < Vec::size(); ++j) {
    if (std::isnan(buf[j])) return buf[j];
    m = buf[j] > m ? buf[j] : m;
  }
  return m;
}

// Sum of n elements with a vector accumulator (same order every call, so deterministic).
template <typename scalar_t>
inline scalar_t row_sum(const scalar_t* x, int64_t n) {
  using Vec = at::vec::Vectorized<scalar_t>;
  Vec acc(scalar_t(0));
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) acc = acc + Vec::loadu(x + i);
  scalar_t buf[Vec::size()];
  acc.store(buf);
  scalar_t s = 0;
  for (int64_t j = 0; j < Vec::size(); ++j) s += buf[j];
  for (; i < n; ++i) s += x[i];
  return s;
}

// Dot product of two rows of n elements.
template <typename scalar_t>
inline scalar_t row_dot(const scalar_t* a, const scalar_t* b, int64_t n) {
  using Vec = at::vec::Vectorized<scalar_t>;
  Vec acc(scalar_t(0));
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size())
    acc = at::vec::fmadd(Vec::loadu(a + i), Vec::loadu(b + i), acc);
  scalar_t buf[Vec::size()];
  acc.store(buf);
  scalar_t s = 0;
  for (int64_t j = 0; j < Vec::size(); ++j) s += buf[j];
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

}  // namespace d2
}  // namespace aahr_fast
