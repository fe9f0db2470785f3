"""One training loop for every model and task, read top to bottom.

``train_and_evaluate(config, workdir)``:
  mesh -> validate -> data -> model + optimizer -> sharded state -> restore
  -> step loop (log with MFU, check finiteness, eval, save, preemption) -> test -> ``results.json``.

Everything it needs comes from ``config`` (an ``ml_collections.ConfigDict`` built from the base
config ``configs/default.py``, which documents every key; see ``configs/lra/listops.py``);
nothing below reads flags or global state. The data come from
``clustr_jax.data.get(config, workdir)`` (a ``Dataset``: train iterator, eval batches, the model's
input keys and data-given model defaults), so any dataset family plugs in there. Targets are class
ids [batch] or target distributions [batch, classes]; a dataset whose ``task`` is 'segmentation'
has per-pixel labels [batch, height, width] instead, trained with the per-pixel cross-entropy and
evaluated by a confusion matrix (mIoU; ``losses.eval_sums`` / ``eval_metrics``).
``config.init_checkpoint`` initialises the parameters (under ``config.init_prefix``) from an
Orbax checkpoint, e.g. a segmentation backbone from an ImageNet classifier. The step is
``jax.jit`` with input/output shardings over a ('data', 'fsdp', 'model') mesh and a donated
state, compiled ahead of time on the first batch (XLA's FLOP count feeds the MFU estimate); each
process feeds its own shard of the batch (``jax.make_array_from_process_local_data``).
``grad_accum_steps`` splits the batch into micro-batches accumulated by ``optax.MultiSteps``; a
non-finite loss or gradient stops the run before any later checkpoint (or is skipped and
counted); SIGTERM saves and returns.
Outputs in ``workdir``: ``checkpoints/`` (Orbax), ``metrics.jsonl``, ``tensorboard/``,
``profile/`` (if tracing), ``results.json``.
"""

from __future__ import annotations

import functools
import json
import pathlib
import time
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from tqdm import tqdm

from clustr_jax import attention as attention_lib
from clustr_jax import checkpointing, distill, losses, models, optim, profiling, sharding
from clustr_jax import data as data_lib
from clustr_jax import metrics as metrics_lib

#: ``config.on_nonfinite`` values.
NONFINITE_POLICIES = ("stop", "skip")


