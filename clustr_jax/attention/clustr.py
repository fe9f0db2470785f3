"""ClusTR: clustering-guided multi-scale attention, as the official code does it.

Source: Y. Xie, J. Zhang, Y. Xia, A. van den Hengel, Q. Wu, "ClusTR: Exploring Efficient
Self-attention via Clustering for Vision Transformers", arXiv 2208.13138 (2022). Official code:
GitHub ``YtongXie/ClusTR`` (commit 3b5e28d), ``ClusTR.py``: class ``Attention`` (``forward``,
``ms_kv``, ``compute_att``) and the functions ``cluster_dpc_knn_ms`` and ``merge_tokens``.
Documentation: ``docs/clustr.md`` ("Equations and shapes", "Where we differ ...").

Notation: x [B, N, C] is the (already layer-normalized) block input, H heads of width d
(H d = qkv_features, C by default), S scales with M_s clusters each (default
M = (N // sr^2, 4 (N // sr^2)), from the actual N, as the official ``Attention.forward``).

  Q   = x W_q + b_q                                              [B, N, H, d]
  w   = exp(x w_s + b_s)          (param 'weight_layer')         [B, N]
  DPC-kNN clustering on stop_gradient(x) in float32 (no gradient; ``dpc_knn_cluster``):
    D_ij  = sqrt(max(|x_i|^2 + |x_j|^2 - 2 x_i.x_j, 0)) / sqrt(C)   [B, N, N] (torch.cdist's
            matrix-multiplication formula, used by torch for > 25 points; HIGHEST precision)
    rho_i = exp(-mean_{j in kNN_k(i)} D_ij^2) (+ 1e-6 U(0,1) if density_noise)   [B, N]
            (kNN_k(i): the k = knn_k smallest entries of row i, i itself included)
    delta_i = min_{j: rho_j > rho_i} D_ij, or max_{j,l} D_jl if no token is denser   [B, N]
    gamma = rho * delta                                            [B, N]
    per scale s: c^s = top-M_s(gamma)                              [B, M_s]
                 a^s_i = argmin_k D(c^s_k, i);  then a^s_{c^s_k} = k   [B, N]
  per scale s (differentiable in x and in weight_layer):
    xbar^s_k = sum_{i: a^s_i = k} w_i x_i / (sum_{i: a^s_i = k} w_i + merge_eps)   [B, M_s, C]
    K_s, V_s = xbar^s W_kv_s + b_kv_s       (param 'kv{s+1}')     [B, M_s, H, d] each
    O_s = softmax(Q K_s^T / sqrt(d)) V_s    (own softmax per scale) [B, N, H, d]
  y = (sum_s O_s) W_proj + b_proj                                  [B, N, out_features]

Parameters (names mirror the official state-dict keys ``attn.q``, ``attn.weight_layer``,
``attn.kv1``, ``attn.kv2``, ``attn.proj``; a PyTorch Linear weight W is [out, in]):
  q/kernel [C, H, d] (= W.T reshaped), q/bias [H, d] (if use_bias);
  weight_layer/kernel [C, 1] (= W.T), weight_layer/bias [1] (always);
  kv{s}/kernel [C, 2, H, d] (= W.T reshaped: index 0 = the first qkv_features outputs = K,
    index 1 = the next ones = V; heads are contiguous blocks of d), kv{s}/bias [2, H, d];
  proj/kernel [H, d, out] (= W.T reshaped), proj/bias [out] (always).
Initialisation: q, kv and proj use the codebase defaults (xavier-uniform with the fans of the flat
matrices, zero biases); weight_layer uses normal(0.02), bias 0, as the official trunc_normal_(0.02)
(whose cut at +-2 in absolute value never bites), so that w ~ 1 at initialisation.

Cost per layer: clustering O(N^2 C) for the distances plus O(N^2 t) for the nearest-neighbour
selection (t = max(k, DELTA_NEIGHBOURS) when chunked, else k). Unchunked, delta reads the full
matrix. Chunked, the official second pass over all N^2 distances for delta is replaced, with the
same result, by the neighbour lists of the density pass: a row with a denser token among its t
nearest real tokens takes its delta from there (the nearest denser token must be in the list),
and only the other rows (local density peaks: a few percent of the tokens, 0.2-6 % at
N = 1024-4096 in our checks) have their distance rows recomputed, O(N_peaks N C). The assignment
O(N max_s M_s C) (one pass: top_k is sorted, so the centres of a smaller scale are a prefix of the
largest scale's); the merge O(N C) per scale (segment reductions, as the official index_add);
attention O(N sum_s M_s H d). Memory: unchunked, the [B, N, N] distance matrix (about 39 MB per
sample at N = 3136 in float32) and a few arrays of that size (XLA's temporary buffers for B = 2,
N = 3136, C = 64 on CPU: 302 MB); with ``distance_chunk_size`` = q, O(B N q) for the distance
rows and O(B q max_s M_s) for the assignment (same setting, q = 256: 16 MB). In both cases add
the attention weights O(B H N sum_s M_s), the attention itself; no other array grows as
N sum_s M_s. Chunked and unchunked runs give the same clusters: every statistic is per row (the
global maximum distance is the maximum of the per-row maxima). The clustering and the merge are
jitted functions of their own (static settings), so they compile once even when the module runs
eagerly.

Where we differ from the official code:
  * Padding (the official ``Attention`` has none). A padded token is never a centre and never a
    member: it is excluded from every kNN neighbour set (a real token with fewer than k real
    neighbours averages over those it has; the official ``token_mask`` path of
    ``cluster_dpc_knn_ms`` would instead count padded neighbours at distance max(D) + 1), from the
    delta candidates, from the maximum distance, from the top-M centre choice and from the merge.
    With fewer real tokens than M_s, only real tokens become centres and the remaining centre slots
    are empty and masked out of the key set. Padded tokens' own outputs are finite but
    meaningless. Padded positions get label -1 and empty centre slots centre -1.
  * The official code clusters the batch in 4 chunks of B // 4 samples and so fails for B < 4; we
    cluster any batch, and ``distance_chunk_size`` chunks the queries (rows of D) instead.
  * The density noise is drawn per token position from the rng stream 'clustering' (key folded
    with the position), so appending padding does not change it; it is off by default.
  * Token weights and the merge are computed in float32 and stabilised with a per-cluster maximum
    of the scores: xbar_k = sum e^{s_i - m_k} x_i / (sum e^{s_i - m_k} + eps e^{-m_k}) with
    m_k = max_{i in k} s_i (no gradient), which equals the official formula exactly in real
    arithmetic but does not overflow for large scores.
  * Under a bfloat16 ``dtype`` the clustering, token weights, merge and attention logits/softmax
    still run in float32 (the official code runs everything in the input dtype); projections and
    the attention-weighted sum of values run in ``dtype``.

Sown into 'intermediates' (for plots): 'cluster_labels' int32 [B, S, N] (cluster of each token per
scale, -1 for padding), 'cluster_centres' int32 [B, S, max_s M_s] (token index of each centre in
score order; -1 for empty slots and beyond M_s), and the DPC decision-graph coordinates
'cluster_density' (rho, noise included, 0 for padding) and 'cluster_delta', float32 [B, N].
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from clustr_jax.attention import base

_NAME = "ClusTRAttention"

#: Amplitude of the official tie-breaking density noise, 1e-6 * U(0, 1).
DENSITY_NOISE_SCALE = 1e-6

#: Nearest real tokens kept per row by the chunked density pass: a row with a denser token among
#: them gets delta from that list; only the others (local density peaks, a few percent of the
#: tokens) have their distance row recomputed for delta.
DELTA_NEIGHBOURS = 16

#: Rows per step of that recomputation (at most the chunk size).
DELTA_STEP_ROWS = 64


class Clustering(NamedTuple):
  """Result of ``dpc_knn_cluster`` (all integer or without gradient).

  labels: int32 [B, S, N], cluster index in [0, M_s) of each token per scale; -1 for padding.
  centres: per scale, int32 [B, M_s], the token index of each cluster's centre in descending
    score order; -1 for an empty slot (fewer real tokens than M_s).
  density: float32 [B, N], rho (noise included); 0 for padding.
  delta: float32 [B, N], distance to the nearest denser token (max distance for the densest).
  """
  labels: jax.Array
  centres: tuple[jax.Array, ...]
  density: jax.Array
  delta: jax.Array


def default_num_clusters(length: int, sr_ratio: int) -> tuple[int, int]:
  """The official two scales (M, 4M) with M = length // sr_ratio**2 (``Attention.forward``)."""
  m = length // sr_ratio ** 2
  return (m, 4 * m)


