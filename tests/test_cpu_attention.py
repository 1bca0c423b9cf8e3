"""The fused CPU attention kernel (models/cpu_attention.cc): values against float64 numpy, its build and cache.

Gradients (`cpu_fused` backend, flash's backward) are checked against `xla` in test_attention.py, and the UNet
against diffusers with `attention_backend="cpu_fused"` in test_unet_parity.py.
"""

import ctypes
import hashlib
import json
import logging
import os
import platform
import stat
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from magicpose_jax.models import attention, cpu_attention

pytestmark = [pytest.mark.skipif(jax.default_backend() != "cpu", reason="a CPU kernel"),
              pytest.mark.skipif(cpu_attention.find_compiler() is None,
                                 reason="no C++ compiler here (auto then runs flash)")]

# (B, Nq, Nk, H, D): query counts off the 48-row block, key counts off the key panel (77 text tokens, 1 key),
# head dims off the vector width (8, 40, 72), above one 5-vector panel (200), SD's 40/80/160.
SHAPES = [
    (1, 97, 194, 2, 40),
    (2, 50, 77, 3, 80),
    (1, 48, 1, 2, 8),
    (3, 5, 33, 1, 72),
    (1, 130, 64, 2, 160),
    (2, 49, 50, 1, 200),
]


def _qkv(b, nq, nk, h, d, seed=0, scale=1.0):
  rng = np.random.default_rng(seed)
  draw = lambda n: (scale * rng.standard_normal((b, n, h, d))).astype(np.float32)
  return draw(nq), draw(nk), draw(nk)


def _numpy_attention(q, k, v):
  """out [B, Nq, H, D] and lse [B, H, Nq] in float64 (q already scaled)."""
  logits = np.einsum("bqhd,bkhd->bhqk", q.astype(np.float64), k.astype(np.float64))
  m = logits.max(-1, keepdims=True)
  p = np.exp(logits - m)
  denom = p.sum(-1, keepdims=True)
  out = np.einsum("bhqk,bkhd->bqhd", p / denom, v.astype(np.float64))
  return out, (m + np.log(denom))[..., 0]


def test_kernel_builds_here():
  assert cpu_attention.unavailable_reason() is None


@pytest.mark.parametrize("shape", SHAPES)
def test_forward_matches_float64(shape):
  q, k, v = _qkv(*shape, seed=1)
  q = q * np.float32(shape[-1] ** -0.5)
  out, lse = jax.jit(cpu_attention.forward)(q, k, v)
  ref_out, ref_lse = _numpy_attention(q, k, v)
  assert out.shape == q.shape and lse.shape == ref_lse.shape
  np.testing.assert_allclose(np.asarray(out), ref_out, atol=2e-6)  # outputs of unit scale
  np.testing.assert_allclose(np.asarray(lse), ref_lse, rtol=1e-6, atol=1e-6)


def test_peaked_softmax_underflow_and_large_logits():
  """Logits of hundreds: most probabilities underflow to exactly 0, the max stays finite, no NaN."""
  q, k, _ = _qkv(2, 60, 90, 2, 40, seed=2, scale=4.0)  # logits ~ N(0, 16^2 * 40)
  v = _qkv(2, 60, 90, 2, 40, seed=3)[2]
  out, lse = jax.jit(cpu_attention.forward)(q, k, v)
  ref_out, ref_lse = _numpy_attention(q, k, v)
  assert np.isfinite(np.asarray(out)).all()
  # float32 logits of ~400 are off by ~1e-4 whoever computes them: the xla backend's error here is 3.4e-5.
  np.testing.assert_allclose(np.asarray(out), ref_out, atol=1e-4)
  np.testing.assert_allclose(np.asarray(lse), ref_lse, rtol=1e-6)


def test_backend_matches_xla_and_is_deterministic():
  q, k, v = _qkv(2, 300, 600, 4, 40, seed=3)  # several blocks per head: both threads take part
  fused = jax.jit(lambda *a: attention.attend(*a, backend="cpu_fused"))
  first, second = fused(q, k, v), fused(q, k, v)
  np.testing.assert_array_equal(np.asarray(first), np.asarray(second))
  xla = jax.jit(lambda *a: attention.attend(*a, backend="xla"))(q, k, v)
  np.testing.assert_allclose(np.asarray(first), np.asarray(xla), atol=1e-5)


def test_vmapped_leading_dims_are_batch():
  q, k, v = _qkv(6, 20, 30, 2, 16, seed=4)
  split = lambda x: x.reshape(2, 3, *x.shape[1:])  # [2, 3, N, H, D]
  out = jax.jit(jax.vmap(attention.cpu_fused_attention))(split(q), split(k), split(v))
  ref = attention.xla_attention(q, k, v)
  np.testing.assert_allclose(np.asarray(out).reshape(ref.shape), np.asarray(ref), atol=1e-5)


