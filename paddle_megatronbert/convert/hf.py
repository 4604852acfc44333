"""HF transformers ``MegatronBert*`` directories (``config.json`` + ``model.safetensors`` or
``pytorch_model.bin``, sharded or not) -> our config and names.

Our parameter names are HF's; the differences are Paddle's ``[in, out]`` Linear layout (every 2-D weight
but the embeddings is transposed), the ``bert.`` prefix of a bare ``MegatronBertModel`` checkpoint, and
the LM decoder: HF keeps ``cls.predictions.decoder.{weight,bias}``; we tie the weight to the word
embeddings (or keep it as ``cls.predictions.decoder_weight`` when untied) and call the bias
``cls.predictions.bias``.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np

from ..checkpoint.weights import LazyTensor, is_paddle_layout, read_safetensors
from ..configuration import MegatronBertConfig
from .tensor_files import load_torch_pickle, tensor_to_numpy

logger = logging.getLogger(__name__)

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")

# HF activation names -> ours (the tanh-approximated GELUs are one function written three ways).
HF_ACTIVATIONS = {"gelu": "gelu", "gelu_python": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                  "gelu_python_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh", "relu": "relu", "tanh": "tanh"}

# Every name our models have, HF spelling (used to refuse tensors that would be dropped silently).
_KNOWN = re.compile(
    r"bert\.embeddings\.(word|position|token_type)_embeddings\.weight"
    r"|bert\.encoder\.layer\.\d+\.(attention\.ln|attention\.self\.(query|key|value)|attention\.output\.dense"
    r"|ln|intermediate\.dense|output\.dense)\.(weight|bias)"
    r"|bert\.encoder\.ln\.(weight|bias)|bert\.pooler\.dense\.(weight|bias)"
    r"|cls\.predictions\.(transform\.(dense|LayerNorm)\.(weight|bias)|bias|decoder\.(weight|bias))"
    r"|cls\.seq_relationship\.(weight|bias)|classifier\.(weight|bias)|qa_outputs\.(weight|bias)"
)
_BODY_PREFIXES = ("embeddings.", "encoder.", "pooler.")


def is_hf_directory(path: str) -> bool:
    """config.json and transformers' weight files, in transformers' layout (``model.safetensors`` is also
    the Paddle file name: ``checkpoint.weights.is_paddle_layout`` tells them apart)."""
    return (os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json"))
            and any(os.path.isfile(os.path.join(path, f)) for f in WEIGHT_FILES) and not is_paddle_layout(path))


def _weight_files(directory: str) -> Tuple[List[str], str]:
    """The files holding the weights (safetensors preferred) and their format."""
    for index_name, fmt in (("model.safetensors.index.json", "safetensors"), ("pytorch_model.bin.index.json", "bin")):
        index = os.path.join(directory, index_name)
        if os.path.isfile(index):
            try:
                with open(index, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise ValueError(f"{index} is not a valid checkpoint index ({err})") from None
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not os.path.isfile(os.path.join(directory, f))]
            if missing:
                raise FileNotFoundError(f"{index} names shards that are not in {directory}: {missing[:5]}")
            return [os.path.join(directory, f) for f in files], fmt
    for name, fmt in (("model.safetensors", "safetensors"), ("pytorch_model.bin", "bin")):
        if os.path.isfile(os.path.join(directory, name)):
            return [os.path.join(directory, name)], fmt
    raise FileNotFoundError(f"{directory} has no {' / '.join(WEIGHT_FILES)}")


def config_from_hf(hf: Dict, do_lower_case: Optional[bool], source: str) -> MegatronBertConfig:
    """Our config from an HF ``config.json`` dict. The LayerNorm eps is kept as HF's config says, since
    that is what the HF model computes (HF's MegatronBert default is 1e-12, Megatron's 1e-5)."""
    model_type = hf.get("model_type")
    if model_type not in (None, "megatron-bert", "megatron_bert"):
        raise ValueError(f"{source} is a {model_type!r} model, not MegatronBert (model_type 'megatron-bert')")
    act = hf.get("hidden_act", "gelu")
    if act not in HF_ACTIVATIONS:
        raise ValueError(f"{source}: hidden_act {act!r} is not supported (choose one of {sorted(HF_ACTIVATIONS)})")
    kwargs = dict(hidden_act=HF_ACTIVATIONS[act])
    for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                 "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings", "type_vocab_size",
                 "initializer_range", "layer_norm_eps", "pad_token_id", "tie_word_embeddings", "classifier_dropout",
                 "architectures"):
        if hf.get(name) is not None:
            kwargs[name] = hf[name]
    extra = {}
    if hf.get("id2label"):
        kwargs["num_labels"] = len(hf["id2label"])
        extra["id2label"] = {str(k): v for k, v in hf["id2label"].items()}
        extra["label2id"] = dict(hf.get("label2id") or {})
    elif hf.get("num_labels"):
        kwargs["num_labels"] = hf["num_labels"]
    if hf.get("problem_type"):
        extra["problem_type"] = hf["problem_type"]
    if do_lower_case is not None:
        kwargs["do_lower_case"] = bool(do_lower_case)
    return MegatronBertConfig(**kwargs, extra=extra)


def _hf_lower_case(directory: str) -> Optional[bool]:
    path = os.path.join(directory, "tokenizer_config.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            value = json.load(f).get("do_lower_case")
        if value is not None:
            return bool(value)
    return None


@dataclass
class HFCheckpoint:
    """An HF MegatronBert directory, read but not converted.

    Args:
        directory: the HF model directory.
    """

    directory: str
    weight_file: Optional[str] = None
    notes: List[str] = field(default_factory=list)

    kind = "hf"
    naming = "hf"
    checkpoint_version = None
    tensor_parallel_degree = 1

    @property
    def read_with(self) -> List[str]:
        return [self.load_path]

    def __post_init__(self):
        self.source_names: Dict[str, str] = {}
        config_path = os.path.join(self.directory, "config.json")
        try:
            with open(config_path, encoding="utf-8") as f:
                self.hf_config = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{config_path} is not valid JSON ({err})") from None
        if self.weight_file:
            self.files = [self.weight_file]
            self.format = "safetensors" if self.weight_file.endswith(".safetensors") else "bin"
        else:
            self.files, self.format = _weight_files(self.directory)
        lower = _hf_lower_case(self.directory)
        if lower is None:
            self.notes.append("no tokenizer_config.json with do_lower_case: casing recorded as lower case")
        self.config = config_from_hf(self.hf_config, lower, config_path)
        self.tensors, self.load_path = self._open()
        self._check_names()

    def _open(self) -> Tuple[Dict[str, object], str]:
        tensors, paths = {}, set()
        for path in self.files:
            if self.format == "safetensors":
                part, how = read_safetensors(path), "safetensors"
            else:
                part, how = load_torch_pickle(path)
                if not isinstance(part, dict):
                    raise ValueError(f"{path} holds a {type(part).__name__}, not a state dict")
            paths.add(how)
            for name, value in part.items():
                if not hasattr(value, "shape"):
                    raise ValueError(f"{path}: entry {name} is a {type(value).__name__}, not a tensor")
                tensors[self._our_spelling(name)] = value
                self.source_names[self._our_spelling(name)] = name
        self.notes.insert(0, f"read {len(self.files)} {self.format} file(s) with {', '.join(sorted(paths))}")
        return tensors, "/".join(sorted(paths))

    @staticmethod
    def _our_spelling(name: str) -> str:
        """HF names with the ``bert.`` prefix (a bare ``MegatronBertModel`` checkpoint lacks it)."""
        return "bert." + name if name.startswith(_BODY_PREFIXES) else name

    def _check_names(self):
        names = [n for n in self.tensors if not n.endswith("position_ids")]
        unknown = [n for n in names if not _KNOWN.fullmatch(n)]
        if unknown:
            raise ValueError(f"{self.directory} has {len(unknown)} tensors that are not MegatronBert's: "
                             f"{', '.join(unknown[:8])}")
        layers = self.config.num_hidden_layers
        required = ["bert.embeddings.word_embeddings.weight", "bert.embeddings.position_embeddings.weight",
                    "bert.embeddings.token_type_embeddings.weight", "bert.encoder.ln.weight", "bert.encoder.ln.bias"]
        for i in range(layers):
            for part in ("attention.ln", "attention.self.query", "attention.self.key", "attention.self.value",
                         "attention.output.dense", "ln", "intermediate.dense", "output.dense"):
                required += [f"bert.encoder.layer.{i}.{part}.weight", f"bert.encoder.layer.{i}.{part}.bias"]
        missing = [n for n in required if n not in self.tensors]
        if missing:
            more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
            raise ValueError(f"{self.directory} lacks {len(missing)} tensors of a {layers}-layer MegatronBert: "
                             f"{', '.join(missing[:10])}{more}")
        extra = sorted({int(m.group(1)) for n in names for m in [re.match(r"bert\.encoder\.layer\.(\d+)\.", n)] if m
                        and int(m.group(1)) >= layers})
        if extra:
            raise ValueError(f"{self.directory} has layer {extra[0]} but config.json says num_hidden_layers={layers}")

    def iter_tensors(self) -> Iterator[Tuple[str, np.ndarray, str]]:
        """(our name, numpy array in our layout, HF name) for every tensor, one at a time."""
        tensors, tied = self.tensors, self.config.tie_word_embeddings
        for name in list(tensors):
            if name.endswith("position_ids"):
                continue
            source = self.source_names[name]
            if name == "cls.predictions.bias" and "cls.predictions.decoder.bias" in tensors:
                continue  # HF's forward adds decoder.bias; the two are one tensor when tied
            value = _to_numpy(tensors[name])
            if name == "cls.predictions.decoder.bias":
                yield "cls.predictions.bias", _copy(value), source
            elif name == "cls.predictions.decoder.weight":
                if tied:
                    embedding = tensors.get("bert.embeddings.word_embeddings.weight")
                    if embedding is not None and not np.array_equal(value, _to_numpy(embedding)):
                        raise ValueError(f"{self.directory}: config.json ties the LM decoder to the word embeddings "
                                         "(tie_word_embeddings) but cls.predictions.decoder.weight differs from them")
                    continue
                yield "cls.predictions.decoder_weight", _copy(value), source
            elif value.ndim == 2 and ".embeddings." not in name:
                yield name, np.ascontiguousarray(value.T), source
            else:
                yield name, _copy(value), source


def _to_numpy(value) -> np.ndarray:
    """A safetensors tensor (read now) or a torch tensor -> numpy."""
    return np.asarray(value) if isinstance(value, LazyTensor) else tensor_to_numpy(value)


def _copy(array: np.ndarray) -> np.ndarray:
    return np.array(array, copy=True, order="C")


def read_hf_checkpoint(path: str) -> HFCheckpoint:
    """An HF directory, or one of its weight files (with ``config.json`` beside it)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such checkpoint: {path}")
    directory = os.path.dirname(os.path.abspath(path)) if os.path.isfile(path) else path
    if not os.path.isfile(os.path.join(directory, "config.json")):
        raise FileNotFoundError(f"{directory} has no config.json: not an HF model directory")
    return HFCheckpoint(directory, weight_file=os.path.abspath(path) if os.path.isfile(path) else None)


