"""The policy's optimizer: AdamW on the recipe's learning-rate schedule, stepped in this process
(`TorchOptimization`) or by a DeepSpeed ZeRO engine (`alphaalign.rl.zero.ZeroOptimization`).

Both give the trainer the same calls: `model` (what forward passes go through), `module` (the policy itself),
`zero_grad()`, `backward(loss)`, `step(loss_finite) -> gradient norm`, `lr`, and `save(folder)` /
`load(folder)` for the optimizer, scheduler and RNG states of a checkpoint.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

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


class TorchOptimization:
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

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save(self, folder: Path, tokenizer) -> None:
        self.module.save_pretrained(folder / "policy")
        tokenizer.save_pretrained(folder / "policy")
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "rng": rng_state()}  # fmt: skip
        torch.save(state, folder / "trainer_state.pt")

    def load(self, folder: Path) -> None:
        if not (folder / "trainer_state.pt").is_file():
            if (folder / "deepspeed").is_dir():
                raise UserError(
                    f"trainer.resume_from: {folder} was written by a DeepSpeed run; set trainer.deepspeed to resume it"
                )
            raise UserError(f"trainer.resume_from: {folder}: trainer_state.pt is missing")
        state = torch.load(folder / "trainer_state.pt", weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
