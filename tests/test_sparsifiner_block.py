"""Sparsifiner's block path (``path='block'``, ours; docs/sparsifiner.md, "The block path"):
block scores against the block means of the official A^, the limiting case of dense attention,
the output against a NumPy attention over the chosen blocks, padding, gradients, and no [N, N]
array in the program."""

import math

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from test_sparsifiner import (
  FULL,
  MASK,
  D,
  H,
  X,
  apply_fn,
  make,
  np_dense,
  np_official_approx,
  np_qkv,
  np_softmax,
  rng,
  run,
  variables_std,
  with_predictor,
)

from clustr_jax.attention import sparsifiner

BLOCK = dict(path="block", block_size=4)     # 24 tokens -> 6 blocks; keep 0.25 -> 2 blocks


def block_means(ahat, valid, has_cls, size):
  """[B, H, NB, NB] means of A^ over the real predicted queries and real keys of each block."""
  b, h, _, n = ahat.shape
  full = np.zeros((b, h, n, n))
  full[:, :, 1 if has_cls else 0:] = ahat
  q_ok = np.asarray(valid).copy()
  if has_cls:
    q_ok[:, 0] = False
  nb = math.ceil(n / size)
  out = np.zeros((b, h, nb, nb))
  for i in range(nb):
    for j in range(nb):
      rows, cols = slice(i * size, (i + 1) * size), slice(j * size, (j + 1) * size)
      w = q_ok[:, rows, None] & np.asarray(valid)[:, None, cols]               # [B, bs, bs]
      total = np.maximum(w.sum((1, 2)), 1)
      out[:, :, i, j] = (full[:, :, rows, cols] * w[:, None]).sum((2, 3)) / total[:, None]
  return out


