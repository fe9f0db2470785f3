"""Tests of CASTAttention (clustr_jax/attention/cast.py), our reconstruction of CAST.

Checks docs/cast.md (limiting case, permutation equivariance, gradient reaching the surrogates),
the clustering regimes against independent NumPy selections, padding, the absence of gradients
through the selection, and the absence of any [N, N] intermediate.
"""

import functools

import chex
import flax.linen as nn
import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from clustr_jax.attention import cast
from clustr_jax.attention.cast import CASTAttention
from clustr_jax.attention.dense import DenseAttention

HEADS, FEATURES, LENGTH, CLUSTERS, KAPPA = 4, 32, 16, 4, 5
REAL = (12, 4)  # batch 0: pads and enough real tokens; batch 1: fewer real tokens than KAPPA

# Every value of every option (docs/cast.md, choice points), each at least once.
OPTION_CASES = {"default": {}}
for _option, _values in cast.CHOICES.items():
  for _value in _values[1:]:
    OPTION_CASES[f"{_option}={_value}"] = {_option: _value}
OPTION_CASES["sa_assignment=argmax"] = {"clustering": "sa_top_k"}
for _value in ("greedy", "sequential"):
  OPTION_CASES[f"sa_assignment={_value}"] = {"clustering": "sa_top_k", "sa_assignment": _value}
OPTION_CASES["shared_surrogates"] = {"shared_surrogates": True}
OPTION_CASES["shared_surrogates+sa_top_k"] = {"shared_surrogates": True, "clustering": "sa_top_k"}
OPTION_CASES["tokens+f_product+all"] = {"affinity_softmax_axis": "tokens",
                                        "cluster_affinity": "f_product", "summary_support": "all"}
CLUSTERINGS = {
    "top_k": {}, "sa_argmax": {"clustering": "sa_top_k"},
    "sa_greedy": {"clustering": "sa_top_k", "sa_assignment": "greedy"},
    "sa_sequential": {"clustering": "sa_top_k", "sa_assignment": "sequential"},
}


def make(num_clusters=CLUSTERS, cluster_size=KAPPA, **kwargs):
  return CASTAttention(num_heads=HEADS, qkv_features=FEATURES, num_clusters=num_clusters,
                       cluster_size=cluster_size, **kwargs)


def inputs(seed=0, batch=2, length=LENGTH, real=REAL):
  """NumPy-drawn inputs (no RNG compilation): x [batch, length, FEATURES], mask or None."""
  x = jnp.asarray(np.random.default_rng(seed).standard_normal((batch, length, FEATURES)),
                  jnp.float32)
  if real is None:
    return x, None
  return x, jnp.arange(length)[None, :] < jnp.asarray(real)[:, None]


def variables_for(module, seed=1):
  """Parameters of ``module`` drawn with NumPy (kernels ~ 1/sqrt(fan-in), surrogates ~ N(0, 1)),
  keeping the logical-axis boxes: cheaper than ``module.init`` (no RNG compilation) and with
  well-spread affinities. Cached: the shapes depend only on the settings below."""
  return _variables(module.num_clusters, module.shared_surrogates, module.out_features, seed)


@functools.lru_cache(maxsize=None)
def _variables(num_clusters, shared_surrogates, out_features, seed):
  module = make(num_clusters=num_clusters, cluster_size=1, shared_surrogates=shared_surrogates,
                out_features=out_features)
  x, _ = inputs(real=None)
  abstract = jax.eval_shape(module.init, jax.random.key(0), x)
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    scale = 1.0 if "surrogates" in jax.tree_util.keystr(path) else leaf.shape[0] ** -0.5
    return jnp.asarray(scale * rng.standard_normal(leaf.shape), leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, abstract)


def apply_with_intermediates(module, variables, x, mask=None):
  y, state = module.apply(variables, x, mask, mutable="intermediates")
  return y, {k: v[0] for k, v in state["intermediates"].items()}


def np_params(variables):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), nn.unbox(variables)["params"])


