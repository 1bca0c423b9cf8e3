"""The demo's training config: tiny networks on 64 px synthetic figures, minutes on a 2-core CPU.

    python -m magicpose_jax.train --config demo.py --config.stage=base     # the tiny "SD" the demo freezes
    python -m magicpose_jax.train --config demo.py --config.init_from=outputs/demo_base   # stage 1, ...

`python -m magicpose_jax.demo` runs all stages with this config.
"""

from magicpose_jax.train.config import default_config


def get_config():
  c = default_config()
  c.stage = "stage1"
  c.total_steps = 300
  c.global_batch_size = 8
  c.checkpoint_every = 100
  c.log_every = 10
  c.dtype = "float32"  # bf16 is slower than f32 on CPUs
  c.model.unet = "tiny"
  c.model.vae = "tiny"
  c.model.text_encoder = "tiny"
  c.model.sample_size = 32  # 64 px images through the tiny VAE (factor 2)
  c.model.hint_channels = (16, 32)
  c.optimizer.lr = 1e-3
  c.optimizer.warmup_steps = 20
  c.sharding.min_size = 1024
  c.data.source = "synthetic"
  c.data.image_size = 64
  c.data.synthetic.image_size = 64
  c.data.synthetic.num_identities = 48
  c.data.synthetic.frames_per_identity = 32
  c.data.synthetic.holdout_identities = 8  # held-out figures the demo animates
  return c
