"""On a GPU: the kernels dense attention and CAST pick there, against the XLA path
(docs/gpu_tpu.md).

Every test here needs a CUDA GPU (``@pytest.mark.gpu``; skipped elsewhere). The GPU suite
(``experiments/gpu/suite.py``) runs them first.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clustr_jax.attention import cast, dense

pytestmark = pytest.mark.gpu


def _compiled_text(fn, *args):
  return jax.jit(fn).lower(*args).compile().as_text()


def _qkv(dtype, batch=2, length=512, heads=4, head_dim=64):
  keys = jax.random.split(jax.random.key(0), 3)
  return tuple(jax.random.normal(k, (batch, length, heads, head_dim), dtype) for k in keys)


def _close(a, b, atol):
  np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=atol)


def _close_relative(a, b, fraction=0.05):
  """|a - b| within ``fraction`` of b's largest magnitude (bfloat16 gradients)."""
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  assert np.abs(a - b).max() <= fraction * np.abs(b).max(), (np.abs(a - b).max(), np.abs(b).max())


def test_dense_auto_runs_cudnn_and_equals_the_xla_path():
  q, k, v = _qkv(jnp.bfloat16)
  mask = jnp.arange(512)[None, :] < jnp.array([512, 300])[:, None]
  real = np.asarray(mask)

  def run(impl):
    fn = lambda q, k, v: dense.attend(q, k, v, mask, implementation=impl)  # noqa: E731
    loss = lambda *a: jnp.sum(jnp.where(mask[..., None, None], fn(*a), 0).astype(  # noqa: E731
        jnp.float32) ** 2)
    return fn, jax.jit(fn)(q, k, v), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

  auto, out, grads = run("auto")
  _, ref, ref_grads = run("xla")
  assert "__cudnn$fmha" in _compiled_text(auto, q, k, v)
  _close(np.asarray(out.astype(jnp.float32))[real], np.asarray(ref.astype(jnp.float32))[real],
         3e-2)
  for g, r in zip(grads, ref_grads):
    _close_relative(g, r)
  # Float32 has no cuDNN kernel: the XLA path.
  q32 = q.astype(jnp.float32)
  assert "__cudnn$fmha" not in _compiled_text(lambda q: dense.attend(q, q, q, mask), q32)


def test_dense_cudnn_keeps_the_padding_contract():
  """Garbage in padded keys (not at the end of the sequence) changes no real token's output."""
  q, k, v = _qkv(jnp.bfloat16, length=256)
  mask = (jnp.arange(256)[None, :] % 3 != 1) & (jnp.arange(256)[None, :] < jnp.array([256, 200])
                                                [:, None])
  garbage = (100.0 * jax.random.normal(jax.random.key(5), k.shape)).astype(jnp.bfloat16)
  fn = jax.jit(lambda q, k, v: dense.attend(q, k, v, mask, implementation="cudnn"))
  k2, v2 = (jnp.where(mask[..., None, None], t, garbage) for t in (k, v))
  real = np.asarray(mask)
  a, b = np.asarray(fn(q, k, v).astype(jnp.float32)), np.asarray(fn(q, k2, v2).astype(jnp.float32))
  np.testing.assert_allclose(a[real], b[real], atol=1e-2)
  ref = dense.attend(q, k, v, mask, implementation="xla").astype(jnp.float32)
  np.testing.assert_allclose(a[real], np.asarray(ref)[real], atol=3e-2)


def test_cast_fused_intra_attention_equals_its_batched_product(monkeypatch):
  q, k, v = _qkv(jnp.bfloat16, batch=1, length=1024, heads=2)
  s = (0.02 * jax.random.normal(jax.random.key(3), (2, 8, 64))).astype(jnp.bfloat16)
  mask = jnp.arange(1024)[None, :] < 900

  def run(impl):
    monkeypatch.setattr(cast, "INTRA_IMPLEMENTATION", impl)
    fn = lambda q, k, v, s: cast.cast_attention(q, k, v, s, mask, cluster_size=128)[0]  # noqa: E731
    loss = lambda *a: jnp.sum(fn(*a).astype(jnp.float32) ** 2)  # noqa: E731
    return (_compiled_text(fn, q, k, v, s), jax.jit(fn)(q, k, v, s),
            jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, s))

  text, out, grads = run("auto")
  _, ref, ref_grads = run("batched")
  assert "__cudnn$fmha" in text
  _close(out[:, :900], ref[:, :900], 3e-2)
  for g, r in zip(grads, ref_grads):
    _close_relative(g, r)
