// Row-wise top-k selection as a boolean mask, with the tie rule of a stable descending sort:
// among equal scores the lower column index wins; NaN ranks above every number (as in
// torch.sort / torch.topk). Used by the connection masks of csrc/cpu/correlation.cpp.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace aahr_fast {
namespace d2 {

// True when column a ranks strictly before column b in row `s` (descending, NaN first, ties by
// lower index). A strict total order, so exactly k columns rank among the first k.
template <typename scalar_t>
inline bool ranks_before(const scalar_t* s, int64_t a, int64_t b) {
  const scalar_t x = s[a], y = s[b];
  const bool xn = std::isnan(x), yn = std::isnan(y);
  if (xn != yn) return xn;
  if (!xn && x != y) return x > y;
  return a < b;
}

// mask[j] = column j is among the k best of the n scores in `s` (0 <= k <= n).
// `idx` is scratch space of at least n entries. Average O(n) (nth_element).
template <typename scalar_t>
inline void topk_row_mask(const scalar_t* s, int64_t n, int64_t k, bool* mask,
                          std::vector<int64_t>& idx) {
  if (k <= 0) {
    std::fill(mask, mask + n, false);
    return;
  }
  if (k >= n) {
    std::fill(mask, mask + n, true);
    return;
  }
  idx.resize(n);
  for (int64_t j = 0; j < n; ++j) idx[j] = j;
  auto cmp = [s](int64_t a, int64_t b) { return ranks_before(s, a, b); };
  std::nth_element(idx.begin(), idx.begin() + (k - 1), idx.end(), cmp);
  const int64_t pivot = idx[k - 1];  // the k-th best column
  for (int64_t j = 0; j < n; ++j) mask[j] = (j == pivot) || ranks_before(s, j, pivot);
}

}  // namespace d2
}  // namespace aahr_fast
