"""Sparsifiner: predicted instance-dependent top-k sparse attention (Wei et al., CVPR 2023).

Faithful to the official DeiT code (``lim142857/Sparsifiner`` @ 9a11e26,
``src/models/sparsifiner.py``: ``MaskPredictor`` and ``Attention``); see
``docs/sparsifiner.md`` ("Equations and shapes", "Quirks of the official code"). Per layer, with
x [B, N, C], H heads of width d, c = d // reduce_c_factor, n_down = N // reduce_n_factor,
Nq = N - 1 patch queries when token 0 is a CLS token (else Nq = N):

  q, k, v = x W_q + b_q, x W_k + b_k, x W_v + b_v                      [B, N, H, d]
  connectivity predictor (``mask_predictor``; its weights are shared by the heads):
    q~ = q W_cq + b_cq,  k~ = k W_ck + b_ck                              [B, N, H, c]
    K_down = k~^T W_down          (W_down = proj_n [N, n_down])          [B, H, c, n_down]
    A_down = softmax_{n_down}(q~[patch rows] K_down * s_pred)            [B, H, Nq, n_down]
    mode A (recon_mode=True):  A^ = A_down W_up^T   (signed W_up = proj_back_n [N, n_down])
    mode B (recon_mode=False): A^ = top_{basis_topk}(A_down) T_tau(|W_up|)^T, where
                               T_tau(z) = z if z > tau else 0           A^: [B, H, Nq, N]
    M = the top-k columns of each row of A^, k = ceil(keep_rate * N);  the CLS row is dense;
        M is under stop_gradient (no gradient reaches the predictor through the mask)
  L = q k^T / sqrt(d)
  mode A: P = softmax(L)  (dense: stage 1 trains the predictor on unchanged token values)
  mode B: P = softmax(L with -inf where M = 0), NaN -> 0
  y = merge_heads(P v) W_o + b_o                                         [B, N, out_features]

s_pred = H^-1/2 in the code (``predictor_scale='num_heads'``, the default), d^-1/2 in the paper
figure (``'head_dim'``). Mode is an explicit field, not inferred from ``deterministic``: in the
official code a validation pass during stage 1 already uses mode B (docs/sparsifiner.md).

Two equivalent mode-B paths (``path``):
  'masked'  the official dense-then-mask computation: [B, H, N, N] logits, -inf outside M.
  'gather'  only the k selected keys of each patch query: K and V rows are gathered per query
            and the softmax runs over k, O(N k d); the CLS row is dense, O(N d). On the CPU the
            query rows run in steps of GATHER_CHUNK_ROWS so that their gathered [32, k, d] keys
            and values stay in cache, with a custom backward pass that recomputes them step by
            step (flash-attention style) and scatter-adds dK and dV; on other platforms, and with
            attention dropout active, one batched gather ([B, H, Nq, k, d]) with autodiff.
            ``jax.lax.platform_dependent`` picks the CPU version at lowering time.
The predictor's A^ is [B, H, Nq, N] on both paths and its top-k runs over N columns: that
O(N^2) part is inherent to the official method (its ``approx_attn``). Ours, not the paper's:
  'block'   blocks of ``block_size`` tokens; each query block attends to its own key block and
            the best others, ceil(keep_rate * NB) of the NB blocks, scored by A^'s block means
            computed from block-averaged factors (``block_scores``), so no [N, N] array is formed
            (``docs/sparsifiner.md``, "The block path").

Cost: predictor O(N n_down c H) + A^ O(N^2 H basis_topk) (mode A: O(N^2 H n_down)) + a top-k
over N columns for N H rows; attention O(N^2 d H) on the masked path, O(N k d H) on the gather
path. Memory: A^ is [B, H, Nq, N] float32 on both paths. The predictor (q~, k~, A_down, A^,
top-k) runs in float32 whatever ``dtype`` is, so that the selected sets do not depend on
bfloat16 rounding. On the CPU, XLA's TopK (one thread, its time growing with k) makes the
top-k over A^ the largest single cost: at N = 1024, H = 8, d = 64, keep 0.1 it takes longer than
the whole dense attention layer, so the forward pass is several times slower than dense
attention there and forward + backward about half as fast
(``experiments/results/attention_targets_short.md``; the FLOP savings of the paper are counted,
not measured, ``docs/sparsifiner.md``, "Cost").

Padding (``mask``; the official code has none) and what we add to keep it from leaking:
  * padded keys are never selected: their A^ columns are -inf before the top-k, and they are
    excluded from the dense CLS row and from recon-mode attention;
  * when a sample has fewer real keys than k, the surplus selected slots (padded keys) are
    masked: the budget is effectively min(k, real keys) per sample;
  * the official predictor mixes all tokens through proj_n (a projection along the token axis),
    so padded tokens would change A^ of real queries: we zero the padded tokens' k~ rows (and q~
    rows) before the token-axis projection. With this, padded tokens never change real tokens'
    outputs. (The official code zeroes the q~/k~ rows of pruned tokens the same way.)

Token pruning (EViT-style, ``token_keep_rate < 1``, needs ``has_cls_token``; skipped in
recon_mode as in the official code): score = mean over heads of the CLS row of the attention
after masking, P[:, :, 0, 1:]; the ceil(token_keep_rate * (N - 1)) best patches still kept are
kept (budget counted from the initialised length, as in the official code). The module's output
is unchanged; it sows the boolean ``token_keep_mask`` [B, N] (CLS True if real, padding False)
and, with ``return_token_keep=True``, also returns it, so that the block can zero the pruned
tokens' features (``clustr_jax.models.vit``). A later layer gets the running keep mask in one
of two ways (docs/sparsifiner.md, "Token pruning"):
  * ``token_keep`` (the official, faithful handling): the pruned tokens stay in the sequence;
    their q, k and v rows are zeroed, their q~ / k~ rows too, and their A^ columns are -inf
    before the top-k; the attention budget is min(k, kept_patches) with ``kept_patches`` the
    number of patches still kept (the official code lowers its stored budget to the first
    sample's kept count, which is the same for every sample); the dense CLS row still spans
    every token, so each pruned token takes weight exp(0 - max) with value 0 there;
  * ``mask`` (ours): the running keep mask given as the padding mask, so that pruned tokens act
    exactly like padding: excluded from the CLS row and never selected, the budget clipped per
    sample (surplus slots masked).

Sown into 'intermediates' (for the distillation losses and plots):
  approx_attn      A^ [B, H, Nq, N] float32 (mode A: the signed reconstruction for
                   L_recon = sum (A^ - A_teacher[:, :, 1:, :])^2; mode B: the scores of the top-k)
  unmasked_attn    dense softmax(L) [B, H, N, N] float32, recon_mode only (padding excluded)
  attn_mask        mode B, path 'masked': bool [B, H, N, N] (CLS row = real keys)
  attn_indices     mode B, path 'gather': int32 [B, H, Nq, k], each patch query's selected keys,
                   -1 for masked surplus slots (the CLS row, dense, is not listed)
  attn_blocks      mode B, path 'block': int32 [B, H, NB, m], each query block's key blocks, -1
                   for a chosen block without a real key (approx_attn then holds the block
                   scores [B, H, NB, NB])
  token_keep_mask  bool [B, N], only when token_keep_rate < 1

Parameters (names mirror the official state-dict keys under ``blocks.i.attn.``):
  query/key/value: {kernel [C, H, d], bias [H, d]}  from qkv.weight (3C', C) / qkv.bias (3C'),
      output rows laid out [q | k | v], each split head-major into (H, d):
      query.kernel = qkv.weight[0:C'].T.reshape(C, H, d), query.bias = qkv.bias[0:C'].reshape(H, d);
      key from rows C':2C', value from rows 2C':3C'  (C' = qkv_features = H d).
  proj: {kernel [H, d, C_out], bias [C_out]} = proj.weight.T.reshape(H, d, C_out), proj.bias.
  mask_predictor/proj_c_q: {kernel [d, c] = proj_c_q.weight.T, bias [c]}; proj_c_k likewise.
  mask_predictor/proj_n [N, n_down] and proj_back_n [N, n_down]: copied as they are.
Initialisation: the projections use ``kernel_init`` (None: xavier-uniform, the LRA default; the
vision models pass timm's trunc-normal(0.02)), zero biases; the predictor follows timm's
``trunc_normal_(std=.02)``, whose bounds a=-2, b=2 are absolute, i.e. an (effectively
untruncated) normal with std 0.02 (``base.trunc_normal_02``), and zero biases.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from clustr_jax.attention import base

_NAME = "SparsifinerAttention"
_PATHS = ("gather", "masked", "block")
_SCALES = ("num_heads", "head_dim")

#: timm's trunc_normal_(std=.02) truncates at +-2 absolute, i.e. +-100 standard deviations.
predictor_init = base.trunc_normal_02


def _safe_softmax(logits: jax.Array, allowed: jax.Array) -> jax.Array:
  """softmax(where(allowed, logits, -inf)) with fully masked rows set to 0 (official NaN -> 0).

  Written without NaNs so that gradients stay finite for such rows.
  """
  logits = jnp.where(allowed, logits, -jnp.inf)
  row_max = jnp.max(logits, axis=-1, keepdims=True)
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  e = jnp.where(allowed, jnp.exp(logits - jax.lax.stop_gradient(row_max)), 0.0)
  total = jnp.sum(e, axis=-1, keepdims=True)
  return e / jnp.where(total > 0, total, 1.0)


#: Rows per step of the CPU gather path (their gathered keys and values stay in cache).
GATHER_CHUNK_ROWS = 32

#: Query blocks per step of the CPU block path (``base.chunked_attention``: each step's
#: [rows, block_size, kept block_size] weights stay in cache; a divisor of B H NB is used).
BLOCK_CHUNK_ROWS = 16


def _rows_attention(q: jax.Array, k: jax.Array, v: jax.Array, index: jax.Array,
                    slot_valid: jax.Array, scale: float, drop=None) -> jax.Array:
  """Attention of each query row over its own k keys, by gathering those keys' rows.

  Args:
    q: [..., R, d] query rows (leading dims are batch dims, e.g. [B, H]).
    k, v: [..., T, d] key / value rows.
    index: int [..., R, k], the rows of k / v that each query attends to.
    slot_valid: bool [..., R, k]; False slots get weight 0 (a row without any: output 0).
    scale: logit scale.
    drop: optional dropout on the [..., R, k] weights.

  Returns:
    [..., R, d] in v's dtype. Cost O(R k d) time and [..., R, k, d] memory for the gathered
    rows. The batch dims stay batch dims of the gathers (no reshapes that would merge sharded
    axes).
  """
  gather = lambda table, i: table[i]  # noqa: E731
  for _ in range(q.ndim - 2):
    gather = jax.vmap(gather)
  logits = jnp.einsum("...rd,...rkd->...rk", q, gather(k, index),
                      preferred_element_type=jnp.float32) * scale
  weights = _safe_softmax(logits, slot_valid)
  if drop is not None:
    weights = drop(weights)
  return jnp.einsum("...rk,...rkd->...rd", weights.astype(v.dtype), gather(v, index))


def _chunks(x: jax.Array, rows: int) -> jax.Array:
  return x.reshape((-1, rows) + x.shape[1:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _chunked_rows_attention(q, k_table, v_table, index, slot_valid, scale, rows):
  """``_rows_attention`` in steps of ``rows`` query rows (R a multiple of rows), so that the
  gathered [rows, k, d] keys and values stay in cache; the backward pass recomputes them step by
  step (like flash attention) and scatter-adds into dK and dV. Same values and gradients."""
  def step(_, xs):
    return None, _rows_attention(*xs[:1], k_table, v_table, *xs[1:], scale)
  _, out = jax.lax.scan(step, None, (_chunks(q, rows), _chunks(index, rows),
                                     _chunks(slot_valid, rows)))
  return out.reshape(q.shape[:1] + out.shape[2:])


def _chunked_fwd(q, k_table, v_table, index, slot_valid, scale, rows):
  out = _chunked_rows_attention(q, k_table, v_table, index, slot_valid, scale, rows)
  return out, (q, k_table, v_table, index, slot_valid)


def _chunked_bwd(scale, rows, residuals, d_out):
  q, k_table, v_table, index, slot_valid = residuals
  f32 = jnp.float32

  def step(carry, xs):
    d_k, d_v = carry
    q_c, index_c, valid_c, d_out_c = xs
    q_c, d_out_c = q_c.astype(f32), d_out_c.astype(f32)
    keys, values = k_table[index_c].astype(f32), v_table[index_c].astype(f32)    # [rows, k, d]
    weights = _safe_softmax(jnp.einsum("rd,rkd->rk", q_c, keys) * scale, valid_c)
    d_weights = jnp.einsum("rd,rkd->rk", d_out_c, values)
    d_logits = weights * (d_weights - jnp.sum(weights * d_weights, -1, keepdims=True)) * scale
    d_k = d_k.at[index_c].add(d_logits[..., None] * q_c[:, None, :])
    d_v = d_v.at[index_c].add(weights[..., None] * d_out_c[:, None, :])
    return (d_k, d_v), jnp.einsum("rk,rkd->rd", d_logits, keys)

  zeros = jnp.zeros(k_table.shape, f32)
  (d_k, d_v), d_q = jax.lax.scan(
      step, (zeros, jnp.zeros(v_table.shape, f32)),
      (_chunks(q, rows), _chunks(index, rows), _chunks(slot_valid, rows), _chunks(d_out, rows)))
  return (d_q.reshape(q.shape).astype(q.dtype), d_k.astype(k_table.dtype),
          d_v.astype(v_table.dtype), None, None)


_chunked_rows_attention.defvjp(_chunked_fwd, _chunked_bwd)


def _cpu_rows_attention(q, k, v, index, slot_valid, scale):
  """``_rows_attention`` (same arguments, batch dims [B, H]) for the CPU: the batch dims are
  flattened into one table and the rows run in steps of GATHER_CHUNK_ROWS."""
  *batch, rows, head_dim = q.shape
  length, k_att = k.shape[-2], index.shape[-1]
  groups = math.prod(batch)
  offset = (jnp.arange(groups, dtype=index.dtype) * length).reshape(tuple(batch) + (1, 1))
  flat = lambda x, width: x.reshape(groups * x.shape[-2], width)  # noqa: E731
  total = groups * rows
  pad = -total % GATHER_CHUNK_ROWS
  pad_rows = lambda x: jnp.pad(x, [(0, pad), (0, 0)])  # noqa: E731
  out = _chunked_rows_attention(
      pad_rows(flat(q, head_dim)), flat(k, head_dim), flat(v, head_dim),
      pad_rows(flat(index + offset, k_att)), pad_rows(flat(slot_valid, k_att)), scale,
      GATHER_CHUNK_ROWS)
  return out[:total].reshape(q.shape)


def _materialised_transpose(x: jax.Array) -> jax.Array:
  """x.T for a 2-D float32 x. On the CPU it is computed as a product with the identity (exact:
  every output is one x entry times 1 plus zeros), which XLA materialises; a plain transpose is
  fused into the consumer's gather loop and re-read at a stride there (3x slower at N = 1024)."""
  def by_product(x):
    eye = jnp.eye(x.shape[1], dtype=x.dtype)
    return jnp.einsum("nm,mk->kn", x, eye, precision=jax.lax.Precision.HIGHEST)
  return jax.lax.platform_dependent(x, cpu=by_product, default=lambda x: x.T)


