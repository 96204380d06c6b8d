"""Fine-tune Qwen2.5-VL as an image classifier with JAX.

    python -m qvl_jax.train --config configs/demo.yaml [--set training.batch_size=4 ...] [--resume_from PATH|auto]

The schedule (when to log, evaluate, save, stop; resume checks; best model) is
`qvl_core.loop.train`, shared with the PyTorch trainer. This file is the JAX side of
it: the mesh, the state created sharded (`qvl_jax.state`), the jitted steps
(`qvl_jax.steps`), grain loaders and orbax checkpoints. What a run leaves behind is
listed in the README ("What a run writes").
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from qvl_core import gpus, hostmem, loop
from qvl_core.config import RunConfig
from qvl_core.data import EvalSource, LabelMap, TrainSource
from qvl_core.parts import PARTS, trains
from qvl_core.runs import export_metadata, start_run
from qvl_jax import memory
from qvl_jax import sharding as sharding_lib
from qvl_jax.checkpointing import Checkpoints
from qvl_jax.hf_io import save_hf
from qvl_jax.input_pipeline import make_loader, read_ahead
from qvl_jax.lora import merge_adapters, save_adapter
from qvl_jax.options import RuntimeOptions
from qvl_jax.state import (compute_copy, compute_copy_dtypes, create_model, frozen_in_compute_dtype,
                           make_optimizer, model_config, state_shardings, trainable_filter)
from qvl_jax.steps import (TRAINED, device_memory_gb, evaluate, make_eval_step, make_train_step, to_global,
                           to_host)

log = logging.getLogger("qvl_jax.train")
TrainingError = loop.TrainingError


class JaxBackend:
    """`qvl_core.loop.Backend` for JAX: sharded state on a mesh, jitted steps, grain loaders, orbax checkpoints."""

    def __init__(self, config: RunConfig, data, geometry: loop.Geometry, layout: sharding_lib.Layout):
        self.config, self.data, self.geometry, self.layout = config, data, geometry, layout
        self.process_index = jax.process_index()
        self.device_kind = jax.devices()[0].device_kind
        t = config.training

        # --- model and optimizer, created sharded
        self.opts = opts = RuntimeOptions.for_run(config)
        self.model_config, _ = model_config(config, data.label_map)
        model = create_model(config, self.model_config, opts, layout)
        self.graphdef, params, frozen = nnx.split(model, trainable_filter(config.model), ...)
        frozen = frozen_in_compute_dtype(config, model, frozen)
        self.compute_dtypes = compute_copy_dtypes(model, params, layout)
        del model
        self.tx, self.lr_at = make_optimizer(config, params, geometry.total_steps)
        self.shardings = state_shardings(layout, params, self.tx, self.compute_dtypes)
        self.state = {"params": params, "frozen": frozen,
                      "compute": compute_copy(params, self.compute_dtypes, self.shardings["compute"]),
                      "opt_state": jax.jit(self.tx.init, out_shardings=self.shardings["opt_state"])(params)}
        self._train_step, self.memory_plan = self._compile_step()
        self._eval_step = make_eval_step(self.graphdef, layout, grid=config.data.grid_thw, dtype=opts.jnp_dtype)
        self._write_sharding_summary()

        # --- data and checkpoints
        spare = read_ahead(t.dataloader_num_workers)  # decoded, never trained on: see read_ahead
        self.train_source = TrainSource(data, seed=t.seed, num_records=(geometry.total_steps + spare) *
                                        geometry.global_batch)
        eval_global = (t.eval_batch_size or t.batch_size) * geometry.devices
        self.eval_sources = {name: (EvalSource(data, name, pad_to=eval_global), eval_global) for name in data.eval}
        self.ckpt = Checkpoints(config.run_dir / "checkpoints", keep=config.output.keep_checkpoints,
                                async_save=config.output.async_checkpointing)
        self._iter = None

    def make_step(self, *, return_grads: bool = False):
        """The jitted train step of this run (`qvl_jax.steps.make_train_step`)."""
        c = self.config
        return make_train_step(self.graphdef, self.tx, self.layout, self.shardings, grid=c.data.grid_thw,
                               dtype=self.opts.jnp_dtype, label_smoothing=c.training.label_smoothing,
                               accum=self.geometry.accumulation, compute_dtypes=self.compute_dtypes,
                               return_grads=return_grads)

    def _compile_step(self):
        """The train step compiled before the first batch (`qvl_jax.memory`): its per-device memory plan is logged,
        and a step that does not fit the device stops the run here, with what to change, instead of an XLA
        out-of-memory error at the first step."""
        g = self.geometry
        compiled, calls = memory.compile_step(self.make_step(), self.state, self.layout, micro_batch=g.micro_batch,
                                              accumulation=g.accumulation, num_patches=self.config.data.num_patches)
        limit = memory.device_limit()
        plan = memory.memory_plan(compiled, self.state, self.shardings, usable_bytes=limit, card_bytes=limit,
                                  attention_calls=calls)
        log.info("planned memory of the train step: %s", plan.summary())
        if plan.fits is False:
            gib = memory.GIB
            raise TrainingError(
                f"the train step needs {plan.total / gib:.1f} GiB per device but {self.device_kind} lets XLA use "
                f"{limit / gib:.1f} GiB (arguments {plan.arguments / gib:.1f}, temporaries "
                f"{plan.temporaries / gib:.1f}). Change one of: " + "; ".join(memory.advice(self.config)) +
                ". `python -m qvl_jax.plan --config <this config> --gpu <card> --devices "
                f"{g.devices} --max-batch` plans each without a GPU")
        return compiled, plan

    def _write_sharding_summary(self) -> None:
        """Bytes per device of each kind of state, from the arrays as they are laid out (logs/sharding.json)."""
        s, plan = self.state, self.memory_plan
        summary = {
            "strategy": self.layout.strategy, "devices": self.geometry.devices,
            "params_bytes_per_device": sharding_lib.held_bytes(s["params"]) + sharding_lib.held_bytes(s["frozen"]),
            "compute_params_bytes_per_device": sharding_lib.held_bytes(s["compute"]),
            "grads_bytes_per_device": plan.gradients,
            "optimizer_bytes_per_device": sharding_lib.held_bytes(s["opt_state"]),
            "trainable_params": int(sum(x.size for x in jax.tree.leaves(s["params"]))),
            "frozen_params": int(sum(x.size for x in jax.tree.leaves(s["frozen"]))),
            "planned_bytes_per_device": self.memory_plan.per_device_bytes(),
        }
        log.info("sharding: %s", json.dumps(summary))
        if self.process_index == 0:
            (self.config.run_dir / "logs" / "sharding.json").write_text(json.dumps(summary, indent=1) + "\n")

    def _loader(self, start_batch: int = 0):
        return iter(make_loader(self.train_source, batch_size=self.geometry.process_batch,
                                process_index=self.process_index, process_count=jax.process_count(),
                                num_workers=self.config.training.dataloader_num_workers, start_batch=start_batch))

    # --- loop.Backend
    def is_checkpoint(self, step_dir: Path) -> bool:
        return Checkpoints.is_checkpoint(step_dir)

    def restore(self, step_dir: Path) -> dict:
        loop.check_model(self.ckpt.meta(step_dir).get("config", {}), step_dir, self.config.model)
        self._iter = self._loader()
        restored, meta, iterator_restored = self.ckpt.restore(step_dir, self.state, self._iter)
        self.state.update(restored, compute=compute_copy(restored["params"], self.compute_dtypes,
                                                          self.shardings["compute"]))
        if not iterator_restored:  # another process count: `batches` positions the stream from the step
            self._iter.close()
            self._iter = None
        return meta

    def batches(self, start_step: int):
        if self._iter is None:
            self._iter = self._loader(start_step)
        return self._iter

    def train_step(self, batch: dict):
        arrays = to_global(batch, self.layout, accum=self.geometry.accumulation)
        trained, measurements = self._train_step({k: self.state[k] for k in TRAINED}, self.state["frozen"], arrays)
        self.state.update(trained)
        return measurements

    def fetch(self, measurements) -> dict[str, float]:
        return {k: float(v) for k, v in jax.device_get(measurements).items()}

    def evaluate(self):
        return evaluate(self.state, self._eval_step, self.data, self.eval_sources, self.layout,
                        num_threads=max(1, self.config.training.dataloader_num_workers or 1))

    def save(self, step: int, meta: dict, accuracy: float | None) -> None:
        self.ckpt.save(step, self.state, self._iter, meta, accuracy=accuracy)

    def export(self, step: int, best: loop.Best) -> None:
        self.ckpt.wait()  # hf_best is read back from its checkpoint
        run_dir, label_map = self.config.run_dir, self.data.label_map
        export_hf(self.graphdef, self.state, run_dir / "hf_final", self.config, label_map)
        log.info("wrote the classifier in HF format to %s", run_dir / "hf_final")
        best_dir = run_dir / "checkpoints" / str(best.step)
        if best.step is not None and best.step != step and best_dir.is_dir():
            best_state, _, _ = self.ckpt.restore(best_dir, self.state)
            export_hf(self.graphdef, best_state, run_dir / "hf_best", self.config, label_map)
            log.info("wrote the best classifier (step %d) in HF format to %s", best.step, run_dir / "hf_best")

    def memory_gb(self) -> float:
        return device_memory_gb()

    def any_process(self, flag: bool) -> bool:
        if jax.process_count() == 1:
            return flag
        from jax.experimental import multihost_utils

        return bool(multihost_utils.process_allgather(np.int32(flag)).max())

    def close(self) -> None:
        try:
            self.ckpt.wait()
        finally:
            if self._iter is not None:
                self._iter.close()  # stops grain's worker processes and frees the shared memory of unread batches
            self.ckpt.close()


def export_hf(graphdef, state, path: Path, config: RunConfig, label_map: LabelMap) -> None:
    """The classifier as an HF directory, with the image geometry it was trained at and the label map. A LoRA
    run also writes its adapter in PEFT's format beside it (`hf_final` -> `adapter_final`), the head and any
    fully trained part under `modules_to_save`; the HF directory holds the adapters merged."""
    params = jax.tree.map(to_host, state["params"])
    frozen = jax.tree.map(to_host, state["frozen"])
    if jax.process_index() == 0:
        model = nnx.merge(graphdef, params, frozen)
        meta = export_metadata(config, label_map)
        if config.model.lora is not None:
            adapter_dir = Path(path).with_name(Path(path).name.replace("hf_", "adapter_", 1))
            head = model.config.head
            save_adapter(model, adapter_dir, spec=config.model.lora.spec(), base_model=config.model.pretrained_name,
                         fully_trained=[p.prefix.rstrip(".") for p in PARTS if trains(p, config.model)],
                         meta={"mode": head.mode, "pooling": head.pooling, "num_labels": head.num_labels, **meta})
            label_map.save(adapter_dir / "label_map.json")
            log.info("wrote the LoRA adapter in PEFT's format to %s", adapter_dir)
        merge_adapters(model)  # LoRA: the adapters folded into the weights
        save_hf(model, path, extra=meta)
        label_map.save(Path(path) / "label_map.json")


def setup(config: RunConfig, *, resume_from: str | None = None) -> tuple[loop.Run, JaxBackend]:
    """Processes, checked data, the mesh and the sharded state: what `loop.train` runs."""
    sharding_lib.init_distributed(config.distributed)
    data, config = start_run(config, jax.process_index(), "jax", resume_from=resume_from)
    mesh = sharding_lib.make_mesh()
    layout = sharding_lib.Layout(mesh, config.sharding.strategy, config.sharding.min_shard_size)
    g = loop.batch_geometry(config.training, devices=mesh.size, processes=jax.process_count(),
                            epoch_length=TrainSource(data, seed=config.training.seed).epoch_length)
    log.info("%d process(es), %d device(s) (%s); strategy %s; global batch %d = %d per device x %d devices x %d "
             "accumulation; %d steps (%.2f epochs of %d records)", g.processes, g.devices,
             jax.devices()[0].device_kind, layout.strategy, g.global_batch, g.micro_batch, g.devices, g.accumulation,
             g.total_steps, g.total_steps * g.global_batch / g.epoch_length, g.epoch_length)
    if jax.devices()[0].platform == "cpu":
        log.info("host malloc: %s", hostmem.describe(*hostmem.status()))
    backend = JaxBackend(config, data, g, layout)
    return loop.Run(config, data, g, backend.model_config), backend


def run(config: RunConfig, *, resume_from: str | None = None, stop_after: int | None = None) -> dict[str, Any]:
    """Trains per `config`; returns the final metrics (and where the run went).

    `stop_after`: behave as if SIGTERM arrived after that step (save, return), as tests of resumption need.
    """
    spec, backend = setup(config, resume_from=resume_from)
    return loop.train(spec, backend, resume_from=resume_from, stop_after=stop_after)


def main(argv=None) -> int:
    args = loop.parse_args("python -m qvl_jax.train", __doc__.splitlines()[0], argv)
    # On a GPU, XLA's allocator may take this share of the card (JAX's default is 75%); the planner plans for it.
    if os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE", "").lower() not in ("false", "0"):
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", str(gpus.USABLE_FRACTION))
    return loop.main(run, args)


if __name__ == "__main__":
    hostmem.use_huge_page_malloc()
    sys.exit(main())
