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
registered mechanism works for every task: whether token 0 is a CLS token follows the model's
pooling, and the settings fit LRA's parameter budget (below) where the method allows it.
``pathfinder_dataset`` is the Pathfinder / Path-X data section.

Padding: the official configs set ``model.lra_padding`` (LRA's computation: padded queries
attend uniformly to every position, MEAN pooling over every position, ``docs/lra.md``, "Padding
semantics"); the ``cpu`` variants keep the attention contract (padding ignored).

Parameter budgets (``docs/lra.md``, "Parameter budgets"): LRA compares an efficient model with
the dense Transformer of the same sizes, within +10 % of its parameters (``PARAMETER_BUDGET``).
``dense_parameters`` counts the dense encoder (the baseline has no attention biases);
``finish`` gives each attention layer an equal share of the 10 % (``attention.Budget``);
``STATED_OVERHEADS`` states, per config and mechanism, the larger overhead where a method cannot
fit, and ``stated_budget`` reads it. ``experiments/lra/parameters.py`` tabulates them and
``tests/test_lra_budget.py`` fails when a config exceeds its stated budget.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Mapping

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


#: LRA's allowance for an efficient model: at most +10 % of the dense Transformer's parameters.
PARAMETER_BUDGET = 0.10

#: The overheads (fractions of the dense encoder's parameters) stated where a method cannot fit
#: PARAMETER_BUDGET, per config spec (``configs/lra/<spec>``) and mechanism, each an upper bound
#: of what ``experiments/lra/results/parameters.md`` measures:
#:   clustr       its second key/value projection (one per clustering scale, 2 C qkv per
#:                layer), the merge's weight_layer and the output bias; none of them a setting.
#:   sparsifiner  its token-axis projections proj_n / proj_back_n, 2 N n_down per layer, already
#:                at the smallest n_down (basis_topk = 8): on a narrow model at long N they
#:                outweigh the whole encoder (Pathfinder: 2 x 1,024 x 8 per layer against
#:                27k parameters). The nearest option outside the method, one token-axis
#:                projection shared by the layers, would divide this by num_layers; it is not
#:                implemented.
STATED_OVERHEADS: dict[str, dict[str, float]] = {
    "listops.py": {"clustr": 0.24},
    "listops.py:cpu": {"clustr": 0.22},
    "text.py": {"clustr": 0.16},
    "text.py:cpu": {"clustr": 0.12, "sparsifiner": 0.45},
    "text.py:max_length=4000": {"clustr": 0.16},
    "text.py:cpu,max_length=4000": {"clustr": 0.12, "sparsifiner": 3.40},
    "retrieval.py": {"clustr": 0.13},
    "retrieval.py:cpu": {"sparsifiner": 0.20},
    "image.py:cpu": {"sparsifiner": 0.33},
    "pathfinder.py": {"clustr": 0.17, "sparsifiner": 0.63},
    "pathfinder.py:cpu": {"clustr": 0.12},
    "pathx.py": {"sparsifiner": 0.49},
    "pathx.py:cpu": {"sparsifiner": 0.36},
}


def stated_budget(spec: str, mechanism: str) -> float:
  """The parameter overhead config ``configs/lra/<spec>`` (e.g. ``'pathfinder.py:cpu'``) allows
  ``mechanism`` over the dense encoder: its ``STATED_OVERHEADS`` entry, else
  ``PARAMETER_BUDGET`` (0 for dense attention, the reference)."""
  if mechanism == "dense":
    return 0.0
  return STATED_OVERHEADS.get(spec, {}).get(mechanism, PARAMETER_BUDGET)


def dense_parameters(model: Mapping[str, Any], *, vocab_size: int, num_classes: int,
                     max_length: int) -> int:
  """Parameters of the LRA encoder ``model`` (a ``config.model`` section: ``name``
  'lra_encoder' or 'lra_dual_encoder', emb_dim E, qkv_dim, mlp_dim M, num_layers, pooling,
  learned_position_embedding) with dense attention and no attention biases, as LRA's baseline
  (``clustr_jax/models/lra.py``): embedding V E, CLS E, learned positions (max_length [+ 1]) E,
  per layer 2 LayerNorms 4 E + attention 4 E qkv + MLP 2 E M + M + E, final LayerNorm 2 E, and
  the head (``LRAEncoder``: E M + M + M classes + classes; ``LRADualEncoder``: 2 E M + M +
  M (M // 2) + M // 2 + (M // 2) classes + classes).

  Raises:
    ValueError: a model name other than the two LRA encoders.
  """
  e, qkv, m = model["emb_dim"], model["qkv_dim"], model["mlp_dim"]
  cls = 1 if model["pooling"] == "CLS" else 0
  count = vocab_size * e + cls * e
  if model["learned_position_embedding"]:
    count += (max_length + cls) * e
  count += model["num_layers"] * (4 * e + 4 * e * qkv + 2 * e * m + m + e) + 2 * e
  if model["name"] == "lra_encoder":
    return count + e * m + m + m * num_classes + num_classes
  if model["name"] == "lra_dual_encoder":
    half = m // 2
    return count + 2 * e * m + m + m * half + half + half * num_classes + num_classes
  raise ValueError(f"config.model.name={model['name']!r} is not an LRA encoder "
                   "('lra_encoder', 'lra_dual_encoder')")


def data_sizes(dataset_name: str) -> tuple[int, int]:
  """(vocab_size, num_classes) of LRA dataset ``dataset_name`` (``config.dataset.name``), the
  ``VOCAB_SIZE`` and ``NUM_CLASSES`` of its ``clustr_jax.data`` module."""
  module = importlib.import_module(f"clustr_jax.data.{dataset_name}")
  return module.VOCAB_SIZE, module.NUM_CLASSES


def finish(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Sets ``config.model.attention_kwargs``: the settings ``attention.sized_for`` gives the
  mechanism ``config.model.attention`` at the model's length (``config.dataset.max_length``,
  plus one for CLS pooling), with ``cls_token`` = (``config.model.pooling`` == 'CLS') and a
  ``Budget`` of PARAMETER_BUDGET x ``dense_parameters`` / ``num_layers`` parameters per
  attention layer. Returns ``config``.

  Raises:
    ValueError: unknown ``config.model.attention`` (the message lists the registered names).
  """
  cls_token = config.model.pooling == "CLS"
  length = config.dataset.max_length + (1 if cls_token else 0)
  vocab_size, num_classes = data_sizes(config.dataset.name)
  dense = dense_parameters(config.model, vocab_size=vocab_size, num_classes=num_classes,
                           max_length=config.dataset.max_length)
  budget = attention.Budget(
      features=config.model.emb_dim, qkv_features=config.model.qkv_dim,
      num_heads=config.model.num_heads,
      extra_parameters=int(PARAMETER_BUDGET * dense) // config.model.num_layers,
      num_layers=config.model.num_layers)
  config.model.attention_kwargs = attention.sized_for(
      config.model.attention, length, cls_token=cls_token, budget=budget)
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
