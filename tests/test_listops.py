"""ListOps: generator grammar and distribution, evaluator, tokenizer, TSV reader, files, CLI."""

import json
import pathlib
import random
import re
import subprocess
import sys

import numpy as np
import pytest

from clustr_jax.data import listops

REPO = pathlib.Path(__file__).resolve().parent.parent
SAMPLE = REPO / "tests" / "data" / "listops" / "nangia_bowman_head300.tsv"
SHARED_FILE = REPO.parent / "shared" / "data" / "listops" / "nangia_bowman_listops_test_d20s.tsv"
SMALL = dict(min_length=10, max_length=120, max_depth=8, max_args=10, value_p=0.25)


# ---------------------------------------------------------------------------------------------
# A strict parser of the serialisation, written for the tests:
#   tree  := digit | "(" pairs "]" ")"
#   pairs := "(" operator tree ")" | "(" pairs tree ")"
# It returns (operator, [children]) for operator nodes and the int for digits.
# ---------------------------------------------------------------------------------------------
def _parse_tree(tokens, i):
  if tokens[i] in listops.DIGITS:
    return int(tokens[i]), i + 1
  assert tokens[i] == "(", (i, tokens[i])
  op, children, i = _parse_pairs(tokens, i + 1)
  assert tokens[i:i + 2] == ["]", ")"], (i, tokens[i:i + 2])
  return (op, children), i + 2


def _parse_pairs(tokens, i):
  assert tokens[i] == "(", (i, tokens[i])
  if tokens[i + 1] in listops.OPERATORS:
    op, children, i = tokens[i + 1], [], i + 2
  else:
    op, children, i = _parse_pairs(tokens, i + 1)
  child, i = _parse_tree(tokens, i)
  assert tokens[i] == ")", (i, tokens[i])
  return op, children + [child], i + 1


def parse(source):
  tokens = source.split()
  tree, end = _parse_tree(tokens, 0)
  assert end == len(tokens), "tokens after the expression"
  return tree


def depth(tree):
  return 1 if isinstance(tree, int) else 1 + max(depth(c) for c in tree[1])


def length(tree):
  return 1 if isinstance(tree, int) else 2 + sum(length(c) for c in tree[1])


def arities(tree):
  return [] if isinstance(tree, int) else [len(tree[1])] + [a for c in tree[1] for a in arities(c)]


def operators(tree):
  return [] if isinstance(tree, int) else [tree[0]] + [o for c in tree[1] for o in operators(c)]


@pytest.fixture(scope="module")
def small_splits():
  return listops.generate(300, 50, 50, seed=1, progress=False, **SMALL)


# ---------------------------------------------------------------------------------------------
# Generator.
# ---------------------------------------------------------------------------------------------
def test_vocabulary():
  assert listops.VOCAB_SIZE == len(listops.VOCAB) == 17
  assert listops.NUM_CLASSES == 10
  assert listops.VOCAB[0] == "<pad>" and listops.VOCAB[16] == listops.OOV_TOKEN
  assert listops.VOCAB[1:16] == ("[MIN", "[MAX", "[MED", "[SM", "X", *map(str, range(10)))


def test_serialisation_of_the_lra_example():
  assert listops.evaluate("( ( ( [MAX 2 ) 9 ) ] )") == 9
  assert parse("( ( ( [MAX 2 ) 9 ) ] )") == ("[MAX", [2, 9])


def test_generated_sources_follow_the_grammar(small_splits):
  allowed = set(listops.OPERATORS) | set(listops.DIGITS) | {"(", ")", "]"}
  for split in listops.SPLITS:
    for source, label in small_splits[split]:
      assert set(source.split()) <= allowed
      tree = parse(source)
      n = length(tree)
      assert SMALL["min_length"] < n < SMALL["max_length"]
      assert n == len(listops.tokenize(source)) == sum(t not in "()" for t in source.split())
      assert depth(tree) <= SMALL["max_depth"]
      assert all(2 <= a <= SMALL["max_args"] for a in arities(tree))
      assert label == listops.evaluate(source)
      assert isinstance(label, int) and 0 <= label <= 9


def test_split_sizes_and_no_duplicates(small_splits):
  assert {k: len(v) for k, v in small_splits.items()} == {"train": 300, "val": 50, "test": 50}
  sources = [s for split in small_splits.values() for s, _ in split]
  assert len(set(sources)) == len(sources)


