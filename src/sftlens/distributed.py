"""Data-parallel helpers over ``torch.distributed`` (launched by ``torchrun`` or ``accelerate``).

sftlens never launches processes itself: run ``torchrun --nproc-per-node N -m sftlens analyze ...``
and each rank takes its share of the batches; accumulators are all-reduced before metrics are
computed, and only rank 0 writes files.
"""

from __future__ import annotations

import os

import torch.distributed as dist


def backend(cuda_available: bool) -> str:
    """The process-group backend: NCCL for CUDA tensors plus gloo for CPU ones (the pooled rows
    and object collectives stay on the CPU), or gloo alone without a GPU.

    >>> backend(True), backend(False)
    ('cpu:gloo,cuda:nccl', 'gloo')
    """
    return "cpu:gloo,cuda:nccl" if cuda_available else "gloo"


def init_from_env() -> tuple[int, int]:
    """(rank, world_size); initialises the process group if launched with WORLD_SIZE > 1.

    With a GPU, each rank first binds to its own device (``LOCAL_RANK``), so that NCCL and
    ``--device auto`` / ``cuda`` use GPU ``LOCAL_RANK`` rather than all ranks GPU 0.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and dist.is_available() and not dist.is_initialized():
        import torch

        cuda = torch.cuda.is_available()
        if cuda and "LOCAL_RANK" in os.environ:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group(backend(cuda))
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
