"""What both frameworks need to know about an HF checkpoint directory before loading it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from safetensors import safe_open

from qvl_core.model_config import ConfigError, QwenVLConfig, head_input_size
from qvl_core.schema import read_json

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
HEAD_KEYS = ("classifier.weight", "classifier.bias")


class CheckpointError(ValueError):
    """A checkpoint directory whose contents do not fit the model asked for."""


def read_config(path: str | os.PathLike) -> tuple[QwenVLConfig, dict]:
    """Parses `<path>/config.json` into a `QwenVLConfig` (and returns the raw dict too)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    cfg_file = path / "config.json"
    raw = read_json(cfg_file, CheckpointError, f"{cfg_file} is missing: an HF checkpoint directory needs its config.json")
    try:
        return QwenVLConfig.from_hf_dict(raw, source=str(cfg_file)), raw
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


def weight_files(path: str | os.PathLike) -> list[Path]:
    """The safetensors files of a checkpoint: one `model.safetensors`, or the shards its index names."""
    path = Path(path)
    if (path / INDEX_FILE).is_file():
        index = json.loads((path / INDEX_FILE).read_text())
        files = sorted(set(index.get("weight_map", {}).values()))
        missing = [f for f in files if not (path / f).is_file()]
        if missing:
            raise CheckpointError(f"{path / INDEX_FILE} names shards that are not there: {missing}")
        return [path / f for f in files]
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE]
    others = sorted(path.glob("*.safetensors"))
    if others:
        return others
    hint = (" (pytorch_model.bin is not read: re-save it with safe_serialization=True)"
            if (path / "pytorch_model.bin").exists() else "")
    raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} in {path}{hint}")


def read_head(files: list[Path]) -> dict[str, np.ndarray]:
    """The stored classification head (`classifier.weight [L, D]`, `classifier.bias [L]`), if any."""
    out = {}
    for f in files:
        with safe_open(f, framework="np") as st:
            for key in st.keys():
                if key in HEAD_KEYS:
                    out[key] = st.get_tensor(key)
    return out


def stored_head_labels(files: list[Path]) -> int | None:
    for f in files:
        with safe_open(f, framework="np") as st:
            if "classifier.weight" in st.keys():
                return int(st.get_slice("classifier.weight").get_shape()[0])
    return None


def resolve_config(path: str | os.PathLike, *, num_labels: int | None, mode: str | None,
                   pooling: str | None) -> tuple[QwenVLConfig, list[Path]]:
    """The config a classifier loaded from `path` has: stored head settings unless overridden.

    A stored head whose label count differs from `num_labels` is an error.
    """
    cfg, _ = read_config(path)
    files = weight_files(path)
    stored = stored_head_labels(files)
    if stored is not None and num_labels is not None and stored != num_labels:
        raise CheckpointError(f"{path}: the stored classification head has {stored} labels but "
                              f"num_labels={num_labels} was asked for")
    labels = num_labels if num_labels is not None else stored
    mode = mode or cfg.head.mode
    if pooling is None:
        pooling = "mean_image" if mode == "vision" else cfg.head.pooling
    keep_names = cfg.head.id2label is not None and len(cfg.head.id2label) == labels
    try:
        cfg = cfg.with_head(num_labels=labels, mode=mode, pooling=pooling,
                            id2label=cfg.head.id2label if keep_names else None)
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None
    return cfg, files


def init_head(cfg: QwenVLConfig, seed: int) -> dict[str, np.ndarray]:
    """A fresh head, identical in every framework for the same seed: N(0, initializer_range), zero bias."""
    rng = np.random.default_rng(seed)
    weight = rng.normal(0.0, cfg.text.initializer_range, (cfg.head.num_labels, head_input_size(cfg)))
    return {"classifier.weight": weight.astype(np.float32),
            "classifier.bias": np.zeros((cfg.head.num_labels,), np.float32)}


def local_checkpoint(name: str) -> Path:
    """`model.pretrained_name` as a local directory: the path itself, or a hub download of a repo id.

    A repo id ("Qwen/Qwen2.5-VL-7B-Instruct") is fetched with huggingface_hub (config and safetensors only)
    where the hub is reachable; otherwise the error says to download it and point to the directory.
    """
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    parts = name.split("/")
    if len(parts) != 2 or not all(parts) or name.startswith((".", "/", "~")):
        raise CheckpointError(f"model.pretrained_name: {name} is not a directory")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors"]))
    except Exception as e:  # no huggingface_hub, no network, no such repo, gated repo ...
        raise CheckpointError(f"model.pretrained_name: {name} is not a local directory and could not be fetched "
                              f"from the hub ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                              f"download it and set pretrained_name to its directory") from None
