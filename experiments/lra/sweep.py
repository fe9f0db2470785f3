r"""The LRA sweep: task x attention mechanism from ``configs/lra/<task>.py``, one table, one plot.

Each run is ``configs/lra/<task>.py:<variant>,attention=<name>`` trained by
``clustr_jax.train.train_and_evaluate`` in ``<workdir>/<task>/<name>/`` (an existing
``results.json`` there is reused unless ``--rerun``), one run after the other in this process.
Then every ``<workdir>/*/*/results.json`` is gathered into

  <output>.md   LRA's Table 1 layout: LRA's published Transformer row (the official configs,
                ``docs/lra.md``) beside our rows (one per mechanism), then one row per run with
                test and validation accuracy, the test set's majority-class share (chance),
                steps, train steps/s, parameters, the parameter overhead over the dense encoder
                of the same config (LRA allows +10 %; ``experiments/lra/parameters.py``), wall
                time and the attention options;
  <output>.csv  the per-run rows, with LRA's published Transformer accuracy of the task;
  <output>.png  test accuracy against train steps/s, one marker per (task, mechanism).

Data: Text and Image read the real samples (``--imdb_dir``, ``--cifar_dir``); ListOps, Pathfinder
and Path-X generate theirs (in the workdir) as their configs do; Retrieval needs the AAN TSVs of
the LRA release (``--aan_dir``) and is skipped without them.

  python experiments/lra/sweep.py --tasks=listops,text,image --mechanisms=dense
  python experiments/lra/sweep.py --tasks=text,image --mechanisms=dense,clustr,cast,sparsifiner
  python experiments/lra/sweep.py --gather_only \
      --import_csv=listops=experiments/lra/results/listops_cpu_mechanisms.csv  # table + plot only
"""

from __future__ import annotations

import argparse
import collections
import csv
import json
import pathlib
import platform

import jax
import numpy as np

from clustr_jax import attention, train
from clustr_jax import data as data_lib
from configs import common as config_common
from configs.lra import common as lra_common

REPO = pathlib.Path(__file__).resolve().parents[2]
RESULTS = REPO / "experiments" / "lra" / "results"
TASKS = ("listops", "text", "retrieval", "image", "pathfinder", "pathx")
TITLES = {"listops": "ListOps", "text": "Text", "retrieval": "Retrieval", "image": "Image",
          "pathfinder": "Pathfinder", "pathx": "Path-X"}
# LRA README leaderboard / paper Table 1, vanilla Transformer, test accuracy % (``docs/lra.md``).
LRA_TRANSFORMER = {"listops": 36.37, "text": 64.27, "retrieval": 57.46, "image": 42.44,
                   "pathfinder": 71.40, "pathx": None}  # Path-X: FAIL (chance) for every model.


def task_config(task: str, variant: str, mechanism: str, args: argparse.Namespace,
                workdir: pathlib.Path):
  """The run config of ``task`` with ``attention=mechanism`` and its data location, or None
  when the task's data is not available (Retrieval without ``--aan_dir``) or no config exists."""
  path = REPO / "configs" / "lra" / f"{task}.py"
  if not path.is_file():
    return None
  arg = ",".join(a for a in (variant, f"attention={mechanism}") if a)
  config = config_common.load(f"{path}:{arg}")
  data_dirs = {"text": args.imdb_dir, "image": args.cifar_dir, "retrieval": args.aan_dir}
  if task in data_dirs:
    if not data_dirs[task]:
      return None
    config.dataset.data_dir = str(data_dirs[task])
  else:  # Generated data, shared by the mechanisms of a task.
    config.dataset.data_dir = str(workdir / task / "data")
  if args.num_train_steps:
    config.num_train_steps = args.num_train_steps
  return config


def majority_share(config) -> tuple[float, int]:
  """(the share of the test set's most frequent class, i.e. the accuracy of always guessing it,
  the test set's size)."""
  targets = data_lib.get(config, "/unused").splits["test"]["targets"]
  return float(np.bincount(targets).max() / len(targets)), len(targets)


def _without_data_dir(config: dict) -> dict:
  return {**config, "dataset": {k: v for k, v in config["dataset"].items() if k != "data_dir"}}


def param_overhead(config, num_params: int) -> float:
  """(num_params - dense) / dense, dense = the parameters of ``config``'s model with dense
  attention (``configs/lra/common.py:dense_parameters``, the task's vocabulary and classes)."""
  vocab_size, num_classes = lra_common.data_sizes(config.dataset.name)
  dense = lra_common.dense_parameters(config.model, vocab_size=vocab_size,
                                      num_classes=num_classes,
                                      max_length=config.dataset.max_length)
  return round((num_params - dense) / dense, 4)


