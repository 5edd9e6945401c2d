// Row-wise top-k selection as a boolean mask, with the tie rule of a stable descending sort:
// among equal scores the lower column index wins; NaN ranks above every number (as in
// torch.sort / torch.topk); -0.0 and +0.0 are equal. Used by the connection masks of
// csrc/cpu/correlation.cpp.
//
// Each score becomes one unsigned integer key, "rank bits" of the value (a monotone map of the IEEE
// bits, complemented so that larger values give smaller keys) followed by the column index, so
// that a plain integer std::nth_element selects exactly the reference's top k.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace aahr_fast {
namespace d2 {

// Monotone map of a float / double to unsigned bits: a < b (as numbers) <=> map(a) < map(b); every
// NaN maps above +inf; -0.0 maps like +0.0.
inline uint32_t order_bits(float x) {
  if (std::isnan(x)) return 0xFFFFFFFFu;
  if (x == 0.0f) x = 0.0f;
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

inline uint64_t order_bits(double x) {
  if (std::isnan(x)) return ~uint64_t(0);
  if (x == 0.0) x = 0.0;
  uint64_t u;
  std::memcpy(&u, &x, sizeof(u));
  return (u & (uint64_t(1) << 63)) ? ~u : (u | (uint64_t(1) << 63));
}

template <typename scalar_t>
struct TopkKey;
template <>
struct TopkKey<float> {  // 32 value bits + 32 index bits
  using type = uint64_t;
  static type make(float x, int64_t j) {
    return (uint64_t(~order_bits(x)) << 32) | uint64_t(uint32_t(j));
  }
  static int64_t index(type k) { return int64_t(uint32_t(k)); }
};
template <>
struct TopkKey<double> {  // 64 value bits + 64 index bits
  using type = unsigned __int128;
  static type make(double x, int64_t j) {
    return (type(~order_bits(x)) << 64) | type(uint64_t(j));
  }
  static int64_t index(type k) { return int64_t(uint64_t(k)); }
};

// mask[j] = column j is among the k best of the n scores in `s` (0 <= k <= n).
// `keys` is scratch space, resized to n. Average O(n) (nth_element on integer keys).
template <typename scalar_t>
inline void topk_row_mask(const scalar_t* s, int64_t n, int64_t k, bool* mask,
                          std::vector<typename TopkKey<scalar_t>::type>& keys) {
  using KT = TopkKey<scalar_t>;
  if (k <= 0) {
    std::fill(mask, mask + n, false);
    return;
  }
  if (k >= n) {
    std::fill(mask, mask + n, true);
    return;
  }
  keys.resize(n);
  for (int64_t j = 0; j < n; ++j) keys[j] = KT::make(s[j], j);
  std::nth_element(keys.begin(), keys.begin() + (k - 1), keys.end());
  std::fill(mask, mask + n, false);
  for (int64_t r = 0; r < k; ++r) mask[KT::index(keys[r])] = true;
}

}  // namespace d2
}  // namespace aahr_fast
