"""Plots and a summary of one or more runs, from their logs/metrics.jsonl.

    python -m qvl_core.report outputs/RUN [outputs/OTHER_RUN ...] [--out DIR]

Writes PNGs (training loss, lr, grad norm, eval accuracy per data set, MFU,
samples/s against step; every run on the same axes, so a JAX run and a PyTorch
run compare at a glance) and `summary.md` (best accuracy and its step, final
accuracy per data set, mean samples/s and MFU) to DIR (default: the first run's
`report/`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from qvl_core.metrics import read_metrics

PLOTS = [
    ("training_loss", "training/loss", "training loss"),
    ("lr", "training/lr", "learning rate"),
    ("grad_norm", "training/grad_norm", "gradient norm"),
    ("mfu", "perf/mfu", "MFU"),
    ("samples_per_second", "perf/samples_per_second", "samples/s"),
]


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def _label(run: Path) -> str:
    info = run / "logs" / "run.json"
    framework = json.loads(info.read_text()).get("framework") if info.is_file() else None
    return f"{run.name} ({framework})" if framework else run.name


def make_report(runs: list[Path], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    data = {}
    for run in runs:
        path = run / "logs" / "metrics.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: is {run} a qvl run directory?")
        data[run] = read_metrics(path)
    written = []
    eval_keys = sorted({k for recs in data.values() for r in recs for k in r
                        if k.startswith("eval/") and k.endswith("_accuracy")})
    if len(eval_keys) == 2:  # one data set: its curve is the overall one
        eval_keys.remove("eval/overall_accuracy")
    plots = PLOTS[:3] + [("eval_accuracy", None, "eval accuracy")] + PLOTS[3:]
    for name, key, title in plots:
        fig, ax = plt.subplots(figsize=(7, 4))
        drawn = 0
        for run, recs in data.items():
            keys = eval_keys if key is None else [key]
            for k in keys:
                steps, values = _series(recs, k)
                if steps:
                    suffix = f" {k.split('/')[1].replace('_accuracy', '')}" if key is None else ""
                    ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3,
                            label=_label(run) + suffix)
                    drawn += 1
        if not drawn:
            plt.close(fig)
            continue
        if name == "training_loss":
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / f"{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    lines = ["# Run report", "", "| run | best accuracy | at step | final accuracy per data set | mean samples/s | mean MFU |",
             "|---|---|---|---|---|---|"]
    for run, recs in data.items():
        evals = [r for r in recs if "eval/overall_accuracy" in r]
        best = max(evals, key=lambda r: (r["eval/overall_accuracy"], -r["step"])) if evals else None
        final = evals[-1] if evals else {}
        per_set = ", ".join(f"{k[5:-9]} {v:.4f}" for k, v in final.items() if k.startswith("eval/")
                            and k.endswith("_accuracy") and not k.endswith("_top5_accuracy")
                            and k != "eval/overall_accuracy") or "-"
        sps = [r["perf/samples_per_second"] for r in recs if r.get("perf/samples_per_second") is not None]
        mfu = [r["perf/mfu"] for r in recs if r.get("perf/mfu") is not None]
        lines.append(f"| {_label(run)} | {best['eval/overall_accuracy']:.4f} | {best['step']} | {per_set} | "
                     f"{statistics.mean(sps):.1f} | {f'{statistics.mean(mfu):.1%}' if mfu else 'n/a'} |"
                     if best else f"| {_label(run)} | - | - | - | - | - |")
    lines += ["", "Plots: " + ", ".join(p.name for p in written), ""]
    summary = out / "summary.md"
    summary.write_text("\n".join(lines))
    return written + [summary]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qvl_core.report", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (outputs/<run_name>)")
    parser.add_argument("--out", type=Path, default=None, help="where to write (default: <first run>/report)")
    args = parser.parse_args(argv)
    try:
        files = make_report(args.runs, args.out or args.runs[0] / "report")
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps([str(f) for f in files], indent=1))
    print((files[-1]).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
