"""Fine-tune Qwen2.5-VL as an image classifier with JAX.

    python -m qvl_jax.train --config configs/demo.yaml [--set training.batch_size=4 ...] [--resume_from PATH|auto]

Sections: set-up (processes, logging) -> data -> mesh and batch geometry -> model
and optimizer (created sharded) -> update and eval steps -> checkpoints (resume)
-> the loop. What a run leaves behind is listed in the README ("What a run writes").
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from qvl_core import flops as flops_lib
from qvl_core import hostmem
from qvl_core.config import RunConfig, load_config
from qvl_core.data import BadRecords, DataError, EvalSource, LabelMap, TrainSource
from qvl_core.hf_checkpoint import CheckpointError, local_checkpoint, resolve_config
from qvl_core.metrics import MetricsLogger
from qvl_core.runs import EvalTally, Progress, StopRequest, export_metadata, process_rss_gb, start_run
from qvl_core.model_config import ConfigError, QwenVLConfig
from qvl_core.schema import SchemaError
from qvl_jax import sharding as sharding_lib
from qvl_jax.checkpointing import Checkpoints
from qvl_jax.classifier import QwenVLClassifier
from qvl_jax.hf_io import load_hf, save_hf
from qvl_jax.input_pipeline import make_loader, read_ahead
from qvl_jax.options import RuntimeOptions
from qvl_jax.pixels import frame_values

log = logging.getLogger("qvl_jax.train")


class TrainingError(RuntimeError):
    """A run that cannot go on (non-finite loss, impossible batch geometry, ...)."""


# ----------------------------------------------------------------------------- set-up


def init_distributed(cfg) -> None:
    """`jax.distributed.initialize` when the config or the environment describes several processes."""
    explicit = cfg.coordinator_address is not None or (cfg.num_processes or 1) > 1
    detected = any(k in os.environ for k in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "JAX_COORDINATOR_ADDRESS"))
    if not (explicit or detected):
        return
    if jax.distributed.is_initialized():
        return
    # Cross-process collectives between CPU devices need gloo; the setting only concerns the CPU backend.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {k: v for k, v in dataclasses.asdict(cfg).items() if v is not None}
    jax.distributed.initialize(**kwargs)


# ----------------------------------------------------------------------------- model


def model_config(config: RunConfig, label_map: LabelMap) -> tuple[QwenVLConfig, list | None]:
    """The classifier's config with the data's labels; checks num_labels against data and stored head."""
    m = config.model
    num_labels = label_map.num_labels
    if m.pretrained_name is not None:
        path = local_checkpoint(m.pretrained_name)  # a directory as is; a hub id (e.g. from config.yaml) fetched
        cfg, files = resolve_config(path, num_labels=num_labels, mode=m.mode, pooling=m.resolved_pooling)
        stored = cfg.head.id2label
        if stored is not None and tuple(stored) != label_map.names:
            raise CheckpointError(f"{path}: its head's labels ({', '.join(stored[:5])}, ...) are not this run's "
                                  f"({', '.join(label_map.names[:5])}, ...): same count, different classes or order")
        return cfg.with_head(id2label=label_map.names), files
    try:
        cfg = QwenVLConfig.from_hf_dict(m.config, source="model.config")
        return cfg.with_head(num_labels=num_labels, mode=m.mode, pooling=m.resolved_pooling,
                             id2label=label_map.names), None
    except ConfigError as e:
        raise SchemaError(str(e)) from None


def trainable_filter(m) -> Any:
    """nnx filter: which parameters train, by the freeze switches."""

    def trains(path, _value) -> bool:
        top = str(path[0])
        if top == "visual":
            return not (m.freeze_merger if str(path[1]) == "merger" else m.freeze_vision)
        if top == "language_model":
            return not m.freeze_decoder
        return True

    return trains


def create_model(config: RunConfig, cfg: QwenVLConfig, opts: RuntimeOptions, layout: sharding_lib.Layout):
    """The classifier with every parameter already in its sharding (never whole on one device)."""
    abstract = nnx.eval_shape(lambda: QwenVLClassifier(cfg, opts=opts, rngs=nnx.Rngs(config.training.seed)))
    graphdef, abstract_state = nnx.split(abstract)
    shardings = layout.params(abstract_state)
    if config.model.pretrained_name is None:
        def init():
            return nnx.split(QwenVLClassifier(cfg, opts=opts, rngs=nnx.Rngs(config.training.seed)))[1]

        state = jax.jit(init, out_shardings=shardings)()
        return nnx.merge(graphdef, state)
    by_path = {".".join(str(p) for p in path): s for path, s in nnx.to_flat_state(shardings)}

    def place(path: str, array: np.ndarray):
        sharding = by_path[path]
        sharding = sharding.get_value() if hasattr(sharding, "get_value") else sharding
        return jax.make_array_from_callback(array.shape, sharding, lambda idx: array[idx])

    model = load_hf(config.model.pretrained_name, num_labels=cfg.head.num_labels, mode=cfg.head.mode,
                    pooling=cfg.head.pooling, opts=opts, head_seed=config.model.head_seed, place=place)
    model.config = cfg  # with the run's label names
    return model


def abstract_state(config: RunConfig, cfg: QwenVLConfig, opts: RuntimeOptions, layout: sharding_lib.Layout):
    """(graphdef, {params, frozen, opt_state} as sharded ShapeDtypeStructs): a restore target, nothing allocated."""
    abstract = nnx.eval_shape(lambda: QwenVLClassifier(cfg, opts=opts, rngs=nnx.Rngs(0)))
    graphdef, params, frozen = nnx.split(abstract, trainable_filter(config.model), ...)
    tx, _ = make_optimizer(config, params, total_steps=1)
    opt_state = jax.eval_shape(tx.init, params)

    def place(tree, shardings):
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)

    return graphdef, {"params": place(params, layout.params(params)), "frozen": place(frozen, layout.params(frozen)),
                      "opt_state": place(opt_state, layout.optimizer(opt_state))}


# ----------------------------------------------------------------------------- optimizer


def lr_schedule(t, peak: float, total_steps: int):
    warmup = min(t.warmup_steps, max(total_steps - 1, 0))
    end = peak * t.min_lr_ratio
    if t.lr_schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(total_steps, warmup + 1), end)
    after = (optax.constant_schedule(peak) if t.lr_schedule == "constant"
             else optax.linear_schedule(peak, end, max(total_steps - warmup, 1)))
    return optax.join_schedules([optax.linear_schedule(0.0, peak, max(warmup, 1)), after], [warmup])


def make_optimizer(config: RunConfig, params, total_steps: int):
    """AdamW (warm-up + decay, decoupled weight decay on matrices only), clipping, per-group learning rates."""
    t = config.training
    decay_mask = jax.tree.map(lambda x: x.ndim > 1, params)

    def adamw(peak):
        return optax.adamw(lr_schedule(t, peak, total_steps), b1=t.adam_beta1, b2=t.adam_beta2, eps=t.adam_epsilon,
                           weight_decay=t.weight_decay, mask=decay_mask)

    if t.vision_learning_rate is not None and t.vision_learning_rate != t.learning_rate:
        labels = jax.tree_util.tree_map_with_path(
            lambda p, _: "vision" if str(p[0].key) == "visual" and str(p[1].key) != "merger" else "rest", params)
        tx = optax.multi_transform({"vision": adamw(t.vision_learning_rate), "rest": adamw(t.learning_rate)}, labels)
    else:
        tx = adamw(t.learning_rate)
    if t.max_grad_norm is not None:
        tx = optax.chain(optax.clip_by_global_norm(t.max_grad_norm), tx)
    if t.skip_nonfinite:
        tx = optax.apply_if_finite(tx, max_consecutive_errors=2**31 - 1)
    return tx, lr_schedule(t, t.learning_rate, total_steps)


# ----------------------------------------------------------------------------- steps


def _logits(graphdef, params, frozen, patches, grid, dtype):
    model = nnx.merge(graphdef, params, frozen)
    return model(frame_values(patches, dtype), grid).logits


def _example_losses(logits, labels, label_smoothing: float = 0.0):
    targets = jax.nn.one_hot(labels, logits.shape[-1])
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    return optax.softmax_cross_entropy(logits, targets)


def make_eval_step(graphdef, layout, *, grid, dtype, top_k: int = 5):
    """Jitted `(params, frozen, batch) -> (loss [B], top-k classes [B, k])` (best first), split over `data`."""

    def eval_step(params, frozen, batch):
        logits = _logits(graphdef, params, frozen, batch["patches"], grid, dtype)
        k = min(top_k, logits.shape[-1])
        return _example_losses(logits, batch["label"]), jax.lax.top_k(logits, k)[1].astype(jnp.int32)

    return jax.jit(eval_step, out_shardings=(layout.batch(1), layout.batch(2)))


def make_train_step(graphdef, tx, layout, *, grid, dtype, label_smoothing, accum, param_shardings, grad_shardings,
                    opt_shardings):
    """Jitted `(params, frozen, opt_state, batch) -> (params, opt_state, measurements)`; params and
    optimizer state donated. `batch` leaves are [accum, micro, ...]; gradients are summed over the
    micro-batches (constrained to `grad_shardings`: reduce-scatter under zero2/fsdp) and divided by the
    number of valid examples of the whole batch."""

    def loss_sum(params, frozen, micro):
        logits = _logits(graphdef, params, frozen, micro["patches"], grid, dtype)
        w = micro["valid"].astype(jnp.float32)
        ce = _example_losses(logits, micro["label"], label_smoothing)
        correct = (jnp.argmax(logits, -1) == micro["label"]).astype(jnp.float32)
        return jnp.sum(ce * w), (jnp.sum(w), jnp.sum(correct * w))

    def train_step(params, frozen, opt_state, batch):
        def micro_step(carry, micro):
            grads, total, count, correct = carry
            (s, (n, c)), g = jax.value_and_grad(loss_sum, has_aux=True)(params, frozen, micro)
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
        grad_norm = optax.global_norm(grads)
        measurements = {
            "loss": loss,
            "accuracy": correct / denom,
            "examples": count,
            "grad_norm": grad_norm,
            "finite": jnp.isfinite(loss) & jnp.isfinite(grad_norm),
        }
        return new_params, new_opt_state, measurements

    return jax.jit(train_step, donate_argnums=(0, 2),
                   out_shardings=(param_shardings, opt_shardings, layout.replicated()))


# ----------------------------------------------------------------------------- host <-> device


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


# ----------------------------------------------------------------------------- evaluation


def evaluate(state, eval_step, data, sources, layout, config, step, run_dir) -> EvalTally:
    """Loss, top-1 and top-5 accuracy per data set and overall (`.metrics()`); writes the confusion matrix."""
    tally = EvalTally(data.label_map.names)
    procs, me = jax.process_count(), jax.process_index()
    for name, (source, global_batch) in sources.items():
        loader = make_loader(source, batch_size=global_batch // procs, process_index=me, process_count=procs,
                             num_workers=0, num_threads=max(1, config.training.dataloader_num_workers or 1),
                             drop_remainder=False)
        for batch in loader:
            arrays = to_global(batch, layout, accum=None)
            losses, preds = eval_step(state["params"], state["frozen"], arrays)
            tally.add(name, to_host(losses), to_host(preds), to_host(arrays["label"]), to_host(arrays["valid"]))
    if me == 0:
        name = f"step{step}" if isinstance(step, int) else str(step)
        tally.write_confusion(run_dir / "eval" / f"confusion_{name}.csv")
    return tally


# ----------------------------------------------------------------------------- the run


def _any_process(flag: bool) -> bool:
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(multihost_utils.process_allgather(np.int32(flag)).max())


def run(config: RunConfig, *, resume_from: str | None = None, stop_after: int | None = None) -> dict[str, Any]:
    """Trains per `config`; returns the final metrics (and where the run went).

    `stop_after`: behave as if SIGTERM arrived after that step (save, return), as tests of resumption need.
    """
    # --- processes, output folder, logging
    init_distributed(config.distributed)
    run_dir = config.run_dir
    me, procs = jax.process_index(), jax.process_count()
    t = config.training

    # --- data (every split checked before anything heavy)
    data, config = start_run(config, me, "jax", resume_from=resume_from)
    label_map = data.label_map

    # --- mesh and batch geometry
    mesh = sharding_lib.make_mesh()
    layout = sharding_lib.Layout(mesh, config.sharding.strategy, config.sharding.min_shard_size)
    devices = mesh.size
    micro_global = t.batch_size * devices
    global_batch = micro_global * t.gradient_accumulation_steps
    if t.global_batch_size is not None and t.global_batch_size != global_batch:
        if t.global_batch_size % (devices * t.gradient_accumulation_steps):
            raise SchemaError(f"training.global_batch_size {t.global_batch_size} does not divide over {devices} devices "
                              f"x {t.gradient_accumulation_steps} accumulation steps")
        raise SchemaError(f"training.global_batch_size {t.global_batch_size} != batch_size {t.batch_size} x "
                          f"{devices} devices x {t.gradient_accumulation_steps} accumulation = {global_batch}")
    epoch_length = TrainSource(data, seed=t.seed).epoch_length
    total_steps = t.max_steps or max(1, math.ceil(t.num_epochs * epoch_length / global_batch))
    log.info("%d process(es), %d device(s) (%s); strategy %s; global batch %d = %d per device x %d devices x %d "
             "accumulation; %d steps (%.2f epochs of %d records)", procs, devices, jax.devices()[0].device_kind,
             layout.strategy, global_batch, t.batch_size, devices, t.gradient_accumulation_steps, total_steps,
             total_steps * global_batch / epoch_length, epoch_length)
    if jax.devices()[0].platform == "cpu":
        log.info("host malloc: %s", hostmem.describe(*hostmem.status()))

    # --- model and optimizer, created sharded
    cfg, _ = model_config(config, label_map)
    opts = RuntimeOptions(param_dtype=config.model.param_dtype, dtype=config.model.compute_dtype,
                          attention="auto" if t.memory_efficient_attention else "xla", remat=t.gradient_checkpointing)
    model = create_model(config, cfg, opts, layout)
    graphdef, params, frozen = nnx.split(model, trainable_filter(config.model), ...)
    del model
    tx, schedule = make_optimizer(config, params, total_steps)
    param_sh = jax.tree.map(lambda x: x.sharding, params)
    frozen_sh = jax.tree.map(lambda x: x.sharding, frozen)
    opt_sh = layout.optimizer(jax.eval_shape(tx.init, params))
    opt_state = jax.jit(tx.init, out_shardings=opt_sh)(params)
    grad_sh = layout.optimizer(params) if layout.strategy != "dp" else param_sh
    train_step = make_train_step(graphdef, tx, layout, grid=config.data.grid_thw, dtype=opts.jnp_dtype,
                                 label_smoothing=t.label_smoothing, accum=t.gradient_accumulation_steps,
                                 param_shardings=param_sh, grad_shardings=grad_sh, opt_shardings=opt_sh)
    eval_step = make_eval_step(graphdef, layout, grid=config.data.grid_thw, dtype=opts.jnp_dtype)
    summary = {
        "strategy": layout.strategy, "devices": devices,
        "params_bytes_per_device": sharding_lib.bytes_per_device(params, param_sh)
        + sharding_lib.bytes_per_device(frozen, frozen_sh),
        "grads_bytes_per_device": sharding_lib.bytes_per_device(params, grad_sh),
        "optimizer_bytes_per_device": sharding_lib.bytes_per_device(opt_state, opt_sh),
        "trainable_params": int(sum(x.size for x in jax.tree.leaves(params))),
        "frozen_params": int(sum(x.size for x in jax.tree.leaves(frozen))),
    }
    log.info("sharding: %s", json.dumps(summary))
    if me == 0:
        (run_dir / "logs" / "sharding.json").write_text(json.dumps(summary, indent=1) + "\n")

    # --- FLOPs and MFU
    step_flops = flops_lib.train_flops_per_sample(cfg, config.data.grid_thw,
                                                  trainable=config.model.trainable_parts) * global_batch
    peak = flops_lib.peak_tflops(jax.devices()[0].device_kind, config.perf.peak_tflops)
    if peak is None:
        log.info("perf/mfu is null: no known peak for device %r (set perf.peak_tflops)", jax.devices()[0].device_kind)

    # --- data loaders
    spare = read_ahead(t.dataloader_num_workers)  # decoded, never trained on: see read_ahead
    train_source = TrainSource(data, seed=t.seed, num_records=(total_steps + spare) * global_batch)
    train_iter = iter(make_loader(train_source, batch_size=global_batch // procs, process_index=me,
                                  process_count=procs, num_workers=t.dataloader_num_workers))
    eval_global = (t.eval_batch_size or t.batch_size) * devices
    eval_sources = {name: (EvalSource(data, name, pad_to=eval_global), eval_global) for name in data.eval}
    bad = BadRecords(data, log)

    # --- checkpoints and resume
    ckpt = Checkpoints(run_dir / "checkpoints", keep=config.output.keep_checkpoints,
                       async_save=config.output.async_checkpointing)
    state = {"params": params, "frozen": frozen, "opt_state": opt_state}
    start_step, best = 0, {"accuracy": -1.0, "step": None}
    source_dir = ckpt.resolve(resume_from, run_dir)
    if source_dir is not None:
        state, meta, iterator_restored = ckpt.restore(source_dir, state, train_iter)
        label_map.check_compatible(LabelMap.from_json(meta["label_map"]), f"checkpoint {source_dir}")
        if meta["global_batch"] != global_batch:
            raise SchemaError(f"checkpoint {source_dir} was trained with a global batch of {meta['global_batch']}, "
                              f"this run has {global_batch}: set training.batch_size so that batch_size x devices x "
                              f"accumulation is {meta['global_batch']}")
        start_step, best = meta["step"], meta["best"]
        if not iterator_restored:
            train_iter.close()
            train_iter = iter(make_loader(train_source, batch_size=global_batch // procs, process_index=me,
                                          process_count=procs, num_workers=t.dataloader_num_workers,
                                          start_batch=start_step))
        log.info("resumed from %s at step %d", source_dir, start_step)

    saved_at = [start_step]

    def save(step: int, eval_metrics: dict | None = None) -> None:
        if saved_at[0] == step:
            return
        saved_at[0] = step
        meta = {"step": step, "best": best, "label_map": label_map.to_json(), "config": config.to_dict(),
                "total_steps": total_steps, "global_batch": global_batch}
        with progress.paused():
            ckpt.save(step, state, train_iter, meta, accuracy=None if eval_metrics is None
                      else eval_metrics["eval/overall_accuracy"])

    # --- the loop
    logger = MetricsLogger(run_dir, config=config.to_dict(), wandb_cfg=config.monitor.wandb, enabled=me == 0,
                           run_name=config.output.run_name)
    freq = config.monitor.all_freq
    progress = Progress(logger, freq, total_steps=total_steps, start_step=start_step, global_batch=global_batch,
                        epoch_length=epoch_length, lr_at=schedule, step_flops=step_flops, devices=devices, peak=peak,
                        memory_gb=device_memory_gb, show_bar=me == 0 and config.monitor.progress_bar)
    last_eval: dict[str, float] = {}
    pending = None  # (step, measurements) of the step in flight: fetched one step later to keep dispatch async
    final_metrics: dict[str, Any] = {}
    step = start_step

    def consume(done_step: int, measurements) -> None:
        m = {k: float(v) for k, v in jax.device_get(measurements).items()}
        if not m["finite"]:
            if not t.skip_nonfinite:
                raise TrainingError(f"step {done_step}: non-finite loss ({m['loss']}) or gradient norm "
                                    f"({m['grad_norm']}); set training.skip_nonfinite: true to skip such updates")
            log.warning("step %d: non-finite loss/gradients, update skipped (%d so far)", done_step,
                        progress.skipped + 1)
        progress.update(done_step, m if m["finite"] else None)

    def run_eval(at_step: int) -> dict[str, float]:
        nonlocal best
        with progress.paused():
            metrics = evaluate(state, eval_step, data, eval_sources, layout, config, at_step, run_dir).metrics()
        if metrics["eval/overall_accuracy"] > best["accuracy"]:
            best = {"accuracy": metrics["eval/overall_accuracy"], "step": at_step}
        metrics["best_overall_accuracy"] = best["accuracy"]
        metrics["best_model_step"] = best["step"]
        logger.log(at_step, metrics)
        log.info("step %d eval: %s", at_step, ", ".join(f"{k.split('/')[-1]}={v:.4f}" for k, v in metrics.items()
                                                         if k.startswith("eval/")))
        return metrics

    try:
        with StopRequest(_any_process) as stop:
            while step < total_steps:
                batch = next(train_iter)
                bad.update(batch)
                arrays = to_global(batch, layout, accum=t.gradient_accumulation_steps)
                del batch  # with grain's workers its arrays are shared memory: released now, not at exit
                new_params, new_opt, measurements = train_step(state["params"], state["frozen"],
                                                               state["opt_state"], arrays)
                state["params"], state["opt_state"] = new_params, new_opt
                step += 1
                if pending is not None:
                    consume(*pending)
                pending = (step, measurements)
                evaluated = None
                if eval_sources and (step % freq.eval_log_freq == 0 or step == total_steps):
                    consume(*pending)
                    pending = None
                    evaluated = last_eval = run_eval(step)
                if step % config.output.save_freq == 0 or step == total_steps or evaluated is not None and \
                        best["step"] == step:
                    if pending is not None:
                        consume(*pending)
                        pending = None
                    save(step, evaluated)
                if (stop.agreed() or step == stop_after) and step < total_steps:
                    if pending is not None:
                        consume(*pending)
                        pending = None
                    save(step)
                    log.warning("stopped at step %d on request; resume with --resume_from auto", step)
                    break
            if pending is not None:
                consume(*pending)
            ckpt.wait()
        if config.output.export_hf and step == total_steps:
            export_hf(graphdef, state, run_dir / "hf_final", config, label_map)
            log.info("wrote the classifier in HF format to %s", run_dir / "hf_final")
            best_dir = run_dir / "checkpoints" / str(best["step"])
            if best["step"] is not None and best["step"] != step and best_dir.is_dir():
                best_state, _, _ = ckpt.restore(best_dir, state)
                export_hf(graphdef, best_state, run_dir / "hf_best", config, label_map)
                log.info("wrote the best classifier (step %d) in HF format to %s", best["step"], run_dir / "hf_best")
    finally:
        train_iter.close()  # stops grain's worker processes and frees the shared memory of unread batches
        progress.close()
        logger.close()
        ckpt.close()

    final_metrics.update(last_eval)
    final_metrics.update({"step": step, "run_dir": str(run_dir), "best": best, "skipped_updates": progress.skipped,
                          "bad_images": bad.counts()})
    return final_metrics


def export_hf(graphdef, state, path: Path, config: RunConfig, label_map: LabelMap) -> None:
    """The classifier as an HF directory, with the image geometry it was trained at and the label map."""
    params = jax.tree.map(to_host, state["params"])
    frozen = jax.tree.map(to_host, state["frozen"])
    if jax.process_index() == 0:
        save_hf(nnx.merge(graphdef, params, frozen), path, extra=export_metadata(config, label_map))
        label_map.save(Path(path) / "label_map.json")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m qvl_jax.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML run config (see configs/)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set training.batch_size=4 (repeatable)")
    parser.add_argument("--stop_after_steps", type=int, default=None, metavar="N",
                        help="save a checkpoint and exit after step N (e.g. to fit a scheduler's time slot); "
                             "continue with --resume_from auto")
    parser.add_argument("--resume_from", default=None, metavar="PATH|auto",
                        help="a checkpoint step directory, a checkpoints/ or run directory, or 'auto' "
                             "(the latest checkpoint of this run's output directory, if any)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        config = load_config(args.config, args.set)
        result = run(config, resume_from=args.resume_from, stop_after=args.stop_after_steps)
    except (SchemaError, DataError, CheckpointError, TrainingError) as e:
        logging.getLogger("qvl_jax.train").error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = {k: v for k, v in result.items() if k.startswith("eval/") and k.endswith("accuracy")}
    print(json.dumps({"run_dir": result["run_dir"], "step": result["step"], **summary,
                      "best": result["best"]}, indent=1))
    return 0


if __name__ == "__main__":
    hostmem.use_huge_page_malloc()
    sys.exit(main())
