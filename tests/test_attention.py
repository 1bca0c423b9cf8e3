"""Attention backends agree with each other (and with a numpy softmax), kv length free."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from magicpose_jax.models import attention
from magicpose_jax.models.attention import attend, available_backends

SHAPES = [  # (B, Nq, Nk, H, D)
    (2, 16, 16, 2, 8),   # self-attention
    (2, 16, 32, 2, 8),   # self-attention over [main; reference]
    (1, 24, 7, 4, 40),   # cross-attention to 7 text tokens, SD head width 40
]


def _qkv(b, nq, nk, h, d, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.standard_normal((b, nq, h, d), dtype=np.float32),
          rng.standard_normal((b, nk, h, d), dtype=np.float32),
          rng.standard_normal((b, nk, h, d), dtype=np.float32))


def _numpy_attention(q, k, v):
  logits = np.einsum("bqhd,bkhd->bhqk", q.astype(np.float64), k) / np.sqrt(q.shape[-1])
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bhqk,bkhd->bqhd", p, v)


@pytest.mark.parametrize("shape", SHAPES)
def test_xla_matches_numpy(shape):
  q, k, v = _qkv(*shape)
  np.testing.assert_allclose(np.asarray(attend(q, k, v, "xla")), _numpy_attention(q, k, v), atol=1e-5)


@pytest.mark.parametrize("backend", ["dot_product", "xla_chunked", "auto"])
@pytest.mark.parametrize("shape", SHAPES)
def test_backends_match_xla(shape, backend):
  q, k, v = _qkv(*shape, seed=1)
  xla = jax.jit(lambda *a: attend(*a, backend="xla"))(q, k, v)
  other = jax.jit(lambda *a: attend(*a, backend=backend))(q, k, v)
  np.testing.assert_allclose(np.asarray(other), np.asarray(xla), atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_chunked_attention_really_chunks(shape):
  _, nq, nk, _, _ = shape
  budget = nk * 4 * 4  # logits of 4 queries of one head at a time
  assert attention.query_chunk_size(nq, nk, budget) == 4
  q, k, v = _qkv(*shape, seed=4)
  out = jax.jit(lambda *a: attention.chunked_xla_attention(*a, max_bytes=budget))(q, k, v)
  np.testing.assert_allclose(np.asarray(out), _numpy_attention(q, k, v), atol=1e-5)
  jaxpr = str(jax.make_jaxpr(lambda *a: attention.chunked_xla_attention(*a, max_bytes=budget))(q, k, v))
  assert "while" in jaxpr or "scan" in jaxpr  # a loop over chunks, not one big block


def test_unsupported_backend_falls_back_once(caplog):
  attention._WARNED.clear()
  q, k, v = _qkv(*SHAPES[1], seed=2)
  with caplog.at_level(logging.WARNING, logger=attention.__name__):
    first = attend(q, k, v, "cudnn")  # CPU and fp32: cuDNN cannot run this
    second = attend(q, k, v, "cudnn")
  np.testing.assert_allclose(np.asarray(first), np.asarray(attend(q, k, v, "xla")), atol=0)
  np.testing.assert_array_equal(np.asarray(first), np.asarray(second))
  warnings = [r for r in caplog.records if "using 'xla'" in r.getMessage()]
  assert len(warnings) == 1 and "cudnn" in warnings[0].getMessage()


def test_unknown_backend_is_an_error():
  q, k, v = _qkv(*SHAPES[0])
  with pytest.raises(ValueError, match="unknown attention backend 'flash9'"):
    attend(q, k, v, "flash9")


def test_registry_lists_the_documented_backends():
  assert {"auto", "xla", "xla_chunked", "dot_product", "cudnn", "splash"} <= set(available_backends())


def test_bf16_softmax_is_float32():
  """bf16 inputs: the xla backend's result stays close to the float64 reference."""
  q, k, v = _qkv(1, 8, 64, 1, 16, seed=3)
  out = attend(jnp.asarray(q, jnp.bfloat16), jnp.asarray(k, jnp.bfloat16), jnp.asarray(v, jnp.bfloat16))
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), _numpy_attention(q, k, v), atol=3e-2)
