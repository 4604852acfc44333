"""``resize_token_embeddings`` at TP=2, launched by tests/peer/test_resize_tensor_parallel.py through
``python -m paddle.distributed.launch --nproc_per_node 2 ... tests/dist/resize_checks.py --out DIR``.

Each rank resizes a tied MegatronBertForPreTraining (vocab 1001: the second rank's slice carries a padding
row) up to 1043 and down to 700, and writes to ``DIR/resize.rank{R}.json``: whether the kept rows are
unchanged, the decoder still tied, the local shapes, and the loss beside the loss of a TP=1 model holding the
same (gathered) weights; then the same after save_pretrained -> from_pretrained at TP=2 and at TP=1. Before
resizing, ``output_attentions`` at TP=2 (heads gathered from both ranks) is compared with TP=1's.
"""

import argparse
import json
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import numpy as np  # noqa: E402
import paddle  # noqa: E402
import paddle.distributed as dist  # noqa: E402
from parallel_checks import single_process_view  # noqa: E402  (this directory: the TP=1 view inside TP=2)

from paddle_megatronbert import MegatronBertConfig, MegatronBertForPreTraining, tp_plan  # noqa: E402
from paddle_megatronbert.distributed import init_distributed  # noqa: E402

SEED, VOCAB, UP, DOWN = 1234, 1001, 1043, 700
TINY = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def batch():
    rng = np.random.RandomState(0)
    ids = rng.randint(1, DOWN, size=(2, 8))  # fits every size below
    labels = np.where(rng.rand(2, 8) < 0.5, ids, -100)
    labels[0, 0] = DOWN - 1
    return dict(input_ids=paddle.to_tensor(ids), labels=paddle.to_tensor(labels),
                next_sentence_label=paddle.to_tensor(np.array([0, 1])))


def full(model, topo):
    """Every parameter as its full tensor (the TP shards gathered)."""
    out = {}
    for name, value in model.state_dict().items():
        kind = tp_plan.split_kind(name)
        if kind is None:
            out[name] = value.numpy()
            continue
        pieces = []
        dist.all_gather(pieces, value, group=topo.tp_group)
        out[name] = tp_plan.merge([p.numpy() for p in pieces], kind, model.config.vocab_size)
    return out


def tp1_loss(state, vocab):
    with single_process_view():
        reference = MegatronBertForPreTraining(MegatronBertConfig(**{**TINY, "vocab_size": vocab}))
        reference.load_full_state_dict(state)
        reference.eval()
        return float(reference(**batch(), return_dict=True).loss)


def attention_probabilities_vs_tp1(model, topo):
    """output_attentions at TP=2 (each rank's heads gathered) against a TP=1 model with the same weights,
    with padding: (max |difference|, number of heads returned)."""
    model.eval()
    ids = batch()["input_ids"]
    mask = paddle.to_tensor(np.array([[1] * 8, [1] * 5 + [0] * 3]))
    ours = model(ids, attention_mask=mask, output_attentions=True, return_dict=True).attentions
    state = full(model, topo)
    with single_process_view():
        reference = MegatronBertForPreTraining(MegatronBertConfig(**TINY))
        reference.load_full_state_dict(state)
        reference.eval()
        expected = reference(ids, attention_mask=mask, output_attentions=True, return_dict=True).attentions
    diff = max(float(np.abs(a.numpy() - b.numpy()).max()) for a, b in zip(ours, expected))
    return diff, int(ours[0].shape[1])


def check(model, topo, before, vocab, tag):
    model.eval()
    loss = float(model(**batch(), return_dict=True).loss)
    after = full(model, topo)
    kept = min(VOCAB, vocab)
    head = model.cls.predictions
    return {
        f"{tag}_vocab": model.config.vocab_size,
        f"{tag}_full_rows": int(after["bert.embeddings.word_embeddings.weight"].shape[0]),
        f"{tag}_local_rows": int(model.get_input_embeddings().weight.shape[0]),
        f"{tag}_local_bias": int(head.bias.shape[0]),
        f"{tag}_tied": head.decoder is model.get_input_embeddings().weight,
        f"{tag}_kept_rows_diff": float(np.abs(after["bert.embeddings.word_embeddings.weight"][:kept]
                                              - before["bert.embeddings.word_embeddings.weight"][:kept]).max()),
        f"{tag}_kept_bias_diff": float(np.abs(after["cls.predictions.bias"][:kept]
                                              - before["cls.predictions.bias"][:kept]).max()),
        f"{tag}_loss": loss,
        f"{tag}_tp1_loss": tp1_loss(after, vocab),
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    topo = init_distributed(tensor_parallel_degree=2, seed=SEED)
    paddle.seed(SEED)
    model = MegatronBertForPreTraining(MegatronBertConfig(**TINY, tensor_parallel_degree=2))
    with paddle.no_grad():  # a non-zero LM bias, so keeping its rows is a real check
        model.cls.predictions.bias.set_value(paddle.full(model.cls.predictions.bias.shape, 0.25) +
                                             0.01 * topo.tp_rank)
    original = full(model, topo)
    result = {"tp_rank": topo.tp_rank}
    result["attention_probs_diff"], result["attention_heads"] = attention_probabilities_vs_tp1(model, topo)
    model.resize_token_embeddings(UP)
    result.update(check(model, topo, original, UP, "up"))
    model.resize_token_embeddings(DOWN)
    result.update(check(model, topo, original, DOWN, "down"))

    saved = os.path.join(args.out, "resized")
    model.save_pretrained(saved)  # merged: rank 0 writes; every rank returns when it is complete
    reloaded = MegatronBertForPreTraining.from_pretrained(saved)
    reloaded.eval()
    result["reloaded_vocab"] = reloaded.config.vocab_size
    result["reloaded_loss"] = float(reloaded(**batch(), return_dict=True).loss)
    with single_process_view():
        tp1 = MegatronBertForPreTraining.from_pretrained(saved, tensor_parallel_degree=1)
        tp1.eval()
        result["reloaded_tp1_loss"] = float(tp1(**batch(), return_dict=True).loss)
    with open(os.path.join(args.out, f"resize.rank{topo.rank}.json"), "w") as f:
        json.dump(result, f, indent=1, sort_keys=True)


if __name__ == "__main__":
    main()
