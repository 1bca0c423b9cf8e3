"""Reading diffusers/transformers `config.json` files into our config dataclasses, strictly.

Every model config (`UNetConfig`, `VAEConfig`, ...) accepts the reference library's
keys: ones we implement become fields; ones we implement only at one value (their
SD value) are checked against it; `_`-prefixed keys are metadata; anything else is
an error naming the key, so a model we cannot reproduce never loads silently.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Mapping
from typing import Any


def read_config_dict(config: Mapping[str, Any] | str | os.PathLike, what: str,
                     filename: str = "config.json") -> tuple[dict[str, Any], str]:
  """A config given as a dict, a JSON file, or the folder holding `filename` -> `(dict, source label)`."""
  if isinstance(config, Mapping):
    return dict(config), "config"
  path = os.fspath(config)
  if os.path.isdir(path):
    path = os.path.join(path, filename)
  try:
    with open(path) as f:
      return json.load(f), path
  except FileNotFoundError:
    raise FileNotFoundError(f"{what} config not found: {path}") from None
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e})") from None


def parse_config_entries(config: Mapping[str, Any], source: str, what: str, fields: Collection[str],
                         fixed: Mapping[str, Any], ignored: Collection[str] = (),
                         choices: Mapping[str, Collection[Any]] | None = None) -> dict[str, Any]:
  """Checks every entry; returns the kwargs for our dataclass (lists become tuples).

  Args:
    config: the parsed JSON.
    source: file name (or "config") for error messages.
    what: the model class, for error messages.
    fields: keys that map to our dataclass fields.
    fixed: keys accepted only at this value (a list of that value per level is accepted too).
    ignored: keys that carry no architecture (e.g. a tokenizer's ids in a model config).
    choices: fields whose value must be one of these (reported with the other errors).
  """
  kwargs, errors = {}, []
  for key, value in config.items():
    if key.startswith("_") or key in ignored:
      continue
    if key in fields:
      kwargs[key] = tuple(value) if isinstance(value, list) else value
      allowed = (choices or {}).get(key)
      if allowed is not None and value not in allowed:
        errors.append(f"{key}={value!r} (supported: {tuple(allowed)})")
    elif key in fixed:
      expected = fixed[key]
      per_level = isinstance(value, list) and all(v == expected for v in value)
      if value != expected and not per_level:
        errors.append(f"{key}={value!r} (only {expected!r} is supported)")
    else:
      errors.append(f"{key} (unknown key)")
  if errors:
    raise ValueError(f"{source}: unsupported {what} config entries: " + "; ".join(errors))
  return kwargs


def check_class_name(config: Mapping[str, Any], source: str, expected: str) -> None:
  name = config.get("_class_name", expected)
  if name != expected:
    raise ValueError(f"{source}: _class_name is {name!r}, expected {expected!r}")
