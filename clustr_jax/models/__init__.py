"""Models by name: ``get(name, **kwargs)`` builds any registered model.

  lra_encoder          LRA Transformer encoder classifier (``lra.LRAEncoder``)
  lra_dual_encoder     LRA Retrieval two-document classifier (``lra.LRADualEncoder``)
  deit_ti, deit_s,     ViT/DeiT Ti/S/B, patch 16, 224^2 (``vit.VisionTransformer``); any attention
  deit_b               from the registry via ``attention`` / ``attention_kwargs``
  sparsifiner_deit_s   DeiT-S with Sparsifiner attention in every block (official
                       ``sparsifiner.py``: keep rate 0.25, reduce_n_factor 6, reduce_c_factor 2)
  clustr_t, clustr_s,  the ClusTR pyramid, official ``ClusTR_b1``, ``_b2``, ``_b3``
  clustr_b             (``clustr_vit.ClusTR``; 11.68M, 22.69M, 40.25M parameters)

Vision models take float32 images [batch, height, width, 3] and ``train: bool``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn

from clustr_jax.models import clustr_vit, lra, vit

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
