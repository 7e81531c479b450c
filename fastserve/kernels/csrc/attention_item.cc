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

#include "attention_decode.h"

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

// Queries go through the kernel QT at a time: every key (or value) row loaded from cache serves QT queries, which
// is what keeps the loops compute-bound rather than load-bound (one query at a time measured no faster than XLA at
// T = 1024). A tile's queries share the union of their windows; each one's row is masked to its own window.
constexpr int QT = FS_LANES >= 16 ? 8 : 4;   // AVX-512 (32 vector registers): 8

// One tile's per-query state: rows of scores / probabilities (indexed by compacted key, [A16, E16) in use), each
// query's window [a, e) (a >= e: sees no key) and the tile's union [A, E) rounded out to [A16, E16).
struct Tile {
  int nq;               // real queries in the tile (the rest repeat the last one and are discarded)
  int64_t a[QT], e[QT];
  bool seen[QT];        // the query sees some key
  int64_t A, E, A16, E16;
};

// The windows of queries t0 .. t0 + nq − 1; false when none of them sees a key.
inline bool tile_windows(const int32_t* before, const int32_t* lo, const int32_t* hi, int64_t t0, int nq, int64_t S,
                         Tile& tl) {
  tl.nq = nq;
  tl.A = INT64_MAX;
  tl.E = 0;
  for (int i = 0; i < QT; ++i) {
    if (i < nq) window(before, lo, hi, t0 + i, S, tl.a[i], tl.e[i]);
    tl.seen[i] = i < nq && tl.a[i] < tl.e[i];
    if (tl.seen[i]) {
      tl.A = tl.a[i] < tl.A ? tl.a[i] : tl.A;
      tl.E = tl.e[i] > tl.E ? tl.e[i] : tl.E;
    }
  }
  if (tl.A >= tl.E) return false;
  tl.A16 = tl.A / 16 * 16;
  tl.E16 = (tl.E + 15) / 16 * 16;
  return true;
}

// rows[i][j] = scale·x_i · key j for j in [A16, E16) (multiples of 16) and the QT vectors x_i, keys held transposed
// in kt [D, n16] (n16: the compacted count rounded up to 16, zero-padded): 16 keys × QT queries per pass, eight
// independent multiply-add chains, each kt load feeding QT of them.
template <int64_t D>
inline void scores(const float* const* x, const float* __restrict kt, float* const* rows, int64_t n16, int64_t A16,
                   int64_t E16, float scale) {
  float xs[QT][D];
  for (int i = 0; i < QT; ++i)
    for (int64_t d = 0; d < D; ++d) xs[i][d] = x[i][d] * scale;
  for (int64_t j0 = A16; j0 < E16; j0 += 16) {
    v8 acc[QT][2] = {};
    for (int64_t d = 0; d < D; ++d) {
      const v8 k0 = load(kt + d * n16 + j0), k1 = load(kt + d * n16 + j0 + 8);
      for (int i = 0; i < QT; ++i) {
        acc[i][0] += xs[i][d] * k0;
        acc[i][1] += xs[i][d] * k1;
      }
    }
    for (int i = 0; i < QT; ++i) {
      store(rows[i] + j0, acc[i][0]);
      store(rows[i] + j0 + 8, acc[i][1]);
    }
  }
}

// row[j] ← exp(row[j] − shift) on [a, e), 0 elsewhere in [A16, E16); returns Σ.
inline float exp_window(float* row, int64_t a, int64_t e, int64_t A16, int64_t E16, float shift) {
  const int64_t a16 = a / 16 * 16, e16 = (e + 15) / 16 * 16;
  for (int64_t j = a16; j < a; ++j) row[j] = -1e30f;
  for (int64_t j = e; j < e16; ++j) row[j] = -1e30f;
  v8 sum = {};
  for (int64_t j = a16; j < e16; j += 8) {
    const v8 p = exp8(load(row + j) - shift);
    store(row + j, p);
    sum += p;
  }
  for (int64_t j = A16; j < a; ++j) row[j] = 0.0f;   // exp8 floors at exp(−87), not 0
  for (int64_t j = e; j < E16; ++j) row[j] = 0.0f;
  return hsum(sum);
}

// The largest entry of row on [a, e).
inline float row_max(const float* row, int64_t a, int64_t e) {
  float m = row[a];
  for (int64_t j = a + 1; j < e; ++j) m = row[j] > m ? row[j] : m;
  return m;
}

