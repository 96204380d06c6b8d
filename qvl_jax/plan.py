"""Will it fit? The trainer's step compiled for a GPU topology on a machine without a GPU, and its memory per device.

    python -m qvl_jax.plan --config configs/complete_training_config.yaml --gpu h100-80gb --devices 8
    python -m qvl_jax.plan --config configs/food101_3b.yaml --gpu h200 --devices 1 --max-batch --json plan.json

The step is the trainer's own (`qvl_jax.state`, `qvl_jax.steps`): model from the
config's `config.json` (a local directory, `model.config`, or the hub's file of a
known Qwen2.5-VL size when `model.pretrained_name` is not a local directory), the
sharding strategy, dtypes, remat, accumulation, freeze switches and image size. XLA
compiles it for the named card (`qvl_core.gpus`) through the CUDA plugin, which
needs no driver and no GPU (`pip install -e '.[cuda]'`), and its memory analysis
is the plan: `qvl_jax.memory`. Beside it, DeepSpeed's own ZeRO-2 estimate of the
model states for the same model and device count.

`--max-batch` finds the largest per-device batch that fits by compiling; when
nothing fits, the changes that would (remat, fsdp, more devices, freezing the
vision tower, a smaller image) are each planned. Exit status: 0 fits, 1 does not
fit, 2 a bad config or set-up.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.metadata
import importlib.util
import io
import json
import os
import sys
import time
from pathlib import Path

# Compile for a GPU without one: the CPU stays the default backend, and the plugin's start-up check (which needs a
# driver) is skipped so that its compiler registers. Set before JAX looks for backends.
os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")

import jax  # noqa: E402

from qvl_core import gpus  # noqa: E402
from qvl_core.config import RunConfig, load_config  # noqa: E402
from qvl_core.hf_checkpoint import CheckpointError, read_config  # noqa: E402
from qvl_core.known_models import known_config  # noqa: E402
from qvl_core.model_config import ConfigError, QwenVLConfig  # noqa: E402
from qvl_core.schema import SchemaError  # noqa: E402
from qvl_jax import memory  # noqa: E402
from qvl_jax import sharding as sharding_lib  # noqa: E402
from qvl_jax.options import RuntimeOptions  # noqa: E402
from qvl_jax.state import abstract_state, make_optimizer, state_shardings  # noqa: E402
from qvl_jax.steps import make_train_step  # noqa: E402

GIB = memory.GIB
DEFAULT_LABELS = 1000  # when model.num_labels is not set: the head is a tiny part of the memory
MAX_BATCH = 1024


class PlanError(ValueError):
    """A plan that cannot be made (bad GPU name, no CUDA plugin, a model without a config)."""


@dataclasses.dataclass(frozen=True)
class Target:
    """A GPU topology: `devices` cards of one kind over `hosts` hosts."""

    gpu: str  # key of qvl_core.gpus.GPUS
    devices: int
    hosts: int = 1

    @property
    def spec(self) -> gpus.GpuSpec:
        return gpus.gpu(self.gpu)

    def topology_devices(self):
        """The devices of this topology, as XLA's GPU compiler sees them (no GPU needed)."""
        if self.devices < 1 or self.hosts < 1 or self.devices % self.hosts:
            raise PlanError(f"--devices {self.devices} must be a positive multiple of --hosts {self.hosts}")
        return _topology(self.gpu, self.devices, self.hosts)


_TOPOLOGIES: dict = {}


def _topology(gpu: str, devices: int, hosts: int):
    key = (gpu, devices, hosts)
    if key not in _TOPOLOGIES:
        if importlib.util.find_spec("jax_plugins.xla_cuda12") is None:
            raise PlanError("compiling for a GPU needs JAX's CUDA plugin (no GPU or driver needed): "
                            "pip install -e '.[cuda]'")
        from jax.experimental import topologies

        config = gpus.gpu(gpu).target_config(cudnn=_wheel_version("nvidia-cudnn-cu12", (9, 8)),
                                             cuda=_wheel_version("nvidia-cuda-runtime-cu12", (12, 9)))
        try:
            desc = topologies.get_topology_desc(platform="cuda", target_config=config,
                                                topology=f"1x{hosts}x{devices // hosts}")
        except Exception as e:  # the plugin did not register (e.g. its start-up check ran before ours was set)
            raise PlanError(f"the CUDA plugin could not describe a {gpu} topology ({type(e).__name__}: {e}); run "
                            f"with JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 in the environment") from None
        _TOPOLOGIES[key] = desc.devices
    return _TOPOLOGIES[key]


