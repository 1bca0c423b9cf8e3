"""AdamW with warm-up, clipping and per-group learning rates over the trainable tree.

Groups are `(path regex, lr multiplier)` pairs from `config.optimizer.param_groups`, matched against
each leaf's "/"-joined path (`pose/controlnet_cond_embedding/conv_in/kernel`); the first match wins,
unmatched leaves are the default group (multiplier 1). Multiplier 0 freezes a group with
`optax.set_to_zero`, and `optax.multi_transform` gives it no Adam moments.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import optax

DEFAULT_GROUP = "default"


def path_str(path: tuple[Any, ...]) -> str:
  """A key path as "a/b/c"."""
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def learning_rate(opt: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warm-up from 0 to `opt.lr`, then constant or cosine to 0 at `total_steps`."""
  if opt.schedule not in ("constant", "cosine"):
    raise ValueError(f"config.optimizer.schedule={opt.schedule!r}; expected 'constant' or 'cosine'")
  warmup = int(opt.warmup_steps)
  if opt.schedule == "constant":
    after = optax.constant_schedule(opt.lr)
  else:
    after = optax.cosine_decay_schedule(opt.lr, max(total_steps - warmup, 1))
  if warmup <= 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, opt.lr, warmup), after], [warmup])


def _groups(param_groups: Sequence[Sequence[Any]]) -> list[tuple[str, re.Pattern, float]]:
  out = []
  for i, group in enumerate(param_groups):
    if len(group) != 2:
      raise ValueError(f"config.optimizer.param_groups[{i}]={group!r}: expected (path regex, lr multiplier)")
    pattern, mult = group
    try:
      regex = re.compile(pattern)
    except re.error as e:
      raise ValueError(f"config.optimizer.param_groups[{i}]: bad regex {pattern!r}: {e}") from e
    if float(mult) < 0:
      raise ValueError(f"config.optimizer.param_groups[{i}]: lr multiplier {mult} < 0")
    out.append((f"group{i}", regex, float(mult)))
  return out


def param_labels(params: Any, param_groups: Sequence[Sequence[Any]]) -> Any:
  """The group label of every leaf of `params` (a tree of strings)."""
  groups = _groups(param_groups)

  def label(path, _):
    name = path_str(path)
    for g, regex, _ in groups:
      if regex.fullmatch(name):
        return g
    return DEFAULT_GROUP

  return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(opt: ml_collections.ConfigDict, total_steps: int,
                   params: Any) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optimizer for the trainable tree `params` and its (unscaled) learning-rate schedule."""
  lr = learning_rate(opt, total_steps)

  def adamw(mult: float) -> optax.GradientTransformation:
    return optax.adamw(lambda step: lr(step) * mult, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                       weight_decay=opt.weight_decay)

  transforms = {DEFAULT_GROUP: adamw(1.0)}
  for g, _, mult in _groups(opt.param_groups):
    transforms[g] = optax.set_to_zero() if mult == 0 else adamw(mult)
  labels = param_labels(params, opt.param_groups)
  chain = [optax.multi_transform(transforms, labels)]
  if opt.grad_clip > 0:
    chain.insert(0, optax.clip_by_global_norm(opt.grad_clip))
  return optax.chain(*chain), lr