class _ChannelLinear(nn.Module):
  """The official ``nn.Linear(head_dim, reduced_c)``, shared by the heads: [..., d] -> [..., c].

  kernel [d, c] (= the PyTorch weight transposed), bias [c]; computed in float32.
  """
  features: int
  param_dtype: base.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", nn.with_logical_partitioning(predictor_init, ("kv", None)),
                        (x.shape[-1], self.features), self.param_dtype)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), (None,)),
                      (self.features,), self.param_dtype)
    y = jnp.einsum("...d,dc->...c", x.astype(jnp.float32), kernel.astype(jnp.float32))
    return y + bias.astype(jnp.float32)


def block_scores(coef: jax.Array, basis: jax.Array, valid: jax.Array, basis_topk: int,
                 block_size: int, has_cls_token: bool) -> jax.Array:
  """Mode B's A^ averaged over every (query block, key block), without forming A^ (ours).

  A^ = C B^T is linear in both factors (C: each row's ``basis_topk`` top coefficients, zero
  elsewhere, [Nq, n_down]; B = T_tau(|W_up|) [N, n_down]), so the mean of A^ over the real
  queries i of query block a and the real keys j of key block b is
  (mean_{i in a} C_i) . (mean_{j in b} B_j): an [NB, NB] product instead of an [Nq, N] one.
  Blocks tile the N tokens (token 0 in block 0); the CLS query (``has_cls_token``) has no row of
  C and counts in no block mean. See ``docs/sparsifiner.md`` ("The block path").

  Args:
    coef: float32 [B, H, Nq, n_down], the softmax coefficients A_down of the predicted rows.
    basis: float32 [N, n_down], T_tau(|W_up|).
    valid: bool [B, N], True = real token.
    basis_topk: coefficients kept per row (mode B's top-k over n_down).
    block_size: tokens per block.
    has_cls_token: token 0 is a CLS token (no row in ``coef``).

  Returns:
    float32 [B, H, NB, NB], NB = ceil(N / block_size); 0 where a block has no real token.
  """
  batch, heads, _, n_down = coef.shape
  length = basis.shape[0]
  num_blocks = -(-length // block_size)
  pad = num_blocks * block_size - length
  blocked = lambda t: jnp.pad(t, ((0, 0), (0, pad))).reshape(  # noqa: E731
      batch, num_blocks, block_size).astype(jnp.float32)
  query_valid = valid.at[:, 0].set(False) if has_cls_token else valid
  q_weight, k_weight = blocked(query_valid), blocked(valid)                 # [B, NB, bs]
  basis = jnp.pad(basis, ((0, pad), (0, 0))).reshape(num_blocks, block_size, n_down)
  k_mean = jnp.einsum("nsm,bns->bmn", basis, k_weight)
  k_mean = k_mean / jnp.maximum(k_weight.sum(-1), 1.0)[:, None, :]         # [B, n_down, NB]
  # Each row's score of each key block: its top coefficients times the gathered rows of k_mean
  # ([B, H, Nq, topk, NB], not the [Nq, n_down] dense coefficients).
  top_coef, top_index = base.top_k(coef, basis_topk)                        # [B, H, Nq, topk]
  gathered = jax.vmap(lambda table, index: table[index])(k_mean, top_index)
  row_scores = jnp.einsum("bhqt,bhqtk->bhqk", top_coef, gathered)          # [B, H, Nq, NB]
  if has_cls_token:
    row_scores = jnp.pad(row_scores, ((0, 0), (0, 0), (1, 0), (0, 0)))
  row_scores = jnp.pad(row_scores, ((0, 0), (0, 0), (0, pad), (0, 0)))
  row_scores = row_scores.reshape(batch, heads, num_blocks, block_size, num_blocks)
  total = jnp.einsum("bhnsk,bns->bhnk", row_scores, q_weight)
  return total / jnp.maximum(q_weight.sum(-1), 1.0)[:, None, :, None]


def block_attention(q: jax.Array, k: jax.Array, v: jax.Array, valid: jax.Array,
                    scores: jax.Array, *, keep_rate: float, block_size: int, has_cls_token: bool,
                    scale: float, dropout=None) -> tuple[jax.Array, jax.Array | None, jax.Array]:
  """The block path's attention (ours, ``docs/sparsifiner.md``, "The block path").

  The N tokens are tiled into NB = ceil(N / block_size) blocks (token 0 in block 0). Each query
  block keeps its own key block and the best others by ``scores``, ceil(keep_rate * NB) blocks
  in all (at least 1, at most NB), and attends to every real key of the kept blocks; blocks
  without a real token are never chosen over blocks with one, and a chosen one is masked. With
  ``has_cls_token``, token 0's query row is dense (all real keys).

  Args:
    q, k, v: [B, N, H, d], one floating dtype.
    valid: bool [B, N], True = real token.
    scores: float32 [B, H, NB, NB], the score of each (query block, key block), e.g.
      ``block_scores`` (no gradient flows through the choice).
    keep_rate: the attention keep rate rho in (0, 1].
    block_size: tokens per block (>= 1).
    has_cls_token: token 0 is a CLS token with a dense query row.
    scale: the logit scale (d^-1/2).
    dropout: optional function applied to the attention weights (training). Without it, the
      CPU runs the query blocks in steps of BLOCK_CHUNK_ROWS (``base.chunked_attention``, a
      recomputing backward pass); other platforms, and any with dropout, one batched product.

  Returns:
    (out [B, N, H, d] in v's dtype; the CLS row's weights float32 [B, H, N], or None without a
    CLS token; the chosen key blocks int32 [B, H, NB, kept], -1 where a chosen block has no real
    token).

  Raises:
    ValueError: keep_rate outside (0, 1], block_size < 1, or scores not [B, H, NB, NB].
  """
  drop = dropout if dropout is not None else (lambda w: w)
  batch, length, heads, head_dim = q.shape
  size = block_size
  if not 0.0 < keep_rate <= 1.0:
    raise ValueError(f"{_NAME}: block_attention keep_rate must be in (0, 1]; got {keep_rate}")
  if size < 1:
    raise ValueError(f"{_NAME}: block_attention block_size must be >= 1; got {size}")
  num_blocks = -(-length // size)
  if scores.shape != (batch, heads, num_blocks, num_blocks):
    raise ValueError(f"{_NAME}: block_attention scores must be [B, H, NB, NB] = "
                     f"{(batch, heads, num_blocks, num_blocks)} (NB = ceil({length} / "
                     f"{size})); got {tuple(scores.shape)}")
  pad = num_blocks * size - length
  kept = min(num_blocks, max(1, math.ceil(keep_rate * num_blocks)))
  token_valid = jnp.pad(valid, ((0, 0), (0, pad))).reshape(batch, num_blocks, size)
  block_valid = token_valid.any(-1)                                          # [B, NB]
  score = jnp.where(block_valid[:, None, None, :], scores, -jnp.inf)
  score = jnp.where(jnp.eye(num_blocks, dtype=bool), jnp.inf, score)        # own block always
  _, chosen = jax.lax.top_k(jax.lax.stop_gradient(score), kept)            # [B, H, NB, kept]
  chosen_valid = jax.vmap(lambda m, i: m[i])(block_valid, chosen)          # [B, H, NB, kept]

  def blocks(t):                                                   # [B, N, H, d] -> blocks
    t = jnp.pad(t.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, pad), (0, 0)))
    return t.reshape(batch, heads, num_blocks, size, head_dim)     # [B, H, NB, bs, d]

  gather = jax.vmap(jax.vmap(lambda t, i: t[i]))                   # per batch and head
  qb, kb, vb = blocks(q), blocks(k), blocks(v)
  kg = gather(kb, chosen).reshape(batch, heads, num_blocks, kept * size, head_dim)
  vg = gather(vb, chosen).reshape(batch, heads, num_blocks, kept * size, head_dim)
  key_ok = jax.vmap(lambda m, i: m[i])(token_valid, chosen)        # [B, H, NB, kept, bs]
  key_ok = (key_ok & chosen_valid[..., None]).reshape(batch, heads, num_blocks, kept * size)

  def batched(qb, kg, vg, key_ok):
    logits = jnp.einsum("bhnsd,bhntd->bhnst", qb, kg).astype(jnp.float32) * scale
    weights = _safe_softmax(logits, key_ok[..., None, :])          # [B, H, NB, bs, kept bs]
    return jnp.einsum("bhnst,bhntd->bhnsd", drop(weights).astype(v.dtype), vg)

  def chunked(qb, kg, vg, key_ok):                                 # the CPU, without dropout
    flat = lambda t: t.reshape((-1,) + t.shape[3:])  # noqa: E731  [B H NB, ...]
    rows = math.gcd(batch * heads * num_blocks, BLOCK_CHUNK_ROWS)
    return base.chunked_attention(flat(qb), flat(kg), flat(vg), flat(key_ok), scale,
                                  rows).reshape(qb.shape)

  if dropout is None:
    out = jax.lax.platform_dependent(qb, kg, vg, key_ok, cpu=chunked, default=batched)
  else:
    out = batched(qb, kg, vg, key_ok)
  out = out.reshape(batch, heads, num_blocks * size, head_dim)[:, :, :length]
  cls_weights = None
  if has_cls_token:                                                # the dense CLS row
    qh, kh, vh = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
    cls_logits = jnp.einsum("bhd,bhnd->bhn", qh[:, :, 0], kh).astype(jnp.float32) * scale
    cls_weights = _safe_softmax(cls_logits, valid[:, None, :])     # [B, H, N]
    cls_out = jnp.einsum("bhn,bhnd->bhd", drop(cls_weights).astype(v.dtype), vh)
    out = out.at[:, :, 0].set(cls_out)
  return (out.transpose(0, 2, 1, 3), cls_weights,
          jnp.where(chosen_valid, chosen, -1).astype(jnp.int32))


