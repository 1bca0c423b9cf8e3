"""CLIP's byte-level BPE tokenizer in plain Python, ids identical to transformers' `CLIPTokenizer`.

The reference is the `CLIPTokenizer` of transformers 5 (`CLIPTokenizer.from_pretrained(folder)`),
which is built on the `tokenizers` library; there is no separate slow tokenizer any more, and the
pipeline below follows its backend step by step:

1. added tokens: the special tokens (and any other added token) are cut out of the text first:
   those with `normalized=False` on the raw text, the others after step 2 on each remaining
   segment; matches are leftmost-longest and exact;
2. normalizer: Unicode NFC, every run of whitespace -> one space, lowercasing character by
   character (so a final capital sigma becomes `σ`, never the context form `ς`);
3. pre-tokenizer: CLIP's pattern keeps its matches and drops whitespace; each piece is split
   again by GPT-2's byte-level pattern (this is what makes a literal `<|endoftext|>` that was not
   matched as an added token come out as `<|`, `endoftext`, `|>`) and mapped byte by byte onto
   the 256 printable symbols of `bytes_to_unicode`;
4. BPE on each word with `</w>` appended to its last symbol, merges applied lowest rank first;
   a symbol missing from the vocabulary becomes the unknown token;
5. `<|startoftext|> ... <|endoftext|>`, truncated to `max_length` keeping both ends, padded with the
   pad token (SD 1.x folders pad with `<|endoftext|>` = 49407, SD 2.x folders with `!` = 0).

This differs from the legacy slow tokenizer of transformers 4 without ftfy (whose BasicTokenizer
put spaces around CJK characters and dropped control characters) and from OpenAI's own tokenizer
(ftfy + html unescaping); the fast one is what diffusers uses today.

The patterns need `\\p{L}`/`\\p{N}`, which Python's `re` lacks: the `regex` package is a runtime
dependency of this module.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import unicodedata
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import regex

# transformers' CLIPTokenizer pre-tokenizer pattern (matches are kept, the rest is whitespace and dropped).
_CLIP_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""")
# GPT-2's pattern, applied by the ByteLevel pre-tokenizer (use_regex=True) to each piece of the above.
_BYTE_LEVEL_PATTERN = regex.compile(
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
_WHITESPACE = regex.compile(r"\s+")

END_OF_WORD = "</w>"
_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")  # transformers' registration order
_UNSUPPORTED_SPECIALS = ("sep_token", "cls_token", "mask_token", "additional_special_tokens", "extra_special_tokens")
_DEFAULT_SPECIALS = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                     "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
# CLIP's text encoder has 77 positions; used when a folder does not state `model_max_length`.
DEFAULT_MAX_LENGTH = 77
_BPE_CACHE_SIZE = 100_000


def bytes_to_unicode() -> dict[int, str]:
  """GPT-2/CLIP's map of the 256 byte values onto printable characters (no whitespace/control)."""
  printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
      range(ord("®"), ord("ÿ") + 1))
  chars = printable[:]
  extra = 0
  for b in range(256):
    if b not in printable:
      printable.append(b)
      chars.append(256 + extra)
      extra += 1
  return {b: chr(c) for b, c in zip(printable, chars, strict=True)}


_BYTE_TO_CHAR = bytes_to_unicode()


def normalize(text: str) -> str:
  """transformers' CLIP normalizer: NFC, whitespace runs -> " ", per-character lowercasing."""
  text = _WHITESPACE.sub(" ", unicodedata.normalize("NFC", text))
  # str.lower() is per character except for the final-sigma rule, which the tokenizers
  # library does not apply.
  return "".join(c.lower() for c in text) if "Σ" in text else text.lower()


def pre_tokenize(normalized: str) -> list[str]:
  """Normalized text -> byte-level words (each character one of `bytes_to_unicode`'s)."""
  words = []
  for piece in _CLIP_PATTERN.findall(normalized):
    for sub in _BYTE_LEVEL_PATTERN.findall(piece):
      words.append("".join(_BYTE_TO_CHAR[b] for b in sub.encode("utf-8")))
  return words


@dataclasses.dataclass(frozen=True)
class AddedToken:
  """A token matched as a whole before BPE (special tokens, textual-inversion tokens)."""

  content: str
  id: int
  normalized: bool = False  # matched on the normalized text (True) or on the raw text (False)
  special: bool = True


