"""The DeepSpeed JSON, reconciled with the run's YAML.

`"auto"` fields are filled from the YAML; a number that contradicts the YAML is an
error naming both values, so the two files cannot silently disagree about the batch.
qvl builds the optimizer and the schedule itself (same AdamW and warm-up + cosine as
the JAX path), so the JSON may not carry `optimizer` or `scheduler` blocks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qvl_core.config import RunConfig
from qvl_core.schema import SchemaError, read_json


def _reconcile(ds: dict, key: str, want: Any, yaml_key: str, source: str) -> None:
    have = ds.get(key, "auto")
    if have == "auto":
        ds[key] = want
    elif have != want:
        raise SchemaError(f"{source}: {key} is {have!r} but the YAML gives {want!r} ({yaml_key}); "
                          f"make them agree or set {key} to \"auto\"")


def resolve_ds_config(path: str | Path | None, config: RunConfig, world_size: int) -> dict:
    """The DeepSpeed config to pass to `deepspeed.initialize` (a copy; the file is not changed)."""
    t = config.training
    source = str(path) if path else "DeepSpeed config"
    if path is None:
        ds: dict[str, Any] = {"zero_optimization": {"stage": 2}}
    else:
        ds = read_json(path, SchemaError, f"--deepspeed {path}: no such file")
    for block in ("optimizer", "scheduler"):
        if block in ds:
            raise SchemaError(f"{source}: remove the {block!r} block; qvl builds AdamW and the warm-up + cosine "
                              f"schedule from the YAML's training.* keys (same as the JAX path)")
    _reconcile(ds, "train_micro_batch_size_per_gpu", t.batch_size, "training.batch_size", source)
    _reconcile(ds, "gradient_accumulation_steps", t.gradient_accumulation_steps,
               "training.gradient_accumulation_steps", source)
    _reconcile(ds, "train_batch_size", t.batch_size * t.gradient_accumulation_steps * world_size,
               f"training.batch_size x gradient_accumulation_steps x {world_size} processes", source)
    _reconcile(ds, "gradient_clipping", t.max_grad_norm or 0.0, "training.max_grad_norm", source)
    bf16 = config.model.compute_dtype == "bfloat16"
    ds.setdefault("bf16", {})
    _reconcile(ds["bf16"], "enabled", bf16, "model.compute_dtype", f"{source} bf16")
    if ds.get("fp16", {}).get("enabled") is True:
        raise SchemaError(f"{source}: fp16 is not supported (use bf16 through model.compute_dtype: bfloat16)")
    ds.setdefault("zero_allow_untested_optimizer", True)  # our torch.optim.AdamW with per-group learning rates
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("wall_clock_breakdown", False)
    return ds
