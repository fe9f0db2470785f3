"""CAST: clustering self-attention using learnable surrogate tokens (our reconstruction).

Source: A. van Engelenhoven, N. Strisciuglio, E. Talavera, "CAST: Clustering Self-Attention using
Surrogate Tokens for Efficient Transformers", arXiv 2402.04239 (2024); Pattern Recognition Letters
2024. There is NO official code, and the paper's equations were not available to us: this module
follows the reconstruction of ``docs/cast.md``, built from the abstract, the journal
highlights and the ICLR 2024 OpenReview reviews. Report results as "CAST (our reconstruction)"
together with the option values used.

Confirmed (``docs/cast.md``, "What the sources confirm": abstract, highlights, reviews R1-R4):
  * Learnable surrogate tokens build a cluster affinity matrix (A_g, R3) that is used both to
    cluster the sequence and to generate cluster summaries (abstract).
  * Q, K, V are the usual projections; scores are computed between them and the surrogates: one
    set queries->surrogates (A_q) and one keys->surrogates (A_k) (R4).
  * Standard attention runs only inside each cluster (R4); the intra-cluster results are combined
    with summaries of the other clusters (abstract); the output is a weighted sum of intra and
    inter terms (R1). Summaries come from the key->surrogate scores and the mixing from the
    query->surrogate scores (R4; the exact formulas are ours).
  * Two clustering regimes exist: Top-K and Single-Assignment Top-K (SA Top-K) (R3).
  * Cost O(alpha N), alpha set by the number of clusters N_c and the cluster size kappa.
  * An encoder (bidirectional) mechanism: no causal or arbitrary masks (R4).
  Not confirmed: which scores enter A_g and how (C2), the function f and its axis (C1, R1 only
  says an undefined f seems to be a softmax), and every other formula below.

Our reconstruction [UNVERIFIED] (``docs/cast.md``; its choice points C1-C11 are options here):

  Q, K, V = x W_q, x W_k, x W_v                               [B, N, H, d]
  S       surrogates, param 'surrogates'                      [H, N_c, d]  ([N_c, d] shared: C7)
  A_q     = Q S^T / sqrt(d),  A_k = K S^T / sqrt(d)           [B, H, N_c, N] (stored transposed)
  A_g     = g(f(A_q), f(A_k))   f, g: C1, C2; pads -> -inf    [B, H, N_c, N] (no gradient)
  I, ok   = cluster member indices and slot validity          [B, H, N_c, kappa] int32 / bool
            Top-K (C3 'top_k'):  I[c] = top-kappa tokens of A_g[c]   (a token may be in 0..N_c)
            SA Top-K (C3 'sa_top_k', procedure C4): every token in at most one cluster
  Qc, Kc, Vc = gather(Q, K, V; I)                             [B, H, N_c, kappa, d]
  R_intra = softmax(Qc Kc^T / sqrt(d), invalid keys masked) Vc   [B, H, N_c, kappa, d]
  w       = softmax over valid members of A_k[I[c], c]        [B, H, N_c, kappa] (C5: or all N)
  R_inter = sum_j w_j Vc_j   (0 for a cluster without valid members)  [B, H, N_c, d]
  alpha   = softmax over clusters of A_q                      [B, H, N_c, N]
  C6 'weighted' (default, ``docs/cast.md``):
    out_i = sum_{c: i in I[c]} alpha_ic R_intra[c, pos_c(i)]
            + sum_{c: i not in I[c]} alpha_ic R_inter[c]
  C6 'intra_plus_others' (intra unweighted, summaries of the other clusters):
    out_i = mean_{c: i in I[c]} R_intra[c, pos_c(i)] + sum_{c: i not in I[c]} alpha_ic R_inter[c]
  y = merge_heads(out) W_o                                    [B, N, out_features]

C11 follows C6: a token in no cluster (possible under Top-K when N_c kappa < N, and under SA
Top-K) gets only the summary terms; a token in several clusters (Top-K) gets the alpha-weighted
sum of its intra results ('weighted') or their plain mean ('intra_plus_others').

Choice points (``docs/cast.md``, "Choice points") and the options that set them (default first):
  C1  affinity_softmax_axis  f = softmax over 'clusters' | over 'tokens' (pads excluded) | 'none'
  C2  cluster_affinity       A_g = 'f_sum': f(A_q)+f(A_k) | 'sum': A_q+A_k | 'f_product':
                             f(A_q)*f(A_k) | 'query': A_q
  C3  clustering             'top_k' | 'sa_top_k'
  C4  sa_assignment          (SA Top-K only) 'argmax': each token to its argmax cluster, then the
                             top-kappa of each cluster's assignees, overflow dropped | 'greedy':
                             (token, cluster) pairs in descending A_g order, a pair taken while the
                             token is free and the cluster holds < kappa | 'sequential': clusters
                             0, 1, ... in turn take their top-kappa among still-free tokens
  C5  summary_support        'members' (softmax over the cluster's valid members) | 'all'
                             (softmax over all real tokens of A_k[:, c])
  C6  combination            'weighted' | 'intra_plus_others' (see above; C11 follows)
  C7  shared_surrogates      False: S per head [H, N_c, d] | True: one S [N_c, d] for all heads
                             (the "single-head variant" of a third-party summary, docs/cast.md)
  C8  padding                always: pads get A_g = -inf before every selection, so they are never
                             chosen while enough real tokens exist; a selected pad slot (fewer real
                             tokens than kappa) is invalid: masked as a key, excluded from the
                             summaries, and receives no intra contribution. Pads never change a
                             real token's output; a pad's own output is finite but meaningless.
  C9  num_clusters, cluster_size (full coverage needs N_c kappa >= N; N_c = kappa = sqrt(N) is
      the cost-optimal full-coverage preset)
  C10 surrogate_init_stddev  normal(0, 0.02)
  Limiting case: N_c = 1, kappa = N gives alpha = 1 and one cluster of all tokens: dense attention.

Gradients: the cluster indices are integers computed under ``stop_gradient`` (A_g enters no
weight), so no gradient flows through the selection; S learns through w (via A_k) and alpha (via
A_q), and through A_k over all tokens under C5 'all'.

Cost per head (docs/cast.md): affinities and combination O(N N_c d), selection O(N N_c) (Top-K
and SA 'argmax'; 'sequential' runs N_c selections over N; 'greedy' runs rounds of O(N N_c), each
round taking at least one pair and in practice many: ~20 rounds at N = 8192, N_c = 64,
kappa = 128, several times the cost of the rest of the layer), intra attention O(N_c kappa^2 d).
Memory O(N N_c + N_c kappa^2 + N d): no [N, N] array is ever formed (on the CPU the
[N_c, kappa, kappa] intra weights exist only INTRA_CHUNK_CLUSTERS clusters at a time, see
``intra_cluster_attention``). The intra results return to token positions with a scatter-add
over the N_c kappa slots.

Sown into 'intermediates' (for plots and losses): 'cluster_indices' int32 [B, H, N_c, kappa],
'cluster_valid' bool [B, H, N_c, kappa] (which slots hold a real member), 'coverage' int32
[B, H, N] (number of clusters holding each token), 'alpha' float32 [B, H, N_c, N].
Sown into 'metrics' (float32 scalars, logged by the train loop): 'uncovered_fraction' and
'overlap_fraction', the fractions of (real token, head) pairs in no cluster and in more than one
(docs/cast.md, "Coverage").
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from clustr_jax.attention import base, dense

_NAME = "CASTAttention"

#: Valid values of each string option (choice points of docs/cast.md), default first.
CHOICES: dict[str, tuple[str, ...]] = {
    "clustering": ("top_k", "sa_top_k"),                             # C3
    "affinity_softmax_axis": ("clusters", "tokens", "none"),          # C1
    "cluster_affinity": ("f_sum", "sum", "f_product", "query"),       # C2
    "sa_assignment": ("argmax", "greedy", "sequential"),              # C4
    "summary_support": ("members", "all"),                            # C5
    "combination": ("weighted", "intra_plus_others"),                 # C6 (C11 follows)
}


# --------------------------------------------------------------------------------------------
# Cluster selection. All functions take A_g transposed, ag: float32 [B, H, C, N], and eligible:
# bool broadcastable to [B, H, 1, N] (True = a real token), and return (indices int32
# [B, H, C, kappa], valid bool [B, H, C, kappa]). Shapes are static; no gradient is meant to flow.
# They are jitted (kappa static) so that un-jitted calls reuse one compiled loop.
# --------------------------------------------------------------------------------------------

def _masked_top_k(score: jax.Array, allowed: jax.Array, kappa: int) -> tuple[jax.Array, jax.Array]:
  """Top-kappa along the last axis among ``allowed`` entries; slots beyond them are invalid."""
  allowed = jnp.broadcast_to(allowed, score.shape)
  _, idx = base.top_k(jnp.where(allowed, score, -jnp.inf), kappa)
  return idx, jnp.take_along_axis(allowed, idx, axis=-1)


@functools.partial(jax.jit, static_argnames="kappa")
def select_top_k(ag: jax.Array, eligible: jax.Array, kappa: int) -> tuple[jax.Array, jax.Array]:
  """Top-K (C3): each cluster takes the kappa real tokens of highest affinity."""
  return _masked_top_k(ag, eligible, kappa)


@functools.partial(jax.jit, static_argnames="kappa")
def select_sa_argmax(ag: jax.Array, eligible: jax.Array, kappa: int) -> tuple[jax.Array, jax.Array]:
  """SA Top-K, C4 (a): token -> argmax cluster; each cluster keeps its top-kappa assignees."""
  num_clusters = ag.shape[-2]
  assign = jnp.argmax(ag, axis=-2)                                          # [B, H, N]
  own = assign[..., None, :] == jnp.arange(num_clusters)[:, None]           # [B, H, C, N]
  return _masked_top_k(ag, own & eligible, kappa)


@functools.partial(jax.jit, static_argnames="kappa")
def select_sa_sequential(ag: jax.Array, eligible: jax.Array,
                         kappa: int) -> tuple[jax.Array, jax.Array]:
  """SA Top-K, C4 (c): clusters 0, 1, ... take their top-kappa among still-free tokens in turn."""
  free0 = jnp.broadcast_to(eligible[..., 0, :], ag.shape[:-2] + ag.shape[-1:])   # [B, H, N]

  def step(free, ag_c):                                                     # ag_c [B, H, N]
    idx, valid = _masked_top_k(ag_c, free, kappa)
    # Slots that were not free point at tokens that are already taken: clearing them is a no-op.
    free = jnp.put_along_axis(free, idx, False, axis=-1, inplace=False)
    return free, (idx, valid)

  _, (idx, valid) = lax.scan(step, free0, jnp.moveaxis(ag, -2, 0))
  return jnp.moveaxis(idx, 0, -2), jnp.moveaxis(valid, 0, -2)


@functools.partial(jax.jit, static_argnames="kappa")
def select_sa_greedy(ag: jax.Array, eligible: jax.Array, kappa: int) -> tuple[jax.Array, jax.Array]:
  """SA Top-K, C4 (b): greedy fill in descending affinity order, computed in parallel rounds.

  Sequential greedy visits every (token, cluster) pair in descending A_g order and assigns it when
  the token is still free and the cluster holds fewer than kappa tokens. Each round here assigns,
  at once, every pair (t, c) such that c is t's best open cluster and t is among the top r_c free
  tokens of c (r_c = the room left in c). Sequential greedy assigns all these pairs too: every
  cluster t prefers to c is already full, and at most r_c - 1 free tokens precede t in c. Removing
  them leaves the same greedy problem on the rest, so the rounds reproduce the sequential result
  exactly when no affinities tie (ties are broken towards lower token and cluster indices, and
  no cluster ever exceeds kappa). Every round assigns at least the globally best pair, so the
  loop ends after at most N_c * kappa rounds; about 20 at N = 8192, N_c = 64, kappa = 128.
  """
  num_clusters, n = ag.shape[-2:]
  batch = ag.shape[:-2]
  clusters = jnp.arange(num_clusters, dtype=jnp.int32)
  slot_rank = jnp.arange(kappa)

  def body(state):
    assign, counts, _ = state                      # [B, H, N] (-1 = free), [B, H, C]
    free = eligible[..., 0, :] & (assign < 0)
    open_ = counts < kappa
    score = jnp.where(free[..., None, :] & open_[..., :, None], ag, -jnp.inf)
    best = jnp.argmax(score, axis=-2).astype(jnp.int32)                     # [B, H, N]
    has = jnp.max(score, axis=-2) > -jnp.inf
    top_val, top_idx = base.top_k(score, kappa)                             # [B, H, C, kappa]
    in_room = (slot_rank < (kappa - counts)[..., None]) & (top_val > -jnp.inf)
    chosen = jnp.put_along_axis(jnp.zeros(score.shape, bool), top_idx, in_room, axis=-1,
                                inplace=False)
    safe = chosen & (best[..., None, :] == clusters[:, None]) & has[..., None, :]
    newly = jnp.any(safe, axis=-2)
    assign = jnp.where(newly, best, assign)
    counts = counts + jnp.sum(safe, axis=-1, dtype=jnp.int32)
    return assign, counts, jnp.any(newly)

  init = (jnp.full(batch + (n,), -1, jnp.int32), jnp.zeros(batch + (num_clusters,), jnp.int32),
          jnp.array(True))
  assign, _, _ = lax.while_loop(lambda s: s[2], body, init)
  own = assign[..., None, :] == clusters[:, None]
  return _masked_top_k(ag, own & eligible, kappa)


# --------------------------------------------------------------------------------------------


# Gathers and scatters keep batch and heads as explicit batch dimensions (vmap), which lets the
# SPMD partitioner keep them sharded; on CPU they are as fast as flattened row indexing.

def _gather(x: jax.Array, idx: jax.Array) -> jax.Array:
  """Rows of x [B, N, H, D] at idx [B, H, M] (in range) -> [B, H, M, D]."""
  take = lambda rows, i: rows.at[i].get(mode="promise_in_bounds")  # noqa: E731
  return jax.vmap(jax.vmap(take, in_axes=(1, 0)))(x, idx)


def _scatter_add(values: jax.Array, idx: jax.Array, length: int) -> jax.Array:
  """Sums values [B, H, M, D] into [B, length, H, D] at token indices idx [B, H, M] (in range)."""
  add = lambda v, i: jnp.zeros((length,) + v.shape[1:], v.dtype).at[i].add(  # noqa: E731
      v, mode="promise_in_bounds")
  return jax.vmap(jax.vmap(add, out_axes=1))(values, idx)


# --------------------------------------------------------------------------------------------
# Intra-cluster attention. On the CPU it runs over the B H N_c clusters in steps of
# INTRA_CHUNK_CLUSTERS (``base.chunked_attention``: each step's [chunk, kappa, kappa] weights stay
# in cache, and a custom backward pass recomputes them step by step from the saved row maxima and
# sums, as flash attention does). XLA:CPU runs one batched [512 x 128 x 64] x [64 x 128] product
# far below its matmul rate, and the plain backward pass through it far slower still; the
# layer-level gain is in experiments/results/cast_ab.md (experiments/benchmarks/cast_ab.py). On
# CUDA and TPU the clusters go, as a batch of one-head sequences of kappa tokens, through dense
# attention's fused kernel (cuDNN; splash attention with kappa padded to 128) where
# ``dense.choose_implementation`` picks one, else through the batched product with autodiff, as
# do other backends and attention dropout (docs/gpu_tpu.md).
# --------------------------------------------------------------------------------------------

#: Clusters per step of the CPU intra-cluster attention (a divisor of B H N_c is used).
INTRA_CHUNK_CLUSTERS = 16

#: Valid values of INTRA_IMPLEMENTATION.
INTRA_IMPLEMENTATIONS = ("auto", "chunked", "batched", "cudnn", "splash")

#: The intra-cluster kernel, read when traced: 'auto' (chosen per platform at lowering time:
#: 'chunked' on the CPU; on CUDA and TPU the fused kernel that ``dense.choose_implementation``
#: gives for kappa keys, else 'batched'), or one forced for tests and benchmarks: 'chunked',
#: 'batched', 'cudnn' (CUDA only), 'splash' (the Pallas interpreter off TPU).
INTRA_IMPLEMENTATION = "auto"


def _intra_attention(q_c, k_c, v_c, valid, scale, dropout=None):
  """softmax(Q_c K_c^T scale, invalid keys masked) V_c: [..., kappa, d] -> [..., kappa, d]."""
  weights = base.softmax(base.key_masked_logits(q_c, k_c, valid, scale))
  if dropout is not None:
    weights = dropout(weights)
  return jnp.einsum("...ij,...jd->...id", weights.astype(v_c.dtype), v_c)


def _chunked_intra_attention(q_c, k_c, v_c, valid, scale, rows):
  """``base.chunked_attention`` over the B H N_c clusters, ``rows`` clusters per step."""
  flat = lambda t: t.reshape((-1,) + t.shape[3:])  # noqa: E731  [B H C, ...]
  out = base.chunked_attention(flat(q_c), flat(k_c), flat(v_c), flat(valid), scale, rows)
  return out.reshape(v_c.shape)


def _fused_intra_attention(q_c, k_c, v_c, valid, scale, implementation):
  """``_intra_attention`` through ``dense.attend``'s fused kernel: the B H N_c clusters as a batch
  of one-head sequences of kappa tokens, invalid slots masked as keys. A cluster without valid
  members gets finite rows of another value than ``_intra_attention``'s; CAST discards them."""
  shape = q_c.shape
  flat = lambda t: t.reshape((-1, shape[3], 1, shape[4]))  # noqa: E731  [B H C, kappa, 1, d]
  out = dense.attend(flat(q_c), flat(k_c), flat(v_c), valid.reshape(-1, shape[3]),
                     implementation=implementation, scale=scale)
  return out.reshape(shape)


