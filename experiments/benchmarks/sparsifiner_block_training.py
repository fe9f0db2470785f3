r"""Sparsifiner's block path against its token-level path in training: the same config, same seed.

Pairs of runs, each trained by ``train.train_and_evaluate`` in ``<workdir>/<run>``:
  listops_token / listops_block   ``configs/lra/listops.py:cpu,attention=sparsifiner`` (65 tokens
                                  with CLS), the block run with ``path='block'`` and
                                  ``--block_listops`` tokens per block
  deit_ti_token / deit_ti_block   ``configs/imagenet/deit.py:cpu,attention=sparsifiner`` (DeiT-Ti
                                  on 64 x 64 Imagenette, 17 tokens with CLS), the block run with
                                  ``--block_deit`` tokens per block
Nothing else differs within a pair (the config's keep rate, reduce factors, schedule, data order
and initialisation). The CPU configs' sequences are short, so the block sizes are small: the
module's default of 64 tokens would make one block and full attention. The table gives the keys
each patch query attends to in each path (token level ceil(keep_rate N); block path the kept
blocks' tokens). A run whose ``results.json`` exists is not run again.

  python experiments/benchmarks/sparsifiner_block_training.py --workdir=workdir/block_training \
      --data_dir=../shared/data/imagenette_224 --deit_steps=60

Outputs: ``experiments/results/sparsifiner_block_training.{md,csv}`` (--output). Train steps/s
exclude the compiling step, evaluation and checkpointing; the speed claims of the block path
are the layer benchmark's (``attention.py --preset=targets_block``), at the lengths it is for.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import platform

import attention as bench
import jax

from clustr_jax import train
from configs import common as config_common

REPO = pathlib.Path(__file__).resolve().parents[2]
RESULTS = REPO / "experiments" / "results"


def run_configs(args: argparse.Namespace) -> dict[str, object]:
  """{run name: config} of the four runs."""
  configs = {}
  for task, spec, block in (
      ("listops", "lra/listops.py:cpu,attention=sparsifiner", args.block_listops),
      ("deit_ti", f"imagenet/deit.py:cpu,attention=sparsifiner,steps={args.deit_steps},"
                  f"data_dir={args.data_dir}", args.block_deit)):
    for path in ("token", "block"):
      config = config_common.load(str(REPO / "configs" / spec), lock=False)
      if task == "listops":
        config.dataset.data_dir = str(pathlib.Path(args.workdir) / "listops_data")
      if path == "block":
        config.model.attention_kwargs = dict(config.model.attention_kwargs) | {
            "path": "block", "block_size": block}
      configs[f"{task}_{path}"] = config
  return configs


def keys_attended(config, length: int) -> int:
  """Keys per patch query: ceil(keep_rate N) (token level) or ceil(keep_rate NB) blocks of
  ``block_size`` tokens (block path; the last block may be short, counted full)."""
  kwargs = dict(config.model.attention_kwargs)
  keep = kwargs.get("keep_rate", 0.25)
  if kwargs.get("path") != "block":
    return math.ceil(keep * length)
  blocks = -(-length // kwargs["block_size"])
  return min(math.ceil(keep * blocks) * kwargs["block_size"], length)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", default="workdir/block_training")
  p.add_argument("--data_dir", default=str(REPO.parent / "shared" / "data" / "imagenette_224"),
                 help="the Imagenette folder (README of experiments/vision)")
  p.add_argument("--deit_steps", type=int, default=60)
  p.add_argument("--block_listops", type=int, default=8)
  p.add_argument("--block_deit", type=int, default=4)
  p.add_argument("--output", default=str(RESULTS / "sparsifiner_block_training"))
  args = p.parse_args()
  rows = []
  for name, config in run_configs(args).items():
    run_dir = pathlib.Path(args.workdir) / name
    if not (run_dir / "results.json").is_file():
      train.train_and_evaluate(config, run_dir)
    result = json.loads((run_dir / "results.json").read_text())
    length = (config.dataset.max_length + 1 if config.dataset.name == "listops"
              else (config.dataset.image_size // config.model.patch_size) ** 2 + 1)
    rows.append({"run": name, "path": name.split("_")[-1], "tokens": length,
                 "keys_per_query": keys_attended(config, length),
                 "test_accuracy": round(result["test"]["accuracy"], 4),
                 "steps": config.num_train_steps,
                 "train_steps_per_s": round(result["train_steps_per_s"], 2),
                 "attention_kwargs": dict(config.model.attention_kwargs)})
  output = pathlib.Path(args.output)
  bench.write_csv(rows, output.with_suffix(".csv"))
  load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
  lines = [
      "# Sparsifiner: block path against token-level top-k in training", "",
      "Command: `python experiments/benchmarks/sparsifiner_block_training.py "
      f"--deit_steps={args.deit_steps} --block_listops={args.block_listops} "
      f"--block_deit={args.block_deit}`", "",
      f"{jax.device_count()} {jax.default_backend()} device(s), {platform.machine()}, "
      f"{os.cpu_count()} CPUs; load average at the end ({load}). Within a pair only the path "
      "(and its block size) differs: same config, seed, data order and initialisation. "
      "Steps/s are informational only: short sequences, and taken under the load shown (the "
      "runs may share the machine); the block path's speed claims are the layer benchmark's, "
      "taken with nothing else running.", "",
      "| run | path | tokens | keys per query | test acc | steps | train steps/s | attention |",
      "|---|---|---|---|---|---|---|---|"]
  lines += [f"| {r['run']} | {r['path']} | {r['tokens']} | {r['keys_per_query']} | "
            f"{r['test_accuracy']:.4f} | {r['steps']} | {r['train_steps_per_s']:.2f} | "
            f"`{r['attention_kwargs']}` |" for r in rows]
  output.with_suffix(".md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
