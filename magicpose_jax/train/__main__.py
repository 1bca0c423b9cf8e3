"""`python -m magicpose_jax.train --config configs/stage1.py [--config.KEY=VALUE ...] [--workdir DIR]`.

Run the same command on every host of a multi-host job (with `--multihost`, or the coordinator
flags on GPU clusters without SLURM); re-running it on the same workdir resumes. `--config stage1.py`
also finds the packaged `magicpose_jax/configs/stage1.py` (`configs/` in a checkout).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import ml_collections
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from magicpose_jax.configs import CONFIGS_DIR, load_config, packaged_configs

_CONFIG = config_flags.DEFINE_config_file("config", None, "A configs/*.py training config.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints/, tb/, metrics.jsonl); default "
                               "outputs/<config name>.")
_MULTIHOST = flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() with auto-detection (TPU "
                               "pods, SLURM).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (GPU clusters without "
                                   "SLURM); implies --multihost.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "With --coordinator_address: processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "With --coordinator_address: this process's index.")


def resolve_config_arg(argv: list[str], configs_dir: str = CONFIGS_DIR) -> list[str]:
  """`--config stage1.py` / `--config=stage1` -> `configs/stage1.py` when the path itself does not exist."""
  out = list(argv)
  for i, arg in enumerate(out):
    if arg == "--config" and i + 1 < len(out):
      out[i + 1] = _resolve(out[i + 1], configs_dir)
    elif arg.startswith("--config="):
      out[i] = "--config=" + _resolve(arg.split("=", 1)[1], configs_dir)
  return out


def _resolve(value: str, configs_dir: str) -> str:
  path, sep, arg = value.partition(":")  # config_flags' "file.py:argument" form
  if os.path.exists(path):
    return value
  for candidate in (os.path.join(configs_dir, path), os.path.join(configs_dir, path + ".py")):
    if os.path.exists(candidate):
      return candidate + sep + arg
  return value  # config_flags reports the missing file


def _flatten(config: Any, prefix: str = "") -> list[tuple[str, Any]]:
  out = []
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      out += _flatten(value, f"{prefix}{key}.")
    else:
      out.append((prefix + key, value))
  return out


def help_text(argv: list[str]) -> str:
  """`--help`: this docstring, the flags, and every `--config.KEY` of the named config (or the packaged ones)."""
  names = [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
  names += [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"]
  lines = [__doc__.strip(), "", "flags:", flags.FLAGS.module_help(sys.modules[__name__]) or
           flags.FLAGS.main_module_help(), ""]
  if names:
    name = names[-1].partition(":")[0]
    lines.append(f"config keys of {name} (override with --config.KEY=VALUE):")
    lines += [f"  --config.{k}={v!r}" for k, v in _flatten(load_config(name))]
  else:
    lines.append(f"packaged configs (--config NAME): {', '.join(packaged_configs())}; pass one with --help to list "
                 f"its keys")
  return "\n".join(lines)


def init_distributed() -> None:
  import jax  # noqa: PLC0415 (after flag parsing, before any device use)

  if _COORDINATOR.value:
    if _NUM_PROCESSES.value is None or _PROCESS_ID.value is None:
      raise app.UsageError("--coordinator_address needs --num_processes and --process_id")
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  elif _MULTIHOST.value:
    jax.distributed.initialize()


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config is required (e.g. --config configs/demo.py)")
  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every file it writes at INFO
  logging.getLogger("magicpose_jax").setLevel(logging.INFO)
  init_distributed()
  from magicpose_jax.train.checkpoint import CheckpointError  # noqa: PLC0415 (imports jax after distributed init)
  from magicpose_jax.train.loop import train  # noqa: PLC0415
  from magicpose_jax.train.validate import ConfigError  # noqa: PLC0415

  workdir = _WORKDIR.value or os.path.join("outputs", os.path.splitext(os.path.basename(
      flags.FLAGS["config"].config_filename))[0])
  try:
    train(config, workdir)
  except (ConfigError, CheckpointError) as e:  # the message says it all; a traceback would bury it
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except KeyboardInterrupt:
    # Only reachable before the first step (after it, Ctrl-C saves and stops at the step's end). The compile
    # thread may still be running: exit without waiting for it (train() has closed the checkpointer).
    print("interrupted before the first step: nothing was saved", file=sys.stderr)
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(130)


if __name__ == "__main__":
  if "--help" in sys.argv[1:] or "-h" in sys.argv[1:]:  # absl's own --help exits 1 and knows no config keys
    print(help_text(sys.argv[1:]))
    sys.exit(0)
  sys.argv = resolve_config_arg(sys.argv)
  app.run(main)
