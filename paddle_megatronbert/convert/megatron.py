"""Megatron-LM BERT checkpoints (NGC zips, training output, TP/PP shards, torch_dist) -> our names, and back.

A ``torch``-format checkpoint is one ``model_optim_rng.pt`` per model-parallel rank (``mp_rank_TT`` or,
pipeline-parallel, ``mp_rank_TT_PPP``, each stage numbering its layers from 0). Each holds ``model``
(nested dicts of tensors), usually ``checkpoint_version`` and ``args``, and optimizer/RNG state (ignored).
A ``torch_dist`` checkpoint (megatron-core's default) is a ``torch.distributed.checkpoint`` directory of
full (global) tensors, layers stacked on a leading axis; it is read with torch's own reader.
Every tensor is first given a *role* (``qkv`` of layer 3, ``word_embeddings`` ...) by the name tables
below, one table per naming generation; the roles then say how the ranks' shards merge and what our
parameter is called. Which args change the math, and how each is converted or refused, is
:data:`MATH_ARGS` / :func:`check_math_args`. Tensors are merged, split and transposed one at a time, so
the converted model is the only full copy in memory (the shards are memory-mapped where torch allows it).
"""

from __future__ import annotations

import io
import logging
import os
import re
import shutil
import zipfile
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np

from .. import tp_plan
from ..configuration import MegatronBertConfig
from .tensor_files import flatten_state, load_torch_pickle, tensor_to_numpy

logger = logging.getLogger(__name__)

CHECKPOINT_FILES = ("model_optim_rng.pt", "model_rng.pt")
KNOWN_CHECKPOINT_VERSIONS = (0, 1, 2, 3)

# ---- names -> roles ------------------------------------------------------------------------------
# (regex on the flattened name, role). Groups: the layer index (for layer roles), then weight/bias.
_LAYER = r"language_model\.(?:transformer|encoder)\.layers\.(\d+)\."
LEGACY_NAMES = [  # Megatron-LM's legacy model (megatron/model, later megatron/legacy/model: *_norm since 2024)
    (r"language_model\.embedding\.word_embeddings\.(weight)", "word_embeddings"),
    (r"language_model\.embedding\.position_embeddings\.(weight)", "position_embeddings"),
    (r"language_model\.embedding\.tokentype_embeddings\.(weight)", "token_type_embeddings"),
    (_LAYER + r"input_(?:layer)?norm\.(weight|bias)", "attention_ln"),
    (_LAYER + r"(?:attention|self_attention)\.query_key_value\.(weight|bias)", "qkv"),
    (_LAYER + r"(?:attention|self_attention)\.dense\.(weight|bias)", "attention_dense"),
    (_LAYER + r"post_attention_(?:layer)?norm\.(weight|bias)", "mlp_ln"),
    (_LAYER + r"mlp\.dense_h_to_4h\.(weight|bias)", "fc1"),
    (_LAYER + r"mlp\.dense_4h_to_h\.(weight|bias)", "fc2"),
    (r"language_model\.(?:transformer|encoder)\.final_(?:layer)?norm\.(weight|bias)", "final_ln"),
    (r"language_model\.pooler\.dense\.(weight|bias)", "pooler"),
    (r"lm_head\.dense\.(weight|bias)", "lm_dense"),
    (r"lm_head\.layernorm\.(weight|bias)", "lm_ln"),
    (r"lm_head\.(bias)", "lm_bias"),
    (r"binary_head\.(weight|bias)", "binary_head"),
]
_CORE_LAYER = r"encoder\.layers\.(\d+)\."
CORE_NAMES = [  # Megatron-core's BertModel, legacy (non-distributed) torch format; TE specs fuse the LNs
    (r"embedding\.word_embeddings\.(weight)", "word_embeddings"),
    (r"embedding\.position_embeddings\.(weight)", "position_embeddings"),
    (r"embedding\.tokentype_embeddings\.(weight)", "token_type_embeddings"),
    (_CORE_LAYER + r"input_layernorm\.(weight|bias)", "attention_ln"),
    (_CORE_LAYER + r"self_attention\.linear_qkv\.layer_norm_(weight|bias)", "attention_ln"),
    (_CORE_LAYER + r"self_attention\.linear_qkv\.(weight|bias)", "qkv"),
    (_CORE_LAYER + r"self_attention\.linear_proj\.(weight|bias)", "attention_dense"),
    (_CORE_LAYER + r"pre_mlp_layernorm\.(weight|bias)", "mlp_ln"),
    (_CORE_LAYER + r"mlp\.linear_fc1\.layer_norm_(weight|bias)", "mlp_ln"),
    (_CORE_LAYER + r"mlp\.linear_fc1\.(weight|bias)", "fc1"),
    (_CORE_LAYER + r"mlp\.linear_fc2\.(weight|bias)", "fc2"),
    (r"encoder\.final_layernorm\.(weight|bias)", "final_ln"),
    (r"pooler\.dense\.(weight|bias)", "pooler"),
    (r"lm_head\.dense\.(weight|bias)", "lm_dense"),
    (r"lm_head\.layer_?norm\.(weight|bias)", "lm_ln"),
    (r"output_layer\.(bias)", "lm_bias"),
    (r"output_layer\.(weight)", "decoder"),
    (r"binary_head\.(weight|bias)", "binary_head"),
]
# Tensors that carry no weights of ours: Transformer Engine's serialized state, the pipeline-parallel
# copy of the word embeddings (equal to them in a TP checkpoint).
_IGNORED = re.compile(r"(_extra_state|word_embeddings_for_head\.weight|\.inv_freq)$")

# Our parameter for each role ({i}: layer, {p}: weight/bias); qkv is split into three.
TARGETS = {
    "word_embeddings": "bert.embeddings.word_embeddings.weight",
    "position_embeddings": "bert.embeddings.position_embeddings.weight",
    "token_type_embeddings": "bert.embeddings.token_type_embeddings.weight",
    "attention_ln": "bert.encoder.layer.{i}.attention.ln.{p}",
    "qkv": "bert.encoder.layer.{i}.attention.self.{qkv}.{p}",
    "attention_dense": "bert.encoder.layer.{i}.attention.output.dense.{p}",
    "mlp_ln": "bert.encoder.layer.{i}.ln.{p}",
    "fc1": "bert.encoder.layer.{i}.intermediate.dense.{p}",
    "fc2": "bert.encoder.layer.{i}.output.dense.{p}",
    "final_ln": "bert.encoder.ln.{p}",
    "pooler": "bert.pooler.dense.{p}",
    "lm_dense": "cls.predictions.transform.dense.{p}",
    "lm_ln": "cls.predictions.transform.LayerNorm.{p}",
    "lm_bias": "cls.predictions.bias",
    "decoder": "cls.predictions.decoder_weight",
    "binary_head": "cls.seq_relationship.{p}",
}
LINEAR_ROLES = {"qkv", "attention_dense", "fc1", "fc2", "pooler", "lm_dense", "binary_head"}
LAYER_ROLES = ("attention_ln", "qkv", "attention_dense", "mlp_ln", "fc1", "fc2")
# Parts that a checkpoint either has whole or not at all (Megatron drops the pooler and binary head
# with --bert-no-binary-head, the token types with it too).
OPTIONAL_GROUPS = {
    "pooler": [("pooler", "weight"), ("pooler", "bias")],
    "binary head": [("binary_head", "weight"), ("binary_head", "bias")],
    "LM head": [("lm_dense", "weight"), ("lm_dense", "bias"), ("lm_ln", "weight"), ("lm_ln", "bias"),
                ("lm_bias", "bias")],
}


def tensor_parallel_kind(role: str, param: str) -> Optional[str]:
    """How a role is split over tensor-parallel ranks: our parameter's kind in ``tp_plan`` (Megatron
    splits the same dims), except the fused QKV, which Megatron splits by heads (``qkv``)."""
    if role == "qkv":
        return "qkv"
    return tp_plan.split_kind(TARGETS[role].format(i=0, p=param, qkv="query"))


