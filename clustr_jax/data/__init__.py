"""Datasets: released file formats, the generators that benchmarks publish, Grain pipelines.

Each dataset's ``config.dataset.name`` is the name of its module (or package) here:

``listops``     LRA ListOps: the generator, the TSV release reader, the train-loop adapter and a
                ``python -m`` command line (package).
``text``        LRA Text: IMDb at byte level (aclImdb folders or TFDS ``imdb_reviews``).
``retrieval``   LRA Retrieval: AAN document pairs at byte level (the release's TSVs), two inputs.
``image``       LRA Image: grayscale CIFAR-10 as pixel tokens (binary release or TFDS ``cifar10``).
``pathfinder``  LRA Pathfinder and Path-X: the generator, the release-layout reader, the
                train-loop adapter and a ``python -m`` command line (package).
``imagenet``    ImageNet (TFDS ``imagenet2012`` or an ImageNet-layout folder) with DeiT's
                preprocessing; ``augment`` its timm-semantics augmentations (numpy and Pillow).
``ade20k``      ADE20K (SceneParse150, released layout) for semantic segmentation.
``camvid``      CamVid (SegNet release) for semantic segmentation; both share ``segmentation``
                (pair reader, mmsegmentation's augmentation, the segmentation Dataset).

Shared parts: ``pipeline``, deterministic, per-process sharded, checkpointable Grain train and
eval iterators; ``generated``, "generate on process 0, the other processes wait".

The train loop sees a dataset only through ``get(config, workdir) -> Dataset`` (below): the
module ``clustr_jax.data.<config.dataset.name>`` defines ``load_dataset(config, workdir) ->
Dataset``. Adding a dataset: one module (or package) with that function and its name in
``NAMES``. The names before the modules were named after them (``imdb``, ``aan``, ``cifar10``)
raise an error that gives the new name.
"""

from __future__ import annotations

import dataclasses
import importlib
import pathlib
from collections.abc import Iterator, Mapping
from typing import Any, Protocol

import grain
import ml_collections
import numpy as np

from clustr_jax.data import pipeline

# config.dataset.name values; each is a module (or package) of this package defining
# load_dataset(config, workdir), imported when first asked for.
NAMES: tuple[str, ...] = ("listops", "text", "retrieval", "image", "pathfinder", "imagenet",
                          "ade20k", "camvid")
# Former names -> the current ones (``get`` raises an error naming the new one).
RENAMED: dict[str, str] = {"imdb": "text", "aan": "retrieval", "cifar10": "image"}


class Dataset(Protocol):
  """What the train loop needs from a dataset (``train.train_and_evaluate``).

  Attributes:
    input_keys: the batch keys passed to the model, in order:
      ``model.apply(variables, *(batch[k] for k in input_keys), train=...)``.
    example_spec: ``{key: (shape, dtype)}`` of one example for every batch key the train
      iterator yields (the model's inputs and ``'targets'``); used to build the model.
    model_kwargs: constructor defaults the data decides (e.g. ``vocab_size``, ``num_classes``,
      ``max_length``); the config's ``model`` section overrides them.
    eval_splits: the splits ``eval_batches`` serves; the loop validates on ``'val'`` during
      training and tests on ``'test'`` at the end.
    task: optional, 'classification' when absent; 'segmentation' for per-pixel 'targets'
      [batch, h, w] (``losses.TASKS``: the loop's loss and metrics).
  """
  input_keys: tuple[str, ...]
  example_spec: Mapping[str, tuple[tuple[int, ...], Any]]
  model_kwargs: Mapping[str, Any]
  eval_splits: tuple[str, ...]

  def train_iterator(self, *, batch_size: int, seed: int, shard_index: int, shard_count: int,
                     worker_count: int) -> grain.DatasetIterator:
    """Endless, checkpointable iterator of this process's training batches (``get_state`` /
    ``set_state``): ``{key: array [batch_size, ...]}``."""

  def eval_batches(self, split: str, *, batch_size: int, shard_index: int,
                   shard_count: int) -> Iterator[dict[str, np.ndarray]]:
    """This process's part of every batch of ``split``, each example once, plus a float32
    ``'weights'`` key (1 real row, 0 padding); the same number of batches on every process."""


