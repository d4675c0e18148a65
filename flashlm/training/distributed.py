"""This process's place in a run: the device, and the torchrun process group when there is one."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from flashlm.errors import ConfigError
from flashlm.hardware import default_device


@dataclass
class DistEnv:
    """This process's place in the run."""

    device: torch.device
    rank: int = 0
    world: int = 1
    enabled: bool = False  # launched by torchrun: a process group exists
    owns_group: bool = False  # we created it, so we destroy it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """The training device: for auto, cuda:local_rank when CUDA is available, else the CPU."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: cuda requested but no CUDA device is available; use auto or cpu")
    return default_device(name, local_rank)


def setup_distributed(device_name: str = "auto") -> DistEnv:
    """Join the torchrun process group (nccl on CUDA, gloo on CPU) when RANK/WORLD_SIZE are set."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistEnv(pick_device(device_name))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = pick_device(device_name, int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        if device.type == "cuda":
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    return DistEnv(device, rank, world, True, owns)


def teardown(env: DistEnv) -> None:
    if env.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def mean_across_ranks(values: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.enabled:
        values = values.clone()
        dist.all_reduce(values)
        values /= env.world
    return values
