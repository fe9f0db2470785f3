"""Sharding over ('data', 'fsdp', 'model') meshes: same loss and gradients, parameters split as the
rules say; bfloat16 compute with float32 parameters; shape checks that name the mesh key."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_train import tiny_config

from clustr_jax import losses, models, optim, sharding, train

MODEL_KWARGS = {"vocab_size": 17, "num_classes": 10, "max_length": 32}


def make_batch():
  rng = np.random.default_rng(0)
  inputs = rng.integers(1, 17, (8, 32)).astype(np.int32)
  inputs[:, 24:] = 0  # Padding.
  return {"inputs": inputs, "targets": rng.integers(0, 10, (8,)).astype(np.int32)}


@pytest.fixture(scope="module")
def setup():
  """(config, model, boxed abstract state, initial state on one device, batch): one init for all
  meshes; each mesh gets the same parameters with its own sharding."""
  config = tiny_config()
  model = models.from_config(config.model, MODEL_KWARGS)
  tx, _ = optim.create_optimizer(config)
  init_fn = functools.partial(train.create_train_state, model, tx)
  sample = jnp.zeros((8, 32), jnp.int32)
  boxed = jax.eval_shape(init_fn, jax.random.key(0), sample)
  state = jax.jit(lambda r, x: nn.unbox(init_fn(r, x)))(jax.random.key(0), sample)
  return config, model, boxed, jax.device_get(state), make_batch()


def loss_and_grads(setup, mesh):
  """(loss, grads) of one training forward/backward pass (dropout on) on ``mesh``."""
  _, model, boxed, state, batch = setup
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
    params_sharding = sharding.logical_to_sharding(boxed, mesh).params
    params = jax.device_put(state.params, params_sharding)

    def loss_fn(params, batch):
      logits = model.apply({"params": params}, batch["inputs"], train=True,
                           rngs={"dropout": jax.random.key(1), "clustering": jax.random.key(2)})
      return losses.cross_entropy(logits, batch["targets"]).mean()

    grad_fn = jax.jit(jax.value_and_grad(loss_fn),
                      in_shardings=(params_sharding, sharding.batch_sharding(mesh)),
                      out_shardings=(sharding.replicated(mesh), params_sharding))
    loss, grads = grad_fn(params, train.global_batch(batch, mesh))
  return float(loss), grads


@pytest.fixture(scope="module")
def single_device(setup):
  loss, grads = loss_and_grads(setup, sharding.create_mesh(devices=jax.devices()[:1]))
  return loss, jax.device_get(grads)


def strip(spec):
  """A partition spec as a tuple without trailing None (replicated) entries."""
  spec = tuple(spec)
  while spec and spec[-1] is None:
    spec = spec[:-1]
  return spec


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_mesh_gives_single_device_loss_and_gradients_and_splits_parameters(
    shape, setup, single_device):
  loss_1, grads_1 = single_device
  mesh = sharding.create_mesh(*shape)
  loss_n, grads_n = loss_and_grads(setup, mesh)
  assert loss_n == pytest.approx(loss_1, abs=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), grads_1,
               jax.device_get(grads_n))

  # Every parameter is sharded as its logical names map through the one rule table, and each
  # device holds only its block.
  names = nn.get_partition_spec(setup[2].params)
  flat_names = jax.tree.leaves(names, is_leaf=lambda x: isinstance(x, jax.P))
  flat_grads = jax.tree.leaves(grads_n)
  assert len(flat_names) == len(flat_grads)
  split = 0
  for logical, grad in zip(flat_names, flat_grads):
    expected = nn.logical_to_mesh_axes(tuple(logical), sharding.LOGICAL_AXIS_RULES)
    assert strip(grad.sharding.spec) == strip(expected)
    block = tuple(size // int(np.prod([mesh.shape[a] for a in
                                       ((axes,) if isinstance(axes, str) else axes or ())]))
                  for size, axes in zip(grad.shape, tuple(expected) + (None,) * grad.ndim))
    assert grad.addressable_shards[0].data.shape == block
    split += block != grad.shape
  query = grads_n["encoder"]["block_0"]["attention"]["query"]["kernel"]  # [embed, heads, kv]
  fc1 = grads_n["encoder"]["block_0"]["mlp"]["fc1"]["kernel"]  # [embed, mlp]
  _, fsdp, model = shape
  assert query.addressable_shards[0].data.shape == (16 // fsdp, 2 // model, 8)
  assert fc1.addressable_shards[0].data.shape == (16 // fsdp, 32 // model)
  if fsdp * model > 1:
    assert split >= 8  # q, k, v, out, fc1, fc2, head_hidden, embedding at least.


def test_bfloat16_compute_keeps_float32_parameters_and_optimizer_state(setup):
  config, _, _, state, batch = setup
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  config = config.copy_and_resolve_references()
  config.model.update(dropout_rate=0.0, attention_dropout_rate=0.0)
  model32 = models.from_config(config.model, MODEL_KWARGS)
  config.model.dtype = "bfloat16"
  model = models.from_config(config.model, MODEL_KWARGS)
  _, intermediates = jax.eval_shape(functools.partial(model.apply, capture_intermediates=True),
                                    {"params": state.params}, batch["inputs"])
  fc1_out = intermediates["intermediates"]["encoder"]["block_0"]["mlp"]["fc1"]["__call__"][0]
  assert fc1_out.dtype == jnp.bfloat16
  tx, schedule = optim.create_optimizer(config)
  losses = []
  for m in (model, model32):
    new_state, metrics = jax.jit(functools.partial(
        train.train_step, model=m, tx=tx, schedule=schedule, rng=jax.random.key(1)))(state, batch)
    assert {x.dtype for x in jax.tree.leaves(new_state.params)} == {jnp.dtype(jnp.float32)}
    assert ({x.dtype for x in jax.tree.leaves(new_state.opt_state) if x.ndim}
            == {jnp.dtype(jnp.float32)})
    losses.append(float(metrics["loss"]))
  assert losses[0] == pytest.approx(losses[1], rel=2e-2)
  assert losses[0] != losses[1]


def test_shapes_that_do_not_divide_the_mesh_name_the_key():
  config = tiny_config()
  config.model.update(num_heads=1, qkv_dim=16)
  model = models.from_config(config.model, MODEL_KWARGS)
  tx, _ = optim.create_optimizer(config)
  mesh = sharding.create_mesh(4, 1, 2)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
    boxed = jax.eval_shape(functools.partial(train.create_train_state, model, tx),
                           jax.random.key(0), jnp.zeros((8, 32), jnp.int32))
    with pytest.raises(ValueError, match=r"\['kernel'\] of shape \(16, 1, 16\).*"
                                         r"dimension 1 \(size 1\).*config.mesh.model=2"):
      sharding.check_divisible(boxed, sharding.logical_to_sharding(boxed, mesh))


def test_gradient_accumulation_matches_the_large_batch_with_clipping(setup):
  config, _, _, state, batch = setup
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  config = config.copy_and_resolve_references()
  config.model.update(dropout_rate=0.0, attention_dropout_rate=0.0)
  config.update(optimizer="sgd", weight_decay=0.0, grad_clip_norm=0.5, learning_rate=1.0,
                schedule="constant")
  model = models.from_config(config.model, MODEL_KWARGS)
  results = []
  for k in (1, 4):
    config.grad_accum_steps = k
    tx, schedule = optim.create_optimizer(config)
    start = state.replace(opt_state=tx.init(state.params))
    step = jax.jit(functools.partial(train.train_step, model=model, tx=tx, schedule=schedule,
                                     rng=jax.random.key(1), grad_accum_steps=k))
    new_state, metrics = step(start, batch)
    results.append((jax.device_get(new_state.params), jax.device_get(metrics)))
  (params_1, metrics_1), (params_4, metrics_4) = results
  assert metrics_1["grad_norm"] > 0.5  # The clip is active.
  for key in ("loss", "accuracy", "grad_norm"):
    assert metrics_4[key] == pytest.approx(metrics_1[key], rel=1e-5), key
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), params_1, params_4)
  moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), params_4, state.params)
  assert max(jax.tree.leaves(moved)) > 1e-3  # One real update, not a no-op.
