"""``--verify``: run a fixed probe batch through the source in its own framework and through the result.

HF -> Paddle compares transformers on SRC with our model on DST; Paddle -> HF the reverse. Megatron-LM
checkpoints have no framework here to run them (Megatron-LM needs CUDA and its own checkout), so those
conversions are reported as not verified; the tests check them against a numpy Megatron forward.

It runs both models, so it sits above the model and the converters (converters never import the model);
``convert.writer`` calls it only when asked to verify.
"""

from __future__ import annotations

from typing import Any, Dict

import numpy as np

# The output each head is judged by, in our field names (transformers uses the same).
_FIELDS = ("prediction_logits", "logits", "start_logits", "last_hidden_state")


def probe_batch(config, batch: int = 2, seq: int = 16, seed: int = 1234) -> Dict[str, np.ndarray]:
    rng = np.random.RandomState(seed)
    seq = min(seq, config.max_position_embeddings)
    ids = rng.randint(0, config.vocab_size, size=(batch, seq)).astype("int64")
    types = np.zeros_like(ids)
    types[:, seq // 2:] = min(1, config.type_vocab_size - 1)
    return {"input_ids": ids, "token_type_ids": types, "attention_mask": np.ones_like(ids)}


def _head_name(config) -> str:
    from .modeling import MODEL_CLASSES

    names = [a for a in (config.architectures or []) if a in MODEL_CLASSES]
    return names[0] if names else "MegatronBertForPreTraining"


def _run_transformers(directory: str, head: str, inputs, choices: bool):
    import torch
    import transformers

    model = getattr(transformers, head).from_pretrained(directory).eval()
    feed = {k: torch.from_numpy(_maybe_choices(v, choices)) for k, v in inputs.items()}
    with torch.no_grad():
        out = model(**feed)
    return {f: getattr(out, f).numpy() for f in _FIELDS if getattr(out, f, None) is not None}


def _run_ours(directory: str, head: str, inputs, choices: bool):
    import paddle

    from .modeling import MODEL_CLASSES

    model = MODEL_CLASSES[head].from_pretrained(directory)
    model.eval()
    out = model(**{k: paddle.to_tensor(_maybe_choices(v, choices)) for k, v in inputs.items()}, return_dict=True)
    return {f: out[f].numpy() for f in _FIELDS if f in out}


def _maybe_choices(array, choices: bool):
    return np.stack([array, array[:, ::-1]], axis=1).copy() if choices else array


def verify_conversion(source: str, checkpoint, target_dir: str, to: str) -> Dict[str, Any]:
    """``{"max_abs_diff": ..., "output": ..., "compared": ...}``, or ``{"skipped": why}``."""
    pair = (checkpoint.kind, to)
    if pair not in (("hf", "paddle"), ("paddle", "hf")):
        return {"skipped": f"no framework here runs both sides of {checkpoint.kind} -> {to} "
                           "(Megatron-LM is not runnable here)"}
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as err:
        return {"skipped": f"--verify needs torch and transformers ({err})"}
    config = checkpoint.config
    head = head_hf = _head_name(config)  # the same class names in both frameworks
    inputs = probe_batch(config)
    choices = head == "MegatronBertForMultipleChoice"
    if pair == ("hf", "paddle"):
        expected = _run_transformers(checkpoint.directory, head_hf, inputs, choices)
        got = _run_ours(target_dir, head, inputs, choices)
        compared = f"transformers {head_hf}(SRC) vs paddle {head}(DST)"
    else:
        expected = _run_ours(source, head, inputs, choices)
        got = _run_transformers(target_dir, head_hf, inputs, choices)
        compared = f"paddle {head}(SRC) vs transformers {head_hf}(DST)"
    field = next(f for f in _FIELDS if f in expected and f in got)
    diff = float(np.abs(expected[field].astype(np.float64) - got[field]).max())
    return {"compared": compared, "output": field, "max_abs_diff": diff, "probe_shape": list(inputs["input_ids"].shape)}
