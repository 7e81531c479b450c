// W8A8 products with AVX-512 VNNI: int8 weights times activations quantized to int8 in blocks of 32 (as llama.cpp's
// Q8_0 dot product), so each vpdpbusd does 64 multiply-adds of bytes where the float kernel (int8_tile.cc) spends a
// sign-extension, a conversion and an FMA on every 16 weights. The inputs come from int8_q8.cc's quantizer:
// q [M, K] int8 codes, xs [M, K/32] block scales, qsum [M, K/32] code sums (K a multiple of 32).
//
// vpdpbusd multiplies unsigned bytes by signed ones, so the weights enter as w + 128 (an xor of the sign bit) and
// each block's integer sum starts at −128·Σq, which makes it exactly Σ q·w. Per block: float += xs · that sum; per
// weight group (of `group` rows of K, a multiple of 32; K for per-channel scales): y += scale · float.
//
// Compiled once, with -mavx512f -mavx512bw -mavx512vnni, and called only where the CPU reports avx512_vnni.
#include <cstdint>
#include <cstring>
#include <immintrin.h>
#include <vector>

namespace {

constexpr int64_t kBlock = 32;           // activations per scale
constexpr int64_t kPrefetchRows = 64;    // as int8_tile.cc: the [K, N] walk strides N bytes per row of K
constexpr int64_t kPrefetchBytes = 4096; // the [N, K] walk reads contiguous rows
constexpr int64_t kPackRows = 8;        // from this many rows a product packs its weight panels (Packed, below)

inline __m512i flip_sign(__m512i v) { return _mm512_xor_si512(v, _mm512_set1_epi8(static_cast<char>(0x80))); }

// Rows k..k+3 of W × 64 columns as four vectors of unsigned byte quads (w + 128): v[j], 128-bit lane L, dword i
// holds column 16L + 4j + i's four rows — the layout vpdpbusd reads; `unpermute` puts the sums back in order.
inline void weight_quads(const int8_t* w, int64_t N, __m512i v[4]) {
  const __m512i r0 = flip_sign(_mm512_loadu_si512(w)), r1 = flip_sign(_mm512_loadu_si512(w + N));
  const __m512i r2 = flip_sign(_mm512_loadu_si512(w + 2 * N)), r3 = flip_sign(_mm512_loadu_si512(w + 3 * N));
  const __m512i lo01 = _mm512_unpacklo_epi8(r0, r1), hi01 = _mm512_unpackhi_epi8(r0, r1);
  const __m512i lo23 = _mm512_unpacklo_epi8(r2, r3), hi23 = _mm512_unpackhi_epi8(r2, r3);
  v[0] = _mm512_unpacklo_epi16(lo01, lo23);
  v[1] = _mm512_unpackhi_epi16(lo01, lo23);
  v[2] = _mm512_unpacklo_epi16(hi01, hi23);
  v[3] = _mm512_unpackhi_epi16(hi01, hi23);
}

// The four sums of `weight_quads`' layout back in column order: out[L] = columns 16L .. 16L + 15 (a 4 × 4 transpose
// of 128-bit lanes).
inline void unpermute(const __m512 a[4], __m512 out[4]) {
  const __m512 t0 = _mm512_shuffle_f32x4(a[0], a[1], 0x44), t1 = _mm512_shuffle_f32x4(a[0], a[1], 0xEE);
  const __m512 t2 = _mm512_shuffle_f32x4(a[2], a[3], 0x44), t3 = _mm512_shuffle_f32x4(a[2], a[3], 0xEE);
  out[0] = _mm512_shuffle_f32x4(t0, t2, 0x88);
  out[1] = _mm512_shuffle_f32x4(t0, t2, 0xDD);
  out[2] = _mm512_shuffle_f32x4(t1, t3, 0x88);
  out[3] = _mm512_shuffle_f32x4(t1, t3, 0xDD);
}

inline int32_t load_quad(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// Where a tile's weight quads come from. Direct: rearranged from W [K, N] at every use (decoding: each weight
// serves a few rows, and W streams from memory once). Packed: one 64-column panel rearranged once per product into
// `panel` (K/4 × 4 vectors, in L2) and read by every group of rows (prefill: the rearranging, 16 instructions per
// 4 × 64 weights, would otherwise be repeated for each group of rows).
struct Direct {
  const int8_t* w;
  int64_t K, N;
  void quads(int64_t k, int64_t col, __m512i v[4]) const { weight_quads(w + k * N + col, N, v); }
  void prefetch(int64_t k, int64_t col) const {
    if (k + kPrefetchRows + 3 < K)
      for (int r = 0; r < 4; ++r)
        _mm_prefetch(reinterpret_cast<const char*>(w + (k + kPrefetchRows + r) * N + col), _MM_HINT_T0);
  }
};

struct Packed {
  const __m512i* panel;
  void quads(int64_t k, int64_t, __m512i v[4]) const {
    for (int j = 0; j < 4; ++j) v[j] = _mm512_load_si512(panel + k + j);   // k / 4 quads of 4 vectors
  }
  void prefetch(int64_t, int64_t) const {}
};

void pack_panel(const int8_t* w, int64_t K, int64_t N, int64_t n, __m512i* panel) {
  for (int64_t k = 0; k < K; k += 4) weight_quads(w + k * N + n, N, panel + k);
}

// Rows [0, MB) × columns [n, n + 64·NQ) of y = q · W (W row-major [K, N], its quads from `src`).
template <int MB, int NQ, typename Source>
void tile(const int8_t* q, const float* xs, const int32_t* qsum, const Source& src, const float* s, float* y,
          int64_t K, int64_t N, int64_t group, int64_t n) {
  const int64_t blocks = K / kBlock;
  for (int64_t k0 = 0, g = 0; k0 < K; k0 += group, ++g) {
    const int64_t k1 = k0 + group < K ? k0 + group : K;
    // The block sums' float totals live in memory (L1), touched once per block: with the int32 sums of 4 rows in
    // registers there is no room for them (keeping both made the 4-row tile spill inside its inner loop).
    alignas(64) float f[MB][4 * NQ][16] = {};
    for (int64_t kb = k0; kb < k1; kb += kBlock) {
      const int64_t b = kb / kBlock;
      __m512i acc[MB][4 * NQ];
      for (int i = 0; i < MB; ++i) {
        const __m512i start = _mm512_set1_epi32(-128 * qsum[i * blocks + b]);
        for (int j = 0; j < 4 * NQ; ++j) acc[i][j] = start;
      }
      for (int64_t k = kb; k < kb + kBlock; k += 4) {
        for (int c = 0; c < NQ; ++c) src.prefetch(k, n + 64 * c);
        for (int c = 0; c < NQ; ++c) {
          __m512i v[4];
          src.quads(k, n + 64 * c, v);
          for (int i = 0; i < MB; ++i) {
            const __m512i xq = _mm512_set1_epi32(load_quad(q + i * K + k));
            for (int j = 0; j < 4; ++j) acc[i][4 * c + j] = _mm512_dpbusd_epi32(acc[i][4 * c + j], v[j], xq);
          }
        }
      }
      for (int i = 0; i < MB; ++i) {
        const __m512 scale = _mm512_set1_ps(xs[i * blocks + b]);
        for (int j = 0; j < 4 * NQ; ++j)
          _mm512_store_ps(f[i][j], _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[i][j]), scale, _mm512_load_ps(f[i][j])));
      }
    }
    const float* sr = s + g * N + n;
    for (int i = 0; i < MB; ++i)
      for (int c = 0; c < NQ; ++c) {
        const __m512 sums[4] = {_mm512_load_ps(f[i][4 * c]), _mm512_load_ps(f[i][4 * c + 1]),
                                _mm512_load_ps(f[i][4 * c + 2]), _mm512_load_ps(f[i][4 * c + 3])};
        __m512 out[4];
        unpermute(sums, out);
        for (int L = 0; L < 4; ++L) {
          float* yp = y + i * N + n + 64 * c + 16 * L;
          const __m512 v = _mm512_mul_ps(out[L], _mm512_loadu_ps(sr + 64 * c + 16 * L));
          _mm512_storeu_ps(yp, g == 0 ? v : _mm512_add_ps(_mm512_loadu_ps(yp), v));
        }
      }
  }
}

