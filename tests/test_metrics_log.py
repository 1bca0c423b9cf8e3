"""The training log: metrics.jsonl and TensorBoard events hold what was logged (read back with the event protobuf,
not our writer), a resume drops the records after the restored step, and the writer is imported without torch."""

import glob
import json
import logging
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from magicpose_jax.train.metrics_log import MetricsLog


def read_events(folder: str) -> list:
  """Every Event of the TFRecord files in `folder` (length u64, its crc u32, data, data crc u32)."""
  events = []
  for path in sorted(glob.glob(os.path.join(folder, "events.out.tfevents.*"))):
    with open(path, "rb") as f:
      data = f.read()
    i = 0
    while i < len(data):
      (n,) = struct.unpack("<Q", data[i: i + 8])
      event = event_pb2.Event()
      event.ParseFromString(data[i + 12: i + 12 + n])
      events.append(event)
      i += 12 + n + 4
  return events


def test_scalars_and_images_reach_jsonl_and_tensorboard(tmp_path):
  log = MetricsLog(str(tmp_path), total_steps=10, start_step=0, enabled=True)
  for step in (1, 2, 3):
    log.scalars(step, {"loss": 1.0 / step, "lr": 1e-4})
  grid = np.random.default_rng(0).integers(0, 256, (8, 12, 3), dtype=np.uint8)
  log.images(3, "samples/grid", grid)
  log.close()
  with open(tmp_path / "metrics.jsonl") as f:
    records = [json.loads(line) for line in f]
  assert [r["step"] for r in records] == [1, 2, 3] and records[1]["loss"] == 0.5
  values = [(e.step, v.tag, v) for e in read_events(str(tmp_path / "tb")) for v in e.summary.value]
  losses = [(s, v.simple_value) for s, tag, v in values if tag == "train/loss"]
  assert losses == [(1, 1.0), (2, 0.5), (3, np.float32(1 / 3))]
  (image,) = [v.image for _, tag, v in values if tag == "samples/grid"]
  assert (image.height, image.width, image.colorspace) == (8, 12, 3)


def test_resume_drops_records_after_the_restored_step(tmp_path):
  log = MetricsLog(str(tmp_path), total_steps=10, start_step=0, enabled=True)
  for step in range(1, 6):
    log.scalars(step, {"loss": float(step)})
  log.close()
  MetricsLog(str(tmp_path), total_steps=10, start_step=3, enabled=True).close()  # resumed from step 3
  with open(tmp_path / "metrics.jsonl") as f:
    assert [json.loads(line)["step"] for line in f] == [1, 2, 3]


def test_the_writer_does_not_import_torch(tmp_path):
  """torch is installed here (the test extra); tensorboardX would import it (2 s) for nothing."""
  code = ("import sys; from magicpose_jax.train.metrics_log import MetricsLog; "
          f"log = MetricsLog({str(tmp_path)!r}, 2, 0, enabled=True); log.scalars(1, {{'loss': 1.0}}); log.close(); "
          "print('torch' in sys.modules); import torch; print(torch.zeros(1).shape[0])")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"}).stdout.split()
  assert out == ["False", "1"]  # not imported by the log, and still importable after it


def test_every_line_is_strict_json_with_non_finite_values_as_strings(tmp_path):
  log = MetricsLog(str(tmp_path), total_steps=10, start_step=0, enabled=True)
  log.scalars(1, {"loss": float("nan"), "grad_norm": float("inf"), "lr": -float("inf"), "skipped": 1.0})
  log.close()
  line = (tmp_path / "metrics.jsonl").read_text()
  record = json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c} in {line}"))  # strict JSON
  assert record == {"step": 1, "loss": "NaN", "grad_norm": "Infinity", "lr": "-Infinity", "skipped": 1.0}
  assert np.isnan(float(record["loss"])) and float(record["grad_norm"]) == np.inf  # float() reads them back


def test_a_torn_last_line_is_dropped_on_resume_with_a_message(tmp_path, caplog):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n{"step": 3, "lo')  # killed mid-write
  with caplog.at_level(logging.WARNING):
    MetricsLog(str(tmp_path), total_steps=10, start_step=3, enabled=True).close()
  assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]
  assert f"{path}: dropped its last line, torn by a crash mid-write" in caplog.text


def test_a_garbled_line_before_the_last_stops_the_resume_naming_the_file_and_line(tmp_path):
  path = tmp_path / "metrics.jsonl"
  original = '{"step": 1, "loss": 1.0}\n{"step": 2, "lo\n{"step": 3, "loss": 0.5}\n'
  path.write_text(original)
  with pytest.raises(ValueError, match=f"{path}, line 2: not JSON"):
    MetricsLog(str(tmp_path), total_steps=10, start_step=3, enabled=True)
  assert path.read_text() == original  # untouched


def test_no_tensorboard_folder_before_the_first_record(tmp_path):
  MetricsLog(str(tmp_path), total_steps=10, start_step=0, enabled=True).close()
  assert os.listdir(tmp_path) == []  # a run that fails before logging leaves its workdir empty
