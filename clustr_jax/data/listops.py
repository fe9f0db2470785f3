r"""ListOps (Nangia & Bowman 2018) as used by the Long Range Arena: generator, evaluator, reader.

Sources (see ../shared/reference/lra.md §5.1, §6 and data_formats.md §1):
  * LRA ``lra_benchmarks/data/listops.py``: the generator reproduced here (operators ``[MIN``,
    ``[MAX``, ``[MED``, ``[SM`` over the digits 0-9, closing ``]``; trees of depth <= 10 with 2-10
    arguments per operator, leaf probability 0.75 below the depth limit; 500 < length < 2,000).
  * LRA ``lra_benchmarks/listops/input_pipeline.py``: the reader and tokenizer (``]`` -> ``X``,
    ``(`` and ``)`` dropped, whitespace split, ids zero-padded / truncated to ``max_length``).
  * N. Nangia and S. R. Bowman, "ListOps: A Diagnostic Dataset for Latent Tree Learning",
    NAACL SRW 2018: the task and the original ``Target<TAB>Source`` files, also read here.

Deliberate differences from LRA:
  * LRA collects the trees in a Python ``set`` and splits them in its (hash-dependent) iteration
    order, unseeded, so its split cannot be regenerated. Here sampling is seeded
    (``numpy.random.default_rng(seed)``) and trees are kept in draw order: the first
    ``num_train`` distinct accepted trees are train, the next ``num_val`` val, the last
    ``num_test`` test.
  * LRA builds its vocabulary from a Python ``set`` too (ids depend on the process). Here the
    vocabulary is fixed: ``VOCAB`` (pad 0, the 15 tokens 1..15, out-of-vocabulary 16).

The accepted trees have exactly the distribution of LRA's recursive sampler; only the order of
the draws differs, for speed. Trees are drawn ``TREES_PER_DRAW`` at a time with numpy, one depth
level at a time: first the shape (each node's ``u`` and argument count), then, for the accepted
trees only, the digits and operators, which do not affect the length. A tree stops growing once
its running length reaches ``max_length``: it would be rejected anyway, and since that decision
only depends on draws already made, every other node still gets fresh independent draws.

Files: ``{task}_{train,val,test}.tsv`` with header ``Source<TAB>Target`` (LRA release); the reader
also accepts ``Target<TAB>Source`` (Nangia & Bowman). Command line::

  python -m clustr_jax.data.listops --output_dir=/tmp/listops            # LRA's 96k/2k/2k
  python -m clustr_jax.data.listops --output_dir=/tmp/listops_small --num_train_samples=20000 \
      --num_valid_samples=1000 --num_test_samples=1000 --min_length=10 --max_length=200
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import json
import operator
import os
import pathlib
import uuid
from collections.abc import Iterable, Sequence

import numpy as np
from absl import logging
from tqdm import tqdm

from clustr_jax import data as data_lib

OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")
DIGITS = tuple(str(d) for d in range(10))
END = "]"
PAD_TOKEN = "<pad>"
OOV_TOKEN = "<oov>"
# Fixed vocabulary: pad 0, the 15 tokens after LRA's cleaning (``]`` becomes ``X``) 1..15, OOV 16.
VOCAB: tuple[str, ...] = (PAD_TOKEN, *OPERATORS, "X", *DIGITS, OOV_TOKEN)
VOCAB_SIZE = len(VOCAB)
PAD_ID = 0
OOV_ID = VOCAB_SIZE - 1
NUM_CLASSES = 10
SPLITS = ("train", "val", "test")
GENERATOR_VERSION = 1  # Stored with generated files; bump when the same seed gives other data.

# Trees are drawn this many at a time (vectorised); part of what a seed determines.
TREES_PER_DRAW = 4096
# Generation stops with an error after this many trials in a row without a new accepted tree
# (a length window the grammar cannot fill, or fewer distinct trees than requested).
MAX_TRIALS_WITHOUT_NEW = 1_000_000


class _TokenIds(dict):
  """Token -> id; unknown tokens map to ``OOV_ID`` (``__missing__`` keeps lookups in C)."""

  def __missing__(self, token: str) -> int:
    del token
    return OOV_ID


_TOKEN_IDS = _TokenIds({token: i for i, token in enumerate(VOCAB[1:-1], start=1)})
# Vectorised tokenization of ASCII text. LRA's cleaning as one byte translation (``]`` -> ``X``,
# ``(`` and ``)`` deleted) that also turns every byte ``str.split`` treats as whitespace, except
# the newline that separates sources, into a space; then the ids of one-character tokens by byte,
# and the longer tokens (operators, at most 4 characters) as big-endian byte codes.
_SPACES = bytes(i for i in range(128) if chr(i).isspace() and chr(i) != "\n")
_CLEAN_TABLE = bytes.maketrans(b"]" + _SPACES, b"X" + b" " * len(_SPACES))
_CLEAN_DELETE = b"()"
_CLEAN_STR = str.maketrans({"]": "X", "(": None, ")": None})
_CHAR_IDS = np.full(256, OOV_ID, np.int32)
_CHAR_IDS[[ord(t) for t in VOCAB[1:-1] if len(t) == 1]] = [
    _TOKEN_IDS[t] for t in VOCAB[1:-1] if len(t) == 1]
_WORD_CODES = [(len(t), int.from_bytes(t.encode("ascii"), "big"), _TOKEN_IDS[t])
               for t in VOCAB[1:-1] if len(t) > 1]
# Rows tokenized together by ``read_tsv``.
_READ_CHUNK_ROWS = 1024


# ---------------------------------------------------------------------------------------------
# Generator.
# ---------------------------------------------------------------------------------------------
def _combine(ops: np.ndarray, values: np.ndarray, starts: np.ndarray,
             counts: np.ndarray) -> np.ndarray:
  """Operator values: ``OPERATORS[ops[i]]`` of ``values[starts[i]:starts[i] + counts[i]]``.

  The segments are consecutive and cover ``values``; each holds at least two digits. MED is
  ``int(numpy.median)``: the middle value, or the mean of the two middle values truncated.
  """
  segment = np.repeat(np.arange(counts.size), counts)
  ordered = values[np.lexsort((values, segment))]
  medians = (ordered[starts + (counts - 1) // 2] + ordered[starts + counts // 2]) // 2
  return np.choose(ops, [np.minimum.reduceat(values, starts), np.maximum.reduceat(values, starts),
                         medians, np.add.reduceat(values, starts) % 10])


def _serialize(levels: list[tuple[np.ndarray, np.ndarray]]) -> list[tuple[str, int]]:
  """Sources and labels of trees stored level by level (see ``_sample_trees``), bottom up.

  ``levels[d]`` holds (arity, symbol) of every node at depth ``d + 1``, grouped by tree and, within
  a tree, in order of their parents; the children of the level's operator nodes, in order, make up
  the level below. ``symbol`` is the digit of a leaf or the operator index.
  """
  below_sources: list[str] = []
  below_values = np.zeros(0, np.int64)
  for arities, symbols in reversed(levels):
    sources = list(map(DIGITS.__getitem__, symbols.tolist()))  # Operators are replaced below.
    values = symbols
    op_index = np.flatnonzero(arities)
    if op_index.size:
      counts = arities[op_index]
      starts = np.cumsum(counts) - counts
      ops = symbols[op_index]
      values = symbols.copy()
      values[op_index] = _combine(ops, below_values, starts, counts)
      for i, op, start, count in zip(op_index.tolist(), ops.tolist(), starts.tolist(),
                                     counts.tolist()):
        # Nested pairs: ( ( ( [OP a ) b ) ] ) for OP(a, b).
        sources[i] = ("( " * (count + 1) + OPERATORS[op] + " "
                      + " ) ".join(below_sources[start:start + count]) + " ) ] )")
    below_sources, below_values = sources, values
  return list(zip(below_sources, below_values.tolist()))


def _sample_trees(rng: np.random.Generator, num_trees: int, *, min_length: int, max_length: int,
                  max_depth: int, max_args: int, value_p: float) -> list[tuple[str, int]]:
  """Draws ``num_trees`` independent trees; returns the accepted ones, in draw order.

  The trees grow together one depth level at a time. At each level every node draws
  ``u ~ U[0, 1)`` (a digit is forced at ``max_depth``) and, if ``u <= value_p``, an argument count
  in ``2..max_args``. A tree whose running length has reached ``max_length`` stops growing (it
  will be rejected). Digits and operators do not affect the length, so they are drawn last, for
  the accepted trees only. Every node still gets fresh independent draws, so accepted trees have
  the distribution of LRA's recursive sampler.

  Returns:
    ``[(source, label), ...]`` of the trees with ``min_length < length < max_length``.
  """
  lengths = np.zeros(num_trees, np.int64)
  tree = np.arange(num_trees)  # The tree of each node of the current level.
  levels = []  # (tree, arity) per level.
  for depth in range(1, max_depth + 1):
    arity = np.zeros(tree.size, np.int64)
    if depth < max_depth:
      is_op = rng.random(tree.size) <= value_p
      arity[is_op] = rng.integers(2, max_args + 1, int(is_op.sum()))
    levels.append((tree, arity))
    # A leaf adds 1 to its tree's length, an operator 2 (itself and its closing bracket).
    lengths += np.bincount(tree, minlength=num_trees)
    lengths += np.bincount(tree[arity > 0], minlength=num_trees)
    growing = (arity > 0) & (lengths[tree] < max_length)
    tree = np.repeat(tree[growing], arity[growing])
    if tree.size == 0:
      break
  accepted = (lengths > min_length) & (lengths < max_length)
  kept = []
  for tree, arity in levels:
    arity = arity[accepted[tree]]
    symbol = rng.integers(0, np.where(arity > 0, len(OPERATORS), len(DIGITS)))
    kept.append((arity, symbol))
  return _serialize(kept)


def _max_tree_length(max_depth: int, max_args: int) -> int:
  """The largest length the grammar allows (every node an operator with max_args children)."""
  length = 1
  for _ in range(max_depth - 1):
    length = 2 + max_args * length
  return length


def _check_generate_args(counts: dict[str, int], *, min_length: int, max_length: int,
                         max_depth: int, max_args: int, value_p: float) -> None:
  for name, count in counts.items():
    if count < 0:
      raise ValueError(f"{name} must be >= 0; got {count}")
  if max_depth < 1:
    raise ValueError(f"max_depth must be >= 1; got {max_depth}")
  if max_args < 2:
    raise ValueError(f"max_args must be >= 2; got {max_args}")
  if not 0.0 <= value_p < 1.0:
    raise ValueError(f"value_p must be in [0, 1); got {value_p}")
  if min_length < 0 or max_length - min_length < 2:
    raise ValueError(f"need 0 <= min_length and min_length + 1 < max_length (lengths are strictly "
                     f"between them); got min_length={min_length}, max_length={max_length}")
  longest = 1 if value_p == 0.0 else _max_tree_length(max_depth, max_args)
  if longest <= min_length:
    raise ValueError(f"min_length={min_length} is unreachable: with max_depth={max_depth}, "
                     f"max_args={max_args}, value_p={value_p} no tree is longer than {longest}")


def generate(num_train: int = 96_000, num_val: int = 2_000, num_test: int = 2_000, *,
             min_length: int = 500, max_length: int = 2000, max_depth: int = 10,
             max_args: int = 10, value_p: float = 0.25, seed: int = 0,
             progress: bool = True) -> dict[str, list[tuple[str, int]]]:
  """Samples distinct ListOps trees with LRA's generator (``lra_benchmarks/data/listops.py``).

  Trees are drawn until ``num_train + num_val + num_test`` distinct ones with
  ``min_length < length < max_length`` are collected, where the length counts every token except
  parentheses (operators, digits and ``]``), i.e. the token count after ``tokenize``.

  Args:
    num_train, num_val, num_test: examples per split (LRA: 96,000 / 2,000 / 2,000).
    min_length, max_length: strict length bounds (LRA: 500, 2,000).
    max_depth: depth limit; the root is at depth 1 and nodes at ``max_depth`` are digits.
    max_args: operators take a uniform number of arguments in ``2..max_args``.
    value_p: below ``max_depth`` a node is an operator with probability ``value_p`` (LRA's
      ``VALUE_P``, 0.25), otherwise a uniform digit.
    seed: seed of the ``numpy.random.Generator`` that draws everything; equal seeds (and equal
      other arguments) give equal splits.
    progress: show a tqdm progress bar.

  Returns:
    ``{'train'|'val'|'test': [(source, label), ...]}`` in generation order; ``source`` is the
    bracketed expression, e.g. ``( ( ( [MAX 2 ) 9 ) ] )``, and ``label`` its value, 0..9.

  Raises:
    ValueError: invalid parameters (negative counts, ``max_args < 2``, ``value_p`` outside
      [0, 1), no integer strictly between the length bounds, or a ``min_length`` longer than any
      tree), or ``MAX_TRIALS_WITHOUT_NEW`` trials in a row without a new accepted tree.
  """
  counts = {"num_train": num_train, "num_val": num_val, "num_test": num_test}
  _check_generate_args(counts, min_length=min_length, max_length=max_length,
                       max_depth=max_depth, max_args=max_args, value_p=value_p)
  total = num_train + num_val + num_test
  rng = np.random.default_rng(seed)
  examples: dict[str, int] = {}  # source -> label, in insertion (draw) order
  trials = trials_without_new = 0
  with tqdm(total=total, desc="ListOps", unit="tree", disable=not progress) as bar:
    while len(examples) < total:
      before = len(examples)
      for source, label in _sample_trees(
          rng, TREES_PER_DRAW, min_length=min_length, max_length=max_length,
          max_depth=max_depth, max_args=max_args, value_p=value_p):
        if len(examples) == total:
          break
        examples.setdefault(source, label)
      trials += TREES_PER_DRAW
      bar.update(len(examples) - before)
      trials_without_new = 0 if len(examples) > before else trials_without_new + TREES_PER_DRAW
      if trials_without_new >= MAX_TRIALS_WITHOUT_NEW:
        raise ValueError(
            f"no new tree with {min_length} < length < {max_length} in {trials_without_new} "
            f"trials (max_depth={max_depth}, max_args={max_args}, value_p={value_p}) after "
            f"{len(examples)} of {total}: widen the length window or ask for fewer examples")
  logging.info("ListOps: kept %d distinct trees of %d drawn", total, trials)
  items = list(examples.items())
  return {"train": items[:num_train], "val": items[num_train:num_train + num_val],
          "test": items[num_train + num_val:]}


# ---------------------------------------------------------------------------------------------
# Files.
# ---------------------------------------------------------------------------------------------
def split_paths(data_dir: str | os.PathLike, task: str = "basic") -> dict[str, pathlib.Path]:
  """``{split: data_dir/{task}_{split}.tsv}`` for train, val and test."""
  return {split: pathlib.Path(data_dir) / f"{task}_{split}.tsv" for split in SPLITS}


def _write_atomically(path: pathlib.Path, chunks: Iterable[str]) -> None:
  """Writes ``chunks`` to a temporary file next to ``path``, then renames it onto ``path``."""
  tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
  try:
    with tmp.open("x", encoding="utf-8", newline="\n") as f:
      f.writelines(chunks)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)


def write_tsv(splits: dict[str, Sequence[tuple[str, int]]], out_dir: str | os.PathLike,
              task: str = "basic") -> dict[str, pathlib.Path]:
  """Writes ``{task}_{train,val,test}.tsv`` (header ``Source<TAB>Target``) into ``out_dir``.

  Each file is written to a temporary name and renamed, so it is either complete or absent.

  Args:
    splits: ``{'train'|'val'|'test': [(source, label), ...]}`` as returned by ``generate``.
    out_dir: output directory (created if missing).
    task: file name prefix (LRA: ``basic``).

  Returns:
    ``{split: path}``.

  Raises:
    KeyError: a split is missing. ValueError: a source contains a tab or newline, or a label is
    not an int in 0..9.
  """
  for split in SPLITS:
    for source, label in splits[split]:
      if "\t" in source or "\n" in source:
        raise ValueError(f"{split} source contains a tab or newline: {source[:80]!r}")
      if not isinstance(label, (int, np.integer)) or not 0 <= label < NUM_CLASSES:
        raise ValueError(f"{split} label {label!r} is not an int in 0..{NUM_CLASSES - 1}")
  paths = split_paths(out_dir, task)
  pathlib.Path(out_dir).mkdir(parents=True, exist_ok=True)
  for split, path in paths.items():
    _write_atomically(path, itertools.chain(
        ["Source\tTarget\n"], (f"{source}\t{label}\n" for source, label in splits[split])))
  return paths


def _generation_params(task: str, generate_kwargs: dict) -> dict:
  """All of ``generate``'s parameters (defaults filled in, ``progress`` dropped) plus the task."""
  bound = inspect.signature(generate).bind(**generate_kwargs)  # TypeError on unknown names.
  bound.apply_defaults()
  params = dict(bound.arguments)
  del params["progress"]
  params = {k: float(v) if k == "value_p" else operator.index(v) for k, v in params.items()}
  return {"task": task, "generator_version": GENERATOR_VERSION, **params}


