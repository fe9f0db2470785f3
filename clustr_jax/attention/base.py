"""Pieces shared by every attention mechanism: the contract's checks and the projections.

The attention contract (``docs/adding_a_mechanism.md``, "The contract"): every mechanism is a Linen
module called as ``module(x, mask=None, *, deterministic=True)`` with

  x:    float array [batch, length, features]
  mask: bool array [batch, length], True = real token, False = padding (None = all real)

returning [batch, length, out_features]. A padded token never changes the output of a real token.
Each module owns its projections (the methods differ in where they act), built from the
``HeadProjection`` / ``OutputProjection`` modules below so that every kernel carries logical axis
names ('embed', 'heads', 'kv') for the sharding rules in ``clustr_jax/sharding.py``.

Initialisation: a mechanism with a ``kernel_init`` field (an initializer, or None) passes it to
its projections. None keeps the default, xavier-uniform with each projection's own fans (LRA's
attention init, ``docs/lra.md``); the vision models pass timm's / ClusTR's trunc-normal(0.02)
(``docs/vision.md``, "Initialisation"). Biases are zero either way.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Dtype = Any
Initializer = Callable[..., Array]

#: Logit value used for masked-out keys. Large and negative but finite, so that a fully masked
#: row gives a uniform (not NaN) softmax; such rows only occur for padded queries.
MASK_VALUE = -1e10

#: LRA's attention kernels are xavier-uniform (``lra_benchmarks/models/layers/common_layers.py``).
default_kernel_init = nn.initializers.xavier_uniform


def trunc_normal_02(key: Array, shape: tuple[int, ...], dtype: Dtype = jnp.float32) -> Array:
  """timm's ``trunc_normal_(std=.02)`` (the official ViT/DeiT, ClusTR and Sparsifiner inits): a
  normal with std 0.02 cut at its absolute bounds a = -2, b = 2, i.e. at +-100 standard
  deviations. Drawn as a normal clipped to [-2, 2], the same distribution; JAX's inverse-CDF
  ``truncated_normal`` with bounds at +-100 std maps about 1 draw in 10^7 onto a bound (its
  float32 uniform reaches erf(100 / sqrt 2) = 1), which a test of the initial statistics sees."""
  return jnp.clip(0.02 * jax.random.normal(key, shape, dtype), -2.0, 2.0).astype(dtype)


def check_inputs(x: Array, mask: Array | None, name: str) -> Array:
  """Validates ``x`` and ``mask`` against the attention contract.

  Args:
    x: [batch, length, features], floating dtype.
    mask: bool [batch, length] (True = real token) or None.
    name: the calling module's name, for the error message.

  Returns:
    The mask as a bool array [batch, length] (all True when ``mask`` is None).

  Raises:
    ValueError: ``x`` is not rank 3, or ``mask`` does not have shape [batch, length].
  """
  if x.ndim != 3:
    raise ValueError(
        f"{name}: x must be [batch, length, features]; got shape {tuple(x.shape)}")
  if mask is None:
    return jnp.ones(x.shape[:2], dtype=bool)
  if tuple(mask.shape) != tuple(x.shape[:2]):
    raise ValueError(
        f"{name}: mask must be [batch, length] = {tuple(x.shape[:2])} to match x; "
        f"got shape {tuple(mask.shape)}")
  return mask.astype(bool)


def head_dims(features: int, qkv_features: int | None, num_heads: int,
              name: str) -> tuple[int, int]:
  """Returns (qkv_features, head_dim), checking that the heads divide the width.

  Raises:
    ValueError: num_heads < 1 or qkv_features not divisible by num_heads.
  """
  qkv = features if qkv_features is None else qkv_features
  if num_heads < 1:
    raise ValueError(f"{name}: num_heads must be >= 1; got {num_heads}")
  if qkv % num_heads:
    raise ValueError(
        f"{name}: qkv_features={qkv} must be divisible by num_heads={num_heads}")
  return qkv, qkv // num_heads


class HeadProjection(nn.Module):
  """Linear map from features to heads: [..., features] -> [..., heads, head_dim].

  The kernel is [features, heads, head_dim] with logical axes ('embed', 'heads', 'kv'), declared
  with ``self.param`` (a multi-dimensional ``nn.DenseGeneral`` kernel with logical partitioning
  fails under a global mesh, flax issue 3676). Fan-in is ``features`` and fan-out
  ``heads * head_dim``, so xavier-uniform equals that of the flat [features, heads*head_dim]
  matrix of the original (PyTorch / old-Flax) implementations.
  """
  num_heads: int
  head_dim: int
  use_bias: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Initializer | None = None   # None: xavier-uniform over the flat matrix.
  bias_init: Initializer = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x: Array) -> Array:
    init = self.kernel_init or default_kernel_init(in_axis=0, out_axis=(1, 2))
    kernel = self.param(
        "kernel", nn.with_logical_partitioning(init, ("embed", "heads", "kv")),
        (x.shape[-1], self.num_heads, self.head_dim), self.param_dtype)
    x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    y = jnp.einsum("...f,fhd->...hd", x, kernel)
    if self.use_bias:
      bias = self.param(
          "bias", nn.with_logical_partitioning(self.bias_init, ("heads", "kv")),
          (self.num_heads, self.head_dim), self.param_dtype)
      y = y + bias.astype(y.dtype)
    return y


class OutputProjection(nn.Module):
  """Linear map from heads back to features: [..., heads, head_dim] -> [..., features].

  Kernel [heads, head_dim, features], logical axes ('heads', 'kv', 'embed').
  """
  features: int
  use_bias: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Initializer | None = None   # None: xavier-uniform over the flat matrix.
  bias_init: Initializer = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x: Array) -> Array:
    init = self.kernel_init or default_kernel_init(in_axis=(0, 1), out_axis=2)
    kernel = self.param(
        "kernel", nn.with_logical_partitioning(init, ("heads", "kv", "embed")),
        (x.shape[-2], x.shape[-1], self.features), self.param_dtype)
    x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    y = jnp.einsum("...hd,hdf->...f", x, kernel)
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(self.bias_init, ("embed",)),
                        (self.features,), self.param_dtype)
      y = y + bias.astype(y.dtype)
    return y


def attention_dropout(weights: Array, rate: float, deterministic: bool) -> Array:
  """Dropout on attention weights (not broadcast, as in LRA), rng stream 'dropout'.

  Call from inside a compact ``__call__``: the Dropout submodule binds to the caller.
  """
  if deterministic or rate == 0.0:
    return weights
  return nn.Dropout(rate=rate, deterministic=False)(weights)


# Row reductions written as dot_generals. XLA:CPU (jaxlib 0.10) fuses `sum(a * b, axis=-1)` into
# a YNNPACK fusion that ran about 40x slower than the same contraction as a dot_general
# (measured: [8, 64, 128, 64] operands, 42 ms against 1.1 ms on 2 cores). Autodiff writes exactly
# that pattern in the backward pass of a softmax and of a per-row scaling, so the two functions
# below carry their own backward pass built from ``row_dot``. Values and gradients are those of
# the plain expressions (to float rounding).

def row_dot(a: Array, b: Array) -> Array:
  """sum(a * b, axis=-1) as a dot_general: a, b [..., d] -> [...] (the operands' dtype)."""
  return jnp.einsum("...d,...d->...", a, b)


@jax.custom_vjp
def softmax(logits: Array) -> Array:
  """``jax.nn.softmax(logits, axis=-1)`` whose backward pass reduces rows with ``row_dot``.

  Args: logits [..., n] float. Returns: [..., n] in logits' dtype.
  """
  return jax.nn.softmax(logits, axis=-1)


def _softmax_fwd(logits):
  y = jax.nn.softmax(logits, axis=-1)
  return y, y


def _softmax_bwd(y, g):
  return (y * (g - row_dot(g, y)[..., None]),)


softmax.defvjp(_softmax_fwd, _softmax_bwd)


@jax.custom_vjp
def scale_rows(w: Array, x: Array) -> Array:
  """w[..., None] * x whose backward pass reduces rows with ``row_dot``.

  Args: w [...], x [..., d] of one dtype. Returns: [..., d].
  """
  return w[..., None] * x


def _scale_rows_fwd(w, x):
  return w[..., None] * x, (w, x)


def _scale_rows_bwd(residuals, g):
  w, x = residuals
  return row_dot(g, x), w[..., None] * g


scale_rows.defvjp(_scale_rows_fwd, _scale_rows_bwd)
