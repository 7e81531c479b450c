// XLA FFI handlers on CPU: `fastserve_int8_matmul`: y[M, N] = x[M, K] · dequantize(W int8 [K, N], scale [G, N]);
// `fastserve_int8_matmul_nt`: y[M, N] = x[M, K] · dequantize(W int8 [N, K], scale [N])ᵀ (the tied LM head).
//
// Picks the widest tile code this CPU runs (AVX-512BW, AVX2+FMA, or portable) once, and splits the columns over
// XLA's intra-op thread pool when the product is large enough to pay for it.
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "xla/ffi/api/ffi.h"
#include "int8_common.h"

namespace ffi = xla::ffi;
using fastserve_columns::split_columns;

extern "C" {
typedef void (*TileFn)(const float*, const int8_t*, const float*, float*, int64_t, int64_t, int64_t, int64_t,
                       int64_t, int64_t);
typedef void (*RowsFn)(const float*, const int8_t*, const float*, float*, int64_t, int64_t, int64_t, int64_t,
                       int64_t);
void fastserve_int8_rows_generic(const float*, const int8_t*, const float*, float*, int64_t, int64_t, int64_t,
                                 int64_t, int64_t);
void fastserve_int8_tile_generic(const float*, const int8_t*, const float*, float*, int64_t, int64_t, int64_t,
                                 int64_t, int64_t, int64_t);
#if defined(__x86_64__)
void fastserve_int8_tile_avx512(const float*, const int8_t*, const float*, float*, int64_t, int64_t, int64_t,
                                int64_t, int64_t, int64_t);
void fastserve_int8_tile_avx2(const float*, const int8_t*, const float*, float*, int64_t, int64_t, int64_t,
                              int64_t, int64_t, int64_t);
void fastserve_int8_rows_avx512(const float*, const int8_t*, const float*, float*, int64_t, int64_t, int64_t,
                                int64_t, int64_t);
void fastserve_int8_rows_avx2(const float*, const int8_t*, const float*, float*, int64_t, int64_t, int64_t,
                              int64_t, int64_t);
#endif
}

// The instruction-set variant every kernel of the library runs (2 = AVX-512, 1 = AVX2, 0 = generic): the widest this
// CPU supports, narrowed by FASTSERVE_INT8_ISA=avx2|generic. Shared with attention_ffi.cc.
extern "C" int fastserve_isa_level() {
  const char* want = std::getenv("FASTSERVE_INT8_ISA");
  const bool any = !want || !*want;
#if defined(__x86_64__)
  __builtin_cpu_init();
  if ((any || !std::strcmp(want, "avx512")) && __builtin_cpu_supports("avx512f") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl"))
    return 2;
  if ((any || !std::strcmp(want, "avx512") || !std::strcmp(want, "avx2")) && __builtin_cpu_supports("avx2") &&
      __builtin_cpu_supports("fma"))
    return 1;
#endif
  return 0;
}

namespace {

struct Isa {
  TileFn fn;
  RowsFn rows;
  const char* name;
};

// The widest tile code this CPU runs; FASTSERVE_INT8_ISA=avx2|generic asks for a narrower one (tests use it to
// check every variant on one machine).
Isa pick_isa() {
  switch (fastserve_isa_level()) {
#if defined(__x86_64__)
    case 2: return {fastserve_int8_tile_avx512, fastserve_int8_rows_avx512, "avx512"};
    case 1: return {fastserve_int8_tile_avx2, fastserve_int8_rows_avx2, "avx2"};
#endif
    default: return {fastserve_int8_tile_generic, fastserve_int8_rows_generic, "generic"};
  }
}

const Isa& isa() {
  static const Isa chosen = pick_isa();
  return chosen;
}

ffi::Error Int8Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> w,
                      ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> y, int64_t group, int64_t threads) {
  const auto wd = w.dimensions(), sd = scale.dimensions(), xd = x.dimensions();
  if (wd.size() != 2 || sd.size() != 2 || xd.size() < 1)
    return ffi::Error::InvalidArgument("fastserve_int8_matmul: expected x [..., K], w [K, N], scale [G, N]");
  const int64_t K = wd[0], N = wd[1];
  if (xd.back() != K || group <= 0 || sd[1] != N || sd[0] != (K + group - 1) / group)
    return ffi::Error::InvalidArgument("fastserve_int8_matmul: shapes of x, w, scale and group do not agree");
  const int64_t M = K ? static_cast<int64_t>(x.element_count()) / K : 0;
  if (static_cast<int64_t>(y->element_count()) != M * N)
    return ffi::Error::InvalidArgument("fastserve_int8_matmul: result is not [M, N]");
  const float* xp = x.typed_data();
  const int8_t* wp = w.typed_data();
  const float* sp = scale.typed_data();
  float* yp = y->typed_data();
  if (M == 0 || N == 0) return ffi::Error::Success();
  if (K == 0) {
    for (int64_t i = 0; i < M * N; ++i) yp[i] = 0.f;
    return ffi::Error::Success();
  }
  const TileFn fn = isa().fn;
  split_columns(pool, threads, M * K * N, N,
                [=](int64_t n0, int64_t n1) { fn(xp, wp, sp, yp, M, K, N, group, n0, n1); });
  return ffi::Error::Success();
}

ffi::Error Int8MatmulNT(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> w,
                        ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> y, int64_t threads) {
  const auto wd = w.dimensions(), sd = scale.dimensions(), xd = x.dimensions();
  if (wd.size() != 2 || sd.size() != 1 || xd.size() < 1)
    return ffi::Error::InvalidArgument("fastserve_int8_matmul_nt: expected x [..., K], w [N, K], scale [N]");
  const int64_t N = wd[0], K = wd[1];
  if (xd.back() != K || sd[0] != N)
    return ffi::Error::InvalidArgument("fastserve_int8_matmul_nt: shapes of x, w and scale do not agree");
  const int64_t M = K ? static_cast<int64_t>(x.element_count()) / K : 0;
  if (static_cast<int64_t>(y->element_count()) != M * N)
    return ffi::Error::InvalidArgument("fastserve_int8_matmul_nt: result is not [M, N]");
  const float* xp = x.typed_data();
  const int8_t* wp = w.typed_data();
  const float* sp = scale.typed_data();
  float* yp = y->typed_data();
  if (M == 0 || N == 0) return ffi::Error::Success();
  const RowsFn fn = isa().rows;
  split_columns(pool, threads, M * K * N, N, [=](int64_t n0, int64_t n1) { fn(xp, wp, sp, yp, M, K, N, n0, n1); });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(fastserve_int8_matmul, Int8Matmul, fastserve_columns::tile_binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(fastserve_int8_matmul_nt, Int8MatmulNT, fastserve_columns::rows_binding());

extern "C" const char* fastserve_int8_isa() { return isa().name; }
