"""MegatronBERT in Paddle: the pre-LayerNorm BERT of the Megatron-LM paper, and its task heads.

Differences from BERT (the Megatron layout, HF's ``modeling_megatron_bert`` has the same):
no LayerNorm on the embeddings; each layer is ``h = h + Attn(LN(h)); h = h + MLP(LN(h))``; one final
LayerNorm after the last layer. Parameter names follow HF's ``MegatronBert*`` (with Paddle's ``[in, out]``
Linear layout), so an HF checkpoint maps by transposing the Linear weights.

Parallelism is a property of the layers (``parallel.py``): the code below is the same at any
tensor-parallel degree. The math of each operation lives in ``ops.py``.
"""

from __future__ import annotations

import functools
import re
from collections import OrderedDict
from typing import Dict, Optional

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from . import ops, tp_plan
from .checkpoint import pretrained as checkpoint_io
from .configuration import (
    PRETRAINED_INIT_CONFIGURATION,
    PRETRAINED_RESOURCE_FILES_MAP,
    MegatronBertConfig,
)
from .parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    copy_to_tensor_parallel_region,
    gather_from_tensor_parallel_region,
    gather_full_array,
    gather_vocab_logits,
    get_tensor_parallel_rank,
    tensor_parallel_rng,
    vocab_parallel_cross_entropy,
)

MASK_VALUE = -1e4  # Megatron's additive mask value: exp() underflows to 0 in fp32 and fits in fp16


class ModelOutput(OrderedDict):
    """HF-style output: fields by attribute, by key, or by position (``None`` fields are left out)."""

    def __init__(self, **fields):
        super().__init__((k, v) for k, v in fields.items() if v is not None)

    def __getattr__(self, name):
        if name in self:
            return self[name]
        if name.startswith("_"):
            raise AttributeError(name)
        return None

    def __getitem__(self, key):
        if isinstance(key, (int, slice)):
            return self.to_tuple()[key]
        return super().__getitem__(key)

    def to_tuple(self):
        return tuple(self.values())


def _as_output(return_dict: bool, **fields):
    out = ModelOutput(**fields)
    if return_dict:
        return out
    values = out.to_tuple()
    return values[0] if len(values) == 1 else values


def _layer_norm(config):
    return nn.LayerNorm(config.hidden_size, epsilon=config.layer_norm_eps)


# ---- embeddings -----------------------------------------------------------------------------------
class MegatronBertEmbeddings(nn.Layer):
    """Word + position + token-type embeddings, then dropout. No LayerNorm (it moved into the layers)."""

    def __init__(self, config: MegatronBertConfig):
        super().__init__()
        self.config = config
        tp = config.tensor_parallel_degree
        self.word_embeddings = VocabParallelEmbedding(config.vocab_size, config.hidden_size, degree=tp)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids=None, token_type_ids=None, position_ids=None, inputs_embeds=None):
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)  # (B, S, H)
        batch, seq_len = inputs_embeds.shape[0], inputs_embeds.shape[1]
        if position_ids is None:
            position_ids = paddle.arange(seq_len, dtype="int64").unsqueeze(0)
        if token_type_ids is None:
            token_type_ids = paddle.zeros([batch, seq_len], dtype="int64")
        embeddings = (
            inputs_embeds + self.position_embeddings(position_ids) + self.token_type_embeddings(token_type_ids)
        )  # (B, S, H)
        return self.dropout(embeddings)


# ---- transformer layer ----------------------------------------------------------------------------
class MegatronBertSelfAttention(nn.Layer):
    """Q, K, V projections (column-parallel: each rank holds whole heads) and the attention itself."""

    def __init__(self, config: MegatronBertConfig):
        super().__init__()
        tp = config.tensor_parallel_degree
        hidden = config.hidden_size
        self.num_heads = config.num_attention_heads // tp  # heads on this rank
        self.head_dim = config.head_dim
        # Q, K, V share one copy-to-region so their input gradient is all-reduced once (Megatron's fused QKV).
        self.query = ColumnParallelLinear(hidden, hidden, degree=tp, reduce_input_grad=False)
        self.key = ColumnParallelLinear(hidden, hidden, degree=tp, reduce_input_grad=False)
        self.value = ColumnParallelLinear(hidden, hidden, degree=tp, reduce_input_grad=False)
        self.dropout_p = config.attention_probs_dropout_prob
        self.degree = tp

    def forward(self, hidden_states, additive_mask, output_attentions=False):
        """(B, S, nh * hd) context, and the attention probabilities (B, heads, S, S) of every head (all
        ranks' heads gathered at TP>1) when ``output_attentions``, else None."""
        hidden_states = copy_to_tensor_parallel_region(hidden_states)
        query = ops.linear_split_heads(self.query, hidden_states, self.num_heads)  # (B, nh, S, hd)
        key = ops.linear_split_heads(self.key, hidden_states, self.num_heads)
        value = ops.linear_split_heads(self.value, hidden_states, self.num_heads)
        with tensor_parallel_rng():
            if output_attentions:
                context, probs = ops.attention(query, key, value, additive_mask, self.dropout_p, self.training,
                                               return_probs=True)
            else:
                context, probs = ops.attention(query, key, value, additive_mask, self.dropout_p, self.training), None
        if probs is not None and self.degree > 1:  # heads are split over ranks: gather them on the head axis
            probs = gather_from_tensor_parallel_region(probs.transpose([0, 2, 3, 1])).transpose([0, 3, 1, 2])
        return ops.merge_heads(context), probs  # (B, S, nh * hd)


