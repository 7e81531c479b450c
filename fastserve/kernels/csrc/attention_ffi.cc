// XLA FFI handlers on CPU for softmax attention with per-query key windows (encoders: every key, minus padding;
// decoders: causal within each packed document), grouped-query heads included:
// `fastserve_attention_fwd`: o [B, T, H, D], lse [B, H, T] from q [B, T, H, D], k, v [B, S, K, D] (H a multiple of
//   K), valid [B, S], lo, hi [B, T] (query t sees key s when lo <= s < hi and valid);
// `fastserve_attention_bwd`: dq, dk, dv from the same inputs, o, lse and the output's cotangent.
//
// Each (batch, KV head) pair is one work item (attention_item.cc), fused end to end: scores, softmax and the value
// mix never leave the core's cache, where XLA runs them as separate batched matmuls and a softmax over [B·H, T, S]
// in memory. Items are shared between the calling thread and XLA's intra-op pool.
#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "attention_decode.h"

namespace ffi = xla::ffi;

extern "C" {
// (q, k, v, valid, lo, hi, o, lse, T, S, G, D, q_stride, k_stride, scale, scratch)
typedef bool (*FwdFn)(const float*, const float*, const float*, const int32_t*, const int32_t*, const int32_t*, float*,
                      float*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, float, float*);
// (q, k, v, valid, lo, hi, o, lse, dout, dq, dk, dv, T, S, G, D, q_stride, k_stride, scale, scratch)
typedef bool (*BwdFn)(const float*, const float*, const float*, const int32_t*, const int32_t*, const int32_t*,
                      const float*, const float*, const float*, float*, float*, float*, int64_t, int64_t, int64_t,
                      int64_t, int64_t, int64_t, float, float*);
// (q, q_stride, lens, m, G, D, k, v, o, k_stride, pages, P, blocks, scale, scratch)
typedef bool (*DecodeFn)(const float*, int64_t, const int64_t*, int64_t, int64_t, int64_t, const float*, const float*,
                         float*, int64_t, const int32_t*, int64_t, int64_t, float, float*);
#define FS_DECLARE(isa)                                                                                          \
  bool fastserve_attention_fwd_##isa(const float*, const float*, const float*, const int32_t*, const int32_t*, \
                                     const int32_t*, float*, float*, int64_t, int64_t, int64_t, int64_t,        \
                                     int64_t, int64_t, float, float*);                                          \
  bool fastserve_attention_bwd_##isa(const float*, const float*, const float*, const int32_t*, const int32_t*, \
                                     const int32_t*, const float*, const float*, const float*, float*, float*,  \
                                     float*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, float, float*); \
  bool fastserve_decode_attention_##isa(const float*, int64_t, const int64_t*, int64_t, int64_t, int64_t,        \
                                        const float*, const float*, float*, int64_t, const int32_t*, int64_t,     \
                                        int64_t, float, float*);
FS_DECLARE(generic)
int fastserve_isa_level();
#if defined(__x86_64__)
FS_DECLARE(avx512)
FS_DECLARE(avx2)
#endif
}

