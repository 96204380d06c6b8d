"""The PyTorch reference trainer: transformers' Qwen2.5-VL + the shared head under DeepSpeed.

    python -m qvl_torch.train --config configs/X.yaml --deepspeed configs/ds_config_zero2.json [--resume_from PATH|auto]
    deepspeed --num_gpus 8 --module qvl_torch.train --config ... --deepspeed ...      (or torchrun)

The schedule, metrics, output layout and FLOP accounting are `qvl_core.loop.train`,
shared with `qvl_jax.train`; this file is the DeepSpeed side of it. The optimizer
(`qvl_torch.optim`) matches optax's step for step.
"""

from __future__ import annotations

import argparse
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

import torch
import torch.distributed as dist

from qvl_core import loop
from qvl_core.config import RunConfig
from qvl_core.data import EvalSource, LabelMap, TrainSource, expand_patches
from qvl_core.hf_checkpoint import CheckpointError
from qvl_core.runs import EvalTally, checkpoint_steps, export_metadata, process_rss_gb, start_run
from qvl_core.schema import SchemaError
from qvl_torch.data import make_loader
from qvl_torch.ds_config import resolve_ds_config
from qvl_torch.model import TorchQwenVLClassifier, build_classifier, choose_attention
from qvl_torch.optim import lr_multiplier, make_optimizer

log = logging.getLogger("qvl_torch.train")
TrainingError = loop.TrainingError


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
        # DeepSpeed compiles a shared-memory all-reduce op (~30 s) on first use on CPU; gloo does the job here.
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return dist.get_rank(), dist.get_world_size(), device


class TorchBackend:
    """`qvl_core.loop.Backend` for PyTorch: a DeepSpeed engine over transformers' model, torch DataLoaders."""

    def __init__(self, config: RunConfig, data, geometry: loop.Geometry, engine, device: torch.device):
        self.config, self.data, self.geometry, self.engine, self.device = config, data, geometry, engine, device
        self.process_index, self.world = dist.get_rank(), dist.get_world_size()
        self.device_kind = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        self.model_config = engine.module.config
        self.compute_dtype = torch.bfloat16 if config.model.compute_dtype == "bfloat16" else torch.float32
        t = config.training
        self.train_source = TrainSource(data, seed=t.seed, num_records=geometry.total_steps * geometry.global_batch)
        eval_global = (t.eval_batch_size or t.batch_size) * self.world
        self.eval_sources = {name: (EvalSource(data, name, pad_to=eval_global), eval_global) for name in data.eval}
        self._multiplier = lr_multiplier(t, geometry.total_steps)
        # Never apply a non-finite update: DeepSpeed checks the gradients for inf/nan only in fp16 (or where bf16's
        # check is on) and would otherwise step on them in float32. With the check its ZeRO optimizer skips the
        # update, zeroes the gradients and leaves the schedule where it was, as optax.apply_if_finite does.
        if not hasattr(engine.optimizer, "check_grad_overflow"):
            raise SchemaError("DeepSpeed config: qvl needs a ZeRO optimizer (zero_optimization.stage 1 or 2), which "
                              "can skip non-finite updates")
        engine.optimizer.check_grad_overflow = True

    def _pixels(self, batch: dict) -> torch.Tensor:
        return torch.from_numpy(expand_patches(batch["patches"].numpy())).to(device=self.device,
                                                                             dtype=self.compute_dtype)

    # --- loop.Backend
    def is_checkpoint(self, step_dir: Path) -> bool:
        return any(step_dir.glob("mp_rank_*_model_states.pt"))

    def restore(self, step_dir: Path) -> dict:
        _, client = self.engine.load_checkpoint(str(step_dir.parent), tag=step_dir.name)
        if client is None:
            raise CheckpointError(f"{step_dir}: DeepSpeed could not load this checkpoint")
        return client

    def batches(self, start_step: int):
        return iter(make_loader(self.train_source, batch_size=self.geometry.process_batch, rank=self.process_index,
                                world_size=self.world, num_workers=self.config.training.dataloader_num_workers,
                                start_batch=start_step))

    def train_step(self, batch: dict) -> dict[str, float]:
        engine, t, g = self.engine, self.config.training, self.geometry
        count = batch["valid"].float().sum().reshape(1)
        dist.all_reduce(count)  # valid examples of the whole global batch
        denom = count[0].clamp_min(1.0)
        sums = torch.zeros(2)  # loss sum, correct
        skipped = engine.skipped_steps
        for a in range(g.accumulation):
            part = {k: batch[k][a * g.micro_batch:(a + 1) * g.micro_batch] for k in ("patches", "label", "valid")}
            logits = engine(self._pixels(part), self.config.data.grid_thw).logits.float()
            labels = part["label"].long().to(self.device)
            w = part["valid"].float().to(self.device)
            ce = torch.nn.functional.cross_entropy(logits, labels, reduction="none", label_smoothing=t.label_smoothing)
            # DeepSpeed averages over accumulation steps and processes; undo that so the gradient is
            # d(sum of losses over the global batch)/d(params) / (valid examples), as in the JAX step.
            engine.backward((ce * w).sum() * (g.accumulation * self.world) / denom)
            engine.step()
            sums += torch.stack([(ce * w).sum().detach().cpu(),
                                 ((logits.argmax(-1) == labels).float() * w).sum().detach().cpu()])
        dist.all_reduce(sums)
        grad_norm = engine.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        loss = sums[0].item() / denom.item()
        applied = engine.skipped_steps == skipped
        return {"loss": loss, "accuracy": sums[1].item() / denom.item(), "grad_norm": grad_norm,
                "finite": float(applied and math.isfinite(loss))}

    def fetch(self, measurements: dict[str, float]) -> dict[str, float]:
        return measurements  # already on the host: torch runs eagerly

    def evaluate(self) -> EvalTally:
        engine, world = self.engine, self.world
        engine.eval()
        tally = EvalTally(self.data.label_map.names)
        with torch.no_grad():
            for name, (source, global_batch) in self.eval_sources.items():
                rows = []
                for batch in make_loader(source, batch_size=global_batch // world, rank=self.process_index,
                                         world_size=world):
                    logits = engine(self._pixels(batch), self.config.data.grid_thw).logits.float()
                    losses = torch.nn.functional.cross_entropy(logits, batch["label"].long().to(self.device),
                                                               reduction="none")
                    top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
                    rows.append((losses.cpu().numpy(), top.cpu().numpy(), batch["label"].numpy(),
                                 batch["valid"].numpy()))
                gathered = [None] * world
                dist.all_gather_object(gathered, rows)
                for part in gathered:
                    for losses, preds, labels, valid in part:
                        tally.add(name, losses, preds, labels, valid)
        engine.train()
        return tally

    def save(self, step: int, meta: dict, accuracy: float | None) -> None:
        checkpoints = self.config.run_dir / "checkpoints"
        self.engine.save_checkpoint(str(checkpoints), tag=str(step), client_state=meta)
        if self.process_index == 0:
            best = meta["best"]
            if best["step"] is not None:
                (checkpoints / "best.json").write_text(json.dumps(best) + "\n")
            _prune(checkpoints, self.config.output.keep_checkpoints, best["step"])
        dist.barrier()

    def export(self, step: int, best: loop.Best) -> None:
        run_dir, label_map = self.config.run_dir, self.data.label_map
        if self.process_index == 0:
            export_hf(self.engine.module, run_dir / "hf_final", self.config, label_map)
            log.info("wrote the classifier in HF format to %s", run_dir / "hf_final")
        best_dir = run_dir / "checkpoints" / str(best.step)
        if best.step is not None and best.step != step and best_dir.is_dir():
            self.engine.load_checkpoint(str(best_dir.parent), tag=best_dir.name, load_module_only=True)
            if self.process_index == 0:
                export_hf(self.engine.module, run_dir / "hf_best", self.config, label_map)
                log.info("wrote the best classifier (step %d) in HF format to %s", best.step, run_dir / "hf_best")

    def lr_at(self, update: int) -> float:
        return self.config.training.learning_rate * self._multiplier(update)

    def memory_gb(self) -> float:
        return torch.cuda.memory_allocated(self.device) / 1e9 if self.device.type == "cuda" else process_rss_gb()

    def any_process(self, flag: bool) -> bool:
        t = torch.tensor([int(flag)])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def close(self) -> None:
        pass  # DeepSpeed's saves are synchronous; the loaders end with their iterators


