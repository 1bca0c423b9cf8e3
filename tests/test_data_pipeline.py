"""grain training pipelines (data/pipeline.py): exactly-once epochs across hosts, resume, sources, latents."""

import numpy as np
import pytest
from dataset_folders import write_tiktok, write_tiny_vae

from magicpose_jax.convert.vae import latent_encoder
from magicpose_jax.data import records
from magicpose_jax.data.pipeline import default_data_config, train_dataset
from magicpose_jax.data.preprocessing import PreprocessOptions, preprocess

SIZE = 32
NUM_RECORDS = 10  # the fixture's good frames


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
  root = tmp_path_factory.mktemp("data")
  write_tiktok(str(root / "src"))
  preprocess(PreprocessOptions(layout="tiktok", src=str(root / "src"), out=str(root / "frames"), shards=3, size=SIZE))
  return str(root / "frames")


def record_config(path: str, **augment):
  config = default_data_config()
  config.source, config.path, config.image_size = "arrayrecord", path, SIZE
  config.read_threads = 2
  config.augment.update(augment)
  return config


def take(dataset, steps: int) -> list[dict]:
  it = iter(dataset)
  return [next(it) for _ in range(steps)]


def global_stream(config, hosts: int, batch: int, steps: int) -> dict[int, dict]:
  """Global example index g -> that example's arrays, gathered from every simulated host."""
  out = {}
  for p in range(hosts):
    for s, b in enumerate(take(train_dataset(config, global_batch_size=batch, seed=7, process_index=p,
                                             process_count=hosts), steps)):
      assert b["target"].shape[0] == batch // hosts
      for r in range(batch // hosts):
        out[s * batch + p + hosts * r] = {k: v[r] for k, v in b.items()}  # host p takes g = p, p + P, ...
  return out


def test_every_frame_once_per_epoch_on_1_2_and_4_hosts(shards):
  config = record_config(shards)
  batch, steps = 4, 6  # 24 examples: epochs 0 and 1 complete
  streams = {hosts: global_stream(config, hosts, batch, steps) for hosts in (1, 2, 4)}
  for hosts, stream in streams.items():
    assert sorted(stream) == list(range(batch * steps)), hosts
    epochs = [[stream[g]["target_id"] for g in range(e * NUM_RECORDS, (e + 1) * NUM_RECORDS)] for e in (0, 1)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(NUM_RECORDS)), hosts
    assert epochs[0] != epochs[1]  # reshuffled every epoch
  # The global stream does not depend on the number of hosts: same examples, same pixels.
  for hosts in (2, 4):
    for g, example in streams[1].items():
      for key, value in example.items():
        np.testing.assert_array_equal(streams[hosts][g][key], value, err_msg=f"{hosts} hosts, example {g}, {key}")


def test_batches_and_pairs(shards):
  batch = take(train_dataset(record_config(shards), global_batch_size=6, seed=0), 1)[0]
  assert set(batch) == {"reference", "target", "pose", "target_id", "reference_id"}
  for key in ("reference", "target", "pose"):
    assert batch[key].shape == (6, SIZE, SIZE, 3) and batch[key].dtype == np.uint8
  assert batch["target_id"].dtype == np.int32
  video_of = {i: v for v, ids in records.read_manifest(shards)["videos"].items() for i in ids}
  assert all(video_of[t] == video_of[r] for t, r in zip(batch["target_id"], batch["reference_id"], strict=True))


def test_without_augmentation_batches_are_the_stored_frames(shards):
  batch = take(train_dataset(record_config(shards, enabled=False), global_batch_size=4, seed=1), 1)[0]
  stored = [records.decode_example(r) for s in records.shard_paths(shards, records.read_manifest(shards))
            for r in records.read_shard(s)]
  for row, (t, r) in enumerate(zip(batch["target_id"], batch["reference_id"], strict=True)):
    np.testing.assert_array_equal(batch["target"][row], records.decode_image(stored[t]["image"]))
    np.testing.assert_array_equal(batch["pose"][row], records.decode_image(stored[t]["pose_image"]))
    np.testing.assert_array_equal(batch["reference"][row], records.decode_image(stored[r]["image"]))


def test_output_size_differs_from_stored_size(shards):
  config = record_config(shards)
  config.image_size = 24
  assert take(train_dataset(config, global_batch_size=2, seed=0), 1)[0]["pose"].shape == (2, 24, 24, 3)


@pytest.mark.parametrize("workers", [0, 2])
def test_restored_iterator_continues_with_the_identical_batch(shards, workers):
  config = record_config(shards, flip=True)
  config.num_workers = workers
  dataset = train_dataset(config, global_batch_size=4, seed=3, process_index=1, process_count=2)
  it = iter(dataset)
  for _ in range(3):  # 6 examples; this host's epochs hold 5, so the state is in the middle of its second
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(2)]
  restored = iter(train_dataset(config, global_batch_size=4, seed=3, process_index=1, process_count=2))
  restored.set_state(state)
  for want in expected:
    got = next(restored)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_seed_changes_the_stream(shards):
  a, b = (take(train_dataset(record_config(shards), global_batch_size=4, seed=s), 2) for s in (0, 1))
  assert any(not np.array_equal(x["target_id"], y["target_id"]) for x, y in zip(a, b, strict=True))


