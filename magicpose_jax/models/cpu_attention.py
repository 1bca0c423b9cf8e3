"""The fused CPU attention kernel (`cpu_attention.cc`): built on first use, loaded, called through `jax.ffi`.

XLA:CPU runs attention as separate matmul, exp and reduction ops, each over a `[rows, Nk]`
logits block in memory; PyTorch's fused CPU kernel was ~1.7x faster at SD's 4096-token layers
on 2 cores (benchmarks/attention.py). `cpu_attention.cc` computes a 48-row query block of one
head from start to end in one thread's cache, on XLA's intra-op thread pool.

The C++ source ships with the package and is compiled, the first time a process asks for it,
with the C++ compiler on the machine (`$CXX`, else `c++`/`g++`/`clang++`) against jaxlib's FFI
headers, `-O3 -march=native`. The library is cached under `$MAGICPOSE_CACHE_DIR` (default
`~/.cache/magicpose_jax`)/cpu_attention/, keyed by the source, jaxlib's version, the compiler and
the CPU's model and flags, so a shared home across different hosts never loads code built for
another CPU. Concurrent builds (pytest workers) each write a temporary file and rename it.

`unavailable_reason()` says why the kernel cannot be used here (no compiler, the build failed,
`MAGICPOSE_CPU_ATTENTION=0`); `models/attention.py` then runs its pure-JAX `flash` backend.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile
import threading

import jax
import jax.numpy as jnp

_log = logging.getLogger(__name__)

SOURCE = pathlib.Path(__file__).with_name("cpu_attention.cc")
FFI_TARGET = "magicpose_cpu_attention_forward"
_SYMBOL = "MagicposeAttentionForward"
DISABLE_ENV = "MAGICPOSE_CPU_ATTENTION"
_BUILD_TIMEOUT_S = 300
_lock = threading.Lock()


def find_compiler() -> str | None:
  """The C++ compiler to build with: `$CXX`, else the first of c++, g++, clang++ on PATH; None if none."""
  for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
    path = shutil.which(name) if name else None
    if path:
      return path
  return None


def _cpu_identity() -> str:
  """The CPU's model and feature flags (what `-march=native` compiles for)."""
  try:
    lines = pathlib.Path("/proc/cpuinfo").read_text().splitlines()
  except OSError:
    return platform.processor() or platform.machine()
  wanted = [line for line in lines if line.split(":")[0].strip() in ("model name", "flags", "Features")]
  return "\n".join(sorted(set(wanted))) or platform.machine()


def _flags(march: str) -> list[str]:
  return ["-O3", f"-march={march}", "-std=c++17", "-shared", "-fPIC", "-isystem", jax.ffi.include_dir()]


def library_path(compiler: str, march: str = "native") -> pathlib.Path:
  """Where the library for this source, jaxlib, compiler, target and CPU is cached."""
  key = hashlib.sha256()
  for part in (SOURCE.read_bytes(), jax.lib.__version__.encode(), compiler.encode(), " ".join(_flags(march)).encode(),
               _cpu_identity().encode()):
    key.update(part + b"\0")
  return _cache_dir() / f"cpu_attention-{key.hexdigest()[:16]}.so"


def _cache_dir() -> pathlib.Path:
  """`$MAGICPOSE_CACHE_DIR` (default `~/.cache/magicpose_jax`)/cpu_attention, or a temporary folder if that
  cannot be created (a read-only home): the kernel is then rebuilt once per boot rather than lost."""
  cache = pathlib.Path(os.environ.get("MAGICPOSE_CACHE_DIR", pathlib.Path.home() / ".cache" / "magicpose_jax"))
  try:
    (cache / "cpu_attention").mkdir(parents=True, exist_ok=True)
    return cache / "cpu_attention"
  except OSError as e:
    fallback = pathlib.Path(tempfile.gettempdir()) / f"magicpose_jax-{os.getuid()}" / "cpu_attention"
    _log.warning("cannot create %s (%s); caching the CPU attention kernel in %s", cache / "cpu_attention", e, fallback)
    fallback.mkdir(parents=True, exist_ok=True)
    return fallback


def build(compiler: str, march: str = "native") -> pathlib.Path:
  """Compiles `cpu_attention.cc` for `-march=march` into the cache (unless it is there); returns the library's path.

  The kernel's vectors are 16 lanes where the target has AVX-512, else 8 (the tests also build `x86-64-v3`,
  AVX2, to check that path on an AVX-512 machine).

  Raises:
    RuntimeError: the compiler failed or timed out; the message holds its command and output.
  """
  path = library_path(compiler, march)
  if path.exists():
    return path
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
  os.close(fd)
  cmd = [compiler, *_flags(march), str(SOURCE), "-o", tmp]
  try:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=_BUILD_TIMEOUT_S, check=False)
    if result.returncode:
      raise RuntimeError(f"building the CPU attention kernel failed ({' '.join(cmd)}):\n{result.stderr[-4000:]}")
    os.replace(tmp, path)  # atomic: a concurrent build of the same key writes the same bytes
  except subprocess.TimeoutExpired as e:
    raise RuntimeError(f"building the CPU attention kernel timed out ({_BUILD_TIMEOUT_S} s): {' '.join(cmd)}") from e
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)
  _log.info("built the CPU attention kernel: %s", path)
  return path


@functools.cache
def _load() -> str | None:
  """Builds (if needed), loads and registers the kernel once per process; None on success, else why not."""
  compiler = find_compiler()
  if compiler is None:
    return "no C++ compiler found (set $CXX, or install g++/clang++)"
  try:
    lib = ctypes.cdll.LoadLibrary(str(build(compiler)))
  except (RuntimeError, OSError) as e:
    return str(e)
  register(lib, FFI_TARGET)
  return None


def register(lib: ctypes.CDLL, target: str) -> None:
  """Registers a loaded kernel library's handler as the CPU FFI target `target`."""
  jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, _SYMBOL)), platform="cpu")


def unavailable_reason() -> str | None:
  """None when the kernel is built and registered here, else why it cannot be used."""
  if os.environ.get(DISABLE_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
    return f"disabled by {DISABLE_ENV}={os.environ[DISABLE_ENV]}"
  with _lock:
    return _load()


def forward(q: jax.Array, k: jax.Array, v: jax.Array, target: str = FFI_TARGET) -> tuple[jax.Array, jax.Array]:
  """The kernel: `softmax(q·kᵀ)·v` and its log-sum-exp, float32, on CPU; `q` already scaled.

  Args:
    q: `[..., Nq, H, D]` float32 queries, the 1/sqrt(D) scale applied.
    k: `[..., Nk, H, D]` float32 keys.
    v: `[..., Nk, H, D]` float32 values.
    target: the FFI target (another build registered with `register`, in tests).

  Returns:
    out `[..., Nq, H, D]` and lse `[..., H, Nq]` (float32), the log-sum-exp of each query's logits.
  """
  reason = unavailable_reason()
  if reason is not None:
    raise RuntimeError(f"the CPU attention kernel is unavailable: {reason}")
  *lead, nq, h, _ = q.shape
  call = jax.ffi.ffi_call(
      target,
      (jax.ShapeDtypeStruct(q.shape, jnp.float32), jax.ShapeDtypeStruct((*lead, h, nq), jnp.float32)),
      vmap_method="broadcast_all")  # the kernel treats every leading dimension as batch
  return call(q, k, v)
