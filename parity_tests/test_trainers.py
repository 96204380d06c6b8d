"""The JAX trainer against the DeepSpeed reference trainer: same config, same checkpoint, same losses."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from qvl_core.config import RunConfig
from qvl_core.data import fixtures
from qvl_core.metrics import read_metrics
from qvl_core.schema import from_dict
from tests.train_helpers import logged_steps, resumed_at

STEPS = 20


def _config(tmp, ckpt, run_name, **training):
    data_dir = tmp / "food"
    if not data_dir.exists():
        fixtures.write_food101(data_dir, ["apple_pie", "bibimbap", "churros"], train_per_class=10, test_per_class=3)
    return {
        "model": {"pretrained_name": str(ckpt), "param_dtype": "float32", "compute_dtype": "float32",
                  "attention": "sdpa"},
        "data": {"datasets": [{"name": "food", "format": "food101", "path": str(data_dir)}], "image_size": 56,
                 "augment": {"random_resized_crop": False, "hflip": False}},
        "training": {"max_steps": STEPS, "learning_rate": 1e-3, "warmup_steps": 4, "batch_size": 4,
                     "weight_decay": 0.01, "dataloader_num_workers": 0, **training},
        "sharding": {"strategy": "dp"},
        "monitor": {"all_freq": {"training_log_freq": 1, "eval_log_freq": 10, "perf_log_freq": 10},
                    "wandb": {"mode": "disabled"}, "progress_bar": False},
        "output": {"dir": str(tmp / "outputs"), "run_name": run_name, "save_freq": 1000,
                   "async_checkpointing": False},
    }


def _torch_run(tmp, config: dict, name: str, nproc: int = 1, *extra: str):
    import yaml

    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        cmd = [sys.executable, "-m", "qvl_torch.train", "--config", str(path), "--deepspeed",
               "configs/ds_config_zero2.json", *extra]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={port}",
               "-m", "qvl_torch.train", "--config", str(path), "--deepspeed", "configs/ds_config_zero2.json", *extra]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)  # a hang guard
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    return out


def _metrics(tmp, name):
    records = read_metrics(tmp / "outputs" / name / "logs" / "metrics.jsonl")
    losses = {r["step"]: r["training/loss"] for r in records if "training/loss" in r}
    evals = {r["step"]: r["eval/overall_accuracy"] for r in records if "eval/overall_accuracy" in r}
    return losses, evals


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from parity_tests.tiny import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("trainer_ckpt"), seed=3)


def test_jax_and_deepspeed_trainers_give_the_same_losses(tmp_path, ckpt):
    from qvl_jax.train import run

    # global batch 4 as 2 x 2 accumulation steps: both accumulation paths are compared too
    accum = {"batch_size": 2, "gradient_accumulation_steps": 2}
    run(from_dict(RunConfig, _config(tmp_path, ckpt, "jax", **accum)))
    _torch_run(tmp_path, _config(tmp_path, ckpt, "torch", **accum), "torch")
    jax_loss, jax_eval = _metrics(tmp_path, "jax")
    torch_loss, torch_eval = _metrics(tmp_path, "torch")
    assert list(jax_loss) == list(torch_loss) == list(range(1, STEPS + 1))
    worst = max(abs(jax_loss[s] - torch_loss[s]) / abs(torch_loss[s]) for s in jax_loss)
    print(f"worst relative loss difference over {STEPS} steps: {worst:.2e}")
    assert worst <= 1e-4, {s: (jax_loss[s], torch_loss[s]) for s in jax_loss}
    assert jax_eval == torch_eval and set(jax_eval) == {10, 20}
    assert jax_loss[STEPS] < jax_loss[1]  # it learns

    # either trainer's HF export loads into the other framework and gives the same logits
    import qvl_jax
    from qvl_torch import load_pretrained
    import torch

    pixels = np.random.default_rng(0).standard_normal((2, 16, 1176)).astype(np.float32)
    for name in ("jax", "torch"):
        export = tmp_path / "outputs" / name / "hf_final"
        assert json.loads((export / "config.json").read_text())["id2label"]["2"] == "churros"
        a = np.asarray(qvl_jax.load_hf(export)(pixels, (1, 4, 4)).logits)
        with torch.no_grad():
            b = load_pretrained(export)(torch.from_numpy(pixels), (1, 4, 4)).logits.numpy()
        assert np.linalg.norm(a - b) / np.linalg.norm(b) <= 1e-5, name


def test_zero2_on_two_processes_matches_one(tmp_path, ckpt):
    one = _config(tmp_path, ckpt, "one", batch_size=4, max_steps=6)
    two = _config(tmp_path, ckpt, "two", batch_size=2, max_steps=6)  # same global batch of 4
    _torch_run(tmp_path, one, "one")
    _torch_run(tmp_path, two, "two", 2)
    a, _ = _metrics(tmp_path, "one")
    b, _ = _metrics(tmp_path, "two")
    assert list(a) == list(b) == list(range(1, 7))
    worst = max(abs(a[s] - b[s]) / abs(a[s]) for s in a)
    print(f"ZeRO-2, 2 processes vs 1: worst relative loss difference {worst:.2e}")
    assert worst <= 1e-5, (a, b)


def test_deepspeed_resume_continues_with_the_same_losses(tmp_path, ckpt):
    straight = _config(tmp_path, ckpt, "straight", max_steps=8)
    broken = _config(tmp_path, ckpt, "broken", max_steps=8)
    _torch_run(tmp_path, straight, "straight")
    _torch_run(tmp_path, broken, "broken", 1, "--stop_after_steps", "3")  # 30 records / 4: mid-epoch
    out = _torch_run(tmp_path, broken, "broken", 1, "--resume_from", "auto")
    assert resumed_at(out.stderr) == 3
    assert logged_steps(tmp_path / "outputs" / "broken") == list(range(1, 9))  # 4-8 after 1-3, none twice
    a, _ = _metrics(tmp_path, "straight")
    b, _ = _metrics(tmp_path, "broken")
    assert list(a) == list(b) == list(range(1, 9))
    assert [a[s] for s in a] == [b[s] for s in b]  # bit-identical on CPU


def test_deepspeed_config_contradiction_names_both_values(tmp_path):
    from qvl_core.config import load_config
    from qvl_core.schema import SchemaError
    from qvl_torch.ds_config import resolve_ds_config

    config = load_config("configs/demo.yaml")
    ds = resolve_ds_config("configs/ds_config_zero2.json", config, world_size=8)
    assert ds["train_batch_size"] == 32 * 8 and ds["gradient_clipping"] == 1.0 and ds["bf16"]["enabled"] is False
    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps({"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 2}}))
    with pytest.raises(SchemaError, match=r"train_micro_batch_size_per_gpu is 8 but the YAML gives 32 "
                                          r"\(training.batch_size\)"):
        resolve_ds_config(bad, config, world_size=1)
    bad.write_text(json.dumps({"optimizer": {"type": "Adam"}}))
    with pytest.raises(SchemaError, match="remove the 'optimizer' block"):
        resolve_ds_config(bad, config, world_size=1)


def test_attention_fall_back_on_cpu():
    import torch
    from qvl_core.schema import SchemaError
    from qvl_torch.train import choose_attention

    cpu = torch.device("cpu")
    assert choose_attention("auto", cpu) == "sdpa"
    assert choose_attention("eager", cpu) == "eager"
    with pytest.raises(SchemaError, match="flash_attention_2 cannot be used: flash-attn needs a CUDA device"):
        choose_attention("flash_attention_2", cpu)


def test_deepspeed_bf16_and_gradient_checkpointing_train(tmp_path, ckpt):
    plain = _config(tmp_path, ckpt, "plain", max_steps=4)
    remat = _config(tmp_path, ckpt, "remat", max_steps=4, gradient_checkpointing=True)
    bf16 = _config(tmp_path, ckpt, "bf16", max_steps=4)
    bf16["model"]["compute_dtype"] = "bfloat16"
    for name, cfg in (("plain", plain), ("remat", remat), ("bf16", bf16)):
        _torch_run(tmp_path, cfg, name)
    a, b, c = (_metrics(tmp_path, n)[0] for n in ("plain", "remat", "bf16"))
    assert list(a) == list(b) == list(c) == [1, 2, 3, 4]
    for s in a:
        assert abs(b[s] - a[s]) <= 1e-5 * a[s]  # recomputation changes nothing
        assert np.isfinite(c[s]) and abs(c[s] - a[s]) <= 3e-2 * a[s]  # bf16 rounding only


def test_deepspeed_sigterm_saves_exits_zero_and_resumes(tmp_path, ckpt):
    import yaml

    from qvl_core.runs import checkpoint_steps
    from tests.train_helpers import stop_with_sigterm

    config = _config(tmp_path, ckpt, "sig", max_steps=400)
    config["monitor"]["all_freq"]["eval_log_freq"] = 1000
    path = tmp_path / "sig.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = subprocess.Popen([sys.executable, "-m", "qvl_torch.train", "--config", str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    metrics = tmp_path / "outputs" / "sig" / "logs" / "metrics.jsonl"
    out = stop_with_sigterm(proc, lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3, 600)
    assert proc.returncode == 0, out[-3000:]
    assert "stopped at step" in out
    steps = checkpoint_steps(tmp_path / "outputs" / "sig" / "checkpoints")
    assert steps and 3 <= steps[-1] < 400
    # resumed (to 3 steps past the stop), it continues at the next step and logs no step twice
    config["training"]["max_steps"] = steps[-1] + 3
    out = _torch_run(tmp_path, config, "sig", 1, "--resume_from", "auto")
    assert resumed_at(out.stderr) == steps[-1]
    assert logged_steps(tmp_path / "outputs" / "sig") == list(range(1, steps[-1] + 4))


@pytest.fixture(scope="module")
def one_process_group():
    """A one-process gloo group for in-process DeepSpeed engines. DeepSpeed keeps its own handle on the group, so
    one group serves every test of the module and is destroyed after the last."""
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("zero", [{}, {"compute_grad_norm": False}], ids=["default", "no_grad_norm"])
def test_deepspeed_skips_a_nonfinite_update_and_keeps_the_weights(tmp_path, ckpt, one_process_group, monkeypatch,
                                                                  zero):
    """One batch whose loss is NaN: with skip_nonfinite the weights after that step equal those before.

    `no_grad_norm` (ZeRO without the gradient norm, no clipping) is where DeepSpeed itself would step on the
    NaN gradients: float32 ZeRO checks for overflow only through the norm."""
    import torch

    from qvl_torch import train

    for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0").items():  # what a launcher sets
        monkeypatch.setenv(k, v)
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2, **zero}}))
    config = from_dict(RunConfig, _config(tmp_path, ckpt, "skip", max_steps=4, skip_nonfinite=True,
                                          max_grad_norm=None if zero else 1.0))
    _, backend = train.setup(config, deepspeed_config=str(ds))
    batches = backend.batches(0)
    weights = lambda: {n: p.detach().clone() for n, p in backend.engine.module.named_parameters()}  # noqa: E731
    assert backend.train_step(next(batches))["finite"] == 1.0
    before = weights()
    clean = backend._pixels
    monkeypatch.setattr(backend, "_pixels", lambda batch: clean(batch) * float("nan"))
    poisoned = backend.train_step(next(batches))
    assert poisoned["finite"] == 0.0 and not np.isfinite(poisoned["loss"])
    after = weights()
    assert all(torch.equal(before[n], after[n]) for n in before), [n for n in before
                                                                   if not torch.equal(before[n], after[n])]
    monkeypatch.setattr(backend, "_pixels", clean)
    assert backend.train_step(next(batches))["finite"] == 1.0  # training goes on from the kept weights
    moved = weights()
    assert all(torch.isfinite(p).all() for p in moved.values())
    assert any(not torch.equal(after[n], moved[n]) for n in after)
