// The LFMA CUDA kernels (device code only; launched from lfma_cuda.cu).
//
// Kept apart from the launchers so that tests/cuda_emulation/ can compile this file as host C++
// and run the kernels on CPU threads (one per CUDA thread, __syncthreads as a barrier): the
// includer provides the CUDA types and intrinsics (cuda_runtime.h, cuda_bf16.h, cuda_fp16.h).
// See lfma_cuda.cu for what the kernels compute and how.
#ifndef LFMA_CUDA_KERNELS_CUH_
#define LFMA_CUDA_KERNELS_CUH_

#include <stdint.h>

namespace lfma_cuda {


constexpr int kTile = 64;          // dW tile: kTile x kTile outputs per block
constexpr int kThreads = 256;      // 16 x 16 threads, 4 x 4 outputs each
constexpr int kGradRows = 32;      // coefficient gradient: rows of G per block
constexpr int kGradCols = 64;      // ... and columns per shared-memory stage

// Frequencies per shared-memory chunk: 4 tables of KC x 64 entries = 32 KiB either way.
template <typename T> struct DeltaChunk { static constexpr int value = 32; };
template <> struct DeltaChunk<double> { static constexpr int value = 16; };
template <typename T> struct GradChunk { static constexpr int value = 32; };
template <> struct GradChunk<double> { static constexpr int value = 16; };

// (x * u) mod d for 0 <= x < d and any u; 32-bit arithmetic while the product fits.
__device__ __forceinline__ int64_t residue(int64_t x, int64_t u, int64_t d) {
  int64_t ur = u % d;
  if (ur < 0) ur += d;
  if (d <= 65536) {
    return static_cast<int64_t>(static_cast<uint32_t>(x) * static_cast<uint32_t>(ur) % static_cast<uint32_t>(d));
  }
  return (x * ur) % d;
}

// sin and cos of 2 pi r / d, 0 <= r < d: sincospi of 2r/d moved into (-1, 1].
__device__ __forceinline__ void phase(int64_t r, int64_t d, float* s, float* c) {
  int64_t two_r = 2 * r;
  if (two_r > d) two_r -= 2 * d;
  sincospif(static_cast<float>(two_r) / static_cast<float>(d), s, c);
}
__device__ __forceinline__ void phase(int64_t r, int64_t d, double* s, double* c) {
  int64_t two_r = 2 * r;
  if (two_r > d) two_r -= 2 * d;
  sincospi(static_cast<double>(two_r) / static_cast<double>(d), s, c);
}

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }

template <typename Out> __device__ __forceinline__ Out from_acc(float x);
template <> __device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <> __device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }

template <typename Out, typename Acc> struct Store {
  __device__ static Out apply(Acc v) { return from_acc<Out>(v); }
};
template <> struct Store<double, double> {
  __device__ static double apply(double v) { return v; }
};

