r"""The parameter budget of every LRA comparison: parameters of each task x mechanism, the overhead
over the dense LRA encoder, the stated budget and the mechanism's settings.

LRA compares an efficient model with the dense Transformer of the same sizes within +10 % of its
parameters (``docs/lra.md``, "Parameter budgets"); ``configs/lra/common.py`` sizes each mechanism
for that budget and states the larger overheads where a method cannot fit (``STATED_OVERHEADS``).
Parameters are counted from the model's abstract initialisation (``jax.eval_shape``, nothing
computed), with the task's real vocabulary and classes. Writes
``experiments/lra/results/parameters.{md,csv}``:

  python experiments/lra/parameters.py
"""

from __future__ import annotations

import argparse
import csv
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from clustr_jax import attention, models
from configs import common as config_common
from configs.lra import common as lra_common

REPO = pathlib.Path(__file__).resolve().parents[2]
RESULTS = REPO / "experiments" / "lra" / "results"
#: Every LRA config of the comparison, as ``configs/lra/<spec>``: the official sizes and the CPU
#: variants (Text at 1K and 4K).
SPECS = ("listops.py", "listops.py:cpu", "text.py", "text.py:cpu", "text.py:max_length=4000",
         "text.py:cpu,max_length=4000", "retrieval.py", "retrieval.py:cpu", "image.py",
         "image.py:cpu", "pathfinder.py", "pathfinder.py:cpu", "pathx.py", "pathx.py:cpu")


def load(spec: str, mechanism: str) -> ml_collections.ConfigDict:
  """The config ``configs/lra/<spec>`` with ``attention=<mechanism>``."""
  sep = "," if ":" in spec else ":"
  return config_common.load(f"configs/lra/{spec}{sep}attention={mechanism}")


def count_parameters(config: ml_collections.ConfigDict) -> int:
  """Parameters of the LRA model of ``config`` (its dataset's vocabulary and classes), counted
  from ``jax.eval_shape`` of its initialisation."""
  ds = config.dataset
  vocab_size, num_classes = lra_common.data_sizes(ds.name)
  model = models.from_config(config.model, {"vocab_size": vocab_size,
                                            "num_classes": num_classes,
                                            "max_length": ds.max_length})
  tokens = jax.ShapeDtypeStruct((1, ds.max_length), jnp.int32)
  inputs = [tokens, tokens] if config.model.name == "lra_dual_encoder" else [tokens]
  params = jax.eval_shape(
      lambda *x: model.init({"params": jax.random.key(0)}, *x, train=False), *inputs)["params"]
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params))


def rows(specs=SPECS, mechanisms=None) -> list[dict]:
  """One row per spec x mechanism: task (spec), mechanism, parameters, dense_parameters,
  overhead (fraction), budget (the stated fraction), settings (``attention_kwargs``)."""
  out = []
  for spec in specs:
    dense = count_parameters(load(spec, "dense"))
    for mechanism in mechanisms or attention.names():
      config = load(spec, mechanism)
      params = count_parameters(config)
      settings = "; ".join(f"{k}={v}" for k, v in sorted(config.model.attention_kwargs.items()))
      out.append({"task": spec, "mechanism": mechanism, "parameters": params,
                  "dense_parameters": dense, "overhead": (params - dense) / dense,
                  "budget": lra_common.stated_budget(spec, mechanism),
                  "settings": settings or "-"})
  return out


def write(table: list[dict], prefix: pathlib.Path) -> None:
  """``prefix``.csv (every field) and ``prefix``.md (overhead and budget in %)."""
  prefix.parent.mkdir(parents=True, exist_ok=True)
  with open(prefix.with_suffix(".csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(table[0]))
    writer.writeheader()
    writer.writerows(table)
  lines = [
      "# LRA parameter budgets",
      "",
      "Parameters of each LRA config x mechanism, the overhead over the dense encoder of the same",
      "config (LRA allows +10 %) and the budget the config states (`configs/lra/common.py`,",
      "`STATED_OVERHEADS`, where a method cannot fit). Written by",
      "`python experiments/lra/parameters.py`.",
      "",
      "| config | mechanism | parameters | overhead vs dense | stated budget | settings |",
      "|---|---|---:|---:|---:|---|",
  ]
  for r in table:
    lines.append(f"| {r['task']} | {r['mechanism']} | {r['parameters']:,} | "
                 f"{100 * r['overhead']:+.1f} % | {100 * r['budget']:.0f} % | {r['settings']} |")
  prefix.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--output", default=str(RESULTS / "parameters"),
                      help="path prefix of the .md and .csv tables")
  args = parser.parse_args()
  table = rows()
  write(table, pathlib.Path(args.output))
  for r in table:
    print(f"{r['task']:30s} {r['mechanism']:12s} {r['parameters']:>10,d} "
          f"{100 * r['overhead']:+7.1f} % (budget {100 * r['budget']:.0f} %)")


if __name__ == "__main__":
  main()
