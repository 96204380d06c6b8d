"""Data sets, Qwen2.5-VL preprocessing and the training/eval sources (no jax, no torch)."""

from .config import AugmentConfig, DataConfig, DatasetConfig
from .image import (
    BadImageError,
    decode_image,
    expand_patches,
    normalize_table,
    patchify,
    preprocess_image,
    smart_resize,
)
from .labels import LabelMap
from .mixture import MixtureOrder
from .pipeline import BadRecords, Data, EvalSource, TrainSource, load_data
from .sources import DataError, ImageSplit, read_dataset, read_split
from .transforms import EvalTransform, TrainTransform

__all__ = [
    "AugmentConfig", "BadImageError", "BadRecords", "Data", "DataConfig", "DataError", "DatasetConfig",
    "EvalSource", "EvalTransform", "ImageSplit", "LabelMap", "MixtureOrder", "TrainSource", "TrainTransform",
    "decode_image", "expand_patches", "load_data", "normalize_table", "patchify", "preprocess_image",
    "read_dataset", "read_split", "smart_resize",
]
