"""Training configs (ml_collections), shipped with the package so an installed copy finds them.

`python -m magicpose_jax.train --config stage1.py` resolves a bare name here (`config_path`); in a checkout,
`configs/` at the top is a link to this folder.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import ml_collections

CONFIGS_DIR = os.path.dirname(os.path.abspath(__file__))


def config_path(name: str) -> str:
  """`stage1`, `stage1.py` or a path -> the config file (an existing path wins; else one of ours).

  Raises:
    FileNotFoundError: naming the configs that exist.
  """
  if os.path.isfile(name):
    return os.path.abspath(name)
  for candidate in (os.path.join(CONFIGS_DIR, name), os.path.join(CONFIGS_DIR, name + ".py")):
    if os.path.isfile(candidate):
      return candidate
  raise FileNotFoundError(f"config {name!r}: no such file, and not one of the packaged configs "
                          f"{packaged_configs()}")


def packaged_configs() -> list[str]:
  """Names of the configs shipped in this folder (`demo`, `stage1`, ...)."""
  return sorted(f[:-3] for f in os.listdir(CONFIGS_DIR) if f.endswith(".py") and not f.startswith("_"))


def load_config(name: str) -> ml_collections.ConfigDict:
  """`get_config()` of a config named as `config_path` takes it (`"tiny"`, `"stage1.py"` or a file path)."""
  path = config_path(name)
  spec = importlib.util.spec_from_file_location(f"magicpose_config_{os.path.splitext(os.path.basename(path))[0]}",
                                                path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _parse_value(text: str, current: Any) -> Any:
  """A `KEY=VALUE` string in the type of the field it replaces (tuples as comma lists)."""
  if isinstance(current, bool):
    return text.lower() in ("1", "true", "yes")
  if isinstance(current, tuple | list):
    return tuple(type(current[0])(v) if current else int(v) for v in text.split(","))
  return type(current)(text) if current is not None else text


def apply_overrides(config: ml_collections.ConfigDict, overrides: list[str]) -> ml_collections.ConfigDict:
  """Sets `KEY=VALUE` strings (e.g. `data.synthetic.head_scale=1.5`, the benchmarks' `--set`) on `config`, each
  value parsed in the type of the field it replaces; returns `config`.

  Raises:
    SystemExit: an item without "=", or a key the config does not have (named).
  """
  for item in overrides:
    key, sep, value = item.partition("=")
    if not sep:
      raise SystemExit(f"--set {item!r}: expected KEY=VALUE, e.g. model.unet=tiny")
    *path, node = key.split(".")
    parent = config
    for part in path:
      parent = parent[part]
    if node not in parent:
      raise SystemExit(f"--set {item!r}: config has no field {key!r}")
    parent[node] = _parse_value(value, parent[node])
  return config
