"""Process groups for ``torchrun`` and the per-rank order of samples.

Launched by ``torchrun`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set), training joins a process
group (NCCL on CUDA, gloo on CPU) and each process takes its slice of every global batch.
Training batches drop the last incomplete global batch so every step has the same global batch
on every process; evaluation shards cover every image exactly once and are summed with
``all_reduce``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Whether this process logs and writes checkpoints."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """Whether there is more than one process."""
        return self.world_size > 1


def init_distributed(device: torch.device) -> DistInfo:
    """Join the ``torchrun`` process group if the environment names one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
        if restart is not None and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            # torchrun keeps its store across worker restarts, still holding the addresses of
            # the workers that died; a restarted gloo group could connect to those and hang.
            # Keys under a prefix per attempt leave the old entries unread.
            store = dist.TCPStore(
                os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False
            )
            dist.init_process_group(
                backend=backend,
                store=dist.PrefixStore(f"polynet/attempt{restart}", store),
                rank=int(os.environ["RANK"]),
                world_size=world,
            )
        else:
            dist.init_process_group(backend=backend)
    info = DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return info


def shutdown_distributed() -> None:
    """Leave the process group (safe to call when there is none)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    """Wait for every process."""
    if info.enabled:
        dist.barrier()


def all_sum(info: DistInfo, *values: float) -> list[float]:
    """Sum numbers over processes (float64, so counts of images stay exact)."""
    if not info.enabled:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor)
    return tensor.tolist()


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    """Return the shuffled sample order of an epoch, identical on every process."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_samples, generator=generator)


def train_batches(
    num_samples: int, global_batch: int, seed: int, epoch: int, info: DistInfo
) -> list[torch.Tensor]:
    """Return the index batches of this process for one training epoch.

    The epoch is ``num_samples // global_batch`` global batches of a fresh permutation; process
    ``r`` takes images ``r * b .. (r + 1) * b`` of each, ``b = global_batch / world_size``.
    """
    local = global_batch // info.world_size
    order = epoch_permutation(num_samples, seed, epoch)
    steps = num_samples // global_batch
    start = info.rank * local
    return [
        order[s * global_batch + start : s * global_batch + start + local] for s in range(steps)
    ]


def eval_indices(num_samples: int, info: DistInfo) -> list[int]:
    """Return this process's share of evaluation images: every ``world_size``-th one.

    Each image is seen exactly once over all processes.
    """
    return list(range(info.rank, num_samples, info.world_size))