def np_affinity(variables, x, mask, axis="clusters", form="f_sum"):
  """Independent float64 A_g [B, H, C, N] (docs/cast.md, C1/C2), pads at -inf."""
  p, x = np_params(variables), np.asarray(x, np.float64)
  q = np.einsum("bnf,fhd->bhnd", x, p["query"]["kernel"])
  k = np.einsum("bnf,fhd->bhnd", x, p["key"]["kernel"])
  s = p["surrogates"]
  s = np.broadcast_to(s, (q.shape[1],) + s.shape) if s.ndim == 2 else s
  mask = np.ones(x.shape[:2], bool) if mask is None else np.asarray(mask)
  m = mask[:, None, None, :]

  def softmax(a, ax):
    e = np.exp(a - a.max(axis=ax, keepdims=True))
    return e / e.sum(axis=ax, keepdims=True)

  def f(a):
    if axis == "clusters":
      return softmax(a, 2)
    if axis == "tokens":
      return softmax(np.where(m, a, -np.inf), 3)
    return a

  a_q = np.einsum("bhnd,hcd->bhcn", q, s) / np.sqrt(q.shape[-1])
  a_k = np.einsum("bhnd,hcd->bhcn", k, s) / np.sqrt(q.shape[-1])
  a_g = {"f_sum": lambda: f(a_q) + f(a_k), "sum": lambda: a_q + a_k,
         "f_product": lambda: f(a_q) * f(a_k), "query": lambda: a_q}[form]()
  return np.where(m, a_g, -np.inf)


def members(idx, valid):
  """Sets of valid member tokens per leading index (b, h, c)."""
  idx, valid = np.asarray(idx), np.asarray(valid)
  return {pos: set(idx[pos][valid[pos]].tolist()) for pos in np.ndindex(idx.shape[:-1])}


def check_padding_slots(state, mask):
  """Pads are never valid members, never covered, and fill slots only when real tokens run out."""
  idx, valid = np.asarray(state["cluster_indices"]), np.asarray(state["cluster_valid"])
  mask = np.asarray(mask)
  for b in range(mask.shape[0]):
    assert mask[b][idx[b][valid[b]]].all(), "a padded token is a valid member"
    assert (np.asarray(state["coverage"])[b][:, ~mask[b]] == 0).all()
    if mask[b].sum() >= idx.shape[-1]:
      assert mask[b][idx[b]].all(), "a pad was selected although enough real tokens exist"


# ---------------------------------------------------------------- shapes, dtypes, options