class MegatronBertSelfOutput(nn.Layer):
    """Attention output projection (row-parallel), dropout, residual add."""

    def __init__(self, config: MegatronBertConfig):
        super().__init__()
        self.dense = RowParallelLinear(config.hidden_size, config.hidden_size, degree=config.tensor_parallel_degree)
        self.dropout_p = config.hidden_dropout_prob

    def forward(self, hidden_states, residual):
        return ops.linear_dropout_add(self.dense, hidden_states, residual, self.dropout_p, self.training)


class MegatronBertAttention(nn.Layer):
    """Based on BertAttention; the LayerNorm moved before the attention (pre-LN)."""

    def __init__(self, config: MegatronBertConfig):
        super().__init__()
        self.ln = _layer_norm(config)
        self.self = MegatronBertSelfAttention(config)
        self.output = MegatronBertSelfOutput(config)
        self.eps = config.layer_norm_eps

    def forward(self, hidden_states, additive_mask, output_attentions=False):
        normed = ops.layer_norm(hidden_states, self.ln.weight, self.ln.bias, self.eps)
        context, probs = self.self(normed, additive_mask, output_attentions)
        return self.output(context, hidden_states), probs


class MegatronBertIntermediate(nn.Layer):
    """h -> 4h (column-parallel) and the activation."""

    def __init__(self, config: MegatronBertConfig):
        super().__init__()
        self.dense = ColumnParallelLinear(
            config.hidden_size, config.intermediate_size, degree=config.tensor_parallel_degree
        )
        self.act = config.hidden_act

    def forward(self, hidden_states):
        return ops.linear_activation(self.dense, hidden_states, self.act)


class MegatronBertOutput(nn.Layer):
    """4h -> h (row-parallel), dropout, residual add."""

    def __init__(self, config: MegatronBertConfig):
        super().__init__()
        self.dense = RowParallelLinear(
            config.intermediate_size, config.hidden_size, degree=config.tensor_parallel_degree
        )
        self.dropout_p = config.hidden_dropout_prob

    def forward(self, hidden_states, residual):
        return ops.linear_dropout_add(self.dense, hidden_states, residual, self.dropout_p, self.training)


class MegatronBertLayer(nn.Layer):
    """``h = h + Attn(LN(h)); h = h + MLP(LN(h))``."""

    def __init__(self, config: MegatronBertConfig):
        super().__init__()
        self.attention = MegatronBertAttention(config)
        self.ln = _layer_norm(config)
        self.intermediate = MegatronBertIntermediate(config)
        self.output = MegatronBertOutput(config)
        self.eps = config.layer_norm_eps

    def forward(self, hidden_states, additive_mask, output_attentions=False):
        """The new hidden states, and the attention probabilities (None unless ``output_attentions``)."""
        attention_output, probs = self.attention(hidden_states, additive_mask, output_attentions)
        normed = ops.layer_norm(attention_output, self.ln.weight, self.ln.bias, self.eps)
        return self.output(self.intermediate(normed), attention_output), probs


def _hidden_states_of(layer, hidden_states, additive_mask):
    return layer(hidden_states, additive_mask)[0]


class MegatronBertEncoder(nn.Layer):
    def __init__(self, config: MegatronBertConfig):
        super().__init__()
        self.config = config
        self.layer = nn.LayerList([MegatronBertLayer(config) for _ in range(config.num_hidden_layers)])
        self.ln = _layer_norm(config)  # the final LayerNorm of the pre-LN stack

    def forward(self, hidden_states, additive_mask, output_hidden_states=False, output_attentions=False):
        """The final hidden states, the input of every layer plus the output (or None), and every layer's
        attention probabilities (or None)."""
        all_hidden_states = [] if output_hidden_states else None
        all_attentions = [] if output_attentions else None
        # Recompute re-runs each layer in the backward pass; probabilities asked for are kept instead.
        recompute = self.config.recompute and self.training and not output_attentions
        for layer in self.layer:
            if output_hidden_states:
                all_hidden_states.append(hidden_states)
            if recompute:
                from paddle.distributed.fleet.utils import recompute as recompute_fn

                # recompute's backward wants tensor outputs only: the hidden states, not (states, None)
                hidden_states = recompute_fn(functools.partial(_hidden_states_of, layer), hidden_states, additive_mask)
            else:
                hidden_states, probs = layer(hidden_states, additive_mask, output_attentions)
                if output_attentions:
                    all_attentions.append(probs)
        hidden_states = ops.layer_norm(hidden_states, self.ln.weight, self.ln.bias, self.config.layer_norm_eps)
        if output_hidden_states:
            all_hidden_states.append(hidden_states)
        return hidden_states, all_hidden_states, all_attentions


class MegatronBertPooler(nn.Layer):
    """Dense + tanh on the first token ([CLS])."""

    def __init__(self, config: MegatronBertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden_states):
        return paddle.tanh(self.dense(hidden_states[:, 0]))


# ---- base class: init, loading, saving -------------------------------------------------------------
# How tensor parallelism splits each parameter lives in tp_plan (one table for init, load, save, converters).


