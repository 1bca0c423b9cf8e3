"""Training batches: grain pipelines over synthetic figures or preprocessed ArrayRecord shards.

The pipeline, on every host:

  range(num targets) -> shuffle(seed) -> repeat forever -> random_map(pair + decode + augment) ->
  [process_index::process_count] -> to_iter_dataset (threads) -> batch(b, drop_remainder) -> [mp_prefetch]

One training *example* per target frame (every frame once per epoch; see `data/pairs.py`), its reference drawn
from the same video. `shuffle` reshuffles every epoch (its seed is offset by the epoch), and `repeat` before the
host slice makes the examples one global stream: global example g is `permutation_e(g mod N)` of epoch
`e = g // N`, made with grain's per-index generator (Philox keyed by the seed, counter by g), so every example is a
function of (seed, g) only. Host p takes g = p, p + P, p + 2P, ...: at every step the union of the hosts' batches is
the same set of global examples whatever the number of hosts, every target appears exactly once per epoch across
hosts, and an iterator's state is one integer (`get_state()` / `set_state()` resume with the identical next batch).
"""

from __future__ import annotations

import dataclasses
import os

import grain
import ml_collections
import numpy as np

from magicpose_jax.data import records
from magicpose_jax.data.augment import AugmentConfig, augment_example, center_box, crop_poses, crop_resize_image
from magicpose_jax.data.pairs import FrameIndex, PairConfig, sample_reference
from magicpose_jax.pose.regions import head_mask

SOURCES = ("synthetic", "arrayrecord")


def default_data_config() -> ml_collections.ConfigDict:
  """The data part of a training config (`config.data`); every field is documented in place."""
  from magicpose_jax.data.synthetic import SyntheticConfig  # noqa: PLC0415

  c = ml_collections.ConfigDict()
  # "synthetic": procedural figures (no files; tests and the demo). "arrayrecord": the folder `path` written by
  # `python -m magicpose_jax.preprocess`.
  c.source = "synthetic"
  c.path = ""
  # Side of the square reference/target/pose images in a batch. With VAE-latent records it must equal the
  # preprocessing --size (latents cannot be resized or cropped).
  c.image_size = 64

  # The synthetic source: `SyntheticConfig`'s fields (image_size is the rendered size, cropped and resized to
  # `image_size`), plus `holdout_identities`: the last N identities are left out of training (for evaluation).
  c.synthetic = ml_collections.ConfigDict(dataclasses.asdict(SyntheticConfig()))
  c.synthetic.image_size = 64
  c.synthetic.holdout_identities = 0

  # Random resized crop (scale in crop_scale, aspect 1, same box for target and pose, own box for the reference)
  # and optional horizontal flip of target + pose. enabled=False: centre crop only ("no augmentation" ablation).
  c.augment = ml_collections.ConfigDict(dataclasses.asdict(AugmentConfig()))

  # Reference frame choice: uniform over the target's video, excluding frames closer than min_gap to the target;
  # allow_same=False excludes the target itself.
  c.pairs = ml_collections.ConfigDict(dataclasses.asdict(PairConfig()))

  # Decode/augment parallelism: num_workers processes (0 = in this process), each with read_threads threads
  # working read_buffer_size examples ahead; each worker keeps worker_buffer_size batches ready.
  c.num_workers = 0
  c.worker_buffer_size = 2
  c.read_threads = 4
  c.read_buffer_size = 32
  return c


