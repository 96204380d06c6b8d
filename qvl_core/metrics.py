"""Where metrics go: `logs/metrics.jsonl` always, WandB when enabled, one place to call.

Only process 0 writes. WandB runs offline when no API key is configured (it never
prompts and never fails the run: an error there is logged and WandB is dropped);
`monitor.wandb.mode: disabled` turns it off.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import uuid
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def wandb_key_found() -> bool:
    """A WandB API key in the environment or in ~/.netrc (where `wandb login` puts it)."""
    netrc = Path.home() / ".netrc"
    return bool(os.environ.get("WANDB_API_KEY")) or (netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore"))


def _wandb_mode(mode: str) -> str:
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if wandb_key_found() else "offline"


class MetricsLogger:
    def __init__(self, run_dir: Path, *, config: dict, wandb_cfg: Any = None, enabled: bool = True,
                 run_name: str = "run"):
        self.enabled = enabled
        self.path = Path(run_dir) / "logs" / "metrics.jsonl"
        self.wandb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = self.path.open("a")
        mode = _wandb_mode(wandb_cfg.mode) if wandb_cfg is not None else "disabled"
        if mode == "disabled":
            return
        try:
            import wandb

            id_file = Path(run_dir) / "logs" / "wandb_id.txt"
            run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
            id_file.write_text(run_id)
            os.environ.setdefault("WANDB_SILENT", "true")
            self.wandb = wandb.init(project=wandb_cfg.project, entity=wandb_cfg.entity, name=wandb_cfg.name or run_name,
                                    id=run_id, resume="allow", dir=str(run_dir), config=config, mode=mode)
            log.info("wandb: %s mode, run %s", mode, run_id)
        except Exception as e:  # a monitoring problem must not stop training
            log.warning("wandb disabled: %s: %s", type(e).__name__, e)
            self.wandb = None

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled or not metrics:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
        self.file.write(json.dumps({"step": step, "time": round(time.time(), 3), **clean}) + "\n")
        self.file.flush()
        if self.wandb is not None:
            try:
                self.wandb.log({k: v for k, v in clean.items() if v is not None}, step=step)
            except Exception as e:
                log.warning("wandb log failed (%s); continuing without wandb", e)
                self.wandb = None

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.wandb is not None:
            try:
                self.wandb.finish()
            except Exception as e:
                log.warning("wandb finish failed: %s", e)


def read_metrics(path: str | Path) -> list[dict]:
    """All records of a metrics.jsonl file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
