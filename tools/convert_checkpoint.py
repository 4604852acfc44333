#!/usr/bin/env python
"""Convert a PyTorch MegatronBERT checkpoint into a Paddle model directory.

    python tools/convert_checkpoint.py SRC DST [--from {hf,megatron}] [--dtype {float32,float16,bfloat16}]
                                               [--vocab_file F]

SRC: an HF ``MegatronBert*`` directory (``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``),
an NGC zip (``megatron_bert_345m_v0_1_uncased.zip``), a Megatron-LM checkpoint directory (with
``latest_checkpointed_iteration.txt``, ``release/`` or ``iter_XXXXXXX/``; tensor-parallel ``mp_rank_XX``
shards are merged) or one ``model_optim_rng.pt``. DST is written whole or not at all; it loads with
``MegatronBertFor*.from_pretrained(DST)``. See docs/converting.md.
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
    parser.add_argument("--from", dest="kind", choices=("hf", "megatron"), help="the source kind (default: detected)")
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
        report = convert_checkpoint(args.src, args.dst, kind=args.kind, dtype=args.dtype, vocab_file=args.vocab_file,
                                    overwrite=args.overwrite, num_attention_heads=args.num_attention_heads,
                                    allow_vocab_mismatch=args.allow_vocab_mismatch)
    except (ValueError, FileNotFoundError, FileExistsError, ImportError, KeyError) as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2
    if not args.quiet:
        vocab = report["vocab"]
        print(f"converted {report['source_kind']} checkpoint {args.src} -> {args.dst}: {len(report['tensors'])} "
              f"tensors, {args.dtype}, vocab rows {vocab['embedding_rows']}, "
              f"{'uncased' if vocab['do_lower_case'] else 'cased'}, read with {', '.join(report['read_with'])}")
        for note in report["notes"]:
            print(f"  note: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
