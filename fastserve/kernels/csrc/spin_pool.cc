// Helper threads that stay awake between the small products of a decode step (see int8_common.h for when they
// are used). At batch 1 one int8 product reads its weights from memory in ~10-100 µs, and one core keeps too few
// loads in flight to reach the memory bandwidth; a second core doubles what is in flight, but waking a sleeping
// pool thread (XLA's) costs as much as the product. These helpers spin for a while after each job (so the next
// product of the step finds them awake), then sleep until the next one.
//
// Off unless asked for: a spinning helper takes a core from whatever else runs (on a 2-core machine busy with other
// work the decode step got slower with it). FASTSERVE_KERNEL_SPIN_THREADS: helpers (default 0; `auto`:
// min(cores, 4) − 1); FASTSERVE_KERNEL_SPIN_US: how long a helper spins after its last job before it sleeps
// (default 2000). Read once, at the first product.
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <thread>

namespace {

typedef void (*ChunkFn)(const void* ctx, int64_t n0, int64_t n1);

inline void cpu_relax() {
#if defined(__x86_64__)
  __builtin_ia32_pause();
#endif
}

int64_t env_int(const char* name, int64_t fallback) {
  const char* v = std::getenv(name);
  return v && *v ? std::strtoll(v, nullptr, 10) : fallback;
}

class SpinPool {
 public:
  SpinPool() {
    const int64_t cores = static_cast<int64_t>(std::thread::hardware_concurrency());
    const char* want = std::getenv("FASTSERVE_KERNEL_SPIN_THREADS");
    helpers_ = want && !std::strcmp(want, "auto") ? (cores < 4 ? cores : 4) - 1
                                                  : env_int("FASTSERVE_KERNEL_SPIN_THREADS", 0);
    spin_ = std::chrono::microseconds(env_int("FASTSERVE_KERNEL_SPIN_US", 2000));
    for (int64_t i = 0; i < helpers_; ++i) std::thread([this] { serve(); }).detach();
  }

  int64_t helpers() const { return helpers_; }

  // fn(ctx, n0, n1) over [0, N) in `chunk`-column pieces, on this thread and the helpers. False (nothing done)
  // when another caller holds the pool (XLA runs independent products concurrently): that one runs alone.
  bool run(ChunkFn fn, const void* ctx, int64_t N, int64_t chunk) {
    if (helpers_ <= 0 || busy_.exchange(true, std::memory_order_acquire)) return false;
    const int64_t chunks = (N + chunk - 1) / chunk;
    bool wake;
    {
      std::lock_guard<std::mutex> lock(mu_);
      fn_ = fn, ctx_ = ctx, n_ = N, chunk_ = chunk, chunks_ = chunks, next_ = 0;
      done_.store(0, std::memory_order_relaxed);
      generation_.fetch_add(1, std::memory_order_release);
      wake = sleeping_ > 0;
    }
    if (wake) cv_.notify_all();
    work();
    while (done_.load(std::memory_order_acquire) < chunks) cpu_relax();
    busy_.store(false, std::memory_order_release);
    return true;
  }

 private:
  // Claims and runs chunks of the current job until none are left.
  void work() {
    for (;;) {
      ChunkFn fn;
      const void* ctx;
      int64_t n0, n1;
      {
        std::lock_guard<std::mutex> lock(mu_);
        if (next_ >= chunks_) return;
        n0 = next_++ * chunk_;
        n1 = n0 + chunk_ < n_ ? n0 + chunk_ : n_;
        fn = fn_, ctx = ctx_;
      }
      fn(ctx, n0, n1);
      done_.fetch_add(1, std::memory_order_release);
    }
  }

  void serve() {
    uint64_t seen = generation_.load(std::memory_order_acquire);
    for (;;) {
      auto idle_since = std::chrono::steady_clock::now();
      while (generation_.load(std::memory_order_acquire) == seen) {
        for (int i = 0; i < 64; ++i) cpu_relax();
        if (std::chrono::steady_clock::now() - idle_since > spin_) {
          std::unique_lock<std::mutex> lock(mu_);
          ++sleeping_;
          cv_.wait(lock, [&] { return generation_.load(std::memory_order_acquire) != seen; });
          --sleeping_;
        }
      }
      seen = generation_.load(std::memory_order_acquire);
      work();
    }
  }

  int64_t helpers_ = 0;
  std::chrono::microseconds spin_{0};
  std::atomic<bool> busy_{false};
  std::atomic<uint64_t> generation_{0};
  std::atomic<int64_t> done_{0};
  std::mutex mu_;
  std::condition_variable cv_;
  int sleeping_ = 0;
  // the current job (under mu_)
  ChunkFn fn_ = nullptr;
  const void* ctx_ = nullptr;
  int64_t n_ = 0, chunk_ = 1, chunks_ = 0, next_ = 0;
};

SpinPool& pool() {
  static SpinPool* p = new SpinPool();   // never destroyed: detached helpers may outlive static destructors
  return *p;
}

}  // namespace

extern "C" bool fastserve_spin_run(ChunkFn fn, const void* ctx, int64_t N, int64_t chunk) {
  return pool().run(fn, ctx, N, chunk);
}

extern "C" int64_t fastserve_spin_helpers() { return pool().helpers(); }
