"""LRA Image: CIFAR-10 in grayscale as 1,024 pixel tokens, from the binary release or TFDS.

Sources (``docs/lra.md``, "Quirks of each task"; ``docs/data_formats.md``, "CIFAR-10 binary"):
  * LRA ``lra_benchmarks/image/input_pipeline.py``: TFDS ``cifar10``, splits ``train[:90%]``
    (45,000) / ``train[90%:]`` (5,000) / ``test`` (10,000); ``tf.image.rgb_to_grayscale``, int32,
    flattened row-major to 1,024 tokens; **not normalised**: the pixel value is the token id,
    vocabulary 256, 10 classes. The model's padding mask is ``inputs > 0``, so black pixels are
    masked out of attention: LRA's quirk, the model field ``zero_is_padding`` (on in the faithful
    config; off attends every pixel).
  * The CIFAR binary release (``cifar-10-batches-bin/``), which TFDS's builder reads:
    ``data_batch_1..5.bin`` and ``test_batch.bin``, records of 3,073 bytes: 1 label byte (0-9),
    then 3,072 pixels as R, G and B planes of 32 x 32, row-major.

Grayscale (``grayscale``), TF's ``rgb_to_grayscale`` on uint8 in float32: x * (1/255), then
0.2989 R + 0.5870 G + 0.1140 B, then back to uint8 as trunc(gray * 255.5) ([INFER] from TF's
``convert_image_dtype``).

Splits: with ``source='tfds'`` the TFDS split specs are LRA's own. From the binary files the
train split is the first ``1 - val_fraction`` of the five batch files' records in file order and
val the rest (TFDS orders records by its own shuffle, which the files cannot reproduce).
"""

from __future__ import annotations

import os
import pathlib

import numpy as np

from clustr_jax import data as data_lib

RECORD_BYTES = 1 + 3 * 32 * 32
IMAGE_SHAPE = (32, 32, 3)
NUM_CLASSES = 10
VOCAB_SIZE = 256
TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
TEST_FILE = "test_batch.bin"
_GRAY_WEIGHTS = np.asarray([0.2989, 0.5870, 0.1140], np.float32)