def check_clustering_settings(length: int, num_clusters: Sequence[int], knn_k: int,
                              chunk_size: int | None, name: str) -> tuple[int, ...]:
  """Validates the clustering settings for a sequence of ``length`` tokens.

  Returns:
    ``num_clusters`` as a tuple of ints.

  Raises:
    ValueError: no scales, a num_clusters entry outside [1, length], knn_k outside [1, length],
      or distance_chunk_size < 1; the message names the setting.
  """
  num_clusters = tuple(int(m) for m in num_clusters)
  if not num_clusters:
    raise ValueError(f"{name}: num_clusters must name at least one scale; got {num_clusters}")
  if any(m < 1 or m > length for m in num_clusters):
    raise ValueError(
        f"{name}: every num_clusters entry must be in [1, length={length}]; got {num_clusters}")
  if knn_k < 1 or knn_k > length:
    raise ValueError(f"{name}: knn_k must be in [1, length={length}]; got knn_k={knn_k}")
  if chunk_size is not None and chunk_size < 1:
    raise ValueError(f"{name}: distance_chunk_size must be >= 1 or None; got {chunk_size}")
  return num_clusters


# --------------------------------------------------------------------------------------------
# Clustering (DPC-kNN, ``cluster_dpc_knn_ms``). Row functions take a block of rows (queries) of
# the distance matrix, d: float32 [B, q, N], with row_mask bool [B, q] and col_mask bool [B, N].
# --------------------------------------------------------------------------------------------

