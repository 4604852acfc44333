"""MegatronBertConfig: every hyper-parameter of the model in one dataclass, saved as ``config.json``."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from . import tp_plan

CONFIG_NAME = "config.json"

# The two NGC checkpoints (megatron_bert_345m v0.1). Vocab sizes are padded to a multiple of 128 (x TP);
# Megatron's LayerNorm eps is 1e-5 (HF's and PaddleNLP's 1e-12 is not what the weights were trained with).
PRETRAINED_INIT_CONFIGURATION: Dict[str, Dict[str, Any]] = {
    "megatronbert-cased": dict(
        vocab_size=29056,
        hidden_size=1024,
        num_hidden_layers=24,
        num_attention_heads=16,
        intermediate_size=4096,
        hidden_act="gelu",
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
        max_position_embeddings=512,
        type_vocab_size=2,
        initializer_range=0.02,
        layer_norm_eps=1e-5,
        pad_token_id=0,
        do_lower_case=False,
    ),
    "megatronbert-uncased": dict(
        vocab_size=30592,
        hidden_size=1024,
        num_hidden_layers=24,
        num_attention_heads=16,
        intermediate_size=4096,
        hidden_act="gelu",
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
        max_position_embeddings=512,
        type_vocab_size=2,
        initializer_range=0.02,
        layer_norm_eps=1e-5,
        pad_token_id=0,
        do_lower_case=True,
    ),
}

# Paddle weights converted from NGC by tools/convert_checkpoint.py, as PaddleNLP publishes them.
PRETRAINED_RESOURCE_FILES_MAP: Dict[str, Dict[str, str]] = {
    "model_state": {
        "megatronbert-cased": "https://bj.bcebos.com/paddlenlp/models/transformers/"
        "megatron-bert/megatronbert-cased/model_state.pdparams",
        "megatronbert-uncased": "https://bj.bcebos.com/paddlenlp/models/transformers/"
        "megatron-bert/megatronbert-uncased/model_state.pdparams",
    }
}

# The original PyTorch weights, for users who convert them themselves.
NGC_CHECKPOINT_URLS: Dict[str, str] = {
    "megatronbert-cased": "https://api.ngc.nvidia.com/v2/models/nvidia/megatron_bert_345m/"
    "versions/v0.1_cased/zip",
    "megatronbert-uncased": "https://api.ngc.nvidia.com/v2/models/nvidia/megatron_bert_345m/"
    "versions/v0.1_uncased/zip",
}

ACTIVATIONS = ("gelu", "gelu_new", "gelu_tanh", "relu", "tanh")
PROBLEM_TYPES = (None, "regression", "single_label_classification", "multi_label_classification")


@dataclass
class MegatronBertConfig:
    """Configuration of a MegatronBERT model (pre-LayerNorm BERT of the Megatron-LM paper).

    Args:
        vocab_size: rows of the word embedding (padded vocab, e.g. 29056 cased / 30592 uncased).
        hidden_size: width of the residual stream.
        num_hidden_layers: transformer layers.
        num_attention_heads: attention heads; must divide ``hidden_size`` (and be divisible by TP).
        intermediate_size: MLP width.
        hidden_act: MLP activation: ``gelu`` (erf), ``gelu_new``/``gelu_tanh`` (tanh approximation,
            Megatron's fused bias-gelu), ``relu`` or ``tanh``.
        lm_head_act: activation of the LM head transform; ``None`` means the same as ``hidden_act``.
        hidden_dropout_prob: dropout on embeddings and on each residual branch.
        attention_probs_dropout_prob: dropout on the attention probabilities.
        max_position_embeddings: longest sequence.
        type_vocab_size: number of token types (segments).
        initializer_range: std of the normal initialisation of weights.
        layer_norm_eps: LayerNorm epsilon (Megatron: 1e-5).
        pad_token_id: id of [PAD].
        tie_word_embeddings: LM decoder shares the word embedding matrix (Megatron, HF).
        num_labels: classes for sequence/token classification (1 = regression).
        num_choices: choices for multiple choice (informational; the input shape decides).
        classifier_dropout: dropout before classification heads; ``None`` = ``hidden_dropout_prob``.
        problem_type: loss of sequence classification, as HF: ``regression``, ``single_label_classification``,
            ``multi_label_classification``; ``None`` = decided by ``num_labels`` and the labels' dtype.
        output_hidden_states: return every layer's hidden states when the call does not say.
        output_attentions: return every layer's attention probabilities when the call does not say.
        do_lower_case: casing of the vocabulary the weights were trained with.
        tensor_parallel_degree: ranks a layer is split over (1 = plain layers).
        sequence_parallel: reserved; not implemented (always False).
        recompute: recompute each layer's activations in the backward pass to save memory.
        use_fast_kernels: run the fast paths (custom CPU kernels, fused GPU ops) where available.
        mlm_head_on_labelled_rows: in training, run the MLM head only on the rows whose label is not -100
            (``prediction_logits`` is then (N, vocab) over those rows); ``masked_lm_positions`` does the same
            without a host sync.
        dtype: parameter dtype (``float32``, ``float16``, ``bfloat16``).
    """

    vocab_size: int = 30592
    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    intermediate_size: int = 4096
    hidden_act: str = "gelu"
    lm_head_act: Optional[str] = None
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 0
    tie_word_embeddings: bool = True
    num_labels: int = 2
    num_choices: int = 2
    classifier_dropout: Optional[float] = None
    problem_type: Optional[str] = None
    output_hidden_states: bool = False
    output_attentions: bool = False
    do_lower_case: bool = True
    tensor_parallel_degree: int = 1
    sequence_parallel: bool = False
    recompute: bool = False
    use_fast_kernels: bool = True
    mlm_head_on_labelled_rows: bool = False
    dtype: str = "float32"
    architectures: Optional[list] = None
    extra: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self.validate()

    _INT_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                   "max_position_embeddings", "type_vocab_size", "num_labels", "tensor_parallel_degree")
    _FLOAT_FIELDS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "initializer_range", "layer_norm_eps")

    def validate(self) -> None:
        for name in self._INT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"config field {name} must be a positive integer, got {value!r}")
        for name in self._FLOAT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
                raise ValueError(f"config field {name} must be a finite number >= 0, got {value!r}")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            if getattr(self, name) >= 1:
                raise ValueError(f"config field {name} must be below 1, got {getattr(self, name)!r}")
        if self.layer_norm_eps <= 0:  # LayerNorm divides by sqrt(var + eps): a constant row would give NaN
            raise ValueError(f"config field layer_norm_eps must be > 0, got {self.layer_norm_eps!r}")
        pad = self.pad_token_id
        if isinstance(pad, bool) or not isinstance(pad, int) or not 0 <= pad < self.vocab_size:
            raise ValueError(f"config field pad_token_id must be an id in the vocab (0 to {self.vocab_size - 1}), "
                             f"got {pad!r}")
        for f in dataclasses.fields(self):
            # JSON written by hand or by other tools may say "false": a non-empty string would read as true.
            if f.type == "bool" and not isinstance(getattr(self, f.name), bool):
                raise ValueError(f"config field {f.name} must be true or false (a JSON boolean), got "
                                 f"{getattr(self, f.name)!r}")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) is not a multiple of num_attention_heads "
                f"({self.num_attention_heads})"
            )
        for act_name in (self.hidden_act, self.lm_head_act):
            if act_name is not None and act_name not in ACTIVATIONS:
                raise ValueError(f"unknown activation {act_name!r}; choose one of {ACTIVATIONS}")
        tp_plan.check_divisible(self, self.tensor_parallel_degree)
        if self.problem_type not in PROBLEM_TYPES:
            raise ValueError(f"config field problem_type must be one of {PROBLEM_TYPES}, got {self.problem_type!r}")
        if self.sequence_parallel:
            raise ValueError("sequence_parallel is not implemented")
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {self.dtype!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    # ---- dict / json -------------------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        out = {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self)}
        extra = out.pop("extra")
        out.update(extra)
        out["model_type"] = "megatron-bert"
        return out

    @classmethod
    def from_dict(cls, config_dict: Dict[str, Any], strict: bool = False, **overrides) -> "MegatronBertConfig":
        """``strict`` refuses keys that are not config fields (a typo in a hand-written config); otherwise
        they are kept in ``extra`` (HF and PaddleNLP configs carry keys of their own)."""
        if not isinstance(config_dict, dict):
            raise ValueError(f"a config must be a JSON object of fields, got a {type(config_dict).__name__}")
        merged = dict(config_dict)
        merged.update(overrides)
        names = {f.name for f in dataclasses.fields(cls)}
        if strict:
            unknown = sorted(k for k in merged if k not in names and k not in ("model_type", "extra"))
            if unknown:
                raise ValueError(f"unknown config field(s): {', '.join(unknown)}")
        known = {k: v for k, v in merged.items() if k in names and k != "extra"}
        extra = dict(merged.get("extra") or {})
        # Keys that mean something elsewhere (HF/PaddleNLP configs) are kept, not lost.
        extra.update({k: v for k, v in merged.items() if k not in names and k != "model_type"})
        return cls(**known, extra=extra)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, save_directory: str) -> None:
        os.makedirs(save_directory, exist_ok=True)
        with open(os.path.join(save_directory, CONFIG_NAME), "w", encoding="utf-8") as f:
            f.write(self.to_json_string())

    @classmethod
    def from_json_file(cls, path: str, strict: bool = False, **overrides) -> "MegatronBertConfig":
        """Read a config; every error names the file."""
        try:
            with open(path, encoding="utf-8") as f:
                config_dict = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"config file not found: {path}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from None
        try:
            return cls.from_dict(config_dict, strict=strict, **overrides)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: {err}") from None

    @classmethod
    def from_pretrained(cls, name_or_path: str, **overrides) -> "MegatronBertConfig":
        """A registered name (offline, from the table above), a directory with ``config.json``, or a JSON file."""
        if name_or_path in PRETRAINED_INIT_CONFIGURATION:
            return cls.from_dict(PRETRAINED_INIT_CONFIGURATION[name_or_path], **overrides)
        if os.path.isdir(name_or_path):
            return cls.from_json_file(os.path.join(name_or_path, CONFIG_NAME), **overrides)
        if os.path.isfile(name_or_path):
            return cls.from_json_file(name_or_path, **overrides)
        raise ValueError(
            f"{name_or_path!r} is neither a registered name ({', '.join(PRETRAINED_INIT_CONFIGURATION)}) "
            "nor a directory with config.json nor a JSON file"
        )
