// CUDA kernels of the prototype assignment: log-domain Sinkhorn-Knopp codes and the rows of the SwAV
// swapped-prediction loss with their score gradients (the loss backward). Torch-free; see
// aahr_cuda.cuh for the contract and aahr_fast/kernels/prototypes.py for the math (the Triton twin).
//
// Sinkhorn (aahr-method.md 2.5, SwAV): dual potentials, log Q[k,b] = S[b,k]/eps + u[b] + v[k];
//   v[k] = -log K - LSE_b(S/eps + u),  u[b] = -log B - LSE_k(S/eps + v),  codes = exp(S/eps + u + v + log B).
// All reductions are online log-sum-exps in fp32 (max-shifted), so no exp overflows for any S/eps.
// Column pass: a block of 32 x 8 threads owns 32 prototypes (coalesced along K), rows strided over 8 warps.
// Row pass: one warp per sample.
#include <cmath>
#include <cstdint>

#include "aahr_cuda.cuh"

namespace aahr_cuda {
namespace {

constexpr int kRowsPerBlock = 8;  // warps per block in the row kernels

// (m, s) represents log(s) + m; combine two partial log-sum-exps.
__device__ __forceinline__ void lse_combine(float& m, float& s, float m2, float s2) {
  const float mn = fmaxf(m, m2);
  if (mn == -INFINITY) return;  // both empty
  s = s * expf(m - mn) + s2 * expf(m2 - mn);
  m = mn;
}

__device__ __forceinline__ void lse_add(float& m, float& s, float z) { lse_combine(m, s, z, 1.f); }

__device__ __forceinline__ float lse_value(float m, float s) { return s > 0.f ? m + logf(s) : -INFINITY; }

__device__ __forceinline__ void warp_lse(float& m, float& s) {
  for (int o = 16; o > 0; o >>= 1) {
    const float m2 = __shfl_xor_sync(0xffffffffu, m, o);
    const float s2 = __shfl_xor_sync(0xffffffffu, s, o);
    lse_combine(m, s, m2, s2);
  }
}

__device__ __forceinline__ float warp_sum(float x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

__global__ void __launch_bounds__(256) sinkhorn_col_kernel(const float* __restrict__ S, int64_t B, int64_t K,
                                                           float inv_eps, float log_k, const float* __restrict__ u,
                                                           float* __restrict__ v) {
  __shared__ float sm_m[8][33];
  __shared__ float sm_s[8][33];
  const int64_t k = static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x;
  float m = -INFINITY, s = 0.f;
  if (k < K) {
    for (int64_t b = threadIdx.y; b < B; b += 8) lse_add(m, s, S[b * K + k] * inv_eps + u[b]);
  }
  sm_m[threadIdx.y][threadIdx.x] = m;
  sm_s[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && k < K) {
    for (int y = 1; y < 8; ++y) lse_combine(m, s, sm_m[y][threadIdx.x], sm_s[y][threadIdx.x]);
    v[k] = -log_k - lse_value(m, s);
  }
}

__global__ void __launch_bounds__(256) sinkhorn_row_kernel(const float* __restrict__ S, int64_t B, int64_t K,
                                                           float inv_eps, float log_b, const float* __restrict__ v,
                                                           float* __restrict__ u, float* __restrict__ codes) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (b >= B) return;
  const float* row = S + b * K;
  float m = -INFINITY, s = 0.f;
  for (int64_t k = lane; k < K; k += 32) lse_add(m, s, row[k] * inv_eps + v[k]);
  warp_lse(m, s);
  const float ub = -log_b - lse_value(m, s);
  if (lane == 0) u[b] = ub;
  if (codes != nullptr) {
    for (int64_t k = lane; k < K; k += 32) codes[b * K + k] = expf(row[k] * inv_eps + ub + v[k] + log_b);
  }
}

__global__ void __launch_bounds__(256) swav_rows_kernel(const float* __restrict__ s_v, const float* __restrict__ s_t,
                                                        const float* __restrict__ q_v, const float* __restrict__ q_t,
                                                        int64_t B, int64_t K, float inv_tau,
                                                        float* __restrict__ row_loss, float* __restrict__ ds_v,
                                                        float* __restrict__ ds_t) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (b >= B) return;
  const int64_t o = b * K;
  float mv = -INFINITY, sv = 0.f, mt = -INFINITY, st = 0.f;
  float sum_qt = 0.f, sum_qv = 0.f, dot_v = 0.f, dot_t = 0.f;
  for (int64_t k = lane; k < K; k += 32) {
    const float zv = s_v[o + k] * inv_tau, zt = s_t[o + k] * inv_tau;
    const float qv = q_v[o + k], qt = q_t[o + k];
    lse_add(mv, sv, zv);
    lse_add(mt, st, zt);
    sum_qt += qt;
    sum_qv += qv;
    dot_v = fmaf(qt, zv, dot_v);
    dot_t = fmaf(qv, zt, dot_t);
  }
  warp_lse(mv, sv);
  warp_lse(mt, st);
  sum_qt = warp_sum(sum_qt);
  sum_qv = warp_sum(sum_qv);
  dot_v = warp_sum(dot_v);
  dot_t = warp_sum(dot_t);
  const float lse_v = lse_value(mv, sv), lse_t = lse_value(mt, st);
  if (lane == 0) row_loss[b] = (sum_qt * lse_v - dot_v) + (sum_qv * lse_t - dot_t);
  const float scale = inv_tau / static_cast<float>(B);
  for (int64_t k = lane; k < K; k += 32) {
    const float zv = s_v[o + k] * inv_tau, zt = s_t[o + k] * inv_tau;
    ds_v[o + k] = (expf(zv - lse_v) * sum_qt - q_t[o + k]) * scale;
    ds_t[o + k] = (expf(zt - lse_t) * sum_qv - q_v[o + k]) * scale;
  }
}

}  // namespace