class MegatronBertPretrainedModel(nn.Layer):
    """Loading, saving and initialisation shared by the model and its heads (PaddleNLP's conventions:
    ``config.json`` + ``model_state.pdparams``; registered names resolve offline to their config).

    Written here rather than inherited from PaddleNLP's ``PretrainedModel``: that one downloads even the
    config of a registered name, and cannot reshard a checkpoint between tensor-parallel degrees on CPU.
    """

    config_class = MegatronBertConfig
    base_model_prefix = "bert"
    pretrained_init_configuration = PRETRAINED_INIT_CONFIGURATION
    pretrained_resource_files_map = PRETRAINED_RESOURCE_FILES_MAP

    def __init__(self, config: MegatronBertConfig):
        super().__init__()
        if not isinstance(config, MegatronBertConfig):
            raise TypeError(f"expected a MegatronBertConfig, got {type(config).__name__}")
        self.config = config
        # Which implementation each op runs (one process-wide switch, ops.use_fast_kernels). Building a model
        # changes no other process setting: ops.apply_cpu_process_settings runs at the first fast CPU kernel.
        ops.use_fast_kernels(config.use_fast_kernels)
        # init_weights draws from the generator as it stands here, before the layers' default initialisers
        # consume it by amounts that depend on their (TP-sharded) shapes.
        self._init_rng_state = paddle.get_rng_state()

    # ---- the embeddings, as HF's and PaddleNLP's base classes expose them --------------------------
    @property
    def base_model(self) -> "MegatronBertModel":
        """The encoder (``self.bert`` in a head, the model itself otherwise)."""
        return getattr(self, self.base_model_prefix, self)

    def get_input_embeddings(self) -> VocabParallelEmbedding:
        """The word-embedding layer (``weight`` is this rank's vocab slice at TP>1)."""
        return self.base_model.embeddings.word_embeddings

    def set_input_embeddings(self, value: VocabParallelEmbedding) -> None:
        """Replace the word-embedding layer; a tied LM decoder follows it."""
        self.base_model.embeddings.word_embeddings = value
        for head in self._lm_prediction_heads():
            if head.tied:
                head._word_embeddings = [value]

    def get_output_embeddings(self):
        """The LM prediction head (``.decoder`` the ``[vocab, hidden]`` matrix, the word embedding's own
        weight when tied; ``.bias`` its bias), or None for heads without a language-model output."""
        heads = self._lm_prediction_heads()
        return heads[0] if heads else None

    def _lm_prediction_heads(self):
        return [layer for layer in self.sublayers() if isinstance(layer, MegatronBertLMPredictionHead)]

    def resize_token_embeddings(self, new_num_tokens: Optional[int] = None,
                                pad_to_multiple_of: Optional[int] = None) -> VocabParallelEmbedding:
        """Resize the vocabulary to ``new_num_tokens`` rows (default: the current size), rounded up to a
        multiple of ``pad_to_multiple_of`` when given (HF's semantics): the first
        ``min(old, new)`` rows of the word embedding, of an untied decoder and of the LM bias are kept,
        new rows are drawn as at initialisation (weights normal(0, initializer_range), bias 0), and
        ``config.vocab_size`` follows. At TP>1 every rank of the group must call it (the old rows are
        gathered, then each rank keeps its new slice). Build the optimizer after resizing: it holds the
        old parameters. Returns the new word-embedding layer."""
        old = self.get_input_embeddings()
        new_num_tokens = self.config.vocab_size if new_num_tokens is None else new_num_tokens
        if isinstance(new_num_tokens, bool) or not isinstance(new_num_tokens, int) or new_num_tokens < 1:
            raise ValueError(f"new_num_tokens must be a positive integer, got {new_num_tokens!r}")
        if pad_to_multiple_of is not None:
            if (isinstance(pad_to_multiple_of, bool) or not isinstance(pad_to_multiple_of, int)
                    or pad_to_multiple_of < 1):
                raise ValueError(f"pad_to_multiple_of must be a positive integer, got {pad_to_multiple_of!r}")
            new_num_tokens = -(-new_num_tokens // pad_to_multiple_of) * pad_to_multiple_of
        if new_num_tokens == self.config.vocab_size:
            return old
        degree = self.config.tensor_parallel_degree
        rank = get_tensor_parallel_rank() if degree > 1 else 0
        old_vocab, kept = self.config.vocab_size, min(self.config.vocab_size, new_num_tokens)

        def resized(param, fill):
            """The full [new_num_tokens, ...] array: the kept rows of ``param``, then ``fill`` rows."""
            full = gather_full_array(param, tp_plan.VOCAB, old_vocab) if degree > 1 else param.numpy()
            shape = [new_num_tokens] + list(full.shape[1:])
            new = (paddle.normal(0.0, self.config.initializer_range, shape).numpy() if fill == "normal"
                   else np.zeros(shape, dtype=full.dtype))
            new[:kept] = full[:kept]
            return tp_plan.shard(new, tp_plan.VOCAB, degree, rank)

        def new_parameter(layer, param, value, is_bias=False):
            fresh = layer.create_parameter(list(value.shape), dtype=param.dtype, is_bias=is_bias)
            fresh.set_value(value.astype(param.numpy().dtype))
            fresh.is_distributed = degree > 1
            return fresh

        embedding = VocabParallelEmbedding(new_num_tokens, old.weight.shape[1], degree=degree)
        embedding.weight = new_parameter(embedding, old.weight, resized(old.weight, "normal"))
        for head in self._lm_prediction_heads():
            head.bias = new_parameter(head, head.bias, resized(head.bias, "zeros"), is_bias=True)
            if not head.tied:
                head.decoder_weight = new_parameter(head, head.decoder_weight,
                                                    resized(head.decoder_weight, "normal"))
        self.config.vocab_size = new_num_tokens
        self.set_input_embeddings(embedding)
        return embedding

    # Each rank draws the full tensor with the shared generator and keeps its shard, so a TP=N shard is
    # exactly the slice of the TP=1 weight under the same seed.
    def init_weights(self):
        config = self.config
        degree = config.tensor_parallel_degree
        rank = get_tensor_parallel_rank() if degree > 1 else 0
        paddle.set_rng_state(self._init_rng_state)
        with paddle.no_grad():
            for name, param in self.named_parameters():
                kind = tp_plan.split_kind(name)
                full_shape = tp_plan.full_shape(kind, param.shape, degree, config.vocab_size)
                if name.endswith("bias") or name.endswith("ln.bias") or "LayerNorm.bias" in name:
                    full = np.zeros(full_shape, dtype="float32")
                elif self._is_layer_norm_weight(name):
                    full = np.ones(full_shape, dtype="float32")
                else:
                    full = paddle.normal(0.0, config.initializer_range, full_shape).numpy()
                    if name.endswith("embeddings.word_embeddings.weight") and config.pad_token_id is not None:
                        if 0 <= config.pad_token_id < full_shape[0]:
                            full[config.pad_token_id] = 0.0
                param.set_value(tp_plan.shard(full, kind, degree, rank).astype(param.numpy().dtype))
                # The plan marks the shards: global-norm clipping and the replicated-parameter broadcasts
                # count a parameter flagged is_distributed once per TP rank (the untied decoder included).
                param.is_distributed = degree > 1 and kind is not None

    @staticmethod
    def _is_layer_norm_weight(name):
        return bool(re.search(r"(\.ln|LayerNorm)\.weight$", name))

    # ---- state dicts ----------------------------------------------------------------------------
    def full_state_dict(self) -> Dict[str, np.ndarray]:
        """This rank's parameters as numpy arrays (full tensors at TP=1; shards otherwise)."""
        return {name: value.numpy() for name, value in self.state_dict().items()}

    def load_full_state_dict(self, state: Dict[str, np.ndarray], strict: bool = True, source: str = "state dict"):
        """Load full (unsharded) tensors, slicing this rank's shard; shapes are checked first."""
        from .convert.paddlenlp import maybe_from_paddlenlp_names

        state = maybe_from_paddlenlp_names(state, self)
        degree = self.config.tensor_parallel_degree
        rank = get_tensor_parallel_rank() if degree > 1 else 0
        own = self.state_dict()
        state = _match_base_model_prefix(state, own, self.base_model_prefix + ".")
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        if strict and missing:
            raise KeyError(f"{source} lacks {len(missing)} parameters of {type(self).__name__}: {missing[:8]}")
        for name, param in own.items():
            if name not in state:
                continue
            value = np.asarray(state[name])
            kind = tp_plan.split_kind(name)
            expected = tp_plan.full_shape(kind, param.shape, degree, self.config.vocab_size)
            if list(value.shape) != list(expected):
                raise ValueError(
                    f"shape mismatch in {source}: parameter {name} has shape {list(value.shape)} in the "
                    f"checkpoint but {list(expected)} in the model built from the config"
                )
            # one parameter at a time (the state may be lazy): the model is the only full copy in memory
            param.set_value(tp_plan.shard(value, kind, degree, rank).astype(param.numpy().dtype, copy=False))
            del value
        return missing, unexpected

    # ---- from_pretrained / save_pretrained: the files are checkpoint/pretrained.py's -----------------
    @classmethod
    def from_pretrained(cls, name_or_path: str, config: Optional[MegatronBertConfig] = None, **config_overrides):
        """Build from a registered name (config offline; weights from ``MEGATRONBERT_WEIGHTS_DIR`` or a
        download) or from a directory with ``config.json`` and ``model.safetensors`` (or an HF-style
        ``model.safetensors.index.json``, ``model_state.pdparams`` -- ours or PaddleNLP's, read without
        running code -- or per-rank ``model.tp{NN}.safetensors`` shards, merged and re-split for the
        current TP degree).

        Keyword arguments override config fields (``num_labels=3``, ``tensor_parallel_degree=2`` ...).
        A transformers (PyTorch) directory is detected and converted on load; ``convert_from_torch=True``
        asks for that conversion explicitly (also for Megatron-LM checkpoints).
        """
        return checkpoint_io.from_pretrained(cls, name_or_path, config, **config_overrides)

    def save_pretrained(self, save_directory: str, merge_tensor_parallel: bool = True,
                        safe_serialization: bool = True):
        """Write ``config.json`` and the weights: ``model.safetensors`` (``safe_serialization=False``:
        ``model_state.pdparams``, for tools that want Paddle's pickle).

        At TP>1, ``merge_tensor_parallel=True`` gathers every shard and rank 0 writes one full file;
        ``False`` makes each rank write ``model.tp{rank:02d}.safetensors`` (``model_state.tp{rank:02d}.pdparams``).
        At TP>1 every rank of the TP group must call it; it returns when the files are complete. Only the
        first data-parallel replica writes. Files are written under a temporary name and renamed, so a
        crash leaves no half-written file.
        """
        checkpoint_io.save_pretrained(self, save_directory, merge_tensor_parallel, safe_serialization)

    def gather_full_state_dict(self) -> Dict[str, np.ndarray]:
        """Every parameter as its full tensor, gathered from the tensor-parallel ranks."""
        return checkpoint_io.gather_full_state_dict(self)


def _match_base_model_prefix(state, own, prefix: str):
    """A head's checkpoint (``bert.*``) loaded into the bare model drops the prefix; a bare model's
    checkpoint loaded into a head gains it (as HF and PaddleNLP do)."""
    model_has = any(k.startswith(prefix) for k in own)
    state_has = any(k.startswith(prefix) for k in state)
    if state_has and not model_has:
        return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if model_has and not state_has:
        return {(prefix + k if k.startswith(("embeddings.", "encoder.", "pooler.")) else k): v for k, v in state.items()}
    return state


# ---- the base model -------------------------------------------------------------------------------
def build_additive_mask(attention_mask, input_shape, dtype, causal: bool = False):
    """An additive mask broadcastable to (B, nh, S, S): 0 where attending, MASK_VALUE elsewhere.

    ``attention_mask`` may be 2-D (B, S) or 3-D (B, S, S) with 1 = attend / 0 = masked (any dtype) or additive
    (a float mask with negative entries), or 4-D additive (HF's extended mask, PaddleNLP's convention).
    ``None`` attends everywhere.
    """
    batch, seq = input_shape
    additive = None
    if attention_mask is not None:
        if attention_mask.ndim == 4:
            additive = attention_mask.astype(dtype)
        elif attention_mask.ndim in (2, 3):
            mask = attention_mask.astype(dtype)
            mask = mask.unsqueeze([1, 2]) if attention_mask.ndim == 2 else mask.unsqueeze(1)
            # A float mask with negative entries is already additive (0 / -inf style); else 1 = attend.
            already_additive = attention_mask.dtype in (paddle.float16, paddle.bfloat16, paddle.float32,
                                                        paddle.float64) and bool((attention_mask < 0).any())
            additive = mask if already_additive else (1.0 - mask) * MASK_VALUE
        else:
            raise ValueError(f"attention_mask must be 2-D, 3-D or 4-D, got shape {attention_mask.shape}")
    if causal:
        lower = paddle.tril(paddle.ones([seq, seq], dtype=dtype))
        causal_mask = ((1.0 - lower) * MASK_VALUE).unsqueeze([0, 1])
        additive = causal_mask if additive is None else additive + causal_mask
    return additive


class MegatronBertModel(MegatronBertPretrainedModel):
    """The MegatronBERT encoder: embeddings, pre-LN transformer layers, final LayerNorm, pooler.

    Args:
        config: the model configuration.
        add_pooling_layer: build the [CLS] pooler (heads that do not use it leave it out).

    Forward args: ``input_ids`` (B, S) or ``inputs_embeds`` (B, S, H) (exactly one); ``attention_mask``
    (2-D/3-D 0/1 or 4-D additive; when it is None and ``input_ids`` are given, positions holding
    ``config.pad_token_id`` are masked, as PaddleNLP's BERT does: pass an all-ones mask to attend
    everywhere); ``token_type_ids``; ``position_ids``; ``output_hidden_states`` and ``output_attentions``
    (None = the config's field); ``return_dict``.
    Returns ``last_hidden_state`` (B, S, H), ``pooler_output`` (B, H), ``hidden_states`` (the embeddings
    and each layer's output, the last after the final LayerNorm), ``attentions`` (per layer (B, heads, S, S),
    the probabilities after dropout, as HF).
    """

    def __init__(self, config: MegatronBertConfig, add_pooling_layer: bool = True, causal: bool = False,
                 initialize: bool = True):
        super().__init__(config)
        self.causal = causal
        self.embeddings = MegatronBertEmbeddings(config)
        self.encoder = MegatronBertEncoder(config)
        self.pooler = MegatronBertPooler(config) if add_pooling_layer else None
        if initialize:  # a head initialises once, body included
            self.init_weights()

    def check_inputs(self, input_ids, token_type_ids=None, position_ids=None):
        """Clear errors for inputs the embeddings cannot take (a Paddle index error is opaque)."""
        config = self.config
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, seq_len), got shape {input_ids.shape}")
        if position_ids is None and input_ids.shape[1] > config.max_position_embeddings:
            raise ValueError(
                f"input length {input_ids.shape[1]} exceeds max_position_embeddings "
                f"({config.max_position_embeddings}); truncate or split the input"
            )
        # Value checks read the tensor, a host sync: done where it is free (CPU), skipped on GPU.
        if not input_ids.place.is_cpu_place() or input_ids.size == 0:
            return
        max_id, min_id = int(input_ids.max()), int(input_ids.min())
        if max_id >= config.vocab_size or min_id < 0:
            raise ValueError(f"token id {max_id if max_id >= config.vocab_size else min_id} is outside the "
                             f"vocabulary [0, {config.vocab_size})")
        if token_type_ids is not None and int(token_type_ids.max()) >= config.type_vocab_size:
            raise ValueError(f"token_type_ids reach {int(token_type_ids.max())} but type_vocab_size is "
                             f"{config.type_vocab_size}")
        if position_ids is not None and int(position_ids.max()) >= config.max_position_embeddings:
            raise ValueError(f"position id {int(position_ids.max())} exceeds max_position_embeddings "
                             f"({config.max_position_embeddings})")

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        output_hidden_states=None,
        return_dict=False,
        inputs_embeds=None,
        output_attentions=None,
    ):
        config = self.config
        output_hidden_states = config.output_hidden_states if output_hidden_states is None else output_hidden_states
        output_attentions = config.output_attentions if output_attentions is None else output_attentions
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if input_ids is not None:
            self.check_inputs(input_ids, token_type_ids, position_ids)
            if attention_mask is None and config.pad_token_id is not None:
                attention_mask = (input_ids != config.pad_token_id).astype("int64")  # PaddleNLP BERT's default
        elif inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != config.hidden_size:
            raise ValueError(f"inputs_embeds must be (batch, seq_len, {config.hidden_size}), got shape "
                             f"{inputs_embeds.shape}")
        embeddings = self.embeddings(input_ids, token_type_ids, position_ids, inputs_embeds)
        additive_mask = build_additive_mask(attention_mask, embeddings.shape[:2], embeddings.dtype, self.causal)
        sequence_output, hidden_states, attentions = self.encoder(embeddings, additive_mask, output_hidden_states,
                                                                  output_attentions)
        pooled_output = self.pooler(sequence_output) if self.pooler is not None else None
        return _as_output(
            return_dict,
            last_hidden_state=sequence_output,
            pooler_output=pooled_output,
            hidden_states=tuple(hidden_states) if hidden_states else None,
            attentions=tuple(attentions) if attentions else None,
        )


