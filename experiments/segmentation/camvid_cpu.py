r"""ClusTR-T + Semantic FPN on the CamVid sample on the CPU: ClusTR attention in stages 1-3
against the same pyramid with dense attention and with CAST, from the same random start (seed 0;
no ImageNet checkpoint on the CPU box), ``configs/segmentation/clustr_fpn.py:cpu`` (128 x 128
crops of the half-size images, batch 8, evaluation at 256 x 192 on the 50 val pairs).

Each run is a subprocess (its peak resident memory is the run's); the table has val mIoU, mean
and pixel accuracy, the majority-class mIoU (the train split's most frequent class predicted
everywhere), training images/s and peak memory. ``--plot`` draws predictions of the last ClusTR
run beside the ground truth on val images.

  python experiments/segmentation/camvid_cpu.py --data_dir=/path/to/CamVid --steps=40 \
      --workdir=/tmp/camvid_cpu
  python experiments/segmentation/camvid_cpu.py --data_dir=/path/to/CamVid --plot \
      --workdir=/tmp/camvid_cpu

Outputs: experiments/segmentation/results/camvid_cpu.{md,csv} and camvid_predictions.png.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import pathlib
import resource
import subprocess
import sys

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[2]
RESULTS = REPO / "experiments" / "segmentation" / "results"
ATTENTIONS = ("clustr", "dense", "cast")


def _config(attention: str, steps: int, data_dir: str):
  from configs import common  # pylint: disable=import-outside-toplevel
  config = common.load(f"configs/segmentation/clustr_fpn.py:cpu,steps={steps},"
                       f"attention={attention}")
  config.dataset.data_dir = data_dir
  config.checkpoint_async = False
  return config


def run_one(attention: str, steps: int, data_dir: str, workdir: str) -> None:
  """One training run (in this process); prints its results and peak memory as JSON."""
  from clustr_jax import train  # pylint: disable=import-outside-toplevel
  config = _config(attention, steps, data_dir)
  results = train.train_and_evaluate(config, pathlib.Path(workdir) / attention)
  peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  print("RESULT " + json.dumps({"attention": attention, "val": results["val"],
                                "steps_per_s": results["train_steps_per_s"],
                                "batch_size": config.batch_size, "peak_mib": peak_mib,
                                "num_params": results["num_params"],
                                "wall_time_s": results["wall_time_s"]}))


def majority_miou(data_dir: str) -> tuple[str, float]:
  """The val mIoU of predicting the train split's most frequent class everywhere, at the
  evaluation resolution of the cpu config."""
  from clustr_jax import losses  # pylint: disable=import-outside-toplevel
  from clustr_jax.data import camvid, segmentation  # pylint: disable=import-outside-toplevel
  config = _config("dense", 1, data_dir)
  options = segmentation.options_from(config.dataset)
  counts = np.zeros(256, np.int64)
  for pair in camvid.split_pairs(data_dir, "train"):
    counts += np.bincount(segmentation.read_pair(pair, camvid.LABEL_MAP)[1].ravel(),
                          minlength=256)
  majority = int(np.argmax(counts[:camvid.NUM_CLASSES]))
  confusion = np.zeros((camvid.NUM_CLASSES, camvid.NUM_CLASSES), np.int64)
  for pair in camvid.split_pairs(data_dir, "val"):
    _, labels = segmentation.eval_transform(*segmentation.read_pair(pair, camvid.LABEL_MAP),
                                            options)
    labels = labels[labels != segmentation.IGNORE]
    confusion[:, majority] += np.bincount(labels, minlength=camvid.NUM_CLASSES)
  return camvid.CLASSES[majority], losses.segmentation_metrics(confusion)["miou"]


def plot(data_dir: str, workdir: str, steps: int) -> None:
  """Predictions of the ClusTR run's final parameters on 3 val images beside the labels."""
  import jax  # pylint: disable=import-outside-toplevel
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  from clustr_jax import distill, models  # pylint: disable=import-outside-toplevel
  from clustr_jax.data import camvid, segmentation  # pylint: disable=import-outside-toplevel
  config = _config("clustr", steps, data_dir)
  params = distill.load_params(pathlib.Path(workdir) / "clustr" / "checkpoints")
  model = models.from_config(config.model, {"num_classes": camvid.NUM_CLASSES})
  options = segmentation.options_from(config.dataset)
  pairs = camvid.split_pairs(data_dir, "val")
  picks = [pairs[i] for i in (0, len(pairs) // 2, len(pairs) - 1)]
  palette = np.array([[128, 128, 128], [128, 0, 0], [192, 192, 128], [128, 64, 128],
                      [60, 40, 222], [128, 128, 0], [192, 128, 128], [64, 64, 128],
                      [64, 0, 128], [64, 64, 0], [0, 128, 192]], np.uint8)
  fig, axes = plt.subplots(len(picks), 3, figsize=(10, 2.6 * len(picks)))
  for row, pair in zip(axes, picks):
    image, labels = segmentation.read_pair(pair, camvid.LABEL_MAP)
    x, y = segmentation.eval_transform(image, labels, options)
    pred = np.asarray(jax.jit(lambda p, x: model.apply({"params": p}, x))(params, x[None]))[0]
    pred = pred.argmax(-1)
    shown = np.asarray(x * segmentation.STD + segmentation.MEAN).clip(0, 255).astype(np.uint8)
    truth = np.where(y[..., None] == segmentation.IGNORE, 0, palette[np.minimum(y, 10)])
    for ax, img, title in zip(row, (shown, truth, palette[pred]),
                              ("image", "ground truth (void black)", "ClusTR-T + FPN")):
      ax.imshow(img)
      ax.set_title(f"{title}" if title != "image" else pathlib.Path(pair.image).name, fontsize=9)
      ax.axis("off")
  fig.tight_layout()
  fig.savefig(RESULTS / "camvid_predictions.png", dpi=80)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--data_dir", required=True)
  parser.add_argument("--workdir", default="/tmp/camvid_cpu")
  parser.add_argument("--steps", type=int, default=40)
  parser.add_argument("--attentions", default=",".join(ATTENTIONS))
  parser.add_argument("--run", default=None, help="internal: one run in this process")
  parser.add_argument("--plot", action="store_true")
  args = parser.parse_args()
  if args.run:
    run_one(args.run, args.steps, args.data_dir, args.workdir)
    return
  if args.plot:
    plot(args.data_dir, args.workdir, args.steps)
    return
  RESULTS.mkdir(parents=True, exist_ok=True)
  name, base = majority_miou(args.data_dir)
  rows = []
  for attention in args.attentions.split(","):
    out = subprocess.run([sys.executable, __file__, f"--run={attention}", f"--steps={args.steps}",
                          f"--data_dir={args.data_dir}", f"--workdir={args.workdir}"],
                         check=True, capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    result = json.loads(next(line for line in out.stdout.splitlines()
                             if line.startswith("RESULT "))[7:])
    val = result["val"]
    rows.append({"attention (stages 1-3)": attention, "val mIoU": round(val["miou"], 4),
                 "val mean acc": round(val["mean_accuracy"], 4),
                 "val pixel acc": round(val["pixel_accuracy"], 4),
                 "majority-class mIoU": round(base, 4),
                 "train images/s": round(result["steps_per_s"] * result["batch_size"], 2),
                 "peak memory MiB": round(result["peak_mib"]),
                 "parameters": result["num_params"], "steps": args.steps,
                 "wall time s": round(result["wall_time_s"])})
    print(rows[-1], flush=True)
    _write(rows, name, base, args.steps)  # After every run: a cut-short sweep keeps its rows.


def _write(rows: list[dict], name: str, base: float, steps: int) -> None:
  with open(RESULTS / "camvid_cpu.csv", "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  load = os.getloadavg()
  lines = ["# ClusTR-T + Semantic FPN on the CamVid sample (CPU)", "",
           f"`configs/segmentation/clustr_fpn.py:cpu`, {steps} steps of batch 8 (128 x 128 "
           f"crops), from the same random start; val = the sample's 50 val pairs at 256 x 192. "
           f"Majority class ({name}) everywhere: mIoU {base:.4f}. Timings on a 2-core CPU, "
           f"the runs one after another (load average at the end {load[0]:.1f}, {load[1]:.1f}, "
           f"{load[2]:.1f}; the run's own threads make about 2).", "",
           "| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
  lines += ["| " + " | ".join(str(v) for v in row.values()) + " |" for row in rows]
  (RESULTS / "camvid_cpu.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
  main()
