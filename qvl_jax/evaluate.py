"""Evaluate a trained classifier on the eval splits of its data sets.

    python -m qvl_jax.evaluate --checkpoint PATH [--config X.yaml] [--split test] [--set KEY=VALUE ...]

PATH is a run directory (its best checkpoint, else its latest), an orbax step
directory (`<run>/checkpoints/<step>`), a classifier in HF format (`hf_final`,
`hf_best`, from either trainer), or a LoRA adapter in PEFT's format
(`adapter_final`, `adapter_best`; its base from `--base` or the adapter's config).
The config defaults to the run's `config.yaml`.
The stored label map is read back and must match the data's (same classes at the
same head indices). Prints loss, top-1 and top-5 accuracy per data set and overall,
and writes them with a per-class accuracy CSV and a confusion-matrix PNG to
`<run>/eval/`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx

from qvl_core import hostmem
from qvl_core.config import RunConfig, load_config
from qvl_core.data import DataError, EvalSource, LabelMap, load_data
from qvl_core.hf_checkpoint import CheckpointError
from qvl_core.lora import ADAPTER_CONFIG, read_adapter
from qvl_core.runs import setup_logging
from qvl_core.schema import SchemaError
from qvl_jax import sharding as sharding_lib
from qvl_jax.checkpointing import Checkpoints
from qvl_jax.hf_io import load_hf
from qvl_jax.options import RuntimeOptions
from qvl_jax.sharding import init_distributed
from qvl_jax.state import abstract_state, model_config, trainable_filter
from qvl_jax.steps import evaluate, make_eval_step

log = logging.getLogger("qvl_jax.evaluate")


@dataclasses.dataclass
class Loaded:
    """A classifier ready for inference, with what it was trained on."""

    graphdef: object
    state: dict  # {"params", "frozen"}
    layout: sharding_lib.Layout
    config: RunConfig | None
    label_map: LabelMap
    step: int | None
    source: Path
    out_dir: Path
    opts: RuntimeOptions
    image_hw: tuple[int, int] | None
    crop_fraction: float


def locate(checkpoint: str | Path) -> tuple[str, Path, Path | None]:
    """(kind "orbax" | "hf", directory, run directory or None) of a --checkpoint argument."""
    path = Path(checkpoint)
    if not path.exists():
        raise CheckpointError(f"--checkpoint {path}: no such file or directory")
    if (path / "config.json").is_file() or (path / ADAPTER_CONFIG).is_file():
        run = path.parent if (path.parent / "config.yaml").is_file() else None
        return "hf" if (path / "config.json").is_file() else "adapter", path, run
    if path.name.isdigit() and (path / "state").is_dir():
        return "orbax", path, path.parent.parent if (path.parent.parent / "config.yaml").is_file() else None
    if path.name.isdigit() and list(path.glob("mp_rank_*")):
        raise CheckpointError(f"{path} is a DeepSpeed checkpoint of the PyTorch trainer; evaluate its HF export "
                              f"({path.parent.parent / 'hf_final'}) instead")
    checkpoints = path / "checkpoints"
    if checkpoints.is_dir():
        best = checkpoints / "best.json"
        if best.is_file():
            step_dir = checkpoints / str(json.loads(best.read_text())["step"])
            if (step_dir / "state").is_dir():
                return "orbax", step_dir, path
        latest = Checkpoints.latest(checkpoints)
        if latest is not None:
            return "orbax", latest, path
        for export in ("hf_best", "hf_final"):
            if (path / export / "config.json").is_file():
                return "hf", path / export, path
    raise CheckpointError(f"--checkpoint {path}: not a run directory, an orbax step directory or an HF export")


def load_classifier(checkpoint: str | Path, config: RunConfig | None = None, base: str | Path | None = None) -> Loaded:
    """Restores the classifier of `checkpoint` (see `locate`) onto the devices of this process group. For a LoRA
    adapter directory the base model is `base`, else the directory its adapter_config.json names."""
    kind, where, run = locate(checkpoint)
    out_dir = (run or where.parent) / "eval"
    layout = sharding_lib.Layout(sharding_lib.make_mesh(), "dp")
    if kind == "orbax":
        if config is None:
            raise SchemaError(f"{where}: no config.yaml in its run directory; pass --config")
        meta = ocp.CheckpointManager(where.parent).restore(int(where.name),
                                                           args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        label_map = LabelMap.from_json(meta["label_map"])
        cfg, _ = model_config(config, label_map)
        opts = RuntimeOptions.for_run(config)
        layout = sharding_lib.Layout(layout.mesh, config.sharding.strategy, config.sharding.min_shard_size)
        graphdef, template = abstract_state(config, cfg, opts, layout)
        ckpt = Checkpoints(where.parent, async_save=False)
        try:
            state, _, _ = ckpt.restore(where, template)
        finally:
            ckpt.close()
        state = {"params": state["params"], "frozen": state["frozen"]}
        return Loaded(graphdef, state, layout, config, label_map, meta["step"], where, out_dir, opts,
                      config.data.image_hw, config.data.eval_crop_fraction)
    if kind == "adapter":
        adapter = read_adapter(where)  # read once: its config, metadata and weights
        named_base = base is not None  # --base: the user's choice, not checked against the adapter's config
        base = base or adapter.config.get("base_model_name_or_path")
        if not base or not Path(base).is_dir():
            raise CheckpointError(f"{where / ADAPTER_CONFIG}: its base model {base!r} is not a local directory; "
                                  "pass the base with --base")
        raw = {"qvl_classifier": adapter.meta}
    else:
        raw = json.loads((where / "config.json").read_text())
    stored = raw.get("qvl_classifier", {})
    if (where / "label_map.json").is_file():
        label_map = LabelMap.load(where / "label_map.json")
    elif raw.get("id2label"):
        names = [raw["id2label"][str(i)] for i in range(len(raw["id2label"]))]
        label_map = LabelMap.build("shared", {"model": names})
    else:
        raise CheckpointError(f"{where}: no label_map.json and no id2label in config.json")
    opts = RuntimeOptions.for_run(config) if config is not None else RuntimeOptions()
    model = (load_hf(base, adapter=adapter, opts=opts, check_base=not named_base) if kind == "adapter" else
             load_hf(where, opts=opts))
    graphdef, params, frozen = nnx.split(model, trainable_filter(config.model) if config else (lambda *_: True), ...)
    params, frozen = (jax.device_put(t, layout.params(t)) for t in (params, frozen))
    image_hw = tuple(stored["image_size"]) if "image_size" in stored else (config.data.image_hw if config else None)
    crop = stored.get("eval_crop_fraction", config.data.eval_crop_fraction if config else 1.0)
    return Loaded(graphdef, {"params": params, "frozen": frozen}, layout, config, label_map, None, where, out_dir,
                  opts, image_hw, crop)


def run_evaluation(checkpoint: str | Path, config: RunConfig | None = None, split: str | None = None,
                   base: str | Path | None = None) -> dict:
    kind, where, run = locate(checkpoint)
    if config is None and run is not None:
        config = load_config(run / "config.yaml")
    if config is None:
        raise SchemaError(f"{where}: no config.yaml beside it; pass --config with the data sets to evaluate on")
    if split is not None:
        config = dataclasses.replace(config, data=dataclasses.replace(config.data, datasets=tuple(
            dataclasses.replace(d, eval_split=split) for d in config.data.datasets)))
    init_distributed(config.distributed)
    loaded = load_classifier(checkpoint, config, base=base)
    setup_logging(loaded.out_dir.parent, jax.process_index())
    data = load_data(config.data)
    data.label_map.check_compatible(loaded.label_map, f"checkpoint {loaded.source}")
    if loaded.image_hw is not None and tuple(loaded.image_hw) != config.data.image_hw:
        log.warning("the model was trained at %s pixels; evaluating at %s", loaded.image_hw, config.data.image_hw)
    eval_step = make_eval_step(loaded.graphdef, loaded.layout, grid=config.data.grid_thw, dtype=loaded.opts.jnp_dtype)
    eval_global = (config.training.eval_batch_size or config.training.batch_size) * loaded.layout.axis_size
    sources = {name: (EvalSource(data, name, pad_to=eval_global), eval_global) for name in data.eval}
    if not sources:
        raise DataError("no data set has an eval split")
    tag = f"step{loaded.step}" if loaded.step is not None else loaded.source.name
    tally = evaluate(loaded.state, eval_step, data, sources, loaded.layout,
                     num_threads=max(1, config.training.dataloader_num_workers or 1))
    result = {"checkpoint": str(loaded.source), "step": loaded.step, **tally.metrics()}
    if jax.process_index() == 0:
        out = loaded.out_dir
        (out / f"evaluate_{tag}.json").write_text(json.dumps(result, indent=1) + "\n")
        tally.write_per_class(out / f"per_class_{tag}.csv")
        tally.write_confusion(out / f"confusion_{tag}.csv")
        tally.plot_confusion(out / f"confusion_{tag}.png", title=f"{loaded.source} ({', '.join(sources)})")
        result["files"] = [str(out / f) for f in (f"evaluate_{tag}.json", f"per_class_{tag}.csv",
                                                  f"confusion_{tag}.png", f"confusion_{tag}.csv")]
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qvl_jax.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True,
                        help="run dir, <run>/checkpoints/<step>, an HF export, or a LoRA adapter (adapter_final)")
    parser.add_argument("--base", default=None,
                        help="a LoRA adapter's base model (default: its adapter_config.json's base_model_name_or_path)")
    parser.add_argument("--config", default=None, help="run config (default: the run's config.yaml)")
    parser.add_argument("--split", default=None, help="evaluate this split of every data set (default: eval_split)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    args = parser.parse_args(argv)
    try:
        config = None
        if args.config or args.set:
            path = args.config or (locate(args.checkpoint)[2] or Path(".")) / "config.yaml"
            config = load_config(path, args.set)
        result = run_evaluation(args.checkpoint, config, args.split, base=args.base)
    except (SchemaError, DataError, CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    hostmem.use_huge_page_malloc()
    sys.exit(main())
