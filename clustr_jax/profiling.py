"""Profiling: ``jax.profiler`` traces of a range of steps, and the MFU estimate of each log line.

MFU (model FLOPs utilisation) = FLOPs of one step / step time / the device's peak FLOP/s, all per
device: the FLOPs come from XLA's cost analysis of the compiled, SPMD-partitioned train step
(``Compiled.cost_analysis()['flops']``, which counts one device's share of the program), the
step time is wall time between log lines, and the peak is ``config.peak_flops_per_device`` or,
when unset, the bfloat16 dense peak of the device kind from ``PEAK_FLOPS`` (vendor datasheets:
Cloud TPU system architecture pages; NVIDIA A100/H100/H200 datasheets, without sparsity). Where
the peak is unknown (CPU) no MFU is reported. XLA counts the FLOPs it executes, rematerialisation
included, so this is closer to hardware FLOPs utilisation than to the 6*N*D model-FLOPs rule.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
from absl import logging

# Substring of jax.Device.device_kind -> bfloat16 dense peak FLOP/s of one JAX device. Checked in
# order, so the more specific names come first.
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("TPU v6 lite", 918e12),  # Trillium (v6e), one chip per device.
    ("TPU v5 lite", 197e12),  # v5e.
    ("TPU v5", 459e12),       # v5p.
    ("TPU v4", 275e12),       # v4 (megacore: one chip per device).
    ("H200", 989e12),
    ("H100", 989e12),
    ("A100", 312e12),
)


def peak_flops_per_device(device: jax.Device, override: float | None = None) -> float | None:
  """``override`` if given, else the peak of ``device.device_kind`` from ``PEAK_FLOPS``, or None.

  Raises:
    ValueError: a non-positive ``override`` (config.peak_flops_per_device).
  """
  if override is not None:
    if override <= 0:
      raise ValueError(f"config.peak_flops_per_device must be > 0; got {override}")
    return float(override)
  for kind, flops in PEAK_FLOPS:
    if kind in device.device_kind:
      return flops
  return None


def compiled_flops(compiled: Any) -> float | None:
  """FLOPs per device of one call of a ``jax.stages.Compiled``, or None if XLA gives none."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # Older JAX: one dict per program.
    analysis = analysis[0] if analysis else None
  flops = (analysis or {}).get("flops")
  return float(flops) if flops is not None and flops > 0 else None


def mfu(flops_per_step: float | None, step_time_s: float, peak: float | None) -> float | None:
  """Model FLOPs utilisation in [0, 1] (see module docstring), or None when a term is unknown."""
  if flops_per_step is None or peak is None or step_time_s <= 0:
    return None
  return flops_per_step / step_time_s / peak


class StepTracer:
  """Traces steps ``[start_step, start_step + num_steps)`` with ``jax.profiler`` into ``logdir``.

  Call ``before_step(step, state)`` before running ``step`` and ``after_step(step, state)`` after
  it; ``close()`` stops an open trace (e.g. when the run ends inside the range). View the trace
  with TensorBoard's profile plugin or Perfetto (``logdir/plugins/profile/<run>/*.xplane.pb``).

  Raises:
    ValueError: negative ``num_steps`` or ``start_step`` < 1 (config.profile_num_steps /
      config.profile_start_step).
  """

  def __init__(self, logdir: str | pathlib.Path, start_step: int, num_steps: int):
    if num_steps < 0:
      raise ValueError(f"config.profile_num_steps must be >= 0; got {num_steps}")
    if start_step < 1:
      raise ValueError(f"config.profile_start_step must be >= 1; got {start_step}")
    self.logdir = pathlib.Path(logdir)
    self.start_step, self.stop_step = start_step, start_step + num_steps - 1
    self.enabled = num_steps > 0
    self._active = False

  def before_step(self, step: int, state: Any) -> None:
    if self.enabled and not self._active and self.start_step <= step <= self.stop_step:
      jax.block_until_ready(state)
      logging.info("Profiling steps %d..%d into %s", step, self.stop_step, self.logdir)
      jax.profiler.start_trace(str(self.logdir))
      self._active = True

  def after_step(self, step: int, state: Any) -> None:
    if self._active and step >= self.stop_step:
      jax.block_until_ready(state)
      self.close()

  def close(self) -> None:
    if self._active:
      jax.profiler.stop_trace()
      self._active = False