RoleKey = Tuple[str, Optional[int], str]  # (role, layer index or None, "weight"/"bias")


# ---- args that change the math ---------------------------------------------------------------------
# Every Megatron-LM arg (legacy and megatron-core spellings) that changes what a BERT computes, beside the
# values under which it computes what MegatronBERT here computes. Absent = an older Megatron-LM that did
# not have it = the neutral value. Converted elsewhere, so not listed: openai_gelu / bias_gelu_fusion /
# onnx_safe (MegatronCheckpoint._activations), apply_layernorm_1p / layernorm_zero_centered_gamma
# (gamma + 1), add_bias_linear / disable_bias_linear / add_qkv_bias (zero biases),
# untie_embeddings_and_output_weights (a separate decoder), layernorm_epsilon / norm_epsilon (eps),
# group_query_attention and kv_channels (checked below).
MATH_ARGS = (  # (arg, neutral values, what a different value changes)
    ("normalization", ("LayerNorm",), "the normalization"),
    ("squared_relu", (False,), "the MLP activation (squared ReLU)"),
    ("swiglu", (False,), "the MLP (gated SiLU)"),
    ("quick_geglu", (False,), "the MLP (gated quick-GELU)"),
    ("qk_layernorm", (False,), "attention (LayerNorm on queries and keys)"),
    ("qk_l2_norm", (False,), "attention (L2 norm on queries and keys)"),
    ("position_embedding_type", ("learned_absolute",), "the position encoding"),
    ("use_rotary_position_embeddings", (False,), "the position encoding (rotary)"),
    ("add_position_embedding", (True,), "the position encoding (none)"),
    ("apply_residual_connection_post_layernorm", (False,), "the residual (taken after the LayerNorm)"),
    ("multi_latent_attention", (False,), "attention (multi-latent)"),
    ("num_experts", (None, 0, 1), "the MLP (mixture of experts)"),
    ("softmax_type", ("vanilla",), "attention's softmax"),
    ("attention_output_gate", (False,), "attention (gated output)"),
    ("experimental_attention_variant", (None,), "attention"),
    ("heterogeneous_layers_config_path", (None,), "the layers (heterogeneous)"),
)
# Linear layers whose bias --disable-bias-linear removes (the QKV keeps one with --add-qkv-bias).
BIAS_LINEAR_ROLES = ("qkv", "attention_dense", "fc1", "fc2")
ZERO_CENTERED_LN_ROLES = ("attention_ln", "mlp_ln", "final_ln", "lm_ln")


def _arg(args: Dict[str, Any], *names, default=None):
    for name in names:
        if args.get(name) is not None:
            return _enum_value(args[name])
    return default


def check_math_args(args: Dict[str, Any], generation: str, path: str) -> Tuple[str, ...]:
    """Refuse, in one line naming it, every arg of :data:`MATH_ARGS` (and GQA, kv_channels, legacy
    LayerNorm-1p) whose value makes the checkpoint compute something MegatronBERT does not; return the
    linear roles whose biases ``--disable-bias-linear`` removed (converted as zeros)."""
    def refuse(name, value, what):
        return ValueError(f"{path}: args.{name}={value!r} changes {what}, which MegatronBERT does not compute: "
                          "not converted")

    for name, neutral, what in MATH_ARGS:
        value = _arg(args, name)
        if value is not None and value not in neutral:
            raise refuse(name, value, what)
    heads, hidden = _arg(args, "num_attention_heads"), _arg(args, "hidden_size")
    groups = _arg(args, "num_query_groups")
    if _arg(args, "group_query_attention", default=False) and groups not in (None, heads):
        raise refuse("num_query_groups", groups, f"attention (grouped queries, {heads} heads)")
    kv_channels = _arg(args, "kv_channels")
    if kv_channels is not None and heads and hidden and int(kv_channels) * int(heads) != int(hidden):
        raise refuse("kv_channels", kv_channels, f"the head size (hidden {hidden} / {heads} heads)")
    if generation == "legacy" and _arg(args, "apply_layernorm_1p", "layernorm_zero_centered_gamma", default=False):
        raise refuse("apply_layernorm_1p", True, "the legacy model's LayerNorms (gamma + 1 in some of them)")
    bias_linear = _arg(args, "add_bias_linear", default=True) and not _arg(args, "disable_bias_linear", default=False)
    if bias_linear:
        return ()
    return tuple(r for r in BIAS_LINEAR_ROLES if not (r == "qkv" and _arg(args, "add_qkv_bias", default=False)))


def role_of(name: str) -> Optional[RoleKey]:
    """The role key of a flattened Megatron name (legacy or Megatron-core), or None if no table knows it."""
    for pattern, role in LEGACY_NAMES + CORE_NAMES:
        match = re.fullmatch(pattern, name)
        if match:
            groups = match.groups()
            return role, (int(groups[0]) if role in LAYER_ROLES else None), groups[-1]
    return None


# ---- fused QKV -------------------------------------------------------------------------------------
def split_fused_qkv(array: np.ndarray, checkpoint_version: float, num_heads: int, head_dim: int):
    """Megatron's fused ``query_key_value`` rows -> (q, k, v), each ``[num_heads * head_dim, ...]``.

    The row order depends on ``checkpoint_version``: 0 stores ``[3, heads, head_dim]``, 1.0
    ``[heads, head_dim, 3]``, 2.0 and later (and Megatron-core) ``[heads, 3, head_dim]``.
    ``num_heads`` is the number of heads in ``array`` (one rank's heads for a TP shard).
    """
    rest = array.shape[1:]
    if checkpoint_version < 1:
        grouped = array.reshape((3, num_heads, head_dim) + rest)
    elif checkpoint_version < 2:
        grouped = np.moveaxis(array.reshape((num_heads, head_dim, 3) + rest), 2, 0)
    else:
        grouped = np.moveaxis(array.reshape((num_heads, 3, head_dim) + rest), 1, 0)
    return [grouped[j].reshape((num_heads * head_dim,) + rest) for j in range(3)]


def fuse_qkv(q: np.ndarray, k: np.ndarray, v: np.ndarray, checkpoint_version: float, num_heads: int,
             head_dim: int) -> np.ndarray:
    """The inverse of :func:`split_fused_qkv`."""
    rest = q.shape[1:]
    grouped = np.stack([x.reshape((num_heads, head_dim) + rest) for x in (q, k, v)])  # (3, nh, hd, ...)
    if checkpoint_version < 1:
        ordered = grouped
    elif checkpoint_version < 2:
        ordered = np.moveaxis(grouped, 0, 2)
    else:
        ordered = np.moveaxis(grouped, 0, 1)
    return np.ascontiguousarray(ordered).reshape((3 * num_heads * head_dim,) + rest)


# ---- finding the shards ---------------------------------------------------------------------------
_RANK_DIR = re.compile(r"mp_rank_(\d+)(_(\d+))?$")


def is_distributed_checkpoint(directory: str) -> bool:
    """Megatron-core's ``torch_dist`` format: ``metadata.json`` / ``.metadata`` beside ``*.distcp``."""
    try:
        names = os.listdir(directory)
    except OSError:
        return False
    return any(n.endswith(".distcp") for n in names)


# Megatron-LM's checkpoint conversion (--ckpt-convert-save NEW_DIR) writes NEW_DIR/torch (or torch_dist).
CONVERTED_SUBDIRS = ("torch", "torch_dist")


def _converted_subdir(directory: str) -> Optional[str]:
    """``NEW_DIR/torch`` (or ``torch_dist``) when ``directory`` is the NEW_DIR of Megatron-LM's conversion."""
    for name in CONVERTED_SUBDIRS:
        sub = os.path.join(directory, name)
        if os.path.isdir(sub) and os.path.isfile(os.path.join(sub, "latest_checkpointed_iteration.txt")):
            return sub
    return None


