"""Weights of the registered names: a local cache, else a download (the only step that needs a network)."""

from __future__ import annotations

import os

from .configuration import NGC_CHECKPOINT_URLS, PRETRAINED_RESOURCE_FILES_MAP


def cache_root() -> str:
    return os.environ.get("MEGATRONBERT_HOME", os.path.join(os.path.expanduser("~"), ".cache", "paddle_megatronbert"))


def download_pretrained_weights(name: str) -> str:
    """The directory holding ``model_state.pdparams`` of a registered name, downloading it once."""
    directory = os.path.join(cache_root(), name)
    target = os.path.join(directory, "model_state.pdparams")
    if os.path.isfile(target):
        return directory
    url = PRETRAINED_RESOURCE_FILES_MAP["model_state"][name]
    os.makedirs(directory, exist_ok=True)
    try:
        from paddle.utils.download import get_path_from_url

        downloaded = get_path_from_url(url, directory)
        if os.path.abspath(downloaded) != os.path.abspath(target):
            os.replace(downloaded, target)
    except Exception as err:
        raise OSError(
            f"cannot download the weights of {name} from {url} ({type(err).__name__}: {err}). Without a network, "
            f"convert the NGC checkpoint ({NGC_CHECKPOINT_URLS[name]}) with "
            f"`python tools/convert_checkpoint.py megatron_bert_345m.zip DIR` and pass DIR, or put "
            f"model_state.pdparams under $MEGATRONBERT_WEIGHTS_DIR/{name}/"
        ) from None
    return directory
