"""glibc malloc settings that keep freed memory in the process, for the CPU benchmarks here.

XLA:CPU allocates its buffers afresh on every call. With glibc's defaults, buffers above the mmap
threshold (and every large buffer of a worker thread's arena) are mapped on allocation and
returned to the kernel on free, so each call page-faults all of its memory in again; in this
project's 2-core VMs that cost 30 % of a CAST forward+backward call at N = 8192 (75,000 minor
faults and 150 ms of system time per call) and more of dense attention's (8 GiB per call). With
one arena and high mmap/trim thresholds, freed memory is reused and the faults disappear (819
per call). Every mechanism runs under the same setting; the output files name it.

The variables are read when the C library starts, so ``reexec_keeping_memory`` re-executes the
script with them set.
"""

from __future__ import annotations

import os
import sys

SETTINGS = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_THRESHOLD_": str(4 << 30),
            "MALLOC_TRIM_THRESHOLD_": str(16 << 30), "MALLOC_TOP_PAD_": str(1 << 30)}


def describe() -> str:
  """The glibc malloc setting of this process, in words (for the outputs)."""
  if all(os.environ.get(k) == v for k, v in SETTINGS.items()):
    return ("glibc malloc keeps freed memory (" +
            ", ".join(f"{k}={v}" for k, v in SETTINGS.items()) + ")")
  return "glibc malloc defaults (freed large buffers go back to the kernel)"


def reexec_keeping_memory() -> None:
  """Re-executes this Python script with ``SETTINGS`` in the environment (once)."""
  if all(os.environ.get(k) == v for k, v in SETTINGS.items()):
    return
  os.execve(sys.executable, [sys.executable] + sys.argv, os.environ | SETTINGS)
