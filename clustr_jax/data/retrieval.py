"""LRA Retrieval: ACL Anthology Network (AAN) citation pairs at byte level, two inputs.

Source (``docs/lra.md``; ``docs/data_formats.md``, "AAN pairs (Retrieval)"): LRA
``lra_benchmarks/matching/input_pipeline.py`` reads ``{data_dir}/new_aan_pairs.{train,eval,test}
.tsv`` of the LRA release (``lra_release/tsv_data/``): **no header**, five tab-separated columns
``label``, ``id1``, ``id2``, ``text1``, ``text2``, quotes literal; ``label`` parses as a float, then
an int (1: the documents are linked by a citation). Each text is cut to its first 10,000 bytes
(``tf.strings.substr`` counts bytes; for the ASCII AAN text, characters), byte-encoded (id = byte +
1, ``text.encode_bytes``), truncated to ``max_length`` (4,000) and zero-padded: ``inputs1`` and
``inputs2``. Vocabulary 257, 2 classes; the model is ``lra_dual_encoder``.

Differences from LRA, documented choices: the release's ``eval`` file is the ``val`` split here;
evaluation covers every example once (LRA shuffles its eval files and drops the last partial
batch, docs/lra.md).
"""

from __future__ import annotations

import os
import pathlib

import numpy as np

from clustr_jax import data as data_lib
from clustr_jax.data import text

VOCAB_SIZE = text.VOCAB_SIZE
NUM_CLASSES = 2
MAX_TEXT_BYTES = 10_000
COLUMNS = ("label", "id1", "id2", "text1", "text2")
# Our split name -> the release's file name part.
SPLIT_FILES = {"train": "train", "val": "eval", "test": "test"}


def split_paths(data_dir: str | os.PathLike,
                prefix: str = "new_aan_pairs") -> dict[str, pathlib.Path]:
  """``{'train'|'val'|'test': data_dir/<prefix>.{train,eval,test}.tsv}``."""
  return {split: pathlib.Path(data_dir) / f"{prefix}.{name}.tsv"
          for split, name in SPLIT_FILES.items()}


def read_tsv(path: str | os.PathLike, max_length: int,
             max_text_bytes: int = MAX_TEXT_BYTES) -> dict[str, np.ndarray]:
  """Reads one AAN pairs TSV (no header: label, id1, id2, text1, text2) into padded byte ids.

  Args:
    path: the TSV file.
    max_length: ids per document (LRA: 4,000).
    max_text_bytes: each text is first cut to this many bytes (LRA: 10,000).

  Returns:
    ``{'inputs1': int32 [n, max_length], 'inputs2': int32 [n, max_length], 'targets': int32 [n]}``
    in file order.

  Raises:
    ValueError: ``max_length < 1``; no rows; a row without exactly 5 tab-separated columns (a
      truncated file ends with one), a label that is not 0 or 1 (as a float: ``1.0`` is fine), an
      empty id or text. The message starts with ``<path>:<1-based line number>:``.
  """
  if max_length < 1:
    raise ValueError(f"max_length must be >= 1; got {max_length}")
  path = pathlib.Path(path)
  texts1, texts2, labels = [], [], []
  with path.open("rb") as f:
    for line_number, line in enumerate(f, start=1):
      where = f"{path}:{line_number}:"
      fields = line.rstrip(b"\n").rstrip(b"\r").split(b"\t")
      if len(fields) != len(COLUMNS):
        raise ValueError(f"{where} expected {len(COLUMNS)} tab-separated columns "
                         f"({', '.join(COLUMNS)}), found {len(fields)}")
      try:
        label = float(fields[0])
      except ValueError:
        raise ValueError(f"{where} label {fields[0][:20]!r} is not a number") from None
      if label not in (0.0, 1.0):
        raise ValueError(f"{where} label {label} is not 0 or 1")
      for column, field in zip(COLUMNS[1:], fields[1:]):
        if not field.strip():
          raise ValueError(f"{where} empty column {column!r}")
      labels.append(int(label))
      texts1.append(fields[3][:max_text_bytes])
      texts2.append(fields[4][:max_text_bytes])
  if not labels:
    raise ValueError(f"{path}:1: no rows (expected label<TAB>id1<TAB>id2<TAB>text1<TAB>text2)")
  return {"inputs1": text.encode_bytes(texts1, max_length),
          "inputs2": text.encode_bytes(texts2, max_length),
          "targets": np.asarray(labels, np.int32)}


def load_splits(data_dir: str | os.PathLike, max_length: int, prefix: str = "new_aan_pairs",
                max_text_bytes: int = MAX_TEXT_BYTES) -> dict[str, dict[str, np.ndarray]]:
  """Reads the train, eval (as 'val') and test files of ``data_dir`` with ``read_tsv``.

  Raises:
    FileNotFoundError: a split file is missing (every expected path is named).
    ValueError: as ``read_tsv``.
  """
  paths = split_paths(data_dir, prefix)
  missing = [str(p) for p in paths.values() if not p.is_file()]
  if missing:
    raise FileNotFoundError(f"AAN retrieval files missing: {', '.join(missing)} (the LRA "
                            f"release's lra_release/tsv_data/)")
  return {split: read_tsv(p, max_length, max_text_bytes) for split, p in paths.items()}


def load_dataset(config, workdir: pathlib.Path) -> data_lib.ArrayDataset:
  """The train loop's Retrieval dataset (``clustr_jax.data.get``) from ``config.dataset``.

  Keys: ``data_dir`` (the folder of the TSVs), ``file_prefix`` ('new_aan_pairs'), ``max_length``
  (ids per document, 4,000) and ``max_text_bytes`` (10,000).

  Returns:
    An ``ArrayDataset`` with input_keys ('inputs1', 'inputs2') and model defaults
    ``vocab_size`` 257, ``num_classes`` 2 and ``max_length``.

  Raises:
    ValueError: no ``config.dataset.data_dir``; FileNotFoundError, ValueError: as ``load_splits``.
  """
  del workdir
  ds = config.dataset
  if not ds.data_dir:
    raise ValueError("config.dataset.data_dir must name the folder of new_aan_pairs.*.tsv")
  return data_lib.ArrayDataset(
      load_splits(ds.data_dir, ds.max_length, ds.file_prefix, ds.max_text_bytes),
      input_keys=("inputs1", "inputs2"),
      model_kwargs={"vocab_size": VOCAB_SIZE, "num_classes": NUM_CLASSES,
                    "max_length": ds.max_length})
