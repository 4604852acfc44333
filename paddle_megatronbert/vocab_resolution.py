"""Which vocab file a run uses, and whether a vocab fits a model: the one home of these rules.

The runners (before any process group), the converter and the tokenizer all ask the same three questions:
how many tokens a vocab file has (:func:`count_vocab`), whether those tokens fit a model's embedding
(:func:`vocab_fit_problem`), and which vocab file a run should use (:func:`resolve_run_vocab`). This module
imports neither paddle nor paddlenlp, so argument checks and converters can use it in milliseconds.

A vocab the user names (``--tokenizer_name_or_path``, a model directory's ``vocab.txt``, a registered model
name) is checked and refused when it does not fit. A vocab the run would only imply (the registered vocab of
the config's casing) is used when it fits and skipped with one note when it does not: pretraining needs no
vocab file (the shards hold ids), so a tiny config with its own small vocab must not be refused for a vocab
nobody asked for.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional, Tuple

VOCAB_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vocab")
# The registered vocabularies shipped in the package, by model name.
REGISTERED_VOCABS = {
    "megatronbert-uncased": os.path.join(VOCAB_DIR, "megatronbert-uncased-vocab.txt"),
    "megatronbert-cased": os.path.join(VOCAB_DIR, "megatronbert-cased-vocab.txt"),
}
REGISTERED_LOWER_CASE = {"megatronbert-uncased": True, "megatronbert-cased": False}
# BERT's two WordPiece vocabularies, by their size before Megatron pads them.
KNOWN_VOCABS = {28996: "cased", 30522: "uncased"}
# Megatron-LM pads the vocab to a multiple of 128 x TP; checkpoints whose TP degree is unknown are allowed
# Megatron's usual 8 (so up to 1023 padding rows).
PADDING_MULTIPLE = 128
DEFAULT_PADDED_FOR_TP = 8


def read_vocab_tokens(path: str) -> List[str]:
    """The tokens of a WordPiece vocab file, id order: one per line; trailing blank lines (an editor's final
    newlines) are not tokens. Errors name the file."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
    except UnicodeDecodeError as err:
        raise ValueError(f"vocab file {path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


def count_vocab(path: str) -> int:
    """Tokens in a WordPiece vocab file (:func:`read_vocab_tokens`)."""
    return len(read_vocab_tokens(path))


def vocab_fit_problem(vocab_path: str, vocab_tokens: int, vocab_size: int, model_source: str,
                      padded_for_tp: Optional[int] = None) -> Optional[str]:
    """One line saying why a vocab does not fit a model's ``vocab_size`` embedding rows, or ``None``.

    A vocab with more tokens than rows never fits (its last ids would index past the embedding). With
    ``padded_for_tp`` the rows are known to be the vocab padded Megatron's way (to a multiple of 128 x TP),
    so more than that much padding also means another vocabulary: BERT's cased vocab (28996) with an
    uncased checkpoint (30592 rows) or the reverse.
    """
    known = {n: f" ({kind} BERT)" for n, kind in KNOWN_VOCABS.items()}
    padded = {-(-raw // PADDING_MULTIPLE) * PADDING_MULTIPLE: f" (BERT's {kind} {raw} padded)"
              for raw, kind in KNOWN_VOCABS.items()}
    about = f"vocab {vocab_path} has {vocab_tokens} tokens{known.get(vocab_tokens, '')}"
    rows = f"{vocab_size} embedding rows{padded.get(vocab_size, '')}"
    if vocab_tokens > vocab_size:
        return (f"the {about} but the model's vocab_size is {vocab_size} ({model_source}): its {rows} cannot hold "
                "them, so the vocab does not belong to this model")
    if padded_for_tp is not None:
        slack = PADDING_MULTIPLE * max(int(padded_for_tp), 1)
        if vocab_size - vocab_tokens >= slack:
            return (f"the {about} but the model has {rows} ({model_source}); padding adds fewer than {slack} "
                    "rows, so this is not the vocabulary (or casing) the weights were trained with")
    return None


def registered_vocab_for_rows(vocab_size: int, padded_for_tp: int = DEFAULT_PADDED_FOR_TP) -> Optional[str]:
    """The registered name whose shipped vocab fits an embedding of ``vocab_size`` rows padded Megatron's way
    (the casing of a checkpoint that ships no vocab, from its embedding size), or ``None``."""
    for name, path in REGISTERED_VOCABS.items():
        if vocab_fit_problem(path, count_vocab(path), vocab_size, "", padded_for_tp) is None:
            return name
    return None


def split_model_argument(model_name_or_path: Optional[str], config_file: Optional[str]) -> Tuple[Optional[str],
                                                                                                   Optional[str]]:
    """``(model_name_or_path, config_file)`` of a run, with a JSON file given as ``--model_name_or_path`` taken
    as the config (a model from scratch), as the runners' own hints suggest. Both at once is refused."""
    if model_name_or_path and os.path.isfile(model_name_or_path) and model_name_or_path.endswith(".json"):
        if config_file:
            raise ValueError(f"--model_name_or_path {model_name_or_path} is a JSON file and --config_file "
                             f"{config_file} is given too: pass the config once, as --config_file")
        return None, model_name_or_path
    if model_name_or_path and os.path.isfile(model_name_or_path):
        raise ValueError(f"--model_name_or_path {model_name_or_path} is a file but not a .json config: pass a "
                         "registered name or a model directory, or a config as --config_file")
    return model_name_or_path, config_file


@dataclass
class RunVocab:
    """The vocab a run uses.

    Args:
        path: the vocab file, or ``None`` when the run has none (nothing is saved beside its checkpoints).
        tokens: its token count (:func:`count_vocab`), ``None`` without a file.
        note: one line for the log when the choice is worth telling (an implied vocab skipped), else ``None``.
    """

    path: Optional[str]
    tokens: Optional[int]
    note: Optional[str] = None


def _named_vocab_path(name: str, flag: str) -> str:
    if os.path.isdir(name):
        path = os.path.join(name, "vocab.txt")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{flag} {name}: the directory has no vocab.txt")
        return path
    if os.path.isfile(name):
        return name
    if name in REGISTERED_VOCABS:
        return REGISTERED_VOCABS[name]
    raise FileNotFoundError(f"{flag} {name!r} is neither a vocab file, a directory with vocab.txt, nor a registered "
                            f"name ({', '.join(REGISTERED_VOCABS)})")


def resolve_run_vocab(tokenizer_name_or_path: Optional[str], model_name_or_path: Optional[str], config,
                      config_source: str, config_file: Optional[str] = None, required: bool = False) -> RunVocab:
    """The vocab file of a run, checked against ``config`` (a ``MegatronBertConfig``: ``vocab_size``,
    ``do_lower_case``).

    In this order: ``tokenizer_name_or_path`` (a vocab file, a directory with ``vocab.txt`` or a registered
    name); the ``vocab.txt`` of the model directory ``model_name_or_path``; the vocab of the registered name
    ``model_name_or_path`` (unless ``config_file`` replaces its config). These are named by the user: one that
    does not fit raises ``ValueError``. Otherwise the registered vocab of the config's casing is implied: used
    when it fits the config's embedding the way Megatron pads it, else skipped with a note (``path`` None) -
    or, with ``required`` (fine-tuning needs a tokenizer), a ``ValueError`` saying what to pass.
    """
    named, flag = None, "--model_name_or_path"
    if tokenizer_name_or_path:
        flag = "--tokenizer_name_or_path"
        named = _named_vocab_path(tokenizer_name_or_path, flag)
    elif model_name_or_path and os.path.isfile(os.path.join(model_name_or_path, "vocab.txt")):
        named = os.path.join(model_name_or_path, "vocab.txt")
    elif model_name_or_path in REGISTERED_VOCABS and not config_file:
        named = REGISTERED_VOCABS[model_name_or_path]
    if named is not None:
        tokens = count_vocab(named)
        problem = vocab_fit_problem(named, tokens, config.vocab_size, config_source)
        if problem:
            raise ValueError(f"{flag}: {problem}")
        return RunVocab(named, tokens)

    implied = "megatronbert-uncased" if config.do_lower_case else "megatronbert-cased"
    path = REGISTERED_VOCABS[implied]
    tokens = count_vocab(path)
    problem = vocab_fit_problem(path, tokens, config.vocab_size, config_source, DEFAULT_PADDED_FOR_TP)
    if problem is None:
        return RunVocab(path, tokens)
    if required:
        raise ValueError(f"no vocab for {model_name_or_path or config_source}: it has no vocab.txt and the shipped "
                         f"{implied} vocab does not fit it ({problem}); put the vocab the weights were trained "
                         "with beside them as vocab.txt")
    return RunVocab(None, None, note=(
        f"note: no vocab for this run (none named, and the {implied} vocab, {tokens} tokens, does not fit "
        f"vocab_size {config.vocab_size} of {config_source}); token ids come from the shards, no vocab.txt is "
        "saved with the checkpoints (pass --tokenizer_name_or_path to name one)"))
