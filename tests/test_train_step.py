"""The jit training step on one device: what trains, what stays frozen, EMA, and skipped non-finite steps."""


import jax
import numpy as np
import optax
import pytest

from magicpose_jax.configs import load_config
from magicpose_jax.data.pipeline import train_dataset
from magicpose_jax.train import loop
from magicpose_jax.train.optimizer import path_str

HINT = "pose/controlnet_cond_embedding/"


def tiny(**changes):
  """The tiny config with dotted keys set, e.g. `tiny(**{"optimizer.lr": 1e-2})`."""
  config = load_config("tiny")
  config.update_from_flattened_dict(changes)
  return config


def flat(tree):
  return {path_str(p): np.asarray(jax.device_get(x)) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.fixture(scope="module")
def stage2():
  config = tiny(stage="stage2", ema_decay=0.5)
  config.optimizer.param_groups = ((HINT + ".*", 0.0),)  # freeze the pose net's hint encoder
  run = loop.setup(config)
  it = iter(train_dataset(config.data, global_batch_size=config.global_batch_size, seed=config.seed))
  batches = [loop._next_batch(it, run) for _ in range(3)]
  before = {"params": flat(run.state.params), "frozen": flat(run.frozen)}
  step_fn = loop.compile_step(run, batches[0])
  metrics = []
  for batch in batches:
    run.state, m = step_fn(run.state, run.frozen, batch)
    metrics.append(jax.device_get(m))
  return run, step_fn, batches, before, metrics


def test_frozen_base_is_bit_identical_and_has_no_optimizer_state(stage2):
  run, _, _, before, metrics = stage2
  assert all(np.isfinite(m["loss"]) and m["finite"] for m in metrics)
  after = flat(run.frozen)
  assert sorted(after) == sorted(before["frozen"]) and any(k.startswith("unet/") for k in after)
  for k, v in before["frozen"].items():
    np.testing.assert_array_equal(after[k], v, err_msg=k)
  # Optimizer state: Adam moments only for trainable, non-frozen-group leaves.
  adam = [s for s in jax.tree.leaves(run.state.opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
          if isinstance(s, optax.ScaleByAdamState)]
  moment_shapes = sorted(tuple(np.shape(x)) for s in adam for x in jax.tree.leaves(s.mu))
  params = flat(run.state.params)
  expected = sorted(v.shape for k, v in params.items() if not k.startswith(HINT))
  assert moment_shapes == expected
  assert not any(k.startswith("unet") for k in flat(run.state.opt_state))


def test_trainable_groups_update_and_frozen_group_does_not(stage2):
  run, _, _, before, _ = stage2
  after = flat(run.state.params)
  hint = [k for k in after if k.startswith(HINT)]
  assert hint
  for k in hint:
    np.testing.assert_array_equal(after[k], before["params"][k], err_msg=k)
  changed = lambda prefix: [k for k in after if k.startswith(prefix) and not np.array_equal(after[k],
                                                                                         before["params"][k])]
  assert changed("appearance/")
  assert changed("pose/controlnet_down_blocks_")  # the zero convs leave zero after the first update
  assert int(jax.device_get(run.state.step)) == 3


def test_ema_tracks_params(stage2):
  run, _, _, before, _ = stage2
  ema, params = flat(run.state.ema), flat(run.state.params)
  k = next(k for k in params if k.startswith("appearance/") and not np.array_equal(params[k], before["params"][k]))
  assert not np.array_equal(ema[k], params[k]) and not np.array_equal(ema[k], before["params"][k])


def test_nonfinite_loss_skips_the_update(stage2):
  run, step_fn, batches, _, _ = stage2
  state = jax.tree.map(lambda x: x.copy(), run.state)  # the step donates its input
  snapshot = flat(state.params), flat(state.opt_state)
  poisoned = dict(run.frozen)
  poisoned["text"] = run.frozen["text"] * np.float32("nan")
  new, m = step_fn(state, poisoned, batches[0])
  m = jax.device_get(m)
  assert not m["finite"] and not np.isfinite(m["loss"])
  assert int(new.nonfinite) == 1 and int(new.step) == 4
  for k, v in flat(new.params).items():
    np.testing.assert_array_equal(v, snapshot[0][k], err_msg=k)
  for k, v in flat(new.opt_state).items():
    np.testing.assert_array_equal(v, snapshot[1][k], err_msg=k)


def test_tiny_base_overfits_a_fixed_small_set(tmp_path):
  """60 steps on 2 synthetic frames (no augmentation) take the eps-MSE from ~1 to well below 0.35.

  Why these numbers: at init the prediction is ~0, and E||eps||^2 = 1, so the first window is near 1; a model
  that ignores its input cannot go below 1. A memorised 2-image set makes eps recoverable from x_t at almost
  every t; measured on this config, windows 41-60 sit at 0.13-0.23. Below 0.35 means the step, the loss and the
  optimizer learn; a broken gradient path (e.g. the model disconnected from the loss) stays at ~1.
  """
  import json  # noqa: PLC0415

  config = tiny(stage="base", total_steps=60, checkpoint_every=1000, log_every=10)
  config.data.synthetic.num_identities = 1
  config.data.synthetic.frames_per_identity = 2
  config.data.augment.enabled = False
  config.optimizer.lr = 3e-3
  loop.train(config, str(tmp_path))
  with open(tmp_path / "metrics.jsonl") as f:
    losses = [json.loads(line)["loss"] for line in f]
  assert len(losses) == 6
  assert losses[0] > 0.7, losses
  assert np.mean(losses[-2:]) < 0.35, losses


def test_reference_only_base_is_stage_1_with_the_unet_as_its_own_controller():
  """Stage "base" with `base_reference_share` 1: the loss is stage 1's with the Appearance Controller's params set
  to the base UNet's, and the gradient is the sum of stage 1's gradients for the controller and for the main UNet
  (one set of weights in both roles). With share 0 the reference is not read (plain SD training)."""
  from magicpose_jax.diffusion.schedules import make_schedule  # noqa: PLC0415
  from magicpose_jax.train import stages, step  # noqa: PLC0415

  config = tiny(stage="base", base_reference_share=1.0)
  run = loop.setup(config)
  batch = loop._next_batch(iter(train_dataset(config.data, global_batch_size=config.global_batch_size,
                                              seed=config.seed)), run)
  unet, frozen, key = run.state.params["unet"], run.frozen, jax.random.key(1)
  schedule = make_schedule(run.nets.schedule)
  base_loss = lambda p, share: step.loss_fn({"unet": p}, frozen, batch, key, run.nets, schedule, 0.0, 0.0, share)
  loss, grads = jax.value_and_grad(base_loss)(unet, 1.0)

  stage1 = stages.networks(tiny(stage="stage1"), stages.variant_configs(config))
  stage1_loss = lambda app, main: step.loss_fn({"appearance": app}, {**frozen, "unet": main}, batch, key, stage1,
                                               schedule, 0.0, 0.0)
  expected, (g_app, g_main) = jax.value_and_grad(stage1_loss, argnums=(0, 1))(unet, unet)
  np.testing.assert_allclose(float(loss), float(expected), rtol=1e-6)
  total = jax.tree.map(lambda a, b: a + b, g_app, g_main)
  got, want = flat(grads), flat(total)
  assert got.keys() == want.keys()
  for k in got:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-6, err_msg=k)
  # Neither role's gradient alone is the answer (the test can tell them apart).
  assert not np.allclose(got["conv_in/kernel"], flat(g_app)["conv_in/kernel"], rtol=1e-3)

  plain = float(base_loss(unet, 0.0))
  assert plain == pytest.approx(float(step.loss_fn({"unet": unet}, frozen, batch, key, run.nets, schedule, 0.0, 0.0)))
  assert abs(plain - float(loss)) > 1e-6  # the reference changed the prediction


def test_head_loss_weight_is_a_weighted_mean_over_the_head_mask():
  """`head_weight` lambda with the head mask on the top half of every frame: the loss is (lambda E_top + E_bottom) /
  (lambda + 1) with E the plain mean error of each half. Two weights fix E_top and E_bottom; a third must follow.
  A mask covering everything gives the plain loss at any weight. And a step trains with the data's masks."""
  from magicpose_jax.diffusion.schedules import make_schedule  # noqa: PLC0415
  from magicpose_jax.train import step  # noqa: PLC0415

  config = tiny(stage="stage1", head_loss_weight=4.0)
  run = loop.setup(config)
  it = iter(train_dataset(config.data, global_batch_size=config.global_batch_size, seed=config.seed,
                          with_head_mask=True))
  batch = loop._next_batch(it, run)
  assert "head_mask" in batch
  schedule, key = make_schedule(run.nets.schedule), jax.random.key(2)
  size = batch["target"].shape[1]
  top = np.zeros(batch["target"].shape[:3], np.uint8)
  top[:, : size // 2] = 1

  def loss(weight, mask):
    b = {**batch, "head_mask": mask}
    return float(step.loss_fn(run.state.params, run.frozen, b, key, run.nets, schedule, 0.0, 0.0, 0.0, weight))

  plain = float(step.loss_fn(run.state.params, run.frozen, batch, key, run.nets, schedule, 0.0, 0.0))
  assert loss(1.0, top) == pytest.approx(plain, rel=1e-6)
  assert loss(7.0, np.ones_like(top)) == pytest.approx(plain, rel=1e-5)
  l3 = loss(3.0, top)
  e_top = 2 * l3 - plain  # plain = (E_top + E_bottom) / 2 and l3 = (3 E_top + E_bottom) / 4
  e_bottom = 2 * plain - e_top
  assert abs(e_top - e_bottom) > 1e-3 * plain  # the halves differ, so a wrong weighting would show
  assert loss(10.0, top) == pytest.approx((10 * e_top + e_bottom) / 11, rel=1e-5)

  weights = np.asarray(step.head_weights(top, (top.shape[0], 4, 4, 4), 3.0))
  assert weights.shape == (top.shape[0], 4, 4, 1)
  np.testing.assert_allclose(weights[:, :2], 3.0)
  np.testing.assert_allclose(weights[:, 2:], 1.0)
  with pytest.raises(ValueError, match="does not tile the latents"):
    step.head_weights(top[:, :, :-1], (top.shape[0], 4, 4, 4), 3.0)

  step_fn = loop.compile_step(run, batch)
  run.state, metrics = step_fn(run.state, run.frozen, batch)
  assert bool(metrics["finite"])


def test_cached_latent_moments_are_sampled_like_the_vae_posterior():
  """Batches from `preprocess --vae` records carry latent moments (mean ++ logvar); the step samples them."""
  import jax.numpy as jnp  # noqa: PLC0415

  from magicpose_jax.train import stages  # noqa: PLC0415
  from magicpose_jax.train.step import latents  # noqa: PLC0415

  config = tiny()
  nets = stages.networks(config, stages.variant_configs(config))
  rng = np.random.default_rng(0)
  mean = rng.standard_normal((2, 4, 4, 4)).astype(np.float32)
  logvar = rng.uniform(-4, 0, (2, 4, 4, 4)).astype(np.float32)
  key = jax.random.key(3)
  z = latents(nets, {}, {"target_latent": jnp.concatenate([mean, logvar], -1)}, "target", key)
  eps = jax.random.normal(key, mean.shape, jnp.float32)  # DiagonalGaussian.sample's draw
  expected = (mean + np.exp(0.5 * logvar) * np.asarray(eps)) * nets.vae.config.scaling_factor
  np.testing.assert_allclose(np.asarray(z), expected, rtol=1e-6, atol=1e-6)


def test_split_micro_is_strided():
  """Micro-batch j holds rows j, j+n, ...: with the batch split over D devices in contiguous blocks, every
  micro-batch then takes B/(n*D) rows from each device's block (no cross-device moves inside the scan)."""
  from magicpose_jax.train.step import split_micro  # noqa: PLC0415

  rows = np.arange(12 * 3).reshape(12, 3)
  micro = split_micro({"x": rows}, 3)["x"]
  assert micro.shape == (3, 4, 3)
  for j in range(3):
    np.testing.assert_array_equal(micro[j], rows[j::3])
  blocks = np.arange(12).reshape(2, 6)  # 2 devices, 6 rows each
  for j in range(3):
    owners = [d for r in micro[j][:, 0] // 3 for d in range(2) if r in blocks[d]]
    assert owners == [0, 0, 1, 1], j  # two rows from each device


def test_gradient_accumulation_averages_strided_micro_batches(monkeypatch):
  """`grad_accum_steps=n` applies the mean over micro-batches j of the gradient of micro-batch j (rows j::n,
  key fold_in(key, j)): checked against those n gradients computed one by one with plain SGD(lr=1).

  A stand-in loss (row-dependent, key-dependent, non-linear in params) keeps this independent of the UNet."""
  import jax.numpy as jnp  # noqa: PLC0415

  from magicpose_jax.train import step as step_module  # noqa: PLC0415

  def toy_loss(params, frozen, batch, key, *args):
    noise = jax.random.normal(key, batch["x"].shape)
    pred = jnp.tanh(batch["x"] @ params["w"]) + params["b"]
    return jnp.mean((pred - batch["y"] - 0.1 * noise[:, :1]) ** 2)

  monkeypatch.setattr(step_module, "loss_fn", toy_loss)
  rng = np.random.default_rng(0)
  params = {"w": rng.standard_normal((5, 1)).astype(np.float32), "b": np.zeros((1,), np.float32)}
  batch = {"x": rng.standard_normal((8, 5)).astype(np.float32), "y": rng.standard_normal((8, 1)).astype(np.float32)}
  tx = optax.sgd(1.0)
  state = step_module.init_state(params, tx, seed=0, ema=False)
  run = lambda n: step_module.train_step(state, {}, batch, nets=None, schedule=None, tx=tx, lr_fn=lambda s: 1.0,
                                         grad_accum_steps=n)
  new, metrics = jax.jit(run, static_argnums=0)(4)

  key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  losses, grads = zip(*[jax.value_and_grad(toy_loss)(params, {}, {k: v[j::4] for k, v in batch.items()},
                                                     jax.random.fold_in(key, j)) for j in range(4)], strict=True)
  np.testing.assert_allclose(metrics["loss"], np.mean(losses), rtol=1e-6)
  for name, value in params.items():
    expected = value - np.mean([g[name] for g in grads], axis=0)
    np.testing.assert_allclose(np.asarray(new.params[name]), expected, rtol=1e-5, atol=1e-6, err_msg=name)
