"""LRA Text: IMDb movie-review sentiment at byte level, from the aclImdb folders or TFDS.

Sources (``docs/lra.md``, "Quirks of each task"; ``docs/data_formats.md``, "IMDb: aclImdb"):
  * LRA ``lra_benchmarks/text_classification/input_pipeline.py``: TFDS ``imdb_reviews``; train
    (25,000 reviews) for training, **test (25,000) as both validation and test**; the review's
    bytes, stripped of surrounding whitespace (HTML ``<br />`` kept); ``ByteTextEncoder``: id =
    byte + 1, padding 0, vocabulary 257; truncated to ``max_length`` and zero-padded. LRA's code
    uses ``max_length`` 1,000, its paper 4,000 (LRA issue #21): a config value here.
  * Maas et al., ACL 2011, the ``aclImdb`` layout: ``{train,test}/{pos,neg}/<id>_<rating>.txt``,
    UTF-8, pos = rating >= 7 (label 1), neg = rating <= 4 (label 0). TFDS ``imdb_reviews`` builds
    its splits from these folders, so both sources give the same reviews and labels.

Deliberate choices, each a config option of ``load_dataset``:
  * ``val_fraction = 0`` (default) validates on the test set, as LRA; a positive fraction holds out
    a seeded random part of train instead, for model selection that never sees test.
  * Reviews are read in sorted file-name order (TFDS's order depends on its shuffling); training
    shuffles anyway.

Byte-level encoding (``encode_bytes``) is shared with ``clustr_jax.data.retrieval``.
"""

from __future__ import annotations

import os
import pathlib
import re
from collections.abc import Sequence

import numpy as np

from clustr_jax import data as data_lib

VOCAB_SIZE = 257  # Padding 0 and the 256 byte values shifted by one.
NUM_CLASSES = 2
LABELS = {"neg": 0, "pos": 1}
_FILE_NAME = re.compile(r"(\d+)_(\d+)\.txt")
_RATINGS = {"neg": range(1, 5), "pos": range(7, 11)}


def encode_bytes(texts: Sequence[bytes], max_length: int) -> np.ndarray:
  """LRA's ``ByteTextEncoder``: id = byte + 1 (pad 0), truncated to ``max_length``, zero-padded.

  Args:
    texts: raw byte strings (UTF-8 text is encoded byte by byte, as the ``ByteTextEncoder``
      does after ``str.encode('utf-8')``).
    max_length: ids per example.

  Returns:
    int32 [len(texts), max_length], values in 0..256.

  Raises:
    ValueError: ``max_length < 1``.
  """
  if max_length < 1:
    raise ValueError(f"max_length must be >= 1; got {max_length}")
  ids = np.zeros((len(texts), max_length), np.int32)
  for row, text in zip(ids, texts):
    kept = np.frombuffer(text[:max_length], np.uint8)
    row[:kept.size] = kept.astype(np.int32) + 1
  return ids


def read_review(path: str | os.PathLike) -> bytes:
  """One review file: its bytes stripped of surrounding ASCII whitespace (as TFDS does).

  Raises:
    ValueError: the file is not valid UTF-8 (e.g. truncated inside a character; the message gives
      ``<path>:<line>:``) or holds no text.
  """
  path = pathlib.Path(path)
  text = path.read_bytes().strip()
  try:
    text.decode("utf-8")
  except UnicodeDecodeError as e:
    line = text.count(b"\n", 0, e.start) + 1
    raise ValueError(f"{path}:{line}: not valid UTF-8 at byte {e.start} ({e.reason}); a "
                     f"truncated or corrupt review") from None
  if not text:
    raise ValueError(f"{path}:1: empty review")
  return text


def read_aclimdb(root: str | os.PathLike, split: str) -> tuple[list[bytes], np.ndarray]:
  """The labelled reviews of ``split`` ('train' or 'test') from the aclImdb layout.

  Args:
    root: the ``aclImdb`` directory (holding ``train/`` and ``test/``).
    split: 'train' or 'test'.

  Returns:
    (texts: the stripped bytes of each review, labels: int32 [n], neg = 0, pos = 1): all of
    ``neg/`` then all of ``pos/``, each in sorted file-name order.

  Raises:
    FileNotFoundError: ``<root>/<split>/neg`` or ``pos`` is missing (named in the message).
    ValueError: a folder with no reviews; a file not named ``<id>_<rating>.txt``; a rating that
      contradicts its folder (neg 1-4, pos 7-10); a review as ``read_review`` rejects it. Every
      message names the file.
  """
  texts, labels = [], []
  for name, label in LABELS.items():
    folder = pathlib.Path(root) / split / name
    if not folder.is_dir():
      raise FileNotFoundError(f"IMDb folder missing: {folder} (expected the aclImdb layout "
                              f"{{train,test}}/{{pos,neg}}/<id>_<rating>.txt)")
    paths = sorted(folder.iterdir())
    if not paths:
      raise ValueError(f"{folder}: no reviews")
    for path in paths:
      match = _FILE_NAME.fullmatch(path.name)
      if match is None:
        raise ValueError(f"{path}: not an aclImdb review file name <id>_<rating>.txt")
      rating = int(match.group(2))
      if rating not in _RATINGS[name]:
        raise ValueError(f"{path}: rating {rating} contradicts folder {name!r} (neg is 1-4, pos "
                         f"7-10)")
      texts.append(read_review(path))
      labels.append(label)
  return texts, np.asarray(labels, np.int32)


