#!/usr/bin/env python
"""Plot one or more ``metrics.jsonl`` files (written by the runners) to a PNG: loss, learning rate and
throughput against step, one line per run.

    python tools/plot_metrics.py output/metrics.jsonl [more.jsonl ...] --out loss.png
"""

from __future__ import annotations

import argparse
import json
import os
import sys

LOSS_KEYS = ("loss", "mlm_loss", "nsp_loss", "eval_loss")
THROUGHPUT_KEYS = ("tokens_per_sec", "sequences_per_sec", "tokens/s", "sequences/s")


def read_records(path: str):
    """The JSON records of a metrics file; a bad line is an error naming the file and the line."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such metrics file: {path}")
    if os.path.isdir(path):
        raise ValueError(f"{path} is a directory; pass the metrics.jsonl in it")
    if not os.path.isfile(path):
        raise ValueError(f"{path} is not a regular file")
    records = []
    with open(path, encoding="utf-8") as f:
        number = 0
        try:
            for number, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{number} is not JSON ({err})") from None
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}:{number + 1} is not UTF-8 text ({err.reason})") from None
    if not records:
        raise ValueError(f"{path} is empty")
    steps = [r for r in records if isinstance(r, dict) and "step" in r]
    if not steps:
        raise ValueError(f"{path} has no records with a 'step' field")
    return steps


def series(records, key):
    points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [p[0] for p in points], [p[1] for p in points]


def plot(paths, out_path: str, title: str = "") -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(os.path.basename(os.path.dirname(os.path.abspath(p))) or p, read_records(p)) for p in paths]
    throughput_key = next((k for k in THROUGHPUT_KEYS if any(k in r for _, recs in runs for r in recs)), None)
    panels = ["loss", "lr"] + ([throughput_key] if throughput_key else [])
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 3 * len(panels)), sharex=True)
    for axis, panel in zip(axes, panels):
        for name, records in runs:
            keys = [k for k in LOSS_KEYS if any(k in r for r in records)] if panel == "loss" else [panel]
            for key in keys:
                x, y = series(records, key)
                if x:
                    axis.plot(x, y, label=f"{name}: {key}" if len(runs) > 1 else key)
        axis.set_ylabel(panel)
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=8)
    axes[-1].set_xlabel("step")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("metrics", nargs="+", help="metrics.jsonl files")
    parser.add_argument("--out", default="metrics.png", help="PNG to write")
    parser.add_argument("--title", default="")
    args = parser.parse_args(argv)
    if os.path.isdir(args.out):
        parser.error(f"--out {args.out} is a directory; name the PNG file to write")
    try:
        path = plot(args.metrics, args.out, args.title)
    except (ValueError, OSError) as err:  # OSError: a missing input, an --out that cannot be written
        print(f"plot_metrics: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
