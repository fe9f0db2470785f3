"""ImageNet (ILSVRC-2012) input: TFDS ``imagenet2012`` or a folder in ImageNet layout, DeiT's
preprocessing, Grain pipelines.

Sources (``config.dataset.source``):
  'folder'  ``<data_dir>/<split>/<wnid>/*.JPEG`` (also .jpg/.jpeg/.png, any case), e.g. the
            Imagenette sample or an ImageNet tree extracted from the
            tars. Files are listed in sorted order.
  'tfds'    ``tfds.data_source('imagenet2012', split=..., data_dir=...)`` (ArrayRecord, read
            without TensorFlow, images kept as JPEG bytes by ``SkipDecoding`` and decoded here).
            Prepare it once from the manual-download tars (docs/data_formats.md; this step needs
            TensorFlow and the ``array_record`` writer)::

              tfds build imagenet2012 --manual_dir=/path/to/tars --data_dir=/path/to/tfds \
                  --file_format=array_record

Labels (``config.dataset.classes``): 'imagenet', the TFDS order (``labels.txt`` of the TFDS
package: the 1,000 sorted wnids, line i = label i, docs/data_formats.md), 1,000 classes; or
'folder', the sorted wnids of the train folder numbered 0..K-1 (for subsets such as Imagenette;
since labels.txt is sorted, this is the TFDS order restricted to the subset). TFDS records carry
their own labels (TFDS order).

Splits (``config.dataset.splits``: train / val / test): a split name with an optional TFDS-style
slice, e.g. 'train', 'val', 'train[:99%]', 'train[-10000:]'; for TFDS any TFDS split string
('train[99%:]', 'validation').

Training, per process (DeiT ``main.py``, ``samplers.RASampler``, ``datasets.build_transform``):
  each epoch a seeded permutation of the train split; with ``repeated_augmentation`` r > 1 every
  index is repeated r times in a row, padded to a multiple of the process count and dealt
  round-robin to the processes, and each process keeps the first floor(n // 256 * 256 / P) of
  its share (RASampler; r = 1: DistributedSampler, P shares of ceil(n / P)) -> decode (PIL, RGB)
  -> ``augment.train_transform`` (random resized crop, flip, RandAugment, normalise, random
  erasing) with a per-example generator -> batches -> ``augment.mixup_cutmix`` with a per-batch
  generator (mixup / cutmix / label smoothing; with all three off the targets stay int class
  ids). The iterator is a checkpointable ``grain.DatasetIterator``; ``worker_count`` > 0 decodes
  and augments in Grain worker processes (they need absl flags parsed, as ``clustr_jax.main``
  does).
Evaluation: ``augment.eval_transform`` (short side int(size / crop_pct), centre crop), the split
once in order, padded batches with ``weights`` (the layout of ``pipeline.eval_batches``), decoded
by ``read_threads`` threads.

An unreadable image (I/O error, not an image, truncated) never stops an epoch: it is skipped with
a warning that names the file and the running count; in evaluation it becomes a zero-weight row,
so every process still yields the same number of batches. ``ImageNetDataset.num_skipped`` counts
this process's skips (Grain worker processes count and log their own).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import importlib.resources
import io
import math
import pathlib
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import grain
import ml_collections
import numpy as np
from absl import logging
from PIL import Image

from clustr_jax.data import augment

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")
NUM_IMAGENET_CLASSES = 1000
SOURCES = ("folder", "tfds")
CLASS_MODES = ("imagenet", "folder")
# Epochs in the index stream of the endless train iterator (its length must be finite).
_MAX_EPOCHS = 1_000_000


def imagenet_wnids() -> tuple[str, ...]:
  """The 1,000 ILSVRC-2012 wnids in TFDS label order (``labels.txt`` of tensorflow-datasets)."""
  text = (importlib.resources.files("tensorflow_datasets") / "datasets" / "imagenet2012" /
          "labels.txt").read_text()
  return tuple(line.strip() for line in text.splitlines() if line.strip())


def parse_split(spec: str, num_examples_of) -> tuple[str, slice]:
  """'name' or 'name[start:stop]' (ints, or percents with '%') -> (name, absolute slice).

  ``num_examples_of(name)`` gives the split's size, for percents and negative bounds (TFDS
  semantics: percent bounds round to the nearest example).

  Raises:
    ValueError: a malformed spec (the message quotes it).
  """
  match = re.fullmatch(r"\s*([\w-]+)\s*(?:\[\s*([-\d%.]*)\s*:\s*([-\d%.]*)\s*\])?\s*", spec)
  if not match:
    raise ValueError(f"split {spec!r}: expected 'name' or 'name[start:stop]' (ints or percents)")
  name, start, stop = match.groups()
  if start is None:
    return name, slice(None)
  n = num_examples_of(name)

  def bound(text: str) -> int | None:
    if not text:
      return None
    try:
      if text.endswith("%"):
        return int(round(float(text[:-1]) * n / 100))
      return int(text)
    except ValueError:
      raise ValueError(f"split {spec!r}: bound {text!r} is not an int or a percent") from None

  return name, slice(*slice(bound(start), bound(stop)).indices(n)[:2])


# ---------------------------------------------------------------------------------------------
# Sources: random access to (file name, encoded bytes or path, label).
# ---------------------------------------------------------------------------------------------
class FolderSource:
  """The images of ``root/<split>/<wnid>/*`` as a random-access sequence (listed once, sorted).

  Args:
    root: the data directory.
    split: a split spec (``parse_split``).
    class_to_label: wnid -> label id.

  ``source[i]`` is ``(path as str, None, label)``: the file is read when decoded.

  Raises:
    FileNotFoundError: the split folder does not exist or holds no images (the message gives the
      path).
    ValueError: a class folder not in ``class_to_label`` (named, with the path).
  """

  def __init__(self, root: str | pathlib.Path, split: str, class_to_label: Mapping[str, int]):
    name, _ = parse_split(split, lambda name: 0)
    folder = pathlib.Path(root) / name
    if not folder.is_dir():
      raise FileNotFoundError(f"ImageNet folder split {name!r}: directory {folder} not found "
                              f"(expected {folder}/<wnid>/*.JPEG)")
    records = []
    for class_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
      if class_dir.name not in class_to_label:
        raise ValueError(f"ImageNet folder {class_dir}: class {class_dir.name!r} is not a known "
                         f"wnid (config.dataset.classes)")
      label = class_to_label[class_dir.name]
      records += [(str(p), label) for p in sorted(class_dir.iterdir())
                  if p.suffix.lower() in IMAGE_EXTENSIONS]
    if not records:
      raise FileNotFoundError(f"ImageNet folder split {name!r}: no images under {folder}/<wnid>/")
    _, rows = parse_split(split, lambda name: len(records))
    self._records = tuple(records[rows])
    if not self._records:
      raise ValueError(f"ImageNet folder split {split!r}: the slice selects no images")

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> tuple[str, bytes | None, int]:
    path, label = self._records[index]
    return path, None, label


class TfdsSource:
  """TFDS ``imagenet2012`` (or another image classification data set) through
  ``tfds.data_source``, images as undecoded bytes; ``source[i]`` is (file name, bytes, label).

  Raises:
    FileNotFoundError: the prepared data set is not under ``data_dir`` (TFDS's message, with the
      directory and the preparation command of this module's docstring).
  """

  def __init__(self, name: str, split: str, data_dir: str | None):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (optional path)
    try:
      self._source = tfds.data_source(name, split=split, data_dir=data_dir, download=False,
                                      decoders={"image": tfds.decode.SkipDecoding()})
    except (FileNotFoundError, AssertionError, ValueError, NotImplementedError) as e:
      raise FileNotFoundError(
          f"TFDS {name!r} split {split!r} not prepared under data_dir={data_dir!r}: {e}. "
          f"Prepare it once: tfds build {name} --manual_dir=<tars> --data_dir=<dir> "
          f"--file_format=array_record") from e
    self.name = name

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> tuple[str, bytes, int]:
    record = self._source[index]
    file_name = record.get("file_name", f"{self.name}[{index}]")
    if isinstance(file_name, bytes):
      file_name = file_name.decode()
    return f"{self.name}:{file_name}", record["image"], int(record["label"])


# ---------------------------------------------------------------------------------------------
# Decoding and per-example transforms (picklable for Grain workers).
# ---------------------------------------------------------------------------------------------
class _Decoder:
  """(name, bytes or None, label) -> RGB PIL image, or None (logged, counted) if unreadable."""

  def __init__(self):
    self.num_skipped = 0

  def __call__(self, name: str, data: bytes | None) -> Image.Image | None:
    try:
      if data is None:
        data = pathlib.Path(name).read_bytes()
      with Image.open(io.BytesIO(data)) as image:
        image.load()  # Decodes now, so that a truncated file fails here.
        return image.convert("RGB")
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
      self.num_skipped += 1
      logging.warning("Skipping unreadable image %s (%d skipped so far in this process): %s",
                      name, self.num_skipped, e)
      return None


@dataclasses.dataclass(frozen=True)
class TrainOptions:
  """DeiT's training preprocessing (``augment.train_transform``, ``augment.mixup_cutmix``)."""
  image_size: int = 224
  scale: tuple[float, float] = (0.08, 1.0)
  hflip: float = 0.5
  rand_augment: str | None = "rand-m9-mstd0.5-inc1"
  random_erasing: float = 0.25
  mixup_alpha: float = 0.8
  cutmix_alpha: float = 1.0
  mix_prob: float = 1.0
  mix_switch_prob: float = 0.5
  label_smoothing: float = 0.1
  repeated_augmentation: int = 3

  @property
  def soft_targets(self) -> bool:
    """Whether the targets are distributions (mixing or smoothing on) rather than class ids."""
    mixing = self.mix_prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)
    return mixing or self.label_smoothing > 0


class _TrainExample:
  """Index into the source -> {'images': float32 [S, S, 3], 'labels': int32} or None."""

  def __init__(self, source, options: TrainOptions):
    self._source, self._options = source, options
    self._decode = _Decoder()
    if options.rand_augment:
      augment.parse_rand_augment(options.rand_augment)  # Fail early on a bad spec.

  def __call__(self, index: int, rng: np.random.Generator) -> dict[str, Any] | None:
    name, data, label = self._source[int(index)]
    image = self._decode(name, data)
    if image is None:
      return None
    o = self._options
    x = augment.train_transform(image, o.image_size, rng, scale=tuple(o.scale), hflip=o.hflip,
                                rand_augment_spec=o.rand_augment, erasing_prob=o.random_erasing)
    return {"images": x, "labels": np.int32(label)}


class _MixBatch:
  """{'images', 'labels'} batch -> {'images', 'targets'}: mixup/cutmix/smoothing or class ids."""

  def __init__(self, options: TrainOptions, num_classes: int):
    self._options, self._num_classes = options, num_classes

  def __call__(self, batch: dict[str, np.ndarray], rng: np.random.Generator
               ) -> dict[str, np.ndarray]:
    o = self._options
    if not o.soft_targets:
      return {"images": batch["images"], "targets": batch["labels"].astype(np.int32)}
    images, targets = augment.mixup_cutmix(
        batch["images"], batch["labels"], self._num_classes, rng, mixup_alpha=o.mixup_alpha,
        cutmix_alpha=o.cutmix_alpha, prob=o.mix_prob, switch_prob=o.mix_switch_prob,
        label_smoothing=o.label_smoothing)
    return {"images": images, "targets": targets}


class EpochIndices:
  """This process's endless stream of train indices, epoch after epoch (a Grain data source).

  Epoch e uses ``default_rng([seed, e]).permutation(n)``. With ``repeats`` r > 1 (DeiT's
  RASampler) the permutation's entries are repeated r times in a row; the global list (wrapped
  around to a multiple of ``shard_count``) is dealt round-robin, process p taking positions
  p, p + P, ...; per epoch a process takes floor(n // 256 * 256 / P) entries (r > 1) or
  ceil(n / P) (r = 1, DistributedSampler with padding).

  Raises:
    ValueError: n < 256 with r > 1 (RASampler would select nothing), or r < 1.
  """

  def __init__(self, n: int, seed: int, shard_index: int, shard_count: int, repeats: int):
    if repeats < 1:
      raise ValueError(f"config.dataset.repeated_augmentation must be >= 1; got {repeats}")
    if repeats > 1:
      self.per_epoch = int(math.floor(n // 256 * 256 / shard_count))
      if self.per_epoch < 1:
        raise ValueError(f"repeated augmentation (RASampler) selects floor(n // 256 * 256 / "
                         f"processes) = 0 images per epoch for n={n}; set "
                         f"config.dataset.repeated_augmentation=1")
    else:
      self.per_epoch = -(-n // shard_count)
    self._n, self._seed, self._repeats = n, seed, repeats
    self._shard_index, self._shard_count = shard_index, shard_count

  def __len__(self) -> int:
    return self.per_epoch * _MAX_EPOCHS

  @functools.lru_cache(maxsize=2)
  def _permutation(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self._seed, epoch]).permutation(self._n)

  def __getitem__(self, index: int) -> int:
    epoch, position = divmod(int(index), self.per_epoch)
    global_position = (self._shard_index + position * self._shard_count) % (
        self._n * self._repeats)
    return int(self._permutation(epoch)[global_position // self._repeats])


def _load_eval(source, decoder: _Decoder, size: int, crop_pct: float, index: int
               ) -> tuple[np.ndarray | None, int]:
  name, data, label = source[index]
  image = decoder(name, data)
  return (None if image is None else augment.eval_transform(image, size, crop_pct)), label


# ---------------------------------------------------------------------------------------------
# The Dataset.
# ---------------------------------------------------------------------------------------------
class ImageNetDataset:
  """An ImageNet-style ``clustr_jax.data.Dataset``: train iterator and eval batches of images.

  Args:
    sources: {'train' | 'val' | 'test': random-access source of (name, bytes | None, label)}.
    num_classes: K.
    train_options: the training preprocessing.
    crop_pct: evaluation centre-crop fraction.
    read_threads: decode threads (training without workers, and evaluation).

  Batches: 'images' float32 [batch, S, S, 3] normalised with the ImageNet mean and std; training
  'targets' float32 [batch, K] (mixed / smoothed distributions) or int32 [batch] (class ids when
  mixing and smoothing are off); evaluation 'targets' int32 [batch] and 'weights' float32.
  """
  input_keys = ("images",)

  def __init__(self, sources: Mapping[str, Sequence], num_classes: int,
               train_options: TrainOptions, crop_pct: float = 0.875, read_threads: int = 8):
    self._sources = dict(sources)
    self._num_classes = num_classes
    self._options = train_options
    self._crop_pct = crop_pct
    self._read_threads = read_threads
    self._train_example = _TrainExample(self._sources["train"], train_options)
    self._eval_decoder = _Decoder()

  @property
  def example_spec(self) -> dict[str, tuple[tuple[int, ...], Any]]:
    size = self._options.image_size
    targets = (((self._num_classes,), np.float32) if self._options.soft_targets
               else ((), np.int32))
    return {"images": ((size, size, 3), np.float32), "targets": targets}

  @property
  def model_kwargs(self) -> dict[str, Any]:
    return {"num_classes": self._num_classes}

  @property
  def eval_splits(self) -> tuple[str, ...]:
    return tuple(s for s in self._sources if s != "train")

  @property
  def num_skipped(self) -> int:
    """Unreadable images skipped so far in this process (training in-process and evaluation)."""
    return self._train_example._decode.num_skipped + self._eval_decoder.num_skipped

  def num_examples(self, split: str) -> int:
    return len(self._sources[split])

  def train_iterator(self, *, batch_size: int, seed: int, shard_index: int = 0,
                     shard_count: int = 1, worker_count: int = 0) -> grain.DatasetIterator:
    """The endless, checkpointable iterator of this process's training batches.

    Raises:
      ValueError: ``batch_size`` < 1 or odd with mixup/cutmix, ``worker_count`` < 0, or the
        ``EpochIndices`` errors.
    """
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    if worker_count < 0:
      raise ValueError(f"worker_count must be >= 0; got {worker_count}")
    indices = EpochIndices(len(self._sources["train"]), seed, shard_index, shard_count,
                           self._options.repeated_augmentation)
    dataset = (grain.MapDataset.source(indices)
               .random_map(self._train_example, seed=seed)
               .to_iter_dataset(grain.ReadOptions(num_threads=self._read_threads,
                                                  prefetch_buffer_size=2 * batch_size))
               .filter(lambda example: example is not None)
               .batch(batch_size, drop_remainder=True)
               .random_map(_MixBatch(self._options, self._num_classes), seed=seed + 1))
    if worker_count:
      dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return iter(dataset)

  def eval_batches(self, split: str, *, batch_size: int, shard_index: int = 0,
                   shard_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
    """This process's part of every eval batch of ``split`` (``pipeline.eval_batches`` layout):
    {'images' [batch, S, S, 3], 'targets' int32 [batch], 'weights' float32 [batch]}.

    Raises:
      KeyError: ``split`` is not one of ``eval_splits``.
      ValueError: ``batch_size`` < 1 or ``shard_index`` outside [0, shard_count).
    """
    if split not in self.eval_splits:
      raise KeyError(f"split {split!r} unknown; valid: {', '.join(self.eval_splits)}")
    if batch_size < 1 or not 0 <= shard_index < shard_count:
      raise ValueError(f"eval_batches: batch_size={batch_size} must be >= 1 and shard_index="
                       f"{shard_index} in [0, shard_count={shard_count})")
    source, size = self._sources[split], self._options.image_size
    n, global_size = len(source), batch_size * shard_count
    load = functools.partial(_load_eval, source, self._eval_decoder, size, self._crop_pct)

    def batches() -> Iterator[dict[str, np.ndarray]]:
      with concurrent.futures.ThreadPoolExecutor(self._read_threads) as pool:
        for b in range(-(-n // global_size)):
          start = min(b * global_size + shard_index * batch_size, n)
          stop = min(start + batch_size, n)
          images = np.zeros((batch_size, size, size, 3), np.float32)
          targets = np.zeros((batch_size,), np.int32)
          weights = np.zeros((batch_size,), np.float32)
          for row, (x, label) in enumerate(pool.map(load, range(start, stop))):
            if x is not None:
              images[row], targets[row], weights[row] = x, label, 1.0
          yield {"images": images, "targets": targets, "weights": weights}

    return batches()


def train_options(ds: ml_collections.ConfigDict) -> TrainOptions:
  """``TrainOptions`` from ``config.dataset`` (keys as the fields)."""
  fields = {f.name for f in dataclasses.fields(TrainOptions)}
  values = {k: v for k, v in ds.to_dict().items() if k in fields}
  if "scale" in values:
    values["scale"] = tuple(values["scale"])
  return TrainOptions(**values)


def load_dataset(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> ImageNetDataset:
  """The train loop's ImageNet dataset (``clustr_jax.data.get``) from ``config.dataset``.

  Keys: ``source`` ('folder' | 'tfds'), ``data_dir``, ``tfds_name``, ``classes`` ('imagenet' |
  'folder'), ``splits`` (train / val / test specs), ``crop_pct``, ``read_threads`` and the
  ``TrainOptions`` fields (image_size, scale, hflip, rand_augment, random_erasing, mixup_alpha,
  cutmix_alpha, mix_prob, mix_switch_prob, label_smoothing, repeated_augmentation).

  Raises:
    FileNotFoundError: ``data_dir`` or a split folder is missing (the message names the path),
      or the TFDS data set is not prepared.
    ValueError: an unknown ``source`` / ``classes`` value (naming the key), a bad split spec.
  """
  del workdir  # ImageNet is read in place.
  ds = config.dataset
  if ds.source not in SOURCES:
    raise ValueError(f"config.dataset.source={ds.source!r} unknown; valid: {', '.join(SOURCES)}")
  splits = dict(ds.splits)
  if "train" not in splits:
    raise ValueError(f"config.dataset.splits needs a 'train' entry; got {sorted(splits)}")
  if ds.source == "tfds":
    sources = {role: TfdsSource(ds.tfds_name, spec, ds.data_dir) for role, spec in splits.items()}
    num_classes = NUM_IMAGENET_CLASSES
  else:
    if not ds.data_dir:
      raise ValueError("config.dataset.data_dir must name the ImageNet folder for "
                       "source='folder'")
    root = pathlib.Path(ds.data_dir)
    if not root.is_dir():
      raise FileNotFoundError(f"config.dataset.data_dir={str(root)!r}: directory not found "
                              f"(expected <data_dir>/<split>/<wnid>/*.JPEG)")
    if ds.classes == "imagenet":
      wnids = imagenet_wnids()
    elif ds.classes == "folder":
      train_name = parse_split(splits["train"], lambda name: 0)[0]
      train_dir = root / train_name
      if not train_dir.is_dir():
        raise FileNotFoundError(f"ImageNet folder split {train_name!r}: directory {train_dir} "
                                f"not found")
      wnids = tuple(sorted(p.name for p in train_dir.iterdir() if p.is_dir()))
    else:
      raise ValueError(f"config.dataset.classes={ds.classes!r} unknown; valid: "
                       f"{', '.join(CLASS_MODES)}")
    class_to_label = {wnid: i for i, wnid in enumerate(wnids)}
    sources = {role: FolderSource(root, spec, class_to_label) for role, spec in splits.items()}
    num_classes = len(wnids)
  for role, source in sources.items():
    logging.info("ImageNet %s: %s, %d images", role, splits[role], len(source))
  return ImageNetDataset(sources, num_classes, train_options(ds), crop_pct=ds.crop_pct,
                         read_threads=ds.get("read_threads", 8))
