"""Grain pipelines: deterministic shuffled epochs, per-process shards, resumable state, eval."""

import pathlib
import subprocess
import sys
import textwrap

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from clustr_jax.data import pipeline

REPO = pathlib.Path(__file__).resolve().parent.parent


def make_arrays(n=50, length=3):
  """Example i has target i and inputs [i, i + 1000, ...]: rows identify their example."""
  return {"inputs": (np.arange(n)[:, None] + 1000 * np.arange(length)).astype(np.int32),
          "targets": np.arange(n, dtype=np.int32)}


def take(iterator, num_batches):
  return [next(iterator) for _ in range(num_batches)]


def targets(batches):
  return np.concatenate([b["targets"] for b in batches])


# ---------------------------------------------------------------------------------------------
# Training iterator.
# ---------------------------------------------------------------------------------------------
def test_batches_have_the_right_shapes_and_rows():
  batch = next(pipeline.train_iterator(make_arrays(), batch_size=8, seed=0))
  assert set(batch) == {"inputs", "targets"}
  assert batch["inputs"].shape == (8, 3) and batch["inputs"].dtype == np.int32
  assert batch["targets"].shape == (8,) and batch["targets"].dtype == np.int32
  np.testing.assert_array_equal(batch["inputs"][:, 0], batch["targets"])


def test_deterministic_for_a_seed():
  arrays = make_arrays()
  a = targets(take(pipeline.train_iterator(arrays, batch_size=5, seed=3), 12))
  b = targets(take(pipeline.train_iterator(arrays, batch_size=5, seed=3), 12))
  c = targets(take(pipeline.train_iterator(arrays, batch_size=5, seed=4), 12))
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


