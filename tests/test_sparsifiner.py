"""Sparsifiner attention: the official algorithm (docs/sparsifiner.md), its two
modes, the gather path against the masked path, padding, gradients and errors.

Compilation dominates the cost of these tests, so they share one set of inputs and parameters
and a cache of jitted functions keyed by the module settings (``apply_fn``), and draw random
numbers with the 'rbg' PRNG (threefry's compilation costs seconds on the CPU).
"""

import dataclasses
import functools
import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clustr_jax import attention
from clustr_jax.attention import base, sparsifiner
from clustr_jax.attention.sparsifiner import SparsifinerAttention

B, N, F, H, D = 2, 24, 32, 4, 8       # c = 4; reduce_n_factor 4 -> n_down 6
BASE = dict(num_heads=H, reduce_n_factor=4, basis_topk=3, keep_rate=0.25)   # k = 6
X = jnp.asarray(np.random.default_rng(0).normal(size=(B, N, F)), jnp.float32)
MASK = jnp.arange(N)[None, :] < jnp.asarray([N, 5])[:, None]   # sample 1: 5 real tokens < k
FULL = jnp.ones((B, N), bool)


def rng(seed):
  return jax.random.key(seed, impl="rbg")


def make(**kwargs):
  return SparsifinerAttention(**{**BASE, **kwargs})


def jit(fn):
  """jax.jit without LLVM's backend optimisations: compiles 3-4x faster. (test_eager_equals_jit
  and the shared contract tests run the default optimisation level.)"""
  return jax.jit(fn, compiler_options={"xla_backend_optimization_level": 0})


@functools.lru_cache(maxsize=None)
def _apply(settings, grad_of):
  module = make(**dict(settings))
  if grad_of is None:
    return jit(lambda v, x, m: module.apply(v, x, m, mutable="intermediates"))
  return jit(jax.grad(lambda params, x, m: grad_of(module, params, x, m)))


def apply_fn(grad_of=None, **settings):
  """Jitted (variables, x, mask) -> (y, intermediates), or the grad of grad_of, cached by the
  module's full settings (defaults filled in, so equal modules share one compilation)."""
  module = make(**settings)
  full = tuple((f.name, getattr(module, f.name)) for f in dataclasses.fields(module)
               if f.name not in ("parent", "name"))
  return _apply(full, grad_of)


def run(variables, x=X, mask=MASK, **settings):
  y, state = apply_fn(**settings)(variables, x, mask)
  return y, {k: v[0] for k, v in state.get("intermediates", {}).items()}


@functools.lru_cache(maxsize=None)
def init_fn():
  return jit(make().init)


@functools.lru_cache(maxsize=None)
def variables_std():
  """Parameters for [*, 24, 32] inputs (valid for every setting of BASE's sizes)."""
  return nn.meta.unbox(init_fn()(rng(1), X, MASK))


def with_predictor(variables, seed=3, std=1.0):
  """The predictor's weights redrawn with std 1 (not 0.02): no near-ties in A_down or A^."""
  params = variables["params"]
  leaves, tree = jax.tree.flatten(params["mask_predictor"])
  gen = np.random.default_rng(seed)
  new = [jnp.asarray(std * gen.normal(size=leaf.shape), leaf.dtype) for leaf in leaves]
  return {"params": {**params, "mask_predictor": jax.tree.unflatten(tree, new)}}


# ---------------------------------------------------------------------------------------------
# NumPy references, written from the equations of docs/sparsifiner.md, float64.

def np_qkv(params, x):
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  x = np.asarray(x, np.float64)
  q, k, v = (np.einsum("bnf,fhd->bnhd", x, p[n]["kernel"]) + p[n]["bias"]
             for n in ("query", "key", "value"))
  return p, q, k, v


def np_softmax(logits):
  w = np.exp(logits - logits.max(-1, keepdims=True))
  return w / w.sum(-1, keepdims=True)


