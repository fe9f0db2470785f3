"""Semantic segmentation input shared by ``ade20k`` and ``camvid``: image/label pairs read and
checked, mmsegmentation's training augmentation and evaluation resize (numpy and Pillow), Grain
pipelines; see ``docs/segmentation.md``.

Pairs: (image file, label file): the image any RGB-convertible file, the label a single-channel
8-bit PNG. A dataset's ``label_map`` (uint8 value -> class id, ``IGNORE`` or ``INVALID``) turns
the stored values into class ids 0..K-1 and ``IGNORE`` (255: no loss, no metric); a stored value
mapped to ``INVALID``, an image and label of different sizes, or a missing file of a pair raise
an error naming the file.

Training (mmsegmentation ``configs/_base_/datasets/ade20k.py`` as PVT's Semantic FPN uses it;
``mmseg/datasets/pipelines/transforms.py``), per example with its own generator:
  1. ``Resize(img_scale=scale, ratio_range=(0.5, 2.0))``: r ~ U(ratio_range), the image rescaled
     with its aspect kept by f = min(r max(scale) / long side, r min(scale) / short side), size
     int(w f + 0.5) x int(h f + 0.5) (image bilinear, label nearest);
  2. ``RandomCrop(crop_size, cat_max_ratio=0.75)``: up to 10 draws of a crop offset (uniform over
     the valid offsets) until no class covers cat_max_ratio or more of the crop's labelled pixels
     (with at least 2 classes); otherwise the last draw;
  3. ``RandomFlip(prob=0.5)``: horizontal;
  4. ``PhotoMetricDistortion``: each with probability 1/2: brightness + U(-32, 32); contrast x
     U(0.5, 1.5) (before or after the HSV steps, chosen with probability 1/2); saturation x
     U(0.5, 1.5); hue + randint[-18, 18] of OpenCV's 180 steps (Pillow's HSV has 256 steps:
     the shift is scaled by 256 / 180 and rounded); values clipped to [0, 255] after each step;
  5. ``Normalize`` (ImageNet mean and std, RGB) and ``Pad`` to crop_size (image 0, label 255).
Evaluation (PVT's ``AlignResize``, whole-image test): the image rescaled with its aspect kept by
f = min(max(eval_scale) / long side, min(eval_scale) / short side), fitted into the ``eval_size``
canvas if larger, then each side rounded up to a multiple of ``size_divisor`` (32; within the
canvas) (image bilinear, label nearest), normalised and padded to ``eval_size`` (image 0, label
255). Metrics are computed at this resolution (mmsegmentation resizes the prediction back to the
original size instead).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import pathlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import grain
import numpy as np
from absl import logging
from PIL import Image

#: The ignore label of the targets.
IGNORE = 255
#: ``label_map`` entry of a stored value that is an error.
INVALID = -1
#: ImageNet mean and std on 0..255 (mmsegmentation's ``img_norm_cfg``).
MEAN = np.array([123.675, 116.28, 103.53], np.float32)
STD = np.array([58.395, 57.12, 57.375], np.float32)


@dataclasses.dataclass(frozen=True)
class Pair:
  """One example: the image file and its label file (paths as str)."""
  image: str
  label: str


def pairs_in(image_dir: pathlib.Path, label_dir: pathlib.Path, image_suffixes: Sequence[str],
             what: str) -> tuple[Pair, ...]:
  """The pairs of ``image_dir/<stem><suffix>`` and ``label_dir/<stem>.png``, sorted by stem.

  Raises:
    FileNotFoundError: a folder is missing, holds no images, or an image has no label file or
      a label file no image (the message names the file and ``what``, e.g. 'ADE20K training').
  """
  for folder in (image_dir, label_dir):
    if not folder.is_dir():
      raise FileNotFoundError(f"{what}: directory {folder} not found")
  images = {p.stem: p for p in image_dir.iterdir() if p.suffix.lower() in image_suffixes}
  labels = {p.stem: p for p in label_dir.iterdir() if p.suffix.lower() == ".png"}
  if not images:
    raise FileNotFoundError(f"{what}: no images ({', '.join(image_suffixes)}) in {image_dir}")
  for stem in sorted(set(images) - set(labels)):
    raise FileNotFoundError(f"{what}: image {images[stem]} has no label file "
                            f"{label_dir / (stem + '.png')}")
  for stem in sorted(set(labels) - set(images)):
    raise FileNotFoundError(f"{what}: label file {labels[stem]} has no image in {image_dir}")
  return tuple(Pair(str(images[s]), str(labels[s])) for s in sorted(images))


def read_pair(pair: Pair, label_map: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Decodes and checks one pair.

  Args:
    pair: the files.
    label_map: int16 [256]: stored value -> class id, ``IGNORE`` or ``INVALID``.

  Returns:
    (image uint8 [H, W, 3] RGB, labels uint8 [H, W]: class ids and ``IGNORE``).

  Raises:
    FileNotFoundError: a file of the pair is missing.
    ValueError: an unreadable file, a label file that is not single-channel 8-bit, sizes that
      differ, or stored label values mapped to ``INVALID`` (the message names the file and the
      values).
  """
  for path in (pair.image, pair.label):
    if not pathlib.Path(path).is_file():
      raise FileNotFoundError(f"segmentation pair: {path} not found (pair {pair})")
  try:
    with Image.open(pair.image) as image:
      rgb = np.asarray(image.convert("RGB"))
    with Image.open(pair.label) as label:
      if label.mode not in ("L", "P"):
        raise ValueError(f"label file {pair.label}: mode {label.mode!r}, expected single-channel "
                         f"8-bit ('L' or 'P')")
      stored = np.asarray(label)
  except (OSError, SyntaxError, Image.DecompressionBombError) as e:
    raise ValueError(f"segmentation pair {pair}: unreadable: {e}") from e
  if rgb.shape[:2] != stored.shape:
    raise ValueError(f"label file {pair.label}: size {stored.shape[1]}x{stored.shape[0]} "
                     f"differs from its image {pair.image} ({rgb.shape[1]}x{rgb.shape[0]})")
  mapped = label_map[stored]
  if (mapped == INVALID).any():
    bad = sorted(set(np.unique(stored[mapped == INVALID]).tolist()))
    raise ValueError(f"label file {pair.label}: values {bad} out of range (valid stored "
                     f"values: {np.flatnonzero(label_map != INVALID).tolist()})")
  return rgb, mapped.astype(np.uint8)


