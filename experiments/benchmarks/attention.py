r"""Attention benchmark: time, FLOPs and peak memory of every mechanism against sequence length.

For each dtype, batch size and length it compiles, per mechanism, a forward and a forward+backward
function (the loss sum(y^2), gradients with respect to the parameters and the input), reports the
compile time apart, the XLA cost analysis FLOPs, the compiled memory analysis (arguments + outputs
+ temporaries - aliases) and the device's peak memory where the backend keeps statistics, and then
times them: a warm-up call, then repetitions of all mechanisms interleaved (one call of each in
turn, so that load from other processes hits all of them alike), ``block_until_ready``, median.
A square matmul runs in the same interleaved loop and gives the dense-matmul FLOP/s ceiling of
this run. ``os.getloadavg()`` is recorded before and after. Run as a script, it re-executes
itself with glibc malloc keeping freed memory (``cpu_memory.py``: otherwise every call
page-faults its buffers in again, 30 % of CAST's time in this project's VMs); --malloc_defaults
keeps glibc's defaults. Either way the output names the setting.

Mechanisms (the name's suffix is the scope):
  dense.layer, dense.proper     DenseAttention (XLA; cuDNN on GPU), ``jax.nn.dot_product_attention``
                                with ``implementation='xla'``: materialises [B, H, N, N]
  dense_tokamax.layer/.proper   the same through tokamax's memory-efficient ``xla_chunked``
                                kernel (``tokamax.dot_product_attention``; no [N, N] array)
  clustr.layer                  ClusTRAttention, num_clusters (N/64, N/16) (the first pyramid
                                stage's sr_ratio 8), distance_chunk_size 256
  clustr.clustering             its DPC-kNN clustering alone (forward; no gradient flows through it)
  cast_topk.layer/.proper       CASTAttention Top-K, N_c 64, kappa 128 (fixed: the O(aN) regime)
  cast_satopk.layer/.proper     the same with SA Top-K ('argmax')
  sparsifiner_gather.layer      SparsifinerAttention mode B, keep rate 0.1, path 'gather'
  sparsifiner_masked.layer      the same, path 'masked' (the official dense-then-mask)
  sparsifiner_block.layer       the same, path 'block' (ours: key blocks of 64 tokens chosen per
                                query block from block-averaged predictor factors)
  sparsifiner_block.proper      its predictor (from q and k), block choice and block attention,
                                without the q/k/v/output projections
  sparsifiner.predictor         its connectivity predictor alone (q, k -> A^, forward)
  sparsifiner.topk              the top-k over A^'s N columns alone (forward; ``base.top_k``)
'layer' is the whole module (input and output projections included); 'proper' runs from the
heads' queries, keys and values to the heads' outputs (CAST's surrogate affinities included).

Caps keep a run bounded: a mechanism whose compiled memory exceeds --max_memory_gb is skipped;
one whose warm-up call exceeds --time_cap_s gets --capped_reps timings (its warm-up counts as the
first) instead of --reps, and is not run at larger lengths unless listed in --uncapped (the
output says so in the 'note' column).

  # The targets (dense at N = 8192 dominates: 9-31 s per fwd+bwd call on 2 cores):
  python experiments/benchmarks/attention.py --preset=targets_8192
  python experiments/benchmarks/attention.py --preset=targets_scaling
  python experiments/benchmarks/attention.py --preset=targets_short
  python experiments/benchmarks/attention.py --preset=targets_block
  # The sweep (lengths 512 .. 65536, batch 1 and 8, float32 and bfloat16, 3 repetitions, a
  # mechanism stopped after a call over 3 s; about 30 min on 2 cores):
  python experiments/benchmarks/attention.py --preset=sweep
  # Any subset:
  python experiments/benchmarks/attention.py --lengths=1024,4096 --batches=1 \
      --dtypes=float32 --mechanisms=dense.layer,cast_topk.layer --output=/tmp/bench

Outputs: <output>.csv (one row per mechanism, length, batch, dtype and pass), <output>.md (the
table, the run's settings, load averages and the matmul ceiling) and, for a sweep,
<output>_time.png and <output>_memory.png (log-log against length) when it covers several
lengths. Plots need matplotlib
(``pip install -e '.[bench]'``).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import os
import pathlib
import platform
import statistics
import sys
import time
from typing import Any, Callable

import cpu_memory
import jax
import jax.numpy as jnp
import numpy as np

from clustr_jax.attention import base, cast, clustr, dense, sparsifiner
from clustr_jax.attention.cast import CASTAttention
from clustr_jax.attention.clustr import ClusTRAttention
from clustr_jax.attention.dense import DenseAttention
from clustr_jax.attention.sparsifiner import MaskPredictor, SparsifinerAttention

REPO = pathlib.Path(__file__).resolve().parents[2]
RESULTS = REPO / "experiments" / "results"
MATMUL_SIZE = 2048
CAST_CLUSTERS, CAST_KAPPA = 64, 128
CLUSTR_CHUNK = 256


@dataclasses.dataclass
class Case:
  """One benchmarked function: ``fn(*args)`` (jitted), its FLOPs and memory once compiled."""
  mechanism: str
  passes: str                       # 'fwd' or 'fwd+bwd'
  fn: Callable[..., Any]
  args: tuple[Any, ...]
  compiled: Any = None
  compile_s: float = float("nan")
  flops: float = float("nan")
  memory_bytes: float = float("nan")
  temp_bytes: float = float("nan")
  device_peak_bytes: float = float("nan")
  times: list[float] = dataclasses.field(default_factory=list)
  note: str = ""
  # (module, constant, value) set while tracing the FLOP-count copy: the chunk constants of the
  # CPU loops (CAST's intra-cluster attention, Sparsifiner's gather rows), as one step of all.
  flops_overrides: tuple[tuple[Any, str, int], ...] = ()


def _loss_grad(apply: Callable[..., jax.Array], argnums: tuple[int, ...]):
  """grad of sum(apply(*args)^2) (float32) with respect to the arguments ``argnums``."""
  def loss(*args):
    return jnp.sum(jnp.square(apply(*args).astype(jnp.float32)))
  return jax.grad(loss, argnums=argnums)


def _module_cases(name: str, module, x: jax.Array, mask: jax.Array) -> list[Case]:
  variables = jax.jit(module.init)(jax.random.key(1), x, mask)
  apply = lambda v, x: module.apply(v, x, mask)  # noqa: E731
  return [Case(name, "fwd", jax.jit(apply), (variables, x)),
          Case(name, "fwd+bwd", jax.jit(_loss_grad(apply, (0, 1))), (variables, x))]


def _qkv(batch: int, length: int, heads: int, head_dim: int, dtype) -> tuple[jax.Array, ...]:
  keys = jax.random.split(jax.random.key(2), 3)
  return tuple(jax.random.normal(k, (batch, length, heads, head_dim), dtype) for k in keys)


def build_cases(mechanism: str, batch: int, length: int, heads: int, head_dim: int,
                dtype, sparsifiner_keep_rate: float) -> list[Case]:
  """The fwd and fwd+bwd cases of one mechanism (see the module docstring for the names).

  Raises:
    ValueError: an unknown mechanism name.
  """
  features = heads * head_dim
  x = jax.random.normal(jax.random.key(0), (batch, length, features), dtype)
  mask = jnp.ones((batch, length), bool)
  family, _, scope = mechanism.partition(".")
  cast_kwargs = {"num_clusters": CAST_CLUSTERS, "cluster_size": min(CAST_KAPPA, length)}
  sa = {"cast_topk": "top_k", "cast_satopk": "sa_top_k"}.get(family)
  # cuDNN's fused kernel on a GPU where it applies, else the XLA path (docs/gpu_tpu.md).
  platform = "cuda" if jax.default_backend() == "gpu" else "cpu"
  fused = dense.choose_implementation(platform, dtype, head_dim, length) == "cudnn"
  impl = "cudnn" if fused else "xla"
  if family == "dense_tokamax":
    impl = "xla_chunked"
  if scope == "layer" and family in ("dense", "dense_tokamax"):
    return _module_cases(mechanism, DenseAttention(heads, implementation=impl, dtype=dtype), x,
                         mask)
  if scope == "proper" and family in ("dense", "dense_tokamax"):
    fn = lambda q, k, v: dense.attend(q, k, v, mask, implementation=impl)  # noqa: E731
    args = _qkv(batch, length, heads, head_dim, dtype)
    return [Case(mechanism, "fwd", jax.jit(fn), args),
            Case(mechanism, "fwd+bwd", jax.jit(_loss_grad(fn, (0, 1, 2))), args)]
  if sa and scope == "layer":
    cases = _module_cases(mechanism, CASTAttention(heads, clustering=sa, dtype=dtype,
                                                   **cast_kwargs), x, mask)
  elif sa and scope == "proper":
    s = 0.02 * jax.random.normal(jax.random.key(3), (heads, CAST_CLUSTERS, head_dim), dtype)
    fn = lambda q, k, v, s: cast.cast_attention(  # noqa: E731
        q, k, v, s, mask, cluster_size=cast_kwargs["cluster_size"], clustering=sa)[0]
    args = _qkv(batch, length, heads, head_dim, dtype) + (s,)
    cases = [Case(mechanism, "fwd", jax.jit(fn), args),
             Case(mechanism, "fwd+bwd", jax.jit(_loss_grad(fn, (0, 1, 2, 3))), args)]
  if sa:
    for case in cases:
      case.flops_overrides = ((cast, "INTRA_CHUNK_CLUSTERS", batch * heads * CAST_CLUSTERS),)
    return cases
  clustr_kwargs = {"num_clusters": (max(length // 64, 1), max(length // 16, 1)),
                   "distance_chunk_size": CLUSTR_CHUNK}
  if mechanism == "clustr.layer":
    return _module_cases(mechanism, ClusTRAttention(heads, dtype=dtype, **clustr_kwargs), x, mask)
  if mechanism == "clustr.clustering":
    fn = lambda x: clustr.dpc_knn_cluster(  # noqa: E731
        x, mask, clustr_kwargs["num_clusters"], chunk_size=CLUSTR_CHUNK).labels
    return [Case(mechanism, "fwd", jax.jit(fn), (x,))]
  if mechanism in ("sparsifiner.predictor", "sparsifiner.topk"):
    k_att = min(math.ceil(sparsifiner_keep_rate * length), length)
    predictor = MaskPredictor(heads, head_dim // 2, length // 6, 6)     # the module's defaults
    q, k, _ = _qkv(batch, length, heads, head_dim, dtype)
    params = jax.jit(predictor.init)(jax.random.key(1), q, k, mask)
    predict = jax.jit(lambda p, q, k: predictor.apply(p, q, k, mask))  # noqa: E731
    if mechanism == "sparsifiner.predictor":
      return [Case(mechanism, "fwd", predict, (params, q, k))]
    approx = predict(params, q, k)
    return [Case(mechanism, "fwd", jax.jit(lambda a: base.top_k(a, k_att)[1]), (approx,))]
  if mechanism == "sparsifiner_block.proper":
    # From the heads' q, k, v: the predictor's block scores, the block choice and attention.
    predictor = MaskPredictor(heads, head_dim // 2, length // 6, 6,     # the module's defaults
                              block_size=SPARSIFINER_BLOCK)
    q, k, v = _qkv(batch, length, heads, head_dim, dtype)
    params = jax.jit(predictor.init)(jax.random.key(1), q, k, mask)

    def block_fn(params, q, k, v):
      scores = predictor.apply(params, q, k, mask)
      return sparsifiner.block_attention(
          q, k, v, mask, scores, keep_rate=sparsifiner_keep_rate, block_size=SPARSIFINER_BLOCK,
          has_cls_token=predictor.has_cls_token, scale=head_dim ** -0.5)[0]
    args = (params, q, k, v)
    return [Case(mechanism, "fwd", jax.jit(block_fn), args),
            Case(mechanism, "fwd+bwd", jax.jit(_loss_grad(block_fn, (0, 1, 2, 3))), args)]
  if family == "sparsifiner_block":
    module = SparsifinerAttention(heads, keep_rate=sparsifiner_keep_rate, dtype=dtype,
                                  path="block", block_size=SPARSIFINER_BLOCK)
    return _module_cases(mechanism, module, x, mask)
  if family == "sparsifiner_gather" or family == "sparsifiner_masked":
    module = SparsifinerAttention(heads, keep_rate=sparsifiner_keep_rate, dtype=dtype,
                                  path=family.split("_")[1])
    cases = _module_cases(mechanism, module, x, mask)
    for case in cases:   # its patch queries (the CLS row is dense) in one step
      case.flops_overrides = ((sparsifiner, "GATHER_CHUNK_ROWS", batch * heads * (length - 1)),)
    return cases
  raise ValueError(f"unknown mechanism {mechanism!r}; valid: {', '.join(MECHANISMS)}")


MECHANISMS = ("dense.layer", "dense.proper", "dense_tokamax.layer", "dense_tokamax.proper",
              "clustr.layer", "clustr.clustering",
              "cast_topk.layer", "cast_topk.proper", "cast_satopk.layer", "cast_satopk.proper",
              "sparsifiner_gather.layer", "sparsifiner_masked.layer", "sparsifiner_block.layer",
              "sparsifiner_block.proper", "sparsifiner.predictor", "sparsifiner.topk")

#: The mechanism families that are dense attention (read as "the best dense" by the targets).
DENSE_FAMILIES = ("dense", "dense_tokamax")

#: Tokens per block of the Sparsifiner block path in these benchmarks (the module's default).
SPARSIFINER_BLOCK = 64


def compile_case(case: Case, max_memory_bytes: float) -> None:
  """Compiles ``case`` (timed), reads its cost and memory analysis; marks it skipped if too big."""
  start = time.perf_counter()
  case.compiled = case.fn.lower(*case.args).compile()
  case.compile_s = time.perf_counter() - start
  cost = case.compiled.cost_analysis()
  if case.flops_overrides:
    # XLA's cost analysis counts a loop body once: the CPU paths of CAST and Sparsifiner loop
    # over chunks, so their FLOPs are counted on a copy traced with one chunk of everything
    # (the same operations in a one-step loop).
    saved = [getattr(module, name) for module, name, _ in case.flops_overrides]
    try:
      for module, name, value in case.flops_overrides:
        setattr(module, name, value)
      fn = case.fn.__wrapped__ if hasattr(case.fn, "__wrapped__") else case.fn
      cost = jax.jit(lambda *a: fn(*a)).lower(*case.args).compile().cost_analysis()
    finally:
      for (module, name, _), value in zip(case.flops_overrides, saved):
        setattr(module, name, value)
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  case.flops = float((cost or {}).get("flops", float("nan")))
  mem = case.compiled.memory_analysis()
  if mem is not None:
    case.memory_bytes = float(mem.argument_size_in_bytes + mem.output_size_in_bytes
                              + mem.temp_size_in_bytes - mem.alias_size_in_bytes)
    case.temp_bytes = float(mem.temp_size_in_bytes)
  if case.memory_bytes > max_memory_bytes:
    case.note = f"skipped: compiled memory {case.memory_bytes / 2**30:.1f} GiB > cap"
    case.compiled = None


def _device_peak() -> float:
  stats = jax.devices()[0].memory_stats()
  return float(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else math.nan


def _timed_call(fn: Callable[..., Any], args) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - start


def run_interleaved(cases: list[Case], reps: int, capped_reps: int, time_cap_s: float,
                    matmul_times: list[float]) -> None:
  """Warm-up call of each case, then ``reps`` rounds with one call of every case per round.

  A case whose warm-up exceeds ``time_cap_s`` is capped: its warm-up call counts as its first
  timing (compilation is already done ahead of time, so it holds no compile time) and it takes
  part in rounds only until it has ``capped_reps`` timings. One square matmul per round goes
  into ``matmul_times``.
  """
  live = [c for c in cases if c.compiled is not None]
  a = jax.random.normal(jax.random.key(4), (MATMUL_SIZE, MATMUL_SIZE), jnp.float32)
  matmul = jax.jit(lambda a: a @ a).lower(a).compile()
  jax.block_until_ready(matmul(a))
  for case in live:
    warm = _timed_call(case.compiled, case.args)
    case.device_peak_bytes = _device_peak()
    if warm > time_cap_s:
      case.times.append(warm)
      case.note = (f"warm-up {warm:.1f} s > {time_cap_s:g} s cap: {capped_reps} timing(s), "
                   "the warm-up included")
  for _ in range(reps):
    matmul_times.append(_timed_call(matmul, (a,)))
    for case in live:
      if not case.note or len(case.times) < capped_reps:
        case.times.append(_timed_call(case.compiled, case.args))


def _median(times: list[float]) -> float:
  return statistics.median(times) if times else math.nan


def run(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
  """Runs the benchmark described by ``args``; returns (rows, run info)."""
  info: dict[str, Any] = {"loadavg_start": os.getloadavg(), "backend": jax.default_backend(),
                          "device": str(jax.devices()[0]), "jax": jax.__version__,
                          "machine": platform.processor() or platform.machine(),
                          "cpus": os.cpu_count(), "command": " ".join(sys.argv),
                          "malloc": cpu_memory.describe()}
  rows: list[dict[str, Any]] = []
  matmul_times: list[float] = []
  capped: set[tuple[str, str]] = set()
  for dtype_name in args.dtypes:
    dtype = jnp.dtype(dtype_name)
    for batch in args.batches:
      for length in args.lengths:
        cases: list[Case] = []
        for mechanism in args.mechanisms:
          if (mechanism, f"{dtype_name}/{batch}") in capped:
            continue
          for case in build_cases(mechanism, batch, length, args.heads, args.head_dim, dtype,
                                  args.sparsifiner_keep_rate):
            if case.passes not in args.passes:
              continue
            compile_case(case, args.max_memory_gb * 2**30)
            cases.append(case)
        run_interleaved(cases, args.reps, args.capped_reps, args.time_cap_s, matmul_times)
        for case in cases:
          if case.note and case.mechanism not in args.uncapped:
            capped.add((case.mechanism, f"{dtype_name}/{batch}"))
          median = _median(case.times)
          rows.append({
              "mechanism": case.mechanism, "passes": case.passes, "dtype": dtype_name,
              "batch": batch, "length": length, "heads": args.heads, "head_dim": args.head_dim,
              "median_ms": round(median * 1e3, 3),
              "min_ms": round(min(case.times) * 1e3, 3) if case.times else math.nan,
              "max_ms": round(max(case.times) * 1e3, 3) if case.times else math.nan,
              "reps": len(case.times),
              "compile_s": round(case.compile_s, 2), "gflops": round(case.flops / 1e9, 3),
              "gflop_per_s": round(case.flops / median / 1e9, 2) if case.times else math.nan,
              "memory_mib": round(case.memory_bytes / 2**20, 1),
              "temp_mib": round(case.temp_bytes / 2**20, 1),
              "device_peak_mib": round(case.device_peak_bytes / 2**20, 1),
              "note": case.note})
        print(f"[{dtype_name} B={batch} N={length}] " + ", ".join(
            f"{r['mechanism']}/{r['passes']} {r['median_ms']:.1f} ms"
            for r in rows[len(rows) - len(cases):]),
            flush=True)
  info["loadavg_end"] = os.getloadavg()
  info["matmul_gflop_per_s"] = round(2 * MATMUL_SIZE ** 3 / _median(matmul_times) / 1e9, 1)
  info["matmul_reps"] = len(matmul_times)
  return rows, info


def _find(rows, mechanism, passes, length, batch=1, dtype="float32"):
  for r in rows:
    if (r["mechanism"], r["passes"], r["length"], r["batch"], r["dtype"]) == (
        mechanism, passes, length, batch, dtype):
      return r
  return None


def _dense_variants(rows, scope, passes, length, batch=1, dtype="float32") -> dict[str, dict]:
  """{mechanism: row} of the dense variants (``dense``, ``dense_tokamax``) of one scope measured
  for (passes, length, batch, dtype) in this run."""
  return {r["mechanism"]: r for r in rows
          if r["mechanism"].split(".")[0] in DENSE_FAMILIES and r["mechanism"].endswith(
              f".{scope}") and (r["passes"], r["length"], r["batch"], r["dtype"]) ==
          (passes, length, batch, dtype) and r.get("median_ms")}


def _spread(fast: dict, slow: dict) -> str:
  """' (a-b over the repetitions)': the ratio slow/fast from its least to its most favourable
  pair of single timings, when both rows carry min_ms and max_ms."""
  try:
    low, high = slow["min_ms"] / fast["max_ms"], slow["max_ms"] / fast["min_ms"]
  except (KeyError, TypeError, ZeroDivisionError):
    return ""
  return f" (range {low:.1f}-{high:.1f}x over the repetitions)" if math.isfinite(low) else ""


def target_lines(rows: list[dict[str, Any]], info: dict[str, Any]) -> list[str]:
  """The targets that this run's rows can answer (issues 7 and 15), as Markdown lines. Ratios are
  read against the best dense variant of the run (the fastest ``dense*`` row of the same scope,
  passes and length), with the XLA path's ratio beside it."""
  lines = []

  def ratio(num, den, field="median_ms"):
    return num[field] / den[field] if num and den and den[field] else math.nan

  def status(ok: bool) -> str:
    return "**met**" if ok else "**missed**"

  cast_proper = _find(rows, "cast_topk.proper", "fwd+bwd", 8192)
  for scope, goal in (("proper", 40.0), ("layer", None)):
    castr = _find(rows, f"cast_topk.{scope}", "fwd+bwd", 8192)
    if not castr:
      continue
    denses = _dense_variants(rows, scope, "fwd+bwd", 8192)
    derived = ""
    if scope == "layer" and not denses and cast_proper:
      # Not run (dense at 8192 is slow): the layer's projections cost the same in both, so dense
      # layer = dense proper + (CAST layer - CAST proper), all from this run.
      projections = castr["median_ms"] - cast_proper["median_ms"]
      denses = {name.replace(".proper", ".layer"): {"median_ms": r["median_ms"] + projections}
                for name, r in _dense_variants(rows, "proper", "fwd+bwd", 8192).items()}
      derived = " (dense layers derived: dense proper + CAST's projection time, this run)"
    if not denses:
      continue
    best_name, best = min(denses.items(), key=lambda item: item[1]["median_ms"])
    r = ratio(best, castr)
    xla = denses.get(f"dense.{scope}")
    xla_text = (f"; {ratio(xla, castr):.1f}x the XLA path (dense.{scope})"
                if xla and best_name != f"dense.{scope}" else "")
    target = f" (target >= {goal:g}x): {status(r >= goal)}" if goal else ""
    lines.append(f"- CAST Top-K ({scope}) fwd+bwd at N=8192: {r:.1f}x faster than the best dense "
                 f"({best_name}, {best['median_ms']:.0f} ms){_spread(castr, best)}{xla_text}"
                 f"{target}{derived}")
  castr = _find(rows, "cast_topk.proper", "fwd+bwd", 8192)
  if castr:
    share = castr["gflop_per_s"] / info["matmul_gflop_per_s"]
    lines.append(f"- CAST Top-K (proper) fwd+bwd at N=8192: {castr['gflop_per_s']:.1f} GFLOP/s "
                 f"= {share:.2f} of this run's dense-matmul {info['matmul_gflop_per_s']} "
                 f"GFLOP/s (target >= 0.3): {status(share >= 0.3)}")
  for scope in ("proper", "layer"):
    small = _find(rows, f"cast_topk.{scope}", "fwd+bwd", 4096)
    large = _find(rows, f"cast_topk.{scope}", "fwd+bwd", 16384)
    if small and large:
      r = ratio(large, small, "memory_mib")
      lines.append(f"- CAST Top-K ({scope}) fwd+bwd compiled memory 4096 -> 16384 tokens: "
                   f"{r:.2f}x (target <= 4.5x): {status(r <= 4.5)}")
  for length in sorted({r["length"] for r in rows}):
    layer = _find(rows, "clustr.layer", "fwd", length)
    clus = _find(rows, "clustr.clustering", "fwd", length)
    if layer and clus:
      lines.append(f"- ClusTR at N={length}: clustering {clus['median_ms']:.1f} ms = "
                   f"{ratio(clus, layer):.0%} of the layer's forward ({layer['median_ms']:.1f} ms)")
  for length in sorted({r["length"] for r in rows}):
    layer = _find(rows, "sparsifiner_gather.layer", "fwd", length)
    parts = [_find(rows, f"sparsifiner.{p}", "fwd", length) for p in ("predictor", "topk")]
    if layer and all(parts):
      lines.append(f"- Sparsifiner at N={length}: of its forward ({layer['median_ms']:.1f} ms), "
                   f"the predictor takes {ratio(parts[0], layer):.0%} and the top-k over A^ "
                   f"{ratio(parts[1], layer):.0%}")
  for length, passes, goal in ((1024, "fwd", 2.0), (1024, "fwd+bwd", 1.0), (197, "fwd", 1.0)):
    dense = _find(rows, "dense.layer", passes, length)
    sp = _find(rows, "sparsifiner_gather.layer", passes, length)
    if dense and sp:
      r = ratio(dense, sp)
      lines.append(f"- Sparsifiner (gather, predictor included) {passes} at N={length}: "
                   f"{r:.2f}x dense's speed (target >= {goal:g}x): {status(r >= goal)}")
  lines.extend(_block_target_lines(rows, ratio, status))
  return lines