@pytest.mark.parametrize("has_cls_token", [True, False])
def test_block_scores_are_block_means_of_the_official_approximation(has_cls_token):
  variables = with_predictor(variables_std())
  _, sown = run(variables, mask=FULL, has_cls_token=has_cls_token, **BLOCK)
  ahat = np_official_approx(variables["params"], np.asarray(X), has_cls_token, "num_heads",
                            0.02, 3)
  np.testing.assert_allclose(np.asarray(sown["approx_attn"]),
                             block_means(ahat, FULL, has_cls_token, 4), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("has_cls_token", [True, False])
def test_keep_rate_one_is_dense_attention(has_cls_token):
  y, _ = run(variables_std(), keep_rate=1.0, has_cls_token=has_cls_token, **BLOCK)
  np.testing.assert_allclose(np.asarray(y), np_dense(variables_std()["params"], X, MASK),
                             atol=1e-5)


def np_block_attention(params, x, valid, blocks, size, has_cls):
  """Attention of each query over the real keys of its query block's chosen key blocks
  (``attn_blocks`` [B, H, NB, m], -1 = none); the CLS row dense."""
  p, q, k, v = np_qkv(params, x)
  valid = np.asarray(valid)
  b, n = valid.shape
  allowed = np.zeros((b, H, n, n), bool)
  for i in range(b):
    for h in range(H):
      for qb in range(blocks.shape[2]):
        for kb in blocks[i, h, qb]:
          if kb >= 0:
            allowed[i, h, qb * size:(qb + 1) * size, kb * size:(kb + 1) * size] = True
  allowed &= valid[:, None, None, :]
  if has_cls:
    allowed[:, :, 0] = valid[:, None, :]
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(D)
  w = np_softmax(np.where(allowed, logits, -np.inf))
  w = np.nan_to_num(w)
  out = np.einsum("bhqk,bkhd->bqhd", w, v)
  return np.einsum("bqhd,hdf->bqf", out, p["proj"]["kernel"]) + p["proj"]["bias"]


@pytest.mark.parametrize("has_cls_token", [True, False])
def test_output_is_attention_over_the_chosen_blocks(has_cls_token):
  variables = with_predictor(variables_std())
  y, sown = run(variables, has_cls_token=has_cls_token, **BLOCK)
  blocks = np.asarray(sown["attn_blocks"])
  assert blocks.shape == (2, H, 6, 2)
  has_own = (blocks == np.arange(6)[None, None, :, None]).any(-1)            # [B, H, NB]
  block_valid = np.asarray(MASK).reshape(2, 6, 4).any(-1)                       # [B, NB]
  assert np.all(has_own[block_valid[:, None, :].repeat(H, 1)])   # every real block keeps itself
  assert set(np.unique(blocks[1])) <= {-1, 0, 1}     # sample 1: only blocks 0, 1 hold real keys
  ref = np_block_attention(variables["params"], np.asarray(X), MASK, blocks, 4, has_cls_token)
  real = np.asarray(MASK)
  np.testing.assert_allclose(np.asarray(y)[real], ref[real], atol=1e-5)


def test_padding_content_never_changes_real_outputs():
  variables = with_predictor(variables_std())
  y1, _ = run(variables, **BLOCK)
  noisy = jnp.where(MASK[..., None], X, 7.0 * jax.random.normal(rng(9), X.shape))
  y2, _ = run(variables, x=noisy, **BLOCK)
  np.testing.assert_allclose(np.asarray(y1)[np.asarray(MASK)], np.asarray(y2)[np.asarray(MASK)],
                             atol=1e-5)


def test_gradients_reach_the_backbone_not_the_predictor():
  def loss(module, params, x, mask):
    y = module.apply({"params": params}, x, mask)
    return jnp.sum(jnp.where(mask[..., None], y, 0.0) ** 2)

  grads = apply_fn(grad_of=loss, **BLOCK)(variables_std()["params"], X, MASK)
  flat = {jax.tree_util.keystr(p): np.asarray(g) for p, g in
          jax.tree_util.tree_flatten_with_path(grads)[0]}
  assert all(np.all(np.isfinite(g)) for g in flat.values())
  assert any(np.abs(g).sum() > 0 for k, g in flat.items() if "query" in k)
  assert all(np.abs(g).sum() == 0 for k, g in flat.items() if "mask_predictor" in k)


@pytest.mark.parametrize("path, expected", [("block", False), ("gather", True)])
def test_no_token_by_token_array(path, expected):
  length = 256
  x = jnp.zeros((1, length, 32))
  module = make(path=path, block_size=32, reduce_n_factor=32, keep_rate=0.25)
  variables = module.init(rng(0), x)
  jaxpr = jax.make_jaxpr(lambda v, x: module.apply(v, x))(variables, x)

  def shapes(jx):
    for eqn in jx.eqns:
      for var in eqn.outvars:
        yield tuple(getattr(var.aval, "shape", ()))
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        yield from shapes(sub)

  square = [s for s in shapes(jaxpr.jaxpr)
            if len(s) >= 2 and s[-1] * s[-2] >= (length - 1) * length]
  assert bool(square) == expected     # the token-level paths form A^ [B, H, N - 1, N]


def test_block_size_error():
  with pytest.raises(ValueError, match="block_size must be >= 1"):
    run(variables_std(), path="block", block_size=0)


def test_block_scores_function_masks_padding():
  coef = jax.nn.softmax(jax.random.normal(rng(0), (1, 1, 5, 3)), -1)
  basis = jnp.abs(jax.random.normal(rng(1), (6, 3)))
  valid = jnp.asarray([[True] * 4 + [False] * 2])
  scores = sparsifiner.block_scores(coef, basis, valid, 2, 4, True)
  assert scores.shape == (1, 1, 2, 2)
  assert float(scores[0, 0, 1, 1]) == 0.0         # block 1 has no real query and no real key


@pytest.mark.parametrize("keep_rate", [0.2, 0.6])
def test_cpu_chunked_block_attention_equals_the_batched_product(keep_rate):
  """On the CPU without dropout the query blocks run in steps (``base.chunked_attention``,
  recomputing backward pass); the batched product with autodiff, which the other platforms and
  dropout use, gives the same values and gradients. With one block kept (keep rate 0.2), a query
  block of padding only has no real key and gets rows of 0 from both."""
  keys = jax.random.split(jax.random.key(5), 5)
  q, k, v, cotangent = (jax.random.normal(key, (2, 20, 3, 8)) for key in keys[:4])
  valid = jnp.ones((2, 20), bool).at[1, 12:].set(False)      # sample 1: blocks 3 and 4 padding
  scores = jax.random.normal(keys[4], (2, 3, 5, 5))
  kwargs = dict(keep_rate=keep_rate, block_size=4, has_cls_token=True, scale=8 ** -0.5)
  chunked = lambda q, k, v: sparsifiner.block_attention(  # noqa: E731
      q, k, v, valid, scores, **kwargs)[0]
  batched = lambda q, k, v: sparsifiner.block_attention(  # noqa: E731
      q, k, v, valid, scores, dropout=lambda w: w, **kwargs)[0]
  jaxpr = str(jax.make_jaxpr(chunked)(q, k, v))
  assert "custom_vjp_call" in jaxpr and "scan" in jaxpr       # the CPU branch is the chunked one
  assert "scan" not in str(jax.make_jaxpr(batched)(q, k, v))
  out_a, vjp_a = jax.vjp(chunked, q, k, v)
  out_b, vjp_b = jax.vjp(batched, q, k, v)
  np.testing.assert_allclose(out_a, out_b, atol=1e-5, rtol=1e-5)
  if keep_rate == 0.2:
    assert not np.any(np.asarray(out_a[1, 16:]))              # the key-less block's rows
  for got, want in zip(vjp_a(cotangent), vjp_b(cotangent)):
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_block_attention_errors_name_the_problem():
  q = jnp.zeros((1, 20, 2, 4))
  valid = jnp.ones((1, 20), bool)
  kwargs = dict(keep_rate=0.4, block_size=4, has_cls_token=False, scale=0.5)
  with pytest.raises(ValueError, match=r"scores must be \[B, H, NB, NB\] = \(1, 2, 5, 5\)"):
    sparsifiner.block_attention(q, q, q, valid, jnp.zeros((1, 2, 4, 4)), **kwargs)
  with pytest.raises(ValueError, match="keep_rate must be in"):
    sparsifiner.block_attention(q, q, q, valid, jnp.zeros((1, 2, 5, 5)),
                                **{**kwargs, "keep_rate": 0.0})