# ---- heads ----------------------------------------------------------------------------------------
class MegatronBertPredictionHeadTransform(nn.Layer):
    def __init__(self, config: MegatronBertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, epsilon=config.layer_norm_eps)
        self.act = config.lm_head_act or config.hidden_act
        self.eps = config.layer_norm_eps

    def forward(self, hidden_states):
        hidden_states = ops.linear_activation(self.dense, hidden_states, self.act)
        return ops.layer_norm(hidden_states, self.LayerNorm.weight, self.LayerNorm.bias, self.eps)


class MegatronBertLMPredictionHead(nn.Layer):
    """dense -> act -> LayerNorm -> x @ E^T + b, with E the (vocab-parallel) word embedding when tied.

    Returns vocab-parallel logits (this rank's vocab slice at TP>1).
    """

    def __init__(self, config: MegatronBertConfig, word_embeddings: VocabParallelEmbedding):
        super().__init__()
        self.transform = MegatronBertPredictionHeadTransform(config)
        self.tied = config.tie_word_embeddings
        per_partition = word_embeddings.per_partition
        if self.tied:
            self._word_embeddings = [word_embeddings]  # a list: not registered twice as a sublayer
        else:
            self.decoder_weight = self.create_parameter([per_partition, config.hidden_size])
        self.bias = self.create_parameter([per_partition], is_bias=True)
        self.bias.is_distributed = config.tensor_parallel_degree > 1

    @property
    def decoder(self):
        return self._word_embeddings[0].weight if self.tied else self.decoder_weight

    def forward(self, hidden_states):
        hidden_states = copy_to_tensor_parallel_region(self.transform(hidden_states))
        return ops.bias_add(paddle.matmul(hidden_states, self.decoder, transpose_y=True), self.bias)


