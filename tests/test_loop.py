"""The shared training schedule (`qvl_core.loop`), with no model and no subprocess: a fake backend records calls."""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest

from qvl_core import loop
from qvl_core.config import RunConfig
from qvl_core.data import load_data
from qvl_core.model_config import QwenVLConfig
from qvl_core.runs import EvalTally
from qvl_core.schema import SchemaError, from_dict
from tests.train_helpers import TINY_MODEL, tiny_config


# ----------------------------------------------------------------------------- the decisions


def test_schedule_evaluates_saves_and_stops_at_the_right_steps():
    s = loop.Schedule(total_steps=10, eval_every=3, save_every=4)
    assert [k for k in range(1, 11) if s.evaluates(k)] == [3, 6, 9, 10]
    assert [k for k in range(1, 11) if s.saves(k, new_best=False)] == [4, 8, 10]
    assert s.saves(3, new_best=True) and not s.saves(3, new_best=False)
    assert not loop.Schedule(10, 3, 4, has_eval=False).evaluates(3)
    assert s.stops(5, requested=True, stop_after=None) and s.stops(5, requested=False, stop_after=5)
    assert not s.stops(10, requested=True, stop_after=10)  # the last step ends the run anyway
    assert not s.stops(5, requested=False, stop_after=6)


def test_batch_geometry_and_its_errors(tmp_path):
    t = from_dict(RunConfig, tiny_config(tmp_path)).training
    g = loop.batch_geometry(t, devices=4, processes=2, epoch_length=100)
    assert (g.global_batch, g.process_batch, g.total_steps) == (16, 8, 6)  # max_steps 6
    import dataclasses

    by_epochs = dataclasses.replace(t, max_steps=None, num_epochs=2)
    assert loop.batch_geometry(by_epochs, devices=4, processes=1, epoch_length=100).total_steps == 13  # ceil(200/16)
    with pytest.raises(SchemaError, match="global_batch_size 6 does not divide over 4 devices"):
        loop.batch_geometry(dataclasses.replace(t, global_batch_size=6), devices=4, processes=1, epoch_length=10)
    with pytest.raises(SchemaError, match=r"global_batch_size 32 != batch_size 4 x 4 devices x 1 accumulation = 16"):
        loop.batch_geometry(dataclasses.replace(t, global_batch_size=32), devices=4, processes=1, epoch_length=10)


def test_best_keeps_the_earlier_step_on_ties():
    best = loop.Best()
    assert best.update(3, 0.5) and not best.update(6, 0.5) and best.update(9, 0.75)
    assert best.to_json() == {"accuracy": 0.75, "step": 9}


def test_resume_paths_resolve_to_the_newest_checkpoint_of_this_trainer(tmp_path):
    ckpts = tmp_path / "run" / "checkpoints"
    for step in (4, 8, 12):
        (ckpts / str(step)).mkdir(parents=True)
    for step in (4, 8):
        (ckpts / str(step) / "mine").touch()  # 12: another trainer's (or an incomplete) checkpoint
    mine = lambda d: (d / "mine").exists()  # noqa: E731
    assert loop.resolve_resume(None, tmp_path / "run", mine) is None
    assert loop.resolve_resume("auto", tmp_path / "run", mine) == ckpts / "8"
    assert loop.resolve_resume("auto", tmp_path / "elsewhere", mine) is None
    assert loop.resolve_resume(str(tmp_path / "run"), tmp_path / "x", mine) == ckpts / "8"
    assert loop.resolve_resume(str(ckpts), tmp_path / "x", mine) == ckpts / "8"
    assert loop.resolve_resume(str(ckpts / "4"), tmp_path / "x", mine) == ckpts / "4"
    with pytest.raises(FileNotFoundError, match="no such directory"):
        loop.resolve_resume(str(tmp_path / "nowhere"), tmp_path / "x", mine)
    with pytest.raises(FileNotFoundError, match="no checkpoint of this trainer there"):
        loop.resolve_resume(str(ckpts / "12"), tmp_path / "x", mine)