namespace {

struct AttentionIsa {
  FwdFn fwd;
  BwdFn bwd;
  DecodeFn decode;
};

// The variant int8_ffi.cc's fastserve_isa_level picks for the whole library.
AttentionIsa pick() {
  switch (fastserve_isa_level()) {
#if defined(__x86_64__)
    case 2: return {fastserve_attention_fwd_avx512, fastserve_attention_bwd_avx512, fastserve_decode_attention_avx512};
    case 1: return {fastserve_attention_fwd_avx2, fastserve_attention_bwd_avx2, fastserve_decode_attention_avx2};
#endif
    default: return {fastserve_attention_fwd_generic, fastserve_attention_bwd_generic,
                     fastserve_decode_attention_generic};
  }
}

const AttentionIsa& chosen() {
  static const AttentionIsa isa = pick();
  return isa;
}

struct Progress {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

// item(i, scratch) for i in [0, n): claimed one at a time by the caller and up to the pool's size in helpers, each
// with its own scratch of `floats`. A helper that starts after the last item was claimed returns at once, so the
// caller never waits on a task that has not started.
template <typename Item>
void for_each_item(ffi::ThreadPool& pool, int64_t n, int64_t floats, const Item& item) {
  auto work = [n, floats, &item](Progress& pr) {
    std::vector<float> scratch;
    for (int64_t i; (i = pr.next.fetch_add(1)) < n;) {
      if (scratch.empty()) scratch.resize(floats);
      item(i, scratch.data());
      pr.done.fetch_add(1, std::memory_order_release);
    }
  };
  int64_t helpers = pool.num_threads();
  if (helpers > n - 1) helpers = n - 1;
  auto pr = std::make_shared<Progress>();
  // helpers hold the item by pointer: the caller waits below until every claimed item is done
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule([pr, work] { work(*pr); });
  work(*pr);
  while (pr->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

struct Shape {
  int64_t B, T, S, H, K, D;
};

// scratch floats per work item (attention_item.cc lays them out; enough for query tiles of up to 8)
int64_t fwd_scratch(const Shape& s) { return s.S * (2 * s.D + 12) + 32 * s.D + 256; }
int64_t bwd_scratch(const Shape& s) { return s.S * (5 * s.D + 20) + 64 * s.D + 384; }

ffi::Error invalid(const char* what) { return ffi::Error::InvalidArgument(std::string("fastserve_attention: ") + what); }

// the head dims attention_item.cc compiles a body for
bool compiled_head_dim(int64_t D) { return D == 16 || D == 32 || D == 64 || D == 128; }

ffi::ErrorOr<Shape> shape_of(const ffi::Buffer<ffi::F32>& q, const ffi::Buffer<ffi::F32>& k,
                             const ffi::Buffer<ffi::F32>& v, const ffi::Buffer<ffi::S32>& valid,
                             const ffi::Buffer<ffi::S32>& lo, const ffi::Buffer<ffi::S32>& hi) {
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(), md = valid.dimensions();
  const auto ld = lo.dimensions(), hd = hi.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4 || md.size() != 2 || ld.size() != 2 || hd.size() != 2)
    return ffi::Unexpected(invalid("expected q [B,T,H,D], k, v [B,S,K,D], valid [B,S], lo, hi [B,T]"));
  const Shape s{qd[0], qd[1], kd[1], qd[2], kd[2], qd[3]};
  for (int i = 0; i < 4; ++i)
    if (kd[i] != vd[i]) return ffi::Unexpected(invalid("k and v shapes differ"));
  if (kd[0] != s.B || kd[3] != s.D || s.K < 1 || s.H % s.K || md[0] != s.B || md[1] != s.S || ld[0] != s.B ||
      ld[1] != s.T || hd[0] != s.B || hd[1] != s.T)
    return ffi::Unexpected(invalid("q, k, valid, lo, hi shapes do not agree"));
  if (!compiled_head_dim(s.D)) return ffi::Unexpected(invalid("head dim must be 16, 32, 64 or 128"));
  return s;
}

ffi::Error AttentionFwd(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                        ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> valid, ffi::Buffer<ffi::S32> lo,
                        ffi::Buffer<ffi::S32> hi, ffi::ResultBuffer<ffi::F32> o, ffi::ResultBuffer<ffi::F32> lse,
                        float scale) {
  auto sh = shape_of(q, k, v, valid, lo, hi);
  if (sh.has_error()) return sh.error();
  const Shape s = sh.value();
  const int64_t G = s.H / s.K;
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  const int32_t *mp = valid.typed_data(), *lop = lo.typed_data(), *hip = hi.typed_data();
  float *op = o->typed_data(), *lp = lse->typed_data();
  const FwdFn fwd = chosen().fwd;
  for_each_item(pool, s.B * s.K, fwd_scratch(s), [=](int64_t i, float* scratch) {
    const int64_t b = i / s.K, kh = i % s.K;
    const int64_t qo = (b * s.T * s.H + kh * G) * s.D, ko = (b * s.S * s.K + kh) * s.D;
    fwd(qp + qo, kp + ko, vp + ko, mp + b * s.S, lop + b * s.T, hip + b * s.T, op + qo,
        lp + (b * s.H + kh * G) * s.T, s.T, s.S, G, s.D, s.H * s.D, s.K * s.D, scale, scratch);
  });
  return ffi::Error::Success();
}

ffi::Error AttentionBwd(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                        ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> valid, ffi::Buffer<ffi::S32> lo,
                        ffi::Buffer<ffi::S32> hi, ffi::Buffer<ffi::F32> o, ffi::Buffer<ffi::F32> lse,
                        ffi::Buffer<ffi::F32> dout, ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk,
                        ffi::ResultBuffer<ffi::F32> dv, float scale) {
  auto sh = shape_of(q, k, v, valid, lo, hi);
  if (sh.has_error()) return sh.error();
  const Shape s = sh.value();
  const int64_t G = s.H / s.K;
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  const float *op = o.typed_data(), *lp = lse.typed_data(), *gp = dout.typed_data();
  const int32_t *mp = valid.typed_data(), *lop = lo.typed_data(), *hip = hi.typed_data();
  float *dqp = dq->typed_data(), *dkp = dk->typed_data(), *dvp = dv->typed_data();
  const BwdFn bwd = chosen().bwd;
  for_each_item(pool, s.B * s.K, bwd_scratch(s), [=](int64_t i, float* scratch) {
    const int64_t b = i / s.K, kh = i % s.K;
    const int64_t qo = (b * s.T * s.H + kh * G) * s.D, ko = (b * s.S * s.K + kh) * s.D;
    bwd(qp + qo, kp + ko, vp + ko, mp + b * s.S, lop + b * s.T, hip + b * s.T, op + qo,
        lp + (b * s.H + kh * G) * s.T, gp + qo, dqp + qo, dkp + ko, dvp + ko, s.T, s.S, G, s.D, s.H * s.D,
        s.K * s.D, scale, scratch);
  });
  return ffi::Error::Success();
}

// One decode step's attention straight from a KV cache: query i (one token, H heads) sees the first lengths[i]
// positions of its cache row. Each run of queries in one row, with one KV head, is one item (attention_item.cc's
// decode or decode_run) over exactly those positions, read in place: no copy of the rows out of the cache, no
// transposes, nothing past the row's length (XLA's path gathers the rows, transposes them to heads-major and attends
// over a whole window). Two layouts:
//  * `fastserve_decode_attention`: k, v [B, S, K, D], query i in row rows[i] (an id outside [0, B): zeros);
//  * `fastserve_decode_attention_paged`: k, v blocks [N, P, K, D], query i's positions in blocks pages[i, :].
// A length of 0 or past the row's positions (a padding or masked column of the step) gives zeros.
// Below this many multiply-adds a decode step's attention stays on the calling thread. A long row read cold from
// memory gains most from a second thread (twice the misses in flight): one 2,000-position row among seven short
// ones, 4 quickstart layers, took 0.78 ms a step on one thread and 0.45 on two (experiments/decode_attention_step.py
// with the threshold at 2^20 and at 2^17, 2 cores of an Intel Xeon).
constexpr int64_t kDecodeParallelMacs = 1 << 18;

struct DecodeLayout {
  int64_t B, S;            // rows and positions per row (paged: S = M · P, the most a row's pages hold)
  int64_t P, N, M;         // paged: positions per block, blocks, pages per row; P = 0: contiguous
  const int32_t* rows;     // contiguous
  const int32_t* pages;    // paged [b, M]
};

// q [b, H, D], the cache's k and v [rows or blocks, positions, K, D] (the handlers checked their ranks), lengths [b].
ffi::Error decode_attention(ffi::ThreadPool& pool, const ffi::Buffer<ffi::F32>& q, const ffi::Buffer<ffi::F32>& k,
                            const ffi::Buffer<ffi::F32>& v, const DecodeLayout& lay,
                            const ffi::Buffer<ffi::S32>& lengths, float* op, float scale) {
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  for (int i = 0; i < 4; ++i)
    if (kd[i] != vd[i]) return invalid("decode: k and v shapes differ");
  const int64_t n = qd[0], H = qd[1], K = kd[2], D = kd[3];
  if (qd[2] != D || K < 1 || H % K || lengths.dimensions().size() != 1 || lengths.dimensions()[0] != n)
    return invalid("decode: q [b,H,D], the cache and lengths [b] do not agree");
  if (!compiled_head_dim(D)) return invalid("head dim must be 16, 32, 64 or 128");
  const int64_t G = H / K;
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  const int32_t* lp = lengths.typed_data();
  // A padding column gives zeros: a row id outside [0, B), a length of 0, or one past the row's positions (a masked
  // token placed at the cache's end, whose write is dropped; no real token's length exceeds S).
  auto padding = [&](int64_t b) {
    return (!lay.P && (lay.rows[b] < 0 || lay.rows[b] >= lay.B)) || lp[b] <= 0 || lp[b] > lay.S;
  };
  // Runs [first[r], first[r + 1]) of queries: side by side in one row (the columns of a prompt's piece riding in a
  // decode step, slot layout), else one query each.
  std::vector<int64_t> first{0};
  int64_t widest = 1;
  for (int64_t b = 1; b <= n; ++b)
    if (b == n || lay.P || lay.rows[b] != lay.rows[b - 1] || padding(b) || padding(b - 1)) {
      widest = b - first.back() > widest ? b - first.back() : widest;
      first.push_back(b);
    }
  const int64_t runs = static_cast<int64_t>(first.size()) - 1;
  std::vector<int32_t> ones(lay.S, 1), zeros(widest, 0);
  const DecodeFn decode = chosen().decode;
  const FwdFn fwd = chosen().fwd;
  const int64_t lse_floats = (G * widest + 15) / 16 * 16;   // the forward's lse [G, m], then its own scratch
  // A run of up to kRunColumns queries: attention_item.cc's decode (one) or decode_run (each key read once for all
  // of them); a wider one: the forward kernel's query tiles (each key loaded and transposed once serves 8 queries).
  auto run_item = [&, G](int64_t i, float* scratch) {
    const int64_t r = i / K, kh = i % K, b0 = first[r], m = first[r + 1] - b0;
    const int64_t row = lay.P ? 0 : lay.rows[b0], qo = (b0 * H + kh * G) * D;
    if (padding(b0)) {     // a run of one (the runs split at padding)
      for (int64_t j = 0; j < G * D; ++j) op[qo + j] = 0.f;
      return;
    }
    const int64_t ko = (row * lay.S * K + kh) * D;   // paged: block 0's first row of this head
    if (m <= kRunColumns) {
      int64_t lens[kRunColumns];
      for (int64_t j = 0; j < m; ++j) lens[j] = lp[b0 + j];
      decode(qp + qo, H * D, lens, m, G, D, kp + ko, vp + ko, op + qo, K * D,
             lay.P ? lay.pages + b0 * lay.M : nullptr, lay.P, lay.N, scale, scratch);
      return;
    }
    int64_t S = 0;      // the run's longest window bounds the keys read
    for (int64_t b = b0; b < b0 + m; ++b) S = lp[b] > S ? lp[b] : S;
    fwd(qp + qo, kp + ko, vp + ko, ones.data(), zeros.data(), lp + b0, op + qo, scratch, m, S, G, D, H * D, K * D,
        scale, scratch + lse_floats);
  };
  // a small step (few rows, short rows) on the calling thread: waking XLA's pool costs more than it saves
  int64_t keys = 0;
  for (int64_t b = 0; b < n; ++b) keys += padding(b) ? 0 : lp[b];
  const int64_t S8 = (lay.S + 7) / 8 * 8;
  int64_t scratch_floats = G * S8;                         // decode: one token's G score rows
  if ((widest > 1 || lay.S >= kLongRow) && kRunRows * (S8 + D) > scratch_floats)
    scratch_floats = kRunRows * (S8 + D);
  if (widest > kRunColumns) {
    const int64_t runs_floats = lse_floats + fwd_scratch(Shape{1, widest, lay.S, H, K, D});
    scratch_floats = runs_floats > scratch_floats ? runs_floats : scratch_floats;
  }
  if (keys * H * D < kDecodeParallelMacs) {
    std::vector<float> scratch(scratch_floats);
    for (int64_t i = 0; i < runs * K; ++i) run_item(i, scratch.data());
  } else {
    for_each_item(pool, runs * K, scratch_floats, run_item);
  }
  return ffi::Error::Success();
}

ffi::Error DecodeAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                           ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> rows, ffi::Buffer<ffi::S32> lengths,
                           ffi::ResultBuffer<ffi::F32> o, float scale) {
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(), rd = rows.dimensions();
  if (qd.size() != 3 || kd.size() != 4 || vd.size() != 4 || rd.size() != 1 || rd[0] != qd[0])
    return invalid("decode: expected q [b,H,D], k, v [B,S,K,D], rows, lengths [b]");
  const DecodeLayout lay{kd[0], kd[1], 0, 0, 0, rows.typed_data(), nullptr};
  return decode_attention(pool, q, k, v, lay, lengths, o->typed_data(), scale);
}

ffi::Error PagedDecodeAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                                ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> pages, ffi::Buffer<ffi::S32> lengths,
                                ffi::ResultBuffer<ffi::F32> o, float scale) {
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(), pd = pages.dimensions();
  if (qd.size() != 3 || kd.size() != 4 || vd.size() != 4 || pd.size() != 2 || pd[0] != qd[0])
    return invalid("decode (paged): expected q [b,H,D], k, v [N,P,K,D], pages [b,M], lengths [b]");
  if (kd[0] < 1 || kd[1] < 1) return invalid("decode (paged): no blocks");
  const DecodeLayout lay{1, pd[1] * kd[1], kd[1], kd[0], pd[1], nullptr, pages.typed_data()};
  return decode_attention(pool, q, k, v, lay, lengths, o->typed_data(), scale);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(fastserve_decode_attention, DecodeAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // q [b, H, D]: one token per query row
                                  .Arg<ffi::Buffer<ffi::F32>>()   // k cache [B, S, K, D]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // v cache [B, S, K, D]
                                  .Arg<ffi::Buffer<ffi::S32>>()   // rows [b]: each query's cache row
                                  .Arg<ffi::Buffer<ffi::S32>>()   // lengths [b]: positions [0, length) are seen
                                  .Ret<ffi::Buffer<ffi::F32>>()   // o [b, H, D]
                                  .Attr<float>("scale"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(fastserve_decode_attention_paged, PagedDecodeAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // q [b, H, D]: one token per query row
                                  .Arg<ffi::Buffer<ffi::F32>>()   // k blocks [N, P, K, D]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // v blocks [N, P, K, D]
                                  .Arg<ffi::Buffer<ffi::S32>>()   // pages [b, M]: each query's block ids
                                  .Arg<ffi::Buffer<ffi::S32>>()   // lengths [b]: positions [0, length) are seen
                                  .Ret<ffi::Buffer<ffi::F32>>()   // o [b, H, D]
                                  .Attr<float>("scale"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(fastserve_attention_fwd, AttentionFwd,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // q [B, T, H, D]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // k [B, S, K, D]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // v [B, S, K, D]
                                  .Arg<ffi::Buffer<ffi::S32>>()   // valid [B, S]
                                  .Arg<ffi::Buffer<ffi::S32>>()   // lo [B, T]
                                  .Arg<ffi::Buffer<ffi::S32>>()   // hi [B, T]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // o [B, T, H, D]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // lse [B, H, T]
                                  .Attr<float>("scale"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(fastserve_attention_bwd, AttentionBwd,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // q
                                  .Arg<ffi::Buffer<ffi::F32>>()   // k
                                  .Arg<ffi::Buffer<ffi::F32>>()   // v
                                  .Arg<ffi::Buffer<ffi::S32>>()   // valid
                                  .Arg<ffi::Buffer<ffi::S32>>()   // lo
                                  .Arg<ffi::Buffer<ffi::S32>>()   // hi
                                  .Arg<ffi::Buffer<ffi::F32>>()   // o
                                  .Arg<ffi::Buffer<ffi::F32>>()   // lse
                                  .Arg<ffi::Buffer<ffi::F32>>()   // dout [B, T, H, D]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dq
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dk
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dv
                                  .Attr<float>("scale"));