def _gather_positions(sequence_output, positions):
    """Rows of (B, S, H) at ``positions`` (B, P) -> (B, P, H): the MLM head runs on masked rows only."""
    batch, seq, hidden = sequence_output.shape
    offsets = (paddle.arange(batch, dtype="int64") * seq).unsqueeze(-1)
    flat_index = (positions.astype("int64") + offsets).reshape([-1])
    rows = paddle.gather(sequence_output.reshape([-1, hidden]), flat_index)
    return rows.reshape([batch, -1, hidden])


class _LMHeadMixin:
    """The MLM loss over vocab-parallel logits, and the gather for outputs."""

    def _lm_loss(self, logits, labels):
        flat_logits = logits.reshape([-1, logits.shape[-1]]).astype("float32")
        flat_labels = labels.reshape([-1]).astype("int64")
        losses = vocab_parallel_cross_entropy(flat_logits, flat_labels, self.config.vocab_size)
        kept = (flat_labels != -100).astype(losses.dtype)
        return losses.sum() / kept.sum().clip(min=1.0)

    def _mlm_rows(self, sequence_output, labels, masked_lm_positions):
        """The rows the LM head runs on, and their labels: ``masked_lm_positions`` (B, P) when given; with
        ``config.mlm_head_on_labelled_rows`` (training only) the rows whose label is not -100, flattened to
        (N, H) and (N,) (a host sync to count them); else every row."""
        if masked_lm_positions is not None:
            return _gather_positions(sequence_output, masked_lm_positions), labels
        if labels is not None and self.config.mlm_head_on_labelled_rows and self.training:
            flat_labels = labels.reshape([-1])
            rows = paddle.nonzero(flat_labels != -100).reshape([-1])
            hidden = sequence_output.reshape([-1, sequence_output.shape[-1]])
            return paddle.gather(hidden, rows), paddle.gather(flat_labels, rows)
        return sequence_output, labels

    def _full_logits(self, logits):
        return gather_vocab_logits(logits, self.config.vocab_size)


