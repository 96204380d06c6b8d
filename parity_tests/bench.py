"""The same training step (forward, backward, AdamW) in JAX and in PyTorch, side by side.

    python -m parity_tests.bench --config configs/bench_small.yaml [--steps N] [--json OUT] [--only jax|torch]

Random weights and a random batch of the config's image size; after warm-up, the
median step time of N steps per framework. A step trains on `training.batch_size x
training.gradient_accumulation_steps` samples: with accumulation, both frameworks run
the micro-batches one after another and apply one AdamW update (the JAX trainer's
step). MFU is against the device's peak: on a GPU from the datasheet table
(`qvl_core.flops`), on a CPU the float32 matmul peak measured in this run (the best
of a large jnp.dot and torch.mm, before and after the steps), printed with it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

from qvl_core import flops as flops_lib
from qvl_core import hostmem
from qvl_core.config import load_config
from qvl_core.model_config import ConfigError, QwenVLConfig
from qvl_core.schema import SchemaError

NUM_LABELS = 10


def _model_config(config) -> QwenVLConfig:
    m = config.model
    return QwenVLConfig.from_hf_dict(m.config, source="model.config").with_head(
        num_labels=NUM_LABELS, mode=m.mode, pooling=m.resolved_pooling)


def _global_batch(config) -> int:
    return config.training.batch_size * config.training.gradient_accumulation_steps


def _batch(config, seed: int = 0):
    """Patches `[G, N, 588]` (uint8) and labels `[G]` of one step's global batch G."""
    rng = np.random.default_rng(seed)
    b, n = _global_batch(config), config.data.num_patches
    patches = rng.integers(0, 256, (b, n, 588), dtype=np.uint8)
    labels = rng.integers(0, NUM_LABELS, (b,), dtype=np.int32)
    return patches, labels


CPU_PEAK_SIZES = (1024, 1536, 2048)


def matmul_peak_tflops(sizes: tuple[int, ...] = CPU_PEAK_SIZES, repeats: int = 10) -> dict[str, float]:
    """Measured float32 matmul TFLOP/s of this machine, by JAX and by torch: the best of `repeats` square
    matmuls of each size. Several sizes, because the fastest one depends on the caches (on the 2-core machine of
    docs/performance.md, 1024-1536 run ~3-6% faster than 2048, 3072-4096 slower)."""
    import jax
    import jax.numpy as jnp
    import torch

    f = jax.jit(lambda x: x @ x)
    out = {"jax": 0.0, "torch": 0.0}
    for size in sizes:
        a, x = jnp.ones((size, size), jnp.float32), torch.ones(size, size)
        flops = 2 * size**3
        out["jax"] = max(out["jax"], flops / min(call_times(lambda: f(a).block_until_ready(), repeats)) / 1e12)
        out["torch"] = max(out["torch"], flops / min(call_times(lambda: torch.mm(x, x), repeats)) / 1e12)
    return out


def call_times(run, repeats: int) -> list[float]:
    """Seconds of each of `repeats` calls of `run` (which waits for its result), after one untimed call."""
    run()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return times


def device_peak(device: str | None, config, cpu_before: dict[str, float] | None = None,
                sizes: tuple[int, ...] = CPU_PEAK_SIZES) -> tuple[float | None, str]:
    """`(peak TFLOP/s, where it comes from)` for MFU. `device` None: this CPU's float32 matmul peak, measured now
    (and `cpu_before`, a measurement from before the steps: the higher kept). Else the accelerator's datasheet
    peak (`perf.peak_tflops` overrides it)."""
    if device is None:
        measured = matmul_peak_tflops(sizes)
        if cpu_before:
            measured = {k: max(v, cpu_before[k]) for k, v in measured.items()}
        return max(measured.values()), (f"measured float32 matmul peak (jax {measured['jax']:.3f}, "
                                        f"torch {measured['torch']:.3f} TFLOP/s)")
    peak = flops_lib.peak_tflops(device, config.perf.peak_tflops)
    return peak, "datasheet bf16 dense peak" if peak else "unknown peak"


def write_json(path: str | None, result: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=1)


def _gpu_visible() -> bool:
    import jax

    return jax.devices()[0].platform != "cpu"


