"""LRA Retrieval: the AAN pairs TSV reader, malformed rows, pair batches, the dual encoder, config.

``tests/data/aan/new_aan_pairs.{train,eval,test}.tsv`` are written for these tests in the release
format (no header; label, id1, id2, text1, text2; labels as ``1`` and ``1.0``), with
handwritten abstract-like texts under real AAN paper ids: the AAN texts themselves are not
redistributable.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from lra_testing import DATA, REPO, run_two_steps

from clustr_jax import data as data_lib
from clustr_jax import models
from clustr_jax.data import retrieval
from clustr_jax.models import lra
from configs import common as config_common

AAN = DATA / "aan"
SMALL = dict(vocab_size=257, num_classes=2, max_length=48, emb_dim=16, num_heads=2, qkv_dim=16,
             mlp_dim=32, num_layers=1, dropout_rate=0.0, attention_dropout_rate=0.0)


def _rows(path):
  return [line.rstrip("\n").split("\t") for line in path.read_text(encoding="utf-8").splitlines()]


def test_read_tsv_real_format():
  path = AAN / "new_aan_pairs.train.tsv"
  arrays = retrieval.read_tsv(path, max_length=400)
  rows = _rows(path)
  assert arrays["inputs1"].shape == arrays["inputs2"].shape == (16, 400)
  assert arrays["inputs1"].dtype == np.int32
  np.testing.assert_array_equal(arrays["targets"], [int(float(r[0])) for r in rows])
  for ids, text in ((arrays["inputs1"][2], rows[2][3]), (arrays["inputs2"][5], rows[5][4])):
    raw = text.encode()
    np.testing.assert_array_equal(ids[:len(raw)], np.frombuffer(raw, np.uint8) + 1)
    assert not ids[len(raw):].any()
  assert b'"unsupervised"' in bytes(
      (arrays["inputs1"][6][arrays["inputs1"][6] > 0] - 1).astype(np.uint8))  # Quotes literal.


def test_texts_cut_to_10000_bytes_then_max_length(tmp_path):
  path = tmp_path / "long.tsv"
  path.write_text(f"1\ta\tb\t{'x' * 12_000}\tshort\n", encoding="utf-8")
  arrays = retrieval.read_tsv(path, max_length=11_000)
  assert (arrays["inputs1"][0] > 0).sum() == 10_000
  assert (arrays["inputs2"][0] > 0).sum() == 5
  assert (retrieval.read_tsv(path, max_length=4000)["inputs1"][0] > 0).sum() == 4000


@pytest.mark.parametrize("edit, message", [
    (lambda lines: lines[:3] + ["yes\tA\tB\tt1\tt2\n"] + lines[3:], r":4: label b'yes' is not a "),
    (lambda lines: lines[:1] + ["2\tA\tB\tt1\tt2\n"] + lines[1:], r":2: label 2.0 is not 0 or 1"),
    (lambda lines: lines[:5] + ["1\tA\tB\tonly four\n"] + lines[5:],
     r":6: expected 5 tab-separated columns \(label, id1, id2, text1, text2\), found 4"),
    (lambda lines: lines[:2] + ["1\t\tB\tt1\tt2\n"] + lines[2:], r":3: empty column 'id1'"),
    (lambda lines: lines[:7] + [lines[7][:40]], r":8: expected 5 tab-separated columns"),
])
def test_malformed_rows_name_file_and_line(tmp_path, edit, message):
  lines = (AAN / "new_aan_pairs.test.tsv").read_text(encoding="utf-8").splitlines(True)
  path = tmp_path / "new_aan_pairs.test.tsv"
  path.write_text("".join(edit(lines)), encoding="utf-8")
  with pytest.raises(ValueError, match=str(path) + message):
    retrieval.read_tsv(path, max_length=64)


def test_missing_files_and_empty_file(tmp_path):
  (tmp_path / "new_aan_pairs.train.tsv").write_text("")
  with pytest.raises(FileNotFoundError, match=r"new_aan_pairs.eval.tsv, .*new_aan_pairs.test.tsv"):
    retrieval.load_splits(tmp_path, 64)
  with pytest.raises(ValueError, match=r"new_aan_pairs.train.tsv:1: no rows"):
    retrieval.read_tsv(tmp_path / "new_aan_pairs.train.tsv", 64)


def test_pair_batches_keep_documents_together():
  config = config_common.load(f"{REPO}/configs/lra/retrieval.py:cpu")
  config.dataset.data_dir = str(AAN)
  dataset = data_lib.get(config, "/unused")
  assert dataset.input_keys == ("inputs1", "inputs2")
  assert dataset.eval_splits == ("val", "test")
  assert dataset.model_kwargs == {"vocab_size": 257, "num_classes": 2, "max_length": 256}
  # Each (inputs1, inputs2, label) triple of a batch is one TSV row.
  encode = lambda t: retrieval.text.encode_bytes([t.encode()], 256)[0].tobytes()  # noqa: E731
  rows = {(encode(r[3]), encode(r[4])): int(float(r[0]))
          for r in _rows(AAN / "new_aan_pairs.train.tsv")}
  seen = []
  iterator = dataset.train_iterator(batch_size=8, seed=0)
  for _ in range(4):
    batch = next(iterator)
    assert set(batch) == {"inputs1", "inputs2", "targets"}
    for x1, x2, y in zip(batch["inputs1"], batch["inputs2"], batch["targets"]):
      assert rows[x1.tobytes(), x2.tobytes()] == y
      seen.append((x1.tobytes(), x2.tobytes()))
  assert len(set(seen[:16])) == 16 and set(seen) == set(rows)  # One epoch is every pair once.
  batches = list(dataset.eval_batches("test", batch_size=8))
  assert len(batches) == 1 and batches[0]["weights"].sum() == 8
  assert batches[0]["inputs2"].shape == (8, 256)


@pytest.mark.parametrize("interaction", [None, "NLI"])
def test_dual_encoder_is_one_shared_encoder_and_the_lra_head(interaction):
  model = models.get("lra_dual_encoder", interaction=interaction, **SMALL)
  rng = np.random.default_rng(0)
  x1 = rng.integers(1, 257, (3, 48)).astype(np.int32)
  x2 = rng.integers(1, 257, (3, 48)).astype(np.int32)
  x2[:, 30:] = 0
  variables = jax.jit(model.init)(jax.random.key(0), x1, x2)
  params = nn.unbox(variables["params"])
  assert set(params) == {"encoder", "head_hidden", "head_hidden2", "head"}
  width = 2 if interaction is None else 4
  assert params["head_hidden"]["kernel"].shape == (width * 16, 32)
  assert params["head_hidden2"]["kernel"].shape == (32, 16)
  assert params["head"]["kernel"].shape == (16, 2)
  logits = jax.jit(model.apply)(variables, x1, x2)
  assert logits.shape == (3, 2) and logits.dtype == jnp.float32
  # The same computation by hand: the shared encoder on each document, CLS pooling, the MLP.
  fields = {k: v for k, v in SMALL.items() if k != "num_classes"}
  encoder = lra.TransformerEncoder(**fields)
  encode = jax.jit(lambda x: lra.pool(*encoder.apply({"params": params["encoder"]}, x), "CLS"))
  e1, e2 = encode(x1), encode(x2)
  x = jnp.concatenate([e1, e2] if interaction is None else [e1, e2, e1 * e2, e1 - e2], -1)
  for name in ("head_hidden", "head_hidden2"):
    x = jax.nn.relu(x @ params[name]["kernel"] + params[name]["bias"])
  np.testing.assert_allclose(logits, x @ params["head"]["kernel"] + params["head"]["bias"],
                             rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="interaction must be None or 'NLI'"):
    models.get("lra_dual_encoder", interaction="dot", **SMALL).init(jax.random.key(0), x1, x2)


def test_configs_official_values_and_two_steps(tmp_path):
  official = config_common.load(f"{REPO}/configs/lra/retrieval.py")
  assert official.model.name == "lra_dual_encoder"
  assert (official.model.num_layers, official.model.emb_dim, official.model.mlp_dim) == (4, 128,
                                                                                          512)
  assert official.dataset.max_length == 4000 and official.dataset.max_text_bytes == 10_000
  assert (official.num_train_steps, official.warmup_steps) == (5_000, 8_000)
  results = run_two_steps("retrieval.py:cpu", AAN, tmp_path, max_length=64)
  assert results["test"]["num_examples"] == results["val"]["num_examples"] == 8