// out_i[d] = scale_i · Σ_{j in [A, E)} w_i[j] · rows[j][d] (rows [n, D]) for the QT queries, 16 columns at a time:
// each row chunk loaded once feeds QT accumulators.
template <int64_t D>
inline void mix(const float* const* w, const float* __restrict rows, int64_t A, int64_t E, float* const* out,
                const float* scale, int nq) {
  static_assert(D % 16 == 0, "head dims are multiples of 16");
  for (int64_t c = 0; c < D; c += 16) {
    v8 acc[QT][2] = {};
    for (int64_t j = A; j < E; ++j) {
      const v8 x0 = load(rows + j * D + c), x1 = load(rows + j * D + c + 8);
      for (int i = 0; i < QT; ++i) {
        acc[i][0] += w[i][j] * x0;
        acc[i][1] += w[i][j] * x1;
      }
    }
    for (int i = 0; i < nq; ++i) {
      store(out[i] + c, acc[i][0] * scale[i]);
      store(out[i] + c + 8, acc[i][1] * scale[i]);
    }
  }
}

// rows[j] += Σ_i w_i[j] · x_i for j in [A, E) (rows [n, D]): each row chunk read and written once per tile.
template <int64_t D>
inline void rank_update(const float* const* w, const float* const* x, float* __restrict rows, int64_t A, int64_t E) {
  for (int64_t c = 0; c < D; c += 16) {
    v8 xs[QT][2];
    for (int i = 0; i < QT; ++i) {
      xs[i][0] = load(x[i] + c);
      xs[i][1] = load(x[i] + c + 8);
    }
    for (int64_t j = A; j < E; ++j) {
      v8 r0 = load(rows + j * D + c), r1 = load(rows + j * D + c + 8);
      for (int i = 0; i < QT; ++i) {
        r0 += w[i][j] * xs[i][0];
        r1 += w[i][j] * xs[i][1];
      }
      store(rows + j * D + c, r0);
      store(rows + j * D + c + 8, r1);
    }
  }
}

