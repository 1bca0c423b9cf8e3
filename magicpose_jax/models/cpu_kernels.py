"""The native CPU kernels (`cpu_attention.cc`, `cpu_matmul.cc`): built on first use, cached, loaded, registered.

The C++ sources ship with the package and are compiled into one library, the first time a process asks
for a kernel, with the C++ compiler on the machine (`$CXX`, else `c++`/`g++`/`clang++`) against jaxlib's
FFI headers, `-O3 -march=native`. The library is cached under `$MAGICPOSE_CACHE_DIR` (default
`~/.cache/magicpose_jax`)/cpu_kernels/, keyed by the sources, jaxlib's version, the compiler, the flags and
the CPU's model and flags, so a shared home across different hosts never loads code built for another CPU.
Concurrent builds (pytest workers) each write a temporary file and rename it.

`unavailable_reason()` says why the kernels cannot be used here (no compiler, the build failed,
`MAGICPOSE_CPU_KERNELS=0`); each kernel's module adds its own switch (`cpu_attention.py`,
`cpu_matmul.py`), and the models then run their pure-JAX paths.
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

_log = logging.getLogger(__name__)

_HERE = pathlib.Path(__file__).parent
SOURCES = (_HERE / "cpu_attention.cc", _HERE / "cpu_matmul.cc")
HEADERS = (_HERE / "cpu_kernels.h",)
# FFI target -> the handler symbol the library exports for it.
TARGETS = {"magicpose_cpu_attention_forward": "MagicposeAttentionForward", "magicpose_cpu_matmul": "MagicposeMatmul"}
DISABLE_ENV = "MAGICPOSE_CPU_KERNELS"
_BUILD_TIMEOUT_S = 300
_lock = threading.Lock()
_registered: set[str] = set()


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
  sources = [f.read_bytes() for f in (*SOURCES, *HEADERS)]
  for part in (*sources, jax.lib.__version__.encode(), compiler.encode(), " ".join(_flags(march)).encode(),
               _cpu_identity().encode()):
    key.update(part + b"\0")
  return _cache_dir() / f"cpu_kernels-{key.hexdigest()[:16]}.so"


def _cache_dir() -> pathlib.Path:
  """`$MAGICPOSE_CACHE_DIR` (default `~/.cache/magicpose_jax`)/cpu_kernels, or a temporary folder if that
  cannot be created (a read-only home): the library is then rebuilt once per boot rather than lost."""
  cache = pathlib.Path(os.environ.get("MAGICPOSE_CACHE_DIR", pathlib.Path.home() / ".cache" / "magicpose_jax"))
  try:
    (cache / "cpu_kernels").mkdir(parents=True, exist_ok=True)
    return cache / "cpu_kernels"
  except OSError as e:
    fallback = pathlib.Path(tempfile.gettempdir()) / f"magicpose_jax-{os.getuid()}" / "cpu_kernels"
    _log.warning("cannot create %s (%s); caching the CPU kernels in %s", cache / "cpu_kernels", e, fallback)
    fallback.mkdir(parents=True, exist_ok=True)
    return fallback


def build(compiler: str, march: str = "native") -> pathlib.Path:
  """Compiles the kernels for `-march=march` into one cached library (unless it is there); returns its path.

  The kernels' vectors are 16 lanes where the target has AVX-512, else 8 (the tests also build `x86-64-v3`,
  AVX2, to check that path on an AVX-512 machine).

  Raises:
    RuntimeError: the compiler failed or timed out; the message holds its command and output.
  """
  path = library_path(compiler, march)
  if path.exists():
    return path
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
  os.close(fd)
  cmd = [compiler, *_flags(march), *map(str, SOURCES), "-o", tmp]
  try:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=_BUILD_TIMEOUT_S, check=False)
    if result.returncode:
      raise RuntimeError(f"building the CPU kernels failed ({' '.join(cmd)}):\n{result.stderr[-4000:]}")
    os.replace(tmp, path)  # atomic: a concurrent build of the same key writes the same bytes
  except subprocess.TimeoutExpired as e:
    raise RuntimeError(f"building the CPU kernels timed out ({_BUILD_TIMEOUT_S} s): {' '.join(cmd)}") from e
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)
  _log.info("built the CPU kernels: %s", path)
  return path


@functools.cache
def _load() -> str | None:
  """Builds (if needed), loads and registers the kernels once per process; None on success, else why not."""
  compiler = find_compiler()
  if compiler is None:
    return "no C++ compiler found (set $CXX, or install g++/clang++)"
  try:
    lib = ctypes.cdll.LoadLibrary(str(build(compiler)))
  except (RuntimeError, OSError) as e:
    return str(e)
  register(lib)
  return None


def register(lib: ctypes.CDLL, suffix: str = "") -> None:
  """Registers a loaded library's handlers as the CPU FFI targets `TARGETS` (each name + `suffix`).

  A name registered before in this process is kept (XLA's registry takes each name once).
  """
  for target, symbol in TARGETS.items():
    if target + suffix not in _registered:
      jax.ffi.register_ffi_target(target + suffix, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
      _registered.add(target + suffix)


def switched_off(env: str) -> str | None:
  """Why `$env` turns a kernel off (it is 0/false/no/off), else None."""
  if os.environ.get(env, "1").strip().lower() in ("0", "false", "no", "off"):
    return f"disabled by {env}={os.environ[env]}"
  return None


def unavailable_reason() -> str | None:
  """None when the kernels are built and registered here, else why they cannot be used."""
  reason = switched_off(DISABLE_ENV)
  if reason is not None:
    return reason
  with _lock:
    return _load()