# ---- export: ours -> an HF directory ------------------------------------------------------------
# Our activations -> HF's names (HF's gelu_new is the tanh approximation).
TO_HF_ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_new", "gelu_new": "gelu_new", "relu": "relu", "tanh": "tanh"}


def hf_config_dict(config: MegatronBertConfig, notes: List[str]) -> Dict:
    """An HF ``config.json`` for ``transformers.MegatronBertConfig`` from ours."""
    head_act = config.lm_head_act or config.hidden_act
    if head_act != config.hidden_act:
        notes.append(f"HF's MegatronBert has one activation for the MLP and the LM head; written hidden_act="
                     f"{TO_HF_ACTIVATIONS[config.hidden_act]} although the LM head computed {head_act}: HF's MLM "
                     "logits differ slightly from this model's")
    labels = config.extra.get("id2label") or {str(i): f"LABEL_{i}" for i in range(config.num_labels)}
    hf = {
        "architectures": list(config.architectures or ["MegatronBertForPreTraining"]),
        "model_type": "megatron-bert",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "intermediate_size": config.intermediate_size,
        "hidden_act": TO_HF_ACTIVATIONS[config.hidden_act],
        "hidden_dropout_prob": config.hidden_dropout_prob,
        "attention_probs_dropout_prob": config.attention_probs_dropout_prob,
        "max_position_embeddings": config.max_position_embeddings,
        "type_vocab_size": config.type_vocab_size,
        "initializer_range": config.initializer_range,
        "layer_norm_eps": config.layer_norm_eps,
        "pad_token_id": config.pad_token_id,
        "tie_word_embeddings": config.tie_word_embeddings,
        "id2label": labels,
        "label2id": config.extra.get("label2id") or {v: int(k) for k, v in labels.items()},
        "is_decoder": "MegatronBertForCausalLM" in (config.architectures or []),
    }
    if config.classifier_dropout is not None:
        hf["classifier_dropout"] = config.classifier_dropout
    return hf


def to_hf_tensors(name: str, array: np.ndarray, config: MegatronBertConfig) -> List[Tuple[str, np.ndarray]]:
    """One of our tensors -> its HF name(s) and torch layout (the inverse of ``HFCheckpoint.iter_tensors``)."""
    if name == "cls.predictions.decoder_weight":
        return [("cls.predictions.decoder.weight", array)]
    if name == "cls.predictions.bias" and not config.tie_word_embeddings:
        return [(name, array), ("cls.predictions.decoder.bias", array)]
    if array.ndim == 2 and ".embeddings." not in name:
        return [(name, np.ascontiguousarray(array.T))]
    return [(name, array)]
