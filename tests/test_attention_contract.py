"""The attention contract (docs/adding_a_mechanism.md), checked on every registered mechanism.

A new mechanism gets these tests by adding its small test settings to ``SETTINGS``.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clustr_jax import attention

LENGTH, FEATURES = 16, 32
# Small settings for LENGTH tokens (each mechanism's own options).
SETTINGS = {
    "dense": {},
    "clustr": {"num_clusters": (4, 8)},
    "cast": {"num_clusters": 4, "cluster_size": 8},
    "sparsifiner": {"keep_rate": 0.5, "reduce_n_factor": 4, "basis_topk": 4},
}


def test_registry_lists_every_mechanism():
  assert set(attention.names()) == set(SETTINGS)
  with pytest.raises(ValueError, match="unknown attention 'nope'; valid choices: dense"):
    attention.get("nope")


def make(name, **kwargs):
  return attention.get(name)(num_heads=4, qkv_features=FEATURES, **{**SETTINGS[name], **kwargs})


def inputs(seed=0, batch=2, length=LENGTH, real=(16, 11)):
  x = jax.random.normal(jax.random.key(seed), (batch, length, FEATURES))
  mask = jnp.arange(length)[None, :] < jnp.asarray(real)[:, None]
  return x, mask


@pytest.mark.parametrize("name", sorted(SETTINGS))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_shapes_dtypes_and_jit(name, dtype):
  module = make(name, out_features=24, dtype=dtype)
  x, mask = inputs()
  variables = module.init(jax.random.key(1), x, mask)
  y = module.apply(variables, x.astype(dtype), mask)
  chex.assert_shape(y, (2, LENGTH, 24))
  chex.assert_type(y, dtype)
  chex.assert_tree_all_finite(y)
  y_jit = jax.jit(module.apply)(variables, x.astype(dtype), mask)
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  np.testing.assert_allclose(np.asarray(y_jit, np.float32), np.asarray(y, np.float32), atol=tol)


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_padded_tokens_never_change_real_outputs(name):
  """Whatever the padded positions hold, real tokens' outputs stay the same."""
  module = make(name)
  x, mask = inputs()
  variables = module.init(jax.random.key(1), x, mask)
  garbage = 100.0 * jax.random.normal(jax.random.key(7), x.shape)
  x2 = jnp.where(mask[..., None], x, garbage)
  y1, y2 = jax.jit(module.apply)(variables, x, mask), jax.jit(module.apply)(variables, x2, mask)
  real = np.asarray(mask)
  np.testing.assert_allclose(np.asarray(y1)[real], np.asarray(y2)[real], atol=1e-5)
  chex.assert_tree_all_finite(y2)


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_no_mask_means_all_real_and_is_deterministic(name):
  module = make(name)
  x, _ = inputs()
  variables = module.init(jax.random.key(1), x)
  full = jnp.ones(x.shape[:2], bool)
  np.testing.assert_array_equal(module.apply(variables, x), module.apply(variables, x, full))
  np.testing.assert_array_equal(module.apply(variables, x), module.apply(variables, x))


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_wrong_mask_shape_is_an_error(name):
  module = make(name)
  x, _ = inputs()
  with pytest.raises(ValueError, match="mask"):
    module.init(jax.random.key(1), x, jnp.ones((2, LENGTH - 1), bool))
