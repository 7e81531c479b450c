// y[M, n0:n1] = x[M, K] · (W[K, n0:n1] int8 × scale[G, n0:n1]), W row-major [K, N], G = ceil(K / group);
// and the transposed form y[M, n0:n1] = x[M, K] · (W[n0:n1, K] int8 × scale[n0:n1])ᵀ (W row-major [N, K]: a tied
// embedding table used as the LM head, each output one contiguous row of W).
//
// One source, compiled once per instruction set (FS_ISA = avx512 / avx2 / generic, with the matching -m flags;
// int8_ffi.cc picks one at run time). It uses GCC/Clang vector extensions rather than intrinsics, so the same
// code becomes vpmovsxbd + vcvtdq2ps + vfmadd on zmm (AVX-512), on ymm (AVX2), or SSE2 elsewhere.
// Only <cstdint> is included and everything but the entry point is file-local: no inline function from a
// shared header can be compiled here with AVX-512 and then picked by the linker for the portable code.
#include <cstdint>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#ifndef FS_ISA
#error "compile with -DFS_ISA=<name> -DFS_LANES=.. -DFS_NV1=.. -DFS_NV2=.. -DFS_NV4=.."
#endif
#define FS_CAT2(a, b) a##b
#define FS_CAT(a, b) FS_CAT2(a, b)
#define FS_ENTRY FS_CAT(fastserve_int8_tile_, FS_ISA)

namespace {

// One vector = FS_LANES floats: 16 (a zmm) for avx512, 8 (a ymm) for avx2, 4 (an xmm) for the portable build.
constexpr int kLanes = FS_LANES;
typedef float vf __attribute__((vector_size(4 * FS_LANES)));
typedef float vf_u __attribute__((vector_size(4 * FS_LANES), aligned(4), may_alias));
typedef int32_t vi __attribute__((vector_size(4 * FS_LANES)));
typedef int8_t vb __attribute__((vector_size(FS_LANES)));
// How far ahead to prefetch the weight stream. At batch 1 a decode step reads every weight once from memory (a
// 135M-parameter model is larger than the cache), and the memory latency needs many lines in flight: the tile walks
// K rows N bytes apart, a stride the hardware prefetcher follows only within a page. `python
// experiments/int8_stream.py` times both forms on 141 MB of distinct weights (edit these constants and rerun it to
// compare): on the AVX-512 host here, one thread, 8 rows ahead streamed 7.2 GB/s, 32 rows 9, 64 rows (running on
// into the next tile) 14-20, 128 rows 11-12; the row-major form (dot_rows) reads contiguous rows 4 KiB ahead (~20).
constexpr int64_t kPrefetchRows = 64;
constexpr int64_t kPrefetchBytes = 4096;

// kLanes int8 weights as floats: sign-extend, convert. Intrinsics on x86 (GCC makes scalar code of the generic
// vector conversion there); the generic vector conversion elsewhere.
#if defined(__AVX512F__)
inline vf load_w(const int8_t* p) {
  return (vf)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
#elif defined(__AVX2__)
inline vf load_w(const int8_t* p) {
  return (vf)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
#else
inline vf load_w(const int8_t* p) {
  vb b;
  __builtin_memcpy(&b, p, sizeof b);
  return __builtin_convertvector(__builtin_convertvector(b, vi), vf);
}
#endif
inline vf load_f(const float* p) { return *reinterpret_cast<const vf_u*>(p); }
inline void store_f(float* p, vf v) { *reinterpret_cast<vf_u*>(p) = v; }

// MB rows × NV·kLanes columns starting at column n: per group an inner sum over its rows of K, then × scale.
template <int MB, int NV>
void block(const float* x, const int8_t* w, const float* s, float* y, int64_t K, int64_t N, int64_t group,
           int64_t n) {
  vf total[MB][NV];
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NV; ++j) total[i][j] = vf{};
  for (int64_t k0 = 0, g = 0; k0 < K; k0 += group, ++g) {
    const int64_t k1 = k0 + group < K ? k0 + group : K;
    vf acc[MB][NV];
    for (int i = 0; i < MB; ++i)
      for (int j = 0; j < NV; ++j) acc[i][j] = vf{};
    for (int64_t k = k0; k < k1; ++k) {
      const int8_t* wr = w + k * N + n;
      // Ahead in this tile's rows, and past the last row into the next tile's first rows, so the stream never
      // restarts cold at a tile boundary.
      const bool in_tile = k + kPrefetchRows < K;
      if (in_tile || (k + kPrefetchRows - K < K && n + 2 * NV * kLanes <= N)) {
        const int8_t* ahead = in_tile ? wr + kPrefetchRows * N : w + (k + kPrefetchRows - K) * N + n + NV * kLanes;
        for (int j = 0; j < NV * kLanes; j += 64) __builtin_prefetch(ahead + j);
      }
      vf wv[NV];
      for (int j = 0; j < NV; ++j) wv[j] = load_w(wr + j * kLanes);
      for (int i = 0; i < MB; ++i) {
        const vf xb = vf{} + x[i * K + k];
        for (int j = 0; j < NV; ++j) acc[i][j] += xb * wv[j];
      }
    }
    const float* sr = s + g * N + n;
    for (int j = 0; j < NV; ++j) {
      const vf sv = load_f(sr + j * kLanes);
      for (int i = 0; i < MB; ++i) total[i][j] += acc[i][j] * sv;
    }
  }
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NV; ++j) store_f(y + i * N + n + j * kLanes, total[i][j]);
}

// The last < kLanes columns, one at a time.
void tail_columns(const float* x, const int8_t* w, const float* s, float* y, int64_t rows, int64_t K, int64_t N,
                  int64_t group, int64_t n0, int64_t n1) {
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t n = n0; n < n1; ++n) {
      float total = 0.f;
      for (int64_t k0 = 0, g = 0; k0 < K; k0 += group, ++g) {
        const int64_t k1 = k0 + group < K ? k0 + group : K;
        float acc = 0.f;
        for (int64_t k = k0; k < k1; ++k) acc += x[i * K + k] * static_cast<float>(w[k * N + n]);
        total += acc * s[g * N + n];
      }
      y[i * N + n] = total;
    }
}

