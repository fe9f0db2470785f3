"""The train loop's defaults: the one place where every optional run-config key gets its value.

``with_defaults(config)`` returns a copy of ``config`` with each key below that the config file
does not set; ``train.train_and_evaluate`` and ``main`` apply it, so every config file gets new
train-loop options without edits, and ``--config.<key>=...`` works for them from the command
line (``main`` accepts these keys even where the file lacks them).

Mesh and scale-out:
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

Precision and batch:
  model.dtype                        computation dtype, 'float32' or 'bfloat16' (parameters and
                                     optimizer state stay float32).
  grad_accum_steps                   micro-batches per update: the global ``batch_size`` is split
                                     into this many equal micro-batches whose gradients
                                     ``optax.MultiSteps`` averages before one update (1: off).
  grad_clip_norm                     clip the (accumulated) gradient to this global norm
                                     (None or <= 0: no clipping).

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

from typing import Any

import ml_collections

DEFAULTS: dict[str, Any] = {
    "mesh": {"data": -1, "fsdp": 1, "model": 1},
    "distributed_init": False,
    "distributed_coordinator_address": None,
    "distributed_num_processes": None,
    "distributed_process_id": None,
    "distributed_local_device_ids": None,
    "distributed_timeout_s": 300,
    "grad_accum_steps": 1,
    "grad_clip_norm": None,
    "on_nonfinite": "stop",
    "max_nonfinite_steps": 0,
    "checkpoint_async": True,
    "checkpoint_every_steps": 500,
    "max_checkpoints_to_keep": 3,
    "profile_start_step": 1,
    "profile_num_steps": 0,
    "peak_flops_per_device": None,
    "log_every_steps": 50,
    "eval_every_steps": 500,
    "data_workers": 0,
}

NONFINITE_POLICIES = ("stop", "skip")


def with_defaults(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of ``config`` (references resolved, unlocked) with every unset key of ``DEFAULTS``.

  Nested defaults (``mesh``) fill only the sub-keys the config leaves unset. ``config`` itself is
  not changed.
  """
  config = config.copy_and_resolve_references()
  with config.unlocked():
    for key, value in DEFAULTS.items():
      if isinstance(value, dict):
        if key not in config:
          config[key] = ml_collections.ConfigDict(value)
        else:
          for sub_key, sub_value in value.items():
            if sub_key not in config[key]:
              config[key][sub_key] = sub_value
      elif key not in config:
        config[key] = value
  return config


def flat_keys() -> set[str]:
  """Every default key, dotted (``'mesh.data'``, ``'grad_accum_steps'``, ...)."""
  keys = set()
  for key, value in DEFAULTS.items():
    if isinstance(value, dict):
      keys.update(f"{key}.{sub_key}" for sub_key in value)
    else:
      keys.add(key)
  return keys