def test_every_epoch_is_a_new_permutation_of_all_examples():
  n = 50
  it = pipeline.train_iterator(make_arrays(n), batch_size=7, seed=0)
  stream = targets(take(it, -(-3 * n // 7)))
  epochs = [stream[e * n:(e + 1) * n] for e in range(3)]
  for epoch in epochs:
    np.testing.assert_array_equal(np.sort(epoch), np.arange(n))
  assert not np.array_equal(epochs[0], np.arange(n))  # Shuffled ...
  assert not np.array_equal(epochs[0], epochs[1])  # ... and reshuffled each epoch.
  assert not np.array_equal(epochs[1], epochs[2])


def test_process_shards_are_disjoint_and_cover_the_data():
  n, shard_count = 50, 3
  shards = []
  for shard_index in range(shard_count):
    size = len(range(shard_index, n, shard_count))
    it = pipeline.train_iterator(make_arrays(n), batch_size=4, seed=0, shard_index=shard_index,
                                 shard_count=shard_count)
    first_epoch = targets(take(it, -(-size // 4)))[:size]
    assert len(set(first_epoch.tolist())) == size
    shards.append(set(first_epoch.tolist()))
  assert sum(len(s) for s in shards) == n and set.union(*shards) == set(range(n))


def test_get_state_and_set_state_resume_the_stream():
  arrays = make_arrays()
  uninterrupted = take(pipeline.train_iterator(arrays, batch_size=6, seed=1), 20)
  it = pipeline.train_iterator(arrays, batch_size=6, seed=1)
  take(it, 13)
  state = it.get_state()
  resumed = pipeline.train_iterator(arrays, batch_size=6, seed=1)
  resumed.set_state(state)
  np.testing.assert_array_equal(targets(take(resumed, 7)), targets(uninterrupted[13:]))


def test_orbax_checkpoint_manager_round_trip(tmp_path):
  arrays = make_arrays()
  uninterrupted = take(pipeline.train_iterator(arrays, batch_size=6, seed=2), 15)
  handlers = {"state": ocp.StandardCheckpointHandler(),
              "data": grain.checkpoint.CheckpointHandler()}
  it = pipeline.train_iterator(arrays, batch_size=6, seed=2)
  take(it, 9)
  with ocp.CheckpointManager(tmp_path, item_handlers=handlers) as manager:
    manager.save(9, args=ocp.args.Composite(
        state=ocp.args.StandardSave({"step": np.asarray(9, np.int32)}),
        data=grain.checkpoint.CheckpointSave(it)))
    manager.wait_until_finished()
  take(it, 2)  # Moving on after the save must not change what was saved.

  resumed = pipeline.train_iterator(arrays, batch_size=6, seed=2)
  with ocp.CheckpointManager(tmp_path, item_handlers=handlers) as manager:
    assert manager.latest_step() == 9
    restored = manager.restore(9, args=ocp.args.Composite(
        state=ocp.args.StandardRestore({"step": np.zeros((), np.int32)}),
        data=grain.checkpoint.CheckpointRestore(resumed)))
  assert int(restored["state"]["step"]) == 9
  np.testing.assert_array_equal(targets(take(resumed, 6)), targets(uninterrupted[9:]))


def test_worker_processes_give_the_same_batches(tmp_path):
  # Grain workers need absl flags parsed; a subprocess keeps that out of this test process.
  script = tmp_path / "workers.py"
  script.write_text(textwrap.dedent("""
      import numpy as np
      from absl import app
      from clustr_jax.data import pipeline

      def main(argv):
        arrays = {"targets": np.arange(40, dtype=np.int32)}
        plain = pipeline.train_iterator(arrays, batch_size=4, seed=0)
        workers = pipeline.train_iterator(arrays, batch_size=4, seed=0, worker_count=1)
        for _ in range(25):
          np.testing.assert_array_equal(next(plain)["targets"], next(workers)["targets"])
        workers.close()
        print("same batches")

      if __name__ == "__main__":
        app.run(main)
  """))
  result = subprocess.run([sys.executable, str(script)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
  assert "same batches" in result.stdout, result.stderr[-3000:]


@pytest.mark.parametrize("kwargs, message", [
    (dict(batch_size=0), "batch_size must be > 0; got 0"),
    (dict(shard_index=3, shard_count=3), r"shard_index must be in \[0, shard_count=3\); got 3"),
    (dict(shard_index=-1), "shard_index"),
    (dict(shard_count=0), "shard_count"),
    (dict(batch_size=20, shard_index=2, shard_count=3), "holds 16 of 50 examples.*batch_size=20"),
    (dict(worker_count=-1), "worker_count"),
])
def test_train_iterator_rejects_bad_arguments(kwargs, message):
  with pytest.raises(ValueError, match=message):
    pipeline.train_iterator(make_arrays(), **{"batch_size": 4, "seed": 0, **kwargs})


def test_mismatched_arrays_are_rejected():
  arrays = {"inputs": np.zeros((10, 3), np.int32), "targets": np.zeros((9,), np.int32)}
  with pytest.raises(ValueError, match="'inputs': 10, 'targets': 9"):
    pipeline.train_iterator(arrays, batch_size=2, seed=0)
  with pytest.raises(ValueError, match="leading"):
    pipeline.eval_batches(arrays, batch_size=2)


# ---------------------------------------------------------------------------------------------
# Evaluation batches.
# ---------------------------------------------------------------------------------------------
def test_eval_batches_pad_the_last_batch():
  arrays = make_arrays(23)
  batches = list(pipeline.eval_batches(arrays, batch_size=5))
  assert len(batches) == 5
  for batch in batches:
    assert batch["inputs"].shape == (5, 3) and batch["inputs"].dtype == np.int32
    assert batch["weights"].shape == (5,) and batch["weights"].dtype == np.float32
  np.testing.assert_array_equal(batches[-1]["weights"], [1, 1, 1, 0, 0])
  assert not batches[-1]["inputs"][3:].any() and not batches[-1]["targets"][3:].any()
  real = np.concatenate([b["weights"] for b in batches]) == 1
  np.testing.assert_array_equal(np.concatenate([b["targets"] for b in batches])[real],
                                np.arange(23))
  np.testing.assert_array_equal(np.concatenate([b["inputs"] for b in batches])[real],
                                arrays["inputs"])


def test_eval_batches_exact_multiple_has_no_padding():
  batches = list(pipeline.eval_batches(make_arrays(20), batch_size=5))
  assert len(batches) == 4 and all(b["weights"].all() for b in batches)


@pytest.mark.parametrize("n", [1, 23, 24, 40, 41])
def test_eval_batches_across_processes(n):
  arrays, batch_size, shard_count = make_arrays(n), 4, 3
  per_process = [list(pipeline.eval_batches(arrays, batch_size=batch_size, shard_index=p,
                                            shard_count=shard_count))
                 for p in range(shard_count)]
  assert len({len(batches) for batches in per_process}) == 1  # Same count everywhere.
  assert len(per_process[0]) == -(-n // (batch_size * shard_count))
  # Concatenating the processes' parts of each global batch gives the split in order, once.
  seen = []
  for parts in zip(*per_process):
    weights = np.concatenate([p["weights"] for p in parts])
    seen.extend(np.concatenate([p["targets"] for p in parts])[weights == 1].tolist())
  assert seen == list(range(n))


def test_eval_batches_rejects_bad_arguments():
  with pytest.raises(ValueError, match="batch_size"):
    pipeline.eval_batches(make_arrays(), batch_size=-1)
  with pytest.raises(ValueError, match="shard_index"):
    pipeline.eval_batches(make_arrays(), batch_size=2, shard_index=2, shard_count=2)
  with pytest.raises(ValueError, match="weights"):
    pipeline.eval_batches({**make_arrays(), "weights": np.ones(50)}, batch_size=2)
