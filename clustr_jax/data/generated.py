"""Data that a run generates itself: process 0 generates, the other processes wait for it.

``generate_once(out_dir, generate)`` is the one place where a multi-process run
(``jax.distributed``) makes generated data (ListOps trees, Pathfinder images) exactly once, into a
directory every process reads afterwards (so ``out_dir`` must be on a file system all processes
share):

  1. process 0 removes the marker ``out_dir/.generate_once.json`` left by an earlier run, then
     every process meets at a barrier (``jax.experimental.multihost_utils.sync_global_devices``),
     so no process can see that old marker;
  2. process 0 writes the marker ``{"state": "generating"}``, calls ``generate()``, then writes
     ``{"state": "done"}``, or ``{"state": "failed", "error": "..."}`` if ``generate`` raised
     (and re-raises); each write is atomic (a rename);
  3. the other processes poll the marker every ``poll_s`` seconds and return once it says
     ``done``. They raise if it says ``failed``, if it does not appear within ``start_timeout_s``
     (``out_dir`` is most likely not shared), or if it does not say ``done`` within ``timeout_s``.

The marker stays in ``out_dir`` afterwards. With one process, ``generate()`` is called directly:
no barrier, no marker.
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
# How long they wait for process 0's first marker, written right after the barrier (file systems
# such as NFS may take a minute to show a new file to other hosts).
DEFAULT_START_TIMEOUT_S = 600.0
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


def _read_marker(path: pathlib.Path) -> dict | None:
  try:
    return json.loads(path.read_text(encoding="utf-8"))
  except FileNotFoundError:
    return None


def generate_once(out_dir: str | os.PathLike, generate: Callable[[], object], *,
                  timeout_s: float = DEFAULT_TIMEOUT_S,
                  start_timeout_s: float = DEFAULT_START_TIMEOUT_S, poll_s: float = 5.0,
                  process_index: int | None = None, process_count: int | None = None,
                  barrier: Callable[[], None] | None = None) -> None:
  """Runs ``generate()`` on process 0 only; every other process returns once it has finished.

  Args:
    out_dir: the directory ``generate`` writes (created by process 0 if missing); it holds the
      marker (module docstring) and must be shared by all processes.
    generate: writes the data into ``out_dir``; its return value is ignored.
    timeout_s: how long the other processes wait, in all, for process 0 to finish.
    start_timeout_s: how long they wait for process 0's first marker after the barrier.
    poll_s: the interval at which they read the marker.
    process_index, process_count: this process and the number of processes (None: JAX's
      ``jax.process_index()`` and ``jax.process_count()``).
    barrier: called once by every process when more than one runs, before process 0 generates
      (None: ``sync_global_devices``). Tests pass e.g. ``threading.Barrier(2).wait``.

  Raises:
    TimeoutError (other processes): no marker within ``start_timeout_s``, or none saying
      ``done`` within ``timeout_s``; the message names ``out_dir``.
    RuntimeError (other processes): process 0's ``generate`` raised; the message names
      ``out_dir`` and gives process 0's error.
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
    _write_marker(marker, {"state": "generating"})
    try:
      generate()
    except Exception as e:
      _write_marker(marker, {"state": "failed", "error": f"{type(e).__name__}: {e}"})
      raise
    _write_marker(marker, {"state": "done"})
    return
  logging.info("Process %d: waiting for process 0 to generate the data in %s", process_index,
               out_dir)
  start = time.monotonic()
  while True:
    status = _read_marker(marker)
    state = status and status.get("state")
    if state == "done":
      return
    if state == "failed":
      raise RuntimeError(f"process 0 failed to generate the data in {out_dir}: "
                         f"{status.get('error')}")
    waited = time.monotonic() - start
    if status is None and waited >= start_timeout_s:
      raise TimeoutError(f"process {process_index} waited {waited:.0f} s for process 0 to start "
                         f"generating the data in {out_dir}, and {marker} did not appear: is "
                         f"{out_dir} on a file system all processes share?")
    if waited >= timeout_s:
      seen = f"{marker} still says {state!r}" if status else f"{marker} did not appear"
      raise TimeoutError(f"process {process_index} waited {waited:.0f} s (timeout_s="
                         f"{timeout_s:g}) for process 0 to generate the data in {out_dir}; "
                         f"{seen}: is process 0 still running?")
    time.sleep(poll_s)
