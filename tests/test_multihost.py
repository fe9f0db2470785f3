"""Multi-host: 2 local processes x 4 fake CPU devices (jax.distributed on 127.0.0.1) give the loss
and parameters of 1 process x 8 devices, and the whole train loop runs across them."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_train import tiny_config

from clustr_jax import models, optim, sharding, train

REPO = pathlib.Path(__file__).resolve().parent.parent
MESH = (4, 2, 1)  # data x fsdp: the FSDP-sharded parameters span both processes.

CHILD = """
import json, sys
sys.path.insert(0, {tests!r})
import jax
from clustr_jax import distributed, train
import test_multihost
port, process_id, workdir = sys.argv[1:]
config = test_multihost.loop_config(workdir)
config.update(distributed_init=True, distributed_coordinator_address="127.0.0.1:" + port,
              distributed_num_processes=2, distributed_process_id=int(process_id),
              distributed_timeout_s=120)
distributed.maybe_initialize(config)
assert jax.process_count() == 2 and jax.device_count() == 8, jax.devices()
loss, checksum = test_multihost.two_steps()
results = train.train_and_evaluate(config, workdir)
print("RESULT " + json.dumps({{"loss": loss, "checksum": checksum, "step": results["step"],
                              "test_examples": results["test"]["num_examples"]}}))
"""


def loop_config(workdir):
  config = tiny_config(3)
  config.dataset.data_dir = str(pathlib.Path(workdir).parent / "data")
  config.mesh.update(data=MESH[0], fsdp=MESH[1], model=MESH[2])
  return config


def two_steps():
  """(loss of the 2nd step, sum |params| after it) of a fixed global batch of 16 on ``MESH`` over
  all devices of all processes; each process feeds only the rows its devices hold."""
  config = tiny_config()
  model = models.from_config(config.model, {"vocab_size": 17, "num_classes": 10, "max_length": 32})
  tx, schedule = optim.create_optimizer(config)
  rng = np.random.default_rng(0)
  batch = {"inputs": rng.integers(1, 17, (16, 32)).astype(np.int32),
           "targets": rng.integers(0, 10, (16,)).astype(np.int32)}
  mesh = sharding.create_mesh(*MESH)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
    state, state_sharding, _ = train.init_sharded_state(
        model, tx, jax.random.key(0), mesh, jnp.zeros((16, 32), jnp.int32))
    rows = [index[0] for index in sharding.batch_sharding(mesh).addressable_devices_indices_map(
        (16,)).values()]
    start, stop = min(r.start for r in rows), max(r.stop for r in rows)
    local = {k: v[start:stop] for k, v in batch.items()}
    step = train.jit_train_step(state_sharding, mesh, model=model, tx=tx, schedule=schedule,
                                rng=jax.random.key(1))
    for _ in range(2):
      state, metrics = step(state, train.global_batch(local, mesh))
    checksum = jax.jit(lambda p: sum(jnp.abs(x).sum() for x in jax.tree.leaves(p)),
                       out_shardings=sharding.replicated(mesh))(state.params)
  return float(metrics["loss"]), float(checksum)


def free_port():
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_of_four_devices_match_one_process_of_eight(tmp_path):
  port = str(free_port())
  env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  env.pop("JAX_COORDINATOR_ADDRESS", None)
  child = CHILD.format(tests=str(REPO / "tests"))
  procs = [subprocess.Popen([sys.executable, "-c", child, port, str(i), str(tmp_path / "run")],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outputs = []
  try:
    for proc in procs:
      outputs.append(proc.communicate(timeout=300))
  except subprocess.TimeoutExpired:
    for proc in procs:
      proc.kill()
    pytest.fail("multi-host processes timed out after 300 s:\n" + "\n".join(
        f"--- process {i} ---\n{(p.communicate()[1] or '')[-3000:]}" for i, p in enumerate(procs)))
  for i, (proc, (stdout, stderr)) in enumerate(zip(procs, outputs)):
    assert proc.returncode == 0 and "RESULT " in stdout, (
        f"process {i} exited with {proc.returncode}:\n{stderr[-4000:]}")
  results = [json.loads(stdout.split("RESULT ", 1)[1]) for stdout, _ in outputs]

  loss, checksum = two_steps()  # This process: 8 devices.
  for result in results:
    assert result["loss"] == pytest.approx(loss, abs=1e-5)
    assert result["checksum"] == pytest.approx(checksum, rel=1e-5)
    # The whole loop: per-process data shards, a multi-process checkpoint, every test example
    # evaluated exactly once across the two processes.
    assert result["step"] == 3 and result["test_examples"] == 20
  assert (tmp_path / "run" / "checkpoints" / "3").is_dir()
