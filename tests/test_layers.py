"""The import layers of docs/architecture.md: a module imports only its own layer and the layers below.

    models, tokenizer, pose  <-  diffusion  <-  data, convert  <-  eval  <-  train, configs  <-  inference, export
    <-  CLIs (`__main__` modules, animate, evaluate, preprocess), demo, app, torch_reference

Every import counts, also the ones inside functions (a lazy import is still a dependency). The graph is read from
the source with `ast`, so the test needs nothing imported.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "magicpose_jax"

# Layer of each top-level module or package of magicpose_jax (`__main__` modules are CLIs whatever their package).
LAYERS = {
    "__init__": 0, "models": 0, "tokenizer": 0, "pose": 0,
    "diffusion": 1,
    "data": 2, "convert": 2,
    "eval": 3,
    "train": 4, "configs": 4,
    "inference": 5, "export": 5,
    "animate": 6, "evaluate": 6, "preprocess": 6, "demo": 6, "app": 6, "torch_reference": 6,
}
CLI = 6


def module_name(path: pathlib.Path, root: pathlib.Path = PACKAGE) -> str:
  return ".".join(("magicpose_jax", *path.relative_to(root).with_suffix("").parts)).removesuffix(".__init__")


def layer(module: str) -> int:
  """`magicpose_jax.a.b` -> the layer of `a` (CLIs for `__main__`); a KeyError names an unplaced module."""
  parts = module.split(".")
  if parts[-1] == "__main__":
    return CLI
  top = parts[1] if len(parts) > 1 else "__init__"
  if top not in LAYERS:
    raise KeyError(f"magicpose_jax.{top} has no layer in tests/test_layers.py LAYERS (and docs/architecture.md)")
  return LAYERS[top]


def imports(path: pathlib.Path, root: pathlib.Path = PACKAGE) -> set[str]:
  """Every `magicpose_jax...` module that `path` imports, at any depth of the file (relative imports resolved)."""
  tree = ast.parse(path.read_text(), str(path))
  package = module_name(path, root).split(".")
  if path.name != "__init__.py":
    package = package[:-1]
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found |= {a.name for a in node.names if a.name.split(".")[0] == "magicpose_jax"}
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
      if base.split(".")[0] == "magicpose_jax":
        for alias in node.names:  # `from magicpose_jax import inference` imports the module inference
          sub = pathlib.Path(root, *base.split(".")[1:], alias.name)
          found.add(f"{base}.{alias.name}" if sub.with_suffix(".py").is_file() or sub.is_dir() else base)
  return found


def violations(root: pathlib.Path = PACKAGE) -> list[str]:
  out = []
  for path in sorted(root.rglob("*.py")):
    source = module_name(path, root)
    for target in sorted(imports(path, root)):
      if layer(target) > layer(source):
        out.append(f"{source} (layer {layer(source)}) imports {target} (layer {layer(target)})")
  return out


def test_every_module_has_a_layer():
  for path in PACKAGE.rglob("*.py"):
    layer(module_name(path))


def test_imports_point_down():
  found = violations()
  assert not found, "imports that climb a layer:\n" + "\n".join(found)


def test_a_climbing_import_is_caught(tmp_path):
  """The check itself: a models module importing train must be reported."""
  fake = tmp_path / "magicpose_jax"
  (fake / "models").mkdir(parents=True)
  (fake / "__init__.py").write_text("")
  (fake / "models" / "__init__.py").write_text("")
  (fake / "models" / "bad.py").write_text("def f():\n  from magicpose_jax.train import loop\n")
  assert violations(fake) == ["magicpose_jax.models.bad (layer 0) imports magicpose_jax.train (layer 4)"]
  (fake / "models" / "rel.py").write_text("from ..train import loop\n")
  assert "magicpose_jax.models.rel (layer 0) imports magicpose_jax.train (layer 4)" in violations(fake)
  (fake / "inference.py").write_text("")
  (fake / "models" / "named.py").write_text("from magicpose_jax import inference\n")
  assert "magicpose_jax.models.named (layer 0) imports magicpose_jax.inference (layer 5)" in violations(fake)


if __name__ == "__main__":
  pytest.main([__file__])
