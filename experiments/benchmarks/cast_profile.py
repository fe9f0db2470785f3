r"""Where CAST's time goes: its attention proper and its stages, timed apart, against matmul.

CAST Top-K attention proper (``cast.cast_attention``: N_c 64, kappa 128, 8 heads x 64, B = 1,
float32) forward+backward at --length tokens, and its stages as separate programs on inputs of
the same shapes:
  selection      affinities A_q, A_k [B, H, N_c, N] (two einsums), f = softmax over clusters,
                 A_g = f(A_q) + f(A_k), Top-K over tokens (``select_top_k``): forward only (no
                 gradient flows through the selection)
  gathers        q, k, v rows of the members, [B, N, H, d] -> [B, H, N_c kappa, d] (forward)
  scatter_add    one [B, H, N_c kappa, d] -> [B, N, H, d] scatter-add (the combination's; the
                 backward of each gather is one too)
  intra          the intra-cluster attention over [B, H, N_c, kappa, d] (the CPU path: steps
                 of INTRA_CHUNK_CLUSTERS clusters, recomputing backward), forward+backward
  summaries      the cluster summaries, alpha and the combination without the scatter
                 (einsums and softmaxes over [B, H, N_c, kappa] and [B, H, N_c, N]), fwd+bwd
Stages overlap in the whole program only through fusion, so their sum is near the whole. Each
row gives the median time, XLA's FLOP count, the FLOP rate and its share of this run's dense
matmul rate (a 2048^2 product timed in the same interleaved loop). Re-executes itself with
glibc malloc keeping freed memory, as ``attention.py``.

  python experiments/benchmarks/cast_profile.py          # the committed run
  python experiments/benchmarks/cast_profile.py --length=2048 --reps=3 --output=/tmp/cast

Outputs: <output>.md and <output>.csv (default ``experiments/results/cast_profile``).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

import attention as bench
import jax
import jax.numpy as jnp

from clustr_jax.attention import base, cast

HEADS, HEAD_DIM = 8, 64


def cases(length: int) -> list[bench.Case]:
  """The whole attention proper (fwd+bwd) and its stages as benchmark cases."""
  clusters, kappa = bench.CAST_CLUSTERS, bench.CAST_KAPPA
  q, k, v = bench._qkv(1, length, HEADS, HEAD_DIM, jnp.float32)  # pylint: disable=protected-access
  s = 0.02 * jax.random.normal(jax.random.key(3), (HEADS, clusters, HEAD_DIM))
  mask = jnp.ones((1, length), bool)
  scale = HEAD_DIM ** -0.5

  def whole(q, k, v, s):
    return cast.cast_attention(q, k, v, s, mask, cluster_size=kappa)[0]

  def selection(q, k, s):
    a_q = jnp.einsum("bnhd,hcd->bhcn", q, s) * scale
    a_k = jnp.einsum("bnhd,hcd->bhcn", k, s) * scale
    ag = jax.nn.softmax(a_q, axis=-2) + jax.nn.softmax(a_k, axis=-2)
    return cast.select_top_k(ag, mask[:, None, None, :], kappa)

  idx, valid = jax.jit(selection)(q, k, s)
  flat_idx = idx.reshape(1, HEADS, clusters * kappa)
  members = jax.jit(lambda x: cast._gather(x, flat_idx).reshape(  # pylint: disable=protected-access
      1, HEADS, clusters, kappa, HEAD_DIM))
  q_c, k_c, v_c = members(q), members(k), members(v)

  def intra(q_c, k_c, v_c):
    return cast.intra_cluster_attention(q_c, k_c, v_c, valid, scale)

  def summaries(q, k_c, v_c, r_intra, s):
    a_q = jnp.einsum("bnhd,hcd->bhcn", q, s) * scale
    a_k_c = jnp.einsum("bhcjd,hcd->bhcj", k_c, s) * scale
    w = jnp.where(valid, base.softmax(jnp.where(valid, a_k_c, base.MASK_VALUE)), 0.0)
    r_inter = jnp.einsum("bhcj,bhcjd->bhcd", w, v_c)
    alpha = jax.nn.softmax(a_q, axis=-2)
    alpha_c = jnp.where(valid, jnp.take_along_axis(alpha, idx, axis=-1), 0.0)
    out = jnp.einsum("bhcn,bhcd->bnhd", alpha, r_inter)
    delta = base.scale_rows(alpha_c, r_intra - r_inter[..., None, :])
    return out, delta

  def summaries_loss(*args):
    out, delta = summaries(*args)
    return jnp.sum(jnp.square(out)) + jnp.sum(jnp.square(delta))

  r_intra = jax.jit(intra)(q_c, k_c, v_c)
  delta = jax.random.normal(jax.random.key(5), (1, HEADS, clusters * kappa, HEAD_DIM))
  scatter = lambda x: cast._scatter_add(x, flat_idx, length)  # noqa: E731  pylint: disable=protected-access
  gathers = lambda q, k, v: tuple(members(t) for t in (q, k, v))  # noqa: E731
  intra_chunks = ((cast, "INTRA_CHUNK_CLUSTERS", HEADS * clusters),)
  out = [bench.Case("whole", "fwd+bwd", jax.jit(bench._loss_grad(whole, (0, 1, 2, 3))),  # pylint: disable=protected-access
                    (q, k, v, s), flops_overrides=intra_chunks),
         bench.Case("selection", "fwd", jax.jit(selection), (q, k, s)),
         bench.Case("gathers", "fwd", jax.jit(gathers), (q, k, v)),
         bench.Case("scatter_add", "fwd", jax.jit(scatter), (delta,)),
         bench.Case("intra", "fwd+bwd", jax.jit(bench._loss_grad(intra, (0, 1, 2))),  # pylint: disable=protected-access
                    (q_c, k_c, v_c), flops_overrides=intra_chunks),
         bench.Case("summaries", "fwd+bwd", jax.jit(jax.grad(summaries_loss, (0, 1, 2, 3, 4))),
                    (q, k_c, v_c, r_intra, s))]
  return out


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--length", type=int, default=8192)
  p.add_argument("--reps", type=int, default=10)
  p.add_argument("--output", default=str(bench.RESULTS / "cast_profile"))
  p.add_argument("--malloc_defaults", action="store_true",
                 help="keep glibc's malloc defaults (see cpu_memory.py)")
  args = p.parse_args(argv)
  load_start = os.getloadavg()
  built = cases(args.length)
  for case in built:
    bench.compile_case(case, float("inf"))
  matmul_times: list[float] = []
  bench.run_interleaved(built, args.reps, args.reps, float("inf"), matmul_times)
  matmul = 2 * bench.MATMUL_SIZE ** 3 / bench._median(matmul_times) / 1e9  # pylint: disable=protected-access
  whole = bench._median(built[0].times)  # pylint: disable=protected-access
  rows = []
  for case in built:
    median = bench._median(case.times)  # pylint: disable=protected-access
    rate = case.flops / median / 1e9
    rows.append({"stage": case.mechanism, "passes": case.passes,
                 "median_ms": round(median * 1e3, 2),
                 "min_ms": round(min(case.times) * 1e3, 2),
                 "max_ms": round(max(case.times) * 1e3, 2),
                 "share_of_whole": round(median / whole, 3), "gflops": round(case.flops / 1e9, 3),
                 "gflop_per_s": round(rate, 1) if case.flops == case.flops else "-",
                 "of_matmul_rate": round(rate / matmul, 3) if case.flops == case.flops else "-"})
  output = pathlib.Path(args.output)
  bench.write_csv(rows, output.with_suffix(".csv"))
  load = lambda t: ", ".join(f"{x:.2f}" for x in t)  # noqa: E731
  lines = [f"# CAST profile at N = {args.length}", "",
           "Command: `" + " ".join(["python experiments/benchmarks/cast_profile.py",
                                    *(sys.argv[1:] if argv is None else argv)]) + "`", "",
           f"CAST Top-K proper, N_c {bench.CAST_CLUSTERS}, kappa {bench.CAST_KAPPA}, {HEADS} heads "
           f"x {HEAD_DIM}, B = 1, float32; {bench.cpu_memory.describe()}; {os.cpu_count()} CPUs. "
           f"Load average at the start ({load(load_start)}), at the end "
           f"({load(os.getloadavg())}). Dense {bench.MATMUL_SIZE}^2 matmul in the same loop: "
           f"{matmul:.1f} GFLOP/s. Median of {args.reps} interleaved repetitions (min-max "
           "beside it).", "",
           "| stage | passes | median ms (min-max) | share of whole | GFLOP | GFLOP/s | of matmul "
           "rate |", "|---|---|---|---|---|---|---|"]
  lines += [f"| {r['stage']} | {r['passes']} | {r['median_ms']} ({r['min_ms']}-{r['max_ms']}) | "
            f"{r['share_of_whole']:.0%} | {r['gflops']} | {r['gflop_per_s']} | "
            f"{r['of_matmul_rate']} |" for r in rows]
  output.with_suffix(".md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  if "--malloc_defaults" not in sys.argv:
    bench.cpu_memory.reexec_keeping_memory()
  main()
