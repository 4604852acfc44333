"""MegatronBertTokenizer: BERT WordPiece (PaddleNLP's BertTokenizer) with the registered vocabularies
shipped in the package, so a registered name resolves offline."""

from __future__ import annotations

import json
import os

from paddlenlp.transformers import BertTokenizer
from paddlenlp.transformers.bert.tokenizer import BasicTokenizer
from paddlenlp.transformers.tokenizer_utils import _is_punctuation

_VOCAB_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vocab")
VOCAB_FILES = {
    "megatronbert-uncased": os.path.join(_VOCAB_DIR, "megatronbert-uncased-vocab.txt"),
    "megatronbert-cased": os.path.join(_VOCAB_DIR, "megatronbert-cased-vocab.txt"),
}
LOWER_CASE = {"megatronbert-uncased": True, "megatronbert-cased": False}


class _GoogleBasicTokenizer(BasicTokenizer):
    """PaddleNLP's BasicTokenizer also splits on Unicode symbols (``x²`` -> ``x ²``); Google's BERT, which the
    checkpoints' vocab was built with (and HF), splits on punctuation only."""

    def _run_split_on_punc(self, text, never_split=None):
        if never_split is not None and text in never_split:
            return [text]
        words, start_new_word = [], True
        for char in text:
            if _is_punctuation(char):
                words.append(char)
                start_new_word = True
            else:
                if start_new_word:
                    words.append("")
                start_new_word = False
                words[-1] += char
        return words


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

    def __init__(self, vocab_file, do_lower_case=True, **kwargs):
        super().__init__(vocab_file, do_lower_case=do_lower_case, **kwargs)
        if getattr(self, "basic_tokenizer", None) is not None:
            basic = self.basic_tokenizer
            self.basic_tokenizer = _GoogleBasicTokenizer(
                do_lower_case=basic.do_lower_case, never_split=basic.never_split,
                tokenize_chinese_chars=basic.tokenize_chinese_chars, strip_accents=basic.strip_accents,
            )

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