class MaskPredictor(nn.Module):
  """The connectivity predictor: low-rank approximate attention A^ (docs/sparsifiner.md).

  Attributes:
    num_heads: H (for the official scale H^-1/2).
    reduced_c: c, the channel width of q~ and k~.
    reduced_n: n_down, the token-axis rank of proj_n / proj_back_n.
    reduce_n_factor: only for the error message.
    predictor_scale: 'num_heads' (H^-1/2, official) or 'head_dim' (d^-1/2, paper figure).
    basis_threshold, basis_topk, recon_mode, has_cls_token: see ``SparsifinerAttention``.
    block_size: None, or (mode B only) return the block scores of ``block_scores`` for blocks of
      this many tokens instead of A^.
    param_dtype: parameter dtype. The computation is float32.
    token_projections: None (proj_n / proj_back_n are this predictor's parameters, as the
      official code), or a ``TokenProjections`` module shared by the model's layers.

  Call: q, k [B, N, H, d] (any float dtype), valid bool [B, N] (True = real, unpruned token) ->
  A^ float32 [B, H, Nq, N], or with ``block_size`` (mode B) block scores float32
  [B, H, NB, NB], NB = ceil(N / block_size).

  Raises:
    ValueError: N differs from the length proj_n / proj_back_n were initialised for.
  """
  num_heads: int
  reduced_c: int
  reduced_n: int
  reduce_n_factor: int
  predictor_scale: str = "num_heads"
  basis_threshold: float = 0.02
  basis_topk: int = 8
  recon_mode: bool = False
  has_cls_token: bool = True
  block_size: int | None = None
  param_dtype: base.Dtype = jnp.float32
  token_projections: Any = None

  def _check_length(self, name: str, stored: tuple[int, ...], length: int) -> None:
    if tuple(stored) != (length, self.reduced_n):
      raise ValueError(
          f"{_NAME}: mask_predictor.{name} has shape {tuple(stored)}, initialised for length "
          f"{stored[0]} (n_down = {stored[0]} // reduce_n_factor = {stored[1]}); the input has "
          f"length {length}, which with reduce_n_factor={self.reduce_n_factor} needs "
          f"({length}, {self.reduced_n}). The module is bound to the length it was initialised "
          "with: pad inputs to that length")

  def _token_param(self, name: str, length: int) -> jax.Array:
    if self.has_variable("params", name):
      self._check_length(name, jnp.shape(nn.meta.unbox(self.get_variable("params", name))),
                         length)
    return self.param(name, nn.with_logical_partitioning(predictor_init, ("length", None)),
                      (length, self.reduced_n), self.param_dtype)

  @nn.compact
  def __call__(self, q: jax.Array, k: jax.Array, valid: jax.Array) -> jax.Array:
    _, length, num_heads, head_dim = q.shape
    if self.token_projections is not None:
      w_down, w_up = self.token_projections()
      for name, w in (("proj_n", w_down), ("proj_back_n", w_up)):
        self._check_length(name, w.shape, length)
    else:
      w_down, w_up = (self._token_param(name, length) for name in ("proj_n", "proj_back_n"))
    w_down, w_up = w_down.astype(jnp.float32), w_up.astype(jnp.float32)
    q_c = _ChannelLinear(self.reduced_c, self.param_dtype, name="proj_c_q")(q)  # [B, N, H, c]
    k_c = _ChannelLinear(self.reduced_c, self.param_dtype, name="proj_c_k")(k)
    # Ours (the official code has no padding): padded / pruned tokens' rows are zeroed before
    # the token-axis projection, so they cannot change A^ of real queries.
    keep = valid[:, :, None, None]
    q_c = jnp.where(keep, q_c, 0.0)
    k_c = jnp.where(keep, k_c, 0.0)
    k_down = jnp.einsum("bnhc,nm->bhcm", k_c, w_down)                      # [B, H, c, n_down]
    if self.has_cls_token:
      q_c = q_c[:, 1:]                                                       # drop the CLS query
    scale = (num_heads if self.predictor_scale == "num_heads" else head_dim) ** -0.5
    coef = jax.nn.softmax(jnp.einsum("bnhc,bhcm->bhnm", q_c, k_down) * scale, axis=-1)
    if self.recon_mode:                                  # mode A: signed basis, all coefficients
      return jnp.einsum("bhnm,Nm->bhnN", coef, w_up)
    basis = jnp.abs(w_up)                                # mode B: T_tau(|W_up|), top coefficients
    basis = jnp.where(basis > self.basis_threshold, basis, 0.0)
    if self.block_size is not None:
      return block_scores(coef, basis, valid, self.basis_topk, self.block_size,
                          self.has_cls_token)
    # A^[., n, j] = sum_t top_coef[., n, t] basis[j, top_index[., n, t]]: basis_topk gathered
    # rows of basis^T instead of a product with the (mostly zero) dense coefficients. The
    # barrier keeps XLA (where it runs TopK) from rewriting it and the slices into a full sort.
    top_coef, top_index = jax.lax.optimization_barrier(
        base.top_k(coef, self.basis_topk))                                   # [B, H, Nq, topk]
    basis_t = _materialised_transpose(basis)                                 # [n_down, N]
    approx = top_coef[..., 0, None] * basis_t[top_index[..., 0]]
    for t in range(1, self.basis_topk):
      approx = approx + top_coef[..., t, None] * basis_t[top_index[..., t]]
    return approx


