"""The demo's training config: tiny networks on 64 px synthetic figures, minutes on a 2-core CPU.

`python -m magicpose_jax.demo` runs every stage with this config (setting `stage`, `total_steps`, `base.path`,
`init_from` per phase). Its base is the packaged pretrained tiny SD (magicpose_jax/demo/pretrained_sd: factor-4
VAE, 64 px -> 16 x 16 latents; `python -m magicpose_jax.demo.pretrain` trains another), so by hand:

    python -m magicpose_jax.train --config configs/demo.py --config.base.path=magicpose_jax/demo/pretrained_sd \
        --workdir /tmp/stage1
    python -m magicpose_jax.train --config configs/demo.py --config.stage=stage2 --config.init_from=/tmp/stage1 \
        --workdir /tmp/stage2
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
  # Used without base.path only (a random base); the demo's base_sd folder carries its own architectures.
  c.model.unet = "tiny"
  c.model.vae = "tiny"
  c.model.text_encoder = "tiny"
  c.model.sample_size = 16  # 64 px images through the demo's factor-4 autoencoder (demo/autoencoder.py)
  c.model.hint_channels = (16, 32, 64)  # downsamples by 4, like the autoencoder
  # The demo's base trains with a zero-terminal-SNR schedule (magicpose_jax/demo.py DEMO_SCHEDULE), which needs v.
  c.model.prediction_type = "v_prediction"
  c.optimizer.lr = 1e-3
  c.optimizer.warmup_steps = 20
  # Decayed to 0 by the last step: the stages' 500 steps end as a finished model, not a snapshot at the peak rate
  # (held-out PSNR +0.26 dB, identity error -0.007 over the constant rate; benchmarks/results/demo.md).
  c.optimizer.schedule = "cosine"
  c.sharding.min_size = 1024
  c.data.source = "synthetic"
  c.data.image_size = 64
  c.data.synthetic.image_size = 64
  # Effectively unlimited identities (each a function of (seed, index), drawn on demand): with a few dozen, the
  # networks memorise their palettes and never need the reference; with ~100k each training example is a new
  # person, so the only way to get the colours right is to copy them from the reference, which is what the
  # Appearance Controller must learn. The last 8 stay held out (never trained on).
  c.data.synthetic.num_identities = 100_000
  c.data.synthetic.frames_per_identity = 32
  c.data.synthetic.holdout_identities = 8  # held-out figures the demo evaluates and animates
  # Plain shirts on flat backgrounds: the people, colours and poses of "full" without its 2-3 pixel patterns and
  # textures, which the tiny VAE blurs into a muddy mix of the two colours in its 800 steps (held-out L1 0.101 on
  # full figures, 0.082 on plain ones) and which hid whether the colours were transferred at all.
  c.data.synthetic.detail = "plain"
  # Pose maps with strokes in proportion to the 64 px canvas (64 / 512 of ControlNet's SD-size widths and radii):
  # at SD size the limbs are 9 px wide and every face landmark a 7 px disc, so the pose render was a blob with
  # a white ball for a head; at 1/8 the limbs are 3 px, hands and the face's eyes, brows and mouth single pixels.
  c.data.synthetic.pose_scale = 0.125
  # ... drawn at 4x and area-averaged down (`pose.render`'s `supersample`): ControlNet's renderer truncates every
  # point to its pixel, and at 64 px a figure one pixel off scores 20-21.5 dB against itself; supersampled, strokes
  # keep their places to 1/4 px and the face dots show eyes and mouth. With the packaged ControlNet trained on
  # them: held-out PSNR +0.27 dB over the same training on the truncated maps (benchmarks/results/demo.md).
  c.data.synthetic.pose_supersample = 4
  # Heads drawn 1.6x their adult size (hair, face and its landmarks; the rest of the person unchanged): an adult head
  # at 64 px is ~8 px wide, 2 x 2 latent tokens with 1-2 px eyes, too little for the tiny base to carry the hair and
  # face from the reference. With the packaged base trained on such figures: identity error 0.090 -> 0.073, face
  # L1 0.180 -> 0.138, PSNR 22.36 -> 22.08 dB (benchmarks/results/demo.md, session 22).
  c.data.synthetic.head_scale = 1.6
  c.data.pairs.allow_same = False  # the reference is always another frame (pose) than the target
  return c
