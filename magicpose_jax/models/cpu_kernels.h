// What the CPU kernels (cpu_attention.cc, cpu_matmul.cc) share: the SIMD vector type, its loads and
// stores, and a parallel loop on XLA's intra-op thread pool. Built by magicpose_jax/models/cpu_kernels.py.
#ifndef MAGICPOSE_JAX_MODELS_CPU_KERNELS_H_
#define MAGICPOSE_JAX_MODELS_CPU_KERNELS_H_

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace magicpose {

namespace ffi = xla::ffi;

// GCC vector extensions: 16-lane vectors where -march=native has AVX-512, else 8 (AVX2's ymm; GCC splits
// them on narrower ISAs). kRegisters is the vector register file the micro-kernels block for.
#if defined(__AVX512F__)
constexpr int kLanes = 16, kRegisters = 32;
#else
constexpr int kLanes = 8, kRegisters = 16;
#endif
typedef float vf __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(kLanes * sizeof(int32_t))));

inline vf Load(const float* p) {
  vf x;
  std::memcpy(&x, p, sizeof(vf));
  return x;
}

inline void Store(float* p, vf x) { std::memcpy(p, &x, sizeof(vf)); }

inline vf Splat(float s) { return vf{} + s; }

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

}  // namespace magicpose

#endif  // MAGICPOSE_JAX_MODELS_CPU_KERNELS_H_
