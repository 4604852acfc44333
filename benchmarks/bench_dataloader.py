"""Is the pretraining data loader ever the bottleneck? Its rate against the model's, in sequences/s.

Makes shards from the shipped text (or reads ``--input_dir``), then times, in one process:
  loader   PretrainingDataLoader over every shard (reading and decompressing each HDF5 shard, shuffling,
           batching) plus paddle.to_tensor of each batch: what the training loop waits for per step;
  model    one training step of ``--config`` (forward + backward + AdamW) on the same batches.
The loader prefetches the next shard in a thread while the model trains; its rate here is measured
without the model running, i.e. the rate it can sustain alone. The goal: loader >= 10x the model.

    OMP_NUM_THREADS=2 python benchmarks/bench_dataloader.py --config configs/tiny.json --batch_size 32
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from paddle_megatronbert.training import setup_cpu_threads  # noqa: E402

setup_cpu_threads()


def make_shards(directory: str, seq_length: int, predictions: int) -> None:
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import create_pretraining_data

    create_pretraining_data.main([
        "--input_file", os.path.join(REPO, "data", "sample_text.txt"), "--output_dir", directory,
        "--max_seq_length", str(seq_length), "--max_predictions_per_seq", str(predictions), "--dupe_factor", "4",
        "--shards_per_file", "4", "--num_workers", "1"])


def loader_rate(files, batch_size, predictions, batches):
    """Sequences/s of the loader alone (shard reads included: the loop runs over every shard)."""
    import paddle

    from paddle_megatronbert.data.pretraining import PretrainingDataLoader

    loader = PretrainingDataLoader(files, batch_size, predictions, seed=0)
    start = time.perf_counter()
    for _ in range(batches):
        {k: paddle.to_tensor(v) for k, v in loader.next_batch().items()}
    elapsed = time.perf_counter() - start
    loader.close()
    return batches * batch_size / elapsed, elapsed


def model_rate(files, config_path, batch_size, predictions, steps, warmup):
    import paddle

    from paddle_megatronbert import MegatronBertConfig, MegatronBertForPreTraining
    from paddle_megatronbert.data.pretraining import PretrainingDataLoader
    from paddle_megatronbert.training import build_optimizer, linear_warmup_decay

    paddle.seed(0)
    model = MegatronBertForPreTraining(MegatronBertConfig.from_pretrained(config_path))
    optimizer = build_optimizer(model, linear_warmup_decay(1e-4, 1000, 10))
    loader = PretrainingDataLoader(files, batch_size, predictions, seed=0)
    times = []
    for step in range(warmup + steps):
        batch = {k: paddle.to_tensor(v) for k, v in loader.next_batch().items()}
        start = time.perf_counter()
        model(**batch, return_dict=True).loss.backward()
        optimizer.step()
        optimizer.clear_grad()
        if step >= warmup:
            times.append(time.perf_counter() - start)
    loader.close()
    return batch_size / statistics.median(times), statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=os.path.join(REPO, "configs", "tiny.json"))
    parser.add_argument("--input_dir", default=None, help="shards to read (default: made from data/sample_text.txt)")
    parser.add_argument("--seq_length", type=int, default=128, help="when making shards")
    parser.add_argument("--max_predictions_per_seq", type=int, default=20)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--model_steps", type=int, default=10)
    parser.add_argument("--warmup_steps", type=int, default=2)
    args = parser.parse_args(argv)

    from paddle_megatronbert.data.pretraining import PretrainingDataLoader, list_shards

    with tempfile.TemporaryDirectory() as tmp:
        input_dir = args.input_dir or os.path.join(tmp, "shards")
        if args.input_dir is None:
            make_shards(input_dir, args.seq_length, args.max_predictions_per_seq)
        files = list_shards(input_dir)
        probe = PretrainingDataLoader(files, args.batch_size, args.max_predictions_per_seq, prefetch=False)
        epoch_batches, seq_length = probe.steps_per_epoch, probe.seq_length
        probe.close()
        data_rate, data_seconds = loader_rate(files, args.batch_size, args.max_predictions_per_seq, epoch_batches)
        train_rate, step_seconds = model_rate(files, args.config, args.batch_size, args.max_predictions_per_seq,
                                              args.model_steps, args.warmup_steps)
    ratio = data_rate / train_rate
    print(f"shards: {len(files)}, seq {seq_length}, batch {args.batch_size}, OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}")
    print(f"loader: {data_rate:10.0f} sequences/s  ({epoch_batches} batches, every shard read, in {data_seconds:.2f} s)")
    print(f"model:  {train_rate:10.1f} sequences/s  (median step {step_seconds * 1e3:.1f} ms, {args.config})")
    print(f"loader / model = {ratio:.0f}x -> {'OK: the loader is not the bottleneck' if ratio >= 10 else 'BOTTLENECK'}")
    print(json.dumps({"loader_sequences_per_sec": data_rate, "model_sequences_per_sec": train_rate, "ratio": ratio,
                      "batch_size": args.batch_size, "seq_length": seq_length, "shards": len(files)}))
    return ratio


if __name__ == "__main__":
    sys.exit(0 if main() >= 10 else 1)