def ensure_generated(out_dir: str | os.PathLike, task: str = "basic",
                     **generate_kwargs) -> dict[str, pathlib.Path]:
  """Generates and writes the three splits unless ``out_dir`` already holds them.

  The parameters are stored in ``{task}_params.json`` beside the files. The order of writes
  (old split files removed, parameters written, then the splits one by one, each atomically) means
  that an interrupted run leaves at least one split missing, so the next call regenerates.
  Files present without a parameters file (e.g. the LRA release) are used as they are.

  Args:
    out_dir: data directory (created if missing).
    task: file name prefix (LRA: ``basic``).
    **generate_kwargs: arguments of ``generate`` (``num_train``, ..., ``seed``, ``progress``).

  Returns:
    ``{'train'|'val'|'test': path}``.

  Raises:
    ValueError: the existing files were generated with other parameters (the message lists them),
      or ``generate`` rejects the parameters. TypeError: an unknown keyword.
  """
  out_dir = pathlib.Path(out_dir)
  params = _generation_params(task, generate_kwargs)
  paths = split_paths(out_dir, task)
  params_path = out_dir / f"{task}_params.json"
  if all(path.is_file() for path in paths.values()):
    if not params_path.is_file():
      logging.warning("Using the ListOps files in %s as they are: no %s records how they were "
                      "made", out_dir, params_path.name)
      return paths
    stored = json.loads(params_path.read_text(encoding="utf-8"))
    if stored != params:
      diff = data_lib.describe_differences(stored, params)
      raise ValueError(f"{out_dir} holds ListOps '{task}' files generated with other parameters "
                       f"({diff}); delete them or use another directory")
    return paths
  splits = generate(**generate_kwargs)
  out_dir.mkdir(parents=True, exist_ok=True)
  for path in paths.values():
    path.unlink(missing_ok=True)
  _write_atomically(params_path, [json.dumps(params, indent=2, sort_keys=True), "\n"])
  return write_tsv(splits, out_dir, task)


