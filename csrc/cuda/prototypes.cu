// CUDA kernels of the prototype assignment: log-domain Sinkhorn-Knopp codes and the rows of the SwAV
// swapped-prediction loss with their score gradients (the loss backward). Torch-free; see
// aahr_cuda.cuh for the contract and aahr_fast/kernels/prototypes.py for the math (the Triton twin).
//
// Sinkhorn (aahr-method.md 2.5, SwAV): the reference's iterations on the fp32 log-codes W (B, K) (kept in the
//   codes buffer): W = S/eps - LSE_all(S/eps); per iteration W -= LSE_b(W) + log K per prototype column, then
//   W -= LSE_k(W) + log B per sample row; codes = exp(W + log B). Same order of operations as the reference and
//   the Triton twin: the entries that matter stay O(1), so |S|/eps ~ 1e5 keeps fp32 accuracy (dual potentials
//   S/eps + u + v cancel numbers of that size: codes were off by ~3e-3). Any non-finite S/eps makes every code NaN.
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

// Column log-sum-exps c[k] = LSE_b z[b,k] (the reference's prototype step), where
// mode 0: z = S/eps, and a column holding a non-finite S/eps gets c[k] = NaN (poisons g, so every code);
// mode 1: z = S/eps - *g (g = global log-sum-exp); mode 2: z = W (the fp32 log-codes, row-major).
__global__ void __launch_bounds__(256) sinkhorn_col_kernel(const float* __restrict__ src, int64_t B, int64_t K,
                                                           float eps, int mode, const float* __restrict__ g,
                                                           float* __restrict__ c) {
  __shared__ float sm_m[8][33];
  __shared__ float sm_s[8][33];
  __shared__ int sm_bad[8][33];
  const int64_t k = static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x;
  float m = -INFINITY, s = 0.f;
  int bad = 0;
  if (k < K) {
    const float shift = mode == 1 ? *g : 0.f;
    for (int64_t b = threadIdx.y; b < B; b += 8) {
      float z = src[b * K + k];
      if (mode != 2) z = z / eps - shift;
      if (mode == 0 && !(fabsf(z) < INFINITY)) {  // NaN or +-inf
        bad = 1;
        continue;
      }
      lse_add(m, s, z);
    }
  }
  sm_m[threadIdx.y][threadIdx.x] = m;
  sm_s[threadIdx.y][threadIdx.x] = s;
  sm_bad[threadIdx.y][threadIdx.x] = bad;
  __syncthreads();
  if (threadIdx.y == 0 && k < K) {
    for (int y = 1; y < 8; ++y) {
      lse_combine(m, s, sm_m[y][threadIdx.x], sm_s[y][threadIdx.x]);
      bad |= sm_bad[y][threadIdx.x];
    }
    c[k] = bad ? NAN : lse_value(m, s);
  }
}

// g = LSE_k c[k] over the K column log-sum-exps (one block of 256 threads); NaN if any c[k] is NaN.
__global__ void __launch_bounds__(256) sinkhorn_global_kernel(const float* __restrict__ c, int64_t K,
                                                              float* __restrict__ g) {
  __shared__ float sm_m[256];
  __shared__ float sm_s[256];
  __shared__ int sm_nan[256];
  float m = -INFINITY, s = 0.f;
  int nan = 0;
  for (int64_t k = threadIdx.x; k < K; k += 256) {
    const float x = c[k];
    if (isnan(x)) nan = 1; else lse_add(m, s, x);
  }
  sm_m[threadIdx.x] = m;
  sm_s[threadIdx.x] = s;
  sm_nan[threadIdx.x] = nan;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int t = 1; t < 256; ++t) {
      lse_combine(m, s, sm_m[t], sm_s[t]);
      nan |= sm_nan[t];
    }
    *g = nan ? NAN : lse_value(m, s);
  }
}

// One reference iteration on one sample per warp, in the reference's order of operations:
// z = (X - c[k]) - log K (X = S/eps - g when first, else W), r = LSE_k z, W = (z - r) - log B written
// back in place; on the last iteration W holds the codes exp(W + log B) instead.
__global__ void __launch_bounds__(256) sinkhorn_row_kernel(const float* __restrict__ S, int64_t B, int64_t K,
                                                           float eps, float log_k, float log_b,
                                                           const float* __restrict__ g, const float* __restrict__ c,
                                                           bool first, bool last, float* w) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (b >= B) return;
  const float* src = first ? S + b * K : w + b * K;
  const float shift = first ? *g : 0.f;
  float m = -INFINITY, s = 0.f;
  for (int64_t k = lane; k < K; k += 32) {
    const float x = first ? src[k] / eps - shift : src[k];
    lse_add(m, s, (x - c[k]) - log_k);
  }
  warp_lse(m, s);
  const float r = lse_value(m, s);
  for (int64_t k = lane; k < K; k += 32) {
    const float x = first ? src[k] / eps - shift : src[k];
    const float wk = (((x - c[k]) - log_k) - r) - log_b;
    w[b * K + k] = last ? expf(wk + log_b) : wk;
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
  // work buffers: v holds the K column log-sum-exps, u[0] the global one; codes holds the log-codes W
  float* c = v;
  float* g = u;
  const float log_k = logf(static_cast<float>(K)), log_b = logf(static_cast<float>(B));
  const dim3 col_block(32, 8);
  const unsigned col_grid = static_cast<unsigned>((K + 31) / 32);
  const unsigned row_grid = static_cast<unsigned>((B + kRowsPerBlock - 1) / kRowsPerBlock);
  sinkhorn_col_kernel<<<col_grid, col_block, 0, stream>>>(scores, B, K, eps, 0, g, c);
  sinkhorn_global_kernel<<<1, 256, 0, stream>>>(c, K, g);
  for (int it = 0; it < n_iters; ++it) {
    const bool first = it == 0;
    if (first) {
      sinkhorn_col_kernel<<<col_grid, col_block, 0, stream>>>(scores, B, K, eps, 1, g, c);
    } else {
      sinkhorn_col_kernel<<<col_grid, col_block, 0, stream>>>(codes, B, K, eps, 2, g, c);
    }
    sinkhorn_row_kernel<<<row_grid, 32 * kRowsPerBlock, 0, stream>>>(scores, B, K, eps, log_k, log_b, g, c, first,
                                                                     it == n_iters - 1, codes);
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
