"""Subprocess worker for the multi-device and multi-process training tests (run with its own XLA_FLAGS/env).

    python tests/distributed_step.py sharded OUT.npz            # 8 devices: 1-device step vs (data=2, fsdp=4) step
    python tests/distributed_step.py reference OUT.npz          # 2 devices, one process, data=2
    python tests/distributed_step.py process OUT.npz PORT ID    # one of 2 processes (jax.distributed), data=2

Writes the losses of two steps and the trainable params after the first, flattened by path, plus facts about shardings.
"""

import sys

import jax
import numpy as np

STEPS = 2


def config(**mesh):
  from test_train_step import tiny  # noqa: PLC0415

  c = tiny(stage="stage1", global_batch_size=8)
  # Adam's first update is lr * g / (|g| + eps): for leaves with |g| ~ eps (1e-8) it turns float reduction-order
  # noise between the two programs into O(lr) differences. eps = 1e-3 makes the update Lipschitz in g (constant
  # lr / eps = 1), so the params compare the sharded gradients themselves; nothing else changes.
  c.optimizer.eps = 1e-3
  for k, v in mesh.items():
    c.mesh[k] = v
  return c


def local_batches(c, process_index, process_count):
  from magicpose_jax.data.pipeline import train_dataset  # noqa: PLC0415

  it = iter(train_dataset(c.data, global_batch_size=c.global_batch_size, seed=c.seed, process_index=process_index,
                          process_count=process_count))
  keep = ("reference", "target", "pose")
  return [{k: v for k, v in next(it).items() if k in keep} for _ in range(STEPS)]


def host(x):
  """A replicated or sharded global array -> numpy (multi-process safe)."""
  from jax.experimental import multihost_utils  # noqa: PLC0415

  if x.is_fully_addressable:
    return np.asarray(jax.device_get(x))
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def train(c, batches, devices=None):
  from magicpose_jax.train import loop, sharding  # noqa: PLC0415
  from magicpose_jax.train.optimizer import path_str  # noqa: PLC0415

  run = loop.setup(c, devices)
  losses, params = [], None
  for b in batches:
    run.state, m = run.step_fn(run.state, run.frozen, sharding.global_batch(b, run.batch_sharding))
    losses.append(float(host(m["loss"])))
    if params is None:  # the params after the first update (later ones compound Adam's sign-like first steps)
      leaves = jax.tree_util.tree_flatten_with_path(run.state.params)[0]
      params = {path_str(p): host(x) for p, x in leaves}
  return run, np.asarray(losses), params


def main():
  mode, out = sys.argv[1], sys.argv[2]
  result = {}
  if mode == "sharded":
    c1 = config(data=1, fsdp=1)
    batches = local_batches(c1, 0, 1)
    _, result["loss_1"], p1 = train(c1, batches, jax.devices()[:1])
    run8, result["loss_8"], p8 = train(config(data=2, fsdp=4), batches)
    result.update({f"one/{k}": v for k, v in p1.items()})
    result.update({f"eight/{k}": v for k, v in p8.items()})
    kernel = run8.state.params["appearance"]["down_blocks_0"]["resnets_0"]["conv1"]["kernel"]
    result["spec"] = np.asarray(str(kernel.sharding.spec))
    result["shard_shape"] = np.asarray(kernel.addressable_shards[0].data.shape)
    result["full_shape"] = np.asarray(kernel.shape)
    result["num_devices"] = np.asarray(len(run8.mesh.devices.flat))
  elif mode == "reference":
    c = config(data=2, fsdp=1)
    # The global batch of two processes: process 0's rows, then process 1's.
    halves = [local_batches(c, i, 2) for i in range(2)]
    batches = [{k: np.concatenate([h[s][k] for h in halves]) for k in halves[0][s]} for s in range(STEPS)]
    _, result["loss"], params = train(c, batches)
    result.update({f"params/{k}": v for k, v in params.items()})
  elif mode == "process":
    port, pid = sys.argv[3], int(sys.argv[4])
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
    c = config(data=2, fsdp=1)
    _, result["loss"], params = train(c, local_batches(c, jax.process_index(), jax.process_count()))
    result.update({f"params/{k}": v for k, v in params.items()})
    result["process_count"] = np.asarray(jax.process_count())
  else:
    raise SystemExit(f"unknown mode {mode}")
  np.savez(out, **result)


if __name__ == "__main__":
  main()