def test_init_surrogates_and_logical_axes():
  module = make()
  x, mask = inputs()
  # 'rbg' keys compile far faster than threefry on CPU.
  params = jax.jit(module.init)(jax.random.key(1, impl="rbg"), x, mask)["params"]
  assert params["surrogates"].names == ("heads", "clusters", "kv")
  s = np.asarray(params["surrogates"].value)
  assert s.shape == (HEADS, CLUSTERS, FEATURES // HEADS)
  assert 0.01 < s.std() < 0.03  # C10: normal(0, 0.02)
  assert params["query"]["kernel"].names == ("embed", "heads", "kv")
  shared = jax.eval_shape(make(shared_surrogates=True).init, jax.random.key(1), x)["params"]
  assert shared["surrogates"].names == ("clusters", "kv")
  assert shared["surrogates"].value.shape == (CLUSTERS, FEATURES // HEADS)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("case", ["top_k", "sa_top_k", "shared_surrogates"])
def test_shapes_dtypes_and_intermediates(case, dtype):
  kwargs = {"top_k": {}, "sa_top_k": {"clustering": "sa_top_k"},
            "shared_surrogates": {"shared_surrogates": True}}[case]
  module = make(out_features=24, dtype=dtype, **kwargs)
  x, mask = inputs()
  variables = variables_for(module)
  y, state = apply_with_intermediates(module, variables, x.astype(dtype), mask)
  chex.assert_shape(y, (2, LENGTH, 24))
  chex.assert_type(y, dtype)
  chex.assert_tree_all_finite(y)
  chex.assert_shape([state["cluster_indices"], state["cluster_valid"]],
                    (2, HEADS, CLUSTERS, KAPPA))
  chex.assert_type([state["cluster_indices"], state["cluster_valid"]], [jnp.int32, bool])
  chex.assert_shape(state["coverage"], (2, HEADS, LENGTH))
  chex.assert_shape(state["alpha"], (2, HEADS, CLUSTERS, LENGTH))
  np.testing.assert_allclose(np.asarray(state["alpha"]).sum(axis=2), 1.0, rtol=1e-5)
  # The coverage count is the number of valid slots holding each token.
  idx, valid = np.asarray(state["cluster_indices"]), np.asarray(state["cluster_valid"])
  counts = np.zeros((2, HEADS, LENGTH), int)
  for b, h in np.ndindex(2, HEADS):
    np.add.at(counts[b, h], idx[b, h][valid[b, h]], 1)
  np.testing.assert_array_equal(np.asarray(state["coverage"]), counts)
  check_padding_slots(state, mask)


@pytest.mark.parametrize("case", sorted(OPTION_CASES))
def test_every_option_shapes_and_padding(case):
  """Every option value: shapes, finite outputs, pads never selected when enough real tokens
  exist and never valid otherwise, and appending garbage pads changes no real output."""
  module = make(**OPTION_CASES[case])
  variables = variables_for(module)
  x, mask = inputs()
  y_short = module.apply(variables, x[:, :12], mask[:, :12])
  chex.assert_shape(y_short, (2, 12, FEATURES))
  garbage = 100.0 * jnp.asarray(np.random.default_rng(7).standard_normal(x.shape), jnp.float32)
  x_long = jnp.where(mask[..., None], x, garbage)
  y_long, state = apply_with_intermediates(module, variables, x_long, mask)
  chex.assert_shape(y_long, (2, LENGTH, FEATURES))
  chex.assert_tree_all_finite(y_long)
  real = np.asarray(mask)
  np.testing.assert_allclose(np.asarray(y_long)[real], np.asarray(y_short)[real[:, :12]],
                             atol=1e-5)
  check_padding_slots(state, mask)


def test_fewer_real_tokens_than_cluster_size():
  """Batch 1 has 4 real tokens < KAPPA: every Top-K cluster holds all 4, its pad slots are
  invalid and change nothing, so the result equals cluster_size 4 on the 4 tokens alone."""
  module = make()
  variables = variables_for(module)
  x, mask = inputs()
  y, state = apply_with_intermediates(module, variables, x, mask)
  idx, valid = np.asarray(state["cluster_indices"])[1], np.asarray(state["cluster_valid"])[1]
  np.testing.assert_array_equal(valid, idx < 4)
  y_alone = jax.jit(make(cluster_size=4).apply)(variables, x[1:, :4])
  np.testing.assert_allclose(np.asarray(y)[1, :4], np.asarray(y_alone)[0], atol=1e-5)


def test_dropout_on_intra_weights():
  module = make(dropout_rate=0.5)
  variables = variables_for(module)
  x, mask = inputs()
  y = module.apply(variables, x, mask)
  y_train = module.apply(variables, x, mask, deterministic=False,
                         rngs={"dropout": jax.random.key(3, impl="rbg")})
  chex.assert_tree_all_finite(y_train)
  assert not np.allclose(np.asarray(y), np.asarray(y_train))
  np.testing.assert_array_equal(np.asarray(y), np.asarray(module.apply(variables, x, mask)))


# ---------------------------------------------------------------- properties, jit and not


def dense_by_hand(variables, x, mask):
  """Masked softmax attention in float64 from the module's own q/k/v/out kernels."""
  p, x = np_params(variables), np.asarray(x, np.float64)
  q, k, v = (np.einsum("bnf,fhd->bhnd", x, p[n]["kernel"]) for n in ("query", "key", "value"))
  logits = np.einsum("bhid,bhjd->bhij", q, k) / np.sqrt(q.shape[-1])
  logits = np.where(np.asarray(mask)[:, None, None, :], logits, -np.inf)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  return np.einsum("bhnd,hdf->bnf", np.einsum("bhij,bhjd->bhid", w, v), p["out"]["kernel"])


def check_one_cluster_is_dense(apply, variables):
  """docs/cast.md: N_c = 1, kappa = N gives alpha = 1 and dense softmax attention."""
  x, mask = inputs(real=(16, 11))
  y = np.asarray(apply(variables, x, mask))
  dense = dense_by_hand(variables, x, mask)
  real = np.asarray(mask)
  np.testing.assert_allclose(y[0], dense[0], atol=1e-5, rtol=1e-5)  # batch 0: no padding
  np.testing.assert_allclose(y[real], dense[real], atol=1e-5, rtol=1e-5)


def check_equivariant_padding_invariant_deterministic(apply, variables):
  """Permuting tokens permutes outputs (no ties); pad content never changes real outputs; the
  same inputs and parameters give the same output."""
  x, mask = inputs()
  y = np.asarray(apply(variables, x, mask))
  real = np.asarray(mask)
  np.testing.assert_array_equal(y, np.asarray(apply(variables, x, mask)))

  perm = np.random.default_rng(0).permutation(LENGTH)
  y_perm = np.asarray(apply(variables, x[:, perm], mask[:, perm]))
  np.testing.assert_allclose(y_perm[real[:, perm]], y[:, perm][real[:, perm]], atol=1e-5)

  garbage = 100.0 * jnp.asarray(np.random.default_rng(7).standard_normal(x.shape), jnp.float32)
  y_garbage = np.asarray(apply(variables, jnp.where(mask[..., None], x, garbage), mask))
  chex.assert_tree_all_finite(y_garbage)
  np.testing.assert_allclose(y_garbage[real], y[real], atol=1e-5)


class PropertyTest(chex.TestCase):
  """The key properties with and without jit (the rest of this file runs them un-jitted)."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_one_cluster_of_all_tokens_is_dense_attention(self):
    module = make(num_clusters=1, cluster_size=LENGTH)
    check_one_cluster_is_dense(self.variant(module.apply), variables_for(module))

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(("top_k", "top_k"), ("sa_greedy", "sa_greedy"))
  def test_equivariant_padding_invariant_deterministic(self, case):
    module = make(**CLUSTERINGS[case])
    check_equivariant_padding_invariant_deterministic(self.variant(module.apply),
                                                      variables_for(module))


def test_one_cluster_of_all_tokens_is_dense_attention_other_options():
  module = make(num_clusters=1, cluster_size=LENGTH, clustering="sa_top_k",
                combination="intra_plus_others", summary_support="all", shared_surrogates=True)
  check_one_cluster_is_dense(module.apply, variables_for(module))


@pytest.mark.parametrize("case", ["sa_argmax", "sa_sequential"])
def test_equivariant_padding_invariant_deterministic_other_clusterings(case):
  module = make(**CLUSTERINGS[case])
  check_equivariant_padding_invariant_deterministic(module.apply, variables_for(module))


# ---------------------------------------------------------------- clustering regimes


def np_sa_reference(a_g, kappa, procedure):
  """Member sets per cluster for one (b, h): a_g [C, N] float64 with pads at -inf."""
  num_clusters, n = a_g.shape
  real = np.isfinite(a_g[0])
  sets = [set() for _ in range(num_clusters)]
  if procedure == "argmax":
    assign = np.argmax(a_g, axis=0)
    for c in range(num_clusters):
      cand = [t for t in np.argsort(-a_g[c]) if real[t] and assign[t] == c]
      sets[c] = set(cand[:kappa])
  elif procedure == "greedy":
    taken = np.zeros(n, bool)
    for flat in np.argsort(-a_g, axis=None):
      c, t = divmod(int(flat), n)
      if real[t] and not taken[t] and len(sets[c]) < kappa:
        sets[c].add(t)
        taken[t] = True
  else:  # sequential
    taken = ~real
    for c in range(num_clusters):
      cand = [t for t in np.argsort(-a_g[c]) if not taken[t]][:kappa]
      sets[c] = set(cand)
      taken[cand] = True
  return sets


SELECT = {"top_k": cast.select_top_k, "argmax": cast.select_sa_argmax,
          "greedy": cast.select_sa_greedy, "sequential": cast.select_sa_sequential}


@pytest.mark.parametrize("procedure", ["argmax", "greedy", "sequential"])
def test_sa_selection_functions_match_numpy(procedure):
  """The C4 procedures on random affinities (6 clusters of 7 slots, 48 and 37 real tokens) equal
  plain sequential NumPy implementations, and each token lands in at most one cluster."""
  rng = np.random.default_rng(3)
  real = np.arange(48)[None, :] < np.array([48, 37])[:, None]
  a_g = np.where(real[:, None, None, :], rng.standard_normal((2, 3, 6, 48)), -np.inf)
  idx, valid = SELECT[procedure](jnp.asarray(a_g, jnp.float32),
                                 jnp.asarray(real[:, None, None, :]), kappa=7)
  got = members(idx, valid)
  for b, h in np.ndindex(2, 3):
    chosen = np.asarray(idx)[b, h][np.asarray(valid)[b, h]]
    assert len(chosen) == len(set(chosen.tolist())), "a token is in two clusters"
    expected = np_sa_reference(a_g[b, h], 7, procedure)
    for c in range(6):
      assert got[b, h, c] == expected[c], (b, h, c)


@pytest.mark.parametrize("procedure", ["argmax", "greedy", "sequential"])
def test_sa_top_k_module_assigns_each_token_once(procedure):
  """Sown SA Top-K indices: every token in at most one cluster, matching NumPy on A_g."""
  module = make(clustering="sa_top_k", sa_assignment=procedure)
  variables = variables_for(module)
  x, mask = inputs()
  _, state = apply_with_intermediates(module, variables, x, mask)
  idx, valid = np.asarray(state["cluster_indices"]), np.asarray(state["cluster_valid"])
  a_g = np_affinity(variables, x, mask)
  got = members(idx, valid)
  for b, h in np.ndindex(2, HEADS):
    chosen = idx[b, h][valid[b, h]]
    assert len(chosen) == len(set(chosen.tolist())), "a token is in two clusters"
    expected = np_sa_reference(a_g[b, h], KAPPA, procedure)
    assert all(got[b, h, c] == expected[c] for c in range(CLUSTERS)), (b, h)
  check_padding_slots(state, mask)


@pytest.mark.parametrize("axis,form", [
    ("clusters", "f_sum"), ("clusters", "sum"), ("clusters", "f_product"), ("clusters", "query"),
    ("tokens", "f_sum"), ("none", "f_product")])
def test_top_k_members_are_the_top_affinities(axis, form):
  """Top-K: each cluster's valid members are exactly the top-kappa real tokens by A_g."""
  module = make(affinity_softmax_axis=axis, cluster_affinity=form)
  variables = variables_for(module)
  x, mask = inputs()
  _, state = apply_with_intermediates(module, variables, x, mask)
  a_g = np_affinity(variables, x, mask, axis, form)
  got = members(state["cluster_indices"], state["cluster_valid"])
  for b, h, c in np.ndindex(2, HEADS, CLUSTERS):
    top = np.argsort(-a_g[b, h, c])[:min(KAPPA, int(np.asarray(mask)[b].sum()))]
    assert got[b, h, c] == set(top.tolist()), (b, h, c)
  check_padding_slots(state, mask)


# ---------------------------------------------------------------- gradients


def reference_forward(params, x, mask, idx, valid, combination, summary_support):
  """docs/cast.md's equations written directly with one-hot membership, indices as constants."""
  p = nn.unbox(params)["params"]
  q, k, v = (jnp.einsum("bnf,fhd->bhnd", x, p[n]["kernel"]) for n in ("query", "key", "value"))
  s = p["surrogates"]
  s = jnp.broadcast_to(s, (HEADS,) + s.shape) if s.ndim == 2 else s
  n, scale = x.shape[1], q.shape[-1] ** -0.5
  member = jax.nn.one_hot(idx, n) * valid[..., None]                  # [B, H, C, kappa, N]
  qc, kc, vc = (jnp.einsum("bhcjn,bhnd->bhcjd", member, t) for t in (q, k, v))
  logits = jnp.einsum("bhcid,bhcjd->bhcij", qc, kc) * scale
  w = jax.nn.softmax(jnp.where(valid[..., None, :], logits, -1e30), axis=-1)
  r_intra = jnp.einsum("bhcij,bhcjd->bhcid", w, vc)
  if summary_support == "members":
    a = jnp.where(valid, jnp.einsum("bhcjd,hcd->bhcj", kc, s) * scale, -1e30)
    r_inter = jnp.einsum("bhcj,bhcjd->bhcd", jax.nn.softmax(a, axis=-1) * valid, vc)
  else:
    a = jnp.einsum("bhnd,hcd->bhcn", k, s) * scale
    a = jnp.where(mask[:, None, None, :], a, -1e30)
    r_inter = jnp.einsum("bhcn,bhnd->bhcd", jax.nn.softmax(a, axis=-1), v)
  alpha = jax.nn.softmax(jnp.einsum("bhnd,hcd->bhcn", q, s) * scale, axis=2)
  in_c = member.sum(axis=3)                                           # [B, H, C, N]
  intra_tok = jnp.einsum("bhcjn,bhcjd->bhcnd", member, r_intra)       # [B, H, C, N, d]
  others = jnp.einsum("bhcn,bhcd->bhnd", alpha * (1 - in_c), r_inter)
  if combination == "weighted":
    out = jnp.einsum("bhcn,bhcnd->bhnd", alpha, intra_tok) + others
  else:
    cover = jnp.maximum(in_c.sum(axis=2), 1)[..., None]
    out = intra_tok.sum(axis=2) / cover + others
  return jnp.einsum("bhnd,hdf->bnf", out, p["out"]["kernel"])


@pytest.mark.parametrize("kwargs", [
    {},
    {"combination": "intra_plus_others", "summary_support": "all", "shared_surrogates": True,
     "cluster_size": 8}], ids=["default", "intra_plus_others+all+shared"])
def test_forward_matches_direct_implementation(kwargs):
  """The module equals docs/cast.md written directly for the sown indices (KAPPA leaves some tokens
  uncovered; cluster_size 8 covers some tokens several times)."""
  module = make(**kwargs)
  variables = variables_for(module)
  x, mask = inputs()
  y, state = apply_with_intermediates(module, variables, x, mask)
  reference = jax.jit(reference_forward, static_argnums=(5, 6))  # one compile beats eager here
  y_ref = reference(variables, x, mask, state["cluster_indices"], state["cluster_valid"],
                    module.combination, module.summary_support)
  real = np.asarray(mask)
  np.testing.assert_allclose(np.asarray(y)[real], np.asarray(y_ref)[real], atol=1e-5)


def test_gradients_reach_every_parameter_and_skip_the_indices():
  """Gradients are finite and non-zero for all kernels and the surrogates (N_c > 1), and nothing
  flows through the cluster selection: along a random parameter direction small enough to keep
  every index, the autodiff derivative equals the central finite difference."""
  module = make()
  variables = variables_for(module)
  x, mask = inputs()
  weights = np.random.default_rng(5).standard_normal(x.shape) * np.asarray(mask)[..., None]

  def loss(v):
    y, state = apply_with_intermediates(module, v, x, mask)
    return jnp.sum(y * weights), (state["cluster_indices"], state["cluster_valid"])

  (_, selection), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables)
  chex.assert_tree_all_finite(grads)
  g = nn.unbox(grads)["params"]
  for name in ("query", "key", "value", "out"):
    assert np.abs(np.asarray(g[name]["kernel"])).max() > 0, name
  assert np.abs(np.asarray(g["surrogates"])).max() > 0

  rng = np.random.default_rng(6)
  direction = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype),
                           variables)
  autodiff = sum(float(jnp.vdot(a, b)) for a, b in zip(jax.tree.leaves(grads),
                                                        jax.tree.leaves(direction)))
  for eps in (1e-3, 3e-4, 1e-4):  # the largest step that keeps every cluster's members
    (f_plus, sel_plus), (f_minus, sel_minus) = (
        loss(jax.tree.map(lambda p, d, s=sign: p + s * eps * d, variables, direction))
        for sign in (1.0, -1.0))
    if members(*sel_plus) == members(*selection) == members(*sel_minus):
      break
  else:
    pytest.fail("no step keeps the cluster members")
  finite_difference = (float(f_plus) - float(f_minus)) / (2 * eps)
  np.testing.assert_allclose(autodiff, finite_difference, rtol=1e-2)