def _wheel_version(dist: str, default: tuple[int, int]) -> tuple[int, int]:
    """(major, minor) of an installed NVIDIA wheel (the libraries the plugin compiles against)."""
    try:
        major, minor = importlib.metadata.version(dist).split(".")[:2]
        return int(major), int(minor)
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return default


def model_config(config: RunConfig) -> tuple[QwenVLConfig, str]:
    """The classifier's config from the run config, without weights or data: (config, where it came from)."""
    m = config.model
    num_labels = m.num_labels or DEFAULT_LABELS
    try:
        if m.config is not None:
            cfg, source = QwenVLConfig.from_hf_dict(m.config, source="model.config"), "model.config"
        elif Path(m.pretrained_name).is_dir():
            cfg, source = read_config(m.pretrained_name)[0], str(Path(m.pretrained_name) / "config.json")
        else:
            name, raw = known_config(m.pretrained_name)
            cfg, source = QwenVLConfig.from_hf_dict(raw, source=name), f"qvl_core/known_models/{name}"
    except (ConfigError, CheckpointError, ValueError) as e:
        raise PlanError(f"model.pretrained_name: {e}") from None
    return cfg.with_head(num_labels=num_labels, mode=m.mode, pooling=m.resolved_pooling), source


@dataclasses.dataclass
class Planned:
    plan: memory.MemoryPlan
    batch_size: int
    compile_s: float
    params: int
    trainable: int
    source: str  # where the model's config.json came from


_PLANNED: dict[str, Planned] = {}


def plan_step(config: RunConfig, target: Target, *, batch_size: int | None = None) -> Planned:
    """The trainer's step for `config` compiled for `target`, at `batch_size` per device (default: the config's).
    Each plan is made once per process (a search and the alternatives ask for some twice)."""
    t = config.training
    batch_size = batch_size or t.batch_size
    key = json.dumps([config.to_dict(), dataclasses.astuple(target), batch_size], sort_keys=True, default=str)
    if key not in _PLANNED:
        _PLANNED[key] = _plan_step(config, target, batch_size)
    planned, spec = _PLANNED[key], target.spec  # the card's limits as they are now
    plan = dataclasses.replace(planned.plan, usable=spec.usable_bytes, card=spec.memory_bytes)
    return dataclasses.replace(planned, plan=plan)


def _plan_step(config: RunConfig, target: Target, batch_size: int) -> Planned:
    t = config.training
    cfg, source = model_config(config)
    devices = target.topology_devices()
    layout = sharding_lib.Layout(sharding_lib.make_mesh(list(devices)), config.sharding.strategy,
                                 config.sharding.min_shard_size)
    opts = RuntimeOptions.for_run(config)
    graphdef, state = abstract_state(config, cfg, opts, layout)
    tx, _ = make_optimizer(config, state["params"], total_steps=1)
    dtypes = None if state["compute"] is None else jax.tree.map(lambda x: x.dtype, state["compute"])
    shardings = state_shardings(layout, state["params"], tx, dtypes)
    step = make_train_step(graphdef, tx, layout, shardings, grid=config.data.grid_thw, dtype=opts.jnp_dtype,
                           label_smoothing=t.label_smoothing, accum=t.gradient_accumulation_steps,
                           compute_dtypes=dtypes)
    start = time.perf_counter()
    # JAX's persistent cache cannot read back an executable compiled for a topology without a client: write none
    # (whether the cache is on is decided once per process; the minimum compile time is read at each write)
    cache_was = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1e12)
    try:
        compiled, calls = memory.compile_step(step, state, layout, micro_batch=batch_size,
                                              accumulation=t.gradient_accumulation_steps,
                                              num_patches=config.data.num_patches, device=devices[0])
    finally:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", cache_was)
    spec = target.spec
    plan = memory.memory_plan(compiled, state, shardings, usable_bytes=spec.usable_bytes,
                              card_bytes=spec.memory_bytes, attention_calls=calls)
    trainable = sum(x.size for x in jax.tree.leaves(state["params"]))
    frozen = sum(x.size for x in jax.tree.leaves(state["frozen"]))
    return Planned(plan, batch_size, time.perf_counter() - start, int(trainable + frozen), int(trainable), source)


