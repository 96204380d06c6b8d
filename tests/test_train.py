"""The JAX trainer end to end on tiny models and generated data (CPU, simulated devices)."""

import collections
import json
import logging
import os

import jax
import numpy as np
import pytest

from qvl_core.config import RunConfig, load_config
from qvl_core.data import DataError
from qvl_core.metrics import read_metrics
from qvl_core.runs import checkpoint_steps
from qvl_core.schema import SchemaError, from_dict
from tests.train_helpers import (logged_steps, losses, resumed_at, stop_with_sigterm, tiny_config, train_subprocess,
                                 with_devices, write_config)


def _run(tmp_path, config: dict, **kw):
    from qvl_jax.train import run

    return run(from_dict(RunConfig, config), **kw)


def test_run_writes_metrics_checkpoints_label_map_and_hf_export(tmp_path, caplog):
    with jax.log_compiles(True), caplog.at_level(logging.WARNING, logger="jax"):
        result = _run(tmp_path, tiny_config(tmp_path))
    # 6 steps and 2 evaluations, each step function compiled once: nothing in the loop retraces
    compiled = collections.Counter(m.split()[1] for m in caplog.messages if m.startswith("Compiling jit("))
    assert compiled["jit(train_step)"] == 1 and compiled["jit(eval_step)"] == 1, compiled
    run_dir = tmp_path / "outputs" / "run"
    assert result["step"] == 6 and 0 <= result["eval/food_accuracy"] <= 1
    records = read_metrics(run_dir / "logs" / "metrics.jsonl")
    keys = set().union(*records)
    for key in ("training/loss", "training/lr", "training/grad_norm", "training/epoch", "eval/overall_loss",
                "eval/overall_accuracy", "eval/food_accuracy", "best_overall_accuracy", "best_model_step",
                "perf/mfu", "perf/step_time", "perf/samples_per_second", "perf/gpu_memory_gb"):
        assert key in keys, key
    assert [r["step"] for r in records if "eval/overall_accuracy" in r] == [3, 6]
    assert all(r["perf/mfu"] is None for r in records if "perf/mfu" in r)  # CPU: no known peak
    lrs = [r["training/lr"] for r in records if "training/lr" in r]
    # the lr each step's update used: linear warm-up from 0 over 2 steps (as HF's schedulers), then cosine
    assert lrs[:3] == pytest.approx([0.0, 5e-4, 1e-3]) and lrs[-1] < lrs[2]
    best = json.loads((run_dir / "checkpoints" / "best.json").read_text())
    assert best["step"] in (3, 6) and (run_dir / "checkpoints" / str(best["step"])).is_dir()
    assert json.loads((run_dir / "label_map.json").read_text())["num_labels"] == 3
    assert (run_dir / "config.yaml").is_file() and (run_dir / "eval" / "confusion_step6.csv").is_file()
    sharding = json.loads((run_dir / "logs" / "sharding.json").read_text())
    assert 0 <= sharding["optimizer_bytes_per_device"] - 2 * sharding["params_bytes_per_device"] <= 64  # mu, nu, counts
    planned = sharding["planned_bytes_per_device"]  # XLA's memory analysis of the step compiled before step 1
    assert planned["arguments"] >= sharding["params_bytes_per_device"] + sharding["optimizer_bytes_per_device"]
    assert planned["total"] > planned["arguments"] and planned["card"] is None  # a CPU: no card to fit

    import qvl_jax

    exported = qvl_jax.load_hf(run_dir / "hf_final")
    assert exported.config.head.id2label == ("apple_pie", "bibimbap", "churros")


def test_a_step_that_does_not_fit_the_device_stops_before_training_with_advice(tmp_path, monkeypatch, capsys):
    from qvl_jax import memory
    from qvl_jax.train import main

    monkeypatch.setattr(memory, "device_limit", lambda: 2**20)  # a 1 MiB device
    path = write_config(tmp_path, tiny_config(tmp_path, training={"batch_size": 2}))
    assert main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the train step needs 0.0 GiB per device but cpu lets XLA use 0.0 GiB"), err
    for advice in ("a smaller training.batch_size (now 2)", "training.gradient_checkpointing: true",
                   "sharding.strategy: fsdp", "python -m qvl_jax.plan --config"):
        assert advice in err
    assert not (tmp_path / "outputs" / "run" / "checkpoints").exists() or \
        not any((tmp_path / "outputs" / "run" / "checkpoints").iterdir())