def _iteration_dir(directory: str) -> str:
    """The directory holding ``mp_rank_XX`` of a Megatron checkpoint directory: the one named by
    ``latest_checkpointed_iteration.txt``, else ``release/``, else the highest ``iter_XXXXXXX/``."""
    tracker = os.path.join(directory, "latest_checkpointed_iteration.txt")
    if os.path.isfile(tracker):
        with open(tracker, encoding="utf-8") as f:
            text = f.read().strip()
        if text == "release":
            chosen = os.path.join(directory, "release")
        elif text.isdigit():
            chosen = os.path.join(directory, f"iter_{int(text):07d}")
        else:
            raise ValueError(f"{tracker} says {text[:50]!r}; expected 'release' or an iteration number")
        if not os.path.isdir(chosen):
            raise FileNotFoundError(f"{tracker} names {os.path.basename(chosen)}, which is not in {directory}")
        return chosen
    if os.path.isdir(os.path.join(directory, "release")):
        return os.path.join(directory, "release")
    iterations = sorted(n for n in os.listdir(directory) if re.fullmatch(r"iter_\d+", n))
    if iterations:
        if len(iterations) > 1:
            logger.info("%s holds %d iterations; converting the last, %s", directory, len(iterations), iterations[-1])
        return os.path.join(directory, iterations[-1])
    return directory


def _checkpoint_file(rank_dir: str) -> str:
    for name in CHECKPOINT_FILES:
        path = os.path.join(rank_dir, name)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"{rank_dir} has no {' or '.join(CHECKPOINT_FILES)}")


def _order_ranks(rank_names: List[str], where: str) -> List[List[str]]:
    """``mp_rank_TT`` / ``mp_rank_TT_PPP`` names as a grid: one list per TP rank of its PP stages, in
    order. Gaps and a mix of both spellings are errors."""
    grid: Dict[Tuple[int, int], str] = {}
    spellings = set()
    for name in rank_names:
        match = _RANK_DIR.match(name)
        spellings.add(bool(match.group(2)))
        grid[(int(match.group(1)), int(match.group(3) or 0))] = name
    if len(spellings) > 1:
        raise ValueError(f"inconsistent shards in {where}: both mp_rank_TT and mp_rank_TT_PPP directories")
    tp = max(t for t, _ in grid) + 1
    pp = max(p for _, p in grid) + 1
    for t in range(tp):
        for p in range(pp):
            if (t, p) not in grid:
                label = f"mp_rank_{t:02d}_{p:03d}" if pp > 1 or spellings == {True} else f"mp_rank_{t:02d}"
                raise ValueError(f"inconsistent TP/PP shards in {where}: {label} is missing (found "
                                 f"{', '.join(sorted(grid.values()))})")
    return [[grid[(t, p)] for p in range(pp)] for t in range(tp)]


def find_shard_files(source: str, workdir: Optional[str] = None) -> List[List[str]]:
    """The ``model_optim_rng.pt`` files as a grid: one list per tensor-parallel rank (in rank order) of
    its pipeline stages' files (in stage order; one for a checkpoint without PP). ``source`` is an NGC
    zip (its members are extracted into ``workdir``), a Megatron checkpoint directory (or the NEW_DIR of
    Megatron-LM's conversion, holding ``torch/``), an iteration directory, an ``mp_rank_XX`` directory or
    a single ``.pt`` file. ``torch_dist`` directories are read by :func:`read_distributed_checkpoint`."""
    if not os.path.exists(source):
        raise FileNotFoundError(f"no such checkpoint: {source}")
    if os.path.isfile(source):
        if source.endswith(".zip"):
            return _extract_zip(source, workdir)
        return [[source]]  # a torch file (itself a zip archive since torch 1.6, but not one of ours)
    if _RANK_DIR.match(os.path.basename(os.path.normpath(source))):
        return [[_checkpoint_file(source)]]
    for name in CHECKPOINT_FILES:
        if os.path.isfile(os.path.join(source, name)):
            return [[os.path.join(source, name)]]
    converted = _converted_subdir(source)
    if converted is not None and not os.path.isfile(os.path.join(source, "latest_checkpointed_iteration.txt")):
        source = converted
    iteration = _iteration_dir(source)
    rank_names = [n for n in os.listdir(iteration)
                  if _RANK_DIR.match(n) and os.path.isdir(os.path.join(iteration, n))]
    if not rank_names:
        raise ValueError(f"{source} is not a Megatron checkpoint: no latest_checkpointed_iteration.txt, release/, "
                         "iter_XXXXXXX/, mp_rank_XX/, torch/ or model_optim_rng.pt in it")
    return [[_checkpoint_file(os.path.join(iteration, n)) for n in stages]
            for stages in _order_ranks(rank_names, iteration)]


def distributed_checkpoint_dir(source: str) -> Optional[str]:
    """The ``torch_dist`` iteration directory ``source`` is or holds (directly, via the tracker file or
    ``iter_XXXXXXX``/``release``, or as Megatron-LM's conversion NEW_DIR), else None."""
    if not os.path.isdir(source):
        return None
    if is_distributed_checkpoint(source):
        return source
    candidates = [source] + [c for c in (_converted_subdir(source),) if c]
    for directory in candidates:
        try:
            iteration = _iteration_dir(directory)
        except (ValueError, FileNotFoundError):
            continue
        if is_distributed_checkpoint(iteration):
            return iteration
    return None


def _extract_zip(path: str, workdir: Optional[str]) -> List[str]:
    """Extract the shards of one iteration of a zipped checkpoint (e.g. NGC's ``release/mp_rank_00``)."""
    if workdir is None:
        raise ValueError("extracting a zipped checkpoint needs a work directory")
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.namelist()
            shards: Dict[str, Dict[str, str]] = {}  # iteration dir -> rank dir name -> member
            for member in members:
                parts = member.rstrip("/").split("/")
                if len(parts) >= 2 and parts[-1] in CHECKPOINT_FILES and _RANK_DIR.match(parts[-2]):
                    shards.setdefault("/".join(parts[:-2]), {})[parts[-2]] = member
            if not shards:
                raise ValueError(f"{path} is a zip but holds no mp_rank_XX/model_optim_rng.pt: "
                                 "not a Megatron checkpoint")
            chosen = _choose_zip_iteration(archive, members, sorted(shards))
            grid = _order_ranks(list(shards[chosen]), f"{path}:{chosen or '/'}")
            files = []
            for stages in grid:
                files.append([])
                for rank_name in stages:
                    target = os.path.join(workdir, rank_name, os.path.basename(shards[chosen][rank_name]))
                    os.makedirs(os.path.dirname(target), exist_ok=True)
                    with archive.open(shards[chosen][rank_name]) as src, open(target, "wb") as dst:
                        shutil.copyfileobj(src, dst, 16 << 20)
                    files[-1].append(target)
            return files
    except zipfile.BadZipFile as err:
        raise ValueError(f"{path} is not a valid zip file, truncated or corrupt ({err})") from None


def _choose_zip_iteration(archive, members, iterations) -> str:
    """The iteration a zip's ``latest_checkpointed_iteration.txt`` names, else ``release``, else the last."""
    if len(iterations) == 1:
        return iterations[0]
    for tracker in (m for m in members if m.endswith("latest_checkpointed_iteration.txt")):
        text = archive.read(tracker).decode("utf-8").strip()
        name = "release" if text == "release" else f"iter_{int(text):07d}" if text.isdigit() else None
        for it in iterations:
            if it.rstrip("/").split("/")[-1] == name:
                return it
    for it in iterations:
        if it.endswith("release"):
            return it
    return iterations[-1]


def zip_vocab_member(path: str) -> Optional[str]:
    """The vocab file member of a zipped checkpoint, if it ships one."""
    with zipfile.ZipFile(path) as archive:
        for member in archive.namelist():
            if os.path.basename(member) == "vocab.txt" or member.endswith("-vocab.txt"):
                return member
    return None


