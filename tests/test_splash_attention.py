"""TPU splash attention, run in Pallas' interpreter on the CPU: the same function as `xla_attention` (outputs and
gradients) at SD 1.5's head dims and MagicPose's sequence shapes (kv != q, 77 text tokens), and batch-sharded by
`jax.shard_map` when traced inside the training step's mesh.

Tolerance: fp32, max abs error <= 1e-5 on unit-scale outputs and gradients (the kernel's softmax runs blockwise,
online, so results differ from the one-block reference only by summation order).
"""

import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from simulated_devices import run_script
from test_train_step import tiny

from magicpose_jax.models import attention, platforms
from magicpose_jax.models import splash_attention as splash
from magicpose_jax.train import loop, sharding

# (B, Nq, Nk, H, D): head dims 40/80/160 (the kernel takes them unpadded); self-attention with the reference's
# tokens (Nk = 2 Nq), lengths that are not multiples of 128, and cross-attention over 77 text tokens.
SHAPES = [(2, 128, 256, 2, 40), (1, 200, 77, 2, 80), (1, 96, 192, 1, 160), (1, 256, 256, 2, 40)]


def _qkv(b, nq, nk, h, d, seed=0):
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.standard_normal(s, dtype=np.float32)) for s in ((b, nq, h, d), (b, nk, h, d),
                                                                               (b, nk, h, d)))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_splash_equals_xla_attention(shape):
  q, k, v = _qkv(*shape)
  out = jax.jit(lambda *a: splash.splash_attention(*a, interpret=True))(q, k, v)
  assert out.shape == q.shape and out.dtype == q.dtype
  np.testing.assert_allclose(np.asarray(out), np.asarray(attention.xla_attention(q, k, v)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", SHAPES[:2], ids=lambda s: "x".join(map(str, s)))
def test_splash_gradients_equal_xla_attention(shape):
  q, k, v = _qkv(*shape, seed=1)
  w = jnp.asarray(np.random.default_rng(2).standard_normal(q.shape, dtype=np.float32))

  def grads(fn):
    return jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a) * w), argnums=(0, 1, 2)))(q, k, v)

  ours = grads(lambda *a: splash.splash_attention(*a, interpret=True))
  for name, a, b in zip("qkv", ours, grads(attention.xla_attention), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0, err_msg=f"d{name}")


def test_splash_is_a_tpu_backend_and_an_error_elsewhere():
  q, k, v = _qkv(*SHAPES[0])
  assert attention.backend_supports("splash", q, k, v, "tpu") is None
  assert "tpu only" in attention.backend_supports("splash", q, k, v, "cpu")
  with platforms.target_platform("cpu"), pytest.raises(ValueError, match="'splash' cannot run .* platform 'cpu'"):
    attention.attend(q, k, v, "splash")


def test_auto_picks_splash_for_long_sequences_on_a_tpu_target():
  long = _qkv(1, 4096, 8192, 8, 40)
  short = _qkv(1, 64, 77, 8, 40)
  with platforms.target_platform("tpu"):
    assert attention.auto_backend(*long) == "splash"
    assert attention.auto_backend(*short) == "xla"


def test_padding_overhead():
  assert splash.padding_overhead((1, 4096, 8, 40), (1, 8192, 8, 40)) == 1.0  # SD 1.5's biggest layer
  assert splash.padding_overhead((1, 4096, 8, 40), (1, 8192, 8, 40), pad_head_dim=True) == pytest.approx(128 / 40)
  assert splash.padding_overhead((1, 4096, 8, 160), (1, 77, 8, 160)) == pytest.approx(128 / 77)
  assert splash.padding_overhead((1, 4096, 8, 160), (1, 77, 8, 160), True) == pytest.approx(256 / 160 * 128 / 77)


def test_batch_axes_match_the_training_mesh():
  assert splash.BATCH_MESH_AXES == sharding.BATCH_AXES


def test_training_step_is_traced_with_its_mesh_in_context():
  """The step's attention sees the training mesh (what splash shard_maps over), not an empty one."""
  seen = []

  def recording(q, k, v):
    seen.append(jax.sharding.get_abstract_mesh())
    return attention.xla_attention(q, k, v)

  attention.register_backend("recording_mesh", recording)
  try:
    step_fn, args = loop.abstract_setup(tiny(stage="stage1", attention_backend="recording_mesh"))
    step_fn.trace(*args)
  finally:
    attention._BACKENDS.pop("recording_mesh")
  assert seen and all(tuple(m.axis_names) == sharding.AXES for m in seen)


SHARDED_SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from magicpose_jax.models import attention, splash_attention as splash
    from magicpose_jax.train import sharding
    assert jax.device_count() == 8
    mesh = sharding.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
    batch = sharding.batch_sharding(mesh)
    rng = np.random.default_rng(0)
    q, w = (jax.device_put(rng.standard_normal((8, 200, 2, 40), dtype=np.float32), batch) for _ in range(2))
    k, v = (jax.device_put(rng.standard_normal((8, 77, 2, 40), dtype=np.float32), batch) for _ in range(2))

    def step(q, k, v):  # as train.loop traces the step: with the mesh in context
      with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        fn = lambda *a: splash.splash_attention(*a, interpret=True)
        out, vjp = jax.vjp(fn, q, k, v)
        return (out, *vjp(w))

    lowered = jax.jit(step, in_shardings=(batch,) * 3).lower(q, k, v)
    assert "manual" in lowered.as_text(), "no shard_map"
    compiled = lowered.compile()
    assert "all-gather" not in compiled.as_text(), "the batch is gathered"
    outs = compiled(q, k, v)
    for x in outs:
      assert x.addressable_shards[0].data.shape[0] == 1, x.sharding
    ref_out, ref_vjp = jax.vjp(attention.xla_attention, q, k, v)
    for a, b in zip(outs, (ref_out, *ref_vjp(w))):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)
    print("ok")
""")


def test_splash_is_shard_mapped_over_the_batch_on_8_devices():
  assert run_script(SHARDED_SCRIPT).startswith("ok")
