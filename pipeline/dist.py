"""Process-group setup that also works as a plain single process (no torchrun).

Modelled on edm2 ``torch_utils/distributed.py``: ``init()`` reads the torchrun environment,
picks gloo on CPU and nccl on GPU, and returns a ``DistInfo``. Library code asks
``DistInfo`` for its rank instead of touching globals.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init(device: str = "auto", timeout_s: int = 1800) -> DistInfo:
    """Initialise torch.distributed when launched by torchrun; otherwise a world of one.

    ``device``: "auto" (cuda:<local_rank> when available, else cpu), "cpu" or "cuda".
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("device=cuda was asked for but no CUDA device is visible")
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not torch_dist.is_initialized():
        torch_dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=dev if use_cuda else None,
        )
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world, device=dev)


def barrier() -> None:
    if torch_dist.is_initialized():
        torch_dist.barrier()


def shutdown() -> None:
    """Destroy the process group after a successful stage (the CLI calls it). Exiting without it can
    abort at interpreter teardown: gloo worker threads still hold tensors (SIGABRT, "terminate called")."""
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()
