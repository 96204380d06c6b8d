"""The run config: shipped configs load, overrides apply, mistakes name their key."""

from pathlib import Path

import pytest

from qvl_core.config import load_config
from qvl_core.schema import SchemaError

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def test_configs_are_shipped():
    assert {p.name for p in CONFIGS} >= {"demo.yaml", "complete_training_config.yaml", "food101_3b.yaml", "bench_small.yaml",
                                         "two_datasets.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    config = load_config(path)
    assert config.data.datasets and config.training.batch_size >= 1


def test_seed_guide_keys_and_overrides():
    config = load_config(Path("configs/complete_training_config.yaml"),
                         ["training.batch_size=4", "model.mode=vision", "model.pooling=mean_image",
                          "monitor.all_freq.eval_log_freq=25", "training.learning_rate=3e-5"])
    assert config.model.num_labels == 101 and config.training.gradient_accumulation_steps == 4
    assert config.training.batch_size == 4 and config.model.mode == "vision"
    assert config.monitor.all_freq.eval_log_freq == 25 and config.training.learning_rate == 3e-5
    assert config.sharding.strategy == "zero2" and config.run_dir == Path("outputs/complete_training")


def test_config_mistakes_name_the_key(tmp_path):
    with pytest.raises(SchemaError, match=r"training.batch_size: expected an integer, got str 'eight'"):
        load_config("configs/demo.yaml", ["training.batch_size=eight"])
    with pytest.raises(SchemaError, match=r"sharding.strategy: 'zero3' is not one of 'dp' \| 'zero2' \| 'fsdp'"):
        load_config("configs/demo.yaml", ["sharding.strategy=zero3"])
    with pytest.raises(SchemaError, match="set exactly one of pretrained_name"):
        load_config("configs/demo.yaml", ["model.pretrained_name=/models/x"])
    with pytest.raises(SchemaError, match="config file .*nope.yaml does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(SchemaError, match=r"--set 'training.batch_size': expected key.path=value"):
        load_config("configs/demo.yaml", ["training.batch_size"])


def test_readme_config_reference_is_the_generated_one():
    from qvl_core.config import reference_markdown

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    start = readme.index("<!-- config-reference:start -->\n") + len("<!-- config-reference:start -->\n")
    end = readme.index("\n<!-- config-reference:end -->")
    assert readme[start:end] == reference_markdown(), "regenerate: python -m qvl_core.config --reference"
    assert reference_markdown().count("\n") > 60 and "|  |" not in reference_markdown()  # every key explained


def test_a_fresh_run_refuses_an_earlier_runs_checkpoints(tmp_path):
    from qvl_core.runs import claim_run_dir
    run = tmp_path / "run"
    (run / "checkpoints" / "200").mkdir(parents=True)
    (run / "hf_final").mkdir()
    (run / "logs").mkdir()
    (run / "logs" / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(SchemaError, match=r"already holds checkpoints \(step 200\).*--resume_from auto.*overwrite"):
        claim_run_dir(run, resume_from=None, overwrite=False, process_index=0)
    claim_run_dir(run, resume_from="auto", overwrite=False, process_index=0)  # resuming is fine
    claim_run_dir(run, resume_from=None, overwrite=True, process_index=1)  # only process 0 removes
    assert (run / "checkpoints" / "200").is_dir()
    claim_run_dir(run, resume_from=None, overwrite=True, process_index=0)
    assert not (run / "checkpoints").exists() and not (run / "hf_final").exists()
    assert not (run / "logs" / "metrics.jsonl").exists()
    claim_run_dir(run, resume_from=None, overwrite=False, process_index=0)  # nothing left to refuse
