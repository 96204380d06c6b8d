"""Evaluate a run's checkpoint on the eval splits of its data sets.

    python -m qvl_jax.evaluate --config outputs/<run>/config.yaml [--checkpoint best|latest|PATH] [--set KEY=VALUE ...]

The checkpoint's label map is read back and must match the data's (same classes at
the same head indices). Prints loss and accuracy per data set and overall and
writes them, with the confusion matrix, under `<run>/eval/`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from qvl_core.config import load_config
from qvl_core.data import DataError, EvalSource, LabelMap, load_data
from qvl_core.hf_checkpoint import CheckpointError
from qvl_core.schema import SchemaError
from qvl_jax import sharding as sharding_lib
from qvl_jax.checkpointing import Checkpoints
from qvl_jax.options import RuntimeOptions
from qvl_core.runs import setup_logging
from qvl_jax.train import abstract_state, evaluate, init_distributed, make_eval_step, model_config

log = logging.getLogger("qvl_jax.evaluate")


def checkpoint_dir(which: str, run_dir: Path) -> Path:
    """`best` (checkpoints/best.json), `latest`, or a path."""
    checkpoints = run_dir / "checkpoints"
    if which == "best":
        pointer = checkpoints / "best.json"
        if not pointer.is_file():
            raise CheckpointError(f"{pointer} does not exist: the run has not evaluated yet; use --checkpoint latest")
        return checkpoints / str(json.loads(pointer.read_text())["step"])
    if which == "latest":
        found = Checkpoints.latest(checkpoints)
        if found is None:
            raise CheckpointError(f"no checkpoint in {checkpoints}")
        return found
    return Checkpoints.resolve(which, run_dir)


def run_evaluation(config, which: str = "best") -> dict:
    init_distributed(config.distributed)
    run_dir = config.run_dir
    setup_logging(run_dir, jax.process_index())
    data = load_data(config.data)
    step_dir = checkpoint_dir(which, run_dir).absolute()
    meta = ocp.CheckpointManager(step_dir.parent).restore(int(step_dir.name),
                                                          args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    data.label_map.check_compatible(LabelMap.from_json(meta["label_map"]), f"checkpoint {step_dir}")
    layout = sharding_lib.Layout(sharding_lib.make_mesh(), config.sharding.strategy, config.sharding.min_shard_size)
    cfg, _ = model_config(config, data.label_map)
    opts = RuntimeOptions(param_dtype=config.model.param_dtype, dtype=config.model.compute_dtype,
                          attention="auto" if config.training.memory_efficient_attention else "xla")
    graphdef, template = abstract_state(config, cfg, opts, layout)
    ckpt = Checkpoints(step_dir.parent, async_save=False)
    try:
        state, _, _ = ckpt.restore(step_dir, template)
    finally:
        ckpt.close()
    eval_step = make_eval_step(graphdef, layout, grid=config.data.grid_thw, dtype=opts.jnp_dtype)
    eval_global = (config.training.eval_batch_size or config.training.batch_size) * layout.axis_size
    sources = {name: (EvalSource(data, name, pad_to=eval_global), eval_global) for name in data.eval}
    if not sources:
        raise DataError("no data set has an eval split")
    metrics = evaluate(state, eval_step, data, sources, layout, config, meta["step"], run_dir)
    result = {"checkpoint": str(step_dir), "step": meta["step"], **metrics}
    if jax.process_index() == 0:
        (run_dir / "eval" / f"evaluate_step{meta['step']}.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qvl_jax.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="the run's config.yaml (or the config it was trained with)")
    parser.add_argument("--checkpoint", default="best", help="best | latest | a checkpoint step directory")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    args = parser.parse_args(argv)
    try:
        result = run_evaluation(load_config(args.config, args.set), args.checkpoint)
    except (SchemaError, DataError, CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
