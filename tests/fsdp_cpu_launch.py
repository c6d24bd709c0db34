"""``torchrun`` target of ``test_distributed.py``: ``sftlens sft`` through accelerate's FSDP2 path
on CPU ranks (gloo).

accelerate enables FSDP on GPUs only; torch's ``fully_shard`` (FSDP2) also shards on CPU ranks
over gloo (torch >= 2.13), so this forces accelerate's FSDP2 path (its distributed type and
``is_fsdp2``) and runs the real ``train_sft``: weights loaded on the CPU and left for accelerate,
the optimizer built before ``prepare`` shards the model, clipping through the sharded
gradients, and the final weights gathered by ``accel.get_state_dict``.

Usage: torchrun --nproc-per-node 2 tests/fsdp_cpu_launch.py CONFIG_JSON
"""

from __future__ import annotations

import json
import sys

from accelerate import Accelerator
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

from sftlens.config import SFTConfig
from sftlens.tuning import loop, sft


def fsdp2_on_cpu(cfg: SFTConfig) -> Accelerator:
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2,
        auto_wrap_policy="transformer_based_wrap",  # the model's _no_split_modules
        reshard_after_forward=True,
        state_dict_type="FULL_STATE_DICT",
    )
    accel = Accelerator(cpu=True)
    accel.state.fsdp_plugin = plugin
    # accelerate's state would say MULTI_CPU: pin what a GPU launch with fsdp.yaml reports
    Accelerator.distributed_type = property(lambda self: DistributedType.FSDP)  # type: ignore[method-assign,assignment]
    Accelerator.is_fsdp2 = property(lambda self: True)  # type: ignore[method-assign,assignment]
    loop.check_fsdp(accel)
    return accel


if __name__ == "__main__":
    sft.make_accelerator = fsdp2_on_cpu  # type: ignore[assignment]
    sft.train_sft(SFTConfig(**json.loads(sys.argv[1])))