def _accelerator_intra(platform: str, dtype, head_dim: int, kappa: int) -> str | None:
  """The fused kernel 'auto' runs on ``platform`` ('cuda' or 'tpu'); None: the batched product."""
  fused = dense.choose_implementation(platform, dtype, head_dim, kappa)
  if fused == "splash" or (fused == "cudnn" and dense.cudnn_available()):
    return fused
  return None


def intra_cluster_attention(q_c: jax.Array, k_c: jax.Array, v_c: jax.Array, valid: jax.Array,
                            scale: float, dropout=None) -> jax.Array:
  """Softmax attention inside each cluster: R_intra of the module docstring (docs/cast.md).

  Args:
    q_c, k_c, v_c: the members' queries, keys, values [B, H, N_c, kappa, d], one dtype.
    valid: bool [B, H, N_c, kappa]; invalid slots are masked as keys.
    scale: the logit scale (d^-1/2).
    dropout: optional function on the weights [B, H, N_c, kappa, kappa] (training).

  Returns:
    [B, H, N_c, kappa, d] in v_c's dtype; logits and softmax in float32. The kernel is
    INTRA_IMPLEMENTATION's: by default, on the CPU without dropout, steps of
    ``INTRA_CHUNK_CLUSTERS`` clusters with a recomputing backward pass; on CUDA and TPU a fused
    kernel where one applies (docs/gpu_tpu.md). Rows of clusters without valid members are
    finite but differ between kernels; every other row agrees to float rounding.

  Raises:
    ValueError: an unknown INTRA_IMPLEMENTATION, or 'cudnn' without a CUDA GPU.
  """
  if dropout is not None:
    return _intra_attention(q_c, k_c, v_c, valid, scale, dropout)
  rows = math.gcd(math.prod(q_c.shape[:3]), INTRA_CHUNK_CLUSTERS)
  chunked = lambda *a: _chunked_intra_attention(*a, scale, rows)  # noqa: E731
  batched = lambda *a: _intra_attention(*a, scale)  # noqa: E731
  args = (q_c, k_c, v_c, valid)
  if INTRA_IMPLEMENTATION not in INTRA_IMPLEMENTATIONS:
    raise ValueError(f"{_NAME}: unknown cast.INTRA_IMPLEMENTATION={INTRA_IMPLEMENTATION!r}; "
                     f"valid choices: {', '.join(repr(i) for i in INTRA_IMPLEMENTATIONS)}")
  if INTRA_IMPLEMENTATION == "chunked":
    return chunked(*args)
  if INTRA_IMPLEMENTATION == "batched":
    return batched(*args)
  if INTRA_IMPLEMENTATION != "auto":
    return _fused_intra_attention(*args, scale, INTRA_IMPLEMENTATION)
  branch = {}
  for platform in ("cuda", "tpu"):
    fused = _accelerator_intra(platform, q_c.dtype, q_c.shape[-1], q_c.shape[-2])
    branch[platform] = batched if fused is None else functools.partial(
        _fused_intra_attention, scale=scale, implementation=fused)
  # Equal branches (the batched product) are joined by platform_dependent and traced once.
  return lax.platform_dependent(*args, cpu=chunked, cuda=branch["cuda"], tpu=branch["tpu"],
                                default=batched)


