"""Planned vs measured memory of the JAX train step, on a real GPU (issue: "Will it fit?").

    python benchmarks/memory_check.py [--config configs/bench_3b.yaml] [--steps 3] [--json OUT] [--set k=v ...]

Three numbers per device for the same config:
  1. the planner's, compiled without the GPU for its published spec (`python -m qvl_jax.plan`, run in a
     CPU-only subprocess, as a user would before renting the card);
  2. the trainer's own plan, compiled for the card it runs on (`qvl_jax.memory`, logged before step 1);
  3. the measured peak: `memory_stats()["peak_bytes_in_use"]` after a few training steps.
Exit status 0 when both plans are within 10% of the measured peak. Needs a GPU; writes OUT as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

TOLERANCE = 0.10


def gpu_key(device_kind: str) -> str | None:
    from qvl_core import gpus

    for key, spec in gpus.GPUS.items():
        if spec.name == device_kind:
            return key
    for marker, key in (("H200", "h200-141gb"), ("H100", "h100-80gb"), ("A100-SXM4-80GB", "a100-80gb"),
                        ("A100-SXM4-40GB", "a100-40gb"), ("L40S", "l40s")):
        if marker in device_kind:
            return key
    return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/bench_3b.yaml")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--json", default=None)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)

    import jax

    from qvl_core.config import load_config
    from qvl_jax.train import setup

    device = jax.local_devices()[0]
    if device.platform != "gpu":
        print(f"error: needs a GPU (found {device.platform})", file=sys.stderr)
        return 2
    out_dir = Path(tempfile.mkdtemp(prefix="memory_check_"))
    overrides = [*args.set, f"output.dir={out_dir}", "output.overwrite=true", "training.dataloader_num_workers=2",
                 "monitor.wandb.mode=disabled", "monitor.progress_bar=false"]

    # 1. the planner, without the GPU
    key = gpu_key(device.device_kind)
    planner = None
    if key is not None:
        plan_json = out_dir / "plan.json"
        cmd = [sys.executable, "-m", "qvl_jax.plan", "--config", args.config, "--gpu", key,
               "--devices", str(jax.device_count()), "--no-deepspeed", "--json", str(plan_json)]
        for o in args.set:
            cmd += ["--set", o]
        proc = subprocess.run(cmd, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True)
        print(proc.stdout[-3000:], proc.stderr[-1500:], sep="\n")
        if plan_json.is_file():
            planner = json.loads(plan_json.read_text())["per_device_bytes"]["total"]

    # 2 and 3: the trainer's compiled step on this GPU, then a few steps
    config = load_config(args.config, overrides)
    _, backend = setup(config)
    try:
        batches = backend.batches(0)
        for _ in range(args.steps):
            backend.fetch(backend.train_step(next(batches)))
        stats = device.memory_stats()
    finally:
        backend.close()
    on_device = backend.memory_plan.total
    peak = stats["peak_bytes_in_use"]
    result = {"device": device.device_kind, "devices": jax.device_count(), "config": args.config,
              "overrides": args.set, "planner_bytes": planner, "on_device_plan_bytes": on_device,
              "measured_peak_bytes": peak, "bytes_limit": stats.get("bytes_limit")}
    gib = 2**30
    print(f"{'':28} {'GiB':>8} {'vs measured':>12}")
    for name, value in (("planner (no GPU)", planner), ("plan compiled on this GPU", on_device),
                        ("measured peak", peak)):
        ratio = "" if value is None else f"{value / peak - 1:+.1%}"
        print(f"{name:28} {'n/a' if value is None else f'{value / gib:.2f}':>8} {ratio:>12}")
    ok = all(v is not None and abs(v / peak - 1) <= TOLERANCE for v in (planner, on_device))
    result["ok"] = ok
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    print(f"within {TOLERANCE:.0%}: {'yes' if ok else 'NO'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
