"""MegatronBERT (Megatron-LM's pre-LayerNorm BERT) in PaddlePaddle."""

from .logging_utils import quiet_third_party_output

quiet_third_party_output()  # before paddle is imported: its import warns "No ccache found" on every start

from .configuration import PRETRAINED_INIT_CONFIGURATION, MegatronBertConfig  # noqa: F401
from .modeling import (  # noqa: F401
    MODEL_CLASSES,
    MegatronBertForCausalLM,
    MegatronBertForMaskedLM,
    MegatronBertForMultipleChoice,
    MegatronBertForNextSentencePrediction,
    MegatronBertForPreTraining,
    MegatronBertForQuestionAnswering,
    MegatronBertForSequenceClassification,
    MegatronBertForTokenClassification,
    MegatronBertModel,
    MegatronBertPretrainedModel,
    ModelOutput,
)

__version__ = "0.1.0"

# What `from paddle_megatronbert import *` binds (the tokenizer too: star-import resolves it through
# __getattr__ below).
__all__ = [
    "MODEL_CLASSES",
    "PRETRAINED_INIT_CONFIGURATION",
    "MegatronBertConfig",
    "MegatronBertForCausalLM",
    "MegatronBertForMaskedLM",
    "MegatronBertForMultipleChoice",
    "MegatronBertForNextSentencePrediction",
    "MegatronBertForPreTraining",
    "MegatronBertForQuestionAnswering",
    "MegatronBertForSequenceClassification",
    "MegatronBertForTokenClassification",
    "MegatronBertModel",
    "MegatronBertPretrainedModel",
    "MegatronBertTokenizer",
    "ModelOutput",
]


def __getattr__(name):
    # The tokenizer imports paddlenlp (seconds): only when asked for.
    if name == "MegatronBertTokenizer":
        from .tokenizer import MegatronBertTokenizer

        return MegatronBertTokenizer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
