"""The training run: set up the stage on a mesh, resume if the workdir has a checkpoint, step, log, save.

    train(config, workdir)   # what `python -m magicpose_jax.train` calls on every host

A crash loses at most the steps since the last checkpoint; SIGTERM finishes the current step,
saves and returns normally. The config is checked (`train.validate`) before anything is loaded or compiled; a
damaged newest checkpoint is set aside (`Checkpointer.restore_latest`); Ctrl-C during the first compile stops at
once (nothing is saved), and a run that fails before its first step leaves no empty folders behind.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from magicpose_jax.data.pipeline import train_dataset
from magicpose_jax.diffusion.schedules import make_schedule
from magicpose_jax.models.controlnet import abstract_controlnet_params
from magicpose_jax.models.patch_vae import abstract_autoencoder_params
from magicpose_jax.models.unet import abstract_unet_params
from magicpose_jax.train import checkpoint as ckpt
from magicpose_jax.train import flops, samples, sharding, stages, validate
from magicpose_jax.train.metrics_log import MetricsLog
from magicpose_jax.train.optimizer import make_optimizer
from magicpose_jax.train.preemption import PreemptionFlag
from magicpose_jax.train.step import TrainState, init_state, train_step

log = logging.getLogger(__name__)
Params = dict[str, Any]


@dataclasses.dataclass
class Run:
  """A set-up run: what `train` steps, exposed so tests and benchmarks can drive the same pieces."""

  config: ml_collections.ConfigDict
  nets: stages.Networks
  mesh: jax.sharding.Mesh
  state: TrainState
  frozen: Params
  step_fn: Any  # jitted (state, frozen, batch) -> (state, metrics)
  state_shardings: Any
  batch_sharding: jax.sharding.NamedSharding
  base_source: str
  base_hash: str
  lr_fn: Any


def _place(tree: Any, shardings: Any) -> Any:
  """Host numpy -> global arrays with `shardings` (every host holds the full host copy: params are small
  enough per host; each device keeps only its shard)."""
  return jax.tree.map(lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda idx: np.asarray(x)[idx]),
                      tree, shardings)


def _jit_step(config: ml_collections.ConfigDict, nets: stages.Networks, trainable: Params, frozen: Params,
              mesh: jax.sharding.Mesh) -> dict[str, Any]:
  """Optimizer, shardings and the jitted step for trainable/frozen trees (arrays or ShapeDtypeStructs)."""
  tx, lr_fn = make_optimizer(config.optimizer, config.total_steps, trainable)
  init = functools.partial(init_state, tx=tx, seed=config.seed, ema=config.ema_decay > 0)
  abstract = jax.eval_shape(init, trainable)
  state_sh = sharding.tree_shardings(abstract, mesh, config.sharding.min_size)
  frozen_sh = sharding.tree_shardings(frozen, mesh, config.sharding.min_size)
  step = functools.partial(train_step, nets=nets, schedule=make_schedule(nets.schedule), tx=tx, lr_fn=lr_fn,
                           grad_accum_steps=config.grad_accum_steps, ema_decay=config.ema_decay,
                           drop_reference=config.drop.reference, drop_pose=config.drop.pose,
                           base_reference=config.base_reference_share, head_weight=config.head_loss_weight)
  batch_sh = sharding.batch_sharding(mesh)

  def step_in_mesh(*args: Any) -> Any:
    # Traced with the mesh in context: kernels opaque to sharding propagation (TPU splash attention) read it to
    # shard_map themselves over the batch axes instead of gathering the global batch on every device.
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return step(*args)

  step_fn = jax.jit(step_in_mesh, in_shardings=(state_sh, frozen_sh, batch_sh),
                    out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=0)
  return {"init": init, "abstract": abstract, "state_sh": state_sh, "frozen_sh": frozen_sh, "batch_sh": batch_sh,
          "step_fn": step_fn, "lr_fn": lr_fn}


def setup(config: ml_collections.ConfigDict, devices: list[jax.Device] | None = None) -> Run:
  """Builds the networks, base, initial state and the jitted step for `config` (no data, no checkpoint)."""
  stages.check_stage(config)
  init = None
  if config.init_from:
    run_config, init = ckpt.read_run(config.init_from)
    log.info("init_from %s (a %s run): trainable subtrees %s", config.init_from, run_config.stage, sorted(init))
  platform = stages.target_platform(config, devices)  # before loading anything: a wrong backend fails fast
  sd, base, base_source = stages.load_base(config, ckpt.read_run)
  nets = stages.networks(config, sd, platform)
  trainable, frozen = stages.initial_params(config, nets, sd, base, init)
  del base
  mesh = sharding.make_mesh(config.mesh, devices)
  sharding.check_batch(config.global_batch_size, config.grad_accum_steps, mesh, jax.process_count())
  base_hash = ckpt.tree_hash(frozen)
  parts = _jit_step(config, nets, trainable, frozen, mesh)
  params_sh = sharding.tree_shardings(trainable, mesh, config.sharding.min_size)
  frozen = _place(frozen, parts["frozen_sh"])
  state = jax.jit(parts["init"], out_shardings=parts["state_sh"], donate_argnums=0)(_place(trainable, params_sh))
  return Run(config, nets, mesh, state, frozen, parts["step_fn"], parts["state_sh"], parts["batch_sh"], base_source,
             base_hash, parts["lr_fn"])


def abstract_params(config: ml_collections.ConfigDict, nets: stages.Networks,
                    sd: Any) -> tuple[dict[str, Any], dict[str, Any]]:
  """(trainable, frozen) param trees of `config.stage` as `ShapeDtypeStruct`s (the `config.model` sizes)."""
  frozen_dtype = jnp.dtype(config.frozen_dtype)
  unet = abstract_unet_params(sd.unet)
  cast = lambda tree, dt: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dt), tree)
  text = jax.ShapeDtypeStruct((1, sd.text_encoder.max_position_embeddings, sd.text_encoder.hidden_size),
                              jnp.float32)
  frozen = {"vae": cast(abstract_autoencoder_params(sd.vae), frozen_dtype), "text": text}
  if nets.stage == "base":
    return {"unet": cast(unet, jnp.float32)}, frozen
  frozen["unet"] = cast(unet, frozen_dtype)
  trainable = {}
  if nets.model.config.use_appearance:
    trainable["appearance"] = cast(unet, jnp.float32)
  if nets.model.config.pose is not None:
    trainable["pose"] = cast(abstract_controlnet_params(nets.model.config.pose), jnp.float32)
  return trainable, frozen


def abstract_setup(config: ml_collections.ConfigDict,
                   devices: list[jax.Device] | None = None) -> tuple[Any, tuple[Any, Any, dict[str, Any]]]:
  """The jitted step and abstract (shape, dtype, sharding) arguments, with no array materialised.

  For compiling full-size steps on simulated devices (`benchmarks/memory_plan.py`): `step_fn.lower(*args)
  .compile().memory_analysis()`. Uses the `config.model` architectures (random-init sizes).
  """
  stages.check_stage(config)
  sd = stages.variant_configs(config)
  nets = stages.networks(config, sd, stages.target_platform(config, devices))
  mesh = sharding.make_mesh(config.mesh, devices)
  sharding.check_batch(config.global_batch_size, config.grad_accum_steps, mesh, 1)
  trainable, frozen = abstract_params(config, nets, sd)
  parts = _jit_step(config, nets, trainable, frozen, mesh)
  with_sh = lambda tree, sh: jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, sh)
  px = sd.unet.sample_size * sd.vae.downsample_factor
  image = jax.ShapeDtypeStruct((config.global_batch_size, px, px, 3), jnp.uint8, sharding=parts["batch_sh"])
  batch = {k: image for k in ("reference", "target", "pose")}
  if config.head_loss_weight != 1.0:
    batch["head_mask"] = jax.ShapeDtypeStruct(image.shape[:3], jnp.uint8, sharding=parts["batch_sh"])
  return parts["step_fn"], (with_sh(parts["abstract"], parts["state_sh"]), with_sh(frozen, parts["frozen_sh"]), batch)


def abstract_state(run: Run) -> Any:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), run.state, run.state_shardings)


def compile_step(run: Run, batch: dict[str, jax.Array]) -> Any:
  """Lowers and compiles the step for this batch's shapes, once; logs the compile time."""
  t0 = time.perf_counter()
  compiled = run.step_fn.lower(abstract_state(run), run.frozen, batch).compile()
  log.info("train step compiled in %.1f s", time.perf_counter() - t0)
  return compiled


