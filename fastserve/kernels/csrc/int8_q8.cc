// XLA FFI handlers for W8A8 products on CPU (int8 weights, activations quantized to int8 on the fly):
// `fastserve_int8_matmul_q8`: y[M, N] = Q8(x)[M, K] · (W int8 [K, N] × scale [G, N]);
// `fastserve_int8_matmul_nt_q8`: y[M, N] = Q8(x)[M, K] · (W int8 [N, K] × scale [N])ᵀ (the tied LM head);
// `fastserve_int8_matmul_q8_packed`: the first with W stored as the VNNI loops' panels [N / 64, K, 64] (`pack_vnni`
// in fastserve/kernels/int8.py: column 64p + 16L + 4j + i, row k at panel p, vector 4⌊k/4⌋ + j, byte 16L + 4i + k%4).
//
// Q8: each row of x in blocks of 32, a block scaled by max|x| / 127 and rounded to int8 (llama.cpp's Q8_0), so a
// block's products are exact integer sums, scaled once per block and once per weight group. K (and `group`) must
// be multiples of 32. The integer inner loops run with AVX-512 VNNI (int8_q8_vnni.cc) where the CPU has it, the
// portable loops below elsewhere (same sums; slower than the float kernel: a correct fallback, not a fast path).
#include <cmath>
#include <cstdint>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "int8_common.h"

namespace ffi = xla::ffi;
using fastserve_columns::split_columns;

extern "C" {
int fastserve_isa_level();   // int8_ffi.cc
#if defined(__x86_64__)
void fastserve_int8_q8_tile_vnni(const int8_t*, const float*, const int32_t*, const int8_t*, const float*, float*,
                                 int64_t, int64_t, int64_t, int64_t, int64_t, int64_t);
void fastserve_int8_q8_rows_vnni(const int8_t*, const float*, const int8_t*, const float*, float*, int64_t, int64_t,
                                 int64_t, int64_t, int64_t);
void fastserve_int8_q8_packed_vnni(const int8_t*, const float*, const int32_t*, const int8_t*, const float*, float*,
                                   int64_t, int64_t, int64_t, int64_t, int64_t, int64_t);
void fastserve_q8_quantize_vnni(const float*, int64_t, int64_t, int8_t*, float*, int32_t*);
#endif
}

namespace {

constexpr int64_t kBlock = 32;

// Quantized activations of one call: codes [M, K], per block of 32 the scale and the sum of the codes.
struct Q8 {
  std::vector<int8_t> q;
  std::vector<float> scale;
  std::vector<int32_t> sum;
};

// `vnni`: the AVX-512 twin of the loop below (the same codes; the scalar loop costs as much as a prefill-sized
// product's integer sums).
Q8 quantize(bool vnni, const float* x, int64_t M, int64_t K) {
  const int64_t blocks = K / kBlock;
  Q8 out{std::vector<int8_t>(M * K), std::vector<float>(M * blocks), std::vector<int32_t>(M * blocks)};
#if defined(__x86_64__)
  if (vnni) {
    fastserve_q8_quantize_vnni(x, M, K, out.q.data(), out.scale.data(), out.sum.data());
    return out;
  }
#endif
  for (int64_t b = 0; b < M * blocks; ++b) {
    const float* xb = x + b * kBlock;
    float amax = 0.f;
    for (int64_t k = 0; k < kBlock; ++k) amax = std::fmax(amax, std::fabs(xb[k]));
    const float d = amax / 127.f, inv = d > 0.f ? 1.f / d : 0.f;
    int32_t total = 0;
    for (int64_t k = 0; k < kBlock; ++k) {
      const float r = std::rint(xb[k] * inv);
      const int8_t c = static_cast<int8_t>(r > 127.f ? 127.f : (r < -127.f ? -127.f : r));
      out.q[b * kBlock + k] = c;
      total += c;
    }
    out.scale[b] = d;
    out.sum[b] = total;
  }
  return out;
}

// The portable loops: per row and weight group, per block an int32 sum per column, then × block scale, × weight
// scale. Columns [n0, n1) of W [K, N].
void tile_portable(const Q8& a, const int8_t* w, const float* s, float* y, int64_t M, int64_t K, int64_t N,
                   int64_t group, int64_t n0, int64_t n1) {
  const int64_t blocks = K / kBlock, width = n1 - n0;
  std::vector<int32_t> acc(width);
  std::vector<float> f(width);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = n0; n < n1; ++n) y[m * N + n] = 0.f;
    for (int64_t k0 = 0, g = 0; k0 < K; k0 += group, ++g) {
      const int64_t k1 = k0 + group < K ? k0 + group : K;
      for (int64_t j = 0; j < width; ++j) f[j] = 0.f;
      for (int64_t kb = k0; kb < k1; kb += kBlock) {
        for (int64_t j = 0; j < width; ++j) acc[j] = 0;
        for (int64_t k = kb; k < kb + kBlock; ++k) {
          const int32_t c = a.q[m * K + k];
          const int8_t* wr = w + k * N + n0;
          for (int64_t j = 0; j < width; ++j) acc[j] += c * wr[j];
        }
        const float d = a.scale[m * blocks + kb / kBlock];
        for (int64_t j = 0; j < width; ++j) f[j] += d * static_cast<float>(acc[j]);
      }
      for (int64_t j = 0; j < width; ++j) y[m * N + n0 + j] += s[g * N + n0 + j] * f[j];
    }
  }
}