# ---- one checkpoint: shards, args, config, tensors ------------------------------------------------
def _args_dict(args: Any) -> Dict[str, Any]:
    if args is None:
        return {}
    if isinstance(args, dict):
        return dict(args)
    return dict(vars(args)) if hasattr(args, "__dict__") else {}


def _enum_value(value):
    """A stub of a Megatron enum (see tensor_files.InertStub) or a plain value -> the plain value."""
    return getattr(value, "value", value)


@dataclass
class MegatronShard:
    path: str
    roles: Dict[RoleKey, Any]  # role key -> torch tensor (memory-mapped where possible)
    names: Dict[RoleKey, str]  # role key -> the name in the checkpoint
    checkpoint_version: float
    args: Dict[str, Any]
    load_path: str  # "weights_only" or "restricted"
    generation: str  # "legacy" or "core"
    # "" for one rank's file; else what this shard already merged ("2 PP stages", "torch_dist")
    merged: str = ""
    # a torch_dist shard holds full tensors whatever TP degree the args name
    is_global: bool = False


def _check_version(path: str, version) -> float:
    try:
        version = float(version if version is not None else 0)
    except (TypeError, ValueError):
        raise ValueError(f"{path}: unknown checkpoint_version {version!r} (known: 0, 1.0, 2.0, 3.0)") from None
    if version not in KNOWN_CHECKPOINT_VERSIONS:
        raise ValueError(f"{path}: unknown checkpoint_version {version:g} (known: 0, 1.0, 2.0, 3.0); its fused "
                         "QKV layout cannot be decoded")
    return version


def _assign_roles(path: str, named_tensors) -> Tuple[Dict[RoleKey, Any], Dict[RoleKey, str], str]:
    """(role -> tensor, role -> source name, generation) of ``(name, tensor)`` pairs; unknown tensors are
    an error."""
    roles, names, unknown = {}, {}, []
    for name, value in named_tensors:
        if _IGNORED.search(name) or not hasattr(value, "shape"):
            continue
        key = role_of(name)
        if key is None:
            unknown.append(name)
            continue
        if key in roles:
            raise ValueError(f"{path}: tensors {names[key]} and {name} both map to {key[0]} {key[2]}")
        roles[key], names[key] = value, name
    if unknown:
        raise ValueError(f"{path} has {len(unknown)} tensors that are not part of a Megatron BERT: "
                         f"{', '.join(unknown[:8])}")
    if not roles:
        raise ValueError(f"{path} is not a Megatron BERT checkpoint: its model holds no BERT tensors")
    # lm_head/binary_head are spelled alike in both; the rest says which generation wrote the file
    generation = "legacy" if any(n.startswith("language_model.") for n in names.values()) else "core"
    return roles, names, generation


def read_shard(path: str) -> MegatronShard:
    """Load one rank's file and give every model tensor its role; unknown tensors are an error."""
    checkpoint, load_path = load_torch_pickle(path)
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path} is not a Megatron checkpoint: it holds a {type(checkpoint).__name__}, not a dict")
    if "model" in checkpoint:
        model = checkpoint["model"]
    elif "model0" in checkpoint:
        raise ValueError(f"{path} uses the interleaved pipeline schedule (model0, model1, ...): not supported")
    elif "language_model" in checkpoint or any(str(k).startswith(("embedding", "encoder")) for k in checkpoint):
        model = checkpoint  # a bare model state dict
    else:
        keys = ", ".join(sorted(map(str, checkpoint))[:10])
        raise ValueError(f"{path} is not a Megatron checkpoint: no 'model' entry (top-level keys: {keys})")
    version = _check_version(path, checkpoint.get("checkpoint_version", 0) if "model" in checkpoint else 0)
    roles, names, generation = _assign_roles(path, flatten_state(model))
    return MegatronShard(path, roles, names, version, _args_dict(checkpoint.get("args")), load_path, generation)


def read_stages(paths: List[str]) -> MegatronShard:
    """One tensor-parallel rank's pipeline stages (``mp_rank_TT_000``, ``_001`` ...) as one shard: each
    stage numbers its layers from 0, so stage ``p``'s layers are offset by the layers of the stages
    before it. With tied embeddings the last stage keeps its own copy of the word embeddings (legacy
    ``word_embeddings_for_head``, ignored; megatron-core ``output_layer.weight``): it must equal stage 0's
    and is dropped."""
    stages = [read_shard(path) for path in paths]
    if len(stages) == 1:
        return stages[0]
    first = stages[0]
    pp = first.args.get("pipeline_model_parallel_size")
    if pp is not None and int(pp) != len(stages):
        raise ValueError(f"inconsistent PP shards: the args say pipeline_model_parallel_size={pp} but "
                         f"{len(stages)} stage(s) were found ({first.path})")
    tied = not first.args.get("untie_embeddings_and_output_weights", False)
    roles, names, offset = {}, {}, 0
    for p, stage in enumerate(stages):
        if stage.checkpoint_version != first.checkpoint_version:
            raise ValueError(f"inconsistent PP shards: {stage.path} has checkpoint_version "
                             f"{stage.checkpoint_version:g}, {first.path} {first.checkpoint_version:g}")
        layers = sorted({k[1] for k in stage.roles if k[1] is not None})
        if layers != list(range(len(layers))):
            raise ValueError(f"{stage.path}: pipeline stage {p} has layers {layers}; each stage numbers its "
                             "layers from 0")
        for (role, layer, param), value in stage.roles.items():
            key = (role, None if layer is None else layer + offset, param)
            label = f"{stage.names[(role, layer, param)]} (stage {p})"
            if role == "decoder" and tied and p > 0:
                embedding = roles.get(("word_embeddings", None, "weight"))
                if embedding is not None and not np.array_equal(tensor_to_numpy(value), tensor_to_numpy(embedding)):
                    raise ValueError(f"inconsistent PP shards: {label} is the last stage's copy of the tied word "
                                     "embeddings but differs from stage 0's")
                continue
            if key in roles:
                raise ValueError(f"inconsistent PP shards: {names[key]} and {label} both hold {_role_label(key)}")
            roles[key], names[key] = value, label
        offset += len(layers)
    return MegatronShard(first.path, roles, names, first.checkpoint_version, first.args, first.load_path,
                         "legacy" if any(s.generation == "legacy" for s in stages) else "core",
                         merged=f"{len(stages)} PP stages")


