"""MegatronBERT in Paddle: the pre-LayerNorm BERT of the Megatron-LM paper, and its task heads.

Differences from BERT (the Megatron layout, HF's ``modeling_megatron_bert`` has the same):
no LayerNorm on the embeddings; each layer is ``h = h + Attn(LN(h)); h = h + MLP(LN(h))``; one final
LayerNorm after the last layer. Parameter names follow HF's ``MegatronBert*`` (with Paddle's ``[in, out]``
Linear layout), so an HF checkpoint maps by transposing the Linear weights.

Parallelism is a property of the layers (``parallel.py``): the code below is the same at any
tensor-parallel degree. The math of each operation lives in ``ops.py``.
"""

from __future__ import annotations

import os
import re
from collections import OrderedDict
from typing import Dict, Optional

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from . import ops
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
    gather_vocab_logits,
    get_tensor_parallel_rank,
    merge_arrays,
    shard_array,
    tensor_parallel_rng,
    vocab_parallel_cross_entropy,
)

WEIGHTS_NAME = "model_state.pdparams"
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

    def forward(self, input_ids, token_type_ids=None, position_ids=None):
        seq_len = input_ids.shape[1]
        if position_ids is None:
            position_ids = paddle.arange(seq_len, dtype="int64").unsqueeze(0)
        if token_type_ids is None:
            token_type_ids = paddle.zeros_like(input_ids)
        embeddings = (
            self.word_embeddings(input_ids)
            + self.position_embeddings(position_ids)
            + self.token_type_embeddings(token_type_ids)
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

    def forward(self, hidden_states, additive_mask):
        hidden_states = copy_to_tensor_parallel_region(hidden_states)
        query = ops.linear_split_heads(self.query, hidden_states, self.num_heads)  # (B, nh, S, hd)
        key = ops.linear_split_heads(self.key, hidden_states, self.num_heads)
        value = ops.linear_split_heads(self.value, hidden_states, self.num_heads)
        with tensor_parallel_rng():
            context = ops.attention(query, key, value, additive_mask, self.dropout_p, self.training)
        return ops.merge_heads(context)  # (B, S, nh * hd)


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

    def forward(self, hidden_states, additive_mask):
        normed = ops.layer_norm(hidden_states, self.ln.weight, self.ln.bias, self.eps)
        return self.output(self.self(normed, additive_mask), hidden_states)


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

    def forward(self, hidden_states, additive_mask):
        attention_output = self.attention(hidden_states, additive_mask)
        normed = ops.layer_norm(attention_output, self.ln.weight, self.ln.bias, self.eps)
        return self.output(self.intermediate(normed), attention_output)


class MegatronBertEncoder(nn.Layer):
    def __init__(self, config: MegatronBertConfig):
        super().__init__()
        self.config = config
        self.layer = nn.LayerList([MegatronBertLayer(config) for _ in range(config.num_hidden_layers)])
        self.ln = _layer_norm(config)  # the final LayerNorm of the pre-LN stack

    def forward(self, hidden_states, additive_mask, output_hidden_states=False):
        all_hidden_states = [] if output_hidden_states else None
        recompute = self.config.recompute and self.training
        for layer in self.layer:
            if output_hidden_states:
                all_hidden_states.append(hidden_states)
            if recompute:
                from paddle.distributed.fleet.utils import recompute as recompute_fn

                hidden_states = recompute_fn(layer, hidden_states, additive_mask)
            else:
                hidden_states = layer(hidden_states, additive_mask)
        hidden_states = ops.layer_norm(hidden_states, self.ln.weight, self.ln.bias, self.config.layer_norm_eps)
        if output_hidden_states:
            all_hidden_states.append(hidden_states)
        return hidden_states, all_hidden_states


class MegatronBertPooler(nn.Layer):
    """Dense + tanh on the first token ([CLS])."""

    def __init__(self, config: MegatronBertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden_states):
        return paddle.tanh(self.dense(hidden_states[:, 0]))


# ---- base class: init, loading, saving -------------------------------------------------------------
_SPLIT_RULES = [  # (regex on the parameter name, how tensor parallelism splits it)
    (r"\.attention\.self\.(query|key|value)\.(weight|bias)$", "column"),
    (r"\.intermediate\.dense\.(weight|bias)$", "column"),
    (r"\.attention\.output\.dense\.weight$", "row"),
    (r"\.layer\.\d+\.output\.dense\.weight$", "row"),
    (r"embeddings\.word_embeddings\.weight$", "vocab"),
    (r"^cls\.predictions\.(bias|decoder_weight)$", "vocab"),
]


def tensor_parallel_split_kind(name: str) -> Optional[str]:
    """How a parameter is split over tensor-parallel ranks: ``column``, ``row``, ``vocab`` or None."""
    for pattern, kind in _SPLIT_RULES:
        if re.search(pattern, name):
            return kind
    return None


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
        ops.use_fast_kernels(config.use_fast_kernels)  # the process-wide choice of op implementations
        # init_weights draws from the generator as it stands here, before the layers' default initialisers
        # consume it by amounts that depend on their (TP-sharded) shapes.
        self._init_rng_state = paddle.get_rng_state()

    # Each rank draws the full tensor with the shared generator and keeps its shard, so a TP=N shard is
    # exactly the slice of the TP=1 weight under the same seed.
    def init_weights(self):
        config = self.config
        degree = config.tensor_parallel_degree
        rank = get_tensor_parallel_rank() if degree > 1 else 0
        paddle.set_rng_state(self._init_rng_state)
        with paddle.no_grad():
            for name, param in self.named_parameters():
                kind = tensor_parallel_split_kind(name)
                full_shape = self._full_shape(name, param.shape, kind)
                if name.endswith("bias") or name.endswith("ln.bias") or "LayerNorm.bias" in name:
                    full = np.zeros(full_shape, dtype="float32")
                elif self._is_layer_norm_weight(name):
                    full = np.ones(full_shape, dtype="float32")
                else:
                    full = paddle.normal(0.0, config.initializer_range, full_shape).numpy()
                    if name.endswith("embeddings.word_embeddings.weight") and config.pad_token_id is not None:
                        if 0 <= config.pad_token_id < full_shape[0]:
                            full[config.pad_token_id] = 0.0
                param.set_value(shard_array(full, kind, degree, rank).astype(param.numpy().dtype))

    @staticmethod
    def _is_layer_norm_weight(name):
        return bool(re.search(r"(\.ln|LayerNorm)\.weight$", name))

    def _full_shape(self, name, local_shape, kind):
        shape = list(local_shape)
        degree = self.config.tensor_parallel_degree
        if kind == "vocab":
            shape[0] = self.config.vocab_size
        elif kind is not None and degree > 1:
            axis = 1 if (kind == "column" and len(shape) == 2) else 0
            shape[axis] *= degree
        return shape

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
        to_load = {}
        for name, param in own.items():
            if name not in state:
                continue
            value = np.asarray(state[name])
            kind = tensor_parallel_split_kind(name)
            expected = self._full_shape(name, param.shape, kind)
            if list(value.shape) != list(expected):
                raise ValueError(
                    f"shape mismatch in {source}: parameter {name} has shape {list(value.shape)} in the "
                    f"checkpoint but {list(expected)} in the model built from the config"
                )
            to_load[name] = shard_array(value, kind, degree, rank).astype(param.numpy().dtype)
        self.set_state_dict(to_load)
        return missing, unexpected

    # ---- from_pretrained / save_pretrained ------------------------------------------------------
    @classmethod
    def from_pretrained(cls, name_or_path: str, config: Optional[MegatronBertConfig] = None, **config_overrides):
        """Build from a registered name (config offline; weights from ``MEGATRONBERT_WEIGHTS_DIR`` or a
        download) or from a directory with ``config.json`` and ``model_state.pdparams`` (or per-rank
        ``model_state.tp{NN}.pdparams`` shards, merged and re-split for the current TP degree).

        Keyword arguments override config fields (``num_labels=3``, ``tensor_parallel_degree=2`` ...).
        ``convert_from_torch=True`` reads a PyTorch HF checkpoint directory instead.
        """
        convert_from_torch = config_overrides.pop("convert_from_torch", False)
        if config is None:  # the TP degree belongs to this run (its process group), not to the checkpoint
            from .parallel import get_tensor_parallel_degree

            config_overrides.setdefault("tensor_parallel_degree", get_tensor_parallel_degree())
        if convert_from_torch:
            from .convert import load_torch_checkpoint

            converted_config, state = load_torch_checkpoint(name_or_path)
            config = config or MegatronBertConfig.from_dict(converted_config.to_dict(), **config_overrides)
            model = cls(config)
            model.load_full_state_dict(state, strict=False, source=name_or_path)
            return model
        explicit_tie = config is not None or "tie_word_embeddings" in config_overrides
        if config is None:
            config = MegatronBertConfig.from_pretrained(name_or_path, **config_overrides)
        elif config_overrides:
            config = MegatronBertConfig.from_dict(config.to_dict(), **config_overrides)
        weights_dir = cls._resolve_weights_dir(name_or_path)  # before building: a missing file fails fast
        state = load_state_file(weights_dir)
        if not explicit_tie:
            config = _untie_for_separate_decoder(config, state, weights_dir)
        model = cls(config)
        missing, _ = model.load_full_state_dict(state, strict=False, source=weights_dir)
        # Heads that the checkpoint does not have (a classifier on a pretrained body) start from init.
        body_missing = [k for k in missing if k.startswith(cls.base_model_prefix + ".")]
        if body_missing:
            raise KeyError(f"{weights_dir} lacks {len(body_missing)} parameters of the encoder: {body_missing[:8]}")
        if missing:
            import logging

            logging.getLogger(__name__).warning(
                "%s: newly initialised (not in the checkpoint): %s", type(model).__name__, ", ".join(missing)
            )
        return model

    @classmethod
    def _resolve_weights_dir(cls, name_or_path: str) -> str:
        if os.path.isdir(name_or_path):
            return name_or_path
        if name_or_path in PRETRAINED_INIT_CONFIGURATION:
            root = os.environ.get("MEGATRONBERT_WEIGHTS_DIR")
            if root and os.path.isdir(os.path.join(root, name_or_path)):
                return os.path.join(root, name_or_path)
            from .download import download_pretrained_weights

            return download_pretrained_weights(name_or_path)
        raise ValueError(f"{name_or_path!r} is neither a registered name nor a directory")

    def save_pretrained(self, save_directory: str, merge_tensor_parallel: bool = True):
        """Write ``config.json`` and the weights.

        At TP>1, ``merge_tensor_parallel=True`` gathers every shard and rank 0 writes one full
        ``model_state.pdparams``; ``False`` makes each rank write ``model_state.tp{rank:02d}.pdparams``.
        At TP>1 every rank of the TP group must call it; it returns when the files are complete. Only the
        first data-parallel replica writes. Files are written under a temporary name and renamed, so a
        crash leaves no half-written file.
        """
        from .parallel import get_replica_rank, get_tensor_parallel_degree, get_tensor_parallel_group

        degree = self.config.tensor_parallel_degree
        rank = get_tensor_parallel_rank() if degree > 1 else 0
        if degree > 1 and merge_tensor_parallel:
            state = self.gather_full_state_dict()  # a collective: before any rank returns
        if get_replica_rank() != 0:
            return
        os.makedirs(save_directory, exist_ok=True)
        if degree > 1 and merge_tensor_parallel:
            filename = WEIGHTS_NAME
        elif degree > 1:
            state, filename = self.full_state_dict(), f"model_state.tp{rank:02d}.pdparams"
        else:
            state, filename = self.full_state_dict(), WEIGHTS_NAME
        assert get_tensor_parallel_degree() == degree or degree == 1
        if rank == 0:
            config_dict = self.config.to_dict()
            config_dict["architectures"] = [type(self).__name__]
            if degree > 1 and merge_tensor_parallel:
                config_dict["tensor_parallel_degree"] = 1
            config = MegatronBertConfig.from_dict(config_dict)
            _atomic_write(os.path.join(save_directory, "config.json"), config.to_json_string().encode("utf-8"))
            _remove_stale_weights(save_directory, keep_shards=degree if filename != WEIGHTS_NAME else 0)
        if rank == 0 or not merge_tensor_parallel:
            _atomic_paddle_save(state, os.path.join(save_directory, filename))
        if degree > 1:  # the TP peers may read the checkpoint next
            import paddle.distributed as dist

            dist.barrier(group=get_tensor_parallel_group())

    def gather_full_state_dict(self) -> Dict[str, np.ndarray]:
        """Every parameter as its full tensor, gathered from the tensor-parallel ranks."""
        import paddle.distributed as dist

        from .parallel import get_tensor_parallel_group

        degree = self.config.tensor_parallel_degree
        state = self.full_state_dict()
        if degree == 1:
            return state
        full = {}
        for name, value in state.items():
            kind = tensor_parallel_split_kind(name)
            if kind is None:
                full[name] = value
                continue
            pieces = []
            dist.all_gather(pieces, paddle.to_tensor(value), group=get_tensor_parallel_group())
            full[name] = merge_arrays([p.numpy() for p in pieces], kind, self.config.vocab_size)
        return full


def _remove_stale_weights(directory: str, keep_shards: int) -> None:
    """Delete weight files of another layout left by an earlier save (``load_state_file`` would read them):
    with ``keep_shards == 0`` every ``model_state.tpNN`` shard, else the merged file and shards >= keep_shards."""
    for name in os.listdir(directory):
        match = re.fullmatch(r"model_state\.tp(\d+)\.pdparams", name)
        if (match and int(match.group(1)) >= keep_shards) or (keep_shards and name == WEIGHTS_NAME):
            os.remove(os.path.join(directory, name))


def _untie_for_separate_decoder(config: MegatronBertConfig, state, source: str) -> MegatronBertConfig:
    """PaddleNLP's own MegatronBert keeps an LM decoder separate from the word embeddings: a checkpoint whose
    decoder differs from its embeddings loads untied, so the model computes what that checkpoint computed."""
    from .convert.paddlenlp import from_paddlenlp_names, is_paddlenlp_state

    if not config.tie_word_embeddings or not is_paddlenlp_state(state):
        return config
    renamed = from_paddlenlp_names({k: v for k, v in state.items() if "decoder" in k or "word_embeddings" in k})
    decoder = renamed.get("cls.predictions.decoder_weight")
    embedding = renamed.get("bert.embeddings.word_embeddings.weight")
    if decoder is None or embedding is None or np.array_equal(np.asarray(decoder), np.asarray(embedding)):
        return config
    import logging

    logging.getLogger(__name__).info("%s: PaddleNLP checkpoint with a separate LM decoder: tie_word_embeddings=False",
                                     source)
    return MegatronBertConfig.from_dict(config.to_dict(), tie_word_embeddings=False)


def _atomic_write(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_paddle_save(state, path: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    paddle.save(state, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_state_file(directory: str) -> Dict[str, np.ndarray]:
    """The full state dict stored in a model directory: one ``model_state.pdparams``, or per-rank
    ``model_state.tpNN.pdparams`` shards merged into full tensors."""
    single = os.path.join(directory, WEIGHTS_NAME)
    shards = sorted(f for f in os.listdir(directory) if re.fullmatch(r"model_state\.tp\d+\.pdparams", f))
    if os.path.isfile(single):
        return _load_pdparams(single)
    if not shards:
        raise FileNotFoundError(f"{directory} has no {WEIGHTS_NAME} (nor model_state.tpNN.pdparams shards)")
    config = MegatronBertConfig.from_pretrained(directory)
    expected = [f"model_state.tp{r:02d}.pdparams" for r in range(config.tensor_parallel_degree)]
    if shards != expected:
        raise ValueError(f"{directory}: config.json says tensor_parallel_degree {config.tensor_parallel_degree}, "
                         f"so the shards {expected} are expected, found {shards}")
    parts = [_load_pdparams(os.path.join(directory, f)) for f in shards]
    merged = {}
    for name in parts[0]:
        merged[name] = merge_arrays([p[name] for p in parts], tensor_parallel_split_kind(name), config.vocab_size)
    return merged


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


def _load_pdparams(path: str) -> Dict[str, np.ndarray]:
    try:
        state = paddle.load(path, return_numpy=True)
    except Exception as err:  # paddle raises many kinds for a truncated or foreign file
        raise ValueError(f"cannot read {path} as a Paddle state dict ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
    # bfloat16 tensors come back as their raw uint16 bits (numpy has no bfloat16); no parameter is uint16,
    # so such arrays are widened to the float32 they encode.
    return {k: (v.astype(np.uint32) << 16).view(np.float32) if isinstance(v, np.ndarray) and v.dtype == np.uint16
            else v for k, v in state.items()}


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

    Forward args: ``input_ids`` (B, S); ``attention_mask`` (2-D/3-D 0/1 or 4-D additive);
    ``token_type_ids``; ``position_ids``; ``output_hidden_states``; ``return_dict``.
    Returns ``last_hidden_state`` (B, S, H), ``pooler_output`` (B, H), ``hidden_states``.
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
        input_ids,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        output_hidden_states=False,
        return_dict=False,
    ):
        self.check_inputs(input_ids, token_type_ids, position_ids)
        embeddings = self.embeddings(input_ids, token_type_ids, position_ids)
        additive_mask = build_additive_mask(attention_mask, input_ids.shape, embeddings.dtype, self.causal)
        sequence_output, hidden_states = self.encoder(embeddings, additive_mask, output_hidden_states)
        pooled_output = self.pooler(sequence_output) if self.pooler is not None else None
        return _as_output(
            return_dict,
            last_hidden_state=sequence_output,
            pooler_output=pooled_output,
            hidden_states=tuple(hidden_states) if hidden_states else None,
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

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, labels=None,
                next_sentence_label=None, masked_lm_positions=None, output_hidden_states=False, return_dict=False):
        outputs = self.bert(input_ids, attention_mask, token_type_ids, position_ids, output_hidden_states,
                            return_dict=True)
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
                          nsp_loss=nsp_loss if return_dict else None, hidden_states=outputs.hidden_states)


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

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, labels=None,
                masked_lm_positions=None, output_hidden_states=False, return_dict=False):
        outputs = self.bert(input_ids, attention_mask, token_type_ids, position_ids, output_hidden_states,
                            return_dict=True)
        sequence_output, labels = self._mlm_rows(outputs.last_hidden_state, labels, masked_lm_positions)
        logits = self.cls(sequence_output)
        loss = self._lm_loss(logits, labels) if labels is not None else None
        return _as_output(return_dict, loss=loss, logits=self._full_logits(logits), hidden_states=outputs.hidden_states)


class MegatronBertForCausalLM(MegatronBertPretrainedModel, _LMHeadMixin):
    """Left-to-right LM on the same body (causal attention mask). ``labels`` (B, S) are the input ids;
    the loss predicts token t+1 from positions <= t (shifted inside). Returns ``loss``, ``logits``."""

    def __init__(self, config: MegatronBertConfig):
        super().__init__(config)
        self.bert = MegatronBertModel(config, add_pooling_layer=False, causal=True, initialize=False)
        self.cls = MegatronBertOnlyMLMHead(config, self.bert.embeddings.word_embeddings)
        self.init_weights()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, labels=None,
                output_hidden_states=False, return_dict=False):
        outputs = self.bert(input_ids, attention_mask, token_type_ids, position_ids, output_hidden_states,
                            return_dict=True)
        logits = self.cls(outputs.last_hidden_state)
        loss = None
        if labels is not None:
            loss = self._lm_loss(logits[:, :-1], labels[:, 1:])
        return _as_output(return_dict, loss=loss, logits=self._full_logits(logits), hidden_states=outputs.hidden_states)


class MegatronBertForNextSentencePrediction(MegatronBertPretrainedModel):
    """NSP on the pooled [CLS]. ``next_sentence_label`` (B,), 1 = random. Returns ``loss``, ``logits``."""

    def __init__(self, config: MegatronBertConfig):
        super().__init__(config)
        self.bert = MegatronBertModel(config, add_pooling_layer=True, initialize=False)
        self.cls = MegatronBertOnlyNSPHead(config)
        self.init_weights()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                next_sentence_label=None, labels=None, output_hidden_states=False, return_dict=False):
        outputs = self.bert(input_ids, attention_mask, token_type_ids, position_ids, output_hidden_states,
                            return_dict=True)
        logits = self.cls(outputs.pooler_output)
        target = next_sentence_label if next_sentence_label is not None else labels
        loss = ops.masked_mean_cross_entropy(logits, target) if target is not None else None
        return _as_output(return_dict, loss=loss, logits=logits, hidden_states=outputs.hidden_states)


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
    """Classification (or regression when ``num_labels == 1``, MSE loss) on the pooled [CLS].
    Returns ``loss``, ``logits`` (B, num_labels)."""

    def __init__(self, config: MegatronBertConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = MegatronBertModel(config, add_pooling_layer=True, initialize=False)
        self.dropout = _classifier_dropout(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.init_weights()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, labels=None,
                output_hidden_states=False, return_dict=False):
        outputs = self.bert(input_ids, attention_mask, token_type_ids, position_ids, output_hidden_states,
                            return_dict=True)
        logits = self.classifier(self.dropout(outputs.pooler_output))
        loss = None
        if labels is not None:
            if self.num_labels == 1:
                loss = F.mse_loss(logits.reshape([-1]).astype("float32"), labels.reshape([-1]).astype("float32"))
            else:
                loss = ops.masked_mean_cross_entropy(logits, labels)
        return _as_output(return_dict, loss=loss, logits=logits, hidden_states=outputs.hidden_states)


class MegatronBertForMultipleChoice(MegatronBertPretrainedModel):
    """Multiple choice: inputs (B, C, S) scored per choice on the pooled [CLS]. ``labels`` (B,) is the
    right choice. Returns ``loss``, ``logits`` (B, C)."""

    def __init__(self, config: MegatronBertConfig):
        super().__init__(config)
        self.bert = MegatronBertModel(config, add_pooling_layer=True, initialize=False)
        self.dropout = _classifier_dropout(config)
        self.classifier = nn.Linear(config.hidden_size, 1)
        self.init_weights()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, labels=None,
                output_hidden_states=False, return_dict=False):
        num_choices = input_ids.shape[1]

        def flat(x):
            return None if x is None else x.reshape([-1] + list(x.shape[2:]))

        outputs = self.bert(flat(input_ids), flat(attention_mask), flat(token_type_ids), flat(position_ids),
                            output_hidden_states, return_dict=True)
        logits = self.classifier(self.dropout(outputs.pooler_output)).reshape([-1, num_choices])
        loss = ops.masked_mean_cross_entropy(logits, labels) if labels is not None else None
        return _as_output(return_dict, loss=loss, logits=logits, hidden_states=outputs.hidden_states)


