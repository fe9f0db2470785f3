"""LRA encoder: shapes, dtypes, pooling, and the padding mask."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clustr_jax import models
from clustr_jax.models import lra

SMALL = dict(vocab_size=17, num_classes=10, emb_dim=32, num_heads=4, qkv_dim=32, mlp_dim=64,
             num_layers=2, dropout_rate=0.1, attention_dropout_rate=0.1)


def _tokens(rng, batch, length, real):
  x = rng.integers(1, 17, size=(batch, length)).astype(np.int32)
  x[:, real:] = 0
  return x


@pytest.mark.parametrize("pooling", ["CLS", "MEAN"])
@pytest.mark.parametrize("learned", [False, True])
def test_shapes_and_param_names(pooling, learned):
  model = models.get("lra_encoder", max_length=24, pooling=pooling,
                     learned_position_embedding=learned, **SMALL)
  x = _tokens(np.random.default_rng(0), 3, 24, 20)
  variables = model.init(jax.random.key(0), x)
  logits = model.apply(variables, x)
  chex.assert_shape(logits, (3, 10))
  chex.assert_type(logits, jnp.float32)
  params = variables["params"]
  assert ("cls" in params["encoder"]) == (pooling == "CLS")
  assert ("pos_embedding" in params["encoder"]) == learned
  # No biases in the attention projections (LRA).
  assert set(params["encoder"]["block_0"]["attention"]) == {"query", "key", "value", "out"}
  for proj in params["encoder"]["block_0"]["attention"].values():
    assert set(proj) == {"kernel"}


def test_bfloat16_compute_keeps_float32_params():
  model = models.get("lra_encoder", max_length=16, dtype=jnp.bfloat16, **SMALL)
  x = _tokens(np.random.default_rng(1), 2, 16, 16)
  variables = model.init(jax.random.key(0), x)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(jax.tree.map(
      lambda b: b.value if hasattr(b, "value") else b, variables,
      is_leaf=lambda b: hasattr(b, "value"))))
  logits = model.apply(variables, x)
  chex.assert_type(logits, jnp.float32)
  chex.assert_tree_all_finite(logits)


@pytest.mark.parametrize("pooling", ["CLS", "MEAN"])
def test_appending_padding_never_changes_real_tokens(pooling):
  """Same real tokens with 8 or 40 trailing pads: identical encodings, logits and dropout-free."""
  rng = np.random.default_rng(2)
  short = _tokens(rng, 2, 8, 8)
  long = np.concatenate([short, np.zeros((2, 32), np.int32)], axis=1)
  m_short = models.get("lra_encoder", max_length=8, pooling=pooling, **SMALL)
  m_long = models.get("lra_encoder", max_length=40, pooling=pooling, **SMALL)
  variables = m_short.init(jax.random.key(0), short)
  fields = {f: getattr(m_short, f) for f in lra.TransformerEncoder.__dataclass_fields__
            if f not in ("parent", "name")}
  def enc(length, x):
    return lra.TransformerEncoder(**{**fields, "max_length": length}).apply(
        {"params": variables["params"]["encoder"]}, x)
  (h_short, _), (h_long, mask_long) = enc(8, short), enc(40, long)
  real = h_short.shape[1]
  np.testing.assert_allclose(h_long[:, :real], h_short, atol=1e-5)
  assert not np.asarray(mask_long[:, real:]).any()
  np.testing.assert_allclose(m_long.apply(variables, long), m_short.apply(variables, short),
                             atol=1e-5)


def test_sinusoidal_table_matches_definition():
  pe = lra.sinusoidal_position_embedding(50, 16)[0]
  p, i = 7, 3
  div = np.exp(-np.log(10000.0) * 2 * i / 16)
  np.testing.assert_allclose(pe[p, 2 * i], np.sin(p * div), rtol=1e-6)
  np.testing.assert_allclose(pe[p, 2 * i + 1], np.cos(p * div), rtol=1e-6)


def test_dropout_only_in_training():
  model = models.get("lra_encoder", max_length=16, **SMALL)
  x = _tokens(np.random.default_rng(3), 2, 16, 12)
  variables = model.init(jax.random.key(0), x)
  a = model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(1)})
  b = model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(2)})
  c = model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(1)})
  assert not np.allclose(a, b)
  np.testing.assert_array_equal(a, c)
  np.testing.assert_array_equal(model.apply(variables, x), model.apply(variables, x))


def test_errors_name_the_problem():
  with pytest.raises(ValueError, match="unknown model 'nope'.*lra_encoder"):
    models.get("nope")
  with pytest.raises(ValueError, match="no option.*'bogus'"):
    models.get("lra_encoder", bogus=1, max_length=4, **SMALL)
  model = models.get("lra_encoder", max_length=16, **SMALL)
  with pytest.raises(ValueError, match="max_length=16"):
    model.init(jax.random.key(0), np.ones((2, 12), np.int32))
  with pytest.raises(ValueError, match="unknown attention 'bad'.*dense"):
    models.get("lra_encoder", max_length=4, attention="bad", **SMALL).init(
        jax.random.key(0), np.ones((1, 4), np.int32))
