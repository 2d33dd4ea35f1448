"""torch.distributed under torchrun: one process per device; helpers that are no-ops in one process."""
from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist


_CHOICE = {"device": "auto"}


def use(device: str) -> None:
    """The device the runs of this process use: 'auto' (CUDA when torch sees it), 'cuda' or 'cpu' (the config's
    `device`; the refusals of a wrong choice are core.environment.check_device's)."""
    _CHOICE["device"] = device


def cuda() -> bool:
    return _CHOICE["device"] != "cpu" and torch.cuda.is_available()


def init() -> None:
    """Join the process group torchrun describes (RANK/WORLD_SIZE set); nothing in a single process."""
    if "RANK" not in os.environ or dist.is_initialized():
        return
    backend = "nccl" if cuda() else "gloo"
    if cuda():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend)


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def gather(obj: Any) -> list[Any]:
    """Every rank's object, in rank order (a one-element list in a single process)."""
    if not active():
        return [obj]
    out: list[Any] = [None] * world()
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj: Any) -> Any:
    """Rank 0's object on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def mean(value: float) -> float:
    if not active():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device())  # NCCL reduces GPU tensors only
    dist.all_reduce(t)
    return float(t.item()) / world()


def device() -> torch.device:
    if cuda():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