def np_dense(params, x, valid):
  """Dense softmax attention from the module's own q/k/v/proj parameters."""
  p, q, k, v = np_qkv(params, x)
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(D)
  w = np_softmax(np.where(np.asarray(valid)[:, None, None, :], logits, -np.inf))
  out = np.einsum("bhqk,bkhd->bqhd", w, v)
  return np.einsum("bqhd,hdf->bqf", out, p["proj"]["kernel"]) + p["proj"]["bias"]


def np_official_approx(params, x, has_cls, scale_mode, tau, topk):
  """The official MaskPredictor in mode B without padding, one head at a time: A^ [B, H, Nq, N]."""
  p, q, k, _ = np_qkv(params, x)
  mp = p["mask_predictor"]
  scale = (H if scale_mode == "num_heads" else D) ** -0.5
  out = np.zeros((B, H, N - 1 if has_cls else N, N))
  for b in range(B):
    for h in range(H):
      qt = q[b, :, h] @ mp["proj_c_q"]["kernel"] + mp["proj_c_q"]["bias"]      # N, c
      kt = k[b, :, h] @ mp["proj_c_k"]["kernel"] + mp["proj_c_k"]["bias"]
      kdown = kt.T @ mp["proj_n"]                                               # c, n_down
      coef = np_softmax(((qt[1:] if has_cls else qt) @ kdown) * scale)          # Nq, n_down
      kept = np.zeros_like(coef)
      for r in range(coef.shape[0]):
        top = np.argsort(-coef[r])[:topk]
        kept[r, top] = coef[r, top]
      basis = np.abs(mp["proj_back_n"].T)                                       # n_down, N
      out[b, h] = kept @ np.where(basis > tau, basis, 0.0)
  return out


def np_topk_sets(ahat, k_att):
  """Top-k column sets of each row; asserts that the k-th and (k+1)-th scores differ (no ties)."""
  srt = -np.sort(-ahat, axis=-1)
  assert np.all(srt[..., k_att - 1] - srt[..., k_att] > 1e-6)
  return np.argsort(-ahat, axis=-1)[..., :k_att]


def sets_from_indices(idx):
  return [[[set(r[r >= 0].tolist()) for r in head] for head in sample] for sample in idx]


def sets_from_mask(mask_rows):
  return [[[set(np.nonzero(r)[0].tolist()) for r in head] for head in sample]
          for sample in mask_rows]


# ---------------------------------------------------------------------------------------------
# Shapes, dtypes, jit and eager.

MODES = {   # name -> settings
    "gather": dict(path="gather"),
    "masked": dict(path="masked"),
    "recon": dict(recon_mode=True),
}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("has_cls_token", [True, False])
def test_shapes_dtypes_and_sown_values(dtype, mode, has_cls_token):
  if dtype == jnp.bfloat16 and not has_cls_token:
    pytest.skip("bfloat16 runs with the CLS setting only (compile time)")
  settings = dict(MODES[mode], has_cls_token=has_cls_token, dtype=dtype)
  y, sown = run(variables_std(), X.astype(dtype), **settings)
  chex.assert_shape(y, (B, N, F))
  chex.assert_type(y, dtype)
  chex.assert_tree_all_finite(y)
  rows, k_att = (N - 1 if has_cls_token else N), math.ceil(0.25 * N)
  chex.assert_shape(sown["approx_attn"], (B, H, rows, N))
  chex.assert_type(sown["approx_attn"], jnp.float32)
  if mode == "recon":
    assert set(sown) == {"approx_attn", "unmasked_attn"}
    chex.assert_shape(sown["unmasked_attn"], (B, H, N, N))
    np.testing.assert_allclose(np.sum(np.asarray(sown["unmasked_attn"]), -1), 1.0, atol=1e-5)
  elif mode == "masked":
    assert set(sown) == {"approx_attn", "attn_mask"}
    chex.assert_shape(sown["attn_mask"], (B, H, N, N))
    chex.assert_type(sown["attn_mask"], jnp.bool_)
  else:
    assert set(sown) == {"approx_attn", "attn_indices"}
    chex.assert_shape(sown["attn_indices"], (B, H, rows, k_att))
    chex.assert_type(sown["attn_indices"], jnp.int32)


