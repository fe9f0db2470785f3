"""The device mesh and the one table of logical axis rules.

Parameters and activations are annotated with logical axis names (``nn.with_logical_partitioning``
on initializers, ``nn.with_logical_constraint`` on activations); ``LOGICAL_AXIS_RULES`` maps them to
the mesh axes ``('data', 'fsdp', 'model')``:

  batch                    -> ('data', 'fsdp')  data parallelism (FSDP shards the batch too)
  embed (parameters)       -> 'fsdp'            fully sharded data parallel weights
  heads, mlp               -> 'model'           tensor parallelism over heads and the MLP
  everything else          -> replicated

Activation feature axes use their own names ('activation_embed', 'activation_mlp') so that a
parameter's 'embed' axis can be FSDP-sharded while activations stay sharded on the batch only.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "model")

LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("activation_embed", None),
    ("activation_mlp", "model"),
    ("embed", "fsdp"),
    ("mlp", "model"),
    ("heads", "model"),
    ("kv", None),
    ("vocab", None),
    ("classes", None),
    ("clusters", None),
)


def create_mesh(data: int = -1, fsdp: int = 1, model: int = 1,
                devices: list[jax.Device] | None = None) -> jax.sharding.Mesh:
  """Builds a ('data', 'fsdp', 'model') mesh over ``devices`` (default: all devices).

  One size may be -1: it takes all remaining devices. Axis types are Auto, so the compiler places
  top-k, gathers and scatters (``docs/launching.md``, "Mesh and sharding").

  Raises:
    ValueError: the sizes do not multiply to the number of devices, or more than one is -1.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = [data, fsdp, model]
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh: at most one of data/fsdp/model may be -1; got {sizes}")
  known = int(np.prod([s for s in sizes if s != -1]))
  if known < 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"mesh: sizes must be positive or -1; got data={data}, fsdp={fsdp}, "
                     f"model={model}")
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"mesh: {len(devices)} devices are not divisible by the fixed axes "
                       f"(data={data}, fsdp={fsdp}, model={model})")
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(f"mesh: data*fsdp*model = {int(np.prod(sizes))} must equal the number of "
                     f"devices ({len(devices)}); got data={sizes[0]}, fsdp={sizes[1]}, "
                     f"model={sizes[2]}")
  return jax.make_mesh(tuple(sizes), MESH_AXES, devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def data_parallel_size(mesh: jax.sharding.Mesh) -> int:
  """Number of shards of the batch axis (data * fsdp)."""
  return mesh.shape["data"] * mesh.shape["fsdp"]


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Sharding of a batch array: leading axis over ('data', 'fsdp'), the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Fully replicated sharding."""
  return NamedSharding(mesh, PartitionSpec())


def logical_to_sharding(tree: Any, mesh: jax.sharding.Mesh,
                        rules=LOGICAL_AXIS_RULES) -> Any:
  """Maps a tree holding ``nn.LogicallyPartitioned`` leaves to a tree of ``NamedSharding``.

  Leaves without logical names (optimizer counters, plain arrays) are replicated.
  """
  specs = nn.get_partition_spec(tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def check_divisible(abstract: Any, shardings: Any) -> None:
  """Checks that every sharded dimension divides evenly over its mesh axes.

  Args:
    abstract: a tree of arrays or ``jax.ShapeDtypeStruct``, boxed (``nn.LogicallyPartitioned``
      leaves, e.g. ``jax.eval_shape`` of an init function) or not.
    shardings: the matching tree of ``NamedSharding`` (``logical_to_sharding``).

  Raises:
    ValueError: naming the parameter path, its shape, the partition spec and the mesh axis sizes
      (set by ``config.mesh.*``), and the model size to change.
  """
  boxed = lambda x: isinstance(x, nn.meta.AxisMetadata)  # noqa: E731
  flat, _ = jax.tree_util.tree_flatten_with_path(abstract, is_leaf=boxed)
  flat_shardings = jax.tree.leaves(shardings)
  for (path, leaf), named in zip(flat, flat_shardings, strict=True):
    value = leaf.value if boxed(leaf) else leaf
    if not hasattr(value, "shape"):
      continue  # No array: e.g. optax.MaskedNode, the state of a masked-out parameter.
    shape = value.shape
    mesh_shape = dict(named.mesh.shape)
    for dim, (size, axes) in enumerate(zip(shape, named.spec)):
      if axes is None:
        continue
      axes = (axes,) if isinstance(axes, str) else tuple(axes)
      shards = int(np.prod([mesh_shape[a] for a in axes]))
      if size % shards:
        raise ValueError(
            f"{jax.tree_util.keystr(path)} of shape {tuple(shape)} is sharded as "
            f"{named.spec}: dimension {dim} (size {size}) is not divisible by "
            + " * ".join(f"config.mesh.{a}={mesh_shape[a]}" for a in axes)
            + "; change the model size or the mesh")
