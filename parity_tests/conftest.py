import logging

import pytest

logging.getLogger("transformers").setLevel(logging.ERROR)


@pytest.fixture(scope="session", autouse=True)
def _quiet_transformers():
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


@pytest.fixture(scope="session")
def gqa_ckpt(tmp_path_factory):
    """Tiny checkpoint: GQA decoder (4 heads / 2 KV heads), stored 5-label head."""
    from parity_tests.tiny import make_checkpoint
    return make_checkpoint(tmp_path_factory.mktemp("gqa"), num_labels=5, seed=0)


@pytest.fixture(scope="session")
def mha_ckpt(tmp_path_factory):
    """Tiny checkpoint: plain multi-head decoder (KV heads == heads), no head stored, odd vision sizes."""
    from parity_tests.tiny import make_checkpoint
    return make_checkpoint(tmp_path_factory.mktemp("mha"), seed=7,
                           text={"num_key_value_heads": 4},
                           vision={"depth": 4, "fullatt_block_indexes": [0, 3], "window_size": 112,
                                   "hidden_size": 40, "num_heads": 2})
