"""Shared pieces of the Long Range Arena configs (``configs/lra/*.py``).

Every LRA task config (listops, text, retrieval, image, pathfinder, pathx) builds its
``ConfigDict`` with ``base_config`` and finishes it with ``finish``; the per-task values (LRA's
``base_*_config.py`` overridden by ``transformer_base.py``, ../shared/reference/lra.md §8) stay in
the task file. Keys set here, with LRA's defaults where the tasks agree:

  seed, dataset (the task's own section), model (``lra_encoder`` or ``lra_dual_encoder`` fields),
  batch_size / eval_batch_size, num_train_steps, optimizer ``adamw`` with Adam(0.9, 0.98, 1e-9)
  and decoupled weight decay on every parameter (lra.md §7.9), learning_rate, schedule,
  warmup_steps, weight_decay, grad_clip_norm, log/eval/checkpoint intervals, mesh, distributed_init.

``attention_kwargs(name, length)`` gives each mechanism settings that fit the sequence length, so
``attention=dense|clustr|cast|sparsifiner`` works for every task; ``finish`` applies it to
``dataset.max_length`` (+1 for the CLS token).

For the Pathfinder / Path-X configs (and any new LRA task): call ``base_config`` with the task's
values, then ``finish``; the images' quirk (pixel 0 is padding) is the model field
``zero_is_padding`` (``clustr_jax/models/lra.py``).
"""

from __future__ import annotations

from typing import Any

import ml_collections

ATTENTION_NAMES = ("dense", "clustr", "cast", "sparsifiner")


def attention_kwargs(name: str, length: int) -> dict[str, Any]:
  """Settings of each mechanism that fit a sequence of ``length`` tokens (CLS included).

  Raises:
    ValueError: ``name`` is not one of ``ATTENTION_NAMES``.
  """
  if name == "dense":
    return {}
  if name == "clustr":
    # Two scales as in ClusTR (M, 4M); M ~ length / 16 gives 125 / 500 clusters at 2,001 tokens.
    m = max(1, length // 16)
    return {"num_clusters": (m, min(4 * m, length)), "distance_chunk_size": 512}
  if name == "cast":
    # Full coverage (num_clusters * cluster_size >= length) with num_clusters ~ sqrt(length).
    num_clusters = max(1, int(round(length ** 0.5 / 8)) * 8)
    cluster_size = min(length, -(-length // num_clusters))
    return {"num_clusters": num_clusters, "cluster_size": cluster_size}
  if name == "sparsifiner":
    # n_down = length // reduce_n_factor ~ 32 keeps the predictor within LRA's +10% parameters.
    return {"keep_rate": 0.25, "reduce_n_factor": max(1, length // 32)}
  raise ValueError(f"attention={name!r} unknown; valid: {', '.join(ATTENTION_NAMES)}")


def base_config(*, dataset: dict[str, Any], model: dict[str, Any], batch_size: int,
                num_train_steps: int, learning_rate: float, schedule: str, warmup_steps: int,
                weight_decay: float, eval_every_steps: int, grad_clip_norm: float | None = None,
                checkpoint_every_steps: int = 500) -> ml_collections.ConfigDict:
  """The whole run config of one LRA task with the keys every task shares.

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
  config = ml_collections.ConfigDict()
  config.seed = 0
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
  config.grad_clip_norm = ml_collections.FieldReference(grad_clip_norm, field_type=float)
  config.log_every_steps = min(50, eval_every_steps)
  config.eval_every_steps = eval_every_steps
  config.checkpoint_every_steps = checkpoint_every_steps
  config.max_checkpoints_to_keep = 3
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, model=1))
  config.distributed_init = False  # jax.distributed.initialize() for multi-host runs.
  return config


def finish(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Sets ``config.model.attention_kwargs`` for ``config.model.attention`` at the model's length.

  The length is ``config.dataset.max_length`` plus one for CLS pooling. Returns ``config``.

  Raises:
    ValueError: unknown ``config.model.attention``.
  """
  length = config.dataset.max_length + (1 if config.model.pooling == "CLS" else 0)
  config.model.attention_kwargs = attention_kwargs(config.model.attention, length)
  return config