class MegatronBertForPreTraining(MegatronBertPretrainedModel, _LMHeadMixin):
    """MLM + NSP (Megatron's "binary head").

    Forward args as :class:`MegatronBertModel`, plus ``labels`` (B, S) with -100 for unmasked positions,
    ``next_sentence_label`` (B,) with 1 = random next sentence, and ``masked_lm_positions`` (B, P):
    when given, the LM head runs on those rows only and ``labels`` is (B, P) (-100 for padding).
    Returns ``loss``, ``prediction_logits``, ``seq_relationship_logits``.
    """

    def __init__(self, config: MegatronBertConfig):
        super().__init__(config)
        self.bert = MegatronBertModel(config, add_pooling_layer=True, initialize=False)
        self.cls = MegatronBertPreTrainingHeads(config, self.bert.embeddings.word_embeddings)
        self.init_weights()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, labels=None,
                next_sentence_label=None, masked_lm_positions=None,
                output_hidden_states=None, return_dict=False, inputs_embeds=None, output_attentions=None):
        outputs = self.bert(input_ids, attention_mask, token_type_ids, position_ids, output_hidden_states,
                            return_dict=True, inputs_embeds=inputs_embeds, output_attentions=output_attentions)
        sequence_output, labels = self._mlm_rows(outputs.last_hidden_state, labels, masked_lm_positions)
        logits, seq_relationship_logits = self.cls(sequence_output, outputs.pooler_output)
        loss = mlm_loss = nsp_loss = None
        if labels is not None:
            mlm_loss = self._lm_loss(logits, labels)
            loss = mlm_loss
        if next_sentence_label is not None:
            nsp_loss = ops.masked_mean_cross_entropy(seq_relationship_logits, next_sentence_label)
            loss = nsp_loss if loss is None else loss + nsp_loss
        return _as_output(return_dict, loss=loss, prediction_logits=self._full_logits(logits),
                          seq_relationship_logits=seq_relationship_logits, mlm_loss=mlm_loss if return_dict else None,
                          nsp_loss=nsp_loss if return_dict else None, hidden_states=outputs.hidden_states,
                          attentions=outputs.attentions)