def test_interrupt_and_resume_equals_an_uninterrupted_run(tmp_path):
    straight = tiny_config(tmp_path, run_name="straight", training={"max_steps": 8})
    _run(tmp_path, straight)
    broken = tiny_config(tmp_path, run_name="broken", training={"max_steps": 8})
    first = _run(tmp_path, broken, stop_after=4)  # 24 records, 4 per step: stops mid-epoch (step 4 of 6)
    assert first["step"] == 4
    second = _run(tmp_path, broken, resume_from="auto")
    assert second["start_step"] == 4 and second["step"] == 8
    assert logged_steps(tmp_path / "outputs" / "broken") == list(range(1, 9))  # 5-8 after 1-4, none twice
    a, b = losses(tmp_path / "outputs" / "straight"), losses(tmp_path / "outputs" / "broken")
    assert sorted(a) == sorted(b) == list(range(1, 9))
    assert [a[s] for s in range(1, 9)] == [b[s] for s in range(1, 9)]  # bit-identical on CPU


def test_config_errors_come_before_training(tmp_path, monkeypatch):
    config = tiny_config(tmp_path, model={"num_labels": 5})
    with pytest.raises(SchemaError, match="model.num_labels is 5 but the data has 3 labels"):
        _run(tmp_path, config)
    path = write_config(tmp_path, tiny_config(tmp_path, training={"batch_sise": 2}))
    with pytest.raises(SchemaError, match=r"unknown config key 'training.batch_sise' \(did you mean 'batch_size'\?\)"):
        load_config(path)
    with pytest.raises(SchemaError, match="global_batch_size 6 does not divide over 4 devices"):
        cfg = tiny_config(tmp_path, training={"global_batch_size": 6})
        import jax
        from qvl_jax import train

        if jax.device_count() != 4:
            monkeypatch.setattr(train.sharding_lib, "make_mesh", lambda: _FakeMesh(4))  # only the geometry check runs
        _run(tmp_path, cfg)
    missing = tiny_config(tmp_path)
    missing["data"]["datasets"][0]["path"] = str(tmp_path / "nowhere")
    with pytest.raises(DataError, match="does not exist"):
        _run(tmp_path, missing)


class _FakeMesh:
    def __init__(self, n):
        self.size = n
        self.shape = {"data": n}


def test_sigterm_saves_a_checkpoint_that_resumes(tmp_path):
    # With grain's worker processes (the default): neither the stopped run nor the one that reads its stream to
    # the end leaves their shared memory behind (Python's resource tracker would warn at exit).
    config = tiny_config(tmp_path, run_name="sig", training={"max_steps": 400, "warmup_steps": 2,
                                                             "dataloader_num_workers": 2})
    path = write_config(tmp_path, config)
    proc = train_subprocess(path, wait=False)
    metrics = tmp_path / "outputs" / "sig" / "logs" / "metrics.jsonl"
    out = stop_with_sigterm(proc, lambda: metrics.exists() and len(losses(tmp_path / "outputs" / "sig")) >= 5, 600)
    assert proc.returncode == 0, out[-3000:]
    assert "stopped at step" in out and "leaked" not in out, out[-3000:]
    steps = checkpoint_steps(tmp_path / "outputs" / "sig" / "checkpoints")
    assert steps and 5 <= steps[-1] < 400
    end = steps[-1] + 3  # resumed to 3 steps past the stop
    resumed = train_subprocess(path, "--resume_from", "auto", "--set", f"training.max_steps={end}",
                               "--set", "monitor.all_freq.eval_log_freq=5000", timeout=1800)
    assert resumed_at(resumed.stderr) == steps[-1] and f"\"step\": {end}" in resumed.stdout
    assert logged_steps(tmp_path / "outputs" / "sig") == list(range(1, end + 1))  # each step once, in order
    assert "leaked" not in resumed.stderr, resumed.stderr[-3000:]


