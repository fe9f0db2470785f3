"""Learning-rate schedules and optimizers from the config.

LRA's schedule (``lra_benchmarks/utils/train_utils.create_learning_rate_scheduler``) is the
product of named factors, written as a string such as ``"constant*linear_warmup*rsqrt_decay"``:

  constant       base_learning_rate
  linear_warmup  min(1, step / warmup_steps)
  rsqrt_decay    1 / sqrt(max(step, warmup_steps))
  cosine_decay   max(0, 0.5 * (1 + cos(pi * ((step - warmup_steps) / steps_per_cycle mod 1))))

``steps_per_cycle`` defaults to ``num_train_steps``, the total step count, as LRA's image and
Pathfinder loops pass it (``num_train_steps = steps_per_epoch * num_epochs``; ``docs/lra.md``,
"Schedules"), so a run shorter than its warm-up still has a defined schedule. ``step`` is the
number of updates already applied (0 for the first), as in LRA's loop. The
optimizer is LRA's Adam (b1 0.9, b2 0.98, eps 1e-9) with decoupled weight decay applied to every
parameter, i.e. ``optax.adamw`` without a mask (param <- param - lr * wd * param).

Two cosine schedules of the vision recipes (``docs/vision.md``, ``docs/sparsifiner.md``) and
the segmentation recipe's poly decay (``docs/segmentation.md``):

  timm_cosine    timm's ``CosineLRScheduler``: the warm-up counts towards the cosine (DeiT, ClusTR).
  warmup_cosine  Sparsifiner's ``utils.cosine_scheduler``: a linear warm-up, then the cosine over
                 the remaining ``num_train_steps - warmup_steps`` steps.
  poly           mmcv's ``PolyLrUpdaterHook`` (Semantic FPN / PVT on ADE20K).

Every schedule is defined for every step >= 0 (past the end it holds its last value), and its
errors name the config keys that cause them.

Gradient clipping (``optax.clip_by_global_norm``) comes first in the chain; with
``grad_accum_steps`` k > 1 the whole chain is wrapped in ``optax.MultiSteps(every_k_schedule=k)``,
which averages k micro-batch gradients and then clips and applies them once, so the schedule and
Adam's moments advance once per update.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import ml_collections
import optax

FACTORS = ("constant", "linear_warmup", "rsqrt_decay", "cosine_decay")


def create_learning_rate_schedule(factors: str, base_learning_rate: float, warmup_steps: int,
                                  steps_per_cycle: int) -> optax.Schedule:
  """Returns ``step -> learning rate`` for a product of named factors (see module docstring).

  Raises:
    ValueError: an unknown factor in ``config.schedule`` (the message lists the valid ones), or
      a non-positive ``config.warmup_steps`` / ``config.steps_per_cycle`` (None:
      ``config.num_train_steps``) where a factor needs it.
  """
  names = [f.strip() for f in factors.split("*") if f.strip()]
  unknown = [f for f in names if f not in FACTORS]
  if unknown:
    raise ValueError(f"config.schedule={factors!r}: factors {unknown} unknown; valid: "
                     f"{', '.join(FACTORS)}, or one of 'timm_cosine', 'warmup_cosine', 'poly'")
  if any(f in names for f in ("linear_warmup", "rsqrt_decay")) and warmup_steps <= 0:
    raise ValueError(f"config.warmup_steps must be > 0 for linear_warmup/rsqrt_decay in "
                     f"config.schedule={factors!r}; got {warmup_steps}")
  if "cosine_decay" in names and steps_per_cycle <= 0:
    raise ValueError(f"cosine_decay's cycle, config.steps_per_cycle (None: "
                     f"config.num_train_steps), must be > 0; got {steps_per_cycle}")

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    ret = jnp.asarray(1.0, jnp.float32)
    for name in names:
      if name == "constant":
        ret *= base_learning_rate
      elif name == "linear_warmup":
        ret *= jnp.minimum(1.0, step / warmup_steps)
      elif name == "rsqrt_decay":
        ret /= jnp.sqrt(jnp.maximum(step, warmup_steps))
      elif name == "cosine_decay":
        progress = jnp.maximum(0.0, (step - warmup_steps) / float(steps_per_cycle))
        ret *= jnp.maximum(0.0, 0.5 * (1.0 + jnp.cos(jnp.pi * (progress % 1.0))))
    return ret

  return schedule


def create_optimizer(config: ml_collections.ConfigDict, wrap=None
                     ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Builds (optimizer, schedule) from the run config.

  Reads ``learning_rate``, ``schedule`` (factor string, 'timm_cosine', 'warmup_cosine' or
  'poly'), ``warmup_steps``, ``steps_per_cycle`` (None: ``num_train_steps``, the cosine cycle),
  ``num_train_steps``, ``optimizer`` ('adamw' or 'sgd'), ``adam_b1``, ``adam_b2``, ``adam_eps``,
  ``weight_decay``, ``grad_clip_norm`` (None or <= 0: no clipping) and ``grad_accum_steps``
  (> 1: ``optax.MultiSteps``), each documented in ``configs/default.py``.

  Raises:
    ValueError: unknown optimizer name or schedule factor, a schedule length that is not
      positive (the message names the config keys), or ``grad_accum_steps`` < 1.

  Vision recipes (below) add: ``schedule='timm_cosine'`` with ``warmup_init_lr``, ``min_lr`` and
  ``cooldown_steps``, or ``'warmup_cosine'`` with ``warmup_init_lr`` and ``min_lr``;
  ``weight_decay_skip`` (None: decay every parameter). Segmentation recipes:
  ``schedule='poly'`` with ``poly_power``, ``min_lr`` and ``warmup_steps`` (``poly_schedule``).
  ``wrap`` (e.g. freezing and EMA from ``clustr_jax.distill``) wraps the clipped optimizer,
  inside gradient accumulation.
  """
  if config.schedule == "poly":
    schedule = poly_schedule(config.learning_rate, config.num_train_steps,
                             power=config.poly_power, min_lr=config.min_lr,
                             warmup_steps=config.warmup_steps)
  elif config.schedule == "timm_cosine":
    schedule = timm_cosine_schedule(
        config.learning_rate, config.warmup_steps,
        config.num_train_steps - config.cooldown_steps,
        warmup_init_lr=config.warmup_init_lr, min_lr=config.min_lr)
  elif config.schedule == "warmup_cosine":
    schedule = warmup_cosine_schedule(
        config.learning_rate, config.warmup_steps, config.num_train_steps,
        warmup_init_lr=config.warmup_init_lr, min_lr=config.min_lr)
  else:
    cycle = config.steps_per_cycle
    schedule = create_learning_rate_schedule(
        config.schedule, config.learning_rate, config.warmup_steps,
        config.num_train_steps if cycle is None else cycle)
  if config.optimizer == "adamw":
    skip = config.weight_decay_skip
    tx = optax.adamw(schedule, b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps,
                     weight_decay=config.weight_decay,
                     mask=None if skip is None else weight_decay_mask(tuple(skip)))
  elif config.optimizer == "sgd":
    tx = optax.chain(optax.add_decayed_weights(config.weight_decay),
                     optax.sgd(schedule, momentum=config.momentum))
  else:
    raise ValueError(f"config.optimizer={config.optimizer!r} unknown; valid: adamw, sgd")
  clip = config.grad_clip_norm
  if clip is not None and clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(clip), tx)
  if wrap is not None:
    tx = wrap(tx)
  accum = config.grad_accum_steps
  if not isinstance(accum, int) or accum < 1:
    raise ValueError(f"config.grad_accum_steps must be an int >= 1; got {accum!r}")
  if accum > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=accum).gradient_transformation()
  return tx, schedule


