"""The train loop: sharded steps, results.json, profiling, config errors, non-finite steps.

Exact resume after SIGKILL/SIGTERM is tested step by step in test_resume.py.
"""

import json
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clustr_jax import data as data_lib
from clustr_jax import losses, models, optim, profiling, sharding, train
from configs import common as config_common

REPO = pathlib.Path(__file__).resolve().parent.parent


def tiny_config(num_train_steps=4):
  config = config_common.load(f"{REPO}/configs/lra/listops.py:cpu")
  config.dataset.max_length = 32
  config.dataset.generator.update(num_train=96, num_val=20, num_test=20, min_length=5,
                                  max_length=30)
  config.model.update(emb_dim=16, num_heads=2, qkv_dim=16, mlp_dim=32, num_layers=1,
                      dropout_rate=0.1, attention_dropout_rate=0.1)
  config.batch_size = 8
  config.eval_batch_size = 8
  config.num_train_steps = num_train_steps
  config.warmup_steps = 2
  config.log_every_steps = 1
  config.eval_every_steps = 2
  config.checkpoint_every_steps = 2
  return config


def test_step_on_1_and_8_devices_gives_the_same_loss():
  config = tiny_config()
  model = models.from_config(config.model, {"vocab_size": 17, "num_classes": 10, "max_length": 32})
  tx, schedule = optim.create_optimizer(config)
  rng = np.random.default_rng(0)
  batch = {"inputs": rng.integers(0, 17, (8, 32)).astype(np.int32),
           "targets": rng.integers(0, 10, (8,)).astype(np.int32)}
  results = []
  for devices in (jax.devices()[:1], jax.devices()[:8]):
    mesh = sharding.create_mesh(devices=devices)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
      state, state_sharding, _ = train.init_sharded_state(
          model, tx, jax.random.key(0), mesh, jnp.zeros((8, 32), jnp.int32))
      step = train.jit_train_step(state_sharding, mesh, donate=False, model=model, tx=tx,
                                  schedule=schedule, rng=jax.random.key(1))
      global_batch = train.global_batch(batch, mesh)
      assert len(global_batch["inputs"].sharding.device_set) == len(devices)
      for _ in range(2):
        state, metrics = step(state, global_batch)
      results.append((float(metrics["loss"]), jax.device_get(state.params)))
  assert results[0][0] == pytest.approx(results[1][0], abs=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), results[0][1],
               results[1][1])


def test_results_json_profile_and_mfu(tmp_path):
  config = tiny_config(2)
  config.update(profile_start_step=2, profile_num_steps=1, peak_flops_per_device=1e12)
  results = train.train_and_evaluate(config, tmp_path)
  assert list((tmp_path / "profile").rglob("*.xplane.pb"))
  train_lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
                 if json.loads(line)["split"] == "train"]
  assert all(0 < r["mfu"] < 1 and r["step_time_s"] > 0 for r in train_lines)
  saved = json.loads((tmp_path / "results.json").read_text())
  assert saved["step"] == 2 and saved["num_train_steps"] == 2
  assert saved["test"]["num_examples"] == 20 and saved["val"]["num_examples"] == 20
  assert 0.0 <= saved["test"]["accuracy"] <= 1.0
  assert saved["config"]["model"]["attention"] == "dense"
  assert saved["num_params"] == results["num_params"] > 0
  assert saved["wall_time_s"] > 0
  assert (tmp_path / "data" / "listops" / "basic_train.tsv").is_file()
  assert list((tmp_path / "tensorboard").iterdir())
  splits = {json.loads(line)["split"]
            for line in (tmp_path / "metrics.jsonl").read_text().splitlines()}
  assert splits == {"train", "val", "test"}


def test_config_errors_name_the_key(tmp_path):
  config = tiny_config(2)
  config.batch_size = 12  # not a multiple of 8 devices
  with pytest.raises(ValueError, match="config.batch_size=12"):
    train.train_and_evaluate(config, tmp_path)
  config = tiny_config(2)
  config.mesh.data = 3
  with pytest.raises(ValueError, match="mesh"):
    train.train_and_evaluate(config, tmp_path)


