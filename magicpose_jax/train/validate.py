"""Checks of a training config before anything is loaded or compiled, and of a resume against the run's record.

    resolve_paths(config)                    # user paths -> absolute, `~` expanded (once, at train()'s entry)
    check_config(config, num_devices=8)      # ranges, choices, mesh and batch divisibility: ConfigError
    check_resume(config, recorded, where)    # fields that must not change on resume: ConfigError

Every problem is collected and raised together, one line per field with what was expected, so a config with
three mistakes costs one try, not three compiles.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import ml_collections

from magicpose_jax.data.augment import AugmentConfig
from magicpose_jax.data.pairs import PairConfig
from magicpose_jax.data.synthetic import SyntheticConfig
from magicpose_jax.diffusion.schedules import PREDICTION_TYPES
from magicpose_jax.models.attention import available_backends
from magicpose_jax.models.magicpose import POSE_INITS
from magicpose_jax.models.unet import REMAT_POLICIES
from magicpose_jax.train import sharding
from magicpose_jax.train.config import DAMAGED_POLICIES, RESUME_FIXED, STAGES

# Config fields that name files or folders (resolved to absolute paths by `resolve_paths`).
PATH_FIELDS = ("init_from", "base.path", "data.path", "model.pose_path")


class ConfigError(ValueError):
  """A training config that cannot run (or cannot resume this run); the message names every bad field."""


def _get(config: Any, dotted: str) -> Any:
  for part in dotted.split("."):
    config = config[part]
  return config


def user_path(path: str) -> str:
  """A path as typed by a user -> absolute with `~` expanded ("" stays ""): orbax refuses relative paths, and a
  run's recorded config then means the same folder from any working directory."""
  return os.path.abspath(os.path.expanduser(path)) if path else path


