// Float32 matrix product for XLA:CPU, called from JAX through `jax.ffi`:
//
//   c[M, N] = a[M, K] . b[K, N]      (row-major, float32)
//
// Built by magicpose_jax/models/cpu_kernels.py, called from cpu_matmul.py (models/matmul.py picks it for
// the Dense layers and im2col convolutions of a model on CPU).
//
// Why: XLA:CPU (jaxlib 0.10) runs these dots through YNNPACK, whose 2-thread speed on SD's linear-layer
// shapes measured 1.3-1.5x PyTorch's (MKL) time while its one-thread speed matched this kernel's:
// benchmarks/matmul.py. Here the product is split into tasks of kRowBlock rows x kColBlock columns,
// claimed by the threads of XLA's intra-op pool. A task walks K in blocks of at most kDepth: it packs
// its [depth, kColBlock] slice of b into kPanel-column panels (one panel of depth rows fits L1), then,
// panel by panel, runs the register-blocked micro-kernel over its rows, kRows at a time, reading a in
// place (each row's depth slice stays in L2 across the task's panels).

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_kernels.h"

namespace {

using namespace magicpose;  // NOLINT: the shared vector type and helpers

// Columns per micro-kernel panel: 2 vectors.
constexpr int kPanel = 2 * kLanes;
// Rows per micro-kernel: 2 * kRows accumulators + 2 loaded values of b + 1 broadcast of a fit the registers.
constexpr int kRows = kRegisters == 32 ? 12 : 6;
// K per block: a [kDepth, kPanel] panel of b is 32 KiB (AVX-512), within L1 next to the rows of a.
constexpr int kDepth = 256;
constexpr int kColBlock = 4 * kPanel;
constexpr int kRowBlock = 384 / kRows * kRows;

// c[r][0:kPanel] (+)= sum_k a[r * lda + k] * bp[k][0:kPanel] for R rows; accumulate adds to c.
template <int R>
inline void Micro(const float* a, int64_t lda, const float* bp, int depth, float* c, int64_t ldc, bool accumulate) {
  vf c0[R], c1[R];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    c0[r] = accumulate ? Load(c + r * ldc) : vf{};
    c1[r] = accumulate ? Load(c + r * ldc + kLanes) : vf{};
  }
  for (int k = 0; k < depth; ++k) {
    const vf b0 = Load(bp + k * kPanel), b1 = Load(bp + k * kPanel + kLanes);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const float s = a[r * lda + k];
      c0[r] += s * b0;
      c1[r] += s * b1;
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    Store(c + r * ldc, c0[r]);
    Store(c + r * ldc + kLanes, c1[r]);
  }
}

// Micro on `cols` < kPanel columns of c, through a full-width tile (the packed panel is zero-padded).
template <int R>
void MicroEdge(const float* a, int64_t lda, const float* bp, int depth, float* c, int64_t ldc, bool accumulate,
               int cols) {
  float tile[R * kPanel];
  if (accumulate) {
    for (int r = 0; r < R; ++r) std::memcpy(tile + r * kPanel, c + r * ldc, cols * sizeof(float));
  }
  Micro<R>(a, lda, bp, depth, tile, kPanel, accumulate);
  for (int r = 0; r < R; ++r) std::memcpy(c + r * ldc, tile + r * kPanel, cols * sizeof(float));
}

template <int R>
void Panel(const float* a, int64_t lda, const float* bp, int depth, float* c, int64_t ldc, bool accumulate,
           int cols) {
  if (cols == kPanel) {
    Micro<R>(a, lda, bp, depth, c, ldc, accumulate);
  } else {
    MicroEdge<R>(a, lda, bp, depth, c, ldc, accumulate, cols);
  }
}

