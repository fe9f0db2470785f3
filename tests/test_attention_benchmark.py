"""Tests of the attention benchmark's flag handling and target read-out (no timing).

experiments/benchmarks/attention.py is a script, loaded here from its path.
"""

import importlib.util
import math
import pathlib
import sys

import jax
import numpy as np
import pytest

_PATH = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "benchmarks" / "attention.py"
sys.path.insert(0, str(_PATH.parent))  # its sibling modules (cpu_memory), as when run as a script
_SPEC = importlib.util.spec_from_file_location("attention_benchmark", _PATH)
bench = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = bench        # dataclasses look their module up there
_SPEC.loader.exec_module(bench)


def row(mechanism, passes, length, median_ms, memory_mib=1.0, gflop_per_s=math.nan):
  return {"mechanism": mechanism, "passes": passes, "length": length, "batch": 1,
          "dtype": "float32", "median_ms": median_ms, "memory_mib": memory_mib,
          "gflop_per_s": gflop_per_s}


def test_preset_fills_only_missing_flags():
  args = bench.parse_args(["--preset=targets_8192", "--reps=4"])
  assert args.lengths == [8192] and args.passes == ["fwd+bwd"] and args.capped_reps == 3
  assert args.reps == 4
  args = bench.parse_args(["--lengths=64,128", "--mechanisms=dense.layer"])
  assert args.lengths == [64, 128] and args.mechanisms == ["dense.layer"]
  assert args.batches == [1, 8] and args.passes == ["fwd", "fwd+bwd"]   # the sweep's defaults


@pytest.mark.parametrize("flags", [["--mechanisms=dense.layer,linformer"], ["--reps=0"]])
def test_bad_flags_are_errors(flags):
  with pytest.raises(SystemExit):
    bench.parse_args(flags)


def test_unknown_mechanism_in_build_cases_is_an_error():
  with pytest.raises(ValueError, match="unknown mechanism 'cast.layer'"):
    bench.build_cases("cast.layer", 1, 16, 2, 4, "float32", 0.1)


def test_target_lines_ratios_and_derived_dense_layer():
  rows = [row("dense.proper", "fwd+bwd", 8192, 6000.0),
          {**row("dense_tokamax.proper", "fwd+bwd", 8192, 4000.0), "min_ms": 3800.0,
           "max_ms": 4400.0},
          {**row("cast_topk.proper", "fwd+bwd", 8192, 50.0, gflop_per_s=60.0), "min_ms": 40.0,
           "max_ms": 55.0},
          row("cast_topk.layer", "fwd+bwd", 8192, 250.0),
          row("cast_topk.proper", "fwd+bwd", 4096, 1.0, memory_mib=100.0),
          row("cast_topk.proper", "fwd+bwd", 16384, 1.0, memory_mib=500.0),
          row("dense.layer", "fwd", 1024, 300.0),
          row("sparsifiner_gather.layer", "fwd", 1024, 100.0)]
  lines = bench.target_lines(rows, {"matmul_gflop_per_s": 100.0})
  text = "\n".join(lines)
  # The best dense is tokamax's (4000 ms): 80x, the XLA path 120x; spread 3800/55 .. 4400/40.
  assert ("(proper) fwd+bwd at N=8192: 80.0x faster than the best dense (dense_tokamax.proper, "
          "4000 ms) (range 69.1-110.0x over the repetitions); 120.0x the XLA path (dense.proper) "
          "(target >= 40x): **met**") in text
  # Dense layers = proper + (250 - 50) ms of projections: tokamax 4200 / 250 = 16.8x.
  assert "(layer) fwd+bwd at N=8192: 16.8x faster than the best dense (dense_tokamax.layer" in text
  assert "24.8x the XLA path (dense.layer)" in text and "derived" in text
  assert "0.60 of this run's dense-matmul 100.0 GFLOP/s (target >= 0.3): **met**" in text
  assert "memory 4096 -> 16384 tokens: 5.00x (target <= 4.5x): **missed**" in text
  assert "fwd at N=1024: 3.00x dense's speed (target >= 2x): **met**" in text


