"""Command-line entry point: ``python -m clustr_jax.main --config=... --workdir=...``.

Only parses flags (absl, ml_collections ``config_flags``), starts multi-host JAX when asked
(``distributed.maybe_initialize``) and hands over to ``train.train_and_evaluate``. With no flags
it runs the CPU-sized LRA ListOps config (``configs/lra/listops.py:cpu``, shipped inside the
installed package, so this works from any directory) into ``./workdir/listops_cpu``; running the
same command again resumes from the latest checkpoint there. A run stopped by SIGTERM
(preemption) saves a checkpoint and exits with status 0.

``--config`` takes a file path (``configs/lra/listops.py:cpu,attention=cast``); a path that does
not exist is looked up inside the installed ``configs`` package. Configs load locked:
``--config.<key>=value`` overrides any key of the config, the train-loop keys of
``configs/default.py`` included (e.g. ``--config.grad_accum_steps=4``), and a mistyped key is an
error naming the nearest valid keys.

  python -m clustr_jax.main
  python -m clustr_jax.main --config=configs/lra/listops.py:cpu,attention=cast \\
      --workdir=/tmp/listops_cast --config.num_train_steps=500
"""

from __future__ import annotations

import pathlib
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from clustr_jax import distributed, train
from configs import common

_DEFAULT_CONFIG = str(common.CONFIGS_DIR / "lra" / "listops.py") + ":cpu"

_CONFIG = config_flags.DEFINE_config_file(
    "config", _DEFAULT_CONFIG, "Config file, optionally with an argument: path.py:arg "
    "(a path not found is looked up inside the installed configs package).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "workdir/listops_cpu",
                               "Directory for checkpoints, metrics and results.json.")


def resolve_config_flag(argv: list[str]) -> list[str]:
  """``argv`` with a ``--config=path`` that does not exist replaced by the same path inside the
  installed ``configs`` package (``common.resolve``), so a clone's launch lines work from any
  directory; other arguments unchanged."""
  resolved = []
  for arg in argv:
    if arg.startswith("--config="):
      path, sep, rest = arg[len("--config="):].partition(":")
      try:
        arg = f"--config={common.resolve(path)}{sep}{rest}"
      except FileNotFoundError:
        pass  # config_flags reports the missing file.
    resolved.append(arg)
  return resolved


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing (``app.parse_flags_with_usage``) of ``resolve_config_flag(argv)``; an
  unknown ``--config.<key>`` of the locked config exits with one line naming the key and the
  nearest valid keys instead of a traceback."""
  try:
    return app.parse_flags_with_usage(resolve_config_flag(argv))
  except (AttributeError, KeyError) as error:  # ml_collections: a key the config does not have.
    message = error.args[0] if error.args else error
    while isinstance(message, BaseException) and message.args:
      message = message.args[0]
    sys.stderr.write(f"FATAL Flags parsing error: --config override: {message}\n")
    sys.exit(1)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  distributed.maybe_initialize(config)
  logging.info("Config:\n%s", config)
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
  app.run(main, flags_parser=parse_flags)
