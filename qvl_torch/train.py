"""The PyTorch reference trainer: transformers' Qwen2.5-VL + the shared head under DeepSpeed.

    python -m qvl_torch.train --config configs/X.yaml --deepspeed configs/ds_config_zero2.json [--resume_from PATH|auto]
    deepspeed --num_gpus 8 --module qvl_torch.train --config ... --deepspeed ...      (or torchrun)

Same YAML, data order, metrics, output layout and FLOP accounting as `qvl_jax.train`;
the optimizer (AdamW, decay on matrices only, per-group learning rates) and the
schedule (linear warm-up from 0, then cosine) are built to match optax's step for step.
"""

from __future__ import annotations

import argparse
import importlib
import datetime
import json
import logging
import math
import os
import shutil
import socket
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from qvl_core import flops as flops_lib
from qvl_core.config import RunConfig, load_config
from qvl_core.data import BadRecords, DataError, EvalSource, LabelMap, TrainSource, expand_patches
from qvl_core.hf_checkpoint import CheckpointError, init_head
from qvl_core.metrics import MetricsLogger
from qvl_core.model_config import ConfigError, QwenVLConfig
from qvl_core.runs import (EvalTally, Progress, StopRequest, checkpoint_steps, export_metadata, process_rss_gb,
                            start_run)
from qvl_core.schema import SchemaError
from qvl_torch.data import make_loader
from qvl_torch.ds_config import resolve_ds_config
from qvl_torch.model import TorchQwenVLClassifier, load_pretrained

log = logging.getLogger("qvl_torch.train")


class TrainingError(RuntimeError):
    """A run that cannot go on (non-finite loss, ...)."""


# ----------------------------------------------------------------------------- processes


def init_processes() -> tuple[int, int, torch.device]:
    """torch.distributed from the launcher's environment (deepspeed / torchrun), or a single local process."""
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=os.environ.get("MASTER_PORT", str(port)))
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        _skip_cpu_shm_op()
    return dist.get_rank(), dist.get_world_size(), device