def gather(workdir: pathlib.Path, args: argparse.Namespace, variant: str) -> list[dict]:
  """One row per ``<workdir>/<task>/<mechanism>/results.json``, in TASKS then mechanism order.

  ``config_matches`` says whether the run's saved config is today's ``configs/lra/<task>.py``
  (data_dir aside; the JSON round trip turns tuples into lists, so both sides go through it).
  """
  rows, chance = [], {}
  for task in TASKS:
    for mechanism in attention.names():
      path = workdir / task / mechanism / "results.json"
      if not path.is_file():
        continue
      results = json.loads(path.read_text())
      config = task_config(task, variant, mechanism, args, workdir)
      if task not in chance:
        chance[task] = majority_share(config)[0]
      expected = json.loads(json.dumps(config.to_dict(), default=str))
      rows.append({
          "task": task, "attention": mechanism,
          "test_accuracy": round(results["test"]["accuracy"], 4),
          "val_accuracy": round(results["val"]["accuracy"], 4),
          "chance": round(chance[task], 4),
          "test_examples": int(results["test"]["num_examples"]),
          "steps": results["step"],
          "train_steps_per_s": round(results["train_steps_per_s"] or 0.0, 2),
          "num_params": results["num_params"],
          "param_overhead": param_overhead(config, results["num_params"]),
          "wall_time_s": round(results["wall_time_s"], 1),
          "lra_transformer_published": LRA_TRANSFORMER[task],
          "config_matches": _without_data_dir(expected) == _without_data_dir(results["config"]),
          "attention_kwargs": results["config"]["model"].get("attention_kwargs", {}),
          "source": str(path),
      })
  return rows


def import_csv(spec: str, workdir: pathlib.Path, args: argparse.Namespace,
               variant: str) -> list[dict]:
  """Rows of ``TASK=PATH``: a table of runs of ``configs/lra/<TASK>.py:<variant>`` made by another
  script (columns attention, test_accuracy, val_accuracy, steps, train_steps_per_s, num_params,
  wall_time_s, attention_kwargs, as ``listops_cpu_mechanisms.csv``), marked ``imported``."""
  task, _, path = spec.partition("=")
  rows = []
  with open(path, newline="", encoding="utf-8") as f:
    for r in csv.DictReader(f):
      config = task_config(task, variant, r["attention"], args, workdir)
      share, size = majority_share(config)
      rows.append({
          "task": task, "attention": r["attention"],
          "test_accuracy": float(r["test_accuracy"]), "val_accuracy": float(r["val_accuracy"]),
          "chance": round(share, 4), "test_examples": size,
          "steps": int(r["steps"]), "train_steps_per_s": float(r["train_steps_per_s"]),
          "num_params": int(r["num_params"]),
          "param_overhead": param_overhead(config, int(r["num_params"])),
          "wall_time_s": float(r["wall_time_s"]),
          "lra_transformer_published": LRA_TRANSFORMER[task],
          "config_matches": int(r["steps"]) == config.num_train_steps,
          "attention_kwargs": r["attention_kwargs"], "source": f"imported from {path}"})
  return rows


def _percent(value) -> str:
  return "FAIL" if value is None else f"{value:.2f}"


def write_table(rows: list[dict], output: pathlib.Path, variant: str, note: str = "") -> str:
  """Writes ``output``.csv and .md (``note``: a paragraph on how the runs were made); returns the
  Markdown."""
  output.parent.mkdir(parents=True, exist_ok=True)
  with open(output.with_suffix(".csv"), "w", newline="", encoding="utf-8") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  by_mechanism = collections.defaultdict(dict)
  for r in rows:
    by_mechanism[r["attention"]][r["task"]] = r
  chance = {r["task"]: r["chance"] for r in rows}
  header = "| model | " + " | ".join(TITLES[t] for t in TASKS) + " |"
  lines = [
      f"# LRA sweep, `configs/lra/<task>.py:{variant},attention=<name>`",
      "",
      f"{jax.device_count()} {jax.default_backend()} device(s), "
      f"{platform.processor() or platform.machine()}; jax {jax.__version__}. Test accuracy in %.",
      "LRA's row is its published Transformer with the official configs (README leaderboard = "
      "paper Table 1); ours are the CPU-sized configs on the data named in "
      "`experiments/lra/sweep.py` (small real samples or generated data), so the two are not the "
      "same experiment. '-' is a run not made.",
      *([note] if note else []),
      "",
      header,
      "|---" * (len(TASKS) + 1) + "|",
      "| LRA Transformer (published, official configs) | "
      + " | ".join(_percent(LRA_TRANSFORMER[t]) for t in TASKS) + " |",
  ]
  for mechanism, tasks in by_mechanism.items():
    lines.append(f"| clustr_jax {mechanism} ({variant} configs) | " + " | ".join(
        f"{100 * tasks[t]['test_accuracy']:.2f}" if t in tasks else "-" for t in TASKS) + " |")
  lines.append("| chance (test majority class) | " + " | ".join(
      f"{100 * chance[t]:.2f}" if t in chance else "-" for t in TASKS) + " |")
  lines += [
      "",
      "Per run (steps/s exclude the first, compiling step, evaluation and checkpointing):",
      "",
      "| task | attention | test acc | val acc | chance | test n | steps | steps/s | params | "
      "params vs dense | wall s | options |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    lines.append(
        f"| {TITLES[r['task']]} | {r['attention']} | {r['test_accuracy']:.4f} | "
        f"{r['val_accuracy']:.4f} | {r['chance']:.4f} | {r['test_examples']} | {r['steps']} | "
        f"{r['train_steps_per_s']:.2f} | {r['num_params']:,} | "
        f"{100 * r['param_overhead']:+.1f} % | {r['wall_time_s']:.0f} | "
        f"`{r['attention_kwargs']}`{'' if r['config_matches'] else ' (config differs)'}"
        f"{' (imported)' if r['source'].startswith('imported') else ''} |")
  markdown = "\n".join(lines) + "\n"
  output.with_suffix(".md").write_text(markdown, encoding="utf-8")
  return markdown