@flax.struct.dataclass
class TrainState:
  """Everything a step changes: the step count, parameters, optimizer state (pytrees) and the
  number of updates skipped for a non-finite loss or gradient (``on_nonfinite='skip'``).

  Dropout randomness is ``fold_in(key(config.seed), step)``, so it needs no state of its own and
  a resumed run draws exactly the masks an uninterrupted run draws.
  """
  step: jax.Array
  params: Any
  opt_state: Any
  nonfinite_steps: jax.Array


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
def create_train_state(model: nn.Module, tx: optax.GradientTransformation, rng: jax.Array,
                       *sample_inputs: jax.Array) -> TrainState:
  """Initial state with logically partitioned (boxed) parameters and optimizer state.

  ``sample_inputs`` are the model's positional inputs (``Dataset.input_keys``) for one batch.
  """
  params = model.init({"params": rng, "dropout": rng}, *sample_inputs, train=False)["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    nonfinite_steps=jnp.zeros((), jnp.int32))


def init_sharded_state(model: nn.Module, tx: optax.GradientTransformation, rng: jax.Array,
                       mesh: jax.sharding.Mesh, *sample_inputs: jax.Array
                       ) -> tuple[TrainState, Any, Any]:
  """The initial state, placed on ``mesh`` by the logical axis rules of its parameters.

  Call inside ``jax.set_mesh(mesh)`` and ``nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES)``.

  Returns:
    (state, its tree of ``NamedSharding``, the boxed abstract state with the logical names).

  Raises:
    ValueError: a sharded parameter dimension that the mesh does not divide
      (``sharding.check_divisible``, naming the parameter and the ``config.mesh`` key).
  """
  init_fn = functools.partial(create_train_state, model, tx)
  boxed = jax.eval_shape(init_fn, rng, *sample_inputs)
  state_sharding = sharding.logical_to_sharding(boxed, mesh)
  sharding.check_divisible(boxed, state_sharding)
  state = jax.jit(lambda r, *x: nn.unbox(init_fn(r, *x)), out_shardings=state_sharding)(
      rng, *sample_inputs)
  return state, state_sharding, boxed


def jit_train_step(state_sharding: Any, mesh: jax.sharding.Mesh, *, donate: bool = True,
                   teacher_sharding: Any = None, **step_kwargs: Any):
  """``train_step`` with ``step_kwargs`` bound, jitted with the state's shardings, the batch
  sharded over ('data', 'fsdp'), replicated metrics and (``donate``) a donated state.

  Called as ``(state, batch)``, or as ``(state, batch, teacher_params)`` when
  ``teacher_sharding`` (the teacher parameters' shardings) is given.
  """
  in_shardings = (state_sharding, sharding.batch_sharding(mesh))
  if teacher_sharding is not None:
    in_shardings += (teacher_sharding,)
  return jax.jit(functools.partial(train_step, **step_kwargs), in_shardings=in_shardings,
                 out_shardings=(state_sharding, sharding.replicated(mesh)),
                 donate_argnums=0 if donate else ())


def split_micro_batches(batch: dict[str, jax.Array], num: int) -> dict[str, jax.Array]:
  """[batch, ...] -> [num, batch / num, ...]: micro-batch i holds rows i, i + num, i + 2 num, ...

  Strided rows keep every micro-batch spread over all data-parallel shards (each device holds
  its own rows of every micro-batch), so no data moves between devices.
  """
  def split(x):
    x = x.reshape(x.shape[0] // num, num, *x.shape[1:]).swapaxes(0, 1)
    return nn.with_logical_constraint(x, (None, "batch") + (None,) * (x.ndim - 2))
  return jax.tree.map(split, batch)


def train_step(state: TrainState, batch: dict[str, jax.Array], teacher_params: Any = None, *,
               model: nn.Module, tx: optax.GradientTransformation, schedule: optax.Schedule,
               rng: jax.Array, input_keys: tuple[str, ...] = ("inputs",),
               grad_accum_steps: int = 1, skip_nonfinite: bool = False,
               objective=None, task: str = "classification"
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer update on ``batch`` (``input_keys`` and 'targets'); returns (state, metrics).

  Args:
    state: the current ``TrainState``.
    batch: ``{key: [batch, ...]}``; 'targets' int [batch] or float [batch, classes].
    model, tx, schedule: the model, optimizer (``optim.create_optimizer``) and its schedule.
    rng: the run's step key; this step uses ``fold_in(rng, state.step)``.
    input_keys: the model's positional inputs.
    grad_accum_steps: k > 1 splits the batch into k micro-batches (``split_micro_batches``;
      batch must be divisible by k), runs them one after another (``lax.scan``, so activations
      of one micro-batch at a time) through ``tx``, which must then be an ``optax.MultiSteps``
      with the same k: it averages the k gradients and applies them once.
    skip_nonfinite: leave parameters and optimizer state unchanged when the loss or gradient
      norm is not finite (the step count still advances).
    teacher_params, objective: an objective (``distill.Objective``) replaces the cross-entropy:
      ``objective(params, batch, rngs, teacher_params) -> (loss, (logits, extra metrics))``;
      the extra metrics (float32 scalars) join the returned metrics.
    task: the dataset's task (``losses.TASKS``): the loss and accuracy (``losses.task_loss``,
      ``losses.task_accuracy``; 'segmentation': means over the labelled pixels).

  Returns:
    (new state, metrics): float32 scalars 'loss' and 'accuracy' (means over the batch),
    'learning_rate' (of this update), 'grad_norm' (global norm of the averaged gradient, before
    clipping), 'nonfinite' (1.0 if this update's loss or gradient was not finite), int32
    'nonfinite_steps' (the run's count), and the scalars the model sows into its 'metrics'
    collection (``sown_metrics``; e.g. CAST's coverage).
  """
  step_rng = jax.random.fold_in(rng, state.step)

  def micro_step(micro_batch, micro_rng):
    def loss_fn(params):
      dropout_rng, clustering_rng = jax.random.split(micro_rng)
      rngs = {"dropout": dropout_rng, "clustering": clustering_rng}
      if objective is not None:
        return objective(params, micro_batch, rngs, teacher_params)
      logits, sown = model.apply({"params": params}, *(micro_batch[k] for k in input_keys),
                                 train=True, rngs=rngs, mutable=["metrics"])
      loss = losses.task_loss(task, logits, micro_batch["targets"])
      return loss, (logits, sown_metrics(sown))
    (loss, (logits, extra)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return (loss, losses.task_accuracy(task, logits, micro_batch["targets"]), extra), grads

  opt_state = state.opt_state
  if grad_accum_steps == 1:
    (loss, accuracy, extra), grads = micro_step(batch, step_rng)
    mean_grads = grads
  else:
    k = grad_accum_steps
    micro = split_micro_batches(batch, k)

    def accumulate(opt_state, inputs):
      micro_batch, i = inputs
      values, grads = micro_step(micro_batch, jax.random.fold_in(step_rng, i))
      _, opt_state = tx.update(grads, opt_state, state.params)  # MultiSteps: zero updates.
      return opt_state, values

    opt_state, (micro_losses, accuracies, extras) = jax.lax.scan(
        accumulate, opt_state, (jax.tree.map(lambda x: x[:-1], micro), jnp.arange(k - 1)))
    (loss, accuracy, extra), grads = micro_step(jax.tree.map(lambda x: x[-1], micro),
                                                jax.random.fold_in(step_rng, k - 1))
    extra = jax.tree.map(lambda s, x: (jnp.sum(s) + x) / k, extras, extra)
    # The average MultiSteps is about to apply: its running mean of k - 1, plus the last.
    mean_grads = jax.tree.map(lambda g, a: a + (g - a) / k, grads, opt_state.acc_grads)
    loss = (jnp.sum(micro_losses) + loss) / k
    accuracy = (jnp.sum(accuracies) + accuracy) / k
  updates, opt_state = tx.update(grads, opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  grad_norm = optax.tree.norm(mean_grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  if skip_nonfinite:
    keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
    params = jax.tree.map(keep, params, state.params)
    opt_state = jax.tree.map(keep, opt_state, state.opt_state)
  nonfinite_steps = state.nonfinite_steps + jnp.logical_not(finite).astype(jnp.int32)
  metrics = {
      "loss": loss,
      "accuracy": accuracy,
      "learning_rate": schedule(state.step),
      "grad_norm": grad_norm,
      "nonfinite": jnp.logical_not(finite).astype(jnp.float32),
      "nonfinite_steps": nonfinite_steps,
      **extra,
  }
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                       nonfinite_steps=nonfinite_steps), metrics


def sown_metrics(variables: Any) -> dict[str, jax.Array]:
  """The scalars modules sow into the 'metrics' collection (``self.sow('metrics', name, x)``,
  e.g. CAST's 'uncovered_fraction' and 'overlap_fraction'), each name averaged over every module
  and call that sowed it (so over the layers): ``{name: float32 scalar}``; {} when none."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables.get("metrics", {})))
  values: dict[str, list[jax.Array]] = {}
  for path, sown in flat.items():
    values.setdefault(path[-1], []).extend(jnp.asarray(x, jnp.float32) for x in sown)
  return {name: jnp.mean(jnp.stack(xs)) for name, xs in sorted(values.items())}


def eval_step(params: Any, batch: dict[str, jax.Array], *, model: nn.Module,
              input_keys: tuple[str, ...] = ("inputs",), task: str = "classification"
              ) -> dict[str, jax.Array]:
  """Sums over a padded eval batch (``input_keys``, 'targets', 'weights'),
  ``losses.eval_sums``: loss, correct, count (classification); loss, labelled pixels and the
  confusion matrix (segmentation). Summed over the global batch, i.e. over all processes."""
  logits = model.apply({"params": params}, *(batch[k] for k in input_keys), train=False)
  return losses.eval_sums(task, logits, batch["targets"], batch["weights"])


def evaluate(step_fn, params: Any, dataset: data_lib.Dataset, split: str, *, batch_size: int,
             mesh: jax.sharding.Mesh, task: str = "classification") -> dict[str, float]:
  """A whole split's metrics (every example, every pixel exactly once): loss and accuracy, or
  for segmentation mIoU, mean and pixel accuracy (``losses.eval_metrics``)."""
  totals = None
  for local in dataset.eval_batches(split, batch_size=batch_size,
                                    shard_index=jax.process_index(),
                                    shard_count=jax.process_count()):
    sums = step_fn(params, global_batch(local, mesh))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  return losses.eval_metrics(task, jax.device_get(totals))


def validate_config(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> None:
  """Checks the config against the mesh and itself.

  Raises:
    ValueError: naming the key: unknown model or attention name (with the valid choices), batch
      sizes not divisible by the data-parallel size (times ``grad_accum_steps``) or the process
      count, non-positive intervals, unknown ``on_nonfinite``, heads that do not divide
      ``qkv_dim``, two initial checkpoints (``init_checkpoint`` and ``distill.init_checkpoint``).
  """
  if config.model.name not in models.names():
    raise ValueError(f"config.model.name={config.model.name!r} unknown; valid: "
                     f"{', '.join(models.names())}")
  if "attention" in config.model and config.model.attention not in attention_lib.names():
    raise ValueError(f"config.model.attention={config.model.attention!r} unknown; valid: "
                     f"{', '.join(attention_lib.names())}")
  heads, qkv = config.model.get("num_heads"), config.model.get("qkv_dim")
  if heads and qkv and qkv % heads:
    raise ValueError(f"config.model.qkv_dim={qkv} must be divisible by "
                     f"config.model.num_heads={heads}")
  accum = config.grad_accum_steps
  if not isinstance(accum, int) or accum < 1:
    raise ValueError(f"config.grad_accum_steps must be an int >= 1; got {accum!r}")
  dp = sharding.data_parallel_size(mesh)
  for key, multiple in (("batch_size", accum), ("eval_batch_size", 1)):
    value = config[key]
    if value < 1 or value % (dp * multiple):
      raise ValueError(
          f"config.{key}={value} must be a positive multiple of the data-parallel size "
          f"data*fsdp={dp}" + (f" times config.grad_accum_steps={accum}" if multiple > 1 else ""))
    if value % jax.process_count():
      raise ValueError(f"config.{key}={value} must be divisible by the number of processes "
                       f"({jax.process_count()})")
  for key in ("num_train_steps", "log_every_steps", "eval_every_steps", "checkpoint_every_steps"):
    if config[key] < 1:
      raise ValueError(f"config.{key} must be >= 1; got {config[key]}")
  if config.init_checkpoint and config.distill and config.distill.init_checkpoint:
    raise ValueError("config.init_checkpoint and config.distill.init_checkpoint are both set; "
                     "give the initial checkpoint once")
  if config.on_nonfinite not in NONFINITE_POLICIES:
    raise ValueError(f"config.on_nonfinite={config.on_nonfinite!r} unknown; valid: "
                     f"{', '.join(NONFINITE_POLICIES)}")
  if config.max_nonfinite_steps < 0:
    raise ValueError(f"config.max_nonfinite_steps must be >= 0; got {config.max_nonfinite_steps}")


def check_finite(records: list[tuple[int, dict[str, float]]], config: ml_collections.ConfigDict,
                 ckpt: checkpointing.Checkpointer) -> None:
  """Stops the run on non-finite steps among ``records`` ((step, metrics) in step order).

  With ``on_nonfinite='stop'`` the first such step raises; with 'skip' each is logged, and the run
  stops once more than ``max_nonfinite_steps`` were skipped. Called before every checkpoint, so
  none is written after a step that stops the run.

  Raises:
    FloatingPointError: giving the step, its loss and gradient norm, and the last checkpoint.
  """
  for step, values in records:
    if not values["nonfinite"]:
      continue
    where = (f"loss={values['loss']}, grad_norm={values['grad_norm']} at step {step}; the last "
             f"good checkpoint is step {ckpt.latest_step()} in {ckpt.directory}")
    if config.on_nonfinite == "stop":
      raise FloatingPointError(f"non-finite {where} (config.on_nonfinite='skip' skips such "
                               f"updates)")
    logging.warning("Skipped the update of step %d: non-finite loss=%s, grad_norm=%s (%d skipped "
                    "so far)", step, values["loss"], values["grad_norm"],
                    values["nonfinite_steps"])
    if values["nonfinite_steps"] > config.max_nonfinite_steps:
      raise FloatingPointError(
          f"{int(values['nonfinite_steps'])} updates skipped, more than "
          f"config.max_nonfinite_steps={config.max_nonfinite_steps}: non-finite {where}")


def summarize(records: list[tuple[int, dict[str, float]]]) -> dict[str, float]:
  """Means over the finite steps of a log interval; the run's skipped-step count at its end."""
  finite = [values for _, values in records if not values["nonfinite"]] or [records[-1][1]]
  summary = {k: float(np.mean([v[k] for v in finite]))
             for k in finite[0] if k not in ("nonfinite", "nonfinite_steps")}
  summary["nonfinite_steps"] = float(records[-1][1]["nonfinite_steps"])
  return summary


# ---------------------------------------------------------------------------------------------
# The loop.
# ---------------------------------------------------------------------------------------------
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict:
  """Trains ``config`` in ``workdir`` (resuming from its latest checkpoint) and tests at the end.

  ``config`` holds every key of ``configs/default.py`` (config files start from it).

  Returns:
    The contents of ``<workdir>/results.json``: test and final validation metrics, the config,
    steps, parameter count, wall time and training throughput. A run stopped by SIGTERM (or a
    multi-host preemption notice) saves a checkpoint and returns ``{'preempted': True, 'step':
    ...}`` without testing or writing results.json.

  Raises:
    ValueError: a bad config (the message names the key), see ``validate_config``.
    FloatingPointError: a non-finite loss or gradient (``check_finite``).
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
      shard_count=jax.process_count(), worker_count=config.data_workers)
  input_keys = tuple(dataset.input_keys)
  task = getattr(dataset, "task", "classification")  # Dataset.task; classification by default.

  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
    # Model and optimizer.
    model = models.from_config(config.model, dataset.model_kwargs)
    # Distillation stages and model EMA (clustr_jax/distill.py): a loss, frozen parameters, a
    # teacher, an initial checkpoint; EMA averages the parameters inside the optimizer state.
    distillation, wrappers = None, []
    if config.distill:
      distillation = distill.setup(config, model, dataset)
      wrappers.append(distillation.wrap_optimizer)
    if config.ema_decay:
      wrappers.append(lambda tx: optax.chain(tx, distill.model_ema(config.ema_decay)))
    tx, schedule = optim.create_optimizer(
        config, wrap=lambda tx: functools.reduce(lambda t, w: w(t), wrappers, tx))
    rng = jax.random.key(config.seed)
    init_rng, step_rng = jax.random.split(rng)
    sample = tuple(jnp.zeros((config.batch_size, *shape), dtype)
                   for shape, dtype in (dataset.example_spec[k] for k in input_keys))

    # Sharded state: shardings from the logical axis names of the boxed abstract state.
    state, state_sharding, _ = init_sharded_state(model, tx, init_rng, mesh, *sample)
    initial = None
    if distillation is not None and distillation.init_checkpoint:
      initial = distillation.initial_params(state.params)
    elif config.init_checkpoint:
      initial = distill.params_from_checkpoint(state.params, config.init_checkpoint,
                                               prefix=config.init_prefix)
    if initial is not None:
      params = jax.device_put(initial, state_sharding.params)
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

    # Restore (the newest checkpoint that reads; see checkpointing.py).
    ckpt = checkpointing.Checkpointer(
        workdir / "checkpoints", save_every_steps=config.checkpoint_every_steps,
        max_to_keep=config.max_checkpoints_to_keep, async_save=config.checkpoint_async,
        handle_sigterm=True)
    restored = ckpt.restore(checkpointing.abstract_like(state), train_iter)
    if restored is not None:
      state, start_step = restored
      logging.info("Resumed from step %d", start_step)
    else:
      start_step = 0

    # Steps. The train step is compiled ahead of time on the first batch, which also gives
    # XLA's FLOP count for the MFU estimate.
    batch_in = sharding.batch_sharding(mesh)
    jitted_step = jit_train_step(
        state_sharding, mesh, model=model, tx=tx, schedule=schedule, rng=step_rng,
        input_keys=input_keys, grad_accum_steps=config.grad_accum_steps,
        skip_nonfinite=config.on_nonfinite == "skip", teacher_sharding=teacher_sharding,
        objective=distillation.objective if distillation else None, task=task)
    teacher_args = () if teacher is None else (teacher,)
    p_train_step, step_flops = None, None
    peak_flops = profiling.peak_flops_per_device(jax.devices()[0], config.peak_flops_per_device)
    p_eval_step = jax.jit(functools.partial(eval_step, model=model, input_keys=input_keys,
                                            task=task),
                          in_shardings=(state_sharding.params, batch_in),
                          out_shardings=sharding.replicated(mesh))
    run_eval = functools.partial(evaluate, p_eval_step, dataset=dataset,
                                 batch_size=config.eval_batch_size, mesh=mesh, task=task)

    writer = metrics_lib.MetricWriter(workdir)
    tracer = profiling.StepTracer(workdir / "profile", config.profile_start_step,
                                  config.profile_num_steps)
    val_metrics: dict[str, float] = {}
    pending: list[tuple[int, dict[str, jax.Array]]] = []
    # Step time per log interval, without eval and checkpointing; throughput over the run.
    interval_start, interval_excluded, train_time, timed_steps = None, 0.0, 0.0, 0
    preempted = False
    progress = tqdm(total=config.num_train_steps, initial=start_step, unit="step",
                    desc="train", dynamic_ncols=True, disable=jax.process_index() != 0)
    try:
      for step in range(start_step + 1, config.num_train_steps + 1):
        batch = global_batch(next(train_iter), mesh)
        if p_train_step is None:
          p_train_step = jitted_step.lower(state, batch, *teacher_args).compile()
          step_flops = profiling.compiled_flops(p_train_step)
          interval_start = time.time()
        tracer.before_step(step, state)
        state, step_metrics = p_train_step(state, batch, *teacher_args)
        tracer.after_step(step, state)
        pending.append((step, step_metrics))
        progress.update(1)

        preempted = ckpt.preempted(step)
        last = step == config.num_train_steps
        save_due = preempted or last or ckpt.should_save(step)
        if save_due or step % config.log_every_steps == 0:
          records = [(s, {k: np.asarray(v).item() for k, v in m.items()})
                     for s, m in jax.device_get(pending)]
          elapsed = time.time() - interval_start - interval_excluded
          train_time, timed_steps = train_time + elapsed, timed_steps + len(records)
          check_finite(records, config, ckpt)
          summary = summarize(records)
          summary["step_time_s"] = elapsed / len(records)
          step_mfu = profiling.mfu(step_flops, summary["step_time_s"], peak_flops)
          if step_mfu is not None:
            summary["mfu"] = step_mfu
          progress.set_postfix(loss=f"{summary['loss']:.4f}", acc=f"{summary['accuracy']:.3f}")
          writer.write(step, "train", summary)
          pending, interval_start, interval_excluded = [], time.time(), 0.0
        t0 = time.time()
        if (step % config.eval_every_steps == 0 or last) and not preempted:
          val_metrics = run_eval(state.params, split="val")
          writer.write(step, "val", val_metrics)
        if save_due:
          ckpt.save(step, state, train_iter, force=preempted or last)
        interval_excluded += time.time() - t0
        if preempted:
          logging.warning("Preempted: checkpoint of step %d saved; exiting", step)
          break
      jax.block_until_ready(state)
    finally:
      tracer.close()
      progress.close()
      ckpt.close()

    final_step = int(jax.device_get(state.step))
    if preempted:
      writer.close()
      return {"preempted": True, "step": final_step, "resumed_from_step": start_step,
              "wall_time_s": time.time() - start_time}

    # Test.
    if not val_metrics:
      val_metrics = run_eval(state.params, split="val")
    test_metrics = run_eval(state.params, split="test")
    writer.write(final_step, "test", test_metrics)
    ema_metrics = {}
    if config.ema_decay:
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
      "train_steps_per_s": timed_steps / train_time if train_time > 0 else None,
      "nonfinite_steps": int(jax.device_get(state.nonfinite_steps)),
      "wall_time_s": time.time() - start_time,
      "resumed_from_step": start_step,
      "config": config.to_dict(),
  }
  if jax.process_index() == 0:
    (workdir / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
  logging.info("Test accuracy %.4f (loss %.4f) after %d steps", test_metrics["accuracy"],
               test_metrics["loss"], final_step)
  return results
