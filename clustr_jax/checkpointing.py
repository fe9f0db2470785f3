"""Orbax checkpoints of the train state and the data iterator's position.

A checkpoint at step ``s`` lives in ``<workdir>/checkpoints/<s>/`` with two items:

  state  the ``TrainState`` pytree (step, params, opt_state), saved asynchronously
         (``ocp.args.StandardSave``) and restored onto the shardings of an abstract tree;
  data   the Grain iterator state, one JSON file per process (``grain.checkpoint``).

``s`` is the number of optimizer updates applied, so a run restored from step ``s`` continues with
update ``s + 1`` on the batch that would have come next.
"""

from __future__ import annotations

import pathlib
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging


class Checkpointer:
  """Saves every ``save_every_steps`` steps, keeps the last ``max_to_keep``, resumes the latest.

  Args:
    directory: checkpoint root (created if missing).
    save_every_steps: save interval in steps (``save`` is a no-op in between unless forced).
    max_to_keep: number of most recent checkpoints kept.
    async_save: write the state in a background thread (``wait`` blocks until done).
  """

  def __init__(self, directory: str | pathlib.Path, *, save_every_steps: int,
               max_to_keep: int = 3, async_save: bool = True):
    if save_every_steps < 1:
      raise ValueError(f"checkpoint_every_steps must be >= 1; got {save_every_steps}")
    if max_to_keep < 1:
      raise ValueError(f"max_checkpoints_to_keep must be >= 1; got {max_to_keep}")
    self.directory = pathlib.Path(directory).absolute()
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            save_interval_steps=save_every_steps, max_to_keep=max_to_keep,
            enable_async_checkpointing=async_save, create=True),
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": grain.checkpoint.CheckpointHandler()})

  def latest_step(self) -> int | None:
    """The newest saved step, or None."""
    return self._manager.latest_step()

  def restore(self, abstract_state: Any, data_iterator: Any) -> tuple[Any, int] | None:
    """Restores the newest checkpoint, or returns None when there is none.

    Args:
      abstract_state: the state as a tree of ``jax.ShapeDtypeStruct`` with shardings: the
        restored arrays take those shapes, dtypes and shardings.
      data_iterator: the Grain iterator; its position is set in place.

    Returns:
      (state, step) or None.
    """
    step = self._manager.latest_step()
    if step is None:
      return None
    logging.info("Restoring checkpoint of step %d from %s", step, self.directory)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=grain.checkpoint.CheckpointRestore(data_iterator)))
    return restored["state"], step

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

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are written."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_like(tree: Any) -> Any:
  """``jax.ShapeDtypeStruct`` tree (with shardings) matching a tree of arrays."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