def read_bin(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
  """One CIFAR-10 binary batch file.

  Returns:
    (images uint8 [n, 32, 32, 3] (HWC, RGB), labels int32 [n]).

  Raises:
    ValueError: an empty file, a size that is not a whole number of 3,073-byte records (a
      truncated file: the message names the incomplete record and its byte offset), or a label
      byte outside 0..9 (record and offset named). Messages start with the path.
  """
  path = pathlib.Path(path)
  raw = np.fromfile(path, np.uint8)
  if raw.size == 0:
    raise ValueError(f"{path}: empty file; expected records of {RECORD_BYTES} bytes")
  if raw.size % RECORD_BYTES:
    n = raw.size // RECORD_BYTES
    raise ValueError(f"{path}: {raw.size} bytes is not a whole number of {RECORD_BYTES}-byte "
                     f"records (1 label + 3,072 pixels): record {n} at byte {n * RECORD_BYTES} "
                     f"is truncated after {raw.size - n * RECORD_BYTES} bytes")
  records = raw.reshape(-1, RECORD_BYTES)
  bad = np.flatnonzero(records[:, 0] >= NUM_CLASSES)
  if bad.size:
    raise ValueError(f"{path}: record {bad[0]} (byte {bad[0] * RECORD_BYTES}): label "
                     f"{records[bad[0], 0]} outside 0..{NUM_CLASSES - 1}")
  images = records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  return np.ascontiguousarray(images), records[:, 0].astype(np.int32)


def read_tfds(split: str, *, name: str = "cifar10",
              data_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
  """A prepared TFDS ``cifar10`` split via ``tfds.data_source`` (no TensorFlow needed).

  Args:
    split: a TFDS split spec, e.g. 'train[:90%]'.
    name: the TFDS builder name.
    data_dir: the TFDS data directory (None: TFDS's default).

  Returns:
    (images uint8 [n, 32, 32, 3], labels int32 [n]) in the data source's order.

  Raises:
    ValueError: a record whose image is not 32 x 32 x 3 or whose label is outside 0..9 (split and
      record index named). TFDS's own errors when the dataset is not prepared.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (slow import)
  source = tfds.data_source(name, split=split, data_dir=data_dir)
  images = np.zeros((len(source), *IMAGE_SHAPE), np.uint8)
  labels = np.zeros((len(source),), np.int32)
  for index in range(len(source)):
    record = source[index]
    image, label = np.asarray(record["image"]), int(record["label"])
    if image.shape != IMAGE_SHAPE or not 0 <= label < NUM_CLASSES:
      raise ValueError(f"TFDS {name} split {split!r} record {index}: image shape {image.shape} "
                       f"(want {IMAGE_SHAPE}), label {label} (want 0..{NUM_CLASSES - 1})")
    images[index], labels[index] = image, label
  return images, labels


def grayscale(images: np.ndarray) -> np.ndarray:
  """TF ``rgb_to_grayscale`` of uint8 RGB images [..., 3] -> uint8 [...] (see module docstring)."""
  gray = (images.astype(np.float32) * np.float32(1 / 255)) @ _GRAY_WEIGHTS
  return (gray * np.float32(255.5)).astype(np.uint8)


def to_tokens(images: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
  """``{'inputs': int32 [n, 1024] grayscale pixels row-major, 'targets': int32 [n]}``."""
  return {"inputs": grayscale(images).reshape(len(images), -1).astype(np.int32),
          "targets": labels.astype(np.int32)}


def _binary_dir(data_dir: str | os.PathLike) -> pathlib.Path:
  """``data_dir`` itself, or its ``cifar-10-batches-bin`` child."""
  data_dir = pathlib.Path(data_dir)
  child = data_dir / "cifar-10-batches-bin"
  return child if child.is_dir() else data_dir


def load_binary_splits(data_dir: str | os.PathLike,
                       val_fraction: float = 0.1) -> dict[str, dict[str, np.ndarray]]:
  """Train / val / test token arrays (``to_tokens``) from the binary release files.

  Raises:
    FileNotFoundError: a batch file is missing (all expected paths named).
    ValueError: ``val_fraction`` outside [0, 1) or leaving no training record; ``read_bin``'s
      errors.
  """
  folder = _binary_dir(data_dir)
  paths = [folder / name for name in (*TRAIN_FILES, TEST_FILE)]
  missing = [str(p) for p in paths if not p.is_file()]
  if missing:
    raise FileNotFoundError(f"CIFAR-10 binary files missing: {', '.join(missing)}")
  train = [read_bin(p) for p in paths[:-1]]
  images, labels = np.concatenate([t[0] for t in train]), np.concatenate([t[1] for t in train])
  num_val = int(round(val_fraction * len(labels)))
  if not 0.0 <= val_fraction < 1.0 or num_val >= len(labels):
    raise ValueError(f"val_fraction={val_fraction} must be in [0, 1) and leave training records")
  cut = len(labels) - num_val
  splits = {"train": to_tokens(images[:cut], labels[:cut]),
            "test": to_tokens(*read_bin(paths[-1]))}
  if num_val:
    splits["val"] = to_tokens(images[cut:], labels[cut:])
  return splits


def load_dataset(config, workdir: pathlib.Path) -> data_lib.ArrayDataset:
  """The train loop's Image dataset (``clustr_jax.data.get``) from ``config.dataset``.

  Keys of ``config.dataset``:
    source: 'binary' (the release files in ``data_dir`` or its ``cifar-10-batches-bin``) or
      'tfds' (``tfds.data_source(tfds_name)`` from the prepared TFDS ``data_dir``).
    val_fraction: the part of train held out for validation (LRA: 0.1, i.e. 45,000 / 5,000);
      0 validates on the test set.
    tfds_splits: with 'tfds', the split specs ``{train, val, test}`` (LRA: 'train[:90%]',
      'train[90%:]', 'test'; ``val_fraction`` is not used).

  Returns:
    An ``ArrayDataset`` of ``{'inputs': int32 [n, 1024], 'targets': int32 [n]}`` per split,
    with model defaults ``vocab_size`` 256, ``num_classes`` 10, ``max_length`` 1024.

  Raises:
    ValueError: an unknown ``source`` or no ``data_dir`` for 'binary'; the readers' errors.
  """
  del workdir
  ds = config.dataset
  if ds.source == "binary":
    if not ds.data_dir:
      raise ValueError("config.dataset.data_dir must name the CIFAR-10 binary folder "
                       "(source='binary')")
    splits = load_binary_splits(ds.data_dir, ds.val_fraction)
  elif ds.source == "tfds":
    splits = {split: to_tokens(*read_tfds(spec, name=ds.tfds_name, data_dir=ds.data_dir))
              for split, spec in ds.tfds_splits.items()}
  else:
    raise ValueError(f"config.dataset.source={ds.source!r} unknown; valid: binary, tfds")
  splits.setdefault("val", splits["test"])
  return data_lib.ArrayDataset(
      {s: splits[s] for s in ("train", "val", "test")},
      model_kwargs={"vocab_size": VOCAB_SIZE, "num_classes": NUM_CLASSES,
                    "max_length": 32 * 32})
