"""Classify images with a trained classifier.

    python -m qvl_jax.predict --checkpoint PATH IMAGE_OR_DIR [...] [--top_k 5] [--json] [--output preds.jsonl]

PATH is what `qvl_jax.evaluate` takes: a run directory, an orbax step directory,
an HF export (`hf_final` / `hf_best`, from either trainer), or a LoRA adapter
directory (`adapter_final`; `--base` names its base model if its config does not). Class names come from
the label map stored with the checkpoint; images are resized and centre-cropped as
at evaluation, to the size the model was trained at. A path that is not a readable
image is reported and the others still run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qvl_core import hostmem
from qvl_core.config import load_config
from qvl_core.data import BadImageError, EvalTransform, decode_image, patchify
from qvl_core.data.sources import IMAGE_EXTENSIONS
from qvl_core.hf_checkpoint import CheckpointError
from qvl_core.schema import SchemaError
from qvl_jax.evaluate import load_classifier, locate
from qvl_jax.pixels import frame_values


def image_files(inputs: list[str]) -> list[Path]:
    files = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        else:
            files.append(path)  # a missing or unreadable file is reported per image
    return files


def predict(checkpoint: str, inputs: list[str], *, top_k: int = 5, batch_size: int = 16,
            image_size: tuple[int, int] | None = None, config_path: str | None = None, base: str | None = None):
    """Yields one dict per image: path, then labels/probs (best first) or error."""
    _, _, run = locate(checkpoint)
    config_file = Path(config_path) if config_path else (run / "config.yaml" if run else None)
    config = load_config(config_file) if config_file and config_file.is_file() else None
    loaded = load_classifier(checkpoint, config, base=base)
    names = loaded.label_map.names
    size = tuple(image_size or loaded.image_hw or ())
    if len(size) != 2:
        raise CheckpointError(f"{loaded.source}: no image size stored with the model; pass --image_size H W")
    transform = EvalTransform(size, loaded.crop_fraction)
    grid = (1, size[0] // 14, size[1] // 14)
    k = min(top_k, len(names))
    graphdef, dtype = loaded.graphdef, loaded.opts.jnp_dtype

    @jax.jit
    def probabilities(params, frozen, patches):
        logits = nnx.merge(graphdef, params, frozen)(frame_values(patches, dtype), grid).logits
        return jax.nn.softmax(logits, -1)

    files = image_files(inputs)
    for start in range(0, len(files), batch_size):
        arrays, rows = [], []
        for path in files[start:start + batch_size]:
            try:
                arrays.append(patchify(transform(decode_image(path))))
                rows.append({"path": str(path)})
            except BadImageError as e:
                yield {"path": str(path), "error": str(e)}
        if not arrays:
            continue
        batch = np.stack(arrays + [arrays[0]] * (batch_size - len(arrays)))  # one compiled shape
        probs = np.asarray(probabilities(loaded.state["params"], loaded.state["frozen"], jnp.asarray(batch)))
        for row, p in zip(rows, probs[: len(arrays)]):
            top = np.argsort(-p)[:k]
            yield {**row, "labels": [names[i] for i in top], "probs": [round(float(p[i]), 6) for i in top]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qvl_jax.predict", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True,
                        help="run dir, <run>/checkpoints/<step>, an HF export, or a LoRA adapter (adapter_final)")
    parser.add_argument("--base", default=None,
                        help="a LoRA adapter's base model (default: its adapter_config.json's base_model_name_or_path)")
    parser.add_argument("inputs", nargs="+", help="image files or directories (searched recursively)")
    parser.add_argument("--top_k", "--top-k", dest="top_k", type=int, default=5)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--image_size", type=int, nargs=2, metavar=("H", "W"), default=None)
    parser.add_argument("--config", default=None, help="run config (default: the run's config.yaml)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per image")
    parser.add_argument("--output", default=None, help="also write one JSON object per image to this file")
    args = parser.parse_args(argv)
    out = open(args.output, "w") if args.output else None
    try:
        for row in predict(args.checkpoint, args.inputs, top_k=args.top_k, batch_size=args.batch_size,
                           image_size=tuple(args.image_size) if args.image_size else None, config_path=args.config,
                           base=args.base):
            if args.json:
                print(json.dumps(row))
            elif "error" in row:
                print(f"{row['path']}\terror: {row['error']}", file=sys.stderr)
            else:
                print(row["path"] + "\t" + "\t".join(f"{n} {p:.4f}" for n, p in zip(row["labels"], row["probs"])))
            if out:
                out.write(json.dumps(row) + "\n")
    except (CheckpointError, SchemaError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if out:
            out.close()
    return 0


if __name__ == "__main__":
    hostmem.use_huge_page_malloc()
    sys.exit(main())
