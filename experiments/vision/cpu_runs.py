r"""Short CPU training runs on the Imagenette sample: DeiT-Ti with each attention, ClusTR-T, and
the Sparsifiner two-stage chain; a table of accuracy (chance: 10%) and images/s.

Runs, one after the other in one process, each in ``<workdir>/<run>``:
  deit_ti_dense        ``configs/imagenet/deit.py:cpu,attention=dense``
  sparsifiner_recon    ``configs/imagenet/sparsifiner.py:cpu,stage=recon``, initialised from
                       deit_ti_dense (which is also the teacher)
  sparsifiner_distill  ``...:cpu,stage=distill`` from sparsifiner_recon, teacher deit_ti_dense
  deit_ti_<attention>  ``configs/imagenet/deit.py:cpu,attention=<attention>``, other mechanisms
  clustr_t             ``configs/imagenet/clustr.py:cpu``
Writes ``experiments/vision/results/cpu_runs.{md,csv}`` after every run; a run whose
``results.json`` exists is not run again (restart the script to continue). Images/s = train
steps/s (without the compiling step, evaluation and checkpointing) x batch.

  python experiments/vision/cpu_runs.py --workdir=workdir/vision_cpu \
      --data_dir=../shared/data/imagenette_224 --steps=300
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import pathlib
import platform
import sys

import jax

from clustr_jax import attention, train
from configs import common as config_common

REPO = pathlib.Path(__file__).resolve().parents[2]
RESULTS = REPO / "experiments" / "vision" / "results"


def runs(workdir: pathlib.Path, steps: int, distill_steps: int, mechanisms: list[str]):
  """(run name, config spec) in dependency order: the dense DeiT-Ti first (the Sparsifiner
  teacher and initialisation)."""
  spec = [("deit_ti_dense", f"deit.py:cpu,attention=dense,steps={steps}")]
  teacher = str(workdir / "deit_ti_dense" / "checkpoints")
  recon_steps = max(1, distill_steps // 3)
  spec.append(("sparsifiner_recon",
               f"sparsifiner.py:cpu,stage=recon,steps={recon_steps},init_checkpoint={teacher}"))
  spec.append(("sparsifiner_distill",
               f"sparsifiner.py:cpu,stage=distill,steps={distill_steps},init_checkpoint="
               f"{workdir / 'sparsifiner_recon' / 'checkpoints'},teacher_checkpoint={teacher}"))
  for name in mechanisms:
    if name != "dense":
      spec.append((f"deit_ti_{name}", f"deit.py:cpu,attention={name},steps={steps}"))
  spec.append(("clustr_t", f"clustr.py:cpu,steps={steps}"))
  return spec


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default="workdir/vision_cpu")
  parser.add_argument("--data_dir", default="", help="Imagenette folder (default: the configs')")
  parser.add_argument("--steps", type=int, default=300, help="steps of each DeiT/ClusTR run")
  parser.add_argument("--distill_steps", type=int, default=300,
                      help="steps of Sparsifiner stage 2 (stage 1: a third of them)")
  parser.add_argument("--mechanisms", default=",".join(attention.names()))
  parser.add_argument("--only", default="", help="comma-separated run names (default: all)")
  parser.add_argument("--output", default=str(RESULTS / "cpu_runs"))
  args = parser.parse_args()
  workdir = pathlib.Path(args.workdir).absolute()
  output = pathlib.Path(args.output)
  output.parent.mkdir(parents=True, exist_ok=True)
  rows = []
  only = set(filter(None, args.only.split(",")))
  for run, config_spec in runs(workdir, args.steps, args.distill_steps,
                                  args.mechanisms.split(",")):
    if only and run not in only:
      continue
    config = config_common.load(f"{REPO}/configs/imagenet/{config_spec}")
    if args.data_dir:
      config.dataset.data_dir = os.path.abspath(args.data_dir)
    done = workdir / run / "results.json"
    if done.exists():  # Finished before (the script was restarted): reuse its results.
      results = json.loads(done.read_text())
    else:
      results = train.train_and_evaluate(config, workdir / run)
    rows.append({
        "run": run, "model": config.model.name, "attention": config.model.get("attention"),
        "stage": config.get("distill", {}).get("stage", "") if config.get("distill") else "",
        "test_accuracy": round(results["test"]["accuracy"], 4), "steps": results["step"],
        "batch": config.batch_size,
        "images_per_s": round((results["train_steps_per_s"] or 0.0) * config.batch_size, 1),
        "num_params": results["num_params"], "wall_time_s": round(results["wall_time_s"], 1),
        "config": config_spec.split(",init_checkpoint")[0]})
    write(rows, output)


def write(rows: list[dict], output: pathlib.Path) -> None:
  """The CSV and Markdown tables of the runs so far."""
  with open(output.with_suffix(".csv"), "w", newline="", encoding="utf-8") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  lines = [
      "# Vision CPU runs on the Imagenette sample (10 classes: chance 10%)",
      "",
      f"1,200 train / 300 val images at 64 x 64 px; test = the 300 val images. "
      f"{jax.device_count()} {jax.default_backend()} device, {platform.machine()}, 2 cores "
      f"shared with other jobs; jax {jax.__version__}. Images/s exclude the compiling step, "
      "evaluation and checkpointing. Command: `python experiments/vision/cpu_runs.py "
      f"{' '.join(sys.argv[1:])}`.",
      "",
      "| run | model | attention | stage | test acc | steps | batch | images/s | params | "
      "wall s | config |",
      "|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    lines.append(f"| {r['run']} | {r['model']} | {r['attention']} | {r['stage'] or '-'} | "
                 f"{r['test_accuracy']:.4f} | {r['steps']} | {r['batch']} | "
                 f"{r['images_per_s']:.1f} | {r['num_params']:,} | {r['wall_time_s']:.0f} | "
                 f"`{r['config']}` |")
  output.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
