"""MegatronBERT (Megatron-LM's pre-LayerNorm BERT) in PaddlePaddle."""

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


def __getattr__(name):
    # The tokenizer imports paddlenlp (seconds): only when asked for.
    if name == "MegatronBertTokenizer":
        from .tokenizer import MegatronBertTokenizer

        return MegatronBertTokenizer
    raise AttributeError(name)