def test_synthetic_source():
  config = default_data_config()
  config.image_size = 32
  config.synthetic.update(image_size=64, num_identities=6, frames_per_identity=4, holdout_identities=2)
  batches = take(train_dataset(config, global_batch_size=8, seed=0), 3)
  frames = config.synthetic.frames_per_identity
  ids = np.concatenate([b["target_id"] for b in batches])
  assert sorted(ids[:16]) == list(range(16))  # 4 training identities x 4 frames: one epoch
  assert all((b["reference_id"] // frames == b["target_id"] // frames).all() for b in batches)
  assert batches[0]["target"].shape == (8, 32, 32, 3) and batches[0]["pose"].dtype == np.uint8
  again = take(train_dataset(config, global_batch_size=8, seed=0), 1)[0]
  for key in again:
    np.testing.assert_array_equal(again[key], batches[0][key])


def test_head_masks_ride_along_only_when_asked():
  """`with_head_mask=True` adds each target's head region (the loss weight's mask) and changes nothing else."""
  config = default_data_config()
  config.image_size = 32
  config.synthetic.update(image_size=64, num_identities=6, frames_per_identity=4, holdout_identities=2)
  plain = take(train_dataset(config, global_batch_size=8, seed=0), 2)
  masked = take(train_dataset(config, global_batch_size=8, seed=0, with_head_mask=True), 2)
  for a, b in zip(plain, masked, strict=True):
    assert set(b) == set(a) | {"head_mask"}
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
    assert b["head_mask"].shape == (8, 32, 32) and b["head_mask"].dtype == np.uint8
    share = b["head_mask"].mean((1, 2))
    assert (share > 0.005).all() and (share < 0.2).all()  # every figure has a head, a small part of the frame


def test_latent_records(shards, tmp_path):
  vae = str(tmp_path / "vae")
  vae_config, _ = write_tiny_vae(vae)
  src = str(tmp_path / "src")
  write_tiktok(src)
  out = str(tmp_path / "latents")
  preprocess(PreprocessOptions(layout="tiktok", src=src, out=out, shards=2, size=SIZE, vae=vae), latent_encoder)
  config = record_config(out, enabled=False)
  batch = take(train_dataset(config, global_batch_size=2, seed=0), 1)[0]
  h = SIZE // vae_config.downsample_factor
  assert set(batch) == {"reference_latent", "target_latent", "pose", "target_id", "reference_id"}
  assert batch["target_latent"].shape == (2, h, h, 2 * vae_config.latent_channels)
  assert batch["target_latent"].dtype == np.float32 and batch["pose"].shape == (2, SIZE, SIZE, 3)
  masked = take(train_dataset(config, global_batch_size=2, seed=0, with_head_mask=True), 1)[0]
  assert masked["head_mask"].shape == (2, SIZE, SIZE) and masked["head_mask"].any()
  with pytest.raises(ValueError, match="holds VAE latents, which cannot be cropped or flipped"):
    train_dataset(record_config(out), global_batch_size=2, seed=0)
  config.image_size = 64
  with pytest.raises(ValueError, match="latents of 32px images .* set data.image_size=32"):
    train_dataset(config, global_batch_size=2, seed=0)


def test_errors(shards, tmp_path):
  config = record_config(shards)
  with pytest.raises(ValueError, match="global_batch_size=6 must be a positive multiple of process_count=4"):
    train_dataset(config, global_batch_size=6, seed=0, process_count=4)
  config.source = "folders"
  with pytest.raises(ValueError, match="data.source='folders'; expected one of"):
    train_dataset(config, global_batch_size=2, seed=0)
  config.source, config.path = "arrayrecord", ""
  with pytest.raises(ValueError, match="needs data.path"):
    train_dataset(config, global_batch_size=2, seed=0)
  config.path = str(tmp_path)
  with pytest.raises(records.RecordError, match="no manifest; write the folder with"):
    train_dataset(config, global_batch_size=2, seed=0)
