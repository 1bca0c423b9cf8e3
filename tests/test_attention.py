"""Attention backends agree with each other (and with a numpy softmax), kv length free."""

import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from simulated_devices import run_script

from magicpose_jax.models import attention, platforms
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


@pytest.mark.parametrize("backend", ["dot_product", "auto", "flash"])
@pytest.mark.parametrize("shape", SHAPES)
def test_backends_match_xla(shape, backend):
  q, k, v = _qkv(*shape, seed=1)
  xla = jax.jit(lambda *a: attend(*a, backend="xla"))(q, k, v)
  other = jax.jit(lambda *a: attend(*a, backend=backend))(q, k, v)
  np.testing.assert_allclose(np.asarray(other), np.asarray(xla), atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_chunked_attention_really_chunks(shape, monkeypatch):
  b, nq, nk, _, _ = shape
  monkeypatch.setattr(attention, "MIN_QUERY_CHUNK", 1)
  budget = b * nk * 4 * 4  # logits of 4 queries of one head (all batch rows) at a time
  assert attention.query_chunk_size(b, nq, nk, budget) == 4
  q, k, v = _qkv(*shape, seed=4)
  out = jax.jit(lambda *a: attention.flash_attention(*a, max_bytes=budget))(q, k, v)
  np.testing.assert_allclose(np.asarray(out), _numpy_attention(q, k, v), atol=1e-5)
  jaxpr = str(jax.make_jaxpr(lambda *a: attention.flash_attention(*a, max_bytes=budget))(q, k, v))
  assert "while" in jaxpr or "scan" in jaxpr  # a loop over chunks, not one big block


def test_query_chunks_spread_evenly():
  # 8192 keys: 8 MiB of one head's logits is 256 queries; 1000 queries -> 4 chunks of 250, not 256 + 232 padded.
  assert attention.query_chunk_size(1, 1000, 8192, 8 * 2**20) == 250
  # A budget below MIN_QUERY_CHUNK rows still takes MIN_QUERY_CHUNK rows (the global batch may be sharded).
  assert attention.query_chunk_size(64, 4096, 8192, 8 * 2**20) == attention.MIN_QUERY_CHUNK
  assert attention.query_chunk_size(1, 100, 10, 10**9) == 100
  assert attention.query_chunk_size(1, 100, 10, 40 * 60) == 50  # 60 rows fit: 2 chunks of 50, not 60 + 40


# SD 1.5's attention classes at reduced length (B, Nq, Nk, H, D): self+reference (Nk = 2 Nq), cross (77 text
# tokens), plain self (Nk = Nq), with lengths that no chunk size divides, head widths 40/80/160, B > 1.
FLASH_SHAPES = [
    (1, 256, 512, 2, 40),
    (2, 130, 77, 2, 80),
    (2, 97, 97, 1, 160),
    (3, 61, 122, 2, 40),
]
SMALL_BUDGET = 64 * 2**10  # 64 KiB of logits: several query chunks at every shape above


def _loss_and_grads(backend, q, k, v, w):
  """Value and gradients wrt q, k, v of a random linear functional of the attention output."""
  fn = lambda q, k, v: jnp.sum(attend(q, k, v, backend).astype(jnp.float32) * w)
  return jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2)))(q, k, v)


def _cpu_fused_runs() -> bool:
  return attention.backend_supports("cpu_fused", *_qkv(1, 8, 8, 1, 8)) is None


@pytest.mark.parametrize(("shape", "backend"), [(s, "flash") for s in FLASH_SHAPES]
                         + [(s, "cpu_fused") for s in FLASH_SHAPES]
                         + [(FLASH_SHAPES[3], "auto")])
