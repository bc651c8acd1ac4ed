"""The policy's optimizer: AdamW on the recipe's learning-rate schedule, stepped in this process
(`TorchOptimization`) or by a DeepSpeed ZeRO engine (`alphaalign.rl.zero.ZeroOptimization`); both declare
`Optimization`, the calls the trainer, the update and the checkpoints make.
"""

from __future__ import annotations

import copy
import math
import pickle
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from alphaalign.config import TrainerConfig
from alphaalign.errors import UserError


def lr_lambda(tc: TrainerConfig, total: int):
    def factor(step: int) -> float:
        if step < tc.warmup_steps:
            return (step + 1) / tc.warmup_steps
        progress = (step - tc.warmup_steps) / max(1, total - tc.warmup_steps)
        if tc.lr_scheduler == "linear":
            return max(0.0, 1.0 - progress)
        if tc.lr_scheduler == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        return 1.0

    return factor


def adamw(params, tc: TrainerConfig, cpu_adam: bool = False) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; DeepSpeed's CPU Adam when the optimizer state is offloaded."""
    params = [p for p in params if p.requires_grad]
    kwargs = {"lr": tc.learning_rate, "betas": tc.adam_betas, "weight_decay": tc.weight_decay}
    if cpu_adam:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, adamw_mode=True, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


def load_state(path: Path, **options):
    """`torch.load` with the weights-only unpickler: a checkpoint is data. A file whose pickle names anything
    but tensors, plain values and the classes allowed by `torch.serialization.safe_globals` (a pickle that
    would run code when loaded) is refused in one line, and nothing in it runs."""
    try:
        return torch.load(path, weights_only=True, **options)
    except pickle.UnpicklingError as exc:
        lines = [line.strip() for line in str(exc).splitlines()]
        reason = next((line for line in lines if "GLOBAL" in line or "Unsupported" in line), lines[0])
        raise UserError(
            f"{path}: refused: not a checkpoint of plain data (loading it could run code: {reason})"
        ) from None


def rng_state() -> dict:
    rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def set_rng_state(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


@dataclass
class Snapshot:
    """Copies, in CPU memory (GPU memory is the scarce one), of everything an optimizer step changes."""

    tensors: list[tuple[torch.Tensor, torch.Tensor]]  # (live tensor, its copy)
    state: dict  # optimizer.state: parameter -> {name: value}, values copied
    groups: list[dict]  # each param group's settings (the learning rate above all), without its parameters
    scheduler: dict


def _cpu_copy(value):
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _cpu_copy(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_cpu_copy(v) for v in value)
    return copy.deepcopy(value)


def take_snapshot(tensors, optimizer: torch.optim.Optimizer, scheduler) -> Snapshot:
    """`tensors` (the weights as this process holds them) plus the optimizer's own parameters (ZeRO's fp32
    master partitions), its state (moments, step counts), its learning rates and the schedule.

    The state is read per parameter, not through `state_dict()`: DeepSpeed swaps the optimizer's param
    groups while it steps, which `state_dict()` cannot map."""
    owned = [p for group in optimizer.param_groups for p in group["params"]] + list(optimizer.state)
    unique = {id(t): t for t in [*tensors, *owned]}.values()
    return Snapshot(
        tensors=[(t, _cpu_copy(t)) for t in unique],
        state={param: _cpu_copy(dict(values)) for param, values in optimizer.state.items()},
        groups=[
            _cpu_copy({k: v for k, v in group.items() if k != "params"}) for group in optimizer.param_groups
        ],
        scheduler=_cpu_copy(scheduler.state_dict()),
    )


def restore_snapshot(saved: Snapshot, optimizer: torch.optim.Optimizer, scheduler) -> None:
    """Everything `take_snapshot` copied, bit for bit, in place: ZeRO's views into its flat buffers stay
    views, and the optimizer state keeps its tensors (DeepSpeed links to them); state created since is
    dropped."""
    with torch.no_grad():
        for live, copied in saved.tensors:
            if live.numel() == 0 < copied.numel():
                continue  # a ZeRO-3 parameter released since: it is gathered again from its restored partition
            live.data.copy_(copied)
        for param in [p for p in optimizer.state if p not in saved.state]:
            del optimizer.state[param]
        for param, values in saved.state.items():
            live_values = optimizer.state[param]
            for name in [n for n in live_values if n not in values]:
                del live_values[name]
            for name, value in values.items():
                current = live_values.get(name)
                if (
                    isinstance(value, torch.Tensor)
                    and isinstance(current, torch.Tensor)
                    and (current.shape == value.shape and current.dtype == value.dtype)
                ):
                    current.copy_(value)
                else:
                    live_values[name] = (
                        value.to(param.device)
                        if isinstance(value, torch.Tensor) and (name != "step")
                        else value
                    )
    for group, settings in zip(optimizer.param_groups, saved.groups, strict=True):
        group.update(copy.deepcopy(settings))
    scheduler.load_state_dict(copy.deepcopy(saved.scheduler))


class Optimization(Protocol):
    """What the trainer, `rl.update` and `rl.checkpoint` use of an optimizer."""

    model: (
        torch.nn.Module
    )  # what forward and backward passes go through (a DeepSpeed engine wraps the policy)
    module: torch.nn.Module  # the policy itself

    def zero_grad(self) -> None: ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self, loss_finite: bool) -> float:
        """Apply the accumulated gradients; returns their norm, nothing applied when it is not finite."""
        ...

    @property
    def lr(self) -> float: ...

    def snapshot(self) -> Snapshot:
        """Everything a step changes, so that a skipped update can undo the steps it already made."""
        ...

    def restore(self, saved: Snapshot) -> None: ...

    def full_state_dict(self) -> dict | None:
        """The whole weights on rank 0 when the module's are sharded (a collective); None when they are not."""
        ...

    def save(self, folder: Path, tokenizer) -> None:
        """The policy, optimizer, scheduler and RNG states of a checkpoint."""
        ...

    def load(self, folder: Path) -> None: ...


class TorchOptimization(Optimization):
    """AdamW on the policy in this process, gradients clipped to `trainer.max_grad_norm`."""

    def __init__(self, policy, tc: TrainerConfig, total_updates: int):
        self.model = self.module = policy
        self.optimizer = adamw(policy.parameters(), tc)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(tc, total_updates))
        self.max_grad_norm = tc.max_grad_norm

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, loss_finite: bool) -> float:
        """Clip and apply the accumulated gradients, returning their norm; nothing is applied (and the
        schedule does not advance) when the loss or the norm is not finite."""
        norm = float(torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.max_grad_norm))
        if loss_finite and math.isfinite(norm):
            self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def snapshot(self) -> Snapshot:
        return take_snapshot([], self.optimizer, self.scheduler)

    def restore(self, saved: Snapshot) -> None:
        restore_snapshot(saved, self.optimizer, self.scheduler)

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def full_state_dict(self) -> None:
        return None  # the module holds its weights whole

    def save(self, folder: Path, tokenizer) -> None:
        self.module.save_pretrained(folder / "policy")
        tokenizer.save_pretrained(folder / "policy")
        state = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng_state(),
        }
        torch.save(state, folder / "trainer_state.pt")

    def load(self, folder: Path) -> None:
        if not (folder / "trainer_state.pt").is_file():
            if (folder / "deepspeed").is_dir():
                raise UserError(
                    f"trainer.resume_from: {folder} was written by a DeepSpeed run; set trainer.deepspeed to resume it"
                )
            raise UserError(f"trainer.resume_from: {folder}: trainer_state.pt is missing")
        state = load_state(folder / "trainer_state.pt")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
