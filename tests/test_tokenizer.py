"""Our CLIP tokenizer vs transformers' `CLIPTokenizer.from_pretrained(folder)`: identical ids.

The vocabulary is built here the way CLIP's is (the 256 byte symbols, their `</w>` forms,
one token per learned merge, then `<|startoftext|>` and `<|endoftext|>`) from ~300 BPE
merges learned on a generated corpus, and written as a diffusers `tokenizer/` folder in the
layouts the public checkpoints use (bare vocab/merges, SD 1.5's and SD 2's legacy special
token files, and the newer `added_tokens_decoder` form).
"""

import collections
import itertools
import json
import random
import shutil

import numpy as np
import pytest
import transformers

from magicpose_jax.tokenizer import CLIPTokenizer, bytes_to_unicode, normalize, pre_tokenize, read_merges

N_MERGES = 300
BYTE_SYMBOLS = list(bytes_to_unicode().values())

# --- a tiny BPE trainer ------------------------------------------------------------------------

_SYLLABLES = [c + v for c in "bcdfghklmnprstvwz" for v in "aeiou"] + ["th", "ch", "sh", "ng", "qu", "x"]
_WORDS = ("a photo of an astronaut riding a horse on the moon highly detailed portrait trending on artstation "
          "masterpiece best quality ultra sharp 8k 4k 1girl solo dancing street background studio lighting "
          "café déjà vu naïve façade crème brûlée Zürich Ångström São Paulo ñandú "
          "東京 タワー 夜景 桜の花 한국어 문장 中文 提示词 Привет мир Καλημέρα κόσμε ΟΔΟΣ "
          "😀 🔥🔥 👩‍🚀 👍🏽 ✨ ★ ♥ → ° ½ ² ① ℃ ™ "
          "it's don't we're they've I'm you'll he'd O'Neil rock'n'roll "
          "3.14 2024 1,000,000 #hashtag @user e-mail x+y=z (parenthesis) [brackets] {braces} <tag> "
          "!!! ??? ... --- ___ *** ~~~ ''' \"\"\" ``` ").split(" ")


def _words(text: str) -> list[str]:
  return pre_tokenize(normalize(text))


def learn_merges(corpus: list[str], n_merges: int) -> list[tuple[str, str]]:
  """Plain BPE training on byte-level words with `</w>` on the last symbol; ties broken by the pair."""
  counts = collections.Counter(w for text in corpus for w in _words(text))
  seqs = {w: list(w[:-1]) + [w[-1] + "</w>"] for w in counts}
  merges: list[tuple[str, str]] = []
  have = set(BYTE_SYMBOLS) | {s + "</w>" for s in BYTE_SYMBOLS}
  while len(merges) < n_merges:
    pairs: collections.Counter = collections.Counter()
    for w, s in seqs.items():
      for pair in itertools.pairwise(s):
        pairs[pair] += counts[w]
    best = next((p for p, _ in sorted(pairs.items(), key=lambda kv: (-kv[1], kv[0])) if p[0] + p[1] not in have),
                None)
    if best is None:
      break
    merges.append(best)
    have.add(best[0] + best[1])
    for w, s in seqs.items():
      out, i = [], 0
      while i < len(s):
        if i + 1 < len(s) and (s[i], s[i + 1]) == best:
          out.append(s[i] + s[i + 1])
          i += 2
        else:
          out.append(s[i])
          i += 1
      seqs[w] = out
  return merges


def _corpus(rng: random.Random) -> list[str]:
  made_up = ["".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(400)]
  pool = made_up + _WORDS
  return [" ".join(rng.choice(pool) for _ in range(rng.randint(3, 15))) for _ in range(1500)]


def write_tokenizer(folder, merges: list[tuple[str, str]]) -> dict[str, int]:
  """vocab.json and merges.txt in CLIP's layout; returns the vocabulary."""
  folder.mkdir(parents=True, exist_ok=True)
  tokens = BYTE_SYMBOLS + [s + "</w>" for s in BYTE_SYMBOLS] + [a + b for a, b in merges]
  tokens += ["<|startoftext|>", "<|endoftext|>"]
  vocab = {t: i for i, t in enumerate(tokens)}
  assert len(vocab) == len(tokens)
  (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
  (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                                     encoding="utf-8")
  return vocab


def _added(content: str, **extra) -> dict:
  return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False, **extra}