class MegatronBertPreTrainingHeads(nn.Layer):
    def __init__(self, config, word_embeddings):
        super().__init__()
        self.predictions = MegatronBertLMPredictionHead(config, word_embeddings)
        self.seq_relationship = nn.Linear(config.hidden_size, 2)

    def forward(self, sequence_output, pooled_output):
        return self.predictions(sequence_output), self.seq_relationship(pooled_output)


class MegatronBertOnlyMLMHead(nn.Layer):
    def __init__(self, config, word_embeddings):
        super().__init__()
        self.predictions = MegatronBertLMPredictionHead(config, word_embeddings)

    def forward(self, sequence_output):
        return self.predictions(sequence_output)


class MegatronBertForMaskedLM(MegatronBertPretrainedModel, _LMHeadMixin):
    """Masked language modelling. ``labels`` (B, S) with -100 where no loss is taken; with
    ``masked_lm_positions`` (B, P) the head runs on those rows only. Returns ``loss``, ``logits``."""

    def __init__(self, config: MegatronBertConfig):
        super().__init__(config)
        self.bert = MegatronBertModel(config, add_pooling_layer=False, initialize=False)
        self.cls = MegatronBertOnlyMLMHead(config, self.bert.embeddings.word_embeddings)
        self.init_weights()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, labels=None,
                masked_lm_positions=None,
                output_hidden_states=None, return_dict=False, inputs_embeds=None, output_attentions=None):
        outputs = self.bert(input_ids, attention_mask, token_type_ids, position_ids, output_hidden_states,
                            return_dict=True, inputs_embeds=inputs_embeds, output_attentions=output_attentions)
        sequence_output, labels = self._mlm_rows(outputs.last_hidden_state, labels, masked_lm_positions)
        logits = self.cls(sequence_output)
        loss = self._lm_loss(logits, labels) if labels is not None else None
        return _as_output(return_dict, loss=loss, logits=self._full_logits(logits), hidden_states=outputs.hidden_states,
                          attentions=outputs.attentions)


class MegatronBertForCausalLM(MegatronBertPretrainedModel, _LMHeadMixin):
    """Left-to-right LM on the same body (causal attention mask). ``labels`` (B, S) are the input ids;
    the loss predicts token t+1 from positions <= t (shifted inside). Returns ``loss``, ``logits``."""

    def __init__(self, config: MegatronBertConfig):
        super().__init__(config)
        self.bert = MegatronBertModel(config, add_pooling_layer=False, causal=True, initialize=False)
        self.cls = MegatronBertOnlyMLMHead(config, self.bert.embeddings.word_embeddings)
        self.init_weights()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, labels=None,
                output_hidden_states=None, return_dict=False, inputs_embeds=None, output_attentions=None):
        outputs = self.bert(input_ids, attention_mask, token_type_ids, position_ids, output_hidden_states,
                            return_dict=True, inputs_embeds=inputs_embeds, output_attentions=output_attentions)
        logits = self.cls(outputs.last_hidden_state)
        loss = None
        if labels is not None:
            loss = self._lm_loss(logits[:, :-1], labels[:, 1:])
        return _as_output(return_dict, loss=loss, logits=self._full_logits(logits), hidden_states=outputs.hidden_states,
                          attentions=outputs.attentions)


class MegatronBertForNextSentencePrediction(MegatronBertPretrainedModel):
    """NSP on the pooled [CLS]. ``next_sentence_label`` (B,), 1 = random. Returns ``loss``, ``logits``."""

    def __init__(self, config: MegatronBertConfig):
        super().__init__(config)
        self.bert = MegatronBertModel(config, add_pooling_layer=True, initialize=False)
        self.cls = MegatronBertOnlyNSPHead(config)
        self.init_weights()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                next_sentence_label=None, labels=None,
                output_hidden_states=None, return_dict=False, inputs_embeds=None, output_attentions=None):
        outputs = self.bert(input_ids, attention_mask, token_type_ids, position_ids, output_hidden_states,
                            return_dict=True, inputs_embeds=inputs_embeds, output_attentions=output_attentions)
        logits = self.cls(outputs.pooler_output)
        target = next_sentence_label if next_sentence_label is not None else labels
        loss = ops.masked_mean_cross_entropy(logits, target) if target is not None else None
        return _as_output(return_dict, loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                          attentions=outputs.attentions)


class MegatronBertOnlyNSPHead(nn.Layer):
    def __init__(self, config):
        super().__init__()
        self.seq_relationship = nn.Linear(config.hidden_size, 2)

    def forward(self, pooled_output):
        return self.seq_relationship(pooled_output)


def _classifier_dropout(config):
    p = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
    return nn.Dropout(p)