def _f(a: jax.Array, mask: jax.Array, axis: str) -> jax.Array:
  """C1: f applied to affinities a [B, H, C, N] (pads excluded from a softmax over tokens)."""
  if axis == "clusters":
    return jax.nn.softmax(a, axis=-2)
  if axis == "tokens":
    return jax.nn.softmax(jnp.where(mask, a, base.MASK_VALUE), axis=-1)
  return a


def _cluster_affinity(a_q: jax.Array, a_k: jax.Array, mask: jax.Array, form: str,
                      axis: str) -> jax.Array:
  """C2: A_g [B, H, C, N] from A_q and A_k."""
  if form == "sum":
    return a_q + a_k
  if form == "query":
    return a_q
  f_q, f_k = _f(a_q, mask, axis), _f(a_k, mask, axis)
  return f_q + f_k if form == "f_sum" else f_q * f_k


def _selector(clustering: str, sa_assignment: str):
  """The selection function of C3 (and C4 under SA Top-K)."""
  if clustering == "top_k":
    return select_top_k
  return {"argmax": select_sa_argmax, "greedy": select_sa_greedy,
          "sequential": select_sa_sequential}[sa_assignment]


def cast_attention(q: jax.Array, k: jax.Array, v: jax.Array, s: jax.Array, mask: jax.Array, *,
                   cluster_size: int, clustering: str = "top_k",
                   affinity_softmax_axis: str = "clusters", cluster_affinity: str = "f_sum",
                   sa_assignment: str = "argmax", summary_support: str = "members",
                   combination: str = "weighted", dropout=None
                   ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """CAST attention proper, from the heads' queries, keys and values to their outputs.

  The module docstring gives the equations; ``CASTAttention`` adds the projections and checks
  the settings (the options here take the same values, unchecked).

  Args:
    q, k, v: [B, N, H, d], one floating dtype.
    s: surrogates [H, N_c, d] in that dtype.
    mask: bool [B, N], True = real token.
    cluster_size: kappa, in [1, N].
    clustering, affinity_softmax_axis, cluster_affinity, sa_assignment, summary_support,
      combination: the choice points C3, C1, C2, C4, C5, C6 (see ``CHOICES``).
    dropout: optional function applied to the intra-cluster weights [B, H, N_c, kappa, kappa].

  Returns:
    (out [B, N, H, d] in v's dtype, intermediates: 'cluster_indices' int32 and 'cluster_valid'
    bool [B, H, N_c, kappa], 'coverage' int32 [B, H, N], 'alpha' float32 [B, H, N_c, N]).
  """
  batch, length, heads, head_dim = q.shape
  num_clusters, kappa = s.shape[-2], cluster_size
  scale = head_dim ** -0.5
  token_mask = mask[:, None, None, :]                                     # [B, 1, 1, N]

  # q, k, v stay [B, N, H, d]: the gathers read each (batch, head)'s member rows straight into
  # the heads-major [B, H, N_c kappa, d] and the combination scatters back into [B, N, H, d], so
  # no transposed copy of q, k, v is made (a third faster forward+backward on the CPU than
  # transposing to [B, H, N, d] first).
  # Affinities, stored transposed [B, H, C, N] so that selection runs along the last axis.
  a_q = jnp.einsum("bnhd,hcd->bhcn", q, s).astype(jnp.float32) * scale
  a_k_full = None
  if summary_support == "all":
    a_k_full = jnp.einsum("bnhd,hcd->bhcn", k, s).astype(jnp.float32) * scale

  # Cluster selection: integers, no gradient (C2-C4, C8).
  a_k_sel = (lax.stop_gradient(a_k_full) if a_k_full is not None else
             jnp.einsum("bnhd,hcd->bhcn", lax.stop_gradient(k),
                        lax.stop_gradient(s)).astype(jnp.float32) * scale)
  ag = _cluster_affinity(lax.stop_gradient(a_q), a_k_sel, token_mask, cluster_affinity,
                         affinity_softmax_axis)
  ag = jnp.where(token_mask, ag, -jnp.inf)
  idx, valid = _selector(clustering, sa_assignment)(ag, token_mask, kappa=kappa)  # [B,H,C,kappa]
  idx, valid = lax.stop_gradient(idx), lax.stop_gradient(valid)
  flat_idx = idx.reshape(batch, heads, num_clusters * kappa)

  # Intra-cluster attention over the gathered members.
  q_c, k_c, v_c = (_gather(t, flat_idx).reshape(batch, heads, num_clusters, kappa, head_dim)
                   for t in (q, k, v))                                    # [B, H, C, kappa, d]
  r_intra = intra_cluster_attention(q_c, k_c, v_c, valid, scale, dropout)

  # Cluster summaries (C5); a cluster without valid members has summary 0.
  if summary_support == "members":
    a_k_c = jnp.einsum("bhcjd,hcd->bhcj", k_c, s).astype(jnp.float32) * scale
    w = base.softmax(jnp.where(valid, a_k_c, base.MASK_VALUE))
    w = jnp.where(valid, w, 0.0)
    r_inter = jnp.einsum("bhcj,bhcjd->bhcd", w.astype(v.dtype), v_c)
  else:
    w = jax.nn.softmax(jnp.where(token_mask, a_k_full, base.MASK_VALUE), axis=-1)
    w = w * jnp.any(mask, axis=-1)[:, None, None, None]
    r_inter = jnp.einsum("bhcn,bnhd->bhcd", w.astype(v.dtype), v)

  # Combination (C6, C11): alpha = softmax over clusters of A_q.
  alpha = jax.nn.softmax(a_q, axis=-2)                                    # [B, H, C, N]
  # Invalid (pad) slots get weight 0: they add nothing anywhere, not even to the pad itself.
  alpha_c = jnp.where(valid, jnp.take_along_axis(alpha, idx, axis=-1), 0.0)  # [B,H,C,kappa]
  summaries = jnp.einsum("bhcn,bhcd->bnhd", alpha.astype(v.dtype), r_inter)
  coverage = _scatter_add(valid.astype(jnp.int32).reshape(batch, heads, -1, 1), flat_idx,
                          length)[..., 0].transpose(0, 2, 1)              # [B, H, N]
  if combination == "weighted":
    # sum_c alpha R_inter over all clusters, then swap R_inter for R_intra at member slots.
    delta = jnp.where(valid[..., None],
                      base.scale_rows(alpha_c.astype(v.dtype), r_intra - r_inter[..., None, :]), 0)
    per_token = _scatter_add(delta.reshape(batch, heads, -1, head_dim), flat_idx, length)
    out = summaries + per_token
  else:
    own = base.scale_rows(alpha_c.astype(v.dtype),
                          jnp.broadcast_to(r_inter[..., None, :], r_intra.shape))
    payload = jnp.where(valid[..., None], jnp.concatenate([r_intra, own], axis=-1), 0)
    per_token = _scatter_add(payload.reshape(batch, heads, -1, 2 * head_dim), flat_idx, length)
    intra = (per_token[..., :head_dim]
             / jnp.maximum(coverage, 1).transpose(0, 2, 1)[..., None].astype(v.dtype))
    out = summaries + intra - per_token[..., head_dim:]
  aux = {"cluster_indices": idx, "cluster_valid": valid, "coverage": coverage, "alpha": alpha}
  return out, aux


class CASTAttention(nn.Module):
  """CAST clustered self-attention with learnable surrogate tokens (our reconstruction).

  See the module docstring for the equations, the confirmed/reconstructed split and the cost.

  Attributes:
    num_heads: number of heads H.
    num_clusters: N_c, the number of clusters = surrogate tokens (C9).
    cluster_size: kappa, the number of token slots per cluster (C9); at most the sequence length.
    qkv_features: total query/key/value width (H * d); default: the input width.
    out_features: output width; default: the input width.
    dropout_rate: dropout on the intra-cluster attention weights (training only).
    use_bias: biases on the projections (LRA: False).
    dtype: computation dtype (affinities and softmaxes run in float32); param_dtype: parameters.
    clustering: C3, 'top_k' (default) or 'sa_top_k'.
    affinity_softmax_axis: C1, f = softmax over 'clusters' (default), 'tokens', or 'none'.
    cluster_affinity: C2, 'f_sum' (default), 'sum', 'f_product' or 'query'.
    sa_assignment: C4 (used by 'sa_top_k'), 'argmax' (default), 'greedy' or 'sequential'.
    summary_support: C5, 'members' (default) or 'all'.
    combination: C6 (and C11), 'weighted' (default) or 'intra_plus_others'.
    shared_surrogates: C7, one [N_c, d] set shared by all heads (default False: [H, N_c, d]).
    surrogate_init_stddev: C10, stddev of the normal initializer of the surrogates (0.02).
    kernel_init: the projections' kernel initializer (None: xavier-uniform, LRA's).

  Call: ``x`` [batch, length, features] float, ``mask`` bool [batch, length] (True = real token)
  or None -> [batch, length, out_features] in ``dtype``. Parameters: 'query', 'key', 'value'
  (``base.HeadProjection``), 'out' (``base.OutputProjection``), 'surrogates' [H, N_c, d] with
  logical axes ('heads', 'clusters', 'kv') (or [N_c, d], ('clusters', 'kv')).

  Raises:
    ValueError: num_clusters < 1, cluster_size < 1, cluster_size > length, an unknown option value
      (the message lists the valid choices), heads not dividing qkv_features, or a mask whose
      shape is not [batch, length].
  """
  num_heads: int
  num_clusters: int
  cluster_size: int
  qkv_features: int | None = None
  out_features: int | None = None
  dropout_rate: float = 0.0
  use_bias: bool = False
  dtype: base.Dtype = jnp.float32
  param_dtype: base.Dtype = jnp.float32
  clustering: str = "top_k"
  affinity_softmax_axis: str = "clusters"
  cluster_affinity: str = "f_sum"
  sa_assignment: str = "argmax"
  summary_support: str = "members"
  combination: str = "weighted"
  shared_surrogates: bool = False
  surrogate_init_stddev: float = 0.02
  kernel_init: base.Initializer | None = None

  @classmethod
  def sized_for(cls, length: int, *, grid: tuple[int, int] | None = None,
                cls_token: bool | None = None, sr_ratio: int | None = None,
                budget: Any = None) -> dict[str, Any]:
    """Settings for ``length`` tokens (see ``clustr_jax.attention.sized_for``): N_c ~ sqrt(N)
    clusters (a multiple of 8 for a 1-D sequence, for the accelerators' tiles) of
    kappa = ceil(N / N_c) slots, so N_c kappa >= N: enough slots for every token. That bounds
    the slots, not coverage. What each clustering mode guarantees (the module sows the
    fractions in its 'metrics': ``uncovered_fraction``, ``overlap_fraction``):
      'top_k' (default)           nothing: each cluster takes its kappa most affine tokens
                                  independently, so clusters overlap and may leave tokens out;
      'sa_top_k', 'argmax'        no overlap; a cluster's overflow beyond kappa is dropped, so
                                  tokens may be left out;
      'sa_top_k', 'greedy' or     every real token in exactly one cluster when N_c kappa >= N.
        'sequential'

    With a ``budget`` (``clustr_jax.attention.Budget``): the surrogates, H N_c d = N_c qkv
    parameters per layer, are CAST's only addition (no biases, as the dense baseline); N_c is
    lowered (to a multiple of 8 where possible) until they fit ``budget.extra_parameters``.
    """
    del cls_token, sr_ratio
    if grid is None:
      num_clusters = max(1, int(round(length ** 0.5 / 8)) * 8)
    else:
      num_clusters = max(1, int(round(length ** 0.5)))
    if budget is not None:
      fit = budget.extra_parameters // budget.qkv_features
      if num_clusters > fit:
        num_clusters = max(1, fit // 8 * 8 if fit >= 8 else fit)
    return {"num_clusters": num_clusters,
            "cluster_size": min(length, -(-length // num_clusters))}

  def _check_settings(self, length: int) -> None:
    for option, valid in CHOICES.items():
      value = getattr(self, option)
      if value not in valid:
        raise ValueError(f"{_NAME}: unknown {option}={value!r}; valid choices: "
                         f"{', '.join(repr(v) for v in valid)}")
    if self.num_clusters < 1:
      raise ValueError(f"{_NAME}: num_clusters must be >= 1; got {self.num_clusters}")
    if self.cluster_size < 1:
      raise ValueError(f"{_NAME}: cluster_size must be >= 1; got {self.cluster_size}")
    if self.cluster_size > length:
      raise ValueError(f"{_NAME}: cluster_size={self.cluster_size} must not exceed the sequence "
                       f"length {length}")

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None, *,
               deterministic: bool = True) -> jax.Array:
    mask = base.check_inputs(x, mask, _NAME)
    length, features = x.shape[1:]
    self._check_settings(length)
    _, head_dim = base.head_dims(features, self.qkv_features, self.num_heads, _NAME)
    heads, num_clusters, kappa = self.num_heads, self.num_clusters, self.cluster_size

    proj = lambda name: base.HeadProjection(  # noqa: E731
        heads, head_dim, self.use_bias, self.dtype, self.param_dtype,
        kernel_init=self.kernel_init, name=name)
    q, k, v = proj("query")(x), proj("key")(x), proj("value")(x)            # [B, N, H, d]
    q = nn.with_logical_constraint(q, ("batch", "length", "heads", "kv"))

    init = nn.initializers.normal(stddev=self.surrogate_init_stddev)
    if self.shared_surrogates:
      s = self.param("surrogates", nn.with_logical_partitioning(init, ("clusters", "kv")),
                     (num_clusters, head_dim), self.param_dtype)
      s = jnp.broadcast_to(s, (heads, num_clusters, head_dim))
    else:
      s = self.param("surrogates", nn.with_logical_partitioning(init, ("heads", "clusters", "kv")),
                     (heads, num_clusters, head_dim), self.param_dtype)
    out, aux = cast_attention(
        q, k, v, s.astype(self.dtype), mask, cluster_size=kappa, clustering=self.clustering,
        affinity_softmax_axis=self.affinity_softmax_axis,
        cluster_affinity=self.cluster_affinity, sa_assignment=self.sa_assignment,
        summary_support=self.summary_support, combination=self.combination,
        dropout=(None if deterministic or self.dropout_rate == 0.0 else
                 lambda w: base.attention_dropout(w, self.dropout_rate, deterministic)))
    for name, value in aux.items():
      self.sow("intermediates", name, value)
    if not self.is_initializing():  # Not part of the initial variables.
      # Coverage as a metric: the fraction of (real token, head) pairs in no / several clusters.
      real = mask[:, None, :]                                              # [B, 1, N]
      pairs = jnp.maximum(jnp.sum(real) * heads, 1).astype(jnp.float32)
      self.sow("metrics", "uncovered_fraction",
               jnp.sum((aux["coverage"] == 0) & real) / pairs)
      self.sow("metrics", "overlap_fraction", jnp.sum((aux["coverage"] > 1) & real) / pairs)
    return base.OutputProjection(
        self.out_features or features, self.use_bias, self.dtype, self.param_dtype,
        kernel_init=self.kernel_init, name="out")(out.astype(self.dtype))
