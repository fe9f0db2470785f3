r"""LRA's efficiency table (LRA paper, Table 2 protocol) on this machine, for every mechanism.

LRA times the Text task's model (4 layers, width 256, 4 heads, qkv 256, MLP 1024, CLS pooling) at
1K, 2K, 3K and 4K tokens and reports training steps per second and peak memory, each also
relative to the vanilla Transformer. Here the same model (``configs/lra/text.py`` with
``max_length`` set, so each mechanism gets the settings and parameter budget its config gives it
at that length) runs one training step of the project's own loop (``train.train_step``: forward,
backward, the config's AdamW update) per call, for each variant:

  dense.xla          dense attention through ``jax.nn.dot_product_attention(implementation='xla')``
                     (materialises the [B, H, N, N] weights: LRA's Transformer)
  dense.tokamax      dense attention through tokamax's memory-efficient ``xla_chunked`` kernel
  clustr, cast       the mechanisms with their sized settings
  sparsifiner        token-level top-k (the paper's), mode B
  sparsifiner.block  its key-block path (ours, ``docs/sparsifiner.md``)

Everything but the mechanism is equal: same model, batch, data (random bytes, no padding), same
optimizer step. Two settings differ from the Text config, for every variant alike and stated in
the output: attention dropout is off (no fused dense kernel takes dropout, so with it both dense
variants would run the same explicit softmax path), and ``lra_padding`` is off (its second,
uniform-query attention call only serves padded tokens; these inputs have none).

Speed is the median of interleaved repetitions (one step of each variant in turn, after a warm-up
call; the range over the repetitions is given), memory the compiled program's arguments + outputs
+ temporaries - aliases (this CPU backend keeps no peak statistics). Ratios are read against the
best dense variant of the length (the faster of the two) and against the XLA path, beside LRA's
published relative figures at 4K (TPU v3, batch 32; quoted in ``docs/lra.md``). Run as a
script it re-executes itself with glibc malloc keeping freed memory (``cpu_memory.py``).

  python experiments/lra/efficiency.py                  # the committed run (about 15 min, 2 cores)
  python experiments/lra/efficiency.py --lengths=1024 --variants=dense.xla,cast --reps=2 \
      --output=/tmp/efficiency

Outputs: <output>.csv, <output>.md and <output>.png (steps/s and memory against length; needs
matplotlib, ``pip install -e '.[bench]'``); default ``experiments/lra/results/efficiency``.
"""

from __future__ import annotations

import argparse
import functools
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

from clustr_jax import models, optim, train
from configs import common as config_common
from configs.lra import common as lra_common

REPO = pathlib.Path(__file__).resolve().parents[2]
_BENCH = REPO / "experiments" / "benchmarks"
sys.path.insert(0, str(_BENCH))  # attention.py's sibling cpu_memory
_SPEC = importlib.util.spec_from_file_location("attention_benchmark", _BENCH / "attention.py")
bench = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = bench
_SPEC.loader.exec_module(bench)

#: Variant name -> (registered mechanism, attention options added to its sized settings).
VARIANTS = {
    "dense.xla": ("dense", {"implementation": "xla"}),
    "dense.tokamax": ("dense", {"implementation": "xla_chunked"}),
    "clustr": ("clustr", {}),
    "cast": ("cast", {}),
    "sparsifiner": ("sparsifiner", {}),
    "sparsifiner.block": ("sparsifiner", {"path": "block"}),
}
DENSE_VARIANTS = ("dense.xla", "dense.tokamax")
#: LRA paper Table 2, Text task at 4K tokens: training steps/s relative to the Transformer
#: (TPU v3, batch 32), as quoted in docs/lra.md.
LRA_RELATIVE_4K = {"Performer": 5.7, "Linformer": 5.5, "Reformer": 0.8}


def variant_config(variant: str, length: int):
  """The run config of ``variant`` on the Text task at ``length`` tokens: ``configs/lra/text.py``
  with its mechanism (sized for the length), the variant's attention options added, attention
  dropout and ``lra_padding`` off.

  Raises:
    KeyError: an unknown variant.
  """
  mechanism, extra = VARIANTS[variant]
  config = config_common.load(
      str(REPO / "configs" / "lra" / f"text.py:max_length={length},attention={mechanism}"),
      lock=False)
  config.model.attention_kwargs = dict(config.model.attention_kwargs) | extra
  config.model.attention_dropout_rate = 0.0
  config.model.lra_padding = False
  return config


