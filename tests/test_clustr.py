"""ClusTR attention (clustr_jax/attention/clustr.py) against the official algorithm.

The clustering is checked against an independent float64 NumPy transcription of the official
``cluster_dpc_knn_ms`` (YtongXie/ClusTR ``ClusTR.py``; docs/clustr.md), the
attention against softmax attention written out by hand from the module's own parameters.

Speed: almost every test uses (B, N, C) = (2, 16, 32) with scales (4, 8); parameters are built
without compiling ``init``; the functions handed to ``self.variant`` are cached per setting, so
equal settings share one compiled program and the eager runs share their compiled primitives.
"""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jex_core

from clustr_jax.attention import clustr

FEATURES, HEADS, N, SCALES = 32, 4, 16, (4, 8)


def make_x(seed, batch=2, length=N, features=FEATURES):
  """Standard-normal tokens from NumPy (no JAX random compile in the tests)."""
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.standard_normal((batch, length, features)), jnp.float32)


def lengths_mask(length, real):
  return jnp.asarray(np.arange(length)[None, :] < np.asarray(real)[:, None])


def make_module(**kwargs):
  return clustr.ClusTRAttention(num_heads=HEADS, **{"num_clusters": SCALES, **kwargs})


def run(module, params, x, mask=None, rngs=None):
  """(output, {sown name: value}) for one call."""
  y, state = module.apply({"params": params}, x, mask, rngs=rngs, mutable=["intermediates"])
  return y, {name: value[0] for name, value in state["intermediates"].items()}


def numpy(tree):
  """Host copies, so that the checks index NumPy arrays (no eager JAX op per index)."""
  return jax.tree.map(np.asarray, tree)


@functools.lru_cache(maxsize=None)
def runner(module):
  """One function object per module setting (modules compare by value): jit reuses its program."""
  return functools.partial(run, module)


@functools.lru_cache(maxsize=None)
def clusterer(num_clusters=SCALES, chunk_size=None):
  return functools.partial(clustr.dpc_knn_cluster, num_clusters=num_clusters,
                           chunk_size=chunk_size)


def random_params(module, x, seed=0):
  """Parameters with the module's exact tree (``jax.eval_shape`` of ``init``: nothing compiled),
  filled with NumPy normals: kernels 1/sqrt(fan-in), biases 0.1 (non-zero on purpose)."""
  shapes = nn.meta.unbox(jax.eval_shape(module.init, jax.random.key(0), x))["params"]
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    module_name, kind = path[0].key, path[-1].key
    fan_in = int(np.prod(leaf.shape[:2])) if module_name == "proj" else leaf.shape[0]
    std = 0.1 if kind == "bias" else fan_in ** -0.5
    return jnp.asarray(rng.normal(0.0, std, leaf.shape), leaf.dtype)
  return jax.tree_util.tree_map_with_path(fill, shapes)


# --------------------------------------------------------------------------------------------
# Independent references.
# --------------------------------------------------------------------------------------------

def reference_clustering(x, num_clusters, k=5):
  """The official DPC-kNN on one sample, plain NumPy float64. x [N, C] -> [(labels, centres)]."""
  x = np.asarray(x, np.float64)
  n, c = x.shape
  dist = np.zeros((n, n))
  for i in range(n):
    for j in range(n):
      dist[i, j] = np.sqrt(np.sum((x[i] - x[j]) ** 2)) / np.sqrt(c)
  density = np.exp(-np.mean(np.sort(dist, axis=1)[:, :k] ** 2, axis=1))
  delta = np.empty(n)
  for i in range(n):
    denser = [dist[i, j] for j in range(n) if density[j] > density[i]]
    delta[i] = min(denser) if denser else dist.max()
  score = density * delta
  out = []
  for m in num_clusters:
    centres = np.argsort(-score, kind="stable")[:m]
    labels = np.array([int(np.argmin([dist[ck, i] for ck in centres])) for i in range(n)])
    labels[centres] = np.arange(m)
    out.append((labels, centres))
  return out


