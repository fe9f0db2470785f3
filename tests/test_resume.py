"""Exact resume: a run SIGKILLed at a random (seeded) step, or preempted with SIGTERM, and then
restarted logs the same metrics, step by step, as an uninterrupted run."""

import json
import os
import pathlib
import signal
import subprocess
import sys

import numpy as np
import pytest
from test_train import tiny_config

REPO = pathlib.Path(__file__).resolve().parent.parent
NUM_STEPS = 10

# Runs a config in a fresh process (8 fake CPU devices) and, if ``stop_step`` > 0, signals itself
# right after logging the train metrics of that step.
CHILD = """
import json, os, signal, sys
import ml_collections
from clustr_jax import metrics, train
config_path, workdir, stop_step, signame = sys.argv[1:]
original_write = metrics.MetricWriter.write
def write(self, step, split, values):
  original_write(self, step, split, values)
  if split == "train" and step == int(stop_step):
    os.kill(os.getpid(), getattr(signal, signame))
metrics.MetricWriter.write = write
config = ml_collections.ConfigDict(json.loads(open(config_path).read()))
results = train.train_and_evaluate(config, workdir)
print("RESULT " + json.dumps({key: results.get(key) for key in
                              ("preempted", "step", "resumed_from_step", "test")}))
"""


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  """A persistent compilation cache shared by the module's child processes: the same program
  compiles once (a cached executable is the same code, so the numerics are equal)."""
  return tmp_path_factory.mktemp("jax_cache")


def run_child(config, workdir, cache, stop_step=0, signame="SIGKILL"):
  """The child's exit status and its RESULT dict (None if it printed none)."""
  config_path = pathlib.Path(workdir).parent / f"config_{pathlib.Path(workdir).name}.json"
  config_path.parent.mkdir(parents=True, exist_ok=True)
  config_path.write_text(config.to_json())
  env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
         "JAX_COMPILATION_CACHE_DIR": str(cache), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  child = subprocess.run([sys.executable, "-c", CHILD, str(config_path), str(workdir),
                          str(stop_step), signame], env=env, capture_output=True, text=True,
                         timeout=300, check=False)
  result = (json.loads(child.stdout.split("RESULT ", 1)[1]) if "RESULT " in child.stdout
            else None)
  return child.returncode, result, child.stderr[-3000:]


def config_for(data_dir):
  config = tiny_config(NUM_STEPS)
  config.dataset.data_dir = str(data_dir)
  config.checkpoint_every_steps = 3
  config.eval_every_steps = 5
  return config


def logged(workdir):
  """{(split, step): [metrics of each logging, in order]} from metrics.jsonl."""
  records = {}
  for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines():
    record = json.loads(line)
    key = (record.pop("split"), record.pop("step"))
    for timing in ("step_time_s", "mfu"):
      record.pop(timing, None)
    records.setdefault(key, []).append(record)
  return records


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_dir):
  """An uninterrupted run: (data dir, its logged metrics, results)."""
  root = tmp_path_factory.mktemp("reference")
  returncode, results, stderr = run_child(config_for(root / "data"), root / "run", cache_dir)
  assert returncode == 0, stderr
  return root / "data", logged(root / "run"), results


def assert_same_metrics(resumed_dir, reference_logged, resumed_results, reference_results):
  resumed = logged(resumed_dir)
  assert {k for k in resumed} == {k for k in reference_logged}
  for key, records in resumed.items():
    # Steps between the last checkpoint and the kill are logged twice: both times as in the
    # uninterrupted run.
    for record in records:
      assert record == reference_logged[key][0], key
  assert resumed_results["test"] == reference_results["test"]
  assert resumed_results["step"] == NUM_STEPS


def test_sigkill_at_a_random_step_then_resume_matches_an_uninterrupted_run(
    reference, tmp_path, cache_dir):
  data_dir, reference_logged, reference_results = reference
  kill_step = int(np.random.default_rng(6).integers(4, NUM_STEPS))
  workdir = tmp_path / "run"
  returncode, result, stderr = run_child(config_for(data_dir), workdir, cache_dir, kill_step,
                                         "SIGKILL")
  assert returncode == -signal.SIGKILL and result is None, stderr
  saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert saved and max(saved) <= kill_step and not (workdir / "results.json").exists()
  returncode, results, stderr = run_child(config_for(data_dir), workdir, cache_dir)
  assert returncode == 0, stderr
  assert results["resumed_from_step"] == max(saved)
  assert_same_metrics(workdir, reference_logged, results, reference_results)


def test_sigterm_saves_a_checkpoint_and_exits_cleanly_then_resumes(
    reference, tmp_path, cache_dir):
  data_dir, reference_logged, reference_results = reference
  workdir = tmp_path / "run"
  returncode, result, stderr = run_child(config_for(data_dir), workdir, cache_dir, 7, "SIGTERM")
  assert returncode == 0, stderr
  # The signal arrives while step 7 is logged; the loop saves after the next step (not a regular
  # checkpoint step) and stops.
  assert result["preempted"] is True and result["step"] == 8
  assert (workdir / "checkpoints" / "8").is_dir() and not (workdir / "results.json").exists()
  returncode, results, stderr = run_child(config_for(data_dir), workdir, cache_dir)
  assert returncode == 0, stderr
  assert results["resumed_from_step"] == 8
  assert_same_metrics(workdir, reference_logged, results, reference_results)
