r"""Model-level throughput: LRA encoder tokens/s and vision models images/s, per mechanism.

The issue-7 model-level part of the attention benchmark (``attention.py`` beside this file, whose
compile / cap / interleaved-timing machinery this script reuses): whole models, not one layer.

  LRA encoder  ``lra_encoder`` at the official LRA ListOps size (4 layers, width 512, 8 heads,
               qkv 512, MLP 1024, CLS pooling) with each attention and the settings that
               ``clustr_jax.attention.sized_for`` gives for the length; int32 tokens
               [batch, length]; tokens/s = batch * length / median seconds. Dense attention
               runs twice: ``dense.xla`` (``jax.nn.dot_product_attention``'s XLA path, the
               [N, N] weights materialised) and ``dense.tokamax`` (tokamax's memory-efficient
               ``xla_chunked`` kernel); the faster is the best dense of a length.
  vision       ``clustr_s`` (ClusTR-S, official b2) and ``deit_s`` at 224^2, float32 images
               [batch, 224, 224, 3]; images/s = batch / median seconds.

Passes: 'fwd' is ``apply(..., train=False)`` (inference; Sparsifiner in its sparse mode);
'fwd+bwd' is the gradient of sum(logits^2) with respect to the parameters (train=False, so no
dropout or tie-break noise; the optimizer update is excluded). Times are medians after a warm-up
call, all cases of one run interleaved, ``block_until_ready``; compile time apart; FLOPs from XLA's
cost analysis; memory = compiled arguments + outputs + temporaries - aliases. A case over
--max_memory_gb is skipped; one whose warm-up exceeds --time_cap_s is timed --capped_reps times.

  python experiments/benchmarks/models.py                      # the committed run (defaults)
  python experiments/benchmarks/models.py --lengths=1024 --mechanisms=dense,cast --vision= \
      --output=/tmp/models

Outputs: <output>.csv and <output>.md (default ``experiments/results/model_throughput``).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import pathlib
import platform
import sys
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from clustr_jax import attention, models
from clustr_jax.attention import cast, sparsifiner

_HERE = pathlib.Path(__file__).resolve().parent
_SPEC = importlib.util.spec_from_file_location("attention_benchmark", _HERE / "attention.py")
bench = importlib.util.module_from_spec(_SPEC)
sys.modules["attention_benchmark"] = bench
_SPEC.loader.exec_module(bench)

#: The official LRA ListOps Transformer (configs/lra/listops.py without ``cpu``).
LRA_MODEL = dict(emb_dim=512, num_heads=8, qkv_dim=512, mlp_dim=1024, num_layers=4,
                 dropout_rate=0.1, attention_dropout_rate=0.1, pooling="CLS", vocab_size=17,
                 num_classes=10)
VISION_SIZE = 224
#: The dense variants of ``--mechanisms``: name suffix -> ``DenseAttention.implementation``.
DENSE_IMPLEMENTATIONS = {"xla": "xla", "tokamax": "xla_chunked"}
MECHANISMS = tuple(f"dense.{v}" for v in DENSE_IMPLEMENTATIONS) + tuple(
    n for n in attention.names() if n != "dense")


def _cases(model, variables, inputs, name: str, passes: tuple[str, ...]) -> list[bench.Case]:
  apply = lambda v, x: model.apply(v, x, train=False)  # noqa: E731
  out = []
  if "fwd" in passes:
    out.append(bench.Case(name, "fwd", jax.jit(apply), (variables, inputs)))
  if "fwd+bwd" in passes:
    grad = bench._loss_grad(apply, (0,))  # pylint: disable=protected-access
    out.append(bench.Case(name, "fwd+bwd", jax.jit(grad), (variables, inputs)))
  return out


def _variables(model, inputs):
  """Random variables (normal * 0.02, unboxed) of the traced init's shapes: no init compile."""
  shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), inputs)
  leaves, tree = jax.tree.flatten(shapes)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  arrays = [0.02 * jax.random.normal(k, s.shape, s.dtype) for k, s in zip(keys, leaves)]
  return nn.unbox(jax.tree.unflatten(tree, arrays))


def build(args: argparse.Namespace) -> list[tuple[dict[str, Any], bench.Case]]:
  """(row metadata, case) for every model, mechanism, length and pass asked for."""
  passes = tuple(args.passes)
  built = []
  rng = np.random.default_rng(0)
  for length in args.lengths:
    tokens = jnp.asarray(rng.integers(1, 17, (args.lra_batch, length)), jnp.int32)
    for mechanism in args.mechanisms:
      registered, _, variant = mechanism.partition(".")
      kwargs = attention.sized_for(registered, length + 1)
      if variant:
        kwargs["implementation"] = DENSE_IMPLEMENTATIONS[variant]
      model = models.get("lra_encoder", max_length=length, attention=registered,
                         attention_kwargs=kwargs, **LRA_MODEL)
      variables = _variables(model, tokens)
      for case in _cases(model, variables, tokens, f"lra_encoder.{mechanism}", passes):
        if mechanism == "cast":  # count its chunked CPU loop as one step (see attention.py)
          case.flops_overrides = ((cast, "INTRA_CHUNK_CLUSTERS", args.lra_batch
                                   * LRA_MODEL["num_heads"] * kwargs["num_clusters"]),)
        elif mechanism == "sparsifiner":
          case.flops_overrides = ((sparsifiner, "GATHER_CHUNK_ROWS",
                                   args.lra_batch * LRA_MODEL["num_heads"] * length),)
        built.append(({"model": "lra_encoder", "attention": mechanism, "batch": args.lra_batch,
                       "length": length, "unit": "tokens/s",
                       "items": args.lra_batch * length}, case))
  for name in args.vision:
    images = jax.random.normal(jax.random.key(2), (args.vision_batch, VISION_SIZE, VISION_SIZE, 3))
    model = models.get(name, num_classes=1000)
    variables = _variables(model, images)
    for case in _cases(model, variables, images, name, passes):
      built.append(({"model": name, "attention": getattr(model, "attention", "clustr"),
                     "batch": args.vision_batch, "length": VISION_SIZE, "unit": "images/s",
                     "items": args.vision_batch}, case))
  return built


