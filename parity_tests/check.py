"""`python -m parity_tests.check --checkpoint DIR`: qvl_jax vs qvl_torch on any HF Qwen2.5-VL directory.

Prints a table (quantity, relative L2 error, limit, ok), optionally writes it as
JSON, and exits 1 when any quantity is over its limit.
"""

from __future__ import annotations

import argparse
import json
import sys

from parity_tests import compare


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m parity_tests.check", description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True, help="local HF Qwen2.5-VL directory")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--image-sizes", default="140x252,56x56", help="HxW list, multiples of 28")
    ap.add_argument("--mode", choices=["vlm", "vision"], default=None, help="default: the stored mode, else vlm")
    ap.add_argument("--num-labels", type=int, default=7, help="head size when the directory has no head")
    ap.add_argument("--no-train", action="store_true", help="forward quantities only (no grads / AdamW)")
    ap.add_argument("--batch", type=int, default=None,
                    help="images per compared batch (default: 2 in float32, 8 in bfloat16)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", dest="json_out", default=None, help="write the results here")
    args = ap.parse_args(argv)

    from qvl_core.hf_checkpoint import CheckpointError, stored_head_labels, weight_files
    try:
        sizes = compare.parse_sizes(args.image_sizes)
    except ValueError:
        ap.error(f"--image-sizes {args.image_sizes!r}: expected a comma-separated list of HxW, e.g. 140x252,56x56")
    try:
        if args.batch is not None and args.batch < 1:
            ap.error(f"--batch {args.batch}: must be at least 1")
        bad = [f"{h}x{w}" for h, w in sizes if h % 28 or w % 28]
        if bad:
            ap.error(f"--image-sizes {','.join(bad)}: height and width must be multiples of 28")
        stored = stored_head_labels(weight_files(args.checkpoint))
        results = compare.run(args.checkpoint, dtype=args.dtype, image_sizes=sizes, mode=args.mode,
                              num_labels=None if stored else args.num_labels, seed=args.seed,
                              train=not args.no_train, batch=args.batch)
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ok = all(r.ok for r in results.values())
    width = max(len(k) for k in results)
    print(f"{'quantity':<{width}}  {'rel L2 error':>12}  {'limit':>9}  ok")
    for name, r in results.items():
        print(f"{name:<{width}}  {r.rel_l2:12.3e}  {r.limit:9.2e}  {'ok' if r.ok else 'FAIL'}")
    n_bad = sum(not r.ok for r in results.values())
    print(f"{len(results) - n_bad} passed, {n_bad} failed  ({args.dtype}, {args.checkpoint})")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"ok": ok, "dtype": args.dtype, "checkpoint": str(args.checkpoint),
                       "results": {k: r.to_json() for k, r in results.items()}}, f, indent=2)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