def test_zero2_and_fsdp_match_dp_on_8_devices_and_hold_their_shards(tmp_path):
    """Five steps of each strategy on 8 devices give dp's losses; and the bytes device 0 really holds after a step
    (the arrays' shards, not the requested layouts). In float32, ZeRO-2 keeps the parameters whole and holds a
    shard of the gradients (what tells it from ZeRO-1) and of AdamW's state. With bf16 compute, ZeRO-2 shards the
    float32 master weights too and keeps a bf16 copy whole (DeepSpeed's layout), with the numbers of the float32
    weights laid out whole (`replicated`), also across a checkpoint restored mid-run (`resumed`); fsdp shards all
    four."""
    import subprocess
    import sys

    config = tiny_config(tmp_path, training={"max_steps": 5, "batch_size": 1}, sharding={"min_shard_size": 1})
    path = write_config(tmp_path, config)
    runs = "dp,zero2,zero2:bfloat16:replicated,zero2:bfloat16:resumed,fsdp:bfloat16"
    code = f"from tests.train_helpers import held_bytes_report; held_bytes_report({str(path)!r}, {runs!r}, 5)"
    env = {**os.environ, "XLA_FLAGS": with_devices(8)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    held = json.loads(out.stdout.split("HELD ", 1)[1])
    dp, zero2, reference, lean, fsdp = (held[r] for r in runs.split(","))

    def same_losses(a, b):  # the same examples; only the reduction order may differ
        return len(a["losses"]) == 5 and all(abs(x - y) <= 1e-6 * abs(x) for x, y in zip(a["losses"], b["losses"]))

    assert same_losses(dp, zero2), (dp, zero2)
    assert same_losses(reference, lean) and lean["max_param_diff_from_previous"] <= 1e-6, (reference, lean)
    assert same_losses(lean, fsdp), (lean, fsdp)
    whole = dp["param_total"]
    assert dp["devices"] == 8 and dp["grads"] == whole and dp["optimizer"] >= 2 * whole  # dp: all replicated
    # An array is sharded along a dimension 8 divides; the few that none divides stay whole (a 3-label head).
    eighth = whole / 8 * 1.05 + 1024
    assert zero2["params"] == dp["params"] and zero2["compute"] == 0  # float32 ZeRO-2: the weights whole
    assert zero2["grads"] <= eighth, zero2  # ... gradients sharded (ZeRO-1 would hold them whole)
    assert zero2["optimizer"] <= 2 * eighth, zero2  # ... and AdamW's two moments
    assert reference["params"] == whole and reference["compute"] == 0
    # bf16 ZeRO-2: the float32 master weights sharded with the optimizer state, the compute copy whole, in bf16
    # where the model casts (the matmul weights; the tiny model's float32 norms and patch embedding are a third)
    assert lean["params"] <= eighth and lean["grads"] <= eighth and lean["optimizer"] <= 2 * eighth, lean
    assert whole / 2 < lean["compute"] < 0.75 * whole, lean
    assert fsdp["params"] <= eighth and fsdp["compute"] <= lean["compute"] / 8 * 1.05 + 1024, fsdp
    assert fsdp["grads"] <= eighth and fsdp["optimizer"] <= 2 * eighth, fsdp


def test_other_process_and_device_counts_resume_as_one_stream(tmp_path):
    """One reference run (1 process x 4 devices). (a) 2 processes x 2 devices on 127.0.0.1 for 2 steps, resumed by 1 process x 4 devices (the data stream
    positioned from the step): the reference's losses. (b) 1 process x 2 devices (2 examples per device) for 3
    steps, resumed on 4 devices with 1 per device (grain's own iterator state): the same examples each step."""
    import socket

    common = dict(monitor={"all_freq": {"training_log_freq": 1, "eval_log_freq": 100, "perf_log_freq": 5},
                           "wandb": {"mode": "disabled"}, "progress_bar": False})
    reference = tiny_config(tmp_path, run_name="reference", training={"max_steps": 6, "batch_size": 1}, **common)
    train_subprocess(write_config(tmp_path, reference, "reference.yaml"), devices=4)
    ref = losses(tmp_path / "outputs" / "reference")
    assert list(ref) == [1, 2, 3, 4, 5, 6]

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    two = tiny_config(tmp_path, run_name="two", training={"max_steps": 6, "batch_size": 1}, **common)
    path = write_config(tmp_path, two, "two.yaml")
    procs = [train_subprocess(path, "--set", f"distributed.coordinator_address=127.0.0.1:{port}",
                              "--set", "distributed.num_processes=2", "--set", f"distributed.process_id={i}",
                              "--stop_after_steps", "2", devices=2, wait=False) for i in (0, 1)]
    outs = [p.communicate(timeout=1800)[0] for p in procs]  # a hang guard
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    out = train_subprocess(path, "--resume_from", "auto", devices=4)
    assert "positioned from the step" in out.stderr and resumed_at(out.stderr) == 2
    b = losses(tmp_path / "outputs" / "two")
    assert list(b) == list(ref), b
    for step in ref:
        assert abs(ref[step] - b[step]) <= 1e-6 * abs(ref[step]), (step, ref, b)

    moved = tiny_config(tmp_path, run_name="moved", training={"max_steps": 6, "batch_size": 2}, **common)
    path = write_config(tmp_path, moved, "moved.yaml")
    train_subprocess(path, "--stop_after_steps", "3", devices=2)  # global batch 4 = 2 devices x 2
    out = train_subprocess(path, "--resume_from", "auto", "--set", "training.batch_size=1", devices=4)
    assert "positioned from the step" not in out.stderr  # same process count: grain's own state is used
    c = losses(tmp_path / "outputs" / "moved")
    assert list(c) == list(ref), c
    for step in ref:  # the same examples every step; only the reduction order differs
        assert abs(ref[step] - c[step]) <= 1e-5 * abs(ref[step]), (step, ref, c)


def test_freeze_switches_keep_frozen_weights_and_train_the_rest(tmp_path):
    import qvl_jax
    from qvl_core.model_config import QwenVLConfig
    from qvl_jax.classifier import QwenVLClassifier
    from flax import nnx

    config = tiny_config(tmp_path, model={"freeze_vision": True, "freeze_decoder": True},
                         training={"max_steps": 3, "vision_learning_rate": 1e-4})
    result = _run(tmp_path, config)
    run_dir = tmp_path / "outputs" / "run"
    sharding = json.loads((run_dir / "logs" / "sharding.json").read_text())
    trained = qvl_jax.load_hf(run_dir / "hf_final")
    init_cfg = QwenVLConfig.from_hf_dict(config["model"]["config"]).with_head(num_labels=3)
    initial = QwenVLClassifier(init_cfg, rngs=nnx.Rngs(0))  # training.seed 0 draws the same fresh weights
    before = {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(initial))}
    after = {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(trained))}
    # eager and jitted initialisation round differently (1 ulp); training moves weights by ~1e-4 and more
    moved = {k for k in before if np.abs(before[k] - after[k]).max() > 1e-6}
    assert moved and all(k.startswith(("visual.merger", "classifier")) for k in moved), sorted(moved)
    assert any(k.startswith("visual.merger") for k in moved) and "classifier.kernel" in moved
    n_trainable = sum(v.size for k, v in before.items() if k.startswith(("visual.merger", "classifier")))
    assert sharding["trainable_params"] == n_trainable and result["step"] == 3


