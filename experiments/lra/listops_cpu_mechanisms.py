r"""Trains the ListOps CPU config once per attention mechanism and tabulates the results.

Each mechanism runs ``configs/lra/listops.py:cpu,attention=<name>`` in its own workdir (shared
generated data), one after the other in one process, and the script writes a Markdown and a CSV
table of test accuracy, steps/s, parameters, their overhead over the dense encoder (LRA allows
+10 %; ``experiments/lra/parameters.py``) and wall time to ``experiments/lra/results/``.

  python experiments/lra/listops_cpu_mechanisms.py --workdir=workdir/listops_cpu_mechanisms
  python experiments/lra/listops_cpu_mechanisms.py --num_train_steps=500 --mechanisms=dense,cast
"""

from __future__ import annotations

import argparse
import csv
import pathlib
import platform

import jax

from clustr_jax import attention, train
from configs import common as config_common
from configs.lra import common as lra_common

REPO = pathlib.Path(__file__).resolve().parents[2]
RESULTS = REPO / "experiments" / "lra" / "results"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default="workdir/listops_cpu_mechanisms")
  parser.add_argument("--mechanisms", default=",".join(attention.names()))
  parser.add_argument("--num_train_steps", type=int, default=None,
                      help="override the config's steps (default: the config's)")
  parser.add_argument("--output", default=str(RESULTS / "listops_cpu_mechanisms"),
                      help="path prefix of the .md and .csv tables")
  args = parser.parse_args()
  workdir = pathlib.Path(args.workdir)
  rows = []
  for name in args.mechanisms.split(","):
    config = config_common.load(f"{REPO}/configs/lra/listops.py:cpu,attention={name}")
    config.dataset.data_dir = str(workdir / "data")
    if args.num_train_steps:
      config.num_train_steps = args.num_train_steps
    results = train.train_and_evaluate(config, workdir / name)
    vocab_size, num_classes = lra_common.data_sizes(config.dataset.name)
    dense = lra_common.dense_parameters(config.model, vocab_size=vocab_size,
                                        num_classes=num_classes,
                                        max_length=config.dataset.max_length)
    rows.append({
        "attention": name, "test_accuracy": round(results["test"]["accuracy"], 4),
        "val_accuracy": round(results["val"]["accuracy"], 4), "steps": results["step"],
        "train_steps_per_s": round(results["train_steps_per_s"] or 0.0, 2),
        "num_params": results["num_params"],
        "param_overhead": round((results["num_params"] - dense) / dense, 4),
        "wall_time_s": round(results["wall_time_s"], 1),
        "attention_kwargs": dict(config.model.attention_kwargs)})
  output = pathlib.Path(args.output)
  output.parent.mkdir(parents=True, exist_ok=True)
  with open(output.with_suffix(".csv"), "w", newline="", encoding="utf-8") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  lines = [
      "# ListOps, CPU config, one run per attention mechanism",
      "",
      f"`configs/lra/listops.py:cpu,attention=<name>`; {jax.device_count()} {jax.default_backend()}"
      f" device(s), {platform.processor() or platform.machine()}; jax {jax.__version__}.",
      "Steps/s exclude the first (compiling) step, evaluation and checkpointing.",
      "",
      "| attention | test acc | val acc | steps | steps/s | params | params vs dense | wall s | "
      "options |",
      "|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    lines.append(f"| {r['attention']} | {r['test_accuracy']:.4f} | {r['val_accuracy']:.4f} | "
                 f"{r['steps']} | {r['train_steps_per_s']:.2f} | {r['num_params']:,} | "
                 f"{100 * r['param_overhead']:+.1f} % | {r['wall_time_s']:.0f} | "
                 f"`{r['attention_kwargs']}` |")
  output.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
