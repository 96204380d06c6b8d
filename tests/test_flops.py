"""The analytic FLOP count against XLA's cost analysis of the compiled forward + backward."""

import copy

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

from qvl_core import flops, parts
from qvl_core.config import ModelConfig
from qvl_core.model_config import QwenVLConfig
from qvl_jax.classifier import QwenVLClassifier
from qvl_jax.options import RuntimeOptions
from qvl_jax.state import trainable_filter
from tests.train_helpers import TINY_MODEL


def _config(mode: str) -> QwenVLConfig:
    raw = copy.deepcopy(TINY_MODEL)
    raw["vision_config"].update(hidden_size=256, intermediate_size=512, num_heads=4, out_hidden_size=256, depth=3,
                                fullatt_block_indexes=[2])
    raw["text_config"].update(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                              num_hidden_layers=2, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                                    "mrope_section": [8, 12, 12]})
    pooling = "mean_image" if mode == "vision" else "last"
    return QwenVLConfig.from_hf_dict(raw).with_head(num_labels=10, mode=mode, pooling=pooling)


@pytest.mark.parametrize("mode,side,freeze", [
    ("vlm", 112, {}),
    ("vlm", 168, {"freeze_vision": True}),  # the merger trains first: its input gradients feed ln_q's scale
    ("vlm", 112, {"freeze_vision": True, "freeze_merger": True}),  # the decoder trains first
    ("vlm", 112, {"freeze_vision": True, "freeze_merger": True, "freeze_decoder": True}),  # the head alone
    ("vision", 112, {}),
], ids=["vlm", "vision-frozen", "vision-merger-frozen", "head-only", "vision-mode"])
def test_analytic_train_flops_match_xla_cost_analysis(mode, side, freeze):
    cfg = _config(mode)
    model = QwenVLClassifier(cfg, opts=RuntimeOptions(), rngs=nnx.Rngs(0))
    model_cfg = ModelConfig(config={}, mode=mode, **freeze)
    graphdef, trainable, frozen = nnx.split(model, trainable_filter(model_cfg), ...)
    grid, batch = (1, side // 14, side // 14), 2
    pixels = jnp.zeros((batch, grid[1] * grid[2], 588))  # one frame per patch, as the trainer feeds them
    labels = jnp.zeros((batch,), jnp.int32)

    def loss(p, frozen, pixels):
        logits = nnx.merge(graphdef, p, frozen)(pixels, grid).logits
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).sum()

    # Frozen weights and pixels are arguments, as in the trainer: closed over, they are constants, and XLA folds
    # whatever depends on constants alone (a frozen patch embedding of fixed pixels) out of its count.
    cost = jax.jit(jax.grad(loss)).lower(trainable, frozen, pixels).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    analytic = flops.train_flops_per_sample(cfg, grid, trainable=parts.trainable_parts(model_cfg)) * batch
    assert abs(analytic / cost["flops"] - 1) <= 0.05, (analytic, cost["flops"])


def test_window_sizes_and_peak_table():
    cfg = _config("vlm")  # window 56 px = 2x2 merged tokens = 16 patches
    assert flops.window_sizes((8, 8), cfg) == [16, 16, 16, 16]
    assert flops.window_sizes((10, 6), cfg) == [16, 8, 16, 8, 8, 4]  # ragged windows at the edges
    assert flops.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0 and flops.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert flops.peak_tflops("cpu") is None and flops.peak_tflops("cpu", 1.5) == 1.5
    assert flops.mfu(989e12, 1.0, 1, 989.0) == pytest.approx(1.0) and flops.mfu(1.0, 1.0, 1, None) is None
