// Host API of aahr_fast's CUDA kernels (torch-free: raw device pointers, a stream, cudaError_t).
//
// Implemented in csrc/cuda/cross_similarity.cu and csrc/cuda/prototypes.cu; called by the thin torch
// binding csrc/cuda/cuda_ops_binding.cpp (built by aahr_fast/ops/_ext.py only when torch has CUDA).
// Every tensor argument is a dense row-major (contiguous) array on the current device; lengths are
// int64; all accumulation is fp32. Sizes are int64 and every offset is computed in int64.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace aahr_cuda {

// storage dtype of the feature inputs
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// cross-similarity modes (same numbering as aahr_fast.kernels.cross_similarity)
enum XsimMode : int { kRelevance = 0, kHardMean = 1, kHardLse = 2 };

// Region-word similarity problem. regions (Bi, N, D) and words (Bt, L, D) of `dtype`;
// region_lens (Bi,) / word_lens (Bt,) int64 valid counts (in [1, N] / [1, L], checked by the caller);
// rinv (Bi, N) / winv (Bt, L) fp32 inverse L2 norms, 0 on padded slots.
struct XsimProblem {
  const void* regions;
  const void* words;
  DType dtype;
  const int64_t* region_lens;
  const int64_t* word_lens;
  const float* rinv;
  const float* winv;
  int64_t Bi, Bt, N, L, D;
  int mode;            // XsimMode
  float slope;         // LeakyReLU negative slope (kRelevance)
  float eps;           // added to the L2 norms of the score rows/columns (kRelevance)
  float inv_temperature;  // 1 / temperature (kHardLse)
};

// Forward. kRelevance: out_a = t2i (Bt, Bi), out_b = i2t (Bi, Bt). Hard modes: out_a = sim (Bi, Bt),
// out_b unused (may be null). Returns cudaErrorInvalidValue when the tile does not fit in shared memory.
cudaError_t xsim_forward(const XsimProblem& p, float* out_a, float* out_b, cudaStream_t stream);

// Backward. grad_a / grad_b: gradients of out_a / out_b (grad_b unused in hard modes).
// Adds dL/d(normalised regions) into g_regions (Bi, N, D) and dL/d(normalised words) into
// g_words (Bt, L, D) (fp32, zero-initialised by the caller; either may be null = not needed).
// Accumulation uses fp32 atomics (summation order is not deterministic).
cudaError_t xsim_backward(const XsimProblem& p, const float* grad_a, const float* grad_b, float* g_regions,
                          float* g_words, cudaStream_t stream);

// Log-domain Sinkhorn-Knopp (SwAV) codes of scores (B, K) fp32: n_iters >= 1 rounds of the reference's
// {prototype columns, then sample rows} log-sum-exp normalisations on the log-codes, kept in `codes`.
// u (B,), v (K,) are fp32 work buffers; codes (B, K) fp32, rows sum to 1; a non-finite S/eps makes them all NaN.
cudaError_t sinkhorn_codes(const float* scores, int64_t B, int64_t K, float eps, int n_iters, float* u, float* v,
                           float* codes, cudaStream_t stream);

// Swapped-prediction rows: for each i < B,
// row_loss[i] = -sum_k q_t[i,k] log softmax(s_v[i]/tau)_k - sum_k q_v[i,k] log softmax(s_t[i]/tau)_k,
// ds_v[i,k] = (softmax(s_v[i]/tau)_k sum_k' q_t[i,k'] - q_t[i,k]) / (tau * B), and ds_t likewise
// (the score gradients of loss = sum_i row_loss[i] / B). All (B, K) fp32.
cudaError_t swav_rows(const float* s_v, const float* s_t, const float* q_v, const float* q_t, int64_t B, int64_t K,
                      float tau, float* row_loss, float* ds_v, float* ds_t, cudaStream_t stream);

}  // namespace aahr_cuda