def test_flash_outputs_and_gradients_match_xla(shape, backend, monkeypatch):
  """flash (and cpu_fused, whose backward is flash's) vs xla: outputs, loss and gradients."""
  monkeypatch.setattr(attention, "CHUNK_LOGITS_BYTES", SMALL_BUDGET)  # several flash chunks per head
  b, nq, nk, _, _ = shape
  assert attention.query_chunk_size(b, nq, nk) < nq
  if backend == "cpu_fused" and not _cpu_fused_runs():
    pytest.skip(f"cpu_fused cannot run here: {attention.backend_supports('cpu_fused', *_qkv(*shape))}")
  if backend == "auto" and jax.default_backend() == "cpu":
    assert attention.auto_backend(*_qkv(*shape)) == ("cpu_fused" if _cpu_fused_runs() else "flash")
  q, k, v = _qkv(*shape, seed=5)
  w = np.random.default_rng(6).standard_normal(q.shape).astype(np.float32)
  out = jax.jit(lambda *a: attend(*a, backend=backend))(q, k, v)
  np.testing.assert_allclose(np.asarray(out), _numpy_attention(q, k, v), atol=1e-5)
  (ref_loss, ref_grads), (loss, grads) = _loss_and_grads("xla", q, k, v, w), _loss_and_grads(backend, q, k, v, w)
  np.testing.assert_allclose(float(loss), float(ref_loss), atol=1e-4)  # a sum of ~10^4 terms of either sign
  for name, g, ref in zip("qkv", grads, ref_grads, strict=True):
    np.testing.assert_allclose(np.asarray(g), np.asarray(ref), atol=1e-5, err_msg=f"d{name}")


def test_flash_bf16_within_bf16_tolerance(monkeypatch):
  monkeypatch.setattr(attention, "CHUNK_LOGITS_BYTES", SMALL_BUDGET)
  q, k, v = _qkv(2, 130, 260, 2, 40, seed=7)
  w = np.random.default_rng(8).standard_normal(q.shape).astype(np.float32)
  bf = [jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)]
  out = attend(*bf, backend="flash")
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), _numpy_attention(q, k, v), atol=3e-2)
  _, grads = _loss_and_grads("flash", *bf, w)
  _, ref_grads = _loss_and_grads("xla", q, k, v, w)  # float32 reference
  for name, g, ref in zip("qkv", grads, ref_grads, strict=True):
    assert g.dtype == jnp.bfloat16
    scale = float(np.max(np.abs(ref)))
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(ref), atol=3e-2 * scale, err_msg=f"d{name}")


def test_flash_under_checkpoint_and_its_memory(monkeypatch):
  """Under `jax.checkpoint` the gradients still match; the compiled backward holds no [B, H, Nq, Nk] block."""
  monkeypatch.setattr(attention, "CHUNK_LOGITS_BYTES", SMALL_BUDGET)
  q, k, v = _qkv(1, 512, 1024, 2, 8, seed=9)  # narrow heads: the logits dwarf q, k, v
  w = np.random.default_rng(10).standard_normal(q.shape).astype(np.float32)

  def grad_fn(backend, remat):
    fn = lambda q, k, v: jnp.sum(attend(q, k, v, backend) * w)
    return jax.jit(jax.grad(jax.checkpoint(fn) if remat else fn, argnums=(0, 1, 2)))

  ref = grad_fn("xla", False)(q, k, v)
  for g, r in zip(grad_fn("flash", True)(q, k, v), ref, strict=True):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-5)
  logits_bytes = 1 * 2 * 512 * 1024 * 4  # 4 MiB
  temp = lambda backend: grad_fn(backend, False).lower(q, k, v).compile().memory_analysis().temp_size_in_bytes
  assert temp("xla") >= logits_bytes
  assert temp("flash") < logits_bytes / 4, temp("flash")


