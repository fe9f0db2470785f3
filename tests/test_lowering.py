"""Lowering for GPU and TPU, checked on the CPU, and the kernels of each platform (docs/gpu_tpu.md).

* Every registered mechanism (forward and backward, float32 and bfloat16) and one train step of
  each model family export for 'cuda' and for 'tpu' with ``jax.export`` (one platform per export:
  JAX lowers every ``platform_dependent`` branch for every platform of a multi-platform export,
  and a Pallas TPU kernel refuses GPU lowering). The TPU modules of dense and CAST in bfloat16
  carry splash attention's Mosaic call (``tpu_custom_call``).
* ``dense.choose_implementation``'s rule, platform by platform.
* The kernels meant for other platforms that the CPU can run (the XLA path, tokamax's chunked
  path, splash attention in the Pallas interpreter, CAST's batched product) run here, forced, and
  match the CPU's kernels in values and gradients, the padding contract included.
"""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from clustr_jax import attention, models, train
from clustr_jax.attention import cast, dense

PLATFORMS = ("cuda", "tpu")
LENGTH, FEATURES, HEADS = 128, 32, 2      # 128 tokens: one splash block
SETTINGS = {
    "dense": {},
    "clustr": {"num_clusters": (4, 8)},
    "cast": {"num_clusters": 2, "cluster_size": 128},
    "sparsifiner": {"keep_rate": 0.5, "reduce_n_factor": 4, "basis_topk": 4},
}


def _export(fn, *args, platform):
  return jax.export.export(jax.jit(fn), platforms=[platform])(*args)


def test_every_registered_mechanism_has_lowering_settings():
  assert set(attention.names()) == set(SETTINGS)


@pytest.mark.parametrize("name", sorted(SETTINGS))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_mechanism_forward_and_backward_export_for_cuda_and_tpu(name, dtype):
  module = attention.get(name)(num_heads=HEADS, qkv_features=FEATURES, dtype=dtype,
                               **SETTINGS[name])
  x = jax.random.normal(jax.random.key(0), (2, LENGTH, FEATURES), dtype)
  mask = jnp.arange(LENGTH)[None, :] < jnp.array([LENGTH, 100])[:, None]
  variables = jax.eval_shape(module.init, jax.random.key(1), x, mask)

  def loss(variables, x):
    return jnp.sum(jnp.square(module.apply(variables, x, mask).astype(jnp.float32)))

  grad = jax.grad(loss, argnums=(0, 1))
  for platform in PLATFORMS:
    forward = _export(lambda v, x: module.apply(v, x, mask), variables, x, platform=platform)
    backward = _export(grad, variables, x, platform=platform)
    assert forward.platforms == backward.platforms == (platform,)
    if platform == "tpu" and name in ("dense", "cast") and dtype == jnp.bfloat16:
      assert "tpu_custom_call" in forward.mlir_module()
      assert "tpu_custom_call" in backward.mlir_module()


def _lra_batch(rng, length=24, pair=False):
  tokens = lambda: rng.integers(1, 17, (2, length)).astype(np.int32)  # noqa: E731
  batch = {"inputs1": tokens(), "inputs2": tokens()} if pair else {"inputs": tokens()}
  return batch | {"targets": np.array([0, 1], np.int32)}


FAMILIES = {
    # name: (model, batch, input keys)
    "lra_encoder": (lambda: models.get(
        "lra_encoder", vocab_size=17, num_classes=10, max_length=24, emb_dim=16, num_heads=2,
        qkv_dim=16, mlp_dim=32, num_layers=1, dropout_rate=0.1, attention_dropout_rate=0.1),
        lambda rng: _lra_batch(rng), ("inputs",)),
    "lra_dual_encoder": (lambda: models.get(
        "lra_dual_encoder", vocab_size=17, num_classes=2, max_length=24, emb_dim=16,
        num_heads=2, qkv_dim=16, mlp_dim=32, num_layers=1, dropout_rate=0.0,
        attention_dropout_rate=0.0), lambda rng: _lra_batch(rng, pair=True),
        ("inputs1", "inputs2")),
    "vit": (lambda: models.get("deit_ti", num_classes=4, img_size=32, patch_size=8,
                               embed_dim=32, depth=1, num_heads=2),
            lambda rng: {"inputs": rng.normal(size=(2, 32, 32, 3)).astype(np.float32),
                         "targets": np.array([0, 3], np.int32)}, ("inputs",)),
    "clustr_pyramid": (lambda: models.get("clustr_t", num_classes=3, embed_dims=(16, 32, 32, 64),
                                          num_heads=(1, 2, 2, 4), depths=(1, 1, 1, 1)),
                       lambda rng: {"inputs": rng.normal(size=(2, 64, 64, 3)).astype(np.float32),
                                    "targets": np.array([0, 2], np.int32)}, ("inputs",)),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_train_step_of_each_model_family_exports_for_cuda_and_tpu(family):
  make_model, make_batch, input_keys = FAMILIES[family]
  model, batch = make_model(), make_batch(np.random.default_rng(0))
  tx = optax.adamw(1e-3)
  sample = [batch[k] for k in input_keys]
  params = jax.eval_shape(lambda: nn.unbox(model.init(
      {"params": jax.random.key(0), "dropout": jax.random.key(0)}, *sample,
      train=False)["params"]))
  state = train.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                           opt_state=jax.eval_shape(tx.init, params),
                           nonfinite_steps=jnp.zeros((), jnp.int32))
  step = functools.partial(train.train_step, model=model, tx=tx,
                           schedule=optax.constant_schedule(1e-3), rng=jax.random.key(1),
                           input_keys=input_keys)
  for platform in PLATFORMS:
    exported = _export(step, state, batch, platform=platform)
    assert exported.platforms == (platform,)


