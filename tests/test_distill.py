"""Sparsifiner distillation pieces: losses against numpy, optax freezing, model EMA, checkpoint
loading and merging, and the recon objective on a small Sparsifiner ViT."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from clustr_jax import distill, losses, models, sharding
from configs import default


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_kl_and_token_mse_match_numpy():
  rng = np.random.default_rng(0)
  student, teacher = rng.normal(size=(2, 4, 10)).astype(np.float32)
  for temperature in (1.0, 2.0):
    log_s, log_t = _log_softmax(student / temperature), _log_softmax(teacher / temperature)
    expected = (np.exp(log_t) * (log_t - log_s)).sum() / 4 * temperature ** 2
    np.testing.assert_allclose(losses.kl_teacher_student(student, teacher, temperature),
                               expected, rtol=1e-5)
  assert float(losses.kl_teacher_student(student, student)) == pytest.approx(0.0, abs=1e-6)
  a, b = rng.normal(size=(2, 3, 5, 7))
  np.testing.assert_allclose(losses.token_mse(a, b), ((a - b) ** 2).mean(), rtol=1e-5)


def test_recon_loss_sums_per_layer_and_averages_layers():
  rng = np.random.default_rng(1)
  inter = {}
  expected = []
  for i in range(3):
    approx = rng.random((2, 3, 4, 5)).astype(np.float32)        # [B, H, N - 1, N]
    dense = rng.random((2, 3, 5, 5)).astype(np.float32)         # [B, H, N, N]
    inter[f"blocks_{i}"] = {"attn": {"approx_attn": (approx,), "unmasked_attn": (dense,)}}
    expected.append(((approx - dense[:, :, 1:, :]) ** 2).sum())
  np.testing.assert_allclose(losses.recon_loss(inter), np.mean(expected), rtol=1e-5)
  with pytest.raises(ValueError, match="recon_mode=True"):
    losses.recon_loss({"blocks_0": {"attn": {"approx_attn": (np.zeros((1, 1, 1, 2)),)}}})


def _params():
  return {"blocks_0": {"attn": {"query": {"kernel": jnp.ones((4, 2)), "bias": jnp.ones((2,))},
                                "mask_predictor": {"proj_n": jnp.ones((5, 3)),
                                                   "proj_c_q": {"bias": jnp.ones((3,))}}}},
          "head": {"kernel": jnp.ones((2, 3))}}


def test_freeze_leaves_frozen_parameters_bit_identical():
  params = _params()
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
  for trainable, predictor_moves in (("predictor", True), ("backbone", False)):
    tx = distill.freeze(optax.adamw(0.1, weight_decay=0.05), trainable)
    state = tx.init(params)
    updates, state = tx.update(grads, state, params)
    new = optax.apply_updates(params, updates)
    for path, (old, value) in zip(
        jax.tree_util.tree_flatten_with_path(params)[0],
        zip(jax.tree.leaves(params), jax.tree.leaves(new))):
      is_predictor = "mask_predictor" in jax.tree_util.keystr(path[0])
      moved = not np.array_equal(np.asarray(old), np.asarray(value))
      assert moved == (is_predictor == predictor_moves), (trainable, path)
  assert distill.freeze(optax.sgd(0.1), "all") is not None
  with pytest.raises(ValueError, match="config.distill.trainable"):
    distill.freeze(optax.sgd(0.1), "encoder")


def test_model_ema_tracks_the_average_inside_multisteps():
  params = {"w": jnp.zeros((3,))}
  tx = optax.MultiSteps(optax.chain(optax.sgd(1.0), distill.model_ema(0.5)), 2)
  state = tx.init(params)
  assert distill.ema_params(tx.init(params)) is not None
  values = []
  for _ in range(4):
    updates, state = tx.update({"w": -jnp.ones((3,))}, state, params)
    params = optax.apply_updates(params, updates)
    values.append(float(params["w"][0]))
  assert values == [0.0, 1.0, 1.0, 2.0]  # An update every second micro-step.
  # ema: 0 -> 0.5 * 0 + 0.5 * 1 = 0.5 -> 0.5 * 0.5 + 0.5 * 2 = 1.25.
  np.testing.assert_allclose(distill.ema_params(state)["w"], 1.25)
  assert distill.ema_params(optax.sgd(1.0).init(params)) is None
  with pytest.raises(ValueError, match="ema_decay"):
    distill.model_ema(1.0)


def test_merge_params_reports_every_mismatch():
  target = _params()
  source = {"blocks_0": {"attn": {"query": {"kernel": np.full((4, 2), 3.0),
                                            "bias": np.zeros((3,))}}},
            "head": {"kernel": np.full((2, 3), 2.0)}, "extra": {"w": np.zeros(1)}}
  with pytest.raises(ValueError) as e:
    distill.merge_params(target, source, allow_missing="mask_predictor")
  message = str(e.value)
  assert "unexpected ['extra/w']" in message
  assert "blocks_0/attn/query/bias: checkpoint (3,) vs model (2,)" in message
  del source["extra"]
  source["blocks_0"]["attn"]["query"]["bias"] = np.zeros((2,))
  with pytest.raises(ValueError, match="missing .*mask_predictor/proj_n"):
    distill.merge_params(target, source)
  merged = distill.merge_params(target, source, allow_missing="mask_predictor")
  assert float(merged["head"]["kernel"][0, 0]) == 2.0
  assert float(merged["blocks_0"]["attn"]["mask_predictor"]["proj_n"][0, 0]) == 1.0
  # An abstract target (the teacher's eval_shape), under a mesh as in the train loop.
  abstract = jax.eval_shape(lambda: {"head": {"kernel": nn.Partitioned(
      jnp.ones((2, 3)), ("embed", "classes"))}})
  with jax.set_mesh(jax.make_mesh((1,), ("data",))), nn.logical_axis_rules(
      sharding.LOGICAL_AXIS_RULES):
    loaded = distill.merge_params(abstract, {"head": {"kernel": np.full((2, 3), 4.0)}})
  assert loaded["head"]["kernel"].dtype == np.float32 and loaded["head"]["kernel"][1, 2] == 4.0


def test_load_params_from_run_and_params_checkpoints(tmp_path):
  params = jax.tree.map(np.asarray, _params())
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "run" / "7" / "state", {"step": np.int32(7), "params": params})
  checkpointer.save(tmp_path / "plain", params)
  checkpointer.wait_until_finished()
  for path in (tmp_path / "run", tmp_path / "run" / "7", tmp_path / "plain"):
    loaded = distill.load_params(path)
    np.testing.assert_array_equal(loaded["head"]["kernel"], params["head"]["kernel"])
  with pytest.raises(FileNotFoundError, match="nowhere"):
    distill.load_params(tmp_path / "nowhere")


def _tiny_sparsifiner():
  return models.get("deit_ti", num_classes=4, img_size=64, depth=1, embed_dim=48, num_heads=3,
                    attention="sparsifiner",
                    attention_kwargs={"keep_rate": 0.25, "reduce_n_factor": 2})


def test_recon_objective_trains_only_the_predictor():
  model = _tiny_sparsifiner()
  images = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))
  params = model.init({"params": jax.random.key(1)}, images, train=False)["params"]
  d = default.distill_config("recon")
  weights = ("recon_weight", "ce_weight", "kl_weight", "token_weight", "temperature",
             "token_module", "num_prefix_tokens")
  objective = distill.Objective(model=model, stage="recon", input_keys=("images",),
                                **{k: d[k] for k in weights})
  batch = {"images": images, "targets": jnp.array([0, 1])}
  rngs = {"dropout": jax.random.key(2), "clustering": jax.random.key(3)}
  (loss, (logits, metrics)), grads = jax.value_and_grad(objective, has_aux=True)(
      params, batch, rngs)
  assert logits.shape == (2, 4)
  np.testing.assert_allclose(loss, 0.01 * metrics["recon_loss"], rtol=1e-6)
  assert float(metrics["recon_loss"]) > 0
  norms = {jax.tree_util.keystr(p): float(jnp.abs(g).sum())
           for p, g in jax.tree_util.tree_flatten_with_path(grads)[0]}
  predictor = [k for k in norms if "mask_predictor" in k]
  assert predictor and any(norms[k] > 0 for k in predictor)
  # The predictor reads q and k, so backbone q/k projections get gradients too (the optimizer
  # mask freezes them); with ce_weight 0 the classifier head gets none.
  assert all(norms[k] == 0 for k in norms if k.startswith("['head']"))


def test_setup_errors_name_the_key():
  model = _tiny_sparsifiner()

  class Data:
    input_keys = ("images",)
    example_spec = {"images": ((64, 64, 3), np.float32)}
    model_kwargs = {"num_classes": 4}

  config = ml_collections.ConfigDict({"distill": default.distill_config("distill")})
  config.distill.stage = "joint"
  with pytest.raises(ValueError, match="config.distill.stage='joint'"):
    distill.setup(config, model, Data())
  config.distill.stage = "distill"
  with pytest.raises(ValueError, match="config.distill.teacher"):
    distill.setup(config, model, Data())


def test_token_mse_over_kept_tokens_by_hand():
  """Official losses.py: token_s[token_mask] then F.mse_loss, i.e. the kept rows only."""
  student = np.zeros((2, 3, 2), np.float32)
  teacher = np.zeros((2, 3, 2), np.float32)
  student[0, 0] = [1.0, 3.0]      # kept: squared errors 1, 9
  student[0, 1] = [100.0, 100.0]  # pruned: ignored
  student[1, 2] = [2.0, 0.0]      # kept: squared errors 4, 0
  keep = np.array([[True, False, True], [False, False, True]])
  # 3 kept tokens x 2 features; the errors 1 + 9 + 0 + 0 + 4 + 0 = 14.
  assert float(losses.token_mse(student, teacher, keep)) == pytest.approx(14 / 6)
  assert float(losses.token_mse(student, teacher)) == pytest.approx((14 + 2e4) / 12)
  with pytest.raises(ValueError, match=r"keep must be \[batch, tokens\]"):
    losses.token_mse(student, teacher, keep[:, :2])
  with pytest.raises(ValueError, match="differ"):
    losses.token_mse(student, teacher[:, :2])


def test_distill_objective_restricts_token_mse_to_kept_tokens():
  """A token-pruning student: the objective's token MSE is the kept-token MSE of its tokens."""
  student = models.get("sparsifiner_deit_s", num_classes=4, img_size=32, patch_size=8, depth=2,
                       embed_dim=32, num_heads=2, attention_kwargs={"basis_topk": 2},
                       layer_attention_kwargs=({"token_keep_rate": 0.5}, {}))
  teacher = models.get("deit_ti", num_classes=4, img_size=32, patch_size=8, depth=1,
                       embed_dim=32, num_heads=2)
  images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  params = student.init(jax.random.key(1), images)["params"]
  teacher_params = teacher.init(jax.random.key(2), images)["params"]
  d = default.distill_config("distill")
  weights = ("recon_weight", "ce_weight", "kl_weight", "token_weight", "temperature",
             "token_module", "num_prefix_tokens")
  objective = distill.Objective(model=student, stage="distill", input_keys=("images",),
                                teacher_model=teacher, **{k: d[k] for k in weights})
  _, (_, metrics) = objective(params, {"images": images, "targets": jnp.array([0, 1])},
                              {"dropout": jax.random.key(3)}, teacher_params)
  _, state = student.apply({"params": params}, images, mutable=["intermediates"])
  _, t_state = teacher.apply({"params": teacher_params}, images, mutable=["intermediates"])
  keep = np.asarray(state["intermediates"]["token_keep_mask"][0])[:, 1:]
  assert keep.sum(-1).tolist() == [8, 8]                      # ceil(0.5 * 16) patches kept
  # The final norm's output (the 'features' sown by the model) of the kept patches only.
  s = np.asarray(state["intermediates"]["features"][0])
  t = np.asarray(t_state["intermediates"]["features"][0])
  want = ((s - t) ** 2)[keep].mean()
  np.testing.assert_allclose(metrics["token_mse"], want, rtol=1e-5)
  assert abs(want - ((s - t) ** 2).mean()) > 1e-3             # the restriction matters
