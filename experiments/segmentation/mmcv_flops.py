"""Multiply-accumulates of a Flax model in mmcv's ``get_model_complexity_info`` convention.

The papers' FLOPs (PVT, PVTv2, ClusTR; mmsegmentation's ``tools/get_flops.py``) come from mmcv's
``mmcv/cnn/utils/flops_counter.py``: forward hooks on the ``nn.Module`` types of its
``get_modules_mapping`` table add, per call (batch included):

- ``nn.Conv2d``: prod(kernel) x in_channels x out_channels / groups per output position, plus
  out_channels per output position when the conv has a bias;
- ``nn.Linear``: numel(input) x out_features (no bias term);
- ``nn.LayerNorm`` / ``nn.GroupNorm`` / batch and instance norms: numel(input), x 2 when affine;
- ``nn.ReLU`` (and PReLU, ELU, LeakyReLU, ReLU6): numel(output);
- ``nn.Upsample``: numel(output) (of the first sample; the same as numel at batch 1);
- pooling: numel(input).

Everything else counts 0: ``nn.GELU`` and ``nn.Dropout`` are not in the table, and functional
ops (``torch.matmul`` / ``@`` in attention, softmax, ``F.interpolate``, indexing, the ClusTR
clustering) are not modules. The result is MACs, which the papers print as "GFLOPs".

Here a Flax forward runs under ``flax.linen.intercept_methods``: every ``__call__`` of a module
whose class is in ``LINEAR_AXES`` (linear maps: ``nn.Dense``, ``nn.Conv`` and the attention
projections of ``clustr_jax.attention``) or ``NORMS`` adds its count from the call's actual
input and output shapes and its kernel; the model itself is unchanged. Our functional
activations (``nn.relu``, ``jax.image.resize``) are not modules, so a caller adds the terms of
modules the official code has but we compute functionally (``experiments/segmentation/
model_table.py`` adds the FPN head's ``ReLU`` and ``nn.Upsample`` from the recorded GroupNorm
calls). ``count_macs`` traces with ``jax.eval_shape``: nothing runs, any input size is free.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import numpy as np

from clustr_jax.attention import base
from clustr_jax.attention import clustr as clustr_attention

#: Linear maps (mmcv's ``nn.Linear`` / ``nn.Conv2d`` rule) -> how many leading kernel axes are
#: contracted with the input; the other kernel axes are the output features.
LINEAR_AXES: dict[type, int] = {
    nn.Dense: 1,                                    # [in, out]
    base.HeadProjection: 1,                         # [in, heads, head_dim]
    clustr_attention.KeyValueProjection: 1,         # [in, 2, heads, head_dim]
    base.OutputProjection: 2,                       # [heads, head_dim, out]
}
#: Normalisations (mmcv's ``norm_flops_counter_hook``).
NORMS = (nn.LayerNorm, nn.GroupNorm)


@dataclasses.dataclass
class Call:
  """One counted module call: its scope path, class name, input / output shapes, and MACs."""
  path: str
  kind: str
  input_shape: tuple[int, ...]
  output_shape: tuple[int, ...]
  macs: int


def _numel(tree: Any) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def _kernel(module: nn.Module) -> jax.Array:
  return nn.meta.unbox(module.variables["params"]["kernel"])


def _count(module: nn.Module, args: tuple, output: Any) -> int | None:
  """mmcv's MACs of one call, or None when the module is not in the table."""
  x = args[0]
  if isinstance(module, nn.Conv):
    kernel = _kernel(module)                                            # [kh, kw, in/g, out]
    positions = _numel(output) // kernel.shape[-1]                      # B x H_out x W_out
    bias = kernel.shape[-1] * positions if module.use_bias else 0
    return int(kernel.size) * positions + bias
  for cls, contracted in LINEAR_AXES.items():
    if type(module) is cls:
      kernel = _kernel(module)
      return _numel(x) // math.prod(kernel.shape[:contracted]) * int(kernel.size)
  if isinstance(module, NORMS):
    affine = module.use_scale or module.use_bias
    return _numel(x) * (2 if affine else 1)
  return None


def count_macs(apply: Callable[..., Any], *args: Any) -> list[Call]:
  """The counted module calls of ``apply(*args)`` in mmcv's convention.

  Args:
    apply: a function that calls Flax modules (e.g. ``lambda v, x: model.apply(v, x)``).
    *args: its arguments, arrays or ``jax.ShapeDtypeStruct``s (traced with ``jax.eval_shape``:
      nothing is computed).

  Returns:
    one ``Call`` per counted call, in call order; ``sum(c.macs for c in calls)`` is mmcv's
    total for the modules this file knows (module docstring).

  Raises:
    whatever ``apply`` raises for these inputs.
  """
  calls: list[Call] = []

  def interceptor(next_fun, call_args, kwargs, context):
    output = next_fun(*call_args, **kwargs)
    if context.method_name == "__call__" and call_args:
      macs = _count(context.module, call_args, output)
      if macs is not None:
        first = jax.tree.leaves(output)[0]
        calls.append(Call("/".join(context.module.path), type(context.module).__name__,
                          tuple(call_args[0].shape), tuple(first.shape), macs))
    return output

  def run(*inner):
    with nn.intercept_methods(interceptor):
      return apply(*inner)

  jax.eval_shape(run, *args)
  return calls


def total(calls: list[Call]) -> int:
  """Sum of the calls' MACs (int)."""
  return int(np.sum([c.macs for c in calls], dtype=np.int64))