// Where weight (k, n) of a packed [N / 64, K, 64] matrix lies (the layout above).
inline int64_t packed_offset(int64_t K, int64_t k, int64_t n) {
  const int64_t c = n % 64;
  return ((n / 64) * K + 4 * (k / 4) + (c % 16) / 4) * 64 + 16 * (c / 16) + 4 * (c % 4) + k % 4;
}

// tile_portable over a packed W: columns [n0, n1) unpacked into a [K, N] scratch first (a correct fallback).
void packed_portable(const Q8& a, const int8_t* w, const float* s, float* y, int64_t M, int64_t K, int64_t N,
                     int64_t group, int64_t n0, int64_t n1) {
  std::vector<int8_t> plain(K * N);
  for (int64_t k = 0; k < K; ++k)
    for (int64_t n = n0; n < n1; ++n) plain[k * N + n] = w[packed_offset(K, k, n)];
  tile_portable(a, plain.data(), s, y, M, K, N, group, n0, n1);
}

// Rows [n0, n1) of W [N, K] (one scale per row of W).
void rows_portable(const Q8& a, const int8_t* w, const float* s, float* y, int64_t M, int64_t K, int64_t N,
                   int64_t n0, int64_t n1) {
  const int64_t blocks = K / kBlock;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = n0; n < n1; ++n) {
      float total = 0.f;
      for (int64_t b = 0; b < blocks; ++b) {
        int32_t acc = 0;
        for (int64_t k = b * kBlock; k < (b + 1) * kBlock; ++k) acc += int32_t(a.q[m * K + k]) * w[n * K + k];
        total += a.scale[m * blocks + b] * static_cast<float>(acc);
      }
      y[m * N + n] = total * s[n];
    }
}

// Decided at every product (a getenv and a cpuid-cache read), so a test can narrow FASTSERVE_INT8_ISA in-process
// and check the portable loops against the VNNI ones.
bool use_vnni() {
#if defined(__x86_64__)
  return fastserve_isa_level() == 2 && __builtin_cpu_supports("avx512vnni");
#else
  return false;
#endif
}

// Columns [n0, n1) of y with the VNNI loops (`vnni`: use_vnni(), decided once per call) or the portable ones.
void tile(bool vnni, const Q8& a, const int8_t* w, const float* s, float* y, int64_t M, int64_t K, int64_t N,
          int64_t group, int64_t n0, int64_t n1) {
#if defined(__x86_64__)
  if (vnni)
    return fastserve_int8_q8_tile_vnni(a.q.data(), a.scale.data(), a.sum.data(), w, s, y, M, K, N, group, n0, n1);
#endif
  tile_portable(a, w, s, y, M, K, N, group, n0, n1);
}

void rows(bool vnni, const Q8& a, const int8_t* w, const float* s, float* y, int64_t M, int64_t K, int64_t N,
          int64_t n0, int64_t n1) {
#if defined(__x86_64__)
  if (vnni) return fastserve_int8_q8_rows_vnni(a.q.data(), a.scale.data(), w, s, y, M, K, N, n0, n1);
#endif
  rows_portable(a, w, s, y, M, K, N, n0, n1);
}

void packed(bool vnni, const Q8& a, const int8_t* w, const float* s, float* y, int64_t M, int64_t K, int64_t N,
            int64_t group, int64_t n0, int64_t n1) {
#if defined(__x86_64__)
  if (vnni)
    return fastserve_int8_q8_packed_vnni(a.q.data(), a.scale.data(), a.sum.data(), w, s, y, M, K, N, group, n0, n1);
#endif
  packed_portable(a, w, s, y, M, K, N, group, n0, n1);
}

// x [M, K] quantized once, then columns(a, n0, n1) over [0, N) split as the float kernels' are.
template <typename Columns>
ffi::Error quantize_and_split(ffi::ThreadPool& pool, int64_t threads, bool vnni, const float* x, int64_t M,
                              int64_t K, int64_t N, const Columns& columns) {
  if (M == 0 || N == 0) return ffi::Error::Success();
  const Q8 a = quantize(vnni, x, M, K);
  const Q8* ap = &a;
  split_columns(pool, threads, M * K * N, N, [=](int64_t n0, int64_t n1) { columns(*ap, n0, n1); });
  return ffi::Error::Success();
}

