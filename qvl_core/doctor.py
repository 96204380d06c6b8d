"""Environment doctor: what this machine can run, and the one-line fix for what it cannot.

    python -m qvl_core.doctor [--json] [--output-dir outputs]

Each line is ok / warn / fail. The exit code is 1 only when something would make
training fail (no JAX, no device, no disk); a missing optional piece (flash-attn,
DeepSpeed, a GPU) is a warning. The framework checks import jax and torch lazily,
here only: the rest of qvl_core never imports them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

from qvl_core import hostmem

# flash-attn's prebuilt wheels and recent jaxlib wheels are built against these glibc versions.
FLASH_ATTN_GLIBC = (2, 32)
JAXLIB_GLIBC = (2, 27)


@dataclasses.dataclass
class Check:
    name: str
    status: str  # ok | warn | fail
    detail: str
    fix: str = ""


def _version(module: str) -> str | None:
    try:
        return importlib.import_module(module).__version__
    except Exception:
        return None


def glibc() -> Check:
    name, version = platform.libc_ver()
    if name != "glibc" or not version:
        return Check("glibc", "warn", f"not glibc ({name or 'unknown'})", "prebuilt jaxlib/flash-attn wheels need glibc")
    parts = tuple(int(x) for x in version.split(".")[:2])
    if parts < JAXLIB_GLIBC:
        return Check("glibc", "fail", f"glibc {version} < 2.27", "jaxlib wheels need glibc >= 2.27: use a newer OS image")
    if parts < FLASH_ATTN_GLIBC:
        return Check("glibc", "warn", f"glibc {version}: prebuilt flash-attn wheels need >= 2.32",
                     "the PyTorch path falls back to sdpa; or build flash-attn from source / conda-forge")
    return Check("glibc", "ok", f"glibc {version}")


def jax_check() -> list[Check]:
    try:
        import jax
    except Exception as e:
        return [Check("jax", "fail", f"jax does not import ({type(e).__name__}: {e})", "make venv (pip install -e .)")]
    checks = []
    try:
        devices = jax.devices()
    except Exception as e:
        return [Check("jax devices", "fail", str(e), "check the CUDA driver, or JAX_PLATFORMS=cpu")]
    kinds = sorted({d.device_kind for d in devices})
    checks.append(Check("jax", "ok", f"jax {jax.__version__}, {len(devices)} {devices[0].platform} device(s): "
                                     f"{', '.join(kinds)}; {jax.process_count()} process(es)"))
    if devices[0].platform == "gpu":
        checks.append(cuda_versions())
        try:
            import jax.numpy as jnp

            q = jnp.ones((1, 128, 4, 64), jnp.bfloat16)
            jax.block_until_ready(jax.nn.dot_product_attention(q, q, q, implementation="cudnn"))
            checks.append(Check("cuDNN attention", "ok", "jax.nn.dot_product_attention(implementation='cudnn') runs"))
        except Exception as e:
            checks.append(Check("cuDNN attention", "warn", f"cuDNN attention fails ({type(e).__name__}: "
                                f"{str(e).splitlines()[0][:160]})", "training falls back to XLA attention; "
                                "update cuDNN (pip install -U 'jax[cuda12]')"))
    else:
        checks.append(Check("accelerator", "warn", "no GPU visible to JAX: training runs on the CPU",
                            "on a GPU machine: pip install -e '.[cuda]'"))
    return checks


def cuda_versions() -> Check:
    """CUDA runtime, driver and cuDNN versions as JAX's CUDA plugin sees them."""
    try:
        from jax._src.lib import cuda_versions as cv

        if cv is None:
            return Check("CUDA (JAX)", "warn", "JAX has no CUDA plugin", "pip install -e '.[cuda]'")
        parts = []
        for label, fn in (("runtime", "cuda_runtime_get_version"), ("driver", "cuda_driver_get_version"),
                          ("cuDNN", "cudnn_get_version")):
            if hasattr(cv, fn):
                parts.append(f"{label} {getattr(cv, fn)()}")
        return Check("CUDA (JAX)", "ok", ", ".join(parts) or "versions not exposed by this jaxlib")
    except Exception as e:
        return Check("CUDA (JAX)", "warn", f"versions unavailable ({type(e).__name__}: {e})")


def cuda_driver() -> Check:
    if shutil.which("nvidia-smi") is None:
        return Check("CUDA driver", "warn", "nvidia-smi not found (no NVIDIA driver)", "only needed on GPU machines")
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return Check("CUDA driver", "ok" if out.returncode == 0 else "warn", out.stdout.strip() or out.stderr.strip())
    except Exception as e:
        return Check("CUDA driver", "warn", f"nvidia-smi failed: {e}")


