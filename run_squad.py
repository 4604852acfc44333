"""Fine-tune and evaluate MegatronBERT on SQuAD v1.1 / v2.0 (extractive question answering).

    python -m paddle.distributed.launch run_squad.py --do_train --do_predict --batch_size=8 \
        --model_name_or_path=megatronbert-cased --learning_rate=1e-5 --output_dir=output/ --device=gpu \
        --num_train_epochs=2 [--version_2_with_negative] [--train_file train-v1.1.json --predict_file dev-v1.1.json]

Without --train_file / --predict_file the data comes from PaddleNLP's ``squad`` dataset (needs a network).
Writes to --output_dir: predictions.json, nbest_predictions.json, null_odds.json (v2), eval_results.json
(the official evaluation of the best checkpoint's predictions), best_model/ and trainer_state.json.
See docs/finetuning.md.
"""

from __future__ import annotations

import json
import os
import time

from paddle_megatronbert.training import setup_cpu_threads

setup_cpu_threads()  # before paddle is imported (it pins OMP to 1 thread otherwise)

from paddle_megatronbert.arguments import (RunnerArgumentParser, add_finetune_arguments, add_training_arguments,  # noqa
                                           config_overrides, finish_arguments, resolve_max_seq_length, str_to_bool)
from paddle_megatronbert.finetune import check_model_fits, finetune, pad_batch, predict, write_json  # noqa: E402
from paddle_megatronbert.loop import run_cli, setup_run  # noqa: E402


def parse_args(argv=None):
    parser = RunnerArgumentParser("squad", description=__doc__)
    task = parser.add_argument_group("SQuAD")
    task.add_argument("--train_file", default=None, help="official SQuAD JSON for training")
    task.add_argument("--predict_file", default=None, help="official SQuAD JSON to predict and evaluate")
    task.add_argument("--version_2_with_negative", action="store_true",
                      help="SQuAD 2.0: questions may be unanswerable (null answers, null_odds.json, best thresholds)")
    task.add_argument("--do_train", action="store_true", help="fine-tune on --train_file")
    task.add_argument("--do_predict", action="store_true", help="predict and evaluate on --predict_file")
    task.add_argument("--doc_stride", type=int, default=128,
                      help="tokens between the starts of consecutive windows of a long context")
    task.add_argument("--max_query_length", type=int, default=64, help="questions are cut to this many tokens")
    task.add_argument("--n_best_size", type=int, default=20, help="best starts/ends searched and n-best answers kept")
    task.add_argument("--max_answer_length", type=int, default=30, help="longest answer, in tokens")
    task.add_argument("--null_score_diff_threshold", type=float, default=0.0,
                      help="v2: answer null when null score - best span score exceeds this")
    task.add_argument("--do_lower_case", type=str_to_bool, nargs="?", const=True, default=None,
                      help="override the vocabulary's casing (None: the model's own)")
    task.add_argument("--verbose", action="store_true", help="accepted for compatibility; logging is always on")
    add_training_arguments(parser)
    add_finetune_arguments(parser)
    args = parser.parse_args(argv)
    if not (args.do_train or args.do_predict):
        parser.error("nothing to do: pass --do_train and/or --do_predict")
    return finish_arguments(parser, args, [f"--{name} must be >= 1, got {getattr(args, name)}" for name in (
        "doc_stride", "max_query_length", "n_best_size", "max_answer_length") if getattr(args, name) < 1])


def load_examples(path, split, args, announce):
    from paddle_megatronbert.data.squad import load_squad_by_name, read_squad_examples

    if path:
        examples, stats = read_squad_examples(path, args.version_2_with_negative)
        where = path
    else:
        examples, stats = load_squad_by_name(split, args.version_2_with_negative)
        where = f"PaddleNLP squad ({split})"
    if not examples:
        raise ValueError(f"{where} has no questions")
    if announce:
        print(f"{where}: {stats.questions} questions ({stats.unanswerable} unanswerable), "
              f"{len(stats.misaligned)} answers misaligned with their context", flush=True)
    return examples


