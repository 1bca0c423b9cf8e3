"""Training configs, command-line overrides, mesh/batch checks, partition rules and optimizer groups (no compiles)."""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from absl import flags
from ml_collections import config_flags

from magicpose_jax.configs import CONFIGS_DIR, load_config
from magicpose_jax.train import sharding
from magicpose_jax.train.__main__ import resolve_config_arg
from magicpose_jax.train.optimizer import DEFAULT_GROUP, make_optimizer, param_labels

CONFIG_NAMES = ("tiny", "demo", "stage1", "stage2")
# ARCHITECTURE.md: the fields every training config has.
REQUIRED = ("total_steps", "global_batch_size", "checkpoint_every", "log_every", "seed", "mesh.data", "mesh.fsdp",
            "mesh.tensor", "optimizer.lr", "stage", "init_from")


def load(name: str) -> ml_collections.ConfigDict:
  return load_config(name)


def get(config: ml_collections.ConfigDict, dotted: str):
  for part in dotted.split("."):
    config = config[part]
  return config


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_configs_have_the_required_fields(name):
  config = load(name)
  for field in REQUIRED:
    get(config, field)
  assert config.stage in ("base", "stage1", "stage2")


def test_paper_settings():
  s1, s2 = load("stage1"), load("stage2")
  assert (s1.global_batch_size, s1.total_steps, s1.optimizer.lr, s1.stage) == (192, 10_000, 1e-4, "stage1")
  assert (s2.global_batch_size, s2.total_steps, s2.stage) == (16, 20_000, "stage2")
  assert s1.model.sample_size * 8 == 512 == s1.data.image_size


def parse(argv):
  """What the CLI does: resolve the config name, then absl/config_flags parse (overrides come from the argv)."""
  argv = ["train", *resolve_config_arg(argv)]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True, sys_argv=argv)
  fv(argv)
  return fv.config


def test_overrides_and_config_name_resolution():
  config = parse(["--config", "tiny.py", "--config.optimizer.lr=3e-5", "--config.stage=stage2"])
  assert config.optimizer.lr == 3e-5 and config.stage == "stage2"
  assert parse(["--config=stage1"]).global_batch_size == 192
  path = os.path.join(CONFIGS_DIR, "demo.py")
  assert parse(["--config", path]).data.image_size == 64


def test_unknown_key_is_an_error():
  with pytest.raises(Exception, match="optimizer.lrr|lrr"):
    parse(["--config", "tiny.py", "--config.optimizer.lrr=1"])


def test_mesh_shape():
  assert sharding.mesh_shape({"data": -1, "fsdp": 1, "tensor": 1}, 8) == (8, 1, 1)
  assert sharding.mesh_shape({"data": 2, "fsdp": -1, "tensor": 1}, 8) == (2, 4, 1)
  with pytest.raises(ValueError, match="does not divide the 8 devices"):
    sharding.mesh_shape({"data": 3, "fsdp": -1, "tensor": 1}, 8)
  with pytest.raises(ValueError, match="uses 4 devices but 8 are present"):
    sharding.mesh_shape({"data": 2, "fsdp": 2, "tensor": 1}, 8)
  with pytest.raises(ValueError, match="at most one axis may be -1"):
    sharding.mesh_shape({"data": -1, "fsdp": -1, "tensor": 1}, 8)
  with pytest.raises(ValueError, match="unknown axes"):
    sharding.mesh_shape({"model": 2}, 8)


def test_batch_must_divide_data_parallelism():
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  sharding.check_batch(4, 1, mesh, 1)
  with pytest.raises(ValueError, match="grad_accum_steps=3"):
    sharding.check_batch(4, 3, mesh, 1)
  with pytest.raises(ValueError, match="not divisible by the 2 processes"):
    sharding.check_batch(3, 1, mesh, 2)


class FakeMesh:
  def __init__(self):
    self.shape = {"data": 2, "fsdp": 4, "tensor": 2}


def test_param_spec_rule():
  mesh = FakeMesh()
  spec = sharding.param_spec
  assert spec((3, 3, 320, 640), mesh, 1000) == jax.sharding.PartitionSpec(None, None, "fsdp", "tensor")
  assert spec((768, 320), mesh, 1000) == jax.sharding.PartitionSpec("fsdp", "tensor")
  assert spec((320,), mesh, 1000) == jax.sharding.PartitionSpec(None)  # under min_size: replicated
  assert spec((6, 10), mesh, 1) == jax.sharding.PartitionSpec(None, "tensor")  # 6, 10 not divisible by 4


def test_param_groups_freeze_without_optimizer_state():
  params = {"pose": {"controlnet_cond_embedding": {"kernel": jnp.ones((3, 4))}, "down": {"kernel": jnp.ones((4, 4))}},
            "appearance": {"kernel": jnp.ones((2, 2))}}
  opt = load("tiny").optimizer
  opt.param_groups = (("pose/controlnet_cond_embedding/.*", 0.0), ("appearance/.*", 0.5))
  labels = param_labels(params, opt.param_groups)
  assert labels == {"pose": {"controlnet_cond_embedding": {"kernel": "group0"}, "down": {"kernel": DEFAULT_GROUP}},
                    "appearance": {"kernel": "group1"}}
  tx, _ = make_optimizer(opt, 10, params)
  state = tx.init(params)
  # Adam moments exist for 3 - 1 leaves: the frozen group has none.
  mus = [s.mu for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
         if isinstance(s, optax.ScaleByAdamState)]
  shapes = sorted(np.shape(x) for mu in mus for x in jax.tree.leaves(mu))
  assert shapes == [(2, 2), (4, 4)]
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, state, params)
  assert not np.any(updates["pose"]["controlnet_cond_embedding"]["kernel"])
  assert np.all(np.asarray(updates["pose"]["down"]["kernel"]) != 0)
  # lr multiplier 0.5: half the default group's first Adam step (clipping is off for unit grads? check ratio).
  ratio = np.asarray(updates["appearance"]["kernel"]).mean() / np.asarray(updates["pose"]["down"]["kernel"]).mean()
  np.testing.assert_allclose(ratio, 0.5, rtol=1e-5)


def test_bad_param_group():
  opt = load("tiny").optimizer
  opt.param_groups = (("(", 1.0),)
  with pytest.raises(ValueError, match="param_groups\\[0\\]: bad regex"):
    make_optimizer(opt, 10, {"a": jnp.ones(2)})
