// Fused region-word cross similarity on CPU (AAHR/SCAN relevance and CHAN hard assignment).
//
// Inputs are the *packed valid fragments*: regions (sum(region_lens), D) and words (sum(word_lens), D),
// image i owning rows [roff[i], roff[i+1]) and caption j rows [woff[j], woff[j+1]). The math is the
// reference's (aahr_fast/ops/cross_similarity.py); the layout of the work is:
//   * tiles of (caption block x image block); per tile one GEMM (at::mm_out) of raw features into a
//     thread-local buffer of scores, scaled by the inverse feature norms in the epilogue (cosines);
//   * the epilogue fuses LeakyReLU, both L2 normalisations, max (and argmax in backward), and means on
//     each (caption, image) pair block of the tile, in cache;
//   * backward recomputes the tile, forms d(score) in place and accumulates two GEMMs into the packed
//     gradients; tiles run in conflict-free rounds (common.h), so no atomics and a fixed summation order.
// Extra memory: O(Bi*Bt) outputs + per-thread tile buffers + O(sum lens) norms; never O(Bi*Bt*N*L).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/string_view.h>

#include <tuple>

namespace aahr_fast {
namespace cpu {

// mode: "relevance" -> (t2i (Bt, Bi), i2t (Bi, Bt)); "hard_mean" | "hard_lse" -> (sim (Bi, Bt), empty).
std::tuple<at::Tensor, at::Tensor> cross_similarity_forward(
    const at::Tensor& regions, const at::Tensor& region_lens, const at::Tensor& words,
    const at::Tensor& word_lens, c10::string_view mode, double negative_slope, double eps, double temperature);

// Gradients w.r.t. the packed regions and words (grad_b ignored in the hard modes).
std::tuple<at::Tensor, at::Tensor> cross_similarity_backward(
    const at::Tensor& grad_a, const at::Tensor& grad_b, const at::Tensor& regions, const at::Tensor& region_lens,
    const at::Tensor& words, const at::Tensor& word_lens, c10::string_view mode, double negative_slope,
    double eps, double temperature);

}  // namespace cpu
}  // namespace aahr_fast
