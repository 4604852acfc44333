"""The quick start's demo (scripts/demo.py) end to end, shortened: shards -> pretraining -> plot -> SQuAD-format
fine-tuning -> metrics, each step a real subprocess as the user's first command runs it."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_runs_end_to_end_and_plots_a_falling_loss(tmp_path):
    out = tmp_path / "demo"
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    result = subprocess.run(
        [sys.executable, "scripts/demo.py", "--output_dir", str(out), "--pretrain_steps", "60", "--squad_epochs", "0.25",
         "--dupe_factor", "1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    records = [json.loads(line) for line in open(out / "pretrain" / "metrics.jsonl")]
    losses = [r["loss"] for r in records if "loss" in r]
    assert [r["step"] for r in records][-1] == 60
    assert losses[-1] < losses[0] - 1.0, losses  # from ~10.7 (ln 30592 + ln 2) down

    png = out / "pretrain_loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000

    results = json.load(open(out / "squad" / "eval_results.json"))
    assert list(results) == ["exact", "f1", "total", "HasAns_exact", "HasAns_f1", "HasAns_total"]
    assert results["total"] == 1032 and 0.0 <= results["f1"] <= 100.0
    assert '"f1"' in result.stdout and "pretraining loss plot" in result.stdout