def _legacy_files(pad_in_map: str) -> tuple[dict, dict]:
  """tokenizer_config.json and special_tokens_map.json as in SD 1.5 / SD 2.x's `tokenizer/`."""
  typed = lambda c: {"__type": "AddedToken", **_added(c)}
  config = {"add_prefix_space": False, "bos_token": typed("<|startoftext|>"), "do_lower_case": True,
            "eos_token": typed("<|endoftext|>"), "errors": "replace", "model_max_length": 77,
            "name_or_path": "openai/clip-vit-large-patch14", "pad_token": "<|endoftext|>",
            "special_tokens_map_file": "./special_tokens_map.json", "tokenizer_class": "CLIPTokenizer",
            "unk_token": typed("<|endoftext|>")}
  special = {"bos_token": _added("<|startoftext|>"), "eos_token": _added("<|endoftext|>"),
             "pad_token": pad_in_map, "unk_token": _added("<|endoftext|>")}
  return config, special


def _decoder_config(vocab: dict[str, int]) -> dict:
  """The newer tokenizer_config.json (transformers >= 4.34) of an SD 2 tokenizer, plus a
  textual-inversion token (not special, normalized, outside vocab.json)."""
  n = len(vocab)
  decoder = {"0": _added("!", special=True), str(vocab["<|startoftext|>"]): _added("<|startoftext|>", special=True),
             str(vocab["<|endoftext|>"]): _added("<|endoftext|>", special=True),
             str(n): _added("<Cat-Toy>", special=False)}
  return {"add_prefix_space": False, "added_tokens_decoder": decoder, "bos_token": "<|startoftext|>",
          "clean_up_tokenization_spaces": True, "do_lower_case": True, "eos_token": "<|endoftext|>",
          "errors": "replace", "model_max_length": 77, "pad_token": "!", "tokenizer_class": "CLIPTokenizer",
          "unk_token": "<|endoftext|>"}


LAYOUTS = ("bare", "sd15", "sd2", "sd2_decoder")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  root = tmp_path_factory.mktemp("clip_tokenizers")
  merges = learn_merges(_corpus(random.Random(0)), N_MERGES)
  assert len(merges) == N_MERGES
  vocab = write_tokenizer(root / "bare", merges)
  out = {"bare": root / "bare"}
  for name, pad in (("sd15", "<|endoftext|>"), ("sd2", "!")):
    shutil.copytree(root / "bare", root / name)
    config, special = _legacy_files(pad)
    (root / name / "tokenizer_config.json").write_text(json.dumps(config))
    (root / name / "special_tokens_map.json").write_text(json.dumps(special))
    out[name] = root / name
  shutil.copytree(root / "bare", root / "sd2_decoder")
  (root / "sd2_decoder" / "tokenizer_config.json").write_text(json.dumps(_decoder_config(vocab)))
  out["sd2_decoder"] = root / "sd2_decoder"
  return out


@pytest.fixture(scope="module")
def tokenizers(folders):
  return {name: (CLIPTokenizer.from_folder(path), transformers.CLIPTokenizer.from_pretrained(path))
          for name, path in folders.items()}


# --- test strings ------------------------------------------------------------------------------