// The last < 64 columns, one at a time, with the same integer sums.
void tail_columns(const int8_t* q, const float* xs, const int8_t* w, const float* s, float* y, int64_t rows,
                  int64_t K, int64_t N, int64_t group, int64_t n0, int64_t n1) {
  const int64_t blocks = K / kBlock;
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t n = n0; n < n1; ++n) {
      float total = 0.f;
      for (int64_t k0 = 0, g = 0; k0 < K; k0 += group, ++g) {
        const int64_t k1 = k0 + group < K ? k0 + group : K;
        float f = 0.f;
        for (int64_t kb = k0; kb < k1; kb += kBlock) {
          int32_t acc = 0;
          for (int64_t k = kb; k < kb + kBlock; ++k) acc += int32_t(q[i * K + k]) * int32_t(w[k * N + n]);
          f += xs[i * blocks + kb / kBlock] * static_cast<float>(acc);
        }
        total += s[g * N + n] * f;
      }
      y[i * N + n] = total;
    }
}

template <int MB, int NQ>
void rows(const int8_t* q, const float* xs, const int32_t* qsum, const int8_t* w, const float* s, float* y,
          int64_t K, int64_t N, int64_t group, int64_t n0, int64_t n1) {
  const Direct src{w, K, N};
  int64_t n = n0;
  for (; n + 64 * NQ <= n1; n += 64 * NQ) tile<MB, NQ>(q, xs, qsum, src, s, y, K, N, group, n);
  for (; n + 64 <= n1; n += 64) tile<MB, 1>(q, xs, qsum, src, s, y, K, N, group, n);
  if (n < n1) tail_columns(q, xs, w, s, y, MB, K, N, group, n, n1);
}

