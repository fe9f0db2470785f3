"""Orbax checkpoints of the train state and the data iterator's position; preemption.

A checkpoint at step ``s`` lives in ``<workdir>/checkpoints/<s>/`` with two items:

  state  the ``TrainState`` pytree (step, params, opt_state, skipped-step count), saved
         asynchronously (``ocp.args.StandardSave``) and restored onto the shardings of an
         abstract tree, so a checkpoint saved on one mesh restores onto any other (8 devices ->
         4 -> 1) as long as the shapes agree;
  data   the Grain iterator state, one JSON file per process (``grain.checkpoint``); restore with
         the process count and ``data_workers`` that saved it.

``s`` is the number of optimizer updates applied, so a run restored from step ``s`` continues with
update ``s + 1`` on the batch that would have come next; the step's randomness is
``fold_in(key(seed), step)``, so nothing else needs saving for an exact resume.

Surviving failures:
  * Orbax writes each checkpoint into a temporary directory and renames it when complete, so a
    run killed while saving leaves no partial ``<s>/`` (the temporary one is removed at start).
  * A latest checkpoint that does not restore (corrupt or truncated files) is moved aside to
    ``<s>.corrupt`` (never deleted) with one warning, and the previous one is restored. Orbax
    abandons the other reads of that checkpoint still in flight; their late reports (TensorStore
    posting to Orbax's closed event loop, asyncio's "Task exception was never retrieved") would
    print tracebacks that read as a crash, so ``_quiet_abandoned_restores`` drops exactly those.
  * Old checkpoints are deleted only after a newer one is complete (Orbax's ``max_to_keep``), so
    the last good checkpoint always survives; the train loop never saves after a non-finite step.
  * Preemption: SIGTERM (single process) or the JAX preemption sync point (multi-host, set up by
    ``jax.distributed.initialize``) makes ``preempted(step)`` true; the loop then saves and exits.
"""

from __future__ import annotations

import logging as py_logging
import pathlib
import re
import signal
import sys
import threading
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

# asyncio's reports of futures and tasks that nobody awaits any more.
_ABANDONED = re.compile(r"^(Task exception was never retrieved|Future exception was never "
                        r"retrieved|Task was destroyed but it is pending!)")
_ORBAX_CODE = re.compile(r"orbax[/\\]checkpoint")  # A task's repr names its coroutine's file.
_restored_directories: set[str] = set()  # Checkpoint roots that restore() has read in this process.
_quiet_installed = False


def _is_closed_loop_callback(unraisable: Any) -> bool:
  """Whether an unraisable exception is a C extension (TensorStore) posting a finished read to a
  closed asyncio loop: ``RuntimeError('Event loop is closed')`` raised in ``call_soon_threadsafe``
  with no Python caller, i.e. the result of a future that its awaiting loop gave up on."""
  error = unraisable.exc_value
  tb = unraisable.exc_traceback
  return (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"
          and tb is not None and tb.tb_frame.f_code.co_name == "call_soon_threadsafe")


