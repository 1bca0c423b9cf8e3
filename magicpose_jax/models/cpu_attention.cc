// Fused multi-head attention forward for XLA:CPU, called from JAX through `jax.ffi`.
//
//   out[..., i, h, :] = sum_j softmax_j(q[..., i, h, :] . k[..., j, h, :]) v[..., j, h, :]
//   lse[..., h, i]    = log sum_j exp(q[..., i, h, :] . k[..., j, h, :])
//
// q: [..., Nq, H, D], k and v: [..., Nk, H, D], float32, the scale already applied to q
// (magicpose_jax/models/attention.py does that, as its `xla` backend does). The leading
// dimensions are one flattened batch. Built and loaded by magicpose_jax/models/cpu_attention.py.
//
// Why: XLA:CPU runs attention as separate matmul, exp and reduction ops over [rows, Nk]
// logits blocks, each parallelised (or not) on its own; PyTorch's CPU flash kernel fuses them
// and was ~1.7x faster at SD's 4096-token layers on 2 cores. Here one task computes a block
// of kQueryBlock query rows of one head from start to end: logits for all keys (kept in this
// thread's cache), softmax statistics, exp in place, the product with V and the
// normalisation, with register-blocked FMA micro-kernels written with GCC vector extensions
// (16-lane AVX-512 vectors where -march=native has them, else 8 lanes). Tasks run on XLA's
// intra-op thread pool.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

#if defined(__AVX512F__)
constexpr int kLanes = 16, kRegisters = 32;
#else
constexpr int kLanes = 8, kRegisters = 16;  // AVX2's ymm; GCC splits the vectors on narrower ISAs
#endif
typedef float vf __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(kLanes * sizeof(int32_t))));

// Query rows per task: a multiple of every micro-kernel's row count (6 for q.k; 8, 6, 4, 2 for p.v).
constexpr int kQueryBlock = 48;
// Keys per panel of the packed K: the q.k micro-kernel produces 6 x 2 vectors of logits at a time.
constexpr int kKeyPanel = 2 * kLanes;
constexpr int kQkRows = 6;
// Keys per step of the p.v product: its slice of P and V stays in L1/L2 across row groups.
constexpr int kValueTile = 512;
// Widest p.v column panel, in vectors.
constexpr int kMaxPanel = 5;

// Rows of the p.v micro-kernel for NV accumulator vectors per row: as many as the registers
// hold next to the NV loaded values of V and one broadcast of P.
constexpr int PvRowsFor(int nv) {
  for (int r : {8, 6, 4, 3, 2}) {
    if (r * nv + nv + 1 <= kRegisters && kQueryBlock % r == 0) return r;
  }
  return 1;
}

inline vf Load(const float* p) {
  vf x;
  std::memcpy(&x, p, sizeof(vf));
  return x;
}

inline void Store(float* p, vf x) { std::memcpy(p, &x, sizeof(vf)); }

inline vf Splat(float s) { return vf{} + s; }

inline float ReduceMax(vf x) {
  float m = x[0];
  for (int i = 1; i < kLanes; ++i) m = std::max(m, x[i]);
  return m;
}

inline float ReduceSum(vf x) {
  float s = 0.0f;
  for (int i = 0; i < kLanes; ++i) s += x[i];
  return s;
}

// exp(x) to ~2 ulp (Cephes expf: round x/ln2 to n, a degree-6 polynomial on the remainder,
// 2^n by exponent arithmetic); exactly 0 below -87 (softmax inputs are <= 0 after the max).
inline vf Exp(vf x) {
  const vf lo = Splat(-87.0f), magic = Splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const vf xc = x < lo ? lo : x;
  const vf t = xc * Splat(1.44269504088896341f) + magic;
  const vf n = t - magic;
  const vi ni = (vi)t - (vi)magic;  // vector casts reinterpret the bits
  vf r = xc - n * Splat(0.693359375f);
  r = r - n * Splat(-2.12194440e-4f);
  vf p = Splat(1.9875691500e-4f);
  p = p * r + Splat(1.3981999507e-3f);
  p = p * r + Splat(8.3334519073e-3f);
  p = p * r + Splat(4.1665795894e-2f);
  p = p * r + Splat(1.6666665459e-1f);
  p = p * r + Splat(5.0000001201e-1f);
  const vf y = p * (r * r) + r + Splat(1.0f);
  const vf e = (vf)((vi)y + (ni << 23));
  return x < lo ? vf{} : e;
}

