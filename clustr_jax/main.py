"""Command-line entry point: ``python -m clustr_jax.main --config=... --workdir=...``.

Only parses flags (absl, ml_collections ``config_flags``), starts multi-host JAX when asked
(``distributed.maybe_initialize``) and hands over to ``train.train_and_evaluate``. With no flags
it runs the CPU-sized LRA ListOps config (``configs/lra/listops.py:cpu``) into
``./workdir/listops_cpu``; running the same command again resumes from the latest checkpoint
there. A run stopped by SIGTERM (preemption) saves a checkpoint and exits with status 0.

``--config.<key>=value`` overrides any key of the config file and any train-loop default of
``clustr_jax/defaults.py`` (e.g. ``--config.grad_accum_steps=4``) even where the file does not
set it; any other unknown key is an error naming the key.

  python -m clustr_jax.main
  python -m clustr_jax.main --config=configs/lra/listops.py:cpu,attention=cast \\
      --workdir=/tmp/listops_cast --config.num_train_steps=500
"""

from __future__ import annotations

import pathlib

import jax
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from clustr_jax import config_utils
from clustr_jax import defaults
from clustr_jax import distributed

_REPO = pathlib.Path(__file__).resolve().parent.parent
_DEFAULT_CONFIG = str(_REPO / "configs" / "lra" / "listops.py") + ":cpu"

_CONFIG = config_flags.DEFINE_config_file(
    "config", _DEFAULT_CONFIG, "Config file, optionally with an argument: path.py:arg.",
    lock_config=False, accept_new_attributes=True)
_WORKDIR = flags.DEFINE_string("workdir", "workdir/listops_cpu",
                               "Directory for checkpoints, metrics and results.json.")


def check_overrides(file_config, overrides, config_file: str) -> None:
  """Raises app.UsageError for a ``--config.<key>`` that is neither in the file nor a default."""
  known = defaults.flat_keys()
  for path in overrides:
    if not _has_path(file_config, path) and path not in known:
      raise app.UsageError(f"--config.{path}: unknown config key (not in {config_file} and not a "
                           f"train-loop default of clustr_jax/defaults.py)")


def _has_path(config, path: str) -> bool:
  """Whether the dotted ``path`` names a key of the nested ``config``."""
  node = config
  for part in path.split("."):
    if not hasattr(node, "keys") or part not in node:
      return False
    node = node[part]
  return True


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config_file = config_flags.get_config_filename(flags.FLAGS["config"])
  check_overrides(config_utils.load(config_file),
                  config_flags.get_override_values(flags.FLAGS["config"]), config_file)
  config = defaults.with_defaults(_CONFIG.value)
  distributed.maybe_initialize(config)
  logging.info("Config:\n%s", config)
  from clustr_jax import train  # pylint: disable=g-import-not-at-top
  results = train.train_and_evaluate(config, _WORKDIR.value)
  if jax.process_index() == 0:
    if results.get("preempted"):
      print(f"Preempted (SIGTERM) at step {results['step']}: checkpoint saved; run the same "
            f"command again to resume.")
    else:
      print(f"Final test accuracy: {results['test']['accuracy']:.4f} "
            f"(loss {results['test']['loss']:.4f}, {results['step']} steps, "
            f"{results['wall_time_s']:.0f} s); results in "
            f"{pathlib.Path(_WORKDIR.value) / 'results.json'}")


if __name__ == "__main__":
  app.run(main)
