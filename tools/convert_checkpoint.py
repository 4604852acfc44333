#!/usr/bin/env python
"""Convert a MegatronBERT checkpoint: PyTorch (HF, Megatron-LM, NGC) into a Paddle model directory, and back.

    python tools/convert_checkpoint.py SRC DST [--from {hf,megatron,paddle}] [--to {paddle,hf,megatron}]
        [--dtype {float32,float16,bfloat16}] [--vocab_file F] [--tensor_parallel_degree N]
        [--megatron_layout {core,legacy}] [--verify] [--safe_serialization {true,false}]

SRC: an HF ``MegatronBert*`` directory (``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``),
an NGC zip (``megatron_bert_345m_v0_1_uncased.zip``), a Megatron-LM checkpoint directory (with
``latest_checkpointed_iteration.txt``, ``release/`` or ``iter_XXXXXXX/``; ``mp_rank_TT`` / ``mp_rank_TT_PPP``
shards are merged over TP and PP; ``torch_dist`` directories are read with torch.distributed.checkpoint;
the NEW_DIR of Megatron-LM's conversion, holding ``torch/``, is accepted), one ``model_optim_rng.pt``, or one of our Paddle directories (for ``--to hf`` /
``--to megatron``). DST is written whole or not at all; a Paddle DST loads with
``MegatronBertFor*.from_pretrained(DST)``, an HF one with transformers, a Megatron one with Megatron-LM
(``--load DST``). ``conversion_report.json`` beside it lists every tensor. See docs/converting.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="HF directory, NGC zip, Megatron-LM checkpoint directory or model_optim_rng.pt")
    parser.add_argument("dst", help="the Paddle model directory to write")
    parser.add_argument("--from", dest="kind", choices=("hf", "megatron", "paddle"),
                        help="the source kind (default: detected)")
    parser.add_argument("--to", default="paddle", choices=("paddle", "hf", "megatron"),
                        help="what DST becomes (default: a Paddle model directory)")
    parser.add_argument("--tensor_parallel_degree", type=int, default=1,
                        help="with --to megatron: the number of mp_rank_XX shards to write")
    parser.add_argument("--megatron_layout", default="core", choices=("core", "legacy"),
                        help="with --to megatron: core (default) = megatron-core BertModel names and args, what "
                             "Megatron-LM loads today; legacy = the legacy BERT (Megatron-LM before core_v0.18)")
    parser.add_argument("--verify", action="store_true",
                        help="compare the source and the result on a probe batch (HF <-> Paddle; needs torch "
                             "and transformers)")
    parser.add_argument("--safe_serialization", default="true", choices=("true", "false"),
                        help="with --to paddle: write model.safetensors (true, the default) or, for tools that "
                             "want Paddle's pickle, model_state.pdparams (false)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                        help="dtype of the written weights (default float32)")
    parser.add_argument("--vocab_file", help="vocab.txt to ship with the model (default: the one in SRC, if any)")
    parser.add_argument("--num_attention_heads", type=int,
                        help="heads of a Megatron checkpoint that stores no args (default: hidden_size / 64)")
    parser.add_argument("--allow_vocab_mismatch", action="store_true",
                        help="keep a vocab file whose size does not fit the checkpoint's embeddings")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    parser.add_argument("--quiet", action="store_true", help="print only errors")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    from paddle_megatronbert.convert import convert_checkpoint

    try:
        report = convert_checkpoint(args.src, args.dst, kind=args.kind, to=args.to, dtype=args.dtype,
                                    vocab_file=args.vocab_file, overwrite=args.overwrite,
                                    num_attention_heads=args.num_attention_heads,
                                    allow_vocab_mismatch=args.allow_vocab_mismatch,
                                    tensor_parallel_degree=args.tensor_parallel_degree, verify=args.verify,
                                    safe_serialization=args.safe_serialization == "true",
                                    megatron_layout=args.megatron_layout)
    except (ValueError, FileNotFoundError, FileExistsError, ImportError, KeyError) as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2
    if not args.quiet:
        vocab = report["vocab"]
        print(f"converted {report['source_kind']} checkpoint {args.src} -> {args.to} {args.dst}: "
              f"{len(report['tensors'])} tensors, {args.dtype}, vocab rows {vocab['padded']} ({vocab['casing']}), "
              f"read with {', '.join(report['read_with'])}")
        for note in report["notes"]:
            print(f"  note: {note}")
        if "verify" in report:
            check = report["verify"]
            if "skipped" in check:
                print(f"  verify: skipped, {check['skipped']}")
            else:
                print(f"  verify: {check['compared']}: max |diff| of {check['output']} = {check['max_abs_diff']:.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