// s[r][0:P] = sum_d q[r][d] * kp[d][0:P] for R rows, P = kKeyPanel: q is [R, dim] packed, kp one [dim, P] panel.
template <int R>
inline void QkPanel(const float* q, int dim, const float* kp, float* s, int64_t lds) {
  vf a0[R], a1[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) a0[r] = a1[r] = vf{};
  for (int d = 0; d < dim; ++d) {
    const vf k0 = Load(kp + d * kKeyPanel), k1 = Load(kp + d * kKeyPanel + kLanes);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const float qd = q[r * dim + d];
      a0[r] += qd * k0;
      a1[r] += qd * k1;
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    Store(s + r * lds, a0[r]);
    Store(s + r * lds + kLanes, a1[r]);
  }
}

// o[r][0 : NV lanes] += sum_{j < nj} p[r][j] * v[j][0 : NV lanes] for R rows.
template <int R, int NV>
inline void PvRows(const float* p, int64_t ldp, const float* v, int ldv, int nj, float* o, int ldo) {
  vf acc[R][NV];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
    for (int c = 0; c < NV; ++c) acc[r][c] = Load(o + r * ldo + c * kLanes);
  }
  for (int j = 0; j < nj; ++j) {
    vf vj[NV];
#pragma GCC unroll 8
    for (int c = 0; c < NV; ++c) vj[c] = Load(v + static_cast<int64_t>(j) * ldv + c * kLanes);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const float pr = p[r * ldp + j];
#pragma GCC unroll 8
      for (int c = 0; c < NV; ++c) acc[r][c] += pr * vj[c];
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
    for (int c = 0; c < NV; ++c) Store(o + r * ldo + c * kLanes, acc[r][c]);
  }
}

// One column panel of NV vectors over all kQueryBlock rows, PvRowsFor(NV) rows at a time.
template <int NV>
void PvPanel(const float* p, int64_t ldp, const float* v, int ldv, int nj, float* o, int ldo) {
  constexpr int R = PvRowsFor(NV);
  static_assert(kQueryBlock % R == 0, "row groups must tile the query block");
  for (int r = 0; r < kQueryBlock; r += R) PvRows<R, NV>(p + r * ldp, ldp, v, ldv, nj, o + r * ldo, ldo);
}

void PvBlock(const float* p, int64_t ldp, const float* v, int dp, int nj, float* o) {
  for (int c = 0; c < dp; c += kMaxPanel * kLanes) {
    switch (std::min(kMaxPanel, (dp - c) / kLanes)) {
      case 1: PvPanel<1>(p, ldp, v + c, dp, nj, o + c, dp); break;
      case 2: PvPanel<2>(p, ldp, v + c, dp, nj, o + c, dp); break;
      case 3: PvPanel<3>(p, ldp, v + c, dp, nj, o + c, dp); break;
      case 4: PvPanel<4>(p, ldp, v + c, dp, nj, o + c, dp); break;
      default: PvPanel<5>(p, ldp, v + c, dp, nj, o + c, dp); break;
    }
  }
}

struct Shape {
  int64_t batch, nq, nk, heads, dim;
  int64_t nk_pad;  // keys rounded up to kKeyPanel (zero keys, masked out of the softmax)
  int64_t dp;      // head dim rounded up to kLanes (zero columns of the packed V)
  int64_t KPackSize() const { return nk_pad * dim; }
  int64_t VPackSize() const { return nk_pad * dp; }
};

// k [B, Nk, H, D] of head (b, h) -> kp [Nk_pad / P][D][P], P = kKeyPanel: each q.k panel is contiguous.
void PackK(const Shape& s, const float* k, int64_t b, int64_t h, float* kp) {
  for (int64_t j = 0; j < s.nk_pad; ++j) {
    float* dst = kp + (j / kKeyPanel) * s.dim * kKeyPanel + j % kKeyPanel;
    const float* src = k + ((b * s.nk + j) * s.heads + h) * s.dim;
    for (int64_t d = 0; d < s.dim; ++d) dst[d * kKeyPanel] = j < s.nk ? src[d] : 0.0f;
  }
}

