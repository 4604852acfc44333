"""Training checkpoints that resume exactly, written atomically and read without running code.

Layout (``<output_dir>/checkpoint-<step>/``, written as ``checkpoint-<step>.tmp`` and renamed;
``<output_dir>/latest`` names the newest complete one and is written last)::

    config.json, model.safetensors           # or model.tpNN.safetensors per tensor-parallel rank:
                                             # the directory is also a from_pretrained() directory
    optimizer.tpNN.sdNN.safetensors          # AdamW state per (tensor-parallel, sharding) rank; its
                                             # non-tensor entries (LR_Scheduler) as JSON in the metadata
    rng_state.rankNNNN.json                  # python / numpy / paddle (+ tensor-parallel) generators
    trainer_state.json                       # step, LR schedule, loss scaler, data position, run settings

Checkpoints of earlier versions (``model_state*.pdparams``, ``optimizer*.pdopt``, ``rng_state*.pkl``)
are read through the restricted unpickler (``safe_pickle``): a poisoned file is refused, not run.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
import time
from typing import Any, Dict, List, Optional

import numpy as np

from .files import atomic_write_text, fsync_dir
from .safe_pickle import load_paddle_pickle
from .weights import load_model_state, read_safetensors, read_safetensors_metadata, write_safetensors

CHECKPOINT_PREFIX = "checkpoint-"
LATEST_FILE = "latest"
TRAINER_STATE_FILE = "trainer_state.json"
# Test hook: "STEP:SECONDS" sleeps inside the save of checkpoint STEP, after its files are written and
# before the rename, so a test can SIGKILL the process mid-save.
PAUSE_IN_SAVE_ENV = "MEGATRONBERT_TEST_PAUSE_IN_SAVE"
_NESTED = "::"  # "master_weights::<param>" in the optimizer file
_OPTIMIZER_KEY = "optimizer_state"  # the file's one metadata entry: {"non_tensor_state": ..., "paddle_dtypes": ...}


def _jsonable(value):
    if hasattr(value, "item"):
        value = value.item()
    return value


# ---- RNG state -----------------------------------------------------------------------------------------
def _generator_states_to_json(states) -> List:
    return [list(s.__getstate__()) for s in states]


def _generator_states_from_json(states) -> List:
    from paddle.base.libpaddle import GeneratorState

    out = []
    for saved in states:
        state = GeneratorState.__new__(GeneratorState)
        state.__setstate__(tuple(saved))
        out.append(state)
    return out


def capture_rng_state() -> Dict[str, Any]:
    """Every generator a training step draws from: python, numpy, paddle's (CPU, and the current
    accelerator's), and the tensor-parallel dropout stream."""
    import paddle

    from ..parallel import get_tensor_parallel_degree

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "paddle_cpu": paddle.get_rng_state("cpu")}
    if paddle.get_device() != "cpu":
        state["paddle_device"] = paddle.get_rng_state()
    if get_tensor_parallel_degree() > 1:
        from paddle.distributed.fleet.meta_parallel import get_rng_state_tracker

        state["tensor_parallel"] = get_rng_state_tracker().get_states_tracker()
    return state


def restore_rng_state(state: Dict[str, Any]) -> None:
    import paddle

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    paddle.set_rng_state(state["paddle_cpu"], "cpu")
    if "paddle_device" in state and paddle.get_device() != "cpu":
        paddle.set_rng_state(state["paddle_device"])
    if "tensor_parallel" in state:
        from paddle.distributed.fleet.meta_parallel import get_rng_state_tracker

        get_rng_state_tracker().set_states_tracker(state["tensor_parallel"])


def rng_state_to_json(state: Dict[str, Any]) -> Dict[str, Any]:
    """:func:`capture_rng_state` as plain JSON (every value exact: ints, the MT19937 key as a list)."""
    version, internal, gauss = state["python"]
    name, keys, pos, has_gauss, cached = state["numpy"]
    out = {"python": [version, list(internal), gauss],
           "numpy": [name, np.asarray(keys).tolist(), int(pos), int(has_gauss), float(cached)],
           "paddle_cpu": _generator_states_to_json(state["paddle_cpu"])}
    if "paddle_device" in state:
        out["paddle_device"] = _generator_states_to_json(state["paddle_device"])
    if "tensor_parallel" in state:
        out["tensor_parallel"] = {k: _generator_states_to_json(v) for k, v in state["tensor_parallel"].items()}
    return out


