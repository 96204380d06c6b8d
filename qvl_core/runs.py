"""What every trainer does around its steps: logging set-up, graceful stop, eval bookkeeping."""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import time
import sys
from pathlib import Path
from typing import Callable

import numpy as np

log = logging.getLogger(__name__)


def checkpoint_steps(directory: Path) -> list[int]:
    """The numbered step folders in `directory` (both trainers' layout), oldest first; [] if there is none."""
    try:
        return sorted(int(p.name) for p in Path(directory).iterdir() if p.name.isdigit())
    except (FileNotFoundError, NotADirectoryError):
        return []


def claim_run_dir(run_dir: Path, *, resume_from: str | None, overwrite: bool, process_index: int) -> None:
    """A fresh run must not land on an earlier run's checkpoints (orbax would refuse the first save).

    Resuming is fine; with `output.overwrite` process 0 removes the earlier checkpoints, exports,
    evaluation files and metrics; otherwise the error says what to do.
    """
    import shutil

    from qvl_core.schema import SchemaError
    steps = checkpoint_steps(run_dir / "checkpoints")  # [] also while process 0 removes it (overwrite)
    if not steps or resume_from is not None:
        return
    if not overwrite:
        shown = ", ".join(map(str, steps[-3:]))
        raise SchemaError(f"{run_dir} already holds checkpoints (step {shown}): pass --resume_from auto to continue "
                          f"that run, --set output.overwrite=true to start it over, or choose another "
                          f"output.run_name")
    if process_index == 0:
        log.warning("output.overwrite: removing the earlier run's checkpoints, exports and metrics in %s", run_dir)
        for name in ("checkpoints", "hf_final", "hf_best", "adapter_final", "adapter_best", "eval"):
            shutil.rmtree(run_dir / name, ignore_errors=True)
        (run_dir / "logs" / "metrics.jsonl").unlink(missing_ok=True)


def start_run(config, process_index: int, framework: str, resume_from: str | None = None):
    """Logging, the resolved config and the checked data with its label map, as every trainer starts.

    Returns (`qvl_core.data.Data`, the config with `model.pretrained_name` as a local directory: a hub repo
    id is fetched once where the hub is reachable). Raises DataError when nothing can be trained on,
    SchemaError when `model.num_labels` contradicts the data, CheckpointError for an unusable checkpoint name.
    """
    import dataclasses

    from qvl_core.hf_checkpoint import local_checkpoint

    from qvl_core.config import dump_config
    from qvl_core.data import DataError, load_data
    from qvl_core.schema import SchemaError

    run_dir = config.run_dir
    setup_logging(run_dir, process_index)
    claim_run_dir(run_dir, resume_from=resume_from, overwrite=config.output.overwrite, process_index=process_index)
    if process_index == 0:
        (run_dir / "config.yaml").write_text(dump_config(config))
        (run_dir / "logs" / "run.json").write_text(json.dumps({"framework": framework}) + "\n")
    data = load_data(config.data)
    log.info("data: %s", data.summary())
    if process_index == 0:
        data.label_map.save(run_dir / "label_map.json")
    if not data.train:
        raise DataError("no data set has a train split: nothing to train on")
    wanted, have = config.model.num_labels, data.label_map.num_labels
    if wanted is not None and wanted != have:
        raise SchemaError(f"model.num_labels is {wanted} but the data has {have} labels "
                          f"(label_space {data.label_map.space}); remove model.num_labels or fix the data sets")
    if config.model.pretrained_name is not None:
        local = str(local_checkpoint(config.model.pretrained_name))
        config = dataclasses.replace(config, model=dataclasses.replace(config.model, pretrained_name=local))
    return data, config


