"""LRA comparisons within their parameter budget (``configs/lra/common.py``,
``experiments/lra/parameters.py``), and ``has_cls_token`` following the model's pooling."""

from __future__ import annotations

import csv
import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import pytest

from clustr_jax import attention
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
