"""Time inference (forward only, no gradients) of the question-answering head, side by side.

SQuAD-length inputs (``--seq_len 384``), at each of ``--batch_sizes`` (default 1 and 32). Contestants:
  ours-fast / ours-plain  paddle_megatronbert.MegatronBertForQuestionAnswering, fast paths on / off
  paddlenlp               paddlenlp.transformers.MegatronBertForQuestionAnswering (default flags)
  torch / torch-bf16      HF transformers MegatronBertForQuestionAnswering, fp32 / bf16 autocast
Same machinery as ``bench_train.py``: one worker process per contestant, interleaved steps, warm-up
excluded, median of ``--steps``; a table per batch size and one JSON line.

    OMP_NUM_THREADS=2 python benchmarks/bench_infer.py --config base --batch_sizes 1,32
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_train import (  # noqa: E402
    COMMON,
    CONFIGS,
    REPO,
    _paddle_amp,
    _paddle_setup,
    _torch_amp,
    _torch_setup,
    encoder_flops,
    machine_description,
    make_parser,
    parse_args,
    print_table,
    run_worker,
    summarize,
    time_interleaved,
)

INFER_MODELS = ("ours-fast", "ours-plain", "paddlenlp", "torch", "torch-bf16")


def make_qa_batch(config, batch, seq, seed=0):
    """Question + context token ids, full length (no padding: every contestant does the same work)."""
    import numpy as np

    rng = np.random.RandomState(seed)
    input_ids = rng.randint(1, config["vocab_size"], size=(batch, seq)).astype("int64")
    token_type_ids = np.zeros((batch, seq), dtype="int64")
    token_type_ids[:, min(64, seq // 2):] = 1  # a 64-token question, then the context
    return dict(input_ids=input_ids, token_type_ids=token_type_ids, attention_mask=np.ones((batch, seq), "int64"))


def build_infer_step(name, spec):
    """A function that runs one forward pass and returns a float (the host sync is timed)."""
    config = spec["model_config"]
    batch = make_qa_batch(config, spec["batch_size"], spec["seq_len"], spec["seed"])
    if name in ("ours-fast", "ours-plain", "paddlenlp"):
        paddle = _paddle_setup(spec)
        if name == "paddlenlp":
            from paddlenlp.transformers import MegatronBertConfig, MegatronBertForQuestionAnswering

            model = MegatronBertForQuestionAnswering(MegatronBertConfig(**config))
        else:
            sys.path.insert(0, REPO)
            from paddle_megatronbert import MegatronBertConfig, MegatronBertForQuestionAnswering

            model = MegatronBertForQuestionAnswering(MegatronBertConfig(**config, use_fast_kernels=name == "ours-fast"))
        model.eval()
        inputs = {k: paddle.to_tensor(v) for k, v in batch.items()}

        def step():
            with paddle.no_grad(), _paddle_amp(paddle, spec):
                if name == "paddlenlp":  # its mask comes from the [PAD] ids (a 2-D 0/1 mask is not converted)
                    start, end = model(inputs["input_ids"], token_type_ids=inputs["token_type_ids"])
                else:
                    out = model(inputs["input_ids"], inputs["attention_mask"], inputs["token_type_ids"],
                                return_dict=True)
                    start, end = out.start_logits, out.end_logits
                return float(start[0, 0]) + float(end[0, 0])

        return step
    if name in ("torch", "torch-bf16"):
        torch, device = _torch_setup(spec)
        from transformers import MegatronBertConfig, MegatronBertForQuestionAnswering

        model = MegatronBertForQuestionAnswering(MegatronBertConfig(**config)).to(device).eval()
        inputs = {k: torch.from_numpy(v).to(device) for k, v in batch.items()}
        amp = "bf16" if name == "torch-bf16" else spec["amp"]

        def step():
            with torch.inference_mode(), _torch_amp(torch, device, amp):
                out = model(inputs["input_ids"], inputs["attention_mask"], inputs["token_type_ids"])
                return float(out.start_logits[0, 0]) + float(out.end_logits[0, 0])

        return step
    raise ValueError(f"unknown contestant {name!r}; choose from {INFER_MODELS}")


def main(argv=None):
    parser = make_parser(INFER_MODELS, INFER_MODELS, seq_len=384, doc=__doc__, train=False)
    parser.add_argument("--batch_sizes", default="1,32", help="comma-separated batch sizes, one table each")
    args = parse_args(argv, parser, INFER_MODELS)
    if args.worker:
        return run_worker(args.worker, json.loads(args.spec), build_infer_step)
    config = {**CONFIGS[args.config], **COMMON}
    report = {"bench": "infer", "config": args.config, "seq_len": args.seq_len, "amp": args.amp, "steps": args.steps,
              "machine": machine_description(args.device), "by_batch_size": {}}
    for batch_size in [int(b) for b in args.batch_sizes.split(",") if b]:
        spec = dict(model_config=config, batch_size=batch_size, seq_len=args.seq_len, masked=0, device=args.device,
                    amp=args.amp, seed=args.seed, threads=args.threads)
        times, losses, memory = time_interleaved(os.path.abspath(__file__), args.names, spec, args.warmup,
                                                 args.steps, args.gap, args.threads)
        flops = {n: encoder_flops(config, batch_size, args.seq_len) + 2 * batch_size * args.seq_len *
                 config["hidden_size"] * 2 for n in args.names}
        reference = "ours-fast" if "ours-fast" in times else "ours-plain"
        results, ratios = summarize(times, losses, memory, flops, batch_size * args.seq_len, reference)
        for row in results.values():
            row.pop("first_loss")  # a logit, not a loss: meaningless across contestants
        print_table(f"QA inference, {args.config}, batch {batch_size} x seq {args.seq_len}, {args.threads} threads, "
                    f"{args.device}, amp {args.amp}, median of {args.steps}", results, ratios)
        report["by_batch_size"][str(batch_size)] = {"results": results, "ratios": ratios}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
