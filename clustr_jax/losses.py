"""The losses of the train loop and of Sparsifiner's distillation stages.

``cross_entropy`` and ``correct`` are the classification loss and accuracy of every task (class
ids or target distributions); ``recon_loss``, ``kl_teacher_student`` and ``token_mse`` are the
terms of Sparsifiner's two stages (official ``lim142857/Sparsifiner`` ``src/losses.py``, see
``docs/sparsifiner.md``), combined by ``clustr_jax.distill.Objective``. All return float32.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Per-example softmax cross-entropy -> float32 [batch].

  Args:
    logits: [batch, classes].
    targets: int class ids [batch], or float target distributions [batch, classes] (one-hot,
      label-smoothed or mixed, e.g. by mixup/cutmix).
  """
  logits = logits.astype(jnp.float32)
  if targets.ndim == logits.ndim:
    return optax.softmax_cross_entropy(logits, targets.astype(jnp.float32))
  return optax.softmax_cross_entropy_with_integer_labels(logits, targets)


def correct(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """float32 [batch]: 1 where the top logit is the target class (the top target class for
  distributions), else 0."""
  if targets.ndim == logits.ndim:
    targets = jnp.argmax(targets, -1)
  return (jnp.argmax(logits, -1) == targets).astype(jnp.float32)


def _sown_by_module(intermediates: Any, name: str) -> dict[tuple[str, ...], jax.Array]:
  """{module path: the array sown as ``name``} over a whole intermediates tree."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(intermediates))
  return {key[:-1]: value[0] if isinstance(value, tuple) else value
          for key, value in flat.items() if key[-1] == name}


def recon_loss(intermediates: Any) -> jax.Array:
  """Stage 1's L_recon (without its weight): (1 / L) sum over the L Sparsifiner layers of
  sum (approx_attn - stop_gradient(unmasked_attn)[:, :, -Nq:, :])^2.

  Args:
    intermediates: the 'intermediates' collection of a recon-mode forward pass: per layer
      ``approx_attn`` [B, H, Nq, N] and ``unmasked_attn`` [B, H, N, N].

  Raises:
    ValueError: no layer sowed both (the model is not in recon mode or not Sparsifiner).
  """
  approx = _sown_by_module(intermediates, "approx_attn")
  dense = _sown_by_module(intermediates, "unmasked_attn")
  layers = sorted(set(approx) & set(dense))
  if not layers:
    raise ValueError("recon loss: no layer sowed approx_attn and unmasked_attn; stage 'recon' "
                     "needs Sparsifiner attention with recon_mode=True")
  total = 0.0
  for layer in layers:
    a = approx[layer].astype(jnp.float32)
    target = jax.lax.stop_gradient(dense[layer].astype(jnp.float32))[:, :, -a.shape[2]:, :]
    total += jnp.sum((a - target) ** 2)
  return total / len(layers)


def kl_teacher_student(student_logits: jax.Array, teacher_logits: jax.Array,
                       temperature: float = 1.0) -> jax.Array:
  """KL(teacher || student) of softmax(logits / T), summed over classes, mean over the batch,
  times T^2 (``F.kl_div(log_s, log_t, reduction='batchmean', log_target=True) * T * T``)."""
  log_s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, -1)
  log_t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, -1)
  return jnp.sum(jnp.exp(log_t) * (log_t - log_s)) / student_logits.shape[0] * temperature ** 2


def token_mse(student_tokens: jax.Array, teacher_tokens: jax.Array) -> jax.Array:
  """Mean squared error over all elements (``F.mse_loss``)."""
  return jnp.mean((student_tokens.astype(jnp.float32) - teacher_tokens.astype(jnp.float32)) ** 2)
