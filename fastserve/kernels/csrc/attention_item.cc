// One work item of softmax attention, forward and backward: one batch row and one KV head with the G query heads that
// share it (G = 1: multi-head), compiled once per instruction set (build.py: FS_ISA names the variant).
//
// Layouts: q, o, dq, dout hold T rows `q_stride` floats apart, query head g's D floats at row + g·D (a [B, T, H, D]
// array seen from [b, 0, first head of the group, 0]); k, v, dk, dv hold S rows `k_stride` apart; valid [S]
// (nonzero = a real key); lo, hi [T]; lse [G, T]. Query t sees key s when lo[t] <= s < hi[t] and valid[s]: an
// encoder passes [0, S) for every query, a causal decoder [start of t's packed document, t + 1). Padded keys are
// dropped up front (compacted) and each query touches only its own window of the rest, so the work is proportional
// to the (query, key) pairs that count: half the square for causal attention. A query that sees no key at all
// averages every key uniformly, as the reference (layers.attention) does, and then passes no gradient to q or k.
#include <cmath>
#include <cstdint>
#include <cstring>

#define FS_CAT2(a, b) a##_##b
#define FS_CAT(a, b) FS_CAT2(a, b)
#define FS_NAME(f) FS_CAT(f, FS_ISA)

namespace {

// The valid keys' indices into idx and, in before[s] (s = 0..S), how many valid keys precede key s; returns their
// count. A query's window [lo, hi) of keys is then [before[lo], before[hi]) of the compacted ones.
int64_t compact(const int32_t* valid, int64_t S, int64_t* idx, int32_t* before) {
  int64_t n = 0;
  for (int64_t s = 0; s < S; ++s) {
    before[s] = static_cast<int32_t>(n);
    if (valid[s]) idx[n++] = s;
  }
  before[S] = static_cast<int32_t>(n);
  return n;
}

// The compacted window [a, e) of query t's keys (lo / hi clamped to [0, S]).
inline void window(const int32_t* before, const int32_t* lo, const int32_t* hi, int64_t t, int64_t S, int64_t& a,
                   int64_t& e) {
  const int64_t l = lo[t] < 0 ? 0 : (lo[t] > S ? S : lo[t]), h = hi[t] < 0 ? 0 : (hi[t] > S ? S : hi[t]);
  a = before[l];
  e = h > l ? before[h] : a;
}

// Eight floats as one value (GCC / clang vector extensions: one ymm under AVX2 / AVX-512, two xmm otherwise);
// `vu` may sit at any float address.
typedef float v8 __attribute__((vector_size(32)));
typedef float vu __attribute__((vector_size(32), aligned(4)));

inline v8 load(const float* p) { return *reinterpret_cast<const vu*>(p); }
inline void store(float* p, v8 x) { *reinterpret_cast<vu*>(p) = x; }
typedef int32_t vi8 __attribute__((vector_size(32)));

inline v8 splat(float x) { return v8{x, x, x, x, x, x, x, x}; }

// exp(x) for x <= 0, eight at a time (Cephes' expf polynomial, ~2 ulp; inputs below -87 give exp(-87) ≈ 2e-38).
inline v8 exp8(v8 x) {
  const v8 lo = splat(-87.0f);
  x = x > lo ? x : lo;
  const v8 magic = splat(12582912.0f);  // 1.5 · 2^23: adding and subtracting it rounds to the nearest integer
  const v8 n = (x * 1.44269504088896341f + magic) - magic;
  const v8 r = x - n * 0.693359375f + n * 2.12194440e-4f;
  v8 p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const vi8 bits = (__builtin_convertvector(n, vi8) + 127) << 23;
  return p * reinterpret_cast<const v8&>(bits);
}

inline float hsum(v8 x) {
  float s = 0.0f;
  for (int i = 0; i < 8; ++i) s += x[i];
  return s;
}

inline float hmax(v8 x) {
  float m = x[0];
  for (int i = 1; i < 8; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

// row[j] ← exp(row[j] − shift) over [a16, e16) (multiples of 16 around [a, e)); returns Σ_{a<=j<e} (the entries
// outside [a, e) are set to ~0 first).
inline float exp_shifted(float* row, int64_t a, int64_t e, int64_t a16, int64_t e16, float shift) {
  for (int64_t j = a16; j < a; ++j) row[j] = -1e30f;
  for (int64_t j = e; j < e16; ++j) row[j] = -1e30f;
  v8 sum = {};
  for (int64_t j = a16; j < e16; j += 8) {
    const v8 e = exp8(load(row + j) - shift);
    store(row + j, e);
    sum += e;
  }
  return hsum(sum);
}

// row[j] = scale·q · key j for j in [a16, e16) (multiples of 16), the compacted keys held transposed in kt
// [D, n16] (n16: their count rounded up to a multiple of 16, padded with zeros): sixteen keys at a time,
// accumulated over d in registers.
template <int64_t D>
inline void scores(const float* __restrict q, const float* __restrict kt, float* __restrict row, int64_t n16,
                   int64_t a16, int64_t e16, float scale) {
  float qs[D];
  for (int64_t d = 0; d < D; ++d) qs[d] = q[d] * scale;
  for (int64_t j0 = a16; j0 < e16; j0 += 16) {
    v8 a0 = {}, a1 = {}, b0 = {}, b1 = {};   // even and odd d apart: four independent multiply-add chains
    for (int64_t d = 0; d < D; d += 2) {
      a0 += qs[d] * load(kt + d * n16 + j0);
      a1 += qs[d] * load(kt + d * n16 + j0 + 8);
      b0 += qs[d + 1] * load(kt + (d + 1) * n16 + j0);
      b1 += qs[d + 1] * load(kt + (d + 1) * n16 + j0 + 8);
    }
    store(row + j0, a0 + b0);
    store(row + j0 + 8, a1 + b1);
  }
}

// rows[j] += w[j] · x for j < n (rows [n, D] contiguous, x [D]).
template <int64_t D>
inline void rank1(const float* __restrict w, const float* __restrict x, float* __restrict rows, int64_t n) {
  v8 xs[D / 8];
  for (int64_t c = 0; c < D / 8; ++c) xs[c] = load(x + 8 * c);
  for (int64_t j = 0; j < n; ++j)
    for (int64_t c = 0; c < D / 8; ++c) store(rows + j * D + 8 * c, load(rows + j * D + 8 * c) + w[j] * xs[c]);
}

// out[d] = scale · Σ_j w[j] · rows[j][d] (row j at rows + j · row_stride), accumulated in registers.
template <int64_t D>
inline void mix(const float* __restrict w, const float* __restrict rows, int64_t row_stride, float* __restrict out,
                int64_t n, float scale) {
  static_assert(D % 8 == 0, "head dims are multiples of 8");
  v8 acc[D / 8] = {};
  for (int64_t j = 0; j < n; ++j)
    for (int64_t c = 0; c < D / 8; ++c) acc[c] += w[j] * load(rows + j * row_stride + 8 * c);
  for (int64_t c = 0; c < D / 8; ++c) store(out + 8 * c, acc[c] * scale);
}

}  // namespace

namespace {

template <int64_t D>
void forward(const float* q, const float* k, const float* v, const int32_t* valid, const int32_t* lo,
             const int32_t* hi, float* o, float* lse, int64_t T, int64_t S, int64_t G, int64_t q_stride,
             int64_t k_stride, float scale, float* scratch) {
  int64_t* idx = reinterpret_cast<int64_t*>(scratch);                  // S int64 = 2S floats
  int32_t* before = reinterpret_cast<int32_t*>(scratch + 2 * S);      // S + 1 int32
  const int64_t n = compact(valid, S, idx, before), n16 = (n + 15) / 16 * 16;
  float* kt = scratch + 3 * S + 16;                                    // [D, n16]
  float* vc = kt + D * (S + 16);                                       // [n, D]
  float* row = vc + D * S;                                             // [n16]
  for (int64_t d = 0; d < D; ++d)
    for (int64_t j = n; j < n16; ++j) kt[d * n16 + j] = 0.0f;
  for (int64_t j = 0; j < n; ++j)
    for (int64_t d = 0; d < D; ++d) {
      kt[d * n16 + j] = k[idx[j] * k_stride + d];
      vc[j * D + d] = v[idx[j] * k_stride + d];
    }
  float mean[D] = {};   // the uniform average over all S keys, for a query that sees none (computed when first needed)
  bool have_mean = false;
  for (int64_t g = 0; g < G; ++g)
    for (int64_t t = 0; t < T; ++t) {
      float* ot = o + t * q_stride + g * D;
      int64_t a, e;
      window(before, lo, hi, t, S, a, e);
      if (a >= e) {
        if (!have_mean) {
          for (int64_t d = 0; d < D; ++d) mean[d] = 0.0f;
          for (int64_t s = 0; s < S; ++s)
            for (int64_t d = 0; d < D; ++d) mean[d] += v[s * k_stride + d];
          for (int64_t d = 0; d < D; ++d) mean[d] = S ? mean[d] / static_cast<float>(S) : 0.0f;
          have_mean = true;
        }
        for (int64_t d = 0; d < D; ++d) ot[d] = mean[d];
        lse[g * T + t] = 0.0f;
        continue;
      }
      const int64_t a16 = a / 16 * 16, e16 = (e + 15) / 16 * 16;
      scores<D>(q + t * q_stride + g * D, kt, row, n16, a16, e16, scale);
      for (int64_t j = a16; j < a; ++j) row[j] = -1e30f;
      for (int64_t j = e; j < e16; ++j) row[j] = -1e30f;
      v8 mv = load(row + a16);
      for (int64_t j = a16 + 8; j < e16; j += 8) {
        const v8 x = load(row + j);
        mv = x > mv ? x : mv;
      }
      const float m = hmax(mv);
      const float sum = exp_shifted(row, a, e, a16, e16, m);
      mix<D>(row + a, vc + a * D, D, ot, e - a, 1.0f / sum);
      lse[g * T + t] = m + std::log(sum);
    }
}

template <int64_t D>
void backward(const float* q, const float* k, const float* v, const int32_t* valid, const int32_t* lo,
              const int32_t* hi, const float* o, const float* lse, const float* dout, float* dq, float* dk, float* dv,
              int64_t T, int64_t S, int64_t G, int64_t q_stride, int64_t k_stride, float scale, float* scratch) {
  int64_t* idx = reinterpret_cast<int64_t*>(scratch);
  int32_t* before = reinterpret_cast<int32_t*>(scratch + 2 * S);
  const int64_t n = compact(valid, S, idx, before), n16 = (n + 15) / 16 * 16;
  float* kt = scratch + 3 * S + 16;  // [D, n16] keys, transposed
  float* vt = kt + D * (S + 16);     // [D, n16] values, transposed
  float* kc = vt + D * (S + 16);     // [n, D] keys
  float* p = kc + D * S;             // [n16] one query's probabilities
  float* ds = p + S + 16;            // [n16] and their gradient
  float* dkc = ds + S + 16;          // [n, D] key gradients (unscaled)
  float* dvc = dkc + D * S;          // [n, D] value gradients
  for (int64_t d = 0; d < D; ++d)
    for (int64_t j = n; j < n16; ++j) kt[d * n16 + j] = vt[d * n16 + j] = 0.0f;
  for (int64_t j = 0; j < n; ++j)
    for (int64_t d = 0; d < D; ++d) {
      const float kv = k[idx[j] * k_stride + d], vv = v[idx[j] * k_stride + d];
      kt[d * n16 + j] = kv;
      kc[j * D + d] = kv;
      vt[d * n16 + j] = vv;
      dkc[j * D + d] = dvc[j * D + d] = 0.0f;
    }
  float unseen[D];   // Σ dout over the queries that see no key: they average all S keys uniformly
  for (int64_t d = 0; d < D; ++d) unseen[d] = 0.0f;
  bool any_unseen = false;
  for (int64_t g = 0; g < G; ++g)
    for (int64_t t = 0; t < T; ++t) {
      const float* __restrict qt = q + t * q_stride + g * D;
      const float* __restrict gt = dout + t * q_stride + g * D;
      const float* __restrict ot = o + t * q_stride + g * D;
      float* dqt = dq + t * q_stride + g * D;
      int64_t a, e;
      window(before, lo, hi, t, S, a, e);
      if (a >= e) {
        for (int64_t d = 0; d < D; ++d) {
          unseen[d] += gt[d];
          dqt[d] = 0.0f;
        }
        any_unseen = true;
        continue;
      }
      const int64_t a16 = a / 16 * 16, e16 = (e + 15) / 16 * 16;
      scores<D>(qt, kt, p, n16, a16, e16, scale);
      exp_shifted(p, a, e, a16, e16, lse[g * T + t]);
      float di = 0.0f;
      for (int64_t d = 0; d < D; ++d) di += gt[d] * ot[d];
      scores<D>(gt, vt, ds, n16, a16, e16, 1.0f);    // dP = dout · Vᵀ
      for (int64_t j = a; j < e; ++j) ds[j] = p[j] * (ds[j] - di);
      mix<D>(ds + a, kc + a * D, D, dqt, e - a, scale);   // dQ = scale · dS · K
      rank1<D>(p + a, gt, dvc + a * D, e - a);             // dV += Pᵀ · dout
      rank1<D>(ds + a, qt, dkc + a * D, e - a);            // dK += dSᵀ · Q (scaled below)
    }
  for (int64_t s = 0; s < S; ++s)
    for (int64_t d = 0; d < D; ++d) {
      dk[s * k_stride + d] = 0.0f;
      dv[s * k_stride + d] = any_unseen ? unseen[d] / static_cast<float>(S) : 0.0f;
    }
  for (int64_t j = 0; j < n; ++j)
    for (int64_t d = 0; d < D; ++d) {
      dk[idx[j] * k_stride + d] = dkc[j * D + d] * scale;
      dv[idx[j] * k_stride + d] += dvc[j * D + d];
    }
}

}  // namespace

// The head dims with a compiled body (attention.py takes XLA's path for any other; attention_ffi.cc checks).
#define FS_HEAD_DIMS(X) X(16) X(32) X(64) X(128)

// scratch: FS_ATTENTION_FWD_SCRATCH / _BWD_ floats (attention_ffi.cc). false: no body for D.
extern "C" bool FS_NAME(fastserve_attention_fwd)(const float* q, const float* k, const float* v,
                                                 const int32_t* valid, const int32_t* lo, const int32_t* hi,
                                                 float* o, float* lse, int64_t T, int64_t S, int64_t G, int64_t D,
                                                 int64_t q_stride, int64_t k_stride, float scale, float* scratch) {
#define FS_CASE(d) \
  case d: forward<d>(q, k, v, valid, lo, hi, o, lse, T, S, G, q_stride, k_stride, scale, scratch); return true;
  switch (D) { FS_HEAD_DIMS(FS_CASE) }
#undef FS_CASE
  return false;
}

extern "C" bool FS_NAME(fastserve_attention_bwd)(const float* q, const float* k, const float* v,
                                                 const int32_t* valid, const int32_t* lo, const int32_t* hi,
                                                 const float* o, const float* lse, const float* dout, float* dq,
                                                 float* dk, float* dv, int64_t T, int64_t S, int64_t G, int64_t D,
                                                 int64_t q_stride, int64_t k_stride, float scale, float* scratch) {
#define FS_CASE(d)                                                                                      \
  case d:                                                                                               \
    backward<d>(q, k, v, valid, lo, hi, o, lse, dout, dq, dk, dv, T, S, G, q_stride, k_stride, scale, scratch); \
    return true;
  switch (D) { FS_HEAD_DIMS(FS_CASE) }
#undef FS_CASE
  return false;
}
