"""Config checks before anything is compiled (train/validate.py): every numeric field has a range, bad values are
named with what was expected, the packaged configs pass, fields fixed on resume are refused unless allowed, user
paths become absolute; through the CLI a bad value exits 2 in seconds with no workdir left behind."""

import json
import subprocess
import time

import ml_collections
import pytest
import train_cli

from magicpose_jax.configs import load_config
from magicpose_jax.train import validate
from magicpose_jax.train.config import default_config

# Numeric fields checked elsewhere: the mesh sizes by sharding.mesh_shape (called by config_problems).
CHECKED_ELSEWHERE = ("mesh.",)


def numeric_fields(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  out = []
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      out += numeric_fields(value, f"{prefix}{key}.")
    elif isinstance(value, int | float) and not isinstance(value, bool):
      out.append(prefix + key)
  return out


def covered(field: str) -> bool:
  parts = field.split(".")
  return any(".".join(parts[:i]) in validate.CHECKS for i in range(1, len(parts) + 1)) or \
      field.startswith(CHECKED_ELSEWHERE)


def test_every_numeric_field_has_a_check():
  fields = numeric_fields(default_config())
  assert len(fields) > 30
  assert [f for f in fields if not covered(f)] == []


@pytest.mark.parametrize("name", ["tiny", "demo", "stage1", "stage2"])
def test_packaged_configs_pass(name):
  config = load_config(name)
  if config.data.source == "arrayrecord":
    config.data.path = "/data/records"  # the paper configs take it from the command line
  assert validate.config_problems(config, num_devices=1) == []


def with_(**changes):
  """The tiny config with `a__b=v` set as `a.b = v`."""
  config = load_config("tiny")
  config.update_from_flattened_dict({k.replace("__", "."): v for k, v in changes.items()})
  return config


@pytest.mark.parametrize("changes, line", [
    ({"checkpoint_every": 0}, "config.checkpoint_every=0: expected an integer >= 1"),
    ({"log_every": 0}, "config.log_every=0: expected an integer >= 1"),
    ({"total_steps": -1}, "config.total_steps=-1: expected an integer >= 0"),
    ({"keep_checkpoints": 0}, "config.keep_checkpoints=0: expected an integer >= 1"),
    ({"optimizer__lr": 0.0}, "config.optimizer.lr=0.0: expected a number > 0.0"),
    ({"optimizer__lr": float("nan")}, "config.optimizer.lr=nan: expected a number > 0.0"),
    ({"optimizer__b2": 1.0}, "config.optimizer.b2=1.0: expected a number in [0.0, 1.0)"),
    ({"drop__pose": 1.5}, "config.drop.pose=1.5: expected a number in [0.0, 1.0]"),
    ({"drop__reference": -0.1}, "config.drop.reference=-0.1: expected a number in [0.0, 1.0]"),
    ({"ema_decay": 1.0}, "config.ema_decay=1.0: expected a number in [0.0, 1.0)"),
    ({"data__augment__flip_prob": 2.0}, "config.data.augment: AugmentConfig.flip_prob must be in [0, 1], got 2.0"),
    ({"data__synthetic__num_identities": 0}, "config.data.synthetic: SyntheticConfig: num_identities and "),
    ({"stage": "stage3"}, "config.stage='stage3': expected one of ('base', 'stage1', 'stage2')"),
    ({"remat_policy": "some"}, "config.remat_policy='some': expected one of ("),
    ({"dtype": "float33"}, "config.dtype='float33': expected a dtype name"),
    ({"resume_damaged": "ignore"}, "config.resume_damaged='ignore': expected one of ('fallback', 'error')"),
    ({"global_batch_size": 6, "grad_accum_steps": 4},
     "config.global_batch_size=6 is not divisible by config.grad_accum_steps=4"),
    ({"data__source": "arrayrecord"}, "config.data.source='arrayrecord' needs config.data.path"),
])
def test_a_bad_value_is_named_with_what_was_expected(changes, line):
  problems = validate.config_problems(with_(**changes), num_devices=1)
  assert len(problems) == 1 and problems[0].startswith(line), problems


def test_the_batch_must_divide_over_the_data_parallel_mesh_and_processes():
  config = with_(global_batch_size=4, grad_accum_steps=2)
  assert validate.config_problems(config, num_devices=2) == []
  (problem,) = validate.config_problems(config, num_devices=4)
  assert problem == ("config.global_batch_size=4 (micro-batch 2 with grad_accum_steps=2) is not divisible by the "
                     "data-parallel mesh size data x fsdp = 4")
  (problem,) = validate.config_problems(with_(mesh__fsdp=3), num_devices=4)
  assert "does not divide the 4 devices" in problem
  (problem,) = validate.config_problems(with_(global_batch_size=6), num_devices=1, process_count=4)
  assert problem == "config.global_batch_size=6 is not divisible by the 4 processes"


def test_all_problems_are_raised_together():
  with pytest.raises(validate.ConfigError) as e:
    validate.check_config(with_(checkpoint_every=0, log_every=0, optimizer__lr=-1.0))
  assert str(e.value).count("\n  config.") == 3


def recorded(config):
  """A config as a checkpoint's meta record holds it (JSON: tuples become lists)."""
  return json.loads(config.to_json_best_effort())


def test_fields_fixed_on_resume_are_refused_unless_allowed():
  run = recorded(load_config("tiny"))
  assert validate.check_resume(with_(optimizer__lr=3e-4, total_steps=100, log_every=7), run, "w") == {}
  with pytest.raises(validate.ConfigError) as e:
    validate.check_resume(with_(global_batch_size=8, model__unet="sd15", seed=2), run, "runs/x/checkpoints/4")
  message = str(e.value)
  assert message.startswith("runs/x/checkpoints/4 is a run with another config")
  for line in ("config.global_batch_size: the run used 4, this command says 8",
               "config.model.unet: the run used 'tiny', this command says 'sd15'",
               "config.seed: the run used 0, this command says 2",
               "--config.resume_allow_changes=global_batch_size,model.unet,seed"):
    assert line in message
  allowed = validate.check_resume(with_(global_batch_size=8, resume_allow_changes="global_batch_size"), run, "w")
  assert allowed == {"global_batch_size": (4, 8)}
  assert validate.check_resume(with_(model__unet="sd15", resume_allow_changes="model"), run, "w")
  assert validate.check_resume(with_(seed=5, stage="base", resume_allow_changes="*"), run, "w")
  del run["model"]["unet"]  # an older record without the field: not compared
  assert validate.check_resume(with_(model__unet="sd15"), run, "w") == {}


def test_user_paths_become_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv("HOME", "/home/someone")
  config = with_(init_from="runs/stage1", base__path="~/sd15", data__path="")
  validate.resolve_paths(config)
  assert (config.init_from, config.base.path, config.data.path) == (str(tmp_path / "runs" / "stage1"),
                                                                    "/home/someone/sd15", "")


def test_cli_refuses_checkpoint_every_0_before_compiling(tmp_path):
  workdir = tmp_path / "run"
  t0 = time.time()
  result = subprocess.run(train_cli.command(str(workdir), checkpoint_every=0, log_every=0),
                          env=train_cli.env(str(tmp_path / "cache")), capture_output=True, text=True, timeout=300,
                          cwd=train_cli.ROOT, check=False)
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stderr.strip().splitlines() == ["error: the training config cannot run:",
                                                "  config.checkpoint_every=0: expected an integer >= 1",
                                                "  config.log_every=0: expected an integer >= 1"], result.stderr
  assert not workdir.exists() and not (tmp_path / "cache").exists()  # nothing created, nothing compiled
  assert time.time() - t0 < 120