BATCH_KEYS = ("reference", "target", "pose", "reference_latent", "target_latent", "head_mask")


def _next_batch(it: Iterator[dict], run: Run) -> dict[str, jax.Array]:
  """The next global batch on the mesh (the model's inputs only; ids stay on the host)."""
  local = next(it)
  return sharding.global_batch({k: v for k, v in local.items() if k in BATCH_KEYS}, run.batch_sharding)


def _interruptible(fn: Callable[..., Any], *args: Any) -> Any:
  """`fn(*args)` in a worker thread, the main thread waiting in short joins.

  An XLA compile holds the main thread in C++ for minutes, where Python's signal handlers cannot run: Ctrl-C
  would wait for it. Waiting here instead, the KeyboardInterrupt is raised at once (the worker is a daemon; the
  CLI exits without waiting for it).
  """
  result: dict[str, Any] = {}

  def work() -> None:
    try:
      result["value"] = fn(*args)
    except BaseException as e:  # re-raised in the calling thread
      result["error"] = e

  worker = threading.Thread(target=work, name="magicpose-compile", daemon=True)
  worker.start()
  while worker.is_alive():
    worker.join(0.1)
  if "error" in result:
    raise result["error"]
  return result["value"]


def _missing_dirs(path: str) -> list[str]:
  """`path` and the parents of it that do not exist yet (innermost first): what a run will create."""
  out = []
  while path and not os.path.exists(path):
    out.append(path)
    parent = os.path.dirname(path)
    if parent == path:
      break
    path = parent
  return out


