"""Sparsifiner's two-stage training with distillation from a dense teacher, and model EMA.

Official code: ``lim142857/Sparsifiner`` @ 9a11e26, ``src/main.py`` (strategy
``[['attn_recon', 0, 0, 5], ['cls_distill', 0, -5, 45]]``), ``src/losses.py`` (``NewLoss``),
``src/optim_factory.py``; ``docs/vision.md`` ("Sparsifiner's two-stage distillation"). Both
stages start from a pretrained dense DeiT; the teacher is that DeiT, frozen, in eval mode.

  stage 'recon' (attn_recon, 5 epochs): only the connectivity predictors train
    (``trainable='predictor'``); the attention runs in mode A (``recon_mode=True``: dense softmax,
    signed basis) and the loss is
      recon_weight * (1 / L) * sum_layers sum_{b,h,i,j} (A^ - A_teacher[:, :, 1:, :])^2
    (recon_weight 0.01, sum reduction: it scales with the batch). Because the backbone is frozen
    at the teacher's weights, A_teacher is the student's own dense attention (``unmasked_attn``,
    under stop_gradient; docs/vision.md), so the teacher is not run in this stage. Evaluation uses
    the model as configured (mode B), as the official validation pass does (docs/sparsifiner.md).
  stage 'distill' (cls_distill, 45 epochs): only the backbone trains (``trainable='backbone'``;
    the predictors are frozen and hold no optimizer state), attention in mode B, loss
      ce_weight * CE(student, mixup targets) + kl_weight * KL(teacher || student)
      + token_weight * MSE(student patch tokens, teacher patch tokens)
    with weights 1, 0.5, 0.5; KL at temperature ``temperature`` (1) summed over classes and
    divided by the batch ("batchmean", log-space targets, times T^2 as DeiT's soft distillation);
    the tokens are the final-normalised patch tokens (the output of the top-level module
    ``token_module``, 'norm', without the first ``num_prefix_tokens``), MSE averaged over all
    elements, or, when the student prunes tokens (it sows 'token_keep_mask'), over the kept
    tokens' elements only, as the official ``losses.py``. The loss terms are
    ``clustr_jax/losses.py``'s.

Freezing is an optax mask (``freeze``: ``optax.multi_transform`` with ``set_to_zero`` for the
frozen group); parameters belong to the predictor when their path contains
``predictor_pattern`` ('mask_predictor'). Model EMA (``model_ema``, timm ``ModelEma``, decay
0.9999 in the released config) is an optax transformation whose state holds the averaged
parameters, so it is checkpointed with the optimizer state; ``ema_params`` reads it back.

Config (``config.distill``, defaults in ``configs/default.py``): stage, trainable,
predictor_pattern, init_checkpoint (the student's initial parameters: an Orbax checkpoint of the
train loop or of ``clustr_jax.convert``; missing predictor parameters keep their initialisation),
init_rename (key substitutions, see ``merge_params``), teacher (None, or a ConfigDict with the
model ``name``, its options and ``checkpoint``), recon_weight, ce_weight, kl_weight, token_weight,
temperature, token_module, num_prefix_tokens. ``config.ema_decay`` (None: off) switches EMA on
for any run.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging

from clustr_jax import losses, models

STAGES = ("recon", "distill")
TRAINABLE = ("all", "predictor", "backbone")


# ---------------------------------------------------------------------------------------------
# Freezing and EMA (optax).
# ---------------------------------------------------------------------------------------------
def _path_names(path) -> list[str]:
  """Dict keys of a pytree path, without the ``.value`` attribute of nn.Partitioned boxes."""
  return [str(k.key) if isinstance(k, jax.tree_util.DictKey) else str(getattr(k, "name", k))
          for k in path if not isinstance(k, jax.tree_util.GetAttrKey)]


def param_labels(trainable: str, predictor_pattern: str = "mask_predictor"
                 ) -> Callable[[Any], Any]:
  """params -> the same tree of 'trainable' / 'frozen' labels.

  ``trainable``: 'all', 'predictor' (paths containing ``predictor_pattern``) or 'backbone' (all
  others).

  Raises:
    ValueError: unknown ``trainable``.
  """
  if trainable not in TRAINABLE:
    raise ValueError(f"config.distill.trainable={trainable!r} unknown; valid: "
                     f"{', '.join(TRAINABLE)}")

  def labels(params):
    def label(path, _):
      is_predictor = predictor_pattern in "/".join(_path_names(path))
      keep = trainable == "all" or (trainable == "predictor") == is_predictor
      return "trainable" if keep else "frozen"
    return jax.tree_util.tree_map_with_path(label, params)

  return labels


def freeze(tx: optax.GradientTransformation, trainable: str,
           predictor_pattern: str = "mask_predictor") -> optax.GradientTransformation:
  """``tx`` on the trainable parameters, zero updates (no state, no weight decay) on the rest."""
  if trainable == "all":
    return tx
  return optax.multi_transform({"trainable": tx, "frozen": optax.set_to_zero()},
                               param_labels(trainable, predictor_pattern))


class EmaState(NamedTuple):
  """The exponential moving average of the parameters after each update."""
  ema: Any


def model_ema(decay: float) -> optax.GradientTransformation:
  """timm ``ModelEma``: ema <- decay * ema + (1 - decay) * params after every step (ema starts
  as the initial params). Put last in a chain; updates pass through unchanged.

  Raises:
    ValueError: ``decay`` outside [0, 1).
  """
  if not 0 <= decay < 1:
    raise ValueError(f"config.ema_decay must be in [0, 1); got {decay}")

  def init(params):
    return EmaState(ema=jax.tree.map(jnp.asarray, params))

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("model_ema needs the params in tx.update(updates, state, params)")
    new = optax.apply_updates(params, updates)
    ema = jax.tree.map(lambda e, p: (decay * e + (1 - decay) * p).astype(e.dtype), state.ema, new)
    return updates, EmaState(ema=ema)

  return optax.GradientTransformation(init, update)


def ema_params(opt_state: Any) -> Any | None:
  """The averaged parameters held by ``model_ema`` in ``opt_state``, or None without EMA."""
  found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, EmaState))
           if isinstance(s, EmaState)]
  return found[0].ema if found else None


# ---------------------------------------------------------------------------------------------
# Checkpoints.
# ---------------------------------------------------------------------------------------------
def load_params(path: str | pathlib.Path) -> Any:
  """The parameters of an Orbax checkpoint as numpy arrays.

  ``path`` may be a train run's checkpoint root (``<workdir>/checkpoints``: the newest step), one
  step directory (``.../<step>``, its ``state`` item), or a checkpoint holding the parameters
  directly or under 'params' (e.g. written by ``clustr_jax.convert``).

  Raises:
    FileNotFoundError: ``path`` does not exist or holds no checkpoint (the message names it).
  """
  path = pathlib.Path(path).absolute()
  if not path.exists():
    raise FileNotFoundError(f"checkpoint {path} not found")
  steps = sorted((int(p.name), p) for p in path.iterdir() if p.is_dir() and p.name.isdigit())
  if steps:
    path = steps[-1][1]
  if (path / "state").is_dir():
    path = path / "state"
  try:
    tree = ocp.StandardCheckpointer().restore(path)
  except (FileNotFoundError, ValueError) as e:
    raise FileNotFoundError(f"no Orbax checkpoint readable at {path}: {e}") from e
  tree = tree.get("params", tree) if isinstance(tree, dict) else tree
  return jax.tree.map(np.asarray, tree)


def _without_boxes(tree: Any) -> Any:
  """``nn.unbox`` without its sharding constraint (which fails eagerly on abstract leaves under
  a mesh)."""
  boxed = lambda x: isinstance(x, nn.meta.AxisMetadata)  # noqa: E731
  return jax.tree.map(lambda x: x.value if boxed(x) else x, tree, is_leaf=boxed)


def merge_params(target: Any, source: Any, *, allow_missing: str | None = None,
                 rename: Mapping[str, str] | None = None) -> Any:
  """``target`` (the initialised tree) with every leaf that ``source`` has replaced by it.

  Args:
    target: initialised parameters (plain or boxed arrays, or ``jax.ShapeDtypeStruct``s).
    source: loaded parameters (plain nested dicts).
    allow_missing: leaves of ``target`` whose path contains this keep their initial value when
      ``source`` lacks them (e.g. 'mask_predictor' when loading a dense DeiT into Sparsifiner).
    rename: substring replacements applied to the '/'-joined source keys first, e.g.
      ``{'/attn/out/': '/attn/proj/'}`` from a dense DeiT (DenseAttention's output projection is
      'out') to Sparsifiner attention ('proj', the official name).

  Returns:
    The merged tree: loaded leaves as numpy arrays in the target's dtype, the others as they
    were.

  Raises:
    ValueError: listing the leaves ``source`` lacks (not allowed), the leaves it has that
      ``target`` does not, and the mis-shaped ones.
  """
  flat_source = {}
  for key, value in flax.traverse_util.flatten_dict(flax.core.unfreeze(source), sep="/").items():
    for old, new in (rename or {}).items():
      key = key.replace(old, new)
    flat_source[key] = value
  used, missing, misshaped = set(), [], []

  def take(path, leaf):
    key = "/".join(_path_names(path))
    if key not in flat_source:
      if not (allow_missing and allow_missing in key):
        missing.append(key)
      return leaf
    used.add(key)
    value = flat_source[key]
    if tuple(np.shape(value)) != tuple(leaf.shape):
      misshaped.append(f"{key}: checkpoint {np.shape(value)} vs model {tuple(leaf.shape)}")
      return leaf
    return np.asarray(value).astype(leaf.dtype)  # numpy: the train loop places it.

  merged = jax.tree_util.tree_map_with_path(take, _without_boxes(target))
  unexpected = sorted(set(flat_source) - used)
  if missing or unexpected or misshaped:
    raise ValueError(f"checkpoint does not match the model: missing {missing}, unexpected "
                     f"{unexpected}, mis-shaped {misshaped}")
  return merged


def params_from_checkpoint(params: Any, path: str | pathlib.Path, *,
                           prefix: str | None = None) -> Any:
  """``params`` with the subtree ``params[prefix]`` (the whole tree if ``prefix`` is None)
  loaded from the Orbax checkpoint ``path`` (``load_params``): e.g. a Semantic FPN's 'backbone'
  from an ImageNet ClusTR classifier (``config.init_checkpoint``, ``config.init_prefix``).

  Checkpoint leaves the subtree lacks (a classifier's 'head') are dropped and logged; every leaf
  of the subtree must be in the checkpoint with its shape. Leaves outside the subtree (the FPN)
  keep their initial values.

  Raises:
    FileNotFoundError: ``path`` holds no checkpoint.
    KeyError: ``prefix`` is not a top-level key of ``params`` (the message lists them).
    ValueError: leaves of the subtree missing from the checkpoint, or mis-shaped
      (``merge_params``).
  """
  params = flax.core.unfreeze(params)
  if prefix and prefix not in params:
    raise KeyError(f"config.init_prefix={prefix!r} is not a top-level parameter key; valid: "
                   f"{', '.join(sorted(params))}")
  target = params[prefix] if prefix else params
  flat_target = flax.traverse_util.flatten_dict(_without_boxes(target), sep="/")
  flat_source = flax.traverse_util.flatten_dict(
      flax.core.unfreeze(load_params(path)), sep="/")
  dropped = sorted(k for k in flat_source if k not in flat_target)
  if dropped:
    logging.info("Initial checkpoint %s: leaving out %d leaves the model lacks: %s", path,
                 len(dropped), ", ".join(dropped))
  kept = flax.traverse_util.unflatten_dict(
      {k: v for k, v in flat_source.items() if k in flat_target}, sep="/")
  merged = merge_params(target, kept)
  if not prefix:
    return merged
  return {**params, prefix: merged}


# ---------------------------------------------------------------------------------------------
# The stage objectives and their setup from the config.
# ---------------------------------------------------------------------------------------------
def _capture(token_module: str):
  return lambda module, method: method == "__call__" and module.scope.path == (token_module,)


@dataclasses.dataclass(frozen=True)
class Objective:
  """``(params, batch, rngs, teacher_params) -> (loss, (logits, metrics))`` of one stage, for
  ``train.train_step``. The weights and settings are ``config.distill``'s (documented with their
  defaults in ``configs/default.py``, ``distill_config``); ``teacher_model`` is only needed in
  stage 'distill'."""
  model: nn.Module
  stage: str
  input_keys: tuple[str, ...]
  recon_weight: float
  ce_weight: float
  kl_weight: float
  token_weight: float
  temperature: float
  token_module: str
  num_prefix_tokens: int
  teacher_model: nn.Module | None = None

  def __call__(self, params, batch, rngs, teacher_params=None):
    inputs = [batch[k] for k in self.input_keys]
    if self.stage == "recon":
      model = self.model.clone(
          attention_kwargs={**dict(self.model.attention_kwargs or {}), "recon_mode": True})
      logits, state = model.apply({"params": params}, *inputs, train=True, rngs=rngs,
                                  mutable=["intermediates"])
      ce = jnp.mean(losses.cross_entropy(logits, batch["targets"]))
      recon = losses.recon_loss(state["intermediates"])
      loss = self.recon_weight * recon + (self.ce_weight * ce if self.ce_weight else 0.0)
      return loss, (logits, {"recon_loss": recon, "cross_entropy": ce})
    capture = _capture(self.token_module)
    logits, state = self.model.apply({"params": params}, *inputs, train=True, rngs=rngs,
                                     capture_intermediates=capture, mutable=["intermediates"])
    teacher_logits, teacher_state = self.teacher_model.apply(
        {"params": teacher_params}, *inputs, train=False, capture_intermediates=capture,
        mutable=["intermediates"])
    teacher_logits = jax.lax.stop_gradient(teacher_logits)
    tokens = self._tokens(state["intermediates"])
    teacher_tokens = jax.lax.stop_gradient(self._tokens(teacher_state["intermediates"]))
    ce = jnp.mean(losses.cross_entropy(logits, batch["targets"]))
    kl = losses.kl_teacher_student(logits, teacher_logits, self.temperature)
    mse = losses.token_mse(tokens, teacher_tokens, self._kept(state["intermediates"]))
    loss = self.ce_weight * ce + self.kl_weight * kl + self.token_weight * mse
    return loss, (logits, {"cross_entropy": ce, "kl": kl, "token_mse": mse})

  def _kept(self, intermediates) -> jax.Array | None:
    """The student's final token keep mask [B, T] (a token-pruning model sows
    'token_keep_mask' [B, N]), without the prefix tokens; None without pruning."""
    if "token_keep_mask" not in intermediates:
      return None
    return intermediates["token_keep_mask"][0][:, self.num_prefix_tokens:]

  def _tokens(self, intermediates) -> jax.Array:
    if self.token_module not in intermediates:
      raise ValueError(f"config.distill.token_module={self.token_module!r}: the model has no "
                       f"top-level module of that name (has {sorted(intermediates)})")
    return intermediates[self.token_module]["__call__"][0][:, self.num_prefix_tokens:]


@dataclasses.dataclass
class Distillation:
  """What ``train.train_and_evaluate`` needs for a distillation stage (built by ``setup``)."""
  objective: Objective
  wrap_optimizer: Callable[[optax.GradientTransformation], optax.GradientTransformation]
  init_checkpoint: str | None
  predictor_pattern: str
  init_rename: Mapping[str, str] | None = None
  teacher_params: Any = None

  def initial_params(self, params: Any) -> Any:
    """The student's starting parameters: ``params`` with the init checkpoint's leaves loaded
    (predictor leaves may be absent from it); ``params`` unchanged without a checkpoint."""
    if not self.init_checkpoint:
      return params
    logging.info("Initialising the student from %s", self.init_checkpoint)
    return merge_params(params, load_params(self.init_checkpoint),
                        allow_missing=self.predictor_pattern, rename=self.init_rename)


def setup(config: ml_collections.ConfigDict, model: nn.Module, dataset) -> Distillation:
  """The stage described by ``config.distill`` for ``model`` on ``dataset`` (a
  ``clustr_jax.data.Dataset``: its input keys, example spec and model defaults).

  Loads the teacher's parameters (numpy, placed by the train loop) for stage 'distill'.

  Raises:
    ValueError: unknown stage / trainable, stage 'distill' without ``teacher.checkpoint``, or a
      teacher checkpoint that does not match the teacher model (listing the keys).
    FileNotFoundError: a checkpoint path that does not exist.
  """
  d = config.distill
  if d.stage not in STAGES:
    raise ValueError(f"config.distill.stage={d.stage!r} unknown; valid: {', '.join(STAGES)}")
  teacher_model = teacher_params = None
  if d.stage == "distill":
    teacher = d.teacher
    if teacher is None or not teacher.get("checkpoint"):
      raise ValueError("config.distill.stage='distill' needs config.distill.teacher with a "
                       "model name and its checkpoint")
    teacher_model = models.from_config(
        {k: v for k, v in teacher.to_dict().items() if k != "checkpoint"},
        dict(dataset.model_kwargs))
    sample = tuple(jax.ShapeDtypeStruct((1, *dataset.example_spec[k][0]),
                                        dataset.example_spec[k][1]) for k in dataset.input_keys)
    abstract = jax.eval_shape(lambda *x: teacher_model.init(
        {"params": jax.random.key(0), "dropout": jax.random.key(0)}, *x, train=False), *sample)
    teacher_params = merge_params(abstract["params"], load_params(teacher.checkpoint))
  trainable, pattern = d.trainable, d.predictor_pattern
  param_labels(trainable, pattern)  # Validates ``trainable`` now.
  objective = Objective(
      model=model, stage=d.stage, input_keys=tuple(dataset.input_keys),
      recon_weight=d.recon_weight, ce_weight=d.ce_weight, kl_weight=d.kl_weight,
      token_weight=d.token_weight, temperature=d.temperature, token_module=d.token_module,
      num_prefix_tokens=d.num_prefix_tokens, teacher_model=teacher_model)
  return Distillation(objective=objective,
                      wrap_optimizer=lambda tx: freeze(tx, trainable, pattern),
                      init_checkpoint=d.init_checkpoint, predictor_pattern=pattern,
                      init_rename=dict(d.init_rename or {}), teacher_params=teacher_params)