@pytest.mark.parametrize("kwargs", [
    {},
    {"combination": "intra_plus_others", "summary_support": "all", "shared_surrogates": True,
     "cluster_size": 8}], ids=["default", "intra_plus_others+all+shared"])
def test_gradients_match_direct_implementation(kwargs):
  """The custom backward passes (chunked intra-cluster attention, softmax and row scaling,
  ``base.softmax`` / ``base.scale_rows``) give the gradients of docs/cast.md, written out, for the
  sown (constant) indices, with respect to every parameter and the input."""
  module = make(**kwargs)
  variables = variables_for(module)
  x, mask = inputs()
  _, state = apply_with_intermediates(module, variables, x, mask)
  idx, valid = state["cluster_indices"], state["cluster_valid"]
  weights = jnp.asarray(np.random.default_rng(7).standard_normal(x.shape)) * mask[..., None]

  grads = jax.jit(jax.grad(lambda v, x: jnp.sum(module.apply(v, x, mask) * weights),
                           argnums=(0, 1)))(variables, x)
  ref = jax.jit(jax.grad(lambda v, x: jnp.sum(reference_forward(
      v, x, mask, idx, valid, module.combination, module.summary_support) * weights),
      argnums=(0, 1)))(variables, x)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(ref)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_chunked_intra_attention_equals_batched_product(dtype, tol):
  """The CPU path of ``intra_cluster_attention`` (steps of clusters, recomputing backward pass)
  equals the batched product with autodiff in values and gradients, invalid slots included;
  B H N_c = 2 * 3 * 6 = 36 is not a multiple of INTRA_CHUNK_CLUSTERS (steps of gcd = 4)."""
  keys = jax.random.split(jax.random.key(3), 5)
  shape = (2, 3, 6, 7, 8)
  q, k, v, cotangent = (jax.random.normal(key, shape, dtype) for key in keys[:4])
  valid = jax.random.bernoulli(keys[4], 0.7, shape[:-1]).at[..., 0].set(True)
  valid = valid.at[0, 0, 0].set(False)  # a cluster without valid members
  # Its rows differ between kernels (0 here) and CAST discards them: no cotangent reaches them.
  cotangent = cotangent.at[0, 0, 0].set(0)
  scale = shape[-1] ** -0.5
  chunked = lambda *a: cast.intra_cluster_attention(*a, valid, scale)  # noqa: E731
  batched = lambda *a: cast._intra_attention(*a, valid, scale)  # noqa: E731
  jaxpr = str(jax.make_jaxpr(chunked)(q, k, v))
  assert "custom_vjp_call" in jaxpr and "scan" in jaxpr  # the CPU branch is the chunked one
  out_a, vjp_a = jax.vjp(chunked, q, k, v)
  out_b, vjp_b = jax.vjp(batched, q, k, v)
  assert not np.any(np.asarray(out_a[0, 0, 0], np.float32))
  np.testing.assert_allclose(np.asarray(out_a, np.float32)[1:], np.asarray(out_b, np.float32)[1:],
                             atol=tol, rtol=tol)
  np.testing.assert_allclose(np.asarray(out_a, np.float32)[0, 0, 1:],
                             np.asarray(out_b, np.float32)[0, 0, 1:], atol=tol, rtol=tol)
  for got, want in zip(vjp_a(cotangent), vjp_b(cotangent)):
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               atol=tol * 4, rtol=tol * 4)


