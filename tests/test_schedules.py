"""Schedules as the official code computes them: LRA's cosine over the total steps, Sparsifiner's
warm-up then cosine (``utils.cosine_scheduler``), defined for every step, errors naming config
keys (``clustr_jax/optim.py``)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from clustr_jax import optim
from configs import common, default


def _lra_cosine(step, base, warmup, cycle):
  """LRA ``train_utils.create_learning_rate_scheduler`` with 'constant*linear_warmup*cosine_decay',
  transcribed in Python floats."""
  ret = base * min(1.0, step / warmup)
  progress = max(0.0, (step - warmup) / float(cycle))
  return ret * max(0.0, 0.5 * (1.0 + math.cos(math.pi * (progress % 1.0))))


def _sparsifiner_cosine(base, final, total, warmup, start=0.0):
  """Sparsifiner ``utils.cosine_scheduler`` for iterations (niter_per_ep=1), as an array."""
  warm = np.linspace(start, base, warmup) if warmup > 0 else np.array([])
  iters = np.arange(total - warmup)
  cos = [final + 0.5 * (base - final) * (1 + math.cos(math.pi * i / len(iters))) for i in iters]
  return np.concatenate([warm, np.asarray(cos)])


def _config(**kwargs):
  config = default.get_config()
  config.update(kwargs)
  return config


def test_lra_cosine_cycle_is_the_total_step_count():
  config = _config(learning_rate=1e-3, warmup_steps=312, num_train_steps=62_400,
                   schedule="constant*linear_warmup*cosine_decay")
  _, schedule = optim.create_optimizer(config)
  for step in (0, 100, 312, 1_000, 31_356, 62_399):
    np.testing.assert_allclose(float(schedule(step)), _lra_cosine(step, 1e-3, 312, 62_400),
                               rtol=1e-5, atol=1e-12)
  # The cycle is not num_train_steps - warmup_steps: at the end the cosine has not reached 0.
  assert float(schedule(62_399)) > 1e-9


def test_steps_per_cycle_overrides_the_total():
  config = _config(learning_rate=1.0, warmup_steps=10, num_train_steps=100, steps_per_cycle=50,
                   schedule="constant*linear_warmup*cosine_decay")
  _, schedule = optim.create_optimizer(config)
  np.testing.assert_allclose(float(schedule(35)), _lra_cosine(35, 1.0, 10, 50), rtol=1e-6)


@pytest.mark.parametrize("schedule_name", [
    "constant*linear_warmup*cosine_decay", "constant*linear_warmup*rsqrt_decay", "timm_cosine",
    "warmup_cosine"])
def test_a_run_shorter_than_its_warmup_has_a_schedule(schedule_name):
  config = _config(learning_rate=1e-3, warmup_steps=100, num_train_steps=2,
                   schedule=schedule_name)
  _, schedule = optim.create_optimizer(config)
  values = [float(schedule(step)) for step in range(4)]
  assert all(np.isfinite(values)) and values[1] > values[0] >= 0.0


def test_sparsifiner_schedule_matches_the_official_array():
  total, warmup = 50, 7
  expected = _sparsifiner_cosine(8e-5, 2e-6, total, warmup)
  schedule = optim.warmup_cosine_schedule(8e-5, warmup, total, min_lr=2e-6)
  got = np.asarray([float(schedule(step)) for step in range(total)])
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-12)
  # Past the end it holds the cosine's end; with no warm-up it starts at the peak.
  np.testing.assert_allclose(float(schedule(total + 10)), 2e-6, rtol=1e-5)
  no_warmup = optim.warmup_cosine_schedule(1.0, 0, 10)
  np.testing.assert_allclose([float(no_warmup(s)) for s in range(10)],
                             _sparsifiner_cosine(1.0, 0.0, 10, 0), rtol=1e-5, atol=1e-7)


def test_sparsifiner_recipe_uses_the_official_schedule():
  config = common.load("configs/imagenet/sparsifiner.py:stage=distill")
  assert config.schedule == "warmup_cosine" and config.warmup_init_lr == 0.0
  _, schedule = optim.create_optimizer(config)
  steps_per_epoch = config.warmup_steps // 3
  expected = _sparsifiner_cosine(8e-5, 2e-6, config.num_train_steps, config.warmup_steps)
  for step in (0, steps_per_epoch, config.warmup_steps - 1, config.warmup_steps,
               config.num_train_steps // 2, config.num_train_steps - 1):
    np.testing.assert_allclose(float(schedule(step)), expected[step], rtol=1e-4, atol=1e-12)


@pytest.mark.parametrize("kwargs, keys", [
    (dict(schedule="constant*linear_warmup*cosine_decay", steps_per_cycle=0),
     "config.steps_per_cycle"),
    (dict(schedule="constant*linear_warmup*cosine_decay", num_train_steps=0),
     "config.num_train_steps"),
    (dict(schedule="constant*linear_warmup*rsqrt_decay", warmup_steps=0), "config.warmup_steps"),
    (dict(schedule="constant*bogus"), "config.schedule"),
    (dict(schedule="timm_cosine", num_train_steps=10, cooldown_steps=10),
     "config.num_train_steps - config.cooldown_steps"),
    (dict(schedule="warmup_cosine", num_train_steps=0), "config.num_train_steps"),
])
def test_schedule_errors_name_the_config_keys(kwargs, keys):
  with pytest.raises(ValueError, match=keys.replace(".", r"\.")):
    optim.create_optimizer(_config(**kwargs))
