"""Conversion of checkpoints from other frameworks and names into this package's Paddle state dicts.

Readers (``hf.py``: transformers directories; ``megatron.py``: Megatron-LM / NGC checkpoints, TP shards
merged; ``paddle_dir.py``: our own directories) give one state dict with our names; ``writer.py`` writes it
as a Paddle model directory (or exports it). Weight files themselves are read and written by
``paddle_megatronbert.checkpoint`` (safetensors, Paddle pickles without running code); ``tensor_files.py``
reads torch pickles safely. Converters never import the model.
"""

from .paddlenlp import from_paddlenlp_names, is_paddlenlp_state  # noqa: F401


def load_torch_checkpoint(path, kind=None, num_attention_heads=None):
    """(config, full state dict) from a PyTorch checkpoint (HF directory or Megatron-LM)."""
    from .torch_checkpoints import load_torch_checkpoint as _load

    return _load(path, kind=kind, num_attention_heads=num_attention_heads)


def convert_checkpoint(source, destination, **kwargs):
    """Convert an HF or Megatron-LM checkpoint into a Paddle model directory (see ``writer.convert_checkpoint``)."""
    from .writer import convert_checkpoint as _convert

    return _convert(source, destination, **kwargs)