// Compacts the valid keys (and values) into kt [D, n16] transposed, and optionally vt [D, n16] and kc / vc [n, D].
template <int64_t D>
void gather_keys(const float* k, const float* v, const int64_t* idx, int64_t n, int64_t n16, int64_t k_stride,
                 float* kt, float* vt, float* kc, float* vc) {
  for (int64_t d = 0; d < D; ++d)
    for (int64_t j = n; j < n16; ++j) {
      kt[d * n16 + j] = 0.0f;
      if (vt) vt[d * n16 + j] = 0.0f;
    }
  for (int64_t j = 0; j < n; ++j)
    for (int64_t d = 0; d < D; ++d) {
      const float kv = k[idx[j] * k_stride + d], vv = v[idx[j] * k_stride + d];
      kt[d * n16 + j] = kv;
      if (vt) vt[d * n16 + j] = vv;
      if (kc) kc[j * D + d] = kv;
      if (vc) vc[j * D + d] = vv;
    }
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
  float* rows[QT];                                                     // QT × [n16]
  for (int i = 0; i < QT; ++i) rows[i] = vc + D * S + i * (S + 16);
  gather_keys<D>(k, v, idx, n, n16, k_stride, kt, nullptr, nullptr, vc);
  float mean[D] = {};   // the uniform average over all S keys, for a query that sees none (when first needed)
  bool have_mean = false;
  Tile tl;
  for (int64_t g = 0; g < G; ++g)
    for (int64_t t0 = 0; t0 < T; t0 += QT) {
      const int nq = T - t0 < QT ? static_cast<int>(T - t0) : QT;
      const float* x[QT];
      float* out[QT];
      for (int i = 0; i < QT; ++i) {
        const int64_t t = t0 + (i < nq ? i : nq - 1);
        x[i] = q + t * q_stride + g * D;
        out[i] = o + t * q_stride + g * D;
      }
      const bool any = tile_windows(before, lo, hi, t0, nq, S, tl);
      float inv[QT] = {};
      if (any) {
        scores<D>(x, kt, rows, n16, tl.A16, tl.E16, scale);
        for (int i = 0; i < QT; ++i) {
          if (!tl.seen[i]) {
            for (int64_t j = tl.A16; j < tl.E16; ++j) rows[i][j] = 0.0f;
            continue;
          }
          const float m = row_max(rows[i], tl.a[i], tl.e[i]);
          const float sum = exp_window(rows[i], tl.a[i], tl.e[i], tl.A16, tl.E16, m);
          inv[i] = 1.0f / sum;
          lse[g * T + t0 + i] = m + std::log(sum);
        }
        mix<D>(rows, vc, tl.A, tl.E, out, inv, nq);
      }
      for (int i = 0; i < nq; ++i) {
        if (tl.seen[i] && any) continue;
        if (!have_mean) {
          for (int64_t s = 0; s < S; ++s)
            for (int64_t d = 0; d < D; ++d) mean[d] += v[s * k_stride + d];
          for (int64_t d = 0; d < D; ++d) mean[d] = S ? mean[d] / static_cast<float>(S) : 0.0f;
          have_mean = true;
        }
        for (int64_t d = 0; d < D; ++d) out[i][d] = mean[d];
        lse[g * T + t0 + i] = 0.0f;
      }
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
  float* dkc = kc + D * S;           // [n, D] key gradients (unscaled)
  float* dvc = dkc + D * S;          // [n, D] value gradients
  float *p[QT], *ds[QT];             // QT × [n16] probabilities and their gradients
  for (int i = 0; i < QT; ++i) {
    p[i] = dvc + D * S + i * (S + 16);
    ds[i] = p[i] + QT * (S + 16);
  }
  gather_keys<D>(k, v, idx, n, n16, k_stride, kt, vt, kc, nullptr);
  for (int64_t j = 0; j < n * D; ++j) dkc[j] = dvc[j] = 0.0f;
  float unseen[D] = {};   // Σ dout over the queries that see no key: they average all S keys uniformly
  bool any_unseen = false;
  Tile tl;
  for (int64_t g = 0; g < G; ++g)
    for (int64_t t0 = 0; t0 < T; t0 += QT) {
      const int nq = T - t0 < QT ? static_cast<int>(T - t0) : QT;
      const float *qt[QT], *gt[QT];
      float* dqt[QT];
      float di[QT] = {}, sc[QT];
      for (int i = 0; i < QT; ++i) {
        const int64_t t = t0 + (i < nq ? i : nq - 1);
        qt[i] = q + t * q_stride + g * D;
        gt[i] = dout + t * q_stride + g * D;
        dqt[i] = dq + t * q_stride + g * D;
        sc[i] = scale;
        for (int64_t d = 0; d < D; ++d) di[i] += gt[i][d] * o[t * q_stride + g * D + d];
      }
      const bool any = tile_windows(before, lo, hi, t0, nq, S, tl);
      for (int i = 0; i < nq; ++i)
        if (!(any && tl.seen[i])) {
          for (int64_t d = 0; d < D; ++d) {
            unseen[d] += gt[i][d];
            dqt[i][d] = 0.0f;
          }
          any_unseen = true;
        }
      if (!any) continue;
      scores<D>(qt, kt, p, n16, tl.A16, tl.E16, scale);
      scores<D>(gt, vt, ds, n16, tl.A16, tl.E16, 1.0f);    // dP = dout · Vᵀ
      for (int i = 0; i < QT; ++i) {
        if (!tl.seen[i]) {   // no key seen (or a repeat of the last query): contributes nothing below
          for (int64_t j = tl.A16; j < tl.E16; ++j) p[i][j] = ds[i][j] = 0.0f;
          continue;
        }
        exp_window(p[i], tl.a[i], tl.e[i], tl.A16, tl.E16, lse[g * T + t0 + i]);
        for (int64_t j = tl.A; j < tl.E; ++j) ds[i][j] = p[i][j] * (ds[i][j] - di[i]);
      }
      mix<D>(ds, kc, tl.A, tl.E, dqt, sc, nq);    // dQ = scale · dS · K (zero rows for queries that see nothing)
      for (int i = 0; i < nq; ++i)
        if (!tl.seen[i])
          for (int64_t d = 0; d < D; ++d) dqt[i][d] = 0.0f;
      rank_update<D>(p, gt, dvc, tl.A, tl.E);     // dV += Pᵀ · dout
      rank_update<D>(ds, qt, dkc, tl.A, tl.E);    // dK += dSᵀ · Q (scaled below)
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

// Where a cached row's positions live: one run of `len` rows `k_stride` floats apart (a slot of the contiguous
// cache), or (pages) blocks of P positions, position s in block pages[s / P] at offset s % P (the paged cache; an id
// outside [0, blocks) reads the last block, as XLA's clipped gather does — only unwritten positions have one).
struct Positions {
  const int32_t* pages;  // null: contiguous
  int64_t P, blocks, k_stride;
  int64_t offset(int64_t s) const {  // of position s's row, in floats from the cache's (or block 0's) start
    if (!pages) return s * k_stride;
    int64_t id = pages[s / P];
    id = id < 0 ? 0 : (id >= blocks ? blocks - 1 : id);
    return (id * P + s % P) * k_stride;
  }
  // out[j] = base + offset(s + j) for j < n, positions that stay within one aligned group of 8 (s a multiple of 8 and
  // n <= 8, or s even and n = 2): one block lookup for all of them when the layout keeps such a group in one run
  // (contiguous, or blocks of a multiple of 8 positions), else one each.
  void rows(int64_t s, int64_t n, const float* base, const float** out) const {
    if (!pages || P % 8 == 0) {
      const float* r = base + offset(s);
      for (int64_t j = 0; j < n; ++j) out[j] = r + j * k_stride;
    } else {
      for (int64_t j = 0; j < n; ++j) out[j] = base + offset(s + j);
    }
  }
};

// The sums of eight vectors, lane j = Σ a[j]: a transpose by shuffles and adds (three rounds), so eight keys' dot
// products reduce together instead of each through a chain of scalar adds.
inline v8 sum8(const v8* a) {
  v8 h[4], q[2];
  for (int i = 0; i < 4; ++i)   // h[i]: lanes 0-3 halves of a[2i], lanes 4-7 of a[2i+1]
    h[i] = __builtin_shufflevector(a[2 * i], a[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11) +
           __builtin_shufflevector(a[2 * i], a[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15);
  for (int i = 0; i < 2; ++i)   // q[i]: quarters of a[4i], a[4i+2], a[4i+1], a[4i+3], two lanes each
    q[i] = __builtin_shufflevector(h[2 * i], h[2 * i + 1], 0, 1, 8, 9, 4, 5, 12, 13) +
           __builtin_shufflevector(h[2 * i], h[2 * i + 1], 2, 3, 10, 11, 6, 7, 14, 15);
  // lanes of r: a0, a2, a4, a6, a1, a3, a5, a7
  const v8 r = __builtin_shufflevector(q[0], q[1], 0, 2, 8, 10, 4, 6, 12, 14) +
               __builtin_shufflevector(q[0], q[1], 1, 3, 9, 11, 5, 7, 13, 15);
  return __builtin_shufflevector(r, r, 0, 4, 1, 5, 2, 6, 3, 7);
}

// Cached rows are read one head's slice at a time, K·D floats apart: a stride the hardware prefetchers follow
// poorly, so the positions kAhead ahead are requested explicitly (contiguous rows only: a paged row's position
// costs a block lookup, and its blocks are short runs anyway).
constexpr int64_t kAhead = 16;
template <int64_t D>
inline void fetch(const float* p) {
  for (int64_t c = 0; c < D; c += 16) __builtin_prefetch(p + c, 0, 3);
}

// row[0, L8) ← exp(row − its max) over positions [0, len), the rest masked first → their sum (exp8 floors at
// exp(−87), not 0, so the masked tail's values are taken back out of it).
inline float softmax_row(float* row, int64_t len, int64_t L8) {
  for (int64_t s = len; s < L8; ++s) row[s] = -1e30f;
  v8 top = load(row);
  for (int64_t s = 8; s < L8; s += 8) top = top > load(row + s) ? top : load(row + s);
  const float shift = row_max(reinterpret_cast<const float*>(&top), 0, 8);
  v8 total = {};
  for (int64_t s = 0; s < L8; s += 8) {
    const v8 p = exp8(load(row + s) - shift);
    store(row + s, p);
    total += p;
  }
  for (int64_t s = len; s < L8; ++s) total[s % 8] -= row[s];
  return hsum(total);
}

// One decode token's query group (G heads, q [G, D]) against `len` cached keys / values (read in place
// from the cache where `at` says) → o [G, D]. One query per head leaves no tile of queries to share a key load (the
// forward above pads its tile of 8 and transposes every key first): per head, a pass of dot products over the keys,
// eight keys at a time (their sums reduced together: sum8), an exact softmax, a pass of the values with two
// accumulator sets (even and odd keys, so consecutive adds do not wait on each other); the G passes re-read the rows
// from L1 / L2. scratch: G · round_up(len, 8) floats.
template <int64_t D>
void decode(const float* q, const float* k, const float* v, float* o, int64_t len, int64_t G, const Positions& at,
            float scale, float* scratch) {
  static_assert(D % 16 == 0, "head dims are multiples of 16");
  const int64_t L8 = (len + 7) / 8 * 8;
  for (int64_t g = 0; g < G; ++g) {
    float* row = scratch + g * L8;
    v8 qs[D / 8];
    for (int64_t c = 0; c < D / 8; ++c) qs[c] = load(q + g * D + 8 * c) * scale;
    auto dot = [&](const float* kr) {
      v8 acc = qs[0] * load(kr);
      for (int64_t c = 1; c < D / 8; ++c) acc += qs[c] * load(kr + 8 * c);
      return acc;
    };
    int64_t s = 0;
    for (; s + 8 <= len; s += 8) {
      v8 acc[8];
      if (!at.pages && s + kAhead + 8 <= len)
        for (int j = 0; j < 8; ++j) fetch<D>(k + at.offset(s + kAhead + j));
      const float* kr[8];
      at.rows(s, 8, k, kr);
      for (int j = 0; j < 8; ++j) acc[j] = dot(kr[j]);
      store(row + s, sum8(acc));
    }
    for (; s < len; ++s) row[s] = hsum(dot(k + at.offset(s)));
    const float inv = 1.0f / softmax_row(row, len, L8);
    v8 even[D / 8] = {}, odd[D / 8] = {};
    for (s = 0; s + 2 <= len; s += 2) {
      const float* vp[2];
      at.rows(s, 2, v, vp);
      const float *v0 = vp[0], *v1 = vp[1];
      if (!at.pages && s + kAhead + 2 <= len) {
        fetch<D>(v + at.offset(s + kAhead));
        fetch<D>(v + at.offset(s + kAhead + 1));
      }
      const float p0 = row[s], p1 = row[s + 1];
      for (int64_t c = 0; c < D / 8; ++c) {
        even[c] += p0 * load(v0 + 8 * c);
        odd[c] += p1 * load(v1 + 8 * c);
      }
    }
    if (s < len) {
      const float* vr = v + at.offset(s);
      for (int64_t c = 0; c < D / 8; ++c) even[c] += row[s] * load(vr + 8 * c);
    }
    for (int64_t c = 0; c < D / 8; ++c) store(o + g * D + 8 * c, (even[c] + odd[c]) * inv);
  }
}

// A run of m queries in one cached row (the columns of a prompt's piece riding in a decode step, or an extend's
// tokens, column i seeing positions [0, lens[i])), G heads each, against the row's keys and values read in place
// (where `at` says) → o. Query rows r = i·G + g (at q + i·q_stride + g·D; o likewise) go in groups of up to kRunRows.
// One query per head leaves no tile of queries to share a transposed key (the forward above pads its tile of 8 and
// transposes every key first); instead each group makes one pass of dot products over the keys, eight keys at a
// time, each key loaded once from memory and reused from L1 by every query row of the group (a row's eight sums
// reduced together: sum8), an exact softmax per query row, then one pass of the values the same way. A query row
// that sees no position gives zeros. scratch: kRunRows · (round_up(max lens, 8) + D) floats.

template <int64_t D>
void decode_run(const float* q, int64_t q_stride, const int64_t* lens, int64_t m, int64_t G, const float* k,
                const float* v, float* o, const Positions& at, float scale, float* scratch) {
  static_assert(D % 16 == 0, "head dims are multiples of 16");
  constexpr int64_t C = D / 8;
  for (int64_t r0 = 0; r0 < m * G; r0 += kRunRows) {
    const int64_t R = m * G - r0 < kRunRows ? m * G - r0 : kRunRows;
    int64_t len[kRunRows], top = 0;
    const float* qr[kRunRows];
    float* orow[kRunRows];
    for (int64_t r = 0; r < R; ++r) {
      const int64_t i = (r0 + r) / G, g = (r0 + r) % G;
      len[r] = lens[i] > 0 ? lens[i] : 0;
      top = len[r] > top ? len[r] : top;
      qr[r] = q + i * q_stride + g * D;
      orow[r] = o + i * q_stride + g * D;
    }
    if (top == 0) {
      for (int64_t r = 0; r < R; ++r)
        for (int64_t c = 0; c < D; ++c) orow[r][c] = 0.0f;
      continue;
    }
    const int64_t L8 = (top + 7) / 8 * 8;
    float* const score = scratch;                  // [R, L8]
    float* const acc = scratch + kRunRows * L8;     // [R, D]
    // scores: query row r's dot products with keys [0, top)
    int64_t s = 0;
    for (; s + 8 <= top; s += 8) {
      if (!at.pages && s + kAhead + 8 <= top)
        for (int j = 0; j < 8; ++j) fetch<D>(k + at.offset(s + kAhead + j));
      const float* kr[8];
      at.rows(s, 8, k, kr);
      for (int64_t r = 0; r < R; ++r) {
        v8 qs[C], a[8];
        for (int64_t c = 0; c < C; ++c) qs[c] = load(qr[r] + 8 * c);
        for (int j = 0; j < 8; ++j) {
          a[j] = qs[0] * load(kr[j]);
          for (int64_t c = 1; c < C; ++c) a[j] += qs[c] * load(kr[j] + 8 * c);
        }
        store(score + r * L8 + s, sum8(a) * scale);
      }
    }
    for (; s < top; ++s) {
      const float* kr = k + at.offset(s);
      for (int64_t r = 0; r < R; ++r) {
        v8 a = load(qr[r]) * load(kr);
        for (int64_t c = 1; c < C; ++c) a += load(qr[r] + 8 * c) * load(kr + 8 * c);
        score[r * L8 + s] = hsum(a) * scale;
      }
    }
    // an exact softmax per query row over its own positions [0, len)
    float inv[kRunRows];
    for (int64_t r = 0; r < R; ++r) {
      const float total = softmax_row(score + r * L8, len[r], L8);
      inv[r] = len[r] ? 1.0f / total : 0.0f;
      for (int64_t c = 0; c < D; ++c) acc[r * D + c] = 0.0f;
    }
    // values: query row r adds p · v over its own positions, eight positions per visit (two accumulator sets, so
    // consecutive adds do not wait on each other)
    for (s = 0; s < top; s += 8) {
      const int64_t n = top - s < 8 ? top - s : 8;
      if (!at.pages && s + kAhead + 8 <= top)
        for (int j = 0; j < 8; ++j) fetch<D>(v + at.offset(s + kAhead + j));
      const float* vr[8];
      at.rows(s, n, v, vr);
      for (int64_t r = 0; r < R; ++r) {
        const int64_t nr = len[r] - s < n ? (len[r] - s > 0 ? len[r] - s : 0) : n;
        const float* p = score + r * L8 + s;
        v8 even[C], odd[C] = {};
        for (int64_t c = 0; c < C; ++c) even[c] = load(acc + r * D + 8 * c);
        int64_t j = 0;
        for (; j + 2 <= nr; j += 2)
          for (int64_t c = 0; c < C; ++c) {
            even[c] += p[j] * load(vr[j] + 8 * c);
            odd[c] += p[j + 1] * load(vr[j + 1] + 8 * c);
          }
        if (j < nr)
          for (int64_t c = 0; c < C; ++c) even[c] += p[j] * load(vr[j] + 8 * c);
        for (int64_t c = 0; c < C; ++c) store(acc + r * D + 8 * c, even[c] + odd[c]);
      }
    }
    for (int64_t r = 0; r < R; ++r)
      for (int64_t c = 0; c < C; ++c) store(orow[r] + 8 * c, load(acc + r * D + 8 * c) * inv[r]);
  }
}

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

// A run of m decode queries in one cached row (decode above for one, decode_run for more): positions k_stride floats
// apart, or with `pages` (not null) in blocks of P positions (`blocks` of them); false: no body for D.
extern "C" bool FS_NAME(fastserve_decode_attention)(const float* q, int64_t q_stride, const int64_t* lens, int64_t m,
                                                    int64_t G, int64_t D, const float* k, const float* v, float* o,
                                                    int64_t k_stride, const int32_t* pages, int64_t P, int64_t blocks,
                                                    float scale, float* scratch) {
  const Positions at{pages, P, blocks, k_stride};
  // one token on a short row: its G heads' passes, each keeping its sums in registers, beat decode_run's shared key
  // loads (8 rows of 100 positions, quickstart heads: 35 against 48 µs, hot in cache); on a long row decode_run's
  // single pass over memory wins (one 2,000-position row among 7 short, 4 layers, caches not hot: 0.40 against
  // 0.45 ms a step: experiments/decode_attention_step.py; 2 cores of an Intel Xeon)
#define FS_CASE(d)                                                                      \
  case d:                                                                               \
    if (m == 1 && lens[0] < kLongRow)                                                   \
      decode<d>(q, k, v, o, lens[0], G, at, scale, scratch);                            \
    else                                                                                \
      decode_run<d>(q, q_stride, lens, m, G, k, v, o, at, scale, scratch);              \
    return true;
  switch (D) { FS_HEAD_DIMS(FS_CASE) }
#undef FS_CASE
  return false;
}
