"""Dense (full softmax) multi-head self-attention: the reference every mechanism is checked against.

  Q = x W_q,  K = x W_k,  V = x W_v                       [batch, length, heads, head_dim]
  A = softmax(Q K^T / sqrt(head_dim) + padding bias)       [batch, heads, length, length]
  y = merge_heads(A V) W_o                                 [batch, length, out_features]

Cost O(length^2 * qkv_features) time; memory O(length^2 * heads) on the XLA path, O(length) on
the fused and chunked paths. Source: Vaswani et al. 2017 §3.2; the LRA baseline
(``lra_benchmarks/models/transformer/transformer.py``: no biases, xavier-uniform kernels, logit
scale 1/sqrt(qkv_dim / num_heads), attention dropout not broadcast).

Which kernel runs (``docs/gpu_tpu.md``): ``attend`` picks one per platform while the program is
lowered (``lax.platform_dependent``), so one jitted or exported program carries the right kernel
for the CPU, CUDA and TPU:

  cuda  'cudnn'        cuDNN's fused flash attention (``jax.nn.dot_product_attention``), for
                       bfloat16/float16 and head_dim a multiple of 8 up to 128
  tpu   'splash'       Pallas splash attention (``jax.experimental.pallas.ops.tpu.
                       splash_attention``), lengths padded to 128
  else  'xla_chunked'  tokamax's memory-efficient chunked attention, from CHUNKED_MIN_LENGTH keys
        'xla'          ``jax.nn.dot_product_attention``'s XLA path, below it

``choose_implementation`` is that rule. Every path keeps the padding contract of
``docs/dense.md``: masked keys are never attended to while a real key exists; a padded query's
own row is finite but meaningless.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import flags
from jax import lax
from jax.experimental.pallas.ops.tpu import splash_attention as splash

from clustr_jax.attention import base

#: Values of ``DenseAttention.implementation`` and of ``attend``'s ``implementation``.
IMPLEMENTATIONS = ("auto", "xla", "xla_chunked", "cudnn", "splash")

#: Key lengths from which 'auto' takes tokamax's chunked path instead of the XLA path (where no
#: fused kernel applies). Forward+backward on 2 shared CPU cores, B 1, 8 heads x 64, float32:
#: 1,024 keys 0.14 s (XLA) against 0.16 s (chunked); 2,048 keys 0.62 s with 516 MiB of compiled
#: temporaries (XLA) against 0.55 s with 127 MiB (chunked) (``docs/gpu_tpu.md``).
CHUNKED_MIN_LENGTH = 2048

#: cuDNN's fused attention: its dtypes, and the head sizes every cuDNN 9 GPU accepts.
CUDNN_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
CUDNN_MAX_HEAD_DIM = 128

#: Splash attention's tile (its default block sizes): lengths are padded to a multiple of it,
#: and shorter sequences stay on the XLA path.
SPLASH_BLOCK = 128


def choose_implementation(platform: str, dtype: Any, head_dim: int, length: int) -> str:
  """The kernel 'auto' runs for one attention call (``docs/gpu_tpu.md``, "Which kernel").

  Args:
    platform: the lowering platform: 'cpu', 'cuda', 'rocm', 'tpu' (any other: as 'cpu').
    dtype: the query/key/value dtype.
    head_dim: d, the query/key width of one head.
    length: the number of keys (and queries) of one sequence.

  Returns:
    'cudnn' on CUDA for bfloat16/float16 with d a multiple of 8 and at most CUDNN_MAX_HEAD_DIM;
    'splash' on TPU from SPLASH_BLOCK tokens; otherwise 'xla_chunked' from CHUNKED_MIN_LENGTH
    keys and 'xla' below.
  """
  if (platform == "cuda" and jnp.dtype(dtype) in CUDNN_DTYPES and head_dim % 8 == 0
      and head_dim <= CUDNN_MAX_HEAD_DIM):
    return "cudnn"
  if platform == "tpu" and length >= SPLASH_BLOCK:
    return "splash"
  return "xla_chunked" if length >= CHUNKED_MIN_LENGTH else "xla"


def cudnn_available() -> bool:
  """Whether this process has a CUDA backend, so that cuDNN attention can be traced.

  ``jax.nn.dot_product_attention(implementation='cudnn')`` raises "cuDNN is not detected" while
  it is traced in a process without one, and ``lax.platform_dependent`` traces every branch; so a
  program traced without CUDA carries the XLA path in its CUDA branch (``docs/gpu_tpu.md``).
  """
  try:
    return bool(jax.devices("cuda"))
  except RuntimeError:
    return False


def _xla(q, k, v, key_mask, scale):
  return jax.nn.dot_product_attention(q, k, v, mask=key_mask[:, None, None, :], scale=scale,
                                      implementation="xla")


def _xla_chunked(q, k, v, key_mask, scale):
  # Imported on first use: tokamax's import takes over a second, which every user of this module
  # would otherwise pay.
  import tokamax  # pylint: disable=import-outside-toplevel
  if not flags.FLAGS.is_parsed():
    # tokamax 0.0.12 reads its options from absl flags and, when nothing has parsed them yet,
    # parses sys.argv: a script's or pytest's own arguments, which absl rejects. Its defaults
    # are what this path wants.
    flags.FLAGS.mark_as_parsed()
  return tokamax.dot_product_attention(q, k, v, mask=key_mask[:, None, None, :], scale=scale,
                                       implementation="xla_chunked")


def _cudnn(q, k, v, key_mask, scale):
  """cuDNN with its padding mask: the real keys are moved to the front (a stable partition, the
  identity for right-padded sequences; attention does not depend on the keys' order) and
  ``key_value_seq_lengths`` counts them. A sequence without real keys attends to its first key."""
  batch, length = key_mask.shape
  order = jnp.argsort(~key_mask, axis=-1, stable=True)[:, :, None, None]
  k, v = jnp.take_along_axis(k, order, axis=1), jnp.take_along_axis(v, order, axis=1)
  kv_lengths = jnp.maximum(jnp.sum(key_mask, axis=-1, dtype=jnp.int32), 1)
  return jax.nn.dot_product_attention(
      q, k, v, scale=scale, query_seq_lengths=jnp.full((batch,), length, jnp.int32),
      key_value_seq_lengths=kv_lengths, implementation="cudnn")


@functools.lru_cache(maxsize=64)
def _splash_kernel(heads: int, length: int, interpret: bool):
  """A splash kernel of full masks; its block tables are made concrete (cached across traces)."""
  mask = splash.MultiHeadMask([splash.FullMask((length, length))] * heads)
  with jax.ensure_compile_time_eval():
    return splash.make_splash_mha(mask, head_shards=1, q_seq_shards=1, interpret=interpret)


def _splash(q, k, v, key_mask, scale, interpret=False):
  """Splash attention: lengths padded to SPLASH_BLOCK, the key mask as kv segment ids (0 = pad,
  1 = real; every query has id 1), the logit scale applied to q (splash does not scale)."""
  length = q.shape[1]
  padded = -(-length // SPLASH_BLOCK) * SPLASH_BLOCK
  widths = ((0, 0), (0, padded - length), (0, 0), (0, 0))
  q, k, v = (jnp.pad(t, widths) for t in ((q * scale).astype(q.dtype), k, v))
  kv_ids = jnp.pad(key_mask, ((0, 0), (0, padded - length))).astype(jnp.int32)
  kernel = _splash_kernel(q.shape[2], padded, interpret)
  heads_major = lambda t: t.transpose(1, 0, 2)  # noqa: E731  [N, H, d] -> [H, N, d]

  def one(q, k, v, kv):
    ids = splash.SegmentIds(q=jnp.ones((padded,), jnp.int32), kv=kv)
    return kernel(heads_major(q), heads_major(k), heads_major(v), segment_ids=ids)

  out = jax.vmap(one)(q, k, v, kv_ids)                                    # [B, H, N', d]
  return out.transpose(0, 2, 1, 3)[:, :length]


_KERNELS: dict[str, Callable[..., jax.Array]] = {
    "xla": _xla, "xla_chunked": _xla_chunked, "cudnn": _cudnn, "splash": _splash}


def _forced(implementation: str) -> Callable[..., jax.Array]:
  """The kernel of a named implementation; 'splash' runs in the Pallas interpreter off TPU."""
  if implementation == "splash":
    return lambda *a: lax.platform_dependent(
        *a, tpu=_splash, default=functools.partial(_splash, interpret=True))
  if implementation == "cudnn" and not cudnn_available():
    raise ValueError("attention implementation='cudnn' needs a CUDA GPU with cuDNN in this "
                     "process; none is present (use 'auto')")
  return _KERNELS[implementation]


def attend(q: jax.Array, k: jax.Array, v: jax.Array, key_mask: jax.Array, *,
           implementation: str = "auto", scale: float | None = None) -> jax.Array:
  """softmax(q k^T scale, masked keys excluded) v with the kernel of ``implementation``.

  Args:
    q, k, v: [batch, length, heads, head_dim], one floating dtype.
    key_mask: bool [batch, length], True = a real key.
    implementation: 'auto' (``choose_implementation`` for the platform the program is lowered
      for, chosen at lowering time) or one of IMPLEMENTATIONS' kernels, forced: 'splash' runs in
      the Pallas interpreter off TPU (slow; for tests), 'cudnn' needs a CUDA GPU.
    scale: the logit scale (default head_dim^-1/2).

  Returns:
    [batch, length, heads, head_dim] in v's dtype (softmax statistics in float32 on every path).

  Raises:
    ValueError: an unknown ``implementation``, or 'cudnn' without a CUDA GPU.
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"unknown attention implementation={implementation!r}; valid choices: "
                     f"{', '.join(repr(i) for i in IMPLEMENTATIONS)}")
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  if implementation != "auto":
    return _forced(implementation)(q, k, v, key_mask, scale)
  pick = functools.partial(choose_implementation, dtype=q.dtype, head_dim=q.shape[-1],
                           length=k.shape[1])
  choice = {platform: pick(platform) for platform in ("cpu", "cuda", "tpu", "rocm")}
  if choice["cuda"] == "cudnn" and not cudnn_available():
    choice["cuda"] = choice["cpu"]
  # One callable per kernel: platform_dependent joins equal branches, tracing each kernel once.
  kernels = {name: functools.partial(_KERNELS[name], scale=scale) for name in choice.values()}
  return lax.platform_dependent(
      q, k, v, key_mask, cpu=kernels[choice["cpu"]], cuda=kernels[choice["cuda"]],
      tpu=kernels[choice["tpu"]], default=kernels[choice["rocm"]])


