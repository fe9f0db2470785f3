"""The train loop's Pathfinder / Path-X adapter: ``load_dataset`` (``clustr_jax.data.get``,
``config.dataset.name='pathfinder'``), and LRA's train / val / test ``split``.

Splits: LRA takes TFDS ``[:80%]`` / ``[80%:90%]`` / ``[90%:]`` of a Beam-built order that cannot
be rebuilt; ``split`` shuffles all images with a seeded permutation (as S4's reader) and takes
80% / 10% / 10%.

Tokens are the raw pixel values 0..255 (vocabulary 256, not normalised, LRA ``normalize=False``),
flattened row-major to ``resolution ** 2``. LRA's encoder treats token 0 as padding (mask
``inputs > 0``), so black pixels take no part in attention: that quirk belongs to the model
(``clustr_jax/models/lra.py`` field ``zero_is_padding``, on in the faithful configs).
"""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np

from clustr_jax import data as data_lib
from clustr_jax.data import generated
from clustr_jax.data.pathfinder import generator, release

NUM_CLASSES = 2
VOCAB_SIZE = 256  # Pixel values are the token ids.
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)  # LRA: train [:80%], val [80%:90%], test [90%:].


def split(images: np.ndarray, labels: np.ndarray, *,
          seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
  """LRA's 80/10/10 train/val/test split after a seeded permutation (see the module docstring).

  Args:
    images: uint8 [n, h, w]; labels: int32 [n].
    seed: the permutation's seed (``numpy.random.default_rng``).

  Returns:
    ``{'train'|'val'|'test': {'inputs': uint8 [k, h * w] (row-major pixels), 'targets':
    int32 [k]}}`` with k = floor(0.8 n), floor(0.9 n) - floor(0.8 n) and the rest.

  Raises:
    ValueError: fewer than 10 images, or images and labels of different lengths.
  """
  n = len(images)
  if n != len(labels) or n < 10:
    raise ValueError(f"split needs as many labels as images and at least 10 of them; got "
                     f"{n} images and {len(labels)} labels")
  order = np.random.default_rng(seed).permutation(n)
  bounds = np.floor(np.cumsum(SPLIT_FRACTIONS)[:2] * n).astype(int)
  parts = np.split(order, bounds)
  flat = images.reshape(n, -1)
  return {name: {"inputs": flat[part], "targets": labels[part].astype(np.int32)}
          for name, part in zip(("train", "val", "test"), parts)}



def _generator_params(ds, resolution: int) -> tuple[generator.PathfinderParams, dict]:
  """(``PathfinderParams``, ``ensure_generated``'s other arguments) from ``ds.generator``.

  Raises:
    ValueError: a key that is neither a ``PathfinderParams`` field (``window_size`` excluded: it
      is ``resolution``) nor ``num_images``, ``images_per_batch``, ``seed``, ``workers`` (the
      message lists the valid keys); ``PathfinderParams``' own checks.
  """
  settings = ds.generator.to_dict()
  run = {k: settings.pop(k) for k in ("num_images", "images_per_batch", "seed", "workers")
         if k in settings}
  fields = {f.name for f in dataclasses.fields(generator.PathfinderParams)} - {"window_size"}
  unknown = sorted(set(settings) - fields)
  if unknown:
    raise ValueError(f"config.dataset.generator has unknown key(s) {unknown}; valid: "
                     f"{', '.join(sorted(fields | set(run)))}")
  return generator.PathfinderParams(window_size=resolution, **settings), run


def load_dataset(config, workdir: pathlib.Path) -> data_lib.ArrayDataset:
  """The train loop's Pathfinder / Path-X dataset (``clustr_jax.data.get``) from ``config.dataset``.

  Keys: ``resolution`` (image side), ``data_dir`` (the set's root; default
  ``<workdir>/data/pathfinder<resolution>``), ``generate`` (render the set first, with
  ``generator``: the ``PathfinderParams`` fields except ``window_size``, plus ``num_images``,
  ``images_per_batch``, ``seed``, ``workers``; process 0 renders it,
  ``generator.ensure_generated``, while the others wait, ``generated.generate_once``),
  ``split_seed`` (``split``'s permutation).

  Returns:
    An ``ArrayDataset`` of ``{'inputs': uint8 [n, resolution ** 2], 'targets': int32 [n]}`` per
    split, with model defaults ``vocab_size`` 256, ``num_classes`` 2, ``max_length``.

  Raises:
    ValueError: ``max_length`` other than ``resolution ** 2``, a ``generator`` key that is not a
      parameter (the message names it; raised on every process), bad parameter values; and as
      ``generator.ensure_generated``, ``release.read_release`` and ``split``.
    TimeoutError, RuntimeError: as ``generated.generate_once`` (a process other than 0, when
      process 0 does not finish or fails).
  """
  ds = config.dataset
  resolution = int(ds.resolution)
  if ds.get("max_length", resolution * resolution) != resolution * resolution:
    raise ValueError(f"config.dataset.max_length={ds.max_length} must be resolution ** 2 = "
                     f"{resolution * resolution} (config.dataset.resolution={resolution})")
  data_dir = (pathlib.Path(ds.data_dir) if ds.data_dir
              else workdir / "data" / f"pathfinder{resolution}")
  if ds.generate:
    params, run = _generator_params(ds, resolution)
    generated.generate_once(data_dir, lambda: generator.ensure_generated(
        data_dir, params, progress=True, **run))
  images, labels = release.read_release(data_dir, resolution, progress=True)
  return data_lib.ArrayDataset(
      split(images, labels, seed=ds.split_seed),
      model_kwargs={"vocab_size": VOCAB_SIZE, "num_classes": NUM_CLASSES,
                    "max_length": resolution * resolution})