def canonical(labels):
  """Partition of the tokens as labels renumbered by first appearance (-1 kept)."""
  first, out = {}, []
  for lab in np.asarray(labels).tolist():
    out.append(-1 if lab < 0 else first.setdefault(lab, len(first)))
  return out


@functools.partial(jax.jit, static_argnames="eps")
def hand_attention(p, x, groups, key_masks=None, eps=0.0):
  """ClusTR by hand with fixed clusters, written directly from docs/clustr.md.

  groups: per scale, float one-hot membership [B, M_s, N]; key_masks: per scale bool [B, M_s].
  """
  q = jnp.einsum("bnc,chd->bnhd", x, p["q"]["kernel"]) + p["q"]["bias"]
  w = jnp.exp(x @ p["weight_layer"]["kernel"][:, 0] + p["weight_layer"]["bias"][0])  # [B, N]
  out = 0.0
  for s, g in enumerate(groups):
    g = g * w[:, None, :]                                                  # [B, M, N]
    den = g.sum(-1, keepdims=True)
    xbar = jnp.einsum("bmn,bnc->bmc", g, x) / jnp.where(den > 0, den + eps, 1.0)
    kv = jnp.einsum("bmc,cthd->bmthd", xbar, p[f"kv{s + 1}"]["kernel"]) + p[f"kv{s + 1}"]["bias"]
    logits = jnp.einsum("bnhd,bmhd->bhnm", q, kv[:, :, 0]) / np.sqrt(q.shape[-1])
    if key_masks is not None:
      logits = jnp.where(key_masks[s][:, None, None, :], logits, -1e10)
    out = out + jnp.einsum("bhnm,bmhd->bnhd", jax.nn.softmax(logits, -1), kv[:, :, 1])
  return jnp.einsum("bnhd,hdf->bnf", out, p["proj"]["kernel"]) + p["proj"]["bias"]


def one_hot_groups(labels, num_clusters):
  """labels int [B, S, N] (-1 = none) -> per scale float [B, M_s, N]."""
  labels = np.asarray(labels)
  return [jnp.asarray(labels[:, s, None, :] == np.arange(m)[None, :, None], jnp.float32)
          for s, m in enumerate(num_clusters)]


# --------------------------------------------------------------------------------------------
# Tests.
# --------------------------------------------------------------------------------------------

def test_parameter_layout():
  """Names and shapes mirror the official keys q, weight_layer, kv1, kv2, proj."""
  module = clustr.ClusTRAttention(num_heads=HEADS, qkv_features=48, out_features=24)
  params = jax.eval_shape(module.init, jax.random.key(0), make_x(0))["params"]
  assert jax.tree.map(lambda a: a.shape, nn.meta.unbox(params)) == {
      "q": {"kernel": (FEATURES, HEADS, 12), "bias": (HEADS, 12)},
      "weight_layer": {"kernel": (FEATURES, 1), "bias": (1,)},
      "kv1": {"kernel": (FEATURES, 2, HEADS, 12), "bias": (2, HEADS, 12)},
      "kv2": {"kernel": (FEATURES, 2, HEADS, 12), "bias": (2, HEADS, 12)},
      "proj": {"kernel": (HEADS, 12, 24), "bias": (24,)},
  }
  assert params["kv1"]["kernel"].names == ("embed", None, "heads", "kv")
  # Default scales (N // 2**2, 4 (N // 2**2)) = (4, 16) at N = 16; output width 24.
  y, state = jax.eval_shape(functools.partial(module.apply, mutable=["intermediates"]),
                            {"params": params}, make_x(0))
  assert y.shape == (2, N, 24)
  assert state["intermediates"]["cluster_centres"][0].shape == (2, 2, 16)
  no_bias = jax.eval_shape(module.clone(use_bias=False).init, jax.random.key(0), make_x(0))
  assert set(no_bias["params"]["kv1"]) == {"kernel"} and set(no_bias["params"]["q"]) == {"kernel"}
  assert set(no_bias["params"]["proj"]) == {"kernel", "bias"}            # always, as official