def find_max_batch(plan_at, *, limit: int = MAX_BATCH) -> tuple[int | None, dict[int, int]]:
    """The largest batch b with `plan_at(b).fits` (compiling as few batches as it can: the memory of a step is
    close to affine in the batch, so each probe aims at the line through two plans, then checks; when two probes
    in a row do not fit, the next one halves the bracket).
    Returns (b or None when 1 does not fit, {batch: planned total bytes})."""
    totals: dict[int, int] = {}
    usable = None

    def fits(b: int) -> bool:
        nonlocal usable
        p = plan_at(b)
        totals[b], usable = p.total, p.usable
        return p.fits

    if not fits(1):
        return None, totals
    lo, hi, misses = 1, None, 0  # lo fits; hi (when known) does not; misses: probes in a row that did not fit
    while hi is None or hi - lo > 1:
        if len(totals) == 1:
            probe = 2
        else:  # the line through the fitting batch and the nearest plan beyond it (else the nearest below)
            other = hi if hi is not None else min((b for b in totals if b != lo), key=lambda b: abs(b - lo))
            slope = max((totals[other] - totals[lo]) / (other - lo), 1)
            probe = int(lo + (usable - totals[lo]) // slope)
        if hi is None:  # far beyond what was measured: approach it
            probe = min(max(probe, lo + 1), min(limit, 8 * lo))
        elif misses >= 2:  # the line keeps overshooting (the growth steepens): halve the bracket instead
            probe = (lo + hi) // 2
        else:
            probe = min(max(probe, lo + 1), hi - 1)
        if probe <= lo:
            break
        if fits(probe):
            lo, misses = probe, 0
            if probe == limit:
                break
        else:
            hi, misses = probe, misses + 1
    return lo, totals


def deepspeed_zero2(params: int, trainable: int, target: Target) -> dict:
    """DeepSpeed's own estimate of ZeRO-2 model-state memory (no offload) for the same model and devices:
    2 bytes per weight (its bf16 copy) + 18 per trainable weight split over the devices. Its table as printed."""
    try:
        from deepspeed.runtime.zero.stage_1_and_2 import (estimate_zero2_model_states_mem_needs,
                                                          estimate_zero2_model_states_mem_needs_all_cold)
    except Exception as e:  # not installed (the `torch` extra), or no usable torch
        return {"bytes_per_device": None, "note": f"deepspeed unavailable ({type(e).__name__}): "
                                                  "pip install -e '.[torch]'"}
    per_host = target.devices // target.hosts
    _, trainable_bytes = estimate_zero2_model_states_mem_needs(trainable, per_host, target.hosts, cpu_offload=False)
    table = io.StringIO()
    with contextlib.redirect_stdout(table):
        estimate_zero2_model_states_mem_needs_all_cold(params, per_host, target.hosts)
    # its formula counts every weight as trainable; frozen weights hold only the 2-byte copy
    return {"bytes_per_device": int(trainable_bytes + 2 * (params - trainable)), "table": table.getvalue().strip()}


# ----------------------------------------------------------------------------- the command line


def _config(args, extra: tuple[str, ...] = ()) -> RunConfig:
    return load_config(args.config, [*args.set, *extra])


def _alternatives(args, config: RunConfig, target: Target) -> list[tuple[str, RunConfig, Target]]:
    """What to change when batch 1 does not fit, each as (description, config, target), at batch 1."""
    t, m = config.training, config.model
    out = []
    if not t.gradient_checkpointing:
        out.append(("training.gradient_checkpointing=true", _config(args, ("training.gradient_checkpointing=true",)),
                    target))
    if config.sharding.strategy != "fsdp":
        out.append(("sharding.strategy=fsdp", _config(args, ("sharding.strategy=fsdp",)), target))
    more = dataclasses.replace(target, devices=target.devices * 2, hosts=target.hosts * 2 if target.hosts > 1 else 1)
    out.append((f"--devices {more.devices}", config, more))
    if not m.freeze_vision:
        out.append(("model.freeze_vision=true", _config(args, ("model.freeze_vision=true",)), target))
    h, w = config.data.image_hw
    if min(h, w) > 28:
        smaller = [max(28, (s * 3 // 4) // 28 * 28) for s in (h, w)]
        size = f"[{smaller[0]}, {smaller[1]}]"
        out.append((f"data.image_size={size}", _config(args, (f"data.image_size={size}",)), target))
    return out


def _gib(n: int | None, unit: int = GIB) -> str:
    return "n/a" if n is None else f"{n / unit:.2f}"


def _unit(total: int) -> tuple[int, str]:
    """GiB, or MiB for a plan under 1 GiB (a tiny model)."""
    return (GIB, "GiB") if total >= GIB else (2**20, "MiB")


def _last_line(e: Exception) -> str:
    """The cause of a compile error: the last line of XLA's message that names one."""
    lines = [line.strip() for line in str(e).splitlines() if "Error" in line or "error" in line]
    return lines[-1] if lines else str(e).splitlines()[0]


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def report(config: RunConfig, args, target: Target, planned: Planned) -> str:
    p, spec, t = planned.plan, target.spec, config.training
    h, w = config.data.image_hw
    m = config.model
    strategy = config.sharding.strategy
    if p.compute_params:
        copy_note = "the weights used, " + ("sharded" if strategy == "fsdp" else "whole on each device")
        master_note = "trainable (sharded) and frozen weights"
    else:
        copy_note = "cast inside the step" if m.compute_dtype != m.param_dtype else ""
        master_note = "trainable and frozen weights" + (", sharded" if strategy == "fsdp" else "")
    rows = [
        (f"compute params ({m.compute_dtype})", p.compute_params, copy_note),
        (f"master params ({m.param_dtype})" if m.lora is None else
         f"params ({m.param_dtype}; base {m.compute_dtype})", p.master_params, master_note),
        ("gradients", p.gradients, f"{m.param_dtype}, inside the temporaries"),
        ("optimizer state (AdamW)", p.optimizer, "two moments per trainable weight"),
        ("arguments (XLA)", p.arguments, "state + batch"),
        ("temporaries (XLA)", p.temporaries, "activations, gradients, buffers"),
        ("total", p.total, "arguments + outputs - donated + temporaries"),
        ("usable", p.usable, f"{gpus.USABLE_FRACTION:.0%} of the card's {p.card / GIB:.2f} GiB"),
        ("headroom", p.headroom, ""),
    ]
    unit, unit_name = _unit(p.total)
    lines = [
        f"plan: {args.config} on {target.devices} x {spec.name} ({target.gpu}), {target.hosts} host(s)",
        f"model: {planned.source}; {_count(planned.params)} weights, {_count(planned.trainable)} trainable; "
        f"{config.model.num_labels or DEFAULT_LABELS} labels",
        f"step: batch {planned.batch_size} per device x {target.devices} devices x {t.gradient_accumulation_steps} "
        f"accumulation, {h}x{w} px ({config.data.num_patches} patches), {config.sharding.strategy}, "
        f"{m.compute_dtype} compute, remat {'on' if t.gradient_checkpointing else 'off'}; "
        f"compiled in {planned.compile_s:.0f} s",
        "",
        f"{'per device':28} {unit_name:>8}",
        *(f"  {name:26} {_gib(value, unit):>8}  {note}" for name, value, note in rows),
        f"fits: {'yes' if p.fits else 'NO'}",
        f"attention: {p.cudnn_attention_calls} cuDNN fused-attention calls in the program; "
        f"{p.xla_attention_calls} attention calls traced with plain XLA",
        "collectives (result bytes per device): " + (", ".join(
            f"{k} {v['count']} ({_gib(v['bytes'], unit)} {unit_name})" for k, v in p.collectives.items() if v["count"])
            or "none"),
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qvl_jax.plan", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML run config (see configs/)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.add_argument("--gpu", default="h100-80gb", help=f"the card: {', '.join(gpus.GPUS)}")
    parser.add_argument("--devices", type=int, default=8, help="GPUs in all")
    parser.add_argument("--hosts", type=int, default=1, help="hosts they are spread over")
    parser.add_argument("--max-batch", action="store_true", help="find the largest per-device batch that fits")
    parser.add_argument("--no-deepspeed", action="store_true", help="leave out DeepSpeed's estimate")
    parser.add_argument("--json", default=None, metavar="OUT", help="write the plan as JSON")
    args = parser.parse_args(argv)
    jax.config.update("jax_platforms", "cpu")  # nothing here runs on a device; XLA compiles for the target

    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    try:
        config = _config(args)
        target = Target(gpus.key(args.gpu), args.devices, args.hosts)
        say(f"compiling the train step for {args.devices} x {target.spec.name} ...")
        planned = plan_step(config, target)
    except (SchemaError, PlanError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except jax.errors.JaxRuntimeError as e:  # XLA could not compile the step for this topology
        print(f"error: the train step does not compile for {args.devices} x {args.gpu}: {_last_line(e)}",
              file=sys.stderr)
        return 2
    print(report(config, args, target, planned))
    out = {"config": args.config, "gpu": target.gpu, "device_kind": target.spec.name, "devices": target.devices,
           "hosts": target.hosts, "batch_size": planned.batch_size, "fits": planned.plan.fits,
           "per_device_bytes": planned.plan.per_device_bytes(), "outputs_bytes": planned.plan.outputs,
           "aliased_bytes": planned.plan.aliases, "cudnn_attention_calls": planned.plan.cudnn_attention_calls,
           "xla_attention_calls": planned.plan.xla_attention_calls, "collectives": planned.plan.collectives,
           "compile_s": round(planned.compile_s, 1), "params": planned.params, "trainable_params": planned.trainable,
           "max_batch": None}
    if not args.no_deepspeed:
        ds = deepspeed_zero2(planned.params, planned.trainable, target)
        out["deepspeed_zero2"] = ds
        if ds["bytes_per_device"] is not None:
            qvl_states = planned.plan.master_params + planned.plan.compute_params + planned.plan.optimizer + \
                planned.plan.gradients
            print(f"model states per device: qvl {config.sharding.strategy} {qvl_states / GIB:.2f} GiB; DeepSpeed "
                  f"ZeRO-2 estimate {ds['bytes_per_device'] / GIB:.2f} GiB (its table below)")
            print("  " + ds["table"].replace("\n", "\n  "))
        else:
            print(f"DeepSpeed ZeRO-2 estimate: {ds['note']}")
    if args.max_batch:
        unit, unit_name = _unit(planned.plan.total)

        def plan_at(b: int) -> memory.MemoryPlan:
            if b == planned.batch_size:
                return planned.plan
            say(f"compiling batch {b} per device ...")
            p = plan_step(config, target, batch_size=b).plan
            say(f"  batch {b}: {_gib(p.total, unit)} {unit_name}, {'fits' if p.fits else 'does not fit'}")
            return p

        best, totals = find_max_batch(plan_at)
        out["max_batch"], out["max_batch_totals"] = best, {str(b): v for b, v in sorted(totals.items())}
        if best is not None:
            print(f"largest batch per device that fits: {best} ({_gib(totals[best], unit)} {unit_name} planned)")
        else:
            print("batch 1 does not fit; planned at batch 1 with one change each:")
            out["alternatives"] = []
            for change, alt_config, alt_target in _alternatives(args, config, target):
                say(f"compiling with {change} ...")
                try:
                    p = plan_step(alt_config, alt_target, batch_size=1).plan
                except jax.errors.JaxRuntimeError as e:
                    out["alternatives"].append({"change": change, "total_bytes": None, "fits": False,
                                                "error": _last_line(e)})
                    print(f"  {change:40} does not compile: {_last_line(e)}")
                    continue
                out["alternatives"].append({"change": change, "total_bytes": p.total, "fits": p.fits})
                print(f"  {change:40} {_gib(p.total, unit):>8} {unit_name}  {'fits' if p.fits else 'does not fit'}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0 if planned.plan.fits else 1


if __name__ == "__main__":
    raise SystemExit(main())
