"""The base run config: every key of the train loop, with its default, documented once here.

Every config file starts from ``get_config()`` and overrides what its task needs (big_vision and
the flax examples keep ``configs/default.py`` the same way); the train loop reads each key without
a fallback, so a key is defined in one place. ``python -m clustr_jax.main`` loads config files
locked: ``--config.<key>=value`` sets any key below (or of the file's ``dataset`` and ``model``
sections), and a mistyped key fails at load, naming the nearest valid keys.

Run:
  seed                               PRNG seed of initialisation, dropout and data order (0).
  dataset                            the dataset family's section (``name`` picks the family in
                                     ``clustr_jax.data``); set by each config file.
  model                              ``name`` (``clustr_jax.models``) and the model's options;
                                     set by each config file.
  batch_size, eval_batch_size        global batch sizes (split over processes and data shards).
  num_train_steps                    optimizer updates of the whole run.
  init_checkpoint                    None, or an Orbax checkpoint (a run's ``checkpoints/``, a
                                     step directory, or ``clustr_jax.convert``'s output) whose
                                     parameters initialise the model (``distill.
                                     params_from_checkpoint``); its leaves the model lacks are
                                     dropped (e.g. a classifier's head).
  init_prefix                        None: the checkpoint is the whole parameter tree; a
                                     top-level key: it fills that subtree only (e.g. 'backbone'
                                     of a Semantic FPN from an ImageNet ClusTR; the rest keeps
                                     its initialisation).

Optimizer and schedule (``clustr_jax/optim.py``):
  optimizer                          'adamw' (decoupled weight decay) or 'sgd'.
  learning_rate                      base (peak) learning rate.
  schedule                           a product of LRA's factors, e.g.
                                     'constant*linear_warmup*rsqrt_decay'; 'timm_cosine' (timm,
                                     the warm-up inside the cosine); 'warmup_cosine'
                                     (Sparsifiner: warm-up, then the cosine over the rest); or
                                     'poly' (mmsegmentation's poly decay with ``poly_power``
                                     down to ``min_lr``, after an optional linear warm-up).
  poly_power                         the poly schedule's power (0.9).
  warmup_steps                       linear warm-up steps (may exceed num_train_steps).
  steps_per_cycle                    cosine_decay's cycle in steps (None: num_train_steps, LRA's
                                     total step count).
  cooldown_steps                     timm_cosine: steps at min_lr after the cosine (DeiT's
                                     cooldown epochs).
  warmup_init_lr, min_lr             timm_cosine / warmup_cosine: the warm-up's first and the
                                     cosine's last value.
  adam_b1, adam_b2, adam_eps         Adam's moments and epsilon.
  momentum                           sgd's momentum (None: plain SGD).
  weight_decay                       decoupled weight decay.
  weight_decay_skip                  None: decay every parameter (LRA); a tuple of path parts:
                                     timm's groups, no decay for biases, norm scales, vectors and
                                     paths containing one of them (e.g. ('pos_embed',
                                     'cls_token')).
  grad_clip_norm                     clip the (accumulated) gradient to this global norm
                                     (None or <= 0: no clipping).
  grad_accum_steps                   micro-batches per update: the global ``batch_size`` is split
                                     into this many equal micro-batches whose gradients
                                     ``optax.MultiSteps`` averages before one update (1: off).
  ema_decay                          model EMA of the parameters, timm ``ModelEma`` (None: off).
  distill                            None, or the section of a distillation stage
                                     (``distill_config``; ``clustr_jax/distill.py``).

Mesh and scale-out (``clustr_jax/sharding.py``, ``clustr_jax/distributed.py``):
  mesh.data, mesh.fsdp, mesh.model   mesh axis sizes (one may be -1: the remaining devices);
                                     default data=-1 (pure data parallelism).
  distributed_init                   call ``jax.distributed.initialize`` (also done when the
                                     ``JAX_COORDINATOR_ADDRESS`` environment variable is set).
  distributed_coordinator_address    'host:port' of process 0 (None: from the environment, or
                                     auto-detected on TPU VMs, SLURM and Open MPI).
  distributed_num_processes          number of processes (None: auto-detected).
  distributed_process_id             this process's index (None: auto-detected).
  distributed_local_device_ids       devices this process uses, e.g. '0,1' (None: all visible).
  distributed_timeout_s              seconds to wait for every process to connect (300).

Failures:
  on_nonfinite                       'stop': a non-finite loss or gradient norm stops the run with
                                     FloatingPointError naming the step, and no checkpoint is
                                     written after it; 'skip': such an update is not applied
                                     (parameters and optimizer state keep their values, the step
                                     count and data position advance) and counted.
  max_nonfinite_steps                with 'skip': stop once more than this many updates were
                                     skipped in the whole run (the count is checkpointed).

Checkpoints:
  checkpoint_async                   write checkpoints in a background thread (True).
  checkpoint_every_steps, max_checkpoints_to_keep   interval (500) and retention (3).

Profiling and logging:
  profile_start_step                 first step traced with ``jax.profiler`` (into
                                     ``<workdir>/profile``).
  profile_num_steps                  number of steps traced (0: no trace).
  peak_flops_per_device              the device's peak FLOP/s for the MFU estimate of each log
                                     line (None: looked up from the device kind; no MFU when
                                     unknown, e.g. on CPU).
  log_every_steps, eval_every_steps  intervals (50, 500).
  data_workers                       Grain worker processes for the train iterator (0).
"""