class SyntheticFrames:
  """The training identities of a `SyntheticSource`: video = identity, one frame per pose."""

  def __init__(self, config: ml_collections.ConfigDict):
    from magicpose_jax.data.synthetic import SyntheticConfig  # noqa: PLC0415

    fields = {f.name for f in dataclasses.fields(SyntheticConfig)}
    self.config = SyntheticConfig(**{k: v for k, v in config.items() if k in fields})
    identities = self.config.num_identities - config.get("holdout_identities", 0)
    if identities <= 0:
      raise ValueError(f"data.synthetic: holdout_identities={config.get('holdout_identities')} leaves no "
                       f"training identity of num_identities={self.config.num_identities}")
    self.counts = [self.config.frames_per_identity] * identities
    self.latents = False
    # How the pose maps were drawn (a flipped pose is drawn again the same way).
    self.pose_scale, self.pose_supersample = self.config.pose_scale, self.config.pose_supersample
    self._source = None  # built on first use, so the object pickles small into grain's workers

  def record_id(self, video: int, frame: int) -> int:
    return video * self.config.frames_per_identity + frame

  def load(self, video: int, frame: int, with_pose: bool = True) -> dict:
    if self._source is None:
      from magicpose_jax.data.synthetic import SyntheticSource  # noqa: PLC0415

      self._source = SyntheticSource(self.config)
    out = self._source.frame(video, frame)
    pose = out.get("pose")
    return {"image": out["image"], "pose_image": out["pose_image"], "poses": None if pose is None else [pose]}


class RecordFrames:
  """Frames of a preprocessed folder: video = the manifest's per-video record lists."""

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    manifest = records.read_manifest(self.path)
    self.paths = records.shard_paths(self.path, manifest)
    self.size = int(manifest["size"])
    self.latents = bool(manifest.get("latent"))
    self._ids = [list(ids) for ids in manifest["videos"].values() if ids]
    self.counts = [len(ids) for ids in self._ids]
    self.pose_scale, self.pose_supersample = 1.0, 1  # preprocessing renders pose maps as ControlNet does
    self._source = None

  def record_id(self, video: int, frame: int) -> int:
    return self._ids[video][frame]

  def load(self, video: int, frame: int, with_pose: bool = True) -> dict:
    if self._source is None:
      self._source = grain.sources.ArrayRecordDataSource(self.paths)
    record_id = self.record_id(video, frame)
    fields = records.decode_example(self._source[record_id])
    where = f"{self.path} record {record_id}"
    out = {}
    if self.latents:
      out["latent"] = np.asarray(fields["latent"], np.float32)
    else:
      out["image"] = records.decode_image(fields["image"], f"{where} image")
    if with_pose:
      out["pose_image"] = records.decode_image(fields["pose_image"], f"{where} pose_image")
      out["poses"] = records.poses_from_fields(fields)
    return out


class MakeExample:
  """Flat target index + generator -> one example (a picklable callable for grain's `random_map`)."""

  def __init__(self, frames: SyntheticFrames | RecordFrames, size: int, pairs: PairConfig, augment: AugmentConfig,
               with_head_mask: bool = False):
    self.frames, self.size, self.pairs, self.augment = frames, size, pairs, augment
    self.with_head_mask = with_head_mask
    self.index = FrameIndex(frames.counts)

  def __call__(self, flat: int, rng: np.random.Generator) -> dict:
    video, target = self.index.locate(int(flat))
    reference = sample_reference(rng, int(self.index.counts[video]), target, self.pairs)
    tgt = self.frames.load(video, target)
    ref = self.frames.load(video, reference, with_pose=False)
    if self.frames.latents:
      pose = tgt["pose_image"]
      box = center_box(*pose.shape[:2])
      if pose.shape[:2] != (self.size, self.size):
        pose = crop_resize_image(pose, box, self.size)
      out = {"reference_latent": ref["latent"], "target_latent": tgt["latent"], "pose": pose}
      if self.with_head_mask:  # the latents are of the whole frame, so its keypoints only scale to the output size
        out["head_mask"] = head_mask(crop_poses(tgt["poses"], box, self.size), self.size, self.size)
    else:
      out = augment_example(rng, ref["image"], tgt["image"], tgt["pose_image"], tgt["poses"], self.size, self.augment,
                            self.frames.pose_scale, self.with_head_mask, self.frames.pose_supersample)
    out["target_id"] = np.int32(self.frames.record_id(video, target))
    out["reference_id"] = np.int32(self.frames.record_id(video, reference))
    return out