@pytest.mark.parametrize("platform, dtype, head_dim, length, expected", [
    ("cuda", jnp.bfloat16, 64, 1024, "cudnn"),
    ("cuda", jnp.float16, 128, 64, "cudnn"),
    ("cuda", jnp.bfloat16, 256, 1024, "xla"),            # head too large for every cuDNN GPU
    ("cuda", jnp.bfloat16, 60, 1024, "xla"),             # not a multiple of 8
    ("cuda", jnp.float32, 64, 1024, "xla"),              # cuDNN has no float32 attention
    ("cuda", jnp.float32, 64, 8192, "xla_chunked"),
    ("tpu", jnp.float32, 64, 128, "splash"),
    ("tpu", jnp.bfloat16, 64, 197, "splash"),            # padded to 256
    ("tpu", jnp.bfloat16, 64, 127, "xla"),               # below one splash block
    ("cpu", jnp.float32, 64, 2047, "xla"),
    ("cpu", jnp.float32, 64, 2048, "xla_chunked"),
    ("cpu", jnp.bfloat16, 64, 16384, "xla_chunked"),
    ("rocm", jnp.bfloat16, 64, 1024, "xla"),
])
def test_choose_implementation(platform, dtype, head_dim, length, expected):
  assert dense.choose_implementation(platform, dtype, head_dim, length) == expected


def test_unknown_or_unavailable_implementation_is_an_error():
  x = jnp.zeros((1, 8, 8))
  with pytest.raises(ValueError, match="implementation='flash'; valid choices: 'auto'"):
    dense.DenseAttention(2, implementation="flash").init(jax.random.key(0), x)
  q = jnp.zeros((1, 8, 2, 4), jnp.bfloat16)
  with pytest.raises(ValueError, match="needs a CUDA GPU"):
    dense.attend(q, q, q, jnp.ones((1, 8), bool), implementation="cudnn")


def test_cuda_export_without_cudnn_carries_the_xla_path():
  """A program traced where cuDNN is absent exports for CUDA with the XLA path (the GPU suite
  checks the cuDNN call on the GPU itself, tests/test_gpu_kernels.py)."""
  q = jnp.zeros((1, 256, 2, 64), jnp.bfloat16)
  exported = _export(lambda q: dense.attend(q, q, q, jnp.ones((1, 256), bool)), q,
                     platform="cuda")
  assert "__cudnn$fmha" not in exported.mlir_module()


def _qkv(dtype, batch=2, length=200, heads=2, head_dim=16):
  keys = jax.random.split(jax.random.key(0), 3)
  return tuple(jax.random.normal(k, (batch, length, heads, head_dim), dtype) for k in keys)


@pytest.mark.parametrize("implementation", ["auto", "xla_chunked", "splash"])
def test_dense_kernels_match_the_xla_path_on_values_and_gradients(implementation):
  q, k, v = _qkv(jnp.float32)
  mask = jnp.arange(200)[None, :] < jnp.array([200, 77])[:, None]
  garbage = 50.0 * jax.random.normal(jax.random.key(9), k.shape)

  def run(impl, k=k, v=v):
    fn = lambda q, k, v: dense.attend(q, k, v, mask, implementation=impl)  # noqa: E731
    loss = lambda q, k, v: jnp.sum(jnp.where(mask[..., None, None], fn(q, k, v), 0) ** 2)  # noqa: E731
    return jax.jit(fn)(q, k, v), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

  (ref, ref_grads), (out, grads) = run("xla"), run(implementation)
  real = np.asarray(mask)
  np.testing.assert_allclose(np.asarray(out)[real], np.asarray(ref)[real], atol=2e-6)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(g, r, atol=2e-5)
  # Padding contract: whatever the padded keys and values hold, real tokens' outputs stay.
  k2, v2 = (jnp.where(mask[..., None, None], t, garbage) for t in (k, v))
  out2, _ = run(implementation, k2, v2)
  np.testing.assert_allclose(np.asarray(out2)[real], np.asarray(out)[real], atol=2e-6)
  chex.assert_tree_all_finite(out2)


