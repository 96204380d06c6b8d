"""The XLA fall-back attention computes the same function as `jax.nn.dot_product_attention`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qvl_jax.attention import _xla_attention, choose_implementation


@pytest.mark.parametrize("heads,kv_heads,causal,lengths", [
    (4, 2, True, [17, 9, 1]),   # GQA, causal, right padding (one row of a single key)
    (3, 3, False, [5, 12, 12]),  # MHA, padded windows (the vision tower's ragged windows)
    (4, 1, True, None),          # one KV head
])
def test_xla_attention_matches_jax_reference(heads, kv_heads, causal, lengths):
    jax.config.update("jax_default_matmul_precision", "highest")
    rng = np.random.default_rng(0)
    b, t, h = 3, 17, 8
    q = jnp.asarray(rng.standard_normal((b, t, heads, h)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((b, t, kv_heads, h)), jnp.float32) for _ in range(2))
    lens = None if lengths is None else jnp.asarray(lengths)

    def ref(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=causal, key_value_seq_lengths=lens,
                                            implementation="xla")

    def ours(q, k, v):
        return _xla_attention(q, k, v, causal, lens)

    np.testing.assert_allclose(ours(q, k, v), ref(q, k, v), atol=1e-5)
    loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)))  # noqa: E731
    for a, r in zip(jax.grad(loss(ours), (0, 1, 2))(q, k, v), jax.grad(loss(ref), (0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(a, r, atol=1e-5)
    # a wrong mask is caught: dropping the causal mask changes the output
    if causal:
        assert not np.allclose(_xla_attention(q, k, v, False, lens), ref(q, k, v), atol=1e-3)


def test_cpu_falls_back_to_xla_with_reasons():
    impl, reason = choose_implementation("auto", "float32", 64)
    assert impl == "xla" and "platform is cpu" in reason and "float32" in reason
    with pytest.raises(ValueError, match="cudnn.*cannot run"):
        choose_implementation("cudnn", "bfloat16", 64)


def test_on_a_gpu_cudnn_is_chosen_unless_a_padded_length_is_odd():
    import types

    h100 = types.SimpleNamespace(platform="gpu", device_kind="NVIDIA H100 80GB HBM3", compute_capability="9.0")
    assert choose_implementation("auto", "bfloat16", 128, h100)[0] == "cudnn"
    assert choose_implementation("auto", "bfloat16", 128, h100, padded_lengths=(64, 64))[0] == "cudnn"
    impl, reason = choose_implementation("auto", "bfloat16", 128, h100, padded_lengths=(65, 65))
    assert impl == "xla" and "65 / 65" in reason and "even" in reason
    assert choose_implementation("auto", "bfloat16", 320, h100)[0] == "xla"  # head_dim > 256
    with pytest.raises(ValueError, match="cudnn.*cannot run.*even"):
        choose_implementation("cudnn", "bfloat16", 128, h100, padded_lengths=(64, 65))