def test_auto_uses_it_for_long_float32_sequences(monkeypatch):
  q, k, v = _qkv(1, 64, 128, 2, 40)
  assert attention.auto_backend(q, k, v) == "xla"  # 64 KiB of logits: one block
  monkeypatch.setattr(attention, "CHUNK_LOGITS_BYTES", 32 * 2**10)
  assert attention.auto_backend(q, k, v) == "cpu_fused"
  bf = [jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)]
  assert "float32" in attention.backend_supports("cpu_fused", *bf)
  assert attention.auto_backend(*bf) == "flash"
  monkeypatch.setenv(cpu_attention.DISABLE_ENV, "0")
  assert "disabled" in cpu_attention.unavailable_reason()
  assert attention.auto_backend(q, k, v) == "flash"


def test_build_is_cached_and_failures_name_the_command(tmp_path, monkeypatch):
  compiler = cpu_attention.find_compiler()
  monkeypatch.setenv("MAGICPOSE_CACHE_DIR", str(tmp_path / "cache"))
  built = cpu_attention.build(compiler)
  assert built.parent == tmp_path / "cache" / "cpu_attention" and built.exists()
  assert stat.S_IMODE(os.stat(built.parent).st_mode) == 0o700  # private
  record = json.loads(cpu_attention.record_path(built).read_text())
  assert record["sha256"] == hashlib.sha256(built.read_bytes()).hexdigest()
  assert record["source_sha256"] == hashlib.sha256(cpu_attention.SOURCE.read_bytes()).hexdigest()
  assert record["compiler"] == compiler and "-O3" in record["flags"]
  stamp = built.stat().st_mtime_ns
  assert cpu_attention.build(compiler) == built and built.stat().st_mtime_ns == stamp  # no rebuild
  assert sorted(os.listdir(built.parent)) == sorted([built.name, built.name + ".json", ".lock"])  # no temporaries

  broken = tmp_path / "broken.cc"
  broken.write_text("this is not C++\n")
  monkeypatch.setattr(cpu_attention, "SOURCE", broken)
  assert cpu_attention.library_path(compiler) != built  # the key covers the source
  with pytest.raises(RuntimeError, match=r"building the CPU attention kernel failed \(.*broken\.cc"):
    cpu_attention.build(compiler)
  assert sorted(os.listdir(built.parent)) == sorted([built.name, built.name + ".json", ".lock"])


PLANTED = """
#include <stdio.h>
#include <stdlib.h>
__attribute__((constructor)) static void planted(void) {
  FILE *f = fopen(getenv("PLANTED_MARKER"), "w");
  if (f) { fputs("ran", f); fclose(f); }
}
"""


def _plant(tmp_path, target):
  """Compiles a library whose constructor writes $PLANTED_MARKER when loaded, at `target`."""
  source = tmp_path / "planted.c"
  source.write_text(PLANTED)
  subprocess.run([cpu_attention.find_compiler(), "-x", "c", "-shared", "-fPIC", str(source), "-o", str(target)],
                 check=True)


@pytest.mark.parametrize("forged", ["no record", "record of another library", "symlink"])
def test_a_planted_library_is_not_loaded(tmp_path, monkeypatch, caplog, forged):
  compiler = cpu_attention.find_compiler()
  monkeypatch.setenv("MAGICPOSE_CACHE_DIR", str(tmp_path / "cache"))
  marker = tmp_path / "marker"
  monkeypatch.setenv("PLANTED_MARKER", str(marker))
  target = cpu_attention.library_path(compiler)  # creates the (private) cache folder
  if forged == "symlink":
    _plant(tmp_path, tmp_path / "elsewhere.so")
    target.symlink_to(tmp_path / "elsewhere.so")
  else:
    _plant(tmp_path, target)
  if forged == "record of another library":
    record = {**cpu_attention.build_record(compiler), "sha256": hashlib.sha256(b"the real kernel").hexdigest()}
    cpu_attention.record_path(target).write_text(json.dumps(record))
  if forged == "symlink":  # a record that matches the bytes behind the link: the link itself is refused
    record = {**cpu_attention.build_record(compiler),
              "sha256": hashlib.sha256((tmp_path / "elsewhere.so").read_bytes()).hexdigest()}
    cpu_attention.record_path(target).write_text(json.dumps(record))
  with caplog.at_level(logging.WARNING):
    lib, why = cpu_attention.load_library(compiler)
  assert lib is None and str(target) in why
  assert not marker.exists()  # its constructor never ran
  assert "is not loaded" in caplog.text and "Remove that file" in caplog.text
  assert os.path.lexists(target)  # left for the user to look at, not deleted


