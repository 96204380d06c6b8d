"""`nnx.Linear` with one rounding per layer in half precision, like a fused GEMM + bias epilogue.

Plain `nnx.Linear` in bfloat16 rounds the matmul output, adds the bias, and
rounds again. cuBLAS and oneDNN (what torch runs) add the bias to the float32
accumulator and round once; so does this layer. Its matmul returns float32
(`preferred_element_type`), the bias is added in float32, and the output is
cast to the compute dtype. A custom VJP keeps the backward matmuls in the
compute dtype, so the float32 accumulator costs no float32 GEMMs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _dot_f32(x, w, dimension_numbers, precision):
    return jax.lax.dot_general(x, w, dimension_numbers, precision=precision, preferred_element_type=jnp.float32)


def _dot_f32_fwd(x, w, dimension_numbers, precision):
    return _dot_f32(x, w, dimension_numbers, precision), (x, w)


def _dot_f32_bwd(dimension_numbers, precision, res, ct):
    x, w = res
    # nnx.Linear contracts the last axis of x with the first axis of w: x [..., I], w [I, O].
    ct = ct.astype(x.dtype)
    dx = jnp.einsum("...o,io->...i", ct, w, precision=precision, preferred_element_type=jnp.float32)
    dw = jnp.einsum("...i,...o->io", x, ct, precision=precision, preferred_element_type=jnp.float32)
    return dx.astype(x.dtype), dw.astype(w.dtype)


_dot_f32.defvjp(_dot_f32_fwd, _dot_f32_bwd)


def _dot_general(x, w, dimension_numbers, precision=None, preferred_element_type=None, out_sharding=None):
    (lc, rc), (lb, rb) = dimension_numbers
    if tuple(lc) != (x.ndim - 1,) or tuple(rc) != (0,) or lb or rb or x.dtype == jnp.float32:
        return jax.lax.dot_general(x, w, dimension_numbers, precision=precision,
                                   preferred_element_type=preferred_element_type, out_sharding=out_sharding)
    return _dot_f32(x, w, ((tuple(lc), tuple(rc)), ((), ())), precision)


def matmul(x, w):
    """`x [..., I] @ w [I, O]` as one 2-D matmul in x's dtype, rounded once like `Linear` (no bias)."""
    w = w.astype(x.dtype)
    y = _dot_general(x.reshape(-1, x.shape[-1]), w, (((1,), (0,)), ((), ())))
    return y.reshape(*x.shape[:-1], w.shape[-1]).astype(x.dtype)


class Linear(nnx.Linear):
    """With an optional LoRA adapter (`qvl_jax.lora.add_adapters`): `lora_a [in, r]`, `lora_b [r, out]`,
    `lora_scaling`; its output `scaling * (x @ A @ B)` joins the float32 accumulator before the one rounding."""

    lora_a = None
    lora_b = None
    lora_scaling = 1.0

    def __init__(self, *args, **kwargs):
        super().__init__(*args, dot_general=_dot_general, **kwargs)

    def __call__(self, x):
        # As one [rows, in] x [in, out] matmul: XLA:CPU runs the weight gradient of a 3-D input
        # (two contracting dimensions) ~15% slower than the same GEMM on the flattened rows.
        lead = x.shape[:-1]
        rows = x.reshape(-1, x.shape[-1])
        y = super().__call__(rows)
        if self.lora_a is not None:
            dtype = self.dtype or x.dtype
            rows = rows.astype(dtype)
            h = _dot_general(rows, self.lora_a[...].astype(dtype), (((1,), (0,)), ((), ()))).astype(dtype)
            y = y + self.lora_scaling * _dot_general(h, self.lora_b[...].astype(dtype), (((1,), (0,)), ((), ())))
        return y.reshape(*lead, y.shape[-1]).astype(self.dtype or x.dtype)


def dense(d_in: int, d_out: int, *, bias: bool, init_std: float, opts, rngs: nnx.Rngs) -> Linear:
    """A `Linear` as the model files declare theirs: normal(init_std) kernel, `opts`' dtypes (RuntimeOptions)."""
    return Linear(d_in, d_out, use_bias=bias, kernel_init=nnx.initializers.normal(init_std), rngs=rngs,
                  **opts.linear_kwargs())
