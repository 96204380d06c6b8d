"""`make demo` until the trainer lands: a fresh tiny checkpoint, then the full parity check on it."""

from __future__ import annotations

import logging
import sys
import tempfile
import time
from pathlib import Path

logging.getLogger("transformers").setLevel(logging.ERROR)


def main() -> int:
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    from parity_tests import check
    from parity_tests.tiny import make_checkpoint

    out = Path("outputs/demo")
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.time()
        ckpt = make_checkpoint(Path(tmp) / "tiny-qwen2.5-vl", num_labels=10, seed=1234)
        print(f"wrote a random tiny Qwen2.5-VL checkpoint with a 10-label head to {ckpt}")
        rc = check.main(["--checkpoint", str(ckpt), "--json", str(out / "parity_float32.json")])
        print(f"parity check finished in {time.time() - start:.1f}s; results in {out / 'parity_float32.json'}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
