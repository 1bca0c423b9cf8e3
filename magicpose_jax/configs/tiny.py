"""Tiny models on synthetic figures, for tests: any stage runs in seconds on a CPU.

    python -m magicpose_jax.train --config tiny.py --config.stage=stage2
"""

from magicpose_jax.train.config import default_config


def get_config():
  c = default_config()
  c.stage = "stage1"
  c.total_steps = 8
  c.global_batch_size = 4
  c.checkpoint_every = 4
  c.keep_checkpoints = 2
  c.log_every = 1
  c.dtype = "float32"  # bf16 is slower than f32 on CPUs
  c.model.unet = "tiny"
  c.model.vae = "tiny"  # downsamples by 2: 32 px images -> 16 x 16 latents
  c.model.text_encoder = "tiny"
  c.model.sample_size = 16
  c.model.hint_channels = (16, 32)  # downsamples by 2, like the tiny VAE
  c.optimizer.lr = 1e-3
  c.optimizer.grad_clip = 1.0
  c.sharding.min_size = 1024
  c.data.source = "synthetic"
  c.data.image_size = 32
  c.data.synthetic.image_size = 64  # rendered at 64 px, cropped and resized to 32
  c.data.synthetic.num_identities = 8
  c.data.synthetic.frames_per_identity = 8
  return c
