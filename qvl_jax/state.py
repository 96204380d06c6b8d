"""The training state of a run, built from its config: model config, what trains, the optimizer, sharded creation.

    cfg, _ = model_config(config, label_map)              # the classifier's QwenVLConfig (labels checked)
    model = create_model(config, cfg, opts, layout)       # every parameter created in its sharding
    graphdef, params, frozen = nnx.split(model, trainable_filter(config.model), ...)
    tx, schedule = make_optimizer(config, params, total_steps)
    shardings = state_shardings(layout, params, tx)       # params, grads (as the step lays them out), opt_state
    graphdef, template = abstract_state(config, cfg, opts, layout)   # a restore target, nothing allocated

The trainer, `qvl_jax.evaluate` and the benchmarks build their state here.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import optax
from flax import nnx

from qvl_core import parts
from qvl_core.config import RunConfig
from qvl_core.data import LabelMap
from qvl_core.hf_checkpoint import CheckpointError, local_checkpoint, resolve_config
from qvl_core.model_config import ConfigError, QwenVLConfig
from qvl_core.schema import SchemaError
from qvl_jax import param_map
from qvl_jax import sharding as sharding_lib
from qvl_jax.classifier import QwenVLClassifier
from qvl_jax.hf_io import load_hf
from qvl_jax.options import RuntimeOptions


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


def hf_key(path) -> str:
    """An NNX state path (of `nnx.split` filters or of `jax.tree_util` over a State) -> the weight's HF key
    (the key `qvl_core.parts` is written in)."""
    # A tree path ends in the Variable's `.value` attribute, which is not part of the name.
    dotted = ".".join(str(getattr(p, "key", p)) for p in path if not isinstance(p, jax.tree_util.GetAttrKey))
    mapped = param_map.jax_to_hf(dotted)
    if mapped is None:
        raise KeyError(f"parameter {dotted} has no HF name in qvl_jax.param_map.RULES")
    return mapped[0]


def trainable_filter(model_cfg) -> Any:
    """nnx filter: which parameters train, by the freeze switches (`qvl_core.parts`)."""
    return lambda path, _value: parts.key_trains(hf_key(path), model_cfg)


def create_model(config: RunConfig, cfg: QwenVLConfig, opts: RuntimeOptions, layout: sharding_lib.Layout):
    """The classifier with every parameter already in its sharding (never whole on one device)."""
    abstract = nnx.eval_shape(lambda: QwenVLClassifier(cfg, opts=opts, rngs=nnx.Rngs(config.training.seed)))
    graphdef, abstract_params = nnx.split(abstract)
    shardings = layout.params(abstract_params)
    if config.model.pretrained_name is None:
        def init():
            return nnx.split(QwenVLClassifier(cfg, opts=opts, rngs=nnx.Rngs(config.training.seed)))[1]

        return nnx.merge(graphdef, jax.jit(init, out_shardings=shardings)())
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


def state_shardings(layout: sharding_lib.Layout, params, tx) -> dict:
    """Shardings of the trainable params, their gradients (as the step constrains them) and the optimizer state."""
    param_sh = jax.tree.map(lambda x: x.sharding, params)
    grad_sh = layout.optimizer(params) if layout.strategy != "dp" else param_sh
    return {"params": param_sh, "grads": grad_sh, "opt_state": layout.optimizer(jax.eval_shape(tx.init, params))}


def lr_schedule(t, peak: float, total_steps: int):
    """Linear warm-up from 0, then cosine / linear decay to `peak * min_lr_ratio`, or constant."""
    warmup = min(t.warmup_steps, max(total_steps - 1, 0))
    end = peak * t.min_lr_ratio
    if t.lr_schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(total_steps, warmup + 1), end)
    after = (optax.constant_schedule(peak) if t.lr_schedule == "constant"
             else optax.linear_schedule(peak, end, max(total_steps - warmup, 1)))
    return optax.join_schedules([optax.linear_schedule(0.0, peak, max(warmup, 1)), after], [warmup])


def make_optimizer(config: RunConfig, params, total_steps: int):
    """AdamW (warm-up + decay, decoupled weight decay on matrices only), clipping, per-part learning rates.

    Returns (tx, the schedule of `training.learning_rate`)."""
    t = config.training
    decay_mask = jax.tree.map(lambda x: x.ndim > 1, params)

    def adamw(peak):
        return optax.adamw(lr_schedule(t, peak, total_steps), b1=t.adam_beta1, b2=t.adam_beta2, eps=t.adam_epsilon,
                           weight_decay=t.weight_decay, mask=decay_mask)

    if t.vision_learning_rate is not None and t.vision_learning_rate != t.learning_rate:
        groups = jax.tree_util.tree_map_with_path(
            lambda p, _: "vision" if parts.part_of(hf_key(p)).vision_lr else "rest", params)
        tx = optax.multi_transform({"vision": adamw(t.vision_learning_rate), "rest": adamw(t.learning_rate)}, groups)
    else:
        tx = adamw(t.learning_rate)
    if t.max_grad_norm is not None:
        tx = optax.chain(optax.clip_by_global_norm(t.max_grad_norm), tx)
    if t.skip_nonfinite:
        tx = optax.apply_if_finite(tx, max_consecutive_errors=2**31 - 1)
    return tx, lr_schedule(t, t.learning_rate, total_steps)
