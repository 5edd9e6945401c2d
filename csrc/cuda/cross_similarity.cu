// CUDA kernels of the fused region-word cross similarity (AAHR/SCAN relevance and CHAN hard
// assignment), forward and backward. Torch-free; see aahr_cuda.cuh for the contract and
// aahr_fast/kernels/cross_similarity.py for the math (the Triton twin of these kernels).
//
// One thread block = one image i x TC captions. The cosine tile S (N x TC*L) is accumulated in shared
// memory over feature tiles of width kBK (regions and words staged in shared memory, scaled by
// their inverse norms), then every per-pair reduction (L2 normalisation over words / regions, max,
// mean, log-sum-exp) runs on the tile. Extra global memory is O(Bi * Bt): nothing of size
// Bi*Bt*N*L is ever written. The backward recomputes the tile, turns it into dL/dcos in place, and
// contracts it with the staged words / regions into fp32 gradients with atomics.
//
// Formulas (aahr-method.md section 2.6; SCAN; CHAN):
//   P = LeakyReLU(cos) on valid slots, 0 elsewhere
//   t2i = mean_w max_r P[r,w] / (||P[r,:]|| + eps),  i2t = mean_r max_w P[r,w] / (||P[:,w]|| + eps)
//   hard: m_w = max_r cos[r,w];  mean_w m_w  or  T * log sum_w exp(m_w / T)
// Ties in a max go to the lowest index; a NaN cosine in a valid slot makes its pair NaN and wins the argmax
// (the first NaN, as torch.max), so the gradients route like the reference and the other backends.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

#include "aahr_cuda.cuh"

namespace aahr_cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kBK = 32;           // feature-tile width
constexpr int kMaxCaptions = 8;   // captions per block (TC <= kMaxCaptions)

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }

