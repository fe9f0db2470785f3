"""Metric writers: stdout (absl logging), ``metrics.jsonl`` and TensorBoard event files.

Only process 0 writes files; every process may call ``write`` (others are no-ops), so the train
loop needs no ``if process_index == 0`` of its own. TensorBoard files are written with tensorboardX
(clu's writers import TensorFlow).
"""

from __future__ import annotations

import json
import pathlib
from typing import Mapping

import jax
import numpy as np
from absl import logging
from tensorboardX import SummaryWriter


class MetricWriter:
  """Writes scalar metrics of a step to stdout, ``<workdir>/metrics.jsonl`` and TensorBoard.

  Each jsonl line is ``{"step": int, "split": str, <name>: float, ...}``; TensorBoard tags are
  ``<split>/<name>``. Use as a context manager or call ``close()``.
  """

  def __init__(self, workdir: str | pathlib.Path, *, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._jsonl = None
    self._tb = None
    if self.enabled:
      workdir = pathlib.Path(workdir)
      workdir.mkdir(parents=True, exist_ok=True)
      self._jsonl = open(workdir / "metrics.jsonl", "a", encoding="utf-8")
      self._tb = SummaryWriter(str(workdir / "tensorboard"))

  def write(self, step: int, split: str, metrics: Mapping[str, float]) -> None:
    """Records ``metrics`` (name -> scalar) for ``split`` ('train', 'val', 'test') at ``step``."""
    if not self.enabled:
      return
    values = {k: float(np.asarray(v)) for k, v in metrics.items()}
    logging.info("[%d] %s: %s", step, split,
                 ", ".join(f"{k}={v:.6g}" for k, v in sorted(values.items())))
    self._jsonl.write(json.dumps({"step": int(step), "split": split, **values}) + "\n")
    self._jsonl.flush()
    for k, v in values.items():
      self._tb.add_scalar(f"{split}/{k}", v, int(step))
    self._tb.flush()

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
      self._tb.close()
      self._jsonl = self._tb = None

  def __enter__(self) -> "MetricWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
