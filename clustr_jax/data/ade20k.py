"""ADE20K / SceneParse150 in its released layout (``ADEChallengeData2016``) for semantic
segmentation; see ``docs/segmentation.md`` ("Data").

  <data_dir>/images/{training,validation}/ADE_*.jpg       RGB JPEG
  <data_dir>/annotations/{training,validation}/ADE_*.png  8-bit single channel

Labels (mmsegmentation's ``reduce_zero_label=True``): stored 1..150 -> classes 0..149, stored 0
('other') and 255 (padding, e.g. of pre-padded copies) -> ignored (255); any other value is an
error naming the file. The 150 class names are ``objectInfo150.txt`` of the official dev kit
(``CSAILVision/sceneparsing``). Splits (``config.dataset.splits``): role -> folder name
('training', 'validation'; the test role reads 'validation' as PVT's recipe). Preparing the
data: the official ``ADEChallengeData2016.zip`` unpacked as is.
"""

from __future__ import annotations

import pathlib

import ml_collections
import numpy as np

from clustr_jax.data import segmentation

NUM_CLASSES = 150
#: Stored value -> class id (``segmentation.read_pair``'s label_map).
LABEL_MAP = np.full(256, segmentation.INVALID, np.int16)
LABEL_MAP[0] = segmentation.IGNORE
LABEL_MAP[1:NUM_CLASSES + 1] = np.arange(NUM_CLASSES)
LABEL_MAP[255] = segmentation.IGNORE
LAYOUT = "<data_dir>/images/<split>/*.jpg and <data_dir>/annotations/<split>/*.png"


def split_pairs(root: str | pathlib.Path, split: str) -> tuple[segmentation.Pair, ...]:
  """The (image, annotation) pairs of ``root/images/<split>`` (sorted).

  Raises:
    FileNotFoundError: a missing folder, or an image or annotation without its pair (named).
  """
  root = pathlib.Path(root)
  return segmentation.pairs_in(root / "images" / split, root / "annotations" / split,
                               (".jpg", ".jpeg", ".png"), f"ADE20K {split}")


def load_dataset(config: ml_collections.ConfigDict, workdir: pathlib.Path
                 ) -> segmentation.SegmentationDataset:
  """The train loop's ADE20K (``clustr_jax.data.get``) from ``config.dataset``: ``data_dir``,
  ``splits`` (role -> folder), ``read_threads`` and the ``segmentation.Options`` keys.

  Raises:
    ValueError: no ``data_dir``; FileNotFoundError: missing folders or pairs.
  """
  del workdir  # Read in place.
  return segmentation.dataset_from_config(config.dataset, "ADE20K", LAYOUT, split_pairs,
                                          LABEL_MAP, NUM_CLASSES)
