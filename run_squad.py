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
    str_to_bool,
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Fine-tune MegatronBERT on SQuAD v1.1 / v2.0")
    parser.add_argument("--train_file", default=None, help="official SQuAD JSON for training")
    parser.add_argument("--predict_file", default=None, help="official SQuAD JSON to predict and evaluate")
    parser.add_argument("--version_2_with_negative", action="store_true",
                        help="SQuAD 2.0: questions may be unanswerable (null answers, null_odds.json, best thresholds)")
    parser.add_argument("--do_train", action="store_true")
    parser.add_argument("--do_predict", action="store_true", help="predict and evaluate on --predict_file")
    parser.add_argument("--doc_stride", type=int, default=128,
                        help="tokens between the starts of consecutive windows of a long context")
    parser.add_argument("--max_query_length", type=int, default=64, help="questions are cut to this many tokens")
    parser.add_argument("--n_best_size", type=int, default=20, help="best starts/ends searched and n-best answers kept")
    parser.add_argument("--max_answer_length", type=int, default=30, help="longest answer, in tokens")
    parser.add_argument("--null_score_diff_threshold", type=float, default=0.0,
                        help="v2: answer null when null score - best span score exceeds this")
    parser.add_argument("--do_lower_case", type=str_to_bool, nargs="?", const=True, default=None,
                        help="override the vocabulary's casing (default: the model's own)")
    parser.add_argument("--verbose", action="store_true", help="accepted for compatibility; logging is always on")
    add_finetune_arguments(parser, batch_size=8, max_seq_length=512, learning_rate=1e-5, warmup_proportion=0.06,
                           adam_epsilon=1e-8)
    args = parser.parse_args(argv)
    if not (args.do_train or args.do_predict):
        parser.error("nothing to do: pass --do_train and/or --do_predict")
    for name in ("doc_stride", "max_query_length", "n_best_size", "max_answer_length"):  # before the model loads
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    return args


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


def write_json(path, value):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, ensure_ascii=False, indent=2)
        f.write("\n")


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
    model = MegatronBertForQuestionAnswering.from_pretrained(args.model_name_or_path,
                                                             tensor_parallel_degree=topo.tp_degree)
    check_model_fits(model.config, tokenizer, args.max_seq_length)
    window = dict(max_seq_length=args.max_seq_length, doc_stride=args.doc_stride,
                  max_query_length=args.max_query_length, show_progress=show_progress)
    dev_features = build_squad_features(dev_examples, tokenizer, **window) if evaluates_here else None
    pad_id = tokenizer.pad_token_id
    eval_batch_size = args.eval_batch_size or args.batch_size
    latest = {}  # the latest evaluation's outputs, written when it is the best

    def evaluate():
        import paddle

        model.eval()
        start_logits, end_logits = [], []
        tic = time.time()
        with paddle.no_grad():
            batches = iterate_batches(dev_features, eval_batch_size)
            total = (len(dev_features) + eval_batch_size - 1) // eval_batch_size
            for batch in progress(batches, "predicting", show_progress, total):
                inputs = pad_batch([{"input_ids": f.input_ids, "token_type_ids": f.token_type_ids} for f in batch],
                                   pad_id)
                out = model(**inputs, return_dict=True)
                start_logits.extend(out["start_logits"].astype("float32").numpy())
                end_logits.extend(out["end_logits"].astype("float32").numpy())
        model.train()
        if not topo.is_main:
            return None
        predictions, nbest, null_odds = postprocess_squad_predictions(
            dev_examples, dev_features, start_logits, end_logits, args.version_2_with_negative,
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
        write_json(os.path.join(args.output_dir, "predictions.json"), latest["predictions"])
        write_json(os.path.join(args.output_dir, "nbest_predictions.json"), latest["nbest"])
        if args.version_2_with_negative:
            write_json(os.path.join(args.output_dir, "null_odds.json"), latest["null_odds"])
        write_json(os.path.join(args.output_dir, "eval_results.json"), results)

    final_results = None
    if args.do_train:
        train_features = [
            {"input_ids": f.input_ids, "token_type_ids": f.token_type_ids, "start_positions": f.start_position,
             "end_positions": f.end_position}
            for f in build_squad_features(train_examples, tokenizer, is_training=True, **window)
        ]

        def collate(features):
            return pad_batch(features, pad_id, label_keys=("start_positions", "end_positions"))

        best = {}

        def on_new_best(results):
            best.update(results)
            write_outputs(results)

        state = finetune(model, tokenizer, train_features, collate, args, topo,
                         evaluate=evaluate if args.do_predict else None, metric_name="f1", on_new_best=on_new_best)
        if topo.is_main and best:
            final_results = best
            print(f"best checkpoint: step {state.best_step} (f1 {state.best_metric:.4f}) in "
                  f"{os.path.join(args.output_dir, BEST_MODEL_DIR)}", flush=True)
    elif evaluates_here:
        results = evaluate()
        if topo.is_main:
            write_outputs(results)
            final_results = results
    if final_results is not None:
        print(json.dumps(final_results, indent=2), flush=True)
    return final_results


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
