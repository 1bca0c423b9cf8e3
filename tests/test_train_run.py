"""Training runs through the CLI: resume after SIGKILL is bit-exact, SIGTERM saves and exits 0, stage 1 -> stage 2,
a workdir of another model or base is refused, a damaged newest step is set aside (resume bit-exact from the one
before), a config changed on resume is refused, and Ctrl-C during the first compile exits at once."""

import glob
import os
import shutil
import signal
import subprocess
import threading
import time

import grain
import jax
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
import train_cli
from flax.training import train_state
from test_train_step import flat, tiny

from magicpose_jax.train import checkpoint as ckpt
from magicpose_jax.train import loop
from magicpose_jax.train.validate import ConfigError

K = 3  # checkpoint interval; the straight run does 2K steps


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("jax_cache"))


@pytest.fixture(scope="module")
def straight(tmp_path_factory, cache):
  workdir = str(tmp_path_factory.mktemp("straight"))
  train_cli.run(workdir, cache, total_steps=2 * K, checkpoint_every=K, log_every=1, sample_every=2 * K,
                sample_steps=2)
  return workdir


def wait_for(predicate, timeout=300.0, proc=None):
  t0 = time.time()
  while not predicate():
    if proc is not None and proc.poll() is not None:
      raise AssertionError(f"training exited early ({proc.returncode}):\n{proc.stderr.read()[-4000:]}")
    if time.time() - t0 > timeout:
      raise TimeoutError
    time.sleep(0.02)


def test_straight_run_writes_checkpoints_and_metrics(straight):
  assert train_cli.steps_saved(straight) == [K, 2 * K]
  records = train_cli.metrics(straight)
  assert [r["step"] for r in records] == list(range(1, 2 * K + 1))
  assert all(np.isfinite(r["loss"]) and r["images_per_s"] > 0 and r["lr"] > 0 for r in records)
  # FLOP rates from the compiled step (train.flops); no MFU on a CPU (no peak in the table).
  assert all(r["tflops_per_s"] > 0 and r["model_tflops_per_s"] > 0 and "mfu" not in r for r in records)
  events = [os.path.join(straight, "tb", f) for f in os.listdir(os.path.join(straight, "tb"))]
  data = b"".join(open(f, "rb").read() for f in events)
  assert b"train/loss" in data and b"samples/reference_pose_generated_target" in data  # scalars and a sample grid


def test_resume_after_sigkill_is_bit_exact(straight, cache, tmp_path):
  workdir = str(tmp_path / "killed")
  # Same run but "endless": killed right after its first checkpoint (at step K) is complete.
  proc = train_cli.start(workdir, cache, total_steps=1000, checkpoint_every=K, log_every=1)
  try:
    wait_for(lambda: K in train_cli.steps_saved(workdir), proc=proc)
    proc.send_signal(signal.SIGKILL)
  finally:
    proc.wait()
  saved = train_cli.steps_saved(workdir)
  assert proc.returncode == -signal.SIGKILL and saved and max(saved) < 1000
  train_cli.run(workdir, cache, total_steps=2 * K, checkpoint_every=K, log_every=1)
  ours, theirs = train_cli.metrics(workdir), train_cli.metrics(straight)
  assert [r["step"] for r in ours] == [r["step"] for r in theirs]
  assert [r["loss"] for r in ours] == [r["loss"] for r in theirs]  # bit-exact loss curve
  _, a = ckpt.read_run(workdir)
  _, b = ckpt.read_run(straight)
  fa, fb = flat(a), flat(b)
  assert sorted(fa) == sorted(fb)
  for k in fa:
    np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


def test_sigterm_saves_and_exits_zero(cache, tmp_path):
  workdir = str(tmp_path / "preempted")
  proc = train_cli.start(workdir, cache, total_steps=1000, checkpoint_every=1000, log_every=1)
  try:
    wait_for(lambda: os.path.exists(os.path.join(workdir, "metrics.jsonl")) and len(train_cli.metrics(workdir)) >= 2,
             proc=proc)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=300)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 0, proc.stderr.read()[-4000:]
  saved = train_cli.steps_saved(workdir)
  last = train_cli.metrics(workdir)[-1]["step"]
  assert saved == [last] and 2 <= last < 1000
  run_config, params = ckpt.read_run(workdir)  # complete and readable
  assert run_config.total_steps == 1000 and "appearance" in params