def test_resume_check_says_how_to_fix_the_batch_size(tmp_path):
    data = _data(tmp_path)
    g = loop.Geometry(processes=1, devices=4, micro_batch=4, accumulation=1, epoch_length=24, total_steps=6)
    meta = {"label_map": data.label_map.to_json(), "global_batch": 8}
    with pytest.raises(SchemaError, match=r"global batch of 8, this run has 16 .*: set training.batch_size to 2"):
        loop.check_resume(meta, tmp_path, data.label_map, g)
    loop.check_resume({**meta, "global_batch": 16}, tmp_path, data.label_map, g)


# ----------------------------------------------------------------------------- the loop, on a fake backend


def _data(tmp_path):
    return load_data(from_dict(RunConfig, tiny_config(tmp_path)).data)


class FakeBackend:
    """Records what the loop asks for; steps take no time and report loss 1/step."""

    process_index = 0
    device_kind = "cpu"

    def __init__(self, config, data, *, accuracies=(), nonfinite=(), crash_at=None, sigterm_at=None):
        self.config, self.data = config, data
        self.accuracies = list(accuracies)
        self.nonfinite, self.crash_at, self.sigterm_at = set(nonfinite), crash_at, sigterm_at
        self.events: list[tuple] = []
        self.step = 0

    def is_checkpoint(self, step_dir):
        return (step_dir / "fake.json").is_file()

    def restore(self, step_dir):
        self.events.append(("restore", int(step_dir.name)))
        return json.loads((step_dir / "fake.json").read_text())

    def batches(self, start_step):
        self.events.append(("batches", start_step))
        self.step = start_step
        while True:
            yield {"error": np.array([""] * 4), "dataset": np.zeros(4, np.int32), "record": np.arange(4)}

    def train_step(self, batch):
        self.step += 1
        if self.step == self.crash_at:
            raise RuntimeError("the machine went away")
        if self.step == self.sigterm_at:
            os.kill(os.getpid(), signal.SIGTERM)
        self.events.append(("step", self.step))
        return self.step

    def fetch(self, handle):
        self.events.append(("fetch", handle))
        bad = handle in self.nonfinite
        return {"loss": float("nan") if bad else 1.0 / handle, "accuracy": 0.5, "grad_norm": 1.0,
                "finite": float(not bad)}

    def evaluate(self):
        self.events.append(("eval", self.step))
        correct = self.accuracies.pop(0) if self.accuracies else 2  # of 4 examples
        tally = EvalTally(self.data.label_map.names)
        tally.add("food", np.zeros(4), np.array([0] * correct + [1] * (4 - correct)), np.zeros(4, int), np.ones(4))
        return tally

    def save(self, step, meta, accuracy):
        self.events.append(("save", step, accuracy))
        d = self.config.run_dir / "checkpoints" / str(step)
        d.mkdir(parents=True)
        (d / "fake.json").write_text(json.dumps(meta))

    def export(self, step, best):
        self.events.append(("export", step, best.step))

    def lr_at(self, update):
        return 0.1

    def memory_gb(self):
        return 0.0

    def any_process(self, flag):
        return flag

    def close(self):
        self.events.append(("close",))


def _fake_run(tmp_path, *, steps=6, eval_every=3, save_every=100, skip_nonfinite=False, **fake):
    config = from_dict(RunConfig, tiny_config(
        tmp_path, training={"max_steps": steps, "skip_nonfinite": skip_nonfinite},
        monitor={"all_freq": {"training_log_freq": 1, "eval_log_freq": eval_every, "perf_log_freq": 2},
                 "wandb": {"mode": "disabled"}, "progress_bar": False},
        output={"save_freq": save_every, "export_hf": True}))
    (config.run_dir / "logs").mkdir(parents=True, exist_ok=True)
    data = load_data(config.data)
    geometry = loop.Geometry(processes=1, devices=1, micro_batch=4, accumulation=1, epoch_length=24, total_steps=steps)
    model_cfg = QwenVLConfig.from_hf_dict(TINY_MODEL).with_head(num_labels=3)
    backend = FakeBackend(config, data, **fake)
    return loop.Run(config, data, geometry, model_cfg), backend


