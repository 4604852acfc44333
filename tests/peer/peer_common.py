"""What the translated peer suites share: their random-input helpers (``ids_tensor``, ``random_attention_mask``
of HF's and PaddleNLP's ``test_modeling_common.py``, drawn from a fixed numpy seed here) and the HF oracle
(an HF model saved by transformers itself and converted by this package's own reader)."""

import numpy as np
import paddle
import pytest

from paddle_megatronbert import MODEL_CLASSES

ALL_MODEL_CLASSES = [MODEL_CLASSES[name] for name in sorted(MODEL_CLASSES)]


class Draws:
    """``ids_tensor`` / ``random_attention_mask`` / ``floats_tensor`` from one seeded generator."""

    def __init__(self, seed=0):
        self.rng = np.random.RandomState(seed)

    def ids(self, shape, vocab_size):
        return paddle.to_tensor(self.rng.randint(0, vocab_size, size=shape).astype("int64"))

    def attention_mask(self, shape):
        mask = self.rng.randint(0, 2, size=shape).astype("int64")
        mask[:, 0] = 1  # at least one attended token per row (HF's random_attention_mask)
        return paddle.to_tensor(mask)

    def floats(self, shape):
        return paddle.to_tensor(self.rng.randn(*shape).astype("float32"))


def for_class(model_class, inputs, num_choices):
    """HF's/PaddleNLP's ``_prepare_for_class``: multiple choice gets (B, C, S) copies of each 2-D input."""
    if model_class.__name__.endswith("ForMultipleChoice"):
        return {k: (v.unsqueeze(1).expand([-1, num_choices] + list(v.shape[1:]))
                    if isinstance(v, paddle.Tensor) and v.ndim > 1 else v) for k, v in inputs.items()}
    return dict(inputs)


def labels_for_class(model_class, batch, seq, num_choices):
    """HF's ``_prepare_for_class(return_labels=True)``: zero labels of each head's shape."""
    name = model_class.__name__
    zeros = lambda *shape: paddle.zeros(list(shape), dtype="int64")  # noqa: E731
    if name in ("MegatronBertForSequenceClassification", "MegatronBertForMultipleChoice",
                "MegatronBertForNextSentencePrediction"):
        return {"labels": zeros(batch)}
    if name == "MegatronBertForQuestionAnswering":
        return {"start_positions": zeros(batch), "end_positions": zeros(batch)}
    if name in ("MegatronBertForTokenClassification", "MegatronBertForMaskedLM", "MegatronBertForCausalLM"):
        return {"labels": zeros(batch, seq)}
    if name == "MegatronBertForPreTraining":
        return {"labels": zeros(batch, seq), "next_sentence_label": zeros(batch)}
    return {}


def converted_hf_model(tmp_path, hf_class_name, **hf_config):
    """(HF model in eval mode, our model converted from the directory HF's ``save_pretrained`` wrote)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.MegatronBertConfig(attn_implementation="eager", **hf_config)
    hf_model = getattr(transformers, hf_class_name)(config).eval()
    with torch.no_grad():  # non-trivial LayerNorms and biases, so every parameter is exercised
        for param in hf_model.parameters():
            if param.ndim == 1:
                param.add_(torch.randn_like(param) * 0.1)
    hf_model.save_pretrained(str(tmp_path))
    ours = MODEL_CLASSES[hf_class_name].from_pretrained(str(tmp_path), convert_from_torch=True)
    ours.eval()
    return hf_model, ours