def test_read_run_reads_the_params_subtree_or_the_config_alone(straight, tmp_path):
  step_dir = ckpt.latest_checkpoint_dir(straight)
  full = ocp.StandardCheckpointer().restore(os.path.join(step_dir, "state"))  # the whole TrainState, independently
  config, params = ckpt.read_run(straight)
  ours, theirs = flat(params), flat(jax.tree.map(np.asarray, full["params"]))
  assert sorted(ours) == sorted(theirs)
  for k in ours:
    assert ours[k].dtype == theirs[k].dtype, k
    np.testing.assert_array_equal(ours[k], theirs[k], err_msg=k)
  # with_params=False reads the meta record only: a copy of the run without its arrays still answers.
  shutil.copytree(os.path.join(step_dir, "meta"), tmp_path / "checkpoints" / os.path.basename(step_dir) / "meta")
  only, none = ckpt.read_run(str(tmp_path), with_params=False)
  assert none is None and only.to_dict() == config.to_dict()
  with pytest.raises(ckpt.CheckpointError, match=r"checkpoints/6/state: no such folder \(the step holds \['meta'\]\)"):
    ckpt.read_run(str(tmp_path))


def test_stage2_starts_from_the_stage1_run(straight, monkeypatch):
  _, stage1 = ckpt.read_run(straight)
  monkeypatch.chdir(os.path.dirname(straight))
  run = loop.setup(tiny(stage="stage2", init_from=os.path.basename(straight)))  # a relative path, as typed
  params = flat(run.state.params)
  appearance = flat({"appearance": stage1["appearance"]})
  for k, v in appearance.items():
    np.testing.assert_array_equal(params[k], v, err_msg=k)
  # pose_init="appearance": the pose net's encoder is the (stage-1 trained) appearance encoder; zero convs at 0.
  for name in ("conv_in/kernel", "time_embedding/linear_1/kernel", "down_blocks_0/resnets_0/conv1/kernel"):
    np.testing.assert_array_equal(params[f"pose/{name}"], appearance[f"appearance/{name}"], err_msg=name)
  zero = [k for k in params if k.startswith("pose/controlnet_down_blocks_") or k.startswith("pose/controlnet_mid")]
  assert zero and all(not np.any(params[k]) for k in zero)
  # The frozen base is the stage-1 run's own.
  meta = ckpt.Checkpointer(straight, 3, "", "", tiny()).read_meta(2 * K)
  assert run.base_hash == meta["base_hash"] and run.base_source == meta["base_source"]


def test_resuming_another_model_or_base_is_refused(straight):
  # The recorded config refuses first, naming the fields (before anything is loaded) ...
  with pytest.raises(ConfigError, match=r"must not change on resume.*\n.*config.stage: the run used 'stage1', this "
                     r"command says 'stage2'(.|\n)*resume_allow_changes=stage"):
    loop.train(tiny(stage="stage2", total_steps=2 * K + 1), straight)
  with pytest.raises(ConfigError, match=r"config.global_batch_size: the run used 4, this command says 8"):
    loop.train(tiny(global_batch_size=8, total_steps=2 * K + 1), straight)
  # ... and with the override the checkpoint's own records still refuse another model or base.
  with pytest.raises(ckpt.CheckpointError, match="another model shape.*\n.*missing .*pose/"):
    loop.train(tiny(stage="stage2", total_steps=2 * K + 1, resume_allow_changes="stage"), straight)
  with pytest.raises(ckpt.CheckpointError, match="frozen base was 'random:.*seed=0.*but the base now is 'random:.*"
                     "seed=1"):
    loop.train(tiny(seed=1, total_steps=2 * K + 1, resume_allow_changes="*"), straight)
  assert jax.device_count() >= 1 and train_cli.steps_saved(straight) == [K, 2 * K]  # nothing touched


def _largest_array_file(step_dir: str) -> str:
  return max(glob.glob(os.path.join(step_dir, "state", "ocdbt.process_0", "d", "*")), key=os.path.getsize)


def test_truncated_newest_step_is_set_aside_and_resume_is_bit_exact(straight, cache, tmp_path):
  workdir = str(tmp_path / "damaged")
  shutil.copytree(straight, workdir)
  newest = os.path.join(workdir, "checkpoints", str(2 * K))
  with open(_largest_array_file(newest), "r+b") as f:
    f.truncate(1000)  # a crash mid-write (or a full disk) leaves a short file
  result = train_cli.run(workdir, cache, total_steps=2 * K, checkpoint_every=K, log_every=1, sample_every=2 * K,
                         sample_steps=2)
  # One paragraph names the step, the file's folder and the cause; no orbax traceback.
  assert f"checkpoint step {2 * K} ({newest}) is damaged: {newest}/state cannot be read: " in result.stderr
  assert "OUT_OF_RANGE" in result.stderr and "Traceback" not in result.stderr
  assert f"moved to {newest}.damaged-1 (kept, not deleted) and the run resumes from step {K}" in result.stderr
  assert os.path.isdir(newest + ".damaged-1") and train_cli.steps_saved(workdir) == [K, 2 * K]
  ours, theirs = train_cli.metrics(workdir), train_cli.metrics(straight)
  assert [(r["step"], r["loss"]) for r in ours] == [(r["step"], r["loss"]) for r in theirs]
  fa, fb = flat(ckpt.read_run(workdir)[1]), flat(ckpt.read_run(straight)[1])
  assert sorted(fa) == sorted(fb)
  for k in fa:
    np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


