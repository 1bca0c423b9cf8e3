"""Orbax checkpoints of a training run: `WORKDIR/checkpoints/<step>/{state, data, meta}`.

* `state`: the `TrainState` (trainable params, optimizer state, EMA, step, RNG, non-finite count),
  sharded arrays written by every host (async: training goes on while it is written).
* `data`: each process's grain iterator state (`process_<i>-of-<n>.json`).
* `meta`: the run's config, the frozen base's source and content hash, and the trainable tree's
  shapes, so a resume or an `init_from` can refuse a different base or model shape with a clear
  message before touching the arrays.

The frozen base is not re-saved (it can be GBs); it is reloaded from its source and must hash the same.

On resume (`Checkpointer.restore_latest`) a newest step that cannot be read (a truncated array file, a missing
`meta/metadata` or `state/`, a garbled data-iterator JSON) is reported in one paragraph and, by default, renamed
`<step>.damaged-<n>` (never deleted; orbax and `latest_checkpoint_dir` only see all-digit folders) and the
next older step is tried.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import threading
import weakref
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from magicpose_jax.train.optimizer import path_str

Params = dict[str, Any]
log = logging.getLogger(__name__)


class CheckpointError(ValueError):
  """A checkpoint that cannot be used here; the message names the step folder, the file and why."""


def root_cause(e: BaseException, limit: int = 400) -> str:
  """`Type: first line` of the innermost exception of `e`'s chain (orbax wraps a tensorstore error in several
  layers; the innermost names the array and the file), shortened to `limit` characters."""
  seen = set()
  while id(e) not in seen and (e.__cause__ or e.__context__) is not None:
    seen.add(id(e))
    e = e.__cause__ or e.__context__
  text = (str(e).strip().splitlines() or [""])[0]
  text = f"{type(e).__name__}: {text}"
  return text if len(text) <= limit else text[:limit] + " ..."


def _json_problem(path: str) -> str | None:
  if not os.path.isfile(path):
    return f"{path} is missing"
  try:
    with open(path) as f:
      json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    return f"{path} is not valid JSON ({e})"
  return None


def step_problem(step_dir: str, process_index: int = 0, process_count: int = 1, with_data: bool = True) -> str | None:
  """Why `step_dir` cannot be restored, from its files alone (cheap; no arrays read), or None when they look whole.

  Checks `meta/metadata` (JSON with the fields a resume needs), `state/` and orbax's `state/_METADATA`, and with
  `with_data` this process's `data/process_<i>-of-<n>.json`. A truncated array file passes this; the restore
  itself finds it.
  """
  meta = os.path.join(step_dir, "meta", "metadata")
  problem = _json_problem(meta)
  if problem is None:
    with open(meta) as f:
      missing = {"config", "base_hash", "trainable_shapes"} - set(json.load(f))
    if missing:
      problem = f"{meta} lacks {sorted(missing)}"
  if problem is None and not os.path.isdir(os.path.join(step_dir, "state")):
    problem = f"{os.path.join(step_dir, 'state')} is missing"
  if problem is None:
    problem = _json_problem(os.path.join(step_dir, "state", "_METADATA"))
  if problem is None and with_data:
    problem = _json_problem(os.path.join(step_dir, "data", f"process_{process_index}-of-{process_count}.json"))
  return problem


def set_aside(step_dir: str) -> str:
  """Renames a damaged step folder to `<step>.damaged-<n>` (the first free n); returns the new path."""
  n = 1
  while os.path.exists(f"{step_dir}.damaged-{n}"):
    n += 1
  os.rename(step_dir, f"{step_dir}.damaged-{n}")
  return f"{step_dir}.damaged-{n}"


def _all_processes_agree(ok: bool) -> bool:
  """True when `ok` on every process (a collective when there are several: all must take the same branch)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils  # noqa: PLC0415 (multi-host only)

  return bool(np.all(multihost_utils.process_allgather(np.asarray(ok, np.int32))))


def tree_hash(tree: Any) -> str:
  """sha256 over every leaf's path, dtype, shape and bytes (order-independent of dict insertion)."""
  h = hashlib.sha256()
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  for path, leaf in sorted(leaves, key=lambda pl: path_str(pl[0])):
    a = np.asarray(leaf)
    h.update(f"{path_str(path)}|{a.dtype.str}|{a.shape}|".encode())
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()


