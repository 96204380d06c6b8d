"""How close the JAX training step can come to the matmul peak: the bench's step, and the same step with
attention's core and/or the optimizer replaced by cheap stand-ins, timed interleaved in one process.

    python -m parity_tests.ceiling --config configs/bench_small.yaml [--rounds N] [--json OUT]

Variants (same model, parameters and batch):

    step      the trainer's step: forward, backward, gradient clipping + AdamW
    no_attn   attention's core (scores, softmax, the product with V, and their gradients) replaced by
              `q + k + v`, element-wise; the projections, rotary and everything else stay
    no_adamw  clipping + AdamW replaced by plain SGD (one pass over the parameters and gradients)
    neither   both stand-ins

Then every matmul of the step (each `dot_general` of its jaxpr: forward, backward, attention) is run alone at its
own shapes and the times summed: the step's matmul time at the rates the matmul library reaches one call at a
time, with nothing else in the step.

MFU is the full step's analytic model FLOPs (as in `parity_tests.bench`) over a variant's median time: for a
stand-in variant, the MFU the step would reach if the part it replaces took no time at all. A round runs each
variant for 3 steps, in alternating order, so a slow minute on a shared machine lands on all of them. Meant for
the XLA attention path (a CPU; on a GPU pass `--set training.memory_efficient_attention=false`): if the attention
stand-in changes nothing in the compiled step, this stops with an error instead of reporting it.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from unittest import mock

import numpy as np

from parity_tests import bench
from qvl_core import flops as flops_lib
from qvl_core import hostmem
from qvl_core.config import load_config
from qvl_core.model_config import ConfigError
from qvl_core.schema import SchemaError

VARIANTS = ("step", "no_attn", "no_adamw", "neither")
STEPS_PER_ROUND = 3


def _elementwise_attention(q, k, v, is_causal, kv_lengths):
    """Stands in for `qvl_jax.attention._xla_attention`: same shapes and dependencies, no matmul, no softmax."""
    import jax.numpy as jnp

    g = q.shape[2] // k.shape[2]
    return q + jnp.repeat(k, g, axis=2) + jnp.repeat(v, g, axis=2)


def build(config, variant: str) -> dict:
    import optax

    from qvl_jax import attention

    tx = optax.sgd(1e-4) if variant in ("no_adamw", "neither") else None
    if variant in ("no_attn", "neither"):
        with mock.patch.object(attention, "_xla_attention", _elementwise_attention):
            return bench.jax_step(config, tx=tx)
    return bench.jax_step(config, tx=tx)


def _dots(jaxpr, times: int = 1):
    """`(eqn, count)` of every `dot_general` in `jaxpr` and the jaxprs inside it (a scan's body `length` times)."""
    from jax.extend import core

    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            yield eqn, times
        inner_times = times * eqn.params.get("length", 1) if eqn.primitive.name == "scan" else times
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                if isinstance(sub, core.ClosedJaxpr):
                    yield from _dots(sub.jaxpr, inner_times)
                elif isinstance(sub, core.Jaxpr):
                    yield from _dots(sub, inner_times)


def _dot_flops(lhs, rhs, dimension_numbers) -> int:
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
    lhs_free = math.prod(d for i, d in enumerate(lhs) if i not in lhs_contract + lhs_batch)
    rhs_free = math.prod(d for i, d in enumerate(rhs) if i not in rhs_contract + rhs_batch)
    return 2 * math.prod(lhs[i] for i in lhs_batch + lhs_contract) * lhs_free * rhs_free


def matmuls_alone(step, args, repeats: int = 10) -> dict:
    """The step's matmuls, each run alone (jitted, median of `repeats`) at its shapes, summed over the step."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    groups: dict[tuple, int] = {}
    for eqn, count in _dots(jax.make_jaxpr(step)(*args).jaxpr):
        lhs, rhs = (v.aval for v in eqn.invars)
        key = (lhs.shape, lhs.dtype, rhs.shape, rhs.dtype, eqn.params["dimension_numbers"],
               eqn.params["precision"], eqn.params["preferred_element_type"])
        groups[key] = groups.get(key, 0) + count
    total_time = total_flops = 0.0
    for (lshape, ldtype, rshape, rdtype, dims, precision, out_dtype), count in groups.items():
        dot = jax.jit(lambda a, b, dims=dims, precision=precision, out_dtype=out_dtype: lax.dot_general(
            a, b, dims, precision=precision, preferred_element_type=out_dtype))
        a, b = jnp.ones(lshape, ldtype), jnp.ones(rshape, rdtype)
        total_time += count * statistics.median(bench.call_times(lambda: dot(a, b).block_until_ready(), repeats))
        total_flops += count * _dot_flops(lshape, rshape, dims)
    return {"time_s": total_time, "flops": total_flops, "count": sum(groups.values()), "shapes": len(groups)}


def run(config, rounds: int) -> dict:
    import jax

    steps = {name: build(config, name) for name in VARIANTS}
    if not steps["no_attn"]["xla_flops"] < steps["step"]["xla_flops"]:
        raise RuntimeError("the attention stand-in did not change the compiled step (is attention running through "
                           "cuDNN? set training.memory_efficient_attention=false)")
    first = steps["step"]
    alone = matmuls_alone(first["step"], (first["trained"], first["frozen"], first["batch"]))
    state = {name: s["trained"] for name, s in steps.items()}
    times = {name: [] for name in VARIANTS}
    for r in range(rounds):
        for name in VARIANTS if r % 2 == 0 else VARIANTS[::-1]:
            s = steps[name]
            trained = state[name]
            for _ in range(STEPS_PER_ROUND):
                t0 = time.perf_counter()
                trained, m = s["compiled"](trained, s["frozen"], s["batch"])
                jax.block_until_ready(m["loss"])
                times[name].append(time.perf_counter() - t0)
            state[name] = trained
    # The first round includes each executable's first run.
    return {name: {"step_times": t[STEPS_PER_ROUND:], "xla_flops": steps[name]["xla_flops"],
                   "device": steps[name]["device"]} for name, t in times.items()}, alone


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m parity_tests.ceiling", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/bench_small.yaml")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--json", default=None)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--cpu-peak-sizes", default=",".join(map(str, bench.CPU_PEAK_SIZES)), metavar="N,N,...",
                        help="on a CPU: the square float32 matmuls whose best speed is the peak MFU is against")
    args = parser.parse_args(argv)
    peak_sizes = tuple(int(n) for n in args.cpu_peak_sizes.split(","))
    if args.rounds < 2:
        parser.error("--rounds must be at least 2 (the first round is warm-up)")
    try:
        config = load_config(args.config, args.set)
        cfg = bench._model_config(config)
    except (SchemaError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    batch = bench._global_batch(config)
    model_flops = flops_lib.train_flops_per_sample(cfg, config.data.grid_thw, trainable={}) * batch
    on_gpu = bench._gpu_visible()
    before = None if on_gpu else bench.matmul_peak_tflops(peak_sizes)
    results, alone = run(config, args.rounds)
    device = results["step"]["device"]
    peak, peak_source = bench.device_peak(device if on_gpu else None, config, before, peak_sizes)
    out = {"device": device, "peak_tflops": peak, "peak_source": peak_source, "batch": batch,
           "analytic_flops_per_step": model_flops, "rounds": args.rounds, "variants": {}}
    print(f"device: {device}; peak {peak and round(peak, 3)} TFLOP/s ({peak_source})")
    print(f"model FLOPs per step (analytic): {model_flops:.4g}; batch {batch}; "
          f"{args.rounds - 1} timed rounds x {STEPS_PER_ROUND} steps per variant")
    print(f"{'variant':9} {'median ms':>9} {'p25 ms':>7} {'XLA GFLOP':>9} {'MFU':>6}")
    def mfu_at(seconds: float) -> float | None:
        return model_flops / seconds / (peak * 1e12) if peak else None

    for name, r in results.items():
        t = np.asarray(r["step_times"])
        median = statistics.median(t)
        mfu = mfu_at(median)
        out["variants"][name] = {"step_time_s": median, "p25_step_time_s": float(np.percentile(t, 25)),
                                 "xla_flops": r["xla_flops"], "mfu": mfu}
        print(f"{name:9} {median * 1e3:9.1f} {np.percentile(t, 25) * 1e3:7.1f} {r['xla_flops'] / 1e9:9.2f} "
              f"{'n/a' if mfu is None else f'{mfu:.1%}':>6}")
    mfu = mfu_at(alone["time_s"])
    out["matmuls_alone"] = {**alone, "mfu": mfu}
    print(f"the step's {alone['count']} matmuls ({alone['shapes']} shapes, {alone['flops'] / 1e9:.2f} GFLOP), each "
          f"alone: {alone['time_s'] * 1e3:.1f} ms summed, {alone['flops'] / alone['time_s'] / 1e12:.3f} TFLOP/s"
          + ("" if mfu is None else f"; MFU {mfu:.1%}"))
    if peak:
        print(f"75% of the peak needs a step of {model_flops / (0.75 * peak * 1e12) * 1e3:.1f} ms")
    bench.write_json(args.json, out)
    return 0


if __name__ == "__main__":
    hostmem.use_huge_page_malloc()
    raise SystemExit(main())