def read_tfds(split: str, *, name: str = "imdb_reviews",
              data_dir: str | None = None) -> tuple[list[bytes], np.ndarray]:
  """The reviews of a prepared TFDS ``imdb_reviews`` split via ``tfds.data_source`` (no TF).

  Args:
    split: a TFDS split spec, e.g. 'train', 'test' or 'train[:90%]'.
    name: the TFDS builder name (and config, e.g. 'imdb_reviews/plain_text').
    data_dir: the TFDS data directory (None: TFDS's default, ``~/tensorflow_datasets``).

  Returns:
    (texts: bytes per review, labels: int32 [n]) in the data source's order.

  Raises:
    ValueError: a record whose label is not 0 or 1, or whose text is empty (the message gives the
      split and record index). TFDS's own errors when the dataset is not prepared.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (slow import)
  source = tfds.data_source(name, split=split, data_dir=data_dir)
  texts, labels = [], []
  for index in range(len(source)):
    record = source[index]
    text, label = record["text"], int(record["label"])
    text = (text.encode("utf-8") if isinstance(text, str) else bytes(text)).strip()
    if label not in (0, 1) or not text:
      raise ValueError(f"TFDS {name} split {split!r} record {index}: label {label} (want 0 or 1), "
                       f"{len(text)} text bytes")
    texts.append(text)
    labels.append(label)
  return texts, np.asarray(labels, np.int32)


def _aclimdb_root(data_dir: str | os.PathLike) -> pathlib.Path:
  """``data_dir`` itself, or its ``aclImdb`` child when ``data_dir`` is the archive's parent."""
  data_dir = pathlib.Path(data_dir)
  return data_dir / "aclImdb" if (data_dir / "aclImdb").is_dir() else data_dir


def split_off_validation(arrays: dict[str, np.ndarray], fraction: float,
                         seed: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """(train, val): a seeded random ``round(fraction * n)`` examples of ``arrays`` become val.

  Raises:
    ValueError: ``fraction`` outside (0, 1), or a split that would be empty.
  """
  n = len(arrays["targets"])
  num_val = int(round(fraction * n))
  if not 0.0 < fraction < 1.0 or not 0 < num_val < n:
    raise ValueError(f"val_fraction={fraction} of {n} examples leaves an empty split; use a "
                     f"value in (0, 1)")
  order = np.random.default_rng(seed).permutation(n)
  val, train = np.sort(order[:num_val]), np.sort(order[num_val:])
  return ({k: v[train] for k, v in arrays.items()}, {k: v[val] for k, v in arrays.items()})


def load_dataset(config, workdir: pathlib.Path) -> data_lib.ArrayDataset:
  """The train loop's Text dataset (``clustr_jax.data.get``) from ``config.dataset``.

  Keys of ``config.dataset``:
    source: 'aclimdb' (read ``data_dir``, the aclImdb folder or its parent) or 'tfds'
      (``tfds.data_source(tfds_name)`` from the prepared ``data_dir``, None = TFDS's default).
    max_length: bytes kept per review (LRA's code 1,000; its paper 4,000).
    val_fraction: 0 validates on the test set (LRA); > 0 holds out that part of train
      (seeded by ``config.seed``).

  Returns:
    An ``ArrayDataset`` of ``{'inputs': int32 [n, max_length], 'targets': int32 [n]}`` for
    train, val and test, with model defaults ``vocab_size`` 257, ``num_classes`` 2 and
    ``max_length``.

  Raises:
    ValueError: an unknown ``source``, a missing ``data_dir`` for 'aclimdb', and the readers'
      errors (file and line of a malformed review).
  """
  del workdir
  ds = config.dataset
  if ds.source == "aclimdb":
    if not ds.data_dir:
      raise ValueError("config.dataset.data_dir must name the aclImdb folder (source='aclimdb')")
    root = _aclimdb_root(ds.data_dir)
    raw = {split: read_aclimdb(root, split) for split in ("train", "test")}
  elif ds.source == "tfds":
    raw = {split: read_tfds(split, name=ds.tfds_name, data_dir=ds.data_dir)
           for split in ("train", "test")}
  else:
    raise ValueError(f"config.dataset.source={ds.source!r} unknown; valid: aclimdb, tfds")
  splits = {split: {"inputs": encode_bytes(texts, ds.max_length), "targets": labels}
            for split, (texts, labels) in raw.items()}
  if ds.val_fraction:
    splits["train"], splits["val"] = split_off_validation(splits["train"], ds.val_fraction,
                                                          config.seed)
  else:
    splits["val"] = splits["test"]
  return data_lib.ArrayDataset(
      {s: splits[s] for s in ("train", "val", "test")},
      model_kwargs={"vocab_size": VOCAB_SIZE, "num_classes": NUM_CLASSES,
                    "max_length": ds.max_length})
