#!/usr/bin/env python
"""The quick-start job, end to end on bundled data, each step run as a user would run it:

1. HDF5 pretraining shards from the shipped English text (tools/create_pretraining_data.py),
2. a tiny MegatronBERT pretrained from scratch with MLM + NSP for a few minutes (run_pretrain.py),
3. its loss curve plotted (tools/plot_metrics.py),
4. fine-tuned and evaluated on the bundled SQuAD v1.1-format sample (run_squad.py), printing the metrics.

    python scripts/demo.py                                    # CPU, ~10 minutes on 2 cores
    python scripts/demo.py --model_name_or_path megatronbert-cased --device gpu   # skip 1-3: fine-tune real weights

Everything goes under --output_dir (default demo_output/).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(step: str, argv, log_path: str) -> None:
    """Run one command, streaming its output to the terminal and to a log; stop the demo if it fails."""
    print(f"\n=== {step}\n$ {' '.join(argv)}", flush=True)
    started = time.time()
    with open(log_path, "w", encoding="utf-8") as log:
        process = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   bufsize=1)
        for line in process.stdout:
            log.write(line)
            if "Warning" in line or "warnings.warn" in line:  # Paddle's import-time chatter
                continue
            sys.stdout.write(line)
        code = process.wait()
    if code != 0:
        sys.exit(f"demo: step '{step}' failed with exit code {code}; full log: {log_path}")
    print(f"=== {step}: done in {time.time() - started:.0f} s", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default=os.path.join(ROOT, "demo_output"))
    parser.add_argument("--model_name_or_path", default=None,
                        help="fine-tune these weights (a registered name or a directory) instead of pretraining")
    parser.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument("--pretrain_steps", type=int, default=400)
    parser.add_argument("--squad_epochs", type=float, default=10)
    parser.add_argument("--dupe_factor", type=int, default=5, help="masked copies of the text in the shards")
    args = parser.parse_args(argv)

    python = sys.executable
    out = os.path.abspath(args.output_dir)
    os.makedirs(out, exist_ok=True)
    squad_dir = os.path.join(ROOT, "data", "squad_sample")
    model = args.model_name_or_path
    plot_path = None

    if model is None:
        shards = os.path.join(out, "shards")
        pretrain_dir = os.path.join(out, "pretrain")
        shutil.rmtree(shards, ignore_errors=True)  # a rerun starts over
        run("1/4 make HDF5 shards from data/sample_text.txt",
            [python, "tools/create_pretraining_data.py", "--input_file", "data/sample_text.txt", "--output_dir",
             shards, "--vocab_file", "megatronbert-uncased", "--max_seq_length", "128",
             "--max_predictions_per_seq", "20", "--dupe_factor", str(args.dupe_factor), "--seed", "42"],
            os.path.join(out, "create_pretraining_data.log"))
        run("2/4 pretrain a tiny MegatronBERT (MLM + NSP) from scratch",
            [python, "run_pretrain.py", "--config_file", "configs/tiny.json", "--input_dir", shards,
             "--output_dir", pretrain_dir, "--max_predictions_per_seq", "20", "--batch_size", "32",
             "--learning_rate", "2e-3", "--warmup_steps", "40", "--weight_decay", "0.01",
             "--max_steps", str(args.pretrain_steps), "--num_train_epochs", "1000", "--logging_steps", "20",
             "--save_steps", "200",
             "--seed", "42", "--device", args.device, "--overwrite_output_dir"],
            os.path.join(out, "pretrain.log"))
        plot_path = os.path.join(out, "pretrain_loss.png")
        run("3/4 plot the pretraining loss",
            [python, "tools/plot_metrics.py", os.path.join(pretrain_dir, "metrics.jsonl"), "--out", plot_path,
             "--title", "tiny MegatronBERT pretraining on Botchan"],
            os.path.join(out, "plot.log"))
        with open(os.path.join(pretrain_dir, "latest"), encoding="utf-8") as f:
            model = os.path.join(pretrain_dir, f.read().strip())

    squad_out = os.path.join(out, "squad")
    run("4/4 fine-tune and evaluate on the bundled SQuAD v1.1-format sample",
        [python, "run_squad.py", "--do_train", "--do_predict", "--model_name_or_path", model,
         "--train_file", os.path.join(squad_dir, "train-v1.1.json"),
         "--predict_file", os.path.join(squad_dir, "dev-v1.1.json"), "--output_dir", squad_out,
         "--max_seq_length", "128", "--doc_stride", "64", "--batch_size", "16", "--learning_rate", "1e-3",
         "--num_train_epochs", str(args.squad_epochs), "--warmup_proportion", "0.1", "--logging_steps", "100",
         "--save_steps", "1000",
         "--seed", "42", "--device", args.device, "--overwrite_output_dir"],  # a rerun fine-tunes anew
        os.path.join(out, "squad.log"))

    with open(os.path.join(squad_out, "eval_results.json"), encoding="utf-8") as f:
        results = json.load(f)
    print("\nSQuAD-format sample (data/squad_sample/dev-v1.1.json):")
    print(json.dumps(results, indent=2))
    print(f"\nresults: {squad_out}/eval_results.json, predictions: {squad_out}/predictions.json"
          + (f", pretraining loss plot: {plot_path}" if plot_path else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
