"""`python -m parity_tests.check` on checkpoints whose configs no other test uses."""

import json
import subprocess
import sys

from parity_tests.tiny import make_checkpoint


def test_check_cli_passes_and_writes_json(tmp_path):
    """Forward quantities only: the gradient and AdamW checks run in test_end_to_end, and through this CLI in the
    device-check test (parity_tests/test_bench.py)."""
    ckpt = make_checkpoint(tmp_path / "ckpt", seed=11, flat_config=True,
                           vision={"depth": 2, "hidden_size": 24, "num_heads": 3, "intermediate_size": 40,
                                   "fullatt_block_indexes": [1], "window_size": 84},
                           text={"num_hidden_layers": 3, "num_attention_heads": 6, "num_key_value_heads": 3,
                                 "hidden_size": 48, "intermediate_size": 64,
                                 "rope_parameters": {"rope_type": "default", "rope_theta": 1e6,
                                                     "mrope_section": [1, 1, 2]}})
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, "-m", "parity_tests.check", "--checkpoint", str(ckpt),
                           "--image-sizes", "140x252,84x56", "--no-train", "--json", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["ok"] is True
    assert data["results"]["logits@mixed"]["rel_l2"] <= 1e-4
    assert "quantity" in proc.stdout and "passed, 0 failed" in proc.stdout


def test_check_cli_exits_1_on_a_mismatch(tmp_path, monkeypatch):
    """A JAX model that is off by a nudge to one weight makes the CLI report FAIL and exit 1."""
    import qvl_jax
    from parity_tests import check
    ckpt = make_checkpoint(tmp_path / "ckpt", seed=3, num_labels=4)
    real_load = qvl_jax.load_hf

    def nudged_load(*a, **kw):
        model = real_load(*a, **kw)
        bias = model.visual.blocks[0].attn.qkv.bias
        bias.set_value(bias.get_value() + 1e-2)
        return model

    monkeypatch.setattr(qvl_jax, "load_hf", nudged_load)
    out = tmp_path / "r.json"
    rc = check.main(["--checkpoint", str(ckpt), "--image-sizes", "56x56", "--no-train", "--json", str(out)])
    assert rc == 1
    data = json.loads(out.read_text())
    assert data["ok"] is False and data["results"]["image_features@56x56"]["ok"] is False
