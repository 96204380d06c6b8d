"""Evaluating a checkpoint and predicting with the exported classifier read the run's label map back."""

import json

import pytest

from qvl_core.data import DataError
from qvl_core.schema import from_dict
from qvl_core.config import RunConfig
from tests.train_helpers import tiny_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from qvl_jax.train import run

    tmp = tmp_path_factory.mktemp("trained")
    config = tiny_config(tmp, training={"max_steps": 6, "learning_rate": 3e-3})
    result = run(from_dict(RunConfig, config))
    return tmp, config, result


def test_evaluate_reproduces_the_training_run_eval(trained):
    from qvl_jax.evaluate import run_evaluation

    tmp, config, result = trained
    from qvl_core.config import load_config

    run_dir = tmp / "outputs" / "run"
    again = run_evaluation(load_config(run_dir / "config.yaml"), "latest")
    assert again["step"] == 6
    assert again["eval/food_accuracy"] == result["eval/food_accuracy"]
    assert again["eval/overall_loss"] == pytest.approx(result["eval/overall_loss"], rel=1e-6)
    assert (run_dir / "eval" / "evaluate_step6.json").is_file()


def test_evaluate_refuses_data_with_another_label_map(trained, tmp_path):
    from qvl_core.data import fixtures
    from qvl_core.config import load_config
    from qvl_jax.evaluate import run_evaluation

    tmp, config, _ = trained
    other = tmp_path / "other"
    fixtures.write_food101(other, ["apple_pie", "churros", "bibimbap"], train_per_class=2, test_per_class=1)
    run_dir = tmp / "outputs" / "run"
    cfg = load_config(run_dir / "config.yaml", [f"data.datasets=[{{name: food, format: food101, path: {other}}}]"])
    with pytest.raises(DataError, match="label map does not match this run's data .head index 1 is 'bibimbap' there"):
        run_evaluation(cfg, "latest")


def test_predict_uses_the_stored_labels_and_image_size(trained, capsys):
    from qvl_jax.predict import main

    tmp, _, _ = trained
    model_dir = tmp / "outputs" / "run" / "hf_final"
    stored = json.loads((model_dir / "config.json").read_text())["qvl_classifier"]
    assert stored["image_size"] == [56, 56]
    images = tmp / "food" / "images"
    (tmp / "broken.jpg").write_bytes(b"not a jpeg")
    assert main(["--model", str(model_dir), str(images / "churros"), str(tmp / "broken.jpg"), "--top_k", "2",
                 "--output", str(tmp / "preds.jsonl")]) == 0
    rows = [json.loads(line) for line in (tmp / "preds.jsonl").read_text().splitlines()]
    good = [r for r in rows if "labels" in r]
    assert len(good) == 10 and all(set(r["labels"]) <= {"apple_pie", "bibimbap", "churros"} for r in good)
    assert all(len(r["probs"]) == 2 and r["probs"][0] >= r["probs"][1] for r in good)
    assert [r for r in rows if "error" in r][0]["path"].endswith("broken.jpg")
    assert "cannot decode image" in capsys.readouterr().err
