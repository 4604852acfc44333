"""Writing a converted checkpoint: a Paddle model directory that ``MegatronBertFor*.from_pretrained`` loads,
or, for export, an HF directory or Megatron-LM shards.

The output is built under a temporary name beside DST and renamed at the end, so a failed conversion
leaves no half-written DST. Tensors are cast to the output dtype as they arrive from the reader, so the
converted model is the only full copy in memory.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
import zipfile
from typing import Any, Dict, List, Optional

import numpy as np

from ..checkpoint.files import PADDLE_WEIGHTS_NAME, WEIGHTS_NAME
from ..checkpoint.weights import write_pdparams, write_safetensors
from ..vocab_resolution import (DEFAULT_PADDED_FOR_TP, REGISTERED_LOWER_CASE, REGISTERED_VOCABS, count_vocab,
                                registered_vocab_for_rows, vocab_fit_problem)
from .hf import hf_config_dict, to_hf_tensors
from .megatron import MegatronCheckpoint, padded_vocab_size, write_megatron_checkpoint, zip_vocab_member
from .torch_checkpoints import Checkpoint, open_checkpoint

logger = logging.getLogger(__name__)

OUTPUT_DTYPES = ("float32", "float16", "bfloat16")
REPORT_NAME = "conversion_report.json"


def cast_tensor(array: np.ndarray, dtype: str):
    """A float array in the output dtype: numpy for float32/float16, a Paddle bfloat16 tensor for
    bfloat16 (numpy has no bfloat16). Integer arrays are left alone."""
    if not np.issubdtype(array.dtype, np.floating):
        return array
    if dtype == "bfloat16":
        import paddle

        return paddle.to_tensor(np.asarray(array, dtype=np.float32)).astype("bfloat16")
    return array.astype(dtype, copy=False)


def find_vocab_file(source: str, checkpoint: Checkpoint, workdir: str) -> Optional[str]:
    """The vocab file shipped with a checkpoint: ``vocab.txt`` in (or beside) SRC, a vocab member of a zip,
    or the file that a Megatron checkpoint's ``args.vocab_file`` names, if it exists here."""
    candidates = []
    if os.path.isdir(source):
        candidates.append(os.path.join(source, "vocab.txt"))
    elif source.endswith(".zip") and zipfile.is_zipfile(source):
        member = zip_vocab_member(source)
        if member:
            with zipfile.ZipFile(source) as archive:
                target = os.path.join(workdir, "vocab.txt")
                with archive.open(member) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
            candidates.append(target)
    else:
        candidates.append(os.path.join(os.path.dirname(os.path.abspath(source)), "vocab.txt"))
    if isinstance(checkpoint, MegatronCheckpoint) and checkpoint.args.get("vocab_file"):
        candidates.append(str(checkpoint.args["vocab_file"]))
    return next((c for c in candidates if os.path.isfile(c)), None)


def check_vocab_fits(vocab_path: str, vocab_tokens: int, embedding_rows: int, tensor_parallel_degree: int,
                     allow_mismatch: bool) -> Optional[str]:
    """An error for a vocab file the checkpoint was not trained with (``None`` when it fits): the rule is
    ``vocab_resolution.vocab_fit_problem`` with Megatron's padding to a multiple of 128 x TP."""
    message = vocab_fit_problem(vocab_path, vocab_tokens, embedding_rows, "the checkpoint", tensor_parallel_degree)
    if message is None:
        return None
    if allow_mismatch:
        logger.warning("%s (kept: --allow_vocab_mismatch)", message)
        return None
    return message + "; pass --allow_vocab_mismatch to keep it anyway"