HANDWRITTEN = [
    "", " ", "   \t\n  ", "a", "A", "a photo of an astronaut riding a horse on the moon",
    "A Photo OF an ASTRONAUT, highly detailed, 8k, trending on ArtStation",
    "masterpiece, best quality, 1girl, solo, dancing, street background",
    "café déjà vu naïve façade crème brûlée", "Cafe\u0301 de\u0301ja\u0300 vu (combining accents, NFC composes them)",
    "Zürich Ångström São Paulo ñandú", "東京タワーの夜景", "桜の花 and 東京 タワー", "한국어 문장 테스트",
    "中文提示词，高质量。", "Привет, мир!", "Καλημέρα κόσμε", "ΟΔΟΣ ΣΟΦΙΑΣ", "ὈΔΥΣΣΕΎΣ", "İstanbul",
    "straße STRASSE ﬁne ﬂower", "😀😀😀 🔥 👩‍🚀 👍🏽 ✨★♥", "emoji-only: 🐱‍👤", "→ ° ½ ² ① ℃ ™ ©",
    "it's don't we're they've I'm you'll he'd", "IT'S DON'T WE'RE THEY'VE I'M YOU'LL HE'D",
    "O'Neil's rock'n'roll '''quoted''' 's 't", "can't won't shan't y'all", "’curly’ quotes don’t split",
    "3.14159 2024-01-01 1,000,000 007 ０１２３ ٣٤٥ ⅫⅣ", "#hashtag @user e-mail x+y=z",
    "(parenthesis) [brackets] {braces} <tag> </tag>", "!!! ??? ... --- ___ *** ~~~", "a!b?c.d,e;f:g",
    "tabs\tand\nnewlines\r\nand\u00a0nbsp\u3000ideographic\u2028line\u2029para\u2003em\u200bzwsp\ufeffbom",
    "multiple     spaces    between    words", "  leading and trailing  ", "\x00control\x07chars\x1b[0m",
    "<|startoftext|>literal specials<|endoftext|>", "<|ENDOFTEXT|> upper-case literal", "a<|endoftext|>b",
    "<|endoftext|><|endoftext|>", "<|startoftext|", "<|endoftext", "<Cat-Toy> on a table", "a <cat-toy>!",
    "wow!! amazing!!! !", "!", "!!", "a ! b", "\\ backslash / slash | pipe", "\"double\" 'single' `back`",
    "mixedCASEwordsWithCamelCase", "snake_case_words and kebab-case-words", "url https://example.com/a?b=c",
    "ÀÉÎÕÜ àéîõü", "\u0301leading combining mark", "a\u0308\u0301 stacked marks", "x" * 300,
    "supercalifragilisticexpialidocious", "hello" + " world" * 100,
    ", ".join(["a beautiful painting of a castle"] * 20), "日本" * 60, "🔥" * 80,
]


def _generated(rng: random.Random, n: int) -> list[str]:
  seps = [" ", "  ", ", ", ",", ". ", "\t", "\n", "\u00a0", "\u3000", "-", "'", "'s ", "!", "", "|", "…"]
  pool = _WORDS + ["".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 5))) for _ in range(200)]
  out = []
  for _ in range(n):
    parts = []
    for _ in range(rng.randint(1, 40)):
      w = rng.choice(pool)
      r = rng.random()
      w = w.upper() if r < 0.1 else w.title() if r < 0.2 else w
      parts += [w, rng.choice(seps)]
    out.append("".join(parts))
  return out


STRINGS = HANDWRITTEN + _generated(random.Random(1), 180)


def _hf_ids(hf, texts, **kw):
  return np.asarray(hf(texts, **kw)["input_ids"], dtype=np.int64)


# --- tests -------------------------------------------------------------------------------------


def test_enough_cases():
  assert len(STRINGS) >= 200


@pytest.mark.parametrize("layout", LAYOUTS)
def test_ids_match_transformers(tokenizers, layout):
  ours, hf = tokenizers[layout]
  got = ours(STRINGS)
  assert got.dtype == np.int32 and got.shape == (len(STRINGS), 77)
  want = _hf_ids(hf, STRINGS, max_length=77, padding="max_length", truncation=True)
  bad = [(s, list(g), list(w)) for s, g, w in zip(STRINGS, got, want, strict=True) if not np.array_equal(g, w)]
  assert not bad, f"{len(bad)} strings differ, first: {bad[0]}"
  # The comparison exercises what it should: merges, truncation, padding.
  assert (got >= 2 * 256).any() and (got[(got >= 512) & (got < 512 + N_MERGES)]).size > 1000
  lengths = [len(ours.encode(s)) for s in STRINGS]
  assert sum(n > 75 for n in lengths) >= 5 and sum(n < 20 for n in lengths) >= 20
  assert (got[:, -1] == ours.pad_token_id).sum() >= 20


@pytest.mark.parametrize("layout", LAYOUTS)
def test_untruncated_ids_match_transformers(tokenizers, layout):
  ours, hf = tokenizers[layout]
  for s in STRINGS:
    assert ours.encode(s) == hf(s, add_special_tokens=False)["input_ids"], repr(s)