def rng_state_from_json(saved: Dict[str, Any]) -> Dict[str, Any]:
    version, internal, gauss = saved["python"]
    name, keys, pos, has_gauss, cached = saved["numpy"]
    state = {"python": (version, tuple(internal), gauss),
             "numpy": (name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached),
             "paddle_cpu": _generator_states_from_json(saved["paddle_cpu"])}
    if "paddle_device" in saved:
        state["paddle_device"] = _generator_states_from_json(saved["paddle_device"])
    if "tensor_parallel" in saved:
        state["tensor_parallel"] = {k: _generator_states_from_json(v) for k, v in saved["tensor_parallel"].items()}
    return state


# ---- optimizer state under stable names ----------------------------------------------------------------
# Paddle keys AdamW's accumulators by auto-generated parameter names ("linear_12.w_0_moment1_0"), which
# depend on how many layers the process built before; a checkpoint stores them under the model's
# structured names ("bert.encoder.layer.0.output.dense.weight/moment1_0") and maps them back on load.
def _name_maps(model):
    auto_to_structured = {p.name: n for n, p in model.named_parameters()}
    return auto_to_structured, {v: k for k, v in auto_to_structured.items()}


def _rename_keys(state: Dict[str, Any], prefixes: Dict[str, str], separator_in: str, separator_out: str):
    ordered = sorted(prefixes, key=len, reverse=True)
    renamed = {}
    for key, value in state.items():
        if key == "master_weights" and isinstance(value, dict):
            renamed[key] = {prefixes.get(k, k): v for k, v in value.items()}
            continue
        for prefix in ordered:
            if key.startswith(prefix + separator_in):
                key = prefixes[prefix] + separator_out + key[len(prefix) + len(separator_in):]
                break
        renamed[key] = value
    return renamed


def optimizer_state_to_structured(state: Dict[str, Any], model) -> Dict[str, Any]:
    auto_to_structured, _ = _name_maps(model)
    return _rename_keys(state, auto_to_structured, "_", "/")


def optimizer_state_from_structured(state: Dict[str, Any], model) -> Dict[str, Any]:
    _, structured_to_auto = _name_maps(model)
    return _rename_keys(state, structured_to_auto, "/", "_")


def _is_tensor(value) -> bool:
    return isinstance(value, np.ndarray) or (hasattr(value, "place") and hasattr(value, "numpy"))


def write_optimizer_state(state: Dict[str, Any], path: str) -> None:
    """An optimizer state dict -> one safetensors file: tensors (``master_weights`` flattened as
    ``master_weights::<name>``), their Paddle dtypes and every other entry as JSON in the metadata."""
    tensors, rest = {}, {}
    for key, value in state.items():
        if isinstance(value, dict) and value and all(_is_tensor(v) for v in value.values()):
            tensors.update({f"{key}{_NESTED}{k}": v for k, v in value.items()})
        elif _is_tensor(value):
            tensors[key] = value
        else:
            rest[key] = value
    dtypes = {k: str(v.dtype).replace("paddle.", "") for k, v in tensors.items()}
    # One metadata entry, its JSON sorted: safetensors writes several entries in a random (hash) order, and
    # the same state must give the same bytes (a resumed run's checkpoints equal an uninterrupted run's).
    entry = json.dumps({"non_tensor_state": rest, "paddle_dtypes": dtypes}, default=_jsonable, sort_keys=True)
    write_safetensors(tensors, path, {_OPTIMIZER_KEY: entry})


def read_optimizer_state(path: str) -> Dict[str, Any]:
    """:func:`write_optimizer_state`'s file back as Paddle tensors (in their saved dtypes) and plain values."""
    import paddle

    metadata = read_safetensors_metadata(path)
    if _OPTIMIZER_KEY not in metadata:
        raise ValueError(f"{path} is not an optimizer state of this package (no {_OPTIMIZER_KEY} in its metadata)")
    entry = json.loads(metadata[_OPTIMIZER_KEY])
    state: Dict[str, Any] = entry["non_tensor_state"]
    dtypes = entry["paddle_dtypes"]
    for key, lazy in read_safetensors(path).items():
        value = paddle.to_tensor(np.asarray(lazy))
        if key in dtypes and dtypes[key] not in str(value.dtype):
            value = value.astype(dtypes[key])
        outer, _, inner = key.partition(_NESTED)
        if inner:
            state.setdefault(outer, {})[inner] = value
        else:
            state[key] = value
    return state


def _read_legacy_optimizer_state(path: str) -> Dict[str, Any]:
    """A ``.pdopt`` of an earlier version, through the restricted unpickler, as Paddle tensors."""
    import paddle

    def to_paddle(value):
        if isinstance(value, np.ndarray):
            return paddle.to_tensor(value)
        if isinstance(value, dict):
            return {k: to_paddle(v) for k, v in value.items()}
        return value

    state = load_paddle_pickle(path)
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not an optimizer state dict")
    return {k: (v if k == "LR_Scheduler" else to_paddle(v)) for k, v in state.items()}


