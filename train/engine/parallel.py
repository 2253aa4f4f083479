"""The device mesh, the partitioning rules, sharded init, batch placement and multi-host start.

One `Mesh` with axes ("data", "fsdp", "tensor") covers every setting: 1 CPU, 8 forced CPU
devices, a GPU, a cluster. Parameters carry logical axis names (models/ uses
`nn.with_logical_partitioning`); `DEFAULT_RULES` maps them to mesh axes:

  batch                    -> ("data", "fsdp")  the batch is split over both
  embed                    -> "fsdp"            FSDP (ZeRO-3): params and optimizer state
  vocab, mlp, heads, kv_heads, hidden -> "tensor"   Megatron tensor parallelism
  everything else          -> replicated

Rules are data: `logical_rules({"embed": None})` switches FSDP sharding off, for instance (the
training loop uses `DEFAULT_RULES`; code of your own passes such overrides). A dimension whose size its mesh axes do not divide
(vocab 37 over tensor=4) is replicated along that dimension instead, with a logged warning, so
training keeps working.

Typical use, in this order:

  maybe_initialize_distributed(config.distributed)  # before any other jax call
  mesh = make_mesh(config.mesh)
  rules = logical_rules({"embed": None})        # or DEFAULT_RULES
  state, state_shardings = init_state(init_fn, mesh, rules, rng)
  step = jax.jit(train_step, in_shardings=(state_shardings, batch_sharding(mesh, rules)),
                 out_shardings=(state_shardings, replicated(mesh)), donate_argnums=0)
  state, metrics = step(state, host_to_global(batch_np, mesh, rules))
"""

from collections.abc import Mapping
import contextlib
import itertools
import logging
import math
import os
from typing import Any, Callable

import flax.core.meta as meta
import flax.linen as nn
import jax
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np

from models import attention_kernels
from models.errors import InputError

_LOG = logging.getLogger(__name__)
AXES = ("data", "fsdp", "tensor")
Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

DEFAULT_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("embed", "fsdp"),
    ("head_dim", None),
    ("position", None),
    ("relpos_buckets", None),
    ("layers", None),
    ("token_types", None),
    ("classes", None),
    ("hidden", "tensor"),
)


def _get(cfg: Any, name: str, default: Any = None) -> Any:
  """A field of a ConfigDict, a dict or an object; `default` when absent."""
  if cfg is None:
    return default
  if isinstance(cfg, Mapping):
    return cfg.get(name, default)
  return getattr(cfg, name, default)


# ---------------------------------------------------------------------------------------------
# Mesh.


def mesh_shape(mesh_cfg: Any, num_devices: int) -> tuple[int, int, int]:
  """(data, fsdp, tensor) from the config (defaults data=-1, fsdp=1, tensor=1); -1 = the rest."""
  sizes = [_get(mesh_cfg, axis, -1 if axis == "data" else 1) for axis in AXES]
  described = " x ".join(f"{axis}={size}" for axis, size in zip(AXES, sizes))
  for axis, size in zip(AXES, sizes):
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or (
        size != -1 and size < 1):
      raise InputError(f"Mesh size {axis}={size!r} must be a positive integer or -1 "
                       "(= the rest of the devices).")
  if sizes.count(-1) > 1:
    raise InputError(f"Mesh {described}: at most one axis may be -1 (= the rest of the "
                     "devices); give the others explicit sizes.")
  known = math.prod(size for size in sizes if size != -1)
  if -1 in sizes:
    if num_devices % known:
      raise InputError(f"Mesh {described}: the explicit sizes multiply to {known}, which does "
                       f"not divide the {num_devices} devices; choose sizes whose product "
                       f"divides {num_devices}.")
    sizes[sizes.index(-1)] = num_devices // known
  elif known != num_devices:
    raise InputError(f"Mesh {described} has {known} devices but there are {num_devices}; "
                     f"choose sizes whose product is {num_devices}, or set one axis to -1.")
  return tuple(int(size) for size in sizes)


