// The single TORCH_LIBRARY registration of aahr_fast's op namespace `aahr_fast` (torch.ops.aahr_fast.*).
//
// Every schema of the C++/CUDA backends is declared here, or in the op family's own source file with
// TORCH_LIBRARY_FRAGMENT(aahr_fast, m). Kernels are attached per device with
// TORCH_LIBRARY_IMPL(aahr_fast, CPU, m) in csrc/cpu/*.cpp and TORCH_LIBRARY_IMPL(aahr_fast, CUDA, m)
// in csrc/cuda/*. Never add a second TORCH_LIBRARY(aahr_fast, ...): two registrations of one namespace
// abort the process. Sources are discovered by aahr_fast/ops/_ext.py (csrc/*.cpp, csrc/cpu/*.cpp).
#include <torch/library.h>

#include <string>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace aahr_fast {

// "openmp=<0|1> avx2=<0|1> cuda=<0|1>": how this library was compiled (a sentinel the loader uses to
// detect that the namespace is already registered in the process).
static std::string build_info() {
  std::string s;
#ifdef _OPENMP
  s += "openmp=1";
#else
  s += "openmp=0";
#endif
#ifdef CPU_CAPABILITY_AVX2
  s += " avx2=1";
#else
  s += " avx2=0";
#endif
#ifdef AAHR_WITH_CUDA
  s += " cuda=1";
#else
  s += " cuda=0";
#endif
  return s;
}

}  // namespace aahr_fast

TORCH_LIBRARY(aahr_fast, m) {
  m.def("build_info() -> str", &aahr_fast::build_info);

  // Cross similarity (csrc/cpu/cross_similarity.cpp). Inputs are packed valid fragments:
  // regions (sum(region_lens), D), words (sum(word_lens), D), lengths int64. mode: "relevance"
  // (returns t2i (Bt, Bi), i2t (Bi, Bt)), "hard_mean" / "hard_lse" (returns sim (Bi, Bt), empty).
  m.def(
      "cross_similarity_forward(Tensor regions, Tensor region_lens, Tensor words, Tensor word_lens, "
      "str mode, float negative_slope, float eps, float temperature) -> (Tensor, Tensor)");
  // Gradients w.r.t. the packed regions and words, given the gradients of the two forward outputs
  // (grad_b is ignored in the hard modes).
  m.def(
      "cross_similarity_backward(Tensor grad_a, Tensor grad_b, Tensor regions, Tensor region_lens, "
      "Tensor words, Tensor word_lens, str mode, float negative_slope, float eps, float temperature) "
      "-> (Tensor, Tensor)");
}
