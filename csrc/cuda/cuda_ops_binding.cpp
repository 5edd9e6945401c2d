// Thin torch binding of the CUDA kernels in csrc/cuda/*.cu (torch-free, declared in aahr_cuda.cuh).
//
// Compiled by aahr_fast/ops/_ext.py only when torch has CUDA (it globs csrc/cuda/*.cpp with the .cu
// files), into the one aahr_fast library. Adds schemas to the single `aahr_fast` namespace with
// TORCH_LIBRARY_FRAGMENT (csrc/aahr_ops.cpp holds the only TORCH_LIBRARY) and CUDA kernels with
// TORCH_LIBRARY_IMPL(aahr_fast, CUDA, m). Autograd lives in Python (aahr_fast/ops/*_cuda.py).
//
//   xsim_cuda_forward(regions, region_lens, words, word_lens, rinv, winv, mode, slope, eps, temperature)
//       -> (out_a, out_b)   mode 0: (t2i (Bt,Bi), i2t (Bi,Bt)); modes 1/2: (sim (Bi,Bt), empty)
//   xsim_cuda_backward(regions, region_lens, words, word_lens, rinv, winv, grad_a, grad_b, mode, slope, eps,
//                      temperature, need_regions, need_words)
//       -> (dL/d normalised regions (Bi,N,D) fp32, dL/d normalised words (Bt,L,D) fp32)  (empty if not needed)
//   sinkhorn_cuda(scores (B,K), eps, n_iters) -> codes (B,K) fp32
//   swav_rows_cuda(s_v, s_t, q_v, q_t (B,K), tau) -> (row_loss (B,), ds_v (B,K), ds_t (B,K)) fp32
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "aahr_cuda.cuh"

namespace aahr_fast {
namespace cuda_binding {

namespace {

void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "aahr_fast CUDA kernel ", what, " failed: ", cudaGetErrorString(err),
              err == cudaErrorInvalidValue ? " (tile does not fit in shared memory: N * L too large?)" : "");
}

aahr_cuda::DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return aahr_cuda::kFloat32;
    case at::kHalf: return aahr_cuda::kFloat16;
    case at::kBFloat16: return aahr_cuda::kBFloat16;
    default: TORCH_CHECK(false, "aahr_fast CUDA kernels support float32/float16/bfloat16, got ", t.scalar_type());
  }
  return aahr_cuda::kFloat32;
}

void check_on_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "aahr_fast CUDA op: ", name, " must be a CUDA tensor, got ", t.device());
}

struct Prepared {
  at::Tensor regions, words, region_lens, word_lens, rinv, winv;
  aahr_cuda::XsimProblem p;
};

