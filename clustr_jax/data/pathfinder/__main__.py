"""Command line: ``python -m clustr_jax.data.pathfinder --output_dir=...``.

Renders a set with LRA's parameters for a resolution and difficulty, each overridable
(``generator.ensure_generated``)::

  python -m clustr_jax.data.pathfinder --output_dir=/tmp/pf32_hard               # 200,000 images
  python -m clustr_jax.data.pathfinder --output_dir=/tmp/px --resolution=128 --num_images=1000
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence

from clustr_jax.data.pathfinder import generator


def main(argv: Sequence[str] | None = None) -> None:
  """Command line: LRA's parameters for a resolution and difficulty, each overridable."""
  parser = argparse.ArgumentParser(
      prog="python -m clustr_jax.data.pathfinder",
      description="Render a Pathfinder set in the LRA release layout (seeded).")
  parser.add_argument("--output_dir", required=True, help="the set's root directory")
  parser.add_argument("--resolution", type=int, default=32, help="32, 64, 128 (Path-X) or 256")
  parser.add_argument("--difficulty", default="hard", choices=tuple(generator.DIFFICULTIES))
  parser.add_argument("--num_images", type=int, default=200_000)
  parser.add_argument("--images_per_batch", type=int, default=1000)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--workers", type=int, default=0, help="rendering processes")
  parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                      help="override a parameter, e.g. --set num_distractor_snakes=0 "
                           "(lists comma-separated); repeatable")
  parser.add_argument("--no_progress", action="store_true", help="hide the progress bar")
  args = parser.parse_args(argv)
  try:
    params = generator.lra_parameters(args.resolution, args.difficulty)
    overrides = {}
    for item in args.set:
      name, _, value = item.partition("=")
      if name not in {f.name for f in dataclasses.fields(generator.PathfinderParams)}:
        raise ValueError(f"--set {item!r}: {name!r} is not a parameter")
      default = getattr(params, name)
      if isinstance(default, tuple):
        overrides[name] = tuple(type(default[0])(v) for v in value.split(","))
      else:
        overrides[name] = type(default)(value)
    params = dataclasses.replace(params, **overrides)
    root = generator.ensure_generated(
        args.output_dir, params, num_images=args.num_images,
        images_per_batch=args.images_per_batch, seed=args.seed, workers=args.workers,
        progress=not args.no_progress)
  except ValueError as e:
    parser.error(str(e))
  print(root)


if __name__ == "__main__":
  main()
