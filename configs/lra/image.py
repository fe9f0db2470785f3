r"""LRA Image (grayscale CIFAR-10, 1,024 pixel tokens): official settings and a CPU-sized variant.

Official (``lra_benchmarks/image/configs/cifar10/{base_cifar10_config,transformer_base}.py``,
``docs/lra.md``): 1 layer, emb 128, 8 heads, qkv 64, MLP 128, learned positions,
CLS pooling (the CLS token takes the first pixel's mask), pixel value 0 is padding (both LRA
quirks, on: ``model.zero_is_padding``, ``model.cls_mask_from_first_token``), dropout 0.3 /
attention dropout 0.2, batch 256, 35,000 steps (200 epochs of 175), Adam(0.9, 0.98, 1e-9),
lr 5e-4 * linear_warmup(175) * cosine_decay (LRA's cycle: ``steps_per_cycle`` = the total
steps, ``optim.py``'s default), no weight decay, eval every epoch (175 steps).
Splits train[:90%] / train[90%:] / test (45,000 / 5,000 / 10,000). LRA's Transformer reaches
42.44% test accuracy.

``cpu`` differs: width 32 (2 heads, qkv 16, MLP 64), no dropout, batch 16, 300 steps,
lr 2e-3 * warmup(30) * cosine decay; sized for the 4,660 + 932 real records of a
CIFAR-10 sample (data_batch_*.bin files) on 2 CPU cores (test accuracy 0.163 against 0.113 for
the majority class, experiments/lra/results/lra_cpu_sweep.md).

Args (comma-separated, e.g. ``:cpu,attention=cast``):
  cpu        the CPU-sized variant.
  attention  any registered mechanism (dense, clustr, cast, sparsifiner, ...), sized for the
             length by the mechanism itself (``clustr_jax.attention.sized_for``).

  python -m clustr_jax.main --config=configs/lra/image.py:cpu --workdir=workdir/image_cpu \
      --config.dataset.data_dir=/path/to/cifar-10-batches-bin
  python -m clustr_jax.main --config=configs/lra/image.py --workdir=/tmp/image \
      --config.dataset.source=tfds
"""

from configs import common
from configs.lra import common as lra_common


def get_config(arg=None):
  arg = common.parse_arg(arg, cpu=False, attention="dense")
  config = lra_common.base_config(
      dataset=dict(
          name="image",
          source="binary",  # 'binary': data_dir holds data_batch_*.bin; 'tfds': cifar10.
          data_dir=None, tfds_name="cifar10", val_fraction=0.1, max_length=1024,
          tfds_splits=dict(train="train[:90%]", val="train[90%:]", test="test")),
      model=dict(
          name="lra_encoder", emb_dim=128, num_heads=8, qkv_dim=64, mlp_dim=128, num_layers=1,
          dropout_rate=0.3, attention_dropout_rate=0.2, pooling="CLS",
          learned_position_embedding=True, cls_mask_from_first_token=True,
          zero_is_padding=True, lra_padding=not arg.cpu,
          dtype="float32", attention=arg.attention),
      batch_size=256, num_train_steps=35_000, learning_rate=5e-4,
      schedule="constant*linear_warmup*cosine_decay", warmup_steps=175, weight_decay=0.0,
      eval_every_steps=175, checkpoint_every_steps=1_750)

  if arg.cpu:
    config.model.update(emb_dim=32, num_heads=2, qkv_dim=16, mlp_dim=64, dropout_rate=0.0,
                        attention_dropout_rate=0.0)
    config.batch_size = config.eval_batch_size = 16
    config.num_train_steps = 300
    config.learning_rate = 2e-3
    config.warmup_steps = 30
    config.eval_every_steps = 300
    config.checkpoint_every_steps = 300

  return lra_common.finish(config)
