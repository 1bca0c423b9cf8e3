"""The fused CPU attention kernel (`cpu_attention.cc`): built on first use, loaded, called through `jax.ffi`.

XLA:CPU runs attention as separate matmul, exp and reduction ops, each over a `[rows, Nk]`
logits block in memory; PyTorch's fused CPU kernel was ~1.7x faster at SD's 4096-token layers
on 2 cores (benchmarks/attention.py). `cpu_attention.cc` computes a 48-row query block of one
head from start to end in one thread's cache, on XLA's intra-op thread pool.

The C++ source ships with the package and is compiled, the first time a process asks for it,
with the C++ compiler on the machine (`$CXX`, else `c++`/`g++`/`clang++`) against jaxlib's FFI
headers, `-O3 -march=native`. The library is cached under `$MAGICPOSE_CACHE_DIR` (default
`~/.cache/magicpose_jax`)/cpu_attention/, keyed by the source, jaxlib's version, the compiler (path
and version) and the CPU's model and flags, so a shared home across different hosts never loads code
built for another CPU. Concurrent builds (pytest workers) take a lock file in the cache folder.

Loading a library runs its code in this process, so nothing is loaded that this user did not build:
  * the cache folder must be a real folder owned by this user and writable by no one else (it is
    created with mode 0700); otherwise, or when it cannot be created, the kernel is built into a
    fresh private temporary folder (`tempfile.mkdtemp`) for this process, removed at exit;
  * next to each library a record `<library>.json` holds its sha256 and what it was built from
    (source sha256, compiler and version, flags, jaxlib, CPU); a library is loaded only when it is a
    regular file owned by this user, its record matches what this process would build, and its bytes
    hash to the recorded sha256. A library that fails (no record, another hash, no kernel symbol) is
    not rebuilt over: the pure-JAX path runs instead, with a warning naming the file to remove.

`unavailable_reason()` says why the kernel cannot be used here (no compiler, the build failed,
`MAGICPOSE_CPU_ATTENTION=0`); `models/attention.py` then runs its pure-JAX `flash` backend.
"""

from __future__ import annotations

import atexit
import ctypes
import fcntl
import functools
import hashlib
import json
import logging
import os
import pathlib
import platform
import shutil
import stat
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
_RECORD_VERSION = 1  # of the `<library>.json` format; part of the cache key
_lock = threading.Lock()


class CacheError(RuntimeError):
  """A cache folder or cached library that must not be used (another owner, writable by others, no valid record)."""


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


@functools.cache
def _compiler_version(compiler: str) -> str:
  try:
    out = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30, check=False).stdout
  except (OSError, subprocess.TimeoutExpired):
    return "unknown"
  return (out.strip().splitlines() or ["unknown"])[0]


def build_record(compiler: str, march: str = "native") -> dict:
  """What a library for this source, compiler, flags, jaxlib and CPU is built from (its record, less its sha256)."""
  return {"version": _RECORD_VERSION, "source_sha256": hashlib.sha256(SOURCE.read_bytes()).hexdigest(),
          "compiler": compiler, "compiler_version": _compiler_version(compiler), "flags": _flags(march),
          "jaxlib": jax.lib.__version__, "cpu_sha256": hashlib.sha256(_cpu_identity().encode()).hexdigest()}


def library_path(compiler: str, march: str = "native") -> pathlib.Path:
  """Where the library for this source, jaxlib, compiler, target and CPU is cached."""
  key = hashlib.sha256(json.dumps(build_record(compiler, march), sort_keys=True).encode())
  return _cache_dir() / f"cpu_attention-{key.hexdigest()[:16]}.so"


def record_path(library: pathlib.Path) -> pathlib.Path:
  return library.with_name(library.name + ".json")


def check_private_dir(path: pathlib.Path) -> pathlib.Path:
  """`path` after checking it is a real folder owned by this user that no one else can write; raises CacheError."""
  st = os.lstat(path)
  if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
    raise CacheError(f"{path} is not a folder (a symlink or a file)")
  if st.st_uid != os.getuid():
    raise CacheError(f"{path} is owned by uid {st.st_uid}, not by this user (uid {os.getuid()})")
  if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
    raise CacheError(f"{path} is writable by others (mode {stat.S_IMODE(st.st_mode):o}): anyone could have put a "
                     f"library there; run chmod 700 on it and remove what you did not build")
  return path


@functools.cache
def _private_temp_dir() -> pathlib.Path:
  """A fresh folder only this process knows (mode 0700, an unpredictable name), removed at exit."""
  path = pathlib.Path(tempfile.mkdtemp(prefix="magicpose_jax-cpu_attention-"))
  atexit.register(shutil.rmtree, path, True)
  return path