class CLIPTokenizer:
  """CLIP's tokenizer: `tokenizer(texts) -> int32 [B, max_length]` ids, as transformers computes them.

  Build it with `from_folder` (a diffusers `tokenizer/` folder) or from a vocabulary and merges.
  """

  def __init__(self, vocab: Mapping[str, int], merges: Sequence[tuple[str, str]],
               bos_token: str = "<|startoftext|>", eos_token: str = "<|endoftext|>",
               unk_token: str = "<|endoftext|>", pad_token: str = "<|endoftext|>",
               model_max_length: int = DEFAULT_MAX_LENGTH, added_tokens: Sequence[AddedToken] | None = None,
               source: str = "CLIPTokenizer"):
    """Builds the tokenizer from a vocabulary and merges (`from_folder` reads them from files).

    Args:
      vocab: token -> id (`vocab.json`).
      merges: BPE merges, best (rank 0) first (`merges.txt` without its `#version` line).
      bos_token, eos_token, unk_token, pad_token: special token strings.
      model_max_length: the default `max_length` of `__call__`.
      added_tokens: tokens cut out before BPE; None: the four special tokens, matched on the raw
        text (what transformers does for a folder with only `vocab.json` and `merges.txt`).
      source: named in error messages.
    """
    self.source = source
    self.encoder = dict(vocab)
    self.decoder = {i: t for t, i in self.encoder.items()}
    self.merge_ranks = {tuple(m): r for r, m in reversed(list(enumerate(merges)))}  # first rank wins
    self.model_max_length = int(model_max_length)
    if added_tokens is None:
      added_tokens = [AddedToken(t, self._vocab_id(t, n)) for n, t in
                      (("bos_token", bos_token), ("eos_token", eos_token), ("unk_token", unk_token),
                       ("pad_token", pad_token))]
    self.added_tokens = tuple(dict((t.content, t) for t in added_tokens).values())
    added_ids = {t.content: t.id for t in self.added_tokens}
    for name, token in (("bos_token", bos_token), ("eos_token", eos_token), ("unk_token", unk_token),
                        ("pad_token", pad_token)):
      if token not in added_ids and token not in self.encoder:
        raise ValueError(f"{source}: {name} {token!r} is neither in the vocabulary nor an added token")
    self.bos_token, self.eos_token, self.unk_token, self.pad_token = bos_token, eos_token, unk_token, pad_token
    self.bos_token_id, self.eos_token_id, self.unk_token_id, self.pad_token_id = (
        added_ids.get(t, self.encoder.get(t)) for t in (bos_token, eos_token, unk_token, pad_token))
    self._added_ids = added_ids
    self._raw_pattern = _alternation([t.content for t in self.added_tokens if not t.normalized])
    # Normalized added tokens are matched in their normalized form (the tokenizers library does the same).
    self._normalized_ids = {normalize(t.content): t.id for t in self.added_tokens if t.normalized}
    self._normalized_pattern = _alternation(list(self._normalized_ids))
    self._cache: dict[str, list[int]] = {}

  def _vocab_id(self, token: str, name: str) -> int:
    if token not in self.encoder:
      raise ValueError(f"{self.source}: {name} {token!r} is not in the vocabulary")
    return self.encoder[token]

  @classmethod
  def from_folder(cls, path: str | os.PathLike) -> CLIPTokenizer:
    """Reads a diffusers/transformers CLIP tokenizer folder.

    Reads `vocab.json` and `merges.txt` (required), and `tokenizer_config.json`,
    `special_tokens_map.json` and `added_tokens.json` when present, resolving special tokens
    as transformers 5 does: with an `added_tokens_decoder` in `tokenizer_config.json` that table
    defines the added tokens and `special_tokens_map.json` is not read; otherwise the entries of
    `special_tokens_map.json` override those of `tokenizer_config.json`, a special token given as
    a dict keeps its `normalized` flag, one given as a plain string is matched on the raw text, and
    when several special tokens share a string the last of bos, eos, unk, pad sets the flag.
    """
    folder = os.fspath(path)
    vocab_file, merges_file = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
    for f in (vocab_file, merges_file):
      if not os.path.isfile(f):
        raise FileNotFoundError(f"CLIP tokenizer folder {folder}: {os.path.basename(f)} not found "
                                f"(need vocab.json and merges.txt)")
    with open(vocab_file, encoding="utf-8") as f:
      vocab = json.load(f)
    merges = read_merges(merges_file)
    config = _read_json(os.path.join(folder, "tokenizer_config.json"))
    tokens: dict[str, Any] = {k: config[k] for k in _SPECIAL_NAMES if k in config}
    added: list[AddedToken] = []
    decoder = config.get("added_tokens_decoder")
    if decoder is not None:
      for idx, tok in sorted(decoder.items(), key=lambda kv: int(kv[0])):
        _check_flags(tok, f"{folder}/tokenizer_config.json added_tokens_decoder[{idx}]")
        special = bool(tok.get("special", False))
        added.append(AddedToken(tok["content"], int(idx), bool(tok.get("normalized", not special)), special))
    else:
      tokens.update({k: v for k, v in _read_json(os.path.join(folder, "special_tokens_map.json")).items()
                     if k in _SPECIAL_NAMES})
      legacy = _read_json(os.path.join(folder, "added_tokens.json"))
      contents = {_content(v) for v in tokens.values()}
      for content, idx in sorted(legacy.items(), key=lambda kv: kv[1]):
        special = content in contents
        added.append(AddedToken(content, int(idx), normalized=not special, special=special))
    extra = {k: v for k, v in {**_read_json(os.path.join(folder, "special_tokens_map.json")), **config}.items()
             if k in _UNSUPPORTED_SPECIALS and v}
    if extra:
      raise ValueError(f"{folder}: special tokens {sorted(extra)} are not supported by CLIPTokenizer")
    names = {name: _content(tokens.get(name, _DEFAULT_SPECIALS[name])) for name in _SPECIAL_NAMES}
    by_content = {t.content: t for t in added}
    for name in _SPECIAL_NAMES:
      value = tokens.get(name, _DEFAULT_SPECIALS[name])
      content = names[name]
      if isinstance(value, Mapping):
        _check_flags(value, f"{folder}: {name}")
      known = by_content.get(content)
      if decoder is not None and known is not None:
        continue  # transformers maps named tokens onto the decoder's AddedToken (its flags stay)
      normalized = bool(value.get("normalized", False)) if isinstance(value, Mapping) else False
      idx = known.id if known is not None else vocab.get(content)
      if idx is None:
        raise ValueError(f"{folder}: {name} {content!r} is not in vocab.json")
      # Re-adding an existing token replaces its flags: the last registration wins.
      by_content.pop(content, None)
      by_content[content] = AddedToken(content, idx, normalized=normalized, special=True)
    max_length = config.get("model_max_length", DEFAULT_MAX_LENGTH)
    if not isinstance(max_length, int) or max_length > 1_000_000:
      max_length = DEFAULT_MAX_LENGTH  # transformers writes ~1e30 for "no limit"
    return cls(vocab, merges, model_max_length=max_length, added_tokens=list(by_content.values()),
               source=folder, **names)

  # --- encoding -----------------------------------------------------------------------------------

  def bpe(self, word: str) -> list[str]:
    """One byte-level word -> its BPE tokens (the last one ends in `</w>`)."""
    if not word:
      return []
    symbols = list(word[:-1]) + [word[-1] + END_OF_WORD]
    ranks = self.merge_ranks
    while len(symbols) > 1:
      best = min(itertools.pairwise(symbols), key=lambda p: ranks.get(p, float("inf")))
      if best not in ranks:
        break
      a, b = best
      merged, i = [], 0
      while i < len(symbols):  # merge every occurrence, left to right, without overlaps
        if i < len(symbols) - 1 and symbols[i] == a and symbols[i + 1] == b:
          merged.append(a + b)
          i += 2
        else:
          merged.append(symbols[i])
          i += 1
      symbols = merged
    return symbols

  def _word_ids(self, word: str) -> list[int]:
    ids = self._cache.get(word)
    if ids is None:
      ids = [self.encoder.get(s, self.unk_token_id) for s in self.bpe(word)]
      if len(self._cache) >= _BPE_CACHE_SIZE:
        self._cache.clear()
      self._cache[word] = ids
    return ids

  def encode(self, text: str) -> list[int]:
    """Ids of `text` without `<|startoftext|>`/`<|endoftext|>`, not truncated."""
    ids: list[int] = []
    for raw, is_added in _split(text, self._raw_pattern):
      if is_added:
        ids.append(self._added_ids[raw])
        continue
      for segment, is_norm_added in _split(normalize(raw), self._normalized_pattern):
        if is_norm_added:
          ids.append(self._normalized_ids[segment])
          continue
        for word in pre_tokenize(segment):
          ids += self._word_ids(word)
    return ids

  def tokenize(self, text: str) -> list[str]:
    """Token strings of `text` (no special tokens added); for inspection."""
    return [self.decoder.get(i, self._added_content(i)) for i in self.encode(text)]

  def _added_content(self, idx: int) -> str:
    return next(t.content for t in self.added_tokens if t.id == idx)

  def __call__(self, texts: str | Sequence[str], max_length: int | None = None,
               padding: str | bool = "max_length", truncation: bool = True) -> np.ndarray:
    """Tokenizes a prompt or a batch of prompts.

    Args:
      texts: one string or a list of strings.
      max_length: sequence length with `<|startoftext|>` and `<|endoftext|>`; None: the
        folder's `model_max_length` (77 for every SD tokenizer).
      padding: "max_length" pads every row to `max_length`; "longest" (or True) to the
        longest row of the batch.
      truncation: cut the text to `max_length - 2` tokens, keeping `<|endoftext|>` last.

    Returns:
      int32 `[B, L]` ids (`B = 1` for a single string), padded with `pad_token_id`.

    Raises:
      ValueError: on an unknown padding mode, or when a row is longer than `max_length` with
        `truncation=False` and `padding="max_length"` (the rows would be ragged).
    """
    if isinstance(texts, str):
      texts = [texts]
    if not isinstance(texts, Sequence) or not all(isinstance(t, str) for t in texts):
      raise TypeError(f"texts: expected a string or a list of strings, got {type(texts).__name__}")
    max_length = self.model_max_length if max_length is None else int(max_length)
    if max_length < 2:
      raise ValueError(f"max_length must be >= 2 (room for <|startoftext|> and <|endoftext|>), got {max_length}")
    if padding is True:
      padding = "longest"
    if padding not in ("max_length", "longest"):
      raise ValueError(f"padding: expected 'max_length', 'longest' or True, got {padding!r}")
    rows = []
    for text in texts:
      ids = self.encode(text)
      if truncation:
        ids = ids[:max_length - 2]
      rows.append([self.bos_token_id] + ids + [self.eos_token_id])
    width = max_length if padding == "max_length" else max((len(r) for r in rows), default=2)
    too_long = [i for i, r in enumerate(rows) if len(r) > width]
    if too_long:
      raise ValueError(f"texts {too_long} are longer than max_length={max_length} tokens with truncation=False; "
                       f"use truncation=True or padding='longest'")
    out = np.full((len(rows), width), self.pad_token_id, np.int32)
    for i, r in enumerate(rows):
      out[i, :len(r)] = r
    return out