def torch_check() -> list[Check]:
    try:
        import torch
    except Exception as e:
        return [Check("torch", "warn", f"torch does not import ({type(e).__name__})",
                      "only the PyTorch reference needs it: pip install -e '.[torch]'")]
    cuda = torch.cuda.is_available()
    checks = [Check("torch", "ok", f"torch {torch.__version__}, CUDA {'available: ' + torch.cuda.get_device_name() if cuda else 'not available'}; "
                                   f"transformers {_version('transformers') or 'missing'}")]
    try:
        import flash_attn

        checks.append(Check("flash-attn", "ok", f"flash_attn {flash_attn.__version__} imports"))
    except Exception as e:
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        checks.append(Check("flash-attn", "warn", f"not usable: {reason}",
                            "the PyTorch path uses sdpa instead (model.attention: auto); "
                            "GLIBC errors: conda install -c conda-forge flash-attn"))
    return checks


def deepspeed_check() -> Check:
    try:
        import deepspeed
        from deepspeed import ops
    except Exception as e:
        return Check("DeepSpeed", "warn", f"does not import ({type(e).__name__}: {str(e)[:120]})",
                     "only the PyTorch reference trainer needs it: pip install -e '.[torch]'")
    compatible = sorted(k for k, v in getattr(ops, "__compatible_ops__", {}).items() if v)
    return Check("DeepSpeed", "ok", f"deepspeed {deepspeed.__version__}; ops that can build: "
                                    f"{', '.join(compatible) or 'none'}")


def wandb_check() -> Check:
    version = _version("wandb")
    if version is None:
        return Check("wandb", "warn", "wandb not installed: metrics go to logs/metrics.jsonl only", "pip install wandb")
    from qvl_core.metrics import wandb_key_found

    mode = os.environ.get("WANDB_MODE")
    state = mode or ("online (API key found)" if wandb_key_found() else "offline (no API key; runs sync later with `wandb sync`)")
    return Check("wandb", "ok", f"wandb {version}: {state}")


def disk_check(output_dir: str) -> Check:
    path = Path(output_dir)
    probe = path if path.exists() else Path(path.absolute().anchor)
    free = shutil.disk_usage(probe).free / 1e9
    if free < 1:
        return Check("disk", "fail", f"{free:.1f} GB free at {probe}", "free space or set output.dir elsewhere")
    status = "warn" if free < 50 else "ok"
    return Check("disk", status, f"{free:.0f} GB free at {probe}" + (" (a 7B checkpoint with optimizer state is "
                                                                     "~90 GB)" if status == "warn" else ""))


def host_malloc_check() -> Check:
    state, reason = hostmem.status()
    if state == "on":
        return Check("host malloc", "ok", f"2 MiB pages for glibc malloc ({reason})")
    if state == "available":
        return Check("host malloc", "ok", f"the JAX commands restart once with {hostmem.TUNABLE}=1 ({reason})")
    if reason.startswith("QVL_HUGEPAGE_MALLOC"):
        return Check("host malloc", "ok", f"4 KiB pages: {reason}")
    return Check("host malloc", "warn", f"4 KiB pages: {reason}",
                 "on a CPU, steps spend ~25% in page faults this way (docs/performance.md); GPU runs do not care")


def run_checks(output_dir: str = "outputs") -> list[Check]:
    checks = [Check("python", "ok", f"Python {platform.python_version()} on {platform.platform()}")]
    checks.append(glibc())
    checks.append(host_malloc_check())
    checks += jax_check()
    checks.append(cuda_driver())
    versions = ", ".join(f"{m} {_version(m) or 'missing'}" for m in ("flax", "optax", "orbax.checkpoint", "grain"))
    missing = [m for m in ("flax", "optax", "orbax.checkpoint", "grain") if _version(m) is None]
    checks.append(Check("JAX libraries", "fail" if missing else "ok", versions,
                        "make venv (pip install -e .)" if missing else ""))
    checks += torch_check()
    checks.append(deepspeed_check())
    checks.append(wandb_check())
    checks.append(disk_check(output_dir))
    return checks


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qvl_core.doctor", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the checks as JSON")
    parser.add_argument("--output-dir", default="outputs", help="where runs will write (for the disk check)")
    args = parser.parse_args(argv)
    with contextlib.redirect_stdout(sys.stderr):  # libraries that print on import must not break --json
        checks = run_checks(args.output_dir)
    if args.json:
        print(json.dumps([dataclasses.asdict(c) for c in checks], indent=1))
    else:
        for c in checks:
            print(f"{c.status:4}  {c.name:16} {c.detail}" + (f"\n      {'':16} fix: {c.fix}" if c.fix and c.status != "ok" else ""))
    return 1 if any(c.status == "fail" for c in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