// Panel for the last `rows` < kRows rows of a block too.
void PanelRows(int rows, const float* a, int64_t lda, const float* bp, int depth, float* c, int64_t ldc,
               bool accumulate, int cols) {
  switch (rows) {
#define MAGICPOSE_ROWS(n) \
  case n:                 \
    Panel<n>(a, lda, bp, depth, c, ldc, accumulate, cols); \
    break;
    MAGICPOSE_ROWS(1) MAGICPOSE_ROWS(2) MAGICPOSE_ROWS(3) MAGICPOSE_ROWS(4) MAGICPOSE_ROWS(5) MAGICPOSE_ROWS(6)
    MAGICPOSE_ROWS(7) MAGICPOSE_ROWS(8) MAGICPOSE_ROWS(9) MAGICPOSE_ROWS(10) MAGICPOSE_ROWS(11) MAGICPOSE_ROWS(12)
#undef MAGICPOSE_ROWS
  }
}
static_assert(kRows <= 12, "PanelRows instantiates up to 12 rows");

// b [K, N], rows k0 .. k0 + depth, columns n0 .. n0 + cols -> bp [panels][depth][kPanel], zero-padded.
void PackB(const float* b, int64_t n, int64_t k0, int depth, int64_t n0, int cols, float* bp) {
  for (int p = 0; p * kPanel < cols; ++p) {
    const int width = std::min(kPanel, cols - p * kPanel);
    float* dst = bp + static_cast<int64_t>(p) * depth * kPanel;
    for (int k = 0; k < depth; ++k) {
      const float* src = b + (k0 + k) * n + n0 + p * kPanel;
      if (width == kPanel) {  // two vector moves, not a memcpy call per row
        Store(dst + k * kPanel, Load(src));
        Store(dst + k * kPanel + kLanes, Load(src + kLanes));
      } else {
        std::memcpy(dst + k * kPanel, src, width * sizeof(float));
        std::fill(dst + k * kPanel + width, dst + (k + 1) * kPanel, 0.0f);
      }
    }
  }
}

ffi::Error Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                  ffi::ResultBuffer<ffi::F32> c) {
  const auto ad = a.dimensions(), bd = b.dimensions();
  if (ad.size() != 2 || bd.size() != 2 || ad[1] != bd[0]) {
    return ffi::Error::InvalidArgument("matmul: a must be [M, K] and b [K, N]");
  }
  const int64_t m = ad[0], k = ad[1], n = bd[1];
  const float* ap = a.typed_data();
  const float* bptr = b.typed_data();
  float* cp = c->typed_data();
  if (m == 0 || n == 0) return ffi::Error::Success();
  if (k == 0) {
    std::fill(cp, cp + m * n, 0.0f);
    return ffi::Error::Success();
  }
  // K in equal blocks of at most kDepth (320 -> 2 x 160, not 256 + 64: a short block costs a pass over c).
  const int64_t kblocks = (k + kDepth - 1) / kDepth, depth_step = (k + kblocks - 1) / kblocks;
  const int64_t row_blocks = (m + kRowBlock - 1) / kRowBlock, col_blocks = (n + kColBlock - 1) / kColBlock;
  ParallelFor(pool, row_blocks * col_blocks, [&](int64_t task) {
    const int64_t m0 = (task % row_blocks) * kRowBlock, n0 = (task / row_blocks) * kColBlock;
    const int rows = static_cast<int>(std::min<int64_t>(kRowBlock, m - m0));
    const int cols = static_cast<int>(std::min<int64_t>(kColBlock, n - n0));
    thread_local std::vector<float> packed;
    packed.resize(static_cast<size_t>(depth_step) * kColBlock);
    for (int64_t k0 = 0; k0 < k; k0 += depth_step) {
      const int depth = static_cast<int>(std::min<int64_t>(depth_step, k - k0));
      PackB(bptr, n, k0, depth, n0, cols, packed.data());
      for (int p = 0; p * kPanel < cols; ++p) {
        const float* bp = packed.data() + static_cast<int64_t>(p) * depth * kPanel;
        const int width = std::min(kPanel, cols - p * kPanel);
        for (int r = 0; r < rows; r += kRows) {
          PanelRows(std::min(kRows, rows - r), ap + (m0 + r) * k + k0, k, bp, depth,
                    cp + (m0 + r) * n + n0 + p * kPanel, n, k0 > 0, width);
        }
      }
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MagicposeMatmul, Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // a [M, K]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // b [K, N]
                                  .Ret<ffi::Buffer<ffi::F32>>()); // c [M, N]
