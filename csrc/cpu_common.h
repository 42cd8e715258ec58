// Helpers shared by the CPU algorithms (cpu_*.h) and their plan (cpu_plan.cpp): correctly rounded
// phase tables, chunked parallel loops whose partial sums do not depend on scheduling, and residue
// walks (m * u mod d by recurrence, no division per entry).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

namespace lfma_ext {
namespace cpu {

constexpr double kTwoPi = 6.283185307179586476925286766559;

// cos/sin(2 pi t / d) for t < d, evaluated in double and rounded once to T.
template <typename T>
inline void phase_table(int64_t d, std::vector<T>& c, std::vector<T>& s) {
  c.resize(d);
  s.resize(d);
  at::parallel_for(0, d, 2048, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const double a = kTwoPi * static_cast<double>(t) / static_cast<double>(d);
      c[t] = static_cast<T>(std::cos(a));
      s[t] = static_cast<T>(std::sin(a));
    }
  });
}

template <typename T>
inline at::ScalarType complex_type() {
  return std::is_same<T, double>::value ? at::kComplexDouble : at::kComplexFloat;
}

// How many chunks to split n items of `work_per_item` each into: one per thread, fewer when the
// work is small. Chunks (not threads) own partial sums, so results do not depend on scheduling.
inline int64_t num_chunks_for(int64_t n, int64_t work_per_item) {
  const int64_t max_chunks = std::max<int64_t>(1, at::get_num_threads());
  const int64_t by_work = std::max<int64_t>(1, n * std::max<int64_t>(work_per_item, 1) / 32768);
  return std::min({max_chunks, by_work, std::max<int64_t>(n, 1)});
}

// f(chunk, begin, end) over `chunks` nearly equal ranges of [0, n), in parallel.
template <typename F>
inline void for_chunks(int64_t n, int64_t chunks, const F& f) {
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) f(c, n * c / chunks, n * (c + 1) / chunks);
  });
}

// f(x, q, r) for every position x in [0, count) (in parallel, `grain` positions at least per task) and
// every q < k, with r = (x * idx[q]) mod d walked by a recurrence: no division per entry.
template <typename F>
inline void for_residues(int64_t count, const int64_t* idx, int64_t k, int64_t d, int64_t grain, const F& f) {
  at::parallel_for(0, count, grain, [&](int64_t x0, int64_t x1) {
    std::vector<int64_t> r(k);
    for (int64_t q = 0; q < k; ++q) r[q] = (x0 * idx[q]) % d;
    for (int64_t x = x0; x < x1; ++x) {
      for (int64_t q = 0; q < k; ++q) {
        f(x, q, r[q]);
        r[q] += idx[q];
        if (r[q] >= d) r[q] -= d;
      }
    }
  });
}

}  // namespace cpu
}  // namespace lfma_ext
