"""The dataset registry (names = module names, former names rejected with the new one) and
``generated.generate_once`` (process 0 generates, the other processes wait for it)."""

import importlib
import json
import re
import threading
import time

import ml_collections
import pytest

from clustr_jax import data as data_lib
from clustr_jax.data import generated


def _config(name):
  return ml_collections.ConfigDict({"dataset": {"name": name}})


def test_names_are_the_module_names():
  assert data_lib.names() == ("listops", "text", "retrieval", "image", "pathfinder", "imagenet",
                              "ade20k", "camvid")
  for name in data_lib.names():
    assert callable(importlib.import_module(f"clustr_jax.data.{name}").load_dataset), name


@pytest.mark.parametrize("old, new", [("imdb", "text"), ("aan", "retrieval"),
                                      ("cifar10", "image")])
def test_former_names_give_the_new_one(old, new):
  with pytest.raises(ValueError, match=re.escape(f"config.dataset.name={old!r} was renamed to "
                                                 f"{new!r}")):
    data_lib.get(_config(old), "/unused")


def test_unknown_name_lists_the_valid_ones():
  with pytest.raises(ValueError, match="config.dataset.name='cifar' unknown; valid: listops, "
                                       "text, retrieval, image, pathfinder, imagenet"):
    data_lib.get(_config("cifar"), "/unused")


# ---------------------------------------------------------------------------------------------
# generate_once: two "processes" as threads sharing a directory and a barrier.
# ---------------------------------------------------------------------------------------------
def _run_two(out_dir, generate, **kwargs):
  """Runs generate_once as process 0 and 1 in threads; {process: exception or None}."""
  barrier = threading.Barrier(2, timeout=30)
  outcome = {}

  def process(index):
    try:
      generated.generate_once(out_dir, generate, process_index=index, process_count=2,
                              barrier=barrier.wait, poll_s=0.01, **kwargs)
      outcome[index] = None
    except Exception as e:  # pylint: disable=broad-except
      outcome[index] = e

  threads = [threading.Thread(target=process, args=(i,)) for i in (1, 0)]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join(60)
  return outcome


def test_process_0_generates_once_and_the_other_waits_for_it(tmp_path):
  out_dir = tmp_path / "data"
  calls = []
  seen = {}

  def generate():
    calls.append(1)
    time.sleep(0.2)  # Process 1 is polling meanwhile.
    (out_dir / "train.tsv").write_text("rows\n")

  out_dir.mkdir()
  # The marker of an earlier run: process 1 must not take it for this run's.
  (out_dir / generated.MARKER).write_text('{"state": "done"}\n')
  barrier = threading.Barrier(2, timeout=30)

  def waiter():
    generated.generate_once(out_dir, generate, process_index=1, process_count=2,
                            barrier=barrier.wait, poll_s=0.01)
    seen["data"] = (out_dir / "train.tsv").read_text()

  thread = threading.Thread(target=waiter)
  thread.start()
  generated.generate_once(out_dir, generate, process_index=0, process_count=2,
                          barrier=barrier.wait, poll_s=0.01)
  thread.join(60)
  assert len(calls) == 1
  assert seen == {"data": "rows\n"}  # Process 1 returned after process 0 had written the data.
  assert json.loads((out_dir / generated.MARKER).read_text()) == {"state": "done"}


def test_a_single_process_just_generates(tmp_path):
  calls = []
  generated.generate_once(tmp_path / "d", lambda: calls.append(1), process_index=0,
                          process_count=1, barrier=lambda: pytest.fail("no barrier with one"))
  assert calls == [1] and not (tmp_path / "d").exists()


def test_failure_on_process_0_reaches_the_other(tmp_path):
  def generate():
    raise ValueError("holds files generated with other parameters")

  outcome = _run_two(tmp_path, generate)
  assert isinstance(outcome[0], ValueError)
  assert isinstance(outcome[1], RuntimeError)
  assert re.search(f"process 0 failed to generate the data in {re.escape(str(tmp_path))}: "
                   f"ValueError: holds files", str(outcome[1]))


def test_timeouts_name_the_directory(tmp_path):
  out_dir = tmp_path / "never"
  # Process 0 never writes a marker (e.g. out_dir is not shared): only process 1 runs.
  with pytest.raises(TimeoutError, match=re.escape(f"to start generating the data in {out_dir}")):
    generated.generate_once(out_dir, lambda: None, process_index=1, process_count=2,
                            barrier=lambda: None, start_timeout_s=0.05, poll_s=0.01)
  # Process 0 started but does not finish.
  out_dir.mkdir()
  (out_dir / generated.MARKER).write_text('{"state": "generating"}\n')
  with pytest.raises(TimeoutError, match=re.escape(f"to generate the data in {out_dir}; ")
                     + ".*still says 'generating'"):
    generated.generate_once(out_dir, lambda: None, process_index=1, process_count=2,
                            barrier=lambda: None, timeout_s=0.05, poll_s=0.01)
