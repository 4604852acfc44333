"""Fine-tune and evaluate MegatronBERT on a GLUE task (CoLA, SST-2, MRPC, STS-B, QQP, MNLI, QNLI, RTE, WNLI).

    python -m paddle.distributed.launch run_glue.py --task_name=mnli --output_dir=output/ \
        --model_name_or_path=megatronbert-cased --learning_rate=1e-5 --device=gpu --num_train_epochs=2 \
        [--data_dir glue_data]

With --data_dir the task's TSV files are read from the official layout (DATA_DIR/MNLI/train.tsv,
dev_matched.tsv, dev_mismatched.tsv; DATA_DIR/SST-2/train.tsv, dev.tsv ...); without it from PaddleNLP's
``glue`` dataset (needs a network). Writes eval_results.json (the best evaluation: the task's metrics and
loss; MNLI's mismatched numbers with the suffix ``_mm``), best_model/ and trainer_state.json to --output_dir.
See docs/finetuning.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from paddle_megatronbert.training import setup_cpu_threads

setup_cpu_threads()  # before paddle is imported (it pins OMP to 1 thread otherwise)

from paddle_megatronbert.finetune import (  # noqa: E402
    BEST_MODEL_DIR,
    add_finetune_arguments,
    check_model_fits,
    finetune,
    iterate_batches,
    pad_batch,
    progress,
    setup_run,
)

# the key suffix of each dev split's results (MNLI: matched, then mismatched)
SPLIT_SUFFIX = {"dev": "", "dev_matched": "", "dev_mismatched": "_mm"}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Fine-tune MegatronBERT on a GLUE task")
    parser.add_argument("--task_name", required=True,
                        help="CoLA, SST-2, MRPC, STS-B, QQP, MNLI, QNLI, RTE or WNLI (any case)")
    parser.add_argument("--data_dir", default=None,
                        help="GLUE data directory in the official layout (default: PaddleNLP's glue dataset)")
    add_finetune_arguments(parser, batch_size=16, max_seq_length=512, learning_rate=1e-5, warmup_proportion=0.06,
                           adam_epsilon=1e-6)
    parser.set_defaults(save_steps=10000)
    return parser.parse_args(argv)


def format_results(loss, metrics):
    """One ``eval loss: ..., acc: ...,`` line, as PaddleNLP's GLUE example prints."""
    return ", ".join([f"eval loss: {loss:.6f}"] + [f"{key}: {value:.6f}" for key, value in metrics.items()]) + ", "


def main(argv=None):
    args = parse_args(argv)
    from paddle_megatronbert.data.glue import build_glue_features, get_glue_task, load_glue_split

    task = get_glue_task(args.task_name)  # an unknown name fails before any set-up
    topo = setup_run(args)

    import numpy as np
    import paddle

    from paddle_megatronbert import MegatronBertForSequenceClassification, MegatronBertTokenizer
    from paddle_megatronbert.metrics import glue_metrics

    show_progress = topo.is_main and not args.no_progress
    tokenizer = MegatronBertTokenizer.from_pretrained(args.model_name_or_path)
    train_examples = load_glue_split(task, "train", args.data_dir)
    evaluates_here = topo.dataset_rank == 0  # the first replica's ranks evaluate
    dev_sets = {split: load_glue_split(task, split, args.data_dir) for split in task.dev_splits} if evaluates_here else {}
    if topo.is_main:
        print(f"{task.directory}: {len(train_examples)} training examples, "
              + ", ".join(f"{len(v)} in {k}" for k, v in dev_sets.items()), flush=True)
    model = MegatronBertForSequenceClassification.from_pretrained(
        args.model_name_or_path, num_labels=task.num_labels, tensor_parallel_degree=topo.tp_degree
    )
    check_model_fits(model.config, tokenizer, args.max_seq_length)
    label_dtype = "float32" if task.is_regression else "int64"
    pad_id = tokenizer.pad_token_id

    def collate(features):
        return pad_batch(features, pad_id, label_keys=("labels",), label_dtype=label_dtype)

    train_features = build_glue_features(train_examples, tokenizer, args.max_seq_length, show_progress)
    dev_features = {split: build_glue_features(examples, tokenizer, args.max_seq_length, show_progress)
                    for split, examples in dev_sets.items()}
    eval_batch_size = args.eval_batch_size or args.batch_size

    def evaluate():
        model.eval()
        results, tic = {}, time.time()
        for split, features in dev_features.items():
            outputs, loss_sum = [], 0.0
            with paddle.no_grad():
                total = (len(features) + eval_batch_size - 1) // eval_batch_size
                for batch in progress(iterate_batches(features, eval_batch_size), f"evaluating {split}",
                                      show_progress, total):
                    out = model(**collate(batch), return_dict=True)
                    loss_sum += float(out["loss"]) * len(batch)
                    outputs.append(out["logits"].astype("float32").numpy())
            logits = np.concatenate(outputs)
            predictions = logits[:, 0] if task.is_regression else logits.argmax(-1)
            labels = np.asarray([f["labels"] for f in features])
            metrics = glue_metrics(task.name, predictions, labels)
            loss = loss_sum / len(features)
            suffix = SPLIT_SUFFIX[split]
            results.update({key + suffix: value for key, value in metrics.items()})
            results["loss" + suffix] = loss
            if topo.is_main:
                print(format_results(loss, metrics), flush=True)
        model.train()
        if topo.is_main:
            print(f"eval done total : {time.time() - tic} s", flush=True)
        return results if topo.is_main else None

    metric_name = next(iter(glue_metrics(task.name, [0, 1], [0, 1])))

    def write_results(results):
        with open(os.path.join(args.output_dir, "eval_results.json"), "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
            f.write("\n")

    best = {}

    def on_new_best(results):
        best.clear()
        best.update(results)
        write_results(results)

    state = finetune(model, tokenizer, train_features, collate, args, topo, evaluate=evaluate,
                     metric_name=metric_name, on_new_best=on_new_best)
    if topo.is_main:
        print(f"best checkpoint: step {state.best_step} ({metric_name} {state.best_metric:.6f}) in "
              f"{os.path.join(args.output_dir, BEST_MODEL_DIR)}", flush=True)
        print(json.dumps(best, indent=2), flush=True)
    return best if topo.is_main else None


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
