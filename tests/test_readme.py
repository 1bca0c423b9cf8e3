"""README.md and docs/*.md stay true: a short README without dated history, links that resolve inside the
repository, and command lines that the CLIs they name accept.

The commands are read from fenced code blocks (lines joined at a trailing backslash, `# comments` dropped) and
parsed with each CLI's own argparse parser (`build_parser()`); nothing is run. The training CLI uses absl flags:
its config file is resolved as the CLI resolves it and loaded with the `--config.KEY=VALUE` overrides applied,
so a missing config or a misspelt key fails here.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import importlib
import importlib.util
import io
import os
import re
import shlex
from collections.abc import Iterator

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
DOCS = [README, *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]
# Links are checked in every Markdown file of the repository's documentation.
LINKED = [*DOCS, *sorted(glob.glob(os.path.join(ROOT, "launch", "*.md"))),
          *sorted(glob.glob(os.path.join(ROOT, "benchmarks", "results", "*.md")))]
MAX_README_LINES = 300

FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
HTML_COMMENT = re.compile(r"<!--.*?-->", re.S)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)
SCRIPT = re.compile(r"(?<![\w/.-])((?:benchmarks|examples|launch)/[\w./-]+\.(?:py|sh|sbatch))\b")
# A commit hash: 7 to 40 hex digits with at least one letter and one digit (so neither 1000000 nor "defaced").
COMMIT = re.compile(r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,40}\b")
ISSUE = re.compile(r"\bissues?\s*#?\d+|(?<![\w&/])#\d+\b", re.I)
DATE = re.compile(r"\b(?:19|20)\d\d-[01]\d(?:-[0-3]\d)?\b"  # 2026-11 or 2026-11-28
                  r"|\b(?:jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec)[a-z]*\.? (?:[0-3]?\d, )?(?:19|20)\d\d\b",
                  re.I)
SHELL_OPERATORS = {"&&", "||", "|", ";", ">", ">>", "&"}


def _read(path: str) -> str:
  with open(path, encoding="utf-8") as f:
    return f.read()


def _rel(path: str) -> str:
  return os.path.relpath(path, ROOT)


def code_blocks(text: str) -> list[str]:
  return FENCE.findall(text)


def command_lines(block: str) -> Iterator[str]:
  """Logical lines of a shell block: backslash continuations joined."""
  pending = ""
  for line in block.splitlines():
    if line.rstrip().endswith("\\"):
      pending += line.rstrip()[:-1] + " "
      continue
    yield pending + line
    pending = ""
  if pending:
    yield pending


def module_commands(text: str) -> list[tuple[str, list[str]]]:
  """Every `python -m magicpose_jax.X ARGS` in the text's code blocks, as (module, args)."""
  found = []
  for block in code_blocks(text):
    for line in command_lines(block):
      try:
        tokens = shlex.split(line, comments=True)
      except ValueError:  # not shell (e.g. Python with an apostrophe)
        continue
      for i in range(len(tokens) - 2):
        if os.path.basename(tokens[i]).startswith("python") and tokens[i + 1] == "-m" \
            and tokens[i + 2].startswith("magicpose_jax"):
          args = []
          for token in tokens[i + 3:]:
            if token in SHELL_OPERATORS:
              break
            args.append(token)
          found.append((tokens[i + 2], args))
  return found


def _all_commands() -> list[tuple[str, str, list[str]]]:
  return [(_rel(path), module, args) for path in DOCS for module, args in module_commands(_read(path))]


COMMANDS = _all_commands()


def cli_module(name: str):
  """The module `python -m name` runs (a package's `__main__`)."""
  spec = importlib.util.find_spec(name)
  assert spec is not None, f"`python -m {name}`: no such module"
  if spec.submodule_search_locations is not None:
    name += ".__main__"
  return importlib.import_module(name)


def parse_argparse(module, args: list[str]) -> argparse.Namespace:
  """`args` through the CLI's own parser; a usage error fails with argparse's message."""
  assert hasattr(module, "build_parser"), f"{module.__name__} has no build_parser() to check its commands against"
  parser = module.build_parser()
  stderr = io.StringIO()
  try:
    with contextlib.redirect_stderr(stderr):
      return parser.parse_args(args)
  except SystemExit:
    pytest.fail(f"{module.__name__} rejects {shlex.join(args)}:\n{stderr.getvalue()}")


