"""MegatronBertTokenizer: BERT WordPiece (PaddleNLP's BertTokenizer) with the registered vocabularies
shipped in the package, so a registered name resolves offline."""

from __future__ import annotations

import json
import os

from paddlenlp.transformers import BertTokenizer

_VOCAB_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vocab")
VOCAB_FILES = {
    "megatronbert-uncased": os.path.join(_VOCAB_DIR, "megatronbert-uncased-vocab.txt"),
    "megatronbert-cased": os.path.join(_VOCAB_DIR, "megatronbert-cased-vocab.txt"),
}
LOWER_CASE = {"megatronbert-uncased": True, "megatronbert-cased": False}


class MegatronBertTokenizer(BertTokenizer):
    """WordPiece tokenizer of the MegatronBERT checkpoints (BERT's cased or uncased vocabulary).

    Args:
        vocab_file: one token per line.
        do_lower_case: lower-case and strip accents (uncased vocab) or not (cased).
        Other keyword arguments as PaddleNLP's ``BertTokenizer`` (special tokens, ``model_max_length``).
    """

    resource_files_names = {"vocab_file": "vocab.txt"}
    pretrained_resource_files_map = {"vocab_file": dict(VOCAB_FILES)}
    pretrained_init_configuration = {name: {"do_lower_case": lower} for name, lower in LOWER_CASE.items()}
    max_model_input_sizes = {name: 512 for name in VOCAB_FILES}

    @classmethod
    def from_pretrained(cls, name_or_path, *args, **kwargs):
        """A registered name (its shipped vocab, offline) or a directory with ``vocab.txt``."""
        if name_or_path in VOCAB_FILES:
            vocab_file = VOCAB_FILES[name_or_path]
            if not os.path.isfile(vocab_file):
                raise FileNotFoundError(
                    f"the {name_or_path} vocabulary is not shipped with this package ({vocab_file}); pass "
                    "MegatronBertTokenizer(vocab_file=...) with BERT's cased vocab.txt (28996 tokens)"
                )
            kwargs.setdefault("do_lower_case", LOWER_CASE[name_or_path])
            kwargs.setdefault("model_max_length", 512)
            return cls(vocab_file, *args, **kwargs)
        if os.path.isdir(name_or_path):
            vocab_file = os.path.join(name_or_path, "vocab.txt")
            if not os.path.isfile(vocab_file):
                raise FileNotFoundError(f"{name_or_path} has no vocab.txt")
            for config_name in ("tokenizer_config.json", "config.json"):
                path = os.path.join(name_or_path, config_name)
                if "do_lower_case" not in kwargs and os.path.isfile(path):
                    with open(path, encoding="utf-8") as f:
                        saved = json.load(f)
                    if "do_lower_case" in saved:
                        kwargs["do_lower_case"] = saved["do_lower_case"]
            return cls(vocab_file, *args, **kwargs)
        if os.path.isfile(name_or_path):
            return cls(name_or_path, *args, **kwargs)
        raise ValueError(f"{name_or_path!r} is neither a registered name ({', '.join(VOCAB_FILES)}) nor a directory")
