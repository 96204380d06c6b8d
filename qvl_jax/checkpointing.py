"""orbax checkpoints of a run: model + optimizer state, the grain iterator, and run metadata.

    <run>/checkpoints/<step>/state   params, frozen params, optimizer state (orbax, sharded arrays); not the
                                     compute copy, which is cast from the params
    <run>/checkpoints/<step>/data    the grain iterator of every process (one JSON per process)
    <run>/checkpoints/<step>/meta    step, best step/accuracy, label map, resolved config
    <run>/checkpoints/best.json      {"step": ..., "accuracy": ...}: the best checkpoint by eval accuracy

The newest `keep` checkpoints and the best one are kept (a best-only policy could
delete the newest step, which resumption needs). Restoring takes the shardings of
the state it is given, so a run may resume on another number of devices.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import grain
import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)

SAVED = ("params", "frozen", "opt_state")  # the parts of a training state a checkpoint holds


def _rank(metrics: dict) -> tuple[float, int]:
    return metrics["accuracy"], -metrics["step"]  # best accuracy; the earliest step on ties


class Checkpoints:
    def __init__(self, directory: Path, *, keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        policy = ocp.checkpoint_managers.AnyPreservationPolicy([
            ocp.checkpoint_managers.LatestN(n=max(1, keep)),
            ocp.checkpoint_managers.BestN(get_metric_fn=_rank, n=1, keep_checkpoints_without_metrics=False),
        ])
        options = ocp.CheckpointManagerOptions(preservation_policy=policy, enable_async_checkpointing=async_save,
                                               create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def save(self, step: int, state: dict, iterator, meta: dict, *, accuracy: float | None) -> None:
        args = ocp.args.Composite(state=ocp.args.StandardSave({k: state[k] for k in SAVED}),
                                  data=grain.checkpoint.CheckpointSave(iterator),
                                  meta=ocp.args.JsonSave(meta))
        metrics = None if accuracy is None else {"accuracy": float(accuracy), "step": step}
        self.manager.save(step, args=args, metrics=metrics, force=True)
        best = meta.get("best") or {}
        if jax.process_index() == 0 and best.get("step") is not None:
            (self.directory / "best.json").write_text(json.dumps(best) + "\n")

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()

    @staticmethod
    def is_checkpoint(step_dir: Path) -> bool:
        return (Path(step_dir) / "state").exists()

    @staticmethod
    def latest(directory: Path) -> Path | None:
        from qvl_core.loop import latest_checkpoint

        return latest_checkpoint(directory, Checkpoints.is_checkpoint)

    def meta(self, step_dir: Path) -> dict:
        """The JSON saved beside a step's state, read without the state."""
        step_dir = Path(step_dir).absolute()
        reader = self.manager if step_dir.parent == self.directory else ocp.CheckpointManager(step_dir.parent)
        return reader.restore(int(step_dir.name), args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, step_dir: Path, template: dict, iterator=None) -> tuple[dict, dict, bool]:
        """(the `SAVED` parts of a state laid out like `template`'s, meta, whether `iterator` was restored).

        The iterator is set to its saved position when given and when the checkpoint
        holds a state for this process (same process count); otherwise the caller
        positions it from the step.
        """
        step_dir = Path(step_dir).absolute()
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                {k: template[k] for k in SAVED})
        reader = self.manager if step_dir.parent == self.directory else ocp.CheckpointManager(step_dir.parent)
        mine = step_dir / "data" / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        items = {"state": ocp.args.StandardRestore(abstract), "meta": ocp.args.JsonRestore()}
        with_data = iterator is not None and mine.is_file()
        if with_data:
            items["data"] = grain.checkpoint.CheckpointRestore(iterator)
        elif iterator is not None:
            log.info("%s holds no iterator state for %d process(es); the data stream is positioned from the step",
                     step_dir, jax.process_count())
        restored = reader.restore(int(step_dir.name), args=ocp.args.Composite(**items))
        return restored["state"], restored["meta"], with_data
