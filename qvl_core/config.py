"""The run config: the seed guide's YAML sections, typed and validated on load.

    config = load_config("configs/demo.yaml", overrides=["training.batch_size=4"])

Every section is a frozen dataclass with a comment per field. An unknown key, a
wrong type or an impossible value is a `SchemaError` naming the dotted key, raised
before any model is built or device touched. Checks that need the devices or the
data (a global batch that does not divide the devices, `num_labels` against the
label map or a stored head) live in the trainers, which run them first.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from qvl_core.data.config import DataConfig
from qvl_core.lora import DECODER_TARGETS, LoraSpec
from qvl_core.schema import SchemaError, from_dict, to_dict


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA adapters on a frozen base (`qvl_core/lora.py`); the head, and the merger unless frozen, train fully."""

    rank: int = 16  # r: the adapters' inner dimension
    alpha: float = 32.0  # the adapters' output is scaled by alpha / rank
    dropout: float = 0.0  # dropout on the adapters' input (only 0.0 so far)
    targets: tuple[str, ...] = DECODER_TARGETS  # HF layer names, their last parts or regexes; each must match
    vision: bool = False  # also adapt the vision tower's attn.qkv, attn.proj and mlp layers
    seed: int = 0  # seed of the adapters' initial A (the same in both frameworks)

    def validate(self, where: str) -> None:
        if self.rank < 1:
            raise SchemaError(f"{where}.rank: must be >= 1, got {self.rank}")
        if self.alpha <= 0:
            raise SchemaError(f"{where}.alpha: must be > 0, got {self.alpha}")
        if self.dropout != 0.0:
            raise SchemaError(f"{where}.dropout: only 0.0 is supported so far, got {self.dropout}")
        if not self.targets:
            raise SchemaError(f"{where}.targets: name at least one layer")

    def spec(self) -> LoraSpec:
        return LoraSpec(rank=self.rank, alpha=self.alpha, targets=tuple(self.targets), dropout=self.dropout,
                        vision=self.vision, seed=self.seed)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Which Qwen2.5-VL, how it classifies, and what trains."""

    pretrained_name: Optional[str] = None  # local HF directory (or hub name where the hub is reachable); null: `config`
    config: Optional[dict] = None  # an HF-style config.json dict, to train from scratch (tiny models)
    num_labels: Optional[int] = None  # null: the data's label count; else must equal it (and any stored head)
    mode: Literal["vlm", "vision"] = "vlm"  # vision tower + decoder | vision tower only
    pooling: Optional[Literal["last", "mean_image"]] = None  # null: last (vlm), mean_image (vision)
    param_dtype: Literal["float32", "bfloat16"] = "float32"  # master weights, optimizer state (head: float32)
    compute_dtype: Literal["float32", "bfloat16"] = "bfloat16"  # matmuls and activations; logits/loss float32
    # Which weights each switch freezes: the part table, qvl_core/parts.py.
    freeze_vision: bool = False  # freeze the vision tower's blocks and patch embedding
    freeze_merger: bool = False  # freeze the patch merger (the vision-to-text projector)
    freeze_decoder: bool = False  # freeze the Qwen2.5 decoder (embeddings, layers, final norm)
    head_seed: int = 0  # seed of a fresh classification head (same head in both frameworks)
    lora: Optional[LoraConfig] = None  # LoRA adapters on a frozen base (null: full fine-tuning by the switches)
    attention: Literal["auto", "flash_attention_2", "sdpa", "eager"] = "auto"  # PyTorch path; auto: flash-attn, sdpa, eager

    def validate(self, where: str) -> None:
        if (self.pretrained_name is None) == (self.config is None):
            raise SchemaError(f"{where}: set exactly one of pretrained_name (a checkpoint) or config (from scratch)")
        if self.num_labels is not None and self.num_labels < 1:
            raise SchemaError(f"{where}.num_labels: must be >= 1, got {self.num_labels}")
        if self.mode == "vision" and self.pooling == "last":
            raise SchemaError(f"{where}.pooling: mode 'vision' has no token sequence; use mean_image")
        if self.mode == "vision" and self.freeze_decoder:
            raise SchemaError(f"{where}.freeze_decoder: mode 'vision' has no decoder")

    @property
    def resolved_pooling(self) -> str:
        return self.pooling or ("mean_image" if self.mode == "vision" else "last")


@dataclasses.dataclass(frozen=True)
class TrainingConfig:
    """Optimisation (the seed guide's `training:` keys plus what the JAX path needs)."""

    num_epochs: float = 10  # epochs over the training mixture (an epoch = its total record count)
    max_steps: Optional[int] = None  # stop after this many optimizer steps (overrides num_epochs)
    learning_rate: float = 1e-5  # peak learning rate
    vision_learning_rate: Optional[float] = None  # peak learning rate of the vision tower; null: learning_rate
    weight_decay: float = 0.0  # AdamW decoupled weight decay (not applied to biases and norms)
    adam_beta1: float = 0.9  # AdamW first-moment decay
    adam_beta2: float = 0.999  # AdamW second-moment decay
    adam_epsilon: float = 1e-8  # AdamW epsilon (added to the root of the second moment)
    warmup_steps: int = 100  # linear warm-up from 0, then cosine decay
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"  # after warm-up
    min_lr_ratio: float = 0.0  # the schedule ends at learning_rate * min_lr_ratio
    max_grad_norm: Optional[float] = 1.0  # global-norm clipping; null: off
    batch_size: int = 8  # per-device micro batch (DeepSpeed's train_micro_batch_size_per_gpu)
    global_batch_size: Optional[int] = None  # optional check: must equal batch_size * devices * accumulation
    gradient_accumulation_steps: int = 1  # micro-batches summed into one update
    eval_batch_size: Optional[int] = None  # per device; null: batch_size
    gradient_checkpointing: bool = False  # rematerialise each block in the backward pass (memory for speed)
    memory_efficient_attention: bool = True  # cuDNN flash attention where supported; false: plain XLA attention
    dataloader_num_workers: int = 2  # grain worker processes per host (0: decode in the main process)
    label_smoothing: float = 0.0  # cross-entropy label smoothing
    skip_nonfinite: bool = False  # skip updates with a non-finite loss/gradient (counted) instead of stopping
    seed: int = 0  # data order, augmentation and fresh weights

    def validate(self, where: str) -> None:
        for name in ("batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise SchemaError(f"{where}.{name}: must be >= 1, got {getattr(self, name)}")
        if self.learning_rate < 0 or (self.vision_learning_rate or 0) < 0:
            raise SchemaError(f"{where}.learning_rate: must be >= 0")
        if self.num_epochs <= 0 and self.max_steps is None:
            raise SchemaError(f"{where}.num_epochs: must be > 0 (or set max_steps)")
        if self.max_steps is not None and self.max_steps < 1:
            raise SchemaError(f"{where}.max_steps: must be >= 1, got {self.max_steps}")
        if self.warmup_steps < 0:
            raise SchemaError(f"{where}.warmup_steps: must be >= 0")
        if not 0 <= self.label_smoothing < 1:
            raise SchemaError(f"{where}.label_smoothing: must be in [0, 1)")
        if self.dataloader_num_workers < 0:
            raise SchemaError(f"{where}.dataloader_num_workers: must be >= 0")


@dataclasses.dataclass(frozen=True)
class ShardingConfig:
    """How state is laid out over the mesh of all devices (one `data` axis)."""

    strategy: Literal["dp", "zero2", "fsdp"] = "zero2"  # dp: replicate all; zero2: shard grads + AdamW state; fsdp: params too
    min_shard_size: int = 2**14  # arrays with fewer elements stay replicated (sharding them costs more than it saves)


@dataclasses.dataclass(frozen=True)
class FreqConfig:
    training_log_freq: int = 10  # steps between training/* metrics
    eval_log_freq: int = 50  # steps between evaluations (and at the end)
    perf_log_freq: int = 10  # steps between perf/* metrics


@dataclasses.dataclass(frozen=True)
class WandbConfig:
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"  # auto: online with an API key, else offline
    project: str = "qvl"  # WandB project
    entity: Optional[str] = None  # WandB entity (team); null: your default
    name: Optional[str] = None  # run name in WandB; null: output.run_name


@dataclasses.dataclass(frozen=True)
class MonitorConfig:
    all_freq: FreqConfig = FreqConfig()
    wandb: WandbConfig = WandbConfig()
    progress_bar: bool = True  # tqdm bar with loss, accuracy and samples/s (process 0)


@dataclasses.dataclass(frozen=True)
class OutputConfig:
    dir: str = "outputs"  # runs go to <dir>/<run_name>/
    run_name: str = "complete_training"  # the run's folder name (and WandB name by default)
    save_freq: int = 500  # steps between checkpoints (also at the end and on SIGTERM/SIGINT)
    keep_checkpoints: int = 3  # newest checkpoints kept, besides the best one
    async_checkpointing: bool = True  # orbax writes in the background while training goes on
    export_hf: bool = True  # write the final and the best classifier in HF format (<run>/hf_final, <run>/hf_best)
    overwrite: bool = False  # a run folder that already holds checkpoints: start over (else: an error, or --resume_from)


@dataclasses.dataclass(frozen=True)
class PerfConfig:
    peak_tflops: Optional[float] = None  # the device's dense bf16 peak per chip; null: from the known-device table


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """Multi-host set-up; by default JAX's own detection (SLURM, ...) or a single process."""

    coordinator_address: Optional[str] = None  # host:port of process 0
    num_processes: Optional[int] = None  # number of processes (hosts) in the run
    process_id: Optional[int] = None  # this process's index, 0 .. num_processes-1


@dataclasses.dataclass(frozen=True)
class RunConfig:
    model: ModelConfig
    data: DataConfig
    training: TrainingConfig = TrainingConfig()
    sharding: ShardingConfig = ShardingConfig()
    monitor: MonitorConfig = MonitorConfig()
    output: OutputConfig = OutputConfig()
    perf: PerfConfig = PerfConfig()
    distributed: DistributedConfig = DistributedConfig()

    @property
    def run_dir(self) -> Path:
        return Path(self.output.dir) / self.output.run_name

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """`["training.batch_size=4", "model.mode=vision"]` -> updated copy of `raw` (values parsed as YAML)."""
    import copy

    out = copy.deepcopy(raw)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SchemaError(f"--set {item!r}: expected key.path=value")
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise SchemaError(f"--set {item!r}: {part!r} is not a section")
            node = nxt
        node[parts[-1]] = yaml.safe_load(value)
    return out


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Reads a YAML run config, applies `--set` overrides, validates everything."""
    path = Path(path)
    if not path.is_file():
        raise SchemaError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise SchemaError(f"{path} is not valid YAML: {e}") from None
    raw = apply_overrides(raw, overrides or [])
    try:
        return from_dict(RunConfig, raw)
    except SchemaError as e:
        raise SchemaError(f"{path}: {e}") from None


def dump_config(config: RunConfig) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)


def _field_comments(cls) -> dict[str, str]:
    import inspect
    import re

    comments = {}
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s+(\w+):[^#]*#\s*(.+)$", line)
        if m:
            comments[m.group(1)] = m.group(2).strip()
    return comments


def reference_markdown() -> str:
    """Every config key with its default and meaning, as a Markdown table (from the dataclasses themselves)."""
    from qvl_core.data.config import AugmentConfig, DatasetConfig

    rows = ["| key | default | meaning |", "|---|---|---|"]

    def walk(cls, prefix: str) -> None:
        comments = _field_comments(cls)
        for f in dataclasses.fields(cls):
            key = f"{prefix}{f.name}"
            if f.default is not dataclasses.MISSING and dataclasses.is_dataclass(f.default):
                walk(type(f.default), key + ".")
                continue
            if f.name == "datasets":
                walk(DatasetConfig, key + "[].")
                continue
            if f.name == "lora":  # optional section: null, or these keys
                rows.append(f"| `{key}` | `null` | {comments.get(f.name, '')} |")
                walk(LoraConfig, key + ".")
                continue
            if f.default is not dataclasses.MISSING:
                default = json.dumps(to_dict(f.default))
            elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                default = json.dumps(to_dict(f.default_factory()))  # type: ignore[misc]
            else:
                default = "required"
            meaning = comments.get(f.name, "").replace("|", "\\|")
            rows.append(f"| `{key}` | `{default}` | {meaning} |")

    for section in dataclasses.fields(RunConfig):
        cls = {"data": DataConfig, "model": ModelConfig}.get(section.name) or type(section.default)
        walk(cls, section.name + ".")
    del AugmentConfig
    return "\n".join(rows)


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["--reference"]:
        print(reference_markdown())
    else:
        print("usage: python -m qvl_core.config --reference   (prints every config key as a Markdown table)")