def shapes(tree: Any) -> dict[str, list[int]]:
  return {path_str(p): list(np.shape(x)) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def config_from_json(text: str) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(json.loads(text))


def latest_checkpoint_dir(path: str) -> str:
  """A workdir, its `checkpoints/` folder or one step folder -> the newest step folder."""
  for root in (os.path.join(path, "checkpoints"), path):
    steps = [d for d in glob.glob(os.path.join(root, "*")) if os.path.basename(d).isdigit()]
    if steps:
      return max(steps, key=lambda d: int(os.path.basename(d)))
  if os.path.isdir(os.path.join(path, "state")):
    return path
  raise FileNotFoundError(f"{path}: no training checkpoint (expected a workdir with checkpoints/<step>/)")


def is_training_run(path: str) -> bool:
  try:
    latest_checkpoint_dir(path)
    return True
  except FileNotFoundError:
    return False


# Orbax's async saves share per-process state (the operation ids and signals that order the creation of a step's
# temporary directories): two CheckpointManagers saving at once in one process, as the demo's `--jobs 2` phases do
# in threads, can write an item into a directory that does not exist yet (FileNotFoundError on
# `data.orbax-checkpoint-tmp/process_0-of-1.json`, reproduced with two threads saving). So one process saves one
# step at a time: a save starts after every other checkpointer's in-flight save is written. A training process
# has one checkpointer, for which this changes nothing.
_SAVE_LOCK = threading.Lock()
_LIVE: weakref.WeakSet[Checkpointer] = weakref.WeakSet()


class Checkpointer:
  """Keep-last-K async orbax checkpoints of one run."""

  def __init__(self, workdir: str, keep: int, base_source: str, base_hash: str, config: ml_collections.ConfigDict):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self.base_source, self.base_hash, self.config = base_source, base_hash, config
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options)
    self._deferred: Exception | None = None  # an async save's error met while another run waited for it
    _LIVE.add(self)

  def _finish_for_another(self) -> None:
    """Waits for this checkpointer's in-flight save; its error is kept for this run's next save or wait."""
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # this run reports it, not the one that waited
      self._deferred = self._deferred or e

  def _raise_deferred(self) -> None:
    if self._deferred is not None:
      e, self._deferred = self._deferred, None
      raise CheckpointError(f"writing a checkpoint to {self.directory} failed: {root_cause(e)}")

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, state: Any, data_iter: Any, force: bool = False) -> bool:
    step = int(jax.device_get(state.step))
    meta = {"config": json.loads(self.config.to_json_best_effort()), "base_source": self.base_source,
            "base_hash": self.base_hash, "step": step, "trainable_shapes": shapes(state.params)}
    args = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
    if data_iter is not None:
      args["data"] = grain.checkpoint.CheckpointSave(data_iter)
    self._raise_deferred()
    try:  # also raises a previous async save's error
      with _SAVE_LOCK:
        for other in list(_LIVE):
          if other is not self:
            other._finish_for_another()
        return self.manager.save(step, args=ocp.args.Composite(**args), force=force)
    except Exception as e:  # orbax's background threads: one line with the cause, not their tracebacks
      raise CheckpointError(f"saving checkpoint step {step} to {self.directory} failed: {root_cause(e)}") from None

  def read_meta(self, step: int) -> dict:
    return read_step_meta(os.path.join(self.directory, str(step)))

  def restore(self, step: int, abstract_state: Any, data_iter: Any) -> Any:
    """The state at `step` (placed per `abstract_state`'s shardings); restores `data_iter` in place."""
    meta = self.read_meta(step)
    where = os.path.join(self.directory, str(step))
    if meta["base_hash"] != self.base_hash:
      raise CheckpointError(f"{where}: this run's frozen base was {meta['base_source']!r} "
                       f"(sha256 {meta['base_hash'][:12]}), but the base now is {self.base_source!r} "
                       f"(sha256 {self.base_hash[:12]}); resume with the "
                       f"same config.base / init_from, or use a new --workdir")
    check_shapes(meta["trainable_shapes"], shapes(abstract_state.params), where)
    args = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
      args["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    return self.manager.restore(step, args=ocp.args.Composite(**args))["state"]

  def restore_latest(self, abstract_state: Any, data_iter: Any, policy: str = "fallback") -> tuple[int | None, Any]:
    """(step, state) of the newest readable step, or (None, None) when there is none; restores `data_iter`.

    A step that cannot be read is reported in one paragraph (which step, which file, why); with `policy`
    "fallback" it is set aside (`set_aside`) and the next older step is tried, with "error" a `CheckpointError`
    stops the run. A checkpoint of another model or base (`CheckpointError` from `restore`) is never skipped.
    """
    for step in sorted(self.manager.all_steps(), reverse=True):
      step_dir = os.path.join(self.directory, str(step))
      problem = step_problem(step_dir, jax.process_index(), jax.process_count(), data_iter is not None)
      state = None
      if problem is None:
        try:
          state = self.restore(step, abstract_state, data_iter)
        except CheckpointError:
          raise
        except Exception as e:  # orbax, tensorstore and grain raise many types for unreadable files
          problem = f"{os.path.join(step_dir, 'state')} cannot be read: {root_cause(e)}"
      if _all_processes_agree(problem is None):
        return step, state
      problem = problem or "another process could not read its part (see its log)"
      older = [s for s in self.manager.all_steps() if s < step]
      what = f"checkpoint step {step} ({step_dir}) is damaged: {problem}."
      if policy != "fallback":
        raise CheckpointError(
            f"{what} config.resume_damaged={policy!r} refuses to resume from an older step"
            f"{f' (the newest is {max(older)})' if older else ' (there is none)'}: move {step_dir} aside, or rerun "
            f"with --config.resume_damaged=fallback to set it aside and resume from there.")
      aside = step_dir
      if jax.process_index() == 0:
        aside = set_aside(step_dir)
      if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # noqa: PLC0415

        multihost_utils.sync_global_devices(f"set aside checkpoint {step}")
      self.manager.reload()
      log.warning("%s It was moved to %s (kept, not deleted) and the run resumes from %s.", what, aside,
                  f"step {max(older)}" if older else "the start (no older step)")
    return None, None

  def wait(self) -> None:
    """Until the async saves are written; their error as a `CheckpointError` naming the cause."""
    self._raise_deferred()
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # raised from orbax's writer threads
      raise CheckpointError(f"writing a checkpoint to {self.directory} failed: {root_cause(e)}") from None

  def close(self) -> None:
    try:
      self.wait()
    finally:
      _LIVE.discard(self)
      self.manager.close()


def check_shapes(saved: dict[str, list[int]], expected: dict[str, list[int]], where: str) -> None:
  """A clear error when a checkpoint's trainable tree is not this model's."""
  missing = sorted(set(expected) - set(saved))
  unexpected = sorted(set(saved) - set(expected))
  mismatched = sorted(k for k in set(saved) & set(expected) if list(saved[k]) != list(expected[k]))
  if missing or unexpected or mismatched:
    lines = [f"{where}: the checkpoint is of another model shape than this config builds"]
    for name, keys in (("missing", missing), ("unexpected", unexpected)):
      if keys:
        lines.append(f"  {name} ({len(keys)}): {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}")
    for k in mismatched[:8]:
      lines.append(f"  {k}: checkpoint {tuple(saved[k])} vs model {tuple(expected[k])}")
    raise CheckpointError("\n".join(lines))


def read_step_meta(step_dir: str) -> dict:
  """A step folder's `meta` record (config, base source and hash, step, trainable shapes)."""
  meta_path = os.path.join(step_dir, "meta", "metadata")
  if not os.path.isfile(meta_path):
    raise FileNotFoundError(f"{step_dir}: no meta/metadata (not a magicpose_jax training checkpoint?)")
  try:
    with open(meta_path) as f:
      return json.load(f)
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{meta_path}: not valid JSON ({e}); the step folder is damaged: pass an older one"
                          ) from None