def jax_step(config, tx=None) -> dict:
    """The JAX trainer's step on random weights and a random batch, compiled: `compiled(trained, frozen,
    batch)` (and `step`, the jitted function it came from; `trained`: params, compute copy, optimizer state). `tx` replaces the config's optimizer
    (parity_tests/ceiling.py swaps in SGD)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from qvl_jax import sharding as sharding_lib
    from qvl_jax.classifier import QwenVLClassifier
    from qvl_jax.options import RuntimeOptions
    from qvl_jax.state import make_optimizer, trainable_filter
    from qvl_jax.steps import make_train_step

    cfg = _model_config(config)
    t = config.training
    opts = RuntimeOptions.for_run(config)
    layout = sharding_lib.Layout(sharding_lib.make_mesh(jax.devices()[:1]), "dp")
    model = QwenVLClassifier(cfg, opts=opts, rngs=nnx.Rngs(0))
    graphdef, params, frozen = nnx.split(model, trainable_filter(config.model), ...)
    if tx is None:
        tx, _ = make_optimizer(config, params, total_steps=1000)
    param_sh = jax.tree.map(lambda x: layout.replicated(), params)
    trained = {"params": params, "compute": None, "opt_state": tx.init(params)}  # one device: no compute copy
    shardings = {"params": param_sh, "compute": None, "grads": param_sh,
                 "opt_state": jax.tree.map(lambda x: layout.replicated(), trained["opt_state"])}
    patches, labels = _batch(config)

    def lower(accum):
        step = make_train_step(graphdef, tx, layout, shardings, grid=config.data.grid_thw, dtype=opts.jnp_dtype,
                               label_smoothing=0.0, accum=accum)
        batch = {"patches": jnp.asarray(patches.reshape(accum, -1, *patches.shape[1:])),
                 "label": jnp.asarray(labels.reshape(accum, -1)),
                 "valid": jnp.ones((accum, len(labels) // accum), bool)}
        return step, step.lower(trained, frozen, batch), batch

    accum = t.gradient_accumulation_steps
    step_fn, lowered, batch = lower(accum)
    compiled = lowered.compile()
    # XLA's cost analysis counts a loop body once, so with accumulation (a scan over the micro-batches) the
    # count comes from the same step lowered over the whole batch at once (lowered only, not compiled).
    cost = (compiled if accum == 1 else lower(1)[1]).cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return {"compiled": compiled, "step": step_fn, "trained": trained, "frozen": frozen,
            "batch": batch, "xla_flops": float(cost.get("flops", float("nan"))), "device": jax.devices()[0].device_kind,
            "attention": jax_attention(cfg, opts)}


def jax_attention(cfg, opts) -> str:
    """The kernel(s) `qvl_jax.attention` picks for the vision tower's and the decoder's head size."""
    from qvl_jax.attention import choose_implementation

    head_dims = [cfg.vision.hidden_size // cfg.vision.num_heads]
    if cfg.head.mode == "vlm":
        head_dims.append(cfg.text.head_dim)
    chosen = {choose_implementation(opts.attention, opts.dtype, h)[0] for h in head_dims}
    return "/".join(sorted(chosen))


def bench_jax(config, steps: int, warmup: int) -> dict:
    import jax

    s = jax_step(config)
    compiled, trained, frozen, batch = (s[k] for k in ("compiled", "trained", "frozen", "batch"))
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        trained, m = compiled(trained, frozen, batch)
        jax.block_until_ready(m["loss"])
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    stats = jax.local_devices()[0].memory_stats() or {}
    return {"step_times": times, "xla_flops": s["xla_flops"], "attention": s["attention"],
            "peak_memory_gb": stats.get("peak_bytes_in_use", float("nan")) / 1e9 if stats else None,
            "memory_limit_gb": stats["bytes_limit"] / 1e9 if "bytes_limit" in stats else None, "device": s["device"]}


def bench_torch(config, steps: int, warmup: int) -> dict:
    import torch

    from qvl_core.data import expand_patches
    from qvl_torch.model import choose_attention, from_config

    cfg = _model_config(config)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    attention = choose_attention(config.model.attention, device)  # the reference trainer's own choice
    dtype = torch.bfloat16 if config.model.compute_dtype == "bfloat16" else torch.float32
    model = from_config(cfg, attn_implementation=attention, seed=0).to(device).train()
    if config.training.gradient_checkpointing:
        model.model.gradient_checkpointing_enable()
    opt = torch.optim.AdamW(model.parameters(), lr=config.training.learning_rate)
    patches, labels = _batch(config)
    accum = config.training.gradient_accumulation_steps
    pixels = torch.from_numpy(expand_patches(patches)).to(device).chunk(accum)
    target = torch.from_numpy(labels).long().to(device).chunk(accum)
    grid = config.data.grid_thw
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        for micro_pixels, micro_target in zip(pixels, target):  # the JAX step's sum over micro-batches
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                logits = model(micro_pixels, grid).logits
            loss = torch.nn.functional.cross_entropy(logits.float(), micro_target, reduction="sum") / len(labels)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.training.max_grad_norm or 1e9)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    cuda = device.type == "cuda"
    return {"step_times": times, "peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9 if cuda else None,
            "memory_limit_gb": torch.cuda.get_device_properties(device).total_memory / 1e9 if cuda else None,
            "device": torch.cuda.get_device_name() if cuda else "cpu", "attention": attention}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m parity_tests.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/bench_small.yaml")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", default=None)
    parser.add_argument("--only", choices=["jax", "torch"], default=None)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--cpu-peak-sizes", default=",".join(map(str, CPU_PEAK_SIZES)), metavar="N,N,...",
                        help="on a CPU: the square float32 matmuls whose best speed is the peak MFU is against")
    args = parser.parse_args(argv)
    peak_sizes = tuple(int(n) for n in args.cpu_peak_sizes.split(","))
    try:
        config = load_config(args.config, args.set)
        cfg = _model_config(config)
    except (SchemaError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    batch = _global_batch(config)
    step_flops = flops_lib.train_flops_per_sample(cfg, config.data.grid_thw, trainable={}) * batch

    # On a CPU the peak is measured before and after the frameworks run and the higher one kept: a noisy
    # neighbour or a clock change during one measurement would otherwise inflate every MFU.
    cpu_peak_before = None if _gpu_visible() else matmul_peak_tflops(peak_sizes)
    results, device = {}, None
    for name, fn in (("jax", bench_jax), ("torch", bench_torch)):
        if args.only and name != args.only:
            continue
        r = fn(config, args.steps, args.warmup)
        median = statistics.median(r.pop("step_times"))
        device = device or r["device"]
        results[name] = {"samples_per_second": batch / median, "step_time_s": median,
                         "tflops": step_flops / median / 1e12, **r}
    on_cpu = device is None or "cpu" in str(device).lower()
    peak, peak_source = device_peak(None if on_cpu else device, config, cpu_peak_before, peak_sizes)
    for r in results.values():
        r["mfu"] = r["tflops"] / peak if peak else None
    out = {"device": f"{device} ({platform.machine()}, {os.cpu_count()} CPUs)" if on_cpu else device,
           "batch": batch, "micro_batch": config.training.batch_size,
           "gradient_accumulation_steps": config.training.gradient_accumulation_steps, "peak_tflops": peak,
           "peak_source": peak_source, "analytic_flops_per_step": step_flops, **results}
    if "jax" in results:
        out["xla_flops_per_step"] = results["jax"]["xla_flops"]
    if "jax" in results and "torch" in results:
        out["ratio_samples_per_second"] = results["jax"]["samples_per_second"] / results["torch"]["samples_per_second"]
    print(f"device: {out['device']}; peak {peak and round(peak, 3)} TFLOP/s ({peak_source})")
    if on_cpu:
        state, reason = hostmem.status()
        out["host_malloc"] = f"{state}: {reason}"
        print(f"host malloc: {hostmem.describe(state, reason)}")
    print(f"batch per step: {batch} (micro-batch {config.training.batch_size} x "
          f"{config.training.gradient_accumulation_steps} accumulation steps, one AdamW update)")
    print(f"model FLOPs per step: analytic {step_flops:.4g}" +
          (f", XLA cost_analysis {out['xla_flops_per_step']:.4g} "
           f"of the whole step incl. AdamW ({step_flops / out['xla_flops_per_step'] - 1:+.1%})"
           if "xla_flops_per_step" in out else ""))
    print(f"{'framework':10} {'samples/s':>10} {'step ms':>9} {'TFLOP/s':>8} {'MFU':>6} {'peak mem GB':>11}  attention")
    for name, r in results.items():
        mem = "n/a" if r["peak_memory_gb"] is None else f"{r['peak_memory_gb']:.2f}"
        if r["memory_limit_gb"]:
            mem += f" / {r['memory_limit_gb']:.0f}"
        mfu = "n/a" if r["mfu"] is None else f"{r['mfu']:.1%}"
        print(f"{name:10} {r['samples_per_second']:10.2f} {r['step_time_s'] * 1e3:9.1f} {r['tflops']:8.3f} {mfu:>6} "
              f"{mem:>11}  {r['attention']}")
    if "ratio_samples_per_second" in out:
        print(f"JAX / PyTorch samples/s: {out['ratio_samples_per_second']:.2f}x")
    write_json(args.json, out)
    return 0


if __name__ == "__main__":
    hostmem.use_huge_page_malloc()
    raise SystemExit(main())
