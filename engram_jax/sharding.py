"""Logical-axis rules and mesh helpers: the only place where logical names meet mesh axes.

Model code names *logical* axes (`nn.with_logical_partitioning` on parameters,
`nn.with_logical_constraint` on activations); this table maps them onto the four mesh axes:

  data    pure data parallelism (batch only; parameters replicated)
  fsdp    data parallelism with parameters (and optimiser state) sharded on their 'embed' /
          'engram_rows' axis, all-gathered at use
  tensor  Megatron-style: heads, FFN width, vocabulary
  expert  routed experts (expert parallelism)

Flax resolves a tensor's logical axes left to right and never uses a mesh axis twice in one
tensor, so activations `('batch', 'length', 'embed')` take 'fsdp' for the batch and leave
'embed' unsharded, while parameters (no 'batch' axis) shard 'embed' over 'fsdp'.

Routed experts under 'expert' > 1 are dispatched by an explicit shard_map all-to-all
(engram_jax/expert_parallel.py); row-sharded Engram tables by another
(engram_jax/sharded_tables.py). Neither relies on GSPMD to place its data.

Dimension legend: none (tables of names).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor", "expert")

LogicalRules = tuple[tuple[str, Any], ...]

# Order matters for activations: 'batch' must claim 'fsdp' before 'embed' can.
DEFAULT_RULES: LogicalRules = (
    ("batch", ("data", "fsdp", "expert")),
    ("length", None),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("experts", "expert"),
    ("embed", "fsdp"),
    ("head_dim", None),
    ("streams", None),
    ("layers", None),
    ("engram_rows", ("fsdp", "data")),
    ("engram_dim", None),
    ("engram_mem", "tensor"),
)


def make_mesh(axis_sizes: Optional[Mapping[str, int]] = None,
              devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """Mesh with axes ('data', 'fsdp', 'tensor', 'expert').

  `axis_sizes` gives some of the four sizes (missing ones are 1); at most one may be -1, meaning
  "all remaining devices". Default: everything on 'fsdp'. Axes are `AxisType.Auto` so that
  Flax's logical constraints (GSPMD sharding annotations) apply unchanged.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = {a: 1 for a in MESH_AXES}
  sizes.update(axis_sizes or {"fsdp": -1})
  unknown = set(sizes) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"make_mesh: unknown axes {sorted(unknown)}; valid axes are {MESH_AXES}")
  fill = [a for a, s in sizes.items() if s == -1]
  if len(fill) > 1:
    raise ValueError(f"make_mesh: at most one axis may be -1, got {fill}")
  known = int(np.prod([s for s in sizes.values() if s != -1]))
  if any(s < 1 and s != -1 for s in sizes.values()):
    raise ValueError(f"make_mesh: sizes must be >= 1 or -1, got {sizes}")
  if fill:
    if len(devices) % known:
      raise ValueError(f"make_mesh: {len(devices)} devices not divisible by {known} ({sizes})")
    sizes[fill[0]] = len(devices) // known
  total = int(np.prod(list(sizes.values())))
  if total != len(devices):
    raise ValueError(f"make_mesh: axis sizes {sizes} need {total} devices, have {len(devices)}")
  return jax.make_mesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES,
                       axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def logical_to_sharding(tree: Any, mesh: Mesh, rules: LogicalRules = DEFAULT_RULES) -> Any:
  """Boxed variables (`nn.Partitioned`, e.g. from `jax.eval_shape(model.init, ...)`) or logical
  PartitionSpecs -> a matching tree of `NamedSharding`s. Unboxed leaves are replicated.

  A box around an empty subtree stays empty: optax's `multi_transform` puts `MaskedNode`s
  *inside* the boxes of the other partition's leaves, and those must map to no sharding.
  """
  def spec(x):
    if isinstance(x, nn.Partitioned):
      return x.get_partition_spec() if jax.tree.leaves(x.value) else x.value
    return x if isinstance(x, PartitionSpec) else PartitionSpec()
  specs = jax.tree.map(spec, tree, is_leaf=lambda x: isinstance(x, (nn.Partitioned, PartitionSpec)))
  return jax.tree.map(
      lambda s: NamedSharding(mesh, s), nn.logical_to_mesh(specs, rules),
      is_leaf=lambda x: isinstance(x, PartitionSpec))


def logical_spec(names: Sequence[Optional[str]], rules: LogicalRules = DEFAULT_RULES
                 ) -> PartitionSpec:
  """Mesh PartitionSpec of one tensor with logical axes `names` (e.g. batch inputs)."""
  return nn.logical_to_mesh_axes(tuple(names), rules)


def batch_sharding(mesh: Mesh, rules: LogicalRules = DEFAULT_RULES, ndim: int = 2
                   ) -> NamedSharding:
  """Sharding of `[B, T, ...]` batch arrays (batch split, the rest replicated)."""
  return NamedSharding(mesh, logical_spec(("batch", "length") + (None,) * (ndim - 2), rules))


def batch_axes(mesh: Mesh, rules: LogicalRules = DEFAULT_RULES) -> tuple[str, ...]:
  """Mesh axes the 'batch' logical axis splits over, in mesh order."""
  axes = logical_spec(("batch",), rules)[0] or ()
  axes = (axes,) if isinstance(axes, str) else tuple(axes)
  return tuple(a for a in mesh.axis_names if a in axes)


def fit_to_shape(sharding: NamedSharding, shape: Sequence[int]) -> NamedSharding:
  """`sharding` with every dimension whose mesh axes do not divide it left whole.

  `jax.jit` refuses argument and output shardings that split a dimension unevenly; the
  dimensions this leaves whole are small ones (a single kv head under 'tensor', a prime number
  of Engram table rows under 'fsdp' in 'dense_adam' mode).
  """
  spec = tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))
  fitted = []
  for dim, axes in zip(shape, spec):
    names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    size = int(np.prod([sharding.mesh.shape[a] for a in names]))
    fitted.append(axes if dim % size == 0 else None)
  return NamedSharding(sharding.mesh, PartitionSpec(*fitted))
