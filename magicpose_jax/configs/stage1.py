"""Stage 1 as in the paper: the Appearance Controller over frozen SD 1.5, 512 px, global batch 192, 10k steps.

    python -m magicpose_jax.train --config configs/stage1.py --config.base.path=/path/to/stable-diffusion-v1-5 \
        --config.data.path=/path/to/preprocessed/tiktok --workdir runs/stage1

The paper trains on 8 A100s; the release uses lr 1e-5 (`--config.optimizer.lr=1e-5`). On 8 devices the
default mesh is FSDP over all of them (see docs/training-at-scale.md).
"""

from magicpose_jax.train.config import default_config


def get_config():
  c = default_config()
  c.stage = "stage1"
  c.total_steps = 10_000
  c.global_batch_size = 192
  c.checkpoint_every = 500
  c.log_every = 50
  c.sample_every = 1000
  c.optimizer.lr = 1e-4
  c.dtype = "bfloat16"
  c.frozen_dtype = "bfloat16"
  c.remat_policy = "full"
  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.model.sample_size = 64
  c.data.source = "arrayrecord"
  c.data.image_size = 512
  return c
