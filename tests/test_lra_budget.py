"""LRA comparisons within their parameter budget (``configs/lra/common.py``,
``experiments/lra/parameters.py``), and ``has_cls_token`` following the model's pooling."""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clustr_jax import attention, models
from clustr_jax.attention import sparsifiner
from configs.lra import common as lra_common

_PATH = pathlib.Path(__file__).parent.parent / "experiments" / "lra" / "parameters.py"
_SPEC = importlib.util.spec_from_file_location("lra_parameters", _PATH)
parameters = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(parameters)


@pytest.fixture(scope="module")
def table():
  return parameters.rows()


def test_every_config_stays_within_its_stated_budget(table):
  over = [f"{r['task']} {r['mechanism']}: {100 * r['overhead']:+.1f} % > "
          f"{100 * r['budget']:.0f} %" for r in table if r["overhead"] > r["budget"]]
  assert not over, "configs over their stated parameter budget: " + "; ".join(over)


def test_stated_overheads_are_only_where_a_method_cannot_fit(table):
  overhead = {(r["task"], r["mechanism"]): r["overhead"] for r in table}
  for spec, stated in lra_common.STATED_OVERHEADS.items():
    for mechanism, budget in stated.items():
      assert overhead[spec, mechanism] > lra_common.PARAMETER_BUDGET, (spec, mechanism)
      assert budget - overhead[spec, mechanism] < 0.01, f"{spec} {mechanism}: loose statement"
  # The mechanisms that can fit by their settings do, on every config.
  assert all(r["overhead"] <= lra_common.PARAMETER_BUDGET for r in table
             if r["mechanism"] in ("dense", "cast"))


def test_committed_table_is_current(table):
  with open(parameters.RESULTS / "parameters.csv") as f:
    committed = [(r["task"], r["mechanism"], int(r["parameters"]), r["settings"])
                 for r in csv.DictReader(f)]
  assert committed == [(r["task"], r["mechanism"], r["parameters"], r["settings"])
                       for r in table]


def test_dense_parameters_formula_counts_the_model(table):
  for r in table:
    config = parameters.load(r["task"], "dense")
    vocab_size, num_classes = lra_common.data_sizes(config.dataset.name)
    assert r["dense_parameters"] == lra_common.dense_parameters(
        config.model, vocab_size=vocab_size, num_classes=num_classes,
        max_length=config.dataset.max_length)


@pytest.mark.parametrize("spec", parameters.SPECS)
def test_has_cls_token_follows_pooling(spec):
  config = parameters.load(spec, "sparsifiner")
  assert config.model.attention_kwargs.has_cls_token == (config.model.pooling == "CLS")


def test_mean_pooled_sparsifiner_gives_pixel_zero_no_dense_row():
  """Pathfinder (MEAN pooling): every token, pixel 0 included, is a predicted sparse query."""
  config = parameters.load("pathfinder.py:cpu", "sparsifiner")
  module = sparsifiner.SparsifinerAttention(num_heads=2, qkv_features=16,
                                            **dict(config.model.attention_kwargs))
  x = jax.random.normal(jax.random.key(0), (1, 256, 16))
  variables = module.init(jax.random.key(1), x)
  _, state = module.apply(variables, x, mutable=["intermediates"])
  approx = state["intermediates"]["approx_attn"][0]
  assert approx.shape == (1, 2, 256, 256)     # Nq = N: no CLS row set aside.
  assert jnp.isfinite(module.apply(variables, x)).all()


def test_budget_lowers_the_settings_that_add_parameters():
  budget = attention.Budget(features=32, qkv_features=16, num_heads=4, extra_parameters=200)
  cast = attention.sized_for("cast", 1024, budget=budget)
  assert cast["num_clusters"] * 16 <= 200 and cast["num_clusters"] * cast["cluster_size"] >= 1024
  sparse = attention.sized_for("sparsifiner", 1024, cls_token=False, budget=budget)
  assert sparse["use_bias"] is False and 1024 // sparse["reduce_n_factor"] == 8  # The floor.
  roomy = attention.Budget(features=32, qkv_features=16, num_heads=4, extra_parameters=10**9)
  assert attention.sized_for("sparsifiner", 1024, budget=roomy)["reduce_n_factor"] == \
      attention.sized_for("sparsifiner", 1024)["reduce_n_factor"]
  assert attention.sized_for("clustr", 1024, budget=budget)["use_bias"] is False
  assert attention.sized_for("dense", 1024, budget=budget) == {}


def test_budget_shares_the_token_projections_when_per_layer_ones_cannot_fit():
  """At the n_down floor, per-layer [N, n_down] pairs exceed a small budget: a model of several
  layers shares one pair (counted 1 / L per layer); a one-layer model cannot."""
  budget = attention.Budget(features=32, qkv_features=16, num_heads=4, extra_parameters=6000,
                            num_layers=4)
  shared = attention.sized_for("sparsifiner", 1024, cls_token=False, budget=budget)
  assert shared["share_token_projections"] is True
  assert 8 < 1024 // shared["reduce_n_factor"] and \
      2 * 1024 * (1024 // shared["reduce_n_factor"]) // 4 <= 6000
  single = attention.sized_for("sparsifiner", 1024, cls_token=False,
                               budget=dataclasses.replace(budget, num_layers=1))
  assert "share_token_projections" not in single
  roomy = dataclasses.replace(budget, extra_parameters=10**9)
  assert "share_token_projections" not in attention.sized_for("sparsifiner", 1024, budget=roomy)


def _encoder(share: bool, lra_padding: bool):
  kwargs = dict(keep_rate=0.25, reduce_n_factor=4, has_cls_token=False,
                share_token_projections=share)
  return models.get("lra_encoder", max_length=32, attention="sparsifiner", attention_kwargs=kwargs,
                    emb_dim=16, num_heads=2, qkv_dim=16, mlp_dim=32, num_layers=2,
                    dropout_rate=0.0, attention_dropout_rate=0.0, pooling="MEAN", vocab_size=10,
                    num_classes=2, lra_padding=lra_padding)


@pytest.mark.parametrize("lra_padding", [False, True])
def test_shared_token_projections_equal_per_layer_copies(lra_padding):
  """One proj_n / proj_back_n pair under the encoder, none per layer; the model computes what
  the per-layer model computes with both layers' pairs set to the shared one (padding included,
  and LRA's second uniform-query call)."""
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 10, (2, 32)))
  shared_model, per_layer = _encoder(True, lra_padding), _encoder(False, lra_padding)
  shared = nn.unbox(shared_model.init(jax.random.key(0), tokens))["params"]
  pair = shared["encoder"]["shared_token_projections"]
  assert set(pair) == {"proj_n", "proj_back_n"} and pair["proj_n"].shape == (32, 8)
  assert "proj_n" not in shared["encoder"]["block_0"]["attention"]["mask_predictor"]
  copied = jax.tree.map(lambda x: x, shared)
  del copied["encoder"]["shared_token_projections"]
  for block in ("block_0", "block_1"):
    copied["encoder"][block]["attention"]["mask_predictor"].update(pair)
  want = per_layer.apply({"params": copied}, tokens)
  got = shared_model.apply({"params": shared}, tokens)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_shared_token_projections_need_a_model_that_shares_them():
  module = sparsifiner.SparsifinerAttention(2, reduce_n_factor=4, share_token_projections=True)
  x = jnp.ones((1, 32, 16))
  with pytest.raises(ValueError, match="share_token_projections=True needs the shared"):
    module.init(jax.random.key(0), x)