def _rescale(image: np.ndarray, labels: np.ndarray, size: tuple[int, int]
             ) -> tuple[np.ndarray, np.ndarray]:
  """Resizes to (height, width): image bilinear, labels nearest."""
  height, width = size
  if image.shape[:2] == (height, width):
    return image, labels
  image = np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))
  labels = np.asarray(Image.fromarray(labels).resize((width, height), Image.NEAREST))
  return image, labels


def keep_ratio_size(height: int, width: int, scale: Sequence[float]) -> tuple[int, int]:
  """mmcv ``rescale_size`` with ``keep_ratio``: f = min(max(scale) / max(h, w), min(scale) /
  min(h, w)), the size (int(h f + 0.5), int(w f + 0.5))."""
  factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
  return int(height * factor + 0.5), int(width * factor + 0.5)


def random_crop_box(labels: np.ndarray, crop: tuple[int, int], cat_max_ratio: float,
                    rng: np.random.Generator) -> tuple[int, int]:
  """mmsegmentation ``RandomCrop``'s top-left corner (see the module docstring, step 2)."""
  height, width = labels.shape
  for _ in range(10):
    top = int(rng.integers(0, max(height - crop[0], 0) + 1))
    left = int(rng.integers(0, max(width - crop[1], 0) + 1))
    if cat_max_ratio >= 1.0:
      break
    values, counts = np.unique(labels[top:top + crop[0], left:left + crop[1]],
                               return_counts=True)
    counts = counts[values != IGNORE]
    if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
      break
  return top, left