def _frames(config: ml_collections.ConfigDict) -> SyntheticFrames | RecordFrames:
  if config.source == "synthetic":
    return SyntheticFrames(config.synthetic)
  if config.source == "arrayrecord":
    if not config.path:
      raise ValueError("data.source='arrayrecord' needs data.path: a folder written by `python -m "
                       "magicpose_jax.preprocess`")
    frames = RecordFrames(config.path)
    if frames.latents and frames.size != config.image_size:
      raise ValueError(f"data.image_size={config.image_size}, but {config.path} holds VAE latents of "
                       f"{frames.size}px images (latents cannot be resized): set data.image_size={frames.size}")
    if frames.latents and config.augment.enabled:
      raise ValueError(f"{config.path} holds VAE latents, which cannot be cropped or flipped: set "
                       f"data.augment.enabled=False, or preprocess without --vae to augment")
    return frames
  raise ValueError(f"data.source={config.source!r}; expected one of {SOURCES}")


def make_example_fn(config: ml_collections.ConfigDict, with_head_mask: bool = False) -> MakeExample:
  """The per-example function of `train_dataset` (flat target index, generator) -> example."""
  augment = AugmentConfig(**{**config.augment.to_dict(), "crop_scale": tuple(config.augment.crop_scale)})
  return MakeExample(_frames(config), int(config.image_size), PairConfig(**config.pairs.to_dict()), augment,
                     with_head_mask)


def train_dataset(config: ml_collections.ConfigDict, *, global_batch_size: int, seed: int,
                  process_index: int = 0, process_count: int = 1,
                  with_head_mask: bool = False) -> grain.IterDataset:
  """This host's infinite stream of training batches.

  Args:
    config: `default_data_config()`-shaped.
    global_batch_size: examples per step over all hosts; divisible by `process_count`.
    seed: shuffling and augmentation seed, 0 <= seed < 2**32.
    process_index, process_count: this host and the number of hosts (`jax.process_index()/process_count()`).
  Returns:
    An `IterDataset` whose iterator yields dicts of numpy arrays with `b = global_batch_size // process_count`
    rows: "reference", "target", "pose" uint8 [b, S, S, 3] (S = config.image_size), or with VAE-latent records
    "reference_latent", "target_latent" float32 [b, S/f, S/f, 2C] and "pose"; plus "target_id",
    "reference_id" int32 [b] (record ids: the global record index for "arrayrecord",
    identity * frames_per_identity + frame for "synthetic"); with `with_head_mask` also "head_mask" uint8
    [b, S, S], 1 inside the target's heads (`pose.regions.head_mask`; the training loss's `head_loss_weight`).
    The iterator supports `get_state()`/`set_state()`.
  """
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(f"global_batch_size={global_batch_size} must be a positive multiple of "
                     f"process_count={process_count}")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")
  make = make_example_fn(config, with_head_mask)
  num_targets = len(make.index)
  if num_targets == 0:
    raise ValueError(f"data.source={config.source!r} has no frames to train on")
  ds = grain.MapDataset.range(num_targets).shuffle(seed=seed).repeat().random_map(make, seed=seed)
  ds = ds[process_index::process_count]
  read = grain.ReadOptions(num_threads=config.read_threads, prefetch_buffer_size=config.read_buffer_size)
  it = ds.to_iter_dataset(read).batch(global_batch_size // process_count, drop_remainder=True)
  if config.num_workers > 0:
    _mark_flags_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.num_workers,
                                                     per_worker_buffer_size=config.worker_buffer_size))
  return it


def _mark_flags_parsed() -> None:
  # grain's worker processes read absl flags; outside `absl.app.run` they were never parsed and reading them raises.
  from absl import flags  # noqa: PLC0415

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
