r"""CAST attention proper: this checkout against an earlier commit, same inputs, interleaved timing.

Loads ``clustr_jax/attention/cast.py`` as it was at ``--baseline`` next to the current one and
runs ``cast_attention`` (Top-K, N_c 64, kappa 128, B = 1, 8 heads x 64, float32, as in
``attention.py``'s cast_topk.proper) forward and forward+backward (the loss sum(y^2), gradients
with respect to q, k, v and the surrogates) on the same inputs; checks that outputs and
gradients agree, reports each version's compiled memory, and times the two interleaved (median
of --reps after a warm-up), with glibc keeping freed memory unless --malloc_defaults
(``cpu_memory.py``).

  python experiments/benchmarks/cast_ab.py --baseline=0f68085 --lengths=4096,8192,16384

Writes <output>.md and <output>.csv (default experiments/results/cast_ab).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import cpu_memory
import jax
import jax.numpy as jnp
from baseline import REPO, load_baseline, write_ab_outputs

from clustr_jax.attention import cast

SOURCE = "clustr_jax/attention/cast.py"
HEADS, HEAD_DIM, CLUSTERS, KAPPA = 8, 64, 64, 128


def functions(module, mask):
  """(forward, forward+backward) of ``module.cast_attention``, jitted."""
  def fwd(q, k, v, s):
    return module.cast_attention(q, k, v, s, mask, cluster_size=KAPPA)[0]

  def loss(q, k, v, s):
    return jnp.sum(jnp.square(fwd(q, k, v, s)))
  return {"fwd": jax.jit(fwd), "fwd+bwd": jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--baseline", required=True, help="git commit of the baseline cast.py")
  p.add_argument("--lengths", default="4096,8192,16384")
  p.add_argument("--reps", type=int, default=10)
  p.add_argument("--output", default=str(REPO / "experiments" / "results" / "cast_ab"))
  p.add_argument("--malloc_defaults", action="store_true",
                 help="keep glibc's malloc defaults (see cpu_memory.py)")
  args = p.parse_args()
  versions = {"baseline": load_baseline(args.baseline, SOURCE), "current": cast}
  load_start = os.getloadavg()
  rows = []
  for length in [int(n) for n in args.lengths.split(",")]:
    keys = jax.random.split(jax.random.key(0), 4)
    qkv = [jax.random.normal(k, (1, length, HEADS, HEAD_DIM)) for k in keys[:3]]
    s = 0.02 * jax.random.normal(keys[3], (HEADS, CLUSTERS, HEAD_DIM))
    inputs = (*qkv, s)
    mask = jnp.ones((1, length), bool)
    fns = {name: functions(module, mask) for name, module in versions.items()}
    for passes in ("fwd", "fwd+bwd"):
      compiled = {name: fns[name][passes].lower(*inputs).compile() for name in versions}
      outs = {name: jax.block_until_ready(c(*inputs)) for name, c in compiled.items()}
      diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in
                 zip(jax.tree.leaves(outs["baseline"]), jax.tree.leaves(outs["current"])))
      times = {name: [] for name in versions}
      for _ in range(args.reps):
        for name, c in compiled.items():
          start = time.perf_counter()
          jax.block_until_ready(c(*inputs))
          times[name].append(time.perf_counter() - start)
      med = {name: statistics.median(t) * 1e3 for name, t in times.items()}
      mem = {}
      for name, c in compiled.items():
        m = c.memory_analysis()
        mem[name] = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                     - m.alias_size_in_bytes) / 2**20
      rows.append({"length": length, "passes": passes,
                   "baseline_ms": round(med["baseline"], 1), "current_ms": round(med["current"], 1),
                   "speedup": round(med["baseline"] / med["current"], 2),
                   "baseline_mib": round(mem["baseline"], 1),
                   "current_mib": round(mem["current"], 1),
                   "max_abs_diff": f"{diff:.1e}"})
      print(rows[-1], flush=True)
  load_end = os.getloadavg()
  write_ab_outputs(
      rows, args.output, f"CAST attention proper: current against {args.baseline}",
      f"B = 1, {HEADS} heads x {HEAD_DIM}, Top-K, N_c {CLUSTERS}, kappa {KAPPA}, float32; "
      f"medians of {args.reps} interleaved repetitions after a warm-up; memory = compiled "
      "arguments + outputs + temporaries - aliases (MiB); max_abs_diff over the outputs "
      "(fwd) or all four gradients (fwd+bwd). Load average "
      f"{tuple(round(v, 2) for v in load_start)} at the start, "
      f"{tuple(round(v, 2) for v in load_end)} at the end ({os.cpu_count()} CPUs, jax "
      f"{jax.__version__}; {cpu_memory.describe()}).")


if __name__ == "__main__":
  if "--malloc_defaults" not in sys.argv:
    cpu_memory.reexec_keeping_memory()
  main()
