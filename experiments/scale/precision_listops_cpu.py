r"""bfloat16 versus float32 compute on the ListOps CPU config: step time, accuracy, loss.

Runs ``configs/lra/listops.py:cpu`` twice in one process, with ``model.dtype`` float32 and then
bfloat16 (parameters and optimizer state stay float32 in both), on the same generated data and
seed, each in its own workdir, and writes a Markdown and a JSON table of training steps/s
(``results.json``'s ``train_steps_per_s``: log intervals without eval and checkpointing), final
train loss, validation and test accuracy to ``experiments/scale/results/``.

  python experiments/scale/precision_listops_cpu.py --workdir=workdir/precision
  python experiments/scale/precision_listops_cpu.py --num_train_steps=300
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform

import jax

from clustr_jax import train
from configs import common as config_common

REPO = pathlib.Path(__file__).resolve().parents[2]
RESULTS = REPO / "experiments" / "scale" / "results"


def last_train_loss(workdir: pathlib.Path) -> float:
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [r for r in records if r["split"] == "train"][-1]["loss"]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default="workdir/precision_listops_cpu")
  parser.add_argument("--num_train_steps", type=int, default=None,
                      help="override the config's steps (default: the config's 2,000)")
  parser.add_argument("--output", default=str(RESULTS / "precision_listops_cpu"),
                      help="path prefix of the .md and .json tables")
  args = parser.parse_args()
  workdir = pathlib.Path(args.workdir)
  rows = []
  for dtype in ("float32", "bfloat16"):
    config = config_common.load(f"{REPO}/configs/lra/listops.py:cpu")
    config.dataset.data_dir = str(workdir / "data")
    config.model.dtype = dtype
    if args.num_train_steps:
      config.num_train_steps = args.num_train_steps
    run_dir = workdir / dtype
    results = train.train_and_evaluate(config, run_dir)
    rows.append({"dtype": dtype, "steps": results["step"],
                 "train_steps_per_s": round(results["train_steps_per_s"], 2),
                 "final_train_loss": round(last_train_loss(run_dir), 4),
                 "val_accuracy": round(results["val"]["accuracy"], 4),
                 "test_accuracy": round(results["test"]["accuracy"], 4),
                 "wall_time_s": round(results["wall_time_s"], 1)})
  output = pathlib.Path(args.output)
  output.parent.mkdir(parents=True, exist_ok=True)
  machine = (f"{jax.device_count()} {jax.default_backend()} device(s), {os.cpu_count()} CPU "
             f"cores, {platform.processor() or platform.machine()}, jax {jax.__version__}, "
             f"1-min load average {os.getloadavg()[0]:.1f} at the end (cores shared with other "
             f"jobs)")
  output.with_suffix(".json").write_text(json.dumps({"machine": machine, "rows": rows},
                                                    indent=2) + "\n")
  ratio = rows[1]["train_steps_per_s"] / rows[0]["train_steps_per_s"]
  lines = [
      "# bfloat16 versus float32 compute, ListOps CPU config",
      "",
      f"`configs/lra/listops.py:cpu` with `model.dtype` = float32 / bfloat16 (float32 parameters "
      f"and optimizer state), {rows[0]['steps']} steps, same data and seed; {machine}.",
      "",
      "| dtype | steps | train steps/s | final train loss | val acc | test acc | wall s |",
      "|---|---|---|---|---|---|---|",
      *(f"| {r['dtype']} | {r['steps']} | {r['train_steps_per_s']} | {r['final_train_loss']} | "
        f"{r['val_accuracy']} | {r['test_accuracy']} | {r['wall_time_s']} |" for r in rows),
      "",
      f"bfloat16 runs at {ratio:.2f}x the float32 step rate here.",
      "",
      "Command: `python experiments/scale/precision_listops_cpu.py" +
      (f" --num_train_steps={args.num_train_steps}`" if args.num_train_steps else "`"),
  ]
  output.with_suffix(".md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
