"""What megatron-core 0.19 needs to run on a CPU-only torch, applied in the tests only (never in the package).

``apply()`` must run before the first ``import megatron``. Each shim is the smallest change that lets
megatron-core's own code run unmodified on CPU:

- ``megatron.core.transformer.moe.ops.paged_stash`` imports triton at import time (BERT never uses MoE):
  a stub module in ``sys.modules``;
- ``typing.override`` (Python 3.12) is used as a decorator: an identity function on 3.11;
- ``GlobalMemoryBuffer.get_tensor`` allocates the attention scratch buffer on the current CUDA device: on CPU;
- ``torch.cuda.get_rng_state`` (called by ``save_checkpoint`` for the RNG state) and the RNG tracker's
  CUDA state get/set (forked around dropout): the CPU generator's state, switching a no-op;
- ``torch.cuda.synchronize`` (the ``torch_dist`` writer waits for the GPU before copying): a no-op, and
  ``torch.cuda.current_device`` (where it puts its failure flag): ``"cpu"``;
- ``torch.cuda.get_device_properties`` (``validate_args`` asks the GPU generation when TP > 1): "cpu", 0.0;
- ``Tensor.cuda`` (PP > 1: the tied embeddings are moved to the GPU before the stages all-reduce them): identity;
- ``checkpointing.read_metadata`` (loading: the tracker file's iteration all-reduced on 'cuda'): on CPU;
- ``TORCHDYNAMO_DISABLE=1``: its ``jit_fuser`` is ``torch.compile``, which needs a compiler toolchain.
"""

from __future__ import annotations

import os
import sys
import types
import typing

_APPLIED = False


def apply() -> None:
    """Install the shims (idempotent)."""
    global _APPLIED
    if _APPLIED:
        return
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")  # validate_args requires it for TP > 1
    if not hasattr(typing, "override"):
        typing.override = lambda function: function
    stub = types.ModuleType("megatron.core.transformer.moe.ops.paged_stash")
    stub.GLOBAL_BLOCK_SIZE = 1024  # the names megatron.core.transformer.moe.paged_stash imports
    stub.paged_stash_copy_kernel = stub.paged_stash_pop_kernel = None
    sys.modules.setdefault("megatron.core.transformer.moe.ops.paged_stash", stub)

    import torch

    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.get_rng_state_all = lambda: [torch.get_rng_state()]
    torch.cuda.synchronize = lambda device=None: None  # the torch_dist writer waits for the GPU
    torch.cuda.current_device = lambda: "cpu"  # ... and all-reduces its failure flag on that device
    # with PP > 1 the first and last stages sync the tied embeddings after moving them with .cuda()
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    # validate_args asks the GPU's architecture when TP > 1 (for a performance warning only)
    torch.cuda.get_device_properties = lambda device=None: types.SimpleNamespace(major=0, minor=0, name="cpu")

    from megatron.core import utils

    def get_tensor_on_cpu(self, tensor_shape, dtype, name, mem_alloc_context=None):
        import operator
        from functools import reduce

        required = reduce(operator.mul, tensor_shape, 1)
        key = (name, dtype)
        if self.buffer.get(key) is None or self.buffer[key].numel() < required:
            self.buffer[key] = torch.empty(required, dtype=dtype, requires_grad=False)
        return self.buffer[key][0:required].view(*tensor_shape)

    utils.GlobalMemoryBuffer.get_tensor = get_tensor_on_cpu
    from megatron.core.tensor_parallel import random as megatron_random

    # The model-parallel RNG tracker forks the CUDA generator around dropout (0 in the tests): keep it on
    # the CPU generator's state and make switching a no-op.
    megatron_random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    megatron_random._set_cuda_rng_state = lambda *args, **kwargs: None
    from megatron.training import checkpointing

    def read_metadata_on_cpu(tracker_filename):
        """checkpointing.read_metadata with its all-reduce of the iteration on CPU instead of 'cuda'."""
        with open(tracker_filename) as f:
            text = f.read().strip()
        release = text == "release"
        iteration = 0 if release else int(text)
        if torch.distributed.is_initialized():
            value = torch.tensor([iteration], dtype=torch.long)
            torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
            iteration = int(value[0])
        return iteration, release

    checkpointing.read_metadata = read_metadata_on_cpu
    _APPLIED = True
