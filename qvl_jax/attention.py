"""Attention with the kernel chosen once: cuDNN through `jax.nn.dot_product_attention`, or plain XLA.

cuDNN's fused attention runs on NVIDIA GPUs for half-precision inputs with a
head dim that is a multiple of 8 (at most 128 before Hopper, 256 on Hopper and
later); everything else takes the XLA path (`_xla_attention`, float32). The choice and its reason
are logged the first time each (dtype, head_dim) combination is seen.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
from typing import Literal

import jax
import jax.numpy as jnp

from qvl_jax.sharding import split_over_examples

log = logging.getLogger(__name__)

Implementation = Literal["auto", "cudnn", "xla"]

# The device a program is traced for, when that is not `jax.devices()[0]` (compiling for a GPU topology on a
# machine without one: `qvl_jax.plan`).
_target = contextvars.ContextVar("attention_target_device", default=None)
# While set (a list), every traced attention call appends the implementation it chose.
_traced = contextvars.ContextVar("attention_traced", default=None)


@contextlib.contextmanager
def target(device=None):
    """Within: attention is chosen for `device` (default: the backend's first device); yields the list of the
    implementations of every attention call traced meanwhile."""
    calls: list[str] = []
    tokens = _target.set(device), _traced.set(calls)
    try:
        yield calls
    finally:
        _target.reset(tokens[0])
        _traced.reset(tokens[1])


def choose_implementation(requested: Implementation, dtype: str, head_dim: int, device=None,
                          padded_lengths: tuple[int, ...] = ()) -> tuple[str, str]:
    """Returns `(implementation, reason)` for `jax.nn.dot_product_attention` on `device` (default: the
    `target` device, else `jax.devices()[0]`). `padded_lengths`: the query and key lengths of a call that masks
    padded keys (none: no padding mask)."""
    if requested == "xla":
        return "xla", "requested"
    device = device or _target.get() or jax.devices()[0]
    return _choose(requested, dtype, head_dim, device.platform, device.device_kind,
                   getattr(device, "compute_capability", None), tuple(padded_lengths))


@functools.cache
def _choose(requested, dtype, head_dim, platform, device_kind, cc, padded_lengths) -> tuple[str, str]:
    reasons = []
    if platform != "gpu":
        reasons.append(f"platform is {platform}")
    if dtype not in ("bfloat16", "float16"):
        reasons.append(f"dtype is {dtype} (cuDNN attention needs bfloat16/float16)")
    if head_dim % 8:
        reasons.append(f"head_dim {head_dim} is not a multiple of 8")
    limit = 256 if cc is not None and float(cc) >= 9.0 else 128
    if head_dim > limit:
        reasons.append(f"head_dim {head_dim} > {limit} on this GPU")
    if any(n % 2 for n in padded_lengths):  # cuDNN's masked training kernels take even lengths only
        reasons.append(f"padded sequence lengths {' / '.join(map(str, padded_lengths))} are not all even "
                       "(cuDNN needs even lengths)")
    if reasons:
        if requested == "cudnn":
            raise ValueError("attention implementation 'cudnn' was requested but cannot run: " + "; ".join(reasons))
        return "xla", "; ".join(reasons)
    return "cudnn", f"{device_kind}, {dtype}, head_dim {head_dim}"


@functools.cache
def _log_choice(impl: str, reason: str, dtype: str, head_dim: int) -> None:
    log.info("attention kernel for %s head_dim=%d: %s (%s)", dtype, head_dim, impl, reason)


def dot_product_attention(q, k, v, *, requested: Implementation = "auto", is_causal: bool = False,
                          kv_lengths=None):
    """`q [B, T, N, H]`, `k, v [B, S, K, H]` (K divides N: GQA) -> `[B, T, N, H]`.

    `kv_lengths [B]` masks keys at positions >= length (right padding).
    """
    padded = (q.shape[1], k.shape[1]) if kv_lengths is not None else ()
    impl, reason = choose_implementation(requested, jnp.dtype(q.dtype).name, q.shape[-1], padded_lengths=padded)
    _log_choice(impl, reason, jnp.dtype(q.dtype).name, q.shape[-1])
    if (traced := _traced.get()) is not None:
        traced.append(impl)
    if kv_lengths is not None:
        kv_lengths = jnp.maximum(kv_lengths.astype(jnp.int32), 1)  # an empty row would divide by zero
    out_dtype = q.dtype
    if impl == "xla":
        # XLA's kernel rounds the probabilities and, in the backward pass, dO @ V^T to
        # the input dtype before the softmax gradient's cancelling subtraction; in
        # bfloat16 that doubles the gradient error of everything upstream. The
        # fall-back therefore runs in float32 (cuDNN accumulates in float32 itself).
        q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
        return _xla_attention(q, k, v, is_causal, kv_lengths).astype(out_dtype)
    # cuDNN's partitioner takes operands split over examples or heads only; sharding propagation could carry a
    # weight's split into the heads (fsdp splits o_proj's input dimension, heads x head_dim), which fails to
    # compile when the devices do not divide the heads (7B's 28 and 4 KV heads on 8). The output's constraint
    # holds for its gradient too.
    q, k, v = (split_over_examples(x) for x in (q, k, v))
    out = jax.nn.dot_product_attention(q, k, v, is_causal=is_causal, key_value_seq_lengths=kv_lengths,
                                       implementation=impl)
    return split_over_examples(out).astype(out_dtype)


def _xla_attention(q, k, v, is_causal: bool, kv_lengths):
    """Softmax attention in a head-major layout: `[B, K, G*T, H] @ [B, K, H, S]` (G query heads per KV head).

    The same function as `jax.nn.dot_product_attention(implementation="xla")`, written so that
    XLA:CPU does less work: q, k and v are transposed to head-major once, so both products are
    plain batched matmuls with no layout changes around them (the G query heads sharing a KV head
    are stacked along the rows: one larger GEMM, K never broadcast); q is scaled instead of the
    `[T, S]` scores; and the probabilities are normalised after the product with V, on `[T, H]`
    instead of `[T, S]`. Forward + backward of a bench_small layer: 26 -> 13 ms for 8 images of
    256 tokens, 4.8 -> 4.1 ms for 32 windows of 64 (docs/performance.md).
    """
    b, t, n, h = q.shape
    s, kv = k.shape[1], k.shape[2]
    g = n // kv
    q = (q * h ** -0.5).reshape(b, t, kv, g, h).transpose(0, 2, 3, 1, 4).reshape(b, kv, g * t, h)
    k, v = (x.transpose(0, 2, 1, 3) for x in (k, v))  # [B, K, S, H]
    scores = (q @ k.swapaxes(-1, -2)).reshape(b, kv, g, t, s)
    mask = None
    if is_causal:
        mask = jnp.arange(t)[:, None] >= jnp.arange(s)[None, :]
    if kv_lengths is not None:
        valid = (jnp.arange(s)[None, :] < kv_lengths[:, None])[:, None, None, None, :]
        mask = valid if mask is None else mask & valid
    if mask is not None:
        scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
    # Softmax is shift-invariant, so the max carries no gradient (as in jax.nn.softmax). Every
    # row keeps at least one key (causal: the diagonal; kv_lengths >= 1), so the sum is >= 1.
    e = jnp.exp(scores - jax.lax.stop_gradient(scores.max(axis=-1, keepdims=True))).reshape(b, kv, g * t, s)
    out = (e @ v) / e.sum(axis=-1, keepdims=True)
    return out.reshape(b, kv, g, t, h).transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)