def test_padding_longest_and_single_string(tokenizers):
  ours, hf = tokenizers["sd15"]
  batch = STRINGS[5:12]
  np.testing.assert_array_equal(ours(batch, padding="longest"), _hf_ids(hf, batch, padding="longest",
                                                                          max_length=77, truncation=True))
  np.testing.assert_array_equal(ours(batch, max_length=16), _hf_ids(hf, batch, padding="max_length",
                                                                    max_length=16, truncation=True))
  one = ours("a photo of an astronaut")
  assert one.shape == (1, 77)
  np.testing.assert_array_equal(one, ours(["a photo of an astronaut"]))
  assert ours([]).shape == (0, 77)


def test_special_tokens_come_from_the_folder(tokenizers, folders):
  vocab = json.loads((folders["bare"] / "vocab.json").read_text(encoding="utf-8"))
  bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
  for layout, pad in (("bare", eos), ("sd15", eos), ("sd2", 0), ("sd2_decoder", 0)):
    ours, hf = tokenizers[layout]
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (bos, eos, pad) == (
        hf.bos_token_id, hf.eos_token_id, hf.pad_token_id), layout
    row = ours("a")[0]
    assert row[0] == bos and row[2] == eos and (row[3:] == pad).all()
    assert ours.model_max_length == 77
  ours, _ = tokenizers["sd2_decoder"]
  assert ours.encode("<CAT-TOY>") == [len(vocab)]  # a normalized added token matches in any case


def test_truncation_keeps_end_of_text(tokenizers):
  ours, _ = tokenizers["sd15"]
  long = "hello " * 200
  row = ours(long)[0]
  assert row[0] == ours.bos_token_id and row[-1] == ours.eos_token_id and (row[1:-1] != ours.eos_token_id).all()
  with pytest.raises(ValueError, match=r"texts \[1\] are longer than max_length=77"):
    ours(["short", long], truncation=False)
  assert ours(["short", long], truncation=False, padding="longest").shape == (2, len(ours.encode(long)) + 2)


def test_bad_arguments(tokenizers):
  ours, _ = tokenizers["bare"]
  with pytest.raises(ValueError, match="padding"):
    ours("a", padding="do_not_pad")
  with pytest.raises(ValueError, match="max_length must be >= 2"):
    ours("a", max_length=1)
  with pytest.raises(TypeError, match="texts"):
    ours([1, 2])


def test_merges_file_rules(folders, tmp_path):
  merges = read_merges(folders["bare"] / "merges.txt")
  assert len(merges) == N_MERGES
  text = (folders["bare"] / "merges.txt").read_text(encoding="utf-8")
  crlf = tmp_path / "crlf.txt"
  crlf.write_bytes(text.replace("\n", "\r\n").encode())
  assert read_merges(crlf) == merges
  no_header = tmp_path / "no_header.txt"
  no_header.write_text(text.split("\n", 1)[1], encoding="utf-8")
  assert read_merges(no_header) == merges
  blank = tmp_path / "blank.txt"
  blank.write_text(text + "\n", encoding="utf-8")
  with pytest.raises(ValueError, match=rf"blank\.txt:{N_MERGES + 2}: expected two symbols"):
    read_merges(blank)


def test_missing_files_are_named(tmp_path):
  (tmp_path / "vocab.json").write_text("{}")
  with pytest.raises(FileNotFoundError, match=r"merges\.txt not found"):
    CLIPTokenizer.from_folder(tmp_path)


def test_unsupported_special_tokens_are_rejected(folders, tmp_path):
  shutil.copytree(folders["bare"], tmp_path / "t")
  (tmp_path / "t" / "tokenizer_config.json").write_text(json.dumps({"mask_token": "<mask>"}))
  with pytest.raises(ValueError, match=r"\['mask_token'\] are not supported"):
    CLIPTokenizer.from_folder(tmp_path / "t")
  (tmp_path / "t" / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<pad>"}))
  with pytest.raises(ValueError, match=r"pad_token '<pad>' is not in vocab\.json"):
    CLIPTokenizer.from_folder(tmp_path / "t")
