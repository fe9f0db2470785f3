"""One training loop for every model and task, read top to bottom.

``train_and_evaluate(config, workdir)``:
  mesh -> data -> model + optimizer -> sharded state -> restore -> step loop (log, eval, save)
  -> test -> ``results.json``.

Everything it needs comes from ``config`` (an ``ml_collections.ConfigDict``, see
``configs/lra/listops.py`` for every key); nothing below reads flags or global state. The data
come from ``clustr_jax.data.get(config, workdir)`` (a ``Dataset``: train iterator, eval batches,
the model's input keys and data-given model defaults), so any dataset family plugs in there. Targets
are class ids [batch] or target distributions [batch, classes]. The step is
``jax.jit`` with input/output shardings over a ('data', 'fsdp', 'model') mesh and a donated state;
each process feeds its own shard of the batch (``jax.make_array_from_process_local_data``).
Outputs in ``workdir``: ``checkpoints/`` (Orbax), ``metrics.jsonl``, ``tensorboard/``,
``results.json``.
"""

from __future__ import annotations

import functools
import json
import pathlib
import time
from typing import Any, Iterator

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from tqdm import tqdm

from clustr_jax import checkpointing
from clustr_jax import metrics as metrics_lib
from clustr_jax import models
from clustr_jax import optim
from clustr_jax import sharding
from clustr_jax import data as data_lib

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@flax.struct.dataclass
class TrainState:
  """Everything a step changes: the step count, parameters and optimizer state (a pytree).

  Dropout randomness is ``fold_in(key(config.seed), step)``, so it needs no state of its own and
  a resumed run draws exactly the masks an uninterrupted run draws.
  """
  step: jax.Array
  params: Any
  opt_state: Any


