"""Evaluate, predict, report and doctor on a trained run; the run's label map is read back."""

import json
from pathlib import Path

import pytest

from qvl_core.config import load_config
from qvl_core.data import DataError


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run of `make demo`'s config (configs/demo.yaml), shortened to one epoch, in a temporary folder."""
    from qvl_jax.train import run

    tmp = tmp_path_factory.mktemp("trained")
    overrides = [f"output.dir={tmp / 'outputs'}", "output.run_name=run", "training.num_epochs=1",
                 f"data.datasets=[{{name: digits, format: digits, path: {tmp / 'digits'}}}]",
                 "monitor.all_freq.eval_log_freq=20", "monitor.wandb.mode=disabled", "monitor.progress_bar=false"]
    config = load_config("configs/demo.yaml", overrides)
    result = run(config)
    return tmp, config, result


def test_evaluate_reproduces_the_training_run_eval(trained):
    from qvl_jax.evaluate import run_evaluation

    tmp, _, result = trained
    run_dir = tmp / "outputs" / "run"
    again = run_evaluation(run_dir)  # the run's best (else latest) checkpoint, its config.yaml
    assert again["step"] == result["best"]["step"]
    if again["step"] == result["step"]:
        assert again["eval/digits_accuracy"] == result["eval/digits_accuracy"]
        assert again["eval/overall_loss"] == pytest.approx(result["eval/overall_loss"], rel=1e-6)
    assert again["eval/overall_top5_accuracy"] >= again["eval/overall_accuracy"] > 0.5
    for f in again["files"]:
        assert Path(f).is_file(), f
    per_class = (run_dir / "eval" / f"per_class_step{again['step']}.csv").read_text().splitlines()
    assert per_class[0] == "class,images,correct,accuracy" and len(per_class) == 11
    exported = run_evaluation(run_dir / "hf_final", split="test")
    final = run_evaluation(run_dir / "checkpoints" / str(result["step"]))
    assert exported["eval/overall_accuracy"] == final["eval/overall_accuracy"]


def test_evaluate_refuses_data_with_another_label_map(trained, tmp_path):
    from qvl_core.data import fixtures
    from qvl_jax.evaluate import run_evaluation

    tmp, _, _ = trained
    other = tmp_path / "other"
    fixtures.write_food101(other, ["0", "2", "1", "3", "4", "5", "6", "7", "8", "9"], train_per_class=1,
                           test_per_class=1)
    run_dir = tmp / "outputs" / "run"
    cfg = load_config(run_dir / "config.yaml", [f"data.datasets=[{{name: digits, format: food101, path: {other}}}]"])
    with pytest.raises(DataError, match="label map does not match this run's data .head index 1 is '1' there, '2'"):
        run_evaluation(run_dir, cfg)


def test_predict_uses_the_stored_labels_and_image_size(trained, capsys):
    from qvl_jax.predict import main

    tmp, _, _ = trained
    run_dir = tmp / "outputs" / "run"
    stored = json.loads((run_dir / "hf_final" / "config.json").read_text())["qvl_classifier"]
    assert stored["image_size"] == [56, 56]
    images = tmp / "digits" / "images"
    (tmp / "broken.jpg").write_bytes(b"not a jpeg")
    for checkpoint in (run_dir / "hf_final", run_dir):
        out = tmp / "preds.jsonl"
        assert main(["--checkpoint", str(checkpoint), str(images / "7"), str(tmp / "broken.jpg"),
                     str(tmp / "missing.jpg"), "--top_k", "2", "--output", str(out)]) == 0
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        good = [r for r in rows if "labels" in r]
        assert len(good) == len(list(images.glob("7/*.jpg"))) > 150
        assert all(set(r["labels"]) <= set("0123456789") for r in good)
        assert sum(r["labels"][0] == "7" for r in good) > 0.8 * len(good)  # one epoch already knows its 7s
        assert all(len(r["probs"]) == 2 and r["probs"][0] >= r["probs"][1] for r in good)
        errors = {r["path"].rsplit("/", 1)[-1]: r["error"] for r in rows if "error" in r}
        assert "cannot decode image" in errors["broken.jpg"] and "file not found" in errors["missing.jpg"]
    assert "cannot decode image" in capsys.readouterr().err


def test_report_plots_and_summarises_runs(trained, tmp_path):
    from qvl_core.report import main

    tmp, _, result = trained
    assert main([str(tmp / "outputs" / "run"), "--out", str(tmp_path / "report")]) == 0
    names = {p.name for p in (tmp_path / "report").iterdir()}
    assert {"training_loss.png", "lr.png", "grad_norm.png", "eval_accuracy.png", "samples_per_second.png",
            "summary.md"} <= names
    summary = (tmp_path / "report" / "summary.md").read_text()
    assert f"| run (jax) | {result['best']['accuracy']:.4f} | {result['best']['step']} | digits " in summary
    assert "top5" not in summary  # the per-data-set column holds top-1 accuracies only


def test_doctor_reports_this_machine(capsys):
    from qvl_core.doctor import main, run_checks

    checks = {c.name: c for c in run_checks()}
    assert checks["jax"].status == "ok" and checks["glibc"].status in ("ok", "warn")
    assert checks["accelerator"].status == "warn"  # CPU-only here: said, not failed
    capsys.readouterr()  # what libraries printed while importing
    assert main(["--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["name"] == "python"