def test_a_library_without_the_kernel_symbol_falls_back_with_a_warning(tmp_path, monkeypatch, caplog):
  monkeypatch.setenv("MAGICPOSE_CACHE_DIR", str(tmp_path / "cache"))
  source = tmp_path / "empty.cc"
  source.write_text('extern "C" int something_else() { return 1; }\n')
  monkeypatch.setattr(cpu_attention, "SOURCE", source)  # built and recorded as ours, but without the kernel
  with caplog.at_level(logging.WARNING):
    lib, why = cpu_attention.load_library(cpu_attention.find_compiler())
  assert lib is None and "cannot be used as the CPU attention kernel" in why and "MagicposeAttentionForward" in why
  assert "pure-JAX path" in caplog.text


def test_a_cache_folder_of_another_user_or_writable_by_others_is_not_used(tmp_path, monkeypatch, caplog):
  monkeypatch.setenv("MAGICPOSE_CACHE_DIR", str(tmp_path / "cache"))
  folder = cpu_attention._cache_dir()
  assert folder == tmp_path / "cache" / "cpu_attention"
  os.chmod(folder, 0o777)
  with caplog.at_level(logging.WARNING):
    other = cpu_attention._cache_dir()
  assert other != folder and "writable by others (mode 777)" in caplog.text
  assert stat.S_IMODE(os.stat(other).st_mode) == 0o700 and os.stat(other).st_uid == os.getuid()
  os.chmod(folder, 0o700)
  monkeypatch.setattr(cpu_attention.os, "getuid", lambda: os.stat(folder).st_uid + 1)  # as seen by another user
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    assert cpu_attention._cache_dir() != folder
  assert "not by this user" in caplog.text


def test_kernel_rejects_mismatched_shapes():
  q, k, v = _qkv(1, 8, 8, 2, 8)
  with pytest.raises(Exception, match="heads or head dims differ"):
    jax.jit(cpu_attention.forward)(q, k[..., :4], v[..., :4])


@pytest.mark.parametrize("shape", [(2, 50, 77, 3, 40), (1, 97, 194, 2, 8)])
def test_gradients_of_one_block_shapes_match_xla(shape):
  """Below the chunk budget the backward is autodiff of the one-block einsums (chunked: test_attention.py)."""
  q, k, v = _qkv(*shape, seed=6)
  assert attention._logits_bytes(q, k) <= attention.CHUNK_LOGITS_BYTES
  w = np.random.default_rng(7).standard_normal(q.shape).astype(np.float32)
  grads = {b: jax.jit(jax.grad(lambda q, k, v, b=b: jnp.sum(attention.attend(q, k, v, b) * w), argnums=(0, 1, 2)))(
      q, k, v) for b in ("cpu_fused", "xla")}
  for name, g, ref in zip("qkv", grads["cpu_fused"], grads["xla"], strict=True):
    np.testing.assert_allclose(np.asarray(g), np.asarray(ref), atol=1e-5, err_msg=f"d{name}")


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 targets")
def test_eight_lane_build_matches_float64():
  """The AVX2 (8-lane, 16-register) micro-kernels, built for x86-64-v3 whatever this CPU has."""
  path = cpu_attention.build(cpu_attention.find_compiler(), march="x86-64-v3")
  cpu_attention.register(ctypes.cdll.LoadLibrary(str(path)), "magicpose_test_attention_avx2")
  for shape in SHAPES:
    q, k, v = _qkv(*shape, seed=8)
    q = q * np.float32(shape[-1] ** -0.5)
    out, lse = jax.jit(lambda q, k, v: cpu_attention.forward(q, k, v, "magicpose_test_attention_avx2"))(q, k, v)
    ref_out, ref_lse = _numpy_attention(q, k, v)
    np.testing.assert_allclose(np.asarray(out), ref_out, atol=2e-6, err_msg=str(shape))
    np.testing.assert_allclose(np.asarray(lse), ref_lse, rtol=1e-6, atol=1e-6, err_msg=str(shape))


def test_unusable_cache_dir_falls_back_to_a_private_temporary_one(tmp_path, monkeypatch):
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  monkeypatch.setenv("MAGICPOSE_CACHE_DIR", str(blocker / "cache"))  # under a file: mkdir fails
  monkeypatch.setattr(cpu_attention.tempfile, "tempdir", str(tmp_path / "tmp"))
  (tmp_path / "tmp").mkdir()
  cpu_attention._private_temp_dir.cache_clear()
  try:
    built = cpu_attention.build(cpu_attention.find_compiler())
    assert built.exists() and built.parent.parent == tmp_path / "tmp"
    assert built.parent.name.startswith("magicpose_jax-cpu_attention-") and built.parent.name != "magicpose_jax-0"
    assert stat.S_IMODE(os.stat(built.parent).st_mode) == 0o700  # mkdtemp: fresh, unpredictable, private
  finally:
    cpu_attention._private_temp_dir.cache_clear()