def test_base_softmax_and_scale_rows_gradients_equal_plain_expressions():
  """``base.softmax`` and ``base.scale_rows`` (custom backward passes) against autodiff of
  ``jax.nn.softmax`` and ``w[..., None] * x``, a masked row (MASK_VALUE everywhere) included."""
  from clustr_jax.attention import base
  keys = jax.random.split(jax.random.key(4), 4)
  logits = jax.random.normal(keys[0], (3, 5, 9)).at[1, 2].set(base.MASK_VALUE)
  w, x = jax.random.normal(keys[1], (3, 5)), jax.random.normal(keys[2], (3, 5, 4))
  for fn, plain, args, cot_shape in (
      (base.softmax, lambda a: jax.nn.softmax(a, axis=-1), (logits,), logits.shape),
      (base.scale_rows, lambda w, x: w[..., None] * x, (w, x), x.shape)):
    cotangent = jax.random.normal(keys[3], cot_shape)
    out, vjp = jax.vjp(fn, *args)
    out_plain, vjp_plain = jax.vjp(plain, *args)
    np.testing.assert_allclose(out, out_plain, rtol=1e-6, atol=1e-7)
    for got, want in zip(vjp(cotangent), vjp_plain(cotangent)):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- memory: no [N, N] array


def _avals(jaxpr):
  for eqn in jaxpr.eqns:
    for var in eqn.outvars:
      yield var.aval
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        if isinstance(sub, jex.core.ClosedJaxpr):
          yield from _avals(sub.jaxpr)
        elif isinstance(sub, jex.core.Jaxpr):
          yield from _avals(sub)


