"""Tests of experiments/lra/efficiency.py (LRA's Table 2 protocol): its training-step cases and the
ratio read-out (no timing). The script is loaded from its path."""

import importlib.util
import math
import pathlib
import sys

import jax
import numpy as np
import pytest

_PATH = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "lra" / "efficiency.py"
_SPEC = importlib.util.spec_from_file_location("lra_efficiency", _PATH)
efficiency = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = efficiency
_SPEC.loader.exec_module(efficiency)


def test_dense_variants_take_the_same_training_step():
  """dense.xla and dense.tokamax differ only in the kernel: one training step of the Text model
  from the same state gives the same loss and parameters."""
  for variant, implementation in (("dense.xla", "xla"), ("dense.tokamax", "xla_chunked")):
    config = efficiency.variant_config(variant, 32)
    assert config.model.attention_kwargs["implementation"] == implementation
    assert config.model.attention_dropout_rate == 0.0 and not config.model.lra_padding
  results = {}
  for variant in ("dense.xla", "dense.tokamax"):
    case, params = efficiency.step_case(variant, 32, 1)
    state, metrics = case.fn(*case.args)
    assert np.isfinite(float(metrics["loss"])) and params > 0
    results[variant] = (float(metrics["loss"]), state.params)
  np.testing.assert_allclose(results["dense.tokamax"][0], results["dense.xla"][0], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(results["dense.tokamax"][1]),
                  jax.tree.leaves(results["dense.xla"][1])):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_ratios_read_the_best_dense_and_the_xla_path():
  rows = [{"variant": "dense.xla", "length": 1024, "median_ms": 400.0, "memory_mib": 800.0},
          {"variant": "dense.tokamax", "length": 1024, "median_ms": 200.0, "memory_mib": 100.0},
          {"variant": "cast", "length": 1024, "median_ms": 50.0, "memory_mib": 50.0},
          {"variant": "cast", "length": 2048, "median_ms": 60.0, "memory_mib": 60.0}]
  efficiency.add_ratios(rows)
  cast = rows[2]
  assert cast["best_dense"] == "dense.tokamax"
  assert (cast["speed_vs_best_dense"], cast["speed_vs_xla"]) == (4.0, 8.0)
  assert (cast["memory_vs_best_dense"], cast["memory_vs_xla"]) == (0.5, 0.06)
  assert rows[3]["best_dense"] == "" and math.isnan(rows[3]["speed_vs_xla"])


def test_unknown_variant_is_an_error():
  with pytest.raises(SystemExit):
    efficiency.parse_args(["--variants=dense,linformer"])


def test_length_table_cells():
  rows = [{"variant": "dense.xla", "length": 1024, "median_ms": 400.0, "memory_mib": 800.0,
           "steps_per_s": 2.5},
          {"variant": "cast", "length": 1024, "median_ms": 100.0, "memory_mib": 50.0,
           "steps_per_s": 10.0},
          {"variant": "cast", "length": 2048, "median_ms": math.nan, "memory_mib": math.nan,
           "steps_per_s": math.nan}]
  efficiency.add_ratios(rows)
  lines = efficiency._length_table(rows, [1024, 2048], "Speed", "steps_per_s", "speed", ".3g")
  assert lines[0] == "## Speed (x best dense; x XLA path)"
  assert lines[-1] == "| cast | 10 (4x; 4x) | - |"