def _cache_dir() -> pathlib.Path:
  """`$MAGICPOSE_CACHE_DIR` (default `~/.cache/magicpose_jax`)/cpu_attention, created with mode 0700 and checked
  (`check_private_dir`); when it cannot be created or fails the check, a private temporary folder (the kernel is
  then rebuilt by each process rather than taken from a folder someone else may write)."""
  cache = pathlib.Path(os.environ.get("MAGICPOSE_CACHE_DIR", pathlib.Path.home() / ".cache" / "magicpose_jax"))
  folder = cache / "cpu_attention"
  try:
    cache.mkdir(mode=0o700, parents=True, exist_ok=True)
    folder.mkdir(mode=0o700, exist_ok=True)
    return check_private_dir(folder)
  except (OSError, CacheError) as e:
    fallback = _private_temp_dir()
    _log.warning("not caching the CPU attention kernel in %s (%s); building it in %s for this process", folder, e,
                 fallback)
    return fallback


def _sha256(path: pathlib.Path) -> str:
  return hashlib.sha256(path.read_bytes()).hexdigest()


def verify(library: pathlib.Path, expected: dict) -> None:
  """Raises CacheError unless `library` is a regular file of this user, not writable by others, with a record
  equal to `expected` (`build_record`) plus the sha256 its bytes have."""
  st = os.lstat(library)
  if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
    raise CacheError(f"{library} is not a regular file of this user writable only by it")
  record_file = record_path(library)
  try:
    record = json.loads(record_file.read_text())
  except (OSError, ValueError) as e:
    raise CacheError(f"{library} has no readable build record {record_file.name} ({e}); it was not built here") \
        from None
  sha = record.pop("sha256", None) if isinstance(record, dict) else None
  if record != expected:
    raise CacheError(f"{library}: its build record {record_file.name} is for another source, compiler or flags")
  if sha != _sha256(library):
    raise CacheError(f"{library}: its bytes do not hash to the sha256 its build record holds (changed after the "
                     f"build)")


def build(compiler: str, march: str = "native") -> pathlib.Path:
  """Compiles `cpu_attention.cc` for `-march=march` into the cache (unless it is there); returns the library's path.

  The kernel's vectors are 16 lanes where the target has AVX-512, else 8 (the tests also build `x86-64-v3`,
  AVX2, to check that path on an AVX-512 machine). A cached library is returned only after `verify`.

  Raises:
    RuntimeError: the compiler failed or timed out; the message holds its command and output.
    CacheError: the cached library fails `verify` (it is left in place for the user to look at and remove).
  """
  path = library_path(compiler, march)
  expected = build_record(compiler, march)
  with open(path.parent / ".lock", "a") as lock:  # one build per key at a time (pytest workers, several runs)
    fcntl.flock(lock, fcntl.LOCK_EX)
    if os.path.lexists(path):
      verify(path, expected)
      return path
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    cmd = [compiler, *_flags(march), str(SOURCE), "-o", tmp]
    try:
      result = subprocess.run(cmd, capture_output=True, text=True, timeout=_BUILD_TIMEOUT_S, check=False)
      if result.returncode:
        raise RuntimeError(f"building the CPU attention kernel failed ({' '.join(cmd)}):\n{result.stderr[-4000:]}")
      os.chmod(tmp, 0o700)
      record = {**expected, "sha256": _sha256(pathlib.Path(tmp))}
      record_path(path).write_text(json.dumps(record, indent=1))  # the record first: a library never lacks one
      os.replace(tmp, path)
    except subprocess.TimeoutExpired as e:
      raise RuntimeError(f"building the CPU attention kernel timed out ({_BUILD_TIMEOUT_S} s): {' '.join(cmd)}") \
          from e
    finally:
      if os.path.exists(tmp):
        os.unlink(tmp)
  _log.info("built the CPU attention kernel: %s", path)
  return path


def load_library(compiler: str, march: str = "native") -> tuple[ctypes.CDLL | None, str | None]:
  """(the built, verified and loaded library, None), or (None, why not). A cached library that fails `verify` or
  lacks the kernel's symbol is reported with a warning (the caller runs the pure-JAX path)."""
  try:
    path = build(compiler, march)
  except RuntimeError as e:  # CacheError included
    if isinstance(e, CacheError):
      _log.warning("the CPU attention kernel is not loaded: %s. Remove that file (and its .json) to rebuild it; "
                   "attention runs the pure-JAX path meanwhile", e)
    return None, str(e)
  try:
    lib = ctypes.cdll.LoadLibrary(str(path))
    getattr(lib, _SYMBOL)
  except (OSError, AttributeError) as e:
    why = f"{path} cannot be used as the CPU attention kernel ({e})"
    _log.warning("%s. Remove it (and its .json) to rebuild it; attention runs the pure-JAX path meanwhile", why)
    return None, why
  return lib, None


@functools.cache
def _load() -> str | None:
  """Builds (if needed), loads and registers the kernel once per process; None on success, else why not."""
  compiler = find_compiler()
  if compiler is None:
    return "no C++ compiler found (set $CXX, or install g++/clang++)"
  try:
    lib, why = load_library(compiler)
  except OSError as e:  # the cache folder's lock or files
    return str(e)
  if lib is None:
    return why
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
