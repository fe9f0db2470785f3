"""Shared pieces of the Long Range Arena configs (``configs/lra/*.py``).

Every LRA task config (listops, text, retrieval, image, pathfinder, pathx) builds its
``ConfigDict`` with ``base_config`` and finishes it with ``finish``; the per-task values (LRA's
``base_*_config.py`` overridden by ``transformer_base.py``, see ``docs/lra.md``) stay in the task
file. Keys set here, with LRA's defaults where the tasks agree (the rest come from
``configs/default.py``):

  dataset (the task's own section), model (``lra_encoder`` or ``lra_dual_encoder`` fields),
  batch_size / eval_batch_size, num_train_steps, optimizer ``adamw`` with Adam(0.9, 0.98, 1e-9)
  and decoupled weight decay on every parameter, learning_rate, schedule, warmup_steps,
  weight_decay, grad_clip_norm, log/eval/checkpoint intervals.

``finish`` gives the mechanism ``config.model.attention`` its own settings for the model's
sequence length, asking the attention registry (``clustr_jax.attention.sized_for``), so every
registered mechanism works for every task. ``pathfinder_dataset`` is the Pathfinder / Path-X data
section.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections

from clustr_jax import attention
from clustr_jax.data import pathfinder
from configs import default


def base_config(*, dataset: dict[str, Any], model: dict[str, Any], batch_size: int,
                num_train_steps: int, learning_rate: float, schedule: str, warmup_steps: int,
                weight_decay: float, eval_every_steps: int, grad_clip_norm: float | None = None,
                checkpoint_every_steps: int = 500) -> ml_collections.ConfigDict:
  """The whole run config of one LRA task: ``configs/default.py`` with the task's values.

  Args:
    dataset: ``config.dataset`` (``name`` picks the family in ``clustr_jax.data``). A
      ``data_dir`` key of None becomes a str-typed field, so ``--config.dataset.data_dir=...``
      can set it.
    model: ``config.model``: ``name`` and the model's constructor fields (``attention`` among them).
    batch_size: global batch (``eval_batch_size`` is the same).
    num_train_steps, learning_rate, schedule, warmup_steps, weight_decay, grad_clip_norm: as in
      ``clustr_jax/optim.py`` (``schedule`` e.g. ``'constant*linear_warmup*rsqrt_decay'``).
    eval_every_steps: validation interval (also the logging interval when smaller than 50).
    checkpoint_every_steps: Orbax save interval.
  """
  config = default.get_config()
  config.dataset = ml_collections.ConfigDict(dataset)
  if "data_dir" in dataset and dataset["data_dir"] is None:
    config.dataset.data_dir = ml_collections.FieldReference(None, field_type=str)
  config.model = ml_collections.ConfigDict(model)
  config.batch_size = batch_size
  config.eval_batch_size = batch_size
  config.num_train_steps = num_train_steps
  config.optimizer = "adamw"
  config.learning_rate = learning_rate
  config.schedule = schedule
  config.warmup_steps = warmup_steps
  config.adam_b1 = 0.9
  config.adam_b2 = 0.98
  config.adam_eps = 1e-9
  config.weight_decay = weight_decay
  config.grad_clip_norm = grad_clip_norm
  config.log_every_steps = min(50, eval_every_steps)
  config.eval_every_steps = eval_every_steps
  config.checkpoint_every_steps = checkpoint_every_steps
  return config


def finish(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Sets ``config.model.attention_kwargs``: the settings ``attention.sized_for`` gives the
  mechanism ``config.model.attention`` at the model's length (``config.dataset.max_length``,
  plus one for CLS pooling). Returns ``config``.

  Raises:
    ValueError: unknown ``config.model.attention`` (the message lists the registered names).
  """
  length = config.dataset.max_length + (1 if config.model.pooling == "CLS" else 0)
  config.model.attention_kwargs = attention.sized_for(config.model.attention, length)
  return config


def pathfinder_dataset(resolution: int, difficulty: str, num_images: int) -> dict[str, Any]:
  """``config.dataset`` (as a dict) of a Pathfinder set rendered with
  ``clustr_jax.data.pathfinder.lra_parameters(resolution, difficulty)``: ``generator`` holds
  every ``PathfinderParams`` field except ``window_size`` (= ``resolution``).

  Raises:
    ValueError: a resolution or difficulty LRA does not define (from ``lra_parameters``).
  """
  params = dataclasses.asdict(pathfinder.lra_parameters(resolution, difficulty))
  del params["window_size"]
  return dict(name="pathfinder", resolution=resolution, max_length=resolution * resolution,
              data_dir=None, generate=True, split_seed=0,
              generator=dict(params, num_images=num_images, images_per_batch=1000, seed=0,
                             workers=0))
