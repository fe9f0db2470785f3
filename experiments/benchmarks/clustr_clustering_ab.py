r"""ClusTR clustering: this checkout against an earlier commit, same inputs, interleaved timing.

Loads ``clustr_jax/attention/clustr.py`` as it was at ``--baseline`` (``git show``) next to the
current one, runs both ``dpc_knn_cluster`` (chunked, as in the attention benchmark) and
``merge_tokens`` on the same tokens, checks that the labels, centres, density and delta agree,
and times the two interleaved (median of --reps after a warm-up). Two token sets: i.i.d.
normal and a random walk along the sequence (smooth tokens, many local density peaks).

  python experiments/benchmarks/clustr_clustering_ab.py --baseline=9455597 --lengths=1024,4096

Writes <output>.md and <output>.csv (default experiments/results/clustr_clustering_ab).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from baseline import REPO, load_baseline, write_ab_outputs

from clustr_jax.attention import clustr

SOURCE = "clustr_jax/attention/clustr.py"


def tokens(kind: str, length: int, features: int) -> jax.Array:
  x = np.random.default_rng(0).standard_normal((1, length, features)).astype(np.float32)
  if kind == "walk":
    x = np.cumsum(x, axis=1) / np.sqrt(np.arange(1, length + 1))[None, :, None]
  return jnp.asarray(x)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--baseline", required=True, help="git commit of the baseline clustr.py")
  p.add_argument("--lengths", default="1024,4096")
  p.add_argument("--features", type=int, default=512)
  p.add_argument("--chunk", type=int, default=256)
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--output", default=str(REPO / "experiments" / "results" /
                                         "clustr_clustering_ab"))
  args = p.parse_args()
  baseline = load_baseline(args.baseline, SOURCE)
  load_start = os.getloadavg()
  rows = []
  for length in [int(n) for n in args.lengths.split(",")]:
    scales = (max(length // 64, 1), max(length // 16, 1))

    def pipeline(module):
      def fn(x):
        c = module.dpc_knn_cluster(x, None, scales, chunk_size=args.chunk)
        return c, module.merge_tokens(x, x[..., 0], c.labels, scales, 1e-6)
      return jax.jit(fn)

    fns = {"baseline": pipeline(baseline), "current": pipeline(clustr)}
    for kind in ("iid", "walk"):
      x = tokens(kind, length, args.features)
      (c_old, m_old), (c_new, m_new) = fns["baseline"](x), fns["current"](x)
      same = (bool(jnp.all(c_old.labels == c_new.labels))
              and all(bool(jnp.all(a == b)) for a, b in zip(c_old.centres, c_new.centres)))
      delta_err = float(jnp.max(jnp.abs(c_old.delta - c_new.delta) / c_old.delta))
      merge_err = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(m_old, m_new))
      times = {name: [] for name in fns}
      for _ in range(args.reps):
        for name, fn in fns.items():
          start = time.perf_counter()
          jax.block_until_ready(fn(x))
          times[name].append(time.perf_counter() - start)
      med = {name: statistics.median(t) * 1e3 for name, t in times.items()}
      rows.append({"length": length, "tokens": kind, "baseline_ms": round(med["baseline"], 1),
                   "current_ms": round(med["current"], 1),
                   "speedup": round(med["baseline"] / med["current"], 2),
                   "same_clusters": same, "max_rel_delta_diff": delta_err,
                   "max_abs_merge_diff": merge_err})
      print(rows[-1], flush=True)
  load_end = os.getloadavg()
  write_ab_outputs(
      rows, args.output, f"ClusTR clustering + merge: current against {args.baseline}",
      f"B = 1, C = {args.features}, num_clusters (N/64, N/16), distance_chunk_size "
      f"{args.chunk}; medians of {args.reps} interleaved repetitions. Load average "
      f"{tuple(round(v, 2) for v in load_start)} at the start, "
      f"{tuple(round(v, 2) for v in load_end)} at the end (2 CPUs).")


if __name__ == "__main__":
  main()