// A weight matrix stored already in Packed's panel layout (`pack_vnni` in fastserve/kernels/int8.py; the serving
// engine repacks W8A8 layers at start-up): panel p = columns 64p .. 64p + 63, K vectors of 64 bytes, contiguous.
// Decoding then streams each panel once, in order, with no rearranging: on Zen 4 one core read SmolLM2's
// 576 × 1536 matrices at ~2× the Direct tiles' rate from 1 to 8 rows (experiments/int8_stream.py --packed).
struct Prepacked {
  const __m512i* panel;
  void quads(int64_t k, int64_t, __m512i v[4]) const {
    // the codes as stored (int8, readable by XLA's path too), made unsigned here as weight_quads makes them
    for (int j = 0; j < 4; ++j) v[j] = flip_sign(_mm512_loadu_si512(panel + k + j));   // XLA's buffers: 16-aligned
  }
  void prefetch(int64_t, int64_t) const {}   // one contiguous stream: the hardware prefetcher follows it
};

// Every row of q over the 64 columns from n whose weights `src` holds, 4 rows per tile (then 2 / 1): the panel
// (K · 64 bytes) stays in L2 between groups of rows.
template <typename Source>
void panel_rows(const Source& src, const int8_t* q, const float* xs, const int32_t* qsum, const float* s, float* y,
                int64_t M, int64_t K, int64_t N, int64_t group, int64_t n) {
  const int64_t blocks = K / kBlock;
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) tile<4, 1>(q + m * K, xs + m * blocks, qsum + m * blocks, src, s, y + m * N, K, N, group, n);
  for (; m + 2 <= M; m += 2) tile<2, 1>(q + m * K, xs + m * blocks, qsum + m * blocks, src, s, y + m * N, K, N, group, n);
  for (; m < M; ++m) tile<1, 1>(q + m * K, xs + m * blocks, qsum + m * blocks, src, s, y + m * N, K, N, group, n);
}

// Every row of q over columns [n0, n1), a packed panel of 64 columns at a time, 4 rows per tile (then 2 / 1).
// Measured single-threaded on Zen 4 (experiments/int8_stream.py --gemm): from 32 rows in cache ~1.2× the direct
// tiles (576×1536, 64 rows: 280 vs 235 GOPS); at 8-16 rows no better, and streamed from memory slower (the panel
// is one more pass); 6-row tiles were slower than 4 (157 GOPS: the accumulators no longer fit the registers).
void packed_rows(const int8_t* q, const float* xs, const int32_t* qsum, const int8_t* w, const float* s, float* y,
                 int64_t M, int64_t K, int64_t N, int64_t group, int64_t n0, int64_t n1) {
  thread_local std::vector<__m512i> panel;
  if (static_cast<int64_t>(panel.size()) < K) panel.resize(K);
  int64_t n = n0;
  for (; n + 64 <= n1; n += 64) {
    pack_panel(w, K, N, n, panel.data());
    panel_rows(Packed{panel.data()}, q, xs, qsum, s, y, M, K, N, group, n);
  }
  if (n < n1) tail_columns(q, xs, w, s, y, M, K, N, group, n, n1);
}

// Outputs [n, n + NB) of rows [0, M) for W row-major [N, K] (a tied LM head): each output one contiguous row of
// W, 64 bytes (two blocks) per vpdpbusd. Lanes 0-7 of a chunk's sum belong to its first block, 8-15 to its second.
template <int NB>
void dot_rows(const int8_t* q, const float* xs, const int8_t* w, const float* s, float* y, int64_t M, int64_t K,
              int64_t N, int64_t n) {
  const int64_t blocks = K / kBlock, chunks = (K + 63) / 64;
  const __m512i offset = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int64_t m = 0; m < M; ++m) {
    const int8_t* qr = q + m * K;
    __m512 f[NB];
    for (int j = 0; j < NB; ++j) f[j] = _mm512_setzero_ps();
    for (int64_t c = 0; c < chunks; ++c) {
      const bool half = 64 * c + 32 >= K;   // K = 32 mod 64: the last chunk is one block
      const __mmask64 mask = half ? 0xFFFFFFFFull : ~0ull;
      const __m512i xq = _mm512_maskz_loadu_epi8(mask, qr + 64 * c);
      // −128 · Σq per lane: the start that makes each lane's sum Σ q·w exactly
      const __m512i start = _mm512_sub_epi32(_mm512_setzero_si512(),
                                             _mm512_dpbusd_epi32(_mm512_setzero_si512(), offset, xq));
      const __m512 scale = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(xs[m * blocks + 2 * c]),
                                                _mm512_set1_ps(half ? 0.f : xs[m * blocks + 2 * c + 1]));
      for (int j = 0; j < NB; ++j) {
        const int8_t* wr = w + (n + j) * K + 64 * c;
        if (m == 0 && (n + j) * K + 64 * c + kPrefetchBytes < N * K)
          _mm_prefetch(reinterpret_cast<const char*>(wr + kPrefetchBytes), _MM_HINT_T0);
        const __m512i wv = _mm512_xor_si512(_mm512_maskz_loadu_epi8(mask, wr), offset);
        f[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(start, wv, xq)), scale, f[j]);
      }
    }
    for (int j = 0; j < NB; ++j) y[m * N + n + j] = _mm512_reduce_add_ps(f[j]) * s[n + j];
  }
}

}  // namespace