def test_determinism_and_seed_dependence(small_splits):
  assert listops.generate(300, 50, 50, seed=1, progress=False, **SMALL) == small_splits
  other = listops.generate(300, 50, 50, seed=2, progress=False, **SMALL)
  assert other["train"] != small_splits["train"]
  # The splits are consecutive parts of one seeded stream.
  train_only = listops.generate(400, 0, 0, seed=1, progress=False, **SMALL)["train"]
  assert train_only == small_splits["train"] + small_splits["val"] + small_splits["test"]


def test_depth_limit_and_lra_length_window():
  splits = listops.generate(40, 0, 0, seed=0, progress=False)  # LRA: 500 < length < 2000.
  for source, label in splits["train"]:
    tree = parse(source)
    assert 500 < length(tree) < 2000 and depth(tree) <= 10
    assert label == listops.evaluate(source)


def _lra_reference_tree(rng, depth_, max_depth, max_args, value_p):
  """LRA's recursive sampler, transcribed from docs/lra.md (random module, nested tuples)."""
  u = rng.random() if depth_ < max_depth else 1
  if u > value_p:
    return rng.choice(listops.DIGITS), 1
  values, n = [], 2
  for _ in range(rng.randint(2, max_args)):
    child, child_length = _lra_reference_tree(rng, depth_ + 1, max_depth, max_args, value_p)
    values.append(child)
    n += child_length
  tree = (rng.choice(listops.OPERATORS), values[0])
  for value in values[1:]:
    tree = (tree, value)
  return (tree, "]"), n


def _to_string(tree):
  return f"( {_to_string(tree[0])} {_to_string(tree[1])} )" if isinstance(tree, tuple) else tree


def test_distribution_matches_lra_recursive_sampler():
  params = dict(min_length=5, max_length=60, max_depth=6, max_args=10, value_p=0.25)
  num = 3000
  ours = [s for s, _ in listops.generate(num, 0, 0, seed=3, progress=False, **params)["train"]]
  rng, reference = random.Random(3), {}
  while len(reference) < num:
    tree, n = _lra_reference_tree(rng, 1, params["max_depth"], params["max_args"],
                                  params["value_p"])
    if params["min_length"] < n < params["max_length"]:
      reference.setdefault(_to_string(tree), None)
  assert all(listops.evaluate(s) in range(10) for s in reference)

  def stats(sources):
    trees = [parse(s) for s in sources]
    root_arity = np.bincount([len(t[1]) for t in trees], minlength=11)[2:] / len(trees)
    ops = [o for t in trees for o in operators(t)]
    op_share = np.array([ops.count(o) for o in listops.OPERATORS]) / len(ops)
    return (np.mean([length(t) for t in trees]), np.mean([depth(t) for t in trees]),
            root_arity, op_share)

  (len_a, depth_a, arity_a, ops_a), (len_b, depth_b, arity_b, ops_b) = stats(ours), stats(reference)
  # Tolerances are ~4 standard errors of the difference of two samples of 3,000.
  assert abs(len_a - len_b) < 2.0, (len_a, len_b)
  assert abs(depth_a - depth_b) < 0.16, (depth_a, depth_b)
  assert np.abs(arity_a - arity_b).max() < 0.035, (arity_a, arity_b)
  assert np.abs(ops_a - 0.25).max() < 0.015 and np.abs(ops_b - 0.25).max() < 0.015


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_args=1), "max_args"),
    (dict(max_depth=0), "max_depth"),
    (dict(value_p=1.0), "value_p"),
    (dict(min_length=10, max_length=11), "min_length"),
    (dict(min_length=200, max_length=500, max_depth=2, max_args=10), "unreachable"),
    (dict(num_train=-1), "num_train"),
])
def test_generate_rejects_bad_parameters(kwargs, message):
  with pytest.raises(ValueError, match=message):
    listops.generate(**{"num_train": 5, "num_val": 0, "num_test": 0, "progress": False, **kwargs})


def test_generate_stops_when_no_new_trees_appear(monkeypatch):
  monkeypatch.setattr(listops.generator, "MAX_TRIALS_WITHOUT_NEW", 3 * listops.TREES_PER_DRAW)
  with pytest.raises(ValueError, match="no new tree"):  # Only 10 trees have length 1.
    listops.generate(11, 0, 0, min_length=0, max_length=2, progress=False)