# ---------------------------------------------------------------------------------------------
# Vision recipes (DeiT / ClusTR / Sparsifiner train with timm's scheduler and AdamW groups).
# ---------------------------------------------------------------------------------------------
def timm_cosine_schedule(base_learning_rate: float, warmup_steps: int, cosine_steps: int, *,
                         warmup_init_lr: float = 0.0, min_lr: float = 0.0) -> optax.Schedule:
  """timm ``CosineLRScheduler`` (one cycle, ``warmup_prefix=False``), per step instead of per
  epoch: ``warmup_init_lr + t (lr - warmup_init_lr) / warmup_steps`` for t < warmup_steps, then
  ``min_lr + (lr - min_lr) (1 + cos(pi t / cosine_steps)) / 2`` (the warmup counts towards the
  cosine, as in timm), and ``min_lr`` after ``cosine_steps`` (DeiT's cooldown epochs).

  Raises:
    ValueError: ``cosine_steps`` (config.num_train_steps - config.cooldown_steps) < 1 or
      ``warmup_steps`` (config.warmup_steps) < 0.
  """
  if cosine_steps < 1 or warmup_steps < 0:
    raise ValueError(f"timm_cosine: config.num_train_steps - config.cooldown_steps = "
                     f"{cosine_steps} must be >= 1 and config.warmup_steps = {warmup_steps} >= 0")

  def schedule(step):
    t = jnp.asarray(step, jnp.float32)
    cosine = min_lr + 0.5 * (base_learning_rate - min_lr) * (
        1.0 + jnp.cos(jnp.pi * jnp.minimum(t, cosine_steps) / cosine_steps))
    if warmup_steps == 0:
      return cosine
    warmup = warmup_init_lr + t * (base_learning_rate - warmup_init_lr) / warmup_steps
    return jnp.where(t < warmup_steps, warmup, cosine)

  return schedule


