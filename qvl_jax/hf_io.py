"""Reading and writing HF-format Qwen2.5-VL directories (config.json + safetensors).

`load_hf` reads tensor by tensor into an abstract (`nnx.eval_shape`) model, so
host memory stays near one copy of the weights. `save_hf` writes the hub's key
layout, sharded like `save_pretrained`, with the classification head beside the
backbone; transformers, `qvl_torch` and `load_hf` all read it back.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from qvl_core.hf_checkpoint import (INDEX_FILE, SINGLE_FILE, CheckpointError, init_head, read_config,
                                    resolve_config, weight_files)
from qvl_jax import param_map
from qvl_jax.classifier import QwenVLClassifier, model_rngs
from qvl_jax.options import DTYPES, RuntimeOptions

log = logging.getLogger(__name__)

def load_hf(path: str | os.PathLike, *, num_labels: int | None = None, dtype: str = "float32",
            mode: str | None = None, pooling: str | None = None, compute_dtype: str | None = None,
            opts: RuntimeOptions | None = None, head_seed: int = 0,
            place: Callable[[str, np.ndarray], jax.Array] | None = None,
            adapter=None, check_base: bool = True) -> QwenVLClassifier:
    """Builds a `QwenVLClassifier` from a local HF Qwen2.5-VL directory.

    `adapter`: a PEFT LoRA adapter directory, or one already read (`qvl_core.lora.read_adapter`) (a LoRA run's `adapter_final`/`adapter_best`, or one
    `peft.PeftModel.save_pretrained` wrote for `qvl_torch`'s classifier) put on the base at `path`: its
    adapters on their layers (unmerged; `qvl_jax.lora.merge_adapters` folds them in) and its saved modules
    (the head, a trained merger) over the base's. The label count, head mode and pooling default to the
    adapter's. `check_base`: its `base_model_name_or_path` must name `path` (the directory's name).

    `dtype` is the parameter dtype (`compute_dtype` defaults to it; `opts`
    overrides both). `mode`/`pooling` default to what the checkpoint stored,
    else `vlm`/`last`. A checkpoint without a head gets a fresh one
    (seeded by `head_seed`) when `num_labels` is given. `place(jax_path, array)`
    puts each tensor where it belongs (e.g. `jax.make_array_from_callback` with the
    parameter's sharding), so no device holds more than its share; default: the
    default device.
    """
    if adapter is not None:
        from qvl_core import lora
        from qvl_jax.lora import apply_adapter

        read = adapter if isinstance(adapter, lora.Adapter) else lora.read_adapter(adapter)
        _check_base(read, path, check_base)
        head = read.saved.get("classifier.weight")
        num_labels = num_labels or (head.shape[0] if head is not None else None)
        mode = mode or read.meta.get("mode")
        pooling = pooling or read.meta.get("pooling")
        model = load_hf(path, num_labels=num_labels, dtype=dtype, mode=mode, pooling=pooling,
                        compute_dtype=compute_dtype, opts=opts, head_seed=head_seed, place=place)
        apply_adapter(model, read)
        return model
    cfg, files = resolve_config(path, num_labels=num_labels, mode=mode, pooling=pooling)
    opts = opts or RuntimeOptions(param_dtype=dtype, dtype=compute_dtype or dtype)

    abstract = nnx.eval_shape(lambda: QwenVLClassifier(cfg, opts=opts, rngs=model_rngs(0)))
    graphdef, state = nnx.split(abstract)
    slots = {_dotted(p): v for p, v in nnx.to_flat_state(state)}
    patch_shape = (cfg.vision.in_channels, cfg.vision.temporal_patch_size, cfg.vision.patch_size,
                   cfg.vision.patch_size)
    filled: set[str] = set()
    unexpected, mis_shaped = [], []
    put = place or (lambda _path, array: jnp.asarray(array))
    for f in files:
        with safe_open(f, framework="np") as st:
            for key in st.keys():
                hf_key = param_map.canonical_hf_key(key)
                if any(p.match(hf_key) for p in param_map.IGNORED_HF):
                    continue
                if cfg.head.mode == "vision" and hf_key.startswith("model."):
                    continue  # the decoder is not part of a vision-only classifier
                hit = param_map.hf_to_jax(hf_key)
                if hit is None or hit[0] not in slots:
                    unexpected.append(key)
                    continue
                jax_path, kind = hit
                slot = slots[jax_path]
                want = param_map.expected_hf_shape(kind, slot.shape, patch_shape)
                got = tuple(st.get_slice(key).get_shape())
                if got != want:
                    mis_shaped.append(f"{key}: checkpoint {got}, model expects {want}")
                    filled.add(jax_path)  # present, reported as mis-shaped rather than missing
                    continue
                array = param_map.to_jax(kind, st.get_tensor(key))
                slot.set_value(put(jax_path, np.asarray(array).astype(slot.dtype)))
                filled.add(jax_path)
    missing = sorted(set(slots) - filled)
    head_missing = [p for p in missing if p.startswith("classifier.")]
    missing = [param_map.jax_to_hf(p)[0] for p in missing if not p.startswith("classifier.")]
    if unexpected or missing or mis_shaped:
        raise CheckpointError(_key_report(path, cfg, missing, unexpected, mis_shaped))
    if head_missing:
        log.info("%s has no classification head; initialising one with %d labels (seed %d)", path,
                 cfg.head.num_labels, head_seed)
        head = init_head(cfg, head_seed)
        fresh = {"classifier.kernel": head["classifier.weight"].T, "classifier.bias": head["classifier.bias"]}
        for jax_path, array in fresh.items():
            slots[jax_path].set_value(put(jax_path, array.astype(slots[jax_path].dtype)))
    return nnx.merge(graphdef, state)


def _check_base(adapter, path, check: bool) -> None:
    from qvl_core.lora import ADAPTER_CONFIG, LoraError

    base = adapter.config.get("base_model_name_or_path")
    if check and base and Path(str(base).rstrip("/")).name != Path(path).resolve().name:
        raise LoraError(f"{adapter.path / ADAPTER_CONFIG}: base_model_name_or_path is {base!r}, but the base "
                        f"model given is {str(path)!r}; load it on its own base (if this directory is that base under "
                        "another name: check_base=False in load_hf, or --base DIR for evaluate and predict)")


def _key_report(path, cfg, missing, unexpected, mis_shaped) -> str:
    lines = [f"{path} does not match a Qwen2.5-VL classifier (mode={cfg.head.mode}, "
             f"num_labels={cfg.head.num_labels}):"]
    for title, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mis_shaped)):
        if keys:
            shown = keys if len(keys) <= 20 else keys[:20] + [f"... and {len(keys) - 20} more"]
            lines.append(f"  {title} ({len(keys)}): " + ", ".join(shown))
    return "\n".join(lines)


def _dotted(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    s = size.strip().upper()
    for u in sorted(units, key=len, reverse=True):
        if s.endswith(u):
            return int(float(s[:-len(u)]) * units[u])
    return int(s)


def save_hf(model: QwenVLClassifier, path: str | os.PathLike, *, dtype: str | None = None,
            max_shard_size: int | str = "5GB", extra: dict | None = None) -> Path:
    """Writes `model` as an HF directory: config.json + (sharded) safetensors, head included.

    `dtype` casts on the way out (default: the parameter dtype). `extra` goes into
    config.json's `qvl_classifier` block (the trainer stores the image size there).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    v = cfg.vision
    patch_shape = (v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    out_dtype = DTYPES[dtype] if dtype else None
    limit = _parse_size(max_shard_size)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for p, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        hit = param_map.jax_to_hf(_dotted(p))
        if hit is None:
            raise CheckpointError(f"parameter {_dotted(p)} has no HF name in qvl_jax.param_map.RULES")
        key, kind = hit
        array = np.asarray(jax.device_get(var.get_value()))
        if out_dtype is not None:
            array = array.astype(out_dtype)
        array = np.ascontiguousarray(param_map.to_hf(kind, array, (array.shape[-1], *patch_shape)
                                                     if kind == "patch_conv" else None))
        if size and size + array.nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][key] = array
        size += array.nbytes
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        name = SINGLE_FILE if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / name), metadata={"format": "pt"})
        for k, a in shard.items():
            weight_map[k] = name
            total += a.nbytes
    if len(shards) > 1:
        (path / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total},
                                                   "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    hf = cfg.to_hf_dict()
    stored = dtype or model.opts.param_dtype
    hf["torch_dtype"] = hf["text_config"]["dtype"] = stored
    if extra and "qvl_classifier" in hf:
        hf["qvl_classifier"].update(extra)
    (path / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    return path


__all__ = ["load_hf", "save_hf", "read_config", "weight_files", "CheckpointError"]