def main(argv=None):
    args = parse_args(argv)
    topo = setup_run(args)

    from paddle_megatronbert import MegatronBertForQuestionAnswering, MegatronBertTokenizer
    from paddle_megatronbert.data.squad import build_squad_features, postprocess_squad_predictions
    from paddle_megatronbert.metrics import squad_evaluate

    show_progress = topo.is_main and not args.no_progress
    tokenizer_kwargs = {} if args.do_lower_case is None else {"do_lower_case": args.do_lower_case}
    tokenizer = MegatronBertTokenizer.from_pretrained(args.model_name_or_path, **tokenizer_kwargs)
    train_examples = load_examples(args.train_file, "train", args, topo.is_main) if args.do_train else None
    # Only the first replica evaluates (all of its tensor-parallel ranks run the forward).
    evaluates_here = args.do_predict and topo.dataset_rank == 0
    dev_examples = load_examples(args.predict_file, "dev", args, topo.is_main) if evaluates_here else None
    model = MegatronBertForQuestionAnswering.from_pretrained(
        args.model_name_or_path, tensor_parallel_degree=topo.tp_degree, **config_overrides(args))
    check_model_fits(model.config, tokenizer, resolve_max_seq_length(args, model.config, topo.is_main))
    window = dict(max_seq_length=args.max_seq_length, doc_stride=args.doc_stride,
                  max_query_length=args.max_query_length, show_progress=show_progress)
    dev_features = build_squad_features(dev_examples, tokenizer, **window) if evaluates_here else None
    eval_batch_size = args.eval_batch_size or args.batch_size
    latest = {}  # the latest evaluation's outputs, written when it is the best

    def evaluate():
        tic = time.time()
        inputs = [{"input_ids": f.input_ids, "token_type_ids": f.token_type_ids} for f in dev_features]
        logits = predict(model, inputs, lambda batch: pad_batch(batch, tokenizer.pad_token_id), eval_batch_size,
                         ("start_logits", "end_logits"), show_progress=show_progress)
        if not topo.is_main:
            return None
        predictions, nbest, null_odds = postprocess_squad_predictions(
            dev_examples, dev_features, logits["start_logits"], logits["end_logits"], args.version_2_with_negative,
            args.n_best_size, args.max_answer_length, args.null_score_diff_threshold,
        )
        gold = {e.qas_id: e.answers for e in dev_examples}
        # The threshold the predictions were made with, so the numbers describe predictions.json exactly.
        results = squad_evaluate(gold, predictions, null_odds if args.version_2_with_negative else None,
                                 na_prob_thresh=args.null_score_diff_threshold)
        latest.update(predictions=predictions, nbest=nbest, null_odds=null_odds)
        print(f"evaluated {len(dev_examples)} questions ({len(dev_features)} windows) in {time.time() - tic:.1f} s",
              flush=True)
        return dict(results)

    def write_outputs(results):
        os.makedirs(args.output_dir, exist_ok=True)
        files = {"predictions.json": latest["predictions"], "nbest_predictions.json": latest["nbest"],
                 "null_odds.json": latest["null_odds"] if args.version_2_with_negative else None,
                 "eval_results.json": results}
        for name, value in files.items():
            if value is not None:
                write_json(os.path.join(args.output_dir, name), value)

    final_results = None
    if args.do_train:
        train_features = [
            {"input_ids": f.input_ids, "token_type_ids": f.token_type_ids, "start_positions": f.start_position,
             "end_positions": f.end_position}
            for f in build_squad_features(train_examples, tokenizer, is_training=True, **window)
        ]
        best = {}
        result = finetune(model, tokenizer, train_features, lambda features: pad_batch(
            features, tokenizer.pad_token_id, label_keys=("start_positions", "end_positions")), args, topo,
            evaluate=evaluate if args.do_predict else None, metric_name="f1",
            on_new_best=lambda results: (best.update(results), write_outputs(results)))
        final_results = best or result.state.best_results()
    elif evaluates_here:
        final_results = evaluate()
        if topo.is_main:
            write_outputs(final_results)
    if topo.is_main and final_results is not None:
        print(json.dumps(final_results, indent=2), flush=True)
    return final_results


if __name__ == "__main__":
    run_cli(main)