def test_lra_schedule_matches_formula():
  schedule = optim.create_learning_rate_schedule("constant*linear_warmup*rsqrt_decay", 0.05,
                                                 1000, 4000)
  assert float(schedule(0)) == 0.0
  np.testing.assert_allclose(schedule(500), 0.05 * 0.5 / np.sqrt(1000), rtol=1e-6)
  np.testing.assert_allclose(schedule(1000), 0.05 / np.sqrt(1000), rtol=1e-6)
  np.testing.assert_allclose(schedule(4000), 0.05 / np.sqrt(4000), rtol=1e-6)
  cosine = optim.create_learning_rate_schedule("constant*linear_warmup*cosine_decay", 1.0, 10, 100)
  np.testing.assert_allclose(cosine(60), 0.5 * (1 + np.cos(np.pi * 0.5)), rtol=1e-6)
  with pytest.raises(ValueError, match="unknown"):
    optim.create_learning_rate_schedule("constant*bogus", 1.0, 10, 100)


def test_soft_targets_match_class_ids():
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(4, 5)), jnp.float32)
  ids = jnp.asarray([0, 3, 4, 1])
  one_hot = jax.nn.one_hot(ids, 5)
  np.testing.assert_allclose(losses.cross_entropy(logits, one_hot),
                             losses.cross_entropy(logits, ids), rtol=1e-6)
  np.testing.assert_array_equal(losses.correct(logits, one_hot), losses.correct(logits, ids))


def test_dataset_errors_name_the_problem(tmp_path):
  config = tiny_config(2)
  config.dataset.name = "bogus"
  with pytest.raises(ValueError, match="config.dataset.name='bogus' unknown; valid: listops"):
    data_lib.get(config, tmp_path)
  arrays = {"inputs": np.zeros((4, 3), np.int32), "targets": np.zeros((4,), np.int32)}
  with pytest.raises(ValueError, match="no 'train' split"):
    data_lib.ArrayDataset({"val": arrays})
  with pytest.raises(ValueError, match=r"split 'val' lacks key\(s\) \['inputs2'\]"):
    data_lib.ArrayDataset({"train": {**arrays, "inputs2": arrays["inputs"]}, "val": arrays},
                          input_keys=("inputs", "inputs2"))
  dataset = data_lib.ArrayDataset({"train": arrays, "val": arrays})
  assert dataset.example_spec == {"inputs": ((3,), np.int32), "targets": ((), np.int32)}
  with pytest.raises(KeyError, match="split 'test' unknown; valid: val"):
    dataset.eval_batches("test", batch_size=2)


def test_config_validation_names_the_key_and_the_choices(tmp_path):
  for key, value, match in (
      ("model.name", "bogus", r"config.model.name='bogus' unknown; valid: lra_encoder"),
      ("model.attention", "bogus", r"config.model.attention='bogus' unknown; valid: dense, "
                                   r"clustr, cast, sparsifiner"),
      ("model.qkv_dim", 15, r"config.model.qkv_dim=15 must be divisible by "
                            r"config.model.num_heads=2"),
      ("grad_accum_steps", 3, r"config.batch_size=8 must be a positive multiple of the "
                              r"data-parallel size data\*fsdp=8 times config.grad_accum_steps=3"),
      ("on_nonfinite", "ignore", r"config.on_nonfinite='ignore' unknown; valid: stop, skip"),
  ):
    config = tiny_config(2)
    parent, _, leaf = key.rpartition(".")
    (config[parent] if parent else config)[leaf] = value
    with pytest.raises(ValueError, match=match):
      train.train_and_evaluate(config, tmp_path / "run")
  config = tiny_config(2)
  config.dataset.update(generate=False, data_dir=str(tmp_path / "nowhere"))
  with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere" / "basic_train.tsv")):
    train.train_and_evaluate(config, tmp_path / "run")


def nan_dataset(num_steps=6):
  """(ArrayDataset with NaN soft targets in one example, the steps <= num_steps serving it).

  The example is one the seeded train iterator (batch 8, seed 0) first serves at step 3, 4 or 5.
  """
  rng = np.random.default_rng(0)
  inputs = rng.integers(1, 17, (48, 32)).astype(np.int32)
  targets = np.eye(10, dtype=np.float32)[rng.integers(0, 10, 48)]
  indexed = data_lib.ArrayDataset({"train": {"index": np.arange(48), "targets": targets}},
                                  input_keys=("index",))
  iterator = indexed.train_iterator(batch_size=8, seed=0)
  steps_of = {}
  for step in range(1, num_steps + 1):
    for index in next(iterator)["index"]:
      steps_of.setdefault(int(index), []).append(step)
  bad = next(i for i, steps in sorted(steps_of.items()) if 3 <= steps[0] <= 5)
  targets[bad] = np.nan
  clean = {"inputs": inputs[:8], "targets": np.eye(10, dtype=np.float32)[:8]}
  dataset = data_lib.ArrayDataset(
      {"train": {"inputs": inputs, "targets": targets}, "val": clean, "test": clean},
      model_kwargs={"vocab_size": 17, "num_classes": 10, "max_length": 32})
  return dataset, steps_of[bad]


