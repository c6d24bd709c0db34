"""Data-parallel helpers over ``torch.distributed`` (launched by ``torchrun`` or ``accelerate``).

sftlens never launches processes itself: run ``torchrun --nproc-per-node N -m sftlens analyze ...``
and each rank takes its share of the batches; accumulators are all-reduced before metrics are
computed, and only rank 0 writes files.
"""

from __future__ import annotations

import os

import torch.distributed as dist


def init_from_env() -> tuple[int, int]:
    """(rank, world_size); initialises the process group if launched with WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and dist.is_available() and not dist.is_initialized():
        import torch

        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
