r"""LRA Retrieval (AAN document pairs, byte level, dual encoder): official and CPU-sized settings.

Official (``lra_benchmarks/matching/configs/{base_match_config,transformer_base}.py``,
``docs/lra.md``): a shared encoder of 4 layers, emb 128, 4 heads, qkv 128, MLP 512,
sinusoidal positions, CLS pooling (the CLS token takes the first token's mask: LRA's quirk, on),
dropout 0.1/0.1, 4,000 byte tokens per document (texts cut to 10,000 bytes first), head
Dense(512)-ReLU-Dense(256)-ReLU-Dense(2) on [e1, e2]; batch 32, 5,000 steps, Adam(0.9, 0.98,
1e-9), lr 0.05 * linear_warmup(8,000) * rsqrt_decay (the warmup outlasts the run, as in LRA),
weight decay 0.1, eval every 100 steps. LRA's Transformer reaches 57.46% test accuracy. The AAN
texts are only in the LRA release (``lra_release/tsv_data/``); no sample exists to train on here.

``cpu`` differs: 256 tokens per document, a 1-layer encoder of width 32 (2 heads, qkv 32, MLP 64),
no dropout, batch 8, 100 steps, lr 1e-3 * warmup(10) * cosine decay, no weight decay.

Args (comma-separated, e.g. ``:cpu,attention=cast``):
  cpu        the CPU-sized variant.
  attention  any registered mechanism (dense, clustr, cast, sparsifiner, ...), sized for the
             length by the mechanism itself (``clustr_jax.attention.sized_for``).

  python -m clustr_jax.main --config=configs/lra/retrieval.py --workdir=/tmp/retrieval \
      --config.dataset.data_dir=/path/to/lra_release/tsv_data
"""

from configs import common
from configs.lra import common as lra_common


def get_config(arg=None):
  arg = common.parse_arg(arg, cpu=False, attention="dense")
  config = lra_common.base_config(
      dataset=dict(name="retrieval", data_dir=None, file_prefix="new_aan_pairs", max_length=4000,
                   max_text_bytes=10_000),
      model=dict(
          name="lra_dual_encoder", emb_dim=128, num_heads=4, qkv_dim=128, mlp_dim=512,
          num_layers=4, dropout_rate=0.1, attention_dropout_rate=0.1, pooling="CLS",
          learned_position_embedding=False, cls_mask_from_first_token=True,
          zero_is_padding=True, interaction=None, lra_padding=not arg.cpu,
          dtype="float32", attention=arg.attention),
      batch_size=32, num_train_steps=5_000, learning_rate=0.05,
      schedule="constant*linear_warmup*rsqrt_decay", warmup_steps=8_000, weight_decay=0.1,
      eval_every_steps=100)

  if arg.cpu:
    config.dataset.max_length = 256
    config.model.update(emb_dim=32, num_heads=2, qkv_dim=32, mlp_dim=64, num_layers=1,
                        dropout_rate=0.0, attention_dropout_rate=0.0)
    config.batch_size = config.eval_batch_size = 8
    config.num_train_steps = 100
    config.learning_rate = 1e-3
    config.schedule = "constant*linear_warmup*cosine_decay"
    config.warmup_steps = 10
    config.weight_decay = 0.0
    config.eval_every_steps = 50
    config.checkpoint_every_steps = 50

  return lra_common.finish(config)