class TokenProjections(nn.Module):
  """proj_n and proj_back_n [length, n_down] shared by every Sparsifiner layer of a model.

  Ours, not the paper's: the official predictor has its own [N, n_down] pair per layer, which
  on a narrow model over long sequences costs more parameters than the rest of the model (the
  32-wide LRA Pathfinder encoder: +248 % over dense at the smallest n_down). Sharing one pair
  across the layers is the nearest setting within a parameter budget (``docs/sparsifiner.md``,
  "Shared token-axis projections"). A model creates it once, through
  ``SparsifinerAttention.shared_across_layers``, and hands it to every layer.

  Attributes:
    length: N; reduced_n: n_down; param_dtype: parameter dtype.

  Call: () -> (proj_n, proj_back_n), each [length, reduced_n] in ``param_dtype``, trunc-normal
  (0.02) initialised with logical axes ('length', None), as the per-layer parameters.
  """
  length: int
  reduced_n: int
  param_dtype: base.Dtype = jnp.float32

  @nn.compact
  def __call__(self) -> tuple[jax.Array, jax.Array]:
    init = nn.with_logical_partitioning(predictor_init, ("length", None))
    return tuple(self.param(name, init, (self.length, self.reduced_n), self.param_dtype)
                 for name in ("proj_n", "proj_back_n"))


