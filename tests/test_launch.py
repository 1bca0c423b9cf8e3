"""launch/: the scripts parse, print usage, build the right commands, and the SLURM one requeues after a save.

No network and no cluster: gcloud, srun, scancel and scontrol are stubs on PATH that record their calls.
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU = os.path.join(REPO, "launch", "tpu_pod.sh")
SLURM = os.path.join(REPO, "launch", "slurm_gpu.sbatch")

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _stub(directory: str, name: str, body: str) -> None:
  path = os.path.join(directory, name)
  with open(path, "w") as f:
    f.write("#!/usr/bin/env bash\n" + body)
  os.chmod(path, os.stat(path).st_mode | stat.S_IEXEC)


def _env(bin_dir: str, **extra: str) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TPU_NAME", "ZONE", "WORKDIR"))}
  env.update(PATH=f"{bin_dir}:{env['PATH']}", **extra)
  return env


@pytest.mark.parametrize("script", [TPU, SLURM])
def test_scripts_parse(script):
  subprocess.run(["bash", "-n", script], check=True)


@pytest.mark.parametrize("script", [TPU, SLURM])
def test_help(script):
  out = subprocess.run(["bash", script, "--help"], capture_output=True, text=True, check=True).stdout
  assert out.startswith("Usage:")


def test_tpu_dry_run_builds_commands_without_calling_gcloud(tmp_path):
  marker = tmp_path / "gcloud_called"
  _stub(str(tmp_path), "gcloud", f"touch {marker}\nexit 1\n")
  out = subprocess.run(
      ["bash", TPU, "up", "--dry-run", "--tpu", "pod", "--zone", "us-west4-a", "--project", "proj", "--workdir",
       "/mnt/runs/s1", "--config", "configs/stage2.py", "--", "--config.data.path=/mnt/data/tik tok",
       "--config.optimizer.lr=1e-5"], capture_output=True, text=True, check=True, env=_env(str(tmp_path))).stdout
  assert not marker.exists()
  ssh = [line for line in out.splitlines() if line.startswith("gcloud compute tpus tpu-vm ssh pod")]
  assert len(ssh) == 3  # sync's unpack, setup, train
  assert all("--worker=all" in line and "--zone=us-west4-a" in line and "--project=proj" in line for line in ssh)
  assert "jax\\\\[tpu\\\\]==0.10.2" in ssh[1] and "requirements.txt" in ssh[1]
  train = ssh[2]
  for part in ("magicpose_jax.train --multihost --config configs/stage2.py --workdir /mnt/runs/s1",
               "--config.data.path=/mnt/data/tik\\\\ tok", "--config.optimizer.lr=1e-5", "train.pid"):
    assert part in train, (part, train)


@pytest.mark.parametrize("args, message", [
    (["train", "--tpu", "t", "--zone", "z"], "--workdir"),
    (["train", "--tpu", "t", "--zone", "z", "--workdir", "gs://b/run"], "POSIX"),
    (["train", "--zone", "z", "--workdir", "/w"], "--tpu"),
    (["launch"], "unknown command"),
    (["train", "--tpu", "t", "--zone", "z", "--workdir", "/w", "--config.lr=1"], "after '--'"),
])
def test_tpu_errors(tmp_path, args, message):
  result = subprocess.run(["bash", TPU, *args, "--dry-run"], check=False, capture_output=True, text=True,
                          env=_env(str(tmp_path)))
  assert result.returncode == 2 and message in result.stderr, result.stderr


def _slurm_env(tmp_path, **extra):
  return _env(str(tmp_path), SLURM_JOB_ID="4242", SLURM_JOB_NUM_NODES="2", SLURM_SUBMIT_DIR=REPO,
              WORKDIR=str(tmp_path / "run"), VENV="/venv", **extra)


def test_slurm_runs_one_process_per_node_with_all_gpus(tmp_path):
  log = tmp_path / "srun.log"
  _stub(str(tmp_path), "srun", f'echo "$JAX_LOCAL_DEVICE_IDS $*" > {log}\n')
  _stub(str(tmp_path), "scontrol", f"touch {tmp_path / 'requeued'}\n")
  result = subprocess.run(["bash", SLURM, "--config.data.path=/data"], check=False, capture_output=True,
                          text=True,
                          env=_slurm_env(tmp_path, CONFIG="configs/stage2.py"))
  assert result.returncode == 0, result.stdout + result.stderr
  ids, _, cmd = log.read_text().strip().partition(" ")
  assert ids == "0,1,2,3,4,5,6,7"
  assert "--ntasks-per-node=1" in cmd
  assert cmd.endswith(f"/venv/bin/python -m magicpose_jax.train --multihost --config configs/stage2.py "
                      f"--workdir {tmp_path / 'run'} --config.data.path=/data")
  assert not (tmp_path / "requeued").exists()


def test_slurm_time_limit_saves_then_requeues(tmp_path):
  # The stub trainer behaves like ours: SIGTERM -> "save" -> exit 0. scancel signals it through its pid file.
  pid_file, saved = tmp_path / "trainer.pid", tmp_path / "saved"
  _stub(str(tmp_path), "srun", f"echo $$ > {pid_file}\ntrap 'touch {saved}; exit 0' TERM\n"
        "for _ in $(seq 100); do sleep 0.1; done\nexit 3\n")
  _stub(str(tmp_path), "scancel", f'[ "$1" = --signal=TERM ] && kill -TERM "$(cat {pid_file})"\n')
  _stub(str(tmp_path), "scontrol", f'echo "$*" > {tmp_path / "requeued"}\n')
  proc = subprocess.Popen(["bash", SLURM], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=_slurm_env(tmp_path, GPUS_PER_NODE="4"))
  deadline = time.time() + 10
  while not pid_file.exists() and time.time() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGUSR1)  # what `#SBATCH --signal=B:USR1@300` sends
  out, _ = proc.communicate(timeout=20)
  assert proc.returncode == 0, out
  assert saved.exists(), out
  assert (tmp_path / "requeued").read_text().strip() == "requeue 4242"


def test_slurm_refuses_outside_a_job(tmp_path):
  result = subprocess.run(["bash", SLURM], check=False, capture_output=True, text=True, env=_env(str(tmp_path)))
  assert result.returncode == 2 and "sbatch" in result.stderr
