"""The processes of a run: one (plain PyTorch), or one per device under torchrun (`trainer.deepspeed`).

Every rank draws the same prompts and keeps its slice; what the whole batch needs (rewards for advantages,
texts and lengths for metrics, token counts for the loss normalization) is gathered or summed across ranks
with the helpers below, which are no-ops in a single process.
"""

from __future__ import annotations

import os
import socket

import torch


class SingleProcess:
    rank, world_size, is_main = 0, 1, True

    def shard(self, items: list) -> list:
        """This rank's contiguous slice of `items` (all of it in a single process)."""
        return items

    def gather(self, obj) -> list:
        """`obj` from every rank, in rank order."""
        return [obj]

    def sum(self, values: list[float]) -> list[float]:
        return list(values)

    def max(self, value: int) -> int:
        return value

    def barrier(self) -> None:
        pass

    def close(self) -> None:
        pass


class Ranks(SingleProcess):
    """The torch.distributed process group that DeepSpeed set up (gloo on CPU, nccl on GPU)."""

    def __init__(self):
        import torch.distributed as dist

        self.dist = dist
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.is_main = self.rank == 0
        self.device = torch.device("cpu") if dist.get_backend() == "gloo" else torch.device("cuda")

    def shard(self, items: list) -> list:
        per_rank = len(items) // self.world_size
        return items[self.rank * per_rank : (self.rank + 1) * per_rank]

    def gather(self, obj) -> list:
        out = [None] * self.world_size
        self.dist.all_gather_object(out, obj)
        return out

    def sum(self, values: list[float]) -> list[float]:
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        self.dist.all_reduce(tensor)
        return tensor.tolist()

    def max(self, value: int) -> int:
        tensor = torch.tensor([value], dtype=torch.long, device=self.device)
        self.dist.all_reduce(tensor, op=self.dist.ReduceOp.MAX)
        return int(tensor)

    def barrier(self) -> None:
        self.dist.barrier()

    def close(self) -> None:
        """Leave the process group before the interpreter exits: left to exit-time destructors, its threads can
        abort a rank (SIGABRT) after the run's work is done, and torchrun then fails the whole job."""
        if self.dist.is_initialized():
            self.dist.destroy_process_group()


def launched_world_size() -> int:
    """The number of processes torchrun (or the deepspeed launcher) started, 1 when run directly."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def single_process_rendezvous() -> None:
    """Set the variables torchrun would set, for one process: without them DeepSpeed looks for MPI."""
    if "RANK" in os.environ:
        return
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(
        RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )


ONE_PROCESS = SingleProcess()
