"""CAST's coverage as a metric: the fractions of real tokens in no cluster and in several, sown
into 'metrics' and logged by the train loop (``clustr_jax/attention/cast.py``,
``clustr_jax/train.py:sown_metrics``)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clustr_jax import train
from clustr_jax.attention import cast
from configs import common


def _apply(clustering, num_clusters, cluster_size, mask, sa_assignment="argmax"):
  module = cast.CASTAttention(num_heads=2, num_clusters=num_clusters, cluster_size=cluster_size,
                              qkv_features=16, clustering=clustering,
                              sa_assignment=sa_assignment)
  x = jax.random.normal(jax.random.key(0), (2, 24, 16))
  variables = module.init(jax.random.key(1), x, mask)
  _, state = module.apply(variables, x, mask, mutable=["intermediates", "metrics"])
  return state


@pytest.mark.parametrize("clustering, sa_assignment", [
    ("top_k", "argmax"), ("sa_top_k", "argmax"), ("sa_top_k", "greedy"),
    ("sa_top_k", "sequential")])
def test_coverage_fractions_match_the_sown_coverage(clustering, sa_assignment):
  mask = jnp.arange(24)[None, :] < jnp.asarray([[24], [17]])             # sample 2: 7 padded
  state = _apply(clustering, 4, 6, mask, sa_assignment)
  coverage = np.asarray(state["intermediates"]["coverage"][0])            # [B, H, N]
  real = np.broadcast_to(np.asarray(mask)[:, None, :], coverage.shape)
  uncovered = float(state["metrics"]["uncovered_fraction"][0])
  overlap = float(state["metrics"]["overlap_fraction"][0])
  np.testing.assert_allclose(uncovered, np.mean(coverage[real] == 0), rtol=1e-6)
  np.testing.assert_allclose(overlap, np.mean(coverage[real] > 1), rtol=1e-6)
  if clustering == "sa_top_k":
    assert overlap == 0.0                   # Single assignment: at most one cluster per token.
  if sa_assignment in ("greedy", "sequential"):
    # ... and with N_c kappa >= N, greedy and sequential leave no real token out.
    assert uncovered == 0.0


def test_top_k_leaves_tokens_uncovered_even_with_enough_slots():
  """The sizing's N_c kappa >= N bounds the slots, not coverage: independent Top-K clusters
  overlap, so some tokens are in none (a case found by this seed)."""
  state = _apply("top_k", 4, 6, jnp.ones((2, 24), bool))
  assert float(state["metrics"]["uncovered_fraction"][0]) > 0.0
  assert float(state["metrics"]["overlap_fraction"][0]) > 0.0


def test_sown_metrics_average_over_layers():
  variables = {"metrics": {"block_0": {"attention": {"uncovered_fraction": (jnp.float32(0.2),)}},
                           "block_1": {"attention": {"uncovered_fraction": (jnp.float32(0.4),)}}}}
  got = train.sown_metrics(variables)
  assert set(got) == {"uncovered_fraction"}
  np.testing.assert_allclose(float(got["uncovered_fraction"]), 0.3, rtol=1e-6)
  assert train.sown_metrics({}) == {}


def test_the_loop_logs_cast_coverage(tmp_path):
  config = common.load("configs/lra/listops.py:cpu,attention=cast")
  config.dataset.data_dir = str(tmp_path / "data")
  config.dataset.generator.update(num_train=64, num_val=16, num_test=16)
  config.model.update(emb_dim=16, num_heads=2, qkv_dim=16, mlp_dim=16, num_layers=1)
  config.update(batch_size=8, eval_batch_size=8, num_train_steps=2, log_every_steps=1,
                checkpoint_every_steps=2)
  train.train_and_evaluate(config, tmp_path / "run")
  lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().split(
      "\n") if line]
  logged = [line for line in lines if line["split"] == "train"]
  assert logged and all(0.0 <= line["uncovered_fraction"] <= 1.0 and
                        0.0 <= line["overlap_fraction"] <= 1.0 for line in logged)