def read_distributed_checkpoint(directory: str) -> MegatronShard:
    """A megatron-core ``torch_dist`` checkpoint through ``torch.distributed.checkpoint``'s own reader
    (on CPU, no process group): every model tensor whole (TP and PP already merged by its global
    shape), layers stacked on axis 0 split back into ``encoder.layers.N``. ``common_state`` (args,
    checkpoint_version) is unpickled with the restricted unpickler; optimizer and RNG entries are not read."""
    try:
        import torch
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
        from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata
    except ImportError:
        raise ImportError(f"reading {directory} (torch_dist) needs torch (`pip install torch`)") from None

    class RawBytesPlanner(DefaultLoadPlanner):
        """DCP's default planner unpickles byte entries with torch.load(weights_only=False): keep the bytes."""

        raw: Dict[str, bytes] = {}

        def load_bytes(self, read_item, value):
            self.raw[read_item.dest_index.fqn] = value.getvalue()

    reader = dcp.FileSystemReader(directory)
    try:
        entries = reader.read_metadata().state_dict_metadata
    except Exception as err:  # a missing or corrupt .metadata
        raise ValueError(f"cannot read {directory} as a torch_dist checkpoint ({type(err).__name__}: "
                         f"{str(err).strip().splitlines()[0] if str(err).strip() else ''})") from None
    wanted: Dict[str, Any] = {}
    for key, meta in entries.items():
        if isinstance(meta, TensorStorageMetadata) and not key.startswith(("optimizer.", "rng_state", "rerun_state")):
            wanted[key] = torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
        elif isinstance(meta, BytesStorageMetadata) and key.split("/")[0] == "common_state":
            wanted[key] = b""
    common_keys = [k for k in wanted if k.split("/")[0] == "common_state"]
    planner = RawBytesPlanner(flatten_state_dict=False)
    dcp.load(wanted, storage_reader=reader, planner=planner, no_dist=True)
    common: Dict[str, Any] = {}
    load_path = "weights_only"
    for key in common_keys:
        del wanted[key]
        value, load_path = load_torch_pickle(io.BytesIO(planner.raw[key]), f"{directory}:{key}")
        for part in value if isinstance(value, list) else [value]:  # megatron-core saves a one-item list
            common.update(part if isinstance(part, dict) else {})
    version = _check_version(directory, common.get("checkpoint_version", 3.0))

    def unstacked():
        for key, tensor in wanted.items():
            match = re.match(r"(.*\blayers\.)(?!\d)(.*)", key)
            if match and not key.endswith("_extra_state"):
                for i in range(tensor.shape[0]):
                    yield f"{match.group(1)}{i}.{match.group(2)}", tensor[i]
            else:
                yield key, tensor

    roles, names, generation = _assign_roles(directory, unstacked())
    return MegatronShard(directory, roles, names, version, _args_dict(common.get("args")), load_path, generation,
                         merged="torch_dist", is_global=True)