# ---------------------------------------------------------------------------------------------
# Evaluator, tokenizer, reader.
# ---------------------------------------------------------------------------------------------
_EVAL_OPERATORS = {
    "[MIN": min,
    "[MAX": max,
    "[MED": lambda args: int(np.median(args)),
    "[SM": lambda args: sum(args) % 10,
}


def evaluate(source: str) -> int:
  """The value of a ListOps expression, computed with a stack over its tokens.

  Written independently of the generator (it never sees a tree object) so that tests can use it
  as an oracle. Semantics: MIN, MAX; MED = ``int(numpy.median)``; SM = sum mod 10.

  Args:
    source: whitespace-separated tokens, e.g. ``( ( ( [MAX 2 ) 9 ) ] )``.

  Returns:
    The value, 0..9.

  Raises:
    ValueError: unknown token, unbalanced parentheses or brackets, an operator without
      arguments, or more than one top-level expression.
  """
  open_ops: list[tuple[str, list[int]]] = []
  parens = 0
  result = None
  for token in source.split():
    if token == "(":
      parens += 1
      continue
    if token == ")":
      parens -= 1
      if parens < 0:
        raise ValueError(f"unbalanced ')' in {source[:80]!r}")
      continue
    if result is not None:
      raise ValueError(f"token {token!r} after the end of the expression in {source[:80]!r}")
    if token in _EVAL_OPERATORS:
      open_ops.append((token, []))
      continue
    if token == END:
      if not open_ops:
        raise ValueError(f"']' without an operator in {source[:80]!r}")
      op, args = open_ops.pop()
      if not args:
        raise ValueError(f"{op} without arguments in {source[:80]!r}")
      value = _EVAL_OPERATORS[op](args)
    elif len(token) == 1 and token.isdigit():
      value = int(token)
    else:
      raise ValueError(f"unknown token {token!r} in {source[:80]!r}")
    if open_ops:
      open_ops[-1][1].append(value)
    else:
      result = value
  if result is None or open_ops or parens:
    raise ValueError(f"incomplete expression {source[:80]!r}")
  return result


