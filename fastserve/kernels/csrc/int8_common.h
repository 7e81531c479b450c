// What the int8 FFI handlers (int8_ffi.cc, int8_q8.cc) share: splitting a product's output columns over threads
// (fastserve's spinning helpers, spin_pool.cc, else XLA's intra-op pool for large products) and the custom calls'
// signatures. Both are compiled with the same flags (no instruction-set variant includes this).
#pragma once
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

extern "C" bool fastserve_spin_run(void (*fn)(const void*, int64_t, int64_t), const void* ctx, int64_t N,
                                   int64_t chunk);   // spin_pool.cc

namespace fastserve_columns {

namespace ffi = xla::ffi;

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

template <typename Columns>
void call_columns(const void* columns, int64_t n0, int64_t n1) {
  (*static_cast<const Columns*>(columns))(n0, n1);
}

// columns(n0, n1) over [0, N) in kChunk pieces: with the spinning helpers when they are free; else a small
// product (`macs`) on the calling thread alone and a large one shared with up to `threads` − 1 pool threads (0: the
// pool's size). threads = 1: the calling thread only.
template <typename Columns>
void split_columns(ffi::ThreadPool& pool, int64_t threads, int64_t macs, int64_t N, const Columns& columns) {
  const int64_t chunks = (N + kChunk - 1) / kChunk;
  if (threads != 1 && chunks >= 2 && fastserve_spin_run(&call_columns<Columns>, &columns, N, kChunk)) return;
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

// The custom calls' signatures, shared by the float (int8_ffi.cc) and W8A8 (int8_q8.cc) handlers: x [..., K],
// int8 w, float scale → y [..., N].
inline auto operands() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::S8>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Ret<ffi::Buffer<ffi::F32>>();
}

// w [K, N], scale [G, N]; attributes group (rows of K per scale) and threads (0: all helpers; 1: this thread only).
inline auto tile_binding() { return operands().Attr<int64_t>("group").Attr<int64_t>("threads"); }

// w [N, K] (a tied LM head), scale [N]; attribute threads.
inline auto rows_binding() { return operands().Attr<int64_t>("threads"); }

}  // namespace fastserve_columns
