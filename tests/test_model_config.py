import copy

import pytest

from qvl_core.model_config import ConfigError, QwenVLConfig
from tests.real_configs import QWEN25_VL_7B


def test_flat_and_nested_forms_agree():
    flat = QwenVLConfig.from_hf_dict(copy.deepcopy(QWEN25_VL_7B))
    nested = QwenVLConfig.from_hf_dict(flat.to_hf_dict())
    assert nested == flat
    assert flat.text.mrope_section == (16, 24, 24) and flat.vision.in_channels == 3
    assert flat.text.num_key_value_heads == 4 and flat.vision.fullatt_block_indexes == (7, 15, 23, 31)


def test_head_fields_round_trip():
    cfg = QwenVLConfig.from_hf_dict(copy.deepcopy(QWEN25_VL_7B)).with_head(
        num_labels=3, pooling="mean_image", id2label=("a", "b", "c"))
    raw = cfg.to_hf_dict()
    assert raw["id2label"] == {"0": "a", "1": "b", "2": "c"} and raw["label2id"]["c"] == 2
    assert QwenVLConfig.from_hf_dict(raw) == cfg


@pytest.mark.parametrize("edit,match", [
    (lambda r: r.__setitem__("hidden_size", "big"), "hidden_size = 'big' should be int"),
    (lambda r: r["vision_config"].__setitem__("depth", 2.5), "vision_config.depth = 2.5 should be int"),
    (lambda r: r.__setitem__("use_sliding_window", True), "use_sliding_window"),
    (lambda r: r.__setitem__("rope_scaling", {"type": "yarn", "mrope_section": [16, 24, 24]}), "rope type 'yarn'"),
    (lambda r: r["vision_config"].__setitem__("fullatt_block_indexes", [40]), r"fullatt_block_indexes \[40\]"),
    (lambda r: r.__setitem__("num_key_value_heads", 5), "not divisible by num_key_value_heads 5"),
    (lambda r: r["vision_config"].__setitem__("out_hidden_size", 100), "out_hidden_size 100"),
    (lambda r: r.pop("vision_config"), "no 'vision_config'"),
    (lambda r: r.__setitem__("vocab_size", 151000), "image_token_id 151655, vision_start_token_id 151652, "
                                                      "vision_end_token_id 151653 outside the text vocab_size 151000"),
])
def test_bad_configs_name_the_key(edit, match):
    raw = copy.deepcopy(QWEN25_VL_7B)
    edit(raw)
    with pytest.raises(ConfigError, match=match):
        QwenVLConfig.from_hf_dict(raw, source="x/config.json")


def test_vision_mode_needs_mean_pooling():
    cfg = QwenVLConfig.from_hf_dict(copy.deepcopy(QWEN25_VL_7B))
    with pytest.raises(ConfigError, match="use pooling 'mean_image'"):
        cfg.with_head(mode="vision", pooling="last")
