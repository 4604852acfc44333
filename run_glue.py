"""Fine-tune and evaluate MegatronBERT on a GLUE task (CoLA, SST-2, MRPC, STS-B, QQP, MNLI, QNLI, RTE, WNLI).

    python -m paddle.distributed.launch run_glue.py --task_name=mnli --output_dir=output/ \
        --model_name_or_path=megatronbert-cased --learning_rate=1e-5 --device=gpu --num_train_epochs=2 \
        [--data_dir glue_data]

With --data_dir the task's TSV files are read from the official layout (DATA_DIR/MNLI/train.tsv,
dev_matched.tsv, dev_mismatched.tsv; DATA_DIR/SST-2/train.tsv, dev.tsv ...; DATA_DIR may also be the task's
directory itself, glue_data/MNLI, as NVIDIA's and HF's scripts take it); without it from PaddleNLP's
``glue`` dataset (needs a network). Writes eval_results.json (the best evaluation: the task's metrics and
loss; MNLI's mismatched numbers with the suffix ``_mm``), best_model/ and trainer_state.json to --output_dir.
See docs/finetuning.md.
"""

from __future__ import annotations

import json
import os
import time

from paddle_megatronbert.training import setup_cpu_threads

setup_cpu_threads()  # before paddle is imported (it pins OMP to 1 thread otherwise)

from paddle_megatronbert.arguments import RunnerArgumentParser, add_finetune_arguments, add_training_arguments  # noqa
from paddle_megatronbert.arguments import config_overrides, finish_arguments, resolve_max_seq_length  # noqa: E402
from paddle_megatronbert.finetune import check_model_fits, finetune, pad_batch, predict, write_json  # noqa: E402
from paddle_megatronbert.loop import run_cli, setup_run  # noqa: E402

# the key suffix of each dev split's results (MNLI: matched, then mismatched)
SPLIT_SUFFIX = {"dev": "", "dev_matched": "", "dev_mismatched": "_mm"}


def parse_args(argv=None):
    parser = RunnerArgumentParser("glue", description=__doc__)
    task = parser.add_argument_group("GLUE")
    task.add_argument("--task_name", required=True,
                      help="CoLA, SST-2, MRPC, STS-B, QQP, MNLI, QNLI, RTE or WNLI (any case)")
    task.add_argument("--data_dir", default=None,
                      help="the GLUE root (glue_data, holding MNLI/ ...) or the task's own directory "
                           "(glue_data/MNLI) in the official layout (None: PaddleNLP's glue dataset)")
    add_training_arguments(parser)
    add_finetune_arguments(parser)
    return finish_arguments(parser, parser.parse_args(argv))


def format_results(loss, metrics):
    """One ``eval loss: ..., acc: ...,`` line, as PaddleNLP's GLUE example prints."""
    return ", ".join([f"eval loss: {loss:.6f}"] + [f"{key}: {value:.6f}" for key, value in metrics.items()]) + ", "


def main(argv=None):
    args = parse_args(argv)
    from paddle_megatronbert.data.glue import build_glue_features, get_glue_task, load_glue_split

    task = get_glue_task(args.task_name)  # an unknown name fails before any set-up
    topo = setup_run(args)

    import numpy as np

    from paddle_megatronbert import MegatronBertForSequenceClassification, MegatronBertTokenizer
    from paddle_megatronbert.metrics import glue_metrics

    show_progress = topo.is_main and not args.no_progress
    tokenizer = MegatronBertTokenizer.from_pretrained(args.model_name_or_path)
    train_examples = load_glue_split(task, "train", args.data_dir)
    evaluates_here = topo.dataset_rank == 0  # the first replica's ranks evaluate
    dev_sets = ({split: load_glue_split(task, split, args.data_dir) for split in task.dev_splits}
                if evaluates_here else {})
    if topo.is_main:
        print(f"{task.directory}: {len(train_examples)} training examples, "
              + ", ".join(f"{len(v)} in {k}" for k, v in dev_sets.items()), flush=True)
    model = MegatronBertForSequenceClassification.from_pretrained(
        args.model_name_or_path, num_labels=task.num_labels, tensor_parallel_degree=topo.tp_degree,
        **config_overrides(args))
    check_model_fits(model.config, tokenizer, resolve_max_seq_length(args, model.config, topo.is_main))
    label_dtype = "float32" if task.is_regression else "int64"

    def collate(features):
        return pad_batch(features, tokenizer.pad_token_id, label_keys=("labels",), label_dtype=label_dtype)

    train_features = build_glue_features(train_examples, tokenizer, args.max_seq_length, show_progress)
    dev_features = {split: build_glue_features(examples, tokenizer, args.max_seq_length, show_progress)
                    for split, examples in dev_sets.items()}
    eval_batch_size = args.eval_batch_size or args.batch_size

    def evaluate():
        results, tic = {}, time.time()
        for split, features in dev_features.items():
            out = predict(model, features, collate, eval_batch_size, ("logits",), f"evaluating {split}", show_progress)
            logits = np.stack(out["logits"])
            predictions = logits[:, 0] if task.is_regression else logits.argmax(-1)
            metrics = glue_metrics(task.name, predictions, np.asarray([f["labels"] for f in features]))
            suffix = SPLIT_SUFFIX[split]
            results.update({key + suffix: value for key, value in metrics.items()})
            results["loss" + suffix] = out["loss"]
            if topo.is_main:
                print(format_results(out["loss"], metrics), flush=True)
        if topo.is_main:
            print(f"eval done total : {time.time() - tic} s", flush=True)
        return results if topo.is_main else None

    best = {}

    def on_new_best(results):
        best.clear()
        best.update(results)
        write_json(os.path.join(args.output_dir, "eval_results.json"), results)

    result = finetune(model, tokenizer, train_features, collate, args, topo, evaluate=evaluate,
                      metric_name=next(iter(glue_metrics(task.name, [0, 1], [0, 1]))), on_new_best=on_new_best)
    best = best or result.state.best_results() or {}  # a rerun of a finished run: its best, from trainer_state
    if topo.is_main:
        print(json.dumps(best, indent=2), flush=True)
    return best if topo.is_main else None


if __name__ == "__main__":
    run_cli(main)