def make_mesh(mesh_cfg: Any = None, devices: Any = None) -> Mesh:
  """A Mesh over `devices` (default: all) with axes ("data", "fsdp", "tensor").

  Devices are ordered for fast collectives (`jax.make_mesh`); on multi-slice TPUs the slices
  go along "data", so only data-parallel gradients cross the slower network. Axes are
  `AxisType.Auto`: jit places the computation from the arrays' shardings.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_cfg, len(devices))
  axis_types = (jax.sharding.AxisType.Auto,) * len(AXES)
  num_slices = len({getattr(device, "slice_index", 0) for device in devices})
  if num_slices == 1:
    return jax.make_mesh(shape, AXES, axis_types=axis_types, devices=devices)
  if shape[0] % num_slices:
    raise InputError(f"The devices span {num_slices} slices, which must divide the data axis "
                     f"(data={shape[0]}); make data a multiple of {num_slices}.")
  ici_shape = (shape[0] // num_slices,) + shape[1:]
  device_array = mesh_utils.create_hybrid_device_mesh(ici_shape, (num_slices, 1, 1), devices)
  return Mesh(device_array, AXES, axis_types=axis_types)


# ---------------------------------------------------------------------------------------------
# Logical axis rules and shardings.


def logical_rules(overrides: Any = None) -> Rules:
  """DEFAULT_RULES with `overrides` ({name: mesh axes or None} or (name, axes) pairs) applied.

  An override replaces the default for its logical name; a new name is added at the end.
  """
  if not overrides:
    return DEFAULT_RULES
  pairs = list(overrides.items()) if hasattr(overrides, "items") else list(overrides)
  rules = dict(DEFAULT_RULES)
  for pair in pairs:
    if isinstance(pair, str) or len(pair) != 2:
      raise InputError(f"A partitioning rule must be (logical name, mesh axes), got {pair!r}.")
    name, axes = pair
    names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    unknown = [axis for axis in names if axis not in AXES]
    if unknown:
      raise InputError(f"Partitioning rule {name!r} -> {axes!r} names mesh axes {unknown}; "
                       f"the mesh axes are {AXES}.")
    rules[name] = None if not names else names[0] if len(names) == 1 else names
  return tuple(rules.items())


def _divisible_spec(shape: tuple[int, ...], spec: PartitionSpec, mesh: Mesh,
                    logical_names: tuple, fallbacks: set) -> PartitionSpec:
  """`spec`, keeping for each dimension the longest prefix of its mesh axes that divides it."""
  entries = []
  padded = tuple(spec) + (None,) * (len(shape) - len(spec))
  for size, axes, logical in zip(shape, padded, logical_names):
    names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    kept = names
    while kept and size % math.prod(mesh.shape[axis] for axis in kept):
      kept = kept[:-1]
    if kept != names:
      fallbacks.add(f"{logical}={size} over {'x'.join(names)}="
                    f"{math.prod(mesh.shape[axis] for axis in names)}")
    entries.append(None if not kept else kept[0] if len(kept) == 1 else kept)
  return PartitionSpec(*entries)


def on_mesh(fn: Callable[..., Any], mesh: Mesh, rules: Rules = DEFAULT_RULES, *,
            max_segments_per_row: int | None = None) -> Callable:
  """`fn` traced with `mesh` in context (jax's abstract mesh), so that the fused attention
  kernels run on each device's shard: batch and heads split over the mesh axes `rules` give
  "batch" and "heads" (models.attention_kernels.per_shard). Wrap the function given to jit.

  `max_segments_per_row`: the caller's promise that every row of the segment ids `fn` passes
  to the attention holds at most that many segments, each one run of its id (true of the
  packed batches, see train.run.inputs.BatchLayout), which lets cuDNN's packed attention run
  without a check on the device and picks the packed kernel for that capacity
  (attention_kernels.segments_at_most); None: no promise of its own. These options are part
  of jit's cache key, so the function may be jitted once and called with any others around."""
  batch_axes, head_axes = nn.logical_to_mesh_axes(("batch", "heads"), rules)

  def traced_on_mesh(*args, **kwargs):
    with (jax.sharding.use_abstract_mesh(mesh.abstract_mesh),
          attention_kernels.split_over(batch_axes, head_axes),
          contextlib.nullcontext() if max_segments_per_row is None
          else attention_kernels.segments_at_most(max_segments_per_row)):
      return fn(*args, **kwargs)
  return traced_on_mesh


def replicated(mesh: Mesh) -> NamedSharding:
  """A whole copy on every device (metrics, scalars)."""
  return NamedSharding(mesh, PartitionSpec())


def shardings_for(tree: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
  """NamedShardings for a (possibly abstract) tree whose leaves may carry partitioning boxes.

  `nn.LogicallyPartitioned` leaves go through `rules`, `nn.Partitioned` leaves name mesh axes
  directly, plain leaves are replicated. The result has the structure of the unboxed tree.
  """
  fallbacks: set[str] = set()

  def leaf_sharding(leaf):
    if isinstance(leaf, nn.LogicallyPartitioned):
      spec = nn.logical_to_mesh_axes(leaf.names, rules)
    elif isinstance(leaf, meta.Partitioned):
      spec = PartitionSpec(*leaf.names)
    else:
      return replicated(mesh)
    return NamedSharding(mesh, _divisible_spec(leaf.value.shape, spec, mesh, leaf.names,
                                               fallbacks))

  shardings = jax.tree.map(leaf_sharding, tree,
                           is_leaf=lambda leaf: isinstance(leaf, meta.AxisMetadata))
  if fallbacks:
    _LOG.warning("Replicated along dimensions the mesh does not divide: %s.",
                    ", ".join(sorted(fallbacks)))
  return shardings


def unbox(tree: Any) -> Any:
  """Strips partitioning boxes without adding sharding constraints (out_shardings place it)."""
  return jax.tree.map(
      lambda leaf: leaf.value if isinstance(leaf, meta.Partitioned) else (
          leaf.unbox() if isinstance(leaf, meta.AxisMetadata) else leaf),
      tree, is_leaf=lambda leaf: isinstance(leaf, meta.AxisMetadata))


# ---------------------------------------------------------------------------------------------
# Sharded initialisation.


def abstract_init(init_fn: Callable[..., Any], mesh: Mesh, rules: Rules,
                  *args) -> tuple[Any, Any]:
  """(abstract state, shardings) of `init_fn(*args)`, unboxed, nothing computed.

  The abstract state's leaves are `jax.ShapeDtypeStruct`s carrying their sharding: what orbax
  needs to restore a checkpoint straight onto the mesh.
  """
  boxed = jax.eval_shape(init_fn, *args)
  shardings = shardings_for(boxed, mesh, rules)
  abstract = jax.tree.map(
      lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
      unbox(boxed), shardings)
  return abstract, shardings


def init_state(init_fn: Callable[..., Any], mesh: Mesh, rules: Rules,
               *args) -> tuple[Any, Any]:
  """(state, shardings): `init_fn(*args)` computed directly in its shards, boxes stripped.

  `init_fn` returns a pytree (e.g. a TrainState) whose params, and the optimizer state built
  from them, may carry `nn.LogicallyPartitioned` boxes; `args` are arrays (e.g. a PRNG key).
  No device ever holds the whole unsharded state.
  """
  _, shardings = abstract_init(init_fn, mesh, rules, *args)
  state = jax.jit(lambda *a: unbox(init_fn(*a)), out_shardings=shardings)(*args)
  return state, shardings


# ---------------------------------------------------------------------------------------------
# Batches.


def batch_sharding(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> NamedSharding:
  """The leading (batch) axis split over the rule for "batch": ("data", "fsdp") by default."""
  return NamedSharding(mesh, nn.logical_to_mesh_axes(("batch",), rules))


def data_parallel_size(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> int:
  """How many ways the batch is split: the global batch size must be a multiple of it."""
  axes = batch_sharding(mesh, rules).spec[0]
  names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
  return math.prod(mesh.shape[axis] for axis in names)


def host_to_global(batch: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
  """Host-local numpy batches (a pytree) -> global jax.Arrays sharded along the batch axis.

  Each process passes its own rows; the global batch is their concatenation in process order
  (`jax.make_array_from_process_local_data`). Scalars are replicated.
  """
  sharding = batch_sharding(mesh, rules)
  ways = data_parallel_size(mesh, rules)

  def place(path, local):
    local = np.asarray(local)
    if local.ndim == 0:
      return jax.make_array_from_process_local_data(replicated(mesh), local)
    rows = local.shape[0] * jax.process_count()
    if rows % ways:
      raise InputError(
          f"Batch field {jax.tree_util.keystr(path)} has {rows} rows in all, not a multiple of "
          f"the data-parallel size {ways} (mesh {dict(mesh.shape)}); choose a batch size "
          f"that is a multiple of {ways}.")
    return jax.make_array_from_process_local_data(sharding, local)

  return jax.tree_util.tree_map_with_path(place, batch)


# ---------------------------------------------------------------------------------------------
# Multi-host.


def _coordination_client():
  """jax's coordination-service client (a key-value store shared by the processes), or None
  where jax.distributed did not start one or this jax keeps it elsewhere."""
  try:
    from jax._src import distributed
    client = distributed.global_state.client
  except (ImportError, AttributeError):
    return None
  needed = ("key_value_set", "blocking_key_value_get", "key_value_delete")
  return client if client is not None and all(hasattr(client, n) for n in needed) else None


class ProcessMax:
  """The largest of every process's int, once a call: every process must call it the same
  number of times. The processes exchange the ints through jax's coordination service, host to
  host, so nothing waits for the devices (an all-gather would wait for the step before it);
  where there is no such service, by `multihost_utils.process_allgather`. Its keys are named
  by `name` and the number of ProcessMax made before it in the process (the same on every
  process, which runs the same code), so no two share one."""

  TIMEOUT_MS = 30 * 60 * 1000  # As long as another process may take to reach the same call.
  _made = itertools.count()

  def __init__(self, name: str):
    self.name, self.calls = f"{name}/{next(self._made)}", 0

  def __call__(self, value: int) -> int:
    if jax.process_count() == 1:
      return value
    client = _coordination_client()
    if client is None:
      return int(np.max(multihost_utils.process_allgather(np.int32(value))))
    key = lambda call, process: f"tapete/{self.name}/{call}/{process}"
    client.key_value_set(key(self.calls, jax.process_index()), str(int(value)))
    values = [int(client.blocking_key_value_get(key(self.calls, process), self.TIMEOUT_MS))
              for process in range(jax.process_count())]
    if self.calls:  # Every process has set this call's key, so all have read the last call's.
      client.key_value_delete(key(self.calls - 1, jax.process_index()))
    self.calls += 1
    return max(values)


def _cluster_asks() -> str | None:
  """The environment variable that shows a multi-process launch, if any."""
  env = os.environ
  slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
           "SLURM_LOCALID")
  if env.get("JAX_COORDINATOR_ADDRESS"):
    return "JAX_COORDINATOR_ADDRESS"
  if all(name in env for name in slurm) and int(env["SLURM_NTASKS"]) > 1:
    return "SLURM_NTASKS"
  if int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
    return "OMPI_COMM_WORLD_SIZE"
  for name in ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES"):
    if len(env.get(name, "").split(",")) > 1:
      return name
  if env.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return "MEGASCALE_COORDINATOR_ADDRESS"
  return None


def _connection_fields(dist: Any) -> dict[str, Any]:
  """The set fields among jax.distributed.initialize's; "", 0, -1 and [] count as unset."""
  fields = {"coordinator_address": _get(dist, "coordinator_address") or None,
            "num_processes": _get(dist, "num_processes"),
            "process_id": _get(dist, "process_id"),
            "local_device_ids": _get(dist, "local_device_ids") or None}
  if fields["num_processes"] is not None and fields["num_processes"] <= 0:
    fields["num_processes"] = None
  if fields["process_id"] is not None and fields["process_id"] < 0:
    fields["process_id"] = None
  return {name: value for name, value in fields.items() if value is not None}


def maybe_initialize_distributed(cfg: Any = None) -> bool:
  """Starts multi-process JAX when asked; returns whether it runs distributed. Idempotent.

  `cfg` is the experiment config or its `distributed` part. It starts when `enabled` is True,
  when one of coordinator_address, num_processes, process_id, local_device_ids is set (they
  are passed to `jax.distributed.initialize`, which detects the rest), or when the environment
  shows a multi-process launch: SLURM with several tasks, Open MPI, a multi-host TPU,
  JAX_COORDINATOR_ADDRESS. Call it before any other jax call.
  """
  if jax.distributed.is_initialized():
    return True
  dist = _get(cfg, "distributed", cfg)
  enabled = _get(dist, "enabled")
  if enabled not in (None, True, False):
    raise InputError(f"distributed.enabled must be True or False, got {enabled!r}.")
  kwargs = _connection_fields(dist)
  if not (enabled or kwargs or _cluster_asks()):
    return False
  jax.distributed.initialize(**kwargs)
  _LOG.info("jax.distributed: process %d of %d, %d local devices.", jax.process_index(),
            jax.process_count(), jax.local_device_count())
  return True