class SparsifinerAttention(nn.Module):
  """Sparsifiner attention behind the attention contract (see ``base`` and the module docstring).

  Attributes:
    num_heads: H.
    qkv_features: total query/key/value width (H * d); default: the input width.
    out_features: output width; default: the input width.
    dropout_rate: dropout on the attention weights (training only; the official DeiT file
      applies none, its LV-ViT file does).
    use_bias: biases on the q/k/v projections (DeiT qkv_bias=True). The output projection
      always has a bias, as the official ``proj``.
    keep_rate: attention keep rate rho; each patch query keeps k = ceil(rho * N) keys. Per-layer
      rates belong to the model (one module per layer).
    reduce_n_factor: n_down = N // reduce_n_factor, the token-axis rank of proj_n / proj_back_n
      ([N, n_down]); the module is bound to the length N it was initialised with.
    reduce_c_factor: c = head_dim // reduce_c_factor.
    predictor_scale: 'num_heads' (H^-1/2, the official code) or 'head_dim' (d^-1/2, the paper).
    basis_threshold: tau of T_tau(|W_up|) in mode B.
    basis_topk: low-rank coefficients kept per row in mode B.
    recon_mode: True = mode A (stage 1: signed basis, dense attention, A^ sown for L_recon);
      False = mode B (thresholded basis, top-k mask, sparse attention). Explicit, never inferred
      from ``deterministic``.
    has_cls_token: token 0 is a CLS token: its query row is dense and it is not a predictor
      query. False: every row is predicted.
    path: 'gather' (k keys per query, O(N k d)) or 'masked' (official dense-then-mask), the same
      result; or 'block' (ours, ``docs/sparsifiner.md``, "The block path"): the predictor scores
      key blocks of ``block_size`` tokens per query block from block-averaged factors (no
      [N, N] array), each query block keeps its own block and the best others, ceil(keep_rate *
      NB) of the NB blocks in all, and attends to all real keys of those blocks; the CLS row is
      dense. Recon mode (mode A) is the same on every path.
    block_size: tokens per block of the 'block' path (64).
    token_keep_rate: EViT-style token pruning when < 1 (needs has_cls_token): sows
      ``token_keep_mask`` [B, N] keeping ceil(token_keep_rate * (N - 1)) patches.
    dtype: computation dtype (the predictor and the softmax run in float32);
    param_dtype: parameter dtype.
    kernel_init: the q/k/v/proj kernel initializer (None: xavier-uniform, LRA's; the vision
      models pass timm's trunc-normal(0.02)); the predictor keeps its trunc-normal(0.02).
    share_token_projections: ours: one proj_n / proj_back_n pair for all the model's layers
      (``TokenProjections``) instead of one per layer; needs a model that creates it
      (``shared_across_layers``: the LRA encoders).
    token_projections: the shared ``TokenProjections`` module, set by the model (not a
      config value).

  Call: ``x`` [batch, length, features], ``mask`` bool [batch, length] (True = real token),
  ``deterministic`` (False enables attention dropout, rng stream 'dropout'), ``token_keep``
  bool [batch, length] (the running keep mask of token pruning in earlier layers, CLS True;
  the official handling, see the module docstring) with ``kept_patches`` (int, the number of
  patches it keeps, the same for every sample), ``return_token_keep`` ->
  [batch, length, out_features] in ``dtype``, or with ``return_token_keep`` the pair (that,
  keep bool [batch, length]: this layer's keep mask when it prunes, else the incoming one).

  Raises:
    ValueError: keep_rate or token_keep_rate outside (0, 1]; unknown path or predictor_scale;
      n_down < 1 (reduce_n_factor) or c < 1 (reduce_c_factor); basis_topk outside [1, n_down];
      a length other than the one proj_n was initialised for; share_token_projections without
      a shared module from the model; token pruning without a CLS token; a CLS model with fewer
      than 2 tokens; a mask of the wrong shape; heads that do not divide qkv_features;
      ``token_keep`` of the wrong shape or without ``kept_patches``, or a token budget above
      ``kept_patches`` (the official top-k would bring pruned tokens back).
  """
  #: The vision blocks may pass a running token keep mask (``token_keep``, ``kept_patches``).
  supports_token_pruning = True

  num_heads: int
  qkv_features: int | None = None
  out_features: int | None = None
  dropout_rate: float = 0.0
  use_bias: bool = True
  keep_rate: float = 0.25
  reduce_n_factor: int = 6
  reduce_c_factor: int = 2
  predictor_scale: str = "num_heads"
  basis_threshold: float = 0.02
  basis_topk: int = 8
  recon_mode: bool = False
  has_cls_token: bool = True
  path: str = "gather"
  block_size: int = 64
  token_keep_rate: float = 1.0
  dtype: base.Dtype = jnp.float32
  param_dtype: base.Dtype = jnp.float32
  kernel_init: base.Initializer | None = None
  share_token_projections: bool = False
  token_projections: Any = None

  @classmethod
  def shared_across_layers(cls, kwargs: dict[str, Any], length: int) -> dict[str, Any]:
    """A multi-layer model's hook, called in its own compact scope before it builds the layers:
    with ``kwargs['share_token_projections']``, creates the one ``TokenProjections`` module
    (named 'shared_token_projections', n_down = ``length`` // reduce_n_factor) and returns
    ``kwargs`` with ``token_projections`` set to it; otherwise ``kwargs`` unchanged.

    Args:
      kwargs: the layers' attention options; length: the sequence length N the layers see.
    """
    if not kwargs.get("share_token_projections"):
      return kwargs
    factor = kwargs.get("reduce_n_factor", cls.reduce_n_factor)
    shared = TokenProjections(length, max(length // factor, 1),
                              kwargs.get("param_dtype", jnp.float32),
                              name="shared_token_projections")
    return {**kwargs, "token_projections": shared}

  @classmethod
  def sized_for(cls, length: int, *, grid: tuple[int, int] | None = None,
                cls_token: bool | None = None, sr_ratio: int | None = None,
                budget: Any = None) -> dict[str, Any]:
    """Settings for ``length`` tokens (see ``clustr_jax.attention.sized_for``), keep rate 0.25.

    An image grid: the released configuration, n_down = N // 6 and c = d // 2 (for short
    sequences, N < 48, a smaller factor keeps n_down >= basis_topk = 8), the CLS row as stated
    by ``cls_token``. A 1-D sequence (LRA): n_down = N // (N // 32) ~ 32, so the predictor's
    [N, n_down] projections stay small at long N.

    With a ``budget`` (``clustr_jax.attention.Budget``, LRA's comparison): no q/k/v biases (the
    dense baseline has none; the output projection keeps the official bias), and n_down lowered
    until the added parameters, per layer 2 (d c + c) + 2 N n_down + C, fit
    ``budget.extra_parameters``, but not below basis_topk = 8, the method's smallest n_down.
    Where the per-layer token-axis projections exceed the budget even at that floor (the
    32-wide Pathfinder model) and the model has several layers, the layers share one pair
    (``share_token_projections``, ours: 2 N n_down / L per layer) with the n_down that fits;
    ``configs/lra/common.py`` states any overhead left.
    """
    del sr_ratio
    if grid is None:
      settings: dict[str, Any] = {"keep_rate": 0.25, "reduce_n_factor": max(1, length // 32)}
    else:
      factor = 6 if length // 6 >= 8 else max(1, length // 8)
      settings = {"keep_rate": 0.25, "reduce_n_factor": factor, "reduce_c_factor": 2}
    if cls_token is not None:
      settings["has_cls_token"] = cls_token
    if budget is not None:
      settings["use_bias"] = False
      head_dim = budget.qkv_features // budget.num_heads
      c = max(1, head_dim // settings.get("reduce_c_factor", cls.reduce_c_factor))
      room = budget.extra_parameters - 2 * (head_dim * c + c) - budget.features
      floor = cls.basis_topk

      def fitting_factor(n_fit: int) -> int:
        factor = settings["reduce_n_factor"]
        while length // factor > max(n_fit, floor):
          factor += 1
        return max(1, length // floor) if length // factor < min(floor, length) else factor

      factor = fitting_factor(room // (2 * length))
      if 2 * length * (length // factor) > room and budget.num_layers > 1:
        settings["share_token_projections"] = True
        factor = fitting_factor(room * budget.num_layers // (2 * length))
      settings["reduce_n_factor"] = factor
    return settings

  def _sizes(self, length: int, head_dim: int) -> tuple[int, int, int, int]:
    """Validates the settings; returns (k, n_down, c, token budget)."""
    if not 0.0 < self.keep_rate <= 1.0:
      raise ValueError(f"{_NAME}: keep_rate must be in (0, 1]; got {self.keep_rate}")
    if not 0.0 < self.token_keep_rate <= 1.0:
      raise ValueError(f"{_NAME}: token_keep_rate must be in (0, 1]; got {self.token_keep_rate}")
    if self.path not in _PATHS:
      raise ValueError(f"{_NAME}: unknown path {self.path!r}; valid choices: {', '.join(_PATHS)}")
    if self.predictor_scale not in _SCALES:
      raise ValueError(f"{_NAME}: unknown predictor_scale {self.predictor_scale!r}; valid "
                       f"choices: {', '.join(_SCALES)}")
    if self.path == "block" and self.block_size < 1:
      raise ValueError(f"{_NAME}: block_size must be >= 1; got {self.block_size}")
    if self.has_cls_token and length < 2:
      raise ValueError(f"{_NAME}: has_cls_token=True needs length >= 2; got {length}")
    if self.token_keep_rate < 1.0 and not self.has_cls_token:
      raise ValueError(f"{_NAME}: token pruning (token_keep_rate={self.token_keep_rate} < 1) "
                       "scores patches by the CLS attention and needs has_cls_token=True")
    n_down = length // self.reduce_n_factor if self.reduce_n_factor >= 1 else 0
    if n_down < 1:
      raise ValueError(f"{_NAME}: reduce_n_factor={self.reduce_n_factor} gives n_down = length "
                       f"// reduce_n_factor = {length} // {self.reduce_n_factor} = {n_down}; "
                       "need n_down >= 1")
    c = head_dim // self.reduce_c_factor if self.reduce_c_factor >= 1 else 0
    if c < 1:
      raise ValueError(f"{_NAME}: reduce_c_factor={self.reduce_c_factor} gives c = head_dim // "
                       f"reduce_c_factor = {head_dim} // {self.reduce_c_factor} = {c}; "
                       "need c >= 1")
    if not 1 <= self.basis_topk <= n_down:
      raise ValueError(f"{_NAME}: basis_topk={self.basis_topk} must be in [1, n_down] with "
                       f"n_down = {length} // reduce_n_factor({self.reduce_n_factor}) = {n_down}")
    k = min(math.ceil(self.keep_rate * length), length)   # official: ceil(rate * num_tokens)
    token_budget = math.ceil(self.token_keep_rate * (length - 1))
    return k, n_down, c, token_budget

  def _token_keep(self, token_keep, kept_patches, x, token_budget):
    """Validates the running keep mask; returns it as bool [B, N] (all True when None)."""
    batch, length, _ = x.shape
    if token_keep is None:
      return jnp.ones((batch, length), bool)
    if tuple(token_keep.shape) != (batch, length):
      raise ValueError(f"{_NAME}: token_keep must be [batch, length] = {(batch, length)}; got "
                       f"{tuple(token_keep.shape)}")
    if kept_patches is None or not 1 <= kept_patches <= length - 1:
      raise ValueError(f"{_NAME}: token_keep needs kept_patches, the number of patches it "
                       f"keeps, in [1, {length - 1}]; got {kept_patches}")
    if self.token_keep_rate < 1.0 and token_budget > kept_patches:
      raise ValueError(f"{_NAME}: token_keep_rate={self.token_keep_rate} keeps {token_budget} "
                       f"patches, more than the {kept_patches} still kept; keep rates must not "
                       "grow from one pruning layer to the next")
    return token_keep.astype(bool)

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None, *,
               deterministic: bool = True, token_keep: jax.Array | None = None,
               kept_patches: int | None = None, return_token_keep: bool = False):
    valid = base.check_inputs(x, mask, _NAME)                       # [B, N], True = real
    batch, length, features = x.shape
    _, head_dim = base.head_dims(features, self.qkv_features, self.num_heads, _NAME)
    k_att, n_down, c, token_budget = self._sizes(length, head_dim)
    if self.share_token_projections and self.token_projections is None:
      raise ValueError(f"{_NAME}: share_token_projections=True needs the shared proj_n / "
                       "proj_back_n from the model (SparsifinerAttention.shared_across_layers, "
                       "called by the LRA encoders); this model does not create them")
    prior = self._token_keep(token_keep, kept_patches, x, token_budget)   # [B, N]
    proj = lambda name: base.HeadProjection(  # noqa: E731
        self.num_heads, head_dim, self.use_bias, self.dtype, self.param_dtype,
        kernel_init=self.kernel_init, name=name)
    q, k, v = proj("query")(x), proj("key")(x), proj("value")(x)   # [B, N, H, d]
    if token_keep is not None and not self.recon_mode:
      # Official: the pruned tokens' q, k and v rows are zeroed; they stay in the sequence.
      q, k, v = (jnp.where(prior[:, :, None, None], t, jnp.zeros((), t.dtype)) for t in (q, k, v))
      k_att = min(k_att, kept_patches)        # official: budget lowered to the kept count
    q = nn.with_logical_constraint(q, ("batch", "length", "heads", "kv"))

    approx = MaskPredictor(
        self.num_heads, c, n_down, self.reduce_n_factor, self.predictor_scale,
        self.basis_threshold, self.basis_topk, self.recon_mode, self.has_cls_token,
        self.block_size if self.path == "block" else None, self.param_dtype,
        token_projections=self.token_projections,
        name="mask_predictor")(q, k, valid & prior)   # [B, H, Nq, N] (block path: [B, H, NB, NB])
    self.sow("intermediates", "approx_attn", approx)
    scale = head_dim ** -0.5
    drop = lambda w: base.attention_dropout(w, self.dropout_rate, deterministic)  # noqa: E731

    if self.recon_mode:
      # Mode A: dense attention (padding excluded); the predictor only learns to reconstruct it.
      logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * scale
      weights = _safe_softmax(logits, valid[:, None, None, :])
      self.sow("intermediates", "unmasked_attn", weights)
      out = jnp.einsum("bhqk,bkhd->bqhd", drop(weights).astype(v.dtype), v)
      cls_weights = None
    elif self.path == "block":
      out, cls_weights, chosen = block_attention(
          q, k, v, valid, approx, keep_rate=self.keep_rate, block_size=self.block_size,
          has_cls_token=self.has_cls_token, scale=scale,
          dropout=drop if not deterministic and self.dropout_rate > 0.0 else None)
      self.sow("intermediates", "attn_blocks", chosen)
    else:
      # Mode B: each predicted row keeps its top-k columns of A^; padded keys are never chosen,
      # and surplus slots (fewer real keys than k) are masked.
      score = jnp.where((valid & prior)[:, None, None, :], approx, -jnp.inf)
      _, selected = base.top_k(jax.lax.stop_gradient(score), k_att)      # [B, H, Nq, k]
      selected_valid = jax.vmap(lambda m, i: m[i])(valid, selected)      # [B, H, Nq, k]
      if self.path == "masked":
        out, cls_weights = self._masked(q, k, v, valid, selected, selected_valid, scale, drop)
      else:
        out, cls_weights = self._gather(q, k, v, valid, selected, selected_valid, scale, drop,
                                        not deterministic and self.dropout_rate > 0.0)

    keep = valid & prior
    if self.token_keep_rate < 1.0:
      if cls_weights is not None:         # recon_mode: no pruning, as in the official code
        token_score = jnp.mean(cls_weights[:, :, 1:], axis=1)           # [B, N - 1]
        token_score = jnp.where(keep[:, 1:], token_score, -jnp.inf)
        _, kept = jax.lax.top_k(jax.lax.stop_gradient(token_score), token_budget)
        kept_mask = jnp.zeros((batch, length - 1), bool).at[
            jnp.arange(batch)[:, None], kept].set(True)
        keep = jnp.concatenate([keep[:, :1], kept_mask & keep[:, 1:]], axis=1)
      self.sow("intermediates", "token_keep_mask", keep)

    y = base.OutputProjection(
        self.out_features or features, True, self.dtype, self.param_dtype,
        kernel_init=self.kernel_init, name="proj")(out)
    return (y, keep) if return_token_keep else y

  def _masked(self, q, k, v, valid, selected, selected_valid, scale, drop):
    """Official dense-then-mask attention. Returns (out [B, N, H, d], CLS-row weights or None)."""
    batch, heads, rows, k_att = selected.shape
    length = q.shape[1]
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * scale   # [B, H, N, N]
    flat = selected.reshape(-1, k_att)
    allowed = jnp.zeros((flat.shape[0], length), bool).at[
        jnp.arange(flat.shape[0])[:, None], flat].set(True)
    allowed = allowed.reshape(batch, heads, rows, length) & valid[:, None, None, :]
    if self.has_cls_token:                                  # the dense CLS row
      cls_row = jnp.broadcast_to(valid[:, None, None, :], (batch, heads, 1, length))
      allowed = jnp.concatenate([cls_row, allowed], axis=2)
    self.sow("intermediates", "attn_mask", allowed)
    weights = _safe_softmax(logits, allowed)
    out = jnp.einsum("bhqk,bkhd->bqhd", drop(weights).astype(v.dtype), v)
    return out, weights[:, :, 0] if self.has_cls_token else None

  def _gather(self, q, k, v, valid, selected, selected_valid, scale, drop, dropout_active):
    """Only the k selected keys per predicted row; the CLS row dense. Same result as _masked.

    On the CPU (without attention dropout) the rows run in cache-sized steps with a custom
    backward pass (``_chunked_rows_attention``); elsewhere in one batched gather.
    """
    self.sow("intermediates", "attn_indices",
             jnp.where(selected_valid, selected, -1).astype(jnp.int32))
    qh, kh, vh = (t.transpose(0, 2, 1, 3) for t in (q, k, v))               # [B, H, N, d]
    args = (qh[:, :, 1:] if self.has_cls_token else qh, kh, vh, selected, selected_valid)
    if dropout_active:
      out = _rows_attention(*args, scale, drop=drop)
    else:
      out = jax.lax.platform_dependent(
          *args, cpu=functools.partial(_cpu_rows_attention, scale=scale),
          default=functools.partial(_rows_attention, scale=scale))          # [B, H, Nq, d]
    cls_weights = None
    if self.has_cls_token:
      cls_logits = jnp.einsum("bhd,bhnd->bhn", qh[:, :, 0], kh).astype(jnp.float32) * scale
      cls_weights = _safe_softmax(cls_logits, valid[:, None, :])             # [B, H, N]
      cls_out = jnp.einsum("bhn,bhnd->bhd", drop(cls_weights).astype(v.dtype), vh)
      out = jnp.concatenate([cls_out[:, :, None], out], axis=2)
    return out.transpose(0, 2, 1, 3), cls_weights
