r"""Cost of checkpointing: seconds per save, synchronous versus asynchronous (the overlap).

For the train state (parameters, Adam state, step) of the ListOps CPU model and of the official
LRA ListOps model (``configs/lra/listops.py`` and ``:cpu``), saves ``--saves`` checkpoints with
``clustr_jax.checkpointing.Checkpointer`` into a fresh directory, once with synchronous and once
with asynchronous writes, and records per save: the time the train loop is blocked (``save``
returning) and the time until the checkpoint is on disk (``save`` plus ``wait``). The async
overlap is the share of the write the loop does not wait for: 1 - blocked / on-disk. Writes a
Markdown and a JSON table to ``experiments/scale/results/``.

  python experiments/scale/checkpoint_cost.py --directory=/tmp/ckpt_cost
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import shutil
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from clustr_jax import checkpointing, models, optim, train
from clustr_jax import data as data_lib
from configs import common as config_common

REPO = pathlib.Path(__file__).resolve().parents[2]
RESULTS = REPO / "experiments" / "scale" / "results"


def make_state(spec: str):
  """(train state, parameter count, a Grain iterator) for the model of config ``spec``."""
  config = config_common.load(f"{REPO}/configs/lra/listops.py{spec}")
  length = config.dataset.max_length
  model = models.from_config(config.model,
                             {"vocab_size": 18, "num_classes": 10, "max_length": length})
  tx, _ = optim.create_optimizer(config)
  state = jax.jit(lambda r, x: nn.unbox(train.create_train_state(model, tx, r, x)))(
      jax.random.key(0), jnp.zeros((1, length), jnp.int32))
  arrays = {"inputs": np.zeros((8, length), np.int32), "targets": np.zeros((8,), np.int32)}
  iterator = data_lib.ArrayDataset({"train": arrays}).train_iterator(batch_size=4, seed=0)
  next(iterator)
  num_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.params))
  return state, num_params, iterator


def measure(state, iterator, directory: pathlib.Path, *, async_save: bool, saves: int):
  """Per-save (blocked seconds, on-disk seconds), after one unmeasured warm-up save."""
  shutil.rmtree(directory, ignore_errors=True)
  ckpt = checkpointing.Checkpointer(directory, save_every_steps=1, max_to_keep=2,
                                    async_save=async_save)
  times = []
  for step in range(saves + 1):
    state = state.replace(step=state.step + 1)
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    ckpt.save(step + 1, state, iterator, force=True)
    blocked = time.perf_counter() - t0
    ckpt.wait()
    if step:
      times.append((blocked, time.perf_counter() - t0))
  ckpt.close()
  shutil.rmtree(directory, ignore_errors=True)
  return times


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--directory", default="/tmp/clustr_jax_checkpoint_cost")
  parser.add_argument("--saves", type=int, default=5)
  parser.add_argument("--output", default=str(RESULTS / "checkpoint_cost"),
                      help="path prefix of the .md and .json tables")
  args = parser.parse_args()
  rows = []
  for name, spec in (("ListOps CPU (:cpu)", ":cpu"), ("LRA ListOps (official)", "")):
    state, num_params, iterator = make_state(spec)
    nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
    for async_save in (False, True):
      times = measure(state, iterator, pathlib.Path(args.directory), async_save=async_save,
                      saves=args.saves)
      blocked = statistics.median(t[0] for t in times)
      on_disk = statistics.median(t[1] for t in times)
      rows.append({"model": name, "num_params": num_params, "state_mb": round(nbytes / 1e6, 1),
                   "mode": "async" if async_save else "sync",
                   "blocked_s": round(blocked, 4), "on_disk_s": round(on_disk, 4),
                   "overlap": round(1 - blocked / on_disk, 3) if async_save else 0.0})
  output = pathlib.Path(args.output)
  output.parent.mkdir(parents=True, exist_ok=True)
  machine = (f"{jax.device_count()} {jax.default_backend()} device(s), {os.cpu_count()} CPU "
             f"cores, {platform.processor() or platform.machine()}, local disk, "
             f"jax {jax.__version__}, 1-min load average {os.getloadavg()[0]:.1f} "
             f"(cores shared with other jobs)")
  output.with_suffix(".json").write_text(json.dumps({"machine": machine, "rows": rows},
                                                    indent=2) + "\n")
  lines = [
      "# Checkpoint cost: seconds per save, synchronous and asynchronous",
      "",
      f"Median of {args.saves} saves (after a warm-up save) of the train state (parameters, "
      f"Adam moments, step) plus the data iterator position; {machine}.",
      "",
      "| model | parameters | state MB | mode | loop blocked s | on disk s | async overlap |",
      "|---|---|---|---|---|---|---|",
      *(f"| {r['model']} | {r['num_params']:,} | {r['state_mb']} | {r['mode']} | "
        f"{r['blocked_s']} | {r['on_disk_s']} | {r['overlap']} |" for r in rows),
      "",
      "Command: `python experiments/scale/checkpoint_cost.py`",
  ]
  output.with_suffix(".md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
