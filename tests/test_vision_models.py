"""Vision models: official parameter counts, shapes, train/eval behaviour, attention choices."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clustr_jax import models, sharding
from clustr_jax.models import vit

# Official counts: timm DeiT (deit_{tiny,small,base}_patch16_224), the ClusTR.py code comments
# (11.68M, 22.69M, 40.25M; docs/vision.md gives 11.682M, 22.691M, 40.246M) and DeiT-S plus the
# Sparsifiner predictors (12 x (2 x (64 x 32 + 32) + 2 x 197 x 32) = 201,216).
OFFICIAL_COUNTS = {
    "deit_ti": 5_717_416, "deit_s": 22_050_664, "deit_b": 86_567_656,
    "sparsifiner_deit_s": 22_050_664 + 201_216,
    "clustr_t": 11.68, "clustr_s": 22.69, "clustr_b": 40.25,   # millions, as the code rounds
}

TINY_VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
TINY_CLUSTR = dict(embed_dims=(16, 32, 32, 64), num_heads=(1, 2, 2, 4), depths=(1, 1, 1, 1))


def _count(params) -> int:
  return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))


@pytest.mark.parametrize("name", sorted(OFFICIAL_COUNTS))
def test_official_parameter_counts(name):
  model = models.get(name, num_classes=1000)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))
  count = _count(shapes["params"])
  if name.startswith("clustr"):
    assert round(count / 1e6, 2) == OFFICIAL_COUNTS[name]
  else:
    assert count == OFFICIAL_COUNTS[name]


def _init(model, x, seed=0):
  """Random variables of the model's shapes (normal, std 0.2): ``init`` traced, not compiled,
  so that each test compiles only the one apply it checks (compiles dominate on the CPU)."""
  shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), x))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(0.2 * rng.normal(size=s.shape), s.dtype), shapes)


def _jit_apply(model, train=False, mutable=False):
  """One jitted apply (call it repeatedly with new rngs: it compiles once)."""
  return jax.jit(functools.partial(model.apply, train=train, mutable=mutable))


def _apply(model, variables, x, mutable=False):
  return _jit_apply(model, mutable=mutable)(variables, x)


def _images(batch, size, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(batch, size, size, 3)), jnp.float32)


@pytest.mark.parametrize("attention,options", [
    ("dense", {}), ("clustr", {}), ("sparsifiner", {"basis_topk": 2}),
    ("cast", {"num_clusters": 4, "cluster_size": 6})])
def test_vit_any_attention_shapes_and_drop_path(attention, options):
  model = models.get("deit_ti", num_classes=10, attention=attention, attention_kwargs=options,
                     drop_path_rate=0.5, **TINY_VIT)
  x = _images(2, 32)
  variables = _init(model, x)
  rngs = lambda s: {"dropout": jax.random.key(s), "clustering": jax.random.key(s)}  # noqa: E731
  train = _jit_apply(model, train=True)
  a, b = train(variables, x, rngs=rngs(1)), train(variables, x, rngs=rngs(2))
  chex.assert_shape(a, (2, 10))
  chex.assert_type(a, jnp.float32)
  chex.assert_tree_all_finite(a)
  assert not np.allclose(a, b), "drop path must depend on the 'dropout' rng"


def test_clustr_pyramid_small_forward_and_names():
  model = models.get("clustr_t", num_classes=7, drop_path_rate=0.1, **TINY_CLUSTR)
  x = _images(2, 64)
  variables = _init(model, x)
  params = variables["params"]
  assert set(params["block1_0"]["attn"]) == {"q", "weight_layer", "kv1", "kv2", "proj"}
  assert set(params["block4_0"]["attn"]) == {"query", "key", "value", "out"}
  assert params["block1_0"]["mlp"]["dwconv"]["kernel"].shape == (3, 3, 1, 16 * 8)
  assert params["patch_embed1"]["proj"]["kernel"].shape == (7, 7, 3, 16)
  # Eval mode (deterministic, no density noise) is checked against the official forward in
  # test_convert.py; here train mode, which uses the 'dropout' and 'clustering' rngs.
  train = _jit_apply(model, train=True)
  rngs = lambda s: {"dropout": jax.random.key(s), "clustering": jax.random.key(s)}  # noqa: E731
  a, b = train(variables, x, rngs=rngs(1)), train(variables, x, rngs=rngs(2))
  chex.assert_shape(a, (2, 7))
  chex.assert_tree_all_finite(a)
  assert not np.allclose(a, b)


def test_clustr_pyramid_dense_ablation_and_errors():
  model = models.get("clustr_t", num_classes=3, attention="dense", **TINY_CLUSTR)
  x = _images(1, 64)
  params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
  assert set(params["block1_0"]["attn"]) == {"query", "key", "value", "out"}
  with pytest.raises(ValueError, match="embed_dims"):
    jax.eval_shape(models.get("clustr_t", num_classes=3, embed_dims=(16, 32)).init,
                   jax.random.key(0), x)
  with pytest.raises(ValueError, match="sr_ratio"):
    jax.eval_shape(models.get("clustr_t", num_classes=3, attention_kwargs={"sr_ratio": 2},
                              **TINY_CLUSTR).init, jax.random.key(0), x)


def test_sparsifiner_stage1_intermediates_reachable():
  """Stage 1 (recon_mode) exposes A^, the dense attention and the final tokens for the losses."""
  x = _images(2, 32)
  model = models.get("sparsifiner_deit_s", num_classes=5, **TINY_VIT,
                     attention_kwargs={"recon_mode": True, "basis_topk": 2})
  variables = _init(model, x)
  _, state = _apply(model, variables, x, mutable=["intermediates"])
  inter = state["intermediates"]
  n = (32 // 8) ** 2 + 1
  chex.assert_shape(inter["blocks_1"]["attn"]["approx_attn"][0], (2, 2, n - 1, n))
  chex.assert_shape(inter["blocks_0"]["attn"]["unmasked_attn"][0], (2, 2, n, n))
  chex.assert_shape(inter["features"][0], (2, n - 1, 32))


def test_layer_attention_kwargs_and_bad_inputs():
  """Per-layer keep rates (official attn_keep_rate_list); stage-2 selections are reachable."""
  model = models.get("sparsifiner_deit_s", num_classes=5, **TINY_VIT,
                     layer_attention_kwargs=({"keep_rate": 0.2}, {"keep_rate": 1.0}),
                     attention_kwargs={"path": "gather", "basis_topk": 2})
  x = _images(1, 32)
  variables = _init(model, x)
  _, state = _apply(model, variables, x, mutable=["intermediates"])
  idx = state["intermediates"]
  assert idx["blocks_0"]["attn"]["attn_indices"][0].shape[-1] == 4   # ceil(0.2 * 17)
  assert idx["blocks_1"]["attn"]["attn_indices"][0].shape[-1] == 17
  with pytest.raises(ValueError, match="32x32"):
    jax.eval_shape(model.apply, variables, _images(1, 48))
  with pytest.raises(ValueError, match=r"\[batch, height, width, 3\]"):
    jax.eval_shape(model.apply, variables, jnp.zeros((1, 32, 32)))
  with pytest.raises(ValueError, match="num_clusters"):
    jax.eval_shape(models.get("deit_ti", num_classes=2, attention="cast", **TINY_VIT).init,
                   jax.random.key(0), x)
  with pytest.raises(ValueError, match="token pruning"):
    jax.eval_shape(models.get("deit_ti", num_classes=2, **TINY_VIT,
                              attention_kwargs={"token_keep_rate": 0.7}).init,
                   jax.random.key(0), x)
  with pytest.raises(ValueError, match="no option"):
    jax.eval_shape(models.get("deit_ti", num_classes=2, attention_kwargs={"bogus": 1},
                              **TINY_VIT).init, jax.random.key(0), x)


def test_drop_path_statistics_and_schedule():
  layer = vit.DropPath(0.25)
  x = jnp.ones((4000, 3))
  y = layer.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(0)})
  kept = np.asarray(y[:, 0] > 0)
  assert abs(kept.mean() - 0.75) < 0.03
  np.testing.assert_allclose(np.asarray(y)[kept], 1 / 0.75, rtol=1e-6)
  assert (np.asarray(y)[kept] == np.asarray(y)[kept][:, :1]).all()   # whole samples
  np.testing.assert_allclose(vit.drop_path_rates(0.3, 4), [0.0, 0.1, 0.2, 0.3], rtol=1e-6)


@pytest.mark.parametrize("name", ["deit_ti", "sparsifiner_deit_s", "clustr_t"])
def test_every_parameter_has_logical_axes_and_bfloat16_traces(name):
  """All parameters carry logical names that the one rule table maps onto a mesh; a bfloat16
  forward traces with float32 parameters and float32 logits."""
  tiny = TINY_CLUSTR if name.startswith("clustr") else dict(TINY_VIT, attention_kwargs={
      "basis_topk": 2} if name.startswith("sparsifiner") else None)
  size = 64 if name.startswith("clustr") else 32
  model = models.get(name, num_classes=4, dtype=jnp.bfloat16, **tiny)
  x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
  boxed = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
  leaves = jax.tree.leaves(boxed, is_leaf=lambda b: isinstance(b, nn.Partitioned))
  assert leaves and all(isinstance(b, nn.Partitioned) for b in leaves)
  assert all(len(b.names) == b.value.ndim for b in leaves)
  mesh = sharding.create_mesh(data=2, fsdp=2, model=2)
  sharding.logical_to_sharding(boxed, mesh)
  out = jax.eval_shape(lambda v, x: model.apply(v, x), {"params": boxed}, x)
  assert out.dtype == jnp.float32 and out.shape == (2, 4)
  assert all(b.value.dtype == jnp.float32 for b in leaves)
