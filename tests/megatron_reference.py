"""Test helpers: synthetic Megatron-LM BERT checkpoints and Megatron's forward in numpy.

The forward is written from Megatron-LM's BERT (pre-LN layers, fused QKV, tensor-parallel ranks each
computing their heads and MLP slice, row-parallel outputs summed, vocab-parallel embedding and logits) and
reads the tensors exactly as a checkpoint stores them, per rank: it shares no code with the converter, so
the two agreeing means the converter decoded the layouts and merged the shards right.
"""

from __future__ import annotations

import argparse
import math
import os
from typing import Dict, List, Optional

import numpy as np

HEAD_DIM = 8


def megatron_args(hidden=32, heads=4, layers=2, ffn=48, vocab=128, positions=40, tp=1, **extra) -> argparse.Namespace:
    """The ``args`` a Megatron-LM run stores (the fields the converter reads, and some it ignores)."""
    values = dict(hidden_size=hidden, num_attention_heads=heads, num_layers=layers, ffn_hidden_size=ffn,
                  padded_vocab_size=vocab, max_position_embeddings=positions, tensor_model_parallel_size=tp,
                  pipeline_model_parallel_size=1, layernorm_epsilon=1e-5, hidden_dropout=0.1, attention_dropout=0.1,
                  init_method_std=0.02, tokenizer_type="BertWordPieceLowerCase", bias_gelu_fusion=False,
                  openai_gelu=False, onnx_safe=None, fp16=True, lr=1e-4, seed=1234, micro_batch_size=4)
    values.update(extra)
    return argparse.Namespace(**values)


