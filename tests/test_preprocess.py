"""`python -m magicpose_jax.preprocess`: shards, manifest, skipped frames, --strict, determinism, resume, --vae."""

import json
import os

import numpy as np
import pytest
from dataset_folders import frame_image, frame_pose, write_tiktok, write_tiny_vae

from magicpose_jax import preprocess as cli
from magicpose_jax.convert.vae import latent_encoder
from magicpose_jax.data import preprocessing, records
from magicpose_jax.data.augment import center_box, crop_poses, crop_resize_image
from magicpose_jax.data.preprocessing import PreprocessError, PreprocessOptions, preprocess, split_runs
from magicpose_jax.pose import render

SIZE = 32


@pytest.fixture(scope="module")
def src(tmp_path_factory):
  root = tmp_path_factory.mktemp("tiktok")
  return str(root), write_tiktok(str(root))


def run(src_root: str, out: str, shards: int = 3, **kw) -> "object":
  return preprocess(PreprocessOptions(layout="tiktok", src=src_root, out=out, shards=shards, size=SIZE, **kw),
                    latent_encoder)


def all_records(out: str) -> list[dict]:
  manifest = records.read_manifest(out)
  return [records.decode_example(r) for path in records.shard_paths(out, manifest) for r in records.read_shard(path)]


def test_split_runs():
  assert [len(r) for r in split_runs(10, 4)] == [3, 3, 2, 2]
  assert [list(r) for r in split_runs(2, 3)] == [[0], [1], []]


def test_manifest_counts_and_lists_every_skipped_frame(src, tmp_path):
  root, expected = src
  result = run(root, str(tmp_path))
  manifest = records.read_manifest(tmp_path)
  assert manifest == result.manifest
  assert manifest["counts"] == {"videos": 3, "frames": 13, "records": 10,
                                "skipped": {"corrupt_image": 1, "empty_video": 1, "missing_pose": 1,
                                            "near_constant": 1}}
  assert {reason: [e["path"] for e in entries] for reason, entries in manifest["skipped"].items()} == expected[
      "skipped"]
  assert "OpenCV cannot decode" in manifest["skipped"]["corrupt_image"][0]["detail"]
  # Nothing silently dropped: every frame found is a record or a skipped entry (empty_video is a folder).
  counts = manifest["counts"]
  frame_skips = sum(n for reason, n in counts["skipped"].items() if reason != "empty_video")
  assert counts["frames"] == 13 == counts["records"] + frame_skips
  assert [s["records"] for s in manifest["shards"]] == [4, 3, 3]
  assert [s["first_record"] for s in manifest["shards"]] == [0, 4, 7]
  assert manifest["videos"] == {"v0": [0, 1, 2, 3], "v1": [4, 5, 6], "v2": [7, 8, 9]}
  assert all(len(s["source_sha256"]) == 64 for s in manifest["shards"]) and len(manifest["source_sha256"]) == 64


def test_records_hold_resized_images_poses_and_ids(src, tmp_path):
  root, expected = src
  run(root, str(tmp_path))
  recs = all_records(str(tmp_path))
  assert [(r["video"], r["frame"]) for r in recs] == expected["good"]
  first = recs[0]  # v0/f0: a PNG frame with a JSON pose
  image = frame_image(1)
  box = center_box(*image.shape[:2])
  np.testing.assert_array_equal(records.decode_image(first["image"]), crop_resize_image(image, box, SIZE))
  poses = crop_poses([frame_pose(1)], box, SIZE)
  assert records.poses_from_fields(first) == poses
  np.testing.assert_array_equal(records.decode_image(first["pose_image"]), render(poses, SIZE, SIZE))
  assert first["path"] == "train_set/v0/f0.png"
  map_frame = recs[4]  # v1/f0: pose map only -> no keypoints
  assert "pose_body" not in map_frame and records.decode_image(map_frame["pose_image"]).shape == (SIZE, SIZE, 3)


def test_strict_fails_with_a_clear_error_after_writing_the_manifest(src, tmp_path):
  root, _ = src
  with pytest.raises(PreprocessError) as e:
    run(root, str(tmp_path), strict=True)
  message = str(e.value)
  assert "--strict: 3 frames or folders" in message
  for part in ("corrupt_image: 1 (e.g. train_set/v1/f3.jpg)", "empty_video: 1 (e.g. train_set/v3)",
               "missing_pose: 1 (e.g. train_set/v2/f3.png)", "manifest.json"):
    assert part in message
  assert "near_constant" not in message  # a filter, not a problem
  assert records.read_manifest(tmp_path)["counts"]["records"] == 10