def setup_logging(run_dir: Path, process_index: int) -> None:
    """INFO to stderr (process 0; warnings elsewhere) and to <run>/logs/train.log (train.p<N>.log on others)."""
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    fmt = logging.Formatter(f"%(asctime)s [p{process_index}] %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    name = "train.log" if process_index == 0 else f"train.p{process_index}.log"
    target = str((run_dir / "logs" / name).resolve())
    for h in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
        if h.baseFilename != target:  # a previous run in this process
            root.removeHandler(h)
            h.close()
    if not any(isinstance(h, logging.FileHandler) for h in root.handlers):
        fh = logging.FileHandler(target)
        fh.setFormatter(fmt)
        root.addHandler(fh)
    streams = [h for h in root.handlers if type(h) is logging.StreamHandler]
    if not streams:
        streams = [logging.StreamHandler(sys.stderr)]
        root.addHandler(streams[0])
    for sh in streams:  # also restyle a handler some library's basicConfig() installed
        sh.setFormatter(fmt)
        sh.setLevel(logging.INFO if process_index == 0 else logging.WARNING)
    for noisy in ("absl", "jax._src", "orbax", "grain", "datasets", "urllib3", "DeepSpeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def process_rss_gb() -> float:
    """This process's resident memory in GB (what perf/gpu_memory_gb reports on a CPU)."""
    import os

    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9
    except OSError:
        return float("nan")


def export_metadata(config, label_map) -> dict:
    """What an HF export records beside the weights (config.json's qvl_classifier block), from either trainer."""
    return {"image_size": list(config.data.image_hw), "eval_crop_fraction": config.data.eval_crop_fraction,
            "label_space": label_map.space}


class StopRequest:
    """SIGTERM/SIGINT: finish the current step, save, exit 0 (a second Ctrl-C aborts).

    `any_process(flag) -> bool` tells whether any process was asked to stop, so all stop at the same step.
    """

    def __init__(self, any_process: Callable[[bool], bool] = lambda flag: flag):
        self.requested = False
        self.any_process = any_process
        self._previous: dict = {}

    def __enter__(self) -> "StopRequest":
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, _frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("received %s: stopping after this step (saving a checkpoint); press Ctrl-C again to abort",
                    signal.Signals(signum).name)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def agreed(self) -> bool:
        return self.any_process(self.requested)


class EvalTally:
    """Loss, top-1 and top-5 sums per data set and a confusion matrix, from host-side arrays."""

    def __init__(self, names: tuple[str, ...]):
        self.names = names
        self.confusion = np.zeros((len(names), len(names)), np.int64)
        self.sums: dict[str, list[float]] = {}

    def add(self, dataset: str, losses, top, labels, valid) -> None:
        """`top`: predicted classes, `[B]` or `[B, k]` best first."""
        valid = np.asarray(valid).astype(bool)
        top = np.asarray(top)
        top = top[:, None] if top.ndim == 1 else top
        losses, top, labels = np.asarray(losses)[valid], top[valid], np.asarray(labels)[valid]
        s = self.sums.setdefault(dataset, [0.0, 0.0, 0.0, 0.0])
        s[0] += float(losses.sum())
        s[1] += float((top[:, 0] == labels).sum())
        s[2] += float((top == labels[:, None]).any(-1).sum())
        s[3] += float(valid.sum())
        np.add.at(self.confusion, (labels, top[:, 0]), 1)

    def metrics(self) -> dict[str, float]:
        out, total = {}, [0.0, 0.0, 0.0, 0.0]
        for name, (loss, correct, top5, count) in self.sums.items():
            out[f"eval/{name}_loss"] = loss / max(count, 1)
            out[f"eval/{name}_accuracy"] = correct / max(count, 1)
            out[f"eval/{name}_top5_accuracy"] = top5 / max(count, 1)
            total = [a + b for a, b in zip(total, (loss, correct, top5, count))]
        out["eval/overall_loss"] = total[0] / max(total[3], 1)
        out["eval/overall_accuracy"] = total[1] / max(total[3], 1)
        out["eval/overall_top5_accuracy"] = total[2] / max(total[3], 1)
        return out

    def write_confusion(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w") as f:
            f.write("true\\pred," + ",".join(self.names) + "\n")
            for name, row in zip(self.names, self.confusion):
                f.write(name + "," + ",".join(map(str, row)) + "\n")

    def write_per_class(self, path: Path) -> None:
        """class, images, correct, accuracy (top-1), from the confusion matrix."""
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w") as f:
            f.write("class,images,correct,accuracy\n")
            for i, name in enumerate(self.names):
                n = int(self.confusion[i].sum())
                c = int(self.confusion[i, i])
                f.write(f"{name},{n},{c},{c / n if n else float('nan'):.6f}\n")

    def plot_confusion(self, path: Path, title: str = "confusion matrix") -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        n = len(self.names)
        rows = self.confusion.sum(1, keepdims=True)
        normalised = self.confusion / np.maximum(rows, 1)
        size = min(4 + n * 0.25, 24)
        fig, ax = plt.subplots(figsize=(size, size * 0.9))
        image = ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
        fig.colorbar(image, ax=ax, fraction=0.046, label="fraction of the true class")
        if n <= 40:
            ax.set_xticks(range(n), self.names, rotation=90, fontsize=7)
            ax.set_yticks(range(n), self.names, fontsize=7)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(title)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)


class Progress:
    """The training loop's bookkeeping, shared by both trainers: metric windows, step timing, MFU, the progress bar.

    `update(step, values)` once per optimizer step, in order; `values` is None for a skipped (non-finite) update.
    Logs `training/*` every `training_log_freq` steps (means over the window) and `perf/*` every `perf_log_freq`
    steps (the first step after a start, which includes compilation, is not timed, nor is the time spent under
    `paused()`: evaluation and checkpoints).
    """

    def __init__(self, logger, freq, *, total_steps: int, start_step: int, global_batch: int, epoch_length: int,
                 lr_at, step_flops: float, devices: int, peak: float | None, memory_gb, show_bar: bool):
        from qvl_core import flops as flops_lib

        self.logger, self.freq, self.start_step = logger, freq, start_step
        self.global_batch, self.epoch_length, self.lr_at = global_batch, epoch_length, lr_at
        self.mfu = lambda step_time: flops_lib.mfu(step_flops, step_time, devices, peak)
        self.memory_gb = memory_gb
        self.skipped = 0
        self.window = {"loss": 0.0, "accuracy": 0.0, "grad_norm": 0.0, "steps": 0}
        self.timing = {"time": 0.0, "steps": 0}
        self.shown: dict[str, str] = {}
        self.bar = None
        self._open = contextlib.ExitStack()
        if show_bar:
            from tqdm.auto import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self.bar = self._open.enter_context(tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                                                     dynamic_ncols=True))
            # Log lines go above the bar instead of onto its line.
            self._open.enter_context(logging_redirect_tqdm(tqdm_class=tqdm))
        self.tick = time.perf_counter()

    def update(self, step: int, values: dict | None) -> None:
        now = time.perf_counter()
        if values is None:
            self.skipped += 1
        else:
            for k in ("loss", "accuracy", "grad_norm"):
                self.window[k] += values[k]
            self.window["steps"] += 1
        if step > self.start_step + 1:
            self.timing["time"] += now - self.tick
            self.timing["steps"] += 1
        self.tick = now
        if self.bar is not None:
            self.bar.update(1)
        if step % self.freq.training_log_freq == 0:
            k = self.window["steps"]
            record = {"training/lr": float(self.lr_at(step - 1)),  # the rate this step's update used
                      "training/epoch": step * self.global_batch / self.epoch_length,
                      "training/skipped_updates": self.skipped}
            if k:
                record.update({f"training/{name}": self.window[name] / k for name in ("loss", "accuracy", "grad_norm")})
                self.shown["loss"] = f"{record['training/loss']:.4f}"
                self.shown["acc"] = f"{record['training/accuracy']:.3f}"
            self.logger.log(step, record)
            self.window = {"loss": 0.0, "accuracy": 0.0, "grad_norm": 0.0, "steps": 0}
        if step % self.freq.perf_log_freq == 0 and self.timing["steps"]:
            step_time = self.timing["time"] / self.timing["steps"]
            self.logger.log(step, {"perf/step_time": step_time, "perf/samples_per_second": self.global_batch / step_time,
                                   "perf/mfu": self.mfu(step_time), "perf/gpu_memory_gb": self.memory_gb()})
            self.shown["samples/s"] = f"{self.global_batch / step_time:.0f}"
            self.timing = {"time": 0.0, "steps": 0}
        if self.bar is not None and step % min(self.freq.training_log_freq, self.freq.perf_log_freq) == 0:
            self.bar.set_postfix(self.shown, refresh=False)

    @contextlib.contextmanager
    def paused(self):
        """Work between two steps that is not training (evaluation, checkpoints): left out of `perf/*`."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.tick += time.perf_counter() - start

    def close(self) -> None:
        self._open.close()