template <typename Acc, typename Out>
__global__ void __launch_bounds__(kThreads)
delta_weight_kernel(const Acc* __restrict__ coeffs, const int64_t* __restrict__ rows,
                    const int64_t* __restrict__ cols, int k, int d_out, int d_in, Acc scale,
                    const Out* __restrict__ weight, Out* __restrict__ out) {
  constexpr int KC = DeltaChunk<Acc>::value;
  __shared__ Acc s_l1[KC][kTile];
  __shared__ Acc s_l2[KC][kTile];
  __shared__ Acc s_bc[KC][kTile];
  __shared__ Acc s_bs[KC][kTile];
  const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * 16 + tx;
  const int m0 = blockIdx.y * kTile, n0 = blockIdx.x * kTile;
  Acc acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = Acc(0);

  for (int k0 = 0; k0 < k; k0 += KC) {
    // Per-chunk tables: consecutive threads fill consecutive rows/columns (no bank conflicts).
    for (int e = tid; e < KC * kTile; e += kThreads) {
      const int kk = e / kTile, i = e % kTile, q = k0 + kk;
      Acc l1 = 0, l2 = 0, bc = 0, bs = 0;
      if (q < k) {
        const int m = m0 + i, n = n0 + i;
        if (m < d_out) {
          Acc sn, cs;
          phase(residue(m, rows[q], d_out), d_out, &sn, &cs);
          const Acc a = coeffs[2 * q], b = coeffs[2 * q + 1];
          l1 = scale * (a * cs - b * sn);
          l2 = -scale * (a * sn + b * cs);
        }
        if (n < d_in) phase(residue(n, cols[q], d_in), d_in, &bs, &bc);
      }
      s_l1[kk][i] = l1;
      s_l2[kk][i] = l2;
      s_bc[kk][i] = bc;
      s_bs[kk][i] = bs;
    }
    __syncthreads();
#pragma unroll 4
    for (int kk = 0; kk < KC; ++kk) {
      Acc l1[4], l2[4], bc[4], bs[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        l1[i] = s_l1[kk][ty + 16 * i];  // broadcast within a half-warp
        l2[i] = s_l2[kk][ty + 16 * i];
        bc[i] = s_bc[kk][tx + 16 * i];  // consecutive across the half-warp
        bs[i] = s_bs[kk][tx + 16 * i];
      }
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fma(l1[i], bc[j], fma(l2[i], bs[j], acc[i][j]));
    }
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int m = m0 + ty + 16 * i;
    if (m >= d_out) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int n = n0 + tx + 16 * j;
      if (n >= d_in) continue;
      const size_t at = static_cast<size_t>(m) * d_in + n;
      Acc v = acc[i][j];
      if (weight != nullptr) v += to_acc(weight[at]);
      out[at] = Store<Out, Acc>::apply(v);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
coeff_grad_partial_kernel(const T* __restrict__ g, const int64_t* __restrict__ rows,
                          const int64_t* __restrict__ cols, int k, int d_out, int d_in, T* __restrict__ partial) {
  constexpr int KC = GradChunk<T>::value;
  constexpr int kGroups = kThreads / KC;              // threads sharing one frequency
  constexpr int kRowsPer = kGradRows / kGroups;       // rows each of them owns
  __shared__ T s_g[kGradRows][kGradCols + 1];
  __shared__ T s_bc[kGradCols][KC];
  __shared__ T s_bs[kGradCols][KC];
  __shared__ T s_red[2][kGroups][KC];
  const int tid = threadIdx.x, kk = tid % KC, grp = tid / KC;
  const int q0 = blockIdx.x * KC, m0 = blockIdx.y * kGradRows, q = q0 + kk;
  T tc[kRowsPer], ts[kRowsPer];
#pragma unroll
  for (int r = 0; r < kRowsPer; ++r) tc[r] = ts[r] = T(0);

  for (int n0 = 0; n0 < d_in; n0 += kGradCols) {
    for (int e = tid; e < kGradRows * kGradCols; e += kThreads) {  // coalesced along n
      const int i = e / kGradCols, j = e % kGradCols, m = m0 + i, n = n0 + j;
      s_g[i][j] = (m < d_out && n < d_in) ? g[static_cast<size_t>(m) * d_in + n] : T(0);
    }
    for (int e = tid; e < kGradCols * KC; e += kThreads) {
      const int j = e / KC, c = e % KC, n = n0 + j, qq = q0 + c;
      T bs = 0, bc = 0;
      if (n < d_in && qq < k) phase(residue(n, cols[qq], d_in), d_in, &bs, &bc);
      s_bc[j][c] = bc;
      s_bs[j][c] = bs;
    }
    __syncthreads();
#pragma unroll 8
    for (int j = 0; j < kGradCols; ++j) {
      const T bc = s_bc[j][kk], bs = s_bs[j][kk];
#pragma unroll
      for (int r = 0; r < kRowsPer; ++r) {
        const T gv = s_g[grp + kGroups * r][j];
        tc[r] = fma(gv, bc, tc[r]);
        ts[r] = fma(gv, bs, ts[r]);
      }
    }
    __syncthreads();
  }

  // sum_m (cos phi - i sin phi)(Tc - i Ts) over this thread's rows
  T re = 0, im = 0;
  if (q < k) {
#pragma unroll
    for (int r = 0; r < kRowsPer; ++r) {
      const int m = m0 + grp + kGroups * r;
      if (m < d_out) {
        T sp, cp;
        phase(residue(m, rows[q], d_out), d_out, &sp, &cp);
        re += cp * tc[r] - sp * ts[r];
        im -= sp * tc[r] + cp * ts[r];
      }
    }
  }
  s_red[0][grp][kk] = re;
  s_red[1][grp][kk] = im;
  __syncthreads();
  if (tid < KC && q0 + tid < k) {
    T sr = 0, si = 0;
    for (int gi = 0; gi < kGroups; ++gi) {
      sr += s_red[0][gi][tid];
      si += s_red[1][gi][tid];
    }
    const size_t at = (static_cast<size_t>(blockIdx.y) * k + q0 + tid) * 2;
    partial[at] = sr;
    partial[at + 1] = si;
  }
}

template <typename T>
__global__ void coeff_grad_finish_kernel(const T* __restrict__ partial, int tiles, int k, double scale,
                                         T* __restrict__ out) {
  const int q = blockIdx.x * blockDim.x + threadIdx.x;
  if (q >= k) return;
  double re = 0, im = 0;
  for (int t = 0; t < tiles; ++t) {
    const size_t at = (static_cast<size_t>(t) * k + q) * 2;
    re += static_cast<double>(partial[at]);
    im += static_cast<double>(partial[at + 1]);
  }
  out[2 * q] = static_cast<T>(scale * re);
  out[2 * q + 1] = static_cast<T>(scale * im);
}

}  // namespace lfma_cuda

#endif  // LFMA_CUDA_KERNELS_CUH_