def test_eager_equals_jit():
  """Op by op (no jit) against jit at XLA's default optimisation level, on the gather path (the
  other tests compare the masked path with it)."""
  module = make(path="gather")
  y_eager, s_eager = module.apply(variables_std(), X, MASK, mutable="intermediates")
  y_jit, s_jit = jax.jit(functools.partial(module.apply, mutable="intermediates"))(
      variables_std(), X, MASK)
  np.testing.assert_allclose(np.asarray(y_eager), np.asarray(y_jit), atol=1e-5)
  np.testing.assert_array_equal(s_eager["intermediates"]["attn_indices"][0],
                                s_jit["intermediates"]["attn_indices"][0])


def test_parameter_layout_mirrors_official_keys():
  shapes = jax.tree.map(lambda a: a.shape, variables_std()["params"])
  assert shapes == {
      "query": {"kernel": (F, H, D), "bias": (H, D)},
      "key": {"kernel": (F, H, D), "bias": (H, D)},
      "value": {"kernel": (F, H, D), "bias": (H, D)},
      "proj": {"kernel": (H, D, F), "bias": (F,)},
      "mask_predictor": {
          "proj_c_q": {"kernel": (D, D // 2), "bias": (D // 2,)},
          "proj_c_k": {"kernel": (D, D // 2), "bias": (D // 2,)},
          "proj_n": (N, N // 4),
          "proj_back_n": (N, N // 4),
      },
  }
  mp = variables_std()["params"]["mask_predictor"]
  assert 0.01 < float(jnp.std(mp["proj_n"])) < 0.03          # timm trunc_normal_(std=.02)
  assert not np.any(np.asarray(mp["proj_c_q"]["bias"]))
  no_bias = jax.eval_shape(make(use_bias=False, out_features=16).init, rng(0), X)
  no_bias = nn.meta.unbox(no_bias["params"])
  assert set(no_bias["query"]) == {"kernel"} and set(no_bias["proj"]) == {"kernel", "bias"}
  assert no_bias["proj"]["kernel"].shape == (H, D, 16)


# ---------------------------------------------------------------------------------------------
# Limiting cases and path equivalence.

@pytest.mark.parametrize("path, has_cls_token",
                         [("gather", True), ("masked", True), ("gather", False)])
def test_keep_rate_one_is_dense_attention(path, has_cls_token):
  y, _ = run(variables_std(), keep_rate=1.0, path=path, has_cls_token=has_cls_token)
  np.testing.assert_allclose(np.asarray(y), np_dense(variables_std()["params"], X, MASK),
                             atol=1e-5)


@pytest.mark.parametrize("has_cls_token", [True, False])
def test_recon_mode_output_is_dense_attention(has_cls_token):
  y, sown = run(variables_std(), recon_mode=True, has_cls_token=has_cls_token)
  np.testing.assert_allclose(np.asarray(y), np_dense(variables_std()["params"], X, MASK),
                             atol=1e-5)
  assert float(jnp.min(sown["approx_attn"])) < 0.0       # mode A's A^ uses the signed basis


@pytest.mark.parametrize("keep_rate, has_cls_token",
                         [(0.1, True), (0.25, True), (0.25, False), (1.0, True)])
def test_gather_path_equals_masked_path(keep_rate, has_cls_token):
  settings = dict(keep_rate=keep_rate, has_cls_token=has_cls_token)
  variables = with_predictor(variables_std())   # fewer ties; the paths share the selection anyway
  y_g, s_g = run(variables, path="gather", **settings)
  y_m, s_m = run(variables, path="masked", **settings)
  np.testing.assert_allclose(np.asarray(y_g), np.asarray(y_m), atol=1e-5)
  # The same connectivity: each mask row is exactly the set of (real) selected indices.
  attn_mask = np.asarray(s_m["attn_mask"])
  start = 1 if has_cls_token else 0
  indices = np.asarray(s_g["attn_indices"])
  assert sets_from_mask(attn_mask[:, :, start:]) == sets_from_indices(indices)
  if has_cls_token:   # the CLS row is dense over the real keys
    np.testing.assert_array_equal(attn_mask[:, :, 0],
                                  np.broadcast_to(np.asarray(MASK)[:, None], (B, H, N)))


def test_gather_path_gradients_equal_masked_path():
  """The CPU gather path has its own backward pass (chunked, recomputing the gathered rows)."""
  grads = [apply_fn(_task_loss, path=p)(variables_std()["params"], X, MASK)
           for p in ("gather", "masked")]
  scale = max(float(jnp.max(jnp.abs(m))) for m in jax.tree.leaves(grads[1]))
  for g, m in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1]), strict=True):
    # (The key bias's gradient is zero up to rounding: softmax ignores a shift per row.)
    np.testing.assert_allclose(np.asarray(g), np.asarray(m), rtol=1e-4, atol=1e-6 * scale)


def test_chunked_rows_attention_equals_batched_gather():
  """The CPU implementation (flattened, 32-row steps, custom VJP) against the one used on other
  platforms (one batched gather, autodiff): values and gradients, with masked slots, an empty row
  and a row count that is not a multiple of the step."""
  gen = np.random.default_rng(5)
  batch, rows, table, k_att = (2, 3), 15, 20, 7
  q, k, v = (jnp.asarray(gen.normal(size=batch + s), jnp.float32)
             for s in [(rows, D), (table, D), (table, D)])
  index = jnp.asarray(gen.integers(0, table, size=batch + (rows, k_att)), jnp.int32)
  slot_valid = jnp.asarray(gen.random(batch + (rows, k_att)) > 0.3).at[1, 2, 3].set(False)
  cot = jnp.asarray(gen.normal(size=batch + (rows, D)), jnp.float32)

  def loss(fn, q, k, v):
    return jnp.sum(fn(q, k, v, index, slot_valid, 0.3) * cot)

  plain = functools.partial(loss, sparsifiner._rows_attention)
  cpu = functools.partial(loss, sparsifiner._cpu_rows_attention)
  np.testing.assert_allclose(jit(cpu)(q, k, v), jit(plain)(q, k, v), rtol=1e-5)
  for g_cpu, g_plain in zip(jit(jax.grad(cpu, (0, 1, 2)))(q, k, v),
                            jit(jax.grad(plain, (0, 1, 2)))(q, k, v), strict=True):
    np.testing.assert_allclose(np.asarray(g_cpu), np.asarray(g_plain), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# The mask against the official predictor.

@pytest.mark.parametrize("has_cls_token, predictor_scale",
                         [(True, "num_heads"), (False, "num_heads"), (True, "head_dim")])
def test_mask_matches_numpy_official_predictor(has_cls_token, predictor_scale):
  """Random std-1 predictor weights (tau = 0.02 then zeroes ~1.6 % of the basis): no ties."""
  variables = with_predictor(variables_std())
  ahat = np_official_approx(variables["params"], X, has_cls_token, predictor_scale, 0.02, 3)
  expected = [[[set(r.tolist()) for r in head] for head in sample]
              for sample in np_topk_sets(ahat, math.ceil(0.25 * N))]
  settings = dict(has_cls_token=has_cls_token, predictor_scale=predictor_scale)
  _, s_g = run(variables, mask=FULL, path="gather", **settings)
  np.testing.assert_allclose(np.asarray(s_g["approx_attn"]), ahat, rtol=1e-4, atol=1e-6)
  assert sets_from_indices(np.asarray(s_g["attn_indices"])) == expected
  if predictor_scale == "num_heads":
    _, s_m = run(variables, mask=FULL, path="masked", **settings)
    start = 1 if has_cls_token else 0
    assert sets_from_mask(np.asarray(s_m["attn_mask"])[:, :, start:]) == expected


def test_default_init_approx_attn_matches_numpy_and_selection_is_top():
  """Default weights (std 0.02, tau 0.02: a sparse, tied A^): A^ itself, and every selected
  key scores at least as high as every unselected real key."""
  _, sown = run(variables_std(), mask=FULL)
  ahat = np_official_approx(variables_std()["params"], X, True, "num_heads", 0.02, 3)
  np.testing.assert_allclose(np.asarray(sown["approx_attn"]), ahat, rtol=1e-4, atol=1e-7)
  idx = np.asarray(sown["attn_indices"])
  chosen = np.take_along_axis(ahat, idx, -1).min(-1)
  unchosen = np.where(np.any(np.arange(N) == idx[..., None], -2), -np.inf, ahat).max(-1)
  assert np.all(chosen >= unchosen - 1e-6)


# ---------------------------------------------------------------------------------------------
# Padding.

def test_budget_is_clipped_per_sample():
  """Sample 1 has 5 real keys < k = 6: all 5 are selected and the surplus slot is masked."""
  _, sown = run(variables_std())
  idx = np.asarray(sown["attn_indices"])
  assert np.all((idx[0] >= 0).sum(-1) == 6)
  np.testing.assert_array_equal(np.sort(idx[1], -1),
                                np.broadcast_to(np.arange(-1, 5), (H, N - 1, 6)))


@pytest.mark.parametrize("mode", sorted(MODES))
def test_padding_content_never_changes_real_outputs(mode):
  settings = dict(MODES[mode], token_keep_rate=0.5)
  garbage = 100.0 * jnp.asarray(np.random.default_rng(7).normal(size=X.shape), jnp.float32)
  x2 = jnp.where(MASK[..., None], X, garbage)
  (y1, s1), (y2, s2) = run(variables_std(), **settings), run(variables_std(), x2, **settings)
  real = np.asarray(MASK)
  np.testing.assert_allclose(np.asarray(y1)[real], np.asarray(y2)[real], atol=1e-5)
  chex.assert_tree_all_finite(y2)
  np.testing.assert_array_equal(s1["token_keep_mask"], s2["token_keep_mask"])


@pytest.mark.parametrize("path", ["gather", "masked"])
def test_appending_padding_never_changes_real_outputs(path):
  """24 real tokens, then the same 24 followed by 3 pads (a model for 27 tokens sharing the
  first 24 rows of proj_n / proj_back_n): k = ceil(0.1 * 24) = ceil(0.1 * 27) = 3 and
  n_down = 24 // 4 = 27 // 4 = 6, so both select the same number of keys."""
  short = variables_std()["params"]
  gen = np.random.default_rng(11)
  x_long = jnp.concatenate([X, jnp.asarray(gen.normal(size=(B, 3, F)), jnp.float32)], axis=1)
  mp = dict(short["mask_predictor"])
  for name in ("proj_n", "proj_back_n"):
    extra = jnp.asarray(0.02 * gen.normal(size=(3, N // 4)), jnp.float32)
    mp[name] = jnp.concatenate([mp[name], extra], axis=0)
  long = {"params": {**short, "mask_predictor": mp}}
  y_short, _ = run({"params": short}, mask=FULL, keep_rate=0.1, path=path)
  mask_long = jnp.broadcast_to(jnp.arange(N + 3) < N, (B, N + 3))
  y_long, _ = run(long, x_long, mask_long, keep_rate=0.1, path=path)
  np.testing.assert_allclose(np.asarray(y_long)[:, :N], np.asarray(y_short), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Gradients.

def _task_loss(module, params, x, mask):
  y = module.apply({"params": params}, x, mask)
  return jnp.sum(jnp.where(mask[..., None], y, 0.0) ** 2)


def _recon_loss(module, params, x, mask):
  """L_recon = sum (A^ - A_teacher[:, :, 1:])^2 on the sown approx_attn (docs/vision.md)."""
  _, state = module.apply({"params": params}, x, mask, mutable="intermediates")
  teacher = jax.lax.stop_gradient(state["intermediates"]["unmasked_attn"][0][:, :, 1:])
  return jnp.sum((state["intermediates"]["approx_attn"][0] - teacher) ** 2)


@pytest.mark.parametrize("path", ["gather", "masked"])
def test_gradients_mode_b_reach_backbone_not_predictor(path):
  grads = apply_fn(_task_loss, path=path)(variables_std()["params"], X, MASK)
  chex.assert_tree_all_finite(grads)
  for name in ("query", "key", "value", "proj"):
    for leaf in jax.tree.leaves(grads[name]):
      assert float(jnp.max(jnp.abs(leaf))) > 0.0, name
  for leaf in jax.tree.leaves(grads["mask_predictor"]):
    np.testing.assert_array_equal(np.asarray(leaf), 0.0)


def test_recon_mode_reconstruction_loss_trains_the_predictor():
  grads = apply_fn(_recon_loss, recon_mode=True)(variables_std()["params"], X, MASK)
  chex.assert_tree_all_finite(grads)
  for leaf in jax.tree.leaves(grads["mask_predictor"]):
    assert float(jnp.max(jnp.abs(leaf))) > 0.0


# ---------------------------------------------------------------------------------------------
# Token pruning, dropout, determinism, errors.

def test_token_pruning_keeps_top_cls_attended_patches():
  rate = 0.5
  y_m, s_m = run(variables_std(), path="masked", token_keep_rate=rate)
  y_g, s_g = run(variables_std(), path="gather", token_keep_rate=rate)
  np.testing.assert_allclose(np.asarray(y_g), np.asarray(y_m), atol=1e-5)
  np.testing.assert_array_equal(s_g["token_keep_mask"], s_m["token_keep_mask"])
  keep = np.asarray(s_m["token_keep_mask"])
  chex.assert_shape(keep, (B, N))
  budget = math.ceil(rate * (N - 1))                               # 12
  assert keep[:, 0].all()                                           # CLS kept
  assert keep[0].sum() == budget + 1
  np.testing.assert_array_equal(keep[1], np.asarray(MASK[1]))       # clipped to the real tokens
  # The kept patches are the best by the head-mean CLS attention (after masking).
  _, q, k, _ = np_qkv(variables_std()["params"], X)
  logits = np.einsum("bhd,bkhd->bhk", q[:, 0], k) / math.sqrt(D)
  score = np_softmax(np.where(np.asarray(MASK)[:, None], logits, -np.inf)).mean(1)[:, 1:]
  top = np.argsort(-score[0])[:budget] + 1
  assert set(np.nonzero(keep[0])[0].tolist()) == {0, *top.tolist()}
  # recon_mode skips pruning (official): the keep mask is the input mask.
  _, s_r = run(variables_std(), recon_mode=True, token_keep_rate=rate)
  np.testing.assert_array_equal(s_r["token_keep_mask"], MASK)


def test_dropout_and_determinism():
  again = nn.meta.unbox(init_fn()(rng(1), X, MASK))
  chex.assert_trees_all_equal(again, variables_std())
  y1, _ = run(variables_std())
  y2, _ = run(variables_std())
  np.testing.assert_array_equal(y1, y2)
  module = make(dropout_rate=0.5)
  drop = jit(lambda v, r: module.apply(v, X, MASK, deterministic=False, rngs={"dropout": r}))
  d1, d2 = drop(variables_std(), rng(5)), drop(variables_std(), rng(5))
  np.testing.assert_array_equal(d1, d2)
  assert float(jnp.max(jnp.abs(d1 - y1))) > 1e-3


@pytest.mark.parametrize("settings, length, match", [
    (dict(keep_rate=0.0), N, r"keep_rate must be in \(0, 1\]"),
    (dict(keep_rate=1.5), N, r"keep_rate must be in \(0, 1\]"),
    (dict(token_keep_rate=0.0), N, r"token_keep_rate must be in \(0, 1\]"),
    (dict(token_keep_rate=1.2), N, r"token_keep_rate must be in \(0, 1\]"),
    (dict(token_keep_rate=0.5, has_cls_token=False), N, "needs has_cls_token=True"),
    (dict(path="sparse"), N, "unknown path 'sparse'"),
    (dict(predictor_scale="d"), N, "unknown predictor_scale 'd'"),
    (dict(reduce_n_factor=32), N, "reduce_n_factor=32 gives n_down"),
    (dict(reduce_c_factor=16), N, "reduce_c_factor=16 gives c"),
    (dict(basis_topk=7), N, r"basis_topk=7 must be in \[1, n_down\]"),
    (dict(), 1, "has_cls_token=True needs length >= 2"),
])
def test_setting_errors(settings, length, match):
  x = jnp.zeros((B, length, F))
  with pytest.raises(ValueError, match=match):
    jax.eval_shape(make(**settings).init, rng(1), x)


def test_length_and_mask_errors():
  apply = lambda x, m=None: jax.eval_shape(make().apply, variables_std(), x, m)  # noqa: E731
  with pytest.raises(ValueError, match=r"initialised for length 24.*length 20.*reduce_n_factor=4"):
    apply(X[:, :20])
  with pytest.raises(ValueError, match="initialised for length 24"):   # same n_down, other N
    apply(jnp.zeros((B, N + 2, F)))
  with pytest.raises(ValueError, match="mask"):
    apply(X, jnp.ones((B, N - 1), bool))


def test_registry_name():
  assert attention.get("sparsifiner") is SparsifinerAttention


@pytest.mark.parametrize("n,k", [(1, 1), (7, 1), (37, 8), (170, 8), (256, 16), (64, 40)])
def test_base_top_k_equals_xla_top_k_ties_included(n, k):
  """``base.top_k`` (on the CPU a tournament over groups where k <= n / 4, as for Sparsifiner's
  keys and predictor coefficients and CAST's members) against ``jax.lax.top_k``: equal values
  and indices (ties go to the lower index, -0.0 ranks below 0.0) and the same gradient, with
  repeated values and -inf entries."""
  x = jnp.asarray(np.round(np.random.default_rng(n).standard_normal((2, 3, 5, n)) * 4) / 4,
                  jnp.float32)
  x = x.at[0, 0, 0, : n // 2].set(-jnp.inf).at[1, 2, 4].set(0.5)   # -inf entries; a tied row
  if k <= n // 4:   # the CPU runs the tournament, not XLA's TopK
    assert "TopK" not in jax.jit(lambda x: base.top_k(x, k)).lower(x).compile().as_text()
  values, index = jax.jit(lambda x: base.top_k(x, k))(x)
  want_values, want_index = jax.lax.top_k(x, k)
  np.testing.assert_array_equal(values, want_values)
  np.testing.assert_array_equal(index, want_index)
  assert index.dtype == jnp.int32
  weights = jnp.arange(1.0, k + 1.0)
  finite = lambda f: lambda x: jnp.sum(jnp.where(jnp.isfinite(f(x)[0]), f(x)[0], 0) * weights)  # noqa: E731
  np.testing.assert_array_equal(jax.grad(finite(lambda x: base.top_k(x, k)))(x),
                                jax.grad(finite(lambda x: jax.lax.top_k(x, k)))(x))


def test_base_top_k_and_chunked_attention_errors_name_the_problem():
  with pytest.raises(ValueError, match=r"k=0 must be in \[1, 5\]"):
    base.top_k(jnp.zeros((3, 5)), 0)
  q = jnp.zeros((6, 4, 8))
  with pytest.raises(ValueError, match="rows=4 must be >= 1 and divide the 6 sequences"):
    base.chunked_attention(q, q, q, jnp.ones((6, 4), bool), 1.0, 4)
  with pytest.raises(ValueError, match=r"key_valid must be \[G, Lk\]"):
    base.chunked_attention(q, q, q, jnp.ones((6, 5), bool), 1.0, 2)
