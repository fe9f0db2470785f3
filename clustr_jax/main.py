"""Command-line entry point: ``python -m clustr_jax.main --config=... --workdir=...``.

Only parses flags (absl, ml_collections ``config_flags``) and hands over to
``train.train_and_evaluate``. With no flags it runs the CPU-sized LRA ListOps config
(``configs/lra/listops.py:cpu``) into ``./workdir/listops_cpu``; running the same command again
resumes from the latest checkpoint there.

  python -m clustr_jax.main
  python -m clustr_jax.main --config=configs/lra/listops.py:cpu,attention=cast \\
      --workdir=/tmp/listops_cast --config.num_train_steps=500
"""

from __future__ import annotations

import os
import pathlib

import jax
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_REPO = pathlib.Path(__file__).resolve().parent.parent
_DEFAULT_CONFIG = str(_REPO / "configs" / "lra" / "listops.py") + ":cpu"

config_flags.DEFINE_config_file(
    "config", _DEFAULT_CONFIG, "Config file, optionally with an argument: path.py:arg.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "workdir/listops_cpu",
                               "Directory for checkpoints, metrics and results.json.")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = flags.FLAGS.config
  if config.get("distributed_init") or os.environ.get("JAX_COORDINATOR_ADDRESS"):
    jax.distributed.initialize()
  logging.info("Config:\n%s", config)
  from clustr_jax import train  # pylint: disable=g-import-not-at-top
  results = train.train_and_evaluate(config, _WORKDIR.value)
  if jax.process_index() == 0:
    print(f"Final test accuracy: {results['test']['accuracy']:.4f} "
          f"(loss {results['test']['loss']:.4f}, {results['step']} steps, "
          f"{results['wall_time_s']:.0f} s); results in "
          f"{pathlib.Path(_WORKDIR.value) / 'results.json'}")


if __name__ == "__main__":
  app.run(main)
