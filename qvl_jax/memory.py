"""What a compiled train step holds per device: the memory plan the trainer checks and `qvl_jax.plan` prints.

    step = make_train_step(...)                                   # qvl_jax.steps
    compiled, calls = compile_step(step, state, layout, micro_batch=..., accumulation=..., num_patches=...)
    plan = memory_plan(compiled, state, shardings, usable_bytes=..., card_bytes=..., attention_calls=calls)
    plan.fits, plan.total, plan.per_device_bytes()

XLA's memory analysis gives per device the bytes of the step's arguments (the
state and the batch), its outputs, the outputs that reuse a donated argument's
buffer (aliases) and its temporaries (activations, gradients, the weights cast
to the compute dtype when the state keeps no compute copy, collective buffers). The peak of a step is about
`arguments + outputs - aliases + temporaries`; `total` is that. The kinds of state
inside the arguments (master weights, optimizer state) and the gradients inside
the temporaries are counted from the shardings, to show where the bytes go.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import numpy as np

from qvl_jax import sharding as sharding_lib

GIB = 2**30

# HLO instructions that move data between devices (async pairs counted once, by their -start).
COLLECTIVES = ("all-reduce", "reduce-scatter", "all-gather", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
                "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%\S+ = (.+?) (" + "|".join(COLLECTIVES) + r")(-start)?\(")
_SHAPE = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([\d,]*)\]")


def abstract_inputs(state: dict, layout: sharding_lib.Layout, *, micro_batch: int, accumulation: int,
                    num_patches: int) -> tuple:
    """The train step's arguments as sharded ShapeDtypeStructs: (trained, frozen, batch) of `state` (arrays or
    abstract) and one global batch `[accumulation, micro_batch x devices, ...]` as `qvl_jax.steps.to_global`
    lays it out."""
    def abstract(tree):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)

    rows = (accumulation, micro_batch * layout.axis_size)
    batch = {
        "patches": jax.ShapeDtypeStruct((*rows, num_patches, 588), np.uint8, sharding=layout.batch(4, axis=1)),
        "label": jax.ShapeDtypeStruct(rows, np.int32, sharding=layout.batch(2, axis=1)),
        "valid": jax.ShapeDtypeStruct(rows, np.bool_, sharding=layout.batch(2, axis=1)),
    }
    return abstract({k: state[k] for k in ("params", "compute", "opt_state")}), abstract(state["frozen"]), batch


def compile_step(step, state: dict, layout: sharding_lib.Layout, *, micro_batch: int, accumulation: int,
                 num_patches: int, device=None):
    """`step` (a jitted train step) lowered on abstract inputs and compiled, for `device`'s kind (default: this
    backend's; a device of a GPU topology compiles for that GPU without one). Returns (compiled, the attention
    implementation of each attention call traced)."""
    from qvl_jax import attention

    args = abstract_inputs(state, layout, micro_batch=micro_batch, accumulation=accumulation,
                           num_patches=num_patches)
    with attention.target(device) as calls:
        compiled = step.lower(*args).compile()
    return compiled, calls


def device_limit() -> int | None:
    """Bytes XLA's allocator may use on this process's first device (a GPU's `bytes_limit`); None on a CPU."""
    stats = jax.local_devices()[0].memory_stats() or {}
    return stats.get("bytes_limit")


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
    """Per collective kind in an optimized HLO module: how many instructions and the bytes of their results on
    one device (for an async pair, the -start's last tuple element)."""
    out = {kind: {"count": 0, "bytes": 0} for kind in COLLECTIVES}
    for line in hlo_text.splitlines():
        found = _INSTRUCTION.match(line)
        if not found:
            continue
        shapes = _SHAPE.findall(found.group(1))
        if found.group(3) and len(shapes) > 1:  # (operands..., results...): count the result half
            shapes = shapes[len(shapes) // 2:]
        out[found.group(2)]["count"] += 1
        out[found.group(2)]["bytes"] += sum(_DTYPE_BYTES[d] * int(np.prod([int(n) for n in dims.split(",") if n]))
                                            for d, dims in shapes)
    return out


def cudnn_attention_calls(hlo_text: str) -> int:
    """cuDNN fused-attention custom calls (forward and backward) in an optimized HLO module."""
    return len(re.findall(r'custom_call_target="__cudnn\$fmha', hlo_text))


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Bytes per device of one compiled train step (see the module docstring)."""

    arguments: int
    outputs: int
    aliases: int
    temporaries: int
    compute_params: int  # a compute-dtype copy of the weights held between steps (0: cast inside the step)
    master_params: int  # the weights as stored (trainable, then updated, and frozen)
    gradients: int  # as the step lays them out (inside the temporaries)
    optimizer: int
    card: int | None  # the device's memory; None when unknown (a CPU)
    usable: int | None  # what XLA may allocate of it
    cudnn_attention_calls: int
    xla_attention_calls: int  # attention calls traced with the plain XLA kernel
    collectives: dict[str, dict[str, int]]

    @property
    def total(self) -> int:
        return self.arguments + self.outputs - self.aliases + self.temporaries

    @property
    def fits(self) -> bool | None:
        return None if self.usable is None else self.total <= self.usable

    @property
    def headroom(self) -> int | None:
        return None if self.usable is None else self.usable - self.total

    def per_device_bytes(self) -> dict[str, int | None]:
        return {"compute_params": self.compute_params, "master_params": self.master_params,
                "gradients": self.gradients, "optimizer": self.optimizer, "arguments": self.arguments,
                "temporaries": self.temporaries, "total": self.total, "card": self.card, "usable": self.usable}

    def summary(self) -> str:
        """One line for a log."""
        s = (f"{self.total / GIB:.2f} GiB per device (arguments {self.arguments / GIB:.2f}, temporaries "
             f"{self.temporaries / GIB:.2f}, outputs not donated {(self.outputs - self.aliases) / GIB:.2f})")
        if self.usable is not None:
            s += f" of {self.usable / GIB:.1f} GiB usable: " + ("fits" if self.fits else "DOES NOT FIT")
        return s


def memory_plan(compiled, state: dict, shardings: dict, *, usable_bytes: int | None, card_bytes: int | None,
                attention_calls: list[str]) -> MemoryPlan:
    """The plan of a compiled train step. `state`: {params, compute, frozen, opt_state} (arrays or sharded
    abstract);
    `shardings`: {grads} as the step constrains them; `attention_calls`: what `qvl_jax.attention.target` recorded
    while the step was traced."""
    m = compiled.memory_analysis()
    text = compiled.as_text()
    return MemoryPlan(
        arguments=int(m.argument_size_in_bytes), outputs=int(m.output_size_in_bytes),
        aliases=int(m.alias_size_in_bytes), temporaries=int(m.temp_size_in_bytes),
        compute_params=_bytes(state["compute"]),
        master_params=_bytes(state["params"]) + _bytes(state["frozen"]),
        gradients=sharding_lib.bytes_per_device(state["params"], shardings["grads"]),
        optimizer=_bytes(state["opt_state"]), card=card_bytes, usable=usable_bytes,
        cudnn_attention_calls=cudnn_attention_calls(text),
        xla_attention_calls=sum(1 for impl in attention_calls if impl == "xla"), collectives=collectives(text))


def _bytes(tree: Any) -> int:
    leaves = jax.tree.leaves(tree)
    return sharding_lib.bytes_per_device(leaves, [x.sharding for x in leaves])


def advice(config) -> list[str]:
    """What to change when a config's step does not fit, cheapest first (each applies to `config`)."""
    t, m, out = config.training, config.model, []
    if t.batch_size > 1:
        out.append(f"a smaller training.batch_size (now {t.batch_size}), with a larger "
                   f"training.gradient_accumulation_steps to keep the global batch")
    if not t.gradient_checkpointing:
        out.append("training.gradient_checkpointing: true (recompute activations in the backward pass)")
    if config.sharding.strategy != "fsdp":
        out.append("sharding.strategy: fsdp (shard the weights too)")
    out.append("more devices (the optimizer state and gradients are split over them)")
    if not m.freeze_vision:
        out.append("model.freeze_vision: true")
    out.append(f"a smaller data.image_size (now {config.data.image_size})")
    return out
