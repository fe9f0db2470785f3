"""Checkpoints: restore onto other meshes, fall back from a corrupt or partial latest checkpoint."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding

from clustr_jax import checkpointing
from clustr_jax import data as data_lib
from clustr_jax import sharding
from clustr_jax import train


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
