"""The native CPU kernels' library (models/cpu_kernels.py): build, cache key, failures, fallbacks.

The kernels' values are tested in test_cpu_attention.py and test_matmul.py.
"""

import os

import jax
import pytest

from magicpose_jax.models import cpu_attention, cpu_kernels, cpu_matmul

pytestmark = [pytest.mark.skipif(jax.default_backend() != "cpu", reason="CPU kernels"),
              pytest.mark.skipif(cpu_kernels.find_compiler() is None, reason="no C++ compiler here")]


def test_library_builds_and_every_kernel_is_available_here():
  assert cpu_kernels.unavailable_reason() is None
  assert cpu_attention.unavailable_reason() is None and cpu_matmul.unavailable_reason() is None


def test_switches_turn_off_one_kernel_or_all(monkeypatch):
  monkeypatch.setenv(cpu_matmul.DISABLE_ENV, "0")
  assert "MAGICPOSE_CPU_MATMUL" in cpu_matmul.unavailable_reason() and cpu_attention.unavailable_reason() is None
  monkeypatch.delenv(cpu_matmul.DISABLE_ENV)
  monkeypatch.setenv(cpu_kernels.DISABLE_ENV, "off")
  assert "MAGICPOSE_CPU_KERNELS" in cpu_matmul.unavailable_reason()
  assert "MAGICPOSE_CPU_KERNELS" in cpu_attention.unavailable_reason()


def test_build_is_cached_and_failures_name_the_command(tmp_path, monkeypatch):
  compiler = cpu_kernels.find_compiler()
  monkeypatch.setenv("MAGICPOSE_CACHE_DIR", str(tmp_path / "cache"))
  built = cpu_kernels.build(compiler)
  assert built.parent == tmp_path / "cache" / "cpu_kernels" and built.exists()
  stamp = built.stat().st_mtime_ns
  assert cpu_kernels.build(compiler) == built and built.stat().st_mtime_ns == stamp  # no rebuild
  assert os.listdir(built.parent) == [built.name]  # no temporary files left

  broken = tmp_path / "broken.cc"
  broken.write_text("this is not C++\n")
  monkeypatch.setattr(cpu_kernels, "SOURCES", (*cpu_kernels.SOURCES, broken))
  assert cpu_kernels.library_path(compiler) != built  # the key covers every source
  with pytest.raises(RuntimeError, match=r"building the CPU kernels failed \(.*broken\.cc"):
    cpu_kernels.build(compiler)
  assert os.listdir(built.parent) == [built.name]


def test_header_is_part_of_the_cache_key(tmp_path, monkeypatch):
  compiler = cpu_kernels.find_compiler()
  monkeypatch.setenv("MAGICPOSE_CACHE_DIR", str(tmp_path / "cache"))
  before = cpu_kernels.library_path(compiler)
  header = tmp_path / "cpu_kernels.h"
  header.write_text(cpu_kernels.HEADERS[0].read_text() + "\n// changed\n")
  monkeypatch.setattr(cpu_kernels, "HEADERS", (header,))
  assert cpu_kernels.library_path(compiler) != before


def test_unusable_cache_dir_falls_back_to_a_temporary_one(tmp_path, monkeypatch):
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  monkeypatch.setenv("MAGICPOSE_CACHE_DIR", str(blocker / "cache"))  # under a file: mkdir fails
  monkeypatch.setattr(cpu_kernels.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
  built = cpu_kernels.build(cpu_kernels.find_compiler())
  assert built.exists() and str(built).startswith(str(tmp_path / "tmp"))
