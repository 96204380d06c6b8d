"""How a model runs, as opposed to what it is (that is `qvl_core.model_config`)."""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

# Names of `jax.checkpoint_policies` members a config may pick for per-block remat.
RematPolicy = Literal["nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable"]


@dataclasses.dataclass(frozen=True)
class RuntimeOptions:
    param_dtype: str = "float32"  # dtype the parameters are stored (and updated) in
    dtype: str = "float32"  # compute dtype of matmuls and activations; logits/loss stay float32
    attention: Literal["auto", "cudnn", "xla"] = "auto"
    remat: bool = False  # rematerialise each vision block and decoder layer in the backward pass
    remat_policy: RematPolicy = "nothing_saveable"

    def __post_init__(self):
        for name in ("param_dtype", "dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"{name} {getattr(self, name)!r} must be one of {sorted(DTYPES)}")
        if self.attention not in ("auto", "cudnn", "xla"):
            raise ValueError(f"attention {self.attention!r} must be auto, cudnn or xla")
        if not hasattr(jax.checkpoint_policies, self.remat_policy):
            raise ValueError(f"remat_policy {self.remat_policy!r} is not a jax.checkpoint_policies member")

    @classmethod
    def for_run(cls, config) -> "RuntimeOptions":
        """The options a run config (`qvl_core.config.RunConfig`) asks for: trainer, evaluation, benchmarks."""
        m, t = config.model, config.training
        return cls(param_dtype=m.param_dtype, dtype=m.compute_dtype,
                   attention="auto" if t.memory_efficient_attention else "xla", remat=t.gradient_checkpointing)

    @property
    def jnp_dtype(self):
        return DTYPES[self.dtype]

    @property
    def jnp_param_dtype(self):
        return DTYPES[self.param_dtype]

    def linear_kwargs(self) -> dict:
        return {"dtype": self.jnp_dtype, "param_dtype": self.jnp_param_dtype}

    def maybe_remat(self, fn):
        """Wraps `fn(module, *arrays)` in `jax.checkpoint` when remat is on.

        The module goes in as its state and is rebuilt inside, so nothing of the outer module is written from
        the inner trace. (`nnx.remat` writes its inputs' variables back, which fails with `TraceContextError`
        for weights that are not differentiated, a frozen part or a LoRA base, and the blocks change no
        state.)"""
        if not self.remat:
            return fn
        from flax import nnx

        policy = getattr(jax.checkpoint_policies, self.remat_policy)

        def run(module, *arrays):
            graphdef, state = nnx.split(module)
            return jax.checkpoint(lambda state, *a: fn(nnx.merge(graphdef, state), *a), policy=policy)(state, *arrays)

        return run


ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}


def swiglu(act, gate, up):
    """`act(gate) * up` in float32, rounded once (two roundings in bfloat16 would double the error)."""
    return (act(gate.astype(jnp.float32)) * up.astype(jnp.float32)).astype(gate.dtype)