# ---------------------------------------------------------------------------------------------
# Data.
# ---------------------------------------------------------------------------------------------
def global_batch(local: dict[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
  """This process's batch shard (numpy) -> global arrays sharded on the batch axis."""
  batch_sharding = sharding.batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(batch_sharding, v) for k, v in local.items()}


# ---------------------------------------------------------------------------------------------
# Model, state and steps.
# ---------------------------------------------------------------------------------------------
def create_model(config: ml_collections.ConfigDict, model_kwargs: dict[str, Any]) -> nn.Module:
  """The model of ``config.model`` (its ``name`` plus constructor options) for the dataset.

  ``model_kwargs`` (``Dataset.model_kwargs``: e.g. vocab_size, num_classes, max_length) fill in
  what ``config.model`` leaves unset.
  """
  kwargs = config.model.to_dict()
  name = kwargs.pop("name")
  kwargs["dtype"] = DTYPES[kwargs.get("dtype", "float32")]
  for key, value in model_kwargs.items():
    kwargs.setdefault(key, value)
  return models.get(name, **kwargs)


def create_train_state(model: nn.Module, tx: optax.GradientTransformation, rng: jax.Array,
                       *sample_inputs: jax.Array) -> TrainState:
  """Initial state with logically partitioned (boxed) parameters and optimizer state.

  ``sample_inputs`` are the model's positional inputs (``Dataset.input_keys``) for one batch.
  """
  params = model.init({"params": rng, "dropout": rng}, *sample_inputs, train=False)["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


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


def train_step(state: TrainState, batch: dict[str, jax.Array], teacher_params: Any = None, *,
               model: nn.Module, tx: optax.GradientTransformation, schedule: optax.Schedule,
               rng: jax.Array, input_keys: tuple[str, ...] = ("inputs",), objective=None
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer update on ``batch`` (``input_keys`` and 'targets'); returns (state, metrics).

  ``objective`` (e.g. ``distill.Objective``) replaces the cross-entropy loss:
  ``objective(params, batch, rngs, teacher_params) -> (loss, (logits, extra metrics))``.
  """
  step_rng = jax.random.fold_in(rng, state.step)
  dropout_rng, clustering_rng = jax.random.split(step_rng)
  rngs = {"dropout": dropout_rng, "clustering": clustering_rng}

  def loss_fn(params):
    if objective is not None:
      return objective(params, batch, rngs, teacher_params)
    logits = model.apply({"params": params}, *(batch[k] for k in input_keys), train=True,
                         rngs=rngs)
    return cross_entropy(logits, batch["targets"]).mean(), (logits, {})

  (loss, (logits, extra)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {
      "loss": loss,
      "accuracy": jnp.mean(correct(logits, batch["targets"])),
      "learning_rate": schedule(state.step),
      "grad_norm": optax.tree.norm(grads),
      **extra,
  }
  return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params: Any, batch: dict[str, jax.Array], *, model: nn.Module,
              input_keys: tuple[str, ...] = ("inputs",)) -> dict[str, jax.Array]:
  """Sums over a padded eval batch (``input_keys``, 'targets', 'weights'): loss, correct, count."""
  logits = model.apply({"params": params}, *(batch[k] for k in input_keys), train=False)
  weights = batch["weights"]
  return {"loss": jnp.sum(cross_entropy(logits, batch["targets"]) * weights),
          "correct": jnp.sum(correct(logits, batch["targets"]) * weights),
          "count": jnp.sum(weights)}


def evaluate(step_fn, params: Any, dataset: data_lib.Dataset, split: str, *, batch_size: int,
             mesh: jax.sharding.Mesh) -> dict[str, float]:
  """Loss and accuracy over a whole split (every example exactly once)."""
  totals = None
  for local in dataset.eval_batches(split, batch_size=batch_size,
                                    shard_index=jax.process_index(),
                                    shard_count=jax.process_count()):
    sums = step_fn(params, global_batch(local, mesh))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.device_get(totals)
  count = max(float(totals["count"]), 1.0)
  return {"loss": float(totals["loss"]) / count, "accuracy": float(totals["correct"]) / count,
          "num_examples": float(totals["count"])}


def validate_config(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> None:
  """Checks the config against the mesh and itself; raises ValueError naming the key."""
  dp = sharding.data_parallel_size(mesh)
  for key in ("batch_size", "eval_batch_size"):
    value = config[key]
    if value < 1 or value % dp:
      raise ValueError(f"config.{key}={value} must be a positive multiple of the data-parallel "
                       f"size data*fsdp={dp}")
    if value % jax.process_count():
      raise ValueError(f"config.{key}={value} must be divisible by the number of processes "
                       f"({jax.process_count()})")
  for key in ("num_train_steps", "log_every_steps", "eval_every_steps", "checkpoint_every_steps"):
    if config[key] < 1:
      raise ValueError(f"config.{key} must be >= 1; got {config[key]}")
  if config.model.get("dtype", "float32") not in DTYPES:
    raise ValueError(f"config.model.dtype={config.model.dtype!r} unknown; valid: "
                     f"{', '.join(DTYPES)}")


# ---------------------------------------------------------------------------------------------
# The loop.
# ---------------------------------------------------------------------------------------------
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict:
  """Trains ``config`` in ``workdir`` (resuming from its latest checkpoint) and tests at the end.

  Returns the contents of ``<workdir>/results.json``: test and final validation metrics, the
  config, steps, parameter count, wall time and training throughput.
  """
  start_time = time.time()
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)

  # Mesh.
  mesh = sharding.create_mesh(**config.mesh.to_dict())
  validate_config(config, mesh)
  logging.info("Mesh %s over %d devices (%d processes)", dict(mesh.shape), mesh.size,
               jax.process_count())

  # Data.
  dataset = data_lib.get(config, workdir)
  local_batch_size = config.batch_size // jax.process_count()
  train_iter = dataset.train_iterator(
      batch_size=local_batch_size, seed=config.seed, shard_index=jax.process_index(),
      shard_count=jax.process_count(), worker_count=config.get("data_workers", 0))
  input_keys = tuple(dataset.input_keys)

  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
    # Model and optimizer.
    model = create_model(config, dict(dataset.model_kwargs))
    tx, schedule = optim.create_optimizer(config)
    # Distillation stages and model EMA (clustr_jax/distill.py): a loss, frozen parameters, a
    # teacher, an initial checkpoint; EMA averages the parameters inside the optimizer state.
    distillation = None
    if config.get("distill") or config.get("ema_decay"):
      from clustr_jax import distill  # pylint: disable=g-import-not-at-top  (imports train)
      if config.get("distill"):
        distillation = distill.setup(config, model, dataset)
        tx = distillation.wrap_optimizer(tx)
      if config.get("ema_decay"):
        tx = optax.chain(tx, distill.model_ema(config.ema_decay))
    rng = jax.random.key(config.seed)
    init_rng, step_rng = jax.random.split(rng)
    sample = tuple(jnp.zeros((config.batch_size, *shape), dtype)
                   for shape, dtype in (dataset.example_spec[k] for k in input_keys))

    # Sharded state: shardings from the logical axis names of the boxed abstract state.
    init_fn = functools.partial(create_train_state, model, tx)
    abstract_boxed = jax.eval_shape(init_fn, init_rng, *sample)
    state_sharding = sharding.logical_to_sharding(abstract_boxed, mesh)
    state = jax.jit(lambda r, *x: nn.unbox(init_fn(r, *x)), out_shardings=state_sharding)(
        init_rng, *sample)
    if distillation is not None and distillation.init_checkpoint:
      params = jax.device_put(distillation.initial_params(state.params), state_sharding.params)
      state = state.replace(params=params, opt_state=jax.jit(
          tx.init, out_shardings=state_sharding.opt_state)(params))
    teacher, teacher_sharding = None, None
    if distillation is not None and distillation.teacher_params is not None:
      teacher_sharding = jax.tree.map(lambda _: sharding.replicated(mesh),
                                      distillation.teacher_params)
      teacher = jax.device_put(distillation.teacher_params, teacher_sharding)
    num_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.params))
    logging.info("Model %s with attention %r: %d parameters", config.model.name,
                 config.model.get("attention"), num_params)

    # Restore.
    ckpt = checkpointing.Checkpointer(
        workdir / "checkpoints", save_every_steps=config.checkpoint_every_steps,
        max_to_keep=config.max_checkpoints_to_keep)
    restored = ckpt.restore(checkpointing.abstract_like(state), train_iter)
    if restored is not None:
      state, start_step = restored
      logging.info("Resumed from step %d", start_step)
    else:
      start_step = 0

    # Steps.
    batch_in = sharding.batch_sharding(mesh)
    p_train_step = jax.jit(
        functools.partial(train_step, model=model, tx=tx, schedule=schedule, rng=step_rng,
                          input_keys=input_keys,
                          objective=distillation.objective if distillation else None),
        in_shardings=(state_sharding, batch_in, teacher_sharding),
        out_shardings=(state_sharding, sharding.replicated(mesh)), donate_argnums=0)
    p_eval_step = jax.jit(functools.partial(eval_step, model=model, input_keys=input_keys),
                          in_shardings=(state_sharding.params, batch_in),
                          out_shardings=sharding.replicated(mesh))
    run_eval = functools.partial(evaluate, p_eval_step, dataset=dataset,
                                 batch_size=config.eval_batch_size, mesh=mesh)

    writer = metrics_lib.MetricWriter(workdir)
    val_metrics: dict[str, float] = {}
    pending: list[dict[str, jax.Array]] = []
    # Throughput excludes the first step of this invocation (compilation), eval and saving.
    timer_start, excluded_time = None, 0.0
    progress = tqdm(total=config.num_train_steps, initial=start_step, unit="step",
                    desc="train", dynamic_ncols=True, disable=jax.process_index() != 0)
    try:
      for step in range(start_step + 1, config.num_train_steps + 1):
        batch = global_batch(next(train_iter), mesh)
        state, step_metrics = p_train_step(state, batch, teacher)
        pending.append(step_metrics)
        if timer_start is None:
          jax.block_until_ready(state)
          timer_start = time.time()
        if step % config.log_every_steps == 0 or step == config.num_train_steps:
          summary = jax.tree.map(lambda *x: float(np.mean(x)), *jax.device_get(pending))
          pending = []
          progress.set_postfix(loss=f"{summary['loss']:.4f}", acc=f"{summary['accuracy']:.3f}")
          writer.write(step, "train", summary)
        progress.update(1)
        t0 = time.time()
        if step % config.eval_every_steps == 0 or step == config.num_train_steps:
          val_metrics = run_eval(state.params, split="val")
          writer.write(step, "val", val_metrics)
        ckpt.save(step, state, train_iter, force=step == config.num_train_steps)
        excluded_time += time.time() - t0
      jax.block_until_ready(state)
      timed_steps = config.num_train_steps - start_step - 1
      train_time = time.time() - timer_start - excluded_time if timer_start else 0.0
    finally:
      progress.close()
      ckpt.close()

    # Test.
    final_step = int(jax.device_get(state.step))
    if not val_metrics:
      val_metrics = run_eval(state.params, split="val")
    test_metrics = run_eval(state.params, split="test")
    writer.write(final_step, "test", test_metrics)
    ema_metrics = {}
    if config.get("ema_decay"):
      ema = distill.ema_params(state.opt_state)
      ema_metrics = {"val_ema": run_eval(ema, split="val"), "test_ema": run_eval(ema, split="test")}
      writer.write(final_step, "test_ema", ema_metrics["test_ema"])
    writer.close()

  results = {
      "test": test_metrics,
      "val": val_metrics,
      **ema_metrics,
      "step": final_step,
      "num_train_steps": config.num_train_steps,
      "num_params": num_params,
      "train_steps_per_s": timed_steps / train_time if timed_steps > 0 else None,
      "wall_time_s": time.time() - start_time,
      "resumed_from_step": start_step,
      "config": config.to_dict(),
  }
  if jax.process_index() == 0:
    (workdir / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
  logging.info("Test accuracy %.4f (loss %.4f) after %d steps", test_metrics["accuracy"],
               test_metrics["loss"], final_step)
  return results
