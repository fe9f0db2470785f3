"""Learning-rate schedules and optimizers from the config.

LRA's schedule (``lra_benchmarks/utils/train_utils.create_learning_rate_scheduler``) is the
product of named factors, written as a string such as ``"constant*linear_warmup*rsqrt_decay"``:

  constant       base_learning_rate
  linear_warmup  min(1, step / warmup_steps)
  rsqrt_decay    1 / sqrt(max(step, warmup_steps))
  cosine_decay   max(0, 0.5 * (1 + cos(pi * ((step - warmup_steps) / steps_per_cycle mod 1))))

``step`` is the number of updates already applied (0 for the first), as in LRA's loop. The
optimizer is LRA's Adam (b1 0.9, b2 0.98, eps 1e-9) with decoupled weight decay applied to every
parameter, i.e. ``optax.adamw`` without a mask (param <- param - lr * wd * param).

Gradient clipping (``optax.clip_by_global_norm``) comes first in the chain; with
``grad_accum_steps`` k > 1 the whole chain is wrapped in ``optax.MultiSteps(every_k_schedule=k)``,
which averages k micro-batch gradients and then clips and applies them once, so the schedule and
Adam's moments advance once per update.
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections
import optax

from clustr_jax import defaults

FACTORS = ("constant", "linear_warmup", "rsqrt_decay", "cosine_decay")


def create_learning_rate_schedule(factors: str, base_learning_rate: float, warmup_steps: int,
                                  steps_per_cycle: int) -> optax.Schedule:
  """Returns ``step -> learning rate`` for a product of named factors (see module docstring).

  Raises:
    ValueError: an unknown factor (the message lists the valid ones), or a non-positive
      warmup_steps / steps_per_cycle where a factor needs it.
  """
  names = [f.strip() for f in factors.split("*") if f.strip()]
  unknown = [f for f in names if f not in FACTORS]
  if unknown:
    raise ValueError(f"schedule factors {unknown} unknown; valid: {', '.join(FACTORS)}")
  if any(f in names for f in ("linear_warmup", "rsqrt_decay")) and warmup_steps <= 0:
    raise ValueError(f"warmup_steps must be > 0 for linear_warmup/rsqrt_decay; got {warmup_steps}")
  if "cosine_decay" in names and steps_per_cycle <= 0:
    raise ValueError(f"steps_per_cycle must be > 0 for cosine_decay; got {steps_per_cycle}")

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


def create_optimizer(config: ml_collections.ConfigDict) -> tuple[optax.GradientTransformation,
                                                                  optax.Schedule]:
  """Builds (optimizer, schedule) from the run config.

  Reads ``learning_rate``, ``schedule`` (factor string), ``warmup_steps``, ``num_train_steps``
  (the cosine cycle), ``optimizer`` ('adamw' or 'sgd'), ``adam_b1``, ``adam_b2``, ``adam_eps``,
  ``weight_decay``, ``grad_clip_norm`` (None or <= 0: no clipping) and ``grad_accum_steps``
  (> 1: ``optax.MultiSteps``); unset keys take ``clustr_jax.defaults``.

  Raises:
    ValueError: unknown optimizer name or schedule factor, or ``grad_accum_steps`` < 1.
  """
  config = defaults.with_defaults(config)
  schedule = create_learning_rate_schedule(
      config.schedule, config.learning_rate, config.warmup_steps,
      config.get("steps_per_cycle") or config.num_train_steps - config.warmup_steps)
  if config.optimizer == "adamw":
    tx = optax.adamw(schedule, b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps,
                     weight_decay=config.weight_decay)
  elif config.optimizer == "sgd":
    tx = optax.chain(optax.add_decayed_weights(config.weight_decay),
                     optax.sgd(schedule, momentum=config.get("momentum")))
  else:
    raise ValueError(f"config.optimizer={config.optimizer!r} unknown; valid: adamw, sgd")
  clip = config.get("grad_clip_norm")
  if clip is not None and clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(clip), tx)
  accum = config.grad_accum_steps
  if not isinstance(accum, int) or accum < 1:
    raise ValueError(f"config.grad_accum_steps must be an int >= 1; got {accum!r}")
  if accum > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=accum).gradient_transformation()
  return tx, schedule