from __future__ import annotations

import ml_collections


def _optional(value, field_type):
  """A field that may hold None and still takes a typed ``--config.<key>=...`` override."""
  return ml_collections.FieldReference(value, field_type=field_type)


def get_config() -> ml_collections.ConfigDict:
  """The base config (see the module docstring for every key)."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.dataset = ml_collections.ConfigDict()
  config.model = ml_collections.ConfigDict()
  config.batch_size = 32
  config.eval_batch_size = 32
  config.num_train_steps = 1_000
  config.init_checkpoint = _optional(None, str)
  config.init_prefix = _optional(None, str)

  config.optimizer = "adamw"
  config.learning_rate = 1e-3
  config.schedule = "constant*linear_warmup*cosine_decay"
  config.warmup_steps = 100
  config.steps_per_cycle = _optional(None, int)
  config.cooldown_steps = 0
  config.warmup_init_lr = 0.0
  config.min_lr = 0.0
  config.poly_power = 0.9
  config.adam_b1 = 0.9
  config.adam_b2 = 0.999
  config.adam_eps = 1e-8
  config.momentum = _optional(None, float)
  config.weight_decay = 0.0
  config.weight_decay_skip = None
  config.grad_clip_norm = _optional(None, float)
  config.grad_accum_steps = 1
  config.ema_decay = _optional(None, float)
  config.distill = None

  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, model=1))
  config.distributed_init = False
  config.distributed_coordinator_address = _optional(None, str)
  config.distributed_num_processes = _optional(None, int)
  config.distributed_process_id = _optional(None, int)
  config.distributed_local_device_ids = _optional(None, str)
  config.distributed_timeout_s = 300

  config.on_nonfinite = "stop"
  config.max_nonfinite_steps = 0

  config.checkpoint_async = True
  config.checkpoint_every_steps = 500
  config.max_checkpoints_to_keep = 3

  config.profile_start_step = 1
  config.profile_num_steps = 0
  config.peak_flops_per_device = _optional(None, float)
  config.log_every_steps = 50
  config.eval_every_steps = 500
  config.data_workers = 0
  return config


def distill_config(stage: str) -> ml_collections.ConfigDict:
  """``config.distill`` of a Sparsifiner stage with its defaults (``clustr_jax/distill.py``).

  Keys:
    stage              'recon' (stage 1: connectivity predictors learn the dense attention) or
                       'distill' (stage 2: the backbone learns from a dense teacher).
    trainable          'all', 'predictor' or 'backbone' (stage 1: predictor, stage 2: backbone).
    predictor_pattern  parameters whose path contains it belong to the predictor.
    init_checkpoint    Orbax checkpoint of the student's initial parameters (None: none).
    init_rename        substring replacements applied to the checkpoint's keys.
    recon_weight       weight of stage 1's L_recon (0.01).
    ce_weight          weight of the cross-entropy (stage 1: 0, stage 2: 1).
    kl_weight          weight of KL(teacher || student) (0.5).
    token_weight       weight of the token MSE (0.5).
    temperature        KL temperature (1).
    token_module       top-level module whose output is the token representation ('norm').
    num_prefix_tokens  leading tokens (CLS) left out of the token MSE (1).
    teacher            None, or the teacher model's section with its ``checkpoint``.

  Raises:
    ValueError: unknown ``stage``.
  """
  if stage not in ("recon", "distill"):
    raise ValueError(f"distill stage={stage!r} unknown; valid: recon, distill")
  return ml_collections.ConfigDict(dict(
      stage=stage, trainable="predictor" if stage == "recon" else "backbone",
      predictor_pattern="mask_predictor", init_checkpoint=_optional(None, str), init_rename={},
      recon_weight=0.01, ce_weight=0.0 if stage == "recon" else 1.0, kl_weight=0.5,
      token_weight=0.5, temperature=1.0, token_module="norm", num_prefix_tokens=1,
      teacher=None))