def _nested(flat: dict[str, Any]) -> dict[str, Any]:
  """{"a/b/c": x} -> {"a": {"b": {"c": x}}} (the inverse of `shapes`' key paths)."""
  tree: dict[str, Any] = {}
  for path, value in flat.items():
    *parents, leaf = path.split("/")
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def read_trainable(step_dir: str, name: str = "params") -> tuple[dict, Params]:
  """(meta, the state's `name` subtree: "params" or "ema") of one step folder, as host numpy in its saved dtype.

  Only that subtree is read: not the optimizer state (twice the params for Adam) nor the other of params/EMA, and
  on any device topology (a run trained on a pod reads on a laptop).
  """
  step_dir = os.path.abspath(os.path.expanduser(step_dir))  # orbax reads absolute paths only
  meta = read_step_meta(step_dir)
  where = os.path.join(step_dir, "state")
  if not os.path.isdir(where):
    raise CheckpointError(f"{where}: no such folder (the step holds {sorted(os.listdir(step_dir))}); a crash during "
                          f"an async save leaves a step without it: pass an older step folder")
  if name == "ema" and not float(meta["config"].get("ema_decay", 0) or 0) > 0:
    raise CheckpointError(f"{step_dir}: the run kept no EMA (config.ema_decay was 0); use its params")
  # The subtree's structure comes from meta's shape record, not orbax's metadata (reading that costs as much as
  # the arrays of a small run); the leaves' dtypes are the saved ones (restore args without a dtype).
  target = {name: _nested({k: np.zeros(()) for k in meta["trainable_shapes"]})}
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
  try:
    with ocp.PyTreeCheckpointer() as reader:
      tree = reader.restore(where, args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args,
                                                               partial_restore=True))[name]
  except Exception as e:  # orbax raises several types for a missing, truncated or foreign tree)
    raise CheckpointError(f"{where}: cannot be read as a training state with a {name!r} subtree ({root_cause(e)})"
                          ) from None
  params = jax.tree.map(np.asarray, tree)
  check_shapes(meta["trainable_shapes"], shapes(params), step_dir)
  return meta, params


def read_run(path: str, with_params: bool = True) -> tuple[ml_collections.ConfigDict, Params | None]:
  """A finished or running training run's config and trainable params (host numpy), for `init_from`.

  `with_params=False`: the config alone (params None), read from the meta record without touching the arrays.
  """
  step_dir = latest_checkpoint_dir(path)
  if not with_params:
    return ml_collections.ConfigDict(read_step_meta(step_dir)["config"]), None
  meta, params = read_trainable(step_dir)
  return ml_collections.ConfigDict(meta["config"]), params