def masked_softmax_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                             key_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Explicit dense attention, used where the attention weights themselves are needed.

  Args:
    query: [batch, q_length, heads, head_dim].
    key, value: [batch, kv_length, heads, head_dim].
    key_mask: bool [batch, kv_length], True = the key may be attended to.

  Returns:
    (output [batch, q_length, heads, head_dim],
     weights float32 [batch, heads, q_length, kv_length]).
  """
  scale = query.shape[-1] ** -0.5
  logits = jnp.einsum("bqhd,bkhd->bhqk", query, key).astype(jnp.float32) * scale
  logits = jnp.where(key_mask[:, None, None, :], logits, base.MASK_VALUE)
  weights = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(value.dtype), value)
  return out, weights


#: Queries per step of ``chunked_dropout_attention``.
DROPOUT_CHUNK_QUERIES = 512


def chunked_dropout_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                              key_mask: jax.Array, rate: float, rng: jax.Array,
                              chunk: int | None = None) -> jax.Array:
  """Dense attention with dropout on its weights, ``chunk`` queries at a time.

  The training path of long sequences (no fused kernel takes dropout): each step forms the
  [batch, heads, chunk, kv_length] weights of its queries (``masked_softmax_attention``), drops
  them (keep probability 1 - rate, kept weights scaled by 1 / (1 - rate), as ``nn.Dropout``; the
  step's key is ``fold_in(rng, step)``) and is recomputed in the backward pass, so memory is
  O(chunk kv_length heads) instead of O(q_length kv_length heads).

  Args:
    query: [batch, q_length, heads, head_dim]; key, value: [batch, kv_length, heads, head_dim].
    key_mask: bool [batch, kv_length], True = a real key.
    rate: dropout rate in [0, 1).
    rng: a PRNG key.
    chunk: queries per step (default DROPOUT_CHUNK_QUERIES).

  Returns:
    [batch, q_length, heads, head_dim] in value's dtype.
  """
  chunk = chunk or DROPOUT_CHUNK_QUERIES
  batch, length, heads, head_dim = query.shape
  steps = -(-length // chunk)
  padded = jnp.pad(query, ((0, 0), (0, steps * chunk - length), (0, 0), (0, 0)))
  chunks = padded.reshape(batch, steps, chunk, heads, head_dim).swapaxes(0, 1)

  @jax.checkpoint
  def step(inputs):
    q, i = inputs
    _, weights = masked_softmax_attention(q, key, value, key_mask)       # [B, H, chunk, N]
    keep = jax.random.bernoulli(jax.random.fold_in(rng, i), 1.0 - rate, weights.shape)
    weights = jnp.where(keep, weights / (1.0 - rate), 0.0)
    return jnp.einsum("bhqk,bkhd->bqhd", weights.astype(value.dtype), value)

  out = lax.map(step, (chunks, jnp.arange(steps)))                        # [S, B, chunk, H, d]
  return out.swapaxes(0, 1).reshape(batch, steps * chunk, heads, head_dim)[:, :length]


class DenseAttention(nn.Module):
  """Full multi-head self-attention behind the attention contract (see ``base``).

  Attributes:
    num_heads: number of heads H.
    qkv_features: total query/key/value width (H * head_dim); default: the input width.
    out_features: output width; default: the input width.
    dropout_rate: dropout on the attention weights (training only; from CHUNKED_MIN_LENGTH
      tokens ``chunked_dropout_attention``, below it the weights of all queries at once).
    use_bias: biases on the projections (LRA: False).
    out_bias: bias on the output projection; None = ``use_bias`` (ViT/DeiT and ClusTR stage 4:
      the official ``proj`` always has one, whatever qkv_bias).
    implementation: the kernel (``attend``, ``docs/gpu_tpu.md``): 'auto' (default: per platform,
      chosen at lowering time), or forced: 'xla', 'xla_chunked', 'cudnn' (CUDA only), 'splash'
      (the Pallas interpreter off TPU); used whenever attention dropout is inactive.
    dtype: computation dtype; param_dtype: parameter dtype.
    kernel_init: the projections' kernel initializer (None: xavier-uniform, LRA's).

  Call: ``x`` [batch, length, features], ``mask`` bool [batch, length] (True = real token) ->
  [batch, length, out_features]. Raises ValueError for a mask of the wrong shape, heads that do
  not divide ``qkv_features``, or an unknown ``implementation``.
  """
  num_heads: int
  qkv_features: int | None = None
  out_features: int | None = None
  dropout_rate: float = 0.0
  use_bias: bool = False
  out_bias: bool | None = None
  implementation: str = "auto"
  dtype: base.Dtype = jnp.float32
  param_dtype: base.Dtype = jnp.float32
  kernel_init: base.Initializer | None = None

  @classmethod
  def sized_for(cls, length: int, *, grid: tuple[int, int] | None = None,
                cls_token: bool | None = None, sr_ratio: int | None = None,
                budget: Any = None) -> dict[str, Any]:
    """Settings for a sequence of ``length`` tokens (see ``clustr_jax.attention.sized_for``):
    none, full attention has nothing to size (it is the budget's reference)."""
    del length, grid, cls_token, sr_ratio, budget
    return {}

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None, *,
               deterministic: bool = True) -> jax.Array:
    mask = base.check_inputs(x, mask, "DenseAttention")
    if self.implementation not in IMPLEMENTATIONS:
      raise ValueError(f"DenseAttention: unknown implementation={self.implementation!r}; valid "
                       f"choices: {', '.join(repr(i) for i in IMPLEMENTATIONS)}")
    features = x.shape[-1]
    _, head_dim = base.head_dims(features, self.qkv_features, self.num_heads, "DenseAttention")
    proj = lambda name: base.HeadProjection(  # noqa: E731
        self.num_heads, head_dim, self.use_bias, self.dtype, self.param_dtype,
        kernel_init=self.kernel_init, name=name)
    q, k, v = proj("query")(x), proj("key")(x), proj("value")(x)
    q = nn.with_logical_constraint(q, ("batch", "length", "heads", "kv"))
    if deterministic or self.dropout_rate == 0.0:
      out = attend(q, k, v, mask, implementation=self.implementation)
    elif x.shape[1] >= CHUNKED_MIN_LENGTH:
      out = chunked_dropout_attention(q, k, v, mask, self.dropout_rate, self.make_rng("dropout"))
    else:
      _, weights = masked_softmax_attention(q, k, v, mask)
      weights = base.attention_dropout(weights, self.dropout_rate, deterministic)
      out = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v)
    return base.OutputProjection(
        self.out_features or features,
        self.use_bias if self.out_bias is None else self.out_bias, self.dtype,
        self.param_dtype, kernel_init=self.kernel_init, name="out")(out)