SHARDED_SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from magicpose_jax.models import attention
    attention.CHUNK_LOGITS_BYTES = 256 * 2**10
    assert jax.device_count() == 8
    mesh = Mesh(np.array(jax.devices()), ("data",))
    batch = NamedSharding(mesh, P("data"))
    rng = np.random.default_rng(0)
    q, k, v, w = (jax.device_put(rng.standard_normal(s, dtype=np.float32), batch)
                  for s in ((8, 256, 2, 40), (8, 512, 2, 40), (8, 512, 2, 40), (8, 256, 2, 40)))
    def step(q, k, v):
      out, vjp = jax.vjp(lambda *a: attention.attend(*a, "flash"), q, k, v)
      return (out, *vjp(w))
    lowered = jax.jit(step).lower(q, k, v)
    compiled = lowered.compile()
    hlo = compiled.as_text()
    assert "all-gather" not in hlo and "all-to-all" not in hlo, "the batch is gathered"
    outs = compiled(q, k, v)
    for x in outs:
      assert x.sharding.spec[0] == "data", x.sharding
      assert x.addressable_shards[0].data.shape[0] == 1
    ref = jax.jit(jax.vmap(lambda *a: attention.xla_attention(*a), in_axes=0))(q[:, None], k[:, None], v[:, None])
    np.testing.assert_allclose(np.asarray(outs[0]), np.asarray(ref)[:, 0], atol=1e-5)
    # Per device: its batch row's chunks, far from the global batch's [8, H, Nq, Nk] logits (8 MiB).
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp < 8 * 2 * 256 * 512 * 4 // 4, temp
    print("ok", temp)
""")


def test_flash_keeps_batch_sharded_on_8_devices():
  assert run_script(SHARDED_SCRIPT).startswith("ok")


def test_explicit_backend_that_cannot_run_is_an_error_naming_backend_and_platform():
  q, k, v = _qkv(*SHAPES[1], seed=2)
  with pytest.raises(ValueError, match=r"'cudnn' cannot run .* on platform 'cpu': 'cudnn' runs on gpu only"):
    attend(q, k, v, "cudnn")
  with platforms.target_platform("gpu"):  # on a GPU target: the dtype rule speaks
    with pytest.raises(ValueError, match="float16/bfloat16"):
      attend(q, k, v, "cudnn")


def test_xla_chunked_is_an_error_naming_flash():
  q, k, v = _qkv(*SHAPES[0])
  with pytest.raises(ValueError, match="'xla_chunked' was renamed 'flash'"):
    attend(q, k, v, "xla_chunked")


def test_unknown_backend_is_an_error():
  q, k, v = _qkv(*SHAPES[0])
  with pytest.raises(ValueError, match="'flash9': unknown attention backend"):
    attend(q, k, v, "flash9")


def test_registry_lists_the_documented_backends():
  assert {"auto", "xla", "flash", "cpu_fused", "dot_product", "cudnn", "splash"} == set(available_backends())


def test_auto_picks_per_target_platform_and_shape():
  small, large = _qkv(1, 64, 128, 8, 40), _qkv(1, 1024, 2048, 8, 40)
  bf16 = [jnp.asarray(x, jnp.bfloat16) for x in large]
  assert attention.auto_backend(*large, platform="gpu") == "dot_product"  # float32: cuDNN cannot run it
  assert attention.auto_backend(*bf16, platform="gpu") == "cudnn"
  assert attention.auto_backend(*small, platform="tpu") == "xla"
  assert attention.auto_backend(*large, platform="tpu") == "splash"
  assert attention.auto_backend(*_qkv(1, 4096, 77, 8, 40), platform="tpu") == "xla"  # cross-attention: xla is cheaper
  assert attention.auto_backend(*small, platform="cpu") == "xla"
  assert attention.auto_backend(*large, platform="cpu") == ("cpu_fused" if _cpu_fused_runs() else "flash")
  with platforms.target_platform("tpu"):  # the target, not the host (a CPU here), decides
    assert attention.auto_backend(*large) == "splash"


def test_bf16_softmax_is_float32():
  """bf16 inputs: the xla backend's result stays close to the float64 reference."""
  q, k, v = _qkv(1, 8, 64, 1, 16, seed=3)
  out = attend(jnp.asarray(q, jnp.bfloat16), jnp.asarray(k, jnp.bfloat16), jnp.asarray(v, jnp.bfloat16))
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), _numpy_attention(q, k, v), atol=3e-2)
