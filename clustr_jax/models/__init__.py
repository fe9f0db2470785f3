"""Models by name: ``get(name, **kwargs)`` builds any registered model.

  lra_encoder       LRA Transformer encoder classifier (``lra.LRAEncoder``)
  lra_dual_encoder  LRA Retrieval two-document classifier (``lra.LRADualEncoder``)
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn

from clustr_jax.models import lra

_REGISTRY: dict[str, type[nn.Module]] = {
    "lra_encoder": lra.LRAEncoder,
    "lra_dual_encoder": lra.LRADualEncoder,
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
  cls = _REGISTRY[name]
  valid = set(cls.__dataclass_fields__) - {"parent", "name"}
  unknown = sorted(set(kwargs) - valid)
  if unknown:
    raise ValueError(f"model {name!r} has no option(s) {unknown}; valid: {sorted(valid)}")
  return cls(**kwargs)
