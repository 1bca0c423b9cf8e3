"""The training config: every field, its default and what it means.

`configs/*.py` start from `default_config()` and change values; the command line overrides any
field (`--config.optimizer.lr=3e-5`). The dict is locked, so a misspelt key is an error, not a
silently ignored setting. A stage is data here (`stage` + `optimizer.param_groups`), not code.
"""

from __future__ import annotations

import ml_collections

from magicpose_jax.data.pipeline import default_data_config

STAGES = ("base", "stage1", "stage2")
# `resume_damaged`: what a resume does when the newest checkpoint cannot be read (docs/training.md, "Resume rules").
DAMAGED_POLICIES = ("fallback", "error")
# Fields a resume must keep (checked against the run's recorded config, `train.validate.check_resume`): they fix
# the data iterator's position (batch size, seed, data), the random streams, and the saved state's structure.
RESUME_FIXED = ("stage", "seed", "global_batch_size", "model", "ema_decay", "optimizer.param_groups", "data.source",
                "data.image_size", "data.synthetic", "data.pairs")


def default_config() -> ml_collections.ConfigDict:
  """All training fields with their defaults (paper stage 1 at SD 1.5 size, except the mesh)."""
  c = ml_collections.ConfigDict()
  # What trains. "base": the main UNet alone, plain SD training (the demo pre-trains its tiny SD this way).
  # "stage1": the Appearance Controller, main UNet frozen, no pose net. "stage2": appearance + pose nets.
  c.stage = "stage1"
  # Stage "base" only: the share of each batch trained reference-only (ControlNet's reference-only control with
  # shared weights): the UNet's self-attention also reads its own states of another frame of the same person, as
  # the main UNet reads the Appearance Controller's. 0: plain SD training. SD 1.5's self-attention features match
  # across images after web-scale pre-training, which MagicPose relies on; a base pre-trained from scratch on
  # little data lacks that, and this teaches some of it (measured on the demo's figures: docs/training.md).
  c.base_reference_share = 0.0
  c.total_steps = 10_000  # optimizer updates (one update = one global batch, whatever grad_accum_steps is)
  c.global_batch_size = 192  # examples per update over all hosts and devices
  c.grad_accum_steps = 1  # micro-batches per update (global_batch_size must divide by it)
  c.seed = 0  # params init, noise/t draws, data order
  c.checkpoint_every = 500  # steps between orbax saves (also saved at the end and on SIGTERM)
  c.keep_checkpoints = 3  # keep-last-K
  # A newest checkpoint that cannot be read on resume: "fallback" sets it aside (renamed <step>.damaged-<n>, never
  # deleted) and resumes from the newest readable step; "error" stops with the reason instead.
  c.resume_damaged = "fallback"
  # Comma-separated RESUME_FIXED fields (or "*") a resume may change, e.g. "global_batch_size"; empty: none.
  c.resume_allow_changes = ""
  c.log_every = 50  # steps between metrics.jsonl / TensorBoard scalars
  c.sample_every = 0  # steps between TensorBoard sample grids (0: never)
  c.sample_steps = 20  # DDIM steps for those grids
  c.sample_guidance = 7.0  # classifier-free guidance scale for those grids
  c.max_nonfinite_steps = 10  # consecutive NaN/inf losses (updates skipped) before training stops
  # A previous run's workdir (or its checkpoints/ folder) whose trained params seed this one: stage 1 from a
  # "base" run takes its UNet as the frozen base; stage 2 from a stage-1 run takes its appearance net (and its
  # base, unless `base.path` is set). Empty: stage 2 starts its appearance net from the base UNet.
  c.init_from = ""
  c.dtype = "bfloat16"  # compute dtype; params stay float32 masters, conv_out and the loss run in float32
  c.frozen_dtype = "float32"  # storage dtype of the frozen base (bfloat16 halves its memory)
  # Per UNet block rematerialisation (models.unet.REMAT_POLICIES): "none", "full" (recompute everything),
  # "dots_saveable" (keep conv and matmul outputs), "dots_with_no_batch_dims_saveable" (keep the projections),
  # "offload" (the projections to host memory). Step time vs memory: docs/performance.md.
  c.remat_policy = "none"
  # models.attention backends: "auto" (per shape and platform), "xla", "flash" (pure-JAX, any platform),
  # "cpu_fused" (CPU), "dot_product" (XLA's choice), "cudnn" (GPU), "splash" (TPU). One that cannot run on the
  # target platform is an error.
  c.attention_backend = "auto"
  # The platform kernels are picked for ("cpu", "gpu", "tpu"); "": that of the devices the step is built for
  # (models/platforms.py). Set it only to override those devices' own.
  c.target_platform = ""

  # The frozen base (main UNet, VAE, CLIP text encoder).
  c.base = ml_collections.ConfigDict()
  # Pretrained SD: a diffusers pipeline folder, an LDM single file (.safetensors/.ckpt), our flax pipeline
  # folder, or a workdir of a "base" run. Empty: random init from `seed` at the `model` sizes (tests, demo).
  c.base.path = ""

  # Architectures, used when `base.path` is empty (otherwise they come from the checkpoint).
  c.model = ml_collections.ConfigDict()
  c.model.unet = "sd15"  # models.unet.VARIANTS name
  c.model.vae = "sd15"  # models.vae.VAE_VARIANTS name
  c.model.text_encoder = "sd15"  # models.clip.CLIP_VARIANTS name
  c.model.sample_size = 64  # latent side the UNet is configured for (SD 1.5: 64 = 512 px)
  # The pose net's hint encoder widths; it downsamples by 2**(len-1), which must equal the VAE's factor.
  c.model.hint_channels = (16, 32, 96, 256)
  # Where stage 2's pose net starts: "appearance" (paper: the appearance net's encoder + mid, zero convs at 0), "sd"
  # (the same from the base UNet), "controlnet" (the release: a pretrained OpenPose ControlNet read from
  # `model.pose_path`, e.g. ControlNet 1.1 OpenPose for SD 1.5).
  c.model.pose_init = "appearance"
  # pose_init="controlnet" only: a diffusers ControlNetModel folder, or an original-layout file (.pth, .ckpt,
  # .safetensors) with `control_model.*` (ControlNet 1.0/1.1) or `pose_control_model.*` (MagicPose release) keys.
  c.model.pose_path = ""
  c.model.use_appearance = True  # False: the paper's "no appearance controller" ablation (stage 2)
  c.model.use_pose = True  # False: the "no pose controller" ablation (stage 2)
  c.model.prediction_type = "epsilon"  # training target: "epsilon" or "v_prediction"

  # Condition dropout for classifier-free guidance (release: 0 for both).
  c.drop = ml_collections.ConfigDict()
  c.drop.reference = 0.0  # probability a row trains without reference states
  c.drop.pose = 0.0  # probability a row trains without pose residuals
  # Weight of the loss inside the target's head (face, forehead and hair: `pose.regions.head_mask` of its
  # keypoints) relative to the rest of the frame; the loss stays a weighted mean. 1: plain MSE (the paper's). The
  # face is a few percent of a full-body frame but carries the expression and the identity.
  c.head_loss_weight = 1.0

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.lr = 1e-4  # peak learning rate (paper; the release uses 1e-5)
  c.optimizer.schedule = "constant"  # after warm-up: "constant" or "cosine" (to 0 at total_steps)
  c.optimizer.warmup_steps = 0
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999
  c.optimizer.eps = 1e-8
  c.optimizer.weight_decay = 0.0  # AdamW decoupled weight decay (release: 0)
  c.optimizer.grad_clip = 1.0  # global-norm clipping (0: off)
  # (path regex, lr multiplier) over the trainable tree's "/"-joined paths, first match wins; multiplier 0 freezes
  # the group (optax.set_to_zero, no optimizer state). Example: (("pose/controlnet_cond_embedding/.*", 0.0),)
  c.optimizer.param_groups = ()
  c.ema_decay = 0.0  # EMA of the trainable params (0: none)

  # Device mesh: axis -> size, -1 fills with the remaining devices. Params are FSDP-sharded over "fsdp",
  # the batch over data x fsdp.
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  c.sharding = ml_collections.ConfigDict()
  c.sharding.min_size = 2**16  # params with fewer elements stay replicated

  c.data = default_data_config()
  return c