def _remove_if_empty(dirs: list[str]) -> None:
  """Removes each of `dirs` (innermost first) that is an empty folder; stops at the first that is not."""
  for d in dirs:
    try:
      os.rmdir(d)
    except OSError:
      return


def _recorded_config(directory: str) -> tuple[str, dict] | None:
  """(step folder, its recorded config) of the newest step whose meta record reads, or None (a new run)."""
  if not os.path.isdir(directory):
    return None
  steps = sorted((d for d in os.listdir(directory) if d.isdigit()), key=int, reverse=True)
  for d in steps:
    try:
      return os.path.join(directory, d), ckpt.read_step_meta(os.path.join(directory, d))["config"]
    except (OSError, ValueError, KeyError, TypeError):
      continue  # a damaged step: restore_latest reports it
  return None


def train(config: ml_collections.ConfigDict, workdir: str, devices: list[jax.Device] | None = None) -> dict:
  """Trains to `config.total_steps` in `workdir` (resuming from its newest checkpoint). Returns the last metrics.

  `config`'s paths are made absolute in place (`validate.resolve_paths`) and the whole config is checked before
  anything is loaded: `validate.ConfigError` names every bad field, and on resume every field that must not change.
  """
  workdir = validate.user_path(workdir)
  validate.resolve_paths(config)
  validate.check_config(config, len(devices) if devices is not None else jax.device_count(), jax.process_count())
  recorded = _recorded_config(os.path.join(workdir, "checkpoints"))
  if recorded is not None:
    for key, (then, now) in validate.check_resume(config, recorded[1], recorded[0]).items():
      log.warning("resuming %s with config.%s=%r (the run used %r): allowed by config.resume_allow_changes", workdir,
                  key, now, then)
  created = _missing_dirs(os.path.join(workdir, "checkpoints"))  # removed again if the start fails
  checkpointer = logger = preempt = None
  ok = False
  try:
    run = setup(config, devices)
    dataset = train_dataset(config.data, global_batch_size=config.global_batch_size, seed=config.seed,
                            process_index=jax.process_index(), process_count=jax.process_count(),
                            with_head_mask=config.head_loss_weight != 1.0)
    data_iter = iter(dataset)
    checkpointer = ckpt.Checkpointer(workdir, config.keep_checkpoints, run.base_source, run.base_hash, config)
    start, state = checkpointer.restore_latest(abstract_state(run), data_iter, config.resume_damaged)
    if start is not None:
      run.state = state
      log.info("resumed from %s at step %d", checkpointer.directory, start)
    start = int(start or 0)
    logger = MetricsLog(workdir, config.total_steps, start)
    if start >= config.total_steps:
      logger.message(f"nothing to do: {workdir} is at step {start} >= total_steps={config.total_steps}")
      ok = True
      return {}
    # SIGTERM during the compile is honoured after the first step (saved); Ctrl-C stops the compile at once.
    preempt = PreemptionFlag((signal.SIGTERM,))
    local = next(data_iter)
    batch = sharding.global_batch({k: v for k, v in local.items() if k in BATCH_KEYS}, run.batch_sharding)
    log.info("compiling the train step")
    step_fn = _interruptible(compile_step, run, batch)
    throughput = flops.step_throughput(config, run.nets, step_fn, list(run.mesh.devices.flat), batch)
    log.info("train step: %s TFLOP/device (XLA), %.3g TFLOP model (analytic, global batch); device peak %s",
             "?" if throughput.compiled_per_device is None else f"{throughput.compiled_per_device / 1e12:.3g}",
             throughput.model_per_step / 1e12, throughput.peak)
    preempt.watch(signal.SIGINT)
    grids = _grid_writer(run, local, logger)
    last = _loop(run, step_fn, batch, data_iter, checkpointer, logger, preempt, start, grids, throughput)
    ok = True
    return last
  finally:
    _shut_down(checkpointer, logger, preempt, raise_errors=ok)
    _remove_if_empty(created)


def _shut_down(checkpointer: ckpt.Checkpointer | None, logger: MetricsLog | None, preempt: PreemptionFlag | None,
               raise_errors: bool) -> None:
  """Waits for the saves and closes everything. While another error propagates (`raise_errors` False), a save's
  error is logged instead of raised, so it cannot replace (and bury) the first one."""
  try:
    if checkpointer is not None:
      checkpointer.close()
  except ckpt.CheckpointError as e:
    if raise_errors:
      raise
    log.error("%s", e)
  finally:
    if logger is not None:
      logger.close()
    if preempt is not None:
      preempt.restore()