class MegatronBertForSequenceClassification(MegatronBertPretrainedModel):
    """Classification on the pooled [CLS]; the loss follows ``config.problem_type`` as HF's:
    ``regression`` (MSE), ``single_label_classification`` (cross entropy over int labels (B,)),
    ``multi_label_classification`` (BCE-with-logits over float labels (B, num_labels)). When it is None
    the labels decide: ``num_labels == 1`` regression, int labels single-label, else multi-label.
    Returns ``loss``, ``logits`` (B, num_labels)."""

    def __init__(self, config: MegatronBertConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = MegatronBertModel(config, add_pooling_layer=True, initialize=False)
        self.dropout = _classifier_dropout(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.init_weights()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, labels=None,
                output_hidden_states=None, return_dict=False, inputs_embeds=None, output_attentions=None):
        outputs = self.bert(input_ids, attention_mask, token_type_ids, position_ids, output_hidden_states,
                            return_dict=True, inputs_embeds=inputs_embeds, output_attentions=output_attentions)
        logits = self.classifier(self.dropout(outputs.pooler_output))
        loss = None
        if labels is not None:
            problem_type = self.config.problem_type
            if problem_type is None:
                integer_labels = labels.dtype in (paddle.int32, paddle.int64)
                problem_type = ("regression" if self.num_labels == 1 else
                                "single_label_classification" if integer_labels else "multi_label_classification")
            if problem_type == "regression":
                shape = [-1] if self.num_labels == 1 else [-1, self.num_labels]
                loss = F.mse_loss(logits.reshape(shape).astype("float32"), labels.reshape(shape).astype("float32"))
            elif problem_type == "single_label_classification":
                loss = ops.masked_mean_cross_entropy(logits, labels)
            else:
                loss = F.binary_cross_entropy_with_logits(logits.astype("float32"), labels.astype("float32"))
        return _as_output(return_dict, loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                          attentions=outputs.attentions)


class MegatronBertForMultipleChoice(MegatronBertPretrainedModel):
    """Multiple choice: inputs (B, C, S) scored per choice on the pooled [CLS]. ``labels`` (B,) is the
    right choice. Returns ``loss``, ``logits`` (B, C)."""

    def __init__(self, config: MegatronBertConfig):
        super().__init__(config)
        self.bert = MegatronBertModel(config, add_pooling_layer=True, initialize=False)
        self.dropout = _classifier_dropout(config)
        self.classifier = nn.Linear(config.hidden_size, 1)
        self.init_weights()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, labels=None,
                output_hidden_states=None, return_dict=False, inputs_embeds=None, output_attentions=None):
        num_choices = (input_ids if input_ids is not None else inputs_embeds).shape[1]

        def flat(x):  # (B, C, ...) -> (B * C, ...)
            return None if x is None else x.reshape([-1] + list(x.shape[2:]))

        outputs = self.bert(flat(input_ids), flat(attention_mask), flat(token_type_ids), flat(position_ids),
                            output_hidden_states, return_dict=True, inputs_embeds=flat(inputs_embeds),
                            output_attentions=output_attentions)
        logits = self.classifier(self.dropout(outputs.pooler_output)).reshape([-1, num_choices])
        loss = ops.masked_mean_cross_entropy(logits, labels) if labels is not None else None
        return _as_output(return_dict, loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                          attentions=outputs.attentions)


class MegatronBertForTokenClassification(MegatronBertPretrainedModel):
    """Per-token classification. ``labels`` (B, S) with -100 where no loss is taken.
    Returns ``loss``, ``logits`` (B, S, num_labels)."""

    def __init__(self, config: MegatronBertConfig):
        super().__init__(config)
        self.bert = MegatronBertModel(config, add_pooling_layer=False, initialize=False)
        self.dropout = _classifier_dropout(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.init_weights()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, labels=None,
                output_hidden_states=None, return_dict=False, inputs_embeds=None, output_attentions=None):
        outputs = self.bert(input_ids, attention_mask, token_type_ids, position_ids, output_hidden_states,
                            return_dict=True, inputs_embeds=inputs_embeds, output_attentions=output_attentions)
        logits = self.classifier(self.dropout(outputs.last_hidden_state))
        loss = ops.masked_mean_cross_entropy(logits, labels) if labels is not None else None
        return _as_output(return_dict, loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                          attentions=outputs.attentions)


class MegatronBertForQuestionAnswering(MegatronBertPretrainedModel):
    """Extractive QA: start/end logits per token. ``start_positions``/``end_positions`` (B,) outside
    the sequence are clamped and ignored, as in HF. Returns ``loss``, ``start_logits``, ``end_logits``."""

    def __init__(self, config: MegatronBertConfig):
        super().__init__(config)
        self.bert = MegatronBertModel(config, add_pooling_layer=False, initialize=False)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        self.init_weights()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                start_positions=None, end_positions=None,
                output_hidden_states=None, return_dict=False, inputs_embeds=None, output_attentions=None):
        outputs = self.bert(input_ids, attention_mask, token_type_ids, position_ids, output_hidden_states,
                            return_dict=True, inputs_embeds=inputs_embeds, output_attentions=output_attentions)
        logits = self.qa_outputs(outputs.last_hidden_state)  # (B, S, 2)
        start_logits, end_logits = logits[:, :, 0], logits[:, :, 1]
        loss = None
        if start_positions is not None and end_positions is not None:
            seq_len = start_logits.shape[1]

            def position_loss(position_logits, positions):
                positions = positions.reshape([-1]).astype("int64").clip(0, seq_len)
                positions = paddle.where(positions == seq_len, paddle.full_like(positions, -100), positions)
                return ops.masked_mean_cross_entropy(position_logits, positions)

            loss = (position_loss(start_logits, start_positions) + position_loss(end_logits, end_positions)) / 2
        return _as_output(return_dict, loss=loss, start_logits=start_logits, end_logits=end_logits,
                          hidden_states=outputs.hidden_states,
                          attentions=outputs.attentions)


MODEL_CLASSES = {
    cls.__name__: cls
    for cls in (
        MegatronBertModel,
        MegatronBertForPreTraining,
        MegatronBertForMaskedLM,
        MegatronBertForCausalLM,
        MegatronBertForNextSentencePrediction,
        MegatronBertForSequenceClassification,
        MegatronBertForMultipleChoice,
        MegatronBertForTokenClassification,
        MegatronBertForQuestionAnswering,
    )
}