def step_case(variant: str, length: int, batch: int) -> tuple[bench.Case, int]:
  """One training step of the Text model at ``length`` tokens with ``variant``'s attention, as a
  benchmark case ``(state, batch)``; also returns the model's parameter count.

  Raises:
    KeyError: an unknown variant.
  """
  config = variant_config(variant, length)
  vocab_size, num_classes = lra_common.data_sizes("text")
  model = models.from_config(config.model, {"vocab_size": vocab_size, "num_classes": num_classes,
                                            "max_length": length})
  tx, schedule = optim.create_optimizer(config)
  rng = np.random.default_rng(0)
  data = {"inputs": jnp.asarray(rng.integers(1, vocab_size, (batch, length)), jnp.int32),
          "targets": jnp.asarray(rng.integers(0, num_classes, (batch,)), jnp.int32)}
  state = jax.jit(lambda r, x: nn.unbox(train.create_train_state(model, tx, r, x)))(
      jax.random.key(0), data["inputs"])
  params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.params))
  step = jax.jit(functools.partial(train.train_step, model=model, tx=tx, schedule=schedule,
                                   rng=jax.random.key(1)))
  return bench.Case(variant, "train step", step, (state, data)), params


def run(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
  """Compiles and times every (length, variant); returns (rows, run info)."""
  info = {"load_start": os.getloadavg(), "backend": jax.default_backend(),
          "device": str(jax.devices()[0]), "machine": platform.machine(), "cpus": os.cpu_count(),
          "jax": jax.__version__, "malloc": bench.cpu_memory.describe()}
  rows: list[dict[str, Any]] = []
  matmul_times: list[float] = []
  capped: set[str] = set()
  for length in args.lengths:
    cases = []
    for variant in args.variants:
      if variant in capped:
        continue
      case, params = step_case(variant, length, args.batch)
      bench.compile_case(case, args.max_memory_gb * 2**30)
      cases.append((case, params))
    bench.run_interleaved([c for c, _ in cases], args.reps, args.capped_reps, args.time_cap_s,
                          matmul_times)
    for case, params in cases:
      if case.note and not case.note.startswith("skipped"):
        capped.add(case.mechanism)
      median = bench._median(case.times)  # pylint: disable=protected-access
      rows.append({"variant": case.mechanism, "length": length, "batch": args.batch,
                   "steps_per_s": round(1.0 / median, 4) if case.times else math.nan,
                   "median_ms": round(median * 1e3, 1),
                   "min_ms": round(min(case.times) * 1e3, 1) if case.times else math.nan,
                   "max_ms": round(max(case.times) * 1e3, 1) if case.times else math.nan,
                   "reps": len(case.times), "memory_mib": round(case.memory_bytes / 2**20, 1),
                   "params": params, "compile_s": round(case.compile_s, 1), "note": case.note})
    print(f"[N={length}] " + ", ".join(f"{r['variant']} {r['median_ms']} ms"
                                       for r in rows if r["length"] == length), flush=True)
  info["load_end"] = os.getloadavg()
  info["matmul_gflop_per_s"] = round(
      2 * bench.MATMUL_SIZE ** 3 / bench._median(matmul_times) / 1e9, 1)  # pylint: disable=protected-access
  add_ratios(rows)
  return rows, info


def add_ratios(rows: list[dict[str, Any]]) -> None:
  """Adds to each row its speed and memory relative to the best dense variant of its length
  (``best_dense``: the faster of ``DENSE_VARIANTS``; speed = dense's time / this time, memory =
  this memory / dense's) and to the XLA path (``dense.xla``); NaN where a reference is missing."""
  for row in rows:
    same = {r["variant"]: r for r in rows if r["length"] == row["length"]
            and r["variant"] in DENSE_VARIANTS and math.isfinite(r["median_ms"])}
    best = min(same.values(), key=lambda r: r["median_ms"]) if same else None
    row["best_dense"] = best["variant"] if best else ""
    for tag, ref in (("best_dense", best), ("xla", same.get("dense.xla"))):
      ok = ref is not None and math.isfinite(row["median_ms"])
      row[f"speed_vs_{tag}"] = round(ref["median_ms"] / row["median_ms"], 2) if ok else math.nan
      row[f"memory_vs_{tag}"] = (round(row["memory_mib"] / ref["memory_mib"], 2)
                                 if ok else math.nan)


def write_outputs(rows: list[dict[str, Any]], info: dict[str, Any], output: pathlib.Path,
                  args: argparse.Namespace, plots: bool) -> None:
  """Writes <output>.csv, <output>.md and (``plots``) <output>.png."""
  bench.write_csv(rows, f"{output}.csv")
  load = lambda t: ", ".join(f"{x:.2f}" for x in t)  # noqa: E731
  lengths = sorted({r["length"] for r in rows})
  lines = [
      f"# LRA efficiency (Table 2 protocol): `{output.name}`", "",
      "Command: `" + " ".join(["python experiments/lra/efficiency.py", *args.argv]) + "`", "",
      f"Backend {info['backend']} ({info['device']}, {info['machine']}, {info['cpus']} CPUs), jax "
      f"{info['jax']}; {info['malloc']}. Load average (1, 5, 15 min) at the start "
      f"({load(info['load_start'])}), at the end ({load(info['load_end'])}); dense 2048^2 matmul "
      f"in the same loop {info['matmul_gflop_per_s']} GFLOP/s.", "",
      f"The Text model of `configs/lra/text.py` (4 layers, width 256, 4 heads, MLP 1024, CLS), "
      f"batch {args.batch}, random bytes without padding; one call = one training step of "
      "`train.train_step` (forward, backward, AdamW update). The same for every variant except "
      "the attention; for all of them attention dropout and `lra_padding` are off (see the "
      "script's docstring). Each mechanism has the settings and parameter budget its Text config "
      "gives it at the length. Memory = compiled arguments + outputs + temporaries - aliases.",
      ""]
  lines += _length_table(rows, lengths, "Training steps/s", "steps_per_s", "speed", ".3g")
  lines += [""] + _length_table(rows, lengths, "Compiled memory, MiB", "memory_mib", "memory",
                                ".0f")
  published = ", ".join(f"{k} {v:g}x" for k, v in LRA_RELATIVE_4K.items())
  lines += ["", f"LRA's published training speed at 4K relative to its Transformer (TPU v3, batch "
            f"32): {published}.", "", "## All rows", "",
            "| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
  lines += ["| " + " | ".join(str(v) for v in r.values()) + " |" for r in rows]
  pathlib.Path(f"{output}.md").write_text("\n".join(lines) + "\n")
  if plots and len(lengths) > 1:
    _plot(rows, output)
  print(f"wrote {output}.csv / .md")


def _length_table(rows: list[dict[str, Any]], lengths: list[int], title: str, field: str,
                  ratio: str, spec: str) -> list[str]:
  """Markdown lines: a variant x length table of ``field`` with its ``<ratio>_vs_best_dense`` and
  ``<ratio>_vs_xla`` ratios in brackets ('-' where not run)."""
  fmt = lambda v: "-" if not math.isfinite(v) else f"{v:g}x"  # noqa: E731
  lines = [f"## {title} (x best dense; x XLA path)", "",
           "| variant | " + " | ".join(f"{n}" for n in lengths) + " |",
           "|---|" + "---|" * len(lengths)]
  for variant in dict.fromkeys(r["variant"] for r in rows):
    cells = []
    for n in lengths:
      r = next((r for r in rows if (r["variant"], r["length"]) == (variant, n)), None)
      cells.append("-" if r is None or not math.isfinite(r[field]) else
                   f"{r[field]:{spec}} ({fmt(r[f'{ratio}_vs_best_dense'])}; "
                   f"{fmt(r[f'{ratio}_vs_xla'])})")
    lines.append(f"| {variant} | " + " | ".join(cells) + " |")
  return lines


def _plot(rows: list[dict[str, Any]], output: pathlib.Path) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for variant in dict.fromkeys(r["variant"] for r in rows):
    mine = [r for r in rows if r["variant"] == variant]
    for ax, field in zip(axes, ("steps_per_s", "memory_mib")):
      pts = [(r["length"], r[field]) for r in mine if math.isfinite(r[field])]
      if pts:
        ax.plot(*zip(*pts), marker="o", label=variant)
  axes[0].set(xlabel="tokens", ylabel="training steps/s", yscale="log",
              title="LRA Text model, training speed")
  axes[1].set(xlabel="tokens", ylabel="compiled memory (MiB)", yscale="log",
              title="memory")
  for ax in axes:
    ax.grid(True, which="both", alpha=0.3)
  axes[0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(f"{output}.png", dpi=110)
  plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  csv_list = lambda t: lambda s: [t(x) for x in s.split(",") if x]  # noqa: E731
  p.add_argument("--lengths", type=csv_list(int), default=[1024, 2048, 3072, 4096])
  p.add_argument("--variants", type=csv_list(str), default=list(VARIANTS))
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--capped_reps", type=int, default=2)
  p.add_argument("--time_cap_s", type=float, default=20.0,
                 help="a variant whose warm-up step exceeds this gets --capped_reps timings "
                      "and is not run at longer lengths")
  p.add_argument("--max_memory_gb", type=float, default=12.0)
  p.add_argument("--output", type=pathlib.Path,
                 default=REPO / "experiments" / "lra" / "results" / "efficiency")
  p.add_argument("--no_plots", action="store_true")
  p.add_argument("--malloc_defaults", action="store_true",
                 help="keep glibc's malloc defaults (see experiments/benchmarks/cpu_memory.py)")
  args = p.parse_args(argv)
  bad = sorted(set(args.variants) - set(VARIANTS))
  if bad:
    p.error(f"--variants: unknown {bad}; valid: {', '.join(VARIANTS)}")
  if args.batch < 1 or args.reps < 1 or args.capped_reps < 1:
    p.error("--batch, --reps and --capped_reps must be >= 1")
  args.argv = list(sys.argv[1:] if argv is None else argv)
  return args


def main(argv: list[str] | None = None) -> None:
  args = parse_args(argv)
  rows, info = run(args)
  write_outputs(rows, info, args.output, args, plots=not args.no_plots)


if __name__ == "__main__":
  if "--malloc_defaults" not in sys.argv:
    bench.cpu_memory.reexec_keeping_memory()
  main()
