"""The jitted train and eval steps, and moving batches between the host and the mesh.

    train_step = make_train_step(graphdef, tx, layout, shardings, grid=..., dtype=..., label_smoothing=...,
                                 accum=..., compute_dtypes=...)       # shardings, dtypes: qvl_jax.state
    trained, measurements = train_step(trained, frozen, to_global(batch, layout, accum=...))
    # trained: {"params", "compute", "opt_state"} (TRAINED), donated and returned updated

The trainer, `qvl_jax.evaluate` and the benchmarks all run these functions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from qvl_core.runs import EvalTally, process_rss_gb
from qvl_jax.input_pipeline import make_loader
from qvl_jax.pixels import frame_values

TRAINED = ("params", "compute", "opt_state")  # the parts of a training state a train step updates


def weights(state: dict):
    """The trainable weights the model computes with: the compute copy when the state keeps one."""
    return state["params"] if state.get("compute") is None else state["compute"]


def _logits(graphdef, params, frozen, patches, grid, dtype, mesh):
    # the mesh as the ambient one while the model is traced: `qvl_jax.attention` lays cuDNN's operands out by it
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        model = nnx.merge(graphdef, params, frozen)
        return model(frame_values(patches, dtype), grid).logits


def example_losses(logits, labels, label_smoothing: float = 0.0):
    """Cross-entropy per example: `logits [B, C]`, `labels [B]` -> `[B]`."""
    targets = jax.nn.one_hot(labels, logits.shape[-1])
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    return optax.softmax_cross_entropy(logits, targets)


def make_eval_step(graphdef, layout, *, grid, dtype, top_k: int = 5):
    """Jitted `(params, frozen, batch) -> (loss [B], top-k classes [B, k])` (best first), split over `data`."""

    def eval_step(params, frozen, batch):
        logits = _logits(graphdef, params, frozen, batch["patches"], grid, dtype, layout.mesh)
        k = min(top_k, logits.shape[-1])
        return example_losses(logits, batch["label"]), jax.lax.top_k(logits, k)[1].astype(jnp.int32)

    return jax.jit(eval_step, out_shardings=(layout.batch(1), layout.batch(2)))


def make_train_step(graphdef, tx, layout, shardings: dict, *, grid, dtype, label_smoothing, accum,
                    compute_dtypes=None, return_grads: bool = False):
    """Jitted `(trained, frozen, batch) -> (trained, measurements)`, `trained` = {params, compute, opt_state}
    (donated); `shardings` and `compute_dtypes` as `qvl_jax.state` makes them. `batch` leaves are
    [accum, micro, ...]; gradients (with respect to the compute copy when there is one, in the parameters'
    dtype) are summed over the micro-batches (constrained to `shardings["grads"]`: reduce-scatter under
    zero2/fsdp) and divided by the number of valid examples of the whole batch. With a compute copy, the
    updated master shard is cast and all-gathered into the next copy.

    `return_grads`: measurements["grads"] holds the gradients as the step laid them out (their output
    sharding is left to XLA, so it shows what the constraint produced): for tests and memory plans."""
    grad_shardings = shardings["grads"]

    def loss_sum(weights, frozen, micro):
        logits = _logits(graphdef, weights, frozen, micro["patches"], grid, dtype, layout.mesh)
        w = micro["valid"].astype(jnp.float32)
        ce = example_losses(logits, micro["label"], label_smoothing)
        correct = (jnp.argmax(logits, -1) == micro["label"]).astype(jnp.float32)
        return jnp.sum(ce * w), (jnp.sum(w), jnp.sum(correct * w))

    def train_step(trained, frozen, batch):
        params, compute, opt_state = (trained[k] for k in TRAINED)
        used = params if compute is None else compute

        def micro_step(carry, micro):
            grads, total, count, correct = carry
            (s, (n, c)), g = jax.value_and_grad(loss_sum, has_aux=True)(used, frozen, micro)
            # d/d(compute copy) is d/d(master): the model's cast has the identity as its gradient
            g = jax.tree.map(lambda g, p: g.astype(p.dtype), g, params)
            g = jax.lax.with_sharding_constraint(g, grad_shardings)
            return (jax.tree.map(jnp.add, grads, g), total + s, count + n, correct + c), None

        zeros = jax.lax.with_sharding_constraint(jax.tree.map(jnp.zeros_like, params), grad_shardings)
        init = (zeros, jnp.float32(0), jnp.float32(0), jnp.float32(0))
        if accum == 1:
            (grads, total, count, correct), _ = micro_step(init, jax.tree.map(lambda x: x[0], batch))
        else:
            (grads, total, count, correct), _ = jax.lax.scan(micro_step, init, batch)
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        loss = total / denom
        updates, new_opt_state = tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        new_compute = None
        if compute is not None:  # cast where the new master shard is, then gathered (the output sharding)
            new_compute = jax.tree.map(lambda p, d, s: jax.lax.with_sharding_constraint(p.astype(d), s),
                                       new_params, compute_dtypes, shardings["params"])
        grad_norm = optax.global_norm(grads)
        measurements = {
            "loss": loss,
            "accuracy": correct / denom,
            "examples": count,
            "grad_norm": grad_norm,
            "finite": jnp.isfinite(loss) & jnp.isfinite(grad_norm),
        }
        if return_grads:
            measurements["grads"] = grads
        return {"params": new_params, "compute": new_compute, "opt_state": new_opt_state}, measurements

    measured = layout.replicated()
    if return_grads:
        measured = {k: layout.replicated() for k in ("loss", "accuracy", "examples", "grad_norm", "finite")}
        measured["grads"] = jax.tree.map(lambda _: None, shardings["params"])
    trained = {k: shardings[k] for k in TRAINED}
    return jax.jit(train_step, donate_argnums=(0,), out_shardings=(trained, measured))


def to_global(batch: dict, layout, *, accum: int | None) -> dict:
    """A process-local numpy batch -> global arrays split over `data` (keys the model needs only)."""
    # On a CPU a global array may alias the numpy buffer it was made from (an aligned one), which for a batch from
    # grain's workers is shared memory that would then outlive the loader: copied there. An accelerator copies
    # the batch to its memory anyway.
    copy = layout.mesh.devices.flat[0].platform == "cpu"
    out = {}
    for key in ("patches", "label", "valid"):
        local = np.array(batch[key]) if copy else np.asarray(batch[key])
        if accum is not None:
            local = local.reshape(accum, -1, *local.shape[1:])
            sharding = layout.batch(local.ndim, axis=1)
        else:
            sharding = layout.batch(local.ndim, axis=0)
        out[key] = jax.make_array_from_process_local_data(sharding, local)
    return out


def to_host(x) -> np.ndarray:
    """A (possibly multi-process) array as a full numpy array on this host."""
    if x.is_fully_addressable:
        return np.asarray(x)
    if x.sharding.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def device_memory_gb() -> float:
    """Device memory in use on this process's first device; on CPU, the process's resident set (RSS)."""
    stats = jax.local_devices()[0].memory_stats() or {}
    return stats["bytes_in_use"] / 1e9 if "bytes_in_use" in stats else process_rss_gb()


def evaluate(state, eval_step, data, sources, layout, *, num_threads: int = 1) -> EvalTally:
    """Loss, top-1 and top-5 accuracy per data set and overall (`.metrics()`) and the confusion matrix.

    `sources`: data set name -> (EvalSource, global batch)."""
    tally = EvalTally(data.label_map.names)
    procs, me = jax.process_count(), jax.process_index()
    for name, (source, global_batch) in sources.items():
        loader = make_loader(source, batch_size=global_batch // procs, process_index=me, process_count=procs,
                             num_workers=0, num_threads=num_threads, drop_remainder=False)
        for batch in loader:
            arrays = to_global(batch, layout, accum=None)
            losses, preds = eval_step(weights(state), state["frozen"], arrays)
            tally.add(name, to_host(losses), to_host(preds), to_host(arrays["label"]), to_host(arrays["valid"]))
    return tally
