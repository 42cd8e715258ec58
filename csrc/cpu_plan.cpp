// How a CPU call runs the algorithm the Python planner chose (lfma_kernels/ops/backends/cpp.py costs the
// three; the fits behind its constants are in benchmarks/RESULTS.md, section "cpp algorithms cpu"): the
// hybrid's terms, and whether the separable product runs as fused loops or a GEMM.
#include "cpu_plan.h"

#include <algorithm>
#include <utility>

namespace lfma_ext {

namespace {
// Up to this K the separable product runs as fused loops (one pass over the output, no tables in memory,
// no GEMM setup); beyond it as an MKL GEMM, which was faster from K = 4 (dW) and K = 8 (gradient; G R is a
// tall-skinny GEMM) in the crossover runs. The Python cost model reads the same thresholds
// (CompiledCpuCosts.loop_max_k).
constexpr int64_t kSepLoopMaxK[2] = {4, 2};  // [forward (gradient), inverse (dW)]
}  // namespace

namespace cpu {

Terms make_terms(const int64_t* rows, const int64_t* cols, int64_t k, int64_t m, int64_t n) {
  Terms t;
  t.term.resize(k);
  t.mirror.resize(k);
  std::vector<std::pair<int64_t, int64_t>> keyed(k);  // (column * m + step, frequency)
  for (int64_t i = 0; i < k; ++i) {
    const int64_t u = rows[i], v = cols[i];
    const bool mirror = 2 * v > n;
    t.mirror[i] = mirror;
    keyed[i] = {(mirror ? n - v : v) * m + (mirror ? (m - u) % m : u), i};
  }
  std::sort(keyed.begin(), keyed.end());
  for (int64_t j = 0; j < k; ++j) {
    if (j == 0 || keyed[j].first != keyed[j - 1].first) {
      t.col.push_back(static_cast<int32_t>(keyed[j].first / m));
      t.step.push_back(static_cast<int32_t>(keyed[j].first % m));
    }
    t.term[keyed[j].second] = static_cast<int32_t>(t.col.size() - 1);
  }
  return t;
}

Plan make_plan(int64_t algo, const int64_t* rows, const int64_t* cols, int64_t k, int64_t m, int64_t n, bool inverse) {
  Plan plan{algo, false, {}};
  if (algo == kHybrid) plan.terms = make_terms(rows, cols, k, m, n);
  // Up to kSepLoopMaxK the separable product runs as fused loops, beyond it as an MKL GEMM.
  plan.fused_loops = algo == kSeparable && k <= kSepLoopMaxK[inverse ? 1 : 0];
  return plan;
}

}  // namespace cpu
}  // namespace lfma_ext
