"""The side-by-side benchmark runs and reports what it measured (small settings, so it stays quick)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from parity_tests.bench import main


# configs/bench_3b.yaml shrunk to a tiny model through the scripts' own `--set` pass-through, so the one-call GPU
# check (environment, parity in bf16, then benchmarks/gpu.sh: two processes, two JSON files, the table) runs here
# before anyone spends GPU time on it.
_SHRINK = [
    "--set", "model.config.vision_config={depth: 2, hidden_size: 32, intermediate_size: 64, num_heads: 2, "
             "out_hidden_size: 48, window_size: 112, fullatt_block_indexes: [1]}",
    "--set", "model.config.text_config={vocab_size: 512, hidden_size: 48, intermediate_size: 96, "
             "num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2, "
             "rope_parameters: {rope_type: default, rope_theta: 1000000.0, mrope_section: [2, 2, 2]}}",
    "--set", "model.config.image_token_id=500", "--set", "model.config.vision_start_token_id=501",
    "--set", "model.config.vision_end_token_id=502", "--set", "model.config.video_token_id=503",
    "--set", "data.image_size=56", "--set", "training.batch_size=1", "--set", "training.gradient_accumulation_steps=3",
    "--steps", "2", "--warmup", "1", "--cpu-peak-sizes", "512,768",
]


def _device_check(tmp_path, *args, **env):
    repo = Path(__file__).resolve().parents[1]
    # The script's own step limits are for a GPU; here they are hang guards only (~10x the normal time).
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path), "WHEELS": str(tmp_path / "no_wheels"),
           "PARITY_S": "1500", "BENCH_S": "1500", "PARITY_SIZES": "84x56", **env}
    return subprocess.run(["bash", "benchmarks/device_check.sh", *args], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=3600)


def test_device_check_script_runs_end_to_end_on_a_shrunk_model(tmp_path):
    # The parity step's forward only: its gradients and AdamW in bfloat16 take ~90 s on this CPU and are held to
    # the contract by parity_tests/test_end_to_end.py; here the script's plumbing is what is checked.
    proc = _device_check(tmp_path, *_SHRINK, PARITY_ARGS="--no-train")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[-1] == "benchmark exit status 0 (124: out of time)"
    table = lines[-5:-1]
    assert table[0].startswith("framework") and table[1].startswith("jax") and table[2].startswith("torch")
    assert table[3].startswith("JAX / PyTorch samples/s:")
    assert "parity exit status 0 (124: out of time)" in lines
    parity = json.loads((tmp_path / "parity_bf16.json").read_text())
    assert parity["ok"] is True and parity["dtype"] == "bfloat16" and "logits@84x56" in parity["results"]
    assert not any(k.startswith("grad/") for k in parity["results"])  # PARITY_ARGS reached the check
    for name in ("jax", "torch"):
        result = json.loads((tmp_path / f"{name}.json").read_text())
        # A step is the global batch: 3 micro-batches of 1, one update; samples/s count all 3.
        assert (result["batch"], result["micro_batch"], result["gradient_accumulation_steps"]) == (3, 1, 3)
        assert result["peak_source"].startswith("measured float32 matmul peak")
        r = result[name]
        assert abs(r["samples_per_second"] * r["step_time_s"] - 3) < 1e-9
        assert r["samples_per_second"] > 0 and r["step_time_s"] > 0 and 0 < r["mfu"] < 1
        assert r["memory_limit_gb"] is None  # the card's memory, on a GPU
    # XLA's count covers the whole step (AdamW and element-wise work too): above the model FLOPs here, where
    # the images are tiny; tests/test_flops.py holds the model-FLOP agreement. With accumulation XLA's count
    # comes from the step lowered over the whole batch (a scan's body counts once).
    jax_result = json.loads((tmp_path / "jax.json").read_text())
    assert jax_result["xla_flops_per_step"] > jax_result["analytic_flops_per_step"] > 0
    doctor = (tmp_path / "doctor.txt").read_text()
    for line in (r"^ok +jax +jax \S+, 1 cpu device", r"^ok +torch +torch .*; transformers \d",
                 r"^ok +JAX libraries +flax \S+, optax \S+, orbax.checkpoint \S+, grain \S+$"):
        assert re.search(line, doctor, re.M), (line, doctor)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["doctor.txt", "parity.log", "parity_bf16.json", "jax.json", "torch.json", "bench.log"])
    assert re.search(r"^jax .* xla$", "\n".join(table), re.M) and re.search(r"^torch .* sdpa$", "\n".join(table), re.M)


def test_device_check_script_fails_when_the_parity_step_fails(tmp_path):
    proc = _device_check(tmp_path, CHECKS="parity", PARITY_SIZES="57x56")  # not a multiple of 28: check exits 2
    assert "parity exit status 2 (124: out of time)" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.returncode != 0


def test_bench_names_a_bad_config_instead_of_a_traceback(capsys):
    assert main(["--config", "configs/bench_3b.yaml", "--set", "model.config.text_config.vocab_size=512"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: model.config: image_token_id 151655") and "vocab_size 512" in err


def test_ceiling_times_the_step_and_its_stand_ins(tmp_path, capsys):
    from parity_tests.ceiling import main as ceiling

    out = tmp_path / "ceiling.json"
    assert ceiling(["--config", "configs/bench_small.yaml", "--rounds", "2", "--json", str(out),
                    "--cpu-peak-sizes", "512",
                    "--set", "data.image_size=56", "--set", "training.batch_size=2",
                    "--set", "model.config.vision_config.depth=2",
                    "--set", "model.config.vision_config.fullatt_block_indexes=[1]",
                    "--set", "model.config.text_config.num_hidden_layers=1"]) == 0
    result = json.loads(out.read_text())
    v = result["variants"]
    assert list(v) == ["step", "no_attn", "no_adamw", "neither"]
    # Each stand-in took effect: it removes work XLA counts (the attention matmuls; AdamW's and the clipping's
    # element-wise FLOPs).
    assert v["neither"]["xla_flops"] < min(v["no_attn"]["xla_flops"], v["no_adamw"]["xla_flops"])
    assert max(v["no_attn"]["xla_flops"], v["no_adamw"]["xla_flops"]) < v["step"]["xla_flops"]
    for r in v.values():
        assert r["step_time_s"] > 0 and 0 < r["mfu"] < 1
        # MFU counts the full step's model FLOPs against every variant's time.
        assert abs(r["mfu"] * r["step_time_s"] * result["peak_tflops"] * 1e12 - result["analytic_flops_per_step"]) \
            < 1e-6 * result["analytic_flops_per_step"]
    # The matmuls timed alone are every dot of the step: their FLOPs are the model's (the analytic count leaves out
    # only the loss head's last few), and close to what XLA counts for the whole step.
    alone = result["matmuls_alone"]
    assert 0.97 < alone["flops"] / result["analytic_flops_per_step"] < 1.03
    assert alone["flops"] < v["step"]["xla_flops"] and alone["time_s"] > 0 and alone["count"] >= alone["shapes"] > 1
    assert "75% of the peak needs a step of" in capsys.readouterr().out