def export_hf(model: TorchQwenVLClassifier, path: Path, config: RunConfig, label_map: LabelMap) -> None:
    """The classifier in the hub key layout (visual.*, model.*, classifier.*), readable by qvl_jax.load_hf."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    from qvl_core.parts import canonical_hf_key

    path.mkdir(parents=True, exist_ok=True)
    state = {canonical_hf_key(name): tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
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


def setup(config: RunConfig, *, deepspeed_config: str | None = None,
          resume_from: str | None = None) -> tuple[loop.Run, TorchBackend]:
    """Processes, checked data, the DeepSpeed engine over the classifier: what `loop.train` runs."""
    import deepspeed

    if config.model.lora is not None:
        raise SchemaError("model.lora: the PyTorch trainer has no LoRA yet (peft adapters are the next step of "
                          "the LoRA work); train LoRA with python -m qvl_jax.train")

    rank, world, device = init_processes()
    data, config = start_run(config, rank, "torch", resume_from=resume_from)
    ds_config = resolve_ds_config(deepspeed_config, config, world)
    g = loop.batch_geometry(config.training, devices=world, processes=world,
                            epoch_length=TrainSource(data, seed=config.training.seed).epoch_length)
    log.info("%d process(es) on %s; ZeRO stage %s; global batch %d = %d per process x %d x %d accumulation; %d steps",
             world, device, ds_config.get("zero_optimization", {}).get("stage", 0), g.global_batch, g.micro_batch,
             world, g.accumulation, g.total_steps)
    attention = choose_attention(config.model.attention, device)
    model = build_classifier(config, data.label_map, attention)
    if config.training.gradient_checkpointing:
        model.model.gradient_checkpointing_enable()
    optimizer, scheduler = make_optimizer(model, config, g.total_steps)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config,
                                      dist_init_required=False)
    backend = TorchBackend(config, data, g, engine, device)
    return loop.Run(config, data, g, backend.model_config), backend


def run(config: RunConfig, *, deepspeed_config: str | None = None, resume_from: str | None = None,
        stop_after: int | None = None) -> dict[str, Any]:
    """Trains per `config` (see `qvl_jax.train.run`: the same schedule and results)."""
    spec, backend = setup(config, deepspeed_config=deepspeed_config, resume_from=resume_from)
    return loop.train(spec, backend, resume_from=resume_from, stop_after=stop_after)


def main(argv=None) -> int:
    def extra(parser):
        parser.add_argument("--deepspeed", "--deepspeed_config", dest="deepspeed", default=None,
                            help="DeepSpeed JSON (default: ZeRO-2 with everything from the YAML)")
        parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # the launcher's

    args = loop.parse_args("python -m qvl_torch.train", __doc__.splitlines()[0], argv, extra)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    try:
        return loop.main(run, args, deepspeed_config=args.deepspeed)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