def run(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
  """Compiles and times every case; returns (rows, run info)."""
  info = {"load_start": os.getloadavg(), "backend": jax.default_backend(),
          "device": str(jax.devices()[0]), "machine": platform.machine(),
          "cpus": os.cpu_count(), "jax": jax.__version__}
  built = build(args)
  for meta, case in built:
    bench.compile_case(case, args.max_memory_gb * 2**30)
    print(f"compiled {case.mechanism} {case.passes} length={meta['length']}: "
          f"{case.compile_s:.1f} s {case.note}", flush=True)
  matmul_times: list[float] = []
  bench.run_interleaved([c for _, c in built], args.reps, args.capped_reps, args.time_cap_s,
                        matmul_times)
  info["load_end"] = os.getloadavg()
  median = bench._median  # pylint: disable=protected-access
  info["matmul_gflop_per_s"] = (2 * bench.MATMUL_SIZE ** 3 / median(matmul_times) / 1e9
                                if matmul_times else math.nan)
  rows = []
  for meta, case in built:
    seconds = median(case.times)
    rows.append({**{k: v for k, v in meta.items() if k != "items"}, "passes": case.passes,
                 "median_ms": round(seconds * 1e3, 3),
                 "throughput": round(meta["items"] / seconds, 2) if case.times else math.nan,
                 "reps": len(case.times), "compile_s": round(case.compile_s, 2),
                 "gflops": round(case.flops / 1e9, 3),
                 "memory_mib": round(case.memory_bytes / 2**20, 1), "note": case.note})
  return rows, info


def write_outputs(rows: list[dict[str, Any]], info: dict[str, Any], output: pathlib.Path,
                  command: str) -> None:
  """Writes ``<output>.csv`` and ``<output>.md``."""
  bench.write_csv(rows, output.with_suffix(".csv"))
  load = lambda t: ", ".join(f"{x:.2f}" for x in t)  # noqa: E731
  lines = [f"# Model throughput: `{output.name}`", "", f"Command: `{command}`", "",
           f"Backend {info['backend']} ({info['device']}, {info['machine']}, {info['cpus']} CPUs), "
           f"jax {info['jax']}; {bench.cpu_memory.describe()}. Load average (1, 5, 15 min) at the "
           "start "
           f"({load(info['load_start'])}), at the end ({load(info['load_end'])}). Dense 2048^2 "
           f"matmul in the same interleaved loop: {info['matmul_gflop_per_s']:.1f} GFLOP/s.", "",
           "LRA encoder: official ListOps size, batch and length (tokens) as listed, tokens/s = "
           "batch x length / median. Vision: the length column is the image side (224 px), "
           "images/s = batch / median. 'fwd' = inference (train=False); 'fwd+bwd' = gradient "
           "with respect to the parameters (no optimizer update). Memory = compiled arguments + "
           "outputs + temporaries - aliases (MiB).", "",
           "| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
  lines += ["| " + " | ".join(str(v) for v in row.values()) + " |" for row in rows]
  output.with_suffix(".md").write_text("\n".join(lines) + "\n")
  print(f"wrote {output.with_suffix('.csv')} / .md")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  csv_list = lambda t: lambda s: [t(x) for x in s.split(",") if x]  # noqa: E731
  p.add_argument("--lengths", type=csv_list(int), default=[1024, 4096, 16384])
  p.add_argument("--mechanisms", type=csv_list(str), default=list(MECHANISMS),
                 help=f"comma-separated, from: {', '.join(MECHANISMS)}")
  p.add_argument("--vision", type=csv_list(str), default=["deit_s", "clustr_s"],
                 help="vision model names (empty: none)")
  p.add_argument("--passes", type=csv_list(str), default=["fwd", "fwd+bwd"])
  p.add_argument("--lra_batch", type=int, default=1)
  p.add_argument("--vision_batch", type=int, default=8)
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--capped_reps", type=int, default=1)
  p.add_argument("--time_cap_s", type=float, default=5.0)
  p.add_argument("--max_memory_gb", type=float, default=12.0)
  p.add_argument("--malloc_defaults", action="store_true",
                 help="keep glibc's malloc defaults (see cpu_memory.py)")
  p.add_argument("--output", type=pathlib.Path,
                 default=bench.RESULTS / "model_throughput")
  args = p.parse_args(argv)
  bad = sorted(set(args.mechanisms) - set(MECHANISMS))
  if bad:
    p.error(f"--mechanisms: unknown {bad}; valid: {', '.join(MECHANISMS)}")
  bad = sorted(set(args.vision) - set(models.names()))
  if bad:
    p.error(f"--vision: unknown model(s) {bad}; valid: {', '.join(models.names())}")
  bad = sorted(set(args.passes) - {"fwd", "fwd+bwd"})
  if bad:
    p.error(f"--passes: unknown {bad}; valid: fwd, fwd+bwd")
  return args


def main(argv: list[str] | None = None) -> None:
  args = parse_args(argv)
  rows, info = run(args)
  command = "experiments/benchmarks/models.py " + " ".join(sys.argv[1:] if argv is None else argv)
  write_outputs(rows, info, args.output, command.strip())


if __name__ == "__main__":
  if "--malloc_defaults" not in sys.argv:
    bench.cpu_memory.reexec_keeping_memory()
  main()
