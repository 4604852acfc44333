"""A tiny megatron-core BertModel as Megatron-LM's ``pretrain_bert.py`` builds it, saved and loaded with
Megatron-LM's own checkpointing: the oracle of ``tests/test_megatron_core.py``.

Run as a script by :func:`run_jobs` (one process per rank, gloo). Each job: Megatron-LM's ``parse_args``
→ ``validate_args`` → ``core_transformer_config_from_args`` → ``pretrain_bert.py``'s model provider
(``BertModel`` with the local spec; ``pretrain_bert.py`` itself is not in the wheel) → either fill the
weights deterministically and ``save_checkpoint`` them, or ``load_checkpoint(strict=True)`` a checkpoint
→ forward on :data:`BATCH` → logits in ``logits`` (``.npz``). Weights come from each parameter's *full*
tensor, seeded by its global name, sliced to this rank's shard: every TP/PP layout of a job's flags holds
the same model.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import zlib

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
# hidden 32, 4 heads, 2 layers, 16 positions; vocab 112 pads to itself for TP 1 and 2 (divisible by 8)
BASE_ARGV = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--ffn-hidden-size", "64",
             "--seq-length", "16", "--max-position-embeddings", "16", "--micro-batch-size", "2",
             "--vocab-size", "112", "--make-vocab-size-divisible-by", "8", "--tokenizer-type", "BertWordPieceLowerCase",
             "--use-cpu-initialization", "--no-persist-layer-norm", "--spec", "local", "--transformer-impl", "local",
             "--attention-backend", "local", "--no-gradient-accumulation-fusion", "--no-masked-softmax-fusion",
             "--hidden-dropout", "0", "--attention-dropout", "0", "--save-interval", "1", "--train-iters", "1",
             "--no-save-optim", "--seed", "1234"]


def batch():
    """(input_ids, attention_mask, token_type_ids) of shape (2, 16): the second row padded after 10."""
    rng = np.random.RandomState(7)
    ids = rng.randint(1, 100, size=(2, 16)).astype(np.int64)
    mask = np.ones((2, 16), np.int64)
    mask[1, 10:] = 0
    types = np.zeros((2, 16), np.int64)
    types[:, 8:] = 1
    return ids, mask, types


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_jobs(jobs, world_size: int, workdir: str, timeout: int = 240) -> None:
    """Run ``jobs`` in ``world_size`` gloo processes (a job's TP x PP may be smaller: the rest is data
    parallel); raises with the processes' output if one fails. A job: ``argv`` (Megatron-LM flags beside
    :data:`BASE_ARGV`), ``tp``, ``pp``, then either ``formats`` ({ckpt format: save dir}) and optionally
    ``variants`` ({save dir: {arg: value}}: saved again with those args changed), or ``load`` (a dir to
    ``load_checkpoint`` with ``--use-checkpoint-args``); ``logits``: where to write its forward's."""
    spec = os.path.join(workdir, f"jobs_{world_size}.json")
    with open(spec, "w") as f:
        json.dump(jobs, f)
    port = free_port()
    procs, logs = [], []
    for rank in range(world_size):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
        log = open(os.path.join(workdir, f"mcore_{world_size}_{rank}.log"), "w+")
        procs.append(subprocess.Popen([sys.executable, __file__, spec], env=env, stdout=log, stderr=subprocess.STDOUT))
        logs.append(log)
    failed = []
    for rank, proc in enumerate(procs):
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
        if proc.returncode != 0:
            logs[rank].seek(0)
            failed.append(f"rank {rank}: " + logs[rank].read()[-3000:])
    for log in logs:
        log.close()
    if failed:
        raise RuntimeError("megatron-core oracle failed:\n" + "\n".join(failed))


# ---- inside a rank ---------------------------------------------------------------------------------
def _global_name(model, name: str) -> str:
    """A parameter's name with its global layer number (PP stages number their layers from 0)."""
    parts = name.split(".")
    if parts[:2] == ["encoder", "layers"]:
        parts[2] = str(model.encoder.layers[int(parts[2])].layer_number - 1)
    return ".".join(parts)


def _fill(model, tp_rank: int, tp: int, tied: bool, zero_centered: bool) -> None:
    """Every parameter from its full tensor (seeded by its global name), this rank's slice of it.
    LayerNorm weights are about 1 (``zero_centered``, --apply-layernorm-1p: the stored ``gamma - 1`` about 0)."""
    import torch

    for name, param in model.named_parameters():
        key = _global_name(model, name)
        if tied and key == "output_layer.weight":  # the last PP stage's copy of the word embeddings
            key = "embedding.word_embeddings.weight"
        split = getattr(param, "tensor_model_parallel", False)
        dim = getattr(param, "partition_dim", 0) if split else None
        shape = list(param.shape)
        if split:
            shape[dim] *= tp
        rng = np.random.RandomState(zlib.crc32(key.encode()))
        full = rng.randn(*shape).astype(np.float32) * 0.2
        if key.endswith("norm.weight"):
            full = full * 0.5 + (0.0 if zero_centered else 1.0)
        if split:
            full = np.split(full, tp, axis=dim)[tp_rank]
        with torch.no_grad():
            param.copy_(torch.from_numpy(np.ascontiguousarray(full)))