@pytest.mark.parametrize("skip", [False, True])
def test_nonfinite_loss_stops_naming_the_step_or_is_skipped(tmp_path, skip):
    from qvl_jax.train import TrainingError

    config = tiny_config(tmp_path, training={"max_steps": 6, "learning_rate": 1e30, "warmup_steps": 0,
                                             "max_grad_norm": None, "skip_nonfinite": skip})
    if not skip:
        with pytest.raises(TrainingError, match=r"step \d: non-finite loss .* set training.skip_nonfinite"):
            _run(tmp_path, config)
        return
    result = _run(tmp_path, config)
    assert result["step"] == 6 and result["skipped_updates"] >= 1
    records = read_metrics(tmp_path / "outputs" / "run" / "logs" / "metrics.jsonl")
    assert max(r.get("training/skipped_updates", 0) for r in records) == result["skipped_updates"]


def test_checkpoints_keep_the_newest_and_the_best(tmp_path):
    config = tiny_config(tmp_path, training={"max_steps": 8},
                         monitor={"all_freq": {"training_log_freq": 1, "eval_log_freq": 2, "perf_log_freq": 4},
                                  "wandb": {"mode": "disabled"}, "progress_bar": False},
                         output={"save_freq": 1, "keep_checkpoints": 1, "async_checkpointing": True})
    result = _run(tmp_path, config)
    ckpts = tmp_path / "outputs" / "run" / "checkpoints"
    kept = checkpoint_steps(ckpts)
    best = json.loads((ckpts / "best.json").read_text())
    assert best["step"] == result["best"]["step"]
    assert kept == sorted({8, best["step"]})
    accuracies = [r["eval/overall_accuracy"] for r in read_metrics(tmp_path / "outputs" / "run" / "logs" / "metrics.jsonl")
                  if "eval/overall_accuracy" in r]
    assert best["accuracy"] == max(accuracies)