// Rows [0, MB) of x / y over columns [n0, n1): wide tiles, then one-vector tiles, then the scalar tail.
template <int MB, int NV>
void rows(const float* x, const int8_t* w, const float* s, float* y, int64_t K, int64_t N, int64_t group,
          int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + NV * kLanes <= n1; n += NV * kLanes) block<MB, NV>(x, w, s, y, K, N, group, n);
  for (; n + kLanes <= n1; n += kLanes) block<MB, 1>(x, w, s, y, K, N, group, n);
  if (n < n1) tail_columns(x, w, s, y, MB, K, N, group, n, n1);
}

inline float hsum(vf v) {
  float total = 0.f;
  for (int i = 0; i < kLanes; ++i) total += v[i];
  return total;
}

// Outputs [n, n + NB) of rows [0, M): NB rows of W (read once, kept in L1 across the M rows of x) dotted with x.
template <int NB>
void dot_rows(const float* x, const int8_t* w, const float* s, float* y, int64_t M, int64_t K, int64_t N,
              int64_t n) {
  const int64_t kv = K - K % kLanes;
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * K;
    vf acc[NB];
    for (int j = 0; j < NB; ++j) acc[j] = vf{};
    for (int64_t k = 0; k < kv; k += kLanes) {
      // The first row of x streams W from memory (later rows find it in L1): prefetch each row's bytes far ahead;
      // rows are contiguous, so past a row's end this reaches the next block's rows.
      if (m == 0 && k % 64 == 0)
        for (int j = 0; j < NB; ++j)
          if ((n + j) * K + k + kPrefetchBytes < N * K) __builtin_prefetch(w + (n + j) * K + k + kPrefetchBytes);
      const vf xv = load_f(xr + k);
      for (int j = 0; j < NB; ++j) acc[j] += xv * load_w(w + (n + j) * K + k);
    }
    for (int j = 0; j < NB; ++j) {
      float total = hsum(acc[j]);
      for (int64_t k = kv; k < K; ++k) total += xr[k] * static_cast<float>(w[(n + j) * K + k]);
      y[m * N + n + j] = total * s[n + j];
    }
  }
}

}  // namespace

extern "C" void FS_CAT(fastserve_int8_rows_, FS_ISA)(const float* x, const int8_t* w, const float* s, float* y,
                                                     int64_t M, int64_t K, int64_t N, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) dot_rows<4>(x, w, s, y, M, K, N, n);
  for (; n < n1; ++n) dot_rows<1>(x, w, s, y, M, K, N, n);
}

extern "C" void FS_ENTRY(const float* x, const int8_t* w, const float* s, float* y, int64_t M, int64_t K, int64_t N,
                         int64_t group, int64_t n0, int64_t n1) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) rows<4, FS_NV4>(x + m * K, w, s, y + m * N, K, N, group, n0, n1);
  for (; m + 2 <= M; m += 2) rows<2, FS_NV2>(x + m * K, w, s, y + m * N, K, N, group, n0, n1);
  for (; m < M; ++m) rows<1, FS_NV1>(x + m * K, w, s, y + m * N, K, N, group, n0, n1);
}