def test_nonfinite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(
    tmp_path, monkeypatch):
  dataset, bad_steps = nan_dataset()
  monkeypatch.setattr(data_lib, "get", lambda config, workdir: dataset)
  config = tiny_config(6)
  config.max_checkpoints_to_keep = 1
  with pytest.raises(FloatingPointError, match=rf"non-finite loss=nan, .* at step "
                                              rf"{bad_steps[0]}; the last good checkpoint is "
                                              rf"step {(bad_steps[0] - 1) // 2 * 2} in "):
    train.train_and_evaluate(config, tmp_path)
  saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert saved == [(bad_steps[0] - 1) // 2 * 2]
  assert not (tmp_path / "results.json").exists()

  # 'skip': the bad updates are left out and counted, the run finishes with finite parameters.
  config.on_nonfinite, config.max_nonfinite_steps = "skip", 10
  results = train.train_and_evaluate(config, tmp_path / "skip")
  assert results["nonfinite_steps"] == len(bad_steps) and results["step"] == 6
  assert np.isfinite(results["test"]["loss"])
  records = [json.loads(line)
             for line in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()]
  train_lines = [r for r in records if r["split"] == "train"]
  assert all(np.isfinite(r["loss"]) != (r["step"] in bad_steps) for r in train_lines)
  assert [r["nonfinite_steps"] for r in train_lines][-1] == len(bad_steps)


def test_skipping_stops_after_max_nonfinite_steps():
  records = [(4, {"loss": float("nan"), "grad_norm": float("nan"), "nonfinite": 1.0,
                  "nonfinite_steps": 3})]
  config = tiny_config(2)
  config.update(on_nonfinite="skip", max_nonfinite_steps=2)

  class Ckpt:
    directory = "/ckpt"

    @staticmethod
    def latest_step():
      return 2

  with pytest.raises(FloatingPointError, match=r"3 updates skipped, more than "
                                               r"config.max_nonfinite_steps=2: .* at step 4; "
                                               r"the last good checkpoint is step 2"):
    train.check_finite(records, config, Ckpt)
  config.max_nonfinite_steps = 3
  train.check_finite(records, config, Ckpt)


def test_loop_keys_override_and_a_mistyped_key_fails_at_load(tmp_path):
  config = tiny_config(2)
  config.grad_accum_steps = 4  # Every loop key is in the (locked) config: overrides work.
  config.mesh.fsdp = 2
  config.model.dtype = "bfloat16"
  assert config.on_nonfinite == "stop" and config.grad_clip_norm is None
  run = subprocess.run(
      [sys.executable, "-m", "clustr_jax.main", "--config=configs/lra/listops.py:cpu",
       "--config.grad_acum_steps=4", f"--workdir={tmp_path}"],
      capture_output=True, text=True, cwd=tmp_path, timeout=120)
  assert run.returncode != 0
  assert 'Did you mean "grad_accum_steps"' in run.stderr
  assert not (tmp_path / "checkpoints").exists()


def test_peak_flops_and_mfu():
  class Device:
    device_kind = "TPU v5 lite"

  assert profiling.peak_flops_per_device(Device()) == 197e12
  Device.device_kind = "cpu"
  assert profiling.peak_flops_per_device(Device()) is None
  assert profiling.peak_flops_per_device(Device(), 2e12) == 2e12
  with pytest.raises(ValueError, match="config.peak_flops_per_device must be > 0"):
    profiling.peak_flops_per_device(Device(), 0.0)
  assert profiling.mfu(1e12, 0.5, 4e12) == pytest.approx(0.5)
  assert profiling.mfu(None, 0.5, 4e12) is None and profiling.mfu(1e12, 0.5, None) is None
