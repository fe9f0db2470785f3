"""Data that a run generates itself: process 0 generates, the other processes wait for it.

``generate_once(out_dir, generate)`` is the one place where a multi-process run
(``jax.distributed``) makes generated data (ListOps trees, Pathfinder images) exactly once, into a
directory every process reads afterwards (so ``out_dir`` must be on a file system all processes
share):

  1. process 0 removes the marker ``out_dir/.generate_once.json`` left by an earlier run, then
     every process meets at a barrier (``jax.experimental.multihost_utils.sync_global_devices``),
     so no process can see that old marker;
  2. process 0 calls ``generate()`` and writes the marker (atomically): ``{"ok": true}``, or
     ``{"ok": false, "error": "..."}`` if ``generate`` raised, which it then re-raises;
  3. the other processes poll for the marker every ``poll_s`` seconds and return once it says
     ``ok``; they raise if it reports process 0's error or does not appear within ``timeout_s``.

With one process, ``generate()`` is called directly: no barrier, no marker.
"""

from __future__ import annotations

import json
import os
import pathlib
import time
import uuid
from collections.abc import Callable

from absl import logging

MARKER = ".generate_once.json"
# How long the other processes wait for process 0 by default: long enough for the slowest set a
# config asks for, Path-X's 200,000 images rendered by a single process (about 0.6 s each,
# some 33 hours).
DEFAULT_TIMEOUT_S = 72 * 3600.0
_BARRIER_NAME = "clustr_jax.data.generate_once"


def _jax_barrier() -> None:
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  multihost_utils.sync_global_devices(_BARRIER_NAME)


def _write_marker(path: pathlib.Path, content: dict) -> None:
  tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
  try:
    tmp.write_text(json.dumps(content) + "\n", encoding="utf-8")
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)


def generate_once(out_dir: str | os.PathLike, generate: Callable[[], object], *,
                  timeout_s: float = DEFAULT_TIMEOUT_S, poll_s: float = 5.0,
                  process_index: int | None = None, process_count: int | None = None,
                  barrier: Callable[[], None] | None = None) -> None:
  """Runs ``generate()`` on process 0 only; every other process returns once it has finished.

  Args:
    out_dir: the directory ``generate`` writes (created by process 0 if missing); it holds the
      completion marker (module docstring) and must be shared by all processes.
    generate: writes the data into ``out_dir``; its return value is ignored.
    timeout_s: how long the other processes wait for process 0's marker.
    poll_s: the interval at which they look for it.
    process_index, process_count: this process and the number of processes (None: JAX's
      ``jax.process_index()`` and ``jax.process_count()``).
    barrier: called once by every process when more than one runs, before process 0 generates
      (None: ``sync_global_devices``). Tests pass e.g. ``threading.Barrier(2).wait``.

  Raises:
    TimeoutError (other processes): no marker after ``timeout_s`` seconds (the message names
      ``out_dir`` and the marker).
    RuntimeError (other processes): process 0's ``generate`` raised (the message names
      ``out_dir`` and gives process 0's error).
    Whatever ``generate`` raises (process 0).
  """
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top  (generators and readers need no JAX)
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if process_count == 1:
    generate()
    return
  out_dir = pathlib.Path(out_dir)
  marker = out_dir / MARKER
  if process_index == 0:
    out_dir.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)
  (barrier or _jax_barrier)()
  if process_index == 0:
    try:
      generate()
    except Exception as e:
      _write_marker(marker, {"ok": False, "error": f"{type(e).__name__}: {e}"})
      raise
    _write_marker(marker, {"ok": True})
    return
  logging.info("Process %d: waiting for process 0 to generate the data in %s", process_index,
               out_dir)
  deadline = time.monotonic() + timeout_s
  while not marker.is_file():
    if time.monotonic() >= deadline:
      raise TimeoutError(f"process {process_index} waited {timeout_s:g} s for process 0 to "
                         f"generate the data in {out_dir} (no {marker}); is {out_dir} on a file "
                         f"system all processes share, and is process 0 still running?")
    time.sleep(poll_s)
  status = json.loads(marker.read_text(encoding="utf-8"))
  if not status.get("ok"):
    raise RuntimeError(f"process 0 failed to generate the data in {out_dir}: "
                       f"{status.get('error')}")
