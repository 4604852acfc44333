"""MegatronBertTokenizer: BERT WordPiece (PaddleNLP's BertTokenizer) with the registered vocabularies
shipped in the package, so a registered name resolves offline."""

from __future__ import annotations

import json
import os

from paddlenlp.transformers import BertTokenizer
from paddlenlp.transformers.bert.tokenizer import BasicTokenizer
from paddlenlp.transformers.tokenizer_utils import _is_punctuation

from .vocab_resolution import REGISTERED_LOWER_CASE as LOWER_CASE
from .vocab_resolution import REGISTERED_VOCABS as VOCAB_FILES
from .vocab_resolution import read_vocab_tokens


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

    Calls return ``attention_mask`` beside ``input_ids`` and ``token_type_ids`` (HF's habit), so
    ``model(**tokenizer(batch, padding=True, return_tensors="pd"))`` masks the padding.

    Args:
        vocab_file: one token per line.
        do_lower_case: lower-case and strip accents (uncased vocab) or not (cased).
        Other keyword arguments as PaddleNLP's ``BertTokenizer`` (special tokens, ``model_max_length``).
    """

    model_input_names = ["input_ids", "token_type_ids", "attention_mask"]
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

    @staticmethod
    def load_vocabulary(filepath, unk_token=None, pad_token=None, bos_token=None, eos_token=None, **kwargs):
        """PaddleNLP's reader, but tokens as ``vocab_resolution.read_vocab_tokens`` reads them (trailing blank
        lines are no tokens), so the tokenizer, the runners' checks and the converter count the same vocab."""
        from paddlenlp.data import Vocab

        token_to_idx = {token: index for index, token in enumerate(read_vocab_tokens(filepath))}
        return Vocab.from_dict(token_to_idx, unk_token=unk_token, pad_token=pad_token, bos_token=bos_token,
                               eos_token=eos_token, **kwargs)

    @classmethod
    def from_pretrained(cls, name_or_path, *args, **kwargs):
        """A registered name (its shipped vocab, offline), a vocab file, or a directory with ``vocab.txt``.

        A directory written by ``save_pretrained`` loads as PaddleNLP's loader reads it (added tokens,
        special tokens, ``model_max_length`` and the other ``tokenizer_config.json`` fields); a model
        directory without ``tokenizer_config.json`` takes ``do_lower_case`` and ``model_max_length``
        (= ``max_position_embeddings``) from its ``config.json``."""
        if name_or_path in VOCAB_FILES:
            vocab_file = VOCAB_FILES[name_or_path]
            if not os.path.isfile(vocab_file):
                raise FileNotFoundError(
                    f"the {name_or_path} vocabulary is not shipped with this package ({vocab_file}); pass "
                    "MegatronBertTokenizer(vocab_file=...) with BERT's cased vocab.txt (28996 tokens)"
                )
            kwargs.setdefault("do_lower_case", LOWER_CASE[name_or_path])
            kwargs.setdefault("model_max_length", 512)
            return cls._built(vocab_file, *args, **kwargs)
        if os.path.isdir(name_or_path):
            vocab_file = os.path.join(name_or_path, "vocab.txt")
            if not os.path.isfile(vocab_file):
                raise FileNotFoundError(f"{name_or_path} has no vocab.txt")
            saved = {}
            for config_name in ("config.json", "tokenizer_config.json"):  # the tokenizer's own file wins
                path = os.path.join(name_or_path, config_name)
                if os.path.isfile(path):
                    with open(path, encoding="utf-8") as f:
                        fields = json.load(f)
                    if config_name == "config.json" and "max_position_embeddings" in fields:
                        fields["model_max_length"] = fields["max_position_embeddings"]
                    saved.update({k: fields[k] for k in ("do_lower_case", "model_max_length") if k in fields})
            for key, value in saved.items():
                kwargs.setdefault(key, value)
            # PaddleNLP's loader reads tokenizer_config.json, special_tokens_map.json and added_tokens.json.
            return super().from_pretrained(name_or_path, *args, **kwargs)
        if os.path.isfile(name_or_path):
            return cls._built(name_or_path, *args, **kwargs)
        raise ValueError(f"{name_or_path!r} is neither a registered name ({', '.join(VOCAB_FILES)}) nor a directory")

    @classmethod
    def _built(cls, vocab_file, *args, **kwargs):
        """The tokenizer over ``vocab_file``, its special tokens (``additional_special_tokens`` too) in the
        vocabulary and never split, as PaddleNLP's and HF's loaders leave them."""
        tokenizer = cls(vocab_file, *args, **kwargs)
        tokenizer.sanitize_special_tokens()
        return tokenizer