ffi::Error Int8MatmulQ8(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> w,
                        ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> y, int64_t group, int64_t threads) {
  const auto wd = w.dimensions(), sd = scale.dimensions(), xd = x.dimensions();
  if (wd.size() != 2 || sd.size() != 2 || xd.size() < 1)
    return ffi::Error::InvalidArgument("fastserve_int8_matmul_q8: expected x [..., K], w [K, N], scale [G, N]");
  const int64_t K = wd[0], N = wd[1];
  if (xd.back() != K || K == 0 || K % kBlock || group <= 0 || group % kBlock || sd[1] != N ||
      sd[0] != (K + group - 1) / group)
    return ffi::Error::InvalidArgument("fastserve_int8_matmul_q8: shapes of x, w, scale and group do not agree "
                                       "(K and group must be positive multiples of 32)");
  const int64_t M = static_cast<int64_t>(x.element_count()) / K;
  if (static_cast<int64_t>(y->element_count()) != M * N)
    return ffi::Error::InvalidArgument("fastserve_int8_matmul_q8: result is not [M, N]");
  const int8_t* wp = w.typed_data();
  const float* sp = scale.typed_data();
  float* yp = y->typed_data();
  const bool vnni = use_vnni();
  return quantize_and_split(pool, threads, vnni, x.typed_data(), M, K, N, [=](const Q8& a, int64_t n0, int64_t n1) {
    tile(vnni, a, wp, sp, yp, M, K, N, group, n0, n1);
  });
}

ffi::Error Int8MatmulQ8Packed(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> w,
                              ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> y, int64_t group,
                              int64_t threads) {
  const auto wd = w.dimensions(), sd = scale.dimensions(), xd = x.dimensions();
  if (wd.size() != 3 || wd[2] != 64 || sd.size() != 2 || xd.size() < 1)
    return ffi::Error::InvalidArgument("fastserve_int8_matmul_q8_packed: expected x [..., K], w [N / 64, K, 64], "
                                       "scale [G, N]");
  const int64_t K = wd[1], N = wd[0] * 64;
  if (xd.back() != K || K == 0 || K % kBlock || group <= 0 || group % kBlock || sd[1] != N ||
      sd[0] != (K + group - 1) / group)
    return ffi::Error::InvalidArgument("fastserve_int8_matmul_q8_packed: shapes of x, w, scale and group do not "
                                       "agree (K and group must be positive multiples of 32)");
  const int64_t M = static_cast<int64_t>(x.element_count()) / K;
  if (static_cast<int64_t>(y->element_count()) != M * N)
    return ffi::Error::InvalidArgument("fastserve_int8_matmul_q8_packed: result is not [M, N]");
  const int8_t* wp = w.typed_data();
  const float* sp = scale.typed_data();
  float* yp = y->typed_data();
  const bool vnni = use_vnni();
  // split_columns' pieces are multiples of 128 columns (or end at N, a multiple of 64): whole panels
  return quantize_and_split(pool, threads, vnni, x.typed_data(), M, K, N, [=](const Q8& a, int64_t n0, int64_t n1) {
    packed(vnni, a, wp, sp, yp, M, K, N, group, n0, n1);
  });
}

ffi::Error Int8MatmulNTQ8(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> w,
                          ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> y, int64_t threads) {
  const auto wd = w.dimensions(), sd = scale.dimensions(), xd = x.dimensions();
  if (wd.size() != 2 || sd.size() != 1 || xd.size() < 1)
    return ffi::Error::InvalidArgument("fastserve_int8_matmul_nt_q8: expected x [..., K], w [N, K], scale [N]");
  const int64_t N = wd[0], K = wd[1];
  if (xd.back() != K || K == 0 || K % kBlock || sd[0] != N)
    return ffi::Error::InvalidArgument("fastserve_int8_matmul_nt_q8: shapes of x, w and scale do not agree "
                                       "(K must be a positive multiple of 32)");
  const int64_t M = static_cast<int64_t>(x.element_count()) / K;
  if (static_cast<int64_t>(y->element_count()) != M * N)
    return ffi::Error::InvalidArgument("fastserve_int8_matmul_nt_q8: result is not [M, N]");
  const int8_t* wp = w.typed_data();
  const float* sp = scale.typed_data();
  float* yp = y->typed_data();
  const bool vnni = use_vnni();
  return quantize_and_split(pool, threads, vnni, x.typed_data(), M, K, N, [=](const Q8& a, int64_t n0, int64_t n1) {
    rows(vnni, a, wp, sp, yp, M, K, N, n0, n1);
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(fastserve_int8_matmul_q8, Int8MatmulQ8, fastserve_columns::tile_binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(fastserve_int8_matmul_q8_packed, Int8MatmulQ8Packed, fastserve_columns::tile_binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(fastserve_int8_matmul_nt_q8, Int8MatmulNTQ8, fastserve_columns::rows_binding());

extern "C" int fastserve_int8_q8_vnni() { return use_vnni() ? 1 : 0; }
