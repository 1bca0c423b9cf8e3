"""Every CLI's --help names the command as it is typed (`python -m magicpose_jax.X`, not `extract.py`), and the
options with defaults say them (animate, evaluate, pose.extract)."""

import pytest

from magicpose_jax import animate, evaluate, preprocess
from magicpose_jax.convert import __main__ as convert_cli
from magicpose_jax.pose import extract


@pytest.mark.parametrize("module, name", [(animate, "animate"), (evaluate, "evaluate"), (preprocess, "preprocess"),
                                          (convert_cli, "convert"), (extract, "pose.extract")])
def test_usage_names_the_module(module, name):
  assert module.build_parser().format_help().startswith(f"usage: python -m magicpose_jax.{name} ")


@pytest.mark.parametrize("module, expected", [
    (animate, ["DDIM steps (default: 50)", "(1: no guidance; default: 7.0)", "(default: 0)", "(default: 8)",
               "(default: 8.0)", "(default: float32)"]),
    (evaluate, ["(default: report)", "(default: alex)", "(default: 16)", "(default: l1,psnr,ssim,lpips,fid)"]),
    (extract, ["(default: 0.3)"]),
])
def test_defaults_are_shown(module, expected):
  text = " ".join(module.build_parser().format_help().split())  # argparse wraps lines
  for part in expected:
    assert part in text, part
