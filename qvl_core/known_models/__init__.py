"""The hub's `config.json` of the published Qwen2.5-VL sizes, so that a run can be planned without the weights.

    raw = known_config("/models/Qwen2.5-VL-7B-Instruct")   # matched on the name's last part: 7B
"""

from __future__ import annotations

import json
import re
from pathlib import Path

_HERE = Path(__file__).parent
SIZES = ("3B", "7B", "32B", "72B")


def known_config(name: str) -> tuple[str, dict]:
    """(the file used, its config dict) for a Qwen2.5-VL name or path whose last part names a known size
    (`Qwen/Qwen2.5-VL-7B-Instruct`, `/models/qwen2.5-vl-3b`); a ValueError naming the known sizes otherwise."""
    last = re.split(r"[\\/]", name.rstrip("/\\"))[-1]
    found = re.search(r"qwen2\.5-vl-(\d+)b", last, re.IGNORECASE)
    size = f"{found.group(1)}B" if found else None
    if size not in SIZES:
        raise ValueError(f"{name!r} is not a local directory and its name does not match a known Qwen2.5-VL size "
                         f"(Qwen2.5-VL-{{{','.join(SIZES)}}}...): point model.pretrained_name at a directory holding "
                         f"the model's config.json")
    path = _HERE / f"Qwen2.5-VL-{size}-Instruct.json"
    return path.name, json.loads(path.read_text())