# ---------------------------------------------------------------------------------------------
# Evaluator and tokenizer.
# ---------------------------------------------------------------------------------------------
def _read_nangia_bowman(path):
  lines = path.read_text().splitlines()
  assert lines[0] == "Target\tSource"
  return [(source, int(target)) for target, source in (line.split("\t") for line in lines[1:])]


def test_evaluate_semantics():
  assert listops.evaluate("( ( ( ( ( [MED 1 ) 2 ) 3 ) 4 ) ] )") == 2  # median 2.5 -> 2
  assert listops.evaluate("( ( ( ( [MED 7 ) 1 ) 3 ) ] )") == 3
  assert listops.evaluate("( ( ( ( [SM 7 ) 8 ) 9 ) ] )") == 4
  assert listops.evaluate("( ( ( ( [MIN 7 ) 8 ) ( ( ( [MAX 2 ) 0 ) ] ) ) ] )") == 2
  assert listops.evaluate("7") == 7


@pytest.mark.parametrize("source", ["", "] 2", "( ( [MAX 2 ) ] ) )", "( ( [MAX ) ] )",
                                    "2 3", "( ( [FIRST 2 ) ] )", "( ( [MAX 2 )", "12"])
def test_evaluate_rejects_malformed_expressions(source):
  with pytest.raises(ValueError):
    listops.evaluate(source)


def test_evaluator_reproduces_the_real_sample():
  rows = _read_nangia_bowman(SAMPLE)
  assert len(rows) == 300
  assert [listops.evaluate(source) for source, _ in rows] == [label for _, label in rows]


@pytest.mark.skipif(not SHARED_FILE.is_file(), reason=f"{SHARED_FILE} not present")
def test_evaluator_reproduces_the_full_nangia_bowman_test_file():
  rows = _read_nangia_bowman(SHARED_FILE)
  assert len(rows) == 10_000
  assert [listops.evaluate(source) for source, _ in rows] == [label for _, label in rows]


def test_tokenize():
  ids = {token: i for i, token in enumerate(listops.VOCAB)}
  assert ids["<pad>"] == listops.PAD_ID == 0
  assert listops.tokenize("( ( ( [MAX 2 ) 9 ) ] )") == [ids["[MAX"], ids["2"], ids["9"], ids["X"]]
  assert listops.tokenize("( ( [FIRST 3 ) ] )") == [listops.OOV_ID, ids["3"], ids["X"]]
  assert listops.tokenize("( )") == []


def test_tokenize_matches_a_plain_split_and_lookup_on_odd_text():
  ids = {token: i for i, token in enumerate(listops.VOCAB) if 0 < i < listops.OOV_ID}

  def reference(source):  # LRA's cleaning, str.split, dictionary lookup.
    cleaned = source.replace("]", "X").replace("(", "").replace(")", "")
    return [ids.get(token, listops.OOV_ID) for token in cleaned.split()]

  pieces = ["[MIN", "[MAX", "[MED", "[SM", "]", "(", ")", "X", "x", "a", "[MINX", "[SM[SM", "[M",
            "MIN", "5", "55", " ", "   ", "\t", "\x0b", "\x1c", "\x01", "\u2003", "é", "[FIRST",
            "]]", "[", "[MI(N", "[S)M"]
  rng = random.Random(0)
  for _ in range(3000):
    source = "".join(rng.choice(pieces) + rng.choice(["", " "]) for _ in range(rng.randint(0, 9)))
    assert listops.tokenize(source) == reference(source), repr(source)


# ---------------------------------------------------------------------------------------------
# Reader and files.
# ---------------------------------------------------------------------------------------------
def test_read_tsv_on_the_real_sample():
  rows = _read_nangia_bowman(SAMPLE)
  data = listops.read_tsv(SAMPLE, 2000)
  assert data["inputs"].shape == (300, 2000) and data["inputs"].dtype == np.int32
  assert data["targets"].shape == (300,) and data["targets"].dtype == np.int32
  np.testing.assert_array_equal(data["targets"], [label for _, label in rows])
  for row, (source, _) in zip(data["inputs"], rows):
    ids = listops.tokenize(source)
    np.testing.assert_array_equal(row[:len(ids)], ids)
    assert not row[len(ids):].any()


