"""Models by name: ``get(name, **kwargs)`` builds any registered model.

  lra_encoder          LRA Transformer encoder classifier (``lra.LRAEncoder``)
  lra_dual_encoder     LRA Retrieval two-document classifier (``lra.LRADualEncoder``)
  deit_ti, deit_s,     ViT/DeiT Ti/S/B, patch 16, 224^2 (``vit.VisionTransformer``); any attention
  deit_b               from the registry via ``attention`` / ``attention_kwargs``
  sparsifiner_deit_s   DeiT-S with Sparsifiner attention in every block (official
                       ``sparsifiner.py``: keep rate 0.25, reduce_n_factor 6, reduce_c_factor 2)
  clustr_t, clustr_s,  the ClusTR pyramid, official ``ClusTR_b1``, ``_b2``, ``_b3``
  clustr_b             (``clustr_vit.ClusTR``; 11.68M, 22.69M, 40.25M parameters)
  clustr_t_fpn,        the ClusTR-T/S/B pyramid + Semantic FPN for semantic segmentation
  clustr_s_fpn,        (``segmentation.SemanticFPN``; logits [batch, height, width, classes];
  clustr_b_fpn         docs/segmentation.md)

Vision models take float32 images [batch, height, width, 3] and ``train: bool``.
``from_config(config.model, data_kwargs)`` builds the model a run config describes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from clustr_jax.models import clustr_vit, lra, segmentation, vit

# name -> (class, constructor defaults); keywords given to ``get`` override the defaults.
_REGISTRY: dict[str, tuple[type[nn.Module], dict[str, Any]]] = {
    "lra_encoder": (lra.LRAEncoder, {}),
    "lra_dual_encoder": (lra.LRADualEncoder, {}),
    "deit_ti": (vit.VisionTransformer, vit.deit("ti")),
    "deit_s": (vit.VisionTransformer, vit.deit("s")),
    "deit_b": (vit.VisionTransformer, vit.deit("b")),
    "sparsifiner_deit_s": (vit.VisionTransformer, {**vit.deit("s"), "attention": "sparsifiner"}),
    "clustr_t": (clustr_vit.ClusTR, clustr_vit.VARIANTS["b1"]),
    "clustr_s": (clustr_vit.ClusTR, clustr_vit.VARIANTS["b2"]),
    "clustr_b": (clustr_vit.ClusTR, clustr_vit.VARIANTS["b3"]),
    **{name: (segmentation.SemanticFPN, {"variant": variant})
       for name, variant in segmentation.MODELS.items()},
}


def names() -> tuple[str, ...]:
  """The registered model names."""
  return tuple(_REGISTRY)


def get(name: str, **kwargs: Any) -> nn.Module:
  """Builds the model registered under ``name`` with constructor keywords ``kwargs``.

  Raises:
    ValueError: unknown ``name`` (the message lists the valid names), or a keyword the model
      does not take (named in the message).
  """
  if name not in _REGISTRY:
    raise ValueError(f"unknown model {name!r}; valid choices: {', '.join(_REGISTRY)}")
  cls, defaults = _REGISTRY[name]
  valid = set(cls.__dataclass_fields__) - {"parent", "name"}
  unknown = sorted(set(kwargs) - valid)
  if unknown:
    raise ValueError(f"model {name!r} has no option(s) {unknown}; valid: {sorted(valid)}")
  return cls(**{**defaults, **kwargs})


#: ``config.model.dtype`` names -> computation dtypes.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def from_config(model_config: Mapping[str, Any], data_kwargs: Mapping[str, Any]) -> nn.Module:
  """The model of a config's ``model`` section: its ``name`` plus constructor options, ``dtype``
  by name (``DTYPES``; default 'float32').

  ``data_kwargs`` (``Dataset.model_kwargs``: e.g. vocab_size, num_classes, max_length) fill in
  what ``model_config`` leaves unset.

  Raises:
    ValueError: unknown model name or dtype, or an option the model does not take (``get``).
  """
  kwargs = dict(model_config.to_dict() if hasattr(model_config, "to_dict") else model_config)
  name = kwargs.pop("name")
  dtype = kwargs.get("dtype", "float32")
  if dtype not in DTYPES:
    raise ValueError(f"config.model.dtype={dtype!r} unknown; valid: {', '.join(DTYPES)}")
  kwargs["dtype"] = DTYPES[dtype]
  for key, value in data_kwargs.items():
    kwargs.setdefault(key, value)
  return get(name, **kwargs)