def _zero_centered_layer_norm(torch):
    """megatron-core's ``FusedLayerNorm`` with ``--apply-layernorm-1p`` computes with ``weight + 1``
    (``fused_layer_norm.py``); its CPU stand-in ``WrappedTorchNorm`` refuses the flag. This is that
    formula on torch's LayerNorm, so the oracle can run such a model without Apex."""
    from megatron.core.transformer import torch_norm

    class ZeroCenteredLayerNorm(torch.nn.LayerNorm):
        def forward(self, x):
            return torch.nn.functional.layer_norm(x, self.normalized_shape, self.weight + 1, self.bias, self.eps)

    original = torch_norm.WrappedTorchNorm.__new__

    def new(cls, config, hidden_size, eps=1e-5, **kwargs):
        if config.layernorm_zero_centered_gamma:
            return ZeroCenteredLayerNorm(hidden_size, eps=eps)
        return original(cls, config, hidden_size, eps, **kwargs)

    torch_norm.WrappedTorchNorm.__new__ = new


def _run_job(job, rank, world):
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.models.bert.bert_layer_specs import bert_layer_local_spec
    from megatron.core.models.bert.bert_model import BertModel
    from megatron.core.num_microbatches_calculator import destroy_num_microbatches_calculator
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.training import arguments, checkpointing, global_vars

    tp, pp = job.get("tp", 1), job.get("pp", 1)
    argv = BASE_ARGV + ["--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp)]
    argv += job["argv"]
    if "load" in job:
        argv += ["--load", job["load"], "--no-load-optim", "--no-load-rng", "--use-checkpoint-args"]
    sys.argv = ["pretrain_bert.py"] + argv
    args = arguments.parse_args()
    if "load" in job:  # --use-checkpoint-args: the model is built from the args stored in the checkpoint
        checkpointing.load_args_from_checkpoint(args)
    arguments.validate_args(args, {"tokenizer_type": "BertWordPieceLowerCase"})
    global_vars.set_global_variables(args, build_tokenizer=False)
    if "load" not in job:
        args.padded_vocab_size = 112  # what the tokenizer build would set (vocab 112, padded for TP 1 and 2)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    model_parallel_cuda_manual_seed(1234)
    config = arguments.core_transformer_config_from_args(args)
    pre, post = parallel_state.is_pipeline_first_stage(), parallel_state.is_pipeline_last_stage()
    model = BertModel(config=config, transformer_layer_spec=bert_layer_local_spec, vocab_size=args.padded_vocab_size,
                      max_sequence_length=args.max_position_embeddings,
                      num_tokentypes=2 if args.bert_binary_head else 0, add_binary_head=args.bert_binary_head,
                      share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
                      parallel_output=True, pre_process=pre, post_process=post)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    if "load" in job:
        checkpointing.load_checkpoint([model], None, None, strict=True)
    else:
        _fill(model, tp_rank, tp, tied=not args.untie_embeddings_and_output_weights,
              zero_centered=config.layernorm_zero_centered_gamma)
        for fmt, directory in job["formats"].items():
            args.ckpt_format, args.save = fmt, directory
            args.use_dist_ckpt = fmt != "torch"
            checkpointing.save_checkpoint(1, [model], None, None, 0)
        # the same model saved with one arg changed in the stored args (for the refusal tests)
        args.ckpt_format, args.use_dist_ckpt = "torch", False
        for directory, changed in job.get("variants", {}).items():
            kept = {name: getattr(args, name) for name in changed}
            vars(args).update(changed)
            args.save = directory
            checkpointing.save_checkpoint(1, [model], None, None, 0)
            vars(args).update(kept)
    if pp == 1 and job.get("logits"):
        model.eval()
        ids, mask, types = (torch.from_numpy(a) for a in batch())
        with torch.no_grad():
            lm, nsp = model(ids, mask, tokentype_ids=types if args.bert_binary_head else None)
        if tp > 1:  # vocab-parallel logits: gather the ranks' vocab slices
            parts = [torch.empty_like(lm) for _ in range(tp)]
            dist.all_gather(parts, lm.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
            lm = torch.cat(parts, dim=-1)
        if rank == 0:
            np.savez(job["logits"], lm=lm.numpy(), nsp=nsp.numpy() if nsp is not None else np.zeros(0))
    dist.barrier()
    parallel_state.destroy_model_parallel()
    destroy_num_microbatches_calculator()
    global_vars.destroy_global_vars()
    checkpointing._CHECKPOINT_VERSION = None  # the next job loads or saves afresh


def main(spec_path: str) -> None:
    sys.path.insert(0, HERE)
    import megatron_core_shims

    megatron_core_shims.apply()
    import torch
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    _zero_centered_layer_norm(torch)
    with open(spec_path) as f:
        jobs = json.load(f)
    for job in jobs:
        _run_job(job, rank, world)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