def _skip_cpu_shm_op() -> None:
    # DeepSpeed compiles a shared-memory all-reduce op (~30 s) on first use on CPU; gloo does the job here.
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def any_process(flag: bool) -> bool:
    t = torch.tensor([int(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


# ----------------------------------------------------------------------------- model


def choose_attention(requested: str, device: torch.device) -> str:
    """flash_attention_2 -> sdpa -> eager for `auto`, logged with the reason; an impossible explicit choice raises."""
    def flash_problem() -> str | None:
        if device.type != "cuda":
            return "flash-attn needs a CUDA device"
        try:
            importlib.import_module("flash_attn")  # a GLIBC mismatch surfaces here as ImportError/OSError
        except (ImportError, OSError) as e:
            return f"flash_attn does not import ({type(e).__name__}: {e})"
        return None

    if requested == "flash_attention_2":
        problem = flash_problem()
        if problem:
            raise SchemaError(f"model.attention: flash_attention_2 cannot be used: {problem}; use auto or sdpa")
        return requested
    if requested in ("sdpa", "eager"):
        return requested
    problem = flash_problem()
    if problem is None:
        choice, reason = "flash_attention_2", "flash_attn imports and a CUDA device is present"
    elif hasattr(torch.nn.functional, "scaled_dot_product_attention"):
        choice, reason = "sdpa", problem
    else:
        choice, reason = "eager", problem + "; no torch sdpa"
    log.info("attention: %s (%s)", choice, reason)
    return choice


def build_model(config: RunConfig, label_map: LabelMap, attention: str) -> TorchQwenVLClassifier:
    m = config.model
    pooling = m.resolved_pooling
    if m.pretrained_name is not None:  # a local directory: start_run resolved hub ids
        model = load_pretrained(m.pretrained_name, num_labels=label_map.num_labels, dtype=m.param_dtype, mode=m.mode,
                                pooling=pooling, attn_implementation=attention, head_seed=m.head_seed)
        stored = model.config.head.id2label
        if stored is not None and tuple(stored) != label_map.names:
            raise CheckpointError(f"{m.pretrained_name}: its head's labels are not this run's (same count, other "
                                  "classes or order)")
        model.config = model.config.with_head(id2label=label_map.names)
        return model.train()
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLModel

    try:
        cfg = QwenVLConfig.from_hf_dict(m.config, source="model.config").with_head(
            num_labels=label_map.num_labels, mode=m.mode, pooling=pooling, id2label=label_map.names)
    except ConfigError as e:
        raise SchemaError(str(e)) from None
    torch.manual_seed(config.training.seed)
    raw = {k: v for k, v in cfg.to_hf_dict().items() if k not in ("qvl_classifier", "id2label", "label2id",
                                                                  "num_labels")}
    raw["text_config"] = {**raw["text_config"], "bos_token_id": None, "eos_token_id": None}  # no generation here
    hf_cfg = Qwen2_5_VLConfig(**raw)
    backbone = Qwen2_5_VLModel._from_config(hf_cfg, attn_implementation=attention)
    if cfg.head.mode == "vision":
        del backbone.language_model
    model = TorchQwenVLClassifier(cfg, backbone)
    head = init_head(cfg, m.head_seed)
    with torch.no_grad():
        model.classifier.weight.copy_(torch.from_numpy(head["classifier.weight"]))
        model.classifier.bias.copy_(torch.from_numpy(head["classifier.bias"]))
    return model.train()


def trains(name: str, m) -> bool:
    """Freeze switches by parameter name (`model.visual.*`, `model.language_model.*`, `classifier.*`)."""
    if name.startswith("model.visual."):
        return not (m.freeze_merger if name.startswith("model.visual.merger.") else m.freeze_vision)
    if name.startswith("model.language_model."):
        return not m.freeze_decoder
    return True


# ----------------------------------------------------------------------------- optimizer


def lr_multiplier(t, total_steps: int):
    """optax's schedules as a LambdaLR multiplier of the update count (0-based)."""
    warmup = min(t.warmup_steps, max(total_steps - 1, 0))
    end = t.min_lr_ratio

    def cosine(step: int) -> float:
        if step < warmup:
            return step / warmup
        decay = max(total_steps, warmup + 1) - warmup
        frac = min(step - warmup, decay) / decay
        return end + (1 - end) * 0.5 * (1 + math.cos(math.pi * frac))

    def joined(after):
        def f(step: int) -> float:
            if warmup and step < warmup:
                return step / warmup
            return after(step - warmup)
        return f

    if t.lr_schedule == "cosine":
        return cosine
    if t.lr_schedule == "constant":
        return joined(lambda _s: 1.0)
    span = max(total_steps - warmup, 1)
    return joined(lambda s: 1.0 + (end - 1.0) * min(s, span) / span)


def make_optimizer(model: torch.nn.Module, config: RunConfig, total_steps: int):
    t, m = config.training, config.model
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        p.requires_grad_(trains(name, m))
        if not p.requires_grad:
            continue
        vision = name.startswith("model.visual.") and not name.startswith("model.visual.merger.")
        groups.setdefault((vision, p.ndim > 1), []).append(p)
    vision_lr = t.vision_learning_rate if t.vision_learning_rate is not None else t.learning_rate
    param_groups = [{"params": ps, "lr": vision_lr if vision else t.learning_rate,
                     "weight_decay": t.weight_decay if decays else 0.0}
                    for (vision, decays), ps in sorted(groups.items())]
    optimizer = torch.optim.AdamW(param_groups, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(t, total_steps))
    return optimizer, scheduler


# ----------------------------------------------------------------------------- helpers


def device_memory_gb(device: torch.device) -> float:
    return torch.cuda.memory_allocated(device) / 1e9 if device.type == "cuda" else process_rss_gb()


def pixels(batch: dict, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(expand_patches(batch["patches"].numpy())).to(device=device, dtype=dtype)


def export_hf(model: TorchQwenVLClassifier, path: Path, config: RunConfig, label_map: LabelMap) -> None:
    """The classifier in the hub key layout (visual.*, model.*, classifier.*), readable by qvl_jax.load_hf."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    state = {}
    for name, tensor in model.state_dict().items():
        key = name.replace("model.visual.", "visual.", 1) if name.startswith("model.visual.") else \
            name.replace("model.language_model.", "model.", 1)
        state[key] = tensor.detach().cpu().contiguous()
    split = split_torch_state_dict_into_shards(state, max_shard_size="5GB")
    for filename, keys in split.filename_to_tensors.items():
        save_file({k: state[k] for k in keys}, str(path / filename), metadata={"format": "pt"})
    if split.is_sharded:
        (path / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": split.metadata, "weight_map": split.tensor_to_filename}, indent=2))
    hf = model.config.with_head(id2label=label_map.names).to_hf_dict()
    hf["qvl_classifier"].update(export_metadata(config, label_map))
    hf["torch_dtype"] = hf["text_config"]["dtype"] = str(next(model.parameters()).dtype).replace("torch.", "")
    (path / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    label_map.save(path / "label_map.json")


def _prune(checkpoints: Path, keep: int, best_step: int | None) -> None:
    steps = checkpoint_steps(checkpoints)
    for s in steps[:-keep] if keep else steps:
        if s != best_step:
            shutil.rmtree(checkpoints / str(s), ignore_errors=True)


def resolve_resume(resume_from: str | None, run_dir: Path) -> Path | None:
    if resume_from is None:
        return None
    if resume_from == "auto":
        path = run_dir / "checkpoints"
    else:
        path = Path(resume_from)
        if not path.exists():
            raise FileNotFoundError(f"--resume_from {path}: no such directory")
        if path.name.isdigit():
            return path
        if (path / "checkpoints").is_dir():
            path = path / "checkpoints"
    steps = checkpoint_steps(path)
    if not steps:
        if resume_from == "auto":
            return None
        raise FileNotFoundError(f"--resume_from {resume_from}: no checkpoint there")
    return path / str(steps[-1])


# ----------------------------------------------------------------------------- the run


def run(config: RunConfig, *, deepspeed_config: str | None = None, resume_from: str | None = None,
        stop_after: int | None = None) -> dict[str, Any]:
    import deepspeed

    rank, world, device = init_processes()
    run_dir = config.run_dir
    t = config.training

    # --- data (every split checked before anything heavy)
    data, config = start_run(config, rank, "torch", resume_from=resume_from)
    label_map = data.label_map

    # --- batch geometry and the DeepSpeed config
    ds_config = resolve_ds_config(deepspeed_config, config, world)
    local_batch = t.batch_size * t.gradient_accumulation_steps
    global_batch = local_batch * world
    epoch_length = TrainSource(data, seed=t.seed).epoch_length
    total_steps = t.max_steps or max(1, math.ceil(t.num_epochs * epoch_length / global_batch))
    log.info("%d process(es) on %s; ZeRO stage %s; global batch %d = %d per process x %d x %d accumulation; %d steps",
             world, device, ds_config.get("zero_optimization", {}).get("stage", 0), global_batch, t.batch_size, world,
             t.gradient_accumulation_steps, total_steps)

    # --- model, optimizer, engine
    attention = choose_attention(config.model.attention, device)
    model = build_model(config, label_map, attention)
    if t.gradient_checkpointing:
        model.model.gradient_checkpointing_enable()
    optimizer, scheduler = make_optimizer(model, config, total_steps)
    engine, optimizer, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                           config=ds_config, dist_init_required=False)
    compute_dtype = torch.bfloat16 if config.model.compute_dtype == "bfloat16" else torch.float32
    cfg = model.config
    step_flops = flops_lib.train_flops_per_sample(cfg, config.data.grid_thw,
                                                  trainable=config.model.trainable_parts) * global_batch
    kind = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = flops_lib.peak_tflops(kind, config.perf.peak_tflops)

    # --- data loaders
    train_source = TrainSource(data, seed=t.seed, num_records=total_steps * global_batch)
    eval_global = (t.eval_batch_size or t.batch_size) * world
    eval_sources = {name: EvalSource(data, name, pad_to=eval_global) for name in data.eval}
    bad = BadRecords(data, log)

    # --- resume
    checkpoints = run_dir / "checkpoints"
    start_step, best = 0, {"accuracy": -1.0, "step": None}
    source_dir = resolve_resume(resume_from, run_dir)
    if source_dir is not None:
        _, client = engine.load_checkpoint(str(source_dir.parent), tag=source_dir.name)
        if client is None:
            raise CheckpointError(f"{source_dir}: DeepSpeed could not load this checkpoint")
        label_map.check_compatible(LabelMap.from_json(client["label_map"]), f"checkpoint {source_dir}")
        if client["global_batch"] != global_batch:
            raise SchemaError(f"checkpoint {source_dir} was trained with a global batch of {client['global_batch']}, "
                              f"this run has {global_batch}")
        start_step, best = client["step"], client["best"]
        log.info("resumed from %s at step %d", source_dir, start_step)
    loader = iter(make_loader(train_source, batch_size=local_batch, rank=rank, world_size=world,
                              num_workers=t.dataloader_num_workers, start_batch=start_step))

    saved_at = [start_step]

    def save(step: int) -> None:
        if saved_at[0] == step:
            return
        saved_at[0] = step
        client = {"step": step, "best": best, "label_map": label_map.to_json(), "config": config.to_dict(),
                  "global_batch": global_batch, "total_steps": total_steps}
        with progress.paused():
            engine.save_checkpoint(str(checkpoints), tag=str(step), client_state=client)
            if rank == 0:
                if best["step"] is not None:
                    (checkpoints / "best.json").write_text(json.dumps(best) + "\n")
                _prune(checkpoints, config.output.keep_checkpoints, best["step"])
            dist.barrier()

    def evaluate(step: int) -> dict[str, float]:
        engine.eval()
        tally = EvalTally(label_map.names)
        with torch.no_grad():
            for name, source in eval_sources.items():
                rows = []
                for batch in make_loader(source, batch_size=eval_global // world, rank=rank, world_size=world):
                    logits = engine(pixels(batch, device, compute_dtype), config.data.grid_thw).logits.float()
                    labels = batch["label"].long().to(device)
                    losses = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
                    top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
                    rows.append((losses.cpu().numpy(), top.cpu().numpy(), batch["label"].numpy(),
                                 batch["valid"].numpy()))
                gathered = [None] * world
                dist.all_gather_object(gathered, rows)
                for part in gathered:
                    for losses, preds, labels, valid in part:
                        tally.add(name, losses, preds, labels, valid)
        engine.train()
        if rank == 0:
            tally.write_confusion(run_dir / "eval" / f"confusion_step{step}.csv")
        return tally.metrics()

    # --- the loop
    logger = MetricsLogger(run_dir, config=config.to_dict(), wandb_cfg=config.monitor.wandb, enabled=rank == 0,
                           run_name=config.output.run_name)
    freq = config.monitor.all_freq
    schedule = lr_multiplier(t, total_steps)
    progress = Progress(logger, freq, total_steps=total_steps, start_step=start_step, global_batch=global_batch,
                        epoch_length=epoch_length, lr_at=lambda s: t.learning_rate * schedule(s),
                        step_flops=step_flops, devices=world, peak=peak, memory_gb=lambda: device_memory_gb(device),
                        show_bar=rank == 0 and config.monitor.progress_bar)
    step, last_eval = start_step, {}
    micro = t.batch_size
    try:
        with StopRequest(any_process) as stop:
            while step < total_steps:
                batch = next(loader)
                bad.update({k: (v.numpy() if hasattr(v, "numpy") else np.asarray(v)) for k, v in batch.items()})
                valid = batch["valid"].float()
                counts = valid.sum().reshape(1)
                step_loss = torch.zeros(2)  # loss sum, correct
                for a in range(t.gradient_accumulation_steps):
                    part = {k: (v[a * micro:(a + 1) * micro] if not isinstance(v, list) else v) for k, v in batch.items()}
                    logits = engine(pixels(part, device, compute_dtype), config.data.grid_thw).logits.float()
                    labels = part["label"].long().to(device)
                    w = part["valid"].float().to(device)
                    ce = torch.nn.functional.cross_entropy(logits, labels, reduction="none",
                                                           label_smoothing=t.label_smoothing)
                    if a == 0:
                        dist.all_reduce(counts)  # valid examples of the whole global batch
                    denom = counts[0].clamp_min(1.0)
                    # DeepSpeed averages over accumulation steps and processes; undo that so the gradient is
                    # d(sum of losses over the global batch)/d(params) / (valid examples), as in the JAX step.
                    loss = (ce * w).sum() * (t.gradient_accumulation_steps * world) / denom
                    engine.backward(loss)
                    engine.step()
                    step_loss += torch.stack([(ce * w).sum().detach().cpu(),
                                              ((logits.argmax(-1) == labels).float() * w).sum().detach().cpu()])
                step += 1
                dist.all_reduce(step_loss)
                loss_value = step_loss[0].item() / counts[0].clamp_min(1.0).item()
                accuracy = step_loss[1].item() / counts[0].clamp_min(1.0).item()
                grad_norm = engine.get_global_grad_norm()
                grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
                finite = math.isfinite(loss_value)
                if not finite and not t.skip_nonfinite:
                    raise TrainingError(f"step {step}: non-finite loss ({loss_value}); set training.skip_nonfinite: "
                                        "true to skip such updates")
                progress.update(step, {"loss": loss_value, "accuracy": accuracy, "grad_norm": grad_norm}
                                if finite else None)
                evaluated = False
                if eval_sources and (step % freq.eval_log_freq == 0 or step == total_steps):
                    with progress.paused():
                        last_eval = evaluate(step)
                    if last_eval["eval/overall_accuracy"] > best["accuracy"]:
                        best = {"accuracy": last_eval["eval/overall_accuracy"], "step": step}
                    last_eval.update(best_overall_accuracy=best["accuracy"], best_model_step=best["step"])
                    logger.log(step, last_eval)
                    log.info("step %d eval: %s", step, ", ".join(f"{k.split('/')[-1]}={v:.4f}"
                                                                 for k, v in last_eval.items() if k.startswith("eval/")))
                    evaluated = True
                if step % config.output.save_freq == 0 or step == total_steps or (evaluated and best["step"] == step):
                    save(step)
                if (stop.agreed() or step == stop_after) and step < total_steps:
                    save(step)
                    log.warning("stopped at step %d on request; resume with --resume_from auto", step)
                    break
        if config.output.export_hf and step == total_steps and rank == 0:
            export_hf(engine.module, run_dir / "hf_final", config, label_map)
            log.info("wrote the classifier in HF format to %s", run_dir / "hf_final")
    finally:
        progress.close()
        logger.close()
    return {**last_eval, "step": step, "run_dir": str(run_dir), "best": best, "skipped_updates": progress.skipped,
            "bad_images": bad.counts()}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m qvl_torch.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--deepspeed", "--deepspeed_config", dest="deepspeed", default=None,
                        help="DeepSpeed JSON (default: ZeRO-2 with everything from the YAML)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--resume_from", default=None, metavar="PATH|auto")
    parser.add_argument("--stop_after_steps", type=int, default=None, metavar="N")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # the deepspeed launcher's
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    try:
        config = load_config(args.config, args.set)
        result = run(config, deepspeed_config=args.deepspeed, resume_from=args.resume_from,
                     stop_after=args.stop_after_steps)
    except (SchemaError, DataError, CheckpointError, TrainingError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if int(os.environ.get("RANK", 0)) == 0:
        summary = {k: v for k, v in result.items() if k.startswith("eval/") and k.endswith("accuracy")}
        print(json.dumps({"run_dir": result["run_dir"], "step": result["step"], **summary, "best": result["best"]},
                         indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