def _logged_steps(config, key="training/loss"):
    lines = (config.run_dir / "logs" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines if key in json.loads(line)]


def test_loop_fetches_each_step_one_step_late_and_before_it_evaluates_or_saves(tmp_path):
    run, fake = _fake_run(tmp_path, steps=6, eval_every=3, accuracies=[2, 1])
    result = loop.train(run, fake)
    assert fake.events == [
        ("batches", 0), ("step", 1), ("step", 2), ("fetch", 1), ("step", 3), ("fetch", 2), ("fetch", 3),
        ("eval", 3), ("save", 3, 0.5),  # a new best is saved at once
        ("step", 4), ("step", 5), ("fetch", 4), ("step", 6), ("fetch", 5), ("fetch", 6),
        ("eval", 6), ("save", 6, 0.25),  # the last step is always saved
        ("export", 6, 3), ("close",)]
    assert result["step"] == 6 and result["start_step"] == 0 and result["best"] == {"accuracy": 0.5, "step": 3}
    assert result["eval/overall_accuracy"] == 0.25 and result["best_model_step"] == 3
    assert _logged_steps(run.config) == [1, 2, 3, 4, 5, 6]
    assert (run.config.run_dir / "eval" / "confusion_step6.csv").is_file()


def test_stop_after_saves_and_resume_continues_at_the_next_step_without_logging_a_step_twice(tmp_path):
    run, fake = _fake_run(tmp_path, steps=8, eval_every=100, save_every=100)
    first = loop.train(run, fake, stop_after=3)
    assert first["step"] == 3 and ("save", 3, None) in fake.events and not any(e[0] == "export" for e in fake.events)
    run, fake = _fake_run(tmp_path, steps=8, eval_every=100, save_every=100)
    second = loop.train(run, fake, resume_from="auto")
    assert fake.events[:3] == [("restore", 3), ("batches", 3), ("step", 4)]
    assert second["start_step"] == 3 and second["step"] == 8
    assert _logged_steps(run.config) == list(range(1, 9))


def test_sigterm_stops_after_the_step_and_saves(tmp_path):
    run, fake = _fake_run(tmp_path, steps=50, eval_every=100, sigterm_at=4)
    result = loop.train(run, fake)
    assert result["step"] == 4 and ("save", 4, None) in fake.events and fake.events[-1] == ("close",)


def test_resume_after_a_crash_drops_the_steps_logged_after_the_checkpoint(tmp_path):
    run, fake = _fake_run(tmp_path, steps=8, eval_every=100, save_every=4, crash_at=7)
    with pytest.raises(RuntimeError, match="went away"):
        loop.train(run, fake)
    assert fake.events[-1] == ("close",)  # the backend is closed on the way out
    assert _logged_steps(run.config) == [1, 2, 3, 4, 5]  # step 6 was in flight, never fetched
    run, fake = _fake_run(tmp_path, steps=8, eval_every=100, save_every=4)
    loop.train(run, fake, resume_from="auto")
    assert fake.events[0] == ("restore", 4)
    assert _logged_steps(run.config) == list(range(1, 9))


def test_nonfinite_step_stops_the_run_naming_it_or_is_skipped_and_counted(tmp_path):
    run, fake = _fake_run(tmp_path, steps=6, eval_every=100, nonfinite={2})
    with pytest.raises(loop.TrainingError, match=r"step 2: non-finite loss \(nan\).*skip_nonfinite"):
        loop.train(run, fake)
    run, fake = _fake_run(tmp_path / "skip", steps=6, eval_every=100, nonfinite={2, 5}, skip_nonfinite=True)
    result = loop.train(run, fake)
    assert result["step"] == 6 and result["skipped_updates"] == 2
    assert _logged_steps(run.config) == [1, 3, 4, 6]  # a skipped step has no loss to log