def quadratic_arrays(module, length):
  """Arrays in the forward+backward jaxpr with >= length**2 elements or two axes >= length."""
  x = jnp.zeros((1, length, FEATURES))
  mask = jnp.ones((1, length), bool)
  variables = jax.eval_shape(module.init, jax.random.key(0), x, mask)
  grad = jax.grad(lambda v, x: jnp.sum(module.apply(v, x, mask) ** 2), argnums=(0, 1))
  jaxpr = jax.make_jaxpr(grad)(variables, x)
  bad = set()
  for aval in _avals(jaxpr.jaxpr):
    shape = tuple(getattr(aval, "shape", ()))
    if int(np.prod(shape)) >= length * length or sum(n >= length for n in shape) >= 2:
      bad.add(shape)
  return bad


@pytest.mark.parametrize("case", ["default", "combination=intra_plus_others",
                                  "summary_support=all", "affinity_softmax_axis=tokens",
                                  "sa_assignment=argmax", "sa_assignment=greedy",
                                  "sa_assignment=sequential"])
def test_no_length_squared_intermediate(case):
  """At N = 512 with N_c = 4, kappa = 16, no array of the forward+backward is quadratic in N."""
  assert not quadratic_arrays(make(cluster_size=16, **OPTION_CASES[case]), 512)