def test_block_target_lines_read_the_best_dense_layer():
  rows = [row("dense.layer", "fwd+bwd", 1024, 300.0),
          row("dense_tokamax.layer", "fwd+bwd", 1024, 90.0),
          row("sparsifiner_gather.layer", "fwd+bwd", 1024, 600.0),
          row("sparsifiner_block.layer", "fwd+bwd", 1024, 20.0),
          {**row("sparsifiner_block.layer", "fwd+bwd", 4096, 100.0, memory_mib=600.0),
           "temp_mib": 300.0, "heads": 8},
          row("dense.layer", "fwd+bwd", 4096, 700.0)]
  text = "\n".join(bench.target_lines(rows, {"matmul_gflop_per_s": 100.0}))
  assert ("fwd+bwd at N=1024: 4.50x the best dense layer (dense_tokamax.layer, 90.0 ms); 15.00x "
          "the XLA path (dense.layer); 30.0x the token-level gather path (target >= 3x): "
          "**met**") in text
  assert "fwd+bwd at N=4096: 7.00x the best dense layer (dense.layer, 700.0 ms) " in text
  assert "(target >= 8x): **missed**" in text
  assert ("temporaries at N=4096: 300.0 MiB (with arguments and outputs 600.0 MiB) against one "
          "[H, N, N] float32 buffer (512 MiB): **met**") in text


def test_block_target_lines_read_the_attention_proper_too():
  rows = [row("dense.proper", "fwd", 1024, 30.0), row("dense_tokamax.proper", "fwd", 1024, 24.0),
          row("sparsifiner_block.proper", "fwd", 1024, 6.0),
          row("sparsifiner_block.layer", "fwd", 1024, 20.0),
          row("dense_tokamax.layer", "fwd", 1024, 40.0)]
  text = "\n".join(bench.target_lines(rows, {"matmul_gflop_per_s": 100.0}))
  assert ("block path (proper; keep rate of the run, predictor included) fwd at N=1024: 4.00x the "
          "best dense attention proper (dense_tokamax.proper, 24.0 ms); 5.00x the XLA path "
          "(dense.proper) (target >= 3x): **met**") in text
  assert ("block path (layer; keep rate of the run, predictor included) fwd at N=1024: 2.00x the "
          "best dense layer (dense_tokamax.layer, 40.0 ms) (target >= 3x): **missed**") in text


def test_block_proper_case_at_keep_rate_one_is_dense_attention():
  """Every key block kept: the block path's proper case computes dense attention."""
  block = bench.build_cases("sparsifiner_block.proper", 1, 256, 2, 16, "float32", 1.0)
  dense = bench.build_cases("dense.proper", 1, 256, 2, 16, "float32", 1.0)
  np.testing.assert_allclose(block[0].fn(*block[0].args), dense[0].fn(*dense[0].args),
                             atol=2e-5)
  grads = block[1].fn(*block[1].args)
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))


def test_dense_tokamax_cases_equal_the_xla_path():
  """The tokamax anchor computes the same attention as the XLA path (values of both scopes)."""
  for scope in ("layer", "proper"):
    xla = bench.build_cases(f"dense.{scope}", 1, 64, 2, 8, "float32", 0.1)[0]
    chunked = bench.build_cases(f"dense_tokamax.{scope}", 1, 64, 2, 8, "float32", 0.1)[0]
    np.testing.assert_allclose(chunked.fn(*chunked.args), xla.fn(*xla.args), atol=1e-5)


def test_cast_flops_do_not_depend_on_the_intra_chunk():
  """XLA counts a loop body once; the benchmark counts CAST's chunked intra-cluster loop as one
  step of all clusters, so the FLOPs it reports are the same for any chunk size."""
  from clustr_jax.attention import cast
  counts = []
  saved = cast.INTRA_CHUNK_CLUSTERS
  try:
    for chunk in (16, 4):
      cast.INTRA_CHUNK_CLUSTERS = chunk
      case = bench.build_cases("cast_topk.proper", 1, 256, 2, 8, "float32", 0.1)[1]
      bench.compile_case(case, max_memory_bytes=2**30)
      counts.append(case.flops)
  finally:
    cast.INTRA_CHUNK_CLUSTERS = saved
  assert counts[0] == counts[1] > 0
