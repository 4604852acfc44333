"""tools/plot_metrics.py: reads metrics.jsonl files and writes a PNG; bad files give one clear error."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import plot_metrics  # noqa: E402


def write_metrics(path, steps=30):
    with open(path, "w") as f:
        for step in range(1, steps + 1):
            f.write(json.dumps({"step": step, "loss": 10.0 / step, "mlm_loss": 9.0 / step, "lr": 1e-4 * step / steps,
                                "tokens_per_sec": 1000 + step}) + "\n")


def test_plot_writes_png_with_the_data(tmp_path):
    metrics = tmp_path / "run" / "metrics.jsonl"
    metrics.parent.mkdir()
    write_metrics(metrics)
    records = plot_metrics.read_records(str(metrics))
    steps, losses = plot_metrics.series(records, "loss")
    assert steps[0] == 1 and losses[-1] < losses[0] / 10
    out = tmp_path / "plot.png"
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "plot_metrics.py"), str(metrics), "--out", str(out)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_bad_metrics_file_is_one_clear_error(tmp_path):
    bad = tmp_path / "metrics.jsonl"
    bad.write_text('{"step": 1, "loss": 2.0}\nnot json\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2 is not JSON"):
        plot_metrics.read_records(str(bad))
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "plot_metrics.py"), str(tmp_path / "missing.jsonl")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"plot_metrics: error: no such metrics file: {tmp_path / 'missing.jsonl'}"]
