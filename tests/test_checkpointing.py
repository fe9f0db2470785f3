"""Checkpoints: restore onto other meshes, fall back from a corrupt or partial latest checkpoint."""

import logging
import os
import pathlib
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding

from clustr_jax import checkpointing, sharding, train
from clustr_jax import data as data_lib


def make_state(mesh, step=0):
  """A TrainState whose parameters are sharded over (fsdp, model) as FSDP/TP weights are."""
  w = jnp.arange(16 * 8, dtype=jnp.float32).reshape(16, 8) + step
  b = jnp.arange(8, dtype=jnp.float32) - step
  shardings = {"w": NamedSharding(mesh, jax.P("fsdp", "model")),
               "b": NamedSharding(mesh, jax.P("model"))}
  params = {k: jax.device_put(v, shardings[k]) for k, v in {"w": w, "b": b}.items()}
  return train.TrainState(step=jnp.asarray(step, jnp.int32), params=params,
                          opt_state={"mu": jax.tree.map(jnp.zeros_like, params)},
                          nonfinite_steps=jnp.zeros((), jnp.int32))


def make_iterator():
  arrays = {"inputs": np.arange(40, dtype=np.int32)[:, None], "targets": np.zeros(40, np.int32)}
  return data_lib.ArrayDataset({"train": arrays}).train_iterator(batch_size=4, seed=0)


def test_saved_on_8_devices_restores_on_4_and_on_1(tmp_path):
  mesh8 = sharding.create_mesh(2, 2, 2)
  state = make_state(mesh8, step=3)
  assert state.params["w"].addressable_shards[0].data.shape == (8, 4)
  iterator = make_iterator()
  next(iterator)
  ckpt = checkpointing.Checkpointer(tmp_path, save_every_steps=1)
  ckpt.save(3, state, iterator)
  ckpt.close()
  expected_next = next(iterator)["inputs"]
  for devices, mesh_shape, block in ((4, (1, 2, 2), (8, 4)), (1, (1, 1, 1), (16, 8))):
    mesh = sharding.create_mesh(*mesh_shape, devices=jax.devices()[:devices])
    target = make_state(mesh)
    restored_iterator = make_iterator()
    ckpt = checkpointing.Checkpointer(tmp_path, save_every_steps=1)
    restored, step = ckpt.restore(checkpointing.abstract_like(target), restored_iterator)
    ckpt.close()
    assert step == 3 and int(restored.step) == 3
    w = restored.params["w"]
    assert len(w.sharding.device_set) == devices and w.sharding.spec == jax.P("fsdp", "model")
    assert w.addressable_shards[0].data.shape == block
    np.testing.assert_array_equal(jax.device_get(w), jax.device_get(state.params["w"]))
    np.testing.assert_array_equal(next(restored_iterator)["inputs"], expected_next)


def test_corrupt_latest_falls_back_to_the_previous_and_keeps_everything(tmp_path, caplog):
  mesh = sharding.create_mesh(devices=jax.devices()[:1])
  iterator = make_iterator()
  ckpt = checkpointing.Checkpointer(tmp_path, save_every_steps=2, max_to_keep=2)
  positions = {}
  for step in range(1, 5):
    next(iterator)
    ckpt.save(step, make_state(mesh, step), iterator)
    positions[step] = iterator.get_state()
  ckpt.close()
  assert ckpt.all_steps() == [2, 4]
  for path in (tmp_path / "4" / "state").rglob("*"):
    if path.is_file():
      path.write_bytes(b"\x00garbage")
  (tmp_path / "6.orbax-checkpoint-tmp-1764000000").mkdir()  # A save killed half-way.
  (tmp_path / "6.orbax-checkpoint-tmp-1764000000" / "junk").write_text("partial")

  restored_iterator = make_iterator()
  ckpt = checkpointing.Checkpointer(tmp_path, save_every_steps=2, max_to_keep=2)
  with caplog.at_level(logging.WARNING):
    restored, step = ckpt.restore(checkpointing.abstract_like(make_state(mesh)),
                                  restored_iterator)
  assert step == 2 and int(restored.step) == 2
  assert restored_iterator.get_state() == positions[2]
  assert "Checkpoint of step 4" in caplog.text and "falling back" in caplog.text
  assert (tmp_path / "4.corrupt" / "state").is_dir()  # Moved aside, not deleted.
  assert not (tmp_path / "6.orbax-checkpoint-tmp-1764000000").exists()
  # Resuming writes step 4 again; the good step 2 survives until then (max_to_keep=2).
  ckpt.save(4, make_state(mesh, 4), restored_iterator)
  ckpt.close()
  assert ckpt.all_steps() == [2, 4]

  for path in (tmp_path / "2" / "state").rglob("*"):
    if path.is_file():
      path.write_bytes(b"\x00garbage")
  for path in (tmp_path / "4" / "state").rglob("*"):
    if path.is_file():
      path.write_bytes(b"\x00garbage")
  ckpt = checkpointing.Checkpointer(tmp_path, save_every_steps=2)
  with pytest.raises(RuntimeError, match=r"none of the checkpoints \[2, 4\] .* restores"):
    ckpt.restore(checkpointing.abstract_like(make_state(mesh)), make_iterator())
  ckpt.close()
  assert {p.name for p in tmp_path.iterdir()} >= {"2.corrupt", "4.corrupt", "4.corrupt1"}