def _grid_writer(run: Run, local: dict, logger: MetricsLog) -> Any:
  """`write(step)`: a TensorBoard sample grid of this process's first examples (None when `sample_every` is 0)."""
  config = run.config
  if config.sample_every <= 0 or "reference" not in local:  # latent records hold no pixels to show
    return None
  n = min(4, len(local["reference"]))
  reference, pose, target = (np.asarray(local[k][:n]) for k in ("reference", "pose", "target"))
  generate = samples.make_sampler(run.nets, config.sample_steps, config.sample_guidance, run.mesh)
  key = jax.random.key(config.seed + 7)

  def write(step: int) -> None:
    params = run.state.ema if config.ema_decay > 0 else run.state.params
    images = generate(params, run.frozen, reference, pose, key)
    logger.images(step, "samples/reference_pose_generated_target",
                  samples.grid([reference, pose, np.asarray(images.addressable_data(0)), target]))

  return write


def _loop(run: Run, step_fn: Any, batch: dict, data_iter: Iterator[dict], checkpointer: ckpt.Checkpointer,
          logger: MetricsLog, preempt: PreemptionFlag, start: int, grids: Any = None,
          throughput: flops.StepThroughput | None = None) -> dict:
  config = run.config
  window: list[dict] = []  # fetched per-step metrics since the last log line
  streak = [0]  # consecutive non-finite steps
  t_window = [time.perf_counter()]
  last: dict = {}

  def record(m: dict, force: bool) -> None:
    nonlocal last
    window.append(m)
    if m["step"] % config.log_every == 0 or force:
      last = _log(run, logger, window, time.perf_counter() - t_window[0], throughput)
      window.clear()
      t_window[0] = time.perf_counter()

  pending = None  # the previous step's metrics: fetched one step late so the device queue stays full
  step = start
  while step < config.total_steps:
    run.state, metrics = step_fn(run.state, run.frozen, batch)
    step += 1
    stop = preempt.should_stop()
    final = stop or step == config.total_steps
    save = final or step % config.checkpoint_every == 0
    if not save:
      batch = _next_batch(data_iter, run)  # overlaps with the step running on the devices
    if pending is not None:
      record(_fetch(pending, streak, config.max_nonfinite_steps), False)
    pending = (step, metrics)
    if save:
      record(_fetch(pending, streak, config.max_nonfinite_steps), final)
      pending = None
      # The data iterator is saved before the next batch is drawn: a resume starts with batch step + 1.
      checkpointer.save(run.state, data_iter, force=final)
      if not final:
        batch = _next_batch(data_iter, run)
    if grids is not None and step % config.sample_every == 0:
      grids(step)
    logger.step(1)
    if stop:
      checkpointer.wait()
      logger.message(f"preempted: saved step {step} to {checkpointer.directory}; rerun the same command to resume")
      break
  return last


def _fetch(pending: tuple[int, dict], streak: list[int], limit: int) -> dict:
  """The step's metrics on the host; raises after `limit` consecutive non-finite steps."""
  step, metrics = pending
  m = {"step": step, **{k: np.asarray(jax.device_get(v)).item() for k, v in metrics.items()}}
  streak[0] = 0 if m["finite"] else streak[0] + 1
  if 0 < limit <= streak[0]:
    raise FloatingPointError(
        f"{limit} consecutive steps had a non-finite loss or gradient (their updates were skipped) up to step "
        f"{step}; lower config.optimizer.lr, check the data, or resume from the last checkpoint")
  return m


def _log(run: Run, logger: MetricsLog, window: list[dict], seconds: float,
         throughput: flops.StepThroughput | None = None) -> dict:
  """One metrics line for the steps in `window`: mean loss/grad norm over its finite steps, throughput
  (+ TFLOP/s per device and MFU with a `throughput`)."""
  dt = max(seconds, 1e-9)
  finite = [m for m in window if m["finite"]]
  values = {"loss": float(np.mean([m["loss"] for m in finite])) if finite else float("nan"),
            "grad_norm": float(np.mean([m["grad_norm"] for m in finite])) if finite else float("nan"),
            "lr": window[-1]["lr"], "skipped": float(len(window) - len(finite)),
            "steps_per_s": len(window) / dt, "images_per_s": len(window) * run.config.global_batch_size / dt}
  if throughput is not None:
    values.update(throughput.rates(dt / len(window)))
  logger.scalars(window[-1]["step"], values)
  return {"step": window[-1]["step"], **values}


def as_host(tree: Any) -> Any:
  return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)