cudaError_t sinkhorn_codes(const float* scores, int64_t B, int64_t K, float eps, int n_iters, float* u, float* v,
                           float* codes, cudaStream_t stream) {
  if (B <= 0 || K <= 0) return cudaSuccess;
  if (n_iters < 1 || !(eps > 0.f)) return cudaErrorInvalidValue;
  cudaError_t err = cudaMemsetAsync(u, 0, static_cast<size_t>(B) * sizeof(float), stream);
  if (err != cudaSuccess) return err;
  const float inv_eps = 1.f / eps;
  const float log_k = logf(static_cast<float>(K)), log_b = logf(static_cast<float>(B));
  const dim3 col_block(32, 8);
  const unsigned col_grid = static_cast<unsigned>((K + 31) / 32);
  const unsigned row_grid = static_cast<unsigned>((B + kRowsPerBlock - 1) / kRowsPerBlock);
  for (int it = 0; it < n_iters; ++it) {
    sinkhorn_col_kernel<<<col_grid, col_block, 0, stream>>>(scores, B, K, inv_eps, log_k, u, v);
    sinkhorn_row_kernel<<<row_grid, 32 * kRowsPerBlock, 0, stream>>>(scores, B, K, inv_eps, log_b, v, u,
                                                                     it == n_iters - 1 ? codes : nullptr);
  }
  return cudaGetLastError();
}

cudaError_t swav_rows(const float* s_v, const float* s_t, const float* q_v, const float* q_t, int64_t B, int64_t K,
                      float tau, float* row_loss, float* ds_v, float* ds_t, cudaStream_t stream) {
  if (B <= 0 || K <= 0) return cudaSuccess;
  if (!(tau > 0.f)) return cudaErrorInvalidValue;
  const unsigned grid = static_cast<unsigned>((B + kRowsPerBlock - 1) / kRowsPerBlock);
  swav_rows_kernel<<<grid, 32 * kRowsPerBlock, 0, stream>>>(s_v, s_t, q_v, q_t, B, K, 1.f / tau, row_loss, ds_v, ds_t);
  return cudaGetLastError();
}

}  // namespace aahr_cuda