Prepared prepare(const at::Tensor& regions, const at::Tensor& region_lens, const at::Tensor& words,
                 const at::Tensor& word_lens, const at::Tensor& rinv, const at::Tensor& winv, int64_t mode,
                 double slope, double eps, double temperature) {
  for (auto* t : {&regions, &words, &region_lens, &word_lens, &rinv, &winv}) check_on_cuda(*t, "input");
  TORCH_CHECK(regions.dim() == 3 && words.dim() == 3 && regions.size(2) == words.size(2),
              "xsim_cuda: regions (Bi,N,D) and words (Bt,L,D) with equal D expected");
  TORCH_CHECK(regions.scalar_type() == words.scalar_type(), "xsim_cuda: regions and words dtypes differ");
  TORCH_CHECK(mode >= 0 && mode <= 2, "xsim_cuda: mode must be 0, 1 or 2, got ", mode);
  Prepared r;
  r.regions = regions.contiguous();
  r.words = words.contiguous();
  r.region_lens = region_lens.to(at::kLong).contiguous();
  r.word_lens = word_lens.to(at::kLong).contiguous();
  r.rinv = rinv.to(at::kFloat).contiguous();
  r.winv = winv.to(at::kFloat).contiguous();
  auto& p = r.p;
  p.regions = r.regions.data_ptr();
  p.words = r.words.data_ptr();
  p.dtype = dtype_of(r.regions);
  p.region_lens = r.region_lens.data_ptr<int64_t>();
  p.word_lens = r.word_lens.data_ptr<int64_t>();
  p.rinv = r.rinv.data_ptr<float>();
  p.winv = r.winv.data_ptr<float>();
  p.Bi = regions.size(0);
  p.N = regions.size(1);
  p.D = regions.size(2);
  p.Bt = words.size(0);
  p.L = words.size(1);
  p.mode = static_cast<int>(mode);
  p.slope = static_cast<float>(slope);
  p.eps = static_cast<float>(eps);
  p.inv_temperature = static_cast<float>(1.0 / temperature);
  return r;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> xsim_forward(const at::Tensor& regions, const at::Tensor& region_lens,
                                                const at::Tensor& words, const at::Tensor& word_lens,
                                                const at::Tensor& rinv, const at::Tensor& winv, int64_t mode,
                                                double slope, double eps, double temperature) {
  const c10::cuda::CUDAGuard guard(regions.device());
  Prepared r = prepare(regions, region_lens, words, word_lens, rinv, winv, mode, slope, eps, temperature);
  auto opts = regions.options().dtype(at::kFloat);
  at::Tensor out_a, out_b;
  if (mode == aahr_cuda::kRelevance) {
    out_a = at::empty({r.p.Bt, r.p.Bi}, opts);
    out_b = at::empty({r.p.Bi, r.p.Bt}, opts);
  } else {
    out_a = at::empty({r.p.Bi, r.p.Bt}, opts);
    out_b = at::empty({0}, opts);
  }
  auto stream = c10::cuda::getCurrentCUDAStream(regions.device().index()).stream();
  check_cuda(aahr_cuda::xsim_forward(r.p, out_a.data_ptr<float>(),
                                     mode == aahr_cuda::kRelevance ? out_b.data_ptr<float>() : nullptr, stream),
             "xsim_forward");
  return {out_a, out_b};
}

std::tuple<at::Tensor, at::Tensor> xsim_backward(const at::Tensor& regions, const at::Tensor& region_lens,
                                                 const at::Tensor& words, const at::Tensor& word_lens,
                                                 const at::Tensor& rinv, const at::Tensor& winv,
                                                 const at::Tensor& grad_a, const at::Tensor& grad_b, int64_t mode,
                                                 double slope, double eps, double temperature, bool need_regions,
                                                 bool need_words) {
  const c10::cuda::CUDAGuard guard(regions.device());
  Prepared r = prepare(regions, region_lens, words, word_lens, rinv, winv, mode, slope, eps, temperature);
  auto opts = regions.options().dtype(at::kFloat);
  at::Tensor ga = grad_a.to(at::kFloat).contiguous();
  at::Tensor gb = mode == aahr_cuda::kRelevance ? grad_b.to(at::kFloat).contiguous() : ga;
  at::Tensor g_regions = need_regions ? at::zeros({r.p.Bi, r.p.N, r.p.D}, opts) : at::empty({0}, opts);
  at::Tensor g_words = need_words ? at::zeros({r.p.Bt, r.p.L, r.p.D}, opts) : at::empty({0}, opts);
  auto stream = c10::cuda::getCurrentCUDAStream(regions.device().index()).stream();
  check_cuda(aahr_cuda::xsim_backward(r.p, ga.data_ptr<float>(), gb.data_ptr<float>(),
                                      need_regions ? g_regions.data_ptr<float>() : nullptr,
                                      need_words ? g_words.data_ptr<float>() : nullptr, stream),
             "xsim_backward");
  return {g_regions, g_words};
}

at::Tensor sinkhorn(const at::Tensor& scores, double eps, int64_t n_iters) {
  check_on_cuda(scores, "scores");
  TORCH_CHECK(scores.dim() == 2, "sinkhorn_cuda: scores must be (B, K)");
  TORCH_CHECK(n_iters >= 1, "sinkhorn_cuda: n_iters must be >= 1");
  const c10::cuda::CUDAGuard guard(scores.device());
  at::Tensor s = scores.to(at::kFloat).contiguous();
  const int64_t B = s.size(0), K = s.size(1);
  auto opts = s.options();
  at::Tensor u = at::empty({B}, opts), v = at::empty({K}, opts), codes = at::empty({B, K}, opts);
  auto stream = c10::cuda::getCurrentCUDAStream(scores.device().index()).stream();
  check_cuda(aahr_cuda::sinkhorn_codes(s.data_ptr<float>(), B, K, static_cast<float>(eps), static_cast<int>(n_iters),
                                       u.data_ptr<float>(), v.data_ptr<float>(), codes.data_ptr<float>(), stream),
             "sinkhorn_codes");
  return codes;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> swav_rows(const at::Tensor& s_v, const at::Tensor& s_t,
                                                         const at::Tensor& q_v, const at::Tensor& q_t, double tau) {
  for (auto* t : {&s_v, &s_t, &q_v, &q_t}) check_on_cuda(*t, "input");
  TORCH_CHECK(s_v.dim() == 2 && s_v.sizes() == s_t.sizes() && s_v.sizes() == q_v.sizes() && s_v.sizes() == q_t.sizes(),
              "swav_rows_cuda: s_v, s_t, q_v, q_t must all be (B, K)");
  const c10::cuda::CUDAGuard guard(s_v.device());
  at::Tensor sv = s_v.to(at::kFloat).contiguous(), st = s_t.to(at::kFloat).contiguous();
  at::Tensor qv = q_v.to(at::kFloat).contiguous(), qt = q_t.to(at::kFloat).contiguous();
  const int64_t B = sv.size(0), K = sv.size(1);
  at::Tensor rows = at::empty({B}, sv.options()), ds_v = at::empty({B, K}, sv.options()),
             ds_t = at::empty({B, K}, sv.options());
  auto stream = c10::cuda::getCurrentCUDAStream(s_v.device().index()).stream();
  check_cuda(aahr_cuda::swav_rows(sv.data_ptr<float>(), st.data_ptr<float>(), qv.data_ptr<float>(),
                                  qt.data_ptr<float>(), B, K, static_cast<float>(tau), rows.data_ptr<float>(),
                                  ds_v.data_ptr<float>(), ds_t.data_ptr<float>(), stream),
             "swav_rows");
  return {rows, ds_v, ds_t};
}

}  // namespace cuda_binding
}  // namespace aahr_fast