def read_merges(path: str | os.PathLike) -> list[tuple[str, str]]:
  """`merges.txt` -> merges, rank 0 first, with the `tokenizers` library's rules.

  Lines starting with `#version` are skipped; every other line must be two symbols separated
  by one space (a blank line is an error there too).
  """
  path = os.fspath(path)
  with open(path, encoding="utf-8", newline="") as f:
    lines = f.read().split("\n")
  if lines and lines[-1] == "":
    lines.pop()  # the final newline ends the last line, it does not start an empty one
  merges = []
  for n, text in enumerate(lines, start=1):
    line = text.removesuffix("\r")
    if line.startswith("#version"):
      continue
    parts = line.split(" ")
    if len(parts) != 2:
      raise ValueError(f"{path}:{n}: expected two symbols separated by one space, got {line!r}")
    merges.append((parts[0], parts[1]))
  return merges


def _read_json(path: str) -> dict:
  if not os.path.isfile(path):
    return {}
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _content(value: Any) -> str:
  """A special token entry (a string, or an AddedToken dict) -> its string."""
  return str(value["content"]) if isinstance(value, Mapping) else str(value)


def _check_flags(token: Mapping[str, Any], where: str) -> None:
  flags = [k for k in ("lstrip", "rstrip", "single_word") if token.get(k)]
  if flags:
    raise ValueError(f"{where}: added token {token.get('content')!r} sets {flags}, which CLIPTokenizer "
                     f"does not support")


def _alternation(strings: Sequence[str]) -> regex.Pattern | None:
  """A pattern matching any of `strings`, longest first (leftmost-longest, like the Aho-Corasick matcher)."""
  strings = sorted({s for s in strings if s}, key=len, reverse=True)
  return regex.compile("|".join(regex.escape(s) for s in strings)) if strings else None


def _split(text: str, pattern: regex.Pattern | None) -> list[tuple[str, bool]]:
  """Splits `text` around the matches of `pattern`: [(segment, is_match)], empty segments dropped."""
  if pattern is None:
    return [(text, False)] if text else []
  out, at = [], 0
  for m in pattern.finditer(text):
    if m.start() > at:
      out.append((text[at:m.start()], False))
    out.append((m.group(), True))
    at = m.end()
  if at < len(text):
    out.append((text[at:], False))
  return out