def plot(rows: list[dict], output: pathlib.Path) -> None:
  """``output``.png: test accuracy against train steps/s (color = task, marker = mechanism)."""
  import matplotlib  # pylint: disable=g-import-not-at-top  (only the sweep needs it)
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  markers = dict(zip(attention.names(), "osD^"))
  colors = dict(zip(TASKS, plt.get_cmap("tab10").colors))
  fig, ax = plt.subplots(figsize=(6.4, 4.4))
  for r in rows:
    ax.scatter(r["train_steps_per_s"], 100 * r["test_accuracy"], color=colors[r["task"]],
               marker=markers[r["attention"]], s=50)
    ax.axhline(100 * r["chance"], color=colors[r["task"]], lw=0.6, ls=":")
  for task in dict.fromkeys(r["task"] for r in rows):
    ax.plot([], [], color=colors[task], lw=6, label=TITLES[task])
  for mechanism in dict.fromkeys(r["attention"] for r in rows):
    ax.scatter([], [], color="gray", marker=markers[mechanism], label=mechanism)
  ax.set_xscale("log")
  ax.set_xlabel("train steps/s (log scale)")
  ax.set_ylabel("test accuracy (%)")
  ax.set_title("LRA CPU configs: accuracy vs speed (dotted: chance)")
  ax.legend(fontsize=8, ncol=2)
  fig.tight_layout()
  fig.savefig(output.with_suffix(".png"), dpi=120)
  plt.close(fig)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default="workdir/lra_sweep")
  parser.add_argument("--tasks", default="listops,text,image,pathfinder",
                      help=f"comma-separated, from {', '.join(TASKS)}")
  parser.add_argument("--mechanisms", default="dense",
                      help=f"comma-separated, from {', '.join(attention.names())}")
  parser.add_argument("--variant", default="cpu", help="config arg before attention= ('' for "
                      "the official configs)")
  parser.add_argument("--imdb_dir", default=str(REPO.parent / "shared" / "data" / "imdb"))
  parser.add_argument("--cifar_dir", default=str(REPO.parent / "shared" / "data" / "cifar10"))
  parser.add_argument("--aan_dir", default="", help="folder of new_aan_pairs.*.tsv")
  parser.add_argument("--num_train_steps", type=int, default=None,
                      help="override every config's steps (default: the configs')")
  parser.add_argument("--rerun", action="store_true", help="train even where results.json exists")
  parser.add_argument("--gather_only", action="store_true")
  parser.add_argument("--import_csv", action="append", default=[], metavar="TASK=PATH",
                      help="also tabulate the runs of TASK in PATH (e.g. "
                      "listops=experiments/lra/results/listops_cpu_mechanisms.csv)")
  parser.add_argument("--note", default="", help="a sentence for the table, e.g. how the runs "
                      "were made (machine, load)")
  parser.add_argument("--output", default=str(RESULTS / "lra_cpu_sweep"),
                      help="path prefix of the .md, .csv and .png outputs")
  args = parser.parse_args()
  workdir = pathlib.Path(args.workdir)
  unknown = set(args.tasks.split(",")) - set(TASKS)
  if unknown:
    parser.error(f"--tasks: unknown {sorted(unknown)}; valid: {', '.join(TASKS)}")
  if not args.gather_only:
    for task in args.tasks.split(","):
      for mechanism in args.mechanisms.split(","):
        config = task_config(task, args.variant, mechanism, args, workdir)
        run_dir = workdir / task / mechanism
        if config is None:
          print(f"skip {task}/{mechanism}: no config or no data")
        elif args.rerun or not (run_dir / "results.json").is_file():
          train.train_and_evaluate(config, run_dir)
  rows = gather(workdir, args, args.variant)
  imported = [row for spec in args.import_csv for row in import_csv(spec, workdir, args,
                                                                     args.variant)]
  rows = sorted(rows + imported, key=lambda r: (TASKS.index(r["task"]),
                                                attention.names().index(r["attention"])))
  if not rows:
    parser.error(f"no results.json under {workdir}/<task>/<mechanism>/")
  output = pathlib.Path(args.output)
  print(write_table(rows, output, args.variant, args.note))
  plot(rows, output)


if __name__ == "__main__":
  main()
