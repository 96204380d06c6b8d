"""Classify images with a trained classifier in HF format (the trainer's hf_final / hf_best).

    python -m qvl_jax.predict --model outputs/<run>/hf_best IMAGE_OR_DIR [...] [--top_k 3] [--output preds.jsonl]

Labels come from the model's config.json (`id2label`, written from the run's label
map); images are resized and centre-cropped as at evaluation, to the image size
stored with the model (or --image_size). Unreadable files are reported and skipped.
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

from qvl_core.data import BadImageError, EvalTransform, decode_image, patchify
from qvl_core.data.sources import IMAGE_EXTENSIONS
from qvl_core.hf_checkpoint import CheckpointError
from qvl_jax.hf_io import load_hf
from qvl_jax.pixels import expand_patches


def image_files(inputs: list[str]) -> list[Path]:
    files = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        elif path.exists():
            files.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such file or directory")
    return files


def predict(model_dir: str, inputs: list[str], *, top_k: int = 3, batch_size: int = 16,
            image_size: tuple[int, int] | None = None, dtype: str = "float32"):
    """Yields one dict per image: path, then labels/probs (top_k) or error."""
    raw = json.loads((Path(model_dir) / "config.json").read_text()) if (Path(model_dir) / "config.json").is_file() else {}
    stored = raw.get("qvl_classifier", {})
    model = load_hf(model_dir, dtype=dtype)
    names = model.config.head.id2label
    if names is None:
        raise CheckpointError(f"{model_dir}: config.json has no id2label; is this a trained qvl classifier?")
    size = image_size or tuple(stored.get("image_size", ()))
    if len(size) != 2:
        raise CheckpointError(f"{model_dir}: no image_size stored with the model; pass --image_size H W")
    transform = EvalTransform(tuple(size), stored.get("eval_crop_fraction", 1.0))
    grid = (1, size[0] // 14, size[1] // 14)
    graphdef, state = nnx.split(model)
    k = min(top_k, len(names))

    @jax.jit
    def probabilities(state, patches):
        logits = nnx.merge(graphdef, state)(expand_patches(patches, model.opts.jnp_dtype), grid).logits
        return jax.nn.softmax(logits, -1)

    files = image_files(inputs)
    for start in range(0, len(files), batch_size):
        chunk, arrays, rows = files[start:start + batch_size], [], []
        for path in chunk:
            try:
                arrays.append(patchify(transform(decode_image(path))))
                rows.append({"path": str(path)})
            except BadImageError as e:
                yield {"path": str(path), "error": str(e)}
        if not arrays:
            continue
        batch = np.stack(arrays + [arrays[0]] * (batch_size - len(arrays)))  # one compiled shape
        probs = np.asarray(probabilities(state, jnp.asarray(batch)))[: len(arrays)]
        for row, p in zip(rows, probs):
            top = np.argsort(-p)[:k]
            yield {**row, "labels": [names[i] for i in top], "probs": [round(float(p[i]), 6) for i in top]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qvl_jax.predict", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="HF-format classifier directory (e.g. outputs/<run>/hf_best)")
    parser.add_argument("inputs", nargs="+", help="image files or directories (searched recursively)")
    parser.add_argument("--top_k", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--image_size", type=int, nargs=2, metavar=("H", "W"), default=None)
    parser.add_argument("--output", default=None, help="also write one JSON object per image to this file")
    args = parser.parse_args(argv)
    out = open(args.output, "w") if args.output else None
    try:
        for row in predict(args.model, args.inputs, top_k=args.top_k, batch_size=args.batch_size,
                           image_size=tuple(args.image_size) if args.image_size else None):
            if "error" in row:
                print(f"{row['path']}\terror: {row['error']}", file=sys.stderr)
            else:
                print(row["path"] + "\t" + "\t".join(f"{n} {p:.4f}" for n, p in zip(row["labels"], row["probs"])))
            if out:
                out.write(json.dumps(row) + "\n")
    except (CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if out:
            out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
