"""The training schedule, written once for both trainers.

`train(run, backend)` is the whole loop: resume, then per step: a batch, the update,
the metrics, and when it is time, an evaluation, a checkpoint or a stop; at the end
the HF export. What differs between JAX and PyTorch is behind `Backend` (build the
state, run a step, evaluate, save, restore, export); everything a user sees (when
things happen, the metric names, resume checks, best-model tracking, SIGTERM, the
result, the command line) is here, so both trainers behave the same by construction.

The decisions are small pure functions (`Schedule`, `Best`, `batch_geometry`,
`resolve_resume`, `check_resume`), tested without a model (tests/test_loop.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

from qvl_core import flops as flops_lib
from qvl_core import parts
from qvl_core.data import BadRecords, DataError, LabelMap
from qvl_core.hf_checkpoint import CheckpointError
from qvl_core.metrics import MetricsLogger
from qvl_core.runs import EvalTally, Progress, StopRequest, checkpoint_steps
from qvl_core.schema import SchemaError, to_dict

log = logging.getLogger("qvl.train")


class TrainingError(RuntimeError):
    """A run that cannot go on (non-finite loss, impossible batch geometry, ...)."""


# ----------------------------------------------------------------------------- decisions


@dataclasses.dataclass(frozen=True)
class Geometry:
    """How a global batch is laid out, and how many steps the run takes."""

    processes: int
    devices: int  # data-parallel replicas: JAX devices of all processes, or DeepSpeed ranks
    micro_batch: int  # per device
    accumulation: int
    epoch_length: int  # records in one epoch of the training mixture
    total_steps: int

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.devices * self.accumulation

    @property
    def process_batch(self) -> int:
        return self.global_batch // self.processes


def batch_geometry(training, *, devices: int, processes: int, epoch_length: int) -> Geometry:
    """The batch layout of `training` (a `TrainingConfig`) on `devices`; checks `global_batch_size`."""
    t = training
    global_batch = t.batch_size * devices * t.gradient_accumulation_steps
    if t.global_batch_size is not None and t.global_batch_size != global_batch:
        if t.global_batch_size % (devices * t.gradient_accumulation_steps):
            raise SchemaError(f"training.global_batch_size {t.global_batch_size} does not divide over {devices} "
                              f"devices x {t.gradient_accumulation_steps} accumulation steps")
        raise SchemaError(f"training.global_batch_size {t.global_batch_size} != batch_size {t.batch_size} x "
                          f"{devices} devices x {t.gradient_accumulation_steps} accumulation = {global_batch}")
    total = t.max_steps or max(1, math.ceil(t.num_epochs * epoch_length / global_batch))
    return Geometry(processes, devices, t.batch_size, t.gradient_accumulation_steps, epoch_length, total)


@dataclasses.dataclass(frozen=True)
class Schedule:
    """When to evaluate, save and stop (steps count from 1; the last step is `total_steps`)."""

    total_steps: int
    eval_every: int
    save_every: int
    has_eval: bool = True

    @classmethod
    def from_config(cls, config, total_steps: int, has_eval: bool) -> "Schedule":
        return cls(total_steps, config.monitor.all_freq.eval_log_freq, config.output.save_freq, has_eval)

    def evaluates(self, step: int) -> bool:
        return self.has_eval and (step % self.eval_every == 0 or step == self.total_steps)

    def saves(self, step: int, *, new_best: bool) -> bool:
        """Every `save_every` steps, at the end, and whenever an evaluation found a new best model."""
        return step % self.save_every == 0 or step == self.total_steps or new_best

    def stops(self, step: int, *, requested: bool, stop_after: int | None) -> bool:
        """A stop before the end: asked for (SIGTERM, Ctrl-C) or `--stop_after_steps`."""
        return (requested or step == stop_after) and step < self.total_steps


@dataclasses.dataclass
class Best:
    """The best evaluation so far (`eval/overall_accuracy`); ties keep the earlier step."""

    accuracy: float = -1.0
    step: int | None = None

    def update(self, step: int, accuracy: float) -> bool:
        """Records an evaluation; True when it is a new best."""
        if accuracy > self.accuracy:
            self.accuracy, self.step = accuracy, step
            return True
        return False

    def to_json(self) -> dict:
        return {"accuracy": self.accuracy, "step": self.step}


def latest_checkpoint(directory: Path, is_checkpoint: Callable[[Path], bool]) -> Path | None:
    """The newest step folder of `directory` that `is_checkpoint` accepts, or None."""
    steps = [s for s in checkpoint_steps(directory) if is_checkpoint(Path(directory) / str(s))]
    return Path(directory) / str(steps[-1]) if steps else None


def resolve_resume(resume_from: str | None, run_dir: Path, is_checkpoint: Callable[[Path], bool]) -> Path | None:
    """The step directory to resume from: `auto` (this run's latest, if any), a step, checkpoints/ or run dir."""
    if resume_from is None:
        return None
    if resume_from == "auto":
        found = latest_checkpoint(Path(run_dir) / "checkpoints", is_checkpoint)
        if found is None:
            log.info("--resume_from auto: no checkpoint in %s, starting fresh", run_dir)
        return found
    path = Path(resume_from)
    if not path.exists():
        raise FileNotFoundError(f"--resume_from {path}: no such directory")
    if path.name.isdigit() and is_checkpoint(path):
        return path
    for candidate in (path, path / "checkpoints"):
        found = latest_checkpoint(candidate, is_checkpoint)
        if found is not None:
            return found
    raise FileNotFoundError(f"--resume_from {path}: no checkpoint of this trainer there or in {path / 'checkpoints'}")


def check_resume(meta: dict, source: Path, label_map: LabelMap, geometry: Geometry) -> None:
    """A checkpoint continues this run only with the same labels and the same global batch."""
    label_map.check_compatible(LabelMap.from_json(meta["label_map"]), f"checkpoint {source}")
    if meta["global_batch"] != geometry.global_batch:
        per_device = meta["global_batch"] / (geometry.devices * geometry.accumulation)
        fix = (f"set training.batch_size to {int(per_device)}" if per_device == int(per_device) else
               "change training.batch_size or gradient_accumulation_steps")
        raise SchemaError(f"checkpoint {source} was trained with a global batch of {meta['global_batch']}, this run "
                          f"has {geometry.global_batch} ({geometry.micro_batch} per device x {geometry.devices} "
                          f"devices x {geometry.accumulation} accumulation): {fix} so that they agree")


# Model keys that decide which weights a checkpoint holds and which of them train (its state's structure).
STATE_KEYS = ("lora", "freeze_vision", "freeze_merger", "freeze_decoder", "mode")


def check_model(saved_config: dict, source: Path, model_config) -> None:
    """Before a checkpoint's state is read: it must hold the weights this run's model has (same LoRA adapters,
    same frozen parts), else a one-line error naming the key, instead of a tree mismatch from the reader."""
    saved = saved_config.get("model", {})
    now = to_dict(model_config)
    for key in STATE_KEYS:
        if key in saved and saved[key] != now.get(key):
            raise SchemaError(f"checkpoint {source} was trained with model.{key} = {_show(saved[key])}, this run has "
                              f"{_show(now.get(key))}: set model.{key} as it was to resume it (or start a new run "
                              f"from its HF export with model.pretrained_name)")


def _show(value) -> str:
    return "null" if value is None else json.dumps(value, sort_keys=True) if isinstance(value, dict) else str(value)


# ----------------------------------------------------------------------------- the backend


class Backend(Protocol):
    """What a framework supplies to `train`. Built with the model, optimizer and loaders in place."""

    process_index: int
    device_kind: str  # for the peak-FLOPs table

    def is_checkpoint(self, step_dir: Path) -> bool: ...
    def restore(self, step_dir: Path) -> dict: ...  # -> the meta saved with it; state loaded in place
    def batches(self, start_step: int) -> Iterator[dict]: ...  # host batches from stream position start_step
    def train_step(self, batch: dict) -> Any: ...  # dispatch an update; a handle for `fetch`
    def fetch(self, handle) -> dict[str, float]: ...  # -> loss, accuracy, grad_norm, finite (1.0 / 0.0)
    def evaluate(self) -> EvalTally: ...
    def save(self, step: int, meta: dict, accuracy: float | None) -> None: ...
    def export(self, step: int, best: Best) -> None: ...  # HF export(s) at the end of the run
    def lr_at(self, update: int) -> float: ...  # the learning rate of the update with this 0-based index
    def memory_gb(self) -> float: ...
    def any_process(self, flag: bool) -> bool: ...
    def close(self) -> None: ...  # wait for checkpoints, stop loaders


@dataclasses.dataclass
class Run:
    """What `train` needs besides the backend."""

    config: Any  # qvl_core.config.RunConfig
    data: Any  # qvl_core.data.Data
    geometry: Geometry
    model_config: Any  # qvl_core.model_config.QwenVLConfig of the classifier being trained


# ----------------------------------------------------------------------------- the loop


def train(run: Run, backend: Backend, *, resume_from: str | None = None,
          stop_after: int | None = None) -> dict[str, Any]:
    """Trains to `total_steps` (or a stop); returns the last evaluation, the step, the best model and counts."""
    config, g, me = run.config, run.geometry, backend.process_index
    schedule = Schedule.from_config(config, g.total_steps, has_eval=bool(run.data.eval))
    start_step, best, step, last_eval = 0, Best(), 0, {}
    logger = progress = None
    bad = BadRecords(run.data, log)
    pending: list = []  # (step, handle) of the update in flight: fetched a step later, so dispatch stays async

    def finish_pending() -> None:
        while pending:
            done, handle = pending.pop(0)
            _record_update(done, backend.fetch(handle), progress, config.training.skip_nonfinite)

    try:
        start_step, best = _resume(run, backend, resume_from)
        logger = MetricsLogger(config.run_dir, config=config.to_dict(), wandb_cfg=config.monitor.wandb,
                               enabled=me == 0, run_name=config.output.run_name)
        progress = _progress(run, backend, logger, start_step)
        step = start_step
        with StopRequest(backend.any_process) as stop:
            batches = backend.batches(start_step)
            while step < g.total_steps:
                batch = next(batches)
                bad.update(batch)
                handle = backend.train_step(batch)
                del batch  # with grain's workers its arrays are shared memory: released now, not a step later
                step += 1
                finish_pending()
                pending.append((step, handle))
                accuracy, new_best = None, False  # of an evaluation at this step
                if schedule.evaluates(step):
                    finish_pending()
                    with progress.paused():
                        last_eval = _evaluate(backend, run, step)
                    accuracy = last_eval["eval/overall_accuracy"]
                    new_best = best.update(step, accuracy)
                    last_eval.update(best_overall_accuracy=best.accuracy, best_model_step=best.step)
                    logger.log(step, last_eval)
                stopping = schedule.stops(step, requested=stop.agreed(), stop_after=stop_after)
                if schedule.saves(step, new_best=new_best) or stopping:
                    finish_pending()
                    with progress.paused():
                        backend.save(step, _meta(run, step, best), accuracy)
                if stopping:
                    log.warning("stopped at step %d on request; resume with --resume_from auto", step)
                    break
            finish_pending()
        if config.output.export_hf and step == g.total_steps:
            backend.export(step, best)
    finally:
        backend.close()
        for opened in (progress, logger):
            if opened is not None:
                opened.close()
    return {**last_eval, "step": step, "start_step": start_step, "run_dir": str(config.run_dir),
            "process_index": me, "best": best.to_json(), "skipped_updates": progress.skipped,
            "bad_images": bad.counts()}


def _resume(run: Run, backend: Backend, resume_from: str | None) -> tuple[int, Best]:
    """(the step to continue after, the best evaluation so far): (0, Best()) for a fresh run."""
    source = resolve_resume(resume_from, run.config.run_dir, backend.is_checkpoint)
    if source is None:
        return 0, Best()
    meta = backend.restore(source)
    check_resume(meta, source, run.data.label_map, run.geometry)
    log.info("resumed from %s at step %d", source, meta["step"])
    if backend.process_index == 0:
        _drop_metrics_after(run.config.run_dir / "logs" / "metrics.jsonl", meta["step"])
    return meta["step"], Best(**meta["best"])


def _record_update(step: int, m: dict[str, float], progress: Progress, skip_nonfinite: bool) -> None:
    if not m["finite"]:
        if not skip_nonfinite:
            raise TrainingError(f"step {step}: non-finite loss ({m['loss']}) or gradient norm ({m['grad_norm']}); "
                                "set training.skip_nonfinite: true to skip such updates")
        log.warning("step %d: non-finite loss/gradients, update skipped (%d so far)", step, progress.skipped + 1)
    progress.update(step, m if m["finite"] else None)


def _evaluate(backend: Backend, run: Run, step: int) -> dict[str, float]:
    tally = backend.evaluate()
    if backend.process_index == 0:
        tally.write_confusion(run.config.run_dir / "eval" / f"confusion_step{step}.csv")
    metrics = tally.metrics()
    log.info("step %d eval: %s", step, ", ".join(f"{k.split('/')[-1]}={v:.4f}" for k, v in metrics.items()))
    return metrics


def _meta(run: Run, step: int, best: Best) -> dict:
    """What a checkpoint records beside the state (both trainers; `check_resume` reads it back)."""
    return {"step": step, "best": best.to_json(), "label_map": run.data.label_map.to_json(),
            "config": run.config.to_dict(), "total_steps": run.geometry.total_steps,
            "global_batch": run.geometry.global_batch}


def _progress(run: Run, backend: Backend, logger: MetricsLogger, start_step: int) -> Progress:
    config, g = run.config, run.geometry
    step_flops = flops_lib.train_flops_per_sample(run.model_config, config.data.grid_thw,
                                                  trainable=parts.trainable_parts(config.model)) * g.global_batch
    peak = flops_lib.peak_tflops(backend.device_kind, config.perf.peak_tflops)
    if peak is None:
        log.info("perf/mfu is null: no known peak for device %r (set perf.peak_tflops)", backend.device_kind)
    return Progress(logger, config.monitor.all_freq, total_steps=g.total_steps, start_step=start_step,
                    global_batch=g.global_batch, epoch_length=g.epoch_length, lr_at=backend.lr_at,
                    step_flops=step_flops, devices=g.devices, peak=peak, memory_gb=backend.memory_gb,
                    show_bar=backend.process_index == 0 and config.monitor.progress_bar)


def _drop_metrics_after(path: Path, step: int) -> None:
    """A resumed run logs the steps after its checkpoint again: drop the earlier run's records of them."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if not line.strip() or json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
        log.info("%s: dropped %d records after step %d (logged after that checkpoint was written)", path,
                 len(lines) - len(kept), step)
        path.write_text("".join(kept))


# ----------------------------------------------------------------------------- the command line


def parse_args(prog: str, description: str, argv=None, extra: Callable | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", required=True, help="YAML run config (see configs/)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set training.batch_size=4 (repeatable)")
    parser.add_argument("--stop_after_steps", type=int, default=None, metavar="N",
                        help="save a checkpoint and exit after step N (e.g. to fit a scheduler's time slot); "
                             "continue with --resume_from auto")
    parser.add_argument("--resume_from", default=None, metavar="PATH|auto",
                        help="a checkpoint step directory, a checkpoints/ or run directory, or 'auto' "
                             "(the latest checkpoint of this run's output directory, if any)")
    if extra is not None:
        extra(parser)
    return parser.parse_args(argv)


USER_ERRORS = (SchemaError, DataError, CheckpointError, TrainingError, FileNotFoundError)


def main(run_fn: Callable[..., dict], args: argparse.Namespace, **run_kwargs) -> int:
    """Loads the config, trains, prints the summary (process 0); a user error is one line and exit status 2."""
    from qvl_core.config import load_config

    try:
        config = load_config(args.config, args.set)
        result = run_fn(config, resume_from=args.resume_from, stop_after=args.stop_after_steps, **run_kwargs)
    except USER_ERRORS as e:
        log.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        return 2
    if result.get("process_index", 0) == 0:
        summary = {k: v for k, v in result.items() if k.startswith("eval/") and k.endswith("accuracy")}
        print(json.dumps({"run_dir": result["run_dir"], "step": result["step"], **summary, "best": result["best"]},
                         indent=1))
    return 0