__device__ __forceinline__ float warp_sum(float x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

__device__ __forceinline__ float warp_max(float x) {
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

// Shared-memory layout of one block (floats unless noted), all sized from N, L, TC.
struct Layout {
  int ldS, ldT;
  int64_t off_S, off_R, off_W, off_denW, off_denR, off_sdpW, off_sdpR, off_rstar, off_wstar, off_flag, total;
  __host__ __device__ Layout(int64_t N, int64_t L, int TC) {
    ldS = static_cast<int>(TC * L) + 1;  // +1: fewer bank conflicts on column walks
    ldT = kBK + 1;
    off_S = 0;
    off_R = off_S + N * ldS;
    off_W = off_R + N * ldT;
    off_denW = off_W + TC * L * ldT;   // (N, TC): norm over words of each region row
    off_denR = off_denW + N * TC;      // (TC, L): norm over regions of each word column
    off_sdpW = off_denR + TC * L;      // (N, TC)
    off_sdpR = off_sdpW + N * TC;      // (TC, L)
    off_rstar = off_sdpR + TC * L;     // int (TC, L): argmax region per word
    off_wstar = off_rstar + TC * L;    // int (N, TC): argmax word per region
    off_flag = off_wstar + N * TC;     // int (TC,): NaN flag per pair
    total = off_flag + TC;
  }
};

// Accumulate the cosine tile S[r, c*L + w] (r < N, c < tc) of image i and captions t0.. over all of D.
template <typename T>
__device__ void cosine_tile(const XsimProblem& p, const T* __restrict__ R, const T* __restrict__ W, int64_t i,
                            int64_t t0, int tc, int rlen, const Layout& lay, float* sm) {
  const int N = static_cast<int>(p.N), L = static_cast<int>(p.L);
  const int64_t D = p.D;
  float* S = sm + lay.off_S;
  float* Rt = sm + lay.off_R;
  float* Wt = sm + lay.off_W;
  const int cols = tc * L;
  #pragma unroll 1
  for (int e = threadIdx.x; e < N * cols; e += kThreads) S[(e / cols) * lay.ldS + e % cols] = 0.f;
  for (int64_t d0 = 0; d0 < D; d0 += kBK) {
    __syncthreads();
    #pragma unroll 1
    for (int e = threadIdx.x; e < N * kBK; e += kThreads) {
      const int r = e / kBK, k = e % kBK;
      const int64_t d = d0 + k;
      float x = 0.f;
      if (r < rlen && d < D) x = to_f(R[(i * N + r) * D + d]) * p.rinv[i * N + r];
      Rt[r * lay.ldT + k] = x;
    }
    #pragma unroll 1
    for (int e = threadIdx.x; e < cols * kBK; e += kThreads) {
      const int c = e / kBK, k = e % kBK, w = c % L;
      const int64_t d = d0 + k, t = t0 + c / L;
      float x = 0.f;
      if (d < D && w < p.word_lens[t]) x = to_f(W[(t * L + w) * D + d]) * p.winv[t * L + w];
      Wt[c * lay.ldT + k] = x;
    }
    __syncthreads();
    #pragma unroll 1
    for (int e = threadIdx.x; e < N * cols; e += kThreads) {
      const int r = e / cols, c = e % cols;
      if (r >= rlen) continue;
      const float* a = Rt + r * lay.ldT;
      const float* b = Wt + c * lay.ldT;
      float acc = 0.f;
#pragma unroll 8
      for (int k = 0; k < kBK; ++k) acc = fmaf(a[k], b[k], acc);
      S[r * lay.ldS + c] += acc;
    }
  }
  __syncthreads();
}

// In place: S -> P (LeakyReLU on valid slots, 0 elsewhere) for kRelevance, or invalid slots -> -inf for
// the hard modes; sets the per-pair NaN flags.
__device__ void mask_tile(const XsimProblem& p, int64_t t0, int tc, int rlen, const Layout& lay, float* sm) {
  const int N = static_cast<int>(p.N), L = static_cast<int>(p.L), cols = tc * L;
  float* S = sm + lay.off_S;
  int* flag = reinterpret_cast<int*>(sm + lay.off_flag);
  #pragma unroll 1
  for (int c = threadIdx.x; c < tc; c += kThreads) flag[c] = 0;
  __syncthreads();
  #pragma unroll 1
  for (int e = threadIdx.x; e < N * cols; e += kThreads) {
    const int r = e / cols, c = e % cols, cap = c / L, w = c % L;
    const bool valid = r < rlen && w < p.word_lens[t0 + cap];
    float s = S[r * lay.ldS + c];
    if (valid && isnan(s)) flag[cap] = 1;
    if (p.mode == kRelevance) {
      s = valid ? (s > 0.f ? s : s * p.slope) : 0.f;
    } else {
      s = valid ? s : -INFINITY;
    }
    S[r * lay.ldS + c] = s;
  }
  __syncthreads();
}

// Per-caption statistics of the relevance mode (one warp per caption): norms over words (denW, stored
// as the plain norm) and over regions (denR), and the two argmax maps.
__device__ void relevance_stats(const XsimProblem& p, int64_t t0, int tc, int rlen, const Layout& lay, float* sm) {
  const int L = static_cast<int>(p.L);
  const float* S = sm + lay.off_S;
  float* nW = sm + lay.off_denW;
  float* nR = sm + lay.off_denR;
  int* rstar = reinterpret_cast<int*>(sm + lay.off_rstar);
  int* wstar = reinterpret_cast<int*>(sm + lay.off_wstar);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  #pragma unroll 1
  for (int c = warp; c < tc; c += kWarps) {
    const int wl = static_cast<int>(p.word_lens[t0 + c]);
    #pragma unroll 1
    for (int r = lane; r < rlen; r += 32) {
      float s2 = 0.f;
      #pragma unroll 1
      for (int w = 0; w < wl; ++w) {
        const float x = S[r * lay.ldS + c * L + w];
        s2 = fmaf(x, x, s2);
      }
      nW[r * tc + c] = sqrtf(s2);
    }
    #pragma unroll 1
    for (int w = lane; w < wl; w += 32) {
      float s2 = 0.f;
      #pragma unroll 1
      for (int r = 0; r < rlen; ++r) {
        const float x = S[r * lay.ldS + c * L + w];
        s2 = fmaf(x, x, s2);
      }
      nR[c * L + w] = sqrtf(s2);
    }
    __syncwarp();
    #pragma unroll 1
    for (int w = lane; w < wl; w += 32) {  // best region of each word (t2i)
      float best = -INFINITY;
      int arg = 0;
      #pragma unroll 1
      for (int r = 0; r < rlen; ++r) {
        const float q = S[r * lay.ldS + c * L + w] / (nW[r * tc + c] + p.eps);
        if (q > best || (isnan(q) && !isnan(best))) { best = q; arg = r; }  // first NaN wins (torch.max)
      }
      rstar[c * L + w] = arg;
    }
    #pragma unroll 1
    for (int r = lane; r < rlen; r += 32) {  // best word of each region (i2t)
      float best = -INFINITY;
      int arg = 0;
      #pragma unroll 1
      for (int w = 0; w < wl; ++w) {
        const float q = S[r * lay.ldS + c * L + w] / (nR[c * L + w] + p.eps);
        if (q > best || (isnan(q) && !isnan(best))) { best = q; arg = w; }  // first NaN wins (torch.max)
      }
      wstar[r * tc + c] = arg;
    }
  }
  __syncthreads();
}

// Hard modes: best region of each word (first maximum of the cosine).
__device__ void hard_stats(const XsimProblem& p, int64_t t0, int tc, int rlen, const Layout& lay, float* sm) {
  const int L = static_cast<int>(p.L);
  const float* S = sm + lay.off_S;
  int* rstar = reinterpret_cast<int*>(sm + lay.off_rstar);
  float* m = sm + lay.off_denR;  // (TC, L) best cosine per word
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  #pragma unroll 1
  for (int c = warp; c < tc; c += kWarps) {
    const int wl = static_cast<int>(p.word_lens[t0 + c]);
    #pragma unroll 1
    for (int w = lane; w < wl; w += 32) {
      float best = -INFINITY;
      int arg = 0;
      #pragma unroll 1
      for (int r = 0; r < rlen; ++r) {
        const float q = S[r * lay.ldS + c * L + w];
        if (q > best || (isnan(q) && !isnan(best))) { best = q; arg = r; }  // first NaN wins (torch.max)
      }
      rstar[c * L + w] = arg;
      m[c * L + w] = best;
    }
  }
  __syncthreads();
}

template <typename T>
__global__ void __launch_bounds__(kThreads) xsim_forward_kernel(XsimProblem p, int tc_max, float* __restrict__ out_a,
                                                                float* __restrict__ out_b) {
  extern __shared__ float sm[];
  const int64_t ntb = (p.Bt + tc_max - 1) / tc_max;
  const int64_t i = blockIdx.x / ntb;
  const int64_t t0 = (blockIdx.x % ntb) * tc_max;
  const int tc = static_cast<int>(p.Bt - t0 < tc_max ? p.Bt - t0 : tc_max);
  const int rlen = static_cast<int>(p.region_lens[i]);
  const Layout lay(p.N, p.L, tc);
  cosine_tile(p, static_cast<const T*>(p.regions), static_cast<const T*>(p.words), i, t0, tc, rlen, lay, sm);
  mask_tile(p, t0, tc, rlen, lay, sm);
  const float* S = sm + lay.off_S;
  const int* flag = reinterpret_cast<const int*>(sm + lay.off_flag);
  const int L = static_cast<int>(p.L);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (p.mode == kRelevance) {
    relevance_stats(p, t0, tc, rlen, lay, sm);
    const float* nW = sm + lay.off_denW;
    const float* nR = sm + lay.off_denR;
    const int* rstar = reinterpret_cast<const int*>(sm + lay.off_rstar);
    const int* wstar = reinterpret_cast<const int*>(sm + lay.off_wstar);
    #pragma unroll 1
    for (int c = warp; c < tc; c += kWarps) {
      const int64_t t = t0 + c;
      const int wl = static_cast<int>(p.word_lens[t]);
      float acc = 0.f;
      #pragma unroll 1
      for (int w = lane; w < wl; w += 32) {
        const int r = rstar[c * L + w];
        acc += S[r * lay.ldS + c * L + w] / (nW[r * tc + c] + p.eps);
      }
      const float t2i = warp_sum(acc) / static_cast<float>(wl);
      acc = 0.f;
      #pragma unroll 1
      for (int r = lane; r < rlen; r += 32) {
        const int w = wstar[r * tc + c];
        acc += S[r * lay.ldS + c * L + w] / (nR[c * L + w] + p.eps);
      }
      const float i2t = warp_sum(acc) / static_cast<float>(rlen);
      if (lane == 0) {
        out_a[t * p.Bi + i] = flag[c] ? NAN : t2i;
        out_b[i * p.Bt + t] = flag[c] ? NAN : i2t;
      }
    }
  } else {
    hard_stats(p, t0, tc, rlen, lay, sm);
    const float* m = sm + lay.off_denR;
    #pragma unroll 1
    for (int c = warp; c < tc; c += kWarps) {
      const int64_t t = t0 + c;
      const int wl = static_cast<int>(p.word_lens[t]);
      float sim;
      if (p.mode == kHardMean) {
        float acc = 0.f;
        #pragma unroll 1
        for (int w = lane; w < wl; w += 32) acc += m[c * L + w];
        sim = warp_sum(acc) / static_cast<float>(wl);
      } else {
        float mx = -INFINITY;
        #pragma unroll 1
        for (int w = lane; w < wl; w += 32) mx = fmaxf(mx, m[c * L + w] * p.inv_temperature);
        mx = warp_max(mx);
        float acc = 0.f;
        #pragma unroll 1
        for (int w = lane; w < wl; w += 32) acc += expf(m[c * L + w] * p.inv_temperature - mx);
        sim = (mx + logf(warp_sum(acc))) / p.inv_temperature;
      }
      if (lane == 0) out_a[i * p.Bt + t] = flag[c] ? NAN : sim;
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) xsim_backward_kernel(XsimProblem p, int tc_max,
                                                                 const float* __restrict__ grad_a,
                                                                 const float* __restrict__ grad_b,
                                                                 float* __restrict__ g_regions,
                                                                 float* __restrict__ g_words) {
  extern __shared__ float sm[];
  const int64_t ntb = (p.Bt + tc_max - 1) / tc_max;
  const int64_t i = blockIdx.x / ntb;
  const int64_t t0 = (blockIdx.x % ntb) * tc_max;
  const int tc = static_cast<int>(p.Bt - t0 < tc_max ? p.Bt - t0 : tc_max);
  const int rlen = static_cast<int>(p.region_lens[i]);
  const int N = static_cast<int>(p.N), L = static_cast<int>(p.L), cols = tc * L;
  const int64_t D = p.D;
  const Layout lay(N, L, tc);
  const T* R = static_cast<const T*>(p.regions);
  const T* W = static_cast<const T*>(p.words);
  cosine_tile(p, R, W, i, t0, tc, rlen, lay, sm);
  mask_tile(p, t0, tc, rlen, lay, sm);
  float* S = sm + lay.off_S;
  const int* rstar = reinterpret_cast<const int*>(sm + lay.off_rstar);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (p.mode == kRelevance) {
    relevance_stats(p, t0, tc, rlen, lay, sm);
    const float* nW = sm + lay.off_denW;
    const float* nR = sm + lay.off_denR;
    float* sdpW = sm + lay.off_sdpW;
    float* sdpR = sm + lay.off_sdpR;
    const int* wstar = reinterpret_cast<const int*>(sm + lay.off_wstar);
    // sdpW[r] = sum_{w: rstar[w] = r} g1 * P[r, w];  sdpR[w] = sum_{r: wstar[r] = w} g2 * P[r, w]
    #pragma unroll 1
    for (int c = warp; c < tc; c += kWarps) {
      const int64_t t = t0 + c;
      const int wl = static_cast<int>(p.word_lens[t]);
      const float g1 = grad_a[t * p.Bi + i] / static_cast<float>(wl);
      const float g2 = grad_b[i * p.Bt + t] / static_cast<float>(rlen);
      #pragma unroll 1
      for (int r = lane; r < rlen; r += 32) {
        float acc = 0.f;
        #pragma unroll 1
        for (int w = 0; w < wl; ++w)
          if (rstar[c * L + w] == r) acc += g1 * S[r * lay.ldS + c * L + w];
        sdpW[r * tc + c] = acc;
      }
      #pragma unroll 1
      for (int w = lane; w < wl; w += 32) {
        float acc = 0.f;
        #pragma unroll 1
        for (int r = 0; r < rlen; ++r)
          if (wstar[r * tc + c] == w) acc += g2 * S[r * lay.ldS + c * L + w];
        sdpR[c * L + w] = acc;
      }
    }
    __syncthreads();
    #pragma unroll 1
    for (int e = threadIdx.x; e < N * cols; e += kThreads) {
      const int r = e / cols, c = e % cols, cap = c / L, w = c % L;
      const int64_t t = t0 + cap;
      const int wl = static_cast<int>(p.word_lens[t]);
      float dc = 0.f;
      if (r < rlen && w < wl) {
        const float P = S[r * lay.ldS + c];
        const float g1 = grad_a[t * p.Bi + i] / static_cast<float>(wl);
        const float g2 = grad_b[i * p.Bt + t] / static_cast<float>(rlen);
        const float nw = nW[r * tc + cap], dw = nw + p.eps;
        const float nr = nR[cap * L + w], dr = nr + p.eps;
        float dp = 0.f;
        if (rstar[cap * L + w] == r) dp += g1 / dw;
        if (nw > 0.f) dp -= P * sdpW[r * tc + cap] / (dw * dw * nw);
        if (wstar[r * tc + cap] == w) dp += g2 / dr;
        if (nr > 0.f) dp -= P * sdpR[cap * L + w] / (dr * dr * nr);
        dc = P > 0.f ? dp : dp * p.slope;
      }
      S[r * lay.ldS + c] = dc;
    }
  } else {
    hard_stats(p, t0, tc, rlen, lay, sm);
    float* wgt = sm + lay.off_sdpR;  // (TC, L) weight of each word's best cosine
    const float* m = sm + lay.off_denR;
    #pragma unroll 1
    for (int c = warp; c < tc; c += kWarps) {
      const int64_t t = t0 + c;
      const int wl = static_cast<int>(p.word_lens[t]);
      const float g = grad_a[i * p.Bt + t];
      if (p.mode == kHardMean) {
        #pragma unroll 1
        for (int w = lane; w < wl; w += 32) wgt[c * L + w] = g / static_cast<float>(wl);
      } else {
        float mx = -INFINITY;
        #pragma unroll 1
        for (int w = lane; w < wl; w += 32) mx = fmaxf(mx, m[c * L + w] * p.inv_temperature);
        mx = warp_max(mx);
        float acc = 0.f;
        #pragma unroll 1
        for (int w = lane; w < wl; w += 32) acc += expf(m[c * L + w] * p.inv_temperature - mx);
        const float z = warp_sum(acc);
        #pragma unroll 1
        for (int w = lane; w < wl; w += 32) wgt[c * L + w] = g * expf(m[c * L + w] * p.inv_temperature - mx) / z;
      }
    }
    __syncthreads();
    #pragma unroll 1
    for (int e = threadIdx.x; e < N * cols; e += kThreads) {
      const int r = e / cols, c = e % cols, cap = c / L, w = c % L;
      const bool valid = r < rlen && w < p.word_lens[t0 + cap];
      S[r * lay.ldS + c] = (valid && rstar[cap * L + w] == r) ? wgt[cap * L + w] : 0.f;
    }
  }
  // contract dL/dcos with the staged (normalised) words and regions
  float* Rt = sm + lay.off_R;
  float* Wt = sm + lay.off_W;
  for (int64_t d0 = 0; d0 < D; d0 += kBK) {
    __syncthreads();
    #pragma unroll 1
    for (int e = threadIdx.x; e < N * kBK; e += kThreads) {
      const int r = e / kBK, k = e % kBK;
      const int64_t d = d0 + k;
      Rt[r * lay.ldT + k] = (r < rlen && d < D) ? to_f(R[(i * N + r) * D + d]) * p.rinv[i * N + r] : 0.f;
    }
    #pragma unroll 1
    for (int e = threadIdx.x; e < cols * kBK; e += kThreads) {
      const int c = e / kBK, k = e % kBK, w = c % L;
      const int64_t d = d0 + k, t = t0 + c / L;
      Wt[c * lay.ldT + k] = (d < D && w < p.word_lens[t]) ? to_f(W[(t * L + w) * D + d]) * p.winv[t * L + w] : 0.f;
    }
    __syncthreads();
    if (g_regions != nullptr) {
      #pragma unroll 1
      for (int e = threadIdx.x; e < rlen * kBK; e += kThreads) {
        const int r = e / kBK, k = e % kBK;
        if (d0 + k >= D) continue;
        float acc = 0.f;
        #pragma unroll 1
        for (int c = 0; c < cols; ++c) acc = fmaf(S[r * lay.ldS + c], Wt[c * lay.ldT + k], acc);
        atomicAdd(&g_regions[(i * N + r) * D + d0 + k], acc);
      }
    }
    if (g_words != nullptr) {
      #pragma unroll 1
      for (int e = threadIdx.x; e < cols * kBK; e += kThreads) {
        const int c = e / kBK, k = e % kBK, w = c % L;
        const int64_t t = t0 + c / L;
        if (d0 + k >= D || w >= p.word_lens[t]) continue;
        float acc = 0.f;
        #pragma unroll 1
        for (int r = 0; r < rlen; ++r) acc = fmaf(S[r * lay.ldS + c], Rt[r * lay.ldT + k], acc);
        atomicAdd(&g_words[(t * L + w) * D + d0 + k], acc);
      }
    }
  }
}

// Largest captions-per-block whose shared memory fits the device's opt-in limit; 0 if none fits.
int pick_tc(const XsimProblem& p, size_t* smem_bytes) {
  int dev = 0;
  int limit = 48 * 1024;
  if (cudaGetDevice(&dev) == cudaSuccess) {
    int optin = 0;
    if (cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) == cudaSuccess && optin > 0)
      limit = optin;
  }
  for (int tc = kMaxCaptions; tc >= 1; --tc) {
    if (tc > 1 && tc > p.Bt) continue;
    const size_t bytes = static_cast<size_t>(Layout(p.N, p.L, tc).total) * sizeof(float);
    // prefer tiles within the default 48 KiB (more resident blocks) unless only opt-in memory fits
    if (bytes <= 48 * 1024 || (tc == 1 && bytes <= static_cast<size_t>(limit))) {
      *smem_bytes = bytes;
      return tc;
    }
  }
  return 0;
}

template <typename K>
cudaError_t prepare(K kernel, size_t smem) {
  if (smem > 48 * 1024)
    return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  return cudaSuccess;
}

template <typename T>
cudaError_t forward_t(const XsimProblem& p, float* out_a, float* out_b, cudaStream_t stream) {
  size_t smem = 0;
  const int tc = pick_tc(p, &smem);
  if (tc == 0) return cudaErrorInvalidValue;
  cudaError_t err = prepare(xsim_forward_kernel<T>, smem);
  if (err != cudaSuccess) return err;
  const int64_t blocks = p.Bi * ((p.Bt + tc - 1) / tc);
  xsim_forward_kernel<T><<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(p, tc, out_a, out_b);
  return cudaGetLastError();
}

template <typename T>
cudaError_t backward_t(const XsimProblem& p, const float* ga, const float* gb, float* gr, float* gw,
                       cudaStream_t stream) {
  size_t smem = 0;
  const int tc = pick_tc(p, &smem);
  if (tc == 0) return cudaErrorInvalidValue;
  cudaError_t err = prepare(xsim_backward_kernel<T>, smem);
  if (err != cudaSuccess) return err;
  const int64_t blocks = p.Bi * ((p.Bt + tc - 1) / tc);
  xsim_backward_kernel<T><<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(p, tc, ga, gb, gr, gw);
  return cudaGetLastError();
}

}  // namespace

cudaError_t xsim_forward(const XsimProblem& p, float* out_a, float* out_b, cudaStream_t stream) {
  if (p.Bi <= 0 || p.Bt <= 0) return cudaSuccess;
  if (p.Bi * ((p.Bt + kMaxCaptions - 1) / kMaxCaptions) > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  switch (p.dtype) {
    case kFloat32: return forward_t<float>(p, out_a, out_b, stream);
    case kFloat16: return forward_t<__half>(p, out_a, out_b, stream);
    case kBFloat16: return forward_t<__nv_bfloat16>(p, out_a, out_b, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t xsim_backward(const XsimProblem& p, const float* grad_a, const float* grad_b, float* g_regions,
                          float* g_words, cudaStream_t stream) {
  if (p.Bi <= 0 || p.Bt <= 0 || (g_regions == nullptr && g_words == nullptr)) return cudaSuccess;
  if (p.Bi * p.Bt > 0x7fffffffLL * kMaxCaptions) return cudaErrorInvalidConfiguration;
  switch (p.dtype) {
    case kFloat32: return backward_t<float>(p, grad_a, grad_b, g_regions, g_words, stream);
    case kFloat16: return backward_t<__half>(p, grad_a, grad_b, g_regions, g_words, stream);
    case kBFloat16: return backward_t<__nv_bfloat16>(p, grad_a, grad_b, g_regions, g_words, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace aahr_cuda
