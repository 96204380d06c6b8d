"""The mesh and the layout of parameters, gradients and optimizer state on it.

One `data` axis over every device of every process. Strategies (docs/architecture.md):

    dp     params, grads, optimizer state replicated; XLA all-reduces the grads
    zero2  params replicated; grads and AdamW moments sharded over `data`, so XLA
           reduce-scatters the grads, each device updates its shard, and the new
           params are all-gathered back (the `out_shardings` of the step)
    fsdp   params sharded too (ZeRO-3): gathered per use inside the step

An array is sharded along its largest dimension divisible by the axis size;
arrays under `min_shard_size` elements (biases, norms, the AdamW step count)
stay replicated. Everything here is sharding metadata: XLA writes the collectives.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA = "data"


def init_distributed(cfg) -> None:
    """`jax.distributed.initialize` when the config (`DistributedConfig`) or the environment describes several
    processes; then `jax.devices()` (and so the mesh) spans every device of every process."""
    explicit = cfg.coordinator_address is not None or (cfg.num_processes or 1) > 1
    detected = any(k in os.environ for k in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "JAX_COORDINATOR_ADDRESS"))
    if not (explicit or detected) or jax.distributed.is_initialized():
        return
    # Cross-process collectives between CPU devices need gloo; the setting only concerns the CPU backend.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**{k: v for k, v in dataclasses.asdict(cfg).items() if v is not None})


def make_mesh(devices: list | None = None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA,), axis_types=(AxisType.Auto,))


def shard_spec(shape: tuple[int, ...], axis_size: int, min_size: int) -> P:
    """`P` with `data` on the largest dimension it divides, or replicated."""
    if axis_size == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return P()
    dims = sorted(range(len(shape)), key=lambda d: -shape[d])
    for d in dims:
        if shape[d] % axis_size == 0:
            spec = [None] * len(shape)
            spec[d] = DATA
            return P(*spec)
    return P()


@dataclasses.dataclass(frozen=True)
class Layout:
    """Shardings for one strategy on one mesh."""

    mesh: Mesh
    strategy: str
    min_shard_size: int = 2**14

    @property
    def axis_size(self) -> int:
        return self.mesh.shape[DATA]

    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    def sharded(self, shape) -> NamedSharding:
        return NamedSharding(self.mesh, shard_spec(tuple(shape), self.axis_size, self.min_shard_size))

    def params(self, tree: Any) -> Any:
        """Shardings of a parameter pytree (of arrays or ShapeDtypeStructs)."""
        if self.strategy == "fsdp":
            return jax.tree.map(lambda x: self.sharded(x.shape), tree)
        return jax.tree.map(lambda x: self.replicated(), tree)

    def optimizer(self, tree: Any) -> Any:
        """Shardings of the optimizer state (and of the gradients before the update)."""
        if self.strategy == "dp":
            return jax.tree.map(lambda x: self.replicated(), tree)
        return jax.tree.map(lambda x: self.sharded(x.shape), tree)

    def batch(self, ndim: int, axis: int = 0) -> NamedSharding:
        """Examples split over `data` along `axis`."""
        spec = [None] * ndim
        spec[axis] = DATA
        return NamedSharding(self.mesh, P(*spec))


def bytes_per_device(tree: Any, shardings: Any) -> int:
    """Bytes one device holds of `tree` laid out by `shardings` (the largest shard per array)."""
    total = 0
    for leaf, sharding in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings, is_leaf=lambda s: isinstance(s, NamedSharding))):
        shape = sharding.shard_shape(tuple(leaf.shape))
        total += int(np.prod(shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
    return total


def held_bytes(tree: Any) -> int:
    """Bytes this process's first device holds of `tree`'s arrays: their shards as placed, not as requested."""
    device = jax.local_devices()[0]
    return sum(shard.data.nbytes for x in jax.tree.leaves(tree) for shard in x.addressable_shards
               if shard.device == device)


def split_over_examples(x):
    """`x [B, ...]` constrained to a split over the ambient mesh's `data` axis along B (the train and eval steps
    trace the model under their mesh), when there is one and it divides B; else `x` as it is.

    Activations between blocks, and cuDNN attention's operands, are pinned this way: under fsdp, sharding
    propagation would otherwise carry the weights' split into the activations (splitting features or heads and
    moving activations between devices) instead of gathering each weight where it is used."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or DATA not in mesh.axis_names or x.shape[0] % mesh.shape[DATA]:
        return x
    return jax.lax.with_sharding_constraint(x, P(DATA))