class _AbandonedTaskFilter(py_logging.Filter):
  """Drops asyncio's "Task/Future exception was never retrieved" and "Task was destroyed but it
  is pending!" records about Orbax's tasks or reads of a checkpoint that ``restore`` tried (the
  first error of a failed restore is raised by Orbax and reported in one warning)."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    message = record.getMessage()
    return not (_ABANDONED.match(message) and (
        _ORBAX_CODE.search(message) or any(d in message for d in _restored_directories)))


def _quiet_abandoned_restores() -> None:
  """Silences the late reports of reads that a failed Orbax restore leaves in flight (once per
  process, before the first restore, since they can arrive before the restore's exception).

  When one array of a checkpoint fails to read, Orbax's restore raises and closes its event loop
  while TensorStore still reads the other arrays. Each read that finishes later tries
  ``loop.call_soon_threadsafe`` on the closed loop and TensorStore prints the ``RuntimeError:
  Event loop is closed`` as an unraisable exception (a traceback, from its threads, at any time);
  the tasks and futures that failed too are logged by asyncio with their tracebacks when garbage
  collected.
  Both concern the checkpoint already reported (one warning) and moved aside. Anything else goes
  to the previous ``sys.unraisablehook`` and through the ``asyncio`` logger as before.
  """
  global _quiet_installed
  if _quiet_installed:
    return
  _quiet_installed = True
  previous_hook = sys.unraisablehook

  def hook(unraisable):
    if not _is_closed_loop_callback(unraisable):
      previous_hook(unraisable)

  sys.unraisablehook = hook
  py_logging.getLogger("asyncio").addFilter(_AbandonedTaskFilter())


def _describe(error: Exception) -> str:
  """``Type: message`` of a restore error, without TensorStore's JSON specs (which name the same
  file again), on one line, at most 600 characters."""
  text = re.split(r"\s*\[tensorstore_spec", str(error), maxsplit=1)[0]
  text = " ".join(text.split())
  if len(text) > 600:
    text = text[:600] + "..."
  return f"{type(error).__name__}: {text}"


class Checkpointer:
  """Saves every ``save_every_steps`` steps, keeps the last ``max_to_keep``, resumes the latest.

  Args:
    directory: checkpoint root (created if missing).
    save_every_steps: save interval in steps (``save`` is a no-op in between unless forced).
    max_to_keep: number of most recent checkpoints kept.
    async_save: write the state in a background thread (``wait`` blocks until done).
    handle_sigterm: in a single-process run started from the main thread, turn SIGTERM into a
      preemption request (``preempted``) instead of death; ``close`` restores the old handler.

  Raises:
    ValueError: ``save_every_steps`` or ``max_to_keep`` < 1 (config.checkpoint_every_steps /
      config.max_checkpoints_to_keep).
  """

  def __init__(self, directory: str | pathlib.Path, *, save_every_steps: int,
               max_to_keep: int = 3, async_save: bool = True, handle_sigterm: bool = False):
    if save_every_steps < 1:
      raise ValueError(f"config.checkpoint_every_steps must be >= 1; got {save_every_steps}")
    if max_to_keep < 1:
      raise ValueError(f"config.max_checkpoints_to_keep must be >= 1; got {max_to_keep}")
    self.directory = pathlib.Path(directory).absolute()
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            save_interval_steps=save_every_steps, max_to_keep=max_to_keep,
            enable_async_checkpointing=async_save, create=True, cleanup_tmp_directories=True),
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": grain.checkpoint.CheckpointHandler()})
    self._sigterm = False
    self._previous_handler = None
    if (handle_sigterm and jax.process_count() == 1
        and threading.current_thread() is threading.main_thread()):
      self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame) -> None:
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint after this step, then exiting")
    self._sigterm = True

  def preempted(self, step: int) -> bool:
    """Whether the job is being preempted: SIGTERM seen, or (multi-host) the JAX preemption sync
    point is reached at ``step`` (the same answer on every process)."""
    if jax.process_count() > 1:
      return self._manager.reached_preemption(step)
    return self._sigterm

  def latest_step(self) -> int | None:
    """The newest saved step, or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """Every saved step, oldest first."""
    return sorted(self._manager.all_steps())

  def restore(self, abstract_state: Any, data_iterator: Any) -> tuple[Any, int] | None:
    """Restores the newest readable checkpoint, or returns None when there is none.

    A checkpoint that fails to restore is moved to ``<step>.corrupt`` with a warning and the next
    older one is tried.

    Args:
      abstract_state: the state as a tree of ``jax.ShapeDtypeStruct`` with shardings: the
        restored arrays take those shapes, dtypes and shardings (any mesh).
      data_iterator: the Grain iterator; its position is set in place.

    Returns:
      (state, step) or None.

    Raises:
      RuntimeError: checkpoints exist but none restores (they are all moved aside, not deleted).
    """
    steps = self.all_steps()
    if steps:
      _restored_directories.add(str(self.directory))
      _quiet_abandoned_restores()
    for step in reversed(steps):
      logging.info("Restoring checkpoint of step %d from %s", step, self.directory)
      try:
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=grain.checkpoint.CheckpointRestore(data_iterator)))
      except Exception as error:  # pylint: disable=broad-except
        # Orbax, TensorStore and JSON raise many types for damaged files; all mean "unreadable".
        logging.warning("Checkpoint of step %d in %s does not restore (%s); moving it to "
                        "%d.corrupt and falling back to the previous checkpoint", step,
                        self.directory, _describe(error), step)
        self._move_aside(step)
        continue
      return restored["state"], step
    if steps:
      raise RuntimeError(f"none of the checkpoints {steps} in {self.directory} restores; they "
                         f"were moved to <step>.corrupt (see the warnings above)")
    return None

  def _move_aside(self, step: int) -> None:
    """Renames ``<step>/`` to ``<step>.corrupt`` (process 0) so Orbax no longer lists it."""
    if jax.process_index() == 0:
      path = self.directory / str(step)
      target = self.directory / f"{step}.corrupt"
      suffix = 1
      while target.exists():
        target = self.directory / f"{step}.corrupt{suffix}"
        suffix += 1
      path.rename(target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"clustr_jax_move_aside_{step}")
    self._manager.reload()

  def save(self, step: int, state: Any, data_iterator: Any, *, force: bool = False) -> bool:
    """Saves ``state`` and the iterator position at ``step`` if due (or ``force``).

    Returns whether a save was started.
    """
    saved = self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(data_iterator)), force=force)
    if saved:
      logging.info("Saving checkpoint of step %d to %s", step, self.directory)
    return saved

  def should_save(self, step: int) -> bool:
    """Whether ``save(step, ...)`` without ``force`` would save (interval or preemption)."""
    return self._manager.should_save(step)

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are written."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves, releases the manager and restores the SIGTERM handler."""
    self._manager.wait_until_finished()
    self._manager.close()
    if self._previous_handler is not None:
      signal.signal(signal.SIGTERM, self._previous_handler)
      self._previous_handler = None


def abstract_like(tree: Any) -> Any:
  """``jax.ShapeDtypeStruct`` tree (with shardings) matching a tree of arrays."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