def _block_target_lines(rows, ratio, status) -> list[str]:
  """Sparsifiner's block path against the best dense of the run (the fastest dense.* variant
  measured for the same scope, length and passes) and, for the layer, its token-level gather
  path. The layer scope includes the q/k/v/output projections, which cost dense and the block
  path alike; the proper scope (predictor included) is what the block path changes."""
  lines = []
  names = {"layer": "layer", "proper": "attention proper"}
  for scope in ("layer", "proper"):
    for length, passes, goal in ((1024, "fwd+bwd", 3.0), (4096, "fwd+bwd", 8.0),
                                 (1024, "fwd", 3.0)):
      block = _find(rows, f"sparsifiner_block.{scope}", passes, length)
      denses = _dense_variants(rows, scope, passes, length)
      if not (block and denses):
        continue
      best = min(denses.values(), key=lambda r: r["median_ms"])
      gather = _find(rows, f"sparsifiner_gather.{scope}", passes, length)
      xla = denses.get(f"dense.{scope}")
      r = ratio(best, block)
      extra = (f"; {ratio(xla, block):.2f}x the XLA path (dense.{scope})"
               if xla and xla is not best else "")
      extra += (f"; {ratio(gather, block):.1f}x the token-level gather path" if gather else "")
      lines.append(f"- Sparsifiner block path ({scope}; keep rate of the run, predictor "
                   f"included) {passes} at N={length}: {r:.2f}x the best dense {names[scope]} "
                   f"({best['mechanism']}, {best['median_ms']:.1f} ms){_spread(block, best)}"
                   f"{extra} (target >= {goal:g}x): {status(r >= goal)}")
  block = _find(rows, "sparsifiner_block.layer", "fwd+bwd", 4096)
  if block and block.get("temp_mib"):
    heads = block["heads"]
    square_mib = heads * 4096 * 4096 * 4 / 2 ** 20
    lines.append(f"- Sparsifiner block path fwd+bwd compiled temporaries at N=4096: "
                 f"{block['temp_mib']:.1f} MiB (with arguments and outputs "
                 f"{block['memory_mib']:.1f} MiB) against one [H, N, N] float32 buffer "
                 f"({square_mib:.0f} MiB): {status(block['temp_mib'] < square_mib)}")
  return lines


