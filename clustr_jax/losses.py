"""The losses of the train loop and of Sparsifiner's distillation stages.

``cross_entropy`` and ``correct`` are the classification loss and accuracy of every task (class
ids or target distributions); ``pixel_cross_entropy``, ``pixel_correct``, ``confusion_matrix`` and
``segmentation_metrics`` are semantic segmentation's (per-pixel labels with an ignore label,
docs/segmentation.md); ``task_loss``, ``task_accuracy``, ``eval_sums`` and ``eval_metrics`` pick
them by the dataset's task (``TASKS``) for the train loop; ``recon_loss``,
``kl_teacher_student`` and ``token_mse`` are the terms of Sparsifiner's two stages (official
``lim142857/Sparsifiner`` ``src/losses.py``, see ``docs/sparsifiner.md``), combined by
``clustr_jax.distill.Objective``. All return float32.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

#: Dataset tasks (``Dataset.task``): what the loop's loss and evaluation metrics are.
TASKS = ("classification", "segmentation")
#: Label of pixels that count in no loss or metric (mmsegmentation's ``ignore_index``).
IGNORE_LABEL = 255


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


def pixel_cross_entropy(logits: jax.Array, labels: jax.Array,
                        ignore_label: int = IGNORE_LABEL) -> tuple[jax.Array, jax.Array]:
  """Per-pixel softmax cross-entropy summed over the labelled pixels, and their count.

  Args:
    logits: [batch, height, width, classes] (any float dtype; computed in float32).
    labels: int [batch, height, width], class ids in [0, classes) or ``ignore_label``.

  Returns:
    (sum float32 [], count int32 []): the mean loss is sum / max(count, 1) (PyTorch's
    ``F.cross_entropy(ignore_index=255)``; mmsegmentation's ``avg_non_ignore=True``).
  """
  valid = labels != ignore_label
  safe = jnp.where(valid, labels, 0)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), safe)
  return jnp.sum(jnp.where(valid, losses, 0.0)), jnp.sum(valid, dtype=jnp.int32)


def pixel_correct(logits: jax.Array, labels: jax.Array, ignore_label: int = IGNORE_LABEL
                  ) -> tuple[jax.Array, jax.Array]:
  """(correct int32 [], labelled int32 []): labelled pixels whose top logit is the label, and
  the labelled pixels (``logits`` [B, H, W, K], ``labels`` int [B, H, W])."""
  valid = labels != ignore_label
  hits = (jnp.argmax(logits, -1) == labels) & valid
  return jnp.sum(hits, dtype=jnp.int32), jnp.sum(valid, dtype=jnp.int32)


def confusion_matrix(logits: jax.Array, labels: jax.Array,
                     ignore_label: int = IGNORE_LABEL) -> jax.Array:
  """int32 [K, K]: entry (t, p) counts the labelled pixels of class t predicted as p (top
  logit); pixels labelled ``ignore_label`` count nowhere.

  Args:
    logits: [batch, height, width, K]; labels: int [batch, height, width].

  Counts are int32: sums over batches stay exact up to 2^31 - 1 pixels per entry (ADE20K's
  whole validation set at 512 px: about 7e8 pixels in all).
  """
  num_classes = logits.shape[-1]
  valid = (labels != ignore_label).reshape(-1)
  index = jnp.where(valid, labels.reshape(-1) * num_classes
                    + jnp.argmax(logits, -1).reshape(-1), 0)
  counts = jnp.zeros((num_classes * num_classes,), jnp.int32).at[index].add(
      valid.astype(jnp.int32))
  return counts.reshape(num_classes, num_classes)


def segmentation_metrics(confusion: np.ndarray) -> dict[str, Any]:
  """mmsegmentation's ``mean_iou`` from a confusion matrix [K, K] (rows: label, columns:
  prediction), summed over a whole split.

  Returns:
    'miou': mean over classes of IoU = TP / (TP + FP + FN), 'mean_accuracy': mean over classes of
    TP / (TP + FN), 'pixel_accuracy': sum TP / labelled pixels (floats; a class absent from both
    labels and predictions has no IoU and no accuracy and is left out of the means, numpy
    ``nanmean`` as mmsegmentation; 0 when no class has one), 'iou' and 'class_accuracy' (float64
    [K], NaN where undefined), 'num_pixels' (labelled pixels).
  """
  confusion = np.asarray(confusion, np.float64)
  tp = np.diag(confusion)
  label_area, pred_area = confusion.sum(1), confusion.sum(0)
  union = label_area + pred_area - tp
  with np.errstate(invalid="ignore", divide="ignore"):
    iou = np.where(union > 0, tp / union, np.nan)
    accuracy = np.where(label_area > 0, tp / label_area, np.nan)
  total = float(label_area.sum())

  def mean(values):
    return float(np.nanmean(values)) if np.isfinite(values).any() else 0.0

  return {"miou": mean(iou), "mean_accuracy": mean(accuracy),
          "pixel_accuracy": float(tp.sum()) / total if total else 0.0, "iou": iou,
          "class_accuracy": accuracy, "num_pixels": total}


def _check_task(task: str) -> None:
  if task not in TASKS:
    raise ValueError(f"dataset task {task!r} unknown; valid: {', '.join(TASKS)}")


def task_loss(task: str, logits: jax.Array, targets: jax.Array) -> jax.Array:
  """The training loss, float32 []: the batch mean of ``cross_entropy`` ('classification') or
  the mean over labelled pixels of ``pixel_cross_entropy`` ('segmentation').

  Raises:
    ValueError: unknown ``task``.
  """
  _check_task(task)
  if task == "segmentation":
    total, count = pixel_cross_entropy(logits, targets)
    return total / jnp.maximum(count, 1).astype(jnp.float32)
  return cross_entropy(logits, targets).mean()


def task_accuracy(task: str, logits: jax.Array, targets: jax.Array) -> jax.Array:
  """float32 []: the batch accuracy ('classification') or the pixel accuracy over labelled
  pixels ('segmentation')."""
  _check_task(task)
  if task == "segmentation":
    hits, count = pixel_correct(logits, targets)
    return hits.astype(jnp.float32) / jnp.maximum(count, 1).astype(jnp.float32)
  return jnp.mean(correct(logits, targets))


def eval_sums(task: str, logits: jax.Array, targets: jax.Array, weights: jax.Array
              ) -> dict[str, jax.Array]:
  """Sums over one padded eval batch (``weights`` float32 [batch]: 1 real row, 0 padding),
  added up over a split by the loop and turned into metrics by ``eval_metrics``.

  'classification': {'loss', 'correct', 'count'} (float32 []). 'segmentation' (padding rows'
  pixels count as ignored): {'loss' float32 [], 'count' int32 [] (labelled pixels), 'confusion'
  int32 [K, K] (``confusion_matrix``)}.
  """
  _check_task(task)
  if task == "segmentation":
    keep = weights.reshape((-1,) + (1,) * (targets.ndim - 1)) > 0
    targets = jnp.where(keep, targets, IGNORE_LABEL)
    total, count = pixel_cross_entropy(logits, targets)
    return {"loss": total, "count": count, "confusion": confusion_matrix(logits, targets)}
  return {"loss": jnp.sum(cross_entropy(logits, targets) * weights),
          "correct": jnp.sum(correct(logits, targets) * weights),
          "count": jnp.sum(weights)}


def eval_metrics(task: str, totals: dict[str, np.ndarray]) -> dict[str, float]:
  """A split's metrics from the summed ``eval_sums``.

  'classification': 'loss' (mean), 'accuracy', 'num_examples'. 'segmentation': 'loss' (mean over
  labelled pixels), 'miou', 'mean_accuracy', 'pixel_accuracy' (``segmentation_metrics``),
  'accuracy' (= pixel_accuracy, the key every task logs), 'num_pixels'.
  """
  _check_task(task)
  count = max(float(totals["count"]), 1.0)
  if task == "segmentation":
    scores = segmentation_metrics(totals["confusion"])
    return {"loss": float(totals["loss"]) / count, "miou": scores["miou"],
            "mean_accuracy": scores["mean_accuracy"],
            "pixel_accuracy": scores["pixel_accuracy"], "accuracy": scores["pixel_accuracy"],
            "num_pixels": scores["num_pixels"]}
  return {"loss": float(totals["loss"]) / count, "accuracy": float(totals["correct"]) / count,
          "num_examples": float(totals["count"])}


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


def token_mse(student_tokens: jax.Array, teacher_tokens: jax.Array,
              keep: jax.Array | None = None) -> jax.Array:
  """Mean squared error of tokens [B, T, C] (``F.mse_loss``), over all elements, or with
  ``keep`` bool [B, T] over the kept tokens' elements only (official ``losses.py``: the rows of
  the last token mask are selected before ``F.mse_loss``), i.e. sum over kept (b, t) and c of
  the squared difference / (number of kept tokens * C).

  Raises:
    ValueError: the token shapes differ, or ``keep`` is not [B, T].
  """
  if student_tokens.shape != teacher_tokens.shape:
    raise ValueError(f"token_mse: student tokens {student_tokens.shape} and teacher tokens "
                     f"{teacher_tokens.shape} differ")
  squared = (student_tokens.astype(jnp.float32) - teacher_tokens.astype(jnp.float32)) ** 2
  if keep is None:
    return jnp.mean(squared)
  if tuple(keep.shape) != tuple(squared.shape[:2]):
    raise ValueError(f"token_mse: keep must be [batch, tokens] = {squared.shape[:2]}; got "
                     f"{tuple(keep.shape)}")
  total = jnp.sum(jnp.where(keep[..., None], squared, 0.0))
  return total / (jnp.sum(keep) * squared.shape[-1])