def _pairwise(a: jax.Array, a_sq: jax.Array, b: jax.Array, b_sq: jax.Array) -> jax.Array:
  """D(a_i, b_j) = sqrt(max(|a_i|^2 + |b_j|^2 - 2 a_i.b_j, 0)) / sqrt(C): [B, q, C] x [B, n, C]."""
  ab = jnp.einsum("bqc,bnc->bqn", a, b, precision=lax.Precision.HIGHEST)
  d2 = a_sq[:, :, None] + b_sq[:, None, :] - 2.0 * ab
  return jnp.sqrt(jnp.maximum(d2, 0.0)) / math.sqrt(a.shape[-1])


def _density_rows(d, row_mask, col_mask, k, t):
  """rho = exp(-mean of the k smallest squared distances to real tokens); row max of D; and the
  t >= k nearest real tokens of each row (distances [B, q, t], inf past the real tokens, and
  indices [B, q, t]), nearest first, for ``_nearest_denser``."""
  d_real = jnp.where(col_mask[:, None, :], d, jnp.inf)
  # The barrier keeps XLA from rewriting TopK and the slice below into a full sort.
  neg_near, near_idx = lax.optimization_barrier(base.top_k(-d_real, t))    # [B, q, t]
  nearest = -neg_near[..., :k]              # top_k is sorted: the k nearest are the prefix
  found = jnp.isfinite(nearest)
  sumsq = jnp.sum(jnp.where(found, nearest * nearest, 0.0), axis=-1)
  count = jnp.maximum(jnp.sum(found, axis=-1), 1).astype(d.dtype)
  rho = jnp.where(row_mask, jnp.exp(-sumsq / count), 0.0)
  row_max = jnp.max(jnp.where(col_mask[:, None, :], d, 0.0), axis=-1)
  return rho, jnp.where(row_mask, row_max, 0.0), -neg_near, near_idx.astype(jnp.int32)


def _delta_rows(d, rho_rows, rho, col_mask, dist_max):
  """delta_i = min D_ij over real j with rho_j > rho_i; dist_max where there is none."""
  denser = col_mask[:, None, :] & (rho[:, None, :] > rho_rows[:, :, None])
  return jnp.min(jnp.where(denser, d, dist_max[:, None, None]), axis=-1)


def _nearest_denser(near_d, near_idx, rho, col_mask, dist_max):
  """delta from each row's t nearest real tokens, where that list decides it.

  If any of the t nearest real tokens of row i is denser, the nearest denser token is among
  them (every token outside the list is at least as far as the list's last entry), so
  delta_i = min(D to the denser ones in the list, dist_max) equals ``_delta_rows`` exactly.
  Returns (delta [B, N], resolved bool [B, N]); unresolved rows (local density peaks) need
  ``_delta_rows`` over all tokens.
  """
  take = jax.vmap(lambda a, i: a[i])                                        # per sample
  denser = take(col_mask, near_idx) & (take(rho, near_idx) > rho[:, :, None])
  delta = jnp.min(jnp.where(denser, near_d, dist_max[:, None, None]), axis=-1)
  return delta, jnp.any(denser, axis=-1)