// v [B, Nk, H, D] of head (b, h) -> vp [Nk_pad][Dp], zero-padded.
void PackV(const Shape& s, const float* v, int64_t b, int64_t h, float* vp) {
  for (int64_t j = 0; j < s.nk_pad; ++j) {
    float* dst = vp + j * s.dp;
    std::fill(dst, dst + s.dp, 0.0f);
    if (j < s.nk) std::memcpy(dst, v + ((b * s.nk + j) * s.heads + h) * s.dim, s.dim * sizeof(float));
  }
}

// Per-thread buffers, reused across calls: logits/probabilities [kQueryBlock, Nk_pad],
// packed queries [kQueryBlock, D] and output accumulators [kQueryBlock, Dp].
struct Scratch {
  std::vector<float> s, q, o;
};

void QueryBlock(const Shape& sh, const float* q, const float* kp, const float* vp, int64_t b, int64_t h,
                int64_t q0, float* out, float* lse) {
  thread_local Scratch scratch;
  const int64_t rows = std::min<int64_t>(kQueryBlock, sh.nq - q0);
  const int dim = static_cast<int>(sh.dim), dp = static_cast<int>(sh.dp);
  scratch.s.resize(kQueryBlock * sh.nk_pad);
  scratch.q.assign(kQueryBlock * sh.dim, 0.0f);
  scratch.o.assign(kQueryBlock * sh.dp, 0.0f);
  float* s = scratch.s.data();
  float* qb = scratch.q.data();
  float* o = scratch.o.data();
  for (int64_t r = 0; r < rows; ++r) {
    std::memcpy(qb + r * dim, q + ((b * sh.nq + q0 + r) * sh.heads + h) * dim, dim * sizeof(float));
  }

  // Logits, one key panel at a time across all row groups (the panel stays in L1).
  for (int64_t pn = 0; pn < sh.nk_pad / kKeyPanel; ++pn) {
    const float* panel = kp + pn * dim * kKeyPanel;
    for (int r = 0; r < kQueryBlock; r += kQkRows) {
      QkPanel<kQkRows>(qb + r * dim, dim, panel, s + r * sh.nk_pad + pn * kKeyPanel, sh.nk_pad);
    }
  }

  // Softmax statistics; probabilities (unnormalised) in place.
  float row_max[kQueryBlock], row_sum[kQueryBlock];
  const float neg_inf = -std::numeric_limits<float>::infinity();
  for (int r = 0; r < kQueryBlock; ++r) {
    float* sr = s + r * sh.nk_pad;
    std::fill(sr + sh.nk, sr + sh.nk_pad, neg_inf);
    vf m = Splat(neg_inf);
    for (int64_t j = 0; j < sh.nk_pad; j += kLanes) {
      const vf x = Load(sr + j);
      m = x > m ? x : m;
    }
    const float mr = ReduceMax(m);
    const vf mv = Splat(mr);
    vf acc = vf{};
    for (int64_t j = 0; j < sh.nk_pad; j += kLanes) {
      const vf e = Exp(Load(sr + j) - mv);
      Store(sr + j, e);
      acc += e;
    }
    row_max[r] = mr;
    row_sum[r] = ReduceSum(acc);
  }

  // p.v over key tiles: each tile of P and V is reused by every row group.
  for (int64_t j0 = 0; j0 < sh.nk_pad; j0 += kValueTile) {
    const int nj = static_cast<int>(std::min<int64_t>(kValueTile, sh.nk_pad - j0));
    PvBlock(s + j0, sh.nk_pad, vp + j0 * dp, dp, nj, o);
  }

  for (int64_t r = 0; r < rows; ++r) {
    const float inv = 1.0f / row_sum[r];
    float* dst = out + ((b * sh.nq + q0 + r) * sh.heads + h) * dim;
    for (int d = 0; d < dim; ++d) dst[d] = o[r * dp + d] * inv;
    lse[(b * sh.heads + h) * sh.nq + q0 + r] = row_max[r] + std::log(row_sum[r]);
  }
}