def resolve_paths(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Makes `PATH_FIELDS` absolute in place (a locked config may change values); returns `config`."""
  for dotted in PATH_FIELDS:
    *parents, leaf = dotted.split(".")
    node = _get(config, ".".join(parents)) if parents else config
    if leaf in node:  # an older run's recorded config may lack a newer field
      node[leaf] = user_path(node[leaf])
  return config


def _range(lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False,
           integer: bool = False) -> Callable[[Any], str | None]:
  """A check that a value lies in [lo, hi] (or the open ends): None when it does, else what was expected."""
  kind = "an integer" if integer else "a number"
  if hi is None:
    want = f"{kind} {'>' if lo_open else '>='} {lo}"
  else:
    want = f"{kind} in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"

  def check(v: Any) -> str | None:
    if isinstance(v, bool) or not isinstance(v, int if integer else (int, float)) or math.isnan(v):
      return want
    if lo is not None and (v <= lo if lo_open else v < lo):
      return want
    if hi is not None and (v >= hi if hi_open else v > hi):
      return want
    return None

  return check


def _choice(options: Any) -> Callable[[Any], str | None]:
  options = tuple(options)
  return lambda v: None if v in options else f"one of {options}"


def _dtype(v: Any) -> str | None:
  try:
    jnp.dtype(v)
    return None
  except TypeError:
    return "a dtype name (e.g. 'float32', 'bfloat16')"


def _dataclass(cls: type) -> Callable[[Any], str | None]:
  """Runs a config dataclass's own `__post_init__` checks over the config's sub-dict."""
  def check(v: Any) -> str | None:
    fields = set(cls.__dataclass_fields__)
    try:
      cls(**{k: tuple(x) if isinstance(x, list) else x for k, x in dict(v).items() if k in fields})
      return None
    except (TypeError, ValueError) as e:
      return str(e)
  return check


POSITIVE_INT = _range(1, integer=True)
NON_NEGATIVE_INT = _range(0, integer=True)
PROBABILITY = _range(0.0, 1.0)

# Field -> check. Every numeric field of train/config.py is here (tests/test_train_validate.py checks that).
CHECKS: dict[str, Callable[[Any], str | None]] = {
    "stage": _choice(STAGES),
    "total_steps": NON_NEGATIVE_INT,
    "global_batch_size": POSITIVE_INT,
    "grad_accum_steps": POSITIVE_INT,
    "seed": NON_NEGATIVE_INT,
    "checkpoint_every": POSITIVE_INT,
    "keep_checkpoints": POSITIVE_INT,
    "log_every": POSITIVE_INT,
    "sample_every": NON_NEGATIVE_INT,
    "sample_steps": POSITIVE_INT,
    "sample_guidance": _range(0.0),
    "max_nonfinite_steps": NON_NEGATIVE_INT,
    "resume_damaged": _choice(DAMAGED_POLICIES),
    "dtype": _dtype,
    "frozen_dtype": _dtype,
    "remat_policy": _choice(REMAT_POLICIES),
    "attention_backend": _choice(available_backends()),
    "model.sample_size": POSITIVE_INT,
    "model.pose_init": _choice(POSE_INITS),
    "model.prediction_type": _choice(PREDICTION_TYPES),
    "base_reference_share": PROBABILITY,
    "drop.reference": PROBABILITY,
    "drop.pose": PROBABILITY,
    "head_loss_weight": _range(0.0, lo_open=True),
    "optimizer.lr": _range(0.0, lo_open=True),
    "optimizer.schedule": _choice(("constant", "cosine")),
    "optimizer.warmup_steps": NON_NEGATIVE_INT,
    "optimizer.b1": _range(0.0, 1.0, hi_open=True),
    "optimizer.b2": _range(0.0, 1.0, hi_open=True),
    "optimizer.eps": _range(0.0, lo_open=True),
    "optimizer.weight_decay": _range(0.0),
    "optimizer.grad_clip": _range(0.0),
    "ema_decay": _range(0.0, 1.0, hi_open=True),
    "sharding.min_size": NON_NEGATIVE_INT,
    "data.source": _choice(("synthetic", "arrayrecord")),
    "data.image_size": POSITIVE_INT,
    "data.synthetic": _dataclass(SyntheticConfig),
    "data.synthetic.holdout_identities": NON_NEGATIVE_INT,
    "data.augment": _dataclass(AugmentConfig),
    "data.pairs": _dataclass(PairConfig),
    "data.num_workers": NON_NEGATIVE_INT,
    "data.worker_buffer_size": POSITIVE_INT,
    "data.read_threads": POSITIVE_INT,
    "data.read_buffer_size": POSITIVE_INT,
}


def config_problems(config: ml_collections.ConfigDict, num_devices: int | None = None,
                    process_count: int = 1) -> list[str]:
  """Every problem of `config` as one line each (empty when it can run).

  Args:
    num_devices: the devices the mesh spans; with it the mesh and the batch's divisibility are checked too.
  """
  problems = []
  for dotted, check in CHECKS.items():
    try:
      value = _get(config, dotted)
    except (KeyError, AttributeError):
      continue  # a field this config does not have (an older run's record)
    why = check(value)
    if why is not None and isinstance(value, ml_collections.ConfigDict):  # a dataclass's own message
      problems.append(f"config.{dotted}: {why}")
    elif why is not None:
      problems.append(f"config.{dotted}={value!r}: expected {why}")
  batch, accum = config.global_batch_size, config.grad_accum_steps
  if not any(p.startswith(("config.global_batch_size=", "config.grad_accum_steps=")) for p in problems):
    if batch % accum:
      problems.append(f"config.global_batch_size={batch} is not divisible by config.grad_accum_steps={accum}")
    elif num_devices is not None:
      try:
        shape = dict(zip(sharding.AXES, sharding.mesh_shape(config.mesh, num_devices), strict=True))
        parallel = shape["data"] * shape["fsdp"]
        if (batch // accum) % parallel:
          problems.append(f"config.global_batch_size={batch} (micro-batch {batch // accum} with grad_accum_steps="
                          f"{accum}) is not divisible by the data-parallel mesh size data x fsdp = {parallel}")
        if batch % process_count:
          problems.append(f"config.global_batch_size={batch} is not divisible by the {process_count} processes")
      except ValueError as e:
        problems.append(str(e))
  problems += _pose_path_problems(config.model)
  if config.data.source == "arrayrecord" and not config.data.path:
    problems.append("config.data.source='arrayrecord' needs config.data.path (a folder written by "
                    "python -m magicpose_jax.preprocess)")
  return problems


def _pose_path_problems(model: ml_collections.ConfigDict) -> list[str]:
  init, path = model.get("pose_init", "appearance"), model.get("pose_path", "")
  if init == "controlnet" and not path:
    return ["config.model.pose_init='controlnet' needs config.model.pose_path (a diffusers ControlNet folder or an "
            "original-layout .pth/.ckpt/.safetensors file)"]
  if init == "controlnet" and not os.path.exists(path):
    return [f"config.model.pose_path={path!r}: no such file or folder"]
  if init != "controlnet" and path:
    return [f"config.model.pose_path={path!r} is read only with config.model.pose_init='controlnet' (it is "
            f"{init!r}): set one or clear the other"]
  return []


def check_config(config: ml_collections.ConfigDict, num_devices: int | None = None, process_count: int = 1) -> None:
  """Raises `ConfigError` listing every problem `config_problems` finds."""
  problems = config_problems(config, num_devices, process_count)
  if problems:
    raise ConfigError("the training config cannot run:\n  " + "\n  ".join(problems))


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[prefix + key] = list(value) if isinstance(value, tuple) else value
  return out


def _fixed(key: str) -> bool:
  return any(key == f or key.startswith(f + ".") for f in RESUME_FIXED)


def resume_changes(config: ml_collections.ConfigDict, recorded: dict) -> dict[str, tuple[Any, Any]]:
  """`{field: (recorded, now)}` of the `RESUME_FIXED` fields that differ from the run's recorded config (JSON
  form; a field either side lacks is skipped: an older or newer version's record)."""
  now = _flat(config.to_dict())
  then = _flat(recorded)
  return {k: (then[k], now[k]) for k in sorted(set(now) & set(then)) if _fixed(k) and then[k] != now[k]}


def _allowed(key: str, allow: str) -> bool:
  names = [a.strip() for a in allow.split(",") if a.strip()]
  return "*" in names or any(key == a or key.startswith(a + ".") for a in names)


def check_resume(config: ml_collections.ConfigDict, recorded: dict, where: str) -> dict[str, tuple[Any, Any]]:
  """Raises `ConfigError` when a field that must not change on resume differs from `recorded` (the config in a
  step's meta record) and `config.resume_allow_changes` does not name it; returns the allowed changes."""
  changes = resume_changes(config, recorded)
  refused = {k: v for k, v in changes.items() if not _allowed(k, config.get("resume_allow_changes", ""))}
  if refused:
    lines = [f"config.{k}: the run used {a!r}, this command says {b!r}" for k, (a, b) in refused.items()]
    raise ConfigError(
        f"{where} is a run with another config; these fields must not change on resume (the data position, the "
        f"random streams or the model would silently mean something else):\n  " + "\n  ".join(lines) +
        f"\nUse the run's values, a new --workdir, or --config.resume_allow_changes={','.join(refused)} to resume "
        f"anyway.")
  return changes
