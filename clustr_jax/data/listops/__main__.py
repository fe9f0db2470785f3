r"""Command line: ``python -m clustr_jax.data.listops --output_dir=...`` (LRA's flag names).

Writes ``{task}_{train,val,test}.tsv`` unless present (``generator.ensure_generated``)::

  python -m clustr_jax.data.listops --output_dir=/tmp/listops            # LRA's 96k/2k/2k
  python -m clustr_jax.data.listops --output_dir=/tmp/listops_small --num_train_samples=20000 \
      --num_valid_samples=1000 --num_test_samples=1000 --min_length=10 --max_length=200
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from clustr_jax.data.listops import generator


def main(argv: Sequence[str] | None = None) -> None:
  """Command line with LRA's flag names; writes the files unless present
  (``generator.ensure_generated``)."""
  parser = argparse.ArgumentParser(
      prog="python -m clustr_jax.data.listops",
      description="Generate LRA ListOps {task}_{train,val,test}.tsv files (seeded).")
  parser.add_argument("--task", default="basic", help="file name prefix (default: %(default)s)")
  parser.add_argument("--num_train_samples", type=int, default=96_000)
  parser.add_argument("--num_valid_samples", type=int, default=2_000)
  parser.add_argument("--num_test_samples", type=int, default=2_000)
  parser.add_argument("--max_depth", type=int, default=10)
  parser.add_argument("--max_args", type=int, default=10)
  parser.add_argument("--min_length", type=int, default=500, help="exclusive lower bound")
  parser.add_argument("--max_length", type=int, default=2000, help="exclusive upper bound")
  parser.add_argument("--value_p", type=float, default=0.25,
                      help="probability of an operator node below max_depth")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--output_dir", default="output_dir")
  parser.add_argument("--no_progress", action="store_true", help="hide the progress bar")
  args = parser.parse_args(argv)
  try:
    paths = generator.ensure_generated(
        args.output_dir, task=args.task, num_train=args.num_train_samples,
        num_val=args.num_valid_samples, num_test=args.num_test_samples,
        min_length=args.min_length, max_length=args.max_length, max_depth=args.max_depth,
        max_args=args.max_args, value_p=args.value_p, seed=args.seed,
        progress=not args.no_progress)
  except ValueError as e:
    parser.error(str(e))
  for path in paths.values():
    print(path)


if __name__ == "__main__":
  main()
