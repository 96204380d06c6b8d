"""`nnx.RMSNorm` whose backward pass sums in float32 before it rounds.

`nnx.RMSNorm` uses the half-precision input twice (for the statistics and for the
scaled output), promoting it to float32 at each use. The backward pass then
rounds each use's cotangent to the input dtype and adds the two in bfloat16,
and those two terms nearly cancel (the normalisation removes the component
along x), so the rounding error survives the cancellation. This layer casts
the input to float32 once, as transformers' RMSNorm does: the gradient is
summed in float32 and rounded once. Measured on one bfloat16 decoder layer
(`dL/dx` against the float32 reference, 4 seeds): JAX/torch error ratio 1.07 -> 0.96.
The forward pass rounds once (transformers rounds twice: the normalised value,
then the product with the weight). Parameters are the same as `nnx.RMSNorm`'s.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx


class RMSNorm(nnx.RMSNorm):
    def __call__(self, x, mask=None):
        # In float32 the cast is a no-op and this is exactly nnx.RMSNorm (whose fused
        # statistics XLA:CPU runs ~1.7x faster than a hand-written mean of squares).
        return super().__call__(x.astype(jnp.float32), mask).astype(self.dtype or x.dtype)


def rms_norm(dim: int, eps: float, opts, rngs: nnx.Rngs) -> RMSNorm:
    """An `RMSNorm` in `opts`' dtypes (RuntimeOptions)."""
    return RMSNorm(dim, epsilon=eps, rngs=rngs, **opts.linear_kwargs())