@dataclass
class MegatronCheckpoint:
    """A Megatron BERT checkpoint, read but not converted: its shards, config and notes.

    Args:
        shards: one :class:`MegatronShard` per tensor-parallel rank, in rank order.
        num_attention_heads: heads, when the checkpoint stores no ``args`` (else taken from them).
    """

    shards: List[MegatronShard]
    num_attention_heads: Optional[int] = None
    notes: List[str] = field(default_factory=list)

    kind = "megatron"

    def __post_init__(self):
        self._check_shards()
        self.config = self._derive_config()

    # -- checks --
    @property
    def tensor_parallel_degree(self) -> int:
        return len(self.shards)

    @property
    def read_with(self) -> List[str]:
        return sorted({s.load_path for s in self.shards})

    @property
    def naming(self) -> str:
        return self.shards[0].generation

    @property
    def checkpoint_version(self) -> float:
        return self.shards[0].checkpoint_version

    @property
    def args(self) -> Dict[str, Any]:
        return self.shards[0].args

    def _check_shards(self):
        first = self.shards[0]
        for rank, shard in enumerate(self.shards[1:], start=1):
            if shard.checkpoint_version != first.checkpoint_version:
                raise ValueError(f"inconsistent TP shards: {shard.path} has checkpoint_version "
                                 f"{shard.checkpoint_version:g}, {first.path} {first.checkpoint_version:g}")
            if set(shard.roles) != set(first.roles):
                only = sorted(set(first.names[k] for k in set(first.roles) - set(shard.roles)))
                extra = sorted(set(shard.names[k] for k in set(shard.roles) - set(first.roles)))
                raise ValueError(f"inconsistent TP shards: rank {rank} ({shard.path}) lacks {only[:5]} "
                                 f"and has extra {extra[:5]} compared with rank 0")
            for key, value in shard.roles.items():
                if tuple(value.shape) != tuple(first.roles[key].shape):
                    raise ValueError(f"inconsistent TP shards: {shard.names[key]} is {list(value.shape)} on rank "
                                     f"{rank} but {list(first.roles[key].shape)} on rank 0")
        args = first.args
        tp = args.get("tensor_model_parallel_size", args.get("model_parallel_size"))
        if tp is not None and int(tp) != len(self.shards) and not first.is_global:
            raise ValueError(f"inconsistent TP shards: the args say tensor_model_parallel_size={tp} but "
                             f"{len(self.shards)} shard(s) were found ({first.path})")
        pp = int(args.get("pipeline_model_parallel_size", 1) or 1)
        if pp > 1 and not first.merged:
            raise ValueError(f"inconsistent PP shards: the args say pipeline_model_parallel_size={pp} but one "
                             f"stage was found ({first.path}); every mp_rank_TT_PPP of the iteration is needed")
        self.zero_bias_roles = check_math_args(self.args, self.naming, first.path)
        self._check_complete()

    def _check_complete(self):
        roles = self.shards[0].roles
        present_layers = sorted({k[1] for k in roles if k[1] is not None})
        num_layers = int(self.args.get("num_layers") or (present_layers[-1] + 1 if present_layers else 0))
        required = [("word_embeddings", None, "weight"), ("position_embeddings", None, "weight"),
                    ("final_ln", None, "weight"), ("final_ln", None, "bias")]
        required += [(role, i, p) for i in range(num_layers) for role in LAYER_ROLES for p in ("weight", "bias")
                     if not (p == "bias" and role in self.zero_bias_roles)]
        missing = [k for k in required if k not in roles]
        for group, keys in OPTIONAL_GROUPS.items():
            have = [(r, None, p) in roles for r, p in keys]
            if any(have) and not all(have):
                missing += [(r, None, p) for (r, p), h in zip(keys, have) if not h]
        if missing:
            listed = ", ".join(_role_label(k) for k in missing[:12])
            more = f" and {len(missing) - 12} more" if len(missing) > 12 else ""
            raise ValueError(f"{self.shards[0].path} lacks {len(missing)} tensors of a Megatron BERT: {listed}{more}")
        extra_layers = [i for i in present_layers if i >= num_layers]
        if extra_layers:
            raise ValueError(f"{self.shards[0].path} has layers up to {extra_layers[-1]} but its args say "
                             f"num_layers={num_layers}")
        if num_layers == 0:
            raise ValueError(f"{self.shards[0].path} holds no transformer layers")
        self.num_layers = num_layers

    # -- config --
    def _shape(self, role, layer=None, param="weight"):
        value = self.shards[0].roles.get((role, layer, param))
        return None if value is None else tuple(value.shape)

    def _derive_config(self) -> MegatronBertConfig:
        args, tp, notes = self.args, self.tensor_parallel_degree, self.notes
        vocab_rows, hidden = self._shape("word_embeddings")
        vocab_size = vocab_rows * tp
        if args.get("padded_vocab_size") is not None and int(args["padded_vocab_size"]) != vocab_size:
            raise ValueError(f"{self.shards[0].path}: args.padded_vocab_size={args['padded_vocab_size']} but the "
                             f"word embeddings have {vocab_size} rows over {tp} shard(s)")
        if args.get("hidden_size") is not None and int(args["hidden_size"]) != hidden:
            raise ValueError(f"{self.shards[0].path}: args.hidden_size={args['hidden_size']} but the word "
                             f"embeddings are {hidden} wide")
        if args.get("num_attention_heads"):
            heads = int(args["num_attention_heads"])
        elif self.num_attention_heads:
            heads = int(self.num_attention_heads)
        else:
            heads = max(1, hidden // 64)
            notes.append(f"no args in the checkpoint: assumed num_attention_heads={heads} (head size 64, as in "
                         "BERT and the NGC checkpoints); pass num_attention_heads if it differs")
        if heads % tp:
            raise ValueError(f"{heads} attention heads do not split over {tp} TP shards")
        intermediate = self._shape("fc1", 0)[0] * tp
        if args.get("ffn_hidden_size") and int(args["ffn_hidden_size"]) != intermediate:
            raise ValueError(f"{self.shards[0].path}: args.ffn_hidden_size={args['ffn_hidden_size']} but the MLP "
                             f"is {intermediate} wide")
        token_types = self._shape("token_type_embeddings")
        if token_types is None:
            notes.append("no token-type embeddings in the checkpoint (trained without a binary head): "
                         "written as zeros for 2 types, which adds nothing, as in Megatron")
        hidden_act, lm_head_act = self._activations(notes)
        if self.zero_centered_gamma:
            notes.append("--apply-layernorm-1p: the stored LayerNorm weights are gamma - 1; converted as gamma")
        if self.zero_bias_roles:
            notes.append(f"--disable-bias-linear: the {', '.join(self.zero_bias_roles)} biases are zeros")
        eps = args.get("layernorm_epsilon", args.get("norm_epsilon"))
        if eps is None:
            eps = 1e-5
            notes.append("layernorm_epsilon not in the checkpoint: assumed Megatron's default 1e-5")
        do_lower_case = self._lower_case(vocab_size, notes)
        tied = ("decoder", None, "weight") not in self.shards[0].roles
        architectures = ["MegatronBertForPreTraining"] if self._shape("binary_head") else ["MegatronBertForMaskedLM"]
        return MegatronBertConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            num_hidden_layers=self.num_layers,
            num_attention_heads=heads,
            intermediate_size=intermediate,
            hidden_act=hidden_act,
            lm_head_act=lm_head_act,
            hidden_dropout_prob=float(args.get("hidden_dropout", 0.1)),
            attention_probs_dropout_prob=float(args.get("attention_dropout", 0.1)),
            max_position_embeddings=self._shape("position_embeddings")[0],
            type_vocab_size=token_types[0] if token_types else 2,
            initializer_range=float(args.get("init_method_std", 0.02)),
            layer_norm_eps=float(eps),
            tie_word_embeddings=tied,
            do_lower_case=do_lower_case,
            architectures=architectures,
        )

    def _activations(self, notes) -> Tuple[str, Optional[str]]:
        """(MLP activation, LM-head activation or None when the same) as the checkpoint's generation
        computed them (the table in docs/converting.md). Both run the fused bias-GELU, a tanh
        approximation, in the MLP when ``bias_gelu_fusion`` is on (the default), else the erf GELU.
        Legacy Megatron-LM: ``--openai-gelu`` makes the MLP and the LM head tanh, ``--onnx-safe`` erf.
        megatron-core: ``core_transformer_config_from_args`` reads neither, and ``BertLMHead`` always
        calls ``F.gelu`` (erf)."""
        args = self.args
        if not args:
            notes.append("no args in the checkpoint: assumed the exact (erf) GELU in the MLP and LM head")
            return "gelu", None
        fused = bool(args.get("bias_gelu_fusion", args.get("bias_activation_fusion", False)))
        if self.naming == "core":
            ignored = [name for name in ("openai_gelu", "onnx_safe") if args.get(name)]
            if ignored:
                notes.append(f"args.{' and args.'.join(ignored)} set, but megatron-core ignores "
                             f"{'them' if len(ignored) > 1 else 'it'}: converted as megatron-core computed")
            return ("gelu_tanh", "gelu") if fused else ("gelu", None)
        if args.get("openai_gelu"):
            return "gelu_tanh", None
        if args.get("onnx_safe"):
            return "gelu", None
        return ("gelu_tanh", "gelu") if fused else ("gelu", None)

    @property
    def zero_centered_gamma(self) -> bool:
        """``--apply-layernorm-1p``: megatron-core's LayerNorms store ``gamma - 1`` (converted: + 1)."""
        return bool(_arg(self.args, "layernorm_zero_centered_gamma", "apply_layernorm_1p", default=False))

    def _lower_case(self, vocab_size: int, notes) -> bool:
        tokenizer = str(_enum_value(self.args.get("tokenizer_type")) or "")
        if tokenizer.endswith("LowerCase"):
            return True
        if tokenizer.endswith("Case"):
            return False
        # BERT's vocabularies padded to a multiple of 128 x TP: cased 28996, uncased 30522.
        guesses = {29056: False, 28996: False, 30592: True, 30522: True}
        for raw, lower in ((28996, False), (30522, True)):
            multiple = 128 * self.tensor_parallel_degree
            guesses.setdefault(-(-raw // multiple) * multiple, lower)
        if vocab_size in guesses:
            notes.append(f"no tokenizer_type in the checkpoint: vocab size {vocab_size} taken as BERT's "
                         f"{'uncased' if guesses[vocab_size] else 'cased'} vocabulary")
            return guesses[vocab_size]
        notes.append("casing unknown (no tokenizer_type in the checkpoint): assumed lower case")
        return True

    # -- tensors --
    def _merged(self, key: RoleKey) -> np.ndarray:
        """The full tensor of a role (torch layout), merged over the shards."""
        arrays = [tensor_to_numpy(shard.roles[key]) for shard in self.shards]
        kind = tensor_parallel_kind(key[0], key[2])
        if len(arrays) == 1:
            return arrays[0]
        if kind is None:
            for rank, array in enumerate(arrays[1:], start=1):
                if not np.array_equal(array, arrays[0]):
                    raise ValueError(f"inconsistent TP shards: {self.shards[0].names[key]} is replicated in "
                                     f"Megatron but differs between rank 0 and rank {rank} "
                                     f"(max diff {np.abs(array.astype(np.float64) - arrays[0]).max():.3g})")
            return arrays[0]
        return tp_plan.merge(arrays, kind, layout="torch")

    def iter_tensors(self) -> Iterator[Tuple[str, np.ndarray, str]]:
        """(our name, full numpy array in our layout, source name) for every tensor, one at a time."""
        config = self.config
        heads_per_rank = config.num_attention_heads // self.tensor_parallel_degree
        head_dim = config.head_dim
        for key in sorted(self.shards[0].roles, key=_role_order):
            role, layer, param = key
            source = self._source_label(key)
            if role == "qkv":
                parts = [split_fused_qkv(tensor_to_numpy(s.roles[key]), self.checkpoint_version, heads_per_rank,
                                         head_dim) for s in self.shards]
                for j, which in enumerate(("query", "key", "value")):
                    full = np.concatenate([p[j] for p in parts], axis=0) if len(parts) > 1 else parts[0][j]
                    yield TARGETS[role].format(i=layer, p=param, qkv=which), _our_layout(full, param), source
                continue
            full = self._merged(key)
            if role in LINEAR_ROLES:
                full = _our_layout(full, param)
            if self.zero_centered_gamma and role in ZERO_CENTERED_LN_ROLES and param == "weight":
                full = full.astype(np.float32) + 1.0
                source += " + 1 (--apply-layernorm-1p)"
            yield TARGETS[role].format(i=layer, p=param), _owned(full), source
        sizes = {"qkv": config.hidden_size, "attention_dense": config.hidden_size,
                 "fc1": config.intermediate_size, "fc2": config.hidden_size}
        for layer in range(config.num_hidden_layers):
            for role in self.zero_bias_roles:
                zeros = np.zeros(sizes[role], np.float32)
                label = "(zeros: --disable-bias-linear)"
                if role == "qkv":
                    for which in ("query", "key", "value"):
                        yield TARGETS[role].format(i=layer, p="bias", qkv=which), zeros.copy(), label
                else:
                    yield TARGETS[role].format(i=layer, p="bias"), zeros.copy(), label
        if ("token_type_embeddings", None, "weight") not in self.shards[0].roles:
            yield ("bert.embeddings.token_type_embeddings.weight",
                   np.zeros((2, config.hidden_size), dtype=np.float32), "(zeros: no token types in the checkpoint)")

    def _source_label(self, key: RoleKey) -> str:
        name = self.shards[0].names[key]
        tp = self.tensor_parallel_degree
        return name if tp == 1 else f"{name} (merged over {tp} TP shards)"


def _role_label(key: RoleKey) -> str:
    role, layer, param = key
    where = f"layer {layer} " if layer is not None else ""
    return f"{where}{role}.{param}"


_ROLE_RANK = {role: n for n, role in enumerate(TARGETS)}


def _role_order(key: RoleKey):
    role, layer, param = key
    return (-1 if layer is None and _ROLE_RANK[role] < 3 else (layer if layer is not None else 10**9),
            _ROLE_RANK[role], param)


def _our_layout(array: np.ndarray, param: str) -> np.ndarray:
    """torch Linear ``[out, in]`` -> Paddle ``[in, out]`` (biases unchanged); always a new array."""
    if param == "weight" and array.ndim == 2:
        return np.ascontiguousarray(array.T)
    return np.array(array, copy=True)


def _owned(array: np.ndarray) -> np.ndarray:
    """A copy unless ``array`` already owns its memory (views of memory-mapped shards must not escape)."""
    return array if array.flags.owndata and array.flags.c_contiguous else np.array(array, copy=True, order="C")


def read_megatron_checkpoint(source: str, workdir: Optional[str] = None,
                             num_attention_heads: Optional[int] = None) -> MegatronCheckpoint:
    """Find, load and check every shard of a Megatron BERT checkpoint (see :func:`find_shard_files`;
    ``torch_dist`` directories: :func:`read_distributed_checkpoint`)."""
    distributed = distributed_checkpoint_dir(source)
    if distributed is not None:
        shards = [read_distributed_checkpoint(distributed)]
        what = f"the torch_dist checkpoint {distributed} with torch.distributed.checkpoint"
    else:
        grid = find_shard_files(source, workdir)
        shards = [read_stages(stages) for stages in grid]
        what = f"{sum(len(stages) for stages in grid)} shard file(s) ({len(grid)} TP x {len(grid[0])} PP)"
    checkpoint = MegatronCheckpoint(shards, num_attention_heads=num_attention_heads)
    paths = {s.load_path for s in shards}
    how = ("torch.load(weights_only=True)" if paths == {"weights_only"} else
           "the restricted unpickler (not loadable with weights_only=True)")
    checkpoint.notes.insert(0, f"read {what}; pickles with {how}")
    return checkpoint


# ---- export: ours -> Megatron-LM shards ------------------------------------------------------------
EXPORT_CHECKPOINT_VERSION = 3.0
# core: what Megatron-LM loads today (megatron-core BertModel, local spec names); legacy: megatron/legacy
MEGATRON_LAYOUTS = ("core", "legacy")
_LAYER_EXPORT_NAMES = {  # our layer parameter -> (legacy name (newest spelling), megatron-core name)
    "attention.ln": ("input_layernorm", "input_layernorm"),
    "attention.output.dense": ("self_attention.dense", "self_attention.linear_proj"),
    "ln": ("post_attention_layernorm", "pre_mlp_layernorm"),
    "intermediate.dense": ("mlp.dense_h_to_4h", "mlp.linear_fc1"),
    "output.dense": ("mlp.dense_4h_to_h", "mlp.linear_fc2"),
    "qkv": ("self_attention.query_key_value", "self_attention.linear_qkv"),
}
_GLOBAL_EXPORT_NAMES = {  # our name -> (path in the legacy nested model dict, megatron-core flat name)
    "bert.embeddings.word_embeddings.weight": (("language_model", "embedding", "word_embeddings", "weight"),
                                               "embedding.word_embeddings.weight"),
    "bert.embeddings.position_embeddings.weight": (("language_model", "embedding", "position_embeddings", "weight"),
                                                   "embedding.position_embeddings.weight"),
    "bert.embeddings.token_type_embeddings.weight": (("language_model", "embedding", "tokentype_embeddings",
                                                      "weight"), "embedding.tokentype_embeddings.weight"),
    "bert.encoder.ln.weight": (("language_model", "encoder", "final_layernorm.weight"), "encoder.final_layernorm.weight"),
    "bert.encoder.ln.bias": (("language_model", "encoder", "final_layernorm.bias"), "encoder.final_layernorm.bias"),
    "bert.pooler.dense.weight": (("language_model", "pooler", "dense.weight"), "pooler.dense.weight"),
    "bert.pooler.dense.bias": (("language_model", "pooler", "dense.bias"), "pooler.dense.bias"),
    "cls.predictions.transform.dense.weight": (("lm_head", "dense.weight"), "lm_head.dense.weight"),
    "cls.predictions.transform.dense.bias": (("lm_head", "dense.bias"), "lm_head.dense.bias"),
    "cls.predictions.transform.LayerNorm.weight": (("lm_head", "layernorm.weight"), "lm_head.layer_norm.weight"),
    "cls.predictions.transform.LayerNorm.bias": (("lm_head", "layernorm.bias"), "lm_head.layer_norm.bias"),
    "cls.predictions.bias": (("lm_head", "bias"), "output_layer.bias"),
    "cls.predictions.decoder_weight": (None, "output_layer.weight"),  # untied: megatron-core only
    "cls.seq_relationship.weight": (("binary_head", "weight"), "binary_head.weight"),
    "cls.seq_relationship.bias": (("binary_head", "bias"), "binary_head.bias"),
}
_VOCAB_ROWS = ("bert.embeddings.word_embeddings.weight", "cls.predictions.bias", "cls.predictions.decoder_weight")
_NOT_TRANSPOSED = ("bert.embeddings.", "cls.predictions.decoder_weight")  # already [rows, hidden] in both


def padded_vocab_size(raw_vocab_size: int, tensor_parallel_degree: int, divisible_by: int = 128) -> int:
    """Megatron's ``_vocab_size_with_padding``: up to a multiple of 128 x TP."""
    multiple = divisible_by * tensor_parallel_degree
    return -(-raw_vocab_size // multiple) * multiple


def megatron_args_for(config: MegatronBertConfig, tensor_parallel_degree: int, vocab_size: int, raw_vocab_size: int,
                      binary_head: bool, layout: str = "core"):
    """The ``args`` Megatron-LM stores (its ``parse_args`` names), with what its BERT needs to rebuild
    this model and what ``load_checkpoint`` compares or copies (``--use-checkpoint-args``)."""
    import argparse

    mlp_tanh = config.hidden_act in ("gelu_tanh", "gelu_new")
    head_tanh = (config.lm_head_act or config.hidden_act) in ("gelu_tanh", "gelu_new")
    values = dict(
        num_layers=config.num_hidden_layers, encoder_num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size, ffn_hidden_size=config.intermediate_size,
        num_attention_heads=config.num_attention_heads, kv_channels=config.head_dim, group_query_attention=False,
        num_query_groups=1, max_position_embeddings=config.max_position_embeddings,
        seq_length=config.max_position_embeddings, encoder_seq_length=config.max_position_embeddings,
        vocab_size=raw_vocab_size, padded_vocab_size=vocab_size, make_vocab_size_divisible_by=128,
        tensor_model_parallel_size=tensor_parallel_degree, pipeline_model_parallel_size=1,
        virtual_pipeline_model_parallel_size=None, expert_model_parallel_size=1,
        layernorm_epsilon=config.layer_norm_eps, normalization="LayerNorm", layernorm_zero_centered_gamma=False,
        apply_layernorm_1p=False, hidden_dropout=config.hidden_dropout_prob,
        attention_dropout=config.attention_probs_dropout_prob, init_method_std=config.initializer_range,
        tokenizer_type="BertWordPieceLowerCase" if config.do_lower_case else "BertWordPieceCase",
        bert_binary_head=binary_head, num_tokentypes=config.type_vocab_size if binary_head else 0,
        add_position_embedding=True, position_embedding_type="learned_absolute", use_rotary_position_embeddings=False,
        add_bias_linear=True, add_qkv_bias=True, swiglu=False, squared_relu=False, quick_geglu=False,
        qk_layernorm=False, apply_residual_connection_post_layernorm=False, apply_query_key_layer_scaling=False,
        num_experts=None, untie_embeddings_and_output_weights=not config.tie_word_embeddings,
        ckpt_format="torch", iteration=0, consumed_train_samples=0, consumed_valid_samples=0,
    )
    if layout == "core":
        # megatron-core ignores --openai-gelu: its MLP is tanh only as the fused bias-GELU, its LM head erf
        values.update(openai_gelu=False, onnx_safe=None, bias_gelu_fusion=mlp_tanh, spec=["local"],
                      transformer_impl="local")
    else:
        # MLP tanh-GELU with an erf LM head is Megatron's fused bias-GELU; tanh in both is --openai-gelu.
        values.update(openai_gelu=mlp_tanh and head_tanh, bias_gelu_fusion=mlp_tanh and not head_tanh, onnx_safe=None)
    return argparse.Namespace(**values)


def _check_exportable(config: MegatronBertConfig, state: Dict[str, np.ndarray], tp: int, layout: str) -> None:
    if layout not in MEGATRON_LAYOUTS:
        raise ValueError(f"megatron_layout={layout!r}; choose one of {MEGATRON_LAYOUTS}")
    for name in ("num_attention_heads", "intermediate_size"):
        value = getattr(config, name)
        if value % tp:
            raise ValueError(f"{name}={value} does not split over {tp} tensor-parallel ranks")
    if "cls.predictions.decoder_weight" in state and layout == "legacy":
        raise ValueError("Megatron-LM's legacy BERT ties the LM decoder to the word embeddings; this model has a "
                         "separate decoder (tie_word_embeddings=False): export it with --megatron_layout core")
    head_act = config.lm_head_act or config.hidden_act
    if layout == "core" and head_act not in ("gelu",):
        raise ValueError(f"megatron-core's BertLMHead always uses the erf GELU; this model's LM head uses {head_act} "
                         "(lm_head_act): export it with --megatron_layout legacy (--openai-gelu)")
    if config.hidden_act not in ("gelu", "gelu_tanh", "gelu_new"):
        raise ValueError(f"hidden_act={config.hidden_act}: Megatron-LM's BERT runs GELU only")
    needed = [n for n in _GLOBAL_EXPORT_NAMES if n.startswith(("bert.embeddings", "bert.encoder", "cls.predictions"))
              and n != "cls.predictions.decoder_weight"]
    missing = [n for n in needed if n not in state]
    if missing:
        raise ValueError(f"a Megatron BERT checkpoint needs the embeddings, encoder and LM head; the source lacks "
                         f"{len(missing)} of them: {', '.join(missing[:6])}")


def write_megatron_checkpoint(directory: str, config: MegatronBertConfig, state: Dict[str, np.ndarray],
                              tensor_parallel_degree: int, raw_vocab_size: int, dtype: str,
                              notes: List[str], layout: str = "core") -> Dict[str, str]:
    """Write ``directory/release/mp_rank_XX/model_optim_rng.pt`` for each of ``tensor_parallel_degree``
    ranks and ``latest_checkpointed_iteration.txt``, ``checkpoint_version`` 3.0, vocab re-padded to a
    multiple of 128 x TP. ``layout="core"`` (default): megatron-core ``BertModel`` names (local spec) in a
    flat ``model`` dict and ``args`` as today's Megatron-LM saves them, what its ``load_checkpoint`` loads
    with ``strict=True``; ``"legacy"``: the legacy BERT's nested names. ``state`` holds our full tensors
    (Paddle layout). Returns our name -> Megatron name for the report."""
    import torch

    tp = tensor_parallel_degree
    _check_exportable(config, state, tp, layout)
    core = layout == "core"
    binary_head = "cls.seq_relationship.weight" in state and "bert.pooler.dense.weight" in state
    dropped = [n for n in state if not (n in _GLOBAL_EXPORT_NAMES or n.startswith("bert.encoder.layer."))]
    if core and not binary_head and "bert.embeddings.token_type_embeddings.weight" in state:
        # pretrain_bert builds no token types without a binary head (num_tokentypes=0)
        dropped.append("bert.embeddings.token_type_embeddings.weight")
    if dropped:
        notes.append(f"not part of a Megatron BERT, left out: {', '.join(sorted(dropped))}")
    vocab = padded_vocab_size(raw_vocab_size, tp)
    rows = config.vocab_size
    if vocab != rows:
        notes.append(f"vocab re-padded for TP={tp}: {rows} -> {vocab} rows (raw vocab {raw_vocab_size}, "
                     f"multiple of {128 * tp})")
    torch_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    heads, head_dim = config.num_attention_heads // tp, config.head_dim
    names: Dict[str, str] = {}

    def megatron_tensor(name: str) -> np.ndarray:
        """Ours (Paddle layout, our vocab rows) -> Megatron's full tensor (torch layout, re-padded vocab)."""
        full = state[name]
        if full.ndim == 2 and not name.startswith(_NOT_TRANSPOSED):
            full = full.T
        if name in _VOCAB_ROWS:
            kept = full[: min(rows, vocab)]
            full = np.concatenate([kept, np.zeros((vocab - kept.shape[0],) + full.shape[1:], full.dtype)])
        return full

    def shard(name: str, rank: int):
        array = tp_plan.shard(megatron_tensor(name), tp_plan.split_kind(name), tp, rank, layout="torch")
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).to(torch_dtype)

    for rank in range(tp):
        model: Dict[str, Any] = {} if core else {"language_model": {"embedding": {}, "encoder": {}}, "lm_head": {}}

        def put(ours: str, path, value):
            if core:
                model[path] = value
                names[ours] = f"model.{path}"
                return
            node = model
            for key in path[:-1]:
                node = node.setdefault(key, {})
            node[path[-1]] = value
            names[ours] = "model." + ".".join(path)

        for name, (legacy_path, core_name) in _GLOBAL_EXPORT_NAMES.items():
            if name not in state or name in dropped:
                continue
            if not binary_head and name.startswith(("bert.pooler", "cls.seq_relationship")):
                continue
            put(name, core_name if core else legacy_path, shard(name, rank))
        for i in range(config.num_hidden_layers):
            ours = f"bert.encoder.layer.{i}."
            prefix = f"encoder.layers.{i}." if core else f"layers.{i}."
            for param in ("weight", "bias"):
                qkv = [f"{ours}attention.self.{x}.{param}" for x in ("query", "key", "value")]
                q, k, v = (tp_plan.shard(megatron_tensor(n), tp_plan.split_kind(n), tp, rank, layout="torch")
                           for n in qkv)
                fused = fuse_qkv(q, k, v, EXPORT_CHECKPOINT_VERSION, heads, head_dim)
                target = f"{prefix}{_LAYER_EXPORT_NAMES['qkv'][core]}.{param}"
                tensors = [(n, target) for n in qkv]
                value = torch.from_numpy(np.ascontiguousarray(fused, dtype=np.float32)).to(torch_dtype)
                for part, spelled in _LAYER_EXPORT_NAMES.items():
                    if part != "qkv":
                        tensors.append((f"{ours}{part}.{param}", f"{prefix}{spelled[core]}.{param}"))
                for n, megatron_name in tensors:
                    tensor = value if megatron_name == target else shard(n, rank)
                    if core:
                        put(n, megatron_name, tensor)
                    else:
                        put(n, ("language_model", "encoder", megatron_name), tensor)
        checkpoint = {"args": megatron_args_for(config, tp, vocab, raw_vocab_size, binary_head, layout),
                      "checkpoint_version": EXPORT_CHECKPOINT_VERSION, "iteration": 0, "model": model,
                      "num_floating_point_operations_so_far": 0}
        path = os.path.join(directory, "release", f"mp_rank_{rank:02d}", "model_optim_rng.pt")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save(checkpoint, path)
        del checkpoint, model
    with open(os.path.join(directory, "latest_checkpointed_iteration.txt"), "w", encoding="utf-8") as f:
        f.write("release")
    notes.append(f"written in the {layout} layout" + (" (megatron-core BertModel, local spec names)" if core else ""))
    suffix = f" (split over {tp} ranks)" if tp > 1 else ""
    return {ours: theirs + suffix for ours, theirs in names.items()}
