r"""LRA ListOps: the official LRA Transformer settings, and a CPU-sized variant.

Official (``lra_benchmarks/listops/configs/{base_listops_config,transformer_base}.py``, see
``docs/lra.md``): 4 layers, emb 512, 8 heads, qkv 512, MLP 1024, sinusoidal
positions, CLS pooling, dropout 0.1/0.1, length 2,000, batch 32, 5,000 steps, Adam(0.9, 0.98,
1e-9), lr 0.05 * linear_warmup(1,000) * rsqrt_decay, weight decay 0.1, eval every 50 steps;
LRA's padding computation (``model.lra_padding``, the CLS token taking the first token's mask).
LRA's Transformer reaches 36.37% test accuracy.

``cpu`` (the main job's default: 5-7 minutes on 2 CPU cores including data generation, test
accuracy 0.49 against 0.16 for the majority class) differs:
generated sequences of 10 < length < 64 tokens instead of 500 < length < 2,000 (same grammar,
operators, depth limit 10, 10 arguments and value probability 0.25), 20,000/1,000/1,000 examples
instead of 96,000/2,000/2,000, inputs padded to 64, a 2-layer model of width 128 (4 heads,
qkv 128, MLP 256), batch 32, 2,000 steps, lr 0.02 * warmup(200) * rsqrt_decay, no dropout.

Args (comma-separated, e.g. ``:cpu,attention=cast``):
  cpu        the CPU-sized variant.
  attention  any registered mechanism (dense, clustr, cast, sparsifiner, ...), sized for the
             length by the mechanism itself (``clustr_jax.attention.sized_for``).

  python -m clustr_jax.main --config=configs/lra/listops.py:cpu --workdir=workdir/listops_cpu
  python -m clustr_jax.main --config=configs/lra/listops.py --workdir=/tmp/listops
  python -m clustr_jax.main --config=configs/lra/listops.py:attention=cast --workdir=/tmp/cast
"""

from configs import common
from configs.lra import common as lra_common


def get_config(arg=None):
  arg = common.parse_arg(arg, cpu=False, attention="dense")
  config = lra_common.base_config(
      dataset=dict(
          name="listops", task="basic", data_dir=None,
          generate=True,  # Write {task}_{train,val,test}.tsv first if missing.
          max_length=2000,
          generator=dict(num_train=96_000, num_val=2_000, num_test=2_000, min_length=500,
                         max_length=2000, max_depth=10, max_args=10, value_p=0.25, seed=0)),
      model=dict(
          name="lra_encoder", emb_dim=512, num_heads=8, qkv_dim=512, mlp_dim=1024, num_layers=4,
          dropout_rate=0.1, attention_dropout_rate=0.1, pooling="CLS",
          learned_position_embedding=False, cls_mask_from_first_token=not arg.cpu,
          lra_padding=not arg.cpu, dtype="float32",
          attention=arg.attention),
      batch_size=32, num_train_steps=5_000, learning_rate=0.05,
      schedule="constant*linear_warmup*rsqrt_decay", warmup_steps=1_000, weight_decay=0.1,
      eval_every_steps=50)

  if arg.cpu:
    config.dataset.max_length = 64
    config.dataset.generator.update(num_train=20_000, num_val=1_000, num_test=1_000,
                                    min_length=10, max_length=64)
    config.model.update(emb_dim=128, num_heads=4, qkv_dim=128, mlp_dim=256, num_layers=2,
                        dropout_rate=0.0, attention_dropout_rate=0.0)
    config.num_train_steps = 2_000
    config.learning_rate = 0.02
    config.warmup_steps = 200
    config.eval_every_steps = 250
    config.checkpoint_every_steps = 250

  return lra_common.finish(config)
