r"""The LRA ListOps generator (Nangia & Bowman 2018; LRA, Tay et al. 2021) and an evaluator.

Sources (``docs/lra.md``, "The ListOps generator"; ``docs/data_formats.md``, ListOps):
  * LRA ``lra_benchmarks/data/listops.py``: the generator reproduced here (operators ``[MIN``,
    ``[MAX``, ``[MED``, ``[SM`` over the digits 0-9, closing ``]``; trees of depth <= 10 with 2-10
    arguments per operator, leaf probability 0.75 below the depth limit; 500 < length < 2,000).
  * N. Nangia and S. R. Bowman, "ListOps: A Diagnostic Dataset for Latent Tree Learning",
    NAACL SRW 2018: the task.

Deliberate difference from LRA: LRA collects the trees in a Python ``set`` and splits them in
its (hash-dependent) iteration order, unseeded, so its split cannot be regenerated. Here sampling
is seeded (``numpy.random.default_rng(seed)``) and trees are kept in draw order: the first
``num_train`` distinct accepted trees are train, the next ``num_val`` val, the last ``num_test``
test.

The accepted trees have exactly the distribution of LRA's recursive sampler; only the order of
the draws differs, for speed. Trees are drawn ``TREES_PER_DRAW`` at a time with numpy, one depth
level at a time: first the shape (each node's ``u`` and argument count), then, for the accepted
trees only, the digits and operators, which do not affect the length. A tree stops growing once
its running length reaches ``max_length``: it would be rejected anyway, and since that decision
only depends on draws already made, every other node still gets fresh independent draws.

``ensure_generated`` writes the splits in the release format (``release.write_tsv``) with the
parameters beside them, unless the directory already holds them.
"""

from __future__ import annotations

import inspect
import json
import operator
import os
import pathlib

import numpy as np
from absl import logging
from tqdm import tqdm

from clustr_jax import data as data_lib
from clustr_jax.data.listops import release

GENERATOR_VERSION = 1  # Stored with generated files; bump when the same seed gives other data.

# Trees are drawn this many at a time (vectorised); part of what a seed determines.
TREES_PER_DRAW = 4096
# Generation stops with an error after this many trials in a row without a new accepted tree
# (a length window the grammar cannot fill, or fewer distinct trees than requested).
MAX_TRIALS_WITHOUT_NEW = 1_000_000


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
    # Digits; the operators are replaced below.
    sources = list(map(release.DIGITS.__getitem__, symbols.tolist()))
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
        sources[i] = ("( " * (count + 1) + release.OPERATORS[op] + " "
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
    symbol = rng.integers(0, np.where(arity > 0, len(release.OPERATORS),
                                      len(release.DIGITS)))
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
  parentheses (operators, digits and ``]``), i.e. the token count after ``release.tokenize``.

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
# Generating into a directory in the release format.
# ---------------------------------------------------------------------------------------------
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
  paths = release.split_paths(out_dir, task)
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
  release.write_atomically(params_path, [json.dumps(params, indent=2, sort_keys=True), "\n"])
  return release.write_tsv(splits, out_dir, task)


# ---------------------------------------------------------------------------------------------
# Evaluator.
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
    if token == release.END:
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