def _convert(x: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
  return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def photometric_distortion(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """mmsegmentation ``PhotoMetricDistortion`` on uint8 RGB [H, W, 3] (module docstring, step
  4) -> uint8 [H, W, 3]."""
  if rng.integers(2):
    image = _convert(image, beta=rng.uniform(-32, 32))
  contrast_first = bool(rng.integers(2))
  if contrast_first and rng.integers(2):
    image = _convert(image, alpha=rng.uniform(0.5, 1.5))
  saturate, hue = bool(rng.integers(2)), bool(rng.integers(2))
  alpha = rng.uniform(0.5, 1.5) if saturate else 1.0
  delta = int(rng.integers(-18, 19)) if hue else 0
  if saturate or hue:
    hsv = np.array(Image.fromarray(image).convert("HSV"))
    if saturate:
      hsv[..., 1] = _convert(hsv[..., 1], alpha=alpha)
    if hue:
      hsv[..., 0] = (hsv[..., 0].astype(np.int32) + round(delta * 256 / 180)) % 256
    image = np.asarray(Image.fromarray(hsv, "HSV").convert("RGB"))
  if not contrast_first and rng.integers(2):
    image = _convert(image, alpha=rng.uniform(0.5, 1.5))
  return image


def _normalise_and_pad(image: np.ndarray, labels: np.ndarray, size: tuple[int, int]
                       ) -> tuple[np.ndarray, np.ndarray]:
  out_image = np.zeros((*size, 3), np.float32)
  out_labels = np.full(size, IGNORE, np.int32)
  height, width = labels.shape
  out_image[:height, :width] = (image.astype(np.float32) - MEAN) / STD
  out_labels[:height, :width] = labels
  return out_image, out_labels


@dataclasses.dataclass(frozen=True)
class Options:
  """The augmentation and evaluation settings (``config.dataset`` keys of the same names).

  scale: (long, short) base of the random resize (ADE20K: (2048, 512)); ratio_range: its
  factor's range; crop_size: (h, w) train crop; cat_max_ratio: ``RandomCrop``'s; hflip: flip
  probability; photometric: ``PhotoMetricDistortion`` on/off; eval_scale: (long, short) of the
  evaluation resize; eval_size: (h, w) evaluation canvas; size_divisor: evaluation sides'
  multiple.
  """
  scale: tuple[int, int] = (2048, 512)
  ratio_range: tuple[float, float] = (0.5, 2.0)
  crop_size: tuple[int, int] = (512, 512)
  cat_max_ratio: float = 0.75
  hflip: float = 0.5
  photometric: bool = True
  eval_scale: tuple[int, int] = (2048, 512)
  eval_size: tuple[int, int] = (512, 2048)
  size_divisor: int = 32


def train_transform(image: np.ndarray, labels: np.ndarray, options: Options,
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """One training example (module docstring, steps 1-5).

  Args:
    image: uint8 [H, W, 3] RGB; labels: uint8 [H, W] class ids and ``IGNORE``.

  Returns:
    (image float32 [crop_h, crop_w, 3] normalised, labels int32 [crop_h, crop_w]).
  """
  ratio = rng.uniform(*options.ratio_range)
  scale = (options.scale[0] * ratio, options.scale[1] * ratio)
  image, labels = _rescale(image, labels, keep_ratio_size(*labels.shape, scale))
  crop = tuple(options.crop_size)
  top, left = random_crop_box(labels, crop, options.cat_max_ratio, rng)
  image = image[top:top + crop[0], left:left + crop[1]]
  labels = labels[top:top + crop[0], left:left + crop[1]]
  if rng.uniform() < options.hflip:
    image, labels = image[:, ::-1], labels[:, ::-1]
  if options.photometric:
    image = photometric_distortion(np.ascontiguousarray(image), rng)
  return _normalise_and_pad(image, labels, crop)


def eval_transform(image: np.ndarray, labels: np.ndarray, options: Options
                   ) -> tuple[np.ndarray, np.ndarray]:
  """One evaluation example (module docstring): (image float32 [*eval_size, 3], labels int32
  [*eval_size], ``IGNORE`` outside the resized image)."""
  canvas = tuple(options.eval_size)
  height, width = keep_ratio_size(*labels.shape, options.eval_scale)
  fit = min(1.0, canvas[0] / height, canvas[1] / width)
  d = options.size_divisor
  size = tuple(min(-(-int(s * fit) // d) * d, c) for s, c in zip((height, width), canvas))
  image, labels = _rescale(image, labels, size)
  return _normalise_and_pad(image, labels, canvas)


class _TrainExample:
  """Index -> {'images': float32 [h, w, 3], 'targets': int32 [h, w]} (picklable)."""

  def __init__(self, pairs: Sequence[Pair], label_map: np.ndarray, options: Options):
    self._pairs, self._label_map, self._options = tuple(pairs), label_map, options

  def __call__(self, index: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    image, labels = read_pair(self._pairs[int(index)], self._label_map)
    x, y = train_transform(image, labels, self._options, rng)
    return {"images": x, "targets": y}


def _load_eval(pairs, label_map, options, index):
  return eval_transform(*read_pair(pairs[index], label_map), options)


class SegmentationDataset:
  """A ``clustr_jax.data.Dataset`` of image/label pairs with ``task = 'segmentation'``.

  Args:
    splits: {'train' | 'val' | 'test': pairs}.
    label_map: int16 [256] stored value -> class id / ``IGNORE`` / ``INVALID``.
    num_classes: K.
    options: ``Options``.
    read_threads: decode threads.

  Batches: 'images' float32 [batch, h, w, 3] (train: crop_size; eval: eval_size), 'targets' int32
  [batch, h, w] (class ids, 255 ignored), evaluation also 'weights' float32 [batch].
  """
  input_keys = ("images",)
  task = "segmentation"

  def __init__(self, splits: Mapping[str, Sequence[Pair]], label_map: np.ndarray,
               num_classes: int, options: Options, read_threads: int = 8):
    if "train" not in splits:
      raise ValueError(f"segmentation splits need 'train'; got {sorted(splits)}")
    self._splits = {k: tuple(v) for k, v in splits.items()}
    self._label_map, self._num_classes = label_map, num_classes
    self._options, self._read_threads = options, read_threads

  @property
  def example_spec(self) -> dict[str, tuple[tuple[int, ...], Any]]:
    crop = tuple(self._options.crop_size)
    return {"images": ((*crop, 3), np.float32), "targets": (crop, np.int32)}

  @property
  def model_kwargs(self) -> dict[str, Any]:
    return {"num_classes": self._num_classes}

  @property
  def eval_splits(self) -> tuple[str, ...]:
    return tuple(s for s in self._splits if s != "train")

  def pairs(self, split: str) -> tuple[Pair, ...]:
    """The pairs of ``split`` in order."""
    return self._splits[split]

  def train_iterator(self, *, batch_size: int, seed: int, shard_index: int = 0,
                     shard_count: int = 1, worker_count: int = 0) -> grain.DatasetIterator:
    """Endless, checkpointable batches of this process's shard (examples shard_index::
    shard_count, a new seeded order each epoch, per-example augmentation generators).

    Raises:
      ValueError: ``batch_size`` < 1, ``worker_count`` < 0 or a shard smaller than a batch.
    """
    pairs = self._splits["train"]
    indices = grain.MapDataset.range(len(pairs))[shard_index::shard_count]
    if batch_size < 1 or worker_count < 0 or len(indices) < batch_size:
      raise ValueError(f"segmentation train_iterator: batch_size={batch_size} must be in [1, "
                       f"{len(indices)}] (the shard's examples), worker_count={worker_count} >= 0")
    dataset = (indices.shuffle(seed=seed).repeat()
               .random_map(_TrainExample(pairs, self._label_map, self._options), seed=seed)
               .batch(batch_size, drop_remainder=True)
               .to_iter_dataset(grain.ReadOptions(num_threads=self._read_threads,
                                                  prefetch_buffer_size=2)))
    if worker_count:
      dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return iter(dataset)

  def eval_batches(self, split: str, *, batch_size: int, shard_index: int = 0,
                   shard_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
    """This process's part of every eval batch of ``split`` (``pipeline.eval_batches`` layout;
    padding rows have weight 0 and all-ignore targets).

    Raises:
      KeyError: ``split`` is not one of ``eval_splits``.
      ValueError: ``batch_size`` < 1 or ``shard_index`` outside [0, shard_count).
    """
    if split not in self.eval_splits:
      raise KeyError(f"split {split!r} unknown; valid: {', '.join(self.eval_splits)}")
    if batch_size < 1 or not 0 <= shard_index < shard_count:
      raise ValueError(f"eval_batches: batch_size={batch_size} must be >= 1 and shard_index="
                       f"{shard_index} in [0, shard_count={shard_count})")
    pairs, canvas = self._splits[split], tuple(self._options.eval_size)
    n, global_size = len(pairs), batch_size * shard_count
    load = functools.partial(_load_eval, pairs, self._label_map, self._options)

    def batches() -> Iterator[dict[str, np.ndarray]]:
      with concurrent.futures.ThreadPoolExecutor(self._read_threads) as pool:
        for b in range(-(-n // global_size)):
          start = min(b * global_size + shard_index * batch_size, n)
          stop = min(start + batch_size, n)
          images = np.zeros((batch_size, *canvas, 3), np.float32)
          targets = np.full((batch_size, *canvas), IGNORE, np.int32)
          weights = np.zeros((batch_size,), np.float32)
          for row, (x, y) in enumerate(pool.map(load, range(start, stop))):
            images[row], targets[row], weights[row] = x, y, 1.0
          yield {"images": images, "targets": targets, "weights": weights}

    return batches()


def options_from(ds) -> Options:
  """``Options`` from ``config.dataset`` (keys as the fields; tuples from lists)."""
  fields = {f.name for f in dataclasses.fields(Options)}
  values = {k: (tuple(v) if isinstance(v, (list, tuple)) else v)
            for k, v in ds.to_dict().items() if k in fields}
  return Options(**values)


def check_data_dir(ds, layout: str) -> pathlib.Path:
  """``config.dataset.data_dir`` as a path.

  Raises:
    ValueError: it is empty; FileNotFoundError: it is not a directory (``layout`` says what it
      should hold).
  """
  if not ds.data_dir:
    raise ValueError(f"config.dataset.data_dir must name the {ds.name} folder ({layout})")
  root = pathlib.Path(ds.data_dir)
  if not root.is_dir():
    raise FileNotFoundError(f"config.dataset.data_dir={str(root)!r}: directory not found "
                            f"(expected {layout})")
  return root


def dataset_from_config(ds, title: str, layout: str,
                        split_pairs: Callable[[pathlib.Path, str], Sequence[Pair]],
                        label_map: np.ndarray, num_classes: int) -> SegmentationDataset:
  """A family's train-loop dataset from ``config.dataset`` (``ds``): ``data_dir`` (checked
  against ``layout``), ``splits`` (role -> folder, listed by ``split_pairs(root, folder)``),
  ``read_threads`` and the ``Options`` keys; ``title`` names the family in the log.

  Raises:
    ValueError: no ``data_dir``; FileNotFoundError: missing folders or pairs (named).
  """
  root = check_data_dir(ds, layout)
  splits = {role: split_pairs(root, folder) for role, folder in dict(ds.splits).items()}
  for role, pairs in splits.items():
    logging.info("%s %s: %s, %d pairs", title, role, ds.splits[role], len(pairs))
  return SegmentationDataset(splits, label_map, num_classes, options_from(ds), ds.read_threads)
