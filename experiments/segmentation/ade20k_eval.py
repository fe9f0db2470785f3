r"""The train loop's ADE20K evaluation pass for ClusTR-T + Semantic FPN at the official crop size:
mIoU, mean accuracy and pixel accuracy from the confusion matrix (``train.eval_step`` /
``train.evaluate``, ``losses.eval_metrics``), on the whole image and with 512 x 512 sliding
windows, from a checkpoint or from a random start; with seconds per image and memory.

Input: ADE20K validation pairs in the released layout (``<data_dir>/images/validation/*.jpg``,
``<data_dir>/annotations/validation/*.png``; ``clustr_jax/data/ade20k.py``). Pre-resized, padded
copies read the same way: e.g. ``ade20k_tiny_512`` (10 val pairs resized to long side 512 and
padded to 512 x 512, label 255 in the padding, which the reader ignores; the padded image area
is then part of the input but none of its pixels is scored). Preprocessing is the recipe's
(``configs/segmentation/clustr_fpn.py``, dataset=ade20k): short side to 512 (multiples of 32),
normalised, padded to the 512 x 704 canvas. ``whole`` runs the model on the canvas; ``slide``
runs 512 x 512 windows every 341 pixels (mmsegmentation's ADE20K ``slide`` test setting,
``SemanticFPN`` ``test_mode='slide'``), two windows across the canvas.

Weights: ``--checkpoint`` (an Orbax checkpoint, ``distill.params_from_checkpoint``) fills the
subtree ``--checkpoint_prefix`` ('backbone' for an ImageNet ClusTR classifier; '' for a whole
Semantic FPN run); without it the model keeps its random initialisation (seed 0), whose mIoU is
near zero: such a run shows that the pass works at 512 x 512 and what it costs.

Timing: the eval step is compiled ahead (``lower().compile()``, timed apart); each image is then
one call of the compiled step (batch 1), and the median over the images is reported. Memory:
XLA's compiled temp and argument sizes of the eval step, and the process's peak resident set.
On a shared CPU the times are taken under load.

  python experiments/segmentation/ade20k_eval.py \
      --data_dir=/work/shared/data/segmentation/ade20k_tiny_512 --out=ade20k_eval_tiny_random
  python experiments/segmentation/ade20k_eval.py --data_dir=/data/ADEChallengeData2016 \
      --checkpoint=/runs/clustr_t_fpn/checkpoints --checkpoint_prefix= --out=ade20k_eval_val

Output: experiments/segmentation/results/<out>.{md,json}.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import platform
import resource
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from clustr_jax import distill, losses, models, sharding, train
from clustr_jax.data import ade20k, segmentation
from clustr_jax.models import segmentation as fpn
from configs import common

REPO = pathlib.Path(__file__).resolve().parents[2]
RESULTS = REPO / "experiments" / "segmentation" / "results"
WINDOW, STRIDE = (512, 512), (341, 341)
MODES = ("whole", "slide")


def load(data_dir: str, backbone: str):
  """(config, dataset) of the recipe's ADE20K evaluation on ``data_dir``'s validation pairs.

  Only the val role is read (the dataset's train role is empty).

  Raises:
    FileNotFoundError: missing folders or unpaired files (``ade20k.split_pairs``).
  """
  config = common.load(f"configs/segmentation/clustr_fpn.py:backbone={backbone}")
  config.dataset.data_dir = data_dir
  pairs = ade20k.split_pairs(segmentation.check_data_dir(config.dataset, ade20k.LAYOUT),
                             config.dataset.splits.val)
  dataset = segmentation.SegmentationDataset(
      {"train": (), "val": pairs}, ade20k.LABEL_MAP, ade20k.NUM_CLASSES,
      segmentation.options_from(config.dataset), config.dataset.read_threads)
  return config, dataset


def evaluate(config, dataset, mode: str, checkpoint: str | None, prefix: str) -> dict:
  """One evaluation pass in ``mode``: the loop's metrics plus timing and memory."""
  mesh = sharding.create_mesh(**config.mesh.to_dict())
  options = {"test_mode": mode}
  if mode == "slide":
    options.update(test_window=WINDOW, test_stride=STRIDE)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
    model = models.from_config({**config.model.to_dict(), **options}, dataset.model_kwargs)
    sample = jnp.zeros((1, *config.dataset.crop_size, 3), jnp.float32)
    params = nn.meta.unbox(jax.jit(functools.partial(model.init, train=False))(
        jax.random.key(config.seed), sample)["params"])
    if checkpoint:
      params = distill.params_from_checkpoint(params, checkpoint, prefix=prefix or None)
    step = jax.jit(functools.partial(train.eval_step, model=model, input_keys=("images",),
                                     task="segmentation"))
    batches = list(dataset.eval_batches("val", batch_size=1))
    start = time.perf_counter()
    compiled = step.lower(params, train.global_batch(batches[0], mesh)).compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    seconds, totals = [], None
    for local in batches:
      start = time.perf_counter()
      sums = jax.block_until_ready(compiled(params, train.global_batch(local, mesh)))
      seconds.append(time.perf_counter() - start)
      totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    metrics = losses.eval_metrics("segmentation", jax.device_get(totals))
  canvas = tuple(config.dataset.eval_size)
  return {"mode": mode, "images": len(batches), "canvas": canvas,
          "windows": (1 if mode == "whole" else
                      len(fpn.window_starts(canvas[0], WINDOW[0], STRIDE[0]))
                      * len(fpn.window_starts(canvas[1], WINDOW[1], STRIDE[1]))),
          **{k: float(v) for k, v in metrics.items()},
          "compile_s": compile_s, "first_step_s": seconds[0],
          "median_s_per_image": float(np.median(seconds)),
          "xla_temp_mib": memory.temp_size_in_bytes / 2 ** 20 if memory else float("nan"),
          "xla_argument_mib": memory.argument_size_in_bytes / 2 ** 20 if memory else float("nan"),
          "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data_dir", required=True)
  parser.add_argument("--backbone", default="clustr_t", choices=("clustr_t", "clustr_s",
                                                                   "clustr_b"))
  parser.add_argument("--checkpoint", default="")
  parser.add_argument("--checkpoint_prefix", default="backbone")
  parser.add_argument("--modes", default="whole,slide")
  parser.add_argument("--out", default="ade20k_eval")
  args = parser.parse_args()
  modes = args.modes.split(",")
  if not set(modes) <= set(MODES):
    parser.error(f"--modes={args.modes}: valid modes are {', '.join(MODES)}")
  config, dataset = load(args.data_dir, args.backbone)
  rows = []
  for mode in modes:
    rows.append(evaluate(config, dataset, mode, args.checkpoint, args.checkpoint_prefix))
    print(json.dumps(rows[-1]), flush=True)
  load_avg = os.getloadavg()
  start = (f"checkpoint {args.checkpoint} (prefix {args.checkpoint_prefix!r})"
           if args.checkpoint else "random initialisation (seed 0), no checkpoint")
  command = " ".join(["python experiments/segmentation/ade20k_eval.py",
                      f"--data_dir={args.data_dir}", f"--backbone={args.backbone}",
                      *([f"--checkpoint={args.checkpoint}",
                         f"--checkpoint_prefix={args.checkpoint_prefix}"]
                        if args.checkpoint else []),
                      f"--modes={args.modes}", f"--out={args.out}"])
  lines = [f"# ADE20K evaluation pass: {args.backbone} + Semantic FPN", "",
           f"`{command}`", "",
           f"{len(dataset.pairs('val'))} val pairs; {start}; 150 classes; canvas "
           f"{rows[0]['canvas'][0]} x {rows[0]['canvas'][1]}; slide windows "
           f"{WINDOW[0]} x {WINDOW[1]} every {STRIDE[0]}; batch 1, float32; jax "
           f"{jax.__version__}, {platform.machine()} CPU. Shared machine, load average "
           f"{load_avg[0]:.1f} / {load_avg[1]:.1f} / {load_avg[2]:.1f} at the end: timings "
           "under load. Peak RSS is the process's, cumulative over the modes run before.", "",
           "| mode | windows | mIoU | mean acc | pixel acc | labelled pixels | compile s | "
           "first image s | median s / image | XLA temp MiB | XLA arguments MiB | peak RSS "
           "MiB |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['mode']} | {r['windows']} | {r['miou']:.4f} | "
                 f"{r['mean_accuracy']:.4f} | {r['pixel_accuracy']:.4f} | "
                 f"{int(r['num_pixels']):,} | {r['compile_s']:.1f} | {r['first_step_s']:.1f} | "
                 f"{r['median_s_per_image']:.2f} | {r['xla_temp_mib']:.0f} | "
                 f"{r['xla_argument_mib']:.0f} | {r['peak_rss_mib']:.0f} |")
  lines.append("")
  RESULTS.mkdir(parents=True, exist_ok=True)
  (RESULTS / f"{args.out}.md").write_text("\n".join(lines))
  (RESULTS / f"{args.out}.json").write_text(json.dumps(
      {"command": command, "load_average": load_avg, "rows": rows}, indent=1) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
