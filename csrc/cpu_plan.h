// How the CPU kernels run a call: the algorithm the Python planner chose (algo=; lfma_kernels/ops/
// backends/cpp.py costs them), and for the hybrid its terms.
#pragma once

#include <cstdint>
#include <vector>

#include "lfma_ext.h"

namespace lfma_ext {
namespace cpu {

// The hybrid's direct terms. Frequency k becomes the term c e^{2 pi i m step / M} in column col <= N/2
// of the row-FFT half spectrum; a frequency past N/2 enters as the conjugate of its mirror
// (-u, N - v), so every k touches exactly one column. Frequencies with the same (col, step) share
// one term: top-K selection on a real matrix picks both members of each conjugate pair, and the
// two land on the same term, so this halves the direct work of the paper's selections.
struct Terms {
  std::vector<int32_t> step, col;   // per unique term, sorted by (col, step)
  std::vector<int32_t> term;        // per frequency: its term
  std::vector<uint8_t> mirror;      // per frequency: entered as the conjugate of its mirror
};

Terms make_terms(const int64_t* rows, const int64_t* cols, int64_t k, int64_t m, int64_t n);

// How a call runs: the algorithm; for the separable product whether it runs as fused loops (small K)
// or a GEMM; for the hybrid its terms.
struct Plan {
  int64_t algo;
  bool fused_loops;
  Terms terms;
};

// For `algo` on these K frequencies (the hybrid's distinct terms built, merged conjugate pairs once).
// `inverse`: building dW; otherwise dL/dcoeffs from G.
Plan make_plan(int64_t algo, const int64_t* rows, const int64_t* cols, int64_t k, int64_t m, int64_t n, bool inverse);

}  // namespace cpu
}  // namespace lfma_ext
