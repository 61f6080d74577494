"""Scale-out on torch.distributed, applied from outside the model: expert parallelism over all-to-all, data
parallelism, launch by torchrun (see docs/distributed.md). The checkpoint layouts an expert-parallel run writes are
smoe.io.checkpoint's (``consolidate`` turns one into the other); the training state in them is
smoe.train.checkpoint's."""

from smoe.parallel.data_parallel import clip_gradients, local_rows, sync_gradients
from smoe.parallel.expert_parallel import (
    ExpertParallelExperts,
    apply_expert_parallel,
    expert_shard_ranges,
    max_ranks_per_token,
)
from smoe.parallel.launch import check_layout, collective_errors, init_distributed, is_main_process, local_device

__all__ = [
    "ExpertParallelExperts",
    "apply_expert_parallel",
    "check_layout",
    "clip_gradients",
    "collective_errors",
    "expert_shard_ranges",
    "init_distributed",
    "is_main_process",
    "local_device",
    "local_rows",
    "max_ranks_per_token",
    "sync_gradients",
]