@pytest.mark.parametrize("damage", ["no meta/metadata", "no state/", "garbled data JSON", "truncated array"])
def test_a_damaged_newest_step_is_refused_with_resume_damaged_error(straight, tmp_path, damage):
  workdir = str(tmp_path / "damaged")
  shutil.copytree(straight, workdir)
  newest = os.path.join(workdir, "checkpoints", str(2 * K))
  if damage == "no meta/metadata":
    os.remove(os.path.join(newest, "meta", "metadata"))
    why = f"{newest}/meta/metadata is missing"
  elif damage == "no state/":
    shutil.rmtree(os.path.join(newest, "state"))
    why = f"{newest}/state is missing"
  elif damage == "garbled data JSON":
    with open(os.path.join(newest, "data", "process_0-of-1.json"), "w") as f:
      f.write('{"next_index": 1')
    why = f"{newest}/data/process_0-of-1.json is not valid JSON"
  else:
    with open(_largest_array_file(newest), "r+b") as f:
      f.truncate(1000)
    why = f"{newest}/state cannot be read: ValueError: OUT_OF_RANGE"
  with pytest.raises(ckpt.CheckpointError) as e:
    loop.train(tiny(total_steps=2 * K + 1, checkpoint_every=K, resume_damaged="error"), workdir)
  message = str(e.value)
  assert message.startswith(f"checkpoint step {2 * K} ({newest}) is damaged: {why}"), message
  assert f"(the newest is {K})" in message and "resume_damaged=fallback" in message
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == [str(K), str(2 * K)]  # nothing moved


def test_ctrl_c_during_the_first_compile_exits_at_once_and_leaves_no_workdir(tmp_path):
  workdir = str(tmp_path / "new" / "run")
  proc = train_cli.start(workdir, str(tmp_path / "empty_cache"), total_steps=4)  # a cold cache: a long compile
  try:
    for line in proc.stderr:
      if "compiling the train step" in line:
        break
    else:
      raise AssertionError(f"training exited ({proc.wait()}) before compiling")
    time.sleep(0.5)
    t0 = time.time()
    proc.send_signal(signal.SIGINT)
    rc = proc.wait(timeout=30)
    waited = time.time() - t0
  except subprocess.TimeoutExpired:
    raise AssertionError("Ctrl-C did not stop the compile within 30 s") from None
  finally:
    if proc.poll() is None:
      proc.kill()
  rest = proc.stderr.read()
  # rc 0: the signal came after the compile (a preemption: step, save, exit 0), so the reader was late.
  assert rc == 130 and waited < 10, (rc, waited, rest[-2000:])
  assert "nothing was saved" in rest
  assert not os.path.exists(tmp_path / "new")  # the folders this run created were empty: removed


def test_an_async_save_error_is_one_line_with_its_cause(tmp_path, monkeypatch):
  checkpointer = ckpt.Checkpointer(str(tmp_path), 2, "random", "0" * 64, tiny())
  closed = []
  monkeypatch.setattr(checkpointer.manager, "close", lambda: closed.append(True))

  def fail():  # what orbax's writer threads raise: the cause wrapped in layers
    try:
      raise ValueError("RESOURCE_EXHAUSTED: No space left on device [writing state/d/1234]")
    except ValueError as cause:
      raise RuntimeError("Event loop is closed") from cause

  monkeypatch.setattr(checkpointer.manager, "wait_until_finished", fail)
  with pytest.raises(ckpt.CheckpointError) as e:
    checkpointer.close()
  assert str(e.value) == (f"writing a checkpoint to {tmp_path}/checkpoints failed: ValueError: RESOURCE_EXHAUSTED: "
                          f"No space left on device [writing state/d/1234]")
  assert e.value.__cause__ is None and e.value.__suppress_context__ and closed == [True]


def test_two_runs_saving_at_once_in_one_process_both_succeed(tmp_path):
  # The demo's `--jobs 2` trains two runs in threads of one process. Orbax's async saves share per-process state:
  # unserialised, two managers saving at once failed on the first of ten rounds in each of 3 tries
  # (FileNotFoundError on data.orbax-checkpoint-tmp/process_0-of-1.json).
  errors = []

  def run(i):
    try:
      for r in range(10):
        saver = ckpt.Checkpointer(str(tmp_path / f"run{i}_{r}"), 2, "base", "hash", ml_collections.ConfigDict())
        data = iter(grain.MapDataset.range(10).to_iter_dataset())
        next(data)
        state = train_state.TrainState.create(apply_fn=None, params={"w": np.full((64, 64), i, np.float32)},
                                              tx=optax.adam(1e-3))
        saver.save(state, data, force=True)
        saver.close()
    except Exception as e:  # collected for the assertion
      errors.append(e)

  threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert not errors, errors
  assert all(ckpt.read_run(str(tmp_path / f"run{i}_{r}"), with_params=False) for i in range(2) for r in range(10))
