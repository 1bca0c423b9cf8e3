"""The sharded training step: 8 simulated devices with FSDP agree with one device; two processes with
`jax.distributed` agree with one process. Each case runs in a subprocess with its own XLA device count."""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import train_cli

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "distributed_step.py")


def worker(args, devices, cache, timeout=900):
  env = train_cli.env(cache, devices)
  env["PYTHONPATH"] = os.path.dirname(SCRIPT) + os.pathsep + env["PYTHONPATH"]
  return subprocess.Popen([sys.executable, SCRIPT, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, cwd=train_cli.ROOT)


def finish(proc, timeout=900):
  _, err = proc.communicate(timeout=timeout)
  assert proc.returncode == 0, err[-4000:]


def test_fsdp_step_matches_one_device(tmp_path):
  out = str(tmp_path / "sharded.npz")
  finish(worker(["sharded", out], 8, str(tmp_path / "cache")))
  r = np.load(out)
  assert int(r["num_devices"]) == 8
  # Params really are split: the FSDP axis takes a dim of this kernel, each device holds a quarter of it.
  assert "fsdp" in str(r["spec"])
  assert np.prod(r["shard_shape"]) * 4 == np.prod(r["full_shape"])
  # fp32: the sharded program differs from the 1-device one only in reduction order.
  np.testing.assert_allclose(r["loss_8"], r["loss_1"], rtol=0, atol=1e-5)
  names = [k[len("one/"):] for k in r.files if k.startswith("one/")]
  assert names
  worst = max(float(np.max(np.abs(r[f"eight/{n}"] - r[f"one/{n}"]))) for n in names)
  assert worst <= 1e-5, worst


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow  # three processes compiling the step: ~2-4 min on 2 cores
def test_two_processes_match_one_process(tmp_path):
  cache = str(tmp_path / "cache")
  port = str(free_port())
  outs = [str(tmp_path / f"p{i}.npz") for i in range(2)]
  procs = [worker(["process", outs[i], port, str(i)], None, cache) for i in range(2)]
  ref_out = str(tmp_path / "ref.npz")
  ref = worker(["reference", ref_out], 2, cache)
  for p in (*procs, ref):
    finish(p)
  r0, r1, rr = (np.load(o) for o in (*outs, ref_out))
  assert int(r0["process_count"]) == 2
  np.testing.assert_array_equal(r0["loss"], r1["loss"])
  np.testing.assert_allclose(r0["loss"], rr["loss"], rtol=0, atol=1e-6)
  names = [k for k in rr.files if k.startswith("params/")]
  for n in names:
    np.testing.assert_array_equal(r0[n], r1[n], err_msg=n)
    np.testing.assert_allclose(r0[n], rr[n], rtol=0, atol=1e-6, err_msg=n)


pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
