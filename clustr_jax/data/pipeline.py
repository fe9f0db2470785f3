"""Grain pipelines over in-memory arrays: a checkpointable train iterator and padded eval batches.

Both take ``arrays``: a dict of numpy arrays sharing the leading (example) dimension, e.g.
``{'inputs': int32 [n, length], 'targets': int32 [n]}`` from ``listops.load_splits``.

Training (``train_iterator``), per process: the example indices
``shard_index, shard_index + shard_count, ...`` -> seeded shuffle -> repeat forever (a new
permutation each epoch, as Grain's ``repeat`` reseeds upstream random transformations per epoch)
-> batches of ``batch_size`` indices -> one gather per batch. Batches may straddle epochs; every
epoch visits each example of the shard once. The iterator is a ``grain.DatasetIterator`` whose
position is saved by ``get_state()`` / restored by ``set_state()``, or with Orbax through
``grain.checkpoint.CheckpointSave`` / ``CheckpointRestore``.

Evaluation (``eval_batches``): every example exactly once, in order, in batches of one static
shape; a float32 ``weights`` key marks real rows (1) and padding rows (0). With several processes,
the global batch ``b`` is rows ``[b * B * P, (b + 1) * B * P)`` of the split (``B`` = per-process
batch, ``P`` = processes) and process ``p`` holds its ``p``-th block of ``B`` rows, so the
concatenation of the processes' batches is the global batch, and all processes yield the same
number of batches.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import grain
import numpy as np

# Batches prefetched by Grain's threads ahead of the consumer (its default, 500, holds ~1 GB of
# 32 x 2,000 int32 batches for no benefit: a batch is one numpy gather).
_PREFETCH_BATCHES = 8
_PREFETCH_THREADS = 2


def _num_examples(arrays: Mapping[str, np.ndarray]) -> int:
  """The common leading dimension of ``arrays``; ValueError if empty or mismatched."""
  if not arrays:
    raise ValueError("arrays is empty; expected e.g. {'inputs': [n, length], 'targets': [n]}")
  sizes = {name: np.shape(array)[0] if np.ndim(array) else None for name, array in arrays.items()}
  if len(set(sizes.values())) != 1 or None in sizes.values():
    raise ValueError(f"arrays must share their leading (example) dimension; got leading sizes "
                     f"{sizes}")
  return next(iter(sizes.values()))


def _check_batching(batch_size: int, shard_index: int, shard_count: int) -> None:
  if batch_size <= 0:
    raise ValueError(f"batch_size must be > 0; got {batch_size}")
  if shard_count <= 0:
    raise ValueError(f"shard_count must be > 0; got {shard_count}")
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index must be in [0, shard_count={shard_count}); got {shard_index}")


class _Gather:
  """Maps a batch of example indices to ``{name: array[indices]}`` (picklable for workers)."""

  def __init__(self, arrays: Mapping[str, np.ndarray]):
    self._arrays = dict(arrays)

  def __call__(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    return {name: array[indices] for name, array in self._arrays.items()}


def train_iterator(arrays: Mapping[str, np.ndarray], *, batch_size: int, seed: int,
                   shard_index: int = 0, shard_count: int = 1,
                   worker_count: int = 0) -> grain.DatasetIterator:
  """An endless, shuffled, checkpointable iterator over this process's shard of ``arrays``.

  Args:
    arrays: ``{name: array [n, ...]}`` with a common leading dimension.
    batch_size: examples per batch on this process (the global batch / process count).
    seed: shuffle seed; the same seed, shard and batch size give the same batches.
    shard_index, shard_count: this process takes examples ``shard_index::shard_count``.
    worker_count: Grain worker processes (0: batches are gathered in this process by prefetch
      threads). Workers receive a copy of ``arrays``; a gather per batch rarely needs them.
      They need absl flags parsed (run under ``absl.app.run``, as ``clustr_jax.main`` does), and
      the saved state differs with ``worker_count``: restore with the value that saved it.

  Returns:
    A ``grain.DatasetIterator`` yielding ``{name: array [batch_size, ...]}`` (the input dtypes),
    with ``get_state()`` / ``set_state()`` for checkpointing.

  Raises:
    ValueError: ``batch_size <= 0``, ``shard_index`` outside ``[0, shard_count)``, arrays with
      different leading dimensions, a shard smaller than one batch, or ``worker_count < 0``.
  """
  n = _num_examples(arrays)
  _check_batching(batch_size, shard_index, shard_count)
  if worker_count < 0:
    raise ValueError(f"worker_count must be >= 0; got {worker_count}")
  indices = grain.MapDataset.range(n)[shard_index::shard_count]
  if len(indices) < batch_size:
    raise ValueError(f"shard {shard_index} of {shard_count} holds {len(indices)} of {n} examples, "
                     f"fewer than one batch (batch_size={batch_size})")
  dataset = (indices.shuffle(seed=seed).repeat().batch(batch_size, drop_remainder=True)
             .map(_Gather(arrays))
             .to_iter_dataset(grain.ReadOptions(num_threads=_PREFETCH_THREADS,
                                                prefetch_buffer_size=_PREFETCH_BATCHES)))
  if worker_count:
    dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return iter(dataset)


def eval_batches(arrays: Mapping[str, np.ndarray], *, batch_size: int, shard_index: int = 0,
                 shard_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """This process's part of every eval batch, covering the split once, in order.

  Args:
    arrays: ``{name: array [n, ...]}`` with a common leading dimension (no ``weights`` key).
    batch_size: examples per batch on this process.
    shard_index, shard_count: this process and the number of processes (see the module
      docstring for which rows each process gets).

  Returns:
    A generator of ``ceil(n / (batch_size * shard_count))`` batches, the same number on every
    process: ``{name: array [batch_size, ...]}`` zero-padded where the split has no more rows,
    plus ``'weights'``: float32 ``[batch_size]``, 1 for real rows and 0 for padding.

  Raises:
    ValueError: ``batch_size <= 0``, ``shard_index`` outside ``[0, shard_count)``, arrays with
      different leading dimensions, or a ``weights`` key in ``arrays``.
  """
  n = _num_examples(arrays)
  _check_batching(batch_size, shard_index, shard_count)
  if "weights" in arrays:
    raise ValueError("arrays already has a 'weights' key; eval_batches adds it")
  arrays = dict(arrays)
  global_batch = batch_size * shard_count
  num_batches = -(-n // global_batch)

  def batches() -> Iterator[dict[str, np.ndarray]]:
    for b in range(num_batches):
      start = min(b * global_batch + shard_index * batch_size, n)
      stop = min(start + batch_size, n)
      batch = {}
      for name, array in arrays.items():
        batch[name] = np.zeros((batch_size, *array.shape[1:]), array.dtype)
        batch[name][:stop - start] = array[start:stop]
      batch["weights"] = (np.arange(batch_size) < stop - start).astype(np.float32)
      yield batch

  return batches()
