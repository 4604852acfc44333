"""Megatron-LM BERT checkpoints (NGC zips, training output, tensor-parallel shards) -> our names.

A checkpoint is one ``model_optim_rng.pt`` per tensor-parallel rank (``mp_rank_00`` ...). Each holds
``model`` (nested dicts of tensors), usually ``checkpoint_version`` and ``args``, and optimizer/RNG state
(ignored). Every tensor is first given a *role* (``qkv`` of layer 3, ``word_embeddings`` ...) by the name
tables below, one table per naming generation; the roles then say how the ranks' shards merge and what our
parameter is called. Tensors are merged, split and transposed one at a time, so the converted model is
the only full copy in memory (the shards themselves are memory-mapped where torch allows it).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import zipfile
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np

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
    """How Megatron splits a role over tensor-parallel ranks (torch layout, weight ``[out, in]``):
    ``vocab``/``column`` on dim 0, ``row`` on dim 1, ``qkv`` on dim 0 by heads, None = replicated."""
    if role in ("word_embeddings", "lm_bias", "decoder"):
        return "vocab"
    if role == "qkv":
        return "qkv"
    if role == "fc1":
        return "column"
    if role in ("attention_dense", "fc2") and param == "weight":
        return "row"
    return None


RoleKey = Tuple[str, Optional[int], str]  # (role, layer index or None, "weight"/"bias")


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


def _torch_dist_error(directory: str) -> ValueError:
    return ValueError(
        f"{directory} is a Megatron-core distributed checkpoint (torch_dist, *.distcp files), which this "
        "converter does not read: turn it into the legacy format first with Megatron-LM, loading it with "
        "--ckpt-format torch_dist --ckpt-convert-format torch --ckpt-convert-save NEW_DIR, then convert NEW_DIR"
    )


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


def _order_ranks(rank_names: List[str], where: str) -> List[str]:
    """``mp_rank_XX`` names sorted by rank; pipeline-parallel ``mp_rank_XX_YYY`` and gaps are errors."""
    ranks = {}
    for name in rank_names:
        match = _RANK_DIR.match(name)
        if match.group(2):
            raise ValueError(f"{where} is pipeline-parallel ({name}); only tensor-parallel checkpoints "
                             "(mp_rank_XX) are merged: re-save it with --pipeline-model-parallel-size 1")
        ranks[int(match.group(1))] = name
    missing = [r for r in range(max(ranks) + 1) if r not in ranks]
    if missing:
        raise ValueError(f"inconsistent TP shards in {where}: mp_rank_{missing[0]:02d} is missing "
                         f"(found {sorted(ranks)})")
    return [ranks[r] for r in sorted(ranks)]


def find_shard_files(source: str, workdir: Optional[str] = None) -> List[str]:
    """The ``model_optim_rng.pt`` of every tensor-parallel rank, in rank order. ``source`` is an NGC zip
    (its members are extracted into ``workdir``), a Megatron checkpoint directory, an iteration directory,
    an ``mp_rank_XX`` directory or a single ``.pt`` file."""
    if not os.path.exists(source):
        raise FileNotFoundError(f"no such checkpoint: {source}")
    if os.path.isfile(source):
        if source.endswith(".zip"):
            return _extract_zip(source, workdir)
        return [source]  # a torch file (itself a zip archive since torch 1.6, but not one of ours)
    if is_distributed_checkpoint(source):
        raise _torch_dist_error(source)
    if _RANK_DIR.match(os.path.basename(os.path.normpath(source))):
        return [_checkpoint_file(source)]
    for name in CHECKPOINT_FILES:
        if os.path.isfile(os.path.join(source, name)):
            return [os.path.join(source, name)]
    iteration = _iteration_dir(source)
    if is_distributed_checkpoint(iteration):
        raise _torch_dist_error(iteration)
    rank_names = [n for n in os.listdir(iteration)
                  if _RANK_DIR.match(n) and os.path.isdir(os.path.join(iteration, n))]
    if not rank_names:
        raise ValueError(f"{source} is not a Megatron checkpoint: no latest_checkpointed_iteration.txt, release/, "
                         "iter_XXXXXXX/, mp_rank_XX/ or model_optim_rng.pt in it")
    return [_checkpoint_file(os.path.join(iteration, n)) for n in _order_ranks(rank_names, iteration)]


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
            ordered = _order_ranks(list(shards[chosen]), f"{path}:{chosen or '/'}")
            files = []
            for rank_name in ordered:
                target = os.path.join(workdir, rank_name, os.path.basename(shards[chosen][rank_name]))
                os.makedirs(os.path.dirname(target), exist_ok=True)
                with archive.open(shards[chosen][rank_name]) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst, 16 << 20)
                files.append(target)
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
    version = checkpoint.get("checkpoint_version", 0) if "model" in checkpoint else 0
    try:
        version = float(version if version is not None else 0)
    except (TypeError, ValueError):
        raise ValueError(f"{path}: unknown checkpoint_version {version!r} (known: 0, 1.0, 2.0, 3.0)") from None
    if version not in KNOWN_CHECKPOINT_VERSIONS:
        raise ValueError(f"{path}: unknown checkpoint_version {version:g} (known: 0, 1.0, 2.0, 3.0); its fused "
                         "QKV layout cannot be decoded")
    roles, names, unknown = {}, {}, []
    for name, value in flatten_state(model):
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
    embedding = names.get(("word_embeddings", None, "weight"), "")
    generation = "legacy" if embedding.startswith("language_model.") else "core"
    return MegatronShard(path, roles, names, version, _args_dict(checkpoint.get("args")), load_path, generation)


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
        if tp is not None and int(tp) != len(self.shards):
            raise ValueError(f"inconsistent TP shards: the args say tensor_model_parallel_size={tp} but "
                             f"{len(self.shards)} shard(s) were found ({first.path})")
        if int(args.get("pipeline_model_parallel_size", 1) or 1) > 1:
            raise ValueError(f"{first.path} is pipeline-parallel (pipeline_model_parallel_size="
                             f"{args['pipeline_model_parallel_size']}): only tensor-parallel checkpoints are merged")
        self._check_complete()

    def _check_complete(self):
        roles = self.shards[0].roles
        present_layers = sorted({k[1] for k in roles if k[1] is not None})
        num_layers = int(self.args.get("num_layers") or (present_layers[-1] + 1 if present_layers else 0))
        required = [("word_embeddings", None, "weight"), ("position_embeddings", None, "weight"),
                    ("final_ln", None, "weight"), ("final_ln", None, "bias")]
        required += [(role, i, p) for i in range(num_layers) for role in LAYER_ROLES for p in ("weight", "bias")]
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
        """Megatron's MLP runs the fused bias-GELU (tanh approximation) when ``bias_gelu_fusion`` is on
        (its default) and ``--openai-gelu`` (tanh) when asked; else exact erf GELU. The LM head calls
        ``F.gelu`` (erf) unless ``--openai-gelu``."""
        args = self.args
        if not args:
            notes.append("no args in the checkpoint: assumed the exact (erf) GELU in the MLP and LM head")
            return "gelu", None
        for unsupported in ("swiglu", "squared_relu"):
            if args.get(unsupported):
                raise ValueError(f"{self.shards[0].path}: args.{unsupported} is set; MegatronBERT here "
                                 "supports GELU only")
        if args.get("openai_gelu"):
            return "gelu_tanh", None
        if args.get("onnx_safe"):
            return "gelu", None
        fused = args.get("bias_gelu_fusion", args.get("bias_activation_fusion", False))
        if fused:
            return "gelu_tanh", "gelu"
        return "gelu", None

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
        return np.concatenate(arrays, axis=1 if kind == "row" else 0)

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
            yield TARGETS[role].format(i=layer, p=param), _owned(full), source
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
    """Find, load and check every shard of a Megatron BERT checkpoint (see :func:`find_shard_files`)."""
    files = find_shard_files(source, workdir)
    shards = [read_shard(path) for path in files]
    checkpoint = MegatronCheckpoint(shards, num_attention_heads=num_attention_heads)
    paths = {s.load_path for s in shards}
    how = ("torch.load(weights_only=True)" if paths == {"weights_only"} else
           "the restricted unpickler (the file is not loadable with weights_only=True)")
    checkpoint.notes.insert(0, f"read {len(shards)} shard(s) with {how}")
    return checkpoint


# ---- export: ours -> Megatron-LM shards ------------------------------------------------------------
EXPORT_CHECKPOINT_VERSION = 3.0
_LAYER_TO_MEGATRON = {  # our layer parameter -> Megatron legacy name (newest spelling), split kind
    "attention.ln": ("input_layernorm", None),
    "attention.output.dense": ("self_attention.dense", "row"),
    "ln": ("post_attention_layernorm", None),
    "intermediate.dense": ("mlp.dense_h_to_4h", "column"),
    "output.dense": ("mlp.dense_4h_to_h", "row"),
}
_GLOBAL_TO_MEGATRON = {  # our name -> (path in Megatron's nested model dict, split kind)
    "bert.embeddings.word_embeddings.weight": (("language_model", "embedding", "word_embeddings", "weight"),
                                               "vocab"),
    "bert.embeddings.position_embeddings.weight": (("language_model", "embedding", "position_embeddings", "weight"),
                                                   None),
    "bert.embeddings.token_type_embeddings.weight": (("language_model", "embedding", "tokentype_embeddings",
                                                      "weight"), None),
    "bert.encoder.ln.weight": (("language_model", "encoder", "final_layernorm.weight"), None),
    "bert.encoder.ln.bias": (("language_model", "encoder", "final_layernorm.bias"), None),
    "bert.pooler.dense.weight": (("language_model", "pooler", "dense.weight"), None),
    "bert.pooler.dense.bias": (("language_model", "pooler", "dense.bias"), None),
    "cls.predictions.transform.dense.weight": (("lm_head", "dense.weight"), None),
    "cls.predictions.transform.dense.bias": (("lm_head", "dense.bias"), None),
    "cls.predictions.transform.LayerNorm.weight": (("lm_head", "layernorm.weight"), None),
    "cls.predictions.transform.LayerNorm.bias": (("lm_head", "layernorm.bias"), None),
    "cls.predictions.bias": (("lm_head", "bias"), "vocab"),
    "cls.seq_relationship.weight": (("binary_head", "weight"), None),
    "cls.seq_relationship.bias": (("binary_head", "bias"), None),
}


def padded_vocab_size(raw_vocab_size: int, tensor_parallel_degree: int, divisible_by: int = 128) -> int:
    """Megatron's ``_vocab_size_with_padding``: up to a multiple of 128 x TP."""
    multiple = divisible_by * tensor_parallel_degree
    return -(-raw_vocab_size // multiple) * multiple


def megatron_args_for(config: MegatronBertConfig, tensor_parallel_degree: int, vocab_size: int, binary_head: bool):
    """The ``args`` Megatron-LM stores, with what its BERT needs to rebuild this model."""
    import argparse

    mlp_tanh = config.hidden_act in ("gelu_tanh", "gelu_new")
    head_tanh = (config.lm_head_act or config.hidden_act) in ("gelu_tanh", "gelu_new")
    return argparse.Namespace(
        num_layers=config.num_hidden_layers, hidden_size=config.hidden_size, ffn_hidden_size=config.intermediate_size,
        num_attention_heads=config.num_attention_heads, kv_channels=config.head_dim,
        max_position_embeddings=config.max_position_embeddings, seq_length=config.max_position_embeddings,
        padded_vocab_size=vocab_size, make_vocab_size_divisible_by=128,
        tensor_model_parallel_size=tensor_parallel_degree, pipeline_model_parallel_size=1,
        layernorm_epsilon=config.layer_norm_eps, hidden_dropout=config.hidden_dropout_prob,
        attention_dropout=config.attention_probs_dropout_prob, init_method_std=config.initializer_range,
        tokenizer_type="BertWordPieceLowerCase" if config.do_lower_case else "BertWordPieceCase",
        # MLP tanh-GELU with an erf LM head is Megatron's fused bias-GELU; tanh in both is --openai-gelu.
        openai_gelu=mlp_tanh and head_tanh, bias_gelu_fusion=mlp_tanh and not head_tanh, onnx_safe=None,
        bert_binary_head=binary_head, num_tokentypes=config.type_vocab_size if binary_head else 0,
        add_position_embedding=True, position_embedding_type="learned_absolute", swiglu=False, squared_relu=False,
    )


def _split(array: np.ndarray, kind: Optional[str], rank: int, degree: int) -> np.ndarray:
    """One rank's shard of a full tensor in torch layout (``row``: input dim 1; others dim 0)."""
    if kind is None or degree == 1:
        return array
    axis = 1 if kind == "row" else 0
    return np.split(array, degree, axis=axis)[rank]


def write_megatron_checkpoint(directory: str, config: MegatronBertConfig, state: Dict[str, np.ndarray],
                              tensor_parallel_degree: int, raw_vocab_size: int, dtype: str,
                              notes: List[str]) -> Dict[str, str]:
    """Write ``directory/release/mp_rank_XX/model_optim_rng.pt`` for each of ``tensor_parallel_degree``
    ranks and ``latest_checkpointed_iteration.txt``: Megatron-LM's legacy BERT layout, checkpoint_version
    3.0, vocab re-padded to a multiple of 128 x TP. ``state`` holds our full tensors (Paddle layout).
    Returns our name -> Megatron name for the report."""
    import torch

    tp = tensor_parallel_degree
    for name in ("num_attention_heads", "intermediate_size"):
        value = getattr(config, name)
        if value % tp:
            raise ValueError(f"{name}={value} does not split over {tp} tensor-parallel ranks")
    if "cls.predictions.decoder_weight" in state:
        raise ValueError("Megatron-LM's BERT ties the LM decoder to the word embeddings; this model has a separate "
                         "decoder (tie_word_embeddings=False) and cannot be written as a Megatron checkpoint")
    needed = [n for n in _GLOBAL_TO_MEGATRON if n.startswith(("bert.embeddings", "bert.encoder", "cls.predictions"))]
    missing = [n for n in needed if n not in state]
    if missing:
        raise ValueError(f"a Megatron BERT checkpoint needs the embeddings, encoder and LM head; the source lacks "
                         f"{len(missing)} of them: {', '.join(missing[:6])}")
    binary_head = "cls.seq_relationship.weight" in state and "bert.pooler.dense.weight" in state
    dropped = [n for n in state if not (n in _GLOBAL_TO_MEGATRON or n.startswith("bert.encoder.layer."))]
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

    def megatron_tensor(full: np.ndarray, name: str) -> np.ndarray:
        """Ours (Paddle layout, our vocab rows) -> Megatron's full tensor (torch layout, re-padded vocab)."""
        if full.ndim == 2 and ".embeddings." not in name:
            full = full.T
        if name in ("bert.embeddings.word_embeddings.weight", "cls.predictions.bias"):
            kept = full[: min(rows, vocab)]
            full = np.concatenate([kept, np.zeros((vocab - kept.shape[0],) + full.shape[1:], full.dtype)])
        return full

    def torch_tensor(array):
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).to(torch_dtype)

    for rank in range(tp):
        model: Dict[str, Any] = {"language_model": {"embedding": {}, "encoder": {}}, "lm_head": {}}
        for name, (path, kind) in _GLOBAL_TO_MEGATRON.items():
            if name not in state or (not binary_head and name.startswith(("bert.pooler", "cls.seq_relationship"))):
                continue
            node = model
            for key in path[:-1]:
                node = node.setdefault(key, {})
            node[path[-1]] = torch_tensor(_split(megatron_tensor(state[name], name), kind, rank, tp))
            names[name] = "model." + ".".join(path)
        encoder = model["language_model"]["encoder"]
        for i in range(config.num_hidden_layers):
            ours = f"bert.encoder.layer.{i}."
            for param in ("weight", "bias"):
                q, k, v = (megatron_tensor(state[f"{ours}attention.self.{x}.{param}"], "qkv")
                           for x in ("query", "key", "value"))
                q, k, v = (_split(x, "column", rank, tp) for x in (q, k, v))
                target = f"layers.{i}.self_attention.query_key_value.{param}"
                encoder[target] = torch_tensor(fuse_qkv(q, k, v, EXPORT_CHECKPOINT_VERSION, heads, head_dim))
                for x in ("query", "key", "value"):
                    names[f"{ours}attention.self.{x}.{param}"] = f"model.language_model.encoder.{target}"
                for part, (megatron_name, kind) in _LAYER_TO_MEGATRON.items():
                    split_kind = kind if (kind == "column" or param == "weight") else None
                    full = megatron_tensor(state[f"{ours}{part}.{param}"], part)
                    encoder[f"layers.{i}.{megatron_name}.{param}"] = torch_tensor(_split(full, split_kind, rank, tp))
                    names[f"{ours}{part}.{param}"] = f"model.language_model.encoder.layers.{i}.{megatron_name}.{param}"
        checkpoint = {"model": model, "checkpoint_version": EXPORT_CHECKPOINT_VERSION, "iteration": 0,
                      "args": megatron_args_for(config, tp, vocab, binary_head)}
        path = os.path.join(directory, "release", f"mp_rank_{rank:02d}", "model_optim_rng.pt")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save(checkpoint, path)
        del checkpoint, model
    with open(os.path.join(directory, "latest_checkpointed_iteration.txt"), "w", encoding="utf-8") as f:
        f.write("release")
    suffix = f" (split over {tp} ranks)" if tp > 1 else ""
    return {ours: theirs + suffix for ours, theirs in names.items()}