def _write_tokenizer(target_dir: str, vocab_path: str, config, to: str) -> None:
    shutil.copyfile(vocab_path, os.path.join(target_dir, "vocab.txt"))
    if to == "megatron":  # Megatron-LM takes the vocab as --vocab-file; its casing is in args.tokenizer_type
        return
    tokenizer_config = {"do_lower_case": bool(config.do_lower_case), "model_max_length": config.max_position_embeddings,
                        "tokenizer_class": "MegatronBertTokenizer" if to == "paddle" else "BertTokenizer"}
    with open(os.path.join(target_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(tokenizer_config, f, indent=2)
        f.write("\n")


TARGETS = ("paddle", "hf", "megatron")


def convert_checkpoint(source: str, destination: str, kind: Optional[str] = None, to: str = "paddle",
                       dtype: str = "float32", vocab_file: Optional[str] = None, overwrite: bool = False,
                       num_attention_heads: Optional[int] = None, allow_vocab_mismatch: bool = False,
                       tensor_parallel_degree: int = 1, verify: bool = False,
                       safe_serialization: bool = True, megatron_layout: str = "core") -> Dict[str, Any]:
    """Convert a checkpoint (HF, Megatron-LM or one of our Paddle directories, see ``open_checkpoint``)
    into ``destination``, written whole or not at all, and return the conversion report.

    ``to="paddle"``: ``config.json`` + ``model.safetensors`` (``safe_serialization=False``:
    ``model_state.pdparams``); ``"hf"``: ``config.json`` +
    ``model.safetensors`` for ``transformers``; ``"megatron"``: ``release/mp_rank_XX/model_optim_rng.pt``
    for ``tensor_parallel_degree`` ranks + ``latest_checkpointed_iteration.txt``, in ``megatron_layout``
    (``core``: what Megatron-LM loads today; ``legacy``: the legacy BERT). Beside them ``vocab.txt``
    (and ``tokenizer_config.json``) when a vocab is known, and ``conversion_report.json``. ``verify``
    runs a probe batch through the source in its own framework and through the result (needs torch and
    transformers; HF <-> Paddle only).
    """
    if dtype not in OUTPUT_DTYPES:
        raise ValueError(f"dtype must be one of {OUTPUT_DTYPES}, got {dtype!r}")
    if to not in TARGETS:
        raise ValueError(f"unknown target {to!r}; choose one of {TARGETS}")
    if tensor_parallel_degree < 1 or (tensor_parallel_degree > 1 and to != "megatron"):
        raise ValueError(f"tensor_parallel_degree={tensor_parallel_degree}: shards are written only for "
                         "--to megatron (Paddle directories load at any TP degree as they are)")
    if vocab_file is not None and not os.path.isfile(vocab_file):
        raise FileNotFoundError(f"vocab file not found: {vocab_file}")
    destination = os.path.abspath(destination)
    if os.path.exists(destination) and not overwrite and (not os.path.isdir(destination) or os.listdir(destination)):
        raise FileExistsError(f"{destination} already exists; pass --overwrite to replace it")
    parent = os.path.dirname(destination)
    os.makedirs(parent, exist_ok=True)
    base = os.path.basename(destination)
    partial = tempfile.mkdtemp(prefix=f".{base}.partial-", dir=parent)
    workdir = tempfile.mkdtemp(prefix=f".{base}.extract-", dir=parent)
    try:
        started = time.time()
        checkpoint = open_checkpoint(source, kind, workdir, num_attention_heads)
        config = checkpoint.config
        notes = checkpoint.notes

        vocab_path = vocab_file or find_vocab_file(source, checkpoint, workdir)
        # HF and Paddle configs do not say the TP degree the vocab was padded for: allow Megatron's usual 8.
        padded_for = checkpoint.tensor_parallel_degree if checkpoint.kind == "megatron" else DEFAULT_PADDED_FOR_TP
        if vocab_path is None:
            # The NGC zips ship no vocab: the embedding's rows tell which of BERT's two vocabularies it is.
            bundled = registered_vocab_for_rows(config.vocab_size, padded_for)
            if bundled is not None:
                vocab_path = REGISTERED_VOCABS[bundled]
                config.do_lower_case = REGISTERED_LOWER_CASE[bundled]
                notes.append(f"the source ships no vocab: added the bundled {bundled} vocab ({vocab_path}), "
                             f"the one whose size fits the {config.vocab_size} embedding rows; pass --vocab_file "
                             "to use another")
        vocab_tokens = count_vocab(vocab_path) if vocab_path else None
        if vocab_path:
            error = check_vocab_fits(vocab_path, vocab_tokens, config.vocab_size, padded_for, allow_vocab_mismatch)
            if error:
                raise ValueError(error)

        tensors = _write_weights(checkpoint, partial, to, dtype, tensor_parallel_degree, vocab_tokens,
                                 safe_serialization, megatron_layout)
        if to == "megatron":
            config.vocab_size = padded_vocab_size(vocab_tokens or config.vocab_size, tensor_parallel_degree)
        config.dtype = dtype
        if to == "paddle":
            with open(os.path.join(partial, "config.json"), "w", encoding="utf-8") as f:
                f.write(config.to_json_string())
        elif to == "hf":
            with open(os.path.join(partial, "config.json"), "w", encoding="utf-8") as f:
                json.dump(hf_config_dict(config, notes), f, indent=2)
                f.write("\n")
        if vocab_path:
            _write_tokenizer(partial, vocab_path, config, to)
        else:
            notes.append("no vocab file found: pass --vocab_file to ship one with the weights (the registered "
                         "vocabs: MegatronBertTokenizer.from_pretrained('megatronbert-cased'/'-uncased'))")
        report = _report(source, checkpoint, to, dtype, vocab_path, vocab_tokens, tensors, tensor_parallel_degree)
        if verify:
            from ..verify import verify_conversion

            report["verify"] = verify_conversion(source, checkpoint, partial, to)
        report["seconds"] = round(time.time() - started, 2)
        with open(os.path.join(partial, REPORT_NAME), "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
        _replace_directory(partial, destination)
        return report
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _write_weights(checkpoint: Checkpoint, directory: str, to: str, dtype: str, tensor_parallel_degree: int,
                   vocab_tokens: Optional[int],
                   safe_serialization: bool = True, megatron_layout: str = "core") -> List[Dict]:
    """Convert tensor by tensor into the target's layout and write it; returns the report's tensor list."""
    config, tensors, state = checkpoint.config, [], {}
    for name, value, source_name in checkpoint.iter_tensors():
        entry = {"source": source_name, "target": name, "shape": list(value.shape)}
        if to == "paddle":
            state[name] = cast_tensor(value, dtype)  # the float32 copy goes now; only the output dtype stays
        elif to == "hf":
            hf = to_hf_tensors(name, value, config)
            state.update(hf)
            entry["target"], entry["shape"] = hf[0][0], list(hf[0][1].shape)
        else:
            state[name] = value
        tensors.append(entry)
        del value
    if to == "paddle":
        if safe_serialization:
            write_safetensors(state, os.path.join(directory, WEIGHTS_NAME))
        else:
            write_pdparams(state, os.path.join(directory, PADDLE_WEIGHTS_NAME))
    elif to == "hf":
        write_safetensors(state, os.path.join(directory, WEIGHTS_NAME), {"format": "pt"}, dtype=dtype)
    else:
        names = write_megatron_checkpoint(directory, config, state, tensor_parallel_degree,
                                          vocab_tokens or config.vocab_size, dtype, checkpoint.notes,
                                          layout=megatron_layout)
        for entry in tensors:
            entry["target"] = names.get(entry["target"], f"(left out) {entry['target']}")
    return tensors


def _replace_directory(new: str, destination: str) -> None:
    """Put the finished directory in place: a plain rename, or swap with an existing DST."""
    if not os.path.exists(destination):
        os.rename(new, destination)
        return
    old = destination + f".old-{os.getpid()}"
    os.rename(destination, old)
    os.rename(new, destination)
    shutil.rmtree(old) if os.path.isdir(old) else os.remove(old)


def _report(source, checkpoint: Checkpoint, to, dtype, vocab_path, vocab_tokens, tensors: List[Dict],
            tensor_parallel_degree) -> Dict:
    config = checkpoint.config
    return {
        "source": os.path.abspath(source),
        "source_kind": checkpoint.kind,
        "target_kind": to,
        "checkpoint_version": checkpoint.checkpoint_version,
        "naming": checkpoint.naming,
        "tensor_parallel_degree": checkpoint.tensor_parallel_degree,
        "target_tensor_parallel_degree": tensor_parallel_degree,
        "read_with": checkpoint.read_with,
        "dtype": dtype,
        "vocab": {"raw": vocab_tokens, "padded": config.vocab_size, "vocab_file": vocab_path,
                  "casing": "uncased" if config.do_lower_case else "cased"},
        "activations": {"hidden_act": config.hidden_act, "lm_head_act": config.lm_head_act or config.hidden_act},
        "layer_norm_eps": config.layer_norm_eps,
        "notes": list(checkpoint.notes),
        "tensors": tensors,
    }