def _encode(sources: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
  """LRA's tokens of each source as ids (see ``tokenize``), vectorised over all of them.

  Returns:
    (ids int32 [total tokens], the number of tokens of each source int64 [len(sources)]); the ids
    of ``sources[i]`` follow those of ``sources[i - 1]``.
  """
  text = "\n".join(sources)  # Sources hold no newline, and a newline separates tokens.
  if not text.isascii():  # Non-ASCII whitespace splits too: take the token-by-token path.
    rows = [[_TOKEN_IDS[t] for t in s.translate(_CLEAN_STR).split()] for s in sources]
    return (np.array([i for row in rows for i in row], np.int32),
            np.array([len(row) for row in rows], np.int64))
  data = np.frombuffer(text.encode("ascii").translate(_CLEAN_TABLE, _CLEAN_DELETE), np.uint8)
  in_token = np.concatenate([[False], (data != ord(" ")) & (data != ord("\n")), [False]])
  edges = np.flatnonzero(in_token[1:] != in_token[:-1])
  starts, lengths = edges[0::2], edges[1::2] - edges[0::2]
  ids = _CHAR_IDS[data[starts]]
  ids[lengths > 1] = OOV_ID
  long_tokens = np.flatnonzero(lengths > 1)
  # The first 4 bytes of each longer token as a big-endian code (indices clipped at the end of
  # the text only ever change bytes past the token, which the length check ignores).
  first_bytes = data[np.minimum(starts[long_tokens, None] + np.arange(4), data.size - 1)]
  code = first_bytes.view(">u4")[:, 0]
  for length, word_code, token_id in _WORD_CODES:
    match = (lengths[long_tokens] == length) & (code >> (8 * (4 - length)) == word_code)
    ids[long_tokens[match]] = token_id
  ends_of_rows = np.searchsorted(starts, np.flatnonzero(data == ord("\n")))
  return ids, np.diff(ends_of_rows, prepend=0, append=starts.size)


def tokenize(source: str) -> list[int]:
  """LRA's ListOps tokenization with the fixed ``VOCAB``.

  ``]`` becomes ``X``, ``(`` and ``)`` are dropped, the rest is split on whitespace, and each
  token maps to its ``VOCAB`` index (1..15); unknown tokens map to ``OOV_ID`` (16). No padding.
  """
  return _encode([source])[0].tolist()


def read_tsv(path: str | os.PathLike, max_length: int) -> dict[str, np.ndarray]:
  """Reads a ListOps TSV file into padded token ids (LRA ``listops/input_pipeline.py``).

  The header picks the column order: ``Source<TAB>Target`` (LRA release, ``write_tsv``) or
  ``Target<TAB>Source`` (Nangia & Bowman). The file is streamed and tokenized
  ``_READ_CHUNK_ROWS`` rows at a time.

  Args:
    path: the TSV file.
    max_length: ids per example; longer sequences are truncated, shorter ones zero-padded.

  Returns:
    ``{'inputs': int32 [n, max_length], 'targets': int32 [n]}`` in file order.

  Raises:
    ValueError: ``max_length < 1``; an empty file, a header other than the two above, no data
      rows, or a malformed row (not two columns, a label that is not an integer in 0..9, a source
      without tokens). The message starts with ``<path>:<1-based line number>:``.
  """
  if max_length < 1:
    raise ValueError(f"max_length must be >= 1; got {max_length}")
  path = pathlib.Path(path)
  inputs = np.zeros((_READ_CHUNK_ROWS, max_length), np.int32)
  targets = np.zeros((_READ_CHUNK_ROWS,), np.int32)
  n = 0  # Rows tokenized into ``inputs``.
  sources: list[str] = []  # Rows n, n + 1, ... not yet tokenized, and their line numbers.
  line_numbers: list[int] = []

  def tokenize_pending():
    nonlocal n
    ids, counts = _encode(sources)
    if not counts.all():
      raise ValueError(f"{path}:{line_numbers[int(np.argmin(counts))]}: empty source")
    start = 0
    for count in counts.tolist():
      kept = min(count, max_length)
      inputs[n, :kept] = ids[start:start + kept]
      start += count
      n += 1
    sources.clear()
    line_numbers.clear()

  with path.open("r", encoding="utf-8") as f:
    header = f.readline()
    if not header:
      raise ValueError(f"{path}:1: empty file; expected the header 'Source<TAB>Target' or "
                       f"'Target<TAB>Source'")
    columns = header.rstrip("\r\n").split("\t")
    if columns not in (["Source", "Target"], ["Target", "Source"]):
      raise ValueError(f"{path}:1: bad header {header.rstrip()!r}; expected "
                       f"'Source<TAB>Target' or 'Target<TAB>Source'")
    source_column = columns.index("Source")
    for line_number, line in enumerate(f, start=2):
      fields = line.rstrip("\r\n").split("\t")
      if len(fields) != 2:
        raise ValueError(f"{path}:{line_number}: expected 2 tab-separated columns, found "
                         f"{len(fields)}")
      label = fields[1 - source_column]
      try:
        target = int(label)
      except ValueError:
        raise ValueError(f"{path}:{line_number}: label {label!r} is not an integer") from None
      if not 0 <= target < NUM_CLASSES:
        raise ValueError(f"{path}:{line_number}: label {target} is outside 0..{NUM_CLASSES - 1}")
      row = n + len(sources)
      if row == len(targets):
        inputs.resize((2 * row, max_length), refcheck=False)  # New rows are zero.
        targets.resize((2 * row,), refcheck=False)
      targets[row] = target
      sources.append(fields[source_column])
      line_numbers.append(line_number)
      if len(sources) == _READ_CHUNK_ROWS:
        tokenize_pending()
  if sources:
    tokenize_pending()
  if n == 0:
    raise ValueError(f"{path}:2: no data rows after the header")
  inputs.resize((n, max_length), refcheck=False)
  targets.resize((n,), refcheck=False)
  return {"inputs": inputs, "targets": targets}


def load_splits(data_dir: str | os.PathLike, max_length: int,
                task: str = "basic") -> dict[str, dict[str, np.ndarray]]:
  """Reads ``{task}_{train,val,test}.tsv`` from ``data_dir`` with ``read_tsv``.

  Returns:
    ``{'train'|'val'|'test': {'inputs': int32 [n, max_length], 'targets': int32 [n]}}``.

  Raises:
    FileNotFoundError: a split file is missing (the message names the expected paths).
    ValueError: as ``read_tsv``.
  """
  paths = split_paths(data_dir, task)
  missing = [str(path) for path in paths.values() if not path.is_file()]
  if missing:
    raise FileNotFoundError(f"ListOps '{task}' files missing: {', '.join(missing)} (generate "
                            f"them with `python -m clustr_jax.data.listops --output_dir=...`)")
  return {split: read_tsv(path, max_length) for split, path in paths.items()}


def load_dataset(config, workdir: pathlib.Path) -> data_lib.ArrayDataset:
  """The train loop's ListOps dataset (``clustr_jax.data.get``) from ``config.dataset``.

  Reads ``{task}_{train,val,test}.tsv`` from ``config.dataset.data_dir`` (default
  ``<workdir>/data/listops``), first generating them on process 0 with
  ``config.dataset.generator`` when ``config.dataset.generate`` is set.

  Returns:
    An ``ArrayDataset`` of ``{'inputs': int32 [n, max_length], 'targets': int32 [n]}`` per split,
    with model defaults ``vocab_size``, ``num_classes`` and ``max_length``.

  Raises:
    FileNotFoundError, ValueError: as ``load_splits`` and ``ensure_generated``.
  """
  import jax  # pylint: disable=g-import-not-at-top  (the generator and reader need no JAX)
  ds = config.dataset
  data_dir = pathlib.Path(ds.data_dir) if ds.data_dir else workdir / "data" / "listops"
  if ds.generate and jax.process_index() == 0:
    ensure_generated(data_dir, task=ds.task, progress=True, **ds.generator.to_dict())
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices("dataset_ready")
  return data_lib.ArrayDataset(
      load_splits(data_dir, ds.max_length, task=ds.task),
      model_kwargs={"vocab_size": VOCAB_SIZE, "num_classes": NUM_CLASSES,
                    "max_length": ds.max_length})


# ---------------------------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> None:
  """Command line with LRA's flag names; writes the files unless present (``ensure_generated``)."""
  parser = argparse.ArgumentParser(
      prog="python -m clustr_jax.data.listops",
      description="Generate LRA ListOps {task}_{train,val,test}.tsv files (seeded).")
  parser.add_argument("--task", default="basic", help="file name prefix (default: %(default)s)")
  parser.add_argument("--num_train_samples", type=int, default=96_000)
  parser.add_argument("--num_valid_samples", type=int, default=2_000)
  parser.add_argument("--num_test_samples", type=int, default=2_000)
  parser.add_argument("--max_depth", type=int, default=10)
  parser.add_argument("--max_args", type=int, default=10)
  parser.add_argument("--min_length", type=int, default=500, help="exclusive lower bound")
  parser.add_argument("--max_length", type=int, default=2000, help="exclusive upper bound")
  parser.add_argument("--value_p", type=float, default=0.25,
                      help="probability of an operator node below max_depth")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--output_dir", default="output_dir")
  parser.add_argument("--no_progress", action="store_true", help="hide the progress bar")
  args = parser.parse_args(argv)
  try:
    paths = ensure_generated(
        args.output_dir, task=args.task, num_train=args.num_train_samples,
        num_val=args.num_valid_samples, num_test=args.num_test_samples,
        min_length=args.min_length, max_length=args.max_length, max_depth=args.max_depth,
        max_args=args.max_args, value_p=args.value_p, seed=args.seed,
        progress=not args.no_progress)
  except ValueError as e:
    parser.error(str(e))
  for path in paths.values():
    print(path)


if __name__ == "__main__":
  main()