def _delta_of_unresolved(x, sq, rho, mask, dist_max, delta, resolved, chunk):
  """``_delta_rows`` for the unresolved rows only, ``chunk`` of them per step ([B, chunk, N]
  distances); the number of steps is ceil(max unresolved rows per sample / chunk), a while
  loop. Returns delta [B, N] with the unresolved rows replaced."""
  batch, length = rho.shape
  steps = -(-length // chunk)
  order = jnp.argsort(resolved, axis=-1, stable=True).astype(jnp.int32)    # unresolved first
  order = jnp.pad(order, ((0, 0), (0, steps * chunk - length)))
  count = jnp.sum(~resolved, axis=-1)                                       # [B]
  take = jax.vmap(lambda a, i: a[i])
  samples = jnp.arange(batch)[:, None]

  def body(step, delta):
    rows = lax.dynamic_slice_in_dim(order, step * chunk, chunk, axis=1)    # [B, chunk]
    d = _pairwise(take(x, rows), take(sq, rows), x, sq)                    # [B, chunk, N]
    new = _delta_rows(d, take(rho, rows), rho, mask, dist_max)
    live = step * chunk + jnp.arange(chunk)[None, :] < count[:, None]
    # Dead slots (past the unresolved rows) write back the value they read.
    return delta.at[samples, rows].set(jnp.where(live, new, take(delta, rows)))

  return lax.fori_loop(0, -(-jnp.max(count) // chunk), body, delta)


def _split_rows(a: jax.Array, chunk: int) -> jax.Array:
  """[B, N, ...] -> [n_chunks, B, chunk, ...], padding N up with zeros (False for bools)."""
  n = a.shape[1]
  n_chunks = -(-n // chunk)
  a = jnp.pad(a, [(0, 0), (0, n_chunks * chunk - n)] + [(0, 0)] * (a.ndim - 2))
  return jnp.moveaxis(a.reshape(a.shape[0], n_chunks, chunk, *a.shape[2:]), 1, 0)


def _over_rows(fn, rows, chunk: int, length: int):
  """Applies ``fn`` to row blocks of ``rows`` (a pytree of [B, N, ...]) and joins the results.

  One call on all rows when chunk >= length; else ``lax.map`` over blocks of ``chunk`` rows.
  ``fn`` maps a pytree of [B, q, ...] to a pytree of [B, q, ...].
  """
  if chunk >= length:
    return fn(rows)
  out = lax.map(fn, jax.tree.map(lambda a: _split_rows(a, chunk), rows))

  def join(a):
    a = jnp.moveaxis(a, 0, 1)
    return a.reshape(a.shape[0], -1, *a.shape[3:])[:, :length]
  return jax.tree.map(join, out)


def _position_noise(rng: jax.Array, batch: int, length: int) -> jax.Array:
  """1e-6 U(0,1) per (sample, position), from ``rng`` folded with the position: [B, N]."""
  keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(length))
  u = jax.vmap(lambda key: jax.random.uniform(key, (batch,), jnp.float32))(keys)
  return DENSITY_NOISE_SCALE * u.T


def dpc_knn_cluster(x: jax.Array, mask: jax.Array | None, num_clusters: Sequence[int], *,
                    knn_k: int = 5, chunk_size: int | None = None,
                    noise_rng: jax.Array | None = None, name: str = "dpc_knn_cluster"
                    ) -> Clustering:
  """Multi-scale DPC-kNN clustering of tokens (official ``cluster_dpc_knn_ms``, plus padding).

  Runs on ``stop_gradient(x)`` in float32: no gradient flows through it.

  Args:
    x: [B, N, C] tokens, any floating dtype.
    mask: bool [B, N], True = real token (None = all real).
    num_clusters: M_s for each scale, each in [1, N].
    knn_k: neighbours for the local density (self included), in [1, N].
    chunk_size: rows of the distance matrix per block (None = all N at once). Peak memory is
      O(B N chunk_size) instead of O(B N^2); the result does not depend on it.
    noise_rng: PRNG key for the official 1e-6 U(0,1) density tie-break noise; None = no noise.
    name: prefix of error messages.

  Returns:
    ``Clustering`` (labels int32 [B, S, N], centres per scale int32 [B, M_s], density and delta
    float32 [B, N]).

  Raises:
    ValueError: invalid settings (see ``check_clustering_settings``) or a mask not [B, N].
  """
  mask = base.check_inputs(x, mask, name)
  length = x.shape[1]
  num_clusters = check_clustering_settings(length, num_clusters, knn_k, chunk_size, name)
  chunk = length if chunk_size is None else min(int(chunk_size), length)
  return _dpc_knn_cluster(x.astype(jnp.float32), mask, noise_rng, num_clusters=num_clusters,
                          knn_k=int(knn_k), chunk=chunk)


# Jitted even when the caller is not (one compiled program per setting instead of ~100 eagerly
# dispatched operations); inlined into an enclosing jit.
@functools.partial(jax.jit, static_argnames=("num_clusters", "knn_k", "chunk"))
def _dpc_knn_cluster(x, mask, noise_rng, *, num_clusters, knn_k, chunk) -> Clustering:
  """``dpc_knn_cluster`` after validation; chunk in [1, N]."""
  batch, length, _ = x.shape
  x = jnp.where(mask[..., None], lax.stop_gradient(x).astype(jnp.float32), 0.0)
  sq = jnp.sum(x * x, axis=-1)                                              # [B, N]

  # Local density rho, the per-sample maximum distance and each row's nearest real tokens.
  near = knn_k if chunk >= length else min(max(knn_k, DELTA_NEIGHBOURS), length)
  if chunk >= length:
    d_full = _pairwise(x, sq, x, sq)                                        # [B, N, N]
    density_fn = lambda r: _density_rows(d_full, mask, mask, knn_k, near)  # noqa: E731
  else:
    density_fn = lambda r: _density_rows(                                  # noqa: E731
        _pairwise(r[0], r[1], x, sq), r[2], mask, knn_k, near)
  rho, row_max, near_d, near_idx = _over_rows(density_fn, (x, sq, mask), chunk, length)
  if noise_rng is not None:
    rho = jnp.where(mask, rho + _position_noise(noise_rng, batch, length), 0.0)
  dist_max = jnp.max(row_max, axis=-1)                                      # [B]

  # Distance to the nearest denser token: from the full matrix when it is there; otherwise from
  # the nearest-neighbour lists, recomputing distance rows only for the unresolved rows.
  if chunk >= length:
    delta = _delta_rows(d_full, rho, rho, mask, dist_max)
  else:
    delta, resolved = _nearest_denser(near_d, near_idx, rho, mask, dist_max)
    delta = _delta_of_unresolved(x, sq, rho, mask, dist_max, delta, resolved,
                                 min(chunk, DELTA_STEP_ROWS))

  # Centres: top-M_s of gamma among real tokens. top_k is sorted, so every scale's centres are a
  # prefix of the largest scale's, and one pass of centre distances serves all scales.
  max_m = max(num_clusters)
  gamma = jnp.where(mask, rho * delta, -jnp.inf)
  top = base.top_k(gamma, max_m)[1]                                       # [B, M_max]
  # Gathers and, below, a scatter over the M_max centre indices (exact; O(B M_max C) memory).
  take = jax.vmap(lambda a, i: a[i])                                        # per sample
  valid = take(mask, top)                                                   # [B, M_max]
  centre_x = take(x, top)                                                   # [B, M_max, C]
  centre_sq = take(sq, top)

  # Assignment to the nearest valid centre of each scale, row block by row block.
  def assign_fn(r):
    d = _pairwise(r[0], r[1], centre_x, centre_sq)                         # [B, q, M_max]
    d = jnp.where(valid[:, None, :], d, jnp.inf)
    return tuple(jnp.argmin(d[..., :m], axis=-1).astype(jnp.int32) for m in num_clusters)
  assigned = _over_rows(assign_fn, (x, sq), chunk, length)

  # Each centre into its own cluster: rank[i] = k if token i is the k-th centre, else M_max.
  ranks = jnp.where(valid, jnp.arange(max_m, dtype=jnp.int32)[None, :], max_m)
  rank = jax.vmap(lambda r, i: jnp.full((length,), max_m, jnp.int32).at[i].min(r))(
      ranks, top)                                                           # [B, N]
  labels, centres_out = [], []
  for a, m in zip(assigned, num_clusters):
    labels.append(jnp.where(mask, jnp.where(rank < m, rank, a), -1))
    centres_out.append(jnp.where(valid[:, :m], top[:, :m], -1))
  return Clustering(jnp.stack(labels, axis=1), tuple(centres_out), rho, delta)


# --------------------------------------------------------------------------------------------
# Merge (``merge_tokens``) and the module.
# --------------------------------------------------------------------------------------------

def merge_tokens(x: jax.Array, score: jax.Array, labels: jax.Array, num_clusters: Sequence[int],
                 eps: float) -> tuple[jax.Array, ...]:
  """Weighted cluster means xbar_k = sum w_i x_i / (sum w_i + eps), w = exp(score), every scale.

  Differentiable in ``x`` and ``score`` (official ``merge_tokens``, which uses index_add).
  Computed in float32 with a per-cluster max shift (exact in real arithmetic, see the module
  docstring), with segment reductions (scatters) over the tokens.

  Args:
    x: [B, N, C] tokens.
    score: [B, N] log token weights (x w_s + b_s).
    labels: int32 [B, S, N]; labels[:, s] in [0, M_s), or -1 for a token that joins no cluster.
    num_clusters: (M_0, ..., M_{S-1}).
    eps: the official 1e-6 in the denominator (>= 0).

  Returns:
    Per scale, float32 [B, M_s, C]; an empty cluster gives zeros.
  """
  return _merge_tokens(x, score, labels, num_clusters=tuple(int(m) for m in num_clusters),
                       eps=float(eps))


@functools.partial(jax.jit, static_argnames=("num_clusters", "eps"))
def _merge_tokens(x, score, labels, *, num_clusters, eps):
  """``merge_tokens`` with static settings.

  Per scale, segment reductions over the token axis (the official index_add): a segment max of
  the scores for the shift, then segment sums of w_i x_i and w_i; tokens without a cluster go to
  an extra segment that is dropped. Memory O(B N C) per scale, no [sum_s M_s, N] membership.
  """
  x = jnp.where(jnp.any(labels >= 0, axis=1)[..., None], x.astype(jnp.float32), 0.0)  # no 0*inf
  score = score.astype(jnp.float32)                                         # [B, N]
  log_eps = math.log(eps) if eps > 0 else -jnp.inf
  out = []
  for s, m in enumerate(num_clusters):
    ids = jnp.where(labels[:, s] >= 0, labels[:, s], m)                    # [B, N], m = none
    seg_max = jax.vmap(lambda v, i, m=m: jax.ops.segment_max(v, i, num_segments=m + 1))
    seg_sum = jax.vmap(lambda v, i, m=m: jax.ops.segment_sum(v, i, num_segments=m + 1))
    top = seg_max(lax.stop_gradient(score), ids)                            # [B, m + 1]
    nonempty = jnp.isfinite(top)                                            # empty: -inf
    top = jnp.where(nonempty, top, 0.0)
    member = ids < m
    shift = jnp.take_along_axis(top, ids, axis=-1)                          # [B, N]
    w = jnp.where(member, jnp.exp(jnp.where(member, score - shift, 0.0)), 0.0)
    num = seg_sum(w[..., None] * x, ids)[:, :m]                             # [B, m, C]
    den = seg_sum(w, ids)[:, :m] + jnp.exp(log_eps - top[:, :m])            # + eps e^{-m_k}
    nonempty = nonempty[:, :m]
    out.append(jnp.where(nonempty[..., None],
                         num / jnp.where(nonempty, den, 1.0)[..., None], 0.0))
  return tuple(out)


class KeyValueProjection(nn.Module):
  """Keys and values from one kernel: [..., features] -> ([..., H, d], [..., H, d]).

  Kernel [features, 2, heads, head_dim] with logical axes ('embed', None, 'heads', 'kv'); index 0
  of axis 1 gives keys, 1 gives values. It is the official ``nn.Linear(C, 2C)`` weight W [2C, C]
  as W.T.reshape(C, 2, H, d) (bias [2C] as reshape(2, H, d)). Xavier fans are those of the flat
  [features, 2 H d] matrix.
  """
  num_heads: int
  head_dim: int
  use_bias: bool = True
  dtype: base.Dtype = jnp.float32
  param_dtype: base.Dtype = jnp.float32
  kernel_init: base.Initializer | None = None   # None: xavier-uniform over the flat matrix.
  bias_init: base.Initializer = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    init = self.kernel_init or base.default_kernel_init(in_axis=0, out_axis=(1, 2, 3))
    kernel = self.param(
        "kernel", nn.with_logical_partitioning(init, ("embed", None, "heads", "kv")),
        (x.shape[-1], 2, self.num_heads, self.head_dim), self.param_dtype)
    x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    y = jnp.einsum("...f,fthd->...thd", x, kernel)
    if self.use_bias:
      bias = self.param(
          "bias", nn.with_logical_partitioning(self.bias_init, (None, "heads", "kv")),
          (2, self.num_heads, self.head_dim), self.param_dtype)
      y = y + bias.astype(y.dtype)
    return y[..., 0, :, :], y[..., 1, :, :]


class ClusTRAttention(nn.Module):
  """ClusTR clustering-guided multi-scale attention behind the attention contract (see ``base``).

  Attributes:
    num_heads: number of heads H.
    qkv_features: total query/key/value width H d; default: the input width C (as ClusTR).
    out_features: output width; default: the input width.
    dropout_rate: dropout on the attention weights of every scale (official attn_drop = 0).
    use_bias: biases on q and kv (official qkv_bias=True); proj and weight_layer always have one.
    dtype: computation dtype of the projections; param_dtype: parameter dtype.
    kernel_init: the q/kv/proj projections' kernel initializer (None:
      xavier-uniform, LRA's; the official _init_weights: trunc-normal(0.02)).
    num_clusters: M_s per scale; None = the official (N // sr^2, 4 (N // sr^2)) from the actual N.
    sr_ratio: only sets the default num_clusters (the pyramid's stages 1-3 use 8, 4, 2).
    knn_k: neighbours for the local density, self included (official 5).
    density_noise: add the official 1e-6 U(0,1) tie-break noise to the density, drawn from the
      rng stream 'clustering' (falls back to 'params' at init): True always (``deterministic``
      does not switch it off), 'train' only when ``deterministic`` is False (the pyramid's
      setting: ``train=False`` is then deterministic), False never.
    distance_chunk_size: rows of the N x N distance matrix computed at once (None = all);
      bounds the clustering memory by O(B N chunk) without changing the result.
    merge_eps: the merge denominator's epsilon (official 1e-6).

  Call: ``x`` [batch, length, features], ``mask`` bool [batch, length] (True = real token) ->
  [batch, length, out_features] in ``dtype``. Sows 'cluster_labels' int32 [B, S, N],
  'cluster_centres' int32 [B, S, max M_s], 'cluster_density' and 'cluster_delta' float32 [B, N]
  into 'intermediates' (see the module docstring).

  Raises:
    ValueError: a mask of the wrong shape, heads that do not divide qkv_features, a num_clusters
      entry outside [1, N] (also when the default gives 0 clusters), knn_k outside [1, N],
      distance_chunk_size < 1, sr_ratio < 1, merge_eps < 0, or an unknown density_noise.
  """
  num_heads: int
  qkv_features: int | None = None
  out_features: int | None = None
  dropout_rate: float = 0.0
  use_bias: bool = True
  dtype: base.Dtype = jnp.float32
  param_dtype: base.Dtype = jnp.float32
  num_clusters: Sequence[int] | None = None
  sr_ratio: int = 2
  knn_k: int = 5
  density_noise: bool | str = False
  distance_chunk_size: int | None = None
  merge_eps: float = 1e-6
  kernel_init: base.Initializer | None = None

  @classmethod
  def sized_for(cls, length: int, *, grid: tuple[int, int] | None = None,
                cls_token: bool | None = None, sr_ratio: int | None = None,
                budget: Any = None) -> dict[str, Any]:
    """Settings for ``length`` tokens (see ``clustr_jax.attention.sized_for``).

    A pyramid stage (``sr_ratio`` given): the official clusters (N // sr^2, 4 (N // sr^2)) from
    the actual N and the official density tie-break noise while training. A ViT grid: two
    scales (M, 4M) with M = N // 4, as the pyramid's third stage (sr 2: 49 and 196 clusters at
    197 tokens). A 1-D sequence (LRA): M = N // 16 (125 and 500 clusters at 2,001 tokens) and
    the distance matrix in chunks of 512 rows.

    With a ``budget`` (``clustr_jax.attention.Budget``, LRA's comparison): no q/kv biases, as the
    dense baseline. ClusTR's additions are not settings: a second key/value projection (one per
    scale, 2 C qkv per layer), the merge's weight_layer (C + 1) and the output bias (C), so the
    budget cannot be met by sizing; ``configs/lra/common.py`` states the overhead.
    """
    del cls_token
    if sr_ratio is not None:
      return {"sr_ratio": sr_ratio, "density_noise": "train"}
    m = max(1, length // (4 if grid is not None else 16))
    settings: dict[str, Any] = {"num_clusters": (m, min(4 * m, length))}
    if grid is None:
      settings["distance_chunk_size"] = 512
    if budget is not None:
      settings["use_bias"] = False
    return settings

  def _scales(self, length: int) -> tuple[int, ...]:
    if self.sr_ratio < 1:
      raise ValueError(f"{_NAME}: sr_ratio must be >= 1; got {self.sr_ratio}")
    if self.merge_eps < 0:
      raise ValueError(f"{_NAME}: merge_eps must be >= 0; got {self.merge_eps}")
    if self.density_noise not in (False, True, "train"):
      raise ValueError(f"{_NAME}: density_noise must be False, True or 'train'; got "
                       f"{self.density_noise!r}")
    if self.num_clusters is None:
      scales = default_num_clusters(length, self.sr_ratio)
      if scales[0] < 1 or scales[1] > length:
        raise ValueError(
            f"{_NAME}: the default num_clusters (N // sr_ratio**2, 4 * (N // sr_ratio**2)) = "
            f"{scales} for length N={length} and sr_ratio={self.sr_ratio} is not in "
            f"[1, {length}]; set num_clusters or sr_ratio")
      return scales
    return tuple(self.num_clusters)

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None, *,
               deterministic: bool = True) -> jax.Array:
    mask = base.check_inputs(x, mask, _NAME)
    batch, length, features = x.shape
    _, head_dim = base.head_dims(features, self.qkv_features, self.num_heads, _NAME)
    num_clusters = check_clustering_settings(
        length, self._scales(length), self.knn_k, self.distance_chunk_size, _NAME)

    q = base.HeadProjection(self.num_heads, head_dim, self.use_bias, self.dtype,
                            self.param_dtype, kernel_init=self.kernel_init,
                            name="q")(x)                                 # [B, N, H, d]
    q = nn.with_logical_constraint(q, ("batch", "length", "heads", "kv"))
    score = nn.Dense(
        1, dtype=jnp.float32, param_dtype=self.param_dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed", None)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (None,)),
        name="weight_layer")(x.astype(jnp.float32))[..., 0]                # [B, N] = log w

    noise = self.density_noise is True or (self.density_noise == "train" and not deterministic)
    noise_rng = self.make_rng("clustering") if noise else None
    clusters = dpc_knn_cluster(x, mask, num_clusters, knn_k=self.knn_k,
                               chunk_size=self.distance_chunk_size, noise_rng=noise_rng,
                               name=_NAME)
    max_m = max(num_clusters)
    self.sow("intermediates", "cluster_labels", clusters.labels)
    self.sow("intermediates", "cluster_centres", jnp.stack(
        [jnp.pad(c, ((0, 0), (0, max_m - c.shape[1])), constant_values=-1)
         for c in clusters.centres], axis=1))
    self.sow("intermediates", "cluster_density", clusters.density)
    self.sow("intermediates", "cluster_delta", clusters.delta)

    merged = merge_tokens(x, score, clusters.labels, num_clusters, self.merge_eps)
    out = None
    for s, xbar in enumerate(merged):                                     # xbar [B, M_s, C]
      k, v = KeyValueProjection(self.num_heads, head_dim, self.use_bias, self.dtype,
                                self.param_dtype, kernel_init=self.kernel_init,
                                name=f"kv{s + 1}")(xbar.astype(self.dtype))
      key_mask = clusters.centres[s] >= 0                                  # [B, M_s]
      logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
      logits = logits * head_dim ** -0.5
      logits = jnp.where(key_mask[:, None, None, :], logits, base.MASK_VALUE)
      weights = jax.nn.softmax(logits, axis=-1)
      weights = base.attention_dropout(weights, self.dropout_rate, deterministic)
      o = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v)
      out = o if out is None else out + o
    return base.OutputProjection(self.out_features or features, True, self.dtype,
                                 self.param_dtype, kernel_init=self.kernel_init,
                                 name="proj")(out)
