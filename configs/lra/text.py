r"""LRA Text (IMDb, byte level): the official LRA Transformer settings, and a CPU-sized variant.

Official (``lra_benchmarks/text_classification/configs/{base_tc_config,transformer_base}.py``,
``docs/lra.md``): 4 layers, emb 256, 4 heads, qkv 256, MLP 1024, sinusoidal
positions, CLS pooling (the CLS token takes the first token's mask: LRA's quirk, on), dropout
0.1/0.1, batch 32, 20,000 steps, Adam(0.9, 0.98, 1e-9), lr 0.05 * linear_warmup(8,000) *
rsqrt_decay, weight decay 0.1, eval every 100 steps; validation on the IMDb test set (as LRA;
``--config.dataset.val_fraction=0.1`` holds out train instead). ``max_length`` 1,000 bytes is
LRA's code, 4,000 its paper (``:max_length=4000``). LRA's Transformer reaches 64.27% test accuracy.

``cpu`` differs: reviews cut to 512 bytes, a 1-layer model of width 32 (2 heads, qkv 32, MLP 64),
MEAN pooling, batch 32, 400 steps, lr 2e-3 * warmup(60) * cosine decay, no weight decay; sized
for the 1,000 + 1,000 real reviews of an aclImdb sample on 2 CPU cores (test accuracy 0.569
against 0.50 for chance, experiments/lra/results/lra_cpu_sweep.md).

Args (comma-separated, e.g. ``:cpu,attention=cast``):
  cpu         the CPU-sized variant.
  attention   any registered mechanism (dense, clustr, cast, sparsifiner, ...), sized for the
              length by the mechanism itself (``clustr_jax.attention.sized_for``).
  max_length  bytes per review (default 1000; 512 with cpu).

  python -m clustr_jax.main --config=configs/lra/text.py:cpu --workdir=workdir/text_cpu \
      --config.dataset.data_dir=/path/to/aclImdb
  python -m clustr_jax.main --config=configs/lra/text.py:max_length=4000 --workdir=/tmp/text \
      --config.dataset.source=tfds
"""

from configs import common
from configs.lra import common as lra_common


def get_config(arg=None):
  arg = common.parse_arg(arg, cpu=False, attention="dense", max_length=0)
  config = lra_common.base_config(
      dataset=dict(
          name="text",
          source="aclimdb",  # 'aclimdb': data_dir is the aclImdb folder; 'tfds': imdb_reviews.
          data_dir=None, tfds_name="imdb_reviews", max_length=arg.max_length or 1000,
          val_fraction=0.0),  # 0: validate on test, as LRA.
      model=dict(
          name="lra_encoder", emb_dim=256, num_heads=4, qkv_dim=256, mlp_dim=1024, num_layers=4,
          dropout_rate=0.1, attention_dropout_rate=0.1, pooling="CLS",
          learned_position_embedding=False, cls_mask_from_first_token=True,
          zero_is_padding=True, lra_padding=not arg.cpu,
          dtype="float32", attention=arg.attention),
      batch_size=32, num_train_steps=20_000, learning_rate=0.05,
      schedule="constant*linear_warmup*rsqrt_decay", warmup_steps=8_000, weight_decay=0.1,
      eval_every_steps=100)

  if arg.cpu:
    config.dataset.max_length = arg.max_length or 512
    config.model.update(emb_dim=32, num_heads=2, qkv_dim=32, mlp_dim=64, num_layers=1,
                        pooling="MEAN")
    config.num_train_steps = 400
    config.learning_rate = 2e-3
    config.schedule = "constant*linear_warmup*cosine_decay"
    config.warmup_steps = 60
    config.weight_decay = 0.0
    config.eval_every_steps = 100
    config.checkpoint_every_steps = 400

  return lra_common.finish(config)