def test_read_tsv_truncates_and_pads(tmp_path):
  path = tmp_path / "t.tsv"
  path.write_text("Source\tTarget\n( ( ( [MAX 2 ) 9 ) ] )\t9\n( ( [MIN 3 ) ] )\t3\n")
  data = listops.read_tsv(path, 3)
  np.testing.assert_array_equal(data["inputs"], [[2, 8, 15], [1, 9, 5]])
  np.testing.assert_array_equal(listops.read_tsv(path, 6)["inputs"][1], [1, 9, 5, 0, 0, 0])
  np.testing.assert_array_equal(data["targets"], [9, 3])


def test_read_tsv_maps_unknown_tokens_to_oov(tmp_path):
  path = tmp_path / "oov.tsv"
  path.write_text("Target\tSource\n4\t( ( [FIRST 4 ) ] )\n")
  np.testing.assert_array_equal(listops.read_tsv(path, 4)["inputs"][0],
                                [listops.OOV_ID, 10, 5, 0])


def test_write_tsv_and_read_back(tmp_path, small_splits):
  paths = listops.write_tsv(small_splits, tmp_path, task="t")
  assert {k: p.name for k, p in paths.items()} == {
      "train": "t_train.tsv", "val": "t_val.tsv", "test": "t_test.tsv"}
  assert paths["val"].read_text().splitlines()[0] == "Source\tTarget"
  assert not list(tmp_path.glob(".*"))  # No temporary files left.
  splits = listops.load_splits(tmp_path, 128, task="t")
  for split, rows in small_splits.items():
    np.testing.assert_array_equal(splits[split]["targets"], [label for _, label in rows])
    for row, (source, _) in zip(splits[split]["inputs"], rows):
      ids = listops.tokenize(source)
      np.testing.assert_array_equal(row, ids + [0] * (128 - len(ids)))


@pytest.mark.parametrize("row, message", [(("( ( [SM 1\t2 ) ] )", 3), "tab"),
                                          (("( ( [SM 1 ) ] )", 10), "label 10")])
def test_write_tsv_rejects_rows_it_cannot_write(tmp_path, row, message):
  good = [("( ( [SM 1 ) ] )", 1)]
  with pytest.raises(ValueError, match=message):
    listops.write_tsv({"train": good, "val": good, "test": [row]}, tmp_path)
  assert not list(tmp_path.iterdir())  # Checked before anything is written.


def test_read_tsv_grows_past_its_initial_capacity(tmp_path):
  path = tmp_path / "big.tsv"
  path.write_text("Source\tTarget\n" + "".join(f"( ( [SM {i % 10} ) ] )\t{i % 10}\n"
                                                for i in range(2500)))
  data = listops.read_tsv(path, 4)
  assert data["inputs"].shape == (2500, 4)
  np.testing.assert_array_equal(data["targets"], np.arange(2500) % 10)
  np.testing.assert_array_equal(data["inputs"][:, 1], np.arange(2500) % 10 + 6)


def test_read_tsv_reports_the_line_of_an_empty_source_in_a_later_chunk(tmp_path, monkeypatch):
  monkeypatch.setattr(listops.release, "_READ_CHUNK_ROWS", 2)
  path = tmp_path / "chunks.tsv"
  path.write_text("Source\tTarget\n" + "( ( [SM 3 ) ] )\t3\n" * 4 + " ( ) \t3\n")
  with pytest.raises(ValueError, match=re.escape(f"{path}:6: empty source")):
    listops.read_tsv(path, 8)