def test_dense_bfloat16_splash_matches_xla():
  q, k, v = _qkv(jnp.bfloat16, length=128)
  mask = jnp.arange(128)[None, :] < jnp.array([128, 50])[:, None]
  ref = dense.attend(q, k, v, mask, implementation="xla").astype(jnp.float32)
  out = jax.jit(lambda *a: dense.attend(*a, mask, implementation="splash"))(q, k, v)
  real = np.asarray(mask)
  np.testing.assert_allclose(np.asarray(out.astype(jnp.float32))[real], np.asarray(ref)[real],
                             atol=3e-2)


def test_auto_takes_the_chunked_path_for_long_sequences_on_the_cpu():
  """Compiled temporaries of forward+backward at 2,048 keys: below one [N, N] float32 buffer on
  the chunked path (they stay about constant in N), several of them on the XLA path."""
  q = jnp.zeros((1, dense.CHUNKED_MIN_LENGTH, 1, 8))
  mask = jnp.ones(q.shape[:2], bool)
  temps = {impl: jax.jit(jax.grad(lambda q: jnp.sum(dense.attend(
      q, q, q, mask, implementation=impl)))).lower(q).compile().memory_analysis().temp_size_in_bytes
           for impl in ("auto", "xla")}
  square = 4 * dense.CHUNKED_MIN_LENGTH ** 2
  assert temps["auto"] < square < temps["xla"] and temps["xla"] > 4 * temps["auto"]


@pytest.fixture
def intra_implementation(monkeypatch):
  return lambda value: monkeypatch.setattr(cast, "INTRA_IMPLEMENTATION", value)


@pytest.mark.parametrize("implementation", ["batched", "splash"])
def test_cast_accelerator_kernels_match_the_cpu_chunked_path(implementation,
                                                              intra_implementation):
  """CAST proper with the intra-cluster kernel of GPU/TPU forced on the CPU, against the CPU's
  chunked kernel: outputs of real tokens and gradients of everything (pads in the sequence, and
  clusters with empty slots, so that each kernel's handling of masked slots is exercised)."""
  q, k, v = _qkv(jnp.float32, batch=1, length=192)
  s = 0.02 * jax.random.normal(jax.random.key(3), (2, 3, 16))
  mask = jnp.arange(192)[None, :] < 100          # 100 real tokens: 28 empty slots per cluster

  def run(impl):
    intra_implementation(impl)
    fn = lambda q, k, v, s: cast.cast_attention(q, k, v, s, mask, cluster_size=128)[0]  # noqa: E731
    loss = lambda *a: jnp.sum(jnp.square(fn(*a)))  # noqa: E731
    return jax.jit(fn)(q, k, v, s), jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, s)

  (ref, ref_grads), (out, grads) = run("chunked"), run(implementation)
  np.testing.assert_allclose(out[:, :100], ref[:, :100], atol=2e-6)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(g, r, atol=2e-5)


def test_unknown_cast_intra_implementation_is_an_error(intra_implementation):
  intra_implementation("flash")
  x = jnp.zeros((1, 1, 1, 4, 8))
  with pytest.raises(ValueError, match="INTRA_IMPLEMENTATION='flash'"):
    cast.intra_cluster_attention(x, x, x, jnp.ones((1, 1, 1, 4), bool), 1.0)


def test_long_sequence_dropout_path_is_bounded_and_exact_without_drops(monkeypatch):
  """Training with attention dropout from CHUNKED_MIN_LENGTH tokens: the chunked path equals the
  XLA path when nothing is dropped, drops when asked, and its compiled temporaries grow with N,
  not N^2 (thresholds scaled down here: 128-query steps from 512 tokens)."""
  q, k, v = _qkv(jnp.float32, batch=1, length=1000, heads=2, head_dim=8)
  mask = jnp.arange(1000)[None, :] < 900
  rng = jax.random.key(4)
  run = lambda rate: dense.chunked_dropout_attention(q, k, v, mask, rate, rng, chunk=256)  # noqa: E731
  np.testing.assert_allclose(run(0.0)[:, :900], dense.attend(
      q, k, v, mask, implementation="xla")[:, :900], atol=2e-6)
  dropped = run(0.5)
  chex.assert_tree_all_finite(dropped)
  assert not np.allclose(dropped, run(0.0), atol=1e-3)

  def temps(length):
    x = jnp.zeros((1, length, 8))
    module = dense.DenseAttention(1, dropout_rate=0.1)
    variables = module.init(jax.random.key(0), x)
    loss = lambda v: jnp.sum(module.apply(  # noqa: E731
        v, x, deterministic=False, rngs={"dropout": jax.random.key(1)}))
    return jax.jit(jax.grad(loss)).lower(variables).compile().memory_analysis().temp_size_in_bytes

  monkeypatch.setattr(dense, "CHUNKED_MIN_LENGTH", 512)
  monkeypatch.setattr(dense, "DROPOUT_CHUNK_QUERIES", 128)
  chunked = temps(512), temps(1024)
  monkeypatch.setattr(dense, "CHUNKED_MIN_LENGTH", 10**9)
  assert chunked[1] < 2.2 * chunked[0] and 2 * chunked[0] < temps(512)
