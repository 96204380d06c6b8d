"""qvl_torch: the PyTorch reference path (transformers' Qwen2.5-VL + the shared head)."""

from qvl_torch.model import TorchClassifierOutput, TorchQwenVLClassifier, load_pretrained

__all__ = ["TorchQwenVLClassifier", "TorchClassifierOutput", "load_pretrained"]
