"""Two train steps of each vision recipe (configs/imagenet/*.py, CPU variants with tiny models)
on the shipped sample images, through the real train loop; the Sparsifiner chain checks that
stage 1 leaves the backbone and stage 2 the predictor bit-identical."""

from __future__ import annotations

import pathlib

import jax
import numpy as np
import pytest

from clustr_jax import distill, train
from configs import common as config_common

REPO = pathlib.Path(__file__).parent.parent
FOLDER = REPO / "tests" / "data" / "imagenet"
TINY_VIT = dict(depth=1, embed_dim=48, num_heads=3)


def _config(spec: str, **model):
  config = config_common.load(f"{REPO}/configs/imagenet/{spec}", lock=False)  # Tiny models.
  config.dataset.data_dir = str(FOLDER)
  config.batch_size = 8
  config.eval_batch_size = 8
  config.num_train_steps = 2
  config.log_every_steps = 1
  config.checkpoint_every_steps = 1
  config.model.update(model)
  if config.get("distill"):
    config.distill.teacher.update(TINY_VIT)
  return config


def _flat(params) -> dict[str, np.ndarray]:
  return {jax.tree_util.keystr(path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}


@pytest.fixture(scope="module")
def sparsifiner_chain(tmp_path_factory):
  """Dense DeiT (2 steps) -> stage 1 from it (2 steps) -> stage 2 from stage 1 (2 steps, EMA)."""
  root = tmp_path_factory.mktemp("chain")
  dense = train.train_and_evaluate(_config("deit.py:cpu", **TINY_VIT), root / "dense")
  teacher = str(root / "dense" / "checkpoints")
  recon = train.train_and_evaluate(
      _config(f"sparsifiner.py:cpu,stage=recon,init_checkpoint={teacher}", **TINY_VIT),
      root / "recon")
  config = _config(f"sparsifiner.py:cpu,stage=distill,init_checkpoint={root / 'recon'}/"
                   f"checkpoints,teacher_checkpoint={teacher}", **TINY_VIT)
  config.ema_decay = 0.9
  distilled = train.train_and_evaluate(config, root / "distill")
  params = {"dense": _flat(distill.load_params(root / "dense" / "checkpoints"))}
  for name in ("recon", "distill"):
    for step in (1, 2):
      params[f"{name}/{step}"] = _flat(distill.load_params(root / name / "checkpoints" /
                                                           str(step)))
  return {"dense": dense, "recon": recon, "distill": distilled}, params


def test_deit_recipe_two_steps(sparsifiner_chain):
  results, _ = sparsifiner_chain
  dense = results["dense"]
  assert dense["step"] == 2 and np.isfinite(dense["test"]["loss"])
  assert dense["test"]["num_examples"] == 2


def test_stage1_changes_only_the_predictor(sparsifiner_chain):
  results, params = sparsifiner_chain
  assert results["recon"]["step"] == 2 and np.isfinite(results["recon"]["test"]["loss"])
  first, second = params["recon/1"], params["recon/2"]
  # The student's attention names its output projection 'proj' (config.distill.init_rename).
  dense = {k.replace("['attn']['out']", "['attn']['proj']"): v
           for k, v in params["dense"].items()}
  predictor = {k for k in second if "mask_predictor" in k}
  assert predictor and set(second) - predictor == set(dense)
  for key, value in dense.items():  # The backbone is bit-identical to the dense checkpoint.
    np.testing.assert_array_equal(first[key], value, err_msg=key)
    np.testing.assert_array_equal(second[key], value, err_msg=key)
  assert any(not np.array_equal(first[k], second[k]) for k in predictor)


def test_stage2_changes_only_the_backbone_and_reports_ema(sparsifiner_chain):
  results, params = sparsifiner_chain
  distilled = results["distill"]
  assert distilled["step"] == 2 and np.isfinite(distilled["test"]["loss"])
  assert "test_ema" in distilled and np.isfinite(distilled["test_ema"]["loss"])
  recon, first, second = params["recon/2"], params["distill/1"], params["distill/2"]
  assert set(recon) == set(first) == set(second)
  for key in (k for k in recon if "mask_predictor" in k):  # Predictor bit-identical.
    np.testing.assert_array_equal(first[key], recon[key], err_msg=key)
    np.testing.assert_array_equal(second[key], recon[key], err_msg=key)
  changed = {k for k in first if not np.array_equal(first[k], second[k])}
  assert changed and not any("mask_predictor" in k for k in changed)
  assert any("blocks_0" in k for k in changed)


def test_clustr_recipe_two_steps(tmp_path):
  config = _config("clustr.py:cpu", embed_dims=(16, 32, 32, 32), num_heads=(1, 1, 1, 1),
                   depths=(1, 1, 1, 1), mlp_ratios=(2, 2, 2, 2))
  results = train.train_and_evaluate(config, tmp_path)
  assert results["step"] == 2 and np.isfinite(results["test"]["loss"])
