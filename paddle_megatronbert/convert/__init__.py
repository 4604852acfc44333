"""Conversion of checkpoints from other frameworks and names into this package's Paddle state dicts."""

from .paddlenlp import from_paddlenlp_names, is_paddlenlp_state  # noqa: F401


def load_torch_checkpoint(path):
    """(config, full state dict) from a PyTorch checkpoint (HF directory or Megatron-LM)."""
    from .torch_checkpoints import load_torch_checkpoint as _load

    return _load(path)
