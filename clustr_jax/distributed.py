"""Multi-host start-up: ``jax.distributed.initialize`` from the config or the environment.

Every process of a multi-host job runs the same command. ``maybe_initialize(config)`` connects
them before JAX touches a device, when ``config.distributed_init`` is true or the environment
variable ``JAX_COORDINATOR_ADDRESS`` is set. Unset ``distributed_*`` keys (see
``configs/default.py``) are left to JAX, which auto-detects them on Cloud TPU VMs, under SLURM
and under Open MPI, and otherwise reads ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and
``JAX_PROCESS_ID``. After it, ``jax.devices()`` lists the devices of all processes, each process
reads its own shard of the data (``train.py``: ``shard_index=jax.process_index()``) and batches
become global arrays with ``jax.make_array_from_process_local_data``.

On CPU (tests, and CPU clusters) cross-process collectives use Gloo
(``jax_cpu_collectives_implementation``).
"""

from __future__ import annotations

import os

import jax
import ml_collections
from absl import logging


def should_initialize(config: ml_collections.ConfigDict) -> bool:
  """Whether ``config.distributed_init`` or ``JAX_COORDINATOR_ADDRESS`` asks for multi-host."""
  return bool(config.distributed_init) or bool(os.environ.get("JAX_COORDINATOR_ADDRESS"))


def maybe_initialize(config: ml_collections.ConfigDict) -> bool:
  """Calls ``jax.distributed.initialize`` if asked (see ``should_initialize``); returns whether.

  Reads ``distributed_coordinator_address`` ('host:port'), ``distributed_num_processes``,
  ``distributed_process_id``, ``distributed_local_device_ids`` ('0,1' or a list of ints) and
  ``distributed_timeout_s``; None leaves a value to JAX's auto-detection. Must run before any JAX
  computation. Idempotent: a second call after a successful one does nothing.

  Raises:
    ValueError: ``distributed_local_device_ids`` does not parse as comma-separated ints, or
      ``distributed_process_id`` is outside [0, distributed_num_processes).
  """
  if not should_initialize(config):
    return False
  if jax.distributed.is_initialized():
    return True
  num_processes = config.distributed_num_processes
  process_id = config.distributed_process_id
  if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
    raise ValueError(f"config.distributed_process_id={process_id} must be in "
                     f"[0, config.distributed_num_processes={num_processes})")
  local_device_ids = config.distributed_local_device_ids
  if isinstance(local_device_ids, str):
    try:
      local_device_ids = [int(i) for i in local_device_ids.split(",") if i.strip()]
    except ValueError:
      raise ValueError(f"config.distributed_local_device_ids={local_device_ids!r}: expected "
                       f"comma-separated device ids such as '0,1'") from None
  elif isinstance(local_device_ids, int):
    local_device_ids = [local_device_ids]
  elif local_device_ids is not None:
    local_device_ids = [int(i) for i in local_device_ids]
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
      coordinator_address=config.distributed_coordinator_address,
      num_processes=num_processes, process_id=process_id, local_device_ids=local_device_ids,
      initialization_timeout=int(config.distributed_timeout_s))
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  return True
