// Small helpers shared by the C++ CPU kernels of aahr_fast (csrc/cpu/*.cpp).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace aahr_fast {
namespace cpu {

// Exclusive prefix sum of a 1-D int64 CPU tensor of lengths: offsets[b] = sum(lens[:b]), size B + 1.
inline std::vector<int64_t> offsets_of(const at::Tensor& lens) {
  TORCH_CHECK(lens.dim() == 1 && lens.scalar_type() == at::kLong, "lengths must be a 1-D int64 tensor");
  auto l = lens.contiguous();
  const int64_t* p = l.data_ptr<int64_t>();
  std::vector<int64_t> off(static_cast<size_t>(l.numel()) + 1, 0);
  for (int64_t b = 0; b < l.numel(); ++b) {
    TORCH_CHECK(p[b] >= 1, "length at index ", b, " is ", p[b], ", expected >= 1");
    off[b + 1] = off[b] + p[b];
  }
  return off;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Conflict-free schedule over a grid of (row block, column block) tiles: in round k the tiles
// (r, c) with (c - r) mod P == k, P = max(rows, cols), touch each row block and each column block at
// most once, so a round can run in parallel while accumulating into per-row-block and per-column-block
// buffers without races; rounds run in order, so the summation order is fixed (deterministic).
template <typename F>
inline void for_each_tile_conflict_free(int64_t row_blocks, int64_t col_blocks, const F& fn) {
  const int64_t p = std::max(row_blocks, col_blocks);
  const int64_t per_round = std::min(row_blocks, col_blocks);
  for (int64_t k = 0; k < p; ++k) {
    // enumerate the round's tiles by the smaller side so every index is visited once
    at::parallel_for(0, per_round, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        int64_t r, c;
        if (row_blocks <= col_blocks) {
          r = t;
          c = (t + k) % p;
        } else {
          c = t;
          r = ((c - k) % p + p) % p;
        }
        if (r < row_blocks && c < col_blocks) fn(r, c);
      }
    });
  }
}

}  // namespace cpu
}  // namespace aahr_fast