// y[M, n0:n1] for W [K, N] with scales [G, N] (group rows of K per scale; K and group multiples of 32).
extern "C" void fastserve_int8_q8_tile_vnni(const int8_t* q, const float* xs, const int32_t* qsum, const int8_t* w,
                                            const float* s, float* y, int64_t M, int64_t K, int64_t N, int64_t group,
                                            int64_t n0, int64_t n1) {
  if (M >= kPackRows) return packed_rows(q, xs, qsum, w, s, y, M, K, N, group, n0, n1);
  const int64_t blocks = K / kBlock;
  int64_t m = 0;
  for (; m + 4 <= M; m += 4)
    rows<4, 1>(q + m * K, xs + m * blocks, qsum + m * blocks, w, s, y + m * N, K, N, group, n0, n1);
  for (; m + 2 <= M; m += 2)
    rows<2, 1>(q + m * K, xs + m * blocks, qsum + m * blocks, w, s, y + m * N, K, N, group, n0, n1);
  for (; m < M; ++m) rows<1, 2>(q + m * K, xs + m * blocks, qsum + m * blocks, w, s, y + m * N, K, N, group, n0, n1);
}

// y[M, n0:n1] for W prepacked (`Prepacked`: N / 64 panels of K × 64 bytes) with scales [G, N]; n0 and n1 multiples
// of 64.
extern "C" void fastserve_int8_q8_packed_vnni(const int8_t* q, const float* xs, const int32_t* qsum, const int8_t* w,
                                              const float* s, float* y, int64_t M, int64_t K, int64_t N,
                                              int64_t group, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; n += 64)
    panel_rows(Prepacked{reinterpret_cast<const __m512i*>(w) + (n / 64) * K}, q, xs, qsum, s, y, M, K, N, group, n);
}

// y[M, n0:n1] for W [N, K] with one scale per row of W (K a multiple of 32).
extern "C" void fastserve_int8_q8_rows_vnni(const int8_t* q, const float* xs, const int8_t* w, const float* s,
                                            float* y, int64_t M, int64_t K, int64_t N, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) dot_rows<4>(q, xs, w, s, y, M, K, N, n);
  for (; n < n1; ++n) dot_rows<1>(q, xs, w, s, y, M, K, N, n);
}

// int8_q8.cc's quantizer with AVX-512 (the same arithmetic: max |x| / 127 per block of 32, x · (1 / d) rounded to
// nearest even, clamped to ±127): x [M, K] → codes q, block scales, block code sums.
extern "C" void fastserve_q8_quantize_vnni(const float* x, int64_t M, int64_t K, int8_t* q, float* scale,
                                           int32_t* sum) {
  const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
  for (int64_t b = 0; b < M * (K / kBlock); ++b) {
    const float* xb = x + b * kBlock;
    const __m512 a = _mm512_loadu_ps(xb), c = _mm512_loadu_ps(xb + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(c)));
    const float d = amax / 127.f, inv = d > 0.f ? 1.f / d : 0.f;
    const __m512 vinv = _mm512_set1_ps(inv);
    const __m512i ia = _mm512_min_epi32(hi, _mm512_max_epi32(lo, _mm512_cvtps_epi32(_mm512_mul_ps(a, vinv))));
    const __m512i ic = _mm512_min_epi32(hi, _mm512_max_epi32(lo, _mm512_cvtps_epi32(_mm512_mul_ps(c, vinv))));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + b * kBlock), _mm512_cvtepi32_epi8(ia));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + b * kBlock + 16), _mm512_cvtepi32_epi8(ic));
    scale[b] = d;
    sum[b] = _mm512_reduce_add_epi32(_mm512_add_epi32(ia, ic));
  }
}
