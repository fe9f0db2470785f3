"""ListOps files in the LRA release format: vocabulary, tokenizer, TSV reader and writer.

Sources (``docs/lra.md``, "The ListOps generator"; ``docs/data_formats.md``, ListOps):
  * LRA ``lra_benchmarks/listops/input_pipeline.py``: the reader and tokenizer (``]`` -> ``X``,
    ``(`` and ``)`` dropped, whitespace split, ids zero-padded / truncated to ``max_length``).
  * N. Nangia and S. R. Bowman, "ListOps: A Diagnostic Dataset for Latent Tree Learning",
    NAACL SRW 2018: the original ``Target<TAB>Source`` files, also read here.

Files: ``{task}_{train,val,test}.tsv`` (LRA: ``task='basic'``) with header ``Source<TAB>Target``
(LRA release, ``write_tsv``); the reader also accepts ``Target<TAB>Source`` (Nangia & Bowman). A
source is a bracketed expression over the tokens ``OPERATORS``, ``DIGITS``, ``END`` (``]``) and
parentheses, e.g. ``( ( ( [MAX 2 ) 9 ) ] )``; a target its value, 0..9.

Deliberate difference from LRA: LRA builds its vocabulary from a Python ``set`` (ids depend on
the process). Here the vocabulary is fixed: ``VOCAB`` (pad 0, the 15 tokens 1..15,
out-of-vocabulary 16).
"""

from __future__ import annotations

import itertools
import os
import pathlib
import uuid
from collections.abc import Iterable, Sequence

import numpy as np

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


def split_paths(data_dir: str | os.PathLike, task: str = "basic") -> dict[str, pathlib.Path]:
  """``{split: data_dir/{task}_{split}.tsv}`` for train, val and test."""
  return {split: pathlib.Path(data_dir) / f"{task}_{split}.tsv" for split in SPLITS}


def write_atomically(path: pathlib.Path, chunks: Iterable[str]) -> None:
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
    splits: ``{'train'|'val'|'test': [(source, label), ...]}``, as ``generator.generate``
      returns them.
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
    write_atomically(path, itertools.chain(
        ["Source\tTarget\n"], (f"{source}\t{label}\n" for source, label in splits[split])))
  return paths


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


