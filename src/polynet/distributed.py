"""The one process group: where this process sits in a ``torchrun`` job, and its collectives.

Every part of polynet that runs under ``torchrun`` (train, eval, ablate, bench) reads its rank
here and sums, gathers and waits through :class:`ProcessGroup`; nothing else touches
``torch.distributed`` or reads ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``.

The group is made with a backend for every device its collectives meet. On CUDA that is
``"cpu:gloo,cuda:nccl"``: NCCL has no CPU backend, so a CPU tensor all-reduced on an NCCL-only
group raises at the first step ("No backend type associated with device type cpu"), and
``all_gather_object`` and small host-side counts are CPU tensors.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class LaunchEnv:
    """What ``torchrun`` told this process through its environment.

    Attributes:
        rank: This process's rank in the job.
        world_size: Processes in the job.
        local_rank: Its rank on this machine (its GPU index).
        restart: How often ``torchrun`` restarted the workers (0 on the first attempt).
        agent_store: Whether ``torchrun``'s agent keeps the rendezvous store across restarts.
        launched: Whether a launcher (``torchrun``) started this process: it then joins a
            process group, even a group of one.

    """

    launched: bool = False
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    restart: int = 0
    agent_store: bool = False


def launch_env() -> LaunchEnv:
    """Read ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the restart count (the one place)."""
    env = os.environ
    return LaunchEnv(
        launched="RANK" in env and "WORLD_SIZE" in env and "MASTER_ADDR" in env,
        rank=int(env.get("RANK", "0")),
        world_size=int(env.get("WORLD_SIZE", "1")),
        local_rank=int(env.get("LOCAL_RANK", "0")),
        restart=int(env.get("TORCHELASTIC_RESTART_COUNT", "0")),
        agent_store=env.get("TORCHELASTIC_USE_AGENT_STORE") == "True",
    )


def backend_for(device: torch.device) -> str:
    """The backend of a group whose work runs on ``device``: one for every device type used.

    On CUDA, NCCL for the model's tensors and gloo for CPU tensors (objects, host counts);
    on the CPU, gloo.
    """
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


@dataclass(frozen=True)
class ProcessGroup:
    """Where this process sits in the job, and the collectives over it.

    A process started without ``torchrun`` is alone: every collective returns its input.

    Attributes:
        rank: This process's rank.
        world_size: Processes in the group.
        local_rank: Its rank on this machine.
        device: Where collectives of numbers run (the training or evaluation device).
        joined: Whether a ``torch.distributed`` group exists (under ``torchrun``, even of one
            process): collectives then run, and models are DDP-wrapped.

    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    joined: bool = False

    @property
    def is_main(self) -> bool:
        """Whether this process logs and writes files."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """Whether collectives run: the process has joined a group (:func:`join`)."""
        return self.joined

    def barrier(self) -> None:
        """Wait for every process."""
        if self.enabled:
            dist.barrier()

    def all_sum(self, values: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over processes, on this group's device; returns the sum.

        Collectives run where the tensor is (NCCL for CUDA tensors, gloo for CPU ones); no value
        is read back to the host here.
        """
        if not self.enabled:
            return values
        values = values.to(self.device)
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return values

    def sum_numbers(self, *values: float) -> list[float]:
        """Sum plain numbers over processes (float64: counts of images stay exact)."""
        if not self.enabled:
            return list(values)
        return self.all_sum(torch.tensor(values, dtype=torch.float64)).tolist()

    def from_main(self, value: Any) -> Any:
        """The main process's ``value``, on every process."""
        if not self.enabled:
            return value
        box = [value if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value: Any) -> list[Any]:
        """Every process's ``value``, in rank order, on every process."""
        if not self.enabled:
            return [value]
        every: list[Any] = [None] * self.world_size
        dist.all_gather_object(every, value)
        return every


SINGLE = ProcessGroup()
"""The group of a process that runs alone."""


def current(device: torch.device | str = "cpu") -> ProcessGroup:
    """The group this process has joined (:func:`join`), or a group of one."""
    if not (dist.is_available() and dist.is_initialized()):
        return ProcessGroup(device=torch.device(device))
    env = launch_env()
    device = torch.device(device)
    return ProcessGroup(dist.get_rank(), dist.get_world_size(), env.local_rank, device, True)


def join(device: torch.device) -> ProcessGroup:
    """Join the ``torchrun`` job the environment names (alone without ``torchrun``).

    Args:
        device: The device type the work runs on; on CUDA this process takes GPU
            ``LOCAL_RANK`` and the group's device is that GPU.

    Returns:
        The group, with ``device`` set to where its collectives of numbers run.

    """
    env = launch_env()
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", env.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not env.launched and not dist.is_initialized():
        return ProcessGroup(device=device)
    if not dist.is_initialized():
        backend = backend_for(device)
        if env.restart and env.agent_store:
            # torchrun keeps its store across worker restarts, still holding the addresses of
            # the workers that died; a restarted gloo group could connect to those and hang.
            # Keys under a prefix per attempt leave the old entries unread.
            store = dist.TCPStore(
                os.environ["MASTER_ADDR"],
                int(os.environ["MASTER_PORT"]),
                env.world_size,
                is_master=False,
            )
            dist.init_process_group(
                backend=backend,
                store=dist.PrefixStore(f"polynet/attempt{env.restart}", store),
                rank=env.rank,
                world_size=env.world_size,
            )
        else:
            dist.init_process_group(backend=backend)
    return ProcessGroup(dist.get_rank(), dist.get_world_size(), env.local_rank, device, True)


def leave() -> None:
    """Leave the process group (safe to call when there is none)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_main_process() -> bool:
    """Whether this process reports and writes (rank 0, or no ``torchrun``)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return launch_env().rank == 0


def world_size() -> int:
    """Processes in this job (from the joined group, else from ``torchrun``'s environment)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return launch_env().world_size


__all__ = [
    "SINGLE",
    "LaunchEnv",
    "ProcessGroup",
    "backend_for",
    "current",
    "is_main_process",
    "join",
    "launch_env",
    "leave",
    "world_size",
]