// Runs fn(0..n-1) on the calling thread and up to num_threads - 1 pool tasks. Items are claimed
// from an atomic counter, so a task the pool starts late finds nothing left and returns
// without touching fn; the caller waits only for items already claimed.
template <typename F>
void ParallelFor(ffi::ThreadPool& pool, int64_t n, const F& fn) {
  struct State {
    std::atomic<int64_t> next{0}, done{0};
    std::mutex mu;
    std::condition_variable cv;
  };
  auto state = std::make_shared<State>();
  const F* f = &fn;
  auto worker = [state, n, f]() {
    for (int64_t i; (i = state->next.fetch_add(1)) < n;) {
      (*f)(i);
      if (state->done.fetch_add(1) + 1 == n) {
        std::lock_guard<std::mutex> lock(state->mu);
        state->cv.notify_all();
      }
    }
  };
  const int64_t tasks = std::min<int64_t>(pool.num_threads(), n) - 1;
  for (int64_t t = 0; t < tasks; ++t) pool.Schedule(decltype(worker)(worker));  // a copy: Schedule takes it by value
  worker();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done.load() == n; });
}

ffi::Error AttentionForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                            ffi::Buffer<ffi::F32> v, ffi::ResultBuffer<ffi::F32> out,
                            ffi::ResultBuffer<ffi::F32> lse) {
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  const size_t rank = qd.size();
  if (rank < 3 || kd.size() != rank || vd.size() != rank) {
    return ffi::Error::InvalidArgument("attention: q, k, v must be [..., N, H, D] of one rank >= 3");
  }
  Shape s{1, qd[rank - 3], kd[rank - 3], qd[rank - 2], qd[rank - 1], 0, 0};
  for (size_t i = 0; i + 3 < rank; ++i) {
    if (kd[i] != qd[i] || vd[i] != qd[i]) {
      return ffi::Error::InvalidArgument("attention: q, k, v leading (batch) dimensions differ");
    }
    s.batch *= qd[i];
  }
  for (size_t i = rank - 3; i < rank; ++i) {
    if (vd[i] != kd[i]) return ffi::Error::InvalidArgument("attention: k and v shapes differ");
  }
  if (kd[rank - 2] != s.heads || kd[rank - 1] != s.dim) {
    return ffi::Error::InvalidArgument("attention: q and k heads or head dims differ");
  }
  if (s.nk == 0) return ffi::Error::InvalidArgument("attention: no keys");
  s.nk_pad = (s.nk + kKeyPanel - 1) / kKeyPanel * kKeyPanel;
  s.dp = (s.dim + kLanes - 1) / kLanes * kLanes;
  if (s.batch * s.nq * s.heads == 0) return ffi::Error::Success();

  const int64_t heads = s.batch * s.heads, per_head = s.KPackSize() + s.VPackSize();
  std::unique_ptr<float[]> packed(new float[heads * per_head]);
  const float* qp = q.typed_data();
  const float* kptr = k.typed_data();
  const float* vptr = v.typed_data();
  float* packed_ptr = packed.get();
  ParallelFor(pool, heads, [&](int64_t bh) {
    float* base = packed_ptr + bh * per_head;
    PackK(s, kptr, bh / s.heads, bh % s.heads, base);
    PackV(s, vptr, bh / s.heads, bh % s.heads, base + s.KPackSize());
  });

  // Tasks ordered (batch, head, query block): the threads share one head's packed K and V.
  const int64_t blocks = (s.nq + kQueryBlock - 1) / kQueryBlock;
  float* op = out->typed_data();
  float* lp = lse->typed_data();
  ParallelFor(pool, heads * blocks, [&](int64_t i) {
    const int64_t bh = i / blocks;
    const float* base = packed_ptr + bh * per_head;
    QueryBlock(s, qp, base, base + s.KPackSize(), bh / s.heads, bh % s.heads, (i % blocks) * kQueryBlock, op, lp);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MagicposeAttentionForward, AttentionForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // q [..., Nq, H, D], scaled
                                  .Arg<ffi::Buffer<ffi::F32>>()   // k [..., Nk, H, D]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // v [..., Nk, H, D]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // out [..., Nq, H, D]
                                  .Ret<ffi::Buffer<ffi::F32>>()); // lse [..., H, Nq]