@pytest.mark.parametrize("content, line, message", [
    ("", 1, "empty file"),
    ("Input\tLabel\n( 3 )\t3\n", 1, "bad header"),
    ("Source\tTarget\n", 2, "no data rows"),
    ("Source\tTarget\n( ( [SM 3 ) ] )\t3\n( ( [SM 3 ) ] )\n", 3, "2 tab-separated columns"),
    ("Source\tTarget\n( ( [SM 3 ) ] )\t3\t1\n", 2, "2 tab-separated columns"),
    ("Source\tTarget\n( ( [SM 3 ) ] )\tthree\n", 2, "not an integer"),
    ("Target\tSource\n3.5\t( ( [SM 3 ) ] )\n", 2, "not an integer"),
    ("Source\tTarget\n( ( [SM 3 ) ] )\t3\n\n", 3, "2 tab-separated columns"),
    ("Target\tSource\n10\t( ( [SM 3 ) ] )\n", 2, "outside 0..9"),
    ("Source\tTarget\n( ( [SM 3 ) ] )\t3\n( )\t3\n", 3, "empty source"),
])
def test_read_tsv_rejects_malformed_files(tmp_path, content, line, message):
  path = tmp_path / "bad.tsv"
  path.write_text(content)
  with pytest.raises(ValueError, match=re.escape(f"{path}:{line}:") + ".*" + message):
    listops.read_tsv(path, 16)


def test_load_splits_names_missing_files(tmp_path):
  (tmp_path / "basic_train.tsv").write_text("Source\tTarget\n3\t3\n")
  with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "basic_val.tsv"))):
    listops.load_splits(tmp_path, 8)


def test_ensure_generated_is_idempotent_and_checks_parameters(tmp_path):
  kwargs = dict(num_train=30, num_val=5, num_test=5, seed=0, progress=False, **SMALL)
  paths = listops.ensure_generated(tmp_path, **kwargs)
  params = json.loads((tmp_path / "basic_params.json").read_text())
  assert params["num_train"] == 30 and params["task"] == "basic" and "progress" not in params
  contents = {k: p.read_text() for k, p in paths.items()}
  assert len(contents["train"].splitlines()) == 31
  inodes = {k: p.stat().st_ino for k, p in paths.items()}  # A rewrite renames a new file in.

  assert listops.ensure_generated(tmp_path, **{**kwargs, "progress": True}) == paths
  assert {k: p.stat().st_ino for k, p in paths.items()} == inodes
  with pytest.raises(ValueError, match="seed: stored 0 vs requested 1"):
    listops.ensure_generated(tmp_path, **{**kwargs, "seed": 1})
  with pytest.raises(ValueError, match="num_test"):
    listops.ensure_generated(tmp_path, **{k: v for k, v in kwargs.items() if k != "num_test"})

  # A missing split (e.g. an interrupted run) makes it generate again, here with new parameters.
  paths["test"].unlink()
  listops.ensure_generated(tmp_path, **{**kwargs, "seed": 1})
  assert json.loads((tmp_path / "basic_params.json").read_text())["seed"] == 1
  assert paths["train"].read_text() != contents["train"]
  assert not list(tmp_path.glob(".*"))


def test_ensure_generated_uses_files_without_parameters_as_they_are(tmp_path):
  for split in listops.SPLITS:
    (tmp_path / f"basic_{split}.tsv").write_text("Source\tTarget\n( ( [SM 3 ) ] )\t3\n")
  paths = listops.ensure_generated(tmp_path, num_train=5, progress=False)
  assert paths == listops.split_paths(tmp_path)
  assert paths["train"].read_text() == "Source\tTarget\n( ( [SM 3 ) ] )\t3\n"


# ---------------------------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------------------------
def _cli(*args):
  return subprocess.run([sys.executable, "-m", "clustr_jax.data.listops", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=120, check=True)


def test_cli_help():
  out = _cli("--help").stdout
  for flag in ("--task", "--num_train_samples", "--num_valid_samples", "--num_test_samples",
               "--max_depth", "--max_args", "--min_length", "--max_length", "--output_dir",
               "--seed", "--value_p", "--no_progress"):
    assert flag in out


def test_cli_generates_the_three_files(tmp_path):
  _cli("--task=tiny", "--num_train_samples=20", "--num_valid_samples=4", "--num_test_samples=3",
       "--min_length=5", "--max_length=40", "--max_depth=6", "--seed=7", "--no_progress",
       f"--output_dir={tmp_path}")
  splits = listops.load_splits(tmp_path, 40, task="tiny")
  assert {k: len(v["targets"]) for k, v in splits.items()} == {"train": 20, "val": 4, "test": 3}
  expected = listops.generate(20, 4, 3, min_length=5, max_length=40, max_depth=6, seed=7,
                              progress=False)
  np.testing.assert_array_equal(splits["val"]["targets"], [label for _, label in expected["val"]])
