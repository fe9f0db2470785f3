"""Sparsifiner token pruning in the ViT (official ``Block`` / ``Attention`` token masks,
docs/sparsifiner.md, "Token pruning"): the running keep mask through the blocks, budgets counted
from the original patch count, zeroed pruned tokens, the official handling against ours
('mask'), keep rate 1 against the unpruned model, and the errors. The logits against the
official code: experiments/vision/check_official.py (needs the official clone and torch)."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clustr_jax import models
from clustr_jax.attention.sparsifiner import SparsifinerAttention
from clustr_jax.models import vit

# 4x4 = 16 patches of 8x8 on 32x32 images, 12 blocks of width 32 (official pruning at 3, 6, 9).
TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=12, num_heads=2)
PATCHES = 16
IMAGES = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))


def _model(base=0.7, **kwargs):
  kwargs.setdefault("layer_attention_kwargs",
                    vit.token_keep_rates(base) if base is not None else None)
  return models.get("sparsifiner_deit_s", num_classes=5, **TINY,
                    attention_kwargs={"basis_topk": 2, "path": "masked"}, **kwargs)


@functools.lru_cache(maxsize=None)
def _params():
  return _model(None).init(jax.random.key(1), IMAGES)["params"]


def _run(model, capture=False):
  return model.apply({"params": _params()}, IMAGES, mutable=["intermediates"],
                     capture_intermediates=capture)


def test_official_keep_rates_and_budgets():
  layers = vit.token_keep_rates(0.7)
  assert [i for i, o in enumerate(layers) if o] == [3, 6, 9]
  assert [layers[i]["token_keep_rate"] for i in (3, 6, 9)] == [0.7, 0.7 ** 2, 0.7 ** 3]
  # Budgets from the original patch count: ceil(0.7 * 16), ceil(0.49 * 16), ceil(0.343 * 16).
  assert _model().token_budgets() == [None] * 3 + [12] + [None] * 2 + [8] + [None] * 2 + [6] + \
      [None] * 2
  assert [math.ceil(r * PATCHES) for r in (0.7, 0.49, 0.343)] == [12, 8, 6]
  with pytest.raises(ValueError, match=r"base must be in \(0, 1\]"):
    vit.token_keep_rates(1.5)
  with pytest.raises(ValueError, match="distinct blocks"):
    vit.token_keep_rates(0.7, (3, 12))


def test_running_mask_through_blocks_and_zeroed_tokens():
  logits, state = _run(_model(), capture=True)
  inter = state["intermediates"]
  masks = {i: np.asarray(inter[f"blocks_{i}"]["attn"]["token_keep_mask"][0]) for i in (3, 6, 9)}
  for i, budget in ((3, 12), (6, 8), (9, 6)):
    assert masks[i][:, 0].all()                                        # CLS always kept
    assert masks[i][:, 1:].sum(-1).tolist() == [budget, budget]
  assert (masks[6] <= masks[3]).all() and (masks[9] <= masks[6]).all()  # nested
  np.testing.assert_array_equal(inter["token_keep_mask"][0], masks[9])
  for i in range(12):
    out = inter[f"blocks_{i}"]["__call__"][0]
    x = np.asarray(out[0] if isinstance(out, tuple) else out)
    if i < 3:
      assert not isinstance(out, tuple) and np.abs(x).min() > 0        # before pruning
      continue
    keep = masks[max(j for j in (3, 6, 9) if j <= i)]
    assert (x[~keep] == 0).all() and (np.abs(x[keep]).sum(-1) > 0).all()
  # A later block's attention: patch rows select kept columns (and the CLS column) only, at
  # most min(ceil(0.25 N), kept) of them; the CLS row is dense over all N (official).
  allowed = np.asarray(inter["blocks_7"]["attn"]["attn_mask"][0])      # [B, H, N, N]
  assert allowed[:, :, 0].all()
  patch_rows = allowed[:, :, 1:]
  assert not patch_rows[np.broadcast_to(~masks[6][:, None, None, :], patch_rows.shape)].any()
  assert (patch_rows.sum(-1) == min(math.ceil(0.25 * 17), 8)).all()
  assert np.isfinite(np.asarray(logits)).all()


def test_official_zeroing_differs_from_masking():
  zero, _ = _run(_model())
  masked, state = _run(_model(token_pruning="mask"))
  assert np.abs(np.asarray(zero) - np.asarray(masked)).max() > 1e-4
  allowed = np.asarray(state["intermediates"]["blocks_7"]["attn"]["attn_mask"][0])
  keep = np.asarray(state["intermediates"]["blocks_6"]["attn"]["token_keep_mask"][0])
  np.testing.assert_array_equal(allowed[:, :, 0], np.broadcast_to(keep[:, None], allowed[:, :, 0]
                                                                  .shape))  # CLS row: kept only


def test_keep_rate_one_equals_the_unpruned_model():
  unpruned, _ = _run(_model(None))
  same, state = _run(_model(1.0))
  np.testing.assert_array_equal(unpruned, same)
  assert "token_keep_mask" not in state["intermediates"]
  # Pruning only in the last block changes the patch features, not the CLS logits.
  last = models.get("sparsifiner_deit_s", num_classes=5, **TINY,
                    layer_attention_kwargs=vit.token_keep_rates(0.5, (11,)),
                    attention_kwargs={"basis_topk": 2, "path": "masked"})
  logits, state = _run(last)
  np.testing.assert_allclose(logits, unpruned, atol=1e-6)
  # The module with an all-kept running mask is the plain module.
  x = jax.random.normal(jax.random.key(4), (2, 17, 32))
  for path in ("gather", "masked"):
    layer = SparsifinerAttention(num_heads=2, reduce_n_factor=2, basis_topk=2, path=path)
    variables = layer.init(jax.random.key(5), x)
    plain = layer.apply(variables, x)
    kept, keep = layer.apply(variables, x, token_keep=jnp.ones((2, 17), bool), kept_patches=16,
                             return_token_keep=True)
    np.testing.assert_allclose(kept, plain, atol=1e-6)
    assert np.asarray(keep).all()


def test_errors_name_the_problem():
  with pytest.raises(ValueError, match="must not grow"):
    jax.eval_shape(_model(None, layer_attention_kwargs=[{}] * 3 + [{"token_keep_rate": 0.5}]
                          + [{}] * 2 + [{"token_keep_rate": 0.7}] + [{}] * 5).init,
                   jax.random.key(0), IMAGES)
  with pytest.raises(ValueError, match="unknown token_pruning 'drop'"):
    jax.eval_shape(_model(token_pruning="drop").init, jax.random.key(0), IMAGES)
  with pytest.raises(ValueError, match="supports_token_pruning; 'dense'"):
    jax.eval_shape(models.get("deit_ti", num_classes=2, **TINY,
                              layer_attention_kwargs=vit.token_keep_rates(0.7)).init,
                   jax.random.key(0), IMAGES)
  x = jnp.ones((2, 17, 32))
  layer = SparsifinerAttention(num_heads=2, reduce_n_factor=2, basis_topk=2, token_keep_rate=0.7)
  variables = jax.eval_shape(layer.init, jax.random.key(0), x)
  with pytest.raises(ValueError, match="token_keep needs kept_patches"):
    jax.eval_shape(functools.partial(layer.apply, token_keep=jnp.ones((2, 17), bool)),
                   variables, x)
  with pytest.raises(ValueError, match=r"token_keep must be \[batch, length\]"):
    jax.eval_shape(functools.partial(layer.apply, token_keep=jnp.ones((2, 16), bool),
                                     kept_patches=8), variables, x)
  with pytest.raises(ValueError, match="more than the 8 still kept"):
    jax.eval_shape(functools.partial(layer.apply, token_keep=jnp.ones((2, 17), bool),
                                     kept_patches=8), variables, x)