def parse_train(module, args: list[str]) -> None:
  """The training CLI's absl flags: the config file (resolved by name as the CLI does) and its overrides load in
  a fresh FlagValues; every other flag must be one the CLI defines, with a value its parser accepts."""
  from absl import flags  # noqa: PLC0415
  from ml_collections import config_flags  # noqa: PLC0415

  argv = module.resolve_config_arg(args)
  config_argv, i = ["train"], 0
  while i < len(argv):
    arg = argv[i]
    name, has_value, value = arg.lstrip("-").partition("=")
    assert arg.startswith("--"), f"unexpected argument {arg!r} in `train {shlex.join(args)}`"
    if name == "config" or name.startswith("config."):
      config_argv.append(arg)
      if name == "config" and not has_value:
        config_argv.append(argv[i + 1])
        i += 1
    else:
      flag_name = name[2:] if name.startswith("no") and name[2:] in flags.FLAGS else name
      assert flag_name in flags.FLAGS, f"`train {shlex.join(args)}`: the training CLI has no flag --{flag_name}"
      flag = flags.FLAGS[flag_name]
      if not flag.boolean:
        if not has_value:
          value = argv[i + 1]
          i += 1
        flag.parser.parse(value)  # raises on a value of the wrong type
    i += 1
  assert any(a.startswith("--config") and not a.startswith("--config.") for a in config_argv), \
      f"`train {shlex.join(args)}` names no --config"
  config_file = next((a.split("=", 1)[1] if "=" in a else config_argv[j + 1])
                     for j, a in enumerate(config_argv) if a == "--config" or a.startswith("--config="))
  assert os.path.isfile(config_file.partition(":")[0]), f"`train {shlex.join(args)}`: no config file {config_file}"
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True, sys_argv=config_argv)
  fv(config_argv)
  assert fv.config is not None  # loading applies the overrides: a misspelt key or a wrong type raises here


def check_command(module_name: str, args: list[str]) -> None:
  module = cli_module(module_name)
  if hasattr(module, "resolve_config_arg"):  # the absl training CLI
    parse_train(module, args)
  else:
    parse_argparse(module, args)


def test_readme_is_short():
  lines = _read(README).count("\n")
  assert lines <= MAX_README_LINES, f"README.md has {lines} lines (at most {MAX_README_LINES}: depth goes to docs/)"


@pytest.mark.parametrize(("what", "pattern"), [("commit hashes", COMMIT), ("issue numbers", ISSUE), ("dates", DATE)],
                         ids=("commits", "issues", "dates"))
def test_readme_has_no_dated_history(what, pattern):
  hits = [m.group(0) for m in pattern.finditer(_read(README))]
  assert not hits, f"README.md holds {what} {hits}: dated numbers go to benchmarks/results/, history to git"


def _slug(heading: str) -> str:
  """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
  return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def broken_links(path: str) -> list[str]:
  text = HTML_COMMENT.sub("", FENCE.sub("", _read(path)))
  problems = []
  for target in LINK.findall(text):
    if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
      continue
    file_part, _, anchor = target.partition("#")
    resolved = os.path.normpath(os.path.join(os.path.dirname(path), file_part)) if file_part else path
    if os.path.commonpath([resolved, ROOT]) != ROOT:
      problems.append(f"{target}: outside the repository")
    elif not os.path.exists(resolved):
      problems.append(f"{target}: no such file")
    elif anchor and resolved.endswith(".md"):
      if anchor not in {_slug(h) for h in HEADING.findall(FENCE.sub("", _read(resolved)))}:
        problems.append(f"{target}: no heading #{anchor} in {_rel(resolved)}")
  return problems


@pytest.mark.parametrize("path", LINKED, ids=_rel)
def test_relative_links_resolve(path):
  assert not broken_links(path), f"{_rel(path)}: broken links:\n" + "\n".join(broken_links(path))


@pytest.mark.parametrize("path", DOCS, ids=_rel)
def test_scripts_named_in_code_blocks_exist(path):
  missing = sorted({s for block in code_blocks(_read(path)) for s in SCRIPT.findall(block)
                    if not os.path.isfile(os.path.join(ROOT, s))})
  assert not missing, f"{_rel(path)} runs scripts that do not exist: {missing}"


def test_readme_shows_the_commands_of_each_job():
  modules = {module for path, module, _ in COMMANDS if path == "README.md"}
  for verb in ("animate", "train", "convert", "evaluate", "preprocess"):
    assert f"magicpose_jax.{verb}" in modules, f"README.md shows no `python -m magicpose_jax.{verb}` command"


@pytest.mark.parametrize(("path", "module", "args"), COMMANDS,
                         ids=[f"{p}:{m.rsplit('.', 1)[-1]}:{i}" for i, (p, m, _) in enumerate(COMMANDS)])
def test_documented_commands_parse(path, module, args):
  check_command(module, args)


def test_a_bad_command_is_caught():
  """The checks above can fail: a bogus flag, a misspelt config key and a missing config file are each refused."""
  with pytest.raises(pytest.fail.Exception, match="unrecognized arguments: --bogus"):
    check_command("magicpose_jax.convert", ["--src", "a", "--dst", "b", "--to", "flax", "--bogus"])
  with pytest.raises(Exception, match="lrr"):
    check_command("magicpose_jax.train", ["--config", "tiny.py", "--config.optimizer.lrr=1"])
  with pytest.raises(AssertionError, match="no config file"):
    check_command("magicpose_jax.train", ["--config", "no_such_config.py"])
  with pytest.raises(AssertionError, match="no flag --wrkdir"):
    check_command("magicpose_jax.train", ["--config", "tiny.py", "--wrkdir", "runs/x"])