def test_accumulation_and_remat_leave_the_losses_unchanged(tmp_path):
    runs = {
        "plain": {"batch_size": 4},
        "accum": {"batch_size": 2, "gradient_accumulation_steps": 2},  # same global batch of 4
        "remat": {"batch_size": 4, "gradient_checkpointing": True},
    }
    for name, training in runs.items():
        _run(tmp_path, tiny_config(tmp_path, run_name=name, training={"max_steps": 4, **training}))
    plain = losses(tmp_path / "outputs" / "plain")
    for name in ("accum", "remat"):
        other = losses(tmp_path / "outputs" / name)
        assert list(other) == [1, 2, 3, 4]
        for step in plain:
            assert abs(other[step] - plain[step]) <= 1e-6 * plain[step], (name, step, other, plain)


def test_bfloat16_compute_trains(tmp_path):
    _run(tmp_path, tiny_config(tmp_path, run_name="f32", training={"max_steps": 4}))
    _run(tmp_path, tiny_config(tmp_path, run_name="bf16", model={"compute_dtype": "bfloat16"},
                               training={"max_steps": 4}))
    f32, bf16 = losses(tmp_path / "outputs" / "f32"), losses(tmp_path / "outputs" / "bf16")
    for step in f32:  # the same run up to bfloat16 rounding of the activations
        assert np.isfinite(bf16[step]) and abs(bf16[step] - f32[step]) <= 2e-2 * f32[step], (f32, bf16)


def test_hub_name_without_hub_is_a_clear_error(tmp_path):
    from qvl_core.hf_checkpoint import CheckpointError

    config = tiny_config(tmp_path)
    config["model"] = {"pretrained_name": "qvl-tests/no-such-model"}
    with pytest.raises(CheckpointError, match="no-such-model is not a local directory and could not be fetched"):
        _run(tmp_path, config)


def test_perf_metrics_leave_out_the_first_step_evaluation_and_checkpoints(monkeypatch):
    from qvl_core import runs
    from qvl_core.config import FreqConfig

    now = [0.0]
    monkeypatch.setattr(runs.time, "perf_counter", lambda: now[0])

    class Logger:
        def __init__(self):
            self.records = []

        def log(self, step, values):
            self.records.append((step, values))

    logger = Logger()
    progress = runs.Progress(logger, FreqConfig(training_log_freq=1, eval_log_freq=2, perf_log_freq=2), total_steps=6,
                             start_step=0, global_batch=4, epoch_length=100, lr_at=lambda s: 0.1, step_flops=1e9,
                             devices=1, peak=None, memory_gb=lambda: 0.0, show_bar=False)
    values = {"loss": 1.0, "accuracy": 0.5, "grad_norm": 1.0}
    for step, seconds in enumerate([30.0, 2.0, 2.0, 2.0, 2.0, 2.0], start=1):  # step 1 compiles
        now[0] += seconds
        progress.update(step, values)
        if step == 3:
            with progress.paused():  # an evaluation and a checkpoint between steps 3 and 4
                now[0] += 50.0
    perf = [(step, v["perf/step_time"], v["perf/samples_per_second"]) for step, v in logger.records
            if "perf/step_time" in v]
    assert perf == [(2, 2.0, 2.0), (4, 2.0, 2.0), (6, 2.0, 2.0)]


def test_global_batch_on_a_cpu_does_not_alias_the_loader_buffers():
    # grain's worker batches are shared memory: a global array viewing them would keep them alive past the loader.
    from qvl_jax import sharding
    from qvl_jax.steps import to_global

    layout = sharding.Layout(sharding.make_mesh(jax.devices()[:1]), "dp")
    batch = {"patches": np.zeros((4, 16, 588), np.float32), "label": np.arange(4, dtype=np.int32),
             "valid": np.ones(4, bool), "path": np.array(["a", "b", "c", "d"])}
    arrays = to_global(batch, layout, accum=2)
    assert sorted(arrays) == ["label", "patches", "valid"] and arrays["patches"].shape == (2, 2, 16, 588)
    for value in batch.values():
        value[...] = value[::-1]  # overwrite the loader's buffers
    batch["patches"][...] = 7
    np.testing.assert_array_equal(np.asarray(arrays["patches"]), 0)
    np.testing.assert_array_equal(np.asarray(arrays["label"]), [[0, 1], [2, 3]])
