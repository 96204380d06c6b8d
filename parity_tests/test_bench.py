"""The side-by-side benchmark runs and reports what it measured (small settings, so it stays quick)."""

import json

from parity_tests.bench import main


def test_bench_reports_both_frameworks(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["--config", "configs/bench_small.yaml", "--steps", "2", "--warmup", "1", "--json", str(out),
                 "--set", "data.image_size=56", "--set", "training.batch_size=2"]) == 0
    result = json.loads(out.read_text())
    for name in ("jax", "torch"):
        r = result[name]
        assert r["samples_per_second"] > 0 and r["step_time_s"] > 0 and 0 < r["mfu"] < 1
    assert result["peak_source"].startswith("measured float32 matmul peak")
    # XLA's count covers the whole step (AdamW and element-wise work too): above the model FLOPs here, where
    # the images are tiny; tests/test_flops.py holds the model-FLOP agreement.
    assert result["xla_flops_per_step"] > result["analytic_flops_per_step"] > 0
    assert "JAX / PyTorch samples/s" in capsys.readouterr().out