def test_length_squared_check_fires_on_dense_attention():
  assert quadratic_arrays(DenseAttention(num_heads=HEADS, qkv_features=FEATURES), 512)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("kwargs,match", [
    ({"num_clusters": 0}, "num_clusters must be >= 1"),
    ({"cluster_size": 0}, "cluster_size must be >= 1"),
    ({"cluster_size": LENGTH + 1}, "cluster_size=17 must not exceed the sequence length 16"),
    ({"clustering": "kmeans"}, "clustering='kmeans'; valid choices: 'top_k', 'sa_top_k'"),
    ({"affinity_softmax_axis": "rows"}, "affinity_softmax_axis='rows'; valid choices"),
    ({"cluster_affinity": "max"}, "cluster_affinity='max'; valid choices: 'f_sum', 'sum'"),
    ({"sa_assignment": "random"}, "sa_assignment='random'; valid choices: 'argmax'"),
    ({"summary_support": "none"}, "summary_support='none'; valid choices: 'members', 'all'"),
    ({"combination": "concat"}, "combination='concat'; valid choices: 'weighted'"),
    ({"num_heads": 3}, "divisible by num_heads"),
])
def test_invalid_settings_are_errors(kwargs, match):
  x, _ = inputs()
  module = make(**kwargs) if "num_heads" not in kwargs else CASTAttention(
      qkv_features=FEATURES, num_clusters=4, cluster_size=8, **kwargs)
  with pytest.raises(ValueError, match=match):
    module.init(jax.random.key(1), x)


def test_wrong_mask_shape_is_an_error():
  x, _ = inputs()
  with pytest.raises(ValueError, match="mask must be"):
    make().init(jax.random.key(1), x, jnp.ones((2, LENGTH - 1), bool))
