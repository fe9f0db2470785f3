"""The train loop's ListOps adapter: ``load_dataset`` (``clustr_jax.data.get``, name 'listops')."""

from __future__ import annotations

import pathlib

from clustr_jax import data as data_lib
from clustr_jax.data import generated
from clustr_jax.data.listops import generator, release


def load_dataset(config, workdir: pathlib.Path) -> data_lib.ArrayDataset:
  """The train loop's ListOps dataset (``clustr_jax.data.get``) from ``config.dataset``.

  Reads ``{task}_{train,val,test}.tsv`` from ``config.dataset.data_dir`` (default
  ``<workdir>/data/listops``), first generating them on process 0 with
  ``config.dataset.generator`` (``generator.ensure_generated``; the other processes wait,
  ``generated.generate_once``) when ``config.dataset.generate`` is set.

  Returns:
    An ``ArrayDataset`` of ``{'inputs': int32 [n, max_length], 'targets': int32 [n]}`` per split,
    with model defaults ``vocab_size``, ``num_classes`` and ``max_length``.

  Raises:
    FileNotFoundError, ValueError: as ``release.load_splits`` and
      ``generator.ensure_generated``. TimeoutError, RuntimeError: as ``generated.generate_once``
      (a process other than 0, when process 0 does not finish or fails).
  """
  ds = config.dataset
  data_dir = pathlib.Path(ds.data_dir) if ds.data_dir else workdir / "data" / "listops"
  if ds.generate:
    generated.generate_once(data_dir, lambda: generator.ensure_generated(
        data_dir, task=ds.task, progress=True, **ds.generator.to_dict()))
  return data_lib.ArrayDataset(
      release.load_splits(data_dir, ds.max_length, task=ds.task),
      model_kwargs={"vocab_size": release.VOCAB_SIZE, "num_classes": release.NUM_CLASSES,
                    "max_length": ds.max_length})