# ---- checkpoints ---------------------------------------------------------------------------------------
def checkpoint_path(output_dir: str, step: int) -> str:
    return os.path.join(output_dir, f"{CHECKPOINT_PREFIX}{step}")


def _barrier(topo) -> None:
    if topo is not None and topo.world_size > 1:
        import paddle.distributed as dist

        dist.barrier()


def _optimizer_file(topo, legacy: bool = False) -> str:
    tp_rank = topo.tp_rank if topo is not None else 0
    sharding_rank = topo.sharding_rank if topo is not None else 0
    return f"optimizer.tp{tp_rank:02d}.sd{sharding_rank:02d}.{'pdopt' if legacy else 'safetensors'}"


def _rng_file(topo, legacy: bool = False) -> str:
    return f"rng_state.rank{(topo.rank if topo is not None else 0):04d}.{'pkl' if legacy else 'json'}"


def _pause_for_test(step: int) -> None:
    hook = os.environ.get(PAUSE_IN_SAVE_ENV)
    if hook:
        hook_step, seconds = hook.split(":")
        if int(hook_step) == step:
            print(f"[test hook] pausing {seconds}s inside the save of step {step}", flush=True)
            time.sleep(float(seconds))


def save_checkpoint(output_dir: str, step: int, model, optimizer, lr_scheduler=None, scaler=None,
                    trainer_state: Optional[Dict[str, Any]] = None, topo=None,
                    extra_files: Optional[Dict[str, str]] = None, save_total_limit: Optional[int] = None) -> str:
    """Write ``checkpoint-<step>`` atomically; every rank calls it. Returns the checkpoint directory.

    Args:
        model: the unwrapped model (``save_pretrained`` writes its weights and config.json).
        optimizer: the (possibly fleet-wrapped) optimizer; its state is stored under structured names.
        lr_scheduler, scaler: their state dicts go into trainer_state.json (scaler may be None).
        trainer_state: JSON-able run state (step, data position, settings) stored as trainer_state.json.
        topo: the run's :class:`~paddle_megatronbert.distributed.Topology` (None: one process).
        extra_files: ``{name in the checkpoint: source path}`` copied in (e.g. the tokenizer's vocab.txt).
        save_total_limit: keep at most this many checkpoints (oldest removed after ``latest`` moved on).

    All files go to ``checkpoint-<step>.tmp``; the main rank renames it to ``checkpoint-<step>`` and then
    rewrites ``latest``. A crash at any point leaves ``latest`` naming a complete checkpoint.
    """
    is_main = topo is None or topo.is_main
    final = checkpoint_path(output_dir, step)
    tmp = final + ".tmp"
    if is_main:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)  # left by a run killed mid-save
        os.makedirs(tmp)
    _barrier(topo)
    model.save_pretrained(tmp, merge_tensor_parallel=False)
    if topo is None or topo.dp_rank == 0:  # dp replicas hold identical optimizer states
        state = optimizer_state_to_structured(optimizer.state_dict(), model)
        write_optimizer_state(state, os.path.join(tmp, _optimizer_file(topo)))
    atomic_write_text(os.path.join(tmp, _rng_file(topo)), json.dumps(rng_state_to_json(capture_rng_state())))
    _barrier(topo)
    if is_main:
        state = dict(trainer_state or {})
        state["global_step"] = step
        state["world_size"] = topo.world_size if topo is not None else 1
        state["tensor_parallel_degree"] = topo.tp_degree if topo is not None else 1
        state["sharding_degree"] = topo.sharding_degree if topo is not None else 1
        if lr_scheduler is not None:
            state["lr_scheduler"] = lr_scheduler.state_dict()
        if scaler is not None:
            state["scaler"] = {k: _jsonable(v) for k, v in scaler.state_dict().items()}
        for name, source in (extra_files or {}).items():
            shutil.copyfile(source, os.path.join(tmp, name))
        atomic_write_text(os.path.join(tmp, TRAINER_STATE_FILE), json.dumps(state, indent=2, sort_keys=True))
        for name in os.listdir(tmp):
            with open(os.path.join(tmp, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(tmp)
        _pause_for_test(step)
        if os.path.isdir(final):
            shutil.rmtree(final)  # a complete checkpoint of a run that died before moving `latest` to it
        os.rename(tmp, final)
        fsync_dir(output_dir)
        atomic_write_text(os.path.join(output_dir, LATEST_FILE), os.path.basename(final) + "\n")
        if save_total_limit:
            _prune_checkpoints(output_dir, save_total_limit, keep=os.path.basename(final))
    _barrier(topo)
    return final


def _checkpoint_step(name: str) -> Optional[int]:
    match = re.fullmatch(re.escape(CHECKPOINT_PREFIX) + r"(\d+)", name)
    return int(match.group(1)) if match else None


def _prune_checkpoints(output_dir: str, limit: int, keep: str) -> None:
    names = sorted((n for n in os.listdir(output_dir) if _checkpoint_step(n) is not None), key=_checkpoint_step)
    for name in names[:-limit] if limit > 0 else []:
        if name != keep:
            shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)


def latest_checkpoint(output_dir: str) -> Optional[str]:
    """The checkpoint ``<output_dir>/latest`` names, or None when there is none. Unfinished
    ``*.tmp`` directories are never returned."""
    pointer = os.path.join(output_dir, LATEST_FILE)
    if not os.path.isfile(pointer):
        return None
    with open(pointer, encoding="utf-8") as f:
        name = f.read().strip()
    path = os.path.join(output_dir, name)
    if _checkpoint_step(name) is None or not os.path.isfile(os.path.join(path, TRAINER_STATE_FILE)):
        raise ValueError(f"{pointer} names {name!r}, which is not a complete checkpoint in {output_dir}")
    return path


def read_trainer_state(checkpoint_dir: str) -> Dict[str, Any]:
    path = os.path.join(checkpoint_dir, TRAINER_STATE_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{checkpoint_dir} is not a checkpoint (no {TRAINER_STATE_FILE})")
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON (corrupt checkpoint?): {err}") from None
    if not isinstance(state, dict) or "global_step" not in state:
        raise ValueError(f"{path} is not a trainer state (a JSON object with global_step)")
    return state


def _read_rng_state(checkpoint_dir: str, topo) -> Optional[Dict[str, Any]]:
    path = os.path.join(checkpoint_dir, _rng_file(topo))
    legacy = os.path.join(checkpoint_dir, _rng_file(topo, legacy=True))
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                return rng_state_from_json(json.load(f))
        except (ValueError, KeyError, TypeError) as err:  # JSONDecodeError is a ValueError
            raise ValueError(f"cannot read {path} (corrupt or truncated?): {type(err).__name__}: {err}") from None
    if os.path.isfile(legacy):
        return load_paddle_pickle(legacy, generator_states=True)
    return None


def load_checkpoint(checkpoint_dir: str, model, optimizer, lr_scheduler=None, scaler=None, topo=None,
                    restore_rng: bool = True) -> Dict[str, Any]:
    """Restore what :func:`save_checkpoint` wrote; returns the trainer state. Call after building the
    model and optimizer (their construction draws random numbers; the generators are restored last)."""
    state = read_trainer_state(checkpoint_dir)
    world = topo.world_size if topo is not None else 1
    tp = topo.tp_degree if topo is not None else 1
    sharding = topo.sharding_degree if topo is not None else 1
    if (state.get("tensor_parallel_degree", 1), state.get("sharding_degree", 1)) != (tp, sharding):
        raise ValueError(f"{checkpoint_dir} was written with tensor_parallel_degree "
                         f"{state.get('tensor_parallel_degree', 1)} and sharding_degree {state.get('sharding_degree', 1)}; "
                         f"this run has {tp} and {sharding}: the optimizer state cannot be resharded, resume with the "
                         "same degrees (or start a new run from its weights with --model_name_or_path)")
    model.load_full_state_dict(load_model_state(checkpoint_dir), strict=True, source=checkpoint_dir)
    optimizer_path = os.path.join(checkpoint_dir, _optimizer_file(topo))
    legacy_path = os.path.join(checkpoint_dir, _optimizer_file(topo, legacy=True))
    if os.path.isfile(optimizer_path):
        optimizer_state = read_optimizer_state(optimizer_path)
    elif os.path.isfile(legacy_path):
        optimizer_state = _read_legacy_optimizer_state(legacy_path)
    else:
        raise FileNotFoundError(f"{checkpoint_dir} has no {os.path.basename(optimizer_path)}")
    optimizer.set_state_dict(optimizer_state_from_structured(optimizer_state, model))
    if lr_scheduler is not None and "lr_scheduler" in state:
        lr_scheduler.set_state_dict(state["lr_scheduler"])
    if scaler is not None and "scaler" in state:
        scaler.load_state_dict(state["scaler"])
    if restore_rng:
        rng_state = _read_rng_state(checkpoint_dir, topo) if state.get("world_size", 1) == world else None
        if rng_state is not None:
            restore_rng_state(rng_state)
        else:
            print(f"warning: {checkpoint_dir} was written by {state.get('world_size', 1)} process(es), this run has "
                  f"{world}: random streams start fresh (dropout masks differ from an uninterrupted run)",
                  file=sys.stderr)
    return state
