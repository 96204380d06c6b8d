"""A tiny run config on a generated Food-101-layout set, for trainer tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from qvl_core.data import fixtures

TINY_MODEL = {
    "vision_config": {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 32,
                      "window_size": 56, "fullatt_block_indexes": [1]},
    "text_config": {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                    "num_attention_heads": 2, "num_key_value_heads": 1,
                    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}},
    "vision_start_token_id": 60, "vision_end_token_id": 61, "image_token_id": 62, "video_token_id": 63,
}


def tiny_config(tmp: Path, *, run_name: str = "run", classes=("apple_pie", "bibimbap", "churros"),
                train_per_class: int = 8, **sections) -> dict:
    data_dir = tmp / "food"
    if not data_dir.exists():
        fixtures.write_food101(data_dir, list(classes), train_per_class=train_per_class, test_per_class=2)
    config = {
        "model": {"config": TINY_MODEL, "param_dtype": "float32", "compute_dtype": "float32"},
        "data": {"datasets": [{"name": "food", "format": "food101", "path": str(data_dir)}], "image_size": 56,
                 "augment": {"scale": [0.5, 1.0]}},
        "training": {"max_steps": 6, "learning_rate": 1e-3, "warmup_steps": 2, "batch_size": 4,
                     "dataloader_num_workers": 0},
        "sharding": {"strategy": "dp"},
        "monitor": {"all_freq": {"training_log_freq": 1, "eval_log_freq": 3, "perf_log_freq": 2},
                    "wandb": {"mode": "disabled"}, "progress_bar": False},
        "output": {"dir": str(tmp / "outputs"), "run_name": run_name, "save_freq": 100, "async_checkpointing": False},
    }
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    return config


def write_config(tmp: Path, config: dict, name: str = "config.yaml") -> Path:
    path = tmp / name
    path.write_text(yaml.safe_dump(config))
    return path


def losses(run_dir: Path) -> dict[int, float]:
    from qvl_core.metrics import read_metrics

    return {r["step"]: r["training/loss"] for r in read_metrics(run_dir / "logs" / "metrics.jsonl")
            if "training/loss" in r}


def logged_steps(run_dir: Path) -> list[int]:
    """The steps of metrics.jsonl's training/loss records, in file order (a step logged twice shows twice)."""
    import json

    lines = (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()
    return [r["step"] for r in map(json.loads, lines) if "training/loss" in r]


def resumed_at(log: str) -> int:
    """The step a resumed run's log says it continued from."""
    import re

    found = re.findall(r"resumed from \S+ at step (\d+)", log)
    assert len(found) == 1, log[-3000:]
    return int(found[0])


def with_devices(n: int) -> str:
    """XLA_FLAGS for a process with `n` simulated CPU devices, keeping the session's other flags."""
    kept = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    return " ".join(kept + [f"--xla_force_host_platform_device_count={n}"])


def train_subprocess(config_path: Path, *extra: str, devices: int | None = None, env: dict | None = None,
                     timeout: int = 1800, wait: bool = True):
    cmd = [sys.executable, "-m", "qvl_jax.train", "--config", str(config_path), *extra]
    full_env = {**os.environ, **(env or {})}
    if devices:
        full_env["XLA_FLAGS"] = with_devices(devices)
    if not wait:
        return subprocess.Popen(cmd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def stop_with_sigterm(proc: subprocess.Popen, ready, timeout: float) -> str:
    """Waits until `ready()` (at most `timeout` s), sends SIGTERM, returns the output once `proc` exits."""
    deadline = time.time() + timeout
    while time.time() < deadline and not ready():
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=timeout)
    return out


def held_bytes_report(config_path: str, runs: str, steps: int) -> None:
    """Per run: the loss of each of `steps` train steps (the trainer's step on the trainer's batches), the bytes
    device 0 holds after the first (master parameters with the frozen ones, the compute copy, gradients as the
    step laid them out, optimizer state) and the largest difference between its final master parameters and
    those of the run before it. A run is `strategy[:compute dtype][:mode]`. Mode `replicated` lays the state out
    without a compute copy (the parameters whole on every device, cast inside the step), as a reference; mode
    `resumed` saves a checkpoint after step 2, takes a step it throws away, restores the checkpoint (weights,
    optimizer state, data iterator) and goes on from there.
    Run in a process with simulated devices (see test_train)."""
    import dataclasses
    import json

    import jax
    import numpy as np

    from qvl_core.config import load_config
    from qvl_jax import sharding
    from qvl_jax.steps import TRAINED, make_train_step, to_global, to_host
    from qvl_jax.train import setup

    base, report, last = load_config(config_path), {}, None
    for index, name in enumerate(runs.split(",")):
        strategy, dtype, mode = (name.split(":") + [None, None])[:3]
        model = dataclasses.replace(base.model, compute_dtype=dtype or base.model.compute_dtype)
        config = dataclasses.replace(base, model=model, output=dataclasses.replace(base.output, run_name=f"run{index}"),
                                     sharding=dataclasses.replace(base.sharding, strategy=strategy))
        _, backend = setup(config)
        s, c = backend.state, backend.config
        trained = {k: s[k] for k in TRAINED}
        step = backend.make_step(return_grads=True)
        if mode == "replicated":
            shardings = dict(backend.shardings, params=backend.layout.params(s["params"]), compute=None)
            trained = {"params": jax.device_put(s["params"], shardings["params"]), "compute": None,
                       "opt_state": s["opt_state"]}
            step = make_train_step(backend.graphdef, backend.tx, backend.layout, shardings, grid=c.data.grid_thw,
                                   dtype=backend.opts.jnp_dtype, label_smoothing=c.training.label_smoothing,
                                   accum=backend.geometry.accumulation, return_grads=True)
        batches, losses = backend.batches(0), []
        for i in range(steps):
            if mode == "resumed" and i == 2:
                backend.state.update(trained)
                backend.save(2, {"step": 2}, None)
                backend.ckpt.wait()
                step(trained, s["frozen"], to_global(next(batches), backend.layout,
                                                     accum=backend.geometry.accumulation))  # thrown away
                backend.restore(c.run_dir / "checkpoints" / "2")
                trained, batches = {k: backend.state[k] for k in TRAINED}, backend.batches(2)
            arrays = to_global(next(batches), backend.layout, accum=backend.geometry.accumulation)
            trained, m = step(trained, s["frozen"], arrays)
            losses.append(float(m["loss"]))
            if i == 0:
                held = {"devices": jax.device_count(),
                        "params": sharding.held_bytes((trained["params"], s["frozen"])),
                        "compute": sharding.held_bytes(trained["compute"]),
                        "grads": sharding.held_bytes(m["grads"]), "optimizer": sharding.held_bytes(trained["opt_state"]),
                        "param_total": sum(x.nbytes for x in jax.tree.leaves(trained["params"]))}
        final = [to_host(x) for x in jax.tree.leaves(trained["params"])]
        held["max_param_diff_from_previous"] = None if last is None else max(
            float(np.max(np.abs(a - b))) for a, b in zip(final, last))
        report[name], last = {**held, "losses": losses}, final
        backend.close()
    print("HELD " + json.dumps(report))
