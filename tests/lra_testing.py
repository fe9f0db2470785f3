"""Shared by the LRA task tests: a task config shrunk to run two training steps on test data."""

import json
import pathlib

from clustr_jax import train
from configs import common as config_common

REPO = pathlib.Path(__file__).resolve().parent.parent
DATA = REPO / "tests" / "data"


def run_two_steps(spec: str, data_dir: pathlib.Path, workdir: pathlib.Path, **dataset) -> dict:
  """Loads ``configs/lra/<spec>``, shrinks the model and batch, trains 2 steps; results.json."""
  config = config_common.load(f"{REPO}/configs/lra/{spec}")
  config.dataset.data_dir = str(data_dir)
  config.dataset.update(dataset)
  config.model.update(emb_dim=16, num_heads=2, qkv_dim=16, mlp_dim=16, num_layers=1)
  config.batch_size = config.eval_batch_size = 8
  config.num_train_steps = 2
  config.warmup_steps = 1
  config.log_every_steps = config.eval_every_steps = config.checkpoint_every_steps = 1
  results = train.train_and_evaluate(config, workdir)
  assert results == json.loads((workdir / "results.json").read_text())
  assert results["step"] == 2
  return results