def random_shards(rng: np.random.RandomState, hidden=32, heads=4, layers=2, ffn=48, vocab=128, positions=40,
                  token_types=2, tp=1) -> List[Dict[str, np.ndarray]]:
    """Per-rank tensors with Megatron's roles and torch layouts (Linear weight ``[out, in]``): split tensors
    differ per rank, replicated ones are equal. Keys are role names, see :func:`megatron_model_dict`."""
    def rand(*shape, scale=0.2):
        return (rng.randn(*shape) * scale).astype(np.float32)

    def ln():
        return (1.0 + rand(hidden, scale=0.1)), rand(hidden, scale=0.1)

    replicated = {"position_embeddings": rand(positions, hidden), "token_type_embeddings": rand(token_types, hidden),
                  "final_ln.weight": None, "final_ln.bias": None, "pooler.weight": rand(hidden, hidden),
                  "pooler.bias": rand(hidden), "lm_dense.weight": rand(hidden, hidden), "lm_dense.bias": rand(hidden),
                  "binary_head.weight": rand(2, hidden), "binary_head.bias": rand(2)}
    replicated["final_ln.weight"], replicated["final_ln.bias"] = ln()
    replicated["lm_ln.weight"], replicated["lm_ln.bias"] = ln()
    for i in range(layers):
        replicated[f"{i}.attention_ln.weight"], replicated[f"{i}.attention_ln.bias"] = ln()
        replicated[f"{i}.mlp_ln.weight"], replicated[f"{i}.mlp_ln.bias"] = ln()
        replicated[f"{i}.attention_dense.bias"] = rand(hidden)
        replicated[f"{i}.fc2.bias"] = rand(hidden)
    shards = []
    for _ in range(tp):
        shard = dict(replicated)
        shard["word_embeddings"] = rand(vocab // tp, hidden)
        shard["lm_bias"] = rand(vocab // tp)
        for i in range(layers):
            shard[f"{i}.qkv.weight"] = rand(3 * hidden // tp, hidden)
            shard[f"{i}.qkv.bias"] = rand(3 * hidden // tp)
            shard[f"{i}.attention_dense.weight"] = rand(hidden, hidden // tp)
            shard[f"{i}.fc1.weight"] = rand(ffn // tp, hidden)
            shard[f"{i}.fc1.bias"] = rand(ffn // tp)
            shard[f"{i}.fc2.weight"] = rand(hidden, ffn // tp)
        shards.append(shard)
    return shards


def megatron_model_dict(shard: Dict[str, np.ndarray], new_names, t):
    """One rank's ``model`` entry, nested as Megatron-LM saves it: old names say ``transformer`` and
    ``attention``, newer ones (``new_names``) ``encoder`` and ``self_attention``, and since 2024
    (``new_names="norm"``) also ``input_norm``/``post_attention_norm``/``final_norm``. ``t`` makes each
    stored tensor."""
    ln = "norm" if new_names == "norm" else "layernorm"
    attention = "self_attention" if new_names else "attention"
    def put(tree, name, role):  # a role the test removed is simply not saved
        if role in shard:
            tree[name] = t(shard[role])
        return tree

    stack = {}
    layers = sorted({int(k.split(".")[0]) for k in shard if k[0].isdigit()})
    for i in layers:
        for role, name in (("attention_ln", f"input_{ln}"), ("qkv", f"{attention}.query_key_value"),
                           ("attention_dense", f"{attention}.dense"), ("mlp_ln", f"post_attention_{ln}"),
                           ("fc1", "mlp.dense_h_to_4h"), ("fc2", "mlp.dense_4h_to_h")):
            for param in ("weight", "bias"):
                put(stack, f"layers.{i}.{name}.{param}", f"{i}.{role}.{param}")
    put(stack, f"final_{ln}.weight", "final_ln.weight")
    put(stack, f"final_{ln}.bias", "final_ln.bias")
    embedding = {"word_embeddings": put({}, "weight", "word_embeddings"),
                 "position_embeddings": put({}, "weight", "position_embeddings")}
    if "token_type_embeddings" in shard:
        embedding["tokentype_embeddings"] = put({}, "weight", "token_type_embeddings")
    pooler = put(put({}, "dense.weight", "pooler.weight"), "dense.bias", "pooler.bias")
    lm_head = {}
    for name, role in (("dense.weight", "lm_dense.weight"), ("dense.bias", "lm_dense.bias"),
                       ("layernorm.weight", "lm_ln.weight"), ("layernorm.bias", "lm_ln.bias"), ("bias", "lm_bias")):
        put(lm_head, name, role)
    return {
        "language_model": {"embedding": embedding, "encoder" if new_names else "transformer": stack, "pooler": pooler},
        "lm_head": lm_head,
        "binary_head": put(put({}, "weight", "binary_head.weight"), "bias", "binary_head.bias"),
    }


def save_megatron_checkpoint(directory: str, shards, checkpoint_version: Optional[float], new_names: bool,
                             args: Optional[argparse.Namespace], iteration: str = "release",
                             legacy_format: bool = False) -> str:
    """Write ``directory/{release|iter_XXXXXXX}/mp_rank_XX/model_optim_rng.pt`` as Megatron-LM does, with
    optimizer and RNG state beside the model, and ``latest_checkpointed_iteration.txt``. ``legacy_format``
    uses torch's pre-1.6 serialization (not a zip; what 2019-2020 checkpoints such as NGC's are)."""
    import torch

    sub = "release" if iteration == "release" else f"iter_{int(iteration):07d}"
    for rank, shard in enumerate(shards):
        to_tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
        state = {"model": megatron_model_dict(shard, new_names, to_tensor),
                 "iteration": 0 if iteration == "release" else int(iteration),
                 "optimizer": {"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 1e-4}]},
                 "rng_state": [{"random_rng_state": (3, (1, 2), None),
                                "np_rng_state": np.random.RandomState(0).get_state(),
                                "torch_rng_state": torch.get_rng_state()}]}
        if checkpoint_version is not None:
            state["checkpoint_version"] = checkpoint_version
        if args is not None:
            state["args"] = args
        path = os.path.join(directory, sub, f"mp_rank_{rank:02d}", "model_optim_rng.pt")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save(state, path, _use_new_zipfile_serialization=not legacy_format)
    with open(os.path.join(directory, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write(str(iteration))
    return directory


# ---- Megatron's forward ----------------------------------------------------------------------------
def layer_norm(x, weight, bias, eps=1e-5):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


_erf = np.vectorize(math.erf)  # the test arrays are small; no scipy needed


def gelu_erf(x):
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def gelu_tanh(x):  # Megatron's fused bias_gelu and openai_gelu
    return 0.5 * x * (1.0 + np.tanh(0.79788456 * x * (1.0 + 0.044715 * x * x)))


def _split_heads(mixed, version, heads, head_dim):
    """Megatron's attention on one rank: the projection output (B, S, 3 * heads * head_dim) -> q, k, v
    (B, heads, S, head_dim), read in the order each checkpoint_version's forward used."""
    batch, seq = mixed.shape[:2]
    if version < 1:  # the output is [q | k | v], each [heads, head_dim]
        grouped = mixed.reshape(batch, seq, 3, heads, head_dim).transpose(2, 0, 3, 1, 4)
    elif version < 2:  # [heads, head_dim, 3]
        grouped = mixed.reshape(batch, seq, heads, head_dim, 3).transpose(4, 0, 2, 1, 3)
    else:  # [heads, 3, head_dim]: Megatron-LM since 2.0 splits the last dim of each head's 3*head_dim
        grouped = mixed.reshape(batch, seq, heads, 3, head_dim).transpose(3, 0, 2, 1, 4)
    return grouped[0], grouped[1], grouped[2]


def megatron_forward(shards: List[Dict[str, np.ndarray]], version: float, heads: int, input_ids, token_type_ids,
                     attention_mask, mlp_gelu=gelu_erf, head_gelu=gelu_erf, eps=1e-5):
    """(MLM logits (B, S, V), NSP logits (B, 2)) computed rank by rank from the checkpoint's tensors."""
    tp = len(shards)
    x0 = shards[0]
    hidden = x0["position_embeddings"].shape[1]
    head_dim = hidden // heads
    batch, seq = input_ids.shape
    # vocab-parallel embedding: each rank looks up the ids in its slice, zeros elsewhere, then all-reduce
    rows = x0["word_embeddings"].shape[0]
    h = np.zeros((batch, seq, hidden), np.float64)
    for rank, shard in enumerate(shards):
        local = input_ids - rank * rows
        inside = (local >= 0) & (local < rows)
        h += np.where(inside[..., None], shard["word_embeddings"][np.clip(local, 0, rows - 1)], 0.0)
    h = h + x0["position_embeddings"][np.arange(seq)][None]
    if "token_type_embeddings" in x0:
        h = h + x0["token_type_embeddings"][token_type_ids]
    additive = (1.0 - attention_mask[:, None, None, :]) * -10000.0
    layers = sorted({int(k.split(".")[0]) for k in x0 if k[0].isdigit()})
    for i in layers:
        normed = layer_norm(h, x0[f"{i}.attention_ln.weight"], x0[f"{i}.attention_ln.bias"], eps)
        attention_out = x0[f"{i}.attention_dense.bias"].astype(np.float64)
        for shard in shards:  # each rank: its heads, then its slice of the row-parallel output, summed
            mixed = normed @ shard[f"{i}.qkv.weight"].T + shard[f"{i}.qkv.bias"]
            q, k, v = _split_heads(mixed, version, heads // tp, head_dim)
            scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(head_dim) + additive
            probs = np.exp(scores - scores.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            context = (probs @ v).transpose(0, 2, 1, 3).reshape(batch, seq, -1)
            attention_out = attention_out + context @ shard[f"{i}.attention_dense.weight"].T
        h = h + attention_out
        normed = layer_norm(h, x0[f"{i}.mlp_ln.weight"], x0[f"{i}.mlp_ln.bias"], eps)
        mlp_out = x0[f"{i}.fc2.bias"].astype(np.float64)
        for shard in shards:
            inner = mlp_gelu(normed @ shard[f"{i}.fc1.weight"].T + shard[f"{i}.fc1.bias"])
            mlp_out = mlp_out + inner @ shard[f"{i}.fc2.weight"].T
        h = h + mlp_out
    h = layer_norm(h, x0["final_ln.weight"], x0["final_ln.bias"], eps)
    pooled = np.tanh(h[:, 0] @ x0["pooler.weight"].T + x0["pooler.bias"])
    nsp = pooled @ x0["binary_head.weight"].T + x0["binary_head.bias"]
    lm = head_gelu(h @ x0["lm_dense.weight"].T + x0["lm_dense.bias"])
    lm = layer_norm(lm, x0["lm_ln.weight"], x0["lm_ln.bias"], eps)
    logits = np.concatenate([lm @ s["word_embeddings"].T + s["lm_bias"] for s in shards], axis=-1)
    return logits, nsp


def shards_from_checkpoint(directory: str) -> List[Dict[str, np.ndarray]]:
    """The per-rank role dicts of a legacy-layout checkpoint on disk (newest names: ``encoder``,
    ``self_attention``), read back with torch: the inverse of :func:`megatron_model_dict`."""
    import torch

    sub = os.path.join(directory, "release")
    shards = []
    for rank_dir in sorted(os.listdir(sub)):
        model = torch.load(os.path.join(sub, rank_dir, "model_optim_rng.pt"), weights_only=False)["model"]
        lm, head, n = model["language_model"], model["lm_head"], lambda t: t.float().numpy()  # noqa: E731
        shard = {"word_embeddings": n(lm["embedding"]["word_embeddings"]["weight"]),
                 "position_embeddings": n(lm["embedding"]["position_embeddings"]["weight"]),
                 "token_type_embeddings": n(lm["embedding"]["tokentype_embeddings"]["weight"]),
                 "lm_bias": n(head["bias"])}
        for p in ("weight", "bias"):
            shard[f"pooler.{p}"] = n(lm["pooler"][f"dense.{p}"])
            shard[f"lm_dense.{p}"] = n(head[f"dense.{p}"])
            shard[f"lm_ln.{p}"] = n(head[f"layernorm.{p}"])
            shard[f"binary_head.{p}"] = n(model["binary_head"][p])
        roles = {"input_layernorm": "attention_ln", "self_attention.query_key_value": "qkv",
                 "self_attention.dense": "attention_dense", "post_attention_layernorm": "mlp_ln",
                 "mlp.dense_h_to_4h": "fc1", "mlp.dense_4h_to_h": "fc2"}
        for key, value in lm["encoder"].items():
            if key.startswith("final_layernorm."):
                shard["final_ln." + key.split(".")[-1]] = n(value)
                continue
            _, i, rest = key.split(".", 2)
            op, param = rest.rsplit(".", 1)
            shard[f"{i}.{roles[op]}.{param}"] = n(value)
        shards.append(shard)
    return shards