# Saves steps 1-5 (40 parameters each, so that many reads are in flight when one fails), writes
# random bytes over the array files of steps 2-5 and restores: four failed restores, then step 1.
RECOVERY_CHILD = """
import pathlib, sys
import jax, jax.numpy as jnp, numpy as np
from clustr_jax import checkpointing, data as data_lib, train
def make_state(step):
  params = {f"p{i}": jnp.full((32, 16), float(step + i)) for i in range(40)}
  return train.TrainState(step=jnp.asarray(step, jnp.int32), params=params,
                          opt_state={"mu": jax.tree.map(jnp.zeros_like, params)},
                          nonfinite_steps=jnp.zeros((), jnp.int32))
def make_iterator():
  arrays = {"inputs": np.arange(40, dtype=np.int32)[:, None], "targets": np.zeros(40, np.int32)}
  return data_lib.ArrayDataset({"train": arrays}).train_iterator(batch_size=4, seed=0)
directory = pathlib.Path(sys.argv[1])
iterator = make_iterator()
ckpt = checkpointing.Checkpointer(directory, save_every_steps=1, max_to_keep=5)
for step in range(1, 6):
  next(iterator)
  ckpt.save(step, make_state(step), iterator)
ckpt.close()
rng = np.random.default_rng(0)
for step in range(2, 6):
  for path in sorted((directory / str(step) / "state").rglob("*")):
    if path.is_file() and path.parent.name == "d":  # the array data files
      path.write_bytes(rng.bytes(path.stat().st_size))
ckpt = checkpointing.Checkpointer(directory, save_every_steps=1, max_to_keep=5)
restored, step = ckpt.restore(checkpointing.abstract_like(make_state(0)), make_iterator())
ckpt.close()
import gc; gc.collect()  # asyncio reports never-retrieved task exceptions when tasks are collected
print("RESTORED", step, int(restored.step))
"""


def test_fallback_from_random_bytes_logs_one_warning_per_checkpoint_and_no_traceback(tmp_path):
  """The new user's test: random bytes over the newest checkpoints' array files. Orbax abandons
  the other reads of a checkpoint that fails; their late reports (TensorStore's "Event loop is
  closed", asyncio's "Task exception was never retrieved") printed tracebacks. Run in a child
  process: they come from TensorStore threads and garbage collection, straight to stderr."""
  repo = pathlib.Path(__file__).resolve().parent.parent
  env = {**os.environ, "PYTHONPATH": str(repo), "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)  # One CPU device.
  child = subprocess.run([sys.executable, "-c", RECOVERY_CHILD, str(tmp_path / "ckpt")],
                         env=env, capture_output=True, text=True, timeout=120, check=False)
  assert child.returncode == 0, child.stderr[-3000:]
  assert "RESTORED 1 1" in child.stdout
  assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
      "1", "2.corrupt", "3.corrupt", "4.corrupt", "5.corrupt"]  # Moved aside, none deleted.
  warnings = [line for line in child.stderr.splitlines() if "does not restore" in line]
  assert len(warnings) == 4, child.stderr[-3000:]
  for step, warning in zip((5, 4, 3, 2), warnings):
    assert f"Checkpoint of step {step} in" in warning and f"{step}.corrupt" in warning
    assert f"/{step}/state/" in warning  # The reason names the unreadable file.
    assert "tensorstore_spec" not in warning
  for noise in ("Traceback", "Event loop is closed", "never retrieved", "destroyed but"):
    assert noise not in child.stderr, child.stderr[-3000:]


def test_only_reports_of_abandoned_orbax_reads_are_silenced(monkeypatch):
  def unraisable(error, caller):
    """What sys.unraisablehook gets when C code calls ``caller`` and it raises ``error``."""
    try:
      caller(error)
    except RuntimeError as e:  # The traceback from caller's frame on (no Python frame above it).
      return types.SimpleNamespace(exc_value=e, exc_traceback=e.__traceback__.tb_next)

  def call_soon_threadsafe(error):  # The frame TensorStore's callback enters from C.
    raise error

  def other(error):
    raise error

  closed = RuntimeError("Event loop is closed")
  assert checkpointing._is_closed_loop_callback(unraisable(closed, call_soon_threadsafe))
  assert not checkpointing._is_closed_loop_callback(unraisable(closed, other))
  assert not checkpointing._is_closed_loop_callback(
      unraisable(RuntimeError("other"), call_soon_threadsafe))

  task_filter = checkpointing._AbandonedTaskFilter()
  def record(message):
    return logging.LogRecord("asyncio", logging.ERROR, __file__, 1, message, None, None)
  orbax_task = ("Task exception was never retrieved\nfuture: <Task finished name='Task-9' coro=<"
                "async_deserialize() done, defined at /x/orbax/checkpoint/_src/serialization/"
                "serialization.py:394> exception=ValueError('DATA_LOSS')>")
  assert not task_filter.filter(record(orbax_task))
  assert task_filter.filter(record(orbax_task.replace("orbax/checkpoint", "mylib")))
  assert task_filter.filter(record("Unclosed client session, orbax/checkpoint"))
  read = ("Future exception was never retrieved\nfuture: <Future finished exception=ValueError("
          "'DATA_LOSS: Error reading \"w/.zarray\" in OCDBT database at local file "
          "\"/runs/a/checkpoints/4/state/\"')>")
  assert task_filter.filter(record(read))  # Not a directory that restore() has read.
  monkeypatch.setattr(checkpointing, "_restored_directories", {"/runs/a/checkpoints"})
  assert not task_filter.filter(record(read))
  assert task_filter.filter(record(read.replace("/runs/a/", "/runs/b/")))