@dataclasses.dataclass(frozen=True)
class ArrayDataset:
  """A ``Dataset`` held in memory as numpy arrays (every LRA task): ``pipeline`` does the rest.

  Args:
    splits: ``{'train'|'val'|'test'|...: {key: array [n, ...]}}``, every split with the same keys,
      ``'targets'`` among them.
    input_keys: the model's input keys, e.g. ``('inputs',)`` or ``('inputs1', 'inputs2')``.
    model_kwargs: see ``Dataset``.

  Raises:
    ValueError: no 'train' split, a split without 'targets' or an input key, or splits whose keys
      differ.
  """
  splits: Mapping[str, Mapping[str, np.ndarray]]
  input_keys: tuple[str, ...] = ("inputs",)
  model_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    if "train" not in self.splits:
      raise ValueError(f"ArrayDataset: no 'train' split; got splits {sorted(self.splits)}")
    keys = set(self.splits["train"])
    for split, arrays in self.splits.items():
      missing = sorted({"targets", *self.input_keys} - set(arrays))
      if missing:
        raise ValueError(f"ArrayDataset: split {split!r} lacks key(s) {missing}; has "
                         f"{sorted(arrays)}")
      if set(arrays) != keys:
        raise ValueError(f"ArrayDataset: split {split!r} has keys {sorted(arrays)}, 'train' has "
                         f"{sorted(keys)}")

  @property
  def example_spec(self) -> dict[str, tuple[tuple[int, ...], Any]]:
    return {k: (tuple(v.shape[1:]), v.dtype) for k, v in self.splits["train"].items()}

  @property
  def eval_splits(self) -> tuple[str, ...]:
    return tuple(s for s in self.splits if s != "train")

  def train_iterator(self, *, batch_size: int, seed: int, shard_index: int = 0,
                     shard_count: int = 1, worker_count: int = 0) -> grain.DatasetIterator:
    """``pipeline.train_iterator`` over the train split."""
    return pipeline.train_iterator(self.splits["train"], batch_size=batch_size, seed=seed,
                                   shard_index=shard_index, shard_count=shard_count,
                                   worker_count=worker_count)

  def eval_batches(self, split: str, *, batch_size: int, shard_index: int = 0,
                   shard_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
    """``pipeline.eval_batches`` over ``split``.

    Raises:
      KeyError: ``split`` is not one of ``eval_splits``.
    """
    if split not in self.eval_splits:
      raise KeyError(f"split {split!r} unknown; valid: {', '.join(self.eval_splits)}")
    return pipeline.eval_batches(self.splits[split], batch_size=batch_size,
                                 shard_index=shard_index, shard_count=shard_count)


def describe_differences(stored: Mapping[str, Any], requested: Mapping[str, Any]) -> str:
  """``'key: stored X vs requested Y, ...'`` for the keys whose values differ (sorted), for the
  error a generator raises when its output directory holds data made with other parameters."""
  return ", ".join(f"{k}: stored {stored.get(k)!r} vs requested {requested.get(k)!r}"
                   for k in sorted(set(stored) | set(requested))
                   if stored.get(k) != requested.get(k))


def names() -> tuple[str, ...]:
  """The dataset names (``config.dataset.name``), ``NAMES``."""
  return NAMES


def get(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> Dataset:
  """Loads the dataset that ``config.dataset`` describes (generating or preparing it if asked).

  Args:
    config: the whole run config; ``config.dataset.name`` (one of ``NAMES``) picks the module
      ``clustr_jax.data.<name>``.
    workdir: the run's directory (default place for generated data).

  Raises:
    ValueError: a former name (``RENAMED``; the message gives the new one, e.g.
      "config.dataset.name='cifar10' was renamed to 'image'"), an unknown
      ``config.dataset.name`` (the message lists the valid names); the dataset's own errors
      (missing files with their paths, malformed records with file and line).
  """
  name = config.dataset.name
  if name in RENAMED:
    raise ValueError(f"config.dataset.name={name!r} was renamed to {RENAMED[name]!r} (dataset "
                     f"names are the module names in clustr_jax/data/); valid: {', '.join(NAMES)}")
  if name not in NAMES:
    raise ValueError(f"config.dataset.name={name!r} unknown; valid: {', '.join(NAMES)}")
  module = importlib.import_module(f"{__name__}.{name}")
  return module.load_dataset(config, pathlib.Path(workdir))
