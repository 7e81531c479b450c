// XLA FFI handlers on CPU: `fastserve_int8_matmul`: y[M, N] = x[M, K] · dequantize(W int8 [K, N], scale [G, N]);
// `fastserve_int8_matmul_nt`: y[M, N] = x[M, K] · dequantize(W int8 [N, K], scale [N])ᵀ (the tied LM head).
//
// Picks the widest tile code this CPU runs (AVX-512BW, AVX2+FMA, or portable) once, and splits the columns over
// XLA's intra-op thread pool when the product is large enough to pay for it.
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

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

// Columns per work item: a multiple of every tile width (128 = 8 vectors of 16).
constexpr int64_t kChunk = 128;
// Below this many multiply-adds the product stays on the calling thread. Measured on SmolLM2's shapes (2 loaded
// cores): at batch 1 (≤ 0.9 M multiply-adds) handing half the columns to the pool was slower than one thread
// (576×1536: 248 vs 189 µs); at batch 16 (14 M) it was as fast or faster.
constexpr int64_t kParallelMacs = 1 << 22;

// Work shared by the calling thread and the helpers it schedules: each claims chunks until none are left, and the
// caller returns once every claimed chunk is finished. A helper that starts late (the pool busy) finds nothing
// left and returns, so the caller never waits on a task that has not started: no deadlock on a full pool.
struct Shared {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

template <typename Columns>
void run_chunks(Shared& sh, int64_t chunks, int64_t N, const Columns& columns) {
  for (int64_t c; (c = sh.next.fetch_add(1)) < chunks;) {
    const int64_t n0 = c * kChunk, n1 = n0 + kChunk < N ? n0 + kChunk : N;
    columns(n0, n1);
    sh.done.fetch_add(1, std::memory_order_release);
  }
}

// columns(n0, n1) over [0, N): on the calling thread alone when the product is small (`macs`), else in kChunk
// pieces shared with up to `threads` − 1 pool threads (0: the pool's size).
template <typename Columns>
void split_columns(ffi::ThreadPool& pool, int64_t threads, int64_t macs, int64_t N, const Columns& columns) {
  const int64_t chunks = (N + kChunk - 1) / kChunk;
  int64_t helpers = threads > 0 ? threads - 1 : pool.num_threads();
  if (macs < kParallelMacs || chunks < 2) helpers = 0;
  if (helpers > chunks - 1) helpers = chunks - 1;
  if (helpers <= 0) {
    columns(0, N);
    return;
  }
  auto sh = std::make_shared<Shared>();
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule([=] { run_chunks(*sh, chunks, N, columns); });
  run_chunks(*sh, chunks, N, columns);
  while (sh->done.load(std::memory_order_acquire) < chunks) std::this_thread::yield();
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(fastserve_int8_matmul, Int8Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x [..., K]
                                  .Arg<ffi::Buffer<ffi::S8>>()    // w [K, N]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // scale [G, N]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // y [..., N]
                                  .Attr<int64_t>("group")
                                  .Attr<int64_t>("threads"));  // 0: the pool's size; 1: this thread only

XLA_FFI_DEFINE_HANDLER_SYMBOL(fastserve_int8_matmul_nt, Int8MatmulNT,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x [..., K]
                                  .Arg<ffi::Buffer<ffi::S8>>()    // w [N, K]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // scale [N]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // y [..., N]
                                  .Attr<int64_t>("threads"));

extern "C" const char* fastserve_int8_isa() { return isa().name; }