class ClusTRVariantsTest(chex.TestCase):
  """Each key property with and without jit."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_shapes_and_dtypes(self):
    mask = lengths_mask(N, (16, 3))
    rngs = {"clustering": jax.random.key(3)}
    # (The float32 setting is that of the padding and seed tests, so they share one program.)
    for dtype in (jnp.float32, jnp.bfloat16):
      module = make_module(density_noise=True, dtype=dtype)
      x = make_x(0).astype(dtype)
      y, sown = self.variant(runner(module))(random_params(module, x), x, mask, rngs)
      sown = numpy(sown)
      labels, centres = sown["cluster_labels"], sown["cluster_centres"]
      chex.assert_shape(y, (2, N, FEATURES))
      chex.assert_type(y, dtype)
      chex.assert_tree_all_finite(y)
      chex.assert_shape(labels, (2, 2, N))
      chex.assert_shape(centres, (2, 2, 8))
      chex.assert_type([labels, centres], jnp.int32)
      chex.assert_shape([sown["cluster_density"], sown["cluster_delta"]], (2, N))
      chex.assert_type([sown["cluster_density"], sown["cluster_delta"]], jnp.float32)
      # Scale 0 has 4 centres (slots 4.. are -1); sample 1 has only 3 real tokens.
      np.testing.assert_array_equal(centres[:, 0, 4:], -1)
      np.testing.assert_array_equal((centres >= 0).sum(-1), [[4, 8], [3, 3]])

  @chex.variants(with_jit=True, without_jit=True)
  def test_one_token_per_cluster_is_dense_attention(self):
    """num_clusters = [N]: every token is its own cluster, so this is dense attention."""
    module = make_module(num_clusters=(N,), merge_eps=0.0)
    x = make_x(2)
    real_counts = (16, 7)          # sample 1: 7 real tokens < M = 16 (9 empty slots)
    mask = lengths_mask(N, real_counts)
    params = random_params(module, x)
    y, sown = self.variant(runner(module))(params, x, mask)
    groups = np.eye(N, dtype=np.float32)[None] * np.asarray(mask, np.float32)[:, None]
    expected = hand_attention(params, x, [jnp.asarray(groups)], [mask])
    real = np.asarray(mask)
    np.testing.assert_allclose(np.asarray(y)[real], np.asarray(expected)[real], atol=1e-5)
    for b, r in enumerate(real_counts):             # each real token alone in its cluster
      lab = np.asarray(sown["cluster_labels"])[b, 0]
      assert sorted(lab[:r].tolist()) == list(range(r)) and (lab[r:] == -1).all()

  @chex.variants(with_jit=True, without_jit=True)
  def test_clustering_matches_numpy_reference(self):
    cases = [  # seed, length, features, scales, real tokens per sample
        (20, N, FEATURES, SCALES, (16, 16)), (21, N, FEATURES, SCALES, (16, 11)),
        (22, N, FEATURES, SCALES, (13, 16)), (23, 48, 16, (6, 24), (48, 37))]
    for seed, length, features, scales, real_counts in cases:
      x = make_x(seed, length=length, features=features)
      result = numpy(self.variant(clusterer(scales))(x, lengths_mask(length, real_counts)))
      x = np.asarray(x)
      for b, r in enumerate(real_counts):
        for s, (ref_labels, ref_centres) in enumerate(reference_clustering(x[b, :r], scales)):
          labels = result.labels[b, s]
          centres = result.centres[s][b]
          assert canonical(labels[:r]) == canonical(ref_labels), (seed, b, s)
          np.testing.assert_array_equal(labels[r:], -1)
          np.testing.assert_array_equal(centres, ref_centres)     # same centres, same order
          np.testing.assert_array_equal(labels[centres], np.arange(len(centres)))

  @chex.variants(with_jit=True, without_jit=True)
  def test_chunked_distances_equal_unchunked(self):
    x = make_x(5)
    mask = lengths_mask(N, (16, 11))
    unchunked = self.variant(clusterer())(x, mask)
    for chunk in (5,):                               # 5 does not divide 16
      result = self.variant(clusterer(chunk_size=chunk))(x, mask)
      np.testing.assert_array_equal(result.labels, unchunked.labels)
      chex.assert_trees_all_equal(result.centres, unchunked.centres)
      np.testing.assert_allclose(result.density, unchunked.density, rtol=1e-6)
      np.testing.assert_allclose(result.delta, unchunked.delta, rtol=1e-6)
    module = make_module(distance_chunk_size=5)
    params = random_params(module, x)
    y, sown = self.variant(runner(module))(params, x, mask)
    np.testing.assert_array_equal(sown["cluster_labels"], unchunked.labels)
    expected = hand_attention(params, x, one_hot_groups(unchunked.labels, SCALES),
                              [c >= 0 for c in unchunked.centres], eps=1e-6)
    real = np.asarray(mask)
    np.testing.assert_allclose(np.asarray(y)[real], np.asarray(expected)[real], atol=1e-5)

  def test_chunked_delta_from_neighbour_lists_equals_unchunked(self):
    """With length > DELTA_NEIGHBOURS, the chunked path takes delta from the neighbour lists and
    recomputes only the unresolved rows; here more of them than one step holds (several loop
    steps), with padding. Everything equals the unchunked path, which reads the full matrix."""
    length, chunk = 96, 2
    rng = np.random.default_rng(3)   # a random walk: smooth tokens, many local density peaks
    x = np.cumsum(rng.standard_normal((2, length, 4)), axis=1).astype(np.float32)
    mask = lengths_mask(length, (96, 70))
    unchunked = jax.jit(clusterer((4, 12)))(jnp.asarray(x), mask)
    result = jax.jit(clusterer((4, 12), chunk_size=chunk))(jnp.asarray(x), mask)
    np.testing.assert_array_equal(result.labels, unchunked.labels)
    chex.assert_trees_all_equal(result.centres, unchunked.centres)
    np.testing.assert_allclose(result.density, unchunked.density, rtol=1e-6)
    np.testing.assert_allclose(result.delta, unchunked.delta, rtol=1e-6)
    # Count the rows without a denser token among their DELTA_NEIGHBOURS nearest real tokens.
    rho = np.asarray(unchunked.density)
    unresolved = []
    for b, r in enumerate((96, 70)):
      d = np.linalg.norm(x[b, :, None, :r] - x[b, None, :r, :], axis=-1)   # [N, r]
      near = np.argsort(d, axis=1, kind="stable")[:, :clustr.DELTA_NEIGHBOURS]
      unresolved.append(int(np.sum(~np.any(rho[b][near] > rho[b][:, None], axis=1))))
    assert max(unresolved) > min(chunk, clustr.DELTA_STEP_ROWS), unresolved

  @chex.variants(with_jit=True, without_jit=True)
  def test_padding_never_changes_real_tokens(self):
    """Appending garbage tokens with mask False changes nothing (density noise on)."""
    short = 11
    x = make_x(7, length=short)
    mask = lengths_mask(short, (11, 6))
    mask_pad = jnp.asarray(np.concatenate([mask, np.zeros((2, N - short), bool)], axis=1))
    x_pad = np.concatenate([np.asarray(x), np.zeros((2, N - short, FEATURES), np.float32)], 1)
    x_pad = jnp.asarray(np.where(np.asarray(mask_pad)[..., None], x_pad,
                                 50.0 * np.asarray(make_x(9))))                # garbage
    module = make_module(density_noise=True)
    params = random_params(module, x_pad)
    rngs = {"clustering": jax.random.key(11)}
    apply = self.variant(runner(module))
    y, sown = apply(params, x, mask, rngs)
    y_pad, sown_pad = apply(params, x_pad, mask_pad, rngs)
    real = np.asarray(mask)
    np.testing.assert_allclose(np.asarray(y_pad)[:, :short][real], np.asarray(y)[real],
                               atol=1e-5)
    chex.assert_tree_all_finite(y_pad)
    sown, sown_pad = numpy(sown), numpy(sown_pad)
    labels_pad, centres_pad = sown_pad["cluster_labels"], sown_pad["cluster_centres"]
    np.testing.assert_array_equal(labels_pad[:, :, :short], sown["cluster_labels"])
    np.testing.assert_array_equal(centres_pad, sown["cluster_centres"])
    # Padded tokens are never members or centres; each centre is a real token in its cluster.
    padded = ~np.asarray(mask_pad)
    np.testing.assert_array_equal(labels_pad.transpose(0, 2, 1)[padded], -1)
    for b in range(2):
      for s, m in enumerate(SCALES):
        c = centres_pad[b, s]
        valid = c[c >= 0]
        assert len(valid) == min(m, int(np.sum(mask[b])))
        assert not padded[b, valid].any()
        np.testing.assert_array_equal(labels_pad[b, s][valid], np.arange(len(valid)))

  @chex.variants(with_jit=True, without_jit=True)
  def test_same_seed_same_output_with_noise(self):
    module = make_module(density_noise=True)
    x = make_x(12)
    params = random_params(module, x)
    apply = self.variant(runner(module))
    mask = jnp.ones((2, N), bool)
    a = apply(params, x, mask, {"clustering": jax.random.key(0)})
    b = apply(params, x, mask, {"clustering": jax.random.key(0)})
    c = apply(params, x, mask, {"clustering": jax.random.key(1)})
    chex.assert_trees_all_equal(a, b)
    # The noise comes from the stream: another seed gives another density.
    assert not np.array_equal(a[1]["cluster_density"], c[1]["cluster_density"])


def test_density_noise_is_small_and_only_on_when_asked():
  x = make_x(12)
  noisy = clustr.dpc_knn_cluster(x, None, SCALES, noise_rng=jax.random.key(0)).density
  clean = clustr.dpc_knn_cluster(x, None, SCALES).density
  diff = np.asarray(noisy) - np.asarray(clean)
  assert diff.min() >= 0 and diff.max() <= clustr.DENSITY_NOISE_SCALE * 1.01 and diff.max() > 0
  module = make_module()                          # density_noise=False needs no rng
  params = random_params(module, x)
  np.testing.assert_array_equal(run(module, params, x)[0], run(module, params, x)[0])


def test_noise_breaks_ties_differently_per_seed():
  """Tokens in identical pairs tie in density; the noise decides which one of a pair is denser."""
  x = jnp.repeat(make_x(14, length=N // 2), 2, axis=1)     # tokens 2i and 2i+1 are identical
  centres = set()
  for seed in range(4):
    c = clustr.dpc_knn_cluster(x, None, SCALES, noise_rng=jax.random.key(seed)).centres[0]
    centres.add(tuple(np.asarray(c).ravel().tolist()))
  assert len(centres) > 1


def test_gradients_reach_every_parameter_but_not_the_clustering():
  module = make_module()
  x = make_x(15)
  mask = lengths_mask(N, (16, 12))
  params = random_params(module, x)
  probe = jnp.asarray(np.asarray(make_x(17)) * np.asarray(mask)[..., None])

  def loss(params, x):               # aux: the cluster labels of this very call
    y, sown = run(module, params, x, mask)
    return jnp.sum(y * probe), sown["cluster_labels"]

  (value, labels), (grads, grad_x) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1),
                                                                 has_aux=True))(params, x)
  grads = numpy(grads)
  for name in ("q", "weight_layer", "kv1", "kv2", "proj"):
    for leaf, g in grads[name].items():
      assert np.all(np.isfinite(g)), (name, leaf)
      if (name, leaf) != ("weight_layer", "bias"):
        assert np.abs(g).max() > 1e-4, (name, leaf)
  # b_s scales every weight alike, so it acts only through the 1e-6 of the merge.
  assert np.abs(grads["weight_layer"]["bias"]).max() < 1e-3

  # The clustering statistics are under stop_gradient: their gradient is a symbolic zero.
  def stats(x):
    result = clustr.dpc_knn_cluster(x, mask, SCALES)
    return jnp.sum(result.density) + jnp.sum(result.delta)
  # The traced gradient of the statistics does not depend on x at all.
  jaxpr = jax.make_jaxpr(jax.grad(stats))(x).jaxpr
  needed = {v for v in jaxpr.outvars if isinstance(v, jex_core.Var)}
  for eqn in reversed(jaxpr.eqns):
    if any(v in needed for v in eqn.outvars):
      needed.update(v for v in eqn.invars if isinstance(v, jex_core.Var))
  assert jaxpr.invars[0] not in needed

  # d(output)/dx equals that of the same computation with the clusters held fixed (constants).
  groups = one_hot_groups(labels, SCALES)
  fixed_loss = lambda x: jnp.sum(hand_attention(params, x, groups, eps=1e-6) * probe)  # noqa
  fixed_value, fixed_grad_x = jax.jit(jax.value_and_grad(fixed_loss))(x)
  np.testing.assert_allclose(value, fixed_value, rtol=1e-5)
  np.testing.assert_allclose(grad_x, fixed_grad_x, atol=1e-5)


def test_chunked_clustering_and_merge_memory_is_linear_in_length():
  """With distance_chunk_size set, no buffer of the clustering and the merge (forward and
  backward) grows as N^2, even with num_clusters proportional to N: doubling N at most
  (about) doubles XLA's temporary memory (the former one-hot centres and [sum_s M_s, N]
  membership made it 4x)."""
  def temp_bytes(length):
    x = jax.ShapeDtypeStruct((1, length, 8), jnp.float32)
    scales = (length // 16, length // 4)

    def loss(x):
      labels = clustr.dpc_knn_cluster(x, None, scales, chunk_size=64).labels
      return sum(jnp.sum(m ** 2) for m in clustr.merge_tokens(x, x[..., 0], labels, scales, 1e-6))
    return jax.jit(jax.grad(loss)).lower(x).compile().memory_analysis().temp_size_in_bytes

  assert temp_bytes(2048) <= 2.2 * temp_bytes(1024)


def test_few_real_tokens_still_work():
  """Fewer real tokens than knn_k and than every M_s: only real centres, finite outputs."""
  module = make_module(knn_k=5)
  x = make_x(18)
  mask = lengths_mask(N, (3, 0))
  y, sown = run(module, random_params(module, x), x, mask)
  labels, centres = np.asarray(sown["cluster_labels"]), np.asarray(sown["cluster_centres"])
  chex.assert_tree_all_finite(y)
  np.testing.assert_array_equal(np.sort(centres[0, :, :3], axis=-1), [[0, 1, 2]] * 2)
  np.testing.assert_array_equal(centres[0, :, 3:], -1)
  np.testing.assert_array_equal(centres[1], -1)
  np.testing.assert_array_equal(labels[1], -1)
  assert sorted(labels[0, 0, :3].tolist()) == [0, 1, 2]


@pytest.mark.parametrize("kwargs, match", [
    ({"num_clusters": (4, 17)}, "num_clusters"),
    ({"num_clusters": (0,)}, "num_clusters"),
    ({"num_clusters": ()}, "num_clusters"),
    ({"num_clusters": None, "sr_ratio": 8}, "num_clusters.*sr_ratio"),   # 16 // 64 = 0
    ({"num_clusters": None, "sr_ratio": 0}, "sr_ratio"),
    ({"knn_k": 17}, "knn_k"),
    ({"knn_k": 0}, "knn_k"),
    ({"distance_chunk_size": 0}, "distance_chunk_size"),
    ({"merge_eps": -1.0}, "merge_eps"),
])
def test_impossible_settings_are_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    jax.eval_shape(make_module(**kwargs).init, jax.random.key(0), make_x(0))


def test_wrong_mask_shape_is_an_error():
  with pytest.raises(ValueError, match="mask"):
    jax.eval_shape(make_module().init, jax.random.key(0), make_x(0), jnp.ones((2, N - 1), bool))
