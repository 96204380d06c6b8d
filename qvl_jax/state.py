"""The training state of a run, built from its config: model config, what trains, the optimizer, sharded creation.

    cfg, _ = model_config(config, label_map)              # the classifier's QwenVLConfig (labels checked)
    model = create_model(config, cfg, opts, layout)       # every parameter created in its sharding
    graphdef, params, frozen = nnx.split(model, trainable_filter(config.model), ...)
    dtypes = compute_copy_dtypes(model, params, layout)   # dtypes of a compute copy of the weights, or None
    tx, schedule = make_optimizer(config, params, total_steps)
    shardings = state_shardings(layout, params, tx, dtypes)   # params, compute, grads, opt_state
    compute = compute_copy(params, dtypes, shardings["compute"])
    graphdef, template = abstract_state(config, cfg, opts, layout)   # a restore target, nothing allocated

Master weights and the compute copy (ZeRO-2 as DeepSpeed lays it out). Under
zero2 and fsdp with a compute dtype narrower than the parameters (bf16 compute,
float32 parameters), `params` are the float32 master weights, sharded over
`data` like the AdamW moments, and `compute` holds the weights as the forward
and backward passes use them, laid out as `Layout.params` says (whole on every
device under zero2, sharded under fsdp). Each step differentiates with respect
to `compute`, updates its shard of `params`, and casts the new shard before it
is all-gathered into the next `compute`. Only weights the model casts to the
compute dtype before any use are narrower in `compute` (the kernels and biases
of `Linear` layers, embeddings), so the numbers are those of a step on the
float32 weights: norm scales, the patch embedding (summed over time in float32
first) and the float32 head keep their dtype. Otherwise (dp, one device, or
float32 compute) `compute` is None and the step runs on `params`, laid out by
`Layout.params`, casting inside.

The trainer, `qvl_jax.evaluate` and the benchmarks build their state here.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
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
from qvl_jax.classifier import QwenVLClassifier, model_rngs
from qvl_jax.hf_io import load_hf
from qvl_jax.lora import add_adapters
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
    dotted = ".".join(map(str, _path_names(path)))
    mapped = param_map.jax_to_hf(dotted)
    if mapped is None:
        raise KeyError(f"parameter {dotted} has no HF name in qvl_jax.param_map.RULES")
    return mapped[0]


def trainable_filter(model_cfg) -> Any:
    """nnx filter: which parameters train, by the freeze switches (`qvl_core.parts`)."""
    return lambda path, _value: parts.key_trains(hf_key(path), model_cfg)


def _path_names(path) -> tuple:
    """A tree path over an nnx State -> its names (the `.value` attribute at the end dropped)."""
    return tuple(getattr(p, "key", p) for p in path if not isinstance(p, jax.tree_util.GetAttrKey))


def compute_dtypes(model, params) -> Any:
    """Per trainable parameter (`params`, a State of `model`, concrete or abstract): the dtype the model computes
    with it. Linear and Embed layers cast their weights to their compute dtype before any use, unless a parent
    module reads them itself (`reads_weights_of`); every other weight is used in its own dtype."""
    casts, own_use = {}, set()
    for path, module in nnx.iter_modules(model):
        own_use.update((*path, child) for child in getattr(module, "reads_weights_of", ()))
        if isinstance(module, (nnx.Linear, nnx.Embed)) and module.dtype is not None:
            for name in ("kernel", "bias", "embedding"):
                casts[(*path, name)] = jnp.dtype(module.dtype)
    casts = {path: d for path, d in casts.items() if path[:-1] not in own_use}
    return jax.tree_util.tree_map_with_path(lambda p, x: casts.get(_path_names(p), jnp.dtype(x.dtype)), params)


def keeps_compute_copy(layout: sharding_lib.Layout, params, dtypes) -> bool:
    """Whether a run holds a compute copy: under zero2 and fsdp on several devices, when some weight is computed
    in a narrower dtype than it is stored in. (On one device the copy would add 2 bytes per weight to the 4 of
    the master weights, which are not sharded there; dp keeps every weight whole anyway.)"""
    return layout.strategy != "dp" and layout.axis_size > 1 and any(
        d.itemsize < jnp.dtype(x.dtype).itemsize for d, x in zip(jax.tree.leaves(dtypes), jax.tree.leaves(params)))


def compute_copy_dtypes(model, params, layout: sharding_lib.Layout) -> Any | None:
    """`compute_dtypes` when the run keeps a compute copy (`keeps_compute_copy`), else None."""
    dtypes = compute_dtypes(model, params)
    return dtypes if keeps_compute_copy(layout, params, dtypes) else None


def cast_to(params, dtypes):
    """`params` cast leaf by leaf to `dtypes` (see `compute_dtypes`)."""
    return jax.tree.map(lambda x, d: x.astype(d), params, dtypes)


def compute_copy(params, dtypes, shardings):
    """The compute copy of `params` (None when `dtypes` is None), laid out by `shardings`."""
    if dtypes is None:
        return None
    return jax.jit(lambda p: cast_to(p, dtypes), out_shardings=shardings)(params)


def _placement(config: RunConfig, abstract_model, layout: sharding_lib.Layout):
    """(graphdef, shardings of every parameter of the model, the compute dtypes): trainable weights of a run with
    a compute copy are master weights, sharded like the optimizer state; the rest as `Layout.params` says."""
    trains = trainable_filter(config.model)
    graphdef, everything = nnx.split(abstract_model)
    _, params, _ = nnx.split(abstract_model, trains, ...)
    dtypes = compute_copy_dtypes(abstract_model, params, layout)

    def sharding(path, x):
        if dtypes is not None and trains(_path_names(path), x):
            return layout.sharded(x.shape)
        return layout.params(x)

    return graphdef, jax.tree_util.tree_map_with_path(sharding, everything), dtypes


def _classifier(config: RunConfig, cfg: QwenVLConfig, opts: RuntimeOptions, seed: int):
    """The classifier with fresh weights, and LoRA adapters when the run has them."""
    model = QwenVLClassifier(cfg, opts=opts, rngs=model_rngs(seed))
    if config.model.lora is not None:
        add_adapters(model, config.model.lora.spec())
    return model


def create_model(config: RunConfig, cfg: QwenVLConfig, opts: RuntimeOptions, layout: sharding_lib.Layout):
    """The classifier with every parameter already in its sharding (never whole on one device unless it is laid
    out whole): trainable weights in their master sharding (see the module's docstring)."""
    abstract = nnx.eval_shape(lambda: _classifier(config, cfg, opts, config.training.seed))
    graphdef, shardings, _ = _placement(config, abstract, layout)
    if config.model.pretrained_name is None:
        def init():
            return nnx.split(_classifier(config, cfg, opts, config.training.seed))[1]

        return nnx.merge(graphdef, jax.jit(init, out_shardings=shardings)())
    by_path = {".".join(str(p) for p in path): s for path, s in nnx.to_flat_state(shardings)}

    def place(path: str, array: np.ndarray):
        sharding = by_path[path]
        sharding = sharding.get_value() if hasattr(sharding, "get_value") else sharding
        return jax.make_array_from_callback(array.shape, sharding, lambda idx: array[idx])

    model = load_hf(config.model.pretrained_name, num_labels=cfg.head.num_labels, mode=cfg.head.mode,
                    pooling=cfg.head.pooling, opts=opts, head_seed=config.model.head_seed, place=place)
    model.config = cfg  # with the run's label names
    if config.model.lora is not None:  # the adapters, then each placed like the rest
        add_adapters(model, config.model.lora.spec())
        adapters = nnx.state(model, nnx.LoRAParam)
        placed = jax.tree_util.tree_map_with_path(
            lambda p, x: place(".".join(map(str, _path_names(p))), np.asarray(x)), adapters)
        nnx.update(model, placed)
    return model


def frozen_in_compute_dtype(config: RunConfig, model, frozen):
    """With LoRA, the frozen base is held in the dtypes the model computes with (`compute_dtypes`: the matmul
    weights in bf16 under bf16 compute); otherwise as stored. The same numbers either way."""
    if config.model.lora is None or not jax.tree.leaves(frozen):
        return frozen
    dtypes = compute_dtypes(model, frozen)
    if all(d == x.dtype for d, x in zip(jax.tree.leaves(dtypes), jax.tree.leaves(frozen))):
        return frozen
    shardings = jax.tree.map(lambda x: x.sharding, frozen)
    if isinstance(jax.tree.leaves(frozen)[0], jax.ShapeDtypeStruct):
        return jax.tree.map(lambda x, d: jax.ShapeDtypeStruct(x.shape, d, sharding=x.sharding), frozen, dtypes)
    return jax.jit(lambda f: cast_to(f, dtypes), out_shardings=shardings, donate_argnums=0)(frozen)


def abstract_state(config: RunConfig, cfg: QwenVLConfig, opts: RuntimeOptions, layout: sharding_lib.Layout):
    """(graphdef, {params, compute, frozen, opt_state} as sharded ShapeDtypeStructs, laid out as the trainer lays
    them out): a restore target, nothing allocated. `compute` is None when the run keeps no compute copy."""
    abstract = nnx.eval_shape(lambda: _classifier(config, cfg, opts, 0))
    graphdef, placed, dtypes = _placement(config, abstract, layout)

    def place(tree, shardings):
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)

    abstract = nnx.merge(graphdef, place(nnx.split(abstract)[1], placed))
    graphdef, params, frozen = nnx.split(abstract, trainable_filter(config.model), ...)
    frozen = frozen_in_compute_dtype(config, abstract, frozen)
    tx, _ = make_optimizer(config, params, total_steps=1)
    shardings = state_shardings(layout, params, tx, dtypes)
    compute = None if dtypes is None else place(jax.eval_shape(lambda p: cast_to(p, dtypes), params),
                                                shardings["compute"])
    return graphdef, {"params": params, "compute": compute, "frozen": frozen,
                      "opt_state": place(jax.eval_shape(tx.init, params), shardings["opt_state"])}


def state_shardings(layout: sharding_lib.Layout, params, tx, dtypes=None) -> dict:
    """Shardings of the trainable params (as placed), their compute copy (None without one), their gradients
    (as the step constrains them) and the optimizer state."""
    param_sh = jax.tree.map(lambda x: x.sharding, params)
    grad_sh = layout.optimizer(params) if layout.strategy != "dp" else param_sh
    return {"params": param_sh, "compute": None if dtypes is None else layout.params(params), "grads": grad_sh,
            "opt_state": layout.optimizer(jax.eval_shape(tx.init, params))}


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