TORCH_LIBRARY_FRAGMENT(aahr_fast, m) {
  m.def(
      "xsim_cuda_forward(Tensor regions, Tensor region_lens, Tensor words, Tensor word_lens, Tensor rinv, "
      "Tensor winv, int mode, float slope, float eps, float temperature) -> (Tensor, Tensor)");
  m.def(
      "xsim_cuda_backward(Tensor regions, Tensor region_lens, Tensor words, Tensor word_lens, Tensor rinv, "
      "Tensor winv, Tensor grad_a, Tensor grad_b, int mode, float slope, float eps, float temperature, "
      "bool need_regions, bool need_words) -> (Tensor, Tensor)");
  m.def("sinkhorn_cuda(Tensor scores, float eps, int n_iters) -> Tensor");
  m.def("swav_rows_cuda(Tensor s_v, Tensor s_t, Tensor q_v, Tensor q_t, float tau) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(aahr_fast, CUDA, m) {
  m.impl("xsim_cuda_forward", &aahr_fast::cuda_binding::xsim_forward);
  m.impl("xsim_cuda_backward", &aahr_fast::cuda_binding::xsim_backward);
  m.impl("sinkhorn_cuda", &aahr_fast::cuda_binding::sinkhorn);
  m.impl("swav_rows_cuda", &aahr_fast::cuda_binding::swav_rows);
}