def test_strict_passes_on_clean_data(tmp_path):
  root = tmp_path / "src"
  write_tiktok(str(root))
  for bad in ("v1/f3.jpg", "v2/f3.png"):
    os.remove(root / "train_set" / bad)
  os.rmdir(root / "train_set" / "v3")
  result = run(str(root), str(tmp_path / "out"), strict=True)
  assert result.manifest["counts"]["skipped"] == {"near_constant": 1}


def test_strict_fails_on_a_split_without_records(tmp_path, caplog):
  (tmp_path / "src" / "train_set").mkdir(parents=True)
  with pytest.raises(PreprocessError, match=r"--strict: no records: .*train_set holds no usable frame"):
    run(str(tmp_path / "src"), str(tmp_path / "out"), shards=1, strict=True)
  assert run(str(tmp_path / "src"), str(tmp_path / "out2"), shards=1).manifest["counts"]["records"] == 0
  assert "no records" in caplog.text  # without --strict: a warning


def test_cli(src, tmp_path, capsys):
  root, _ = src
  args = ["--layout", "tiktok", "--src", root, "--out", str(tmp_path), "--shards", "2", "--size", str(SIZE)]
  assert cli.main(args) == 0
  assert "10 records from 13 frames of 3 videos in 2 shards" in capsys.readouterr().out
  assert cli.main([*args, "--strict"]) == 1
  assert "error: --strict: 3 frames or folders" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    cli.main(["--layout", "coco", "--src", root, "--out", str(tmp_path), "--shards", "1"])


def test_same_input_same_bytes(src, tmp_path, monkeypatch):
  root, _ = src
  run(root, str(tmp_path / "a"), threads=1)
  monkeypatch.setattr(preprocessing, "CHUNK_FRAMES", 2)  # neither threads nor chunking change the output
  run(root, str(tmp_path / "b"), threads=4)
  names = sorted(os.listdir(tmp_path / "a"))
  assert names == sorted(os.listdir(tmp_path / "b"))
  for name in names:
    assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_resume_skips_finished_shards(tmp_path):
  root = tmp_path / "src"
  write_tiktok(str(root))
  out = tmp_path / "out"
  first = run(str(root), str(out))
  assert first.written == [0, 1, 2] and first.reused == []
  shards = [out / s["file"] for s in first.manifest["shards"]]
  stamps = [os.stat(p).st_mtime_ns for p in shards]
  again = run(str(root), str(out))
  assert again.written == [] and again.reused == [0, 1, 2] and again.frames_processed == 0
  assert [os.stat(p).st_mtime_ns for p in shards] == stamps
  assert again.manifest == first.manifest
  # An interrupted shard (no marker) and a changed source file are redone; the rest is kept.
  os.remove(str(shards[0]) + ".done")
  (root / "train_set" / "v2" / "f0.json").write_text(json.dumps({"people": []}))
  third = run(str(root), str(out))
  assert third.written == [0, 2] and third.reused == [1]
  assert os.stat(shards[1]).st_mtime_ns == stamps[1]
  # Other options make other shards.
  assert run(str(root), str(out), image_format="jpg").written == [0, 1, 2]


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("vae"))
  return (folder, *write_tiny_vae(folder))


def test_vae_latents(src, tiny_vae, tmp_path):
  from magicpose_jax.models.vae import AutoencoderKL  # noqa: PLC0415

  root, _ = src
  folder, config, params = tiny_vae
  result = run(root, str(tmp_path), shards=2, vae=folder)
  latent = result.manifest["latent"]
  f = config.downsample_factor
  assert latent["shape"] == [SIZE // f, SIZE // f, 2 * config.latent_channels] and latent["downsample_factor"] == f
  assert result.manifest["image_format"] is None
  recs = all_records(str(tmp_path))
  assert "image" not in recs[0] and recs[0]["latent"].dtype == np.float32
  assert recs[0]["latent"].shape == tuple(latent["shape"])
  # The moments are the VAE's encoding of the stored-size image.
  image = crop_resize_image(frame_image(1), center_box(*frame_image(1).shape[:2]), SIZE)
  posterior = AutoencoderKL(config).apply({"params": params}, image[None].astype(np.float32) / 127.5 - 1,
                                          method=AutoencoderKL.encode)
  expected = np.concatenate([posterior.mean, posterior.logvar], axis=-1)[0]
  np.testing.assert_allclose(recs[0]["latent"], expected, atol=1e-5)
  assert run(root, str(tmp_path), shards=2, vae=folder).reused == [0, 1]
