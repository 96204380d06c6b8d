"""qvl_jax: Qwen2.5-VL image classifier in Flax NNX.

    model = qvl_jax.load_hf(path, num_labels=101)
    feats = model.encode_image(pixel_values, grid_thw)   # [B, N/4, out_hidden]
    out = model(pixel_values, grid_thw, input_ids)       # out.logits [B, num_labels]
    qvl_jax.save_hf(model, out_dir)
"""

from qvl_jax.classifier import ClassifierOutput, QwenVLClassifier
from qvl_jax.hf_io import CheckpointError, load_hf, read_config, save_hf
from qvl_jax.options import RuntimeOptions

__all__ = ["QwenVLClassifier", "ClassifierOutput", "RuntimeOptions", "load_hf", "save_hf", "read_config",
           "CheckpointError"]