def warmup_cosine_schedule(base_learning_rate: float, warmup_steps: int, total_steps: int, *,
                           warmup_init_lr: float = 0.0, min_lr: float = 0.0) -> optax.Schedule:
  """Sparsifiner's ``utils.cosine_scheduler`` (``src/utils.py``, lim142857/Sparsifiner; per
  iteration, as its ``main.py`` sets it): a warm-up ``linspace(warmup_init_lr, lr,
  warmup_steps)`` (both ends included), then over the remaining n = total_steps - warmup_steps
  steps ``min_lr + (lr - min_lr) (1 + cos(pi i / n)) / 2`` for i = step - warmup_steps.

  The official array has exactly ``total_steps`` entries; here the schedule is defined for every
  step: after ``total_steps`` it holds the cosine's end (min_lr as i -> n), and with
  ``total_steps`` <= ``warmup_steps`` (a run shorter than its warm-up) the run stays in the
  warm-up. Returns ``step -> learning rate`` (float32).

  Raises:
    ValueError: ``warmup_steps`` (config.warmup_steps) < 0 or ``total_steps``
      (config.num_train_steps) < 1.
  """
  if warmup_steps < 0 or total_steps < 1:
    raise ValueError(f"warmup_cosine: config.warmup_steps = {warmup_steps} must be >= 0 and "
                     f"config.num_train_steps = {total_steps} >= 1")
  cosine_steps = max(1, total_steps - warmup_steps)

  def schedule(step):
    t = jnp.asarray(step, jnp.float32)
    i = jnp.clip(t - warmup_steps, 0.0, cosine_steps)
    cosine = min_lr + 0.5 * (base_learning_rate - min_lr) * (
        1.0 + jnp.cos(jnp.pi * i / cosine_steps))
    if warmup_steps == 0:
      return cosine
    slope = (base_learning_rate - warmup_init_lr) / max(1, warmup_steps - 1)
    warmup = warmup_init_lr + t * slope
    return jnp.where(t < warmup_steps, warmup, cosine)

  return schedule


def poly_schedule(base_learning_rate: float, num_steps: int, *, power: float = 0.9,
                  min_lr: float = 0.0, warmup_steps: int = 0) -> optax.Schedule:
  """mmcv's ``PolyLrUpdaterHook`` per iteration (the Semantic FPN / PVT ADE20K recipe):
  ``(lr - min_lr) (1 - t / num_steps)^power + min_lr`` at update t (0-based), after a linear
  warm-up ``lr t / warmup_steps`` for t < ``warmup_steps`` (0: none, PVT's setting).

  Raises:
    ValueError: ``num_steps`` < 1, ``warmup_steps`` < 0 or ``power`` <= 0.
  """
  if num_steps < 1 or warmup_steps < 0 or power <= 0:
    raise ValueError(f"poly schedule: num_train_steps={num_steps} must be >= 1, warmup_steps="
                     f"{warmup_steps} >= 0 and poly_power={power} > 0")

  def schedule(step):
    t = jnp.asarray(step, jnp.float32)
    decay = (1.0 - jnp.minimum(t, num_steps) / num_steps) ** power
    poly = (base_learning_rate - min_lr) * decay + min_lr
    if warmup_steps == 0:
      return poly
    return jnp.where(t < warmup_steps, base_learning_rate * t / warmup_steps, poly)

  return schedule


def weight_decay_mask(skip: tuple[str, ...]):
  """timm ``add_weight_decay``'s groups as an optax mask function: no decay for biases, norm
  scales and other vectors (torch's 1-D parameters; Flax's ``bias`` / ``scale`` leaves of any
  rank) and for parameters whose path contains one of ``skip`` (e.g. 'pos_embed', 'cls_token',
  timm's ``no_weight_decay()``)."""
  pattern = re.compile("|".join(re.escape(s) for s in skip)) if skip else None

  def mask(params):
    def decays(path, leaf):
      names = [str(k.key) if isinstance(k, jax.tree_util.DictKey) else str(k) for k in path
               if not isinstance(k, jax.tree_util.GetAttrKey)]  # Not nn.Partitioned's .value.
      if names and names[-1] in ("bias", "scale") or jnp.ndim(leaf) <= 1:
        return False
      return not (pattern and pattern.search("/".join(names)))
    return jax.tree_util.tree_map_with_path(decays, params)

  return mask
