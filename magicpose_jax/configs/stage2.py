"""Stage 2 as in the paper: Appearance + Pose Controllers, global batch 16, 20k steps, from a stage-1 run.

    python -m magicpose_jax.train --config configs/stage2.py --config.init_from=runs/stage1 \
        --config.data.path=/path/to/preprocessed/tiktok --workdir runs/stage2

The frozen base is the one recorded by the stage-1 run (or `--config.base.path`). The pose net starts
from the appearance net's encoder (`model.pose_init="appearance"`, the paper) with zero convs at 0.
"""

from magicpose_jax.configs import stage1


def get_config():
  c = stage1.get_config()  # same model, precision, data and mesh; only what the paper changes differs
  c.stage = "stage2"
  c.total_steps = 20_000
  c.global_batch_size = 16
  c.checkpoint_every = 1000
  c.sample_every = 2000
  c.model.pose_init = "appearance"
  return c