def write_csv(rows: list[dict[str, Any]], path: str | pathlib.Path) -> None:
  """Writes ``rows`` (dicts with the same keys, in order) to the CSV file ``path``, creating its
  folder; the first row's keys are the header. Shared by the benchmark scripts."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)


def write_outputs(rows: list[dict[str, Any]], info: dict[str, Any], output: pathlib.Path,
                  plots: bool) -> None:
  """Writes <output>.csv, <output>.md and (if ``plots``) the two log-log plots."""
  write_csv(rows, f"{output}.csv")
  columns = ["mechanism", "passes", "dtype", "batch", "length", "median_ms", "reps", "compile_s",
             "gflops", "gflop_per_s", "memory_mib", "temp_mib", "note"]
  lines = [f"# Attention benchmark: `{output.name}`", "",
           f"Command: `{info['command']}`", "",
           f"Backend {info['backend']} ({info['device']}, {info['machine']}, {info['cpus']} CPUs),"
           f" jax {info['jax']}; {info['malloc']}. Load average (1, 5, 15 min) at the start "
           f"{tuple(round(x, 2) for x in info['loadavg_start'])}, at the end "
           f"{tuple(round(x, 2) for x in info['loadavg_end'])}. Dense {MATMUL_SIZE}^2 matmul in "
           f"the same interleaved loop: {info['matmul_gflop_per_s']} GFLOP/s (median of "
           f"{info['matmul_reps']}).", "",
           "Times are medians over the interleaved repetitions after a warm-up call; compile time "
           "apart; GFLOPs from XLA's cost analysis; memory = compiled arguments + outputs + "
           "temporaries - aliases (MiB); temp = the temporaries alone (MiB).", ""]
  targets = target_lines(rows, info)
  if targets:
    lines += ["## Targets", ""] + targets + [""]
  lines += ["## All rows", "", "| " + " | ".join(columns) + " |",
            "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(str(r[c]) for c in columns) + " |" for r in rows]
  pathlib.Path(f"{output}.md").write_text("\n".join(lines) + "\n")
  if plots and len({r["length"] for r in rows}) > 1:
    _plot(rows, output)


def _plot(rows: list[dict[str, Any]], output: pathlib.Path) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  for field, label, suffix in (("median_ms", "time (ms)", "time"),
                               ("memory_mib", "compiled memory (MiB)", "memory")):
    groups = sorted({(r["dtype"], r["batch"], r["passes"]) for r in rows})
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4), squeeze=False)
    for ax, (dtype, batch, passes) in zip(axes[0], groups):
      for mechanism in dict.fromkeys(r["mechanism"] for r in rows):
        pts = [(r["length"], r[field]) for r in rows
               if (r["mechanism"], r["dtype"], r["batch"], r["passes"]) ==
               (mechanism, dtype, batch, passes) and np.isfinite(r[field])]
        if pts:
          ax.plot(*zip(*pts), marker="o", label=mechanism)
      ax.set(xscale="log", yscale="log", xlabel="sequence length", ylabel=label,
             title=f"{passes}, batch {batch}, {dtype}")
      ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(f"{output}_{suffix}.png", dpi=110)
    plt.close(fig)


PRESETS = {
    # The targets at N = 8192: CAST against dense attention (the XLA path and tokamax's chunked
    # kernel; the faster is the anchor), forward+backward. Dense is timed 3 times (its warm-up
    # call included; 9-31 s a call on 2 cores), and only the proper attention: the whole-layer
    # ratio adds CAST's measured projection time to it (add --mechanisms=dense.layer,... to
    # measure it directly).
    "targets_8192": {"lengths": [8192], "batches": [1], "dtypes": ["float32"],
                     "mechanisms": ["dense.proper", "dense_tokamax.proper", "cast_topk.layer",
                                    "cast_topk.proper"],
                     "passes": ["fwd+bwd"], "capped_reps": 3,
                     "output": str(RESULTS / "attention_targets_8192")},
    # CAST's memory (and time) from 4096 to 16384 tokens with fixed N_c and kappa; ClusTR's too.
    "targets_scaling": {"lengths": [4096, 8192, 16384], "batches": [1], "dtypes": ["float32"],
                        "mechanisms": ["cast_topk.layer", "cast_topk.proper",
                                       "cast_satopk.proper", "clustr.layer",
                                       "clustr.clustering"],
                        "output": str(RESULTS / "attention_targets_scaling")},
    # The targets at short lengths: Sparsifiner against dense at 1024 and 197.
    "targets_short": {"lengths": [197, 1024], "batches": [1], "dtypes": ["float32"],
                      "mechanisms": ["dense.layer", "dense.proper", "sparsifiner_gather.layer",
                                     "sparsifiner_masked.layer", "sparsifiner.predictor",
                                     "sparsifiner.topk", "clustr.layer", "clustr.clustering"],
                      "output": str(RESULTS / "attention_targets_short")},
    # Sparsifiner's block path against dense and its token-level path at 1024 and 4096 tokens.
    "targets_block": {"lengths": [1024, 4096], "batches": [1], "dtypes": ["float32"],
                      "mechanisms": ["dense.layer", "dense_tokamax.layer",
                                     "sparsifiner_gather.layer", "sparsifiner_block.layer",
                                     "dense.proper", "dense_tokamax.proper",
                                     "sparsifiner_block.proper"],
                      "output": str(RESULTS / "attention_targets_block")},
    # The committed sweep ran as four invocations of these settings, one per dtype and batch
    # (--dtypes=float32 --batches=1 ... --output=.../attention_sweep_float32_b1, and so on, with
    # --max_memory_gb=10); this preset runs them in one and writes one file.
    "sweep": {"lengths": [512, 1024, 2048, 4096, 8192, 16384, 32768, 65536], "batches": [1, 8],
              "dtypes": ["float32", "bfloat16"],
              "mechanisms": [m for m in MECHANISMS if m not in (
                  "cast_satopk.layer", "clustr.clustering", "sparsifiner.predictor",
                  "sparsifiner.topk")],
              "reps": 3, "capped_reps": 1, "time_cap_s": 3.0,
              "output": str(RESULTS / "attention_sweep")},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  """Command-line flags; a --preset fills the flags that were not given."""
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--preset", choices=sorted(PRESETS), default=None)
  csv_ints = lambda s: [int(v) for v in s.split(",")]  # noqa: E731
  csv_strs = lambda s: [v for v in s.split(",") if v]  # noqa: E731
  p.add_argument("--lengths", type=csv_ints, default=None)
  p.add_argument("--batches", type=csv_ints, default=None)
  p.add_argument("--dtypes", type=csv_strs, default=None)
  p.add_argument("--mechanisms", type=csv_strs, default=None,
                 help=f"comma-separated, from: {', '.join(MECHANISMS)}")
  p.add_argument("--uncapped", type=csv_strs, default=None,
                 help="mechanisms that keep running at larger lengths after exceeding the cap")
  p.add_argument("--passes", type=csv_strs, default=None, help="fwd and/or fwd+bwd")
  p.add_argument("--heads", type=int, default=8)
  p.add_argument("--head_dim", type=int, default=64)
  p.add_argument("--sparsifiner_keep_rate", type=float, default=0.1)
  p.add_argument("--reps", type=int, default=None, help="default 10")
  p.add_argument("--capped_reps", type=int, default=None, help="default 3")
  p.add_argument("--time_cap_s", type=float, default=None, help="default 5")
  p.add_argument("--max_memory_gb", type=float, default=12.0)
  p.add_argument("--output", default=None, help="path prefix of the outputs")
  p.add_argument("--no_plots", action="store_true")
  p.add_argument("--malloc_defaults", action="store_true",
                 help="keep glibc's malloc defaults instead of re-running with the settings of "
                      "cpu_memory.py (freed memory kept; see that file)")
  args = p.parse_args(argv)
  defaults = {"uncapped": [], "passes": ["fwd", "fwd+bwd"], "reps": 10, "capped_reps": 3,
              "time_cap_s": 5.0} | PRESETS.get(args.preset, PRESETS["sweep"] | {
      "output": str(RESULTS / "attention")})
  for key, value in defaults.items():
    if getattr(args, key) is None:
      setattr(args, key, value)
  unknown = [m for m in args.mechanisms if m not in MECHANISMS]
  if unknown:
    p.error(f"unknown --mechanisms {unknown}; valid: {', '.join(MECHANISMS)}")
  if args.reps < 1 or args.capped_reps < 1:
    p.error("--reps and --capped_reps must be >= 1")
  return args


def main(argv: list[str] | None = None) -> None:
  args = parse_args(argv)
  rows, info = run(args)
  write_outputs(rows, info, pathlib.Path(args.output), plots=not args.no_plots)
  print("\n".join(target_lines(rows, info)))
  print(f"wrote {args.output}.csv / .md")


if __name__ == "__main__":
  if "--malloc_defaults" not in sys.argv:
    cpu_memory.reexec_keeping_memory()
  main()