class MegatronBertForTokenClassification(MegatronBertPretrainedModel):
    """Per-token classification. ``labels`` (B, S) with -100 where no loss is taken.
    Returns ``loss``, ``logits`` (B, S, num_labels)."""

    def __init__(self, config: MegatronBertConfig):
        super().__init__(config)
        self.bert = MegatronBertModel(config, add_pooling_layer=False, initialize=False)
        self.dropout = _classifier_dropout(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.init_weights()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, labels=None,
                output_hidden_states=False, return_dict=False):
        outputs = self.bert(input_ids, attention_mask, token_type_ids, position_ids, output_hidden_states,
                            return_dict=True)
        logits = self.classifier(self.dropout(outputs.last_hidden_state))
        loss = ops.masked_mean_cross_entropy(logits, labels) if labels is not None else None
        return _as_output(return_dict, loss=loss, logits=logits, hidden_states=outputs.hidden_states)


class MegatronBertForQuestionAnswering(MegatronBertPretrainedModel):
    """Extractive QA: start/end logits per token. ``start_positions``/``end_positions`` (B,) outside
    the sequence are clamped and ignored, as in HF. Returns ``loss``, ``start_logits``, ``end_logits``."""

    def __init__(self, config: MegatronBertConfig):
        super().__init__(config)
        self.bert = MegatronBertModel(config, add_pooling_layer=False, initialize=False)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        self.init_weights()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                start_positions=None, end_positions=None, output_hidden_states=False, return_dict=False):
        outputs = self.bert(input_ids, attention_mask, token_type_ids, position_ids, output_hidden_states,
                            return_dict=True)
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
                          hidden_states=outputs.hidden_states)


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
