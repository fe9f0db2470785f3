"""LRA Text: aclImdb and TFDS readers, byte encoding, malformed reviews, the config."""

import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds
from lra_testing import DATA, REPO, run_two_steps

from clustr_jax import data as data_lib
from clustr_jax.data import text
from configs import common as config_common

IMDB = DATA / "imdb" / "aclImdb"  # 11 train and 10 test reviews copied from ../shared/data/imdb.


def _copy(tmp_path):
  root = tmp_path / "aclImdb"
  shutil.copytree(IMDB, root)
  return root


def test_encode_bytes_is_byte_plus_one_truncated_and_padded():
  ids = text.encode_bytes(["Hi é".encode(), b"abcdef"], max_length=5)
  np.testing.assert_array_equal(ids, [[ord("H") + 1, ord("i") + 1, 33, 0xC3 + 1, 0xA9 + 1],
                                      [98, 99, 100, 101, 102]])
  assert ids.dtype == np.int32
  np.testing.assert_array_equal(text.encode_bytes([b"ab"], 4), [[98, 99, 0, 0]])
  with pytest.raises(ValueError, match="max_length must be >= 1"):
    text.encode_bytes([b"a"], 0)


def test_read_aclimdb_real_reviews():
  texts, labels = text.read_aclimdb(IMDB, "train")
  neg = sorted((IMDB / "train" / "neg").iterdir())
  pos = sorted((IMDB / "train" / "pos").iterdir())
  np.testing.assert_array_equal(labels, [0] * len(neg) + [1] * len(pos))
  assert texts == [p.read_bytes().strip() for p in neg + pos]
  # A review with non-ASCII text ("clichés") is encoded byte by byte, <br /> kept.
  review = (IMDB / "train" / "neg" / "10175_3.txt").read_bytes().strip()
  assert "clichés".encode() in review
  ids = text.encode_bytes([review], 4000)[0]
  np.testing.assert_array_equal(ids[:len(review)], np.frombuffer(review, np.uint8) + 1)
  assert not ids[len(review):].any()


def test_load_dataset_validates_on_test_like_lra():
  config = config_common.load(f"{REPO}/configs/lra/text.py:cpu")
  config.dataset.data_dir = str(DATA / "imdb")  # The parent of aclImdb works too.
  dataset = data_lib.get(config, "/unused")
  assert dataset.input_keys == ("inputs",)
  assert dataset.model_kwargs == {"vocab_size": 257, "num_classes": 2, "max_length": 512}
  assert dataset.example_spec == {"inputs": ((512,), np.int32), "targets": ((), np.int32)}
  assert dataset.splits["val"] is dataset.splits["test"]
  assert len(dataset.splits["train"]["targets"]) == 11
  assert len(dataset.splits["test"]["targets"]) == 10
  config.dataset.val_fraction = 0.3
  held_out = data_lib.get(config, "/unused")
  assert len(held_out.splits["val"]["targets"]) == 3
  assert len(held_out.splits["train"]["targets"]) == 8
  train_rows = {r.tobytes() for r in held_out.splits["train"]["inputs"]}
  assert not train_rows & {r.tobytes() for r in held_out.splits["val"]["inputs"]}


@pytest.mark.parametrize("damage, message", [
    (lambda root: (root / "train" / "pos" / "notes.txt").write_text("x"),
     r"train/pos/notes.txt: not an aclImdb review file name"),
    (lambda root: (root / "train" / "pos" / "99_3.txt").write_text("fine"),
     r"train/pos/99_3.txt: rating 3 contradicts folder 'pos'"),
    (lambda root: (root / "test" / "neg" / "98_2.txt").write_bytes(b"Good\nline two caf\xc3"),
     r"test/neg/98_2.txt:2: not valid UTF-8 at byte 17"),
    (lambda root: (root / "test" / "neg" / "97_1.txt").write_bytes(b" \n "),
     r"test/neg/97_1.txt:1: empty review"),
    (lambda root: shutil.rmtree(root / "test" / "pos"), r"IMDb folder missing: .*test/pos"),
])
def test_malformed_reviews_name_the_file(tmp_path, damage, message):
  root = _copy(tmp_path)
  damage(root)
  split = "train" if "train" in message else "test"
  with pytest.raises((ValueError, FileNotFoundError), match=message):
    text.read_aclimdb(root, split)


def test_tfds_source(monkeypatch):
  records = {"train": [{"text": b" A fine film. ", "label": 1}, {"text": "Dull.", "label": 0}],
             "test": [{"text": b"Bad", "label": 0}], "broken": [{"text": b"x", "label": 2}]}
  calls = []

  def data_source(name, *, split, data_dir):
    calls.append((name, split, data_dir))
    return records[split]

  monkeypatch.setattr(tfds, "data_source", data_source)
  texts, labels = text.read_tfds("train", data_dir="/tfds")
  assert texts == [b"A fine film.", b"Dull."] and labels.tolist() == [1, 0]
  assert calls == [("imdb_reviews", "train", "/tfds")]
  with pytest.raises(ValueError, match="split 'broken' record 0: label 2"):
    text.read_tfds("broken")


def test_configs_official_values_and_two_steps(tmp_path):
  official = config_common.load(f"{REPO}/configs/lra/text.py")
  assert (official.model.num_layers, official.model.emb_dim, official.model.mlp_dim) == (4, 256,
                                                                                          1024)
  assert official.dataset.max_length == 1000 and official.num_train_steps == 20_000
  assert official.warmup_steps == 8_000 and official.model.cls_mask_from_first_token
  config = config_common.load(f"{REPO}/configs/lra/text.py:max_length=4000")
  assert config.dataset.max_length == 4000
  for name in ("clustr", "cast", "sparsifiner"):
    config = config_common.load(f"{REPO}/configs/lra/text.py:cpu,attention={name}")
    assert config.model.attention == name and config.model.attention_kwargs
  results = run_two_steps("text.py:cpu", DATA / "imdb", tmp_path, max_length=64)
  assert results["test"]["num_examples"] == results["val"]["num_examples"] == 10
